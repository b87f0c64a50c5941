"""The method registry: everything the CLI, the web UI, evaluation and training need to know about a method.

One :class:`MethodSpec` per method names its pipeline class, how it takes an identity (face embeddings or the photos
themselves), its options, which shared features it supports, and where its tiny test release, converter, benchmark
case and training recipe live. Nothing outside this module and the method's own files branches on a method's name.

Every reference to code is a ``"module:attribute"`` string, imported on first use, so importing the registry (and
``idfusion --help``) imports no torch. Adding a method is a method file, a pipeline file, a tiny writer and one
:func:`register_method` call (see CONTRIBUTING.md).
"""

from __future__ import annotations

import importlib
import pickle
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from . import values
from .errors import IdfusionError
from .hub import FACE_MODELS, SD15_PIPELINE_FILES, SD15_REPO, DownloadSource
from .pipelines.scheduling import SCHEDULERS

__all__ = [
    "FEATURES",
    "COMMON_OPTIONS",
    "FEATURE_OPTIONS",
    "Option",
    "MethodSpec",
    "UnknownMethodError",
    "register_method",
    "get_method",
    "method_names",
    "methods",
    "methods_with",
    "resolve",
    "pipeline_class",
    "load_pipeline",
]

#: Shared capabilities a method may support. Each brings its options (:data:`FEATURE_OPTIONS`); ``templates`` means
#: the fixed-template flow can use the method (its pipeline inpaints), ``blending`` per-photo identity weights.
FEATURES = frozenset(
    {"negative_prompt", "base_model", "lora", "controlnet", "lcm", "styles", "pose", "templates", "blending"}
)


@dataclass(frozen=True)
class Option:
    """A user-facing option: one CLI flag, one pipeline argument, one metadata key.

    Attributes:
        flag: the CLI flag, e.g. ``"--face-box"``.
        help: one line for ``--help``.
        parse: turns the text into a value (raises :class:`~idfusion.values.OptionValueError`); ``None`` keeps text.
        argument: the pipeline argument (``__call__``, or ``from_pretrained`` when ``target == "load"``); default:
            the flag's name with underscores.
        metadata: the key the value is recorded under in an image's metadata (default: ``argument``); ``""``: not
            recorded, so ``--from`` cannot replay it.
        target: ``"call"`` (a ``__call__`` argument) or ``"load"`` (a ``from_pretrained`` argument).
        kind: ``"value"``; ``"flag"`` (on/off); ``"file"`` (an input file: recorded by hash, so ``--from`` asks for
            it again); ``"list"`` (repeatable).
        replay: turns the recorded metadata value back into the option's value (default: as recorded).
    """

    flag: str
    help: str
    parse: Callable[[str], Any] | None = None
    argument: str | None = None
    metadata: str | None = None
    target: Literal["call", "load"] = "call"
    kind: Literal["value", "flag", "file", "list"] = "value"
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    replay: Callable[[Any], Any] | None = None

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def call_argument(self) -> str:
        return self.argument or self.dest

    @property
    def metadata_key(self) -> str:
        return self.call_argument if self.metadata is None else self.metadata


def _recorded_loras(items: Any) -> list[tuple[str, float]]:
    return [(str(item["name"]), float(item["weight"])) for item in items]


#: Options every method takes.
COMMON_OPTIONS: tuple[Option, ...] = (
    Option("--prompt", "text prompt (default: the method's)"),
    Option("--steps", "sampling steps (default: the method's)", values.positive_int, "num_inference_steps", "steps"),
    Option("--guidance", "classifier-free guidance scale (default: the method's)", values.non_negative_float,
           "guidance_scale", "guidance_scale"),
    Option("--scheduler", "sampler (default: the method's)", choices=tuple(SCHEDULERS)),
    Option("--width", "image width, a multiple of 8 (default: the model's native size)", values.positive_int),
    Option("--height", "image height, a multiple of 8 (default: the model's native size)", values.positive_int),
)  # fmt: skip

#: The options each shared feature brings.
FEATURE_OPTIONS: dict[str, tuple[Option, ...]] = {
    "negative_prompt": (Option("--negative-prompt", "negative prompt (default: the method's)"),),
    "base_model": (
        Option("--base-model", "SD1.5-family base model (Hub id or folder)", target="load", metadata="base_model"),
    ),
    "lora": (
        Option(
            "--lora",
            "extra LoRA file (diffusers or kohya format); repeat for more",
            values.weighted_path,
            "loras",
            "loras",
            kind="list",
            metavar="FILE[:WEIGHT]",
            replay=_recorded_loras,
        ),
    ),  # fmt: skip
    "controlnet": (
        Option(
            "--controlnet-image",
            "condition image for the model's ControlNet",
            argument="controlnet_image",
            metadata="controlnet_image",
            kind="file",
            metavar="IMAGE",
        ),
        Option(
            "--controlnet-scale",
            "ControlNet strength (default 1.0)",
            values.non_negative_float,
            "controlnet_conditioning_scale",
            "controlnet_conditioning_scale",
        ),
    ),  # fmt: skip
    "lcm": (Option("--lcm", "LCM-LoRA: 2-4 steps, guidance 1.0", kind="flag", metadata="lcm"),),
    "styles": (
        Option("--style", "a style name (see `idfusion styles`) or FILE.toml[:NAME]"),
        Option("--style-weight", "weight of the style's LoRA (default: the style's)", values.non_negative_float),
    ),
    "pose": (
        Option(
            "--pose-image",
            "OpenPose skeleton image, or a photo (needs the DWPose models)",
            kind="file",
            metadata="pose",
            metavar="IMAGE",
        ),
    ),  # fmt: skip
    "templates": (),
    "blending": (),
}


@dataclass(frozen=True)
class MethodSpec:
    """What idfusion knows about one method.

    Attributes:
        name: the method's name on the command line (``--method NAME``).
        title: a human name, e.g. ``"FlashFace (official)"``.
        summary: one line saying what the method is.
        pipeline: ``"module:Class"`` of its pipeline (a diffusers ``DiffusionPipeline``).
        identity: ``"embedding"``: conditioned on an identity embedding, which images record and ``--from`` replays;
            ``"photos"``: conditioned on the photos themselves (``--from`` needs them again).
        features: the :data:`FEATURES` it supports.
        options: its own options.
        load_arguments: fixed ``from_pretrained`` arguments (for example the release of a shared pipeline class).
        default_model: the official release (Hub id or ModelScope id), or ``None`` where none exists.
        max_images: the most images one request may make (``None``: no method limit).
        tiny: ``"module:function"`` writing a tiny random release in the official layout (``make-tiny``).
        converter: ``"module:function(source, out)"`` converting official files to safetensors (``convert``).
        bench: ``"module:attribute"`` of its :class:`~idfusion.bench.BenchCase`.
        release: the :mod:`idfusion.official` module that runs its release beside it (``bench --against
            official``).
        recipe: the training recipe's name, when the method can be trained.
        downloads: where its official files come from and where idfusion looks for them
            (:class:`~idfusion.hub.DownloadSource`; ``idfusion download`` fetches them, the release first).
    """

    name: str
    title: str
    summary: str
    pipeline: str
    identity: Literal["embedding", "photos"]
    tiny: str
    features: frozenset[str] = field(default_factory=frozenset)
    options: tuple[Option, ...] = ()
    load_arguments: dict[str, Any] = field(default_factory=dict)
    default_model: str | None = None
    max_images: int | None = None
    converter: str | None = None
    bench: str | None = None
    release: str | None = None
    recipe: str | None = None
    downloads: tuple[DownloadSource, ...] = ()

    def __post_init__(self) -> None:
        unknown = set(self.features) - FEATURES
        if unknown:
            raise ValueError(f"method {self.name!r}: unknown features {sorted(unknown)}; known: {sorted(FEATURES)}")
        if self.identity not in ("embedding", "photos"):
            raise ValueError(f"method {self.name!r}: identity must be 'embedding' or 'photos', not {self.identity!r}")

    def all_options(self) -> tuple[Option, ...]:
        """Common options, then each supported feature's, then the method's own."""
        shared = [o for feature in sorted(self.features) for o in FEATURE_OPTIONS[feature]]
        return (*COMMON_OPTIONS, *shared, *self.options)

    def supports(self, feature: str) -> bool:
        if feature not in FEATURES:
            raise ValueError(f"unknown feature {feature!r}; known: {sorted(FEATURES)}")
        return feature in self.features


class UnknownMethodError(IdfusionError, ValueError):
    """A method name that is not registered."""


_METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec, *, replace: bool = False) -> MethodSpec:
    """Add ``spec`` to the registry (every front end picks it up). ``replace`` allows re-registering a name."""
    if spec.name in _METHODS and not replace:
        raise ValueError(f"method {spec.name!r} is already registered")
    _METHODS[spec.name] = spec
    return spec


def unregister_method(name: str) -> None:
    _METHODS.pop(name, None)


def method_names() -> list[str]:
    return list(_METHODS)


def methods() -> list[MethodSpec]:
    return list(_METHODS.values())


def methods_with(feature: str) -> list[MethodSpec]:
    return [spec for spec in _METHODS.values() if spec.supports(feature)]


def get_method(name: str) -> MethodSpec:
    if name not in _METHODS:
        raise UnknownMethodError(f"unknown method {name!r}; choose one of {', '.join(_METHODS)}")
    return _METHODS[name]


def resolve(reference: str) -> Any:
    """The object a ``"module:attribute"`` string names (imported now)."""
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module), attribute)


def pipeline_class(method: str) -> type:
    return resolve(get_method(method).pipeline)


def load_pipeline(method: str, model: str | None = None, **kwargs: Any):
    """``pipeline_class(method).from_pretrained(model, **kwargs)``; ``model=None`` loads the official release."""
    spec = get_method(method)
    cls = resolve(spec.pipeline)
    kwargs = {**spec.load_arguments, **kwargs}
    try:
        return cls.from_pretrained(**kwargs) if model is None else cls.from_pretrained(model, **kwargs)
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as error:
        from .serialization import model_load_error

        if isinstance(error, IdfusionError):
            raise
        clear = model_load_error(model, error)
        if clear is None:
            raise
        raise clear from error


def options_by_flag(specs: Iterable[MethodSpec]) -> dict[str, tuple[Option, list[str]]]:
    """Each distinct flag of ``specs``, with the methods that take it (one option object per flag)."""
    found: dict[str, tuple[Option, list[str]]] = {}
    for spec in specs:
        for option in spec.all_options():
            if option.flag in found:
                found[option.flag][1].append(spec.name)
            else:
                found[option.flag] = (option, [spec.name])
    return found


# ---- where the built-in methods' official files come from ------------------------------------------------------
# The repos, revisions and file patterns are those each pipeline's from_pretrained resolves by default;
# ``folder`` is where the pipeline looks for the part inside a model folder (--model DIR).

_SD15 = SD15_REPO
_ADAFACE_REPO = "adaface-neurips/adaface-models"
# A whole SD1.5 base (diffusers' StableDiffusionPipeline loads it): AdaFace, FACT and FeedFace-SD1.5.
_SD15_PATTERNS = ("*.json", "*.txt", "unet/*", "text_encoder/*", "vae/*")
_SD15_REQUIRED = SD15_PIPELINE_FILES


def _sd15_base(folder: str) -> DownloadSource:
    return DownloadSource(_SD15, "SD1.5 base model", _SD15_PATTERNS, _SD15_REQUIRED, folder=folder)


_ARC2FACE = DownloadSource(
    "FoivosPar/Arc2Face",
    "Arc2Face",
    ("arc2face/*", "encoder/*", "controlnet/*", "arcface.onnx", "antelopev2/*"),
    (
        "arc2face/config.json",
        "arc2face/diffusion_pytorch_model.safetensors",
        "encoder/config.json",
        "encoder/pytorch_model.bin|encoder/model.safetensors",
    ),
)
_ARC2FACE_DOWNLOADS = (
    _ARC2FACE,
    DownloadSource(
        _SD15,
        "SD1.5 base (VAE, tokenizer, scheduler)",
        ("vae/*", "tokenizer/*", "scheduler/*"),
        (
            "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors|vae/diffusion_pytorch_model.bin",
            "tokenizer/vocab.json",
            "tokenizer/merges.txt",
            "scheduler/scheduler_config.json",
        ),
        folder="stable-diffusion-v1-5",
    ),
    # The ONNX face models go where the face backend searches (the model folder's antelopev2/ with --out): the
    # ArcFace recognizer from the Arc2Face repo's top level, and the SCRFD detector of insightface's antelopev2 pack,
    # which is on the Hub as part of AdaFace's release (the Arc2Face README points to a zip on Google Drive).
    DownloadSource(
        _ARC2FACE.repo_id, "ArcFace face recognizer", required=("arcface.onnx",), folder="antelopev2",
        default=FACE_MODELS, flatten="",
    ),
    DownloadSource(
        _ADAFACE_REPO, "SCRFD face detector (insightface antelopev2)",
        ("models/insightface/models/antelopev2/scrfd_10g_bnkps.onnx",), ("scrfd_10g_bnkps.onnx",),
        folder="antelopev2", default=FACE_MODELS, flatten="models/insightface/models/antelopev2",
    ),
)  # fmt: skip

_ADAFACE_ENCODER = "models/arc2face/encoder"
_ADAFACE_REQUIRED = (
    f"{_ADAFACE_ENCODER}/config.json",
    f"{_ADAFACE_ENCODER}/pytorch_model.bin|{_ADAFACE_ENCODER}/model.safetensors",
    "models/adaface/VGGface2_HQ_masks2024-10-14T16-09-24_zero3-ada-3500.pt",  # the v2 checkpoint
)
_ADAFACE = DownloadSource(
    _ADAFACE_REPO,
    "AdaFace",
    # with the ConsistentID branch's files (the v2 joint checkpoint uses them) and the face models
    (
        *(alt for item in _ADAFACE_REQUIRED for alt in item.split("|")),
        "models/insightface/models/antelopev2/*",
        "ConsistentID/models/*",
        "models/insightface/models/buffalo_l/*",
    ),
    _ADAFACE_REQUIRED,
)
_ADAFACE_DOWNLOADS = (
    _ADAFACE,
    _sd15_base("models/stable-diffusion-v1-5"),
    DownloadSource(
        "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "CLIP-ViT-H-14 (the ConsistentID branch)",
        ("*.json", "*.safetensors"), ("config.json",), folder="models/laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    ),
)  # fmt: skip

_FLASHFACE = DownloadSource(
    "shilongz/FlashFace-SD1.5",
    "FlashFace",
    required=("flashface.ckpt", "openai-clip-vit-large-14.pth", "sd-v1-vae.pth", "bpe_simple_vocab_16e6.txt.gz"),
)
_OPEN_FLASHFACE = DownloadSource(
    "IntellectGen/FlashFace",
    "open FlashFace",
    # the whole diffusers folder: the pipeline checks the configs, the loader reads every component's weights
    ("model_index.json", "unet/*", "refnet/*", "vae/*", "text_encoder/*", "tokenizer/*", "scheduler/*"),
    ("model_index.json", "unet/config.json", "refnet/config.json", "vae/config.json"),
)

# FaceChain-FACT is on ModelScope only: its files go into the folder the README passes as --model FaceChain-FACT/.
_FACT_FOLDER = "FaceChain-FACT"
_FACT = DownloadSource(
    "yucheng1996/FaceChain-FACT",
    "FaceChain-FACT",
    required=(
        "ms1mv2_model_TransFace_S.pt",
        "adapter_maj_mask_large_new_reg001_faceshuffle_00290001.ckpt",
        "adapter_film_mask_large_new_reg001_faceshuffle_00290001.ckpt",
    ),
    revision="v1.0.0",
    hub="modelscope",
    default=_FACT_FOLDER,
)
_FACT_LORA = "Cherrytest/zjz_mj_jiyi_small_addtxt_fromleo"
_FACT_DOWNLOADS = (
    _FACT,
    # the release's default style LoRA, in the folder of its repo name inside the FACT folder (where FACT looks)
    DownloadSource(
        _FACT_LORA, "FaceChain's default style LoRA", required=("zjz_mj_jiyi_small_addtxt_fromleo.safetensors",),
        revision="v1.0.0", hub="modelscope", folder=_FACT_LORA.split("/")[1],
        default=f"{_FACT_FOLDER}/{_FACT_LORA.split('/')[1]}",
    ),
    _sd15_base("stable-diffusion-v1-5"),
)  # fmt: skip

_FEEDFACE = DownloadSource(
    "Xiang-cd/FeedFace",
    "FeedFace",
    required=tuple(
        f"models/{name}|{name}"
        for name in ("uvit_v1.pth", "autoencoder_kl.pth", "caption_decoder.pth", "gpt2/config.json", "feed-4800000.pt")
    ),
)
_FEEDFACE_DOWNLOADS = (
    _FEEDFACE,
    DownloadSource(
        "openai/clip-vit-large-patch14", "CLIP ViT-L/14 text encoder", ("*.json", "*.txt", "*.safetensors"),
        ("config.json", "vocab.json", "merges.txt"), folder="models/clip-vit-large-patch14",
    ),
)  # fmt: skip

# ---- the built-in methods -------------------------------------------------------------------------------------

_REFERENCE_STRENGTH = Option(
    "--ref-strength", "reference strength lambda (official 1.2, open 0.85)", values.non_negative_float,
    "reference_strength", "reference_strength",
)  # fmt: skip
_FACE_MODE = Option(
    "--face-mode", "several photos' face tokens joined (cat, default) or averaged (mean)", choices=("cat", "mean")
)
_FEED_SCALE = Option("--feed-scale", "feed adapter multiplier (0.8; 0 = the base model)", values.finite)

register_method(
    MethodSpec(
        name="arc2face",
        title="Arc2Face",
        summary="an ArcFace embedding in the text-embedding space of SD1.5 (Papantoniou et al., ECCV 2024)",
        pipeline="idfusion.pipelines.pipeline_arc2face:Arc2FacePipeline",
        identity="embedding",
        features=frozenset({"negative_prompt", "base_model", "lora", "controlnet", "lcm"}),
        default_model=_ARC2FACE.repo_id,
        tiny="idfusion.testing.tiny_arc2face:write_arc2face",
        bench="idfusion.bench:ARC2FACE",
        release="idfusion.official.arc2face",
        downloads=_ARC2FACE_DOWNLOADS,
        recipe="arc2face",
    )
)
register_method(
    MethodSpec(
        name="adaface",
        title="AdaFace",
        summary="a face as subject tokens of any SD1.5 model's prompt, composable with text (Li et al., 2024)",
        pipeline="idfusion.pipelines.pipeline_adaface:AdaFacePipeline",
        identity="embedding",
        features=frozenset({"negative_prompt", "base_model", "lora", "controlnet", "lcm", "styles"}),
        options=(
            Option("--id-scale", "identity strength: the Arc2Face branch's ID-CFG scale (default 1.0)", values.finite),
            Option(
                "--arc2face-only",
                "v2: the Arc2Face branch alone (default: ConsistentID + Arc2Face, as released)",
                kind="flag",
            ),
            Option("--consistentid-scale", "v2: the ConsistentID branch's ID-CFG scale (default 6.0)", values.finite),
            Option(
                "--face-preprocessing",
                "how faces are found: idfusion (largest face) or official (padded 512)",
                choices=("idfusion", "official"),
            ),
        ),  # fmt: skip
        default_model=_ADAFACE.repo_id,
        tiny="idfusion.testing.make_tiny:write_adaface",
        converter="idfusion.methods.adaface:convert_adaface_checkpoint",
        downloads=_ADAFACE_DOWNLOADS,
        recipe="adaface",
    )
)
register_method(
    MethodSpec(
        name="flashface",
        title="FlashFace (official)",
        summary="1-4 reference photos through ReferenceNet reference attention (Zhang et al., 2024)",
        pipeline="idfusion.pipelines.pipeline_flashface:FlashFacePipeline",
        identity="photos",
        features=frozenset({"negative_prompt", "blending"}),
        options=(
            Option("--face-box", "face position x1,y1,x2,y2 in [0, 1]", values.face_box, metavar="X1,Y1,X2,Y2"),
            _REFERENCE_STRENGTH,
            Option(
                "--ref-guidance",
                "reference guidance scale s_r (3.2)",
                values.non_negative_float,
                "reference_guidance",
                "reference_guidance",
            ),
            Option(
                "--ref-guidance-start",
                "timestep T* at which reference guidance starts (750)",
                values.non_negative_int,
                "reference_guidance_start",
                "reference_guidance_start",
            ),
        ),  # fmt: skip
        load_arguments={"release": "flashface"},
        default_model=_FLASHFACE.repo_id,
        tiny="idfusion.testing.tiny_flashface:write_flashface",
        converter="idfusion.convert.flashface:convert_flashface",
        bench="idfusion.bench:FLASHFACE",
        release="idfusion.official.flashface",
        recipe="flashface",
        downloads=(_FLASHFACE,),
    )
)
register_method(
    MethodSpec(
        name="open-flashface",
        title="FlashFace (open re-implementation)",
        summary="IntellectGen's diffusers re-implementation of FlashFace, with its own released weights",
        pipeline="idfusion.pipelines.pipeline_flashface:FlashFacePipeline",
        identity="photos",
        features=frozenset({"negative_prompt", "blending"}),
        options=(_REFERENCE_STRENGTH,),
        load_arguments={"release": "open-flashface"},
        default_model=_OPEN_FLASHFACE.repo_id,
        tiny="idfusion.testing.tiny_flashface:write_open_flashface",
        downloads=(_OPEN_FLASHFACE,),
        recipe="open-flashface",
    )
)
register_method(
    MethodSpec(
        name="fact",
        title="FaceChain-FACT",
        summary="a face adapter at the UNet's cross-attention sites, with styles, pose and fixed templates",
        pipeline="idfusion.pipelines.pipeline_fact:FactPipeline",
        identity="photos",
        features=frozenset({"negative_prompt", "base_model", "lora", "styles", "pose", "templates"}),
        options=(
            Option("--adapter-scale", "face adapter scale (0.5; 0 = the base model)", values.non_negative_float),
            Option("--adapter", "majicmix (default), film, or an adapter .ckpt file", target="load"),
            Option(
                "--prompt-wording",
                "default prompts: the release's word for word (default) or idfusion's",
                choices=("release", "idfusion"),
            ),
            Option(
                "--default-lora",
                "the release's default style LoRA where the style has none: auto (default: "
                "text-to-image only, as the release), on, off",
                choices=("auto", "on", "off"),
            ),
            Option(
                "--style-base",
                "tie (default: a style runs only with its own base model's adapter, as the release) or any",
                choices=("tie", "any"),
            ),
        ),
        default_model=_FACT.repo_id,
        max_images=6,
        tiny="idfusion.testing.tiny_fact:write_fact",
        bench="idfusion.bench:FACT",
        downloads=_FACT_DOWNLOADS,
        recipe="fact",
    )
)
register_method(
    MethodSpec(
        name="feedface",
        title="FeedFace",
        summary="a feed adapter on UniDiffuser-v1's U-ViT (Xiang et al., ICLR 2024 Tiny Papers)",
        pipeline="idfusion.pipelines.pipeline_feedface:FeedFacePipeline",
        identity="photos",
        options=(_FACE_MODE, _FEED_SCALE),
        default_model=_FEEDFACE.repo_id,
        tiny="idfusion.testing.make_tiny:write_feedface",
        bench="idfusion.bench:FEEDFACE",
        downloads=_FEEDFACE_DOWNLOADS,
        recipe="feedface",
    )
)
register_method(
    MethodSpec(
        name="feedface-sd15",
        title="FeedFace on SD1.5",
        summary="the FeedFace adapter at an SD1.5 UNet's cross-attention sites (no official weights exist)",
        pipeline="idfusion.pipelines.pipeline_feedface_sd15:FeedFaceSD15Pipeline",
        identity="photos",
        features=frozenset({"negative_prompt", "base_model"}),
        options=(_FACE_MODE, _FEED_SCALE),
        tiny="idfusion.testing.make_tiny:write_feedface_sd15",
        downloads=(_sd15_base("stable-diffusion-v1-5"),),  # only the base: the adapter comes from training
        recipe="feedface-sd15",
    )
)
