"""Batch generation from a job file: the schema, bad lines, resume by metadata key, and two-process sharding."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from idfusion.batch import JobFileError, expand_items, read_job_file, shard_of
from idfusion.outputs import read_generation_metadata


@pytest.fixture
def job_file(tmp_path, faces_dir):
    face = str(faces_dir / "obama.jpg")
    lines = [
        json.dumps({"method": "arc2face", "faces": [face], "seeds": [3, 4], "steps": 1, "id": "obama"}),
        "{not json",
        json.dumps({"method": "arc2face", "faces": [face], "steps": "many"}),
        "# a comment",
        json.dumps({"method": "arc2face", "faces": "missing.jpg"}),
        json.dumps({"method": "arc2face", "faces": [face], "magic": 1}),
        json.dumps({"method": "arc2face", "faces": [face], "seed": 10, "num_images": 2, "--steps": 1}),
    ]
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_job_lines_are_parsed_checked_and_bad_ones_named_by_line(job_file):
    lines = read_job_file(job_file)
    errors = {line.line: line.error for line in lines if line.error}
    assert set(errors) == {2, 3, 5, 6}
    assert "not valid JSON" in errors[2]
    assert errors[3] == "steps: expected a whole number, got 'many'"
    assert "missing.jpg: file not found" in errors[5]
    assert "unknown key 'magic'" in errors[6]
    good = [line for line in lines if not line.error]
    assert [line.seeds for line in good] == [[3, 4], [10, 11]]
    assert good[0].stem == "obama" and good[1].stem == "arc2face"
    assert good[0].job.options["steps"] == 1 and good[1].job.options["steps"] == 1
    items = expand_items(lines)
    assert [i.job.seed for i in items] == [3, 4, 10, 11] and len({i.key for i in items}) == 4
    # the key is a function of what the image is made from
    assert expand_items(read_job_file(job_file))[0].key == items[0].key


def test_command_line_options_are_defaults_and_limits_apply(tmp_path, faces_dir):
    path = tmp_path / "jobs.jsonl"
    face = str(faces_dir / "obama.jpg")
    path.write_text(json.dumps({"faces": [face]}) + "\n" + json.dumps({"faces": [face], "steps": 5000}) + "\n")
    first, second = read_job_file(path, method="arc2face", options={"steps": 7})
    assert first.job.method == "arc2face" and first.job.options["steps"] == 7
    assert "above the limit of 1000" in second.error
    with pytest.raises(JobFileError, match="not found"):
        read_job_file(tmp_path / "none.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n# nothing\n")
    with pytest.raises(JobFileError, match="no jobs"):
        read_job_file(tmp_path / "empty.jsonl")


def test_feedface_json_examples_read_as_they_are(tmp_path, faces_dir, monkeypatch):
    # json_examples/1433.json's shape; its paths are relative to the release's repository root (the current folder)
    (tmp_path / "data_examples").mkdir()
    for k in range(2):
        (tmp_path / "data_examples" / f"1433_{k}.jpg").write_bytes((faces_dir / "obama.jpg").read_bytes())
    (tmp_path / "json_examples").mkdir()
    example = {
        "id": "1433",
        "caption_list": ["a man in sunglasses standing in front of a cathedral ", "a man holding up a medal"],
        "source_group": [{"path": "data_examples/1433_1.jpg"}, {"path": "data_examples/1433_0.jpg"}],
        "class_word": "man",
    }
    (tmp_path / "json_examples" / "1433.json").write_text(json.dumps(example, indent=4))
    monkeypatch.chdir(tmp_path)
    lines = read_job_file("json_examples/1433.json")
    assert [line.error for line in lines] == [None, None]
    assert [line.job.options["prompt"] for line in lines] == example["caption_list"]
    assert all(line.job.method == "feedface" and line.stem == "1433" and line.seeds == [0, 1, 2, 3] for line in lines)
    assert lines[0].job.faces == ["data_examples/1433_1.jpg", "data_examples/1433_0.jpg"]


def test_shard_from_the_flag_or_the_launcher(monkeypatch):
    assert shard_of("1/3") == (1, 3)
    for bad in ("3/3", "x", "1/0"):
        with pytest.raises(ValueError, match="--shard"):
            shard_of(bad)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert shard_of() == (1, 2)


def _arc2face_jobs(tmp_path, faces_dir, seeds):
    path = tmp_path / "jobs.jsonl"
    face = str(faces_dir / "obama.jpg")
    path.write_text(
        json.dumps({"method": "arc2face", "faces": [face], "seeds": seeds, "steps": 1}) + "\n"
        + json.dumps({"method": "arc2face", "faces": [str(faces_dir / "missing.png")]}) + "\n"
    )  # fmt: skip
    return path


def test_generate_jobs_runs_reports_and_resumes(tmp_path, faces_dir, tiny_release, capsys):
    from idfusion.cli.main import main

    path = _arc2face_jobs(tmp_path, faces_dir, [1, 2, 3])
    out = tmp_path / "out"
    args = ["generate", "--jobs", str(path), "--model", str(tiny_release("arc2face")), "--out", str(out)]
    assert main(args) == 1  # one bad line: reported, the others ran
    captured = capsys.readouterr()
    written = captured.out.split()
    assert len(written) == 3 and "line 2: " in captured.err and "missing.png: file not found" in captured.err
    assert sorted(read_generation_metadata(p)["seed"] for p in written) == [1, 2, 3]
    keys = {read_generation_metadata(p)["batch_key"] for p in written}
    assert keys == {item.key for item in expand_items(read_job_file(path, model=str(tiny_release("arc2face"))))}

    assert main(args) == 1
    captured = capsys.readouterr()
    assert captured.out.split() == [] and "0 images written, 3 already done" in captured.err


def test_two_processes_share_the_items_without_duplicates(tmp_path, faces_dir, tiny_release):
    path = _arc2face_jobs(tmp_path, faces_dir, [5, 6, 7, 8, 9])
    out = tmp_path / "out"
    command = [sys.executable, "-m", "idfusion.cli.main", "generate", "--jobs", str(path),
               "--model", str(tiny_release("arc2face")), "--out", str(out)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    workers = [subprocess.Popen([*command, "--shard", f"{i}/2"], env=env, stdout=subprocess.PIPE, text=True)
               for i in range(2)]  # fmt: skip
    outputs = [w.communicate(timeout=600)[0].split() for w in workers]
    assert [w.returncode for w in workers] == [1, 1]  # each reports the bad line
    assert sorted(len(o) for o in outputs) == [2, 3]
    images = sorted(out.glob("*.png"))
    assert len(images) == 5
    assert sorted(read_generation_metadata(p)["seed"] for p in images) == [5, 6, 7, 8, 9]
