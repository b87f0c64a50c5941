"""A photo with several faces: the methods that use one face say which one they used."""

from __future__ import annotations

import logging

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
