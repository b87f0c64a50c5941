"""The training core on the text-to-image recipe with tiny SD1.5 models and 16 coloured-shape images:
stages train and save a loadable SD1.5 folder; an interrupted run resumes to exactly the uninterrupted result;
checkpoints are atomic; two DDP processes match one process with the combined batch."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from idfusion.training import checkpoints as checkpoints_module
from idfusion.training.checkpoints import CheckpointError, Checkpoints
from idfusion.training.config import load_config
from idfusion.training.core import TrainingError, train
from idfusion.training.data import DataError
from idfusion.training.logs import read_metrics
from idfusion.training.recipes.text_to_image import TextToImageRecipe
from idfusion.training.shapes import write_shapes_dataset

# A UNet narrower than the tiny kit's (same topology): checkpoints of a few MB, ~0.05 s per step.
SMALL_UNET = {"block_out_channels": [16, 32, 64, 64]}
QUIET_LOGS = {"tensorboard": False, "plot": False, "validate_at_end": False}


def reset_accelerate() -> None:
    # accelerate keeps process-wide singletons; a run that crashed on purpose must not leak into the next one.
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    reset_accelerate()
    yield
    reset_accelerate()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The CI box has 2 shared cores: two torch threads beside any other busy process run ~10x slower (measured).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return write_shapes_dataset(tmp_path_factory.mktemp("shapes"), count=16, size=64)


def run_document(shapes: Path, output: Path, **train: object) -> dict:
    """6 steps with everything that resume must restore: warmup + cosine schedule, EMA, accumulation, flips and
    caption dropout (both drawn per sample), checkpoints every 2 steps."""
    options = {
        "max_steps": 6,
        "batch_size": 2,
        "gradient_accumulation_steps": 2,
        "learning_rate": 1e-3,
        "lr_scheduler": "cosine",
        "lr_warmup_steps": 2,
        "use_ema": True,
        "ema_decay": 0.9,
    }
    options.update(train)
    return {
        "recipe": {"name": "text-to-image", "unet": SMALL_UNET, "caption_dropout": 0.5},
        "data": {"train": str(shapes), "resolution": 64, "random_flip": True},
        "train": options,
        "checkpoint": {"every_steps": 2, "keep_last": 2},
        "log": QUIET_LOGS,
        "seed": 7,
        "output_dir": str(output),
    }


def max_difference(a: Path, b: Path) -> float:
    first, second = load_file(a), load_file(b)
    assert first.keys() == second.keys()
    return max(float((first[k].float() - second[k].float()).abs().max()) for k in first)


def assert_same_run(reference: Path, other: Path, atol: float) -> None:
    """Same trained weights, same EMA weights (the saved model) and the same loss at every step."""
    raw = max_difference(
        reference / "checkpoints/checkpoint-6/model.safetensors", other / "checkpoints/checkpoint-6/model.safetensors"
    )
    unet = "model/unet/diffusion_pytorch_model.safetensors"
    ema = max_difference(reference / unet, other / unet)
    assert raw <= atol and ema <= atol, (raw, ema)
    losses = [[row["loss"] for row in read_metrics(folder / "logs/metrics.csv")] for folder in (reference, other)]
    assert len(losses[0]) == 6 and losses[0] == pytest.approx(losses[1], abs=max(atol, 1e-6))


@pytest.fixture(scope="module")
def reference(shapes, tmp_path_factory) -> Path:
    """One process, batch 2, 2 accumulation steps, never interrupted."""
    reset_accelerate()
    output = tmp_path_factory.mktemp("reference")
    result = train(load_config(document=run_document(shapes, output)))
    assert result.step == 6
    return output


# -- a short run of both stages ----------------------------------------------------------------------------------


def test_text_to_image_stages_train_and_save_a_loadable_sd15_folder(shapes, tmp_path):
    from diffusers import StableDiffusionPipeline

    # Stage 1: the VAE alone; its latent scale is measured at the end.
    vae_stage = {
        "recipe": {"name": "text-to-image", "trainable": ["vae"], "unet": SMALL_UNET, "validation_images": 2},
        "data": {"train": str(shapes), "resolution": 64},
        "train": {"max_steps": 8, "batch_size": 4, "learning_rate": 2e-3},
        "checkpoint": {"every_steps": 100},
        "log": {"tensorboard": False},
        "output_dir": str(tmp_path / "vae"),
    }
    first = train(load_config(document=vae_stage))
    scale = json.loads((first.model_dir / "vae/config.json").read_text())["scaling_factor"]
    assert 0 < scale != 0.18215
    assert (tmp_path / "vae/validation/step-000008.png").is_file()
    reset_accelerate()

    # Stage 2: the UNet on that VAE's latents, with caption dropout.
    unet_stage = {
        "recipe": {"name": "text-to-image", "pretrained": str(first.model_dir), "validation_inference_steps": 2},
        "data": {"train": str(shapes), "resolution": 64},
        "train": {"max_steps": 30, "batch_size": 4, "learning_rate": 1e-3},
        "checkpoint": {"every_steps": 100},
        "log": {"validate_every_steps": 15},
        "output_dir": str(tmp_path / "unet"),
    }
    second = train(load_config(document=unet_stage))

    losses = [row["loss"] for row in read_metrics(tmp_path / "unet/logs/metrics.csv")]
    assert len(losses) == 30
    early, late = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert late < 0.8 * early, losses
    for produced in ("logs/loss.png", "validation/step-000015.png", "validation/step-000030.png", "config.yaml"):
        assert (tmp_path / "unet" / produced).is_file(), produced
    assert list((tmp_path / "unet/logs/tensorboard").rglob("events.out.tfevents.*"))
    assert [p.name for p in (tmp_path / "unet/checkpoints").iterdir()] == ["checkpoint-30"]

    # The output is an ordinary SD1.5 folder: release-style tokenizer and text-encoder key names, and it generates.
    model = second.model_dir
    assert (model / "tokenizer/vocab.json").is_file() and (model / "tokenizer/merges.txt").is_file()
    assert all(k.startswith("text_model.") for k in load_file(model / "text_encoder/model.safetensors"))
    pipeline = StableDiffusionPipeline.from_pretrained(model)
    pipeline.set_progress_bar_config(disable=True)
    assert pipeline.vae.config.scaling_factor == scale
    image = pipeline(
        "a red circle on a white background",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert image.shape == (1, 64, 64, 3) and float(image.std()) > 0


# -- resume ------------------------------------------------------------------------------------------------------


class SimulatedCrash(BaseException):
    """Not an Exception, like a kill: nothing in the core may catch it."""


def crashing(recipe: type, call: int = 9, where: str = "in step 5") -> type:
    """``recipe`` dying in its ``call``-th micro-batch: by default the first of step 5 (after checkpoint-4) of a run
    with two micro-batches a step."""

    class Crashing(recipe):
        calls = 0

        def loss(self, batch):
            type(self).calls += 1
            if type(self).calls == call:
                raise SimulatedCrash(where)
            return super().loss(batch)

    return Crashing


CrashingRecipe = crashing(TextToImageRecipe)


def test_resume_after_a_crash_ends_where_the_uninterrupted_run_ends(shapes, tmp_path, reference):
    config = load_config(document=run_document(shapes, tmp_path))
    with pytest.raises(SimulatedCrash):
        train(config, recipe_class=CrashingRecipe)
    assert Checkpoints(tmp_path / "checkpoints", 2).latest().name == "checkpoint-4"
    reset_accelerate()

    result = train(config, resume="latest")

    assert result.step == 6
    assert_same_run(reference, tmp_path, atol=1e-6)  # measured: bit-identical


def test_a_crash_while_writing_a_checkpoint_is_never_resumed(shapes, tmp_path, reference, monkeypatch):
    real_replace = checkpoints_module.replace_dir

    def crash_on_checkpoint_4(staging: Path, final: Path) -> Path:
        if staging.name == ".checkpoint-4.tmp":
            raise SimulatedCrash("mid-write")  # everything is written, nothing renamed yet
        return real_replace(staging, final)

    monkeypatch.setattr(checkpoints_module, "replace_dir", crash_on_checkpoint_4)
    config = load_config(document=run_document(shapes, tmp_path))
    with pytest.raises(SimulatedCrash):
        train(config)
    monkeypatch.setattr(checkpoints_module, "replace_dir", real_replace)
    leftover = tmp_path / "checkpoints/.checkpoint-4.tmp"
    assert (leftover / "trainer_state.json").is_file()  # complete inside, but never under a checkpoint name
    assert Checkpoints(tmp_path / "checkpoints", 2).latest().name == "checkpoint-2"
    reset_accelerate()

    train(config, resume="latest")  # from checkpoint-2: steps 3-6 again

    assert not leftover.exists()
    assert_same_run(reference, tmp_path, atol=1e-6)


def test_keep_last_and_refusing_to_mix_runs(shapes, reference):
    names = sorted(p.name for p in (reference / "checkpoints").iterdir())
    assert names == ["checkpoint-4", "checkpoint-6"]  # keep_last=2, no temporary or trash folders
    state = json.loads((reference / "checkpoints/checkpoint-6/trainer_state.json").read_text())
    assert state["samples_seen"] == 24 and state["global_batch_size"] == 4
    assert (reference / "checkpoints/checkpoint-6/ema.safetensors").is_file()

    with pytest.raises(CheckpointError, match="holds checkpoints of an earlier run; pass --resume latest"):
        train(load_config(document=run_document(shapes, reference)))
    with pytest.raises(TrainingError, match="global batch of 4 samples per step, this run has 2"):
        train(load_config(document=run_document(shapes, reference, gradient_accumulation_steps=1)), resume="latest")


def test_bad_data_fails_before_any_model_is_built(shapes, tmp_path):
    lines = shapes.read_text().splitlines()
    broken = json.loads(lines[1])
    del broken["caption"]
    jsonl = shapes.parent / "broken.jsonl"
    jsonl.write_text("\n".join([lines[0], json.dumps(broken), *lines[2:]]) + "\n")

    class MustNotBuild(TextToImageRecipe):
        def build(self):
            raise AssertionError("models were built before the data was checked")

    document = run_document(shapes, tmp_path)
    document["data"]["train"] = str(jsonl)
    with pytest.raises(DataError, match=rf"{jsonl}:2: caption: missing \(required\)"):
        train(load_config(document=document), recipe_class=MustNotBuild)


# -- DDP ---------------------------------------------------------------------------------------------------------


def _ddp_worker(document: dict) -> None:
    # Runs in each forked process. accelerate sets 2 threads per CPU process unless OMP_NUM_THREADS is set.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    reset_accelerate()  # the fork inherits the parent's single-process state
    train(load_config(document=document))


def test_two_processes_match_one_process_with_the_combined_batch(shapes, tmp_path, reference):
    from accelerate import debug_launcher

    combined = tmp_path / "one-process-batch-4"
    train(load_config(document=run_document(shapes, combined, batch_size=4, gradient_accumulation_steps=1)))

    ddp = tmp_path / "two-processes-batch-2"
    # Two CPU processes over gloo, forked (no re-import); the rendezvous is a file, so no port is needed.
    debug_launcher(_ddp_worker, args=(run_document(shapes, ddp, gradient_accumulation_steps=1),), num_processes=2)

    assert json.loads((ddp / "checkpoints/checkpoint-6/trainer_state.json").read_text())["num_processes"] == 2
    # Only the order of float additions differs (gradient all-reduce, batch splits): measured <= 2.1e-6.
    assert_same_run(combined, ddp, atol=2e-5)
    assert_same_run(combined, reference, atol=2e-5)  # batch 4 == batch 2 x 2 accumulation steps
