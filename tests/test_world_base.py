"""The world base model: held-out captions, the Fréchet distance, the shipped pipeline and a smoke training run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from idfusion.world import caption, is_heldout, sample_attributes, sample_heldout_attributes


def test_heldout_combinations_are_a_fixed_eighth_and_never_written_to_training_data(tmp_path):
    from idfusion.training import read_jsonl
    from idfusion.world import parse_caption, write_dataset

    drawn = [sample_attributes(seed) for seed in range(4000)]
    share = np.mean([is_heldout(a) for a in drawn])
    assert 0.09 < share < 0.17  # one bucket of 8, by a hash of the caption
    assert [is_heldout(a) for a in drawn[:50]] == [is_heldout(a) for a in drawn[:50]]
    for seed in range(5):
        wanted = sample_heldout_attributes(seed, people=1 + seed % 3)
        assert is_heldout(wanted) and wanted.people == 1 + seed % 3
    assert sample_heldout_attributes(7) == sample_heldout_attributes(7)

    metadata = write_dataset(tmp_path, range(6), 4, scenes=3, progress=False, exclude_heldout=True)
    records = read_jsonl(metadata)
    assert len(records) == 27
    assert not any(is_heldout(parse_caption(r.caption)) for r in records)
    plain = write_dataset(tmp_path / "plain", range(6), 4, scenes=3, progress=False)
    # Without the flag the same renders include held-out combinations (so the flag did something).
    assert any(is_heldout(parse_caption(r.caption)) for r in read_jsonl(plain))


def test_frechet_distance_against_closed_forms():
    from idfusion.world import frechet_distance

    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    # Diagonal covariances: FD = |mu_a - mu_b|^2 + sum (sigma_a - sigma_b)^2.
    x = rng.normal(size=(20000, 2)) * [1.0, 2.0]
    y = rng.normal(size=(20000, 2)) * [3.0, 0.5] + [1.0, -2.0]
    mx, my = x.mean(0), y.mean(0)
    sx, sy = np.sqrt(np.var(x, 0, ddof=1)), np.sqrt(np.var(y, 0, ddof=1))
    expected = ((mx - my) ** 2).sum() + ((sx - sy) ** 2).sum()
    assert frechet_distance(x, y) == pytest.approx(expected, rel=0.02)  # off-diagonal sample noise only
    with pytest.raises(ValueError, match="two"):
        frechet_distance(a[:1], a)


@pytest.fixture(scope="module")
def manifest():
    from idfusion.world.backends import weights_dir

    return json.loads((weights_dir() / "MANIFEST.json").read_text())


def test_shipped_base_is_an_ordinary_sd15_folder_with_recorded_checksums(manifest):
    from idfusion.outputs import file_sha256
    from idfusion.sd15 import SD15_DOWN_BLOCKS, SD15_UP_BLOCKS
    from idfusion.world.backends import weights_dir
    from idfusion.world.base import base_model_dir

    folder = base_model_dir()
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    unet = json.loads((folder / "unet" / "config.json").read_text())
    vae = json.loads((folder / "vae" / "config.json").read_text())
    assert unet["down_block_types"] == SD15_DOWN_BLOCKS and unet["up_block_types"] == SD15_UP_BLOCKS
    assert vae["latent_channels"] == 4 and len(vae["block_out_channels"]) == 3  # 4x downsampling (see train_base)
    assert unet["sample_size"] * 4 == 64
    weights = sorted(folder.rglob("*.safetensors"))
    assert {w.parent.name for w in weights} == {"unet", "vae", "text_encoder"}
    root = weights_dir()
    shipped = sorted(p for p in folder.rglob("*") if p.is_file())
    for path in shipped:
        entry = manifest["files"][path.relative_to(root).as_posix()]
        assert entry["sha256"] == file_sha256(path), path
        assert entry["command"].startswith("python -m idfusion.world.train_base") and entry["seed"] == 0
    assert all(w.stat().st_size < 12_000_000 for w in weights)  # a few MB each
    base = manifest["base"]
    assert base["metrics"]["settings"]["count"] >= 1000 and "frechet_judge" in base["metrics"]


def test_shipped_base_reproduces_its_recorded_check(manifest):
    """The manifest's "check" (16 held-out captions, seed 1, 12 steps), measured again from the shipped files.

    Tolerance: the run is deterministic on one machine; on another CPU, float rounding may flip one image's
    attribute (1/16 = 0.0625) and move the Fréchet distance by a few percent.
    """
    from idfusion.world.base import base_model_dir
    from idfusion.world.train_base import CHECK, measure_base

    recorded = manifest["base"]["check"]
    assert manifest["base"]["check_config"] == CHECK
    measured = measure_base(base_model_dir(), **CHECK, progress=False)
    for group in ("generated", "renders"):
        for name, value in recorded[group].items():
            assert measured[group][name] == pytest.approx(value, abs=0.07), (group, name)
    assert measured["frechet_judge"] == pytest.approx(recorded["frechet_judge"], rel=0.1)
    assert measured["faces_missed"] == pytest.approx(recorded["faces_missed"], abs=1)
    # The base model follows prompts: far above chance (1/8 for colours) on unseen attribute combinations.
    assert measured["generated"]["background"] > 0.5 and measured["generated"]["clothing"] > 0.4


def test_train_base_smoke_run_writes_a_loadable_pipeline_and_its_manifest(tmp_path):
    from diffusers import StableDiffusionPipeline

    from idfusion.world.base import generate
    from idfusion.world.train_base import train_base

    out = tmp_path / "weights" / "base"
    entry = train_base(out, tmp_path / "work", plan="smoke", progress=False, command="smoke", measure=False)
    assert entry["plan"] == "smoke" and entry["final_loss"]["unet"] is not None
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    images = generate(pipe, [caption(sample_attributes(0))], [0], num_inference_steps=2)
    assert images.shape == (1, 64, 64, 3) and images.dtype == np.uint8
    manifest = json.loads((out.parent / "MANIFEST.json").read_text())
    assert "base/unet/diffusion_pytorch_model.safetensors" in manifest["files"]
    assert manifest["base"]["command"] == "smoke"
