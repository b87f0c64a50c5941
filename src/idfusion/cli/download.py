"""``idfusion download``: fetch a method's official files to where idfusion looks for them.

What to fetch is the method's registry data (``MethodSpec.downloads``), so this module has no per-method code.
"""

from __future__ import annotations

import argparse
from pathlib import Path

OFFLINE = (
    "offline mode is on (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE), so nothing can be downloaded: unset it and run "
    "this again, or run it where the network is reachable and copy the files over (--dry-run lists them)"
)


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..registry import methods

    names = [spec.name for spec in methods() if spec.downloads]
    parser = subparsers.add_parser(
        "download",
        help="download a method's official files to where idfusion looks for them",
        description=(
            "Download a method's official release and the models it builds on, with the repos, revisions and file "
            "patterns its pipeline resolves by default. Without --out, each part goes where idfusion looks without "
            "--model: the Hugging Face cache, idfusion's face-model folder, or (for a release published "
            "elsewhere) the folder the README names. HF_HUB_OFFLINE=1 refuses to start."
        ),
    )
    parser.add_argument("--method", required=True, choices=[*names, "all"], help="whose files (all: every method)")
    parser.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="put everything in DIR instead, laid out as --model DIR expects (with all: DIR/METHOD)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print what would be fetched (repo, revision, files, destination) without touching the network",
    )
    parser.set_defaults(run=run)


def _show_progress_bars() -> None:
    """huggingface_hub's own bars: the CLI switches library bars off (through transformers), downloads want them."""
    from huggingface_hub import constants
    from huggingface_hub.utils import enable_progress_bars

    if not constants.HF_HUB_DISABLE_PROGRESS_BARS:  # the user's HF_HUB_DISABLE_PROGRESS_BARS=1 wins
        enable_progress_bars()


def _usage(spec, plans) -> str:
    """How to use what was fetched: the release's folder for --model, unless it went where the pipeline looks."""
    release = plans[0]
    if spec.default_model is None:
        return f"{spec.name}: no official weights exist; pass a trained model folder with --model"
    if release.cached:
        return f"{spec.name}: `idfusion generate --method {spec.name}` finds them (no --model needed)"
    return f"{spec.name}: use them with --model {release.destination}"


def run(args: argparse.Namespace) -> int:
    from ..hub import DownloadError, check_download_clients, fetch, is_offline, plan_downloads
    from ..registry import get_method, methods

    specs = [spec for spec in methods() if spec.downloads] if args.method == "all" else [get_method(args.method)]
    plans = {}
    for spec in specs:
        out = args.out / spec.name if args.out is not None and args.method == "all" else args.out
        plans[spec.name] = plan_downloads(spec.downloads, out)
    steps, seen = [], set()
    for spec in specs:
        for plan in plans[spec.name]:
            if plan.key not in seen:  # with all: the same files for the same place are fetched once
                seen.add(plan.key)
                steps.append((spec, plan))

    if args.dry_run:
        for number, (spec, plan) in enumerate(steps, 1):
            print(f"[{number}/{len(steps)}] {spec.name}: {plan.describe()}")
        print("dry run: nothing was downloaded")
        return 0
    if is_offline():
        raise DownloadError(OFFLINE)
    check_download_clients([plan for _, plan in steps])
    _show_progress_bars()
    fetched = []
    for number, (spec, plan) in enumerate(steps, 1):
        print(f"[{number}/{len(steps)}] {spec.name}: {plan.describe()}", flush=True)
        fetched.append((spec, plan, fetch(plan)))
    print("done; the files are in:")
    for spec, plan, folder in fetched:
        print(f"  {spec.name}: {plan.source.what}: {folder}")
    for spec in specs:
        print(_usage(spec, plans[spec.name]))
    return 0
