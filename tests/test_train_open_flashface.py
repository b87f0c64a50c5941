"""The open-flashface recipe on a tiny random SD1.5 base (v-prediction, zero terminal SNR, a 4x VAE) and a tiny
world training set: the open release's jsonl records (path, size, caption, ref) train as they are, the loss goes
down, the saved folder loads through the registry and generates, resume is exact, bad configs fail up front."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from idfusion.training.config import ConfigError, load_config
from idfusion.training.core import train
from idfusion.training.logs import read_metrics
from idfusion.training.recipes.open_flashface import OpenFlashFaceDataset, OpenFlashFaceRecipe, collate, face_crop
from test_train_flashface import tiny_base as flashface_tiny_base  # noqa: F401  # registered under these names
from test_train_flashface import world_set as flashface_world_set  # noqa: F401
from test_training_core import (  # the training core's autouse fixtures apply here too
    QUIET_LOGS,
    SimulatedCrash,
    crashing,
    fresh_accelerate_state,  # noqa: F401
    max_difference,
    one_thread,  # noqa: F401
    reset_accelerate,
)

# the recipe by its module:Class string, until it is registered in RECIPES
RECIPE = "open-flashface"


def document(base: Path, data: Path, output: Path, every: int = 100, **train_options: object) -> dict:
    options = {"max_steps": 30, "batch_size": 4, "learning_rate": 1e-3}
    options.update(train_options)
    return {
        "recipe": {
            "name": RECIPE,
            "pretrained": str(base),
            "reference_size": 32,
            "caption_dropout": 0.2,
            "reference_dropout": 0.2,
            "sampling": {"num_inference_steps": 2},
        },
        "data": {"train": str(data), "resolution": 64},
        "train": options,
        "checkpoint": {"every_steps": every},
        "log": QUIET_LOGS,
        "seed": 3,
        "output_dir": str(output),
    }


@pytest.fixture(scope="module")
def small_base(request) -> Path:
    """The flashface tests' tiny base: v-prediction, zero terminal SNR, a 4x VAE (the world base's kind)."""
    return request.getfixturevalue("flashface_tiny_base")


@pytest.fixture(scope="module")
def world_jsonl(request) -> Path:
    """The flashface tests' world set: 6 training identities x 3 renders, idfusion records."""
    return request.getfixturevalue("flashface_world_set")


@pytest.fixture(scope="module")
def open_set(world_jsonl, tmp_path_factory) -> Path:
    """The world set as the open release's jsonl: ``{path, size, caption, ref}``, ``ref`` the identity's other
    renders as aligned face crops (files of their own, as the release's README asks)."""
    from PIL import Image

    from idfusion.training import read_jsonl

    records = read_jsonl(world_jsonl)
    folder = tmp_path_factory.mktemp("open")
    crops = {}
    for n, record in enumerate(records):
        crops[record.image] = folder / f"face{n}.png"
        Image.fromarray(face_crop(np.asarray(Image.open(record.image).convert("RGB")), record, 48)).save(
            crops[record.image]
        )
    lines = [
        {
            "path": str(r.image),
            "size": [r.width, r.height],
            "caption": r.caption,
            "ref": [str(crops[p].relative_to(folder)) for p in r.references],
        }
        for r in records
    ]
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _tokenizer():
    from idfusion.clip_tokenizer import load_clip_tokenizer

    return load_clip_tokenizer()


def test_open_records_read_as_they_are_and_samples_draw_everything_from_their_seed(open_set, world_jsonl):
    from PIL import Image

    from idfusion.training import read_jsonl

    records = read_jsonl(open_set)
    assert records[0].references and records[0].references[0].parent == open_set.parent  # relative to the jsonl
    dataset = OpenFlashFaceDataset(records, 64, 32, caption_dropout=0.5, reference_dropout=0.5)
    items = [dataset[(k % len(dataset), 1000 + k)] for k in range(12)]
    again = [dataset[(k % len(dataset), 1000 + k)] for k in range(12)]
    for a, b in zip(items, again, strict=True):
        assert a["caption"] == b["caption"] and torch.equal(a["references"], b["references"])
    counts = [item["references"].shape[0] for item in items]
    assert 0 in counts and max(counts) <= 2  # dropped ones, and at most min(len(ref), 4) = 2 drawn
    assert {item["caption"] for item in items} >= {""}
    assert all(item["references"].shape[1:] == (3, 32, 32) for item in items)  # ready crops resized to S

    # idfusion records: a reference that is another record's image is cropped with that record's landmarks
    own = read_jsonl(world_jsonl)
    by_path = {r.image: r for r in own}
    item = OpenFlashFaceDataset(own, 64, 32, max_references=1, reference_flip=0.0)[(0, 0)]
    drawn = item["references"][0].permute(1, 2, 0).add(1).mul(127.5).round().numpy()  # (S, S, 3)
    crops = [face_crop(np.asarray(Image.open(p).convert("RGB")), by_path[p], 32) for p in own[0].references]
    assert any(np.abs(drawn - crop).max() <= 1 for crop in crops)

    batch = collate(items, tokenizer=_tokenizer())
    slots = max(counts)
    assert batch["reference_pixels"].shape[0] == sum(counts)
    assert batch["reference_index"].shape == (12 * slots,) and batch["reference_log_weights"].shape == (12, slots)
    for row, count in enumerate(counts):
        if count:  # each of a sample's references weighs 1 in all: attention over exactly its own set
            weights = batch["reference_log_weights"][row].exp()
            index = batch["reference_index"][row * slots : (row + 1) * slots]
            assert float(weights.sum()) == pytest.approx(count)
            assert batch["reference_owner"][index].eq(row).all()
    assert batch["has_references"].tolist() == [c > 0 for c in counts]


def test_recipe_learns_on_open_records_and_saves_a_folder_the_registry_loads(small_base, open_set, tmp_path):
    from idfusion import registry
    from idfusion.world import render

    config = load_config(document=document(small_base, open_set, tmp_path / "run"))
    assert config.recipe.name in (RECIPE, "open-flashface") and config.data.center_crop is False  # its defaults
    assert config.train.find_unused_parameters and config.train.adam_weight_decay == 1e-2
    result = train(config, recipe_class=OpenFlashFaceRecipe)
    losses = [row["loss"] for row in read_metrics(tmp_path / "run/logs/metrics.csv")]
    assert len(losses) == 30
    early, late = np.mean(losses[:5]), np.mean(losses[-5:])
    assert late < 0.8 * early, losses

    model = result.model_dir
    index = json.loads((model / "model_index.json").read_text())
    assert index["_class_name"] == "FlashFacePipeline" and index["release"] == "open-flashface"
    assert index["scheduler"][1] == "DPMSolverMultistepScheduler"  # zero terminal SNR: not the release's DDIM
    # the unconditional branch trained on "" (caption dropout), so that is the folder's negative prompt
    assert index["settings"] == {"height": 64, "reference_size": 32, "num_inference_steps": 2, "negative_prompt": ""}
    for name in ("unet", "refnet"):
        assert json.loads((model / name / "config.json").read_text())["in_channels"] == 4
    # what was trained: the UNet, and the ReferenceNet but its up_blocks.3 (the release's freeze)
    from safetensors.torch import load_file

    base_unet = load_file(small_base / "unet/diffusion_pytorch_model.safetensors")
    refnet = load_file(model / "refnet/diffusion_pytorch_model.safetensors")
    unet = load_file(model / "unet/diffusion_pytorch_model.safetensors")
    assert all(torch.equal(refnet[k], base_unet[k]) for k in refnet if k.startswith("up_blocks.3."))
    assert not torch.equal(
        refnet["down_blocks.0.resnets.0.conv1.weight"], base_unet["down_blocks.0.resnets.0.conv1.weight"]
    )
    assert not torch.equal(unet["up_blocks.3.resnets.0.conv1.weight"], base_unet["up_blocks.3.resnets.0.conv1.weight"])

    pipe = registry.load_pipeline("open-flashface", str(model))
    pipe.configure_face_analysis(detector="world", recognizer="world")
    pipe.set_progress_bar_config(disable=True)
    person = render(5, image_seed=1)
    out = pipe(faces=[person.image], prompt=person.caption, seed=0, output_type="np")
    assert out.images.shape == (1, 64, 64, 3) and float(out.images.std()) > 0
    assert out.metadata[0]["steps"] == 2  # the folder's sampling settings


CrashingRecipe = crashing(OpenFlashFaceRecipe)


def test_resume_after_a_crash_equals_the_uninterrupted_run(small_base, world_jsonl, tmp_path):
    options = {"max_steps": 6, "batch_size": 2, "gradient_accumulation_steps": 2, "lr_scheduler": "cosine",
               "lr_warmup_steps": 2}  # fmt: skip
    extra = {"face_loss_weight": 2.0, "reference_lr_scale": 2.0}  # the world plan's options resume exactly too

    def config(name: str):
        doc = document(small_base, world_jsonl, tmp_path / name, every=2, **options)
        doc["recipe"].update(extra)
        return load_config(document=doc)

    reference = config("reference")
    train(reference, recipe_class=OpenFlashFaceRecipe)
    reset_accelerate()

    crashed = config("crashed")
    with pytest.raises(SimulatedCrash):
        train(crashed, recipe_class=CrashingRecipe)
    reset_accelerate()
    train(crashed, resume="latest", recipe_class=OpenFlashFaceRecipe)

    for name in ("checkpoints/checkpoint-6/model.safetensors", "model/unet/diffusion_pytorch_model.safetensors",
                 "model/refnet/diffusion_pytorch_model.safetensors"):  # fmt: skip
        assert max_difference(tmp_path / "reference" / name, tmp_path / "crashed" / name) <= 1e-6, name
    losses = [
        [row["loss"] for row in read_metrics(f / "logs/metrics.csv")]
        for f in (reference.output_dir, crashed.output_dir)
    ]
    assert len(losses[0]) == 6 and losses[0] == pytest.approx(losses[1], abs=1e-6)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"pretrained": None}, r"recipe\.pretrained: missing"),
        ({"reference_dropout": 1.5}, r"recipe\.reference_dropout: expected a number in \[0, 1\]"),
        ({"max_references": 5}, r"recipe\.max_references: expected a number in \[1, 4\]"),
        ({"reference_source": "others-photos"}, r"recipe\.reference_source"),
        ({"reference_size": 30}, r"recipe\.reference_size: expected a positive multiple of 8"),
        ({"clip_skip": 2}, r"recipe\.clip_skip"),
        ({"reference_scale": 1.0}, r"recipe\.reference_scale"),  # unknown key (a typo of sampling's strength)
    ],
)
def test_bad_config_fails_before_any_model_is_built(small_base, world_jsonl, tmp_path, change, message):
    doc = document(small_base, world_jsonl, tmp_path / "run")
    doc["recipe"].update(change)
    if change.get("pretrained", "") is None:
        del doc["recipe"]["pretrained"]
    with pytest.raises(ConfigError, match=message):
        load_config(document=doc)


def test_bad_build_options_name_the_field(small_base, world_jsonl, tmp_path):
    for change, message in (
        ({"refnet_frozen": ["up_blocks.9"]}, r"recipe\.refnet_frozen: no ReferenceNet parameter under 'up_blocks\.9'"),
        ({"sampling": {"reference_strenght": 1.0}}, r"recipe\.sampling: unknown FlashFace settings"),
    ):
        doc = document(small_base, world_jsonl, tmp_path / "run", max_steps=1)
        doc["recipe"].update(change)
        with pytest.raises(ConfigError, match=message):
            train(load_config(document=doc), recipe_class=OpenFlashFaceRecipe)
        reset_accelerate()


def test_world_smoke_plan_trains_ships_and_loads(tmp_path):
    from idfusion import registry
    from idfusion.world.plans import plans_for
    from idfusion.world.train_method import train_method

    assert plans_for("open-flashface")["full"].recipe in (RECIPE, "open-flashface")
    out = tmp_path / "weights" / "methods" / "open-flashface"
    entry = train_method("open-flashface", out, tmp_path / "work", plan="smoke", progress=False, command="smoke",
                         measure=False)  # fmt: skip
    assert entry["steps"] == 2 and sorted(entry["shared_with_base"]) == ["text_encoder", "tokenizer", "vae"]
    assert (out / "unet").is_dir() and (out / "refnet").is_dir() and not (out / "vae").exists()
    pipe = registry.load_pipeline("open-flashface", str(out))
    assert pipe.release.name == "open-flashface" and pipe.native_size() == 64 and pipe.vae_scale_factor == 4
