"""Per-image scores of a benchmark run: identity (judge embeddings), prompt fidelity, and the optional models.

:func:`identity_scores` turns one image's judge embeddings into SimTarget / SimRef / Paste and ``copy_geo`` (faces
matched to the person by :func:`~idfusion.eval.metrics.match_faces`); :class:`ClipScorer` (CLIP-T, transformers)
and :func:`inception_scores` (FID/KID, torchmetrics) load their weights from local files only and return ``None``
with a note when they cannot, so a missing optional model never stops an evaluation.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import metrics

__all__ = [
    "ClipScorer",
    "IdentityEmbeddings",
    "identity_scores",
    "inception_scores",
    "unit",
]

logger = logging.getLogger(__name__)
NAN = float("nan")


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (``(D,)`` or ``(N, D)``)."""
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@dataclass
class IdentityEmbeddings:
    """Judge embeddings of one person's reference and held-out target photos, ``(R, D)`` and ``(T, D)``."""

    references: np.ndarray
    targets: np.ndarray

    @property
    def reference(self) -> np.ndarray:
        """The references' prototype (normalised mean of unit embeddings): the person as the method saw them."""
        return unit(unit(self.references).mean(0))

    @property
    def target(self) -> np.ndarray:
        """The held-out targets' prototype: the ground truth of ``copy_geo``."""
        return unit(unit(self.targets).mean(0))


def identity_scores(faces: np.ndarray, person: IdentityEmbeddings) -> dict[str, Any]:
    """Identity scores of one generated image with judge embeddings ``faces`` ``(F, D)`` (``F = 0``: no face).

    The face that stands for the person is the one the Hungarian matching pairs with the references' prototype
    (with one face, that face). Returns ``face_found``, ``faces``, ``face`` (the chosen row, or ``None``),
    ``sim_target``, ``sim_ref``, ``paste`` (FlashFace) and ``copy_geo`` (MultiID-Bench; ``nan`` when the references'
    and the targets' prototypes coincide).
    """
    faces = np.asarray(faces, dtype=np.float64).reshape(len(faces), -1) if len(faces) else np.zeros((0, 1))
    out: dict[str, Any] = {"face_found": bool(len(faces)), "faces": int(len(faces)), "face": None}
    if not len(faces):
        return {**out, "sim_target": NAN, "sim_ref": NAN, "paste": NAN, "copy_geo": NAN}
    chosen = metrics.match_faces(faces, person.reference[None])[0][0] if len(faces) > 1 else 0
    face = faces[chosen]
    pasted = metrics.paste_scores(face, person.references, person.targets)
    try:
        copy = metrics.copy_geo(face, person.target, person.reference)
    except ValueError:
        copy = NAN
    return {**out, "face": int(chosen), "sim_target": pasted.sim_target, "sim_ref": pasted.sim_ref,
            "paste": pasted.paste, "copy_geo": copy}  # fmt: skip


class ClipScorer:
    """CLIP-T with a transformers ``CLIPModel`` read from local files only (the Hub cache or a folder).

    Build it with :meth:`load`, which returns ``(None, note)`` when transformers or the weights are missing.
    """

    def __init__(self, model: Any, processor: Any, name: str) -> None:
        self.model, self.processor, self.name = model, processor, name

    @classmethod
    def load(cls, name: str | None) -> tuple[ClipScorer | None, str | None]:
        if not name:
            return None, "CLIP-T skipped: no clip_model in the benchmark"
        try:
            from transformers import CLIPModel, CLIPProcessor

            model = CLIPModel.from_pretrained(name, local_files_only=True).eval()
            processor = CLIPProcessor.from_pretrained(name, local_files_only=True)
        except ImportError as error:
            return None, f"CLIP-T skipped: transformers' CLIP is not importable ({error})"
        except (OSError, ValueError):
            return None, (
                f"CLIP-T skipped: CLIP weights {name!r} are not on this machine (only local files are read; "
                f"download them once with `huggingface-cli download {name}`, or set clip_model to a folder)"
            )
        return cls(model, processor, name), None

    def scores(self, images: Sequence[np.ndarray], prompts: Sequence[str], batch_size: int = 16) -> np.ndarray:
        """CLIP-T of each image against its prompt (:func:`~idfusion.eval.metrics.clip_score`)."""
        import torch

        out = []
        for start in range(0, len(images), batch_size):
            chunk = slice(start, start + batch_size)
            inputs = self.processor(
                text=list(prompts[chunk]), images=list(images[chunk]), return_tensors="pt", padding=True,
                truncation=True,
            )  # fmt: skip
            with torch.no_grad():
                image_embeds = self.model.get_image_features(pixel_values=inputs["pixel_values"])
                text_embeds = self.model.get_text_features(
                    input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
                )
            out.append(metrics.clip_score(image_embeds.numpy(), text_embeds.numpy()))
        return np.concatenate(out) if out else np.zeros(0)


def inception_scores(
    generated: Sequence[np.ndarray], real: Sequence[np.ndarray]
) -> tuple[dict[str, float] | None, str | None]:
    """FID and KID of ``generated`` against ``real`` images through torchmetrics (Inception-v3 features).

    Returns:
        ``({"fid", "kid", "kid_std"}, None)``, or ``(None, note)`` when torchmetrics, its image extras or the
        Inception weights are missing, or there are too few images (2 of each at least).
    """
    try:
        import torch
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance
    except ImportError as error:
        return (
            None,
            f"FID/KID skipped: torchmetrics' image metrics are not installed ({error}; pip install torchmetrics[image])",
        )
    if len(generated) < 2 or len(real) < 2:
        return None, f"FID/KID skipped: needs 2 generated and 2 real images at least ({len(generated)}, {len(real)})"
    subset = min(50, len(generated), len(real))
    try:
        fid = FrechetInceptionDistance(feature=2048)
        kid = KernelInceptionDistance(subset_size=subset)
    except Exception as error:  # the weights download fails in many ways offline
        return None, f"FID/KID skipped: the Inception weights are not available ({type(error).__name__}: {error})"

    def batch(images: Sequence[np.ndarray]) -> Any:
        from PIL import Image

        resized = [
            np.asarray(Image.fromarray(image).convert("RGB").resize((299, 299), Image.BICUBIC)) for image in images
        ]
        return torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).contiguous()

    real_batch, fake_batch = batch(real), batch(generated)
    for metric in (fid, kid):
        metric.update(real_batch, real=True)
        metric.update(fake_batch, real=False)
    kid_mean, kid_std = kid.compute()
    values = {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std)}
    if not all(math.isfinite(v) for v in values.values()):
        return None, "FID/KID skipped: not finite at this sample size"
    return values, None
