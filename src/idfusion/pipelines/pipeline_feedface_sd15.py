"""FeedFaceSD15Pipeline: the FeedFace adapter on an SD1.5-family UNet (the paper's U-Net claim).

There are no official weights for this variant: an adapter comes from training (``feedface_sd15.safetensors``,
written by :func:`~idfusion.methods.feedface.save_sd15_feed_adapter`). Identity enters as in the U-ViT release: CLIP
ViT-B/32 face tokens, computed once per call, feed a zero-initialised adapter block at each of the 16
cross-attention sites, on in the conditional branch at ``feed_scale`` and off in the unconditional one.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..hub import SD15_REPO, resolve_model_folder
from ..methods import feedface
from ..prompt_encoders import encode_text
from .core import (
    FaceInput,
    IdentityInputError,
    IdentityPipeline,
    IdentityPipelineOutput,
    check_one_identity,
    load_base_components,
)
from .sd15_sampling import sample_sd15

__all__ = ["FeedFaceSD15Pipeline", "ADAPTER_FILE", "DEFAULTS"]

logger = logging.getLogger(__name__)

ADAPTER_FILE = "feedface_sd15.safetensors"
DEFAULT_BASE_MODEL = SD15_REPO
#: SD1.5's usual sampling; the adapter multiplier as the U-ViT release's.
DEFAULTS = {"num_inference_steps": 30, "guidance_scale": 6.0, "feed_scale": 0.8}
SCHEDULER = "dpm++"
BASE_REQUIRED_FILES = ("model_index.json", "unet/config.json", "text_encoder/config.json", "vae/config.json")
#: Components a saved folder may leave to its ``settings.base_model`` (frozen in training: the base's own).
BASE_COMPONENTS = ("vae", "text_encoder", "tokenizer", "unet")


class FeedFaceSD15Pipeline(IdentityPipeline):
    """FeedFace on SD1.5: components ``vae``, ``text_encoder``, ``tokenizer``, ``unet``, ``scheduler`` and ``feed``
    (an :class:`~idfusion.methods.feedface.SD15FeedAdapter` whose processors wrap the UNet's ``attn2``)."""

    method = "feedface-sd15"
    default_settings = {k: DEFAULTS[k] for k in ("num_inference_steps", "guidance_scale")}
    model_cpu_offload_seq = "text_encoder->unet->vae"
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, feed):
        super().__init__()
        widths = [block.attn2.to_q.in_features for block in feedface.sd15_sites(unet).values()]
        if widths != feed.site_widths:
            raise ValueError(f"the UNet's cross-attention sites are {widths} wide, the adapter's {feed.site_widths}")
        self.register_modules(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler, feed=feed
        )
        feed.attach(unet)

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
        """Load a trained SD1.5 feed adapter (a folder with ``feedface_sd15.safetensors``) on an SD1.5 base, or a
        folder saved by :meth:`save_pretrained`.

        Args:
            pretrained_model_name_or_path: the adapter folder (or Hub repo). No official one exists.
            base_model: any SD1.5-family diffusers model; default the folder's ``stable-diffusion-v1-5/``, else
                ``stable-diffusion-v1-5/stable-diffusion-v1-5``.
        """
        from diffusers import StableDiffusionPipeline

        from .scheduling import make_scheduler

        dtype = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
        local = Path(pretrained_model_name_or_path).expanduser()
        if (local / "model_index.json").is_file():  # saved by save_pretrained
            config = json.loads((local / "model_index.json").read_text(encoding="utf-8"))
            shared = {
                k: v
                for k, v in load_base_components(local, config, BASE_COMPONENTS, torch_dtype).items()
                if k not in kwargs
            }
            pipe = cls.from_saved_folder(local, torch_dtype=torch_dtype, **shared, **kwargs)
            pipe.model_info = {"model": str(pretrained_model_name_or_path)}
            base = (config.get("settings") or {}).get("base_model")
            if shared and base:
                pipe.model_info = {**pipe.model_info, "base_model": str((local / base).resolve())}
            pipe.face_model_dir = Path(face_model_dir) if face_model_dir else None
            return pipe
        folder = resolve_model_folder(
            pretrained_model_name_or_path, required=[ADAPTER_FILE], what="FeedFace SD1.5 adapter (no official "
            "weights exist: train one, or write a tiny one with `idfusion make-tiny --method feedface-sd15`)",
            local_files_only=local_files_only,
        )  # fmt: skip
        if base_model is None:
            base_folder = folder / "stable-diffusion-v1-5"
            base_model = base_folder if base_folder.is_dir() else DEFAULT_BASE_MODEL
        base_folder = resolve_model_folder(
            base_model, required=BASE_REQUIRED_FILES, what="SD1.5 base model for FeedFace",
            allow_patterns=["*.json", "*.txt", "unet/*", "text_encoder/*", "vae/*"], local_files_only=local_files_only,
        )  # fmt: skip
        base = StableDiffusionPipeline.from_pretrained(
            base_folder, safety_checker=None, requires_safety_checker=False, local_files_only=True, **dtype
        )
        feed = feedface.load_sd15_feed_adapter(folder / ADAPTER_FILE, dtype=torch_dtype)
        try:
            scheduler = make_scheduler(SCHEDULER, base.scheduler.config)
            pipe = cls(base.vae, base.text_encoder, base.tokenizer, base.unet, scheduler, feed)
        except ValueError as error:
            raise ValueError(f"{base_model}: {error}") from None
        pipe.model_info = {
            "model": str(pretrained_model_name_or_path),
            "base_model": str(base_model),
            "model_files": {ADAPTER_FILE: folder / ADAPTER_FILE},
        }
        faces = folder / "antelopev2"
        pipe.face_model_dir = Path(face_model_dir) if face_model_dir else (faces if faces.is_dir() else None)
        return pipe

    def encode_faces(self, faces: Sequence[FaceInput] | FaceInput, mode: str = "cat") -> tuple[torch.Tensor, list]:
        """Face tokens of one generation and the release's 224 crops (as the U-ViT release makes them)."""
        if not isinstance(faces, (list, tuple)):
            faces = [faces]
        if not faces:
            raise IdentityInputError("faces is empty: give at least one face photo")
        crops = [feedface.face_crop(image, face.bbox) for image, face in self.photo_faces(faces)]
        return feedface.encode_face_crops(self.feed, crops, mode), crops

    def encode_identity(self, faces: Sequence[FaceInput] | FaceInput) -> dict:
        return {"face_tokens": self.encode_faces(faces)[0]}

    @torch.no_grad()
    def __call__(
        self,
        faces: Sequence[FaceInput] | FaceInput | None = None,
        *,
        face_tokens: torch.Tensor | None = None,
        prompt: str | None = None,
        negative_prompt: str | None = None,
        face_mode: str = "cat",
        feed_scale: float | None = None,
        num_images_per_prompt: int = 1,
        seed: int | Sequence[int] | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        scheduler: str | None = None,
        height: int | None = None,
        width: int | None = None,
        output_type: str = "pil",
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> IdentityPipelineOutput:
        """Generate images of the person in ``faces`` (arguments as :class:`FeedFacePipeline`, plus a negative
        prompt; defaults 30 steps of ``pipe.scheduler`` (DPM-Solver++), guidance 6.0, ``feed_scale`` 0.8, the UNet's
        native size)."""
        settings = self.prepare_settings(
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, scheduler=scheduler,
            height=height, width=width, seed=seed, generator=generator, num_images_per_prompt=num_images_per_prompt,
            output_type=output_type,
        )  # fmt: skip
        self.check_callback(callback_on_step_end, callback_on_step_end_tensor_inputs)
        scale = DEFAULTS["feed_scale"] if feed_scale is None else float(feed_scale)
        if not np.isfinite(scale):
            raise ValueError(f"feed_scale must be a finite number, got {feed_scale}")
        if face_mode not in feedface.FACE_MODES:
            raise ValueError(
                f"face_mode: the face mode must be one of {', '.join(feedface.FACE_MODES)}, got {face_mode!r}"
            )
        check_one_identity(faces, face_tokens, "face_tokens")

        # 1. Face tokens once per call
        crops: list = []
        if face_tokens is None:
            face_tokens, crops = self.encode_faces(faces, face_mode)

        # 2. Adapter on in the conditional rows only: diffusers batches CFG as [negative, positive]
        batch = settings.batch_size
        self.feed.set_face_tokens(face_tokens.to(self.unet.device, self.unet.dtype))
        self.feed.set_multiplier([0.0] * batch + [scale] * batch if settings.guidance_scale > 1.0 else scale)
        text = prompt or "a photo of a person"
        prompt_embeds = encode_text(self.text_encoder, self.tokenizer, [text])
        negative = encode_text(self.text_encoder, self.tokenizer, [negative_prompt or ""])
        try:
            images = sample_sd15(
                self, prompt_embeds, negative, settings, output_type=output_type,
                callback_on_step_end=callback_on_step_end,
                callback_on_step_end_tensor_inputs=tuple(callback_on_step_end_tensor_inputs),
            )  # fmt: skip
        finally:
            self.feed.set_face_tokens(None)
            self.feed.set_multiplier(scale)
        return self.result(
            images, settings, crops, prompt=prompt, negative_prompt=negative_prompt, face_mode=face_mode,
            feed_scale=scale, num_references=len(crops) or int(face_tokens.shape[1] // feedface.FACE_TOKENS),
        )  # fmt: skip
