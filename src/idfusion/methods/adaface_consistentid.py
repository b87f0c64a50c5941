"""AdaFace v2's ConsistentID branch (the joint encoder's first encoder): its model pieces and conditioning.

The release (``adaface/face_id_to_ada_prompt.py::ConsistentID_ID2AdaPrompt``) turns face photos into 4 subject
tokens ``z_0_0 .. z_0_3``, appended before the Arc2Face branch's 16 (``["consistentID", "arc2face"]``, 20 in all):

1. insightface ``buffalo_l`` (SCRFD ``det_10g.onnx``, ArcFace ``w600k_r50.onnx``) on the release's face image (black
   square pad, 512 NEAREST, :func:`idfusion.methods.adaface.official_face_image`), detection size 512, the face the
   release calls the largest (:func:`~idfusion.methods.adaface.official_face_index`): its normed embedding. Several
   photos: mean of the unit embeddings, normalised (``avg_at_stage="id_emb"``).
2. CLIP-ViT-H-14 (``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``) vision ``hidden_states[-2]`` ``(257, 1280)`` of each
   *whole, unpadded* photo after ``CLIPImageProcessor()``'s preprocessing (:func:`clip_image_pixels`), averaged
   over the photos. The release's foreground mask is all ones at inference (no mask is passed), so nothing is
   masked; BiSeNet is loaded by ConsistentID's pipeline but this branch never runs it (:class:`BiSeNet` is here
   for ConsistentID's own face parsing).
3. ConsistentID's :class:`ProjPlusModel` (IP-Adapter FaceID-Plus: an MLP of the ArcFace vector to 4 tokens, refined
   by a 4-layer perceiver reading the CLIP features) from ``ConsistentID-v1.bin`` ``["image_proj"]``: ``(4, 768)``
   "ID image-prompt" embeddings.
4. AdaFace's ConsistentID-branch projector (:class:`~idfusion.methods.adaface.AdaFaceProjector` with ``N_ID = 4``,
   template ``"photo of a " + ", " * 6``), then ID-CFG with scale 6: ``6 * X + (1 - 6) * PAD[4:8]``.

:class:`ConsistentIDEncoder` runs these steps; :func:`joint_subject_embeddings` puts its 4 rows before the Arc2Face
branch's 16. Weights load with ``torch.load(weights_only=True)`` or safetensors; nothing in a file runs.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelFilesError, NoFaceError
from ..serialization import check_state_dict, load_tensor_file
from .adaface import (
    ADAFACE_V2,
    CONSISTENTID_NUM_ID_TOKENS,
    AdaFaceProjector,
    OfficialFaceEmbedder,
    _rgb_array,
    adaface_template_ids,
    subject_tokens,
    template_num_commas,
)

__all__ = [
    "ARC2FACE_ID_CFG_SCALE",
    "BISENET_LABELS",
    "BISENET_WEIGHTS_FILE",
    "BUFFALO_L_DETECTOR",
    "BUFFALO_L_FOLDER",
    "BUFFALO_L_RECOGNIZER",
    "CLIP_IMAGE_MEAN",
    "CLIP_IMAGE_STD",
    "CLIP_VIT_H_REPO",
    "CONSISTENTID_ID_CFG_SCALE",
    "CONSISTENTID_WEIGHTS_FILE",
    "JOINT_ENCODER_TYPES",
    "BiSeNet",
    "BuffaloLFaces",
    "ConsistentIDEncoder",
    "FacePerceiverResampler",
    "PerceiverAttention",
    "ProjPlusModel",
    "bisenet_config",
    "bisenet_pixels",
    "clip_image_pixels",
    "joint_subject_embeddings",
    "joint_subject_tokens",
    "load_bisenet",
    "load_clip_vision",
    "load_consistentid_image_proj",
    "parse_face",
    "projplus_config",
]

logger = logging.getLogger(__name__)

# The release's encoder order and default ID-CFG scales (app.py: --adaface_encoder_cfg_scales 6.0 1.0).
JOINT_ENCODER_TYPES = ("consistentID", "arc2face")
CONSISTENTID_ID_CFG_SCALE = 6.0
ARC2FACE_ID_CFG_SCALE = 1.0

# Where the release reads them (relative to its repository root) and the Hub id it loads CLIP from.
CONSISTENTID_WEIGHTS_FILE = "ConsistentID/models/ConsistentID-v1.bin"
BISENET_WEIGHTS_FILE = "ConsistentID/models/BiSeNet_pretrained_for_ConsistentID.pth"
BUFFALO_L_FOLDER = "models/insightface/models/buffalo_l"
BUFFALO_L_DETECTOR = "det_10g.onnx"
BUFFALO_L_RECOGNIZER = "w600k_r50.onnx"
CLIP_VIT_H_REPO = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

# CLIPImageProcessor() defaults (OpenAI CLIP's statistics; ConsistentID builds the processor without a config).
CLIP_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_IMAGE_SIZE = 224
# BiSeNet (face-parsing.PyTorch, 19 classes) input: 512x512 BILINEAR, ImageNet statistics.
BISENET_SIZE = 512
BISENET_MEAN = (0.485, 0.456, 0.406)
BISENET_STD = (0.229, 0.224, 0.225)
BISENET_LABELS = (
    "background", "skin", "l_brow", "r_brow", "l_eye", "r_eye", "eye_g", "l_ear", "r_ear", "ear_r",
    "nose", "mouth", "u_lip", "l_lip", "neck", "neck_l", "cloth", "hair", "hat",
)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# ProjPlusModel (ConsistentID-v1.bin "image_proj")
# ----------------------------------------------------------------------------------------------------------------------


def _feed_forward(dim: int, inner: int) -> nn.Sequential:
    # Keys 0 (LayerNorm), 1 and 3 (bias-free Linear), as ConsistentID's FeedForward.
    return nn.Sequential(
        nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(), nn.Linear(inner, dim, bias=False)
    )


class PerceiverAttention(nn.Module):
    """IP-Adapter's perceiver attention: the latents attend to ``[features ; latents]``.

    Queries from the LayerNormed latents, keys/values from the LayerNormed features concatenated with the latents;
    ``q`` and ``k`` are each scaled by ``head_dim ** -0.25``, softmax in float32, no biases.
    """

    def __init__(self, dim: int, head_dim: int = 64, num_heads: int = 8):
        super().__init__()
        self.head_dim = head_dim
        self.num_heads = num_heads
        inner = head_dim * num_heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, features: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """``(B, N, D)`` features and ``(B, L, D)`` latents -> ``(B, L, D)``."""
        features = self.norm1(features)
        latents = self.norm2(latents)
        batch, length, _ = latents.shape
        heads = self.num_heads

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, x.shape[1], heads, -1).transpose(1, 2)  # (B, T, H*hd) -> (B, H, T, hd)

        query = split(self.to_q(latents))
        key, value = self.to_kv(torch.cat([features, latents], dim=1)).chunk(2, dim=-1)  # each (B, N+L, H*hd)
        key, value = split(key), split(value)
        scale = self.head_dim**-0.25  # on q and on k, as the original (numerically gentler in fp16)
        weights = (query * scale) @ (key * scale).transpose(-2, -1)  # (B, H, L, N+L)
        weights = torch.softmax(weights.float(), dim=-1).to(weights.dtype)
        out = (weights @ value).transpose(1, 2).reshape(batch, length, -1)  # (B, H, L, hd) -> (B, L, H*hd)
        return self.to_out(out)


class FacePerceiverResampler(nn.Module):
    """ConsistentID's resampler: ``proj_in`` (CLIP width -> D), ``depth`` x (attention + feed-forward, residual),
    ``proj_out`` and ``norm_out``. ``layers.{i}.0`` is the attention, ``layers.{i}.1`` the feed-forward."""

    def __init__(
        self,
        dim: int,
        depth: int,
        head_dim: int,
        num_heads: int,
        embedding_dim: int,
        output_dim: int,
        ff_inner_dim: int,
    ):
        super().__init__()
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, head_dim, num_heads), _feed_forward(dim, ff_inner_dim)])
            for _ in range(depth)
        )

    def forward(self, latents: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        features = self.proj_in(features)
        for attention, feed_forward in self.layers:
            latents = attention(features, latents) + latents
            latents = feed_forward(latents) + latents
        return self.norm_out(self.proj_out(latents))


def projplus_config(**overrides: Any) -> dict[str, Any]:
    """Full-size :class:`ProjPlusModel` settings of ``ConsistentID-v1.bin`` (SD1.5: 768-wide tokens)."""
    config: dict[str, Any] = {
        "cross_attention_dim": 768,
        "id_embeddings_dim": 512,
        "id_hidden_dim": 1024,  # id_embeddings_dim * 2 in the original
        "clip_embeddings_dim": 1280,
        "num_tokens": CONSISTENTID_NUM_ID_TOKENS,
        "depth": 4,
        "head_dim": 64,
        "num_heads": 12,  # cross_attention_dim // 64
        "ff_inner_dim": 3072,  # cross_attention_dim * 4
    }
    unknown = set(overrides) - set(config)
    if unknown:
        raise TypeError(f"unknown ProjPlusModel settings {sorted(unknown)}; known: {sorted(config)}")
    return config | overrides


class ProjPlusModel(nn.Module):
    """ConsistentID's ``ProjPlusModel`` (IP-Adapter FaceID-Plus style), the ID image-prompt encoder of its branch.

    ``x = LayerNorm(proj(id_embeds).view(-1, num_tokens, D))`` with ``proj`` = Linear -> GELU -> Linear, then
    ``FacePerceiverResampler(x, clip_embeds)``. State-dict keys as ``ConsistentID-v1.bin["image_proj"]``:
    ``proj.{0,2}.*``, ``norm.*``, ``perceiver_resampler.{proj_in,proj_out,norm_out}.*`` and
    ``perceiver_resampler.layers.{i}.0.{norm1,norm2,to_q,to_kv,to_out}.*`` / ``.layers.{i}.1.{0,1,3}.*``.

    Args: see :func:`projplus_config` (``cross_attention_dim`` is the token width ``D``).
    """

    def __init__(
        self,
        cross_attention_dim: int = 768,
        id_embeddings_dim: int = 512,
        id_hidden_dim: int = 1024,
        clip_embeddings_dim: int = 1280,
        num_tokens: int = CONSISTENTID_NUM_ID_TOKENS,
        depth: int = 4,
        head_dim: int = 64,
        num_heads: int = 12,
        ff_inner_dim: int = 3072,
    ):
        super().__init__()
        self.config = {
            "cross_attention_dim": cross_attention_dim,
            "id_embeddings_dim": id_embeddings_dim,
            "id_hidden_dim": id_hidden_dim,
            "clip_embeddings_dim": clip_embeddings_dim,
            "num_tokens": num_tokens,
            "depth": depth,
            "head_dim": head_dim,
            "num_heads": num_heads,
            "ff_inner_dim": ff_inner_dim,
        }
        self.cross_attention_dim = cross_attention_dim
        self.num_tokens = num_tokens
        self.proj = nn.Sequential(
            nn.Linear(id_embeddings_dim, id_hidden_dim),
            nn.GELU(),
            nn.Linear(id_hidden_dim, cross_attention_dim * num_tokens),
        )
        self.norm = nn.LayerNorm(cross_attention_dim)
        self.perceiver_resampler = FacePerceiverResampler(
            cross_attention_dim, depth, head_dim, num_heads, clip_embeddings_dim, cross_attention_dim, ff_inner_dim
        )

    @classmethod
    def from_state_dict(
        cls, state_dict: Mapping[str, torch.Tensor], *, num_heads: int | None = None, head_dim: int = 64
    ) -> ProjPlusModel:
        """Build with every size read from the tensors (heads: ``inner / head_dim``, the original's 64).

        Raises:
            ValueError: missing, unexpected or mis-shaped keys (named in the message).
        """
        needed = ("norm.weight", "proj.0.weight", "proj.2.weight", "perceiver_resampler.proj_in.weight")
        missing = [k for k in needed if k not in state_dict]
        if missing:
            raise ValueError(f"ProjPlusModel state dict has no {missing}")
        dim = state_dict["norm.weight"].shape[0]
        hidden, id_dim = state_dict["proj.0.weight"].shape
        tokens, remainder = divmod(state_dict["proj.2.weight"].shape[0], dim)
        if remainder:
            raise ValueError(f"proj.2.weight has {state_dict['proj.2.weight'].shape[0]} rows, not a multiple of {dim}")
        depth = len({m.group(1) for k in state_dict if (m := re.match(r"perceiver_resampler\.layers\.(\d+)\.", k))})
        inner = state_dict["perceiver_resampler.layers.0.0.to_q.weight"].shape[0] if depth else head_dim
        ff_inner = state_dict["perceiver_resampler.layers.0.1.1.weight"].shape[0] if depth else dim
        heads = num_heads if num_heads is not None else inner // head_dim
        if heads < 1 or heads * head_dim != inner:
            raise ValueError(f"perceiver attention width {inner} is not {heads} heads of {head_dim}")
        config = projplus_config(
            cross_attention_dim=int(dim),
            id_embeddings_dim=int(id_dim),
            id_hidden_dim=int(hidden),
            clip_embeddings_dim=int(state_dict["perceiver_resampler.proj_in.weight"].shape[1]),
            num_tokens=int(tokens),
            depth=depth,
            head_dim=head_dim,
            num_heads=int(heads),
            ff_inner_dim=int(ff_inner),
        )
        with torch.device("meta"):
            model = cls(**config)
        check_state_dict(model.state_dict(), state_dict, "ConsistentID image_proj (ProjPlusModel)")
        model.load_state_dict(dict(state_dict), strict=True, assign=True)
        return model.eval()

    def forward(self, id_embeds: torch.Tensor, clip_embeds: torch.Tensor) -> torch.Tensor:
        """``(B, 512)`` unit ArcFace embeddings and ``(B, 257, C)`` CLIP features -> ``(B, num_tokens, D)``.

        (The original's ``shortcut`` option, off in AdaFace, is not implemented.)
        """
        width = self.config["id_embeddings_dim"]
        if id_embeds.ndim != 2 or id_embeds.shape[1] != width:
            raise ValueError(f"id_embeds must have shape (B, {width}), got {tuple(id_embeds.shape)}")
        clip_width = self.config["clip_embeddings_dim"]
        if clip_embeds.ndim != 3 or clip_embeds.shape[0] != id_embeds.shape[0] or clip_embeds.shape[2] != clip_width:
            raise ValueError(
                f"clip_embeds must have shape ({id_embeds.shape[0]}, N, {clip_width}), got {tuple(clip_embeds.shape)}"
            )
        # (B, 512) -> (B, T*D) -> (B, T, D)
        tokens = self.proj(id_embeds).reshape(-1, self.num_tokens, self.cross_attention_dim)
        return self.perceiver_resampler(self.norm(tokens), clip_embeds)


def _load_nested(path: Path, what: str) -> dict[str, Any]:
    """A ``torch.save`` dict of dicts of tensors, read with ``weights_only=True``; or a safetensors file whose keys
    are ``<section>.<key>``, regrouped."""
    if path.suffix == ".safetensors":
        flat = load_tensor_file(path, what=what)
        nested: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in flat.items():
            section, _, rest = key.partition(".")
            nested.setdefault(section, {})[rest] = value
        return nested
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelFilesError(
            f"{path}: cannot be read as {what} with torch.load(weights_only=True) (only tensors and plain containers "
            f"are loaded; nothing in the file is run): {first}"
        ) from error
    if not isinstance(state, Mapping):
        raise ModelFilesError(f"{path}: expected {what} (a dict), found {type(state).__name__}")
    return dict(state)


def load_consistentid_image_proj(
    path: str | os.PathLike[str], *, dtype: torch.dtype | None = None, num_heads: int | None = None
) -> ProjPlusModel:
    """ConsistentID's ``ProjPlusModel`` from ``ConsistentID-v1.bin`` (its ``"image_proj"`` entry).

    The file is a ``torch.save`` dict ``{"image_proj": ..., "FacialEncoder": ..., "adapter_modules": ...}`` of state
    dicts, read with ``torch.load(weights_only=True)``; a ``.safetensors`` with ``image_proj.*`` keys also works.
    Only ``image_proj`` is used by AdaFace (the facial encoder and UNet adapters are ConsistentID's own generator).

    Raises:
        ModelFilesError: missing or unreadable file, or no ``image_proj`` weights in the expected layout.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFilesError(
            f"{path}: ConsistentID weights not found. Put ConsistentID-v1.bin (Hub repo JackAILab/ConsistentID) "
            f"there; the AdaFace release reads it from {CONSISTENTID_WEIGHTS_FILE}"
        )
    state = _load_nested(path, "ConsistentID weights")
    image_proj = state.get("image_proj")
    if not isinstance(image_proj, Mapping) or not all(isinstance(v, torch.Tensor) for v in image_proj.values()):
        raise ModelFilesError(f"{path}: no 'image_proj' state dict found (top-level keys: {sorted(map(str, state))})")
    try:
        model = ProjPlusModel.from_state_dict(image_proj, num_heads=num_heads)
    except ValueError as error:
        raise ModelFilesError(f"{path}: {error}") from error
    if dtype is not None:
        model.to(dtype)
    logger.info("loaded ConsistentID image_proj from %s: %s", path, model.config)
    return model


# ----------------------------------------------------------------------------------------------------------------------
# BiSeNet face parsing (BiSeNet_pretrained_for_ConsistentID.pth, face-parsing.PyTorch's 79999_iter.pth)
# ----------------------------------------------------------------------------------------------------------------------


class _ConvBNReLU(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, padding: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class _BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = None
        if in_channels != out_channels or stride != 1:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(shortcut + residual)


class _ResNet18(nn.Module):
    def __init__(self, widths: Sequence[int]):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        previous = widths[0]
        for index, (width, stride) in enumerate(zip(widths, (1, 2, 2, 2), strict=True), start=1):
            setattr(
                self, f"layer{index}", nn.Sequential(_BasicBlock(previous, width, stride), _BasicBlock(width, width))
            )
            previous = width

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.layer1(self.maxpool(F.relu(self.bn1(self.conv1(x)))))
        feat8 = self.layer2(x)  # 1/8
        feat16 = self.layer3(feat8)  # 1/16
        return feat8, feat16, self.layer4(feat16)  # and 1/32


class _AttentionRefinement(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = _ConvBNReLU(in_channels, out_channels)
        self.conv_atten = nn.Conv2d(out_channels, out_channels, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv(x)
        attention = torch.sigmoid(self.bn_atten(self.conv_atten(feat.mean(dim=(2, 3), keepdim=True))))
        return feat * attention


class _ContextPath(nn.Module):
    def __init__(self, widths: Sequence[int], context: int):
        super().__init__()
        self.resnet = _ResNet18(widths)
        self.arm16 = _AttentionRefinement(widths[2], context)
        self.arm32 = _AttentionRefinement(widths[3], context)
        self.conv_head32 = _ConvBNReLU(context, context)
        self.conv_head16 = _ConvBNReLU(context, context)
        self.conv_avg = _ConvBNReLU(widths[3], context, kernel_size=1, padding=0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feat8, feat16, feat32 = self.resnet(x)
        # Global context: (B, C, 1, 1), broadcast over the 1/32 map (the original's nearest upsampling of 1x1)
        avg = self.conv_avg(feat32.mean(dim=(2, 3), keepdim=True))
        feat32_up = F.interpolate(self.arm32(feat32) + avg, feat16.shape[2:], mode="nearest")
        feat32_up = self.conv_head32(feat32_up)
        feat16_up = F.interpolate(self.arm16(feat16) + feat32_up, feat8.shape[2:], mode="nearest")
        return feat8, self.conv_head16(feat16_up), feat32_up


class _FeatureFusion(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.convblk = _ConvBNReLU(in_channels, out_channels, kernel_size=1, padding=0)
        self.conv1 = nn.Conv2d(out_channels, out_channels // 4, 1, bias=False)
        self.conv2 = nn.Conv2d(out_channels // 4, out_channels, 1, bias=False)

    def forward(self, spatial: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        feat = self.convblk(torch.cat([spatial, context], dim=1))
        attention = torch.sigmoid(self.conv2(F.relu(self.conv1(feat.mean(dim=(2, 3), keepdim=True)))))
        return feat * attention + feat


class _BiSeNetOutput(nn.Module):
    def __init__(self, in_channels: int, mid_channels: int, num_classes: int):
        super().__init__()
        self.conv = _ConvBNReLU(in_channels, mid_channels)
        self.conv_out = nn.Conv2d(mid_channels, num_classes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.conv(x))


def bisenet_config(**overrides: Any) -> dict[str, Any]:
    """Full-size :class:`BiSeNet` settings: 19 classes, ResNet-18 widths from 64 (``base_width``)."""
    config: dict[str, Any] = {"num_classes": len(BISENET_LABELS), "base_width": 64}
    unknown = set(overrides) - set(config)
    if unknown:
        raise TypeError(f"unknown BiSeNet settings {sorted(unknown)}; known: {sorted(config)}")
    return config | overrides


class BiSeNet(nn.Module):
    """The face-parsing BiSeNet ConsistentID ships (zllrunning/face-parsing.PyTorch, ResNet-18 context path, the
    ResNet's 1/8 features standing in for the spatial path), with the original's key names: ``cp.resnet.*``,
    ``cp.arm16/arm32``, ``cp.conv_head32/16``, ``cp.conv_avg``, ``ffm``, ``conv_out``, ``conv_out16/32``.

    Channel widths scale with ``base_width`` (64: ResNet widths 64..512, context 128, fusion 256); only smaller test
    models change it. :meth:`forward` returns the main logits (the ``conv_out16/32`` heads are training-only).

    Args:
        num_classes (`int`, *optional*, defaults to 19): parsing classes (:data:`BISENET_LABELS`).
        base_width (`int`, *optional*, defaults to 64).
    """

    def __init__(self, num_classes: int = len(BISENET_LABELS), base_width: int = 64):
        super().__init__()
        widths = [base_width * m for m in (1, 2, 4, 8)]
        context, fusion = 2 * base_width, 4 * base_width
        self.config = {"num_classes": num_classes, "base_width": base_width}
        self.cp = _ContextPath(widths, context)
        self.ffm = _FeatureFusion(widths[1] + context, fusion)
        self.conv_out = _BiSeNetOutput(fusion, fusion, num_classes)
        self.conv_out16 = _BiSeNetOutput(context, base_width, num_classes)
        self.conv_out32 = _BiSeNetOutput(context, base_width, num_classes)

    def forward(self, pixels: torch.Tensor, *, auxiliary: bool = False) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """``(B, 3, H, W)`` normalised RGB (:func:`bisenet_pixels`) -> ``(B, num_classes, H, W)`` logits, bilinearly
        upsampled with ``align_corners=True``; with ``auxiliary`` also the two training heads."""
        size = pixels.shape[2:]
        feat8, context8, context16 = self.cp(pixels)
        outputs = [self.conv_out(self.ffm(feat8, context8))]
        if auxiliary:
            outputs += [self.conv_out16(context8), self.conv_out32(context16)]
        outputs = [F.interpolate(o, size, mode="bilinear", align_corners=True) for o in outputs]
        return tuple(outputs) if auxiliary else outputs[0]


def load_bisenet(path: str | os.PathLike[str], *, dtype: torch.dtype | None = None) -> BiSeNet:
    """The BiSeNet of ``BiSeNet_pretrained_for_ConsistentID.pth`` (a plain state dict; ``weights_only=True``).

    Sizes come from the tensors (classes from ``conv_out.conv_out.weight``, widths from ``cp.resnet.conv1.weight``).
    ``num_batches_tracked`` buffers may be present or not.

    Raises:
        ModelFilesError: missing or unreadable file, or keys/shapes other than the original's.
    """
    path = Path(path)
    hint = f"Get BiSeNet_pretrained_for_ConsistentID.pth from the Hub repo JackAILab/ConsistentID ({BISENET_WEIGHTS_FILE})"
    state = load_tensor_file(path, what="BiSeNet face-parsing weights", hint=hint)
    for key in ("cp.resnet.conv1.weight", "conv_out.conv_out.weight"):
        if key not in state:
            raise ModelFilesError(f"{path}: not a BiSeNet face-parsing state dict (no {key!r}). {hint}")
    config = bisenet_config(
        num_classes=int(state["conv_out.conv_out.weight"].shape[0]),
        base_width=int(state["cp.resnet.conv1.weight"].shape[0]),
    )
    with torch.device("meta"):
        model = BiSeNet(**config)
    expected = model.state_dict()
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    try:
        check_state_dict(expected, state, f"{path}: BiSeNet", optional=optional)
    except ValueError as error:
        raise ModelFilesError(str(error)) from error
    for key in optional - set(state):
        state[key] = torch.zeros((), dtype=torch.long)
    model.load_state_dict(state, strict=True, assign=True)
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def bisenet_pixels(image: np.ndarray, *, size: int = BISENET_SIZE) -> torch.Tensor:
    """``(1, 3, size, size)`` BiSeNet input, as ConsistentID's ``parse_face_mask``: PIL BILINEAR resize to
    ``size`` x ``size``, ``/ 255``, ImageNet mean/std."""
    from PIL import Image

    rgb = np.ascontiguousarray(_rgb_array(image, "image"))
    resized = np.asarray(Image.fromarray(rgb).resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
    pixels = (resized / 255.0 - np.array(BISENET_MEAN, np.float32)) / np.array(BISENET_STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))[None]  # (H, W, 3) -> (1, 3, H, W)


@torch.no_grad()
def parse_face(model: BiSeNet, image: np.ndarray) -> np.ndarray:
    """``(512, 512)`` uint8 class map (:data:`BISENET_LABELS`) of an RGB photo, the argmax of the main logits."""
    weight = next(model.parameters())
    logits = model(bisenet_pixels(image).to(device=weight.device, dtype=weight.dtype))
    return logits[0].argmax(dim=0).to(torch.uint8).cpu().numpy()


# ----------------------------------------------------------------------------------------------------------------------
# CLIP-ViT-H-14 image features
# ----------------------------------------------------------------------------------------------------------------------


def clip_image_pixels(image: np.ndarray, *, size: int = CLIP_IMAGE_SIZE, name: str = "image") -> torch.Tensor:
    """``(1, 3, size, size)`` float32 pixels as ``transformers.CLIPImageProcessor()`` (its defaults) makes them.

    The shorter side is resized to ``size`` with PIL BICUBIC on the uint8 image (the longer side to
    ``int(size * long / short)``), the centre ``size`` x ``size`` is cropped (offsets rounded down), and pixels
    are scaled by ``1 / 255`` and normalised with :data:`CLIP_IMAGE_MEAN` / :data:`CLIP_IMAGE_STD`.
    """
    from PIL import Image

    rgb = np.ascontiguousarray(_rgb_array(image, name))
    height, width = rgb.shape[:2]
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    resized = np.asarray(Image.fromarray(rgb).resize((new_w, new_h), Image.Resampling.BICUBIC))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    crop = resized[top : top + size, left : left + size]
    pixels = (crop.astype(np.float64) * (1 / 255)).astype(np.float32)
    pixels = (pixels - np.array(CLIP_IMAGE_MEAN, np.float32)) / np.array(CLIP_IMAGE_STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))[None]  # (H, W, 3) -> (1, 3, H, W)


def load_clip_vision(folder: str | os.PathLike[str], *, dtype: torch.dtype | None = None) -> nn.Module:
    """CLIP-ViT-H-14's vision tower (``CLIPVisionModelWithProjection``) from a snapshot folder of
    ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``: a whole ``CLIPModel`` (``config.json`` and ``model.safetensors`` or
    ``pytorch_model.bin``), of which only ``vision_model.*`` and ``visual_projection.*`` are read (the text tower is
    never loaded). ``.bin`` files are read with ``torch.load(weights_only=True)``.

    Raises:
        ModelFilesError: no config or weights, or vision weights other than the config's.
    """
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from ..serialization import rebuild_position_ids

    folder = Path(folder)
    hint = f"expected a snapshot of {CLIP_VIT_H_REPO} (config.json and model.safetensors)"
    if not (folder / "config.json").is_file():
        raise ModelFilesError(f"{folder}: no CLIP vision model here (no config.json); {hint}")
    config = CLIPVisionConfig.from_pretrained(folder)  # a CLIPModel config gives its vision_config
    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(config)
    expected = model.state_dict()
    wanted = ("vision_model.", "visual_projection.")
    files = [folder / name for name in ("model.safetensors", "pytorch_model.bin") if (folder / name).is_file()]
    if not files:
        raise ModelFilesError(f"{folder}: no CLIP weights (model.safetensors or pytorch_model.bin); {hint}")
    if files[0].suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(files[0]), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys() if k.startswith(wanted)}  # noqa: SIM118
    else:
        state = {k: v for k, v in load_tensor_file(files[0], what="CLIP weights").items() if k.startswith(wanted)}
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    try:
        check_state_dict(
            expected,
            state,
            f"{files[0]}: CLIP vision tower",
            optional={k for k in expected if k.endswith("position_ids")},
        )
    except ValueError as error:
        raise ModelFilesError(str(error)) from error
    model.load_state_dict(state, strict=False, assign=True)
    rebuild_position_ids(model)
    if dtype is not None:
        model.to(dtype)
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------------
# buffalo_l faces, the release's way
# ----------------------------------------------------------------------------------------------------------------------


class BuffaloLFaces(OfficialFaceEmbedder):
    """insightface ``buffalo_l`` (``det_10g.onnx``, ``w600k_r50.onnx``) run the release's way for this branch
    (:class:`~idfusion.methods.adaface.OfficialFaceEmbedder`).

    Args:
        model_dir (`str` or `os.PathLike`): the ``buffalo_l`` folder.
        providers (`Sequence[str]`, *optional*): onnxruntime providers.
    """

    def __init__(self, model_dir: str | os.PathLike[str], *, providers: Sequence[str] | None = None):
        folder = Path(model_dir)
        files = [folder / BUFFALO_L_DETECTOR, folder / BUFFALO_L_RECOGNIZER]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelFilesError(
                f"{folder}: insightface buffalo_l models {missing} not found; the AdaFace release reads "
                f"{BUFFALO_L_DETECTOR} and {BUFFALO_L_RECOGNIZER} from {BUFFALO_L_FOLDER}"
            )
        super().__init__(files[0], files[1], providers=providers)


# ----------------------------------------------------------------------------------------------------------------------
# The branch
# ----------------------------------------------------------------------------------------------------------------------


class ConsistentIDEncoder(nn.Module):
    """Face photos -> the 4 ConsistentID-branch subject-token embeddings of AdaFace v2 (see the module docstring).

    Args:
        image_proj (`ProjPlusModel`): from :func:`load_consistentid_image_proj`.
        clip_vision (`nn.Module`): CLIP-ViT-H-14's ``CLIPVisionModelWithProjection`` (:func:`load_clip_vision`).
        projector (`AdaFaceProjector`): the checkpoint's ConsistentID projector
            (:attr:`~idfusion.methods.adaface.AdaFaceCheckpoint.consistentid_projector`, ``N_ID = 4``).
        tokenizer: a CLIP tokenizer (SD1.5's), for the projector's template ``"photo of a " + ", " * 6``.
        faces (`BuffaloLFaces`, *optional*): needed unless embeddings are passed to :meth:`forward`.
        id_cfg_scale (`float`, *optional*, defaults to 6.0): the release's ID-CFG scale for this branch.
    """

    def __init__(
        self,
        image_proj: ProjPlusModel,
        clip_vision: nn.Module,
        projector: AdaFaceProjector,
        tokenizer: Any,
        *,
        faces: BuffaloLFaces | None = None,
        id_cfg_scale: float = CONSISTENTID_ID_CFG_SCALE,
    ):
        super().__init__()
        if projector.num_id_tokens != image_proj.num_tokens:
            raise ValueError(
                f"the ConsistentID projector reads {projector.num_id_tokens} tokens, but image_proj makes "
                f"{image_proj.num_tokens}"
            )
        width = projector.text_model.embeddings.token_embedding.embedding_dim
        if image_proj.cross_attention_dim != width:
            raise ValueError(
                f"image_proj makes {image_proj.cross_attention_dim}-wide tokens; the projector is {width}"
            )
        clip_width = clip_vision.config.hidden_size
        if image_proj.config["clip_embeddings_dim"] != clip_width:
            raise ValueError(
                f"image_proj reads {image_proj.config['clip_embeddings_dim']}-wide CLIP features; the CLIP vision "
                f"model is {clip_width} wide"
            )
        self.image_proj = image_proj
        self.clip_vision = clip_vision
        self.projector = projector
        self.faces = faces
        self.id_cfg_scale = float(id_cfg_scale)
        commas = template_num_commas(ADAFACE_V2, projector.num_id_tokens)  # 6
        self.register_buffer("template_ids", adaface_template_ids(tokenizer, commas), persistent=False)

    @classmethod
    def from_files(
        cls,
        projector: AdaFaceProjector,
        tokenizer: Any,
        *,
        consistentid_weights: str | os.PathLike[str],
        clip_vision_folder: str | os.PathLike[str],
        buffalo_l_folder: str | os.PathLike[str] | None = None,
        dtype: torch.dtype | None = None,
        id_cfg_scale: float = CONSISTENTID_ID_CFG_SCALE,
    ) -> ConsistentIDEncoder:
        """Load ``ConsistentID-v1.bin``, CLIP-ViT-H-14 and (optionally) ``buffalo_l``; see :class:`ConsistentIDEncoder`."""
        image_proj = load_consistentid_image_proj(consistentid_weights, dtype=dtype)
        clip_vision = load_clip_vision(clip_vision_folder, dtype=dtype)
        faces = BuffaloLFaces(buffalo_l_folder) if buffalo_l_folder is not None else None
        encoder = cls(image_proj, clip_vision, projector, tokenizer, faces=faces, id_cfg_scale=id_cfg_scale)
        if dtype is not None:
            encoder.projector.to(dtype)
        return encoder

    @property
    def num_tokens(self) -> int:
        return self.projector.num_id_tokens

    @torch.no_grad()
    def clip_features(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """``(N, 257, C)`` CLIP ``hidden_states[-2]`` of whole RGB photos (:func:`clip_image_pixels`; no mask)."""
        weight = next(self.clip_vision.parameters())
        pixels = torch.cat([clip_image_pixels(image, name=f"image {i}") for i, image in enumerate(images)])
        out = self.clip_vision(pixels.to(device=weight.device, dtype=weight.dtype), output_hidden_states=True)
        return out.hidden_states[-2]

    @torch.no_grad()
    def id_embeddings(self, images: Sequence[np.ndarray]) -> list[np.ndarray | None]:
        """The release's unit buffalo_l embedding of each photo (``None`` where no face is found)."""
        if self.faces is None:
            raise RuntimeError("ConsistentIDEncoder has no buffalo_l models; pass id_embeds or give it faces")
        return [self.faces.embed(image, name=f"image {i}") for i, image in enumerate(images)]

    @torch.no_grad()
    def image_prompt_embeds(self, id_embeds: torch.Tensor, clip_features: torch.Tensor) -> torch.Tensor:
        """``ProjPlusModel`` on unit-normalised ``(B, 512)`` embeddings and ``(B, 257, C)`` features -> ``(B, 4, D)``."""
        weight = next(self.image_proj.parameters())
        id_embeds = F.normalize(id_embeds.to(device=weight.device, dtype=weight.dtype), dim=-1)
        return self.image_proj(id_embeds, clip_features.to(device=weight.device, dtype=weight.dtype))

    @torch.no_grad()
    def ada_embeddings(self, image_prompt_embeds: torch.Tensor, id_cfg_scale: float | None = None) -> torch.Tensor:
        """The projector (template with 6 commas) and ID-CFG: ``(B, 4, D)`` -> ``(B, 4, D)``."""
        projector = self.projector
        weight = projector.text_model.embeddings.token_embedding.weight
        ada = projector(image_prompt_embeds.to(device=weight.device, dtype=weight.dtype), self.template_ids)
        scale = self.id_cfg_scale if id_cfg_scale is None else float(id_cfg_scale)
        return projector.apply_id_cfg(ada, scale) if scale != 1.0 else ada

    @torch.no_grad()
    def forward(
        self,
        images: Sequence[np.ndarray] | np.ndarray,
        *,
        id_embeds: torch.Tensor | np.ndarray | None = None,
        id_cfg_scale: float | None = None,
    ) -> torch.Tensor:
        """``(1, 4, D)`` subject-token embeddings of one person from RGB photo(s), as the release computes them.

        The unit embeddings of the photos with a face are averaged and normalised; the CLIP features of *all*
        photos are averaged (the release computes them before its face check, so faceless photos count there).

        Args:
            images: one ``(H, W, 3)`` uint8 RGB photo or several.
            id_embeds: ``(N, 512)`` or ``(512,)`` buffalo_l embeddings to use instead of detecting faces.
            id_cfg_scale: override of the branch's ID-CFG scale (6).

        Raises:
            NoFaceError: no photo has a face (the release then uses zero embeddings for this branch).
        """
        photos = [images] if isinstance(images, np.ndarray) and images.ndim == 3 else list(images)
        if not photos:
            raise ValueError("images is empty: give at least one face photo")
        if id_embeds is None:
            found = [e for e in self.id_embeddings(photos) if e is not None]
            if not found:
                raise NoFaceError("images", f"no face found by buffalo_l in {len(photos)} photo(s)")
            id_embeds = np.stack(found)
        embeds = torch.as_tensor(np.asarray(id_embeds, dtype=np.float32))
        embeds = embeds[None] if embeds.ndim == 1 else embeds
        if embeds.ndim != 2 or embeds.shape[1] != self.image_proj.config["id_embeddings_dim"]:
            raise ValueError(f"id_embeds must have shape (N, 512), got {tuple(embeds.shape)}")
        if not torch.isfinite(embeds).all() or (embeds.norm(dim=1) < 1e-6).any():
            raise ValueError("id_embeds must be finite and non-zero")
        identity = F.normalize(F.normalize(embeds, dim=-1).mean(dim=0, keepdim=True), dim=-1)  # (1, 512)
        features = self.clip_features(photos).mean(dim=0, keepdim=True)  # (N, 257, C) -> (1, 257, C)
        return self.ada_embeddings(self.image_prompt_embeds(identity, features), id_cfg_scale)


def joint_subject_embeddings(consistentid: torch.Tensor | None, arc2face: torch.Tensor) -> torch.Tensor:
    """The release's joint order: ``(1, 4, D)`` ConsistentID rows, then ``(1, 16, D)`` Arc2Face rows ->
    ``(1, 20, D)`` (token ids ``z_0_0 .. z_0_3, z_1_0 .. z_1_15``). ``consistentid=None`` gives Arc2Face only."""
    if consistentid is None:
        return arc2face
    if consistentid.ndim != 3 or arc2face.ndim != 3 or consistentid.shape[::2] != arc2face.shape[::2]:
        raise ValueError(
            f"branch embeddings must be (B, N, D) with equal B and D; got {tuple(consistentid.shape)} and "
            f"{tuple(arc2face.shape)}"
        )
    return torch.cat([consistentid, arc2face.to(consistentid)], dim=1)


def joint_subject_tokens(subject: str = "z", *, num_consistentid: int = 4, num_arc2face: int = 16) -> list[list[str]]:
    """``[[z_0_0 .. z_0_3], [z_1_0 .. z_1_15]]``: the joint v2 tokens per encoder, in the release's order."""
    return [
        subject_tokens(ADAFACE_V2, num_consistentid, subject=subject, encoder_index=0),
        subject_tokens(ADAFACE_V2, num_arc2face, subject=subject, encoder_index=1),
    ]
