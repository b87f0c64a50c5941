"""Face records and the two backend roles: detectors and recognizers.

Coordinates are in pixels of the (EXIF-rotated) input image, ``x`` to the right and ``y`` down.
The 5 landmarks are always in the ArcFace order: the eye on the image's left, the eye on the image's right, the
nose tip, the mouth corner on the image's left, the mouth corner on the image's right.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = ["Detection", "Face", "FaceDetector", "FacePhoto", "FaceRecognizer", "split_face_photo"]


@dataclass
class Detection:
    """What a detector reports for one face.

    Attributes:
        bbox: ``(4,)`` float32 ``x1, y1, x2, y2``.
        score: detection confidence (the detector's own scale: probability for SCRFD, margin for dlib HOG).
        landmarks: ``(5, 2)`` float32 in ArcFace order, or ``None`` if the detector has no keypoints
            (the analyzer then fills them from a landmark model).
        dense_landmarks: ``(K, 2)`` float32 (68 points for dlib), or ``None``.
    """

    bbox: np.ndarray
    score: float
    landmarks: np.ndarray | None = None
    dense_landmarks: np.ndarray | None = None


@dataclass(frozen=True)
class FacePhoto:
    """A photo with several people and which of its faces to use, as a face input of any pipeline.

    ``index`` counts from the left from 0 (negative counts from the right), as ``FaceAnalyzer.analyze(select=...)``
    does. Without it, one-face methods use the largest face (FACT: the highest-scoring one) and say so.
    """

    image: Any
    index: int

    def __post_init__(self) -> None:
        if isinstance(self.index, bool) or not isinstance(self.index, (int, np.integer)):
            raise ValueError(f"face index must be an integer (0 = leftmost), got {self.index!r}")


def split_face_photo(item: Any) -> tuple[Any, int | None]:
    """``(image, face index or None)`` of a face input: a :class:`FacePhoto` or a plain image."""
    if isinstance(item, FacePhoto):
        return item.image, int(item.index)
    return item, None


@dataclass
class Face:
    """One analysed face.

    Attributes:
        bbox: ``(4,)`` float32 ``x1, y1, x2, y2``.
        det_score: detection confidence.
        landmarks: ``(5, 2)`` float32, ArcFace order.
        detector: name of the detector that found the face, e.g. ``"dlib-hog"`` or ``"onnx:scrfd_10g_bnkps"``.
        dense_landmarks: ``(K, 2)`` float32 or ``None``.
        embedding: ``(D,)`` float32 as the recognizer produced it (not normalised), or ``None``.
        embedding_model: name of the recognizer, e.g. ``"dlib-resnet"`` or ``"onnx:arcface"``.
        crops: named crops (``"arcface"`` is the 112x112 ArcFace-aligned RGB crop; methods register others).
        source: name of the image the face came from.
    """

    bbox: np.ndarray
    det_score: float
    landmarks: np.ndarray
    detector: str
    dense_landmarks: np.ndarray | None = None
    embedding: np.ndarray | None = None
    embedding_model: str | None = None
    crops: dict[str, np.ndarray] = field(default_factory=dict)
    source: str = "<image>"

    @property
    def width(self) -> float:
        return float(self.bbox[2] - self.bbox[0])

    @property
    def height(self) -> float:
        return float(self.bbox[3] - self.bbox[1])

    @property
    def area(self) -> float:
        """True box area ``(x2 - x1) * (y2 - y1)``."""
        return max(self.width, 0.0) * max(self.height, 0.0)

    @property
    def size(self) -> float:
        """The shorter side of the box, the measure a minimum face size applies to."""
        return min(self.width, self.height)

    @property
    def embedding_dim(self) -> int | None:
        return None if self.embedding is None else int(self.embedding.shape[-1])

    @property
    def normed_embedding(self) -> np.ndarray | None:
        """The embedding divided by its L2 norm."""
        if self.embedding is None:
            return None
        return (self.embedding / np.linalg.norm(self.embedding)).astype(np.float32)

    def to_dict(self, *, include_embedding: bool = True) -> dict:
        """JSON-ready dictionary (lists of floats); crops are not included."""
        out: dict = {
            "bbox": [round(float(v), 2) for v in self.bbox],
            "det_score": round(float(self.det_score), 4),
            "detector": self.detector,
            "landmarks": [[round(float(x), 2), round(float(y), 2)] for x, y in self.landmarks],
        }
        if self.dense_landmarks is not None:
            out["dense_landmarks"] = [[round(float(x), 2), round(float(y), 2)] for x, y in self.dense_landmarks]
        if self.embedding is not None:
            out["embedding_model"] = self.embedding_model
            out["embedding_dim"] = self.embedding_dim
            if include_embedding:
                out["embedding"] = [float(v) for v in self.embedding]
        return out


@runtime_checkable
class FaceDetector(Protocol):
    """Finds faces in an RGB ``uint8`` ``(H, W, 3)`` image."""

    name: str

    def detect(self, image: np.ndarray) -> list[Detection]: ...


@runtime_checkable
class FaceRecognizer(Protocol):
    """Turns faces into identity embeddings.

    ``embed`` receives the whole RGB image, the faces' 5 ArcFace-order landmarks (``(N, 5, 2)``) and boxes
    (``(N, 4)``), and does its own alignment, because recognizers differ in the crop they expect: ArcFace models
    take the 112x112 template crop from the landmarks, dlib runs its own 5-point predictor inside the box.
    """

    name: str
    dim: int

    def embed(self, image: np.ndarray, landmarks: np.ndarray, boxes: np.ndarray | None = None) -> np.ndarray:
        """Return ``(N, dim)`` float32 embeddings, one per face, not normalised."""
        ...
