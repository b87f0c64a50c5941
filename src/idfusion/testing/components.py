"""Tiny, structurally faithful Stable Diffusion 1.5 components, and the full-size SD1.5 configs.

Every model here is built from a plain config dict by the same ``build_*`` function, so the tiny test models and the
full-size ones differ only in numbers: tests build tiny ones with random weights, and full-size ones can be built on
the ``meta`` device (``with torch.device("meta"): build_unet(sd15_unet_config())``) to check shapes, key names and
parameter counts without allocating memory.

The tiny models keep SD1.5's topology where later code depends on it: four UNet resolution levels
(3 x ``CrossAttnDownBlock2D`` + ``DownBlock2D``, ``UpBlock2D`` + 3 x ``CrossAttnUpBlock2D``), an 8x VAE with 4 latent
channels and SD's scaling factor, and a CLIP text encoder with the real 49,408-token vocabulary, 77 positions and
SD1.5's (old) special-token ids, whose hidden size equals the UNet's cross-attention dim. A 2-step 64x64 generation
with them takes a fraction of a second on CPU.

Builders are seeded inside :func:`torch.random.fork_rng`, so they are deterministic and leave the global RNG alone.
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, ControlNetModel, PNDMScheduler, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor, CLIPTextModel

__all__ = [
    "CLIP_IMAGE_MEAN",
    "CLIP_IMAGE_STD",
    "build_safety_checker",
    "build_text_encoder",
    "build_unet",
    "build_vae",
    "official_state_dict",
    "save_pretrained_official",
    "sd15_feature_extractor_config",
    "sd15_safety_checker_config",
    "sd15_scheduler_config",
    "sd15_text_encoder_config",
    "sd15_unet_config",
    "sd15_vae_config",
    "tiny_controlnet",
    "tiny_feature_extractor",
    "tiny_safety_checker",
    "tiny_safety_checker_config",
    "tiny_scheduler",
    "tiny_text_encoder",
    "tiny_text_encoder_config",
    "tiny_unet",
    "tiny_unet_config",
    "tiny_vae",
    "tiny_vae_config",
]

CLIP_IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]

_SD_DOWN_BLOCKS = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
_SD_UP_BLOCKS = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]

M = TypeVar("M")


def _config_class(kind: str) -> type:
    if kind == "unet":
        from diffusers import UNet2DConditionModel as cls
    elif kind == "vae":
        from diffusers import AutoencoderKL as cls
    elif kind == "text_encoder":
        from transformers import CLIPTextConfig as cls
    elif kind == "clip":
        from transformers import CLIPConfig as cls
    elif kind == "scheduler":
        from diffusers import PNDMScheduler as cls
    else:
        cls = _clip_image_processor_class()
    return cls


def _merged(base: dict[str, Any], overrides: Mapping[str, Any], kind: str) -> dict[str, Any]:
    unknown = set(overrides) - set(base)
    if unknown:
        # Keys beyond the base config are fine if the class takes them; a typo would otherwise be ignored silently
        # (diffusers' from_config only warns).
        cls = _config_class(kind)
        if kind == "feature_extractor":  # image processors take **kwargs; their settings are their dict's keys
            unknown -= set(cls().to_dict())
        else:
            init = inspect.signature(cls.__init__).parameters.values()
            unknown -= {p.name for p in init if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    if unknown:
        raise TypeError(f"unknown {kind} config keys {sorted(unknown)}; known include: {sorted(base)}")
    return {**base, **copy.deepcopy(dict(overrides))}


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    # fork_rng restores the global CPU RNG afterwards; weights are initialised on CPU, so no CUDA state is involved.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _build_seeded(build: Callable[[dict[str, Any]], M], config: dict[str, Any], seed: int) -> M:
    with _seeded(seed):
        model = build(config)
    return model.eval()


# --------------------------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------------------------


def sd15_unet_config(**overrides: Any) -> dict[str, Any]:
    """The ``unet/config.json`` values of the SD1.5 release (UNet2DConditionModel, 859,520,964 parameters)."""
    return _merged(
        {
            "act_fn": "silu",
            "attention_head_dim": 8,  # diffusers' legacy name: this is the number of heads at every level
            "block_out_channels": [320, 640, 1280, 1280],
            "center_input_sample": False,
            "cross_attention_dim": 768,
            "down_block_types": list(_SD_DOWN_BLOCKS),
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
            "up_block_types": list(_SD_UP_BLOCKS),
        },
        overrides,
        "unet",
    )


def tiny_unet_config(**overrides: Any) -> dict[str, Any]:
    """SD1.5's UNet topology at toy width; ``sample_size`` 8 means 64x64 pixels.

    Same block types and four resolution levels, and widths in SD1.5's 1:2:4:4 ratio, so the same resnets have
    channel-changing shortcuts and, at SD1.5's depth (``layers_per_block=2``), the key names equal the real ones.
    """
    return _merged(
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


def sd15_vae_config(**overrides: Any) -> dict[str, Any]:
    """The ``vae/config.json`` values of the SD1.5 release (AutoencoderKL, 83,653,863 parameters)."""
    return _merged(
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


def tiny_vae_config(**overrides: Any) -> dict[str, Any]:
    """SD1.5's VAE topology (4 levels, so 8x downsampling; 4 latent channels; SD's scaling factor) at toy width.

    Widths keep SD1.5's 1:2:4:4 ratio, so at ``layers_per_block=2`` the key names equal the real ones.
    """
    return _merged(
        sd15_vae_config()
        | {"block_out_channels": [8, 16, 32, 32], "layers_per_block": 1, "norm_num_groups": 8, "sample_size": 64},
        overrides,
        "vae",
    )


def sd15_text_encoder_config(**overrides: Any) -> dict[str, Any]:
    """The ``text_encoder/config.json`` values of the SD1.5 release (CLIP ViT-L/14 text tower, 123,060,480 params).

    The special-token ids are the old ones SD1.5 ships (bos 0, eos 2, pad 1), not the tokenizer's 49406/49407:
    with ``eos_token_id == 2`` transformers pools at the argmax of the input ids, as the original CLIP does.
    """
    return _merged(
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


def tiny_text_encoder_config(**overrides: Any) -> dict[str, Any]:
    """SD1.5's text encoder at hidden size 32 (= the tiny UNet's cross-attention dim), keeping vocab and positions."""
    return _merged(
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


def sd15_scheduler_config(**overrides: Any) -> dict[str, Any]:
    """The ``scheduler/scheduler_config.json`` values of the SD1.5 release (PNDMScheduler)."""
    return _merged(
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


def sd15_safety_checker_config(**overrides: Any) -> dict[str, Any]:
    """The ``safety_checker/config.json`` architecture of the SD1.5 release: a CLIP ViT-L/14 (``CLIPConfig``)."""
    return _merged(
        {
            "projection_dim": 768,
            "text_config": {
                "hidden_size": 768,
                "intermediate_size": 3072,
                "num_attention_heads": 12,
                "num_hidden_layers": 12,
            },
            "vision_config": {
                "hidden_size": 1024,
                "image_size": 224,
                "intermediate_size": 4096,
                "num_attention_heads": 16,
                "num_hidden_layers": 24,
                "patch_size": 14,
            },
        },
        overrides,
        "clip",
    )


def tiny_safety_checker_config(**overrides: Any) -> dict[str, Any]:
    """A toy ``CLIPConfig`` for the safety checker. Its images stay 224x224, the feature extractor's crop size."""
    return _merged(
        {
            "projection_dim": 32,
            "text_config": {
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_attention_heads": 4,
                "num_hidden_layers": 2,
            },
            "vision_config": {
                "hidden_size": 32,
                "image_size": 224,
                "intermediate_size": 64,
                "num_attention_heads": 4,
                "num_hidden_layers": 2,
                "patch_size": 32,
            },
        },
        overrides,
        "clip",
    )


def sd15_feature_extractor_config(**overrides: Any) -> dict[str, Any]:
    """The ``feature_extractor/preprocessor_config.json`` settings of the SD1.5 release (CLIP's 224 center crop)."""
    return _merged(
        {
            "crop_size": {"height": 224, "width": 224},
            "do_center_crop": True,
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_resize": True,
            "image_mean": list(CLIP_IMAGE_MEAN),
            "image_std": list(CLIP_IMAGE_STD),
            "resample": 3,  # PIL bicubic
            "size": {"shortest_edge": 224},
        },
        overrides,
        "feature_extractor",
    )


# --------------------------------------------------------------------------------------------------------------------
# Builders: config -> model (no seeding; weights follow the ambient RNG, or the ambient device such as "meta")
# --------------------------------------------------------------------------------------------------------------------


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


def build_safety_checker(config: Mapping[str, Any]) -> StableDiffusionSafetyChecker:
    """Build SD's ``StableDiffusionSafetyChecker`` from a ``CLIPConfig`` dict such as :func:`sd15_safety_checker_config`."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    return StableDiffusionSafetyChecker(CLIPConfig(**copy.deepcopy(dict(config))))


# --------------------------------------------------------------------------------------------------------------------
# Tiny components
# --------------------------------------------------------------------------------------------------------------------


def tiny_unet(*, seed: int = 0, **overrides: Any) -> UNet2DConditionModel:
    """A tiny SD1.5-topology ``UNet2DConditionModel`` (see :func:`tiny_unet_config`); ``overrides`` edit the config."""
    return _build_seeded(build_unet, tiny_unet_config(**overrides), seed)


def tiny_vae(*, seed: int = 0, **overrides: Any) -> AutoencoderKL:
    """A tiny SD1.5-topology ``AutoencoderKL`` (see :func:`tiny_vae_config`); ``overrides`` edit the config."""
    return _build_seeded(build_vae, tiny_vae_config(**overrides), seed)


def tiny_text_encoder(*, seed: int = 0, **overrides: Any) -> CLIPTextModel:
    """A tiny SD1.5-style ``CLIPTextModel`` (see :func:`tiny_text_encoder_config`); ``overrides`` edit the config."""
    return _build_seeded(build_text_encoder, tiny_text_encoder_config(**overrides), seed)


def tiny_controlnet(
    unet: UNet2DConditionModel | None = None,
    *,
    seed: int = 0,
    conditioning_embedding_out_channels: tuple[int, ...] = (8, 16, 16, 32),
) -> ControlNetModel:
    """A ``ControlNetModel`` made with ``ControlNetModel.from_unet``, the way SD1.5 ControlNets are initialised.

    Args:
        unet (`UNet2DConditionModel`, *optional*): the UNet to copy; defaults to ``tiny_unet(seed=seed)``.
        seed (`int`, *optional*, defaults to 0): seeds the parts not copied from the UNet (the condition embedding).
        conditioning_embedding_out_channels (`tuple[int, ...]`, *optional*):
            Widths of the condition image encoder. Four entries downsample 8x, like SD1.5 ControlNets'
            ``(16, 32, 96, 256)``, so a 64x64 control image matches the 8x8 latent.

    Returns:
        `ControlNetModel`: in eval mode.
    """
    from diffusers import ControlNetModel

    if unet is None:
        unet = tiny_unet(seed=seed)
    with _seeded(seed):
        controlnet = ControlNetModel.from_unet(
            unet, conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels)
        )
    return controlnet.eval()


def tiny_safety_checker(*, seed: int = 0, **overrides: Any) -> StableDiffusionSafetyChecker:
    """SD's ``StableDiffusionSafetyChecker`` on a toy CLIP vision tower (see :func:`tiny_safety_checker_config`).

    Its concept embeddings and thresholds keep the class's initial values (all ones), so it flags nothing.
    """
    return _build_seeded(build_safety_checker, tiny_safety_checker_config(**overrides), seed)


def _clip_image_processor_class() -> type[CLIPImageProcessor]:
    import transformers

    # Without torchvision, transformers' CLIPImageProcessor falls back to the PIL backend with a warning on every
    # use; name that backend directly. Both save the same preprocessor_config.json.
    if importlib.util.find_spec("torchvision") is None and hasattr(transformers, "CLIPImageProcessorPil"):
        return transformers.CLIPImageProcessorPil
    return transformers.CLIPImageProcessor


def tiny_feature_extractor(**overrides: Any) -> CLIPImageProcessor:
    """The safety checker's ``CLIPImageProcessor`` with SD1.5's settings (it is not tiny: it has no weights)."""
    return _clip_image_processor_class()(**sd15_feature_extractor_config(**overrides))


def tiny_scheduler(**overrides: Any) -> PNDMScheduler:
    """SD1.5's default scheduler, ``PNDMScheduler`` with :func:`sd15_scheduler_config`."""
    from diffusers import PNDMScheduler

    return PNDMScheduler.from_config(sd15_scheduler_config(**overrides))


# --------------------------------------------------------------------------------------------------------------------
# Saving with the key names of the official files
# --------------------------------------------------------------------------------------------------------------------


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
