"""5-point similarity alignment: the transform, the warp, and the template conventions."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from idfusion.faces import ARCFACE_TEMPLATE, align_face, arcface_template, estimate_similarity, transform_points
from idfusion.faces.dlib_backend import DlibLandmarker, landmarks68_to_arcface5


def _similarity(angle_deg: float, scale: float, tx: float, ty: float) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    return np.array([[scale * np.cos(a), -scale * np.sin(a), tx], [scale * np.sin(a), scale * np.cos(a), ty]])


def test_estimate_recovers_a_known_similarity():
    truth = _similarity(23.0, 2.7, 140.0, -35.0)
    src = ARCFACE_TEMPLATE.astype(np.float64)
    dst = transform_points(truth, src)
    np.testing.assert_allclose(estimate_similarity(src, dst), truth, atol=1e-9)


def test_estimate_never_reflects():
    src = ARCFACE_TEMPLATE.astype(np.float64)
    mirrored = src * [-1.0, 1.0]
    matrix = estimate_similarity(src, mirrored)
    assert np.linalg.det(matrix[:, :2]) > 0


def test_estimate_hand_computed_two_points():
    # (0,0)->(10,10) and (1,0)->(10,12): rotation 90 degrees, scale 2, translation (10, 10).
    matrix = estimate_similarity(np.array([[0.0, 0.0], [1.0, 0.0]]), np.array([[10.0, 10.0], [10.0, 12.0]]))
    np.testing.assert_allclose(matrix, [[0.0, -2.0, 10.0], [2.0, 0.0, 10.0]], atol=1e-12)


def test_estimate_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        estimate_similarity(np.zeros((5, 2)), np.zeros((4, 2)))


def test_template_conventions():
    np.testing.assert_allclose(arcface_template(112), ARCFACE_TEMPLATE)
    np.testing.assert_allclose(arcface_template(224), ARCFACE_TEMPLATE * 2)
    # insightface's 128 convention: scale by size/128 and shift x by 8 * scale.
    np.testing.assert_allclose(arcface_template(256)[0], [38.2946 * 2 + 16, 51.6963 * 2], atol=1e-4)


def test_warp_puts_marked_landmarks_on_the_template():
    """Dots drawn at known landmark positions land within 2 px of the template after alignment."""
    truth = _similarity(-31.0, 3.2, 260.0, 90.0)
    landmarks = transform_points(truth, ARCFACE_TEMPLATE)  # where the face's points are in the photo
    image = np.zeros((700, 700, 3), dtype=np.uint8)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]
    for (x, y), colour in zip(landmarks, colours, strict=True):
        cv2.circle(image, (int(round(x)), int(round(y))), 6, colour, -1)

    crop = align_face(image, landmarks, size=112)
    assert crop.shape == (112, 112, 3)
    for point, colour in zip(ARCFACE_TEMPLATE, colours, strict=True):
        mask = np.all(np.abs(crop.astype(int) - colour) < 60, axis=2)
        ys, xs = np.nonzero(mask)
        assert len(xs) > 0, f"landmark of colour {colour} is missing from the crop"
        centroid = np.array([xs.mean(), ys.mean()])
        assert np.linalg.norm(centroid - point) < 2.0, (centroid, point)


def test_real_faces_align_consistently(faces_dir, dlib_analyzer):
    """On real photos, landmarks re-detected in the aligned crop agree with the transformed landmarks (< 2 px)."""
    from idfusion.images import load_image

    landmarker = DlibLandmarker()
    for name in ("obama.jpg", "obama_rgba.png", "group_six_faces.jpg"):
        pixels = load_image(faces_dir / name).array
        face = dlib_analyzer.get(pixels)
        size = 448  # a large crop, so the landmark model sees as much detail as in the photo
        crop = align_face(pixels, face.landmarks, size=size)
        matrix = estimate_similarity(face.landmarks, arcface_template(size))
        expected = transform_points(matrix, face.landmarks)
        box = np.array([0.12, 0.12, 0.88, 0.95]) * size
        redetected = landmarks68_to_arcface5(landmarker(crop, box))
        error_112 = np.linalg.norm(redetected - expected, axis=1) * 112 / size
        assert error_112.max() < 2.0, (name, error_112)
        # The least-squares fit leaves the face's own deviation from the mean template (a wide smile moves the
        # mouth corners about 6 px); a wrong point order or a broken warp would leave tens of pixels.
        residual = np.linalg.norm(expected - arcface_template(size), axis=1) * 112 / size
        assert residual.mean() < 5.0, (name, residual)
