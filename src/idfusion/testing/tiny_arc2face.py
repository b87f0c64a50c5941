"""Tiny Arc2Face release, in the README's local ``models/`` layout (see :mod:`idfusion.methods.arc2face`).

Width: the Arc2Face encoder takes the 512-d ArcFace embedding zero-padded into its token width, so even the tiny
encoder is 512 wide (and the tiny UNet's cross-attention too). The tiny ONNX recognizer is 512-d like the real one.
At that width each attention layer is 4 MB, so the encoder has 1 layer and an MLP of 32, and its token table has
the kit's reduced vocabulary (:mod:`idfusion.testing.tiny_clip_tokenizer`, about 1,000 rows instead of 49,408:
2 MB instead of 101 MB). The UNets have the kit's widths (``components.TINY_UNET_WIDTHS``).
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["TINY_ID_WIDTH", "tiny_arc2face_encoder", "tiny_arc2face_unet", "write_arc2face"]

TINY_ID_WIDTH = 512


def tiny_arc2face_encoder(seed: int = 0):
    from .components import tiny_text_encoder

    return tiny_text_encoder(
        seed=seed,
        hidden_size=TINY_ID_WIDTH,
        intermediate_size=32,
        num_attention_heads=4,
        num_hidden_layers=1,
        projection_dim=TINY_ID_WIDTH,
    )


def tiny_arc2face_unet(seed: int = 0):
    from .components import tiny_unet

    return tiny_unet(seed=seed, cross_attention_dim=TINY_ID_WIDTH)


def write_arc2face(out_dir: Path, seed: int) -> list[Path]:
    """``arc2face/``, ``encoder/`` (``pytorch_model.bin``, as released), ``controlnet/``, ``antelopev2/`` and a tiny
    SD1.5 base in ``stable-diffusion-v1-5/``, where :class:`~idfusion.pipelines.Arc2FacePipeline` looks first."""
    from diffusers import ControlNetModel

    from .components import official_state_dict
    from .make_tiny import write_antelopev2, write_sd15

    unet = tiny_arc2face_unet(seed)
    unet.save_pretrained(out_dir / "arc2face", safe_serialization=True)
    encoder = tiny_arc2face_encoder(seed + 1)
    (out_dir / "encoder").mkdir()
    encoder.config.save_pretrained(out_dir / "encoder")
    torch.save(official_state_dict(encoder), out_dir / "encoder" / "pytorch_model.bin")
    torch.manual_seed(seed + 2)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16, 32))
    # from_unet zero-initialises the output convolutions, as training starts; a trained ControlNet's are not zero,
    # and with zeros the condition image would have no effect at all.
    for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
        torch.nn.init.normal_(conv.weight, std=0.05)
    controlnet.save_pretrained(out_dir / "controlnet", safe_serialization=True)
    (out_dir / "antelopev2").mkdir()
    write_antelopev2(out_dir / "antelopev2", seed)
    (out_dir / "stable-diffusion-v1-5").mkdir()
    write_sd15(out_dir / "stable-diffusion-v1-5", seed + 3)
    return sorted(p for p in out_dir.rglob("*") if p.is_file())
