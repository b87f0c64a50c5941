"""FaceChain-FACT model pieces: full-size structure on meta, parity with step-by-step references, the base-model
guarantees of the adapter scale, ControlNet text-only processors, and strict loading of the official file layout."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import UNet2DConditionModel

from idfusion.methods import fact
from idfusion.testing.components import sd15_unet_config, tiny_controlnet, tiny_unet
from idfusion.testing.make_tiny import tiny_writers
from idfusion.testing.tiny_fact import (
    TINY_TRANSFACE_CONFIG,
    tiny_fact_adapter_state_dict,
    tiny_fact_unet_config,
)

FACE_WIDTH = TINY_TRANSFACE_CONFIG["embed_dim"]  # the tiny TransFace's token width (512 in the release)

# The 16 cross-attention sites of SD1.5 and their widths (spec §2.4).
SD15_SITES = {
    **{
        f"down_blocks.{i}.attentions.{j}.transformer_blocks.0": (320, 640, 1280)[i] for i in range(3) for j in range(2)
    },
    "mid_block.attentions.0.transformer_blocks.0": 1280,
    **{
        f"up_blocks.{i}.attentions.{j}.transformer_blocks.0": (1280, 640, 320)[i - 1]
        for i in (1, 2, 3)
        for j in range(3)
    },
}


def adapter_key_shapes(c: int, ctx: int = 768) -> dict[str, tuple[int, ...]]:
    """Spec §4.3, per site, without the optional relocated ``ln``."""
    return {
        "linear.weight": (c, ctx),
        "linear.bias": (c,),
        "attn.to_q.weight": (c, c),
        "attn.to_k.weight": (c, c),
        "attn.to_v.weight": (c, c),
        "attn.to_out.0.weight": (c, c),
        "attn.to_out.0.bias": (c,),
        "ff.net.0.proj.weight": (8 * c, c),
        "ff.net.0.proj.bias": (8 * c,),
        "ff.net.2.weight": (c, 4 * c),
        "ff.net.2.bias": (c,),
        "norm1.weight": (c,),
        "norm1.bias": (c,),
        "norm2.weight": (c,),
        "norm2.bias": (c,),
        "alpha_attn": (),
        "alpha_dense": (),
    }


# ------------------------------------------------------------------------------------------------------------------
# Full size on meta


def _load(state, unet):
    """Load a FACT checkpoint for ``unet`` and attach it: (resampler, processors by site, adapter, handle)."""
    adapter = fact.load_fact_adapter(state, unet)
    handle = fact.attach_face_adapter(unet, adapter)
    return adapter.resampler, handle.processors, adapter, handle


def test_full_size_adapter_sites_on_meta():
    with torch.device("meta"):
        unet = UNet2DConditionModel(**sd15_unet_config())
    before = set(unet.state_dict())
    adapter = fact.FactFaceAdapter.for_unet(unet)
    processors = fact.attach_face_adapter(unet, adapter).processors
    assert sorted(processors) == sorted(SD15_SITES)  # exactly the 16 sites
    assert set(unet.state_dict()) == before  # the UNet keeps its own keys, norm2 included
    official = {name: tuple(v.shape) for key, v in adapter.state_dict().items()
                for name in [fact.fact_adapter_key_map(adapter)[key]]}  # fmt: skip
    total = 0
    for site, width in SD15_SITES.items():
        expected = adapter_key_shapes(width)
        prefix = f"{site}.attn2.processor."
        got = {k[len(prefix) :]: shape for k, shape in official.items() if k.startswith(prefix)}
        assert got == expected | {"ln.weight": (width,), "ln.bias": (width,)}
        count = sum(p.numel() for n, p in processors[site].site.named_parameters() if not n.startswith("ln."))
        assert count == 16 * width**2 + 783 * width + 2
        total += count
    assert total == sum(16 * c**2 + 783 * c + 2 for c in SD15_SITES.values())
    assert round(total / 1e6, 1) == 208.0
    assert processors[next(iter(SD15_SITES))].site.attn.to_q.weight.is_meta


def test_full_size_resampler_on_meta():
    with torch.device("meta"):
        resampler = fact.FaceResampler()
    shapes = {k: tuple(v.shape) for k, v in resampler.state_dict().items()}
    assert shapes["latents"] == (1, 16, 1024)
    assert shapes["proj_in.weight"] == (1024, 512) and shapes["proj_out.weight"] == (768, 1024)
    for i in range(4):
        assert shapes[f"layers.{i}.0.to_q.weight"] == (768, 1024)
        assert shapes[f"layers.{i}.0.to_kv.weight"] == (1536, 1024)
        assert shapes[f"layers.{i}.0.to_out.weight"] == (1024, 768)
        assert shapes[f"layers.{i}.1.0.weight"] == (1024,)
        assert shapes[f"layers.{i}.1.1.weight"] == (4096, 1024)
        assert shapes[f"layers.{i}.1.3.weight"] == (1024, 4096)
    # from the §2.3 shapes
    layer = 2 * 2 * 1024 + 1024 * 768 + 1024 * 1536 + 768 * 1024 + 2 * 1024 + 2 * 1024 * 4096
    expected = 16 * 1024 + (512 * 1024 + 1024) + (1024 * 768 + 768) + 2 * 768 + 4 * layer
    assert sum(p.numel() for p in resampler.parameters()) == expected
    assert round(expected / 1e6, 2) == 47.49
    out = resampler(torch.empty(3, 144, 512, device="meta"))
    assert out.shape == (3, 16, 768)


def test_full_size_transface_on_meta():
    with torch.device("meta"):
        model = fact.TransFaceViT()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["patch_embed.proj.weight"] == (512, 3, 9, 9)
    assert shapes["pos_embed"] == (1, 144, 512)
    assert shapes["mask_token"] == (1, 1, 512)
    assert shapes["feature.0.weight"] == (512, 73728) and shapes["feature.2.weight"] == (512, 512)
    assert shapes["senet.0.weight"] == (144, 73728) and shapes["senet.2.weight"] == (144, 144)
    assert len(model.blocks) == 12
    assert shapes["blocks.11.attn.qkv.weight"] == (1536, 512) and "blocks.0.attn.qkv.bias" not in shapes
    assert shapes["blocks.0.mlp.fc1.weight"] == (2048, 512)
    assert fact.TransFaceViT.config_from_state_dict(model.state_dict()) == {
        "img_size": 112,
        "patch_size": 9,
        "embed_dim": 512,
        "depth": 12,
        "num_heads": 8,
        "mlp_ratio": 4.0,
        "num_features": 512,
    }
    tokens, embedding = model(torch.empty(2, 3, 112, 112, device="meta"), return_global=True)
    assert tokens.shape == (2, 144, 512) and embedding.shape == (2, 512)


# ------------------------------------------------------------------------------------------------------------------
# Parity with step-by-step references


def einsum_attention(q, k, v, heads):
    """The official processors' attention: heads folded into the batch, einsum, softmax, einsum."""
    b, n, c = q.shape
    d = c // heads
    q, k, v = (t.reshape(b, -1, heads, d).permute(0, 2, 1, 3).reshape(b * heads, -1, d) for t in (q, k, v))
    sim = torch.einsum("b i d, b j d -> b i j", q, k) * d**-0.5
    out = torch.einsum("b i j, b j d -> b i d", sim.softmax(dim=-1), v)
    return out.reshape(b, heads, n, d).permute(0, 2, 1, 3).reshape(b, n, c)


def layer_norm(x, weight, bias, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def linear(x, weight, bias=None):
    out = x @ weight.T
    return out if bias is None else out + bias


def reference_adapter(p, host, heads, x_in, context, n_face, scale):
    """Spec §2.4 written out: p = processor state dict, host = host attn2 state dict (+ ln = block norm2)."""
    text, face = context[:, :-n_face], context[:, -n_face:]
    f = linear(face, p["linear.weight"], p["linear.bias"])
    n = x_in.shape[1]
    h = layer_norm(torch.cat([x_in, f], dim=1), p["norm1.weight"], p["norm1.bias"])
    sa = einsum_attention(
        linear(h, p["attn.to_q.weight"]), linear(h, p["attn.to_k.weight"]), linear(h, p["attn.to_v.weight"]), heads
    )
    sa = linear(sa, p["attn.to_out.0.weight"], p["attn.to_out.0.bias"])
    x = x_in + scale * torch.tanh(p["alpha_attn"]) * sa[:, :n]
    h = layer_norm(x, p["norm2.weight"], p["norm2.bias"])
    proj = linear(h, p["ff.net.0.proj.weight"], p["ff.net.0.proj.bias"])
    a, gate = proj[..., : proj.shape[-1] // 2], proj[..., proj.shape[-1] // 2 :]
    ff = linear(a * 0.5 * gate * (1 + torch.erf(gate / 2**0.5)), p["ff.net.2.weight"], p["ff.net.2.bias"])
    x = x + scale * torch.tanh(p["alpha_dense"]) * ff
    h = layer_norm(x, p["ln.weight"], p["ln.bias"])
    y = einsum_attention(
        linear(h, host["to_q.weight"]), linear(text, host["to_k.weight"]), linear(text, host["to_v.weight"]), heads
    )
    y = linear(y, host["to_out.0.weight"], host["to_out.0.bias"])
    return y + x - x_in


@pytest.fixture
def tiny_adapted_unet():
    """A tiny 16-site UNet with the tiny checkpoint's adapters (non-zero gates) loaded, and that checkpoint."""
    unet = tiny_unet(seed=1, **tiny_fact_unet_config()).eval()
    base = copy.deepcopy(unet)
    state = tiny_fact_adapter_state_dict(unet, seed=3)
    resampler, processors, _, handle = _load(state, unet)
    return base, unet, resampler, processors, state, handle


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_adapter_processor_matches_reference(tiny_adapted_unet, scale):
    _, unet, _, processors, _, _ = tiny_adapted_unet
    torch.manual_seed(0)
    for site in ("down_blocks.1.attentions.0.transformer_blocks.0", "up_blocks.1.attentions.2.transformer_blocks.0"):
        block = unet.get_submodule(site)
        processor = processors[site]
        processor.scale = scale
        processor.num_face_tokens = 32  # two photos
        width = block.attn2.to_q.in_features
        x = torch.randn(2, 20, width)
        context = torch.randn(2, 77 + 32, 32)
        with torch.no_grad():  # as the block calls it: norm2 (whose hook hands the processor x), then attn2
            got = block.attn2(block.norm2(x), encoder_hidden_states=context)
        p = {k: v for k, v in processor.site.state_dict().items()}
        host = dict(block.attn2.state_dict())
        want = reference_adapter(p, host, block.attn2.heads, x, context, 32, scale)
        assert float(torch.tanh(p["alpha_attn"]).abs()) > 0.1 and float(torch.tanh(p["alpha_dense"]).abs()) > 0.1
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_block_with_adapter_matches_reference_order(tiny_adapted_unet):
    """x + attn1(norm1 x) → adapter → + cross-attention(ln x) → + ff(norm3 x) (spec §2.4 order)."""
    _, unet, _, processors, _, _ = tiny_adapted_unet
    site = "mid_block.attentions.0.transformer_blocks.0"
    block = unet.get_submodule(site)
    torch.manual_seed(1)
    x = torch.randn(1, 6, block.attn1.to_q.in_features)
    context = torch.randn(1, 77 + 16, 32)
    with torch.no_grad():
        got = block(x, encoder_hidden_states=context)
        x1 = x + block.attn1(block.norm1(x))
        p = processors[site].site.state_dict()
        host = dict(block.attn2.state_dict())
        x2 = x1 + reference_adapter(p, host, block.attn2.heads, x1, context, 16, 1.0)
        want = x2 + block.ff(block.norm3(x2))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def reference_resampler(s, tokens, heads):
    latents = s["latents"].repeat(tokens.shape[0], 1, 1)
    x = linear(tokens, s["proj_in.weight"], s["proj_in.bias"])
    depth = 1 + max(int(k.split(".")[1]) for k in s if k.startswith("layers."))
    for i in range(depth):
        a = f"layers.{i}.0."
        xn = layer_norm(x, s[a + "norm1.weight"], s[a + "norm1.bias"])
        ln = layer_norm(latents, s[a + "norm2.weight"], s[a + "norm2.bias"])
        b, n, _ = ln.shape
        q = linear(ln, s[a + "to_q.weight"])
        k, v = linear(torch.cat([xn, ln], dim=1), s[a + "to_kv.weight"]).chunk(2, dim=-1)
        d = q.shape[-1] // heads
        q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
        scale = 1 / d**0.25  # the official split scaling
        weight = torch.softmax((q * scale) @ (k * scale).transpose(-2, -1), dim=-1)
        out = (weight @ v).transpose(1, 2).reshape(b, n, -1)
        latents = latents + linear(out, s[a + "to_out.weight"])
        f = f"layers.{i}.1."
        h = layer_norm(latents, s[f + "0.weight"], s[f + "0.bias"])
        h = linear(h, s[f + "1.weight"])
        h = 0.5 * h * (1 + torch.erf(h / 2**0.5))
        latents = latents + linear(h, s[f + "3.weight"])
    out = linear(latents, s["proj_out.weight"], s["proj_out.bias"])
    return layer_norm(out, s["norm_out.weight"], s["norm_out.bias"])


def test_resampler_matches_reference(tiny_adapted_unet):
    _, _, resampler, _, state, _ = tiny_adapted_unet
    s = {k[len("local_fac_prj.") :]: v for k, v in state.items() if k.startswith("local_fac_prj.")}
    torch.manual_seed(2)
    tokens = torch.randn(3, 144, FACE_WIDTH)
    with torch.no_grad():
        got = resampler(tokens)
        assert got.shape == (3, 16, 32)
        torch.testing.assert_close(got, reference_resampler(s, tokens, heads=12), rtol=0, atol=1e-5)
        # k photos → one sequence of 16k tokens, photo by photo
        flat = resampler.identity_tokens(tokens)
        assert flat.shape == (1, 48, 32)
        torch.testing.assert_close(flat[0, 16:32], got[1], rtol=0, atol=0)
        # the null face is the resampler applied to zero TransFace tokens
        torch.testing.assert_close(
            resampler.unconditional(2),
            reference_resampler(s, torch.zeros(2, 144, FACE_WIDTH), 12).reshape(1, 32, 32),
        )


def test_transface_global_head_matches_reference():
    from idfusion.testing.tiny_fact import tiny_transface

    model = tiny_transface(seed=5)
    with torch.no_grad():
        for block in model.blocks:
            block.mlp.fc1.weight.mul_(30)  # hidden activations beyond 6, so the ReLU6 cap matters
    s = model.state_dict()
    torch.manual_seed(3)
    pixels = fact.preprocess_transface(torch.randint(0, 256, (2, 112, 112, 3), dtype=torch.uint8))
    assert pixels.shape == (2, 3, 112, 112) and pixels.min() >= -1 and pixels.max() <= 1
    with torch.no_grad():
        tokens, embedding = model(pixels, return_global=True)
        # trunk, step by step (timm-style ViT with ReLU6 MLPs, 8 heads, no qkv bias)
        x = torch.nn.functional.conv2d(pixels, s["patch_embed.proj.weight"], s["patch_embed.proj.bias"], stride=9)
        x = x.flatten(2).transpose(1, 2) + s["pos_embed"]
        hidden_max = 0.0
        for i in range(2):
            b = f"blocks.{i}."
            h = layer_norm(x, s[b + "norm1.weight"], s[b + "norm1.bias"])
            q, k, v = linear(h, s[b + "attn.qkv.weight"]).chunk(3, dim=-1)
            heads = TINY_TRANSFACE_CONFIG["num_heads"]
            x = x + linear(einsum_attention(q, k, v, heads), s[b + "attn.proj.weight"], s[b + "attn.proj.bias"])
            h = layer_norm(x, s[b + "norm2.weight"], s[b + "norm2.bias"])
            h = linear(h, s[b + "mlp.fc1.weight"], s[b + "mlp.fc1.bias"])
            hidden_max = max(hidden_max, float(h.max()))
            h = h.clamp(0, 6)
            x = x + linear(h, s[b + "mlp.fc2.weight"], s[b + "mlp.fc2.bias"])
        assert hidden_max > 6
        want_tokens = layer_norm(x, s["norm.weight"], s["norm.bias"])
        flat = want_tokens.reshape(2, -1)
        w = torch.sigmoid(linear(linear(flat, s["senet.0.weight"]).clamp_min(0), s["senet.2.weight"]))
        e = linear((w.unsqueeze(-1) * want_tokens).reshape(2, -1), s["feature.0.weight"])
        e = (e - s["feature.1.running_mean"]) / torch.sqrt(s["feature.1.running_var"] + 2e-5) * s[
            "feature.1.weight"
        ] + s["feature.1.bias"]
        e = linear(e, s["feature.2.weight"])
        e = (e - s["feature.3.running_mean"]) / torch.sqrt(s["feature.3.running_var"] + 2e-5) * s[
            "feature.3.weight"
        ] + s["feature.3.bias"]
    torch.testing.assert_close(tokens, want_tokens, rtol=0, atol=1e-5)
    torch.testing.assert_close(embedding, e, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------------------------
# Scale 0 = base model; detach restores it


def test_scale_zero_is_base_model_and_detach_restores_it(tiny_adapted_unet):
    base, unet, resampler, _, _, handle = tiny_adapted_unet
    torch.manual_seed(4)
    sample, text = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    with torch.no_grad():
        face = resampler(torch.randn(1, 144, FACE_WIDTH)).expand(2, -1, -1)
        context = torch.cat([text, face], dim=1)
        want = base(sample, 7, text).sample
        fact.set_face_adapter_scale(unet, 0.0)
        assert torch.equal(unet(sample, 7, context).sample, want)
        fact.set_face_adapter_scale(unet, 0.5)
        changed = unet(sample, 7, context).sample
        assert (changed - want).abs().max() > 1e-3
        handle.remove()
        assert not any(isinstance(p, fact.FaceAdapterAttnProcessor) for p in unet.attn_processors.values())
        assert unet.state_dict().keys() == base.state_dict().keys()
        assert torch.equal(unet(sample, 7, text).sample, want)
        # attaching again after a detach works
        assert len(fact.attach_face_adapter(unet, fact.FactFaceAdapter.for_unet(unet)).processors) == 16


def test_attach_detach_round_trip_on_fresh_unet():
    unet = tiny_unet(seed=2).eval()
    reference = copy.deepcopy(unet)
    adapter = fact.FactFaceAdapter.for_unet(unet)
    handle = fact.attach_face_adapter(unet, adapter)
    assert len(handle.processors) == 10  # tiny_unet has 1 layer per level: 3 + 1 + 6 sites
    assert all(isinstance(b.norm2, torch.nn.LayerNorm) for b in fact.adapter_sites(unet).values())  # unchanged
    with pytest.raises(ValueError, match="already attached"):
        fact.attach_face_adapter(unet, adapter)
    handle.remove()
    torch.manual_seed(5)
    sample, text = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    with torch.no_grad():
        assert torch.equal(unet(sample, 3, text).sample, reference(sample, 3, text).sample)


# ------------------------------------------------------------------------------------------------------------------
# ControlNet


def test_controlnet_text_only_processors_ignore_face_tokens():
    unet = tiny_unet(seed=6)
    controlnet = tiny_controlnet(unet, seed=6)
    torch.manual_seed(6)
    sample, text, face = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32), torch.randn(2, 32, 32)
    cond = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        down_want, mid_want = controlnet(sample, 5, text, controlnet_cond=cond, return_dict=False)
        fact.attach_text_only_processors(controlnet, num_face_tokens=16)
        fact.set_num_face_tokens(controlnet, num_photos=2)
        down_got, mid_got = controlnet(sample, 5, torch.cat([text, face], 1), controlnet_cond=cond, return_dict=False)
        changed_face = controlnet(sample, 5, torch.cat([text, face * 3], 1), controlnet_cond=cond, return_dict=False)
    assert all(torch.equal(a, b) for a, b in zip(down_got, down_want, strict=True))
    assert torch.equal(mid_got, mid_want)
    assert torch.equal(changed_face[1], mid_want)
    assert all(isinstance(p, fact.TextOnlyControlNetProcessor) for p in controlnet.attn_processors.values())


# ------------------------------------------------------------------------------------------------------------------
# The official file layout


@pytest.fixture(scope="module")
def fact_release(tiny_release):
    return tiny_release("fact")


def test_make_tiny_fact_layout(fact_release):
    assert "fact" in tiny_writers()
    for name in (*fact.ADAPTER_FILES.values(), fact.TRANSFACE_FILE, "antelopev2/scrfd_10g_bnkps.onnx"):
        assert (fact_release / name).is_file(), name
    assert (fact_release / "stable-diffusion-v1-5" / "model_index.json").is_file()
    raw = torch.load(fact_release / fact.ADAPTER_FILES["majicmix"], weights_only=True)
    processor_keys = [k for k in raw if "processor" in k]
    assert len(processor_keys) == 16 * 17 and not any(".processor.ln." in k for k in raw)
    resampler_keys = [k for k in raw if k.startswith("local_fac_prj.")]
    assert len(resampler_keys) + len(processor_keys) == len(raw)


def test_tiny_release_loads_strictly_and_changes_output(fact_release):
    unet = UNet2DConditionModel.from_pretrained(fact_release / "stable-diffusion-v1-5" / "unet").eval()
    base = copy.deepcopy(unet)
    path = fact_release / fact.ADAPTER_FILES["film"]
    raw = torch.load(path, weights_only=True)
    resampler, processors, adapter, _ = _load(path, unet)
    assert sorted(processors) == sorted(SD15_SITES)
    # every key landed where its name says
    own = {fact.fact_adapter_key_map(adapter)[k]: v for k, v in adapter.state_dict().items()}
    for key, value in raw.items():
        assert torch.equal(own[key], value), key
        if key.startswith("local_fac_prj."):
            assert torch.equal(resampler.state_dict()[key[len("local_fac_prj.") :]], value), key
    # the relocated norm2 keeps the base model's values
    site = "up_blocks.3.attentions.1.transformer_blocks.0"
    assert torch.equal(processors[site].site.ln.weight, base.get_submodule(site).norm2.weight)
    encoder = fact.load_transface(fact_release / fact.TRANSFACE_FILE)
    torch.manual_seed(7)
    with torch.no_grad():
        tokens = encoder(fact.preprocess_transface(torch.randint(0, 256, (1, 112, 112, 3), dtype=torch.uint8)))
        face = resampler.identity_tokens(tokens)
        sample, text = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
        out = unet(sample, 9, torch.cat([text, face], 1)).sample
        assert (out - base(sample, 9, text).sample).abs().max() > 1e-3


def test_planted_values_land_in_the_right_parameters():
    unet = tiny_unet(seed=8, **tiny_fact_unet_config()).eval()
    state = tiny_fact_adapter_state_dict(unet, seed=9, with_ln=True)
    site = "down_blocks.2.attentions.1.transformer_blocks.0"
    prefix = f"{site}.attn2.processor."
    state[prefix + "alpha_dense"] = torch.tensor(0.625)
    width = unet.get_submodule(site).norm2.weight.numel()  # the site's width
    state[prefix + "ff.net.2.bias"] = torch.arange(float(width))
    state[prefix + "ln.weight"] = torch.full((width,), 1.5)
    state["local_fac_prj.layers.1.1.3.weight"] = torch.full((48, 192), 0.25)
    norm2 = unet.get_submodule(site).norm2.weight.clone()
    resampler, processors, _, handle = _load(state, unet)
    processor = processors[site].site
    assert processor.alpha_dense.item() == 0.625
    assert torch.equal(processor.ff.net[2].bias, torch.arange(float(width)))
    assert torch.equal(processor.ln.weight, torch.full((width,), 1.5))
    assert torch.equal(resampler.layers[1][1][3].weight, torch.full((48, 192), 0.25))
    # other sites are untouched by the planting
    other = processors["down_blocks.2.attentions.0.transformer_blocks.0"].site
    assert other.alpha_dense.item() != 0.625
    handle.remove()
    # the checkpoint's ln lives in the adapter: the base UNet's own norm2 was never written
    assert torch.equal(unet.get_submodule(site).norm2.weight, norm2)


@pytest.mark.parametrize(
    ("edit", "name"),
    [
        ("extra", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.gamma"),
        ("extra", "local_fac_prj.pos_emb"),
        ("extra", "text_encoder.bogus"),
        ("missing", "up_blocks.2.attentions.0.transformer_blocks.0.attn2.processor.alpha_attn"),
        ("missing", "local_fac_prj.layers.1.0.to_kv.weight"),
        ("shape", "mid_block.attentions.0.transformer_blocks.0.attn2.processor.linear.weight"),
    ],
)
def test_bad_checkpoint_raises_naming_the_key(edit, name):
    unet = tiny_unet(seed=10, **tiny_fact_unet_config()).eval()
    reference = copy.deepcopy(unet)
    state = tiny_fact_adapter_state_dict(unet, seed=11)
    if edit == "extra":
        state[name] = torch.zeros(3)
    elif edit == "missing":
        del state[name]
    else:
        state[name] = torch.zeros(3, 3)
    with pytest.raises(ValueError) as info:
        fact.load_fact_adapter(state, unet)
    key = name.removeprefix("local_fac_prj.")  # resampler keys are named without the prefix
    assert key in str(info.value)
    # a failed load leaves the UNet as it was
    assert unet.state_dict().keys() == reference.state_dict().keys()


def test_transface_loads_strictly(tmp_path):
    from idfusion.testing.tiny_fact import tiny_transface

    state = tiny_transface(seed=12).state_dict()
    state["blocks.1.mlp.fc2.bias"] = torch.linspace(-1, 1, FACE_WIDTH)
    torch.save(state, tmp_path / fact.TRANSFACE_FILE)
    model = fact.load_transface(tmp_path / fact.TRANSFACE_FILE)
    assert not model.training
    assert torch.equal(model.blocks[1].mlp.fc2.bias, torch.linspace(-1, 1, FACE_WIDTH))
    torch.save(state | {"head.weight": torch.zeros(2)}, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match="head.weight"):
        fact.load_transface(tmp_path / "extra.pt")
    del state["senet.2.weight"]
    torch.save(state, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="senet.2.weight"):
        fact.load_transface(tmp_path / "missing.pt")


# ---- precision: TransFace and the resampler stay float32, as the release keeps them -----------------------------


def test_casts_keep_transface_and_the_resampler_float32_and_move_the_sites():
    from idfusion.testing.tiny_fact import TINY_RESAMPLER_CONFIG, tiny_transface

    encoder = tiny_transface(0)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    unet = tiny_unet(seed=1, **tiny_fact_unet_config())
    adapter = fact.FactFaceAdapter.for_unet(unet, resampler=TINY_RESAMPLER_CONFIG)
    resampler_before = {k: v.clone() for k, v in adapter.resampler.state_dict().items()}
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.to(dtype=torch.float16)):
        cast(encoder)
        cast(adapter)
        for key, value in encoder.state_dict().items():
            assert torch.equal(value, before[key]) and value.dtype == before[key].dtype, key
        for key, value in adapter.resampler.state_dict().items():
            assert torch.equal(value, resampler_before[key]), key
        assert {p.dtype for p in adapter.sites.parameters()} != {torch.float32}  # the sites do follow
    assert encoder.feature[1].num_batches_tracked.dtype == torch.long  # integer buffers are left alone
    tokens = fact.encode_face_tokens(encoder, adapter.resampler, torch.zeros(1, 112, 112, 3, dtype=torch.uint8))
    assert tokens.dtype == torch.float32


def _linear_output_dtypes(encoder, pixels):
    dtypes = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
        for m in encoder.modules()
        if isinstance(m, torch.nn.Linear)
    ]
    try:
        with torch.no_grad():
            out = encoder(pixels)
    finally:
        for hook in hooks:
            hook.remove()
    return out, set(dtypes)


def _crops():
    crops = torch.randint(0, 256, (2, 112, 112, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return fact.preprocess_transface(crops)


def test_transface_runs_in_float32_off_cuda():
    """The release wraps TransFace's qkv, projection and MLP in ``torch.cuda.amp.autocast(True)``; off CUDA that
    context does nothing, so everything is float32."""
    from idfusion.testing.tiny_fact import tiny_transface

    out, dtypes = _linear_output_dtypes(tiny_transface(0), _crops())
    assert out.dtype == torch.float32 and dtypes == {torch.float32}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the release's autocast applies on CUDA only")
def test_transface_autocasts_its_linear_layers_on_cuda():
    """On CUDA the linear layers run in float16 (the release's autocast), the attention softmax, residual stream and
    final LayerNorm in float32; the weights stay float32. ``autocast_dtype=None`` runs all of it in float32."""
    from idfusion.testing.tiny_fact import tiny_transface

    encoder = tiny_transface(0)
    cpu, _ = _linear_output_dtypes(encoder, _crops())
    encoder.cuda()
    gpu, dtypes = _linear_output_dtypes(encoder, _crops().cuda())
    assert gpu.dtype == torch.float32 and dtypes == {torch.float16}
    assert {p.dtype for p in encoder.parameters()} == {torch.float32}
    torch.testing.assert_close(gpu.cpu(), cpu, atol=3e-2, rtol=3e-2)
    encoder.autocast_dtype = None
    exact, dtypes = _linear_output_dtypes(encoder, _crops().cuda())
    assert dtypes == {torch.float32}
    torch.testing.assert_close(exact.cpu(), cpu, atol=1e-2, rtol=1e-2)  # cuDNN may use TF32 for the patch conv
