"""FeedFacePipeline (U-ViT) and FeedFaceSD15Pipeline on tiny official-layout checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def release(tiny_release):
    return tiny_release("feedface")


@pytest.fixture(scope="module")
def pipe(release):
    from idfusion.pipelines import FeedFacePipeline

    pipe = FeedFacePipeline.from_pretrained(release, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd15(tiny_release):
    from idfusion.pipelines import FeedFaceSD15Pipeline

    folder = tiny_release("feedface-sd15")
    pipe = FeedFaceSD15Pipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, **kwargs):
    kwargs.setdefault("seed", 0)
    kwargs.setdefault("num_inference_steps", 4)
    return np.stack(pipe(output_type="np", **kwargs).images)


def test_release_loads_and_defaults(pipe, release, faces_dir):
    out = pipe(faces=[faces_dir / "obama.jpg"], prompt="a man", seed=3, num_inference_steps=3)
    meta = out.metadata[0]
    assert out.images[0].size == (64, 64)  # the tiny U-ViT's 8x8 latent
    assert meta["method"] == "feedface" and meta["feed_scale"] == 0.8 and meta["face_mode"] == "cat"
    assert meta["scheduler"] == "feedface-dpm" and meta["guidance_scale"] == 6.0 and meta["seed"] == 3  # the release's
    assert out.references[0].shape == (224, 224, 3)
    hooked = [name for name, module in pipe.unet.named_modules() if module._forward_hooks]
    assert len(hooked) == 14


def test_feed_scale_zero_equals_the_bare_uvit(pipe, faces_dir):
    tokens, _ = pipe.encode_faces([faces_dir / "obama.jpg"])
    off = _run(pipe, face_tokens=tokens, feed_scale=0.0)
    pipe.feed.detach()
    try:
        bare = _run(pipe, face_tokens=tokens, feed_scale=0.0)
    finally:
        pipe.feed.attach(pipe.unet)
    np.testing.assert_array_equal(off, bare)
    on = _run(pipe, face_tokens=tokens)
    assert np.abs(on - off).max() > 1e-3


def test_the_unconditional_branch_runs_without_the_adapter(pipe, faces_dir):
    calls = []
    original = pipe.unet.forward

    def spy(*args, timestep_text=None, **kwargs):
        calls.append((int(timestep_text), pipe.feed.multiplier))
        return original(*args, timestep_text=timestep_text, **kwargs)

    pipe.unet.forward = spy
    try:
        _run(pipe, faces=[faces_dir / "obama.jpg"], num_inference_steps=2, feed_scale=0.7)
    finally:
        del pipe.unet.forward
    assert calls == [(0, 0.7), (1000, 0.0)] * 2


def test_cat_with_one_face_equals_mean_and_modes_differ_for_two(pipe, faces_dir):
    one = [faces_dir / "obama.jpg"]
    np.testing.assert_array_equal(_run(pipe, faces=one, face_mode="cat"), _run(pipe, faces=one, face_mode="mean"))
    two = [faces_dir / "obama.jpg", faces_dir / "obama_partial_face.jpg"]
    cat, _ = pipe.encode_faces(two, "cat")
    mean, _ = pipe.encode_faces(two, "mean")
    assert cat.shape[1] == 100 and mean.shape[1] == 50
    torch.testing.assert_close(mean, (cat[:, :50] + cat[:, 50:]) / 2)


def test_faces_are_encoded_once_per_call_and_batches_equal_single_calls(pipe, faces_dir):
    calls = []
    handle = pipe.feed.preprocess_module.register_forward_hook(lambda *a: calls.append(1))
    try:
        batch = _run(pipe, faces=[faces_dir / "obama.jpg"], num_images_per_prompt=2, seed=4)
    finally:
        handle.remove()
    assert len(calls) == 1
    single = _run(pipe, faces=[faces_dir / "obama.jpg"], seed=5)
    np.testing.assert_allclose(batch[1], single[0], atol=1e-5)


def test_input_errors(pipe, faces_dir):
    from idfusion.errors import NoFaceError
    from idfusion.faces import FaceAnalyzer

    with pytest.raises(ValueError, match="face mode"):
        pipe(faces=[faces_dir / "obama.jpg"], face_mode="first-only")
    with pytest.raises(ValueError, match="exactly one"):
        pipe()
    analyzer = pipe.face_analyzer
    pipe.set_face_analyzer(FaceAnalyzer("hog", None, crops=()))
    try:
        with pytest.raises(NoFaceError):
            pipe(faces=[np.full((200, 200, 3), 128, np.uint8)])
    finally:
        pipe.set_face_analyzer(analyzer)


def test_sd15_variant_scale_zero_is_the_base_and_the_adapter_acts(sd15, faces_dir):
    from diffusers import StableDiffusionPipeline

    faces = [faces_dir / "obama.jpg"]
    off = _run(sd15, faces=faces, feed_scale=0.0, prompt="a man", negative_prompt="blurry")
    base = StableDiffusionPipeline(
        vae=sd15.vae, text_encoder=sd15.text_encoder, tokenizer=sd15.tokenizer, unet=sd15.unet,
        scheduler=sd15.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    base.set_progress_bar_config(disable=True)
    sd15.feed.detach()
    try:
        bare = base("a man", negative_prompt="blurry", num_inference_steps=4, guidance_scale=6.0, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    finally:
        sd15.feed.attach(sd15.unet)
    np.testing.assert_array_equal(off, bare)
    on = _run(sd15, faces=faces, prompt="a man", negative_prompt="blurry")
    assert np.abs(on - off).max() > 1e-3


def test_sd15_cat_one_equals_mean_one(sd15, faces_dir):
    one = [faces_dir / "obama.jpg"]
    np.testing.assert_array_equal(_run(sd15, faces=one, face_mode="cat"), _run(sd15, faces=one, face_mode="mean"))


@pytest.mark.parametrize("method", ["feedface", "feedface-sd15"])
def test_offline_cli_path_with_no_other_flags(method, tmp_path, faces_dir, capsys, monkeypatch):
    from idfusion.cli.main import main
    from idfusion.outputs import read_generation_metadata

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = tmp_path / "model"
    assert main(["make-tiny", "--method", method, "--out", str(model)]) == 0
    capsys.readouterr()
    code = main(["generate", "--method", method, "--model", str(model), "--face", str(faces_dir / "obama.jpg"),
                 "--prompt", "a photo of a man", "--out", str(tmp_path / "out")])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    image_path, _ = capsys.readouterr().out.split()
    meta = read_generation_metadata(image_path)
    assert meta["method"] == method and meta["feed_scale"] == 0.8 and meta["num_references"] == 1
    code = main(["generate", "--method", method, "--model", str(model), "--face", str(faces_dir / "obama.jpg"),
                 "--face", str(faces_dir / "obama_rgba.png"), "--face-mode", "mean", "--feed-scale", "0.5",
                 "--steps", "2", "--out", str(tmp_path / "out")])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    meta = read_generation_metadata(capsys.readouterr().out.split()[0])
    assert meta["face_mode"] == "mean" and meta["feed_scale"] == 0.5 and meta["num_references"] == 2
    code = main(["generate", "--method", "fact", "--model", str(model), "--face", str(faces_dir / "obama.jpg"),
                 "--feed-scale", "0.5", "--out", str(tmp_path / "out")])  # fmt: skip
    assert code == 1 and "--feed-scale is an option of FeedFace" in capsys.readouterr().err
