"""``idfusion make-tiny``: write a tiny random checkpoint in a method's official layout."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..registry import method_names

    targets = ["sd15", "antelopev2", *method_names()]
    parser = subparsers.add_parser(
        "make-tiny",
        help="write a tiny random checkpoint in a method's official layout (offline smoke tests)",
        description=(
            "Write a tiny, randomly initialised checkpoint with exactly the folder layout, file names and key "
            "names of a method's official release, so the whole path runs offline. The images it makes are noise."
        ),
    )
    parser.add_argument("--method", required=True, choices=targets, help="which release to imitate")
    parser.add_argument("--out", required=True, type=Path, help="output folder (must be empty or absent)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty folder")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..testing import make_tiny

    print(f"writing a tiny {args.method} checkpoint to {args.out} ...", flush=True)
    written = make_tiny(args.method, args.out, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote a tiny {args.method} checkpoint ({len(written)} files) to {args.out}")
    return 0
