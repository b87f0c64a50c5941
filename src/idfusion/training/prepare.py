"""Photos to a training set: ``idfusion prepare`` and :func:`prepare_dataset`.

Input is a folder of photos or a list file:

* a folder with one sub-folder per identity (``INPUT/alice/*.jpg``; the sub-folder name is the identity id, photos
  deeper down belong to the first-level sub-folder's identity);
* photos directly in the folder: the identity is ``{"identity": "..."}`` from a sidecar ``<stem>.json`` if there is
  one, else the file stem without a trailing number (``alice_01.jpg``, ``alice-2.png`` and ``alice 3.jpg`` are all
  ``alice``; a stem with no trailing number is its own identity);
* a list file, one path per line with an optional ``<TAB>identity`` (relative paths from the list file's folder, or
  from ``INPUT`` when both are given; ``#`` starts a comment line); without an identity column the sidecar and
  stem rules apply. A sidecar ``<stem>.json`` wins over the sub-folder name.

Image files are ``.jpg .jpeg .png .webp .bmp .tif .tiff``; hidden files and folders are left out. A caption comes
from a sidecar ``<stem>.txt`` (UTF-8), else from the captioning model given (``caption_model``, a transformers
image-to-text model, loaded only when asked for), else it is empty.

Output (``OUT``; every path in a record is relative to ``OUT``, or absolute with ``absolute_paths``)::

    metadata.jsonl        the training set: one record per kept photo (schema: docs/training-data.md)
    skipped.jsonl         one line per skipped photo: {"input", "identity", "reason", "message", ...}
    summary.json          the run's counts, thresholds and observed values (also returned as PrepareSummary)
    crops/<kind>/         face crops per kind (CROP_KINDS), PNG
    masks/face/           face masks (brows to chin), masks/head/: head masks (face, hair, crown); PNG, 255 = in
    embeddings/<model>/   identity embeddings (.npy, float32) when a recognizer is given
    images/               upright RGB copies of photos that other readers would see differently (EXIF-rotated,
                          RGBA, palette, CMYK, 16-bit, ...); other photos are referenced where they are
    state/                one JSON file per input photo: what a re-run reuses

One record of ``metadata.jsonl`` (pretty-printed here; ``docs/training-data.md`` describes every field)::

    {"image": "../photos/obama/obama.jpg", "width": 910, "height": 1137,
     "caption": "a photo of a man in a suit",
     "identity": "obama",
     "faces": [{"bbox": [366.0, 136.0, 624.0, 394.0], "landmarks": [[x, y] x 5], "score": 2.4154}],
     "references": ["../photos/obama/obama_partial_face.jpg", "images/f4/obama_rgba-f4c6a24054.png"],
     "mask": "masks/face/18/obama-18037b3a8d.png", "head_mask": "masks/head/18/obama-18037b3a8d.png",
     "crops": {"arcface": "crops/arcface/18/obama-18037b3a8d.png", "flashface": ..., "open-flashface": ...,
               "feedface": ..., "fact": ...},
     "reference_crops": {"arcface": [<crops["arcface"] of each reference, in order>], "flashface": [...], ...},
     "embeddings": {},                           # {"dlib-resnet": "embeddings/dlib-resnet/18/....npy"} with one
     "attributes": {"source": "/data/photos/obama/obama.jpg", "blur": 2026.6, "face_size": 258.0,
                    "faces_found": 1, "caption_source": "sidecar"},
     "path": <image>, "size": [910, 1137], "ref": <reference_crops["open-flashface"]>,    # open FlashFace train.py
     "mask_path": <head_mask>, "square_bbox": [353, 123, 636, 406], "bbox": <faces[0].bbox>}  # FeedFace

``references`` are the identity's other kept photos (never the image itself), ``reference_crops`` their crops. The
last six keys make it a *combined* record (``training/data.py``): open FlashFace's and FeedFace's trainers read the
file without conversion, and idfusion's reader checks that those keys agree with its own.

Quality filters, applied in this order (the first that fails is the reason in ``skipped.jsonl``):

``unreadable``/``too-large`` (the file cannot be decoded, or has more than ``max_pixels``), ``no-face``,
``face-too-small`` (no face's shorter box side reaches ``min_face_size``), ``low-score`` (no such face scores
``min_score``), ``several-faces`` (more than one face passes both, unless ``keep_largest``), ``bad-landmarks`` (a
landmark outside the face's box), ``blurry`` (the face's :func:`face_sharpness` is below ``blur``), then per
identity ``too-few-photos`` (fewer than ``min_photos`` photos kept). ``bad-sidecar``, ``duplicate`` (a list file
naming a photo twice) and ``error`` (an unexpected failure on one photo; the run goes on) complete the list.

Resuming: each photo's result is stored in ``state/`` under a hash of its path, with its size and modification
time and a hash of the settings that change per-photo results (detector, recognizer, thresholds, crops); a re-run
reuses every entry that still matches and processes the rest. Captions, identities, ``min_photos`` and the path
style are applied when the set is assembled, so changing them re-processes nothing. Inputs are only read.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import statistics
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import IdfusionError
from ..images import DEFAULT_MAX_PIXELS

if TYPE_CHECKING:
    from .data import ImageRecord

__all__ = [
    "CROP_KINDS",
    "DEFAULT_BLUR",
    "DEFAULT_MIN_FACE_SIZE",
    "DEFAULT_MIN_PHOTOS",
    "IMAGE_SUFFIXES",
    "METADATA_FILE",
    "REASONS",
    "PrepareError",
    "PrepareSummary",
    "check_dataset",
    "face_sharpness",
    "identity_from_stem",
    "load_captioner",
    "prepare_dataset",
]

logger = logging.getLogger(__name__)

METADATA_FILE = "metadata.jsonl"  # the name the world's write_dataset uses too
SKIPPED_FILE = "skipped.jsonl"
SUMMARY_FILE = "summary.json"
STATE_DIR = "state"
# Bump when a per-photo result changes meaning: every stored state is then stale and each photo is processed again.
STATE_VERSION = 1

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")

#: Face crops written per photo, name -> side in pixels:
#: ``arcface`` the 112 ArcFace-template crop (Arc2Face, AdaFace and every ArcFace recognizer);
#: ``flashface`` the official FlashFace reference (detector box rotated level, padded to a black square, 224);
#: ``open-flashface`` the open release's reference (the ArcFace template at 256; what ``ref`` lists);
#: ``feedface`` FeedFace's face input (a square of 1.1x the box's long side, 224);
#: ``fact`` FACT's face input (the photo with everything outside the head set to 0, ArcFace template at 112).
CROP_KINDS = {"arcface": 112, "flashface": 224, "open-flashface": 256, "feedface": 224, "fact": 112}
REF_KIND = "open-flashface"  # the crops the open FlashFace trainer reads from "ref"
_FEEDFACE_SCALE = 1.1  # methods/feedface.py FACE_CROP_SCALE

#: Default smallest face (shorter side of the detector box, px). The ArcFace crop is 112 px and the FlashFace and
#: FeedFace references 224-256 px: a face under 64 px would be upsampled more than 1.75x into the smallest of them.
#: The real test photos' faces are 87-124 px (group_six_faces.jpg) and 90-267 px (the single portraits).
DEFAULT_MIN_FACE_SIZE = 64
#: Default blur threshold: :func:`face_sharpness` (variance of the Laplacian inside the face on the 112 ArcFace
#: crop). Measured on the real photos in shared/data/faces: every face 194-2133 (the six 87-124 px faces of
#: group_six_faces.jpg 194-297, tom_hanks_aligned_112.png 502, the three Obama portraits 2027-2133); the portraits
#: blurred with a Gaussian of sigma 2: 246-341, sigma 3: 104-148, sigma 4: 52-84, sigma 6: 16-59. 100 keeps every
#: real face with a 2x margin and drops what is visibly soft at the 112 px the identity encoders see.
DEFAULT_BLUR = 100.0
#: An identity needs a second photo to have a same-identity reference that is not the target image itself.
DEFAULT_MIN_PHOTOS = 2
# The world's faces are 12-60 px renders of a 64 px image: its detector's own minimum (8 px) and no blur filter fit
# them (60 renders of 20 identities at 64 px measure 19-118 sharpness, median 49: soft by construction, not blur).
_WORLD_DEFAULTS = {"min_face_size": 8, "blur": 0.0}

# Face region of the 112 ArcFace template the sharpness is measured in (x1, y1, x2, y2): cheek to cheek, brows to
# chin. Background and hair would make the measure depend on the scene rather than on the face.
_SHARPNESS_REGION = (24, 32, 88, 104)

#: Skip reasons, code -> what it means.
REASONS = {
    "unreadable": "the file cannot be read or decoded as an image (empty, truncated, not an image)",
    "too-large": "the image has more pixels than max_pixels",
    "bad-sidecar": "the photo's <stem>.json sidecar is not valid JSON with a string 'identity'",
    "duplicate": "the list names this photo more than once",
    "no-face": "the detector found no face",
    "face-too-small": "every face is smaller than min_face_size",
    "low-score": "no face large enough scores min_score",
    "several-faces": "more than one face passes the size and score filters",
    "bad-landmarks": "a landmark of the face lies outside its box (an unreliable fit)",
    "blurry": "the face's sharpness is below the blur threshold",
    "too-few-photos": "the identity has fewer than min_photos kept photos",
    "error": "an unexpected error on this photo (see the message)",
}


class PrepareError(IdfusionError, ValueError):
    """The input or the settings of a prepare run are unusable; the message says which and why."""


# ----------------------------------------------------------------------------------------------------------------
# Settings, inputs, summary
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Settings:
    """Everything that changes one photo's result (its hash keys the stored state)."""

    detector: str
    recognizer: str
    model_dir: str | None
    upsample: int | None
    min_face_size: float
    min_score: float | None
    keep_largest: bool
    blur: float
    crops: tuple[str, ...]
    max_pixels: int | None

    def key(self) -> str:
        text = json.dumps({"version": STATE_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class _Photo:
    path: Path  # absolute
    identity: str
    key: str  # hash of the path: names the state file and this photo's output files

    @property
    def stem(self) -> str:
        return _slug(self.path.stem)


@dataclass
class PrepareSummary:
    """What a :func:`prepare_dataset` run did. ``format()`` is the text the CLI prints."""

    out_dir: Path
    metadata: Path
    skipped_file: Path
    inputs: int  # photos found (image files, list entries)
    processed: int  # analysed in this run
    reused: int  # taken from the state of an earlier run
    kept: int  # records in metadata.jsonl
    identities: dict[str, int]  # kept identity -> its kept photos
    skipped: dict[str, int]  # reason -> count
    thresholds: dict[str, Any]
    ignored: int = 0  # files in the input folder that are neither images nor sidecars
    observed: dict[str, Any] = field(default_factory=dict)  # min/median/max of blur and face size of kept faces

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("out_dir", "metadata", "skipped_file"):
            out[key] = str(out[key])
        out["skipped_total"] = self.skipped_total
        return out

    def format(self) -> str:
        t = self.thresholds
        people = ", ".join(f"{name}: {count}" for name, count in sorted(self.identities.items()))
        lines = [
            f"kept {self.kept} photo(s) of {len(self.identities)} identit{'y' if len(self.identities) == 1 else 'ies'}"
            f" -> {self.metadata}",
            f"inputs: {self.inputs} photo(s); processed {self.processed}, reused {self.reused} from an earlier run"
            + (f"; {self.ignored} other file(s) ignored" if self.ignored else ""),
        ]
        if people:
            lines.append(f"identities: {people}")
        lines.append(f"skipped: {self.skipped_total}" + (f" (listed in {self.skipped_file})" if self.skipped else ""))
        width = max((len(reason) for reason in self.skipped), default=0)
        for reason, count in sorted(self.skipped.items(), key=lambda item: (-item[1], item[0])):
            lines.append(f"  {reason:<{width}}  {count}")
        score = "none (the detector's own)" if t["min_score"] is None else f"{t['min_score']:g}"
        lines.append(
            f"thresholds: min face size {t['min_face_size']:g} px, min score {score}, faces: "
            f"{'the largest' if t['keep_largest'] else 'exactly one'}, blur >= {t['blur']:g} (variance of the "
            f"Laplacian on the 112 px ArcFace crop), min photos {t['min_photos']} per identity; "
            f"detector {t['detector']}, recognizer {t['recognizer']}"
        )
        for name, unit in (("blur", ""), ("face_size", " px")):
            if name in self.observed:
                low, mid, high = (self.observed[name][k] for k in ("min", "median", "max"))
                lines.append(
                    f"kept faces' {name.replace('_', ' ')}: min {low:.0f}, median {mid:.0f}, max {high:.0f}{unit}"
                )
        return "\n".join(lines)


def _slug(text: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "photo"
    return slug[:60]


def _hash(text: str, length: int = 10) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:length]


_TRAILING_NUMBER = re.compile(r"(.*[^\d\s._-])[\s._-]*\d+")


def identity_from_stem(stem: str) -> str:
    """The identity of a photo directly in the input folder: its stem without a trailing number
    (``alice_01`` -> ``alice``); a stem without one is its own identity."""
    match = _TRAILING_NUMBER.fullmatch(stem)
    return match.group(1) if match else stem


def _sidecar_identity(path: Path) -> str | None:
    """``{"identity": "..."}`` from ``<stem>.json`` beside the photo; raises ValueError if it is unusable."""
    sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        return None
    try:
        document = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{sidecar}: not readable JSON ({error})") from None
    identity = document.get("identity") if isinstance(document, dict) else None
    if not isinstance(identity, str) or not identity.strip():
        raise ValueError(f"{sidecar}: expected an object with a non-empty string 'identity'")
    return identity.strip()


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _collect(input_dir: Path | None, list_file: Path | None) -> tuple[list[_Photo], list[dict[str, Any]], int]:
    """The photos to prepare, the entries skipped before any analysis, and the count of ignored files."""
    entries: list[tuple[Path, str | None]] = []  # (absolute path, identity or None)
    ignored = 0
    if list_file is not None:
        if not list_file.is_file():
            raise PrepareError(f"{list_file}: list file not found")
        base = input_dir if input_dir is not None else list_file.parent
        try:
            lines = list_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise PrepareError(f"{list_file}: cannot read the list file ({error})") from None
        for line in lines:
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            name, _, identity = line.partition("\t")
            path = Path(name.strip()).expanduser()
            entries.append(((base / path).absolute() if not path.is_absolute() else path, identity.strip() or None))
        source = str(list_file)
    else:
        assert input_dir is not None
        for folder, dirs, files in os.walk(input_dir):
            here = Path(folder)
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                path = here / name
                if name.startswith("."):
                    continue
                if not _is_image_name(path):
                    sidecar = path.suffix.lower() in (".txt", ".json") and any(
                        path.with_suffix(s).exists() or path.with_suffix(s.upper()).exists() for s in IMAGE_SUFFIXES
                    )
                    ignored += 0 if sidecar else 1
                    continue
                parts = path.relative_to(input_dir).parts
                entries.append((path.absolute(), parts[0] if len(parts) > 1 else None))
        source = str(input_dir)
    if not entries:
        where = "lists no photos" if list_file is not None else "has no photos"
        raise PrepareError(f"{source}: {where} (looked for {' '.join(IMAGE_SUFFIXES)} files)")

    photos, skipped, seen = [], [], set()
    for path, identity in entries:
        shown = str(path)
        if path in seen:
            skipped.append({"input": shown, "reason": "duplicate", "message": "listed more than once"})
            continue
        seen.add(path)
        if list_file is None or identity is None:  # a sidecar wins over the sub-folder, not over the list
            try:
                identity = _sidecar_identity(path) or identity
            except ValueError as error:
                skipped.append({"input": shown, "reason": "bad-sidecar", "message": str(error)})
                continue
        identity = identity or identity_from_stem(path.stem)
        photos.append(_Photo(path, identity, _hash(shown, 16)))
    return photos, skipped, ignored


def _resolve_defaults(detector: str, min_face_size: float | None, blur: float | None) -> tuple[float, float]:
    world = detector == "world"
    if min_face_size is None:
        min_face_size = _WORLD_DEFAULTS["min_face_size"] if world else DEFAULT_MIN_FACE_SIZE
    if blur is None:
        blur = _WORLD_DEFAULTS["blur"] if world else DEFAULT_BLUR
    return float(min_face_size), float(blur)


# ----------------------------------------------------------------------------------------------------------------
# One photo
# ----------------------------------------------------------------------------------------------------------------


def face_sharpness(image: np.ndarray, landmarks: np.ndarray) -> float:
    """Variance of the Laplacian of the face, measured on its 112 px ArcFace-template crop (grey levels).

    The crop fixes the scale (a large photo of a soft face and a small sharp face are compared at the size identity
    encoders see); only pixels that come from the photo (not the black border a face cut by the frame gets) and lie
    in the face region of the template count. Sharp faces measure in the hundreds to thousands; see
    :data:`DEFAULT_BLUR` for the values of the real test photos.
    """
    import cv2

    from ..faces import align_face

    crop = align_face(image, landmarks, size=112)
    inside = align_face(np.full(image.shape[:2] + (1,), 255, np.uint8), landmarks, size=112)
    # the Laplacian's 3x3 kernel sees the border one pixel away: erode the valid area by that much
    inside = cv2.erode((np.asarray(inside) > 0).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    region = np.zeros((112, 112), bool)
    x1, y1, x2, y2 = _SHARPNESS_REGION
    region[y1:y2, x1:x2] = True
    laplacian = cv2.Laplacian(cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY), cv2.CV_64F)
    values = laplacian[inside & region]
    return float(values.var()) if values.size > 16 else 0.0


def _flashface_crop(image: np.ndarray, bbox: np.ndarray, landmarks: np.ndarray, size: int) -> np.ndarray:
    """``pipelines/pipeline_flashface.py: reference_crop`` (official release, unclamped box), without its torch
    import: the rounded box (black outside the photo), rotated so the eyes are level, long side to ``size``,
    padded to a black square."""
    import math

    import PIL.Image

    box = tuple(int(round(float(v))) for v in bbox)
    crop = PIL.Image.fromarray(image).crop(box)
    (lx, ly), (rx, ry) = landmarks[0], landmarks[1]
    crop = crop.rotate(math.degrees(math.atan2(ry - ly, rx - lx)))
    scale = size / max(crop.size)
    crop = crop.resize((max(1, round(crop.width * scale)), max(1, round(crop.height * scale))))
    canvas = PIL.Image.new("RGB", (size, size))
    canvas.paste(crop, ((size - crop.width) // 2, (size - crop.height) // 2))
    return np.asarray(canvas)


def _feedface_square(bbox: Sequence[float]) -> tuple[int, int, int, int]:
    """FeedFace's crop square (``methods/feedface.py: face_crop``): the box truncated to integers, a square of side
    ``int(1.1 * long side)`` on its centre. This is the record's ``square_bbox``."""
    x1, y1, x2, y2 = (int(v) for v in bbox[:4])
    w, h = x2 - x1, y2 - y1
    side = int(max(w, h) * _FEEDFACE_SCALE)
    left, top = int(x1 + w / 2 - side / 2), int(y1 + h / 2 - side / 2)
    return left, top, left + side, top + side


def _feedface_crop(image: np.ndarray, square: tuple[int, int, int, int], size: int) -> np.ndarray:
    """``methods/feedface.py: face_crop`` without its torch import: the square, zero-padded outside the photo,
    resized (bilinear) to ``size``."""
    import PIL.Image

    left, top, right, _ = square
    side = right - left
    canvas = np.zeros((side, side, 3), np.uint8)
    height, width = image.shape[:2]
    x0, y0, x1, y1 = max(left, 0), max(top, 0), min(left + side, width), min(top + side, height)
    if x1 > x0 and y1 > y0:
        canvas[y0 - top : y1 - top, x0 - left : x1 - left] = image[y0:y1, x0:x1]
    if side == size:
        return canvas
    return np.asarray(PIL.Image.fromarray(canvas).resize((size, size), PIL.Image.BILINEAR))


def _face_crops(image: np.ndarray, face, head: np.ndarray, kinds: Iterable[str]) -> dict[str, np.ndarray]:
    from ..faces import align_face
    from ..faces.masks import apply_mask

    crops = {}
    for kind in kinds:
        size = CROP_KINDS[kind]
        if kind in ("arcface", "open-flashface"):
            crops[kind] = align_face(image, face.landmarks, size=size)
        elif kind == "flashface":
            crops[kind] = _flashface_crop(image, face.bbox, face.landmarks, size)
        elif kind == "feedface":
            crops[kind] = _feedface_crop(image, _feedface_square(face.bbox), size)
        elif kind == "fact":
            crops[kind] = align_face(apply_mask(image, head), face.landmarks, size=size)
    return crops


_ANALYZER: dict[str, Any] = {}  # settings key -> FaceAnalyzer, one per process


def _analyzer(settings: _Settings):
    key = settings.key()
    if key not in _ANALYZER:
        from ..faces import FaceAnalyzer

        _ANALYZER.clear()
        _ANALYZER[key] = FaceAnalyzer(
            settings.detector,
            None if settings.recognizer == "none" else settings.recognizer,
            model_dir=settings.model_dir,
            min_face_size=0,  # every face is seen: the size filter is ours, and counts faces
            dense_landmarks=settings.detector in ("hog", "mmod"),  # free with dlib, and better masks
            crops=(),
            max_pixels=settings.max_pixels,
            upsample=settings.upsample,
        )
    return _ANALYZER[key]


def _needs_upright_copy(path: Path) -> bool:
    """True when a plain ``Image.open(path).convert("RGB")`` (what FeedFace's and FlashFace's readers do) would not
    give the pixels analysed here: an EXIF rotation or any mode but 8-bit RGB (alpha, palette, CMYK, 16-bit)."""
    from PIL import Image

    try:
        with Image.open(path) as handle:
            return handle.mode != "RGB" or handle.getexif().get(0x0112, 1) != 1
    except Exception:  # it decoded a moment ago; an odd header is one more reason to copy
        return True


def _round(values: Iterable[float], digits: int = 2) -> list[float]:
    return [round(float(v), digits) for v in values]


def _write_png(path: Path, pixels: np.ndarray) -> None:
    from ..images import save_image

    save_image(path, pixels)


def _process(photo: _Photo, settings: _Settings, out: Path) -> dict[str, Any]:
    """Analyse one photo and write its crops and masks; returns the result stored in its state."""
    from ..errors import ImageError, ImageTooLargeError, NoFaceError
    from ..images import atomic_write_bytes, load_image

    try:
        loaded = load_image(photo.path, max_pixels=settings.max_pixels)
    except ImageTooLargeError as error:
        return {"status": "skipped", "reason": "too-large", "message": str(error)}
    except ImageError as error:
        return {"status": "skipped", "reason": "unreadable", "message": str(error)}
    pixels = loaded.array
    height, width = pixels.shape[:2]
    try:
        faces = _analyzer(settings).analyze(pixels, name=str(photo.path))
    except NoFaceError as error:
        return {"status": "skipped", "reason": "no-face", "message": str(error)}

    found = len(faces)
    large = [f for f in faces if f.size >= settings.min_face_size]
    if not large:
        biggest = max(f.size for f in faces)
        return {
            "status": "skipped",
            "reason": "face-too-small",
            "message": f"{found} face(s), the largest {biggest:.0f} px; the minimum is {settings.min_face_size:g} px",
            "face_size": round(biggest, 1),
        }
    scored = [f for f in large if settings.min_score is None or f.det_score >= settings.min_score]
    if not scored:
        best = max(f.det_score for f in large)
        return {
            "status": "skipped",
            "reason": "low-score",
            "message": f"the best detection score is {best:.3f}; the minimum is {settings.min_score:g}",
            "score": round(best, 4),
        }
    if len(scored) > 1 and not settings.keep_largest:
        return {
            "status": "skipped",
            "reason": "several-faces",
            "message": f"{len(scored)} faces of at least {settings.min_face_size:g} px; exactly one is wanted "
            "(keep the largest with --keep-largest)",
            "faces": len(scored),
        }
    face = max(scored, key=lambda f: f.area)
    x1, y1, x2, y2 = (float(v) for v in face.bbox)
    outside = [(float(x), float(y)) for x, y in face.landmarks if not (x1 <= x <= x2 and y1 <= y <= y2)]
    if outside:  # a landmark fit that left its own box (a profile, an occlusion) misaligns every crop
        x, y = outside[0]
        return {
            "status": "skipped",
            "reason": "bad-landmarks",
            "message": f"landmark ({x:.1f}, {y:.1f}) lies outside the face box "
            f"({x1:.1f}, {y1:.1f}, {x2:.1f}, {y2:.1f})",
        }
    sharpness = face_sharpness(pixels, face.landmarks)
    if sharpness < settings.blur:
        return {
            "status": "skipped",
            "reason": "blurry",
            "message": f"face sharpness {sharpness:.1f} is below the blur threshold {settings.blur:g}",
            "blur": round(sharpness, 1),
        }

    from ..faces.masks import face_mask, head_mask

    name = f"{photo.stem}-{photo.key[:10]}"
    shard = photo.key[:2]
    written: dict[str, Any] = {}

    def rel(*parts: str) -> str:
        return "/".join((*parts, shard, name))

    image = str(photo.path)
    if _needs_upright_copy(photo.path):
        image = rel("images") + ".png"
        _write_png(out / image, pixels)
        written["copied"] = True
    face_region = face_mask(face, pixels.shape[:2], dilation=0.0)
    head_region = head_mask(face, pixels.shape[:2])
    mask, head = rel("masks", "face") + ".png", rel("masks", "head") + ".png"
    _write_png(out / mask, (face_region * 255).round().astype(np.uint8))
    _write_png(out / head, (head_region * 255).round().astype(np.uint8))
    crops = {}
    for kind, crop in _face_crops(pixels, face, head_region, settings.crops).items():
        crops[kind] = rel("crops", kind) + ".png"
        _write_png(out / crops[kind], crop)
    embeddings = {}
    if face.embedding is not None:
        embeddings[face.embedding_model] = rel("embeddings", _slug(face.embedding_model)) + ".npy"
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(face.embedding, dtype=np.float32))
        atomic_write_bytes(out / embeddings[face.embedding_model], buffer.getvalue())
    return {
        "status": "kept",
        "image": image,
        "width": int(width),
        "height": int(height),
        "face": {
            "bbox": _round(face.bbox),
            "landmarks": [_round(point) for point in face.landmarks],
            "score": round(float(face.det_score), 4),
        },
        "faces_found": found,
        "face_size": round(face.size, 1),
        "blur": round(sharpness, 1),
        "square_bbox": list(_feedface_square(face.bbox)),
        "mask": mask,
        "head_mask": head,
        "crops": crops,
        "embeddings": embeddings,
        **written,
    }


def _process_safely(photo: _Photo, settings: _Settings, out: Path) -> dict[str, Any]:
    try:
        return _process(photo, settings, out)
    except IdfusionError as error:
        if isinstance(error, OSError):  # cannot write the outputs (disk full, permissions): stop the run
            raise
        return {"status": "skipped", "reason": "error", "message": str(error)}
    except (MemoryError, OSError):
        raise
    except Exception as error:  # one odd photo must not end a long run; it is listed with its error
        logger.warning("%s: unexpected %s: %s", photo.path, type(error).__name__, error)
        return {"status": "skipped", "reason": "error", "message": f"{type(error).__name__}: {error}"}


_WORKER: dict[str, Any] = {}


def _init_worker(settings: _Settings, out: Path) -> None:
    _WORKER.update(settings=settings, out=out)
    _analyzer(settings)  # load the models once per process, before the first photo


def _process_in_worker(photo: _Photo) -> dict[str, Any]:
    return _process_safely(photo, _WORKER["settings"], _WORKER["out"])


# ----------------------------------------------------------------------------------------------------------------
# State
# ----------------------------------------------------------------------------------------------------------------


def _state_path(out: Path, photo: _Photo) -> Path:
    return out / STATE_DIR / photo.key[:2] / f"{photo.key}.json"


def _fingerprint(path: Path) -> tuple[int, int]:
    try:
        stat = path.stat()
    except OSError:
        return -1, -1  # missing or unreadable: never matches, so it is tried (and listed) again
    return int(stat.st_size), int(stat.st_mtime_ns)


def _load_state(out: Path, photo: _Photo, settings_key: str, fingerprint: tuple[int, int]) -> dict[str, Any] | None:
    path = _state_path(out, photo)
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    size, mtime = fingerprint
    if (
        not isinstance(state, dict)
        or state.get("input") != str(photo.path)
        or state.get("size") != size
        or state.get("mtime_ns") != mtime
        or state.get("settings") != settings_key
        or size < 0
    ):
        return None
    result = state.get("result", {})
    if result.get("status") == "kept":  # an output file removed since: process the photo again
        files = [result["mask"], result["head_mask"], *result["crops"].values(), *result["embeddings"].values()]
        if result.get("copied"):
            files.append(result["image"])
        if not all((out / f).is_file() for f in files):
            return None
    return state


def _save_state(out: Path, photo: _Photo, state: dict[str, Any]) -> None:
    from ..atomic import atomic_write_bytes

    atomic_write_bytes(_state_path(out, photo), (json.dumps(state, sort_keys=True) + "\n").encode())


# ----------------------------------------------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------------------------------------------


def _generated_text(output: Any) -> str:
    """The caption in a transformers image-to-text (or image-text-to-text) pipeline's output."""
    while isinstance(output, list) and output:
        output = output[0]
    text = output.get("generated_text", "") if isinstance(output, dict) else output
    if isinstance(text, list):  # chat format: the last message is the model's
        text = text[-1].get("content", "") if text and isinstance(text[-1], dict) else ""
    return str(text).strip()


def load_captioner(name: str) -> Callable[[Any], str]:
    """A captioner for ``name``, a transformers image-to-text model (a Hub id or a local folder, for example
    ``Salesforce/blip-image-captioning-base``): PIL image in, caption out. Loads transformers and the model now.

    Raises:
        PrepareError: transformers is missing or the model cannot be loaded (offline and not cached, unknown name).
    """
    try:
        from transformers import pipeline
        from transformers.pipelines import SUPPORTED_TASKS
    except ImportError as error:
        raise PrepareError(f"--caption-model needs transformers ({error})") from None
    # transformers 5 folded "image-to-text" into "image-text-to-text"
    task = "image-to-text" if "image-to-text" in SUPPORTED_TASKS else "image-text-to-text"
    try:
        captioner = pipeline(task, model=name)
    except Exception as error:  # any failure to load a named model is the user's to fix
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise PrepareError(f"cannot load the caption model {name!r} ({type(error).__name__}: {first})") from None

    def caption(image: Any) -> str:
        return _generated_text(captioner(image))

    return caption


def _sidecar_caption(path: Path) -> str | None:
    sidecar = path.with_suffix(".txt")
    if not sidecar.is_file():
        return None
    try:
        text = sidecar.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        logger.warning("%s: caption sidecar not readable as UTF-8 text (%s); using no caption", sidecar, error)
        return None
    return " ".join(text.split()) or None


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------


def prepare_dataset(
    input: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    *,
    list_file: str | os.PathLike | None = None,
    detector: str = "hog",
    recognizer: str = "none",
    model_dir: str | os.PathLike | None = None,
    upsample: int | None = None,
    min_face_size: float | None = None,
    min_score: float | None = None,
    keep_largest: bool = False,
    blur: float | None = None,
    min_photos: int = DEFAULT_MIN_PHOTOS,
    crops: Sequence[str] = tuple(CROP_KINDS),
    workers: int = 1,
    caption_model: str | None = None,
    captioner: Callable[[Any], str] | None = None,
    absolute_paths: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    progress: bool | None = True,
) -> PrepareSummary:
    """Turn a folder (or list) of photos into a training set in ``out_dir`` (see the module doc for the layout).

    Args:
        input: the photo folder (one sub-folder per identity, or photos directly in it), or a list file; with
            ``list_file``, the folder the list's relative paths start from (``None``: the list file's folder).
        out_dir: output folder, created if missing; must not be inside ``input``.
        list_file: a list of photos, one path per line, optionally ``<TAB>identity``.
        detector / recognizer / model_dir / upsample: as :class:`~idfusion.faces.FaceAnalyzer`; the recognizer
            (default ``"none"``) adds each face's identity embedding (``embeddings``).
        min_face_size: smallest face, shorter box side in px (default :data:`DEFAULT_MIN_FACE_SIZE`; 8 for the
            world detector).
        min_score: smallest detection score (``None``: the detector's own threshold only).
        keep_largest: keep the largest face of a photo with several, instead of skipping the photo.
        blur: smallest :func:`face_sharpness` (default :data:`DEFAULT_BLUR`; 0, off, for the world detector).
        min_photos: identities with fewer kept photos are dropped.
        crops: the crop kinds to write (:data:`CROP_KINDS`).
        workers: processes analysing photos (1: in this process).
        caption_model: a transformers image-to-text model for photos without a ``<stem>.txt`` caption.
        captioner: instead of ``caption_model``, any callable from a PIL image to a caption.
        absolute_paths: write absolute paths (for trainers that resolve paths against their working directory,
            as open FlashFace's and FeedFace's do); relative to ``out_dir`` otherwise.
        max_pixels: photos with more pixels are skipped (``too-large``).
        progress: show tqdm progress bars (``None``: only on a terminal).

    Returns:
        PrepareSummary: counts, thresholds and observed values; also written to ``summary.json``.

    Raises:
        PrepareError: no input, no photos, bad settings, or a caption model that cannot be loaded.
        OutputError: ``out_dir`` cannot be written.
    """
    from ..atomic import atomic_write_bytes, check_output_folder
    from ..faces.analyzer import DETECTORS, RECOGNIZERS

    if detector not in DETECTORS:
        raise PrepareError(f"detector must be one of {', '.join(DETECTORS)}, got {detector!r}")
    if recognizer not in RECOGNIZERS:
        raise PrepareError(f"recognizer must be one of {', '.join(RECOGNIZERS)}, got {recognizer!r}")
    unknown = [kind for kind in crops if kind not in CROP_KINDS]
    if unknown:
        raise PrepareError(f"unknown crop kind(s) {unknown}; known: {', '.join(CROP_KINDS)}")
    if workers < 1:
        raise PrepareError(f"workers must be at least 1, got {workers}")
    if min_photos < 1:
        raise PrepareError(f"min_photos must be at least 1, got {min_photos}")
    for label, value in (("min_face_size", min_face_size), ("blur", blur)):
        if value is not None and not value >= 0:
            raise PrepareError(f"{label} must be >= 0, got {value}")
    if upsample is not None and not 0 <= upsample <= 3:
        raise PrepareError(f"upsample must be between 0 and 3, got {upsample}")
    if captioner is not None and caption_model is not None:
        raise PrepareError("give caption_model or captioner, not both")
    min_face_size, blur = _resolve_defaults(detector, min_face_size, blur)

    out = Path(out_dir).expanduser().absolute()
    input_dir = None if input is None else Path(input).expanduser().absolute()
    lst = None if list_file is None else Path(list_file).expanduser().absolute()
    if input_dir is not None and lst is None and input_dir.is_file():
        input_dir, lst = None, input_dir  # INPUT is itself a list file
    if input_dir is None and lst is None:
        raise PrepareError("give an input folder or a list file")
    if input_dir is not None:
        if not input_dir.exists():
            raise PrepareError(f"{input_dir}: input folder not found")
        if not input_dir.is_dir():
            raise PrepareError(f"{input_dir}: expected a folder of photos")
        if lst is None and _inside(out.resolve(), input_dir.resolve()):
            raise PrepareError(f"{out}: the output folder must not be inside the input folder {input_dir}")
    photos, preskipped, ignored = _collect(input_dir, lst)
    check_output_folder(out)
    if caption_model is not None:
        captioner = load_captioner(caption_model)  # before the long part: a bad name fails now

    settings = _Settings(
        detector=detector,
        recognizer=recognizer,
        model_dir=None if model_dir is None else str(Path(model_dir).expanduser().absolute()),
        upsample=upsample,
        min_face_size=min_face_size,
        min_score=None if min_score is None else float(min_score),
        keep_largest=bool(keep_largest),
        blur=blur,
        crops=tuple(kind for kind in CROP_KINDS if kind in crops),
        max_pixels=max_pixels,
    )
    settings_key = settings.key()
    states: dict[str, dict[str, Any]] = {}
    todo = []
    # taken before any analysis: a photo changed while it is analysed is analysed again next time
    fingerprints = {photo.key: _fingerprint(photo.path) for photo in photos}
    for photo in photos:
        state = _load_state(out, photo, settings_key, fingerprints[photo.key])
        if state is None:
            todo.append(photo)
        else:
            states[photo.key] = state
    reused = len(states)
    logger.info("%d photo(s): %d to process, %d done in an earlier run", len(photos), len(todo), reused)

    def finish(photo: _Photo, result: dict[str, Any]) -> None:
        size, mtime = fingerprints[photo.key]
        state = {"input": str(photo.path), "size": size, "mtime_ns": mtime, "settings": settings_key}
        state["result"] = result
        _save_state(out, photo, state)
        states[photo.key] = state

    if todo:
        # here, not in the first photo's worker: a missing model or a bad setting is one error, not N skips
        _analyzer(settings)
        if workers > 1:
            _ANALYZER.clear()  # the workers load their own
    _run(todo, settings, out, workers, progress, finish)
    if captioner is not None:
        model = caption_model or getattr(captioner, "__name__", "captioner")
        _caption(_surviving(photos, states, min_photos), states, out, captioner, model, progress)

    thresholds = {
        "min_face_size": min_face_size,
        "min_score": settings.min_score,
        "keep_largest": settings.keep_largest,
        "blur": blur,
        "min_photos": min_photos,
        "detector": detector,
        "recognizer": recognizer,
    }
    records, skipped, observed = _assemble(photos, states, preskipped, out, min_photos, absolute_paths)
    metadata = atomic_write_bytes(out / METADATA_FILE, "".join(json.dumps(r) + "\n" for r in records).encode())
    skipped_file = atomic_write_bytes(out / SKIPPED_FILE, "".join(json.dumps(s) + "\n" for s in skipped).encode())
    summary = PrepareSummary(
        out_dir=out,
        metadata=metadata,
        skipped_file=skipped_file,
        inputs=len(photos) + len(preskipped),
        processed=len(todo),
        reused=reused,
        kept=len(records),
        identities=dict(sorted(Counter(r["identity"] for r in records).items())),
        skipped=dict(sorted(Counter(s["reason"] for s in skipped).items())),
        thresholds=thresholds,
        ignored=ignored,
        observed=observed,
    )
    atomic_write_bytes(out / SUMMARY_FILE, (json.dumps(summary.to_dict(), indent=1) + "\n").encode())
    logger.info("kept %d, skipped %d: %s", summary.kept, summary.skipped_total, summary.skipped)
    return summary


def _run(
    todo: list[_Photo],
    settings: _Settings,
    out: Path,
    workers: int,
    progress: bool | None,
    finish: Callable[[_Photo, dict[str, Any]], None],
) -> None:
    from tqdm.auto import tqdm

    if not todo:
        return
    bar = tqdm(total=len(todo), desc="prepare", unit="photo", disable=None if progress is None else not progress)
    try:
        if workers == 1:
            for photo in todo:
                finish(photo, _process_safely(photo, settings, out))
                bar.update()
            return
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # spawn, not fork: a forked copy of a process holding threads (tqdm's monitor, BLAS, a loaded captioner)
        # can deadlock
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            min(workers, len(todo)), mp_context=context, initializer=_init_worker, initargs=(settings, out)
        ) as pool:
            futures = {pool.submit(_process_in_worker, photo): photo for photo in todo}
            try:
                for future in as_completed(futures):
                    finish(futures[future], future.result())
                    bar.update()
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    finally:
        bar.close()


def _surviving(photos: list[_Photo], states: dict[str, dict[str, Any]], min_photos: int) -> list[_Photo]:
    """The photos that will be records: kept, of an identity with at least ``min_photos`` kept photos."""
    kept = [p for p in photos if states[p.key]["result"]["status"] == "kept"]
    counts = Counter(p.identity for p in kept)
    return [p for p in kept if counts[p.identity] >= min_photos]


def _caption(
    photos: list[_Photo],
    states: dict[str, dict[str, Any]],
    out: Path,
    captioner: Callable[[Any], str] | None,
    model: str,
    progress: bool | None,
) -> None:
    """Caption the photos that have no sidecar caption and no stored caption from this model."""
    from tqdm.auto import tqdm

    from ..images import load_image

    wanted = []
    for photo in photos:
        state = states[photo.key]
        cached = state.get("caption")
        if _sidecar_caption(photo.path) is not None:
            continue
        if isinstance(cached, dict) and cached.get("model") == model:
            continue
        wanted.append(photo)
    if not wanted or captioner is None:
        return
    for photo in tqdm(wanted, desc="captions", unit="photo", disable=None if progress is None else not progress):
        state = states[photo.key]
        image = load_image(out / state["result"]["image"]).to_pil()  # the upright RGB the record points to
        state["caption"] = {"model": model, "text": " ".join(str(captioner(image)).split())}
        _save_state(out, photo, state)


def _assemble(
    photos: list[_Photo],
    states: dict[str, dict[str, Any]],
    preskipped: list[dict[str, Any]],
    out: Path,
    min_photos: int,
    absolute_paths: bool,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    def show(path: str) -> str:
        full = out / path  # absolute paths stay themselves
        return str(full) if absolute_paths else Path(os.path.relpath(full, out)).as_posix()

    skipped = [
        {"input": e["input"], "identity": None, "reason": e["reason"], "message": e["message"]} for e in preskipped
    ]
    by_identity: dict[str, list[tuple[_Photo, dict[str, Any]]]] = {}
    for photo in sorted(photos, key=lambda p: (p.identity, str(p.path))):
        state = states[photo.key]
        result = state["result"]
        if result["status"] == "kept":
            by_identity.setdefault(photo.identity, []).append((photo, state))
        else:
            extra = {k: result[k] for k in sorted(result) if k not in ("status", "reason", "message")}
            skipped.append(
                {"input": str(photo.path), "identity": photo.identity, "reason": result["reason"], **extra}
                | {"message": result["message"]}
            )

    records = []
    for identity, members in sorted(by_identity.items()):
        if len(members) < min_photos:
            for photo, _ in members:
                skipped.append(
                    {
                        "input": str(photo.path),
                        "identity": identity,
                        "reason": "too-few-photos",
                        "message": f"identity {identity!r} has {len(members)} kept photo(s); the minimum is "
                        f"{min_photos}",
                    }
                )
            continue
        for photo, state in members:
            others = [s["result"] for p, s in members if p.key != photo.key]
            records.append(_record(photo, state, others, show))
    skipped.sort(key=lambda s: (s["input"], s["reason"]))

    observed: dict[str, Any] = {}
    for name in ("blur", "face_size"):
        values = [r["attributes"][name] for r in records]
        if values:
            observed[name] = {"min": min(values), "median": statistics.median(values), "max": max(values)}
    return records, skipped, observed


def _record(
    photo: _Photo, state: dict[str, Any], others: list[dict[str, Any]], show: Callable[[str], str]
) -> dict[str, Any]:
    result = state["result"]
    caption, source = _sidecar_caption(photo.path), "sidecar"
    if caption is None and isinstance(state.get("caption"), dict):
        caption, source = state["caption"]["text"], f"model:{state['caption']['model']}"
    if caption is None:
        caption, source = "", "none"
    image = show(result["image"])
    kinds = [kind for kind in CROP_KINDS if kind in result["crops"]]  # a fixed order, however the state was stored
    face = result["face"]
    reference_crops = {kind: [show(o["crops"][kind]) for o in others] for kind in kinds}
    record: dict[str, Any] = {
        "image": image,
        "width": result["width"],
        "height": result["height"],
        "caption": caption,
        "identity": photo.identity,
        "faces": [{"bbox": face["bbox"], "landmarks": face["landmarks"], "score": face["score"]}],
        "references": [show(o["image"]) for o in others],
        "mask": show(result["mask"]),
        "head_mask": show(result["head_mask"]),
        "crops": {kind: show(result["crops"][kind]) for kind in kinds},
        "reference_crops": reference_crops,
        "embeddings": {name: show(path) for name, path in sorted(result["embeddings"].items())},
        "attributes": {
            "source": str(photo.path),
            "blur": result["blur"],
            "face_size": result["face_size"],
            "faces_found": result["faces_found"],
            "caption_source": source,
        },
        # the keys open FlashFace's train.py and FeedFace's PeopleDataset read (a "combined" record)
        "path": image,
        "size": [result["width"], result["height"]],
        "ref": reference_crops.get(REF_KIND, reference_crops.get("flashface", [])),
        "mask_path": show(result["head_mask"]),
        "square_bbox": result["square_bbox"],
        "bbox": face["bbox"],
    }
    return record


# ----------------------------------------------------------------------------------------------------------------
# Schema check
# ----------------------------------------------------------------------------------------------------------------


def check_dataset(path: str | os.PathLike) -> list[ImageRecord]:
    """Read a training set and check what the reader cannot check line by line.

    Beyond :func:`~idfusion.training.data.read_jsonl` (fields, types, files exist): every record's size is its
    image's, every face has 5 landmarks inside its box, masks have the image's size, references are images of
    other records of the same identity (never the record itself), ``reference_crops`` are those records' own
    ``crops``, in the same order, and crops of a known kind have its size. Both ``idfusion prepare`` and the world's
    ``write_dataset`` write sets that pass.

    Returns:
        The records, as :func:`~idfusion.training.data.read_jsonl` reads them.

    Raises:
        DataError: the first problem, as ``file:line: field: what is wrong``.
    """
    from PIL import Image

    from .data import DataError, read_jsonl

    records = read_jsonl(path)
    by_image = {}
    for record in records:
        key = record.image.resolve()
        if key in by_image:
            raise DataError(f"{record.source}: image: {record.image} is also the image of {by_image[key].source}")
        by_image[key] = record

    def size_of(file: Path) -> tuple[int, int]:
        with Image.open(file) as handle:
            return handle.size

    for record in records:
        where = record.source
        actual = size_of(record.image)
        if actual != (record.width, record.height):
            raise DataError(f"{where}: width/height: {record.width}x{record.height}, the image is {actual}")
        if not record.faces:
            raise DataError(f"{where}: faces: expected at least one face")
        for i, face in enumerate(record.faces):
            if face.landmarks is None or face.score is None:
                raise DataError(f"{where}: faces[{i}]: expected landmarks and a score")
            x1, y1, x2, y2 = face.bbox
            outside = [p for p in face.landmarks if not (x1 <= p[0] <= x2 and y1 <= p[1] <= y2)]
            if outside:
                raise DataError(f"{where}: faces[{i}].landmarks: {outside[0]} is outside the box {face.bbox}")
        for key in ("mask", "head_mask"):
            mask = getattr(record, key)
            if mask is not None and size_of(mask) != (record.width, record.height):
                raise DataError(f"{where}: {key}: {size_of(mask)}, the image is {record.width}x{record.height}")
        for kind, crop in record.crops.items():
            if kind in CROP_KINDS and size_of(crop) != (CROP_KINDS[kind],) * 2:
                raise DataError(f"{where}: crops.{kind}: {size_of(crop)}, expected {CROP_KINDS[kind]} square")
        if record.references and record.identity is None:
            raise DataError(f"{where}: references: a record with references needs an identity")
        targets = []
        for i, reference in enumerate(record.references):
            target = by_image.get(reference.resolve())
            if target is None:
                raise DataError(f"{where}: references[{i}]: {reference} is not the image of a record in this set")
            if target is record:
                raise DataError(f"{where}: references[{i}]: the record's own image")
            if target.identity != record.identity:
                raise DataError(
                    f"{where}: references[{i}]: identity {target.identity!r}, the record's is {record.identity!r}"
                )
            targets.append(target)
        if len({t.image.resolve() for t in targets}) != len(targets):
            raise DataError(f"{where}: references: listed twice")
        for kind, crops in record.reference_crops.items():
            if len(crops) != len(targets):
                raise DataError(f"{where}: reference_crops.{kind}: {len(crops)} crops for {len(targets)} references")
            for i, (crop, target) in enumerate(zip(crops, targets, strict=True)):
                own = target.crops.get(kind)
                if own is None or own.resolve() != crop.resolve():
                    raise DataError(
                        f"{where}: reference_crops.{kind}[{i}]: not the {kind} crop of {target.image} ({own})"
                    )
    return records
