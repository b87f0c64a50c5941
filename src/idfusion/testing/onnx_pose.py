"""Tiny ONNX stand-ins for the two DWPose models, for offline tests of the pose estimator.

:func:`write_dwpose` writes ``yolox_l.onnx`` (a YOLOX-style person detector) and ``dw-ll_ucoco_384.onnx`` (an
RTMPose-style SimCC whole-body model) with the released files' input and output names, shapes and dtypes, so the
whole estimator path (letterbox, grid decoding, NMS, top-down crops, SimCC decoding, OpenPose mapping) runs
without the real 350 MB of weights. Weights are seeded and tiny; the heads are biased so that every photo yields
one confident person with a plausible standing skeleton, which keeps end-to-end tests deterministic.

Both are exported with ``torch.onnx.export``'s default (dynamo) exporter at opset 18.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from .onnx_export import export_onnx, logit

__all__ = [
    "TinyYOLOX",
    "TinyRTMPose",
    "export_tiny_yolox",
    "export_tiny_rtmpose",
    "write_dwpose",
    "TINY_DETECTOR_FILE",
    "TINY_POSE_FILE",
    "TEMPLATE_COCO_BODY",
    "MISSING_COCO_POINT",
]

logger = logging.getLogger(__name__)

TINY_DETECTOR_FILE = "yolox_l.onnx"
TINY_POSE_FILE = "dw-ll_ucoco_384.onnx"


def _first_max_one_hot(values: torch.Tensor) -> torch.Tensor:
    """One-hot of the first position holding the maximum of ``values`` ``(1, 1, h, w)``, same shape."""
    flat = values.flatten(1)  # (1, h*w)
    is_max = (flat == flat.amax(dim=1, keepdim=True)).float()
    return (is_max * (torch.cumsum(is_max, dim=1) == 1).float()).reshape(values.shape)


class TinyYOLOX(nn.Module):
    """A few strided convs with the signature of DWPose's ``yolox_l.onnx``.

    Input ``images``: ``(1, 3, 640, 640)`` float32 raw 0-255 pixels, letterboxed (pad 114). Output ``output``:
    ``(1, 8400, 85)``: anchors of the stride 8, 16 and 32 grids (row-major each), with ``dx, dy, log w, log h``
    raw, then objectness and 80 class probabilities after a sigmoid, as Megvii's export.

    Design, chosen so every photo yields exactly one confident person:

    - One stride-32 cell fires: the one with the strongest crude "skin" cue (green minus blue, plus 0.05 x
      brightness as a tie-breaker), averaged over each 32x32 cell and its 3x3 neighbourhood (first on ties). Its
      objectness is 0.95 and its person probability 0.9, so it scores 0.855; its box is centred on the cell,
      192 x 288 pixels (6 x 9 strides, from the bias) plus a small seeded random term.
    - A duplicate fires at stride 16, in the top-left quarter of that cell: objectness 0.6 (score 0.54), the same
      box size, centre 8 pixels up and left (IoU 0.87), so NMS at 0.45 must drop it.
    - Every other anchor has objectness about 1e-8.

    Args:
        seed: seeds the backbone and the heads' small random weights.
    """

    strides = (8, 16, 32)
    num_classes = 80
    box_cells = {8: (24.0, 36.0), 16: (12.0, 18.0), 32: (6.0, 9.0)}  # (w, h) in strides: 192 x 288 pixels

    def __init__(self, seed: int = 0):
        super().__init__()
        channels = 8
        outputs = 5 + self.num_classes
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.stem = nn.Sequential(  # stride 8
                nn.Conv2d(3, channels, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(channels, channels, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(channels, channels, 3, stride=2, padding=1),
                nn.ReLU(),
            )
            self.down16 = nn.Sequential(nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.ReLU())
            self.down32 = nn.Sequential(nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.ReLU())
            self.heads = nn.ModuleList(nn.Conv2d(channels, outputs, 1) for _ in self.strides)
        with torch.no_grad():
            for head, stride in zip(self.heads, self.strides, strict=True):
                head.weight.mul_(0.01)
                bias = torch.full((outputs,), logit(0.01))
                w_cells, h_cells = self.box_cells[stride]
                bias[:4] = torch.tensor([0.5, 0.5, math.log(w_cells), math.log(h_cells)])
                bias[4] = logit({8: 1e-8, 16: 0.6, 32: 0.95}[stride])
                bias[5] = logit(0.9)
                head.bias.copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f8 = self.stem(x / 255.0)
        f16 = self.down16(f8)
        f32 = self.down32(f16)

        cue = (x[:, 1:2] - x[:, 2:3] + 0.05 * x.mean(dim=1, keepdim=True)) / 255.0  # (1, 1, H, W)
        cue = F.avg_pool2d(cue, 32)  # (1, 1, H/32, W/32)
        cue = F.avg_pool2d(cue, 3, stride=1, padding=1, count_include_pad=False)
        winner32 = _first_max_one_hot(cue)
        # The winner's top-left quarter at stride 16 carries the duplicate.
        winner16 = _first_max_one_hot(F.interpolate(winner32, scale_factor=2.0, mode="nearest"))
        masks = {16: winner16, 32: winner32}

        rows = []
        for head, stride, feat in zip(self.heads, self.strides, (f8, f16, f32), strict=True):
            out = head(feat)  # (1, 85, h, w)
            if stride in masks:
                # Objectness logit: unchanged at the firing cell, -20 elsewhere.
                offset = 20.0 * (masks[stride] - 1.0)  # (1, 1, h, w)
                out = torch.cat([out[:, :4], out[:, 4:5] + offset, out[:, 5:]], dim=1)
            rows.append(out.permute(0, 2, 3, 1).reshape(1, -1, out.shape[1]))  # (1, 85, h, w) -> (1, h*w, 85)
        raw = torch.cat(rows, dim=1)  # (1, 8400, 85)
        return torch.cat([raw[..., :4], torch.sigmoid(raw[..., 4:])], dim=-1)


# A standing person facing the camera, COCO-17 order, in (x, y) fractions of the 288 x 384 crop; the person's
# left is the image's right.
TEMPLATE_COCO_BODY = (
    (0.50, 0.22), (0.53, 0.20), (0.47, 0.20), (0.56, 0.21), (0.44, 0.21), (0.62, 0.32), (0.38, 0.32),
    (0.67, 0.45), (0.33, 0.45), (0.69, 0.57), (0.31, 0.57), (0.56, 0.58), (0.44, 0.58), (0.57, 0.73),
    (0.43, 0.73), (0.57, 0.87), (0.43, 0.87),
)  # fmt: skip
# This COCO point (the left ear) peaks at 0.1 only, below the drawing threshold.
MISSING_COCO_POINT = 3
_FEET = ((0.59, 0.89), (0.61, 0.89), (0.56, 0.88), (0.41, 0.89), (0.39, 0.89), (0.44, 0.88))


def _template_wholebody() -> torch.Tensor:
    """``(133, 2)`` crop fractions: body, feet, a face ring, then the left and right hands fanning downwards."""
    points = [*TEMPLATE_COCO_BODY, *_FEET]
    for i in range(68):
        angle = 2 * math.pi * i / 68
        points.append((0.50 + 0.05 * math.cos(angle), 0.22 + 0.04 * math.sin(angle)))
    for wrist, side in ((TEMPLATE_COCO_BODY[9], 1.0), (TEMPLATE_COCO_BODY[10], -1.0)):
        points.append(wrist)
        for finger in range(5):
            angle = math.radians(60 + 15 * finger)
            for joint in range(1, 5):
                reach = 0.025 * joint + 0.015
                points.append((wrist[0] + side * reach * math.cos(angle), wrist[1] + reach * math.sin(angle)))
    return torch.tensor(points, dtype=torch.float32)


class TinyRTMPose(nn.Module):
    """An RTMPose-style SimCC model with the signature of DWPose's ``dw-ll_ucoco_384.onnx``.

    Input ``input``: ``(N, 3, 384, 288)`` float32, normalised with mmpose's ImageNet mean/std. Outputs
    ``simcc_x`` ``(N, 133, 576)`` and ``simcc_y`` ``(N, 133, 768)`` (2 bins per crop pixel).

    Each keypoint's SimCC vectors are Gaussians (sigma 4 bins) peaking at 0.8 at a fixed template (a standing
    person filling the crop like a padded person box does, :data:`TEMPLATE_COCO_BODY`), shifted by up to 3 bins by
    a seeded random function of the crop; :data:`MISSING_COCO_POINT` peaks at 0.1 only.

    Args:
        seed: seeds the weights.
        input_hw: crop ``(height, width)``.
    """

    num_keypoints = 133
    split_ratio = 2

    def __init__(self, seed: int = 0, input_hw: tuple[int, int] = (384, 288)):
        super().__init__()
        height, width = input_hw
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.features = nn.Sequential(
                nn.Conv2d(3, 8, 3, stride=4, padding=1),
                nn.ReLU(),
                nn.Conv2d(8, 8, 3, stride=4, padding=1),
                nn.ReLU(),
            )
            self.shift = nn.Linear(8, self.num_keypoints * 2)
        with torch.no_grad():
            self.shift.weight.mul_(0.1)
        bins = torch.tensor([width * self.split_ratio, height * self.split_ratio], dtype=torch.float32)
        self.register_buffer("centres", _template_wholebody() * bins)  # (133, 2) in bins
        amplitude = torch.full((self.num_keypoints,), 0.8)
        amplitude[MISSING_COCO_POINT] = 0.1
        self.register_buffer("amplitude", amplitude)
        self.register_buffer("bins_x", torch.arange(width * self.split_ratio, dtype=torch.float32))
        self.register_buffer("bins_y", torch.arange(height * self.split_ratio, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.features(x).mean(dim=(2, 3))  # (N, 8)
        shift = 3.0 * torch.tanh(self.shift(pooled)).reshape(-1, self.num_keypoints, 2)  # (N, 133*2) -> (N, 133, 2)
        centres = self.centres + shift  # (N, 133, 2)
        sigma = 4.0
        amplitude = self.amplitude[None, :, None]
        simcc_x = amplitude * torch.exp(-0.5 * ((self.bins_x - centres[..., 0:1]) / sigma) ** 2)  # (N, 133, 576)
        simcc_y = amplitude * torch.exp(-0.5 * ((self.bins_y - centres[..., 1:2]) / sigma) ** 2)  # (N, 133, 768)
        return simcc_x, simcc_y


def export_tiny_yolox(path: str | Path, *, seed: int = 0) -> Path:
    """Export :class:`TinyYOLOX` (static ``(1, 3, 640, 640)`` input) to ``path``; returns the path."""
    return export_onnx(TinyYOLOX(seed), torch.zeros(1, 3, 640, 640), Path(path), "images", ["output"], {})


def export_tiny_rtmpose(path: str | Path, *, seed: int = 0, dynamic_batch: bool = False) -> Path:
    """Export :class:`TinyRTMPose` to ``path``; returns the path.

    Args:
        path: output ``.onnx`` file.
        seed: seeds the weights.
        dynamic_batch: export a dynamic batch dimension; by default the batch is fixed to 1, as the annotator
            feeds one crop at a time.
    """
    module = TinyRTMPose(seed)
    if dynamic_batch:
        example, dynamic = torch.zeros(2, 3, 384, 288), {0: torch.export.Dim.DYNAMIC}
    else:
        example, dynamic = torch.zeros(1, 3, 384, 288), {}
    return export_onnx(module, example, Path(path), "input", ["simcc_x", "simcc_y"], dynamic)


def write_dwpose(folder: str | Path, seed: int = 0) -> list[Path]:
    """Write a tiny stand-in for the DWPose model folder.

    Args:
        folder: folder to write into (created if missing).
        seed: seeds both models.

    Returns:
        The paths of ``yolox_l.onnx`` and ``dw-ll_ucoco_384.onnx``, the released file names.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return [
        export_tiny_yolox(folder / TINY_DETECTOR_FILE, seed=seed),
        export_tiny_rtmpose(folder / TINY_POSE_FILE, seed=seed),
    ]
