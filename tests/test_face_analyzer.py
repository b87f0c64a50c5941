"""FaceAnalyzer with the offline dlib backend on real photos."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from idfusion.errors import FaceIndexError, FaceTooSmallError, ImageReadError, NoFaceError
from idfusion.faces import ARCFACE_TEMPLATE, Detection, FaceAnalyzer, register_crop


@pytest.mark.parametrize(
    ("name", "count"),
    [
        ("obama.jpg", 1),
        ("obama_partial_face.jpg", 1),
        ("obama_rgba.png", 1),
        ("group_six_faces.jpg", 6),
        ("tom_hanks_aligned_112.png", 1),
    ],
)
def test_every_photo_yields_its_faces(faces_dir, dlib_analyzer, name, count):
    faces = dlib_analyzer.analyze(faces_dir / name)
    assert len(faces) == count
    for face in faces:
        assert face.bbox.shape == (4,) and face.landmarks.shape == (5, 2)
        assert face.dense_landmarks.shape == (68, 2)
        assert face.embedding.shape == (128,) and face.embedding_model == "dlib-resnet" and face.embedding_dim == 128
        assert face.crops["arcface"].shape == (112, 112, 3)
        assert face.detector == "dlib-hog" and face.source == str(faces_dir / name)
        # eyes above the nose, nose above the mouth, left before right
        eye_l, eye_r, nose, mouth_l, mouth_r = face.landmarks
        assert eye_l[0] < eye_r[0] and mouth_l[0] < mouth_r[0]
        assert max(eye_l[1], eye_r[1]) < nose[1] < min(mouth_l[1], mouth_r[1])


def test_group_faces_are_ordered_left_to_right_and_selectable(faces_dir, dlib_analyzer):
    path = faces_dir / "group_six_faces.jpg"
    faces = dlib_analyzer.analyze(path)
    centres = [(f.bbox[0] + f.bbox[2]) / 2 for f in faces]
    assert centres == sorted(centres)
    third = dlib_analyzer.analyze(path, select=2)
    np.testing.assert_allclose(third[0].bbox, faces[2].bbox)
    np.testing.assert_allclose(dlib_analyzer.analyze(path, select=-1)[0].bbox, faces[-1].bbox)
    largest = dlib_analyzer.get(path)
    assert largest.area == max(f.area for f in faces)
    with pytest.raises(FaceIndexError, match="face index 6 requested, but the image has 6 face"):
        dlib_analyzer.analyze(path, select=6)


def test_same_person_is_closer_than_different_people(faces_dir, dlib_analyzer):
    obama = dlib_analyzer.get(faces_dir / "obama.jpg").embedding
    obama_other_photo = dlib_analyzer.get(faces_dir / "obama_rgba.png").embedding
    obama_partial = dlib_analyzer.get(faces_dir / "obama_partial_face.jpg").embedding
    others = [f.embedding for f in dlib_analyzer.analyze(faces_dir / "group_six_faces.jpg")]
    others.append(dlib_analyzer.get(faces_dir / "tom_hanks_aligned_112.png").embedding)
    same = [np.linalg.norm(obama - obama_other_photo), np.linalg.norm(obama - obama_partial)]
    different = [np.linalg.norm(obama - other) for other in others]
    assert max(same) < 0.6 < min(different)  # 0.6 is dlib's published same-person threshold
    assert max(same) < min(different) - 0.2


def test_pre_aligned_crop(faces_dir, dlib_analyzer):
    path = faces_dir / "tom_hanks_aligned_112.png"
    detected = dlib_analyzer.get(path)
    # the detector finds it and its eyes sit near the template's
    assert np.abs(detected.landmarks[:2] - ARCFACE_TEMPLATE[:2]).max() < 4.0
    aligned = dlib_analyzer.get(path, aligned=True)
    np.testing.assert_allclose(aligned.landmarks, ARCFACE_TEMPLATE)
    np.testing.assert_allclose(aligned.bbox, [0, 0, 112, 112])
    assert aligned.detector == "aligned-input"
    # an identity warp: the crop is the input itself
    original = np.asarray(Image.open(path).convert("RGB"))
    assert np.abs(aligned.crops["arcface"].astype(int) - original).mean() < 1.0
    assert np.linalg.norm(aligned.embedding - detected.embedding) < 0.45


def test_tight_crop_is_found_after_padding(faces_dir, dlib_analyzer):
    # A crop so tight that the HOG window never sees the face outline: found through the padded retry.
    from idfusion.images import load_image

    pixels = load_image(faces_dir / "obama.jpg").array[196:364, 426:564]  # inside the face box (366, 136, 624, 394)
    assert not pixels.flags["C_CONTIGUOUS"]  # the backend must copy strided arrays: dlib ignores strides
    assert dlib_analyzer.detector.detect(pixels) == []
    face = dlib_analyzer.get(pixels)
    assert 0 <= face.landmarks[:, 0].min() and face.landmarks[:, 0].max() <= pixels.shape[1]
    assert face.landmarks[0, 1] < face.landmarks[2, 1] < face.landmarks[3, 1]


def test_strided_arrays_give_the_same_faces_as_contiguous_ones(faces_dir, dlib_analyzer):
    from idfusion.images import load_image

    box_crop = load_image(faces_dir / "obama.jpg").array[136:394, 366:624]  # exactly the face box, strided
    direct = dlib_analyzer.detector.detect(box_crop)
    copied = dlib_analyzer.detector.detect(np.ascontiguousarray(box_crop))
    assert len(direct) == len(copied) == 1
    np.testing.assert_allclose(direct[0].bbox, copied[0].bbox)


class _FixedDetector:
    """Detector that reports fixed boxes, for testing selection logic without a model."""

    name = "fixed"

    def __init__(self, boxes):
        self.boxes = boxes

    def detect(self, image):
        landmarks = lambda b: np.array(  # noqa: E731
            [[b[0] + 0.3 * (b[2] - b[0]), b[1] + 0.4 * (b[3] - b[1])],
             [b[0] + 0.7 * (b[2] - b[0]), b[1] + 0.4 * (b[3] - b[1])],
             [b[0] + 0.5 * (b[2] - b[0]), b[1] + 0.6 * (b[3] - b[1])],
             [b[0] + 0.35 * (b[2] - b[0]), b[1] + 0.8 * (b[3] - b[1])],
             [b[0] + 0.65 * (b[2] - b[0]), b[1] + 0.8 * (b[3] - b[1])]], dtype=np.float32,
        )  # fmt: skip
        return [Detection(np.array(b, dtype=np.float32), 0.9, landmarks(b)) for b in self.boxes]


def test_largest_is_the_true_area_not_the_official_repos_key():
    # The official repos sort by (x2 - x1) * y2 - y1, which prefers faces low in the frame.
    tall_low = [0.0, 500.0, 60.0, 600.0]  # area 6,000; buggy key 60 * 600 - 500 = 35,500
    big_high = [200.0, 0.0, 300.0, 100.0]  # area 10,000; buggy key 100 * 100 - 0 = 10,000
    analyzer = FaceAnalyzer(_FixedDetector([tall_low, big_high]), recognizer=None)
    face = analyzer.get(np.zeros((640, 640, 3), dtype=np.uint8))
    np.testing.assert_allclose(face.bbox, big_high)
    assert face.embedding is None and face.embedding_model is None


def test_min_face_size_and_no_face_errors(faces_dir, dlib_analyzer):
    strict = FaceAnalyzer(min_face_size=400, recognizer=None)
    with pytest.raises(
        FaceTooSmallError, match=r"obama\.jpg: 1 face\(s\) found by dlib-hog, the largest is 258x258 px"
    ):
        strict.analyze(faces_dir / "obama.jpg")
    blank = np.full((300, 300, 3), 127, dtype=np.uint8)
    with pytest.raises(NoFaceError, match=r"<array>: no face found by the dlib-hog detector"):
        dlib_analyzer.analyze(blank)
    with pytest.raises(ImageReadError, match="file not found"):
        dlib_analyzer.analyze(faces_dir / "no_such_photo.jpg")


def test_crop_hooks_and_options(faces_dir):
    @register_crop("test-face-box")
    def face_box(image, face):
        x1, y1, x2, y2 = (int(v) for v in face.bbox)
        return image[max(0, y1) : y2, max(0, x1) : x2]

    analyzer = FaceAnalyzer(recognizer="none", crops=("arcface", "test-face-box"))
    face = analyzer.get(faces_dir / "obama.jpg")
    assert face.crops["test-face-box"].shape == (258, 258, 3)
    assert face.dense_landmarks is None  # only on request
    with pytest.raises(ValueError, match="unknown crop"):
        FaceAnalyzer(crops=("no-such-crop",))
    with pytest.raises(ValueError, match="detector must be one of"):
        FaceAnalyzer("retinaface")


def test_face_record_serialises(faces_dir, dlib_analyzer):
    record = dlib_analyzer.get(faces_dir / "obama.jpg").to_dict()
    assert set(record) >= {"bbox", "det_score", "landmarks", "embedding", "embedding_model", "embedding_dim"}
    assert len(record["embedding"]) == 128 and len(record["landmarks"]) == 5


def test_mmod_cnn_detector(faces_dir):
    import cv2

    from idfusion.images import load_image

    pixels = cv2.resize(load_image(faces_dir / "obama.jpg").array, (364, 455))  # small: the CNN is slow on CPU
    analyzer = FaceAnalyzer("mmod", recognizer=None, upsample=0)
    face = analyzer.get(pixels)
    assert face.detector == "dlib-mmod"
    # the same face HOG finds at full size (366, 136, 624, 394), scaled by 0.4
    hog_box_scaled = np.array([366, 136, 624, 394]) * 0.4
    centre = (face.bbox[:2] + face.bbox[2:]) / 2
    assert np.linalg.norm(centre - (hog_box_scaled[:2] + hog_box_scaled[2:]) / 2) < 15
