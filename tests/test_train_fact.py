"""The fact recipe on a tiny random SD1.5 base (v-prediction, zero terminal SNR, a 4x VAE), a tiny TransFace and a
tiny world training set: FAIR against a hand computation, the FAIR probe against the adapter's own arithmetic, the
seeded face shuffle and drop, a learning run whose saved folder loads through the registry and generates, resume,
and config errors that name their field."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from idfusion.training.config import ConfigError, load_config
from idfusion.training.core import train
from idfusion.training.logs import read_metrics
from idfusion.training.recipes.fact import (
    FactDataset,
    FactModels,
    FactRecipe,
    RecognizerTokenEncoder,
    fair_loss,
    fair_ratio,
)
from test_train_flashface import tiny_base, world_set  # noqa: F401 - registers its fixtures here
from test_training_core import (  # the training core's autouse fixtures apply here too
    QUIET_LOGS,
    SimulatedCrash,
    crashing,
    fresh_accelerate_state,  # noqa: F401
    max_difference,
    one_thread,  # noqa: F401
    reset_accelerate,
)

RECIPE = "fact"
TINY_RESAMPLER = {"dim": 32, "depth": 1, "dim_head": 8, "heads": 4}


@pytest.fixture(scope="module")
def base(request) -> Path:
    """flashface's tiny base (4x VAE, v-prediction, zero terminal SNR: the world base's kind)."""
    return request.getfixturevalue("tiny_base")


@pytest.fixture(scope="module")
def world(request) -> Path:
    """flashface's tiny world training set (6 identities x 3 renders, same-identity references)."""
    return request.getfixturevalue("world_set")


@pytest.fixture(scope="module")
def transface_file(tmp_path_factory) -> Path:
    from idfusion.testing.tiny_fact import tiny_transface

    path = tmp_path_factory.mktemp("transface") / "ms1mv2_model_TransFace_S.pt"
    torch.save(tiny_transface(0).state_dict(), path)
    return path


def document(base: Path, data: Path, output: Path, face_encoder: Path | str, every: int = 100, **train_options):
    options = {"max_steps": 30, "batch_size": 4, "learning_rate": 3e-3, "lr_scheduler": "constant"}
    options.update(train_options)
    return {
        "recipe": {
            "name": RECIPE,
            "pretrained": str(base),
            "face_encoder": str(face_encoder),
            "resampler": TINY_RESAMPLER,
            "adapter_init": "zero-output",
            "face_shuffle": 0.5,
            "sampling": {
                "num_inference_steps": 2,
                "guidance_scale": 3.0,
                "negative_prompt": "",
                "default_lora": "off",
            },
        },
        "data": {"train": str(data), "resolution": 64},
        "train": options,
        "checkpoint": {"every_steps": every},
        "log": QUIET_LOGS,
        "seed": 3,
        "output_dir": str(output),
    }


def _run(config, recipe_class=FactRecipe, **options):
    # by class: the loaded config names the recipe "fact"
    return train(config, recipe_class=recipe_class, **options)


def _config(*args, **kwargs):
    return load_config(document=document(*args, **kwargs))


# -- FAIR -------------------------------------------------------------------------------------------------------------


def test_fair_loss_equals_a_hand_computation():
    generator = torch.Generator().manual_seed(0)
    masks = (torch.rand(2, 1, 4, 4, generator=generator) > 0.5).float()  # (B, 1, R, R)
    sites = [(torch.randn(2, n, 3, generator=generator), torch.randn(2, n, 3, generator=generator)) for n in (4, 16)]

    expected = []
    for hidden, increment in sites:
        side = int(np.sqrt(hidden.shape[1]))
        block = 4 // side
        for b in range(2):
            num = den = 0.0
            for i in range(side):
                for j in range(side):
                    face = float(masks[b, 0, i * block : (i + 1) * block, j * block : (j + 1) * block].mean())
                    token = i * side + j
                    num += sum((float(increment[b, token, c]) * (1 - face)) ** 2 for c in range(3))
                    den += sum((float(hidden[b, token, c]) * (1 - face)) ** 2 for c in range(3))
            expected.append(np.sqrt(num) / np.sqrt(den))
    assert float(fair_loss(sites, masks)) == pytest.approx(np.mean(expected), rel=1e-5)
    # all face: nothing outside to penalise; no face: the plain relative increment
    hidden, increment = sites[0]
    assert fair_ratio(increment, hidden, torch.ones(2, 4)).abs().max() == 0
    plain = increment.flatten(1).norm(dim=1) / hidden.flatten(1).norm(dim=1)
    torch.testing.assert_close(fair_ratio(increment, hidden, torch.zeros(2, 4)), plain)


def test_fair_probe_records_exactly_what_each_site_adds(base):
    """Per site, the block's attn2 returns ``host(ln(x + increment), text) + increment``: the probe's increment is
    the adapter's."""
    from diffusers import UNet2DConditionModel

    from idfusion.methods.fact import FactFaceAdapter, _host_cross_attention, adapter_sites

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    adapter = FactFaceAdapter.for_unet(unet, resampler={**TINY_RESAMPLER, "embedding_dim": 16})
    with torch.no_grad():
        for site in adapter.sites:
            site.alpha_attn.fill_(0.5)
            site.alpha_dense.fill_(-0.3)
    model = FactModels(unet, adapter, scale=0.7)
    blocks = list(adapter_sites(unet).values())
    seen = []
    hooks = [
        block.attn2.register_forward_hook(lambda m, args, kwargs, out: seen.append((m, kwargs, out)), with_kwargs=True)
        for block in blocks
    ]
    text = torch.randn(2, 77, 32)
    with torch.no_grad():
        _, sites = model(torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), text, torch.randn(2, 144, 16),
                         torch.tensor([True, False]), fair=True)  # fmt: skip
    for hook in hooks:
        hook.remove()
    assert len(sites) == len(seen) == len(blocks)
    site_of = {block.attn2: site for block, site in zip(blocks, adapter.sites, strict=True)}
    for (hidden, increment), (attn, kwargs, out) in zip(sites, seen, strict=True):  # both in the order they ran
        site = site_of[attn]
        assert float(increment.abs().max()) > 0
        context = kwargs["encoder_hidden_states"][:, :-16]
        expected = _host_cross_attention(attn, site.ln(hidden + increment), context) + increment
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    model.detach()  # the base UNet again
    assert not any(type(b.attn2.processor).__name__ == "FaceAdapterAttnProcessor" for b in blocks)


# -- data -------------------------------------------------------------------------------------------------------------


def test_samples_draw_everything_from_their_seed_and_shuffle_faces_within_the_identity(world):
    from idfusion.training import read_jsonl

    records = read_jsonl(world)
    dataset = FactDataset(records, 64, face_shuffle=0.5, face_drop=0.5)
    items = [dataset[(k % len(dataset), 500 + k)] for k in range(16)]
    again = [dataset[(k % len(dataset), 500 + k)] for k in range(16)]
    for a, b in zip(items, again, strict=True):
        assert torch.equal(a["face_pixels"], b["face_pixels"]) and a["keep_face"] == b["keep_face"]
    assert {item["keep_face"] for item in items} == {True, False}
    assert items[0]["face_pixels"].shape == (3, 112, 112) and items[0]["face_mask"].shape == (1, 64, 64)

    own = FactDataset(records, 64)  # no shuffle: the target's own face
    shuffled = FactDataset(records, 64, face_shuffle=1.0)  # always another image of the identity
    for k in range(len(records)):
        record = records[k]
        crop = torch.from_numpy(own.face_crop(record.image, record)).permute(2, 0, 1).float().div(127.5).sub(1.0)
        assert torch.equal(own[(k, 7)]["face_pixels"], crop)
        other = shuffled[(k, 7)]["face_pixels"]
        references = [own.face_crop(path, record) for path in record.references]
        assert any(
            torch.equal(other, torch.from_numpy(r).permute(2, 0, 1).float().div(127.5).sub(1.0)) for r in references
        )
        assert not torch.equal(other, crop)
    face = own[(0, 0)]["face_mask"]
    assert 0 < float(face.mean()) < 1  # the record's face mask, for FAIR


def test_world_encoder_is_the_conditioning_recognizers_trunk():
    from idfusion.world.backends import weights_path
    from idfusion.world.nets import load_net

    encoder = RecognizerTokenEncoder.from_world()
    net, _ = load_net(weights_path("world"))
    for (name, mine), theirs in zip(encoder.features.state_dict().items(), net.features.state_dict().values(),
                                    strict=True):  # fmt: skip
        assert torch.equal(mine, theirs), name
    tokens = encoder(torch.rand(2, 3, 112, 112) * 2 - 1)
    assert tokens.shape == (2, encoder.num_tokens, encoder.token_dim) == (2, 16, 128)
    assert not any(p.requires_grad for p in encoder.parameters())


# -- training ---------------------------------------------------------------------------------------------------------


def test_recipe_learns_and_saves_a_folder_the_registry_loads(
    base,
    world,
    transface_file,
    tmp_path,
):
    from idfusion import registry
    from idfusion.world import render
    from idfusion.world.plans import plans_for
    from idfusion.world.train_method import ship

    result = _run(_config(base, world, tmp_path / "run", transface_file))
    rows = read_metrics(tmp_path / "run/logs/metrics.csv")
    losses = [row["loss"] for row in rows]
    assert len(losses) == 30 and all(row["fair"] >= 0 for row in rows)
    early, late = np.mean(losses[:5]), np.mean(losses[-5:])
    assert late < 0.8 * early, losses

    model = result.model_dir
    index = json.loads((model / "model_index.json").read_text())
    assert index["_class_name"] == "FactPipeline" and index["face_adapter"] == [
        "idfusion.methods.fact",
        "FactFaceAdapter",
    ]
    assert index["scheduler"][1] == "DPMSolverMultistepScheduler"  # zero terminal SNR: not the release's PNDM
    assert index["settings"]["num_inference_steps"] == 2
    for name in ("unet", "vae"):  # frozen: the base's own weights
        assert max_difference(model / name / "diffusion_pytorch_model.safetensors",
                              base / name / "diffusion_pytorch_model.safetensors") == 0  # fmt: skip
    config = json.loads((model / "face_adapter/config.json").read_text())
    assert config["resampler_config"]["num_input_tokens"] == 144 and config["cross_attention_dim"] == 32

    # shipped as the world ships it: the components equal to the base's left out, loaded from its base_model
    shipped = tmp_path / "weights/methods/fact"
    shared = ship(model, shipped, base, plans_for("fact")["full"].shared_components)
    assert {"vae", "text_encoder", "tokenizer"} <= set(shared)
    assert not any((shipped / name).exists() for name in shared)

    pipe = registry.load_pipeline("fact", str(shipped))
    pipe.configure_face_analysis(detector="world", recognizer="world")
    pipe.set_progress_bar_config(disable=True)
    person = render(5, image_seed=1)
    out = pipe(faces=[person.image], prompt=person.caption, seed=0, output_type="np")
    assert out.images.shape == (1, 64, 64, 3) and float(out.images.std()) > 0
    meta = out.metadata[0]  # the folder's settings are the call defaults
    assert meta["steps"] == 2 and meta["guidance_scale"] == 3.0 and meta["negative_prompt"] == ""
    base_image = pipe(faces=[person.image], prompt=person.caption, seed=0, output_type="np", adapter_scale=0.0)
    assert float(np.abs(out.images - base_image.images).max()) > 0  # the trained adapter changes the image


CrashingRecipe = crashing(FactRecipe)


def test_resume_after_a_crash_equals_the_uninterrupted_run(
    base,
    world,
    transface_file,
    tmp_path,
):
    options = {"max_steps": 6, "batch_size": 2, "gradient_accumulation_steps": 2, "lr_scheduler": "cosine",
               "lr_warmup_steps": 2}  # fmt: skip
    reference = _config(base, world, tmp_path / "reference", transface_file, every=2, **options)
    _run(reference)
    reset_accelerate()

    crashed = _config(base, world, tmp_path / "crashed", transface_file, every=2, **options)
    with pytest.raises(SimulatedCrash):
        _run(crashed, CrashingRecipe)
    reset_accelerate()
    _run(crashed, resume="latest")

    for name in ("checkpoints/checkpoint-6/model.safetensors",
                 "model/face_adapter/diffusion_pytorch_model.safetensors"):  # fmt: skip
        assert max_difference(tmp_path / "reference" / name, tmp_path / "crashed" / name) <= 1e-6, name
    losses = [
        [row["loss"] for row in read_metrics(f / "logs/metrics.csv")]
        for f in (reference.output_dir, crashed.output_dir)
    ]
    assert len(losses[0]) == 6 and losses[0] == pytest.approx(losses[1], abs=1e-6)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"face_encoder": None}, "recipe.face_encoder"),
        ({"face_encoder": "/no/such/transface.pt"}, "recipe.face_encoder"),
        ({"fair_weight": -1.0}, "recipe.fair_weight"),
        ({"face_shuffle": 1.5}, "recipe.face_shuffle"),
        ({"resampler": {"dimm": 8}}, "recipe.resampler"),
        ({"sampling": {"guidance": 3.0}}, "recipe.sampling"),
        ({"adapter_init": "random"}, "recipe.adapter_init"),
        ({"pretrained": None}, "recipe.pretrained"),
    ],
)
def test_bad_config_fails_fast_naming_the_field(
    base,
    world,
    transface_file,
    tmp_path,
    change,
    field,
):
    doc = document(base, world, tmp_path / "run", transface_file)
    doc["recipe"] = {k: v for k, v in {**doc["recipe"], **change}.items() if v is not None}
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(document=doc)
