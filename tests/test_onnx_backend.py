"""Offline tests of the onnxruntime face backends, with hand-computed decoding and tiny exported models."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from idfusion.errors import ModelFilesError
from idfusion.faces.align import ARCFACE_TEMPLATE, align_face
from idfusion.faces.onnx_backend import (
    ArcFaceRecognizer,
    SCRFDDetector,
    anchor_centers,
    default_onnx_model_dirs,
    distance2bbox,
    distance2kps,
    find_onnx_models,
    letterbox,
    nms,
    resolve_onnx_model_dir,
)
from idfusion.faces.types import Detection, FaceDetector, FaceRecognizer
from idfusion.images import load_image
from idfusion.testing.onnx_faces import TinyArcFace, TinySCRFD, export_tiny_arcface, write_tiny_antelopev2


def _faces_dir() -> Path:
    env = os.environ.get("IDFUSION_TEST_FACES")
    if env:
        return Path(env)
    for parent in Path(__file__).resolve().parents:
        for candidate in (parent / "shared" / "data" / "faces", parent.parent / "shared" / "data" / "faces"):
            if candidate.is_dir():
                return candidate
    pytest.skip("test face photos not found (set IDFUSION_TEST_FACES)")


@pytest.fixture(scope="module")
def tiny_pack(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("antelopev2")
    write_tiny_antelopev2(out)
    return out


@pytest.fixture(scope="module")
def arcface_variants(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("arcface")
    return {
        "plain": export_tiny_arcface(out / "plain.onnx", seed=3),
        "in_graph": export_tiny_arcface(out / "in_graph.onnx", seed=3, normalize_in_graph=True),
        "fixed_batch": export_tiny_arcface(out / "fixed_batch.onnx", seed=3, dynamic_batch=False),
    }


def _write_model(path: Path, input_shape: list, outputs: list[np.ndarray] | None = None, out_dims: int = 2) -> Path:
    """An ONNX file with one float input; ``outputs`` are constants, otherwise one pooled ``(1, C)`` output."""
    inputs = [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, input_shape)]
    if outputs is not None:
        nodes = [
            helper.make_node("Constant", [], [f"out{i}"], value=numpy_helper.from_array(a.astype(np.float32)))
            for i, a in enumerate(outputs)
        ]
        values = [helper.make_tensor_value_info(f"out{i}", TensorProto.FLOAT, a.shape) for i, a in enumerate(outputs)]
    else:  # landmark / gender-age stand-in: (1, 3, S, S) -> (1, 3)
        nodes = [
            helper.make_node("GlobalAveragePool", ["input.1"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["out"]),
        ]
        values = [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3][:out_dims])]
    graph = helper.make_graph(nodes, "fake", inputs, values)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


# ----------------------------------------------------------------------------------------------------------------
# Pure helpers, against hand-computed numbers
# ----------------------------------------------------------------------------------------------------------------


def test_anchor_centers_row_major_with_repeated_anchors():
    got = anchor_centers(2, 3, 8, 2)
    expected = [[0, 0], [0, 0], [8, 0], [8, 0], [16, 0], [16, 0], [0, 8], [0, 8], [8, 8], [8, 8], [16, 8], [16, 8]]
    assert got.shape == (12, 2)
    np.testing.assert_array_equal(got, np.array(expected, dtype=np.float32))
    np.testing.assert_array_equal(anchor_centers(1, 2, 16, 1), [[0, 0], [16, 0]])


def test_distance2bbox_and_distance2kps():
    points = np.array([[10.0, 20.0], [0.0, 0.0]])
    np.testing.assert_array_equal(
        distance2bbox(points, np.array([[1, 2, 3, 4], [5, 6, 7, 8]])), [[9, 18, 13, 24], [-5, -6, 7, 8]]
    )
    kps = distance2kps(points, np.array([[1, 2, -3, -4], [5, 6, 7, 8]]))
    assert kps.shape == (2, 2, 2)
    np.testing.assert_array_equal(kps, [[[11, 22], [7, 16]], [[5, 6], [7, 8]]])
    assert distance2kps(points[:0], np.zeros((0, 10))).shape == (0, 5, 2)


def test_nms_greedy_highest_first():
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30], [0, 0, 10, 10]], dtype=np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.95])
    # Box 3 wins; box 0 (IoU 1) and box 1 (IoU 90/110) fall; box 2 does not touch it.
    np.testing.assert_array_equal(nms(boxes, scores, 0.4), [3, 2])
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.4).tolist() == []


def test_nms_uses_continuous_area_convention():
    boxes = np.array([[0, 0, 2, 2], [1, 0, 3, 2]], dtype=np.float32)
    # IoU = 2 / (4 + 4 - 2) = 1/3 (the +1 pixel convention would give 6 / 12 = 0.5 and drop the second box).
    np.testing.assert_array_equal(nms(boxes, np.array([0.9, 0.8]), 0.4), [0, 1])
    np.testing.assert_array_equal(nms(boxes, np.array([0.9, 0.8]), 0.3), [0])


def test_letterbox_wide_image_is_width_bound():
    image = np.full((2, 4, 3), 255, dtype=np.uint8)
    blob, scale = letterbox(image, (8, 8))  # ratio 0.5 <= 1: new_w = 8, new_h = int(8 * 0.5) = 4
    assert blob.shape == (1, 3, 8, 8) and blob.dtype == np.float32
    assert scale == 2.0
    np.testing.assert_allclose(blob[:, :, :4, :], 0.99609375)  # (255 - 127.5) / 128
    np.testing.assert_allclose(blob[:, :, 4:, :], -0.99609375)  # (0 - 127.5) / 128


def test_letterbox_tall_image_is_height_bound_and_keeps_rgb_order():
    image = np.zeros((10, 5, 3), dtype=np.uint8)
    image[..., 0], image[..., 2] = 255, 128
    blob, scale = letterbox(image, (8, 8))  # ratio 2 > 1: new_h = 8, new_w = int(8 / 2) = 4
    assert scale == pytest.approx(0.8)
    np.testing.assert_allclose(blob[0, 0, :, :4], 0.99609375)
    np.testing.assert_allclose(blob[0, 1, :, :4], -0.99609375)
    np.testing.assert_allclose(blob[0, 2, :, :4], 0.00390625)  # (128 - 127.5) / 128
    np.testing.assert_allclose(blob[0, :, :, 4:], -0.99609375)


def test_letterbox_truncates_new_size():
    blob, scale = letterbox(np.zeros((3, 7, 3), dtype=np.uint8), (640, 640))
    # new_h = int(640 * 3 / 7) = int(274.28) = 274
    assert scale == pytest.approx(274 / 3)
    assert blob.shape == (1, 3, 640, 640)


# ----------------------------------------------------------------------------------------------------------------
# SCRFD decoding with a constant-output model
# ----------------------------------------------------------------------------------------------------------------

# A fixed 64x64 input: strides 8, 16, 32 give 8x8, 4x4 and 2x2 cells, 2 anchors each.
_ANCHORS = {8: 128, 16: 32, 32: 8}


def _scrfd_outputs(batched: bool, keypoints: bool = True) -> list[np.ndarray]:
    scores = {s: np.zeros((n, 1)) for s, n in _ANCHORS.items()}
    boxes = {s: np.zeros((n, 4)) for s, n in _ANCHORS.items()}
    kps = {s: np.zeros((n, 10)) for s, n in _ANCHORS.items()}
    # Stride 16, row 1, col 2, anchor 1: row (1*4 + 2)*2 + 1 = 13, centre (32, 16).
    scores[16][13] = 0.9
    boxes[16][13] = [1, 0.5, 1, 0.5]  # x 16 -> (16, 8, 16, 8): box (16, 8, 48, 24)
    kps[16][13] = [-0.5, -0.25, 0.5, -0.25, 0, 0, -0.25, 0.25, 0.25, 0.25]
    # Stride 8, row 2, col 4, anchor 0: row 40, centre (32, 16), the same box with a lower score: NMS drops it.
    scores[8][40] = 0.7
    boxes[8][40] = [2, 1, 2, 1]
    # Stride 8, row 6, col 1, anchor 0: row 98, centre (8, 48), box (0, 40, 16, 56), keypoints on the centre.
    scores[8][98] = 0.6
    boxes[8][98] = [1, 1, 1, 1]
    # Stride 32, row 0, col 1, anchor 1: row 3, centre (32, 0), box (24, -8, 40, 8); exactly at the threshold.
    scores[32][3] = 0.5
    boxes[32][3] = [0.25, 0.25, 0.25, 0.25]
    # Stride 32, row 0: just under the threshold.
    scores[32][0] = 0.49
    boxes[32][0] = [1, 1, 1, 1]
    groups = [scores, boxes] + ([kps] if keypoints else [])
    outputs = [group[s] for group in groups for s in (8, 16, 32)]
    return [o[None] if batched else o for o in outputs]


@pytest.mark.parametrize("batched", [True, False])
def test_scrfd_decoding_against_hand_computed_values(tmp_path, batched):
    path = _write_model(tmp_path / "fake_scrfd.onnx", [1, 3, 64, 64], _scrfd_outputs(batched))
    detector = SCRFDDetector(path)  # the model's fixed 64x64 input wins over det_size
    assert detector.name == "onnx:fake_scrfd"
    assert detector.input_size == (64, 64) and detector.strides == (8, 16, 32) and detector.num_anchors == 2
    assert isinstance(detector, FaceDetector)

    # 100x200 image: width-bound, new size 64x32, scale 32 / 100 = 0.32.
    detections = detector.detect(np.zeros((100, 200, 3), dtype=np.uint8))
    assert [d.score for d in detections] == pytest.approx([0.9, 0.6, 0.5])
    main, second, third = detections
    np.testing.assert_allclose(main.bbox, [50, 25, 150, 75], atol=1e-4)  # (16, 8, 48, 24) / 0.32
    expected_kps = [[75, 37.5], [125, 37.5], [100, 50], [87.5, 62.5], [112.5, 62.5]]
    assert main.landmarks.shape == (5, 2) and main.landmarks.dtype == np.float32
    np.testing.assert_allclose(main.landmarks, expected_kps, atol=1e-4)
    np.testing.assert_allclose(second.bbox, [0, 125, 50, 175], atol=1e-4)
    np.testing.assert_allclose(second.landmarks, np.tile([25, 150], (5, 1)), atol=1e-4)
    np.testing.assert_allclose(third.bbox, [75, -25, 125, 25], atol=1e-4)
    assert all(d.bbox.dtype == np.float32 for d in detections)


def test_scrfd_without_keypoints(tmp_path):
    path = _write_model(tmp_path / "nokps.onnx", [1, 3, 64, 64], _scrfd_outputs(True, keypoints=False))
    detector = SCRFDDetector(path, score_threshold=0.8)
    (detection,) = detector.detect(np.zeros((100, 200, 3), dtype=np.uint8))
    np.testing.assert_allclose(detection.bbox, [50, 25, 150, 75], atol=1e-4)
    assert detection.landmarks is None


def test_scrfd_rejects_bad_files(tmp_path):
    with pytest.raises(ModelFilesError, match="not found"):
        SCRFDDetector(tmp_path / "missing.onnx")
    wrong = _write_model(tmp_path / "wrong.onnx", [1, 3, 64, 64], [np.zeros((1, 2))] * 4)
    with pytest.raises(ModelFilesError, match=r"wrong\.onnx.*6, 9, 10 or 15 outputs"):
        SCRFDDetector(wrong)
    flat = _write_model(tmp_path / "flat.onnx", [1, 64], [np.zeros((4, 1))] * 9)
    with pytest.raises(ModelFilesError, match="4-D"):
        SCRFDDetector(flat)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    with pytest.raises(ModelFilesError, match="garbage.onnx"):
        SCRFDDetector(garbage)


def test_tiny_scrfd_export_matches_torch(tiny_pack):
    import onnxruntime as ort

    x = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (1, 3, 96, 64)).astype(np.float32))
    with torch.no_grad():
        expected = [t.numpy() for t in TinySCRFD(seed=0)(x)]
    session = ort.InferenceSession(str(tiny_pack / "scrfd_10g_bnkps.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input.1": x.numpy()})
    assert [o.name for o in session.get_outputs()] == list(TinySCRFD.output_names)
    assert [g.shape for g in got[:3]] == [(1, 12 * 8 * 2, 1), (1, 6 * 4 * 2, 1), (1, 3 * 2 * 2, 1)]
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, atol=1e-4)
    assert int((got[2] >= 0.5).sum()) == 2  # both anchors of exactly one stride-32 cell


def test_scrfd_det_size_must_fit_strides(tiny_pack):
    with pytest.raises(ValueError, match="multiples of 32"):
        SCRFDDetector(tiny_pack / "scrfd_10g_bnkps.onnx", det_size=(100, 100))


# ----------------------------------------------------------------------------------------------------------------
# ArcFace recognizer
# ----------------------------------------------------------------------------------------------------------------


def _landmarks_for(image: np.ndarray) -> np.ndarray:
    """Two deterministic ArcFace-layout landmark sets inside ``image``."""
    h, w = image.shape[:2]
    first = ARCFACE_TEMPLATE * (min(h, w) / 224) + [w * 0.25, h * 0.1]
    second = ARCFACE_TEMPLATE * (min(h, w) / 448) + [w * 0.5, h * 0.5]
    return np.stack([first, second]).astype(np.float32)


@pytest.mark.parametrize(("variant", "mean", "std"), [("plain", 127.5, 127.5), ("in_graph", 0.0, 1.0)])
def test_arcface_normalisation_and_torch_parity(arcface_variants, variant, mean, std):
    recognizer = ArcFaceRecognizer(arcface_variants[variant])
    assert (recognizer.input_mean, recognizer.input_std) == (mean, std)
    assert recognizer.dim == 512 and recognizer.input_size == 112 and recognizer.name == f"onnx:{variant}"
    assert isinstance(recognizer, FaceRecognizer)

    image = np.random.default_rng(1).integers(0, 256, (300, 240, 3), dtype=np.uint8)
    landmarks = _landmarks_for(image)
    got = recognizer.embed(image, landmarks)
    assert got.shape == (2, 512) and got.dtype == np.float32

    module = TinyArcFace(seed=3, normalize_in_graph=variant == "in_graph").eval()
    crops = np.stack([align_face(image, lm, size=112) for lm in landmarks]).astype(np.float32)
    if variant == "plain":
        crops = (crops - 127.5) / 127.5
    with torch.no_grad():
        expected = module(torch.from_numpy(crops.transpose(0, 3, 1, 2).copy())).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_arcface_fixed_batch_and_empty_input(arcface_variants):
    fixed = ArcFaceRecognizer(arcface_variants["fixed_batch"])
    dynamic = ArcFaceRecognizer(arcface_variants["plain"])
    image = np.random.default_rng(2).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    landmarks = _landmarks_for(image)
    np.testing.assert_allclose(fixed.embed(image, landmarks), dynamic.embed(image, landmarks), atol=1e-5)
    assert fixed.embed(image, np.zeros((0, 5, 2))).shape == (0, 512)


def test_arcface_rejects_non_recognizers(tmp_path, tiny_pack):
    with pytest.raises(ModelFilesError, match="not an ArcFace-style"):
        ArcFaceRecognizer(tiny_pack / "scrfd_10g_bnkps.onnx")
    with pytest.raises(ModelFilesError, match="not an ArcFace-style"):
        ArcFaceRecognizer(_write_model(tmp_path / "oblong.onnx", [1, 3, 112, 96]))
    with pytest.raises(ModelFilesError, match="not found"):
        ArcFaceRecognizer(tmp_path / "arcface.onnx")


# ----------------------------------------------------------------------------------------------------------------
# End to end: the tiny antelopev2 pack, discovery and default folders
# ----------------------------------------------------------------------------------------------------------------


def test_tiny_pack_end_to_end(tmp_path, tiny_pack):
    for path in tiny_pack.iterdir():
        shutil.copy(path, tmp_path / path.name)
        assert path.stat().st_size < 2_000_000
    _write_model(tmp_path / "2d106det.onnx", [1, 3, 192, 192])
    _write_model(tmp_path / "genderage.onnx", [1, 3, 96, 96])
    detector_path, recognizer_path = find_onnx_models(tmp_path)
    assert (detector_path.name, recognizer_path.name) == ("scrfd_10g_bnkps.onnx", "arcface.onnx")

    image = load_image(_faces_dir() / "obama.jpg").array
    detector, recognizer = SCRFDDetector(detector_path), ArcFaceRecognizer(recognizer_path)
    detections = detector.detect(image)
    assert len(detections) == 1 and all(isinstance(d, Detection) for d in detections)
    (face,) = detections
    assert face.score == pytest.approx(0.6, abs=1e-5)
    np.testing.assert_allclose(face.bbox, [341, 57, 569, 284], atol=3)  # the skin cue lands on the face
    lm = face.landmarks
    assert lm.shape == (5, 2) and lm.dtype == np.float32
    assert lm[0, 0] < lm[2, 0] < lm[1, 0] and lm[0, 1] < lm[2, 1] < lm[3, 1]  # eyes, nose, mouth like a face
    assert np.all((lm >= face.bbox[:2]) & (lm <= face.bbox[2:]))

    embeddings = recognizer.embed(image, np.stack([d.landmarks for d in detections]))
    assert embeddings.shape == (1, 512) and np.all(np.isfinite(embeddings))


def test_find_onnx_models_missing_roles(tmp_path, tiny_pack):
    with pytest.raises(ModelFilesError, match="not found"):
        find_onnx_models(tmp_path / "nowhere")
    shutil.copy(tiny_pack / "scrfd_10g_bnkps.onnx", tmp_path)
    with pytest.raises(
        ModelFilesError, match=r"no face recognizer.*scrfd_10g_bnkps\.onnx \(detector\).*arcface\.onnx"
    ):
        find_onnx_models(tmp_path)
    only_recognizer = tmp_path / "rec"
    only_recognizer.mkdir()
    shutil.copy(tiny_pack / "arcface.onnx", only_recognizer)
    with pytest.raises(ModelFilesError, match="no face detector"):
        find_onnx_models(only_recognizer)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelFilesError, match="no face detector and no face recognizer.*no .onnx files"):
        find_onnx_models(empty)


def test_find_onnx_models_prefers_arcface_over_glintr100(tmp_path, tiny_pack, caplog):
    shutil.copy(tiny_pack / "scrfd_10g_bnkps.onnx", tmp_path)
    shutil.copy(tiny_pack / "arcface.onnx", tmp_path / "glintr100.onnx")
    with caplog.at_level(logging.WARNING, logger="idfusion.faces.onnx_backend"):
        assert find_onnx_models(tmp_path)[1].name == "glintr100.onnx"
    assert "FoivosPar/Arc2Face" in caplog.text
    shutil.copy(tiny_pack / "arcface.onnx", tmp_path)
    assert find_onnx_models(tmp_path)[1].name == "arcface.onnx"


def test_default_dirs_and_resolution(tmp_path, monkeypatch, tiny_pack):
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("IDFUSION_FACE_MODELS", raising=False)
    cache_dir = home / ".cache" / "idfusion" / "models" / "antelopev2"
    insightface_dir = home / ".insightface" / "models" / "antelopev2"
    assert default_onnx_model_dirs() == [cache_dir, insightface_dir]

    with pytest.raises(ModelFilesError) as error:
        resolve_onnx_model_dir()
    assert str(cache_dir) in str(error.value) and str(insightface_dir) in str(error.value)
    assert "scrfd_10g_bnkps.onnx and arcface.onnx" in str(error.value)

    insightface_dir.mkdir(parents=True)
    shutil.copy(tiny_pack / "arcface.onnx", insightface_dir)
    cache_dir.mkdir(parents=True)  # empty: does not hide the filled insightface folder
    assert resolve_onnx_model_dir() == insightface_dir

    custom = tmp_path / "custom"
    custom.mkdir()
    shutil.copy(tiny_pack / "arcface.onnx", custom)
    monkeypatch.setenv("IDFUSION_FACE_MODELS", str(custom))
    assert default_onnx_model_dirs()[0] == custom
    assert resolve_onnx_model_dir() == custom
    assert resolve_onnx_model_dir(insightface_dir) == insightface_dir
    with pytest.raises(ModelFilesError, match="not found"):
        resolve_onnx_model_dir(tmp_path / "nowhere")
