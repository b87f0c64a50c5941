"""``idfusion generate``: face photo(s) + prompt in, PNG files with their generation metadata out.

Every method-specific option comes from the method registry (:mod:`idfusion.registry`): this module has no branch on
a method's name.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .argtypes import arg_type, positive_int, seed

DTYPES = ("float32", "float16", "bfloat16")  # idfusion.jobs.DTYPES (not imported: --help stays light)
DETECTORS = ("onnx", "hog", "mmod", "world")  # idfusion.faces.DETECTORS, likewise


def add_option(parser, option) -> None:
    """One registry :class:`~idfusion.registry.Option` as an argparse argument (``None`` default: not given)."""
    kwargs: dict[str, Any] = {"dest": option.dest, "default": None, "help": option.help}
    if option.kind == "flag":
        kwargs["action"] = "store_true"
    else:
        if option.kind == "list":
            kwargs["action"] = "append"
        if option.parse is not None:
            kwargs["type"] = arg_type(option.parse)
        elif option.kind == "file":
            kwargs["type"] = Path
        if option.choices is not None:
            kwargs["choices"] = option.choices
        if option.metavar is not None:
            kwargs["metavar"] = option.metavar
    parser.add_argument(option.flag, **kwargs)


def add_method_options(parser: argparse.ArgumentParser, specs) -> None:
    """The registry's options, grouped: those every method takes, then each set of methods' own."""
    from ..registry import COMMON_OPTIONS, options_by_flag

    common = {o.flag for o in COMMON_OPTIONS}
    groups: dict[tuple[str, ...], list] = {}
    for flag, (option, names) in options_by_flag(specs).items():
        groups.setdefault(("*",) if flag in common else tuple(names), []).append(option)
    for names, options in groups.items():
        title = "sampling options (every method)" if names == ("*",) else f"options of --method {', '.join(names)}"
        group = parser.add_argument_group(title)
        for option in options:
            add_option(group, option)


def add_face_model_options(parser: argparse.ArgumentParser) -> None:
    """``--face-models`` and ``--detector``, the same for every command that analyses face photos."""
    parser.add_argument("--face-models", type=Path, metavar="DIR", help="folder with the ONNX face models")
    parser.add_argument(
        "--detector", choices=DETECTORS,
        help="face detector: onnx (SCRFD, the default when its model is there), hog or mmod (dlib), world (the "
        "synthetic world's)",
    )  # fmt: skip


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..registry import method_names, methods

    parser = subparsers.add_parser(
        "generate",
        help="make images of a person from face photo(s) and a prompt",
        description="Generate images of the person in the face photo(s). Outputs are PNG files with the "
        "generation metadata embedded (also as the 'parameters' text other Stable Diffusion tools read), plus a "
        "contact sheet. Existing files are never overwritten.",
    )
    parser.add_argument("--method", choices=method_names(), help="identity method (required unless --from is given)")
    parser.add_argument(
        "--face", action="append", type=arg_type(_weighted_face), default=[], metavar="IMAGE[:WEIGHT]",
        help="face photo; repeat for more. Methods that blend identities take a weight per photo (A.jpg:0.7 B.jpg:0.3)",
    )  # fmt: skip
    parser.add_argument(
        "--face-index", dest="photo_face_index", type=int, metavar="N",
        help="in photos with several people, use face N from the left (0 = leftmost; default: the largest, said in "
        "a warning)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("outputs"), help="output folder (default: outputs)")
    parser.add_argument("--model", help="Hub repo id or local folder of the method's weights (default: official)")
    add_face_model_options(parser)
    parser.add_argument("--num-images", type=positive_int, help="images to make (default 1)")
    parser.add_argument("--seed", type=seed, help="seed of the first image; the next get seed+1, ... (default random)")
    parser.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1, mps")
    parser.add_argument("--dtype", choices=DTYPES, help="weights dtype (default float32; float16 on GPUs is common)")
    parser.add_argument("--cpu-offload", action="store_true", help="keep models on the CPU until used (saves VRAM)")
    parser.add_argument("--vae-tiling", action="store_true", help="decode in tiles (large images, less memory)")
    parser.add_argument("--attention-slicing", action="store_true", help="compute attention in slices")
    parser.add_argument("--from", dest="from_image", type=Path, metavar="IMAGE.png", help="make an idfusion PNG again")
    parser.add_argument(
        "--jobs", type=Path, metavar="FILE",
        help="run every job of a JSON/JSONL job file (resumable: images already in --out are skipped; see "
        "idfusion.batch for the schema; FeedFace's -j files read as they are). Options given here apply to every "
        "job that does not set them",
    )  # fmt: skip
    parser.add_argument(
        "--shard", metavar="I/N", help="with --jobs: make only every N-th image from the I-th (default: one shard per "
        "accelerate launch process)",
    )  # fmt: skip
    parser.add_argument("--no-contact-sheet", action="store_true", help="do not write the contact sheet")
    parser.add_argument(
        "--allow-large", action="store_true",
        help="lift the limits on --steps (1000), --width/--height (4096) and --num-images (64)",
    )  # fmt: skip
    add_method_options(parser, methods())
    parser.set_defaults(run=run)


def _weighted_face(value: str) -> tuple[str, float]:
    from ..values import weighted_path

    return weighted_path(value)


def _given(args: argparse.Namespace, option) -> bool:
    from ..jobs import given

    return given(getattr(args, option.dest, None))


def _apply_metadata(args: argparse.Namespace, meta: dict, spec) -> None:
    """Fill the options not given on the command line from an image's metadata (the registry says which)."""
    if args.method != meta.get("method"):
        raise ValueError(f"{args.from_image} was made with {meta.get('method')}, not {args.method}")
    if args.model is None and meta.get("model") is not None:
        args.model = meta["model"]
        looks_local = Path(args.model).is_absolute() or args.model.startswith((".", "~")) or args.model.count("/") > 1
        if looks_local and not Path(args.model).exists():
            raise ValueError(
                f"{args.from_image} was made with --model {args.model}, which is not there; pass --model with "
                "the folder it was made with"
            )
    for option in spec.all_options():
        key = option.metadata_key
        if not key or _given(args, option) or meta.get(key) is None:
            continue
        if option.kind == "file":
            raise ValueError(f"{args.from_image} was made with {option.flag}: pass that file again")
        setattr(args, option.dest, option.replay(meta[key]) if option.replay else meta[key])
    if args.seed is None:
        args.seed = meta.get("seed")
    if args.photo_face_index is None and meta.get("photo_face_index") is not None:
        args.photo_face_index = int(meta["photo_face_index"])
    if args.num_images is None:
        args.num_images = 1
    if spec.supports("blending") and meta.get("face_weights") and all(w == 1.0 for _, w in args.face):
        weights = meta["face_weights"]
        if len(weights) != len(args.face):
            raise ValueError(f"{args.from_image} was made from {len(weights)} photos; give the same {len(weights)}")
        args.face = [(path, float(w)) for (path, _), w in zip(args.face, weights, strict=True)]


def device_and_dtype(args: argparse.Namespace):
    from ..jobs import resolve_device

    return resolve_device(args.device, args.dtype)


def check_options(args: argparse.Namespace, spec) -> None:
    """Refuse options the method does not take, naming the methods that do (:func:`idfusion.jobs.check_job`)."""
    from ..jobs import check_job

    check_job(_job(args, spec, faces=[p for p, _ in args.face]))


def _load_settings(args: argparse.Namespace):
    from ..jobs import LoadSettings

    return LoadSettings(
        device=args.device,
        dtype=args.dtype,
        face_models=args.face_models,
        detector=args.detector,
        cpu_offload=bool(getattr(args, "cpu_offload", False)),
        vae_tiling=bool(getattr(args, "vae_tiling", False)),
        attention_slicing=bool(getattr(args, "attention_slicing", False)),
    )


def _job(args: argparse.Namespace, spec, **fields):
    """The command line as a :class:`~idfusion.jobs.GenerationJob` (every option given, for :func:`check_job`)."""
    from ..jobs import GenerationJob, given_options

    weights = [w for _, w in args.face]
    return GenerationJob(
        method=spec.name,
        options=given_options(args),
        face_weights=weights if any(w != 1.0 for w in weights) else None,
        photo_face_index=getattr(args, "photo_face_index", None),
        num_images=args.num_images or 1,
        seed=args.seed,
        model=args.model,
        allow_large=bool(getattr(args, "allow_large", False)),
        **fields,
    )


def load_configured_pipeline(args: argparse.Namespace, spec, extra_load: dict | None = None):
    """Load ``spec``'s pipeline with the command line's load options, device, memory and face-detector options."""
    from ..jobs import load_configured

    load_options = {
        option.call_argument: getattr(args, option.dest)
        for option in spec.all_options()
        if option.target == "load" and _given(args, option)
    }
    return load_configured(spec, args.model, _load_settings(args), {**(extra_load or {}), **load_options})


def run(args: argparse.Namespace) -> int:
    from ..atomic import check_output_folder
    from ..jobs import check_job, run_job
    from ..outputs import decode_array, read_generation_metadata
    from ..registry import get_method, method_names

    if args.jobs is not None:
        return run_jobs(args)
    if args.shard is not None:
        raise ValueError("--shard goes with --jobs FILE")
    id_embeds, meta = None, None
    if args.from_image is not None:
        meta = read_generation_metadata(args.from_image)
        if args.method is None:
            args.method = meta.get("method")
    if args.method is None:
        raise ValueError(f"--method is required ({', '.join(method_names())}), unless --from IMAGE.png is given")
    spec = get_method(args.method)
    if meta is not None:
        _apply_metadata(args, meta, spec)
        if not args.face:
            if spec.identity != "embedding" or "id_embeds" not in meta:
                raise ValueError(f"{args.from_image}: {spec.title} needs the face photos again: pass them with --face")
            id_embeds = decode_array(meta["id_embeds"])
    if not args.face and id_embeds is None:
        raise ValueError("give at least one --face photo (or --from an idfusion PNG)")
    files = [p for p, _ in args.face] + [getattr(args, o.dest) for o in spec.all_options() if o.kind == "file"]
    for path in files:
        if path is not None and not Path(path).exists():
            raise ValueError(f"{path}: file not found")
    recorded = None
    if meta is not None and meta.get("scheduler_config"):
        recorded = (meta["scheduler"], meta["scheduler_config"])  # replayed exactly unless --scheduler differs
    job = _job(args, spec, faces=[str(p) for p, _ in args.face], id_embeds=id_embeds, recorded_scheduler=recorded)
    check_job(job)
    check_output_folder(args.out, _output_bytes(job, sheet=not args.no_contact_sheet))  # before any model loads
    say_loading(spec, args.model)
    result = run_job(job, _load_settings(args))
    write_results(result, args.out, args.method, sheet=not args.no_contact_sheet)
    return 0


def run_jobs(args: argparse.Namespace) -> int:
    """``--jobs FILE``: every job of the file, resumable and sharded; a bad line is reported and skipped."""
    from ..batch import read_job_file, run_batch, shard_of
    from ..jobs import given_options

    if args.face or args.from_image is not None:
        raise ValueError("--jobs FILE takes the photos from the file: do not give --face or --from")
    shard = shard_of(args.shard)
    lines = read_job_file(
        args.jobs, method=args.method, model=args.model, face_index=args.photo_face_index,
        allow_large=args.allow_large, options=given_options(args),
    )  # fmt: skip
    for line in lines:
        if line.error is not None:
            print(f"idfusion generate: {args.jobs}: line {line.line}: {line.error}", file=sys.stderr)
    report = run_batch(lines, args.out, _load_settings(args), shard=shard)
    for error in report.errors[sum(line.error is not None for line in lines) :]:
        print(f"idfusion generate: {args.jobs}: {error}", file=sys.stderr)
    for path in report.written:
        print(path)
    print(
        f"{len(report.written)} images written, {report.skipped} already done, {report.other_shards} left to other "
        f"shards, {len(report.errors)} job error(s)",
        file=sys.stderr,
    )
    return 1 if report.errors else 0


def say_loading(spec, model: str | None) -> None:
    """One status line on stderr before the silent part (loading can take a minute); stdout stays the paths."""
    print(f"loading {spec.title} from {model or 'the official release'} ...", file=sys.stderr, flush=True)


def _output_bytes(job, *, sheet: bool) -> int:
    """A generous estimate of the bytes a job writes: uncompressed RGB per image (PNG is smaller) and the sheet."""
    side = 1024  # the largest native size of the registered methods when --width/--height are not given
    width, height = job.options.get("width") or side, job.options.get("height") or side
    per_image = width * height * 3 + (1 << 16)  # pixels + metadata
    return job.num_images * per_image * (2 if sheet else 1)


def write_results(result, out_dir: Path, stem: str, *, sheet: bool) -> None:
    """Save each image with its metadata as ``<stem>_NNNN.png`` (never overwriting) and, with ``sheet``, the
    contact sheet beside the first; print every path written."""
    from ..jobs import save_results

    for path in save_results(result, out_dir, stem, sheet=sheet):
        print(path)
