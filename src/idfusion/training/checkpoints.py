"""Checkpoint folders that are complete or absent: written under a temporary name, then renamed into place.

accelerate's own checkpoint naming (``ProjectConfiguration(automatic_checkpoint_naming=True, total_limit=K)``) writes
straight into the final folder, so a crash mid-write leaves a half-written ``checkpoint_N`` that resume would pick up.
Here a checkpoint is built in ``.checkpoint-N.tmp``, its files are fsynced, ``trainer_state.json`` is written last,
and only then is the folder renamed to ``checkpoint-N`` (a rename is atomic). Old checkpoints are first renamed to
``.trash-…`` and then deleted, so a crash mid-delete never leaves a partial folder under a checkpoint name either.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from ..errors import IdfusionError

__all__ = [
    "STATE_FILE",
    "CheckpointError",
    "Checkpoints",
    "fsync_tree",
    "replace_dir",
]

STATE_FILE = "trainer_state.json"  # written last: a checkpoint folder without it is not a checkpoint
_NAME = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(IdfusionError, ValueError):
    """A checkpoint asked for is missing or incomplete, or the output folder holds another run's checkpoints."""


def fsync_tree(folder: Path) -> None:
    """Flush every file under ``folder`` and the folders themselves to disk (so a rename after it is durable)."""
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(Path(root))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems do not open folders; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _discard(folder: Path) -> None:
    """Rename ``folder`` out of the way first, then delete it: an interrupted delete leaves only a ``.trash-`` name."""
    if not folder.exists():
        return
    trash = folder.with_name(f".trash-{folder.name}-{os.getpid()}")
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def replace_dir(tmp: Path, final: Path) -> Path:
    """Move the finished folder ``tmp`` to ``final``, replacing an older ``final`` (fsynced first)."""
    fsync_tree(tmp)
    _discard(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    return final


def read_state(folder: Path) -> dict[str, Any] | None:
    """The checkpoint's ``trainer_state.json``, or None if the folder is not a complete checkpoint."""
    try:
        state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and isinstance(state.get("step"), int) else None


class Checkpoints:
    """The ``checkpoint-N`` folders of one run, newest last; keeps the last ``keep_last`` complete ones."""

    def __init__(self, root: Path, keep_last: int):
        self.root, self.keep_last = Path(root), keep_last

    def complete(self) -> list[tuple[int, Path]]:
        """``(step, folder)`` of every complete checkpoint, sorted by step."""
        if not self.root.is_dir():
            return []
        found = []
        for folder in self.root.iterdir():
            match = _NAME.match(folder.name)
            if match and folder.is_dir():
                state = read_state(folder)
                if state is not None and state["step"] == int(match.group(1)):
                    found.append((state["step"], folder))
        return sorted(found)

    def latest(self) -> Path | None:
        found = self.complete()
        return found[-1][1] if found else None

    def resolve(self, resume: str | os.PathLike[str]) -> Path | None:
        """``"latest"``: the newest complete checkpoint (None if there is none); a path: that checkpoint."""
        if str(resume) == "latest":
            return self.latest()
        folder = Path(resume).expanduser().resolve()
        if not folder.is_dir():
            raise CheckpointError(f"--resume {resume}: no such checkpoint folder")
        if read_state(folder) is None:
            raise CheckpointError(f"--resume {resume}: not a complete checkpoint (no valid {STATE_FILE})")
        return folder

    def staging(self, step: int) -> Path:
        """The temporary folder that becomes ``checkpoint-{step}``."""
        return self.root / f".checkpoint-{step}.tmp"

    def remove_leftovers(self) -> None:
        """Delete temporary and half-deleted folders that a crash left behind (never a complete checkpoint)."""
        if not self.root.is_dir():
            return
        for folder in self.root.iterdir():
            if folder.name.startswith((".checkpoint-", ".trash-")):
                shutil.rmtree(folder, ignore_errors=True)

    def commit(self, staging: Path, step: int, state: dict[str, Any]) -> Path:
        """Write ``trainer_state.json`` into ``staging``, rename it to ``checkpoint-{step}``, drop the oldest."""
        (staging / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=1) + "\n", encoding="utf-8")
        final = replace_dir(staging, self.root / f"checkpoint-{step}")
        for _, folder in self.complete()[: -self.keep_last]:
            _discard(folder)
        return final
