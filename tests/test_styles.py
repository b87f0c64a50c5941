"""The style catalogue: the TOML format and its errors, the subject slot, the built-in examples, user files through
$IDFUSION_STYLES, name resolution, LoRA file resolution (local, Hugging Face cache/offline, ModelScope cache), and
the ``idfusion styles`` command."""

from __future__ import annotations

import json
import logging
import os
import textwrap
from pathlib import Path

import pytest

from idfusion import styles
from idfusion.errors import IdfusionError, ModelFilesError
from idfusion.styles import DEFAULT_SUBJECT, STYLES_ENV, Style, StyleError

GOOD = """
[[style]]
name = "winter-coat"
title = "Winter coat"
prompt = "{subject}, wearing a wool coat, snowy street, photorealistic"
negative_prompt = "lowres, blurry"
base_model = "film"
description = "cold weather"

[[style]]
name = "neon"
prompt = "portrait of {subject} under neon light"
lora = "loras/neon.safetensors"
weight = 1
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def style_toml(**fields) -> str:
    """One [[style]] table; values are written with TOML syntax from Python reprs (strings, numbers, bools)."""
    lines = ["[[style]]"]
    for key, value in fields.items():
        text = json.dumps(value) if isinstance(value, (str, bool)) else str(value)
        lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"


@pytest.fixture(autouse=True)
def _no_user_styles(monkeypatch):
    monkeypatch.delenv(STYLES_ENV, raising=False)


# ------------------------------------------------------------------------------------------------------------------
# The format


def test_good_file(tmp_path):
    path = write(tmp_path / "mine.toml", GOOD)
    coat, neon = styles.load_style_file(path)
    assert coat.name == "winter-coat" and coat.title == "Winter coat" and coat.label == "Winter coat"
    assert coat.negative_prompt == "lowres, blurry" and coat.base_model == "film"
    assert coat.lora is None and coat.weight is None and coat.lora_kind is None and coat.describe_lora() == "-"
    assert coat.source == path and not coat.builtin
    assert neon.label == "neon" and neon.lora == "loras/neon.safetensors"
    assert neon.weight == 1.0 and isinstance(neon.weight, float)  # TOML integer accepted as a float
    assert neon.lora_kind == "local" and neon.lora_hub == "huggingface"
    data = neon.to_dict()
    assert data["source"] == str(path) and data["lora_kind"] == "local" and data["weight"] == 1.0
    json.dumps(data)  # plain values only


def test_weight_defaults_to_one_with_a_lora_only():
    assert Style(name="a", prompt="{subject}", lora="owner/repo").weight == 1.0
    assert Style(name="a", prompt="{subject}").weight is None
    assert Style(name="a", prompt="{subject}", lora="owner/repo", weight=0).weight == 0.0


# (style table fields, words the message must contain besides the file path)
BAD_STYLES = {
    "unknown key": ({"name": "coat", "prompt": "{subject}", "wieght": 0.5}, ["'coat'", "'wieght'", "'weight'"]),
    "missing prompt": ({"name": "coat"}, ["'coat'", "'prompt'", "missing"]),
    "missing name": ({"prompt": "{subject}"}, ["entry 2", "'name'", "missing"]),
    "name not a slug": ({"name": "Winter Coat", "prompt": "{subject}"}, ["'name'", "Winter Coat"]),
    "no slot": ({"name": "coat", "prompt": "a person in a coat"}, ["'coat'", "'prompt'", "{subject}"]),
    "slot twice": ({"name": "coat", "prompt": "{subject} and {subject}"}, ["'coat'", "'prompt'", "2 times"]),
    "other braces": ({"name": "coat", "prompt": "{subject}, {age} years"}, ["'coat'", "'prompt'", "braces"]),
    "stray brace": ({"name": "coat", "prompt": "{subject}, }"}, ["'coat'", "'prompt'", "braces"]),
    "weight too big": ({"name": "coat", "prompt": "{subject}", "lora": "a/b", "weight": 2.5}, ["'coat'", "'weight'"]),
    "weight negative": ({"name": "coat", "prompt": "{subject}", "lora": "a/b", "weight": -0.1}, ["'weight'"]),
    "weight nan": ({"name": "coat", "prompt": "{subject}", "lora": "a/b", "weight": "nan"}, ["'weight'", "finite"]),
    "weight string": ({"name": "coat", "prompt": "{subject}", "lora": "a/b", "weight": "0.5"}, ["'weight'", "number"]),
    "weight bool": ({"name": "coat", "prompt": "{subject}", "lora": "a/b", "weight": True}, ["'weight'", "number"]),
    "weight without lora": ({"name": "coat", "prompt": "{subject}", "weight": 0.5}, ["'coat'", "'weight'", "'lora'"]),
    "file without lora": ({"name": "coat", "prompt": "{subject}", "lora_file": "x.safetensors"}, ["'lora_file'"]),
    "file escapes": (
        {"name": "coat", "prompt": "{subject}", "lora": "a/b", "lora_file": "../x.safetensors"},
        ["'lora_file'", "relative"],
    ),
    "unknown hub": ({"name": "coat", "prompt": "{subject}", "lora": "a/b", "lora_hub": "civitai"}, ["'lora_hub'"]),
    "title not a string": ({"name": "coat", "prompt": "{subject}", "title": 3}, ["'coat'", "'title'", "string"]),
    "empty lora": ({"name": "coat", "prompt": "{subject}", "lora": " "}, ["'coat'", "'lora'"]),
}


@pytest.mark.parametrize("case", BAD_STYLES)
def test_invalid_style_names_file_style_and_key(tmp_path, case):
    fields, words = BAD_STYLES[case]
    if fields.get("weight") == "nan":
        text = style_toml(**{k: v for k, v in fields.items() if k != "weight"}) + "weight = nan\n"
    else:
        text = style_toml(**fields)
    path = write(tmp_path / "bad.toml", style_toml(name="fine", prompt="{subject}, fine") + text)
    with pytest.raises(StyleError) as info:
        styles.load_style_file(path)
    message = str(info.value)
    assert str(path) in message
    for word in words:
        assert word in message, (case, message)
    assert isinstance(info.value, IdfusionError) and isinstance(info.value, ValueError)


BAD_FILES = {
    "not toml": ("[[style]]\nname = coat\n", ["not a valid TOML"]),
    "wrong table name": (
        style_toml(name="coat", prompt="{subject}").replace("[[style]]", "[[styles]]"),
        ["[[style]]"],
    ),
    "stray top-level key": ("version = 1\n" + style_toml(name="coat", prompt="{subject}"), ["'version'"]),
    "no styles": ("# nothing here\n", ["no styles"]),
    "style not a table": ('style = ["coat"]\n', ["entry 1", "table"]),
    "duplicate": (style_toml(name="coat", prompt="{subject}") * 2, ["'coat'", "twice"]),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_invalid_file(tmp_path, case):
    text, words = BAD_FILES[case]
    path = write(tmp_path / "bad.toml", text)
    with pytest.raises(StyleError) as info:
        styles.load_style_file(path)
    assert str(path) in str(info.value)
    for word in words:
        assert word in str(info.value), (case, str(info.value))


def test_missing_file(tmp_path):
    with pytest.raises(StyleError, match="style file not found"):
        styles.load_style_file(tmp_path / "absent.toml")


def test_styles_made_in_code_are_checked_too():
    with pytest.raises(StyleError, match=r"style 'x'.*exactly once"):
        Style(name="x", prompt="no slot")
    with pytest.raises(StyleError, match="'weight'"):
        Style(name="x", prompt="{subject}", lora="a/b", weight=float("inf"))


# ------------------------------------------------------------------------------------------------------------------
# The subject slot


def test_format_prompt():
    style = Style(name="coat", prompt="{subject}, wearing a coat, photo")
    assert style.format_prompt("a mature man") == "a mature man, wearing a coat, photo"
    assert style.format_prompt(None) == f"{DEFAULT_SUBJECT}, wearing a coat, photo"
    assert style.format_prompt("   ") == f"{DEFAULT_SUBJECT}, wearing a coat, photo"
    # FACT's attribute prefixes end in ", ": no doubled comma
    assert style.format_prompt("a beautiful woman, ") == "a beautiful woman, wearing a coat, photo"
    assert style.format_prompt("a {curly} subject") == "a {curly} subject, wearing a coat, photo"
    middle = Style(name="m", prompt="portrait of {subject} in the rain")
    assert middle.format_prompt("a boy, children") == "portrait of a boy, children in the rain"


# ------------------------------------------------------------------------------------------------------------------
# Built-in examples


def test_builtin_catalogue():
    from idfusion.clip_tokenizer import load_clip_tokenizer

    builtins = styles.builtin_styles()
    names = [s.name for s in builtins]
    assert 5 <= len(builtins) <= 8 and len(set(names)) == len(names)
    assert list(styles.style_catalogue()) == names  # with no user files, the catalogue is the built-ins
    assert styles.builtin_styles_file().is_file()
    assert styles.builtin_styles_file().parent.parent == Path(styles.__file__).parent  # package data
    with_lora = [s for s in builtins if s.lora is not None]
    assert len(with_lora) >= 2 and len(builtins) - len(with_lora) >= 3
    tokenizer = load_clip_tokenizer()
    for style in builtins:
        assert style.builtin and style.source == styles.builtin_styles_file()
        assert style.title and style.negative_prompt and style.description
        prompt = style.format_prompt("a handsome man, 25-year-old")
        assert prompt.startswith("a handsome man, 25-year-old, ") and "{" not in prompt
        # everything reaches the text encoder: CLIP's 77 positions, start and end tokens included
        assert len(tokenizer(prompt).input_ids) <= 77, style.name
        assert len(tokenizer(style.negative_prompt).input_ids) <= 77, style.name
    by_name = {s.name: s for s in builtins}
    cheongsam = by_name["cheongsam"]
    assert (cheongsam.lora, cheongsam.lora_file, cheongsam.weight) == (
        "PaperCloud/zju19_minguo_style_lora",
        "qipao2.safetensors",
        0.45,
    )
    assert cheongsam.lora_kind == "modelscope"
    assert by_name["polaroid"].lora == "YorickHe/polaroid_lora"
    assert by_name["polaroid"].lora_file == "InstantPhotoX3.safetensors"


def test_builtin_modelscope_lora_missing_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms"))
    style = styles.resolve_style("cheongsam")
    with pytest.raises(ModelFilesError) as info:
        style.lora_path()
    message = str(info.value)
    assert "qipao2.safetensors" in message and "PaperCloud/zju19_minguo_style_lora" in message
    assert "modelscope download" in message and STYLES_ENV in message


@pytest.mark.parametrize("layout", ["models/{owner}/{name}", "{owner}/{name}"])
def test_modelscope_lora_found_in_its_cache(tmp_path, monkeypatch, layout):
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path))
    folder = tmp_path / layout.format(owner="YorickHe", name="polaroid_lora")
    write(folder / "InstantPhotoX3.safetensors", "x")
    assert styles.resolve_style("polaroid").lora_path() == folder / "InstantPhotoX3.safetensors"


# ------------------------------------------------------------------------------------------------------------------
# User files


def test_user_files_from_the_environment_override_builtins(tmp_path, monkeypatch, caplog):
    folder = tmp_path / "styles"
    write(folder / "a.toml", style_toml(name="cheongsam", prompt="{subject}, my own qipao"))
    write(folder / "b.toml", style_toml(name="mine", prompt="{subject}, mine"))
    write(folder / "notes.txt", "ignored: not a .toml file")
    single = write(tmp_path / "single.toml", style_toml(name="mine", prompt="{subject}, mine again"))
    monkeypatch.setenv(STYLES_ENV, f"{folder}{os.pathsep}{single}")
    with caplog.at_level(logging.INFO, logger="idfusion.styles"):
        catalogue = styles.style_catalogue()
    builtin_names = [s.name for s in styles.builtin_styles()]
    assert list(catalogue) == [*builtin_names, "mine"]  # replaced names keep their place
    assert catalogue["cheongsam"].prompt == "{subject}, my own qipao"
    assert catalogue["cheongsam"].source == folder / "a.toml" and not catalogue["cheongsam"].builtin
    assert catalogue["cheongsam"].lora is None  # replaced as a whole, not merged
    assert catalogue["mine"].source == single  # the later entry wins
    assert "replaces the built-in one" in caplog.text and f"replaces the one from {folder / 'b.toml'}" in caplog.text

    extra = write(tmp_path / "extra.toml", style_toml(name="mine", prompt="{subject}, extra"))
    assert styles.style_catalogue([extra])["mine"].source == extra  # extra paths come after the environment


@pytest.mark.parametrize("entry", ["absent", "file.txt"])
def test_bad_environment_entry(tmp_path, monkeypatch, entry):
    write(tmp_path / "file.txt", "x")
    monkeypatch.setenv(STYLES_ENV, str(tmp_path / entry))
    with pytest.raises(StyleError, match=rf"{entry}.*\${STYLES_ENV}"):
        styles.style_catalogue()


def test_invalid_user_file_fails_the_catalogue(tmp_path, monkeypatch):
    write(tmp_path / "bad.toml", style_toml(name="x", prompt="no slot"))
    monkeypatch.setenv(STYLES_ENV, str(tmp_path))
    with pytest.raises(StyleError, match="bad.toml: style 'x'"):
        styles.style_catalogue()


# ------------------------------------------------------------------------------------------------------------------
# Resolving a style


def test_resolve_by_name_file_and_file_name(tmp_path, monkeypatch):
    assert styles.resolve_style("hanfu").builtin
    single = write(tmp_path / "one.toml", style_toml(name="solo", prompt="{subject}, solo"))
    assert styles.resolve_style(str(single)).name == "solo"
    assert styles.resolve_style(single).name == "solo"  # a Path
    two = write(tmp_path / "two.toml", GOOD)
    assert styles.resolve_style(f"{two}:neon").name == "neon"
    with pytest.raises(StyleError, match=r"holds 2 styles \(winter-coat, neon\).*:NAME"):
        styles.resolve_style(two)
    with pytest.raises(StyleError, match=r"unknown style 'noen' in .*two.toml\. Did you mean 'neon'\?"):
        styles.resolve_style(f"{two}:noen")
    with pytest.raises(StyleError, match="style file not found"):
        styles.resolve_style(tmp_path / "absent.toml")
    # files are not in the catalogue unless listed
    with pytest.raises(StyleError, match="unknown style 'solo'"):
        styles.resolve_style("solo")
    assert styles.resolve_style("solo", extra_paths=[single]).source == single
    monkeypatch.setenv(STYLES_ENV, str(single))
    assert styles.resolve_style("solo").source == single


def test_unknown_name_lists_close_matches_and_all_names():
    with pytest.raises(StyleError) as info:
        styles.resolve_style("winter-cot")
    message = str(info.value)
    assert "unknown style 'winter-cot'" in message and "Did you mean 'winter-coat'" in message
    assert "Available: " + ", ".join(sorted(styles.style_catalogue())) in message
    with pytest.raises(StyleError) as info:
        styles.resolve_style("zzzzzz")
    assert "Did you mean" not in str(info.value) and "Available: " in str(info.value)


# ------------------------------------------------------------------------------------------------------------------
# LoRA files


def test_local_lora_paths_resolve_against_the_style_file(tmp_path, monkeypatch):
    root = tmp_path / "collection"
    lora = write(root / "loras" / "neon.safetensors", "x")
    path = write(root / "mine.toml", GOOD)
    monkeypatch.chdir(tmp_path)  # not the style file's folder
    neon = styles.resolve_style(f"{path}:neon")
    assert neon.lora_path() == lora
    assert neon.describe_lora() == str(lora)
    assert styles.resolve_style(f"{path}:winter-coat").lora_path() is None

    # a folder: lora_file, else the default name, else its only .safetensors
    folder = root / "lora-folder"
    write(folder / "only.safetensors", "x")
    text = style_toml(name="a", prompt="{subject}", lora="lora-folder")
    text += style_toml(name="b", prompt="{subject}", lora="lora-folder", lora_file="only.safetensors")
    text += style_toml(name="c", prompt="{subject}", lora="./lora-folder", lora_file="absent.safetensors")
    text += style_toml(name="d", prompt="{subject}", lora="loras/missing.safetensors")
    folders = write(root / "folders.toml", text)
    assert styles.resolve_style(f"{folders}:a").lora_kind == "local"  # an existing folder, though shaped owner/name
    assert styles.resolve_style(f"{folders}:a").lora_path() == folder / "only.safetensors"
    assert styles.resolve_style(f"{folders}:b").lora_path() == folder / "only.safetensors"
    with pytest.raises(ModelFilesError, match=r"folders.toml: style 'c'.*'absent.safetensors' not found"):
        styles.resolve_style(f"{folders}:c").lora_path()
    with pytest.raises(ModelFilesError, match=r"style 'd'.*LoRA file not found: .*missing.safetensors"):
        styles.resolve_style(f"{folders}:d").lora_path()
    write(folder / "second.safetensors", "x")
    with pytest.raises(ModelFilesError, match=r"only.safetensors, second.safetensors.*set 'lora_file'"):
        styles.resolve_style(f"{folders}:a").lora_path()
    write(folder / styles.DEFAULT_LORA_FILE, "x")
    assert styles.resolve_style(f"{folders}:a").lora_path() == folder / styles.DEFAULT_LORA_FILE


def test_hub_lora_offline_and_missing_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    style = Style(name="hub", prompt="{subject}", lora="someone/style-lora", lora_file="style_v2.safetensors")
    assert style.lora_kind == "huggingface"
    assert style.describe_lora() == "huggingface:someone/style-lora/style_v2.safetensors"
    with pytest.raises(ModelFilesError) as info:
        style.lora_path()
    message = str(info.value)
    assert "style_v2.safetensors" in message and "someone/style-lora" in message and "offline" in message
    default = Style(name="hub", prompt="{subject}", lora="someone/style-lora")
    with pytest.raises(ModelFilesError, match=styles.DEFAULT_LORA_FILE):
        default.lora_path(local_files_only=True)


def test_hub_lora_from_the_hugging_face_cache(tmp_path, monkeypatch):
    """A file in the Hugging Face cache is used offline (the cache's own layout: refs/main -> snapshots/<commit>)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    repo = tmp_path / "hf" / "models--someone--style-lora"
    commit = "0123456789abcdef0123456789abcdef01234567"
    write(repo / "refs" / "main", commit)
    cached = write(repo / "snapshots" / commit / "style_v2.safetensors", "x")
    style = Style(name="hub", prompt="{subject}", lora="someone/style-lora", lora_file="style_v2.safetensors")
    assert style.lora_path() == cached


def test_prompt_only_style_loads_no_lora():
    class NoPipe:
        def __getattr__(self, name):
            raise AssertionError(f"touched the pipeline: {name}")

    assert styles.load_style_lora(NoPipe(), styles.resolve_style("business-suit")) is None


# ------------------------------------------------------------------------------------------------------------------
# The command


@pytest.fixture
def cli(monkeypatch):
    from idfusion.cli import main as cli_main

    monkeypatch.setitem(cli_main.SUBCOMMANDS, "styles", "styles")  # until main.py lists it
    return cli_main.main


def test_cli_table(cli, tmp_path, capsys):
    user = write(tmp_path / "mine.toml", GOOD)
    assert cli(["styles", "--styles", str(user)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "WEIGHT", "LORA", "DEFINED", "IN"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == {s.name for s in styles.builtin_styles()} | {"winter-coat", "neon"}
    assert rows["cheongsam"].split() == [
        "cheongsam",
        "0.45",
        "modelscope:PaperCloud/zju19_minguo_style_lora/qipao2.safetensors",
        "built-in",
    ]
    assert rows["hanfu"].split() == ["hanfu", "-", "-", "built-in"]
    assert rows["neon"].split() == ["neon", "1", str(tmp_path / "loras" / "neon.safetensors"), str(user)]
    assert rows["winter-coat"].split()[-1] == str(user)


def test_cli_json(cli, capsys):
    assert cli(["styles", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in document["styles"]] == [s.name for s in styles.builtin_styles()]
    assert document["styles"][0] == styles.builtin_styles()[0].to_dict()


def test_cli_one_style(cli, tmp_path, capsys):
    assert cli(["styles", "polaroid", "--subject", "a mature woman, "]) == 0
    out = capsys.readouterr().out
    assert "prompt      a mature woman, candid instant-film snapshot" in out
    assert "weight      0.35" in out and "defined in  built-in" in out
    two = write(tmp_path / "two.toml", GOOD)
    assert cli(["styles", f"{two}:neon", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["name"] == "neon" and shown["formatted_prompt"] == "portrait of a person under neon light"


def test_cli_errors_are_one_line(cli, tmp_path, capsys):
    assert cli(["styles", "polaroyd"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("idfusion styles: error: unknown style 'polaroyd'") and "Did you mean 'polaroid'" in err
    assert len(err.strip().splitlines()) == 1
    bad = write(tmp_path / "bad.toml", style_toml(name="x", prompt="{subject}", wieght=1))
    assert cli(["styles", "--styles", str(bad)]) == 1
    assert "bad.toml: style 'x': unknown key 'wieght'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------------
# FaceChain's own style files

# The release's prompt templates (facechain/constants.py), written out here independently of idfusion.styles
RELEASE_WITH_STYLE = (
    "{}, upper_body, raw photo, masterpiece, solo, medium shot, high detail face, photorealistic, best quality"
)
RELEASE_WITH_CLOTH = (
    "raw photo, masterpiece, chinese, {}, solo, medium shot, high detail face, looking straight into the camera with "
    "shoulders parallel to the frame, photorealistic, best quality"
)


def facechain_json(path: Path, **fields) -> Path:
    data = {"name": "Test(Test)", "img": "./style_image/x.jpg", "model_id": None, "revision": None,
            "bin_file": None, "multiplier_style": 0.35, "multiplier_human": 0.95, "add_prompt_style": "x"}  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**data, **fields}, ensure_ascii=False), encoding="utf-8")
    return path


def test_facechain_style_files_compose_the_release_prompts_and_loras(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms"))
    with_lora = facechain_json(
        tmp_path / "MajicmixRealistic_v6" / "Rainy_Night.json", name="雨夜(Rainy night)", model_id="someone/rain_lora",
        revision="v1.0.0", bin_file="rain.safetensors", multiplier_style=0.4, add_prompt_style="1girl, rain, night",
    )  # fmt: skip
    cloth = facechain_json(
        tmp_path / "leosamsMoonfilm_filmGrain20" / "T-shirt.json", add_prompt_style="wearing T-shirt, plain backdrop"
    )
    # the release: trigger + [age] + pos_prompt_with_style / _with_cloth of add_prompt_style
    subject = "a handsome man, 25-year-old, "
    style = styles.load_facechain_style(with_lora)
    assert style.name == "rainy-night" and style.title == "雨夜(Rainy night)"
    assert style.format_prompt(subject) == subject + RELEASE_WITH_STYLE.format("1girl, rain, night")
    assert (style.lora, style.lora_file, style.lora_revision, style.lora_hub) == (
        "someone/rain_lora", "rain.safetensors", "v1.0.0", "modelscope",
    )  # fmt: skip
    assert style.weight == 0.4 and style.base_model == "majicmix" and style.negative_prompt is None
    plain = styles.resolve_style(str(cloth))  # a .json path works wherever a style is named
    assert plain.name == "t-shirt"
    assert plain.format_prompt(subject) == subject + RELEASE_WITH_CLOTH.format("wearing T-shirt, plain backdrop")
    assert plain.format_prompt(None) == "a person, " + RELEASE_WITH_CLOTH.format("wearing T-shirt, plain backdrop")
    # a style without a LoRA brings the release's default style LoRA, at its multiplier, on the film base
    assert (plain.lora, plain.lora_revision, plain.lora_file) == (
        "Cherrytest/zjz_mj_jiyi_small_addtxt_fromleo", "v1.0.0", "zjz_mj_jiyi_small_addtxt_fromleo.safetensors",
    )  # fmt: skip
    assert plain.weight == 0.35 and plain.base_model == "film"
    assert [s.name for s in styles.load_facechain_styles(tmp_path / "MajicmixRealistic_v6")] == ["rainy-night"]
    with pytest.raises(StyleError, match="add_prompt_style"):
        styles.load_facechain_style(write(tmp_path / "bad.json", '{"multiplier_style": 0.3}'))
    with pytest.raises(StyleError, match="not found"):
        styles.resolve_style(str(tmp_path / "missing.json"))


def test_facechain_default_lora_is_found_in_a_folder_or_the_modelscope_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms"))
    name = "zjz_mj_jiyi_small_addtxt_fromleo.safetensors"
    assert styles.facechain_default_lora_path(tmp_path / "release") is None
    cached = write(tmp_path / "ms" / "models" / "Cherrytest" / "zjz_mj_jiyi_small_addtxt_fromleo" / name, "x")
    assert styles.facechain_default_lora_path(tmp_path / "release", None) == cached
    nested = write(tmp_path / "release" / "zjz_mj_jiyi_small_addtxt_fromleo" / name, "x")
    assert styles.facechain_default_lora_path(tmp_path / "release") == nested
    top = write(tmp_path / "release" / name, "x")
    assert styles.facechain_default_lora_path(tmp_path / "release") == top
