"""Arc2FacePipeline: face photo(s) or ArcFace embeddings in, images of that person out."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.loaders import StableDiffusionLoraLoaderMixin

from ..hub import resolve_model_folder
from ..images import ImageInput
from ..methods import arc2face
from .common import FaceInput, IdentityPipelineOutput, IdentitySD15Mixin

__all__ = ["Arc2FacePipeline"]

logger = logging.getLogger(__name__)

EXAMPLE = """
    >>> import torch
    >>> from idfusion.pipelines import Arc2FacePipeline
    >>> pipe = Arc2FacePipeline.from_pretrained("FoivosPar/Arc2Face", torch_dtype=torch.float16).to("cuda")
    >>> out = pipe(faces=["me.jpg"], num_images_per_prompt=4, seed=42)
    >>> out.images[0].save("me_0.png")
"""


def _local_subfolder(folder: Path, name: str) -> Path | None:
    candidate = folder / name
    return candidate if candidate.is_dir() else None


class Arc2FacePipeline(IdentitySD15Mixin, DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    """Arc2Face generation (SD1.5 UNet + CLIP encoder fine-tuned on ArcFace identity).

    Components: ``vae``, ``text_encoder`` (the Arc2Face encoder), ``tokenizer``, ``unet`` (the Arc2Face UNet),
    ``scheduler`` and an optional pose ``controlnet``.
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["controlnet"]
    id_embedding_dim = 512

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, controlnet=None):
        super().__init__()
        self.register_modules(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
            controlnet=controlnet,
        )  # fmt: skip
        self.model_info = {"method": "arc2face"}
        self._base_scheduler_config = dict(scheduler.config)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike = arc2face.DEFAULT_MODEL,
        *,
        base_model: str | os.PathLike | None = None,
        face_model_dir: str | os.PathLike | None = None,
        torch_dtype: torch.dtype | None = None,
        local_files_only: bool | None = None,
        **kwargs,
    ) -> Arc2FacePipeline:
        """Load the official release (Hub id or local ``models/`` folder) or a folder saved with ``save_pretrained``.

        Args:
            pretrained_model_name_or_path: ``FoivosPar/Arc2Face`` (default) or a local folder with ``arc2face/``
                and ``encoder/``.
            base_model: the SD1.5 base for VAE, tokenizer and scheduler config. Default: a
                ``stable-diffusion-v1-5/`` folder inside the model folder if there is one, else
                ``stable-diffusion-v1-5/stable-diffusion-v1-5``.
            face_model_dir: folder with ``scrfd_10g_bnkps.onnx`` and ``arcface.onnx``. Default: the model folder's
                ``antelopev2/``, else idfusion's default face-model locations.
            torch_dtype: dtype of every component (float32 when omitted, as diffusers).
            local_files_only: never contact the Hub (also implied by ``HF_HUB_OFFLINE=1``).
        """
        from diffusers import AutoencoderKL, ControlNetModel, PNDMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        local = Path(pretrained_model_name_or_path).expanduser()
        if (local / "model_index.json").is_file():  # a pipeline saved by save_pretrained
            pipe = super().from_pretrained(local, torch_dtype=torch_dtype, **kwargs)
            pipe.model_info = {"method": "arc2face", "model": str(pretrained_model_name_or_path)}
            pipe.face_model_dir = Path(face_model_dir) if face_model_dir else None
            return pipe

        folder = resolve_model_folder(
            pretrained_model_name_or_path,
            required=arc2face.REQUIRED_FILES,
            what="Arc2Face",
            allow_patterns=list(arc2face.DOWNLOAD_PATTERNS),
            local_files_only=local_files_only,
        )
        if base_model is None:
            base_model = _local_subfolder(folder, "stable-diffusion-v1-5") or arc2face.DEFAULT_BASE_MODEL
        base_folder = resolve_model_folder(
            base_model,
            required=arc2face.BASE_REQUIRED_FILES,
            what="Stable Diffusion 1.5 base (VAE, tokenizer and scheduler for Arc2Face)",
            allow_patterns=["vae/*", "tokenizer/*", "scheduler/*"],
            local_files_only=local_files_only,
        )
        dtype = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
        unet = UNet2DConditionModel.from_pretrained(folder / "arc2face", **dtype)
        text_encoder = CLIPTextModel.from_pretrained(folder / "encoder", **dtype)
        vae = AutoencoderKL.from_pretrained(base_folder / "vae", **dtype)
        tokenizer = CLIPTokenizer.from_pretrained(base_folder / "tokenizer")
        base_scheduler = PNDMScheduler.from_pretrained(base_folder / "scheduler")
        controlnet_folder = _local_subfolder(folder, "controlnet")
        controlnet = ControlNetModel.from_pretrained(controlnet_folder, **dtype) if controlnet_folder else None

        pipe = cls(vae, text_encoder, tokenizer, unet, base_scheduler, controlnet=controlnet)
        pipe.model_info = {
            "method": "arc2face",
            "model": str(pretrained_model_name_or_path),
            "base_model": str(base_model),
            "model_files": {
                "arc2face/diffusion_pytorch_model.safetensors": (
                    folder / "arc2face/diffusion_pytorch_model.safetensors"
                ),
            },
        }
        pipe.face_model_dir = Path(face_model_dir) if face_model_dir else _local_subfolder(folder, "antelopev2")
        return pipe

    @torch.no_grad()
    def __call__(
        self,
        faces: Sequence[FaceInput] | FaceInput | None = None,
        *,
        id_embeds: torch.Tensor | np.ndarray | None = None,
        prompt: str | None = None,
        negative_prompt: str | None = None,
        num_images_per_prompt: int = 1,
        seed: int | Sequence[int] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        scheduler: str | None = None,
        height: int | None = None,
        width: int | None = None,
        lcm: bool = False,
        lcm_lora: str | None = None,
        controlnet_image: ImageInput | None = None,
        controlnet_conditioning_scale: float = 1.0,
        loras: Sequence[tuple[str, float]] = (),
        output_type: str = "pil",
        callback_on_step_end=None,
    ) -> IdentityPipelineOutput:
        """Generate images of the person in ``faces`` (or given by ``id_embeds``).

        Args:
            faces: photo(s) of one person (paths, bytes, PIL, arrays or :class:`~idfusion.faces.Face` records with
                512-d ArcFace embeddings). Several photos are averaged into one identity.
            id_embeds: ``(N, 512)`` or ``(512,)`` ArcFace embeddings instead of ``faces``.
            prompt: not used by Arc2Face (the model only knows its template); a warning is logged.
            negative_prompt: encoded with the Arc2Face encoder; defaults to the empty prompt, as the release.
            num_images_per_prompt: images to make (one seed each).
            seed: an int (images get ``seed, seed + 1, ...``), one seed per image, or ``None`` for random seeds.
            num_inference_steps, guidance_scale, scheduler: default 25, 3.0, ``"dpm++"``; with ``lcm``: 2, 1.0,
                ``"lcm"``.
            height, width: output size (multiples of 8); default the UNet's native size (512 for Arc2Face).
            lcm: use LCM-LoRA (``latent-consistency/lcm-lora-sdv1-5`` or ``lcm_lora``) for 2-4 step sampling.
            controlnet_image: condition image for the release's pose ControlNet.
            loras: ``(file, weight)`` pairs of extra LoRAs.

        Returns:
            :class:`IdentityPipelineOutput` with images, per-image metadata and reference crops.
        """
        # 1. Check inputs and fill method defaults
        settings = self.sampling_settings(
            arc2face.LCM_DEFAULTS if lcm else arc2face.DEFAULTS,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, scheduler=scheduler,
            height=height, width=width, seed=seed, num_images_per_prompt=num_images_per_prompt,
        )  # fmt: skip
        if prompt:
            logger.warning("Arc2Face is conditioned on identity only; the prompt %r is not used", prompt)

        # 2. One identity from the faces or embeddings
        identity, references = self.prepare_id_embeds(faces, id_embeds)

        # 3. LoRAs first (their text-encoder parts apply to this call's prompts), then the identity prompt and the
        #    negative prompt, both through the Arc2Face encoder
        lora_meta = self.activate_adapters(lcm, loras, lcm_lora)
        prompt_embeds = arc2face.arc2face_prompt_embeds(self.text_encoder, self.tokenizer, identity)
        negative = arc2face.encode_text(self.text_encoder, self.tokenizer, [negative_prompt or ""])

        # 4. Sample, and record what it takes to make each image again
        return self.sample(
            prompt_embeds.to(self.text_encoder.dtype), negative, identity, references, settings,
            lcm=lcm, lcm_lora=lcm_lora, lora_meta=lora_meta, controlnet_image=controlnet_image,
            controlnet_conditioning_scale=controlnet_conditioning_scale, output_type=output_type,
            callback_on_step_end=callback_on_step_end, negative_prompt=negative_prompt,
        )  # fmt: skip
