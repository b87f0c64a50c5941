"""Stable Diffusion 1.5: the release's configs, builders from config, and its official state-dict key names.

Every SD1.5-family method (Arc2Face, AdaFace, FlashFace, FACT, FeedFace-SD1.5) and the test kit build models from
these configs, so each constant lives here once. The ``tiny_*`` configs are SD1.5's topology at toy width: the test
kit's models, the quick benchmark, and the synthetic world's base model. Full-size models can be built on the ``meta`` device
(``with torch.device("meta"): build_unet(sd15_unet_config())``) to check shapes without allocating memory.
"""

from __future__ import annotations

import copy
import importlib
import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

__all__ = [
    "SD15_DOWN_BLOCKS",
    "SD15_UP_BLOCKS",
    "build_text_encoder",
    "build_unet",
    "build_vae",
    "config_keys",
    "merge_config",
    "official_state_dict",
    "save_pretrained_official",
    "sd15_scheduler_config",
    "sd15_text_encoder_config",
    "sd15_unet_config",
    "sd15_vae_config",
    "tiny_text_encoder_config",
    "tiny_unet_config",
    "tiny_vae_config",
]

SD15_DOWN_BLOCKS = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
SD15_UP_BLOCKS = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]


# config kind -> (module, class) whose constructor arguments are the valid config keys
_CONFIG_CLASSES = {
    "unet": ("diffusers", "UNet2DConditionModel"),
    "vae": ("diffusers", "AutoencoderKL"),
    "text_encoder": ("transformers", "CLIPTextConfig"),
    "clip": ("transformers", "CLIPConfig"),
    "scheduler": ("diffusers", "PNDMScheduler"),
}


def config_keys(cls: type) -> set[str]:
    """The named constructor arguments of ``cls``: the keys its config may hold."""
    init = inspect.signature(cls.__init__).parameters.values()
    return {p.name for p in init if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def merge_config(
    base: dict[str, Any], overrides: Mapping[str, Any], kind: str, known: set[str] | None = None
) -> dict[str, Any]:
    """``base`` updated by ``overrides``; a key in neither ``base`` nor the ``kind``'s class (or ``known``) is a typo.

    diffusers' ``from_config`` only warns about unknown keys, so a misspelt override would be ignored silently.
    """
    unknown = set(overrides) - set(base)
    if unknown:
        if known is None:
            module, name = _CONFIG_CLASSES[kind]
            known = config_keys(getattr(importlib.import_module(module), name))
        unknown -= known
    if unknown:
        raise TypeError(f"unknown {kind} config keys {sorted(unknown)}; known include: {sorted(base)}")
    return {**base, **copy.deepcopy(dict(overrides))}


def sd15_unet_config(**overrides: Any) -> dict[str, Any]:
    """The ``unet/config.json`` values of the SD1.5 release (UNet2DConditionModel, 859,520,964 parameters)."""
    return merge_config(
        {
            "act_fn": "silu",
            "attention_head_dim": 8,  # diffusers' legacy name: this is the number of heads at every level
            "block_out_channels": [320, 640, 1280, 1280],
            "center_input_sample": False,
            "cross_attention_dim": 768,
            "down_block_types": list(SD15_DOWN_BLOCKS),
            "downsample_padding": 1,
            "flip_sin_to_cos": True,
            "freq_shift": 0,
            "in_channels": 4,
            "layers_per_block": 2,
            "mid_block_scale_factor": 1,
            "norm_eps": 1e-5,
            "norm_num_groups": 32,
            "out_channels": 4,
            "sample_size": 64,
            "up_block_types": list(SD15_UP_BLOCKS),
        },
        overrides,
        "unet",
    )


def sd15_vae_config(**overrides: Any) -> dict[str, Any]:
    """The ``vae/config.json`` values of the SD1.5 release (AutoencoderKL, 83,653,863 parameters)."""
    return merge_config(
        {
            "act_fn": "silu",
            "block_out_channels": [128, 256, 512, 512],
            "down_block_types": ["DownEncoderBlock2D"] * 4,
            "in_channels": 3,
            "latent_channels": 4,
            "layers_per_block": 2,
            "norm_num_groups": 32,
            "out_channels": 3,
            "sample_size": 512,
            "scaling_factor": 0.18215,
            "up_block_types": ["UpDecoderBlock2D"] * 4,
        },
        overrides,
        "vae",
    )


def sd15_text_encoder_config(**overrides: Any) -> dict[str, Any]:
    """The ``text_encoder/config.json`` values of the SD1.5 release (CLIP ViT-L/14 text tower, 123,060,480 params).

    The special-token ids are the old ones SD1.5 ships (bos 0, eos 2, pad 1), not the tokenizer's 49406/49407:
    with ``eos_token_id == 2`` transformers pools at the argmax of the input ids, as the original CLIP does.
    """
    return merge_config(
        {
            "architectures": ["CLIPTextModel"],
            "attention_dropout": 0.0,
            "bos_token_id": 0,
            "dropout": 0.0,
            "eos_token_id": 2,
            "hidden_act": "quick_gelu",
            "hidden_size": 768,
            "initializer_factor": 1.0,
            "initializer_range": 0.02,
            "intermediate_size": 3072,
            "layer_norm_eps": 1e-5,
            "max_position_embeddings": 77,
            "model_type": "clip_text_model",
            "num_attention_heads": 12,
            "num_hidden_layers": 12,
            "pad_token_id": 1,
            "projection_dim": 768,
            "vocab_size": 49408,
        },
        overrides,
        "text_encoder",
    )


def sd15_scheduler_config(**overrides: Any) -> dict[str, Any]:
    """The ``scheduler/scheduler_config.json`` values of the SD1.5 release (PNDMScheduler)."""
    return merge_config(
        {
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "clip_sample": False,
            "num_train_timesteps": 1000,
            "prediction_type": "epsilon",
            "set_alpha_to_one": False,
            "skip_prk_steps": True,
            "steps_offset": 1,
            "trained_betas": None,
        },
        overrides,
        "scheduler",
    )


def tiny_unet_config(**overrides: Any) -> dict[str, Any]:
    """SD1.5's UNet topology at toy width; ``sample_size`` 8 means 64x64 pixels.

    Same block types and four resolution levels, and widths in SD1.5's 1:2:4:4 ratio, so the same resnets have
    channel-changing shortcuts and, at SD1.5's depth (``layers_per_block=2``), the key names equal the real ones.
    """
    return merge_config(
        sd15_unet_config()
        | {
            "attention_head_dim": 2,
            "block_out_channels": [32, 64, 128, 128],
            "cross_attention_dim": 32,
            "layers_per_block": 1,
            "norm_num_groups": 8,
            "sample_size": 8,
        },
        overrides,
        "unet",
    )


def tiny_vae_config(**overrides: Any) -> dict[str, Any]:
    """SD1.5's VAE topology (4 levels, so 8x downsampling; 4 latent channels; SD's scaling factor) at toy width.

    Widths keep SD1.5's 1:2:4:4 ratio, so at ``layers_per_block=2`` the key names equal the real ones.
    """
    return merge_config(
        sd15_vae_config()
        | {"block_out_channels": [8, 16, 32, 32], "layers_per_block": 1, "norm_num_groups": 8, "sample_size": 64},
        overrides,
        "vae",
    )


def tiny_text_encoder_config(**overrides: Any) -> dict[str, Any]:
    """SD1.5's text encoder at hidden size 32 (= the tiny UNet's cross-attention dim), keeping vocab and positions."""
    return merge_config(
        sd15_text_encoder_config()
        | {
            "hidden_size": 32,
            "intermediate_size": 128,
            "num_attention_heads": 4,
            "num_hidden_layers": 3,
            "projection_dim": 32,
        },
        overrides,
        "text_encoder",
    )


def build_unet(config: Mapping[str, Any]) -> UNet2DConditionModel:
    """Build a ``UNet2DConditionModel`` from a config dict such as :func:`sd15_unet_config`."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_config(dict(config))


def build_vae(config: Mapping[str, Any]) -> AutoencoderKL:
    """Build an ``AutoencoderKL`` from a config dict such as :func:`sd15_vae_config`."""
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_config(dict(config))


def build_text_encoder(config: Mapping[str, Any]) -> CLIPTextModel:
    """Build a ``CLIPTextModel`` from a config dict such as :func:`sd15_text_encoder_config`."""
    from transformers import CLIPTextConfig, CLIPTextModel

    fields = {k: v for k, v in config.items() if k != "model_type"}  # model_type is a class attribute
    return CLIPTextModel(CLIPTextConfig(**fields))


def official_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with the key names that official CLIP-based checkpoints use.

    transformers 5 flattened ``CLIPTextModel`` and ``CLIPVisionModel``: their weights used to live under an inner
    ``text_model.`` / ``vision_model.`` module, and the released files (SD1.5's ``text_encoder/model.safetensors``:
    ``text_model.embeddings.token_embedding.weight``; its safety checker: ``vision_model.vision_model.…``) keep those
    names. ``from_pretrained`` accepts both, but a model built from scratch saves the flat names. This puts the inner
    prefix back for every such module, except one held directly by a transformers CLIP class (``CLIPModel``,
    ``CLIPTextModelWithProjection``, ...), whose attribute name already was that prefix. On transformers 4 (modules
    not flattened) nothing changes.

    Args:
        model (`torch.nn.Module`): any model, possibly containing CLIP text or vision towers.

    Returns:
        `dict[str, torch.Tensor]`: the state dict under official key names.
    """
    renames = _official_key_map(model)
    return {renames.get(key, key): value for key, value in model.state_dict().items()}


def _official_key_map(model: torch.nn.Module) -> dict[str, str]:
    from transformers import CLIPTextModel, CLIPVisionModel
    from transformers.models.clip.modeling_clip import CLIPPreTrainedModel

    prefixes: list[tuple[str, str]] = []  # (module path with trailing dot, inner name to insert)
    for name, module in model.named_modules():
        inner = "text_model" if isinstance(module, CLIPTextModel) else "vision_model"
        if not isinstance(module, (CLIPTextModel, CLIPVisionModel)) or hasattr(module, inner):
            continue
        parent = model.get_submodule(name.rpartition(".")[0]) if name else None
        if parent is not None and type(parent).__module__ == CLIPPreTrainedModel.__module__:
            continue
        prefixes.append((f"{name}." if name else "", inner))
    prefixes.sort(key=lambda item: len(item[0]), reverse=True)  # innermost first

    renames: dict[str, str] = {}
    for key in model.state_dict():
        for prefix, inner in prefixes:
            if key.startswith(prefix):
                renames[key] = f"{prefix}{inner}.{key[len(prefix) :]}"
                break
    return renames


def save_pretrained_official(model: Any, out_dir: str | Path) -> Path:
    """``model.save_pretrained(out_dir)``, then the weights file's keys renamed as in :func:`official_state_dict`.

    For transformers models saved as one ``model.safetensors``. Keys that ``save_pretrained`` already wrote under
    official names (a model loaded from an official file) are kept. Config and other files are left as written.

    Args:
        model (`transformers.PreTrainedModel`): the model to save.
        out_dir (`str` or `Path`): the folder.

    Returns:
        `Path`: the folder.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    weights = out / "model.safetensors"
    if not weights.is_file():
        raise RuntimeError(f"{out}: save_pretrained wrote no single model.safetensors to rename")
    renames = _official_key_map(model)
    if renames:
        with safe_open(weights, framework="pt") as f:
            metadata = f.metadata()
        state = {renames.get(key, key): value for key, value in load_file(weights).items()}
        save_file(state, weights, metadata=metadata)
    return out
