"""Batch generation from a job file (``idfusion generate --jobs FILE``): resumable, sharded, one bad line at a time.

Job files
---------
JSON-lines (one job per line; blank lines and lines starting with ``#`` are skipped), or a JSON file holding one
job or a list of jobs. A job is an object::

    {"method": "arc2face", "faces": ["me.jpg"], "prompt": "...", "seeds": [1, 2, 3],
     "steps": 25, "guidance": 3.0, "model": "FoivosPar/Arc2Face", "id": "me"}

- ``method`` (required unless the command line gives ``--method``), ``faces`` (a path or a list; ``PATH:WEIGHT``
  blends where the method blends), ``model`` (default: the command line's ``--model``, else the official release).
- ``seeds`` (a list), or ``seed`` plus ``num_images`` (seeds ``seed, seed+1, ...``); default seed 0, so that a job
  file is deterministic and can resume.
- ``face_index``: in photos with several people, the face to use (as ``--face-index``).
- ``id``: the file-name stem of its images (default: the method).
- Any option of ``idfusion generate``, by flag (``"--face-box"``) or by name (``"face_box"``), with a JSON value
  (``"face_box": [0.3, 0.1, 0.6, 0.4]``) or the command line's text (``"face_box": "0.3,0.1,0.6,0.4"``); each is
  checked exactly as on the command line.

FeedFace's own ``inference.py -j`` files read as they are: ``{"id", "caption_list", "source_group": [{"path"}]}`` is
one job per caption, with every ``source_group`` photo as the person's references and the release's 4 samples each
(method ``feedface`` unless the command line says otherwise). Relative photo paths are tried against the current
folder first (FeedFace's are relative to its repository root), then against the job file's folder.

Resume and sharding
-------------------
Each image is one *item* (a job and one seed) with a key: the SHA-256 of its method, model, photos (their bytes'
hashes), options and seed. The key is stored in the image's metadata (``batch_key``); a re-run skips every item
whose key an image in the output folder already has. Items are split round-robin over shards: ``--shard I/N``, or
the processes of ``accelerate launch`` (each on its own device). Every image is written atomically under a name
reserved atomically, so shards never overwrite each other and no item is written twice.

Each image also records what it cost: ``generation_seconds`` (wall time of its pipeline call, per image, without the
model load), ``load_seconds`` (on the image whose call loaded the pipeline) and ``peak_memory_mb`` with
``peak_memory_kind`` (see :func:`measure`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import IdfusionError

__all__ = [
    "BatchItem",
    "BatchReport",
    "JobFileError",
    "JobLine",
    "done_keys",
    "expand_items",
    "measure",
    "parse_job",
    "read_job_file",
    "run_batch",
    "shard_of",
]

logger = logging.getLogger(__name__)

FEEDFACE_SAMPLES = 4  # inference.py's --n_samples default
_JOB_KEYS = {"method", "faces", "face", "model", "seeds", "seed", "num_images", "face_index", "id"}


class JobFileError(IdfusionError, ValueError):
    """The job file as a whole cannot be read (missing, not JSON, not jobs)."""


@dataclass
class JobLine:
    """One job of the file: where it came from and the parsed job, or why it was refused."""

    line: int  # 1-based line (JSON-lines) or list position (a JSON list)
    job: Any = None  # a GenerationJob (num_images and seed unset: see seeds)
    seeds: list[int] = field(default_factory=list)
    stem: str = ""
    error: str | None = None


@dataclass(frozen=True)
class BatchItem:
    """One image to make: a job with one seed."""

    line: int
    job: Any  # GenerationJob with num_images = 1 and this seed
    stem: str
    key: str


@dataclass
class BatchReport:
    """What :func:`run_batch` did (this shard's part)."""

    written: list[Path] = field(default_factory=list)
    skipped: int = 0  # items already in the output folder
    other_shards: int = 0  # items left to the other shards
    errors: list[str] = field(default_factory=list)  # "line N: why", bad lines and failed items


# ---- reading -------------------------------------------------------------------------------------------------


def _entries(path: Path) -> list[tuple[int, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise JobFileError(f"{path}: job file not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise JobFileError(f"{path}: cannot read the job file ({error})") from None
    stripped = text.lstrip()
    if stripped.startswith("[") or (stripped.startswith("{") and path.suffix.lower() == ".json"):
        try:
            document = json.loads(text)
        except json.JSONDecodeError as error:
            raise JobFileError(f"{path}: not valid JSON (line {error.lineno}: {error.msg})") from None
        items = document if isinstance(document, list) else [document]
        return list(enumerate(items, start=1))
    entries: list[tuple[int, Any]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            entries.append((number, json.loads(line)))
        except json.JSONDecodeError as error:
            entries.append((number, ValueError(f"not valid JSON ({error.msg} at column {error.colno})")))
    if not entries:
        raise JobFileError(f"{path}: no jobs in the file")
    return entries


def _photo(value: Any, folder: Path) -> str:
    text = str(value)
    path = Path(text).expanduser()
    if path.is_absolute() or path.exists() or not (folder / path).exists():
        return str(path)
    return str(folder / path)


def _option_value(option: Any, value: Any) -> Any:
    """A JSON value as the command line would give it, checked by the option's own parser."""
    if option.kind == "flag":
        if not isinstance(value, bool):
            raise ValueError(f"{option.flag}: expected true or false, got {value!r}")
        return value or None
    if option.kind == "list":
        items = value if isinstance(value, list) else [value]
        return [option.parse(str(v)) if option.parse else str(v) for v in items]
    if option.kind == "file":
        return Path(str(value))
    text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
    parsed = option.parse(text) if option.parse is not None else text
    if option.choices is not None and parsed not in option.choices:
        raise ValueError(f"{option.flag}: expected one of {', '.join(option.choices)}, got {value!r}")
    return parsed


def _feedface_jobs(entry: Mapping[str, Any], method: str) -> list[dict[str, Any]]:
    faces = [group["path"] for group in entry.get("source_group", []) if isinstance(group, Mapping)]
    return [
        {"method": method, "faces": faces, "prompt": caption, "num_images": FEEDFACE_SAMPLES, "id": entry.get("id")}
        for caption in entry.get("caption_list", [])
    ]


def _parse_job(entry: Mapping[str, Any], folder: Path, defaults: Mapping[str, Any]) -> JobLine:
    from .jobs import GenerationJob, check_job
    from .registry import get_method, methods, options_by_flag
    from .values import weighted_path

    method = entry.get("method") or defaults.get("method")
    if not method:
        raise ValueError('no method: give "method" in the job or --method on the command line')
    spec = get_method(str(method))
    by_name = {}
    for flag, (option, _) in options_by_flag(methods()).items():
        by_name[flag] = by_name[flag.lstrip("-")] = by_name[option.dest] = option
    options: dict[str, Any] = {
        dest: value
        for dest, value in defaults.get("options", {}).items()
        if dest in {o.dest for o in spec.all_options()}
    }
    for key, value in entry.items():
        if key in _JOB_KEYS or value is None:
            continue
        option = by_name.get(key)
        if option is None:
            raise ValueError(f"unknown key {key!r} (job keys: {', '.join(sorted(_JOB_KEYS))}, or a generate option)")
        try:
            options[option.dest] = _option_value(option, value)
        except ValueError as error:  # OptionValueError too: say which key
            raise ValueError(f"{key}: {error}") from None

    raw_faces = entry.get("faces", entry.get("face", []))
    raw_faces = raw_faces if isinstance(raw_faces, list) else [raw_faces]
    faces, weights = [], []
    for item in raw_faces:
        path, weight = weighted_path(str(item))
        faces.append(_photo(path, folder))
        weights.append(weight)
    for path in faces:
        if not Path(path).is_file():
            raise ValueError(f"{path}: file not found")

    if "seeds" in entry:
        seeds = entry["seeds"]
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
            raise ValueError(f"seeds: expected a non-empty list of whole numbers >= 0, got {seeds!r}")
    else:
        first, count = entry.get("seed", 0), entry.get("num_images", 1)
        if not (isinstance(first, int) and first >= 0 and isinstance(count, int) and count >= 1):
            raise ValueError("seed must be a whole number >= 0 and num_images a whole number >= 1")
        seeds = list(range(first, first + count))
    face_index = entry.get("face_index", defaults.get("face_index"))
    if face_index is not None and (isinstance(face_index, bool) or not isinstance(face_index, int)):
        raise ValueError(f"face_index: expected a whole number (0 = leftmost), got {face_index!r}")

    job = GenerationJob(
        method=spec.name,
        faces=faces,
        face_weights=weights if any(w != 1.0 for w in weights) else None,
        photo_face_index=face_index,
        options=options,
        num_images=len(seeds),
        seed=seeds[0],
        model=entry.get("model") or defaults.get("model"),
        allow_large=bool(defaults.get("allow_large", False)),
    )
    check_job(job)  # every image at once: the limits apply to the job as written
    stem = str(entry.get("id") or spec.name)
    if not stem or Path(stem).name != stem or stem in (".", ".."):
        raise ValueError(f"id: expected a plain file name, got {stem!r}")
    return JobLine(line=0, job=job, seeds=[int(s) for s in seeds], stem=stem)


def parse_job(entry: Mapping[str, Any], folder: str | os.PathLike = ".", **defaults: Any) -> JobLine:
    """One job entry (an object as on a job file's line) parsed and checked as :func:`read_job_file` checks each line.

    Args:
        entry: the job (``method``, ``faces``, ``seeds``, options by name...).
        folder: relative photo paths not found from the current folder are tried against this one.
        defaults: as for :func:`read_job_file`.

    Returns:
        A :class:`JobLine` with ``line = 0``.

    Raises:
        ValueError: the entry is refused (an :class:`~idfusion.errors.IdfusionError` for a job the method cannot
            run); the message names the key and what was expected.
    """
    if not isinstance(entry, Mapping):
        raise ValueError(f"expected a job object, got {type(entry).__name__}")
    return _parse_job(entry, Path(folder), defaults)


def read_job_file(path: str | os.PathLike, **defaults: Any) -> list[JobLine]:
    """Every job of ``path``, each parsed and checked, or with the reason it was refused (``error``).

    ``defaults``: ``method``, ``model``, ``face_index``, ``allow_large`` and ``options`` (option values by name, such
    as the command line's ``--steps``) for jobs that do not give them.

    Raises:
        JobFileError: the file itself is missing, unreadable or holds no jobs.
    """
    path = Path(path)
    lines: list[JobLine] = []
    for number, entry in _entries(path):
        if isinstance(entry, Exception):
            lines.append(JobLine(line=number, error=str(entry)))
            continue
        if not isinstance(entry, Mapping):
            lines.append(JobLine(line=number, error=f"expected a JSON object, got {type(entry).__name__}"))
            continue
        expanded = (
            _feedface_jobs(entry, str(defaults.get("method") or "feedface")) if "caption_list" in entry else [entry]
        )
        for job_entry in expanded:
            try:
                parsed = _parse_job(job_entry, path.parent, defaults)
            except (IdfusionError, ValueError, OSError) as error:
                lines.append(JobLine(line=number, error=str(error)))
                continue
            parsed.line = number
            lines.append(parsed)
    return lines


# ---- items, keys, shards -------------------------------------------------------------------------------------


def _file_hash(path: str, cache: dict[str, str]) -> str:
    if path not in cache:
        from .outputs import file_sha256

        cache[path] = file_sha256(path)
    return cache[path]


def _jsonable(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def item_key(job: Any, seed: int, hashes: dict[str, str]) -> str:
    """The SHA-256 that names one image of a batch: what it is made from, not where the files lie."""
    files = {
        dest: _file_hash(str(value), hashes)
        for dest, value in job.options.items()
        if isinstance(value, os.PathLike) and Path(value).is_file()
    }
    content = {
        "method": job.method,
        "model": job.model,
        "faces": [_file_hash(str(f), hashes) for f in job.faces],
        "face_weights": job.face_weights,
        "face_index": job.photo_face_index,
        "options": {k: files.get(k, _jsonable(v)) for k, v in sorted(job.options.items())},
        "seed": int(seed),
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def expand_items(lines: Sequence[JobLine]) -> list[BatchItem]:
    """One :class:`BatchItem` per seed of every good job, in file order."""
    from dataclasses import replace

    hashes: dict[str, str] = {}
    return [
        BatchItem(line.line, replace(line.job, num_images=1, seed=seed), line.stem, item_key(line.job, seed, hashes))
        for line in lines
        if line.error is None
        for seed in line.seeds
    ]


def shard_of(text: str | None = None) -> tuple[int, int]:
    """``(index, count)``: ``text`` ``"I/N"``, else the accelerate (torchrun) process, else ``(0, 1)``."""
    if text:
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise ValueError(f"--shard: expected I/N (e.g. 0/2), got {text!r}") from None
        if not 0 <= index < count:
            raise ValueError(f"--shard: expected 0 <= I < N, got {text!r}")
        return index, count
    count = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), count) if count > 1 else (0, 1)


def done_keys(out_dir: str | os.PathLike) -> set[str]:
    """The ``batch_key`` of every idfusion PNG in ``out_dir`` (only PNG chunks are read)."""
    from .errors import ImageError
    from .outputs import MetadataError, read_generation_metadata

    folder = Path(out_dir)
    keys: set[str] = set()
    if not folder.is_dir():
        return keys
    for path in folder.glob("*.png"):
        if path.name.startswith("."):
            continue
        try:
            key = read_generation_metadata(path).get("batch_key")
        except (MetadataError, ImageError, OSError):
            continue
        if key:
            keys.add(str(key))
    return keys


# ---- running -------------------------------------------------------------------------------------------------


def _peak_memory(device: str | None, reset: bool) -> tuple[float | None, str]:
    """``(MB, kind)``: CUDA's peak allocated memory on a CUDA device, else the process's peak resident set size."""
    torch = sys.modules.get("torch")  # a CUDA device means torch is already loaded; never import it here
    if device and device.startswith("cuda") and torch is not None and torch.cuda.is_available():
        index = torch.device(device).index
        if reset:
            torch.cuda.reset_peak_memory_stats(index)
            return None, "cuda-allocated"
        return torch.cuda.max_memory_allocated(index) / 2**20, "cuda-allocated"
    try:
        import resource
    except ImportError:  # Windows
        return None, "unavailable"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10), "process-peak-rss"  # bytes on macOS, KiB on Linux


@contextmanager
def measure(device: str | None = None) -> Iterator[dict[str, Any]]:
    """Wall time and peak memory of the ``with`` block, in the yielded dict once it ends: ``seconds``,
    ``peak_memory_mb`` and ``peak_memory_kind``.

    On a CUDA device the peak is ``torch.cuda.max_memory_allocated`` since the block began (weights included: what
    the GPU must hold). Elsewhere it is the process's peak resident set size so far (``"process-peak-rss"``), an
    upper bound that never goes down, since the CPU allocator keeps no per-block peak.
    """
    used: dict[str, Any] = {}
    _peak_memory(device, reset=True)
    start = time.perf_counter()
    try:
        yield used
    finally:
        used["seconds"] = time.perf_counter() - start
        used["peak_memory_mb"], used["peak_memory_kind"] = _peak_memory(device, reset=False)


def _mine(items: Sequence[BatchItem], index: int, count: int) -> Iterator[BatchItem]:
    return (item for position, item in enumerate(items) if position % count == index)


def run_batch(
    lines: Sequence[JobLine],
    out_dir: str | os.PathLike,
    settings: Any = None,
    *,
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
    loader: Callable[..., Any] | None = None,
) -> BatchReport:
    """Make every item of ``lines`` that this shard owns and the output folder does not hold yet.

    A job that fails (no face in a photo, ...) is reported with its line and the others still run. ``loader``
    replaces :func:`~idfusion.jobs.load_configured` (same arguments), e.g. to configure the pipelines' face models.
    """
    from tqdm.auto import tqdm

    from . import jobs
    from .atomic import check_output_folder
    from .jobs import LoadSettings, PipelineCache, save_results

    report = BatchReport(errors=[f"line {line.line}: {line.error}" for line in lines if line.error is not None])
    items = expand_items(lines)
    index, count = shard
    mine = list(_mine(items, index, count))
    report.other_shards = len(items) - len(mine)
    check_output_folder(out_dir)
    done = done_keys(out_dir)
    todo = [item for item in mine if item.key not in done]
    report.skipped = len(mine) - len(todo)
    load = loader or jobs.load_configured
    load_time = [0.0]

    def timed_load(*args: Any) -> Any:
        start = time.perf_counter()
        try:
            return load(*args)
        finally:
            load_time[0] += time.perf_counter() - start

    cache = PipelineCache(max_items=1, loader=timed_load)
    settings = settings or LoadSettings()
    failed_lines: set[int] = set()
    bar = tqdm(todo, desc=f"batch {index + 1}/{count}" if count > 1 else "batch", unit="image", disable=not progress)
    for item in bar:
        if item.line in failed_lines:
            continue
        try:
            loaded_before = load_time[0]
            with measure(settings.device) as used:
                result = jobs.run_job(item.job, settings, cache=cache)
            loading = load_time[0] - loaded_before
            per_image = max(used["seconds"] - loading, 0.0) / max(len(result.images), 1)
            for meta in result.metadata:
                meta["batch_key"] = item.key
                meta["generation_seconds"] = round(per_image, 4)
                if loading:
                    meta["load_seconds"] = round(loading, 3)
                if used["peak_memory_mb"] is not None:
                    meta["peak_memory_mb"] = round(used["peak_memory_mb"], 1)
                    meta["peak_memory_kind"] = used["peak_memory_kind"]
            report.written += save_results(result, out_dir, item.stem, sheet=False)
        except (IdfusionError, ValueError, OSError) as error:
            report.errors.append(f"line {item.line}: {error}")
            failed_lines.add(item.line)  # the same inputs would fail for its other seeds too
    return report
