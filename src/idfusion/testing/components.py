"""Tiny, structurally faithful Stable Diffusion 1.5 components (the full-size configs live in :mod:`idfusion.sd15`).

Every model here is built from a plain config dict by the same ``build_*`` function, so the tiny test models and the
full-size ones differ only in numbers: tests build tiny ones with random weights, and full-size ones can be built on
the ``meta`` device (``with torch.device("meta"): build_unet(sd15_unet_config())``) to check shapes, key names and
parameter counts without allocating memory.

The tiny models keep SD1.5's topology where later code depends on it: four UNet resolution levels
(3 x ``CrossAttnDownBlock2D`` + ``DownBlock2D``, ``UpBlock2D`` + 3 x ``CrossAttnUpBlock2D``), an 8x VAE with 4 latent
channels and SD's scaling factor, and a CLIP text encoder with 77 positions and SD1.5's (old) special-token ids,
whose hidden size equals the UNet's cross-attention dim. A 2-step 64x64 generation with them takes a fraction of a
second on CPU.

The kit's sizes are smaller than :mod:`idfusion.sd15`'s ``tiny_*_config`` (which the benchmarks and the training
recipes' tiny mode build in memory, with the real tokenizer): UNet and VAE widths ``(4, 8, 16, 16)`` (SD1.5's
1:2:4:4, so the same resnets have shortcuts) and the text encoder's vocabulary is the kit's reduced CLIP vocabulary
(:mod:`idfusion.testing.tiny_clip_tokenizer`; pair it with that tokenizer), so the ``sd15`` kit is about 1 MB.
Models with 8 heads (FACT's and FeedFace's SD1.5 sites) need widths 8 divides: pass ``(8, 16, 32, 32)``.

Builders are seeded inside :func:`torch.random.fork_rng`, so they are deterministic and leave the global RNG alone.
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from ..sd15 import (
    build_text_encoder,
    build_unet,
    build_vae,
    merge_config,
    official_state_dict,
    save_pretrained_official,
    sd15_scheduler_config,
    sd15_text_encoder_config,
    sd15_unet_config,
    sd15_vae_config,
)
from ..sd15 import tiny_text_encoder_config as _sd15_tiny_text_encoder_config
from ..sd15 import tiny_unet_config as _sd15_tiny_unet_config
from ..sd15 import tiny_vae_config as _sd15_tiny_vae_config

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, ControlNetModel, PNDMScheduler, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor, CLIPTextModel

__all__ = [
    "CLIP_IMAGE_MEAN",
    "CLIP_IMAGE_STD",
    "TINY_NORM_GROUPS",
    "TINY_UNET_WIDTHS",
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

M = TypeVar("M")


def _merged(base: dict[str, Any], overrides: Mapping[str, Any], kind: str) -> dict[str, Any]:
    known = None
    if kind == "feature_extractor":  # image processors take **kwargs; their settings are their dict's keys
        known = set(_clip_image_processor_class()().to_dict())
    return merge_config(base, overrides, kind, known)


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


#: The kit's UNet and VAE widths: SD1.5's 1:2:4:4 from 4 channels (GroupNorm with 4 groups; the UNet's 2 heads).
TINY_UNET_WIDTHS = [4, 8, 16, 16]
TINY_NORM_GROUPS = 4


def tiny_unet_config(**overrides: Any) -> dict[str, Any]:
    """:func:`idfusion.sd15.tiny_unet_config` at the kit's widths (:data:`TINY_UNET_WIDTHS`); ``sample_size`` 8."""
    kit = {"block_out_channels": list(TINY_UNET_WIDTHS), "norm_num_groups": TINY_NORM_GROUPS}
    return _sd15_tiny_unet_config(**(kit | overrides))


def tiny_vae_config(**overrides: Any) -> dict[str, Any]:
    """:func:`idfusion.sd15.tiny_vae_config` (SD1.5's VAE topology) at the kit's widths."""
    kit = {"block_out_channels": list(TINY_UNET_WIDTHS), "norm_num_groups": TINY_NORM_GROUPS}
    return _sd15_tiny_vae_config(**(kit | overrides))


def tiny_text_encoder_config(**overrides: Any) -> dict[str, Any]:
    """:func:`idfusion.sd15.tiny_text_encoder_config` (width 32) with the kit's reduced vocabulary
    (:func:`~idfusion.testing.tiny_clip_tokenizer.tiny_clip_vocab_size` tokens)."""
    from .tiny_clip_tokenizer import tiny_clip_vocab_size

    return _sd15_tiny_text_encoder_config(**({"vocab_size": tiny_clip_vocab_size()} | overrides))


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
                "patch_size": 14,  # ViT-L/14's; a 32-pixel patch embedding alone would be 0.4 MB
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
