"""One generation job, run the same way by the CLI, the web UI and the HTTP API.

A :class:`GenerationJob` says what to make (the method, the identity, the registry options' values, seeds, an
optional fixed template); :class:`LoadSettings` says how the server or the command line loads models (device, dtype,
face models, memory options). :func:`run_job` checks the job against the method registry, takes the pipeline from a
:class:`PipelineCache` (or loads it), calls it with progress and cancellation through diffusers'
``callback_on_step_end``, and returns its :class:`~idfusion.pipelines.core.IdentityPipelineOutput`;
:func:`save_results` writes the PNGs (metadata embedded) and the contact sheet.

Nothing here branches on a method's name: options, features and limits come from :mod:`idfusion.registry`.
Importing this module imports neither torch nor diffusers.
"""

from __future__ import annotations

import gc
import io
import itertools
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import IdfusionError

__all__ = [
    "DTYPES",
    "JobCancelled",
    "JobError",
    "LIMITS",
    "LoadSettings",
    "TemplateSettings",
    "GenerationJob",
    "PipelineCache",
    "check_job",
    "check_limits",
    "given",
    "given_options",
    "resolve_device",
    "load_configured",
    "build_call",
    "run_job",
    "save_results",
]

logger = logging.getLogger(__name__)

DTYPES = ("float32", "float16", "bfloat16")

#: progress(step, steps): ``step`` of ``steps`` sampling steps of the current pipeline call are done
ProgressFn = Callable[[int, int], None]


class JobError(IdfusionError, ValueError):
    """A job that cannot run as given (an option the method does not take, too many images, no identity...)."""


class JobCancelled(IdfusionError):
    """The job was cancelled while it ran (raised from the sampling loop's step callback)."""


def given(value: Any) -> bool:
    """Whether an option value counts as given (the CLI's ``None``/``False``/``[]`` mean "not on the command line")."""
    return value not in (None, False, [])


@dataclass(frozen=True)
class LoadSettings:
    """How pipelines are loaded: the command line's (or the server's) device, dtype, face-model and memory options.

    Hashable: with the method, model and load options it is the :class:`PipelineCache` key.
    """

    device: str | None = None
    dtype: str | None = None
    face_models: Path | None = None
    detector: str | None = None
    cpu_offload: bool = False
    vae_tiling: bool = False
    attention_slicing: bool = False
    #: ``None``: not passed (the CLI may download official releases); ``True``: never touch a model hub
    local_files_only: bool | None = None
    progress_bar: bool = True


@dataclass(frozen=True)
class TemplateSettings:
    """A fixed-template job (:func:`idfusion.flows.template.template_portraits`): the template photo, which of its
    faces to repaint (counted from the left, or ``"all"``), the inpainting strength and whether to keep its pose."""

    image: Any
    face_index: int | str = 0
    strength: float | None = None
    use_pose: bool = False


@dataclass
class GenerationJob:
    """What to generate.

    Attributes:
        method: a registered method name.
        faces: the face photos (paths, encoded bytes, PIL images or arrays; see :func:`idfusion.images.load_image`).
        face_weights: one blend weight per photo (methods with the ``"blending"`` feature), ``None``: equal.
        photo_face_index: in face photos with several people, the face to use, counted from the left from 0
            (``None``: the method's own choice, the largest face; FlashFace refuses such photos); recorded in every
            image as ``photo_face_index``.
        options: registry option values by :attr:`~idfusion.registry.Option.dest` (``"steps"``, ``"face_box"``...),
            already parsed; ``"file"`` options hold an image input. Values that are not :func:`given` are ignored.
        num_images: images to make (one seed each).
        seed: the first image's seed (the next get ``seed + 1``...); ``None``: random.
        model: the weights (folder or Hub id); ``None``: the method's official release.
        id_embeds: a precomputed identity instead of ``faces`` (methods with ``identity == "embedding"``).
        recorded_scheduler: ``(name, config)`` of a recorded sampler, used for this job only (an exact replay).
        template: set for a fixed-template job.
        allow_large: lift :data:`LIMITS` (the user asked for a very large job on purpose).
    """

    method: str
    faces: list[Any] = field(default_factory=list)
    face_weights: list[float] | None = None
    photo_face_index: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    num_images: int = 1
    seed: int | None = None
    model: str | None = None
    id_embeds: Any = None
    recorded_scheduler: tuple[str, dict[str, Any]] | None = None
    template: TemplateSettings | None = None
    allow_large: bool = False

    @property
    def spec(self):
        from .registry import get_method

        return get_method(self.method)

    def option(self, dest: str) -> Any:
        return self.options.get(dest)


# ---- checks --------------------------------------------------------------------------------------------------

#: Upper bounds on one job, far above any published setting (the methods sample 25-50 steps at 512-768 px), so a
#: typo such as ``--steps 100000`` is refused up front instead of running for hours; ``allow_large`` lifts them.
LIMITS = {"steps": 1000, "width": 4096, "height": 4096, "num_images": 64}


def check_limits(job: GenerationJob) -> None:
    """Refuse sizes that are not multiples of 8 and, unless ``job.allow_large``, values above :data:`LIMITS`."""
    for name in ("width", "height"):
        value = job.options.get(name)
        if given(value) and value % 8:
            raise JobError(f"--{name} must be a multiple of 8 (the VAE downsamples by 8), got {value}")
    if job.allow_large:
        return
    values = {**{k: job.options.get(k) for k in ("steps", "width", "height")}, "num_images": job.num_images}
    for name, limit in LIMITS.items():
        if given(values[name]) and values[name] > limit:
            flag = name.replace("_", "-")
            raise JobError(
                f"--{flag} {values[name]} is above the limit of {limit}; add --allow-large to run it anyway"
            )


def check_job(job: GenerationJob) -> None:
    """Refuse what the method cannot do before any model loads: options of other methods (naming the methods that
    take them), blend weights where the method does not blend, too many images, a missing identity.

    Raises:
        JobError: with one line naming the input and what was expected.
        UnknownMethodError: ``job.method`` is not registered.
    """
    from .registry import methods, options_by_flag

    spec = job.spec
    check_limits(job)
    allowed = {o.flag for o in spec.all_options()}
    titles = {s.name: s.title for s in methods()}
    refused = [
        f"{flag} is an option of {' and '.join(titles[n] for n in names)} (--method {', '.join(names)})"
        for flag, (option, names) in options_by_flag(methods()).items()
        if flag not in allowed and given(job.options.get(option.dest))
    ]
    if refused:
        raise JobError(f"{'; '.join(refused)}, not of {spec.title}")
    weights = job.face_weights or []
    if weights and len(weights) != len(job.faces):
        raise JobError(f"{len(weights)} face weights given for {len(job.faces)} face photos; give one per photo")
    if not spec.supports("blending") and any(w != 1.0 for w in weights):
        blending = [s.name for s in methods() if s.supports("blending")]
        raise JobError(f"face weights (IMAGE:WEIGHT) blend identities in {', '.join(blending)} only, not {spec.name}")
    if spec.max_images is not None and (job.num_images or 1) > spec.max_images:
        raise JobError(f"--num-images: {spec.title} makes 1 to {spec.max_images} images per request")
    if not job.faces and job.id_embeds is None:
        raise JobError("give at least one face photo")
    if job.template is not None:
        if not spec.supports("templates"):
            with_templates = [s.name for s in methods() if s.supports("templates")]
            raise JobError(f"{spec.title} cannot repaint templates; methods that can: {', '.join(with_templates)}")
        if job.template.use_pose and not spec.supports("pose"):
            raise JobError(f"--pose: {spec.title} has no pose control")
        sized = [name for name in ("width", "height") if given(job.options.get(name))]
        if sized:
            raise JobError(f"{' and '.join(sized)}: a template portrait keeps the template's size; do not give them")


# ---- loading -------------------------------------------------------------------------------------------------


def resolve_device(device: str | None, dtype: str | None) -> tuple[str, Any]:
    """``(device, torch dtype or None)``, checked against this machine."""
    import torch

    device = device or "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise JobError(f"--device {device}: CUDA is not available on this machine (torch {torch.__version__})")
    if device == "mps" and not torch.backends.mps.is_available():
        raise JobError("--device mps: Apple's MPS backend is not available on this machine")
    if not (device == "cpu" or device == "mps" or device.startswith("cuda")):
        raise JobError(f"--device must be cpu, cuda, cuda:N or mps, got {device!r}")
    if dtype is not None and dtype not in DTYPES:
        raise JobError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return device, (getattr(torch, dtype) if dtype else None)


def load_configured(spec, model: str | None, settings: LoadSettings, load_options: Mapping[str, Any] | None = None):
    """Load ``spec``'s pipeline with ``settings`` and the registry's load options (``from_pretrained`` arguments)."""
    from .registry import load_pipeline

    device, dtype = resolve_device(settings.device, settings.dtype)
    if settings.cpu_offload and device == "cpu":
        raise JobError("--cpu-offload moves models between the CPU and a GPU; give --device cuda (or mps) with it")
    load_kwargs: dict[str, Any] = {"face_model_dir": settings.face_models, **dict(load_options or {})}
    if dtype is not None:
        load_kwargs["torch_dtype"] = dtype
    if settings.local_files_only is not None:
        load_kwargs["local_files_only"] = settings.local_files_only
    from .pipelines.core import freeze_for_inference

    pipe = freeze_for_inference(load_pipeline(spec.name, model, **load_kwargs))
    if settings.cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    if settings.vae_tiling:
        pipe.vae.enable_tiling()
    if settings.attention_slicing:
        pipe.enable_attention_slicing()
    if settings.detector is not None:
        pipe.configure_face_analysis(detector=settings.detector)
    if not settings.progress_bar:
        pipe.set_progress_bar_config(disable=True)
    return pipe


def _load_options(job: GenerationJob) -> dict[str, Any]:
    return {
        o.call_argument: job.options[o.dest]
        for o in job.spec.all_options()
        if o.target == "load" and given(job.options.get(o.dest))
    }


def _free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass


@dataclass
class _Entry:
    lock: threading.Lock = field(default_factory=threading.Lock)
    pipe: Any = None


class PipelineCache:
    """Loaded pipelines, least recently used first out, keyed by method, model, load settings (device, dtype...) and
    load options, so that switching methods does not reload every model each time.

    A pipeline carries per-call state (its scheduler, active LoRAs, adapter scales), so :meth:`use` gives one job at
    a time exclusive use of it; jobs on different pipelines run side by side. A pipeline in use is never evicted.

    Args:
        max_items: pipelines kept loaded (at least 1).
        loader: ``loader(spec, model, settings, load_options)``; default :func:`load_configured`.
    """

    def __init__(self, max_items: int = 2, loader: Callable[..., Any] | None = None) -> None:
        if max_items < 1:
            raise ValueError(f"max_items must be at least 1, got {max_items}")
        self.max_items = max_items
        self.loader = loader or load_configured
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0  # pipelines loaded so far (a cache miss each)

    @staticmethod
    def key(spec, model: str | None, settings: LoadSettings, load_options: Mapping[str, Any] | None = None) -> tuple:
        return (
            spec.name,
            model,
            settings.dtype,
            settings.device,
            settings,
            tuple(sorted((load_options or {}).items())),
        )

    def keys(self) -> list[tuple]:
        """Keys of the loaded pipelines, least recently used first."""
        with self._lock:
            return [key for key, entry in self._entries.items() if entry.pipe is not None]

    def _evict(self, keep: tuple, room: int) -> None:
        """Drop idle pipelines, oldest first, until at most ``max_items - room`` others stay loaded."""
        with self._lock:
            loaded = [(k, e) for k, e in self._entries.items() if k != keep and e.pipe is not None]
            excess = len(loaded) - (self.max_items - room)
            dropped = 0
            for key, entry in loaded:
                if dropped >= excess:
                    break
                if entry.lock.acquire(blocking=False):  # in use: keep it
                    try:
                        entry.pipe = None
                        del self._entries[key]
                        dropped += 1
                        logger.info("unloaded %s (model cache full)", key[0])
                    finally:
                        entry.lock.release()
        if excess > 0:
            _free_memory()

    @contextmanager
    def use(
        self, spec, model: str | None, settings: LoadSettings, load_options: Mapping[str, Any] | None = None
    ) -> Iterator[Any]:
        """The pipeline for this key (loaded on first use), held exclusively until the ``with`` block ends."""
        key = self.key(spec, model, settings, load_options)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = _Entry()
            self._entries.move_to_end(key)
        with entry.lock:
            if entry.pipe is None:
                self._evict(key, room=1)  # free memory before loading another model
                try:
                    entry.pipe = self.loader(spec, model, settings, load_options)
                except BaseException:
                    with self._lock:
                        if self._entries.get(key) is entry:
                            del self._entries[key]
                    raise
                self.loads += 1
            yield entry.pipe
        self._evict(key, room=0)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
        _free_memory()


# ---- running -------------------------------------------------------------------------------------------------


def build_call(job: GenerationJob) -> dict[str, Any]:
    """The pipeline call's arguments for ``job``: the given call options by pipeline argument, the identity, the
    image count and seed (no progress callback: :func:`run_job` adds it)."""
    spec = job.spec
    call: dict[str, Any] = {"num_images_per_prompt": job.num_images or 1, "seed": job.seed}
    for option in spec.all_options():
        value = job.options.get(option.dest)
        if option.target == "call" and given(value):
            call[option.call_argument] = str(value) if isinstance(value, os.PathLike) else value
    if job.faces:
        if job.photo_face_index is None:
            call["faces"] = list(job.faces)
        else:
            from .faces.types import FacePhoto

            call["faces"] = [FacePhoto(face, job.photo_face_index) for face in job.faces]
        if job.face_weights and any(w != 1.0 for w in job.face_weights):
            call["face_weights"] = list(job.face_weights)
    else:
        call["id_embeds"] = job.id_embeds
    return call


def _step_callback(
    steps: int, progress: ProgressFn | None, should_cancel: Callable[[], bool] | None
) -> Callable[..., dict[str, Any]]:
    def on_step_end(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        if should_cancel is not None and should_cancel():
            raise JobCancelled("the job was cancelled")
        if progress is not None:
            progress(min(step + 1, steps), steps)
        return tensors  # unchanged: diffusers' runners pop the tensors back from what the callback returns

    return on_step_end


def run_job(
    job: GenerationJob,
    settings: LoadSettings | None = None,
    *,
    cache: PipelineCache | None = None,
    progress: ProgressFn | None = None,
    should_cancel: Callable[[], bool] | None = None,
):
    """Check ``job``, load (or reuse) its pipeline, and generate.

    Args:
        job: what to make.
        settings: how to load the pipeline (default :class:`LoadSettings`).
        cache: reuse pipelines across jobs; ``None`` loads one for this job.
        progress: called after each sampling step with ``(step, steps)``.
        should_cancel: polled after each sampling step; when it returns true the job stops with
            :class:`JobCancelled` (the pipeline stays usable).

    Returns:
        The pipeline's :class:`~idfusion.pipelines.core.IdentityPipelineOutput`.
    """
    settings = settings or LoadSettings()
    check_job(job)
    spec = job.spec
    load_options = _load_options(job)
    if cache is None:
        pipe = load_configured(spec, job.model, settings, load_options)
        return _generate(pipe, job, progress, should_cancel)
    with cache.use(spec, job.model, settings, load_options) as pipe:
        return _generate(pipe, job, progress, should_cancel)


def _generate(pipe: Any, job: GenerationJob, progress: ProgressFn | None, should_cancel: Callable[[], bool] | None):
    if should_cancel is not None and should_cancel():
        raise JobCancelled("the job was cancelled")
    call = build_call(job)
    saved_scheduler = None
    if job.recorded_scheduler is not None and call.get("scheduler") in (None, job.recorded_scheduler[0]):
        from .pipelines.scheduling import make_scheduler

        saved_scheduler = pipe.scheduler
        pipe.scheduler = make_scheduler(*job.recorded_scheduler)  # exactly the recorded one, for this job only
        call.pop("scheduler", None)
    steps = call.get("num_inference_steps") or getattr(pipe, "default_settings", {}).get("num_inference_steps", 1)
    if progress is not None or should_cancel is not None:
        call["callback_on_step_end"] = _step_callback(int(steps), progress, should_cancel)
    try:
        result = pipe(**call) if job.template is None else _template(pipe, job, call)
        if job.photo_face_index is not None:
            for meta in result.metadata:
                meta["photo_face_index"] = job.photo_face_index  # replayed by --from
        return result
    finally:
        if saved_scheduler is not None:
            pipe.scheduler = saved_scheduler


def _template(pipe: Any, job: GenerationJob, call: dict[str, Any]):
    from .flows.template import template_portraits

    template = job.template
    faces = call.pop("faces", None)
    for name in ("num_images_per_prompt", "seed", "face_weights", "id_embeds"):
        call.pop(name, None)
    for option in job.spec.all_options():
        if option.kind == "file":  # the template is the flow's image input; a pose comes from it (use_pose)
            call.pop(option.call_argument, None)
    if template.strength is not None:
        call["strength"] = template.strength
    return template_portraits(
        pipe, template.image, faces, face_index=template.face_index, use_pose=template.use_pose,
        num_images=job.num_images or 1, seed=job.seed, max_images=job.spec.max_images, **call,
    )  # fmt: skip


def save_results(result: Any, out_dir: str | os.PathLike, stem: str, *, sheet: bool) -> list[Path]:
    """Save each image with its metadata as ``<stem>_NNNN.png`` and, with ``sheet``, the contact sheet beside the
    first. Each name is reserved atomically, so concurrent runs into one folder never overwrite each other.

    Returns:
        The paths written, images first.

    Raises:
        OutputError: image ``k`` could not be written; images ``0..k-1`` are kept and named in the message.
    """
    from .atomic import OutputError, publish_new
    from .outputs import contact_sheet, new_names, save_new_generated_image

    written: list[Path] = []
    names = new_names(out_dir, stem)
    for k, (image, meta) in enumerate(zip(result.images, result.metadata, strict=True)):
        try:
            written.append(save_new_generated_image(out_dir, stem, image, meta, names=names))
        except OutputError as error:
            which = "image 0 was" if k == 1 else f"images 0-{k - 1} were"
            kept = f"; {which} written and kept: {', '.join(map(str, written))}" if written else ""
            raise OutputError(f"image {k} of {len(result.images)}: {error}{kept}") from error
    if sheet and written:
        labels = [f"seed {m['seed']}" for m in result.metadata]
        buffer = io.BytesIO()
        contact_sheet(result.references, result.images, labels=labels).save(buffer, format="PNG")
        first = written[0]
        sheet_names = itertools.chain(
            [first.with_name(f"{first.stem}_sheet.png")],
            (first.with_name(f"{first.stem}_sheet_{n}.png") for n in itertools.count(1)),
        )
        written.append(publish_new(sheet_names, buffer.getvalue()))
    return written


def given_options(values: Any, specs: Sequence[Any] | None = None) -> dict[str, Any]:
    """The given option values of ``values`` (a mapping or a namespace, by dest) for every option of ``specs``
    (default: every method), so that :func:`check_job` can name an option the method does not take."""
    from .registry import methods, options_by_flag

    get = values.get if isinstance(values, Mapping) else lambda name: getattr(values, name, None)
    found = options_by_flag(specs if specs is not None else methods())
    return {option.dest: get(option.dest) for option, _ in found.values() if given(get(option.dest))}
