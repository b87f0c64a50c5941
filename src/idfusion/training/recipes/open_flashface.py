"""``open-flashface``: train the open FlashFace re-implementation (``IntellectGen/flashface``) from an SD1.5 folder.

What is trained, as the release's ``train.py`` does: the main UNet (a plain 4-channel SD1.5 UNet; the reference
attention *is* its own ``attn1`` in the mid and up blocks, no extra layer, no mask channel) and the ReferenceNet (a
second copy of the same UNet), all of it except the ReferenceNet's ``up_blocks.3`` (``refnet_frozen``; its last
layers feed nothing). The VAE and the text encoder stay frozen.

One training sample, all of its randomness drawn from its seed (``data.sample_seed``), so resume and DDP are exact:

- the target image and caption of a record (the caption to ``""`` with ``caption_dropout``, the release's
  ``proportion_empty_prompts = 0.1``);
- 1 to ``max_references`` references drawn *with replacement* from the record's references (the release's
  ``np.random.choice``), each flipped with p = 0.5 and resized to ``reference_size`` (256): open-FlashFace ``ref``
  files are ready face crops and are resized as they are; a reference that is another record's image is cropped
  the way the pipeline crops a photo at inference (aligned to the ArcFace template by that record's landmarks);
  ``reference_source: target`` crops the target itself instead;
- the ReferenceNet runs on VAE *samples* of the references (``latent_dist.sample()``), at timestep 0 with the
  sample's own caption embeddings, and the main UNet reads its ``norm1`` outputs at full strength (``s = 1``);
- the loss is the MSE of the base model's prediction type (the release's ``epsilon`` MSE for an SD1.5 base) under
  its ``DDPMScheduler``, t ~ U{0..999}.

The release's trainer crashes as released and has two more quirks; what this recipe does instead:

- it reads ``batch["valid"]``, which its ``collate_fn`` never makes (``KeyError``). Meant: draw ``n`` in
  ``1..max_valid`` per batch and read the first ``n`` zero-padded slots of every sample, so a sample with fewer
  faces reads grey (all-zero) images. Here each sample reads exactly the references it drew: a batch's samples
  with fewer references fill the slots with their own references again, with a ``-log(copies)`` logit bias, which
  is exactly attention over the sample's own set;
- it drops the references of a whole *batch* with the caption's probability (``proportion_empty_prompts``; its
  ``proportion_empty_face`` only empties the dataset's picks, default 0). Here ``reference_dropout`` (default 0.1,
  the rate the release in effect trains with) is drawn per sample, from its seed; a dropped sample trains the plain
  self-attention that the unconditional CFG branch uses at inference;
- its text features are ``--clip_skip 2`` (README), i.e. ``hidden_states[-2]`` + the final LayerNorm, what the
  pipeline feeds at inference: ``clip_skip: 1`` here (layers skipped, idfusion's convention).

Not reproduced: the NovelAI aspect buckets (256-768 px, divisor 64): targets are square ``data.resolution`` crops
(resized to cover, then randomly cropped with ``data.center_crop: false``, as the release crops).

Two options of our own, off by default (the release's plain recipe): ``face_loss_weight`` weights the latent
cells on the target's face (its record mask, else its box) by ``1 + w``, and ``reference_lr_scale`` gives the
ReferenceNet a larger learning rate. The synthetic world's plan (:mod:`idfusion.world.plans.open_flashface`) uses
both; its comments say why.

``save()`` writes a :class:`~idfusion.pipelines.pipeline_flashface.FlashFacePipeline` folder with release
``open-flashface`` (``unet``, ``refnet``, ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler``) whose
``settings`` record the resolution, the reference size and the config's ``sampling``. Its sampler is the release's
DDIM (t = 999, 979, ..., 19) with the base's noise schedule, unless the base has zero terminal SNR (the world's),
then DPM-Solver++ from the base's scheduler config. It loads with ``registry.load_pipeline("open-flashface",
folder)``.

Example config::

    recipe:
      name: open-flashface
      pretrained: runs/sd15            # any SD1.5 diffusers folder
    data:
      train: data/train.jsonl          # open-FlashFace {path, size, caption, ref} lines, or idfusion records
      resolution: 512
      center_crop: false
    train:
      max_steps: 20000
      batch_size: 8
      learning_rate: 5.0e-6            # the README's rate (train.py's argparse default is 1e-4)
      mixed_precision: fp16
    output_dir: runs/open-flashface
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from ..config import (
    ConfigError,
    ConfigFieldError,
    between,
    existing_folder,
    multiple_of,
    non_negative,
    positive,
    setting,
)
from ..data import (
    AUGMENT_STREAM,
    CONDITION_STREAM,
    NOISE_STREAM,
    DataError,
    ImageRecord,
    load_rgb,
    read_records,
    sample_seed,
)
from ..recipe import Recipe, RecipeConfig

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["OpenFlashFaceConfig", "OpenFlashFaceDataset", "OpenFlashFaceModels", "OpenFlashFaceRecipe"]

logger = logging.getLogger(__name__)

MAX_REFERENCES = 4  # the release's max_face_num


@dataclass
class OpenFlashFaceConfig(RecipeConfig):
    name: str = "open-flashface"
    pretrained: Path | None = setting(None, check=existing_folder)  # SD1.5 diffusers folder (required)
    reference_size: int = setting(256, check=multiple_of(8))  # reference side in pixels (the release's 256)
    max_references: int = setting(MAX_REFERENCES, check=between(1, MAX_REFERENCES))  # references drawn: 1..this
    reference_source: Literal["others", "target"] = "others"  # the record's references, or the target's own face
    caption_dropout: float = setting(0.1, check=between(0, 1))  # proportion_empty_prompts
    reference_dropout: float = setting(0.1, check=between(0, 1))  # per sample (the release: per batch, see above)
    reference_flip: float = setting(0.5, check=between(0, 1))  # RandomHorizontalFlip of each reference
    clip_skip: int = setting(1, check=between(0, 1))  # CLIP layers skipped (1: penultimate + final LN)
    # ReferenceNet parameters left frozen, by name prefix (the release: "up_blocks.3")
    refnet_frozen: list[str] = setting(factory=lambda: ["up_blocks.3"])
    # our addition, 0 = the release's plain MSE: the loss weight of latent cells on the face is 1 + this (the
    # records' face masks, else their face boxes), normalised so the mean weight is 1
    face_loss_weight: float = setting(0.0, check=non_negative)
    reference_lr_scale: float = setting(1.0, check=positive)  # the ReferenceNet's lr over train.learning_rate
    scheduler: str = "auto"  # the saved folder's sampler (a sampler name, see idfusion.pipelines.scheduling)
    sampling: dict[str, Any] = setting(factory=dict)  # more FlashFacePipeline settings for the saved folder
    classic_attention: bool = True  # CPU: diffusers' classic attention outside the reference blocks (faster backward)
    validation_samples: int = setting(2, check=positive)  # training references shown, each with a generation
    validation_inference_steps: int = setting(20, check=positive)
    validation_seed: int = setting(0, check=non_negative)

    def __post_init__(self) -> None:
        if self.pretrained is None:
            raise ConfigFieldError("pretrained", "missing: an SD1.5 diffusers folder to start from (required)")
        if not (self.pretrained / "model_index.json").is_file():
            raise ConfigFieldError(
                "pretrained", f"not a diffusers pipeline folder (no model_index.json): {self.pretrained}"
            )
        bad = [p for p in self.refnet_frozen if not isinstance(p, str) or not p]
        if bad:
            raise ConfigFieldError("refnet_frozen", f"expected parameter-name prefixes, got {bad}")


# --------------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------------


def face_crop(image: np.ndarray, record: ImageRecord, size: int) -> np.ndarray:
    """The ``(S, S, 3)`` reference crop of ``record``'s one face in ``image``: aligned to the ArcFace template by
    its landmarks (what the open pipeline does with a photo), else its box padded square and resized."""
    from PIL import Image

    from ...faces import align_face

    face = record.faces[0]
    if face.landmarks is not None:
        scale_x, scale_y = image.shape[1] / record.width, image.shape[0] / record.height
        points = np.asarray(face.landmarks, np.float64) * (scale_x, scale_y)  # (5, 2) in this image's pixels
        return align_face(image, points, size=size)
    x1, y1, x2, y2 = face.bbox
    side = max(x2 - x1, y2 - y1)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    box = tuple(int(round(v)) for v in (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2))
    return np.asarray(Image.fromarray(image).crop(box).resize((size, size), Image.Resampling.LANCZOS))


class OpenFlashFaceDataset:
    """Target crops with 1-4 reference face crops, seeded per sample.

    ``dataset[(index, seed)]`` gives ``pixel_values`` ``(3, R, R)`` in [-1, 1], ``caption`` (``""`` when dropped),
    ``references`` ``(k, 3, S, S)`` in [-1, 1] (``k = 0`` when dropped), and, with ``face_masks``, ``face_mask``
    ``(1, R, R)`` in [0, 1]; plus ``index`` and ``seed``.

    A reference path that is another record's image (with one face) is cropped with that record's face
    (:func:`face_crop`); any other file is a ready face crop (open FlashFace's ``ref``) and is resized to ``S x S``.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        resolution: int,
        reference_size: int,
        *,
        max_references: int = MAX_REFERENCES,
        reference_source: str = "others",
        caption_dropout: float = 0.0,
        reference_dropout: float = 0.0,
        reference_flip: float = 0.5,
        center_crop: bool = True,
        random_flip: bool = False,
        face_masks: bool = False,
    ):
        def usable(record: ImageRecord) -> bool:
            if reference_source == "target":
                return len(record.faces) == 1
            return bool(record.references) and (not face_masks or len(record.faces) == 1 or record.mask is not None)

        kept = [r for r in records if usable(r)]
        if not kept:
            wanted = "exactly one face" if reference_source == "target" else "a reference (ref / references)"
            raise DataError(f"no usable record: each needs {wanted}")
        if len(kept) < len(records):
            logger.info("open-flashface: %d of %d records used", len(kept), len(records))
        self.records = kept
        self.by_path = {r.image: r for r in records if len(r.faces) == 1}
        self.resolution, self.reference_size = resolution, reference_size
        self.max_references, self.reference_source = max_references, reference_source
        self.caption_dropout, self.reference_dropout, self.reference_flip = (
            caption_dropout,
            reference_dropout,
            reference_flip,
        )
        self.center_crop, self.random_flip, self.face_masks = center_crop, random_flip, face_masks

    def __len__(self) -> int:
        return len(self.records)

    def target(self, record: ImageRecord, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The ``(R, R, 3)`` uint8 training crop and, with face masks, its ``(R, R)`` face weights in [0, 1]."""
        from PIL import Image

        image = Image.fromarray(load_rgb(record.image, record.source))
        face = None
        if self.face_masks:
            if record.mask is not None:
                face = Image.open(record.mask).convert("L").resize(image.size, Image.Resampling.BILINEAR)
            else:
                sx, sy = image.width / record.width, image.height / record.height
                x1, y1, x2, y2 = record.faces[0].bbox
                face = Image.new("L", image.size)
                face.paste(255, tuple(int(round(v)) for v in (x1 * sx, y1 * sy, x2 * sx, y2 * sy)))
        crop_x, crop_y, flip = np.random.default_rng(sample_seed(seed, AUGMENT_STREAM)).random(3)
        size = self.resolution
        scale = size / min(image.size)  # resize to cover the square, then crop (the release's bucket crop)
        resized = (max(size, round(image.width * scale)), max(size, round(image.height * scale)))
        if resized != image.size:
            image = image.resize(resized, Image.Resampling.LANCZOS)
            face = face.resize(resized, Image.Resampling.BILINEAR) if face is not None else None
        if self.center_crop:
            left, top = (image.width - size) // 2, (image.height - size) // 2
        else:
            left, top = int(crop_x * (image.width - size + 1)), int(crop_y * (image.height - size + 1))
        window = (left, top, left + size, top + size)
        pixels = np.array(image.crop(window))
        weights = np.asarray(face.crop(window), dtype=np.float32) / 255.0 if face is not None else None
        if self.random_flip and flip < 0.5:
            pixels = pixels[:, ::-1]
            weights = weights[:, ::-1] if weights is not None else None
        return np.ascontiguousarray(pixels), None if weights is None else np.ascontiguousarray(weights)

    def reference(self, path: Path, record: ImageRecord) -> np.ndarray:
        """The ``(S, S, 3)`` uint8 reference crop of ``path`` (``record``: the record that names it)."""
        from PIL import Image

        size = self.reference_size
        image = load_rgb(path, record.source)
        owner = self.by_path.get(path)
        if owner is None:  # a ready face crop (the release's Resize((256, 256), LANCZOS))
            return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.LANCZOS))
        return face_crop(image, owner, size)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = key if isinstance(key, tuple) else (key, key)
        index, seed = int(index), int(seed)
        record = self.records[index]
        pool = list(record.references) if self.reference_source == "others" else [record.image]
        # every draw up front, so no option shifts another's
        rng = np.random.default_rng(sample_seed(seed, CONDITION_STREAM))
        drop_caption, drop_references = rng.random(2) < (self.caption_dropout, self.reference_dropout)
        count = int(rng.integers(1, min(self.max_references, len(pool)) + 1))
        chosen = rng.choice(len(pool), size=count, replace=True)  # with replacement, as the release draws
        flips = rng.random(count) < self.reference_flip

        pixels, face_mask = self.target(record, seed)
        size = self.reference_size
        if drop_references:
            references = torch.zeros(0, 3, size, size)
        else:
            crops = [self.reference(pool[int(i)], record) for i in chosen]
            crops = np.stack([c[:, ::-1] if f else c for c, f in zip(crops, flips, strict=True)])  # (k, S, S, 3)
            references = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).float().div(127.5).sub(1)
        item = {
            "pixel_values": torch.from_numpy(pixels).permute(2, 0, 1).float().div(127.5).sub(1.0),
            "caption": "" if drop_caption else record.caption,
            "references": references,
            "index": index,
            "seed": seed,
        }
        if face_mask is not None:
            item["face_mask"] = torch.from_numpy(face_mask)[None]  # (1, R, R)
        return item


def collate(items: list[dict[str, Any]], *, tokenizer: Any) -> dict[str, Any]:
    """Stack a batch. All samples' references are stacked once (the ReferenceNet runs on each once); every sample
    reads the same number of slots (the most references of any sample), a sample with fewer reading its own again
    with a ``-log(copies)`` logit bias, so its attention is exactly over its own references."""
    from ...prompt_encoders import tokenize_prompts

    counts = [item["references"].shape[0] for item in items]
    slots = max(counts)
    index, log_weights, start = torch.zeros(len(items), slots, dtype=torch.long), torch.zeros(len(items), slots), 0
    owner = torch.arange(len(items)).repeat_interleave(torch.tensor(counts, dtype=torch.long))  # (U,) -> sample
    for row, count in enumerate(counts):
        if count == 0:  # dropped: the slots point anywhere and are read with s = 0
            continue
        order = torch.arange(slots) % count  # slot -> the sample's reference
        copies = torch.bincount(order, minlength=count).float()
        index[row] = start + order
        log_weights[row] = -copies[order].log()
        start += count
    return {
        "pixel_values": torch.stack([item["pixel_values"] for item in items]),
        "input_ids": tokenize_prompts(tokenizer, [item["caption"] for item in items]),
        "reference_pixels": torch.cat([item["references"] for item in items]),  # (U, 3, S, S), U = sum of counts
        "reference_index": index.flatten(),  # (B * slots,) into the U
        "reference_owner": owner,
        "reference_log_weights": log_weights,  # (B, slots)
        "has_references": torch.tensor([count > 0 for count in counts]),
        **({"face_masks": torch.stack([item["face_mask"] for item in items])} if "face_mask" in items[0] else {}),
        "seeds": [item["seed"] for item in items],
    }


# --------------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------------


class OpenFlashFaceModels(torch.nn.Module):
    """The main UNet and the ReferenceNet behind one ``forward`` (DDP synchronises the gradients of modules called
    through ``forward`` only)."""

    def __init__(self, unet: torch.nn.Module, refnet: torch.nn.Module):
        super().__init__()
        from ...methods.flashface import ReferenceBank

        self.unet, self.refnet = unet, refnet
        self.bank = ReferenceBank()
        self.attach()

    def attach(self) -> None:
        """(Re)install the reference processors (a pipeline built on the same UNets installs its own)."""
        from ...methods.flashface import attach_reference_processors

        attach_reference_processors(self.unet, self.refnet, self.bank, None)

    def forward(
        self,
        sample: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        reference_latents: torch.Tensor,
        reference_index: torch.Tensor,
        reference_owner: torch.Tensor,
        strength: torch.Tensor,
        log_weights: torch.Tensor | None,
    ) -> torch.Tensor:
        """The main UNet's prediction for ``sample`` ``(B, 4, h, w)``.

        The ReferenceNet runs once on the ``U`` ``reference_latents`` at timestep 0, each with the text of its sample
        ``reference_owner`` ``(U,)`` (the release's ``torch.zeros_like(timesteps)`` and the caption embeddings);
        sample ``i`` reads its ``n`` slots ``reference_index[i * n : (i + 1) * n]`` with strength ``strength[i]``
        (1: full reference, 0: plain self-attention) and logit bias ``log_weights[i]``."""
        bank = self.bank
        bank.clear()
        batch = sample.shape[0]
        slots = reference_index.shape[0] // batch
        if slots:
            bank.writing = True
            try:
                owners = reference_owner.to(timesteps.device)
                self.refnet(reference_latents, torch.zeros_like(timesteps[owners]), context[owners])
            finally:
                bank.writing = False
            # (U, L, C) -> (B * n, L, C): the slots in the group-major layout the read processors take
            bank.tokens.update({key: tokens[reference_index] for key, tokens in bank.tokens.items()})
            bank.strength, bank.log_weights = strength, log_weights
        bank.num_groups = bank.num_images = batch
        return self.unet(sample, timesteps, context).sample

    def enable_gradient_checkpointing(self) -> None:
        # the main UNet only: the ReferenceNet's tokens are stored during its forward, which checkpointing would run
        # without gradients
        self.unet.enable_gradient_checkpointing()
        logger.info("gradient checkpointing on the main UNet (not the ReferenceNet, whose tokens it would detach)")


def inference_scheduler(name: str, base_config: dict[str, Any]) -> Any:
    """The saved folder's sampler: ``"auto"`` is the release's DDIM (``steps_offset = 19``, leading spacing: t = 999,
    979, ..., 19 at 50 steps) on the base's noise schedule, unless that schedule has zero terminal SNR (DDIM's
    leading steps never reach it); then DPM-Solver++ (2M) from the base's config, as the world base samples."""
    from ...methods.flashface import OPEN
    from ...pipelines.scheduling import make_scheduler

    config = {k: v for k, v in base_config.items() if not k.startswith("_")}
    if name == "auto":
        if config.get("rescale_betas_zero_snr"):
            return make_scheduler("dpm++", config)
        name, config = "ddim", {**config, **OPEN.scheduler_config}
    return make_scheduler(name, config)


class OpenFlashFaceRecipe(Recipe):
    name = "open-flashface"
    config_class = OpenFlashFaceConfig

    @classmethod
    def default_config(cls) -> dict[str, Any]:
        # the release: AdamW lr 5e-6 (README), weight decay 1e-2, clip 1.0, batch 8, DDP with unused parameters
        # (the ReferenceNet's layers after its last reference block feed nothing)
        return {
            "train": {
                "learning_rate": 5e-6,
                "adam_weight_decay": 1e-2,
                "max_grad_norm": 1.0,
                "batch_size": 8,
                "find_unused_parameters": True,
            },
            "data": {"center_crop": False},
        }

    # -- build -----------------------------------------------------------------------------------------------------

    def build_dataset(self) -> OpenFlashFaceDataset:
        data, options = self.config.data, self.options
        return OpenFlashFaceDataset(
            read_records(data.train, check_files=data.check_files),
            data.resolution,
            options.reference_size,
            max_references=options.max_references,
            reference_source=options.reference_source,
            caption_dropout=options.caption_dropout,
            reference_dropout=options.reference_dropout,
            reference_flip=options.reference_flip,
            center_crop=data.center_crop,
            random_flip=data.random_flip,
            face_masks=options.face_loss_weight > 0,
        )

    def build(self) -> dict[str, torch.nn.Module]:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from diffusers.models.attention_processor import AttnProcessor
        from transformers import CLIPTextModel, CLIPTokenizer

        from ...pipelines.pipeline_flashface import SETTINGS

        options, folder = self.options, self.options.pretrained
        unknown = sorted(set(options.sampling) - set(SETTINGS))
        if unknown:
            raise ConfigError(f"recipe.sampling: unknown FlashFace settings {unknown}; known: {', '.join(SETTINGS)}")
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
        if unet.config.in_channels != 4:
            raise ConfigError(f"recipe.pretrained: {folder}: expected a 4-channel SD1.5 UNet")
        refnet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")  # the release loads it twice
        self.vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
        self.text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
        self.tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
        self.noise_scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
        base_scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
        self.inference_scheduler = inference_scheduler(options.scheduler, base_scheduler)
        if self.noise_scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError(
                f"recipe.pretrained: {folder}: unsupported prediction type {self.noise_scheduler.config.prediction_type!r}"
            )
        unet.requires_grad_(True)
        names = [name for name, _ in refnet.named_parameters()]
        for prefix in options.refnet_frozen:
            if not any(n == prefix or n.startswith(prefix + ".") for n in names):
                raise ConfigError(f"recipe.refnet_frozen: no ReferenceNet parameter under {prefix!r}")
        for name, parameter in refnet.named_parameters():
            frozen = any(name == p or name.startswith(p + ".") for p in options.refnet_frozen)
            parameter.requires_grad_(not frozen)
        if options.classic_attention and self.accelerator.device.type == "cpu":
            # torch's fused attention backward is ~10x its forward on a CPU at these head sizes (train_base); the
            # reference blocks get FlashFace's processors in OpenFlashFaceModels either way
            unet.set_attn_processor(AttnProcessor())
            refnet.set_attn_processor(AttnProcessor())
        model = OpenFlashFaceModels(unet, refnet)

        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        size = self.config.data.resolution
        self.latent_shape = (self.vae.config.latent_channels, size // factor, size // factor)
        reference = options.reference_size // factor
        self.reference_shape = (self.vae.config.latent_channels, reference, reference)
        for frozen in (self.vae, self.text_encoder):
            frozen.requires_grad_(False).eval().to(self.accelerator.device)
        model.train()
        return {"open_flashface": model}

    def parameters(self, models: dict[str, torch.nn.Module]) -> list[dict[str, Any]]:
        model = models["open_flashface"]
        main = [p for p in model.unet.parameters() if p.requires_grad]
        reference = [p for p in model.refnet.parameters() if p.requires_grad]
        if self.options.reference_lr_scale == 1.0:
            return [{"params": main + reference}]
        lr = self.config.train.learning_rate
        return [{"params": main}, {"params": reference, "lr": lr * self.options.reference_lr_scale}]

    def fresh_model(self, name: str) -> torch.nn.Module:
        from diffusers import UNet2DConditionModel

        bare = self.unwrap(name)
        return OpenFlashFaceModels(
            UNet2DConditionModel.from_config(bare.unet.config), UNet2DConditionModel.from_config(bare.refnet.config)
        )

    def collator(self) -> Any:
        return functools.partial(collate, tokenizer=self.tokenizer)

    # -- loss ------------------------------------------------------------------------------------------------------

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``(B, 77, D)`` caption features, skipping ``clip_skip`` last layers (as the pipeline's positive prompt)."""
        skip = self.options.clip_skip
        if skip == 0:
            return self.text_encoder(input_ids)[0]
        hidden = self.text_encoder(input_ids, output_hidden_states=True).hidden_states[-(skip + 1)]
        return self.text_encoder.final_layer_norm(hidden)  # as the pipeline encodes

    def loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        device = self.accelerator.device
        generators = [torch.Generator().manual_seed(sample_seed(s, NOISE_STREAM)) for s in batch["seeds"]]
        normal = lambda shape: torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)  # noqa: E731
        eps, noise = normal(self.latent_shape), normal(self.latent_shape)
        num_timesteps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.stack([torch.randint(0, num_timesteps, (), generator=g) for g in generators]).to(device)
        owner = batch["reference_owner"]
        counts = torch.bincount(owner, minlength=len(generators)).tolist()
        # each sample's reference noise from its own generator, after its other draws: (U, 4, s, s)
        reference_eps = torch.cat(
            [torch.randn((n, *self.reference_shape), generator=g) for g, n in zip(generators, counts, strict=True)]
        ).to(device)
        scale = self.vae.config.scaling_factor
        references = batch["reference_pixels"]
        with torch.no_grad(), self.accelerator.autocast():
            posterior = self.vae.encode(batch["pixel_values"]).latent_dist
            latents = ((posterior.mean + posterior.std * eps) * scale).float()  # latent_dist.sample()
            context = self.encode_text(batch["input_ids"])
            if references.shape[0]:
                posterior = self.vae.encode(references).latent_dist
                reference_latents = ((posterior.mean + posterior.std * reference_eps) * scale).float()
            else:
                reference_latents = references.new_zeros(0, *self.reference_shape)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        log_weights = batch["reference_log_weights"]
        prediction = self.models["open_flashface"](
            noisy,
            timesteps,
            context,
            reference_latents,
            batch["reference_index"].to(device),
            owner.to(device),
            batch["has_references"].float(),
            log_weights if bool((log_weights != 0).any()) else None,
        )
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

    def folder_settings(self) -> dict[str, Any]:
        """The saved pipeline's ``settings``: what training fixed, then the config's ``sampling``."""
        settings: dict[str, Any] = {
            "height": self.config.data.resolution,
            "reference_size": self.options.reference_size,
            # the unconditional branch trained on the empty caption (caption dropout), not on the release's long
            # negative prompt: with that as the default negative, world outputs lose their faces (0.33 found vs 1.0)
            "negative_prompt": "",
        }
        return {**settings, **self.options.sampling}

    def _pipeline(self, model: OpenFlashFaceModels) -> Any:
        from ...pipelines.pipeline_flashface import FlashFacePipeline

        pipeline = FlashFacePipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=model.unet,
            refnet=model.refnet,
            scheduler=self.inference_scheduler,
            release="open-flashface",
            settings=self.folder_settings(),
        )
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def validate(self) -> list[Image.Image]:
        """For the first few training records: a reference crop (enlarged) and a generation from it with another
        record's caption."""
        from PIL import Image

        options, dataset = self.options, self.dataset
        model = self.unwrap("open_flashface")
        pipeline = self._pipeline(model)
        size = self.config.data.resolution
        images = []
        try:
            for k in range(min(options.validation_samples, len(dataset))):
                record = dataset.records[k]
                pool = list(record.references) if dataset.reference_source == "others" else [record.image]
                crop = Image.fromarray(dataset.reference(pool[0], record))
                prompt = dataset.records[(k + 1) % len(dataset)].caption
                with self.accelerator.autocast():
                    out = pipeline(
                        reference_images=[crop],
                        prompt=prompt,
                        seed=options.validation_seed + k,
                        num_inference_steps=options.validation_inference_steps,
                    )
                images += [crop.resize((size, size), Image.Resampling.NEAREST), out.images[0]]
        finally:
            model.attach()  # the pipeline installed its own processors on these UNets
        return images

    def save(self, output_dir: Path) -> None:
        from ...sd15 import save_pretrained_official

        exported = self.export("open_flashface")  # collective under FSDP/DeepSpeed
        if not self.accelerator.is_main_process:
            return
        try:
            self._pipeline(exported).save_pretrained(output_dir, safe_serialization=True)
        finally:
            if exported is self.unwrap("open_flashface"):
                exported.attach()
        # the frozen text encoder and tokenizer exactly as the base holds them (so a shipped folder can leave them out)
        save_pretrained_official(self.text_encoder, output_dir / "text_encoder")
        shutil.rmtree(output_dir / "tokenizer")
        shutil.copytree(self.options.pretrained / "tokenizer", output_dir / "tokenizer")
