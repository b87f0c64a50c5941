"""Generated images on disk: PNGs that carry their own generation metadata, safe file names, contact sheets.

Every image idfusion writes is a PNG with two text chunks:

* ``idfusion``: the full metadata dict as compact JSON in a compressed iTXt chunk (lossless, machine-readable;
  :func:`read_generation_metadata` reads it back),
* ``parameters``: the same settings as the plain text Stable Diffusion WebUI (A1111) writes, which other SD tools
  (civitai, ComfyUI readers, image browsers) already understand.
"""

from __future__ import annotations

import base64
import hashlib
import io
import itertools
import json
import logging
import math
import os
import re
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin, UnidentifiedImageError

from . import __version__
from .atomic import atomic_write_bytes, publish_new
from .errors import IdfusionError, ImageReadError, ImageTooLargeError, NotAnImageError
from .images import DEFAULT_MAX_PIXELS, load_image, to_rgb

__all__ = [
    "METADATA_KEY",
    "PARAMETERS_KEY",
    "SAMPLER_NAMES",
    "MetadataError",
    "parameters_text",
    "generated_png",
    "save_generated_image",
    "new_names",
    "save_new_generated_image",
    "read_generation_metadata",
    "encode_array",
    "decode_array",
    "next_output_index",
    "contact_sheet",
    "file_sha256",
]

logger = logging.getLogger(__name__)

METADATA_KEY = "idfusion"
PARAMETERS_KEY = "parameters"

#: our scheduler names -> the sampler names A1111 writes (and civitai & co. recognise)
SAMPLER_NAMES: dict[str, str] = {
    "dpm++": "DPM++ 2M",
    "dpm++-karras": "DPM++ 2M Karras",
    "ddim": "DDIM",
    "euler": "Euler",
    "euler-a": "Euler a",
    "pndm": "PLMS",
    "lcm": "LCM",
    "unipc": "UniPC",
}

# Keys rendered in fixed places of the parameters text (or deliberately left to the JSON chunk only).
_CORE_KEYS = frozenset(
    {
        "prompt",
        "negative_prompt",
        "steps",
        "scheduler",
        "guidance_scale",
        "seed",
        "width",
        "height",
        "model",
        "model_hash",
        "model_files",
        "idfusion_version",
        "id_embeds",  # kilobytes of base64: useful only to idfusion, which reads the JSON chunk
        "scheduler_config",  # the sampler's full config, for an exact replay
    }
)
# Our key -> the name A1111/civitai use for the same thing.
_EXTRA_NAMES = {"base_model": "Base model", "controlnet_image": "ControlNet image hash"}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")


class MetadataError(IdfusionError, ValueError):
    """An image has no idfusion metadata, or it cannot be decoded."""

    def __init__(self, source: str, message: str):
        self.source = source
        super().__init__(f"{source}: {message}")


# ---- parameters text -----------------------------------------------------------------------------------------


def _quote(value: Any) -> str:
    # A1111's own rule (generation_parameters_copypaste.quote): JSON-quote only values that would break the
    # "key: value, key: value" line.
    text = str(value)
    if "," not in text and ":" not in text and "\n" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def _format_value(value: Any) -> str:
    if isinstance(value, Mapping):
        return ", ".join(f"{k}: {_format_value(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_format_value(v) for v in value)
    if isinstance(value, bool):
        return "True" if value else "False"
    return str(value)


def _main_model_file(model_files: Mapping[str, Any]) -> str | None:
    """The hash of the file A1111 would call "the model": the UNet weights, else the first weights file."""
    names = list(model_files)
    weights = [n for n in names if n.lower().endswith(_WEIGHT_SUFFIXES)]
    for name in weights:
        if "unet" in name.lower():
            return str(model_files[name])
    if weights:
        return str(model_files[weights[0]])
    return str(model_files[names[0]]) if names else None


def _lora_entries(loras: Any) -> list[tuple[str, Any, Any]]:
    """``(name, sha256, weight)`` for each ``{"name", "sha256", "weight"}`` dict in ``loras``."""
    if not isinstance(loras, Sequence) or isinstance(loras, str):
        return []
    return [(str(x.get("name", "?")), x.get("sha256"), x.get("weight")) for x in loras if isinstance(x, Mapping)]


def parameters_text(metadata: Mapping[str, Any]) -> str:
    """Render generation metadata as the plain-text ``parameters`` chunk Stable Diffusion WebUI (A1111) writes.

    The layout is A1111's::

        <prompt>
        Negative prompt: <negative prompt>
        Steps: 25, Sampler: DPM++ 2M, CFG scale: 3.0, Seed: 42, Size: 512x512, Model hash: 0123456789, Model: ...

    The last line holds the fixed fields first (those present), then every other metadata entry in its order as
    ``Key: value`` (``base_model`` becomes ``Base model``, dicts become ``"k: v, k: v"``, LoRAs become civitai's
    ``Lora hashes``), then ``Version: idfusion <version>``. Values containing commas, colons or newlines are
    JSON-quoted as A1111 does. ``Model hash`` is the first 10 hex digits of the sha256 of the main model file
    (``model_hash`` if given, else the UNet weights in ``model_files``, else its first weights file). ``id_embeds``
    and ``model_files`` stay in the JSON chunk only.

    Args:
        metadata: any JSON-style dict; the keys above are recognised, the rest are appended generically.

    Returns:
        The text, without a trailing newline.
    """
    fields: list[tuple[str, Any]] = []
    if metadata.get("steps") is not None:
        fields.append(("Steps", metadata["steps"]))
    scheduler = metadata.get("scheduler")
    if scheduler is not None:
        fields.append(("Sampler", SAMPLER_NAMES.get(str(scheduler).lower(), scheduler)))
    if metadata.get("guidance_scale") is not None:
        fields.append(("CFG scale", metadata["guidance_scale"]))
    if metadata.get("seed") is not None:
        fields.append(("Seed", metadata["seed"]))
    if metadata.get("width") is not None and metadata.get("height") is not None:
        fields.append(("Size", f"{metadata['width']}x{metadata['height']}"))
    model_hash = metadata.get("model_hash")
    if model_hash is None and isinstance(metadata.get("model_files"), Mapping):
        model_hash = _main_model_file(metadata["model_files"])
    if model_hash:
        fields.append(("Model hash", str(model_hash)[:10]))
    if metadata.get("model") is not None:
        fields.append(("Model", metadata["model"]))

    for key, value in metadata.items():
        if key in _CORE_KEYS or value is None:
            continue
        if key == "loras":
            entries = _lora_entries(value)
            hashes = [f"{name}: {str(sha)[:10]}" for name, sha, _ in entries if sha]
            weights = [f"{name}: {weight}" for name, _, weight in entries if weight is not None]
            if hashes:
                fields.append(("Lora hashes", ", ".join(hashes)))  # civitai's key; 10 hex digits = its AutoV2 hash
            if weights:
                fields.append(("Lora weights", ", ".join(weights)))
            continue
        if key == "controlnet_image" and isinstance(value, str):
            value = value[:10]
        name = _EXTRA_NAMES.get(key) or key.replace("_", " ").capitalize()
        fields.append((name, _format_value(value)))

    fields.append(("Version", f"idfusion {metadata.get('idfusion_version') or __version__}"))
    line = ", ".join(f"{name}: {_quote(_format_value(value))}" for name, value in fields)

    prompt = str(metadata.get("prompt") or metadata.get("composed_prompt") or "")
    negative = metadata.get("negative_prompt")
    negative_text = f"\nNegative prompt: {negative}" if negative else ""
    # Same assembly (and .strip()) as A1111's create_infotext, so an empty prompt leaves no blank first line.
    return f"{prompt}{negative_text}\n{line}".strip()


# ---- PNG with metadata ---------------------------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"metadata value of type {type(value).__name__} is not JSON-serialisable: {value!r}")


def generated_png(image: Image.Image, metadata: Mapping[str, Any]) -> bytes:
    """PNG bytes of ``image`` carrying ``metadata`` (see :func:`save_generated_image`)."""
    try:
        payload = json.dumps(
            dict(metadata), separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_json_default
        )
    except ValueError as error:
        raise ValueError(f"metadata cannot be stored as JSON: {error}") from error
    # Pillow refuses to decompress text chunks beyond MAX_TEXT_CHUNK, so larger metadata could not be read back.
    if len(payload.encode("utf-8")) > PngImagePlugin.MAX_TEXT_CHUNK:
        raise ValueError(
            f"metadata is {len(payload):,} bytes of JSON; PNG readers accept at most {PngImagePlugin.MAX_TEXT_CHUNK:,}"
        )
    info = PngImagePlugin.PngInfo()
    info.add_itxt(METADATA_KEY, payload, zip=True)
    info.add_text(PARAMETERS_KEY, parameters_text(metadata))  # tEXt when latin-1, else Pillow falls back to iTXt

    pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    if pil.mode not in ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"):
        pil = to_rgb(pil)
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def save_generated_image(path: str | os.PathLike, image: Image.Image, metadata: Mapping[str, Any]) -> Path:
    """Write ``image`` as a PNG carrying ``metadata``, atomically (readers never see a half-written file).

    Args:
        path: destination; parent folders are created. The file is always PNG, whatever the suffix says.
        image: the image (a numpy ``uint8`` array is accepted too).
        metadata: JSON-serialisable dict (numpy scalars/arrays and paths are converted); stored losslessly in the
            compressed ``idfusion`` iTXt chunk, and as A1111 text in the ``parameters`` chunk.

    Returns:
        The path written.

    Raises:
        TypeError: a metadata value is not JSON-serialisable.
        ValueError: the metadata holds NaN/infinity, or is too large for PNG readers to accept.
        OutputError: the file cannot be written.
    """
    written = atomic_write_bytes(path, generated_png(image, metadata))
    logger.debug("wrote %s", written)
    return written


def new_names(out_dir: str | os.PathLike, stem: str, *, suffix: str = "", start: int | None = None) -> Iterator[Path]:
    """Endless candidate names ``<stem>_NNNN<suffix>.png`` from ``start`` (default: :func:`next_output_index`).

    Give one iterator to several :func:`~idfusion.atomic.publish_new` calls and each continues after the name the
    previous one took, moving on past any name another process takes meanwhile.
    """
    first = next_output_index(out_dir, stem) if start is None else int(start)
    return (Path(out_dir) / f"{stem}_{index:04d}{suffix}.png" for index in itertools.count(first))


def save_new_generated_image(
    out_dir: str | os.PathLike,
    stem: str,
    image: Image.Image,
    metadata: Mapping[str, Any],
    *,
    names: Iterator[Path] | None = None,
) -> Path:
    """Like :func:`save_generated_image`, under a new name ``<stem>_NNNN.png`` reserved atomically.

    The index starts after the highest one in use (:func:`next_output_index`) and moves on past any name another
    process takes meanwhile, so concurrent runs into one folder never overwrite each other. ``names`` (from
    :func:`new_names`) continues a sequence of saves.
    """
    written = publish_new(names if names is not None else new_names(out_dir, stem), generated_png(image, metadata))
    logger.debug("wrote %s", written)
    return written


def read_generation_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Read back the metadata :func:`save_generated_image` stored in a PNG.

    Only the PNG's chunks are parsed; pixels are not decoded.

    Raises:
        ImageReadError: the file is missing, unreadable or corrupt.
        NotAnImageError: the file is not an image, or is an image but not a PNG.
        ImageTooLargeError: the PNG is too large for Pillow to open.
        MetadataError: the PNG has no idfusion metadata (not written by idfusion, or stripped), or it is corrupt.
    """
    path = Path(path)
    label = str(path)
    if not path.exists():
        raise ImageReadError(label, "file not found")
    if path.is_dir():
        raise ImageReadError(label, "is a directory, expected a PNG file")
    try:
        if path.stat().st_size == 0:
            raise ImageReadError(label, "file is empty")
        with warnings.catch_warnings():
            # Only chunks are parsed, so a huge pixel count is harmless here; its warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.format != "PNG":
                    raise NotAnImageError(
                        label, f"is a {image.format} image, not a PNG; idfusion stores its metadata only in PNG files"
                    )
                raw = image.info.get(METADATA_KEY)
                if raw is None and image.width * image.height <= DEFAULT_MAX_PIXELS:
                    # Text chunks after the pixel data (some tools move them there) are only parsed on load.
                    raw = image.text.get(METADATA_KEY)
    except IdfusionError:
        raise
    except UnidentifiedImageError as error:
        raise NotAnImageError(label, "not an image (Pillow cannot identify the format)") from error
    except Image.DecompressionBombError as error:
        raise ImageTooLargeError(label, str(error)) from error
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageReadError(label, f"cannot read image ({error})") from error

    if raw is None:
        raise MetadataError(
            label,
            f"no {METADATA_KEY!r} metadata in this PNG: it was not written by idfusion, or its metadata was stripped "
            "(many image editors and upload sites remove PNG text chunks)",
        )
    try:
        metadata = json.loads(str(raw))
    except json.JSONDecodeError as error:
        raise MetadataError(label, f"the {METADATA_KEY!r} metadata is not valid JSON ({error})") from error
    if not isinstance(metadata, dict):
        raise MetadataError(label, f"the {METADATA_KEY!r} metadata is a JSON {type(metadata).__name__}, not an object")
    return metadata


# ---- embeddings as text --------------------------------------------------------------------------------------


def encode_array(a: np.ndarray) -> str:
    """Encode an array as ``"<shape>:<base64 of little-endian float32 bytes>"``, e.g. ``"1x512:AAAA..."``.

    float32 input round-trips exactly through :func:`decode_array`; other dtypes are cast to float32 first.
    """
    array = np.asarray(a, dtype="<f4")  # tobytes() is C-order whatever the layout; 0-d arrays stay 0-d
    shape = "x".join(str(d) for d in array.shape)
    return f"{shape}:{base64.b64encode(array.tobytes()).decode('ascii')}"


def decode_array(s: str) -> np.ndarray:
    """Decode a string written by :func:`encode_array` into a writable float32 array of the stored shape.

    Raises:
        MetadataError: the string is not in that format or its data does not match its shape.
    """
    if not isinstance(s, str) or ":" not in s:
        raise MetadataError("embedding", "expected '<shape>:<base64 float32 data>' as written by idfusion")
    shape_text, data_text = s.split(":", 1)
    try:
        shape = tuple(int(d) for d in shape_text.split("x")) if shape_text else ()
        data = base64.b64decode(data_text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as error:
        raise MetadataError("embedding", f"malformed encoded array ({error})") from error
    if any(d < 0 for d in shape) or len(data) != 4 * math.prod(shape):
        raise MetadataError("embedding", f"{len(data)} bytes of data do not fit float32 shape {shape}")
    return np.frombuffer(data, dtype="<f4").astype(np.float32).reshape(shape)


# ---- file names ----------------------------------------------------------------------------------------------


def next_output_index(out_dir: str | os.PathLike, stem: str) -> int:
    """The first index after every ``<stem>_<index>.*`` or ``<stem>_<index>_*`` file in ``out_dir`` (0 if none).

    Later runs continue after earlier outputs (never filling gaps, which would break sorting by time).
    """
    if not stem or Path(stem).name != stem or stem in (".", ".."):
        raise ValueError(f"stem must be a plain file name without folders, got {stem!r}")
    out_dir = Path(out_dir)
    pattern = re.compile(rf"{re.escape(stem)}_(\d+)(?:[._].*)?")  # "_sheet" companions count too
    start = 0
    if out_dir.is_dir():
        for entry in out_dir.iterdir():
            match = pattern.fullmatch(entry.name)
            if match:
                start = max(start, int(match.group(1)) + 1)
    return start


# ---- contact sheet -------------------------------------------------------------------------------------------


def _letterbox(image: Image.Image, cell: int) -> Image.Image:
    """``image`` scaled to fit a ``cell`` x ``cell`` white square, aspect kept, centred."""
    scale = cell / max(image.width, image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    resized = image if size == image.size else image.resize(size, Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (cell, cell), (255, 255, 255))
    canvas.paste(resized, ((cell - size[0]) // 2, (cell - size[1]) // 2))
    return canvas


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def contact_sheet(
    references: Sequence[Image.Image | np.ndarray],
    outputs: Sequence[Image.Image],
    *,
    cell: int = 256,
    labels: Sequence[str] | None = None,
) -> Image.Image:
    """One image showing the reference faces above the generated images, for a quick look at a run.

    Layout (white background): one row of references, a thin grey separator, then the outputs in rows of up to
    4, each with its label (e.g. ``"seed 42"``) centred underneath in PIL's default font. Every image is
    letterboxed into a ``cell`` x ``cell`` square with its aspect kept. Cells start at ``x = gap + i * (cell + gap)``
    with ``gap = max(2, cell // 32)``. The result is deterministic.

    Args:
        references: reference images (PIL images, or arrays as accepted by :func:`idfusion.images.load_image`).
        outputs: generated images.
        cell: side of each square cell in pixels.
        labels: one label per output, or ``None`` for no labels.

    Raises:
        ValueError: nothing to show, a bad ``cell``, or a label count that differs from the output count.
    """
    if cell < 8:
        raise ValueError(f"cell must be at least 8 pixels, got {cell}")
    if not references and not outputs:
        raise ValueError("contact_sheet needs at least one reference or output image")
    if labels is not None and len(labels) != len(outputs):
        raise ValueError(f"{len(labels)} labels given for {len(outputs)} outputs")

    def as_rgb(item: Image.Image | np.ndarray) -> Image.Image:
        return to_rgb(item) if isinstance(item, Image.Image) else load_image(item, max_pixels=None).to_pil()

    gap = max(2, cell // 32)
    per_row = 4
    font = ImageFont.load_default()
    label_height = 0
    if labels is not None:
        top, bottom = font.getbbox("Ag")[1::2]
        label_height = int(bottom - top) + 2 * gap
    columns = max(len(references), min(len(outputs), per_row))
    output_rows = math.ceil(len(outputs) / per_row)
    separator = 2

    height = gap
    if references:
        height += cell + gap
        if outputs:
            height += separator + gap
    height += output_rows * (cell + label_height + gap)
    sheet = Image.new("RGB", (gap + columns * (cell + gap), height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)

    y = gap
    if references:
        for index, reference in enumerate(references):
            sheet.paste(_letterbox(as_rgb(reference), cell), (gap + index * (cell + gap), y))
        y += cell + gap
        if outputs:
            draw.rectangle((0, y, sheet.width - 1, y + separator - 1), fill=(160, 160, 160))
            y += separator + gap
    for index, output in enumerate(outputs):
        row, column = divmod(index, per_row)
        x = gap + column * (cell + gap)
        top = y + row * (cell + label_height + gap)
        sheet.paste(_letterbox(as_rgb(output), cell), (x, top))
        if labels is not None:
            text = _fit_text(draw, str(labels[index]), font, cell)
            text_x = x + (cell - draw.textlength(text, font=font)) / 2
            draw.text((text_x, top + cell + gap), text, fill=(0, 0, 0), font=font)
    return sheet


# ---- hashing -------------------------------------------------------------------------------------------------

_hash_cache: dict[tuple[str, int, int], str] = {}
_hash_lock = threading.Lock()


def file_sha256(path: str | os.PathLike, *, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, computed once per process for each (path, size, modification time).

    Model weights run to gigabytes and are hashed for every image's metadata; the cache makes that a one-off
    cost, and a changed file (new size or mtime) is hashed again.

    Raises:
        OSError: the file cannot be read (``FileNotFoundError`` names the path).
    """
    resolved = Path(path).resolve()
    stat = resolved.stat()
    key = (str(resolved), stat.st_size, stat.st_mtime_ns)
    with _hash_lock:
        cached = _hash_cache.get(key)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    with open(resolved, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    value = digest.hexdigest()
    with _hash_lock:
        _hash_cache[key] = value
    return value
