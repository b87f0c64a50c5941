"""The style-lora recipe (FaceChain's style-model training): a UNet LoRA trained on a folder of style images.

Captions and style words follow FaceChain's rules; both LoRA file formats load through idfusion's LoRA loader to
exactly the trained UNet; on the world base model the LoRA learns a striped look that the written style then puts
into generated images through the public style API; resume equals the uninterrupted run; bad configs fail at load
time naming the field.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from idfusion.training.config import ConfigError, load_config
from idfusion.training.core import train
from idfusion.training.logs import read_metrics
from idfusion.training.recipes.style_lora import (
    KOHYA_FILE,
    StyleLoraRecipe,
    kohya_state_dict,
    style_records,
    style_words,
    write_style_lora,
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

RECIPE = "style-lora"
TRIGGER = "zkstripes"
MAGENTA, GREEN = (230, 20, 200), (20, 200, 60)


def stripes(index: int, size: int = 64) -> np.ndarray:
    """A style image: diagonal magenta and green stripes, their period and phase varying with ``index``."""
    y, x = np.mgrid[0:size, 0:size]
    period = 8 + 2 * (index % 3)
    on = ((x + y + 3 * index) // (period // 2)) % 2 == 1
    return np.where(on[..., None], MAGENTA, GREEN).astype(np.uint8)


@pytest.fixture(scope="module")
def tiny_sd15(tmp_path_factory) -> Path:
    from idfusion.testing.make_tiny import make_tiny

    folder = tmp_path_factory.mktemp("sd15") / "sd15"
    make_tiny("sd15", folder)
    return folder


@pytest.fixture(scope="module")
def style_folder(tmp_path_factory) -> Path:
    """Six stripe images, three with sidecar captions, one in a sub-folder, and a hidden file that is left out."""
    folder = tmp_path_factory.mktemp("style")
    (folder / "more").mkdir()
    for index in range(6):
        where = folder / "more" if index == 5 else folder
        Image.fromarray(stripes(index)).save(where / f"s{index}.png")
    (folder / "s0.txt").write_text("diagonal stripes, magenta and green\n", encoding="utf-8")
    (folder / "s1.txt").write_text(f"{TRIGGER}, diagonal stripes", encoding="utf-8")
    (folder / "s3.txt").write_text("bold, diagonal stripes", encoding="utf-8")
    Image.fromarray(stripes(9)).save(folder / ".hidden.png")
    return folder


@pytest.fixture(scope="module")
def extra_records(tmp_path_factory) -> Path:
    """One more style image as a plain image + caption record (``data.train``)."""
    folder = tmp_path_factory.mktemp("records")
    Image.fromarray(stripes(7)).save(folder / "extra.png")
    record = {"image": "extra.png", "width": 64, "height": 64, "caption": "diagonal stripes"}
    (folder / "extra.jsonl").write_text(json.dumps(record) + "\n", encoding="utf-8")
    return folder / "extra.jsonl"


def document(base: Path, images: Path, extra: Path, output: Path, every: int = 100, **train_options: object) -> dict:
    options = {"max_steps": 30, "batch_size": 4, "learning_rate": 1e-3}
    options.update(train_options)
    return {
        "recipe": {
            "name": RECIPE,
            "pretrained": str(base),
            "images": str(images),
            "trigger": TRIGGER,
            "rank": 4,
            "style_name": "stripes",
            "validation_inference_steps": 2,
        },  # fmt: skip
        "data": {"train": str(extra), "resolution": 64},
        "train": options,
        "checkpoint": {"every_steps": every},
        "log": QUIET_LOGS,
        "seed": 3,
        "output_dir": str(output),
    }


def test_captions_get_the_trigger_and_the_style_words_are_the_common_tags(style_folder):
    records = style_records(style_folder, trigger=TRIGGER, caption="{trigger}, a pattern")
    names = [r.image.relative_to(style_folder.resolve()).as_posix() for r in records]
    assert names == ["more/s5.png", "s0.png", "s1.png", "s2.png", "s3.png", "s4.png"]  # sorted, hidden left out
    captions = {name: r.caption for name, r in zip(names, records, strict=True)}
    assert captions["s0.png"] == f"{TRIGGER}, diagonal stripes, magenta and green"  # the trigger goes in front
    assert captions["s1.png"] == f"{TRIGGER}, diagonal stripes"  # already there: kept as written
    assert captions["s2.png"] == f"{TRIGGER}, a pattern" and records[0].width == 64
    texts = ["a, solo, b, x", "a, b, solo", "a, photorealistic, b", "c, solo"]
    assert style_words(texts) == ["a", "b"]  # > half of the captions; FaceChain's generic tags left out
    assert style_words(texts, exclude=["a"]) == ["b"]


def test_both_lora_formats_load_to_exactly_the_trained_unet(tiny_sd15, tmp_path):
    """The kohya and diffusers files, through idfusion's loader, give the peft UNet's output (alpha != rank)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig

    from idfusion.loras import activate_loras

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=2.0, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))  # fmt: skip
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)  # as if trained: B starts at zero
    latents, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    hidden = torch.randn(1, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        trained = unet(latents, t, hidden).sample
        unet.disable_adapters()
        plain = unet(latents, t, hidden).sample

    kohya = kohya_state_dict({"down_blocks.0.attn1.to_q.lora_A.weight": torch.ones(4, 8)}, alpha=2.0)
    assert set(kohya) == {f"lora_unet_down_blocks_0_attn1_to_q.{k}" for k in ("lora_down.weight", "alpha")}
    for lora_format, file in (("kohya", KOHYA_FILE), ("diffusers", "pytorch_lora_weights.safetensors")):
        folder = tmp_path / lora_format
        folder.mkdir()
        write_style_lora(unet, folder / file, lora_format=lora_format, metadata={})
        pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15, safety_checker=None)
        activate_loras(pipe, [(str(folder), 1.0)])  # what --lora FOLDER does
        with torch.no_grad():
            loaded = pipe.unet(latents, t, hidden).sample
        assert float((loaded - trained).abs().max()) < 1e-5, lora_format
        assert float((loaded - plain).abs().max()) > 1e-3


def denoising_loss(pipe, images: list[np.ndarray], caption: str) -> float:
    """The v-prediction MSE of ``pipe``'s UNet on ``images`` at fixed noise and timesteps (no randomness left)."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, 3, 64, 64)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        hidden = pipe.encode_prompt(caption, "cpu", 1, False)[0].expand(len(images), -1, -1)
        losses = []
        for t in (100, 300, 500, 700, 900):
            noise = torch.randn(latents.shape, generator=generator)
            timesteps = torch.full((len(images),), t)
            noisy = scheduler.add_noise(latents, noise, timesteps)
            target = scheduler.get_velocity(latents, noise, timesteps)
            losses.append(float(torch.mean((pipe.unet(noisy, timesteps, hidden).sample - target) ** 2)))
    return float(np.mean(losses))


def diagonal_stripes(images: np.ndarray) -> float:
    """How striped along x + y = const images are: the mean step across the stripes (x+1, y+1) minus the mean step
    along them (x+1, y-1), in 0-255 units; about 0 for unstriped images."""
    pixels = images.astype(np.float32)  # (N, H, W, 3)
    across = np.abs(pixels[:, 1:, 1:] - pixels[:, :-1, :-1]).mean()
    along = np.abs(pixels[:, 1:, :-1] - pixels[:, :-1, 1:]).mean()
    return float(across - along)


def test_a_style_learned_on_the_world_base_is_applied_by_the_style_api(style_folder, extra_records, tmp_path):
    """On the world base model: the LoRA fits the style images, checkpoints hold the LoRA alone, and the written
    style brings the stripes into images through the public style API; unloading gives the base model back exactly."""
    from safetensors.torch import load_file

    from idfusion.loras import activate_loras
    from idfusion.styles import DEFAULT_SUBJECT, apply_style, load_style_lora, resolve_style, unload_style_lora
    from idfusion.world.base import base_model_dir, load_base_pipeline

    config = load_config(document=document(base_model_dir(), style_folder, extra_records, tmp_path / "run",
                                           every=15, learning_rate=1e-2, max_steps=30))  # fmt: skip
    result = train(config, recipe_class=StyleLoraRecipe)
    losses = [row["loss"] for row in read_metrics(tmp_path / "run/logs/metrics.csv")]
    assert len(losses) == 30 and np.mean(losses[-10:]) < np.mean(losses[:10]), losses
    checkpoint = load_file(tmp_path / "run/checkpoints/checkpoint-30/model.safetensors")
    assert checkpoint and all(".lora_" in key for key in checkpoint)  # not the frozen UNet

    style = resolve_style(result.model_dir / "style.toml")
    assert style.name == "stripes" and style.weight == 0.8 and style.lora_path().name == KOHYA_FILE
    assert style.prompt == "{subject}, " + TRIGGER + ", diagonal stripes"  # in 4 of the 7 captions
    styled = apply_style(style, None)
    assert styled.prompt == f"{DEFAULT_SUBJECT}, {TRIGGER}, diagonal stripes" and styled.lora[1] == 0.8

    pipe = load_base_pipeline()
    run = {"num_inference_steps": 8, "guidance_scale": 4.0, "height": 64, "width": 64, "output_type": "np"}

    def images(text: str) -> np.ndarray:
        generators = [torch.Generator().manual_seed(s) for s in (0, 1)]
        out = pipe([text] * 2, generator=generators, **run).images
        return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)

    targets = [stripes(i) for i in range(6)]
    plain, plain_loss = images(styled.prompt), denoising_loss(pipe, targets, styled.prompt)
    load_style_lora(pipe, style, weight=1.0)
    with_style, style_loss = images(styled.prompt), denoising_loss(pipe, targets, styled.prompt)
    unload_style_lora(pipe)
    assert np.array_equal(images(styled.prompt), plain)  # the base weights are back, bit for bit
    assert style_loss < 0.75 * plain_loss, (style_loss, plain_loss)
    assert diagonal_stripes(with_style) > diagonal_stripes(plain) + 2, (
        diagonal_stripes(with_style),
        diagonal_stripes(plain),
    )

    activate_loras(pipe, [(str(result.model_dir), 1.0)])  # --lora FOLDER finds the one .safetensors file
    assert not np.array_equal(images(styled.prompt), plain)


CrashingRecipe = crashing(StyleLoraRecipe)


def test_resume_after_a_crash_equals_the_uninterrupted_run(tiny_sd15, style_folder, extra_records, tmp_path):
    options = {"max_steps": 6, "batch_size": 2, "gradient_accumulation_steps": 2, "lr_scheduler": "cosine",
               "lr_warmup_steps": 2, "use_ema": True, "ema_decay": 0.9}  # fmt: skip
    reference = load_config(document=document(tiny_sd15, style_folder, extra_records, tmp_path / "reference",
                                              every=2, **options))  # fmt: skip
    train(reference, recipe_class=StyleLoraRecipe)
    reset_accelerate()

    crashed = load_config(document=document(tiny_sd15, style_folder, extra_records, tmp_path / "crashed", every=2,
                                            **options))  # fmt: skip
    with pytest.raises(SimulatedCrash):
        train(crashed, recipe_class=CrashingRecipe)
    reset_accelerate()
    train(crashed, resume="latest", recipe_class=StyleLoraRecipe)

    for name in ("checkpoints/checkpoint-6/model.safetensors", f"model/{KOHYA_FILE}"):  # raw and EMA weights
        assert max_difference(tmp_path / "reference" / name, tmp_path / "crashed" / name) <= 1e-6, name
    losses = [
        [row["loss"] for row in read_metrics(f / "logs/metrics.csv")]
        for f in (reference.output_dir, crashed.output_dir)
    ]
    assert len(losses[0]) == 6 and losses[0] == pytest.approx(losses[1], abs=1e-6)


def _ddp_worker(document: dict) -> None:
    # Runs in each forked process; as the training core's DDP test.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    reset_accelerate()  # the fork inherits the parent's single-process state
    train(load_config(document=document), recipe_class=StyleLoraRecipe)


def test_two_processes_then_one_resumed_match_one_process(tiny_sd15, style_folder, extra_records, tmp_path):
    """The LoRA-only checkpoints under DDP: 2 processes x batch 2 for 4 steps, resumed in one process x batch 4 to
    step 6, end where one process x batch 4 ends."""
    from accelerate import debug_launcher

    combined = load_config(document=document(tiny_sd15, style_folder, extra_records, tmp_path / "one", every=2,
                                             max_steps=6))  # fmt: skip
    train(combined, recipe_class=StyleLoraRecipe)
    reset_accelerate()

    ddp = document(tiny_sd15, style_folder, extra_records, tmp_path / "ddp", every=2, max_steps=4, batch_size=2)
    debug_launcher(_ddp_worker, args=(ddp,), num_processes=2)
    reset_accelerate()
    assert json.loads((tmp_path / "ddp/checkpoints/checkpoint-4/trainer_state.json").read_text())["num_processes"] == 2
    resumed = load_config(document=document(tiny_sd15, style_folder, extra_records, tmp_path / "ddp", every=2,
                                            max_steps=6))  # fmt: skip
    train(resumed, resume="latest", recipe_class=StyleLoraRecipe)

    # Only the order of float additions differs (gradient all-reduce, batch splits).
    for name in ("checkpoints/checkpoint-6/model.safetensors", f"model/{KOHYA_FILE}"):
        assert max_difference(tmp_path / "one" / name, tmp_path / "ddp" / name) <= 2e-5, name


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"images": "missing-folder"}, "recipe.images", "folder not found"),
        ({"images": "EMPTY"}, "recipe.images", "no images"),
        ({"rank": 0}, "recipe.rank", "positive"),
        ({"rank": 2.5}, "recipe.rank", "whole number"),
        ({"pretrained": None}, "recipe.pretrained", "missing"),
        ({"pretrained": "EMPTY"}, "recipe.pretrained", "not a diffusers SD1.5 folder"),
        ({"style_name": "My Style"}, "recipe.style_name", "slug"),
        ({"prompt": "{trigger} only"}, "recipe.prompt", "{subject}"),
        ({"weight": 3}, "recipe.weight", "[0, 2]"),
        ({"lora_format": "ckpt"}, "recipe.lora_format", "one of"),
        ({"target_modules": []}, "recipe.target_modules", "expected module names"),
    ],
)
def test_bad_config_fails_at_load_naming_the_field(tiny_sd15, style_folder, extra_records, tmp_path, change, field,
                                                   message):  # fmt: skip
    doc = document(tiny_sd15, style_folder, extra_records, tmp_path / "run")
    (tmp_path / "empty").mkdir()
    for key, value in change.items():
        doc["recipe"][key] = str(tmp_path / "empty") if value == "EMPTY" else value
        if value is None:
            del doc["recipe"][key]
    with pytest.raises(ConfigError) as caught:
        load_config(document=doc)
    assert str(caught.value).startswith(f"{field}: ") and message in str(caught.value), str(caught.value)


def test_a_folder_alone_is_enough(tiny_sd15, style_folder, tmp_path):
    doc = document(tiny_sd15, style_folder, Path("unused"), tmp_path / "run", max_steps=2)
    del doc["data"]["train"]
    result = train(load_config(document=doc))  # the "module:Class" name loads the recipe
    assert (result.model_dir / KOHYA_FILE).is_file()
    del doc["recipe"]["images"]
    with pytest.raises(ConfigError, match=r"^data\.train: missing"):
        load_config(document=doc)


def test_unknown_target_modules_fail_before_training_naming_the_field(tiny_sd15, style_folder, extra_records,
                                                                      tmp_path):  # fmt: skip
    doc = document(tiny_sd15, style_folder, extra_records, tmp_path / "run")
    doc["recipe"]["target_modules"] = ["to_qq"]
    with pytest.raises(ConfigError, match=r"^recipe\.target_modules: .*to_qq"):
        train(load_config(document=doc), recipe_class=StyleLoraRecipe)
