"""The world face models' networks (torch) and their safetensors files.

- :class:`DetectorNet`: two stages, as in MTCNN (Zhang et al. 2016). :class:`ProposalNet` is CenterNet-style
  (Zhou et al. 2019, "Objects as Points") on a 64x64 input: a stride-4 heatmap of face centres with the box at each
  cell. :class:`RefineNet` re-reads a 40x40 square crop around each proposal and gives a face / not-face score, a
  refined box and the 5 + 68 landmarks; its score is the detection score.
- :class:`RecognizerNet`: a small residual CNN on an ArcFace-aligned crop, ending in MobileFaceNet's global
  depthwise convolution and a 512-d embedding (Chen et al. 2018), trained with :class:`ArcMarginLoss`
  (Deng et al. 2019, "ArcFace", eq. 3).
- :class:`AttributeNet`: three small CNN branches: the whole image (background colour and pattern), a context crop
  around each face (hat, shirt) and the aligned face crop (glasses, expression).

A weights file stores the architecture's config in its safetensors metadata (``"config"``, JSON), so a file is
self-describing and :func:`load_net` needs nothing else.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DetectorNet",
    "ProposalNet",
    "RefineNet",
    "RecognizerNet",
    "AttributeNet",
    "ArcMarginLoss",
    "DETECTOR_INPUT",
    "DETECTOR_STRIDE",
    "save_net",
    "load_net",
]

DETECTOR_INPUT = 64
DETECTOR_STRIDE = 4
# ProposalNet channels: heatmap logit, log width and height (relative to the input side), box centre offset from
# the cell centre (in face widths). RefineNet outputs: score logit, box (4), 5 landmarks (10), 68 landmarks (136),
# all in crop sides relative to the crop centre.
PROPOSAL_CHANNELS = 5
REFINE_OUTPUTS = 151


def _conv(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class _Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.body(x))


class ProposalNet(nn.Module):
    """Face centre heatmap and boxes: ``(B, 3, 64, 64)`` in ``[0, 1]`` -> ``(B, 5, 16, 16)``."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv(3, 24, stride=2),  # 32x32
            _conv(24, width, stride=2),  # 16x16
            _conv(width, width),
            _conv(width, width, dilation=2),
            _conv(width, width, dilation=4),  # receptive field ~70 px: a whole single-person face
            _conv(width, width, dilation=2),
            _conv(width, width),
        )
        self.head = nn.Conv2d(width, PROPOSAL_CHANNELS, 1)
        with torch.no_grad():
            # Start with a low face prior (CenterNet's -2.19) so the focal loss is not swamped by background cells.
            self.head.bias.zero_()
            self.head.bias[0] = -2.19

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x - 0.5))


class RefineNet(nn.Module):
    """Score, box and landmarks of one candidate: ``(B, 3, side, side)`` crop in ``[0, 1]`` -> ``(B, 151)``."""

    def __init__(self, widths: tuple[int, int, int] = (16, 32, 64), hidden: int = 192, side: int = 40) -> None:
        super().__init__()
        a, b, c = widths
        self.features = nn.Sequential(
            _conv(3, a),
            _conv(a, b, stride=2),  # side / 2
            _conv(b, b),
            _conv(b, c, stride=2),  # side / 4
            _conv(c, c),
            _conv(c, c, stride=2),  # side / 8
        )
        for _ in range(3):  # each stride-2 convolution (padding 1) gives ceil(n / 2)
            side = (side + 1) // 2
        cells = side * side
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(c * cells, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, REFINE_OUTPUTS)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x - 0.5))


class DetectorNet(nn.Module):
    """The world detector's two stages in one module (one weights file)."""

    def __init__(
        self,
        width: int = 32,
        refine_widths: tuple[int, ...] = (16, 32, 64),
        hidden: int = 192,
        refine_side: int = 40,
        refine_margin: float = 1.2,
    ) -> None:
        super().__init__()
        # The refine crop is a square of refine_margin longer box sides, resized to refine_side pixels; both are
        # stored so crops always match the weights.
        self.config = {
            "kind": "detector",
            "width": width,
            "refine_widths": list(refine_widths),
            "hidden": hidden,
            "refine_side": refine_side,
            "refine_margin": refine_margin,
        }
        self.refine_side = refine_side
        self.refine_margin = refine_margin
        self.proposal = ProposalNet(width)
        self.refine = RefineNet(tuple(refine_widths), hidden, refine_side)


class RecognizerNet(nn.Module):
    """A ``(B, 3, crop, crop)`` aligned face in ``[0, 1]`` -> ``(B, 512)`` embedding (not normalised).

    Args:
        widths: channels of the four stride-2 stages.
        blocks: residual blocks after each stage's strided convolution.
        crop: input side (the aligned crop the recognizer was trained on).
    """

    def __init__(
        self,
        widths: tuple[int, ...] = (24, 48, 96, 128),
        blocks: tuple[int, ...] = (1, 1, 1, 1),
        crop: int = 56,
        dim: int = 512,
    ) -> None:
        super().__init__()
        self.config = {"kind": "recognizer", "widths": list(widths), "blocks": list(blocks), "crop": crop, "dim": dim}
        layers: list[nn.Module] = []
        cin = 3
        for width, count in zip(widths, blocks, strict=True):
            layers.append(_conv(cin, width, stride=2))
            layers.extend(_Residual(width) for _ in range(count))
            cin = width
        self.features = nn.Sequential(*layers)
        side = crop
        for _ in widths:
            side = (side + 1) // 2
        # Global depthwise convolution: a learned weighting of every position instead of average pooling, which
        # keeps where in the face a feature is (MobileFaceNet's GDC).
        self.gdc = nn.Sequential(nn.Conv2d(cin, cin, side, groups=cin, bias=False), nn.BatchNorm2d(cin))
        self.embedding = nn.Sequential(nn.Dropout(0.1), nn.Linear(cin, dim, bias=False), nn.BatchNorm1d(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.gdc(self.features(x - 0.5)).flatten(1)  # (B, C, 1, 1) -> (B, C)
        return self.embedding(x)


class ArcMarginLoss(nn.Module):
    """Additive angular margin loss: cross-entropy on ``s * cos(theta + m)`` for the true class (ArcFace eq. 3)."""

    def __init__(self, dim: int, classes: int, scale: float = 32.0, margin: float = 0.4) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(classes, dim) * 0.01)
        self.scale = scale
        self.margin = margin

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, margin: float | None = None) -> torch.Tensor:
        margin = self.margin if margin is None else margin
        cos = F.linear(F.normalize(embeddings), F.normalize(self.weight)).clamp(-1 + 1e-6, 1 - 1e-6)  # (B, classes)
        theta = torch.acos(cos.gather(1, labels[:, None]))
        # Past pi - m, cos(theta + m) would rise again; fall back to a linear penalty there (insightface's choice).
        target = torch.where(
            theta + margin < torch.pi, torch.cos(theta + margin), cos.gather(1, labels[:, None]) - margin
        )
        logits = cos.scatter(1, labels[:, None], target) * self.scale
        return F.cross_entropy(logits, labels)


class AttributeNet(nn.Module):
    """Attribute logits from three inputs (all ``[0, 1]``): the image at 32x32, a 32x32 context crop around the face
    and the 48x48 aligned face crop. ``heads`` maps each attribute to its number of classes and its input."""

    def __init__(self, heads: dict[str, list] | None = None, width: int = 32) -> None:
        super().__init__()
        heads = heads or {
            "background": [8, "scene"],
            "pattern": [4, "scene"],
            "hat": [9, "context"],
            "clothing": [8, "context"],
            "glasses": [3, "face"],
            "expression": [4, "face"],
        }
        self.config = {"kind": "attributes", "heads": heads, "width": width}

        def branch() -> nn.Sequential:
            layers, cin = [], 3
            for _ in range(3):  # 32 -> 4 and 48 -> 6 pixels, then a 2x2 pooled grid keeps coarse layout
                layers += [_conv(cin, width), _conv(width, width, stride=2)]
                cin = width
            return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(2), nn.Flatten())  # (B, width * 4)

        self.branches = nn.ModuleDict({"scene": branch(), "context": branch(), "face": branch()})
        self.heads = nn.ModuleDict({name: nn.Linear(width * 4, count) for name, (count, _) in heads.items()})
        self.inputs = {name: source for name, (_, source) in heads.items()}

    def forward(
        self, scene: torch.Tensor | None = None, context: torch.Tensor | None = None, face: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Logits of the heads whose input is given (scene attributes come per image, person ones per face)."""
        given = {"scene": scene, "context": context, "face": face}
        features = {name: self.branches[name](x - 0.5) for name, x in given.items() if x is not None}
        return {
            name: head(features[self.inputs[name]])
            for name, head in self.heads.items()
            if self.inputs[name] in features
        }


_KINDS = {"detector": DetectorNet, "recognizer": RecognizerNet, "attributes": AttributeNet}


def save_net(net: nn.Module, path: str | os.PathLike, extra: dict | None = None, *, half: bool = False) -> Path:
    """Write ``net``'s weights and config as safetensors, atomically.

    Args:
        net: a world network (it has a ``config`` dict).
        path: target file.
        extra: more JSON metadata stored beside the config (e.g. a chosen threshold).
        half: store floating tensors as float16 (halves the file; loading casts back to float32).
    """
    from safetensors.torch import save

    from ..images import atomic_write_bytes

    state = {}
    for key, value in net.state_dict().items():
        value = value.detach().cpu().contiguous()
        if half and value.is_floating_point() and "running_var" not in key:
            value = value.half()
        state[key] = value
    metadata = {"config": json.dumps(net.config), "extra": json.dumps(extra or {})}
    return atomic_write_bytes(path, save(state, metadata=metadata))


def load_net(path: str | os.PathLike) -> tuple[nn.Module, dict]:
    """Load a world network from safetensors; returns the network (eval mode, float32) and its ``extra`` metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - safe_open is not a dict
    if "config" not in metadata:
        raise ValueError(f"{path}: not a world network file (no config in its metadata)")
    config = json.loads(metadata["config"])
    kind = config.pop("kind")
    if kind == "recognizer":
        config = {**config, "widths": tuple(config["widths"]), "blocks": tuple(config["blocks"])}
    if kind == "detector":
        config = {**config, "refine_widths": tuple(config["refine_widths"])}
    net = _KINDS[kind](**config)
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return net.eval(), json.loads(metadata.get("extra", "{}"))
