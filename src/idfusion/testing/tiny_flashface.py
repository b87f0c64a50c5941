"""Tiny FlashFace releases: the official ``cache/`` files and the open re-implementation's diffusers folder.

Official (``write_flashface``), in the layout of ``shilongz/FlashFace-SD1.5`` / the FlashFace repo's ``cache/``:

- ``flashface.ckpt``: ``torch.save`` of an ``OrderedDict`` with exactly the official 2,142 key names, in the official
  order, including the ``ori_*`` twins (separate, equal tensors, as in the released file) and ``ref_middle.*`` (its
  own random weights: the official code never runs it). Widths ``(32, 64, 96, 96)`` with 2 layers per level, 8
  heads and cross-attention width 32: FlashFace's GroupNorm has 32 groups, so 32 is the smallest width, and widths
  that grow at the levels where SD1.5's grow (320, 640, 1280, 1280) give the same resnet shortcuts, so every key
  name of the real file occurs, with the same ranks. At that floor the tensors would take 67 MB, so the large ones
  are slices of a few shared random pools (:mod:`idfusion.testing.shared_storage`; the ``ori_*`` twins view a copy
  of the pools, so they stay equal and separate): the file is about 6.5 MB.
- ``openai-clip-vit-large-14.pth``: both CLIP towers in FlashFace naming: ``textual.*`` (width 32, 2 layers, the
  kit's reduced vocabulary and 77 positions, ``textual.head`` projection), a small ``visual.*`` ViT (width 32,
  patch 14 on 28x28 images, 2 layers, ``cls_embedding``, ``pre_norm``, ``post_norm``, ``head``) and ``log_scale``.
- ``sd-v1-vae.pth``: the VAE in FlashFace naming, widths ``(32, 64, 96, 96)``, 2 blocks per level: the 240 key
  names of the real file (pooled too: 1.1 MB instead of 13 MB).
- ``bpe_simple_vocab_16e6.txt.gz``: CLIP's BPE file with the kit's reduced vocabulary
  (:func:`idfusion.testing.tiny_clip_tokenizer.write_tiny_clip_bpe`), which the text tower's table matches.
- ``antelopev2/``: tiny ONNX face models, where the FlashFace pipeline looks for a detector.

The weights are seeded random and not degenerate: every bias and norm weight is perturbed, the main UNet's
``attn_ref`` differs from the ``attn1`` it was copied from, the mask input channel is non-zero, and the main UNet,
ReferenceNet and ``ref_middle`` are drawn from different seeds, so tests can tell every piece apart.

Open (``write_open_flashface``), the ``IntellectGen/FlashFace`` diffusers folder: ``model_index.json``
(``StableDiffusionReferencePipeline``, diffusers 0.22.1), ``unet/`` and ``refnet/`` (4-channel tiny UNets, 2 layers
per level so the 10 reference blocks exist, different seeds), ``vae/``, ``text_encoder/`` (official nested key
names), ``tokenizer/`` (the kit's CLIP tokenizer), ``scheduler/`` (``DDIMScheduler`` with SD1.5's schedule) and
``antelopev2/``.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "TINY_FLASHFACE_WIDTHS",
    "tiny_flashface_models",
    "tiny_flashface_text_config",
    "tiny_flashface_unet_config",
    "tiny_flashface_vae_config",
    "write_flashface",
    "write_open_flashface",
]

TINY_FLASHFACE_WIDTHS = [32, 64, 96, 96]
TINY_TEXT_WIDTH = 32


def tiny_flashface_unet_config(**overrides: Any) -> dict[str, Any]:
    """The official FlashFace UNet topology at toy width (what :func:`infer_unet_config` reads back from the file,
    apart from ``sample_size``, which no tensor stores)."""
    from .components import sd15_unet_config

    return sd15_unet_config(
        **{
            "block_out_channels": list(TINY_FLASHFACE_WIDTHS),
            "cross_attention_dim": TINY_TEXT_WIDTH,
            "attention_head_dim": 8,
            "norm_eps": 1e-6,
            "norm_num_groups": 32,
            "sample_size": 8,
            **overrides,
        }
    )


def tiny_flashface_text_config(**overrides: Any) -> dict[str, Any]:
    """A CLIP text tower of width 32 (one 32-wide head, as inferred for towers narrower than CLIP's 64-wide heads)."""
    from .components import sd15_text_encoder_config
    from .tiny_clip_tokenizer import tiny_clip_vocab_size

    return sd15_text_encoder_config(
        **{
            "vocab_size": tiny_clip_vocab_size(),
            "hidden_size": TINY_TEXT_WIDTH,
            "intermediate_size": 4 * TINY_TEXT_WIDTH,
            "num_attention_heads": 1,
            "num_hidden_layers": 2,
            "projection_dim": TINY_TEXT_WIDTH,
            **overrides,
        }
    )


def tiny_flashface_vae_config(**overrides: Any) -> dict[str, Any]:
    """SD1.5's VAE topology (2 blocks per level: the official key names) at widths divisible by 32 groups."""
    from .components import sd15_vae_config

    return sd15_vae_config(**{"block_out_channels": list(TINY_FLASHFACE_WIDTHS), "norm_num_groups": 32, **overrides})


def _perturb(module: torch.nn.Module, generator: torch.Generator, scale: float = 0.1) -> None:
    """Make biases and norm weights (1-D parameters) non-trivial, as trained weights are."""
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.ndim == 1:
                parameter.add_(scale * torch.randn(parameter.shape, generator=generator))


def tiny_flashface_models(seed: int = 0) -> tuple[torch.nn.Module, ...]:
    """Seeded tiny official-release networks: (main UNet, ReferenceNet, reference attention, a separate mid block for
    ``ref_middle``)."""
    from diffusers import UNet2DConditionModel

    from ..methods.flashface import OFFICIAL, build_flashface_models
    from .components import _seeded

    config = tiny_flashface_unet_config()
    generator = torch.Generator().manual_seed(seed)
    with _seeded(seed):
        main, _, reference = build_flashface_models(config, OFFICIAL)
    with _seeded(seed + 1):
        _, refnet, _ = build_flashface_models(config, OFFICIAL)
    with _seeded(seed + 2):
        spare = UNet2DConditionModel.from_config({**config, "in_channels": 4})
    for module in (main, refnet, spare, reference):
        _perturb(module, generator)
    with torch.no_grad():  # fine-tuned: the reference attention has moved away from the attn1 it was copied from
        for parameter in reference.parameters():
            parameter.add_(0.5 * parameter.std() * torch.randn(parameter.shape, generator=generator))
    return main.eval(), refnet.eval(), reference.eval(), spare.mid_block.eval()


def _tiny_visual_tower(generator: torch.Generator, width: int = 32, layers: int = 2) -> dict[str, torch.Tensor]:
    """``visual.*`` of FlashFace's CLIP (``VisionTransformer``, ``pool_type='token'``, ``pre_norm=True``) at toy size:
    patch 14 on 28x28 images (4 patches + CLS)."""

    def rand(*shape: int, std: float = 0.02) -> torch.Tensor:
        return std * torch.randn(shape, generator=generator)

    out = {
        "visual.cls_embedding": rand(1, 1, width),
        "visual.patch_embedding.weight": rand(width, 3, 14, 14),
        "visual.pos_embedding": rand(1, 5, width),
        "visual.pre_norm.weight": 1 + rand(width, std=0.1),
        "visual.pre_norm.bias": rand(width),
    }
    for i in range(layers):
        prefix = f"visual.transformer.{i}"
        for name, shape in (
            ("norm1", None),
            ("attn.to_qkv", (3 * width, width)),
            ("attn.proj", (width, width)),
            ("norm2", None),
            ("mlp.0", (4 * width, width)),
            ("mlp.2", (width, 4 * width)),
        ):
            rows = shape[0] if shape else width
            out[f"{prefix}.{name}.weight"] = rand(*shape) if shape else 1 + rand(width, std=0.1)
            out[f"{prefix}.{name}.bias"] = rand(rows)
    out["visual.post_norm.weight"] = 1 + rand(width, std=0.1)
    out["visual.post_norm.bias"] = rand(width)
    out["visual.head"] = rand(width, TINY_TEXT_WIDTH)
    return out


def write_flashface(out_dir: Path, seed: int) -> list[Path]:
    """Write the tiny official release (layout in this module's docstring) into the empty folder ``out_dir``."""
    from ..convert.flashface import (
        BPE_FILE,
        CHECKPOINT_FILE,
        CLIP_FILE,
        VAE_FILE,
        flashface_unets_state_dict,
        text_encoder_to_flashface,
        vae_to_flashface,
    )
    from .components import _build_seeded, build_text_encoder, build_vae
    from .make_tiny import write_antelopev2
    from .shared_storage import pooled_tensors
    from .tiny_clip_tokenizer import write_tiny_clip_bpe

    main, refnet, reference, ref_middle = tiny_flashface_models(seed)
    state = flashface_unets_state_dict(main, refnet, reference, ref_middle=ref_middle)
    twins = {key: key[len("ori_") :] for key in state if key.startswith("ori_")}
    torch.save(OrderedDict(pooled_tensors(state, seed, twins=twins)), out_dir / CHECKPOINT_FILE)

    generator = torch.Generator().manual_seed(seed + 3)
    text = _build_seeded(build_text_encoder, tiny_flashface_text_config(), seed + 3)
    _perturb(text, generator)
    projection = torch.randn((TINY_TEXT_WIDTH, TINY_TEXT_WIDTH), generator=generator) / TINY_TEXT_WIDTH**0.5
    clip = OrderedDict(_tiny_visual_tower(generator))
    clip.update(text_encoder_to_flashface(text, projection))
    clip["log_scale"] = torch.tensor(4.6052)
    torch.save(OrderedDict(pooled_tensors(clip, seed + 3)), out_dir / CLIP_FILE)

    vae = _build_seeded(build_vae, tiny_flashface_vae_config(), seed + 4)
    _perturb(vae, torch.Generator().manual_seed(seed + 4))
    torch.save(OrderedDict(pooled_tensors(vae_to_flashface(vae), seed + 4)), out_dir / VAE_FILE)

    write_tiny_clip_bpe(out_dir / BPE_FILE)
    (out_dir / "antelopev2").mkdir()
    write_antelopev2(out_dir / "antelopev2", seed)
    return sorted(p for p in out_dir.rglob("*") if p.is_file())


def _open_model_index() -> dict[str, Any]:
    # As diffusers 0.22.1 saved IntellectGen's StableDiffusionReferencePipeline (no safety checker).
    return {
        "_class_name": "StableDiffusionReferencePipeline",
        "_diffusers_version": "0.22.1",
        "feature_extractor": [None, None],
        "refnet": ["diffusers", "UNet2DConditionModel"],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def write_open_flashface(out_dir: Path, seed: int) -> list[Path]:
    """Write the tiny open FlashFace (IntellectGen) diffusers folder into the empty folder ``out_dir``."""
    from diffusers import DDIMScheduler

    from .components import save_pretrained_official, tiny_text_encoder, tiny_unet, tiny_vae
    from .make_tiny import _quiet_progress_bars, write_antelopev2
    from .tiny_clip_tokenizer import save_tiny_clip_tokenizer

    with _quiet_progress_bars():
        for name, offset in (("unet", 0), ("refnet", 1)):
            unet = tiny_unet(seed=seed + offset, layers_per_block=2)  # 2 layers: the 10 reference blocks exist
            _perturb(unet, torch.Generator().manual_seed(seed + offset))
            unet.save_pretrained(out_dir / name, safe_serialization=True)
        tiny_vae(seed=seed + 2).save_pretrained(out_dir / "vae", safe_serialization=True)
        save_pretrained_official(tiny_text_encoder(seed=seed + 3), out_dir / "text_encoder")
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    scheduler.save_pretrained(out_dir / "scheduler")
    save_tiny_clip_tokenizer(out_dir / "tokenizer")
    (out_dir / "model_index.json").write_text(json.dumps(_open_model_index(), indent=2) + "\n", encoding="utf-8")
    (out_dir / "antelopev2").mkdir()
    write_antelopev2(out_dir / "antelopev2", seed)
    return sorted(p for p in out_dir.rglob("*") if p.is_file())
