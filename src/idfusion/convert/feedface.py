"""Loading FeedFace's base model: the official UniDiffuser-v1 files into diffusers' UniDiffuser classes.

FeedFace (``Xiang-cd/FeedFace``) runs on a frozen UniDiffuser-v1 and expects the official files in ``models/``
(:data:`UVIT_FILE`, :data:`AUTOENCODER_FILE`, :data:`CAPTION_DECODER_FILE`, :data:`GPT2_DIR`); the CLIP ViT-L/14
text encoder comes from the Hub (``openai/clip-vit-large-patch14``). Each file is a ``torch.save``\\ d dict of tensors:

- ``uvit_v1.pth``: the U-ViT (``UViTCondToken`` in ``libs/unidiffuser_v1.py``), 952.5 M parameters. Loaded into
  diffusers' deprecated :class:`~diffusers.UniDiffuserModel` with :data:`UVIT_V1_CONFIG` (diffusers' own v1 config,
  ``use_data_type_embedding=True``).
- ``autoencoder_kl.pth``: the LDM KL-f8 autoencoder (``FrozenAutoencoderKL``: ``ch=128, ch_mult=[1,2,4,4],
  num_res_blocks=2, z_channels=4, embed_dim=4``, scale 0.18215): Stable Diffusion's VAE architecture. Loaded into
  :class:`~diffusers.AutoencoderKL` (:data:`VAE_CONFIG`); the key map is diffusers' LDM naming.
- ``caption_decoder.pth``: UniDiffuser's GPT-2 caption decoder (``ClipCaptionModel`` saved from a
  ``DataParallel``, so every key starts with ``module.``). Loaded into :class:`~diffusers.UniDiffuserTextDecoder`;
  text-to-image uses only its ``encode_prefix`` (Linear 768 -> 64) on the CLIP text tokens.
- ``gpt2/``: the Hugging Face ``gpt2`` folder (config and tokenizer files; the weights are overwritten by the
  caption decoder's).

U-ViT key mapping (official -> diffusers; block prefixes ``in_blocks.i`` ->
``transformer.transformer_in_blocks.i``, ``mid_block`` -> ``transformer.transformer_mid_block``, ``out_blocks.i`` ->
``transformer.transformer_out_blocks.i.block``):

=================================  ===========================================================================
``patch_embed.proj``               ``vae_img_in.proj`` (and copied to the unused ``transformer.pos_embed.proj``)
``text_embed`` / ``text_out``      ``text_in`` / ``text_out``
``clip_img_embed`` / ``_out``      ``clip_img_in`` / ``clip_img_out``
``pos_embed``                      ``pos_embed`` (1 + 1 + 77 + 1 + patches positions, no data-type slot)
``pos_embed_token``                ``data_type_pos_embed_token`` (inserted after the two timestep positions)
``token_embedding``                ``data_type_token_embedding``
``norm`` / ``decoder_pred``        ``transformer.norm_out`` / ``vae_img_out``
block ``attn.qkv`` (3C, C)         ``attn1.to_q``, ``to_k``, ``to_v`` (rows 0:C, C:2C, 2C:3C)
block ``attn.proj``                ``attn1.to_out.0``
block ``norm2`` / ``norm3``        ``norm1`` / ``norm3`` (post-LN after the attention / MLP residual)
block ``mlp.fc1`` / ``mlp.fc2``    ``ff.net.0.proj`` / ``ff.net.2``
out-block ``skip_linear``          ``transformer.transformer_out_blocks.i.skip.skip_linear``
out-block ``norm1``                ``transformer.transformer_out_blocks.i.skip.norm`` (LN after skip_linear)
=================================  ===========================================================================

Every official key is used; the only diffusers key without an official source is ``transformer.pos_embed.proj``
(:data:`UNUSED_DIFFUSERS_KEYS`: ``UTransformer2DModel``'s own patch embedding, never run by ``UniDiffuserModel``, which
embeds patches with ``vae_img_in``), filled with a copy of ``patch_embed.proj`` as diffusers' conversion script does
and dropped by the inverse conversion. Caption decoder: ``module.`` is stripped, ``gpt.`` becomes ``transformer.``,
and the per-layer causal-mask buffers ``gpt.transformer.h.i.attn.bias`` / ``attn.masked_bias`` are dropped after
checking they hold the constant values. Those buffers were persistent in the transformers versions UniDiffuser (4.23.1)
and FeedFace (4.28) pin, whose loaders require every key of the model (``assert len(mk) == 0``), so the file has them
[inferred; diffusers' ``UniDiffuserTextDecoder`` ignores them on load for the same reason]; they are non-persistent
and rebuilt from ``n_positions`` since. ``clip.*`` keys, which the official loader tolerates, are dropped too.

Each key map is written once, as data, in one direction (diffusers key -> official key: :func:`diffusers_key_to_uvit`,
:func:`diffusers_vae_key_to_ldm`, the caption decoder's rename); a :class:`ModuleKeyMap` applies it to the target
model's own keys (built on the meta device from the inferred config), and loading reads that table backwards, fused
and reshaped tensors included. All converters are strict: every input key is mapped or dropped under a named rule,
every parameter of the target gets a tensor of the right shape; anything else raises ``ValueError`` listing the
offending keys. The ``save_official_*`` functions write the inverse conversions (diffusers -> the official layout),
used to make tiny test checkpoints; the round trip official -> diffusers -> official is exact.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ModelFilesError
from ..serialization import load_tensor_file
from .keymap import ModuleKeyMap, Slot
from .keymap import key_listing as _listing

if TYPE_CHECKING:
    import torch
    from diffusers import AutoencoderKL, UniDiffuserModel, UniDiffuserTextDecoder
    from transformers import GPT2Tokenizer

__all__ = [
    "AUTOENCODER_FILE",
    "CAPTION_DECODER_FILE",
    "CAPTION_EOS_TOKEN",
    "CLIP_TEXT_DIR",
    "GPT2_DIR",
    "ModuleKeyMap",
    "NUM_TEXT_TOKENS",
    "Slot",
    "TEXT_DECODER_CONFIG",
    "UNUSED_DIFFUSERS_KEYS",
    "UVIT_FILE",
    "UVIT_HEAD_DIM",
    "UVIT_V1_CONFIG",
    "VAE_CONFIG",
    "autoencoder_key_map",
    "autoencoder_to_official_state_dict",
    "caption_decoder_key_map",
    "caption_decoder_to_official_state_dict",
    "convert_autoencoder_state_dict",
    "convert_caption_decoder_state_dict",
    "convert_uvit_state_dict",
    "diffusers_key_to_uvit",
    "diffusers_vae_key_to_ldm",
    "infer_autoencoder_config",
    "infer_text_decoder_config",
    "infer_uvit_config",
    "load_autoencoder",
    "load_gpt2_tokenizer",
    "load_text_decoder",
    "load_uvit",
    "official_uvit_keys",
    "save_official_autoencoder",
    "save_official_caption_decoder",
    "save_official_uvit",
    "text_decoder_config",
    "uvit_config",
    "uvit_key_map",
    "uvit_key_to_diffusers",
    "uvit_to_official_state_dict",
    "vae_config",
]

logger = logging.getLogger(__name__)

UVIT_FILE = "uvit_v1.pth"
_HINT = "Put the official file there (models/ of Hugging Face Xiang-cd/FeedFace)."
AUTOENCODER_FILE = "autoencoder_kl.pth"
CAPTION_DECODER_FILE = "caption_decoder.pth"
GPT2_DIR = "gpt2"
#: Where the tiny test kit puts the ``openai/clip-vit-large-patch14`` text encoder the official code takes from the Hub.
CLIP_TEXT_DIR = "clip-vit-large-patch14"
#: The special token the official ``CaptionDecoder`` adds to the GPT-2 tokenizer (vocabulary 50,257 -> 50,258).
CAPTION_EOS_TOKEN = "<|EOS|>"
#: CLIP's context length; the U-ViT's ``pos_embed`` has ``1 + 1 + NUM_TEXT_TOKENS + 1 + patches`` rows.
NUM_TEXT_TOKENS = 77
#: UniDiffuser-v1's head width (1536 / 24 heads). Heads are stored in no tensor; loaders assume this width.
UVIT_HEAD_DIM = 64

#: diffusers ``UniDiffuserModel`` config of UniDiffuser-v1 (diffusers' conversion script, "big" config, version 1):
#: 1536 wide (24 x 64 heads), 30 layers = 15 in-blocks + mid + 15 out-blocks, MLP x4 (exact GELU), post-LN, no qkv
#: bias, 64x64x4 latents in 2x2 patches, 77 text tokens of width 64, a 512-d CLIP image token, a data-type token.
UVIT_V1_CONFIG: dict[str, Any] = {
    "text_dim": 64,
    "clip_img_dim": 512,
    "num_text_tokens": NUM_TEXT_TOKENS,
    "num_attention_heads": 24,
    "attention_head_dim": UVIT_HEAD_DIM,
    "in_channels": 4,
    "out_channels": 4,
    "num_layers": 30,
    "dropout": 0.0,
    "norm_num_groups": 32,
    "attention_bias": False,
    "sample_size": 64,
    "patch_size": 2,
    "activation_fn": "gelu",
    "num_embeds_ada_norm": 1000,  # unused with norm_type="layer_norm"; kept as diffusers' script writes it
    "norm_type": "layer_norm",
    "block_type": "unidiffuser",
    "pre_layer_norm": False,
    "use_timestep_embedding": False,  # official mlp_time_embed=False: the sinusoid is the token
    "norm_elementwise_affine": True,
    "use_patch_pos_embed": False,
    "ff_final_dropout": True,
    "use_data_type_embedding": True,
}

#: diffusers ``AutoencoderKL`` config of UniDiffuser's ``autoencoder_kl.pth`` (``libs/autoencoder.py`` ``get_model``:
#: ch 128, ch_mult (1, 2, 4, 4), 2 res blocks, 4 latent channels, GroupNorm 32, scale 0.18215) = SD's KL-f8 VAE.
VAE_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 256,  # the official ddconfig resolution; not stored in any tensor
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

#: diffusers ``UniDiffuserTextDecoder`` config of ``caption_decoder.pth`` (diffusers' conversion script): GPT-2 small
#: with its vocabulary grown by ``<|EOS|>``, a 77-token prefix of CLIP-L width 768 encoded to 64. ``activation_function``
#: is GPT-2's own ``gelu_new`` (the official code builds the GPT-2 from ``models/gpt2/config.json``); diffusers' script
#: wrote ``"gelu"``, which only affects caption generation, never text-to-image.
TEXT_DECODER_CONFIG: dict[str, Any] = {
    "prefix_length": NUM_TEXT_TOKENS,
    "prefix_inner_dim": 768,
    "prefix_hidden_dim": 64,
    "vocab_size": 50258,
    "n_positions": 1024,
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "n_inner": 3072,
    "activation_function": "gelu_new",
    "resid_pdrop": 0.1,
    "embd_pdrop": 0.1,
    "attn_pdrop": 0.1,
    "layer_norm_epsilon": 1e-5,
    "initializer_range": 0.02,
}

_PATCH_EMBED_REASON = (
    "UTransformer2DModel's own patch embedding, never run by UniDiffuserModel (it embeds patches with vae_img_in); "
    "filled with a copy of patch_embed.proj on conversion, dropped on the way back"
)
#: diffusers ``UniDiffuserModel`` keys with no official counterpart, and why.
UNUSED_DIFFUSERS_KEYS: dict[str, str] = {
    "transformer.pos_embed.proj.weight": _PATCH_EMBED_REASON,
    "transformer.pos_embed.proj.bias": _PATCH_EMBED_REASON,
}


# --------------------------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------------------------


def _merged(base: Mapping[str, Any], overrides: Mapping[str, Any], cls_name: str) -> dict[str, Any]:
    unknown = set(overrides) - set(base)
    if unknown:  # a key beyond the base is fine if the class takes it; a typo would otherwise pass silently
        import diffusers

        params = inspect.signature(getattr(diffusers, cls_name).__init__).parameters
        unknown -= set(params)
    if unknown:
        raise TypeError(f"unknown {cls_name} config keys {sorted(unknown)}; known include: {sorted(base)}")
    return {**copy.deepcopy(dict(base)), **copy.deepcopy(dict(overrides))}


def uvit_config(**overrides: Any) -> dict[str, Any]:
    """:data:`UVIT_V1_CONFIG` with ``overrides`` applied (checked against ``UniDiffuserModel``'s arguments)."""
    return _merged(UVIT_V1_CONFIG, overrides, "UniDiffuserModel")


def vae_config(**overrides: Any) -> dict[str, Any]:
    """:data:`VAE_CONFIG` with ``overrides`` applied (checked against ``AutoencoderKL``'s arguments)."""
    return _merged(VAE_CONFIG, overrides, "AutoencoderKL")


def text_decoder_config(**overrides: Any) -> dict[str, Any]:
    """:data:`TEXT_DECODER_CONFIG` with ``overrides`` applied (checked against ``UniDiffuserTextDecoder``'s arguments)."""
    return _merged(TEXT_DECODER_CONFIG, overrides, "UniDiffuserTextDecoder")


# --------------------------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------------------------


def _check_against(
    converted: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    what: str,
    unexpected: set[str] | None = None,
) -> None:
    """Raise ``ValueError`` naming source keys without a rule, target keys left empty, and shape mismatches."""
    problems = []
    if unexpected:
        problems.append(f"unexpected keys (no conversion rule): {_listing(unexpected)}")
    missing = set(expected) - set(converted)
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    extra = set(converted) - set(expected)
    if extra:
        problems.append(f"keys the model does not have: {_listing(extra)}")
    mismatched = [
        f"{k} {tuple(converted[k].shape)} != {tuple(expected[k].shape)}"
        for k in sorted(set(converted) & set(expected))
        if tuple(converted[k].shape) != tuple(expected[k].shape)
    ]
    if mismatched:
        problems.append(f"shape mismatches (checkpoint != model): {_listing(mismatched)}")
    if problems:
        raise ValueError(f"{what}: " + "; ".join(problems))


def _meta_state(build: Any) -> dict[str, torch.Tensor]:
    import torch

    with torch.device("meta"):
        return build().state_dict()


def _load_into(model: torch.nn.Module, state: Mapping[str, torch.Tensor], dtype: Any, device: Any) -> Any:
    import torch

    # assign=True keeps the checkpoint's tensors (no copy into freshly initialised ones); cast afterwards.
    model.load_state_dict(dict(state), strict=True, assign=True)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # a non-persistent buffer would not be in the checkpoint; built on "meta" it would stay empty
        raise RuntimeError(f"{type(model).__name__}: tensors not materialised after loading: {_listing(left)}")
    if device is not None or dtype is not None:
        # nn.Module.to: diffusers' ModelMixin.to warns about fp32-pinned modules these models do not have
        torch.nn.Module.to(model, **{k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None})
    return model.eval()


# --------------------------------------------------------------------------------------------------------------------
# U-ViT
# --------------------------------------------------------------------------------------------------------------------

# The U-ViT map, written once: UniDiffuserModel module -> official module (parameter names are kept). Loading
# derives the other direction from the model's own keys (uvit_key_map).
_UVIT_TOP = {
    "vae_img_in.proj": Slot("patch_embed.proj"),
    # UNUSED_DIFFUSERS_KEYS: a copy of the patch embedding that UniDiffuserModel never runs
    "transformer.pos_embed.proj": Slot("patch_embed.proj", copy=True),
    "text_in": Slot("text_embed"),
    "text_out": Slot("text_out"),
    "clip_img_in": Slot("clip_img_embed"),
    "clip_img_out": Slot("clip_img_out"),
    "data_type_token_embedding": Slot("token_embedding"),
    "transformer.norm_out": Slot("norm"),
    "vae_img_out": Slot("decoder_pred"),
}
_UVIT_PARAMS = {"pos_embed": Slot("pos_embed"), "data_type_pos_embed_token": Slot("pos_embed_token")}
# Inside a block (an in-block, the mid block, an out-block's ``.block``).
_UVIT_BLOCK = {
    "norm1": Slot("norm2"),  # post-LN after the attention residual
    "norm3": Slot("norm3"),
    # rows [0:C], [C:2C], [2C:3C] of qkv: the official code reads the fused output as (K=3, heads, head_dim)
    "attn1.to_q": Slot("attn.qkv", (0, 3)),
    "attn1.to_k": Slot("attn.qkv", (1, 3)),
    "attn1.to_v": Slot("attn.qkv", (2, 3)),
    "attn1.to_out.0": Slot("attn.proj"),
    "ff.net.0.proj": Slot("mlp.fc1"),
    "ff.net.2": Slot("mlp.fc2"),
}
# Only in out-blocks, relative to ``transformer.transformer_out_blocks.i`` (not its ``.block``).
_UVIT_SKIP = {"skip.skip_linear": Slot("skip_linear"), "skip.norm": Slot("norm1")}
_QKV = "attn.qkv.weight"

_DIFFUSERS_BLOCK_RE = re.compile(
    r"^transformer\.(?:transformer_(in)_blocks\.(\d+)|transformer_(mid)_block|transformer_(out)_blocks\.(\d+))\.(.+)$"
)


def _split_param(rest: str) -> tuple[str, str] | None:
    module, _, param = rest.rpartition(".")
    return (module, param) if param in ("weight", "bias") and module else None


def _uvit_slot(key: str) -> Slot | None:
    """The U-ViT map, the one direction written: a ``UniDiffuserModel`` key -> its place in ``uvit_v1.pth``."""
    if key in _UVIT_PARAMS:
        return _UVIT_PARAMS[key]
    split = _split_param(key)
    if split is not None and split[0] in _UVIT_TOP:
        slot = _UVIT_TOP[split[0]]
        return slot._replace(key=f"{slot.key}.{split[1]}")
    match = _DIFFUSERS_BLOCK_RE.match(key)
    split = _split_param(match.group(6)) if match else None
    if match is None or split is None:
        return None
    in_, in_index, _mid, out, out_index, _ = match.groups()
    module, param = split
    if out and module in _UVIT_SKIP:
        slot = _UVIT_SKIP[module]
    elif out:
        slot = _UVIT_BLOCK.get(module.removeprefix("block.")) if module.startswith("block.") else None
    else:
        slot = _UVIT_BLOCK.get(module)
    prefix = f"in_blocks.{in_index}" if in_ else f"out_blocks.{out_index}" if out else "mid_block"
    return None if slot is None else slot._replace(key=f"{prefix}.{slot.key}.{param}")


def diffusers_key_to_uvit(key: str) -> str | None:
    """The official U-ViT key of a ``UniDiffuserModel`` key, or ``None`` (unused keys, ``to_q/k/v``, unknown).

    The U-ViT map is written once, in this direction; :func:`uvit_key_map` has the fused ``to_q/k/v`` too.
    """
    slot = _uvit_slot(key)
    return None if slot is None or slot.part is not None or slot.copy else slot.key


def uvit_key_map(keys: Iterable[str]) -> ModuleKeyMap:
    """The U-ViT map over these ``UniDiffuserModel`` keys (a model's ``state_dict()``, meta tensors will do)."""
    return ModuleKeyMap.derive(keys, _uvit_slot)


@lru_cache(maxsize=4)
def _uvit_keys_map(num_blocks: int) -> ModuleKeyMap:
    """:func:`uvit_key_map` over every key a U-ViT of ``num_blocks`` in-blocks can have (meta, narrow: only the
    names matter)."""
    import torch
    from diffusers import UniDiffuserModel

    config = uvit_config(num_layers=2 * num_blocks, num_attention_heads=1, attention_head_dim=32)
    with torch.device("meta"):
        return uvit_key_map(UniDiffuserModel(**config).state_dict())


def uvit_key_to_diffusers(key: str) -> str | None:
    """The ``UniDiffuserModel`` key of an official U-ViT key, or ``None`` if no rule applies.

    ``attn.qkv.weight`` keys map to three keys and return ``None`` here (:func:`uvit_key_map` splits them). Derived
    from :func:`diffusers_key_to_uvit` over the keys of a U-ViT deep enough for the key's block index.
    """
    index = max([-1, *_block_indices([key], "in_blocks"), *_block_indices([key], "out_blocks")])
    table = _uvit_keys_map(1 << max(4, (index + 1).bit_length()))  # 16, 32, ... blocks: few models cover all keys
    owners = [k for k in table.groups.get(key, ()) if not table.slots[k].copy]
    return owners[0] if len(owners) == 1 and table.slots[owners[0]].part is None else None


def official_uvit_keys(num_blocks: int = 15, *, data_type: bool = True) -> list[str]:
    """The official U-ViT state-dict keys in ``UViTCondToken.state_dict()`` order.

    Args:
        num_blocks (`int`, *optional*, defaults to 15): in-blocks (= out-blocks), ``depth // 2``.
        data_type (`bool`, *optional*, defaults to `True`): v1's data-type token (``pos_embed_token``,
            ``token_embedding``); UniDiffuser-v0 has neither.

    Returns:
        `list[str]`: the keys (own parameters first, then submodules in registration order, as torch saves them).
    """

    def block(prefix: str, skip: bool) -> list[str]:
        modules = (["norm1"] if skip else []) + ["norm2"]
        keys = [f"{prefix}.{m}.{p}" for m in modules for p in ("weight", "bias")]
        keys += [f"{prefix}.{_QKV}", f"{prefix}.attn.proj.weight", f"{prefix}.attn.proj.bias"]
        keys += [f"{prefix}.{m}.{p}" for m in ("norm3", "mlp.fc1", "mlp.fc2") for p in ("weight", "bias")]
        return keys + ([f"{prefix}.skip_linear.weight", f"{prefix}.skip_linear.bias"] if skip else [])

    keys = ["pos_embed"] + (["pos_embed_token"] if data_type else [])
    for module in ("patch_embed.proj", "text_embed", "text_out", "clip_img_embed", "clip_img_out"):
        keys += [f"{module}.weight", f"{module}.bias"]
    for i in range(num_blocks):
        keys += block(f"in_blocks.{i}", skip=False)
    keys += block("mid_block", skip=False)
    for i in range(num_blocks):
        keys += block(f"out_blocks.{i}", skip=True)
    keys += ["norm.weight", "norm.bias", "decoder_pred.weight", "decoder_pred.bias"]
    return keys + (["token_embedding.weight"] if data_type else [])


def _block_indices(state: Mapping[str, Any], kind: str) -> list[int]:
    pattern = re.compile(rf"^{kind}\.(\d+)\.")
    return sorted({int(m.group(1)) for k in state if (m := pattern.match(k))})


def infer_uvit_config(state: Mapping[str, torch.Tensor], *, num_attention_heads: int | None = None) -> dict[str, Any]:
    """The ``UniDiffuserModel`` config of an official U-ViT state dict, read from its tensor shapes.

    Width, depth, patch size, channels, text and CLIP-image widths, latent size and the data-type token come from
    shapes. The text length is CLIP's 77 (it shares ``pos_embed`` rows with the patches, so shapes cannot separate
    them). Heads are stored nowhere: ``width / 64`` (UniDiffuser's head width) unless ``num_attention_heads`` is given.

    Args:
        state (`Mapping[str, torch.Tensor]`): official key names (as in ``uvit_v1.pth``).
        num_attention_heads (`int`, *optional*): overrides the head count.

    Returns:
        `dict[str, Any]`: a config for ``UniDiffuserModel(**config)``, based on :data:`UVIT_V1_CONFIG`.

    Raises:
        ValueError: a key the shapes are read from is missing, or the shapes are inconsistent.
    """
    needed = ["pos_embed", "patch_embed.proj.weight", "text_embed.weight", "clip_img_embed.weight"]
    needed += ["decoder_pred.weight", "in_blocks.0.mlp.fc1.weight"]
    absent = [k for k in needed if k not in state]
    if absent:
        raise ValueError(f"U-ViT state dict: cannot infer the config, missing keys: {', '.join(absent)}")
    _, num_tokens, width = state["pos_embed"].shape
    _, in_channels, patch, _ = state["patch_embed.proj.weight"].shape
    num_patches = num_tokens - 3 - NUM_TEXT_TOKENS
    side = math.isqrt(max(num_patches, 0))
    if num_patches <= 0 or side * side != num_patches:
        raise ValueError(
            f"U-ViT state dict: pos_embed has {num_tokens} positions; expected 1 + 1 + {NUM_TEXT_TOKENS} + 1 + a "
            "square number of patches"
        )
    out_dim = state["decoder_pred.weight"].shape[0]
    if out_dim % (patch * patch):
        raise ValueError(f"U-ViT state dict: decoder_pred has {out_dim} outputs, not a multiple of patch {patch}^2")
    in_blocks, out_blocks = _block_indices(state, "in_blocks"), _block_indices(state, "out_blocks")
    if in_blocks != list(range(len(in_blocks))) or out_blocks != in_blocks:
        raise ValueError(
            f"U-ViT state dict: in_blocks {in_blocks} and out_blocks {out_blocks} must both be 0..n-1 (U-ViT pairs "
            "every in-block with an out-block)"
        )
    hidden = state["in_blocks.0.mlp.fc1.weight"].shape[0]
    if hidden != 4 * width:  # diffusers' FeedForward is fixed at 4x
        raise ValueError(f"U-ViT state dict: MLP hidden width {hidden} is not 4 x {width}")
    if num_attention_heads is None:
        if width % UVIT_HEAD_DIM:
            raise ValueError(
                f"U-ViT state dict: width {width} is not a multiple of {UVIT_HEAD_DIM}; pass num_attention_heads"
            )
        num_attention_heads = width // UVIT_HEAD_DIM
    if width % num_attention_heads:
        raise ValueError(f"U-ViT: width {width} is not divisible by {num_attention_heads} heads")
    return uvit_config(
        text_dim=int(state["text_embed.weight"].shape[1]),
        clip_img_dim=int(state["clip_img_embed.weight"].shape[1]),
        num_attention_heads=int(num_attention_heads),
        attention_head_dim=int(width // num_attention_heads),
        in_channels=int(in_channels),
        out_channels=int(out_dim // (patch * patch)),
        num_layers=2 * len(in_blocks),
        sample_size=int(side * patch),
        patch_size=int(patch),
        use_data_type_embedding="token_embedding.weight" in state,
    )


def _uvit_meta_state(config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    from diffusers import UniDiffuserModel

    return _meta_state(lambda: UniDiffuserModel(**config))


def convert_uvit_state_dict(
    state: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None = None
) -> dict[str, torch.Tensor]:
    """Convert an official U-ViT state dict (``uvit_v1.pth``) to ``UniDiffuserModel`` keys.

    Args:
        state (`Mapping[str, torch.Tensor]`): official key names.
        config (`Mapping[str, Any]`, *optional*): the target config; defaults to :func:`infer_uvit_config`.

    Returns:
        `dict[str, torch.Tensor]`: every key of ``UniDiffuserModel(**config).state_dict()``. ``attn.qkv.weight``
        (3C, C) is split by rows into ``to_q``, ``to_k``, ``to_v`` (C, C) each (the official code reads the fused
        output as ``(K=3, heads, head_dim)``); ``transformer.pos_embed.proj`` gets a copy of ``patch_embed.proj``.

    Raises:
        ValueError: keys without a rule, keys missing, or shapes that do not fit the config (all named).
    """
    config = dict(config) if config is not None else infer_uvit_config(state)
    expected = _uvit_meta_state(config)
    table = uvit_key_map(expected)
    # A fused tensor whose rows do not split into its parts has no rule (its parts are then named missing).
    counts = {k: table.split_count(k) for k in state if k in table.groups}
    unsplit = {k for k, n in counts.items() if n > 1 and (state[k].ndim == 0 or state[k].shape[0] % n)}
    out, _, unknown = table.from_official({k: v for k, v in state.items() if k not in unsplit}, clone_parts=False)
    _check_against(out, expected, "U-ViT checkpoint", set(unknown) | unsplit)
    return out


def uvit_to_official_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert ``UniDiffuserModel`` keys back to the official U-ViT layout (the inverse of
    :func:`convert_uvit_state_dict`), in the official key order.

    ``to_q``/``to_k``/``to_v`` are concatenated into ``attn.qkv.weight``; :data:`UNUSED_DIFFUSERS_KEYS` are dropped.

    Raises:
        ValueError: a key without a rule, or an incomplete ``to_q/k/v`` triple.
    """
    table = uvit_key_map(state)
    unexpected = [*table.unmapped, *table.incomplete()]
    if unexpected:
        raise ValueError(f"UniDiffuserModel state dict: keys without an official name: {_listing(unexpected)}")
    out = table.to_official(state)
    order = {k: i for i, k in enumerate(official_uvit_keys(len(_block_indices(out, "in_blocks"))))}
    return dict(sorted(out.items(), key=lambda item: (order.get(item[0], len(order)), item[0])))


def load_uvit(
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    num_attention_heads: int | None = None,
) -> UniDiffuserModel:
    """Load the official ``uvit_v1.pth`` (or any official-layout U-ViT file) as a ``UniDiffuserModel``.

    Args:
        path (`str` or `os.PathLike`): the ``torch.save``\\ d state dict (read with ``weights_only=True``).
        dtype (`torch.dtype`, *optional*): cast to this dtype (default: the file's).
        device (`str` or `torch.device`, *optional*): move to this device (default: CPU).
        num_attention_heads (`int`, *optional*): heads, if not ``width / 64`` (see :func:`infer_uvit_config`).

    Returns:
        `UniDiffuserModel`: in eval mode, config inferred from the shapes.

    Raises:
        ModelFilesError: the file is missing or not a tensor dict.
        ValueError: the keys or shapes are not a U-ViT's.
    """
    from diffusers import UniDiffuserModel

    path = Path(path)
    state = load_tensor_file(path, what="U-ViT state dict", hint=_HINT)
    try:
        config = infer_uvit_config(state, num_attention_heads=num_attention_heads)
        converted = convert_uvit_state_dict(state, config)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error
    import torch

    with torch.device("meta"):  # no random init of weights about to be replaced
        model = UniDiffuserModel(**config)
    logger.debug("loaded U-ViT %s: width %d, %d layers", path, model.inner_dim, config["num_layers"])
    return _load_into(model, converted, dtype, device)


def save_official_uvit(model: UniDiffuserModel, path: str | os.PathLike[str]) -> Path:
    """``torch.save`` ``model``'s weights in the official ``uvit_v1.pth`` layout (:func:`uvit_to_official_state_dict`)."""
    import torch

    path = Path(path)
    state = {k: v.detach().contiguous() for k, v in uvit_to_official_state_dict(model.state_dict()).items()}
    torch.save(state, path)
    return path


# --------------------------------------------------------------------------------------------------------------------
# Autoencoder (LDM KL-f8)
# --------------------------------------------------------------------------------------------------------------------

_VAE_TOP = {"conv_norm_out": "norm_out"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def diffusers_vae_key_to_ldm(key: str, num_levels: int = 4) -> str | None:
    """The LDM (``autoencoder_kl.pth``) key of a diffusers ``AutoencoderKL`` key, or ``None`` if no rule applies.

    The autoencoder map is written once, in this direction; loading derives the other (:func:`autoencoder_key_map`).
    Decoder ``up_blocks.i`` is LDM's ``up.{num_levels - 1 - i}`` (LDM indexes decoder levels from the highest
    resolution).
    """
    if key.startswith(("quant_conv.", "post_quant_conv.")):
        return key
    coder, _, rest = key.partition(".")
    if coder not in ("encoder", "decoder"):
        return None
    module, _, param = rest.rpartition(".")
    if param not in ("weight", "bias"):
        return None
    if module in ("conv_in", "conv_out"):
        return key
    if module in _VAE_TOP:
        return f"{coder}.{_VAE_TOP[module]}.{param}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(\w+)", module):
        return f"{coder}.mid.block_{int(m.group(1)) + 1}.{m.group(2).replace('conv_shortcut', 'nin_shortcut')}.{param}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)", module):
        return f"{coder}.mid.attn_1.{_VAE_ATTN[m.group(1)]}.{param}"
    level_kind = "down" if coder == "encoder" else "up"
    m = re.fullmatch(rf"{level_kind}_blocks\.(\d+)\.(resnets\.(\d+)\.(\w+)|(down|up)samplers\.0\.conv)", module)
    if m is None:
        return None
    level = int(m.group(1)) if coder == "encoder" else num_levels - 1 - int(m.group(1))
    if m.group(3) is not None:
        layer = m.group(4).replace("conv_shortcut", "nin_shortcut")
        return f"{coder}.{level_kind}.{level}.block.{m.group(3)}.{layer}.{param}"
    return f"{coder}.{level_kind}.{level}.{level_kind}sample.conv.{param}"


# LDM's attention projections are 1x1 convs, diffusers' linear layers.
_LDM_ATTN_WEIGHT_RE = re.compile(r"\.attn_1\.(q|k|v|proj_out)\.weight$")


def autoencoder_key_map(keys: Iterable[str], num_levels: int | None = None) -> ModuleKeyMap:
    """The autoencoder map over these ``AutoencoderKL`` keys (:func:`diffusers_vae_key_to_ldm`, the attention
    projections tagged ``"1x1"``); ``num_levels`` defaults to the encoder levels the keys name."""
    keys = list(keys)
    if num_levels is None:
        num_levels = len({m.group(1) for k in keys if (m := re.match(r"^encoder\.down_blocks\.(\d+)\.", k))})

    def slot(key: str) -> Slot | None:
        official = diffusers_vae_key_to_ldm(key, num_levels)
        if official is None:
            return None
        return Slot(official, reshape="1x1" if _LDM_ATTN_WEIGHT_RE.search(official) else None)

    return ModuleKeyMap.derive(keys, slot)


def infer_autoencoder_config(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The ``AutoencoderKL`` config of an LDM autoencoder state dict: widths, depth and latent channels from shapes,
    the rest (GroupNorm 32, SiLU, scale 0.18215) as the official ``FrozenAutoencoderKL`` fixes them.

    Raises:
        ValueError: a key the shapes are read from is missing.
    """
    levels = sorted({int(m.group(1)) for k in state if (m := re.match(r"^encoder\.down\.(\d+)\.", k))})
    needed = ["post_quant_conv.weight", "encoder.conv_in.weight"]
    needed += [f"encoder.down.{i}.block.0.conv1.weight" for i in levels]
    absent = [k for k in needed if k not in state]
    if not levels or absent:
        raise ValueError(
            f"autoencoder state dict: cannot infer the config, missing keys: {', '.join(absent) or needed}"
        )
    widths = [int(state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in levels]
    layers = len({m.group(1) for k in state if (m := re.match(r"^encoder\.down\.0\.block\.(\d+)\.", k))})
    return vae_config(
        block_out_channels=widths,
        down_block_types=["DownEncoderBlock2D"] * len(widths),
        up_block_types=["UpDecoderBlock2D"] * len(widths),
        in_channels=int(state["encoder.conv_in.weight"].shape[1]),
        latent_channels=int(state["post_quant_conv.weight"].shape[1]),
        layers_per_block=layers,
    )


def convert_autoencoder_state_dict(
    state: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None = None
) -> dict[str, torch.Tensor]:
    """Convert an LDM KL autoencoder state dict (``autoencoder_kl.pth``) to ``AutoencoderKL`` keys.

    The map is :func:`autoencoder_key_map` over the model's own keys, so every input key must be the LDM name of a
    model key, and the result must fill the model exactly.

    Args:
        state (`Mapping[str, torch.Tensor]`): LDM key names (``encoder.down.0.block.0.conv1.weight``, ...).
        config (`Mapping[str, Any]`, *optional*): the target config; defaults to :func:`infer_autoencoder_config`.

    Returns:
        `dict[str, torch.Tensor]`: every key of ``AutoencoderKL(**config).state_dict()``; the 1x1-conv attention
        weights (C, C, 1, 1) become linear (C, C).

    Raises:
        ValueError: keys without a rule, keys missing, or shapes that do not fit the config (all named).
    """
    from diffusers import AutoencoderKL

    config = dict(config) if config is not None else infer_autoencoder_config(state)
    expected = _meta_state(lambda: AutoencoderKL(**config))
    table = autoencoder_key_map(expected, len(config["block_out_channels"]))
    out, _, unknown = table.from_official(state, clone_parts=False)
    _check_against(out, expected, "autoencoder checkpoint", set(unknown))
    return out


def autoencoder_to_official_state_dict(
    state: Mapping[str, torch.Tensor], num_levels: int | None = None
) -> dict[str, torch.Tensor]:
    """Convert ``AutoencoderKL`` keys back to the LDM layout of ``autoencoder_kl.pth`` (attention weights as 1x1
    convs), in ``FrozenAutoencoderKL.state_dict()`` order (encoder, decoder, quant_conv, post_quant_conv).

    Raises:
        ValueError: a key without a rule.
    """
    table = autoencoder_key_map(state, num_levels)
    if table.unmapped:
        raise ValueError(f"AutoencoderKL state dict: keys without an LDM name: {_listing(list(table.unmapped))}")
    return dict(sorted(table.to_official(state).items(), key=lambda item: _ldm_vae_order(item[0])))


def _ldm_vae_order(key: str) -> tuple:
    # FrozenAutoencoderKL registers encoder, decoder, quant_conv, post_quant_conv; inside a coder: conv_in, the
    # levels (down: 0.., up: 0..), mid, norm_out, conv_out. Numbers sort numerically.
    top = ["encoder", "decoder", "quant_conv", "post_quant_conv"]
    head = key.split(".")[0]
    parts = key.split(".")[1:]
    rank = {"conv_in": 0, "down": 1, "mid": 2, "up": 3, "norm_out": 4, "conv_out": 5}
    mid_rank = {"block_1": 0, "attn_1": 1, "block_2": 2}
    inner = {"norm1": 0, "conv1": 1, "norm2": 2, "conv2": 3, "nin_shortcut": 4, "norm": 0, "q": 1, "k": 2, "v": 3}
    inner |= {"proj_out": 4, "block": 0, "downsample": 1, "upsample": 1, "weight": 0, "bias": 1}

    def part_key(p: str) -> tuple:
        return (0, int(p), "") if p.isdigit() else (1, mid_rank.get(p, inner.get(p, 9)), p)

    return (top.index(head) if head in top else 9, rank.get(parts[0], 9) if parts else 0, *map(part_key, parts[1:]))


def load_autoencoder(
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> AutoencoderKL:
    """Load the official ``autoencoder_kl.pth`` as a diffusers ``AutoencoderKL`` (``scaling_factor`` 0.18215).

    Raises:
        ModelFilesError: the file is missing or not a tensor dict.
        ValueError: the keys or shapes are not an LDM KL autoencoder's.
    """
    from diffusers import AutoencoderKL

    path = Path(path)
    state = load_tensor_file(path, what="autoencoder state dict", hint=_HINT)
    try:
        config = infer_autoencoder_config(state)
        converted = convert_autoencoder_state_dict(state, config)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error
    import torch

    with torch.device("meta"):  # no random init of weights about to be replaced
        model = AutoencoderKL(**config)
    return _load_into(model, converted, dtype, device)


def save_official_autoencoder(model: AutoencoderKL, path: str | os.PathLike[str]) -> Path:
    """``torch.save`` ``model``'s weights in the LDM layout of ``autoencoder_kl.pth``."""
    import torch

    path = Path(path)
    state = autoencoder_to_official_state_dict(model.state_dict(), len(model.config.block_out_channels))
    torch.save({k: v.detach().contiguous() for k, v in state.items()}, path)
    return path


# --------------------------------------------------------------------------------------------------------------------
# Caption decoder (GPT-2 prefix model)
# --------------------------------------------------------------------------------------------------------------------

_MODULE_PREFIX = "module."
_MASK_BUFFER_RE = re.compile(r"^gpt\.transformer\.h\.\d+\.attn\.(bias|masked_bias)$")
_MASKED_BIAS = -1e4


def _causal_mask(n_positions: int) -> torch.Tensor:
    import torch

    # uint8, as transformers 4.23 (UniDiffuser's pin) stored it; later versions use bool (either is accepted)
    return torch.tril(torch.ones((n_positions, n_positions), dtype=torch.uint8)).view(1, 1, n_positions, n_positions)


def _caption_slot(key: str) -> Slot | None:
    """The caption decoder map, the one direction written: a ``UniDiffuserTextDecoder`` key -> its
    ``caption_decoder.pth`` key (``transformer.`` is ``gpt.``, all under the ``DataParallel`` prefix ``module.``)."""
    if key.startswith("transformer."):
        return Slot(f"{_MODULE_PREFIX}gpt.{key[len('transformer.') :]}")
    if key.split(".")[0] in ("encode_prefix", "decode_prefix"):
        return Slot(_MODULE_PREFIX + key)
    return None


def caption_decoder_key_map(keys: Iterable[str]) -> ModuleKeyMap:
    """The caption decoder map over these ``UniDiffuserTextDecoder`` keys (without the mask buffers, which only the
    official file holds)."""
    return ModuleKeyMap.derive(keys, _caption_slot)


def infer_text_decoder_config(
    state: Mapping[str, torch.Tensor], gpt2_config: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The ``UniDiffuserTextDecoder`` config of a caption decoder state dict (``module.`` already stripped).

    Widths, depth, vocabulary and positions come from the tensors; GPT-2's activation, epsilon and dropouts from
    ``gpt2_config`` (the ``gpt2/config.json`` dict) where given, else :data:`TEXT_DECODER_CONFIG` (heads: width / 64,
    GPT-2's head width).

    Raises:
        ValueError: a key the shapes are read from is missing.
    """
    needed = ["encode_prefix.weight", "gpt.transformer.wte.weight", "gpt.transformer.wpe.weight"]
    needed += ["gpt.transformer.h.0.mlp.c_fc.weight"]
    absent = [k for k in needed if k not in state]
    if absent:
        raise ValueError(f"caption decoder state dict: cannot infer the config, missing keys: {', '.join(absent)}")
    layers = {int(m.group(1)) for k in state if (m := re.match(r"^gpt\.transformer\.h\.(\d+)\.", k))}
    hidden, inner = state["encode_prefix.weight"].shape
    gpt2 = dict(gpt2_config or {})
    n_embd = int(state["gpt.transformer.wte.weight"].shape[1])
    # Without a config, GPT-2's head width 64 (every GPT-2 size: 768/12 ... 1600/25); heads change no tensor shape.
    n_head = int(gpt2.get("n_head", n_embd // 64 if n_embd % 64 == 0 else 1))
    if n_embd % n_head:  # a GPT-2 config that does not belong to this checkpoint
        raise ValueError(f"caption decoder: width {n_embd} is not divisible by the GPT-2 config's {n_head} heads")
    return text_decoder_config(
        prefix_inner_dim=int(inner),
        prefix_hidden_dim=int(hidden),
        vocab_size=int(state["gpt.transformer.wte.weight"].shape[0]),
        n_positions=int(state["gpt.transformer.wpe.weight"].shape[0]),
        n_embd=n_embd,
        n_layer=len(layers),
        n_head=n_head,
        n_inner=int(state["gpt.transformer.h.0.mlp.c_fc.weight"].shape[1]),
        **{
            k: gpt2[k]
            for k in ("activation_function", "resid_pdrop", "embd_pdrop", "attn_pdrop", "layer_norm_epsilon")
            if k in gpt2
        },
    )


def _strip_module(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # The official loader drops the first 7 characters of every key (k[7:]); require that they are "module.".
    bad = [k for k in state if not k.startswith(_MODULE_PREFIX)]
    if bad:
        raise ValueError(f"caption decoder: keys without the 'module.' prefix of the official file: {_listing(bad)}")
    return {k[len(_MODULE_PREFIX) :]: v for k, v in state.items()}


def convert_caption_decoder_state_dict(
    state: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None = None
) -> dict[str, torch.Tensor]:
    """Convert the official ``caption_decoder.pth`` state dict to ``UniDiffuserTextDecoder`` keys.

    ``module.`` is stripped (the official loader does ``k[7:]``), ``gpt.*`` becomes ``transformer.*``,
    ``encode_prefix``/``decode_prefix`` keep their names. Dropped: the causal-mask buffers ``attn.bias`` /
    ``attn.masked_bias`` (checked to hold the constant lower-triangular mask and -1e4), and ``clip.*`` (the only
    extra keys the official loader accepts). ``gpt.lm_head.weight`` must equal the tied ``wte``.

    Args:
        state (`Mapping[str, torch.Tensor]`): the file's keys, with the ``module.`` prefix.
        config (`Mapping[str, Any]`, *optional*): the target config; defaults to :func:`infer_text_decoder_config`.

    Returns:
        `dict[str, torch.Tensor]`: every key of ``UniDiffuserTextDecoder(**config).state_dict()``.

    Raises:
        ValueError: keys without a rule, keys missing, shapes that do not fit, or non-constant mask buffers.
    """
    import torch
    from diffusers import UniDiffuserTextDecoder

    plain = _strip_module(state)
    config = dict(config) if config is not None else infer_text_decoder_config(plain)
    kept: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = key[len(_MODULE_PREFIX) :]
        if m := _MASK_BUFFER_RE.match(name):
            expected = _causal_mask(config["n_positions"]) if m.group(1) == "bias" else torch.tensor(_MASKED_BIAS)
            if value.shape != expected.shape or not torch.equal(value.to(expected.dtype), expected):
                raise ValueError(f"caption decoder: {key} is not GPT-2's constant causal-mask buffer")
        elif not name.startswith("clip."):
            kept[key] = value
    model_state = _meta_state(lambda: UniDiffuserTextDecoder(**config))
    out, _, unknown = caption_decoder_key_map(model_state).from_official(kept, clone_parts=False)
    head, wte = out.get("transformer.lm_head.weight"), out.get("transformer.transformer.wte.weight")
    if head is not None and wte is not None and (head.shape != wte.shape or not torch.equal(head, wte)):
        raise ValueError("caption decoder: gpt.lm_head.weight differs from the tied gpt.transformer.wte.weight")
    _check_against(out, model_state, "caption decoder checkpoint", set(unknown))
    return out


def caption_decoder_to_official_state_dict(
    state: Mapping[str, torch.Tensor], n_positions: int | None = None
) -> dict[str, torch.Tensor]:
    """Convert ``UniDiffuserTextDecoder`` keys back to the official ``caption_decoder.pth`` layout.

    Keys get ``gpt.`` for ``transformer.`` and the ``module.`` prefix; each layer gets the ``attn.bias`` (causal
    mask, uint8 (1, 1, n, n)) and ``attn.masked_bias`` (-1e4) buffers GPT-2 saved under transformers 4.23, in
    ``ClipCaptionModel.state_dict()`` order (gpt, encode_prefix, decode_prefix).

    Raises:
        ValueError: a key without a rule.
    """
    import torch

    if n_positions is None:
        n_positions = int(state["transformer.transformer.wpe.weight"].shape[0])
    table = caption_decoder_key_map(state)
    if table.unmapped:
        raise ValueError(
            f"UniDiffuserTextDecoder state dict: keys without an official name: {_listing(list(table.unmapped))}"
        )
    gpt: dict[str, torch.Tensor] = {}
    prefix_keys: dict[str, torch.Tensor] = {}
    for key, value in table.to_official(state).items():
        if m := re.match(r"^(module\.gpt\.transformer\.h\.\d+\.attn\.)c_attn\.weight$", key):
            # GPT2Attention's own buffers precede its submodules in a state dict
            gpt[m.group(1) + "bias"] = _causal_mask(n_positions)
            gpt[m.group(1) + "masked_bias"] = torch.tensor(_MASKED_BIAS)
        (gpt if key.startswith(f"{_MODULE_PREFIX}gpt.") else prefix_keys)[key] = value
    return {**gpt, **prefix_keys}


def _read_gpt2_config(gpt2_folder: Path) -> dict[str, Any]:
    config_file = gpt2_folder / "config.json"
    if not config_file.is_file():
        raise ModelFilesError(
            f"{config_file}: GPT-2 config not found; put the Hugging Face 'gpt2' files in {gpt2_folder}"
        )
    return json.loads(config_file.read_text(encoding="utf-8"))


def load_text_decoder(
    path: str | os.PathLike[str],
    gpt2_folder: str | os.PathLike[str] | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> UniDiffuserTextDecoder:
    """Load the official ``caption_decoder.pth`` as a ``UniDiffuserTextDecoder``.

    Args:
        path (`str` or `os.PathLike`): the caption decoder file.
        gpt2_folder (`str` or `os.PathLike`, *optional*): ``models/gpt2``; its ``config.json`` supplies GPT-2's
            head count, activation and epsilon (defaults: :data:`TEXT_DECODER_CONFIG`, GPT-2 small's).
        dtype (`torch.dtype`, *optional*): cast to this dtype.
        device (`str` or `torch.device`, *optional*): move to this device.

    Returns:
        `UniDiffuserTextDecoder`: in eval mode. Text-to-image needs only ``encode(clip_tokens)``:
        (B, 77, 768) -> (B, 77, 64).

    Raises:
        ModelFilesError: a file is missing or unreadable.
        ValueError: the keys or shapes are not a caption decoder's.
    """
    from diffusers import UniDiffuserTextDecoder

    path = Path(path)
    state = load_tensor_file(path, what="caption decoder state dict", hint=_HINT)
    gpt2_config = _read_gpt2_config(Path(gpt2_folder)) if gpt2_folder is not None else None
    try:
        config = infer_text_decoder_config(_strip_module(state), gpt2_config)
        converted = convert_caption_decoder_state_dict(state, config)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error
    import torch

    with torch.device("meta"):  # no random init of weights about to be replaced
        model = UniDiffuserTextDecoder(**config)
    # The tied lm_head shares wte's tensor; assign both, then re-tie so they stay one parameter.
    model = _load_into(model, converted, dtype, device)
    model.transformer.tie_weights()
    return model


def save_official_caption_decoder(model: UniDiffuserTextDecoder, path: str | os.PathLike[str]) -> Path:
    """``torch.save`` ``model``'s weights in the official ``caption_decoder.pth`` layout (``module.`` prefixed)."""
    import torch

    path = Path(path)
    state = caption_decoder_to_official_state_dict(model.state_dict())
    torch.save({k: v.detach().clone().contiguous() for k, v in state.items()}, path)
    return path


def load_gpt2_tokenizer(gpt2_folder: str | os.PathLike[str]) -> GPT2Tokenizer:
    """The caption decoder's tokenizer: GPT-2's from ``gpt2_folder`` with ``<|EOS|>`` added as the EOS token, as
    the official ``CaptionDecoder`` builds it (offline: ``local_files_only``)."""
    from transformers import GPT2Tokenizer

    folder = Path(gpt2_folder)
    missing = [name for name in ("vocab.json", "merges.txt") if not (folder / name).is_file()]
    if missing:
        raise ModelFilesError(f"{folder}: GPT-2 tokenizer files missing: {', '.join(missing)}")
    tokenizer = GPT2Tokenizer.from_pretrained(folder, local_files_only=True)
    tokenizer.add_special_tokens({"eos_token": CAPTION_EOS_TOKEN})
    return tokenizer
