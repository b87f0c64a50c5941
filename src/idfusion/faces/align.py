"""5-point similarity alignment to the ArcFace template.

The template is the standard one every ArcFace-family recognizer was trained with (insightface ``arcface_dst``),
for a 112x112 crop. The transform is the least-squares similarity (rotation, uniform scale, translation) of
Umeyama (1991), "Least-squares estimation of transformation parameters between two point patterns", eq. 40-42.
"""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["ARCFACE_TEMPLATE", "arcface_template", "estimate_similarity", "align_face", "transform_points"]

# ArcFace order: eye on the image's left, eye on the image's right, nose tip, mouth corners left and right.
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float32,
)


def arcface_template(size: int = 112) -> np.ndarray:
    """The template scaled to a ``size`` x ``size`` crop.

    Multiples of 112 scale the template by ``size / 112``. Other sizes follow insightface's ``estimate_norm``:
    scale by ``size / 128`` and shift x by ``8 * scale``, which centres the 112-wide template in a 128-wide frame.
    """
    if size % 112 == 0:
        return ARCFACE_TEMPLATE * (size / 112.0)
    ratio = size / 128.0
    template = ARCFACE_TEMPLATE * ratio
    template[:, 0] += 8.0 * ratio
    return template


def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform taking ``src`` points onto ``dst`` points (Umeyama 1991).

    Args:
        src: ``(N, 2)`` source points, ``N >= 2``.
        dst: ``(N, 2)`` destination points.

    Returns:
        ``(2, 3)`` float64 matrix ``M`` with ``dst ≈ M[:, :2] @ src + M[:, 2]``.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2:
        raise ValueError(f"expected two (N, 2) point sets with N >= 2; got {src.shape} and {dst.shape}")
    n = src.shape[0]
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / n  # (2, 2) cross-covariance, eq. 38
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(cov) < 0:  # a reflection would fit better; forbid it (eq. 39)
        d[1] = -1.0
    rotation = u @ np.diag(d) @ vt  # eq. 40
    src_var = (src_c**2).sum() / n  # eq. 36
    scale = float((s * d).sum() / src_var) if src_var > 0 else 1.0  # eq. 42
    translation = dst_mean - scale * rotation @ src_mean  # eq. 41
    return np.hstack([scale * rotation, translation[:, None]])


def transform_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a ``(2, 3)`` affine matrix to ``(N, 2)`` points."""
    points = np.asarray(points, dtype=np.float64)
    return points @ matrix[:, :2].T + matrix[:, 2]


def align_face(
    image: np.ndarray, landmarks: np.ndarray, size: int = 112, template: np.ndarray | None = None
) -> np.ndarray:
    """Warp ``image`` so the 5 ``landmarks`` land on the ArcFace template.

    Args:
        image: ``(H, W, C)`` uint8 image (any channel order; it is passed through).
        landmarks: ``(5, 2)`` points in ArcFace order.
        size: output side in pixels.
        template: ``(5, 2)`` destination points; defaults to :func:`arcface_template` for ``size``.

    Returns:
        ``(size, size, C)`` aligned crop; pixels outside the image are black.
    """
    landmarks = np.asarray(landmarks, dtype=np.float64)
    if landmarks.shape != (5, 2):
        raise ValueError(f"landmarks must have shape (5, 2), got {landmarks.shape}")
    dst = arcface_template(size) if template is None else np.asarray(template, dtype=np.float64)
    matrix = estimate_similarity(landmarks, dst)
    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderValue=0.0)
