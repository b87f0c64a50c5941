"""What a server offers: its methods (:class:`ServedMethod`) and how a request may set each registry option.

Everything method-specific comes from :mod:`idfusion.registry` (options, features, limits). The one served entry
that is not a registry method is the synthetic world's base model (:data:`BASELINE`), a prompt-only baseline with
its own unregistered :class:`~idfusion.registry.MethodSpec`, its own loader and runner (:mod:`.baseline`); the
service calls every entry through the same three hooks (``check``, ``load``, ``run``).

Request policy: options that name files or models on the server (``target == "load"`` options such as
``--base-model``, and LoRA paths) are chosen when the server starts, never per request; ``"file"`` options are
uploads; a style is a name from the style catalogue, never a path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .. import values
from ..errors import IdfusionError
from ..jobs import GenerationJob, JobError, TemplateSettings
from ..registry import FEATURE_OPTIONS, MethodSpec, Option, get_method, methods, options_by_flag, resolve

__all__ = [
    "BASELINE",
    "BASELINE_SPEC",
    "RESERVED",
    "RequestError",
    "RequestOption",
    "ServedMethod",
    "official_model",
    "request_options",
    "serve_catalogue",
]

logger = logging.getLogger(__name__)

BASELINE = "world-base"
BASELINE_SPEC = MethodSpec(
    name=BASELINE,
    title="World base model (prompt only)",
    summary="the synthetic world's tiny SD1.5-architecture base model: the prompt alone, no identity; its judge "
    "scores are the floor an identity method has to beat",
    pipeline="diffusers:StableDiffusionPipeline",
    identity="photos",
    tiny="",
    features=frozenset({"negative_prompt"}),
)

#: request keys that are not registry options
RESERVED = ("method", "num_images", "seed", "face_weights", "face_index", "template", "score")
_STYLE_FLAG = FEATURE_OPTIONS["styles"][0].flag
_INTEGER_PARSERS = (values.positive_int, values.non_negative_int, values.seed)
_FLOAT_PARSERS = (values.finite, values.non_negative_float, values.unit_interval)
_MAX_TEXT = 4000  # characters of a text option (prompts): CLIP reads 77 tokens; this only bounds the request


class RequestError(IdfusionError, ValueError):
    """A request parameter that cannot be used; ``status`` is the HTTP status it maps to."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


def refusal(option: Option) -> str | None:
    """Why a request may not set ``option`` (``None``: it may)."""
    if option.target == "load":
        return "is chosen when the server starts (idfusion serve --model), not per request"
    if option.parse is values.weighted_path:
        return "names files on the server; it cannot be set per request"
    return None


@dataclass(frozen=True)
class RequestOption:
    """A registry option as a request parameter (JSON key ``dest``) and a UI widget."""

    option: Option
    widget: Literal["text", "int", "float", "choice", "flag", "image"]
    choices: tuple[str, ...] | None = None

    @property
    def dest(self) -> str:
        return self.option.dest

    @property
    def label(self) -> str:
        return self.option.dest.replace("_", " ")

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.dest,
            "flag": self.option.flag,
            "help": self.option.help,
            "type": self.widget,
            "choices": list(self.choices) if self.choices is not None else None,
            "upload": self.widget == "image",
        }

    def parse(self, value: Any) -> Any:
        """A JSON value as the option's value (what the CLI's parser would give), or :class:`RequestError`."""
        name, option = self.dest, self.option
        try:
            if self.widget == "image":
                raise RequestError(f"{name}: send the image as a multipart file field named {name!r}")
            if self.widget == "flag":
                if not isinstance(value, bool):
                    raise RequestError(f"{name}: expected true or false, got {value!r}")
                return value
            if option.kind == "list":
                items = value if isinstance(value, list) else [value]
                return [self._one(item) for item in items]
            return self._one(value)
        except values.OptionValueError as error:
            raise RequestError(f"{name}: {error}") from error

    def _one(self, value: Any) -> Any:
        if isinstance(value, bool) or value is None or isinstance(value, dict):
            raise RequestError(f"{self.dest}: expected {self.widget}, got {value!r}")
        if isinstance(value, list):  # a box or another comma-separated value given as a JSON array
            value = ",".join(str(v) for v in value)
        if isinstance(value, float):
            value = repr(value)  # so that 4.5 is not silently truncated by an integer parser
        if self.widget == "text" and not isinstance(value, str):
            raise RequestError(f"{self.dest}: expected text, got {value!r}")
        if isinstance(value, str) and len(value) > _MAX_TEXT:
            raise RequestError(f"{self.dest}: {len(value)} characters; at most {_MAX_TEXT}")
        if self.choices is not None and str(value) not in self.choices:
            raise RequestError(f"{self.dest}: {value!r} is not one of {', '.join(self.choices)}")
        return self.option.parse(value) if self.option.parse is not None else str(value)


def _widget(option: Option) -> str:
    if option.kind == "flag":
        return "flag"
    if option.kind == "file":
        return "image"
    if option.choices is not None or option.flag == _STYLE_FLAG:
        return "choice"
    if option.parse in _INTEGER_PARSERS:
        return "int"
    if option.parse in _FLOAT_PARSERS:
        return "float"
    return "text"


def _style_names() -> tuple[str, ...]:
    from ..styles import StyleError, builtin_styles, style_catalogue

    try:
        return tuple(style_catalogue())
    except StyleError as error:  # a broken $IDFUSION_STYLES file must not stop the server
        logger.warning("style catalogue: %s; offering the built-in styles only", error)
        return tuple(style.name for style in builtin_styles())


def request_options(spec: MethodSpec) -> list[RequestOption]:
    """The options of ``spec`` a request may set, in the registry's order."""
    found = []
    for option in spec.all_options():
        if refusal(option) is not None:
            continue
        widget = _widget(option)
        choices = option.choices if option.flag != _STYLE_FLAG else _style_names()
        found.append(RequestOption(option, widget, choices))  # type: ignore[arg-type]
    return found


@dataclass(frozen=True)
class ServedMethod:
    """One method a server offers, with the weights it was started with.

    Attributes:
        spec: the registry's spec (or the baseline's own, unregistered).
        model: ``--model`` for the pipeline (folder or Hub id); ``None``: the official release, from the cache.
        source: ``"model"`` (given with ``--model``), ``"official"`` (found in the cache) or ``"world"``.
        face_analysis: ``(detector, recognizer)`` the loaded pipeline is configured with (``None``: its own).
        conditioned: faces condition the images; ``False``: they are only references (sheet, judge score).
        check, load, run: ``"module:function"`` hooks, as :func:`idfusion.jobs.check_job`,
            :func:`idfusion.jobs.load_configured` and :func:`idfusion.jobs.run_job` take their arguments.
    """

    spec: MethodSpec
    model: str | None
    source: Literal["model", "official", "world"]
    face_analysis: tuple[str, str] | None = None
    conditioned: bool = True
    check: str = "idfusion.jobs:check_job"
    load: str = "idfusion.jobs:load_configured"
    run: str = "idfusion.jobs:run_job"
    options: tuple[RequestOption, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if not self.options:
            object.__setattr__(self, "options", tuple(request_options(self.spec)))

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def title(self) -> str:
        return self.spec.title

    def supports(self, feature: str) -> bool:
        return self.spec.supports(feature)

    def option(self, dest: str) -> RequestOption | None:
        return next((o for o in self.options if o.dest == dest), None)

    def hook(self, which: Literal["check", "load", "run"]) -> Callable[..., Any]:
        return resolve(getattr(self, which))

    def describe(self) -> dict[str, Any]:
        """For ``GET /api/methods``: what a client may send for this method."""
        return {
            "name": self.name,
            "title": self.title,
            "summary": self.spec.summary,
            "source": self.source,
            "model": self.model,
            "features": sorted(self.spec.features),
            "faces": "condition" if self.conditioned else "references only (optional)",
            "max_images": self.spec.max_images,
            "options": [o.describe() for o in self.options],
        }

    def job(
        self,
        params: Mapping[str, Any],
        faces: Sequence[Any],
        files: Mapping[str, Any],
    ) -> GenerationJob:
        """The request as a :class:`~idfusion.jobs.GenerationJob` (not yet checked against the method).

        ``params`` are the JSON parameters (:data:`RESERVED` keys and option names), ``faces`` the face images,
        ``files`` the other uploads by field name (file options, ``"template"``).
        """
        known = options_by_flag([*methods(), self.spec])
        by_dest = {option.dest: option for option, _ in known.values()}
        unknown = [key for key in params if key not in RESERVED and key not in by_dest]
        if unknown:
            names = ", ".join([*RESERVED[1:], *(o.dest for o in self.options)])
            raise RequestError(f"unknown parameter(s) {', '.join(map(repr, unknown))}; {self.name} takes: {names}")
        options: dict[str, Any] = {}
        for key, value in params.items():
            if key in RESERVED or value is None:
                continue
            own = self.option(key)
            if own is None:
                reason = refusal(by_dest[key])
                if reason is not None:
                    raise RequestError(f"{key} {reason}")
                # another method's option: parsed as that method's, so that check_job names who takes it
                own = RequestOption(by_dest[key], _widget(by_dest[key]))  # type: ignore[arg-type]
            options[key] = own.parse(value)
        for name, data in files.items():
            if name == "template":
                continue
            own = self.option(name)
            if own is None or own.widget != "image":
                uploads = [o.dest for o in self.options if o.widget == "image"] + ["template"] * self.supports(
                    "templates"
                )
                raise RequestError(
                    f"file field {name!r}: {self.name} takes face photos as 'faces'"
                    + (f" and {', '.join(map(repr, uploads))}" if uploads else "")
                )
            options[name] = data
        return GenerationJob(
            method=self.name,
            faces=list(faces),
            face_weights=_weights(params.get("face_weights"), len(faces)),
            photo_face_index=_index(params.get("face_index"), "face_index"),
            options=options,
            num_images=_positive(params.get("num_images", 1), "num_images"),
            seed=None if params.get("seed") is None else _checked(values.seed, params["seed"], "seed"),
            model=self.model,
            template=_template(params.get("template"), files.get("template")),
        )


def _checked(parse: Callable[[Any], Any], value: Any, name: str) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise RequestError(f"{name}: expected a whole number, got {value!r}")
    try:
        return parse(value)
    except values.OptionValueError as error:
        raise RequestError(f"{name}: {error}") from error


def _positive(value: Any, name: str) -> int:
    return int(_checked(values.positive_int, value, name))


def _index(value: Any, name: str) -> int | None:
    return None if value is None else int(_checked(values.non_negative_int, value, name))


def _weights(value: Any, count: int) -> list[float] | None:
    if value is None:
        return None
    if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value):
        raise RequestError(f"face_weights: expected a list of numbers, one per face photo, got {value!r}")
    try:
        weights = [values.non_negative_float(v) for v in value]
    except values.OptionValueError as error:
        raise RequestError(f"face_weights: {error}") from error
    if len(weights) != count:
        raise RequestError(f"face_weights: {len(weights)} weights for {count} face photos; give one per photo")
    return weights if any(w != 1.0 for w in weights) else None


def _template(value: Any, image: Any) -> TemplateSettings | None:
    if value is None and image is None:
        return None
    if image is None:
        raise RequestError("template: send the template photo as a multipart file field named 'template'")
    value = {} if value is None else value
    if not isinstance(value, dict):
        raise RequestError(f"template: expected an object with face_index, strength, use_pose; got {value!r}")
    unknown = set(value) - {"face_index", "strength", "use_pose"}
    if unknown:
        raise RequestError(
            f"template: unknown key(s) {', '.join(sorted(unknown))}; use face_index, strength, use_pose"
        )
    face_index = value.get("face_index", 0)
    if face_index != "all":
        face_index = _index(face_index, "template.face_index")
    strength = value.get("strength")
    if strength is not None:
        if isinstance(strength, bool) or not isinstance(strength, (int, float)):
            raise RequestError(f"template.strength: expected a number in [0, 1], got {strength!r}")
        try:
            strength = values.unit_interval(strength)
        except values.OptionValueError as error:
            raise RequestError(f"template.strength: {error}") from error
    use_pose = value.get("use_pose", False)
    if not isinstance(use_pose, bool):
        raise RequestError(f"template.use_pose: expected true or false, got {use_pose!r}")
    return TemplateSettings(image=image, face_index=face_index, strength=strength, use_pose=use_pose)


# ---- what a server offers -------------------------------------------------------------------------------------


def official_model(spec: MethodSpec) -> tuple[bool, str | None]:
    """``(present, model)``: whether every part of ``spec``'s official files is on this machine (in the Hugging Face
    cache or the folders ``idfusion download`` fills), and the ``model`` to load it with. Never touches the network.
    """
    from ..hub import HF_CACHE, is_present, plan_downloads

    if not spec.downloads or not all(is_present(plan) for plan in plan_downloads(spec.downloads)):
        return False, None
    release = plan_downloads(spec.downloads[:1])[0]
    return True, (None if release.source.default == HF_CACHE else str(release.destination))


def serve_catalogue(
    models: Mapping[str, str] | None = None,
    *,
    world: bool | None = None,
    official: bool = True,
    world_methods_folder: str | Path | None = None,
) -> list[ServedMethod]:
    """The methods to serve.

    Args:
        models: ``{method: folder or Hub id}`` given with ``--model METHOD=PATH``.
        world: serve the synthetic world (its methods with world weights, and the base model as a prompt-only
            baseline); ``None``: only when nothing else is served.
        official: also serve methods whose official weights are already on this machine.
        world_methods_folder: other world method weights than the shipped ones.

    Raises:
        UnknownMethodError: a ``models`` key that is not a registered method.
        JobError: nothing to serve.
    """
    served: dict[str, ServedMethod] = {}
    for name, model in (models or {}).items():
        served[name] = ServedMethod(get_method(name), str(model), "model")
    if official:
        for spec in methods():
            if spec.name in served:
                continue
            present, model = official_model(spec)
            if present:
                served[spec.name] = ServedMethod(spec, model, "official")
    if world or (world is None and not served):
        from ..world.demo import world_methods

        for name, folder in world_methods(world_methods_folder):
            if name not in served:
                served[name] = ServedMethod(get_method(name), str(folder), "world", face_analysis=("world", "world"))
        served[BASELINE] = ServedMethod(
            BASELINE_SPEC,
            None,
            "world",
            conditioned=False,
            check="idfusion.server.baseline:check_baseline",
            load="idfusion.server.baseline:load_baseline",
            run="idfusion.server.baseline:run_baseline",
        )
    if not served:
        raise JobError("nothing to serve: give --model METHOD=PATH, download official weights, or serve --world")
    clash = set(RESERVED) & {o.dest for m in served.values() for o in m.options}
    if clash:  # a registry option named like a request key would be unreachable
        raise JobError(f"registry option(s) {', '.join(sorted(clash))} clash with request keys")
    return list(served.values())
