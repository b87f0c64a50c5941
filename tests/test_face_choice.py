"""A photo with several faces: the methods that use one face say which one they used."""

from __future__ import annotations

import logging

import numpy as np

from idfusion.faces.analyzer import FaceAnalyzer


def test_several_faces_say_which_one_is_used(faces_dir, caplog):
    analyzer = FaceAnalyzer("hog", None)
    with caplog.at_level(logging.WARNING, logger="idfusion.faces.analyzer"):
        face = analyzer.get(faces_dir / "group_six_faces.jpg")
    everyone = analyzer.analyze(faces_dir / "group_six_faces.jpg", select="all")
    largest = max(range(len(everyone)), key=lambda i: everyone[i].area)
    assert face.area == everyone[largest].area
    (record,) = caplog.records
    assert f"{len(everyone)} faces found; using the largest, face {largest} from the left" in record.getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="idfusion.faces.analyzer"):
        analyzer.get(faces_dir / "obama.jpg")
    assert not caplog.records  # one face: nothing to say


def test_a_face_photo_chooses_the_face_by_index(faces_dir):
    import pytest

    from idfusion.errors import FaceIndexError
    from idfusion.faces import FacePhoto

    analyzer = FaceAnalyzer("hog", None)
    group = faces_dir / "group_six_faces.jpg"
    everyone = analyzer.analyze(group, select="all")
    for index in (0, 2, -1):
        np.testing.assert_array_equal(analyzer.get(FacePhoto(group, index)).bbox, everyone[index].bbox)
    with pytest.raises(FaceIndexError, match="group_six_faces.jpg.*face index 9"):
        analyzer.get(FacePhoto(group, 9))
    with pytest.raises(ValueError, match="face index must be an integer"):
        FacePhoto(group, "1")


def test_generate_face_index_is_used_recorded_and_replayed(tiny_release, faces_dir, tmp_path, capsys):
    from idfusion.cli.main import main
    from idfusion.outputs import decode_array, read_generation_metadata

    model = str(tiny_release("arc2face"))
    group = str(faces_dir / "group_six_faces.jpg")
    common = ["--method", "arc2face", "--model", model, "--steps", "1", "--no-contact-sheet"]
    embeds = []
    for index in ("1", "4"):
        assert main(["generate", *common, "--face", group, "--face-index", index, "--seed", "3",
                     "--out", str(tmp_path / index)]) == 0  # fmt: skip
        path = capsys.readouterr().out.split()[0]
        meta = read_generation_metadata(path)
        assert meta["photo_face_index"] == int(index)
        embeds.append(decode_array(meta["id_embeds"]))
    # The tiny kit's random ArcFace embeds everyone alike, so check against the kit's analyzer directly.
    analyzer = FaceAnalyzer("onnx", "onnx", model_dir=tiny_release("arc2face") / "antelopev2")
    for index, embed in zip((1, 4), embeds, strict=True):
        expected = analyzer.analyze(group, select=index)[0].embedding
        np.testing.assert_allclose(embed, expected / np.linalg.norm(expected), atol=1e-6)
    assert not np.array_equal(embeds[0], embeds[1])
    assert main(["generate", "--from", path, "--face", group, "--no-contact-sheet", "--out", str(tmp_path / "r")]) == 0
    replayed = read_generation_metadata(capsys.readouterr().out.split()[0])
    assert replayed["photo_face_index"] == 4
    np.testing.assert_array_equal(decode_array(replayed["id_embeds"]), embeds[1])
    assert main(["generate", *common, "--face", group, "--face-index", "6", "--out", str(tmp_path / "bad")]) == 1
    err = capsys.readouterr().err
    assert "group_six_faces.jpg" in err and "face index 6" in err and "Traceback" not in err
