"""``idfusion eval``: run a benchmark (:mod:`~idfusion.eval.benchmark`), score every image, write the report folder.

:func:`run_eval` does four things, each resumable:

1. **Identities.** A world benchmark renders its K held-out identities (references and held-out targets) as PNGs
   into ``OUT/work/identities/``; a photos benchmark uses the user's folders.
2. **Generation** through :mod:`idfusion.batch`: one job entry per method, identity and prompt (the seeds in it),
   parsed and checked by :func:`~idfusion.batch.parse_job` and run by :func:`~idfusion.batch.run_batch` into
   ``OUT/work/images/``. Images are found again by the ``batch_key`` in their metadata, so a re-run makes only what
   is missing, and ``shard=(I, N)`` makes every N-th image (shard runs stop there; a run without a shard scores and
   reports). The world's base model (prompt only: the floor) and renders of each identity with the prompt's
   attributes (the ceiling) go the same way under the labels ``base`` and ``renders``.
3. **Scores for every image** (:mod:`~idfusion.eval.scoring`): identity against the references and the held-out
   targets under the judge (SimTarget, SimRef, Paste, copy_geo; faces matched by the Hungarian algorithm), face
   detection, prompt fidelity (world: attribute checkers; photos: CLIP-T when CLIP is on the machine), diversity
   across seeds, time and peak memory per image (recorded at generation); per method a quality score (world: the
   judge Fréchet distance; photos: FID/KID when torchmetrics and Inception are present).
4. **The report** (:mod:`~idfusion.eval.report`): ``report.md``, ``report.html``, ``scores.csv``, ``scores.json``,
   ``plots/`` and ``grids/``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .benchmark import Benchmark, EvalConfigError, MethodEntry, check_entries, job_options, load_benchmark

__all__ = ["BASE_LABEL", "RENDERS_LABEL", "EvalResult", "PlannedImage", "run_eval", "score_images", "summarize"]

logger = logging.getLogger(__name__)

BASE_LABEL = "base"  # the world base model, prompt only
RENDERS_LABEL = "renders"  # renders of the identity with the prompt's attributes
NAN = float("nan")
# Image seeds of the world benchmark's renders: far from training (0-10,000,000 + ...) and the other evaluations.
_REFERENCE_SEED = 90_000_000
_TARGET_SEED = 91_000_000
_ORACLE_SEED = 92_000_000
_BASE_BATCH = 8


@dataclass
class PlannedImage:
    """One image of the benchmark: who and what it shows, and the key its PNG carries (``batch_key``)."""

    label: str  # the method entry's label, "base" or "renders"
    method: str  # the registered method, "world-base" or "world-renders"
    identity: str
    prompt_index: int
    prompt: str
    seed: int
    key: str
    path: Path | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalResult:
    """What :func:`run_eval` did."""

    out: Path
    generated: int = 0  # images made by this run
    skipped: int = 0  # images already there
    other_shards: int = 0  # images left to other shards
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)  # empty for a shard run (no report)


# ---- identities ----------------------------------------------------------------------------------------------


def _png_bytes(image: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_if_changed(path: Path, data: bytes) -> Path:
    from ..atomic import atomic_write_bytes

    if not (path.is_file() and path.read_bytes() == data):  # unchanged bytes keep the batch keys (file hashes)
        atomic_write_bytes(path, data)
    return path


def _render_world_identities(bench: Benchmark, folder: Path, progress: bool) -> None:
    from tqdm.auto import tqdm

    from ..world.renderer import render

    world = bench.world
    for k, person in enumerate(tqdm(bench.identities, desc="identities", unit="person", disable=not progress)):
        place = folder / person.name
        person.references = [
            _write_if_changed(place / f"ref_{r}.png", _png_bytes(render(person.world_seed, _REFERENCE_SEED + 100 * k + r, size=world.size).image))
            for r in range(world.references)
        ]  # fmt: skip
        person.targets = [
            _write_if_changed(place / f"target_{t}.png", _png_bytes(render(person.world_seed, _TARGET_SEED + 100 * k + t, size=world.size).image))
            for t in range(world.targets)
        ]  # fmt: skip


# ---- planning ------------------------------------------------------------------------------------------------


def _stem(label: str, identity: str | None, prompt_index: int) -> str:
    return f"{label}__{identity}__p{prompt_index:02d}" if identity else f"{label}__p{prompt_index:02d}"


def _limited(bench: Benchmark, limit: int | None) -> list[tuple[int, int, int]]:
    """``(identity index, prompt index, seed)`` in order identity, prompt, seed; the first ``limit``."""
    order = [
        (i, p, seed) for i in range(len(bench.identities)) for p in range(len(bench.prompts)) for seed in bench.seeds
    ]
    return order if limit is None else order[:limit]


def _method_lines(bench: Benchmark, entry: MethodEntry, start: int, limit: int | None, errors: list[str]):
    """The entry's job lines (one per identity and prompt, its seeds in it) and what each line is."""
    from ..batch import JobLine, parse_job

    seeds_of: dict[tuple[int, int], list[int]] = {}
    for i, p, seed in _limited(bench, limit):
        seeds_of.setdefault((i, p), []).append(seed)
    lines: list[JobLine] = []
    where: dict[int, tuple[int, int]] = {}
    for (i, p), seeds in seeds_of.items():
        person = bench.identities[i]
        job = {
            **job_options(bench, entry),
            "method": entry.method,
            "faces": [str(path) for path in person.references],
            "prompt": entry.prompt(bench.prompts[p]),
            "seeds": seeds,
            "id": _stem(entry.label, person.name, p),
            "face_index": person.face_index,
        }
        number = start + len(lines) + 1
        try:
            line = parse_job(job, bench.folder, model=entry.model)
        except ValueError as error:  # IdfusionError subclasses are ValueErrors here too
            errors.append(f"{entry.label}, {person.name}, prompt {p}: {error}")
            continue
        line.line = number
        lines.append(line)
        where[number] = (i, p)
    return lines, where


def _key(content: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def _base_settings(bench: Benchmark) -> dict[str, Any]:
    from ..outputs import file_sha256
    from ..world.base import DEFAULT_GUIDANCE_SCALE, DEFAULT_STEPS, base_model_dir

    folder = base_model_dir()
    return {
        "folder": folder,
        "unet": file_sha256(folder / "unet" / "diffusion_pytorch_model.safetensors"),
        "steps": bench.steps or DEFAULT_STEPS,
        "guidance": DEFAULT_GUIDANCE_SCALE,
    }


def _plan(bench: Benchmark, limit: int | None, errors: list[str]):
    """Every image of the benchmark as :class:`PlannedImage`, and the batch job lines of the method entries."""
    from ..batch import expand_items

    planned: list[PlannedImage] = []
    all_lines = []
    for entry in bench.methods:
        lines, where = _method_lines(bench, entry, len(all_lines), limit, errors)
        all_lines += lines
        for item in expand_items(lines):
            i, p = where[item.line]
            planned.append(PlannedImage(entry.label, entry.method, bench.identities[i].name, p, bench.prompts[p],
                                        item.job.seed, item.key))  # fmt: skip
    base = None
    if bench.baseline:
        base = _base_settings(bench)
        for i, p, seed in _limited(bench, limit):
            # the base model sees the prompt only: one image per prompt and seed, scored against every identity
            key = _key({"method": "world-base", "unet": base["unet"], "prompt": bench.prompts[p], "seed": seed,
                        "steps": base["steps"], "guidance": base["guidance"]})  # fmt: skip
            planned.append(
                PlannedImage(BASE_LABEL, "world-base", bench.identities[i].name, p, bench.prompts[p], seed, key)
            )
    if bench.oracle:
        for i, p, seed in _limited(bench, limit):
            person = bench.identities[i]
            key = _key({"method": "world-renders", "identity": person.world_seed, "prompt": bench.prompts[p],
                        "seed": seed, "size": bench.world.size})  # fmt: skip
            planned.append(PlannedImage(RENDERS_LABEL, "world-renders", person.name, p, bench.prompts[p], seed, key))
    return planned, all_lines, base


# ---- generation ----------------------------------------------------------------------------------------------


def _world_loader(spec: Any, model: str | None, settings: Any, load_options: Mapping[str, Any] | None) -> Any:
    """Load a world method as ``idfusion demo`` does: world detector, and the world recognizer for methods that are
    conditioned on an embedding (as Arc2Face is on ``arcface.onnx``)."""
    from .. import jobs

    # the analysis is configured here, not by load_configured from settings.detector: with the detector alone an
    # embedding method would first ask for its ONNX recognizer, which the world does not have
    pipe = jobs.load_configured(spec, model, dataclasses.replace(settings, detector=None), load_options)
    pipe.configure_face_analysis(detector="world", recognizer="world" if spec.identity == "embedding" else None)
    return pipe


def _load_settings(bench: Benchmark) -> Any:
    from ..jobs import LoadSettings

    world = bench.kind == "world"
    return LoadSettings(
        device=bench.device,
        dtype=bench.dtype,
        face_models=bench.face_models,
        detector="world" if world else None,
        cpu_offload=bench.cpu_offload,
        vae_tiling=bench.vae_tiling,
        attention_slicing=bench.attention_slicing,
        local_files_only=True if world else bench.offline,
        progress_bar=False,
    )


def _mine(keys: Sequence[str], shard: tuple[int, int]) -> list[str]:
    unique = list(dict.fromkeys(keys))
    return [key for position, key in enumerate(unique) if position % shard[1] == shard[0]]


def _generate_base(items: Sequence[PlannedImage], base: Mapping[str, Any], images: Path, done: set[str],
                   shard: tuple[int, int], progress: bool, result: EvalResult) -> None:  # fmt: skip
    from PIL import Image
    from tqdm.auto import tqdm

    from ..batch import measure
    from ..outputs import save_new_generated_image
    from ..world.base import generate, load_base_pipeline

    by_key = {item.key: item for item in items}
    mine = _mine([item.key for item in items], shard)
    result.other_shards += len(by_key) - len(mine)
    todo = [key for key in mine if key not in done]
    result.skipped += len(mine) - len(todo)
    if not todo:
        return
    with measure() as loading:
        pipe = load_base_pipeline(base["folder"])
    bar = tqdm(total=len(todo), desc="base model", unit="image", disable=not progress)
    for start in range(0, len(todo), _BASE_BATCH):
        chunk = [by_key[key] for key in todo[start : start + _BASE_BATCH]]
        with measure() as used:
            pictures = generate(pipe, [c.prompt for c in chunk], [c.seed for c in chunk],
                                num_inference_steps=base["steps"], guidance_scale=base["guidance"])  # fmt: skip
        for item, picture in zip(chunk, pictures, strict=True):
            meta = {
                "method": "world-base", "model": str(base["folder"]), "prompt": item.prompt, "seed": item.seed,
                "steps": base["steps"], "guidance_scale": base["guidance"], "batch_key": item.key,
                "model_files": {"base/unet": base["unet"]},
                # a batch's time shared evenly: one pipeline call makes up to 8 images
                "generation_seconds": round(used["seconds"] / len(chunk), 4), "batch_size": len(chunk),
                "peak_memory_mb": round(used["peak_memory_mb"], 1) if used["peak_memory_mb"] else None,
                "peak_memory_kind": used["peak_memory_kind"],
            }  # fmt: skip
            if start == 0 and item is chunk[0]:
                meta["load_seconds"] = round(loading["seconds"], 3)
            save_new_generated_image(
                images, _stem(BASE_LABEL, None, item.prompt_index), Image.fromarray(picture), meta
            )
            result.generated += 1
            bar.update()
    bar.close()


def _oracle_image(bench: Benchmark, item: PlannedImage) -> np.ndarray:
    from ..world.attributes import complete_attributes, parse_caption
    from ..world.identity import HELDOUT_IDENTITIES
    from ..world.renderer import render, render_scene

    person = next(p for p in bench.identities if p.name == item.identity)
    attributes = complete_attributes(parse_caption(item.prompt), rng=item.seed)
    image_seed = _ORACLE_SEED + 1000 * item.prompt_index + item.seed
    if attributes.people == 1:
        return render(person.world_seed, image_seed, attributes, size=bench.world.size).image
    rng = np.random.default_rng([0x0AC1, person.world_seed, image_seed])
    others = [int(s) for s in rng.choice(np.asarray(HELDOUT_IDENTITIES), attributes.people - 1, replace=False)]
    return render_scene([person.world_seed, *others], image_seed, attributes, size=bench.world.size).image


def _generate_renders(bench: Benchmark, items: Sequence[PlannedImage], images: Path, done: set[str],
                      shard: tuple[int, int], progress: bool, result: EvalResult) -> None:  # fmt: skip
    from PIL import Image
    from tqdm.auto import tqdm

    from ..batch import measure
    from ..outputs import save_new_generated_image

    by_key = {item.key: item for item in items}
    mine = _mine([item.key for item in items], shard)
    result.other_shards += len(by_key) - len(mine)
    todo = [key for key in mine if key not in done]
    result.skipped += len(mine) - len(todo)
    for key in tqdm(todo, desc="renders", unit="image", disable=not progress):
        item = by_key[key]
        with measure() as used:
            picture = _oracle_image(bench, item)
        meta = {
            "method": "world-renders", "identity": item.identity, "prompt": item.prompt, "seed": item.seed,
            "batch_key": key, "generation_seconds": round(used["seconds"], 4),
        }  # fmt: skip
        save_new_generated_image(
            images, _stem(RENDERS_LABEL, item.identity, item.prompt_index), Image.fromarray(picture), meta
        )
        result.generated += 1


def _index_images(folder: Path) -> dict[str, tuple[Path, dict[str, Any]]]:
    """``batch_key`` -> (PNG, metadata) of every idfusion PNG in ``folder``."""
    from ..errors import ImageError
    from ..outputs import MetadataError, read_generation_metadata

    found: dict[str, tuple[Path, dict[str, Any]]] = {}
    if not folder.is_dir():
        return found
    for path in sorted(folder.glob("*.png")):
        try:
            meta = read_generation_metadata(path)
        except (MetadataError, ImageError, OSError):
            continue
        key = meta.get("batch_key")
        if key and key not in found:
            found[str(key)] = (path, meta)
    return found


# ---- scoring -------------------------------------------------------------------------------------------------


def _judge(bench: Benchmark) -> Any:
    from ..faces import FaceAnalyzer

    return FaceAnalyzer(bench.detector, bench.judge, model_dir=bench.judge_models, crops=())


def _faces(judge: Any, image: Any, index: int | None = None) -> list[Any]:
    from ..errors import FaceIndexError, FaceTooSmallError, NoFaceError

    try:
        if index is not None:
            return judge.analyze(image, select=index)
        return judge.analyze(image, select="all")
    except (NoFaceError, FaceTooSmallError, FaceIndexError):
        return []


def _identity_embeddings(bench: Benchmark, judge: Any, notes: list[str]) -> dict[str, Any]:
    from .scoring import IdentityEmbeddings

    people: dict[str, Any] = {}
    for person in bench.identities:
        found: dict[str, list[np.ndarray]] = {"references": [], "targets": []}
        for role in found:
            for path in getattr(person, role):
                faces = _faces(judge, str(path), person.face_index)
                if not faces:
                    notes.append(f"{person.name}: no face found by the judge's detector in {path}; left out")
                    continue
                face = faces[0] if person.face_index is not None else max(faces, key=lambda f: f.area)
                found[role].append(face.embedding)
        if not found["references"] or not found["targets"]:
            notes.append(f"{person.name}: no usable reference or target photo, so its images have no identity scores")
            continue
        people[person.name] = IdentityEmbeddings(np.stack(found["references"]), np.stack(found["targets"]))
    return people


def score_images(
    bench: Benchmark,
    planned: Sequence[PlannedImage],
    out: Path,
    *,
    judge: Any,
    people: Mapping[str, Any],
    checker: Any = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """One row of scores per planned image (keys of :data:`~idfusion.eval.report.COLUMNS`, plus ``embedding``).

    Args:
        judge: a :class:`~idfusion.faces.FaceAnalyzer` (or any object with its ``analyze``) with a recognizer.
        people: per identity name, its :class:`~idfusion.eval.scoring.IdentityEmbeddings` under the same judge.
        checker: world benchmarks: an :class:`~idfusion.world.AttributeChecker` (``None``: no prompt fidelity here).
    """
    from tqdm.auto import tqdm

    from ..images import load_image
    from . import metrics
    from .scoring import identity_scores

    seen: dict[str, tuple[np.ndarray, list[Any], Any]] = {}
    rows = []
    for item in tqdm(planned, desc="scores", unit="image", disable=not progress):
        row: dict[str, Any] = {
            "method": item.label, "method_name": item.method, "identity": item.identity,
            "prompt_index": item.prompt_index, "prompt": item.prompt, "seed": item.seed, "image": None,
            "face_found": None, "faces": None, "embedding": None,
        }  # fmt: skip
        if item.path is None:
            row["error"] = "missing: not generated (see the notes)"
            rows.append(row)
            continue
        row["image"] = item.path.relative_to(out).as_posix() if item.path.is_relative_to(out) else str(item.path)
        for key in ("generation_seconds", "peak_memory_mb", "peak_memory_kind"):
            row[key] = item.metadata.get(key)
        cache_key = str(item.path)
        if cache_key not in seen:
            pixels = load_image(item.path, max_pixels=None).array
            faces = _faces(judge, pixels)
            report = None
            if checker is not None:
                report = checker.predict(pixels, faces=faces if bench.detector == "world" else None)
            seen[cache_key] = (pixels, faces, report)
        pixels, faces, report = seen[cache_key]
        person = people.get(item.identity)
        embeddings = np.stack([f.embedding for f in faces]) if faces else np.zeros((0, 1))
        if person is not None:
            scores = identity_scores(embeddings, person)
            if scores["face"] is not None:
                row["embedding"] = embeddings[scores["face"]]
            row.update({k: v for k, v in scores.items() if k != "face"})
        else:
            row.update({"face_found": bool(faces), "faces": len(faces), "error": "no identity photos to compare"})
        if report is not None:
            from ..world.attributes import parse_caption

            wanted = parse_caption(item.prompt).specified()
            got = report.attributes.to_dict()
            row["prompt_fidelity"] = metrics.attribute_fidelity(wanted, got)
            for name, value in wanted.items():
                row[f"attr_{name}"] = float(got.get(name) == value)
        rows.append(row)
    return rows


def _add_diversity(rows: Sequence[dict[str, Any]]) -> None:
    from . import metrics

    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["identity"], row["prompt_index"]), []).append(row)
    for group in groups.values():
        faces = [r["embedding"] for r in group if r.get("embedding") is not None]
        value = metrics.diversity(np.stack(faces)) if len(faces) >= 2 else NAN
        for row in group:
            row["diversity"] = value


def _mean(values: Sequence[Any]) -> float:
    finite = [float(v) for v in values if isinstance(v, (int, float)) and v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else NAN


def summarize(rows: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per method label: image count, detection rate, mean identity / prompt scores, diversity (mean over the
    identity-prompt groups), mean time per image and the largest peak memory."""
    summary: dict[str, dict[str, Any]] = {}
    for label in labels:
        mine = [r for r in rows if r["method"] == label]
        made = [r for r in mine if r.get("image")]
        groups = {(r["identity"], r["prompt_index"]): r.get("diversity") for r in made}
        values: dict[str, Any] = {
            "images": len(made),
            "missing": len(mine) - len(made),
            "face_rate": _mean([float(bool(r.get("face_found"))) for r in made]),
            **{key: _mean([r.get(key) for r in made]) for key in ("sim_target", "sim_ref", "paste", "copy_geo",
                                                                 "prompt_fidelity", "clip_t")},
            "diversity": _mean(list(groups.values())),
            "seconds_per_image": _mean([r.get("generation_seconds") for r in made]),
            "peak_memory_mb": max([r["peak_memory_mb"] for r in made if r.get("peak_memory_mb")] or [NAN]),
        }  # fmt: skip
        kinds = {r.get("peak_memory_kind") for r in made if r.get("peak_memory_kind")}
        values["peak_memory_kind"] = ", ".join(sorted(kinds)) or None
        for name in ("background", "pattern", "hat", "glasses", "clothing", "expression", "people"):
            got = [r.get(f"attr_{name}") for r in made if r.get(f"attr_{name}") is not None]
            if got:
                values[f"attr_{name}"] = _mean(got)
        summary[label] = values
    return summary


def _quality(bench: Benchmark, rows: Sequence[Mapping[str, Any]], summary: dict[str, dict[str, Any]],
             people: Mapping[str, Any], out: Path, notes: list[str]) -> None:  # fmt: skip
    """Per method, the quality score: the judge Fréchet distance (world) or FID/KID (photos)."""
    if bench.kind == "world":
        from ..world.base import frechet_distance
        from .scoring import unit

        targets = [unit(p.targets) for p in people.values()]
        if not targets:
            return
        real = np.concatenate(targets)
        for label, values in summary.items():
            faces = [r["embedding"] for r in rows if r["method"] == label and r.get("embedding") is not None]
            if len(faces) >= 2 and len(real) >= 2:
                values["frechet_judge"] = values["quality"] = frechet_distance(unit(np.stack(faces)), real)
        notes.append(
            f"FD judge compares {len(real)} target renders with each method's faces: at this sample size it is biased "
            "upward, so read it against the renders row (the floor)"
        )
        return
    if not bench.fid:
        notes.append("FID/KID skipped: fid: false in the benchmark")
        return
    from ..images import load_image
    from .scoring import inception_scores

    real = [load_image(p, max_pixels=None).array for person in bench.identities for p in person.targets]
    note = None
    for label, values in summary.items():
        paths = sorted({r["image"] for r in rows if r["method"] == label and r.get("image")})
        generated = [load_image(out / p, max_pixels=None).array for p in paths]
        scores, note = inception_scores(generated, real)
        if scores is None:
            break
        values.update(scores)
        values["quality"] = scores["fid"]
    if note:
        notes.append(note)


def _clip(bench: Benchmark, rows: Sequence[dict[str, Any]], out: Path, notes: list[str]) -> None:
    from ..images import load_image
    from .scoring import ClipScorer

    scorer, note = ClipScorer.load(bench.clip_model)
    if scorer is None:
        notes.append(f"{note}; the prompt-fidelity column and the identity-vs-prompt plot are empty")
        return
    made = [r for r in rows if r.get("image")]
    pairs = sorted({(r["image"], r["prompt"]) for r in made})
    values = scorer.scores(
        [load_image(out / image, max_pixels=None).array for image, _ in pairs], [p for _, p in pairs]
    )
    found = dict(zip(pairs, values, strict=True))
    for row in made:
        row["clip_t"] = row["prompt_fidelity"] = float(found[(row["image"], row["prompt"])])


# ---- the run -------------------------------------------------------------------------------------------------


def run_eval(
    bench: Benchmark | str | os.PathLike | None,
    out_dir: str | os.PathLike,
    *,
    shard: tuple[int, int] = (0, 1),
    models: Mapping[str, str] | None = None,
    limit: int | None = None,
    report_only: bool = False,
    progress: bool = True,
    judge: Any = None,
    loader: Callable[..., Any] | None = None,
) -> EvalResult:
    """Run a benchmark into ``out_dir`` and write its report.

    Args:
        bench: a :class:`~idfusion.eval.benchmark.Benchmark`, a YAML path, or ``None`` for the shipped world
            benchmark.
        out_dir: the report folder; images and identity photos go into its ``work/``.
        shard: ``(I, N)``: make only every N-th missing image from the I-th, and stop (no scores, no report); a
            run with ``(0, 1)`` then makes anything still missing, scores everything and reports.
        models: ``{label or method: model}`` replacing entries' models (the command line's ``--model M=PATH``).
        limit: at most this many images per method (identities, then prompts, then seeds, in order).
        report_only: make nothing; score and report the images that are there (the rest are listed as missing).
        progress: progress bars.
        judge: a scoring analyzer instead of the benchmark's judge (tests pass a fake one).
        loader: the pipelines' loader for :func:`~idfusion.batch.run_batch` (default: world benchmarks configure
            the world face models, photos use :func:`~idfusion.jobs.load_configured`).

    Raises:
        EvalConfigError: the benchmark cannot run as written (refused judge, unknown option, ...).
    """
    from ..atomic import check_output_folder
    from ..batch import done_keys, run_batch
    from ..registry import get_method

    if not isinstance(bench, Benchmark):
        bench = load_benchmark(bench)
    if limit is not None and limit < 1:
        raise EvalConfigError(f"--limit: expected a whole number >= 1, got {limit}")
    for name, model in (models or {}).items():
        entry = bench.entry(name)
        entry.model = str(model)
    out = check_output_folder(Path(out_dir))
    work = out / "work"
    images = work / "images"
    result = EvalResult(out=out, notes=list(bench.notes))

    if bench.kind == "world":
        _render_world_identities(bench, work / "identities", progress)
    check_entries(bench, bench.identities[0].references)
    planned, lines, base = _plan(bench, limit, result.errors)

    if not report_only:
        check_output_folder(images)
        done = done_keys(images)
        if lines:
            world = bench.kind == "world"
            report = run_batch(lines, images, _load_settings(bench), shard=shard, progress=progress,
                               loader=loader or (_world_loader if world else None))  # fmt: skip
            result.generated += len(report.written)
            result.skipped += report.skipped
            result.other_shards += report.other_shards
            result.errors += report.errors
        if base is not None:
            _generate_base([p for p in planned if p.label == BASE_LABEL], base, images, done, shard, progress, result)
        if bench.oracle:
            _generate_renders(bench, [p for p in planned if p.label == RENDERS_LABEL], images, done, shard, progress,
                              result)  # fmt: skip
    if shard[1] > 1:
        return result  # the merge run (no shard) scores and reports

    found = _index_images(images)
    for item in planned:
        if item.key in found:
            item.path, item.metadata = found[item.key]
    missing = sum(item.path is None for item in planned)
    if bench.baseline:
        distinct = len({item.key for item in planned if item.label == BASE_LABEL})
        result.notes.append(
            f"base sees the prompt only: {distinct} distinct images (one per prompt and seed), each scored against "
            f"every identity"
        )
    if missing:
        result.notes.append(f"{missing} of {len(planned)} images are missing (not generated, or failed: see errors)")
    result.notes += [f"generation error: {error}" for error in result.errors]

    judge = judge or _judge(bench)
    people = _identity_embeddings(bench, judge, result.notes)
    checker = None
    if bench.kind == "world":
        from ..world.checkers import AttributeChecker

        checker = AttributeChecker(detector=getattr(judge, "detector", None))
    rows = score_images(bench, planned, out, judge=judge, people=people, checker=checker, progress=progress)
    if bench.kind == "photos":
        _clip(bench, rows, out, result.notes)
    _add_diversity(rows)
    labels = [e.label for e in bench.methods] + [BASE_LABEL] * bench.baseline + [RENDERS_LABEL] * bench.oracle
    summary = summarize(rows, labels)
    _quality(bench, rows, summary, people, out, result.notes)

    photos = {
        person.name: [(f"ref {k}", p) for k, p in enumerate(person.references)]
        + [(f"target {k}", p) for k, p in enumerate(person.targets)]
        for person in bench.identities
    }
    settings = {
        "kind": bench.kind,
        "judge": bench.judge,
        "detector": bench.detector,
        "methods": ", ".join(
            f"{e.label} ({get_method(e.method).title}, {e.model or 'official'})" for e in bench.methods
        ),
        "seeds": bench.seeds,
        "steps": bench.steps,
        "limit": limit,
    }
    from .report import write_report

    result.rows = [{k: v for k, v in row.items() if k != "embedding"} for row in rows]
    result.summary = summary
    result.files = write_report(out, bench=bench, rows=result.rows, summary=summary, notes=result.notes,
                                photos=photos, settings=settings, progress=progress)  # fmt: skip
    return result
