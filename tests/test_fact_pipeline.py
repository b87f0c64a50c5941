"""FactPipeline on the tiny official-layout release: face-CFG context, adapter scale, ControlNets, styles, inpainting,
and the release's rules (prompts, default style LoRA, style/base tie, photo handling, precision, template controls)
checked against independent computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from idfusion.flows.template import template_portraits
from idfusion.methods import fact

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def release(tiny_release):
    return tiny_release("fact")


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
    assert pipe.controlnet is not None and pipe.canny_controlnet is not None  # controlnet/, canny_controlnet/
    assert pipe.canny_controlnet is not pipe.controlnet
    for net in (pipe.controlnet, pipe.canny_controlnet):
        assert set(map(type, net.attn_processors.values())) == {fact.TextOnlyControlNetProcessor}
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


def test_pose_from_a_photo_uses_the_estimator_and_the_template_keeps_its_pose(pipe, obama_tokens, faces_dir):
    photo = faces_dir / "group_six_faces.jpg"
    skeleton = pipe.pose_condition(photo, 64, 64)  # auto: a photo, so DWPose (the release's tiny dwpose/) runs
    pixels = np.asarray(skeleton)
    assert skeleton.size == (64, 64) and (pixels.max(axis=-1) < 16).mean() > 0.5  # drawn lines on black
    identity = {"face_tokens": obama_tokens}
    posed = template_portraits(pipe, faces_dir / "obama.jpg", identity=identity, controls=["pose"], seed=0,
                               num_inference_steps=2)  # fmt: skip
    plain = template_portraits(pipe, faces_dir / "obama.jpg", identity=identity, controls=(), seed=0,
                               num_inference_steps=2)  # fmt: skip
    assert posed.images[0].size == plain.images[0].size
    assert np.abs(np.asarray(posed.images[0], float) - np.asarray(plain.images[0], float)).max() > 0
    assert posed.metadata[0]["pose"] == "skeleton" and posed.metadata[0]["controls"] == {"pose": 1.0}
    assert "controls" not in plain.metadata[0] and "pose" not in plain.metadata[0]
    # use_pose adds the pose to explicit controls
    both = template_portraits(pipe, faces_dir / "obama.jpg", identity=identity, controls=["canny"], use_pose=True,
                              seed=0, num_inference_steps=2)  # fmt: skip
    assert both.metadata[0]["controls"] == {"pose": 1.0, "canny": 0.2}


def test_pose_from_a_photo_without_the_estimator_names_its_files(pipe, faces_dir, tmp_path, monkeypatch):
    from idfusion.errors import ModelFilesError
    from idfusion.pose import PosePreprocessor

    monkeypatch.setattr(pipe, "pose_preprocessor", PosePreprocessor(tmp_path))
    with pytest.raises(ModelFilesError, match="yolox_l.onnx"):
        pipe.pose_condition(faces_dir / "obama.jpg", 64, 64)
    assert pipe.pose_condition(_skeleton(), 64, 64).size == (64, 64)  # a ready skeleton needs no estimator


# ---- the release's rules --------------------------------------------------------------------------------------------

# The release's prompts as its code passes them to CLIP (facechain/constants.py, app.py launch_pipeline_inpaint),
# written out here independently of idfusion.methods.fact.
RELEASE_NEGATIVE = (
    "(nsfw:2), paintings, sketches, (worst quality:2), (low quality:2), "
    "lowers, normal quality, ((monochrome)), ((grayscale)), logo, word, character, bad hand, tattoo, (username, "
    "watermark, signature, time signature, timestamp, artist name, copyright name, copyright),"
    "low res, ((monochrome)), ((grayscale)), skin spots, acnes, skin blemishes, age spot, glans, extra fingers, "
    "fewer fingers, strange fingers, bad hand, mole, ((extra legs)), ((extra hands))"
)
RELEASE_WITH_STYLE = (
    "{}, upper_body, raw photo, masterpiece, solo, medium shot, high detail face, photorealistic, best quality"
)
RELEASE_TEMPLATE = (
    "raw photo, masterpiece, simple background, solo, medium shot, high detail face, photorealistic, best quality, "
    "wearing T-shirt"
)
RELEASE_TEMPLATE_NEGATIVE = (
    "nsfw, paintings, sketches, (worst quality:2), (low quality:2) "
    "lowers, normal quality, ((monochrome)), ((grayscale)), logo, word, character"
)
DEFAULT_LORA = "zjz_mj_jiyi_small_addtxt_fromleo.safetensors"


def _inpaint_inputs(size=64):
    import PIL.Image

    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8))
    mask = np.zeros((size, size), np.uint8)
    mask[16:48, 16:48] = 255
    return {"image": image, "mask_image": PIL.Image.fromarray(mask), "strength": 0.6}


def test_the_release_prompts_are_the_defaults_word_for_word(pipe, obama_tokens, monkeypatch):
    from idfusion.pipelines import pipeline_fact

    seen = []
    original = pipeline_fact.encode_text

    def spy(text_encoder, tokenizer, texts):
        seen.append(list(texts))
        return original(text_encoder, tokenizer, texts)

    monkeypatch.setattr(pipeline_fact, "encode_text", spy)
    fast = {"face_tokens": obama_tokens, "num_inference_steps": 1, "output_type": "latent", "seed": 0}
    out = pipe(**fast)
    # no style: the release's style template around the subject, and its negative prompt
    assert seen[-1] == [RELEASE_WITH_STYLE.format("a person"), RELEASE_NEGATIVE]
    assert out.metadata[0]["prompt_wording"] == "release"
    inpaint = {**fast, **_inpaint_inputs(), "num_inference_steps": 2}  # strength 0.6 of 1 step is no step
    pipe(**inpaint)  # inpainting is the template stage: its prompts
    assert seen[-1] == [RELEASE_TEMPLATE, RELEASE_TEMPLATE_NEGATIVE]
    pipe(**fast, prompt="a person in a garden")  # a prompt is used as written
    assert seen[-1] == ["a person in a garden", RELEASE_NEGATIVE]
    # idfusion's rewording is an option
    pipe(**fast, prompt_wording="idfusion")
    assert seen[-1] == [fact.DEFAULT_PROMPT, fact.NEGATIVE_PROMPT] and "(" not in "".join(seen[-1])
    pipe(**inpaint, prompt_wording="idfusion")
    assert seen[-1] == [fact.TEMPLATE_PROMPT, fact.NEGATIVE_PROMPT]
    with pytest.raises(ValueError, match="prompt_wording"):
        pipe(**fast, prompt_wording="A1111")


@pytest.fixture(scope="module")
def lora_release(release, pipe, tmp_path_factory):
    """The tiny release plus a LoRA under the release's default style LoRA name (the other files linked)."""
    from idfusion.testing.kohya_lora import write_kohya_lora

    folder = tmp_path_factory.mktemp("fact-lora") / "release"
    folder.mkdir()
    for entry in release.iterdir():
        (folder / entry.name).symlink_to(entry)
    write_kohya_lora(folder / DEFAULT_LORA, pipe.unet, pipe.text_encoder, seed=4)
    return folder


def test_text_to_image_merges_the_default_style_lora_where_the_style_has_none(lora_release, obama_tokens, tmp_path):
    from idfusion.outputs import file_sha256
    from idfusion.pipelines import FactPipeline
    from idfusion.styles import Style

    lora_pipe = FactPipeline.from_pretrained(lora_release, local_files_only=True)
    lora_pipe.set_progress_bar_config(disable=True)
    lora = lora_release / DEFAULT_LORA
    assert lora_pipe.default_style_lora == lora
    fast = {"face_tokens": obama_tokens, "num_inference_steps": 2}
    # the release: the default style LoRA at the style weight (0.25 by default) = that LoRA given by hand
    out = lora_pipe(**fast, seed=0, output_type="np")
    by_hand = _run(lora_pipe, **fast, default_lora="off", loras=[(str(lora), 0.25)])
    np.testing.assert_array_equal(np.stack(out.images), by_hand)
    off = _run(lora_pipe, **fast, default_lora="off")
    assert np.abs(by_hand - off).max() > 1e-4
    meta = out.metadata[0]
    assert meta["default_lora"] == "auto" and meta["default_lora_sha256"] == file_sha256(lora)
    assert meta["style_weight"] == 0.25 and "loras" not in meta  # replayed by the default, not as an extra LoRA
    heavier = _run(lora_pipe, **fast, style_weight=0.5)
    np.testing.assert_array_equal(heavier, _run(lora_pipe, **fast, default_lora="off", loras=[(str(lora), 0.5)]))
    # a prompt-only style gets it too; a style with its own LoRA does not
    plain_style = Style(name="plain", prompt="{subject}, in a red coat")
    np.testing.assert_array_equal(
        _run(lora_pipe, **fast, style=plain_style),
        _run(lora_pipe, **fast, prompt="a person, in a red coat", default_lora="off", loras=[(str(lora), 0.25)]),
    )
    own = Style(name="own", prompt="{subject}, in a red coat", lora=str(lora), weight=0.7)
    np.testing.assert_array_equal(
        _run(lora_pipe, **fast, style=own),
        _run(lora_pipe, **fast, prompt="a person, in a red coat", default_lora="off", loras=[(str(lora), 0.7)]),
    )
    # the template stage (inpainting) merges none, as the release
    np.testing.assert_array_equal(
        _run(lora_pipe, **fast, **_inpaint_inputs()), _run(lora_pipe, **fast, **_inpaint_inputs(), default_lora="off")
    )
    # a saved pipeline keeps the file and makes the same images
    lora_pipe.save_pretrained(tmp_path / "saved")
    saved = FactPipeline.from_pretrained(tmp_path / "saved")
    saved.set_progress_bar_config(disable=True)
    assert saved.default_style_lora == tmp_path / "saved" / DEFAULT_LORA
    assert saved.model_info["adapter"] == "majicmix"
    np.testing.assert_array_equal(_run(saved, **fast), by_hand)


def test_default_style_lora_missing(pipe, obama_tokens, caplog, monkeypatch, tmp_path):
    from idfusion.errors import ModelFilesError

    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path))
    assert pipe.default_style_lora is None  # the tiny release has none
    with pytest.raises(ModelFilesError, match="zjz_mj_jiyi_small_addtxt_fromleo"):
        pipe(face_tokens=obama_tokens, default_lora="on", num_inference_steps=1)
    monkeypatch.setattr(pipe, "_warned_default_lora", False)
    with caplog.at_level("WARNING", logger="idfusion.pipelines.pipeline_fact"):
        pipe(face_tokens=obama_tokens, num_inference_steps=1, output_type="latent")
    assert "default style LoRA" in caplog.text and "Cherrytest/zjz_mj_jiyi_small_addtxt_fromleo" in caplog.text


def test_a_style_runs_only_with_its_own_base_models_adapter(pipe, obama_tokens):
    from idfusion.styles import Style

    fast = {"face_tokens": obama_tokens, "num_inference_steps": 1, "output_type": "latent", "seed": 0}
    film = Style(name="film-look", prompt="{subject}, film grain", base_model="film")
    assert pipe.model_info["adapter"] == "majicmix"
    with pytest.raises(ValueError, match="made for the film base model, but this pipeline runs the majicmix adapter"):
        pipe(**fast, style=film)
    out = pipe(**fast, style=film, style_base="any")
    assert out.metadata[0]["style_base"] == "any"
    pipe(**fast, style=Style(name="maj", prompt="{subject}, soft light", base_model="Majicmix"))
    pipe(**fast, style=Style(name="other", prompt="{subject}, soft light", base_model="sdxl"))  # not a FACT base


class _ScoredDetector:
    """Reports given ``(face, score)`` pairs and records the size of each image it sees."""

    name = "fixed"

    def __init__(self, faces):
        self.faces, self.shapes = faces, []

    def detect(self, image):
        from idfusion.faces import Detection

        self.shapes.append(image.shape)
        return [Detection(bbox=f.bbox.copy(), score=s, landmarks=f.landmarks.copy()) for f, s in self.faces]


def _face(cx, cy, size):
    from idfusion.faces import Face

    points = np.array([[-20, -15], [20, -15], [0, 5], [-15, 25], [15, 25]], np.float32) * size / 100 + [cx, cy]
    box = np.array([cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2], np.float32)
    return Face(bbox=box, det_score=1.0, landmarks=points.astype(np.float32), detector="test")


def test_the_photo_is_downsized_and_its_best_scoring_face_is_encoded(pipe, faces_dir):
    """The release: long side <= 1000 (2000 in the template flow) with PIL's default (bicubic) resize to
    int(w * s) x int(h * s), then the face with the highest detection score, not the largest."""
    import PIL.Image

    from idfusion.faces import FaceAnalyzer
    from idfusion.faces.masks import head_mask

    photo = np.asarray(PIL.Image.open(faces_dir / "obama.jpg").convert("RGB").resize((1500, 1201)))
    large, best = _face(300, 400, 300), _face(750, 400, 150)
    detector = _ScoredDetector([(large, 0.6), (best, 0.9)])
    previous = pipe.face_analyzer
    pipe.set_face_analyzer(FaceAnalyzer(detector, None, crops=(), dense_landmarks=False))
    try:
        (crop,) = pipe.face_crops([photo])
        assert detector.shapes == [(800, 1000, 3)]  # int(1201 * 1000 / 1500) = 800
        small = np.asarray(PIL.Image.fromarray(photo).resize((1000, 800), PIL.Image.BICUBIC))
        expected = fact.face_crop(small, best.landmarks, head_mask(best, (800, 1000)))
        np.testing.assert_array_equal(crop, expected)
        assert not np.array_equal(crop, fact.face_crop(small, large.landmarks, head_mask(large, (800, 1000))))
        (unchanged,) = pipe.face_crops([photo], max_photo_side=None)
        assert detector.shapes[-1] == photo.shape and not np.array_equal(unchanged, crop)
        # the template flow encodes at 2000 px
        detector.shapes.clear()
        big = np.asarray(PIL.Image.fromarray(photo).resize((2500, 2001)))
        template = PIL.Image.fromarray(photo[:400, :400])
        template_portraits(pipe, template, faces=[big], controls=(), seed=0, num_inference_steps=2)
        assert (1600, 2000, 3) in detector.shapes  # the photo, at int(2001 * 2000 / 2500) x 2000
    finally:
        pipe.set_face_analyzer(previous)


def test_template_inpaints_with_openpose_and_canny_at_the_release_scales(pipe, obama_tokens, faces_dir, monkeypatch):
    """The release's stage B: MultiControlNet [OpenPose, Canny] at conditioning scales [1.0, 0.2], OpenPose of the
    face and hands only, Canny of the crop with the face removed; both ControlNets see the text tokens only."""
    import diffusers
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    from idfusion.flows.template import canny_condition, crop_face, square_crop_box
    from idfusion.images import load_image
    from idfusion.pose import draw_openpose

    seen = []
    original = diffusers.StableDiffusionControlNetInpaintPipeline.__call__

    def spy(runner, *args, **kwargs):
        seen.append((runner.controlnet, kwargs))
        return original(runner, *args, **kwargs)

    monkeypatch.setattr(diffusers.StableDiffusionControlNetInpaintPipeline, "__call__", spy)
    assert pipe.template_controls() == ["pose", "canny"]
    out = template_portraits(pipe, faces_dir / "obama.jpg", identity={"face_tokens": obama_tokens}, seed=0,
                             num_inference_steps=2)  # fmt: skip
    ((controlnet, kwargs),) = seen
    assert isinstance(controlnet, MultiControlNetModel)
    assert list(controlnet.nets) == [pipe.controlnet, pipe.canny_controlnet]
    assert kwargs["controlnet_conditioning_scale"] == [1.0, 0.2]
    assert out.metadata[0]["controls"] == {"pose": 1.0, "canny": 0.2}
    pose, canny = kwargs["control_image"]
    crop, size = kwargs["image"], pipe.native_size()
    face = pipe.default_face_analyzer().analyze(load_image(faces_dir / "obama.jpg").array)[0]
    local = crop_face(face, square_crop_box(face), size)
    np.testing.assert_array_equal(np.asarray(canny), np.asarray(canny_condition(crop, local)))
    people = pipe.pose_preprocessor.estimator(np.asarray(crop))
    drawn = draw_openpose(people, (size, size), body=False, hands=True, face=True)
    np.testing.assert_array_equal(np.asarray(pose), np.asarray(drawn))
    for net in (pipe.controlnet, pipe.canny_controlnet):
        assert {p.num_face_tokens for p in net.attn_processors.values()} == {16}
    # only the ControlNets that are loaded are defaults
    canny_net = pipe.canny_controlnet
    pipe.register_modules(canny_controlnet=None)
    try:
        assert pipe.template_controls() == ["pose"]
        with pytest.raises(Exception, match="no canny ControlNet"):
            pipe(face_tokens=obama_tokens, control_images={"canny": canny}, num_inference_steps=1)
    finally:
        pipe.register_modules(canny_controlnet=canny_net)


def test_control_images_in_text_to_image(pipe, obama_tokens, monkeypatch):
    import diffusers

    seen = []
    original = diffusers.StableDiffusionControlNetPipeline.__call__

    def spy(runner, *args, **kwargs):
        seen.append((runner.controlnet, kwargs["controlnet_conditioning_scale"]))
        return original(runner, *args, **kwargs)

    monkeypatch.setattr(diffusers.StableDiffusionControlNetPipeline, "__call__", spy)
    edges = np.zeros((64, 64, 3), np.uint8)
    edges[20:44, 30] = 255
    plain = _run(pipe, face_tokens=obama_tokens, num_inference_steps=2)
    out = pipe(face_tokens=obama_tokens, control_images={"canny": edges}, seed=0, num_inference_steps=2,
               output_type="np")  # fmt: skip
    assert seen[-1] == (pipe.canny_controlnet, 0.2) and out.metadata[0]["controls"] == {"canny": 0.2}
    assert np.abs(np.stack(out.images) - plain).max() > 1e-4
    both = pipe(face_tokens=obama_tokens, control_images={"canny": edges}, pose_image=_skeleton(),
                pose_mode="skeleton", controlnet_conditioning_scale={"canny": 0.5}, seed=0, num_inference_steps=1)  # fmt: skip
    assert seen[-1][1] == [1.0, 0.5] and both.metadata[0]["controls"] == {"pose": 1.0, "canny": 0.5}
    with pytest.raises(ValueError, match="pose once"):
        pipe(face_tokens=obama_tokens, pose_image=_skeleton(), control_images={"pose": _skeleton()})
    with pytest.raises(ValueError, match="unknown control_images"):
        pipe(face_tokens=obama_tokens, control_images={"depth": edges})


def test_a_bfloat16_pipeline_keeps_transface_and_the_resampler_float32(release, pipe, faces_dir, tmp_path):
    """The release builds TransFace and the resampler in float32 and never casts them; only the UNet side (and the
    adapter sites) follow the pipeline's dtype. Face tokens are then those of a float32 encoding, exactly."""
    from idfusion.pipelines import FactPipeline

    half = FactPipeline.from_pretrained(release, torch_dtype=torch.bfloat16, local_files_only=True)
    half.set_progress_bar_config(disable=True)

    def check(model):
        assert model.unet.dtype == torch.bfloat16
        assert {p.dtype for p in model.face_adapter.sites.parameters()} == {torch.bfloat16}
        for module in (model.face_encoder, model.face_adapter.resampler):
            assert {t.dtype for t in module.state_dict().values() if t.is_floating_point()} == {torch.float32}
        for key, value in pipe.face_encoder.state_dict().items():  # the file's values, not a bfloat16 round trip
            assert torch.equal(model.face_encoder.state_dict()[key], value), key
        for key, value in pipe.face_adapter.resampler.state_dict().items():
            assert torch.equal(model.face_adapter.resampler.state_dict()[key], value), key

    check(half)
    tokens, reference = half.encode_faces(faces_dir / "obama.jpg"), pipe.encode_faces(faces_dir / "obama.jpg")
    assert tokens.tokens.dtype == torch.float32
    assert torch.equal(tokens.tokens, reference.tokens) and torch.equal(tokens.unconditional, reference.unconditional)
    half.to(torch.float16)  # a cast later does not reach them either
    assert half.face_encoder.pos_embed.dtype == torch.float32 and half.unet.dtype == torch.float16
    half.to(torch.bfloat16)
    latents = half(face_tokens=tokens, num_inference_steps=1, output_type="latent", seed=0).images
    assert latents.dtype == torch.bfloat16 and torch.isfinite(latents).all()  # the context is cast to the UNet's
    half.save_pretrained(tmp_path / "saved")
    check(FactPipeline.from_pretrained(tmp_path / "saved", torch_dtype=torch.bfloat16))


def test_a_face_photo_chooses_the_face_instead_of_the_best_scoring_one(pipe, faces_dir):
    from idfusion.faces import FacePhoto

    group = faces_dir / "group_six_faces.jpg"
    crops = [pipe.face_crops([FacePhoto(group, i)])[0] for i in range(6)]
    assert len({c.tobytes() for c in crops}) == 6  # six different people
    best = pipe.face_crops([group])[0]  # the release's rule: the highest-scoring face, one of the six
    assert sum(np.array_equal(best, c) for c in crops) == 1
