"""Arc2Face: identity projection parity, official layout loading, full-size shapes, and the pipeline contracts."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from idfusion.cli.main import main
from idfusion.errors import IdfusionError, ModelFilesError
from idfusion.faces import FaceAnalyzer
from idfusion.outputs import read_generation_metadata


@pytest.fixture(scope="module")
def tiny_arc2face(tiny_release):
    return tiny_release("arc2face")


@pytest.fixture(scope="module")
def pipe(tiny_arc2face):
    from idfusion.pipelines import Arc2FacePipeline

    pipe = Arc2FacePipeline.from_pretrained(tiny_arc2face, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pixels(output) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.float32) for image in output.images])


def _reference_projection(encoder, tokenizer, id_embeds: torch.Tensor) -> torch.Tensor:
    """Arc2Face's conditioning written out with plain tensor ops on the encoder's weights (an independent path:
    no hooks, no transformers forward)."""
    ids = tokenizer(["photo of a id person"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    words = ["<|startoftext|>", "photo</w>", "of</w>", "a</w>", "id</w>", "person</w>", "<|endoftext|>"]
    assert tokenizer.convert_ids_to_tokens(ids[0, :7].tolist()) == words  # the kit's vocabulary: ids are its own
    state = encoder.state_dict()
    width = state["embeddings.token_embedding.weight"].shape[1]
    e = id_embeds / id_embeds.norm(dim=1, keepdim=True)
    tokens = state["embeddings.token_embedding.weight"][ids[0]].expand(len(e), -1, -1).clone()
    tokens[:, 4] = torch.cat([e, torch.zeros(len(e), width - e.shape[1])], dim=1)
    h = tokens + state["embeddings.position_embedding.weight"][:77]
    heads = encoder.config.num_attention_heads
    causal = torch.full((77, 77), float("-inf")).triu(1)
    eps = encoder.config.layer_norm_eps
    for i in range(encoder.config.num_hidden_layers):
        p = {k[len(f"encoder.layers.{i}.") :]: v for k, v in state.items() if k.startswith(f"encoder.layers.{i}.")}
        x = F.layer_norm(h, (width,), p["layer_norm1.weight"], p["layer_norm1.bias"], eps)
        q, k, v = (F.linear(x, p[f"self_attn.{n}_proj.weight"], p[f"self_attn.{n}_proj.bias"]) for n in "qkv")
        q, k, v = (t.view(len(e), 77, heads, -1).transpose(1, 2) for t in (q, k, v))  # (B, heads, 77, head_dim)
        attention = ((q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5 + causal).softmax(-1) @ v
        attention = attention.transpose(1, 2).reshape(len(e), 77, width)  # (B, 77, width)
        h = h + F.linear(attention, p["self_attn.out_proj.weight"], p["self_attn.out_proj.bias"])
        x = F.layer_norm(h, (width,), p["layer_norm2.weight"], p["layer_norm2.bias"], eps)
        x = F.linear(x, p["mlp.fc1.weight"], p["mlp.fc1.bias"])
        x = x * torch.sigmoid(1.702 * x)  # quick_gelu
        h = h + F.linear(x, p["mlp.fc2.weight"], p["mlp.fc2.bias"])
    return F.layer_norm(h, (width,), state["final_layer_norm.weight"], state["final_layer_norm.bias"], eps)


def test_projection_matches_an_independent_reference(pipe):
    from idfusion.methods.arc2face import arc2face_prompt_embeds

    id_embeds = torch.randn(3, 512, generator=torch.Generator().manual_seed(0)) * 7.0  # unnormalised on purpose
    ours = arc2face_prompt_embeds(pipe.text_encoder, pipe.tokenizer, id_embeds)
    reference = _reference_projection(pipe.text_encoder, pipe.tokenizer, id_embeds)
    assert ours.shape == (3, 77, 512)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_official_layout_keys_and_full_size_shapes(tiny_arc2face):
    """The tiny release has the official key names; the official configs build at full size on the meta device
    with the parameter counts of the released files (859.5M UNet, 123.06M encoder)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from safetensors import safe_open
    from transformers import CLIPTextConfig, CLIPTextModel

    from idfusion.testing.components import sd15_text_encoder_config, sd15_unet_config

    encoder_keys = set(torch.load(tiny_arc2face / "encoder/pytorch_model.bin", weights_only=True))
    assert "text_model.embeddings.token_embedding.weight" in encoder_keys
    assert "text_model.encoder.layers.0.self_attn.q_proj.weight" in encoder_keys
    with safe_open(tiny_arc2face / "arc2face/diffusion_pytorch_model.safetensors", "pt") as f:
        unet_keys = set(f.keys())
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight" in unet_keys

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(sd15_unet_config())
        encoder = CLIPTextModel(CLIPTextConfig(**sd15_text_encoder_config()))
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    assert sum(p.numel() for p in encoder.parameters()) == 123_060_480
    shapes = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    assert shapes["conv_in.weight"] == (320, 4, 3, 3)
    assert shapes["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"] == (320, 768)
    assert shapes["mid_block.attentions.0.transformer_blocks.0.attn2.to_v.weight"] == (1280, 768)
    assert encoder.get_input_embeddings().weight.shape == (49408, 768)
    # every tiny key is an official key (the tiny UNet has one layer per block where SD1.5 has two)
    assert unet_keys <= set(shapes)


def test_offline_cli_path_with_no_other_flags(tmp_path, faces_dir, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = tmp_path / "models"
    assert main(["make-tiny", "--method", "arc2face", "--out", str(model)]) == 0
    capsys.readouterr()
    out = tmp_path / "out"
    code = main(
        ["generate", "--method", "arc2face", "--model", str(model), "--face", str(faces_dir / "obama.jpg"),
         "--prompt", "photo of a person", "--out", str(out), "--steps", "2"]
    )  # fmt: skip
    assert code == 0
    written = capsys.readouterr().out.split()
    assert [p.endswith(".png") for p in written] == [True, True]
    image = Image.open(written[0])
    assert image.size == (64, 64)
    meta = read_generation_metadata(written[0])
    assert meta["method"] == "arc2face" and meta["steps"] == 2 and meta["scheduler"] == "dpm++"
    assert "Steps: 2" in image.text["parameters"]
    sheet = Image.open(written[1])
    assert sheet.width > 64


def test_regenerate_from_png_gives_identical_pixels(tmp_path, faces_dir, tiny_arc2face, capsys):
    face = str(faces_dir / "obama.jpg")
    common = ["--model", str(tiny_arc2face), "--no-contact-sheet"]
    assert main(["generate", "--method", "arc2face", "--face", face, "--out", str(tmp_path / "a"), "--seed", "7",
                 "--steps", "3", *common]) == 0  # fmt: skip
    first = capsys.readouterr().out.split()[0]
    assert main(["generate", "--from", first, "--out", str(tmp_path / "b"), *common]) == 0
    second = capsys.readouterr().out.split()[0]
    np.testing.assert_array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(second)))
    assert read_generation_metadata(second)["seed"] == 7


def test_same_seed_same_pixels_and_faces_equal_embeddings(pipe, faces_dir):
    face = pipe.default_face_analyzer().get(faces_dir / "obama.jpg")
    a = pipe(faces=[faces_dir / "obama.jpg"], seed=3, num_inference_steps=3)
    b = pipe(faces=[faces_dir / "obama.jpg"], seed=3, num_inference_steps=3)
    c = pipe(id_embeds=face.embedding, seed=3, num_inference_steps=3)
    np.testing.assert_array_equal(_pixels(a), _pixels(b))
    np.testing.assert_array_equal(_pixels(a), _pixels(c))
    d = pipe(id_embeds=face.embedding, seed=4, num_inference_steps=3)
    assert np.abs(_pixels(a) - _pixels(d)).mean() > 1.0
    assert len(a.references) == 1 and a.references[0].shape == (112, 112, 3)


def test_batch_equals_single_calls(pipe):
    identity = np.random.default_rng(0).standard_normal(512).astype(np.float32)
    batch = pipe(id_embeds=identity, seed=10, num_images_per_prompt=3, num_inference_steps=2, output_type="np")
    singles = [pipe(id_embeds=identity, seed=s, num_inference_steps=2, output_type="np") for s in (10, 11, 12)]
    np.testing.assert_allclose(np.stack(batch.images), np.stack([s.images[0] for s in singles]), atol=1e-4)
    assert [m["seed"] for m in batch.metadata] == [10, 11, 12]


def test_save_then_load_gives_the_same_images(pipe, tmp_path):
    from idfusion.pipelines import Arc2FacePipeline

    identity = np.random.default_rng(1).standard_normal(512).astype(np.float32)
    before = pipe(id_embeds=identity, seed=5, num_inference_steps=2, output_type="np")
    pipe.save_pretrained(tmp_path / "saved")
    reloaded = Arc2FacePipeline.from_pretrained(tmp_path / "saved")
    reloaded.set_progress_bar_config(disable=True)
    after = reloaded(id_embeds=identity, seed=5, num_inference_steps=2, output_type="np")
    np.testing.assert_array_equal(np.stack(before.images), np.stack(after.images))


def test_several_faces_are_averaged(pipe):
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((2, 512)).astype(np.float32)
    mean = a / np.linalg.norm(a) + b / np.linalg.norm(b)
    both = pipe(id_embeds=np.stack([a, b]), seed=1, num_inference_steps=2, output_type="np")
    averaged = pipe(id_embeds=mean, seed=1, num_inference_steps=2, output_type="np")
    np.testing.assert_allclose(np.stack(both.images), np.stack(averaged.images), atol=1e-5)


def test_controlnet_and_lcm_paths(pipe, tmp_path):
    identity = np.ones(512, dtype=np.float32)
    plain = pipe(id_embeds=identity, seed=0, num_inference_steps=2, output_type="np")
    condition = np.zeros((64, 64, 3), dtype=np.uint8)
    condition[16:48, 16:48] = 255
    controlled = pipe(id_embeds=identity, seed=0, num_inference_steps=2, controlnet_image=condition, output_type="np")
    assert np.abs(np.stack(plain.images) - np.stack(controlled.images)).max() > 1e-3

    lcm_lora = _tiny_lora(pipe, tmp_path / "lcm")
    lcm = pipe(id_embeds=identity, seed=0, lcm=True, lcm_lora=str(lcm_lora), output_type="np")
    assert lcm.metadata[0]["scheduler"] == "lcm" and lcm.metadata[0]["steps"] == 2
    assert lcm.metadata[0]["guidance_scale"] == 1.0
    again = pipe(id_embeds=identity, seed=0, num_inference_steps=2, output_type="np")  # LoRA off again
    np.testing.assert_allclose(np.stack(plain.images), np.stack(again.images), atol=1e-5)


def test_bad_identity_inputs(pipe, faces_dir):
    with pytest.raises(IdfusionError, match=r"needs a 512-d ArcFace embedding, but this face was embedded by "
                       r"dlib-resnet \(128-d\)"):  # fmt: skip
        pipe(faces=[FaceAnalyzer().get(faces_dir / "obama.jpg")], num_inference_steps=1)
    with pytest.raises(IdfusionError, match=r"expected embeddings of shape \(N, 512\), got \(1, 128\)"):
        pipe(id_embeds=np.ones(128, dtype=np.float32), num_inference_steps=1)
    with pytest.raises(IdfusionError, match="exactly one"):
        pipe(num_inference_steps=1)
    with pytest.raises(ValueError, match="num_inference_steps must be at least 1"):
        pipe(id_embeds=np.ones(512, dtype=np.float32), num_inference_steps=0)
    with pytest.raises(ValueError, match="multiple of 8"):
        pipe(id_embeds=np.ones(512, dtype=np.float32), height=100, num_inference_steps=1)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--face", "missing.jpg"], "missing.jpg: file not found"),
        (["--face", "{faces}/obama.jpg", "--steps", "0"], "expected a number >= 1"),
        (["--face", "{faces}/obama.jpg", "--guidance", "nan"], "expected a finite number"),
        (["--face", "{blank}", "--detector", "hog"], "no face found by the dlib-hog detector"),
        (
            ["--face", "{faces}/obama.jpg", "--id-scale", "2"],
            "--id-scale is an option of AdaFace (--method adaface), not of Arc2Face",
        ),
    ],
)
def test_cli_errors_are_one_line(tmp_path, faces_dir, tiny_arc2face, capsys, args, message):
    blank = tmp_path / "blank.png"
    Image.new("RGB", (200, 200), (128, 128, 128)).save(blank)
    args = [a.format(faces=faces_dir, blank=blank) for a in args]
    try:
        code = main(["generate", "--method", "arc2face", "--model", str(tiny_arc2face), "--out", str(tmp_path), *args])
    except SystemExit as exit_:  # argparse rejects bad numbers itself, with exit code 2
        code = exit_.code
    assert code in (1, 2)
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_missing_weights_list_the_files(tmp_path, capsys):
    (tmp_path / "models" / "arc2face").mkdir(parents=True)
    with pytest.raises(ModelFilesError) as info:
        from idfusion.pipelines import Arc2FacePipeline

        Arc2FacePipeline.from_pretrained(tmp_path / "models", local_files_only=True)
    for needed in ("arc2face/diffusion_pytorch_model.safetensors", "encoder/config.json"):
        assert needed in str(info.value)
    assert main(["generate", "--method", "arc2face", "--model", str(tmp_path / "models"), "--face", "x.jpg"]) == 1


def _tiny_lora(pipe, folder):
    """A random LoRA for the tiny UNet in the diffusers file format (as LCM-LoRA is distributed)."""
    import copy

    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict
    from peft.tuners.lora import LoraModel  # noqa: F401  (peft must be importable)

    unet = copy.deepcopy(pipe.unet)
    unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    )
    state = get_peft_model_state_dict(unet)
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=state)
    assert json.dumps(sorted(p.name for p in folder.iterdir()))
    return folder / "pytorch_lora_weights.safetensors"


def test_memory_and_dtype_options(tmp_path, faces_dir, tiny_arc2face, capsys):
    args = ["generate", "--method", "arc2face", "--model", str(tiny_arc2face), "--face", str(faces_dir / "obama.jpg"),
            "--steps", "2", "--seed", "1", "--no-contact-sheet"]  # fmt: skip
    assert (
        main([*args, "--out", str(tmp_path / "a"), "--vae-tiling", "--attention-slicing", "--dtype", "bfloat16"]) == 0
    )
    image = Image.open(capsys.readouterr().out.split()[0])
    assert image.size == (64, 64) and np.asarray(image).std() > 0
    assert main([*args, "--out", str(tmp_path / "b"), "--cpu-offload"]) == 1
    assert "--cpu-offload moves models between the CPU and a GPU" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([*args, "--out", str(tmp_path / "c"), "--device", "cuda:0"]) == 1
        assert "--device cuda:0: CUDA is not available on this machine" in capsys.readouterr().err


def test_an_ignored_prompt_is_named_but_never_echoed_whole(pipe, caplog):
    identity = np.random.default_rng(2).standard_normal(512).astype(np.float32)
    with caplog.at_level(logging.WARNING, logger="idfusion.pipelines.pipeline_arc2face"):
        pipe(id_embeds=identity, prompt="a castle " * 2500, seed=0, num_inference_steps=1, output_type="np")
    (record,) = [r for r in caplog.records if "not used" in r.getMessage()]
    assert "a castle" in record.getMessage() and len(record.getMessage()) < 200


def test_pipelines_loaded_for_inference_are_frozen(tiny_arc2face):
    """The CLI, batch and server path: nothing requires grad (no autocast weight-copy cache), every module in eval."""
    from idfusion.jobs import LoadSettings, load_configured
    from idfusion.registry import get_method

    pipe = load_configured(get_method("arc2face"), str(tiny_arc2face), LoadSettings(progress_bar=False))
    modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    assert len(modules) >= 4  # unet, text encoder, vae, controlnet...
    assert not any(p.requires_grad for m in modules for p in m.parameters())
    assert not any(sub.training for m in modules for sub in m.modules())
