"""World training plans, one module per method: ``plans/<method>.py`` (hyphens as underscores) defines
``PLANS: dict[str, MethodPlan]``, at least ``"full"`` (the shipped weights) and ``"smoke"`` (the tests' run).

:func:`plans_for` imports a method's module on first use, so a new method plugs in with one file and no edit here.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MethodPlan", "planned_methods", "plans_for"]


@dataclass(frozen=True)
class MethodPlan:
    """One method's world training: data sizes, the recipe and its schedule."""

    recipe: str
    identities: int  # the first this many training identities
    images_per_identity: int
    steps: int
    batch: int
    learning_rate: float
    warmup: int
    ema_decay: float | None
    recipe_options: dict[str, Any] = field(default_factory=dict)  # the recipe section, besides name and pretrained
    resolution: int = 64
    checkpoint_every: int = 250
    validate: bool = True
    # components the method leaves as the base model has them (frozen in training): shipped as a reference to the
    # base (its pipeline must load them from ``base_model``), not copied
    shared_components: tuple[str, ...] = ("vae", "text_encoder", "tokenizer")


def _module_name(method: str) -> str:
    return f"{__name__}.{method.replace('-', '_')}"


def planned_methods() -> list[str]:
    """Registered method names that have a world training plan."""
    from ... import registry

    modules = {info.name for info in pkgutil.iter_modules(__path__)}
    return [spec.name for spec in registry.methods() if spec.name.replace("-", "_") in modules]


def plans_for(method: str) -> dict[str, MethodPlan]:
    """``method``'s plans by name; ValueError when it has none."""
    if method not in planned_methods():
        raise ValueError(f"no world training plan for {method!r}; planned: {', '.join(planned_methods())}")
    return importlib.import_module(_module_name(method)).PLANS
