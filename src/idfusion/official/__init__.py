"""The authors' own code, run beside idfusion on the same weights: ``idfusion bench --against official``.

Each method's module here names its release (:class:`Release`: repository, commit, the files and functions it
runs) and gives three runners over one folder of weights in the release's own layout:

- ``release``: the authors' code, imported from the user's checkout (``--official-code DIR`` or
  ``$IDFUSION_OFFICIAL_<METHOD>``), driven as the release's demo drives it;
- ``reference``: when no checkout is given, the release's control flow written out here, which the tests hold to
  numbers recorded from the authors' code (``tests/data/official``);
- ``ours``: idfusion's pipeline loading the same folder.

The release code is never copied into idfusion; it is imported from where the user keeps it. On a machine without
CUDA, :func:`release_shims` maps the release's hard-coded ``.cuda()`` calls to the bench device and stands in for
torchvision modules that its sampling path imports but does not use; neither changes the arithmetic.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import subprocess
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import IdfusionError

__all__ = ["Release", "ReleaseCodeError", "locate_release", "release_commit", "release_shims"]

logger = logging.getLogger(__name__)


class ReleaseCodeError(IdfusionError, ValueError):
    """The folder given as the release's code is not that release."""


@dataclass(frozen=True)
class Release:
    """What a method's release is and which of its code the bench runs."""

    method: str
    repo: str  # "owner/name" on GitHub
    commit: str  # the commit the runner was written against (and the tests' numbers recorded from)
    runs: str  # the release's functions and files the runner calls, in words
    marker: str  # a file every checkout of the release has, relative to its root
    native_size: int
    default_steps: int
    import_roots: tuple[str, ...] = ("",)  # folders (relative to the root) the release puts on sys.path

    @property
    def env_var(self) -> str:
        return "IDFUSION_OFFICIAL_" + self.method.upper().replace("-", "_")


def locate_release(release: Release, path: str | os.PathLike[str] | None = None) -> Path | None:
    """The checkout of ``release`` to run: ``path``, else ``$IDFUSION_OFFICIAL_<METHOD>``, else None (the reference
    loop runs instead). Raises :class:`ReleaseCodeError` naming the folder when it is not the release."""
    given = path if path is not None else os.environ.get(release.env_var)
    if not given:
        return None
    root = Path(given).expanduser()
    source = "--official-code" if path is not None else f"${release.env_var}"
    if not root.is_dir():
        raise ReleaseCodeError(f"{source} {root}: not a folder; expected a checkout of github.com/{release.repo}")
    if not (root / release.marker).is_file():
        raise ReleaseCodeError(
            f"{source} {root}: {release.marker} is missing; expected a checkout of github.com/{release.repo}"
        )
    commit = release_commit(root)
    if commit is not None and not commit.startswith(release.commit[:7]):
        logger.warning("%s is at commit %s; the %s runner was written against %s", root, commit[:12], release.method,
                       release.commit[:12])  # fmt: skip
    return root


def release_commit(root: Path) -> str | None:
    """The checkout's HEAD commit, or None when it is not a git checkout (a pip package, an archive)."""
    try:
        done = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else None


class _Absent(types.ModuleType):
    """A module the release imports but its sampling path never uses: any use raises, naming it."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)

        def unavailable(*args, **kwargs):
            raise ReleaseCodeError(f"{self.__name__}.{name} is not installed; the bench's path should not need it")

        return unavailable


@contextlib.contextmanager
def release_shims(root: Path, release: Release, device: str, absent: tuple[str, ...] = ()) -> Iterator[None]:
    """Within the context the release imports from ``root``: its folders lead ``sys.path``; modules in ``absent``
    that are not installed (torchvision here) import as :class:`_Absent`; off CUDA, ``Tensor.cuda`` and
    ``Module.cuda`` move to ``device``. Afterwards ``sys.path`` is restored and the release's modules leave
    ``sys.modules`` (its generic names such as ``models`` and ``utils`` must not shadow anyone else's)."""
    paths = [str((root / sub).resolve()) for sub in release.import_roots]
    before = set(sys.modules)
    saved_path = list(sys.path)
    sys.path[:0] = paths
    stubs = []
    missing = {name.split(".")[0] for name in absent if name.split(".")[0] not in sys.modules}
    missing = {top for top in missing if importlib.util.find_spec(top) is None}
    for name in absent:
        if name.split(".")[0] in missing:
            for part in range(1, len(name.split(".")) + 1):
                dotted = ".".join(name.split(".")[:part])
                if dotted not in sys.modules:
                    sys.modules[dotted] = _Absent(dotted)
                    stubs.append(dotted)
                    if part > 1:  # ``import a.b as c`` reads attribute b of a
                        setattr(sys.modules[dotted.rpartition(".")[0]], dotted.rpartition(".")[2], sys.modules[dotted])
    originals = (torch.Tensor.cuda, torch.nn.Module.cuda)
    if not torch.cuda.is_available():
        torch.Tensor.cuda = lambda self, *a, **k: self.to(device)  # type: ignore[method-assign]
        torch.nn.Module.cuda = lambda self, *a, **k: self.to(device)  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.nn.Module.cuda = originals  # type: ignore[method-assign]
        sys.path[:] = saved_path
        for name in set(sys.modules) - before:
            module = sys.modules[name]
            origin = getattr(module, "__file__", None) or ""
            if name in stubs or any(origin.startswith(p) for p in paths):
                del sys.modules[name]
