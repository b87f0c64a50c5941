"""FlashFacePipeline: 1-4 reference photos + prompt, through ReferenceNet reference attention.

One class serves both releases (``flashface``: official; ``open-flashface``: IntellectGen); every difference
between them is a field of :class:`~idfusion.methods.flashface.FlashFaceVariant`.
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
from diffusers import DiffusionPipeline

from ..errors import FaceError, IdfusionError
from ..faces import Face, align_face
from ..hub import resolve_model_folder
from ..images import ImageInput, load_image
from ..methods import flashface
from ..methods.flashface import OFFICIAL, OPEN, FlashFaceVariant, ReferenceBank
from .common import FaceInput, IdentityPipelineOutput, IdentitySD15Mixin, make_generators, make_scheduler

__all__ = ["FlashFacePipeline", "ReferenceError"]

logger = logging.getLogger(__name__)

VARIANTS = {OFFICIAL.name: OFFICIAL, OPEN.name: OPEN}
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


class ReferenceError(FaceError):
    """A reference photo cannot be used (no face, several faces, too many references, bad weights)."""


def reference_crop(image: np.ndarray, face: Face, size: int) -> PIL.Image.Image:
    """The official reference: the detector box, rotated about its centre so the eyes are level (no expansion),
    resized so the long side is ``size`` and padded to a black square."""
    height, width = image.shape[:2]
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


def _read_variant(folder: Path) -> FlashFaceVariant | None:
    if (folder / "flashface.json").is_file():
        return VARIANTS[json.loads((folder / "flashface.json").read_text())["variant"]]
    if (folder / "flashface.ckpt").is_file():
        return OFFICIAL
    index = folder / "model_index.json"
    if index.is_file() and "refnet" in json.loads(index.read_text()):
        return OPEN
    return None


class FlashFacePipeline(IdentitySD15Mixin, DiffusionPipeline):
    """FlashFace generation (official or open release). Components: ``vae``, ``text_encoder``, ``tokenizer``,
    ``unet`` (main UNet with reference attention), ``refnet`` (ReferenceNet) and ``scheduler`` (DDIM)."""

    model_cpu_offload_seq = "text_encoder->refnet->unet->vae"
    id_embedding_dim = None

    def __init__(self, vae, text_encoder, tokenizer, unet, refnet, scheduler, variant: str = OFFICIAL.name):
        super().__init__()
        self.register_modules(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, refnet=refnet, scheduler=scheduler
        )
        if variant not in VARIANTS:
            raise ValueError(f"unknown FlashFace variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        self.variant = VARIANTS[variant]
        self.bank = ReferenceBank()
        flashface.attach_reference_processors(unet, refnet, self.bank, self.variant)
        self.model_info = {"method": self.variant.name}
        self._base_scheduler_config = dict(scheduler.config)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike | None = None,
        *,
        variant: str | None = None,
        face_model_dir: str | os.PathLike | None = None,
        torch_dtype: torch.dtype | None = None,
        local_files_only: bool | None = None,
        **kwargs,
    ) -> FlashFacePipeline:
        """Load the official release (``flashface.ckpt`` + CLIP + VAE files, e.g. ``shilongz/FlashFace-SD1.5`` or
        the repo's ``cache/`` folder), a folder converted with ``idfusion convert flashface``, or the open release
        (``IntellectGen/FlashFace`` diffusers folder). ``variant`` picks the default model id when no path is given.
        """
        from diffusers import DDIMScheduler

        from ..methods import flashface_checkpoint as ckpt

        variant_name = variant or OFFICIAL.name
        if variant_name not in VARIANTS:
            raise ValueError(f"unknown FlashFace variant {variant_name!r}; choose one of {', '.join(VARIANTS)}")
        source = pretrained_model_name_or_path or DEFAULT_MODELS[variant_name]
        local = Path(source).expanduser()
        found = _read_variant(local) if local.is_dir() else None
        if found is None:
            required = (
                ckpt.OFFICIAL_FILES
                if variant_name == OFFICIAL.name
                else ("model_index.json", "unet/config.json", "refnet/config.json", "vae/config.json")
            )
            folder = resolve_model_folder(
                source, required=required, what=f"FlashFace ({variant_name})", local_files_only=local_files_only
            )
            found = _read_variant(folder)
        else:
            folder = local
        if found is None:
            raise IdfusionError(f"{folder}: not a FlashFace release (no flashface.ckpt, flashface.json or refnet/)")
        if variant is not None and found.name != variant:
            raise ValueError(f"{folder} holds the {found.name} model, but variant={variant!r} was asked for")

        if (folder / "flashface.json").is_file():
            parts = ckpt.load_converted_flashface(folder, torch_dtype=torch_dtype)
        elif found is OFFICIAL:
            parts = ckpt.load_official_flashface(folder, torch_dtype=torch_dtype)
        else:
            parts = ckpt.load_open_flashface(folder, torch_dtype=torch_dtype)
        # the release's noise schedule, with the variant's timestep spacing (official: trailing; open: offset 19)
        scheduler = DDIMScheduler.from_config({**parts["scheduler"].config, **found.scheduler_config})
        pipe = cls(
            parts["vae"], parts["text_encoder"], parts["tokenizer"], parts["unet"], parts["refnet"], scheduler,
            variant=found.name,
        )  # fmt: skip
        pipe.model_info = {"method": found.name, "model": str(source)}
        faces = folder / "antelopev2"
        pipe.face_model_dir = Path(face_model_dir) if face_model_dir else (faces if faces.is_dir() else None)
        return pipe

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """A converted folder (safetensors, diffusers-style) that :meth:`from_pretrained` reads back."""
        from ..methods import flashface_checkpoint as ckpt

        components = {k: getattr(self, k) for k in ("unet", "refnet", "text_encoder", "vae", "tokenizer")}
        ckpt.save_converted_flashface(components, save_directory, variant_name=self.variant.name)

    # ---- references ------------------------------------------------------------------------------------------

    def reference_images(self, faces: Sequence[FaceInput]) -> list[PIL.Image.Image]:
        """One reference image per photo (each must show exactly one face), cropped the variant's way."""
        size = self.variant.reference_size
        images = []
        for index, item in enumerate(faces):
            if isinstance(item, Face):
                raise ReferenceError(item.source, "FlashFace needs the photo itself, not a Face record")
            loaded = load_image(item)
            found = self.photo_analyzer().analyze(loaded.array, name=loaded.name)
            if len(found) != 1:
                raise ReferenceError(
                    loaded.name,
                    f"reference {index + 1} shows {len(found)} faces; FlashFace needs exactly one face per reference "
                    "photo (crop it to one person)",
                )
            face = found[0]
            if self.variant is OFFICIAL:
                images.append(reference_crop(loaded.array, face, size))
            else:  # the open release expects aligned face crops (insightface-style), resized to 256x256
                images.append(PIL.Image.fromarray(align_face(loaded.array, face.landmarks, size=size)))
        return images

    @torch.no_grad()
    def encode_references(self, images: Sequence[PIL.Image.Image], generator: torch.Generator) -> torch.Tensor:
        """``(n, 4, s/8, s/8)`` scaled VAE latents of reference images (posterior mean, or a sample for the open
        release, as each was trained)."""
        pixels = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32)) for im in images])
        pixels = (pixels.permute(0, 3, 1, 2) / 127.5 - 1.0).to(self.vae.device, self.vae.dtype)  # (n, 3, s, s)
        posterior = self.vae.encode(pixels).latent_dist
        if self.variant.reference_latents == "mean":
            latents = posterior.mean
        else:
            noise = torch.randn(posterior.mean.shape, generator=generator, dtype=posterior.mean.dtype)
            latents = posterior.mean + posterior.std * noise.to(posterior.mean.device)
        return latents * self.vae.config.scaling_factor

    def _pad_references(self, latents: torch.Tensor, weights: torch.Tensor, seed: int):
        """Always four references (official ``num_pairs = 4``): fewer are padded with seeded random duplicates."""
        count = latents.shape[0]
        if count == MAX_REFERENCES or self.variant is OPEN:
            return latents, weights
        picks = list(range(count)) + list(np.random.default_rng(seed).choice(count, MAX_REFERENCES - count))
        index = torch.tensor(picks)
        return latents[index.to(latents.device)], weights[index]

    # ---- text ------------------------------------------------------------------------------------------------

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        input_ids = self.tokenizer(
            prompts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.text_encoder.device)  # fmt: skip
        if self.variant.clip_skip == 0:
            return self.text_encoder(input_ids)[0]
        hidden = self.text_encoder(input_ids, output_hidden_states=True).hidden_states[-(self.variant.clip_skip + 1)]
        return self.text_encoder.final_layer_norm(hidden)

    # ---- one step --------------------------------------------------------------------------------------------

    def write_references(self, reference_latents: torch.Tensor, timestep, context: torch.Tensor) -> None:
        """Run the ReferenceNet; its processors store each reference block's ``norm1`` output in the bank."""
        self.bank.clear()
        self.bank.writing = True
        try:
            self.refnet(reference_latents, timestep, encoder_hidden_states=context)
        finally:
            self.bank.writing = False
        # (n, L, C) per block, shared by every sample of the main batch

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
        return noise.view(len(branches), count, *noise.shape[1:])

    def _native_size(self) -> int:
        """The release's resolution (768 official, 512 open) for full-width UNets (320 base channels); 64 px for the
        test kit's narrow ones. The official checkpoint stores no sample size, so width is what tells them apart."""
        return self.variant.height if self.unet.config.block_out_channels[0] >= 320 else 64

    # ---- call ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        faces: Sequence[FaceInput] | FaceInput | None = None,
        *,
        face_weights: Sequence[float] | None = None,
        reference_images: Sequence[ImageInput] | None = None,
        reference_latents: torch.Tensor | None = None,
        prompt: str = "a photo of a person",
        negative_prompt: str | None = None,
        num_images_per_prompt: int = 1,
        seed: int | Sequence[int] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        scheduler: str | None = None,
        reference_strength: float | None = None,
        reference_guidance: float = OFFICIAL_REFERENCE_GUIDANCE,
        reference_guidance_start: int = OFFICIAL_GUIDANCE_START,
        strength_before_guidance: float = OFFICIAL_STRENGTH_BEFORE_GUIDANCE,
        guidance_rescale: float = OFFICIAL_RESCALE,
        face_box: Sequence[float] | None = None,
        height: int | None = None,
        width: int | None = None,
        output_type: str = "pil",
        callback_on_step_end=None,
    ) -> IdentityPipelineOutput:
        """Generate images of the person (or blend of people) in the references.

        Args:
            faces: 1-4 photos, each with exactly one face (detected, cropped and levelled here).
            face_weights: blend weights, one per photo (default all 1): a reference's attention is scaled by its
                weight, so references of several people blend continuously.
            reference_images: already-cropped reference images instead of ``faces``.
            reference_latents: ``(n, 4, s/8, s/8)`` precomputed reference latents instead of ``faces``; with
                ``n = 0`` (an empty tensor) nothing is referenced.
            prompt, negative_prompt: official: the default postfixes are appended, as in the official demo.
            reference_strength: ``lambda`` (official 1.2; open release's ``reference_scale`` 0.85).
            reference_guidance: ``s_r``, the reference guidance scale (official, phase B).
            reference_guidance_start: ``T*``: three-branch reference guidance for timesteps ``t <= T*``; before
                that, two-branch CFG with references at ``strength_before_guidance`` in both branches.
            guidance_rescale: CFG-rescale factor (official 0.5; 0 disables it).
            face_box: face position ``(x1, y1, x2, y2)`` in [0, 1] (official only); ``None`` or zeros: anywhere.
            num_inference_steps, guidance_scale, height, width: official 35, 7.5, 768; open 50, 3.0, 512.
            scheduler: default ``"ddim"`` with the release's timestep spacing (official: trailing), as trained;
                other samplers are built from the same noise schedule.
        """
        variant = self.variant
        # 1. Check inputs and fill the variant's defaults
        settings = self.sampling_settings(
            {"num_inference_steps": variant.num_inference_steps, "guidance_scale": variant.guidance_scale,
             "scheduler": "ddim"},
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, scheduler=scheduler,
            height=height or self._native_size(), width=width or self._native_size(),
            seed=seed, num_images_per_prompt=num_images_per_prompt,
        )  # fmt: skip
        strength = variant.reference_strength if reference_strength is None else float(reference_strength)
        for name, value in (("reference_strength", strength), ("reference_guidance", reference_guidance),
                            ("guidance_rescale", guidance_rescale)):  # fmt: skip
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if face_box is not None:
            if len(face_box) != 4 or not all(0.0 <= float(v) <= 1.0 for v in face_box):
                raise ValueError(f"face_box must be 4 numbers x1, y1, x2, y2 in [0, 1]; got {list(face_box)}")
            if any(face_box) and (face_box[2] <= face_box[0] or face_box[3] <= face_box[1]):
                raise ValueError(f"face_box needs x2 > x1 and y2 > y1; got {list(face_box)}")
            if variant is OPEN:
                raise ValueError("face_box needs the official FlashFace model (the open release has no mask input)")
        given = [x is not None for x in (faces, reference_images, reference_latents)]
        if sum(given) != 1:
            raise ValueError("give exactly one of faces, reference_images or reference_latents")
        generator = make_generators(settings.seeds[:1])[0]

        # 2. References: crops -> latents, weights, always four (official)
        if faces is not None and not isinstance(faces, (list, tuple)):
            faces = [faces]
        sources = faces if faces is not None else reference_images
        if sources is not None and not 1 <= len(sources) <= MAX_REFERENCES:
            raise ReferenceError("references", f"give 1 to {MAX_REFERENCES} references, got {len(sources)}")
        references: list[np.ndarray] = []
        if faces is not None:
            crops = self.reference_images(faces)
        elif reference_images is not None:
            size = variant.reference_size
            crops = [load_image(im).to_pil().resize((size, size), PIL.Image.LANCZOS) for im in reference_images]
        if reference_latents is None:
            reference_latents = self.encode_references(crops, generator)
            references = [np.asarray(c) for c in crops]
        count = reference_latents.shape[0]
        weights = torch.ones(count) if face_weights is None else torch.as_tensor(face_weights, dtype=torch.float32)
        if weights.shape != (count,) or not torch.isfinite(weights).all() or (weights < 0).any() or (
                count and weights.sum() <= 0):  # fmt: skip
            raise ReferenceError("face_weights", f"need {count} finite weights >= 0, not all zero; got {face_weights}")
        if count:
            reference_latents, weights = self._pad_references(reference_latents, weights, settings.seeds[0])
        self.bank.weights = None if bool((weights == weights[:1]).all()) or count == 0 else weights / weights.max()

        # 3. Text: the official demo appends its postfixes
        if variant is OFFICIAL:
            positive_text = f"{prompt}, {OFFICIAL_POSITIVE_POSTFIX}"
            negative_text = f"{negative_prompt or ''}, {OFFICIAL_NEGATIVE_POSTFIX}"
        else:
            positive_text, negative_text = prompt, OPEN_NEGATIVE_PROMPT if negative_prompt is None else negative_prompt
        positive, negative = self.encode_prompts([positive_text, negative_text]).chunk(2)  # (1, 77, D) each

        # 4. Initial noise (one generator per image), timesteps, face-position mask
        self.scheduler = make_scheduler(settings.scheduler, self._base_scheduler_config)
        self.scheduler.set_timesteps(settings.steps, device=self._execution_device)
        shape = (4, settings.height // 8, settings.width // 8)
        latents = torch.stack([torch.randn(shape, generator=g) for g in make_generators(settings.seeds)])
        latents = (latents * self.scheduler.init_noise_sigma).to(self._execution_device, positive.dtype)
        mask = None
        if variant.in_channels == 5:
            mask = flashface.face_position_mask(face_box, settings.height, settings.width).to(latents)
        reference_latents = reference_latents.to(self._execution_device, self.refnet.dtype)

        # 5. Denoising loop
        with self.progress_bar(total=len(self.scheduler.timesteps)) as progress:
            for i, t in enumerate(self.scheduler.timesteps):
                if count and (variant.references_every_step or i == 0):
                    # official: at the current t with the negative prompt; open: once at t = 0 with the prompt
                    context = negative if variant.refnet_context == "negative" else positive
                    timestep = t if variant.references_every_step else torch.zeros_like(t)
                    self.write_references(
                        reference_latents, timestep, context.expand(reference_latents.shape[0], -1, -1)
                    )
                elif not count:
                    self.bank.clear()
                texts = torch.cat([positive, negative])  # context 0: positive, 1: negative
                if variant is OPEN:  # CFG; the unconditional branch sees no reference
                    noise = self.predict_noise(latents, mask, t, texts, [(0, strength), (1, 0.0)])
                    guided = noise[1] + settings.guidance_scale * (noise[0] - noise[1])
                elif int(t) > reference_guidance_start:  # phase A: references in both branches at lambda_0
                    branches = [(0, strength_before_guidance), (1, strength_before_guidance)]
                    noise = self.predict_noise(latents, mask, t, texts, branches)
                    guided = flashface.flashface_guidance(
                        noise, text_scale=settings.guidance_scale, reference_scale=None, rescale=guidance_rescale
                    )
                else:  # phase B: [positive + references, positive, negative] with lambda [lam, 0, 0]
                    noise = self.predict_noise(latents, mask, t, texts, [(0, strength), (0, 0.0), (1, 0.0)])
                    guided = flashface.flashface_guidance(
                        noise, text_scale=settings.guidance_scale, reference_scale=reference_guidance,
                        rescale=guidance_rescale,
                    )  # fmt: skip
                latents = self.scheduler.step(guided, t, latents).prev_sample
                if callback_on_step_end is not None:
                    callback_on_step_end(self, i, t, {"latents": latents})
                progress.update()
        self.bank.clear()

        # 6. Decode
        images = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        images = ((images.float() / 2 + 0.5).clamp(0, 1)).permute(0, 2, 3, 1).cpu().numpy()
        if output_type == "pil":
            images = [PIL.Image.fromarray((im * 255).round().astype(np.uint8)) for im in images]
        self.maybe_free_model_hooks()

        shared = self.base_metadata(
            **self.model_metadata(),
            prompt=prompt,
            negative_prompt=negative_prompt,
            steps=settings.steps,
            guidance_scale=settings.guidance_scale,
            scheduler=settings.scheduler,
            width=settings.width,
            height=settings.height,
            reference_strength=strength,
            reference_guidance=reference_guidance if variant is OFFICIAL else None,
            reference_guidance_start=reference_guidance_start if variant is OFFICIAL else None,
            face_box=list(face_box) if face_box is not None else None,
            face_weights=[float(w) for w in face_weights] if face_weights is not None else None,
            num_references=count,
        )
        metadata = [{**shared, "seed": s} for s in settings.seeds]
        return IdentityPipelineOutput(images=list(images), metadata=metadata, references=references)
