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

from ..hub import SD15_PIPELINE_FILES, SD15_REPO, resolve_model_folder
from ..images import ImageInput
from ..loras import DEFAULT_LCM_LORA, activate_loras
from ..methods import adaface
from ..outputs import encode_array
from ..prompt_encoders import encode_arcface_id_prompt, encode_text, inject_token_embeddings
from .core import FaceAnalysisNeeds, FaceInput, IdentityPipeline, IdentityPipelineOutput
from .scheduling import make_scheduler
from .sd15_sampling import sample_sd15

__all__ = ["AdaFacePipeline", "DEFAULT_MODEL", "DEFAULT_NEGATIVE_PROMPT"]

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "adaface-neurips/adaface-models"
DEFAULT_BASE_MODEL = SD15_REPO
# Layout of the v2 model repo (the v1 repo keeps the same models/adaface/ folder).
CHECKPOINT_FOLDER = "models/adaface"
ENCODER_FOLDER = "models/arc2face/encoder"
FACE_MODEL_FOLDER = "models/insightface/models/antelopev2"
BASE_FOLDER = "models/stable-diffusion-v1-5"  # an SD1.5 diffusers folder placed in the release (make-tiny does)
BASE_REQUIRED_FILES = SD15_PIPELINE_FILES
# The wrapper's default negative prompt (PuLID-derived).
DEFAULT_PROMPT = "a photo of z"
CONSISTENTID_SCALE = 6.0  # the release's ID-CFG scale of the ConsistentID branch (its Arc2Face branch: 1)
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
        self.consistentid = None  # the v2 ConsistentID branch (methods.adaface_consistentid), when its files are there

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
            pipe.consistentid = _load_consistentid(local, pipe, torch_dtype, local_files_only=True)
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
            # the ConsistentID branch's files too (v2 joint checkpoints use them)
            allow_patterns=[
                *(pattern for alternatives in required for pattern in alternatives.split("|")),  # "a|b": fetch both
                f"{FACE_MODEL_FOLDER}/*",
                "ConsistentID/models/*",
                "models/insightface/models/buffalo_l/*",
            ],
            local_files_only=local_files_only,
        )
        checkpoint_path = _find_checkpoint(folder, checkpoint)
        if base_model is None:
            base_model = folder / BASE_FOLDER if (folder / BASE_FOLDER).is_dir() else DEFAULT_BASE_MODEL
            if base_model == DEFAULT_BASE_MODEL:
                logger.warning(
                    "AdaFace on plain SD1.5: the release samples (and was trained) on SD1.5 with DreamShaper-8's text "
                    "encoder and the MSE VAE, which gives better likeness; see the README's AdaFace notes, and pass "
                    "base_model="
                )
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
        pipe.consistentid = _load_consistentid(folder, pipe, torch_dtype, local_files_only=local_files_only)
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
        """The components as a diffusers folder, plus the AdaFace checkpoint in ``models/adaface/`` and the
        ConsistentID branch's files in the release's layout."""
        super().save_pretrained(save_directory, **kwargs)
        target = Path(save_directory) / CHECKPOINT_FOLDER
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy2(self.adaface.path, target / self.adaface.path.name)
        for source, relative in getattr(self, "_consistentid_files", {}).items():
            destination = Path(save_directory) / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            if Path(source).is_dir():
                shutil.copytree(source, destination, dirs_exist_ok=True)
            else:
                shutil.copy2(source, destination)

    def to(self, *args, **kwargs):
        """Move the pipeline; the projectors and the ConsistentID branch (not diffusers components) follow the id
        encoder's device and dtype."""
        result = super().to(*args, **kwargs)
        if self.adaface is not None:
            self.adaface.projector.to(device=self.id_encoder.device, dtype=self.id_encoder.dtype)
        if self.consistentid is not None:
            self.consistentid.to(device=self.id_encoder.device, dtype=self.id_encoder.dtype)
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

    def _subject_tokenizer(self, tokens: Sequence[str]):
        """A copy of the base tokenizer that knows the subject tokens (``z_1_0`` ...), so a composed prompt tokenizes
        as the release's does; the pipeline's own tokenizer and text encoder are never changed."""
        cached = getattr(self, "_subject_tokenizer_cache", None)
        if cached is None or not set(tokens) <= set(cached.get_vocab()):
            import copy

            cached = copy.deepcopy(self.tokenizer)
            cached.add_tokens([t for t in tokens if t not in cached.get_vocab()])
            self._subject_tokenizer_cache = cached
        return cached

    def encode_composed(self, composed: str, tokens: Sequence[str], ada: torch.Tensor) -> torch.Tensor:
        """``(1, 77, D)`` base text embeddings of a composed prompt whose subject tokens carry the ada embeddings:
        the rows enter through :func:`~idfusion.prompt_encoders.inject_token_embeddings` (position embeddings are
        added by the text encoder as for any token)."""
        tokenizer = self._subject_tokenizer(tokens)
        ids = tokenizer(
            [composed], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids  # fmt: skip
        subject_ids = tokenizer.convert_tokens_to_ids(list(tokens))
        mask = torch.isin(ids, torch.tensor(subject_ids))
        if int(mask.sum()) == 0:
            raise ValueError("the composed prompt holds no subject token (the prompt was cut off before them)")
        row = {token_id: index for index, token_id in enumerate(subject_ids)}
        vectors = ada[0][[row[int(i)] for i in ids[mask]]]  # (count, D), in prompt order
        safe_ids = ids.masked_fill(mask, tokenizer.pad_token_id or 0)  # ids the base table has; rows replaced
        with inject_token_embeddings(self.text_encoder, mask, vectors):
            return self.text_encoder(safe_ids.to(self.text_encoder.device))[0]

    def compose_prompt(self, prompt: str, groups: Sequence[Sequence[str]]) -> str:
        composed = adaface.compose_prompt(prompt, groups, self.adaface.version, subject=self.adaface.subject_string)
        tokens = [t for group in groups for t in group]
        length = len(self._subject_tokenizer(tokens)(composed).input_ids)
        if length > self.tokenizer.model_max_length:
            raise ValueError(
                f"the prompt is {length} tokens with AdaFace's {len(tokens)} subject tokens; the limit is "
                f"{self.tokenizer.model_max_length}. Shorten the prompt (the subject tokens must not be cut off)."
            )
        return composed

    def official_id_embeds(self, faces: Sequence[FaceInput] | FaceInput) -> np.ndarray:
        """``(N, 512)`` unit embeddings of the photos found the release's way
        (:class:`~idfusion.methods.adaface.OfficialFaceEmbedder` on the antelopev2 models)."""
        from ..errors import NoFaceError
        from ..faces.onnx_backend import resolve_onnx_model_dir
        from ..faces.types import split_face_photo
        from ..images import load_image

        embedder = getattr(self, "_official_embedder", None)
        if embedder is None:
            embedder = adaface.OfficialFaceEmbedder.antelopev2(resolve_onnx_model_dir(self.face_model_dir))
            self._official_embedder = embedder
        rows = []
        for item in faces if isinstance(faces, (list, tuple)) else [faces]:
            image, index = split_face_photo(item)
            loaded = load_image(image)
            embedding = embedder.embed(loaded.array, name=loaded.name, index=index)
            if embedding is None:
                raise NoFaceError(loaded.name, "no face found by SCRFD on the release's padded 512 image")
            rows.append(embedding)
        return np.stack(rows)

    def encode_identity(self, faces: Sequence[FaceInput] | FaceInput) -> dict:
        if self.consistentid is not None:  # the joint branch reads the photos themselves (CLIP features, parsing)
            return {"faces": faces}
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
        arc2face_only: bool = False,
        consistentid_scale: float | None = None,
        face_preprocessing: str = "idfusion",
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
            id_scale: AdaFace's ID-CFG scale ``s`` of the Arc2Face branch: ``s * X_ada + (1 - s) * PAD``; 1
                (default, the release's) leaves the identity as the projector made it, above 1 strengthens it.
            arc2face_only: v2 joint checkpoints run both encoders by default, as the release: the ConsistentID
                branch's 4 subject tokens, then Arc2Face's 16. ``True`` uses the Arc2Face branch alone.
            consistentid_scale: the ConsistentID branch's ID-CFG scale (default 6, the release's).
            face_preprocessing: how the Arc2Face branch finds each photo's face. ``"idfusion"`` (default): the
                analyzer's largest face by true box area, on the photo itself. ``"official"``: the release's rule,
                the photo padded to a black square and resized to 512, SCRFD there, and its choice of face (the
                release's "largest" key ``(x2 - x1) * y2 - y1``, which favours faces lower in the photo).
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

        # 2. One identity, then the subject-token embeddings: Arc2Face's branch, after ConsistentID's for a joint
        #    checkpoint (the release's order: z_0_0..z_0_3, z_1_0..z_1_15)
        joint = self.consistentid is not None and not arc2face_only
        if joint and faces is None:  # an embedding alone cannot feed ConsistentID's CLIP and parsing inputs
            logger.warning(
                "AdaFace: id_embeds without the photos run the Arc2Face branch only (the ConsistentID branch needs "
                "the photos themselves); pass faces for the release's joint encoder"
            )
            joint = False
        if face_preprocessing not in ("idfusion", "official"):
            raise ValueError(f"face_preprocessing must be 'idfusion' or 'official', got {face_preprocessing!r}")
        if face_preprocessing == "official" and faces is not None:
            id_embeds, faces_for_identity = self.official_id_embeds(faces), None
        else:
            faces_for_identity = faces
        identity, references = self.prepare_id_embeds(faces_for_identity, id_embeds)
        ada = self.ada_embeddings(identity.to(self.id_encoder.device), id_scale)
        if joint:
            from ..faces.types import split_face_photo
            from ..images import load_image
            from ..methods.adaface_consistentid import joint_subject_embeddings

            # The ConsistentID branch detects its own face in each photo (the largest), as the release does.
            photos = [
                load_image(split_face_photo(f)[0]).array
                for f in (faces if isinstance(faces, (list, tuple)) else [faces])
            ]
            branch = self.consistentid(photos, id_cfg_scale=consistentid_scale)
            ada = joint_subject_embeddings(branch.to(ada), ada)
        groups = self.adaface.joint_subject_tokens(consistentid=joint)
        tokens = [t for group in groups for t in group]
        composed = self.compose_prompt(text, groups)

        # 3. LoRAs first (their text-encoder parts apply to this call's prompts), then encode with the base model's
        #    own text encoder
        lora_meta = activate_loras(self, loras, lcm=lcm, lcm_lora=lcm_lora)
        if styled.get("style_weight") is not None:
            lora_meta = lora_meta[1:]  # the style brings its own LoRA back on replay: not recorded twice
        prompt_embeds = self.encode_composed(composed, tokens, ada)
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
            negative_prompt=negative_prompt, id_scale=id_scale,
            encoders=["consistentID", "arc2face"] if joint else ["arc2face"],
            arc2face_only=None if joint else True,  # replayed as recorded, whichever files a later load finds
            face_preprocessing=face_preprocessing if face_preprocessing != "idfusion" else None,
            consistentid_scale=(consistentid_scale or CONSISTENTID_SCALE) if joint else None, lcm=lcm or None,
            lcm_lora=(lcm_lora or DEFAULT_LCM_LORA) if lcm else None, loras=lora_meta or None,
            controlnet_conditioning_scale=controlnet_conditioning_scale if controlnet_image is not None else None,
            # the whole identity only without the ConsistentID branch (which reads the photos): --from replays it
            id_embeds=None if joint else encode_array(identity[0].float().cpu().numpy()),
        )  # fmt: skip


def _load_consistentid(folder: Path, pipe: AdaFacePipeline, dtype, *, local_files_only: bool | None):
    """The v2 checkpoint's ConsistentID branch from the release folder (``ConsistentID/models/ConsistentID-v1.bin``,
    ``models/insightface/models/buffalo_l``, CLIP-ViT-H-14 in ``models/laion/...`` or from the Hub), or ``None`` with
    a warning when a file is missing (then only the Arc2Face branch runs, and images differ from the release's)."""
    from ..errors import ModelFilesError
    from ..methods import adaface_consistentid as cid

    checkpoint = pipe.adaface
    if not checkpoint.has_consistentid:
        return None
    weights, faces = folder / cid.CONSISTENTID_WEIGHTS_FILE, folder / cid.BUFFALO_L_FOLDER
    clip = folder / "models" / cid.CLIP_VIT_H_REPO
    try:
        if not weights.is_file() or not faces.is_dir():
            raise ModelFilesError(f"{weights} and {faces}/ are needed")
        if not clip.is_dir():
            clip = resolve_model_folder(
                cid.CLIP_VIT_H_REPO, required=["config.json"], what="CLIP-ViT-H-14 (AdaFace's ConsistentID branch)",
                allow_patterns=["*.json", "*.safetensors"], local_files_only=local_files_only,
            )  # fmt: skip
        encoder = cid.ConsistentIDEncoder.from_files(
            checkpoint.consistentid_projector, pipe.tokenizer, consistentid_weights=weights, clip_vision_folder=clip,
            buffalo_l_folder=faces, dtype=dtype,
        )  # fmt: skip
    except ModelFilesError as error:
        logger.warning(
            "AdaFace: this v2 checkpoint has a ConsistentID branch, but its files cannot be loaded (%s); running the "
            "Arc2Face branch alone, so images differ from the release's", error,
        )  # fmt: skip
        return None
    pipe._consistentid_files = {
        weights: cid.CONSISTENTID_WEIGHTS_FILE,
        faces: cid.BUFFALO_L_FOLDER,
        clip: f"models/{cid.CLIP_VIT_H_REPO}",
    }
    return encoder.eval()
