"""Kohya-format style LoRAs on a tiny FACT pipeline: the file layout, loading through diffusers/peft at a weight,
the effective weights, coexistence with the FACT adapter processors, and exact restoration of the base weights.

Exactness: ``unload_lora_weights``, ``delete_adapters`` and ``disable_lora`` never write the base weights, so they
restore the model bit for bit. ``fuse_lora`` then ``unfuse_lora`` does write them (``W + d - d``), which leaves
float rounding (about 1e-8 on these weights); it is tested only to be close, and styles never fuse.
"""

from __future__ import annotations

import copy
import functools
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from idfusion.methods.fact import (
    FaceAdapterAttnProcessor,
    adapter_sites,
    attach_face_adapter,
    load_fact_adapter,
    set_face_adapter_scale,
)
from idfusion.styles import Style, load_style_lora, unload_style_lora
from idfusion.testing import components
from idfusion.testing.kohya_lora import kohya_lora_targets, kohya_unet_name, write_kohya_lora
from idfusion.testing.tiny_fact import tiny_fact_adapter_state_dict, tiny_fact_unet_config

RANK, ALPHA, WEIGHT = 4, 2.0, 0.7
PROMPT = "a person, wearing a winter coat, photorealistic"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # The models are tiny: threads only add synchronisation, which gets very slow on a busy 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def _base() -> dict:
    """The shared, never modified parts; each :class:`Tiny` gets its own copies of the UNet and text encoder."""
    from idfusion.testing.tiny_clip_tokenizer import tiny_clip_tokenizer
    from idfusion.testing.tiny_fact import TINY_TRANSFACE_CONFIG

    unet = components.tiny_unet(seed=1, **tiny_fact_unet_config())
    adapter = load_fact_adapter(tiny_fact_adapter_state_dict(unet, seed=3), unet)
    generator = torch.Generator().manual_seed(7)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    with torch.no_grad():
        tokens = torch.randn(1, 144, TINY_TRANSFACE_CONFIG["embed_dim"], generator=generator)
        face = adapter.resampler.identity_tokens(tokens)  # (1, 16, 32)
    return {
        "unet": unet,
        "adapter": adapter,
        "text_encoder": components.tiny_text_encoder(seed=2),
        "vae": components.tiny_vae(),
        "tokenizer": tiny_clip_tokenizer(),  # the tiny text encoder's vocabulary
        "latents": latents,
        "face": face,
    }


class Tiny:
    """A tiny SD1.5 pipeline with FACT adapters (scale 0.5) and a fixed UNet input: 77 text + 16 face tokens."""

    def __init__(self):
        from diffusers import StableDiffusionPipeline

        base = _base()
        unet, text_encoder = copy.deepcopy(base["unet"]), copy.deepcopy(base["text_encoder"])
        self.adapter = base["adapter"]  # shared and never changed: LoRAs go into the UNet and text encoder only
        attach_face_adapter(unet, self.adapter)
        set_face_adapter_scale(unet, 0.5)
        self.processors = [block.attn2.processor for block in adapter_sites(unet).values()]
        assert all(isinstance(p, FaceAdapterAttnProcessor) for p in self.processors)
        self.pipe = StableDiffusionPipeline(
            base["vae"], text_encoder, base["tokenizer"], unet, components.tiny_scheduler(), None, None,
            requires_safety_checker=False,
        )  # fmt: skip
        self.latents, self.face = base["latents"], base["face"]

    @property
    def unet(self):
        return self.pipe.unet

    @property
    def text_encoder(self):
        return self.pipe.text_encoder

    def embeds(self) -> torch.Tensor:
        """Prompt embeddings ``(1, 77, 32)``."""
        with torch.no_grad():
            return self.pipe.encode_prompt(PROMPT, "cpu", 1, False)[0]

    def unet_out(self) -> torch.Tensor:
        """One UNet forward on ``[77 text | 16 face]`` tokens, ``(1, 4, 8, 8)``."""
        context = torch.cat([self.embeds(), self.face], dim=1)  # (1, 93, 32)
        assert context.shape == (1, 93, 32)
        with torch.no_grad():
            return self.unet(self.latents, 500, encoder_hidden_states=context).sample

    def states(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        return (
            {k: v.clone() for k, v in self.unet.state_dict().items()},
            {k: v.clone() for k, v in self.text_encoder.state_dict().items()},
        )

    def fact_processors_intact(self) -> bool:
        found = [m.processor for m in self.unet.modules() if hasattr(m, "processor")]
        fact = [p for p in found if isinstance(p, FaceAdapterAttnProcessor)]
        # the adapter's own layers are not LoRA targets: they stay plain Linear modules
        wrapped = any(hasattr(m, "base_layer") for m in self.adapter.modules())
        return len(fact) == 16 and fact == self.processors and not wrapped


def _assert_same_state(after: dict[str, torch.Tensor], before: dict[str, torch.Tensor]) -> None:
    assert list(after) == list(before)
    unequal = [k for k in before if not torch.equal(after[k], before[k])]
    assert not unequal, unequal[:5]


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    """The same random LoRA in diffusers and LDM block naming, and a text-encoder-only one."""
    tiny = Tiny()
    folder = tmp_path_factory.mktemp("kohya")
    kwargs = {"rank": RANK, "alpha": ALPHA, "seed": 11}
    return {
        "diffusers": write_kohya_lora(folder / "style.safetensors", tiny.unet, tiny.text_encoder, **kwargs),
        "ldm": write_kohya_lora(
            folder / "style_ldm.safetensors", tiny.unet, tiny.text_encoder, naming="ldm", **kwargs
        ),
        "te": write_kohya_lora(folder / "te_only.safetensors", None, tiny.text_encoder, **kwargs),
    }


@pytest.fixture
def tiny():
    return Tiny()


# ------------------------------------------------------------------------------------------------------------------
# The file format


def test_kohya_file_layout(lora_files, tiny):
    state = load_file(lora_files["diffusers"])
    stems = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in state}
    unet_stems = {s for s in stems if s.startswith("lora_unet_")}
    te_stems = {s for s in stems if s.startswith("lora_te_")}
    assert len(unet_stems) == 16 * 2 * 4  # 16 transformer blocks x (attn1, attn2) x (q, k, v, out)
    assert len(te_stems) == 3 * 4  # 3 CLIP layers x (q, k, v, out)
    assert len(state) == 3 * len(stems)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in unet_stems
    assert "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_out_0" in unet_stems
    assert "lora_te_text_model_encoder_layers_2_self_attn_out_proj" in te_stems
    assert not any("processor" in s for s in stems)  # the FACT adapter's own layers are not targets

    targets = kohya_lora_targets(tiny.unet, tiny.text_encoder)
    assert set(targets) == stems
    for stem, linear in targets.items():
        down, up = state[f"{stem}.lora_down.weight"], state[f"{stem}.lora_up.weight"]
        assert down.shape == (RANK, linear.in_features) and up.shape == (linear.out_features, RANK)
        assert state[f"{stem}.alpha"].shape == () and state[f"{stem}.alpha"].item() == ALPHA
        assert down.abs().min() > 0 and up.abs().min() > 0  # both factors random: the LoRA changes outputs
    with safe_open(lora_files["diffusers"], framework="pt") as f:
        assert f.metadata()["ss_network_module"] == "networks.lora"
        assert f.metadata()["ss_network_dim"] == str(RANK)


def test_ldm_naming_is_the_sd15_block_numbering(lora_files):
    """SD1.5 (2 layers per level): attentions sit at input_blocks 1,2,4,5,7,8, middle_block 1, output_blocks 3-11."""
    name = "transformer_blocks.0.attn1.to_q"
    assert kohya_unet_name(f"down_blocks.0.attentions.0.{name}", naming="ldm") == (
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"
    )
    downs = [
        kohya_unet_name(f"down_blocks.{i}.attentions.{j}.{name}", naming="ldm") for i in range(3) for j in range(2)
    ]
    ups = [kohya_unet_name(f"up_blocks.{i}.attentions.{j}.{name}", naming="ldm") for i in (1, 2, 3) for j in range(3)]
    assert [int(re.search(r"input_blocks_(\d+)_1_", n).group(1)) for n in downs] == [1, 2, 4, 5, 7, 8]
    assert [int(re.search(r"output_blocks_(\d+)_1_", n).group(1)) for n in ups] == list(range(3, 12))
    assert kohya_unet_name(f"mid_block.attentions.0.{name}", naming="ldm").startswith("lora_unet_middle_block_1_")
    with pytest.raises(ValueError, match="naming"):
        kohya_unet_name(name, naming="sgm")

    # the same seed gives the same tensors, only the names differ
    diffusers, ldm = load_file(lora_files["diffusers"]), load_file(lora_files["ldm"])
    assert len(diffusers) == len(ldm)
    assert torch.equal(
        diffusers["lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight"],
        ldm["lora_unet_output_blocks_3_1_transformer_blocks_0_attn2_to_k.lora_up.weight"],
    )
    assert not any(k.startswith(("lora_unet_down_blocks", "lora_unet_up_blocks", "lora_unet_mid_block")) for k in ldm)


# ------------------------------------------------------------------------------------------------------------------
# Loading through diffusers/peft


def test_effective_weight_is_base_plus_scaled_up_down(lora_files, tiny):
    state = load_file(lora_files["diffusers"])
    tiny.pipe.load_lora_weights(str(lora_files["diffusers"]), adapter_name="style")
    tiny.pipe.set_adapters(["style"], adapter_weights=[WEIGHT])

    targets = kohya_lora_targets(tiny.unet, tiny.text_encoder)
    assert all(hasattr(linear, "base_layer") for linear in targets.values())  # every kohya entry was applied
    checked = [
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0",
        "lora_unet_up_blocks_2_attentions_1_transformer_blocks_0_attn2_to_k",  # reads the 32-wide text context
        "lora_te_text_model_encoder_layers_1_self_attn_v_proj",
    ]
    generator = torch.Generator().manual_seed(0)
    for stem in checked:
        layer = targets[stem]
        base = layer.base_layer
        up, down = state[f"{stem}.lora_up.weight"], state[f"{stem}.lora_down.weight"]
        merged = base.weight + WEIGHT * (ALPHA / RANK) * (up @ down)  # (out, rank) @ (rank, in)
        x = torch.randn(5, base.in_features, generator=generator)
        with torch.no_grad():
            ours, reference = layer(x), F.linear(x, merged, base.bias)
            without = base(x)
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
        assert (ours - without).abs().max() > 1e-3, stem


def test_lora_changes_the_fact_unet_and_keeps_the_adapters(lora_files, tiny):
    base = tiny.unet_out()
    tiny.pipe.load_lora_weights(str(lora_files["diffusers"]), adapter_name="style")
    tiny.pipe.set_adapters(["style"], adapter_weights=[WEIGHT])
    styled = tiny.unet_out()
    assert (styled - base).abs().max() > 1e-3
    assert tiny.fact_processors_intact()

    # peft adds the LoRA term to the base output: at weight 0 that term is an exact zero
    tiny.pipe.set_adapters(["style"], adapter_weights=[0.0])
    assert torch.equal(tiny.unet_out(), base)


def test_cross_attention_lora_acts_through_the_fact_processor(lora_files, tiny, tmp_path):
    """The FACT processor replaces ``attn2``'s processor but runs the host's own ``to_q/to_k/to_v/to_out``, so a
    LoRA on those layers alone reaches the output, with the adapter on and off."""
    state = {k: v for k, v in load_file(lora_files["diffusers"]).items() if "_attn2_" in k}
    assert len(state) == 16 * 4 * 3
    save_file(state, tmp_path / "attn2.safetensors")
    base = tiny.unet_out()
    set_face_adapter_scale(tiny.unet, 0.0)
    base_without_fact = tiny.unet_out()
    tiny.pipe.load_lora_weights(str(tmp_path / "attn2.safetensors"), adapter_name="attn2")
    assert all(hasattr(block.attn2.to_k, "base_layer") for block in adapter_sites(tiny.unet).values())
    assert (tiny.unet_out() - base_without_fact).abs().max() > 1e-3
    set_face_adapter_scale(tiny.unet, 0.5)
    assert (tiny.unet_out() - base).abs().max() > 1e-3
    assert tiny.fact_processors_intact()


def test_unload_restores_the_base_weights_exactly(lora_files, tiny):
    unet_before, te_before = tiny.states()
    out_before, embeds_before = tiny.unet_out(), tiny.embeds()

    tiny.pipe.load_lora_weights(str(lora_files["diffusers"]), adapter_name="style")
    tiny.pipe.set_adapters(["style"], adapter_weights=[WEIGHT])
    assert (tiny.embeds() - embeds_before).abs().max() > 1e-3  # the text-encoder part is active
    assert (tiny.unet_out() - out_before).abs().max() > 1e-3
    assert any(".lora_A." in k for k in tiny.unet.state_dict())

    tiny.pipe.unload_lora_weights()
    unet_after, te_after = tiny.states()
    _assert_same_state(unet_after, unet_before)
    _assert_same_state(te_after, te_before)
    assert torch.equal(tiny.embeds(), embeds_before)
    assert torch.equal(tiny.unet_out(), out_before)
    assert tiny.fact_processors_intact()
    assert all(type(linear) is nn.Linear for linear in kohya_lora_targets(tiny.unet, tiny.text_encoder).values())


def _without_base_layer(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.replace(".base_layer.", "."): v for k, v in state.items()}


def test_delete_adapters_restores_the_base_exactly(lora_files, tiny):
    unet_before, te_before = tiny.states()
    out_before, embeds_before = tiny.unet_out(), tiny.embeds()
    tiny.pipe.load_lora_weights(str(lora_files["diffusers"]), adapter_name="style")
    tiny.pipe.set_adapters(["style"], adapter_weights=[WEIGHT])
    tiny.pipe.delete_adapters("style")
    # peft keeps its (now empty) wrapper modules, so the weights sit under ".base_layer." names; the values are
    # untouched and no LoRA parameter is left
    unet_after, te_after = tiny.states()
    assert not any("lora_" in k for k in [*unet_after, *te_after])
    _assert_same_state(_without_base_layer(unet_after), unet_before)
    _assert_same_state(_without_base_layer(te_after), te_before)
    assert torch.equal(tiny.embeds(), embeds_before)
    assert torch.equal(tiny.unet_out(), out_before)
    assert tiny.fact_processors_intact()


def test_disable_lora_gives_the_base_output_exactly(lora_files, tiny):
    unet_before, te_before = tiny.states()
    out_before, embeds_before = tiny.unet_out(), tiny.embeds()
    tiny.pipe.load_lora_weights(str(lora_files["diffusers"]), adapter_name="style")
    tiny.pipe.set_adapters(["style"], adapter_weights=[WEIGHT])
    styled = tiny.unet_out()

    tiny.pipe.disable_lora()
    assert torch.equal(tiny.unet_out(), out_before)
    assert torch.equal(tiny.embeds(), embeds_before)
    unet_after, te_after = tiny.states()
    base_only = {k: v for k, v in _without_base_layer(unet_after).items() if "lora_" not in k}
    _assert_same_state(base_only, unet_before)
    _assert_same_state({k: v for k, v in _without_base_layer(te_after).items() if "lora_" not in k}, te_before)

    tiny.pipe.enable_lora()
    assert torch.equal(tiny.unet_out(), styled)


def test_text_encoder_only_lora(lora_files, tiny):
    state = load_file(lora_files["te"])
    assert state and all(k.startswith("lora_te_text_model_encoder_layers_") for k in state)
    unet_before, te_before = tiny.states()
    embeds_before = tiny.embeds()
    tiny.pipe.load_lora_weights(str(lora_files["te"]), adapter_name="te")
    assert (tiny.embeds() - embeds_before).abs().max() > 1e-3
    _assert_same_state(tiny.unet.state_dict(), unet_before)  # nothing was put into the UNet
    tiny.pipe.unload_lora_weights()
    assert torch.equal(tiny.embeds(), embeds_before)
    _assert_same_state(tiny.states()[1], te_before)


def test_fuse_unfuse_is_close_but_not_the_exact_path(lora_files, tiny):
    """The official code merges the LoRA into the weights; the same result within float rounding."""
    out_before = tiny.unet_out()
    tiny.pipe.load_lora_weights(str(lora_files["diffusers"]), adapter_name="style")
    tiny.pipe.set_adapters(["style"], adapter_weights=[WEIGHT])
    styled = tiny.unet_out()
    tiny.pipe.fuse_lora(lora_scale=1.0)
    torch.testing.assert_close(tiny.unet_out(), styled, rtol=1e-5, atol=1e-5)
    tiny.pipe.unfuse_lora()
    tiny.pipe.unload_lora_weights()
    torch.testing.assert_close(tiny.unet_out(), out_before, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------------------------
# Styles


def test_load_style_lora_at_the_style_weight_and_unload(lora_files, tiny, tmp_path):
    unet_before, te_before = tiny.states()
    out_before = tiny.unet_out()
    style = Style(name="coat", prompt="{subject}, coat", lora=str(lora_files["diffusers"]), weight=WEIGHT)
    assert load_style_lora(tiny.pipe, style) == "style"
    styled = tiny.unet_out()

    reference = Tiny()
    reference.pipe.load_lora_weights(str(lora_files["diffusers"]), adapter_name="ref")
    reference.pipe.set_adapters(["ref"], adapter_weights=[WEIGHT])
    assert torch.equal(styled, reference.unet_out())

    unload_style_lora(tiny.pipe)
    _assert_same_state(tiny.states()[0], unet_before)
    _assert_same_state(tiny.states()[1], te_before)
    assert torch.equal(tiny.unet_out(), out_before)

    # an explicit weight overrides the style's; out-of-range weights are refused before loading
    assert load_style_lora(tiny.pipe, style, weight=0.0, adapter_name="zero") == "zero"
    assert torch.equal(tiny.unet_out(), out_before)
    unload_style_lora(tiny.pipe)
    with pytest.raises(ValueError, match="weight"):
        load_style_lora(tiny.pipe, style, weight=3.0)
    assert not any("lora_" in k for k in tiny.unet.state_dict())


def test_ldm_named_lora_loads_like_the_diffusers_named_one(lora_files, tiny):
    """civitai-style LDM block names map onto the same layers (load_style_lora passes the UNet config on)."""
    diffusers_named = Tiny()
    load_style_lora(diffusers_named.pipe, Style(name="a", prompt="{subject}", lora=str(lora_files["diffusers"])))
    load_style_lora(tiny.pipe, Style(name="b", prompt="{subject}", lora=str(lora_files["ldm"])))
    for ours, reference in ((tiny.unet, diffusers_named.unet), (tiny.text_encoder, diffusers_named.text_encoder)):
        _assert_same_state(ours.state_dict(), reference.state_dict())  # every LoRA factor on the same layer
    # Not bitwise: the factors are equal but sit at other offsets of the memory-mapped files, and CPU matmul
    # kernels round differently for differently aligned operands.
    torch.testing.assert_close(tiny.unet_out(), diffusers_named.unet_out(), rtol=0, atol=1e-5)
    torch.testing.assert_close(tiny.embeds(), diffusers_named.embeds(), rtol=0, atol=1e-5)
