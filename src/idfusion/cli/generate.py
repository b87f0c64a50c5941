"""``idfusion generate``: face photo(s) + prompt in, PNG files with their generation metadata out.

Every method-specific option comes from the method registry (:mod:`idfusion.registry`): this module has no branch on
a method's name.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .argtypes import arg_type, positive_int, seed

DTYPES = ("float32", "float16", "bfloat16")


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
    parser.add_argument("--out", type=Path, default=Path("outputs"), help="output folder (default: outputs)")
    parser.add_argument("--model", help="Hub repo id or local folder of the method's weights (default: official)")
    parser.add_argument("--face-models", type=Path, metavar="DIR", help="folder with the ONNX face models")
    parser.add_argument("--detector", choices=("onnx", "hog", "mmod"), help="face detector (default: onnx if present)")
    parser.add_argument("--num-images", type=positive_int, help="images to make (default 1)")
    parser.add_argument("--seed", type=seed, help="seed of the first image; the next get seed+1, ... (default random)")
    parser.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1, mps")
    parser.add_argument("--dtype", choices=DTYPES, help="weights dtype (default float32; float16 on GPUs is common)")
    parser.add_argument("--cpu-offload", action="store_true", help="keep models on the CPU until used (saves VRAM)")
    parser.add_argument("--vae-tiling", action="store_true", help="decode in tiles (large images, less memory)")
    parser.add_argument("--attention-slicing", action="store_true", help="compute attention in slices")
    parser.add_argument("--from", dest="from_image", type=Path, metavar="IMAGE.png", help="make an idfusion PNG again")
    parser.add_argument("--no-contact-sheet", action="store_true", help="do not write the contact sheet")
    add_method_options(parser, methods())
    parser.set_defaults(run=run)


def _weighted_face(value: str) -> tuple[str, float]:
    from ..values import weighted_path

    return weighted_path(value)


def _given(args: argparse.Namespace, option) -> bool:
    return getattr(args, option.dest, None) not in (None, False, [])


def _apply_metadata(args: argparse.Namespace, meta: dict, spec) -> None:
    """Fill the options not given on the command line from an image's metadata (the registry says which)."""
    if args.method != meta.get("method"):
        raise ValueError(f"{args.from_image} was made with {meta.get('method')}, not {args.method}")
    if args.model is None:
        args.model = meta.get("model")
    for option in spec.all_options():
        key = option.metadata_key
        if not key or _given(args, option) or meta.get(key) is None:
            continue
        if option.kind == "file":
            raise ValueError(f"{args.from_image} was made with {option.flag}: pass that file again")
        setattr(args, option.dest, option.replay(meta[key]) if option.replay else meta[key])
    if args.seed is None:
        args.seed = meta.get("seed")
    if args.num_images is None:
        args.num_images = 1
    if spec.supports("blending") and meta.get("face_weights") and all(w == 1.0 for _, w in args.face):
        weights = meta["face_weights"]
        if len(weights) != len(args.face):
            raise ValueError(f"{args.from_image} was made from {len(weights)} photos; give the same {len(weights)}")
        args.face = [(path, float(w)) for (path, _), w in zip(args.face, weights, strict=True)]


def device_and_dtype(args: argparse.Namespace):
    import torch

    device = args.device or "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine (torch {torch.__version__})")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps: Apple's MPS backend is not available on this machine")
    if not (device == "cpu" or device == "mps" or device.startswith("cuda")):
        raise ValueError(f"--device must be cpu, cuda, cuda:N or mps, got {device!r}")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    return device, dtype


def check_options(args: argparse.Namespace, spec) -> None:
    """Refuse options the method does not take, naming the methods that do."""
    from ..registry import methods, options_by_flag

    allowed = {o.flag for o in spec.all_options()}
    titles = {s.name: s.title for s in methods()}
    refused = [
        f"{flag} is an option of {' and '.join(titles[n] for n in names)} (--method {', '.join(names)})"
        for flag, (option, names) in options_by_flag(methods()).items()
        if flag not in allowed and _given(args, option)
    ]
    if refused:
        raise ValueError(f"{'; '.join(refused)}, not of {spec.title}")
    if not spec.supports("blending") and any(w != 1.0 for _, w in args.face):
        blending = [s.name for s in methods() if s.supports("blending")]
        raise ValueError(
            f"face weights (IMAGE:WEIGHT) blend identities in {', '.join(blending)} only, not {spec.name}"
        )
    if spec.max_images is not None and (args.num_images or 1) > spec.max_images:
        raise ValueError(f"--num-images: {spec.title} makes 1 to {spec.max_images} images per request")


def load_configured_pipeline(args: argparse.Namespace, spec, extra_load: dict | None = None):
    """Load ``spec``'s pipeline with the command line's load options, device, memory and face-detector options."""
    from ..registry import load_pipeline

    device, dtype = device_and_dtype(args)
    if args.cpu_offload and device == "cpu":
        raise ValueError("--cpu-offload moves models between the CPU and a GPU; give --device cuda (or mps) with it")
    load_kwargs = {"face_model_dir": args.face_models, **(extra_load or {})}
    for option in spec.all_options():
        if option.target == "load" and _given(args, option):
            load_kwargs[option.call_argument] = getattr(args, option.dest)
    if dtype is not None:
        load_kwargs["torch_dtype"] = dtype
    pipe = load_pipeline(spec.name, args.model, **load_kwargs)
    if args.cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    if getattr(args, "vae_tiling", False):
        pipe.vae.enable_tiling()
    if getattr(args, "attention_slicing", False):
        pipe.enable_attention_slicing()
    if args.detector is not None:
        pipe.configure_face_analysis(detector=args.detector)
    return pipe


def run(args: argparse.Namespace) -> int:
    from ..outputs import decode_array, read_generation_metadata
    from ..registry import get_method, method_names

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
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"{args.out}: exists and is not a folder")
    check_options(args, spec)

    pipe = load_configured_pipeline(args, spec)
    if meta is not None and meta.get("scheduler_config") and args.scheduler in (None, meta.get("scheduler")):
        from ..pipelines.scheduling import make_scheduler

        pipe.scheduler = make_scheduler(meta["scheduler"], meta["scheduler_config"])  # exactly the recorded one
        args.scheduler = None

    call: dict[str, Any] = {"num_images_per_prompt": args.num_images or 1, "seed": args.seed}
    for option in spec.all_options():
        if option.target == "call" and _given(args, option):
            value = getattr(args, option.dest)
            call[option.call_argument] = str(value) if option.kind == "file" else value
    if args.face:
        call["faces"] = [str(p) for p, _ in args.face]
        if any(w != 1.0 for _, w in args.face):
            call["face_weights"] = [w for _, w in args.face]
    else:
        call["id_embeds"] = id_embeds

    result = pipe(**call)
    write_results(result, args.out, args.method, sheet=not args.no_contact_sheet)
    return 0


def write_results(result, out_dir: Path, stem: str, *, sheet: bool) -> None:
    """Save each image with its metadata as ``<stem>_NNNN.png`` (never overwriting) and, with ``sheet``, the
    contact sheet beside the first; print every path written."""
    from ..images import save_image
    from ..outputs import contact_sheet, output_paths, save_generated_image

    paths = output_paths(out_dir, stem, len(result.images))
    for path, image, meta in zip(paths, result.images, result.metadata, strict=True):
        save_generated_image(path, image, meta)
        print(path)
    if sheet:
        labels = [f"seed {m['seed']}" for m in result.metadata]
        sheet_path = paths[0].with_name(paths[0].stem + "_sheet.png")
        save_image(sheet_path, contact_sheet(result.references, result.images, labels=labels))
        print(sheet_path)
