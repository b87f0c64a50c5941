"""Real detection in place of a random stand-in detector.

The tiny kit (``idfusion make-tiny``) writes an SCRFD-layout ONNX detector with random weights so that the ONNX face
path runs offline, but random weights "find" a face in any picture, a plain blue one too. The kit marks that file in
its ONNX metadata (:data:`STAND_IN_KEY`), and :class:`FaceAnalyzer` then detects with :class:`StandInDetector`:
real detectors, so a picture without a face is refused exactly as the real SCRFD would refuse it.
"""

from __future__ import annotations

import os

import numpy as np

__all__ = ["STAND_IN_KEY", "STAND_IN_VALUE", "StandInDetector", "is_stand_in"]

STAND_IN_KEY = "idfusion.stand_in"
STAND_IN_VALUE = "idfusion.faces.stand_in:StandInDetector"
RENDER_SIDE = 128  # synthetic world renders are 64 or 128 px a side; photos of faces are larger


def is_stand_in(path: str | os.PathLike) -> bool:
    """Whether the ONNX file at ``path`` is marked as a random stand-in detector (see :data:`STAND_IN_KEY`)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return any(prop.key == STAND_IN_KEY for prop in model.metadata_props)


class StandInDetector:
    """Real, offline detection for a stand-in: the world detector for renders, dlib's HOG for photos.

    Images up to 128 px a side go to the synthetic world's detector first; any image in which it found nothing goes
    to dlib's HOG detector. Landmarks are the world detector's or dlib's 5-point ones.
    """

    name = "stand-in (world, dlib-hog)"
    min_face_size = 8  # the world's smallest faces are about 11 px (FaceAnalyzer reads this)

    def __init__(self) -> None:
        self._world = None
        self._dlib = None

    def detect(self, image: np.ndarray) -> list:
        image = np.ascontiguousarray(image, dtype=np.uint8)
        if max(image.shape[:2]) <= RENDER_SIDE:
            if self._world is None:
                from ..world.backends import WorldDetector

                self._world = WorldDetector()
            found = self._world.detect(image)
            if found:
                return found
        if self._dlib is None:
            from .dlib_backend import DlibDetector

            self._dlib = DlibDetector("hog")
        return self._dlib.detect(image)
