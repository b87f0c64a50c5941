"""FeedFace model pieces: the full-size key layout of ``feed-4800000.pt`` on meta, strict loading, the hooks on a
tiny diffusers ``UniDiffuserModel`` (base-model guarantees, image-token-only changes, skip connections), the
multiple-reference modes, the SD1.5 variant and the face crop."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from diffusers import UniDiffuserModel
from PIL import Image

from idfusion.images import load_image
from idfusion.methods import feedface as ff
from idfusion.testing.components import tiny_unet
from idfusion.testing.tiny_feedface_adapter import TINY_VISION_CONFIG, tiny_feed_adapter, write_feed_checkpoint

WIDTH = 32
# in 14 / mid 1 / out 14 (diffusers splits num_layers into num_layers // 2 in- and out-blocks): indices 0..13 exist
TINY_UVIT = {
    "text_dim": 8,
    "clip_img_dim": 16,
    "num_text_tokens": 77,
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "in_channels": 4,
    "out_channels": 4,
    "num_layers": 29,
    "sample_size": 8,
    "patch_size": 2,
    "use_data_type_embedding": True,
}
NUM_IMG = 16  # (8 / 2) ** 2
NUM_OTHER = 1 + 1 + 1 + 77 + 1


# ------------------------------------------------------------------------------------------------------------------
# Full size on meta


def official_key_shapes() -> dict[str, tuple[int, ...]]:
    """Spec §3.6: the 494 keys of ``feed-4800000.pt`` (without the stale position_ids) and their shapes."""
    v = "preprocess_module.clip_model.vision_model."
    shapes = {
        v + "embeddings.class_embedding": (768,),
        v + "embeddings.patch_embedding.weight": (768, 3, 32, 32),
        v + "embeddings.position_embedding.weight": (50, 768),
        v + "pre_layrnorm.weight": (768,),
        v + "pre_layrnorm.bias": (768,),
        v + "post_layernorm.weight": (768,),
        v + "post_layernorm.bias": (768,),
        "preprocess_module.project_layer.weight": (1536, 768),
    }
    for i in range(12):
        layer = f"{v}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{layer}self_attn.{proj}.weight"] = (768, 768)
            shapes[f"{layer}self_attn.{proj}.bias"] = (768,)
        for norm in ("layer_norm1", "layer_norm2"):
            shapes[f"{layer}{norm}.weight"] = (768,)
            shapes[f"{layer}{norm}.bias"] = (768,)
        shapes[f"{layer}mlp.fc1.weight"] = (3072, 768)
        shapes[f"{layer}mlp.fc1.bias"] = (3072,)
        shapes[f"{layer}mlp.fc2.weight"] = (768, 3072)
        shapes[f"{layer}mlp.fc2.bias"] = (768,)
    for i in range(14):
        b = f"blocks.{i}.blocks.0."
        for attn in ("attn1", "attn2"):
            for proj in ("to_q", "to_k", "to_v"):
                shapes[f"{b}{attn}.{proj}.weight"] = (1536, 1536)
            shapes[f"{b}{attn}.to_out.0.weight"] = (1536, 1536)
            shapes[f"{b}{attn}.to_out.0.bias"] = (1536,)
        shapes[f"{b}ff.net.0.proj.weight"] = (12288, 1536)
        shapes[f"{b}ff.net.0.proj.bias"] = (12288,)
        shapes[f"{b}ff.net.2.weight"] = (1536, 6144)
        shapes[f"{b}ff.net.2.bias"] = (1536,)
        for norm in ("norm1", "norm2", "norm3"):
            shapes[f"{b}{norm}.weight"] = (1536,)
            shapes[f"{b}{norm}.bias"] = (1536,)
        shapes[f"blocks.{i}.zero_linear.weight"] = (1536, 1536)
    return shapes


def test_full_size_keys_and_shapes_on_meta():
    with torch.device("meta"):
        adapter = ff.FeedAdapter()
    state = adapter.state_dict()
    expected = official_key_shapes()
    assert len(expected) == 494
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert ff.POSITION_IDS_KEY not in state
    assert len(adapter.blocks) == len(ff.UVIT_BLOCK_NAMES) == 14
    trainable = sum(p.numel() for p in adapter.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in adapter.parameters() if not p.requires_grad)
    assert trainable == 695_178_240  # 14 x 49,571,328 + 1536 x 768 (spec: ~695.2 M)
    assert round(frozen / 1e6, 1) == 87.5  # the CLIP ViT-B/32 vision tower
    assert adapter.blocks[0].blocks[0].attn1.heads == 64  # 64 heads x 24, as released
    assert adapter.multiplier == ff.DEFAULT_MULTIPLIER == 0.8
    # the release's file (meta tensors of the same keys plus the stale position_ids) passes the strict loader
    release = dict(state) | {ff.POSITION_IDS_KEY: torch.empty(1, 50, dtype=torch.long, device="meta")}
    loaded = ff.load_feed_adapter(release)
    assert loaded.dim == 1536 and loaded.blocks[0].blocks[0].attn1.heads == 64
    assert {k: tuple(v.shape) for k, v in loaded.state_dict().items()} == expected
    assert loaded.preprocess_module.clip_model.vision_model.embeddings.position_ids.tolist() == [list(range(50))]


def test_block_names_follow_the_release_order():
    assert ff.UVIT_BLOCK_NAMES[:7] == tuple(f"transformer.transformer_in_blocks.{i}" for i in range(0, 13, 2))
    assert ff.UVIT_BLOCK_NAMES[7:] == tuple(f"transformer.transformer_out_blocks.{i}.block" for i in range(0, 13, 2))
    with torch.device("meta"):
        unet = UniDiffuserModel(**(TINY_UVIT | {"num_layers": 31}))  # v1's 15 / 1 / 15 split
    modules = dict(unet.named_modules())
    assert all(type(modules[name]).__name__ == "UniDiffuserBlock" for name in ff.UVIT_BLOCK_NAMES)


# ------------------------------------------------------------------------------------------------------------------
# Strict loading


@pytest.mark.parametrize("with_position_ids", [True, False])
def test_load_official_layout_tolerates_only_position_ids(tmp_path, with_position_ids):
    path = write_feed_checkpoint(tmp_path / ff.FEED_FILE, seed=3, dim=WIDTH, with_position_ids=with_position_ids)
    raw = torch.load(path, weights_only=True)
    assert (ff.POSITION_IDS_KEY in raw) == with_position_ids
    adapter = ff.load_feed_adapter(path)
    assert adapter.dim == WIDTH and not adapter.training
    loaded = adapter.state_dict()
    assert set(loaded) == set(raw) - {ff.POSITION_IDS_KEY}
    assert all(torch.equal(loaded[k], raw[k]) for k in loaded)
    assert adapter.blocks[3].zero_linear.weight.abs().sum() > 0
    assert not any(p.requires_grad for p in adapter.preprocess_module.clip_model.parameters())
    assert adapter.preprocess_module.project_layer.weight.requires_grad
    faces = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():  # the rebuilt position_ids buffer works: same tokens as the adapter that was saved
        torch.testing.assert_close(adapter.encode_faces(faces), tiny_feed_adapter(3).encode_faces(faces))
    half = ff.load_feed_adapter(raw, dtype=torch.float16)
    assert half.blocks[0].zero_linear.weight.dtype == torch.float16


def test_strict_loading_names_bad_keys(tmp_path):
    state = torch.load(write_feed_checkpoint(tmp_path / ff.FEED_FILE, dim=WIDTH), weights_only=True)
    extra = state | {"blocks.0.extra.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"unexpected keys: blocks\.0\.extra\.weight"):
        ff.load_feed_adapter(extra)
    missing = {k: v for k, v in state.items() if k != "blocks.13.zero_linear.weight"}
    with pytest.raises(ValueError, match=r"missing keys: blocks\.13\.zero_linear\.weight"):
        ff.load_feed_adapter(missing)
    wrong = state | {"blocks.2.blocks.0.attn2.to_k.weight": torch.zeros(WIDTH, WIDTH + 1)}
    with pytest.raises(ValueError, match=r"shape mismatch: blocks\.2\.blocks\.0\.attn2\.to_k\.weight"):
        ff.load_feed_adapter(wrong)
    with pytest.raises(ValueError, match="not a FeedFace adapter"):
        ff.load_feed_adapter({"foo": torch.zeros(1)})


# ------------------------------------------------------------------------------------------------------------------
# Face encoder and multiple references


def test_face_encoder_uses_penultimate_hidden_states():
    adapter = tiny_feed_adapter(0)
    pixels = torch.rand(2, 3, 224, 224) * 2 - 1
    seen = {}
    layers = adapter.preprocess_module.clip_model.vision_model.encoder.layers
    hook = layers[-2].register_forward_hook(
        lambda m, a, out: seen.setdefault("x", out[0] if isinstance(out, tuple) else out)
    )
    with torch.no_grad():
        tokens = adapter.preprocess_module(pixels)
    hook.remove()
    assert tokens.shape == (2, ff.FACE_TOKENS, WIDTH)
    torch.testing.assert_close(tokens, adapter.preprocess_module.project_layer(seen["x"]), rtol=0, atol=0)
    assert not any(p.requires_grad for p in adapter.preprocess_module.clip_model.parameters())
    assert adapter.preprocess_module.project_layer.weight.requires_grad


def test_reference_modes():
    adapter = tiny_feed_adapter(1)
    faces = torch.rand(7, 3, 224, 224, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        each = adapter.preprocess_module(faces)  # (7, 50, D)
        cat_one, mean_one = adapter.encode_faces(faces[:1], "cat"), adapter.encode_faces(faces[:1], "mean")
        cat_all = adapter.encode_faces(faces, "cat")
        mean_two = adapter.encode_faces(faces[:2], "mean")
        first = adapter.encode_faces(faces, "first")
    assert torch.equal(cat_one, mean_one) and cat_one.shape == (1, 50, WIDTH)
    assert cat_all.shape == (1, 50 * ff.MAX_CAT_FACES, WIDTH)
    torch.testing.assert_close(cat_all, each[:5].reshape(1, -1, WIDTH))
    torch.testing.assert_close(cat_all[:, 50:100], each[1:2])
    torch.testing.assert_close(mean_two, (each[0:1] + each[1:2]) / 2)
    torch.testing.assert_close(first, each[:1])
    with pytest.raises(ValueError, match="unknown face mode"):
        adapter.encode_faces(faces, "sum")


# ------------------------------------------------------------------------------------------------------------------
# Hooks on a tiny U-ViT


@pytest.fixture(scope="module")
def uvit():
    torch.manual_seed(0)
    return UniDiffuserModel(**TINY_UVIT).eval()


@pytest.fixture(scope="module")
def faces():
    return torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(1)) * 2 - 1


def uvit_inputs(batch: int = 2, timestep_text: int = 0, seed: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "latent_image_embeds": torch.randn(batch, 4, 8, 8, generator=g),
        "image_embeds": torch.randn(batch, 1, 16, generator=g),
        "prompt_embeds": torch.randn(batch, 77, 8, generator=g),
        "timestep_img": 500,
        "timestep_text": timestep_text,
        "data_type": 1,
    }


def run(unet, **kwargs):
    with torch.no_grad():
        return unet(**(uvit_inputs() | kwargs))


def all_equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_multiplier_zero_is_the_base_model_and_detach_restores(uvit, faces):
    base = run(uvit)
    adapter = tiny_feed_adapter(2)
    with torch.no_grad():
        adapter.set_face_tokens(adapter.encode_faces(faces))
    handle = adapter.attach(uvit)
    try:
        adapter.set_multiplier(0.0)
        assert all_equal(run(uvit), base)
        adapter.set_multiplier(0.8)
        adapted = run(uvit)
        assert not torch.allclose(adapted[0], base[0], atol=1e-4)
        with pytest.raises(ValueError, match="already attached"):
            adapter.attach(uvit)
        with pytest.raises(ValueError, match="another FeedAdapter"):
            tiny_feed_adapter(3).attach(uvit)
    finally:
        handle.remove()
    assert all_equal(run(uvit), base)
    with adapter.attach(uvit):
        assert all_equal(run(uvit), adapted)
    assert all_equal(run(uvit), base)


def test_only_image_tokens_change_at_a_hooked_block(uvit, faces):
    adapter = tiny_feed_adapter(4)
    with torch.no_grad():
        adapter.set_face_tokens(adapter.encode_faces(faces))
    block = uvit.transformer.transformer_in_blocks[0]
    outs = []
    capture = block.register_forward_hook(lambda m, a, out: outs.append(out))  # before the adapter: sees the base
    try:
        with adapter.attach(uvit):
            late = block.register_forward_hook(lambda m, a, out: outs.append(out))  # after: sees the adapted
            try:
                run(uvit)
            finally:
                late.remove()
    finally:
        capture.remove()
    before, after = outs
    assert before.shape == after.shape == (2, NUM_OTHER + NUM_IMG, WIDTH)
    assert torch.equal(after[:, :NUM_OTHER], before[:, :NUM_OTHER])  # timesteps, data type, text, clip_img
    delta = adapter.blocks[0](before[:, -NUM_IMG:], adapter.face_tokens)
    torch.testing.assert_close(after[:, -NUM_IMG:], before[:, -NUM_IMG:] + 0.8 * delta)
    assert delta.abs().amax() > 1e-3
    assert not torch.equal(after[:, -NUM_IMG:], before[:, -NUM_IMG:])


def reference_transformer(unet, adapter, hidden, multiplier: float, *, adapted_skips: bool = True):
    """UTransformer2DModel's loop written out, with the adapter added after blocks in/out 0, 2, …, 12."""
    t = unet.transformer
    face = adapter.face_tokens

    def adapt(k, h):
        img = h[:, -NUM_IMG:]
        return torch.cat([h[:, :-NUM_IMG], img + multiplier * adapter.blocks[k](img, face)], dim=1)

    skips = []
    for i, block in enumerate(t.transformer_in_blocks):
        h = block(hidden)
        hidden = adapt(i // 2, h) if i % 2 == 0 and i <= 12 else h
        skips.append(hidden if adapted_skips else h)
    hidden = t.transformer_mid_block(hidden)
    for i, out_block in enumerate(t.transformer_out_blocks):
        hidden = out_block["block"](out_block["skip"](hidden, skips.pop()))
        if i % 2 == 0 and i <= 12:
            hidden = adapt(7 + i // 2, hidden)
    return t.norm_out(hidden)


def test_hooks_change_what_the_next_block_and_the_skips_see(uvit, faces):
    adapter = tiny_feed_adapter(5)
    with torch.no_grad():
        adapter.set_face_tokens(adapter.encode_faces(faces, "mean"))
    seen = {}

    def grab(module, args, kwargs, output):
        seen["in"], seen["out"] = args[0], output[0]

    hook = uvit.transformer.register_forward_hook(grab, with_kwargs=True)
    try:
        with adapter.attach(uvit):
            run(uvit)
    finally:
        hook.remove()
    with torch.no_grad():
        expected = reference_transformer(uvit, adapter, seen["in"], 0.8)
        stale_skips = reference_transformer(uvit, adapter, seen["in"], 0.8, adapted_skips=False)
    torch.testing.assert_close(seen["out"], expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(seen["out"], stale_skips, atol=1e-4)  # the skip connections carry the adaptation


def test_cat_with_one_face_equals_mean_with_one_face(uvit, faces):
    adapter = tiny_feed_adapter(6)
    results = []
    with adapter.attach(uvit):
        for mode in ("cat", "mean"):
            with torch.no_grad():
                adapter.set_face_tokens(adapter.encode_faces(faces[:1], mode))
            results.append(run(uvit))
    assert all_equal(*results)


def test_uncond_off_uses_the_adapter_in_the_conditional_branch_only(uvit, faces):
    base_cond, base_uncond = run(uvit), run(uvit, timestep_text=1000)
    adapter = tiny_feed_adapter(7)
    with torch.no_grad():
        adapter.set_face_tokens(adapter.encode_faces(faces))
    with adapter.attach(uvit):
        always = run(uvit)
    with adapter.attach(uvit, uncond_off=True):
        assert all_equal(run(uvit, timestep_text=1000), base_uncond)
        assert all_equal(run(uvit, timestep_text=torch.tensor([1000, 1000])), base_uncond)
        assert all_equal(run(uvit), always)
        assert not torch.equal(always[0], base_cond[0])
        with pytest.raises(ValueError, match="mixes"):
            run(uvit, timestep_text=torch.tensor([0, 1000]))
        assert adapter._call_multiplier is None  # reset even after a failed call
    assert adapter.branch_multiplier(0) == 0.8 and adapter.branch_multiplier(999.0) == 0.0


def test_missing_face_tokens_is_a_clear_error(uvit):
    adapter = tiny_feed_adapter(8)
    with adapter.attach(uvit), pytest.raises(RuntimeError, match="no face tokens"):
        run(uvit)
    with pytest.raises(ValueError, match=r"face tokens must have shape \(B, L, 32\)"):
        adapter.set_face_tokens(torch.zeros(1, 50, 16))
    with pytest.raises(ValueError, match="width 48"):
        tiny_feed_adapter(8, dim=48).attach(uvit)


# ------------------------------------------------------------------------------------------------------------------
# SD1.5 variant


# the kit's default UNet widths start at 4; 8 heads need widths they divide
EIGHT_HEAD_WIDTHS = {"block_out_channels": [8, 16, 32, 32], "norm_num_groups": 8}


@pytest.fixture(scope="module")
def sd15_unet():
    # SD1.5 depth (2 layers per level) and 8 heads at toy widths: the 16 sites of the real model
    return tiny_unet(seed=0, layers_per_block=2, attention_head_dim=8, **EIGHT_HEAD_WIDTHS).eval()


def unet_inputs(batch: int = 2) -> dict:
    g = torch.Generator().manual_seed(5)
    return {
        "sample": torch.randn(batch, 4, 8, 8, generator=g),
        "timestep": 10,
        "encoder_hidden_states": torch.randn(batch, 7, 32, generator=g),
    }


def unet_out(unet) -> torch.Tensor:
    with torch.no_grad():
        return unet(**unet_inputs()).sample


def sd15_adapter(unet, seed: int, *, trained: bool) -> ff.SD15FeedAdapter:
    torch.manual_seed(seed)
    adapter = ff.SD15FeedAdapter.for_unet(unet, face_dim=24, vision_config=TINY_VISION_CONFIG).eval()
    if trained:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in adapter.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return adapter


def test_sd15_sites_and_fresh_adapter_is_the_base_model(sd15_unet, faces):
    sites = ff.sd15_sites(sd15_unet)
    assert len(sites) == 16
    assert list(sites)[6] == "mid_block.attentions.0.transformer_blocks.0"
    base = unet_out(sd15_unet)
    keys = set(sd15_unet.state_dict())
    adapter = sd15_adapter(sd15_unet, 0, trained=False)
    a, b, c, _ = sd15_unet.config.block_out_channels
    assert adapter.site_widths == [a, a, b, b, c, c, c] + [c] * 3 + [b] * 3 + [a] * 3
    assert adapter.blocks[0].blocks[0].attn2.heads == ff.SD15_FEED_HEADS
    with torch.no_grad():
        adapter.set_face_tokens(adapter.encode_faces(faces))
    adapter.attach(sd15_unet)
    try:
        assert set(sd15_unet.state_dict()) == keys  # the adapter's weights stay out of the UNet
        assert torch.equal(unet_out(sd15_unet), base)
    finally:
        adapter.detach()


def test_sd15_trained_adapter_changes_output_and_round_trips(sd15_unet, faces, tmp_path):
    base = unet_out(sd15_unet)
    adapter = sd15_adapter(sd15_unet, 1, trained=True)
    with torch.no_grad():
        tokens = adapter.encode_faces(faces)
    adapter.set_face_tokens(tokens)
    adapter.attach(sd15_unet)
    try:
        adapted = unet_out(sd15_unet)
        assert not torch.allclose(adapted, base, atol=1e-4)
        adapter.set_multiplier([0.0, 1.0])  # per row: off for row 0 (e.g. CFG's unconditional half)
        rows = unet_out(sd15_unet)
        assert torch.equal(rows[0], base[0])
        torch.testing.assert_close(rows[1], adapted[1])
        adapter.set_multiplier(0)
        assert torch.equal(unet_out(sd15_unet), base)
        adapter.set_multiplier(1.0)
        full = ff.save_sd15_feed_adapter(adapter, tmp_path / "feed_sd15.safetensors")
        lean = ff.save_sd15_feed_adapter(adapter, tmp_path / "feed_sd15_lean.safetensors", include_clip=False)
    finally:
        adapter.detach()
    assert torch.equal(unet_out(sd15_unet), base)

    clip = {k.removeprefix("preprocess_module.clip_model."): v for k, v in adapter.state_dict().items()}
    for path, extra in ((full, {}), (lean, {"clip_state": clip})):
        loaded = ff.load_sd15_feed_adapter(path, **extra)
        assert loaded.site_names == list(ff.sd15_sites(sd15_unet))
        with torch.no_grad():
            loaded.set_face_tokens(loaded.encode_faces(faces))
        torch.testing.assert_close(loaded.face_tokens, tokens, rtol=0, atol=0)
        loaded.attach(sd15_unet)
        try:
            assert torch.equal(unet_out(sd15_unet), adapted)
        finally:
            loaded.detach()

    with pytest.raises(ValueError, match=r"missing keys: preprocess_module\.clip_model\.vision_model\."):
        ff.load_sd15_feed_adapter(lean)
    from safetensors.torch import load_file

    state = load_file(str(full))
    with pytest.raises(ValueError, match=r"unexpected keys: blocks\.3\.bogus"):
        ff.load_sd15_feed_adapter(state | {"blocks.3.bogus": torch.zeros(2)})


def test_sd15_attach_checks_widths(sd15_unet):
    other = tiny_unet(seed=0, layers_per_block=1, attention_head_dim=8, **EIGHT_HEAD_WIDTHS)
    adapter = sd15_adapter(sd15_unet, 2, trained=False)
    with pytest.raises(ValueError, match="site widths"):
        adapter.attach(other)
    before = copy.copy(sd15_unet.attn_processors)
    adapter.attach(sd15_unet)
    with pytest.raises(ValueError, match="already attached"):
        adapter.attach(sd15_unet)
    adapter.detach()
    assert {k: type(v) for k, v in sd15_unet.attn_processors.items()} == {k: type(v) for k, v in before.items()}


# ------------------------------------------------------------------------------------------------------------------
# Face crops


def test_face_crop_inside_the_image_matches_the_release(faces_dir):
    image = load_image(faces_dir / "obama.jpg").array
    box = (300.7, 250.2, 600.9, 640.5)
    crop = ff.face_crop(image, box)
    # the release: int box, square of int(1.1 * max(w, h)) around the centre, PIL bilinear to 224
    x, y, w, h = 300, 250, 300, 390
    side = int(max(w, h) * 1.1)
    left, top = int(x + w / 2 - side / 2), int(y + h / 2 - side / 2)
    expected = np.asarray(
        Image.fromarray(image[top : top + side, left : left + side]).resize((224, 224), Image.BILINEAR)
    )
    assert crop.shape == (224, 224, 3) and crop.dtype == np.uint8
    assert np.array_equal(crop, expected)


def test_face_crop_pads_outside_the_image():
    image = np.full((100, 120, 3), 200, np.uint8)
    crop = ff.face_crop(image, (-10, -20, 50, 60))  # square of 88 from (-34, -24)
    assert crop.shape == (224, 224, 3)
    assert crop[:40, :40].max() == 0  # zero padding top-left
    assert crop[150:, 150:].min() == 200
    with pytest.raises(ValueError, match="empty face box"):
        ff.face_crop(image, (10, 10, 10, 30))


def test_preprocess_faces_normalises_with_half():
    crops = [np.zeros((224, 224, 3), np.uint8), np.full((300, 200, 3), 255, np.uint8)]
    pixels = ff.preprocess_faces(crops)
    assert pixels.shape == (2, 3, 224, 224) and pixels.dtype == torch.float32
    assert pixels[0].eq(-1).all() and pixels[1].eq(1).all()
    assert ff.preprocess_faces(crops[0]).shape == (1, 3, 224, 224)
    with pytest.raises(ValueError, match="face crop 0"):
        ff.preprocess_faces([np.zeros((10, 10), np.uint8)])
