"""The crops the world models see, shared by training and inference so both cut exactly the same pixels.

World faces are 20-60 px wide, so a face's eyes are 8-25 px apart in the source image. The conditioning
recognizer uses the ArcFace 5-point template at half scale (a 56x56 crop, eyes 17.6 px apart): the standard
112 crop would only upsample the same pixels 2x and cost 4x the compute. The judge uses a looser 64x64 crop
(template at 0.4 scale, centred), which also shows the hair line and ears, so the two see different inputs.
"""

from __future__ import annotations

import cv2
import numpy as np

from ..faces.align import ARCFACE_TEMPLATE, align_face, estimate_similarity

__all__ = [
    "RECOGNIZER_CROPS",
    "recognizer_template",
    "recognizer_crop",
    "attribute_face_crop",
    "context_crop",
    "scene_input",
    "detector_input",
    "refine_square",
    "refine_crop",
]

# Recognizer name -> (crop side, template scale); the template is centred in the crop.
RECOGNIZER_CROPS: dict[str, tuple[int, float]] = {"world": (56, 0.5), "world-judge": (64, 0.4)}
_ATTRIBUTE_FACE = (48, 48 / 112)
_CONTEXT_SIDE = 32
_SCENE_SIDE = 32


def _template(side: int, scale: float) -> np.ndarray:
    return ARCFACE_TEMPLATE * scale + (side - 112 * scale) / 2


def recognizer_template(kind: str) -> np.ndarray:
    """The ``(5, 2)`` landmark template of recognizer ``kind`` (``"world"`` or ``"world-judge"``)."""
    side, scale = RECOGNIZER_CROPS[kind]
    return _template(side, scale)


def recognizer_crop(image: np.ndarray, landmarks: np.ndarray, kind: str) -> np.ndarray:
    """The aligned RGB crop recognizer ``kind`` embeds (uint8, ``(side, side, 3)``)."""
    side, _ = RECOGNIZER_CROPS[kind]
    return align_face(image, landmarks, size=side, template=recognizer_template(kind))


def attribute_face_crop(image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """The 48x48 face crop the glasses and expression checkers read, aligned on the eyes and nose tip only.

    The mouth corners move with the expression (and a detector places them less surely), so leaving them out of the
    alignment keeps the mouth's shape, the expression signal, in a frame that does not depend on it.
    """
    side, scale = _ATTRIBUTE_FACE
    template = _template(side, scale)
    matrix = estimate_similarity(np.asarray(landmarks, dtype=np.float64)[:3], template[:3])
    return cv2.warpAffine(image, matrix, (side, side), flags=cv2.INTER_LINEAR, borderValue=0.0)


def context_crop(image: np.ndarray, bbox: np.ndarray) -> np.ndarray:
    """A 32x32 upright square around a face box reaching above it (hat) and below it (shirt)."""
    x1, y1, x2, y2 = (float(v) for v in bbox)
    height = max(y2 - y1, 1.0)
    side = 2.3 * height
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2 + 0.15 * height
    scale = _CONTEXT_SIDE / side
    # Pixel-centre convention on both sides: output pixel j samples the source at (j + 0.5) / scale - 0.5 + origin.
    matrix = np.array(
        [
            [scale, 0, (_CONTEXT_SIDE - 1) / 2 - scale * cx],
            [0, scale, (_CONTEXT_SIDE - 1) / 2 - scale * cy],
        ]
    )
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.warpAffine(
        image, matrix, (_CONTEXT_SIDE, _CONTEXT_SIDE), flags=interpolation, borderMode=cv2.BORDER_REPLICATE
    )


def scene_input(image: np.ndarray) -> np.ndarray:
    """The whole image at 32x32 (background colour and pattern)."""
    return cv2.resize(image, (_SCENE_SIDE, _SCENE_SIDE), interpolation=cv2.INTER_AREA)


def detector_input(image: np.ndarray, side: int = 64) -> tuple[np.ndarray, float]:
    """Fit ``image`` into a ``side`` x ``side`` canvas (top-left, black padding); returns it and the scale used.

    A point ``p`` of the canvas is ``(p + 0.5) / scale - 0.5`` in the original image.
    """
    height, width = image.shape[:2]
    scale = side / max(height, width)
    if scale == 1.0 and height == width:
        return np.ascontiguousarray(image), 1.0
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(image, (new_w, new_h), interpolation=interpolation)
    canvas = np.zeros((side, side, 3), dtype=np.uint8)
    canvas[:new_h, :new_w] = resized
    return canvas, scale


def refine_square(bbox: np.ndarray, margin: float) -> tuple[float, float, float]:
    """Centre ``(cx, cy)`` and side (``margin`` times the longer box side) of the square the detector's refine
    stage reads around a box."""
    x1, y1, x2, y2 = (float(v) for v in bbox)
    return (x1 + x2) / 2, (y1 + y2) / 2, max(margin * max(x2 - x1, y2 - y1), 4.0)


def refine_crop(image: np.ndarray, square: tuple[float, float, float], side: int) -> np.ndarray:
    """The ``side`` x ``side`` crop of ``square`` (from :func:`refine_square`); outside the image is black.

    Crop pixel ``j`` has its centre at ``cx + ((j + 0.5) / side - 0.5) * square_side`` in the image. The square is
    sampled at twice the output resolution and area-averaged down, so large faces do not alias.
    """
    cx, cy, length = square
    big = 2 * side
    scale = big / length
    matrix = np.array([[scale, 0, (big - 1) / 2 - scale * cx], [0, scale, (big - 1) / 2 - scale * cy]])
    crop = cv2.warpAffine(image, matrix, (big, big), flags=cv2.INTER_LINEAR, borderValue=0.0)
    return cv2.resize(crop, (side, side), interpolation=cv2.INTER_AREA)
