"""Release-exact samplers as diffusers schedulers (``SchedulerMixin`` + ``ConfigMixin``).

- :class:`FeedFaceDPMSolverScheduler`: FeedFace's DPM-Solver++ "fast" order-3 sampler (``libs/dpm_solver_pp.py``).
- :class:`FlashFaceDDIMScheduler`: official FlashFace's DDIM over fractional trailing times (``ldm/ops``).

Both take one ``step()`` per model evaluation, so the ordinary diffusers loop
``for t in scheduler.timesteps: x = scheduler.step(model(x, t), t, x).prev_sample`` reproduces the release.
Submodules (and diffusers) load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["FeedFaceDPMSolverScheduler", "FlashFaceDDIMScheduler"]

_LAZY = {
    "FeedFaceDPMSolverScheduler": "idfusion.schedulers.scheduling_feedface_dpm_solver",
    "FlashFaceDDIMScheduler": "idfusion.schedulers.scheduling_flashface_ddim",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'idfusion.schedulers' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
