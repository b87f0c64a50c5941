"""FeedFace's base model: the official UniDiffuser-v1 files (uvit_v1.pth, autoencoder_kl.pth, caption_decoder.pth,
gpt2/) converted into diffusers' UniDiffuser classes.

The official naming is checked against the spec's key/shape table (§3.6, written out below independently of the
code under test) at full size on the meta device, and functionally: the official U-ViT forward pass is
re-implemented here from ``libs/unidiffuser_v1.py`` on the official-named tensors and compared with diffusers'
``UniDiffuserModel`` on the converted weights.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from idfusion.convert import feedface as ckpt
from idfusion.errors import ModelFilesError
from idfusion.testing import tiny_feedface_base as tiny

C = 1536  # UniDiffuser-v1 width
BLOCKS = 15  # depth 30 // 2


def spec_uvit_shapes() -> dict[str, tuple[int, ...]]:
    """Every official ``uvit_v1.pth`` key and shape, from the spec (§3.1, §3.6) and ``UViTCondToken``'s modules."""
    shapes: dict[str, tuple[int, ...]] = {
        "pos_embed": (1, 1 + 1 + 77 + 1 + 1024, C),  # 1104
        "pos_embed_token": (1, 1, C),
        "patch_embed.proj.weight": (C, 4, 2, 2),
        "patch_embed.proj.bias": (C,),
        "text_embed.weight": (C, 64),
        "text_embed.bias": (C,),
        "text_out.weight": (64, C),
        "text_out.bias": (64,),
        "clip_img_embed.weight": (C, 512),
        "clip_img_embed.bias": (C,),
        "clip_img_out.weight": (512, C),
        "clip_img_out.bias": (512,),
        "norm.weight": (C,),
        "norm.bias": (C,),
        "decoder_pred.weight": (2 * 2 * 4, C),
        "decoder_pred.bias": (16,),
        "token_embedding.weight": (2, C),
    }
    blocks = [f"in_blocks.{i}" for i in range(BLOCKS)] + ["mid_block"] + [f"out_blocks.{i}" for i in range(BLOCKS)]
    for block in blocks:
        shapes[f"{block}.attn.qkv.weight"] = (3 * C, C)  # no qkv bias
        shapes[f"{block}.attn.proj.weight"] = (C, C)
        shapes[f"{block}.attn.proj.bias"] = (C,)
        shapes[f"{block}.mlp.fc1.weight"] = (4 * C, C)
        shapes[f"{block}.mlp.fc1.bias"] = (4 * C,)
        shapes[f"{block}.mlp.fc2.weight"] = (C, 4 * C)
        shapes[f"{block}.mlp.fc2.bias"] = (C,)
        for norm in ("norm2", "norm3") + (("norm1",) if block.startswith("out") else ()):
            shapes[f"{block}.{norm}.weight"] = (C,)
            shapes[f"{block}.{norm}.bias"] = (C,)
        if block.startswith("out"):
            shapes[f"{block}.skip_linear.weight"] = (C, 2 * C)
            shapes[f"{block}.skip_linear.bias"] = (C,)
    return shapes


def meta_state(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("feedface-base") / "models"
    tiny.write_unidiffuser_base(folder, seed=3)
    return folder


def load(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------------------------------------------------
# Full size, on the meta device
# --------------------------------------------------------------------------------------------------------------------


def test_full_size_uvit_matches_the_official_structure() -> None:
    from diffusers import UniDiffuserModel

    with torch.device("meta"):
        model = UniDiffuserModel(**ckpt.UVIT_V1_CONFIG)
    official = ckpt.uvit_to_official_state_dict(model.state_dict())
    expected = spec_uvit_shapes()
    assert {k: tuple(v.shape) for k, v in official.items()} == expected
    assert list(official) == ckpt.official_uvit_keys()  # the order torch saves UViTCondToken in
    assert round(sum(v.numel() for v in official.values()) / 1e6, 1) == 952.5
    # transformer_in_blocks / out_blocks: 15 + mid + 15, as the official depth 30
    assert len(model.transformer.transformer_in_blocks) == len(model.transformer.transformer_out_blocks) == BLOCKS

    # Backwards: the spec's structure converts into exactly the diffusers model's keys and shapes.
    spec = meta_state(expected)
    assert ckpt.infer_uvit_config(spec) == ckpt.UVIT_V1_CONFIG
    converted = ckpt.convert_uvit_state_dict(spec)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_full_size_autoencoder_and_caption_decoder_structure() -> None:
    from diffusers import AutoencoderKL, UniDiffuserTextDecoder

    with torch.device("meta"):
        vae = AutoencoderKL(**ckpt.VAE_CONFIG)
    ldm = ckpt.autoencoder_to_official_state_dict(vae.state_dict())
    assert sum(v.numel() for v in ldm.values()) == 83_653_863  # SD's KL-f8 VAE
    spot = {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.down.3.block.1.conv2.weight": (512, 512, 3, 3),
        "encoder.down.2.downsample.conv.weight": (512, 512, 3, 3),
        "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "encoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
        "encoder.norm_out.weight": (512,),
        "encoder.conv_out.weight": (8, 512, 3, 3),  # double_z
        "quant_conv.weight": (8, 8, 1, 1),
        "post_quant_conv.weight": (4, 4, 1, 1),
        "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),  # LDM up.0 = the highest resolution
        "decoder.up.3.block.2.conv1.weight": (512, 512, 3, 3),
        "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }
    assert {k: tuple(ldm[k].shape) for k in spot} == spot
    assert not any(k.startswith("decoder.up.0.upsample") for k in ldm)
    assert ckpt.infer_autoencoder_config(ldm) == ckpt.VAE_CONFIG
    assert set(ckpt.convert_autoencoder_state_dict(ldm)) == set(vae.state_dict())

    with torch.device("meta"):
        decoder = UniDiffuserTextDecoder(**ckpt.TEXT_DECODER_CONFIG)
    official = ckpt.caption_decoder_to_official_state_dict(decoder.state_dict())
    assert all(k.startswith("module.") for k in official)
    assert tuple(official["module.encode_prefix.weight"].shape) == (64, 768)
    assert tuple(official["module.decode_prefix.weight"].shape) == (768, 64)
    assert tuple(official["module.gpt.transformer.wte.weight"].shape) == (50258, 768)
    assert tuple(official["module.gpt.lm_head.weight"].shape) == (50258, 768)
    assert tuple(official["module.gpt.transformer.h.11.attn.bias"].shape) == (1, 1, 1024, 1024)
    assert not any(".h.12." in k for k in official)
    assert list(official)[-4:] == [f"module.{p}_prefix.{w}" for p in ("encode", "decode") for w in ("weight", "bias")]


def test_full_size_uvit_map_is_written_once_and_read_both_ways() -> None:
    """One table from the model's keys: each block's ``qkv`` fuses ``to_q, to_k, to_v`` in row order, the only copies
    are :data:`UNUSED_DIFFUSERS_KEYS`, and the key functions of both directions agree with it."""
    from diffusers import UniDiffuserModel

    with torch.device("meta"):
        model = UniDiffuserModel(**ckpt.UVIT_V1_CONFIG)
    table = ckpt.uvit_key_map(model.state_dict())
    blocks = {f"in_blocks.{i}": f"transformer.transformer_in_blocks.{i}" for i in range(BLOCKS)}
    blocks |= {"mid_block": "transformer.transformer_mid_block"}
    blocks |= {f"out_blocks.{i}": f"transformer.transformer_out_blocks.{i}.block" for i in range(BLOCKS)}
    assert {official: keys for official, keys in table.groups.items() if table.split_count(official) > 1} == {
        f"{block}.attn.qkv.weight": tuple(f"{prefix}.attn1.to_{n}.weight" for n in "qkv")
        for block, prefix in blocks.items()
    }
    assert {k for k, slot in table.slots.items() if slot.copy} == set(ckpt.UNUSED_DIFFUSERS_KEYS)
    assert set(table.groups) == set(ckpt.official_uvit_keys())
    for official in ckpt.official_uvit_keys():
        target = ckpt.uvit_key_to_diffusers(official)
        if table.split_count(official) > 1:
            assert target is None, official
        else:
            assert table.groups[official][0] == target and ckpt.diffusers_key_to_uvit(target) == official


# --------------------------------------------------------------------------------------------------------------------
# Tiny files: layout, round trips, loading
# --------------------------------------------------------------------------------------------------------------------


def test_tiny_files_have_the_official_layout(base_dir: Path) -> None:
    names = {p.relative_to(base_dir).as_posix() for p in base_dir.rglob("*") if p.is_file()}
    assert {"uvit_v1.pth", "autoencoder_kl.pth", "caption_decoder.pth"} <= names
    gpt2 = {"config.json", "generation_config.json", "merges.txt", "pytorch_model.bin", "tokenizer.json", "vocab.json"}
    assert {f"gpt2/{n}" for n in gpt2} <= names
    assert {"clip-vit-large-patch14/config.json", "clip-vit-large-patch14/model.safetensors"} <= names

    uvit = load(base_dir / ckpt.UVIT_FILE)
    assert list(uvit) == ckpt.official_uvit_keys()  # every official key name, official order, nothing else
    assert tuple(uvit["pos_embed"].shape) == (1, 1 + 1 + 77 + 1 + 16, tiny.TINY_UVIT_WIDTH)
    assert not torch.equal(uvit["pos_embed_token"], torch.zeros_like(uvit["pos_embed_token"]))
    caption = load(base_dir / ckpt.CAPTION_DECODER_FILE)
    assert all(k.startswith("module.") for k in caption)
    assert caption["module.gpt.transformer.h.0.attn.bias"].dtype == torch.uint8
    assert caption["module.gpt.transformer.h.0.attn.masked_bias"].item() == -1e4
    assert torch.equal(caption["module.gpt.lm_head.weight"], caption["module.gpt.transformer.wte.weight"])


#: each official file with its converter and the converter back
ROUND_TRIPS = [
    (ckpt.UVIT_FILE, ckpt.convert_uvit_state_dict, ckpt.uvit_to_official_state_dict),
    (ckpt.AUTOENCODER_FILE, ckpt.convert_autoencoder_state_dict, ckpt.autoencoder_to_official_state_dict),
    (ckpt.CAPTION_DECODER_FILE, ckpt.convert_caption_decoder_state_dict, ckpt.caption_decoder_to_official_state_dict),
]


@pytest.mark.parametrize(("file", "forward", "backward"), ROUND_TRIPS)
def test_official_to_diffusers_to_official_is_exact(base_dir: Path, file: str, forward, backward) -> None:
    official = load(base_dir / file)
    again = backward(forward(official))
    assert list(again) == list(official)
    for key, value in official.items():
        assert again[key].dtype == value.dtype and torch.equal(again[key], value), key


@pytest.mark.parametrize(("file", "forward", "backward"), ROUND_TRIPS)
def test_diffusers_to_official_to_diffusers_is_exact(base_dir: Path, file: str, forward, backward) -> None:
    model = forward(load(base_dir / file))
    again = forward(backward(model))
    assert again.keys() == model.keys()
    for key, value in model.items():
        assert again[key].dtype == value.dtype and torch.equal(again[key], value), key


def test_load_tiny_files(base_dir: Path) -> None:
    from transformers import CLIPTextModel, CLIPTokenizer, GPT2LMHeadModel

    uvit = ckpt.load_uvit(base_dir / ckpt.UVIT_FILE)
    assert {k: uvit.config[k] for k in tiny.tiny_uvit_config()} == tiny.tiny_uvit_config()
    reference = tiny.tiny_uvit(3).state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in uvit.state_dict().items())
    assert not uvit.training

    vae = ckpt.load_autoencoder(base_dir / ckpt.AUTOENCODER_FILE, dtype=torch.float64)
    assert vae.dtype == torch.float64 and vae.config.scaling_factor == 0.18215
    assert list(vae.config.block_out_channels) == tiny.tiny_vae_config()["block_out_channels"]
    with torch.no_grad():
        assert vae.decode(torch.randn(1, 4, 8, 8, dtype=torch.float64)).sample.shape == (1, 3, 64, 64)

    decoder = ckpt.load_text_decoder(base_dir / ckpt.CAPTION_DECODER_FILE, base_dir / ckpt.GPT2_DIR)
    assert decoder.transformer.lm_head.weight is decoder.transformer.transformer.wte.weight
    assert decoder.transformer.config.activation_function == "gelu_new"
    tokenizer = ckpt.load_gpt2_tokenizer(base_dir / ckpt.GPT2_DIR)
    assert len(tokenizer) == decoder.config.vocab_size  # resize_token_embeddings(len(tokenizer)) in the official code
    assert tokenizer.eos_token == "<|EOS|>" and tokenizer.eos_token_id == len(tokenizer) - 1
    ids = tokenizer("a photo of a man wearing glasses").input_ids
    assert tokenizer.decode(ids) == "a photo of a man wearing glasses" and len(ids) == 7
    gpt2 = GPT2LMHeadModel.from_pretrained(base_dir / ckpt.GPT2_DIR)
    assert torch.equal(gpt2.transformer.h[1].mlp.c_fc.weight, decoder.transformer.transformer.h[1].mlp.c_fc.weight)

    # The text path: CLIP-L-layout text tower (77 x width) -> encode_prefix -> the U-ViT's text width.
    clip_dir = base_dir / ckpt.CLIP_TEXT_DIR
    clip_tokens = CLIPTokenizer.from_pretrained(clip_dir)(
        ["a photo of a man"], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    )
    text_encoder = CLIPTextModel.from_pretrained(clip_dir).eval()
    with torch.no_grad():
        hidden = text_encoder(clip_tokens.input_ids).last_hidden_state
        encoded = decoder.encode(hidden)
    assert hidden.shape == (1, 77, tiny.TINY_CLIP_WIDTH)
    assert encoded.shape == (1, 77, uvit.config.text_dim)


# --------------------------------------------------------------------------------------------------------------------
# Strictness
# --------------------------------------------------------------------------------------------------------------------


def test_uvit_conversion_names_bad_keys(base_dir: Path) -> None:
    official = load(base_dir / ckpt.UVIT_FILE)
    config = ckpt.infer_uvit_config(official)

    missing = dict(official)
    del missing["out_blocks.3.skip_linear.bias"]
    with pytest.raises(ValueError, match=r"missing keys: transformer\.transformer_out_blocks\.3\.skip\.skip_linear"):
        ckpt.convert_uvit_state_dict(missing, config)

    extra = dict(official) | {
        "in_blocks.0.attn.qkv.bias": torch.zeros(3 * tiny.TINY_UVIT_WIDTH),
        "time_img_embed.0.weight": torch.zeros(1),
    }
    with pytest.raises(
        ValueError, match=r"unexpected keys .*in_blocks\.0\.attn\.qkv\.bias, time_img_embed\.0\.weight"
    ):
        ckpt.convert_uvit_state_dict(extra, config)

    width = tiny.TINY_UVIT_WIDTH
    wrong = dict(official) | {"text_out.weight": torch.zeros(8, width)}
    with pytest.raises(ValueError, match=rf"shape mismatches .*text_out\.weight \(8, {width}\) != \(16, {width}\)"):
        ckpt.convert_uvit_state_dict(wrong, config)

    from diffusers import UniDiffuserModel

    narrow_config = tiny.tiny_uvit_config(num_layers=2, num_attention_heads=2, attention_head_dim=48)
    with torch.device("meta"):  # width 96: the head count cannot be read from shapes, nor assumed (96 / 64)
        narrow = UniDiffuserModel(**narrow_config)
    narrow_official = ckpt.uvit_to_official_state_dict(narrow.state_dict())
    with pytest.raises(ValueError, match="width 96 is not a multiple of 64; pass num_attention_heads"):
        ckpt.infer_uvit_config(narrow_official)
    assert ckpt.infer_uvit_config(narrow_official, num_attention_heads=2) == narrow_config
    assert ckpt.infer_uvit_config(official, num_attention_heads=4)["attention_head_dim"] == width // 4

    with pytest.raises(ValueError, match="keys without an official name: bogus"):
        ckpt.uvit_to_official_state_dict({"bogus": torch.zeros(1)})


def test_load_errors_name_the_file(base_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelFilesError, match="uvit_v1.pth: U-ViT state dict not found"):
        ckpt.load_uvit(tmp_path / "uvit_v1.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelFilesError, match="junk.pth: cannot be read"):
        ckpt.load_autoencoder(tmp_path / "junk.pth")

    official = load(base_dir / ckpt.UVIT_FILE)
    del official["mid_block.norm3.weight"]
    torch.save(official, tmp_path / "uvit_v1.pth")
    with pytest.raises(ValueError, match=r"uvit_v1\.pth: U-ViT checkpoint: missing keys: .*mid_block\.norm3\.weight"):
        ckpt.load_uvit(tmp_path / "uvit_v1.pth")


def test_autoencoder_conversion_names_bad_keys(base_dir: Path) -> None:
    official = load(base_dir / ckpt.AUTOENCODER_FILE)
    # diffusers' converter silently skips keys it does not know; the strict check must not
    extra = dict(official) | {
        "encoder.down.0.attn.0.q.weight": torch.zeros(32, 32, 1, 1),
        "loss.logvar": torch.zeros(()),
    }
    with pytest.raises(ValueError, match=r"unexpected keys .*encoder\.down\.0\.attn\.0\.q\.weight, loss\.logvar"):
        ckpt.convert_autoencoder_state_dict(extra)
    missing = dict(official)
    del missing["decoder.up.0.block.0.nin_shortcut.bias"]
    with pytest.raises(ValueError, match=r"missing keys: decoder\.up_blocks\.3\.resnets\.0\.conv_shortcut\.bias"):
        ckpt.convert_autoencoder_state_dict(missing)


def test_caption_decoder_conversion_names_bad_keys(base_dir: Path) -> None:
    official = load(base_dir / ckpt.CAPTION_DECODER_FILE)
    converted = ckpt.convert_caption_decoder_state_dict(official)
    # 'clip.*' entries are tolerated (dropped) as by the official loader; mask buffers dropped
    assert (
        converted.keys() == ckpt.convert_caption_decoder_state_dict(official | {"module.clip.w": torch.ones(1)}).keys()
    )
    assert not any(re.search(r"\.attn\.(bias|masked_bias)$", k) for k in converted)

    with pytest.raises(ValueError, match="without the 'module.' prefix.*: gpt.lm_head.weight"):
        ckpt.convert_caption_decoder_state_dict(official | {"gpt.lm_head.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unexpected keys .*module\.something\.weight"):
        ckpt.convert_caption_decoder_state_dict(official | {"module.something.weight": torch.zeros(1)})
    untied = official | {"module.gpt.lm_head.weight": official["module.gpt.lm_head.weight"] + 1}
    with pytest.raises(ValueError, match="differs from the tied"):
        ckpt.convert_caption_decoder_state_dict(untied)
    bool_mask = torch.ones(256, 256, dtype=torch.bool).tril()[None, None]  # newer transformers' dtype: accepted
    assert ckpt.convert_caption_decoder_state_dict(official | {"module.gpt.transformer.h.1.attn.bias": bool_mask})
    mask = official | {"module.gpt.transformer.h.1.attn.bias": torch.ones(1, 1, 256, 256, dtype=torch.bool)}
    with pytest.raises(ValueError, match=r"h\.1\.attn\.bias is not GPT-2's constant causal-mask buffer"):
        ckpt.convert_caption_decoder_state_dict(mask)


# --------------------------------------------------------------------------------------------------------------------
# Parity with the official U-ViT forward
# --------------------------------------------------------------------------------------------------------------------


def official_uvit_forward(sd, img, clip_img, text, t_img, t_text, data_type, num_heads):
    """``UViTCondToken.forward`` (libs/unidiffuser_v1.py), written out on the official-named tensors."""
    width = sd["pos_embed"].shape[-1]
    patch = sd["patch_embed.proj.weight"].shape[-1]
    channels = sd["patch_embed.proj.weight"].shape[1]

    def linear(x, name, bias=True):
        return F.linear(x, sd[f"{name}.weight"], sd[f"{name}.bias"] if bias else None)

    def layer_norm(x, name):
        return F.layer_norm(x, (width,), sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-5)

    def timestep_embedding(t):  # cos first, then sin; max_period 10000
        half = width // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def attention(x, name):
        batch, length, _ = x.shape
        qkv = F.linear(x, sd[f"{name}.qkv.weight"])  # 'B L (K H D) -> K B H L D'
        qkv = qkv.reshape(batch, length, 3, num_heads, width // num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        weights = ((q @ k.transpose(-2, -1)) * (width // num_heads) ** -0.5).softmax(dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(batch, length, width)
        return linear(out, f"{name}.proj")

    def block(x, name, skip=None):
        if skip is not None:
            x = linear(torch.cat([x, skip], dim=-1), f"{name}.skip_linear")
            x = layer_norm(x, f"{name}.norm1")
        x = layer_norm(x + attention(x, f"{name}.attn"), f"{name}.norm2")
        mlp = linear(F.gelu(linear(x, f"{name}.mlp.fc1")), f"{name}.mlp.fc2")
        return layer_norm(x + mlp, f"{name}.norm3")

    img_tokens = F.conv2d(img, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    img_tokens = img_tokens.flatten(2).transpose(1, 2)
    text_tokens = linear(text, "text_embed")
    x = torch.cat(
        [
            timestep_embedding(t_img)[:, None],
            timestep_embedding(t_text)[:, None],
            sd["token_embedding.weight"][data_type][:, None],
            text_tokens,
            linear(clip_img, "clip_img_embed"),
            img_tokens,
        ],
        dim=1,
    )
    pos = sd["pos_embed"]
    x = x + torch.cat([pos[:, :2], sd["pos_embed_token"], pos[:, 2:]], dim=1)
    depth = len({k.split(".")[1] for k in sd if k.startswith("in_blocks.")})
    skips = []
    for i in range(depth):
        x = block(x, f"in_blocks.{i}")
        skips.append(x)
    x = block(x, "mid_block")
    for i in range(depth):
        x = block(x, f"out_blocks.{i}", skips.pop())
    x = layer_norm(x, "norm")
    n_text, n_img = text_tokens.shape[1], img_tokens.shape[1]
    *_, text_out, clip_out, img_out = x.split((1, 1, 1, n_text, 1, n_img), dim=1)
    img_out = linear(img_out, "decoder_pred")  # 'B (h w) (p1 p2 C) -> B C (h p1) (w p2)'
    side = int(n_img**0.5)
    img_out = img_out.reshape(-1, side, side, patch, patch, channels).permute(0, 5, 1, 3, 2, 4)
    img_out = img_out.reshape(-1, channels, side * patch, side * patch)
    return img_out, linear(clip_out, "clip_img_out"), linear(text_out, "text_out")


def test_uvit_forward_matches_the_official_forward(base_dir: Path) -> None:
    official = load(base_dir / ckpt.UVIT_FILE)
    model = ckpt.load_uvit(base_dir / ckpt.UVIT_FILE)
    config = model.config
    generator = torch.Generator().manual_seed(0)
    img = torch.randn(2, 4, 8, 8, generator=generator)
    clip_img = torch.randn(2, 1, config.clip_img_dim, generator=generator)
    text = torch.randn(2, 77, config.text_dim, generator=generator)
    t_img, t_text = torch.tensor([981, 37]), torch.tensor([0, 1000])
    data_type = torch.tensor([1, 0])
    with torch.no_grad():
        heads = config.num_attention_heads
        expected = official_uvit_forward(official, img, clip_img, text, t_img, t_text, data_type, num_heads=heads)
        got = model(img, clip_img, text, timestep_img=t_img, timestep_text=t_text, data_type=data_type)
    for name, a, b in zip(("img", "clip_img", "text"), got, expected, strict=True):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    # the comparison can fail: heads and the data-type token both change the output
    with torch.no_grad():
        other_heads = official_uvit_forward(
            official, img, clip_img, text, t_img, t_text, data_type, num_heads=2 * heads
        )
        other_type = model(img, clip_img, text, timestep_img=t_img, timestep_text=t_text, data_type=1 - data_type)
    assert (other_heads[0] - expected[0]).abs().max() > 1e-3
    assert (other_type[0] - got[0]).abs().max() > 1e-3
