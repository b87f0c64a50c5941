"""Training data: the JSON-lines record schema, its reader, an image+caption dataset and a resumable sampler.

One record per line, one image per record (idfusion's format; ``docs/training-data.md`` has the full schema)::

    {"image": "imgs/0001.png",            # relative to the jsonl's folder, or absolute
     "width": 512, "height": 512,
     "caption": "a photo of a woman smiling",
     "identity": "person_0042",           # or null
     "faces": [{"bbox": [x1, y1, x2, y2], "landmarks": [[x, y] x 5], "score": 0.99}],
     "references": ["imgs/0002.png"],     # other images of the same identity
     "mask": "masks/0001.png",            # face mask, or null
     "head_mask": "masks/h0001.png",      # face, hair and crown, or null
     "crops": {"arcface": "crops/a0001.png"},                # this image's face crops, by kind
     "reference_crops": {"arcface": ["crops/a0002.png"]},    # the references' crops, in references' order
     "embeddings": {"dlib-resnet": "emb/0001.npy"},         # the face's identity embedding, by recognizer
     "attributes": {...}}                 # optional, free-form

``identity``, ``faces``, ``references``, ``mask``, ``head_mask``, ``crops``, ``reference_crops``, ``embeddings``
and ``attributes`` are optional; a face's ``landmarks`` and ``score`` may be omitted. Unknown keys are errors (they
are usually typos).

Two foreign formats are read as they are, without conversion (paths again relative to the jsonl's folder):

- open FlashFace (``IntellectGen/flashface`` ``train.py``): ``path`` (or ``image``), ``size`` ``[w, h]``,
  ``caption``, ``ref`` (reference face crops);
- FeedFace (``PeopleDataset``): ``path``, ``caption``, ``mask_path``, ``square_bbox``, optionally ``width``,
  ``height``, ``bbox``.

A record is foreign when it has no ``image`` key or has one of ``size``/``ref``/``mask_path``/``square_bbox``. Their
other keys are kept in ``attributes``; a missing size is read from the image header.

A *combined* record has both ``image`` and ``path``: it is an idfusion record that also carries the keys those two
trainers read (``path``, ``size``, ``ref``, ``mask_path``, ``square_bbox``, ``bbox``), so one file serves all three
(``idfusion prepare`` writes these). It is read as idfusion's; ``path`` must name the same file as ``image`` and
``size`` must be ``[width, height]``; the other foreign keys are checked (paths, boxes) but not stored twice.

The reader fails on the first bad record with ``file:line: field: what was expected``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import IdfusionError

__all__ = [
    "DataError",
    "FaceRecord",
    "ImageCaptionDataset",
    "ImageRecord",
    "ResumableSampler",
    "TargetCrop",
    "crop_target",
    "load_rgb",
    "read_jsonl",
    "read_records",
    "sample_seed",
]

logger = logging.getLogger(__name__)

NUM_LANDMARKS = 5
_OWN_KEYS = {
    "image",
    "width",
    "height",
    "caption",
    "identity",
    "faces",
    "references",
    "mask",
    "head_mask",
    "crops",
    "reference_crops",
    "embeddings",
    "attributes",
}
# the open-FlashFace / FeedFace keys a combined record (one with both "image" and "path") may carry
_COMPAT_KEYS = {"path", "size", "ref", "mask_path", "square_bbox", "bbox"}
_FOREIGN_MARKERS = {"size", "ref", "mask_path", "square_bbox"}
_FOREIGN_KEYS = {"path", "image", "size", "width", "height", "caption", "ref", "mask_path", "square_bbox", "bbox"}


class DataError(IdfusionError, ValueError):
    """A training set is unusable; the message names the file, the line and the field."""


@dataclass(frozen=True)
class FaceRecord:
    bbox: tuple[float, float, float, float]  # x1, y1, x2, y2 in image pixels
    landmarks: tuple[tuple[float, float], ...] | None = None  # 5 points: eyes, nose, mouth corners
    score: float | None = None


@dataclass(frozen=True)
class ImageRecord:
    """One training image with everything known about it. Paths are absolute."""

    image: Path
    width: int
    height: int
    caption: str
    identity: str | None = None
    faces: tuple[FaceRecord, ...] = ()
    references: tuple[Path, ...] = ()
    mask: Path | None = None
    attributes: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # "file:line", for messages
    head_mask: Path | None = None
    crops: dict[str, Path] = field(default_factory=dict)  # kind -> this image's face crop
    reference_crops: dict[str, tuple[Path, ...]] = field(default_factory=dict)  # kind -> one crop per reference
    embeddings: dict[str, Path] = field(default_factory=dict)  # recognizer name -> .npy of the face's embedding


class _Line:
    """Checks one record's fields; every error names the file, line and field."""

    def __init__(self, file: Path, number: int, record: dict[str, Any], check_files: bool):
        self.file, self.number, self.record, self.check_files = file, number, record, check_files

    @property
    def where(self) -> str:
        return f"{self.file}:{self.number}"

    def error(self, key: str, message: str) -> DataError:
        return DataError(f"{self.where}: {key}: {message}")

    def get(self, key: str, kind: type | tuple[type, ...], *, required: bool = True, nullable: bool = False) -> Any:
        if key not in self.record:
            if required:
                raise self.error(key, "missing (required)")
            return None
        value = self.record[key]
        if value is None and nullable:
            return None
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            ok = False  # JSON true/false are not numbers here
        else:
            ok = isinstance(value, kind)
        if not ok:
            names = {str: "a string", int: "a whole number", list: "a list", dict: "an object"}
            wanted = names.get(kind, "a number") if not isinstance(kind, tuple) else "a number"
            raise self.error(key, f"expected {wanted}{' or null' if nullable else ''}, got {json.dumps(value)}")
        return value

    def size(self, key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise self.error(key, f"expected a positive whole number, got {json.dumps(value)}")
        return value

    def path(self, key: str, value: Any) -> Path:
        if not isinstance(value, str) or not value:
            raise self.error(key, f"expected a path string, got {json.dumps(value)}")
        path = Path(value).expanduser()
        path = path if path.is_absolute() else self.file.parent / path
        if self.check_files and not path.is_file():
            raise self.error(key, f"file not found: {path}")
        return path

    def paths(self, key: str, value: Any) -> tuple[Path, ...]:
        if not isinstance(value, list):
            raise self.error(key, f"expected a list of paths, got {json.dumps(value)}")
        return tuple(self.path(f"{key}[{i}]", item) for i, item in enumerate(value))

    def path_map(self, key: str, value: Any) -> dict[str, Path]:
        if not isinstance(value, dict):
            raise self.error(key, f"expected an object of name -> path, got {json.dumps(value)}")
        return {str(name): self.path(f"{key}.{name}", item) for name, item in value.items()}

    def paths_map(self, key: str, value: Any) -> dict[str, tuple[Path, ...]]:
        if not isinstance(value, dict):
            raise self.error(key, f"expected an object of name -> list of paths, got {json.dumps(value)}")
        return {str(name): self.paths(f"{key}.{name}", item) for name, item in value.items()}

    def box(self, key: str, value: Any) -> tuple[float, float, float, float]:
        if not _numbers(value, 4):
            raise self.error(key, f"expected [x1, y1, x2, y2], got {json.dumps(value)}")
        x1, y1, x2, y2 = (float(v) for v in value)
        if x2 <= x1 or y2 <= y1:
            raise self.error(key, f"expected x2 > x1 and y2 > y1, got {json.dumps(value)}")
        return x1, y1, x2, y2

    def faces(self, value: Any) -> tuple[FaceRecord, ...]:
        if not isinstance(value, list):
            raise self.error("faces", f"expected a list, got {json.dumps(value)}")
        faces = []
        for i, face in enumerate(value):
            key = f"faces[{i}]"
            if not isinstance(face, dict):
                raise self.error(key, f"expected an object with bbox, landmarks, score, got {json.dumps(face)}")
            unknown = set(face) - {"bbox", "landmarks", "score"}
            if unknown:
                raise self.error(f"{key}.{sorted(unknown)[0]}", "unknown field; known: bbox, landmarks, score")
            if "bbox" not in face:
                raise self.error(f"{key}.bbox", "missing (required)")
            landmarks = face.get("landmarks")
            if landmarks is not None:
                if (
                    not isinstance(landmarks, list)
                    or len(landmarks) != NUM_LANDMARKS
                    or not all(_numbers(p, 2) for p in landmarks)
                ):
                    raise self.error(
                        f"{key}.landmarks", f"expected {NUM_LANDMARKS} [x, y] points, got {json.dumps(landmarks)}"
                    )
                landmarks = tuple((float(x), float(y)) for x, y in landmarks)
            score = face.get("score")
            if score is not None and not _numbers([score], 1):
                raise self.error(f"{key}.score", f"expected a number, got {json.dumps(score)}")
            faces.append(
                FaceRecord(self.box(f"{key}.bbox", face["bbox"]), landmarks, None if score is None else float(score))
            )
        return tuple(faces)


def _numbers(value: Any, count: int) -> bool:
    return (
        isinstance(value, list)
        and len(value) == count
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    )


def _own_record(line: _Line) -> ImageRecord:
    record = line.record
    combined = "path" in record
    known = _OWN_KEYS | _COMPAT_KEYS if combined else _OWN_KEYS
    unknown = set(record) - known
    if unknown:
        raise line.error(sorted(unknown)[0], f"unknown field; known: {', '.join(sorted(known))}")
    attributes = line.get("attributes", dict, required=False) or {}
    image = line.path("image", line.get("image", str))
    width = line.size("width", line.get("width", int))
    height = line.size("height", line.get("height", int))
    if combined:
        _check_compat(line, image, width, height)
    return ImageRecord(
        image=image,
        width=width,
        height=height,
        caption=line.get("caption", str),
        identity=line.get("identity", str, required=False, nullable=True),
        faces=line.faces(record.get("faces", [])),
        references=line.paths("references", record.get("references", [])),
        mask=None if record.get("mask") is None else line.path("mask", record["mask"]),
        attributes=attributes,
        source=line.where,
        head_mask=None if record.get("head_mask") is None else line.path("head_mask", record["head_mask"]),
        crops=line.path_map("crops", record.get("crops", {})),
        reference_crops=line.paths_map("reference_crops", record.get("reference_crops", {})),
        embeddings=line.path_map("embeddings", record.get("embeddings", {})),
    )


def _check_compat(line: _Line, image: Path, width: int, height: int) -> None:
    """The foreign keys of a combined record must agree with its own ones (they are copies for other trainers)."""
    record = line.record
    path = line.path("path", line.get("path", str))
    if path.resolve() != image.resolve():
        raise line.error("path", f"must name the same file as image ({image}), got {path}")
    if "size" in record and record["size"] != [width, height]:
        raise line.error("size", f"expected [width, height] = {json.dumps([width, height])}, got {record['size']}")
    if "ref" in record:
        line.paths("ref", record["ref"])
    if record.get("mask_path") is not None:
        line.path("mask_path", record["mask_path"])
    for key in ("square_bbox", "bbox"):
        if key in record:
            line.box(key, record[key])


def _foreign_record(line: _Line) -> ImageRecord:
    record = line.record
    key = "path" if "path" in record else "image"  # both at once is a combined record, read as idfusion's
    image = line.path(key, line.get(key, str))
    if "size" in record:  # open FlashFace: [width, height]
        size = record["size"]
        if not isinstance(size, list) or len(size) != 2:
            raise line.error("size", f"expected [width, height], got {json.dumps(size)}")
        width, height = line.size("size[0]", size[0]), line.size("size[1]", size[1])
    elif "width" in record or "height" in record:
        width = line.size("width", line.get("width", int))
        height = line.size("height", line.get("height", int))
    else:
        width, height = _header_size(line, key, image)
    faces: tuple[FaceRecord, ...] = ()
    if "square_bbox" in record or "bbox" in record:  # FeedFace crops its reference from square_bbox
        box_key = "square_bbox" if "square_bbox" in record else "bbox"
        faces = (FaceRecord(line.box(box_key, record[box_key])),)
    mask = None if record.get("mask_path") is None else line.path("mask_path", record["mask_path"])
    return ImageRecord(
        image=image,
        width=width,
        height=height,
        caption=line.get("caption", str),
        faces=faces,
        references=line.paths("ref", record.get("ref", [])),
        mask=mask,
        attributes={
            k: v for k, v in record.items() if k not in {key, "size", "width", "height", "caption", "ref", "mask_path"}
        },
        source=line.where,
    )


def _header_size(line: _Line, key: str, image: Path) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(image) as handle:  # reads the header only
            return handle.size
    except (OSError, UnidentifiedImageError) as error:
        raise line.error(key, f"no size given and the image header cannot be read ({error})") from None


def read_jsonl(path: str | Path, *, check_files: bool = True) -> list[ImageRecord]:
    """Read and validate a JSON-lines training set (idfusion, open-FlashFace or FeedFace records; see module doc).

    Args:
        path (`str` or `Path`): the ``.jsonl`` file. Relative paths inside resolve against its folder.
        check_files (`bool`, *optional*, defaults to `True`): check that every image, reference and mask exists.

    Returns:
        `list[ImageRecord]`: in file order; blank lines are skipped.

    Raises:
        DataError: on the first bad line, naming the file, the line and the field.
    """
    file = Path(path).resolve()
    if not file.is_file():
        raise DataError(f"{file}: training set not found")
    records = []
    with file.open(encoding="utf-8") as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                raise DataError(f"{file}:{number}: not valid JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{file}:{number}: expected a JSON object, got {type(record).__name__}")
            line = _Line(file, number, record, check_files)
            combined = "image" in record and "path" in record
            foreign = not combined and ("image" not in record or bool(_FOREIGN_MARKERS & set(record)))
            records.append(_foreign_record(line) if foreign else _own_record(line))
    if not records:
        raise DataError(f"{file}: no records")
    return records


def read_records(paths: Iterable[str | Path], *, check_files: bool = True) -> list[ImageRecord]:
    """:func:`read_jsonl` over several files, concatenated in order."""
    records: list[ImageRecord] = []
    for path in paths:
        records.extend(read_jsonl(path, check_files=check_files))
    return records


# --------------------------------------------------------------------------------------------------------------------
# Per-sample randomness
# --------------------------------------------------------------------------------------------------------------------


def sample_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed derived from ``seed`` and ``keys`` (numpy's SeedSequence hashing; distinct keys, distinct seeds)."""
    state = np.random.SeedSequence([seed, *keys]).generate_state(1, dtype=np.uint64)[0]
    return int(state) & (2**63 - 1)


# Streams of one sample's seed: each consumer draws from its own stream, so adding a draw in one cannot shift another.
AUGMENT_STREAM, CONDITION_STREAM, NOISE_STREAM = 0, 1, 2


class ResumableSampler:
    """Yields ``(index, seed)`` for positions ``start, start + 1, ..., total - 1`` of a stream of epochs.

    Each epoch is a permutation of the dataset seeded by ``(seed, epoch)``; each position gets its own seed, from
    which the sample's augmentation, condition dropout and diffusion noise are drawn. Written by hand because the
    training randomness must be a function of the data position alone: then an interrupted run resumes exactly
    (``start`` = samples already seen) and N processes with batch B see exactly what one process with batch N*B
    sees. accelerate shards the batches of this sampler across processes (``BatchSamplerShard``).
    """

    def __init__(self, num_items: int, total: int, *, seed: int, shuffle: bool = True, start: int = 0):
        if num_items <= 0:
            raise ValueError(f"num_items must be positive, got {num_items}")
        self.num_items, self.total, self.seed, self.shuffle, self.start = num_items, total, seed, shuffle, start

    def __len__(self) -> int:
        return max(self.total - self.start, 0)

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_items)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_items)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        position = self.start
        while position < self.total:
            epoch, offset = divmod(position, self.num_items)
            order = self._order(epoch)
            for index in order[offset : offset + self.total - position]:
                yield int(index), sample_seed(self.seed, position)
                position += 1


# --------------------------------------------------------------------------------------------------------------------
# Images + captions
# --------------------------------------------------------------------------------------------------------------------


class ImageCaptionDataset:
    """Map-style dataset of square training crops and captions, with augmentation seeded per sample.

    Indexing with ``(index, seed)`` (what :class:`ResumableSampler` yields) gives a dict with ``pixel_values``
    (``(3, R, R)`` float tensor in ``[-1, 1]``), ``caption``, ``index`` and ``seed``; a plain ``index`` uses the seed
    ``index``. Images are resized so the shorter side is ``resolution`` (Lanczos), then center- or randomly cropped,
    then flipped horizontally with p=0.5 if ``random_flip``.
    """

    def __init__(
        self, records: Sequence[ImageRecord], resolution: int, *, center_crop: bool = True, random_flip: bool = False
    ):
        if not records:
            raise ValueError("no records")
        self.records, self.resolution = list(records), resolution
        self.center_crop, self.random_flip = center_crop, random_flip

    def __len__(self) -> int:
        return len(self.records)

    def load(self, index: int, seed: int) -> tuple[np.ndarray, ImageRecord]:
        """The ``(R, R, 3)`` uint8 crop of record ``index`` with the augmentation that ``seed`` picks."""
        from PIL import Image

        from ..images import load_image

        record = self.records[index]
        try:
            image = load_image(record.image).to_pil()
        except IdfusionError as error:
            raise DataError(f"{record.source}: image: {error}") from None
        # All draws up front, so the flags (center_crop, random_flip) never shift one another.
        crop_x, crop_y, flip = np.random.default_rng(sample_seed(seed, AUGMENT_STREAM)).random(3)
        size = self.resolution
        scale = size / min(image.size)
        resized = (max(size, round(image.width * scale)), max(size, round(image.height * scale)))
        image = image.resize(resized, Image.Resampling.LANCZOS)
        if self.center_crop:
            left, top = (image.width - size) // 2, (image.height - size) // 2
        else:
            left, top = int(crop_x * (image.width - size + 1)), int(crop_y * (image.height - size + 1))
        pixels = np.array(image.crop((left, top, left + size, top + size)))  # a writable copy
        if self.random_flip and flip < 0.5:
            pixels = pixels[:, ::-1]
        return np.ascontiguousarray(pixels), record

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        import torch

        index, seed = key if isinstance(key, tuple) else (key, key)
        pixels, record = self.load(int(index), int(seed))
        tensor = torch.from_numpy(pixels).permute(2, 0, 1).float().div(127.5).sub(1.0)
        return {"pixel_values": tensor, "caption": record.caption, "index": int(index), "seed": int(seed)}


def load_rgb(path: Path, source: str) -> np.ndarray:
    """The ``(H, W, 3)`` uint8 pixels of a record's file; a :class:`DataError` naming the record (``source``)."""
    from ..images import load_image

    try:
        return load_image(path).array
    except IdfusionError as error:
        raise DataError(f"{source}: {path}: {error}") from None


@dataclass
class TargetCrop:
    """A training image cropped as a text-to-image recipe crops it, with its face where it ends up.

    Attributes:
        pixels: ``(R, R, 3)`` uint8.
        mask: ``(R, R)`` float face mask in [0, 1] (the mask file asked for, else the face box), or None.
        box: ``(4,)`` float32 face box relative to the crop, clipped to [0, 1].
    """

    pixels: np.ndarray
    mask: np.ndarray | None
    box: np.ndarray


def crop_target(
    record: ImageRecord,
    seed: int,
    resolution: int,
    *,
    center_crop: bool,
    random_flip: bool,
    mask: Path | None | bool = None,
) -> TargetCrop:
    """``record``'s image resized so its short side is ``resolution``, cropped square (centred, or at a position drawn
    from ``seed``'s augmentation stream) and flipped with p 0.5 when ``random_flip``, as :class:`ImageCaptionDataset`
    does, carrying the record's first face along: its box, and with ``mask`` a face mask (a path: that mask file;
    ``True``: the face box filled; ``None``/``False``: none).

    One definition for every identity recipe, so their crops, masks and seeded draws cannot drift apart.
    """
    from PIL import Image

    image = Image.fromarray(load_rgb(record.image, record.source))
    face = None
    if isinstance(mask, Path | str):
        face = Image.open(mask).convert("L").resize(image.size, Image.Resampling.BILINEAR)
    elif mask:
        face = Image.new("L", image.size)
        face.paste(255, tuple(int(round(v)) for v in record.faces[0].bbox))
    crop_x, crop_y, flip = np.random.default_rng(sample_seed(seed, AUGMENT_STREAM)).random(3)
    size = resolution
    scale = size / min(image.size)
    resized = (max(size, round(image.width * scale)), max(size, round(image.height * scale)))
    if resized != image.size:
        image = image.resize(resized, Image.Resampling.LANCZOS)
        face = face.resize(resized, Image.Resampling.BILINEAR) if face is not None else None
    if center_crop:
        left, top = (image.width - size) // 2, (image.height - size) // 2
    else:
        left, top = int(crop_x * (image.width - size + 1)), int(crop_y * (image.height - size + 1))
    window = (left, top, left + size, top + size)
    pixels = np.array(image.crop(window))
    weights = np.asarray(face.crop(window), dtype=np.float32) / 255.0 if face is not None else None
    sx, sy = image.width / record.width, image.height / record.height
    x1, y1, x2, y2 = record.faces[0].bbox if record.faces else (0.0, 0.0, 0.0, 0.0)
    box = np.array([x1 * sx - left, y1 * sy - top, x2 * sx - left, y2 * sy - top]) / size
    if random_flip and flip < 0.5:
        pixels = pixels[:, ::-1]
        weights = weights[:, ::-1] if weights is not None else None
        box = np.array([1 - box[2], box[1], 1 - box[0], box[3]])
    return TargetCrop(
        np.ascontiguousarray(pixels),
        np.ascontiguousarray(weights) if weights is not None else None,
        np.clip(box, 0.0, 1.0).astype(np.float32),
    )
