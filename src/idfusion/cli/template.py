"""``idfusion template``: repaint the face(s) of a template photo with the person in the face photo(s)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .argtypes import arg_type, positive_int, seed


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
    from ..values import OptionValueError, finite

    number = finite(value)
    if not 0.0 < number <= 1.0:
        raise OptionValueError(f"expected a strength in (0, 1], got {value!r}")
    return number


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..registry import methods_with
    from .generate import DTYPES, add_face_model_options, add_method_options

    specs = methods_with("templates")
    parser = subparsers.add_parser(
        "template",
        help="put a person into a template photo (fixed-template portraits)",
        description="Detect the faces of a template photo, repaint the chosen one (counted from the left) or all of "
        "them with the identity of the face photo(s) by inpainting, and paste the result back through a feathered "
        "mask: pixels outside it stay exactly as in the template. Outputs are PNGs of the template's size with "
        "the generation metadata embedded; existing files are never overwritten.",
    )
    names = [s.name for s in specs]
    parser.add_argument("--method", choices=names, default=names[0], help=f"identity method (default {names[0]})")
    parser.add_argument("--template", type=Path, required=True, help="template photo with one or more faces")
    parser.add_argument("--face", type=Path, action="append", required=True, help="face photo; repeat for more")
    parser.add_argument(
        "--face-index", type=_face_index, default=0, metavar="N|all", help="template face, 0 = leftmost (default 0)"
    )
    parser.add_argument("--strength", type=arg_type(_strength), help="inpainting strength in (0, 1] (default 0.6)")
    parser.add_argument("--out", type=Path, default=Path("outputs"), help="output folder (default: outputs)")
    parser.add_argument("--model", help="folder or Hub id of the method's weights (default: the official release)")
    add_face_model_options(parser)
    parser.add_argument("--pose", action="store_true", help="keep the template's pose (the method's pose ControlNet)")
    parser.add_argument("--num-images", type=positive_int, default=1, help="results to make (default 1)")
    parser.add_argument(
        "--seed", type=seed, help="seed of the first result; the next get seed+1, ... (default random)"
    )
    parser.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1, mps")
    parser.add_argument("--dtype", choices=DTYPES, help="weights dtype (default float32)")
    parser.add_argument("--no-contact-sheet", action="store_true", help="do not write the contact sheet")
    add_method_options(parser, specs)
    parser.set_defaults(run=run, cpu_offload=False)


def run(args: argparse.Namespace) -> int:
    from ..atomic import check_output_folder
    from ..jobs import TemplateSettings, run_job
    from ..registry import get_method
    from .generate import _job, _load_settings, say_loading, write_results

    spec = get_method(args.method)
    for path in (args.template, *args.face):
        if not path.exists():
            raise ValueError(f"{path}: file not found")
    if args.pose and not spec.supports("pose"):
        raise ValueError(f"--pose: {spec.title} has no pose control")
    args.face = [(p, 1.0) for p in args.face]
    template = TemplateSettings(args.template, face_index=args.face_index, strength=args.strength, use_pose=args.pose)
    job = _job(args, spec, faces=[str(p) for p, _ in args.face], template=template)
    check_output_folder(args.out)  # before any model loads
    say_loading(spec, args.model)
    result = run_job(job, _load_settings(args))
    write_results(result, args.out, f"{args.method}-template", sheet=not args.no_contact_sheet)
    return 0
