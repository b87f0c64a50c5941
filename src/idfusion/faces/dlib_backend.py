"""dlib backends: fully offline, with weights from the ``face_recognition_models`` package.

- Detectors: the HOG + linear SVM frontal detector (built into dlib) and the MMOD CNN detector
  (``mmod_human_face_detector.dat``).
- Landmarks: the 68-point predictor gives the dense landmarks and the 5 ArcFace points (eye centres, nose tip,
  mouth corners); dlib's own 5-point predictor only marks eye corners and the nose base, so it cannot give those.
- Recognizer: the 128-d ResNet (``dlib_face_recognition_resnet_model_v1.dat``) on dlib's own 150x150 chip, aligned
  with the 5-point predictor as dlib's authors intend.
"""

from __future__ import annotations

import importlib.util
import logging
from functools import cache
from pathlib import Path

import numpy as np

from ..errors import ModelFilesError
from .types import Detection

__all__ = ["dlib_model_path", "DlibDetector", "DlibLandmarker", "DlibRecognizer", "landmarks68_to_arcface5"]

logger = logging.getLogger(__name__)

# iBUG 68-point indices: 36-41 the eye on the image's left, 42-47 the other, 30 nose tip, 48/54 mouth corners.
_LEFT_EYE = slice(36, 42)
_RIGHT_EYE = slice(42, 48)
_NOSE_TIP = 30
_MOUTH_LEFT = 48
_MOUTH_RIGHT = 54


def _dlib():
    try:
        import dlib
    except ImportError as error:  # pragma: no cover - dlib-bin is a core dependency
        raise ImportError("the dlib face backend needs dlib: pip install dlib-bin face_recognition_models") from error
    return dlib


def dlib_model_path(filename: str) -> Path:
    """Path of a model file shipped by the ``face_recognition_models`` package.

    The package's ``__init__`` imports ``pkg_resources``, which new setuptools no longer has, so it is located
    with ``find_spec`` and never imported.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ModelFilesError(
            f"dlib model {filename!r} not found: the face_recognition_models package is not installed "
            "(pip install face_recognition_models)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / filename
    if not path.is_file():
        raise ModelFilesError(f"dlib model file missing: {path} (reinstall face_recognition_models)")
    return path


@cache
def _load(kind: str, filename: str):
    # dlib models are immutable after loading; one instance per process is enough.
    dlib = _dlib()
    return getattr(dlib, kind)(str(dlib_model_path(filename)))


def _contiguous(image: np.ndarray) -> np.ndarray:
    # dlib ignores numpy strides: a sliced (non-contiguous) array is read as garbage and silently finds no face.
    return np.ascontiguousarray(image, dtype=np.uint8)


def _rect(box: np.ndarray):
    dlib = _dlib()
    x1, y1, x2, y2 = (int(round(float(v))) for v in box)
    return dlib.rectangle(x1, y1, x2, y2)


def landmarks68_to_arcface5(points68: np.ndarray) -> np.ndarray:
    """The 5 ArcFace points from iBUG 68 landmarks: eye centres (means of the eye contours), nose tip, mouth corners."""
    points68 = np.asarray(points68, dtype=np.float32)
    return np.stack(
        [
            points68[_LEFT_EYE].mean(axis=0),
            points68[_RIGHT_EYE].mean(axis=0),
            points68[_NOSE_TIP],
            points68[_MOUTH_LEFT],
            points68[_MOUTH_RIGHT],
        ]
    ).astype(np.float32)


class DlibLandmarker:
    """68-point landmarks inside a face box (``shape_predictor_68_face_landmarks.dat``)."""

    def __init__(self) -> None:
        self._predictor = _load("shape_predictor", "shape_predictor_68_face_landmarks.dat")

    def __call__(self, image: np.ndarray, box: np.ndarray) -> np.ndarray:
        """``(68, 2)`` float32 points for the face in ``box`` (``x1, y1, x2, y2``)."""
        shape = self._predictor(_contiguous(image), _rect(box))
        return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)


class DlibDetector:
    """dlib's HOG or MMOD CNN face detector, with 68-point landmarks for every face.

    Args:
        kind: ``"hog"`` (fast, frontal faces) or ``"mmod"`` (CNN: more robust to pose, about 20x slower on CPU).
        upsample: how many times to double the image before detecting. HOG finds faces down to about 80 px at 0
            and 40 px at 1, at about 4x the cost. ``None`` picks 1 below one megapixel and 0 from there on: in a
            camera photo a face under 80 px is too small to carry identity (recognizers work on 112-150 px crops).
        score_threshold: HOG's SVM margin (0 is dlib's default) or MMOD's confidence.
    """

    def __init__(self, kind: str = "hog", *, upsample: int | None = None, score_threshold: float = 0.0) -> None:
        if kind not in ("hog", "mmod"):
            raise ValueError(f"dlib detector kind must be 'hog' or 'mmod', got {kind!r}")
        if upsample is not None and not 0 <= upsample <= 3:
            raise ValueError(f"upsample must be between 0 and 3, got {upsample}")
        self.kind = kind
        self.name = f"dlib-{kind}"
        self.upsample = upsample
        self.score_threshold = score_threshold
        dlib = _dlib()
        if kind == "hog":
            self._detector = dlib.get_frontal_face_detector()
        else:
            self._detector = _load("cnn_face_detection_model_v1", "mmod_human_face_detector.dat")
        self._landmarker = DlibLandmarker()

    def _upsample_for(self, image: np.ndarray) -> int:
        if self.upsample is not None:
            return self.upsample
        return 1 if image.shape[0] * image.shape[1] < 1_000_000 else 0

    def detect(self, image: np.ndarray) -> list[Detection]:
        image = _contiguous(image)
        upsample = self._upsample_for(image)
        if self.kind == "hog":
            rects, scores, _ = self._detector.run(image, upsample, self.score_threshold)
            found = list(zip(rects, scores, strict=True))
        else:
            found = [(d.rect, d.confidence) for d in self._detector(image, upsample)]
            found = [(r, s) for r, s in found if s >= self.score_threshold]
        detections = []
        for rect, score in found:
            box = np.array([rect.left(), rect.top(), rect.right(), rect.bottom()], dtype=np.float32)
            points68 = self._landmarker(image, box)
            detections.append(
                Detection(
                    bbox=box,
                    score=float(score),
                    landmarks=landmarks68_to_arcface5(points68),
                    dense_landmarks=points68,
                )
            )
        detections.sort(key=lambda d: -d.score)
        return detections


class DlibRecognizer:
    """dlib's 128-d ResNet face descriptor (L2 distance 0.6 is its usual same-person threshold)."""

    name = "dlib-resnet"
    dim = 128

    def __init__(self) -> None:
        self._shape5 = _load("shape_predictor", "shape_predictor_5_face_landmarks.dat")
        self._model = _load("face_recognition_model_v1", "dlib_face_recognition_resnet_model_v1.dat")

    def embed(self, image: np.ndarray, landmarks: np.ndarray, boxes: np.ndarray | None = None) -> np.ndarray:
        if boxes is None:
            raise ValueError("the dlib recognizer needs face boxes: it aligns with its own 5-point predictor")
        dlib = _dlib()
        image = _contiguous(image)
        shapes = dlib.full_object_detections()
        for box in np.asarray(boxes).reshape(-1, 4):
            shapes.append(self._shape5(image, _rect(box)))
        if len(shapes) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        descriptors = self._model.compute_face_descriptor(image, shapes)
        return np.array([np.asarray(d) for d in descriptors], dtype=np.float32).reshape(-1, self.dim)
