"""Official FlashFace's VAE attention layout for diffusers' ``AutoencoderKL``.

The release's VAE (``ali-vilab/FlashFace`` ``ldm/models/vae.py``, ``AttentionBlock``) is SD's KL-f8 with one
difference in the single-head mid-block attention of the encoder and of the decoder: the attention output, laid out
``(b, hw, c)``, is reshaped to ``(b, c, h, w)`` with no transpose, so each output "channel" holds ``h w`` consecutive
values of the token-major buffer; the 1x1-conv projection and the residual then act on that map. The official
model was trained and is sampled through this VAE (reference faces are encoded with it, outputs decoded with it), so
matching the release needs it; its weights load unchanged (``convert_flashface_vae``). Diffusers' processors
transpose, i.e. compute SD's VAE.

Use :func:`use_flashface_vae_attention` (or ``attention.set_processor(FlashFaceVAEAttnProcessor())`` on the mid-block
attentions); ``vae.set_attn_processor(AttnProcessor2_0())`` undoes it (diffusers' ``set_default_attn_processor``
refuses processors it does not know).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from diffusers import AutoencoderKL
    from diffusers.models.attention_processor import Attention

__all__ = ["FlashFaceVAEAttnProcessor", "use_flashface_vae_attention", "uses_flashface_vae_attention"]

logger = logging.getLogger(__name__)


class FlashFaceVAEAttnProcessor:
    """Processor for an ``AutoencoderKL`` mid-block ``Attention`` that computes the release's ``AttentionBlock``:
    group norm, single-head (or multi-head) attention over the ``h w`` positions, then the ``(b, hw, c)`` result
    read as ``(b, c, h, w)`` without a transpose, the output projection over that map's channels, the residual."""

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if hidden_states.ndim != 4:
            raise ValueError(f"FlashFaceVAEAttnProcessor takes (b, c, h, w) feature maps, got {hidden_states.ndim}-D")
        if encoder_hidden_states is not None or attention_mask is not None or attn.spatial_norm is not None:
            raise ValueError("FlashFaceVAEAttnProcessor is for plain VAE self-attention (no context, mask or temb)")
        residual = hidden_states
        b, c, h, w = hidden_states.shape
        x = hidden_states
        if attn.group_norm is not None:
            x = attn.group_norm(x)
        tokens = x.view(b, c, h * w).transpose(1, 2)  # (b, hw, c)
        query, key, value = attn.to_q(tokens), attn.to_k(tokens), attn.to_v(tokens)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(b, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(b, h * w, attn.heads * head_dim).to(query.dtype)  # (b, hw, c)
        # the release's layout: the (b, hw, c) buffer read as (b, c, h, w); no transpose
        feature_map = out.reshape(b, c, h, w)
        # its projection is a 1x1 conv over that map's channels: diffusers' linear on the map's (b, hw, c) view
        out = attn.to_out[1](attn.to_out[0](feature_map.view(b, c, h * w).transpose(1, 2)))
        # contiguous like the release's conv output: a channels-last result would switch every later conv of the
        # VAE to other kernels (other rounding, which the decoder amplifies)
        out = out.transpose(1, 2).reshape(b, c, h, w).contiguous()
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _mid_block_attentions(vae: AutoencoderKL) -> dict[str, Attention]:
    found = {}
    for part in ("encoder", "decoder"):
        mid_block = getattr(getattr(vae, part, None), "mid_block", None)
        attentions = [a for a in getattr(mid_block, "attentions", None) or [] if a is not None]
        if not attentions:
            raise ValueError(f"this VAE's {part} has no mid-block attention (mid_block_add_attention=False?)")
        for i, attention in enumerate(attentions):
            found[f"{part}.mid_block.attentions.{i}"] = attention
    return found


def use_flashface_vae_attention(vae: AutoencoderKL) -> AutoencoderKL:
    """Give the encoder's and decoder's mid-block attentions :class:`FlashFaceVAEAttnProcessor`, in place.

    Afterwards ``vae.encode``/``vae.decode`` compute what the release's VAE computes with the same weights. A later
    ``vae.set_attn_processor(...)`` (or anything that resets processors, such as fusing QKV projections) replaces
    it, and processors are not saved with the weights: apply it after every load; check with
    :func:`uses_flashface_vae_attention`.

    Returns:
        ``vae``, for chaining.
    """
    for name, attention in _mid_block_attentions(vae).items():
        attention.set_processor(FlashFaceVAEAttnProcessor())
        logger.debug("%s: FlashFace VAE attention layout", name)
    return vae


def uses_flashface_vae_attention(vae: AutoencoderKL) -> bool:
    """Whether every mid-block attention of ``vae`` has the release's layout."""
    return all(isinstance(a.processor, FlashFaceVAEAttnProcessor) for a in _mid_block_attentions(vae).values())
