"""Method pipelines, diffusers style: ``XPipeline.from_pretrained(...)``, ``.to(device)``, then call it.

:func:`load_pipeline` picks the class by method name, so the CLI and UI need no per-method code.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "PIPELINES",
    "load_pipeline",
    "pipeline_class",
    "Arc2FacePipeline",
    "AdaFacePipeline",
    "FlashFacePipeline",
    "FactPipeline",
]

# method name -> "module:Class" (imported on first use: loading one method never imports the others)
PIPELINES = {
    "arc2face": "idfusion.pipelines.pipeline_arc2face:Arc2FacePipeline",
    "adaface": "idfusion.pipelines.pipeline_adaface:AdaFacePipeline",
    "flashface": "idfusion.pipelines.pipeline_flashface:FlashFacePipeline",
    "open-flashface": "idfusion.pipelines.pipeline_flashface:FlashFacePipeline",
    "fact": "idfusion.pipelines.pipeline_fact:FactPipeline",
    "feedface": "idfusion.pipelines.pipeline_feedface:FeedFacePipeline",
    "feedface-sd15": "idfusion.pipelines.pipeline_feedface_sd15:FeedFaceSD15Pipeline",
}
# methods that share a class and tell it which release they are
_VARIANT_METHODS = {"flashface", "open-flashface"}


def pipeline_class(method: str) -> type:
    if method not in PIPELINES:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(PIPELINES)}")
    module, name = PIPELINES[method].split(":")
    return getattr(importlib.import_module(module), name)


def load_pipeline(method: str, model: str | None = None, **kwargs: Any):
    """``pipeline_class(method).from_pretrained(model, **kwargs)``; ``model=None`` means the official release."""
    cls = pipeline_class(method)
    if method in _VARIANT_METHODS:
        kwargs["variant"] = method
    return cls.from_pretrained(**kwargs) if model is None else cls.from_pretrained(model, **kwargs)


def __getattr__(name: str) -> Any:
    for method, target in PIPELINES.items():
        if target.endswith(f":{name}"):
            return pipeline_class(method)
    raise AttributeError(f"module 'idfusion.pipelines' has no attribute {name!r}")
