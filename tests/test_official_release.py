"""``bench --against official``: the reference loops and idfusion held to numbers recorded from the releases' code.

``tests/data/official/<method>.npz`` holds the final latents that each release's own code produced on the tiny
random weights ``write_release_weights(tiny=True, seed=0)`` (``benchmarks/record_release_outputs.py``, run on a
checkout of the release; the file records its commit and library versions). Where a checkout is present
(``$IDFUSION_OFFICIAL_<METHOD>``), the release itself runs here too.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from idfusion.official import Release, ReleaseCodeError, locate_release, release_shims
from idfusion.official.harness import release_module

DATA = Path(__file__).parent / "data" / "official"
METHODS = ["flashface"]  # arc2face: its release needs transformers 4; no numbers recorded yet


def _recorded(method: str) -> tuple[dict, dict[int, np.ndarray]]:
    with np.load(DATA / f"{method}.npz") as data:
        meta = json.loads(str(data["meta"]))
        return meta, {int(k.split("_")[1]): data[k] for k in data.files if k.startswith("latents_")}


@pytest.fixture(scope="module", params=METHODS)
def tiny_weights(request, tmp_path_factory):
    module = release_module(request.param)
    folder = module.write_release_weights(tmp_path_factory.mktemp(request.param) / "weights", tiny=True, seed=0)
    return request.param, module, folder


def _close(got: np.ndarray, want: np.ndarray, tolerance: float = 1e-5) -> float:
    assert got.shape == want.shape
    relative = float(np.abs(got - want).max() / np.abs(want).max())
    assert relative < tolerance, f"relative difference {relative:.2e} >= {tolerance}"
    return relative


@pytest.mark.parametrize("side", ["reference", "ours"])
def test_matches_the_release_outputs(tiny_weights, side):
    method, module, folder = tiny_weights
    meta, recorded = _recorded(method)
    assert meta["commit"] == module.RELEASE.commit  # recorded from the commit the runner was written against
    build = module.reference_runner if side == "reference" else module.ours_runner
    run = build(folder)
    for size, latents in recorded.items():
        _close(run(4, 0, size), latents)
    # and a different seed is a different image: the comparison can fail
    size, latents = next(iter(recorded.items()))
    assert np.abs(run(4, 1, size) - latents).max() > 1e-2 * np.abs(latents).max()


def test_the_release_itself_where_a_checkout_is_present(tiny_weights):
    method, module, folder = tiny_weights
    root = locate_release(module.RELEASE)
    if root is None:
        pytest.skip(f"no checkout of {module.RELEASE.repo}: set ${module.RELEASE.env_var}")
    run = module.release_runner(root, folder)
    for size, latents in _recorded(method)[1].items():
        _close(run(4, 0, size), latents, 1e-6)


def test_locate_release_names_what_is_wrong(tmp_path, monkeypatch):
    release = release_module("flashface").RELEASE
    monkeypatch.delenv(release.env_var, raising=False)
    assert locate_release(release) is None
    with pytest.raises(ReleaseCodeError, match="not a folder"):
        locate_release(release, tmp_path / "missing")
    with pytest.raises(ReleaseCodeError, match=r"reference_unet\.py is missing.*ali-vilab/FlashFace"):
        locate_release(release, tmp_path)
    monkeypatch.setenv(release.env_var, str(tmp_path))
    with pytest.raises(ReleaseCodeError, match=r"\$IDFUSION_OFFICIAL_FLASHFACE"):
        locate_release(release)
    (tmp_path / release.marker).parent.mkdir(parents=True)
    (tmp_path / release.marker).write_text("")
    assert locate_release(release) == tmp_path


def test_release_shims_import_from_the_checkout_and_restore_everything(tmp_path):
    (tmp_path / "utils.py").write_text("import torchvision.transforms as T\nVALUE = 'release'\n")
    (tmp_path / "models.py").write_text(
        "import torch\ndef on_device():\n    return torch.zeros(1).cuda().device.type\n"
    )
    release = Release("x", "o/x", "0" * 40, "", "utils.py", 512, 4)
    cuda, module_cuda, path = torch.Tensor.cuda, torch.nn.Module.cuda, list(sys.path)
    with release_shims(tmp_path, release, "cpu", ("torchvision", "torchvision.transforms")):
        import models
        import utils

        assert utils.VALUE == "release"
        if not torch.cuda.is_available():
            assert models.on_device() == "cpu"
        with pytest.raises(ReleaseCodeError, match="torchvision.transforms.Resize"):
            utils.T.Resize(8)
    assert (torch.Tensor.cuda, torch.nn.Module.cuda, sys.path) == (cuda, module_cuda, path)
    assert "utils" not in sys.modules or getattr(sys.modules["utils"], "VALUE", None) != "release"
    assert "models" not in sys.modules or not hasattr(sys.modules["models"], "on_device")


def test_bench_against_official_runs_both_sides_alternately(tmp_path):
    """The CLI end to end on tiny weights: reference loop and idfusion in their own processes, one table."""
    from idfusion.cli.main import main

    out = tmp_path / "report.json"
    docs = tmp_path / "benchmarks.md"
    assert main(["bench", "--method", "flashface", "--against", "official", "--tiny", "--steps", "2", "--repeats",
                 "1", "--dtype", "float32", "--json", str(out), "--write-docs", str(docs)]) == 0  # fmt: skip
    report = json.loads(out.read_text())
    assert report["baseline"] == "reference" and report["release"]["repo"] == "ali-vilab/FlashFace"
    (row,) = report["rows"]
    assert row["size"] == 64 and row["latent_difference"] < 1e-5  # float32: the same image
    for side in ("reference", "ours"):
        assert row[side]["seconds_per_step"] > 0 and row[side]["peak_rss_gib"] > 0.1
    assert "<!-- bench-release:flashface -->" in docs.read_text() and "reference loop" in docs.read_text()


def test_bench_against_official_rejects_bad_input(tmp_path, capsys):
    from idfusion.cli.main import main

    assert main(["bench", "--method", "flashface", "--against", "official", "--official-code", str(tmp_path)]) != 0
    assert "reference_unet.py is missing" in capsys.readouterr().err
    assert main(["bench", "--method", "flashface", "--against", "official", "--sizes", "500"]) != 0
    assert "multiple of 64" in capsys.readouterr().err
