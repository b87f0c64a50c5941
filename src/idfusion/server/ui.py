"""The gradio web UI: Generate, Compare and Template tabs over the job service.

Every handler submits to :class:`~idfusion.server.service.JobService` and follows the job there, exactly as an API
client does; nothing here runs a pipeline. The method-specific widgets come from the registry: one widget per
option a request may set (:func:`~idfusion.server.catalogue.request_options`), shown for the methods that take it;
blend weights where a method has the ``"blending"`` feature; the Template tab for methods with ``"templates"``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .catalogue import RequestOption, ServedMethod
from .service import Job, JobRequest, JobService, ServiceError, Upload

__all__ = ["build_ui", "ui_theme"]

logger = logging.getLogger(__name__)

_MAIN = ("prompt", "negative_prompt", "style")  # shown above the fold; every other option is under "advanced"
_RESERVED_HERE = ("steps", "guidance", "width", "height")  # grouped together under "advanced" first
_POLL_S = 0.3
_MAX_IMAGES = 8


def ui_theme() -> Any:
    """The default theme with the system fonts: nothing is fetched from a font service (servers may be offline)."""
    import gradio as gr

    return gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


# ---- helpers shared by the tabs ------------------------------------------------------------------------------------


def _read_upload(path: str | None, fallback: str) -> Upload | None:
    """The bytes of a file gradio received, checked to lie in gradio's upload folder."""
    if not path:
        return None
    from gradio.utils import get_upload_folder

    folder = Path(get_upload_folder()).resolve()
    resolved = Path(path).resolve()
    if folder not in resolved.parents or not resolved.is_file():
        raise ServiceError(f"{fallback}: not an uploaded file", 400)
    return Upload.named(resolved.read_bytes(), resolved.name, fallback)


def _progress(status: dict[str, Any]) -> str:
    state, phase = status["state"], status["phase"]
    step, steps = status["progress"]["step"], status["progress"]["steps"]
    if state == "failed":
        return f"**Failed:** {status['error']}"
    if state == "cancelled":
        return "**Cancelled.**"
    if state == "done":
        seconds = (status["finished"] or 0) - (status["started"] or 0)
        return f"**Done** in {seconds:.1f} s: {', '.join(status['images'])}"
    if state == "queued":
        return "**Queued**: waiting for a free worker ..."
    detail = f"step {step} of {steps}" if steps and phase == "sampling" else phase
    return f"**Running** ({detail}) ..."


def _follow(service: JobService, job: Job) -> Iterator[dict[str, Any]]:
    """The job's status every ``_POLL_S`` seconds until it ends (then once more, final)."""
    while True:
        status = job.status()
        yield status
        if job.state.finished:
            return
        service.wait(job.id, _POLL_S)


def _score_text(scores: dict[str, Any] | None, k: int) -> str:
    if not scores:
        return ""
    value = scores["scores"][k] if k < len(scores["scores"]) else None
    if value is None:
        return "judge: no face"
    same = scores.get("threshold") is not None and value >= scores["threshold"]
    return f"judge {value:.2f}{' (same person)' if same else ''}"


def _gallery(service: JobService, job: Job, label: str = "") -> list[tuple[str, str]]:
    status = job.status()
    items = []
    for k, name in enumerate(status["images"]):
        caption = " · ".join(part for part in (label, _score_text(status["scores"], k)) if part)
        items.append((str(service.file_path(job.id, name)), caption or name))
    return items


def _downloads(service: JobService, job: Job) -> list[str]:
    files = [str(service.file_path(job.id, name)) for name in job.files]
    if job.images:
        files.append(str(service.metadata_file(job.id)))
    return files


def _message(report: Any) -> str:
    return ("✓ " if report.ok else "✗ ") + report.message


def _option_widget(gr: Any, option: RequestOption, visible: bool) -> Any:
    kwargs = {"label": option.label, "info": option.option.help, "visible": visible, "elem_id": f"opt-{option.dest}"}
    if option.widget == "flag":
        return gr.Checkbox(value=False, **kwargs)
    if option.widget == "choice":
        choices = [("(default)", "")] + [(choice, choice) for choice in option.choices or ()]
        return gr.Dropdown(choices=choices, value="", **kwargs)
    if option.widget == "image":
        kwargs.pop("info")
        return gr.Image(type="filepath", image_mode=None, sources=["upload", "clipboard"], height=180, **kwargs)
    # numbers are text boxes too: blank means "the method's default" (an empty gr.Number reads as 0), and the
    # registry's parsers read the text exactly as the command line's
    lines = 2 if option.dest.endswith("prompt") else 1
    return gr.Textbox(lines=lines, placeholder="" if lines > 1 else "(default)", **kwargs)


def _options_by_dest(served: Sequence[ServedMethod]) -> dict[str, RequestOption]:
    found: dict[str, RequestOption] = {}
    for method in served:
        for option in method.options:
            found.setdefault(option.dest, option)
    return found


def _about(served: ServedMethod) -> str:
    faces = "face photos condition the images" if served.conditioned else "the prompt only; faces are references"
    where = served.model or ("the shipped world weights" if served.source == "world" else "the official release")
    return f"**{served.title}**: {served.spec.summary}. Weights: `{where}` ({served.source}); {faces}."


def _split_values(
    option_order: Sequence[str], values: Sequence[Any], served: ServedMethod
) -> tuple[dict[str, Any], dict[str, Upload]]:
    """The widget values as request parameters (the method's own options, when set) and image uploads."""
    params: dict[str, Any] = {}
    files: dict[str, Upload] = {}
    for dest, value in zip(option_order, values, strict=True):
        option = served.option(dest)
        if option is None or value is None or value is False or (isinstance(value, str) and not value.strip()):
            continue
        if option.widget == "image":
            upload = _read_upload(value, dest)
            if upload is not None:
                files[dest] = upload
        else:
            params[dest] = value.strip() if isinstance(value, str) and option.widget != "text" else value
    return params, files


def _whole_or_none(text: str | None, name: str) -> int | None:
    """A blank text box as ``None``, else a whole number (``ServiceError`` otherwise)."""
    text = (text or "").strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise ServiceError(f"{name}: expected a whole number, got {text!r}") from None


# ---- the tabs ------------------------------------------------------------------------------------------------------


def _generate_tab(gr: Any, service: JobService, served: list[ServedMethod]) -> None:
    first = served[0]
    slots = service.config.max_faces
    options = _options_by_dest(served)
    main = [d for d in options if d in _MAIN or options[d].widget == "image"]
    advanced = [d for d in _RESERVED_HERE if d in options] + [
        d for d in options if d not in main + list(_RESERVED_HERE)
    ]
    with gr.Row():
        method = gr.Dropdown(
            choices=[(f"{m.title} [{m.source}]", m.name) for m in served], value=first.name, label="method",
            elem_id="gen-method", scale=2,
        )  # fmt: skip
        face_index = gr.Textbox(
            label="face index in group photos", placeholder="the largest", elem_id="gen-face-index",
            info="blank: the largest face; 0 = leftmost",
        )  # fmt: skip
    about = gr.Markdown(_about(first))
    photos, found, notes, weights = [], [], [], []
    with gr.Row():
        for k in range(slots):
            with gr.Column(min_width=150):
                photos.append(
                    gr.Image(
                        label=f"face {k + 1}",
                        type="filepath",
                        image_mode=None,
                        sources=["upload", "clipboard"],
                        height=200,
                        elem_id=f"gen-face-{k}",
                    )  # fmt: skip
                )
                found.append(gr.Image(label="detected face", interactive=False, height=120, elem_id=f"gen-found-{k}"))
                notes.append(gr.Markdown(elem_id=f"gen-note-{k}"))
                weights.append(
                    gr.Slider(0, 1, value=1.0, step=0.05, label="blend weight", visible=first.supports("blending"))
                )
    widgets: dict[str, Any] = {}
    for dest in main:
        widgets[dest] = _option_widget(gr, options[dest], first.option(dest) is not None)
    with gr.Accordion("advanced", open=False):
        with gr.Row():
            num_images = gr.Slider(1, _MAX_IMAGES, value=1, step=1, label="images", elem_id="gen-num-images")
            seed = gr.Textbox(label="seed", placeholder="random", elem_id="gen-seed")
        for dest in advanced:
            widgets[dest] = _option_widget(gr, options[dest], first.option(dest) is not None)
    order = list(widgets)
    with gr.Row():
        run = gr.Button("Generate", variant="primary", elem_id="gen-run")
        stop = gr.Button("Cancel", elem_id="gen-cancel")
    status = gr.Markdown(elem_id="gen-status")
    job_id = gr.State(None)
    gallery = gr.Gallery(
        label="images",
        columns=4,
        height=320,
        object_fit="contain",
        preview=False,
        fit_columns=False,
        elem_id="gen-gallery",
        format="png",
    )
    with gr.Row():
        files = gr.File(label="download: PNGs (metadata embedded) and metadata.json", file_count="multiple")
        metadata = gr.JSON(label="metadata")

    def inspect(name: str, path: str | None, index: str | None) -> tuple[Any, str]:
        try:
            upload = _read_upload(path, "face")
            if upload is None:
                return None, ""
            report = service.inspect_face(name, upload, _whole_or_none(index, "face index"))
        except ServiceError as error:
            return None, f"✗ {error}"
        return report.preview, _message(report)

    def on_method(name: str, index: str | None, *paths: str | None) -> list[Any]:
        chosen = service.methods[name]
        updates: list[Any] = [_about(chosen)]
        updates += [gr.update(visible=chosen.supports("blending")) for _ in weights]
        updates += [gr.update(visible=chosen.option(dest) is not None) for dest in order]
        looked = [inspect(name, path, index) for path in paths]
        return updates + [preview for preview, _ in looked] + [note for _, note in looked]

    def on_generate(name: str, index: str | None, count: float, first_seed: str | None, *values: Any):
        chosen = service.methods[name]
        paths, blend, rest = values[:slots], values[slots : 2 * slots], values[2 * slots :]
        try:
            faces, face_weights = [], []
            for k, (path, weight) in enumerate(zip(paths, blend, strict=True)):
                upload = _read_upload(path, f"face {k + 1}")
                if upload is not None:
                    faces.append(upload)
                    face_weights.append(float(weight))
            params, uploads = _split_values(order, rest, chosen)
            params["num_images"] = int(count)
            for key, text in (("seed", first_seed), ("face_index", index)):
                value = _whole_or_none(text, key)
                if value is not None:
                    params[key] = value
            if chosen.supports("blending") and faces:
                params["face_weights"] = face_weights
            job = service.submit(JobRequest(name, params, faces, uploads))
        except ServiceError as error:
            yield None, f"**Not started:** {error}", gr.update(), gr.update(), gr.update()
            return
        for state in _follow(service, job):
            yield job.id, _progress(state), gr.update(), gr.update(), gr.update()
        if job.state.value == "done":
            yield (
                job.id,
                _progress(job.status()),
                _gallery(service, job),
                _downloads(service, job),
                service.metadata(job.id),
            )

    def on_cancel(current: str | None) -> str:
        if not current:
            return "nothing to cancel"
        try:
            service.cancel(current)
        except ServiceError as error:
            return str(error)
        return "**Cancelling** ..."

    for photo, preview, note in zip(photos, found, notes, strict=True):
        photo.change(inspect, [method, photo, face_index], [preview, note], api_visibility="private")
    method.change(
        on_method, [method, face_index, *photos], [about, *weights, *(widgets[d] for d in order), *found, *notes],
        api_visibility="private",
    )  # fmt: skip
    run.click(
        on_generate, [method, face_index, num_images, seed, *photos, *weights, *(widgets[d] for d in order)],
        [job_id, status, gallery, files, metadata], api_visibility="private", concurrency_limit=None,
    )  # fmt: skip
    stop.click(on_cancel, [job_id], [status], api_visibility="private", concurrency_limit=None)


def _compare_tab(gr: Any, service: JobService, served: list[ServedMethod]) -> None:
    slots = service.config.max_faces
    gr.Markdown(
        "The same faces, prompt and seed through several methods. Under each image: the world judge's identity "
        "score (cosine similarity to the reference faces; the same person above its threshold). The prompt-only "
        "base model's scores are the floor an identity method has to beat. The judge knows world faces only."
    )
    methods = gr.CheckboxGroup(
        choices=[(m.title, m.name) for m in served], value=[m.name for m in served[:4]], label="methods",
        elem_id="cmp-methods",
    )  # fmt: skip
    with gr.Row():
        photos = [
            gr.Image(
                label=f"face {k + 1}",
                type="filepath",
                image_mode=None,
                sources=["upload", "clipboard"],
                height=160,
                elem_id=f"cmp-face-{k}",
            )
            for k in range(slots)
        ]
    with gr.Row():
        prompt = gr.Textbox(label="prompt", lines=2, elem_id="cmp-prompt", scale=3)
        seed = gr.Textbox(value="0", label="seed", elem_id="cmp-seed")
        steps = gr.Textbox(label="steps", placeholder="each method's default", elem_id="cmp-steps")
    run = gr.Button("Compare", variant="primary", elem_id="cmp-run")
    status = gr.Markdown(elem_id="cmp-status")
    gallery = gr.Gallery(
        label="side by side",
        columns=4,
        height=320,
        object_fit="contain",
        preview=False,
        fit_columns=False,
        elem_id="cmp-gallery",
        format="png",
    )
    table = gr.Dataframe(headers=["method", "state", "judge score", "seconds", "message"], interactive=False)

    def on_compare(names: list[str], text: str, first_seed: str | None, count: str | None, *paths: str | None):
        if not names:
            yield "**Choose at least one method.**", gr.update(), gr.update()
            return
        try:
            faces = [u for k, p in enumerate(paths) if (u := _read_upload(p, f"face {k + 1}")) is not None]
            seed_value, steps_value = _whole_or_none(first_seed, "seed") or 0, _whole_or_none(count, "steps")
        except ServiceError as error:
            yield f"**Not started:** {error}", gr.update(), gr.update()
            return
        jobs: dict[str, Job | str] = {}
        for name in names:
            params: dict[str, Any] = {"score": True, "seed": seed_value}
            if text:
                params["prompt"] = text
            if steps_value is not None:
                params["steps"] = steps_value
            try:
                jobs[name] = service.submit(JobRequest(name, params, faces))
            except ServiceError as error:
                jobs[name] = str(error)
        while True:
            rows, running = [], 0
            for name, job in jobs.items():
                if isinstance(job, str):
                    rows.append([name, "refused", "", "", job])
                    continue
                state = job.status()
                running += not job.state.finished
                scores = state["scores"]["scores"] if state["scores"] else []
                shown = ", ".join("no face" if s is None else f"{s:.2f}" for s in scores)
                seconds = (
                    f"{state['finished'] - state['started']:.1f}" if state["finished"] and state["started"] else ""
                )
                detail = state["phase"] if not job.state.finished else ""
                rows.append([name, state["state"], shown, seconds, state["error"] or detail])
            if not running:
                break
            yield f"**Running** {running} of {len(jobs)} ...", gr.update(), rows
            time.sleep(_POLL_S)
        images = [
            item
            for name, job in jobs.items()
            if isinstance(job, Job) and job.state.value == "done"
            for item in _gallery(service, job, service.methods[name].title)
        ]
        yield f"**Done**: {len(images)} images from {len(jobs)} methods", images, rows

    run.click(
        on_compare, [methods, prompt, seed, steps, *photos], [status, gallery, table], api_visibility="private",
        concurrency_limit=None,
    )  # fmt: skip


def _template_tab(gr: Any, service: JobService, served: list[ServedMethod]) -> None:
    from ..registry import methods_with

    capable = [m for m in served if m.supports("templates")]
    if not capable:
        names = ", ".join(spec.name for spec in methods_with("templates"))
        gr.Markdown(
            f"No method served here repaints fixed templates. Methods that can: {names}; serve one with "
            "`idfusion serve --model METHOD=PATH`."
        )
        return
    first = capable[0]
    gr.Markdown(
        "Repaint the faces of a template photo with the identity of the face photo(s): every pixel outside the "
        "feathered face mask is the template's, and the output keeps the template's size."
    )
    method = gr.Dropdown(choices=[(m.title, m.name) for m in capable], value=first.name, label="method")
    with gr.Row():
        template = gr.Image(
            label="template",
            type="filepath",
            image_mode=None,
            sources=["upload", "clipboard"],
            height=240,
            elem_id="tpl-template",
        )
        photos = [
            gr.Image(
                label=f"face {k + 1}",
                type="filepath",
                image_mode=None,
                sources=["upload", "clipboard"],
                height=240,
                elem_id=f"tpl-face-{k}",
            )
            for k in range(2)
        ]
    with gr.Row():
        which = gr.Textbox(value="0", label="template face to repaint", info="0 = leftmost, or 'all'")
        strength = gr.Textbox(label="strength", placeholder="the method's", info="0 to 1")
        use_pose = gr.Checkbox(value=False, label="keep the template's pose", visible=first.supports("pose"))
    with gr.Row():
        prompt = gr.Textbox(label="prompt", lines=2, scale=3)
        seed = gr.Textbox(label="seed", placeholder="random")
        steps = gr.Textbox(label="steps", placeholder="the method's")
    run = gr.Button("Repaint", variant="primary")
    status = gr.Markdown()
    gallery = gr.Gallery(
        label="portraits", columns=4, height=320, object_fit="contain", preview=False, fit_columns=False, format="png"
    )
    files = gr.File(label="download", file_count="multiple")

    def on_method(name: str) -> Any:
        return gr.update(visible=service.methods[name].supports("pose"))

    def on_repaint(name: str, tpl: str | None, face_text: str, power: str | None, pose: bool, text: str, *rest: Any):
        first_seed, count, *paths = rest
        try:
            faces = [u for k, p in enumerate(paths) if (u := _read_upload(p, f"face {k + 1}")) is not None]
            image = _read_upload(tpl, "template")
            if image is None:
                raise ServiceError("upload a template photo")
            face_text = face_text.strip().lower() or "0"
            settings: dict[str, Any] = {"face_index": face_text if face_text == "all" else _whole(face_text)}
            if (power or "").strip():
                settings["strength"] = _number(power, "strength")
            if pose:
                settings["use_pose"] = True
            params: dict[str, Any] = {"template": settings}
            if text:
                params["prompt"] = text
            for key, value in (("seed", first_seed), ("steps", count)):
                if _whole_or_none(value, key) is not None:
                    params[key] = _whole_or_none(value, key)
            job = service.submit(JobRequest(name, params, faces, {"template": image}))
        except ServiceError as error:
            yield f"**Not started:** {error}", gr.update(), gr.update()
            return
        for state in _follow(service, job):
            yield _progress(state), gr.update(), gr.update()
        if job.state.value == "done":
            yield _progress(job.status()), _gallery(service, job), _downloads(service, job)

    method.change(on_method, [method], [use_pose], api_visibility="private")
    run.click(
        on_repaint, [method, template, which, strength, use_pose, prompt, seed, steps, *photos],
        [status, gallery, files], api_visibility="private", concurrency_limit=None,
    )  # fmt: skip


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ServiceError(f"template face: expected a whole number or 'all', got {text!r}") from None


def _number(text: str | None, name: str) -> float:
    try:
        return float((text or "").strip())
    except ValueError:
        raise ServiceError(f"{name}: expected a number, got {text!r}") from None


def build_ui(service: JobService) -> Any:
    """The gradio ``Blocks`` of the UI (mount it with :func:`gradio.mount_gradio_app`; :func:`create_app` does)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    served = list(service.methods.values())
    with gr.Blocks(title="idfusion", analytics_enabled=False) as blocks:
        gr.Markdown(
            "## idfusion\nIdentity-preserving generation from one to four face photos. Programs can use the same "
            "server through its HTTP API ([docs](/docs))."
        )
        with gr.Tabs():
            with gr.Tab("Generate", id="generate"):
                _generate_tab(gr, service, served)
            with gr.Tab("Compare", id="compare"):
                _compare_tab(gr, service, served)
            with gr.Tab("Template", id="template"):
                _template_tab(gr, service, served)
    blocks.queue(default_concurrency_limit=None, max_size=service.config.max_queued * 4 + 16)
    return blocks
