"""``idfusion demo``: the main job on the synthetic world's shipped weights, offline, in under a minute on a CPU."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="render held-out world identities, run every method with world weights, write one contact sheet",
        description=(
            "Render a few held-out identities of the synthetic world, run the shipped world base model and every "
            "method that has world weights on them, and write one contact sheet: the references, then each "
            "method's outputs with the judge's identity score (cosine similarity to the reference) under each. "
            "Runs offline: every weight ships with the package."
        ),
    )
    parser.add_argument("--out", type=Path, default=Path("outputs"), help="output folder (default: outputs)")
    parser.add_argument(
        "--identities", type=int, default=4, help="held-out identities, one column each: 1 to 4 (default 4)"
    )
    parser.add_argument("--seed", type=int, default=0, help="picks identities, prompts and noise (default 0)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..world.demo import run_demo

    result = run_demo(
        args.out,
        identities=args.identities,
        seed=args.seed,
        num_inference_steps=args.steps,
        progress=not args.no_progress,
    )
    for note in result.notes:
        print(f"note: {note}")
    for method in result.methods:
        scores = ", ".join("no face" if s is None else f"{s:.2f}" for s in result.scores[method])
        print(f"{method}: judge identity scores {scores}")
    print(f"wrote {result.path}")
    return 0
