"""``idfusion eval``: a small end-to-end run on tiny models, score plumbing on a fake judge, resume, two-process
sharding, notes for missing optional models, and the refusal of a judge that is a method's own encoder."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from PIL import Image

from idfusion.eval.benchmark import EvalConfigError, load_benchmark, parse_benchmark
from idfusion.eval.report import COLUMNS


@pytest.fixture
def no_torchmetrics(monkeypatch):
    """FID/KID's library counts as not installed (whether or not this machine has it)."""
    for name in ("torchmetrics", "torchmetrics.image", "torchmetrics.image.fid", "torchmetrics.image.kid"):
        monkeypatch.setitem(sys.modules, name, None)


@pytest.fixture
def count_generations(monkeypatch):
    """Count pipeline calls made through idfusion.batch (each makes one image here)."""
    from idfusion import jobs

    calls = []
    real = jobs.run_job

    def counted(job, *args, **kwargs):
        calls.append(job.seed)
        return real(job, *args, **kwargs)

    monkeypatch.setattr(jobs, "run_job", counted)
    return calls


def _photo_bench(tmp_path: Path, faces_dir: Path, model: Path, seeds=(0, 1)) -> Path:
    target = tmp_path / "obama_flipped.png"
    Image.open(faces_dir / "obama.jpg").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(target)
    bench = {
        "name": "tiny-photos",
        "identities": [{"name": "obama", "references": [str(faces_dir / "obama.jpg")], "targets": [target.name]}],
        "prompts": ["a photo of a person in a garden", "a person wearing a hat"],
        "methods": [{"method": "arc2face", "model": str(model)}],
        "seeds": list(seeds),
        "steps": 1,
        "judge": "dlib",
        "detector": "hog",
        "clip_model": "no-such-org/clip-that-is-not-here",
        "device": "cpu",
        "offline": True,
    }
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(bench))
    return path


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "scores.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_photos_eval_end_to_end_resumes_and_notes_missing_models(
    tmp_path, faces_dir, tiny_release, count_generations, no_torchmetrics, capsys
):
    from idfusion.cli.main import main

    bench = _photo_bench(tmp_path, faces_dir, tiny_release("arc2face"))
    out = tmp_path / "report"
    # half the images first (--limit), then the full run makes only the other half
    assert main(["eval", str(bench), "--out", str(out), "--limit", "2", "--no-progress"]) == 0
    assert len(count_generations) == 2
    assert main(["eval", str(bench), "--out", str(out), "--no-progress"]) == 0
    assert len(count_generations) == 4
    printed = capsys.readouterr()
    assert "2 images generated, 2 already done" in printed.err

    for name in ("report.md", "report.html", "scores.csv", "scores.json"):
        assert (out / name).is_file(), name
    rows = _rows(out)
    assert list(rows[0]) == list(COLUMNS)
    assert len(rows) == 4 and {r["method"] for r in rows} == {"arc2face"}
    assert sorted((r["prompt_index"], r["seed"]) for r in rows) == [("0", "0"), ("0", "1"), ("1", "0"), ("1", "1")]
    assert all((out / r["image"]).is_file() and r["face_found"] in ("0", "1") for r in rows)
    assert all(float(r["generation_seconds"]) > 0 and float(r["peak_memory_mb"]) > 0 for r in rows)
    document = json.loads((out / "scores.json").read_text())
    assert document["settings"]["judge"] == "dlib" and len(document["rows"]) == 4
    notes = " ".join(document["notes"])
    assert "CLIP-T skipped" in notes and "no-such-org/clip-that-is-not-here" in notes
    assert "FID/KID skipped" in notes and "torchmetrics" in notes
    report = (out / "report.md").read_text()
    assert "| arc2face | 4 |" in report and "CLIP-T skipped" in report and "grids/obama__p00.png" in report
    assert (out / "grids" / "obama__p01.png").is_file()
    assert "<table>" in (out / "report.html").read_text()

    # a third run makes nothing; --report-only never generates
    assert main(["eval", str(bench), "--out", str(out), "--report-only", "--no-progress"]) == 0
    assert len(count_generations) == 4


def test_two_shards_then_one_merge_run_make_the_full_table(tmp_path, faces_dir, tiny_release, count_generations):
    from idfusion.cli.main import main

    bench = _photo_bench(tmp_path, faces_dir, tiny_release("arc2face"), seeds=(5, 6))
    out = tmp_path / "report"
    command = [sys.executable, "-m", "idfusion.cli.main", "eval", str(bench), "--out", str(out), "--no-progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    workers = [
        subprocess.Popen([*command, "--shard", f"{i}/2"], env=env, stderr=subprocess.PIPE, text=True) for i in range(2)
    ]
    errors = [w.communicate(timeout=600)[1] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], errors
    assert all("2 images generated" in e and "2 left to other shards" in e for e in errors), errors
    assert not (out / "report.md").exists()  # shard runs only generate
    assert len(list((out / "work" / "images").glob("*.png"))) == 4

    assert main(["eval", str(bench), "--out", str(out), "--no-progress"]) == 0
    assert count_generations == []  # the merge run reuses every image
    rows = _rows(out)
    assert len(rows) == 4 and all(r["image"] and not r["error"] for r in rows)
    assert sorted(int(r["seed"]) for r in rows) == [5, 5, 6, 6]


# ---- score plumbing on a fake judge ----------------------------------------------------------------------------


def _unit(degrees: float) -> np.ndarray:
    r = math.radians(degrees)
    return np.array([math.cos(r), math.sin(r)], dtype=np.float32)


class FakeJudge:
    """Faces by the image's first pixel: red channel value -> the angles (degrees) of its faces' 2-d embeddings."""

    def __init__(self, faces: dict[int, list[float]]) -> None:
        self.table = faces

    def analyze(self, image, select="all"):
        from idfusion.errors import NoFaceError
        from idfusion.images import load_image

        pixels = load_image(image, max_pixels=None).array
        angles = self.table[int(pixels[0, 0, 0])]
        if not angles:
            raise NoFaceError("<fake>", "no face")
        faces = [SimpleNamespace(embedding=_unit(a), area=1.0, bbox=np.zeros(4), landmarks=np.zeros((5, 2)))
                 for a in angles]  # fmt: skip
        return faces if select == "all" else [faces[select]]


def _solid(path: Path, red: int) -> Path:
    Image.new("RGB", (8, 8), (red, 0, 0)).save(path)
    return path


def test_scores_match_hand_computed_values_on_a_fake_judge(tmp_path):
    from idfusion.eval.harness import PlannedImage, _add_diversity, _identity_embeddings, score_images, summarize

    ref, target = _solid(tmp_path / "ref.png", 1), _solid(tmp_path / "target.png", 2)
    bench = parse_benchmark(
        {"identities": [{"name": "p", "references": [ref.name], "targets": [target.name]}], "prompts": ["x"],
         "methods": [{"method": "flashface"}], "judge": "dlib", "detector": "hog", "seeds": [0, 1, 2]},
        folder=tmp_path,
    )  # fmt: skip
    # reference at 0 degrees, held-out target at 90; image 10: one face at 30; image 11: faces at 200 and 80 (the
    # Hungarian match to the reference takes 80); image 12: no face
    judge = FakeJudge({1: [0.0], 2: [90.0], 10: [30.0], 11: [200.0, 80.0], 12: []})
    notes: list[str] = []
    people = _identity_embeddings(bench, judge, notes)
    assert notes == []
    planned = [
        PlannedImage("flashface", "flashface", "p", 0, "x", seed, f"k{seed}", _solid(tmp_path / f"g{seed}.png", red),
                     {"generation_seconds": 2.0 + seed, "peak_memory_mb": 100.0 * (seed + 1)})
        for seed, red in enumerate((10, 11, 12))
    ]  # fmt: skip
    rows = score_images(bench, planned, tmp_path, judge=judge, people=people, progress=False)
    _add_diversity(rows)
    first, second, third = rows
    cos = lambda d: math.cos(math.radians(d))  # noqa: E731
    assert first["sim_ref"] == pytest.approx(cos(30)) and first["sim_target"] == pytest.approx(cos(60))
    assert first["paste"] == pytest.approx(cos(30) - cos(60))
    assert first["copy_geo"] == pytest.approx((60 - 30) / 90)
    assert second["faces"] == 2 and second["sim_target"] == pytest.approx(cos(10))
    assert second["copy_geo"] == pytest.approx((10 - 80) / 90)
    assert third["face_found"] is False and math.isnan(third["sim_target"])
    assert first["diversity"] == pytest.approx(1 - cos(50))  # seeds 0 and 1 have faces at 30 and 80 degrees

    summary = summarize(rows, ["flashface"])["flashface"]
    assert summary["images"] == 3 and summary["face_rate"] == pytest.approx(2 / 3)
    assert summary["sim_target"] == pytest.approx((cos(60) + cos(10)) / 2)
    assert summary["copy_geo"] == pytest.approx(((60 - 30) / 90 + (10 - 80) / 90) / 2)
    assert summary["seconds_per_image"] == pytest.approx(3.0) and summary["peak_memory_mb"] == 300.0


def test_world_prompt_fidelity_reads_the_attribute_checkers(tmp_path):
    from idfusion.eval.harness import PlannedImage, score_images
    from idfusion.eval.scoring import IdentityEmbeddings
    from idfusion.faces import FaceAnalyzer
    from idfusion.world import AttributeChecker, caption, render
    from idfusion.world.attributes import parse_caption

    person = render(1_000_003, image_seed=5)
    bench = parse_benchmark({"kind": "world", "world": {"identities": 1, "prompts": 1}, "methods": [],
                             "oracle": True, "baseline": False})  # fmt: skip
    judge = FaceAnalyzer("world", "world-judge", crops=())
    face = judge.get(person.image)
    people = {"p": IdentityEmbeddings(face.embedding[None], face.embedding[None] + 0.1)}
    path = tmp_path / "render.png"
    Image.fromarray(person.image).save(path)
    prompt = caption(person.attributes)
    item = PlannedImage("renders", "world-renders", "p", 0, prompt, 0, "k", path, {})
    checker = AttributeChecker()
    (row,) = score_images(bench, [item], tmp_path, judge=judge, people=people, checker=checker, progress=False)
    wanted = parse_caption(prompt).specified()
    seen = checker.predict(person.image).attributes.to_dict()
    expected = sum(seen[k] == v for k, v in wanted.items()) / len(wanted)
    assert row["prompt_fidelity"] == pytest.approx(expected) and expected > 0.5
    assert row["sim_ref"] == pytest.approx(1.0, abs=1e-5)


# ---- refusals and optional models ------------------------------------------------------------------------------


def test_a_judge_that_is_the_methods_own_encoder_is_refused(tmp_path, faces_dir):
    photos = {"identities": [{"name": "o", "references": [str(faces_dir / "obama.jpg")],
                              "targets": [str(faces_dir / "obama_rgba.png")]}],
              "prompts": ["a person"], "methods": [{"method": "arc2face"}, {"method": "flashface"}]}  # fmt: skip
    with pytest.raises(EvalConfigError, match="arc2face is conditioned on") as refused:
        parse_benchmark({**photos, "judge": "onnx"})
    assert "allow_same_judge" in str(refused.value)
    allowed = parse_benchmark({**photos, "judge": "onnx", "allow_same_judge": True, "detector": "hog"})
    assert allowed.judge == "onnx" and any("allow_same_judge" in n for n in allowed.notes)
    assert parse_benchmark({**photos, "judge": "dlib"}).judge == "dlib"

    world = {"kind": "world", "world": {"identities": 1, "prompts": 1}, "methods": [{"method": "arc2face"}]}
    with pytest.raises(EvalConfigError, match="world's conditioning recognizer"):
        parse_benchmark({**world, "judge": "world"})
    assert parse_benchmark({**world, "methods": [{"method": "flashface"}], "judge": "world"}).judge == "world"

    from idfusion.cli.main import main

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**photos, "judge": "onnx"}))
    assert main(["eval", str(path), "--out", str(tmp_path / "out")]) == 1


def test_benchmark_files_parse_and_bad_keys_are_named(tmp_path):
    from idfusion.eval.benchmark import BENCHMARKS_FOLDER, default_benchmark

    world = load_benchmark(default_benchmark())
    assert world.kind == "world" and world.judge == "world-judge" and world.baseline and world.oracle
    assert len(world.identities) == 4 and len(world.prompts) == 4
    assert all(p.world_seed >= 1_000_000 for p in world.identities)  # held-out identities
    template = yaml.safe_load((BENCHMARKS_FOLDER / "photos-template.yaml").read_text())
    assert template["kind"] == "photos" and {m["method"] for m in template["methods"]} >= {"arc2face", "adaface"}
    for bad, message in [
        ({"kind": "world", "steps": "many"}, "steps"),
        ({"kind": "world", "colour": 1}, "unknown key"),
        ({"kind": "world", "methods": [{"method": "arc2face", "seeds": [1]}]}, "come from the benchmark"),
        ({"kind": "world", "methods": [{"method": "nope"}]}, "unknown method"),
        ({"identities": [{"name": "a", "references": ["missing.jpg"], "targets": ["x.jpg"]}], "prompts": ["p"]},
         "file not found"),
    ]:  # fmt: skip
        with pytest.raises(EvalConfigError, match=message):
            parse_benchmark(bad, folder=tmp_path)


def test_missing_optional_models_give_notes(no_torchmetrics):
    from idfusion.eval.scoring import ClipScorer, inception_scores

    scorer, note = ClipScorer.load("no-such-org/clip-that-is-not-here")
    assert scorer is None and "CLIP-T skipped" in note
    images = [np.zeros((8, 8, 3), np.uint8)] * 2
    scores, note = inception_scores(images, images)
    assert scores is None and "torchmetrics" in note


def test_parse_job_is_public_and_measure_times_a_block(monkeypatch):
    from idfusion.batch import measure, parse_job

    with pytest.raises(ValueError, match="unknown key 'magic'"):
        parse_job({"method": "arc2face", "faces": [], "magic": 1})
    with measure() as used:
        sum(range(1000))
    assert used["seconds"] >= 0 and used["peak_memory_kind"] in ("process-peak-rss", "unavailable")

    # on a CUDA device the peak is CUDA's allocator peak since the block began (a stand-in torch.cuda here)
    import torch

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda index=None: calls.append(index))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda index=None: 3 * 2**20)
    with measure("cuda:1") as used:
        pass
    assert calls == [1] and used["peak_memory_mb"] == 3.0 and used["peak_memory_kind"] == "cuda-allocated"


def test_world_benchmark_runs_an_embedding_method_on_the_world_recognizer(tmp_path, capsys):
    """Arc2Face's world weights are conditioned on the world recognizer: the world benchmark must not ask for its
    ONNX ArcFace (which the world does not have)."""
    import yaml

    from idfusion.cli.main import main

    bench = tmp_path / "bench.yaml"
    bench.write_text(yaml.safe_dump({
        "kind": "world", "world": {"identities": 1, "references": 1, "targets": 1, "prompts": 1},
        "methods": [{"method": "arc2face", "model": "world"}], "baseline": False, "oracle": False, "seeds": [0],
        "steps": 2,
    }))  # fmt: skip
    assert main(["eval", str(bench), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "1 images generated" in err and "0 error(s)" in err and "ONNX" not in err
    assert {r["method"] for r in _rows(tmp_path / "out")} == {"arc2face"}
