"""argparse value types: the shared parsers of :mod:`idfusion.values`, with their message as argparse's."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from .. import values


def arg_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` as an argparse ``type``: its :class:`~idfusion.values.OptionValueError` becomes argparse's error
    (argparse would print a generic "invalid value" for a plain ``ValueError``)."""

    def convert(value: str) -> Any:
        try:
            return parse(value)
        except values.OptionValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


finite = arg_type(values.finite)
non_negative_float = arg_type(values.non_negative_float)
non_negative_int = arg_type(values.non_negative_int)
positive_int = arg_type(values.positive_int)
seed = arg_type(values.seed)
