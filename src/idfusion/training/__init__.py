"""Training: one accelerate loop shared by every method, with each method's specifics in a small recipe.

- :mod:`~idfusion.training.config` — the run config (YAML -> dataclasses, validated before anything is built);
- :mod:`~idfusion.training.data` — the JSON-lines record schema and reader, an image+caption dataset, the sampler;
- :mod:`~idfusion.training.recipe` — the :class:`Recipe` interface and the :data:`RECIPES` registry;
- :mod:`~idfusion.training.core` — :func:`train`, the loop (checkpoints, resume, logs, validation, final save);
- :mod:`~idfusion.training.recipes` — the recipes (``text-to-image``, ...).

Example::

    from idfusion.training import load_config, train

    config = load_config("t2i.yaml", overrides=["train.max_steps=100"])
    result = train(config, resume="latest")
    print(result.model_dir)  # an SD1.5 diffusers folder

Importing this package is cheap; torch and the libraries load with the submodules that need them.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> submodule that defines it
_LAZY = {
    "CheckpointError": "checkpoints",
    "ConfigError": "config",
    "RunConfig": "config",
    "dump_config": "config",
    "load_config": "config",
    "DataError": "data",
    "ImageCaptionDataset": "data",
    "ImageRecord": "data",
    "read_jsonl": "data",
    "read_records": "data",
    "RECIPES": "recipe",
    "Recipe": "recipe",
    "RecipeConfig": "recipe",
    "load_recipe": "recipe",
    "TrainResult": "core",
    "TrainingError": "core",
    "train": "core",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
