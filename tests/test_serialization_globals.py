"""The allow-listing unpickler's single allowed globals: stand-ins for ``regex._regex.compile``, ``tokenizers.AddedToken``
and ``ftfy.fix_text`` (what a pickled transformers 4 slow tokenizer holds), and everything else still refused."""

from __future__ import annotations

import os

import pytest
import torch

from idfusion.serialization import PickledStub, UnsafeCheckpointError, load_pickled_state, stub_qualified_name

TOKENIZER_GLOBALS = ("regex._regex.compile", "tokenizers.AddedToken", "ftfy.fix_text")
PATTERN = r"<\|startoftext\|>|'s|[\p{L}]+|[\p{N}]"


def _holder(tmp_path, zip_format=True, **attrs):
    """A module whose attributes are pickled objects of those libraries, saved with torch.save."""
    regex = pytest.importorskip("regex")
    tokenizers = pytest.importorskip("tokenizers")
    module = torch.nn.Linear(2, 2)
    module.pat = regex.compile(PATTERN, regex.IGNORECASE)
    module.special = tokenizers.AddedToken("<|endoftext|>", special=True, normalized=True)
    for key, value in attrs.items():
        setattr(module, key, value)
    path = tmp_path / "holder.pt"
    torch.save({"module": module}, path, _use_new_zipfile_serialization=zip_format)
    return path


class _System:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_the_tokenizer_globals_are_refused_unless_allowed(tmp_path):
    path = _holder(tmp_path)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_pickled_state(path, allowed_module_prefixes=["torch.nn.modules"])
    assert info.value.refused in ("regex._regex.compile", "tokenizers.AddedToken")
    assert info.value.refused in str(info.value) and "nothing from the file was executed" in str(info.value)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_allowed_globals_become_stubs_that_record_their_arguments(tmp_path, zip_format):
    path = _holder(tmp_path, zip_format)
    loaded = load_pickled_state(path, allowed_module_prefixes=["torch.nn.modules"], allowed_globals=TOKENIZER_GLOBALS)
    state = vars(loaded["module"])
    pattern, token = state["pat"], state["special"]
    # regex was never asked to compile anything: the "call" in the pickle only recorded its arguments
    assert isinstance(pattern, PickledStub) and stub_qualified_name(pattern) == "regex._regex.compile"
    args, kwargs = vars(pattern)["_stub_args"]
    assert args[0] == PATTERN and isinstance(args[1], int) and kwargs == {}
    # AddedToken is rebuilt as a stub with its pickled fields
    assert isinstance(token, PickledStub) and stub_qualified_name(token) == "tokenizers.AddedToken"
    assert vars(token)["content"] == "<|endoftext|>" and vars(token)["special"] is True
    weight = vars(loaded["module"])["_parameters"]["weight"]
    assert isinstance(weight, torch.nn.Parameter) and weight.shape == (2, 2)


def test_a_referenced_function_becomes_an_uncalled_stub(tmp_path):
    ftfy = pytest.importorskip("ftfy")
    path = _holder(tmp_path, fix_text=ftfy.fix_text)
    loaded = load_pickled_state(path, allowed_module_prefixes=["torch.nn.modules"], allowed_globals=TOKENIZER_GLOBALS)
    fix_text = vars(loaded["module"])["fix_text"]
    assert isinstance(fix_text, type) and issubclass(fix_text, PickledStub)
    assert stub_qualified_name(fix_text) == "ftfy.fix_text"


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_code_is_still_refused_next_to_allowed_globals(tmp_path, zip_format):
    regex = pytest.importorskip("regex")
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"pat": regex.compile("a+"), "x": _System(marker)}, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_pickled_state(path, allowed_module_prefixes=["torch.nn.modules"], allowed_globals=TOKENIZER_GLOBALS)
    assert info.value.refused == "posix.system"
    assert "'posix.system'" in str(info.value) and "nothing from the file was executed" in str(info.value)
    assert not marker.exists()


def test_an_allowed_global_does_not_allow_its_module(tmp_path):
    regex = pytest.importorskip("regex")
    path = tmp_path / "other.pt"
    torch.save({"f": regex.escape}, path)  # another function of the same library
    with pytest.raises(UnsafeCheckpointError) as info:
        load_pickled_state(path, allowed_module_prefixes=["torch.nn.modules"], allowed_globals=TOKENIZER_GLOBALS)
    assert info.value.refused.startswith("regex.") and info.value.refused.endswith(".escape")


@pytest.mark.parametrize(("names", "error"), [("regex._regex.compile", TypeError), (["compile"], ValueError)])
def test_allowed_globals_must_be_qualified_names(tmp_path, names, error):
    path = tmp_path / "plain.pt"
    torch.save({"w": torch.ones(1)}, path)
    with pytest.raises(error):
        load_pickled_state(path, allowed_module_prefixes=["torch.nn.modules"], allowed_globals=names)
