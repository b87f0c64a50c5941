"""Official fidelity: each release's own rules, each tested against an independent computation of that rule.

The rules come from the specs (``shared/specs``) and from running the authors' code on random weights in scratch
folders (the numbers are in the session notes); the tests here compute them independently, with no release code.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from idfusion.methods import flashface as ff
from idfusion.testing.tiny_clip_tokenizer import tiny_clip_vocab_size

# ---- FlashFace ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def official(tiny_release):
    from idfusion.pipelines import FlashFacePipeline

    pipe = FlashFacePipeline.from_pretrained(tiny_release("flashface"), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def open_release(tiny_release):
    from idfusion.pipelines import FlashFacePipeline

    pipe = FlashFacePipeline.from_pretrained(tiny_release("open-flashface"), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_official_flashface_samples_with_its_own_ddim_and_vae(official, open_release):
    from diffusers import DDIMScheduler

    from idfusion.methods.flashface_vae import FlashFaceVAEAttnProcessor
    from idfusion.schedulers import FlashFaceDDIMScheduler

    assert isinstance(official.scheduler, FlashFaceDDIMScheduler)
    assert official.scheduler.config.timestep_spacing == "trailing"
    official.scheduler.set_timesteps(4)
    assert official.scheduler.timesteps.tolist() == [999, 749, 499, 249]  # round(999 - 1000 i / 4)
    assert official.scheduler.sigmas[-1] == 0  # the release ends at sigma 0 and returns x0
    mid = [official.vae.encoder.mid_block.attentions[0], official.vae.decoder.mid_block.attentions[0]]
    assert all(isinstance(a.processor, FlashFaceVAEAttnProcessor) for a in mid)
    # the open release keeps diffusers' DDIM (t = 999, 979, ..., 19) and SD's VAE
    assert type(open_release.scheduler) is DDIMScheduler
    open_release.scheduler.set_timesteps(50)
    assert (
        open_release.scheduler.timesteps[:2].tolist() == [999, 979] and int(open_release.scheduler.timesteps[-1]) == 19
    )
    assert not any(isinstance(p, FlashFaceVAEAttnProcessor) for p in open_release.vae.attn_processors.values())


@pytest.mark.parametrize("box", [(0.3, 0.1, 0.6, 0.4), (0.13, 0.27, 0.61, 0.52), (0.5, 0.5, 0.501, 0.9)])
def test_face_position_mask_truncates_each_coordinate_then_subtracts(box):
    height = width = 768
    x1, y1, x2, y2 = (int(box[0] * width), int(box[1] * height), int(box[2] * width), int(box[3] * height))
    side = max(x2 - x1, y2 - y1)
    expected = np.zeros((height, width), np.float32)
    expected[y1 : y1 + side, x1 : x1 + side] = 1
    got = ff.face_position_mask(box, height, width)
    np.testing.assert_array_equal(got[0, 0].numpy(), expected[::8, ::8])


def test_official_prompts_default_box_and_negative_postfix(official, monkeypatch):
    from idfusion.pipelines import pipeline_flashface as pf

    seen = []
    original = type(official).encode_prompts

    def spy(self, prompts, clip_skip=None):
        seen.append(list(prompts))
        return original(self, prompts, clip_skip)

    monkeypatch.setattr(type(official), "encode_prompts", spy)
    latents = torch.zeros(0, 4, 28, 28)
    out = official(reference_latents=latents, prompt="a man", num_inference_steps=1, height=64, width=64)
    assert seen[-1] == [f"a man, {pf.OFFICIAL_POSITIVE_POSTFIX}", pf.OFFICIAL_NEGATIVE_POSTFIX]  # no leading ", "
    assert out.metadata[0]["face_box"] == [0.3, 0.1, 0.6, 0.4]  # the demo's default face position
    official(reference_latents=latents, negative_prompt="glasses", num_inference_steps=1, height=64, width=64)
    assert seen[-1][1] == f"glasses, {pf.OFFICIAL_NEGATIVE_POSTFIX}"


def test_open_release_skips_the_last_clip_layer_for_the_positive_prompt_only(open_release):
    ids = open_release.tokenizer(["a man", "blurry"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = open_release.text_encoder(ids, output_hidden_states=True)
        skipped = open_release.text_encoder.final_layer_norm(hidden.hidden_states[-2])
        positive = open_release.encode_prompts(["a man"])
        negative = open_release.encode_prompts(["blurry"], clip_skip=0)
    torch.testing.assert_close(positive, skipped[:1])
    torch.testing.assert_close(negative, hidden.last_hidden_state[1:])


def test_reference_crop_is_rounded_and_black_outside_the_photo():
    from idfusion.faces import Face
    from idfusion.pipelines.pipeline_flashface import reference_crop

    image = np.full((100, 100, 3), 200, np.uint8)
    landmarks = np.array([[40, 50], [60, 50], [50, 60], [42, 70], [58, 70]], np.float32)
    face = Face(bbox=np.array([-20.4, 10.6, 59.5, 90.4], np.float32), det_score=1.0, landmarks=landmarks, detector="t")
    crop = np.asarray(reference_crop(image, face, 80))
    # box round(-20.4), round(10.6), round(59.5), round(90.4) = -20, 11, 60, 90: 80 x 79 px, the first 20 columns
    # outside the photo (black); the long side is already 80, so it is pasted unscaled at the top-left
    assert crop.shape == (80, 80, 3)
    assert (crop[:, :20] == 0).all() and (crop[:79, 20:] == 200).all() and (crop[79] == 0).all()

    def black_columns(array, side):
        columns = (array == 0).all(axis=(0, 2))
        columns = columns if side == "left" else columns[::-1]
        return int(np.argmin(columns)) if not columns.all() else len(columns)

    clamped = np.asarray(reference_crop(image, face, 80, clamp=True))
    # clamped to 0 .. 60 x 10 .. 91, then scaled into the square: only the centred padding is black, both sides
    assert abs(black_columns(clamped, "left") - black_columns(clamped, "right")) <= 1
    assert black_columns(clamped, "left") < 20


# ---- FeedFace -----------------------------------------------------------------------------------------------------


def test_feedface_samples_with_the_release_dpm_solver_at_fractional_times(tiny_release, faces_dir):
    from idfusion.pipelines import FeedFacePipeline
    from idfusion.schedulers import FeedFaceDPMSolverScheduler

    pipe = FeedFacePipeline.from_pretrained(tiny_release("feedface"), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, FeedFaceDPMSolverScheduler)
    seen = []
    original = pipe.unet.forward

    def spy(*args, timestep_img=None, timestep_text=None, **kwargs):
        seen.append((float(timestep_img), int(timestep_text)))
        return original(*args, timestep_img=timestep_img, timestep_text=timestep_text, **kwargs)

    pipe.unet.forward = spy
    try:
        tokens, _ = pipe.encode_faces([faces_dir / "obama.jpg"])
        pipe(face_tokens=tokens, num_inference_steps=6, seed=0, output_type="latent")
    finally:
        del pipe.unet.forward
    # the release's time grid: n = 1000 - k * 999 / N for k = 0 .. N - 1, one model evaluation each, both branches
    expected = [1000 - k * 999 / 6 for k in range(6)]
    conditional = [t for t, text in seen if text == 0]
    assert len(conditional) == 6 and np.allclose(conditional, expected, atol=1e-3)
    assert [text for _, text in seen] == [0, 1000] * 6


# ---- FaceChain-FACT -----------------------------------------------------------------------------------------------


def test_fact_skips_the_documented_unused_prefixes_and_refuses_the_rest(caplog):
    from idfusion.methods import fact
    from idfusion.testing.components import tiny_unet
    from idfusion.testing.tiny_fact import tiny_fact_adapter_state_dict, tiny_fact_unet_config

    unet = tiny_unet(seed=1, **tiny_fact_unet_config()).eval()
    state = tiny_fact_adapter_state_dict(unet, seed=2)
    with_trainer_leftovers = {**state, "global_fac_prj.proj.weight": torch.zeros(4, 4)}
    with caplog.at_level("INFO", logger="idfusion.methods.fact"):
        adapter = fact.load_fact_adapter(with_trainer_leftovers, unet)
    assert "global_fac_prj" in caplog.text
    reference = fact.load_fact_adapter(state, unet)
    assert all(
        torch.equal(a, b) for a, b in zip(adapter.state_dict().values(), reference.state_dict().values(), strict=True)
    )
    with pytest.raises(ValueError, match="unknown_prj"):
        fact.load_fact_adapter({**state, "unknown_prj.weight": torch.zeros(1)}, unet)


# ---- AdaFace ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adaface(tiny_release):
    from idfusion.pipelines import AdaFacePipeline

    pipe = AdaFacePipeline.from_pretrained(tiny_release("adaface"), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_adaface_v2_runs_both_encoders_in_the_release_order(adaface, faces_dir, caplog):
    from idfusion.outputs import decode_array

    assert adaface.consistentid is not None  # the tiny release ships the ConsistentID branch's files
    photo = [faces_dir / "obama.jpg"]
    kwargs = {"prompt": "a photo of z", "num_inference_steps": 2, "seed": 0, "output_type": "np"}
    joint = adaface(faces=photo, **kwargs)
    meta = joint.metadata[0]
    assert meta["encoders"] == ["consistentID", "arc2face"] and meta["consistentid_scale"] == 6.0
    tokens = [f"z_0_{i}" for i in range(4)] + [f"z_1_{i}" for i in range(16)]
    assert meta["composed_prompt"] == "a photo of " + " ".join(tokens)
    assert "id_embeds" not in meta  # the photos are needed to replay it (the ConsistentID branch reads them)
    alone = adaface(faces=photo, arc2face_only=True, **kwargs)
    assert alone.metadata[0]["encoders"] == ["arc2face"]
    assert alone.metadata[0]["composed_prompt"] == "a photo of " + " ".join(tokens[4:])
    assert np.abs(np.asarray(joint.images) - np.asarray(alone.images)).max() > 1e-3
    with caplog.at_level(logging.WARNING, logger="idfusion.pipelines.pipeline_adaface"):
        embedded = adaface(
            id_embeds=decode_array(alone.metadata[0]["id_embeds"]), **kwargs
        )  # an embedding alone: Arc2Face's
    assert "the ConsistentID branch needs the photos themselves" in caplog.text
    assert embedded.metadata[0]["encoders"] == ["arc2face"]
    # the pipeline's own tokenizer and text encoder are never changed by the subject tokens
    size = tiny_clip_vocab_size()  # the tiny release's vocabulary
    assert len(adaface.tokenizer) == size and adaface.text_encoder.get_input_embeddings().num_embeddings == size
