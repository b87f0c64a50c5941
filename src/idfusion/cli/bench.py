"""``idfusion bench``: a method against plain diffusers SD1.5, side by side in one run."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..registry import methods

    parser = subparsers.add_parser(
        "bench",
        help="time a method against the plain diffusers SD1.5 pipeline (random full-size weights)",
        description="Seconds per step and per image, and peak memory, of a method and of diffusers' "
        "StableDiffusionPipeline sharing the same UNet, steps, size and dtype, measured alternately in one run.",
    )
    parser.add_argument(
        "--method", required=True, choices=[s.name for s in methods() if s.bench], help="method to measure"
    )
    parser.add_argument("--steps", type=int, default=4, help="denoising steps per image (default 4)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per pipeline (default 2)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="bfloat16")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--scheduler", default="dpm++")
    parser.add_argument("--tiny", action="store_true", help="tiny random models: a quick check that it runs")
    parser.add_argument("--json", type=Path, metavar="OUT", help="write the full report as JSON")
    parser.add_argument(
        "--write-docs", type=Path, metavar="MD", help="update this method's section of a Markdown file"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..bench import format_table, run_bench, write_benchmarks_doc
    from ..images import atomic_write_bytes

    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: CUDA is not available on this machine")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {args.repeats}")
    report = run_bench(
        args.method, steps=args.steps, repeats=args.repeats, dtype=args.dtype, device=args.device,
        scheduler=args.scheduler, tiny=args.tiny, progress=lambda message: print(message, file=sys.stderr),
    )  # fmt: skip
    print(format_table(report))
    if args.json:
        atomic_write_bytes(args.json, (json.dumps(report, indent=1) + "\n").encode())
    if args.write_docs:
        command = (
            "idfusion bench " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if sys.argv[1:2] == ["bench"] else ""
        )
        write_benchmarks_doc(args.write_docs, report, command or f"idfusion bench --method {args.method}")
    return 0
