"""``arc2face``: train Arc2Face (Papantoniou et al., ECCV 2024): an SD1.5 UNet and CLIP text encoder (the "ID
encoder") fine-tuned on ArcFace identity prompts.

The release has no training code (Arc2Face issue #3); this follows the paper's recipe as the spec records it (§1.6):

- both the text encoder and the UNet are fully fine-tuned (``train_text_encoder: false`` freezes the encoder); the
  VAE and the face recognizer stay frozen;
- the conditioning is the inference one (:func:`idfusion.prompt_encoders.encode_arcface_id_prompt`): the image's
  L2-normalised 512-d identity embedding, zero-padded to the encoder's width, replaces the token embedding of ``id``
  in ``"photo of a id person"``; the encoder's ``last_hidden_state`` is the UNet's ``encoder_hidden_states``.
  Captions are not used (the release is overfitted to the template, issues #6 and #18);
- the loss is the MSE of the base model's prediction type (SD1.5: epsilon) under its training noise schedule
  (``DDPMScheduler`` from its scheduler config), on VAE latents times the VAE's scaling factor;
- condition dropout (our choice where the paper is silent; a third-party reading says the condition was dropped to
  the empty prompt): with probability ``id_dropout`` (default 0.1, SD1.5's text dropout) a sample's prompt is
  ``""`` through the same, trainable encoder, which is exactly the negative the pipeline's guidance uses.

Identity embeddings are computed once, before training, from each record's largest face (its 5 landmarks and box)
with the recognizer the config names: ``onnx`` (ArcFace, ``arcface.onnx`` of the antelopev2 pack, as the release
conditions on; ``face_model_dir`` says where) for photos, ``world`` for the synthetic world's sets. A record without
landmarks runs the pipeline's own face analysis (``detector``) instead. They are cached in ``embedding_cache``
(default ``<output_dir>/embeddings``), keyed by image file, face and recognizer, so a resumed or repeated run does
not embed again (:func:`cached_identity_embeddings`). The embedding is of the unflipped image: with
``random_flip`` the target may be mirrored, which identity recognizers are trained to ignore.

Where to start (``pretrained``): an SD1.5 diffusers folder (the paper's start; its text encoder must be at least 512
wide), the release's local ``models/`` layout (``arc2face/`` + ``encoder/``; VAE, tokenizer and scheduler from
``base_model``, default its ``stable-diffusion-v1-5/``) to fine-tune further, or a folder saved by this recipe.

Options of our own, all off by default (the release's recipe), which the synthetic world's plan
(:mod:`idfusion.world.plans.arc2face`) uses because its base's text encoder is 32 wide: ``id_encoder`` builds a new
ID encoder of the given CLIPTextConfig fields (e.g. 512 wide) and rebuilds the UNet's cross-attention key/value
projections for its width; ``template_vocabulary`` cuts the tokenizer to the template's BPE merges (a ~530-row
token table); ``encoder_lr_scale`` gives the encoder and those projections a larger learning rate;
``face_loss_weight`` weights the latent cells on the face (record masks, else boxes) by ``1 + w``.

``save()`` writes an :class:`~idfusion.pipelines.Arc2FacePipeline` folder (``save_pretrained``: ``unet`` =
the Arc2Face UNet, ``text_encoder`` = the ID encoder, VAE, tokenizer, DPM-Solver++ from the base's scheduler config
as the official demo samples). ``registry.load_pipeline("arc2face", folder)`` and
``idfusion generate --method arc2face --model OUTPUT/model`` load it.

Example config::

    recipe:
      name: arc2face
      pretrained: runs/sd15            # any SD1.5 diffusers folder
      recognizer: onnx
      face_model_dir: models/antelopev2
    data:
      train: data/train.jsonl          # idfusion records with faces (idfusion prepare writes landmarks)
      resolution: 512
    train:
      max_steps: 47000
      batch_size: 32
      learning_rate: 1.0e-6            # stage 2 of the paper, as third parties report it
    output_dir: runs/arc2face
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from ..config import ConfigError, ConfigFieldError, between, existing_folder, non_negative, positive, setting
from ..data import (
    AUGMENT_STREAM,
    CONDITION_STREAM,
    NOISE_STREAM,
    DataError,
    ImageCaptionDataset,
    ImageRecord,
    read_records,
    sample_seed,
)
from ..recipe import Recipe, RecipeConfig

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["Arc2FaceConfig", "Arc2FaceDataset", "Arc2FaceRecipe", "cached_identity_embeddings"]

logger = logging.getLogger(__name__)

ID_DIM = 512  # ArcFace's embedding width


@dataclass
class Arc2FaceConfig(RecipeConfig):
    name: str = "arc2face"
    # an SD1.5 diffusers folder, the release's models/ layout, or a folder this recipe saved (required)
    pretrained: Path | None = setting(None, check=existing_folder)
    base_model: Path | None = setting(None, check=existing_folder)  # SD1.5 base of a release folder
    recognizer: Literal["onnx", "world"] = "onnx"  # 512-d identity embeddings (never the world judge)
    detector: Literal["auto", "onnx", "world", "hog", "mmod"] = "auto"  # for records without landmarks
    face_model_dir: Path | None = setting(None, check=existing_folder)  # ONNX face models (antelopev2)
    embedding_cache: Path | None = None  # default <output_dir>/embeddings
    id_dropout: float = setting(0.1, check=between(0, 1))
    train_text_encoder: bool = True
    # Our options for a base whose text encoder is narrower than the embedding (the synthetic world's, 32 wide), all
    # off by default. id_encoder: CLIPTextConfig fields over the pretrained encoder's config (e.g. hidden_size: 512):
    # a new, randomly initialised ID encoder of that width, and the UNet's cross-attention key/value projections
    # rebuilt (randomly initialised) for it, every other UNet weight kept
    id_encoder: dict[str, Any] = setting(factory=dict)
    # with id_encoder: the tokenizer cut to the byte tokens and the BPE merges of the template, so the new token
    # table has ~530 rows instead of 49,408 (every text still tokenizes, into bytes at worst)
    template_vocabulary: bool = False
    # learning rate of the ID encoder (and the rebuilt projections) over train.learning_rate (the UNet's)
    encoder_lr_scale: float = setting(1.0, check=positive)
    # the loss weight of latent cells on the face is 1 + this (the records' face masks, else their face boxes),
    # normalised so the mean weight is 1; identity lives in a small part of the image
    face_loss_weight: float = setting(0.0, check=non_negative)
    classic_attention: bool = True  # CPU: diffusers' classic attention in the UNet (faster backward)
    scheduler: str = "dpm++"  # the saved folder's sampler (the official demo's)
    validation_samples: int = setting(2, check=positive)  # training faces shown, each with a generation
    validation_inference_steps: int = setting(25, check=positive)
    validation_seed: int = setting(0, check=non_negative)

    def __post_init__(self) -> None:
        if self.pretrained is None:
            raise ConfigFieldError(
                "pretrained", "missing: an SD1.5 diffusers folder or an Arc2Face folder to start from (required)"
            )
        if _layout(self.pretrained) is None:
            raise ConfigFieldError(
                "pretrained",
                f"{self.pretrained}: neither a diffusers pipeline folder (model_index.json) nor the Arc2Face "
                "release's layout (arc2face/ and encoder/)",
            )
        if _layout(self.pretrained) == "release" and self.base_model is None:
            if not (self.pretrained / "stable-diffusion-v1-5" / "vae").is_dir():
                raise ConfigFieldError(
                    "base_model",
                    f"missing: the release folder {self.pretrained} has no stable-diffusion-v1-5/; name the SD1.5 "
                    "base that gives the VAE, tokenizer and scheduler",
                )
        if self.template_vocabulary and not self.id_encoder:
            raise ConfigFieldError("template_vocabulary", "needs id_encoder (a new token table to match it)")
        if self.base_model is not None and not (self.base_model / "vae").is_dir():
            raise ConfigFieldError("base_model", f"not an SD1.5 diffusers folder (no vae/): {self.base_model}")


def _layout(folder: Path) -> str | None:
    """``"release"`` (arc2face/ + encoder/), ``"pipeline"`` (a diffusers folder) or None."""
    if (folder / "arc2face").is_dir() and (folder / "encoder").is_dir():
        return "release"
    if (folder / "model_index.json").is_file():
        return "pipeline"
    return None


# --------------------------------------------------------------------------------------------------------------------
# Identity embeddings, computed once and cached
# --------------------------------------------------------------------------------------------------------------------


def _largest_face(record: ImageRecord) -> Any:
    return max(record.faces, key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]))


def _cache_key(record: ImageRecord, recognizer: str) -> str:
    """What an embedding depends on: the image file (path, size, mtime), the face and the recognizer."""
    stat = record.image.stat()
    face = _largest_face(record)
    return json.dumps([str(record.image), stat.st_size, stat.st_mtime_ns, face.bbox, face.landmarks, recognizer])


def cached_identity_embeddings(
    records: Sequence[ImageRecord],
    embed: Callable[[ImageRecord], np.ndarray],
    recognizer: str,
    cache_dir: Path,
) -> np.ndarray:
    """``(N, D)`` float32 identity embeddings of ``records`` (one face each), read from ``cache_dir`` where present.

    Args:
        records: records with at least one face.
        embed: computes one record's embedding (called only for records not in the cache).
        recognizer: the recognizer's name (part of the cache key and of the cache file's name).
        cache_dir: the cache folder; ``<recognizer>.safetensors`` there holds the embeddings and their keys and is
            rewritten (atomically) when new ones were computed.
    """
    from safetensors import safe_open
    from safetensors.torch import save

    from ...atomic import atomic_write_bytes

    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in recognizer)
    path = cache_dir / f"{slug}.safetensors"
    known: dict[str, np.ndarray] = {}
    if path.is_file():
        with safe_open(path, framework="pt") as f:
            keys = json.loads(f.metadata()["keys"])
            rows = f.get_tensor("embeddings").numpy()
        known = dict(zip(keys, rows, strict=True))
    keys = [_cache_key(r, recognizer) for r in records]
    missing = [n for n, key in enumerate(keys) if key not in known]
    if missing:
        logger.info("arc2face: embedding %d of %d faces with %s", len(missing), len(records), recognizer)
        for n in missing:
            known[keys[n]] = np.asarray(embed(records[n]), dtype=np.float32).reshape(-1)
        stored = sorted(known)
        table = torch.from_numpy(np.stack([known[k] for k in stored]))
        atomic_write_bytes(path, save({"embeddings": table}, metadata={"keys": json.dumps(stored)}))
    return np.stack([known[key] for key in keys]).astype(np.float32)


def _embedder(options: Arc2FaceConfig) -> tuple[Callable[[ImageRecord], np.ndarray], str]:
    """``(embed(record), recognizer name)`` for the config's recognizer: a record's largest face at its landmarks,
    or, without landmarks, the pipeline's face analysis of the whole image."""
    from ...errors import IdfusionError
    from ...faces import FaceAnalyzer
    from ...images import load_image

    detector = options.detector
    if detector == "auto":
        detector = "world" if options.recognizer == "world" else "onnx"
    try:
        analyzer = FaceAnalyzer(detector, options.recognizer, model_dir=options.face_model_dir, crops=())
    except (OSError, ValueError, IdfusionError) as error:
        raise ConfigError(f"recipe.recognizer: cannot build the {options.recognizer} face models: {error}") from None
    recognizer = analyzer.recognizer

    def embed(record: ImageRecord) -> np.ndarray:
        try:
            image = load_image(record.image).array
            face = _largest_face(record)
            if face.landmarks is None:
                return analyzer.get(image, name=str(record.image)).embedding
            landmarks = np.asarray(face.landmarks, np.float32)[None]  # (1, 5, 2)
            return recognizer.embed(image, landmarks, np.asarray(face.bbox, np.float32)[None])[0]
        except Exception as error:  # one message naming the record, whatever the backend raised
            raise DataError(f"{record.source}: faces: cannot embed the face of {record.image}: {error}") from error

    return embed, recognizer.name


class Arc2FaceDataset(ImageCaptionDataset):
    """Training images with the identity embedding of their face, and the condition dropout drawn per sample.

    ``dataset[(index, seed)]`` gives ``pixel_values`` ``(3, R, R)`` in [-1, 1], ``id_embeds`` ``(512,)`` (the
    cached embedding, not normalised), ``drop_id`` (the prompt is ``""`` for this sample), ``index``, ``seed`` and,
    with ``face_masks``, ``face_mask`` ``(1, R, R)`` (cropped and flipped as the image).
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        embeddings: np.ndarray,
        resolution: int,
        *,
        id_dropout: float = 0.0,
        center_crop: bool = True,
        random_flip: bool = False,
        face_masks: bool = False,
    ):
        super().__init__(records, resolution, center_crop=center_crop, random_flip=random_flip)
        if embeddings.shape != (len(records), ID_DIM):
            raise ValueError(f"expected ({len(records)}, {ID_DIM}) embeddings, got {embeddings.shape}")
        self.embeddings = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32))
        self.id_dropout, self.face_masks = id_dropout, face_masks

    def face_mask(self, index: int, seed: int) -> np.ndarray:
        """The ``(R, R)`` float face mask in [0, 1] of record ``index`` (its mask file, else its largest face box),
        resized, cropped and flipped as :meth:`load` does the image."""
        from PIL import Image

        record = self.records[index]
        if record.mask is not None:
            mask = (
                Image.open(record.mask).convert("L").resize((record.width, record.height), Image.Resampling.BILINEAR)
            )
        else:
            mask = Image.new("L", (record.width, record.height))
            mask.paste(255, tuple(int(round(v)) for v in _largest_face(record).bbox))
        crop_x, crop_y, flip = np.random.default_rng(sample_seed(seed, AUGMENT_STREAM)).random(3)  # as load()
        size = self.resolution
        scale = size / min(mask.size)
        mask = mask.resize((max(size, round(mask.width * scale)), max(size, round(mask.height * scale))))
        if self.center_crop:
            left, top = (mask.width - size) // 2, (mask.height - size) // 2
        else:
            left, top = int(crop_x * (mask.width - size + 1)), int(crop_y * (mask.height - size + 1))
        weights = np.asarray(mask.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
        if self.random_flip and flip < 0.5:
            weights = weights[:, ::-1]
        return np.ascontiguousarray(weights)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = key if isinstance(key, tuple) else (key, key)
        index, seed = int(index), int(seed)
        pixels, _ = self.load(index, seed)
        drop = bool(np.random.default_rng(sample_seed(seed, CONDITION_STREAM)).random() < self.id_dropout)
        item = {
            "pixel_values": torch.from_numpy(pixels).permute(2, 0, 1).float().div(127.5).sub(1.0),
            "id_embeds": self.embeddings[index],
            "drop_id": drop,
            "index": index,
            "seed": seed,
        }
        if self.face_masks:
            item["face_mask"] = torch.from_numpy(self.face_mask(index, seed))[None]  # (1, R, R)
        return item


def _collate(items: list[dict[str, Any]], *, prompt_ids: torch.Tensor, empty_ids: torch.Tensor) -> dict[str, Any]:
    """Stack a batch; each sample's prompt ids are the template's, or the empty prompt's when its id is dropped."""
    drop = torch.tensor([item["drop_id"] for item in items])
    input_ids = torch.where(drop[:, None], empty_ids[None], prompt_ids[None])  # (B, L)
    return {
        "pixel_values": torch.stack([item["pixel_values"] for item in items]),
        "id_embeds": torch.stack([item["id_embeds"] for item in items]),  # (B, 512)
        "input_ids": input_ids,
        "drop_id": drop,
        **({"face_masks": torch.stack([item["face_mask"] for item in items])} if "face_mask" in items[0] else {}),
        "seeds": [item["seed"] for item in items],
    }


# --------------------------------------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------------------------------------


def _unet_for_context(unet: Any, width: int) -> tuple[Any, list[torch.nn.Parameter]]:
    """``unet`` with ``cross_attention_dim = width``: every weight copied but the cross-attention key and value
    projections (``attn2.to_k``/``to_v``), which are new (diffusers' initialisation); returns them too."""
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    wider = UNet2DConditionModel.from_config({**config, "cross_attention_dim": width})
    new = (".attn2.to_k.", ".attn2.to_v.")
    state = {k: v for k, v in unet.state_dict().items() if not any(part in k for part in new)}
    missing, unexpected = wider.load_state_dict(state, strict=False)
    if unexpected or not missing or not all(any(part in k for part in new) for k in missing):
        raise ConfigError(
            f"recipe.id_encoder: cannot rebuild this UNet's cross-attention ({missing[:3]}, {unexpected[:3]})"
        )
    parameters = dict(wider.named_parameters())
    return wider, [parameters[k] for k in missing]


def template_tokenizer(source: Path, text: str, folder: Path) -> Any:
    """The CLIP BPE tokenizer in the folder ``source`` cut to the tokens ``text`` needs, written to ``folder`` and
    loaded from it.

    The vocabulary keeps CLIP's layout: the 256 byte characters, the same with ``</w>``, one token per merge that
    CLIP's BPE applies to the words of ``text`` (in rank order, so those words tokenize exactly as before), then
    ``<|startoftext|>`` and ``<|endoftext|>`` (EOS the largest id, as CLIP's argmax pooling expects).
    """
    import gzip

    import regex
    from transformers import CLIPTokenizer

    from ...clip_tokenizer import BPE_FILE_NAME, bytes_to_unicode, save_clip_tokenizer

    tokenizer = CLIPTokenizer.from_pretrained(source)
    try:
        lines = (source / "merges.txt").read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise ConfigError(f"recipe.template_vocabulary: the tokenizer's merges.txt is not readable: {error}") from None
    merges = [line for line in lines if line and not line.startswith("#version")]
    ranks = {tuple(line.split()): rank for rank, line in enumerate(merges)}
    byte_chars = bytes_to_unicode()
    pattern = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    used: set[int] = set()
    for word in regex.findall(pattern, text.lower()):
        chars = [byte_chars[b] for b in word.encode("utf-8")]
        pieces = (*chars[:-1], chars[-1] + "</w>")
        while len(pieces) > 1:  # CLIP's bpe(): the lowest-ranked pair present, every occurrence, left to right
            pairs = list(zip(pieces[:-1], pieces[1:], strict=True))
            best = min(pairs, key=lambda pair: ranks.get(pair, len(ranks)))
            if best not in ranks:
                break
            used.add(ranks[best])
            merged, i = [], 0
            while i < len(pieces):
                if i < len(pieces) - 1 and (pieces[i], pieces[i + 1]) == best:
                    merged.append(pieces[i] + pieces[i + 1])
                    i += 2
                else:
                    merged.append(pieces[i])
                    i += 1
            pieces = tuple(merged)
    bpe = folder / BPE_FILE_NAME
    with open(bpe, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
        kept = [merges[rank] for rank in sorted(used)]
        f.write(("\n".join(['"bpe_simple_vocab_16e6.txt#version: 0.2', *kept]) + "\n").encode("utf-8"))
    save_clip_tokenizer(folder / "tokenizer", model_max_length=tokenizer.model_max_length, bpe_path=bpe)
    reduced = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    if reduced.tokenize(text) != tokenizer.tokenize(text):
        raise ConfigError(f"recipe.template_vocabulary: the cut tokenizer does not tokenize {text!r} as the original")
    return reduced


def _scheduler_config(folder: Path) -> dict[str, Any]:
    path = folder / "scheduler" / "scheduler_config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConfigError(f"recipe.pretrained: cannot read the scheduler config {path}: {error}") from None


class Arc2FaceRecipe(Recipe):
    name = "arc2face"
    config_class = Arc2FaceConfig

    @classmethod
    def default_config(cls) -> dict[str, Any]:
        return {"train": {"learning_rate": 1e-5, "max_grad_norm": 1.0}}

    # -- build -----------------------------------------------------------------------------------------------------

    def build_dataset(self) -> Arc2FaceDataset:
        data, options = self.config.data, self.options
        records = read_records(data.train, check_files=data.check_files)
        usable = [r for r in records if r.faces]
        if not usable:
            raise DataError("arc2face: no training record has a face (the 'faces' field)")
        if len(usable) < len(records):
            logger.info("arc2face: %d of %d records used (with a face)", len(usable), len(records))
        cache = options.embedding_cache or self.config.output_dir / "embeddings"
        # the main process embeds and writes the cache; the others then read it
        with self.accelerator.main_process_first():
            embed, recognizer = _embedder(options)
            embeddings = cached_identity_embeddings(usable, embed, recognizer, cache)
        if embeddings.shape[1] != ID_DIM:
            raise ConfigError(
                f"recipe.recognizer: {recognizer} gives {embeddings.shape[1]}-d embeddings, not {ID_DIM}"
            )
        return Arc2FaceDataset(
            usable,
            embeddings,
            data.resolution,
            id_dropout=options.id_dropout,
            center_crop=data.center_crop,
            random_flip=data.random_flip,
            face_masks=options.face_loss_weight > 0,
        )

    def _load(self) -> tuple[Any, Any, Any, Any, dict[str, Any]]:
        """``(unet, text_encoder, vae, tokenizer, scheduler config)`` from ``pretrained``."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        folder = self.options.pretrained
        if _layout(folder) == "release":
            base = self.options.base_model or folder / "stable-diffusion-v1-5"
            unet = UNet2DConditionModel.from_pretrained(folder / "arc2face")
            text_encoder = CLIPTextModel.from_pretrained(folder / "encoder")
        else:
            base = folder
            unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
            text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
        vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
        self.tokenizer_folder = base / "tokenizer"
        tokenizer = CLIPTokenizer.from_pretrained(self.tokenizer_folder)
        return unet, text_encoder, vae, tokenizer, _scheduler_config(base)

    def build(self) -> dict[str, torch.nn.Module]:
        from diffusers import DDPMScheduler
        from diffusers.models.attention_processor import AttnProcessor

        from ...pipelines.scheduling import make_scheduler
        from ...prompt_encoders import ARC2FACE_PLACEHOLDER, ARC2FACE_PROMPT

        options = self.options
        self.unet, self.text_encoder, self.vae, self.tokenizer, scheduler_config = self._load()
        self.rebuilt: list[torch.nn.Parameter] = []  # the UNet's new cross-attention projections
        if options.id_encoder:
            self._new_id_encoder()
        width = self.text_encoder.get_input_embeddings().embedding_dim
        if width < ID_DIM:
            raise ConfigError(
                f"recipe.pretrained: {options.pretrained}: the text encoder is {width} wide; the {ID_DIM}-d identity "
                "embedding is zero-padded into its token width, so it must be at least that wide"
            )
        if self.unet.config.cross_attention_dim != self.text_encoder.config.hidden_size:
            raise ConfigError(
                f"recipe.pretrained: the UNet's cross_attention_dim ({self.unet.config.cross_attention_dim}) is not "
                f"the text encoder's width ({self.text_encoder.config.hidden_size})"
            )
        config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
        self.noise_scheduler = DDPMScheduler.from_config(config)
        self.inference_scheduler = make_scheduler(options.scheduler, config)
        if self.noise_scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError(
                f"recipe.pretrained: unsupported prediction type {self.noise_scheduler.config.prediction_type!r}"
            )

        # the template's ids and its one placeholder position, and the empty prompt's (the dropped condition)
        tokenize = functools.partial(
            self.tokenizer, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        )  # fmt: skip
        self.prompt_ids = tokenize([ARC2FACE_PROMPT]).input_ids[0]  # (L,)
        self.empty_ids = tokenize([""]).input_ids[0]
        (self.placeholder_id,) = self.tokenizer(ARC2FACE_PLACEHOLDER, add_special_tokens=False).input_ids
        if int((self.prompt_ids == self.placeholder_id).sum()) != 1:
            raise ConfigError(f"recipe.pretrained: the tokenizer does not map {ARC2FACE_PLACEHOLDER!r} to one token")

        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        size = self.config.data.resolution
        self.latent_shape = (self.vae.config.latent_channels, size // factor, size // factor)
        device = self.accelerator.device
        if options.classic_attention and device.type == "cpu":
            # torch's fused attention backward is ~10x its forward on a CPU at these head sizes (train_base)
            self.unet.set_attn_processor(AttnProcessor())
        # frozen models stay float32 and run under autocast: the saved copy is the loaded one
        self.vae.requires_grad_(False).eval().to(device)
        self.unet.train()
        models = {"unet": self.unet}
        if options.train_text_encoder:
            self.text_encoder.train()
            models["text_encoder"] = self.text_encoder
        else:
            self.text_encoder.requires_grad_(False).eval().to(device)
        return models

    def _new_id_encoder(self) -> None:
        """A new ID encoder from ``id_encoder`` (and the template vocabulary), and the UNet's cross-attention
        key/value projections rebuilt for its width."""
        import tempfile

        from transformers import CLIPTextConfig, CLIPTextModel

        options = self.options
        known = set(CLIPTextConfig().to_dict())
        unknown = sorted(set(options.id_encoder) - known)
        if unknown:
            raise ConfigError(f"recipe.id_encoder: unknown CLIPTextConfig fields {unknown}")
        if options.template_vocabulary:
            from ...prompt_encoders import ARC2FACE_PROMPT

            with tempfile.TemporaryDirectory(prefix="idfusion-arc2face-tokenizer-") as folder:
                self.tokenizer = template_tokenizer(self.tokenizer_folder, ARC2FACE_PROMPT, Path(folder))
        config = {k: v for k, v in self.text_encoder.config.to_dict().items() if k in known}
        config.update(options.id_encoder)
        if options.template_vocabulary:
            config["vocab_size"] = len(self.tokenizer)
        self.text_encoder = CLIPTextModel(CLIPTextConfig(**config))  # seeded: the core set the run's seed
        width = self.text_encoder.config.hidden_size
        if width != self.unet.config.cross_attention_dim:
            self.unet, self.rebuilt = _unet_for_context(self.unet, width)
        logger.info(
            "arc2face: a new %d-wide ID encoder (%d tokens); %d UNet cross-attention projections rebuilt",
            width, config["vocab_size"], len(self.rebuilt),
        )  # fmt: skip

    def parameters(self, models: dict[str, torch.nn.Module]) -> list[dict[str, Any]]:
        scale = self.options.encoder_lr_scale
        fast = {id(p) for p in self.rebuilt}
        if "text_encoder" in models:
            fast |= {id(p) for p in models["text_encoder"].parameters()}
        every = [p for model in models.values() for p in model.parameters() if p.requires_grad]
        if scale == 1.0 or not fast:
            return [{"params": every}]
        lr = self.config.train.learning_rate
        return [
            {"params": [p for p in every if id(p) not in fast]},
            {"params": [p for p in every if id(p) in fast], "lr": lr * scale},
        ]

    def collator(self) -> Any:
        return functools.partial(_collate, prompt_ids=self.prompt_ids, empty_ids=self.empty_ids)

    # -- loss ------------------------------------------------------------------------------------------------------

    def _text_encoder(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        """``(callable, bare)`` text encoder: the prepared one (DDP syncs what its forward reaches) and its module."""
        if "text_encoder" in self.models:
            return self.models["text_encoder"], self.unwrap("text_encoder")
        return self.text_encoder, self.text_encoder

    def encode(self, input_ids: torch.Tensor, id_embeds: torch.Tensor) -> torch.Tensor:
        """``(B, L, D)`` prompt embeddings: the identity at the placeholder of every row that has it (the others,
        the empty prompt, are encoded as text), as :func:`~idfusion.prompt_encoders.encode_arcface_id_prompt`."""
        from ...prompt_encoders import inject_token_embeddings, normalize_id_embeds

        encoder, bare = self._text_encoder()
        mask = input_ids == self.placeholder_id  # (B, L), one position in each identity row
        rows = mask.any(dim=1)
        width = bare.get_input_embeddings().embedding_dim
        vectors = F.pad(normalize_id_embeds(id_embeds[rows]), (0, width - ID_DIM))  # (n, 512) -> (n, D)
        with inject_token_embeddings(bare, mask, vectors):
            return encoder(input_ids.to(self.accelerator.device))[0]

    def _normal(self, generators: list[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
        """One standard-normal draw of ``shape`` per sample, each from its sample's generator."""
        return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(self.accelerator.device)

    def loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        device = self.accelerator.device
        generators = [torch.Generator().manual_seed(sample_seed(s, NOISE_STREAM)) for s in batch["seeds"]]
        eps = self._normal(generators, self.latent_shape)
        noise = self._normal(generators, self.latent_shape)
        num_timesteps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.stack([torch.randint(0, num_timesteps, (), generator=g) for g in generators]).to(device)
        with torch.no_grad(), self.accelerator.autocast():
            posterior = self.vae.encode(batch["pixel_values"]).latent_dist
            latents = ((posterior.mean + posterior.std * eps) * self.vae.config.scaling_factor).float()
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        with self.accelerator.autocast():
            context = self.encode(batch["input_ids"], batch["id_embeds"])
            prediction = self.models["unet"](noisy, timesteps, context).sample
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        if self.options.face_loss_weight == 0:
            return {"loss": F.mse_loss(prediction.float(), target.float())}
        face = F.adaptive_avg_pool2d(batch["face_masks"].to(device), self.latent_shape[1:])  # (B, 1, h, w)
        weights = 1.0 + self.options.face_loss_weight * face
        error = (prediction.float() - target.float()).pow(2)  # (B, C, h, w)
        loss = (weights * error).sum() / (weights.sum() * error.shape[1])
        return {"loss": loss, "mse": error.mean().detach()}

    # -- validate and save -----------------------------------------------------------------------------------------

    def _pipeline(self, unet: torch.nn.Module, text_encoder: torch.nn.Module) -> Any:
        from ...pipelines.pipeline_arc2face import Arc2FacePipeline

        pipeline = Arc2FacePipeline(self.vae, text_encoder, self.tokenizer, unet, self.inference_scheduler)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def validate(self) -> list[Image.Image]:
        """For the first few training records: the image (its face's identity) and a generation from that
        identity's embedding."""
        from PIL import Image

        options, dataset = self.options, self.dataset
        text_encoder = self.unwrap("text_encoder") if "text_encoder" in self.models else self.text_encoder
        pipeline = self._pipeline(self.unwrap("unet"), text_encoder)
        images = []
        for k in range(min(options.validation_samples, len(dataset))):
            pixels, _ = dataset.load(k, k)
            with self.accelerator.autocast():
                out = pipeline(
                    id_embeds=dataset.embeddings[k][None],
                    seed=options.validation_seed + k,
                    num_inference_steps=options.validation_inference_steps,
                )
            images += [Image.fromarray(pixels), out.images[0]]
        return images

    def save(self, output_dir: Path) -> None:
        unet = self.export("unet")  # collective under FSDP/DeepSpeed
        text_encoder = self.export("text_encoder") if "text_encoder" in self.models else self.text_encoder
        if not self.accelerator.is_main_process:
            return
        self._pipeline(unet, text_encoder).save_pretrained(output_dir, safe_serialization=True)
