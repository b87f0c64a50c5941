"""AdaFacePipeline: the official layout end to end, prompt-embedding parity, contracts, any SD1.5 base, v1 and v2."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from idfusion.cli.main import main
from idfusion.errors import IdfusionError
from idfusion.faces import FaceAnalyzer
from idfusion.outputs import read_generation_metadata


@pytest.fixture(scope="module")
def tiny_adaface(tiny_release):
    return tiny_release("adaface")


@pytest.fixture(scope="module")
def pipe(tiny_adaface):
    from idfusion.pipelines import AdaFacePipeline

    pipe = AdaFacePipeline.from_pretrained(tiny_adaface, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


IDENTITY = np.random.default_rng(0).standard_normal(512).astype(np.float32)


def _images(output) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.float32) for image in output.images])


def test_offline_cli_path_with_no_other_flags(tmp_path, faces_dir, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = tmp_path / "release"
    assert main(["make-tiny", "--method", "adaface", "--out", str(model)]) == 0
    capsys.readouterr()
    code = main(["generate", "--method", "adaface", "--model", str(model), "--face", str(faces_dir / "obama.jpg"),
                 "--prompt", "a photo of z in a garden", "--out", str(tmp_path / "out")])  # fmt: skip
    assert code == 0
    image_path, sheet_path = capsys.readouterr().out.split()
    meta = read_generation_metadata(image_path)
    assert meta["method"] == "adaface" and meta["adaface_version"] == "v2"
    assert meta["steps"] == 50 and meta["scheduler"] == "ddim" and meta["guidance_scale"] == 5.0
    joint = [f"z_0_{i}" for i in range(4)] + [f"z_1_{i}" for i in range(16)]  # the v2 default: both encoders
    assert meta["composed_prompt"] == "a photo of in a garden " + " ".join(joint)
    assert Image.open(image_path).size == (64, 64) and Image.open(sheet_path).width > 64


def test_prompt_embeddings_match_an_independent_reference(pipe, tiny_adaface):
    """The pipeline's conditioning equals a fresh copy of the base text encoder run on the user's words followed
    by 16 rows set to the ada embeddings (no added tokens, no resizing, no prompt rewriting involved)."""
    from transformers import CLIPTextModel

    from idfusion.prompt_encoders import inject_token_embeddings

    identity, _ = pipe.prepare_id_embeds(id_embeds=IDENTITY)
    ada = pipe.ada_embeddings(identity)
    groups = pipe.adaface.joint_subject_tokens(consistentid=False)
    tokens = [t for group in groups for t in group]
    composed = pipe.compose_prompt("a photo of z at the beach", groups)
    table = pipe.text_encoder.get_input_embeddings().weight.clone()
    ours = pipe.encode_composed(composed, tokens, ada)
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight, table)  # the table is never edited
    assert len(pipe.tokenizer) == pipe.text_encoder.config.vocab_size  # nor the pipeline's tokenizer

    fresh = CLIPTextModel.from_pretrained(tiny_adaface / "models/stable-diffusion-v1-5/text_encoder")
    words = pipe.tokenizer("a photo of at the beach", add_special_tokens=False).input_ids  # v2 drops only "z"
    bos, eos = pipe.tokenizer.bos_token_id, pipe.tokenizer.eos_token_id
    ids = [bos, *words, *([0] * 16), eos]
    ids += [eos] * (77 - len(ids))
    input_ids = torch.tensor([ids])
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    mask[0, 1 + len(words) : 1 + len(words) + 16] = True
    with inject_token_embeddings(fresh, mask, ada[0]):
        reference = fresh(input_ids)[0]
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_contracts_same_seed_faces_batch(pipe, faces_dir):
    face = pipe.default_face_analyzer().get(faces_dir / "obama.jpg")
    a = pipe(faces=faces_dir / "obama.jpg", seed=1, num_inference_steps=3, output_type="np")
    b = pipe(faces=faces_dir / "obama.jpg", seed=1, num_inference_steps=3, output_type="np")
    c = pipe(id_embeds=face.embedding, seed=1, num_inference_steps=3, output_type="np")
    d = pipe(faces=faces_dir / "obama.jpg", seed=1, num_inference_steps=3, output_type="np", arc2face_only=True)
    np.testing.assert_array_equal(_images(a), _images(b))
    assert np.abs(_images(a) - _images(c)).max() > 1e-3  # photos run both v2 encoders; an embedding, Arc2Face's
    np.testing.assert_array_equal(_images(c), _images(d))
    batch = pipe(id_embeds=IDENTITY, seed=20, num_images_per_prompt=2, num_inference_steps=2, output_type="np")
    singles = [pipe(id_embeds=IDENTITY, seed=s, num_inference_steps=2, output_type="np") for s in (20, 21)]
    np.testing.assert_allclose(_images(batch), np.concatenate([_images(s) for s in singles]), atol=1e-4)


def test_identity_and_id_scale_change_the_image(pipe):
    base = pipe(id_embeds=IDENTITY, seed=0, num_inference_steps=2, output_type="np")
    other = pipe(id_embeds=-IDENTITY, seed=0, num_inference_steps=2, output_type="np")
    stronger = pipe(id_embeds=IDENTITY, seed=0, num_inference_steps=2, id_scale=3.0, output_type="np")
    unit = pipe(id_embeds=IDENTITY, seed=0, num_inference_steps=2, id_scale=1.0, output_type="np")
    assert np.abs(_images(base) - _images(other)).max() > 1e-3
    assert np.abs(_images(base) - _images(stronger)).max() > 1e-3
    np.testing.assert_array_equal(_images(base), _images(unit))  # s = 1 is the identity transform


def test_sampling_is_plain_diffusers_on_the_composed_prompt(pipe):
    """Given the composed prompt's embeddings, AdaFace samples as the base model's own StableDiffusionPipeline."""
    from diffusers import StableDiffusionPipeline

    from idfusion.prompt_encoders import encode_text

    ours = pipe(id_embeds=IDENTITY, prompt="a photo of z", negative_prompt="", seed=3, num_inference_steps=2,
                output_type="np")  # fmt: skip
    identity, _ = pipe.prepare_id_embeds(id_embeds=IDENTITY)
    groups = pipe.adaface.joint_subject_tokens(consistentid=False)
    composed = ours.metadata[0]["composed_prompt"]
    assert composed == pipe.compose_prompt("a photo of z", groups)
    embeds = pipe.encode_composed(composed, [t for g in groups for t in g], pipe.ada_embeddings(identity))
    plain = StableDiffusionPipeline(
        pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.unet, pipe.scheduler, None, None,
        requires_safety_checker=False,
    )  # fmt: skip
    plain.set_progress_bar_config(disable=True)
    reference = plain(prompt_embeds=embeds, negative_prompt_embeds=encode_text(pipe.text_encoder, pipe.tokenizer, [""]),
                      num_inference_steps=2, guidance_scale=5.0, generator=torch.Generator().manual_seed(3),
                      output_type="np")  # fmt: skip
    np.testing.assert_allclose(_images(ours), reference.images, atol=1e-5)


def test_save_then_load(pipe, tmp_path):
    from idfusion.pipelines import AdaFacePipeline

    before = pipe(id_embeds=IDENTITY, seed=4, num_inference_steps=2, output_type="np")
    pipe.save_pretrained(tmp_path / "saved")
    reloaded = AdaFacePipeline.from_pretrained(tmp_path / "saved")
    reloaded.set_progress_bar_config(disable=True)
    after = reloaded(id_embeds=IDENTITY, seed=4, num_inference_steps=2, output_type="np")
    np.testing.assert_allclose(_images(before), _images(after), atol=1e-6)


def test_any_sd15_base_and_the_v1_checkpoint(tiny_adaface, tmp_path):
    from idfusion.pipelines import AdaFacePipeline
    from idfusion.testing.make_tiny import write_sd15
    from idfusion.testing.tiny_adaface import write_tiny_adaface_v1

    other_base = tmp_path / "other-base"
    other_base.mkdir()
    write_sd15(other_base, 99, text_width=512)
    with_other = AdaFacePipeline.from_pretrained(tiny_adaface, base_model=other_base, local_files_only=True)
    with_other.set_progress_bar_config(disable=True)
    assert with_other(id_embeds=IDENTITY, seed=0, num_inference_steps=2).metadata[0]["base_model"] == str(other_base)

    v1_release = tmp_path / "v1"
    shutil.copytree(tiny_adaface, v1_release, ignore=shutil.ignore_patterns("*.pt"))
    v1_files = write_tiny_adaface_v1(tmp_path / "v1-ckpt", 0)
    checkpoint = next(p for p in v1_files if p.suffix == ".pt")
    shutil.copy(checkpoint, v1_release / "models/adaface" / checkpoint.name)
    v1 = AdaFacePipeline.from_pretrained(v1_release, local_files_only=True)
    v1.set_progress_bar_config(disable=True)
    out = v1(id_embeds=IDENTITY, prompt="z wearing a hat", seed=0, num_inference_steps=2)
    assert out.metadata[0]["adaface_version"] == "v1"
    assert out.metadata[0]["composed_prompt"] == " ".join(f"z_{i}" for i in range(16)) + " wearing a hat"


def test_bad_inputs(pipe, tiny_adaface, tmp_path, faces_dir):
    from idfusion.pipelines import AdaFacePipeline
    from idfusion.testing.make_tiny import write_sd15

    narrow = tmp_path / "narrow"
    narrow.mkdir()
    write_sd15(narrow, 0)  # 32-wide text encoder
    with pytest.raises(ValueError, match="AdaFace needs an SD1.5-family base model"):
        AdaFacePipeline.from_pretrained(tiny_adaface, base_model=narrow, local_files_only=True)
    with pytest.raises(ValueError, match="the subject tokens must not be cut off"):
        pipe(id_embeds=IDENTITY, prompt="word " * 70, num_inference_steps=1)
    with pytest.raises(IdfusionError, match=r"dlib-resnet \(128-d\)"):
        pipe(faces=[FaceAnalyzer().get(faces_dir / "obama.jpg")], num_inference_steps=1)
    with pytest.raises(ValueError, match="id_scale must be a finite number"):
        pipe(id_embeds=IDENTITY, id_scale=float("inf"), num_inference_steps=1)


def test_converted_safetensors_checkpoint_gives_the_same_images(pipe, tiny_adaface, tmp_path, capsys):
    from idfusion.pipelines import AdaFacePipeline

    release = tmp_path / "release"
    shutil.copytree(tiny_adaface, release)
    (official,) = (release / "models/adaface").glob("*.pt")
    converted = release / "models/adaface" / (official.stem + ".safetensors")
    assert main(["convert", "--method", "adaface", str(official), str(converted)]) == 0
    official.unlink()  # only the pickle-free file is left
    reloaded = AdaFacePipeline.from_pretrained(release, local_files_only=True)
    reloaded.set_progress_bar_config(disable=True)
    before = pipe(id_embeds=IDENTITY, seed=2, num_inference_steps=2, output_type="np")
    after = reloaded(id_embeds=IDENTITY, seed=2, num_inference_steps=2, output_type="np")
    np.testing.assert_array_equal(_images(before), _images(after))
