"""A tiny FaceChain-FACT release: the ModelScope ``yucheng1996/FaceChain-FACT`` (rev ``v1.0.0``) files, plus a tiny
SD1.5 base and face models, so FACT pipelines run offline.

Layout written by :func:`write_fact` (paths relative to the output folder)::

    ms1mv2_model_TransFace_S.pt                                       TransFace state dict (official key names)
    adapter_maj_mask_large_new_reg001_faceshuffle_00290001.ckpt       resampler + adapters (torch.save dict)
    adapter_film_mask_large_new_reg001_faceshuffle_00290001.ckpt      same format, other seed
    stable-diffusion-v1-5/...                                         tiny SD1.5 base (``sd15`` layout of make_tiny)
    antelopev2/scrfd_10g_bnkps.onnx                                   tiny face detector
    antelopev2/arcface.onnx                                           tiny face recognizer
    controlnet/                                                       tiny OpenPose ControlNet (from the UNet, zero convs made non-zero)
    canny_controlnet/                                                 tiny Canny ControlNet (same shapes, other seed)
    dwpose/yolox_l.onnx, dwpose/dw-ll_ucoco_384.onnx                  tiny DWPose pose estimator

Shapes:

- TransFace: 112x112 input, 9x9 patches (144 tokens, as released), width 16, 2 blocks, 8 heads, MLP x4, global
  embedding 16 (its ``senet`` and ``feature`` layers read all 144 x width values, so they grow with the width).
- UNet (``stable-diffusion-v1-5/unet``): widths (8, 16, 32, 32) (the smallest SD1.5 1:2:4:4 widths 8 heads
  divide) and cross-attention width 32 (the tiny text encoder's), SD1.5's 2 layers per level and 8 heads, so the
  16 adapter sites and every adapter key name of the real checkpoint exist.
- Resampler (``local_fac_prj.*``): 16 queries, width 48, 2 layers, 12 heads x 4, input 16 (TransFace's), output 32
  (the UNet's cross-attention width), FF x4.
- Adapters (``<site>.attn2.processor.*``): the per-site keys of the release at the site widths 8/16/32, without
  ``ln.*`` (the release is converted from GLIGEN naming, spec §4.2); the gates ``alpha_attn``/``alpha_dense`` are
  non-zero, so the adapters change the UNet's output.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

__all__ = [
    "TINY_RESAMPLER_CONFIG",
    "TINY_TRANSFACE_CONFIG",
    "tiny_fact_unet_config",
    "tiny_fact_adapter_state_dict",
    "tiny_transface",
    "write_fact",
]

TINY_TRANSFACE_CONFIG = {
    "img_size": 112,
    "patch_size": 9,
    "embed_dim": 16,
    "depth": 2,
    "num_heads": 8,
    "mlp_ratio": 4.0,
    "num_features": 16,
}
TINY_RESAMPLER_CONFIG = {
    "dim": 48,
    "depth": 2,
    "dim_head": 4,
    "heads": 12,
    "num_queries": 16,
    "embedding_dim": 16,
    "ff_mult": 4,
}


def tiny_fact_unet_config(**overrides):
    """``tiny_unet_config()`` at SD1.5's depth (2 layers per level) and head count (8), so widths (8, 16, 32, 32)."""
    from idfusion.testing.components import tiny_unet_config

    fact = {"layers_per_block": 2, "attention_head_dim": 8, "block_out_channels": [8, 16, 32, 32]}
    return tiny_unet_config(**(fact | {"norm_num_groups": 8} | overrides))


def _perturb(module: torch.nn.Module, generator: torch.Generator) -> None:
    # Random weights everywhere, including norms, biases and the (zero-initialised) gates.
    with torch.no_grad():
        for param in module.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))


def tiny_transface(seed: int = 0):
    """A seeded random tiny :class:`~idfusion.methods.fact.TransFaceViT` (eval mode, BN statistics perturbed)."""
    from idfusion.methods.fact import TransFaceViT

    torch.manual_seed(seed)
    model = TransFaceViT(**TINY_TRANSFACE_CONFIG)
    generator = torch.Generator().manual_seed(seed)
    _perturb(model, generator)
    with torch.no_grad():
        for bn in (model.feature[1], model.feature[3]):
            bn.running_mean.normal_(0, 0.1, generator=generator)
            bn.running_var.uniform_(0.5, 1.5, generator=generator)
    return model.eval()


def tiny_fact_adapter_state_dict(unet, seed: int = 0, *, with_ln: bool = False) -> dict[str, torch.Tensor]:
    """An adapter checkpoint dict in the official key names for ``unet`` (not modified): ``local_fac_prj.*`` and
    ``<site>.attn2.processor.*`` with random weights and non-zero gates (the relocated ``ln`` only ``with_ln``)."""
    from idfusion.methods.fact import FactFaceAdapter, fact_adapter_key_map

    torch.manual_seed(seed)
    resampler_config = {k: v for k, v in TINY_RESAMPLER_CONFIG.items()}
    adapter = FactFaceAdapter.for_unet(unet, resampler=resampler_config)
    generator = torch.Generator().manual_seed(seed + 1)
    _perturb(adapter.resampler, generator)
    with torch.no_grad():
        for site in adapter.sites:
            for param in site.parameters():
                if param is site.ln.weight or param is site.ln.bias:
                    continue
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
            site.alpha_attn.copy_(0.3 + 0.4 * torch.rand((), generator=generator))
            site.alpha_dense.copy_(-(0.3 + 0.4 * torch.rand((), generator=generator)))
    names = fact_adapter_key_map(adapter)
    return {
        names[key]: value.clone()
        for key, value in adapter.state_dict().items()
        if with_ln or not (key.startswith("sites.") and ".ln." in key)
    }


def write_fact(out_dir: Path, seed: int) -> list[Path]:
    """Write the tiny FACT release (layout in this module's docstring) into the existing, empty ``out_dir``."""
    from idfusion.methods.fact import ADAPTER_FILES, TRANSFACE_FILE
    from idfusion.testing import components
    from idfusion.testing.make_tiny import write_antelopev2, write_sd15

    out_dir = Path(out_dir)
    base = out_dir / "stable-diffusion-v1-5"
    base.mkdir()
    write_sd15(base, seed + 20)
    # SD1.5's depth: replace the base's UNet with one that has the 16 cross-attention sites of the real model.
    shutil.rmtree(base / "unet")
    unet = components.tiny_unet(seed=seed + 30, **tiny_fact_unet_config())
    unet.save_pretrained(base / "unet", safe_serialization=True)

    torch.save(tiny_transface(seed).state_dict(), out_dir / TRANSFACE_FILE)
    for offset, name in enumerate(ADAPTER_FILES.values()):
        torch.save(tiny_fact_adapter_state_dict(unet, seed + 40 + offset), out_dir / name)

    faces = out_dir / "antelopev2"
    faces.mkdir()
    write_antelopev2(faces, seed)
    for folder, offset in (("controlnet", 50), ("canny_controlnet", 60)):
        controlnet = components.tiny_controlnet(unet, seed=seed + offset)
        # a trained ControlNet's zero convolutions are no longer zero: make the condition matter
        generator = torch.Generator().manual_seed(seed + offset + 1)
        for block in (*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block):
            _perturb(block, generator)
        controlnet.save_pretrained(out_dir / folder, safe_serialization=True)
    from idfusion.testing.onnx_pose import write_dwpose

    (out_dir / "dwpose").mkdir()
    write_dwpose(out_dir / "dwpose", seed)
    return sorted(p for p in out_dir.rglob("*") if p.is_file())
