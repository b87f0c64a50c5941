"""Honest detection in the tiny kit: its random SCRFD is marked as a stand-in and real detectors take its place."""

from __future__ import annotations

import numpy as np
import pytest

from idfusion.faces.stand_in import StandInDetector, is_stand_in


@pytest.fixture(scope="module")
def detector():
    return StandInDetector()


def test_the_tiny_kit_marks_its_random_detector_and_only_it(tiny_release):
    folder = tiny_release("antelopev2")
    assert is_stand_in(folder / "scrfd_10g_bnkps.onnx")
    assert not is_stand_in(folder / "arcface.onnx")


@pytest.mark.parametrize("size", [(64, 64), (480, 640)])
def test_no_face_in_a_plain_blue_image(detector, size):
    blue = np.zeros((*size, 3), np.uint8)
    blue[..., 2] = 230
    assert detector.detect(blue) == []


def test_finds_the_face_of_a_photo_and_of_a_render(detector, faces_dir):
    from idfusion.images import load_image
    from idfusion.world import render

    (face,) = detector.detect(load_image(faces_dir / "obama.jpg").array)
    assert face.landmarks.shape == (5, 2)
    result = render(1_000_003, 5)
    (found,) = detector.detect(result.image)
    np.testing.assert_allclose(found.landmarks, result.faces[0].landmarks, atol=2.0)


def test_the_analyzer_refuses_a_faceless_photo_with_the_real_models_error(detector, tmp_path):
    from PIL import Image

    from idfusion.errors import NoFaceError
    from idfusion.faces import FaceAnalyzer

    path = tmp_path / "blue.png"
    Image.new("RGB", (320, 240), (20, 40, 230)).save(path)
    with pytest.raises(NoFaceError, match="blue.png.*no face found"):
        FaceAnalyzer(detector, None).get(path)


def test_generate_refuses_a_faceless_photo_on_the_tiny_kit(tiny_release, tmp_path, capsys):
    """The new user's path from the issue: make-tiny, then generate from a plain blue picture."""
    from PIL import Image

    from idfusion.cli.main import main

    path = tmp_path / "blue.png"
    Image.new("RGB", (320, 240), (20, 40, 230)).save(path)
    code = main(["generate", "--method", "arc2face", "--model", str(tiny_release("arc2face")), "--face", str(path),
                 "--steps", "1", "--out", str(tmp_path / "out")])  # fmt: skip
    err = capsys.readouterr().err
    assert code != 0 and "blue.png" in err and "no face found" in err and "Traceback" not in err
    assert "loading Arc2Face from" in err  # the status line before the silent part
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
