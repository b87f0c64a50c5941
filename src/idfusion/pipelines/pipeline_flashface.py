"""FlashFacePipeline: 1-4 reference photos + prompt, through ReferenceNet reference attention.

One class serves both releases (``flashface``: official; ``open-flashface``: IntellectGen); every difference
between them is a field of :class:`~idfusion.methods.flashface.FlashFaceRelease`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from ..errors import FaceError, IdfusionError
from ..faces import Face, align_face
from ..faces.types import split_face_photo
from ..hub import resolve_model_folder
from ..images import ImageInput, load_image
from ..methods import flashface
from ..methods.flashface import OFFICIAL, OPEN, RELEASES, FlashFaceRelease, ReferenceBank
from .core import FaceInput, IdentityPipeline, IdentityPipelineOutput, load_base_components

__all__ = ["SETTINGS", "FlashFacePipeline", "ReferenceImageError", "release_settings"]

logger = logging.getLogger(__name__)

DEFAULT_MODELS = {OFFICIAL.name: "shilongz/FlashFace-SD1.5", OPEN.name: "IntellectGen/FlashFace"}
MAX_REFERENCES = 4
# Official demo defaults (demo_gradio.py): prompt postfixes, guidance, reference strengths.
OFFICIAL_POSITIVE_POSTFIX = "best quality, masterpiece,ultra-detailed, UHD 4K, photographic"
OFFICIAL_NEGATIVE_POSTFIX = (
    "blurry, ugly, tiling, poorly drawn hands, poorly drawn feet, poorly drawn face, out of frame, extra limbs, "
    "disfigured, deformed, body out of frame, bad anatomy, watermark, signature, cut off, low contrast, "
    "underexposed, overexposed, bad art, beginner, amateur, distorted face"
)
OPEN_NEGATIVE_PROMPT = (
    "watermark, text, font, bad eye, cross eye, low quality, worst quality, bad anatomy, bad composition, lowres, "
    "poor, low effort, blurry, monochrome, poorly rendered face, poorly drawn face, poor facial details, poorly drawn "
    "hands, poorly rendered hands, mutated body parts, blurry image, disfigured, oversaturated, deformed body features"
)
OFFICIAL_REFERENCE_GUIDANCE = 3.2  # s_r
OFFICIAL_GUIDANCE_START = 750  # T*: reference guidance for timesteps t <= T*
OFFICIAL_STRENGTH_BEFORE_GUIDANCE = 0.85  # lambda in both branches while t > T*
OFFICIAL_RESCALE = 0.5

#: What a saved folder's ``settings`` (in ``model_index.json``) may set: the defaults of a model trained by idfusion
#: (e.g. the synthetic world's 64 px FlashFace) where they differ from its release's (:func:`release_settings`).
SETTINGS = {
    "height": int,  # native resolution in pixels (the release's ``height``)
    "reference_size": int,  # side of a reference crop in pixels
    "num_inference_steps": int,
    "guidance_scale": float,
    "reference_strength": float,  # lambda
    "reference_guidance": float,  # s_r (official)
    "reference_guidance_start": int,  # T* (official)
    "strength_before_guidance": float,  # lambda_0 (official)
    "guidance_rescale": float,
    "face_box": list,  # default face position (official); [0, 0, 0, 0]: anywhere
    "positive_postfix": str,  # appended to the prompt (official); "": nothing
    "negative_postfix": str,  # the negative text (official); "": nothing
    "negative_prompt": str,  # open: the default negative text; "" for a model trained by idfusion (it never saw one)
    "release_vae_attention": bool,  # official: the release's VAE attention layout; False for diffusers-trained VAEs
    "base_model": str,  # a saved folder without vae/, text_encoder/ or tokenizer/ loads them from this SD1.5 folder
}
#: The components a saved folder may take from its ``base_model`` (frozen in training, so equal to the base's).
BASE_COMPONENTS = ("vae", "text_encoder", "tokenizer")


def release_settings(release: FlashFaceRelease) -> dict:
    """The release's value of every :data:`SETTINGS` key."""
    official = release is OFFICIAL
    return {
        "height": release.height,
        "reference_size": release.reference_size,
        "num_inference_steps": release.num_inference_steps,
        "guidance_scale": release.guidance_scale,
        "reference_strength": release.reference_strength,
        "reference_guidance": OFFICIAL_REFERENCE_GUIDANCE,
        "reference_guidance_start": OFFICIAL_GUIDANCE_START,
        "strength_before_guidance": OFFICIAL_STRENGTH_BEFORE_GUIDANCE,
        "guidance_rescale": OFFICIAL_RESCALE,
        "face_box": list(flashface.OFFICIAL_FACE_BOX) if official else None,
        "positive_postfix": OFFICIAL_POSITIVE_POSTFIX if official else "",
        "negative_postfix": OFFICIAL_NEGATIVE_POSTFIX if official else "",
        "negative_prompt": "" if official else OPEN_NEGATIVE_PROMPT,
        "release_vae_attention": official,
    }


def _check_settings(settings: dict) -> dict:
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise ValueError(f"unknown FlashFace settings {unknown}; known: {', '.join(SETTINGS)}")
    for key, value in settings.items():
        kind = SETTINGS[key]
        if kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if not ok:
            raise ValueError(f"FlashFace setting {key}: expected {kind.__name__}, got {value!r}")
    return dict(settings)


class ReferenceImageError(FaceError):
    """A reference photo cannot be used (no face, several faces, too many references, bad weights)."""


def reference_crop(image: np.ndarray, face: Face, size: int, *, clamp: bool = False) -> PIL.Image.Image:
    """The official reference: the detector box (rounded; where it leaves the photo, black, as PIL crops), rotated
    about its centre so the eyes are level (no expansion), resized so the long side is ``size`` and padded to a black
    square. ``clamp`` keeps the box inside the photo instead (idfusion's earlier crop: no black border)."""
    height, width = image.shape[:2]
    box = tuple(int(round(float(v))) for v in face.bbox)
    if clamp:
        x1, y1, x2, y2 = face.bbox
        box = (max(0, int(x1)), max(0, int(y1)), min(width, int(math.ceil(x2))), min(height, int(math.ceil(y2))))
    crop = PIL.Image.fromarray(image).crop(box)
    (lx, ly), (rx, ry) = face.landmarks[0], face.landmarks[1]
    crop = crop.rotate(math.degrees(math.atan2(ry - ly, rx - lx)))  # counter-clockwise by the eye line's tilt
    scale = size / max(crop.size)
    crop = crop.resize((max(1, round(crop.width * scale)), max(1, round(crop.height * scale))))
    canvas = PIL.Image.new("RGB", (size, size))
    canvas.paste(crop, ((size - crop.width) // 2, (size - crop.height) // 2))
    return canvas


def _read_release(folder: Path) -> FlashFaceRelease | None:
    """The release a folder holds: a saved pipeline (its ``release``), the official files, or the open release."""
    from ..convert import flashface as ckpt

    index = folder / "model_index.json"
    if index.is_file():
        config = json.loads(index.read_text(encoding="utf-8"))
        if config.get("_class_name") == FlashFacePipeline.__name__:
            return RELEASES.get(config.get("release", OFFICIAL.name))
        if "refnet" in config:
            return OPEN
    if (folder / ckpt.CHECKPOINT_FILE).is_file():
        return OFFICIAL
    return None


class FlashFacePipeline(IdentityPipeline):
    """FlashFace generation (official or open release).

    Components: ``vae``, ``text_encoder``, ``tokenizer``, ``unet`` (main UNet), ``refnet`` (ReferenceNet),
    ``scheduler`` (DDIM, the release's spacing) and, for the official release, ``reference_attention``
    (:class:`~idfusion.methods.flashface.FlashFaceReferenceAttention`). The release is the pipeline config's
    ``release``; ``settings`` (:data:`SETTINGS`) replace its defaults for a model trained by idfusion.
    """

    model_cpu_offload_seq = "text_encoder->refnet->unet->vae"
    _optional_components = ["reference_attention"]

    def __init__(
        self,
        vae,
        text_encoder,
        tokenizer,
        unet,
        refnet,
        scheduler,
        reference_attention=None,
        release: str = "flashface",
        settings: dict | None = None,
    ):
        super().__init__()
        if release not in RELEASES:
            raise ValueError(f"unknown FlashFace release {release!r}; choose one of {', '.join(RELEASES)}")
        spec = RELEASES[release]
        settings = _check_settings(settings or {})
        if spec.separate_reference_attention and reference_attention is None:
            raise ValueError(f"the {release} release needs its reference_attention component")
        self.register_modules(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, refnet=refnet, scheduler=scheduler,
            reference_attention=reference_attention if spec.separate_reference_attention else None,
        )  # fmt: skip
        self.register_to_config(release=release, settings=settings or None)
        self.bank = ReferenceBank()
        flashface.attach_reference_processors(unet, refnet, self.bank, self.reference_attention)
        if self.settings["release_vae_attention"]:
            # the release's VAE reshapes its mid-block attention without a transpose; its model was trained with it
            from ..methods.flashface_vae import use_flashface_vae_attention

            use_flashface_vae_attention(vae)

    @property
    def release(self) -> FlashFaceRelease:
        return RELEASES[self.config.release]

    @property
    def settings(self) -> dict:
        """Every :data:`SETTINGS` value: the folder's ``settings`` over the release's."""
        return {**release_settings(self.release), **(self.config.get("settings") or {})}

    @property
    def default_settings(self) -> dict:  # type: ignore[override]
        settings = self.settings
        return {"num_inference_steps": settings["num_inference_steps"], "guidance_scale": settings["guidance_scale"]}

    @property
    def method(self) -> str:  # type: ignore[override]  # the registry name is the release's
        return self.release.name

    def native_size(self) -> int:
        """The release's resolution (768 official, 512 open; the checkpoint stores no sample size), or the folder's
        ``settings``."""
        return self.settings["height"]

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike | None = None,
        *,
        release: str | None = None,
        face_model_dir: str | os.PathLike | None = None,
        torch_dtype: torch.dtype | None = None,
        local_files_only: bool | None = None,
        **kwargs,
    ) -> FlashFacePipeline:
        """Load the official release (``flashface.ckpt`` + CLIP + VAE files, e.g. ``shilongz/FlashFace-SD1.5`` or
        the repo's ``cache/`` folder), a folder saved by ``save_pretrained`` (``idfusion convert`` writes one), or the
        open release (``IntellectGen/FlashFace`` diffusers folder). ``release`` picks the default model id when no
        path is given, and is checked against what the folder holds.
        """
        from ..convert import flashface as ckpt

        release_name = release or OFFICIAL.name
        if release_name not in RELEASES:
            raise ValueError(f"unknown FlashFace release {release_name!r}; choose one of {', '.join(RELEASES)}")
        source = pretrained_model_name_or_path or DEFAULT_MODELS[release_name]
        local = Path(source).expanduser()
        found = _read_release(local) if local.is_dir() else None
        if found is None:
            required, patterns = ckpt.OFFICIAL_FILES, None
            if release_name != OFFICIAL.name:  # a diffusers folder: the registry's download data says what to fetch
                from ..registry import get_method

                download = get_method(release_name).downloads[0]
                required, patterns = download.required, download.allow_patterns
            folder = resolve_model_folder(
                source, required=required, what=f"FlashFace ({release_name})", local_files_only=local_files_only,
                allow_patterns=patterns,
            )  # fmt: skip
            found = _read_release(folder)
        else:
            folder = local
        if found is None:
            raise IdfusionError(f"{folder}: not a FlashFace release (no flashface.ckpt, model_index.json or refnet/)")
        if release is not None and found.name != release:
            raise ValueError(f"{folder} holds the {found.name} model, but release={release!r} was asked for")

        index = folder / "model_index.json"
        config = json.loads(index.read_text(encoding="utf-8")) if index.is_file() else {}
        if config.get("_class_name") == cls.__name__:
            shared = {
                k: v
                for k, v in load_base_components(folder, config, BASE_COMPONENTS, torch_dtype).items()
                if k not in kwargs
            }
            pipe = cls.from_saved_folder(folder, torch_dtype=torch_dtype, **shared, **kwargs)
        else:
            load = ckpt.load_official_flashface if found is OFFICIAL else ckpt.load_open_flashface
            parts = load(folder, torch_dtype=torch_dtype)
            pipe = cls(**parts, release=found.name)
        pipe.model_info = {"model": str(source)}
        base = (config.get("settings") or {}).get("base_model")
        if base and any(not (folder / name).is_dir() for name in BASE_COMPONENTS if config.get(name)):
            pipe.model_info = {"model": str(source), "base_model": str((folder / base).resolve())}
        faces = folder / "antelopev2"
        pipe.face_model_dir = Path(face_model_dir) if face_model_dir else (faces if faces.is_dir() else None)
        return pipe

    # ---- references ------------------------------------------------------------------------------------------

    def reference_images(self, faces: Sequence[FaceInput], *, clamp_crop: bool = False) -> list[PIL.Image.Image]:
        """One reference image per photo (each must show exactly one face), cropped the release's way."""
        size = self.settings["reference_size"]
        images = []
        for index, item in enumerate(faces):
            if isinstance(item, Face):
                raise ReferenceImageError(item.source, "FlashFace needs the photo itself, not a Face record")
            image, chosen = split_face_photo(item)
            loaded = load_image(image)
            found = self.default_face_analyzer().analyze(
                loaded.array, select="all" if chosen is None else chosen, name=loaded.name
            )
            if len(found) != 1:
                raise ReferenceImageError(
                    loaded.name,
                    f"reference {index + 1} shows {len(found)} faces; FlashFace needs exactly one face per reference "
                    "photo (crop it to one person, or choose one with --face-index)",
                )
            face = found[0]
            if self.release is OFFICIAL:
                images.append(reference_crop(loaded.array, face, size, clamp=clamp_crop))
            else:  # the open release expects aligned face crops (insightface-style), resized to 256x256
                images.append(PIL.Image.fromarray(align_face(loaded.array, face.landmarks, size=size)))
        return images

    @torch.no_grad()
    def encode_references(
        self, images: Sequence[PIL.Image.Image], generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``(n, 4, s/f, s/f)`` scaled VAE latents (``f`` the VAE's scale factor) of reference images: the posterior mean (official), or a sample
        drawn from ``generator`` (open release), as each was trained."""
        pixels = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32)) for im in images])
        pixels = (pixels.permute(0, 3, 1, 2) / 127.5 - 1.0).to(self.vae.device, self.vae.dtype)  # (n, 3, s, s)
        posterior = self.vae.encode(pixels).latent_dist
        if self.release.reference_latents == "mean":
            latents = posterior.mean
        else:
            noise = torch.randn(posterior.mean.shape, generator=generator, dtype=posterior.mean.dtype)
            latents = posterior.mean + posterior.std * noise.to(posterior.mean.device)
        return latents * self.vae.config.scaling_factor

    # ---- text ------------------------------------------------------------------------------------------------

    def encode_prompts(self, prompts: list[str], clip_skip: int | None = None) -> torch.Tensor:
        """``(N, 77, D)`` text embeddings, skipping ``clip_skip`` last layers (default: the release's)."""
        from ..prompt_encoders import tokenize_prompts

        input_ids = tokenize_prompts(self.tokenizer, prompts).to(self.text_encoder.device)
        skip = self.release.clip_skip if clip_skip is None else clip_skip
        if skip == 0:
            return self.text_encoder(input_ids)[0]
        hidden = self.text_encoder(input_ids, output_hidden_states=True).hidden_states[-(skip + 1)]
        return self.text_encoder.final_layer_norm(hidden)

    # ---- one step --------------------------------------------------------------------------------------------

    def write_references(self, reference_latents: torch.Tensor, timestep, context: torch.Tensor) -> None:
        """Run the ReferenceNet; its processors store each reference block's ``norm1`` output in the bank
        (``(G * n, L, C)`` per block, read by every sample of the group)."""
        self.bank.tokens.clear()
        self.bank.writing = True
        try:
            self.refnet(reference_latents, timestep, encoder_hidden_states=context)
        finally:
            self.bank.writing = False

    def predict_noise(
        self,
        latents: torch.Tensor,
        mask: torch.Tensor | None,
        timestep,
        contexts: torch.Tensor,
        branches: Sequence[tuple[int, float]],
    ) -> torch.Tensor:
        """All guidance branches of a step in one UNet pass.

        Args:
            latents: ``(N, 4, h, w)``; mask: ``(1, 1, h, w)`` face-position channel or ``None``.
            contexts: ``(m, 77, D)`` the distinct text contexts.
            branches: ``(context index, reference strength)`` per branch. Branches that share a context share the
                down path (it sees no references), so it runs once per context, not once per branch.

        Returns:
            ``(k, N, 4, h, w)`` noise predictions, one per branch.
        """
        count = latents.shape[0]
        model_input = latents.repeat(contexts.shape[0], 1, 1, 1)  # (m*N, 4, h, w), context-major
        if mask is not None:
            model_input = torch.cat([model_input, mask.expand(model_input.shape[0], -1, -1, -1)], dim=1)
        context = contexts.repeat_interleave(count, dim=0)  # (m*N, 77, D)
        fork = torch.cat([torch.arange(count) + c * count for c, _ in branches]).to(latents.device)  # (k*N,)
        self.bank.strength = torch.tensor([s for _, s in branches]).repeat_interleave(count)
        noise = flashface.forward_with_shared_down_path(
            self.unet, model_input.to(self.unet.dtype), timestep, context.to(self.unet.dtype), fork
        )
        return noise.view(len(branches), count, *noise.shape[1:])  # (k*N, ...) -> (k, N, ...)

    # ---- call ------------------------------------------------------------------------------------------------

    def _references(
        self,
        faces: Sequence[FaceInput] | None,
        reference_images: Sequence[ImageInput] | None,
        reference_latents: torch.Tensor | None,
        clamp_crop: bool,
    ) -> tuple[list[PIL.Image.Image] | None, torch.Tensor | None, list[np.ndarray]]:
        """The call's reference crops (to encode per image) or given latents, and the crops for contact sheets."""
        sources = faces if faces is not None else reference_images
        if sources is not None and not 1 <= len(sources) <= MAX_REFERENCES:
            raise ReferenceImageError("references", f"give 1 to {MAX_REFERENCES} references, got {len(sources)}")
        if faces is not None:
            crops = self.reference_images(faces, clamp_crop=clamp_crop)
        elif reference_images is not None:
            size = self.settings["reference_size"]
            crops = [
                load_image(im, name="reference_images").to_pil().resize((size, size), PIL.Image.LANCZOS)
                for im in reference_images
            ]
        else:
            return None, reference_latents, []
        return crops, None, [np.asarray(c) for c in crops]

    @torch.no_grad()
    def __call__(
        self,
        faces: Sequence[FaceInput] | FaceInput | None = None,
        *,
        face_weights: Sequence[float] | None = None,
        reference_images: Sequence[ImageInput] | None = None,
        reference_latents: torch.Tensor | None = None,
        prompt: str | None = None,
        negative_prompt: str | None = None,
        num_images_per_prompt: int = 1,
        seed: int | Sequence[int] | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        scheduler: str | None = None,
        reference_strength: float | None = None,
        reference_guidance: float | None = None,
        reference_guidance_start: int | None = None,
        strength_before_guidance: float | None = None,
        guidance_rescale: float | None = None,
        face_box: Sequence[float] | None = None,
        clamp_crop: bool = False,
        height: int | None = None,
        width: int | None = None,
        output_type: str = "pil",
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> IdentityPipelineOutput:
        """Generate images of the person (or blend of people) in the references.

        Args:
            faces: 1-4 photos, each with exactly one face (detected, cropped and levelled here).
            face_weights: blend weights, one per photo (default all 1): a reference's attention is scaled by its
                weight, so references of several people blend continuously.
            reference_images: already-cropped reference images instead of ``faces``.
            reference_latents: ``(n, 4, s/f, s/f)`` precomputed reference latents instead of ``faces``; with
                ``n = 0`` (an empty tensor) nothing is referenced.
            prompt, negative_prompt: official: the default postfixes are appended, as in the official demo.
            seed, generator: one seed per image (``seed, seed + 1, ...``), or diffusers-style generators. An image's
                reference padding (official) and reference noise (open) come from its own seed, so a batch equals
                its single images.
            reference_strength: ``lambda`` (official 1.2; open release's ``reference_scale`` 0.85).
            reference_guidance: ``s_r``, the reference guidance scale (official 3.2, phase B).
            reference_guidance_start: ``T*`` (official 750): three-branch reference guidance for timesteps
                ``t <= T*``; before that, two-branch CFG with references at ``strength_before_guidance`` (0.85) in
                both branches.
            guidance_rescale: CFG-rescale factor (official 0.5; 0 disables it).
            face_box: face position ``(x1, y1, x2, y2)`` in [0, 1] (official only); default the official demo's
                ``(0.3, 0.1, 0.6, 0.4)``; all zeros: anywhere.
            (Defaults not given here come from the folder's ``settings``, else the release's.)
            clamp_crop: keep each reference crop inside its photo (the release crops the rounded box, black where it
                leaves the photo).
            num_inference_steps, guidance_scale, height, width: official 35, 7.5, 768; open 50, 3.0, 512.
            scheduler: a sampler name for this call; default ``pipe.scheduler``: the official release's own DDIM
                (``"flashface-ddim"``, fractional trailing times, ending at sigma 0) or the open release's DDIM.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
            callback_on_step_end, callback_on_step_end_tensor_inputs: diffusers' step callback (``"latents"``).
        """
        release = self.release
        # 1. Check inputs and fill the release's defaults
        settings = self.prepare_settings(
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, scheduler=scheduler,
            height=height, width=width, seed=seed, generator=generator, num_images_per_prompt=num_images_per_prompt,
            output_type=output_type,
        )  # fmt: skip
        self.check_callback(callback_on_step_end, callback_on_step_end_tensor_inputs)
        defaults = self.settings
        strength = defaults["reference_strength"] if reference_strength is None else float(reference_strength)
        if reference_guidance is None:
            reference_guidance = defaults["reference_guidance"]
        if reference_guidance_start is None:
            reference_guidance_start = defaults["reference_guidance_start"]
        if strength_before_guidance is None:
            strength_before_guidance = defaults["strength_before_guidance"]
        if guidance_rescale is None:
            guidance_rescale = defaults["guidance_rescale"]
        for name, value in (("reference_strength", strength), ("reference_guidance", reference_guidance),
                            ("guidance_rescale", guidance_rescale)):  # fmt: skip
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if face_box is not None:
            if len(face_box) != 4 or not all(0.0 <= float(v) <= 1.0 for v in face_box):
                raise ValueError(f"face_box must be 4 numbers x1, y1, x2, y2 in [0, 1]; got {list(face_box)}")
            if any(face_box) and (face_box[2] <= face_box[0] or face_box[3] <= face_box[1]):
                raise ValueError(f"face_box needs x2 > x1 and y2 > y1; got {list(face_box)}")
            if release is OPEN:
                raise ValueError("face_box needs the official FlashFace model (the open release has no mask input)")
        elif release is OFFICIAL:
            face_box = list(defaults["face_box"] or (0.0, 0.0, 0.0, 0.0))
        if sum(x is not None for x in (faces, reference_images, reference_latents)) != 1:
            raise ValueError("give exactly one of faces, reference_images or reference_latents")
        if faces is not None and not isinstance(faces, (list, tuple)):
            faces = [faces]

        # 2. References: crops, weights
        crops, given_latents, references = self._references(faces, reference_images, reference_latents, clamp_crop)
        count = len(crops) if crops is not None else given_latents.shape[0]
        weights = torch.ones(count) if face_weights is None else torch.as_tensor(face_weights, dtype=torch.float32)
        if weights.shape != (count,) or not torch.isfinite(weights).all() or (weights < 0).any() or (
                count and weights.sum() <= 0):  # fmt: skip
            raise ReferenceImageError(
                "face_weights", f"need {count} finite weights >= 0, not all zero; got {face_weights}"
            )

        # 3. Text: the official demo appends its postfixes (the negative one alone when no negative is given); the
        #    open release skips CLIP's last layer for the positive prompt only
        if release is OFFICIAL:
            positive_text = ", ".join(t for t in (prompt or "a photo of a person", defaults["positive_postfix"]) if t)
            negative_text = ", ".join(t for t in (negative_prompt, defaults["negative_postfix"]) if t)
            positive, negative = self.encode_prompts([positive_text, negative_text]).chunk(2)  # (1, 77, D) each
        else:
            positive_text = prompt or "a photo of a person"
            negative_text = defaults["negative_prompt"] if negative_prompt is None else negative_prompt
            positive = self.encode_prompts([positive_text])
            negative = self.encode_prompts([negative_text], clip_skip=0)

        # 4. Initial noise (one generator per image), then the references each image reads: the official release
        #    encodes them once (posterior mean) and pads them per image (its seed) as log-multiplicity weights;
        #    the open release draws each image's reference noise from its generator after its initial noise
        device = self._execution_device
        scheduler_ = settings.scheduler
        scheduler_.set_timesteps(settings.steps, device=device)
        factor = self.vae_scale_factor  # 8 for SD1.5's VAE, 4 for the world's
        shape = (self.vae.config.latent_channels, settings.height // factor, settings.width // factor)
        latents = torch.stack([torch.randn(shape, generator=g) for g in settings.generators])
        # the sampler's state stays float32, as the release keeps it under autocast; the UNet gets its own dtype
        latents = (latents * scheduler_.init_noise_sigma).to(device, torch.float32)
        batch = latents.shape[0]
        if given_latents is not None:
            reference_latents, groups = given_latents, 1
        elif release.reference_latents == "mean":
            reference_latents, groups = self.encode_references(crops), 1
        else:
            reference_latents = torch.cat([self.encode_references(crops, g) for g in settings.generators])
            groups = batch
        reference_latents = reference_latents.to(device, self.refnet.dtype)
        self.bank.num_groups, self.bank.num_images = groups, batch
        log_weights = None
        if count:
            seeds = [s if s is not None else 0 for s in settings.seeds]
            multiplicity = torch.stack(
                [flashface.reference_multiplicities(count, release.num_references, s) for s in seeds]
            )  # (N, n)
            # a bias over the reference keys only: it shifts mass between an image's own keys and the references,
            # so only an all-ones weighting (no padding, equal weights) may be left out
            scaled = multiplicity * (weights / weights.max())
            if not bool((scaled == 1).all()):
                log_weights = scaled.clamp_min(1e-12).log()
        mask = None
        if release.in_channels == 5:
            mask = flashface.face_position_mask(face_box, settings.height, settings.width, scale=factor).to(latents)

        # 5. Denoising loop
        texts = torch.cat([positive, negative])  # context 0: positive, 1: negative
        try:
            with self.progress_bar(total=len(scheduler_.timesteps)) as progress:
                for i, t in enumerate(scheduler_.timesteps):
                    if count and (release.references_every_step or i == 0):
                        # official: at the current t with the negative prompt; open: once at t = 0 with the prompt
                        context = negative if release.refnet_context == "negative" else positive
                        timestep = t if release.references_every_step else torch.zeros_like(t)
                        self.write_references(
                            reference_latents, timestep, context.expand(reference_latents.shape[0], -1, -1)
                        )
                    self.bank.log_weights = log_weights
                    guided = self._guided_noise(
                        scheduler_.scale_model_input(latents, t), mask, t, texts, settings.guidance_scale, strength, reference_guidance,
                        reference_guidance_start, strength_before_guidance, guidance_rescale,
                    )  # fmt: skip
                    latents = scheduler_.step(guided.float(), t, latents).prev_sample
                    latents = self.step_end(
                        callback_on_step_end, callback_on_step_end_tensor_inputs, i, t, {"latents": latents}
                    )["latents"]
                    progress.update()
        finally:
            self.bank.clear()

        # 6. Decode
        images = self.decode_latents(latents, output_type)
        self.maybe_free_model_hooks()
        return self.result(
            images, settings, references, prompt=prompt, negative_prompt=negative_prompt,
            reference_strength=strength,
            reference_guidance=reference_guidance if release is OFFICIAL else None,
            reference_guidance_start=reference_guidance_start if release is OFFICIAL else None,
            face_box=list(face_box) if face_box is not None else None,
            face_weights=[float(w) for w in face_weights] if face_weights is not None else None,
            num_references=count,
        )  # fmt: skip

    def _guided_noise(
        self, latents, mask, t, texts, text_scale, strength, reference_guidance, guidance_start, strength_before,
        rescale,
    ) -> torch.Tensor:  # fmt: skip
        """One step's guided noise prediction with the release's branches and guidance."""
        if self.release is OPEN:  # CFG; the unconditional branch sees no reference
            noise = self.predict_noise(latents, mask, t, texts, [(0, strength), (1, 0.0)])
            return noise[1] + text_scale * (noise[0] - noise[1])
        if int(t) > guidance_start:  # phase A: references in both branches at lambda_0
            noise = self.predict_noise(latents, mask, t, texts, [(0, strength_before), (1, strength_before)])
            return flashface.flashface_guidance(noise, text_scale=text_scale, reference_scale=None, rescale=rescale)
        # phase B: [positive + references, positive, negative] with lambda [lam, 0, 0]
        noise = self.predict_noise(latents, mask, t, texts, [(0, strength), (0, 0.0), (1, 0.0)])
        return flashface.flashface_guidance(
            noise, text_scale=text_scale, reference_scale=reference_guidance, rescale=rescale
        )
