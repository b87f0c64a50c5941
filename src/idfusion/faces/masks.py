"""Face and head masks from facial landmarks (a documented stand-in for a human-parsing model).

FaceChain-FACT masks the user photo to the head (face and hair, background set to 0) before its face encoder, and
repaints a dilated face region of a template; the official code gets both regions from the M2FP parsing model. Here
the regions come from landmarks instead:

* with dlib's 68 points (``Face.dense_landmarks``): the face is the convex hull of the jaw line and the brows; the
  head adds the jaw mirrored about the brow line, scaled to :data:`CROWN_SCALE` of the brow-to-chin height, which
  reaches the top of the head;
* with only the 5 ArcFace points and the box: rotated ellipses whose proportions were measured on dlib's 68 points
  (in units of the eye-to-mouth distance ``d``: brows 0.45 d above the eyes, chin 1.95 d below them, jaw half-width
  1.1 d).

What the release does *with* its parsed regions is mirrored: its morphology is ``cv2.dilate`` with an all-ones
square kernel whose side is a fraction of ``sqrt(mask area)`` (:func:`dilate_square`; a fraction used as a kernel
side, so the region grows by about half of it on each side), and :func:`head_mask` grows face-and-hair by a kernel
of side ``sqrt(face area) / 20`` (``face_adapter_v1.py`` ``get_mask_head``), then adds the face back. What differs:

* the regions themselves: a landmark outline is not the parsed face and hair (the parsed "Face" reaches the
  hairline, the landmark face stops at the brows; the parsed hair follows the hair, the landmark head is a fixed
  shape);
* the release then multiplies the head by its "Human" region and keeps the largest contour; there is no person
  region here, and a dilated convex outline is one contour already, so both steps are skipped.

Masks are ``float32`` ``(H, W)`` arrays in ``[0, 1]``. :func:`face_mask`'s optional ``dilation`` (a disc of radius
``dilation * sqrt(face box area)``) is idfusion's own margin, used to keep other faces out of a repaint; the
release's growth rules are applied to ``face_mask(..., dilation=0)``.
"""

from __future__ import annotations

import cv2
import numpy as np

from .types import Face

__all__ = ["CROWN_SCALE", "HEAD_KERNEL_DIVISOR", "dilate_square", "head_mask", "face_mask", "apply_mask", "feather"]

# How far above the brows the head reaches, as a fraction of the brow-to-chin height (the crown of an adult head
# sits about 0.7-0.8 of the face height above the brows once hair is included).
CROWN_SCALE = 0.75

#: The release grows the head (face and hair) by a square kernel of side ``sqrt(face area) / 20``, at least 1 px.
HEAD_KERNEL_DIVISOR = 20.0

# 5-point ellipse proportions, in units of the eye-centre-to-mouth-centre distance, measured along the face's up axis
# from the eye line (see the module docstring).
_BROW_ABOVE_EYES = 0.45
_CHIN_BELOW_EYES = 1.95
_FACE_HALF_WIDTH = 1.1
_HEAD_WIDTH_FACTOR = 1.2

# iBUG 68-point index ranges (dlib order)
_JAW = slice(0, 17)
_BROWS = slice(17, 27)

_SHIFT = 4  # sub-pixel bits for OpenCV's polygon fill


def _axes(face: Face) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Eye midpoint, unit "up" vector (mouth to eyes), unit "right" vector and the eye-to-mouth distance."""
    points = np.asarray(face.landmarks, dtype=np.float64)
    eyes = (points[0] + points[1]) / 2
    mouth = (points[3] + points[4]) / 2
    up = eyes - mouth
    distance = float(np.linalg.norm(up))
    if distance < 1e-6:
        # degenerate landmarks: fall back to an upright face sized by its box
        up = np.array([0.0, -1.0])
        distance = max(face.height, 1.0) / 2.5
    else:
        up = up / distance
    right = np.array([-up[1], up[0]])  # up rotated by +90 degrees in image coordinates (y down): points right
    return eyes, up, right, distance


def _ellipse_points(
    center: np.ndarray, up: np.ndarray, right: np.ndarray, half_width: float, half_height: float, n: int = 72
) -> np.ndarray:
    angles = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    return center + np.outer(np.cos(angles) * half_width, right) + np.outer(np.sin(angles) * half_height, up)


def _face_ellipse(face: Face) -> np.ndarray:
    eyes, up, right, d = _axes(face)
    top, bottom = _BROW_ABOVE_EYES * d, -_CHIN_BELOW_EYES * d
    center = eyes + up * (top + bottom) / 2
    half_width = max(_FACE_HALF_WIDTH * d, 0.45 * face.width)
    return _ellipse_points(center, up, right, half_width, (top - bottom) / 2)


def _head_ellipse(face: Face) -> np.ndarray:
    eyes, up, right, d = _axes(face)
    brow, bottom = _BROW_ABOVE_EYES * d, -_CHIN_BELOW_EYES * d
    top = brow + CROWN_SCALE * (brow - bottom)
    center = eyes + up * (top + bottom) / 2
    half_width = _HEAD_WIDTH_FACTOR * max(_FACE_HALF_WIDTH * d, 0.45 * face.width)
    return _ellipse_points(center, up, right, half_width, (top - bottom) / 2)


def _face_outline(face: Face) -> np.ndarray:
    if face.dense_landmarks is not None and len(face.dense_landmarks) >= 68:
        dense = np.asarray(face.dense_landmarks, dtype=np.float64)
        return np.concatenate([dense[_JAW], dense[_BROWS]])
    return _face_ellipse(face)


def _head_outline(face: Face) -> np.ndarray:
    if face.dense_landmarks is not None and len(face.dense_landmarks) >= 68:
        dense = np.asarray(face.dense_landmarks, dtype=np.float64)
        jaw, brows = dense[_JAW], dense[_BROWS]
        _, up, _, _ = _axes(face)
        brow_line = brows.mean(axis=0)
        below = (brow_line - jaw) @ up  # (17,) distance of each jaw point below the brow line
        crown = jaw + np.outer((1.0 + CROWN_SCALE) * below, up)
        return np.concatenate([jaw, brows, crown])
    # the face ellipse is included so that the head always contains the face
    return np.concatenate([_head_ellipse(face), _face_ellipse(face)])


def _render(points: np.ndarray, shape: tuple[int, int], radius: int) -> np.ndarray:
    """Fill the convex hull of ``points`` and grow it by ``radius`` pixels (a disc dilation of its outline)."""
    height, width = int(shape[0]), int(shape[1])
    canvas = np.zeros((height, width), dtype=np.uint8)
    fixed = np.round(np.asarray(points, dtype=np.float64) * (1 << _SHIFT)).astype(np.int64)
    # keep far-away points inside int32 without changing the drawn region noticeably
    limit = (max(height, width) * 4 + 4 * radius) << _SHIFT
    hull = cv2.convexHull(np.clip(fixed, -limit, limit).astype(np.int32))
    cv2.fillConvexPoly(canvas, hull, 1, lineType=cv2.LINE_8, shift=_SHIFT)
    if radius > 0:
        # a thick closed outline with round joins is the Minkowski sum of the outline with a disc; unlike cv2.dilate
        # its cost does not grow with image size times kernel size
        cv2.polylines(canvas, [hull], True, 1, thickness=2 * radius + 1, lineType=cv2.LINE_8, shift=_SHIFT)
    return canvas.astype(np.float32)


def _radius(face: Face, dilation: float) -> int:
    if dilation < 0:
        raise ValueError(f"dilation must be >= 0, got {dilation}")
    return int(round(dilation * np.sqrt(max(face.area, 0.0))))


def _check_shape(shape: tuple[int, int]) -> None:
    if len(shape) < 2 or int(shape[0]) <= 0 or int(shape[1]) <= 0:
        raise ValueError(f"shape must be (height, width) with positive sizes, got {tuple(shape)}")


def dilate_square(mask: np.ndarray, side: int) -> np.ndarray:
    """The release's dilation: ``cv2.dilate`` with an all-ones ``side`` x ``side`` kernel (anchor at its centre,
    ``side // 2``, so an even side grows one pixel more to the right and down).

    The release computes ``side`` as ``int(sqrt(mask.sum()) * fraction)``; a side of 0 is what it then passes on,
    and OpenCV reads an empty kernel as a 3x3 one, so 0 grows by one pixel, exactly as there. 1 changes nothing.

    Args:
        mask: ``(H, W)`` mask.
        side: the kernel side in pixels, >= 0.

    Returns:
        ``(H, W)`` ``float32`` mask.
    """
    if side < 0:
        raise ValueError(f"side must be >= 0, got {side}")
    return cv2.dilate(np.asarray(mask, dtype=np.float32), np.ones((int(side), int(side)), np.uint8))


def head_mask(face: Face, shape: tuple[int, int], *, kernel_divisor: float = HEAD_KERNEL_DIVISOR) -> np.ndarray:
    """Mask of the whole head (face, hair, top of the head) of one face, as the release makes it.

    The release's rule (``get_mask_head``): face and hair, dilated by a square kernel of side
    ``max(int(sqrt(face area) / 20), 1)`` (``face area`` = the face mask's pixel count), then the face added back
    (its cut to the person and to the largest contour are skipped, see the module docstring). Here face-and-hair is
    the landmark head region and the face is ``face_mask(face, shape, dilation=0)``.

    Args:
        face: the face, in the coordinates of the image the mask is for.
        shape: ``(H, W)`` of that image (a longer shape such as ``image.shape`` is accepted; extra items are
            ignored).
        kernel_divisor: the kernel side is ``sqrt(face area) / kernel_divisor`` (release: 20).

    Returns:
        ``(H, W)`` ``float32`` mask, 1 inside the head and 0 outside.
    """
    _check_shape(shape)
    if not kernel_divisor > 0:
        raise ValueError(f"kernel_divisor must be > 0, got {kernel_divisor}")
    inner = face_mask(face, shape, dilation=0.0)
    side = max(int(np.sqrt(inner.sum()) / kernel_divisor), 1)
    # as the release: (face-and-hair | face) dilated, then the face added back
    head = np.maximum(_render(_head_outline(face), shape, 0), inner)
    return np.maximum(dilate_square(head, side), inner)


def face_mask(face: Face, shape: tuple[int, int], *, dilation: float = 0.05) -> np.ndarray:
    """Mask of the face itself: brows to chin, cheek to cheek (the stand-in for the release's parsed "Face").

    Args:
        face: the face, in the coordinates of the image the mask is for.
        shape: ``(H, W)`` of that image.
        dilation: grow the region by a disc of radius ``dilation * sqrt(face box area)`` (idfusion's margin; the
            release's own growth rules are :func:`dilate_square` on this mask with ``dilation=0``).

    Returns:
        ``(H, W)`` ``float32`` mask, 1 inside the face and 0 outside.
    """
    _check_shape(shape)
    return _render(_face_outline(face), shape, _radius(face, dilation))


def apply_mask(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Set the background to 0: ``image * mask``, rounded.

    Args:
        image: ``(H, W, 3)`` ``uint8`` image.
        mask: ``(H, W)`` mask in ``[0, 1]`` (binary or soft) or boolean.

    Returns:
        ``(H, W, 3)`` ``uint8`` image; pixels where the mask is 1 are unchanged, where it is 0 they are 0.
    """
    image = np.asarray(image)
    mask = np.asarray(mask)
    if image.ndim != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be an (H, W, C) uint8 array, got {image.dtype} {image.shape}")
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match the image's (H, W) {image.shape[:2]}")
    alpha = np.clip(mask.astype(np.float32), 0.0, 1.0)[..., None]  # (H, W, 1)
    return np.round(image.astype(np.float32) * alpha).astype(np.uint8)


def feather(mask: np.ndarray, radius_px: int) -> np.ndarray:
    """Soften a mask's edge with a Gaussian blur of kernel size ``2 * radius_px + 1`` (sigma chosen by OpenCV).

    Pixels farther than ``radius_px`` from the mask stay exactly 0 and pixels farther than that inside it stay
    exactly 1 (up to float rounding of the kernel sum).

    Args:
        mask: ``(H, W)`` mask in ``[0, 1]``.
        radius_px: blur radius in pixels; 0 returns the mask unchanged (as ``float32``).

    Returns:
        ``(H, W)`` ``float32`` mask in ``[0, 1]``.
    """
    if radius_px < 0:
        raise ValueError(f"radius_px must be >= 0, got {radius_px}")
    mask = np.asarray(mask, dtype=np.float32)
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {mask.shape}")
    if radius_px == 0:
        return mask.copy()
    size = 2 * int(radius_px) + 1
    blurred = cv2.GaussianBlur(mask, (size, size), 0, borderType=cv2.BORDER_REPLICATE)
    return np.clip(blurred, 0.0, 1.0)
