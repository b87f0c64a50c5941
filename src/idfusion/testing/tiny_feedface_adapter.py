"""A tiny FeedFace adapter (``feed-4800000.pt`` of HF ``Xiang-cd/FeedFace``) in the official key names.

Shapes: the face encoder is a CLIP vision tower of width 32 (3 layers, 4 heads, MLP 64, quick-GELU) on 224x224
crops with 32x32 patches, so a face still gives 50 tokens; ``project_layer`` maps 32 to the U-ViT width ``dim``.
The 14 feed blocks have width ``dim`` (heads of 8 channels when 24 does not divide ``dim``). Every weight is
random, ``zero_linear`` included, so the adapter changes the U-ViT's output.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["TINY_VISION_CONFIG", "TINY_UVIT_WIDTH", "tiny_feed_adapter", "write_feed_checkpoint"]

TINY_VISION_CONFIG = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "image_size": 224,
    "patch_size": 32,
}
#: The width of the tiny U-ViT the adapter is meant for by default.
TINY_UVIT_WIDTH = 32


def tiny_feed_adapter(seed: int = 0, *, dim: int = TINY_UVIT_WIDTH):
    """A seeded random tiny :class:`~idfusion.methods.feedface.FeedAdapter` (eval mode) for a U-ViT of width ``dim``.

    Weights are perturbed everywhere (norms, biases and the zero-initialised ``zero_linear`` too), so the adapter
    is "trained": its blocks return non-zero deltas.
    """
    from idfusion.methods.feedface import FeedAdapter

    torch.manual_seed(seed)
    adapter = FeedAdapter(dim, vision_config=TINY_VISION_CONFIG)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in adapter.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return adapter.eval()


def write_feed_checkpoint(
    path: str | os.PathLike[str], seed: int = 0, *, dim: int = TINY_UVIT_WIDTH, with_position_ids: bool = True
) -> Path:
    """Write a tiny ``feed-4800000.pt`` (``torch.save`` of the official ``T2IAdapter.state_dict()`` layout).

    Args:
        path: the file to write.
        seed: weights seed (see :func:`tiny_feed_adapter`).
        dim: the U-ViT width.
        with_position_ids: add the stale ``…embeddings.position_ids`` buffer the release carries (transformers 4.28).
    """
    from idfusion.methods.feedface import POSITION_IDS_KEY

    adapter = tiny_feed_adapter(seed, dim=dim)
    state = {k: v.clone() for k, v in adapter.state_dict().items()}
    if with_position_ids:
        positions = adapter.preprocess_module.clip_model.vision_model.embeddings.position_embedding.num_embeddings
        state[POSITION_IDS_KEY] = torch.arange(positions).unsqueeze(0)  # (1, 50) int64, as transformers 4.28 saved
    path = Path(path)
    torch.save(state, path)
    return path
