"""``idfusion template``: repaint the face(s) of a template photo with the person in the face photo(s)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .argtypes import non_negative_float, positive_int, seed

METHODS = ("fact",)


def _face_index(value: str) -> int | str:
    if value == "all":
        return value
    try:
        index = int(value)
    except ValueError:
        index = -1
    if index < 0:
        raise argparse.ArgumentTypeError(f"expected a face index (0 = leftmost) or 'all', got {value!r}")
    return index


def _strength(value: str) -> float:
    number = non_negative_float(value)
    if not 0.0 < number <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a strength in (0, 1], got {value!r}")
    return number


def register(subparsers: argparse._SubParsersAction) -> None:
    from .generate import DTYPES

    parser = subparsers.add_parser(
        "template",
        help="put a person into a template photo (fixed-template portraits)",
        description="Detect the faces of a template photo, repaint the chosen one (counted from the left) or all of "
        "them with the identity of the face photo(s) by inpainting, and paste the result back through a feathered "
        "mask: pixels outside it stay exactly as in the template. Outputs are PNGs of the template's size with "
        "the generation metadata embedded; existing files are never overwritten.",
    )
    parser.add_argument("--method", choices=METHODS, default="fact", help="identity method (fact)")
    parser.add_argument("--template", type=Path, required=True, help="template photo with one or more faces")
    parser.add_argument("--face", type=Path, action="append", required=True, help="face photo; repeat for more")
    parser.add_argument(
        "--face-index", type=_face_index, default=0, metavar="N|all", help="template face, 0 = leftmost (default 0)"
    )
    parser.add_argument("--strength", type=_strength, help="inpainting strength in (0, 1] (default 0.6)")
    parser.add_argument("--out", type=Path, default=Path("outputs"), help="output folder (default: outputs)")
    parser.add_argument("--model", help="folder with the FACT release (default: the official ModelScope files)")
    parser.add_argument("--base-model", help="SD1.5 base model (Hub id or folder); FACT's template flow used Majicmix")
    parser.add_argument("--adapter", help="majicmix (default), film, or an adapter .ckpt file")
    parser.add_argument("--face-models", type=Path, metavar="DIR", help="folder with the ONNX face models")
    parser.add_argument("--prompt", help="text prompt (default: a plain portrait prompt)")
    parser.add_argument("--negative-prompt", help="negative prompt (default: the method's)")
    parser.add_argument("--adapter-scale", type=non_negative_float, help="face adapter scale (default 0.55)")
    parser.add_argument("--pose", action="store_true", help="keep the template's pose with the OpenPose ControlNet")
    parser.add_argument("--num-images", type=positive_int, default=1, help="results to make, 1-6 (default 1)")
    parser.add_argument(
        "--seed", type=seed, help="seed of the first result; the next get seed+1, ... (default random)"
    )
    parser.add_argument("--steps", type=positive_int, help="sampling steps (default 50)")
    parser.add_argument("--guidance", type=non_negative_float, help="classifier-free guidance scale (default 5.0)")
    parser.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1, mps")
    parser.add_argument("--dtype", choices=DTYPES, help="weights dtype (default float32)")
    parser.add_argument("--no-contact-sheet", action="store_true", help="do not write the contact sheet")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..pipelines import load_pipeline
    from .generate import _device_and_dtype, write_results

    for path in (args.template, *args.face):
        if not path.exists():
            raise ValueError(f"{path}: file not found")
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"{args.out}: exists and is not a folder")
    device, dtype = _device_and_dtype(args)
    load_kwargs = {"base_model": args.base_model, "face_model_dir": args.face_models}
    if dtype is not None:
        load_kwargs["torch_dtype"] = dtype
    if args.adapter is not None:
        load_kwargs["adapter"] = args.adapter
    pipe = load_pipeline(args.method, args.model, **load_kwargs).to(device)
    options = {"strength": args.strength, "num_inference_steps": args.steps, "guidance_scale": args.guidance}
    result = pipe.template_portraits(
        args.template, [str(p) for p in args.face], face_index=args.face_index, prompt=args.prompt,
        negative_prompt=args.negative_prompt, adapter_scale=args.adapter_scale, use_pose=args.pose,
        num_images=args.num_images, seed=args.seed, **{k: v for k, v in options.items() if v is not None},
    )  # fmt: skip
    write_results(result, args.out, f"{args.method}-template", sheet=not args.no_contact_sheet)
    return 0
