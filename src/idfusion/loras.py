"""One LoRA loader for every SD1.5-family pipeline: ``--lora`` files, style LoRAs and LCM-LoRA.

LoRAs load through diffusers/peft as separate adapters and are never fused, so a call without them runs the base
weights bit for bit (fusing and unfusing leaves float rounding behind). Files may be in diffusers' format or in
kohya's, with diffusers or LDM (``lora_unet_input_blocks_1_1_…``) block names: SD1.x pipelines do not hand the UNet
config to diffusers' kohya converter (SDXL's do), so it is passed here; without it LDM-numbered keys match nothing.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import ModelFilesError

__all__ = [
    "DEFAULT_LCM_LORA",
    "LoraFileError",
    "activate_loras",
    "adapter_name",
    "load_lora",
    "lora_file",
    "unload_loras",
]

logger = logging.getLogger(__name__)

DEFAULT_LCM_LORA = "latent-consistency/lcm-lora-sdv1-5"
LORA_FILE_NAME = "pytorch_lora_weights.safetensors"
LCM_ADAPTER = "lcm"


class LoraFileError(ModelFilesError):
    """A LoRA file that cannot be used (unreadable, not safetensors, or matching no module of the model)."""


def lora_file(source: str | os.PathLike, *, what: str = "LoRA") -> Path:
    """A LoRA weights file from a file path, a folder (its ``pytorch_lora_weights.safetensors`` or only
    ``.safetensors``), or a Hub repo id."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir() and not (path / LORA_FILE_NAME).is_file():
        files = sorted(path.glob("*.safetensors"))
        if len(files) == 1:
            return files[0]
    from .hub import resolve_model_folder

    return resolve_model_folder(source, required=[LORA_FILE_NAME], what=what, allow_patterns=[LORA_FILE_NAME]) / (
        LORA_FILE_NAME
    )


def adapter_name(path: Path) -> str:
    """A peft adapter name that is stable for a file and differs between files of the same name."""
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]
    return f"lora_{path.stem}_{digest}".replace(".", "_")


def _check_safetensors(path: Path, what: str) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError, ValueError) as error:
        raise LoraFileError(f"{path}: not a readable {what} file: expected safetensors ({error})") from None
    if not keys:
        raise LoraFileError(f"{path}: the {what} file holds no tensors")


def _unet_config_kwargs(pipe: Any) -> dict[str, Any]:
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    unet = getattr(pipe, "unet", None)
    if unet is not None and getattr(type(pipe), "load_lora_weights", None) is (
        StableDiffusionLoraLoaderMixin.load_lora_weights
    ):
        return {"unet_config": unet.config}
    return {}


def loaded_adapters(pipe: Any) -> set[str]:
    return {name for names in pipe.get_list_adapters().values() for name in names}


def load_lora(pipe: Any, source: str | os.PathLike, *, name: str | None = None, what: str = "LoRA") -> str:
    """Load a LoRA into ``pipe`` (UNet and text encoder) once; returns its adapter name.

    Raises:
        LoraFileError: the file is not safetensors, or none of its keys matches a module of the model.
        ModelFilesError: the file, folder or repo cannot be found.
    """
    file = lora_file(source, what=what)
    name = name or adapter_name(file)
    if name in loaded_adapters(pipe):
        return name
    _check_safetensors(file, what)
    try:
        pipe.load_lora_weights(str(file), adapter_name=name, **_unet_config_kwargs(pipe))
    except (ValueError, KeyError, RuntimeError) as error:
        # peft's NoMatchingPeftModuleError is a ValueError; mismatched shapes raise RuntimeError
        raise LoraFileError(f"{file}: cannot load this {what} into {type(pipe).__name__}: {error}") from error
    if name not in loaded_adapters(pipe):
        raise LoraFileError(f"{file}: no key of this {what} file matches a module of the model")
    logger.info("loaded %s %s as adapter %r", what, file, name)
    return name


def activate_loras(
    pipe: Any,
    loras: Sequence[tuple[str | os.PathLike, float]] = (),
    *,
    lcm: bool = False,
    lcm_lora: str | None = None,
) -> list[dict[str, Any]]:
    """Make exactly these LoRAs active for the next call (LCM-LoRA first when ``lcm``); none: LoRAs off.

    Call it before encoding prompts, so a LoRA's text-encoder part applies to this call's prompts.

    Returns:
        ``{"name", "weight", "sha256"}`` of each of ``loras`` (LCM-LoRA excluded), for the image metadata.
    """
    from .outputs import file_sha256

    names, weights = [], []
    if lcm:
        source = lcm_lora or DEFAULT_LCM_LORA
        if getattr(pipe, "_lcm_lora", None) != source:
            if LCM_ADAPTER in loaded_adapters(pipe):
                pipe.delete_adapters(LCM_ADAPTER)
            load_lora(pipe, source, name=LCM_ADAPTER, what="LCM-LoRA for SD1.5")
            pipe._lcm_lora = source
        names.append(LCM_ADAPTER)
        weights.append(1.0)
    recorded = []
    for source, weight in loras:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"LoRA {source}: the weight must be a finite number, got {weight!r}")
        name = load_lora(pipe, source)
        names.append(name)
        weights.append(float(weight))
        recorded.append({"name": str(source), "weight": float(weight), "sha256": file_sha256(lora_file(source))})
    if names:
        pipe.enable_lora()
        pipe.set_adapters(names, adapter_weights=weights)
    elif loaded_adapters(pipe):
        pipe.disable_lora()
    return recorded


def unload_loras(pipe: Any) -> None:
    """Remove every LoRA: the UNet and text encoder get their base weights back, bit for bit."""
    pipe.unload_lora_weights()
    pipe._lcm_lora = None
