"""FeedFacePipeline: FeedFace on UniDiffuser-v1 (U-ViT), face photo(s) + prompt in, images of that person out.

The base is diffusers' :class:`~diffusers.UniDiffuserModel` loaded from the official files
(:mod:`idfusion.methods.feedface_checkpoint`); identity enters through the feed adapter
(:mod:`idfusion.methods.feedface`), hooked on 14 U-ViT blocks. Sampling is UniDiffuser's text-to-image over the
joint state ``[VAE latent, CLIP image embedding]`` with the release's guidance: the conditional branch sees the
prompt (text timestep 0) with the adapter at its multiplier; the unconditional branch sees Gaussian noise as text at
text timestep T with the adapter off. The loop is written here (about 30 lines) because diffusers'
``UniDiffuserPipeline`` needs components text-to-image never runs (a CLIP image encoder, the GPT-2 tokenizer) and
cannot switch the adapter per branch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline

from ..errors import IdfusionError, ModelFilesError
from ..hub import resolve_model_folder
from ..methods import feedface
from ..methods import feedface_checkpoint as ckpt
from .common import (
    FaceInput,
    IdentityInputError,
    IdentityPipelineMixin,
    IdentityPipelineOutput,
    check_one_identity,
    make_generators,
    make_scheduler,
)

__all__ = ["FeedFacePipeline", "FeedFaceMixin", "MODEL_ID", "TEXT_ENCODER_ID", "FACE_MODES"]

logger = logging.getLogger(__name__)

MODEL_ID = "Xiang-cd/FeedFace"
#: The release takes its text encoder from the Hub.
TEXT_ENCODER_ID = "openai/clip-vit-large-patch14"
FACE_MODES = ("cat", "mean")
MODELS_FOLDER = "models"


class FeedFaceMixin:
    """What both FeedFace pipelines share: the feed adapter follows the denoiser (``unet``) across devices and
    dtypes; faces become the release's 224 crops and then face tokens, once per call."""

    feed = None

    def to(self, *args, **kwargs):
        """Move the pipeline; the feed adapter follows the denoiser's device and dtype."""
        result = super().to(*args, **kwargs)
        if self.feed is not None:
            self.feed.to(device=self.unet.device, dtype=self.unet.dtype)
        return result

    def checked_feed_scale(self, feed_scale: float | None, default: float) -> float:
        """The call's adapter multiplier (``default`` when not given), checked; the adapter must be loaded."""
        scale = default if feed_scale is None else float(feed_scale)
        if not np.isfinite(scale):
            raise ValueError(f"feed_scale must be a finite number, got {feed_scale}")
        if self.feed is None:
            raise ModelFilesError(f"this {type(self).__name__} has no feed adapter; load it with from_pretrained")
        return scale

    def face_crops(self, faces: Sequence[FaceInput]) -> list[np.ndarray]:
        """The release's 224 crop around the largest face of each photo (square of 1.1x the box, no alignment)."""
        return [feedface.face_crop(image, face.bbox) for image, face in self.photo_faces(faces)]

    @torch.no_grad()
    def encode_faces(self, faces: Sequence[FaceInput] | FaceInput, mode: str = "cat") -> tuple[torch.Tensor, list]:
        """Face tokens of one generation (computed once, used by every step and block) and the crops.

        ``"cat"`` concatenates the tokens of the first 5 photos (the release's default); ``"mean"`` averages the
        tokens of all photos, which blends identities.
        """
        if mode not in FACE_MODES:
            raise ValueError(f"face mode must be one of {', '.join(FACE_MODES)}, got {mode!r}")
        if not isinstance(faces, (list, tuple)):
            faces = [faces]
        if not faces:
            raise IdentityInputError("faces is empty: give at least one face photo")
        if mode == "cat" and len(faces) > feedface.MAX_CAT_FACES:
            logger.warning(
                "FeedFace's cat mode uses the first %d photos; %d given", feedface.MAX_CAT_FACES, len(faces)
            )
        crops = self.face_crops(faces)
        pixels = feedface.preprocess_faces(np.stack(crops)).to(self.unet.device, self.unet.dtype)
        return self.feed.encode_faces(pixels, mode=mode), crops


class FeedFacePipeline(FeedFaceMixin, IdentityPipelineMixin, DiffusionPipeline):
    """FeedFace text-to-image on UniDiffuser-v1.

    Components: ``vae``, ``text_encoder`` (CLIP ViT-L/14), ``tokenizer``, ``text_decoder`` (UniDiffuser's caption
    decoder; only its prefix encoder 768 -> 64 runs), ``unet`` (the U-ViT) and ``scheduler``; plus :attr:`feed`, the
    feed adapter (CLIP ViT-B/32 face encoder and 14 adapter blocks), which follows the U-ViT's device and dtype.
    """

    model_cpu_offload_seq = "text_encoder->text_decoder->unet->vae"

    def __init__(self, vae, text_encoder, tokenizer, text_decoder, unet, scheduler):
        super().__init__()
        self.register_modules(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, text_decoder=text_decoder, unet=unet,
            scheduler=scheduler,
        )  # fmt: skip
        self.model_info = {"method": "feedface"}
        self._base_scheduler_config = dict(scheduler.config)
        self.feed: feedface.FeedAdapter | None = None
        self._feed_handle = None

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike = MODEL_ID,
        *,
        text_encoder: str | os.PathLike | None = None,
        face_model_dir: str | os.PathLike | None = None,
        torch_dtype: torch.dtype | None = None,
        local_files_only: bool | None = None,
        **kwargs,
    ) -> FeedFacePipeline:
        """Load the FeedFace release: ``models/`` (or the folder itself) with ``uvit_v1.pth``, ``autoencoder_kl.pth``,
        ``caption_decoder.pth``, ``gpt2/`` and ``feed-4800000.pt`` (Hub ``Xiang-cd/FeedFace`` or a local folder).

        Args:
            text_encoder: the CLIP ViT-L/14 text encoder (Hub id or folder). Default: ``models/clip-vit-large-patch14``
                when present, else ``openai/clip-vit-large-patch14``.
            face_model_dir: ONNX face models (SCRFD); default the folder's ``antelopev2/``, else dlib.
            torch_dtype: dtype of every component.
            local_files_only: never contact the Hub (also implied by ``HF_HUB_OFFLINE=1``).
        """
        from diffusers import DPMSolverSinglestepScheduler
        from transformers import CLIPTextModel, CLIPTokenizer

        files = [ckpt.UVIT_FILE, ckpt.AUTOENCODER_FILE, ckpt.CAPTION_DECODER_FILE, f"{ckpt.GPT2_DIR}/config.json"]
        files.append(feedface.FEED_FILE)
        folder = resolve_model_folder(
            pretrained_model_name_or_path, required=[f"{MODELS_FOLDER}/{f}|{f}" for f in files], what="FeedFace",
            local_files_only=local_files_only,
        )  # fmt: skip
        # the README's layout is models/...; a folder holding the files directly works too
        models = folder / MODELS_FOLDER if (folder / MODELS_FOLDER / ckpt.UVIT_FILE).is_file() else folder
        dtype = {"dtype": torch_dtype} if torch_dtype is not None else {}
        unet = ckpt.load_uvit(models / ckpt.UVIT_FILE, **dtype)
        vae = ckpt.load_autoencoder(models / ckpt.AUTOENCODER_FILE, **dtype)
        text_decoder = ckpt.load_text_decoder(models / ckpt.CAPTION_DECODER_FILE, models / ckpt.GPT2_DIR, **dtype)
        if text_encoder is None:
            local = models / ckpt.CLIP_TEXT_DIR
            text_encoder = local if local.is_dir() else TEXT_ENCODER_ID
        text_folder = resolve_model_folder(
            text_encoder, required=["config.json", "vocab.json", "merges.txt"],
            what="CLIP ViT-L/14 text encoder for FeedFace", local_files_only=local_files_only,
            allow_patterns=["*.json", "*.txt", "*.safetensors"],
        )  # fmt: skip
        encoder = CLIPTextModel.from_pretrained(text_folder, **({"torch_dtype": torch_dtype} if torch_dtype else {}))
        tokenizer = CLIPTokenizer.from_pretrained(text_folder)
        if encoder.config.hidden_size != text_decoder.prefix_inner_dim:
            raise ValueError(
                f"{text_encoder}: the text encoder is {encoder.config.hidden_size} wide, but the caption decoder's "
                f"prefix encoder takes {text_decoder.prefix_inner_dim}"
            )
        scheduler = DPMSolverSinglestepScheduler.from_config(feedface.SCHEDULER_CONFIG)
        pipe = cls(vae, encoder, tokenizer, text_decoder, unet, scheduler)
        pipe.feed = feedface.load_feed_adapter(models / feedface.FEED_FILE, dtype=torch_dtype)
        pipe._attach_feed()
        pipe.model_info = {
            "method": "feedface",
            "model": str(pretrained_model_name_or_path),
            "text_encoder": str(text_encoder),
            "model_files": {f"{MODELS_FOLDER}/{feedface.FEED_FILE}": models / feedface.FEED_FILE},
        }
        faces = folder / "antelopev2"
        pipe.face_model_dir = Path(face_model_dir) if face_model_dir else (faces if faces.is_dir() else None)
        return pipe

    def _attach_feed(self) -> None:
        width = self.unet.config.num_attention_heads * self.unet.config.attention_head_dim
        if self.feed.dim != width:
            raise ValueError(f"the feed adapter is {self.feed.dim} wide, the U-ViT {width}")
        self.feed.to(device=self.unet.device, dtype=self.unet.dtype)
        self._feed_handle = self.feed.attach(self.unet)

    # ---- conditioning ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """CLIP ViT-L/14 ``last_hidden_state`` → the caption decoder's prefix encoder: ``(1, 77, 64)``."""
        ids = self.tokenizer(
            [prompt], padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.text_encoder.device)  # fmt: skip
        hidden = self.text_encoder(ids)[0]
        return self.text_decoder.encode(hidden.to(self.text_decoder.dtype))

    # ---- call ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        faces: Sequence[FaceInput] | FaceInput | None = None,
        *,
        face_tokens: torch.Tensor | None = None,
        prompt: str = "a photo of a person",
        face_mode: str = "cat",
        feed_scale: float | None = None,
        num_images_per_prompt: int = 1,
        seed: int | Sequence[int] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        scheduler: str | None = None,
        height: int | None = None,
        width: int | None = None,
        output_type: str = "pil",
        callback_on_step_end=None,
    ) -> IdentityPipelineOutput:
        """Generate images of the person in ``faces``.

        Args:
            faces: 1-5 photos of one person (``"cat"``), or photos to blend (``"mean"``); the largest face of each.
            face_tokens: :meth:`encode_faces` output instead of ``faces``.
            prompt: the text prompt (FeedFace has no negative prompt: the unconditional branch is UniDiffuser's).
            face_mode: ``"cat"`` (default) or ``"mean"``.
            feed_scale: the adapter multiplier in the conditional branch (default 0.8; 0 = the bare U-ViT).
            num_images_per_prompt: images to make (one seed each).
            seed: an int (images get ``seed, seed + 1, ...``), one seed per image, or ``None`` for random seeds.
            num_inference_steps, guidance_scale, scheduler: default 40, 6.0 (the release's ``c + 5 (c - u)``),
                ``"dpm++-3s"``.
            height, width: output size (multiples of 8; default 512, the U-ViT's trained size).

        Returns:
            :class:`IdentityPipelineOutput` with images, per-image metadata and the face crops.
        """
        # 1. Check inputs and fill the release's defaults
        settings = self.sampling_settings(
            feedface.DEFAULTS, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            scheduler=scheduler, height=height, width=width, seed=seed, num_images_per_prompt=num_images_per_prompt,
        )  # fmt: skip
        scale = self.checked_feed_scale(feed_scale, feedface.DEFAULTS["feed_scale"])

        # 2. Conditioning, once per call: face tokens, the prompt's 64-d text tokens
        check_one_identity(faces, face_tokens, "face_tokens")
        crops: list = []
        if face_tokens is None:
            face_tokens, crops = self.encode_faces(faces, face_mode)
        self.feed.set_face_tokens(face_tokens.to(self.unet.device, self.unet.dtype))
        text = self.encode_prompt(prompt).to(self.unet.dtype)

        # 3. Joint sampling of [VAE latent | CLIP image embedding], one generator per image
        latents = self.sample_joint(text, scale, settings, callback_on_step_end)
        images = self.decode(latents, output_type)
        self.feed.set_face_tokens(None)
        self.maybe_free_model_hooks()

        shared = self.base_metadata(
            **self.model_metadata(), prompt=prompt, face_mode=face_mode, feed_scale=scale,
            num_references=len(crops) or int(face_tokens.shape[1] // feedface.FACE_TOKENS), steps=settings.steps,
            guidance_scale=settings.guidance_scale, scheduler=settings.scheduler, width=settings.width,
            height=settings.height,
        )  # fmt: skip
        metadata = [{**shared, "seed": s} for s in settings.seeds]
        return IdentityPipelineOutput(images=list(images), metadata=metadata, references=crops)

    def sample_joint(self, text: torch.Tensor, scale: float, settings, callback_on_step_end=None) -> torch.Tensor:
        """UniDiffuser text-to-image with the release's guidance; returns the final VAE latents ``(B, 4, h, w)``."""
        device, dtype = self.unet.device, self.unet.dtype
        batch = len(settings.seeds)
        shape = (4, settings.height // 8, settings.width // 8)
        clip_dim = self.unet.config.clip_img_dim
        generators = make_generators(settings.seeds)
        z = torch.stack([torch.randn(shape, generator=g) for g in generators])
        clip = torch.stack([torch.randn((1, clip_dim), generator=g) for g in generators])
        latents = torch.cat([z.flatten(1), clip.flatten(1)], dim=1).to(device, dtype)  # (B, 4hw + 512)
        self.scheduler = make_scheduler(settings.scheduler, self._base_scheduler_config)
        self.scheduler.set_timesteps(settings.steps, device=device)
        latents = latents * self.scheduler.init_noise_sigma
        text = text.expand(batch, -1, -1)
        max_timestep = self.scheduler.config.num_train_timesteps
        numel = int(np.prod(shape))
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            z_in = latents[:, :numel].view(batch, *shape)
            clip_in = latents[:, numel:].view(batch, 1, clip_dim)
            self.feed.set_multiplier(scale)
            z_c, clip_c, _ = self.unet(
                z_in, clip_in, text, timestep_img=t, timestep_text=0, data_type=feedface.DATA_TYPE
            )
            out = torch.cat([z_c.flatten(1), clip_c.flatten(1)], dim=1)
            if settings.guidance_scale > 1.0:
                # the release's unconditional branch: adapter off, Gaussian text at text timestep T
                noise_text = torch.stack([torch.randn(text.shape[1:], generator=g) for g in generators])
                self.feed.set_multiplier(0.0)
                z_u, clip_u, _ = self.unet(
                    z_in, clip_in, noise_text.to(device, dtype), timestep_img=t, timestep_text=max_timestep,
                    data_type=feedface.DATA_TYPE,
                )  # fmt: skip
                uncond = torch.cat([z_u.flatten(1), clip_u.flatten(1)], dim=1)
                out = settings.guidance_scale * out + (1.0 - settings.guidance_scale) * uncond
            latents = self.scheduler.step(out, t, latents).prev_sample
            if callback_on_step_end is not None:
                callback_on_step_end(self, i, t, {})
        self.feed.set_multiplier(scale)
        return latents[:, :numel].view(batch, *shape)

    def decode(self, latents: torch.Tensor, output_type: str = "pil") -> list:
        image = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        image = (image.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
        if output_type == "np":
            return list(image)
        if output_type != "pil":
            raise IdfusionError(f"output_type must be 'pil' or 'np', got {output_type!r}")
        return self.numpy_to_pil(image)
