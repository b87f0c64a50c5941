"""Checkpoint key maps written once, as data, with the inverse derived.

A converter states one direction only: for each key of the target model, where its tensor lives in the official
file (a :class:`Slot`). :class:`ModuleKeyMap` enumerates the model's own keys (meta tensors are enough), applies
that rule, and derives the rest: loading (official -> model, splitting fused tensors and reshaping) and writing
back (model -> official, in the official order). A map that two model keys claim the same official tensor, or a
fused group with missing parts, is refused when the map is built, so the two directions cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import torch

__all__ = ["Slot", "ModuleKeyMap"]


def key_listing(keys: Iterable[str], limit: int = 12) -> str:
    """Sorted keys for a message, the first ``limit`` of them."""
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


class Slot(NamedTuple):
    """Where one model tensor lives in an official file: what a key map says about one model key.

    Attributes:
        key: the official key.
        part: ``(i, n)`` when the official tensor fuses ``n`` model tensors, concatenated along dim 0: this one is
            the ``i``-th block of rows.
        reshape: how the file stores the tensor, when not in the model's shape: ``"unbatch"`` (file ``(1, L, C)``,
            model ``(L, C)``) or ``"1x1"`` (file 1x1 conv ``(C_out, C_in, 1, 1)``, model linear ``(C_out, C_in)``;
            other ranks, such as biases, pass unchanged).
        copy: the model key holds a duplicate of the official tensor: filled on loading, never written back.
    """

    key: str
    part: tuple[int, int] | None = None
    reshape: str | None = None
    copy: bool = False


# Reshape tag -> (official -> model, model -> official).
_RESHAPES: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]] = {
    "unbatch": (lambda t: t.reshape(t.shape[-2:]), lambda t: t[None]),  # (1, L, C) <-> (L, C)
    "1x1": (
        lambda t: t.reshape(t.shape[:2]) if t.ndim == 4 else t,  # (C_out, C_in, 1, 1) -> (C_out, C_in)
        lambda t: t.reshape(*t.shape, 1, 1) if t.ndim == 2 else t,  # (C_out, C_in) -> (C_out, C_in, 1, 1)
    ),
}


def _valid_claims(parts: list[tuple[int, int] | None]) -> bool:
    """Whether the slots sharing one official key (copies aside) are one plain tensor or distinct parts of one
    fusion (not necessarily all of them: a partial state dict)."""
    if parts in ([], [None]):
        return True
    fused = [part for part in parts if part is not None]
    if len(fused) != len(parts) or len({count for _, count in fused}) != 1:
        return False
    indices = [index for index, _ in fused]
    return len(set(indices)) == len(indices) and max(indices) < fused[0][1]


@dataclass(frozen=True)
class ModuleKeyMap:
    """One module's key map to an official file, derived from the module's own keys and the one direction written
    by hand (model key -> :class:`Slot`): loading splits fused tensors, reshapes and fills copies; writing back
    joins and reshapes, so both directions read the same data.

    Attributes:
        slots: model key -> its slot, in the order the keys were given.
        groups: official key -> its model keys (fused parts in row order, then copies), in first-named order.
        unmapped: the model keys the map names no slot for.
    """

    slots: dict[str, Slot]
    groups: dict[str, tuple[str, ...]]
    unmapped: tuple[str, ...] = ()

    @classmethod
    def derive(cls, keys: Iterable[str], to_official: Callable[[str], Slot | None]) -> ModuleKeyMap:
        """Apply ``to_official`` to each model key (a model's ``state_dict()``, possibly of a meta model built from
        the inferred config) and group the slots by official key.

        Raises:
            ValueError: model keys that claim one official tensor without being its declared parts (a map error).
        """
        slots: dict[str, Slot] = {}
        unmapped: list[str] = []
        for key in keys:
            slot = to_official(key)
            if slot is None:
                unmapped.append(key)
            else:
                slots[key] = slot
        grouped: dict[str, list[str]] = {}
        for key, slot in slots.items():
            grouped.setdefault(slot.key, []).append(key)
        clashes = []
        for official, members in grouped.items():
            members.sort(key=lambda k: (slots[k].copy, (slots[k].part or (0, 1))[0]))
            if not _valid_claims([slots[k].part for k in members if not slots[k].copy]):
                clashes.append(f"{official} <- {', '.join(members)}")
        if clashes:
            raise ValueError(f"key map: model keys that claim one official tensor: {key_listing(clashes)}")
        return cls(slots, {official: tuple(members) for official, members in grouped.items()}, tuple(unmapped))

    def split_count(self, official: str) -> int:
        """How many model tensors ``official`` fuses (1: a plain tensor)."""
        part = self.slots[self.groups[official][0]].part
        return 1 if part is None else part[1]

    def incomplete(self) -> list[str]:
        """The model keys of fused official tensors that lack some of their parts (those cannot be written)."""
        out = []
        for official, members in self.groups.items():
            owners = [k for k in members if not self.slots[k].copy]
            if owners and len(owners) != self.split_count(official):
                out += owners
        return out

    def from_official(
        self, state: Mapping[str, torch.Tensor], *, clone_parts: bool = True
    ) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
        """Official tensors as model tensors.

        A fused tensor whose rows do not divide by its parts goes whole to each part, for the shape check to name.
        Parts are cloned unless ``clone_parts`` is false: as views they would share storage, which safetensors
        refuses to save.

        Returns:
            `tuple`: model key -> tensor, model key -> its official key, and the official keys the map has no
            place for.
        """
        out: dict[str, torch.Tensor] = {}
        sources: dict[str, str] = {}
        unknown: list[str] = []
        for official, value in state.items():
            members = self.groups.get(official)
            if members is None:
                unknown.append(official)
                continue
            for key in members:
                slot = self.slots[key]
                tensor = value
                if slot.part is not None:
                    index, count = slot.part
                    if value.ndim and value.shape[0] % count == 0:
                        tensor = value.chunk(count, dim=0)[index]
                    tensor = tensor.clone() if clone_parts else tensor
                out[key] = _RESHAPES[slot.reshape][0](tensor) if slot.reshape else tensor
                sources[key] = official
        return out, sources, unknown

    def to_official(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Model tensors (under the keys this map was derived from) as official ones, in :attr:`groups` order:
        fused parts concatenated along dim 0, copies and incomplete fusions (:meth:`incomplete`) left out."""
        import torch

        out: dict[str, torch.Tensor] = {}
        for official, members in self.groups.items():
            owners = [k for k in members if not self.slots[k].copy]
            tensors = [_RESHAPES[s.reshape][1](state[k]) if (s := self.slots[k]).reshape else state[k] for k in owners]
            count = self.split_count(official)
            if tensors and len(tensors) == count:
                out[official] = tensors[0] if count == 1 else torch.cat(tensors, dim=0)
        return out
