"""Shared fixtures: the real face photos and one dlib analyzer per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Each pytest-xdist worker gets an equal share of the cores: torch's default of one thread per core in every worker
# oversubscribes them (measured: tests/test_adaface_pipeline.py with -n 2 on 2 cores, 90 s vs 40 s with 1 thread).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1 and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _WORKERS))


def find_faces_dir() -> Path | None:
    """``$IDFUSION_TEST_FACES``, else ``shared/data/faces`` inside or beside the checkout."""
    env = os.environ.get("IDFUSION_TEST_FACES")
    candidates = [Path(env)] if env else []
    candidates += [ROOT / "shared" / "data" / "faces", ROOT.parent / "shared" / "data" / "faces"]
    for candidate in candidates:
        if (candidate / "obama.jpg").is_file():
            return candidate
    return None


@pytest.fixture(scope="session")
def faces_dir() -> Path:
    found = find_faces_dir()
    if found is None:
        message = "real face photos not found: set IDFUSION_TEST_FACES or place shared/data/faces beside the checkout"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI always has them; a skip there would hide a broken setup
        pytest.skip(message)
    return found


@pytest.fixture(scope="session")
def dlib_analyzer():
    from idfusion.faces import FaceAnalyzer

    return FaceAnalyzer("hog", "dlib", dense_landmarks=True)


@pytest.fixture(scope="session")
def tiny_release(tmp_path_factory):
    """``tiny_release(method)``: the folder of ``method``'s tiny release (seed 0), written once per test session and
    shared; tests must not change it (copy it first)."""
    from idfusion.testing import make_tiny

    made: dict[str, Path] = {}

    def get(method: str) -> Path:
        if method not in made:
            folder = tmp_path_factory.mktemp(f"tiny-{method}") / "release"
            make_tiny(method, folder, seed=0)
            made[method] = folder
        return made[method]

    return get
