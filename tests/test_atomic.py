"""Nothing is lost: atomically reserved names under concurrency, umask-honouring modes, stale temp cleanup, and
output checks before any work (issue: reliability, "Data loss and files")."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from idfusion import atomic
from idfusion.atomic import OutputError, atomic_write_bytes, check_output_folder, clean_stale_temps, publish_new
from idfusion.jobs import save_results
from idfusion.outputs import read_generation_metadata, save_new_generated_image

FACES = Path(__file__).resolve().parents[2] / "shared" / "data" / "faces"


def _writer(folder: str, worker: int, count: int, barrier) -> None:
    barrier.wait()  # start together, so the writers really race for the same names
    image = Image.fromarray(np.full((8, 8, 3), worker * 40, np.uint8))
    for i in range(count):
        save_new_generated_image(folder, "race", image, {"worker": worker, "i": i})


def test_concurrent_writers_never_take_the_same_name(tmp_path):
    context = multiprocessing.get_context("spawn")
    workers, count = 4, 15
    barrier = context.Barrier(workers)
    processes = [context.Process(target=_writer, args=(str(tmp_path), w, count, barrier)) for w in range(workers)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
        assert process.exitcode == 0
    files = sorted(tmp_path.glob("race_*.png"))
    assert len(files) == workers * count  # nothing overwritten
    written = {(m["worker"], m["i"]) for m in map(read_generation_metadata, files)}
    assert written == {(w, i) for w in range(workers) for i in range(count)}
    assert not list(tmp_path.glob(".*.tmp"))  # no temp file left behind


def test_publish_new_skips_existing_names_and_never_replaces(tmp_path):
    (tmp_path / "a_0000.png").write_bytes(b"old")
    names = (tmp_path / f"a_{i:04d}.png" for i in range(10))
    path = publish_new(names, b"new")
    assert path.name == "a_0001.png" and path.read_bytes() == b"new"
    assert (tmp_path / "a_0000.png").read_bytes() == b"old"


def test_publish_new_without_hard_links_still_reserves(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(1, "Operation not permitted")  # EPERM: what filesystems without hard links answer

    monkeypatch.setattr(os, "link", no_links)
    (tmp_path / "a_0000.png").write_bytes(b"old")
    path = publish_new((tmp_path / f"a_{i:04d}.png" for i in range(10)), b"new")
    assert path.name == "a_0001.png" and path.read_bytes() == b"new"
    assert (tmp_path / "a_0000.png").read_bytes() == b"old"


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_files_honour_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        replaced = atomic_write_bytes(tmp_path / "a.bin", b"x")
        new = publish_new(iter([tmp_path / "b.bin"]), b"y")
    finally:
        os.umask(old)
    assert replaced.stat().st_mode & 0o777 == 0o666 & ~umask
    assert new.stat().st_mode & 0o777 == 0o666 & ~umask


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_stale_temp_files_of_dead_runs_are_removed(tmp_path):
    stale = tmp_path / f".x_0000.png.idfusion-{_dead_pid()}.abc123.tmp"
    live = tmp_path / f".x_0001.png.idfusion-{os.getppid()}.abc123.tmp"  # a running process's
    other = tmp_path / ".somebody-elses.tmp"
    for path in (stale, live, other):
        path.write_bytes(b"partial")
    assert clean_stale_temps(tmp_path) == [stale]
    assert not stale.exists() and live.exists() and other.exists()


def test_the_next_write_cleans_a_killed_runs_temp_file(tmp_path):
    stale = tmp_path / f".gen_0000.png.idfusion-{_dead_pid()}.zz.tmp"
    stale.write_bytes(b"partial")
    atomic._cleaned.discard(tmp_path.resolve())
    atomic_write_bytes(tmp_path / "gen_0000.png", b"done")
    assert not stale.exists()


def test_check_output_folder_refuses_before_any_work(tmp_path):
    with pytest.raises(OutputError, match="/proc/idfusion-x"):
        check_output_folder("/proc/idfusion-x")
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(OutputError, match="exists and is not a folder"):
        check_output_folder(tmp_path / "file")
    with pytest.raises(OutputError, match="MiB free"):
        check_output_folder(tmp_path, needed_bytes=1 << 62)
    assert check_output_folder(tmp_path / "new" / "folder").is_dir()


def test_a_failed_write_keeps_and_names_the_earlier_images(tmp_path, monkeypatch):
    import idfusion.outputs as outputs

    images = [Image.fromarray(np.full((8, 8, 3), v, np.uint8)) for v in (0, 100, 200)]
    result = SimpleNamespace(images=images, metadata=[{"seed": i} for i in range(3)], references=[])
    real, calls = outputs.publish_new, []

    def failing(names, data):
        calls.append(1)
        if len(calls) == 2:
            raise OutputError(f"{tmp_path}/gen_0001.png: cannot be written (the disk is full)")
        return real(names, data)

    monkeypatch.setattr(outputs, "publish_new", failing)
    with pytest.raises(
        OutputError, match=r"image 1 of 3: .*the disk is full\); image 0 was written and kept: .*gen_0000"
    ):
        save_results(result, tmp_path, "gen", sheet=False)
    assert (tmp_path / "gen_0000.png").exists()


def test_generate_checks_the_output_folder_before_loading_models(tmp_path, capsys):
    from idfusion.cli.main import main

    code = main(
        ["generate", "--method", "arc2face", "--model", str(tmp_path / "no-such-model"), "--face",
         str(FACES / "obama.jpg"), "--out", "/proc/idfusion-x"]
    )  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err
    assert "/proc/idfusion-x" in err and "no-such-model" not in err and "internal error" not in err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--steps", "100000"], "--steps 100000 is above the limit of 1000"),
        (["--width", "100000"], "--width 100000 is above the limit of 4096"),
        (["--num-images", "10000"], "--num-images 10000 is above the limit of 64"),
        (["--width", "500"], "--width must be a multiple of 8"),
    ],
)
def test_oversized_work_is_refused_up_front(tmp_path, capsys, flags, message):
    from idfusion.cli.main import main

    args = ["generate", "--method", "arc2face", "--model", str(tmp_path / "m"), "--face", str(FACES / "obama.jpg")]
    assert main([*args, "--out", str(tmp_path / "out"), *flags]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything was created


def test_debug_works_after_the_subcommand(tmp_path, capsys):
    from idfusion.cli.main import main

    with pytest.raises(ValueError, match="file not found"):
        main(["generate", "--method", "arc2face", "--face", str(tmp_path / "missing.jpg"), "--debug"])
