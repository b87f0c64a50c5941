"""``idfusion serve``: the web UI and the HTTP API, one job service behind both (:mod:`idfusion.server`)."""

from __future__ import annotations

import argparse
import os
import socket
import threading
from pathlib import Path

from .argtypes import positive_int
from .generate import DTYPES, add_face_model_options


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="web UI and HTTP API for generation (offline: the synthetic world)",
        description="Serve a web UI (/ui) and an HTTP API (/api, docs at /docs) over one job queue. Without weights "
        "it serves the synthetic world: methods with world weights and the world base model as a prompt-only "
        "baseline. With --model METHOD=PATH, or official weights already downloaded, it serves those methods. "
        "Binds 127.0.0.1; other machines need --host ADDRESS --allow-remote, and then an access token.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument(
        "--allow-remote", action="store_true",
        help="allow a --host other machines can reach; every request then needs the access token",
    )  # fmt: skip
    parser.add_argument(
        "--token", help="access token (default: $IDFUSION_TOKEN; generated and printed when remote access is on)"
    )
    parser.add_argument(
        "--model", action="append", default=[], metavar="METHOD=PATH",
        help="serve METHOD with these weights (a folder or a Hub id already in the cache); repeat for more",
    )  # fmt: skip
    parser.add_argument(
        "--world", action=argparse.BooleanOptionalAction, default=None,
        help="serve the synthetic world's methods and base model (default: only when nothing else is served)",
    )  # fmt: skip
    parser.add_argument("--no-official", action="store_true", help="do not serve official weights found in the caches")
    parser.add_argument("--out", type=Path, default=Path("outputs") / "serve", help="output folder (outputs/serve)")
    parser.add_argument("--concurrency", type=positive_int, default=1, help="jobs that run at once (default 1)")
    parser.add_argument("--max-queued", type=int, default=32, help="jobs that may wait (default 32)")
    parser.add_argument("--max-upload-mb", type=positive_int, default=20, help="size of one upload (default 20 MiB)")
    parser.add_argument(
        "--max-pixels", type=positive_int, default=40_000_000, help="pixels of one uploaded image (default 40 MP)"
    )
    parser.add_argument("--cache-size", type=positive_int, default=2, help="pipelines kept loaded (default 2)")
    parser.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1, mps")
    parser.add_argument("--dtype", choices=DTYPES, help="weights dtype (default float32)")
    add_face_model_options(parser)
    parser.add_argument("--cpu-offload", action="store_true", help="keep models on the CPU until used (saves VRAM)")
    parser.add_argument("--vae-tiling", action="store_true", help="decode in tiles (large images, less memory)")
    parser.add_argument("--attention-slicing", action="store_true", help="compute attention in slices")
    parser.add_argument("--no-ui", action="store_true", help="serve the HTTP API only")
    parser.set_defaults(run=run)


def _models(items: list[str]) -> dict[str, str]:
    models: dict[str, str] = {}
    for item in items:
        method, sep, path = item.partition("=")
        if not sep or not method or not path:
            raise ValueError(f"--model {item}: expected METHOD=PATH (e.g. arc2face=models/arc2face)")
        looks_local = path.startswith((".", "/", "~")) or path.count("/") != 1
        if looks_local and not Path(path).expanduser().exists():
            raise ValueError(f"--model {item}: {path} not found")
        models[method] = str(Path(path).expanduser().resolve()) if Path(path).expanduser().exists() else path
    return models


def _check_port(host: str, port: int) -> None:
    """A clear message for a port in use (uvicorn would log it and exit)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host.strip("[]"), port))
        except OSError as error:
            raise ValueError(f"--host {host} --port {port}: cannot listen there ({error.strerror})") from error


def run(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import gradio  # noqa: F401
        import uvicorn
    except ImportError as error:
        raise ValueError(
            f"idfusion serve needs the web extras ({error.name} is missing): pip install 'idfusion[ui]'"
        ) from error

    from ..jobs import LoadSettings, resolve_device
    from ..server.api import create_app
    from ..server.catalogue import serve_catalogue
    from ..server.config import TOKEN_ENV, ServerConfig, check_bind, is_loopback
    from ..server.security import check_token_text
    from ..server.service import JobService

    token = check_bind(args.host, allow_remote=args.allow_remote, token=args.token)
    if token is not None:
        check_token_text(token)
    resolve_device(args.device, args.dtype)
    _check_port(args.host, args.port)
    catalogue = serve_catalogue(_models(args.model), world=args.world, official=not args.no_official)
    config = ServerConfig(
        out_dir=args.out, token=token, host=args.host, concurrency=args.concurrency, max_queued=args.max_queued,
        max_upload_bytes=args.max_upload_mb * 2**20, max_pixels=args.max_pixels, cache_size=args.cache_size,
    )  # fmt: skip
    settings = LoadSettings(
        device=args.device, dtype=args.dtype, face_models=args.face_models, detector=args.detector,
        cpu_offload=args.cpu_offload, vae_tiling=args.vae_tiling, attention_slicing=args.attention_slicing,
        local_files_only=True, progress_bar=False,
    )  # fmt: skip
    service = JobService(catalogue, config, settings=settings)
    threading.Thread(target=service.warm_up, name="idfusion-warm-up", daemon=True).start()
    app = create_app(service, ui=not args.no_ui)

    for served in catalogue:
        weights = served.model or ("shipped" if served.source == "world" else "official release")
        print(f"serving {served.name}: {served.title} ({served.source}: {weights})")
    print(f"outputs: {service.out_dir}")
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    shown = f"[{shown}]" if ":" in shown else shown
    query = f"?token={token}" if token else ""
    if token is not None and not args.token and not os.environ.get(TOKEN_ENV):
        print(f"access token (generated): {token}  (choose one with --token or ${TOKEN_ENV})")
    if not is_loopback(args.host):
        print(f"remote access is on: every request needs the token (header 'Authorization: Bearer {token}')")
    print(f"open http://{shown}:{args.port}/{query}   (API docs: /docs)", flush=True)
    try:
        uvicorn.run(app, host=args.host.strip("[]"), port=args.port, log_level="warning")
    finally:
        service.close()
    return 0
