"""Method pipelines, diffusers style: ``XPipeline.from_pretrained(...)``, ``.to(device)``, then call it.

Which class serves which method is the method registry's knowledge (:mod:`idfusion.registry`):
``load_pipeline("flashface", folder)`` picks it, so the CLI and UI need no per-method code. Classes import on first
use, so loading one method never imports the others.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "load_pipeline",
    "pipeline_class",
    "Arc2FacePipeline",
    "AdaFacePipeline",
    "FlashFacePipeline",
    "FactPipeline",
    "FeedFacePipeline",
    "FeedFaceSD15Pipeline",
]


def pipeline_class(method: str) -> type:
    from ..registry import pipeline_class as lookup

    return lookup(method)


def load_pipeline(method: str, model: str | None = None, **kwargs: Any):
    """``pipeline_class(method).from_pretrained(model, **kwargs)``; ``model=None`` loads the official release."""
    from ..registry import load_pipeline as load

    return load(method, model, **kwargs)


def __getattr__(name: str) -> Any:
    from ..registry import methods, resolve

    for spec in methods():
        if spec.pipeline.endswith(f":{name}"):
            return resolve(spec.pipeline)
    raise AttributeError(f"module 'idfusion.pipelines' has no attribute {name!r}")
