"""Arc2Face (Papantoniou et al., ECCV 2024): an SD1.5 UNet and CLIP text encoder fine-tuned on ArcFace identity.

The release (Hub repo ``FoivosPar/Arc2Face``, or the README's local ``models/`` folder) is two standard components
plus add-ons; the VAE, tokenizer and scheduler config come from the SD1.5 base::

    arc2face/    config.json  diffusion_pytorch_model.safetensors   UNet2DConditionModel (859.5M, fp32)
    encoder/     config.json  pytorch_model.bin                     CLIPTextModel (123.1M, fp32, vocab 49408)
    controlnet/  config.json  diffusion_pytorch_model.safetensors   optional pose ControlNet
    antelopev2/  scrfd_10g_bnkps.onnx  arcface.onnx                 face models (the Hub repo has arcface.onnx
                                                                    at its root)

Identity enters only through the prompt: :func:`idfusion.prompt_encoders.encode_arcface_id_prompt` puts the normalised,
zero-padded ArcFace embedding at the ``id`` token of ``"photo of a id person"``. The unconditional branch is the
same encoder on the empty prompt. Text prompts are not supported: the authors overfitted both networks to the
template (Arc2Face issues #6 and #18).
"""

from __future__ import annotations

import torch

from ..hub import SD15_REPO
from ..prompt_encoders import encode_arcface_id_prompt, encode_text

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_BASE_MODEL",
    "REQUIRED_FILES",
    "DOWNLOAD_PATTERNS",
    "BASE_REQUIRED_FILES",
    "DEFAULTS",
    "SCHEDULER",
    "LCM_DEFAULTS",
    "arc2face_prompt_embeds",
    "encode_text",
]

DEFAULT_MODEL = "FoivosPar/Arc2Face"
DEFAULT_BASE_MODEL = SD15_REPO

REQUIRED_FILES = (
    "arc2face/config.json",
    "arc2face/diffusion_pytorch_model.safetensors",
    "encoder/config.json",
    "encoder/pytorch_model.bin|encoder/model.safetensors",
)
# what to fetch from the Hub: the required folders and the optional add-ons
DOWNLOAD_PATTERNS = ("arc2face/*", "encoder/*", "controlnet/*", "arcface.onnx", "antelopev2/*")
# What Arc2Face takes from the SD1.5 base.
BASE_REQUIRED_FILES = (
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors|vae/diffusion_pytorch_model.bin",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "scheduler/scheduler_config.json",
)

# The official demo: DPM-Solver++ (diffusers' multistep default, order 2) from SD1.5's scheduler config.
SCHEDULER = "dpm++"
DEFAULTS = {"num_inference_steps": 25, "guidance_scale": 3.0}
# README: LCM-LoRA with 2 steps and guidance 1.0 ("LCM is very sensitive ... small values lead to oversaturation").
LCM_DEFAULTS = {"num_inference_steps": 2, "guidance_scale": 1.0, "scheduler": "lcm"}


def arc2face_prompt_embeds(text_encoder, tokenizer, id_embeds: torch.Tensor) -> torch.Tensor:
    """``(N, 512)`` ArcFace embeddings to ``(N, 77, D)`` Arc2Face prompt embeddings."""
    return encode_arcface_id_prompt(text_encoder, tokenizer, id_embeds)
