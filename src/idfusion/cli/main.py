"""The ``idfusion`` command: a thin shell over the public API.

Each subcommand lives in its own module with ``register(subparsers)`` and ``run(args) -> int``. User errors
(:class:`~idfusion.errors.IdfusionError` and invalid values) print one line and exit non-zero; a traceback is only
shown with ``--debug``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from .. import __version__

# subcommand name -> module under idfusion.cli
SUBCOMMANDS = {
    "bench": "bench",
    "convert": "convert",
    "demo": "demo",
    "download": "download",
    "eval": "eval",
    "faces": "faces",
    "generate": "generate",
    "make-tiny": "make_tiny",
    "prepare": "prepare",
    "serve": "serve",
    "styles": "styles",
    "template": "template",
    "train": "train",
}

EXIT_ERROR = 1
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="idfusion",
        description="Zero-shot identity-preserving image generation.",
    )
    parser.add_argument("--version", action="version", version=f"idfusion {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in SUBCOMMANDS.values():
        importlib.import_module(f"{__package__}.{module_name}").register(subparsers)
    return parser


def _quiet_libraries() -> None:
    """Keep the terminal to idfusion's own lines and progress bars: the libraries' info messages and weight-loading
    bars are noise to a CLI user (``--debug`` shows them)."""
    import os

    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for name in ("transformers", "diffusers", "huggingface_hub", "accelerate", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
        diffusers_logging.disable_progress_bar()  # "Loading pipeline components" (sampling bars stay)
    except ImportError:  # pragma: no cover
        pass


def _out_of_memory(error: BaseException) -> str:
    return (
        "out of memory; make fewer or smaller images at once (--num-images, --width/--height), or use "
        f"--vae-tiling / --attention-slicing / --cpu-offload ({type(error).__name__})"
    )


def main(argv: Sequence[str] | None = None) -> int:
    from ..errors import IdfusionError

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug anywhere on the line (before a "--"), as the error hint suggests, not only before the subcommand
    end = argv.index("--") if "--" in argv else len(argv)
    debug = "--debug" in argv[:end]
    args = parser.parse_args([a for i, a in enumerate(argv) if not (i < end and a == "--debug")])
    args.debug = debug
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="idfusion: %(levelname)s: %(message)s",
    )
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    if not args.debug:
        _quiet_libraries()
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("idfusion: interrupted", file=sys.stderr)
        return 130
    except (IdfusionError, ValueError) as error:
        if args.debug:
            raise
        print(f"idfusion {args.command}: error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except MemoryError as error:
        if args.debug:
            raise
        print(f"idfusion {args.command}: error: {_out_of_memory(error)}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as error:  # the user's files and disks: name the file and the reason
        if args.debug:
            raise
        where = f"{error.filename}: " if error.filename else ""
        print(f"idfusion {args.command}: error: {where}{error.strerror or error}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as error:  # a bug, not bad input: still one line unless --debug
        if args.debug:
            raise
        if type(error).__name__ == "OutOfMemoryError":  # torch's (a RuntimeError), without importing torch here
            print(f"idfusion {args.command}: error: {_out_of_memory(error)}", file=sys.stderr)
            return EXIT_ERROR
        print(
            f"idfusion {args.command}: internal error: {type(error).__name__}: {error} "
            "(run with --debug for the traceback)",
            file=sys.stderr,
        )
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
