"""Samplers by short name, and the name of a scheduler object for metadata (imports diffusers only when used).

A pipeline samples with ``pipe.scheduler`` (diffusers' convention: assign one to change it). A call's
``scheduler="euler"`` builds that sampler from ``pipe.scheduler.config`` for this call only. Images record the
sampler by short name when it is one of these, else by class name, so ``--from`` can build it again.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SCHEDULERS", "make_scheduler", "scheduler_name", "scheduler_from_name"]

# our name -> (diffusers class name, config overrides). "dpm++" is diffusers' DPMSolverMultistep default (2M).
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "dpm++": ("DPMSolverMultistepScheduler", {}),
    "dpm++-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    # DPM-Solver's singlestep "fast" method at order 3 (1, 2, 3, 1, 2, 3, ... evaluations per step)
    "dpm++-3s": (
        "DPMSolverSinglestepScheduler",
        {"solver_order": 3, "algorithm_type": "dpmsolver++", "lower_order_final": True},
    ),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    # the releases' own samplers (idfusion.schedulers), exactly as their code steps
    "flashface-ddim": ("FlashFaceDDIMScheduler", {}),
    "feedface-dpm": ("FeedFaceDPMSolverScheduler", {}),
}


def _scheduler_class(class_name: str) -> type:
    import diffusers

    from .. import schedulers as ours

    cls = getattr(ours, class_name, None) if class_name in ours.__all__ else getattr(diffusers, class_name, None)
    if cls is None:
        raise ValueError(f"unknown scheduler class {class_name!r}")
    return cls


def make_scheduler(name: str, config: dict[str, Any]):
    """A scheduler by our short name (or a diffusers scheduler class name), built from a model's scheduler config."""
    if name in SCHEDULERS:
        class_name, extra = SCHEDULERS[name]
    elif name.endswith("Scheduler"):
        class_name, extra = name, {}
    else:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    return _scheduler_class(class_name).from_config(dict(config), **extra)


def scheduler_from_name(name: str | None, current):
    """``current`` when ``name`` is ``None`` or names the scheduler ``current`` already is, else a new one from
    ``current.config`` (the model's noise schedule is kept; the sampler changes)."""
    if name is None or scheduler_name(current) == name:
        return current
    return make_scheduler(name, current.config)


def scheduler_name(scheduler) -> str:
    """Our short name for ``scheduler`` if its class and settings match one, else its class name."""
    class_name = type(scheduler).__name__
    config = scheduler.config
    for name, (cls, extra) in SCHEDULERS.items():
        if cls != class_name:
            continue
        if all(config.get(key) == value for key, value in extra.items()) and not _differs_from_default(
            scheduler, extra
        ):
            return name
    return class_name


def _differs_from_default(scheduler, extra: dict[str, Any]) -> bool:
    # "dpm++" is DPMSolverMultistep without Karras sigmas: a Karras-configured one must not be called plain "dpm++".
    return not extra and bool(scheduler.config.get("use_karras_sigmas", False))
