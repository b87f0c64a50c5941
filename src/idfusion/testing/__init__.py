"""Offline test kit: tiny, structurally faithful models and checkpoints in the layouts of official releases.

No model hub is reachable in tests or CI, so everything here is built locally: the real CLIP tokenizer from the BPE
file of the ``openai-clip`` package (:mod:`idfusion.clip_tokenizer`) and the kit's reduced-vocabulary version of it
(:mod:`idfusion.testing.tiny_clip_tokenizer`), tiny seeded SD1.5 components and the full-size SD1.5 configs
(:mod:`idfusion.testing.components`), and writers of whole checkpoint folders (:mod:`idfusion.testing.make_tiny`).

Importing this package does no work and does not import torch; names load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

# Bound eagerly (make_tiny.py imports only the standard library): the function shares its submodule's name, and a
# lazy binding would be shadowed by the submodule whenever ``idfusion.testing.make_tiny`` is imported first.
from idfusion.testing.make_tiny import make_tiny, tiny_writers

# public name -> submodule that defines it
_LAZY = {
    "load_clip_tokenizer": "idfusion.clip_tokenizer",
    "save_clip_tokenizer": "idfusion.clip_tokenizer",
    "clip_bpe_path": "idfusion.clip_tokenizer",
    "build_clip_vocab": "idfusion.clip_tokenizer",
    "save_tiny_clip_tokenizer": "idfusion.testing.tiny_clip_tokenizer",
    "tiny_clip_tokenizer": "idfusion.testing.tiny_clip_tokenizer",
    "tiny_clip_vocab_size": "idfusion.testing.tiny_clip_tokenizer",
    **{
        name: "idfusion.testing.components"
        for name in (
            "build_safety_checker",
            "build_text_encoder",
            "build_unet",
            "build_vae",
            "sd15_feature_extractor_config",
            "sd15_safety_checker_config",
            "sd15_scheduler_config",
            "sd15_text_encoder_config",
            "sd15_unet_config",
            "sd15_vae_config",
            "tiny_controlnet",
            "tiny_feature_extractor",
            "tiny_safety_checker",
            "tiny_safety_checker_config",
            "tiny_scheduler",
            "tiny_text_encoder",
            "tiny_text_encoder_config",
            "tiny_unet",
            "tiny_unet_config",
            "tiny_vae",
            "tiny_vae_config",
        )
    },
}

__all__ = ["make_tiny", "tiny_writers", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module 'idfusion.testing' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
