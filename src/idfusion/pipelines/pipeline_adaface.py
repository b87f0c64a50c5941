"""AdaFacePipeline: a face in the token space of any SD1.5 model, composed with the user's prompt."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers.loaders import StableDiffusionLoraLoaderMixin

from ..hub import resolve_model_folder
from ..images import ImageInput
from ..loras import DEFAULT_LCM_LORA, activate_loras
from ..methods import adaface
from ..outputs import encode_array
from ..prompt_encoders import encode_arcface_id_prompt, encode_text
from .core import FaceAnalysisNeeds, FaceInput, IdentityPipeline, IdentityPipelineOutput
from .scheduling import make_scheduler
from .sd15_sampling import sample_sd15

__all__ = ["AdaFacePipeline", "DEFAULT_MODEL", "DEFAULT_NEGATIVE_PROMPT"]

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "adaface-neurips/adaface-models"
DEFAULT_BASE_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# Layout of the v2 model repo (the v1 repo keeps the same models/adaface/ folder).
CHECKPOINT_FOLDER = "models/adaface"
ENCODER_FOLDER = "models/arc2face/encoder"
FACE_MODEL_FOLDER = "models/insightface/models/antelopev2"
BASE_FOLDER = "models/stable-diffusion-v1-5"  # an SD1.5 diffusers folder placed in the release (make-tiny does)
BASE_REQUIRED_FILES = (
    "model_index.json",
    "unet/config.json",
    "text_encoder/config.json",
    "tokenizer/vocab.json",
    "vae/config.json",
    "scheduler/scheduler_config.json",
)
# The wrapper's default negative prompt (PuLID-derived).
DEFAULT_PROMPT = "a photo of z"
DEFAULT_NEGATIVE_PROMPT = (
    "flaws in the eyes, flaws in the face, lowres, non-HDRi, low quality, worst quality, artifacts, noise, text, "
    "watermark, glitch, mutated, ugly, disfigured, hands, partially rendered objects, partially rendered eyes, "
    "deformed eyeballs, cross-eyed, blurry, mutation, duplicate, out of frame, cropped, mutilated, bad anatomy, "
    "deformed, bad proportions, nude, naked, nsfw, topless, bare breasts"
)
# The v2 app: DDIM (leading spacing, offset 1, from SD1.5's config), 50 steps, guidance 5.0.
SCHEDULER = "ddim"
DEFAULTS = {"num_inference_steps": 50, "guidance_scale": 5.0}
LCM_DEFAULTS = {"num_inference_steps": 4, "guidance_scale": 1.0, "scheduler": "lcm"}


def _find_checkpoint(folder: Path, checkpoint: str | os.PathLike | None) -> Path:
    if checkpoint is not None and Path(checkpoint).expanduser().is_file():
        return Path(checkpoint).expanduser()
    candidates = sorted((folder / CHECKPOINT_FOLDER).glob("*.pt")) + sorted(
        (folder / CHECKPOINT_FOLDER).glob("*.safetensors")
    )
    if checkpoint is not None:
        candidates = [c for c in candidates if c.name == str(checkpoint)]
    if not candidates:
        from ..errors import ModelFilesError

        wanted = checkpoint or f"{adaface.V2_CHECKPOINT_NAME} (or another AdaFace .pt)"
        raise ModelFilesError(f"{folder / CHECKPOINT_FOLDER}: no AdaFace checkpoint found; expected {wanted}")
    # Names carry the training date: the last in sorted order is the newest.
    return candidates[-1]


class AdaFacePipeline(IdentityPipeline, StableDiffusionLoraLoaderMixin):
    """AdaFace generation on any SD1.5-family base model.

    Components: the base model's ``vae``, ``text_encoder``, ``tokenizer``, ``unet`` and ``scheduler``, and
    ``id_encoder`` (Arc2Face's frozen CLIP encoder, AdaFace's step A). The inverse projector (step B) is
    :attr:`adaface`, read from the official checkpoint.
    """

    method = "adaface"
    face_analysis = FaceAnalysisNeeds(recognizer="onnx")
    default_settings = DEFAULTS
    model_cpu_offload_seq = "id_encoder->text_encoder->unet->vae"
    _optional_components = ["controlnet"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]
    id_embedding_dim = 512

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, id_encoder, controlnet=None):
        super().__init__()
        self.register_modules(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
            id_encoder=id_encoder, controlnet=controlnet,
        )  # fmt: skip
        self.adaface: adaface.AdaFaceCheckpoint | None = None

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike = DEFAULT_MODEL,
        *,
        base_model: str | os.PathLike | None = None,
        checkpoint: str | os.PathLike | None = None,
        face_model_dir: str | os.PathLike | None = None,
        torch_dtype: torch.dtype | None = None,
        local_files_only: bool | None = None,
        **kwargs,
    ) -> AdaFacePipeline:
        """Load the AdaFace release (Hub id or local folder) on an SD1.5 base, or a folder saved with
        ``save_pretrained``.

        Args:
            pretrained_model_name_or_path: ``adaface-neurips/adaface-models`` (default) or a local folder with
                ``models/adaface/*.pt`` and ``models/arc2face/encoder/``.
            base_model: any SD1.5-family diffusers model (Hub id or folder). Default: the release's
                ``models/stable-diffusion-v1-5/`` if present, else ``stable-diffusion-v1-5/stable-diffusion-v1-5``.
            checkpoint: a checkpoint file, or a file name inside ``models/adaface/``; default the newest there.
            face_model_dir: ONNX face models; default the release's ``models/insightface/models/antelopev2``.
            torch_dtype: dtype of every component.
            local_files_only: never contact the Hub (also implied by ``HF_HUB_OFFLINE=1``).
        """
        from diffusers import StableDiffusionPipeline
        from transformers import CLIPTextModel

        dtype = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
        local = Path(pretrained_model_name_or_path).expanduser()
        if (local / "model_index.json").is_file():  # saved by save_pretrained
            pipe = cls.from_saved_folder(local, torch_dtype=torch_dtype, **kwargs)
            pipe.adaface = adaface.load_adaface_checkpoint(_find_checkpoint(local, checkpoint), dtype=torch_dtype)
            pipe.model_info = {"model": str(pretrained_model_name_or_path)}
            pipe.face_model_dir = Path(face_model_dir) if face_model_dir else None
            return pipe

        required = [
            f"{ENCODER_FOLDER}/config.json",
            f"{ENCODER_FOLDER}/pytorch_model.bin|{ENCODER_FOLDER}/model.safetensors",
        ]
        if not local.is_dir():  # a Hub repo: ask for the named (or default) checkpoint
            required.append(f"{CHECKPOINT_FOLDER}/{checkpoint or adaface.V2_CHECKPOINT_NAME}")
        folder = resolve_model_folder(
            pretrained_model_name_or_path,
            required=required,
            what="AdaFace",
            allow_patterns=[*required, f"{FACE_MODEL_FOLDER}/*"],
            local_files_only=local_files_only,
        )
        checkpoint_path = _find_checkpoint(folder, checkpoint)
        if base_model is None:
            base_model = folder / BASE_FOLDER if (folder / BASE_FOLDER).is_dir() else DEFAULT_BASE_MODEL
        base_folder = resolve_model_folder(
            base_model,
            required=BASE_REQUIRED_FILES,
            what="SD1.5 base model for AdaFace",
            allow_patterns=["*.json", "*.txt", "unet/*", "text_encoder/*", "vae/*"],
            local_files_only=local_files_only,
        )
        base = StableDiffusionPipeline.from_pretrained(
            base_folder, safety_checker=None, requires_safety_checker=False, local_files_only=True, **dtype
        )
        id_encoder = CLIPTextModel.from_pretrained(folder / ENCODER_FOLDER, **dtype)
        scheduler = make_scheduler(SCHEDULER, base.scheduler.config)
        pipe = cls(base.vae, base.text_encoder, base.tokenizer, base.unet, scheduler, id_encoder)
        pipe.adaface = adaface.load_adaface_checkpoint(checkpoint_path, dtype=torch_dtype)
        width = base.text_encoder.get_input_embeddings().embedding_dim
        projector_width = pipe.adaface.projector.text_model.embeddings.token_embedding.embedding_dim
        if width != projector_width:
            raise ValueError(
                f"{base_model}: its text encoder is {width} wide, but AdaFace makes {projector_width}-wide token "
                "embeddings; AdaFace needs an SD1.5-family base model"
            )
        pipe.model_info = {
            "model": str(pretrained_model_name_or_path),
            "base_model": str(base_model),
            "adaface_version": pipe.adaface.version,
            "model_files": {f"{CHECKPOINT_FOLDER}/{checkpoint_path.name}": checkpoint_path},
        }
        face_dir = folder / FACE_MODEL_FOLDER
        pipe.face_model_dir = Path(face_model_dir) if face_model_dir else (face_dir if face_dir.is_dir() else None)
        return pipe

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """The components as a diffusers folder, plus the AdaFace checkpoint in ``models/adaface/``."""
        super().save_pretrained(save_directory, **kwargs)
        target = Path(save_directory) / CHECKPOINT_FOLDER
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy2(self.adaface.path, target / self.adaface.path.name)

    def to(self, *args, **kwargs):
        """Move the pipeline; the projector (not a diffusers component) follows the id encoder's device and dtype."""
        result = super().to(*args, **kwargs)
        if self.adaface is not None:
            self.adaface.projector.to(device=self.id_encoder.device, dtype=self.id_encoder.dtype)
        return result

    # ---- AdaFace steps ---------------------------------------------------------------------------------------

    def ada_embeddings(self, identity: torch.Tensor, id_scale: float = 1.0) -> torch.Tensor:
        """``(1, 512)`` unit ArcFace embedding to ``(1, N_ID, D)`` ada embeddings (steps A and B, then ID-CFG)."""
        checkpoint = self.adaface
        n_id = checkpoint.num_id_tokens
        start = adaface.ID_TOKEN_START
        # A. Arc2Face encoder rows 4..4+N_ID-1 of "photo of a id person" (causal: length 22 is enough)
        id_prompt = encode_arcface_id_prompt(
            self.id_encoder, self.tokenizer, identity, max_length=adaface.ID_PROMPT_MAX_LENGTH
        )[:, start : start + n_id]
        # B. the inverse projector, on the template "photo of a , , , ..."
        projector = checkpoint.projector
        template = adaface.adaface_template_ids(self.tokenizer, checkpoint.template_num_commas)
        weight = projector.text_model.embeddings.token_embedding.weight
        ada = projector(id_prompt.to(device=weight.device, dtype=weight.dtype), template)
        if id_scale != 1.0:
            ada = projector.apply_id_cfg(ada, id_scale)
        return ada

    def install_subject_tokens(self, ada: torch.Tensor) -> list[str]:
        """Give the subject tokens (``z_1_0 ... z_1_15``) the ada embeddings as token-embedding rows.

        The tokens are added to the base tokenizer and text encoder once; their rows are rewritten per identity.
        Position embeddings are added later by the base text encoder, as for any token.
        """
        tokens = self.adaface.subject_tokens
        missing = [t for t in tokens if t not in self.tokenizer.get_vocab()]
        if missing:
            self.tokenizer.add_tokens(missing)
            self.text_encoder.resize_token_embeddings(len(self.tokenizer))
        ids = self.tokenizer.convert_tokens_to_ids(tokens)
        table = self.text_encoder.get_input_embeddings().weight
        table.data[ids] = ada[0].to(device=table.device, dtype=table.dtype)
        return tokens

    def compose_prompt(self, prompt: str, tokens: Sequence[str]) -> str:
        composed = adaface.compose_prompt(prompt, tokens, self.adaface.version, subject=self.adaface.subject_string)
        length = len(self.tokenizer(composed).input_ids)
        if length > self.tokenizer.model_max_length:
            raise ValueError(
                f"the prompt is {length} tokens with AdaFace's {len(tokens)} subject tokens; the limit is "
                f"{self.tokenizer.model_max_length}. Shorten the prompt (the subject tokens must not be cut off)."
            )
        return composed

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
        id_scale: float = 1.0,
        style=None,
        style_weight: float | None = None,
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
        """Generate images of the person in ``faces`` following ``prompt``.

        Args:
            faces: photo(s) of one person, or :class:`~idfusion.faces.Face` records with 512-d ArcFace embeddings.
            id_embeds: ``(N, 512)`` or ``(512,)`` ArcFace embeddings instead of ``faces``.
            prompt: any text; the subject is ``z`` (default ``"a photo of z"``). The subject tokens are appended (v2)
                or put in place of ``z`` (v1).
            negative_prompt: default the release's (PuLID-derived) list.
            id_scale: AdaFace's ID-CFG scale ``s``: ``s * X_ada + (1 - s) * PAD``; 1 (default) leaves the
                identity as the projector made it, above 1 strengthens it.
            style, style_weight: a portrait style (:mod:`idfusion.styles`): its prompt template, filled with
                ``prompt`` (default subject ``z``), and its LoRA.
            num_inference_steps, guidance_scale: default 50, 5.0 (the v2 app); ``pipe.scheduler`` is DDIM.
            lcm: LCM-LoRA sampling (4 steps, guidance 1.0, as the AdaFace wrapper's ``use_lcm``).
            controlnet_image, loras, height, width, seed, generator, output_type, callback_on_step_end: as in the
                other pipelines.
        """
        # 1. Check inputs and fill method defaults
        if self.adaface is None:
            raise RuntimeError("no AdaFace checkpoint loaded; use AdaFacePipeline.from_pretrained")
        settings = self.prepare_settings(
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, scheduler=scheduler,
            height=height, width=width, seed=seed, generator=generator, num_images_per_prompt=num_images_per_prompt,
            defaults=LCM_DEFAULTS if lcm else None, output_type=output_type,
        )  # fmt: skip
        self.check_callback(callback_on_step_end, callback_on_step_end_tensor_inputs)
        if not np.isfinite(id_scale):
            raise ValueError(f"id_scale must be a finite number, got {id_scale}")
        loras = list(loras)
        text, styled = prompt if prompt is not None else DEFAULT_PROMPT, {}
        if style is not None:
            from ..styles import apply_style

            applied = apply_style(style, prompt, negative_prompt, style_weight=style_weight, subject="z")
            text, negative_prompt, styled = applied.prompt, applied.negative_prompt, applied.metadata
            loras = ([applied.lora] if applied.lora else []) + loras
        elif style_weight is not None:
            raise ValueError("style_weight needs a style")
        negative_prompt = DEFAULT_NEGATIVE_PROMPT if negative_prompt is None else negative_prompt

        # 2. One identity, then its ada embeddings in the base text encoder's token table
        identity, references = self.prepare_id_embeds(faces, id_embeds)
        ada = self.ada_embeddings(identity.to(self.id_encoder.device), id_scale)
        tokens = self.install_subject_tokens(ada)
        composed = self.compose_prompt(text, tokens)

        # 3. LoRAs first (their text-encoder parts apply to this call's prompts), then encode with the base model's
        #    own text encoder
        lora_meta = activate_loras(self, loras, lcm=lcm, lcm_lora=lcm_lora)
        if styled.get("style_weight") is not None:
            lora_meta = lora_meta[1:]  # the style brings its own LoRA back on replay: not recorded twice
        prompt_embeds = encode_text(self.text_encoder, self.tokenizer, [composed])
        negative = encode_text(self.text_encoder, self.tokenizer, [negative_prompt])

        # 4. Sample, and record what it takes to make each image again
        images = sample_sd15(
            self, prompt_embeds, negative, settings, controlnet_image=controlnet_image,
            controlnet_conditioning_scale=controlnet_conditioning_scale, output_type=output_type,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=tuple(callback_on_step_end_tensor_inputs),
        )  # fmt: skip
        return self.result(
            images, settings, references, **styled, prompt=prompt, composed_prompt=composed,
            negative_prompt=negative_prompt, id_scale=id_scale, lcm=lcm or None,
            lcm_lora=(lcm_lora or DEFAULT_LCM_LORA) if lcm else None, loras=lora_meta or None,
            controlnet_conditioning_scale=controlnet_conditioning_scale if controlnet_image is not None else None,
            id_embeds=encode_array(identity[0].float().cpu().numpy()),
        )  # fmt: skip
