"""``adaface``: train AdaFace's inverse projector (Li et al., "AdaFace: A Versatile Face Encoder for Zero-Shot
Diffusion Model Personalization") from a frozen Arc2Face teacher, in the release's two stages.

What is trained, as the release does: the Arc2Face-branch projector ``prompt2token_proj``
(:class:`~idfusion.methods.adaface.AdaFaceProjector`, a CLIP text transformer with multi-KV attention) and its
``hidden_state_layer_weights``. Frozen: the Arc2Face encoder (step A, which turns the ArcFace embedding into
``X_img``), the Arc2Face UNet (the teacher), and the student's whole SD1.5 model (VAE, text encoder, UNet): identity
enters only through the 16 subject-token embeddings ``X_ada``. The projector's token and position tables are frozen
too by default (the v2 code's ``freeze_prompt2token_proj``; ``freeze_embeddings: false`` trains them as v1 did).

**Stage 1** (``stage: 1``, ``AdaFaceDistillRecipe``): distillation of the projector from Arc2Face (spec §2.10, v1
objective, v2 details where v1's are unknown). Per sample, every draw from its seed (``data.sample_seed``):

- with ``recon_prob`` (v1: about 12 %) a *reconstruction* sample: the student (the base UNet prompted with
  ``prompt``, ``"a photo of z"``, whose subject tokens carry ``X_ada`` of the image's own identity) predicts the
  noise of the noised training image at a uniform timestep; the loss weights latent cells on the face 1 and the
  rest ``recon_background_weight`` (the release's ``wds_bg_recon_discount`` 0.05; its background tokens ``y``,
  which soak up the background, are not part of inference and not built here);
- otherwise a *distillation* sample. With ``random_id_prob`` (0.4) the identity is random (``randn(512)``) and the
  chain starts from pure noise at the last timestep; else it is the image's identity, perturbed with
  ``id_noise_prob`` (0.6) by relative noise of std U(``id_noise_std``) (0.02-0.06, the norm kept), and the chain
  starts from the noised image at a timestep in ``timestep_range`` (v2: 0.7-0.9 T). The chain has 1/3/5/7 steps
  with probabilities 0.4/0.3/0.2/0.1, capped at ``max_denoising_steps``; each later timestep is the previous one
  times U[0.5^(n-1)^-0.3, 0.7^(n-1)^-0.3]. At every step the student's prediction is fitted to the teacher's: the
  Arc2Face UNet on ``[X_arc[0:4] ++ X_img]`` (the Arc2Face encoder's rows 0..19, the v2 teacher context), optionally
  with classifier-free guidance against the empty prompt (``teacher_cfg_prob``, v1: none; v2: 0.6 at U(1.5, 2.5)).
  The chain then moves on with the teacher's prediction (deterministic DDIM). The sample's loss is the sum of its
  step MSEs over sqrt(steps) (v2).

**Stage 2** (``stage: 2``, ``AdaFaceCompositionRecipe``): composition distillation, starting from a stage-1
folder. With ``distill_prob`` (0.2, the release's) a sample is a stage-1 sample as above; otherwise four prompts are
run through the frozen student UNet on the same noisy latent: subject-single (``prompt``), subject-comp (the
sample's composition with ``z``), class-single and class-comp (``z`` replaced by ``a <class_word>``). The
compositional delta loss fits ``eps(subject-comp) - eps(subject-single)`` to the (stop-gradient)
``eps(class-comp) - eps(class-single)``, so the subject tokens compose as the class word does; the subject-single
embeddings come, with ``frozen_single_prob`` (0.9), from a frozen copy of the starting projector so identity does
not drift; ``prompt_delta_weight`` adds the release's prompt-embedding delta regulariser (here on the text
encoder's EOS row, the prompt's summary, since the subject and class prompts differ in length). Compositions are
the records' captions (``composition_source: captions``; their ``a <class_word>`` becomes ``z``) or
``compositions``.

*What stage 2 reduces* (the release's composition iterations need a 48 GB GPU, spec §2.14): no compositional
priming (the multi-step denoising with the class-comp prompt that makes a composition-level latent first): the
latent is pure noise at the last timestep (``comp_pure_noise_prob``) or the noised training image; the delta loss is
on the UNet's outputs only, not on its cross-attention features; the mix-prompt distillation and the fg/bg
attention-preservation losses (which need those attention maps and BiSeNet masks of the primed image) are left out.

Also as the release: the identity comes from a 512-d ArcFace-style recognizer (``recognizer``: the ONNX
``arcface.onnx`` next to the teacher, or the synthetic world's), on each record's own face (its box and 5
landmarks; or a record's stored ``embeddings`` of that recognizer). ``widen_attention`` widens the projector's keys
and values (MKV) by a factor before training, as the release's later rounds do (x4 for stage 1's second round, x2
for stage 2): the first copy is the old weights, the others get relative noise ``widen_noise``. The release's
gradient scales (0.4 on the projector, 5 on the layer weights) do nothing under Adam beyond clipping, so they are
not reproduced; ``layer_weights_lr_scale`` gives the layer weights their own learning rate instead.

``save()`` writes an :class:`~idfusion.pipelines.pipeline_adaface.AdaFacePipeline` folder (``save_pretrained``): the
student's base components, ``id_encoder`` = the teacher's Arc2Face encoder (the ``X_img`` the projector learned
from), and the projector as ``models/adaface/adaface-stage<N>.safetensors`` in the format
:func:`~idfusion.methods.adaface.convert_adaface_checkpoint` writes (v2 template and tokens, no pickle). It loads with
``registry.load_pipeline("adaface", folder)`` and ``idfusion generate --method adaface --model OUTPUT/model``. Its
sampler is DDIM (the release's) unless the base has zero terminal SNR, then DPM-Solver++.

Example config::

    recipe:
      name: adaface
      stage: 1
      pretrained: models/adaface-release    # an AdaFace folder: the base model and the projector to start from
      teacher: models/arc2face              # an Arc2Face folder (arc2face/, encoder/, antelopev2/)
    data:
      train: data/train.jsonl               # idfusion records with one face each (box, 5 landmarks, mask)
      resolution: 512
    train:
      max_steps: 60000
      batch_size: 4
      learning_rate: 2.0e-6
    output_dir: runs/adaface-stage1

Without an AdaFace folder, ``base_model`` names any SD1.5 folder and the projector starts from its text encoder (the
release starts from openai CLIP ViT-L/14's text tower, which is SD1.5's text encoder).
"""

from __future__ import annotations

import copy
import json
import logging
import re
import tempfile
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
    "AdaFaceCompositionConfig",
    "AdaFaceCompositionRecipe",
    "AdaFaceConfig",
    "AdaFaceDataset",
    "AdaFaceDistillConfig",
    "AdaFaceDistillRecipe",
    "AdaFaceRecipe",
    "SamplePlan",
    "build_recognizer",
    "plan_sample",
    "projector_from_text_encoder",
    "record_embeddings",
    "widen_attention",
    "write_adaface_safetensors",
]

logger = logging.getLogger(__name__)

ID_DIM = 512  # ArcFace
CHAIN_LENGTHS = (1, 3, 5, 7)  # the release's multi-step distillation chains
CHAIN_PROBS = (0.4, 0.3, 0.2, 0.1)
TOKEN_KEY = "prompt2token_proj.text_model.embeddings.token_embedding.weight"
# Compositions in the spirit of the release's regexes (actions, outfits, places) for composition_source: list.
DEFAULT_COMPOSITIONS = (
    "wearing a red hat",
    "wearing sunglasses",
    "in a blue shirt",
    "smiling",
    "on a green background",
    "in a chef outfit",
    "on the beach",
    "reading a book",
)


def _pair(low: float, high: float):
    def check(value: Any) -> str | None:
        if value is None:
            return None
        if len(value) != 2 or not low <= value[0] <= value[1] <= high:
            return f"expected [a, b] with {low} <= a <= b <= {high}, got {value!r}"
        return None

    return check


@dataclass
class AdaFaceConfig(RecipeConfig):
    name: str = "adaface"
    stage: int = setting(1, check=between(1, 2))  # 1: distillation from Arc2Face; 2: composition distillation
    # an AdaFace folder (the release's layout, or one this recipe saved): its base model and its projector
    pretrained: Path | None = setting(None, check=existing_folder)
    checkpoint: str | None = None  # the AdaFace file inside pretrained's models/adaface/ (default: the newest)
    base_model: Path | None = setting(None, check=existing_folder)  # an SD1.5 folder; overrides pretrained's base
    # "auto": pretrained's projector if given, else the base's text encoder (the release's CLIP-L initialisation)
    projector_init: Literal["auto", "checkpoint", "text_encoder"] = "auto"
    teacher: Path | None = setting(None, check=existing_folder)  # an Arc2Face folder (needed for distillation)
    recognizer: Literal["onnx", "world"] = "onnx"  # the 512-d ArcFace-style recognizer the identities come from
    face_model_dir: Path | None = setting(None, check=existing_folder)  # ONNX models; default: the teacher's
    prompt: str = "a photo of z"  # the student's prompt in distillation (z: the subject tokens)
    freeze_embeddings: bool = True  # v2; v1 trained the projector's token and position tables too
    widen_attention: int = setting(1, check=positive)  # MKV: multiply the keys/values per token before training
    widen_layers: list[int] | None = None  # the layers widened (default all)
    widen_noise: float = setting(0.1, check=non_negative)  # relative noise on the new key/value copies
    layer_weights_lr_scale: float = setting(1.0, check=positive)
    # stage 1 (and stage 2's distillation samples)
    recon_prob: float = setting(0.12, check=between(0, 1))
    recon_background_weight: float = setting(0.05, check=between(0, 1))
    random_id_prob: float = setting(0.4, check=between(0, 1))
    id_noise_prob: float = setting(0.6, check=between(0, 1))
    id_noise_std: list[float] = setting(factory=lambda: [0.02, 0.06], check=_pair(0, 10))
    max_denoising_steps: int = setting(3, check=between(1, 7))
    timestep_range: list[float] = setting(factory=lambda: [0.7, 0.9], check=_pair(0, 1))
    teacher_cfg_prob: float = setting(0.0, check=between(0, 1))
    teacher_cfg_scale: list[float] = setting(factory=lambda: [1.5, 2.5], check=_pair(0, 100))
    # stage 2
    distill_prob: float = setting(0.2, check=between(0, 1))
    frozen_single_prob: float = setting(0.9, check=between(0, 1))
    class_word: str = "person"
    composition_source: Literal["captions", "list"] = "captions"
    compositions: list[str] = setting(factory=lambda: list(DEFAULT_COMPOSITIONS))
    comp_pure_noise_prob: float = setting(0.5, check=between(0, 1))
    prompt_delta_weight: float = setting(1e-4, check=non_negative)
    # the saved folder
    scheduler: str = "auto"  # its sampler: "auto" is DDIM, or DPM-Solver++ for a zero-terminal-SNR base
    validation_samples: int = setting(2, check=positive)
    validation_inference_steps: int = setting(20, check=positive)
    validation_seed: int = setting(0, check=non_negative)

    def __post_init__(self) -> None:
        if self.pretrained is None and self.base_model is None:
            raise ConfigFieldError(
                "pretrained", "missing: an AdaFace folder (or base_model, an SD1.5 folder) to start from (required)"
            )
        if self.projector_init == "checkpoint" and self.pretrained is None:
            raise ConfigFieldError("projector_init", "'checkpoint' needs pretrained (an AdaFace folder)")
        if self.pretrained is not None and not (
            (self.pretrained / "model_index.json").is_file() or (self.pretrained / "models" / "adaface").is_dir()
        ):
            raise ConfigFieldError(
                "pretrained", f"not an AdaFace folder (no model_index.json, no models/adaface/): {self.pretrained}"
            )
        if self.base_model is not None and not (self.base_model / "model_index.json").is_file():
            raise ConfigFieldError(
                "base_model", f"not a diffusers pipeline folder (no model_index.json): {self.base_model}"
            )
        needs_teacher = self.stage == 1 or self.distill_prob > 0
        if needs_teacher and self.teacher is None:
            what = "stage 1" if self.stage == 1 else "stage 2 with distill_prob > 0"
            raise ConfigFieldError("teacher", f"missing: {what} distils from an Arc2Face folder (required)")
        if self.teacher is not None and not (
            (self.teacher / "model_index.json").is_file() or (self.teacher / "arc2face").is_dir()
        ):
            raise ConfigFieldError(
                "teacher", f"not an Arc2Face folder (no arc2face/, no model_index.json): {self.teacher}"
            )
        if self.stage == 1 and self.recon_prob == 1.0:
            raise ConfigFieldError("recon_prob", "1 leaves stage 1 no distillation samples; use < 1")
        if re.search(r"\bz\b", self.prompt) is None:
            raise ConfigFieldError("prompt", f"must hold the subject placeholder z, got {self.prompt!r}")
        if not self.class_word.strip():
            raise ConfigFieldError("class_word", "must not be empty")
        if self.stage == 2 and self.composition_source == "list" and not self.compositions:
            raise ConfigFieldError("compositions", "empty; give at least one composition")


# --------------------------------------------------------------------------------------------------------------------
# Per-sample draws
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplePlan:
    """What one sample does, drawn from its seed alone (so resume and DDP are exact).

    ``mode`` is ``"recon"``, ``"distill"`` or ``"comp"``. Distillation: ``random_id`` (and then pure noise),
    ``id_noise_std`` (0: none), ``timesteps`` (the chain, decreasing), ``cfg_scale`` (1: no teacher guidance).
    Reconstruction: ``timesteps[0]``. Composition: ``composition`` (an index), ``frozen_single``, ``pure_noise``,
    ``timesteps[0]``.
    """

    mode: str
    timesteps: tuple[int, ...]
    random_id: bool = False
    id_noise_std: float = 0.0
    cfg_scale: float = 1.0
    composition: int = 0
    frozen_single: bool = False
    pure_noise: bool = False


def _chain(rng: np.random.Generator, first: int, options: AdaFaceConfig) -> tuple[int, ...]:
    """The chain's timesteps from ``first``: 1/3/5/7 steps (0.4/0.3/0.2/0.1) capped at ``max_denoising_steps``."""
    draw = rng.random(max(CHAIN_LENGTHS))  # a fixed count, so the cap does not shift later draws
    count = CHAIN_LENGTHS[min(int(np.searchsorted(np.cumsum(CHAIN_PROBS), draw[0], side="right")), 3)]
    count = min(count, options.max_denoising_steps)
    steps = [first]
    if count > 1:  # the release's ratio range for later steps: [0.5, 0.7] ** ((n - 1) ** -0.3)
        power = (count - 1) ** -0.3
        low, high = 0.5**power, 0.7**power
        for u in draw[1:count]:
            steps.append(min(steps[-1] - 1, int(steps[-1] * (low + (high - low) * u))))
    return tuple(t for t in steps if t >= 0)


def plan_sample(seed: int, options: AdaFaceConfig, num_timesteps: int, num_compositions: int) -> SamplePlan:
    """The :class:`SamplePlan` of the sample with this seed (every draw up front, so no option shifts another's)."""
    rng = np.random.default_rng(sample_seed(seed, CONDITION_STREAM))
    u = rng.random(12)
    last = num_timesteps - 1
    low, high = options.timestep_range
    image_t = int(round((low + (high - low) * u[5]) * last))
    if options.stage == 2 and u[0] >= options.distill_prob:
        pure = bool(u[1] < options.comp_pure_noise_prob)
        return SamplePlan(
            "comp",
            (last if pure else image_t,),
            composition=int(u[2] * num_compositions) % max(num_compositions, 1),
            frozen_single=bool(u[3] < options.frozen_single_prob),
            pure_noise=pure,
        )
    if options.stage == 1 and u[6] < options.recon_prob:
        return SamplePlan("recon", (int(u[7] * num_timesteps) % num_timesteps,))
    random_id = bool(u[8] < options.random_id_prob)
    std_low, std_high = options.id_noise_std
    noise_std = 0.0 if random_id or u[9] >= options.id_noise_prob else std_low + (std_high - std_low) * u[10]
    cfg_low, cfg_high = options.teacher_cfg_scale
    cfg = cfg_low + (cfg_high - cfg_low) * u[4] if u[11] < options.teacher_cfg_prob else 1.0
    timesteps = _chain(rng, last if random_id else image_t, options)
    return SamplePlan("distill", timesteps, random_id=random_id, id_noise_std=float(noise_std), cfg_scale=float(cfg))


# --------------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------------


def build_recognizer(kind: str, model_dir: Path | None) -> Any:
    """The 512-d recognizer identities come from: ``"onnx"`` (``arcface.onnx`` in ``model_dir``) or ``"world"``."""
    if kind == "world":
        from ...world.backends import WorldRecognizer

        return WorldRecognizer("world")
    from ...faces.onnx_backend import ArcFaceRecognizer, find_onnx_models, resolve_onnx_model_dir

    return ArcFaceRecognizer(find_onnx_models(resolve_onnx_model_dir(model_dir))[1])


def record_embeddings(records: Sequence[ImageRecord], recognizer: Any) -> np.ndarray:
    """``(N, 512)`` unit identity embeddings, one per record: its stored ``embeddings[recognizer.name]`` if it has
    one, else the recognizer on its face (the record's box and 5 landmarks)."""
    rows = []
    for record in records:
        stored = record.embeddings.get(recognizer.name)
        if stored is not None:
            vector = np.load(stored).astype(np.float32).reshape(-1)
        else:
            face = record.faces[0]
            if face.landmarks is None:
                raise DataError(
                    f"{record.source}: faces[0].landmarks: missing; the identity needs the 5 ArcFace landmarks "
                    f"(or embeddings[{recognizer.name!r}])"
                )
            image = load_rgb(record.image, record.source)
            landmarks = np.asarray(face.landmarks, np.float32)[None]  # (1, 5, 2)
            vector = recognizer.embed(image, landmarks, np.asarray(face.bbox, np.float32)[None])[0]
        if vector.shape != (ID_DIM,):
            raise DataError(f"{record.source}: the identity embedding is {vector.shape}, expected ({ID_DIM},)")
        rows.append(vector / max(float(np.linalg.norm(vector)), 1e-12))
    return np.stack(rows).astype(np.float32)


class AdaFaceDataset:
    """Training images with their face mask and identity embedding.

    ``dataset[(index, seed)]`` gives ``pixel_values`` ``(3, R, R)`` in [-1, 1], ``face_mask`` ``(1, R, R)`` in
    [0, 1] (the record's mask, else its face box), ``id_embeds`` ``(512,)``, ``caption``, ``index`` and ``seed``.
    Records need exactly one face.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        embeddings: np.ndarray,
        resolution: int,
        *,
        center_crop: bool = True,
        random_flip: bool = False,
    ):
        if len(records) != len(embeddings):
            raise ValueError(f"{len(records)} records but {len(embeddings)} embeddings")
        self.records, self.embeddings = list(records), embeddings
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip

    def __len__(self) -> int:
        return len(self.records)

    def target(self, record: ImageRecord, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``(R, R, 3)`` uint8 crop and its ``(R, R)`` float face mask."""
        crop = crop_target(record, seed, self.resolution, center_crop=self.center_crop, random_flip=self.random_flip,
                           mask=record.mask or True)  # fmt: skip
        return crop.pixels, crop.mask

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = key if isinstance(key, tuple) else (key, key)
        index, seed = int(index), int(seed)
        record = self.records[index]
        pixels, mask = self.target(record, seed)
        return {
            "pixel_values": torch.from_numpy(pixels).permute(2, 0, 1).float().div(127.5).sub(1.0),
            "face_mask": torch.from_numpy(mask)[None],
            "id_embeds": torch.from_numpy(self.embeddings[index]),
            "caption": record.caption,
            "index": index,
            "seed": seed,
        }


# --------------------------------------------------------------------------------------------------------------------
# The projector
# --------------------------------------------------------------------------------------------------------------------


def widen_attention(
    projector: Any, factor: int, *, layers: Sequence[int] | None = None, noise: float = 0.1, seed: int = 0
) -> Any:
    """A copy of ``projector`` whose attention keys/values are ``factor`` times wider in ``layers`` (MKV).

    The release's extension: the old ``k_proj``/``v_proj`` rows repeated ``factor`` times, the first copy unchanged
    and the others with Gaussian noise of ``noise`` x the weights' mean row std. With ``noise = 0`` the output is
    unchanged (every key appears ``factor`` times, which the softmax cancels).
    """
    from ...methods.adaface import AdaFaceProjector

    config = copy.deepcopy(projector.config)
    count = config["num_layers"]
    chosen = sorted(set(range(count) if layers is None else layers))
    if any(not 0 <= i < count for i in chosen):
        raise ValueError(f"widen_layers {list(layers or [])} must lie in 0..{count - 1}")
    for i in chosen:
        config["attention_multipliers"][i] *= factor
    state = projector.state_dict()
    generator = torch.Generator().manual_seed(seed)
    for i in chosen:
        for name in ("k_proj", "v_proj"):
            prefix = f"prompt2token_proj.text_model.encoder.layers.{i}.self_attn.{name}"
            weight, bias = state[f"{prefix}.weight"], state[f"{prefix}.bias"]
            scale = float(weight.std(dim=1).mean()) * noise
            copies_w, copies_b = [weight], [bias]
            for _ in range(factor - 1):
                copies_w.append(weight + torch.randn(weight.shape, generator=generator) * scale)
                copies_b.append(bias + torch.randn(bias.shape, generator=generator) * scale)
            state[f"{prefix}.weight"] = torch.cat(copies_w)  # (D*M, D) -> (D*M*factor, D)
            state[f"{prefix}.bias"] = torch.cat(copies_b)
    widened = AdaFaceProjector.from_config(config)
    widened.load_state_dict(state)
    return widened


def projector_from_text_encoder(text_encoder: Any, num_id_tokens: int, eos_token_id: int) -> Any:
    """An :class:`~idfusion.methods.adaface.AdaFaceProjector` with a CLIP text encoder's weights (the release
    initialises ``prompt2token_proj`` from openai CLIP ViT-L/14's text tower) and the initial layer weights.

    A token table smaller than CLIP's 49,408 rows (a reduced-vocabulary tokenizer) is padded with zero rows to that
    size and the tokenizer's EOS row copied to row 49,407, where the saved format's ID-CFG looks for it.
    """
    from ...methods.adaface import EOS_TOKEN_ID, AdaFaceProjector, adaface_projector_config
    from ...sd15 import official_state_dict

    cfg = text_encoder.config
    if cfg.hidden_act != "quick_gelu":
        raise ConfigError(
            f"recipe.base_model: its text encoder uses {cfg.hidden_act!r}; the projector needs quick_gelu"
        )
    if cfg.num_hidden_layers < 3:
        raise ConfigError(
            f"recipe.base_model: its text encoder has {cfg.num_hidden_layers} layer(s); the projector mixes its last 3"
        )
    state = {
        f"prompt2token_proj.{k}": v.detach().clone()
        for k, v in official_state_dict(text_encoder).items()
        if not k.endswith("position_ids")
    }
    table = state[TOKEN_KEY]  # (V, D)
    if table.shape[0] <= EOS_TOKEN_ID:
        padded = table.new_zeros(EOS_TOKEN_ID + 1, table.shape[1])
        padded[: table.shape[0]] = table
        padded[EOS_TOKEN_ID] = table[eos_token_id]
        state[TOKEN_KEY] = padded
    config = adaface_projector_config(
        vocab_size=state[TOKEN_KEY].shape[0], hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_layers=cfg.num_hidden_layers, num_heads=cfg.num_attention_heads,
        max_position_embeddings=cfg.max_position_embeddings, layer_norm_eps=cfg.layer_norm_eps,
        num_id_tokens=num_id_tokens,
    )  # fmt: skip
    projector = AdaFaceProjector.from_config(config)
    state["hidden_state_layer_weights"] = projector.hidden_state_layer_weights.detach().clone()
    projector.load_state_dict(state)
    return projector


def _shrink_table(projector: Any, rows: torch.Tensor) -> Any:
    """The projector with only ``rows`` of its token table (the ids the template uses, and EOS): the other rows
    never get a gradient, and the full table would make every checkpoint 49,408 rows big."""
    from ...methods.adaface import AdaFaceProjector

    config = copy.deepcopy(projector.config)
    eos = int((rows == projector.eos_token_id).nonzero()[0, 0])
    config.update(vocab_size=len(rows), eos_token_id=eos)
    state = dict(projector.state_dict())
    state[TOKEN_KEY] = state[TOKEN_KEY][rows].clone()
    small = AdaFaceProjector.from_config(config)
    small.load_state_dict(state)
    return small


def write_adaface_safetensors(path: Path, projector: Any, *, version: str, subject: str, encoder_index: int) -> Path:
    """The projector as the ``.safetensors`` that :func:`~idfusion.methods.adaface.load_adaface_checkpoint` reads
    (the layout of :func:`~idfusion.methods.adaface.convert_adaface_checkpoint`: one ``arc2face`` branch)."""
    from safetensors.torch import save_file

    from ...methods.adaface import _SAFETENSORS_FORMAT  # the loader's format tag; one definition

    info = {
        "version": version,
        "subject_string": subject,
        "placeholder_strings": [subject],
        "branches": [
            {
                "name": "arc2face",
                "index": encoder_index,
                "num_id_tokens": projector.num_id_tokens,
                "num_heads": projector.config["num_heads"],
                "layer_norm_eps": projector.config["layer_norm_eps"],
            }
        ],
    }
    tensors = {f"arc2face.{k}": v.detach().float().contiguous().cpu() for k, v in projector.state_dict().items()}
    metadata = {"format": "pt", "format_name": _SAFETENSORS_FORMAT, "adaface": json.dumps(info)}
    save_file(tensors, str(path), metadata=metadata)
    return path


# --------------------------------------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------------------------------------


def _subject_phrase(class_word: str) -> re.Pattern:
    return re.compile(rf"\b(?:an?|the)\s+{re.escape(class_word)}\b|\b{re.escape(class_word)}\b")


class AdaFaceRecipe(Recipe):
    """Both stages; ``recipe.stage`` chooses. See the module docstring."""

    name = "adaface"
    config_class = AdaFaceConfig

    @classmethod
    def default_config(cls) -> dict[str, Any]:
        # the release's gradient clip (0.5); learning rate for AdamW at toy and full size alike
        return {"train": {"learning_rate": 1e-4, "max_grad_norm": 0.5}}

    # -- build -----------------------------------------------------------------------------------------------------

    def _teacher_pipeline(self) -> Any:
        from ... import registry

        return registry.load_pipeline("arc2face", str(self.options.teacher))

    def build_dataset(self) -> AdaFaceDataset:
        data, options = self.config.data, self.options
        records = read_records(data.train, check_files=data.check_files)
        usable = [r for r in records if len(r.faces) == 1]
        if not usable:
            raise DataError("no training record has exactly one face")
        if len(usable) < len(records):
            logger.info("adaface: %d of %d records used (exactly one face each)", len(usable), len(records))
        model_dir = options.face_model_dir
        if model_dir is None and options.recognizer == "onnx":
            for candidate in (
                options.teacher / "antelopev2" if options.teacher else None,
                options.pretrained / "models/insightface/models/antelopev2" if options.pretrained else None,
            ):
                if candidate is not None and candidate.is_dir():
                    model_dir = candidate
                    break
        embeddings = record_embeddings(usable, build_recognizer(options.recognizer, model_dir))
        return AdaFaceDataset(
            usable, embeddings, data.resolution, center_crop=data.center_crop, random_flip=data.random_flip
        )

    def _student_parts(self) -> tuple[dict[str, Any], Any, Any]:
        """The base components, the AdaFace checkpoint to start from (or None) and its id encoder (or None)."""
        from ... import registry

        options = self.options
        checkpoint = id_encoder = None
        parts: dict[str, Any] = {}
        if options.pretrained is not None:
            extra = {"checkpoint": options.checkpoint} if options.checkpoint else {}
            if options.base_model is not None and not (options.pretrained / "model_index.json").is_file():
                extra["base_model"] = str(options.base_model)
            pipe = registry.load_pipeline("adaface", str(options.pretrained), **extra)
            checkpoint, id_encoder = pipe.adaface, pipe.id_encoder
            parts = {k: getattr(pipe, k) for k in ("vae", "text_encoder", "tokenizer", "unet")}
            parts["scheduler_config"] = dict(pipe.scheduler.config)
        if options.base_model is not None:
            from diffusers import StableDiffusionPipeline

            base = StableDiffusionPipeline.from_pretrained(
                options.base_model, safety_checker=None, requires_safety_checker=False, local_files_only=True
            )
            parts = {k: getattr(base, k) for k in ("vae", "text_encoder", "tokenizer", "unet")}
            parts["scheduler_config"] = dict(base.scheduler.config)
        return parts, checkpoint, id_encoder

    def build(self) -> dict[str, torch.nn.Module]:
        from diffusers import DDPMScheduler

        from ...methods import adaface
        from ...pipelines.scheduling import make_scheduler

        options, device = self.options, self.accelerator.device
        parts, checkpoint, pretrained_id_encoder = self._student_parts()
        self.vae, self.text_encoder, self.tokenizer, self.unet = (
            parts["vae"], parts["text_encoder"], parts["tokenizer"], parts["unet"],
        )  # fmt: skip
        scheduler_config = {k: v for k, v in parts["scheduler_config"].items() if not k.startswith("_")}
        self.noise_scheduler = DDPMScheduler.from_config(scheduler_config)
        prediction_type = self.noise_scheduler.config.prediction_type
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError(f"recipe.pretrained: unsupported prediction type {prediction_type!r}")
        sampler = options.scheduler
        if sampler == "auto":
            sampler = "dpm++" if scheduler_config.get("rescale_betas_zero_snr") else "ddim"
        try:
            self.inference_scheduler = make_scheduler(sampler, scheduler_config)
        except ValueError as error:
            raise ConfigError(f"recipe.scheduler: {error}") from None

        # the teacher: Arc2Face's UNet, and its encoder (AdaFace's step A)
        self.teacher_unet = None
        if options.teacher is not None:
            teacher = self._teacher_pipeline()
            self.teacher_unet, self.id_encoder, self.id_tokenizer = (
                teacher.unet,
                teacher.text_encoder,
                teacher.tokenizer,
            )
            self._check_teacher(teacher)
        elif pretrained_id_encoder is not None:
            self.id_encoder, self.id_tokenizer = pretrained_id_encoder, self.tokenizer
        else:
            raise ConfigFieldError("teacher", "missing: no Arc2Face encoder to compute X_img with")

        # the projector to train
        init = options.projector_init
        if init == "auto":
            init = "checkpoint" if checkpoint is not None else "text_encoder"
        if init == "checkpoint":
            if checkpoint is None:
                raise ConfigFieldError("projector_init", "'checkpoint' needs pretrained (an AdaFace folder)")
            projector = copy.deepcopy(checkpoint.projector).float()
            self.version, self.subject = checkpoint.version, checkpoint.subject_string
            self.encoder_index = checkpoint.encoder_index
        else:
            projector = projector_from_text_encoder(
                self.text_encoder, adaface.ARC2FACE_NUM_ID_TOKENS, self.tokenizer.eos_token_id
            )
            self.version, self.subject, self.encoder_index = adaface.ADAFACE_V2, "z", 0
        self._check_widths(projector)
        if options.widen_attention > 1:
            projector = widen_attention(
                projector, options.widen_attention, layers=options.widen_layers, noise=options.widen_noise,
                seed=self.config.seed,
            )  # fmt: skip
        self.num_id_tokens = projector.num_id_tokens
        self.subject_tokens = adaface.subject_tokens(
            self.version, self.num_id_tokens, subject=self.subject, encoder_index=self.encoder_index
        )

        # the template, its rows of the token table, and the full table to put them back into at save
        template = adaface.adaface_template_ids(
            self.tokenizer, adaface.template_num_commas(self.version, self.num_id_tokens)
        )
        table = projector.state_dict()[TOKEN_KEY].detach().clone()  # (V, D)
        eos = projector.eos_token_id
        rows = torch.unique(torch.cat([template.flatten(), torch.tensor([eos])]))
        if int(rows.max()) >= table.shape[0]:
            raise ConfigError(
                f"recipe.pretrained: the tokenizer's ids reach {int(rows.max())}, past the projector table"
            )
        self.full_table, self.table_rows = table, rows
        remap = torch.full((int(rows.max()) + 1,), -1, dtype=torch.long)
        remap[rows] = torch.arange(len(rows))
        self.template_ids = remap[template].to(device)  # (1, L) in the small table's rows
        trainable = _shrink_table(projector, rows)
        if options.freeze_embeddings:
            trainable.prompt2token_proj.text_model.embeddings.requires_grad_(False)
        self.frozen_projector = None
        if options.stage == 2:  # the starting projector, for the subject-single branch
            self.frozen_projector = copy.deepcopy(trainable).requires_grad_(False).eval().to(device)

        # prompts
        self.subject_tokenizer = copy.deepcopy(self.tokenizer)
        self.subject_tokenizer.add_tokens([t for t in self.subject_tokens if t not in self.tokenizer.get_vocab()])
        self.subject_ids = torch.tensor(self.subject_tokenizer.convert_tokens_to_ids(self.subject_tokens))
        self.compositions = list(options.compositions)

        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        size = self.config.data.resolution
        self.latent_shape = (self.vae.config.latent_channels, size // factor, size // factor)
        for frozen in (self.vae, self.text_encoder, self.unet, self.id_encoder, self.teacher_unet):
            if frozen is not None:
                frozen.requires_grad_(False).eval().to(device)
        with torch.no_grad():  # the teacher's unconditional context: Arc2Face's negative, the empty prompt
            from ...prompt_encoders import encode_text

            self.teacher_null = encode_text(self.id_encoder, self.id_tokenizer, [""])[:, : self._teacher_length]
        trainable.train()
        return {"projector": trainable}

    @property
    def _teacher_length(self) -> int:
        from ...methods.adaface import ID_TOKEN_START

        return ID_TOKEN_START + self.num_id_tokens  # v2's teacher context: rows 0..19

    def _check_teacher(self, teacher: Any) -> None:
        unet, mine = teacher.unet.config, self.unet.config
        if unet.in_channels != mine.in_channels:
            raise ConfigError(
                f"recipe.teacher: its UNet takes {unet.in_channels} latent channels, the base's {mine.in_channels}"
            )
        theirs = dict(teacher.scheduler.config)
        ours = self.noise_scheduler.config
        for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type"):
            if key in theirs and theirs[key] != ours.get(key):
                raise ConfigError(
                    f"recipe.teacher: its noise schedule's {key} is {theirs[key]!r}, the base's {ours.get(key)!r}; "
                    "the teacher and the student must share one schedule"
                )
        if bool(theirs.get("rescale_betas_zero_snr")) != bool(ours.get("rescale_betas_zero_snr")):
            raise ConfigError("recipe.teacher: the teacher and the base differ in rescale_betas_zero_snr")

    def _check_widths(self, projector: Any) -> None:
        width = projector.config["hidden_size"]
        for what, model in (("the base's text encoder", self.text_encoder), ("the Arc2Face encoder", self.id_encoder)):
            other = model.get_input_embeddings().embedding_dim
            if other != width:
                raise ConfigError(f"recipe: the projector is {width} wide but {what} is {other} wide")

    def parameters(self, models: dict[str, torch.nn.Module]) -> list[dict[str, Any]]:
        projector = models["projector"]
        layer = [projector.hidden_state_layer_weights]
        rest = [p for n, p in projector.named_parameters() if p.requires_grad and n != "hidden_state_layer_weights"]
        lr = self.config.train.learning_rate
        return [{"params": rest}, {"params": layer, "lr": lr * self.options.layer_weights_lr_scale}]

    # -- pieces of the loss ----------------------------------------------------------------------------------------

    def _id_prompts(self, id_embeds: torch.Tensor) -> torch.Tensor:
        """``(B, 20, D)``: the Arc2Face encoder's rows 0..19 for ``(B, 512)`` identities (rows 4..19 are X_img)."""
        from ...methods.adaface import ID_PROMPT_MAX_LENGTH
        from ...prompt_encoders import encode_arcface_id_prompt

        out = encode_arcface_id_prompt(self.id_encoder, self.id_tokenizer, id_embeds, max_length=ID_PROMPT_MAX_LENGTH)
        return out[:, : self._teacher_length]

    def _ada(self, projector: torch.nn.Module, id_prompts: torch.Tensor) -> torch.Tensor:
        from ...methods.adaface import ID_TOKEN_START

        return projector(id_prompts[:, ID_TOKEN_START:], self.template_ids)  # (B, N_ID, D)

    def _compose(self, text: str) -> str:
        from ...methods.adaface import compose_prompt

        return compose_prompt(text, self.subject_tokens, self.version, subject=self.subject)

    def _encode_subject(self, prompts: list[str], ada: torch.Tensor) -> torch.Tensor:
        """``(B, 77, D)`` base text embeddings of composed prompts whose subject tokens carry ``ada`` ``(B, N, D)``
        (as the pipeline's ``encode_composed``)."""
        from ...prompt_encoders import inject_token_embeddings

        tokenizer = self.subject_tokenizer
        ids = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        mask = torch.isin(ids, self.subject_ids)
        if bool((mask.sum(dim=1) != self.num_id_tokens).any()):
            long = [p for p, n in zip(prompts, mask.sum(dim=1).tolist(), strict=True) if n != self.num_id_tokens]
            raise DataError(
                f"the prompt {long[0]!r} is cut before its {self.num_id_tokens} subject tokens (77 tokens)"
            )
        lookup = torch.zeros(int(self.subject_ids.max()) + 1, dtype=torch.long)
        lookup[self.subject_ids] = torch.arange(len(self.subject_ids))
        rows = mask.nonzero()[:, 0]
        vectors = ada[rows.to(ada.device), lookup[ids[mask]].to(ada.device)]  # (count, D), row-major
        safe = ids.masked_fill(mask, tokenizer.pad_token_id or 0)
        with inject_token_embeddings(self.text_encoder, mask, vectors):
            return self.text_encoder(safe.to(self.accelerator.device))[0]

    def _encode_plain(self, prompts: list[str]) -> torch.Tensor:
        from ...prompt_encoders import encode_text

        return encode_text(self.text_encoder, self.tokenizer, prompts)

    def _eos_rows(self, prompts: list[str], tokenizer: Any, embeds: torch.Tensor) -> torch.Tensor:
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids  # fmt: skip
        position = (ids == tokenizer.eos_token_id).int().argmax(dim=1)  # the first EOS
        return embeds[torch.arange(len(prompts)), position.to(embeds.device)]  # (B, D)

    def _alphas(self, timesteps: torch.Tensor) -> torch.Tensor:
        alphas = self.noise_scheduler.alphas_cumprod.to(self.accelerator.device)
        return alphas[timesteps].clamp(min=1e-6).view(-1, 1, 1, 1)  # eps-prediction at zero SNR stays finite

    def _ddim_step(self, x: torch.Tensor, prediction: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor):
        """Deterministic DDIM from ``t`` to ``t_next`` with the model's prediction (epsilon or v)."""
        a = self._alphas(t)
        a_next = self._alphas(t_next)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            x0 = a.sqrt() * x - (1 - a).sqrt() * prediction
            eps = a.sqrt() * prediction + (1 - a).sqrt() * x
        else:
            eps = prediction
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        return a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps

    def _teacher(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, cfg: torch.Tensor) -> torch.Tensor:
        guided = cfg != 1.0
        out = self.teacher_unet(x, t, encoder_hidden_states=context).sample
        if bool(guided.any()):
            idx = guided.nonzero()[:, 0]
            null = self.teacher_null.expand(len(idx), -1, -1)
            uncond = self.teacher_unet(x[idx], t[idx], encoder_hidden_states=null).sample
            scale = cfg[idx].view(-1, 1, 1, 1)
            out = out.clone()
            out[idx] = uncond + scale * (out[idx] - uncond)
        return out

    def _student(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, encoder_hidden_states=context).sample

    def _target(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, t)
        return noise

    # -- loss ------------------------------------------------------------------------------------------------------

    def plans(self, seeds: Sequence[int]) -> list[SamplePlan]:
        count = len(self.compositions)
        steps = self.noise_scheduler.config.num_train_timesteps
        return [plan_sample(int(s), self.options, steps, count) for s in seeds]

    def loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        device = self.accelerator.device
        seeds = [int(s) for s in batch["seed"]]
        plans = self.plans(seeds)
        size = len(seeds)
        generators = [torch.Generator().manual_seed(sample_seed(s, NOISE_STREAM)) for s in seeds]
        # every tensor draw per sample, in a fixed order, whatever its mode
        eps = torch.stack([torch.randn(self.latent_shape, generator=g) for g in generators]).to(device)
        noise = torch.stack([torch.randn(self.latent_shape, generator=g) for g in generators]).to(device)
        random_ids = torch.stack([torch.randn(ID_DIM, generator=g) for g in generators])
        id_noise = torch.stack([torch.randn(ID_DIM, generator=g) for g in generators])

        identities = batch["id_embeds"].float().clone()  # (B, 512), unit
        for i, plan in enumerate(plans):
            if plan.random_id:
                identities[i] = random_ids[i]
            elif plan.id_noise_std > 0:  # relative to the embedding's row std, the norm kept (spec §2.7)
                noisy = identities[i] + id_noise[i] * plan.id_noise_std * identities[i].std()
                identities[i] = noisy / noisy.norm() * identities[i].norm()
        scale = self.vae.config.scaling_factor
        with torch.no_grad(), self.accelerator.autocast():
            posterior = self.vae.encode(batch["pixel_values"].to(device)).latent_dist
            latents = ((posterior.mean + posterior.std * eps) * scale).float()
            id_prompts = self._id_prompts(identities.to(device)).float()  # (B, 20, D)
        with self.accelerator.autocast():
            ada = self._ada(self.models["projector"], id_prompts)  # (B, N, D), with gradients

        losses = torch.zeros(size, device=device)
        parts = {"distill": torch.zeros(size, device=device), "recon": torch.zeros(size, device=device)}
        if self.options.stage == 2:
            parts["comp"] = torch.zeros(size, device=device)
        groups: dict[str, list[int]] = {"distill": [], "recon": [], "comp": []}
        for i, plan in enumerate(plans):
            groups[plan.mode].append(i)
        with self.accelerator.autocast():
            if groups["recon"]:
                parts["recon"][groups["recon"]] = self._recon(groups["recon"], plans, latents, noise, ada, batch)
            if groups["distill"]:
                parts["distill"][groups["distill"]] = self._distill(
                    groups["distill"], plans, latents, noise, ada, id_prompts
                )
            if groups["comp"]:
                parts["comp"][groups["comp"]] = self._composition(
                    groups["comp"], plans, latents, noise, ada, id_prompts, batch
                )
        for part in parts.values():
            losses = losses + part
        terms = {"loss": losses.mean()}
        terms.update({name: part.detach().mean() for name, part in parts.items()})
        return terms

    def _noised(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, pure: torch.Tensor | None = None):
        x = self.noise_scheduler.add_noise(latents, noise, t)
        if pure is not None and bool(pure.any()):
            x = torch.where(pure.view(-1, 1, 1, 1), noise, x)  # pure noise, as the chain's start from T
        return x

    def _recon(self, idx, plans, latents, noise, ada, batch) -> torch.Tensor:
        device = self.accelerator.device
        t = torch.tensor([plans[i].timesteps[0] for i in idx], device=device)
        x = self._noised(latents[idx], noise[idx], t)
        context = self._encode_subject([self._compose(self.options.prompt)] * len(idx), ada[idx])
        prediction = self._student(x, t, context).float()
        target = self._target(latents[idx], noise[idx], t).float()
        face = F.adaptive_avg_pool2d(batch["face_mask"][idx].to(device), self.latent_shape[1:])  # (b, 1, h, w)
        background = self.options.recon_background_weight
        weights = background + (1.0 - background) * face
        error = (prediction - target).pow(2).mean(dim=1, keepdim=True)  # (b, 1, h, w)
        return (weights * error).sum(dim=(1, 2, 3)) / weights.sum(dim=(1, 2, 3)).clamp(min=1e-8)

    def _distill(self, idx, plans, latents, noise, ada, id_prompts) -> torch.Tensor:
        """The multi-step chain: every step fits the student to the teacher, then moves on with the teacher."""
        device = self.accelerator.device
        chains = [plans[i].timesteps for i in idx]
        longest = max(len(c) for c in chains)
        t0 = torch.tensor([c[0] for c in chains], device=device)
        pure = torch.tensor([plans[i].random_id for i in idx], device=device)
        with torch.no_grad():
            x = self._noised(latents[idx], noise[idx], t0, pure)
        context = self._encode_subject([self._compose(self.options.prompt)] * len(idx), ada[idx])
        teacher_context = id_prompts[idx]
        cfg = torch.tensor([plans[i].cfg_scale for i in idx], device=device)
        total = torch.zeros(len(idx), device=device)
        for step in range(longest):
            active = [k for k, c in enumerate(chains) if len(c) > step]
            t = torch.tensor([chains[k][step] for k in active], device=device)
            with torch.no_grad():
                target = self._teacher(x[active], t, teacher_context[active], cfg[active]).float()
            prediction = self._student(x[active], t, context[active]).float()
            error = (prediction - target).pow(2).mean(dim=(1, 2, 3))
            total = total.index_add(0, torch.tensor(active, device=device), error)
            if step + 1 < longest:
                moving = [j for j, k in enumerate(active) if len(chains[k]) > step + 1]
                if moving:
                    keep = torch.tensor([active[j] for j in moving], device=device)
                    t_next = torch.tensor([chains[active[j]][step + 1] for j in moving], device=device)
                    with torch.no_grad():
                        x = x.clone()
                        x[keep] = self._ddim_step(x[keep], target[moving], t[moving], t_next)
        lengths = torch.tensor([len(c) for c in chains], device=device, dtype=torch.float32)
        return total / lengths.sqrt()

    def _comp_prompts(self, caption: str, composition: int) -> tuple[str, str]:
        """``(subject-comp, class-comp)`` texts (``z`` marks the subject in the first)."""
        options = self.options
        class_single = re.sub(r"\bz\b", f"a {options.class_word}", options.prompt)
        if options.composition_source == "captions":
            phrase = _subject_phrase(options.class_word)
            if phrase.search(caption):
                return phrase.sub("z", caption, count=1), caption
            return f"{options.prompt}, {caption}", f"{class_single}, {caption}"
        text = self.compositions[composition]
        return f"{options.prompt} {text}", f"{class_single} {text}"

    def _composition(self, idx, plans, latents, noise, ada, id_prompts, batch) -> torch.Tensor:
        device, options = self.accelerator.device, self.options
        count = len(idx)
        t = torch.tensor([plans[i].timesteps[0] for i in idx], device=device)
        pure = torch.tensor([plans[i].pure_noise for i in idx], device=device)
        with torch.no_grad():
            x = self._noised(latents[idx], noise[idx], t, pure)
            frozen = self._ada(self.frozen_projector, id_prompts[idx])
        use_frozen = torch.tensor([plans[i].frozen_single for i in idx], device=device).view(-1, 1, 1)
        single_ada = torch.where(use_frozen, frozen, ada[idx])
        texts = [self._comp_prompts(batch["caption"][i], plans[i].composition) for i in idx]
        subject_single = [self._compose(options.prompt)] * count
        subject_comp = [self._compose(s) for s, _ in texts]
        class_single_text = re.sub(r"\bz\b", f"a {options.class_word}", options.prompt)
        class_texts = [class_single_text] * count + [c for _, c in texts]
        single = self._encode_subject(subject_single, single_ada)
        comp = self._encode_subject(subject_comp, ada[idx])
        with torch.no_grad():
            classes = self._encode_plain(class_texts)  # (2b, 77, D): class-single, then class-comp
            class_eps = self._student(x.repeat(2, 1, 1, 1), t.repeat(2), classes).float()
        subject_eps = self._student(x.repeat(2, 1, 1, 1), t.repeat(2), torch.cat([single, comp])).float()
        subject_delta = subject_eps[count:] - subject_eps[:count]
        class_delta = class_eps[count:] - class_eps[:count]
        loss = (subject_delta - class_delta).pow(2).mean(dim=(1, 2, 3))
        if options.prompt_delta_weight > 0:
            subject_rows = self._eos_rows(subject_comp, self.subject_tokenizer, comp) - self._eos_rows(
                subject_single, self.subject_tokenizer, single
            )
            class_rows = self._eos_rows(class_texts[count:], self.tokenizer, classes[count:]) - self._eos_rows(
                class_texts[:count], self.tokenizer, classes[:count]
            )
            loss = loss + options.prompt_delta_weight * (subject_rows - class_rows).pow(2).mean(dim=1)
        return loss

    # -- validate and save -----------------------------------------------------------------------------------------

    def export_projector(self, trained: torch.nn.Module) -> Any:
        """The full-size projector: the trained weights with the token table put back to all its rows."""
        from ...methods.adaface import AdaFaceProjector

        state = {k: v.detach().float().cpu().clone() for k, v in trained.state_dict().items()}
        table = self.full_table.float().clone()
        table[self.table_rows] = state[TOKEN_KEY]
        state[TOKEN_KEY] = table
        config = trained.config
        return AdaFaceProjector.from_state_dict(
            state, num_id_tokens=self.num_id_tokens, num_heads=config["num_heads"],
            layer_norm_eps=config["layer_norm_eps"],
        )  # fmt: skip

    def _pipeline(self, projector: Any, path: Path) -> Any:
        from ...methods.adaface import AdaFaceCheckpoint
        from ...pipelines.pipeline_adaface import AdaFacePipeline

        pipe = AdaFacePipeline(
            self.vae, self.text_encoder, self.tokenizer, self.unet, self.inference_scheduler, self.id_encoder
        )
        pipe.adaface = AdaFaceCheckpoint(
            path=path, version=self.version, subject_string=self.subject, projector=projector,
            num_id_tokens=self.num_id_tokens, encoder_index=self.encoder_index, placeholder_strings=[self.subject],
        )  # fmt: skip
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def validate(self) -> list[Image.Image]:
        """For the first few training records: the image and a generation from its identity with ``prompt``."""
        from PIL import Image

        options, dataset = self.options, self.dataset
        projector = self.export_projector(self.unwrap("projector")).to(self.accelerator.device)
        pipe = self._pipeline(projector, Path("validation"))
        size = self.config.data.resolution
        images = []
        for k in range(min(options.validation_samples, len(dataset))):
            record = dataset.records[k]
            with self.accelerator.autocast():
                out = pipe(
                    id_embeds=torch.from_numpy(dataset.embeddings[k])[None], prompt=options.prompt,
                    seed=options.validation_seed + k, num_inference_steps=options.validation_inference_steps,
                    height=size, width=size,
                )  # fmt: skip
            source = Image.fromarray(load_rgb(record.image, record.source)).resize((size, size))
            images += [source, out.images[0]]
        return images

    def save(self, output_dir: Path) -> None:
        exported = self.export("projector")  # collective under FSDP/DeepSpeed
        if not self.accelerator.is_main_process:
            return
        projector = self.export_projector(exported)
        with tempfile.TemporaryDirectory() as folder:
            path = write_adaface_safetensors(
                Path(folder) / f"adaface-stage{self.options.stage}.safetensors", projector, version=self.version,
                subject=self.subject, encoder_index=self.encoder_index,
            )  # fmt: skip
            self._pipeline(projector, path).save_pretrained(output_dir, safe_serialization=True)


@dataclass
class AdaFaceDistillConfig(AdaFaceConfig):
    name: str = "adaface-distill"
    stage: int = setting(1, check=between(1, 1))


@dataclass
class AdaFaceCompositionConfig(AdaFaceConfig):
    name: str = "adaface-composition"
    stage: int = setting(2, check=between(2, 2))


class AdaFaceDistillRecipe(AdaFaceRecipe):
    """Stage 1: the projector distilled from the Arc2Face teacher."""

    name = "adaface-distill"
    config_class = AdaFaceDistillConfig


class AdaFaceCompositionRecipe(AdaFaceRecipe):
    """Stage 2: composition distillation (from a stage-1 folder)."""

    name = "adaface-composition"
    config_class = AdaFaceCompositionConfig
