"""Training configs, the JSON-lines reader, the sampler, checkpoint folders and the CLI: everything that must fail
(or work) before a model is built. No training runs here."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from idfusion.training.checkpoints import STATE_FILE, CheckpointError, Checkpoints
from idfusion.training.config import ConfigError, default_document, load_config
from idfusion.training.data import DataError, ImageCaptionDataset, ResumableSampler, read_jsonl
from idfusion.training.recipe import UnknownRecipeError, load_recipe
from idfusion.training.shapes import write_shapes_dataset


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return write_shapes_dataset(tmp_path_factory.mktemp("shapes"), count=4, size=32)


def write_config(folder: Path, document: dict) -> Path:
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


def base_document(shapes: Path) -> dict:
    return {"recipe": {"name": "text-to-image"}, "data": {"train": str(shapes)}, "output_dir": "out"}


# -- config ------------------------------------------------------------------------------------------------------


def test_config_resolves_paths_defaults_and_yaml_quirks(tmp_path, shapes, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_bytes(
        shapes.read_bytes().replace(b'"images/', f'"{shapes.parent}/images/'.encode())
    )
    text = "recipe:\n  name: text-to-image\ndata:\n  train: data/train.jsonl\ntrain:\n  learning_rate: 1e-4\n  mixed_precision: no\noutput_dir: runs/a\n"
    path = tmp_path / "conf" / "run.yaml"
    path.parent.mkdir()
    path.write_text(text.replace("data/train.jsonl", "../data/train.jsonl"), encoding="utf-8")
    monkeypatch.chdir(tmp_path)

    config = load_config(path, overrides=["train.max_steps=7", "recipe.caption_dropout=0.25"], output_dir="cli-out")

    assert config.data.train == [tmp_path / "data" / "train.jsonl"]  # relative to the YAML file
    assert config.output_dir == tmp_path / "cli-out"  # relative to the current directory
    assert config.train.learning_rate == 1e-4  # YAML 1.1 reads "1e-4" as a string
    assert config.train.mixed_precision == "no"  # ... and "no" as false
    assert config.train.max_steps == 7 and config.train.batch_size == 1
    assert config.recipe.caption_dropout == 0.25 and config.recipe.trainable == ["unet"]
    assert type(config.recipe).__name__ == "TextToImageConfig"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.learning_rate=-1"], "train.learning_rate: expected a positive number, got -1.0"),
        (["train.learnin_rate=1"], "train.learnin_rate: unknown field; did you mean 'learning_rate'?"),
        (["train.batch_size=four"], "train.batch_size: expected a whole number, got 'four' (str)"),
        (["train.use_ema=1"], "train.use_ema: expected true or false, got 1 (int)"),
        (
            ["train.mixed_precision=fp8"],
            "train.mixed_precision: expected one of 'no', 'fp16', 'bf16', got 'fp8' (str)",
        ),
        (["data.resolution=60"], "data.resolution: expected a positive multiple of 8, got 60"),
        (["data.train=missing.jsonl"], "data.train: file not found:"),
        (["checkpoint.keep_last=0"], "checkpoint.keep_last: expected a positive number, got 0"),
        (["recipe.caption_dropout=1.5"], "recipe.caption_dropout: expected a number in [0, 1], got 1.5"),
        (["recipe.trainable=[vae, unet]"], "recipe.trainable: train the VAE in a stage of its own"),
        (["recipe.trainable=[clip]"], "recipe.trainable[0]: expected one of 'vae', 'unet', 'text_encoder'"),
        (["recipe.unet={block_out_chanels: [8]}"], "recipe.unet: unknown unet config keys ['block_out_chanels']"),
        (["recipe.pretrained=."], "recipe.pretrained: not a diffusers pipeline folder"),
        (["nonsense=1"], "nonsense: unknown field"),
        (["train.max_steps"], "--set 'train.max_steps': expected KEY=VALUE"),
    ],
)
def test_bad_config_names_the_field(tmp_path, shapes, overrides, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as error:
        load_config(write_config(tmp_path, base_document(shapes)), overrides=overrides)
    assert message in str(error.value)


def test_config_file_errors(tmp_path, shapes):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: [1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+: not valid YAML"):
        load_config(bad)
    document = base_document(shapes)
    del document["output_dir"]
    with pytest.raises(ConfigError, match="output_dir: missing"):
        load_config(document=document)
    with pytest.raises(ConfigError, match="recipe.name: missing"):
        load_config(document={"data": {"train": str(shapes)}, "output_dir": "x"})
    with pytest.raises(ConfigError, match="the config says 'text-to-image' but 'other' was asked for"):
        load_config(document=base_document(shapes), recipe="other")
    with pytest.raises(UnknownRecipeError, match=r"unknown recipe 'nope'; known: (.*, )?text-to-image"):
        load_config(document={"data": {"train": str(shapes)}, "output_dir": "x"}, recipe="nope")


def test_recipe_registry_is_lazy_strings():
    from idfusion.training.recipe import RECIPES

    assert all(isinstance(target, str) and ":" in target for target in RECIPES.values())
    assert load_recipe("text-to-image").name == "text-to-image"
    assert load_recipe("idfusion.training.recipes.text_to_image:TextToImageRecipe").name == "text-to-image"
    with pytest.raises(UnknownRecipeError, match="is not a Recipe subclass"):
        load_recipe("idfusion.training.config:RunConfig")


def test_a_recipe_outside_the_registry_is_named_by_its_module(shapes):
    target = "idfusion.training.recipes.text_to_image:TextToImageRecipe"
    config = load_config(document={**base_document(shapes), "recipe": {"name": target}})
    assert config.recipe.name == target and load_recipe(config.recipe.name).name == "text-to-image"
    assert load_config(document=base_document(shapes)).recipe.name == "text-to-image"


def test_default_document_is_a_complete_template():
    document = default_document("text-to-image")
    assert document["recipe"]["name"] == "text-to-image"
    assert document["train"]["learning_rate"] == 1e-4 and document["data"]["train"] == []
    assert set(document) == {"output_dir", "recipe", "data", "seed", "train", "checkpoint", "log"}


# -- data --------------------------------------------------------------------------------------------------------


def write_jsonl(folder: Path, records: list) -> Path:
    path = folder / "set.jsonl"
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_reader_reads_own_flashface_and_feedface_records(tmp_path, shapes):
    image = str(shapes.parent / "images" / "0000.png")
    own = {
        "image": image,
        "width": 32,
        "height": 32,
        "caption": "a face",
        "identity": "id7",
        "faces": [{"bbox": [1, 2, 20, 30], "landmarks": [[5, 6]] * 5, "score": 0.9}],
        "references": [str(shapes.parent / "images" / "0001.png")],
        "mask": None,
        "attributes": {"age": 30},
    }
    flashface = {"path": "images/0001.png", "size": [32, 32], "caption": "x", "ref": ["images/0002.png"]}
    feedface = {
        "path": "images/0002.png",
        "caption": "y",
        "mask_path": "images/0003.png",
        "square_bbox": [0, 0, 16, 16],
    }
    path = write_jsonl(shapes.parent, [own, "", flashface, feedface])  # relative paths: from the jsonl's folder

    records = read_jsonl(path)

    assert [r.source.rsplit(":", 1)[1] for r in records] == ["1", "3", "4"]  # the blank line is skipped
    assert records[0].faces[0].landmarks == ((5.0, 6.0),) * 5 and records[0].identity == "id7"
    assert records[0].attributes == {"age": 30}
    assert records[1].image == shapes.parent / "images" / "0001.png"
    assert records[1].references == (shapes.parent / "images" / "0002.png",)
    assert (records[2].width, records[2].height) == (32, 32)  # read from the image header
    assert records[2].faces[0].bbox == (0.0, 0.0, 16.0, 16.0) and records[2].mask.name == "0003.png"


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"image": "images/0000.png", "width": 32, "height": 32}, ":2: caption: missing (required)"),
        ({"image": "images/0000.png", "width": "32", "height": 32, "caption": ""}, ":2: width: expected a whole"),
        ({"image": "images/none.png", "width": 32, "height": 32, "caption": ""}, ":2: image: file not found: "),
        (
            {"image": "images/0000.png", "width": 32, "height": 32, "caption": "", "captoin": ""},
            ":2: captoin: unknown",
        ),
        (
            {"image": "images/0000.png", "width": 32, "height": 32, "caption": "", "faces": [{"bbox": [5, 5, 1, 9]}]},
            ":2: faces[0].bbox: expected x2 > x1 and y2 > y1",
        ),
        (
            {
                "image": "images/0000.png",
                "width": 32,
                "height": 32,
                "caption": "",
                "faces": [{"bbox": [0, 0, 1, 1], "landmarks": [[0, 0]]}],
            },
            ":2: faces[0].landmarks: expected 5 [x, y] points",
        ),
        ({"path": "images/0000.png", "size": [32], "caption": ""}, ":2: size: expected [width, height]"),
        ('{"image": "images/0000.png", ', ":2: not valid JSON"),
        ("[1, 2]", ":2: expected a JSON object, got list"),
    ],
)
def test_reader_fails_fast_naming_file_line_and_field(shapes, record, message):
    good = {"image": "images/0000.png", "width": 32, "height": 32, "caption": "ok"}
    path = write_jsonl(shapes.parent, [good, record, good])
    with pytest.raises(DataError) as error:
        read_jsonl(path)
    assert str(error.value).startswith(str(path)) and message in str(error.value)


def test_dataset_augmentation_is_a_function_of_the_seed(shapes):
    records = read_jsonl(shapes)
    dataset = ImageCaptionDataset(records, 16, center_crop=False, random_flip=True)
    first = dataset[(0, 123)]
    assert first["pixel_values"].shape == (3, 16, 16) and first["caption"] == records[0].caption
    assert float(first["pixel_values"].min()) >= -1 and float(first["pixel_values"].max()) <= 1
    assert (dataset[(0, 123)]["pixel_values"] == first["pixel_values"]).all()
    flips = {bool((dataset[(0, s)]["pixel_values"] == first["pixel_values"]).all()) for s in range(8)}
    assert flips == {True, False}  # some seeds flip, some do not


def test_sampler_positions_epochs_and_resume():
    full = list(ResumableSampler(5, 12, seed=3))
    indices = [i for i, _ in full]
    assert sorted(indices[:5]) == sorted(indices[5:10]) == list(range(5))  # each epoch is a permutation
    assert indices[:5] != indices[5:10]  # ... a different one
    assert len({s for _, s in full}) == 12  # one seed per position
    resumed = ResumableSampler(5, 12, seed=3, start=7)
    assert len(resumed) == 5 and list(resumed) == full[7:]
    assert [i for i, _ in ResumableSampler(5, 5, seed=3, shuffle=False)] == [0, 1, 2, 3, 4]


# -- checkpoint folders ------------------------------------------------------------------------------------------


def make_checkpoint(root: Path, name: str, step: int | None) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"x")
    if step is not None:
        (folder / STATE_FILE).write_text(json.dumps({"step": step}), encoding="utf-8")
    return folder


def test_only_complete_checkpoints_are_resumed(tmp_path):
    root = tmp_path / "checkpoints"
    make_checkpoint(root, "checkpoint-2", 2)
    good = make_checkpoint(root, "checkpoint-4", 4)
    make_checkpoint(root, "checkpoint-6", None)  # a crash before trainer_state.json
    make_checkpoint(root, ".checkpoint-8.tmp", 8)  # a crash before the rename
    make_checkpoint(root, "checkpoint-9", 10)  # a state that does not match its name
    (root / "checkpoint-10").write_text("not a folder")
    checkpoints = Checkpoints(root, keep_last=2)

    assert [step for step, _ in checkpoints.complete()] == [2, 4]
    assert checkpoints.resolve("latest") == good
    assert checkpoints.resolve(good) == good
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        checkpoints.resolve(root / "checkpoint-6")
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        checkpoints.resolve(root / "checkpoint-99")

    checkpoints.remove_leftovers()
    assert not (root / ".checkpoint-8.tmp").exists() and good.exists()

    staging = checkpoints.staging(12)
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"y")
    final = checkpoints.commit(staging, 12, {"samples_seen": 48})
    assert final.name == "checkpoint-12" and not staging.exists()
    assert [step for step, _ in checkpoints.complete()] == [4, 12]  # keep_last=2 dropped checkpoint-2
    assert not [p for p in root.iterdir() if p.name.startswith(".")]
    assert Checkpoints(tmp_path / "none", 1).resolve("latest") is None


# -- CLI ---------------------------------------------------------------------------------------------------------


def cli(argv: list[str]) -> int:
    from idfusion.cli import train as train_cli

    parser = argparse.ArgumentParser(prog="idfusion")
    train_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", *argv])
    return args.run(args)


def test_cli_prints_the_resolved_config(tmp_path, shapes, capsys):
    path = write_config(tmp_path, base_document(shapes))
    assert cli(["--config", str(path), "--set", "train.max_steps=3", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["max_steps"] == 3 and printed["recipe"]["name"] == "text-to-image"
    assert cli(["--recipe", "text-to-image", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["output_dir"] is None


def test_cli_bad_input_is_an_idfusion_error(tmp_path, shapes):
    from idfusion.errors import IdfusionError

    path = write_config(tmp_path, base_document(shapes))
    with pytest.raises(IdfusionError, match="train.max_steps: expected a positive number, got 0"):
        cli(["--config", str(path), "--set", "train.max_steps=0"])
    with pytest.raises(IdfusionError, match="--config FILE is required"):
        cli([])


def test_cli_module_does_not_import_torch():
    code = (
        "import argparse, sys\n"
        "from idfusion.cli import train\n"
        "train.register(argparse.ArgumentParser().add_subparsers())\n"
        "import idfusion.training, idfusion.training.recipe\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


def test_cli_method_picks_the_registry_recipe(monkeypatch, capsys):
    from dataclasses import replace

    from idfusion import registry
    from idfusion.cli.main import main

    monkeypatch.setitem(registry._METHODS, "arc2face", replace(registry.get_method("arc2face"), recipe=None))
    assert main(["train", "--method", "arc2face", "--print-config"]) == 1
    assert "--method arc2face: Arc2Face has no training recipe yet" in capsys.readouterr().err
    spec = replace(registry.get_method("arc2face"), recipe="text-to-image")
    monkeypatch.setitem(registry._METHODS, "arc2face", spec)
    assert main(["train", "--method", "arc2face", "--print-config"]) == 0
    assert "name: text-to-image" in capsys.readouterr().out
    assert main(["train", "--method", "arc2face", "--recipe", "other", "--print-config"]) == 1
    assert "trains with recipe 'text-to-image', not --recipe other" in capsys.readouterr().err
