"""Export of the test kit's tiny ONNX models: ``torch.onnx.export``'s dynamo exporter at opset 18, one
self-contained file per model, like the released ones."""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path

import torch
from torch import nn

__all__ = ["OPSET", "export_onnx", "logit"]

logger = logging.getLogger(__name__)

OPSET = 18


def logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def export_onnx(
    module: nn.Module, example: torch.Tensor, path: Path, input_name: str, output_names: list[str], dynamic: dict
) -> Path:
    module.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    # The exporter logs "torchvision is not installed" per missing op and raises torch-internal FutureWarnings;
    # neither concerns these models, so both are silenced for the duration of the export only.
    noisy = logging.getLogger("torch.onnx._internal.exporter._registration")
    previous_level = noisy.level
    noisy.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.onnx.export(
                module,
                (example,),
                str(path),
                input_names=[input_name],
                output_names=output_names,
                dynamic_shapes={"x": dynamic} if dynamic else None,
                opset_version=OPSET,
                dynamo=True,
                external_data=False,  # one self-contained file, like the released models
                verbose=False,
            )
    finally:
        noisy.setLevel(previous_level)
    logger.debug("wrote %s", path)
    return path
