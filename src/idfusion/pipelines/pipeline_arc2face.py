"""Arc2FacePipeline: face photo(s) or ArcFace embeddings in, images of that person out."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers.loaders import StableDiffusionLoraLoaderMixin

from ..hub import resolve_model_folder
from ..images import ImageInput
from ..loras import DEFAULT_LCM_LORA, activate_loras
from ..methods import arc2face
from ..outputs import encode_array
from .core import FaceAnalysisNeeds, FaceInput, IdentityPipeline, IdentityPipelineOutput, load_base_components
from .sd15_sampling import sample_sd15

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


#: Components a saved folder may leave to its ``settings.base_model`` (frozen in training: the base's own).
BASE_COMPONENTS = ("vae", "text_encoder", "tokenizer")


class Arc2FacePipeline(IdentityPipeline, StableDiffusionLoraLoaderMixin):
    """Arc2Face generation (SD1.5 UNet + CLIP encoder fine-tuned on ArcFace identity).

    Components: ``vae``, ``text_encoder`` (the Arc2Face encoder), ``tokenizer``, ``unet`` (the Arc2Face UNet),
    ``scheduler`` (DPM-Solver++, the official demo's) and an optional pose ``controlnet``.
    """

    method = "arc2face"
    face_analysis = FaceAnalysisNeeds(recognizer="onnx")
    default_settings = {"num_inference_steps": 25, "guidance_scale": 3.0}
    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["controlnet"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]
    id_embedding_dim = 512

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, controlnet=None):
        super().__init__()
        self.register_modules(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
            controlnet=controlnet,
        )  # fmt: skip

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
        from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        from .scheduling import make_scheduler

        local = Path(pretrained_model_name_or_path).expanduser()
        if (local / "model_index.json").is_file():  # a pipeline saved by save_pretrained
            # a folder may leave components equal to its base's out (the synthetic world's ship only what training
            # changed) and name the base in its settings, as FlashFace's saved folders do
            config = json.loads((local / "model_index.json").read_text(encoding="utf-8"))
            parts = load_base_components(local, config, BASE_COMPONENTS, torch_dtype)
            shared = {k: v for k, v in parts.items() if k not in kwargs}
            pipe = cls.from_saved_folder(local, torch_dtype=torch_dtype, **shared, **kwargs)
            pipe.model_info = {"model": str(pretrained_model_name_or_path)}
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
        # the official demo: DPM-Solver++ from SD1.5's scheduler config
        scheduler = make_scheduler(arc2face.SCHEDULER, _scheduler_config(base_folder))
        controlnet_folder = _local_subfolder(folder, "controlnet")
        controlnet = ControlNetModel.from_pretrained(controlnet_folder, **dtype) if controlnet_folder else None

        pipe = cls(vae, text_encoder, tokenizer, unet, scheduler, controlnet=controlnet)
        pipe.model_info = {
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

    def encode_identity(self, faces: Sequence[FaceInput] | FaceInput) -> dict:
        return {"id_embeds": self.prepare_id_embeds(faces)[0]}

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
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
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
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
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
            generator: diffusers-style ``torch.Generator`` (or one per image) instead of ``seed``.
            num_inference_steps, guidance_scale: default 25, 3.0; with ``lcm``: 2, 1.0.
            scheduler: a sampler name for this call; default ``pipe.scheduler`` (DPM-Solver++, or LCM with ``lcm``).
            height, width: output size (multiples of 8); default the UNet's native size (512 for Arc2Face).
            lcm: use LCM-LoRA (``latent-consistency/lcm-lora-sdv1-5`` or ``lcm_lora``) for 2-4 step sampling.
            controlnet_image: condition image for the release's pose ControlNet.
            loras: ``(file, weight)`` pairs of extra LoRAs.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
            callback_on_step_end, callback_on_step_end_tensor_inputs: diffusers' step callback.

        Returns:
            :class:`IdentityPipelineOutput` with images, per-image metadata and reference crops.
        """
        # 1. Check inputs and fill method defaults
        settings = self.prepare_settings(
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, scheduler=scheduler,
            height=height, width=width, seed=seed, generator=generator, num_images_per_prompt=num_images_per_prompt,
            defaults=arc2face.LCM_DEFAULTS if lcm else None, output_type=output_type,
        )  # fmt: skip
        self.check_callback(callback_on_step_end, callback_on_step_end_tensor_inputs)
        if prompt:
            logger.warning("Arc2Face is conditioned on identity only; the prompt %.80r is not used", prompt)

        # 2. One identity from the faces or embeddings
        identity, references = self.prepare_id_embeds(faces, id_embeds)

        # 3. LoRAs first (their text-encoder parts apply to this call's prompts), then the identity prompt and the
        #    negative prompt, both through the Arc2Face encoder
        lora_meta = activate_loras(self, loras, lcm=lcm, lcm_lora=lcm_lora)
        prompt_embeds = arc2face.arc2face_prompt_embeds(self.text_encoder, self.tokenizer, identity)
        negative = arc2face.encode_text(self.text_encoder, self.tokenizer, [negative_prompt or ""])

        # 4. Sample, and record what it takes to make each image again
        images = sample_sd15(
            self, prompt_embeds.to(self.text_encoder.dtype), negative, settings, controlnet_image=controlnet_image,
            controlnet_conditioning_scale=controlnet_conditioning_scale, output_type=output_type,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=tuple(callback_on_step_end_tensor_inputs),
        )  # fmt: skip
        return self.result(
            images, settings, references, negative_prompt=negative_prompt, lcm=lcm or None,
            lcm_lora=(lcm_lora or DEFAULT_LCM_LORA) if lcm else None, loras=lora_meta or None,
            controlnet_conditioning_scale=controlnet_conditioning_scale if controlnet_image is not None else None,
            id_embeds=encode_array(identity[0].float().cpu().numpy()),
        )  # fmt: skip


def _scheduler_config(base_folder: Path) -> dict:
    from diffusers import PNDMScheduler

    return dict(PNDMScheduler.load_config(base_folder / "scheduler"))
