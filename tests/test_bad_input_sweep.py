"""The bad-input sweep (benchmarks/sweep_bad_inputs.py): every case ends in one clear error line, never a traceback
and never an "internal error"."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "sweep_bad_inputs", Path(__file__).resolve().parents[1] / "benchmarks" / "sweep_bad_inputs.py"
)
sweep = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = sweep  # dataclasses look their module up there
_SPEC.loader.exec_module(sweep)


@pytest.fixture(scope="module")
def kit(tiny_release, tmp_path_factory, faces_dir):
    models = {m: tiny_release(m) for m in ("arc2face", "flashface", "fact", "feedface")}
    return sweep.Kit(root=tmp_path_factory.mktemp("sweep"), faces=faces_dir, models=models)


@pytest.mark.parametrize("case", sweep.cases(), ids=lambda case: case.name)
def test_bad_input_gives_one_clear_error(kit, case, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    outcome = sweep.run_case(kit, case)
    assert outcome.traceback is None, outcome.traceback
    assert not outcome.internal, outcome.err
    assert outcome.ok, f"exit {outcome.code}: {outcome.err}"
    assert "Traceback" not in outcome.err


def test_the_sweep_would_catch_a_traceback_and_an_internal_error(kit, monkeypatch):
    """The checks themselves can fail: a crashing and a buggy command are both reported."""
    import idfusion.cli.generate as generate

    def crash(args):
        raise KeyError("boom")

    monkeypatch.setattr(generate, "run", crash)
    case = sweep.cases()[0]
    outcome = sweep.run_case(kit, case)
    assert outcome.internal and not outcome.ok  # the CLI's catch-all turned the bug into "internal error"
    monkeypatch.setattr(sweep, "cases", lambda: [])
    broken = sweep.Case("argv crashes", lambda k: 1 / 0, "")
    assert sweep.run_case(kit, broken).traceback is not None
