"""Random weights that cost little on disk: big tensors become slices of a few shared random pools.

``torch.save`` (and so ``torch.load(weights_only=True)``) stores each *storage* once, whatever the number of tensor
views on it. :func:`pooled_tensors` rewrites the large zero-centred tensors of a state dict as contiguous slices of
one random vector per scale: a tensor whose standard deviation is about ``s`` becomes ``pool_s[o : o + n]`` viewed in
its shape, at its own offset ``o``. Every tensor keeps its shape, dtype and (to a quarter octave) its scale, and no
two tensors of one shape are equal (their offsets differ), so tests can still tell pieces apart; zero tensors stay
zero. A file then costs about its largest tensor per scale instead of the sum of all of them.

The tiny official-format kits use it for the big files of frozen models that no training recipe registers:
FlashFace's ``flashface.ckpt``, ``sd-v1-vae.pth`` and CLIP file, FeedFace's ``autoencoder_kl.pth``, and AdaFace's
pickled generators (the AdaFace recipe copies the weights it trains), its Arc2Face encoder and ConsistentID files.
safetensors files cannot use it (they refuse tensors that share memory).

Loaders that ``load_state_dict(..., assign=True)`` keep the views, so parameters of a model loaded from such a file
share memory. That is fine for inference and for copying the weights, but not inside a model that training updates
or checkpoints: accelerate's ``save_state`` drops tensors that share a storage and its ``load_state`` then refuses
the file (measured on a pooled U-ViT). So files whose models a recipe trains or registers are not pooled (the
U-ViT, FeedFace's adapter); a recipe that wants to train a pooled one must ``clone()`` its tensors first.
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Mapping
from pathlib import Path

import torch

__all__ = ["MIN_POOLED_NUMEL", "pool_saved_state_dict", "pooled_tensors"]

#: Tensors smaller than this stay as they are (their bytes do not matter).
MIN_POOLED_NUMEL = 256
# The n-th tensor of a shape starts n times this far into its pool (so tensors of one shape all differ).
_OFFSET_STEP = 37
_CHUNK = 4096  # pool values are drawn in seeded chunks of this many
_ZERO_LEVEL = -(10**6)  # the "scale" of all-zero tensors


def _scale_level(tensor: torch.Tensor) -> int | None:
    """Quarter octaves of the tensor's standard deviation; ``None``: keep the tensor (small, integer, not
    zero-centred, or already a compact view)."""
    if tensor.numel() < MIN_POOLED_NUMEL or not tensor.is_floating_point() or not tensor.is_contiguous():
        return None
    values = tensor.detach().double()
    std, mean = values.std().item(), values.mean().item()
    if std == 0.0 and mean == 0.0:
        return _ZERO_LEVEL  # all zeros: a zero pool keeps them zero
    if std == 0.0 or abs(mean) > std:  # constants and norm weights around 1
        return None
    return round(4 * math.log2(std))


def _pool(seed: int, dtype: torch.dtype, level: int, length: int) -> torch.Tensor:
    """``length`` values of the pool of one scale: chunks of :data:`_CHUNK` seeded values, so a longer pool starts
    with the same values as a shorter one."""
    if level == _ZERO_LEVEL:
        return torch.zeros(length, dtype=dtype)
    base = zlib.crc32(f"{seed}:{dtype}:{level}".encode())  # stable across processes, unlike hash()
    chunks = [
        torch.randn(_CHUNK, generator=torch.Generator().manual_seed(base * 4099 + index), dtype=torch.float64)
        for index in range(-(-length // _CHUNK))
    ]
    return (torch.cat(chunks)[:length] * 2.0 ** (level / 4)).to(dtype)


def _pool_numel(tensor: torch.Tensor, row_stride: int | None) -> int:
    """Pool values one view of ``tensor`` spans: all of them, or with overlapping rows, ``row_stride`` per row."""
    if row_stride is None or tensor.ndim != 2 or tensor.shape[1] <= row_stride:
        return tensor.numel()
    rows, cols = tensor.shape
    return row_stride * (rows - 1) + cols


def pooled_tensors(
    tensors: Mapping[str, torch.Tensor],
    seed: int,
    *,
    twins: Mapping[str, str] | None = None,
    row_stride: int | None = None,
) -> dict[str, torch.Tensor]:
    """Replace the large zero-centred tensors of ``tensors`` by slices of shared random pools (module docstring).

    Args:
        tensors (`Mapping[str, torch.Tensor]`): name to tensor, in a stable order (the offsets follow it).
        seed (`int`): seeds the pools; the same seed and tensors give the same result.
        twins (`Mapping[str, str]`, *optional*): names whose tensor must equal another name's but live in separate
            memory (FlashFace's ``ori_*`` copies): they become the same slices of a copy of the pools.
        row_stride (`int`, *optional*): make 2-D tensors views whose row ``i`` starts ``row_stride`` pool values
            after row ``i - 1`` (``as_strided``; rows overlap, as the AdaFace kit's token table has always done), so
            a ``(2048, 512)`` weight spans about 15,000 values instead of a million. Such views reject in-place
            writes; for files whose readers only compute with them or copy them.

    Returns:
        `dict[str, torch.Tensor]`: the same names in the same order; kept tensors are the input objects.
    """
    twins = dict(twins or {})
    groups: dict[tuple[torch.dtype, int], list[str]] = {}
    for name, tensor in tensors.items():
        if name in twins:
            continue
        level = _scale_level(tensor)
        if level is not None:
            groups.setdefault((tensor.dtype, level), []).append(name)
    out = dict(tensors)
    for (dtype, level), names in groups.items():
        # The n-th tensor of a shape starts n * _OFFSET_STEP into the pool, and the pool's values depend only on
        # (seed, dtype, level): a tensor's values do not change when other tensors join the file.
        places: list[tuple[str, int, int]] = []  # (name, offset, span)
        shape_counts: dict[tuple[int, ...], int] = {}
        for name in names:
            shape = tuple(tensors[name].shape)
            count = shape_counts.get(shape, 0)
            shape_counts[shape] = count + 1
            places.append((name, count * _OFFSET_STEP, _pool_numel(tensors[name], row_stride)))
        pool = _pool(seed, dtype, level, max(offset + span for _, offset, span in places))
        for name, offset, span in places:
            tensor = tensors[name]
            if span == tensor.numel():
                out[name] = pool[offset : offset + span].view(tensor.shape)  # (n,) -> the tensor's shape
            else:  # (rows, cols): row i = pool[offset + i * row_stride :][:cols]
                out[name] = pool.as_strided(tuple(tensor.shape), (row_stride, 1), offset)
    copies: dict[int, torch.Tensor] = {}  # pool storage -> its copy, shared by all twins viewing that pool
    for twin, original in twins.items():
        view = out[original]
        if view is tensors[original]:  # kept as it was: a plain copy costs no more than it did
            out[twin] = view.clone()
            continue
        storage = view.untyped_storage()
        if storage.data_ptr() not in copies:
            copies[storage.data_ptr()] = torch.empty(0, dtype=view.dtype).set_(storage.clone())
        out[twin] = copies[storage.data_ptr()].as_strided(view.shape, view.stride(), view.storage_offset())
    return out


def pool_saved_state_dict(path: str | os.PathLike[str], seed: int) -> Path:
    """Rewrite a ``torch.save`` d state dict file (a flat mapping of tensors) with :func:`pooled_tensors`, keeping
    its container type and key order; for files that a library writer saved. Returns the path."""
    path = Path(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a flat state dict of tensors")
    torch.save(type(state)(pooled_tensors(state, seed)), path)
    return path
