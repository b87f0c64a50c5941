"""``idfusion faces``: table, JSON, crops, annotations, and one-line errors with non-zero exits."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from idfusion.cli.main import main


def test_faces_writes_table_json_crops_and_annotations(faces_dir, tmp_path, capsys):
    inputs = [faces_dir / "group_six_faces.jpg", faces_dir / "obama.jpg"]
    before = {p: p.read_bytes() for p in inputs}
    code = main(
        ["faces", *map(str, inputs), "--json", str(tmp_path / "faces.json"), "--crops", str(tmp_path / "crops"),
         "--annotate", str(tmp_path / "annotated"), "--dense"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "group_six_faces.jpg: 6 face(s), 1280x886" in out and "obama.jpg: 1 face(s), 910x1137" in out
    assert out.count("dlib-resnet (128-d)") == 7

    document = json.loads((tmp_path / "faces.json").read_text())
    assert document["detector"] == "dlib-hog" and document["recognizer"] == "dlib-resnet"
    group, obama = document["images"]
    assert len(group["faces"]) == 6 and len(obama["faces"]) == 1
    face = obama["faces"][0]
    assert len(face["bbox"]) == 4 and len(face["landmarks"]) == 5 and len(face["dense_landmarks"]) == 68
    assert face["embedding_dim"] == 128 and len(face["embedding"]) == 128

    crops = sorted(p.name for p in (tmp_path / "crops").iterdir())
    assert crops == [f"group_six_faces_face{i}.png" for i in range(6)] + ["obama_face0.png"]
    assert Image.open(tmp_path / "crops" / "obama_face0.png").size == (112, 112)
    annotated = Image.open(tmp_path / "annotated" / "obama_annotated.png")
    assert annotated.size == (910, 1137)
    original = np.asarray(Image.open(inputs[1]).convert("RGB"), dtype=int)
    assert np.abs(np.asarray(annotated, dtype=int) - original).sum() > 0  # something was drawn
    assert {p: p.read_bytes() for p in inputs} == before  # inputs untouched


def test_same_file_names_in_two_folders_do_not_collide(faces_dir, tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        shutil.copy(faces_dir / "obama.jpg", tmp_path / folder / "obama.jpg")
    code = main(
        ["faces", str(tmp_path / "a/obama.jpg"), str(tmp_path / "b/obama.jpg"), "--crops", str(tmp_path / "c")]
    )
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["obama-1_face0.png", "obama_face0.png"]


def test_aligned_input_and_selection(faces_dir, capsys):
    assert main(["faces", str(faces_dir / "tom_hanks_aligned_112.png"), "--aligned"]) == 0
    assert "box [0, 0, 112, 112]" in capsys.readouterr().out
    assert main(["faces", str(faces_dir / "group_six_faces.jpg"), "--select", "largest", "--recognizer", "none"]) == 0
    assert "1 face(s)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("make_input", "args", "message"),
    [
        (lambda d, f: d / "missing.jpg", [], "missing.jpg: file not found"),
        (lambda d, f: _write(d / "text.jpg", b"not an image"), [], "text.jpg: not an image"),
        (
            lambda d, f: _write(d / "cut.jpg", (f / "obama.jpg").read_bytes()[:3000]),
            [],
            "cut.jpg: corrupt or truncated",
        ),
        (lambda d, f: _blank(d / "blank.png"), [], "blank.png: no face found by the dlib-hog detector"),
        (lambda d, f: f / "obama.jpg", ["--min-face-size", "500"], "the minimum face size is 500 px"),
        (lambda d, f: f / "obama.jpg", ["--select", "4"], "face index 4 requested, but the image has 1 face"),
    ],
)
def test_bad_inputs_give_one_line_and_exit_1(faces_dir, tmp_path, capsys, make_input, args, message):
    path = make_input(tmp_path, faces_dir)
    assert main(["faces", str(path), *args]) == 1
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_image_too_large_through_the_cli(tmp_path, capsys):
    Image.new("1", (9000, 8000)).save(tmp_path / "bomb.png")
    assert main(["faces", str(tmp_path / "bomb.png")]) == 1
    assert (
        "bomb.png: image is 9000x8000 = 72,000,000 pixels; the limit is 64,000,000 pixels" in capsys.readouterr().err
    )


def test_missing_onnx_models_and_bad_flags(tmp_path, capsys):
    assert main(["faces", "x.jpg", "--detector", "onnx", "--model-dir", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err
    assert "nowhere" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as info:
        main(["faces", "x.jpg", "--select", "biggest"])
    assert info.value.code == 2
    assert "expected 'all', 'largest' or a face index" in capsys.readouterr().err


def test_console_script_reports_errors_without_traceback(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    result = subprocess.run(
        [sys.executable, "-m", "idfusion.cli.main", "faces", str(tmp_path / "bad.png")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert "bad.png:" in result.stderr and "Traceback" not in result.stderr


def _write(path, data):
    path.write_bytes(data)
    return path


def _blank(path):
    Image.new("RGB", (300, 300), (127, 127, 127)).save(path)
    return path
