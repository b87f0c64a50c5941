"""Temporary alias of :mod:`idfusion.convert.flashface` while the converters move (removed before release)."""

from ..convert.flashface import *  # noqa: F403
from ..convert.flashface import __all__  # noqa: F401
