"""Pose conditions: OpenPose skeleton drawing, DWPose decoding, the COCO -> OpenPose mapping, and the estimator
end to end with tiny ONNX models."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from idfusion.errors import IdfusionError, ModelFilesError
from idfusion.pose import (
    BODY_COLORS,
    OPENPOSE_BODY_NAMES,
    DWPoseEstimator,
    NoPoseError,
    PoseKeypoints,
    default_pose_model_dir,
    draw_openpose,
    find_pose_models,
    looks_like_skeleton,
    pad_geometry,
    pose_condition,
    resolve_pose_model_dir,
    wholebody_to_openpose,
)
from idfusion.pose.dwpose import (
    RTMPOSE_MEAN,
    RTMPOSE_STD,
    box_to_center_scale,
    crop_matrix,
    crop_to_image,
    fix_aspect_ratio,
    nms,
    rtmpose_input,
    simcc_decode,
    yolox_letterbox,
    yolox_person_boxes,
)
from idfusion.pose.openpose import HAND_EDGES, LIMB_SEQUENCE, hand_edge_color
from idfusion.testing.onnx_pose import MISSING_COCO_POINT, export_tiny_rtmpose, write_dwpose

# ----------------------------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------------------------

# A front-facing person on a 400 x 450 canvas, joints far enough apart that limb midpoints sit clear of joints.
BODY = np.array(
    [
        (200, 50), (200, 100), (140, 100), (140, 160), (140, 220), (260, 100), (260, 160), (260, 220), (170, 260),
        (170, 330), (170, 400), (230, 260), (230, 330), (230, 400), (185, 40), (215, 40), (170, 45), (230, 45),
    ],
    dtype=np.float32,
)  # fmt: skip
SIZE = (450, 400)


def _pixel(image: Image.Image, xy) -> tuple[int, ...]:
    return tuple(int(v) for v in np.asarray(image)[int(xy[1]), int(xy[0])])


def _dim(colour) -> tuple[int, ...]:
    return tuple(int(c * 0.6) for c in colour)


def _hand(wrist=(300.0, 300.0), step=25.0) -> np.ndarray:
    """21 points: a wrist and five straight fingers fanning from straight up to 60 degrees right of it."""
    points = [wrist]
    for finger in range(5):
        angle = math.radians(-90 + 15 * finger)
        for joint in range(1, 5):
            points.append((wrist[0] + step * joint * math.cos(angle), wrist[1] + step * joint * math.sin(angle)))
    return np.array(points, dtype=np.float32)


def test_annotator_tables():
    assert len(BODY_COLORS) == len(OPENPOSE_BODY_NAMES) == 18
    assert len(LIMB_SEQUENCE) == 17  # the annotator's last two limbs (shoulder-ear) are never drawn
    # The annotator's table is 1-based; spot-check a few limbs by name.
    names = OPENPOSE_BODY_NAMES
    assert [(names[a], names[b]) for a, b in LIMB_SEQUENCE[:2]] == [
        ("neck", "right_shoulder"),
        ("neck", "left_shoulder"),
    ]
    assert (names[LIMB_SEQUENCE[12][0]], names[LIMB_SEQUENCE[12][1]]) == ("neck", "nose")
    assert len(HAND_EDGES) == 20 and all(b == a + 1 or a == 0 for a, b in HAND_EDGES)
    assert [round(c) for c in hand_edge_color(0)] == [255, 0, 0]
    assert [round(c) for c in hand_edge_color(10)] == [0, 255, 255]


def test_limbs_are_dimmed_and_joints_are_full_colour():
    image = draw_openpose([PoseKeypoints(BODY)], SIZE)
    assert image.size == (400, 450) and image.mode == "RGB"
    for limb in (0, 2, 6, 9, 12):  # neck-rshoulder, rshoulder-relbow, neck-rhip, neck-lhip, neck-nose
        a, b = LIMB_SEQUENCE[limb]
        assert _pixel(image, (BODY[a] + BODY[b]) / 2) == _dim(BODY_COLORS[limb]), limb
    for joint in range(18):
        assert _pixel(image, BODY[joint]) == BODY_COLORS[joint], joint
    # Stick half-width 4: the vertical limb at x = 140 covers x = 136..144.
    row = np.asarray(image)[130, 120:160].any(axis=1)
    assert (np.flatnonzero(row) + 120).tolist() == list(range(136, 145))
    assert _pixel(image, (5, 5)) == (0, 0, 0)


def test_missing_points_and_their_limbs_are_not_drawn():
    body = BODY.copy()
    body[6] = np.nan  # left elbow missing
    scores = np.ones(18, np.float32)
    scores[10] = 0.3  # right ankle at the threshold: skipped (strictly above is drawn)
    image = draw_openpose([PoseKeypoints(body, scores)], SIZE)
    assert _pixel(image, BODY[6]) == (0, 0, 0)
    assert _pixel(image, (BODY[5] + BODY[6]) / 2) == (0, 0, 0)  # limb 4: lshoulder-lelbow
    assert _pixel(image, (BODY[6] + BODY[7]) / 2) == (0, 0, 0)  # limb 5: lelbow-lwrist
    assert _pixel(image, BODY[7]) == BODY_COLORS[7]  # the wrist itself is still there
    assert _pixel(image, BODY[10]) == (0, 0, 0)
    assert _pixel(image, (BODY[9] + BODY[10]) / 2) == (0, 0, 0)
    assert _pixel(image, (BODY[8] + BODY[9]) / 2) == _dim(BODY_COLORS[7])


def test_hands_and_face_follow_their_flags():
    hand = _hand()
    face = np.full((68, 2), np.nan, np.float32)
    face[0] = (60, 400)
    person = PoseKeypoints(BODY, hands=[hand], face=face)
    with_hands = draw_openpose([person], SIZE)
    edge0 = (hand[0] + hand[1]) / 2
    edge10 = (hand[10] + hand[11]) / 2
    assert _pixel(with_hands, edge0) == (255, 0, 0)
    assert _pixel(with_hands, edge10) == (0, 255, 255)
    assert _pixel(with_hands, hand[20]) == (0, 0, 255)
    assert _pixel(with_hands, face[0]) == (0, 0, 0)  # no face by default

    without = draw_openpose([person], SIZE, hands=False, face=True)
    assert _pixel(without, edge0) == (0, 0, 0)
    assert _pixel(without, hand[20]) == (0, 0, 0)
    assert _pixel(without, face[0]) == (255, 255, 255)
    # Body pixels are the same either way (the hand does not touch the body).
    assert _pixel(without, BODY[3]) == _pixel(with_hands, BODY[3]) == BODY_COLORS[3]


def test_joint_radius_and_hand_line_width():
    body = np.full((18, 2), np.nan, np.float32)
    body[0] = (50, 40)  # a lone nose: a disc of radius 4, no limbs
    hand = np.full((21, 2), np.nan, np.float32)
    hand[0], hand[1] = (20, 80), (80, 80)  # one horizontal 2 px edge
    pixels = np.asarray(draw_openpose([PoseKeypoints(body, hands=[hand])], (120, 100)))
    assert np.flatnonzero(pixels[40].any(axis=1)).tolist() == list(range(46, 55))
    assert np.flatnonzero(pixels[:, 40].any(axis=1)).tolist() == [79, 80, 81]
    assert np.flatnonzero(pixels[:, 20].any(axis=1)).tolist() == list(range(76, 85))  # the wrist's disc


def test_low_scoring_hand_points_are_skipped():
    hand = _hand()
    scores = np.ones(21, np.float32)
    scores[1] = 0.29
    image = draw_openpose([PoseKeypoints(BODY, hands=[hand], hand_scores=[scores])], SIZE)
    assert _pixel(image, hand[1]) == (0, 0, 0)
    assert _pixel(image, (hand[0] + hand[1]) / 2) == (0, 0, 0)
    assert _pixel(image, (hand[1] + hand[2]) / 2) == (0, 0, 0)
    assert _pixel(image, (hand[2] + hand[3]) / 2) == tuple(round(c) for c in hand_edge_color(2))


def test_empty_and_bad_input():
    assert not np.asarray(draw_openpose([], (64, 32))).any()
    assert draw_openpose([], (64, 32)).size == (32, 64)
    with pytest.raises(ValueError, match="shape"):
        PoseKeypoints(np.zeros((17, 2)))
    with pytest.raises(ValueError, match="size"):
        draw_openpose([], (0, 10))


# ----------------------------------------------------------------------------------------------------------------
# Fitting to the output size, skeleton detection
# ----------------------------------------------------------------------------------------------------------------


def test_pad_geometry_follows_img_pad():
    assert pad_geometry((1000, 500), (512, 512)) == (512, 256, 0, 128)  # tall: centred
    assert pad_geometry((1000, 499), (512, 512)) == (512, 255, 0, 128)  # the odd column goes right
    assert pad_geometry((500, 1000), (512, 512)) == (256, 512, 256, 0)  # wide: padded on top only
    assert pad_geometry((512, 512), (512, 512)) == (512, 512, 0, 0)
    assert pad_geometry((300, 400), (768, 512)) == (384, 512, 384, 0)


def test_skeleton_passes_through_and_is_padded(tmp_path):
    skeleton = draw_openpose([PoseKeypoints(BODY)], SIZE)
    path = tmp_path / "skeleton.png"
    skeleton.save(path)

    def no_estimator(_):
        raise AssertionError("a skeleton must not go through the estimator")

    same = pose_condition(path, SIZE, estimator=no_estimator)
    assert same.size == skeleton.size
    assert np.array_equal(np.asarray(same), np.asarray(skeleton))

    # Tall into a square: same height, so the pixels are copied, centred with black columns either side.
    square = np.asarray(pose_condition(path, (450, 450), estimator=no_estimator))
    assert np.array_equal(square[:, 25:425], np.asarray(skeleton))
    assert not square[:, :25].any() and not square[:, 425:].any()

    # Wide into a tall canvas: sits on the bottom edge.
    wide = Image.fromarray(np.asarray(skeleton).transpose(1, 0, 2).copy())  # 450 wide, 400 high
    tall = np.asarray(pose_condition(wide, (800, 450), mode="skeleton"))
    assert not tall[:400].any()
    assert np.array_equal(tall[400:], np.asarray(wide))


def test_looks_like_skeleton(faces_dir):
    assert looks_like_skeleton(draw_openpose([PoseKeypoints(BODY, hands=[_hand()])], SIZE))
    assert looks_like_skeleton(np.zeros((64, 64, 3), np.uint8))  # an empty skeleton
    assert not looks_like_skeleton(faces_dir / "obama.jpg")
    assert not looks_like_skeleton(faces_dir / "group_six_faces.jpg")
    # A dark photo: mostly black, but what is lit is skin-coloured, not a saturated skeleton colour.
    dark = np.zeros((100, 100, 3), np.uint8)
    dark[40:60, 40:70] = (200, 150, 120)
    assert not looks_like_skeleton(dark)


# ----------------------------------------------------------------------------------------------------------------
# Decoding with synthetic arrays
# ----------------------------------------------------------------------------------------------------------------


def test_box_center_scale_and_aspect():
    center, scale = box_to_center_scale((100, 50, 300, 450))
    assert np.allclose(center, (200, 250)) and np.allclose(scale, (250, 500))
    assert np.allclose(fix_aspect_ratio(scale, 288 / 384), (375, 500))  # too narrow: widened
    assert np.allclose(fix_aspect_ratio(np.array([600.0, 500.0]), 0.75), (600, 800))  # too wide: made taller


def test_simcc_peaks_map_back_through_the_crop():
    input_wh = (288, 384)
    center, scale = box_to_center_scale((100, 50, 300, 450))
    scale = fix_aspect_ratio(scale, 0.75)  # (375, 500)
    simcc_x = np.zeros((3, 576), np.float32)
    simcc_y = np.zeros((3, 768), np.float32)
    # Keypoint 0 at the crop centre, 1 at the crop's last bins, 2 with no positive response.
    simcc_x[0, 288], simcc_y[0, 384] = 0.9, 0.7
    simcc_x[1, 575], simcc_y[1, 767] = 0.5, 0.6
    simcc_x[2] = -1.0
    simcc_y[2] = -1.0
    points, scores = simcc_decode(simcc_x, simcc_y)
    assert np.allclose(points[:2], [(144, 192), (287.5, 383.5)])
    assert np.allclose(scores, (0.7, 0.5, -1.0))
    assert np.isnan(points[2]).all()

    image_points = crop_to_image(points, center, scale, input_wh)
    assert np.allclose(image_points[0], (200, 250))
    expected = (200 - 187.5 + 287.5 * 375 / 288, 250 - 250 + 383.5 * 500 / 384)
    assert np.allclose(image_points[1], expected, atol=1e-3)
    # crop_matrix is the forward map of the same transform.
    forward = crop_matrix(center, scale, input_wh) @ np.array([*image_points[1], 1.0])
    assert np.allclose(forward, points[1], atol=1e-3)


def test_rtmpose_crop_is_normalised_rgb_and_round_trips_a_marker():
    image = np.zeros((480, 640, 3), np.uint8)
    image[...] = (130, 110, 100)
    image[310, 230] = (255, 255, 255)
    blob, center, scale = rtmpose_input(image, (100, 50, 300, 450), (288, 384))
    assert blob.shape == (1, 3, 384, 288) and blob.dtype == np.float32
    for channel, value in enumerate((130, 110, 100)):  # channel 0 is red: RGB order
        expected = (value - RTMPOSE_MEAN[channel]) / RTMPOSE_STD[channel]
        assert np.isclose(blob[0, channel, 5, 144], expected, atol=1e-5)
    crop_y, crop_x = np.unravel_index(blob[0].sum(axis=0).argmax(), blob.shape[2:])
    back = crop_to_image(np.array([[crop_x, crop_y]], np.float32), center, scale, (288, 384))[0]
    assert np.abs(back - (230, 310)).max() <= 1.5


def test_yolox_letterbox():
    image = np.zeros((960, 1280, 3), np.uint8)
    image[..., 0] = 200
    blob, ratio = yolox_letterbox(image)
    assert ratio == 0.5 and blob.shape == (1, 3, 640, 640) and blob.dtype == np.float32
    assert (blob[0, 0, :480] == 200).all() and (blob[0, 1:, :480] == 0).all()  # top-left, channels kept
    assert (blob[0, :, 480:] == 114).all()


def _anchor_row(stride: int, gx: int, gy: int) -> int:
    offset = {8: 0, 16: 80 * 80, 32: 80 * 80 + 40 * 40}[stride]
    return offset + gy * (640 // stride) + gx


def test_yolox_decoding_undoes_the_letterbox_and_drops_duplicates():
    raw = np.zeros((8400, 85), np.float32)
    person = _anchor_row(32, 5, 7)
    raw[person, :6] = (0.5, 0.25, math.log(4), math.log(6), 0.9, 0.8)
    # The same person again at stride 16, slightly shifted and less confident: NMS must drop it.
    duplicate = _anchor_row(16, 11, 14)
    raw[duplicate, :6] = (0.0, 0.5, math.log(8), math.log(12), 0.8, 0.8)
    # A confident non-person (class 1) and a far-away second person.
    other_class = _anchor_row(32, 15, 15)
    raw[other_class, :6] = (0.5, 0.5, 1.0, 1.0, 0.9, 0.05)
    raw[other_class, 6] = 0.9
    second = _anchor_row(8, 70, 70)
    raw[second, :6] = (0.5, 0.5, math.log(4), math.log(8), 0.7, 0.6)

    boxes, scores = yolox_person_boxes(raw[None], ratio=0.5)
    # Centre ((5 + 0.5) * 32, (7 + 0.25) * 32) = (176, 232), size (128, 192), then / 0.5.
    assert np.allclose(boxes[0], (224, 272, 480, 656))
    assert np.allclose(scores, (0.72, 0.42))
    assert np.allclose(boxes[1], ((70.5 * 8 - 16) * 2, (70.5 * 8 - 32) * 2, (70.5 * 8 + 16) * 2, (70.5 * 8 + 32) * 2))
    assert len(boxes) == 2
    assert len(yolox_person_boxes(raw, ratio=0.5, score_threshold=0.5)[0]) == 1


def test_nms():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60], [1, 1, 11, 5]], np.float32)
    scores = np.array([0.8, 0.9, 0.7, 0.6])
    # With inclusive-pixel areas (x2 - x1 + 1), IoU(1, 0) = 100 / 142 = 0.70 and IoU(1, 3) = 55 / 121 = 0.45454...;
    # with plain areas IoU(1, 3) would be 40 / 100 = 0.4.
    assert nms(boxes, scores, 0.45).tolist() == [1, 2]
    assert nms(boxes, scores, 0.46).tolist() == [1, 2, 3]
    assert nms(boxes, scores, 0.75).tolist() == [1, 0, 2, 3]
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.45).tolist() == []


# ----------------------------------------------------------------------------------------------------------------
# COCO-WholeBody -> OpenPose
# ----------------------------------------------------------------------------------------------------------------

COCO_NAMES = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder", "left_elbow",
    "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle",
    "right_ankle",
)  # fmt: skip


def test_wholebody_to_openpose_mapping():
    points = np.stack([np.arange(133), 1000 + np.arange(133)], axis=1).astype(np.float32)
    scores = (np.arange(133) / 200).astype(np.float32)
    person = wholebody_to_openpose(points, scores, box=(1, 2, 3, 4))
    for joint, name in enumerate(OPENPOSE_BODY_NAMES):
        if name == "neck":
            continue
        coco = COCO_NAMES.index(name)
        assert np.array_equal(person.body[joint], points[coco]), name
        assert person.body_scores[joint] == scores[coco]
    assert np.array_equal(person.body[2], points[6])  # right shoulder
    assert np.allclose(person.body[1], (points[5] + points[6]) / 2)
    assert person.body_scores[1] == scores[5]  # the weaker shoulder
    assert np.array_equal(person.hands[0], points[91:112]) and np.array_equal(person.hands[1], points[112:133])
    assert np.array_equal(person.hand_scores[1], scores[112:133])
    assert np.array_equal(person.face, points[23:91])
    assert np.allclose(person.box, (1, 2, 3, 4))

    body_only = wholebody_to_openpose(points[:17], scores[:17])
    assert body_only.hands == [] and body_only.face is None
    # Neck is drawn exactly when both shoulders are.
    weak = scores[:17].copy()
    weak[5] = 0.2
    assert not wholebody_to_openpose(points[:17], weak).visible_body()[1]


# ----------------------------------------------------------------------------------------------------------------
# Model files
# ----------------------------------------------------------------------------------------------------------------


def test_missing_model_files_error_names_files_repo_and_folder(tmp_path, monkeypatch):
    (tmp_path / "yolox_l.onnx").write_bytes(b"x")
    with pytest.raises(ModelFilesError) as caught:
        resolve_pose_model_dir(tmp_path)
    message = str(caught.value)
    assert "missing dw-ll_ucoco_384.onnx" in message
    assert "yolox_l.onnx" in message and "yzd-v/DWPose" in message and str(tmp_path) in message

    monkeypatch.setenv("IDFUSION_POSE_MODELS", str(tmp_path / "elsewhere"))
    assert default_pose_model_dir() == tmp_path / "elsewhere"
    with pytest.raises(ModelFilesError, match="elsewhere: folder not found"):
        resolve_pose_model_dir()
    monkeypatch.delenv("IDFUSION_POSE_MODELS")
    monkeypatch.setenv("IDFUSION_CACHE", str(tmp_path / "cache"))
    assert default_pose_model_dir() == tmp_path / "cache" / "dwpose"


def test_photo_without_weights_says_what_to_download(tmp_path, monkeypatch, faces_dir):
    monkeypatch.setenv("IDFUSION_POSE_MODELS", str(tmp_path))
    with pytest.raises(ModelFilesError) as caught:
        pose_condition(faces_dir / "obama.jpg", mode="photo")
    message = str(caught.value)
    assert "yolox_l.onnx" in message and "dw-ll_ucoco_384.onnx" in message and "yzd-v/DWPose" in message
    # "auto" takes a photo for a photo, so it needs the weights too.
    with pytest.raises(ModelFilesError):
        pose_condition(faces_dir / "obama.jpg")


def test_no_person_is_a_clear_error(faces_dir):
    with pytest.raises(NoPoseError, match="obama.jpg: no person found") as caught:
        pose_condition(faces_dir / "obama.jpg", estimator=lambda _: [])
    assert isinstance(caught.value, IdfusionError) and isinstance(caught.value, ValueError)
    invisible = PoseKeypoints(BODY, np.zeros(18, np.float32))
    with pytest.raises(NoPoseError):
        pose_condition(faces_dir / "obama.jpg", estimator=lambda _: [invisible])
    with pytest.raises(ValueError, match="mode"):
        pose_condition(faces_dir / "obama.jpg", mode="depth")


# ----------------------------------------------------------------------------------------------------------------
# End to end with tiny ONNX models
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dwpose(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dwpose")
    paths = write_dwpose(folder, seed=0)
    assert [p.name for p in paths] == ["yolox_l.onnx", "dw-ll_ucoco_384.onnx"]
    return folder


@pytest.fixture(scope="module")
def estimator(tiny_dwpose):
    return DWPoseEstimator(tiny_dwpose, providers=["CPUExecutionProvider"])


def test_tiny_models_have_the_released_signatures(tiny_dwpose):
    import onnxruntime as ort

    found = find_pose_models(tiny_dwpose)
    det = ort.InferenceSession(str(found["detector"]), providers=["CPUExecutionProvider"])
    pose = ort.InferenceSession(str(found["pose"]), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape, i.type) for i in det.get_inputs()] == [("images", [1, 3, 640, 640], "tensor(float)")]
    assert [(o.name, o.shape) for o in det.get_outputs()] == [("output", [1, 8400, 85])]
    assert [(i.name, i.shape) for i in pose.get_inputs()] == [("input", [1, 3, 384, 288])]
    assert [(o.name, o.shape) for o in pose.get_outputs()] == [("simcc_x", [1, 133, 576]), ("simcc_y", [1, 133, 768])]


def test_estimator_on_a_photo(estimator, faces_dir):
    photo = faces_dir / "obama.jpg"
    boxes, scores = estimator.detect(np.asarray(Image.open(photo).convert("RGB")))
    assert len(boxes) == 1 and np.isclose(scores[0], 0.855, atol=1e-3)  # the tiny detector's duplicate is gone

    people = estimator(photo)
    assert len(people) == 1
    person = people[0]
    width, height = 910, 1137
    seen = person.visible_body()
    assert seen.sum() == 17 and not seen[17]  # the tiny model's left ear scores 0.1
    assert np.isclose(person.body_scores[17], 0.1, atol=0.01)
    body = person.body[seen]
    assert (body[:, 0] > 0).all() and (body[:, 0] < width).all() and (body[:, 1] < height).all()
    # Keypoints land inside the padded person box, in image coordinates, upright.
    x1, y1, x2, y2 = person.box
    pad_w, pad_h = (x2 - x1) * 0.125, (y2 - y1) * 0.125
    assert (body[:, 0] > x1 - pad_w).all() and (body[:, 0] < x2 + pad_w).all()
    assert (body[:, 1] > y1 - pad_h).all() and (body[:, 1] < y2 + pad_h).all()
    assert person.body[0, 1] < person.body[8, 1] < person.body[10, 1]  # nose above hip above ankle
    assert person.body[2, 0] < person.body[5, 0]  # the right shoulder is on the image's left
    assert len(person.hands) == 2 and all(h.shape == (21, 2) for h in person.hands)
    assert person.face.shape == (68, 2)


def test_pose_condition_from_a_photo(estimator, faces_dir):
    photo = faces_dir / "obama.jpg"
    image = pose_condition(photo, (512, 512), estimator=estimator)
    assert image.size == (512, 512) and image.mode == "RGB"
    pixels = np.asarray(image)
    assert pixels.any() and looks_like_skeleton(image)

    # The skeleton is the estimator's, placed where img_pad puts the photo: 910 x 1137 -> 409 x 512 at x = 51.
    new_h, new_w, top, left = pad_geometry((1137, 910), (512, 512))
    assert (new_h, new_w, top, left) == (512, 409, 0, 51)
    placed = [p.transformed(new_w / 910, new_h / 1137, left, top) for p in estimator(photo)]
    assert np.array_equal(pixels, np.asarray(draw_openpose(placed, (512, 512))))
    nose = placed[0].body[0]
    assert _pixel(image, nose) == BODY_COLORS[0]
    # "auto" recognises the photo as a photo.
    assert np.array_equal(pixels, np.asarray(pose_condition(photo, (512, 512), estimator=estimator, mode="auto")))


def test_whole_image_fallback(tiny_dwpose, faces_dir):
    photo = faces_dir / "obama.jpg"
    strict = DWPoseEstimator(tiny_dwpose, det_threshold=0.99, providers=["CPUExecutionProvider"])
    people = strict(photo)
    assert len(people) == 1 and np.allclose(people[0].box, (0, 0, 910, 1137))
    no_fallback = DWPoseEstimator(
        tiny_dwpose, det_threshold=0.99, whole_image_fallback=False, providers=["CPUExecutionProvider"]
    )
    assert no_fallback(photo) == []
    with pytest.raises(NoPoseError):
        pose_condition(photo, estimator=no_fallback)


def test_batched_pose_model_matches_one_crop_at_a_time(tmp_path, tiny_dwpose, estimator, faces_dir):
    folder = tmp_path / "batched"
    folder.mkdir()
    (folder / "yolox_l.onnx").write_bytes((tiny_dwpose / "yolox_l.onnx").read_bytes())
    export_tiny_rtmpose(folder / "dw-ll_ucoco_384.onnx", seed=0, dynamic_batch=True)
    batched = DWPoseEstimator(folder, providers=["CPUExecutionProvider"])
    image = np.asarray(Image.open(faces_dir / "group_six_faces.jpg").convert("RGB"))
    boxes = np.array([[100, 100, 400, 700], [600, 50, 900, 800]], np.float32)
    one_by_one = estimator.keypoints(image, boxes)
    together = batched.keypoints(image, boxes)
    assert len(together) == 2
    for (p1, s1), (p2, s2) in zip(one_by_one, together, strict=True):
        assert np.allclose(p1, p2, atol=1e-3) and np.allclose(s1, s2, atol=1e-5)
    assert one_by_one[0][0][0, 0] < 400 < one_by_one[1][0][0, 0]  # each crop's points stay in its box
    assert MISSING_COCO_POINT == 3 and (one_by_one[0][1][3] < 0.3)


def test_unreadable_model_file(tmp_path, tiny_dwpose):
    (tmp_path / "yolox_l.onnx").write_bytes(b"not an onnx model")
    (tmp_path / "dw-ll_ucoco_384.onnx").write_bytes((tiny_dwpose / "dw-ll_ucoco_384.onnx").read_bytes())
    with pytest.raises(ModelFilesError, match="yolox_l.onnx: cannot load this YOLOX person detector"):
        DWPoseEstimator(tmp_path, providers=["CPUExecutionProvider"])
