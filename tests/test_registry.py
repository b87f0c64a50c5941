"""The method registry: the CLI reads it, adding a method is one entry, and the defects the redesign fixed stay
fixed (method-only options, FlashFace replays, the one LoRA loader)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from idfusion import registry, values
from idfusion.cli.main import main
from idfusion.pipelines.pipeline_arc2face import Arc2FacePipeline


class EchoPipeline(Arc2FacePipeline):
    """A throwaway "new method" for the test: Arc2Face whose images are dimmed by ``echo_scale``."""

    method = "echo"

    def __call__(self, faces=None, *, echo_scale: float = 1.0, **kwargs):
        out = super().__call__(faces, **{**kwargs, "output_type": "np"})
        images = np.asarray(out.images) * echo_scale
        for meta in out.metadata:
            meta["echo_scale"] = echo_scale
        return type(out)(images=self.numpy_to_pil(images), metadata=out.metadata, references=out.references)


def write_echo(out_dir: Path, seed: int) -> list[Path]:
    from idfusion.testing.tiny_arc2face import write_arc2face

    return write_arc2face(out_dir, seed)


@pytest.fixture
def echo():
    spec = registry.register_method(
        registry.MethodSpec(
            name="echo",
            title="Echo",
            summary="Arc2Face, dimmed (a test method)",
            pipeline=f"{__name__}:EchoPipeline",
            identity="embedding",
            tiny=f"{__name__}:write_echo",
            options=(registry.Option("--echo-scale", "how bright the echo is", values.unit_interval),),
        )
    )
    yield spec
    registry.unregister_method("echo")


def test_adding_a_method_is_one_registry_entry(echo, tmp_path, faces_dir, capsys):
    """A method file, a pipeline, a tiny writer and one entry: make-tiny, generate, --from and the option checks
    pick it up with no other edit."""
    model = tmp_path / "echo"
    assert main(["make-tiny", "--method", "echo", "--out", str(model)]) == 0
    common = ["--model", str(model), "--steps", "2", "--no-contact-sheet"]
    face = ["--face", str(faces_dir / "obama.jpg")]
    assert main(["generate", "--method", "echo", *face, *common, "--echo-scale", "0.5", "--seed", "1",
                 "--out", str(tmp_path / "a")]) == 0  # fmt: skip
    first = capsys.readouterr().out.split()[-1]
    from idfusion.outputs import read_generation_metadata

    meta = read_generation_metadata(first)
    assert meta["method"] == "echo" and meta["echo_scale"] == 0.5
    assert main(["generate", "--from", first, "--model", str(model), "--out", str(tmp_path / "b"),
                 "--no-contact-sheet"]) == 0  # fmt: skip
    replay = capsys.readouterr().out.split()[-1]
    assert read_generation_metadata(replay)["echo_scale"] == 0.5  # replayed from the metadata, by the registry
    np.testing.assert_array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(replay)))
    # the other methods refuse its option, naming it
    assert main(["generate", "--method", "arc2face", *face, *common, "--echo-scale", "0.5"]) == 1
    assert "--echo-scale is an option of Echo (--method echo), not of Arc2Face" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--method", "echo", *face, *common, "--echo-scale", "2"])
    assert "between 0.0 and 1.0" in capsys.readouterr().err


def _value_for(option, photo: Path) -> list[str]:
    """Command-line words that give ``option`` a valid value."""
    if option.kind == "flag":
        return [option.flag]
    if option.kind == "file":
        return [option.flag, str(photo)]
    if option.choices:
        return [option.flag, option.choices[0]]
    for text in ("0.5", "1", "0.1,0.1,0.5,0.5", "x"):
        try:
            if option.parse is None or option.parse(text) is not None:
                return [option.flag, text]
        except values.OptionValueError:
            continue
    raise AssertionError(f"no valid value for {option.flag}")


def test_method_only_options_are_clear_errors_for_other_methods(faces_dir, capsys):
    """Every option of every method, given to a method that does not take it: one clear line, before any model
    loads (``--ref-guidance-start`` with Arc2Face used to end in ``internal error: TypeError``)."""
    photo = faces_dir / "obama.jpg"
    flags = registry.options_by_flag(registry.methods())
    checked = 0
    for spec in registry.methods():
        own = {o.flag for o in spec.all_options()}
        for flag, (option, _) in flags.items():
            if flag in own:
                continue
            argv = ["generate", "--method", spec.name, "--face", str(photo), "--model", "/nonexistent"]
            assert main([*argv, *_value_for(option, photo)]) == 1, (spec.name, flag)
            err = capsys.readouterr().err
            assert f"{flag} is an option of" in err and f"not of {spec.title}" in err, err
            assert "internal error" not in err and "Traceback" not in err
            checked += 1
    assert checked > 40


def test_help_imports_no_torch_and_lists_every_method():
    code = (
        "import sys, io, contextlib; from idfusion.cli.main import main\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    try: main(['generate', '--help'])\n"
        "    except SystemExit: pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "print(out.getvalue())"
    )
    text = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    for name in registry.method_names():
        assert name in text
    assert "options of --method flashface" in text and "--ref-guidance-start" in text


def test_flashface_blend_weights_are_replayed(tmp_path, faces_dir, capsys, tiny_release):
    """``--from`` replays the blend weights of the references (they were recorded but dropped)."""
    model = tiny_release("flashface")
    faces = [faces_dir / "obama.jpg", faces_dir / "tom_hanks_aligned_112.png"]
    common = ["--model", str(model), "--steps", "2", "--width", "64", "--height", "64", "--no-contact-sheet",
              "--detector", "hog"]  # fmt: skip
    weighted = ["--face", f"{faces[0]}:0.7", "--face", f"{faces[1]}:0.3"]
    assert main(["generate", "--method", "flashface", *weighted, *common, "--seed", "2", "--out",
                 str(tmp_path / "a")]) == 0  # fmt: skip
    first = capsys.readouterr().out.split()[0]
    plain = ["--face", str(faces[0]), "--face", str(faces[1])]
    assert main(["generate", "--from", first, *plain, *common, "--out", str(tmp_path / "b")]) == 0
    replay = capsys.readouterr().out.split()[0]
    np.testing.assert_array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(replay)))
    assert main(["generate", "--from", first, "--face", str(faces[0]), *common, "--out", str(tmp_path / "c")]) == 1
    assert "made from 2 photos" in capsys.readouterr().err


def test_an_ldm_named_unet_only_kohya_lora_loads_through_loras(tmp_path, tiny_release):
    """The one LoRA loader maps kohya's LDM block names for ``loras=`` too (it used to raise peft's
    NoMatchingPeftModuleError there while styles loaded the same file)."""
    from idfusion.testing.kohya_lora import write_kohya_lora

    model = tiny_release("arc2face")
    pipe = Arc2FacePipeline.from_pretrained(model, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    lora = write_kohya_lora(tmp_path / "ldm.safetensors", pipe.unet, None, naming="ldm", seed=4)
    identity = torch.randn(512, generator=torch.Generator().manual_seed(0))
    kwargs = {"id_embeds": identity, "num_inference_steps": 2, "seed": 0, "output_type": "np"}
    base = np.asarray(pipe(**kwargs).images)
    with_lora = pipe(**kwargs, loras=[(str(lora), 0.8)])
    assert np.abs(np.asarray(with_lora.images) - base).max() > 1e-4
    assert with_lora.metadata[0]["loras"][0]["weight"] == 0.8
    np.testing.assert_array_equal(np.asarray(pipe(**kwargs).images), base)  # off again: the base, exactly
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    from idfusion.loras import LoraFileError

    with pytest.raises(LoraFileError, match="bad.safetensors: not a readable LoRA file"):
        pipe(**kwargs, loras=[(str(bad), 1.0)])


def test_python_dash_m_idfusion_is_the_command():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "idfusion", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("idfusion ")
