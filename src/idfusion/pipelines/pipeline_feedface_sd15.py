"""FeedFaceSD15Pipeline: the FeedFace adapter on an SD1.5-family UNet (the paper's U-Net claim).

There are no official weights for this variant: an adapter comes from training (``feedface_sd15.safetensors``,
written by :func:`~idfusion.methods.feedface.save_sd15_feed_adapter`). Identity enters as in the U-ViT release: CLIP
ViT-B/32 face tokens, computed once per call, feed a zero-initialised adapter block at each of the 16
cross-attention sites, on in the conditional branch at ``feed_scale`` and off in the unconditional one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusers.loaders import StableDiffusionLoraLoaderMixin

from ..hub import resolve_model_folder
from ..layers import encode_text
from ..methods import feedface
from .common import FaceInput, IdentityPipelineOutput, IdentitySD15Mixin, check_one_identity
from .pipeline_feedface import FeedFaceMixin

__all__ = ["FeedFaceSD15Pipeline", "ADAPTER_FILE", "DEFAULTS"]

logger = logging.getLogger(__name__)

ADAPTER_FILE = "feedface_sd15.safetensors"
DEFAULT_BASE_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
#: SD1.5's usual sampling; the adapter multiplier as the U-ViT release's.
DEFAULTS = {"num_inference_steps": 30, "guidance_scale": 6.0, "scheduler": "dpm++", "feed_scale": 0.8}
BASE_REQUIRED_FILES = ("model_index.json", "unet/config.json", "text_encoder/config.json", "vae/config.json")


class FeedFaceSD15Pipeline(FeedFaceMixin, IdentitySD15Mixin, DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    """FeedFace on SD1.5: components ``vae``, ``text_encoder``, ``tokenizer``, ``unet``, ``scheduler``, plus
    :attr:`feed` (an :class:`~idfusion.methods.feedface.SD15FeedAdapter` attached to the UNet's ``attn2``)."""

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["controlnet"]
    id_embedding_dim = None

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, controlnet=None):
        super().__init__()
        self.register_modules(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
            controlnet=controlnet,
        )  # fmt: skip
        self.model_info = {"method": "feedface-sd15"}
        self._base_scheduler_config = dict(scheduler.config)
        self.feed: feedface.SD15FeedAdapter | None = None

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        base_model: str | os.PathLike | None = None,
        face_model_dir: str | os.PathLike | None = None,
        torch_dtype: torch.dtype | None = None,
        local_files_only: bool | None = None,
        **kwargs,
    ) -> FeedFaceSD15Pipeline:
        """Load a trained SD1.5 feed adapter (a folder with ``feedface_sd15.safetensors``) on an SD1.5 base.

        Args:
            pretrained_model_name_or_path: the adapter folder (or Hub repo). No official one exists.
            base_model: any SD1.5-family diffusers model; default the folder's ``stable-diffusion-v1-5/``, else
                ``stable-diffusion-v1-5/stable-diffusion-v1-5``.
        """
        from diffusers import StableDiffusionPipeline

        folder = resolve_model_folder(
            pretrained_model_name_or_path, required=[ADAPTER_FILE], what="FeedFace SD1.5 adapter (no official "
            "weights exist: train one, or write a tiny one with `idfusion make-tiny --method feedface-sd15`)",
            local_files_only=local_files_only,
        )  # fmt: skip
        if base_model is None:
            local = folder / "stable-diffusion-v1-5"
            base_model = local if local.is_dir() else DEFAULT_BASE_MODEL
        base_folder = resolve_model_folder(
            base_model, required=BASE_REQUIRED_FILES, what="SD1.5 base model for FeedFace",
            allow_patterns=["*.json", "*.txt", "unet/*", "text_encoder/*", "vae/*"], local_files_only=local_files_only,
        )  # fmt: skip
        dtype = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
        base = StableDiffusionPipeline.from_pretrained(
            base_folder, safety_checker=None, requires_safety_checker=False, local_files_only=True, **dtype
        )
        pipe = cls(base.vae, base.text_encoder, base.tokenizer, base.unet, base.scheduler)
        pipe.feed = feedface.load_sd15_feed_adapter(folder / ADAPTER_FILE, dtype=torch_dtype)
        widths = [block.attn2.to_q.in_features for block in feedface.sd15_sites(pipe.unet).values()]
        if widths != pipe.feed.site_widths:
            raise ValueError(
                f"{base_model}: its UNet's cross-attention sites are {widths} wide, the adapter's {pipe.feed.site_widths}"
            )
        pipe.feed.to(device=pipe.unet.device, dtype=pipe.unet.dtype)
        pipe.feed.attach(pipe.unet)
        pipe.model_info = {
            "method": "feedface-sd15",
            "model": str(pretrained_model_name_or_path),
            "base_model": str(base_model),
            "model_files": {ADAPTER_FILE: folder / ADAPTER_FILE},
        }
        faces = folder / "antelopev2"
        pipe.face_model_dir = Path(face_model_dir) if face_model_dir else (faces if faces.is_dir() else None)
        return pipe

    @torch.no_grad()
    def __call__(
        self,
        faces: Sequence[FaceInput] | FaceInput | None = None,
        *,
        face_tokens: torch.Tensor | None = None,
        prompt: str = "a photo of a person",
        negative_prompt: str | None = None,
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
        """Generate images of the person in ``faces`` (arguments as :class:`FeedFacePipeline`, plus a negative
        prompt; defaults 30 steps of ``"dpm++"``, guidance 6.0, ``feed_scale`` 0.8, the UNet's native size)."""
        settings = self.sampling_settings(
            DEFAULTS, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, scheduler=scheduler,
            height=height, width=width, seed=seed, num_images_per_prompt=num_images_per_prompt,
        )  # fmt: skip
        scale = self.checked_feed_scale(feed_scale, DEFAULTS["feed_scale"])
        if face_mode not in ("cat", "mean"):
            raise ValueError(f"face_mode must be 'cat' or 'mean', got {face_mode!r}")
        check_one_identity(faces, face_tokens, "face_tokens")

        # 1. Face tokens once per call
        crops: list = []
        if face_tokens is None:
            face_tokens, crops = self.encode_faces(faces, face_mode)
        self.feed.set_face_tokens(face_tokens.to(self.unet.device, self.unet.dtype))

        # 2. Adapter on in the conditional rows only: diffusers batches CFG as [negative, positive]
        batch = len(settings.seeds)
        self.feed.set_multiplier([0.0] * batch + [scale] * batch if settings.guidance_scale > 1.0 else scale)
        lora_meta = self.activate_adapters(False, (), None)
        prompt_embeds = encode_text(self.text_encoder, self.tokenizer, [prompt])
        negative = encode_text(self.text_encoder, self.tokenizer, [negative_prompt or ""])
        try:
            output = self.sample(
                prompt_embeds, negative, None, crops, settings, lora_meta=lora_meta, output_type=output_type,
                callback_on_step_end=callback_on_step_end, prompt=prompt, negative_prompt=negative_prompt,
                face_mode=face_mode, feed_scale=scale,
                num_references=len(crops) or int(face_tokens.shape[1] // feedface.FACE_TOKENS),
            )  # fmt: skip
        finally:
            self.feed.set_face_tokens(None)
            self.feed.set_multiplier(scale)
        return output
