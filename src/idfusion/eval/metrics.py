"""Identity and copy-paste metrics: pure functions of face embeddings (any recognizer's, L2-normalised or not).

The two copy-paste protocols (``../shared/specs/peers-and-benchmarks.md``):

- FlashFace (Table 2): ``SimTarget`` = similarity of the generated face to a held-out photo of the person (the key
  metric), ``SimRef`` = the largest similarity to any reference, ``Paste = SimRef - SimTarget``: a method that
  copies its reference scores high on SimRef but not on the held-out target.
- MultiID-Bench: ``copy_geo = (θ(gen, GT) - θ(gen, ref)) / θ(GT, ref)`` with θ the angle between embeddings: 1 when
  the generated face sits on the reference, -1 when it sits on the ground truth, 0 half-way (the triangle's
  geometry normalised by the reference-to-GT angle). Faces of multi-person images are paired by the Hungarian
  algorithm on similarity before scoring (:func:`match_faces`).

Prompt fidelity: :func:`attribute_fidelity` (the synthetic world's attribute checkers against the prompt's parsed
attributes) and :func:`clip_score` (CLIP-T from CLIP image and text embeddings).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "PasteScores",
    "angle",
    "attribute_fidelity",
    "clip_score",
    "copy_geo",
    "cosine",
    "diversity",
    "match_faces",
    "paste_scores",
]


def _rows(x: np.ndarray | Sequence[float]) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2 or a.shape[1] == 0:
        raise ValueError(f"expected embeddings of shape (N, D) or (D,), got {np.shape(x)}")
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    if not np.isfinite(a).all() or (norms == 0).any():
        raise ValueError("embeddings must be finite and non-zero")
    return a / norms


def cosine(a: np.ndarray | Sequence[float], b: np.ndarray | Sequence[float]) -> np.ndarray:
    """``(N, M)`` cosine similarities between the rows of ``a`` and ``b`` (1-d inputs count as one row)."""
    return np.clip(_rows(a) @ _rows(b).T, -1.0, 1.0)


def angle(a: np.ndarray | Sequence[float], b: np.ndarray | Sequence[float]) -> np.ndarray:
    """``(N, M)`` angles in radians between the rows of ``a`` and ``b``."""
    return np.arccos(cosine(a, b))


@dataclass(frozen=True)
class PasteScores:
    """FlashFace's held-out-target protocol for one generated face."""

    sim_target: float  # mean similarity to the held-out photos of the person
    sim_ref: float  # largest similarity to a reference
    paste: float  # sim_ref - sim_target: how much closer to the references than to the person


def paste_scores(generated: np.ndarray, references: np.ndarray, targets: np.ndarray) -> PasteScores:
    """SimTarget, SimRef and Paste of one generated face embedding (FlashFace, Table 2).

    ``references``: the embeddings the method was given; ``targets``: held-out photos of the same person (their
    mean similarity; FlashFace uses one target).
    """
    sim_target = float(cosine(generated, targets).mean())
    sim_ref = float(cosine(generated, references).max())
    return PasteScores(sim_target=sim_target, sim_ref=sim_ref, paste=sim_ref - sim_target)


def copy_geo(generated: np.ndarray, ground_truth: np.ndarray, reference: np.ndarray) -> float:
    """MultiID-Bench's copy-paste score ``(θ(gen, GT) - θ(gen, ref)) / θ(GT, ref)`` for one face.

    Raises:
        ValueError: the ground truth and the reference have the same embedding (θ(GT, ref) = 0: undefined).
    """
    gt_ref = float(angle(ground_truth, reference)[0, 0])
    if gt_ref < 1e-8:
        raise ValueError("copy_geo is undefined when the ground truth and the reference are the same embedding")
    return (float(angle(generated, ground_truth)[0, 0]) - float(angle(generated, reference)[0, 0])) / gt_ref


def match_faces(generated: np.ndarray, wanted: np.ndarray) -> list[tuple[int, int]]:
    """Pairs ``(generated row, wanted row)`` that maximise the total similarity (the Hungarian algorithm, as
    MultiHuman-Testbench and MultiID-Bench match faces of multi-person images). Unmatched rows are left out when
    the counts differ."""
    from scipy.optimize import linear_sum_assignment

    similarity = cosine(generated, wanted)
    rows, cols = linear_sum_assignment(-similarity)
    return [(int(r), int(c)) for r, c in zip(rows, cols, strict=True)]


def diversity(embeddings: np.ndarray) -> float:
    """Mean pairwise cosine distance ``1 - cos`` between the faces of several seeds of one prompt (0: identical;
    an identity method should stay the same person, so face diversity is read beside identity similarity)."""
    rows = _rows(embeddings)
    if len(rows) < 2:
        raise ValueError("diversity needs at least two images")
    sims = rows @ rows.T
    upper = sims[np.triu_indices(len(rows), k=1)]
    return float(np.mean(1.0 - upper))


def attribute_fidelity(wanted: Mapping[str, object], seen: Mapping[str, object]) -> float:
    """The fraction of the attributes a prompt asks for (``wanted``, field -> value) that an image shows (``seen``,
    the checker's reading; a missing or ``None`` field counts as not shown).

    Raises:
        ValueError: ``wanted`` is empty (nothing to check).
    """
    if not wanted:
        raise ValueError("attribute_fidelity needs at least one wanted attribute")
    return sum(seen.get(name) == value for name, value in wanted.items()) / len(wanted)


def clip_score(image_embeddings: np.ndarray, text_embeddings: np.ndarray) -> np.ndarray:
    """CLIP-T of each image against its own prompt: ``100 * max(cos(image, text), 0)`` row by row (torchmetrics'
    ``CLIPScore`` convention; PuLID and PhotoMaker report the same scale).

    Args:
        image_embeddings: ``(N, D)`` CLIP image embeddings.
        text_embeddings: ``(N, D)`` CLIP text embeddings of each image's prompt.
    """
    images, texts = _rows(image_embeddings), _rows(text_embeddings)
    if images.shape != texts.shape:
        raise ValueError(f"expected one prompt per image, got {images.shape} and {texts.shape}")
    return 100.0 * np.clip((images * texts).sum(axis=1), 0.0, None)
