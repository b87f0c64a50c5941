"""``idfusion convert``: official checkpoints to safetensors, once, so later loads are fast and pickle-free."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..registry import methods

    names = [spec.name for spec in methods() if spec.converter]
    parser = subparsers.add_parser(
        "convert",
        help=f"convert an official checkpoint to safetensors ({', '.join(names)})",
        description="flashface: the official folder (flashface.ckpt, openai-clip-vit-large-14.pth, sd-v1-vae.pth, "
        "bpe_simple_vocab_16e6.txt.gz) to a saved pipeline folder of safetensors that --model accepts. "
        "adaface: an official .pt (pickled modules, read without running code) to a .safetensors file.",
    )
    parser.add_argument("--method", required=True, choices=names)
    parser.add_argument("source", type=Path, help="the official folder or file")
    parser.add_argument("out", type=Path, help="output folder or file")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..registry import get_method, resolve

    if args.out.exists() and (args.out.is_file() or any(args.out.iterdir())):
        raise ValueError(f"{args.out}: already exists; choose a new path")
    print(f"converting {args.source} ...", flush=True)
    resolve(get_method(args.method).converter)(args.source, args.out)
    print(f"wrote {args.out}")
    return 0
