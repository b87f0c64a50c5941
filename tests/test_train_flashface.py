"""The flashface recipe on a tiny random SD1.5 base (v-prediction, zero terminal SNR, a 4x VAE) and a tiny world
training set: the loss goes down, the saved folder loads through the registry and generates, resume is exact; the
pipeline's latent shapes and face mask follow the VAE's scale factor."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from idfusion.training.config import load_config
from idfusion.training.core import train
from idfusion.training.logs import read_metrics
from idfusion.training.recipes.flashface import FlashFaceDataset, FlashFaceRecipe, _collate
from test_training_core import (  # the training core's autouse fixtures apply here too
    QUIET_LOGS,
    SimulatedCrash,
    crashing,
    fresh_accelerate_state,  # noqa: F401
    max_difference,
    one_thread,  # noqa: F401
    reset_accelerate,
)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    """A random SD1.5-architecture folder at toy width: UNet 16-32-32-32, a 3-level (4x) VAE, the real CLIP tokenizer,
    DDIM with v-prediction and zero terminal SNR (the world base's schedule)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from idfusion.clip_tokenizer import load_clip_tokenizer
    from idfusion.sd15 import (
        build_text_encoder,
        build_unet,
        build_vae,
        save_pretrained_official,
        sd15_scheduler_config,
        tiny_text_encoder_config,
        tiny_unet_config,
        tiny_vae_config,
    )

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-base") / "base"
    vae = build_vae(
        tiny_vae_config(
            block_out_channels=[8, 16, 16],
            down_block_types=["DownEncoderBlock2D"] * 3,
            up_block_types=["UpDecoderBlock2D"] * 3,
            sample_size=64,
        )
    )
    unet = build_unet(tiny_unet_config(block_out_channels=[16, 32, 32, 32], sample_size=16))
    text_encoder = build_text_encoder(tiny_text_encoder_config())
    scheduler = DDIMScheduler.from_config(
        sd15_scheduler_config(),
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
    )
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=load_clip_tokenizer(), unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipeline.save_pretrained(folder, safe_serialization=True)
    save_pretrained_official(text_encoder, folder / "text_encoder")
    return folder


@pytest.fixture(scope="module")
def world_set(tmp_path_factory) -> Path:
    from idfusion.world import TRAIN_IDENTITIES, write_dataset

    return write_dataset(tmp_path_factory.mktemp("world"), TRAIN_IDENTITIES[:6], 3, progress=False)


def document(base: Path, data: Path, output: Path, every: int = 100, **train_options: object) -> dict:
    options = {"max_steps": 30, "batch_size": 4, "learning_rate": 1e-3}
    options.update(train_options)
    return {
        "recipe": {
            "name": "flashface",
            "pretrained": str(base),
            "reference_size": 32,
            "reference_attention_init": "split",
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


def test_samples_draw_everything_from_their_seed_and_pad_as_the_release(world_set):
    from idfusion.training import read_jsonl

    records = read_jsonl(world_set)
    dataset = FlashFaceDataset(records, 64, 32, caption_dropout=0.5, reference_dropout=0.5, mask_dropout=0.5)
    items = [dataset[(k % len(dataset), 1000 + k)] for k in range(12)]
    again = [dataset[(k % len(dataset), 1000 + k)] for k in range(12)]
    for a, b in zip(items, again, strict=True):
        assert a["caption"] == b["caption"] and torch.equal(a["references"], b["references"])
    counts = [item["references"].shape[0] for item in items]
    assert 0 in counts and max(counts) <= 2  # dropped ones, and at most the identity's 2 other renders
    for item in items:
        if item["references"].shape[0]:
            assert item["multiplicity"].sum() == 4 and item["references"].shape[1:] == (3, 32, 32)
    box = FlashFaceDataset(records, 64, 32)[(0, 0)]["face_box"]  # no dropout: the target's own face box
    x1, y1, x2, y2 = records[0].faces[0].bbox
    np.testing.assert_allclose(box.numpy(), np.array([x1, y1, x2, y2]) / 64, atol=1e-6)

    batch = _collate(items, tokenizer=_tokenizer())
    slots = max(counts)
    assert batch["reference_pixels"].shape[0] == sum(counts)  # each distinct reference once
    assert batch["reference_index"].shape == (12 * slots,) and batch["reference_log_weights"].shape == (12, slots)
    for row, count in enumerate(counts):
        if count:  # the slots' weights add up to each reference's multiplicity
            weights = batch["reference_log_weights"][row].exp()
            index = batch["reference_index"][row * slots : (row + 1) * slots]
            assert float(weights.sum()) == pytest.approx(4.0)
            assert batch["reference_owner"][index].eq(row).all()


def _tokenizer():
    from idfusion.clip_tokenizer import load_clip_tokenizer

    return load_clip_tokenizer()


def test_recipe_learns_and_saves_a_folder_the_registry_loads(tiny_base, world_set, tmp_path):
    from idfusion import registry
    from idfusion.world import render

    result = train(load_config(document=document(tiny_base, world_set, tmp_path / "run")))
    losses = [row["loss"] for row in read_metrics(tmp_path / "run/logs/metrics.csv")]
    assert len(losses) == 30
    early, late = np.mean(losses[:5]), np.mean(losses[-5:])
    assert late < 0.8 * early, losses

    model = result.model_dir
    index = json.loads((model / "model_index.json").read_text())
    assert index["_class_name"] == "FlashFacePipeline" and index["release"] == "flashface"
    assert index["scheduler"][1] == "DPMSolverMultistepScheduler"  # zero terminal SNR: not FlashFace's DDIM
    settings = index["settings"]
    assert settings["height"] == 64 and settings["reference_size"] == 32 and settings["positive_postfix"] == ""
    scheduler = json.loads((model / "scheduler/scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction" and scheduler["rescale_betas_zero_snr"]
    assert json.loads((model / "unet/config.json").read_text())["in_channels"] == 5
    assert json.loads((model / "refnet/config.json").read_text())["in_channels"] == 4

    pipe = registry.load_pipeline("flashface", str(model))
    pipe.configure_face_analysis(detector="world", recognizer="world")
    pipe.set_progress_bar_config(disable=True)
    person = render(5, image_seed=1)
    out = pipe(faces=[person.image], prompt=person.caption, seed=0, output_type="np")
    assert out.images.shape == (1, 64, 64, 3) and float(out.images.std()) > 0
    assert out.metadata[0]["steps"] == 2  # the folder's sampling settings


CrashingRecipe = crashing(FlashFaceRecipe)


def test_resume_after_a_crash_equals_the_uninterrupted_run(tiny_base, world_set, tmp_path):
    options = {"max_steps": 6, "batch_size": 2, "gradient_accumulation_steps": 2, "lr_scheduler": "cosine",
               "lr_warmup_steps": 2}  # fmt: skip
    reference = load_config(document=document(tiny_base, world_set, tmp_path / "reference", every=2, **options))
    train(reference)
    reset_accelerate()

    crashed = load_config(document=document(tiny_base, world_set, tmp_path / "crashed", every=2, **options))
    with pytest.raises(SimulatedCrash):
        train(crashed, recipe_class=CrashingRecipe)
    reset_accelerate()
    train(crashed, resume="latest")

    for name in ("checkpoints/checkpoint-6/model.safetensors", "model/unet/diffusion_pytorch_model.safetensors",
                 "model/refnet/diffusion_pytorch_model.safetensors",
                 "model/reference_attention/diffusion_pytorch_model.safetensors"):  # fmt: skip
        assert max_difference(tmp_path / "reference" / name, tmp_path / "crashed" / name) <= 1e-6, name
    losses = [
        [row["loss"] for row in read_metrics(f / "logs/metrics.csv")]
        for f in (reference.output_dir, crashed.output_dir)
    ]
    assert len(losses[0]) == 6 and losses[0] == pytest.approx(losses[1], abs=1e-6)


def test_pipeline_latents_and_face_mask_follow_the_vae_scale_factor(tiny_base):
    """The world VAE downsamples 4x: latents and the face-position channel are H/4, not SD1.5's H/8."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from idfusion.methods import flashface as ff
    from idfusion.pipelines.pipeline_flashface import FlashFacePipeline

    base = UNet2DConditionModel.from_pretrained(tiny_base, subfolder="unet")
    unet, refnet, reference = ff.build_flashface_models(dict(base.config), ff.OFFICIAL)
    vae = AutoencoderKL.from_pretrained(tiny_base, subfolder="vae")
    pipe = FlashFacePipeline(
        vae, CLIPTextModel.from_pretrained(tiny_base, subfolder="text_encoder"),
        CLIPTokenizer.from_pretrained(tiny_base, subfolder="tokenizer"), unet, refnet,
        DPMSolverMultistepScheduler.from_pretrained(tiny_base, subfolder="scheduler"), reference,
        settings={"height": 64, "reference_size": 32, "release_vae_attention": False, "positive_postfix": ""},
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == 4
    masks = []

    def keep_mask(module, args):
        masks.append(args[0][:, 4:])  # the main UNet's 5th input channel

    hook = pipe.unet.conv_in.register_forward_pre_hook(keep_mask)
    try:
        latents = pipe(reference_latents=torch.randn(1, 4, 8, 8), prompt="a person", seed=0, num_inference_steps=2,
                       face_box=[0.25, 0.25, 0.75, 0.75], output_type="latent").images  # fmt: skip
    finally:
        hook.remove()
    assert latents.shape == (1, 4, 16, 16)
    assert masks[0].shape[-2:] == (16, 16) and float(masks[0][0].sum()) == 8 * 8  # a 32 px square, 4x subsampled
    image = pipe(reference_latents=torch.randn(1, 4, 8, 8), seed=0, num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 64, 64, 3)
    # the folder's settings reach the call defaults: the world's 64 px, no official postfix
    assert pipe.native_size() == 64 and pipe.settings["positive_postfix"] == ""
    assert pipe.settings["negative_postfix"] != ""  # not set: the release's
    with pytest.raises(ValueError, match="unknown FlashFace settings"):
        FlashFacePipeline(vae, pipe.text_encoder, pipe.tokenizer, unet, refnet, pipe.scheduler, reference,
                          settings={"heigth": 64})  # fmt: skip
