"""Official FlashFace's VAE attention layout (idfusion.methods.flashface_vae) on a tiny diffusers AutoencoderKL.

The reference below is written from the release's ``AttentionBlock`` rule (the mid-block attention output, laid out
(b, hw, c), is reshaped to (b, c, h, w) without a transpose before its 1x1-conv projection), using the diffusers
module's own weights; the report of the "official fidelity" task compares with the release's VAE class itself.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0

from idfusion.methods.flashface_vae import (
    FlashFaceVAEAttnProcessor,
    use_flashface_vae_attention,
    uses_flashface_vae_attention,
)
from idfusion.testing.components import tiny_vae


def release_attention_block(attn, x: torch.Tensor) -> torch.Tensor:
    """GroupNorm, 1x1-conv q/k/v, one head over the h*w positions, the (b, hw, c) result *reshaped* (not
    transposed) to (b, c, h, w), 1x1-conv projection, residual."""
    b, c, h, w = x.shape
    norm = attn.group_norm
    y = F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)

    def conv1x1(linear, t):
        return F.conv2d(t, linear.weight[:, :, None, None], linear.bias)

    q, k, v = (conv1x1(layer, y).flatten(2) for layer in (attn.to_q, attn.to_k, attn.to_v))  # (b, c, hw)
    weights = (torch.einsum("bci,bcj->bij", q, k) / math.sqrt(c)).softmax(dim=-1)
    out = torch.einsum("bij,bcj->bic", weights, v)  # (b, hw, c)
    return conv1x1(attn.to_out[0], out.reshape(b, c, h, w)) + x


def perturbed_vae(seed: int = 0, dtype=torch.float64):
    """The tiny SD-topology VAE with every attention weight made non-trivial."""
    vae = tiny_vae(seed=seed).to(dtype).eval()
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if ".attentions." in name:
                p.add_(0.2 * torch.randn(p.shape, generator=generator, dtype=dtype))
    return vae


def with_reference_attention(vae):
    """Replace each mid-block attention's output by :func:`release_attention_block` (forward hooks)."""
    for part in (vae.encoder, vae.decoder):
        attn = part.mid_block.attentions[0]
        attn.register_forward_hook(lambda module, args, out: release_attention_block(module, args[0]))
    return vae


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("hw", [(4, 4), (3, 5), (6, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_processor_is_the_no_transpose_layout(hw, dtype):
    vae = perturbed_vae(dtype=dtype)
    attn = vae.decoder.mid_block.attentions[0]
    width = vae.config.block_out_channels[-1]
    x = torch.randn(2, width, *hw, generator=torch.Generator().manual_seed(1), dtype=dtype)
    with torch.no_grad():
        default = attn(x)
        attn.set_processor(FlashFaceVAEAttnProcessor())
        ours = attn(x)
        reference = release_attention_block(attn, x)
    torch.testing.assert_close(ours, reference, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-6)
    assert ours.is_contiguous()
    assert rel_err(default, reference) > 1e-2  # diffusers' transpose is a different function


@pytest.mark.parametrize("size", [(16, 16), (24, 16)])  # mid-block maps 2x2 and 3x2
def test_vae_encode_decode_equal_the_release_layout(size):
    ours = use_flashface_vae_attention(perturbed_vae())
    reference = with_reference_attention(perturbed_vae())
    default = perturbed_vae()
    image = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 2 - 1
    latents = torch.randn(2, 4, size[0] // 8, size[1] // 8, generator=torch.Generator().manual_seed(3)).double()
    with torch.no_grad():
        posterior, reference_posterior = ours.encode(image).latent_dist, reference.encode(image).latent_dist
        decoded, reference_decoded = ours.decode(latents).sample, reference.decode(latents).sample
        default_mean, default_decoded = default.encode(image).latent_dist.mean, default.decode(latents).sample
    torch.testing.assert_close(posterior.mean, reference_posterior.mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(posterior.logvar, reference_posterior.logvar, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(decoded, reference_decoded, rtol=1e-10, atol=1e-12)
    assert rel_err(default_mean, reference_posterior.mean) > 1e-3
    assert rel_err(default_decoded, reference_decoded) > 1e-3


def test_helper_sets_only_the_mid_block_attentions_and_can_be_undone():
    vae = tiny_vae()
    assert not uses_flashface_vae_attention(vae)
    assert use_flashface_vae_attention(vae) is vae
    processors = vae.attn_processors
    assert sorted(processors) == [
        "decoder.mid_block.attentions.0.processor",
        "encoder.mid_block.attentions.0.processor",
    ]
    assert all(isinstance(p, FlashFaceVAEAttnProcessor) for p in processors.values())
    assert uses_flashface_vae_attention(vae)
    vae.set_attn_processor(AttnProcessor2_0())
    assert not uses_flashface_vae_attention(vae)


def test_misuse():
    with pytest.raises(ValueError, match="no mid-block attention"):
        use_flashface_vae_attention(tiny_vae(mid_block_add_attention=False))
    attn = tiny_vae().decoder.mid_block.attentions[0]
    attn.set_processor(FlashFaceVAEAttnProcessor())
    with pytest.raises(ValueError, match="feature maps"):
        attn(torch.randn(1, 16, 32))
    with pytest.raises(ValueError, match="plain VAE self-attention"):
        attn(torch.randn(1, 32, 2, 2), encoder_hidden_states=torch.randn(1, 4, 32))
