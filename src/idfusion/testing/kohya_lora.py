"""Tiny style LoRAs in the kohya ``sd-scripts`` file format, for tests of LoRA loading and unloading.

The style LoRAs FaceChain-FACT uses (spec ``facechain-fact.md`` §2.6) are kohya-format safetensors: one triple of
tensors per patched ``nn.Linear``, under a flattened module name::

    lora_unet_<module path, "." -> "_">.lora_down.weight    (rank, in_features)
    lora_unet_<module path, "." -> "_">.lora_up.weight      (out_features, rank)
    lora_unet_<module path, "." -> "_">.alpha               ()  scalar; the update is up @ down * alpha / rank
    lora_te_text_model_encoder_layers_<N>_self_attn_<q|k|v|out>_proj.{lora_down.weight,lora_up.weight,alpha}

UNet module paths come in two spellings, both written here:

- ``naming="diffusers"``: the diffusers UNet's own paths (``down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``),
  which is what kohya ``sd-scripts`` writes for SD 1.x (it trains on the diffusers UNet).
- ``naming="ldm"``: the original LDM/SGM UNet's paths (``input_blocks_1_1_transformer_blocks_0_attn1_to_q``,
  ``middle_block_1_…``, ``output_blocks_3_1_…``), found in LoRAs made or converted by LDM-based tools. diffusers maps
  these back with the UNet's ``layers_per_block``; with ``L`` layers per level, ``down_blocks.i.attentions.j`` is
  ``input_blocks.{i(L+1)+j+1}.1``, ``mid_block.attentions.0`` is ``middle_block.1`` and ``up_blocks.i.attentions.j``
  is ``output_blocks.{i(L+1)+j}.1``.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:
    from torch import nn

__all__ = ["UNET_TARGETS", "TEXT_ENCODER_TARGETS", "kohya_unet_name", "kohya_lora_targets", "write_kohya_lora"]

logger = logging.getLogger(__name__)

#: Linear layers patched in every UNet transformer block (self- and cross-attention).
UNET_TARGETS = tuple(f"{attn}.{proj}" for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v", "to_out.0"))
#: Linear layers patched in every CLIP text encoder layer.
TEXT_ENCODER_TARGETS = tuple(f"self_attn.{proj}_proj" for proj in ("q", "k", "v", "out"))

_UNET_ATTENTION = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.attentions\.(\d+)\.|mid_block\.attentions\.0\.")
_TEXT_LAYER = re.compile(r"(?:^|\.)encoder\.layers\.(\d+)\.(.+)$")


def kohya_unet_name(
    module_path: str, *, naming: Literal["diffusers", "ldm"] = "diffusers", layers_per_block: int = 2
) -> str:
    """The kohya key stem of a diffusers UNet module, e.g. ``mid_block.attentions.0.transformer_blocks.0.attn2.to_k``
    → ``lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k`` (or ``…middle_block_1_…`` for ``ldm``).

    Args:
        module_path (`str`): the module's path in ``UNet2DConditionModel`` (inside a transformer attention block).
        naming (`str`, defaults to ``"diffusers"``): ``"diffusers"`` or ``"ldm"`` block numbering.
        layers_per_block (`int`, defaults to 2): the UNet's ``layers_per_block`` (SD1.5: 2), for ``ldm`` numbering.

    Returns:
        `str`: the key stem, without ``.lora_down.weight`` etc.
    """
    if naming == "ldm":
        match = _UNET_ATTENTION.match(module_path)
        if match is None:
            raise ValueError(f"{module_path!r}: LDM naming is only written for transformer (attention) blocks")
        kind, block, layer = match.groups()
        if kind == "down_blocks":
            ldm = f"input_blocks.{int(block) * (layers_per_block + 1) + int(layer) + 1}.1."
        elif kind == "up_blocks":
            ldm = f"output_blocks.{int(block) * (layers_per_block + 1) + int(layer)}.1."
        else:
            ldm = "middle_block.1."
        module_path = ldm + module_path[match.end() :]
    elif naming != "diffusers":
        raise ValueError(f"naming must be 'diffusers' or 'ldm', got {naming!r}")
    return "lora_unet_" + module_path.replace(".", "_")


def kohya_lora_targets(
    unet: nn.Module | None = None,
    text_encoder: nn.Module | None = None,
    *,
    naming: Literal["diffusers", "ldm"] = "diffusers",
) -> dict[str, nn.Module]:
    """The linear layers a kohya style LoRA patches, by kohya key stem, in module order.

    UNet: ``attn1``/``attn2`` ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` of every ``BasicTransformerBlock`` (the FACT
    adapter's own layers under ``attn2.processor`` are not targets). Text encoder: ``self_attn.{q,k,v,out}_proj`` of
    every CLIP encoder layer, named ``lora_te_text_model_encoder_layers_N_…`` whether or not the transformers version
    nests the layers under ``text_model``. Layers already wrapped by peft are returned as their wrappers.
    """
    targets: dict[str, nn.Module] = {}
    if unet is not None:
        layers_per_block = int(getattr(getattr(unet, "config", None), "layers_per_block", 2))
        for path, block in unet.named_modules():
            if type(block).__name__ != "BasicTransformerBlock":
                continue
            for suffix in UNET_TARGETS:
                attn = suffix.split(".")[0]
                if getattr(block, attn, None) is None:
                    continue
                linear = block.get_submodule(suffix)
                stem = kohya_unet_name(f"{path}.{suffix}", naming=naming, layers_per_block=layers_per_block)
                targets[stem] = linear
    if text_encoder is not None:
        found = False
        for path, module in text_encoder.named_modules():
            match = _TEXT_LAYER.search(path)
            # by path, not type: after a LoRA is loaded the layer is a peft wrapper around the nn.Linear
            if match is None or match.group(2) not in TEXT_ENCODER_TARGETS:
                continue
            found = True
            targets[f"lora_te_text_model_encoder_layers_{match.group(1)}_{match.group(2).replace('.', '_')}"] = module
        if not found:
            raise ValueError(f"{type(text_encoder).__name__}: no CLIP encoder layers (encoder.layers.N.self_attn)")
    return targets


def write_kohya_lora(
    path: str | os.PathLike[str],
    unet: nn.Module | None,
    text_encoder: nn.Module | None = None,
    *,
    rank: int = 4,
    alpha: float | None = None,
    seed: int = 0,
    naming: Literal["diffusers", "ldm"] = "diffusers",
    up_std: float = 0.5,
) -> Path:
    """Write a random kohya-format LoRA for ``unet`` (and ``text_encoder``) to ``path`` (a ``.safetensors`` file).

    Both factors are random and non-zero (unlike a freshly initialised LoRA, whose ``up`` is zero), so the LoRA
    changes outputs: ``down ~ N(0, 1/in_features)``, ``up ~ N(0, up_std^2 / rank)``. Tensors are float32.

    Args:
        path: the output file.
        unet (`UNet2DConditionModel`, *optional*): the UNet whose attention layers to target.
        text_encoder (`CLIPTextModel`, *optional*): also write ``lora_te_*`` entries for this text encoder.
        rank (`int`, defaults to 4): the LoRA rank.
        alpha (`float`, *optional*): the stored ``alpha``; defaults to ``rank / 2``, so the scale ``alpha / rank``
            (0.5) is not 1 and a loader that ignores ``alpha`` is caught.
        seed (`int`, defaults to 0): seed of the random factors.
        naming (`str`, defaults to ``"diffusers"``): UNet block naming, ``"diffusers"`` or ``"ldm"`` (module doc).
        up_std (`float`, defaults to 0.5): scale of the ``up`` factors.

    Returns:
        `Path`: ``path``.
    """
    from safetensors.torch import save_file

    if unet is None and text_encoder is None:
        raise ValueError("write_kohya_lora needs a unet, a text_encoder or both")
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    alpha = rank / 2 if alpha is None else float(alpha)
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for stem, linear in kohya_lora_targets(unet, text_encoder, naming=naming).items():
        fan_in, fan_out = linear.in_features, linear.out_features
        state[f"{stem}.lora_down.weight"] = torch.randn(rank, fan_in, generator=generator) / fan_in**0.5
        state[f"{stem}.lora_up.weight"] = torch.randn(fan_out, rank, generator=generator) * (up_std / rank**0.5)
        state[f"{stem}.alpha"] = torch.tensor(alpha)
    # the training metadata kohya writes; loaders read only the tensors
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": repr(alpha),
        "ss_base_model_version": "sd_v1",
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=metadata)
    logger.debug("wrote kohya LoRA %s (%d layers, rank %d, alpha %s)", path, len(state) // 3, rank, alpha)
    return path
