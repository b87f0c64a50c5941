"""AdaFace model pieces: the safe unpickler, the official checkpoint layouts, projector parity, ID-CFG and prompts.

References are independent of the code under test: a step-by-step float64 re-computation of the projector from the
spec (embedding lookup, injection, positions, per layer LN1 -> q/k/v -> explicit multi-KV expansion -> masked
softmax -> out_proj -> residual -> LN2 -> fc1 -> quick_gelu -> fc2 -> residual, layer mixing, final LN), and
transformers' own ``CLIPTextModel`` for the standard (M = 1) attention.
"""

from __future__ import annotations

import math
import os
import pickle
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from idfusion.clip_tokenizer import load_clip_tokenizer
from idfusion.errors import ImageError, ModelFilesError
from idfusion.methods.adaface import (
    ADAFACE_V1,
    ADAFACE_V2,
    PICKLE_GLOBALS,
    AdaFaceProjector,
    CLIPAttentionMKV,
    adaface_projector_config,
    adaface_template_ids,
    compose_prompt,
    convert_adaface_checkpoint,
    load_adaface_checkpoint,
    official_face_image,
    official_face_index,
    official_pad_offset,
    official_to_original,
    subject_tokens,
)
from idfusion.serialization import (
    UnsafeCheckpointError,
    load_pickled_state,
    module_state_dict,
    stub_qualified_name,
)
from idfusion.testing.tiny_adaface import (
    TINY_OBJ_PROJ_IN_DIM,
    V1_RELATIVE_PATH,
    V2_RELATIVE_PATH,
    write_tiny_adaface_v1,
)
from idfusion.testing.tiny_clip_tokenizer import tiny_clip_vocab_size

PFX = "prompt2token_proj.text_model."
EOS = 49407
TINY_D, TINY_HEADS, TINY_FFN, TINY_LAYERS, VOCAB = 512, 4, 64, 3, 49408


# ----------------------------------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_v2(tiny_release) -> Path:
    return tiny_release("adaface") / V2_RELATIVE_PATH


@pytest.fixture(scope="module")
def tiny_v1(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("adaface_v1")
    write_tiny_adaface_v1(out, 1)
    return out / V1_RELATIVE_PATH


@pytest.fixture(scope="module")
def tokenizer():
    return load_clip_tokenizer()


@pytest.fixture(scope="module")
def v2_checkpoint(tiny_v2):
    return load_adaface_checkpoint(tiny_v2)


# ----------------------------------------------------------------------------------------------------------------------
# Independent reference
# ----------------------------------------------------------------------------------------------------------------------


def _ln(x, weight, bias, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def reference_projector(sd, x_img, input_ids, *, heads, n_id):
    """The spec's projector in float64, written with plain tensor ops."""
    table = PFX + "embeddings.token_embedding.weight"
    sd = {k: v if k == table else v.double() for k, v in sd.items()}  # the big table is converted after the lookup
    x_img = x_img.double()
    batch = x_img.shape[0]
    ids = input_ids.expand(batch, -1)
    tokens = sd[table][ids].double()  # lookup
    tokens[:, 4 : 4 + n_id] = x_img  # injection
    length = tokens.shape[1]
    h = tokens + sd[PFX + "embeddings.position_embedding.weight"][:length]
    states = [h]
    n_layers = 1 + max(int(k.split(".")[4]) for k in sd if k.startswith(PFX + "encoder.layers."))
    for i in range(n_layers):
        p = f"{PFX}encoder.layers.{i}."

        def lin(x, name, p=p):
            return x @ sd[p + name + ".weight"].T + sd[p + name + ".bias"]

        x = _ln(h, sd[p + "layer_norm1.weight"], sd[p + "layer_norm1.bias"])
        q, k, v = lin(x, "self_attn.q_proj"), lin(x, "self_attn.k_proj"), lin(x, "self_attn.v_proj")
        d = q.shape[-1]
        m = k.shape[-1] // d
        hd = d // heads
        # Multi-KV: copy c of token t is k[..., c*d:(c+1)*d]; virtual token index t*m + c.
        k_virtual = torch.stack([k[..., c * d : (c + 1) * d] for c in range(m)], dim=2).reshape(batch, length * m, d)
        v_virtual = torch.stack([v[..., c * d : (c + 1) * d] for c in range(m)], dim=2).reshape(batch, length * m, d)
        qh = q.reshape(batch, length, heads, hd)
        kh = k_virtual.reshape(batch, length * m, heads, hd)
        vh = v_virtual.reshape(batch, length * m, heads, hd)
        logits = torch.einsum("bihd,bjhd->bhij", qh, kh) / math.sqrt(hd)
        key_token = torch.arange(length * m) // m
        visible = key_token[None, :] <= torch.arange(length)[:, None]  # (L, L*m)
        logits = logits.masked_fill(~visible, float("-inf"))
        attention = torch.softmax(logits, dim=-1)
        out = torch.einsum("bhij,bjhd->bihd", attention, vh).reshape(batch, length, d)
        h = h + lin(out, "self_attn.out_proj")
        x = _ln(h, sd[p + "layer_norm2.weight"], sd[p + "layer_norm2.bias"])
        x = lin(x, "mlp.fc1")
        x = x * torch.sigmoid(1.702 * x)
        h = h + lin(x, "mlp.fc2")
        states.append(h)
    w = sd["hidden_state_layer_weights"].flatten()
    w = w / w.sum()
    mixed = w[0] * states[-3] + w[1] * states[-2] + w[2] * states[-1]
    out = _ln(mixed, sd[PFX + "final_layer_norm.weight"], sd[PFX + "final_layer_norm.bias"])
    return out[:, 4 : 4 + n_id]


def expected_projector_shapes(d, vocab, positions, ffn, multipliers):
    """The spec's (§2.8) key/shape table of a generator's projector part."""
    shapes = {
        PFX + "embeddings.token_embedding.weight": (vocab, d),
        PFX + "embeddings.position_embedding.weight": (positions, d),
        PFX + "final_layer_norm.weight": (d,),
        PFX + "final_layer_norm.bias": (d,),
        "hidden_state_layer_weights": (3, 1),
    }
    for i, m in enumerate(multipliers):
        p = f"{PFX}encoder.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (d, d),
            p + "self_attn.q_proj.bias": (d,),
            p + "self_attn.k_proj.weight": (d * m, d),
            p + "self_attn.k_proj.bias": (d * m,),
            p + "self_attn.v_proj.weight": (d * m, d),
            p + "self_attn.v_proj.bias": (d * m,),
            p + "self_attn.out_proj.weight": (d, d),
            p + "self_attn.out_proj.bias": (d,),
            p + "layer_norm1.weight": (d,),
            p + "layer_norm1.bias": (d,),
            p + "mlp.fc1.weight": (ffn, d),
            p + "mlp.fc1.bias": (ffn,),
            p + "mlp.fc2.weight": (d, ffn),
            p + "mlp.fc2.bias": (d,),
            p + "layer_norm2.weight": (d,),
            p + "layer_norm2.bias": (d,),
        }
    return shapes


def _random_projector(multipliers, *, d=64, heads=4, ffn=96, n_id=16, seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cfg = adaface_projector_config(
            hidden_size=d,
            intermediate_size=ffn,
            num_heads=heads,
            num_layers=len(multipliers),
            attention_multipliers=multipliers,
            num_id_tokens=n_id,
        )
        projector = AdaFaceProjector.from_config(cfg)
        with torch.no_grad():
            for name, p in projector.named_parameters():
                if "token_embedding" in name or "position_embedding" in name:
                    p.normal_(0, 0.02)
                elif "layer_norm" in name and name.endswith("weight"):
                    p.normal_(1.0, 0.1)
                elif name.endswith("bias"):
                    p.normal_(0, 0.05)
            projector.hidden_state_layer_weights.copy_(torch.tensor([[0.7], [1.3], [2.1]]))
    return projector.eval()


# ----------------------------------------------------------------------------------------------------------------------
# Safe unpickler
# ----------------------------------------------------------------------------------------------------------------------


class _System:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Eval:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize(("payload", "refused"), [(_System, "posix.system"), (_Eval, "builtins.eval")])
def test_unpickler_refuses_code(tmp_path, payload, refused, zip_format):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    obj = {"weights": torch.ones(2), "layer": torch.nn.Linear(2, 2), "x": payload(marker)}
    torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
    assert refused.split(".")[1] in path.read_bytes().decode("latin1")  # the payload really is in the file
    with pytest.raises(UnsafeCheckpointError) as info:
        load_pickled_state(path, allowed_module_prefixes=["torch.nn.modules", "adaface"])
    assert refused in str(info.value) and str(path) in str(info.value)
    assert info.value.refused == refused
    assert not marker.exists()


@pytest.mark.parametrize(
    ("obj", "refused"),
    [
        ({"c": __import__("collections").Counter()}, "collections.Counter"),
        ({"f": torch.load}, "torch.serialization.load"),
    ],
)
def test_unpickler_refuses_globals_outside_the_allow_list(tmp_path, obj, refused):
    path = tmp_path / "other.pt"
    torch.save(obj, path)
    with pytest.raises(UnsafeCheckpointError, match=refused):
        load_pickled_state(path, allowed_module_prefixes=["torch.nn.modules"])


class _OversizedView:
    def __reduce__(self):
        storage = torch.zeros(4).untyped_storage()  # 16 bytes in the file
        return (
            torch._utils._rebuild_tensor_v2,
            (storage, 0, (1000,), (1,), False, __import__("collections").OrderedDict()),
        )


def test_unpickler_refuses_views_beyond_their_storage(tmp_path):
    path = tmp_path / "oversized.pt"
    torch.save({"t": _OversizedView()}, path)
    with pytest.raises(UnsafeCheckpointError, match="exceeds its stored storage"):
        load_pickled_state(path, allowed_module_prefixes=["torch.nn.modules"])


def test_unpickler_refuses_torchscript_archives(tmp_path):
    path = tmp_path / "scripted.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("scripted/data.pkl", pickle.dumps({}, protocol=2))
        archive.writestr("scripted/constants.pkl", pickle.dumps((), protocol=2))
    with pytest.raises(UnsafeCheckpointError, match="TorchScript"):
        load_pickled_state(path, allowed_module_prefixes=["torch.nn.modules"])


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_unpickler_rebuilds_modules_as_stubs_with_real_tensors(tmp_path, zip_format):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    model.register_buffer("kept", torch.arange(3, dtype=torch.float16))
    model.register_buffer("dropped", torch.ones(1), persistent=False)
    shared = torch.arange(12.0)
    tagged = torch.ones(2)
    tagged.note = "pickled through _rebuild_from_type_v2"
    path = tmp_path / "model.pt"
    obj = {"model": model, "view": shared[2:8].view(2, 3), "base": shared, "size": torch.Size([1, 2]), "s": {1, 2}}
    obj["tagged"] = tagged
    torch.save(obj, path, _use_new_zipfile_serialization=zip_format)

    loaded = load_pickled_state(path, allowed_module_prefixes=["torch.nn.modules"])
    assert not isinstance(loaded["model"], torch.nn.Module)  # a stub: nothing from torch.nn.modules ran
    assert stub_qualified_name(loaded["model"]) == "torch.nn.modules.container.Sequential"
    assert isinstance(vars(vars(loaded["model"])["_modules"]["0"])["_parameters"]["weight"], torch.nn.Parameter)
    state = module_state_dict(loaded["model"])
    expected = model.state_dict()
    assert list(state) == list(expected)  # the same order as nn.Module.state_dict, non-persistent buffer skipped
    for key, value in expected.items():
        assert type(state[key]) is torch.Tensor and state[key].dtype == value.dtype
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)
    torch.testing.assert_close(loaded["view"], shared[2:8].view(2, 3), rtol=0, atol=0)
    assert loaded["view"].untyped_storage().data_ptr() == loaded["base"].untyped_storage().data_ptr()
    assert loaded["size"] == torch.Size([1, 2]) and loaded["s"] == {1, 2}
    assert type(loaded["tagged"]) is torch.Tensor and torch.equal(loaded["tagged"], tagged)
    assert module_state_dict(model).keys() == expected.keys()  # also usable on real modules


# ----------------------------------------------------------------------------------------------------------------------
# The official pickled layouts
# ----------------------------------------------------------------------------------------------------------------------


def test_tiny_v2_checkpoint_has_the_official_layout(tiny_v2):
    assert "adaface" not in sys.modules
    prefixes = ["adaface", "transformers", "torch.nn.modules", "einops"]
    # Each v2 generator pickles a transformers 4 slow CLIPTokenizer, as the official SubjBasisGenerator does
    with zipfile.ZipFile(tiny_v2) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
    for module, name in (("regex._regex", "compile"), ("tokenizers", "AddedToken"), ("ftfy", "fix_text")):
        assert module.encode() in data and name.encode() in data
    with pytest.raises(UnsafeCheckpointError) as info:
        load_pickled_state(tiny_v2, allowed_module_prefixes=prefixes)
    assert info.value.refused in PICKLE_GLOBALS
    top = load_pickled_state(tiny_v2, allowed_module_prefixes=prefixes, allowed_globals=PICKLE_GLOBALS)
    assert "adaface" not in sys.modules and "einops.layers" not in sys.modules  # stubs never import their modules
    assert set(top) == {"string_to_subj_basis_generator_dict", "placeholder_strings", "subject_strings"}
    assert top["placeholder_strings"] == ["z"] and top["subject_strings"] == ["z"]
    generators = vars(top["string_to_subj_basis_generator_dict"])["_modules"]
    joint = generators["z"]
    assert stub_qualified_name(joint) == "torch.nn.modules.container.ModuleList"
    consistentid, arc2face = (vars(joint)["_modules"][i] for i in ("0", "1"))
    assert stub_qualified_name(arc2face) == "adaface.subj_basis_generator.SubjBasisGenerator"
    assert vars(arc2face)["N_ID"] == 16 and vars(consistentid)["N_ID"] == 4
    wrapper = vars(arc2face)["_modules"]["prompt2token_proj"]
    assert stub_qualified_name(wrapper) == "adaface.arc2face_models.CLIPTextModelWrapper"

    for generator, multipliers, extra in (
        (arc2face, [1, 2, 4], {"static_img_suffix_embs": (1, 4, TINY_D)}),
        (consistentid, [1, 1, 2], {}),
    ):
        state = module_state_dict(generator)
        expected = expected_projector_shapes(TINY_D, VOCAB, 77, TINY_FFN, multipliers)
        # position_ids is pickled but non-persistent (transformers >= 4.31), so not in the state dict
        expected |= {
            "obj_proj_in.0.weight": (77 * TINY_D, TINY_OBJ_PROJ_IN_DIM),
            "obj_proj_in.2.weight": (TINY_D,),
            "obj_proj_in.2.bias": (TINY_D,),
            **extra,
        }
        assert {k: tuple(v.shape) for k, v in state.items()} == expected
        assert all(type(v) is torch.Tensor for v in state.values())
        tokenizer = vars(generator)["tokenizer"]
        assert stub_qualified_name(tokenizer) == "transformers.models.clip.tokenization_clip.CLIPTokenizer"
        pattern = vars(tokenizer)["pat"]  # the compiled regex: a stub holding compile's arguments, never compiled
        assert (
            stub_qualified_name(pattern) == "regex._regex.compile"
            and "startoftext" in vars(pattern)["_stub_args"][0][0]
        )
        # the kit's vocabulary, as its tokenizer/ folder (the table keeps CLIP's 49,408 rows: see tiny_adaface)
        encoder = vars(tokenizer)["encoder"]
        assert len(encoder) == tiny_clip_vocab_size() and vars(vars(tokenizer)["_eos_token"])["special"] is True
        assert vars(tokenizer)["_added_tokens_encoder"]["<|endoftext|>"] == encoder["<|endoftext|>"]
        text = vars(vars(generator)["_modules"]["prompt2token_proj"])["_modules"]["text_model"]
        embeddings = vars(vars(text)["_modules"]["embeddings"])
        assert embeddings["_buffers"]["position_ids"].shape == (1, 77)
        assert "position_ids" in embeddings["_non_persistent_buffers_set"]
    text_model = vars(wrapper)["_modules"]["text_model"]
    layers = vars(vars(vars(text_model)["_modules"]["encoder"])["_modules"]["layers"])["_modules"]
    attention_classes = [stub_qualified_name(vars(layer)["_modules"]["self_attn"]) for layer in layers.values()]
    assert attention_classes == [
        "transformers.models.clip.modeling_clip.CLIPAttention",
        "adaface.arc2face_models.CLIPAttentionMKV",
        "adaface.arc2face_models.CLIPAttentionMKV",
    ]


def test_tiny_v2_loads_as_the_arc2face_branch(v2_checkpoint, tiny_v2):
    ckpt = v2_checkpoint
    assert (ckpt.version, ckpt.subject_string, ckpt.num_id_tokens, ckpt.encoder_index) == (ADAFACE_V2, "z", 16, 1)
    assert ckpt.has_consistentid and ckpt.consistentid_projector.num_id_tokens == 4
    assert ckpt.projector.attention_multipliers == [1, 2, 4]
    assert ckpt.consistentid_projector.attention_multipliers == [1, 1, 2]
    assert ckpt.projector.config["num_heads"] == TINY_HEADS  # read from the pickled CLIPTextConfig
    assert ckpt.subject_tokens == [f"z_1_{i}" for i in range(16)]
    assert ckpt.template_num_commas == 18
    assert "adaface" not in sys.modules


def test_tiny_v1_loads(tiny_v1, tokenizer):
    ckpt = load_adaface_checkpoint(tiny_v1)
    assert "ldm" not in sys.modules
    assert (ckpt.version, ckpt.num_id_tokens, ckpt.has_consistentid) == (ADAFACE_V1, 16, False)
    assert ckpt.projector.attention_multipliers == [1, 2, 2]
    assert ckpt.subject_tokens == [f"z_{i}" for i in range(16)]
    assert ckpt.placeholder_strings == ["z", "y"] and ckpt.template_num_commas == 16

    top = load_pickled_state(tiny_v1, allowed_module_prefixes=["ldm", "transformers", "torch.nn.modules", "einops"])
    state = module_state_dict(vars(top["string_to_subj_basis_generator_dict"])["_modules"]["z"])
    assert {"pos_embs", "pos_embs_ln.weight", "obj_proj_in.0.weight"} <= set(state)  # present, and ignored
    ids = adaface_template_ids(tokenizer, 16)
    x_img = torch.randn(2, 16, TINY_D, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = ckpt.projector(x_img, ids)
    ref = reference_projector(state, x_img, ids, heads=TINY_HEADS, n_id=16)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)


def test_not_an_adaface_checkpoint(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"state_dict": {"w": torch.ones(1)}}, path)
    with pytest.raises(ModelFilesError, match="not an AdaFace checkpoint"):
        load_adaface_checkpoint(path)
    with pytest.raises(ModelFilesError, match="not found"):
        load_adaface_checkpoint(tmp_path / "missing.pt")


# ----------------------------------------------------------------------------------------------------------------------
# Parity
# ----------------------------------------------------------------------------------------------------------------------


def test_loaded_v2_projector_matches_the_reference(tiny_v2, v2_checkpoint, tokenizer):
    top = load_pickled_state(
        tiny_v2,
        allowed_module_prefixes=["adaface", "transformers", "torch.nn.modules", "einops"],
        allowed_globals=PICKLE_GLOBALS,
    )
    joint = vars(vars(top["string_to_subj_basis_generator_dict"])["_modules"]["z"])["_modules"]
    gen = torch.Generator().manual_seed(5)
    for index, projector, n_id in ((1, v2_checkpoint.projector, 16), (0, v2_checkpoint.consistentid_projector, 4)):
        state = module_state_dict(joint[str(index)])
        ids = adaface_template_ids(tokenizer, n_id + 2)
        x_img = torch.randn(3, n_id, TINY_D, generator=gen)
        with torch.no_grad():
            out = projector(x_img, ids)
        assert out.shape == (3, n_id, TINY_D) and out.dtype == torch.float32
        ref = reference_projector(state, x_img, ids, heads=TINY_HEADS, n_id=n_id)
        torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("multipliers", [[1, 2, 4], [4, 1, 2, 1], [1, 1, 1]])
def test_projector_matches_the_reference(multipliers, tokenizer):
    projector = _random_projector(multipliers, seed=len(multipliers))
    ids = adaface_template_ids(tokenizer, 18)
    x_img = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = projector(x_img, ids)
    ref = reference_projector(projector.state_dict(), x_img, ids, heads=4, n_id=16)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)
    # The template rows outside 4..19 matter too (causal attention reads rows 0..3), so the output depends on them.
    with torch.no_grad():
        other = projector(x_img, adaface_template_ids(tokenizer, 18).roll(1, dims=1))
    assert not torch.allclose(out, other)


def test_single_kv_projector_equals_transformers_clip(tokenizer):
    from transformers import CLIPTextModel

    from idfusion.prompt_encoders import inject_token_embeddings
    from idfusion.testing.components import build_text_encoder, official_state_dict, sd15_text_encoder_config

    config = sd15_text_encoder_config(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_hidden_layers=3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        clip: CLIPTextModel = build_text_encoder(config).eval()
        with torch.no_grad():
            for name, p in clip.named_parameters():
                if "layer_norm" in name:
                    p.add_(torch.randn_like(p) * 0.1)
    state = {f"prompt2token_proj.{k}": v for k, v in official_state_dict(clip).items() if "position_ids" not in k}
    state["hidden_state_layer_weights"] = torch.tensor([[0.0], [0.0], [1.0]])  # only the last layer
    projector = AdaFaceProjector.from_state_dict(state, num_id_tokens=16, num_heads=4)
    assert projector.attention_multipliers == [1, 1, 1]

    ids = adaface_template_ids(tokenizer, 18)
    x_img = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(2, ids.shape[1], dtype=torch.bool)
    mask[:, 4:20] = True
    with torch.no_grad(), inject_token_embeddings(clip, mask, x_img.reshape(-1, 64)):
        expected = clip(ids.expand(2, -1)).last_hidden_state[:, 4:20]
    with torch.no_grad():
        out = projector(x_img, ids)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_mkv_attention_with_one_copy_is_standard_causal_attention():
    torch.manual_seed(0)
    attention = CLIPAttentionMKV(32, 4, 1).eval()
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        q = attention.q_proj(x).view(2, 7, 4, 8).transpose(1, 2)
        k = attention.k_proj(x).view(2, 7, 4, 8).transpose(1, 2)
        v = attention.v_proj(x).view(2, 7, 4, 8).transpose(1, 2)
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        ref = attention.out_proj(ref.transpose(1, 2).reshape(2, 7, 32))
        torch.testing.assert_close(attention(x), ref, rtol=0, atol=1e-6)


def test_mkv_copies_that_equal_the_first_leave_attention_unchanged():
    # Repeating k/v weights M times (the training-time extension with zero noise) must not change the output:
    # every copy gets the same logit, so softmax weights split evenly over identical values.
    torch.manual_seed(1)
    base = CLIPAttentionMKV(32, 4, 1).eval()
    wide = CLIPAttentionMKV(32, 4, 4).eval()
    with torch.no_grad():
        for name in ("q_proj", "out_proj"):
            getattr(wide, name).load_state_dict(getattr(base, name).state_dict())
        for name in ("k_proj", "v_proj"):
            getattr(wide, name).weight.copy_(getattr(base, name).weight.repeat(4, 1))
            getattr(wide, name).bias.copy_(getattr(base, name).bias.repeat(4))
        x = torch.randn(2, 9, 32)
        torch.testing.assert_close(wide(x), base(x), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# ID-CFG
# ----------------------------------------------------------------------------------------------------------------------


def test_id_cfg(tokenizer):
    projector = _random_projector([1, 2, 1], seed=3)
    with torch.no_grad():
        pad = projector.pad_embeddings()
        table = projector.prompt2token_proj.text_model.embeddings
        expected_pad = table.token_embedding.weight[EOS][None, :] + table.position_embedding.weight
        torch.testing.assert_close(pad, expected_pad, rtol=0, atol=0)
        assert pad.shape == (77, 64)
        x = projector(torch.randn(2, 16, 64), adaface_template_ids(tokenizer, 18))
        torch.testing.assert_close(projector.apply_id_cfg(x, 1.0), x, rtol=0, atol=0)
        for scale in (0.0, 1.5, 6.0):
            expected = scale * x + (1 - scale) * expected_pad[4:20]
            torch.testing.assert_close(projector.apply_id_cfg(x, scale), expected, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# Full size on the meta device
# ----------------------------------------------------------------------------------------------------------------------


def test_full_size_v2_projector_on_meta():
    multipliers = [1] * 8 + [2, 2, 4, 4]
    d, ffn, vocab, positions = 768, 3072, 49408, 77
    with torch.device("meta"):
        projector = AdaFaceProjector.from_config(adaface_projector_config(attention_multipliers=multipliers))
    expected = expected_projector_shapes(d, vocab, positions, ffn, multipliers)
    assert {k: tuple(v.shape) for k, v in projector.state_dict().items()} == expected
    assert all(p.is_meta for p in projector.parameters())

    clip_l_text = 123_060_480  # SD1.5's text_encoder (CLIP ViT-L/14 text tower)
    extra_kv = sum(2 * (d * (m - 1) * d + d * (m - 1)) for m in multipliers)
    total = sum(p.numel() for p in projector.parameters())
    assert total == clip_l_text + extra_kv + 3
    assert total == sum(math.prod(s) for s in expected.values())

    # Loading infers every size from the tensors, and skips the parts generation does not use.
    state = {k: torch.empty(s, device="meta") for k, s in expected.items()}
    state |= {
        "obj_proj_in.0.weight": torch.empty(77 * 768, 384, device="meta"),
        "obj_proj_in.2.weight": torch.empty(768, device="meta"),
        "obj_proj_in.2.bias": torch.empty(768, device="meta"),
        PFX + "embeddings.position_ids": torch.empty(1, 77, dtype=torch.long, device="meta"),
    }
    loaded = AdaFaceProjector.from_state_dict(state, num_id_tokens=16)
    assert loaded.attention_multipliers == multipliers
    assert loaded.config == adaface_projector_config(attention_multipliers=multipliers)


def test_from_state_dict_names_missing_and_unexpected_keys():
    state = _random_projector([1, 2, 1]).state_dict()
    with pytest.raises(ValueError, match=r"unexpected keys \['foo.bar'\]"):
        AdaFaceProjector.from_state_dict({**state, "foo.bar": torch.ones(1)}, num_id_tokens=16, num_heads=4)
    missing = dict(state)
    del missing[PFX + "encoder.layers.1.mlp.fc2.bias"]
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.fc2\.bias"):
        AdaFaceProjector.from_state_dict(missing, num_id_tokens=16, num_heads=4)
    bad = dict(state)
    bad[PFX + "encoder.layers.1.self_attn.v_proj.weight"] = torch.zeros(64 * 3, 64)
    with pytest.raises(ValueError, match="k_proj/v_proj"):
        AdaFaceProjector.from_state_dict(bad, num_id_tokens=16, num_heads=4)


# ----------------------------------------------------------------------------------------------------------------------
# Conversion, options, prompts
# ----------------------------------------------------------------------------------------------------------------------


def test_converted_safetensors_gives_identical_outputs(tiny_v2, v2_checkpoint, tmp_path, tokenizer):
    out = convert_adaface_checkpoint(tiny_v2, tmp_path / "adaface.safetensors")
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        keys = set(f.keys())
    assert PFX.join(["arc2face.", "embeddings.token_embedding.weight"]) in keys
    assert not any("obj_proj_in" in k or "position_ids" in k for k in keys)
    converted = load_adaface_checkpoint(out)
    for attr in ("version", "subject_string", "num_id_tokens", "encoder_index", "placeholder_strings"):
        assert getattr(converted, attr) == getattr(v2_checkpoint, attr)
    x_img = torch.randn(2, 16, TINY_D)
    x_cid = torch.randn(2, 4, TINY_D)
    with torch.no_grad():
        a = v2_checkpoint.projector(x_img, adaface_template_ids(tokenizer, 18))
        b = converted.projector(x_img, adaface_template_ids(tokenizer, 18))
        c = v2_checkpoint.consistentid_projector(x_cid, adaface_template_ids(tokenizer, 6))
        d = converted.consistentid_projector(x_cid, adaface_template_ids(tokenizer, 6))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(c, d, rtol=0, atol=0)


def test_reset_layer_weights(tiny_v2, v2_checkpoint):
    trained = v2_checkpoint.projector.hidden_state_layer_weights.detach()
    assert not torch.equal(trained, torch.tensor([[1.0], [2.0], [4.0]]))
    reset = load_adaface_checkpoint(tiny_v2, reset_layer_weights=True)
    torch.testing.assert_close(
        reset.projector.hidden_state_layer_weights.detach(), torch.tensor([[1.0], [2.0], [4.0]])
    )
    half = load_adaface_checkpoint(tiny_v2, dtype=torch.float16)
    assert all(p.dtype == torch.float16 for p in half.projector.parameters())


def test_template_ids(tokenizer):
    for commas, eos_at in ((16, 20), (18, 22), (6, 10)):
        ids = adaface_template_ids(tokenizer, commas)
        assert ids.shape == (1, 77)
        assert ids[0, :4].tolist() == [49406, 1125, 539, 320]  # BOS photo of a
        assert ids[0, 4:eos_at].tolist() == [267] * commas
        assert (ids[0, eos_at:] == EOS).all()


def test_subject_tokens():
    assert subject_tokens(ADAFACE_V1, 16) == [f"z_{i}" for i in range(16)]
    assert subject_tokens(ADAFACE_V2, 16) == [f"z_1_{i}" for i in range(16)]
    assert subject_tokens(ADAFACE_V2, 4, encoder_index=0) == ["z_0_0", "z_0_1", "z_0_2", "z_0_3"]
    with pytest.raises(ValueError, match="version"):
        subject_tokens("v3", 16)


# The release's rule (adaface_wrapper.py update_prompt), v2: delete "a|an|the z" (lower-case articles) and then every
# other standalone z, each together with one comma right after it; append the tokens. v1 (AdaFace-Animate): a prompt
# that already holds the tokens is kept; else z -> the tokens, or the tokens prepended when there is no z.
# Expected strings are written from the rule, with whitespace runs collapsed (CLIP's tokenizer does the same).
@pytest.mark.parametrize(
    ("version", "prompt", "expected"),
    [
        (ADAFACE_V2, "a photo of z, smiling", "a photo of smiling T0 T1"),  # "z," goes with its comma
        (ADAFACE_V2, "The z smiling", "The smiling T0 T1"),  # a capitalised article stays
        (ADAFACE_V2, "portrait of The z, smiling", "portrait of The smiling T0 T1"),  # changed: was "portrait of,"
        (ADAFACE_V2, "a z walking on the beach", "walking on the beach T0 T1"),
        (ADAFACE_V2, "an z in the rain", "in the rain T0 T1"),
        (ADAFACE_V2, "the z, at night", "at night T0 T1"),
        (ADAFACE_V2, "z in a garden", "in a garden T0 T1"),  # z at the start
        (ADAFACE_V2, "portrait of a man, z", "portrait of a man, T0 T1"),  # z at the end
        (ADAFACE_V2, "z and z, with a z", "and with T0 T1"),  # several z's
        (ADAFACE_V2, "a woman reading", "a woman reading T0 T1"),  # no z
        (ADAFACE_V2, "a zebra eats pizza", "a zebra eats pizza T0 T1"),  # z inside a word stays
        (ADAFACE_V2, "photo of z_0 style", "photo of z_0 style T0 T1"),  # \b: z_0 is one word
        (ADAFACE_V2, "z", "T0 T1"),
        (ADAFACE_V2, "", "T0 T1"),
        (ADAFACE_V1, "a z in the snow", "a T0 T1 in the snow"),
        (ADAFACE_V1, "a photo of z, smiling", "a photo of T0 T1, smiling"),
        (ADAFACE_V1, "z and z", "T0 T1 and T0 T1"),
        (ADAFACE_V1, "a zebra", "T0 T1 a zebra"),
        (ADAFACE_V1, "photo of z, z_0 style", "photo of T0 T1, z_0 style"),
        (ADAFACE_V1, "T0 T1 on a horse, z", "T0 T1 on a horse, z"),  # already holds the tokens: kept as is
    ],
)
def test_compose_prompt(version, prompt, expected):
    assert compose_prompt(prompt, ["T0", "T1"], version) == expected


def test_compose_prompt_with_encoder_groups():
    groups = [["A0", "A1"], ["B0", "B1", "B2"]]
    assert compose_prompt("a photo of z, smiling", groups, ADAFACE_V2) == "a photo of smiling A0 A1 B0 B1 B2"
    repeated = compose_prompt("a photo of z, smiling", groups, ADAFACE_V2, repeat_prompt_for_each_encoder=True)
    assert repeated == "a photo of smiling A0 A1, a photo of smiling B0 B1 B2"
    assert compose_prompt("z on a horse", [["B0"]], ADAFACE_V2, repeat_prompt_for_each_encoder=True) == "on a horse B0"
    with pytest.raises(TypeError, match="tokens"):
        compose_prompt("z", "T0", ADAFACE_V2)


# Literal outputs of the release's update_prompt (run on the official code in scratch, whitespace as it leaves it), with
# the token list cut to 6 here.
RELEASE_STRINGS = {
    "a photo of z, smiling": "a photo of  smiling z_0_0 z_0_1 z_0_2 z_0_3 z_1_0 z_1_1",
    "The z smiling": "The  smiling z_0_0 z_0_1 z_0_2 z_0_3 z_1_0 z_1_1",
    "z at the beach": " at the beach z_0_0 z_0_1 z_0_2 z_0_3 z_1_0 z_1_1",
    "z and z, with a z": " and  with  z_0_0 z_0_1 z_0_2 z_0_3 z_1_0 z_1_1",
}


@pytest.mark.parametrize("prompt", sorted(RELEASE_STRINGS))
def test_composed_prompts_tokenize_as_the_releases(prompt, tokenizer):
    groups = [[f"z_0_{i}" for i in range(4)], ["z_1_0", "z_1_1"]]
    ours = compose_prompt(prompt, groups, ADAFACE_V2)
    assert ours == " ".join(RELEASE_STRINGS[prompt].split())
    tokenizer = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)  # a copy: tokens are added below
    tokenizer.add_tokens([t for group in groups for t in group])
    assert tokenizer(ours).input_ids == tokenizer(RELEASE_STRINGS[prompt]).input_ids


# ----------------------------------------------------------------------------------------------------------------------
# Versions: what truly differs between the eras (not token2num_vectors, which the dev repo saved in both)
# ----------------------------------------------------------------------------------------------------------------------


def _write(kind, out):
    from idfusion.testing.tiny_adaface import write_tiny_adaface_checkpoint

    if kind.startswith("v1"):
        family = "adaface" if kind == "v1-adaface-path" else "ldm.modules"
        return write_tiny_adaface_v1(out, 1, family=family, stripped=kind == "v1-stripped")[0]
    return write_tiny_adaface_checkpoint(out, 0, save_format=kind, consistentid=False)[0]


@pytest.mark.parametrize(
    ("kind", "version", "has_consistentid"),
    [
        ("release", ADAFACE_V2, True),
        ("dev", ADAFACE_V2, True),  # joint, and token2num_vectors / background_strings at the top level
        ("dev-arc2face", ADAFACE_V2, False),  # single generator with N_ID, and token2num_vectors
        ("v1", ADAFACE_V1, False),
        ("v1-stripped", ADAFACE_V1, False),  # only the generator dict is left
        ("v1-adaface-path", ADAFACE_V1, False),  # classes under adaface.* (2024-06-07 .. 2024-08-30), no N_ID
    ],
)
def test_version_is_read_from_the_generators_structure(tmp_path, tokenizer, kind, version, has_consistentid):
    path = _write(kind, tmp_path)
    top = load_pickled_state(
        path, allowed_module_prefixes=["adaface", "ldm", "transformers", "torch.nn.modules", "einops"],
        allowed_globals=PICKLE_GLOBALS,
    )  # fmt: skip
    if kind.startswith("dev"):
        assert "token2num_vectors" in top and top["background_strings"] == ["y"]  # the confusing key is there
    ckpt = load_adaface_checkpoint(path)
    assert ckpt.version == version and ckpt.has_consistentid == has_consistentid
    tokens = ckpt.subject_tokens
    if version == ADAFACE_V2:
        assert ckpt.template_num_commas == 18
        index = 1 if has_consistentid else 0
        assert tokens == [f"z_{index}_{i}" for i in range(16)]
        assert compose_prompt("a photo of z", tokens, ckpt.version).endswith(" ".join(tokens))  # appended
    else:
        assert ckpt.template_num_commas == 16 and tokens == [f"z_{i}" for i in range(16)]
        assert compose_prompt("a photo of z smiling", tokens, ckpt.version) == f"a photo of {' '.join(tokens)} smiling"


def test_the_dev_save_format_holds_the_same_generators(tmp_path, v2_checkpoint, tokenizer):
    dev = load_adaface_checkpoint(_write("dev", tmp_path))
    ids = adaface_template_ids(tokenizer, 18)
    x_img = torch.randn(2, 16, TINY_D, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        torch.testing.assert_close(dev.projector(x_img, ids), v2_checkpoint.projector(x_img, ids), rtol=0, atol=0)
    assert dev.joint_subject_tokens() == v2_checkpoint.joint_subject_tokens()


def test_joint_subject_tokens(v2_checkpoint):
    groups = v2_checkpoint.joint_subject_tokens()
    assert groups == [[f"z_0_{i}" for i in range(4)], [f"z_1_{i}" for i in range(16)]]
    assert v2_checkpoint.consistentid_subject_tokens == groups[0] and v2_checkpoint.consistentid_index == 0
    assert v2_checkpoint.joint_subject_tokens(consistentid=False) == [groups[1]]


class _Touch:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_the_checkpoint_loader_still_refuses_code(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    generator = torch.nn.Linear(2, 2)
    generator.hook = _Touch(marker)
    torch.save({"string_to_subj_basis_generator_dict": {"z": generator}, "subject_strings": ["z"]}, path)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_adaface_checkpoint(path)
    assert info.value.refused == "posix.system"
    assert "'posix.system'" in str(info.value) and "nothing from the file was executed" in str(info.value)
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------------------------------
# The release's face preprocessing
# ----------------------------------------------------------------------------------------------------------------------


def _reference_face_image(image, size=512):
    """Pad and NEAREST-resize written out: the square side S = max(H, W), the image at ((S - W) // 2, (S - H) // 2)
    on the padded axis, and output pixel i reads source pixel floor((2i + 1) * S / (2 * size)) (exact integers)."""
    height, width = image.shape[:2]
    side = max(height, width)
    square = np.zeros((side, side, 3), dtype=np.uint8)
    top, left = (side - height) // 2, (side - width) // 2
    square[top : top + height, left : left + width] = image[..., :3]
    index = ((2 * np.arange(size) + 1) * side) // (2 * size)
    return square[index][:, index], (left, top), side


@pytest.mark.parametrize("shape", [(300, 200), (200, 300), (301, 200), (200, 333), (64, 64), (1000, 700)])
def test_official_face_image_matches_the_padding_and_nearest_resize(shape):
    rng = np.random.default_rng(sum(shape))
    image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    expected, (left, top), side = _reference_face_image(image)
    out = official_face_image(image)
    assert out.shape == (512, 512, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)
    assert official_pad_offset(*shape) == (left, top)
    # Mapping back: each output pixel's centre lands inside the source pixel the resize read for it
    centres = np.stack(np.meshgrid(np.arange(512) + 0.5, np.arange(512) + 0.5), axis=-1)  # (512, 512, 2) as (x, y)
    back = np.floor(official_to_original(centres, image.shape)).astype(int)
    index = ((2 * np.arange(512) + 1) * side) // (2 * 512)
    np.testing.assert_array_equal(back[0, :, 0], index - left)
    np.testing.assert_array_equal(back[:, 0, 1], index - top)
    inside = (back[..., 0] >= 0) & (back[..., 0] < shape[1]) & (back[..., 1] >= 0) & (back[..., 1] < shape[0])
    np.testing.assert_array_equal(out[inside], image[back[inside][:, 1], back[inside][:, 0]])
    assert (out[~inside] == 0).all()  # the rest is the black padding


def test_official_face_image_drops_alpha_and_names_bad_input():
    rgba = np.zeros((10, 20, 4), dtype=np.uint8)
    rgba[..., :3] = 200
    rgba[..., 3] = 7
    np.testing.assert_array_equal(official_face_image(rgba), official_face_image(rgba[..., :3]))
    with pytest.raises(ImageError, match="photo.*uint8"):
        official_face_image(np.zeros((10, 10, 3), dtype=np.float32), name="photo")
    with pytest.raises(ImageError, match="photo"):
        official_face_image(np.zeros((10, 10), dtype=np.uint8), name="photo")


def test_official_face_index_uses_the_release_key():
    boxes = np.array(
        [
            [0, 0, 100, 100],  # area 10000, key (100 - 0) * 100 - 0 = 10000
            [0, 300, 90, 400],  # area 9000, key 90 * 400 - 300 = 35700: "the largest" for the release
            [10, 10, 20, 20],
        ],
        dtype=np.float32,
    )
    assert official_face_index(boxes) == 1
    assert official_face_index(boxes[[0, 2]]) == 0
    tie = np.array([[0, 0, 10, 10], [5, 0, 15, 10]], dtype=np.float32)  # equal keys: the later box wins
    assert official_face_index(tie) == 1
    with pytest.raises(ValueError, match="at least one box"):
        official_face_index(np.zeros((0, 4)))
