"""FlashFace's log-sum-exp split of the reference attention, on every device that has a kernel for it.

``_attention_with_lse`` must give SDPA's output and the exact log-sum-exp of the (scaled, biased) logits, computed
here independently from the logits themselves. The CUDA case runs only where a GPU is present.
"""

import math

import pytest
import torch

from idfusion.methods import flashface as ff

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")
    ),
]


def _inputs(device, dtype, biased):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g) for n in (40, 24, 24))
    bias = torch.randn(2, 1, 1, 24, generator=g) if biased else None  # per-key log-weights, as the bank gives
    move = lambda t: None if t is None else t.to(device, dtype)  # noqa: E731
    return move(q), move(k), move(v), move(bias)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("biased", [False, True], ids=["plain", "bias"])
def test_log_sum_exp_is_that_of_the_logits(device, biased):
    q, k, v, bias = _inputs(device, torch.float32, biased)
    with torch.no_grad():
        result = ff._attention_with_lse(q, k, v, bias)
    assert result is not None, f"no log-sum-exp kernel used on {device}"
    out, lse = result
    logits = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias.double()
    torch.testing.assert_close(lse.double(), torch.logsumexp(logits, -1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.double(), torch.softmax(logits, -1) @ v.double(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_the_split_equals_attention_over_the_union_of_keys(device):
    """The mix the reference processor uses: attention over [y; R] from the two halves and their log-sum-exps."""
    q, k, v, bias = _inputs(device, torch.float32, True)
    k2, v2 = k.flip(2) * 0.5, v.flip(2)
    with torch.no_grad():
        (o_y, lse_y), (o_r, lse_r) = ff._attention_with_lse(q, k, v), ff._attention_with_lse(q, k2, v2, bias)
        weight = torch.sigmoid(lse_y - lse_r).unsqueeze(-1)
        mixed = o_y + (1 - weight) * (o_r - o_y)
        full_bias = torch.cat([torch.zeros_like(bias), bias], dim=-1)
        union = torch.nn.functional.scaled_dot_product_attention(
            q, torch.cat([k, k2], 2), torch.cat([v, v2], 2), attn_mask=full_bias
        )
    torch.testing.assert_close(mixed, union, atol=1e-5, rtol=1e-4)


def test_training_takes_the_direct_path():
    q, k, v, _ = _inputs("cpu", torch.float32, False)
    assert ff._attention_with_lse(q.requires_grad_(), k, v) is None  # the kernels' log-sum-exp has no gradient
