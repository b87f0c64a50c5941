"""Acceptance measurement of identity methods in the synthetic world, against two baselines in the same run.

For every registered method with world weights (:func:`~idfusion.world.demo.world_methods`), on held-out
identities (:data:`~idfusion.world.identity.HELDOUT_IDENTITIES`, drawn with a fixed seed; nothing is tuned on
them) and held-out prompts (:func:`~idfusion.world.base.heldout_prompts`: attribute combinations no world model
trained on), each case is one identity, one prompt and one sampling seed:

- **method**: the method given one render of the identity (random pose, lighting and attributes: an ordinary
  photo, not the target);
- **different identity**: the same method, prompt and seed, given the reference of *another* held-out identity;
- **base**: the world base model with the prompt alone, same seed (its initial noise equals the method's).

Identity is scored by the independent judge (``world-judge``, never a training signal): the cosine similarity of
the largest detected face of the output to ``targets`` other renders of the *target* identity (FlashFace's
SimTarget), never to the reference itself. ``verified`` is the fraction of outputs whose SimTarget reaches the
judge's same-person threshold (an output without a detected face is not verified). Gaps are paired per case:
method minus baseline, with a 95 % interval (normal approximation over cases).

Prompt fidelity: the shipped attribute checker on the outputs (:func:`~idfusion.world.base.attribute_accuracy`).

Copy-paste, two ways:

- ``paste`` = SimRef - SimTarget (FlashFace, Table 2): how much closer the output is to the reference photo than
  to the person. A fresh render of the identity scores about 0 (``render`` row): it is a new photo of the person,
  like the targets. A copy of the reference scores high.
- ``attribute_copy``: among the (case, attribute) pairs where the reference photo shows a value of a prompt
  attribute (hat, glasses, shirt, expression, background colour and pattern) other than the prompt's, the
  fraction of outputs where the checker sees the reference's value. The base model never sees the reference, so
  its rate on the same pairs is the chance level; a method above it pastes the photo's content, not just the
  identity. (Hair, skin and face shape are identity, so they are expected to carry over and are not counted.)

Run ``python -m idfusion.world.evaluate_methods`` (add ``--write-manifest`` to record the numbers in
``weights/MANIFEST.json`` under ``methods.<name>.metrics``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CHECK",
    "EVAL",
    "HeldoutSet",
    "heldout_set",
    "method_images",
    "judge_embeddings",
    "identity_scores",
    "paired_gap",
    "attribute_copy",
    "evaluate_method",
    "evaluate_methods",
    "main",
]

logger = logging.getLogger(__name__)

#: The acceptance run: 50 held-out identities x 2 prompts, 4 target renders each.
EVAL = {"identities": 50, "prompts": 2, "targets": 4, "seed": 0, "num_inference_steps": 20}
#: The small run the tests reproduce from the shipped weights.
CHECK = {"identities": 4, "prompts": 1, "targets": 2, "seed": 1, "num_inference_steps": 10}
COPY_ATTRIBUTES = ("background", "pattern", "hat", "glasses", "clothing", "expression")
# Image seeds, far from training (dataset seed * 1,000,000 + k), the face models' evaluation (50,000,000+), the base
# model's (70,000,000+) and the demo's (80,000,000)
_REFERENCE_IMAGE_SEED = 81_000_000
_TARGET_IMAGE_SEED = 82_000_000
_FRESH_IMAGE_SEED = 83_000_000
#: Training identities that no world model trained on (method plans use the first few thousand): for choosing
#: sampling settings, so that the held-out identities are never tuned on.
VALIDATION_IDENTITIES = range(9_500, 10_000)


@dataclass
class HeldoutSet:
    """The cases of one run: per identity a reference, target renders and a fresh render; per case an identity,
    a prompt and a seed."""

    identities: list[int]
    references: list[Any]  # Render, one per identity (given to the method)
    targets: list[list[Any]]  # Render lists, one per identity (scored against)
    fresh: list[Any]  # one more render per identity (the render row: what a new photo of the person scores)
    case_identity: list[int]  # per case, the index of its identity
    prompts: list[Any]  # per case, the held-out Attributes asked for
    seeds: list[int]  # per case, the sampling seed

    @property
    def other(self) -> list[int]:
        """Per case, the identity index whose reference the different-identity baseline gets (the next one)."""
        return [(k + 1) % len(self.identities) for k in self.case_identity]


def heldout_set(identities: int, prompts: int, targets: int, seed: int, *, pool: str = "heldout") -> HeldoutSet:
    """``identities`` held-out identities (seeded), each with a reference, ``targets`` target renders and
    ``prompts`` held-out single-person prompts. ``pool="validation"`` draws from :data:`VALIDATION_IDENTITIES`
    instead (for tuning)."""
    from .base import heldout_prompts
    from .identity import HELDOUT_IDENTITIES
    from .renderer import render

    if identities < 2:
        raise ValueError("the different-identity baseline needs at least 2 identities")
    if pool not in ("heldout", "validation"):
        raise ValueError(f"pool must be 'heldout' or 'validation', got {pool!r}")
    rng = np.random.default_rng([0xE7A1, int(seed)])
    candidates = np.asarray(HELDOUT_IDENTITIES if pool == "heldout" else VALIDATION_IDENTITIES)
    ids = [int(i) for i in rng.choice(candidates, identities, replace=False)]
    base = int(seed) * 100_000
    references = [render(i, _REFERENCE_IMAGE_SEED + base + k) for k, i in enumerate(ids)]
    target_renders = [
        [render(i, _TARGET_IMAGE_SEED + base + k * targets + j) for j in range(targets)] for k, i in enumerate(ids)
    ]
    fresh = [render(i, _FRESH_IMAGE_SEED + base + k) for k, i in enumerate(ids)]
    wanted = heldout_prompts(identities * prompts, seed=3000 + int(seed))
    cases = [k for k in range(identities) for _ in range(prompts)]
    seeds = [int(seed) * 1_000_000 + n for n in range(len(cases))]
    return HeldoutSet(ids, references, target_renders, fresh, cases, wanted, seeds)


def method_images(
    pipe: Any,
    references: Sequence[np.ndarray],
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    num_inference_steps: int,
    progress: bool = False,
    desc: str = "generate",
    **options: Any,
) -> np.ndarray:
    """One image per (reference photo, prompt, seed) from an identity pipeline: ``(N, H, W, 3)`` uint8.

    Each call goes through the pipeline's own face analysis (the world detector), as ``idfusion generate`` does.
    """
    from tqdm.auto import tqdm

    images = []
    jobs = list(zip(references, prompts, seeds, strict=True))
    for reference, prompt, seed in tqdm(jobs, desc=desc, unit="image", disable=not progress):
        out = pipe(faces=[reference], prompt=prompt, seed=int(seed), num_inference_steps=num_inference_steps,
                   output_type="np", **options)  # fmt: skip
        images.append((np.clip(out.images[0], 0, 1) * 255).round().astype(np.uint8))
    return np.stack(images)


def judge_embeddings(images: Sequence[np.ndarray], detector: Any, judge: Any) -> np.ndarray:
    """``(N, 512)`` unit judge embeddings of each image's largest detected face; rows of NaN without a face."""
    out = np.full((len(images), judge.dim), np.nan)
    found = detector.detect_batch(list(images))
    rows, crops = [], []
    for n, (image, faces) in enumerate(zip(images, found, strict=True)):
        if faces:
            face = max(faces, key=lambda d: float((d.bbox[2] - d.bbox[0]) * (d.bbox[3] - d.bbox[1])))
            rows.append(n)
            crops.append(judge.preprocess(image, face.landmarks))
    if crops:
        features = judge.embed_crops(np.stack(crops)).astype(np.float64)
        out[rows] = features / np.linalg.norm(features, axis=1, keepdims=True)
    return out


def _truth_embeddings(renders: Sequence[Any], judge: Any) -> np.ndarray:
    """Unit judge embeddings of renders at their true landmarks: ``(N, 512)``."""
    crops = np.stack([judge.preprocess(r.image, r.faces[0].landmarks) for r in renders])
    features = judge.embed_crops(crops).astype(np.float64)
    return features / np.linalg.norm(features, axis=1, keepdims=True)


def identity_scores(
    generated: np.ndarray, targets: np.ndarray, references: np.ndarray, threshold: float
) -> dict[str, Any]:
    """Per-case and mean identity scores.

    Args:
        generated: ``(N, D)`` unit embeddings, NaN rows for outputs without a face.
        targets: ``(N, M, D)`` unit embeddings of each case's target renders.
        references: ``(N, D)`` unit embeddings of the reference photo each case was given (for SimRef).
        threshold: the judge's same-person threshold.

    Returns:
        ``{"per_case": {"sim_target", "sim_ref", "paste"} (N,) arrays (NaN without a face), "face_found",
        "sim_target", "sim_ref", "paste", "verified"}``.
    """
    from ..eval.metrics import paste_scores

    found = ~np.isnan(generated).any(axis=1)
    sim_target, sim_ref, paste = (np.full(len(generated), np.nan) for _ in range(3))
    for n in np.flatnonzero(found):
        scores = paste_scores(generated[n], references[n], targets[n])
        sim_target[n], sim_ref[n], paste[n] = scores.sim_target, scores.sim_ref, scores.paste
    mean = lambda values: float(np.nanmean(values)) if found.any() else float("nan")  # noqa: E731
    return {
        "per_case": {"sim_target": sim_target, "sim_ref": sim_ref, "paste": paste},
        "face_found": float(found.mean()),
        "sim_target": mean(sim_target),
        "sim_ref": mean(sim_ref),
        "paste": mean(paste),
        "verified": float(np.mean(np.nan_to_num(sim_target, nan=-1.0) >= threshold)),
    }


def paired_gap(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Mean of ``a - b`` over the cases where both are defined, its 95 % interval half-width and the count."""
    both = ~(np.isnan(a) | np.isnan(b))
    diff = (a - b)[both]
    if len(diff) < 2:
        return {"mean": float("nan"), "ci95": float("nan"), "cases": int(len(diff))}
    return {
        "mean": float(diff.mean()),
        "ci95": float(1.96 * diff.std(ddof=1) / np.sqrt(len(diff))),
        "cases": int(len(diff)),
    }


def attribute_copy(reports: Sequence[Any], references: Sequence[Any], prompts: Sequence[Any]) -> dict[str, Any]:
    """How often outputs show a prompt attribute's value from the reference photo instead of the prompt's.

    Counted over (case, attribute) pairs where the reference's value differs from the prompt's and the checker
    read the output's value (a missed face leaves its person attributes out).
    """
    hits = {name: [] for name in COPY_ATTRIBUTES}
    for report, reference, prompt in zip(reports, references, prompts, strict=True):
        for name in COPY_ATTRIBUTES:
            shown, photo = getattr(report.attributes, name), getattr(reference.attributes, name)
            if photo != getattr(prompt, name) and shown is not None:
                hits[name].append(shown == photo)
    pooled = [h for values in hits.values() for h in values]
    return {
        "rate": float(np.mean(pooled)) if pooled else float("nan"),
        "pairs": len(pooled),
        "per_attribute": {name: float(np.mean(v)) if v else float("nan") for name, v in hits.items()},
    }


def _attributes(images: np.ndarray, prompts: Sequence[Any], checker: Any) -> tuple[dict[str, float], list[Any]]:
    from .base import attribute_accuracy

    reports = checker.predict_batch(list(images))
    return attribute_accuracy(images, prompts, checker), reports


def _round(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items() if k != "per_case"}
    if isinstance(value, float):
        return None if np.isnan(value) else round(value, 5)
    return value


def evaluate_method(
    name: str,
    folder: str | os.PathLike,
    *,
    identities: int = EVAL["identities"],
    prompts: int = EVAL["prompts"],
    targets: int = EVAL["targets"],
    seed: int = EVAL["seed"],
    num_inference_steps: int = EVAL["num_inference_steps"],
    base_folder: str | os.PathLike | None = None,
    pool: str = "heldout",
    call_options: dict[str, Any] | None = None,
    progress: bool = True,
    keep_images: bool = False,
) -> dict[str, Any]:
    """The acceptance numbers of one method with world weights in ``folder`` (see the module docstring).

    Returns:
        ``{"settings", "render", "base", "method", "different_identity", "gaps"}`` (rounded, JSON-ready); with
        ``keep_images`` also ``"images"``: the uint8 outputs of the three rows. ``call_options`` are passed to
        every call of the method's pipeline (e.g. a reference strength, when choosing one on ``pool="validation"``).
    """
    from .. import registry
    from .attributes import caption
    from .backends import WorldDetector, WorldRecognizer
    from .base import generate, load_base_pipeline
    from .checkers import AttributeChecker

    start = time.time()
    data = heldout_set(identities, prompts, targets, seed, pool=pool)
    detector, judge = WorldDetector(), WorldRecognizer("world-judge")
    checker = AttributeChecker(detector=detector)
    texts = [caption(p) for p in data.prompts]
    case = np.asarray(data.case_identity)
    other = np.asarray(data.other)

    pipe = registry.load_pipeline(name, str(folder))
    pipe.configure_face_analysis(detector="world", recognizer="world")
    pipe.set_progress_bar_config(disable=True)
    steps = num_inference_steps
    refs = [r.image for r in data.references]
    options = dict(call_options or {})
    same = method_images(pipe, [refs[k] for k in case], texts, data.seeds, num_inference_steps=steps,
                         progress=progress, desc=f"{name}: same identity", **options)  # fmt: skip
    swapped = method_images(pipe, [refs[k] for k in other], texts, data.seeds, num_inference_steps=steps,
                            progress=progress, desc=f"{name}: different identity", **options)  # fmt: skip
    base = generate(load_base_pipeline(base_folder), texts, data.seeds, num_inference_steps=steps)

    reference_features = _truth_embeddings(data.references, judge)  # (I, D)
    target_features = np.stack([_truth_embeddings(t, judge) for t in data.targets])  # (I, M, D)
    fresh_features = _truth_embeddings(data.fresh, judge)
    threshold = float(judge.threshold)
    rows = {"method": same, "different_identity": swapped, "base": base}
    scores = {
        row: identity_scores(
            judge_embeddings(images, detector, judge), target_features[case], reference_features[case], threshold
        )
        for row, images in rows.items()
    }
    # the different-identity outputs against the identity they were given: do they carry *that* person?
    given = identity_scores(
        judge_embeddings(swapped, detector, judge), target_features[other], reference_features[other], threshold
    )
    scores["different_identity"]["given_identity"] = {k: given[k] for k in ("sim_target", "verified")}
    render_row = identity_scores(fresh_features, target_features, reference_features, threshold)

    for row, images in rows.items():
        accuracy, reports = _attributes(images, data.prompts, checker)
        scores[row]["attributes"] = accuracy
        scores[row]["attribute_copy"] = attribute_copy(reports, [data.references[k] for k in case], data.prompts)
    method_target = scores["method"]["per_case"]["sim_target"]
    result = {
        "settings": {
            "method": name,
            "identities": identities,
            "prompts": prompts,
            "targets": targets,
            "seed": seed,
            "pool": pool,
            "call_options": options,
            "num_inference_steps": steps,
            "judge_threshold": threshold,
            "scheduler": type(pipe.scheduler).__name__,
            "seconds": round(time.time() - start, 1),
        },
        "render": render_row,
        **scores,
        "gaps": {
            "sim_target_vs_different_identity": paired_gap(
                method_target, scores["different_identity"]["per_case"]["sim_target"]
            ),
            "sim_target_vs_base": paired_gap(method_target, scores["base"]["per_case"]["sim_target"]),
        },
    }
    rounded = _round(result)
    if keep_images:
        rounded["images"] = rows
    return rounded


def evaluate_methods(
    methods_folder: str | os.PathLike | None = None, *, only: Sequence[str] | None = None, **kwargs: Any
) -> dict[str, dict[str, Any]]:
    """:func:`evaluate_method` for every registered method with world weights (or those named in ``only``)."""
    from .demo import world_methods

    found = [(name, folder) for name, folder in world_methods(methods_folder) if not only or name in only]
    if not found:
        logger.warning("no registered method has world weights in %s", methods_folder or "the package")
    return {name: evaluate_method(name, folder, **kwargs) for name, folder in found}


def summary(result: dict[str, Any]) -> str:
    """A few lines: identity (method vs both baselines), attributes, copy-paste."""

    def number(value: float | None, sign: str = "") -> str:
        return "n/a" if value is None else f"{value:{sign}.3f}"

    lines = []
    for row in ("method", "different_identity", "base", "render"):
        values = result[row]
        line = (
            f"{row:20s} sim_target {number(values['sim_target'])}  verified {number(values['verified'])}  "
            f"face {number(values['face_found'])}  paste {number(values['paste'], '+')}"
        )
        if "attributes" in values:
            line += (
                f"  attributes {number(values['attributes']['mean'])}"
                f"  attribute_copy {number(values['attribute_copy']['rate'])}"
            )
        lines.append(line)
    for key, gap in result["gaps"].items():
        lines.append(f"{key:36s} {number(gap['mean'], '+')} +- {number(gap['ci95'])} ({gap['cases']} cases)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m idfusion.world.evaluate_methods", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--method", action="append", help="only this method (repeatable; default: all with weights)")
    parser.add_argument("--methods-folder", type=Path, help="world method weights (default: the shipped ones)")
    for key, value in EVAL.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=value)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--write-manifest", action="store_true", help="record the numbers in weights/MANIFEST.json")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch

    torch.set_num_threads(args.threads)
    results = evaluate_methods(
        args.methods_folder,
        only=args.method,
        **{key: getattr(args, key) for key in EVAL},
        progress=not args.no_progress,
    )
    for name, result in results.items():
        print(f"== {name}\n{summary(result)}")  # noqa: T201 - the command's report
        if args.write_manifest:
            from .train_method import record_metrics

            words = argv if argv is not None else sys.argv[1:]
            record_metrics(name, result, "python -m idfusion.world.evaluate_methods " + " ".join(words))
    print(json.dumps(results, indent=1))  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
