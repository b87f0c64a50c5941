"""AdaFace v2's ConsistentID branch: ProjPlusModel, BiSeNet, CLIP preprocessing, buffalo_l faces, the joint order.

References are independent of the code under test: float64 re-computations from the spec of ConsistentID's
ProjPlusModel (MLP, LayerNorm, perceiver attention with q/k scaled by head_dim^-1/4 over [features; latents]) and of
AdaFace's projector with ID-CFG; a functional BiSeNet written from the key names (conv -> BatchNorm with running
statistics -> ReLU, ...); transformers' own ``CLIPImageProcessorPil`` and ``CLIPVisionModelWithProjection``. Parity
with the authors' code was measured in a scratch run (see the lead's report), not here.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from idfusion.errors import ModelFilesError, NoFaceError
from idfusion.methods.adaface import (
    OfficialFaceEmbedder,
    adaface_template_ids,
    compose_prompt,
    load_adaface_checkpoint,
    official_face_image,
    official_face_index,
)
from idfusion.methods.adaface_consistentid import (
    BISENET_WEIGHTS_FILE,
    BUFFALO_L_FOLDER,
    CONSISTENTID_ID_CFG_SCALE,
    CONSISTENTID_WEIGHTS_FILE,
    BiSeNet,
    BuffaloLFaces,
    ConsistentIDEncoder,
    ProjPlusModel,
    bisenet_config,
    bisenet_pixels,
    clip_image_pixels,
    joint_subject_embeddings,
    joint_subject_tokens,
    load_bisenet,
    load_clip_vision,
    load_consistentid_image_proj,
    parse_face,
    projplus_config,
)
from idfusion.testing.tiny_adaface import (
    CLIP_VIT_H_PATH,
    TINY_BISENET_BASE_WIDTH,
    TINY_PROJPLUS,
    V2_RELATIVE_PATH,
    bisenet_state_shapes,
    tiny_bisenet_state_dict,
    tiny_projplus_state_dict,
)

PFX = "prompt2token_proj.text_model."
EOS = 49407


@pytest.fixture(scope="module")
def release(tiny_release) -> Path:
    return tiny_release("adaface")


@pytest.fixture(scope="module")
def checkpoint(release):
    return load_adaface_checkpoint(release / V2_RELATIVE_PATH)


@pytest.fixture(scope="module")
def tokenizer():
    from idfusion.clip_tokenizer import load_clip_tokenizer

    return load_clip_tokenizer()


@pytest.fixture(scope="module")
def encoder(release, checkpoint, tokenizer):
    return ConsistentIDEncoder.from_files(
        checkpoint.consistentid_projector,
        tokenizer,
        consistentid_weights=release / CONSISTENTID_WEIGHTS_FILE,
        clip_vision_folder=release / CLIP_VIT_H_PATH,
        buffalo_l_folder=release / BUFFALO_L_FOLDER,
    )


@pytest.fixture(scope="module")
def photos(faces_dir):
    return [np.asarray(Image.open(faces_dir / name).convert("RGB")) for name in ("obama.jpg", "group_six_faces.jpg")]


# ----------------------------------------------------------------------------------------------------------------------
# Independent references
# ----------------------------------------------------------------------------------------------------------------------


def _ln(x, weight, bias, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def _gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def reference_projplus(sd, id_embeds, clip_embeds, *, num_tokens=4, head_dim=64):
    """ConsistentID's ProjPlusModel in float64 from its key names (IP-Adapter FaceID-Plus)."""
    sd = {k: v.double() for k, v in sd.items()}
    x = _gelu(id_embeds.double() @ sd["proj.0.weight"].T + sd["proj.0.bias"]) @ sd["proj.2.weight"].T
    x = x + sd["proj.2.bias"]
    dim = sd["norm.weight"].shape[0]
    latents = _ln(x.reshape(-1, num_tokens, dim), sd["norm.weight"], sd["norm.bias"])
    feats = clip_embeds.double() @ sd["perceiver_resampler.proj_in.weight"].T + sd["perceiver_resampler.proj_in.bias"]
    depth = len({k.split(".")[2] for k in sd if k.startswith("perceiver_resampler.layers.")})
    for i in range(depth):
        p = f"perceiver_resampler.layers.{i}."
        f_n = _ln(feats, sd[p + "0.norm1.weight"], sd[p + "0.norm1.bias"])
        l_n = _ln(latents, sd[p + "0.norm2.weight"], sd[p + "0.norm2.bias"])
        q = l_n @ sd[p + "0.to_q.weight"].T
        kv = torch.cat([f_n, l_n], dim=1) @ sd[p + "0.to_kv.weight"].T
        inner = q.shape[-1]
        k, v = kv[..., :inner], kv[..., inner:]
        heads = inner // head_dim
        qh, kh, vh = (t.reshape(t.shape[0], t.shape[1], heads, head_dim) for t in (q, k, v))
        logits = torch.einsum("bihd,bjhd->bhij", qh, kh) / math.sqrt(head_dim)  # (q d^-1/4)(k d^-1/4)
        out = torch.einsum("bhij,bjhd->bihd", torch.softmax(logits, -1), vh).reshape(q.shape)
        latents = latents + out @ sd[p + "0.to_out.weight"].T
        h = _ln(latents, sd[p + "1.0.weight"], sd[p + "1.0.bias"])
        latents = latents + _gelu(h @ sd[p + "1.1.weight"].T) @ sd[p + "1.3.weight"].T
    out = latents @ sd["perceiver_resampler.proj_out.weight"].T + sd["perceiver_resampler.proj_out.bias"]
    return _ln(out, sd["perceiver_resampler.norm_out.weight"], sd["perceiver_resampler.norm_out.bias"])


def reference_projector(sd, x_img, input_ids, *, heads, n_id):
    """AdaFace's projector in float64 (spec §2.3): inject rows 4.., causal multi-KV layers, mix the last 3, final LN."""
    table = sd[PFX + "embeddings.token_embedding.weight"]
    h = table[input_ids.expand(x_img.shape[0], -1)].double()
    h[:, 4 : 4 + n_id] = x_img.double()
    length = h.shape[1]
    h = h + sd[PFX + "embeddings.position_embedding.weight"][:length].double()
    states = [h]
    layer = 0
    while f"{PFX}encoder.layers.{layer}.mlp.fc1.weight" in sd:
        p = f"{PFX}encoder.layers.{layer}."

        def lin(x, name, p=p):
            return x @ sd[p + name + ".weight"].double().T + sd[p + name + ".bias"].double()

        x = _ln(h, sd[p + "layer_norm1.weight"].double(), sd[p + "layer_norm1.bias"].double())
        q, k, v = lin(x, "self_attn.q_proj"), lin(x, "self_attn.k_proj"), lin(x, "self_attn.v_proj")
        d = q.shape[-1]
        m = k.shape[-1] // d
        hd = d // heads
        batch = q.shape[0]
        kv = [
            torch.stack([t[..., c * d : (c + 1) * d] for c in range(m)], 2).reshape(batch, -1, heads, hd)
            for t in (k, v)
        ]
        logits = torch.einsum("bihd,bjhd->bhij", q.reshape(batch, length, heads, hd), kv[0]) / math.sqrt(hd)
        visible = (torch.arange(length * m) // m)[None, :] <= torch.arange(length)[:, None]
        att = torch.softmax(logits.masked_fill(~visible, float("-inf")), -1)
        h = h + lin(torch.einsum("bhij,bjhd->bihd", att, kv[1]).reshape(batch, length, d), "self_attn.out_proj")
        x = lin(_ln(h, sd[p + "layer_norm2.weight"].double(), sd[p + "layer_norm2.bias"].double()), "mlp.fc1")
        h = h + lin(x * torch.sigmoid(1.702 * x), "mlp.fc2")
        states.append(h)
        layer += 1
    w = sd["hidden_state_layer_weights"].double().flatten()
    mixed = sum(wi / w.sum() * s for wi, s in zip(w, states[-3:], strict=True))
    out = _ln(mixed, sd[PFX + "final_layer_norm.weight"].double(), sd[PFX + "final_layer_norm.bias"].double())
    return out[:, 4 : 4 + n_id]


def reference_bisenet(sd, x):
    """The face-parsing BiSeNet's main output, written from its key names with functional ops (eval BatchNorm)."""
    sd = {k: v.double() for k, v in sd.items()}
    x = x.double()

    def bn(t, name):
        return F.batch_norm(t, sd[f"{name}.running_mean"], sd[f"{name}.running_var"], sd[f"{name}.weight"],
                            sd[f"{name}.bias"], training=False, eps=1e-5)  # fmt: skip

    def cbr(t, name, padding=1):  # ConvBNReLU
        return F.relu(bn(F.conv2d(t, sd[f"{name}.conv.weight"], padding=padding), f"{name}.bn"))

    def block(t, name, stride):
        r = F.relu(bn(F.conv2d(t, sd[f"{name}.conv1.weight"], stride=stride, padding=1), f"{name}.bn1"))
        r = bn(F.conv2d(r, sd[f"{name}.conv2.weight"], padding=1), f"{name}.bn2")
        if f"{name}.downsample.0.weight" in sd:
            t = bn(F.conv2d(t, sd[f"{name}.downsample.0.weight"], stride=stride), f"{name}.downsample.1")
        return F.relu(t + r)

    def arm(t, name):
        feat = cbr(t, f"{name}.conv")
        att = F.avg_pool2d(feat, feat.shape[2:])
        return feat * torch.sigmoid(bn(F.conv2d(att, sd[f"{name}.conv_atten.weight"]), f"{name}.bn_atten"))

    size = x.shape[2:]
    t = F.max_pool2d(
        F.relu(bn(F.conv2d(x, sd["cp.resnet.conv1.weight"], stride=2, padding=3), "cp.resnet.bn1")), 3, 2, 1
    )
    feats = []
    for index, stride in zip(range(1, 5), (1, 2, 2, 2), strict=True):
        t = block(block(t, f"cp.resnet.layer{index}.0", stride), f"cp.resnet.layer{index}.1", 1)
        feats.append(t)
    feat8, feat16, feat32 = feats[1:]
    avg = cbr(F.avg_pool2d(feat32, feat32.shape[2:]), "cp.conv_avg", padding=0)
    up32 = cbr(F.interpolate(arm(feat32, "cp.arm32") + avg, feat16.shape[2:], mode="nearest"), "cp.conv_head32")
    up16 = cbr(F.interpolate(arm(feat16, "cp.arm16") + up32, feat8.shape[2:], mode="nearest"), "cp.conv_head16")
    fused = cbr(torch.cat([feat8, up16], 1), "ffm.convblk", padding=0)
    att = torch.sigmoid(F.conv2d(F.relu(F.conv2d(F.avg_pool2d(fused, fused.shape[2:]), sd["ffm.conv1.weight"])),
                                 sd["ffm.conv2.weight"]))  # fmt: skip
    out = F.conv2d(cbr(fused * att + fused, "conv_out.conv"), sd["conv_out.conv_out.weight"])
    return F.interpolate(out, size, mode="bilinear", align_corners=True)


# ----------------------------------------------------------------------------------------------------------------------
# ProjPlusModel
# ----------------------------------------------------------------------------------------------------------------------


def _projplus_shapes(d=768, id_dim=512, hidden=1024, clip=1280, tokens=4, depth=4, inner=768, ff=3072):
    """ConsistentID-v1.bin ["image_proj"]'s keys and shapes (the release: 56 tensors, 33,581,568 values)."""
    shapes = {"proj.0.weight": (hidden, id_dim), "proj.0.bias": (hidden,), "proj.2.weight": (d * tokens, hidden)}
    shapes |= {"proj.2.bias": (d * tokens,), "norm.weight": (d,), "norm.bias": (d,)}
    r = "perceiver_resampler."
    shapes |= {r + "proj_in.weight": (d, clip), r + "proj_in.bias": (d,), r + "proj_out.weight": (d, d)}
    shapes |= {r + "proj_out.bias": (d,), r + "norm_out.weight": (d,), r + "norm_out.bias": (d,)}
    for i in range(depth):
        p = f"{r}layers.{i}."
        shapes |= {p + n: (d,) for n in ("0.norm1.weight", "0.norm1.bias", "0.norm2.weight", "0.norm2.bias")}
        shapes |= {
            p + "0.to_q.weight": (inner, d),
            p + "0.to_kv.weight": (2 * inner, d),
            p + "0.to_out.weight": (d, inner),
        }
        shapes |= {p + "1.0.weight": (d,), p + "1.0.bias": (d,), p + "1.1.weight": (ff, d), p + "1.3.weight": (d, ff)}
    return shapes


def test_full_size_projplus_on_meta():
    with torch.device("meta"):
        model = ProjPlusModel(**projplus_config())
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == _projplus_shapes()
    assert len(shapes) == 56 and sum(p.numel() for p in model.parameters()) == 33_581_568  # the release's
    state = {k: torch.empty(s, device="meta") for k, s in _projplus_shapes().items()}
    assert ProjPlusModel.from_state_dict(state).config == projplus_config()  # every size read back from the tensors


def test_projplus_matches_the_reference(release):
    model = load_consistentid_image_proj(release / CONSISTENTID_WEIGHTS_FILE)
    assert model.config == TINY_PROJPLUS
    state = torch.load(release / CONSISTENTID_WEIGHTS_FILE, weights_only=True)["image_proj"]
    gen = torch.Generator().manual_seed(3)
    ids = F.normalize(torch.randn(3, 512, generator=gen), dim=-1)
    clip = torch.randn(3, 257, TINY_PROJPLUS["clip_embeddings_dim"], generator=gen)
    with torch.no_grad():
        out = model(ids, clip)
    assert out.shape == (3, 4, TINY_PROJPLUS["cross_attention_dim"])
    torch.testing.assert_close(out.double(), reference_projplus(state, ids, clip), rtol=0, atol=2e-5)
    with pytest.raises(ValueError, match=r"id_embeds must have shape \(B, 512\)"):
        model(torch.zeros(3, 256), clip)
    with pytest.raises(ValueError, match="clip_embeds"):
        model(ids, clip[:2])


def test_consistentid_weights_load_safely(tmp_path, release):
    state = torch.load(release / CONSISTENTID_WEIGHTS_FILE, weights_only=True)
    assert set(state) == {"image_proj", "FacialEncoder", "adapter_modules"}
    # safetensors with section prefixes gives the same model
    from safetensors.torch import save_file

    flat = {f"{section}.{k}": v for section, part in state.items() for k, v in part.items()}
    save_file(flat, str(tmp_path / "ConsistentID-v1.safetensors"))
    a = load_consistentid_image_proj(release / CONSISTENTID_WEIGHTS_FILE)
    b = load_consistentid_image_proj(tmp_path / "ConsistentID-v1.safetensors")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)

    marker = tmp_path / "marker"

    class Touch:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"image_proj": state["image_proj"], "x": Touch()}, tmp_path / "evil.bin")
    with pytest.raises(ModelFilesError, match="weights_only=True"):
        load_consistentid_image_proj(tmp_path / "evil.bin")
    assert not marker.exists()
    with pytest.raises(ModelFilesError, match="ConsistentID-v1.bin"):
        load_consistentid_image_proj(tmp_path / "missing.bin")
    torch.save({"FacialEncoder": {}}, tmp_path / "no_proj.bin")
    with pytest.raises(ModelFilesError, match="no 'image_proj'"):
        load_consistentid_image_proj(tmp_path / "no_proj.bin")
    bad = dict(state["image_proj"])
    bad["perceiver_resampler.proj_out.weight"] = torch.zeros(3, 3)
    torch.save({"image_proj": bad}, tmp_path / "bad.bin")
    with pytest.raises(ModelFilesError, match="perceiver_resampler.proj_out.weight"):
        load_consistentid_image_proj(tmp_path / "bad.bin")


# ----------------------------------------------------------------------------------------------------------------------
# BiSeNet
# ----------------------------------------------------------------------------------------------------------------------


def test_full_size_bisenet_on_meta():
    with torch.device("meta"):
        model = BiSeNet(**bisenet_config())
    state = model.state_dict()
    expected = bisenet_state_shapes(64)  # written from the original's module tree, in its order
    assert list(state) == list(expected) and {k: tuple(v.shape) for k, v in state.items()} == expected
    assert len(state) == 191 and sum(p.numel() for p in model.parameters()) == 13_300_416  # the release's
    assert sum(b.numel() for b in model.buffers()) == 12_703


def test_bisenet_matches_the_reference(release, faces_dir, tmp_path):
    model = load_bisenet(release / BISENET_WEIGHTS_FILE)
    assert model.config == {"num_classes": 19, "base_width": TINY_BISENET_BASE_WIDTH}
    image = np.asarray(Image.open(faces_dir / "obama.jpg").convert("RGB"))
    pixels = bisenet_pixels(image)
    resized = np.asarray(Image.fromarray(image).resize((512, 512), Image.BILINEAR), dtype=np.float64) / 255
    expected = (resized - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]  # ConsistentID's ToTensor + Normalize
    np.testing.assert_allclose(pixels[0].permute(1, 2, 0).numpy(), expected, rtol=0, atol=1e-6)
    state = torch.load(release / BISENET_WEIGHTS_FILE, weights_only=True)
    small = pixels[:, :, ::4, ::4].contiguous()  # (1, 3, 128, 128): the reference is float64 and slow at 512
    with torch.no_grad():
        out = model(small)
        main, aux16, aux32 = model(small, auxiliary=True)
    assert out.shape == (1, 19, 128, 128) and aux16.shape == aux32.shape == out.shape
    torch.testing.assert_close(out.double(), reference_bisenet(state, small), rtol=0, atol=1e-4)
    torch.testing.assert_close(main, out, rtol=0, atol=0)
    labels = parse_face(model, image)
    assert labels.shape == (512, 512) and labels.dtype == np.uint8 and labels.max() < 19
    # Files without num_batches_tracked load too; anything else must match the original's keys
    trimmed = {k: v for k, v in tiny_bisenet_state_dict(torch.Generator().manual_seed(0)).items()}
    torch.save({k: v for k, v in trimmed.items() if not k.endswith("num_batches_tracked")}, tmp_path / "old.pth")
    assert load_bisenet(tmp_path / "old.pth").config["base_width"] == TINY_BISENET_BASE_WIDTH
    torch.save({**trimmed, "extra.weight": torch.ones(1)}, tmp_path / "extra.pth")
    with pytest.raises(ModelFilesError, match="extra.weight"):
        load_bisenet(tmp_path / "extra.pth")


# ----------------------------------------------------------------------------------------------------------------------
# CLIP-ViT-H-14 features
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(300, 200), (200, 301), (224, 224), (100, 500)])
def test_clip_pixels_equal_transformers_image_processor(shape):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image = np.random.default_rng(shape[0]).integers(0, 256, (*shape, 3), dtype=np.uint8)
    expected = CLIPImageProcessorPil()(images=image, return_tensors="pt").pixel_values  # CLIPImageProcessor() defaults
    torch.testing.assert_close(clip_image_pixels(image), expected, rtol=0, atol=1e-6)


def test_clip_vision_reads_only_the_vision_tower(release, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import CLIPVisionModelWithProjection

    folder = release / CLIP_VIT_H_PATH
    model = load_clip_vision(folder)
    assert isinstance(model, CLIPVisionModelWithProjection) and model.config.hidden_size == 32
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    state = model.state_dict()
    assert {k for k in state if "position_ids" not in k} == {k for k in stored if k.startswith("vision_model.")} | {
        "visual_projection.weight"
    }
    assert all(torch.equal(state[k], stored[k]) for k in state if k in stored)
    # The text tower is never read: garbage there does not matter; a missing vision tensor does
    copy = tmp_path / "clip"
    copy.mkdir()
    (copy / "config.json").write_text((folder / "config.json").read_text())
    broken = {k: v for k, v in stored.items() if not k.startswith("text_model.")} | {"text_model.x": torch.ones(2)}
    save_file(broken, str(copy / "model.safetensors"))
    assert load_clip_vision(copy).config.hidden_size == 32
    save_file({k: v for k, v in broken.items() if k != "visual_projection.weight"}, str(copy / "model.safetensors"))
    with pytest.raises(ModelFilesError, match="visual_projection.weight"):
        load_clip_vision(copy)
    with pytest.raises(ModelFilesError, match="config.json"):
        load_clip_vision(tmp_path)


def test_full_size_clip_vit_h_features_fit_projplus():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    # laion/CLIP-ViT-H-14-laion2B-s32B-b79K's vision_config
    config = CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                              patch_size=14, image_size=224, projection_dim=1024, hidden_act="gelu")  # fmt: skip
    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(config)
        out = model(torch.empty(1, 3, 224, 224), output_hidden_states=True)
    d, ff = 1280, 5120
    layer = 4 * (d * d + d) + 4 * d + (d * ff + ff) + (ff * d + d)
    vision = 3 * 14 * 14 * d + d + 257 * d + 2 * d + 32 * layer + 2 * d + d * 1024
    assert sum(p.numel() for p in model.parameters()) == vision
    assert out.hidden_states[-2].shape == (1, 257, projplus_config()["clip_embeddings_dim"])


# ----------------------------------------------------------------------------------------------------------------------
# buffalo_l faces and the whole branch
# ----------------------------------------------------------------------------------------------------------------------


def test_buffalo_l_faces_are_the_releases(release, photos):
    faces = BuffaloLFaces(release / BUFFALO_L_FOLDER)
    embedding = faces.embed(photos[0])
    assert embedding.shape == (512,) and embedding.dtype == np.float32
    assert abs(float(np.linalg.norm(embedding)) - 1) < 1e-6
    # The same as detecting on the padded 512 image, choosing by the release's key and embedding that crop
    face_image = official_face_image(photos[0])
    detections = faces.detector.detect(face_image)
    chosen = detections[official_face_index(np.stack([d.bbox for d in detections]))]
    raw = faces.recognizer.embed(face_image, chosen.landmarks[None])[0]
    np.testing.assert_allclose(embedding, raw / np.linalg.norm(raw), rtol=0, atol=1e-6)
    assert faces.recognizer.input_mean == 127.5  # w600k_r50 takes (x - 127.5) / 127.5
    with pytest.raises(ModelFilesError, match="w600k_r50.onnx"):
        BuffaloLFaces(release / "models/insightface/models/antelopev2")
    assert (
        OfficialFaceEmbedder.antelopev2(release / "models/insightface/models/antelopev2").embed(photos[0]) is not None
    )


def test_encoder_matches_the_reference(encoder, checkpoint, release, photos, tokenizer):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    gen = torch.Generator().manual_seed(11)
    id_embeds = torch.randn(2, 512, generator=gen)
    with torch.no_grad():
        out = encoder(photos, id_embeds=id_embeds)
        # Reference: mean of unit embeddings, renormalised; mean of CLIP hidden_states[-2] of the whole photos
        identity = F.normalize(F.normalize(id_embeds, dim=-1).mean(0, keepdim=True), dim=-1)
        pixels = torch.cat([CLIPImageProcessorPil()(images=p, return_tensors="pt").pixel_values for p in photos])
        features = encoder.clip_vision(pixels, output_hidden_states=True).hidden_states[-2].mean(0, keepdim=True)
    state = torch.load(release / CONSISTENTID_WEIGHTS_FILE, weights_only=True)["image_proj"]
    x_img = reference_projplus(state, identity, features)
    projector = checkpoint.consistentid_projector
    sd = projector.state_dict()
    ids = adaface_template_ids(tokenizer, 6)  # "photo of a " + ", " * (4 + 2)
    ada = reference_projector(sd, x_img, ids, heads=projector.config["num_heads"], n_id=4)
    pad = (sd[PFX + "embeddings.token_embedding.weight"][EOS] + sd[PFX + "embeddings.position_embedding.weight"])[4:8]
    expected = 6.0 * ada + (1 - 6.0) * pad.double()  # ID-CFG with the branch's scale
    assert out.shape == (1, 4, 512) and CONSISTENTID_ID_CFG_SCALE == 6.0
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-4)
    with torch.no_grad():
        plain = encoder(photos, id_embeds=id_embeds, id_cfg_scale=1.0)
    torch.testing.assert_close(plain.double(), ada, rtol=0, atol=5e-5)
    # From the photos themselves: buffalo_l embeddings of each photo, the same computation
    with torch.no_grad():
        detected = encoder(photos)
        again = encoder(photos, id_embeds=np.stack(encoder.id_embeddings(photos)))
    torch.testing.assert_close(detected, again, rtol=0, atol=0)


def test_encoder_errors(encoder, checkpoint, tokenizer, photos):
    class NoFaces:
        def embed(self, image, name="image"):
            return None

    blind = ConsistentIDEncoder(
        encoder.image_proj, encoder.clip_vision, checkpoint.consistentid_projector, tokenizer, faces=NoFaces()
    )
    with pytest.raises(NoFaceError, match="buffalo_l"):
        blind(photos)
    with pytest.raises(ValueError, match=r"\(N, 512\)"):
        encoder(photos, id_embeds=np.ones((2, 128), dtype=np.float32))
    with pytest.raises(ValueError, match="empty"):
        encoder([])
    with pytest.raises(ValueError, match="reads 16 tokens, but image_proj makes 4"):
        ConsistentIDEncoder(encoder.image_proj, encoder.clip_vision, checkpoint.projector, tokenizer)  # N_ID 16


def test_joint_order_and_tokens(checkpoint):
    cid, a2f = torch.full((1, 4, 8), 1.0), torch.full((1, 16, 8), 2.0)
    joint = joint_subject_embeddings(cid, a2f)
    assert joint.shape == (1, 20, 8) and (joint[0, :4] == 1).all() and (joint[0, 4:] == 2).all()
    assert joint_subject_embeddings(None, a2f) is a2f  # Arc2Face only
    with pytest.raises(ValueError, match="equal B and D"):
        joint_subject_embeddings(torch.zeros(1, 4, 7), a2f)
    groups = joint_subject_tokens()
    assert groups == checkpoint.joint_subject_tokens()
    assert [t for g in groups for t in g] == [f"z_0_{i}" for i in range(4)] + [f"z_1_{i}" for i in range(16)]
    composed = compose_prompt("a photo of z, smiling", groups, "v2")
    assert composed == "a photo of smiling " + " ".join(t for g in groups for t in g)


def test_make_tiny_writes_the_branchs_models(release):
    files = [
        release / CONSISTENTID_WEIGHTS_FILE,
        release / BISENET_WEIGHTS_FILE,
        release / BUFFALO_L_FOLDER / "det_10g.onnx",
        release / BUFFALO_L_FOLDER / "w600k_r50.onnx",
        release / CLIP_VIT_H_PATH / "config.json",
        release / CLIP_VIT_H_PATH / "model.safetensors",
    ]
    assert all(f.is_file() for f in files)
    assert sum(f.stat().st_size for f in files) < 8_000_000  # a few MB
    import onnxruntime as ort

    session = ort.InferenceSession(str(files[2]), providers=["CPUExecutionProvider"])
    assert [len(o.shape) for o in session.get_outputs()] == [2] * 9  # det_10g's unbatched (N, C) outputs
    state = tiny_projplus_state_dict(torch.Generator().manual_seed(1000))
    assert set(state) == set(torch.load(files[0], weights_only=True)["image_proj"])
