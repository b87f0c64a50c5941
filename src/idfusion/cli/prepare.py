"""``idfusion prepare``: a folder of photos to a training set (see :mod:`idfusion.training.prepare`)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .argtypes import finite, non_negative_float, non_negative_int, positive_int


def _crop_kinds(value: str) -> list[str]:
    from ..training.prepare import CROP_KINDS

    kinds = [kind.strip() for kind in value.split(",") if kind.strip()]
    unknown = [kind for kind in kinds if kind not in CROP_KINDS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown crop kind(s) {', '.join(unknown)}; known: {', '.join(CROP_KINDS)}")
    return kinds


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..faces.analyzer import DETECTORS, RECOGNIZERS
    from ..training.prepare import CROP_KINDS, DEFAULT_BLUR, DEFAULT_MIN_FACE_SIZE, DEFAULT_MIN_PHOTOS

    parser = subparsers.add_parser(
        "prepare",
        help="turn a folder of photos into a training set",
        description="Detect, filter and crop the faces in a folder of photos (one sub-folder per identity, or "
        "photos named by identity) and write a JSON-lines training set with face boxes, landmarks, masks and "
        "per-method reference crops (docs/training-data.md). Re-running skips what is done. Inputs are only read.",
    )
    parser.add_argument(
        "input", nargs="?", type=Path, metavar="INPUT", help="photo folder, or a list file (one path per line)"
    )
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    parser.add_argument(
        "--list",
        type=Path,
        metavar="FILE",
        help="photos to take, one path per line, optionally TAB identity (relative paths from INPUT if given, "
        "else from the list's folder)",
    )
    parser.add_argument("--detector", choices=DETECTORS, default="hog", help="face detector (default: dlib HOG)")
    parser.add_argument(
        "--recognizer",
        choices=RECOGNIZERS,
        default="none",
        help="also store each face's identity embedding (default: none)",
    )
    parser.add_argument("--model-dir", type=Path, help="folder of ONNX face models (for --detector/--recognizer onnx)")
    parser.add_argument("--upsample", type=non_negative_int, help="dlib detector upsampling (default: by image size)")
    parser.add_argument(
        "--min-face-size",
        type=non_negative_float,
        metavar="N",
        help=f"smallest face side in px (default: {DEFAULT_MIN_FACE_SIZE}; 8 with --detector world)",
    )
    parser.add_argument(
        "--min-score", type=finite, metavar="S", help="smallest detection score (default: the detector's own)"
    )
    parser.add_argument(
        "--keep-largest", action="store_true", help="keep the largest face of a photo with several (default: skip)"
    )
    parser.add_argument(
        "--blur",
        type=non_negative_float,
        metavar="T",
        help=f"smallest face sharpness, variance of the Laplacian on the 112 px ArcFace crop (default: "
        f"{DEFAULT_BLUR:g}; 0 with --detector world; 0 turns the filter off)",
    )
    parser.add_argument(
        "--min-photos",
        type=positive_int,
        default=DEFAULT_MIN_PHOTOS,
        metavar="K",
        help=f"drop identities with fewer kept photos (default: {DEFAULT_MIN_PHOTOS})",
    )
    parser.add_argument(
        "--crops",
        type=_crop_kinds,
        default=list(CROP_KINDS),
        metavar="KINDS",
        help=f"comma-separated crop kinds to write (default: all: {','.join(CROP_KINDS)})",
    )
    parser.add_argument("--workers", type=positive_int, default=1, metavar="N", help="worker processes (default: 1)")
    parser.add_argument(
        "--caption-model",
        metavar="NAME",
        help="caption photos without a <stem>.txt with this transformers image-to-text model",
    )
    parser.add_argument(
        "--absolute-paths",
        action="store_true",
        help="write absolute paths (for trainers that resolve paths from their working directory)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..training.prepare import prepare_dataset

    if args.input is None and args.list is None:
        raise ValueError("give an input folder (INPUT) or a list file (--list FILE)")
    logging.getLogger("idfusion.training.prepare").setLevel(logging.INFO if args.debug else logging.WARNING)
    summary = prepare_dataset(
        args.input,
        args.out,
        list_file=args.list,
        detector=args.detector,
        recognizer=args.recognizer,
        model_dir=args.model_dir,
        upsample=args.upsample,
        min_face_size=args.min_face_size,
        min_score=args.min_score,
        keep_largest=args.keep_largest,
        blur=args.blur,
        min_photos=args.min_photos,
        crops=args.crops,
        workers=args.workers,
        caption_model=args.caption_model,
        absolute_paths=args.absolute_paths,
        progress=None,  # a bar on a terminal, none in a log
    )
    print(summary.format())
    if summary.kept == 0:
        print(f"idfusion prepare: error: no photo was kept (reasons in {summary.skipped_file})", file=sys.stderr)
        return 1
    return 0
