"""Where idfusion keeps files it generates or finds: one cache root for the whole package."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_root"]


def cache_root() -> Path:
    """``$IDFUSION_CACHE`` if set, else ``~/.cache/idfusion``."""
    root = os.environ.get("IDFUSION_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "idfusion"
