"""``idfusion serve``: one job service behind an HTTP API (FastAPI) and a web UI (gradio), in one process.

- :mod:`.catalogue`: which methods a server offers (``--model METHOD=PATH``, official weights already in the cache,
  or the synthetic world's weights and its base model as a prompt-only baseline) and how a request may set each
  registry option (:class:`RequestOption`); no module here branches on a method's name.
- :mod:`.service`: :class:`JobService`, the one implementation of the work: checked uploads, a queue with a
  concurrency limit, job states, per-step progress, cancellation, one shared
  :class:`~idfusion.jobs.PipelineCache`, results in a per-server output folder.
- :mod:`.api`: :func:`create_app`, the FastAPI app (``/api/...``, OpenAPI docs at ``/docs``) with the gradio UI
  (:mod:`.ui`) mounted at ``/ui``, behind :mod:`.security`'s checks (token, host, origin, body size).

Importing this package imports neither FastAPI, gradio nor torch; each loads when an app is built.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ServerConfig": "config",
    "check_bind": "config",
    "ServedMethod": "catalogue",
    "RequestOption": "catalogue",
    "serve_catalogue": "catalogue",
    "JobService": "service",
    "JobRequest": "service",
    "JobState": "service",
    "ServiceError": "service",
    "create_app": "api",
    "build_ui": "ui",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
