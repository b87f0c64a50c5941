"""``idfusion demo``: the main job end to end, offline, on the synthetic world's shipped weights.

:func:`run_demo` renders a few held-out identities (the references), runs the world base model and every registered
method that has world weights on them, and writes one contact sheet: the references on top, then one row per method,
each image labelled with the judge's identity score (cosine similarity of judge embeddings, reference vs output;
same person above the judge's threshold). The base model sees only the prompt, so its scores are the floor an
identity method has to beat.

World weights of a method live in ``idfusion/world/weights/methods/<method>/``, a folder its pipeline loads
(FlashFace's ship).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DemoResult", "METHODS_FOLDER", "NO_METHODS_NOTE", "world_methods", "run_demo"]

logger = logging.getLogger(__name__)

METHODS_FOLDER = "methods"
NO_METHODS_NOTE = (
    "no identity method has world weights yet, so the sheet shows the base model alone (prompt only, no identity); "
    "identity methods get world weights with the training issue"
)
_REFERENCE_IMAGE_SEED = 80_000_000  # far from training (1,000,000+) and the evaluations (50,000,000+)


@dataclass
class DemoResult:
    """What :func:`run_demo` wrote and measured."""

    path: Path  # the contact sheet
    methods: list[str]  # row order after the references, "base" first
    scores: dict[str, list[float | None]]  # per method, the judge score of each output (None: no face found)
    prompts: list[str]
    notes: list[str] = field(default_factory=list)


def world_methods(folder: str | os.PathLike | None = None) -> list[tuple[str, Path]]:
    """Registered methods that have world weights: ``(name, release folder)`` in registry order."""
    from .. import registry
    from .backends import weights_dir

    root = Path(folder) if folder is not None else weights_dir() / METHODS_FOLDER
    return [(spec.name, root / spec.name) for spec in registry.methods() if (root / spec.name).is_dir()]


def _references(count: int, seed: int) -> tuple[list[Any], list[str]]:
    from .attributes import caption
    from .base import heldout_prompts
    from .identity import HELDOUT_IDENTITIES
    from .renderer import Pose, render

    rng = np.random.default_rng([0xDE70, int(seed)])
    identities = [int(i) for i in rng.choice(np.asarray(HELDOUT_IDENTITIES), count, replace=False)]
    frontal = Pose(center=(0.5, 0.46), scale=0.215, roll=0.0, yaw=0.0, expression_strength=0.9, color_jitter=(0, 0, 0))
    renders = [render(i, _REFERENCE_IMAGE_SEED + k, pose=frontal) for k, i in enumerate(identities)]
    prompts = [caption(a) for a in heldout_prompts(count, seed=1000 + seed)]
    return renders, prompts


def _score(judge: Any, detector: Any, reference: Any, image: np.ndarray) -> float | None:
    found = detector.detect(image)
    if not found:
        return None
    face = max(found, key=lambda d: float((d.bbox[2] - d.bbox[0]) * (d.bbox[3] - d.bbox[1])))
    a = judge.embed(reference.image, reference.faces[0].landmarks[None])[0]
    b = judge.embed(image, face.landmarks[None])[0]
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _run_method(
    name: str, folder: Path, references: Sequence[Any], prompts: Sequence[str], seeds, steps: int, progress: bool
):
    from .. import registry

    pipe = registry.load_pipeline(name, str(folder))
    pipe.set_progress_bar_config(disable=not progress)
    pipe.configure_face_analysis(detector="world", recognizer="world")
    images = []
    for reference, prompt, seed in zip(references, prompts, seeds, strict=True):
        out = pipe(faces=[reference.image], prompt=prompt, seed=int(seed), num_inference_steps=steps, output_type="np")
        images.append((np.clip(out.images[0], 0, 1) * 255).round().astype(np.uint8))
    return images


def run_demo(
    out_dir: str | os.PathLike,
    *,
    identities: int = 4,
    seed: int = 0,
    num_inference_steps: int = 20,
    cell: int = 128,
    progress: bool = True,
    base_folder: str | os.PathLike | None = None,
    methods_folder: str | os.PathLike | None = None,
) -> DemoResult:
    """Render ``identities`` held-out people, run the base model and each world method, write one contact sheet.

    Args:
        out_dir (`str` or `os.PathLike`): folder for ``demo_NNNN.png`` (a new file each run, written atomically).
        identities (`int`, defaults to 4): references, one column each (1 to 4: one row of the sheet per method).
        seed (`int`, defaults to 0): picks the identities, prompts and sampling noise.
        num_inference_steps (`int`, defaults to 20): sampling steps of every method.
        cell (`int`, defaults to 128): pixel side of each image on the sheet.
        progress (`bool`, defaults to `True`): show progress bars.
        base_folder / methods_folder (*optional*): other weights than the shipped ones.

    Returns:
        A :class:`DemoResult`; ``notes`` says what the sheet leaves out.
    """
    from tqdm.auto import tqdm

    from ..atomic import check_output_folder
    from ..outputs import contact_sheet, file_sha256, save_new_generated_image
    from .backends import WorldDetector, WorldRecognizer
    from .base import base_model_dir, generate, load_base_pipeline

    if not 1 <= identities <= 4:
        raise ValueError(f"identities must be 1 to 4 (one row of the sheet per method), got {identities}")
    check_output_folder(out_dir)  # before any work
    references, prompts = _references(identities, seed)
    seeds = [seed * 1000 + k for k in range(identities)]
    detector, judge = WorldDetector(), WorldRecognizer("world-judge")
    found = world_methods(methods_folder)
    notes = [] if found else [NO_METHODS_NOTE]

    rows: dict[str, list[np.ndarray]] = {}
    bar = tqdm(total=1 + len(found), desc="demo", unit="method", disable=not progress)
    base_dir = base_model_dir(base_folder)
    rows["base"] = list(
        generate(load_base_pipeline(base_dir), prompts, seeds, num_inference_steps=num_inference_steps)
    )
    bar.update()
    for name, folder in found:
        bar.set_postfix_str(name)
        rows[name] = _run_method(name, folder, references, prompts, seeds, num_inference_steps, progress)
        bar.update()
    bar.close()

    scores = {name: [_score(judge, detector, r, image) for r, image in zip(references, images, strict=True)]
              for name, images in rows.items()}  # fmt: skip
    outputs, labels = [], []
    per_row = 4
    for name, images in rows.items():
        for k, image in enumerate(images):
            outputs.append(image)
            value = scores[name][k]
            labels.append(f"{name}: judge {'no face' if value is None else f'{value:.2f}'}")
        outputs += [np.full_like(images[0], 255)] * (-len(images) % per_row)  # each method starts a new row
        labels += [""] * (-len(images) % per_row)
    sheet = contact_sheet([r.image for r in references], outputs, cell=cell, labels=labels)
    metadata = {
        "job": "demo",
        "identities": [r.faces[0].identity for r in references],
        "prompts": prompts,
        "seeds": seeds,
        "num_inference_steps": num_inference_steps,
        "methods": list(rows),
        "judge_scores": scores,
        "judge_threshold": judge.threshold,
        "model_files": {"base/unet": file_sha256(base_dir / "unet" / "diffusion_pytorch_model.safetensors")},
        "notes": notes,
    }
    path = save_new_generated_image(out_dir, "demo", sheet, metadata)
    logger.info("wrote the demo sheet to %s", path)
    return DemoResult(path=path, methods=list(rows), scores=scores, prompts=prompts, notes=notes)
