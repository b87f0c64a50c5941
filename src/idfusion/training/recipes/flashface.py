"""``flashface``: train official-architecture FlashFace (Zhang et al., arXiv 2403.17008) from an SD1.5 folder.

What is trained, as the release says (``cfg.freeze_backbone = False``, issue #9 "it is fully finetune"): the main UNet
(its input widened to 5 channels: latents + the face-position mask, the new channel zero-initialised as
``replace_input_conv`` does), the ReferenceNet (a copy of the UNet) and the 10 reference attentions
(:class:`~idfusion.methods.flashface.FlashFaceReferenceAttention`, one per mid/up transformer block). The VAE and
the text encoder stay frozen.

One training sample, all of its randomness drawn from its seed (``data.sample_seed``), so resume and DDP are exact:

- the target image and caption of a record; the references are crops (the pipeline's own
  :func:`~idfusion.pipelines.pipeline_flashface.reference_crop`: the face box, levelled by the eye line, padded
  square, ``reference_size`` pixels) of 1 to ``max_references`` *other* images of the same identity (the official
  protocol; the paper says crops of the target itself teach copy-paste), or of the target itself
  (``reference_source: target``, as the open release trains);
- the distinct references are padded to the release's 4 (``cfg.num_pairs``) with seeded duplicates, run as log
  multiplicities on their attention keys exactly as the pipeline samples (:func:`reference_multiplicities`);
- condition dropout, each drawn independently: the caption to ``""`` (``caption_dropout``), every reference
  (``reference_dropout``: that sample trains the ``lambda = 0`` branch that reference guidance subtracts), the mask
  to zeros (``mask_dropout``: "no position"). The official config's ``misc_dropout = 0.5``, ``p_all_zero = 0.1``,
  ``p_all_keep = 0.1`` are unexplained (spec §1.7), so these are our own, documented choices;
- the ReferenceNet runs on the clean reference latents (posterior mean) at the sample's timestep, with the empty
  prompt as its text (what the pipeline gives it: the negative prompt, empty in a folder saved here), and the main
  UNet reads its ``norm1`` outputs with ``lambda = 1``;
- the loss is the MSE of the base model's prediction type (``epsilon`` or ``v_prediction``, from its scheduler
  config) under its training noise schedule (``DDPMScheduler`` from that config: zero terminal SNR is kept).

Two options of our own, off by default (the release's recipe): ``face_loss_weight`` weights the latent cells on
the target's face (its record mask) by ``1 + w``, and ``reference_lr_scale`` gives the ReferenceNet and the
reference attentions a larger learning rate. ``reference_attention_init`` chooses how the reference attentions start
(the release's copy of ``attn1``, or two exact-base-model starts). The synthetic world's plan
(:mod:`idfusion.world.train_method`) uses all three; its comments say why.

``save()`` writes a :class:`~idfusion.pipelines.pipeline_flashface.FlashFacePipeline` folder (``save_pretrained``,
release ``flashface``) whose ``settings`` record what differs from the official release: the resolution, the
reference size, no prompt postfixes (the model never saw them), diffusers' VAE attention (the base's), the default
face box (anywhere, when the mask was dropped in training) and the sampling defaults in ``sampling``. Its sampler is
FlashFace's own DDIM when that can represent the base's noise schedule, else DPM-Solver++ built from the base's
scheduler config (a zero-terminal-SNR base such as the world's; ``FlashFaceDDIMScheduler`` has no zero-SNR rescale).
It loads with ``registry.load_pipeline("flashface", folder)``.

Example config::

    recipe:
      name: flashface
      pretrained: runs/sd15            # any SD1.5 diffusers folder
      reference_size: 224
    data:
      train: data/train.jsonl          # idfusion records with faces and same-identity references
      resolution: 768
    train:
      max_steps: 20000
      batch_size: 4
      learning_rate: 1.0e-5
    output_dir: runs/flashface
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
    CONDITION_STREAM,
    NOISE_STREAM,
    DataError,
    ImageRecord,
    crop_target,
    load_rgb,
    read_records,
    sample_seed,
)
from ..recipe import Recipe, RecipeConfig

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["FlashFaceConfig", "FlashFaceDataset", "FlashFaceModels", "FlashFaceRecipe"]

logger = logging.getLogger(__name__)

NUM_PAIRS = 4  # the release pads references to 4 (cfg.num_pairs)


@dataclass
class FlashFaceConfig(RecipeConfig):
    name: str = "flashface"
    pretrained: Path | None = setting(None, check=existing_folder)  # SD1.5 diffusers folder (required)
    reference_size: int = setting(224, check=multiple_of(8))  # reference crop side in pixels (official 224)
    max_references: int = setting(NUM_PAIRS, check=between(1, NUM_PAIRS))  # distinct references: 1..this
    reference_source: Literal["others", "target"] = "others"  # other images of the identity, or the target itself
    caption_dropout: float = setting(0.1, check=between(0, 1))
    reference_dropout: float = setting(0.1, check=between(0, 1))
    mask_dropout: float = setting(0.5, check=between(0, 1))
    # our addition, 0 = the release's plain MSE: the loss weight of latent cells on the face is 1 + this (the
    # records' face masks, else their face boxes), normalised so the mean weight is 1; identity lives in a small
    # part of the image, where the plain loss puts little of its gradient
    face_loss_weight: float = setting(0.0, check=non_negative)
    # learning rate of the ReferenceNet and the reference attentions over train.learning_rate (the main UNet's):
    # the new pathway can move faster than the pretrained denoiser around it
    reference_lr_scale: float = setting(1.0, check=positive)
    # "copy": the release's init (each reference attention a copy of its block's attn1, so a block starts at
    # x + 2 attn1(y)); "split": the same with both output projections halved, so lambda = 0 is exactly the base
    # model and lambda = 1 reads the references from the first step; "zero-output": a zero reference output
    # projection (exactly the base model; the references enter as it grows)
    reference_attention_init: Literal["copy", "split", "zero-output"] = "copy"
    scheduler: str = "auto"  # the saved folder's sampler (a sampler name, see idfusion.pipelines.scheduling)
    sampling: dict[str, Any] = setting(factory=dict)  # more FlashFacePipeline settings for the saved folder
    classic_attention: bool = True  # CPU: diffusers' classic attention elsewhere in both UNets (faster backward)
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


# --------------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------------


def _face(record: ImageRecord) -> Any:
    """The record's one face as the pipeline's ``Face`` (level eyes where the record has no landmarks)."""
    from ...faces import Face

    box = np.asarray(record.faces[0].bbox, dtype=np.float32)
    landmarks = record.faces[0].landmarks
    if landmarks is None:
        middle = (box[1] + box[3]) / 2
        landmarks = [(box[0], middle), (box[2], middle)] + [((box[0] + box[2]) / 2, middle)] * 3
    return Face(bbox=box, det_score=1.0, landmarks=np.asarray(landmarks, np.float32), detector="record")


class FlashFaceDataset:
    """Target images with their face box, and reference crops of the same identity, seeded per sample.

    ``dataset[(index, seed)]`` gives ``pixel_values`` ``(3, R, R)`` in [-1, 1], ``caption`` (``""`` when dropped),
    ``references`` ``(k, 3, S, S)`` in [-1, 1] (``k = 0`` when dropped), ``multiplicity`` ``(k,)`` (how often each
    appears once padded to 4), ``face_box`` ``(4,)`` relative ``x1, y1, x2, y2`` of the target's face in the crop
    (zeros when the mask is dropped), ``index`` and ``seed``.

    Records need exactly one face; with ``reference_source="others"`` also at least one reference. A reference that
    is another record's image is cropped with that record's face; any other file is taken as a ready face crop
    (open FlashFace's ``ref`` lists) and resized to ``S x S``.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        resolution: int,
        reference_size: int,
        *,
        max_references: int = NUM_PAIRS,
        reference_source: str = "others",
        caption_dropout: float = 0.0,
        reference_dropout: float = 0.0,
        mask_dropout: float = 0.0,
        center_crop: bool = True,
        random_flip: bool = False,
        face_masks: bool = False,
    ):
        usable = [r for r in records if len(r.faces) == 1 and (reference_source == "target" or r.references)]
        if not usable:
            raise DataError("no record has exactly one face and (for reference_source 'others') a reference")
        if len(usable) < len(records):
            logger.info("flashface: %d of %d records used (one face and a reference each)", len(usable), len(records))
        self.records = usable
        self.by_path = {r.image: r for r in records if len(r.faces) == 1}
        self.resolution, self.reference_size = resolution, reference_size
        self.max_references, self.reference_source = max_references, reference_source
        self.caption_dropout, self.reference_dropout, self.mask_dropout = (
            caption_dropout,
            reference_dropout,
            mask_dropout,
        )
        self.center_crop, self.random_flip, self.face_masks = center_crop, random_flip, face_masks

    def __len__(self) -> int:
        return len(self.records)

    def target(self, record: ImageRecord, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The ``(R, R, 3)`` uint8 training crop, the face box in it (relative, ``(4,)``) and, when face weights are
        asked for, the ``(R, R)`` float face mask in [0, 1] (the record's mask, else its face box)."""
        crop = crop_target(record, seed, self.resolution, center_crop=self.center_crop, random_flip=self.random_flip,
                           mask=(record.mask or True) if self.face_masks else None)  # fmt: skip
        return crop.pixels, crop.box, crop.mask

    def reference(self, path: Path, record: ImageRecord) -> np.ndarray:
        """The ``(S, S, 3)`` uint8 reference crop of ``path`` (the pipeline's crop of the image's face)."""
        from PIL import Image

        from ...pipelines.pipeline_flashface import reference_crop

        size = self.reference_size
        owner = self.by_path.get(path)
        image = load_rgb(path, record.source)
        if owner is None:  # a ready face crop
            crop = Image.fromarray(image).resize((size, size), Image.Resampling.LANCZOS)
        else:
            crop = reference_crop(image, _face(owner), size)
        return np.asarray(crop)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        from ...methods.flashface import reference_multiplicities

        index, seed = key if isinstance(key, tuple) else (key, key)
        index, seed = int(index), int(seed)
        record = self.records[index]
        pool = list(record.references) if self.reference_source == "others" else [record.image]
        # every draw up front, so no option shifts another's
        rng = np.random.default_rng(sample_seed(seed, CONDITION_STREAM))
        drop_caption, drop_references, drop_mask = rng.random(3) < (
            self.caption_dropout,
            self.reference_dropout,
            self.mask_dropout,
        )
        count = int(rng.integers(1, min(self.max_references, len(pool)) + 1))
        chosen = rng.choice(len(pool), size=count, replace=False)
        padding_seed = int(rng.integers(2**31))

        pixels, box, face_mask = self.target(record, seed)
        if drop_references:
            references = torch.zeros(0, 3, self.reference_size, self.reference_size)
            multiplicity = torch.zeros(0)
        else:
            crops = np.stack([self.reference(pool[int(i)], record) for i in chosen])  # (k, S, S, 3)
            references = torch.from_numpy(crops).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
            multiplicity = reference_multiplicities(count, NUM_PAIRS, padding_seed)
        item = {
            "pixel_values": torch.from_numpy(pixels).permute(2, 0, 1).float().div(127.5).sub(1.0),
            "caption": "" if drop_caption else record.caption,
            "references": references,
            "multiplicity": multiplicity,
            "face_box": torch.zeros(4) if drop_mask else torch.from_numpy(box),
            "index": index,
            "seed": seed,
        }
        if face_mask is not None:
            item["face_mask"] = torch.from_numpy(face_mask)[None]  # (1, R, R)
        return item


def _collate(items: list[dict[str, Any]], *, tokenizer: Any) -> dict[str, Any]:
    """Stack a batch. The distinct references of all samples are stacked once (the ReferenceNet runs on each once);
    every sample reads the same number of slots (the most distinct references in the batch), a slot naming one of
    its references, duplicates splitting their reference's log multiplicity: the attention is exactly the padded
    set's."""
    from ...prompt_encoders import tokenize_prompts

    counts = [item["references"].shape[0] for item in items]
    slots = max(counts)
    index, log_weights, start = torch.zeros(len(items), slots, dtype=torch.long), torch.zeros(len(items), slots), 0
    owner = torch.arange(len(items)).repeat_interleave(torch.tensor(counts))  # (U,) distinct reference -> sample
    for row, (item, count) in enumerate(zip(items, counts, strict=True)):
        if count == 0:  # dropped: slots point at any reference, read with lambda = 0
            continue
        order = torch.arange(slots) % count  # slot -> the sample's distinct reference
        copies = torch.bincount(order, minlength=count).float()
        index[row] = start + order
        log_weights[row] = (item["multiplicity"][order] / copies[order]).log()
        start += count
    return {
        "pixel_values": torch.stack([item["pixel_values"] for item in items]),
        "input_ids": tokenize_prompts(tokenizer, [item["caption"] for item in items]),
        "reference_pixels": torch.cat([item["references"] for item in items]),  # (U, 3, S, S), U = sum of counts
        "reference_index": index.flatten(),  # (B * slots,) into the U
        "reference_owner": owner,
        "reference_log_weights": log_weights,  # (B, slots)
        "has_references": torch.tensor([count > 0 for count in counts]),
        "face_boxes": torch.stack([item["face_box"] for item in items]),
        **({"face_masks": torch.stack([item["face_mask"] for item in items])} if "face_mask" in items[0] else {}),
        "seeds": [item["seed"] for item in items],
    }


# --------------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------------


class FlashFaceModels(torch.nn.Module):
    """The trainable networks behind one ``forward``: ReferenceNet pass, then the main UNet reading its tokens.

    Why one module: DDP synchronises gradients only of modules called through ``forward``, and the reference
    attentions are reached only through the UNet's attention processors.
    """

    def __init__(self, unet: torch.nn.Module, refnet: torch.nn.Module, reference_attention: torch.nn.Module):
        super().__init__()
        from ...methods.flashface import ReferenceBank

        self.unet, self.refnet, self.reference_attention = unet, refnet, reference_attention
        self.bank = ReferenceBank()
        self.attach()

    def attach(self) -> None:
        """(Re)install this module's reference processors (a pipeline built on the same UNets installs its own)."""
        from ...methods.flashface import attach_reference_processors

        attach_reference_processors(self.unet, self.refnet, self.bank, self.reference_attention)

    def forward(
        self,
        sample: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        reference_latents: torch.Tensor,
        reference_index: torch.Tensor,
        reference_owner: torch.Tensor,
        reference_context: torch.Tensor,
        strength: torch.Tensor,
        log_weights: torch.Tensor | None,
    ) -> torch.Tensor:
        """The main UNet's prediction for ``sample`` ``(B, 5, h, w)``.

        The ReferenceNet runs once on the ``U`` distinct ``reference_latents``, each at the timestep of its sample
        ``reference_owner`` ``(U,)``; sample ``i`` then reads its ``n`` slots ``reference_index[i * n : (i + 1) * n]`` (indices into the
        ``U``) with strength ``strength[i]`` and logit bias ``log_weights[i]`` ``(n,)``. The bank is filled here and
        left filled until the next call, so a gradient-checkpointed UNet recomputes its blocks in the backward pass
        with the same references."""
        bank = self.bank
        bank.clear()
        batch = sample.shape[0]
        slots = reference_index.shape[0] // batch
        if slots:
            bank.writing = True
            try:
                self.refnet(reference_latents, timesteps[reference_owner], reference_context)
            finally:
                bank.writing = False
            # (U, L, C) -> (B * n, L, C): the slots in the group-major layout the read processors take
            bank.tokens.update({key: tokens[reference_index] for key, tokens in bank.tokens.items()})
            bank.strength, bank.log_weights = strength, log_weights
        bank.num_groups = bank.num_images = batch
        return self.unet(sample, timesteps, context).sample

    def enable_gradient_checkpointing(self) -> None:
        # The main UNet only: the ReferenceNet's tokens are stored during its forward, which checkpointing would run
        # without gradients.
        self.unet.enable_gradient_checkpointing()
        logger.info("gradient checkpointing on the main UNet (not the ReferenceNet, whose tokens it would detach)")


def _main_unet_from(base: torch.nn.Module) -> torch.nn.Module:
    """The base UNet with a 5-channel input conv: the latent channels copied, the mask channel zero (the release's
    ``replace_input_conv``)."""
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in base.config.items() if not k.startswith("_")}
    unet = UNet2DConditionModel.from_config({**config, "in_channels": base.config.in_channels + 1})
    state = base.state_dict()
    weight = state["conv_in.weight"]  # (C, 4, 3, 3) -> (C, 5, 3, 3)
    state["conv_in.weight"] = torch.cat([weight, weight.new_zeros(weight.shape[0], 1, *weight.shape[2:])], dim=1)
    unet.load_state_dict(state)
    return unet


def _read_scheduler_config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))


def inference_scheduler(name: str, base_config: dict[str, Any]) -> Any:
    """The saved folder's sampler: ``"auto"`` is FlashFace's DDIM (trailing, the base's betas and prediction type)
    unless the base's schedule has zero terminal SNR, which it cannot represent; then DPM-Solver++ (2M) from the
    base's config (as :func:`idfusion.world.load_base_pipeline` samples the world base)."""
    from ...pipelines.scheduling import make_scheduler

    config = {k: v for k, v in base_config.items() if not k.startswith("_")}
    if name == "auto":
        name = "dpm++" if config.get("rescale_betas_zero_snr") else "flashface-ddim"
    if name == "flashface-ddim":
        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")
        config = {**{k: config[k] for k in keys if k in config}, "timestep_spacing": "trailing"}
        if base_config.get("rescale_betas_zero_snr"):
            raise ValueError("flashface-ddim cannot sample a zero-terminal-SNR schedule; use dpm++ or ddim")
    return make_scheduler(name, config)


class FlashFaceRecipe(Recipe):
    name = "flashface"
    config_class = FlashFaceConfig

    @classmethod
    def default_config(cls) -> dict[str, Any]:
        # DDP: the ReferenceNet's layers after its last reference block feed nothing
        return {"train": {"learning_rate": 1e-5, "max_grad_norm": 1.0, "find_unused_parameters": True}}

    # -- build -----------------------------------------------------------------------------------------------------

    def build_dataset(self) -> FlashFaceDataset:
        data, options = self.config.data, self.options
        return FlashFaceDataset(
            read_records(data.train, check_files=data.check_files),
            data.resolution,
            options.reference_size,
            max_references=options.max_references,
            reference_source=options.reference_source,
            caption_dropout=options.caption_dropout,
            reference_dropout=options.reference_dropout,
            mask_dropout=options.mask_dropout,
            center_crop=data.center_crop,
            random_flip=data.random_flip,
            face_masks=options.face_loss_weight > 0,
        )

    def build(self) -> dict[str, torch.nn.Module]:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from diffusers.models.attention_processor import AttnProcessor
        from transformers import CLIPTextModel, CLIPTokenizer

        from ...methods.flashface import FlashFaceReferenceAttention, reference_blocks
        from ...pipelines.pipeline_flashface import SETTINGS
        from ...prompt_encoders import tokenize_prompts

        options, folder = self.options, self.options.pretrained
        unknown = sorted(set(options.sampling) - set(SETTINGS))
        if unknown:
            raise ConfigError(f"recipe.sampling: unknown FlashFace settings {unknown}; known: {', '.join(SETTINGS)}")
        base = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
        self.vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
        self.text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
        self.tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
        self.noise_scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
        self.inference_scheduler = inference_scheduler(options.scheduler, _read_scheduler_config(folder))
        prediction_type = self.noise_scheduler.config.prediction_type
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError(f"recipe.pretrained: {folder}: unsupported prediction type {prediction_type!r}")

        unet = _main_unet_from(base)
        refnet = UNet2DConditionModel.from_config(base.config)  # the release's deep copy of the UNet
        refnet.load_state_dict(base.state_dict())
        reference_attention = FlashFaceReferenceAttention.from_unet(unet)
        blocks = list(reference_blocks(unet).values())
        with torch.no_grad():
            for block, attention in zip(blocks, reference_attention.attentions, strict=True):
                if options.reference_attention_init == "zero-output":
                    attention.to_out[0].weight.zero_()
                    attention.to_out[0].bias.zero_()
                elif options.reference_attention_init == "split":  # attn1 + ref at lambda = 0 sum to attn1
                    for projection in (attention.to_out[0], block.attn1.to_out[0]):
                        projection.weight.mul_(0.5)
                        projection.bias.mul_(0.5)
        if options.classic_attention and self.accelerator.device.type == "cpu":
            # torch's fused attention backward is ~10x its forward on a CPU at these head sizes (train_base); the
            # reference blocks get FlashFace's processors below either way
            unet.set_attn_processor(AttnProcessor())
            refnet.set_attn_processor(AttnProcessor())
        model = FlashFaceModels(unet, refnet, reference_attention)

        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.vae_scale_factor = factor
        size = self.config.data.resolution
        self.latent_shape = (self.vae.config.latent_channels, size // factor, size // factor)
        device = self.accelerator.device
        for frozen in (self.vae, self.text_encoder):
            frozen.requires_grad_(False).eval().to(device)  # float32 under autocast: the saved copy is the loaded one
        with torch.no_grad():  # the ReferenceNet's text: the empty prompt (the saved folder's negative text)
            ids = tokenize_prompts(self.tokenizer, [""]).to(device)
            self.null_context = self.text_encoder(ids)[0]  # (1, 77, D)
        model.train()
        return {"flashface": model}

    def parameters(self, models: dict[str, torch.nn.Module]) -> list[dict[str, Any]]:
        model = models["flashface"]
        reference = [p for m in (model.refnet, model.reference_attention) for p in m.parameters() if p.requires_grad]
        main = [p for p in model.unet.parameters() if p.requires_grad]
        if self.options.reference_lr_scale == 1.0:
            return [{"params": main + reference}]
        lr = self.config.train.learning_rate
        return [{"params": main}, {"params": reference, "lr": lr * self.options.reference_lr_scale}]

    def fresh_model(self, name: str) -> torch.nn.Module:
        from diffusers import UNet2DConditionModel

        from ...methods.flashface import FlashFaceReferenceAttention

        bare = self.unwrap(name)
        return FlashFaceModels(
            UNet2DConditionModel.from_config(bare.unet.config),
            UNet2DConditionModel.from_config(bare.refnet.config),
            FlashFaceReferenceAttention.from_config(bare.reference_attention.config),
        )

    def collator(self) -> Any:
        return functools.partial(_collate, tokenizer=self.tokenizer)

    # -- loss ------------------------------------------------------------------------------------------------------

    def _normal(self, generators: list[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
        """One standard-normal draw of ``shape`` per sample, each from its sample's generator."""
        return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(self.accelerator.device)

    def _masks(self, boxes: torch.Tensor) -> torch.Tensor:
        """``(B, 1, h, w)`` face-position channels of relative boxes ``(B, 4)`` (zeros: no position)."""
        from ...methods.flashface import face_position_mask

        size = self.config.data.resolution
        masks = [face_position_mask(box.tolist(), size, size, scale=self.vae_scale_factor)[0] for box in boxes]
        return torch.stack(masks).to(self.accelerator.device)

    def loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        device = self.accelerator.device
        generators = [torch.Generator().manual_seed(sample_seed(s, NOISE_STREAM)) for s in batch["seeds"]]
        eps = self._normal(generators, self.latent_shape)
        noise = self._normal(generators, self.latent_shape)
        num_timesteps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.stack([torch.randint(0, num_timesteps, (), generator=g) for g in generators]).to(device)
        scale = self.vae.config.scaling_factor
        references = batch["reference_pixels"]
        with torch.no_grad(), self.accelerator.autocast():
            posterior = self.vae.encode(batch["pixel_values"]).latent_dist
            latents = ((posterior.mean + posterior.std * eps) * scale).float()
            context = self.text_encoder(batch["input_ids"])[0]
            if references.shape[0]:  # the release encodes references deterministically (the posterior mean)
                reference_latents = (self.vae.encode(references).latent_dist.mean * scale).float()
            else:
                reference_latents = references.new_zeros(0, *self.latent_shape)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        sample = torch.cat([noisy, self._masks(batch["face_boxes"])], dim=1)  # (B, 4 + 1, h, w)
        log_weights = batch["reference_log_weights"]
        prediction = self.models["flashface"](
            sample,
            timesteps,
            context,
            reference_latents,
            batch["reference_index"].to(device),
            batch["reference_owner"].to(device),
            self.null_context.expand(reference_latents.shape[0], -1, -1),
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
            "positive_postfix": "",  # trained on plain captions
            "negative_postfix": "",  # the empty prompt: what caption dropout trained and the ReferenceNet read
            "release_vae_attention": False,  # the base's VAE is diffusers' own
        }
        if self.options.mask_dropout > 0:
            settings["face_box"] = [0.0, 0.0, 0.0, 0.0]  # trained without a position too: default anywhere
        return {**settings, **self.options.sampling}

    def _pipeline(self, model: FlashFaceModels) -> Any:
        from ...pipelines.pipeline_flashface import FlashFacePipeline

        pipeline = FlashFacePipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=model.unet,
            refnet=model.refnet,
            scheduler=self.inference_scheduler,
            reference_attention=model.reference_attention,
            release="flashface",
            settings=self.folder_settings(),
        )
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def validate(self) -> list[Image.Image]:
        """For the first few training records: a reference crop (enlarged) and a generation from it with another
        record's caption."""
        from PIL import Image

        options, dataset = self.options, self.dataset
        model = self.unwrap("flashface")
        pipeline = self._pipeline(model)
        size = self.config.data.resolution
        images = []
        try:
            count = min(options.validation_samples, len(dataset))
            for k in range(count):
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

        exported = self.export("flashface")  # collective under FSDP/DeepSpeed
        if not self.accelerator.is_main_process:
            return
        try:
            self._pipeline(exported).save_pretrained(output_dir, safe_serialization=True)
        finally:
            if exported is self.unwrap("flashface"):
                exported.attach()
        # the text encoder under the release's key names and the base's tokenizer files, as text-to-image saves them
        save_pretrained_official(self.text_encoder, output_dir / "text_encoder")
        shutil.rmtree(output_dir / "tokenizer")
        shutil.copytree(self.options.pretrained / "tokenizer", output_dir / "tokenizer")
