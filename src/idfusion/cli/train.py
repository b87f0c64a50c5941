"""``idfusion train``: run a training recipe from a YAML config (see :mod:`idfusion.training`).

Multi-GPU and FSDP/DeepSpeed runs go through accelerate's launcher, e.g.
``accelerate launch --multi_gpu --num_processes 4 -m idfusion.cli.main train --config t2i.yaml`` (or with
``--config_file`` for FSDP/DeepSpeed); several CPU processes: ``ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 -m
idfusion.cli.main train --config t2i.yaml``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a model from a YAML config",
        description="Train with a recipe (e.g. text-to-image) and a YAML config; checkpoints, logs, validation "
        "images and the final model (in its inference format, under OUTPUT/model) go to the output folder.",
    )
    parser.add_argument(
        "--method", metavar="METHOD",
        help="train this method with its recipe (the registry's; e.g. flashface); or give --recipe",
    )  # fmt: skip
    parser.add_argument("--recipe", metavar="NAME", help="training recipe (default: recipe.name in the config)")
    parser.add_argument("--config", type=Path, metavar="FILE", help="YAML run config")
    parser.add_argument("--output", type=Path, metavar="DIR", help="output folder (overrides output_dir)")
    parser.add_argument(
        "--resume",
        metavar="latest|PATH",
        help="continue from the newest checkpoint in the output folder ('latest'; a new run if there is none) "
        "or from a checkpoint folder",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set train.max_steps=10 (repeatable; values are YAML)",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (with every default) and exit; without --config, the recipe's defaults",
    )
    parser.set_defaults(run=run)


def recipe_of_method(name: str) -> str:
    """The training recipe the registry names for method ``name``."""
    from ..registry import get_method, methods
    from ..training.config import ConfigError

    spec = get_method(name)
    if spec.recipe is None:
        trainable = [s.name for s in methods() if s.recipe]
        raise ConfigError(
            f"--method {name}: {spec.title} has no training recipe yet"
            + (f"; methods with one: {', '.join(trainable)}" if trainable else "")
        )
    return spec.recipe


def run(args: argparse.Namespace) -> int:
    from ..training.config import ConfigError, default_document, dump_config, load_config

    if args.method is not None:
        recipe = recipe_of_method(args.method)
        if args.recipe is not None and args.recipe != recipe:
            raise ConfigError(f"--method {args.method} trains with recipe {recipe!r}, not --recipe {args.recipe}")
        args.recipe = recipe

    if args.config is None:
        if not args.print_config:
            raise ConfigError("--config FILE is required (or --print-config to see a recipe's defaults)")
        if not args.recipe:
            raise ConfigError("--print-config without --config needs --recipe NAME")
        print(dump_config(default_document(args.recipe)), end="")
        return 0
    config = load_config(args.config, recipe=args.recipe, overrides=args.set, output_dir=args.output)
    if args.print_config:
        print(dump_config(config), end="")
        return 0

    from ..training.core import train

    logging.getLogger("idfusion.training").setLevel(logging.INFO)  # resume/checkpoint/save lines
    result = train(config, resume=args.resume)
    if result.main_process:
        print(f"wrote {result.model_dir}")
    return 0
