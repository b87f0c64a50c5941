"""Face analysis front end: detection, 5-point ArcFace landmarks, alignment, identity embeddings and crops."""

from .align import ARCFACE_TEMPLATE, align_face, arcface_template, estimate_similarity, transform_points
from .analyzer import DETECTORS, RECOGNIZERS, FaceAnalyzer, available_crops, register_crop
from .types import Detection, Face, FaceDetector, FacePhoto, FaceRecognizer

__all__ = [
    "ARCFACE_TEMPLATE",
    "DETECTORS",
    "RECOGNIZERS",
    "Detection",
    "Face",
    "FaceAnalyzer",
    "FaceDetector",
    "FacePhoto",
    "FaceRecognizer",
    "align_face",
    "arcface_template",
    "available_crops",
    "estimate_similarity",
    "register_crop",
    "transform_points",
]
