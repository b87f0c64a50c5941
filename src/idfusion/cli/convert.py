"""``idfusion convert``: official checkpoints to safetensors, once, so later loads are fast and pickle-free."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert an official checkpoint to safetensors (FlashFace folder, AdaFace .pt)",
        description="flashface: the official folder (flashface.ckpt, openai-clip-vit-large-14.pth, sd-v1-vae.pth, "
        "bpe_simple_vocab_16e6.txt.gz) to a diffusers-style folder of safetensors that --model accepts. "
        "adaface: an official .pt (pickled modules, read without running code) to a .safetensors file.",
    )
    parser.add_argument("--method", required=True, choices=("flashface", "adaface"))
    parser.add_argument("source", type=Path, help="the official folder (flashface) or .pt file (adaface)")
    parser.add_argument("out", type=Path, help="output folder (flashface) or .safetensors file (adaface)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.out.exists() and (args.out.is_file() or any(args.out.iterdir())):
        raise ValueError(f"{args.out}: already exists; choose a new path")
    if args.method == "adaface":
        from ..methods.adaface import convert_adaface_checkpoint

        convert_adaface_checkpoint(args.source, args.out)
    else:
        from ..methods.flashface_checkpoint import load_official_flashface, save_converted_flashface

        save_converted_flashface(load_official_flashface(args.source), args.out, variant_name="flashface")
    print(f"wrote {args.out}")
    return 0
