"""``idfusion bench``: a method side by side with plain diffusers SD1.5, or with its release's own code."""

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
        help="time a method against plain diffusers SD1.5 or against its release's own code (random weights)",
        description="Seconds per step and per image, and peak memory, of a method and of a baseline measured "
        "alternately in one run. --against sd15 (default): diffusers' StableDiffusionPipeline sharing the same UNet, "
        "steps, size and dtype. --against official: the release's own code from a checkout (--official-code or "
        "$IDFUSION_OFFICIAL_<METHOD>), else the reference loop the tests hold to it, on one folder of weights in the "
        "release's layout, at the release's native size and at 512.",
    )
    parser.add_argument(
        "--method",
        required=True,
        choices=[s.name for s in methods() if s.bench or s.release],
        help="method to measure",
    )
    parser.add_argument("--against", choices=("sd15", "official"), default="sd15", help="baseline (default sd15)")
    parser.add_argument("--official-code", type=Path, metavar="DIR", help="a checkout of the method's release")
    parser.add_argument("--official-python", type=Path, metavar="PYTHON", help="run the release's side with this "
                        "interpreter (an environment with the release's own libraries and idfusion installed)")  # fmt: skip
    parser.add_argument("--sizes", type=int, nargs="+", metavar="PX", help="--against official: image sizes "
                        "(default: the release's native size and 512)")  # fmt: skip
    parser.add_argument("--weights", type=Path, metavar="DIR", help="--against official: the release-layout weights "
                        "to load (random full-size ones are written there when it is empty; default: a temporary "
                        "folder)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=4, help="denoising steps per image (default 4)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per pipeline (default 2)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="bfloat16")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--scheduler", default="dpm++", help="--against sd15: the scheduler (default dpm++)")
    parser.add_argument("--tiny", action="store_true", help="tiny random models: a quick check that it runs")
    parser.add_argument("--json", type=Path, metavar="OUT", help="write the full report as JSON")
    parser.add_argument(
        "--write-docs", type=Path, metavar="MD", help="update this method's section of a Markdown file"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..images import atomic_write_bytes
    from ..registry import get_method

    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: CUDA is not available on this machine")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {args.repeats}")
    if args.sizes and any(s < 64 or s % 64 for s in args.sizes):
        raise ValueError(f"--sizes: each size must be a multiple of 64 (at least 64), got {args.sizes}")
    say = lambda message: print(message, file=sys.stderr)  # noqa: E731
    if args.against == "official":
        from ..official.harness import format_release_table, run_against_release, write_release_doc

        report = run_against_release(
            args.method, code=args.official_code, sizes=args.sizes, steps=args.steps, repeats=args.repeats,
            dtype=args.dtype, device=args.device, tiny=args.tiny, weights=args.weights,
            python=args.official_python,
            progress=say,
        )  # fmt: skip
        table, write = format_release_table(report), write_release_doc
    else:
        from ..bench import format_table, run_bench, write_benchmarks_doc

        if get_method(args.method).bench is None:
            raise ValueError(f"--method {args.method}: no --against sd15 benchmark; use --against official")
        report = run_bench(
            args.method, steps=args.steps, repeats=args.repeats, dtype=args.dtype, device=args.device,
            scheduler=args.scheduler, tiny=args.tiny, progress=say,
        )  # fmt: skip
        table, write = format_table(report), write_benchmarks_doc
    print(table)
    if args.json:
        atomic_write_bytes(args.json, (json.dumps(report, indent=1) + "\n").encode())
    if args.write_docs:
        command = (
            "idfusion bench " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if sys.argv[1:2] == ["bench"] else ""
        )
        write(args.write_docs, report, command or f"idfusion bench --method {args.method}")
    return 0
