"""FeedFacePipeline: FeedFace on UniDiffuser-v1 (U-ViT), face photo(s) + prompt in, images of that person out.

The base is diffusers' :class:`~diffusers.UniDiffuserModel` loaded from the official files
(:mod:`idfusion.convert.feedface`); identity enters through the feed adapter
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

from ..hub import resolve_model_folder
from ..methods import feedface
from .core import FaceInput, IdentityInputError, IdentityPipeline, IdentityPipelineOutput, check_one_identity

__all__ = ["FeedFacePipeline", "MODEL_ID", "TEXT_ENCODER_ID"]

logger = logging.getLogger(__name__)

MODEL_ID = "Xiang-cd/FeedFace"
#: The release takes its text encoder from the Hub.
TEXT_ENCODER_ID = "openai/clip-vit-large-patch14"
MODELS_FOLDER = "models"


class FeedFacePipeline(IdentityPipeline):
    """FeedFace text-to-image on UniDiffuser-v1.

    Components: ``vae``, ``text_encoder`` (CLIP ViT-L/14), ``tokenizer``, ``text_decoder`` (UniDiffuser's caption
    decoder; only its prefix encoder 768 -> 64 runs), ``unet`` (the U-ViT), ``scheduler`` and ``feed``, the feed
    adapter (:class:`~idfusion.methods.feedface.FeedAdapter`: CLIP ViT-B/32 face encoder and 14 adapter blocks),
    hooked on the U-ViT while it is part of the pipeline.
    """

    method = "feedface"
    default_settings = {k: feedface.DEFAULTS[k] for k in ("num_inference_steps", "guidance_scale")}
    model_cpu_offload_seq = "text_encoder->text_decoder->unet->vae"

    def __init__(self, vae, text_encoder, tokenizer, text_decoder, unet, scheduler, feed):
        super().__init__()
        width = unet.config.num_attention_heads * unet.config.attention_head_dim
        if feed.dim != width:
            raise ValueError(f"the feed adapter is {feed.dim} wide, the U-ViT {width}")
        self.register_modules(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, text_decoder=text_decoder, unet=unet,
            scheduler=scheduler, feed=feed,
        )  # fmt: skip
        feed.attach(unet)

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
        from transformers import CLIPTextModel, CLIPTokenizer

        from ..convert import feedface as ckpt

        local = Path(pretrained_model_name_or_path).expanduser()
        if (local / "model_index.json").is_file():  # saved by save_pretrained
            dtype = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
            pipe = cls.from_saved_folder(local, torch_dtype=torch_dtype, **kwargs)
            pipe.model_info = {"model": str(pretrained_model_name_or_path)}
            pipe.face_model_dir = Path(face_model_dir) if face_model_dir else None
            return pipe

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
        from .scheduling import make_scheduler

        scheduler = make_scheduler(feedface.SCHEDULER, feedface.SCHEDULER_CONFIG)
        feed = feedface.load_feed_adapter(models / feedface.FEED_FILE, dtype=torch_dtype)
        pipe = cls(vae, encoder, tokenizer, text_decoder, unet, scheduler, feed)
        pipe.model_info = {
            "model": str(pretrained_model_name_or_path),
            "text_encoder": str(text_encoder),
            "model_files": {f"{MODELS_FOLDER}/{feedface.FEED_FILE}": models / feedface.FEED_FILE},
        }
        faces = folder / "antelopev2"
        pipe.face_model_dir = Path(face_model_dir) if face_model_dir else (faces if faces.is_dir() else None)
        return pipe

    # ---- faces -----------------------------------------------------------------------------------------------

    def encode_faces(self, faces: Sequence[FaceInput] | FaceInput, mode: str = "cat") -> tuple[torch.Tensor, list]:
        """Face tokens of one generation (:func:`~idfusion.methods.feedface.encode_face_crops`) and the release's
        224 crops (a square of 1.1x the largest face's box, no alignment)."""
        if not isinstance(faces, (list, tuple)):
            faces = [faces]
        if not faces:
            raise IdentityInputError("faces is empty: give at least one face photo")
        crops = [feedface.face_crop(image, face.bbox) for image, face in self.photo_faces(faces)]
        return feedface.encode_face_crops(self.feed, crops, mode), crops

    def encode_identity(self, faces: Sequence[FaceInput] | FaceInput) -> dict:
        return {"face_tokens": self.encode_faces(faces)[0]}

    # ---- conditioning ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """CLIP ViT-L/14 ``last_hidden_state`` → the caption decoder's prefix encoder: ``(1, 77, 64)``."""
        from ..prompt_encoders import tokenize_prompts

        ids = tokenize_prompts(self.tokenizer, [prompt]).to(self.text_encoder.device)
        hidden = self.text_encoder(ids)[0]
        return self.text_decoder.encode(hidden.to(self.text_decoder.dtype))

    # ---- call ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        faces: Sequence[FaceInput] | FaceInput | None = None,
        *,
        face_tokens: torch.Tensor | None = None,
        prompt: str | None = None,
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
        """Generate images of the person in ``faces``.

        Args:
            faces: 1-5 photos of one person (``"cat"``), or photos to blend (``"mean"``); the largest face of each.
            face_tokens: :meth:`encode_faces` output instead of ``faces``.
            prompt: the text prompt (FeedFace has no negative prompt: the unconditional branch is UniDiffuser's).
            face_mode: ``"cat"`` (default) or ``"mean"``.
            feed_scale: the adapter multiplier in the conditional branch (default 0.8; 0 = the bare U-ViT).
            num_images_per_prompt: images to make (one seed each).
            seed, generator: an int (images get ``seed, seed + 1, ...``), one seed per image, or generators.
            num_inference_steps, guidance_scale: default 40, 6.0 (the release's ``c + 5 (c - u)``); the sampler is
                ``pipe.scheduler``, the release's own DPM-Solver++ "fast" order 3 (``"feedface-dpm"``): 40 model
                evaluations, the U-ViT given the release's fractional times, ending at ``t = 1/1000``.
            height, width: output size (multiples of 8; default 512, the U-ViT's trained size).
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"`` (the VAE latents of the image part).
            callback_on_step_end, callback_on_step_end_tensor_inputs: diffusers' step callback; ``"latents"`` is
                the joint state ``(B, 4hw + 512)``.

        Returns:
            :class:`IdentityPipelineOutput` with images, per-image metadata and the face crops.
        """
        # 1. Check inputs and fill the release's defaults
        settings = self.prepare_settings(
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, scheduler=scheduler,
            height=height, width=width, seed=seed, generator=generator, num_images_per_prompt=num_images_per_prompt,
            output_type=output_type,
        )  # fmt: skip
        self.check_callback(callback_on_step_end, callback_on_step_end_tensor_inputs)
        scale = feedface.DEFAULTS["feed_scale"] if feed_scale is None else float(feed_scale)
        if not np.isfinite(scale):
            raise ValueError(f"feed_scale must be a finite number, got {feed_scale}")
        if face_mode not in feedface.FACE_MODES:
            raise ValueError(
                f"face_mode: the face mode must be one of {', '.join(feedface.FACE_MODES)}, got {face_mode!r}"
            )

        # 2. Conditioning, once per call: face tokens, the prompt's 64-d text tokens
        check_one_identity(faces, face_tokens, "face_tokens")
        crops: list = []
        if face_tokens is None:
            face_tokens, crops = self.encode_faces(faces, face_mode)
        text = self.encode_prompt(prompt or "a photo of a person").to(self.unet.dtype)

        # 3. Joint sampling of [VAE latent | CLIP image embedding], one generator per image
        self.feed.set_face_tokens(face_tokens.to(self.unet.device, self.unet.dtype))
        try:
            latents = self.sample_joint(
                text, scale, settings, callback_on_step_end, tuple(callback_on_step_end_tensor_inputs)
            )
        finally:
            self.feed.set_face_tokens(None)
        images = self.decode_latents(latents, output_type)
        self.maybe_free_model_hooks()
        return self.result(
            images, settings, crops, prompt=prompt, face_mode=face_mode, feed_scale=scale,
            num_references=len(crops) or int(face_tokens.shape[1] // feedface.FACE_TOKENS),
        )  # fmt: skip

    def sample_joint(
        self,
        text: torch.Tensor,
        scale: float,
        settings,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: tuple[str, ...] = ("latents",),
    ) -> torch.Tensor:
        """UniDiffuser text-to-image with the release's guidance; returns the final VAE latents ``(B, 4, h, w)``.

        The conditional branch sees the prompt (text timestep 0) with the adapter at ``scale``; the unconditional
        one Gaussian noise as text at text timestep T with the adapter off. The loop is written here because
        diffusers' ``UniDiffuserPipeline`` needs components text-to-image never runs (a CLIP image encoder, the GPT-2
        tokenizer) and cannot switch the adapter per branch.
        """
        device, dtype = self.unet.device, self.unet.dtype
        batch = settings.batch_size
        shape = (4, settings.height // 8, settings.width // 8)
        clip_dim = self.unet.config.clip_img_dim
        generators = settings.generators
        z = torch.stack([torch.randn(shape, generator=g) for g in generators])
        clip = torch.stack([torch.randn((1, clip_dim), generator=g) for g in generators])
        # the sampler's state stays float32 (as the release keeps it); the U-ViT gets its own dtype
        latents = torch.cat([z.flatten(1), clip.flatten(1)], dim=1).to(device, torch.float32)  # (B, 4hw + 512)
        sampler = settings.scheduler
        sampler.set_timesteps(settings.steps, device=device)
        latents = latents * sampler.init_noise_sigma
        text = text.expand(batch, -1, -1)
        max_timestep = sampler.config.num_train_timesteps
        numel = int(np.prod(shape))
        try:
            for i, t in enumerate(self.progress_bar(sampler.timesteps)):
                state = latents.to(dtype)
                z_in = state[:, :numel].view(batch, *shape)  # (B, 4hw + 512) -> (B, 4, h, w) and (B, 1, 512)
                clip_in = state[:, numel:].view(batch, 1, clip_dim)
                self.feed.set_multiplier(scale)
                z_c, clip_c, _ = self.unet(
                    z_in, clip_in, text, timestep_img=t, timestep_text=0, data_type=feedface.DATA_TYPE
                )
                out = torch.cat([z_c.flatten(1), clip_c.flatten(1)], dim=1).float()
                if settings.guidance_scale > 1.0:
                    # the release's unconditional branch: adapter off, Gaussian text at text timestep T
                    noise_text = torch.stack([torch.randn(text.shape[1:], generator=g) for g in generators])
                    self.feed.set_multiplier(0.0)
                    z_u, clip_u, _ = self.unet(
                        z_in, clip_in, noise_text.to(device, dtype), timestep_img=t, timestep_text=max_timestep,
                        data_type=feedface.DATA_TYPE,
                    )  # fmt: skip
                    uncond = torch.cat([z_u.flatten(1), clip_u.flatten(1)], dim=1).float()
                    out = settings.guidance_scale * out + (1.0 - settings.guidance_scale) * uncond
                latents = sampler.step(out, t, latents).prev_sample
                latents = self.step_end(
                    callback_on_step_end, callback_on_step_end_tensor_inputs, i, t, {"latents": latents}
                )["latents"]
        finally:
            self.feed.set_multiplier(scale)
        return latents[:, :numel].view(batch, *shape)
