"""Parsers for user-given option values: each turns text into a value or raises :class:`OptionValueError` saying
what was expected. The CLI, the web UI and job files share them, so a bad value reads the same everywhere."""

from __future__ import annotations

import math
import os
from collections.abc import Callable

from .errors import IdfusionError

__all__ = [
    "OptionValueError",
    "finite",
    "non_negative_float",
    "non_negative_int",
    "positive_int",
    "seed",
    "unit_interval",
    "face_box",
    "weighted_path",
]


class OptionValueError(IdfusionError, ValueError):
    """An option's value cannot be used; the message says what was expected."""


def _whole(value: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        return int(value)
    except (TypeError, ValueError):
        raise OptionValueError(f"expected a whole number, got {value!r}") from None


def finite(value: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise OptionValueError(f"expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise OptionValueError(f"expected a finite number, got {value!r}")
    return number


def _in_range(parse: Callable[[str], float], low: float, high: float | None = None) -> Callable[[str], float]:
    def check(value: str):
        number = parse(value)
        if number < low or (high is not None and number > high):
            span = f">= {low}" if high is None else f"between {low} and {high}"
            raise OptionValueError(f"expected a number {span}, got {value}")
        return number

    return check


non_negative_float = _in_range(finite, 0)
non_negative_int = _in_range(_whole, 0)
positive_int = _in_range(_whole, 1)
seed = _in_range(_whole, 0, 2**63 - 1)
unit_interval = _in_range(finite, 0.0, 1.0)


def face_box(value: str) -> list[float]:
    """``x1,y1,x2,y2`` in [0, 1] (relative to the image's width and height)."""
    parts = str(value).split(",")
    try:
        box = [float(p) for p in parts]
    except ValueError:
        box = []
    if len(box) != 4 or not all(0.0 <= v <= 1.0 for v in box):
        raise OptionValueError(f"expected x1,y1,x2,y2 with each value in [0, 1], got {value!r}")
    if any(box) and not (box[2] > box[0] and box[3] > box[1]):
        raise OptionValueError(f"expected x2 > x1 and y2 > y1 (or 0,0,0,0 for no box), got {value!r}")
    return box


def weighted_path(value: str) -> tuple[str, float]:
    """``PATH`` or ``PATH:WEIGHT`` (weight 1.0 when absent). A colon that starts a Windows drive or a path is part of
    the path, so ``C:/x.png`` and ``a:b/c.png`` stay whole."""
    path, sep, weight = str(value).rpartition(":")
    if sep and path and not weight.startswith(("\\", "/")) and not os.path.exists(value):
        try:
            return path, finite(weight)
        except OptionValueError:
            pass
    return str(value), 1.0
