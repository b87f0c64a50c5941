"""The contract every identity pipeline keeps, and the small pieces that keep it.

:class:`IdentityPipeline` is a diffusers ``DiffusionPipeline`` with one ``__call__``. What it adds is explicit and
small: the face analyzer, checked sampling settings (one seed per image, so a batch equals its single images), the
sampler (``pipe.scheduler``, as assigned by the user; a call's ``scheduler="name"`` builds one for that call only),
diffusers' ``callback_on_step_end`` contract, ``output_type`` (``"pil"``, ``"np"``, ``"pt"``, ``"latent"``), and the
metadata that lets ``idfusion generate --from`` make an image again.

How a method samples is its own: SD1.5-family methods call :func:`~idfusion.pipelines.sd15_sampling.sample_sd15`,
FlashFace and FeedFace run their own loops through :meth:`IdentityPipeline.step_end` and
:meth:`IdentityPipeline.postprocess`.
"""

from __future__ import annotations

import copy
import logging
import os
import secrets
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers import DiffusionPipeline

from .. import __version__
from ..errors import IdfusionError, ModelFilesError
from ..faces import Face, FaceAnalyzer
from ..faces.types import FacePhoto, split_face_photo
from ..images import ImageInput
from .scheduling import SCHEDULERS, scheduler_from_name, scheduler_name

__all__ = [
    "load_base_components",
    "OUTPUT_TYPES",
    "FaceInput",
    "FaceAnalysisNeeds",
    "IdentityInputError",
    "IdentityPipelineOutput",
    "IdentityPipeline",
    "SamplingSettings",
    "check_one_identity",
    "freeze_for_inference",
    "identity_embedding",
    "make_generators",
    "resolve_seeds",
]

logger = logging.getLogger(__name__)

FaceInput = ImageInput | Face | FacePhoto  # FacePhoto: a photo and which of its faces
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
StepCallback = Callable[[Any, int, Any, dict[str, Any]], dict[str, Any] | None]


def load_base_components(
    folder: Path, config: dict, components: Sequence[str], torch_dtype: torch.dtype | None = None
) -> dict[str, Any]:
    """The ``components`` a saved pipeline folder leaves out (frozen in training, so the base's own), loaded from its
    ``settings.base_model`` (a path relative to the folder), as named in its ``model_index.json`` (``config``).

    Raises:
        ModelFilesError: a component is missing and no ``base_model`` is named, or the base lacks it.
    """
    import importlib

    missing = [name for name in components if (config.get(name) or [None])[0] and not (folder / name).is_dir()]
    if not missing:
        return {}
    base = (config.get("settings") or {}).get("base_model")
    if not base:
        raise ModelFilesError(f"{folder}: has no {missing[0]}/ and names no base_model to take it from")
    base_dir = (folder / base).resolve()
    parts = {}
    for name in missing:
        if not (base_dir / name).is_dir():
            raise ModelFilesError(f"{folder}: its base_model {base_dir} has no {name}/")
        library, class_name = config[name]
        loader = getattr(importlib.import_module(library), class_name)
        dtype = {"torch_dtype": torch_dtype} if torch_dtype is not None and name != "tokenizer" else {}
        parts[name] = loader.from_pretrained(base_dir, subfolder=name, local_files_only=True, **dtype)
    return parts


class IdentityInputError(IdfusionError, ValueError):
    """The identity given to a pipeline cannot be used (wrong embedding size, no faces, ...)."""


@dataclass
class IdentityPipelineOutput:
    """Result of an identity pipeline.

    Attributes:
        images: as diffusers returns them: a list of PIL images (``"pil"``), an ``(B, H, W, 3)`` float array in
            [0, 1] (``"np"``), an ``(B, 3, H, W)`` tensor in [0, 1] (``"pt"``), or ``(B, C, h, w)`` latents.
        metadata: one dict per image with everything needed to make it again (see :mod:`idfusion.outputs`).
        references: the reference face crops that defined the identity, for contact sheets.
    """

    images: Any
    metadata: list[dict]
    references: list[np.ndarray] = field(default_factory=list)


@dataclass(frozen=True)
class FaceAnalysisNeeds:
    """What a pipeline needs from face analysis: a recognizer (``"onnx"``: a 512-d ArcFace embedding; ``None``: the
    photos themselves are the condition) and dlib's 68 landmarks."""

    recognizer: str | None = None
    dense_landmarks: bool = False


@dataclass
class SamplingSettings:
    """A call's checked sampling settings, method defaults filled in.

    ``seeds[i]`` is image ``i``'s seed (``None`` when the caller passed generators), ``generators[i]`` its generator.
    """

    steps: int
    guidance_scale: float
    scheduler: Any
    height: int
    width: int
    seeds: list[int | None]
    generators: list[torch.Generator]

    @property
    def batch_size(self) -> int:
        return len(self.generators)

    @property
    def scheduler_name(self) -> str:
        return scheduler_name(self.scheduler)


def check_one_identity(faces: Any, alternative: Any, name: str) -> None:
    """Exactly one of ``faces`` and the precomputed ``name`` (embeddings or tokens) must be given."""
    if (faces is None) == (alternative is None):
        raise IdentityInputError(f"give either faces or {name} (exactly one of them)")


def resolve_seeds(seed: int | Sequence[int] | None, num_images: int) -> list[int]:
    """One seed per image: ``seed, seed + 1, ...`` for an int, the list as given, or fresh random seeds."""
    if isinstance(num_images, bool) or not isinstance(num_images, (int, np.integer)) or num_images < 1:
        raise ValueError(f"num_images_per_prompt must be a whole number >= 1, got {num_images!r}")
    if seed is None:
        seed = secrets.randbelow(2**31)
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        seeds = [int(seed) + i for i in range(num_images)]
    else:
        seeds = [int(s) for s in seed]
        if len(seeds) != num_images:
            raise ValueError(f"{len(seeds)} seeds given for {num_images} images; give one seed or one per image")
    for s in seeds:
        if not 0 <= s < 2**63:
            raise ValueError(f"seeds must be between 0 and 2**63 - 1, got {s}")
    return seeds


def make_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    # CPU generators make the initial noise identical on every device, so a seed means the same image everywhere.
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def identity_embedding(
    analyzer: Callable[[], FaceAnalyzer],
    faces: Sequence[FaceInput] | FaceInput | None,
    id_embeds: torch.Tensor | np.ndarray | None,
    *,
    dim: int,
    who: str,
) -> tuple[torch.Tensor, list[np.ndarray]]:
    """One identity from faces or precomputed embeddings, as a ``(1, dim)`` unit vector, and the reference crops.

    Several faces are one person: the mean of their L2-normalised embeddings, normalised again (the averaging the
    AdaFace release and the community Arc2Face tools use). ``analyzer()`` is called only when faces need analysis.
    """
    check_one_identity(faces, id_embeds, "id_embeds")
    references: list[np.ndarray] = []
    if id_embeds is not None:
        embeds = torch.as_tensor(np.asarray(id_embeds, dtype=np.float32))
        if embeds.ndim == 1:
            embeds = embeds[None]
        source = "id_embeds"
    else:
        if not isinstance(faces, (list, tuple)):
            faces = [faces]
        if not faces:
            raise IdentityInputError("faces is empty: give at least one face photo")
        rows = []
        for item in faces:
            face = item if isinstance(item, Face) else analyzer().get(item)
            if face.embedding is None:
                raise IdentityInputError(f"{face.source}: the face record has no embedding")
            if face.embedding_dim != dim:
                raise IdentityInputError(
                    f"{face.source}: {who} needs a {dim}-d ArcFace embedding, but this face was embedded by "
                    f"{face.embedding_model} ({face.embedding_dim}-d). Install an ONNX ArcFace recognizer "
                    "(arcface.onnx from FoivosPar/Arc2Face) in the model folder's antelopev2/ or "
                    "$IDFUSION_FACE_MODELS, and analyse faces with recognizer='onnx'."
                )
            rows.append(face.embedding)  # normalised below, exactly as precomputed embeddings are
            if "arcface" in face.crops:
                references.append(face.crops["arcface"])
        embeds = torch.as_tensor(np.stack(rows))
        source = "faces"
    if embeds.ndim != 2 or embeds.shape[1] != dim:
        raise IdentityInputError(f"{source}: expected embeddings of shape (N, {dim}), got {tuple(embeds.shape)}")
    if not torch.isfinite(embeds).all() or (embeds.norm(dim=1) < 1e-6).any():
        raise IdentityInputError(f"{source}: embeddings must be finite and non-zero")
    # In float64, cast once: a float32 unit vector then normalises back to itself, so an image replayed from its
    # recorded identity gets bit-identical conditioning.
    embeds = embeds.double()
    embeds = embeds / embeds.norm(dim=1, keepdim=True)
    identity = embeds.mean(dim=0, keepdim=True)
    return (identity / identity.norm(dim=1, keepdim=True)).float(), references


def freeze_for_inference(pipe: Any) -> Any:
    """``eval()`` and ``requires_grad_(False)`` on every module of ``pipe`` (registered or held as an attribute),
    as the releases do before sampling: under autocast torch otherwise caches a low-precision copy of every weight
    that requires grad (about 3.6 GiB at SD1.5 size). Returns ``pipe``."""
    seen: set[int] = set()
    for value in [*getattr(pipe, "components", {}).values(), *vars(pipe).values()]:
        if isinstance(value, torch.nn.Module) and id(value) not in seen:
            seen.add(id(value))
            value.eval().requires_grad_(False)
    return pipe


@contextmanager
def _untied(modules: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Within the context, modules and parameters that share storage under several names are separate copies,
    because safetensors refuses to write one tensor twice: GPT-2 ties ``lm_head`` to its token embedding (loading
    ties it again), and a converted UniDiffuser U-ViT gives ``vae_img_in`` and ``transformer.pos_embed`` the same
    official tensor."""
    restore: list[tuple[torch.nn.Module, str, Any, bool]] = []
    try:
        for root in modules:
            owners: dict[int, str] = {}
            for name, module in list(root.named_modules(remove_duplicate=False)):
                if not name:
                    continue
                if id(module) in owners:
                    parent_name, _, child = name.rpartition(".")
                    parent = root.get_submodule(parent_name) if parent_name else root
                    restore.append((parent, child, module, True))
                    setattr(parent, child, copy.deepcopy(module))
                else:
                    owners[id(module)] = name
            seen: set[int] = set()
            for module in root.modules():
                for name, param in list(module._parameters.items()):
                    if param is None or param.device.type == "meta":
                        continue
                    pointer = param.untyped_storage().data_ptr()
                    if pointer in seen:
                        restore.append((module, name, param, False))
                        module._parameters[name] = torch.nn.Parameter(param.detach().clone(), param.requires_grad)
                    seen.add(pointer)
        yield
    finally:
        for owner, name, original, is_module in reversed(restore):
            if is_module:
                setattr(owner, name, original)
            else:
                owner._parameters[name] = original


def _json_config(config: Any) -> dict[str, Any]:
    """A scheduler config as JSON can hold it: non-finite floats (``lambda_min_clipped: -inf``, the default) are left
    out and come back as defaults when the scheduler is built again."""
    import math

    def ok(value: Any) -> bool:
        if isinstance(value, float):
            return math.isfinite(value)
        if isinstance(value, (list, tuple)):
            return all(ok(v) for v in value)
        return value is None or isinstance(value, (str, int, bool))

    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items() if not k.startswith("_") and ok(v)}


class IdentityPipeline(DiffusionPipeline):
    """Base class of idfusion's pipelines: what the pipeline contract needs, and nothing method-specific.

    Subclasses set :attr:`method` (the registry name, recorded in every image), :attr:`face_analysis` and
    :attr:`default_settings`, register their components in ``__init__``, and implement ``__call__``.
    """

    #: the registry name of the method (``idfusion.registry``)
    method: ClassVar[str] = ""
    #: what the pipeline needs from face analysis
    face_analysis: ClassVar[FaceAnalysisNeeds] = FaceAnalysisNeeds()
    #: the release's sampling defaults: ``num_inference_steps`` and ``guidance_scale``
    default_settings: ClassVar[dict[str, Any]] = {"num_inference_steps": 25, "guidance_scale": 7.5}
    #: call defaults of the fixed-template flow (:func:`idfusion.flows.template.template_portraits`)
    template_defaults: ClassVar[dict[str, Any]] = {}
    _callback_tensor_inputs = ["latents"]

    face_analyzer: FaceAnalyzer | None = None
    face_model_dir: Path | None = None
    _model_info: dict[str, Any] | None = None

    # ---- what was loaded (recorded in every image) ------------------------------------------------------------

    @property
    def model_info(self) -> dict[str, Any]:
        """``method``, ``model``, ``base_model``, ... and ``model_files`` (name -> path, hashed into the metadata)."""
        if self._model_info is None:
            self._model_info = {"method": self.method}
        return self._model_info

    @model_info.setter
    def model_info(self, info: dict[str, Any]) -> None:
        info = dict(info)
        for key in ("model", "base_model"):  # local folders recorded absolute, so --from replays from any folder
            value = info.get(key)
            if isinstance(value, (str, os.PathLike)) and Path(value).exists():
                info[key] = str(Path(value).resolve())
        self._model_info = {"method": self.method, **info}

    def model_metadata(self) -> dict[str, Any]:
        """:attr:`model_info` with model files replaced by their sha256 (hashed once per process: UNets are GBs)."""
        from ..outputs import file_sha256

        info = dict(self.model_info)
        files = info.pop("model_files", {})
        if files:
            info["model_files"] = {name: file_sha256(path) for name, path in files.items()}
        return info

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> None:
        """diffusers' ``save_pretrained`` (safetensors), with shared weights stored once per name (see ``_untied``)."""
        modules = [m for m in self.components.values() if isinstance(m, torch.nn.Module)]
        with _untied(modules):
            super().save_pretrained(save_directory, **kwargs)

    @classmethod
    def from_saved_folder(cls, folder: str | Path, *, torch_dtype: torch.dtype | None = None, **kwargs: Any):
        """Load a folder written by ``save_pretrained`` (diffusers' own loader), with a clear error naming what is
        missing or broken."""
        dtype = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
        try:
            return DiffusionPipeline.from_pretrained.__func__(cls, folder, local_files_only=True, **dtype, **kwargs)
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ModelFilesError(f"{folder}: cannot load this saved {cls.__name__} folder: {first}") from error

    # ---- faces ------------------------------------------------------------------------------------------------

    def set_face_analyzer(self, analyzer: FaceAnalyzer | None) -> None:
        """Use this analyzer for face inputs (by default one is built on first use)."""
        self.face_analyzer = analyzer

    def configure_face_analysis(
        self, detector: str | None = None, recognizer: str | None = None, model_dir: str | Path | None = None
    ) -> FaceAnalyzer:
        """Build this pipeline's analyzer with the given backends (``None``: the defaults, see
        :meth:`default_face_analyzer`), keeping what the method needs (its recognizer, dense landmarks)."""
        if model_dir is not None:
            self.face_model_dir = Path(model_dir)
        self.face_analyzer = self._build_face_analyzer(detector, recognizer)
        return self.face_analyzer

    def default_face_analyzer(self) -> FaceAnalyzer:
        """The analyzer used for face inputs: the one set, else built on first use. Methods conditioned on an
        embedding use the ONNX models (SCRFD + ArcFace); photo methods use SCRFD when its model is there, else
        dlib's detector, which is fully offline."""
        if self.face_analyzer is None:
            self.face_analyzer = self._build_face_analyzer(None, None)
        return self.face_analyzer

    def _build_face_analyzer(self, detector: str | None, recognizer: str | None) -> FaceAnalyzer:
        from ..faces.onnx_backend import find_onnx_models, resolve_onnx_model_dir

        needs = self.face_analysis
        recognizer = recognizer or needs.recognizer
        onnx_error: ModelFilesError | None = None
        folder = None
        try:
            folder = resolve_onnx_model_dir(self.face_model_dir)
            find_onnx_models(folder)
        except ModelFilesError as error:
            onnx_error = error
        if recognizer == "onnx" and onnx_error is not None:
            raise ModelFilesError(
                f"{type(self).__name__} needs a 512-d ArcFace embedding from an ONNX recognizer: put "
                "scrfd_10g_bnkps.onnx (insightface antelopev2) and arcface.onnx (FoivosPar/Arc2Face) in the model "
                f"folder's antelopev2/ or pass face_model_dir. {onnx_error}"
            ) from onnx_error
        if detector is None:
            detector = "onnx" if onnx_error is None else "hog"
        crops = ("arcface",) if recognizer is not None else ()
        return FaceAnalyzer(
            detector,
            recognizer,
            model_dir=folder if onnx_error is None else self.face_model_dir,
            crops=crops,
            dense_landmarks=needs.dense_landmarks,
        )

    def prepare_id_embeds(
        self, faces: Sequence[FaceInput] | FaceInput | None = None, id_embeds: torch.Tensor | np.ndarray | None = None
    ) -> tuple[torch.Tensor, list[np.ndarray]]:
        """For methods conditioned on an ArcFace embedding (``id_embedding_dim``): :func:`identity_embedding` with
        this pipeline's analyzer."""
        dim = getattr(self, "id_embedding_dim", None)
        if dim is None:
            raise TypeError(f"{type(self).__name__} is not conditioned on an identity embedding")
        return identity_embedding(self.default_face_analyzer, faces, id_embeds, dim=dim, who=type(self).__name__)

    def encode_identity(self, faces: Sequence[FaceInput] | FaceInput) -> dict[str, Any]:
        """The call arguments that stand for ``faces``, computed once so that many calls (a template's faces, a
        batch of prompts) reuse them. Pipelines with a precomputed identity input override this."""
        return {"faces": faces}

    def photo_faces(self, faces: Sequence[FaceInput]) -> list[tuple[np.ndarray, Face]]:
        """``(RGB array, face)`` of each photo (the largest face, or a :class:`FacePhoto`'s), for methods that crop
        the photos themselves."""
        from ..images import load_image

        found = []
        for item in faces:
            if isinstance(item, Face):
                raise IdentityInputError(f"{item.source}: {type(self).__name__} needs the photo itself, not a Face")
            image, index = split_face_photo(item)
            loaded = load_image(image)
            face = self.default_face_analyzer().get(loaded.array, index=index, name=loaded.name)
            found.append((loaded.array, face))
        return found

    # ---- settings ---------------------------------------------------------------------------------------------

    def native_size(self) -> int:
        """The model's trained resolution in pixels (diffusers' default size)."""
        return self.unet.config.sample_size * self.vae_scale_factor

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def prepare_settings(
        self,
        *,
        num_inference_steps: int | None,
        guidance_scale: float | None,
        scheduler: str | None,
        height: int | None,
        width: int | None,
        seed: int | Sequence[int] | None,
        generator: torch.Generator | Sequence[torch.Generator] | None,
        num_images_per_prompt: int,
        defaults: dict[str, Any] | None = None,
        output_type: str = "pil",
    ) -> SamplingSettings:
        """Fill the method's defaults where not given and check every value.

        The sampler is ``self.scheduler`` unless ``scheduler`` names another, which is then built from
        ``self.scheduler.config`` for this call. ``generator`` (diffusers' argument: one, or one per image) and
        ``seed`` are alternatives; with generators the images record no seed and cannot be replayed.
        """
        defaults = {**self.default_settings, **(defaults or {})}
        steps = defaults["num_inference_steps"] if num_inference_steps is None else num_inference_steps
        guidance = defaults["guidance_scale"] if guidance_scale is None else guidance_scale
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1 (a whole number), got {steps!r}")
        try:
            guidance = float(guidance)
        except (TypeError, ValueError):
            raise ValueError(f"guidance_scale must be a number, got {guidance!r}") from None
        if not np.isfinite(guidance) or guidance < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        name = scheduler if scheduler is not None else defaults.get("scheduler")
        if name is not None and name not in SCHEDULERS and not str(name).endswith("Scheduler"):
            raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
        sampler = scheduler_from_name(name, self.scheduler)
        native = self.native_size()
        height, width = height or native, width or native
        for label, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 64 or value % 8:
                raise ValueError(f"{label} must be a multiple of 8 and at least 64, got {value!r}")
        if generator is not None:
            if seed is not None:
                raise ValueError("give seed or generator, not both")
            generators = list(generator) if isinstance(generator, (list, tuple)) else None
            if generators is None:
                # one generator for the batch: each image draws from it in turn (diffusers draws one batch tensor)
                generators = [generator] * num_images_per_prompt
            if len(generators) != num_images_per_prompt:
                raise ValueError(f"{len(generators)} generators for {num_images_per_prompt} images")
            seeds: list[int | None] = [None] * len(generators)
            logger.info("generator given: the images record no seed, so --from cannot make them again")
        else:
            seeds = list(resolve_seeds(seed, num_images_per_prompt))
            generators = make_generators(seeds)
        return SamplingSettings(int(steps), guidance, sampler, int(height), int(width), seeds, generators)

    # ---- the denoising loop's contract ------------------------------------------------------------------------

    def check_callback(self, callback: StepCallback | None, tensor_inputs: Sequence[str]) -> None:
        if callback is not None and not callable(callback):
            raise ValueError(f"callback_on_step_end must be callable, got {type(callback).__name__}")
        unknown = [name for name in tensor_inputs if name not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs {unknown} are not available; this pipeline passes "
                f"{self._callback_tensor_inputs}"
            )

    def step_end(
        self,
        callback: StepCallback | None,
        tensor_inputs: Sequence[str],
        step: int,
        timestep: Any,
        tensors: dict[str, Any],
    ) -> dict[str, Any]:
        """diffusers' ``callback_on_step_end`` contract: the callback gets this pipeline, the step index, the
        timestep and the requested tensors, and what it returns replaces them (the loop continues with it)."""
        if callback is None:
            return tensors
        given = {name: tensors[name] for name in tensor_inputs}
        returned = callback(self, step, timestep, given) or {}
        return {**tensors, **{name: returned[name] for name in tensor_inputs if name in returned}}

    def decode_latents(self, latents: torch.Tensor, output_type: str) -> Any:
        """Latents to images as ``output_type`` asks (``"latent"``: the latents themselves), as diffusers does."""
        if output_type == "latent":
            return latents
        image = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor, return_dict=False)[0]
        return self.postprocess(image, output_type)

    @staticmethod
    def postprocess(image: torch.Tensor, output_type: str) -> Any:
        """``(B, 3, H, W)`` decoder output in [-1, 1] to PIL images, an ``(B, H, W, 3)`` array or a tensor."""
        image = (image.float() / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return image.cpu()
        array = image.permute(0, 2, 3, 1).cpu().numpy()  # (B, 3, H, W) -> (B, H, W, 3)
        if output_type == "np":
            return array
        return DiffusionPipeline.numpy_to_pil(array)

    # ---- metadata ---------------------------------------------------------------------------------------------

    def result(
        self,
        images: Any,
        settings: SamplingSettings,
        references: list[np.ndarray] | None = None,
        **values: Any,
    ) -> IdentityPipelineOutput:
        """The output, with one metadata dict per image: the loaded models, the sampling settings, the method's
        ``values`` (``None`` values are left out) and the image's seed."""
        shared = {
            "idfusion_version": __version__,
            **self.model_metadata(),
            "steps": settings.steps,
            "guidance_scale": settings.guidance_scale,
            "scheduler": settings.scheduler_name,
            "scheduler_config": _json_config(settings.scheduler.config),
            "width": settings.width,
            "height": settings.height,
        }
        shared.update({key: value for key, value in values.items() if value is not None})
        metadata = [{**shared, "seed": seed} for seed in settings.seeds]
        return IdentityPipelineOutput(images=images, metadata=metadata, references=list(references or []))
