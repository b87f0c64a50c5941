"""``feedface`` and ``feedface-sd15``: train FeedFace's feed adapter (Xiang et al., ICLR 2024 Tiny Papers).

What is trained, as the release (``train_nnet=False``, ``train_feed=True``): the feed adapter alone, i.e. the face
encoder's bias-free ``project_layer`` and one zero-initialised feed block per injection site. The denoiser (a U-ViT
for ``feedface``, an SD1.5 UNet for ``feedface-sd15``), the VAE, the text encoder and the face encoder's CLIP
ViT-B/32 tower stay frozen. Both recipes share the data and the loss; they differ in the denoiser they call.

One training sample, all of its randomness drawn from its seed (``data.sample_seed``), so resume and DDP are exact:

- the target image and caption of a record (the caption is never dropped, as the release);
- the reference: the release's face crop (:func:`~idfusion.methods.feedface.face_crop`, a square of 1.1x the box's
  long side, 224 px, mean/std 0.5) of the target itself (``reference_source: target``, the release's
  ``square_bbox``) or of another image of the same identity (``others``), flipped with p = ``reference_flip``;
  with p = ``reference_dropout`` it is all zeros (mid grey after the normalisation), the release's ``cfg_p``;
- the face mask at the latent grid: the record's ``head_mask`` (face and hair, what the release's LaPa mask with
  hair is), else its ``mask``, else its face box; a latent cell counts when any of its pixels is in the mask.

The loss (the release's ``T2i_compute_mask_loss``) on the denoiser's prediction ``p`` with the adapter on, the
training target ``y`` (the base's ``epsilon`` or ``v_prediction``) and ``p0``, the same frozen denoiser with the
adapter off (multiplier 0, no gradient): with p = ``mask_probability`` (0.9)
``mean((y - p)^2 M) + preservation_weight * mean((p0 - p)^2 (1 - M))`` (means over all latent elements), else
``mean((y - p)^2)``. Two choices of ours where the release is silent or per-GPU: the mask/plain choice and the
reference dropout are drawn per sample (the release draws them per batch, i.e. per GPU, which DDP cannot
reproduce), and ``preservation_weight`` exposes the release's implicit 1.

``feedface`` (U-ViT): the denoiser is UniDiffuser-v1's ``UniDiffuserModel`` of a FeedFace release folder (what
:class:`~idfusion.pipelines.pipeline_feedface.FeedFacePipeline` loads). Joint noise on ``[z, clip_img]`` at one
timestep ``n ~ U{1..1000}`` (the model is given ``n``; the schedule's ``alphas_cumprod[n - 1]``), clean text
(``t_text = 0``), ``data_type`` 0 as the release trains; only the ``z`` output has a loss. The clean ``clip_img``
is the CLIP ViT-B/32 image embedding of the target (``clip_image_encoder``, a ``CLIPVisionModelWithProjection``
folder); without one it is zeros (only sensible for tiny test models, logged). ``save()`` writes a
``FeedFacePipeline`` folder (``save_pretrained``) that ``registry.load_pipeline("feedface", folder)`` loads.

``feedface-sd15``: the denoiser is an SD1.5 UNet (``pretrained``, a diffusers folder) with an
:class:`~idfusion.methods.feedface.SD15FeedAdapter` at its cross-attention sites; noise, timesteps and the
prediction type from its ``DDPMScheduler``. The face encoder's tower comes from ``face_encoder`` (a
``CLIPVisionModel`` folder: ``openai/clip-vit-base-patch32`` for the paper's encoder), or is built fresh from
``face_encoder_config``. ``face_encoder_teacher`` is our addition for bases without a pretrained CLIP (the synthetic
world): before training, the tower is fitted to a face recognizer's embeddings of the training faces (its
penultimate CLS token through a linear head, cosine loss; the head is then dropped and the tower frozen, so the
adapter reads identity features as it reads CLIP's in the release). ``save()`` writes a ``FeedFaceSD15Pipeline``
folder (``save_pretrained``; the sampler is DPM-Solver++ from the base's scheduler config) that
``registry.load_pipeline("feedface-sd15", folder)`` loads.

Example config::

    recipe:
      name: feedface-sd15
      pretrained: runs/sd15                      # any SD1.5 diffusers folder
      face_encoder: models/clip-vit-base-patch32
    data:
      train: data/train.jsonl                    # idfusion records with faces (and head masks)
      resolution: 512
    train:
      max_steps: 37500
      batch_size: 16
    output_dir: runs/feedface-sd15
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from ..config import ConfigError, ConfigFieldError, between, existing_folder, non_negative, positive, setting
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

__all__ = [
    "FeedFaceConfig",
    "FeedFaceSD15Config",
    "FeedFaceDataset",
    "FeedFaceModel",
    "FeedFaceRecipe",
    "FeedFaceSD15Recipe",
    "fit_face_encoder",
]

logger = logging.getLogger(__name__)

FACE_ENCODER_DIR = "face_encoder"  # the fitted tower, under output_dir (reused on resume)
TEACHER_STREAM = 7  # sample_seed stream of the face-encoder fit (apart from the data/noise streams)


@dataclass
class FeedFaceConfig(RecipeConfig):
    """The shared options; the U-ViT recipe's ``recipe:`` section."""

    name: str = "feedface"
    # U-ViT: a FeedFace release folder (models/ with uvit_v1.pth, ...) or a saved FeedFacePipeline folder;
    # SD1.5: an SD1.5 diffusers folder
    pretrained: Path | None = setting(None, check=existing_folder)
    reference_source: Literal["target", "others"] = "target"  # release: a crop of the target itself
    reference_flip: float = setting(0.5, check=between(0, 1))
    reference_dropout: float = setting(0.1, check=between(0, 1))  # release cfg_p: the reference to zeros
    mask_probability: float = setting(0.9, check=between(0, 1))  # release mask_p: masked + preservation loss
    preservation_weight: float = setting(1.0, check=non_negative)  # of mean((p0 - p)^2 (1 - M)); release 1
    multiplier: float = setting(1.0, check=positive)  # adapter strength in training (release 1.0)
    validation_samples: int = setting(2, check=positive)
    validation_inference_steps: int = setting(20, check=positive)
    validation_seed: int = setting(0, check=non_negative)

    def __post_init__(self) -> None:
        if self.pretrained is None:
            raise ConfigFieldError("pretrained", f"missing: the base model folder to train {self.name} on (required)")


@dataclass
class FeedFaceUViTConfig(FeedFaceConfig):
    name: str = "feedface"
    clip_image_encoder: Path | None = setting(None, check=existing_folder)  # CLIPVisionModelWithProjection folder
    data_type: int = setting(0, check=between(0, 1))  # the release trains with 0 (and samples with 1)
    adapter_init: Literal["fresh", "pretrained"] = "fresh"  # fresh feed blocks, or continue the folder's adapter


@dataclass
class FeedFaceSD15Config(FeedFaceConfig):
    name: str = "feedface-sd15"
    face_encoder: Path | None = setting(None, check=existing_folder)  # a CLIPVisionModel folder (CLIP ViT-B/32)
    face_encoder_config: dict[str, Any] = setting(factory=dict)  # CLIPVisionConfig overrides of a fresh tower
    face_dim: int | None = setting(None, check=positive)  # face-token width (default: the UNet's context width)
    num_heads: int = setting(8, check=positive)  # heads per feed block
    # our addition: fit the tower to this recognizer ("world", "onnx", "dlib") before training; null: as given
    face_encoder_teacher: str | None = None
    teacher_steps: int = setting(400, check=positive)
    teacher_batch_size: int = setting(128, check=positive)
    teacher_learning_rate: float = setting(1e-3, check=positive)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.pretrained / "model_index.json").is_file():
            raise ConfigFieldError(
                "pretrained", f"not a diffusers pipeline folder (no model_index.json): {self.pretrained}"
            )
        if self.face_encoder is not None and not (self.face_encoder / "config.json").is_file():
            raise ConfigFieldError(
                "face_encoder", f"not a CLIPVisionModel folder (no config.json): {self.face_encoder}"
            )
        if self.face_encoder_teacher == "world-judge":
            raise ConfigFieldError("face_encoder_teacher", "world-judge scores identity; it must never train a model")


# --------------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------------


class FeedFaceDataset:
    """Target images, their face mask and a reference face crop, seeded per sample.

    ``dataset[(index, seed)]`` gives ``pixel_values`` ``(3, R, R)`` in [-1, 1], ``caption``, ``reference``
    ``(3, 224, 224)`` normalised as the face encoder takes it (zeros when dropped), ``face_mask`` ``(1, R, R)`` in
    [0, 1], ``use_mask`` (this sample's loss is the masked one), ``index`` and ``seed``.

    Records need exactly one face; with ``reference_source="others"`` also a reference that is another record's
    image (cropped with that record's face box).
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        resolution: int,
        *,
        reference_source: str = "target",
        reference_flip: float = 0.0,
        reference_dropout: float = 0.0,
        mask_probability: float = 0.0,
        center_crop: bool = True,
        random_flip: bool = False,
    ):
        by_path = {r.image: r for r in records if len(r.faces) == 1}
        if reference_source == "others":
            usable = [r for r in by_path.values() if any(p in by_path for p in r.references)]
        else:
            usable = list(by_path.values())
        if not usable:
            need = " and a reference that is another one-face record" if reference_source == "others" else ""
            raise DataError(f"no record has exactly one face{need}")
        if len(usable) < len(records):
            logger.info("feedface: %d of %d records used (one face each)", len(usable), len(records))
        self.records, self.by_path = usable, by_path
        self.resolution, self.reference_source = resolution, reference_source
        self.reference_flip, self.reference_dropout = reference_flip, reference_dropout
        self.mask_probability = mask_probability
        self.center_crop, self.random_flip = center_crop, random_flip

    def __len__(self) -> int:
        return len(self.records)

    def target(self, record: ImageRecord, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``(R, R, 3)`` uint8 training crop and its ``(R, R)`` float face mask in [0, 1] (face and hair where
        the record has a head mask, as the release's LaPa mask with hair)."""
        crop = crop_target(record, seed, self.resolution, center_crop=self.center_crop, random_flip=self.random_flip,
                           mask=record.head_mask or record.mask or True)  # fmt: skip
        return crop.pixels, crop.mask

    def reference_crop(self, path: Path, owner: ImageRecord) -> np.ndarray:
        """The ``(224, 224, 3)`` uint8 face crop of ``path`` (``owner``'s face box), as the pipeline crops."""
        from ...methods.feedface import face_crop

        return face_crop(load_rgb(path, owner.source), owner.faces[0].bbox)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        from ...methods.feedface import FACE_SIZE, preprocess_faces

        index, seed = key if isinstance(key, tuple) else (key, key)
        index, seed = int(index), int(seed)
        record = self.records[index]
        # every draw up front, so no option shifts another's
        rng = np.random.default_rng(sample_seed(seed, CONDITION_STREAM))
        drop, use_mask, flip = rng.random(3) < (self.reference_dropout, self.mask_probability, self.reference_flip)
        if self.reference_source == "others":
            pool = [p for p in record.references if p in self.by_path]
            path = pool[int(rng.integers(len(pool)))]
            owner = self.by_path[path]
        else:
            path, owner = record.image, record
        pixels, mask = self.target(record, seed)
        if drop:  # the release's cfg dropout: a zero tensor after the normalisation
            reference = torch.zeros(3, FACE_SIZE, FACE_SIZE)
        else:
            crop = self.reference_crop(path, owner)
            reference = preprocess_faces(crop[:, ::-1] if flip else crop)[0]  # (3, 224, 224)
        return {
            "pixel_values": torch.from_numpy(pixels).permute(2, 0, 1).float().div(127.5).sub(1.0),
            "caption": record.caption,
            "reference": reference,
            "face_mask": torch.from_numpy(mask)[None],  # (1, R, R)
            "use_mask": bool(use_mask),
            "index": index,
            "seed": seed,
        }


def _collate(items: list[dict[str, Any]], *, tokenizer: Any) -> dict[str, Any]:
    from ...prompt_encoders import tokenize_prompts

    return {
        "pixel_values": torch.stack([item["pixel_values"] for item in items]),
        "input_ids": tokenize_prompts(tokenizer, [item["caption"] for item in items]),
        "references": torch.stack([item["reference"] for item in items]),  # (B, 3, 224, 224)
        "face_masks": torch.stack([item["face_mask"] for item in items]),  # (B, 1, R, R)
        "use_mask": torch.tensor([item["use_mask"] for item in items]),
        "seeds": [item["seed"] for item in items],
    }


# --------------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------------


class FeedFaceModel(torch.nn.Module):
    """The trainable adapter behind one ``forward``: encode the batch's references, then run the frozen denoiser
    with the adapter attached.

    Why one module: DDP synchronises gradients only of modules called through ``forward``, and the feed blocks are
    reached through the denoiser's hooks or processors. The denoiser is held by reference, not as a submodule, so
    checkpoints and the EMA hold the adapter alone.
    """

    def __init__(self, adapter: torch.nn.Module, denoiser: torch.nn.Module):
        super().__init__()
        self.adapter = adapter
        object.__setattr__(self, "denoiser", denoiser)

    def forward(self, references: torch.Tensor, *args: Any, multiplier: float = 1.0, **kwargs: Any) -> Any:
        """``denoiser(*args, **kwargs)`` with sample ``i`` reading the face tokens of ``references[i]``
        ``(B, 3, 224, 224)``."""
        tokens = self.adapter.preprocess_module(references)  # (B, 50, face width)
        self.adapter.set_face_tokens(tokens)
        self.adapter.set_multiplier(multiplier)
        try:
            return self.denoiser(*args, **kwargs)
        finally:
            self.adapter.set_face_tokens(None)

    @torch.no_grad()
    def adapter_off(self, *args: Any, **kwargs: Any) -> Any:
        """The frozen denoiser with the adapter off (multiplier 0: the base model bit for bit)."""
        self.adapter.set_multiplier(0.0)
        return self.denoiser(*args, **kwargs)


def _latent_mask(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(B, 1, R, R)`` face masks -> ``(B, 1, h, w)`` binary: a latent cell counts when any of its pixels is in."""
    return (F.adaptive_max_pool2d(masks, size) > 0).float()


def _feedface_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    base: torch.Tensor | None,
    mask: torch.Tensor,
    use_mask: torch.Tensor,
    preservation_weight: float,
) -> dict[str, torch.Tensor]:
    """The release's loss per sample (masked denoising + preservation, or plain), averaged over the batch."""
    prediction, target = prediction.float(), target.float()
    error = (prediction - target).pow(2)  # (B, C, h, w)
    plain = error.mean(dim=(1, 2, 3))
    if base is None:
        return {"loss": plain.mean(), "face": plain.mean().detach(), "preserve": plain.new_zeros(())}
    face = (error * mask).mean(dim=(1, 2, 3))
    preserve = ((base.float() - prediction).pow(2) * (1 - mask)).mean(dim=(1, 2, 3))
    masked = face + preservation_weight * preserve
    loss = torch.where(use_mask, masked, plain).mean()
    return {"loss": loss, "face": face.mean().detach(), "preserve": preserve[use_mask].mean().detach()}


class _FeedFaceRecipeBase(Recipe):
    """What both bases share: data, the trainable wrapper, noise per sample, the loss."""

    @classmethod
    def default_config(cls) -> dict[str, Any]:
        # the release: AdamW lr 2e-5, weight decay 0.03, betas (0.9, 0.9), 100 warm-up steps then constant
        return {
            "train": {
                "learning_rate": 2e-5,
                "adam_weight_decay": 0.03,
                "adam_beta2": 0.9,
                "lr_scheduler": "constant_with_warmup",
                "lr_warmup_steps": 100,
                "max_grad_norm": 1.0,
            }
        }

    def build_dataset(self) -> FeedFaceDataset:
        data, options = self.config.data, self.options
        return FeedFaceDataset(
            read_records(data.train, check_files=data.check_files),
            data.resolution,
            reference_source=options.reference_source,
            reference_flip=options.reference_flip,
            reference_dropout=options.reference_dropout,
            mask_probability=options.mask_probability,
            center_crop=data.center_crop,
            random_flip=data.random_flip,
        )

    def collator(self) -> Any:
        return functools.partial(_collate, tokenizer=self.tokenizer)

    def _normal(self, generators: list[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
        """One standard-normal draw of ``shape`` per sample, each from its sample's generator."""
        return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(self.accelerator.device)

    def _generators(self, batch: dict[str, Any]) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(sample_seed(s, NOISE_STREAM)) for s in batch["seeds"]]

    def _frozen(self, *modules: torch.nn.Module) -> None:
        for module in modules:
            module.requires_grad_(False).eval().to(self.accelerator.device)

    def fresh_model(self, name: str) -> torch.nn.Module:
        bare = self.unwrap(name)
        adapter = type(bare.adapter).from_config(bare.adapter.config)
        return FeedFaceModel(adapter, bare.denoiser)

    def _pipeline(self, adapter: torch.nn.Module) -> Any:
        raise NotImplementedError

    def _with_pipeline(self, adapter: torch.nn.Module, use: Any) -> Any:
        """Run ``use(pipeline)`` on a pipeline around ``adapter`` (which attaches it itself), then re-attach the
        training hooks."""
        adapter.detach()
        try:
            pipeline = self._pipeline(adapter)
            pipeline.set_progress_bar_config(disable=True)
            return use(pipeline)
        finally:
            adapter.detach()
            self._attach(adapter)
            adapter.set_face_tokens(None)

    def _attach(self, adapter: torch.nn.Module) -> None:
        adapter.attach(self.denoiser)

    def validate(self) -> list[Image.Image]:
        """For the first few training records: the reference crop (enlarged) and a generation from the record's
        image with another record's caption."""
        from PIL import Image

        options, dataset = self.options, self.dataset
        size = self.config.data.resolution
        count = min(options.validation_samples, len(dataset))

        def generate(pipeline: Any) -> list[Image.Image]:
            images = []
            for k in range(count):
                record = dataset.records[k]
                photo = load_rgb(record.image, record.source)
                crop = dataset.reference_crop(record.image, record)
                tokens = pipeline.feed.encode_faces(self._face_pixels(crop))
                with self.accelerator.autocast():
                    out = pipeline(
                        face_tokens=tokens,
                        prompt=dataset.records[(k + 1) % len(dataset)].caption,
                        seed=options.validation_seed + k,
                        num_inference_steps=options.validation_inference_steps,
                        height=size,
                        width=size,
                    )
                images += [Image.fromarray(photo).resize((size, size)), out.images[0]]
            return images

        return self._with_pipeline(self.unwrap("feedface").adapter, generate)

    def _face_pixels(self, crop: np.ndarray) -> torch.Tensor:
        from ...methods.feedface import preprocess_faces

        return preprocess_faces(crop).to(self.accelerator.device)

    def save(self, output_dir: Path) -> None:
        exported = self.export("feedface")  # collective under FSDP/DeepSpeed
        if not self.accelerator.is_main_process:
            return
        adapter = exported.adapter
        if adapter is not self.unwrap("feedface").adapter:  # a fresh copy: give it the training hooks' place
            self.unwrap("feedface").adapter.detach()
            self._attach(adapter)
        self._with_pipeline(adapter, lambda pipeline: pipeline.save_pretrained(output_dir, safe_serialization=True))
        if adapter is not self.unwrap("feedface").adapter:
            adapter.detach()
            self._attach(self.unwrap("feedface").adapter)


# --------------------------------------------------------------------------------------------------------------------
# SD1.5
# --------------------------------------------------------------------------------------------------------------------


def _tower(encoder: torch.nn.Module) -> torch.nn.Module:
    """The ``CLIPVisionModel`` inside a :class:`~idfusion.methods.feedface.FaceEncoder` (its holder unwrapped)."""
    from transformers import CLIPVisionModel

    model = encoder.clip_model
    return model if isinstance(model, CLIPVisionModel) else model.vision_model


def _recognizer(name: str) -> Any:
    from ...faces.analyzer import FaceAnalyzer

    return FaceAnalyzer("world" if name.startswith("world") else "hog", name, crops=()).recognizer


def fit_face_encoder(
    encoder: torch.nn.Module,
    records: Sequence[ImageRecord],
    teacher: str,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Fit ``encoder``'s CLIP tower (a :class:`~idfusion.methods.feedface.FaceEncoder`) to a face recognizer.

    Each step takes ``batch_size`` records (seeded), their FeedFace face crops (flipped with p = 0.5) and the
    teacher's unit embedding of the face (from the record's landmarks); the tower's penultimate CLS token goes through
    a linear head, and ``1 - cos`` to the teacher is minimised (AdamW, 50 warm-up steps, cosine decay). The head is
    dropped afterwards; the tower is left frozen.

    Returns:
        ``{"first_loss", "last_loss"}`` (the mean of the first and last 20 steps).
    """
    from ...methods.feedface import face_crop, preprocess_faces

    usable = [r for r in records if len(r.faces) == 1 and r.faces[0].landmarks is not None]
    if not usable:
        raise DataError("face_encoder_teacher: no record has exactly one face with landmarks")
    recognizer = _recognizer(teacher)

    def image(record: ImageRecord) -> np.ndarray:  # decoded when used: photos may be large
        return load_rgb(record.image, record.source)

    marks = [np.asarray(r.faces[0].landmarks, np.float32) for r in usable]  # (5, 2) each
    if hasattr(recognizer, "preprocess") and hasattr(recognizer, "embed_crops"):  # aligned crops, then one batch
        aligned = np.stack([recognizer.preprocess(image(r), m) for r, m in zip(usable, marks, strict=True)])
        targets = list(recognizer.embed_crops(aligned))
    else:
        boxes = [np.asarray(r.faces[0].bbox, np.float32)[None] for r in usable]
        targets = [recognizer.embed(image(r), m[None], b)[0] for r, m, b in zip(usable, marks, boxes, strict=True)]
    teacher_features = torch.from_numpy(np.stack(targets)).float()
    teacher_features = F.normalize(teacher_features, dim=-1)  # (N, D)
    tower = _tower(encoder)
    tower.requires_grad_(True).train().to(device)
    head = torch.nn.Linear(tower.config.hidden_size, teacher_features.shape[1]).to(device)
    parameters = [*tower.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.01)
    rng = np.random.default_rng(sample_seed(seed, TEACHER_STREAM))
    torch.manual_seed(sample_seed(seed, TEACHER_STREAM))
    losses = []
    for step in range(steps):
        warm = min(1.0, (step + 1) / 50)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate * warm * 0.5 * (1 + math.cos(math.pi * step / steps))
        chosen = rng.integers(len(usable), size=batch_size)
        flips = rng.random(batch_size) < 0.5
        crops = []
        for k, flip in zip(chosen, flips, strict=True):
            crop = face_crop(image(usable[k]), usable[k].faces[0].bbox)
            crops.append(crop[:, ::-1] if flip else crop)
        pixels = preprocess_faces(crops).to(device)
        hidden = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]  # (B, 50, C)
        student = F.normalize(head(hidden[:, 0]), dim=-1)
        loss = (1 - (student * teacher_features[chosen].to(device)).sum(-1)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            logger.info("face encoder fit to %s: step %d/%d, 1 - cos %.4f", teacher, step + 1, steps, losses[-1])
    tower.requires_grad_(False).eval()
    window = min(20, len(losses))
    return {"first_loss": float(np.mean(losses[:window])), "last_loss": float(np.mean(losses[-window:]))}


class FeedFaceSD15Recipe(_FeedFaceRecipeBase):
    name = "feedface-sd15"
    config_class = FeedFaceSD15Config

    def build(self) -> dict[str, torch.nn.Module]:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer, CLIPVisionModel

        from ...methods.feedface import SD15FeedAdapter
        from ...pipelines.pipeline_feedface_sd15 import SCHEDULER
        from ...pipelines.scheduling import make_scheduler

        options, folder = self.options, self.options.pretrained
        self.unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
        self.vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
        self.text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
        self.tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
        self.noise_scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
        self.inference_scheduler = make_scheduler(SCHEDULER, self.noise_scheduler.config)
        if self.noise_scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError(
                f"recipe.pretrained: {folder}: unsupported prediction type {self.noise_scheduler.config.prediction_type!r}"
            )

        cached = self.config.output_dir / FACE_ENCODER_DIR
        source = cached if (cached / "config.json").is_file() else options.face_encoder
        if source is not None:
            tower = CLIPVisionModel.from_pretrained(source)
            vision_config = {k: getattr(tower.config, k) for k in _VISION_KEYS}
        else:
            vision_config, tower = dict(options.face_encoder_config), None
        face_dim = options.face_dim or int(self.unet.config.cross_attention_dim)
        try:
            adapter = SD15FeedAdapter.for_unet(
                self.unet, face_dim=face_dim, num_heads=options.num_heads, vision_config=vision_config
            )
        except (ValueError, TypeError) as error:
            raise ConfigError(f"recipe: cannot build the feed adapter for {folder}: {error}") from None
        if tower is not None:
            _tower(adapter.preprocess_module).load_state_dict(tower.state_dict())
        elif options.face_encoder_teacher is None:
            logger.warning("feedface-sd15: a random face-encoder tower (no face_encoder or teacher): tests only")
        if options.face_encoder_teacher is not None and source is not cached:
            self._fit_face_encoder(adapter, cached)
        adapter.preprocess_module.clip_model.requires_grad_(False).eval()

        self._frozen(self.unet, self.vae, self.text_encoder)
        self.denoiser = self.unet
        adapter.attach(self.unet)
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        size = self.config.data.resolution
        self.latent_shape = (self.vae.config.latent_channels, size // factor, size // factor)
        model = FeedFaceModel(adapter, self.unet)
        model.train()
        adapter.preprocess_module.clip_model.eval()  # frozen: no dropout
        return {"feedface": model}

    def _fit_face_encoder(self, adapter: torch.nn.Module, cached: Path) -> None:
        """Fit the tower on the main process, save it under ``output_dir`` and load it on every process."""
        from transformers import CLIPVisionModel

        options, accelerator = self.options, self.accelerator
        if accelerator.is_main_process:
            with torch.random.fork_rng(devices=[]):  # the global RNG stays where a resumed run (no fit) has it
                result = fit_face_encoder(
                    adapter.preprocess_module,
                    self.dataset.records,
                    options.face_encoder_teacher,
                    steps=options.teacher_steps,
                    batch_size=options.teacher_batch_size,
                    learning_rate=options.teacher_learning_rate,
                    seed=self.config.seed,
                )
            _tower(adapter.preprocess_module).save_pretrained(cached, safe_serialization=True)
            (cached / "fit.json").write_text(json.dumps({"teacher": options.face_encoder_teacher, **result}))
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            _tower(adapter.preprocess_module).load_state_dict(CLIPVisionModel.from_pretrained(cached).state_dict())

    def loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        device = self.accelerator.device
        generators = self._generators(batch)
        eps = self._normal(generators, self.latent_shape)
        noise = self._normal(generators, self.latent_shape)
        num_timesteps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.stack([torch.randint(0, num_timesteps, (), generator=g) for g in generators]).to(device)
        scale = self.vae.config.scaling_factor
        with torch.no_grad(), self.accelerator.autocast():
            posterior = self.vae.encode(batch["pixel_values"]).latent_dist
            latents = ((posterior.mean + posterior.std * eps) * scale).float()
            context = self.text_encoder(batch["input_ids"])[0]
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        model = self.models["feedface"]
        prediction = model(batch["references"], noisy, timesteps, context, multiplier=self.options.multiplier).sample
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        use_mask = batch["use_mask"].to(device)
        base = None
        if bool(use_mask.any()):
            with self.accelerator.autocast():
                base = self.unwrap("feedface").adapter_off(noisy, timesteps, context).sample
        mask = _latent_mask(batch["face_masks"].to(device), self.latent_shape[1:])
        return _feedface_loss(prediction, target, base, mask, use_mask, self.options.preservation_weight)

    def save(self, output_dir: Path) -> None:
        import shutil

        super().save(output_dir)
        if self.accelerator.is_main_process:  # the base's tokenizer files, as text-to-image saves them
            shutil.rmtree(output_dir / "tokenizer")
            shutil.copytree(self.options.pretrained / "tokenizer", output_dir / "tokenizer")

    def _pipeline(self, adapter: torch.nn.Module) -> Any:
        from ...pipelines.pipeline_feedface_sd15 import FeedFaceSD15Pipeline

        return FeedFaceSD15Pipeline(
            self.vae, self.text_encoder, self.tokenizer, self.unet, self.inference_scheduler, adapter
        )


_VISION_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                "patch_size", "hidden_act", "layer_norm_eps")  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------
# U-ViT (UniDiffuser-v1)
# --------------------------------------------------------------------------------------------------------------------

_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class FeedFaceRecipe(_FeedFaceRecipeBase):
    name = "feedface"
    config_class = FeedFaceUViTConfig

    def build(self) -> dict[str, torch.nn.Module]:
        from diffusers import DDPMScheduler

        from ...methods import feedface
        from ...pipelines.pipeline_feedface import FeedFacePipeline

        options = self.options
        pipe = FeedFacePipeline.from_pretrained(options.pretrained, local_files_only=True)
        loaded = pipe.feed
        loaded.detach()
        self.vae, self.text_encoder, self.tokenizer = pipe.vae, pipe.text_encoder, pipe.tokenizer
        self.text_decoder, self.unet, self.inference_scheduler = pipe.text_decoder, pipe.unet, pipe.scheduler
        del pipe
        adapter = loaded
        if options.adapter_init == "fresh":  # fresh feed blocks and projection on the release's (frozen) CLIP tower
            heads = loaded.blocks[0].blocks[0].attn1.heads
            adapter.blocks = torch.nn.ModuleList([feedface.FeedBlock(loaded.dim, heads) for _ in loaded.blocks])
            adapter.preprocess_module.project_layer.reset_parameters()
        adapter.set_multiplier(options.multiplier)
        adapter.preprocess_module.clip_model.requires_grad_(False)
        self.noise_scheduler = DDPMScheduler.from_config(feedface.SCHEDULER_CONFIG)
        self.clip_image_encoder = None
        if options.clip_image_encoder is not None:
            from transformers import CLIPVisionModelWithProjection

            self.clip_image_encoder = CLIPVisionModelWithProjection.from_pretrained(options.clip_image_encoder)
            self._frozen(self.clip_image_encoder)
        else:
            logger.warning("feedface: no clip_image_encoder; the clip_img stream is trained from zeros (tests only)")
        self._frozen(self.unet, self.vae, self.text_encoder, self.text_decoder)
        self.denoiser = self.unet
        adapter.attach(self.unet)
        size = self.config.data.resolution
        self.latent_shape = (self.vae.config.latent_channels, size // 8, size // 8)  # UniDiffuser's KL-f8
        self.clip_dim = int(self.unet.config.clip_img_dim)
        model = FeedFaceModel(adapter, self.unet)
        model.train()
        adapter.preprocess_module.clip_model.eval()
        return {"feedface": model}

    def _clip_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """UniDiffuser's clean ``clip_img``: the CLIP ViT-B/32 image embedding of the target, ``(B, 1, 512)``."""
        if self.clip_image_encoder is None:
            return pixels.new_zeros(pixels.shape[0], 1, self.clip_dim)
        size = self.clip_image_encoder.config.image_size
        x = F.interpolate((pixels + 1) / 2, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
        mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (_CLIP_MEAN, _CLIP_STD))
        return self.clip_image_encoder(pixel_values=(x - mean) / std).image_embeds[:, None]  # (B, 1, 512)

    def loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        from ...methods.feedface import DATA_TYPE  # noqa: F401 - the sampling value, for contrast with training's

        device = self.accelerator.device
        generators = self._generators(batch)
        eps = self._normal(generators, self.latent_shape)
        noise = self._normal(generators, self.latent_shape)
        clip_noise = self._normal(generators, (1, self.clip_dim))
        # UniDiffuser's n ~ U{1..N}: the model gets n, the noise level is alphas_cumprod[n - 1]
        index = torch.stack([torch.randint(0, 1000, (), generator=g) for g in generators]).to(device)
        with torch.no_grad(), self.accelerator.autocast():
            posterior = self.vae.encode(batch["pixel_values"]).latent_dist
            z = ((posterior.mean + posterior.std * eps) * self.vae.config.scaling_factor).float()
            clip = self._clip_image(batch["pixel_values"]).float()
            text = self.text_decoder.encode(self.text_encoder(batch["input_ids"])[0])  # (B, 77, 64)
        alphas = self.noise_scheduler.alphas_cumprod.to(device)[index]
        a = alphas.sqrt().view(-1, 1, 1, 1)
        s = (1 - alphas).sqrt().view(-1, 1, 1, 1)
        z_noisy, clip_noisy = a * z + s * noise, a[:, :, 0] * clip + s[:, :, 0] * clip_noise
        inputs = (z_noisy, clip_noisy, text.float())
        times = {"timestep_img": index + 1, "timestep_text": 0, "data_type": self.options.data_type}
        model = self.models["feedface"]
        with self.accelerator.autocast():
            prediction = model(batch["references"], *inputs, **times, multiplier=self.options.multiplier)[0]
        use_mask = batch["use_mask"].to(device)
        base = None
        if bool(use_mask.any()):
            with self.accelerator.autocast():
                base = self.unwrap("feedface").adapter_off(*inputs, **times)[0]
        mask = _latent_mask(batch["face_masks"].to(device), self.latent_shape[1:])
        return _feedface_loss(prediction, noise, base, mask, use_mask, self.options.preservation_weight)

    def _attach(self, adapter: torch.nn.Module) -> None:
        adapter.attach(self.denoiser)
        adapter.set_multiplier(self.options.multiplier)

    def _pipeline(self, adapter: torch.nn.Module) -> Any:
        from ...pipelines.pipeline_feedface import FeedFacePipeline

        return FeedFacePipeline(
            self.vae, self.text_encoder, self.tokenizer, self.text_decoder, self.unet, self.inference_scheduler,
            adapter,
        )  # fmt: skip
