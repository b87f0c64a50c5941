"""argparse value types: each rejects a bad value with a message naming what was expected."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def _whole(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None


def _finite(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {value!r}")
    return number


def _at_least(parse: Callable[[str], float], low: float, high: float | None = None) -> Callable[[str], float]:
    def check(value: str):
        number = parse(value)
        if number < low or (high is not None and number > high):
            span = f">= {low}" if high is None else f"between {low} and {high}"
            raise argparse.ArgumentTypeError(f"expected a number {span}, got {value}")
        return number

    return check


finite = _finite
non_negative_float = _at_least(_finite, 0)
non_negative_int = _at_least(_whole, 0)
positive_int = _at_least(_whole, 1)
seed = _at_least(_whole, 0, 2**63 - 1)
