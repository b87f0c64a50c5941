"""``idfusion faces``: detect, align and embed the faces in images."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .argtypes import non_negative_int


def _selection(value: str) -> str | int:
    if value in ("all", "largest"):
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'all', 'largest' or a face index, got {value!r}") from None


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..faces.analyzer import DETECTORS, RECOGNIZERS

    parser = subparsers.add_parser(
        "faces",
        help="detect, align and embed faces",
        description="Detect faces, print a table per image, and optionally write JSON, aligned crops and "
        "annotated images. Input images are never modified.",
    )
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    parser.add_argument(
        "--detector",
        choices=DETECTORS,
        default="hog",
        help="face detector (default: dlib HOG; world: synthetic world)",
    )
    parser.add_argument(
        "--recognizer", choices=RECOGNIZERS, default="dlib", help="identity embedding model (default: dlib ResNet)"
    )
    parser.add_argument("--model-dir", type=Path, help="folder of ONNX face models (for --detector/--recognizer onnx)")
    parser.add_argument(
        "--select", type=_selection, default="all", help="'all' (default), 'largest', or a face index from the left"
    )
    parser.add_argument(
        "--min-face-size", type=non_negative_int, default=32, help="smallest face side in px (32; world faces need 8)"
    )
    parser.add_argument("--upsample", type=non_negative_int, help="dlib detector upsampling (default: by image size)")
    parser.add_argument("--aligned", action="store_true", help="inputs are already ArcFace-aligned square crops")
    parser.add_argument("--dense", action="store_true", help="also compute 68 dense landmarks")
    parser.add_argument("--json", type=Path, metavar="OUT", help="write boxes, landmarks and embeddings as JSON")
    parser.add_argument("--crops", type=Path, metavar="DIR", help="write 112x112 ArcFace-aligned crops here")
    parser.add_argument("--annotate", type=Path, metavar="DIR", help="write copies with boxes and landmarks here")
    parser.set_defaults(run=run)


def _output_stems(paths: list[Path]) -> list[str]:
    """File stems for outputs, made unique when two inputs share a name."""
    seen: dict[str, int] = {}
    stems = []
    for path in paths:
        count = seen.get(path.stem, 0)
        seen[path.stem] = count + 1
        stems.append(path.stem if count == 0 else f"{path.stem}-{count}")
    return stems


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .. import __version__
    from ..errors import IdfusionError
    from ..faces import FaceAnalyzer
    from ..faces.draw import draw_faces
    from ..images import atomic_write_bytes, load_image, save_image

    if args.upsample is not None and args.upsample > 3:
        raise ValueError(f"--upsample must be between 0 and 3, got {args.upsample}")
    analyzer = FaceAnalyzer(
        args.detector,
        args.recognizer,
        model_dir=args.model_dir,
        min_face_size=args.min_face_size,
        dense_landmarks=args.dense,
        upsample=args.upsample,
    )
    inputs = [p.resolve() for p in args.images]
    for folder in (args.crops, args.annotate):
        if folder is not None and folder.exists() and not folder.is_dir():
            raise ValueError(f"{folder}: exists and is not a folder")

    records = []
    failures = 0
    progress = tqdm(
        list(zip(args.images, _output_stems(args.images), strict=True)), desc="faces", unit="image", disable=None
    )
    for path, stem in progress:
        try:
            image = load_image(path, max_pixels=analyzer.max_pixels)
            faces = analyzer.analyze(image.array, select=args.select, aligned=args.aligned, name=str(path))
        except IdfusionError as error:
            failures += 1
            tqdm.write(f"idfusion faces: error: {error}", file=sys.stderr)
            records.append({"image": str(path), "error": str(error), "faces": []})
            continue

        tqdm.write(f"{path}: {len(faces)} face(s), {image.width}x{image.height}")
        for index, face in enumerate(faces):
            box = ", ".join(f"{v:.0f}" for v in face.bbox)
            embedding = f"{face.embedding_model} ({face.embedding_dim}-d)" if face.embedding is not None else "-"
            tqdm.write(
                f"  {index:>2}  box [{box}]  {face.width:.0f}x{face.height:.0f}  score {face.det_score:.3f}  {embedding}"
            )

        records.append(
            {
                "image": str(path),
                "width": image.width,
                "height": image.height,
                "faces": [face.to_dict() for face in faces],
            }
        )
        if args.crops is not None:
            for index, face in enumerate(faces):
                target = args.crops / f"{stem}_face{index}.png"
                _refuse_input(target, inputs)
                save_image(target, face.crops["arcface"])
        if args.annotate is not None:
            target = args.annotate / f"{stem}_annotated.png"
            _refuse_input(target, inputs)
            save_image(target, draw_faces(image.array, faces))

    if args.json is not None:
        _refuse_input(args.json, inputs)
        document = {
            "idfusion_version": __version__,
            "detector": analyzer.detector.name,
            "recognizer": analyzer.embedding_model,
            "images": records,
        }
        atomic_write_bytes(args.json, (json.dumps(document, indent=1) + "\n").encode())
        print(f"wrote {args.json}")
    if failures:
        print(f"idfusion faces: {failures} of {len(args.images)} image(s) failed", file=sys.stderr)
        return 1
    return 0


def _refuse_input(target: Path, inputs: list[Path]) -> None:
    if target.resolve() in inputs:
        raise ValueError(f"{target}: refusing to overwrite an input image")
