"""FlashFace (Zhang et al., arXiv 2403.17008): identity from reference feature maps through reference attention.

Two releases, one set of pieces; :class:`FlashFaceRelease` holds every difference between them:

- **official** (``ali-vilab/FlashFace``, ``shilongz/FlashFace-SD1.5``): a fully fine-tuned SD1.5 UNet with a 5th
  input channel (face-position mask) and a separate reference attention (the checkpoint's
  ``self_attn.self_attn_first``; here :class:`FlashFaceReferenceAttention`, a pipeline component) in the 10
  transformer blocks of the mid block and decoder, plus a ReferenceNet (a UNet copy) run on the clean reference
  latents at the current timestep, every step, with the negative prompt as its text. Block update, with
  ``y = norm1(x)``, ``ref`` the block's reference attention and ``R`` the ReferenceNet's ``norm1`` outputs of the
  same block::

      x <- x + attn1(y) + lam * ref(y, [y; R]) + (1 - lam) * ref(y, y)

- **open** (``IntellectGen/flashface``): plain 4-channel SD1.5 UNets; the reference attention *is* ``attn1``
  (``x <- x + s * attn1(y, [y; R]) + (1 - s) * attn1(y, y)``, ``s`` clipped to [0, 1]), the ReferenceNet runs once
  at t = 0 with the positive prompt, and the unconditional CFG branch sees no reference.

The official ReferenceNet has no time embedding, mid block or head of its own: it runs the main UNet's (its
``ref_middle`` weights are stored but never executed). Loading copies those main weights into the ReferenceNet, so
both networks are plain diffusers ``UNet2DConditionModel``s at run time. Identity enters only through attention
processors (:func:`attach_reference_processors`); the UNets' own modules are never changed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "REFERENCE_BLOCKS",
    "FlashFaceRelease",
    "OFFICIAL",
    "OPEN",
    "RELEASES",
    "FlashFaceReferenceAttention",
    "ReferenceBank",
    "ReferenceWriteProcessor",
    "ReferenceReadProcessor",
    "reference_blocks",
    "build_flashface_models",
    "attach_reference_processors",
    "reference_multiplicities",
    "OFFICIAL_FACE_BOX",
    "face_position_mask",
    "forward_with_shared_down_path",
    "flashface_guidance",
    "rescale_noise",
]

# The transformer blocks that read references in SD1.5's topology: the mid block's and the 9 decoder blocks with
# attention (a UNet with other layer counts has its own, in the same order: see reference_blocks).
REFERENCE_BLOCKS = ("mid_block.attentions.0.transformer_blocks.0",) + tuple(
    f"up_blocks.{i}.attentions.{j}.transformer_blocks.0" for i in (1, 2, 3) for j in (0, 1, 2)
)


@dataclass(frozen=True)
class FlashFaceRelease:
    """Everything that differs between the official release and the open re-implementation."""

    name: str
    in_channels: int  # main UNet input: 4 latent channels (+1 face-position mask, official)
    separate_reference_attention: bool  # official: its own attention next to attn1; open: attn1 itself
    references_every_step: bool  # official: ReferenceNet at the current t every step; open: once at t = 0
    refnet_context: str  # "negative" (official) or "positive" (open)
    reference_size: int  # pixels of a reference image
    reference_latents: str  # "mean" (official, deterministic) or "sample" (open)
    clip_skip: int  # 0: last layer (official); 1: penultimate + final LayerNorm (open)
    num_references: int | None  # references are padded to this many (official 4, ``cfg.num_pairs``); None: as given
    # sampling defaults
    height: int
    num_inference_steps: int
    guidance_scale: float
    reference_strength: float
    scheduler_config: dict = field(default_factory=dict)


OFFICIAL = FlashFaceRelease(
    name="flashface",
    in_channels=5,
    separate_reference_attention=True,
    references_every_step=True,
    refnet_context="negative",
    reference_size=224,
    reference_latents="mean",
    clip_skip=0,
    num_references=4,
    height=768,
    num_inference_steps=35,
    guidance_scale=7.5,
    reference_strength=1.2,
    scheduler_config={"timestep_spacing": "trailing", "steps_offset": 0},
)
OPEN = FlashFaceRelease(
    name="open-flashface",
    in_channels=4,
    separate_reference_attention=False,
    references_every_step=False,
    refnet_context="positive",
    reference_size=256,
    reference_latents="sample",
    clip_skip=1,
    num_references=None,
    height=512,
    num_inference_steps=50,
    guidance_scale=3.0,
    reference_strength=0.85,
    scheduler_config={"timestep_spacing": "leading", "steps_offset": 19},  # t = 999, 979, ..., 19
)
RELEASES = {OFFICIAL.name: OFFICIAL, OPEN.name: OPEN}


def reference_blocks(unet: nn.Module) -> dict[str, nn.Module]:
    """The reference-reading ``BasicTransformerBlock``s of a UNet (or ReferenceNet), by module path: the mid
    block's, then the up blocks' in order. In SD1.5's topology (2 layers per level) these are the 10
    :data:`REFERENCE_BLOCKS`; with 1 layer per level (the synthetic world's base) 7."""
    from diffusers.models.attention import BasicTransformerBlock

    found = {
        path: module
        for path, module in unet.named_modules()
        if isinstance(module, BasicTransformerBlock) and path.split(".")[0] in ("mid_block", "up_blocks")
    }
    if not any(path.startswith("mid_block.") for path in found) or len(found) < 2:
        raise ValueError("not an SD1.5-topology UNet: no transformer blocks in the mid block and the up path")

    def order(path: str) -> tuple:  # mid block first, then by block, attention and layer index
        parts = path.split(".")
        return (parts[0] != "mid_block", *(int(p) for p in parts if p.isdigit()))

    return {path: found[path] for path in sorted(found, key=order)}


class FlashFaceReferenceAttention(ModelMixin, ConfigMixin):
    """The official release's reference attentions, one per :data:`REFERENCE_BLOCKS` entry (same order).

    Each is an ``Attention`` shaped like its block's ``attn1`` (the official initialisation is a copy of it); the
    checkpoint stores them as ``self_attn.self_attn_first``. Kept apart from the UNet, so the UNet stays a plain
    diffusers model and this component saves and loads with the pipeline. (One per :func:`reference_blocks` entry
    of other topologies.)

    Args:
        query_dims: each block's width.
        heads: each block's number of heads.
    """

    @register_to_config
    def __init__(self, query_dims: Sequence[int], heads: Sequence[int]):
        super().__init__()
        from diffusers.models.attention_processor import Attention

        if len(query_dims) != len(heads) or not query_dims:
            raise ValueError(f"expected one width and head count per reference block, got {query_dims}, {heads}")
        self.attentions = nn.ModuleList(
            Attention(query_dim=d, heads=h, dim_head=d // h, bias=False, out_bias=True)
            for d, h in zip(query_dims, heads, strict=True)
        )

    @classmethod
    def from_unet(cls, unet: nn.Module) -> FlashFaceReferenceAttention:
        """Copies of ``unet``'s reference blocks' ``attn1`` (how the release initialised them for training)."""
        blocks = list(reference_blocks(unet).values())
        model = cls([b.attn1.to_q.in_features for b in blocks], [b.attn1.heads for b in blocks])
        for attention, block in zip(model.attentions, blocks, strict=True):
            attention.load_state_dict(block.attn1.state_dict())
        return model.to(device=unet.device, dtype=unet.dtype)

    def forward(self, *args, **kwargs):  # pragma: no cover - the processors call the attentions' projections
        raise RuntimeError("FlashFaceReferenceAttention is read by FlashFace's attention processors, not called")


def build_flashface_models(
    unet_config: dict, release: FlashFaceRelease
) -> tuple[nn.Module, nn.Module, FlashFaceReferenceAttention | None]:
    """The main UNet (``release.in_channels`` inputs), the ReferenceNet (4 inputs) and, for the official release,
    the reference attention, from one SD1.5-topology UNet config. Works under ``torch.device("meta")``."""
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in unet_config.items() if not k.startswith("_")}
    main = UNet2DConditionModel.from_config({**config, "in_channels": release.in_channels})
    refnet = UNet2DConditionModel.from_config({**config, "in_channels": 4})
    reference = FlashFaceReferenceAttention.from_unet(main) if release.separate_reference_attention else None
    return main, refnet, reference


class ReferenceBank:
    """The reference tokens of one generation and how each sample of the main batch reads them.

    Attributes:
        tokens: block path -> ``(G * n, L_ref, C)`` ReferenceNet ``norm1`` outputs: ``n`` references for each of
            ``G`` groups (``G = 1``: every image reads the same references; ``G = N``: image ``i`` reads group
            ``i``). Empty: no references.
        num_groups: ``G``.
        num_images: ``N``, the images of the batch; row ``r`` of a UNet call is image ``r % N`` (branch-major).
        strength: ``(rows,)`` reference strength ``lam`` per row of the main UNet's batch.
        log_weights: ``(1 or N, n)`` logit bias per reference (blend weights, padding multiplicities), or ``None``.
        writing: the ReferenceNet pass is running (processors store instead of read).
    """

    def __init__(self) -> None:
        self.tokens: dict[str, torch.Tensor] = {}
        self.num_groups = 1
        self.num_images = 1
        self.strength: torch.Tensor | None = None
        self.log_weights: torch.Tensor | None = None
        self.writing = False

    def clear(self) -> None:
        self.tokens.clear()
        self.strength = None
        self.log_weights = None


def reference_multiplicities(count: int, target: int | None, seed: int) -> torch.Tensor:
    """How many times each of ``count`` references appears once padded to ``target`` with seeded random
    duplicates (the official ``num_pairs = 4``; ``None``: no padding): ``(count,)`` integers.

    Attention over duplicated keys equals attention with the logit bias ``log(multiplicity)``, so a padded set is run
    as its distinct references plus that bias: per image, without running the ReferenceNet on the duplicates.
    """
    import numpy as np

    counts = torch.ones(count)
    if target is not None and count < target:
        picks = np.random.default_rng(seed).choice(count, target - count)
        counts += torch.bincount(torch.as_tensor(picks), minlength=count).float()
    return counts


def _attention(
    attn,
    query_states: torch.Tensor,
    key_states: torch.Tensor,
    bias: torch.Tensor | None = None,
    memory: torch.Tensor | None = None,
):
    """``attn``'s projections and SDPA: queries from ``query_states`` (B, Lq, C), keys/values from ``key_states``
    (B, Lk, C) followed by ``memory`` (1, Lm, C) shared by every sample, projected once and broadcast; ``bias`` is an
    additive logit bias broadcastable to (B, heads, Lq, Lk + Lm)."""
    batch, length, _ = query_states.shape
    heads = attn.heads
    q, k, v = attn.to_q(query_states), attn.to_k(key_states), attn.to_v(key_states)
    if memory is not None:
        k = torch.cat([k, attn.to_k(memory).expand(batch, -1, -1)], dim=1)  # (B, Lk + Lm, C)
        v = torch.cat([v, attn.to_v(memory).expand(batch, -1, -1)], dim=1)
    head_dim = q.shape[-1] // heads
    q, k, v = (t.view(batch, -1, heads, head_dim).transpose(1, 2) for t in (q, k, v))  # (B, heads, L, head_dim)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    out = out.transpose(1, 2).reshape(batch, length, heads * head_dim)  # (B, Lq, C)
    return attn.to_out[1](attn.to_out[0](out))


class ReferenceWriteProcessor:
    """On the ReferenceNet's reference blocks: stores ``norm1(x)`` (the processor's input), then attends as usual."""

    def __init__(self, bank: ReferenceBank, key: str):
        self.bank, self.key = bank, key

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if self.bank.writing:
            self.bank.tokens[self.key] = hidden_states
        return _attention(attn, hidden_states, hidden_states)


def _heads(attn, states: torch.Tensor, projection) -> torch.Tensor:
    batch = states.shape[0]
    out = projection(states)
    return out.view(batch, -1, attn.heads, out.shape[-1] // attn.heads).transpose(1, 2)  # (B, heads, L, head_dim)


def _attention_with_lse(q, k, v, bias=None):
    """SDPA that also returns each query's log-sum-exp of logits, ``(B, heads, Lq)``; ``None`` where unavailable.

    With two such results over disjoint key sets, the attention over their union is the LSE-weighted mix of the two
    (the split used by flash attention), so the official ``ref(y, [y; R])`` needs no second pass over ``y``. The
    public ``F.scaled_dot_product_attention`` does not return the log-sum-exp, so the backend kernels that compute it
    anyway are called: the CPU flash kernel, and on CUDA the memory-efficient kernel (any dtype, takes a bias).
    """
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return None  # training: the kernels' log-sum-exp output has no gradient, so the mix's would be wrong
    if q.device.type == "cpu":
        op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
        if op is None:
            return None
        out, lse = op(q, k, v, attn_mask=bias)[:2]
        return out, lse
    if q.device.type == "cuda":
        op = getattr(torch.ops.aten, "_scaled_dot_product_efficient_attention", None)
        if op is None:
            return None
        if bias is not None:
            # as torch's own SDPA hands the kernel a bias: its last dim padded to a 16-element stride (an alignment
            # the kernel needs), then broadcast to the logits' shape by strides (no copy of B x heads x Lq x Lk)
            keys = bias.shape[-1]
            padded = F.pad(bias.to(q.dtype), (0, -keys % 16))[..., :keys]
            bias = padded.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        try:
            out, lse = op(q, k, v, bias, True)[:2]
        except RuntimeError:  # a shape/dtype/arch the kernel does not take: the direct computation instead
            logger.debug(
                "memory-efficient SDPA unavailable for %s %s; FlashFace uses the direct attention", q.shape, q.dtype
            )
            return None
        return out, lse[..., : q.shape[2]]  # the kernel pads the query length of its log-sum-exp
    return None


class ReferenceReadProcessor:
    """On the main UNet's reference blocks (``attn1``): self-attention plus the reference update.

    ``out = [attn1(y)] + lam * ref(y, [y; R]) + (1 - lam) * ref(y, y)``, per sample, where ``ref`` is the block's
    reference attention (official) or ``attn1`` itself (open, without the bracketed term). The result is computed
    with less work:

    - samples with ``lam = 0`` skip the ``[y; R]`` attention;
    - the references' keys and values are projected once per group for all samples;
    - ``ref(y, [y; R])`` is the log-sum-exp-weighted mix of ``ref(y, y)`` and ``ref(y, R)``, so with ``O_y`` and
      ``O_R`` the update is ``O_y + lam * (1 - w) * (O_R - O_y)``, ``w = sigmoid(lse_y - lse_R)``: the costly
      attention over ``L + n*L_ref`` keys and the one over ``L`` keys become one over ``L`` and one over ``n*L_ref``.
      (Where the log-sum-exp is not available, the two attentions are computed as written.)
    """

    def __init__(self, bank: ReferenceBank, key: str, reference_attention: nn.Module | None):
        self.bank, self.key = bank, key
        # Not a registered submodule: it belongs to the pipeline's reference_attention component.
        self.reference_attention = reference_attention

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        y = hidden_states
        batch, length, _ = y.shape
        bank = self.bank
        if bank.writing:  # a UNet used as its own ReferenceNet (open variant shares nothing; safe either way)
            bank.tokens[self.key] = y
            return _attention(attn, y, y)
        ref = self.reference_attention if self.reference_attention is not None else attn
        out = _attention(attn, y, y) if self.reference_attention is not None else None
        tokens = bank.tokens.get(self.key)
        strength = bank.strength if bank.strength is not None else torch.zeros(batch)
        if self.reference_attention is None:
            strength = strength.clamp(0.0, 1.0)  # open: s >= 1 means "full reference"
        if tokens is None:
            strength = torch.zeros_like(strength)  # no references: only ref(y, y)
        lam = strength.to(device=y.device, dtype=torch.float32).view(batch, 1, 1, 1)

        q, k, v = (_heads(ref, y, proj) for proj in (ref.to_q, ref.to_k, ref.to_v))  # (B, heads, L, head_dim)
        if not bool((strength != 0).any()):
            heads = F.scaled_dot_product_attention(q, k, v)
        else:
            groups = bank.num_groups
            total, ref_length, channels = tokens.shape
            n_refs = total // groups
            # (G*n, L_ref, C) -> (G, n*L_ref, C): an image attends to all references of its group
            memory = tokens.reshape(groups, n_refs * ref_length, channels).to(y.dtype)
            k_ref, v_ref = _heads(ref, memory, ref.to_k), _heads(ref, memory, ref.to_v)  # (G, heads, n*L_ref, d)
            image = torch.arange(batch, device=y.device) % bank.num_images  # branch-major rows
            if groups == 1:
                k_ref, v_ref = k_ref.expand(batch, -1, -1, -1), v_ref.expand(batch, -1, -1, -1)
            else:
                k_ref, v_ref = k_ref[image], v_ref[image]
            bias = None
            if bank.log_weights is not None:
                # log-weights on each reference's tokens: attention mass shifts smoothly between references
                log_w = bank.log_weights.to(device=y.device, dtype=y.dtype)
                log_w = log_w[image % log_w.shape[0]]  # (1 or N, n) -> (B, n)
                bias = log_w.repeat_interleave(ref_length, dim=1).view(batch, 1, 1, -1)  # (B, 1, 1, n*L_ref)
            own = _attention_with_lse(q, k, v)
            other = _attention_with_lse(q, k_ref, v_ref, bias) if own is not None else None
            if other is not None:
                (o_y, lse_y), (o_r, lse_r) = own, other
                weight = torch.sigmoid(lse_y - lse_r).unsqueeze(-1)  # share of the mass on y's own keys
                heads = o_y.float() + lam * (1 - weight) * (o_r.float() - o_y.float())
            else:
                # the two attentions as written, each for the rows that need it: (1 - lam) o_y + lam o_full (with lam
                # 0 or 1 per sample in training, each row needs one of them)
                full_bias = None if bias is None else torch.cat([y.new_zeros(batch, 1, 1, length), bias], dim=-1)
                keys, values = torch.cat([k, k_ref], dim=2), torch.cat([v, v_ref], dim=2)  # (B, heads, L + n*L_ref, d)
                lam_rows = lam.view(batch)
                heads = q.new_zeros(q.shape, dtype=torch.float32)
                for rows, weight, kv, mask in (
                    (lam_rows != 1, 1 - lam, (k, v), None),
                    (lam_rows != 0, lam, (keys, values), full_bias),
                ):
                    if bool(rows.all()):
                        heads = heads + weight * F.scaled_dot_product_attention(q, *kv, attn_mask=mask).float()
                    elif bool(rows.any()):
                        index = rows.nonzero().flatten()
                        part = F.scaled_dot_product_attention(
                            q[index], kv[0][index], kv[1][index], attn_mask=None if mask is None else mask[index]
                        )
                        heads = heads.index_add(0, index, weight[index] * part.float())
        heads = heads.to(y.dtype).transpose(1, 2).reshape(batch, length, -1)  # (B, L, C)
        # to_out is affine and lam + (1 - lam) = 1, so mixing before it equals mixing the two outputs
        reference = ref.to_out[1](ref.to_out[0](heads))
        return reference if out is None else out + reference


def attach_reference_processors(
    unet: nn.Module,
    refnet: nn.Module,
    bank: ReferenceBank,
    reference_attention: FlashFaceReferenceAttention | None,
) -> None:
    """Write processors on the ReferenceNet's reference blocks, read processors on the main UNet's (reading
    ``reference_attention``'s attentions for the official release, ``attn1`` itself for the open one)."""
    for path, block in reference_blocks(refnet).items():
        block.attn1.set_processor(ReferenceWriteProcessor(bank, path))
    blocks = reference_blocks(unet)
    partners = list(reference_attention.attentions) if reference_attention is not None else [None] * len(blocks)
    if len(partners) != len(blocks):
        raise ValueError(f"{len(partners)} reference attentions for the UNet's {len(blocks)} reference blocks")
    for (path, block), partner in zip(blocks.items(), partners, strict=True):
        block.attn1.set_processor(ReferenceReadProcessor(bank, path, partner))


def forward_with_shared_down_path(
    unet: nn.Module, sample: torch.Tensor, timestep, context: torch.Tensor, fork: torch.Tensor
) -> torch.Tensor:
    """A UNet forward whose down path runs once per *distinct* input and forks before the mid block.

    References enter only in the mid and up blocks, so guidance branches that differ only in reference strength
    (official phase B: ``[positive + references, positive]``) have identical down paths. ``sample`` (M, C, h, w)
    and ``context`` (M, 77, D) are the distinct inputs; output row ``j`` continues input row ``fork[j]``. Equals
    ``unet(sample[fork], timestep, context[fork])`` for SD1.5-topology UNets.
    """
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep))  # (M, 1280)
    sample = unet.conv_in(sample)
    residuals: tuple[torch.Tensor, ...] = (sample,)
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            sample, res = block(hidden_states=sample, temb=emb, encoder_hidden_states=context)
        else:
            sample, res = block(hidden_states=sample, temb=emb)
        residuals += res
    # fork: (M, ...) -> (K, ...), every tensor the later blocks read
    sample, emb, context = sample[fork], emb[fork], context[fork]
    residuals = tuple(r[fork] for r in residuals)
    sample = unet.mid_block(sample, emb, encoder_hidden_states=context)
    for index, block in enumerate(unet.up_blocks):
        res, residuals = residuals[-len(block.resnets) :], residuals[: -len(block.resnets)]
        size = residuals[-1].shape[2:] if index < len(unet.up_blocks) - 1 else None
        if getattr(block, "has_cross_attention", False):
            sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res, encoder_hidden_states=context,
                           upsample_size=size)  # fmt: skip
        else:
            sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res, upsample_size=size)
    if unet.conv_norm_out is not None:
        sample = unet.conv_act(unet.conv_norm_out(sample))
    return unet.conv_out(sample)


#: The official demo's default face position (``demo_gradio.py``): upper middle of the canvas.
OFFICIAL_FACE_BOX = (0.3, 0.1, 0.6, 0.4)


def face_position_mask(box: Sequence[float] | None, height: int, width: int, scale: int = 8) -> torch.Tensor:
    """The official face-position channel: ``(1, 1, H/8, W/8)``, 1 inside a square of side ``max(w, h)`` anchored at
    the box's top-left corner (relative coordinates ``x1, y1, x2, y2``), 0 elsewhere; no box (or all zeros): zeros.

    As the release rounds: each coordinate is truncated to pixels first, then ``w = x2 - x1``, ``h = y2 - y1``."""
    mask = torch.zeros(1, 1, height, width)
    if box is not None and any(box):
        x1, x2 = (int(v * width) for v in (box[0], box[2]))
        y1, y2 = (int(v * height) for v in (box[1], box[3]))
        side = max(x2 - x1, y2 - y1)
        mask[..., y1 : y1 + side, x1 : x1 + side] = 1.0
    return mask[..., ::scale, ::scale].contiguous()  # stride slicing, as the official code subsamples


def rescale_noise(guided: torch.Tensor, positive: torch.Tensor, rescale: float) -> torch.Tensor:
    """CFG-rescale (Lin et al. 2023, arXiv 2305.08891, eq. 15-16): match the guided prediction's per-sample std to
    the positive prediction's, blended by ``rescale``."""
    if rescale == 0:
        return guided
    dims = list(range(1, guided.ndim))
    factor = positive.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
    return guided * (rescale * factor + (1.0 - rescale))


def flashface_guidance(
    branches: torch.Tensor,
    *,
    text_scale: float,
    reference_scale: float | None,
    rescale: float,
) -> torch.Tensor:
    """Combine the batched branch predictions of one step.

    Args:
        branches: ``(2, N, ...)`` as ``[positive, negative]`` (phase A, references in both) or ``(3, N, ...)`` as
            ``[positive + reference, positive, negative]`` (phase B).
        text_scale: ``s_t``; reference_scale: ``s_r`` (phase B only); rescale: CFG-rescale factor (0.5 official).
    """
    if branches.shape[0] == 2:
        positive, negative = branches
        return rescale_noise(negative + text_scale * (positive - negative), positive, rescale)
    with_reference, positive, negative = branches
    guided = negative + text_scale * (positive - negative) + reference_scale * (with_reference - positive)
    # rescaled against the positive, no-reference prediction (official)
    return rescale_noise(guided, positive, rescale)
