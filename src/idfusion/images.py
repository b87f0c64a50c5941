"""Reading user images safely, and writing outputs atomically.

Every image that enters idfusion goes through :func:`load_image`: paths, bytes, PIL images and numpy arrays all
come out as an RGB ``uint8`` array of shape ``(H, W, 3)`` plus a human-readable name for error messages.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .atomic import atomic_write_bytes
from .errors import ImageReadError, ImageTooLargeError, NotAnImageError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ImageInput",
    "LoadedImage",
    "load_image",
    "to_rgb",
    "atomic_write_bytes",
    "save_image",
]

# 64 MP: larger than any camera photo a user would feed a face model, far below what a decompression bomb asks for.
DEFAULT_MAX_PIXELS = 64_000_000

ImageInput = str | os.PathLike | bytes | bytearray | Image.Image | np.ndarray


@dataclass(frozen=True)
class LoadedImage:
    """An RGB image ready for analysis.

    Attributes:
        array: ``(H, W, 3)`` ``uint8`` RGB pixels, EXIF orientation already applied.
        name: where it came from, for messages (a path, ``"<bytes>"``, ``"<PIL image>"`` or ``"<array>"``).
    """

    array: np.ndarray
    name: str

    @property
    def width(self) -> int:
        return int(self.array.shape[1])

    @property
    def height(self) -> int:
        return int(self.array.shape[0])

    def to_pil(self) -> Image.Image:
        return Image.fromarray(self.array)


def _check_pixels(name: str, width: int, height: int, max_pixels: int | None) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(
            name, f"image is {width}x{height} = {width * height:,} pixels; the limit is {max_pixels:,} pixels"
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB the way a viewer would show it.

    Alpha is composited over white (transparent regions are usually background, and black would read as hair or
    shadow to a face model), 16-bit and float modes are scaled rather than clipped, CMYK and palette images are
    converted through their colour model.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(image).astype(np.float64)
        peak = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(np.round(arr / peak * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode == "F":
        arr = np.asarray(image).astype(np.float64)
        peak = 1.0 if arr.max() <= 1.0 else 255.0
        arr = np.clip(np.round(arr / peak * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _array_to_rgb(array: np.ndarray, name: str) -> np.ndarray:
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise NotAnImageError(name, f"expected an array of shape (H, W), (H, W, 3) or (H, W, 4); got {array.shape}")
    if array.dtype == np.uint8:
        pass
    elif array.dtype == np.uint16:
        array = np.round(array.astype(np.float64) / 65535.0 * 255.0).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0.0 or array.max() > 1.0:
            raise NotAnImageError(name, "float arrays must hold finite values in [0, 1]")
        array = np.round(array * 255.0).astype(np.uint8)
    else:
        raise NotAnImageError(name, f"unsupported array dtype {array.dtype}; use uint8, uint16 or float in [0, 1]")
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    elif array.shape[2] == 4:
        array = np.asarray(to_rgb(Image.fromarray(array, mode="RGBA")))
    return np.ascontiguousarray(array)


def load_image(
    source: ImageInput, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, name: str | None = None
) -> LoadedImage:
    """Load an image from a path, encoded bytes, a PIL image or a numpy array.

    Args:
        source: a file path, encoded image bytes, a ``PIL.Image.Image`` or a ``(H, W[, C])`` array
            (``uint8``, ``uint16`` or float in ``[0, 1]``; arrays are taken as RGB/RGBA, never BGR).
        max_pixels: refuse images with more pixels than this (``None`` disables the check).
        name: a name for error messages; defaults to the path or a description of the input type.

    Raises:
        ImageReadError: missing, unreadable, truncated or corrupt file.
        NotAnImageError: the data is not an image Pillow can decode.
        ImageTooLargeError: more than ``max_pixels`` pixels.
    """
    if isinstance(source, np.ndarray):
        label = name or "<array>"
        if source.ndim >= 2:
            _check_pixels(label, source.shape[1], source.shape[0], max_pixels)
        return LoadedImage(_array_to_rgb(source, label), label)

    if isinstance(source, Image.Image):
        label = name or getattr(source, "filename", None) or "<PIL image>"
        _check_pixels(label, source.width, source.height, max_pixels)
        image = ImageOps.exif_transpose(source) or source
        return LoadedImage(np.ascontiguousarray(np.asarray(to_rgb(image))), label)

    if isinstance(source, (bytes, bytearray)):
        label = name or "<bytes>"
        data = bytes(source)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        label = name or str(path)
        if not path.exists():
            raise ImageReadError(label, "file not found")
        if path.is_dir():
            raise ImageReadError(label, "is a directory, expected an image file")
        try:
            data = path.read_bytes()
        except OSError as error:
            raise ImageReadError(label, f"cannot read file ({error.strerror or error})") from error
    else:
        raise NotAnImageError(name or type(source).__name__, "expected a path, bytes, a PIL image or a numpy array")

    if not data:
        raise ImageReadError(label, "file is empty")
    try:
        # Pillow's own bomb check warns or raises at its fixed limit; ours is the one that applies.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            saved_limit = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
            try:
                image = Image.open(io.BytesIO(data))
            finally:
                Image.MAX_IMAGE_PIXELS = saved_limit
            # The header gives the size before any pixel is decoded.
            _check_pixels(label, image.width, image.height, max_pixels)
            image.load()
    except UnidentifiedImageError as error:
        raise NotAnImageError(label, "not an image (Pillow cannot identify the format)") from error
    except ImageTooLargeError:
        raise
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageReadError(label, f"corrupt or truncated image ({error})") from error
    image = ImageOps.exif_transpose(image) or image
    return LoadedImage(np.ascontiguousarray(np.asarray(to_rgb(image))), label)


def save_image(path: str | os.PathLike, image: np.ndarray | Image.Image, **png_info: str) -> Path:
    """Encode ``image`` as PNG and write it atomically; ``png_info`` entries become text chunks."""
    from PIL import PngImagePlugin

    pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    info = PngImagePlugin.PngInfo()
    for key, value in png_info.items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG", pnginfo=info)
    return atomic_write_bytes(path, buffer.getvalue())
