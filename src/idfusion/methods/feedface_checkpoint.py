"""Temporary alias of :mod:`idfusion.convert.feedface` while the converters move (removed before release)."""

from ..convert.feedface import *  # noqa: F403
from ..convert.feedface import __all__  # noqa: F401
