"""The world face models as :class:`~idfusion.faces.types.FaceDetector` / ``FaceRecognizer`` backends.

``FaceAnalyzer("world", "world")`` uses :class:`WorldDetector` and the conditioning :class:`WorldRecognizer`;
``FaceAnalyzer("world", "world-judge")`` the independent judge used only for scoring. Weights ship in
``idfusion/world/weights`` (see its ``MANIFEST.json``); torch is imported when a model is first built.
"""

from __future__ import annotations

import logging
import os
from functools import cache
from pathlib import Path

import numpy as np

from ..errors import ModelFilesError
from ..faces.types import Detection
from .crops import RECOGNIZER_CROPS, detector_input, recognizer_crop

__all__ = ["weights_dir", "weights_path", "WorldDetector", "WorldRecognizer", "WEIGHT_FILES"]

logger = logging.getLogger(__name__)

WEIGHT_FILES = {
    "detector": "detector.safetensors",
    "world": "recognizer.safetensors",
    "world-judge": "judge.safetensors",
    "attributes": "attributes.safetensors",
}


def weights_dir() -> Path:
    """The folder of the shipped world weights (inside the installed package)."""
    return Path(__file__).resolve().parent / "weights"


def weights_path(model: str, folder: str | os.PathLike | None = None) -> Path:
    """Path of a world weights file: ``model`` is ``"detector"``, ``"world"``, ``"world-judge"`` or ``"attributes"``."""
    if model not in WEIGHT_FILES:
        raise ValueError(f"unknown world model {model!r}; one of {', '.join(WEIGHT_FILES)}")
    path = Path(folder or weights_dir()) / WEIGHT_FILES[model]
    if not path.is_file():
        raise ModelFilesError(
            f"world model file missing: {path} (train it with python -m idfusion.world.train_faces --out {path.parent})"
        )
    return path


@cache
def _load(path: str, mtime: float):
    # Cached by path and modification time: a retrained file is picked up, an unchanged one is loaded once.
    from .nets import load_net

    return load_net(path)


def _net(path: Path):
    return _load(str(path), path.stat().st_mtime)


def _to_tensor(images: np.ndarray):
    import torch

    # (N, H, W, 3) uint8 -> (N, 3, H, W) float in [0, 1]. contiguous(): a permuted tensor is channels-last in
    # memory, and CPU convolutions on channels-last input run about 10x slower here.
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous().float().div_(255.0)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow for large |x|, unlike 1 / (1 + exp(-x))


def _nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> list[int]:
    order = np.argsort(-scores)
    keep: list[int] = []
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    while order.size:
        i = order[0]
        keep.append(int(i))
        xx1 = np.maximum(boxes[i, 0], boxes[order[1:], 0])
        yy1 = np.maximum(boxes[i, 1], boxes[order[1:], 1])
        xx2 = np.minimum(boxes[i, 2], boxes[order[1:], 2])
        yy2 = np.minimum(boxes[i, 3], boxes[order[1:], 3])
        inter = np.clip(xx2 - xx1, 0, None) * np.clip(yy2 - yy1, 0, None)
        overlap = inter / (areas[i] + areas[order[1:]] - inter + 1e-9)
        order = order[1:][overlap < iou]
    return keep


class WorldDetector:
    """The world face detector: boxes, 5 ArcFace-order landmarks and 68 dlib-layout landmarks.

    Two stages: proposals from the image fitted into 64x64, then each proposal's square crop (read from the
    full-resolution image) is scored and its box and landmarks regressed, twice (the second pass re-centres on the
    first pass's box). The score is the second pass's face probability.

    Args:
        weights (`str`, *optional*): a ``detector.safetensors``; defaults to the shipped file.
        score_threshold (`float`, *optional*): face probability to accept a detection; defaults to the value stored
            with the weights (chosen from the scores observed on faces and on faceless images).
    """

    name = "world-detector"
    # The smallest face the world draws (three people in a 64x64 image) is about 11 px wide; FaceAnalyzer reads this
    # as its default minimum face size instead of 32.
    min_face_size = 8

    def __init__(self, weights: str | os.PathLike | None = None, *, score_threshold: float | None = None) -> None:
        path = Path(weights) if weights is not None else weights_path("detector")
        self._net, extra = _net(path)
        self.score_threshold = float(extra.get("score_threshold", 0.5) if score_threshold is None else score_threshold)
        self.proposal_threshold = float(extra.get("proposal_threshold", 0.1))

    def detect(self, image: np.ndarray) -> list[Detection]:
        """Faces in an RGB ``uint8`` ``(H, W, 3)`` image, highest score first."""
        return self.detect_batch([image])[0]

    def propose(self, images: list[np.ndarray], threshold: float | None = None) -> list[np.ndarray]:
        """First stage: ``(K, 5)`` boxes ``x1, y1, x2, y2, heat`` per image, in the image's pixels."""
        import torch

        from .nets import DETECTOR_STRIDE

        threshold = self.proposal_threshold if threshold is None else threshold
        fitted = [detector_input(np.asarray(image, dtype=np.uint8)) for image in images]
        with torch.no_grad():
            out = self._net.proposal(_to_tensor(np.stack([f[0] for f in fitted]))).numpy()  # (N, 5, 16, 16)
        heat = _sigmoid(out[:, 0])  # (N, 16, 16)
        padded = np.pad(heat, ((0, 0), (1, 1), (1, 1)), constant_values=0.0)
        # A peak is a cell at least as high as its 8 neighbours (CenterNet's max-pool NMS).
        windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(1, 2))  # (N, 16, 16, 3, 3)
        peaks = (heat >= windows.max(axis=(-1, -2))) & (heat >= threshold)
        proposals = []
        for n, (_, scale) in enumerate(fitted):
            rows, cols = np.nonzero(peaks[n])
            cells = np.stack([(cols + 0.5) * DETECTOR_STRIDE - 0.5, (rows + 0.5) * DETECTOR_STRIDE - 0.5], -1)
            v = out[n][:, rows, cols].T  # (K, 5)
            size = np.exp(v[:, 1:3]) * 64  # (K, 2) width, height
            center = cells + v[:, 3:5] * size[:, :1]
            boxes = np.concatenate([center - size / 2, center + size / 2], -1)  # (K, 4) in input pixels
            boxes = (boxes + 0.5) / scale - 0.5
            proposals.append(np.concatenate([boxes, heat[n, rows, cols][:, None]], -1).astype(np.float32))
        return proposals

    def refine(self, images: list[np.ndarray], boxes: list[np.ndarray]) -> list[np.ndarray]:
        """Second stage: per image, ``(K, 151)`` rows of score, box (4), 5 and 68 landmarks (flattened), in pixels."""
        import torch

        from .crops import refine_crop, refine_square

        margin = self._net.refine_margin
        squares = [[refine_square(box, margin) for box in image_boxes] for image_boxes in boxes]
        side = self._net.refine_side
        crops = [refine_crop(images[n], sq, side) for n, image_squares in enumerate(squares) for sq in image_squares]
        if not crops:
            return [np.zeros((0, 151), np.float32) for _ in images]
        with torch.no_grad():
            out = self._net.refine(_to_tensor(np.stack(crops))).numpy()  # (sum K, 151)
        results, start = [], 0
        for image_squares in squares:
            rows = out[start : start + len(image_squares)].copy()
            start += len(image_squares)
            sq = np.array(image_squares, dtype=np.float32).reshape(-1, 3)  # (K, 3) cx, cy, side
            rows[:, 0] = _sigmoid(rows[:, 0])
            points = rows[:, 1:].reshape(-1, 75, 2)  # (K, 150) -> (K, 75, 2): box corners, then landmarks
            rows[:, 1:] = (points * sq[:, None, 2:3] + sq[:, None, :2]).reshape(-1, 150)
            results.append(rows)
        return results

    def detect_batch(self, images: list[np.ndarray]) -> list[list[Detection]]:
        """:meth:`detect` for several images, batched."""
        images = [np.ascontiguousarray(image, dtype=np.uint8) for image in images]
        boxes = [p[:, :4] for p in self.propose(images)]
        for _ in range(2):
            refined = self.refine(images, boxes)
            boxes = [r[:, 1:5] for r in refined]
        results = []
        for rows in refined:
            rows = rows[rows[:, 0] >= self.score_threshold]
            detections = []
            for k in _nms(rows[:, 1:5], rows[:, 0], 0.4):
                row = rows[k]
                detections.append(
                    Detection(
                        bbox=row[1:5].astype(np.float32),
                        score=float(row[0]),
                        landmarks=row[5:15].reshape(5, 2).astype(np.float32),
                        dense_landmarks=row[15:151].reshape(68, 2).astype(np.float32),
                    )
                )
            results.append(detections)
        return results


class WorldRecognizer:
    """A world identity recognizer: 512-d ArcFace-style embeddings of the aligned face crop.

    Args:
        kind (`str`, defaults to `"world"`): ``"world"``, the conditioning recognizer the identity methods consume as
            they consume ``arcface.onnx``, or ``"world-judge"``, the independent scoring recognizer (another
            architecture, seed and crop).
        weights (`str`, *optional*): a weights file; defaults to the shipped one.
    """

    dim = 512

    def __init__(self, kind: str = "world", weights: str | os.PathLike | None = None) -> None:
        if kind not in RECOGNIZER_CROPS:
            raise ValueError(f"world recognizer kind must be one of {', '.join(RECOGNIZER_CROPS)}, got {kind!r}")
        self.kind = kind
        self.name = "world-arcface" if kind == "world" else "world-judge"
        path = Path(weights) if weights is not None else weights_path(kind)
        self._net, self.extra = _net(path)
        self.threshold = self.extra.get("threshold")  # cosine similarity above which two faces are the same person

    def preprocess(self, image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        """The aligned crop this recognizer embeds."""
        return recognizer_crop(np.asarray(image, dtype=np.uint8), landmarks, self.kind)

    def embed_crops(self, crops: np.ndarray, batch_size: int = 512) -> np.ndarray:
        """``(N, side, side, 3)`` uint8 aligned crops -> ``(N, 512)`` float32 embeddings (not normalised)."""
        import torch

        crops = np.asarray(crops)
        if len(crops) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        outputs = []
        with torch.no_grad():
            for start in range(0, len(crops), batch_size):
                outputs.append(self._net(_to_tensor(crops[start : start + batch_size])).numpy())
        return np.concatenate(outputs).astype(np.float32)

    def embed(self, image: np.ndarray, landmarks: np.ndarray, boxes: np.ndarray | None = None) -> np.ndarray:
        """``(N, 512)`` float32 embeddings for the faces with ``(N, 5, 2)`` landmarks (boxes are not needed)."""
        landmarks = np.asarray(landmarks, dtype=np.float32).reshape(-1, 5, 2)
        return self.embed_crops(np.stack([self.preprocess(image, lm) for lm in landmarks]) if len(landmarks) else [])
