"""Loading FlashFace checkpoints: the official files and the open release.

**Official release** (``shilongz/FlashFace-SD1.5``, or the ``cache/`` folder of ``ali-vilab/FlashFace``), one
folder holding :data:`OFFICIAL_FILES`:

- ``flashface.ckpt``: a ``torch.save``d ``OrderedDict`` of fp32 tensors, 2,142 keys in FlashFace's own UNet naming.
  It holds the main UNet (``time_embedding``, ``encoder`` with a 5-channel input conv, ``middle``, ``decoder``,
  ``head``; the 10 reference attentions ``self_attn.self_attn_first`` live in ``middle`` and ``decoder``), the
  ReferenceNet (``ref_encoder``, ``ref_decoder``, ``ref_middle``), and the main ``encoder``/``middle``/``decoder``
  a second time under ``ori_*`` (one module under two attribute names, saved twice).
- ``openai-clip-vit-large-14.pth``: OpenAI CLIP ViT-L/14, both towers, FlashFace naming (``visual.*``,
  ``textual.*``, ``log_scale``); FlashFace uses the text tower's last hidden state.
- ``sd-v1-vae.pth``: the SD v1 KL-f8 VAE in FlashFace naming (240 keys).
- ``bpe_simple_vocab_16e6.txt.gz``: CLIP's BPE vocabulary.

:func:`load_official_flashface` converts them into diffusers/transformers modules: the main UNet is a plain
``UNet2DConditionModel`` with ``in_channels=5``, the 10 reference attentions a
:class:`~idfusion.methods.flashface.FlashFaceReferenceAttention` (one per
:data:`~idfusion.methods.flashface.REFERENCE_BLOCKS` entry), the ReferenceNet a plain 4-channel
``UNet2DConditionModel``, the text encoder a ``CLIPTextModel``, the VAE an ``AutoencoderKL``.

UNet mapping rules (official top-level prefix -> targets), as :func:`flashface_key_table` applies them:

==========================  ===============================================================================
``time_embedding.*``        main UNet **and** ReferenceNet (the official ReferenceNet runs the main one)
``encoder.*``               main UNet (``encoder.0`` is the 5-channel ``conv_in``)
``middle.*``                main UNet **and** ReferenceNet (the official reference pass runs the main middle
                            block); ``self_attn.self_attn_first`` only to the reference attention
``decoder.*``               main UNet (``self_attn.self_attn_first`` -> the reference attention)
``head.*``                  main UNet **and** ReferenceNet (run, output discarded, by the official code)
``ref_encoder.*``           ReferenceNet (4-channel ``conv_in``)
``ref_decoder.*``           ReferenceNet
``ref_middle.*``            dropped: stored but never executed by the official code (:data:`DROPPED_PREFIXES`)
``ori_{encoder,middle,      dropped after checking each tensor equals its twin without the ``ori_`` prefix;
decoder}.*``                a mismatch is an error (an absent twin carries nothing and is not required)
==========================  ===============================================================================

Inside those prefixes (:func:`diffusers_unet_key_to_flashface`, the one direction written by hand; the table
derives the other): ``down_blocks`` / ``up_blocks`` (resnets, attentions, down/upsamplers) to ``encoder.N`` /
``decoder.N`` indices; residual blocks ``norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut`` to ``layer1.0,
layer1.2, embedding.1, layer2.0, layer2.3, shortcut``; spatial transformers ``norm, proj_in, proj_out`` to ``norm1,
conv1, conv2`` and ``transformer_blocks.b.{attn1, attn2}.{to_q, to_k, to_v, to_out.0}`` to
``blocks.b.{self_attn, cross_attn}.{q,k,v,o}``, ``ff.net.0.proj`` / ``ff.net.2`` to ``ffn.0.proj`` / ``ffn.2``;
``linear_1/linear_2`` to ``time_embedding.0/.2``; ``conv_norm_out/conv_out`` to ``head.0/.2``.

The text tower and VAE maps are written the same way, once, from the diffusers/transformers side
(:func:`flashface_text_key_map`, :func:`flashface_vae_key_map`: fused ``to_qkv`` rows and reshapes are entries of
the map); loading applies them to the target model's own keys and reads the result backwards.

Every converter is strict: each key of the input is mapped or dropped under a documented rule, each parameter of
the target receives a value of the right shape; anything else raises ``ValueError`` listing the offending keys.
:func:`convert_flashface` writes a loaded release as a saved ``FlashFacePipeline`` folder (safetensors).

**Open release** (``IntellectGen/FlashFace``, :func:`load_open_flashface`): a diffusers folder whose
``model_index.json`` names ``StableDiffusionReferencePipeline``, with standard ``unet/``, ``refnet/``, ``vae/``,
``text_encoder/``, ``tokenizer/`` and ``scheduler/`` subfolders.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ModelFilesError
from ..methods.flashface import OFFICIAL, OPEN, REFERENCE_BLOCKS, FlashFaceRelease, build_flashface_models
from ..serialization import load_tensor_file, rebuild_position_ids
from .keymap import ModuleKeyMap, Slot

if TYPE_CHECKING:
    from diffusers import AutoencoderKL
    from torch import nn
    from transformers import CLIPTextModel, CLIPTokenizer

__all__ = [
    "BPE_FILE",
    "CHECKPOINT_FILE",
    "CLIP_FILE",
    "DROPPED_PREFIXES",
    "FLASHFACE_NUM_HEADS",
    "OFFICIAL_FILES",
    "VAE_FILE",
    "ConversionReport",
    "UNetLayout",
    "convert_flashface_text_encoder",
    "convert_flashface_unets",
    "convert_flashface_vae",
    "diffusers_unet_key_to_flashface",
    "flashface_scheduler_config",
    "flashface_key_table",
    "flashface_text_key_map",
    "flashface_vae_key_map",
    "convert_flashface",
    "flashface_unets_state_dict",
    "infer_text_encoder_config",
    "infer_unet_config",
    "infer_vae_config",
    "load_official_flashface",
    "load_open_flashface",
    "KeyTable",
    "text_encoder_to_flashface",
    "vae_to_flashface",
]

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "flashface.ckpt"
CLIP_FILE = "openai-clip-vit-large-14.pth"
VAE_FILE = "sd-v1-vae.pth"
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
OFFICIAL_FILES = (CHECKPOINT_FILE, CLIP_FILE, VAE_FILE, BPE_FILE)
OFFICIAL_REPO = "shilongz/FlashFace-SD1.5"
_DOWNLOAD_HINT = f"The official FlashFace files are state dicts of tensors; download it again from https://huggingface.co/{OFFICIAL_REPO}"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

# Not stored in any tensor: FlashFace's UNet uses 8 heads at every level (``sd_v1_ref_unet``: num_heads=8), its
# GroupNorms eps 1e-6 and 32 groups (``ldm/models/unet.py`` ``GroupNorm``), as does its VAE (``group_norm``).
FLASHFACE_NUM_HEADS = 8
FLASHFACE_NORM_EPS = 1e-6
FLASHFACE_NORM_GROUPS = 32
# CLIP's text towers use 64-wide heads (ViT-L/14: 768 / 12); narrower (tiny) towers get one head.
CLIP_HEAD_DIM = 64

UNET = "unet"
REFNET = "refnet"
REFERENCE = "reference_attention"

_TWIN_REASON = (
    "the same module as {twin}* saved under a second attribute name (RefStableUNet.init_refnet aliases "
    "ori_encoder/ori_middle/ori_decoder to encoder/middle/decoder); checked equal to its twin, then dropped"
)
#: Official key prefixes that are deliberately not loaded, and why.
DROPPED_PREFIXES: dict[str, str] = {
    "ori_encoder.": _TWIN_REASON.format(twin="encoder."),
    "ori_middle.": _TWIN_REASON.format(twin="middle."),
    "ori_decoder.": _TWIN_REASON.format(twin="decoder."),
    "ref_middle.": (
        "the ReferenceNet's own middle block is stored but never executed: RefStableUNet.switch_mode swaps only "
        "encoder/decoder, so the reference pass runs the main middle.* (which the ReferenceNet receives instead)"
    ),
}
_TEXT_DROPPED: dict[str, str] = {
    "textual.head": "CLIP's text projection (pooled text embedding); not part of CLIPTextModel, unused by FlashFace",
    "visual.": "CLIP's image tower; FlashFace uses only the text tower",
    "log_scale": "CLIP's contrastive logit scale; unused by FlashFace",
    "logit_bias": "CLIP's contrastive logit bias; unused by FlashFace",
}


# --------------------------------------------------------------------------------------------------------------------
# UNet key mapping
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UNetLayout:
    """The topology numbers the UNet index mapping depends on (SD1.5's by default).

    Attributes:
        num_levels: resolution levels (``len(block_out_channels)``).
        layers_per_block: residual blocks per encoder level (decoder levels have one more).
        up_attention: per decoder level (``up_blocks`` order), whether it has cross-attention transformers.
    """

    num_levels: int = 4
    layers_per_block: int = 2
    up_attention: tuple[bool, ...] = (False, True, True, True)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> UNetLayout:
        """The layout of a diffusers ``UNet2DConditionModel`` config."""
        layers = config["layers_per_block"]
        if not isinstance(layers, int):
            raise ValueError(f"per-level layers_per_block {layers!r} is not a FlashFace layout")
        up_types = tuple(config["up_block_types"])
        return cls(len(config["block_out_channels"]), layers, tuple("CrossAttn" in t for t in up_types))


SD15_LAYOUT = UNetLayout()

_RESNET_NAMES = {
    "layer1.0": "norm1",
    "layer1.2": "conv1",
    "embedding.1": "time_emb_proj",
    "layer2.0": "norm2",
    "layer2.3": "conv2",
    "shortcut": "conv_shortcut",
}
_ATTN_PROJ = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0"}
_BLOCK_ATTN = {"self_attn": "attn1", "cross_attn": "attn2", "self_attn.self_attn_first": "attn_ref"}
_BLOCK_NAMES = {
    "norm1": "norm1",
    "norm2": "norm2",
    "norm3": "norm3",
    "ffn.0.proj": "ff.net.0.proj",
    "ffn.2": "ff.net.2",
}
_TRANSFORMER_NAMES = {"norm1": "norm", "conv1": "proj_in", "conv2": "proj_out"}
_PARAM = r"(weight|bias)"


def _invert(mapping: Mapping[str, str]) -> dict[str, str]:
    return {v: k for k, v in mapping.items()}


def diffusers_unet_key_to_flashface(key: str, layout: UNetLayout = SD15_LAYOUT) -> str:
    """The UNet map, the one direction written: a ``UNet2DConditionModel`` key (``attn_ref`` included) to FlashFace's
    naming (main-UNet form, without ``ref_``/``ori_`` prefixes); :func:`flashface_key_table` derives the rest.

    Raises:
        KeyError: the key has no FlashFace counterpart.
    """
    per_level = layout.layers_per_block + 1
    resnets, transformers_ = _invert(_RESNET_NAMES), _invert(_TRANSFORMER_NAMES)
    attns, projs, blocks = _invert(_BLOCK_ATTN), _invert(_ATTN_PROJ), _invert(_BLOCK_NAMES)

    def resnet(rest: str) -> str:
        name, _, param = rest.rpartition(".")
        return f"{resnets[name]}.{param}"

    def transformer(rest: str) -> str:
        name, _, param = rest.rpartition(".")
        if name in transformers_:
            return f"{transformers_[name]}.{param}"
        match = re.fullmatch(r"transformer_blocks\.(\d+)\.(attn1|attn2|attn_ref)\.(to_q|to_k|to_v|to_out\.0)", name)
        if match and (match[3] == "to_out.0" or param == "weight"):
            return f"blocks.{match[1]}.{attns[match[2]]}.{projs[match[3]]}.{param}"
        match = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", name)
        if match and match[2] in blocks:
            return f"blocks.{match[1]}.{blocks[match[2]]}.{param}"
        raise KeyError(key)

    try:
        match = re.fullmatch(rf"time_embedding\.linear_([12])\.{_PARAM}", key)
        if match:
            return f"time_embedding.{0 if match[1] == '1' else 2}.{match[2]}"
        match = re.fullmatch(rf"(conv_norm_out|conv_out)\.{_PARAM}", key)
        if match:
            return f"head.{0 if match[1] == 'conv_norm_out' else 2}.{match[2]}"
        match = re.fullmatch(rf"conv_in\.{_PARAM}", key)
        if match:
            return f"encoder.0.{match[1]}"
        match = re.fullmatch(rf"down_blocks\.(\d+)\.downsamplers\.0\.conv\.{_PARAM}", key)
        if match:
            return f"encoder.{1 + int(match[1]) * per_level + layout.layers_per_block}.{match[2]}"
        match = re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key)
        if match:
            index = 1 + int(match[1]) * per_level + int(match[3])
            if match[2] == "resnets":
                return f"encoder.{index}.0.{resnet(match[4])}"
            inner = transformer(match[4])
            if "self_attn_first" in inner:
                raise KeyError(key)
            return f"encoder.{index}.1.{inner}"
        match = re.fullmatch(r"mid_block\.(resnets\.0|attentions\.0|resnets\.1)\.(.+)", key)
        if match:
            part = {"resnets.0": "0", "attentions.0": "1", "resnets.1": "2"}[match[1]]
            return f"middle.{part}.{transformer(match[2]) if part == '1' else resnet(match[2])}"
        match = re.fullmatch(rf"up_blocks\.(\d+)\.upsamplers\.0\.conv\.{_PARAM}", key)
        if match:
            level = int(match[1])
            index = level * per_level + layout.layers_per_block
            return f"decoder.{index}.{1 + layout.up_attention[level]}.1.{match[2]}"
        match = re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key)
        if match:
            index = int(match[1]) * per_level + int(match[3])
            if match[2] == "resnets":
                return f"decoder.{index}.0.{resnet(match[4])}"
            return f"decoder.{index}.1.{transformer(match[4])}"
    except KeyError:
        raise KeyError(key) from None
    raise KeyError(key)


def _rule(key: str) -> str:
    """The report rule of a mapped (not dropped) official UNet key."""
    top = key.split(".", 1)[0]
    if top.startswith("ref_"):
        return f"{top} -> refnet"
    if "self_attn_first" in key:
        return "self_attn_first -> reference_attention"
    if top in ("time_embedding", "middle", "head"):
        return f"{top} -> unet + refnet"
    return f"{top} -> unet"


def _reference_attention_keys(reference_attention: nn.Module) -> dict[str, str]:
    """Each key of a :class:`~idfusion.methods.flashface.FlashFaceReferenceAttention` -> the main-UNet key it would
    have as its block's ``attn_ref`` (``attentions.3.to_q.weight`` -> ``up_blocks.1.attentions.2.…attn_ref.to_q``),
    the naming the UNet key map speaks."""
    keys = {}
    for name in reference_attention.state_dict():
        index, _, rest = name.removeprefix("attentions.").partition(".")
        keys[name] = f"{REFERENCE_BLOCKS[int(index)]}.attn_ref.{rest}"
    return keys


@dataclass(frozen=True)
class KeyTable:
    """The whole map between ``flashface.ckpt`` and the three modules, built from the modules' own keys.

    Attributes:
        targets: official key -> ``[(target, key), ...]`` with target ``"unet"``, ``"refnet"`` or
            ``"reference_attention"`` (the official ReferenceNet runs the main time embedding, middle and head, so
            those keys fill both networks).
        dropped: official key -> the :data:`DROPPED_PREFIXES` rule that drops it.
        twins: ``ori_*`` key -> the key whose copy it is.
    """

    targets: dict[str, list[tuple[str, str]]]
    dropped: dict[str, str]
    twins: dict[str, str]

    def sources(self) -> dict[tuple[str, str], str]:
        """The inverse: ``(target, key)`` -> official key."""
        return {dest: official for official, dests in self.targets.items() for dest in dests}


def flashface_key_table(main: nn.Module, refnet: nn.Module, reference_attention: nn.Module | None) -> KeyTable:
    """The key map of FlashFace's checkpoint for these modules (their shapes may be any size, or meta).

    Only one direction is written by hand (:func:`diffusers_unet_key_to_flashface`); this table applies it to every
    key of the modules, so converting either way reads the same data.
    """
    layout = UNetLayout.from_config(main.config)
    targets: dict[str, list[tuple[str, str]]] = {}
    twins: dict[str, str] = {}

    def add(official: str, target: str, key: str) -> None:
        targets.setdefault(official, []).append((target, key))

    for key in main.state_dict():
        official = diffusers_unet_key_to_flashface(key, layout)
        add(official, UNET, key)
        if official.startswith(("encoder.", "middle.", "decoder.")):
            twins[f"ori_{official}"] = official
    if reference_attention is not None:
        for key, virtual in _reference_attention_keys(reference_attention).items():
            official = diffusers_unet_key_to_flashface(virtual, layout)
            add(official, REFERENCE, key)
            twins[f"ori_{official}"] = official
    dropped = {twin: f"{twin.split('.', 1)[0]}." for twin in twins}
    for key in refnet.state_dict():
        official = diffusers_unet_key_to_flashface(key, layout)
        if official.startswith(("encoder.", "decoder.")):
            add(f"ref_{official}", REFNET, key)
        else:  # time embedding, middle, head: the main UNet's, which the official reference pass runs
            add(official, REFNET, key)
            if official.startswith("middle."):
                dropped[f"ref_{official}"] = "ref_middle."
    return KeyTable(targets, dropped, twins)


@dataclass
class ConversionReport:
    """What a conversion did.

    Attributes:
        counts: official keys per rule (``"decoder -> unet"``, ``"dropped: ori_decoder."``, ...).
        dropped: dropped prefix -> reason, for the prefixes that occurred.
        assigned: target name -> number of tensors given to it.
    """

    counts: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    assigned: dict[str, int] = field(default_factory=dict)

    @property
    def num_keys(self) -> int:
        """Official keys seen (mapped or dropped)."""
        return sum(self.counts.values())

    def __str__(self) -> str:
        rules = ", ".join(f"{rule}: {n}" for rule, n in self.counts.items())
        targets = ", ".join(f"{name} {n}" for name, n in self.assigned.items())
        return f"{self.num_keys} keys ({rules}); tensors set: {targets}"


def _fail(message: str, keys: Iterable[str], limit: int = 20) -> ValueError:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
    return ValueError(f"{message} ({len(keys)}): {shown}")


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_meta or b.is_meta:
        return True  # only shapes can be compared
    return torch.equal(a, b)


def _is_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in module.state_dict().values())


def _check_shapes(converted: Mapping[str, torch.Tensor], module: nn.Module, name: str, source: Mapping[str, str]):
    expected = module.state_dict()
    missing = [f"{name}.{k} (from {source.get(k, '?')})" for k in expected if k not in converted]
    if missing:
        raise _fail(f"{name}: parameters that receive no value from the checkpoint (expected source key)", missing)
    unexpected = [f"{source.get(k, k)} -> {name}.{k}" for k in converted if k not in expected]
    if unexpected:
        raise _fail(f"{name}: keys mapped to parameters the model does not have", unexpected)
    wrong = [
        f"{source.get(k, k)} {tuple(v.shape)} -> {name}.{k} {tuple(expected[k].shape)}"
        for k, v in converted.items()
        if tuple(v.shape) != tuple(expected[k].shape)
    ]
    if wrong:
        raise _fail(f"{name}: shape mismatches", wrong)


def _load_into(module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    if _is_meta(module):
        module.load_state_dict(state, strict=True, assign=True)
    else:
        module.load_state_dict(state, strict=True)


def convert_flashface_unets(
    state_dict: Mapping[str, torch.Tensor],
    main: nn.Module,
    refnet: nn.Module,
    reference_attention: nn.Module | None = None,
) -> ConversionReport:
    """Load the official ``flashface.ckpt`` state dict into the main UNet, the ReferenceNet and the reference
    attention.

    The modules come from ``build_flashface_models(config, OFFICIAL)``; they may live on the meta device (their
    tensors are then replaced by the checkpoint's, ``assign=True``; meta checkpoint tensors keep them meta, for shape
    checks at full size). Mapping and drop rules: this module's docstring and :func:`flashface_key_table`.

    Returns:
        `ConversionReport`: keys per rule, dropped prefixes, tensors set per target.

    Raises:
        ValueError: unknown keys, ``ori_*`` tensors that differ from their twins (or lack one), target parameters
            left without a value, or shape mismatches; the message lists the keys.
    """
    table = flashface_key_table(main, refnet, reference_attention)
    modules = {UNET: main, REFNET: refnet, REFERENCE: reference_attention}
    report = ConversionReport()
    targets: dict[str, dict[str, torch.Tensor]] = {name: {} for name, m in modules.items() if m is not None}
    unknown, twins_differ = [], []
    for key, value in state_dict.items():
        if key in table.dropped:
            twin = table.twins.get(key)
            if twin is not None and (twin not in state_dict or not _same(value, state_dict[twin])):
                twins_differ.append(f"{key} vs {twin}" + ("" if twin in state_dict else " (missing)"))
            prefix = table.dropped[key]
            rule = f"dropped: {prefix}"
            report.dropped[prefix] = DROPPED_PREFIXES[prefix]
        elif key in table.targets:
            rule = _rule(key)
            for index, (target, name) in enumerate(table.targets[key]):
                # Shared tensors are copied for the second target: the two networks must not alias each other.
                targets[target][name] = value if index == 0 or value.is_meta else value.clone()
        else:
            unknown.append(key)
            continue
        report.counts[rule] = report.counts.get(rule, 0) + 1
    if unknown:
        raise _fail("flashface.ckpt: keys that are not part of the official FlashFace checkpoint", unknown)
    if twins_differ:
        raise _fail(
            "flashface.ckpt: ori_* tensors that differ from their twin (expected identical copies)", twins_differ
        )
    sources = table.sources()
    for target, received in targets.items():
        names = {key: official for (t, key), official in sources.items() if t == target}
        _check_shapes(received, modules[target], target, names)
    for target, received in targets.items():
        _load_into(modules[target], received)
    report.assigned = {target: len(received) for target, received in targets.items()}
    logger.debug("flashface.ckpt converted: %s", report)
    return report


_OFFICIAL_ORDER = (
    "time_embedding", "encoder", "middle", "decoder", "head", "ref_encoder", "ref_decoder", "ref_middle",
    "ori_encoder", "ori_decoder", "ori_middle",
)  # fmt: skip
# Registration order of the official modules' children (siblings only ever compare among themselves).
_NAME_RANK = {
    name: rank
    for rank, name in enumerate(
        ["layer1", "embedding", "layer2", "shortcut", "norm1", "self_attn", "conv1", "q", "k", "v", "o",
         "self_attn_first", "norm2", "blocks", "cross_attn", "conv2", "norm3", "ffn", "proj", "weight", "bias"]
    )
}  # fmt: skip


def _registration_order(key: str, rank: Mapping[str, int]) -> tuple:
    """A sort key for official keys in their modules' registration order: indices numerically, names by ``rank``
    (which need only order siblings)."""
    return tuple((0, int(p), "") if p.isdigit() else (1, rank.get(p, 99), p) for p in key.split("."))


def _official_sort_key(key: str) -> tuple:
    top, _, rest = key.partition(".")
    return (_OFFICIAL_ORDER.index(top), _registration_order(rest, _NAME_RANK))


def flashface_unets_state_dict(
    main: nn.Module,
    refnet: nn.Module,
    reference_attention: nn.Module | None = None,
    *,
    ref_middle: nn.Module | None = None,
) -> OrderedDict[str, torch.Tensor]:
    """The inverse conversion: the three modules as an official ``flashface.ckpt`` state dict.

    All 11 official prefixes are written, in the official order, as separate tensors (``ori_*`` are copies of
    ``encoder``/``middle``/``decoder``, as in the released file). The ReferenceNet's own time embedding, mid block and
    head have no place in the official format (it runs the main ones) and are not written; ``ref_middle.*`` is
    ``ref_middle``'s weights (a ``UNetMidBlock2DCrossAttn``), by default the ReferenceNet's mid block.

    Returns:
        `OrderedDict[str, torch.Tensor]`: official key -> tensor (contiguous CPU-side copies).
    """
    table = flashface_key_table(main, refnet, reference_attention)
    states = {UNET: main.state_dict(), REFNET: refnet.state_dict()}
    if reference_attention is not None:
        states[REFERENCE] = reference_attention.state_dict()
    out: dict[str, torch.Tensor] = {}
    for official, dests in table.targets.items():
        target, key = dests[0]  # shared keys are written from the main UNet, which comes first
        out[official] = states[target][key].detach().clone()
    for twin, original in table.twins.items():
        out[twin] = out[original].clone()
    middle = (ref_middle if ref_middle is not None else refnet.mid_block).state_dict()
    layout = UNetLayout.from_config(main.config)
    for name, value in middle.items():
        out[f"ref_{diffusers_unet_key_to_flashface(f'mid_block.{name}', layout)}"] = value.detach().clone()
    return OrderedDict(sorted(out.items(), key=lambda item: _official_sort_key(item[0])))


# --------------------------------------------------------------------------------------------------------------------
# Configs inferred from tensor shapes
# --------------------------------------------------------------------------------------------------------------------


def _indices(keys: Iterable[str], pattern: str) -> list[int]:
    return sorted({int(m[1]) for k in keys if (m := re.match(pattern, k))})


def infer_unet_config(state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, Any]:
    """The diffusers ``UNet2DConditionModel`` config of a FlashFace UNet from its tensor shapes.

    Widths, levels, layers per level, which levels have attention, in/out channels and the cross-attention width
    come from the tensors (``prefix`` selects e.g. ``"ref_"`` for the ReferenceNet's encoder); what no tensor holds
    is FlashFace's constant: 8 heads everywhere (:data:`FLASHFACE_NUM_HEADS`), GroupNorm eps 1e-6 and 32 groups.
    Other values are SD1.5's (:func:`~idfusion.sd15.sd15_unet_config`).

    Raises:
        ValueError: the tensors do not describe a FlashFace (SD-style) UNet.
    """
    from ..sd15 import sd15_unet_config

    enc = f"{prefix}encoder."
    try:
        entries = _indices(state_dict, rf"{re.escape(enc)}(\d+)\.")
        levels: list[list[int]] = [[]]
        for index in entries[1:]:
            if f"{enc}{index}.weight" in state_dict:  # a downsampling conv closes the level
                levels.append([])
            else:
                levels[-1].append(index)
        layers = {len(level) for level in levels}
        if len(layers) != 1 or 0 in layers:
            raise ValueError(f"uneven encoder levels {levels}")
        widths = [int(state_dict[f"{enc}{level[0]}.0.layer1.2.weight"].shape[0]) for level in levels]
        attention = [f"{enc}{level[0]}.1.norm1.weight" in state_dict for level in levels]
        cross = [v for k, v in state_dict.items() if k.endswith("cross_attn.k.weight")]
        config = sd15_unet_config(
            attention_head_dim=FLASHFACE_NUM_HEADS,
            block_out_channels=widths,
            cross_attention_dim=int(cross[0].shape[1]) if cross else 768,
            down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
            up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
            in_channels=int(state_dict[f"{enc}0.weight"].shape[1]),
            layers_per_block=layers.pop(),
            norm_eps=FLASHFACE_NORM_EPS,
            norm_num_groups=FLASHFACE_NORM_GROUPS,
            out_channels=int(state_dict["head.2.weight"].shape[0]) if "head.2.weight" in state_dict else 4,
        )
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(f"not a FlashFace UNet state dict: {error}") from error
    if any(w % FLASHFACE_NUM_HEADS or w % FLASHFACE_NORM_GROUPS for w in widths):
        raise ValueError(f"widths {widths} are not divisible by {FLASHFACE_NUM_HEADS} heads and 32 groups")
    return config


def infer_text_encoder_config(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The ``CLIPTextConfig`` of the ``textual.*`` tower in FlashFace naming, from its tensor shapes.

    Heads are not stored: ``hidden / 64`` (CLIP's head width; ViT-L/14's text tower has 12), one head when narrower.
    Other values are SD1.5's (:func:`~idfusion.sd15.sd15_text_encoder_config`): quick-GELU, eps 1e-5.
    """
    from ..sd15 import sd15_text_encoder_config

    try:
        vocab, hidden = state_dict["textual.token_embedding.weight"].shape
        positions = state_dict["textual.pos_embedding"].shape[-2]
        layers = _indices(state_dict, r"textual\.transformer\.(\d+)\.")
        intermediate = state_dict["textual.transformer.0.mlp.0.weight"].shape[0]
    except KeyError as error:
        raise ValueError(f"not a FlashFace CLIP text tower: no {error}") from error
    heads = max(1, hidden // CLIP_HEAD_DIM)
    if hidden % heads:
        raise ValueError(f"text width {hidden} is not divisible into {CLIP_HEAD_DIM}-wide heads")
    head = state_dict.get("textual.head")
    return sd15_text_encoder_config(
        hidden_size=int(hidden),
        intermediate_size=int(intermediate),
        max_position_embeddings=int(positions),
        num_attention_heads=int(heads),
        num_hidden_layers=len(layers),
        projection_dim=int(head.shape[-1]) if head is not None else int(hidden),
        vocab_size=int(vocab),
    )


def _vae_levels(state_dict: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """(levels, residual blocks per encoder level) of a FlashFace VAE."""
    entries = _indices(state_dict, r"encoder\.downsamples\.(\d+)\.")
    levels: list[int] = [0]
    for index in entries:
        if f"encoder.downsamples.{index}.resample.1.weight" in state_dict:
            levels.append(0)
        elif f"encoder.downsamples.{index}.residual.0.weight" in state_dict:
            levels[-1] += 1
        else:
            raise ValueError(f"encoder.downsamples.{index} is neither a residual block nor a downsampler")
    if len(set(levels)) != 1 or levels[0] == 0:
        raise ValueError(f"uneven encoder levels {levels}")
    return len(levels), levels[0]


def infer_vae_config(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The diffusers ``AutoencoderKL`` config of a VAE in FlashFace naming, from its tensor shapes (widths,
    levels, blocks per level, channels); groups 32 as in FlashFace's ``group_norm``; the rest SD1.5's."""
    from ..sd15 import sd15_vae_config

    try:
        num_levels, layers = _vae_levels(state_dict)
        widths = [
            int(state_dict[f"encoder.downsamples.{level * (layers + 1)}.residual.2.weight"].shape[0])
            for level in range(num_levels)
        ]
        return sd15_vae_config(
            block_out_channels=widths,
            down_block_types=["DownEncoderBlock2D"] * num_levels,
            up_block_types=["UpDecoderBlock2D"] * num_levels,
            in_channels=int(state_dict["encoder.conv1.weight"].shape[1]),
            latent_channels=int(state_dict["conv2.weight"].shape[0]),
            layers_per_block=layers,
            norm_num_groups=FLASHFACE_NORM_GROUPS,
            out_channels=int(state_dict["decoder.head.2.weight"].shape[0]),
        )
    except (KeyError, ValueError) as error:
        raise ValueError(f"not a FlashFace VAE state dict: {error}") from error


# --------------------------------------------------------------------------------------------------------------------
# Text encoder and VAE
# --------------------------------------------------------------------------------------------------------------------

# The text tower map, written once: CLIPTextModel key (nested names) -> its place in FlashFace's textual.*.
_TEXT_TOP = {
    "text_model.embeddings.token_embedding.weight": Slot("textual.token_embedding.weight"),
    # the model's (L, C) is stored as (1, L, C)
    "text_model.embeddings.position_embedding.weight": Slot("textual.pos_embedding", reshape="unbatch"),
    "text_model.final_layer_norm.weight": Slot("textual.norm.weight"),
    "text_model.final_layer_norm.bias": Slot("textual.norm.bias"),
}
# Per layer: CLIPEncoderLayer module -> official module. q/k/v are the rows [0:C], [C:2C], [2C:3C] of to_qkv, the
# order FlashFace's view(b, s, 3, n, d) unbinds.
_TEXT_LAYER = {
    "layer_norm1": Slot("norm1"),
    "self_attn.q_proj": Slot("attn.to_qkv", (0, 3)),
    "self_attn.k_proj": Slot("attn.to_qkv", (1, 3)),
    "self_attn.v_proj": Slot("attn.to_qkv", (2, 3)),
    "self_attn.out_proj": Slot("attn.proj"),
    "layer_norm2": Slot("norm2"),
    "mlp.fc1": Slot("mlp.0"),
    "mlp.fc2": Slot("mlp.2"),
}
_TEXT_LAYER_RE = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
# A buffer (persistent in older transformers) that the official file does not hold; rebuilt on loading.
_TEXT_POSITION_IDS = "text_model.embeddings.position_ids"
# The written order: the official text tower's attributes as registered (siblings only compare among themselves).
_TEXT_RANK = {
    name: rank
    for rank, name in enumerate(
        ["token_embedding", "pos_embedding", "transformer", "norm", "head", "norm1", "attn", "to_qkv", "proj",
         "norm2", "mlp", "weight", "bias"]
    )
}  # fmt: skip


def _text_dropped(key: str) -> str | None:
    return next((p for p in _TEXT_DROPPED if key == p or (p.endswith(".") and key.startswith(p))), None)


def _meta_state(build, config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return build(config).state_dict()


def _strict_result(
    converted: dict[str, torch.Tensor],
    sources: dict[str, str],
    expected: Mapping[str, torch.Tensor],
    what: str,
    to_official,
) -> None:
    missing = []
    for key in expected:
        if key not in converted:
            try:
                missing.append(f"{to_official(key)} (for {key})")
            except KeyError:
                missing.append(key)
    if missing:
        raise _fail(f"{what}: official keys missing (needed for the model's parameters)", missing)
    unexpected = [sources[k] for k in converted if k not in expected]
    if unexpected:
        raise _fail(f"{what}: keys with no place in the model", unexpected)
    wrong = [
        f"{sources[k]} {tuple(v.shape)} -> {k} {tuple(expected[k].shape)}"
        for k, v in converted.items()
        if tuple(v.shape) != tuple(expected[k].shape)
    ]
    if wrong:
        raise _fail(f"{what}: shape mismatches", wrong)


def _text_slot(key: str) -> Slot | None:
    """The text tower map, the one direction written: a ``CLIPTextModel`` key (nested names) -> its ``textual.*``
    slot."""
    if key in _TEXT_TOP:
        return _TEXT_TOP[key]
    match = _TEXT_LAYER_RE.fullmatch(key)
    slot = _TEXT_LAYER.get(match[2]) if match else None
    if match is None or slot is None:
        return None
    return slot._replace(key=f"textual.transformer.{match[1]}.{slot.key}.{match[3]}")


def flashface_text_key_map(keys: Iterable[str]) -> ModuleKeyMap:
    """The text tower map over these ``CLIPTextModel`` keys (nested ``text_model.`` names, as
    :func:`~idfusion.sd15.official_state_dict` gives them; meta tensors will do)."""
    return ModuleKeyMap.derive(keys, _text_slot)


def convert_flashface_text_encoder(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The text tower of ``openai-clip-vit-large-14.pth`` (FlashFace naming) as ``CLIPTextModel`` weights.

    Keys come out under the official nested names (``text_model.embeddings.token_embedding.weight``, ...), which
    ``CLIPTextModel.from_pretrained`` reads under transformers 4 and 5. ``textual.transformer.i.attn.to_qkv`` is
    split into ``q_proj``/``k_proj``/``v_proj`` (rows ``[0:C]``, ``[C:2C]``, ``[2C:3C]``, the order FlashFace's
    ``view(b, s, 3, n, d)`` unbinds), ``pos_embedding (1, L, C)`` becomes ``position_embedding.weight (L, C)``.
    Dropped with reason: ``textual.head`` (the projection; not part of ``CLIPTextModel``), ``visual.*`` (image
    tower), ``log_scale``/``logit_bias``.

    Raises:
        ValueError: unknown keys, missing keys (named as in the official file), or shapes that do not fit.
    """
    from ..sd15 import build_text_encoder, official_state_dict

    with torch.device("meta"):
        expected = official_state_dict(build_text_encoder(infer_text_encoder_config(state_dict)))
    table = flashface_text_key_map(expected)
    kept = {k: v for k, v in state_dict.items() if _text_dropped(k) is None}
    converted, sources, unknown = table.from_official(kept)
    if unknown:
        raise _fail(f"{CLIP_FILE}: keys that are not part of FlashFace's CLIP", unknown)
    _strict_result(converted, sources, expected, CLIP_FILE, lambda k: table.slots[k].key)
    return converted


def text_encoder_to_flashface(
    text_encoder: CLIPTextModel | Mapping[str, torch.Tensor], projection: torch.Tensor | None = None
) -> OrderedDict[str, torch.Tensor]:
    """The inverse of :func:`convert_flashface_text_encoder`: ``textual.*`` tensors in FlashFace naming (the text
    tower's attributes in registration order).

    Args:
        text_encoder: a ``CLIPTextModel``, or its state dict under nested (``text_model.``) or flat names.
        projection: ``textual.head`` (``(hidden, embed_dim)``, no bias), which ``CLIPTextModel`` does not hold.

    Raises:
        ValueError: keys with no place in the official file, or ``q/k/v`` projections without the others.
    """
    from ..sd15 import official_state_dict

    if isinstance(text_encoder, Mapping):
        state = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in text_encoder.items()}
    else:
        state = official_state_dict(text_encoder)
    state.pop(_TEXT_POSITION_IDS, None)
    table = flashface_text_key_map(state)
    unplaced = [*table.unmapped, *table.incomplete()]
    if unplaced:
        raise _fail(
            "CLIPTextModel: keys with no place in FlashFace's text tower (or q/k/v without the rest)", unplaced
        )
    out = table.to_official(state)
    if projection is not None:
        out["textual.head"] = projection
    ordered = sorted(out.items(), key=lambda item: _registration_order(item[0], _TEXT_RANK))
    return OrderedDict((k, v.detach().clone().contiguous()) for k, v in ordered)


# The VAE map, written once: AutoencoderKL module -> its place in sd-v1-vae.pth (parameter names are kept).
_VAE_TOP = {
    "encoder.conv_in": "encoder.conv1",
    "encoder.conv_norm_out": "encoder.head.0",
    "encoder.conv_out": "encoder.head.2",
    "quant_conv": "conv1",
    "post_quant_conv": "conv2",
    "decoder.conv_in": "decoder.conv1",
    "decoder.conv_norm_out": "decoder.head.0",
    "decoder.conv_out": "decoder.head.2",
}
_VAE_RESNET = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6"}
_VAE_RESNET["conv_shortcut"] = "shortcut"
# The single-head mid-block attention: 1x1 convs in the file, to_qkv holding q, k, v as channel thirds in that order.
_VAE_ATTENTION = {
    "group_norm": Slot("norm"),
    "to_q": Slot("to_qkv", (0, 3), "1x1"),
    "to_k": Slot("to_qkv", (1, 3), "1x1"),
    "to_v": Slot("to_qkv", (2, 3), "1x1"),
    "to_out.0": Slot("proj", reshape="1x1"),
}
_VAE_LEVEL_RE = re.compile(
    r"(encoder)\.down_blocks\.(\d+)\.(?:resnets\.(\d+)\.(\w+)|downsamplers\.0\.conv)"
    r"|(decoder)\.up_blocks\.(\d+)\.(?:resnets\.(\d+)\.(\w+)|upsamplers\.0\.conv)"
)
# Registration order of the official VAE modules' children (siblings only ever compare among themselves).
_VAE_SIDES = {"encoder": 0, "conv1": 1, "conv2": 2, "decoder": 3}
_VAE_RANK = {"conv1": 0, "downsamples": 1, "middle": 1, "upsamples": 2, "head": 3, "residual": 0, "shortcut": 1,
             "resample": 0, "norm": 0, "to_qkv": 1, "proj": 2, "weight": 0, "bias": 1}  # fmt: skip


def _vae_slot(key: str, layers: int) -> Slot | None:
    """The VAE map, the one direction written: an ``AutoencoderKL`` key -> its slot in ``sd-v1-vae.pth``
    (``layers``: residual blocks per encoder level)."""
    module, _, param = key.rpartition(".")
    if param not in ("weight", "bias"):
        return None
    if module in _VAE_TOP:
        return Slot(f"{_VAE_TOP[module]}.{param}")
    match = re.fullmatch(r"(encoder|decoder)\.mid_block\.(attentions\.0|resnets\.[01])\.(.+)", module)
    if match:
        side, part, rest = match.groups()
        if part == "attentions.0":
            slot = _VAE_ATTENTION.get(rest)
            return None if slot is None else slot._replace(key=f"{side}.middle.1.{slot.key}.{param}")
        name = _VAE_RESNET.get(rest)
        return None if name is None else Slot(f"{side}.middle.{0 if part == 'resnets.0' else 2}.{name}.{param}")
    match = _VAE_LEVEL_RE.fullmatch(module)
    if match is None:
        return None
    encoder = match[1] is not None
    side, level, block, name = match.groups()[:4] if encoder else match.groups()[4:]
    listing, per_level = ("downsamples", layers + 1) if encoder else ("upsamples", layers + 2)  # blocks, resampler
    if block is None:
        return Slot(f"{side}.{listing}.{int(level) * per_level + per_level - 1}.resample.1.{param}")
    if name not in _VAE_RESNET:
        return None
    return Slot(f"{side}.{listing}.{int(level) * per_level + int(block)}.{_VAE_RESNET[name]}.{param}")


def flashface_vae_key_map(keys: Iterable[str]) -> ModuleKeyMap:
    """The VAE map over these ``AutoencoderKL`` keys (meta tensors will do)."""
    keys = list(keys)
    layers = len(_indices(keys, r"encoder\.down_blocks\.0\.resnets\.(\d+)\."))
    return ModuleKeyMap.derive(keys, lambda key: _vae_slot(key, layers))


def convert_flashface_vae(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``sd-v1-vae.pth`` (FlashFace naming, 240 keys at full size) as diffusers ``AutoencoderKL`` weights (248).

    ``encoder.conv1``/``decoder.conv1`` -> ``conv_in``, ``head.0``/``head.2`` -> ``conv_norm_out``/``conv_out``,
    top-level ``conv1``/``conv2`` -> ``quant_conv``/``post_quant_conv``, ``encoder.downsamples.N`` /
    ``decoder.upsamples.N`` -> ``down_blocks``/``up_blocks`` resnets and ``resample.1`` -> down/upsampler convs,
    residual ``residual.0/2/3/6``, ``shortcut`` -> ``norm1, conv1, norm2, conv2, conv_shortcut``. The single-head
    mid-block attention: ``norm`` -> ``group_norm``, 1x1-conv ``to_qkv (3C, C, 1, 1)`` -> linear ``to_q/to_k/to_v
    (C, C)`` (channel thirds, in that order), ``proj (C, C, 1, 1)`` -> ``to_out.0 (C, C)``.

    Raises:
        ValueError: unknown keys, missing keys (named as in the official file), or shapes that do not fit.
    """
    from ..sd15 import build_vae

    expected = _meta_state(build_vae, infer_vae_config(state_dict))
    table = flashface_vae_key_map(expected)
    converted, sources, unknown = table.from_official(state_dict)
    if unknown:
        raise _fail(f"{VAE_FILE}: keys that are not part of FlashFace's VAE", unknown)
    _strict_result(converted, sources, expected, VAE_FILE, lambda k: table.slots[k].key)
    return converted


def _vae_sort_key(key: str) -> tuple:
    side, _, rest = key.partition(".")
    return (_VAE_SIDES[side], _registration_order(rest, _VAE_RANK))


def vae_to_flashface(vae: AutoencoderKL | Mapping[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """The inverse of :func:`convert_flashface_vae`: an ``AutoencoderKL`` (or its state dict) in FlashFace naming,
    in the official module order (encoder, ``conv1``, ``conv2``, decoder).

    Raises:
        ValueError: keys with no place in the official file, or ``q/k/v`` projections without the others.
    """
    state = dict(vae.items()) if isinstance(vae, Mapping) else vae.state_dict()
    table = flashface_vae_key_map(state)
    unplaced = [*table.unmapped, *table.incomplete()]
    if unplaced:
        raise _fail("AutoencoderKL: keys with no place in FlashFace's VAE (or q/k/v without the rest)", unplaced)
    out = {k: v.detach().clone().contiguous() for k, v in table.to_official(state).items()}
    return OrderedDict(sorted(out.items(), key=lambda item: _vae_sort_key(item[0])))


# --------------------------------------------------------------------------------------------------------------------
# Loading the official files
# --------------------------------------------------------------------------------------------------------------------


def flashface_scheduler_config(release: FlashFaceRelease = OFFICIAL) -> dict[str, Any]:
    """FlashFace's ``DDIMScheduler`` config: SD1.5's noise schedule (scaled_linear 0.00085-0.012, 1000 steps,
    epsilon), no sample clipping, ``set_alpha_to_one=False``, with the release's timestep spacing (official:
    ``trailing``, offset 0)."""
    return {
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": False,
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "set_alpha_to_one": False,
        "steps_offset": 0,
        "timestep_spacing": "trailing",
        "trained_betas": None,
        **release.scheduler_config,
    }


def _missing_files_error(folder: Path, missing: list[str]) -> ModelFilesError:
    return ModelFilesError(
        f"{folder}: FlashFace files missing: {', '.join(missing)}. The official release needs "
        f"{', '.join(OFFICIAL_FILES)} in one folder: download them from https://huggingface.co/{OFFICIAL_REPO} "
        "(or use the FlashFace repo's cache/ folder) and give that folder"
    )


def _build_text_encoder(config: Mapping[str, Any], nested_state: Mapping[str, torch.Tensor]) -> CLIPTextModel:
    from ..sd15 import build_text_encoder, official_state_dict

    with torch.device("meta"):
        model = build_text_encoder(config)
    # The model's own key names (flat under transformers 5) for the nested official ones, in state-dict order.
    names = dict(zip(official_state_dict(model), model.state_dict(), strict=True))
    model.load_state_dict({names[k]: v for k, v in nested_state.items()}, strict=True, assign=True)
    rebuild_position_ids(model)
    return model.eval()


def _build_vae(config: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> AutoencoderKL:
    from ..sd15 import build_vae

    with torch.device("meta"):
        model = build_vae(config)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def _tokenizer_from_bpe(bpe_path: Path) -> CLIPTokenizer:
    from transformers import CLIPTokenizer

    from ..clip_tokenizer import save_clip_tokenizer

    tmp = Path(tempfile.mkdtemp(prefix="idfusion-flashface-tokenizer-"))
    try:
        save_clip_tokenizer(tmp, bpe_path=bpe_path)
        return CLIPTokenizer.from_pretrained(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _to_dtype(parts: dict[str, Any], torch_dtype: torch.dtype | None) -> dict[str, Any]:
    if torch_dtype is not None:
        for name in ("unet", "refnet", "reference_attention", "text_encoder", "vae"):
            if parts.get(name) is not None:
                parts[name] = parts[name].to(torch_dtype)
    return parts


def load_official_flashface(folder: str | os.PathLike[str], *, torch_dtype: torch.dtype | None = None) -> dict:
    """Load the official FlashFace release from one folder holding :data:`OFFICIAL_FILES`.

    Model sizes are read from the tensors (:func:`infer_unet_config`, :func:`infer_text_encoder_config`,
    :func:`infer_vae_config`), so smaller checkpoints in the same format load too.

    Args:
        folder: the folder (the FlashFace repo's ``cache/``, or a snapshot of ``shilongz/FlashFace-SD1.5``).
        torch_dtype: cast the four networks to this dtype (default: as stored, fp32).

    Returns:
        `dict`: ``unet`` (main ``UNet2DConditionModel``, 5 input channels, ``attn_ref`` in the reference blocks),
        ``refnet`` (ReferenceNet ``UNet2DConditionModel``), ``text_encoder`` (``CLIPTextModel``), ``vae``
        (``AutoencoderKL``), ``tokenizer`` (``CLIPTokenizer`` from the folder's BPE file) and ``scheduler``
        (``DDIMScheduler`` with :func:`flashface_scheduler_config`), all in eval mode.

    Raises:
        ModelFilesError: files missing or unreadable (the message lists the files needed and where).
        ValueError: a file whose keys or shapes do not match the official format.
    """
    from ..schedulers import FlashFaceDDIMScheduler

    root = Path(folder).expanduser()
    missing = [name for name in OFFICIAL_FILES if not (root / name).is_file()]
    if missing:
        raise _missing_files_error(root, missing)

    unet_state = load_tensor_file(root / CHECKPOINT_FILE, what="FlashFace state dict", hint=_DOWNLOAD_HINT)
    config = infer_unet_config(unet_state)
    with torch.device("meta"):
        unet, refnet, reference_attention = build_flashface_models(config, OFFICIAL)
    report = convert_flashface_unets(unet_state, unet, refnet, reference_attention)
    del unet_state
    logger.info("%s: %s", CHECKPOINT_FILE, report)

    clip_state = load_tensor_file(root / CLIP_FILE, what="FlashFace state dict", hint=_DOWNLOAD_HINT)
    text_state = convert_flashface_text_encoder(clip_state)
    text_encoder = _build_text_encoder(infer_text_encoder_config(clip_state), text_state)
    del clip_state, text_state

    vae_state = load_tensor_file(root / VAE_FILE, what="FlashFace state dict", hint=_DOWNLOAD_HINT)
    vae = _build_vae(infer_vae_config(vae_state), convert_flashface_vae(vae_state))

    parts = {
        "unet": unet.eval(),
        "refnet": refnet.eval(),
        "reference_attention": reference_attention.eval(),
        "text_encoder": text_encoder,
        "vae": vae,
        "tokenizer": _tokenizer_from_bpe(root / BPE_FILE),
        # the release's DDIM over fractional trailing times (not diffusers' DDIM, which moves the result)
        "scheduler": FlashFaceDDIMScheduler(timestep_spacing="trailing"),
    }
    return _to_dtype(parts, torch_dtype)


def convert_flashface(source: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """``idfusion convert --method flashface``: the official files to a saved pipeline folder (safetensors), which
    ``FlashFacePipeline.from_pretrained`` loads without reading a pickle."""
    from ..pipelines.pipeline_flashface import FlashFacePipeline

    pipe = FlashFacePipeline(**load_official_flashface(source), release=OFFICIAL.name)
    pipe.save_pretrained(out)
    return Path(out)


# --------------------------------------------------------------------------------------------------------------------
# Open FlashFace (IntellectGen)
# --------------------------------------------------------------------------------------------------------------------

OPEN_PIPELINE_CLASS = "StableDiffusionReferencePipeline"


def load_open_flashface(folder: str | os.PathLike[str], torch_dtype: torch.dtype | None = None) -> dict:
    """Load the open re-implementation's diffusers folder (``IntellectGen/FlashFace``).

    Each subfolder loads with its library's ``from_pretrained`` (``local_files_only``): ``unet`` and ``refnet``
    (``UNet2DConditionModel``, 4 channels), ``vae``, ``text_encoder`` (``CLIPTextModel``), ``tokenizer`` and
    ``scheduler`` (``DDIMScheduler``).

    Raises:
        ModelFilesError: ``model_index.json`` or a component folder is missing, or the index names another
            pipeline.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    root = Path(folder).expanduser()
    parts_needed = ("unet", "refnet", "vae", "text_encoder", "tokenizer", "scheduler")
    marker = {"scheduler": "scheduler_config.json", "tokenizer": "vocab.json"}
    needed = ["model_index.json"] + [f"{part}/{marker.get(part, 'config.json')}" for part in parts_needed]
    missing = [name for name in needed if not (root / name).is_file()]
    if missing:
        raise ModelFilesError(
            f"{root}: open FlashFace files missing: {', '.join(missing)}. Download the diffusers folder of "
            "https://huggingface.co/IntellectGen/FlashFace (model_index.json and the unet/, refnet/, vae/, "
            "text_encoder/, tokenizer/, scheduler/ folders) and give that folder"
        )
    index = json.loads((root / "model_index.json").read_text(encoding="utf-8"))
    if index.get("_class_name") != OPEN_PIPELINE_CLASS:
        raise ModelFilesError(
            f"{root}/model_index.json: _class_name {index.get('_class_name')!r}, expected {OPEN_PIPELINE_CLASS!r}"
        )
    kwargs: dict[str, Any] = {"local_files_only": True}
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    parts = {
        "unet": UNet2DConditionModel.from_pretrained(root / "unet", **kwargs).eval(),
        "refnet": UNet2DConditionModel.from_pretrained(root / "refnet", **kwargs).eval(),
        "vae": AutoencoderKL.from_pretrained(root / "vae", **kwargs).eval(),
        "text_encoder": CLIPTextModel.from_pretrained(root / "text_encoder", **kwargs).eval(),
        "tokenizer": CLIPTokenizer.from_pretrained(root / "tokenizer", local_files_only=True),
        # the release's noise schedule, sampled with its own spacing (t = 999, 979, ..., 19)
        "scheduler": DDIMScheduler.from_config(
            {**DDIMScheduler.load_config(root / "scheduler"), **OPEN.scheduler_config}
        ),
    }
    for name in ("unet", "refnet"):
        if parts[name].config.in_channels != OPEN.in_channels:
            raise ModelFilesError(
                f"{root}/{name}: in_channels {parts[name].config.in_channels}; the open FlashFace UNets have 4"
            )
    return parts
