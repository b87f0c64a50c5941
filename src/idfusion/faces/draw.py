"""Drawing analysed faces onto an image, for the CLI's ``--annotate`` and the UI."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from .types import Face

__all__ = ["draw_faces"]

# RGB colours of the 5 ArcFace points: eyes, nose, mouth corners.
_POINT_COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)]


def draw_faces(image: np.ndarray, faces: Sequence[Face]) -> np.ndarray:
    """A copy of the RGB ``image`` with each face's box, index, score and landmarks drawn on it."""
    canvas = np.ascontiguousarray(image.copy())
    scale = max(1, round(max(canvas.shape[:2]) / 600))  # line width that stays visible on large photos
    for index, face in enumerate(faces):
        x1, y1, x2, y2 = (int(round(float(v))) for v in face.bbox)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), (0, 255, 0), 2 * scale)
        label = f"{index}: {face.det_score:.2f}"
        cv2.putText(
            canvas, label, (x1, max(12 * scale, y1 - 4 * scale)), cv2.FONT_HERSHEY_SIMPLEX, 0.5 * scale,
            (0, 255, 0), scale, cv2.LINE_AA,
        )  # fmt: skip
        if face.dense_landmarks is not None:
            for x, y in face.dense_landmarks:
                cv2.circle(canvas, (int(round(float(x))), int(round(float(y)))), scale, (255, 255, 255), -1)
        for (x, y), colour in zip(face.landmarks, _POINT_COLOURS, strict=True):
            cv2.circle(canvas, (int(round(float(x))), int(round(float(y)))), 2 * scale, colour, -1)
    return canvas
