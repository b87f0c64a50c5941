"""The fixed-template flow: face selection, crop geometry, exact paste-back, and the whole flow with a fake inpainter.

The release's rules (``facechain/inference_inpaint_fact.py``: ``segment``, the Canny condition, the face selection
and black-out of ``GenPortrait_inpaint.__call__``) are checked against independent computations written here."""

from __future__ import annotations

import dataclasses
import hashlib

import cv2
import numpy as np
import PIL.Image
import pytest

from idfusion.errors import FaceIndexError, NoFaceError
from idfusion.faces import Detection, Face, FaceAnalyzer
from idfusion.faces.masks import face_mask
from idfusion.flows.template import (
    TemplateCrop,
    TemplatePortrait,
    canny_condition,
    crop_face,
    crop_with_padding,
    default_feather_px,
    inpaint_mask,
    paste_back,
    place_mask,
    select_template_faces,
    square_crop_box,
)
from idfusion.images import load_image

GREEN = (0, 255, 0)


def make_face(cx: float, cy: float, size: float = 100.0) -> Face:
    """An upright synthetic face whose box is ``size`` wide and tall, centred on ``(cx, cy)``."""
    s = size / 100.0
    landmarks = np.array([[-20, -15], [20, -15], [0, 5], [-15, 25], [15, 25]], dtype=np.float32) * s + [cx, cy]
    bbox = np.array([cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2], dtype=np.float32)
    return Face(bbox=bbox, det_score=1.0, landmarks=landmarks.astype(np.float32), detector="test")


@pytest.fixture(scope="module")
def analyzer():
    return FaceAnalyzer("hog", None, dense_landmarks=True, crops=())


class SolidInpaint:
    """A fake inpainter: records what it was given and returns a solid colour crop."""

    def __init__(self, colour=GREEN):
        self.colour = colour
        self.calls: list[TemplateCrop] = []

    def __call__(self, crop: TemplateCrop) -> PIL.Image.Image:
        self.calls.append(crop)
        return PIL.Image.new("RGB", crop.image.size, self.colour)


def square_dilate(mask: np.ndarray, side: int) -> np.ndarray:
    """Independent reference of ``cv2.dilate(mask, np.ones((side, side)))`` (anchor ``side // 2``; side 0 = 3x3)."""
    side = 3 if side == 0 else side
    low, high = -(side - 1 - side // 2), side // 2
    src = np.pad(np.asarray(mask) > 0, side)
    out = np.zeros_like(src)
    for dy in range(low, high + 1):
        for dx in range(low, high + 1):
            out |= np.roll(src, (dy, dx), axis=(0, 1))  # the padding keeps the roll from wrapping
    return out[side:-side, side:-side].astype(np.float32)


def release_segment(face_region: np.ndarray, *, ksize: float, eyeh: int, ksize1: float = 0.0, warp_mask=None):
    """The release's ``segment`` on a face region: grow by a square kernel of side int(sqrt(area) * ksize1), then
    below the eye row ``eyeh`` by one of side int(sqrt(area of that) * ksize), limited to (mask | warp_mask)."""
    mask = face_region.astype(np.float32)
    if ksize1 > 0:
        mask = square_dilate(mask, int(np.sqrt(mask.sum()) * ksize1))
    if ksize > 0:
        wide = square_dilate(mask, int(np.sqrt(mask.sum()) * ksize))
        if warp_mask is not None:
            wide = wide * np.clip(mask + warp_mask, 0, 1)
        mask = np.concatenate([mask[:eyeh], wide[eyeh:]]) if eyeh > 0 else wide
    return mask


def tilted(face: Face, degrees: float) -> Face:
    """``face`` turned about its box centre (image coordinates)."""
    centre = (face.bbox[:2] + face.bbox[2:]) / 2
    angle = np.deg2rad(degrees)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]], dtype=np.float32)
    return dataclasses.replace(face, landmarks=((face.landmarks - centre) @ rotation.T + centre).astype(np.float32))


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- selection -------------------------------------------------------------------------------------------------


def test_selection_is_left_to_right_by_box_left_edge():
    faces = [make_face(500, 100), make_face(100, 300), make_face(300, 50, size=400)]
    assert select_template_faces(faces, "all", "t.jpg") == [1, 2, 0]
    assert select_template_faces(faces, 0, "t.jpg") == [1]
    assert select_template_faces(faces, 2, "t.jpg") == [0]
    assert select_template_faces(faces, -1, "t.jpg") == [0]
    assert select_template_faces(faces, np.int64(1), "t.jpg") == [2]


def test_selection_keeps_the_num_faces_largest_ordered_by_left_edge():
    # the release: argsort(areas)[::-1][:num_faces], then argsort of the boxes' left edges (not their centres)
    faces = [make_face(260, 100, size=60), make_face(300, 300, size=400), make_face(150, 100, size=80)]
    lefts = [float(f.bbox[0]) for f in faces]  # 230, 100, 110: centres 260, 300, 150 would order them 2, 0, 1
    assert select_template_faces(faces, "all", "t.jpg") == sorted(range(3), key=lambda i: lefts[i]) == [1, 2, 0]
    largest = sorted(range(3), key=lambda i: -faces[i].area)[:2]
    assert select_template_faces(faces, "all", "t.jpg", num_faces=2) == sorted(largest, key=lambda i: lefts[i])
    assert select_template_faces(faces, "all", "t.jpg", num_faces=2) == [1, 2]
    assert select_template_faces(faces, 1, "t.jpg", num_faces=2) == [2]
    assert select_template_faces(faces, 0, "t.jpg", num_faces=1) == [1]
    with pytest.raises(FaceIndexError, match="num_faces is 4, but the template has 3 face"):
        select_template_faces(faces, 0, "t.jpg", num_faces=4)
    with pytest.raises(FaceIndexError, match="kept"):
        select_template_faces(faces, 2, "t.jpg", num_faces=2)
    with pytest.raises(ValueError, match="num_faces"):
        select_template_faces(faces, 0, "t.jpg", num_faces=0)


def test_selection_errors_name_the_template_and_the_count():
    faces = [make_face(100, 100), make_face(300, 100)]
    with pytest.raises(NoFaceError, match=r"^t\.jpg: no face found in the template"):
        select_template_faces([], 0, "t.jpg")
    with pytest.raises(FaceIndexError, match=r"^t\.jpg: face index 2 requested, but the template has 2 face\(s\)"):
        select_template_faces(faces, 2, "t.jpg")
    with pytest.raises(FaceIndexError, match="has 2 face"):
        select_template_faces(faces, -3, "t.jpg")
    for bad in ("first", True, 1.0):
        with pytest.raises(ValueError, match="face_index must be 'all' or an integer"):
            select_template_faces(faces, bad, "t.jpg")


# --- geometry ----------------------------------------------------------------------------------------------------


def test_square_crop_box_is_centred_and_the_face_fills_its_fraction():
    face = make_face(300.3, 200.7, size=140)
    face.bbox[3] += 20  # taller than wide: the longer side decides
    x0, y0, x1, y1 = square_crop_box(face)
    assert all(isinstance(v, int) for v in (x0, y0, x1, y1))
    assert x1 - x0 == y1 - y0 == round(160 / 0.7)
    assert abs((x0 + x1) / 2 - 300.3) <= 0.5 and abs((y0 + y1) / 2 - 210.7) <= 0.5
    assert square_crop_box(face, face_fraction=0.5)[2] - square_crop_box(face, face_fraction=0.5)[0] == 320
    # near the border the box leaves the image
    assert square_crop_box(make_face(20, 30, size=70))[:2] == (-30, -20)
    with pytest.raises(ValueError, match="face_fraction"):
        square_crop_box(face, face_fraction=0)


def test_crop_with_padding_zero_pads_outside_the_image():
    rng = np.random.default_rng(0)
    image = rng.integers(1, 256, size=(60, 80, 3), dtype=np.uint8)  # no zeros, so padding is visible
    crop = crop_with_padding(image, (-10, -5, 40, 45))
    assert crop.shape == (50, 50, 3) and crop.dtype == np.uint8
    assert not crop[:5].any() and not crop[:, :10].any()
    assert np.array_equal(crop[5:, 10:], image[:45, :40])
    inside = crop_with_padding(image, (10, 10, 30, 30))
    assert np.array_equal(inside, image[10:30, 10:30])
    assert not crop_with_padding(image, (100, 100, 120, 120)).any()
    assert crop_with_padding(image, (-10, -5, 40, 45), size=512).shape == (512, 512, 3)
    assert crop_with_padding(image[..., 0], (70, 50, 90, 70)).shape == (20, 20)
    with pytest.raises(ValueError, match="positive size"):
        crop_with_padding(image, (10, 10, 10, 20))


def test_crop_face_maps_points_into_the_resized_crop():
    face = make_face(120, 80)
    box = (20, -20, 220, 180)
    local = crop_face(face, box, size=400)
    np.testing.assert_allclose(local.landmarks, (face.landmarks - [20, -20]) * 2.0)
    np.testing.assert_allclose(local.bbox, [100, 100, 300, 300])
    assert local.landmarks.dtype == np.float32 and face.bbox[0] == 70  # the original is untouched


def test_paste_back_is_exact_where_alpha_is_zero():
    rng = np.random.default_rng(1)
    template = rng.integers(0, 256, size=(120, 150, 3), dtype=np.uint8)
    before = template.copy()
    result = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), dtype=np.float32)
    mask[16:48, 16:48] = 1.0
    mask[20:44, 10:16] = 1e-7  # tiny alphas must not disturb the exactness rule elsewhere
    box = (-20, 40, 80, 140)  # leaves the image on the left and at the bottom
    out = paste_back(template, result, box, mask)
    alpha = place_mask(mask, box, template.shape[:2])
    assert out.shape == template.shape and out.dtype == np.uint8
    assert np.array_equal(template, before), "the template must not be modified in place"
    assert np.array_equal(out[alpha == 0], template[alpha == 0])
    assert (alpha == 0).sum() > 0.8 * alpha.size and (alpha == 1).sum() > 0
    # where alpha is 1 the result shows, resized to the 100 px box
    resized = np.asarray(PIL.Image.fromarray(result).resize((100, 100), PIL.Image.BILINEAR)).astype(int)
    full = np.zeros((120, 150, 3), dtype=int)
    full[40:120, 0:80] = resized[:80, 20:100]
    diff = np.abs(out.astype(int) - full)[alpha == 1]
    assert np.median(diff) <= 2
    # a box entirely outside the image changes nothing
    assert np.array_equal(paste_back(template, result, (200, 200, 300, 300), mask), template)


@pytest.mark.parametrize("degrees", [0.0, 20.0])
def test_inpaint_mask_is_the_release_rule(degrees):
    """Stage B's repaint mask: ``segment(ksize=0.1, ksize1=0.04, eyeh=int(mean eye y))`` on the face region, with the
    eye line an image row even for a tilted face."""
    face = tilted(make_face(256, 256, size=300), degrees)
    shape = (512, 512)
    region = face_mask(face, shape, dilation=0.0)
    eyeh = int((face.landmarks[0, 1] + face.landmarks[1, 1]) / 2)
    expected = release_segment(region, ksize=0.1, ksize1=0.04, eyeh=eyeh)
    mask = inpaint_mask(face, shape)
    assert mask.dtype == np.float32
    np.testing.assert_array_equal(mask, expected)
    grown = release_segment(region, ksize=0.0, ksize1=0.04, eyeh=eyeh)
    assert np.array_equal(mask[:eyeh], grown[:eyeh]) and mask[eyeh:].sum() > grown[eyeh:].sum() * 1.05
    # smaller than the old rule, which used the fraction as a radius: face_mask(dilation=0.04) is already larger
    # than the release's whole first step
    assert face_mask(face, shape, dilation=0.04).sum() > grown.sum()
    # the warped generated face limits the growth below the eyes; idfusion's tilted eye line is an option
    limit = np.zeros(shape, np.float32)
    limit[:, :256] = 1.0
    np.testing.assert_array_equal(
        inpaint_mask(face, shape, limit=limit),
        release_segment(region, ksize=0.1, ksize1=0.04, eyeh=eyeh, warp_mask=limit),
    )
    rows = np.nonzero((inpaint_mask(face, shape, eye_line="tilted") != mask).any(axis=1))[0]
    assert set(rows) <= {eyeh} if degrees == 0.0 else len(rows) > 10  # upright: the same line (but its own row)
    with pytest.raises(ValueError, match="eye_line"):
        inpaint_mask(face, shape, eye_line="diagonal")


def test_canny_condition_is_the_release_rule(faces_dir, analyzer):
    """Stage B's Canny condition: ``cv2.Canny(crop, 100, 200)`` of the RGB crop, times ``1 - segment(ksize=0.05,
    eyeh)`` (the face grown below the eye row only), as three channels."""
    pixels = load_image(faces_dir / "obama.jpg").array
    (face,) = analyzer.analyze(pixels)
    box = square_crop_box(face)
    crop = PIL.Image.fromarray(crop_with_padding(pixels, box, 512))
    local = crop_face(face, box, 512)
    edges = cv2.Canny(np.asarray(crop), 100, 200)
    eyeh = int((local.landmarks[0, 1] + local.landmarks[1, 1]) / 2)
    removed = release_segment(face_mask(local, (512, 512), dilation=0.0), ksize=0.05, eyeh=eyeh)
    expected = np.stack([(edges * (1.0 - removed)).astype(np.uint8)] * 3, axis=-1)
    full, masked = np.asarray(canny_condition(crop)), np.asarray(canny_condition(crop, local))
    np.testing.assert_array_equal(full, np.stack([edges] * 3, axis=-1))
    np.testing.assert_array_equal(masked, expected)
    assert full[removed > 0].any() and masked[removed == 0].sum() > 0  # hair, ears and collar edges are kept


# --- the flow ----------------------------------------------------------------------------------------------------


def test_one_face_is_repainted_and_everything_else_is_kept(faces_dir, analyzer, tmp_path):
    path = tmp_path / "obama.jpg"
    path.write_bytes((faces_dir / "obama.jpg").read_bytes())
    digest = _digest(path)
    inpaint = SolidInpaint()
    seen_by_hook = []

    def hook(image, face):
        seen_by_hook.append((image.size, face.landmarks.copy()))
        return canny_condition(image, face)

    portrait = TemplatePortrait(inpaint, analyzer=analyzer, control_hooks={"canny": hook})
    out = portrait(path)

    template = load_image(path).array
    result = np.asarray(out.image)
    assert out.image.size == (template.shape[1], template.shape[0]) and out.image.mode == "RGB"
    assert len(out.faces) == len(out.boxes) == len(out.masks) == 1
    (alpha,) = out.masks
    assert alpha.shape == template.shape[:2] and alpha.dtype == np.float32
    assert np.array_equal(result[alpha == 0], template[alpha == 0])
    assert (alpha == 0).mean() > 0.8
    # the face centre shows the repainted crop
    cx, cy = np.round(out.faces[0].landmarks[:3].mean(axis=0)).astype(int)
    assert alpha[cy, cx] > 0.999 and tuple(result[cy, cx]) == GREEN
    assert _digest(path) == digest

    (crop,) = inpaint.calls
    assert crop.image.size == (512, 512) and crop.image.mode == "RGB" and crop.index == 0
    assert crop.mask_image.mode == "L" and set(np.unique(np.asarray(crop.mask_image))) == {0, 255}
    assert set(crop.control_images) == {"canny"} and crop.control_images["canny"].size == (512, 512)
    assert np.all((crop.face.landmarks > 0) & (crop.face.landmarks < 512))
    assert seen_by_hook[0][0] == (512, 512) and np.array_equal(seen_by_hook[0][1], crop.face.landmarks)
    # the repaint mask covers the eyes, nose and mouth of the crop
    mask = np.asarray(crop.mask_image)
    xs, ys = np.round(crop.face.landmarks).astype(int).T
    assert np.all(mask[ys, xs] == 255)
    assert crop.box == out.boxes[0] == square_crop_box(out.faces[0])


def test_group_photo_all_faces(faces_dir, analyzer):
    path = faces_dir / "group_six_faces.jpg"
    inpaint = SolidInpaint()
    out = TemplatePortrait(inpaint, analyzer=analyzer)(path, "all")
    template = load_image(path).array
    result = np.asarray(out.image)
    assert result.shape == template.shape
    assert [c.index for c in inpaint.calls] == list(range(6))
    centres = [(f.bbox[0] + f.bbox[2]) / 2 for f in out.faces]
    assert centres == sorted(centres)
    untouched = np.all([m == 0 for m in out.masks], axis=0)
    assert np.array_equal(result[untouched], template[untouched])
    for face in out.faces:
        x, y = np.round(face.landmarks[2]).astype(int)
        assert tuple(result[y, x]) == GREEN
    # each paste alpha stays off the other faces' boxes
    for i, alpha in enumerate(out.masks):
        for j, other in enumerate(out.faces):
            if i != j:
                x1, y1, x2, y2 = np.round(other.bbox).astype(int)
                assert not alpha[max(y1, 0) : y2, max(x1, 0) : x2].any()


def test_group_photo_one_face_leaves_the_others_unchanged(faces_dir, analyzer):
    path = faces_dir / "group_six_faces.jpg"
    all_faces = analyzer.analyze(path)
    out = TemplatePortrait(SolidInpaint(), analyzer=analyzer)(path, face_index=2)
    template = load_image(path).array
    result = np.asarray(out.image)
    np.testing.assert_allclose(out.faces[0].bbox, all_faces[2].bbox)
    for j, other in enumerate(all_faces):
        x1, y1, x2, y2 = np.round(other.bbox).astype(int)
        same = np.array_equal(result[y1:y2, x1:x2], template[y1:y2, x1:x2])
        assert same == (j != 2)
    with pytest.raises(FaceIndexError, match="face index 6 requested, but the template has 6 face"):
        TemplatePortrait(SolidInpaint(), analyzer=analyzer)(path, face_index=6)


class FixedDetector:
    """A detector that reports given faces, to place faces closer together than any test photo has them."""

    name = "fixed"

    def __init__(self, faces: list[Face]):
        self.faces = faces

    def detect(self, image):
        return [Detection(bbox=f.bbox.copy(), score=1.0, landmarks=f.landmarks.copy()) for f in self.faces]


def test_touching_faces_protect_each_other():
    rng = np.random.default_rng(2)
    template = rng.integers(0, 256, size=(300, 400, 3), dtype=np.uint8)
    left, right = make_face(150, 150), make_face(235, 150)
    analyzer = FaceAnalyzer(FixedDetector([right, left]), None, crops=())
    # without protection the left face's repaint mask would reach into the right face's box
    assert face_mask(left, template.shape[:2], dilation=0.1)[100:200, 185:200].any()

    out = TemplatePortrait(SolidInpaint(), analyzer=analyzer)(template, face_index=0)
    result = np.asarray(out.image)
    (alpha,) = out.masks
    assert not alpha[100:200, 185:285].any()
    assert np.array_equal(result[100:200, 185:285], template[100:200, 185:285])
    assert np.array_equal(result[alpha == 0], template[alpha == 0])
    assert tuple(result[155, 150]) == GREEN

    out = TemplatePortrait(SolidInpaint(), analyzer=analyzer)(template, face_index="all")
    result = np.asarray(out.image)
    assert tuple(result[155, 150]) == tuple(result[155, 235]) == GREEN
    assert not out.masks[0][100:200, 185:285].any() and not out.masks[1][100:200, 100:200].any()


def test_the_other_kept_faces_are_blacked_out_in_the_crop_being_inpainted():
    """The release blacks out the boxes (truncated to integers) of the other ``num_faces`` template faces in the
    picture it crops and inpaints; faces beyond ``num_faces`` are left as they are."""
    rng = np.random.default_rng(3)
    template = rng.integers(1, 256, size=(300, 400, 3), dtype=np.uint8)  # no zeros: black-out is visible
    chosen = make_face(150.4, 150.2, size=70)  # crop side round(70 / 0.7) = 100 = the work size: no resize
    bigger = make_face(230.6, 150.3, size=90)  # kept (one of the 2 largest), its box reaches into the crop
    smaller = make_face(95.3, 150.1, size=40)  # not kept, also inside the crop
    analyzer = FaceAnalyzer(FixedDetector([bigger, chosen, smaller]), None, crops=())
    inpaint = SolidInpaint()
    out = TemplatePortrait(inpaint, analyzer=analyzer, num_faces=2, work_size=100)(template, face_index=0)
    (crop,) = inpaint.calls
    assert crop.index == 0 and np.allclose(out.faces[0].bbox, chosen.bbox)
    seen = template.copy()
    x1, y1, x2, y2 = (int(v) for v in bigger.bbox)
    seen[y1:y2, x1:x2] = 0
    x0, y0, x1, y1 = square_crop_box(chosen)
    assert (x1 - x0, y1 - y0) == (100, 100)
    np.testing.assert_array_equal(np.asarray(crop.image), seen[y0:y1, x0:x1])
    # the not-kept face shows in the crop; nothing outside the chosen face's paste mask changed
    sx1, sy1, sx2, sy2 = (int(v) for v in smaller.bbox)
    np.testing.assert_array_equal(np.asarray(crop.image)[sy1 - y0 : sy2 - y0, : sx2 - x0], template[sy1:sy2, x0:sx2])
    result = np.asarray(out.image)
    np.testing.assert_array_equal(result[out.masks[0] == 0], template[out.masks[0] == 0])
    # black_out_others=False shows the kept faces as they are (idfusion's option)
    inpaint = SolidInpaint()
    TemplatePortrait(inpaint, analyzer=analyzer, num_faces=2, work_size=100, black_out_others=False)(template)
    np.testing.assert_array_equal(np.asarray(inpaint.calls[0].image), template[y0:y1, x0:x1])


def test_face_near_the_border_and_five_point_masks(faces_dir):
    # obama_partial_face's face is cut by the left edge: the crop is zero-padded and the output keeps its size
    path = faces_dir / "obama_partial_face.jpg"
    inpaint = SolidInpaint()
    analyzer = FaceAnalyzer("hog", None, dense_landmarks=False, crops=())
    out = TemplatePortrait(inpaint, analyzer=analyzer, feather_px=0)(path)
    template = load_image(path).array
    assert out.image.size == (template.shape[1], template.shape[0])
    assert out.boxes[0][0] < 0 and out.faces[0].dense_landmarks is None
    crop = np.asarray(inpaint.calls[0].image)
    assert not crop[:, :10].any()  # padding on the left
    (alpha,) = out.masks
    soft = (alpha > 0) & (alpha < 1)  # feather_px=0: only resizing the 512 mask to the box softens its edge
    assert soft.sum() < 0.05 * (alpha > 0).sum()
    result = np.asarray(out.image)
    assert np.array_equal(result[alpha == 0], template[alpha == 0])
    assert np.all(result[alpha == 1] == GREEN)


def test_exif_orientation_is_applied_and_the_file_is_kept(faces_dir, analyzer, tmp_path):
    upright = PIL.Image.open(faces_dir / "obama.jpg").convert("RGB")
    stored = upright.transpose(PIL.Image.Transpose.ROTATE_90)  # orientation 6 turns it back upright
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    stored.save(path, exif=exif, quality=95)
    digest = _digest(path)
    out = TemplatePortrait(SolidInpaint(), analyzer=analyzer)(path)
    assert out.image.size == upright.size != stored.size
    assert _digest(path) == digest


def test_hooks_retouch_and_mask_fn_are_used(faces_dir, analyzer):
    path = faces_dir / "obama.jpg"

    def square(face, shape):
        mask = np.zeros(shape, dtype=np.float32)
        mask[200:300, 200:300] = 1.0
        return mask

    out = TemplatePortrait(
        SolidInpaint(),
        analyzer=analyzer,
        mask_fn=square,
        retouch=lambda image: PIL.Image.new("RGB", image.size, (0, 0, 255)),
        feather_px=0,
    )(path)
    x0, y0, x1, _ = out.boxes[0]
    scale = (x1 - x0) / 512
    result = np.asarray(out.image)
    cx, cy = int(x0 + 250 * scale), int(y0 + 250 * scale)
    assert tuple(result[cy, cx]) == (0, 0, 255)
    assert (out.masks[0] > 0).sum() == pytest.approx((100 * scale) ** 2, rel=0.1)


def test_flow_errors(analyzer, faces_dir, tmp_path):
    blank = tmp_path / "blank.png"
    PIL.Image.new("RGB", (300, 200), (120, 130, 140)).save(blank)
    portrait = TemplatePortrait(SolidInpaint(), analyzer=analyzer)
    with pytest.raises(NoFaceError, match=rf"^{blank}: template has no face to repaint"):
        portrait(blank)
    with pytest.raises(ValueError, match="face_index"):
        portrait(blank, face_index="first")
    with pytest.raises(TypeError, match="must return a PIL image"):
        TemplatePortrait(lambda crop: np.zeros((512, 512, 3), np.uint8), analyzer=analyzer)(faces_dir / "obama.jpg")


def test_default_feather_follows_the_official_kernel():
    # official ksize = 10 * cropl / 256 -> 10 px at a 512 working size; kernel 2 * floor(1.8 * 10) + 1 = 37
    assert default_feather_px(512) == 18
    assert default_feather_px(1024) == 36
    assert TemplatePortrait(SolidInpaint(), analyzer=None).feather_px == 18
