"""Writing files so that nothing is lost: atomic replacement, atomically reserved new names, and checks up front.

* :func:`atomic_write_bytes` replaces a file so that readers see the old file or the complete new one.
* :func:`publish_new` writes a file under the first free name of a sequence, reserving the name atomically: two
  processes writing into one folder at the same moment never take the same name, and a reader never sees a
  half-written file. The complete file is hard-linked onto its final name, which fails if the name exists
  (``link(2)`` never replaces); on filesystems without hard links the name is reserved with ``O_CREAT | O_EXCL``
  and the complete file renamed onto the reservation.
* Temporary files are named ``.NAME.idfusion-PID.XXXXXXXX.tmp`` beside their target. A run killed with ``kill -9``
  leaves one behind; :func:`clean_stale_temps` removes those whose process is gone, and the writers call it once
  per folder.
* Files get the permissions ``0o666 & ~umask``, as any tool writing user files does (``mkstemp`` alone gives
  ``0600``).
* :func:`check_output_folder` finds an unwritable folder or a full disk before any work is done.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import IdfusionError

__all__ = [
    "OutputError",
    "atomic_write_bytes",
    "publish_new",
    "clean_stale_temps",
    "check_output_folder",
    "file_mode",
]

logger = logging.getLogger(__name__)

_TEMP_RE = re.compile(r"^\..+\.idfusion-(\d+)\.[^.]+\.tmp$")
_LINK_UNSUPPORTED = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV, errno.EMLINK}
_cleaned: set[Path] = set()


class OutputError(IdfusionError, OSError):
    """An output file or folder cannot be written: names the path and the reason."""


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask() both sets and gets, which races with threads)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new user file gets: ``0o666`` less the process umask."""
    return 0o666 & ~_umask()


def _reason(error: OSError) -> str:
    if error.errno == errno.ENOSPC:
        return "the disk is full"
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "permission denied" if error.errno != errno.EROFS else "the filesystem is read-only"
    return error.strerror or str(error)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # another user's process: alive
    return True


def clean_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove this tool's temporary files in ``folder`` whose writing process no longer runs (a killed run's
    leftovers). Files of running processes and every other file are left alone. Returns the paths removed."""
    folder = Path(folder)
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_RE.match(entry.name)
        if match and int(match[1]) != os.getpid() and not _pid_alive(int(match[1])):
            try:
                entry.unlink()
                removed.append(entry)
            except OSError:
                pass
    if removed:
        logger.info("removed %d temporary file(s) left by an interrupted run in %s", len(removed), folder)
    return removed


def _clean_once(folder: Path) -> None:
    key = folder.resolve()
    if key not in _cleaned:
        _cleaned.add(key)
        clean_stale_temps(folder)


def _write_temp(folder: Path, name: str, data: bytes) -> Path:
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.idfusion-{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), file_mode())
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def _mkdir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"{folder}: cannot create the output folder ({_reason(error)})") from error


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that readers see either the old file or the complete new one.

    Raises:
        OutputError: the file cannot be written (names it, and why: permission, full disk, ...).
    """
    path = Path(path)
    _mkdir(path.parent)
    _clean_once(path.parent)
    try:
        tmp = _write_temp(path.parent, path.name, data)
        try:
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as error:
        raise OutputError(f"{path}: cannot be written ({_reason(error)})") from error
    return path


def _publish(tmp: Path, path: Path) -> bool:
    """Put the complete ``tmp`` at ``path`` unless ``path`` exists; True if it was published."""
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as error:
        if error.errno not in _LINK_UNSUPPORTED:
            raise
    try:  # no hard links here: reserve the name exclusively, then move the complete file onto the reservation
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        return False
    os.replace(tmp, path)
    return True


def publish_new(names: Iterator[Path] | Callable[[], Iterator[Path]], data: bytes) -> Path:
    """Write ``data`` under the first name of ``names`` that does not exist yet, atomically.

    Args:
        names: candidate paths, all in one folder, tried in order (an endless iterator is fine).
        data: the file's bytes.

    Returns:
        The path written. No existing file is ever replaced, even by a concurrent writer.

    Raises:
        OutputError: the folder or file cannot be written.
    """
    candidates = iter(names() if callable(names) else names)
    first = next(candidates)
    _mkdir(first.parent)
    _clean_once(first.parent)
    try:
        tmp = _write_temp(first.parent, first.name, data)
    except OSError as error:
        raise OutputError(f"{first}: cannot be written ({_reason(error)})") from error
    try:
        path = first
        while True:
            try:
                if _publish(tmp, path):
                    return path
            except OSError as error:
                raise OutputError(f"{path}: cannot be written ({_reason(error)})") from error
            path = next(candidates)
    finally:
        tmp.unlink(missing_ok=True)


def check_output_folder(folder: str | os.PathLike, needed_bytes: int = 0) -> Path:
    """Make sure ``folder`` can take new files of about ``needed_bytes`` in total, before any work is done.

    Creates the folder if needed, writes and removes a probe file, and compares the free space with the need.

    Raises:
        OutputError: the path is not a folder, cannot be created or written, or the disk has too little space.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: exists and is not a folder")
    _mkdir(folder)
    try:
        tmp = _write_temp(folder, "write-check", b"")
        tmp.unlink()
    except OSError as error:
        raise OutputError(f"{folder}: cannot write into the output folder ({_reason(error)})") from error
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return folder
    if needed_bytes > free:
        raise OutputError(
            f"{folder}: {free / 2**20:,.1f} MiB free, but the outputs need about {needed_bytes / 2**20:,.1f} MiB; "
            "free some space or choose another --out"
        )
    return folder
