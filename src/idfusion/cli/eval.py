"""``idfusion eval [BENCH.yaml]``: run a benchmark, score every image, write the report folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _model(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected METHOD=PATH, got {text!r}")
    return name, path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="run a benchmark (default: the synthetic world's held-out one) and write a report",
        description=(
            "Generate every method's images for a benchmark's identities, prompts and seeds (resumable: images "
            "already in OUT/work/images are reused), score each image (identity vs references and held-out "
            "photos, copy-paste, face detection, prompt fidelity, diversity, time and memory) and write "
            "report.md, report.html, scores.csv, scores.json, plots/ and grids/ into --out. Without BENCH, runs "
            "the shipped world benchmark offline. Benchmark schema: idfusion/eval/benchmarks/photos-template.yaml."
        ),
    )
    parser.add_argument("bench", nargs="?", type=Path, metavar="BENCH.yaml", help="benchmark file (default: world)")
    parser.add_argument("--out", type=Path, default=Path("outputs/eval"), help="report folder (default: outputs/eval)")
    parser.add_argument(
        "--shard", metavar="I/N",
        help="make only every N-th image from the I-th, then stop; a run without --shard scores and reports",
    )  # fmt: skip
    parser.add_argument(
        "--model", type=_model, action="append", default=[], metavar="METHOD=PATH",
        help="use PATH for the method entry METHOD (its label or method name); repeat for more",
    )  # fmt: skip
    parser.add_argument("--limit", type=int, metavar="N", help="at most N images per method (a quick run)")
    parser.add_argument(
        "--report-only", action="store_true", help="generate nothing: score and report the images already made"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..batch import shard_of
    from ..eval.harness import run_eval

    shard = shard_of(args.shard) if args.shard else (0, 1)
    result = run_eval(
        args.bench,
        args.out,
        shard=shard,
        models=dict(args.model),
        limit=args.limit,
        report_only=args.report_only,
        progress=not args.no_progress,
    )
    print(
        f"{result.generated} images generated, {result.skipped} already done, {result.other_shards} left to other "
        f"shards, {len(result.errors)} error(s)",
        file=sys.stderr,
    )
    for error in result.errors:
        print(f"idfusion eval: {error}", file=sys.stderr)
    if not result.files:
        print(f"shard {shard[0]}/{shard[1]} done; run without --shard to score and write the report", file=sys.stderr)
        return 1 if result.errors else 0
    for note in result.notes:
        if not note.startswith("generation error:"):
            print(f"note: {note}")
    _print_table(result.summary)
    print(f"wrote {result.files['report.md']}")
    return 1 if result.errors else 0


def _print_table(summary: dict) -> None:
    def cell(value, fmt: str) -> str:
        return fmt.format(value) if isinstance(value, (int, float)) and value == value else "-"

    print(f"{'method':<16} {'images':>6} {'faces':>6} {'SimTarget':>9} {'Paste':>7} {'copy_geo':>8} {'prompt':>7}")
    for label, v in summary.items():
        print(
            f"{label:<16} {v['images']:>6} {cell(v['face_rate'], '{:.0%}'):>6} {cell(v['sim_target'], '{:.3f}'):>9} "
            f"{cell(v['paste'], '{:+.3f}'):>7} {cell(v['copy_geo'], '{:+.3f}'):>8} "
            f"{cell(v['prompt_fidelity'], '{:.3f}'):>7}"
        )
