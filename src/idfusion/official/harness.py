"""``idfusion bench --against official``: a method's release and idfusion, alternately, on one folder of weights.

Each side runs in its own worker process (so each one's peak resident memory is its own: weights, activations and
all), loaded once; the parent then asks them in turn (release, idfusion, release, ...) for one image at each size,
so drift in machine load hits both. Reported per side and size: median seconds per denoising step, seconds per image
(text, references, sampling and decode), peak RSS (and peak VRAM on CUDA) and the largest difference of the final
latents, relative to their largest magnitude (both sides sample the same noise).
"""

from __future__ import annotations

import importlib
import json
import logging
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import locate_release, release_commit

__all__ = ["run_against_release", "format_release_table", "write_release_doc", "release_module"]

logger = logging.getLogger(__name__)


def release_module(method: str):
    """The ``idfusion.official`` module of ``method`` (its registry entry's ``release``)."""
    from ..registry import get_method, methods

    spec = get_method(method)
    if spec.release is None:
        names = ", ".join(s.name for s in methods() if s.release)
        raise ValueError(f"no release runner for {method!r}; --against official is available for: {names}")
    return importlib.import_module(spec.release)


def _write_weights(method: str, folder: str, tiny: bool) -> None:
    release_module(method).write_release_weights(Path(folder), tiny=tiny)


def _worker(connection, method: str, side: str, code: str | None, weights: str, device: str, dtype: str) -> None:
    """A worker: build one side, then answer ``(steps, seed, size)`` requests with timings and final latents."""
    from ..bench import _PeakRSS

    torch.set_num_threads(os.cpu_count() or 1)
    try:
        module = release_module(method)
        torch_dtype = getattr(torch, dtype)
        start = time.perf_counter()
        if side == "release":
            run = module.release_runner(Path(code), Path(weights), device=device, dtype=torch_dtype)
        elif side == "reference":
            run = module.reference_runner(Path(weights), device=device, dtype=torch_dtype)
        else:
            run = module.ours_runner(Path(weights), device=device, dtype=torch_dtype)
        import diffusers
        import transformers

        libraries = {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__}  # fmt: skip
        connection.send({"loaded_s": time.perf_counter() - start, "rss_gib": _PeakRSS.current() / 2**30,
                         "libraries": libraries})  # fmt: skip
    except Exception as error:  # reported to the parent, which names the side
        connection.send({"error": f"{type(error).__name__}: {error}"})
        return
    while True:
        request = connection.recv()
        if request is None:
            return
        steps, seed, size = request
        marks: list[float] = []

        def on_step(marks=marks):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            marks.append(time.perf_counter())

        try:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            with _PeakRSS() as rss:
                start = time.perf_counter()
                latents = run(steps, seed, size, on_step)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - start
            connection.send({
                "image_s": seconds, "step_s": [b - a for a, b in zip(marks, marks[1:], strict=False)],
                "steps_marked": len(marks), "peak_rss": rss.peak,
                "peak_vram": torch.cuda.max_memory_allocated() if device.startswith("cuda") else None,
                "latents": np.asarray(latents, dtype=np.float32),
            })  # fmt: skip
        except Exception as error:
            connection.send({"error": f"{type(error).__name__}: {error}"})


class _Side:
    def __init__(self, context, method, side, code, weights, device, dtype, python=None):
        self.name = side
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_worker, args=(child, method, side, code, weights, device, dtype),
                                       daemon=True)  # fmt: skip
        if python is not None:  # the release's own environment (its pinned libraries); idfusion importable there
            context.set_executable(python)
        try:
            self.process.start()
        finally:
            context.set_executable(sys.executable)
        child.close()

    def receive(self) -> dict:
        try:
            message = self.connection.recv()
        except EOFError:
            raise RuntimeError(
                f"the {self.name} worker died (exit code {self.process.exitcode}); out of memory?"
            ) from None
        if "error" in message:
            raise RuntimeError(f"the {self.name} side failed: {message['error']}")
        return message

    def close(self) -> None:
        try:
            self.connection.send(None)
        except (BrokenPipeError, OSError):
            pass
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()


def run_against_release(
    method: str,
    *,
    code: str | os.PathLike[str] | None = None,
    sizes: list[int] | None = None,
    steps: int = 4,
    repeats: int = 2,
    dtype: str = "bfloat16",
    device: str = "cpu",
    tiny: bool = False,
    weights: str | os.PathLike[str] | None = None,
    python: str | os.PathLike[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Time ``method`` against its release (its code from ``code``, else the reference loop) on one folder of
    release-layout weights (``weights``, written there with random values when empty; a temporary folder when None).
    ``sizes`` default to the release's native size and 512; ``python`` runs the release's side with another
    interpreter (the release's own environment, with idfusion installed in it). Returns a JSON-ready dict."""
    if steps < 2:
        raise ValueError("steps must be at least 2 (step times are measured between steps)")
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    module = release_module(method)
    release = module.RELEASE
    say = progress or logger.info
    root = locate_release(release, code)
    if python is not None and (root is None or not Path(python).is_file()):
        raise ValueError(f"--official-python {python}: " + ("not a file" if root is not None else
                         "needs the release's code (--official-code or $" + release.env_var + ")"))  # fmt: skip
    sizes = sizes or sorted({release.native_size, 512}, reverse=True)
    if tiny:
        sizes = [64]
    temporary = weights is None
    folder = Path(weights) if weights is not None else Path(tempfile.mkdtemp(prefix=f"idfusion-bench-{method}-"))
    try:
        if not folder.is_dir() or not any(folder.iterdir()):
            say(f"writing random {'tiny' if tiny else 'full-size'} weights in the release's layout to {folder}")
            context = mp.get_context("spawn")
            writer = context.Process(target=_write_weights, args=(method, str(folder), tiny))  # its memory is freed
            writer.start()
            writer.join()
            if writer.exitcode != 0:
                raise RuntimeError(f"writing the random weights to {folder} failed (exit code {writer.exitcode})")
        context = mp.get_context("spawn")
        baseline = "release" if root is not None else "reference"
        say(f"loading both sides ({baseline}: {root or 'the reference loop'}; idfusion)")
        sides = [_Side(context, method, baseline, str(root) if root else None, str(folder), device, dtype, python),
                 _Side(context, method, "ours", None, str(folder), device, dtype)]  # fmt: skip
        try:
            loaded = {side.name: side.receive() for side in sides}
            samples: dict[tuple[str, int], list[dict]] = {}
            for size in sizes:
                for side in sides:  # warm-up
                    say(f"warm-up at {size}: {side.name}")
                    side.connection.send((2, 0, size))
                    side.receive()
                for repeat in range(repeats):
                    for side in sides:
                        say(f"{size}x{size}, run {repeat + 1}/{repeats}: {side.name}")
                        side.connection.send((steps, repeat, size))
                        samples.setdefault((side.name, size), []).append(side.receive())
        finally:
            for side in sides:
                side.close()
    finally:
        if temporary:
            shutil.rmtree(folder, ignore_errors=True)

    rows = []
    for size in sizes:
        row: dict[str, Any] = {"size": size}
        for name in (baseline, "ours"):
            runs = samples[(name, size)]
            row[name] = {
                "seconds_per_step": statistics.median(s for r in runs for s in r["step_s"]),
                "seconds_per_image": statistics.median(r["image_s"] for r in runs),
                "peak_rss_gib": max(r["peak_rss"] for r in runs) / 2**30,
                "peak_vram_gib": max(r["peak_vram"] for r in runs) / 2**30 if runs[0]["peak_vram"] is not None else None,
            }  # fmt: skip
        theirs, ours = samples[(baseline, size)][-1]["latents"], samples[("ours", size)][-1]["latents"]
        row["speedup_per_step"] = row[baseline]["seconds_per_step"] / row["ours"]["seconds_per_step"]
        row["speedup_per_image"] = row[baseline]["seconds_per_image"] / row["ours"]["seconds_per_image"]
        row["memory_ratio"] = row["ours"]["peak_rss_gib"] / row[baseline]["peak_rss_gib"]
        row["latent_difference"] = float(np.abs(theirs - ours).max() / max(np.abs(theirs).max(), 1e-12))
        rows.append(row)
    return {
        "method": method,
        "baseline": baseline,
        "release": {
            "repo": release.repo,
            "commit": (release_commit(root) if root else None) or release.commit,
            "checkout": str(root) if root else None,
            "runs": release.runs,
            "python": str(python) if python else None,
            "libraries": loaded[baseline].get("libraries"),
        },  # fmt: skip
        "settings": {
            "steps": steps,
            "repeats": repeats,
            "dtype": dtype,
            "device": device,
            "weights": "tiny random" if tiny else "full-size random, the release's layout",
        },  # fmt: skip
        "loaded": {name: loaded[name] for name in loaded},
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
        },
        "goal_speedup": 1.3,
        "rows": rows,
    }


def format_release_table(report: dict) -> str:
    base = report["baseline"]
    label = "release" if base == "release" else "reference loop"
    vram = report["rows"][0]["ours"]["peak_vram_gib"] is not None
    header = f"| size | {label} s/step | idfusion s/step | speed-up/step | {label} s/image | idfusion s/image | " \
             f"speed-up/image | peak RSS {label} / idfusion GiB |" + (" peak VRAM GiB |" if vram else "") + \
             " latents rel. diff |"  # fmt: skip
    lines = [header, "|" + " --- |" * (header.count("|") - 1)]
    for row in report["rows"]:
        a, b = row[base], row["ours"]
        cells = [f"{row['size']}", f"{a['seconds_per_step']:.3f}", f"{b['seconds_per_step']:.3f}",
                 f"{row['speedup_per_step']:.2f}x", f"{a['seconds_per_image']:.2f}", f"{b['seconds_per_image']:.2f}",
                 f"{row['speedup_per_image']:.2f}x", f"{a['peak_rss_gib']:.2f} / {b['peak_rss_gib']:.2f}"]  # fmt: skip
        if vram:
            cells.append(f"{a['peak_vram_gib']:.2f} / {b['peak_vram_gib']:.2f}")
        cells.append(f"{row['latent_difference']:.1e}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_release_doc(path: str | os.PathLike[str], report: dict, command: str) -> Path:
    """Replace (or add) this method's ``--against official`` section of a Markdown file."""
    from ..bench import replace_section

    path = Path(path)
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    begin, end = f"<!-- bench-release:{report['method']} -->", f"<!-- /bench-release:{report['method']} -->"
    release, s = report["release"], report["settings"]
    baseline = (
        f"the release's own code, github.com/{release['repo']} at `{release['commit'][:12]}`: {release['runs']}"
        if report["baseline"] == "release"
        else f"the reference loop (the release's control flow, held by the tests to numbers recorded from "
        f"github.com/{release['repo']} at `{release['commit'][:12]}`)"
    )
    section = "\n".join([
        begin, f"### {report['method']} against its release", "", f"Command: `{command}`", "",
        f"Against {baseline}.", "",
        f"Settings: {s['weights']} weights, {s['steps']} steps x {s['repeats']} runs per size, {s['dtype']} on "
        f"{s['device']}; machine: {report['machine']['cores']} cores, torch {report['machine']['torch']}"
        + (f", {report['machine']['gpu']}" if report["machine"]["gpu"] else "") + ".", "",
        format_release_table(report), "",
        "<details><summary>JSON</summary>", "", "```json",
        json.dumps({k: v for k, v in report.items()}, indent=1), "```", "", "</details>", end,
    ])  # fmt: skip
    return replace_section(path, text, begin, end, section)
