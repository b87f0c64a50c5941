"""The arc2face recipe on the tiny Arc2Face kit and a tiny world training set: identity embeddings are cached and the
dropout is drawn per sample; the loss goes down; the saved folder loads through the registry and the CLI and
generates; resume after a crash equals the uninterrupted run; bad config fields fail before training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from idfusion.training.config import ConfigError, load_config
from idfusion.training.core import train
from idfusion.training.logs import read_metrics
from idfusion.training.recipes.arc2face import Arc2FaceDataset, Arc2FaceRecipe, cached_identity_embeddings
from test_training_core import (  # the training core's autouse fixtures apply here too
    QUIET_LOGS,
    SimulatedCrash,
    crashing,
    fresh_accelerate_state,  # noqa: F401
    max_difference,
    one_thread,  # noqa: F401
    reset_accelerate,
)

RECIPE = "arc2face"


@pytest.fixture(scope="module")
def kit(tiny_release) -> Path:
    return tiny_release("arc2face")


@pytest.fixture(scope="module")
def world_set(tmp_path_factory) -> Path:
    from idfusion.world import TRAIN_IDENTITIES, write_dataset

    return write_dataset(tmp_path_factory.mktemp("world"), TRAIN_IDENTITIES[:6], 3, progress=False)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One embedding cache for the module's runs: the world recognizer runs once per face."""
    return tmp_path_factory.mktemp("embeddings")


def document(kit: Path, data: Path, output: Path, cache: Path, every: int = 100, **train_options: object) -> dict:
    options = {"max_steps": 30, "batch_size": 4, "learning_rate": 1e-3}
    options.update(train_options)
    return {
        "recipe": {
            "name": RECIPE,
            "pretrained": str(kit),
            "recognizer": "world",
            "embedding_cache": str(cache),
            "id_dropout": 0.2,
            "validation_inference_steps": 2,
        },
        "data": {"train": str(data), "resolution": 64},
        "train": options,
        "checkpoint": {"every_steps": every},
        "log": QUIET_LOGS,
        "seed": 3,
        "output_dir": str(output),
    }


def test_embeddings_are_cached_and_dropout_is_drawn_per_sample(world_set, tmp_path):
    from idfusion.training import read_jsonl
    from idfusion.world.backends import WorldRecognizer

    records = read_jsonl(world_set)
    recognizer = WorldRecognizer("world")
    calls = []

    def embed(record):
        calls.append(record.image)
        face = record.faces[0]
        image = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(record.image).convert("RGB"))
        return recognizer.embed(image, np.asarray(face.landmarks, np.float32)[None])[0]

    first = cached_identity_embeddings(records[:10], embed, recognizer.name, tmp_path)
    assert len(calls) == 10 and first.shape == (10, 512)
    again = cached_identity_embeddings(records, embed, recognizer.name, tmp_path)  # 8 new, 10 from the cache
    assert len(calls) == 18 and np.array_equal(again[:10], first)
    assert len(list(tmp_path.iterdir())) == 1  # one file per recognizer
    # the same person's renders are closer than other people's (the world recognizer is what conditions)
    unit = again / np.linalg.norm(again, axis=1, keepdims=True)
    identities = np.array([r.identity for r in records])
    same = identities[:, None] == identities[None]
    similarity = unit @ unit.T
    assert similarity[same & ~np.eye(len(records), dtype=bool)].mean() > similarity[~same].mean() + 0.3

    dataset = Arc2FaceDataset(records, again, 64, id_dropout=0.5)
    items = [dataset[(k % len(dataset), 100 + k)] for k in range(16)]
    repeat = [dataset[(k % len(dataset), 100 + k)] for k in range(16)]
    assert [i["drop_id"] for i in items] == [i["drop_id"] for i in repeat]
    assert 0 < sum(i["drop_id"] for i in items) < 16
    assert items[0]["pixel_values"].shape == (3, 64, 64) and torch.equal(items[0]["id_embeds"], dataset.embeddings[0])


def test_recipe_learns_and_saves_a_folder_the_registry_and_cli_load(kit, world_set, cache, tmp_path, capsys):
    from idfusion import registry
    from idfusion.cli.main import main
    from idfusion.world import render

    doc = document(kit, world_set, tmp_path / "run", cache, learning_rate=1e-2)  # a random tiny UNet: a fast rate
    result = train(load_config(document=doc), recipe_class=Arc2FaceRecipe)
    losses = [row["loss"] for row in read_metrics(tmp_path / "run/logs/metrics.csv")]
    assert len(losses) == 30
    early, late = np.mean(losses[:5]), np.mean(losses[-5:])
    assert late < 0.8 * early, losses

    model = result.model_dir
    index = json.loads((model / "model_index.json").read_text())
    assert index["_class_name"] == "Arc2FacePipeline" and index["scheduler"][1] == "DPMSolverMultistepScheduler"
    assert json.loads((model / "text_encoder/config.json").read_text())["hidden_size"] == 512
    trained = max_difference(kit / "arc2face/diffusion_pytorch_model.safetensors",
                             model / "unet/diffusion_pytorch_model.safetensors")  # fmt: skip
    assert trained > 0  # the UNet moved; the text encoder too (checked against the kit's below)
    encoder = torch.load(kit / "encoder/pytorch_model.bin", weights_only=True)
    from safetensors.torch import load_file

    saved = load_file(model / "text_encoder/model.safetensors")
    name = "text_model.encoder.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(encoder[name], saved[name])

    pipe = registry.load_pipeline("arc2face", str(model))
    pipe.configure_face_analysis(detector="world", recognizer="world")
    pipe.set_progress_bar_config(disable=True)
    person = render(5, image_seed=1)
    out = pipe(faces=[person.image], seed=0, num_inference_steps=2, output_type="np")
    assert out.images.shape == (1, 64, 64, 3) and float(out.images.std()) > 0

    # idfusion generate --method arc2face --model OUTPUT/model (a photo, the kit's ONNX face models)
    capsys.readouterr()
    photo = tmp_path / "person.png"
    __import__("PIL.Image", fromlist=["Image"]).fromarray(render(7, image_seed=2, size=128).image).save(photo)
    code = main(["generate", "--method", "arc2face", "--model", str(model), "--face", str(photo), "--steps", "2",
                 "--face-models", str(kit / "antelopev2"), "--out", str(tmp_path / "out"), "--no-contact-sheet"])  # fmt: skip
    assert code == 0, capsys.readouterr()


CrashingRecipe = crashing(Arc2FaceRecipe)


def test_resume_after_a_crash_equals_the_uninterrupted_run(kit, world_set, cache, tmp_path):
    options = {"max_steps": 6, "batch_size": 2, "gradient_accumulation_steps": 2, "lr_scheduler": "cosine",
               "lr_warmup_steps": 2, "use_ema": True, "ema_decay": 0.9}  # fmt: skip
    reference = load_config(document=document(kit, world_set, tmp_path / "reference", cache, every=2, **options))
    train(reference, recipe_class=Arc2FaceRecipe)
    reset_accelerate()

    crashed = load_config(document=document(kit, world_set, tmp_path / "crashed", cache, every=2, **options))
    with pytest.raises(SimulatedCrash):
        train(crashed, recipe_class=CrashingRecipe)
    reset_accelerate()
    train(crashed, resume="latest", recipe_class=Arc2FaceRecipe)

    for name in ("checkpoints/checkpoint-6/model.safetensors", "model/unet/diffusion_pytorch_model.safetensors",
                 "model/text_encoder/model.safetensors"):  # fmt: skip
        assert max_difference(tmp_path / "reference" / name, tmp_path / "crashed" / name) <= 1e-6, name
    losses = [
        [row["loss"] for row in read_metrics(f / "logs/metrics.csv")]
        for f in (reference.output_dir, crashed.output_dir)
    ]
    assert len(losses[0]) == 6 and losses[0] == pytest.approx(losses[1], abs=1e-6)


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        ({"id_dropout": 1.5}, r"recipe\.id_dropout: expected a number in \[0, 1\]"),
        ({"recognizer": "world-judge"}, r"recipe\.recognizer"),
        ({"pretrained": "missing-folder"}, r"recipe\.pretrained: folder not found"),
        ({"pretrained": None}, r"recipe\.pretrained: missing"),
        ({"pretrained": "."}, r"recipe\.pretrained: .*neither a diffusers pipeline folder"),
        ({"base_model": "."}, r"recipe\.base_model: not an SD1.5 diffusers folder"),
        ({"template_vocabulary": True}, r"recipe\.template_vocabulary: needs id_encoder"),
        ({"face_loss_weight": -1}, r"recipe\.face_loss_weight: expected a number >= 0"),
    ],
)
def test_a_bad_config_field_fails_before_training_naming_it(kit, world_set, cache, tmp_path, recipe, message):
    doc = document(kit, world_set, tmp_path / "run", cache)
    doc["recipe"].update(recipe)
    with pytest.raises(ConfigError, match=message):
        load_config(document=doc)
    assert not (tmp_path / "run").exists()


def test_a_release_folder_without_its_base_names_base_model(kit, world_set, cache, tmp_path):
    release = tmp_path / "release"
    for part in ("arc2face", "encoder"):
        shutil.copytree(kit / part, release / part)
    with pytest.raises(ConfigError, match=r"recipe\.base_model: missing"):
        load_config(document=document(release, world_set, tmp_path / "run", cache))
    doc = document(release, world_set, tmp_path / "run", cache)
    doc["recipe"]["base_model"] = str(kit / "stable-diffusion-v1-5")
    assert load_config(document=doc).recipe.base_model == kit / "stable-diffusion-v1-5"


@pytest.fixture(scope="module")
def narrow_base(tmp_path_factory) -> Path:
    """The tiny SD1.5 kit: its text encoder is 32 wide, as the world base's."""
    from idfusion.testing import make_tiny

    base = tmp_path_factory.mktemp("sd15") / "sd15"
    make_tiny("sd15", base, seed=0)
    return base


def test_a_narrow_text_encoder_is_refused_unless_a_new_id_encoder_is_asked_for(
    narrow_base, world_set, cache, tmp_path
):
    from idfusion import registry
    from idfusion.prompt_encoders import ARC2FACE_PROMPT

    with pytest.raises(ConfigError, match="must be at least that wide"):
        train(load_config(document=document(narrow_base, world_set, tmp_path / "refused", cache, max_steps=1)),
              recipe_class=Arc2FaceRecipe)  # fmt: skip
    reset_accelerate()
    doc = document(narrow_base, world_set, tmp_path / "run", cache, max_steps=2, batch_size=2)
    doc["recipe"].update(face_loss_weight=4.0, encoder_lr_scale=4.0, template_vocabulary=True,
                         id_encoder={"hidden_size": 512, "intermediate_size": 32, "num_hidden_layers": 1})  # fmt: skip
    result = train(load_config(document=doc), recipe_class=Arc2FaceRecipe)
    assert "mse" in read_metrics(tmp_path / "run/logs/metrics.csv")[0]  # the face-weighted loss logs the plain one
    pipe = registry.load_pipeline("arc2face", str(result.model_dir))
    assert pipe.text_encoder.config.hidden_size == 512 and pipe.unet.config.cross_attention_dim == 512
    base_tokens = load_tokenizer(narrow_base).tokenize(ARC2FACE_PROMPT)
    assert pipe.tokenizer.tokenize(ARC2FACE_PROMPT) == base_tokens and len(pipe.tokenizer) < 600
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)
    out = pipe(id_embeds=torch.randn(1, 512), seed=0, num_inference_steps=2, output_type="np")
    assert out.images.shape == (1, 64, 64, 3)

    doc["recipe"]["id_encoder"] = {"hidden_size": 512, "hiden_layers": 1}
    reset_accelerate()
    with pytest.raises(ConfigError, match=r"recipe\.id_encoder: unknown CLIPTextConfig fields \['hiden_layers'\]"):
        train(load_config(document={**doc, "output_dir": str(tmp_path / "typo")}), recipe_class=Arc2FaceRecipe)


def load_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(folder / "tokenizer")


def test_world_plan_smoke_run_trains_a_512_wide_id_encoder_and_ships_it(tmp_path):
    """The world plan's smoke run through train_method: the new ID encoder, the cut tokenizer and the rebuilt UNet
    ship (they differ from the base); only the VAE is the base's."""
    from idfusion import registry
    from idfusion.world.train_method import train_method

    out = tmp_path / "weights" / "methods" / "arc2face"
    entry = train_method("arc2face", out, tmp_path / "work", plan="smoke", progress=False, command="smoke",
                         measure=False)  # fmt: skip
    assert entry["steps"] == 2 and entry["shared_with_base"] == ["vae"]
    assert not (out / "vae").exists() and (out / "text_encoder").is_dir() and (out / "tokenizer").is_dir()
    assert json.loads((out / "unet/config.json").read_text())["cross_attention_dim"] == 512
    pipe = registry.load_pipeline("arc2face", str(tmp_path / "work/run/model"))  # the full folder
    assert pipe.text_encoder.config.hidden_size == 512 and len(pipe.tokenizer) < 600
