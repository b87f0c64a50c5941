"""The feedface (U-ViT) and feedface-sd15 recipes on the tiny kits and a tiny world training set: samples are drawn
from their seeds; the loss goes down and the saved folder loads through the registry and generates; the preservation
term is exactly zero while the adapter is still zero; resume equals the uninterrupted run; bad configs fail naming
the field."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from idfusion.training.config import ConfigError, load_config
from idfusion.training.core import train
from idfusion.training.logs import read_metrics
from idfusion.training.recipes.feedface import (
    FeedFaceDataset,
    FeedFaceRecipe,
    FeedFaceSD15Config,
    FeedFaceSD15Recipe,
    _feedface_loss,
    _latent_mask,
)
from test_training_core import (  # the training core's autouse fixtures apply here too
    QUIET_LOGS,
    SimulatedCrash,
    crashing,
    fresh_accelerate_state,  # noqa: F401
    max_difference,
    one_thread,  # noqa: F401
    reset_accelerate,
)

SD15 = "feedface-sd15"
UVIT = "feedface"
# a 2-layer tower at width 32: 50 tokens of the 224 px crop, as CLIP ViT-B/32
TINY_TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}


@pytest.fixture(scope="module")
def kits(tmp_path_factory) -> dict[str, Path]:
    from idfusion.testing.make_tiny import make_tiny

    root = tmp_path_factory.mktemp("kits")
    make_tiny("feedface-sd15", root / "sd15")
    make_tiny("feedface", root / "uvit")
    return {"feedface-sd15": root / "sd15" / "stable-diffusion-v1-5", "feedface": root / "uvit"}


@pytest.fixture(scope="module")
def world_set(tmp_path_factory) -> Path:
    from idfusion.world import TRAIN_IDENTITIES, write_dataset

    return write_dataset(tmp_path_factory.mktemp("world"), TRAIN_IDENTITIES[:4], 3, progress=False)


def document(kits: dict[str, Path], data: Path, output: Path, method: str = "feedface-sd15", every: int = 100,
             recipe: dict | None = None, **train_options: object) -> dict:  # fmt: skip
    options = {"max_steps": 30, "batch_size": 4, "learning_rate": 3e-3, "lr_warmup_steps": 0}
    options.update(train_options)
    section = {"name": SD15, "face_encoder_config": TINY_TOWER} if method == "feedface-sd15" else {"name": UVIT}
    section.update({"pretrained": str(kits[method]), "validation_inference_steps": 2, **(recipe or {})})
    return {
        "recipe": section,
        "data": {"train": str(data), "resolution": 64},
        "train": options,
        "checkpoint": {"every_steps": every},
        "log": QUIET_LOGS,
        "seed": 3,
        "output_dir": str(output),
    }


def run(doc: dict, recipe_class=None):
    config = load_config(document=doc)
    default = FeedFaceSD15Recipe if isinstance(config.recipe, FeedFaceSD15Config) else FeedFaceRecipe
    return train(config, recipe_class=recipe_class or default)


def test_samples_draw_everything_from_their_seed(world_set):
    from idfusion.training import read_jsonl

    records = read_jsonl(world_set)
    dataset = FeedFaceDataset(records, 64, reference_source="others", reference_flip=0.5, reference_dropout=0.5,
                              mask_probability=0.5)  # fmt: skip
    items = [dataset[(k % len(dataset), 500 + k)] for k in range(12)]
    again = [dataset[(k % len(dataset), 500 + k)] for k in range(12)]
    for a, b in zip(items, again, strict=True):
        assert torch.equal(a["reference"], b["reference"]) and a["use_mask"] == b["use_mask"]
        assert a["reference"].shape == (3, 224, 224) and a["face_mask"].shape == (1, 64, 64)
    dropped = [not bool(item["reference"].any()) for item in items]
    assert any(dropped) and not all(dropped)  # the release's dropout: a zero (mid-grey) reference
    assert {item["use_mask"] for item in items} == {True, False}
    assert 0 < float(items[0]["face_mask"].mean()) < 0.5  # the record's face mask, a part of the image

    # "target": the release's crop of the target itself, the pipeline's own face crop
    from idfusion.methods.feedface import face_crop, preprocess_faces

    own = FeedFaceDataset(records, 64)[(0, 0)]
    image = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(records[0].image).convert("RGB"))
    expected = preprocess_faces(face_crop(image, records[0].faces[0].bbox))[0]
    assert torch.equal(own["reference"], expected)


def test_loss_terms_and_mask_follow_the_release():
    masks = torch.zeros(2, 1, 8, 8)
    masks[:, :, 2:5, 2:3] = 0.3  # any face pixel in a 2x2 cell marks the cell: two cells per sample
    cells = _latent_mask(masks, (4, 4))
    assert cells.sum() == 2 * 2 and cells[0, 0, 1, 1] == 1
    prediction, target = torch.ones(2, 4, 4, 4), torch.zeros(2, 4, 4, 4)
    base = torch.ones(2, 4, 4, 4)  # the adapter-off prediction equals the adapter-on one: no preservation term
    terms = _feedface_loss(prediction, target, base, cells, torch.tensor([True, False]), 1.0)
    # masked sample: mean((y - p)^2 M) = 2/16; plain sample: 1
    assert float(terms["loss"]) == pytest.approx((2 / 16 + 1) / 2) and float(terms["preserve"]) == 0.0
    terms = _feedface_loss(prediction, target, torch.zeros_like(base), cells, torch.tensor([True, True]), 0.5)
    assert float(terms["loss"]) == pytest.approx(2 / 16 + 0.5 * 14 / 16)


def test_sd15_recipe_learns_and_saves_a_folder_the_registry_loads(kits, world_set, tmp_path):
    from idfusion import registry
    from idfusion.world import render

    doc = document(kits, world_set, tmp_path / "run", recipe={"face_encoder_teacher": "world", "teacher_steps": 3,
                                                               "teacher_batch_size": 4})  # fmt: skip
    result = run(doc)
    rows = read_metrics(tmp_path / "run/logs/metrics.csv")
    losses = [row["loss"] for row in rows]
    assert len(losses) == 30 and np.mean(losses[-8:]) < 0.8 * np.mean(losses[:8]), losses
    # the first step runs the zero-initialised adapter: the adapter-on and adapter-off predictions are equal
    assert rows[0]["preserve"] == 0.0 and max(row["preserve"] for row in rows) > 0
    assert (tmp_path / "run/face_encoder/config.json").is_file()  # the fitted tower, reused on resume

    pipe = registry.load_pipeline("feedface-sd15", str(result.model_dir))
    pipe.configure_face_analysis(detector="world", recognizer="world")
    pipe.set_progress_bar_config(disable=True)
    person = render(5, image_seed=1)
    out = pipe(faces=[person.image], prompt=person.caption, seed=0, num_inference_steps=2, output_type="np")
    off = pipe(faces=[person.image], prompt=person.caption, seed=0, num_inference_steps=2, output_type="np",
               feed_scale=0.0)  # fmt: skip
    assert out.images.shape == off.images.shape and float(np.abs(out.images - off.images).max()) > 0  # it learned
    tower = pipe.feed.preprocess_module.clip_model.state_dict()
    fitted = __import__("safetensors.torch", fromlist=["load_file"]).load_file(
        tmp_path / "run/face_encoder/model.safetensors"
    )
    key = next(k for k in fitted if k.endswith("patch_embedding.weight"))
    assert torch.equal(next(v for k, v in tower.items() if k.endswith("patch_embedding.weight")), fitted[key])


def test_uvit_recipe_learns_and_saves_a_folder_the_registry_loads(kits, world_set, tmp_path):
    from idfusion import registry
    from idfusion.world import render

    result = run(document(kits, world_set, tmp_path / "run", method="feedface", max_steps=20))
    losses = [row["loss"] for row in read_metrics(tmp_path / "run/logs/metrics.csv")]
    assert len(losses) == 20 and np.mean(losses[-6:]) < 0.8 * np.mean(losses[:6]), losses

    pipe = registry.load_pipeline("feedface", str(result.model_dir))
    pipe.configure_face_analysis(detector="world", recognizer="world")
    pipe.set_progress_bar_config(disable=True)
    person = render(5, image_seed=1)
    out = pipe(faces=[person.image], prompt=person.caption, seed=0, num_inference_steps=2, height=64, width=64,
               output_type="np")  # fmt: skip
    assert out.images.shape == (1, 64, 64, 3) and float(out.images.std()) > 0
    # the frozen CLIP tower is the kit's; only projection and feed blocks moved
    from idfusion.methods.feedface import load_feed_adapter

    release = load_feed_adapter(kits["feedface"] / "models/feed-4800000.pt")
    trained = pipe.feed.state_dict()
    for key, value in release.state_dict().items():
        if key.startswith("preprocess_module.clip_model."):
            assert torch.equal(trained[key], value), key


CrashingRecipe = crashing(FeedFaceSD15Recipe)


def test_resume_after_a_crash_equals_the_uninterrupted_run(kits, world_set, tmp_path):
    options = {"max_steps": 6, "batch_size": 2, "gradient_accumulation_steps": 2, "lr_scheduler": "cosine",
               "lr_warmup_steps": 2, "use_ema": True, "ema_decay": 0.9}  # fmt: skip
    recipe = {"reference_source": "others", "reference_dropout": 0.3, "mask_probability": 0.5}
    reference = document(kits, world_set, tmp_path / "reference", every=2, recipe=recipe, **options)
    run(reference)
    reset_accelerate()

    crashed = document(kits, world_set, tmp_path / "crashed", every=2, recipe=recipe, **options)
    with pytest.raises(SimulatedCrash):
        run(crashed, recipe_class=CrashingRecipe)
    reset_accelerate()
    train(load_config(document=crashed), resume="latest", recipe_class=FeedFaceSD15Recipe)

    for name in ("checkpoints/checkpoint-6/model.safetensors", "model/feed/diffusion_pytorch_model.safetensors"):
        assert max_difference(tmp_path / "reference" / name, tmp_path / "crashed" / name) <= 1e-6, name
    losses = [
        [row["loss"] for row in read_metrics(tmp_path / f / "logs/metrics.csv")] for f in ("reference", "crashed")
    ]
    assert len(losses[0]) == 6 and losses[0] == pytest.approx(losses[1], abs=1e-6)


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        ({"pretrained": None}, "recipe.pretrained: missing"),
        ({"pretrained": "/nonexistent/base"}, "recipe.pretrained: folder not found"),
        ({"reference_dropout": 1.5}, "recipe.reference_dropout"),
        ({"reference_source": "mirror"}, "recipe.reference_source"),
        ({"face_encoder_teacher": "world-judge"}, "recipe.face_encoder_teacher: world-judge scores identity"),
        ({"unknown_option": 1}, "recipe.unknown_option"),
    ],
)
def test_bad_config_fails_naming_the_field(kits, world_set, tmp_path, recipe, message):
    doc = document(kits, world_set, tmp_path / "run")
    doc["recipe"].update(recipe)
    if recipe.get("pretrained", "") is None:
        del doc["recipe"]["pretrained"]
    with pytest.raises(ConfigError, match=message):
        load_config(document=doc)


def test_sd15_base_folder_is_checked(kits, world_set, tmp_path):
    doc = document(kits, world_set, tmp_path / "run")
    doc["recipe"]["pretrained"] = str(tmp_path)  # a folder, but no diffusers pipeline in it
    with pytest.raises(ConfigError, match="recipe.pretrained: not a diffusers pipeline folder"):
        load_config(document=doc)
