"""What every identity pipeline shares: identity inputs, seeds, schedulers, LoRAs, outputs.

Method pipelines are diffusers ``DiffusionPipeline`` subclasses with one ``__call__``. The SD1.5-family ones
(Arc2Face, AdaFace) end in :meth:`IdentitySD15Mixin.denoise`, which runs diffusers' own StableDiffusionPipeline or
StableDiffusionControlNetPipeline over the method's components, so schedulers, offloading, VAE tiling and LoRAs
behave exactly as in diffusers.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

from .. import __version__
from ..errors import IdfusionError, ModelFilesError
from ..faces import Face, FaceAnalyzer
from ..images import ImageInput

__all__ = [
    "DEFAULT_LCM_LORA",
    "SCHEDULERS",
    "IdentityPipelineOutput",
    "IdentityInputError",
    "FaceInput",
    "InpaintInput",
    "SamplingSettings",
    "check_one_identity",
    "make_scheduler",
    "resolve_seeds",
    "make_generators",
    "IdentityPipelineMixin",
    "IdentitySD15Mixin",
]

logger = logging.getLogger(__name__)

FaceInput = ImageInput | Face

DEFAULT_LCM_LORA = "latent-consistency/lcm-lora-sdv1-5"

# our name -> (diffusers class name, extra config). "dpm++" is diffusers' DPMSolverMultistep default (2M).
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "dpm++": ("DPMSolverMultistepScheduler", {}),
    "dpm++-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    # DPM-Solver's singlestep "fast" method at order 3 (1, 2, 3, 1, 2, 3, ... evaluations per step), as FeedFace
    "dpm++-3s": (
        "DPMSolverSinglestepScheduler",
        {"solver_order": 3, "algorithm_type": "dpmsolver++", "lower_order_final": True},
    ),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
}


class IdentityInputError(IdfusionError, ValueError):
    """The identity given to a pipeline cannot be used (wrong embedding size, no faces, ...)."""


@dataclass
class IdentityPipelineOutput:
    """Result of an identity pipeline.

    Attributes:
        images: the generated images (PIL, or arrays/tensors for other ``output_type`` values).
        metadata: one dict per image with everything needed to make it again (see :mod:`idfusion.outputs`).
        references: the reference face crops that defined the identity (112x112 ArcFace crops), for contact sheets.
    """

    images: list
    metadata: list[dict]
    references: list[np.ndarray] = field(default_factory=list)


def check_one_identity(faces: Any, alternative: Any, name: str) -> None:
    """Exactly one of ``faces`` and the precomputed ``name`` (embeddings or tokens) must be given."""
    if (faces is None) == (alternative is None):
        raise IdentityInputError(f"give either faces or {name} (exactly one of them)")


def make_scheduler(name: str, config: dict):
    """A diffusers scheduler by our short name, built from a model's scheduler config."""
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    class_name, extra = SCHEDULERS[name]
    return getattr(diffusers, class_name).from_config(config, **extra)


def resolve_seeds(seed: int | Sequence[int] | None, num_images: int) -> list[int]:
    """One seed per image: ``seed, seed + 1, ...`` for an int, the list as given, or fresh random seeds."""
    if num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {num_images}")
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


@dataclass
class InpaintInput:
    """What an inpainting call repaints: ``image`` (RGB) where ``mask_image`` (L, white = repaint) says, with
    ``strength`` of noise (1.0: from pure noise inside the mask)."""

    image: PIL.Image.Image
    mask_image: PIL.Image.Image
    strength: float = 0.6


@dataclass
class SamplingSettings:
    """A call's checked sampling settings, method defaults filled in."""

    steps: int
    guidance_scale: float
    scheduler: str
    height: int
    width: int
    seeds: list[int]


class IdentityPipelineMixin:
    """What every identity pipeline shares: the face analyzer (set by the user or built on first use), checked
    sampling settings and the metadata that lets an image be made again."""

    face_analyzer: FaceAnalyzer | None = None
    face_model_dir: Path | None = None
    model_info: dict[str, Any]

    def set_face_analyzer(self, analyzer: FaceAnalyzer | None) -> None:
        """Use this analyzer for face inputs (by default one is built on first use)."""
        self.face_analyzer = analyzer

    def photo_analyzer(self, *, dense_landmarks: bool = False) -> FaceAnalyzer:
        """The analyzer for methods conditioned on the photos themselves (no embedding): SCRFD when the ONNX models
        are there, else dlib's detector (fully offline); no recognizer. Built once; ``set_face_analyzer`` overrides.
        """
        if self.face_analyzer is None:
            from ..faces.onnx_backend import find_onnx_models, resolve_onnx_model_dir

            try:
                find_onnx_models(resolve_onnx_model_dir(self.face_model_dir))
                detector = "onnx"
            except IdfusionError:
                detector = "hog"
            self.face_analyzer = FaceAnalyzer(
                detector, None, model_dir=self.face_model_dir, crops=(), dense_landmarks=dense_landmarks
            )
        return self.face_analyzer

    def photo_faces(
        self, faces: Sequence[FaceInput], *, dense_landmarks: bool = False
    ) -> list[tuple[np.ndarray, Face]]:
        """``(RGB array, largest face)`` of each photo, for methods that crop the photos themselves."""
        from ..images import load_image

        found = []
        for item in faces:
            if isinstance(item, Face):
                raise IdentityInputError(f"{item.source}: {type(self).__name__} needs the photo itself, not a Face")
            loaded = load_image(item)
            analyzer = self.photo_analyzer(dense_landmarks=dense_landmarks)
            found.append((loaded.array, analyzer.get(loaded.array, name=loaded.name)))
        return found

    def model_metadata(self) -> dict[str, Any]:
        """``model_info`` with model files replaced by their sha256 (hashed once per process: UNets are GBs)."""
        from ..outputs import file_sha256

        info = dict(self.model_info)
        files = info.pop("model_files", {})
        if files:
            info["model_files"] = {name: file_sha256(path) for name, path in files.items()}
        return info

    def default_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """The UNet's native size where not given (diffusers' convention), checked."""
        native = self.unet.config.sample_size * (2 ** (len(self.vae.config.block_out_channels) - 1))
        height, width = height or native, width or native
        for name, value in (("height", height), ("width", width)):
            if value < 64 or value % 8:
                raise ValueError(f"{name} must be a multiple of 8 and at least 64, got {value}")
        return height, width

    def sampling_settings(
        self,
        defaults: dict[str, Any],
        *,
        num_inference_steps: int | None,
        guidance_scale: float | None,
        scheduler: str | None,
        height: int | None,
        width: int | None,
        seed: int | Sequence[int] | None,
        num_images_per_prompt: int,
    ) -> SamplingSettings:
        """Fill the method's ``defaults`` (steps, guidance, scheduler) where not given, and check every value."""
        steps = defaults["num_inference_steps"] if num_inference_steps is None else int(num_inference_steps)
        guidance = defaults["guidance_scale"] if guidance_scale is None else float(guidance_scale)
        if steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {steps}")
        if not np.isfinite(guidance) or guidance < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance}")
        name = scheduler or defaults["scheduler"]
        if name not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
        height, width = self.default_size(height, width)
        return SamplingSettings(steps, guidance, name, height, width, resolve_seeds(seed, num_images_per_prompt))

    def base_metadata(self, **values: Any) -> dict[str, Any]:
        meta = {"idfusion_version": __version__, **self.model_info}
        meta.update({k: v for k, v in values.items() if v is not None})
        return meta


class IdentitySD15Mixin(IdentityPipelineMixin):
    """Shared steps of the SD1.5-family identity pipelines (components: vae, text_encoder, tokenizer, unet,
    scheduler, optional controlnet)."""

    #: embedding the method needs from a face recognizer (None: any)
    id_embedding_dim: int | None = 512
    model_info: dict[str, Any]

    # ---- identity --------------------------------------------------------------------------------------------

    def _get_face_analyzer(self) -> FaceAnalyzer:
        if self.face_analyzer is None:
            from ..faces.onnx_backend import find_onnx_models, resolve_onnx_model_dir

            try:
                folder = resolve_onnx_model_dir(self.face_model_dir)
                find_onnx_models(folder)
            except ModelFilesError as error:
                raise ModelFilesError(
                    f"{type(self).__name__} needs a 512-d ArcFace embedding from an ONNX recognizer: put "
                    "scrfd_10g_bnkps.onnx (insightface antelopev2) and arcface.onnx (FoivosPar/Arc2Face) in "
                    f"the model folder's antelopev2/ or pass face_model_dir. {error}"
                ) from error
            self.face_analyzer = FaceAnalyzer("onnx", "onnx", model_dir=folder)
        return self.face_analyzer

    def prepare_id_embeds(
        self,
        faces: Sequence[FaceInput] | FaceInput | None = None,
        id_embeds: torch.Tensor | np.ndarray | None = None,
    ) -> tuple[torch.Tensor, list[np.ndarray]]:
        """One identity from faces or precomputed embeddings.

        Several faces are one person: the mean of their L2-normalised embeddings, normalised again (the averaging
        the AdaFace release and the community Arc2Face tools use).

        Returns:
            ``(1, D)`` float32 unit embedding, and the reference crops (empty for precomputed embeddings).
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
                face = item if isinstance(item, Face) else self._get_face_analyzer().get(item)
                if face.embedding is None:
                    raise IdentityInputError(f"{face.source}: the face record has no embedding")
                if self.id_embedding_dim is not None and face.embedding_dim != self.id_embedding_dim:
                    raise IdentityInputError(
                        f"{face.source}: {type(self).__name__} needs a {self.id_embedding_dim}-d ArcFace embedding, "
                        f"but this face was embedded by {face.embedding_model} ({face.embedding_dim}-d). Install an "
                        "ONNX ArcFace recognizer (arcface.onnx from FoivosPar/Arc2Face) in the model folder's "
                        "antelopev2/ or $IDFUSION_FACE_MODELS, and analyse faces with recognizer='onnx'."
                    )
                rows.append(face.embedding)  # normalised below, exactly as precomputed embeddings are
                if "arcface" in face.crops:
                    references.append(face.crops["arcface"])
            embeds = torch.as_tensor(np.stack(rows))
            source = "faces"
        if self.id_embedding_dim is not None and (embeds.ndim != 2 or embeds.shape[1] != self.id_embedding_dim):
            raise IdentityInputError(
                f"{source}: expected embeddings of shape (N, {self.id_embedding_dim}), got {tuple(embeds.shape)}"
            )
        if not torch.isfinite(embeds).all() or (embeds.norm(dim=1) < 1e-6).any():
            raise IdentityInputError(f"{source}: embeddings must be finite and non-zero")
        embeds = embeds / embeds.norm(dim=1, keepdim=True)
        identity = embeds.mean(dim=0, keepdim=True)
        return identity / identity.norm(dim=1, keepdim=True), references

    # ---- sampling --------------------------------------------------------------------------------------------

    def load_loras(self, loras: Sequence[tuple[str | os.PathLike, float]]) -> list[str]:
        """Load LoRA files (diffusers or kohya format) once each; returns their adapter names."""
        names = []
        for path, _ in loras:
            file = lora_file(path, what="LoRA")
            name = "lora_" + file_key(file)
            if name not in self.get_list_adapters().get("unet", []):
                self.load_lora_weights(str(file), adapter_name=name)
            names.append(name)
        return names

    def activate_adapters(
        self, lcm: bool, loras: Sequence[tuple[str | os.PathLike, float]], lcm_lora: str | None
    ) -> list[dict]:
        """Make exactly the requested LoRAs active for this call (LCM-LoRA first when ``lcm``); none: LoRAs off."""
        names, weights = [], []
        if lcm:
            source = lcm_lora or DEFAULT_LCM_LORA
            if getattr(self, "_lcm_lora", None) != source:
                if "lcm" in self.get_list_adapters().get("unet", []):
                    self.delete_adapters("lcm")
                self.load_lora_weights(str(lora_file(source, what="LCM-LoRA for SD1.5")), adapter_name="lcm")
                self._lcm_lora = source
            names.append("lcm")
            weights.append(1.0)
        names += self.load_loras(loras) if loras else []
        weights += [float(w) for _, w in loras]
        if names:
            self.enable_lora()
            self.set_adapters(names, adapter_weights=weights)
        elif self.get_list_adapters():
            self.disable_lora()
        return [{"name": str(path), "weight": float(weight)} for path, weight in loras]

    def sample(
        self,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor,
        identity: torch.Tensor | None,
        references: list[np.ndarray],
        settings: SamplingSettings,
        *,
        lcm: bool = False,
        lcm_lora: str | None = None,
        lora_meta: list[dict] | None = None,
        controlnet_image: ImageInput | None = None,
        controlnet_conditioning_scale: float = 1.0,
        inpaint: InpaintInput | None = None,
        output_type: str = "pil",
        callback_on_step_end=None,
        **method_metadata: Any,
    ) -> IdentityPipelineOutput:
        """Sample one image per seed from ``(1, L, D)`` conditioning and describe each image in its metadata.

        ``identity`` (a ``(1, D)`` embedding) is recorded so ``--from`` can replay the image; methods conditioned on
        photos rather than an embedding pass ``None``. LoRAs must already be active (:meth:`activate_adapters`, called
        before any prompt is encoded, so a LoRA's text-encoder part applies to this call); ``lora_meta`` is what it
        returned.
        """
        from ..outputs import encode_array

        batch = len(settings.seeds)
        self.scheduler = make_scheduler(settings.scheduler, self._base_scheduler_config)
        images = self.denoise(
            prompt_embeds.repeat(batch, 1, 1),  # (1, 77, D) -> (B, 77, D)
            negative_prompt_embeds.repeat(batch, 1, 1),
            generators=make_generators(settings.seeds),
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance_scale,
            height=settings.height,
            width=settings.width,
            controlnet_image=controlnet_image,
            controlnet_conditioning_scale=controlnet_conditioning_scale,
            inpaint=inpaint,
            output_type=output_type,
            callback_on_step_end=callback_on_step_end,
        )
        self.maybe_free_model_hooks()
        shared = self.base_metadata(
            **self.model_metadata(),
            **method_metadata,
            steps=settings.steps,
            guidance_scale=settings.guidance_scale,
            scheduler=settings.scheduler,
            width=settings.width,
            height=settings.height,
            lcm=lcm or None,
            lcm_lora=(lcm_lora or DEFAULT_LCM_LORA) if lcm else None,
            loras=lora_meta or None,
            controlnet_conditioning_scale=controlnet_conditioning_scale if controlnet_image is not None else None,
            strength=inpaint.strength if inpaint is not None else None,
            id_embeds=encode_array(identity[0].float().cpu().numpy()) if identity is not None else None,
        )
        metadata = [{**shared, "seed": seed} for seed in settings.seeds]
        return IdentityPipelineOutput(images=list(images), metadata=metadata, references=references)

    def denoise(
        self,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor | None,
        *,
        generators: list[torch.Generator],
        num_inference_steps: int,
        guidance_scale: float,
        height: int,
        width: int,
        controlnet_image: ImageInput | None = None,
        controlnet_conditioning_scale: float = 1.0,
        inpaint: InpaintInput | None = None,
        output_type: str = "pil",
        callback_on_step_end=None,
    ) -> list:
        """Run SD1.5 sampling on ``(B, L, D)`` prompt embeddings, one generator per image.

        Text-to-image, or with ``inpaint`` diffusers' inpainting pipelines (a 4-channel UNet repaints the masked
        region from the noised image, as diffusers does for non-inpainting checkpoints).
        """
        import diffusers

        shared = dict(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
            scheduler=self.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip
        kwargs = dict(
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            generator=generators,
            output_type=output_type,
            callback_on_step_end=callback_on_step_end,
        )
        if inpaint is not None:
            kwargs.update(image=inpaint.image, mask_image=inpaint.mask_image, strength=inpaint.strength)
        if controlnet_image is None:
            name = "StableDiffusionInpaintPipeline" if inpaint else "StableDiffusionPipeline"
            runner = getattr(diffusers, name)(**shared)
        else:
            if getattr(self, "controlnet", None) is None:
                raise ModelFilesError(
                    "a ControlNet image was given, but this model has no ControlNet (expected a controlnet/ folder "
                    "with config.json and diffusion_pytorch_model.safetensors in the model folder)"
                )
            from ..images import load_image

            condition = load_image(controlnet_image).to_pil().resize((width, height), PIL.Image.BICUBIC)
            if inpaint is not None:
                runner = diffusers.StableDiffusionControlNetInpaintPipeline(**shared, controlnet=self.controlnet)
                kwargs.update(control_image=condition)
            else:
                runner = diffusers.StableDiffusionControlNetPipeline(**shared, controlnet=self.controlnet)
                kwargs.update(image=condition)
            kwargs.update(controlnet_conditioning_scale=controlnet_conditioning_scale)
        runner.set_progress_bar_config(**getattr(self, "_progress_bar_config", {}))
        # The runner shares modules (and any offload hooks) with this pipeline; only the wrapper object is new.
        return runner(**kwargs).images


def file_key(path: Path) -> str:
    """A short adapter name that is stable for a file and differs between files of the same name."""
    import hashlib

    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]
    return f"{path.stem}_{digest}".replace(".", "_")


def lora_file(source: str | os.PathLike, *, what: str) -> Path:
    """A LoRA weights file from a file path, a folder, or a Hub repo id (``pytorch_lora_weights.safetensors``)."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    name = "pytorch_lora_weights.safetensors"
    if path.is_dir() and not (path / name).is_file():
        files = sorted(path.glob("*.safetensors"))
        if len(files) == 1:
            return files[0]
    from ..hub import resolve_model_folder

    return resolve_model_folder(source, required=[name], what=what, allow_patterns=[name]) / name
