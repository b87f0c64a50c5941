"""Train the world face models on renders of training identities and record them in ``MANIFEST.json``.

    python -m idfusion.world.train_faces --out src/idfusion/world/weights --seed 0
    python -m idfusion.world.train_faces --out /tmp/weights --seed 0 --only detector,attributes

Each model trains from its own renders (training identities only, image seeds below the evaluation range), then
is measured on held-out identities (:mod:`idfusion.world.evaluate`); the manifest records, per file, the command,
seed, sha256, training time, full metrics and the small "check" metrics the tests reproduce. The attribute
checker is measured end to end with the detector in ``--out``, so train the detector first (the default order).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .attributes import ATTRIBUTE_VALUES
from .backends import _to_tensor
from .crops import attribute_face_crop, context_crop, detector_input, recognizer_crop, scene_input
from .evaluate import evaluate_attributes, evaluate_detector, evaluate_recognizers, faceless_images
from .identity import TRAIN_IDENTITIES
from .renderer import Render, degrade, render, render_scene

__all__ = ["MODELS", "RECIPES", "train_detector", "train_recognizer", "train_attributes", "main"]

logger = logging.getLogger(__name__)

MODELS = ("detector", "world", "world-judge", "attributes")
MANIFEST = "MANIFEST.json"
MANIFEST_DESCRIPTION = (
    "World face models (idfusion.world), trained only on world training identities (seeds 0-9,999) by "
    "python -m idfusion.world.train_faces. 'metrics' are measured on held-out identities (seeds from 1,000,000) by "
    "idfusion.world.evaluate: recognizers on 6,000 pairs (3,000 same identity), threshold chosen on 6,000 pairs of "
    "training identities 9,000-9,999 that no model trained on; the detector on 1,200 renders (single faces and 2-3 "
    "person scenes, 64 and 128 px) and 500 faceless images; the attribute checker end to end (world detector) on "
    "1,500 renders + 300 scenes, clean and degraded (blur 0.8 px, noise 6, JPEG 50). 'check' is the smaller set the "
    "tests reproduce (check_config). The base/ files and the 'base' entry (the world base model) are written by "
    "python -m idfusion.world.train_base."
)
# The tests reproduce these exact measurements from the shipped files ("check" in the manifest).
CHECK_CONFIG = {
    "recognizer_pairs": 600,
    "detector_counts": {"single64": 100, "single128": 30, "scene64": 50, "scene128": 20, "faceless": 100},
    "attribute_images": 150,
    "attribute_scenes": 30,
}


@dataclass(frozen=True)
class RecognizerRecipe:
    identities: tuple[int, int]  # a slice [start, stop) of TRAIN_IDENTITIES
    images_per_identity: int
    widths: tuple[int, ...]
    blocks: tuple[int, ...]
    epochs: int
    batch_size: int = 256
    lr: float = 3e-3
    margin: float = 0.4
    scale: float = 32.0
    landmark_jitter: float = 0.07  # per-point noise in inter-ocular distances, about the detector's error
    seed_offset: int = 0


@dataclass(frozen=True)
class DetectorRecipe:
    images: int = 8_000
    epochs: int = 8
    batch_size: int = 64
    lr: float = 3e-3
    width: int = 32
    proposal_threshold: float = 0.1
    refine_epochs: int = 6
    refine_batch_size: int = 128
    bootstrap_images: int = 4000


@dataclass(frozen=True)
class AttributeRecipe:
    images: int = 6_000
    scenes: int = 1_500
    epochs: int = 10
    batch_size: int = 128
    lr: float = 3e-3
    width: int = 24


RECIPES = {
    "detector": DetectorRecipe(),
    # The two recognizers differ in identities, seed, crop (see crops.py), width and depth.
    "world": RecognizerRecipe((0, 1500), 10, widths=(24, 48, 96, 128), blocks=(1, 1, 1, 1), epochs=10),
    "world-judge": RecognizerRecipe(
        (4000, 5500), 10, widths=(32, 48, 80, 128), blocks=(0, 1, 2, 1), epochs=10, seed_offset=1
    ),
    "attributes": AttributeRecipe(),
}
_TRAIN_IMAGE_SEED = 1_000_000  # training renders use image seeds from here; evaluation starts at 50,000,000


def _torch(seed: int):
    import torch

    torch.manual_seed(seed)
    return torch


def _random_degrade(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return degrade(
        image,
        int(rng.integers(1 << 31)),
        blur=float(rng.uniform(0.2, 1.3)),
        noise=float(rng.uniform(0, 10)),
        jpeg=int(rng.choice([0, int(rng.integers(30, 90))])),
    )


def _cosine_lr(optimizer, step: int, total: int, base: float, warmup: int) -> None:
    lr = base * min(1.0, (step + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(step / total, 1.0)))
    for group in optimizer.param_groups:
        group["lr"] = lr


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Detector
# ----------------------------------------------------------------------------------------------------------------

Faces = list[tuple[np.ndarray, np.ndarray, np.ndarray]]  # per face: bbox (4,), landmarks (5, 2), dense (68, 2)


def _truth(result: Render, pad: int = 0) -> Faces:
    return [(f.bbox + pad, f.landmarks + pad, f.dense_landmarks + pad) for f in result.faces]


def _fit(image: np.ndarray, faces: Faces) -> tuple[np.ndarray, Faces]:
    """An image fitted into the 64x64 proposal input, with its faces in input pixels."""
    fitted, scale = detector_input(image)

    def to_input(p: np.ndarray) -> np.ndarray:
        return (p + 0.5) * scale - 0.5

    return fitted, [(to_input(b), to_input(lm), to_input(d)) for b, lm, d in faces]


def detector_samples(count: int, seed: int, progress: bool = True) -> list[tuple[np.ndarray, Faces]]:
    """Training images for the detector with their faces, in the image's own pixels.

    A mix of single faces (64 and 128), 2-3 person scenes, renders padded with a border (as FaceAnalyzer retries
    undetected images), and faceless images (plain, noise, empty backgrounds); 40% are degraded.
    """
    from tqdm.auto import tqdm

    rng = np.random.default_rng([0xDA, seed])
    pool = np.asarray(TRAIN_IDENTITIES[:8000])
    samples = []
    for k in tqdm(range(count), desc="detector renders", unit="image", disable=not progress):
        image_seed = _TRAIN_IMAGE_SEED + seed * 100_000 + k
        kind = rng.uniform()
        size = 128 if rng.uniform() < 0.2 else 64
        if kind < 0.25:
            image, faces = faceless_images(1, seed=int(rng.integers(1 << 31)), size=size)[0], []
        else:
            if kind < 0.62:
                result = render(int(rng.choice(pool)), image_seed, size=size)
            else:
                people = int(rng.integers(2, 4))
                result = render_scene([int(i) for i in rng.choice(pool, people, replace=False)], image_seed, size=size)
            pad = int(rng.integers(4, size // 3)) if rng.uniform() < 0.15 else 0
            image = result.image
            if pad:
                fill = 0 if rng.uniform() < 0.6 else rng.integers(0, 256, 3)
                image = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
                inner = image[pad:-pad, pad:-pad].copy()
                image[:] = fill
                image[pad:-pad, pad:-pad] = inner
            faces = _truth(result, pad)
        if rng.uniform() < 0.4:
            image = _random_degrade(image, rng)
        samples.append((image, faces))
    return samples


def _proposal_targets(batch_faces: list[Faces], grid: int, stride: int):
    """Heatmaps ``(B, grid, grid)`` and box targets ``(B, 4, grid, grid)`` with their mask ``(B, grid, grid)``."""
    b = len(batch_faces)
    heat = np.zeros((b, grid, grid), np.float32)
    reg = np.zeros((b, 4, grid, grid), np.float32)
    mask = np.zeros((b, grid, grid), np.float32)
    ys, xs = np.mgrid[:grid, :grid]
    for n, faces in enumerate(batch_faces):
        for box, _, _ in faces:
            w, h = box[2] - box[0], box[3] - box[1]
            center = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])
            cell = (center + 0.5) / stride  # continuous cell coordinates
            ci, cj = int(np.clip(cell[1], 0, grid - 1)), int(np.clip(cell[0], 0, grid - 1))
            sigma = float(np.clip(0.12 * w / stride, 0.5, 2.0))
            heat[n] = np.maximum(heat[n], np.exp(-((xs - cj) ** 2 + (ys - ci) ** 2) / (2 * sigma**2)))
            # Every cell of the 3x3 block around the centre learns the box, so an off-centre peak still decodes.
            for i in range(max(ci - 1, 0), min(ci + 2, grid)):
                for j in range(max(cj - 1, 0), min(cj + 2, grid)):
                    origin = np.array([(j + 0.5) * stride - 0.5, (i + 0.5) * stride - 0.5])
                    reg[n, 0:2, i, j] = np.log([w / 64, h / 64])
                    reg[n, 2:4, i, j] = (center - origin) / w
                    mask[n, i, j] = 1.0
    return heat, reg, mask


def _proposal_loss(torch, out, heat, reg, mask):
    F = torch.nn.functional
    prob = torch.sigmoid(out[:, 0]).clamp(1e-4, 1 - 1e-4)
    pos = (heat > 0.999).float()
    # CenterNet's penalty-reduced focal loss (alpha 2, beta 4).
    pos_loss = -(torch.log(prob) * (1 - prob) ** 2 * pos).sum()
    neg_loss = -(torch.log(1 - prob) * prob**2 * (1 - heat) ** 4 * (1 - pos)).sum()
    focal = (pos_loss + neg_loss) / pos.sum().clamp(min=1)
    l1 = F.smooth_l1_loss(out[:, 1:], reg, reduction="none", beta=0.05).mean(1)
    regression = (l1 * mask).sum() / mask.sum().clamp(min=1)
    return focal + 2.0 * regression, focal


def _box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one ``(4,)`` box with ``(K, 4)`` boxes."""
    if len(boxes) == 0:
        return np.zeros(0)
    w = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    h = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = w * h
    area = (box[2] - box[0]) * (box[3] - box[1])
    return inter / (area + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) - inter)


def _refine_examples(samples, proposals, rng: np.random.Generator, margin: float, side: int):
    """One epoch of refine-stage crops: jittered true boxes (faces), stage-1 false proposals and random boxes
    (not faces). Returns crops, score labels (1 face, 0 not, -1 ignore), regression targets and their mask."""
    from .crops import refine_crop, refine_square

    crops, labels, targets, mask = [], [], [], []
    for (image, faces), image_proposals in zip(samples, proposals, strict=True):
        truth = np.array([f[0] for f in faces]).reshape(-1, 4)
        image_side = image.shape[0]
        candidates = []
        for box in truth:
            w, h = box[2] - box[0], box[3] - box[1]
            center = (box[:2] + box[2:]) / 2 + rng.normal(0, 0.1, 2) * [w, h]
            half = np.array([w, h]) / 2 * np.exp(rng.normal(0, 0.15))
            candidates.append(np.concatenate([center - half, center + half]))
        for box in image_proposals[:, :4]:
            if len(truth) == 0 or _box_iou(box, truth).max() < 0.3:
                candidates.append(box)  # a hard negative: stage 1 thought it was a face
        # Random squares: one per image with faces, four per faceless image (noise that looks like a face is rare,
        # so the verifier needs many looks at noise).
        for _ in range(1 if len(truth) else 4):
            length = rng.uniform(0.12, 0.9) * image_side
            corner = rng.uniform(-0.1 * image_side, image_side - 0.9 * length, 2)
            candidates.append(np.concatenate([corner, corner + length * np.exp(rng.normal(0, 0.15, 2))]))
        for box in candidates:
            overlaps = _box_iou(box, truth)
            best = int(overlaps.argmax()) if len(overlaps) else -1
            iou = overlaps[best] if best >= 0 else 0.0
            square = refine_square(box, margin)
            crops.append(refine_crop(image, square, side))
            labels.append(1.0 if iou >= 0.5 else 0.0 if iou < 0.3 else -1.0)
            target = np.zeros(150, np.float32)
            if iou >= 0.3:
                b, lm5, lm68 = faces[best]
                points = np.concatenate([b.reshape(2, 2), lm5, lm68])  # (75, 2)
                target = ((points - square[:2]) / square[2]).reshape(150)
            targets.append(target)
            mask.append(float(iou >= 0.3))
    return np.stack(crops), np.array(labels, np.float32), np.stack(targets), np.array(mask, np.float32)


def _choose_threshold(detector, seed: int) -> dict:
    """Score threshold from observed scores: faces of training identities vs. faceless images and background."""
    from .evaluate import match_detections

    images, truths = [], []
    rng = np.random.default_rng([0x7E, seed])
    pool = np.asarray(TRAIN_IDENTITIES[8000:9000])
    for k in range(400):
        image_seed = _TRAIN_IMAGE_SEED + 900_000 + k
        size = 128 if k % 5 == 0 else 64
        if k % 2:
            people = int(rng.integers(2, 4))
            result = render_scene([int(i) for i in rng.choice(pool, people, replace=False)], image_seed, size=size)
        else:
            result = render(int(rng.choice(pool)), image_seed, size=size)
        images.append(result.image if k % 3 else _random_degrade(result.image, rng))
        truths.append(result.faces)
    faceless = faceless_images(400, seed=seed + 1000)
    proposals = detector.propose(images)
    proposal_hits = sum(
        len(match_detections(t, [_Box(p) for p in props])) for t, props in zip(truths, proposals, strict=True)
    )
    saved = detector.score_threshold
    detector.score_threshold = 0.001
    found = detector.detect_batch(images + faceless)
    detector.score_threshold = saved
    positives, negatives = [], []
    for faces, detections in zip(truths + [[]] * len(faceless), found, strict=True):
        matched = {d for _, d in match_detections(faces, detections)}
        for d, det in enumerate(detections):
            (positives if d in matched else negatives).append(det.score)
    if not positives:
        raise RuntimeError("the trained detector finds no face at all; training failed (too few steps?)")
    low_positive = float(np.quantile(positives, 0.002))
    high_negative = float(max(negatives, default=0.001))

    def logit(p: float) -> float:
        p = min(max(p, 1e-4), 1 - 1e-4)
        return float(np.log(p / (1 - p)))

    # Midway, in logit space, between the strongest false detection and the weakest faces.
    threshold = 1 / (1 + np.exp(-(logit(high_negative) + logit(low_positive)) / 2))
    return {
        "score_threshold": round(float(threshold), 4),
        "proposal_threshold": detector.proposal_threshold,
        "observed_proposal_recall": round(proposal_hits / sum(len(t) for t in truths), 4),
        "observed_face_score_p0.2": round(low_positive, 4),
        "observed_face_score_min": round(float(min(positives)), 4),
        "observed_false_score_max": round(high_negative, 4),
        "observed_faces": len(positives),
        "observed_false_candidates": len(negatives),
    }


class _Box:
    def __init__(self, row: np.ndarray) -> None:
        self.bbox, self.score = row[:4], float(row[4]) if len(row) > 4 else 1.0


def _train_refine(torch, net, samples, proposals, epochs, lr, recipe, rng, progress, desc) -> None:
    from tqdm.auto import tqdm

    net.train()
    optimizer = torch.optim.AdamW(net.refine.parameters(), lr=lr, weight_decay=1e-4)
    examples = _refine_examples(samples, proposals, rng, net.refine_margin, net.refine_side)
    steps_per_epoch = len(examples[0]) // recipe.refine_batch_size
    total = steps_per_epoch * epochs
    bar = tqdm(total=total, desc=f"detector {desc}", unit="step", disable=not progress)
    weights = torch.ones(150)
    weights[:14] = 3.0  # the box and the 5 alignment landmarks matter most
    for step in range(total):
        if step and step % steps_per_epoch == 0:  # fresh jitter and random boxes every epoch
            examples = _refine_examples(samples, proposals, rng, net.refine_margin, net.refine_side)
        if step % steps_per_epoch == 0:
            order = rng.permutation(len(examples[0]))
        k = step % steps_per_epoch
        idx = order[k * recipe.refine_batch_size : (k + 1) * recipe.refine_batch_size]
        crops, labels, targets, mask = (torch.from_numpy(a[idx]) for a in examples)
        out = net.refine(_to_tensor(crops.numpy()))
        known = labels >= 0
        score_loss = torch.nn.functional.binary_cross_entropy_with_logits(out[known, 0], labels[known])
        l1 = torch.nn.functional.smooth_l1_loss(out[:, 1:], targets, reduction="none", beta=0.02) * weights
        regression = (l1.mean(1) * mask).sum() / mask.sum().clamp(min=1)
        loss = score_loss + 20.0 * regression
        _cosine_lr(optimizer, step, total, lr, warmup=50)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        bar.update()
        bar.set_postfix(score=f"{score_loss.item():.3f}", reg=f"{regression.item():.4f}")
    bar.close()


def train_detector(out: Path, seed: int, progress: bool = True) -> dict:
    """Train and save ``detector.safetensors``; returns its manifest entry (without metrics)."""
    from tqdm.auto import tqdm

    from .backends import WorldDetector
    from .nets import DETECTOR_STRIDE, DetectorNet, save_net

    recipe: DetectorRecipe = RECIPES["detector"]
    torch = _torch(seed * 100 + 7)
    start = time.time()
    samples = detector_samples(recipe.images, seed, progress)
    fitted = [_fit(image, faces) for image, faces in samples]
    inputs = np.stack([f[0] for f in fitted])
    net = DetectorNet(recipe.width)
    rng = np.random.default_rng([0xDB, seed])

    # Stage 1: proposals on the 64x64 input.
    optimizer = torch.optim.AdamW(net.proposal.parameters(), lr=recipe.lr, weight_decay=1e-4)
    steps_per_epoch = len(inputs) // recipe.batch_size
    total = steps_per_epoch * recipe.epochs
    bar = tqdm(total=total, desc="detector proposals", unit="step", disable=not progress)
    for step in range(total):
        if step % steps_per_epoch == 0:
            order = rng.permutation(len(inputs))
        k = step % steps_per_epoch
        idx = order[k * recipe.batch_size : (k + 1) * recipe.batch_size]
        heat, reg, mask = _proposal_targets([fitted[i][1] for i in idx], 16, DETECTOR_STRIDE)
        _cosine_lr(optimizer, step, total, recipe.lr, warmup=100)
        loss, focal = _proposal_loss(
            torch, net.proposal(_to_tensor(inputs[idx])), *(torch.from_numpy(a) for a in (heat, reg, mask))
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        bar.update()
        bar.set_postfix(focal=f"{focal.item():.3f}", loss=f"{loss.item():.3f}")
    bar.close()

    # Stage 2: score and landmarks on crops around jittered faces, stage-1 false proposals and random boxes.
    path = out / "detector.safetensors"
    save_net(net.eval(), path, extra={"proposal_threshold": recipe.proposal_threshold})
    detector = WorldDetector(path)
    proposals = []
    for begin in range(0, len(samples), 512):
        proposals += detector.propose([s[0] for s in samples[begin : begin + 512]], threshold=0.05)
    _train_refine(torch, net, samples, proposals, recipe.refine_epochs, recipe.lr, recipe, rng, progress, "refine")

    # Bootstrap (Sung & Poggio 1998): the refine stage's own false detections on fresh faceless images become extra
    # negatives for a short second round, replicated so they are not drowned by the ordinary examples.
    save_net(net.eval(), path, extra={"proposal_threshold": recipe.proposal_threshold})
    detector = WorldDetector(path, score_threshold=0.2)
    pool = faceless_images(recipe.bootstrap_images, seed=seed + 77)
    found = detector.detect_batch(pool)
    hard = [(image, []) for image, dets in zip(pool, found, strict=True) if dets]
    hard_boxes = [np.array([[*d.bbox, d.score] for d in dets], np.float32) for dets in found if dets]
    logger.info("bootstrap: %d of %d faceless images had false detections", len(hard), len(pool))
    extra = (hard * 10, hard_boxes * 10)
    _train_refine(
        torch, net, samples + extra[0], proposals + extra[1], 2, recipe.lr / 3, recipe, rng, progress, "bootstrap"
    )
    save_net(net.eval(), path, extra={"proposal_threshold": recipe.proposal_threshold})
    threshold = _choose_threshold(WorldDetector(path), seed)
    save_net(net, path, extra=threshold)
    return {"train_seconds": round(time.time() - start, 1), "recipe": asdict(recipe), "threshold": threshold}


# ----------------------------------------------------------------------------------------------------------------
# Recognizers
# ----------------------------------------------------------------------------------------------------------------


def recognizer_samples(recipe: RecognizerRecipe, seed: int, progress: bool = True):
    """Renders of the recipe's identities: a list of images, their 5 landmarks and integer labels."""
    from tqdm.auto import tqdm

    rng = np.random.default_rng([0xCE, seed, recipe.seed_offset])
    ids = TRAIN_IDENTITIES[recipe.identities[0] : recipe.identities[1]]
    images, landmarks, labels = [], [], []
    jobs = [(label, identity, k) for label, identity in enumerate(ids) for k in range(recipe.images_per_identity)]
    for label, identity, k in tqdm(jobs, desc="recognizer renders", unit="image", disable=not progress):
        size = 128 if rng.uniform() < 0.25 else 64
        result = render(identity, _TRAIN_IMAGE_SEED + seed * 100_000 + recipe.seed_offset * 1000 + k, size=size)
        image = _random_degrade(result.image, rng) if rng.uniform() < 0.3 else result.image
        images.append(image)
        landmarks.append(result.faces[0].landmarks)
        labels.append(label)
    return images, np.stack(landmarks), np.array(labels)


def train_recognizer(kind: str, out: Path, seed: int, progress: bool = True) -> dict:
    """Train and save the ``"world"`` or ``"world-judge"`` recognizer; returns its manifest entry (without metrics)."""
    from tqdm.auto import tqdm

    from .backends import WEIGHT_FILES
    from .crops import RECOGNIZER_CROPS
    from .nets import ArcMarginLoss, RecognizerNet, save_net

    recipe: RecognizerRecipe = RECIPES[kind]
    torch = _torch(seed * 100 + 11 + recipe.seed_offset)
    start = time.time()
    images, landmarks, labels = recognizer_samples(recipe, seed, progress)
    side = RECOGNIZER_CROPS[kind][0]
    net = RecognizerNet(recipe.widths, recipe.blocks, crop=side)
    head = ArcMarginLoss(512, int(labels.max()) + 1, scale=recipe.scale, margin=recipe.margin)
    optimizer = torch.optim.AdamW(
        [{"params": net.parameters(), "weight_decay": 5e-4}, {"params": head.parameters(), "weight_decay": 0.0}],
        lr=recipe.lr,
    )
    rng = np.random.default_rng([0xCF, seed, recipe.seed_offset])
    iod = np.linalg.norm(landmarks[:, 0] - landmarks[:, 1], axis=1)  # (N,)
    detected, detector_sha = _detected_landmarks(out, images, landmarks)
    steps_per_epoch = len(images) // recipe.batch_size
    total = steps_per_epoch * recipe.epochs
    bar = tqdm(total=total, desc=kind, unit="step", disable=not progress)
    step = 0
    for _ in range(recipe.epochs):
        # Each epoch, half the crops are aligned on the world detector's landmarks (what the recognizer gets from
        # FaceAnalyzer on a generated image: its mouth corners lag behind the expression) and half on the truth
        # with fresh noise of about the detector's size, so it serves both.
        jitter = rng.normal(0, recipe.landmark_jitter, landmarks.shape) * iod[:, None, None]
        use_detector = (rng.uniform(size=len(images)) < 0.5)[:, None, None]
        aligned = np.where(use_detector, detected, landmarks + jitter)
        crops = np.stack([recognizer_crop(img, lm, kind) for img, lm in zip(images, aligned, strict=True)])
        order = rng.permutation(len(images))
        for k in range(steps_per_epoch):
            idx = order[k * recipe.batch_size : (k + 1) * recipe.batch_size]
            x = _to_tensor(crops[idx])
            y = torch.from_numpy(labels[idx])
            _cosine_lr(optimizer, step, total, recipe.lr, warmup=100)
            margin = recipe.margin * min(1.0, step / (0.3 * total))  # margin warm-up: from softmax to ArcFace
            loss = head(net(x), y, margin=margin)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", margin=f"{margin:.2f}")
    bar.close()
    save_net(net.eval(), out / WEIGHT_FILES[kind])
    return {"train_seconds": round(time.time() - start, 1), "recipe": asdict(recipe), "aligned_with": detector_sha}


def _detected_landmarks(out: Path, images: list[np.ndarray], truth: np.ndarray) -> tuple[np.ndarray, str | None]:
    """The world detector's 5 landmarks for each training image (the truth where it misses), and its sha256."""
    from .backends import WorldDetector

    path = out / "detector.safetensors"
    if not path.is_file():
        logger.warning("%s not found: the recognizer is aligned on (jittered) true landmarks only", path)
        return truth, None
    detector = WorldDetector(path)
    detected = truth.copy()
    for start in range(0, len(images), 512):
        for k, found in enumerate(detector.detect_batch(images[start : start + 512])):
            if found:
                # The detection nearest the true face (renders hold one face).
                centres = np.array([d.landmarks.mean(0) for d in found])
                best = int(np.argmin(np.linalg.norm(centres - truth[start + k].mean(0), axis=1)))
                detected[start + k] = found[best].landmarks
    return detected, _sha256(path)


# ----------------------------------------------------------------------------------------------------------------
# Attribute checker
# ----------------------------------------------------------------------------------------------------------------


def attribute_samples(recipe: AttributeRecipe, seed: int, progress: bool = True):
    """Per face: the scene input, context crop and aligned face crop (from jittered true boxes and landmarks),
    and the class index of every attribute."""
    from tqdm.auto import tqdm

    rng = np.random.default_rng([0xAB, seed])
    pool = np.asarray(TRAIN_IDENTITIES[:8000])
    scenes, contexts, faces = [], [], []
    labels: dict[str, list[int]] = {name: [] for name in ATTRIBUTE_VALUES}
    for k in tqdm(range(recipe.images + recipe.scenes), desc="attribute renders", unit="image", disable=not progress):
        image_seed = _TRAIN_IMAGE_SEED + 500_000 + seed * 100_000 + k
        size = 128 if rng.uniform() < 0.2 else 64
        if k < recipe.images:
            result = render(int(rng.choice(pool)), image_seed, size=size)
        else:
            people = int(rng.integers(2, 4))
            result = render_scene([int(i) for i in rng.choice(pool, people, replace=False)], image_seed, size=size)
        image = _random_degrade(result.image, rng) if rng.uniform() < 0.5 else result.image
        scene = scene_input(image)
        for face in result.faces:
            w = face.bbox[2] - face.bbox[0]
            iod = np.linalg.norm(face.landmarks[0] - face.landmarks[1])
            box = face.bbox + rng.normal(0, 0.06, 4) * w
            lm = face.landmarks + rng.normal(0, 0.06, (5, 2)) * iod
            scenes.append(scene)
            contexts.append(context_crop(image, box))
            faces.append(attribute_face_crop(image, lm))
            for name, values in ATTRIBUTE_VALUES.items():
                labels[name].append(values.index(getattr(result.attributes, name)))
    return np.stack(scenes), np.stack(contexts), np.stack(faces), {k: np.array(v) for k, v in labels.items()}


def train_attributes(out: Path, seed: int, progress: bool = True) -> dict:
    """Train and save ``attributes.safetensors``; returns its manifest entry (without metrics)."""
    from tqdm.auto import tqdm

    from .nets import AttributeNet, save_net

    recipe: AttributeRecipe = RECIPES["attributes"]
    torch = _torch(seed * 100 + 23)
    start = time.time()
    scenes, contexts, faces, labels = attribute_samples(recipe, seed, progress)
    net = AttributeNet(width=recipe.width)
    optimizer = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=1e-4)
    rng = np.random.default_rng([0xAC, seed])
    steps_per_epoch = len(scenes) // recipe.batch_size
    total = steps_per_epoch * recipe.epochs
    bar = tqdm(total=total, desc="attributes", unit="step", disable=not progress)
    step = 0

    for _ in range(recipe.epochs):
        order = rng.permutation(len(scenes))
        for k in range(steps_per_epoch):
            idx = order[k * recipe.batch_size : (k + 1) * recipe.batch_size]
            logits = net(_to_tensor(scenes[idx]), _to_tensor(contexts[idx]), _to_tensor(faces[idx]))
            loss = sum(
                torch.nn.functional.cross_entropy(logits[name], torch.from_numpy(labels[name][idx])) for name in logits
            )
            _cosine_lr(optimizer, step, total, recipe.lr, warmup=50)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    save_net(net.eval(), out / "attributes.safetensors")
    return {"train_seconds": round(time.time() - start, 1), "recipe": asdict(recipe)}


# ----------------------------------------------------------------------------------------------------------------
# Measurement and manifest
# ----------------------------------------------------------------------------------------------------------------


def measure(model: str, out: Path, *, full: bool = True) -> dict:
    """Metrics of a trained model in ``out``: ``full`` (the reported numbers) or the tests' small check set."""
    from .backends import WEIGHT_FILES, WorldDetector, WorldRecognizer
    from .checkers import AttributeChecker

    if model == "detector":
        detector = WorldDetector(out / WEIGHT_FILES["detector"])
        return evaluate_detector(detector, seed=0, counts=None if full else CHECK_CONFIG["detector_counts"])
    if model in ("world", "world-judge"):
        recognizer = WorldRecognizer(model, out / WEIGHT_FILES[model])
        if not full:  # the tests' check: the threshold stored with the weights, on fewer held-out pairs
            stored = {model: recognizer.threshold}
            return evaluate_recognizers({model: recognizer}, CHECK_CONFIG["recognizer_pairs"], thresholds=stored)[
                model
            ]
        pairs = 6000
        metrics = evaluate_recognizers({model: recognizer}, pairs, seed=0)[model]
        detector_path = out / WEIGHT_FILES["detector"]
        if full and detector_path.is_file():
            aligned = evaluate_recognizers(
                {model: recognizer},
                pairs,
                thresholds={model: metrics["threshold"]},
                detector=WorldDetector(detector_path),
            )
            metrics["accuracy_detector_landmarks"] = aligned[model]["accuracy"]
        return metrics
    checker = AttributeChecker(
        out / WEIGHT_FILES["attributes"], detector=WorldDetector(out / WEIGHT_FILES["detector"])
    )
    count, scenes = (1500, 300) if full else (CHECK_CONFIG["attribute_images"], CHECK_CONFIG["attribute_scenes"])
    return {
        "clean": evaluate_attributes(checker, count, scenes=scenes, seed=0),
        "degraded": evaluate_attributes(checker, count, scenes=scenes, seed=0, degraded=True),
    }


def _round(value):
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    if isinstance(value, float):
        return round(value, 5)
    return value


def _update_manifest(out: Path, model: str, entry: dict) -> None:
    from ..images import atomic_write_bytes
    from .backends import WEIGHT_FILES

    path = out / MANIFEST
    manifest = json.loads(path.read_text()) if path.is_file() else {"files": {}}
    manifest["description"] = MANIFEST_DESCRIPTION
    manifest["check_config"] = CHECK_CONFIG
    manifest["files"][WEIGHT_FILES[model]] = _round(entry)
    atomic_write_bytes(path, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m idfusion.world.train_faces", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the safetensors files and MANIFEST.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared machine two OpenMP threads oversubscribe and run slower)",
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.only.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s): {', '.join(unknown)}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python -m idfusion.world.train_faces " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    progress = not args.no_progress
    from .backends import WEIGHT_FILES

    for model in MODELS:  # always in dependency order: the attribute metrics use the detector
        if model not in models:
            continue
        if model == "detector":
            entry = train_detector(args.out, args.seed, progress)
        elif model == "attributes":
            entry = train_attributes(args.out, args.seed, progress)
        else:
            entry = train_recognizer(model, args.out, args.seed, progress)
        measure_start = time.time()
        entry["metrics"] = measure(model, args.out, full=True)
        if model in ("world", "world-judge"):
            from .nets import load_net, save_net

            # Store the verification threshold (chosen on training identities) with the weights.
            net, _ = load_net(args.out / WEIGHT_FILES[model])
            save_net(net, args.out / WEIGHT_FILES[model], extra={"threshold": entry["metrics"]["threshold"]})
        entry["check"] = measure(model, args.out, full=False)
        entry["measure_seconds"] = round(time.time() - measure_start, 1)
        path = args.out / WEIGHT_FILES[model]
        entry.update(
            {
                "command": command,
                "seed": args.seed,
                "threads": args.threads,
                "sha256": _sha256(path),
                "bytes": path.stat().st_size,
            }
        )
        _update_manifest(args.out, model, entry)
        summary = f"{model}: {path} ({entry['bytes'] / 1e6:.2f} MB) trained in {entry['train_seconds']:.0f} s"
        print(summary, json.dumps(_round(entry["metrics"]), indent=1), sep="\n")  # noqa: T201 - the run's summary
    return 0


if __name__ == "__main__":
    sys.exit(main())
