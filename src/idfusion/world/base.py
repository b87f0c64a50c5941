"""The world base model: a tiny SD1.5-architecture text-to-image model trained on captioned world renders.

It is an ordinary ``StableDiffusionPipeline`` folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``; safetensors), shipped in the package at :func:`base_model_dir`
(``idfusion/world/weights/base``) and trained by ``python -m idfusion.world.train_base`` (command, seed and checksums
in ``weights/MANIFEST.json`` under ``"base"``). Every SD1.5-based method can load it as its base model. Two
departures from SD1.5, both measured (see ``train_base``): the VAE downsamples 4x (16x16x4 latents), and the noise
schedule has zero terminal SNR with v-prediction (the scheduler config says so; diffusers' samplers read it).

Measurements (:func:`evaluate_base`) use held-out captions (attribute combinations the model never trained on,
:func:`~idfusion.world.attributes.sample_heldout_attributes`):

- attribute accuracy: the shipped :class:`~idfusion.world.checkers.AttributeChecker` on each generated image (world
  detector for the faces; a missed face counts as wrong for every person attribute);
- a Fréchet distance between judge-recognizer features (:func:`judge_features`) of generated faces and of renders of
  held-out identities with the same captions, beside the same distance between two sets of renders (the floor).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ModelFilesError
from .attributes import Attributes, caption, sample_heldout_attributes
from .identity import HELDOUT_IDENTITIES

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

__all__ = [
    "BASE_FOLDER",
    "DEFAULT_GUIDANCE_SCALE",
    "DEFAULT_STEPS",
    "base_model_dir",
    "load_base_pipeline",
    "generate",
    "heldout_prompts",
    "judge_features",
    "frechet_distance",
    "attribute_accuracy",
    "evaluate_base",
    "evaluate_vae",
]

logger = logging.getLogger(__name__)

BASE_FOLDER = "base"
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE_SCALE = 4.0
# Image seeds of the reference renders in evaluate_base: far from training (1,000,000 + ...) and the face models'
# evaluation (50,000,000 + ...).
_REFERENCE_IMAGE_SEED = 70_000_000
_FLOOR_IMAGE_SEED = 71_000_000


def base_model_dir(folder: str | os.PathLike | None = None) -> Path:
    """The shipped base model folder (or ``folder``), checked to be a diffusers pipeline folder."""
    from .backends import weights_dir

    path = Path(folder) if folder is not None else weights_dir() / BASE_FOLDER
    if not (path / "model_index.json").is_file():
        raise ModelFilesError(
            f"world base model missing: {path} has no model_index.json (train it with "
            f"python -m idfusion.world.train_base --out {path})"
        )
    return path


def load_base_pipeline(folder: str | os.PathLike | None = None) -> StableDiffusionPipeline:
    """The base model as a ``StableDiffusionPipeline`` on the CPU in float32, with DPM-Solver++ (2M) sampling.

    The folder's scheduler is DDIM with the model's noise schedule (SD1.5's, rescaled to zero terminal SNR) and
    v-prediction; DPM-Solver++ built from that config keeps both and needs fewer steps.
    """
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    path = base_model_dir(folder)
    pipe = StableDiffusionPipeline.from_pretrained(path, local_files_only=True, safety_checker=None)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(
    pipe: StableDiffusionPipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    num_inference_steps: int = DEFAULT_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
    batch_size: int = 32,
    progress: bool = False,
) -> np.ndarray:
    """Images for ``prompts``, image ``k`` from a generator seeded ``seeds[k]``: ``(N, H, W, 3)`` uint8.

    One generator per image, so an image does not depend on the others in its batch (up to float rounding).
    """
    import torch
    from tqdm.auto import tqdm

    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    images = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="generate", unit="batch", disable=not progress):
        chunk = slice(start, start + batch_size)
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds[chunk]]
        out = pipe(
            list(prompts[chunk]),
            height=size,
            width=size,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generators,
            output_type="np",
        ).images
        images.append((np.clip(out, 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(images) if images else np.zeros((0, size, size, 3), np.uint8)


def heldout_prompts(count: int, seed: int = 0, *, scene_fraction: float = 0.0) -> list[Attributes]:
    """``count`` held-out attribute combinations; about ``scene_fraction`` of them with 2 or 3 people."""
    rng = np.random.default_rng([0xB5, int(seed)])
    out = []
    for k in range(count):
        people = 1 if rng.uniform() >= scene_fraction else int(rng.integers(2, 4))
        out.append(sample_heldout_attributes(seed * 1_000_000 + k, people=people))
    return out


def judge_features(images: Sequence[np.ndarray], detector: Any = None, judge: Any = None) -> tuple[np.ndarray, int]:
    """Unit-length judge embeddings of the largest detected face of each image, and how many images had none.

    Args:
        images: ``(H, W, 3)`` uint8 images.
        detector: a world detector (``detect_batch``); defaults to the shipped one.
        judge: a ``WorldRecognizer``; defaults to the shipped ``"world-judge"``.

    Returns:
        ``((M, 512) float64 features, number of images without a face)``, ``M`` the images with a face.
    """
    from .backends import WorldDetector, WorldRecognizer

    detector = detector or WorldDetector()
    judge = judge or WorldRecognizer("world-judge")
    crops, missed = [], 0
    for image, found in zip(images, detector.detect_batch(list(images)), strict=True):
        if not found:
            missed += 1
            continue
        face = max(found, key=lambda d: float((d.bbox[2] - d.bbox[0]) * (d.bbox[3] - d.bbox[1])))
        crops.append(judge.preprocess(image, face.landmarks))
    if not crops:
        return np.zeros((0, judge.dim)), missed
    features = judge.embed_crops(np.stack(crops)).astype(np.float64)
    return features / np.linalg.norm(features, axis=1, keepdims=True), missed


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``a`` ``(N, D)`` and ``b`` ``(M, D)``.

    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))``, the FID formula (Heusel et al. 2017, eq. 6). The trace of
    the square root is the sum of the square roots of the eigenvalues of ``S_a^(1/2) S_b S_a^(1/2)``, which is
    symmetric, so no general matrix square root is needed.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(f"expected two (N, D) feature sets with N >= 2 and the same D, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    middle = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace_root = np.sqrt(np.clip(middle, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root)


def attribute_accuracy(
    images: Sequence[np.ndarray], wanted: Sequence[Attributes], checker: Any = None
) -> dict[str, float]:
    """Per attribute, the fraction of images in which the checker sees what ``wanted`` asked for.

    Person attributes are the checker's majority over the detected faces; an image without a detected face counts as
    wrong for each of them. ``people`` compares the number of detected faces, and ``face_found`` is the fraction of
    images with at least one face. ``mean`` averages the six prompt attributes and ``people``.
    """
    from .checkers import AttributeChecker

    checker = checker or AttributeChecker()
    reports = []
    for start in range(0, len(images), 256):
        reports += checker.predict_batch(list(images[start : start + 256]))
    names = ("background", "pattern", "hat", "glasses", "clothing", "expression", "people")
    hits = {name: [] for name in names}
    for report, target in zip(reports, wanted, strict=True):
        for name in names:
            hits[name].append(getattr(report.attributes, name) == getattr(target, name))
    out = {name: float(np.mean(values)) for name, values in hits.items()}
    out["mean"] = float(np.mean([out[name] for name in names]))
    out["face_found"] = float(np.mean([bool(report.faces) for report in reports]))
    return out


def evaluate_vae(vae: Any, count: int = 300, *, seed: int = 0, batch_size: int = 50) -> dict[str, float]:
    """How well the base model's autoencoder redraws held-out renders (the ceiling of every method on this base).

    Returns:
        ``psnr`` (dB, 0-255 pixels), ``judge_cosine`` (mean cosine of judge embeddings, render vs reconstruction, at
        the render's true landmarks), ``verification_reconstructed`` / ``verification_renders``: the fraction of
        reconstructions / of renders the judge matches (above its threshold) to another render of the same person,
        and ``faces_found`` (reconstructions in which the world detector finds exactly one face).
    """
    import torch

    from .backends import WorldDetector, WorldRecognizer
    from .renderer import render

    ids = [HELDOUT_IDENTITIES[(seed * 7919 + k) % len(HELDOUT_IDENTITIES)] for k in range(count)]
    renders = [render(i, _REFERENCE_IMAGE_SEED + 500_000 + k) for k, i in enumerate(ids)]
    others = [render(i, _FLOOR_IMAGE_SEED + 500_000 + k) for k, i in enumerate(ids)]
    pixels = torch.from_numpy(np.stack([r.image for r in renders])).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    with torch.no_grad():
        decoded = [
            vae.decode(vae.encode(pixels[i : i + batch_size]).latent_dist.mean).sample
            for i in range(0, count, batch_size)
        ]
    rebuilt = ((torch.cat(decoded).clamp(-1, 1).permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().astype(np.uint8)
    originals = np.stack([r.image for r in renders])
    mse = float(((rebuilt.astype(np.float64) - originals) ** 2).mean())
    judge = WorldRecognizer("world-judge")

    def embed(images: Sequence[np.ndarray], truths: Sequence[Any]) -> np.ndarray:
        crops = np.stack([judge.preprocess(im, t.faces[0].landmarks) for im, t in zip(images, truths, strict=True)])
        features = judge.embed_crops(crops)
        return features / np.linalg.norm(features, axis=1, keepdims=True)

    a, b, c = embed(originals, renders), embed(rebuilt, renders), embed([o.image for o in others], others)
    detector = WorldDetector()
    return {
        "count": count,
        "psnr": float(10 * np.log10(255**2 / mse)),
        "judge_cosine": float((a * b).sum(1).mean()),
        "verification_reconstructed": float(((b * c).sum(1) >= judge.threshold).mean()),
        "verification_renders": float(((a * c).sum(1) >= judge.threshold).mean()),
        "faces_found": float(np.mean([len(found) == 1 for found in detector.detect_batch(list(rebuilt))])),
    }


def _reference_renders(attributes: Sequence[Attributes], image_seed: int, seed: int) -> list[np.ndarray]:
    from .renderer import render, render_scene

    rng = np.random.default_rng([0xB6, int(seed), int(image_seed)])
    ids = np.asarray(HELDOUT_IDENTITIES)
    images = []
    for k, wanted in enumerate(attributes):
        people = [int(i) for i in rng.choice(ids, wanted.people, replace=False)]
        result = (
            render(people[0], image_seed + k, wanted)
            if wanted.people == 1
            else render_scene(people, image_seed + k, wanted)
        )
        images.append(result.image)
    return images


def evaluate_base(
    pipe: StableDiffusionPipeline,
    count: int = 1000,
    *,
    seed: int = 0,
    num_inference_steps: int = DEFAULT_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
    scene_fraction: float = 0.1,
    batch_size: int = 32,
    progress: bool = False,
) -> dict[str, Any]:
    """Attribute accuracy and judge-feature Fréchet distance of the base model on ``count`` held-out captions.

    Returns:
        ``{"generated": attribute accuracies, "renders": the same on renders of those captions (the checker's
        ceiling), "frechet_judge": generated vs renders, "frechet_judge_renders": renders vs other renders (the
        floor at this sample size), "faces_missed": generated images without a detected face, and the settings}``.
    """
    from .backends import WorldDetector, WorldRecognizer
    from .checkers import AttributeChecker

    detector, judge = WorldDetector(), WorldRecognizer("world-judge")
    checker = AttributeChecker(detector=detector)
    wanted = heldout_prompts(count, seed, scene_fraction=scene_fraction)
    prompts = [caption(a) for a in wanted]
    seeds = [seed * 1_000_000 + k for k in range(count)]
    generated = generate(
        pipe,
        prompts,
        seeds,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        batch_size=batch_size,
        progress=progress,
    )
    references = _reference_renders(wanted, _REFERENCE_IMAGE_SEED, seed)
    floor = _reference_renders(wanted, _FLOOR_IMAGE_SEED, seed + 1)
    gen_features, missed = judge_features(generated, detector, judge)
    ref_features, _ = judge_features(references, detector, judge)
    floor_features, _ = judge_features(floor, detector, judge)
    return {
        "generated": attribute_accuracy(generated, wanted, checker),
        "renders": attribute_accuracy(references, wanted, checker),
        "frechet_judge": frechet_distance(gen_features, ref_features) if len(gen_features) >= 2 else float("nan"),
        "frechet_judge_renders": frechet_distance(floor_features, ref_features),
        "faces_missed": int(missed),
        "settings": {
            "count": count,
            "seed": seed,
            "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale,
            "scene_fraction": scene_fraction,
            "scheduler": type(pipe.scheduler).__name__,
            "batch_size": batch_size,
        },
    }
