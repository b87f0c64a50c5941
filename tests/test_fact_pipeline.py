"""FactPipeline on the tiny official-layout release: face-CFG context, adapter scale, ControlNet, styles, inpainting."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from idfusion.flows.template import template_portraits
from idfusion.methods import fact

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    from idfusion.testing import make_tiny

    folder = tmp_path_factory.mktemp("fact")
    make_tiny("fact", folder)
    return folder


@pytest.fixture(scope="module")
def pipe(release):
    from idfusion.pipelines import FactPipeline

    pipe = FactPipeline.from_pretrained(release, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def obama_tokens(pipe, faces_dir):
    return pipe.encode_faces([faces_dir / "obama.jpg"])


def _run(pipe, **kwargs):
    kwargs.setdefault("seed", 0)
    kwargs.setdefault("num_inference_steps", 3)
    return np.stack(pipe(output_type="np", **kwargs).images)


def test_release_loads_with_adapters_at_16_sites_and_default_settings(pipe, release):
    processors = [p for p in pipe.unet.attn_processors.values() if isinstance(p, fact.FaceAdapterAttnProcessor)]
    assert len(processors) == 16
    assert pipe.face_encoder is not None and pipe.face_adapter is not None
    assert pipe.controlnet is not None  # the release's controlnet/ folder
    controlnet_processors = set(map(type, pipe.controlnet.attn_processors.values()))
    assert controlnet_processors == {fact.TextOnlyControlNetProcessor}
    assert pipe.model_info["adapter"] == "majicmix"
    assert pipe.model_info["base_model"] == str(release / "stable-diffusion-v1-5")


def test_face_tokens_shapes_several_photos_and_null_face(pipe, faces_dir):
    one = pipe.encode_faces(faces_dir / "obama.jpg")
    two = pipe.encode_faces([faces_dir / "obama.jpg", faces_dir / "obama_rgba.png"])
    width = pipe.text_encoder.config.hidden_size
    assert one.tokens.shape == (1, 16, width) and one.num_photos == 1
    assert two.tokens.shape == (1, 32, width) and two.num_photos == 2
    torch.testing.assert_close(two.tokens[:, :16], one.tokens)  # each photo is encoded on its own
    assert two.unconditional.shape == two.tokens.shape
    resampler = pipe.face_adapter.resampler
    zeros = torch.zeros(1, resampler.num_input_tokens, resampler.embedding_dim)
    torch.testing.assert_close(one.unconditional, resampler(zeros))
    crop = one.references[0]
    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
    assert (crop[-3:, :3] == 0).all() and (crop[-3:, -3:] == 0).all()  # below the jaw, outside the head mask: 0
    assert crop[40:80, 40:80].mean() > 20  # the face itself is kept


def test_scale_zero_equals_the_base_pipeline(pipe, release, obama_tokens):
    from diffusers import StableDiffusionPipeline

    base = StableDiffusionPipeline.from_pretrained(
        release / "stable-diffusion-v1-5", safety_checker=None, requires_safety_checker=False
    )
    base.set_progress_bar_config(disable=True)
    prompt, negative = "a person at the beach", "blurry"
    ours = _run(pipe, face_tokens=obama_tokens, prompt=prompt, negative_prompt=negative, adapter_scale=0.0)
    theirs = base(
        prompt, negative_prompt=negative, num_inference_steps=3, guidance_scale=7.0, output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images  # fmt: skip
    np.testing.assert_array_equal(ours, theirs)
    with_face = _run(pipe, face_tokens=obama_tokens, prompt=prompt, negative_prompt=negative)
    assert np.abs(with_face - ours).max() > 1e-3  # scale 0.5 (the default) does change the image


def test_face_cfg_negative_branch_gets_the_null_face(pipe, obama_tokens, monkeypatch):
    from idfusion.pipelines import pipeline_fact

    seen = []
    original = pipeline_fact.sample_sd15

    def spy(owner, prompt_embeds, negative_prompt_embeds, settings, **kwargs):
        batch = settings.batch_size  # sample_sd15 expands (1, L, D) to the batch
        seen.append(
            (prompt_embeds.expand(batch, -1, -1).clone(), negative_prompt_embeds.expand(batch, -1, -1).clone())
        )
        return original(owner, prompt_embeds, negative_prompt_embeds, settings, **kwargs)

    monkeypatch.setattr(pipeline_fact, "sample_sd15", spy)
    _run(pipe, face_tokens=obama_tokens, num_images_per_prompt=2, num_inference_steps=1)
    positive, negative = seen[0]
    assert positive.shape == (2, 77 + 16, pipe.text_encoder.config.hidden_size)
    torch.testing.assert_close(positive[:, 77:], obama_tokens.tokens.expand(2, -1, -1))
    torch.testing.assert_close(negative[:, 77:], obama_tokens.unconditional.expand(2, -1, -1))


def test_faces_are_encoded_once_per_request_and_batches_equal_single_calls(pipe, faces_dir):
    calls = []
    handle = pipe.face_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        batch = _run(pipe, faces=[faces_dir / "obama.jpg"], num_images_per_prompt=3, seed=5)
    finally:
        handle.remove()
    assert len(calls) == 1
    single = _run(pipe, faces=[faces_dir / "obama.jpg"], seed=6)
    np.testing.assert_allclose(batch[1], single[0], atol=1e-5)


def test_controlnet_sees_text_tokens_only(pipe, obama_tokens, faces_dir):
    contexts = []

    class Spy(fact.TextOnlyControlNetProcessor):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, **kwargs):
            if encoder_hidden_states is not None:
                contexts.append(encoder_hidden_states.shape[1] - self.num_face_tokens)
            return super().__call__(attn, hidden_states, encoder_hidden_states, **kwargs)

    original = dict(pipe.controlnet.attn_processors)
    pipe.controlnet.set_attn_processor(Spy())
    try:
        two = pipe.encode_faces([faces_dir / "obama.jpg", faces_dir / "obama_rgba.png"])
        skeleton = _skeleton()
        _run(pipe, face_tokens=two, pose_image=skeleton, pose_mode="skeleton", num_inference_steps=1)
    finally:
        pipe.controlnet.set_attn_processor(original)
    cross = [n for n in contexts if n != 0]
    assert cross and set(cross) == {77}  # 77 + 32 face tokens in, 77 text tokens attended

    # and the ControlNet's residuals equal those of a plain ControlNet run on the text alone
    from diffusers import ControlNetModel

    text = torch.randn(1, 77, pipe.text_encoder.config.hidden_size)
    face = torch.randn(1, 16, text.shape[-1])
    fact.set_num_face_tokens(pipe.controlnet, num_photos=1)
    latents, cond = torch.randn(1, 4, 8, 8), torch.rand(1, 3, 64, 64)
    ours = pipe.controlnet(latents, 10, torch.cat([text, face], 1), cond, return_dict=False)
    plain = ControlNetModel.from_config(pipe.controlnet.config).eval()  # the diffusers processors
    plain.load_state_dict(pipe.controlnet.state_dict())
    theirs = plain(latents, 10, text, cond, return_dict=False)
    for a, b in zip([*ours[0], ours[1]], [*theirs[0], theirs[1]], strict=True):
        torch.testing.assert_close(a, b)


def _skeleton():
    from idfusion.pose import PoseKeypoints, draw_openpose

    body = np.full((18, 2), np.nan, np.float32)
    body[[0, 1, 2, 5, 8, 11]] = [[32, 12], [32, 22], [24, 22], [40, 22], [27, 44], [37, 44]]
    return draw_openpose([PoseKeypoints(body)], (64, 64))


def test_pose_image_changes_the_output(pipe, obama_tokens):
    plain = _run(pipe, face_tokens=obama_tokens, num_inference_steps=2)
    posed = _run(pipe, face_tokens=obama_tokens, pose_image=_skeleton(), pose_mode="skeleton", num_inference_steps=2)
    assert np.abs(posed - plain).max() > 1e-4


def test_style_lora_round_trip_is_exact(pipe, obama_tokens, tmp_path):
    from idfusion.styles import load_style_file
    from idfusion.testing.kohya_lora import write_kohya_lora

    lora = write_kohya_lora(tmp_path / "style.safetensors", pipe.unet, pipe.text_encoder, seed=3)
    catalogue = tmp_path / "styles.toml"
    catalogue.write_text(
        f'[[style]]\nname = "test-style"\nprompt = "{{subject}}, in a red coat"\nlora = "{lora.name}"\nweight = 0.8\n'
    )
    (style,) = load_style_file(catalogue)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    plain = _run(pipe, face_tokens=obama_tokens, prompt="a person, in a red coat", num_inference_steps=2)
    out = pipe(face_tokens=obama_tokens, style=style, seed=0, num_inference_steps=2, output_type="np")
    styled = np.stack(out.images)
    assert out.metadata[0]["style"] == "test-style" and out.metadata[0]["style_weight"] == 0.8
    # the user's prompt (none here) is what --from replays; the style's full prompt is recorded beside it
    assert "prompt" not in out.metadata[0] and out.metadata[0]["composed_prompt"] == "a person, in a red coat"
    assert np.abs(styled - plain).max() > 1e-4
    again = _run(pipe, face_tokens=obama_tokens, prompt="a person, in a red coat", num_inference_steps=2)
    np.testing.assert_array_equal(again, plain)  # the next call without the style is the base model again
    pipe.unload_lora_weights()
    after = pipe.unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_inpainting_keeps_size_and_respects_the_mask(pipe, obama_tokens):
    import PIL.Image

    rng = np.random.default_rng(0)
    image = PIL.Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    out = pipe(
        face_tokens=obama_tokens, image=image, mask_image=PIL.Image.fromarray(mask), strength=0.6, seed=0,
        num_inference_steps=4, output_type="pil",
    )  # fmt: skip
    assert out.images[0].size == (64, 64)
    assert out.metadata[0]["strength"] == 0.6 and out.metadata[0]["adapter_scale"] == 0.55
    assert out.metadata[0]["guidance_scale"] == 5.0


def test_input_errors(pipe, faces_dir, obama_tokens):
    from idfusion.errors import NoFaceError

    with pytest.raises(ValueError, match="1 to 6"):
        pipe(face_tokens=obama_tokens, num_images_per_prompt=7)
    with pytest.raises(ValueError, match="adapter_scale"):
        pipe(face_tokens=obama_tokens, adapter_scale=-1)
    with pytest.raises(ValueError, match="exactly one"):
        pipe()
    with pytest.raises(ValueError, match="style_weight needs a style"):
        pipe(face_tokens=obama_tokens, style_weight=0.5)
    with pytest.raises(ValueError, match="both image and mask_image"):
        pipe(face_tokens=obama_tokens, image=faces_dir / "obama.jpg")
    from idfusion.faces import FaceAnalyzer

    blank = np.full((200, 200, 3), 128, np.uint8)
    analyzer = pipe.face_analyzer
    pipe.set_face_analyzer(FaceAnalyzer("hog", None, crops=(), dense_landmarks=True))  # real weights: no face here
    try:
        with pytest.raises(NoFaceError):
            pipe.encode_faces(blank)
    finally:
        pipe.set_face_analyzer(analyzer)


def test_missing_release_names_the_files_and_modelscope(tmp_path):
    from idfusion.errors import ModelFilesError
    from idfusion.pipelines import FactPipeline

    with pytest.raises(ModelFilesError, match="ms1mv2_model_TransFace_S.pt") as info:
        FactPipeline.from_pretrained(tmp_path, local_files_only=True)
    assert "ModelScope" in str(info.value)


def test_offline_cli_path_with_no_other_flags(tmp_path, faces_dir, capsys, monkeypatch):
    from idfusion.cli.main import main
    from idfusion.outputs import read_generation_metadata

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = tmp_path / "model"
    assert main(["make-tiny", "--method", "fact", "--out", str(model)]) == 0
    capsys.readouterr()
    code = main(["generate", "--method", "fact", "--model", str(model), "--face", str(faces_dir / "obama.jpg"),
                 "--prompt", "a person in a garden", "--out", str(tmp_path / "out")])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    image_path, _ = capsys.readouterr().out.split()
    meta = read_generation_metadata(image_path)
    assert meta["method"] == "fact" and meta["steps"] == 50 and meta["scheduler"] == "pndm"
    assert meta["adapter_scale"] == 0.5 and meta["num_face_photos"] == 1


def test_template_portrait_keeps_the_template_outside_the_face(pipe, obama_tokens, faces_dir):
    from idfusion.flows.template import square_crop_box
    from idfusion.images import load_image

    template = faces_dir / "obama.jpg"
    before = template.read_bytes()
    out = template_portraits(
        pipe, template, identity={"face_tokens": obama_tokens}, seed=1, num_inference_steps=3, num_images=2
    )
    original = load_image(template).array
    assert len(out.images) == 2
    for image, meta in zip(out.images, out.metadata, strict=True):
        result = np.asarray(image)
        assert result.shape == original.shape
        changed = np.argwhere((result != original).any(axis=-1))
        assert len(changed) > 100  # the face was repainted
        face = pipe.face_analyzer.get(original)
        x0, y0, x1, y1 = square_crop_box(face)
        assert changed[:, 0].min() >= y0 and changed[:, 0].max() < y1  # nothing outside the face's crop changed
        assert changed[:, 1].min() >= x0 and changed[:, 1].max() < x1
        assert meta["strength"] == 0.6 and meta["faces_repainted"] == 1 and meta["template"] == str(template)
    assert out.metadata[1]["seed"] == out.metadata[0]["seed"] + 1
    assert template.read_bytes() == before


def test_template_errors(pipe, obama_tokens, faces_dir):
    from idfusion.errors import FaceIndexError, NoFaceError
    from idfusion.faces import FaceAnalyzer

    with pytest.raises(FaceIndexError, match="face index 5"):
        template_portraits(pipe, faces_dir / "obama.jpg", identity={"face_tokens": obama_tokens}, face_index=5)
    blank = np.full((200, 200, 3), 128, np.uint8)
    analyzer = pipe.face_analyzer
    pipe.set_face_analyzer(FaceAnalyzer("hog", None, crops=(), dense_landmarks=True))
    try:
        with pytest.raises(NoFaceError, match="template has no face"):
            template_portraits(pipe, blank, identity={"face_tokens": obama_tokens})
        with pytest.raises(NoFaceError):
            template_portraits(pipe, faces_dir / "obama.jpg", faces=[blank])  # the identity photo has no face
    finally:
        pipe.set_face_analyzer(analyzer)


def test_template_cli(release, tmp_path, faces_dir, capsys):
    from idfusion.cli.main import main
    from idfusion.outputs import read_generation_metadata

    code = main(["template", "--method", "fact", "--model", str(release), "--template", str(faces_dir / "obama.jpg"),
                 "--face", str(faces_dir / "obama_rgba.png"), "--face-index", "0", "--strength", "0.5", "--steps", "2",
                 "--seed", "3", "--out", str(tmp_path)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    image_path, sheet = capsys.readouterr().out.split()
    meta = read_generation_metadata(image_path)
    assert meta["strength"] == 0.5 and meta["seed"] == 3 and meta["method"] == "fact"
    with pytest.raises(SystemExit) as exit_info:
        main(["template", "--model", str(release), "--template", str(faces_dir / "obama.jpg"),
              "--face", str(faces_dir / "obama.jpg"), "--face-index", "x", "--out", str(tmp_path)])  # fmt: skip
    assert exit_info.value.code == 2 and "face index" in capsys.readouterr().err
    code = main(["template", "--model", str(release), "--template", str(tmp_path / "missing.jpg"),
                 "--face", str(faces_dir / "obama.jpg"), "--out", str(tmp_path)])  # fmt: skip
    assert code == 1 and "missing.jpg: file not found" in capsys.readouterr().err


def test_both_official_adapters_load_and_a_custom_base_is_used(pipe, release, tmp_path):
    import shutil

    from idfusion.pipelines import FactPipeline

    film = FactPipeline.from_pretrained(release, adapter="film", local_files_only=True)
    assert film.model_info["adapter"] == "film"
    assert not torch.equal(
        film.face_adapter.resampler.latents, pipe.face_adapter.resampler.latents
    )  # its own checkpoint
    base = tmp_path / "my-finetune"
    shutil.copytree(release / "stable-diffusion-v1-5", base)
    custom = FactPipeline.from_pretrained(release, base_model=base, local_files_only=True)
    assert custom.model_info["base_model"] == str(base)
    with pytest.raises(Exception, match="adapter"):
        FactPipeline.from_pretrained(release, adapter=tmp_path / "missing.ckpt", local_files_only=True)


def test_pose_from_a_photo_uses_the_estimator_and_the_template_can_keep_its_pose(pipe, obama_tokens, faces_dir):
    photo = faces_dir / "group_six_faces.jpg"
    skeleton = pipe.pose_condition(photo, 64, 64)  # auto: a photo, so DWPose (the release's tiny dwpose/) runs
    pixels = np.asarray(skeleton)
    assert skeleton.size == (64, 64) and (pixels.max(axis=-1) < 16).mean() > 0.5  # drawn lines on black
    out = template_portraits(pipe, faces_dir / "obama.jpg", identity={"face_tokens": obama_tokens}, use_pose=True, seed=0,
                                  num_inference_steps=2)  # fmt: skip
    plain = template_portraits(
        pipe, faces_dir / "obama.jpg", identity={"face_tokens": obama_tokens}, seed=0, num_inference_steps=2
    )
    assert out.images[0].size == plain.images[0].size
    assert np.abs(np.asarray(out.images[0], float) - np.asarray(plain.images[0], float)).max() > 0
    assert out.metadata[0]["pose"] == "skeleton"


def test_pose_from_a_photo_without_the_estimator_names_its_files(pipe, faces_dir, tmp_path, monkeypatch):
    from idfusion.errors import ModelFilesError
    from idfusion.pose import PosePreprocessor

    monkeypatch.setattr(pipe, "pose_preprocessor", PosePreprocessor(tmp_path))
    with pytest.raises(ModelFilesError, match="yolox_l.onnx"):
        pipe.pose_condition(faces_dir / "obama.jpg", 64, 64)
    assert pipe.pose_condition(_skeleton(), 64, 64).size == (64, 64)  # a ready skeleton needs no estimator
