"""``fact``: train the FaceChain-FACT face adapter (Yu et al., arXiv 2410.12312) on a frozen SD1.5 folder.

What is trained, as the release's trainer selects it (spec ``facechain-fact.md`` §7.3): the resampler
(``local_fac_prj``) and the adapter at every cross-attention site (gated self-attention, gated GEGLU feed-forward,
the projection ``linear`` and the gates), i.e. one :class:`~idfusion.methods.fact.FactFaceAdapter`. The UNet, VAE,
text encoder and face encoder stay frozen. The sites' ``ln`` starts as each block's ``norm2`` (the release's
relocation) and trains with the rest.

One training sample, all of its randomness drawn from its seed (``data.sample_seed``), so resume and DDP are exact:

- the target image and its caption (the release always uses captions; ``caption_dropout`` is ours, default 0);
- the face the adapter reads: the 112x112 head-masked ArcFace-aligned crop the pipeline makes
  (:func:`~idfusion.methods.fact.face_crop` with :func:`~idfusion.faces.masks.head_mask`), of the target itself or,
  with probability ``face_shuffle``, of another image of the same identity (the record's ``references``): FACT's
  same-ID face shuffle, so the face and the denoising target may show different photos of one person (§7.2);
- face drop: with probability ``face_drop`` (release 0.1) the face encoder's tokens are replaced by zeros before the
  resampler (the null face the pipeline's negative branch uses). The release drops the whole batch at once; here
  each sample draws its own, which keeps a DDP run equal to one process;
- the loss: the MSE of the base's prediction type under its training noise schedule, plus ``fair_weight`` (release
  0.01, "reg001") times FAIR, the adapter's feature increment outside the face relative to the features there,
  averaged over samples and sites (:func:`fair_loss`; §7.1). Its face mask is the record's ``mask`` (else the face
  box), average-pooled to each site's resolution.

Not done: the release's shuffle curriculum (its schedule is unknown, §7.2: ``face_shuffle`` is a constant here) and
its batches of 3 images of one identity (the shared loop samples records at random; shuffle reads the identity's
other images from the record instead).

Face encoder (``face_encoder``): a TransFace weights file (``ms1mv2_model_TransFace_S.pt``, official key names:
its 144 post-LayerNorm tokens, as the release) or ``"world"``: the synthetic world's conditioning recognizer
(:class:`RecognizerTokenEncoder`: its last feature map as tokens, the analogue of TransFace's penultimate tokens).
Never the world's judge, which scores.

``adapter_init``: ``release`` starts the sites as GLIGEN and the release do (tanh gates at 0); ``zero-output``
(ours) opens the gates and zeroes the sites' output projections instead, which also starts exactly at the base
model but lets the adapter's weights learn from the first step (:func:`_zero_output_init`).

``adapter_scale`` is the adapter scale ``s`` the sites train at. The pipeline samples at 0.5 by default (the
release's); training at the scale the model will be sampled at makes the trained gates mean what they say there.

``save()`` writes a :class:`~idfusion.pipelines.pipeline_fact.FactPipeline` folder (the base's VAE, text encoder,
tokenizer and UNet, the face encoder, the trained adapter and a sampler for the base's schedule: PNDM, the
release's, or DPM-Solver++ for a zero-terminal-SNR base), loadable with ``registry.load_pipeline("fact", folder)``;
``sampling`` becomes its ``settings`` (call defaults that differ from the release's).

Example config::

    recipe:
      name: fact
      pretrained: runs/sd15              # any SD1.5 diffusers folder (frozen)
      face_encoder: models/ms1mv2_model_TransFace_S.pt
    data:
      train: data/train.jsonl            # records with a face (5 landmarks) and same-identity references
      resolution: 512
    train:
      max_steps: 300000
      batch_size: 3
      learning_rate: 5.0e-5
      lr_warmup_steps: 10000
    output_dir: runs/fact
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

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
    "FactConfig",
    "FactDataset",
    "FactModels",
    "FactRecipe",
    "RecognizerTokenEncoder",
    "fair_loss",
    "fair_ratio",
]

logger = logging.getLogger(__name__)

WORLD_ENCODER = "world"
FACE_CROP = 112  # the pipeline's aligned crop side (TransFace's input)
#: The release's resampler (spec §2.3): 1024 wide, 4 layers, 12 heads x 64, 16 queries, FF x4.
RELEASE_RESAMPLER = {"dim": 1024, "depth": 4, "dim_head": 64, "heads": 12, "num_queries": 16, "ff_mult": 4}
RESAMPLER_KEYS = ("dim", "depth", "dim_head", "heads", "num_queries", "ff_mult")
#: What ``sampling`` may set: the saved folder's ``settings``, the pipeline's call defaults where a model trained
#: here differs from the release (the world's: its base's steps and guidance, an empty negative prompt, no LoRA).
SAMPLING_SETTINGS = ("num_inference_steps", "guidance_scale", "adapter_scale", "negative_prompt", "default_lora")


def _face_encoder_source(value: Any) -> str | None:
    if value is None or str(value) == WORLD_ENCODER or Path(value).is_file():
        return None
    return f"expected {WORLD_ENCODER!r} or a TransFace weights file that exists, got {value!r}"


def _sampling_options(value: Any) -> str | None:
    if not isinstance(value, dict):
        return f"expected a mapping of {', '.join(SAMPLING_SETTINGS)}, got {value!r}"
    unknown = sorted(set(value) - set(SAMPLING_SETTINGS))
    return f"unknown FACT settings {unknown}; known: {', '.join(SAMPLING_SETTINGS)}" if unknown else None


def _resampler_options(value: Any) -> str | None:
    if not isinstance(value, dict):
        return f"expected a mapping of {', '.join(RESAMPLER_KEYS)}, got {value!r}"
    unknown = sorted(set(value) - set(RESAMPLER_KEYS))
    if unknown:
        return f"unknown keys {unknown}; known: {', '.join(RESAMPLER_KEYS)}"
    for key, number in value.items():
        if isinstance(number, bool) or not isinstance(number, int) or number < 1:
            return f"{key} must be a whole number >= 1, got {number!r}"
    return None


@dataclass
class FactConfig(RecipeConfig):
    name: str = "fact"
    pretrained: Path | None = setting(None, check=existing_folder)  # SD1.5 diffusers folder (required, frozen)
    face_encoder: str | None = setting(None, check=_face_encoder_source)  # TransFace file or "world" (required)
    resampler: dict[str, int] = setting(factory=dict, check=_resampler_options)  # over RELEASE_RESAMPLER
    adapter_scale: float = setting(1.0, check=between(0, 10))  # the scale s the sites train at
    adapter_init: Literal["release", "zero-output"] = "release"  # how the sites start (both: exactly the base)
    fair_weight: float = setting(0.01, check=non_negative)  # lambda of FAIR (release "reg001")
    face_drop: float = setting(0.1, check=between(0, 1))  # zero face tokens (release face_prob 0.1)
    face_shuffle: float = setting(0.5, check=between(0, 1))  # the face from another image of the identity
    caption_dropout: float = setting(0.0, check=between(0, 1))  # ours; the release always uses the caption
    face_loss_weight: float = setting(0.0, check=non_negative)  # ours: MSE on face cells weighted by 1 + w
    sampling: dict[str, Any] = setting(factory=dict, check=_sampling_options)  # the saved folder's call defaults
    scheduler: str = "auto"  # the saved folder's sampler: auto (PNDM, or DPM++ for zero-SNR bases) or a name
    validation_samples: int = setting(2, check=positive)
    validation_inference_steps: int = setting(20, check=positive)
    validation_seed: int = 0

    def __post_init__(self) -> None:
        if self.pretrained is None:
            raise ConfigFieldError("pretrained", "required: the SD1.5 diffusers folder the adapter is trained on")
        if self.face_encoder is None:
            raise ConfigFieldError("face_encoder", f"required: a TransFace weights file or {WORLD_ENCODER!r}")
        if not (Path(self.pretrained) / "model_index.json").is_file():
            raise ConfigFieldError(
                "pretrained", f"not a diffusers pipeline folder (no model_index.json): {self.pretrained}"
            )
        self.resampler = {**RELEASE_RESAMPLER, **self.resampler}


# --------------------------------------------------------------------------------------------------------------------
# The world's face encoder
# --------------------------------------------------------------------------------------------------------------------


class RecognizerTokenEncoder(ModelMixin, ConfigMixin):
    """A face-recognition CNN's last feature map as FACT face tokens: the stand-in for TransFace's 144 penultimate
    tokens where FACT runs on the synthetic world, whose conditioning recognizer is :class:`~idfusion.world.nets.
    RecognizerNet`.

    It takes the pipeline's TransFace input (``(B, 3, 112, 112)`` ArcFace-aligned crops in [-1, 1]), resizes it to
    the recognizer's crop (the same template at ``crop / 112`` scale, so the resized crop is the recognizer's own
    alignment), runs the recognizer's trunk and returns its ``(B, h*w, C)`` feature map (before the global
    depthwise convolution and the embedding head, as FACT reads TransFace before its SE and embedding heads).

    Args:
        widths, blocks, crop: the :class:`~idfusion.world.nets.RecognizerNet` trunk's configuration.
    """

    @register_to_config
    def __init__(
        self, widths: Sequence[int] = (24, 48, 96, 128), blocks: Sequence[int] = (1, 1, 1, 1), crop: int = 56
    ):
        super().__init__()
        from ...world.nets import RecognizerNet

        self.features = RecognizerNet(tuple(widths), tuple(blocks), crop).features
        self.requires_grad_(False)

    @classmethod
    def from_world(cls) -> RecognizerTokenEncoder:
        """The trunk of the shipped world conditioning recognizer (``--recognizer world``), in eval mode."""
        from ...world.backends import weights_path
        from ...world.nets import load_net

        net, _ = load_net(weights_path(WORLD_ENCODER))
        config = net.config
        encoder = cls(config["widths"], config["blocks"], config["crop"])
        encoder.features.load_state_dict(net.features.state_dict())
        return encoder.eval()

    @property
    def pos_embed(self) -> torch.Tensor:
        # fact.encode_face_tokens reads the device and dtype from TransFace's position embedding
        return self.features[0][0].weight

    @property
    def num_tokens(self) -> int:
        side = self.config.crop
        for _ in self.config.widths:
            side = (side + 1) // 2
        return side * side

    @property
    def token_dim(self) -> int:
        return int(self.config.widths[-1])

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, 3, 112, 112)`` in [-1, 1] -> ``(B, h*w, C)`` tokens."""
        crop = self.config.crop
        x = F.interpolate(pixel_values.float(), size=(crop, crop), mode="bilinear", antialias=True)
        x = self.features(x * 0.5)  # [-1, 1] -> [0, 1] - 0.5, the recognizer's input
        return x.flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, h*w, C)


def _face_encoder(source: str) -> nn.Module:
    from ...methods.fact import load_transface

    if source == WORLD_ENCODER:
        return RecognizerTokenEncoder.from_world()
    return load_transface(source)


def _token_shape(encoder: nn.Module) -> tuple[int, int]:
    """``(tokens, width)`` of one face's encoder output."""
    if isinstance(encoder, RecognizerTokenEncoder):
        return encoder.num_tokens, encoder.token_dim
    return encoder.num_patches, encoder.embed_dim


# --------------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------------


def _record_face(record: ImageRecord) -> Any:
    from ...faces import Face

    face = record.faces[0]
    return Face(
        bbox=np.asarray(face.bbox, np.float32),
        det_score=1.0,
        landmarks=np.asarray(face.landmarks, np.float32),
        detector="record",
    )


class FactDataset:
    """Target images and the face crop the adapter reads, seeded per sample.

    ``dataset[(index, seed)]`` gives ``pixel_values`` ``(3, R, R)`` in [-1, 1], ``caption``, ``face_pixels``
    ``(3, 112, 112)`` in [-1, 1] (the pipeline's head-masked aligned crop), ``keep_face`` (False: face dropped),
    ``face_mask`` ``(1, R, R)`` in [0, 1] (the record's mask, else its face box), ``index`` and ``seed``.

    Records need exactly one face with 5 landmarks. A reference that is another record's image is cropped with that
    record's face; any other file is taken as a ready aligned crop and resized to 112 x 112.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        resolution: int,
        *,
        face_shuffle: float = 0.0,
        face_drop: float = 0.0,
        caption_dropout: float = 0.0,
        center_crop: bool = True,
        random_flip: bool = False,
    ):
        usable = [r for r in records if len(r.faces) == 1]
        if not usable:
            raise DataError("no record has exactly one face")
        for record in usable:
            if record.faces[0].landmarks is None or len(record.faces[0].landmarks) != 5:
                raise DataError(
                    f"{record.source}: faces: FACT aligns its face crop by 5 landmarks; this face has none"
                )
        if len(usable) < len(records):
            logger.info("fact: %d of %d records used (one face each)", len(usable), len(records))
        self.records = usable
        self.by_path = {r.image: r for r in usable}
        self.resolution = resolution
        self.face_shuffle, self.face_drop, self.caption_dropout = face_shuffle, face_drop, caption_dropout
        self.center_crop, self.random_flip = center_crop, random_flip

    def __len__(self) -> int:
        return len(self.records)

    def face_crop(self, path: Path, record: ImageRecord) -> np.ndarray:
        """The ``(112, 112, 3)`` uint8 crop the pipeline would encode from image ``path`` (``record`` names it in
        errors)."""
        from PIL import Image

        from ...faces.masks import head_mask
        from ...methods.fact import face_crop

        owner = self.by_path.get(path)
        image = load_rgb(path, record.source)
        if owner is None:  # a ready aligned crop
            return np.asarray(Image.fromarray(image).resize((FACE_CROP, FACE_CROP), Image.Resampling.LANCZOS))
        face = _record_face(owner)
        return face_crop(image, face.landmarks, head_mask(face, image.shape[:2]))

    def target(self, record: ImageRecord, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``(R, R, 3)`` uint8 training crop and its ``(R, R)`` float face mask in [0, 1]."""
        crop = crop_target(record, seed, self.resolution, center_crop=self.center_crop, random_flip=self.random_flip,
                           mask=record.mask or True)  # fmt: skip
        return crop.pixels, crop.mask

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = key if isinstance(key, tuple) else (key, key)
        index, seed = int(index), int(seed)
        record = self.records[index]
        rng = np.random.default_rng(sample_seed(seed, CONDITION_STREAM))
        # every draw up front, so no option shifts another's
        shuffle, drop, drop_caption = rng.random(3) < (self.face_shuffle, self.face_drop, self.caption_dropout)
        pick = int(rng.integers(max(len(record.references), 1)))
        source = record.references[pick] if shuffle and record.references else record.image
        pixels, mask = self.target(record, seed)
        crop = self.face_crop(source, record)
        return {
            "pixel_values": torch.from_numpy(pixels).permute(2, 0, 1).float().div(127.5).sub(1.0),
            "caption": "" if drop_caption else record.caption,
            "face_pixels": torch.from_numpy(crop).permute(2, 0, 1).float().div(127.5).sub(1.0),
            "keep_face": not drop,
            "face_mask": torch.from_numpy(mask)[None],  # (1, R, R)
            "index": index,
            "seed": seed,
        }


def _collate(items: list[dict[str, Any]], *, tokenizer: Any) -> dict[str, Any]:
    from ...prompt_encoders import tokenize_prompts

    return {
        "pixel_values": torch.stack([item["pixel_values"] for item in items]),
        "input_ids": tokenize_prompts(tokenizer, [item["caption"] for item in items]),
        "face_pixels": torch.stack([item["face_pixels"] for item in items]),
        "keep_face": torch.tensor([item["keep_face"] for item in items]),
        "face_masks": torch.stack([item["face_mask"] for item in items]),
        "seeds": [item["seed"] for item in items],
    }


# --------------------------------------------------------------------------------------------------------------------
# FAIR
# --------------------------------------------------------------------------------------------------------------------


def fair_ratio(increment: torch.Tensor, hidden: torch.Tensor, face: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """FAIR at one site, per sample: ``||increment * (1 - M)|| / ||hidden * (1 - M)||`` (Frobenius norms).

    Args:
        increment: ``(B, N, C)`` what the adapter added to the visual tokens (``x' - x``).
        hidden: ``(B, N, C)`` the visual tokens entering the adapter (``x``).
        face: ``(B, N)`` the face mask at this site's resolution, in [0, 1].

    Returns:
        ``(B,)`` ratios.
    """
    outside = (1.0 - face)[..., None]  # (B, N, 1)
    numerator = (increment * outside).flatten(1).norm(dim=1)
    denominator = (hidden * outside).flatten(1).norm(dim=1)
    return numerator / denominator.clamp_min(eps)


def fair_loss(sites: Sequence[tuple[torch.Tensor, torch.Tensor]], face_masks: torch.Tensor) -> torch.Tensor:
    """FAIR over the adapter sites: the mean over samples and sites of :func:`fair_ratio`.

    Args:
        sites: per site ``(hidden, increment)``, each ``(B, N, C)`` with ``N = h * w`` of a square latent grid.
        face_masks: ``(B, 1, R, R)`` face masks in [0, 1] at image resolution; average-pooled to each site's grid.
    """
    ratios = []
    for hidden, increment in sites:
        side = int(round(hidden.shape[1] ** 0.5))
        if side * side != hidden.shape[1]:
            raise ValueError(f"FAIR needs square feature maps, got {hidden.shape[1]} tokens")
        face = F.adaptive_avg_pool2d(face_masks.to(hidden), (side, side)).flatten(1)  # (B, 1, s, s) -> (B, s*s)
        ratios.append(fair_ratio(increment.float(), hidden.float(), face.float()))
    if not ratios:
        return face_masks.new_zeros(())
    return torch.stack(ratios).mean()


class _FairProbe:
    """Forward hooks that collect, per site, the visual tokens entering the adapter and the adapter's increment:
    ``s tanh(alpha_attn) attn(...)[:, :N] + s tanh(alpha_dense) ff(...)``, exactly the two terms the processor adds."""

    def __init__(self, blocks: Sequence[nn.Module], adapter: nn.Module, processors: Sequence[Any]):
        self.sites: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.enabled = False
        self._hooks = []
        self._hidden: dict[int, torch.Tensor] = {}
        self._attn: dict[int, torch.Tensor] = {}
        for k, (block, site, processor) in enumerate(zip(blocks, adapter.sites, processors, strict=True)):
            self._hooks += [
                block.norm2.register_forward_pre_hook(functools.partial(self._keep_hidden, k)),
                site.attn.register_forward_hook(functools.partial(self._keep_attn, k)),
                site.ff.register_forward_hook(functools.partial(self._finish, k, site, processor)),
            ]

    def _keep_hidden(self, k: int, module: nn.Module, args: tuple) -> None:
        if self.enabled:
            self._hidden[k] = args[0]

    def _keep_attn(self, k: int, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if self.enabled:
            self._attn[k] = output

    def _finish(self, k: int, site: nn.Module, processor: Any, module: nn.Module, args: tuple, output) -> None:
        if not self.enabled:
            return
        hidden = self._hidden.pop(k)
        attn = self._attn.pop(k)[:, : hidden.shape[1]]
        s = processor.scale
        self.sites.append((hidden, s * torch.tanh(site.alpha_attn) * attn + s * torch.tanh(site.alpha_dense) * output))

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()


# --------------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------------


class FactModels(nn.Module):
    """The frozen UNet with the trainable FACT adapter attached, behind one ``forward`` (DDP synchronises gradients
    only of modules called through ``forward``; the adapter is reached through the UNet's processors)."""

    def __init__(self, unet: nn.Module, adapter: nn.Module, scale: float = 1.0):
        super().__init__()
        self.unet, self.adapter, self.scale = unet, adapter, scale
        self.unet.requires_grad_(False)
        self._handle = None
        self._probe: _FairProbe | None = None
        self.attach()

    def attach(self) -> None:
        """(Re)install the adapter's processors and the FAIR hooks on the UNet."""
        from ...methods.fact import adapter_sites, attach_face_adapter

        self.detach()
        self._handle = attach_face_adapter(self.unet, self.adapter, scale=self.scale)
        blocks = list(adapter_sites(self.unet).values())
        self._probe = _FairProbe(blocks, self.adapter, list(self._handle.processors.values()))

    def detach(self) -> None:
        """Take the processors and hooks off (the UNet is its base model again)."""
        if self._probe is not None:
            self._probe.remove()
            self._probe = None
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def forward(
        self,
        sample: torch.Tensor,
        timesteps: torch.Tensor,
        text: torch.Tensor,
        face_tokens: torch.Tensor,
        keep_face: torch.Tensor,
        fair: bool = False,
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """The UNet's prediction with context ``[text | resampler(tokens)]`` (dropped faces: tokens zeroed), and per
        site ``(hidden, increment)`` when ``fair``.

        Args:
            sample: ``(B, 4, h, w)`` noisy latents. timesteps: ``(B,)``. text: ``(B, 77, D)``.
            face_tokens: ``(B, T, C)`` face-encoder tokens. keep_face: ``(B,)`` bool.
        """
        tokens = face_tokens * keep_face.to(face_tokens)[:, None, None]  # zeros: the null face
        face = self.adapter.resampler(tokens)  # (B, T, C) -> (B, 16, D)
        context = torch.cat([text, face.to(text.dtype)], dim=1)  # (B, 77 + 16, D)
        probe = self._probe
        probe.sites, probe.enabled = [], fair
        try:
            prediction = self.unet(sample, timesteps, context).sample
        finally:
            probe.enabled = False
        sites, probe.sites = probe.sites, []
        return prediction, sites


#: The gates' start under ``adapter_init: zero-output`` (tanh(1) = 0.76).
ZERO_OUTPUT_GATE = 1.0


def _zero_output_init(adapter: nn.Module) -> None:
    """Start every site with open gates and zero output projections (of the self-attention and the feed-forward):
    the adapter adds exactly nothing, as with the release's zero gates, but the projections get gradients at once
    (with zero gates nothing but the gates does, and those only from a random adapter's output)."""
    with torch.no_grad():
        for site in adapter.sites:
            for projection in (site.attn.to_out[0], site.ff.net[2]):
                projection.weight.zero_()
                projection.bias.zero_()
            site.alpha_attn.fill_(ZERO_OUTPUT_GATE)
            site.alpha_dense.fill_(ZERO_OUTPUT_GATE)


def _read_scheduler_config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))


def inference_scheduler(name: str, base_config: dict[str, Any]) -> Any:
    """The saved folder's sampler: ``"auto"`` is the release's PNDM, or DPM-Solver++ (2M) for a base with zero
    terminal SNR (such as the world's), which PNDM cannot represent; any other name is built from the base's
    config."""
    from ...pipelines.scheduling import make_scheduler

    config = {k: v for k, v in base_config.items() if not k.startswith("_")}
    if name == "auto":
        name = "dpm++" if config.get("rescale_betas_zero_snr") else "pndm"
    return make_scheduler(name, config)


class FactRecipe(Recipe):
    name = "fact"
    config_class = FactConfig

    @classmethod
    def default_config(cls) -> dict[str, Any]:
        # the release's optimiser (spec §7.4): AdamW 5e-5, no weight decay, constant after warm-up
        return {"train": {"learning_rate": 5e-5, "adam_weight_decay": 0.0, "lr_scheduler": "constant_with_warmup"}}

    def build_dataset(self) -> FactDataset:
        data, options = self.config.data, self.options
        return FactDataset(
            read_records(data.train, check_files=data.check_files),
            data.resolution,
            face_shuffle=options.face_shuffle,
            face_drop=options.face_drop,
            caption_dropout=options.caption_dropout,
            center_crop=data.center_crop,
            random_flip=data.random_flip,
        )

    def build(self) -> dict[str, nn.Module]:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        from ...methods.fact import FactFaceAdapter

        options, folder = self.options, self.options.pretrained
        self.vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
        self.text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
        self.tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
        self.noise_scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
        try:
            self.inference_scheduler = inference_scheduler(options.scheduler, _read_scheduler_config(folder))
        except ValueError as error:
            raise ConfigFieldError("scheduler", str(error)) from None
        prediction_type = self.noise_scheduler.config.prediction_type
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError(f"recipe.pretrained: {folder}: unsupported prediction type {prediction_type!r}")
        try:
            self.face_encoder = _face_encoder(options.face_encoder)
        except (ValueError, OSError) as error:
            raise ConfigFieldError("face_encoder", f"{options.face_encoder}: {error}") from None
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
        if unet.config.cross_attention_dim != self.text_encoder.config.hidden_size:
            raise ConfigError(f"recipe.pretrained: {folder}: the UNet's context width is not the text encoder's")
        tokens, width = _token_shape(self.face_encoder)
        resampler = {**options.resampler, "embedding_dim": width, "num_input_tokens": tokens}
        adapter = FactFaceAdapter.for_unet(unet, resampler=resampler)
        if options.adapter_init == "zero-output":
            _zero_output_init(adapter)
        model = FactModels(unet, adapter, scale=options.adapter_scale)

        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        size = self.config.data.resolution
        if size % factor:
            raise ConfigError(f"data.resolution: {size} is not a multiple of the VAE's factor {factor}")
        self.latent_shape = (self.vae.config.latent_channels, size // factor, size // factor)
        device = self.accelerator.device
        for frozen in (self.vae, self.text_encoder, self.face_encoder):
            frozen.requires_grad_(False).eval().to(device)
        unet.eval().to(device)  # frozen: no dropout; the adapter trains
        adapter.train()
        return {"fact": model}

    def fresh_model(self, name: str) -> nn.Module:
        from diffusers import UNet2DConditionModel

        from ...methods.fact import FactFaceAdapter

        bare = self.unwrap(name)
        return FactModels(
            UNet2DConditionModel.from_config(bare.unet.config),
            FactFaceAdapter.from_config(bare.adapter.config),
            scale=bare.scale,
        )

    def collator(self) -> Any:
        return functools.partial(_collate, tokenizer=self.tokenizer)

    # -- loss ------------------------------------------------------------------------------------------------------

    def _normal(self, generators: list[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
        return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(self.accelerator.device)

    def loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        device = self.accelerator.device
        generators = [torch.Generator().manual_seed(sample_seed(s, NOISE_STREAM)) for s in batch["seeds"]]
        eps = self._normal(generators, self.latent_shape)
        noise = self._normal(generators, self.latent_shape)
        num_timesteps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.stack([torch.randint(0, num_timesteps, (), generator=g) for g in generators]).to(device)
        scale = self.vae.config.scaling_factor
        with torch.no_grad():
            with self.accelerator.autocast():
                posterior = self.vae.encode(batch["pixel_values"]).latent_dist
                latents = ((posterior.mean + posterior.std * eps) * scale).float()
                text = self.text_encoder(batch["input_ids"])[0]
            face_tokens = self.face_encoder(batch["face_pixels"].to(device)).float()  # float32, as the release
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        options = self.options
        with self.accelerator.autocast():
            prediction, sites = self.models["fact"](
                noisy, timesteps, text, face_tokens, batch["keep_face"].to(device), fair=options.fair_weight > 0
            )
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        error = (prediction.float() - target.float()).pow(2)  # (B, C, h, w)
        masks = batch["face_masks"].to(device)
        if options.face_loss_weight > 0:
            face = F.adaptive_avg_pool2d(masks, self.latent_shape[1:])  # (B, 1, h, w)
            weights = 1.0 + options.face_loss_weight * face
            mse = (weights * error).sum() / (weights.sum() * error.shape[1])
        else:
            mse = error.mean()
        terms = {"mse": error.mean().detach()}
        loss = mse
        if options.fair_weight > 0:
            fair = fair_loss(sites, masks)
            loss = loss + options.fair_weight * fair
            terms["fair"] = fair.detach()
        return {"loss": loss, **terms}

    # -- validate and save -----------------------------------------------------------------------------------------

    def _pipeline(self, model: FactModels) -> Any:
        from ...pipelines.pipeline_fact import FactPipeline

        model.detach()  # the pipeline attaches the adapter itself
        pipeline = FactPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=model.unet,
            scheduler=self.inference_scheduler,
            face_encoder=self.face_encoder,
            face_adapter=model.adapter,
            settings=dict(self.options.sampling) or None,  # the saved folder's call defaults
        )
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def validate(self) -> list[Image.Image]:
        """For the first few training records: the face crop (enlarged) and a generation from it with another
        record's caption, at the training adapter scale."""
        from PIL import Image

        from ...methods.fact import encode_face_tokens
        from ...pipelines.pipeline_fact import FaceTokens

        options, dataset = self.options, self.dataset
        model = self.unwrap("fact")
        size = self.config.data.resolution
        images = []
        pipeline = self._pipeline(model)
        try:
            for k in range(min(options.validation_samples, len(dataset))):
                record = dataset.records[k]
                crop = dataset.face_crop(record.image, record)
                resampler = pipeline.face_adapter.resampler
                tokens = FaceTokens(
                    encode_face_tokens(self.face_encoder, resampler, crop[None]), resampler.unconditional(1)
                )
                out = pipeline(
                    face_tokens=tokens,
                    prompt=dataset.records[(k + 1) % len(dataset)].caption,
                    negative_prompt="",
                    default_lora="off",
                    adapter_scale=options.adapter_scale,
                    seed=options.validation_seed + k,
                    num_inference_steps=options.validation_inference_steps,
                    height=size,
                    width=size,
                )
                images += [Image.fromarray(crop).resize((size, size), Image.Resampling.BILINEAR), out.images[0]]
        finally:
            pipeline.unload_face_adapter()
            model.attach()
        return images

    def save(self, output_dir: Path) -> None:
        import shutil

        from ...sd15 import save_pretrained_official

        exported = self.export("fact")  # collective under FSDP/DeepSpeed
        if not self.accelerator.is_main_process:
            return
        pipeline = self._pipeline(exported)
        try:
            pipeline.save_pretrained(output_dir, safe_serialization=True)
        finally:
            pipeline.unload_face_adapter()
            if exported is self.unwrap("fact"):
                exported.attach()
        # the text encoder under the release's key names and the base's tokenizer files, as the base was saved, so
        # the world's shipping finds them equal to the base's and leaves them out
        save_pretrained_official(self.text_encoder, output_dir / "text_encoder")
        shutil.rmtree(output_dir / "tokenizer")
        shutil.copytree(self.options.pretrained / "tokenizer", output_dir / "tokenizer")
