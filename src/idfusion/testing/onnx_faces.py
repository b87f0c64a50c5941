"""Tiny ONNX face models with the signatures of the real antelopev2 files, for offline smoke tests.

:func:`write_tiny_antelopev2` writes ``scrfd_10g_bnkps.onnx`` (an SCRFD-style detector) and ``arcface.onnx`` (an
ArcFace-style recognizer) into a folder, so the whole ONNX face path (model discovery, detection, alignment,
embedding) can run on any machine without downloading the real 280 MB of weights. The models have seeded random
weights: their outputs are deterministic and well-formed but carry no identity information.

The random detector would "find" a face in any image (a plain blue one too), so it is marked as a stand-in in its
ONNX metadata (``idfusion.faces.stand_in.STAND_IN_KEY``), and the face path detects with
``idfusion.faces.stand_in.StandInDetector`` instead: real detectors, dlib's HOG for photos and the world detector for world renders,
so a picture without a face is refused as real models refuse it.

Both are exported with ``torch.onnx.export``'s default (dynamo) exporter at opset 18.
"""

from __future__ import annotations

import functools
import logging
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ..faces.align import ARCFACE_TEMPLATE
from .onnx_export import export_onnx, logit

__all__ = [
    "TinySCRFD",
    "TinyArcFace",
    "export_tiny_scrfd",
    "export_tiny_arcface",
    "write_tiny_antelopev2",
    "TINY_DETECTOR_FILE",
    "TINY_RECOGNIZER_FILE",
]

logger = logging.getLogger(__name__)

TINY_DETECTOR_FILE = "scrfd_10g_bnkps.onnx"
TINY_RECOGNIZER_FILE = "arcface.onnx"


class TinySCRFD(nn.Module):
    """A few strided convs with SCRFD-10G's exact input/output signature.

    Input ``input.1``: ``(1, 3, H, W)`` with ``H`` and ``W`` multiples of 32, normalised as SCRFD expects.
    Outputs, in the real model's order: ``score_8, score_16, score_32`` ``(1, H/s * W/s * 2, 1)`` (sigmoid
    probabilities), ``bbox_8, bbox_16, bbox_32`` ``(1, ..., 4)`` and ``kps_8, kps_16, kps_32`` ``(1, ..., 10)``
    (distances in units of the stride), rows ordered (feature row, feature column, anchor).

    Design, chosen so a detector returns one deterministic, plausibly placed face on any photo:

    - Strides 8 and 16 never fire: their score heads have zero weights and a bias giving a constant 0.1.
    - At stride 32 exactly one cell fires: the one with the strongest crude "skin" cue, green minus blue (high on
      skin, near 0 on red curtains, grey and white, negative on blue) plus 0.05 x brightness as a tie-breaker for
      grey images, averaged over each 32x32 cell and then over its 3x3 neighbourhood (first cell on exact ties).
      Its anchors score exactly 0.6 (anchor 0) and 0.55 (anchor 1); every other anchor scores about 1e-9.
    - Boxes are centred on their anchor: half-size 2 strides for anchor 0 and 3 strides for anchor 1 (bias), plus
      a small seeded random term from the backbone. The two boxes overlap with IoU 0.44, so NMS at 0.4 keeps the
      anchor-0 box only.
    - Keypoints are the ArcFace template mapped into that box (bias), so aligning a detection crops the box.

    On ``obama.jpg`` the box lands on the face; on other photos it lands on the most skin-coloured area.

    Args:
        seed: seeds the backbone and the heads' small random weights.
    """

    strides = (8, 16, 32)
    num_anchors = 2
    output_names = tuple(f"{kind}_{s}" for kind in ("score", "bbox", "kps") for s in (8, 16, 32))

    def __init__(self, seed: int = 0):
        super().__init__()
        a = self.num_anchors
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.stem = nn.Sequential(  # stride 8
                nn.Conv2d(3, 8, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(8, 16, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(16, 16, 3, stride=2, padding=1),
                nn.ReLU(),
            )
            self.down16 = nn.Sequential(nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU())
            self.down32 = nn.Sequential(nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU())
            self.score_heads = nn.ModuleList(nn.Conv2d(16, a, 1) for _ in self.strides)
            self.bbox_heads = nn.ModuleList(nn.Conv2d(16, 4 * a, 1) for _ in self.strides)
            self.kps_heads = nn.ModuleList(nn.Conv2d(16, 10 * a, 1) for _ in self.strides)

        half_sizes = (2.0, 3.0)  # box half-size per anchor, in strides
        # ArcFace template (112x112 crop) mapped onto a box [-1, 1]^2 around the anchor centre.
        unit_face = (ARCFACE_TEMPLATE.astype("float64") - 56.0) / 56.0  # (5, 2)
        with torch.no_grad():
            for i, stride in enumerate(self.strides):
                self.score_heads[i].weight.zero_()
                if stride == 32:
                    self.score_heads[i].bias.copy_(torch.tensor([logit(0.6), logit(0.55)]))
                else:
                    self.score_heads[i].bias.fill_(logit(0.1))
                self.bbox_heads[i].weight.mul_(0.01)
                self.bbox_heads[i].bias.copy_(torch.tensor([h for h in half_sizes for _ in range(4)]))
                self.kps_heads[i].weight.mul_(0.01)
                kps = [float(v) * h for h in half_sizes for v in unit_face.reshape(-1)]
                self.kps_heads[i].bias.copy_(torch.tensor(kps))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        f8 = self.stem(x)
        f16 = self.down16(f8)
        f32 = self.down32(f16)
        feats = (f8, f16, f32)

        # SCRFD's input is RGB (x - 127.5) / 128, so channel differences and means are in that scale.
        cue = x[:, 1:2] - x[:, 2:3] + 0.05 * x.mean(dim=1, keepdim=True)  # (1, 1, H, W)
        cue = F.avg_pool2d(cue, 32)  # (1, 1, H/32, W/32): one value per stride-32 cell
        cue = F.avg_pool2d(cue, 3, stride=1, padding=1, count_include_pad=False)
        flat = cue.flatten(1)  # (1, h*w)
        is_max = (flat == flat.amax(dim=1, keepdim=True)).float()
        first_max = is_max * (torch.cumsum(is_max, dim=1) == 1).float()  # one-hot: first cell holding the max
        winner = 20.0 * (first_max.reshape(cue.shape) - 1.0)  # logit offset: 0 at the winner, -20 elsewhere

        scores, boxes, kps = [], [], []
        for i, feat in enumerate(feats):
            logits = self.score_heads[i](feat)  # (1, A, h, w)
            if self.strides[i] == 32:
                logits = logits + winner
            # (1, A*C, h, w) -> (1, h, w, A*C) -> (1, h*w*A, C): the real model's row order.
            scores.append(torch.sigmoid(logits).permute(0, 2, 3, 1).reshape(1, -1, 1))
            boxes.append(self.bbox_heads[i](feat).permute(0, 2, 3, 1).reshape(1, -1, 4))
            kps.append(self.kps_heads[i](feat).permute(0, 2, 3, 1).reshape(1, -1, 10))
        return (*scores, *boxes, *kps)


class TinyArcFace(nn.Module):
    """Three strided convs, global average pooling and a linear layer: ArcFace's signature with random weights.

    Input ``input.1``: ``(N, 3, 112, 112)`` RGB, dynamic batch. Output: ``(N, embedding_dim)``.

    Args:
        seed: seeds the weights.
        embedding_dim: output size (512 like the real models).
        normalize_in_graph: start the graph with ``(x - 127.5) * (1 / 127.5)`` (a ``Sub`` and a ``Mul`` node), as
            the MXNet-converted ArcFace models do; the model then takes raw 0-255 pixels.
    """

    def __init__(self, seed: int = 0, *, embedding_dim: int = 512, normalize_in_graph: bool = False):
        super().__init__()
        self.normalize_in_graph = normalize_in_graph
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.features = nn.Sequential(
                nn.Conv2d(3, 16, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(16, 32, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(32, 64, 3, stride=2, padding=1),
                nn.ReLU(),
            )
            self.fc = nn.Linear(64, embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize_in_graph:
            x = (x - 127.5) * (1.0 / 127.5)
        x = self.features(x)  # (N, 64, 14, 14)
        return self.fc(x.mean(dim=(2, 3)))  # (N, 64) -> (N, embedding_dim)


def export_tiny_scrfd(path: str | Path, *, seed: int = 0) -> Path:
    """Export :class:`TinySCRFD` to ``path`` with dynamic height and width, marked as a stand-in; returns the path."""
    import onnx

    from idfusion.faces.stand_in import STAND_IN_KEY, STAND_IN_VALUE

    dim = torch.export.Dim.DYNAMIC
    example = torch.zeros(1, 3, 128, 160)
    path = export_onnx(TinySCRFD(seed), example, Path(path), "input.1", list(TinySCRFD.output_names), {2: dim, 3: dim})
    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, {STAND_IN_KEY: STAND_IN_VALUE})
    onnx.save(model, str(path))
    return path


def export_tiny_arcface(
    path: str | Path, *, seed: int = 0, normalize_in_graph: bool = False, dynamic_batch: bool = True
) -> Path:
    """Export :class:`TinyArcFace` to ``path``; returns the path.

    Args:
        path: output ``.onnx`` file.
        seed: seeds the weights.
        normalize_in_graph: see :class:`TinyArcFace`.
        dynamic_batch: export a dynamic batch dimension; ``False`` fixes it to 1, like some older exports.
    """
    module = TinyArcFace(seed, normalize_in_graph=normalize_in_graph)
    if dynamic_batch:
        return export_onnx(
            module, torch.zeros(2, 3, 112, 112), Path(path), "input.1", ["embedding"], {0: torch.export.Dim.DYNAMIC}
        )
    return export_onnx(module, torch.zeros(1, 3, 112, 112), Path(path), "input.1", ["embedding"], {})


def write_tiny_antelopev2(out_dir: Path, *, seed: int = 0) -> list[Path]:
    """Write a tiny stand-in for the Arc2Face face-model folder.

    Args:
        out_dir: folder to write into (created if missing).
        seed: seeds both models.

    Returns:
        The paths of ``scrfd_10g_bnkps.onnx`` and ``arcface.onnx``, the file names of the antelopev2 detector and
        of Arc2Face's recognizer.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in _antelopev2_files(seed):
        (out_dir / name).write_bytes(data)
        written.append(out_dir / name)
    return written


@functools.lru_cache(maxsize=2)
def _antelopev2_files(seed: int) -> tuple[tuple[str, bytes], ...]:
    # Every tiny release holds these; exporting costs seconds, the bytes 350 KB, so a process exports each seed once.
    tmp = Path(tempfile.mkdtemp(prefix="idfusion-antelopev2-"))
    try:
        paths = [
            export_tiny_scrfd(tmp / TINY_DETECTOR_FILE, seed=seed),
            export_tiny_arcface(tmp / TINY_RECOGNIZER_FILE, seed=seed),
        ]
        return tuple((path.name, path.read_bytes()) for path in paths)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
