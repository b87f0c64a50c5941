"""The pipeline contract, for every registered method, on its tiny release (diffusers' PipelineTesterMixin idea).

Each test runs over the method registry, so a newly registered method is held to the same contract without a line
here: same seed same image, a batch equals its single images (and ``--from`` replays each), save -> load round trip,
an assigned scheduler is respected, diffusers' callback contract, every ``output_type``, ``generator=``, CPU offload
where a device allows it, and clear errors for bad options.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from idfusion.registry import get_method, method_names

SIZE = 64
STEPS = 2


@pytest.fixture(scope="module", params=method_names())
def case(request, tiny_release, faces_dir):
    """(method, tiny release folder, loaded pipeline, call arguments standing for the identity)."""
    from idfusion.registry import load_pipeline

    method = request.param
    folder = tiny_release(method)
    pipe = load_pipeline(method, str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    identity = pipe.encode_identity([faces_dir / "obama.jpg"])
    return method, folder, pipe, identity


def _call(pipe, identity, **kwargs):
    kwargs = {"num_inference_steps": STEPS, "height": SIZE, "width": SIZE, "output_type": "np", **kwargs}
    if "generator" not in kwargs:
        kwargs.setdefault("seed", 0)
    return pipe(**identity, **kwargs)


def _images(pipe, identity, **kwargs) -> np.ndarray:
    return np.asarray(_call(pipe, identity, **kwargs).images)


def test_every_method_has_every_registry_entry():
    from idfusion.registry import FEATURE_OPTIONS, FEATURES, methods, resolve

    for spec in methods():
        assert spec.name and spec.title and spec.summary and spec.identity in ("embedding", "photos")
        cls = resolve(spec.pipeline)
        assert callable(resolve(spec.tiny))
        for reference in (spec.converter, spec.bench):
            if reference is not None:
                assert resolve(reference) is not None
        assert set(spec.features) <= FEATURES
        import inspect

        call = inspect.signature(cls.__call__).parameters
        load = inspect.signature(cls.from_pretrained).parameters
        for option in spec.all_options():  # every option reaches a real argument of the pipeline
            target = load if option.target == "load" else call
            assert option.call_argument in target, (spec.name, option.flag)
        for feature in spec.features:
            assert feature in FEATURE_OPTIONS
        assert spec.identity != "embedding" or "id_embeds" in call
        for name in ("seed", "generator", "output_type", "callback_on_step_end", "num_images_per_prompt"):
            assert name in call, (spec.name, name)


def test_same_seed_same_image_and_seeds_differ(case):
    _, _, pipe, identity = case
    first, again = _images(pipe, identity, seed=3), _images(pipe, identity, seed=3)
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - _images(pipe, identity, seed=4)).max() > 1e-3


def test_batch_equals_its_single_images(case):
    _, _, pipe, identity = case
    batch = _images(pipe, identity, seed=10, num_images_per_prompt=2)
    singles = np.concatenate([_images(pipe, identity, seed=s) for s in (10, 11)])
    np.testing.assert_allclose(batch, singles, atol=2e-5)


def test_from_replays_every_image_of_a_batch(case, faces_dir, tmp_path, capsys):
    """``generate --num-images 2``, then ``--from`` each image alone: the same pixels (the registry replays every
    recorded option)."""
    from PIL import Image

    from idfusion.cli.main import main
    from idfusion.outputs import read_generation_metadata

    method, folder, _, _ = case
    face = ["--face", str(faces_dir / "obama.jpg")]
    common = ["--model", str(folder), "--steps", str(STEPS), "--width", str(SIZE), "--height", str(SIZE), *face]
    assert main(["generate", "--method", method, *common, "--num-images", "2", "--seed", "5", "--out",
                 str(tmp_path / "a"), "--no-contact-sheet"]) == 0  # fmt: skip
    made = capsys.readouterr().out.split()
    assert len(made) == 2
    for path in made:
        # an image that records its identity embedding replays without the photos (not a joint AdaFace image,
        # whose ConsistentID branch reads the photos themselves)
        recorded = get_method(method).identity == "embedding" and "id_embeds" in read_generation_metadata(path)
        again = ["--model", str(folder), *([] if recorded else face)]
        assert main(["generate", "--from", path, *again, "--out", str(tmp_path / "b"), "--no-contact-sheet"]) == 0
        replay = capsys.readouterr().out.split()[0]
        made_pixels, replayed = np.asarray(Image.open(path), np.int16), np.asarray(Image.open(replay), np.int16)
        # the same seed and settings; a batch of 2 and a single image differ only in float rounding (BLAS
        # kernels depend on the batch size), so at most a few pixels are 1/255 apart
        difference = np.abs(made_pixels - replayed)
        assert difference.max() <= 1 and (difference > 0).mean() < 1e-3


def test_save_then_load_gives_the_same_images(case, tmp_path):
    method, _, pipe, identity = case
    before = _images(pipe, identity, seed=2)
    pipe.save_pretrained(tmp_path / "saved")
    loaded = type(pipe).from_pretrained(tmp_path / "saved", **get_method(method).load_arguments)
    loaded.set_progress_bar_config(disable=True)
    loaded.set_face_analyzer(pipe.default_face_analyzer())  # face models are not pipeline components
    assert type(loaded) is type(pipe)
    np.testing.assert_array_equal(_images(loaded, identity, seed=2), before)


def test_an_assigned_scheduler_is_respected(case):
    from diffusers import EulerDiscreteScheduler

    _, _, pipe, identity = case
    default = pipe.scheduler
    try:
        plain = _images(pipe, identity, seed=1)
        pipe.scheduler = EulerDiscreteScheduler.from_config(default.config)  # diffusers' idiom
        first = _call(pipe, identity, seed=1)
        assert isinstance(pipe.scheduler, EulerDiscreteScheduler)  # not undone by the call
        assert first.metadata[0]["scheduler"] == "euler"
        assert np.abs(np.asarray(first.images) - plain).max() > 1e-4
        np.testing.assert_array_equal(_images(pipe, identity, seed=1), np.asarray(first.images))
        # a call's own scheduler name is for that call only
        named = _call(pipe, identity, seed=1, scheduler="ddim")
        assert named.metadata[0]["scheduler"] == "ddim" and isinstance(pipe.scheduler, EulerDiscreteScheduler)
    finally:
        pipe.scheduler = default


def test_the_callback_contract(case):
    _, _, pipe, identity = case
    seen = []

    def callback(owner, step, timestep, tensors):
        seen.append((owner, step, set(tensors)))
        return {"latents": torch.zeros_like(tensors["latents"])}

    out = _call(pipe, identity, output_type="latent", callback_on_step_end=callback)
    # one call per timestep (PNDM's first step takes two: its 2 steps are 3 timesteps)
    assert len(seen) >= STEPS and [s for _, s, _ in seen] == list(range(len(seen)))
    assert all(owner is pipe for owner, _, _ in seen)  # the user's pipeline, not an inner one
    assert all(names == {"latents"} for _, _, names in seen)
    assert torch.count_nonzero(torch.as_tensor(out.images)) == 0  # the returned latents were used
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        _call(pipe, identity, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["nope"])


def test_every_output_type(case):
    from PIL import Image

    _, _, pipe, identity = case
    pil = _call(pipe, identity, output_type="pil").images
    array = _call(pipe, identity, output_type="np").images
    tensor = _call(pipe, identity, output_type="pt").images
    latent = _call(pipe, identity, output_type="latent").images
    assert isinstance(pil, list) and isinstance(pil[0], Image.Image) and pil[0].size == (SIZE, SIZE)
    assert isinstance(array, np.ndarray) and array.shape == (1, SIZE, SIZE, 3)
    assert isinstance(tensor, torch.Tensor) and tuple(tensor.shape) == (1, 3, SIZE, SIZE)
    np.testing.assert_allclose(tensor.permute(0, 2, 3, 1).numpy(), array, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(pil[0]), (array[0] * 255).round().astype(np.uint8))
    assert isinstance(latent, torch.Tensor) and tuple(latent.shape) == (1, 4, SIZE // 8, SIZE // 8)


def test_a_generator_stands_for_a_seed(case):
    _, _, pipe, identity = case
    by_seed = _images(pipe, identity, seed=7, num_images_per_prompt=2)
    generators = [torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)]
    out = _call(pipe, identity, generator=generators, num_images_per_prompt=2)
    np.testing.assert_array_equal(np.asarray(out.images), by_seed)
    assert out.metadata[0]["seed"] is None  # not replayable from a seed, and it says so
    with pytest.raises(ValueError, match="seed or generator"):
        _call(pipe, identity, seed=1, generator=generators[0])


def test_cpu_offload_where_the_device_allows_it(case):
    _, _, pipe, identity = case
    names = pipe.model_cpu_offload_seq.split("->")
    components = pipe.components
    assert all(name in components for name in names)  # the offload order names real components
    if not torch.cuda.is_available():
        pytest.skip("model CPU offload moves models to a GPU; none here")
    pipe.enable_model_cpu_offload()
    try:
        assert _images(pipe, identity).shape == (1, SIZE, SIZE, 3)
    finally:
        pipe.remove_all_hooks()
        pipe.to("cpu")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"guidance_scale": float("nan")}, "guidance_scale"),
        ({"height": 60}, "multiple of 8"),
        ({"output_type": "jpeg"}, "output_type"),
        ({"scheduler": "nonsense"}, "unknown scheduler"),
        ({"num_images_per_prompt": 0}, "num_images_per_prompt"),
    ],
)
def test_bad_options_are_clear_errors(case, options, message):
    _, _, pipe, identity = case
    with pytest.raises(ValueError, match=message):
        _call(pipe, identity, **options)


def test_a_saved_folder_without_its_frozen_parts_names_what_is_missing(tmp_path):
    from idfusion.errors import ModelFilesError
    from idfusion.pipelines.core import load_base_components

    config = {"vae": ["diffusers", "AutoencoderKL"], "unet": [None, None], "settings": {}}
    assert load_base_components(tmp_path, config, ("unet",)) == {}  # a null entry is no component
    with pytest.raises(ModelFilesError, match="has no vae/ and names no base_model"):
        load_base_components(tmp_path, config, ("vae", "unet"))
    config["settings"]["base_model"] = "base"
    with pytest.raises(ModelFilesError, match="its base_model .* has no vae/"):
        load_base_components(tmp_path, config, ("vae",))
