"""Face and head masks from landmarks, on real photos, with and without dlib's 68 points; the release's square-kernel
morphology (``cv2.dilate`` with an all-ones kernel) checked against an independent dilation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from idfusion.faces import FaceAnalyzer
from idfusion.faces.masks import apply_mask, dilate_square, face_mask, feather, head_mask
from idfusion.images import load_image


@pytest.fixture(scope="module")
def analyzer():
    return FaceAnalyzer("hog", None, dense_landmarks=True, crops=())


@pytest.fixture(scope="module")
def photos(faces_dir, analyzer):
    """name -> (RGB array, faces left to right)."""
    out = {}
    for name in ("obama.jpg", "group_six_faces.jpg", "obama_partial_face.jpg"):
        pixels = load_image(faces_dir / name).array
        out[name] = (pixels, analyzer.analyze(pixels))
    return out


def square_dilate(mask: np.ndarray, side: int) -> np.ndarray:
    """Independent reference of the release's morphology, ``cv2.dilate(mask, np.ones((side, side)))``: each pixel of
    the mask lights the pixels at offsets ``-(side - 1 - side // 2) .. side // 2`` (OpenCV's kernel anchor is its
    centre ``side // 2``; an empty kernel, side 0, is read as 3x3)."""
    side = 3 if side == 0 else side
    anchor = side // 2
    src = np.asarray(mask) > 0
    height, width = src.shape
    out = np.zeros_like(src)
    for dy in range(-(side - 1 - anchor), anchor + 1):
        for dx in range(-(side - 1 - anchor), anchor + 1):
            # out[y + dy, x + dx] |= src[y, x], inside the image
            ys, yd = slice(max(0, -dy), min(height, height - dy)), slice(max(0, dy), min(height, height + dy))
            xs, xd = slice(max(0, -dx), min(width, width - dx)), slice(max(0, dx), min(width, width + dx))
            out[yd, xd] |= src[ys, xs]
    return out.astype(np.float32)


def _variants(face):
    """The face as analysed (68 points) and with only the 5 points and the box."""
    return {"dense": face, "five": dataclasses.replace(face, dense_landmarks=None)}


def _inside(mask, points):
    h, w = mask.shape
    xs = np.clip(np.round(points[:, 0]).astype(int), 0, w - 1)
    ys = np.clip(np.round(points[:, 1]).astype(int), 0, h - 1)
    on_image = (points[:, 0] >= 0) & (points[:, 0] < w) & (points[:, 1] >= 0) & (points[:, 1] < h)
    return mask[ys, xs][on_image]


@pytest.mark.parametrize("kind", ["dense", "five"])
@pytest.mark.parametrize("name", ["obama.jpg", "group_six_faces.jpg", "obama_partial_face.jpg"])
def test_masks_cover_the_face_and_not_the_background(photos, name, kind):
    pixels, faces = photos[name]
    shape = pixels.shape[:2]
    corners = np.array([[0, 0], [shape[1] - 1, 0], [0, shape[0] - 1], [shape[1] - 1, shape[0] - 1]])
    for original in faces:
        face = _variants(original)[kind]
        head, inner, tight = head_mask(face, shape), face_mask(face, shape), face_mask(face, shape, dilation=0.0)
        for mask in (head, inner):
            assert mask.dtype == np.float32 and mask.shape == shape
            assert set(np.unique(mask)) <= {0.0, 1.0}
            # eyes, nose and mouth corners are inside; the photo's corners far from the face are not
            assert np.all(_inside(mask, face.landmarks) == 1.0)
            centre = face.landmarks.mean(axis=0)
            far = [c for c in corners if np.linalg.norm(c - centre) > 2.5 * max(face.width, face.height)]
            assert far and not any(mask[int(y), int(x)] for x, y in far)
        assert np.all(head >= tight), "the head mask must contain the face mask"
        if kind == "dense":
            assert np.all(_inside(inner, face.dense_landmarks) == 1.0)
        # areas relative to the (tight, brows-to-lip) dlib box, counting the box's part inside the image
        x1, y1, x2, y2 = face.bbox
        box_area = (min(x2, shape[1]) - max(x1, 0)) * (min(y2, shape[0]) - max(y1, 0))
        assert 0.6 < inner.sum() / box_area < 2.2
        assert 1.3 < head.sum() / tight.sum() < 3.5
        # the head reaches well above the brows (hair), the face mask does not
        head_top, face_top = np.nonzero(head.any(axis=1))[0][0], np.nonzero(inner.any(axis=1))[0][0]
        if face_top > 0:
            assert face_top - head_top > 0.3 * face.height


def test_face_masks_of_a_group_stay_on_their_own_face(photos):
    pixels, faces = photos["group_six_faces.jpg"]
    assert len(faces) == 6
    masks = [face_mask(f, pixels.shape[:2]) for f in faces]
    for i, mask in enumerate(masks):
        for j, other in enumerate(faces):
            nose_x, nose_y = np.round(other.landmarks[2]).astype(int)
            assert mask[nose_y, nose_x] == (1.0 if i == j else 0.0)


def test_dilation_grows_the_mask_by_the_expected_margin(photos):
    pixels, (face,) = photos["obama.jpg"]
    shape = pixels.shape[:2]
    tight, grown = face_mask(face, shape, dilation=0.0), face_mask(face, shape, dilation=0.1)
    assert np.all(grown >= tight)
    # the margin is 0.1 * sqrt(box area) on every side: compare the widths of the masks
    margin = 0.1 * np.sqrt(face.area)
    width = lambda m: np.ptp(np.nonzero(m.any(axis=0))[0])  # noqa: E731
    assert abs((width(grown) - width(tight)) - 2 * margin) <= 3
    with pytest.raises(ValueError, match="dilation"):
        face_mask(face, shape, dilation=-0.1)
    with pytest.raises(ValueError, match="shape"):
        head_mask(face, (0, 10))


@pytest.mark.parametrize("kind", ["dense", "five"])
def test_masks_turn_with_the_face(photos, kind):
    pixels, (original,) = photos["obama.jpg"]
    face = _variants(original)[kind]
    side = max(pixels.shape[:2])
    shape = (side, side)

    def rot90(points):  # np.rot90 (counter-clockwise) maps (x, y) -> (y, side - 1 - x)
        points = np.asarray(points, dtype=np.float32).reshape(-1, 2)
        return np.stack([points[:, 1], side - 1 - points[:, 0]], axis=1)

    corners = rot90(face.bbox)  # (2, 2): the box's two corners, turned
    turned = dataclasses.replace(
        face,
        bbox=np.concatenate([corners.min(axis=0), corners.max(axis=0)]),
        landmarks=rot90(face.landmarks),
        dense_landmarks=None if face.dense_landmarks is None else rot90(face.dense_landmarks),
    )
    for fn in (face_mask, head_mask):
        expected, got = np.rot90(fn(face, shape)), fn(turned, shape)
        iou = np.logical_and(expected, got).sum() / np.logical_or(expected, got).sum()
        assert iou > 0.97, fn.__name__


def test_apply_mask_zeroes_the_background(photos):
    pixels, (face,) = photos["obama.jpg"]
    mask = head_mask(face, pixels.shape[:2])
    masked = apply_mask(pixels, mask)
    assert masked.dtype == np.uint8 and masked.shape == pixels.shape
    assert np.array_equal(masked[mask == 1], pixels[mask == 1])
    assert not masked[mask == 0].any()
    half = apply_mask(pixels, np.full(pixels.shape[:2], 0.5, dtype=np.float32))
    assert np.abs(half.astype(int) - np.round(pixels / 2).astype(int)).max() == 0
    with pytest.raises(ValueError, match="does not match"):
        apply_mask(pixels, mask[:-1])


def test_feather_softens_only_the_edge():
    mask = np.zeros((200, 200), dtype=np.float32)
    mask[50:150, 50:150] = 1.0
    assert np.array_equal(feather(mask, 0), mask)
    soft = feather(mask, 10)
    assert soft.dtype == np.float32 and 0.0 <= soft.min() and soft.max() <= 1.0
    # beyond the kernel radius: exactly 0 outside, 1 inside (to float rounding of the kernel sum)
    assert not soft[:39].any() and not soft[:, 161:].any()
    assert np.all(soft[61:139, 61:139] > 0.9999)
    # a ramp across the edge, half way at the edge
    row = soft[100, 35:66]
    assert np.all(np.diff(row) >= 0) and 0.3 < soft[100, 50] < 0.7
    with pytest.raises(ValueError, match="radius_px"):
        feather(mask, -1)


@pytest.mark.parametrize("side", [0, 1, 2, 3, 4, 7])
def test_dilate_square_is_the_release_kernel(side):
    rng = np.random.default_rng(side)
    mask = (rng.random((40, 50)) > 0.97).astype(np.float32)
    mask[0, 0] = mask[-1, -1] = mask[20, 0] = 1.0  # on the borders too
    got = dilate_square(mask, side)
    assert got.dtype == np.float32 and got.shape == mask.shape
    np.testing.assert_array_equal(got, square_dilate(mask, side))
    with pytest.raises(ValueError, match="side"):
        dilate_square(mask, -1)


@pytest.mark.parametrize("kind", ["dense", "five"])
def test_head_mask_grows_by_the_release_kernel_side(photos, kind):
    """The release (``get_mask_head``): (face | hair) dilated with an all-ones kernel of side
    max(int(sqrt(face area) / 20), 1), then the face added back. The fraction is a kernel side, so the bounding box
    grows by side - 1 pixels, not by a radius on each side."""
    pixels, (original,) = photos["obama.jpg"]
    face = _variants(original)[kind]
    shape = pixels.shape[:2]
    tight = face_mask(face, shape, dilation=0.0)
    region = head_mask(face, shape, kernel_divisor=1e12)  # kernel side 1: the undilated head | face
    assert np.all(region >= tight)
    side = max(int(np.sqrt(tight.sum()) / 20), 1)
    assert side > 3  # a real growth on this photo
    expected = np.maximum(square_dilate(region, side), tight)
    head = head_mask(face, shape)
    np.testing.assert_array_equal(head, expected)

    columns = np.nonzero(head.any(axis=0))[0]
    assert columns[0] > 0 and columns[-1] < shape[1] - 1  # not cut by the photo's sides (its top cuts the hair)
    assert np.ptp(columns) - np.ptp(np.nonzero(region.any(axis=0))[0]) == side - 1
    # the previous rule (a disc of radius 0.1 * sqrt(box area)) grew about 5x further
    assert 2 * 0.1 * np.sqrt(face.area) > 4 * (side - 1)
    with pytest.raises(ValueError, match="kernel_divisor"):
        head_mask(face, shape, kernel_divisor=0)
