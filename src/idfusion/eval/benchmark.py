"""Benchmark descriptions for ``idfusion eval``: a YAML file read into a checked :class:`Benchmark`.

Schema (every key optional unless marked; relative paths are relative to the YAML file)::

    name: my-benchmark               # default: the file's stem
    kind: photos                     # "world" or "photos" (default: "world" when a world: section is given)
    world:                           # kind world: render held-out identities of the synthetic world
      identities: 4                  #   K identities drawn from world.HELDOUT_IDENTITIES
      references: 2                  #   reference renders per identity (what the methods get)
      targets: 2                     #   held-out renders per identity (SimTarget, copy_geo, Fréchet distance)
      prompts: 4                     #   held-out captions (unless prompts: is given)
      seed: 0                        #   picks identities, poses and captions
      size: 64                       #   render side in pixels
    identities:                      # kind photos (required): one entry per person
      - name: alice
        references: [alice/ref.jpg]  #   files, folders (every image inside) or globs
        targets: [alice/heldout/]    #   held-out photos of the same person, never given to a method
        face_index: 0                #   optional: in photos with several people, the face to use
    prompts: [...]                   # photos: required; world: replaces the held-out captions
    methods:                         # "world" (every method with world weights), or a list of entries:
      - method: arc2face             #   required: a registered method
        label: arc2face-lcm          #   the row name (default: the method; labels must be unique)
        model: path/or/hub-id        #   default: the official release ("world": the method's world weights)
        prompt_subject: z            #   replace "a person" in every prompt (AdaFace's subject is "z")
        steps: 25                    #   any batch job option by name, or inside options: {...}
    baseline: true                   # world: the world base model, prompt only (the floor)
    oracle: true                     # world: renders of each identity with the prompt's attributes (the ceiling)
    seeds: [0, 1]                    # one image per identity, prompt, method and seed
    steps: 20                        # default sampling steps for every method (and the base model)
    judge: auto                      # world-judge (world default), dlib (photos default), onnx, world
    detector: auto                   # world (world default), hog, mmod, onnx (photos default: onnx if present)
    judge_models: DIR                # the judge's ONNX folder (default: the usual ONNX search)
    face_models: DIR                 # ONNX face models for the methods (generate's --face-models)
    allow_same_judge: false          # allow a judge that is a method's own conditioning encoder
    clip_model: openai/clip-vit-large-patch14   # photos: CLIP-T from local files only (else a note)
    fid: true                        # photos: FID/KID through torchmetrics when it and Inception are present
    device: cpu                      # device, dtype, cpu_offload, vae_tiling, attention_slicing, offline
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import IdfusionError

__all__ = [
    "BENCHMARKS_FOLDER",
    "Benchmark",
    "EvalConfigError",
    "IdentitySet",
    "MethodEntry",
    "WorldSettings",
    "conditioning_encoder",
    "default_benchmark",
    "load_benchmark",
    "parse_benchmark",
]

logger = logging.getLogger(__name__)

BENCHMARKS_FOLDER = Path(__file__).with_name("benchmarks")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
JUDGES = ("auto", "world-judge", "world", "dlib", "onnx")
DETECTORS = ("auto", "world", "hog", "mmod", "onnx")
# Keys of a method entry the benchmark sets itself, not the entry.
_HARNESS_JOB_KEYS = ("faces", "face", "seeds", "seed", "num_images", "prompt", "id")
_TOP_KEYS = {
    "name", "kind", "world", "identities", "prompts", "methods", "baseline", "oracle", "seeds", "steps", "judge",
    "detector", "judge_models", "face_models", "allow_same_judge", "clip_model", "fid", "device", "dtype",
    "cpu_offload", "vae_tiling", "attention_slicing", "offline", "description",
}  # fmt: skip


class EvalConfigError(IdfusionError, ValueError):
    """A benchmark description that cannot run as written (the message names the key)."""


@dataclass(frozen=True)
class WorldSettings:
    identities: int = 4
    references: int = 2
    targets: int = 2
    prompts: int = 4
    seed: int = 0
    size: int = 64


@dataclass
class IdentitySet:
    """One person: the photos the methods get and held-out photos of the same person."""

    name: str
    references: list[Path]
    targets: list[Path]
    face_index: int | None = None
    world_seed: int | None = None  # the world identity seed (world benchmarks)


@dataclass
class MethodEntry:
    """One row of the benchmark: a method with its model and job options (as in a batch job entry)."""

    label: str
    method: str
    model: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    prompt_subject: str | None = None

    def prompt(self, text: str) -> str:
        if self.prompt_subject and "a person" in text:
            return text.replace("a person", self.prompt_subject, 1)
        return text


@dataclass
class Benchmark:
    """A checked benchmark description (see the module docstring for the YAML schema)."""

    name: str
    kind: str  # "world" or "photos"
    identities: list[IdentitySet]
    prompts: list[str]
    methods: list[MethodEntry]
    seeds: list[int]
    judge: str
    detector: str
    world: WorldSettings | None = None
    baseline: bool = False
    oracle: bool = False
    steps: int | None = None
    judge_models: Path | None = None
    face_models: Path | None = None
    allow_same_judge: bool = False
    clip_model: str | None = "openai/clip-vit-large-patch14"
    fid: bool = True
    device: str | None = None
    dtype: str | None = None
    cpu_offload: bool = False
    vae_tiling: bool = False
    attention_slicing: bool = False
    offline: bool | None = None
    folder: Path = field(default_factory=Path.cwd)  # the YAML's folder
    source: str = "<dict>"
    notes: list[str] = field(default_factory=list)

    def entry(self, name: str) -> MethodEntry:
        """The entry labelled ``name``, else the only entry of method ``name``."""
        for entry in self.methods:
            if entry.label == name:
                return entry
        matches = [e for e in self.methods if e.method == name]
        if len(matches) == 1:
            return matches[0]
        labels = ", ".join(e.label for e in self.methods) or "none"
        raise EvalConfigError(f"no method entry {name!r} in {self.source} (entries: {labels})")


def default_benchmark() -> Path:
    """The shipped world benchmark (``idfusion/eval/benchmarks/world.yaml``)."""
    return BENCHMARKS_FOLDER / "world.yaml"


def load_benchmark(path: str | os.PathLike | None = None) -> Benchmark:
    """Read and check a benchmark YAML (default: :func:`default_benchmark`).

    Raises:
        EvalConfigError: the file is missing, not YAML, or a key is wrong (the message names it).
    """
    import yaml

    path = Path(path) if path is not None else default_benchmark()
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EvalConfigError(f"{path}: benchmark file not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise EvalConfigError(f"{path}: cannot read the benchmark file ({error})") from None
    except yaml.YAMLError as error:
        raise EvalConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(document, Mapping):
        raise EvalConfigError(f"{path}: expected a YAML mapping of benchmark settings")
    return parse_benchmark(document, folder=path.resolve().parent, name=path.stem, source=str(path))


def _bool(data: Mapping[str, Any], key: str, default: bool) -> bool:
    value = data.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise EvalConfigError(f"{key}: expected true or false, got {value!r}")
    return value


def _whole(value: Any, key: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise EvalConfigError(f"{key}: expected a whole number >= {minimum}, got {value!r}")
    return value


def _path(value: Any, folder: Path) -> Path:
    path = Path(str(value)).expanduser()
    return path if path.is_absolute() else folder / path


def _photos(value: Any, folder: Path, key: str) -> list[Path]:
    items = value if isinstance(value, list) else [value]
    found: list[Path] = []
    for item in items:
        if not isinstance(item, (str, os.PathLike)):
            raise EvalConfigError(f"{key}: expected paths, got {item!r}")
        path = _path(item, folder)
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif any(ch in str(item) for ch in "*?["):
            found += sorted(Path(p) for p in glob.glob(str(path)) if Path(p).suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found.append(path)
        else:
            raise EvalConfigError(f"{key}: {path}: file not found")
    if not found:
        raise EvalConfigError(f"{key}: no photos found in {value!r}")
    return found


def _identities(value: Any, folder: Path) -> list[IdentitySet]:
    if not isinstance(value, list) or not value:
        raise EvalConfigError("identities: expected a list of {name, references, targets} (a photos benchmark)")
    out: list[IdentitySet] = []
    for k, item in enumerate(value):
        where = f"identities[{k}]"
        if not isinstance(item, Mapping):
            raise EvalConfigError(f"{where}: expected a mapping with name, references and targets")
        unknown = set(item) - {"name", "references", "targets", "face_index"}
        if unknown:
            raise EvalConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        name = str(item.get("name") or f"id{k}")
        if Path(name).name != name or name in (".", ".."):
            raise EvalConfigError(f"{where}.name: expected a plain name (no slashes), got {name!r}")
        for key in ("references", "targets"):
            if item.get(key) in (None, [], ""):
                raise EvalConfigError(f"{where}.{key}: required (held-out targets are what SimTarget compares to)")
        face_index = item.get("face_index")
        if face_index is not None:
            face_index = _whole(face_index, f"{where}.face_index")
        out.append(
            IdentitySet(
                name=name,
                references=_photos(item["references"], folder, f"{where}.references"),
                targets=_photos(item["targets"], folder, f"{where}.targets"),
                face_index=face_index,
            )
        )
    names = [i.name for i in out]
    if len(set(names)) != len(names):
        raise EvalConfigError(f"identities: names must be unique, got {names}")
    return out


def _method_entries(value: Any, kind: str, notes: list[str]) -> list[MethodEntry]:
    from ..registry import get_method

    if value is None:
        value = "world" if kind == "world" else []
    if value == "world":
        from ..world.demo import world_methods

        found = world_methods()
        if not found:
            notes.append(
                "no identity method has world weights yet (idfusion/world/weights/methods/<method>/), so the table "
                "holds the baseline and reference rows only"
            )
        return [MethodEntry(label=name, method=name, model=str(folder)) for name, folder in found]
    if not isinstance(value, list):
        raise EvalConfigError('methods: expected "world" or a list of {method, model, options...} entries')
    entries: list[MethodEntry] = []
    for k, item in enumerate(value):
        where = f"methods[{k}]"
        if isinstance(item, str):
            item = {"method": item}
        if not isinstance(item, Mapping) or not item.get("method"):
            raise EvalConfigError(f"{where}: expected a mapping with a method")
        try:
            spec = get_method(str(item["method"]))
        except ValueError as error:
            raise EvalConfigError(f"{where}: {error}") from None
        given = [key for key in _HARNESS_JOB_KEYS if key in item]
        if given:
            raise EvalConfigError(
                f"{where}: {', '.join(given)} come from the benchmark's identities, prompts and seeds; remove them"
            )
        options = dict(item.get("options") or {})
        if not isinstance(options, dict):
            raise EvalConfigError(f"{where}.options: expected a mapping of job options")
        options.update({k: v for k, v in item.items() if k not in {"method", "label", "model", "options",
                                                                     "prompt_subject"}})  # fmt: skip
        model = item.get("model")
        if model == "world":
            from ..world.demo import world_methods

            worlds = dict(world_methods())
            if spec.name not in worlds:
                raise EvalConfigError(f"{where}: {spec.name} has no world weights (idfusion/world/weights/methods/)")
            model = str(worlds[spec.name])
        entries.append(
            MethodEntry(
                label=str(item.get("label") or spec.name),
                method=spec.name,
                model=None if model is None else str(model),
                options=options,
                prompt_subject=item.get("prompt_subject"),
            )
        )
    labels = [e.label for e in entries]
    if len(set(labels)) != len(labels):
        raise EvalConfigError(f"methods: labels must be unique (add label: to tell entries apart), got {labels}")
    for label in labels:
        if Path(label).name != label or "__" in label or label in ("base", "renders"):
            raise EvalConfigError(f"methods: label {label!r} must be a plain name without '__' (not base/renders)")
    return entries


def _world_identities(settings: WorldSettings) -> list[IdentitySet]:
    """The K held-out identities (their photos are rendered into the work folder by the harness)."""
    import numpy as np

    from ..world.identity import HELDOUT_IDENTITIES, identity_name

    rng = np.random.default_rng([0xE7A1, settings.seed])
    seeds = rng.choice(np.asarray(HELDOUT_IDENTITIES), settings.identities, replace=False)
    return [IdentitySet(name=identity_name(int(s)), references=[], targets=[], world_seed=int(s)) for s in seeds]


def _world_prompts(settings: WorldSettings) -> list[str]:
    from ..world.attributes import caption
    from ..world.base import heldout_prompts

    # one person per caption: the identity scores compare one generated face with one person
    return [caption(a) for a in heldout_prompts(settings.prompts, seed=2000 + settings.seed)]


def conditioning_encoder(spec: Any, kind: str) -> str | None:
    """The recognizer (a judge name) whose embedding ``spec``'s method is conditioned on, or ``None``.

    Methods with ``identity == "embedding"`` consume a recognizer's embedding: in the world the conditioning
    recognizer ``"world"``, on photos their pipeline's (``"onnx"``: Arc2Face's ``arcface.onnx``). Photo methods
    condition on the pixels (FlashFace, FeedFace) or on a recognizer no judge here uses (FACT's TransFace).
    """
    if spec.identity != "embedding":
        return None
    if kind == "world":
        return "world"
    try:
        from ..registry import pipeline_class

        return getattr(pipeline_class(spec.name).face_analysis, "recognizer", None) or "onnx"
    except (ImportError, AttributeError):  # pragma: no cover - a pipeline that cannot be imported still has one
        return "onnx"


def _onnx_present(folder: Path | None) -> bool:
    from ..errors import ModelFilesError
    from ..faces.onnx_backend import find_onnx_models, resolve_onnx_model_dir

    try:
        find_onnx_models(resolve_onnx_model_dir(folder))
    except ModelFilesError:
        return False
    return True


def _choose_judge(bench: Benchmark, wanted: str) -> str:
    from ..registry import get_method

    encoders = {e.label: conditioning_encoder(get_method(e.method), bench.kind) for e in bench.methods}
    if wanted == "auto":
        if bench.kind == "world":
            return "world-judge"
        if _onnx_present(bench.judge_models) and "onnx" not in encoders.values():
            return "onnx"
        if _onnx_present(bench.judge_models):
            bench.notes.append(
                "judge: dlib, not the ONNX recognizer found, because it is the conditioning encoder of "
                f"{', '.join(k for k, v in encoders.items() if v == 'onnx')}"
            )
        return "dlib"
    same = [label for label, encoder in encoders.items() if encoder == wanted]
    if same and not bench.allow_same_judge:
        which = "the world's conditioning recognizer" if wanted == "world" else f"the {wanted!r} recognizer"
        raise EvalConfigError(
            f"judge {wanted!r} is {which}, the encoder {', '.join(same)} is conditioned on: scoring a method with "
            "its own encoder flatters it (PuLID and FlashFace score with a different recognizer). Use another "
            "judge (world-judge in the world, dlib or a different ONNX network on photos), or set "
            "allow_same_judge: true if the judge's model really is another network"
        )
    if same:
        bench.notes.append(f"judge {wanted} is the conditioning encoder of {', '.join(same)} (allow_same_judge)")
    return wanted


def parse_benchmark(
    data: Mapping[str, Any],
    *,
    folder: str | os.PathLike | None = None,
    name: str = "benchmark",
    source: str = "<dict>",
) -> Benchmark:
    """Check a benchmark description (a mapping as read from YAML); see the module docstring for the keys.

    Raises:
        EvalConfigError: naming the key that is wrong, or refusing a judge that is a method's own encoder.
    """
    folder = Path(folder) if folder is not None else Path.cwd()
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise EvalConfigError(
            f"{source}: unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(_TOP_KEYS))})"
        )
    kind = data.get("kind") or ("world" if "world" in data else "photos")
    if kind not in ("world", "photos"):
        raise EvalConfigError(f"kind: expected world or photos, got {kind!r}")
    notes: list[str] = []
    world = None
    if kind == "world":
        raw = data.get("world") or {}
        if not isinstance(raw, Mapping):
            raise EvalConfigError("world: expected a mapping (identities, references, targets, prompts, seed, size)")
        bad = set(raw) - set(WorldSettings.__dataclass_fields__)
        if bad:
            raise EvalConfigError(f"world: unknown key(s) {', '.join(sorted(bad))}")
        values = {key: _whole(value, f"world.{key}", 0 if key == "seed" else 1) for key, value in raw.items()}
        if values.get("size", 64) < 32:
            raise EvalConfigError("world.size: renders are at least 32 px")
        world = WorldSettings(**values)
        if "identities" in data:
            raise EvalConfigError("identities: a world benchmark renders its identities (set world.identities: K)")
        identities = _world_identities(world)
    else:
        if "world" in data:
            raise EvalConfigError("world: only for kind: world")
        identities = _identities(data.get("identities"), folder)
    prompts = data.get("prompts")
    if prompts is None and kind == "world":
        prompts = _world_prompts(world)
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise EvalConfigError("prompts: expected a non-empty list of prompts")
    seeds = data.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds:
        raise EvalConfigError(f"seeds: expected a non-empty list of whole numbers, got {seeds!r}")
    seeds = [_whole(s, "seeds") for s in seeds]
    if len(set(seeds)) != len(seeds):
        raise EvalConfigError(f"seeds: expected distinct seeds, got {seeds}")
    for key in ("baseline", "oracle"):
        if key in data and kind != "world":
            raise EvalConfigError(f"{key}: only for kind: world (the world base model and renders)")
    steps = data.get("steps")
    judge = data.get("judge") or "auto"
    detector = data.get("detector") or "auto"
    if judge not in JUDGES:
        raise EvalConfigError(f"judge: expected one of {', '.join(JUDGES)}, got {judge!r}")
    if detector not in DETECTORS:
        raise EvalConfigError(f"detector: expected one of {', '.join(DETECTORS)}, got {detector!r}")
    if kind == "photos" and judge in ("world", "world-judge"):
        raise EvalConfigError(f"judge: {judge} recognizes world renders only; on photos use dlib or onnx")
    if kind == "world" and judge in ("dlib", "onnx"):
        notes.append(f"judge {judge} on world renders: it was not trained on them, so its scores say little")
    bench = Benchmark(
        name=str(data.get("name") or name),
        kind=kind,
        identities=identities,
        prompts=[p.strip() for p in prompts],
        methods=_method_entries(data.get("methods"), kind, notes),
        seeds=seeds,
        judge=judge,
        detector=detector,
        world=world,
        baseline=_bool(data, "baseline", kind == "world"),
        oracle=_bool(data, "oracle", kind == "world"),
        steps=None if steps is None else _whole(steps, "steps", 1),
        judge_models=None if data.get("judge_models") is None else _path(data["judge_models"], folder),
        face_models=None if data.get("face_models") is None else _path(data["face_models"], folder),
        allow_same_judge=_bool(data, "allow_same_judge", False),
        clip_model=data.get("clip_model", "openai/clip-vit-large-patch14"),
        fid=_bool(data, "fid", True),
        device=data.get("device"),
        dtype=data.get("dtype"),
        cpu_offload=_bool(data, "cpu_offload", False),
        vae_tiling=_bool(data, "vae_tiling", False),
        attention_slicing=_bool(data, "attention_slicing", False),
        offline=data.get("offline"),
        folder=folder,
        source=source,
        notes=notes,
    )
    bench.judge = _choose_judge(bench, judge)
    if detector == "auto":
        bench.detector = "world" if kind == "world" else ("onnx" if _onnx_present(bench.judge_models) else "hog")
    if not bench.methods and not (bench.baseline or bench.oracle):
        raise EvalConfigError("methods: nothing to evaluate (no method entries, no baseline)")
    return bench


def check_entries(bench: Benchmark, references: Sequence[Path]) -> None:
    """Parse one job of every method entry as the batch parser does, so a wrong option fails before any model loads.

    Raises:
        EvalConfigError: naming the entry and the option.
    """
    from ..batch import parse_job

    for entry in bench.methods:
        job = {**job_options(bench, entry), "method": entry.method, "faces": [str(p) for p in references]}
        try:
            parse_job(job, bench.folder, model=entry.model)
        except (IdfusionError, ValueError) as error:
            raise EvalConfigError(f"methods: {entry.label}: {error}") from None


def job_options(bench: Benchmark, entry: MethodEntry) -> dict[str, Any]:
    """The entry's job options with the benchmark's defaults (``steps``) under them."""
    options = {} if bench.steps is None else {"steps": bench.steps}
    return {**options, **entry.options}
