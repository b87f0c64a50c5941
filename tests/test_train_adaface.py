"""The adaface recipes on the tiny kits (``make-tiny --method adaface`` as the student, ``--method arc2face`` as the
teacher) and a tiny world training set: stage 1 learns and saves a folder that loads and generates, stage 2 trains
from it, resume is exact, bad configs fail before any model is built; the per-sample draws and the attention
widening behave as the release's."""

from __future__ import annotations

import json
import shutil
from dataclasses import MISSING, fields
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from idfusion.training.config import ConfigError, load_config
from idfusion.training.core import train
from idfusion.training.logs import read_metrics
from idfusion.training.recipes.adaface import (
    AdaFaceConfig,
    AdaFaceRecipe,
    plan_sample,
    projector_from_text_encoder,
    widen_attention,
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

RECIPE = "adaface"


@pytest.fixture(scope="module")
def world_set(tmp_path_factory) -> Path:
    from idfusion.world import TRAIN_IDENTITIES, write_dataset

    return write_dataset(tmp_path_factory.mktemp("world"), TRAIN_IDENTITIES[:4], 2, progress=False)


@pytest.fixture(scope="module")
def same_unet_teacher(tiny_release, tmp_path_factory) -> Path:
    """The tiny Arc2Face kit with the student's own UNet as the teacher's: then all of the distillation loss is the
    prompt's (two random UNets differ whatever the prompt), so learning shows within a few steps."""
    folder = tmp_path_factory.mktemp("teacher") / "arc2face"
    shutil.copytree(tiny_release("arc2face"), folder)
    shutil.rmtree(folder / "arc2face")
    shutil.copytree(tiny_release("adaface") / "models/stable-diffusion-v1-5/unet", folder / "arc2face")
    return folder


def document(student: Path, teacher: Path | None, data: Path, output: Path, every: int = 100, **changes) -> dict:
    recipe = {"name": RECIPE, "stage": 1, "pretrained": str(student), "validation_inference_steps": 2,
              "validation_samples": 1}  # fmt: skip
    if teacher is not None:
        recipe["teacher"] = str(teacher)
    recipe.update(changes.pop("recipe", {}))
    options = {"max_steps": 12, "batch_size": 4, "learning_rate": 3e-3}
    options.update(changes)
    return {
        "recipe": recipe,
        "data": {"train": str(data), "resolution": 64},
        "train": options,
        "checkpoint": {"every_steps": every},
        "log": QUIET_LOGS,
        "seed": 3,
        "output_dir": str(output),
    }


def run(doc: dict, **kwargs):
    return train(load_config(document=doc), recipe_class=AdaFaceRecipe, **kwargs)


@pytest.fixture(scope="module")
def stage1(tiny_release, same_unet_teacher, world_set, tmp_path_factory) -> Path:
    """12 steps of single-step distillation on the kit's own identities (no reconstruction, no random ids)."""
    reset_accelerate()
    output = tmp_path_factory.mktemp("stage1")
    recipe = {"recon_prob": 0.0, "random_id_prob": 0.0, "max_denoising_steps": 1}
    run(document(tiny_release("adaface"), same_unet_teacher, world_set, output, recipe=recipe))
    reset_accelerate()
    return output


def test_stage1_learns_and_saves_a_folder_that_loads_and_generates(stage1):
    from idfusion import registry
    from idfusion.methods.adaface import load_adaface_checkpoint

    losses = [row["loss"] for row in read_metrics(stage1 / "logs/metrics.csv")]
    assert len(losses) == 12
    early, late = np.mean(losses[:3]), np.mean(losses[-3:])
    assert late < 0.6 * early, losses  # measured: 0.0102 -> 0.0022

    model = stage1 / "model"
    index = json.loads((model / "model_index.json").read_text())
    assert index["_class_name"] == "AdaFacePipeline" and index["id_encoder"] == ["transformers", "CLIPTextModel"]
    checkpoint = load_adaface_checkpoint(model / "models/adaface/adaface-stage1.safetensors")
    assert checkpoint.version == "v2" and checkpoint.subject_tokens[0] == "z_1_0"  # the kit's Arc2Face branch
    assert checkpoint.projector.config["vocab_size"] == 49408  # the whole table is back for ID-CFG's EOS row
    assert checkpoint.projector.attention_multipliers == [1, 2, 4]

    pipe = registry.load_pipeline("adaface", str(model))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(id_embeds=torch.randn(1, 512), prompt="a photo of z wearing a hat", seed=0, num_inference_steps=2,
               height=64, width=64, output_type="np")  # fmt: skip
    assert out.images.shape == (1, 64, 64, 3) and float(out.images.std()) > 0
    assert out.metadata[0]["composed_prompt"].endswith("z_1_15")  # the trained tokens, appended (v2)


def test_stage2_composition_distillation_trains_from_a_stage1_folder(stage1, same_unet_teacher, world_set, tmp_path):
    from idfusion import registry

    recipe = {"stage": 2, "distill_prob": 0.25, "max_denoising_steps": 2, "prompt_delta_weight": 1.0}
    doc = document(stage1 / "model", same_unet_teacher, world_set, tmp_path, max_steps=4, **{"recipe": recipe})
    run(doc)
    rows = read_metrics(tmp_path / "logs/metrics.csv")
    assert len(rows) == 4 and all(np.isfinite(row["loss"]) for row in rows)
    assert sum(row["comp"] for row in rows) > 0 and sum(row["distill"] for row in rows) > 0
    model = tmp_path / "model"
    assert (model / "models/adaface/adaface-stage2.safetensors").is_file()
    pipe = registry.load_pipeline("adaface", str(model))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(id_embeds=torch.randn(1, 512), seed=0, num_inference_steps=1, height=64, width=64, output_type="np")
    assert out.images.shape == (1, 64, 64, 3)


CrashingRecipe = crashing(AdaFaceRecipe, call=5, where="in step 3")


def test_resume_after_a_crash_equals_the_uninterrupted_run(tiny_release, world_set, tmp_path):
    # every sample kind at once: reconstruction, random ids, 2-step chains, teacher guidance, id noise, MKV widening
    recipe = {
        "recon_prob": 0.3,
        "teacher_cfg_prob": 0.5,
        "max_denoising_steps": 2,
        "widen_attention": 2,
        "widen_layers": [2],
    }
    options = {"max_steps": 4, "batch_size": 1, "gradient_accumulation_steps": 2, "lr_scheduler": "cosine",
               "lr_warmup_steps": 2, "recipe": recipe}  # fmt: skip
    student, teacher = tiny_release("adaface"), tiny_release("arc2face")
    reference = document(student, teacher, world_set, tmp_path / "reference", every=2, **options)
    run(reference)
    reset_accelerate()

    crashed = document(student, teacher, world_set, tmp_path / "crashed", every=2, **options)
    with pytest.raises(SimulatedCrash):
        train(load_config(document=crashed), recipe_class=CrashingRecipe)
    reset_accelerate()
    run(crashed, resume="latest")

    for name in ("checkpoints/checkpoint-4/model.safetensors", "model/models/adaface/adaface-stage1.safetensors"):
        assert max_difference(tmp_path / "reference" / name, tmp_path / "crashed" / name) <= 1e-6, name
    metrics = [read_metrics(tmp_path / f / "logs/metrics.csv") for f in ("reference", "crashed")]
    losses = [[row["loss"] for row in rows] for rows in metrics]
    assert len(losses[0]) == 4 and losses[0] == pytest.approx(losses[1], abs=1e-6)
    assert sum(row["recon"] for row in metrics[0]) > 0 and sum(row["distill"] for row in metrics[0]) > 0
    shutil.rmtree(tmp_path)  # two 120 MB folders (the projector's full token table)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"teacher": None}, r"recipe\.teacher: missing: stage 1 distils from an Arc2Face folder"),
        ({"stage": 3}, r"recipe\.stage: expected a number in \[1, 2\], got 3"),
        ({"prompt": "a photo of a person"}, r"recipe\.prompt: must hold the subject placeholder z"),
        ({"pretrained": "WORLD"}, r"recipe\.pretrained: not an AdaFace folder"),
        ({"id_noise_std": [0.1, 0.01]}, r"recipe\.id_noise_std: expected \[a, b\]"),
        ({"pretrained": None}, r"recipe\.pretrained: missing: an AdaFace folder"),
    ],
)
def test_bad_config_fails_fast_naming_the_field(tiny_release, world_set, tmp_path, change, message):
    doc = document(tiny_release("adaface"), tiny_release("arc2face"), world_set, tmp_path)
    for key, value in change.items():
        doc["recipe"][key] = str(world_set.parent) if value == "WORLD" else value
        if value is None:
            del doc["recipe"][key]
    with pytest.raises(ConfigError, match=message):
        load_config(document=doc)


def _options(**changes) -> SimpleNamespace:
    """The recipe section's defaults, unchecked (plan_sample reads only the draw settings)."""
    values = {f.name: f.default_factory() if f.default is MISSING else f.default for f in fields(AdaFaceConfig)}
    return SimpleNamespace(**{**values, **changes})


def test_sample_plans_are_drawn_from_the_seed_alone_with_the_release_proportions():
    options = _options(max_denoising_steps=5)
    plans = [plan_sample(seed, options, 1000, 8) for seed in range(3000)]
    assert plans[:20] == [plan_sample(seed, options, 1000, 8) for seed in range(20)]
    modes = [p.mode for p in plans]
    assert abs(modes.count("recon") / 3000 - 0.12) < 0.03
    distill = [p for p in plans if p.mode == "distill"]
    assert abs(np.mean([p.random_id for p in distill]) - 0.4) < 0.04
    lengths = [len(p.timesteps) for p in distill]
    assert set(lengths) == {1, 3, 5} and abs(lengths.count(5) / len(lengths) - 0.3) < 0.04  # 7 is capped to 5
    for plan in distill:
        assert all(a > b >= 0 for a, b in zip(plan.timesteps, plan.timesteps[1:], strict=False))
        assert plan.timesteps[0] == 999 if plan.random_id else 699 <= plan.timesteps[0] <= 899
        assert plan.cfg_scale == 1.0 and (plan.id_noise_std == 0 or 0.02 <= plan.id_noise_std <= 0.06)
    stage2 = _options(stage=2)
    comp = [plan_sample(seed, stage2, 1000, 8) for seed in range(1000)]
    assert abs(np.mean([p.mode == "comp" for p in comp]) - 0.8) < 0.04
    assert abs(np.mean([p.frozen_single for p in comp if p.mode == "comp"]) - 0.9) < 0.04


def test_widening_the_attention_keeps_the_projector_exact_without_noise():
    from idfusion.methods.adaface import AdaFaceProjector, adaface_projector_config

    torch.manual_seed(0)
    config = adaface_projector_config(vocab_size=1000, hidden_size=64, intermediate_size=32, num_layers=3, num_heads=2,
                                      attention_multipliers=[1, 2, 1], eos_token_id=999)  # fmt: skip
    projector = AdaFaceProjector.from_config(config).eval()
    ids, x = torch.randint(0, 999, (1, 40)), torch.randn(2, 16, 64)
    exact = widen_attention(projector, 2, layers=[1, 2], noise=0.0).eval()
    noisy = widen_attention(projector, 2, noise=0.1, seed=1).eval()
    assert exact.attention_multipliers == [1, 4, 2] and noisy.attention_multipliers == [2, 4, 2]
    with torch.no_grad():
        torch.testing.assert_close(exact(x, ids), projector(x, ids), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(noisy(x, ids), projector(x, ids), atol=1e-4)
    key = "prompt2token_proj.text_model.encoder.layers.1.self_attn.k_proj.weight"
    first = noisy.state_dict()[key][: 2 * 64]
    assert torch.equal(first, projector.state_dict()[key])  # the first copy is the old weights


def test_a_projector_starts_from_a_text_encoder_as_the_release_from_clip_l():
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=1000, hidden_size=64, intermediate_size=32, num_hidden_layers=3,
                            num_attention_heads=2, eos_token_id=2)  # fmt: skip
    encoder = CLIPTextModel(config).eval()
    projector = projector_from_text_encoder(encoder, 16, eos_token_id=2)
    state = projector.state_dict()
    table = state["prompt2token_proj.text_model.embeddings.token_embedding.weight"]
    assert table.shape == (49408, 64)  # padded to CLIP's rows: ID-CFG reads EOS at 49407
    torch.testing.assert_close(table[:1000], encoder.get_input_embeddings().weight)
    torch.testing.assert_close(table[49407], encoder.get_input_embeddings().weight[2])
    assert state["hidden_state_layer_weights"].flatten().tolist() == [1.0, 2.0, 4.0]
    fc1 = "prompt2token_proj.text_model.encoder.layers.2.mlp.fc1.weight"
    torch.testing.assert_close(state[fc1], encoder.state_dict()["encoder.layers.2.mlp.fc1.weight"])
    torch.testing.assert_close(projector.pad_embeddings()[5], table[49407] + state[
        "prompt2token_proj.text_model.embeddings.position_embedding.weight"][5])  # fmt: skip


def test_the_stage_recipes_fix_their_stage(tiny_release, world_set, tmp_path):
    doc = document(tiny_release("adaface"), None, world_set, tmp_path, recipe={"distill_prob": 0.0})
    del doc["recipe"]["stage"]
    doc["recipe"]["name"] = "adaface-composition"
    config = load_config(document=doc)  # stage 2 without distillation samples needs no teacher
    assert config.recipe.stage == 2 and config.recipe_name == "adaface-composition"
    doc["recipe"]["stage"] = 1
    with pytest.raises(ConfigError, match=r"recipe\.stage: expected a number in \[2, 2\], got 1"):
        load_config(document=doc)
    doc["recipe"].update(name="adaface-distill", stage=1)
    with pytest.raises(ConfigError, match=r"recipe\.teacher: missing"):
        load_config(document=doc)
