"""idfusion: zero-shot identity-preserving image generation.

Importing the package is cheap: submodules (and torch) load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> submodule that defines it
_LAZY = {
    "FaceAnalyzer": "idfusion.faces",
    "Face": "idfusion.faces",
    "load_image": "idfusion.images",
    "make_tiny": "idfusion.testing",
    "IdfusionError": "idfusion.errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'idfusion' has no attribute {name!r}")
