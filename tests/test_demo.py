"""``idfusion demo``: offline, on the shipped world weights, one new contact sheet per run."""

from __future__ import annotations

from PIL import Image

from idfusion.cli.main import main
from idfusion.outputs import read_generation_metadata
from idfusion.world.demo import world_methods


def test_demo_writes_one_new_contact_sheet_per_run_with_judge_scores(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--identities", "2", "--steps", "8", "--no-progress"]) == 0
    out = capsys.readouterr().out
    shipped = [name for name, _ in world_methods()]
    assert "flashface" in shipped and "note:" not in out  # methods with world weights
    assert all(f"{name}: judge identity scores" in out for name in ["base", *shipped])
    first = tmp_path / "demo_0000.png"
    assert f"wrote {first}" in out
    sheet = Image.open(first)
    # Cells of 128 px: one row of references, then a row of 4 per method (2 images, 2 blanks).
    assert sheet.width > 4 * 128 and sheet.height > (2 + len(shipped)) * 128
    meta = read_generation_metadata(first)
    assert meta["methods"] == ["base", *shipped] and len(meta["prompts"]) == 2
    assert all(len(meta["judge_scores"][name]) == 2 for name in meta["methods"])
    assert meta["identities"][0] >= 1_000_000  # held-out people

    assert main(["demo", "--out", str(tmp_path), "--identities", "1", "--steps", "2", "--no-progress"]) == 0
    assert (tmp_path / "demo_0001.png").is_file() and read_generation_metadata(first) == meta  # never overwritten


def test_demo_rejects_bad_arguments(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--identities", "0"]) == 1
    assert "identities must be 1 to 4" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
