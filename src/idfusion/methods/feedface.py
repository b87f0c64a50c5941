"""FeedFace (Xiang et al., ICLR 2024 Tiny Papers): identity through "feed" adapter blocks on a frozen U-ViT.

Pieces, named as in the official ``feed-4800000.pt`` (spec ``flashface-feedface.md`` §3.2, §3.6):

- :class:`FaceEncoder` (``preprocess_module.*``, the release's ``CLIPWithProject2``): a frozen CLIP ViT-B/32 vision
  tower on a 224x224 face crop; its penultimate hidden states (50 tokens, before the post-LayerNorm) go through a
  bias-free ``project_layer`` to the U-ViT width: ``(n, 50, 1536)``.
- :class:`FeedBlock` (``blocks.{i}.*``, the release's ``BasicTransformerBlockSeq``): one SD-style transformer block
  (self-attention, cross-attention to the face tokens, GEGLU FF, pre-LN residuals) and a zero-initialised
  ``zero_linear``. Its output is a *delta* for the image tokens.
- :class:`FeedAdapter` (the release's ``T2IAdapter``): the face encoder and 14 feed blocks, hooked on U-ViT blocks
  ``in_blocks.{0,2,…,12}`` and ``out_blocks.{0,2,…,12}`` of diffusers' ``UniDiffuserModel``. After each hooked
  block, its image tokens (the last ``N`` of ``[t_img, t_text, data_type, text(77), clip_img, img(N)]``) become
  ``img + multiplier * block_delta(img, face_tokens)``; the changed output is what the next block and the skip
  connection see. Face tokens are computed once per generation (:meth:`FeedAdapter.set_face_tokens`).
- :class:`SD15FeedAdapter`: the same kind of feed block at the 16 transformer blocks of an SD1.5 UNet, through
  ``attn2`` processors (the paper's U-Net claim; no official code or weights exist, so it is ours to train).

:func:`load_feed_adapter` loads the official ``feed-4800000.pt`` strictly; :func:`save_sd15_feed_adapter` and
:func:`load_sd15_feed_adapter` store and restore a trained SD1.5 adapter (safetensors), strictly too.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import re
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..serialization import check_state_dict, load_tensor_file, rebuild_position_ids

__all__ = [
    "FEED_FILE",
    "UVIT_BLOCK_NAMES",
    "MAX_CAT_FACES",
    "DEFAULT_MULTIPLIER",
    "FACE_CROP_SCALE",
    "FACE_SIZE",
    "FACE_MEAN",
    "FACE_STD",
    "FACE_TOKENS",
    "POSITION_IDS_KEY",
    "SD15_FEED_HEADS",
    "clip_vit_b32_config",
    "FaceEncoder",
    "FeedBlock",
    "FeedAdapter",
    "FeedAdapterHandle",
    "SD15FeedAttnProcessor",
    "SD15FeedAdapter",
    "sd15_sites",
    "sd15_feed_state_dict",
    "save_sd15_feed_adapter",
    "load_sd15_feed_adapter",
    "FACE_MODES",
    "face_crop",
    "preprocess_faces",
    "encode_face_crops",
    "load_feed_adapter",
]

logger = logging.getLogger(__name__)

#: The released adapter (HF ``Xiang-cd/FeedFace``, ``models/feed-4800000.pt``): 4.8 M training samples seen.
#: Sampling as the release's ``inference.py``: DPM-Solver++ (3rd order, singlestep "fast" order schedule), 40 steps,
#: ``out = cond + 5 (cond - uncond)`` (a standard guidance scale of 6), adapter multiplier 0.8 in the conditional
#: branch, 512 px.
DEFAULTS = {"num_inference_steps": 40, "guidance_scale": 6.0, "feed_scale": 0.8}
SCHEDULER = "feedface-dpm"  # the release's DPM-Solver++ "fast" order 3 (idfusion.schedulers)
#: UniDiffuser's discrete VP schedule (Stable Diffusion's betas).
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}
#: ``data_type`` the release samples with (its training used 0).
DATA_TYPE = 1
FEED_FILE = "feed-4800000.pt"
#: The 14 hooked blocks of diffusers' ``UniDiffuserModel`` in the release's ``block_names`` order (spec §3.2):
#: official ``in_blocks.{0,2,…,12}`` then ``out_blocks.{0,2,…,12}``. An official out-block is diffusers' ``skip``
#: (skip_linear + norm) followed by ``block``, so its output is the output of ``….block``.
UVIT_BLOCK_NAMES = tuple(
    [f"transformer.transformer_in_blocks.{i}" for i in range(0, 13, 2)]
    + [f"transformer.transformer_out_blocks.{i}.block" for i in range(0, 13, 2)]
)
#: ``cat`` mode uses the first 5 references only (``extracted[:5]`` upstream).
MAX_CAT_FACES = 5
#: ``inference.py`` passes ``cond_multiplier=0.8`` (the sampling function's default is 1.0, training uses 1.0).
DEFAULT_MULTIPLIER = 0.8
#: Face crop: a square of side ``int(1.1 * max(w, h))`` centred on the detector box, then 224x224, mean/std 0.5.
FACE_CROP_SCALE = 1.1
FACE_SIZE = 224
FACE_MEAN = 0.5
FACE_STD = 0.5
#: Tokens per face: CLS + 7x7 patches of CLIP ViT-B/32 at 224.
FACE_TOKENS = 50
#: The one stale key of the release: a persistent buffer under transformers 4.28, non-persistent since.
POSITION_IDS_KEY = "preprocess_module.clip_model.vision_model.embeddings.position_ids"
#: Heads of the SD1.5 feed blocks (``C / 8`` channels each, as SD1.5's own attention).
SD15_FEED_HEADS = 8

_UVIT_WIDTH = 1536
_UVIT_HEAD_DIM = 24  # official feed blocks: 64 heads x 24 = 1536
_CLIP_PREFIX = "preprocess_module.clip_model."
_SD15_FORMAT = "idfusion-feedface-sd15"


# ----------------------------------------------------------------------------------------------------------------
# Face encoder


def clip_vit_b32_config(**overrides: Any):
    """The ``openai/clip-vit-base-patch32`` vision config, built in code (no Hub access), with ``overrides``.

    ViT-B/32: width 768, 12 layers of 12 heads, MLP 3072 with quick-GELU, 32x32 patches of a 224x224 image (50
    tokens), LayerNorm eps 1e-5.
    """
    from transformers import CLIPVisionConfig

    values = {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "projection_dim": 512,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "num_channels": 3,
        "image_size": 224,
        "patch_size": 32,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
    }
    return CLIPVisionConfig(**(values | dict(overrides)))


class _VisionModelHolder(nn.Module):
    """Gives a flat ``CLIPVisionModel`` (transformers >= 5) the ``vision_model.*`` key prefix of transformers 4."""

    def __init__(self, vision_model: nn.Module):
        super().__init__()
        self.vision_model = vision_model

    def forward(self, pixel_values: torch.Tensor, **kwargs: Any):
        return self.vision_model(pixel_values=pixel_values, **kwargs)


class FaceEncoder(nn.Module):
    """The release's ``CLIPWithProject2``: frozen CLIP ViT-B/32 vision tower + trainable bias-free projection.

    State-dict keys: ``clip_model.vision_model.*`` (the transformers-4 naming of ``CLIPVisionModel``, kept under
    every transformers version) and ``project_layer.weight`` ``(latent_dim, 768)``.

    Args:
        latent_dim (`int`, defaults to 1536): output width (the U-ViT's).
        vision_config (`Mapping`, *optional*): overrides of :func:`clip_vit_b32_config` (tiny test models).
    """

    def __init__(self, latent_dim: int = _UVIT_WIDTH, vision_config: Mapping[str, Any] | None = None):
        super().__init__()
        from transformers import CLIPVisionModel

        config = clip_vit_b32_config(**(vision_config or {}))
        model = CLIPVisionModel(config)
        # transformers 4 wraps the tower in `.vision_model`; 5 is flat: hold it so the keys are the same
        self.clip_model = model if hasattr(model, "vision_model") else _VisionModelHolder(model)
        self.project_layer = nn.Linear(config.hidden_size, latent_dim, bias=False)
        self.clip_model.requires_grad_(False)
        self.image_size = config.image_size

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Encode face crops.

        Args:
            pixels (`torch.Tensor` of shape `(n, 3, 224, 224)`): RGB normalised with mean/std 0.5 (see
                :func:`preprocess_faces`).

        Returns:
            `torch.Tensor` of shape `(n, 50, latent_dim)`: the penultimate hidden states, projected.
        """
        if pixels.ndim != 4 or pixels.shape[1:] != (3, self.image_size, self.image_size):
            raise ValueError(
                f"face pixels must have shape (n, 3, {self.image_size}, {self.image_size}), got {tuple(pixels.shape)}"
            )
        out = self.clip_model(pixels, output_hidden_states=True)
        return self.project_layer(out.hidden_states[-2])  # (n, 50, 768) -> (n, 50, latent_dim)


# ----------------------------------------------------------------------------------------------------------------
# Feed blocks


def _default_heads(dim: int, head_dim: int) -> int:
    """Heads are not in the shapes: ``dim / head_dim`` when it divides, else heads of 8 channels (tiny models)."""
    if dim % head_dim == 0:
        return dim // head_dim
    return dim // 8 if dim % 8 == 0 else 1


class FeedBlock(nn.Module):
    """One adapter block: ``zero_linear(BasicTransformerBlock(img, face))`` (release: ``BasicTransformerBlockSeq``).

    ``blocks.0`` is a diffusers ``BasicTransformerBlock`` (pre-LN self-attention, cross-attention to the face
    tokens, GEGLU FF x4; q/k/v without bias), whose keys equal the release's ``CrossAttention``/``FeedForward``
    naming. ``zero_linear`` is bias-free and zero-initialised, so a fresh block returns zeros. The multiplier is
    applied by the caller.

    Args:
        dim (`int`): token width.
        num_heads (`int`, *optional*): attention heads (default ``dim / 24``: 64 for the release).
        context_dim (`int`, *optional*): face-token width (default ``dim``).
    """

    def __init__(self, dim: int, num_heads: int | None = None, context_dim: int | None = None):
        super().__init__()
        from diffusers.models.attention import BasicTransformerBlock

        heads = num_heads or _default_heads(dim, _UVIT_HEAD_DIM)
        if dim % heads:
            raise ValueError(f"feed block width {dim} is not a multiple of {heads} heads")
        block = BasicTransformerBlock(
            dim,
            heads,
            dim // heads,
            cross_attention_dim=context_dim or dim,
            activation_fn="geglu",
            attention_bias=False,
        )
        self.blocks = nn.ModuleList([block])
        self.zero_linear = nn.Linear(dim, dim, bias=False)
        nn.init.zeros_(self.zero_linear.weight)

    def forward(self, img_tokens: torch.Tensor, face_tokens: torch.Tensor) -> torch.Tensor:
        """The delta for ``img_tokens``.

        Args:
            img_tokens (`torch.Tensor` of shape `(B, N, dim)`): the tokens to adapt.
            face_tokens (`torch.Tensor` of shape `(B or 1, L, context_dim)`): the cross-attention context.

        Returns:
            `torch.Tensor` of shape `(B, N, dim)`.
        """
        if face_tokens.shape[0] != img_tokens.shape[0]:
            # diffusers' attention takes its batch size from the context: expand a shared one
            face_tokens = face_tokens.expand(img_tokens.shape[0], -1, -1)
        x = img_tokens
        for block in self.blocks:
            x = block(x, encoder_hidden_states=face_tokens)
        return self.zero_linear(x)


def _check_face_tokens(tokens: torch.Tensor, dim: int) -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 3 or tokens.shape[-1] != dim or tokens.shape[1] == 0:
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"face tokens must have shape (B, L, {dim}), got {shape}")
    return tokens


def _batch_multiplier(multiplier: float | torch.Tensor, out: torch.Tensor) -> float | torch.Tensor:
    if isinstance(multiplier, torch.Tensor):
        return multiplier.to(out.device, out.dtype).reshape(-1, 1, 1)  # (B,) -> (B, 1, 1)
    return multiplier


def _is_off(multiplier: float | torch.Tensor) -> bool:
    if isinstance(multiplier, torch.Tensor):
        return bool((multiplier == 0).all())
    return multiplier == 0


# ----------------------------------------------------------------------------------------------------------------
# U-ViT adapter


class FeedAdapterHandle:
    """What :meth:`FeedAdapter.attach` returns: :meth:`remove` (or leaving a ``with`` block) detaches the adapter."""

    def __init__(self, adapter: FeedAdapter):
        self.adapter = adapter

    def remove(self) -> None:
        self.adapter.detach()

    def __enter__(self) -> FeedAdapterHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


# U-ViTs with a feed adapter attached (one adapter per U-ViT), kept here rather than as a flag on the diffusers model
_ATTACHED: weakref.WeakKeyDictionary[nn.Module, FeedAdapter] = weakref.WeakKeyDictionary()


class FeedAdapter(ModelMixin, ConfigMixin):
    """The release's ``T2IAdapter`` (``type_=2``): face encoder + 14 feed blocks on a UniDiffuser-v1 U-ViT.

    State-dict keys are those of ``feed-4800000.pt``: ``preprocess_module.*`` (:class:`FaceEncoder`) and
    ``blocks.{i}.blocks.0.*`` / ``blocks.{i}.zero_linear.weight`` for ``i`` in the order of
    :data:`UVIT_BLOCK_NAMES`. A pipeline component (``ModelMixin``): it saves and loads with the pipeline.

    Use: ``tokens = adapter.encode_faces(pixels)``, ``adapter.set_face_tokens(tokens)`` once per generation,
    ``adapter.attach(unet)``, then call the U-ViT as usual; :meth:`detach` restores the bare model.

    The multiplier scales every block's delta. With ``attach(unet, uncond_off=True)`` each U-ViT call picks its
    own multiplier from its ``timestep_text`` argument (:meth:`branch_multiplier`): diffusers'
    ``UniDiffuserPipeline`` text-to-image mode calls the model twice per step, the conditional call with
    ``timestep_text=0`` and the unconditional one with ``timestep_text`` = the largest timestep; the release uses the
    adapter only in the conditional branch (multiplier 0 in the unconditional one, spec §3.5). This rule only fits
    text-to-image calls: other UniDiffuser modes use a non-zero ``timestep_text`` in their conditional calls too.

    Args:
        dim (`int`, defaults to 1536): the U-ViT width (face-token width too).
        num_heads (`int`, *optional*): feed-block heads (default ``dim / 24``: 64 for the release).
        vision_config (`Mapping`, *optional*): CLIP vision config overrides (tiny test models).
        num_blocks (`int`, defaults to 14): feed blocks (one per name in :data:`UVIT_BLOCK_NAMES`).
    """

    @register_to_config
    def __init__(
        self,
        dim: int = _UVIT_WIDTH,
        num_heads: int | None = None,
        vision_config: dict[str, Any] | None = None,
        num_blocks: int = len(UVIT_BLOCK_NAMES),
    ):
        super().__init__()
        self.dim = dim
        self.preprocess_module = FaceEncoder(dim, vision_config)
        self.blocks = nn.ModuleList([FeedBlock(dim, num_heads) for _ in range(num_blocks)])
        self.multiplier = DEFAULT_MULTIPLIER
        self.uncond_off = False
        self._face_tokens: torch.Tensor | None = None
        self._call_multiplier: float | None = None
        self._feed_hooks: list[Any] = []
        self._num_img_tokens = 0

    # -- faces ---------------------------------------------------------------------------------------------------

    def encode_faces(self, pixels: torch.Tensor, mode: str = "cat") -> torch.Tensor:
        """Reference crops → the face tokens of one generation.

        Args:
            pixels (`torch.Tensor` of shape `(k, 3, 224, 224)`): ``k`` normalised crops (:func:`preprocess_faces`).
            mode (`str`, defaults to ``"cat"``): ``"cat"`` concatenates the tokens of the first
                :data:`MAX_CAT_FACES` references along the sequence (the release's default); ``"mean"`` averages
                all references token-wise (blends identities); ``"first"`` uses the first reference only.

        Returns:
            `torch.Tensor` of shape `(1, 50 * min(k, 5), dim)` (``cat``) or `(1, 50, dim)` (``mean``, ``first``).
        """
        if mode not in ("cat", "mean", "first"):
            raise ValueError(f"unknown face mode {mode!r}: expected 'cat', 'mean' or 'first'")
        if pixels.ndim != 4 or pixels.shape[0] == 0:
            raise ValueError(f"expected at least one face crop of shape (k, 3, H, W), got {tuple(pixels.shape)}")
        if mode == "cat" and pixels.shape[0] > MAX_CAT_FACES:
            logger.info("cat mode uses the first %d of %d references", MAX_CAT_FACES, pixels.shape[0])
            pixels = pixels[:MAX_CAT_FACES]
        elif mode == "first":
            pixels = pixels[:1]
        weight = self.preprocess_module.project_layer.weight
        tokens = self.preprocess_module(pixels.to(weight.device, weight.dtype))  # (k, 50, dim)
        if mode == "mean":
            return tokens.mean(dim=0, keepdim=True)  # (1, 50, dim)
        return tokens.reshape(1, -1, tokens.shape[-1])  # (k, 50, dim) -> (1, 50k, dim)

    def set_face_tokens(self, tokens: torch.Tensor | None) -> None:
        """Store the face tokens ``(1 or B, L, dim)`` every block attends to (``None`` clears them)."""
        self._face_tokens = None if tokens is None else _check_face_tokens(tokens, self.dim)

    @property
    def face_tokens(self) -> torch.Tensor | None:
        return self._face_tokens

    # -- multiplier ----------------------------------------------------------------------------------------------

    def set_multiplier(self, multiplier: float) -> None:
        """Set the adapter strength (release: ``cond_multiplier`` 0.8 at inference; 0 = the base model)."""
        self.multiplier = float(multiplier)

    def branch_multiplier(self, timestep_text: torch.Tensor | float | int) -> float:
        """The multiplier of one ``UniDiffuserModel`` call: :attr:`multiplier` for the conditional branch
        (``timestep_text == 0``, clean text), 0 for the unconditional one (noised text, ``timestep_text > 0``).

        Raises:
            ValueError: a batch mixing both kinds of rows.
        """
        t = torch.as_tensor(timestep_text)
        if bool((t == 0).all()):
            return self.multiplier
        if bool((t != 0).all()):
            return 0.0
        raise ValueError("timestep_text mixes conditional (0) and unconditional rows in one call; run them apart")

    def _current_multiplier(self) -> float:
        return self.multiplier if self._call_multiplier is None else self._call_multiplier

    # -- hooks ---------------------------------------------------------------------------------------------------

    @property
    def attached(self) -> bool:
        return bool(self._feed_hooks)

    def attach(self, unet: nn.Module, *, uncond_off: bool = False) -> FeedAdapterHandle:
        """Hook the feed blocks on the 14 blocks of ``unet`` (a diffusers ``UniDiffuserModel``).

        Forward hooks replace each hooked block's output by one whose last ``N`` (image) tokens have
        ``multiplier * delta`` added; ``UTransformer2DModel`` assigns that output to its running hidden states and
        (for in-blocks) pushes the same tensor on the skip stack, as the release's wrapper does. A multiplier of 0
        leaves the output object untouched (the base model bit for bit).

        Args:
            unet (`UniDiffuserModel`): the U-ViT, width :attr:`dim`, with at least 13 in- and out-blocks.
            uncond_off (`bool`, defaults to `False`): pick the multiplier per call with :meth:`branch_multiplier`
                (adapter off in the unconditional branch).

        Returns:
            `FeedAdapterHandle`: ``.remove()`` detaches.
        """
        if self.attached:
            raise ValueError("this FeedAdapter is already attached; call detach() first")
        if len(self.blocks) != len(UVIT_BLOCK_NAMES):
            raise ValueError(f"a U-ViT feed adapter needs {len(UVIT_BLOCK_NAMES)} blocks, has {len(self.blocks)}")
        width = getattr(unet, "inner_dim", None)
        if width != self.dim or not hasattr(unet, "num_patches"):
            raise ValueError(f"expected a UniDiffuserModel of width {self.dim}, got {type(unet).__name__} ({width})")
        modules = dict(unet.named_modules())
        missing = [name for name in UVIT_BLOCK_NAMES if name not in modules]
        if missing:
            raise ValueError(f"the U-ViT has no blocks {', '.join(missing)} (needs >= 13 in- and out-blocks)")
        if unet in _ATTACHED:
            raise ValueError("another FeedAdapter is attached to this U-ViT")
        self._num_img_tokens = int(unet.num_patches)
        for index, name in enumerate(UVIT_BLOCK_NAMES):
            self._feed_hooks.append(modules[name].register_forward_hook(self._make_block_hook(index)))
        self.uncond_off = uncond_off
        if uncond_off:
            signature = inspect.signature(unet.forward)
            self._feed_hooks.append(
                unet.register_forward_pre_hook(
                    lambda module, args, kwargs: self._pre_call(signature, args, kwargs), with_kwargs=True
                )
            )
            self._feed_hooks.append(unet.register_forward_hook(self._post_call, always_call=True))
        _ATTACHED[unet] = self
        self._unet_ref = weakref.ref(unet)
        logger.debug("attached FeedFace adapter to %d U-ViT blocks (uncond_off=%s)", len(UVIT_BLOCK_NAMES), uncond_off)
        return FeedAdapterHandle(self)

    def detach(self) -> None:
        """Remove every hook: the U-ViT is the base model again. Face tokens are kept."""
        for hook in self._feed_hooks:
            hook.remove()
        self._feed_hooks.clear()
        unet = self._unet_ref() if getattr(self, "_unet_ref", None) is not None else None
        if unet is not None and _ATTACHED.get(unet) is self:
            del _ATTACHED[unet]
        self._call_multiplier = None
        self.uncond_off = False

    def _pre_call(self, signature: inspect.Signature, args: tuple, kwargs: dict) -> None:
        try:
            timestep_text = signature.bind(*args, **kwargs).arguments["timestep_text"]
        except (TypeError, KeyError):
            raise ValueError("uncond_off needs the U-ViT call's timestep_text") from None
        self._call_multiplier = self.branch_multiplier(timestep_text)

    def _post_call(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._call_multiplier = None

    def _make_block_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            multiplier = self._current_multiplier()
            if multiplier == 0:
                return None  # keep the block's own output: the base model bit for bit
            return self.apply_block(index, output, multiplier)

        return hook

    def apply_block(self, index: int, hidden_states: torch.Tensor, multiplier: float | None = None) -> torch.Tensor:
        """Block ``index``'s adaptation of a U-ViT block output (what the hooks do).

        Args:
            index (`int`): position in :data:`UVIT_BLOCK_NAMES`.
            hidden_states (`torch.Tensor` of shape `(B, T, dim)`): the block's output; the last ``N`` tokens are the
                image tokens (``N`` = the attached U-ViT's ``num_patches``).
            multiplier (`float`, *optional*): defaults to the current multiplier.

        Returns:
            `torch.Tensor` of shape `(B, T, dim)`: the other tokens unchanged, ``img + multiplier * delta``.
        """
        multiplier = self._current_multiplier() if multiplier is None else multiplier
        if self._face_tokens is None:
            raise RuntimeError("FeedAdapter: no face tokens; call set_face_tokens(encode_faces(...)) first")
        n = self._num_img_tokens
        if not 0 < n < hidden_states.shape[1]:
            raise RuntimeError(f"FeedAdapter: {n} image tokens do not fit a sequence of {hidden_states.shape[1]}")
        img = hidden_states[:, -n:]  # (B, N, dim)
        face = self._face_tokens.to(img.device, img.dtype)
        if face.shape[0] not in (1, img.shape[0]):
            raise ValueError(f"face tokens have batch {face.shape[0]}, the U-ViT call {img.shape[0]}")
        delta = self.blocks[index](img, face).to(img.dtype)
        return torch.cat([hidden_states[:, :-n], img + multiplier * delta], dim=1)


# ----------------------------------------------------------------------------------------------------------------
# SD1.5 variant


def sd15_sites(unet: nn.Module) -> dict[str, nn.Module]:
    """The transformer blocks with cross-attention of an SD1.5-topology UNet (16), in forward order (down, mid,
    up), by module path."""
    sites = {
        name: module
        for name, module in unet.named_modules()
        if type(module).__name__ == "BasicTransformerBlock" and getattr(module, "attn2", None) is not None
    }
    rank = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}

    def key(name: str) -> tuple:
        parts = name.split(".")
        return (rank.get(parts[0], 3), *(int(p) if p.isdigit() else 0 for p in parts[1:]))

    return dict(sorted(sites.items(), key=lambda item: key(item[0])))


class SD15FeedAttnProcessor:
    """An ``attn2`` processor: the host's text cross-attention plus the site's feed delta.

    ``BasicTransformerBlock`` computes ``h = h + attn2(norm2(h), text)``. This processor returns
    ``host(norm2(h), text) + m * zero_linear(feed_block(norm2(h), face))``, so the delta enters the residual
    stream right after the cross-attention, computed from the LayerNormed stream, as the U-ViT adapter reads the
    (post-LN) output of its block. A processor only sees ``norm2(h)``, not ``h``; a forward hook on the block
    could read ``h`` but would keep the adapter out of diffusers' processor machinery, which training and
    other adapters already use. With ``m = 0`` (or a fresh, zero-initialised block) the host's output comes back
    unchanged, bit for bit.

    Plain object (not an ``nn.Module``): the feed block lives in :class:`SD15FeedAdapter`, so the UNet's state
    dict is unchanged.
    """

    def __init__(self, adapter: SD15FeedAdapter, index: int, host: Any):
        self.adapter = adapter
        self.index = index
        self.host = host

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        out = self.host(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        multiplier = self.adapter.multiplier
        if _is_off(multiplier):
            return out
        face = self.adapter.face_tokens
        if face is None:
            raise RuntimeError("SD15FeedAdapter: no face tokens; call set_face_tokens(encode_faces(...)) first")
        face = face.to(hidden_states.device, hidden_states.dtype)
        if face.shape[0] not in (1, hidden_states.shape[0]):
            raise ValueError(f"face tokens have batch {face.shape[0]}, the UNet call {hidden_states.shape[0]}")
        delta = self.adapter.blocks[self.index](hidden_states, face).to(out.dtype)
        return out + _batch_multiplier(multiplier, out) * delta


class SD15FeedAdapter(ModelMixin, ConfigMixin):
    """A feed adapter for SD1.5-topology UNets (the paper's U-Net claim; no official weights).

    One :class:`FeedBlock` per cross-attention transformer block (16 in SD1.5, widths 320/640/1280), each with
    ``SD15_FEED_HEADS`` heads of ``C / 8`` and cross-attention to face tokens of width ``face_dim`` (default 768,
    SD1.5's context width: the face encoder's ``project_layer`` maps CLIP-B/32's 768 to it, which keeps the
    per-site ``to_k``/``to_v`` small). Sites are attached through :class:`SD15FeedAttnProcessor` on ``attn2``.
    ``zero_linear`` is zero-initialised: a fresh adapter leaves the UNet's output unchanged.

    The multiplier may be a float or a per-row tensor ``(B,)`` (e.g. 0 for the unconditional half of a batched
    CFG call). Face tokens are ``(1 or B, L, face_dim)``.

    Args:
        site_widths (`Sequence[int]`): the width of each site, in :func:`sd15_sites` order.
        face_dim (`int`, defaults to 768): face-token width.
        num_heads (`int`, defaults to 8): heads per feed block.
        vision_config (`Mapping`, *optional*): CLIP vision config overrides (tiny test models).
        site_names (`Sequence[str]`, *optional*): the sites' module paths (recorded when attached).
    """

    @register_to_config
    def __init__(
        self,
        site_widths: list[int],
        face_dim: int = 768,
        num_heads: int = SD15_FEED_HEADS,
        vision_config: dict[str, Any] | None = None,
        site_names: list[str] | None = None,
    ):
        super().__init__()
        self.face_dim = face_dim
        self.num_heads = num_heads
        self.preprocess_module = FaceEncoder(face_dim, vision_config)
        self.blocks = nn.ModuleList([FeedBlock(int(c), num_heads, context_dim=face_dim) for c in site_widths])
        self.multiplier: float | torch.Tensor = 1.0
        self._face_tokens: torch.Tensor | None = None
        self.site_names: list[str] = list(site_names or [])
        self._unet: nn.Module | None = None

    @classmethod
    def for_unet(cls, unet: nn.Module, **kwargs: Any) -> SD15FeedAdapter:
        """A fresh adapter sized for ``unet``'s sites (on CPU, float32; move it with ``.to``)."""
        widths = [block.attn2.to_q.in_features for block in sd15_sites(unet).values()]
        if not widths:
            raise ValueError(f"{type(unet).__name__} has no cross-attention transformer blocks")
        return cls(widths, **kwargs)

    @property
    def site_widths(self) -> list[int]:
        return [block.zero_linear.in_features for block in self.blocks]

    encode_faces = FeedAdapter.encode_faces

    @property
    def dim(self) -> int:  # the face-token width, for encode_faces/set_face_tokens
        return self.face_dim

    def set_face_tokens(self, tokens: torch.Tensor | None) -> None:
        """Store the face tokens ``(1 or B, L, face_dim)`` (``None`` clears them)."""
        self._face_tokens = None if tokens is None else _check_face_tokens(tokens, self.face_dim)

    @property
    def face_tokens(self) -> torch.Tensor | None:
        return self._face_tokens

    def set_multiplier(self, multiplier: float | Sequence[float] | torch.Tensor) -> None:
        """A float for every row, or one value per row of the UNet's batch."""
        if isinstance(multiplier, (int, float)):
            self.multiplier = float(multiplier)
        else:
            self.multiplier = torch.as_tensor(multiplier, dtype=torch.float32).reshape(-1)

    def attach(self, unet: nn.Module) -> dict[str, SD15FeedAttnProcessor]:
        """Wrap every site's ``attn2`` processor (the host's current one runs inside).

        Returns:
            `dict[str, SD15FeedAttnProcessor]`: processor by site path.
        """
        if self._unet is not None:
            raise ValueError("this SD15FeedAdapter is already attached; call detach() first")
        sites = sd15_sites(unet)
        widths = [block.attn2.to_q.in_features for block in sites.values()]
        if widths != self.site_widths:
            raise ValueError(f"UNet site widths {widths} do not match the adapter's {self.site_widths}")
        processors = {}
        for index, (path, block) in enumerate(sites.items()):
            host = block.attn2.processor
            if isinstance(host, SD15FeedAttnProcessor):
                raise ValueError(f"{path}: a feed adapter is already attached")
            processors[path] = SD15FeedAttnProcessor(self, index, host)
            block.attn2.set_processor(processors[path])
        self.site_names = list(sites)
        self.register_to_config(site_names=self.site_names)
        object.__setattr__(self, "_unet", unet)  # a reference, not a submodule (keeps it out of state_dict)
        logger.debug("attached SD1.5 feed adapter at %d sites", len(processors))
        return processors

    def detach(self) -> None:
        """Give every site its host processor back."""
        if self._unet is None:
            return
        for block in sd15_sites(self._unet).values():
            processor = block.attn2.processor
            if isinstance(processor, SD15FeedAttnProcessor) and processor.adapter is self:
                block.attn2.set_processor(processor.host)
        self._unet = None


def sd15_feed_state_dict(adapter: SD15FeedAdapter, *, include_clip: bool = True) -> dict[str, torch.Tensor]:
    """The adapter's tensors in the release's key naming (``preprocess_module.*``, ``blocks.{i}.*``), contiguous.

    ``include_clip=False`` leaves out the frozen CLIP tower (``preprocess_module.clip_model.*``, 87.5 M floats);
    :func:`load_sd15_feed_adapter` then needs it as ``clip_state``.
    """
    state = adapter.state_dict()
    return {
        k: v.detach().contiguous()
        for k, v in state.items()
        if (include_clip or not k.startswith(_CLIP_PREFIX)) and k != POSITION_IDS_KEY
    }


def save_sd15_feed_adapter(
    adapter: SD15FeedAdapter, path: str | os.PathLike[str], *, include_clip: bool = True
) -> Path:
    """Save an SD1.5 feed adapter as safetensors (metadata: format, sites, heads, multiplier)."""
    from safetensors.torch import save_file

    path = Path(path)
    metadata = {
        "format": _SD15_FORMAT,
        "num_heads": str(adapter.num_heads),
        "site_names": json.dumps(adapter.site_names),
    }
    save_file(sd15_feed_state_dict(adapter, include_clip=include_clip), str(path), metadata=metadata)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Face crops


def face_crop(image: np.ndarray, box: Sequence[float]) -> np.ndarray:
    """The release's face crop (``inference.py`` ``get_face``), 224x224.

    The box is truncated to integers, a square of side ``int(1.1 * max(w, h))`` is centred on it, and that square
    is cut out. Where the square leaves the image it is padded with zeros (the release indexes the array with the
    unclamped corners, so near the borders negative starts wrap or give empty crops: a bug not reproduced). The
    square is then resized to 224x224 (bilinear, as torchvision's ``Resize(224)`` + ``CenterCrop(224)`` on a PIL
    image of a square).

    Args:
        image (`np.ndarray` of shape `(H, W, 3)`): RGB ``uint8``.
        box: ``(x1, y1, x2, y2)`` face box in pixels (e.g. a detector's ``bbox``).

    Returns:
        `np.ndarray` of shape `(224, 224, 3)`, ``uint8`` RGB.
    """
    pixels = np.asarray(image)
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {pixels.shape} {pixels.dtype}")
    if len(box) < 4:
        raise ValueError(f"expected a box (x1, y1, x2, y2), got {box!r}")
    x1, y1, x2, y2 = (int(v) for v in box[:4])  # numpy astype(int): truncation, as released
    w, h = x2 - x1, y2 - y1
    if w <= 0 or h <= 0:
        raise ValueError(f"empty face box {tuple(box[:4])}")
    side = int(max(w, h) * FACE_CROP_SCALE)
    left, top = int(x1 + w / 2 - side / 2), int(y1 + h / 2 - side / 2)
    square = np.zeros((side, side, 3), np.uint8)
    height, width = pixels.shape[:2]
    src_x0, src_y0 = max(left, 0), max(top, 0)
    src_x1, src_y1 = min(left + side, width), min(top + side, height)
    if src_x1 > src_x0 and src_y1 > src_y0:
        square[src_y0 - top : src_y1 - top, src_x0 - left : src_x1 - left] = pixels[src_y0:src_y1, src_x0:src_x1]
    return _resize_center_crop(square, FACE_SIZE)


def _resize_center_crop(pixels: np.ndarray, size: int) -> np.ndarray:
    """torchvision ``Resize(size)`` (short side, bilinear on PIL) then ``CenterCrop(size)``."""
    from PIL import Image

    height, width = pixels.shape[:2]
    if (height, width) == (size, size):
        return pixels
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    resized = np.asarray(Image.fromarray(pixels).resize((new_w, new_h), Image.BILINEAR))
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return resized[top : top + size, left : left + size]


def preprocess_faces(crops: np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
    """RGB face crops → the face encoder's input: ``Resize(224)``, ``CenterCrop(224)``, ``(x / 255 - 0.5) / 0.5``.

    Args:
        crops: one ``(H, W, 3)`` uint8 crop, a ``(k, H, W, 3)`` array or a list of crops (e.g. from
            :func:`face_crop`, already 224x224).

    Returns:
        `torch.Tensor` of shape `(k, 3, 224, 224)`, float32 in [-1, 1].
    """
    if isinstance(crops, np.ndarray) and crops.ndim == 3:
        crops = [crops]
    items = list(crops)
    if not items:
        raise ValueError("no face crops given")
    out = []
    for i, crop in enumerate(items):
        pixels = np.asarray(crop)
        if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
            raise ValueError(f"face crop {i}: expected (H, W, 3) uint8 RGB, got {pixels.shape} {pixels.dtype}")
        out.append(_resize_center_crop(pixels, FACE_SIZE))
    x = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float()  # (k, H, W, 3) -> (k, 3, H, W)
    return (x / 255.0 - FACE_MEAN) / FACE_STD


FACE_MODES = ("cat", "mean")


@torch.no_grad()
def encode_face_crops(adapter: FeedAdapter | SD15FeedAdapter, crops: Sequence[np.ndarray], mode: str = "cat"):
    """The face tokens of one generation from the release's 224 crops (computed once, read by every step and block).

    ``"cat"`` concatenates the tokens of the first 5 photos (the release's default); ``"mean"`` averages the tokens
    of all photos, which blends identities.
    """
    if mode not in FACE_MODES:
        raise ValueError(f"face mode must be one of {', '.join(FACE_MODES)}, got {mode!r}")
    if mode == "cat" and len(crops) > MAX_CAT_FACES:
        logger.warning("FeedFace's cat mode uses the first %d photos; %d given", MAX_CAT_FACES, len(crops))
    weight = adapter.preprocess_module.project_layer.weight
    pixels = preprocess_faces(np.stack(crops)).to(weight.device, weight.dtype)
    return adapter.encode_faces(pixels, mode=mode)


# ----------------------------------------------------------------------------------------------------------------
# Loading


def _vision_config_from_state(state: Mapping[str, torch.Tensor], num_heads: int | None) -> dict[str, Any]:
    """CLIP vision-config overrides read from ``preprocess_module.clip_model.vision_model.*`` shapes."""
    prefix = _CLIP_PREFIX + "vision_model."
    try:
        hidden = state[prefix + "embeddings.class_embedding"].shape[0]
        patch = state[prefix + "embeddings.patch_embedding.weight"].shape[-1]
        positions = state[prefix + "embeddings.position_embedding.weight"].shape[0]
        intermediate = state[prefix + "encoder.layers.0.mlp.fc1.weight"].shape[0]
    except KeyError as err:
        raise ValueError(f"not a FeedFace face encoder: missing key {err.args[0]!r}") from None
    layers = 1 + max(
        int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"encoder\.layers\.(\d+)\.", k))
    )
    side = math.isqrt(positions - 1)
    if side * side != positions - 1:
        raise ValueError(f"CLIP position embedding of {positions} rows is not 1 + a square number of patches")
    return {
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": num_heads or _default_heads(hidden, 64),
        "image_size": side * patch,
        "patch_size": patch,
    }


def _load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """Check ``state`` against ``module`` (built on the meta device) and move its tensors in (``assign``)."""
    expected = module.state_dict()
    stale = {POSITION_IDS_KEY} - set(expected)
    if stale & set(state):
        logger.debug("%s: dropping the stale %s (non-persistent in this transformers)", what, POSITION_IDS_KEY)
        state = {k: v for k, v in state.items() if k not in stale}
    # a transformers version with a persistent buffer can rebuild it: not a weight
    check_state_dict(expected, state, what, optional={POSITION_IDS_KEY})
    module.load_state_dict(state, strict=False, assign=True)  # keys checked above
    rebuild_position_ids(module)


def _cast(module: nn.Module, dtype: torch.dtype | None) -> None:
    if dtype is not None:
        module.to(dtype=dtype)


def load_feed_adapter(
    path_or_state: str | os.PathLike[str] | Mapping[str, torch.Tensor],
    *,
    dtype: torch.dtype | None = None,
    num_heads: int | None = None,
    clip_heads: int | None = None,
    multiplier: float = DEFAULT_MULTIPLIER,
) -> FeedAdapter:
    """Load the official ``feed-4800000.pt`` (or a tiny one in the same naming) strictly into a :class:`FeedAdapter`.

    The widths come from the shapes (U-ViT width from ``preprocess_module.project_layer.weight``, the CLIP tower's
    size from its keys); heads are not in the shapes and default to the release's (64 for width 1536, 12 for
    CLIP-B/32) or, for widths they do not divide, heads of 8 channels. The only tolerated stray key is
    :data:`POSITION_IDS_KEY` (a persistent buffer under the transformers 4.28 that saved the release).

    Args:
        path_or_state: the ``.pt`` (``torch.load(weights_only=True)``) or a ``.safetensors`` file, or its dict.
        dtype (`torch.dtype`, *optional*): cast the adapter (default: float32 as built).
        num_heads (`int`, *optional*): feed-block heads.
        clip_heads (`int`, *optional*): CLIP heads.
        multiplier (`float`, defaults to :data:`DEFAULT_MULTIPLIER`): the adapter strength.

    Returns:
        `FeedAdapter` in eval mode, on CPU. It is built on the meta device and takes the checkpoint's tensors (a
        given dict's tensors are used in place, not copied); the CLIP tower stays frozen.

    Raises:
        ValueError: unexpected, missing or mis-shaped keys (named in the message).
    """
    if isinstance(path_or_state, Mapping):
        state, what = dict(path_or_state), "FeedFace adapter"
    else:
        state, what = (
            load_tensor_file(path_or_state, what="FeedFace adapter checkpoint"),
            f"FeedFace adapter ({Path(path_or_state).name})",
        )
    try:
        dim = state["preprocess_module.project_layer.weight"].shape[0]
    except KeyError:
        raise ValueError(f"{what}: not a FeedFace adapter (no preprocess_module.project_layer.weight)") from None
    vision_config = _vision_config_from_state(state, clip_heads)
    with torch.device("meta"):  # no 3 GB random init: the checkpoint's tensors are moved in
        adapter = FeedAdapter(dim, num_heads, vision_config=vision_config)
    _load_strict(adapter, state, what)
    adapter.set_multiplier(multiplier)
    _cast(adapter, dtype)
    logger.info("loaded FeedFace adapter: width %d, %d blocks", dim, len(adapter.blocks))
    return adapter.eval()


def load_sd15_feed_adapter(
    path_or_state: str | os.PathLike[str] | Mapping[str, torch.Tensor],
    *,
    clip_state: Mapping[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
    num_heads: int | None = None,
    clip_heads: int | None = None,
    multiplier: float = 1.0,
) -> SD15FeedAdapter:
    """Load an SD1.5 feed adapter saved by :func:`save_sd15_feed_adapter`, strictly.

    Site widths and the face width come from the shapes, heads from the file's metadata (else 8).

    Args:
        path_or_state: the ``.safetensors`` (or ``.pt``) file, or its dict.
        clip_state: the CLIP ViT-B/32 tower when the file was saved without it: keys ``vision_model.*`` (e.g. a
            HF ``CLIPVisionModel``/``CLIPModel`` state dict; other keys ignored) or
            ``preprocess_module.clip_model.vision_model.*`` (e.g. the U-ViT ``feed-4800000.pt``).
        dtype (`torch.dtype`, *optional*): cast the adapter.
        num_heads (`int`, *optional*): feed-block heads (overrides the metadata).
        clip_heads (`int`, *optional*): CLIP heads.
        multiplier (`float`, defaults to 1.0): the adapter strength.

    Raises:
        ValueError: unexpected, missing or mis-shaped keys (named in the message).
    """
    metadata: dict[str, str] = {}
    if isinstance(path_or_state, Mapping):
        state, what = dict(path_or_state), "SD1.5 feed adapter"
    else:
        path = Path(path_or_state)
        state, what = load_tensor_file(path, what="SD1.5 feed adapter"), f"SD1.5 feed adapter ({path.name})"
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as handle:
                metadata = handle.metadata() or {}
    if clip_state is not None:
        state = {k: v for k, v in state.items() if not k.startswith(_CLIP_PREFIX)}
        for key, value in clip_state.items():
            if key.startswith(_CLIP_PREFIX):
                key = key[len(_CLIP_PREFIX) :]
            if key.startswith("vision_model."):
                state[_CLIP_PREFIX + key] = value
    try:
        face_dim = state["preprocess_module.project_layer.weight"].shape[0]
    except KeyError:
        raise ValueError(f"{what}: not a feed adapter (no preprocess_module.project_layer.weight)") from None
    if not any(k.startswith(_CLIP_PREFIX) for k in state):
        raise ValueError(
            f"{what}: missing keys: {_CLIP_PREFIX}vision_model.* (saved without the CLIP tower; pass clip_state)"
        )
    count = 1 + max(
        (int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.zero_linear\.", k))), default=-1
    )
    widths = [
        state[f"blocks.{i}.zero_linear.weight"].shape[0]
        for i in range(count)
        if f"blocks.{i}.zero_linear.weight" in state
    ]
    if not widths or len(widths) != count:
        raise ValueError(f"{what}: expected blocks.0..N.zero_linear.weight keys")
    heads = num_heads or int(metadata.get("num_heads", SD15_FEED_HEADS))
    vision_config = _vision_config_from_state(state, clip_heads)
    with torch.device("meta"):
        adapter = SD15FeedAdapter(
            widths,
            face_dim,
            heads,
            vision_config=vision_config,
            site_names=json.loads(metadata.get("site_names", "[]")),
        )
    _load_strict(adapter, state, what)
    adapter.set_multiplier(multiplier)
    _cast(adapter, dtype)
    logger.info("loaded SD1.5 feed adapter: %d sites, face width %d", len(widths), face_dim)
    return adapter.eval()
