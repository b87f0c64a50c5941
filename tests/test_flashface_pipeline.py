"""FlashFace pipeline behaviour on tiny random models: references, guidance, blending, position, speed paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from idfusion.errors import IdfusionError
from idfusion.faces import FaceAnalyzer
from idfusion.methods import flashface as ff


def _pipeline(release):
    from diffusers import DDIMScheduler

    from idfusion.pipelines.pipeline_flashface import FlashFacePipeline
    from idfusion.testing.components import tiny_text_encoder, tiny_unet_config, tiny_vae
    from idfusion.testing.tiny_clip_tokenizer import tiny_clip_tokenizer

    torch.manual_seed(0)
    unet, refnet, reference = ff.build_flashface_models(tiny_unet_config(layers_per_block=2), release)
    with torch.no_grad():  # random (non-zero) mask channel and reference attention, as in a trained model
        if release.in_channels == 5:
            unet.conv_in.weight[:, 4].normal_(std=0.5)
        if reference is not None:
            for p in reference.parameters():
                p.add_(torch.randn_like(p) * 0.2)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, **release.scheduler_config)  # fmt: skip
    pipe = FlashFacePipeline(tiny_vae(), tiny_text_encoder(), tiny_clip_tokenizer(), unet.eval(), refnet.eval(),
                             scheduler, reference, release=release.name)  # fmt: skip
    pipe.set_face_analyzer(FaceAnalyzer("hog", None, crops=()))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def official():
    return _pipeline(ff.OFFICIAL)


@pytest.fixture(scope="module")
def open_release():
    return _pipeline(ff.OPEN)


def _run(pipe, **kwargs):
    kwargs.setdefault("seed", 0)
    kwargs.setdefault("num_inference_steps", 4)  # trailing: t = 999 (phase A), 749, 499, 249 (phase B)
    kwargs.setdefault("height", 64)
    kwargs.setdefault("width", 64)
    return np.stack(pipe(output_type="np", **kwargs).images)


def test_lambda_zero_and_no_references_give_the_base_model(official, open_release, faces_dir):
    face = [faces_dir / "obama.jpg"]
    for pipe in (official, open_release):
        none = _run(pipe, reference_latents=torch.zeros(0, 4, 28, 28))
        zero = _run(pipe, faces=face, reference_strength=0.0, strength_before_guidance=0.0)
        np.testing.assert_allclose(zero, none, atol=1e-5)
        assert np.abs(_run(pipe, faces=face) - none).max() > 1e-3  # references do matter


def test_one_reference_repeated_four_times_equals_padding(official, faces_dir):
    once = _run(official, faces=[faces_dir / "obama.jpg"])
    four = _run(official, faces=[faces_dir / "obama.jpg"] * 4)
    np.testing.assert_allclose(once, four, atol=1e-4)  # only the VAE's batch-of-4 vs batch-of-1 float noise


def test_precomputed_latents_equal_faces_and_same_seed_same_pixels(official, faces_dir):
    crops = official.reference_images([faces_dir / "obama.jpg", faces_dir / "obama_rgba.png"])
    latents = official.encode_references(crops, torch.Generator().manual_seed(0))
    assert latents.shape == (2, 4, 28, 28)  # 224 px references -> 28x28 latents
    by_faces = _run(official, faces=[faces_dir / "obama.jpg", faces_dir / "obama_rgba.png"], seed=5)
    by_latents = _run(official, reference_latents=latents, seed=5)
    np.testing.assert_array_equal(by_faces, by_latents)
    np.testing.assert_array_equal(by_faces, _run(official, reference_latents=latents, seed=5))


def test_batch_equals_single_calls(official):
    latents = torch.randn(3, 4, 28, 28, generator=torch.Generator().manual_seed(1))
    batch = _run(official, reference_latents=latents, seed=7, num_images_per_prompt=2)
    singles = np.concatenate([_run(official, reference_latents=latents, seed=s) for s in (7, 8)])
    np.testing.assert_allclose(batch, singles, atol=1e-5)


def test_blend_weights_change_the_output_continuously(official):
    latents = torch.randn(2, 4, 28, 28, generator=torch.Generator().manual_seed(2))  # two "people"
    equal = _run(official, reference_latents=latents)
    np.testing.assert_array_equal(equal, _run(official, reference_latents=latents, face_weights=[0.6, 0.6]))
    distances = [np.abs(_run(official, reference_latents=latents, face_weights=[1.0, w]) - equal).max()
                 for w in (0.999, 0.9, 0.5, 0.1)]  # fmt: skip
    assert distances[0] < 1e-2  # a tiny weight change, a tiny image change
    assert distances == sorted(distances) and distances[-1] > 1e-2  # and it grows with the change


def test_face_box_steers_and_zero_box_means_none(official):
    latents = torch.randn(1, 4, 28, 28, generator=torch.Generator().manual_seed(3))
    free = _run(official, reference_latents=latents, face_box=[0, 0, 0, 0])  # all zeros: anywhere
    boxed = _run(official, reference_latents=latents, face_box=[0.3, 0.1, 0.6, 0.4])
    assert np.abs(boxed - free).max() > 1e-3
    # no box given: the official demo's default box [0.3, 0.1, 0.6, 0.4]
    np.testing.assert_array_equal(_run(official, reference_latents=latents), boxed)
    mask = ff.face_position_mask([0.25, 0.5, 0.5, 0.625], 64, 64)
    assert mask.shape == (1, 1, 8, 8)
    # square of side max(16, 8) = 16 px at (16, 32): latent rows 4..5, columns 2..3
    expected = torch.zeros(8, 8)
    expected[4:6, 2:4] = 1
    torch.testing.assert_close(mask[0, 0], expected)


def test_speed_paths_equal_the_official_computation(official):
    """Skipping terms with zero weight, projecting references once and sharing the down path of branches that
    only differ in reference strength change nothing: the official step-by-step loop gives the same images."""
    from idfusion.testing.reference_flashface import flashface_official_loop, use_official_processors

    latents = torch.randn(4, 4, 28, 28, generator=torch.Generator().manual_seed(4))
    ours = official(reference_latents=latents, prompt="a photo of a person", seed=11, num_inference_steps=4,
                    height=64, width=64, output_type="np").images  # fmt: skip
    try:
        use_official_processors(official)
        reference = flashface_official_loop(official, latents, 4, 11, size=64)
    finally:
        ff.attach_reference_processors(official.unet, official.refnet, official.bank, official.reference_attention)
    np.testing.assert_allclose(np.stack(ours), reference, atol=1e-4)


def test_shared_down_path_equals_a_plain_forward(official):
    unet = official.unet
    sample = torch.randn(2, 5, 8, 8, generator=torch.Generator().manual_seed(5))
    context = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(6))
    fork = torch.tensor([0, 0, 1])
    official.bank.strength = torch.tensor([0.0, 0.0, 0.0])
    with torch.no_grad():
        shared = ff.forward_with_shared_down_path(unet, sample, torch.tensor(500), context, fork)
        plain = unet(sample[fork], torch.tensor(500), encoder_hidden_states=context[fork]).sample
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-5)


def test_reference_errors(official, faces_dir):
    with pytest.raises(IdfusionError, match="reference 1 shows 6 faces; FlashFace needs exactly one face"):
        official(faces=[faces_dir / "group_six_faces.jpg"], num_inference_steps=1)
    with pytest.raises(IdfusionError, match="give 1 to 4 references, got 5"):
        official(faces=[faces_dir / "obama.jpg"] * 5, num_inference_steps=1)
    with pytest.raises(ValueError, match=r"face_box must be 4 numbers x1, y1, x2, y2 in \[0, 1\]"):
        official(faces=[faces_dir / "obama.jpg"], face_box=[0.2, 0.2, 1.4, 0.5], num_inference_steps=1)
    with pytest.raises(IdfusionError, match="need 2 finite weights"):
        official(reference_latents=torch.zeros(2, 4, 28, 28), face_weights=[1.0], num_inference_steps=1)
    blank = np.full((200, 200, 3), 127, dtype=np.uint8)
    with pytest.raises(IdfusionError, match="no face found"):
        official(faces=[blank], num_inference_steps=1)


def test_open_release_behaviour(open_release, faces_dir):
    crops = open_release.reference_images([faces_dir / "obama.jpg"])
    assert crops[0].size == (256, 256)
    assert open_release.encode_references(crops, torch.Generator().manual_seed(0)).shape == (1, 4, 32, 32)
    with pytest.raises(ValueError, match="face_box needs the official FlashFace model"):
        open_release(faces=[faces_dir / "obama.jpg"], face_box=[0.1, 0.1, 0.5, 0.5], num_inference_steps=1)
    # references are computed once (t = 0) and reused: the ReferenceNet runs on the first step only
    calls = []
    handle = open_release.refnet.register_forward_hook(lambda *a: calls.append(1))
    try:
        _run(open_release, faces=[faces_dir / "obama.jpg"])
    finally:
        handle.remove()
    assert len(calls) == 1


@pytest.mark.parametrize("method", ["flashface", "open-flashface"])
def test_offline_cli_path_with_no_other_flags(method, tmp_path, faces_dir, capsys, monkeypatch):
    from idfusion.cli.main import main
    from idfusion.outputs import read_generation_metadata

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = tmp_path / "model"
    assert main(["make-tiny", "--method", method, "--out", str(model)]) == 0
    capsys.readouterr()
    code = main(["generate", "--method", method, "--model", str(model), "--face", str(faces_dir / "obama.jpg"),
                 "--prompt", "a photo of a person in a garden", "--out", str(tmp_path / "out"), "--steps", "3"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    image_path, sheet_path = capsys.readouterr().out.split()
    meta = read_generation_metadata(image_path)
    assert meta["method"] == method and meta["num_references"] == 1 and meta["steps"] == 3


def test_cli_blend_weights_box_and_errors(tmp_path, faces_dir, capsys, tiny_release):
    from idfusion.cli.main import main
    from idfusion.outputs import read_generation_metadata

    model = tiny_release("flashface")
    base = ["generate", "--method", "flashface", "--model", str(model), "--steps", "2", "--out", str(tmp_path / "o"),
            "--no-contact-sheet", "--detector", "hog"]  # fmt: skip
    two = ["--face", f"{faces_dir / 'obama.jpg'}:0.7", "--face", f"{faces_dir / 'tom_hanks_aligned_112.png'}:0.3"]
    assert main([*base, *two, "--face-box", "0.3,0.1,0.6,0.4", "--ref-strength", "1.0"]) == 0
    meta = read_generation_metadata(capsys.readouterr().out.split()[0])
    assert meta["face_weights"] == [0.7, 0.3] and meta["face_box"] == [0.3, 0.1, 0.6, 0.4]
    assert meta["reference_strength"] == 1.0 and meta["num_references"] == 2

    assert main([*base, "--face", str(faces_dir / "group_six_faces.jpg")]) == 1
    assert "group_six_faces.jpg: reference 1 shows 6 faces" in capsys.readouterr().err
    assert main([*base, *(["--face", str(faces_dir / "obama.jpg")] * 5)]) == 1
    assert "give 1 to 4 references, got 5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--face", str(faces_dir / "obama.jpg"), "--face-box", "0.2,0.2,1.5,0.4"])
    assert "expected x1,y1,x2,y2 with each value in [0, 1]" in capsys.readouterr().err


def test_save_load_and_convert_give_the_same_images(tmp_path, capsys, tiny_release):
    """Official files, the `idfusion convert` output, and save_pretrained -> from_pretrained: the same pixels."""
    from idfusion.cli.main import main
    from idfusion.pipelines import FlashFacePipeline

    official_dir = tiny_release("flashface")
    latents = torch.randn(2, 4, 28, 28, generator=torch.Generator().manual_seed(9))

    def images(folder):
        pipe = FlashFacePipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        return pipe, _run(pipe, reference_latents=latents, seed=3, num_inference_steps=3)

    pipe, from_official = images(official_dir)
    assert main(["convert", "--method", "flashface", str(official_dir), str(tmp_path / "converted")]) == 0
    assert (tmp_path / "converted" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    _, from_converted = images(tmp_path / "converted")
    pipe.save_pretrained(tmp_path / "saved")
    _, from_saved = images(tmp_path / "saved")
    np.testing.assert_array_equal(from_official, from_converted)
    np.testing.assert_array_equal(from_official, from_saved)
    assert main(["convert", "--method", "flashface", str(official_dir), str(tmp_path / "converted")]) == 1
    assert "already exists" in capsys.readouterr().err


def test_the_fallback_without_log_sum_exp_gives_the_same_images(official, monkeypatch):
    latents = torch.randn(2, 4, 28, 28, generator=torch.Generator().manual_seed(12))
    split = _run(official, reference_latents=latents, face_weights=[1.0, 0.5])
    monkeypatch.setattr(ff, "_attention_with_lse", lambda *args, **kwargs: None)  # as on devices without the op
    direct = _run(official, reference_latents=latents, face_weights=[1.0, 0.5])
    np.testing.assert_allclose(split, direct, atol=1e-5)


def test_regenerate_from_png(tmp_path, faces_dir, capsys, tiny_release):
    from PIL import Image

    from idfusion.cli.main import main

    model = tiny_release("open-flashface")
    common = ["--model", str(model), "--face", str(faces_dir / "obama.jpg"), "--no-contact-sheet"]
    assert main(["generate", "--method", "open-flashface", "--steps", "2", "--seed", "6", "--out",
                 str(tmp_path / "a"), "--ref-strength", "0.7", *common]) == 0  # fmt: skip
    first = capsys.readouterr().out.split()[0]
    assert main(["generate", "--from", first, "--out", str(tmp_path / "b"), *common]) == 0
    second = capsys.readouterr().out.split()[0]
    np.testing.assert_array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(second)))


def test_a_group_photo_is_refused_unless_a_face_is_chosen(official, faces_dir):
    from idfusion.faces import FacePhoto
    from idfusion.pipelines.pipeline_flashface import ReferenceImageError

    group = faces_dir / "group_six_faces.jpg"
    with pytest.raises(ReferenceImageError, match="shows 6 faces.*--face-index"):
        official.reference_images([group])
    first, third = (official.reference_images([FacePhoto(group, i)])[0] for i in (0, 2))
    assert first.size == third.size == (official.release.reference_size,) * 2
    assert not np.array_equal(np.asarray(first), np.asarray(third))  # crops around two different people
