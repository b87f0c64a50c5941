"""Measurements of the world face models on renders of held-out identities.

- :func:`evaluate_recognizers`: verification accuracy on same / different identity pairs, with the similarity
  threshold chosen on pairs of training identities and applied to held-out ones.
- :func:`evaluate_detector`: recall, precision (IoU >= 0.5) and landmark error (normalised by the inter-ocular
  distance) on single faces and 2-3 person scenes, and false detections on faceless images.
- :func:`evaluate_attributes`: per-attribute accuracy of the checker, on clean and on degraded renders.

Evaluation image seeds start at :data:`EVAL_IMAGE_SEED`, far above the seeds the training uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from .identity import HELDOUT_IDENTITIES, TRAIN_IDENTITIES
from .renderer import degrade, render, render_scene

__all__ = [
    "EVAL_IMAGE_SEED",
    "THRESHOLD_IDENTITIES",
    "verification_pairs",
    "best_threshold",
    "evaluate_recognizers",
    "match_detections",
    "evaluate_detector",
    "faceless_images",
    "evaluate_attributes",
]

EVAL_IMAGE_SEED = 50_000_000
# Training identities that no shipped model trained on: thresholds are chosen on them.
THRESHOLD_IDENTITIES = TRAIN_IDENTITIES[9_000:10_000]


def verification_pairs(
    identities: Sequence[int], pairs: int = 6000, seed: int = 0
) -> list[tuple[tuple[int, int], tuple[int, int], bool]]:
    """Half same-identity, half different-identity pairs of ``(identity, image seed)`` renders."""
    rng = np.random.default_rng([0xE7, int(seed)])
    ids = np.asarray(identities)
    out = []
    for k in range(pairs):
        same = k < pairs // 2
        a = int(rng.choice(ids))
        b = a if same else int(rng.choice(ids[ids != a]))
        seed_a, seed_b = (int(s) for s in EVAL_IMAGE_SEED + seed * 100_000 + rng.choice(100_000, 2, replace=False))
        out.append(((a, seed_a), (b, seed_b), same))
    return out


def best_threshold(similarities: np.ndarray, same: np.ndarray) -> float:
    """The similarity threshold that maximises verification accuracy (midpoint between neighbouring scores)."""
    order = np.argsort(similarities)
    sims, labels = similarities[order], same[order].astype(np.int64)
    # Threshold below sims[k]: pairs k.. are called same. Accuracy = different below + same at or above.
    below_diff = np.concatenate([[0], np.cumsum(1 - labels)])
    above_same = np.concatenate([np.cumsum(labels[::-1])[::-1], [0]])
    accuracy = below_diff + above_same  # (N + 1,)
    k = int(np.argmax(accuracy))
    if k == 0:
        return float(sims[0] - 1e-6)
    if k == len(sims):
        return float(sims[-1] + 1e-6)
    return float((sims[k - 1] + sims[k]) / 2)


# Verification renders are reused across recognizers and alignment variants within one process (about 12 kB each).
_cached_render = lru_cache(maxsize=30_000)(render)


def _pair_similarities(recognizers: dict, pairs, size: int, use_detector) -> dict[str, np.ndarray]:
    keys = sorted({p[0] for p in pairs} | {p[1] for p in pairs})
    index = {key: n for n, key in enumerate(keys)}
    crops: dict[str, list[np.ndarray]] = {name: [] for name in recognizers}
    for identity, image_seed in keys:
        result = _cached_render(identity, image_seed, size=size)
        landmarks = result.faces[0].landmarks
        if use_detector is not None:
            found = use_detector.detect(result.image)
            landmarks = found[0].landmarks if found else landmarks  # a miss falls back to the truth (counted apart)
        for name, recognizer in recognizers.items():
            crops[name].append(recognizer.preprocess(result.image, landmarks))
    out = {}
    for name, recognizer in recognizers.items():
        embeddings = recognizer.embed_crops(np.stack(crops[name]))
        embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
        a = np.array([index[p[0]] for p in pairs])
        b = np.array([index[p[1]] for p in pairs])
        out[name] = np.sum(embeddings[a] * embeddings[b], axis=1)
    return out


def evaluate_recognizers(
    recognizers: dict,
    pairs: int = 6000,
    *,
    seed: int = 0,
    size: int = 64,
    threshold_pairs: int | None = None,
    thresholds: dict[str, float] | None = None,
    detector=None,
) -> dict[str, dict[str, float]]:
    """Verification accuracy of each recognizer on held-out identity pairs.

    Args:
        recognizers: name -> :class:`~idfusion.world.backends.WorldRecognizer` (all see the same renders).
        pairs: number of held-out pairs (half same identity).
        seed: pair sampling seed.
        size: render size.
        threshold_pairs: number of training-identity pairs the threshold is chosen on (default: ``pairs``).
        thresholds: name -> a threshold chosen before (e.g. the one stored with the weights); skips the
            training-identity pairs for those recognizers.
        detector: align with this detector's landmarks instead of the ground truth.

    Returns:
        name -> ``{"accuracy", "threshold", "same_mean", "different_mean"}``, plus ``"train_accuracy"`` (on the
        training-identity pairs) when the threshold was chosen here.
    """
    thresholds = dict(thresholds or {})
    test = verification_pairs(HELDOUT_IDENTITIES, pairs, seed=seed)
    test_sims = _pair_similarities(recognizers, test, size, detector)
    test_same = np.array([p[2] for p in test])
    results: dict[str, dict[str, float]] = {name: {} for name in recognizers}
    tuned = {name: r for name, r in recognizers.items() if name not in thresholds}
    if tuned:
        tune = verification_pairs(THRESHOLD_IDENTITIES, threshold_pairs or pairs, seed=seed + 1)
        tune_sims = _pair_similarities(tuned, tune, size, detector)
        tune_same = np.array([p[2] for p in tune])
        for name in tuned:
            thresholds[name] = best_threshold(tune_sims[name], tune_same)
            results[name]["train_accuracy"] = float(np.mean((tune_sims[name] >= thresholds[name]) == tune_same))
    for name in recognizers:
        results[name].update(
            accuracy=float(np.mean((test_sims[name] >= thresholds[name]) == test_same)),
            threshold=float(thresholds[name]),
            same_mean=float(test_sims[name][test_same].mean()),
            different_mean=float(test_sims[name][~test_same].mean()),
        )
    return results


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match_detections(truths: list, detections: list, iou: float = 0.5) -> list[tuple[int, int]]:
    """Greedy one-to-one matches ``(truth index, detection index)`` by decreasing score with IoU >= ``iou``."""
    matches, used = [], set()
    for d in sorted(range(len(detections)), key=lambda k: -detections[k].score):
        best, best_iou = None, iou
        for t, truth in enumerate(truths):
            if t in used:
                continue
            overlap = _iou(np.asarray(truth.bbox), np.asarray(detections[d].bbox))
            if overlap >= best_iou:
                best, best_iou = t, overlap
        if best is not None:
            used.add(best)
            matches.append((best, d))
    return matches


def faceless_images(count: int, seed: int = 0, size: int = 64) -> list[np.ndarray]:
    """Images with no face: plain colours, uniform and Gaussian noise, smooth noise, and empty world backgrounds."""
    import cv2

    rng = np.random.default_rng([0xF0, int(seed)])
    images = []
    for k in range(count):
        kind = k % 5
        if kind == 0:
            image = np.broadcast_to(rng.integers(0, 256, 3), (size, size, 3))
        elif kind == 1:
            image = rng.integers(0, 256, (size, size, 3))
        elif kind == 2:
            image = rng.normal(rng.uniform(60, 200), rng.uniform(10, 60), (size, size, 3))
        elif kind == 3:
            coarse = rng.uniform(0, 255, (int(rng.integers(3, 12)),) * 2 + (3,)).astype(np.float32)
            image = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
        else:
            from .attributes import sample_attributes
            from .renderer import _background, sample_lighting

            attributes = sample_attributes(rng)
            side = size * 4
            image = _background(attributes, sample_lighting(rng), side, size)
            image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
        images.append(np.clip(image, 0, 255).astype(np.uint8))
    return images


def evaluate_detector(detector, *, seed: int = 0, counts: dict[str, int] | None = None) -> dict[str, float]:
    """Detection recall / precision and landmark errors on held-out renders, and false positives on faceless images.

    Args:
        detector: an object with ``detect(image)`` (and optionally ``detect_batch(images)``).
        seed: evaluation seed.
        counts: images per set: ``single64``, ``single128``, ``scene64``, ``scene128``, ``faceless``.

    Returns:
        Flat metrics: ``<set>_recall``, ``<set>_precision``, ``<set>_nme5`` (mean 5-point error over the
        inter-ocular distance), ``<set>_nme68``, ``<set>_px5`` (mean 5-point error in pixels), and
        ``faceless_false_positives`` (detections on faceless images) with ``faceless_images``.
    """
    counts = {"single64": 600, "single128": 200, "scene64": 300, "scene128": 100, "faceless": 500, **(counts or {})}
    ids = np.asarray(HELDOUT_IDENTITIES)
    rng = np.random.default_rng([0xD7, int(seed)])
    base = EVAL_IMAGE_SEED + 7_000_000 + seed * 100_000
    batch = getattr(detector, "detect_batch", None) or (lambda images: [detector.detect(i) for i in images])
    metrics: dict[str, float] = {}
    for name in ("single64", "single128", "scene64", "scene128"):
        size = 128 if name.endswith("128") else 64
        renders = []
        for k in range(counts[name]):
            if name.startswith("single"):
                renders.append(render(int(rng.choice(ids)), base + k, size=size))
            else:
                people = int(rng.integers(2, 4))
                chosen = [int(i) for i in rng.choice(ids, people, replace=False)]
                renders.append(render_scene(chosen, base + k, size=size))
        found = batch([r.image for r in renders])
        truths = predictions = matched = 0
        errors5, errors68, pixels5 = [], [], []
        for result, detections in zip(renders, found, strict=True):
            truths += len(result.faces)
            predictions += len(detections)
            for t, d in match_detections(result.faces, detections):
                matched += 1
                truth, det = result.faces[t], detections[d]
                iod = float(np.linalg.norm(truth.landmarks[0] - truth.landmarks[1]))
                err5 = np.linalg.norm(det.landmarks - truth.landmarks, axis=1)
                errors5.append(err5.mean() / iod)
                pixels5.append(err5.mean())
                if det.dense_landmarks is not None:
                    errors68.append(np.linalg.norm(det.dense_landmarks - truth.dense_landmarks, axis=1).mean() / iod)
        metrics[f"{name}_recall"] = matched / max(truths, 1)
        metrics[f"{name}_precision"] = matched / max(predictions, 1)
        metrics[f"{name}_nme5"] = float(np.mean(errors5)) if errors5 else float("nan")
        metrics[f"{name}_nme68"] = float(np.mean(errors68)) if errors68 else float("nan")
        metrics[f"{name}_px5"] = float(np.mean(pixels5)) if pixels5 else float("nan")
    faceless = faceless_images(counts["faceless"], seed=seed)
    metrics["faceless_images"] = len(faceless)
    metrics["faceless_false_positives"] = int(sum(len(d) for d in batch(faceless)))
    return metrics


class _Box:
    def __init__(self, bbox: np.ndarray) -> None:
        self.bbox, self.score = bbox, 1.0


def evaluate_attributes(
    checker, count: int = 1500, *, scenes: int = 300, seed: int = 0, degraded: bool = False, size: int = 64
) -> dict[str, dict[str, float]]:
    """Per-attribute accuracy of an :class:`~idfusion.world.checkers.AttributeChecker` on held-out renders.

    Faces are found by the checker's detector (end to end); a missed face counts as wrong for every person
    attribute. ``degraded`` blurs (0.8 px), noises (sigma 6) and JPEG-compresses (quality 50) every image first.

    Returns:
        ``{"all": {...}, "single": {...}, "scene": {...}}``: per group of images (all, one person, 2-3 people),
        ``<attribute>`` -> accuracy (person attributes over faces, scene attributes over images) and ``people``
        (the number of faces found equals the number drawn).
    """
    ids = np.asarray(HELDOUT_IDENTITIES)
    rng = np.random.default_rng([0xA0, int(seed)])
    base = EVAL_IMAGE_SEED + 9_000_000 + seed * 100_000
    renders = [render(int(rng.choice(ids)), base + k, size=size) for k in range(count)]
    for k in range(scenes):
        chosen = [int(i) for i in rng.choice(ids, int(rng.integers(2, 4)), replace=False)]
        renders.append(render_scene(chosen, base + count + k, size=size))
    images = [degrade(r.image, base + k) if degraded else r.image for k, r in enumerate(renders)]
    names = ("background", "pattern", "hat", "glasses", "clothing", "expression", "people")
    correct: dict[str, dict[str, list[bool]]] = {group: {n: [] for n in names} for group in ("single", "scene")}
    reports = []
    for start in range(0, len(images), 256):
        reports += checker.predict_batch(images[start : start + 256])
    for result, report in zip(renders, reports, strict=True):
        truth = result.attributes
        group = correct["single" if len(result.faces) == 1 else "scene"]
        for name in ("background", "pattern"):
            group[name].append(getattr(report.attributes, name) == getattr(truth, name))
        group["people"].append(len(report.faces) == len(result.faces))
        # Faces are matched to the drawn ones by box overlap; a drawn face without a match counts as wrong.
        matched = dict(match_detections(result.faces, [_Box(b) for b in report.boxes]))
        for k in range(len(result.faces)):
            predicted = report.faces[matched[k]] if k in matched else {}
            for name in ("hat", "glasses", "clothing", "expression"):
                group[name].append(predicted.get(name) == getattr(truth, name))
    out = {"all": {n: float(np.mean(correct["single"][n] + correct["scene"][n])) for n in names}}
    for group, values in correct.items():
        if values["people"]:
            out[group] = {n: float(np.mean(v)) for n, v in values.items()}
    return out
