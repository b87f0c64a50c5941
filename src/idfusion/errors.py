"""Typed errors for bad input.

Every error a user can cause derives from :class:`IdfusionError`. Messages name the input (usually a file) and
say what was expected, so the CLI can print ``str(error)`` as one line without a traceback.
"""

from __future__ import annotations

__all__ = [
    "IdfusionError",
    "ImageError",
    "ImageReadError",
    "NotAnImageError",
    "ImageTooLargeError",
    "FaceError",
    "NoFaceError",
    "FaceTooSmallError",
    "FaceIndexError",
    "ModelFilesError",
]


class IdfusionError(Exception):
    """Base class of every error caused by user input or missing user-provided files."""


class ImageError(IdfusionError, ValueError):
    """An input image could not be used."""

    def __init__(self, source: str, message: str):
        self.source = source
        super().__init__(f"{source}: {message}")


class ImageReadError(ImageError):
    """The file is missing, unreadable, truncated or corrupt."""


class NotAnImageError(ImageError):
    """The input is readable but is not an image in a format Pillow can decode."""


class ImageTooLargeError(ImageError):
    """The image has more pixels than the configured limit (a guard against decompression bombs)."""


class FaceError(IdfusionError, ValueError):
    """Face analysis found no usable face."""

    def __init__(self, source: str, message: str):
        self.source = source
        super().__init__(f"{source}: {message}")


class NoFaceError(FaceError):
    """The detector found no face in the image."""


class FaceTooSmallError(FaceError):
    """Faces were found but all are smaller than the minimum face size."""


class FaceIndexError(FaceError, IndexError):
    """A face index was requested that the image does not have."""


class ModelFilesError(IdfusionError, FileNotFoundError):
    """Model weights the user must provide are missing or unusable; the message lists what to put where."""
