"""``idfusion generate``: face photo(s) + prompt in, PNG files with their generation metadata out."""

from __future__ import annotations

import argparse
from pathlib import Path

from .argtypes import finite, non_negative_float, positive_int, seed

METHODS = ("arc2face", "adaface", "flashface", "open-flashface", "fact", "feedface", "feedface-sd15")
FLASHFACE = ("flashface", "open-flashface")
FEEDFACE = ("feedface", "feedface-sd15")
# methods conditioned on the photos themselves (no embedding to replay from metadata)
PHOTO_METHODS = (*FLASHFACE, "fact", *FEEDFACE)
DTYPES = ("float32", "float16", "bfloat16")


def _face_box(value: str) -> list[float]:
    parts = value.split(",")
    try:
        box = [float(p) for p in parts]
    except ValueError:
        box = []
    if len(box) != 4 or not all(0.0 <= v <= 1.0 for v in box):
        raise argparse.ArgumentTypeError(f"expected x1,y1,x2,y2 with each value in [0, 1], got {value!r}")
    return box


def _lora(value: str) -> tuple[str, float]:
    """``FILE`` or ``FILE:WEIGHT`` (weight defaults to 1.0)."""
    path, sep, weight = value.rpartition(":")
    if sep and path and not weight.startswith(("\\", "/")):
        try:
            return path, finite(weight)
        except argparse.ArgumentTypeError:
            pass
    return value, 1.0


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..pipelines.common import SCHEDULERS

    parser = subparsers.add_parser(
        "generate",
        help="make images of a person from face photo(s) and a prompt",
        description="Generate images of the person in the face photo(s). Outputs are PNG files with the "
        "generation metadata embedded (also as the 'parameters' text other Stable Diffusion tools read), plus a "
        "contact sheet. Existing files are never overwritten.",
    )
    parser.add_argument("--method", choices=METHODS, help="identity method (required unless --from is given)")
    parser.add_argument(
        "--face", action="append", type=_lora, default=[], metavar="IMAGE[:WEIGHT]",
        help="face photo; repeat for more. FlashFace: a weight per photo blends identities (A.jpg:0.7 B.jpg:0.3)",
    )  # fmt: skip
    parser.add_argument("--prompt", help="text prompt (Arc2Face ignores it: it only knows its own template)")
    parser.add_argument("--negative-prompt", help="negative prompt (default: the method's)")
    parser.add_argument("--out", type=Path, default=Path("outputs"), help="output folder (default: outputs)")
    parser.add_argument("--model", help="Hub repo id or local folder of the method's weights (default: official)")
    parser.add_argument("--base-model", help="SD1.5 base model (Hub id or folder) for methods that use one")
    parser.add_argument("--face-models", type=Path, metavar="DIR", help="folder with the ONNX face models")
    parser.add_argument("--detector", choices=("onnx", "hog", "mmod"), help="face detector (default: onnx)")
    parser.add_argument("--num-images", type=positive_int, help="images to make (default 1)")
    parser.add_argument("--seed", type=seed, help="seed of the first image; the next get seed+1, ... (default random)")
    parser.add_argument("--steps", type=positive_int, help="sampling steps (default: the method's)")
    parser.add_argument(
        "--guidance", type=non_negative_float, help="classifier-free guidance scale (default: method's)"
    )
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS), help="sampler (default: the method's)")
    parser.add_argument("--width", type=positive_int, help="image width, a multiple of 8 (default 512)")
    parser.add_argument("--height", type=positive_int, help="image height, a multiple of 8 (default 512)")
    parser.add_argument("--lcm", action="store_true", default=None, help="LCM-LoRA: 2-4 steps, guidance 1.0")
    parser.add_argument("--id-scale", type=finite, help="identity strength (AdaFace ID-CFG scale, default 1.0)")
    parser.add_argument("--face-box", type=_face_box, metavar="X1,Y1,X2,Y2", help="FlashFace: face position in [0,1]")
    parser.add_argument("--ref-strength", type=non_negative_float, help="FlashFace: reference strength lambda")
    parser.add_argument("--ref-guidance", type=non_negative_float, help="FlashFace: reference guidance scale (3.2)")
    parser.add_argument("--ref-guidance-start", type=non_negative_float, help="FlashFace: t at which it starts (750)")
    parser.add_argument("--style", help="FACT: a style name (see `idfusion styles`) or a style .toml file")
    parser.add_argument("--style-weight", type=non_negative_float, help="FACT: weight of the style's LoRA")
    parser.add_argument("--adapter-scale", type=non_negative_float, help="FACT: face adapter scale (0.5; 0 = base)")
    parser.add_argument("--adapter", help="FACT: majicmix (default), film, or an adapter .ckpt file")
    parser.add_argument(
        "--pose-image", type=Path, help="FACT: OpenPose skeleton image, or a photo (needs DWPose models)"
    )
    parser.add_argument(
        "--face-mode", choices=("cat", "mean"), help="FeedFace: several photos' tokens joined or averaged"
    )
    parser.add_argument("--feed-scale", type=finite, help="FeedFace: adapter multiplier (0.8; 0 = the base model)")
    parser.add_argument("--controlnet-image", type=Path, help="condition image for the model's ControlNet")
    parser.add_argument("--controlnet-scale", type=non_negative_float, default=None, help="ControlNet strength (1.0)")
    parser.add_argument("--lora", action="append", type=_lora, default=[], metavar="FILE[:WEIGHT]", help="extra LoRA")
    parser.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1, mps")
    parser.add_argument("--dtype", choices=DTYPES, help="weights dtype (default float32; float16 on GPUs is common)")
    parser.add_argument("--cpu-offload", action="store_true", help="keep models on the CPU until used (saves VRAM)")
    parser.add_argument("--vae-tiling", action="store_true", help="decode in tiles (large images, less memory)")
    parser.add_argument("--attention-slicing", action="store_true", help="compute attention in slices")
    parser.add_argument("--from", dest="from_image", type=Path, metavar="IMAGE.png", help="make an idfusion PNG again")
    parser.add_argument("--no-contact-sheet", action="store_true", help="do not write the contact sheet")
    parser.set_defaults(run=run)


# CLI argument -> (metadata key, pipeline argument); used to replay --from and to build the call.
_REPLAYED = {
    "prompt": ("prompt", "prompt"),
    "negative_prompt": ("negative_prompt", "negative_prompt"),
    "steps": ("steps", "num_inference_steps"),
    "guidance": ("guidance_scale", "guidance_scale"),
    "scheduler": ("scheduler", "scheduler"),
    "width": ("width", "width"),
    "height": ("height", "height"),
    "lcm": ("lcm", "lcm"),
    "id_scale": ("id_scale", "id_scale"),
    "controlnet_scale": ("controlnet_conditioning_scale", "controlnet_conditioning_scale"),
    "face_box": ("face_box", "face_box"),
    "ref_strength": ("reference_strength", "reference_strength"),
    "ref_guidance": ("reference_guidance", "reference_guidance"),
    "ref_guidance_start": ("reference_guidance_start", "reference_guidance_start"),
    "style": ("style", "style"),
    "style_weight": ("style_weight", "style_weight"),
    "adapter_scale": ("adapter_scale", "adapter_scale"),
    "face_mode": ("face_mode", "face_mode"),
    "feed_scale": ("feed_scale", "feed_scale"),
}
_FEEDFACE_ONLY = ("face_mode", "feed_scale")
_FACT_ONLY = ("style", "style_weight", "adapter_scale", "adapter", "pose_image")


def _apply_metadata(args: argparse.Namespace, meta: dict) -> None:
    """Fill the arguments not given on the command line from an image's metadata."""
    if args.method is None:
        args.method = meta.get("method")
    if args.method != meta.get("method"):
        raise ValueError(f"{args.from_image} was made with {meta.get('method')}, not {args.method}")
    if args.model is None:
        args.model = meta.get("model")
    if args.base_model is None:
        args.base_model = meta.get("base_model")
    skip = set()
    if meta.get("style"):  # the style's template makes the full prompt again from the subject
        skip.add("prompt")
        if args.prompt is None:
            args.prompt = meta.get("subject")
    if args.method == "fact" and args.adapter is None:
        args.adapter = meta.get("adapter")
    if meta.get("pose") and args.pose_image is None:
        raise ValueError(f"{args.from_image} was made with a pose image: pass it again with --pose-image")
    for arg, (key, _) in _REPLAYED.items():
        if getattr(args, arg) is None and key in meta and arg not in skip:
            setattr(args, arg, meta[key])
    if args.seed is None:
        args.seed = meta.get("seed")
    if args.num_images is None:
        args.num_images = 1
    if not args.lora and meta.get("loras"):
        args.lora = [(item["name"], float(item["weight"])) for item in meta["loras"]]


def _device_and_dtype(args: argparse.Namespace):
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


def run(args: argparse.Namespace) -> int:
    from ..outputs import decode_array, read_generation_metadata
    from ..pipelines import load_pipeline

    id_embeds = None
    if args.from_image is not None:
        meta = read_generation_metadata(args.from_image)
        _apply_metadata(args, meta)
        if not args.face:
            if "id_embeds" not in meta:
                raise ValueError(f"{args.from_image}: its metadata has no identity embedding; pass --face")
            id_embeds = decode_array(meta["id_embeds"])
    if args.method is None:
        raise ValueError(f"--method is required ({', '.join(METHODS)}), unless --from IMAGE.png is given")
    if not args.face and id_embeds is None:
        raise ValueError("give at least one --face photo (or --from an idfusion PNG)")
    for path in (*(p for p, _ in args.face), args.controlnet_image, args.pose_image):
        if path is not None and not Path(path).exists():
            raise ValueError(f"{path}: file not found")
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"{args.out}: exists and is not a folder")

    if args.method == "fact" and (args.num_images or 1) > 6:
        raise ValueError(f"--num-images: FACT makes 1 to 6 portraits per request, got {args.num_images}")
    device, dtype = _device_and_dtype(args)
    if args.cpu_offload and device == "cpu":
        raise ValueError("--cpu-offload moves models between the CPU and a GPU; give --device cuda (or mps) with it")
    if args.method != "fact":
        given = [f"--{a.replace('_', '-')}" for a in _FACT_ONLY if getattr(args, a) is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: FaceChain-FACT options (--method fact)")
    if args.method not in FEEDFACE:
        given = [f"--{a.replace('_', '-')}" for a in _FEEDFACE_ONLY if getattr(args, a) is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: FeedFace options (--method feedface or feedface-sd15)")
    if args.method in FEEDFACE and (args.lcm or args.id_scale is not None or args.controlnet_image or args.lora):
        raise ValueError("--lcm, --id-scale, --controlnet-image and --lora are not FeedFace options")
    if args.method == "feedface" and args.base_model is not None:
        raise ValueError("--base-model: FeedFace runs on its own UniDiffuser-v1 (feedface-sd15 takes an SD1.5 base)")
    if args.method == "fact" and (args.lcm or args.id_scale is not None or args.controlnet_image is not None):
        raise ValueError("--lcm, --id-scale and --controlnet-image are not FACT options (use --pose-image)")
    load_kwargs = {"face_model_dir": args.face_models}
    if args.method != "feedface":
        load_kwargs["base_model"] = args.base_model
    if args.method == "fact" and args.adapter is not None:
        load_kwargs["adapter"] = args.adapter
    if dtype is not None:
        load_kwargs["torch_dtype"] = dtype
    pipe = load_pipeline(args.method, args.model, **load_kwargs)
    if args.cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    if args.vae_tiling:
        pipe.vae.enable_tiling()
    if args.attention_slicing:
        pipe.enable_attention_slicing()
    if args.detector is not None:
        from ..faces import FaceAnalyzer

        recognizer = None if args.method in PHOTO_METHODS else "onnx"  # these use photos, not embeddings
        crops = () if recognizer is None else ("arcface",)
        analyzer = FaceAnalyzer(
            args.detector,
            recognizer,
            model_dir=pipe.face_model_dir,
            crops=crops,
            dense_landmarks=args.method == "fact",
        )
        pipe.set_face_analyzer(analyzer)

    flash = args.method in FLASHFACE
    if flash and (args.lora or args.controlnet_image or args.lcm or args.id_scale is not None):
        raise ValueError("--lora, --controlnet-image, --lcm and --id-scale are not FlashFace options")
    if not flash and any(v is not None for v in (args.face_box, args.ref_strength, args.ref_guidance)):
        raise ValueError("--face-box, --ref-strength and --ref-guidance are FlashFace options")
    if not flash and any(w != 1.0 for _, w in args.face):
        raise ValueError(f"face weights (IMAGE:WEIGHT) blend identities in FlashFace only, not {args.method}")
    call = {"num_images_per_prompt": args.num_images or 1, "seed": args.seed}
    if args.method == "fact":
        call.update(loras=args.lora, pose_image=args.pose_image)
    elif args.method in FEEDFACE:
        pass
    elif not flash:
        call.update(loras=args.lora, controlnet_image=args.controlnet_image)
    for arg, (_, key) in _REPLAYED.items():
        value = getattr(args, arg)
        if value is not None:
            call[key] = value
    if "id_scale" in call and args.method == "arc2face":
        raise ValueError("--id-scale is an AdaFace option; Arc2Face has no identity scale")
    if "lcm" in call:
        call["lcm"] = bool(call["lcm"])
    if "reference_guidance_start" in call:
        call["reference_guidance_start"] = int(call["reference_guidance_start"])
    if args.face:
        call["faces"] = [str(p) for p, _ in args.face]
        if flash and any(w != 1.0 for _, w in args.face):
            call["face_weights"] = [w for _, w in args.face]
    elif args.method in PHOTO_METHODS:
        raise ValueError(f"{args.method} needs the face photos: pass them with --face")
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
