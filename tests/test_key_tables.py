"""Key maps as data: each checkpoint map is written once (model key -> official key) and read both ways.

The generic :class:`~idfusion.convert.keymap.ModuleKeyMap` on a toy map (fusion, reshapes, copies, refused
clashes), then every map of both releases over the keys of its full-size target model on the meta device: each model
key has one official place, or is one part of a declared fusion, and the table reads back to exactly those keys.
"""

from __future__ import annotations

import pytest
import torch

from idfusion.convert import feedface, flashface
from idfusion.convert.keymap import ModuleKeyMap, Slot

TOY = {
    "a.weight": Slot("x.weight"),
    "a_copy.weight": Slot("x.weight", copy=True),
    "q.weight": Slot("qkv.weight", (0, 3), "1x1"),
    "k.weight": Slot("qkv.weight", (1, 3), "1x1"),
    "v.weight": Slot("qkv.weight", (2, 3), "1x1"),
    "pos": Slot("pos", reshape="unbatch"),
}


def _official() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "x.weight": torch.randn(4, 2, generator=generator),
        "qkv.weight": torch.randn(6, 2, 1, 1, generator=generator),
        "pos": torch.randn(1, 5, 2, generator=generator),
    }


def test_a_derived_map_reads_both_ways() -> None:
    table = ModuleKeyMap.derive(["v.weight", "a_copy.weight", "pos", "k.weight", "a.weight", "q.weight"], TOY.get)
    # parts in row order and copies last, whatever order the model lists its keys in
    assert table.groups == {
        "qkv.weight": ("q.weight", "k.weight", "v.weight"),
        "x.weight": ("a.weight", "a_copy.weight"),
        "pos": ("pos",),
    }
    assert table.unmapped == () and table.incomplete() == [] and table.split_count("qkv.weight") == 3

    official = _official()
    model, sources, unknown = table.from_official({**official, "extra.weight": torch.zeros(1)})
    assert unknown == ["extra.weight"]
    assert sources["k.weight"] == "qkv.weight" and sources["a_copy.weight"] == "x.weight"
    assert {k: tuple(v.shape) for k, v in model.items()} == {
        "q.weight": (2, 2), "k.weight": (2, 2), "v.weight": (2, 2), "a.weight": (4, 2), "a_copy.weight": (4, 2),
        "pos": (5, 2),
    }  # fmt: skip
    assert torch.equal(model["k.weight"], official["qkv.weight"][2:4, :, 0, 0])
    assert model["a_copy.weight"] is official["x.weight"]
    # parts are copies by default (views would share storage, which safetensors refuses), views on request
    storage = official["qkv.weight"].untyped_storage().data_ptr()
    assert model["q.weight"].untyped_storage().data_ptr() != storage
    views = table.from_official(official, clone_parts=False)[0]
    assert views["q.weight"].untyped_storage().data_ptr() == storage

    back = table.to_official(model)
    assert list(back) == list(table.groups)
    assert all(torch.equal(back[k], v) and back[k].shape == v.shape for k, v in official.items())


def test_rows_that_do_not_divide_go_whole_to_each_part() -> None:
    table = ModuleKeyMap.derive(TOY, TOY.get)
    model = table.from_official({"qkv.weight": torch.zeros(7, 2, 1, 1)})[0]
    assert [tuple(model[k].shape) for k in ("q.weight", "k.weight", "v.weight")] == [(7, 2)] * 3  # for shape checks


def test_incomplete_fusions_and_unmapped_keys_are_named_and_not_written() -> None:
    table = ModuleKeyMap.derive(["q.weight", "a.weight", "nope"], TOY.get)
    assert table.incomplete() == ["q.weight"] and table.unmapped == ("nope",)
    assert set(table.to_official({"q.weight": torch.zeros(2, 2), "a.weight": torch.zeros(4, 2)})) == {"x.weight"}
    copy_only = ModuleKeyMap.derive(["a_copy.weight"], TOY.get)
    assert copy_only.incomplete() == [] and copy_only.to_official({"a_copy.weight": torch.zeros(1)}) == {}


@pytest.mark.parametrize(
    "rules",
    [
        {"a": Slot("x"), "b": Slot("x")},  # two maps of one tensor: what a second, drifted copy of a map produces
        {"a": Slot("x", (0, 2)), "b": Slot("x", (0, 2))},
        {"a": Slot("x", (0, 2)), "b": Slot("x", (1, 3))},
        {"a": Slot("x"), "b": Slot("x", (1, 2))},
        {"a": Slot("x", (2, 2))},
    ],
)
def test_a_map_that_claims_one_official_tensor_twice_is_refused(rules: dict[str, Slot]) -> None:
    with pytest.raises(ValueError, match="claim one official tensor: x <- "):
        ModuleKeyMap.derive(rules, rules.get)


# --------------------------------------------------------------------------------------------------------------------
# Every map, over its full-size model's keys
# --------------------------------------------------------------------------------------------------------------------


def _full_size(name: str) -> tuple[dict[str, torch.Tensor], ModuleKeyMap]:
    from diffusers import AutoencoderKL, UniDiffuserModel, UniDiffuserTextDecoder

    from idfusion.sd15 import (
        build_text_encoder,
        build_vae,
        official_state_dict,
        sd15_text_encoder_config,
        sd15_vae_config,
    )

    with torch.device("meta"):
        if name == "flashface-text":
            state = official_state_dict(build_text_encoder(sd15_text_encoder_config()))
            return state, flashface.flashface_text_key_map(state)
        if name == "flashface-vae":
            state = build_vae(sd15_vae_config()).state_dict()
            return state, flashface.flashface_vae_key_map(state)
        if name == "uvit":
            state = UniDiffuserModel(**feedface.UVIT_V1_CONFIG).state_dict()
            return state, feedface.uvit_key_map(state)
        if name == "autoencoder":
            state = AutoencoderKL(**feedface.VAE_CONFIG).state_dict()
            return state, feedface.autoencoder_key_map(state)
        state = UniDiffuserTextDecoder(**feedface.TEXT_DECODER_CONFIG).state_dict()
        return state, feedface.caption_decoder_key_map(state)


# name: (official keys, of which fused (parts each), model keys that are copies)
FULL_SIZE = {
    "flashface-text": (148, 24, 0),  # 12 layers x to_qkv weight/bias; textual.head is not in CLIPTextModel
    "flashface-vae": (240, 4, 0),  # encoder/decoder mid attention to_qkv weight/bias
    "uvit": (len(feedface.official_uvit_keys()), 31, 2),  # 15 + mid + 15 blocks; pos_embed.proj copies
    "autoencoder": (248, 0, 0),
    "caption-decoder": (153, 0, 0),
}


@pytest.mark.parametrize("name", list(FULL_SIZE))
def test_every_full_size_model_key_has_one_official_place(name: str) -> None:
    state, table = _full_size(name)
    num_official, num_fused, num_copies = FULL_SIZE[name]
    assert table.unmapped == () and table.incomplete() == []
    assert len(table.groups) == num_official
    # and back: the groups hold every model key once, each under the official key it names
    assert sorted(k for members in table.groups.values() for k in members) == sorted(state)
    assert all(table.slots[k].key == official for official, members in table.groups.items() for k in members)
    fused = 0
    for official, members in table.groups.items():
        owners = [k for k in members if not table.slots[k].copy]
        if len(owners) > 1:
            fused += 1
            assert [table.slots[k].part for k in owners] == [(i, len(owners)) for i in range(len(owners))], official
        else:
            assert len(owners) == 1 and table.slots[owners[0]].part is None, official
    assert fused == num_fused
    assert sum(slot.copy for slot in table.slots.values()) == num_copies
