"""Finding model files: a local folder, the Hugging Face cache, or (when online) a Hub download.

Everything works offline with local folders and the Hugging Face cache. Whatever goes wrong (no network, repo
missing or gated, files missing), the caller gets a :class:`~idfusion.errors.ModelFilesError` whose message lists
the files needed and where to put them; the hub's own exception is chained for ``--debug``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

from .errors import ModelFilesError

__all__ = ["is_offline", "hf_cache_dir", "resolve_model_folder"]

logger = logging.getLogger(__name__)

# The Hub's own rule, simplified: owner and name of letters, digits, "-", "_", "."; no "--" or ".." anywhere.
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_TRUE = {"1", "on", "yes", "true"}


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def is_offline() -> bool:
    """Whether Hub access is switched off (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``, read now or at import).

    huggingface_hub reads the variables once at import; reading them here too honours a later change.
    """
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache folder: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else huggingface_hub's default."""
    from huggingface_hub import constants

    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return Path(os.path.expandvars(os.environ[variable])).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.environ["HF_HOME"])).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def _parse_required(required: Sequence[str]) -> list[list[str]]:
    """``["a|b", "c"]`` -> ``[["a", "b"], ["c"]]``, checked to be relative paths inside the model folder."""
    if isinstance(required, str):
        required = [required]
    parsed = []
    for item in required:
        alternatives = [part.strip().replace("\\", "/") for part in item.split("|")]
        for alternative in alternatives:
            parts = alternative.split("/")
            if not alternative or alternative.startswith("/") or ".." in parts or "" in parts:
                raise ValueError(
                    f"required file {alternative!r} (in {item!r}) must be a relative path inside the folder"
                )
        parsed.append(alternatives)
    return parsed


def _describe(alternatives: list[str]) -> str:
    first, *others = alternatives
    return first if not others else f"{first}  (or {' or '.join(others)})"


def _missing(folder: Path, required: list[list[str]]) -> list[list[str]]:
    return [alts for alts in required if not any((folder / alt).is_file() for alt in alts)]


def _looks_like_path(text: str) -> bool:
    return text.startswith((".", "/", "~", "\\")) or bool(re.match(r"[A-Za-z]:[\\/]", text)) or "\\" in text


def _check_local_folder(folder: Path, required: list[list[str]], what: str, source: str | None = None) -> Path:
    advice = f"\nThe files are published {source}." if source else ""
    if not folder.exists():
        raise ModelFilesError(f"{what} model folder not found: {folder.absolute()}{advice}")
    if not folder.is_dir():
        raise ModelFilesError(f"{what} model path {folder} is a file; expected a folder holding the model files")
    missing = _missing(folder, required)
    if missing:
        lines = "\n".join(f"  {_describe(alts)}" for alts in missing)
        raise ModelFilesError(
            f"{what} model folder {folder} is missing {len(missing)} of the {len(required)} required files "
            f"(paths relative to the folder):\n{lines}{advice}"
        )
    return folder


def _from_cache(repo_id: str, required: list[list[str]], revision: str | None, cache_dir: Path) -> Path | None:
    """The cached snapshot folder of ``repo_id`` holding every required file, or None. Never touches the network."""
    from huggingface_hub import try_to_load_from_cache

    snapshot: Path | None = None
    for alternatives in required:
        for alternative in alternatives:
            try:
                found = try_to_load_from_cache(repo_id, alternative, cache_dir=str(cache_dir), revision=revision)
            except Exception as error:  # a malformed cache must read as "not cached", never crash resolution
                logger.debug("cache lookup of %s/%s failed: %s", repo_id, alternative, error)
                found = None
            if isinstance(found, str):
                # <snapshot>/<alternative> -> <snapshot>
                root = Path(found).parents[len(Path(alternative).parts) - 1]
                if snapshot is not None and root != snapshot:
                    return None  # files from different commits: not one consistent snapshot
                snapshot = root
                break
        else:
            return None
    return snapshot


def _hub_failure(error: BaseException) -> str:
    """A one-line reason for a hub exception, by class name (the classes moved between huggingface_hub releases)."""
    names = {cls.__name__ for cls in type(error).__mro__}
    if "GatedRepoError" in names:
        return "the repository is gated: accept its terms on the model page and log in with `hf auth login`"
    if "RevisionNotFoundError" in names:
        return "that revision does not exist in the repository"
    if "RepositoryNotFoundError" in names:
        return "the repository was not found on the Hub (or it is private and no valid token was given)"
    if names & {"OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectError", "ConnectionError", "TimeoutError"}:
        return "the Hugging Face Hub could not be reached and the files are not in the Hugging Face cache"
    if "HfHubHTTPError" in names:
        return f"the Hub answered with an error ({str(error).splitlines()[0] if str(error) else type(error).__name__})"
    return f"the download failed ({type(error).__name__})"


def _not_available(
    what: str,
    repo_id: str,
    revision: str | None,
    required: list[list[str]],
    reason: str,
    offline: bool,
    source: str | None = None,
) -> ModelFilesError:
    files = "\n".join(f"  {_describe(alts)}" for alts in required)
    if source is not None:  # not a Hugging Face repo: the method's one place to get it
        return ModelFilesError(
            f"{what} model files for {repo_id!r} are not available: {reason}.\n"
            f"Files needed (relative to the model folder):\n{files}\n"
            f"They are published {source}: download them into a folder, keeping these relative paths, and pass "
            "the folder with --model DIR (model=DIR in Python)."
        )
    url = f"https://huggingface.co/{repo_id}" + (f"/tree/{revision}" if revision else "")
    cache = hf_cache_dir()
    download = f"hf download {repo_id} " + " ".join(alts[0] for alts in required)
    if revision:
        download += f" --revision {revision}"
    where = (
        "on a machine with network access, or go online (unset HF_HUB_OFFLINE, no local_files_only) to let "
        "idfusion download them"
        if offline
        else "where the Hub is reachable"
    )
    return ModelFilesError(
        f"{what} model files for {repo_id!r} are not available: {reason}.\n"
        f"Files needed (relative to the model folder):\n{files}\n"
        f"To fix, either:\n"
        f"  - download them from {url} into a folder, keeping these relative paths, and pass the folder with "
        "--model DIR (model=DIR in Python), or\n"
        f"  - put them in the Hugging Face cache ({cache}), e.g. with `{download}` {where}.\n"
        f"(No local folder {repo_id!r} exists either; start a relative folder path with ./ to make that explicit.)"
    )


def resolve_model_folder(
    model: str | os.PathLike,
    *,
    required: Sequence[str],
    what: str,
    allow_patterns: Sequence[str] | None = None,
    local_files_only: bool | None = None,
    revision: str | None = None,
    source: str | None = None,
) -> Path:
    """Find a folder that holds a model's files: a local folder as given, or a Hub repo from cache or download.

    Args:
        model: a local folder, or a Hub repo id ``owner/name``. Strings starting with ``.``, ``/`` or ``~`` (or
            naming an existing path) are always folders.
        required: files that must exist, as paths relative to the folder; ``"a|b"`` means either ``a`` or ``b``.
        what: the model's name for messages, e.g. ``"Arc2Face"``.
        allow_patterns: what to download from a repo (glob patterns); defaults to exactly the required files.
        local_files_only: ``True`` never downloads; ``None``/``False`` download unless ``HF_HUB_OFFLINE`` is set.
        revision: branch, tag or commit of the repo (``None``: ``main``); ignored for local folders.
        source: where the files are published when that is not the Hugging Face Hub (for example "on ModelScope
            (owner/name, revision v1)"): nothing is downloaded, and the message names this one source.

    Returns:
        The folder (for a repo, its snapshot folder in the Hugging Face cache).

    Raises:
        ModelFilesError: a missing folder, missing files, a malformed repo id, or a repo that cannot be found in
            the cache or downloaded; the message lists the files needed and where to put them.
        ValueError: ``required`` holds something other than relative paths (a programming error).
    """
    needed = _parse_required(required)
    text = os.fspath(model)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    folder = Path(text).expanduser()

    if isinstance(model, os.PathLike) or _looks_like_path(text) or folder.exists():
        if revision is not None:
            logger.debug("revision %r ignored for local folder %s", revision, folder)
        return _check_local_folder(folder, needed, what, source)

    repo_id = text.strip()
    if not _REPO_ID.fullmatch(repo_id) or "--" in repo_id or ".." in repo_id:
        raise ModelFilesError(
            f"{what} model {text!r} is neither an existing folder nor a Hugging Face repo id of the form "
            "owner/name (e.g. FoivosPar/Arc2Face)"
        )

    cache_dir = hf_cache_dir()
    cached = _from_cache(repo_id, needed, revision, cache_dir)
    if cached is not None:
        logger.debug("%s: using cached snapshot %s", what, cached)
        return cached

    if source is not None:
        raise _not_available(what, repo_id, revision, needed, "there is no such local folder", False, source)
    offline = bool(local_files_only) or is_offline()
    if offline:
        reason = (
            "local_files_only=True (offline) and they are not in the Hugging Face cache"
            if local_files_only
            else "offline mode is on (HF_HUB_OFFLINE) and they are not in the Hugging Face cache"
        )
        raise _not_available(what, repo_id, revision, needed, reason, offline=True)

    from huggingface_hub import snapshot_download

    patterns = list(allow_patterns) if allow_patterns is not None else [alt for alts in needed for alt in alts]
    logger.info("%s: downloading %s from the Hugging Face Hub into %s", what, repo_id, cache_dir)
    try:
        path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, cache_dir=str(cache_dir)))
    except Exception as error:  # every hub failure becomes one readable message; the original is chained
        raise _not_available(what, repo_id, revision, needed, _hub_failure(error), offline=False) from error
    missing = _missing(path, needed)
    if missing:
        reason = "the repository does not contain " + ", ".join(_describe(alts) for alts in missing)
        raise _not_available(what, repo_id, revision, needed, reason, offline=False)
    return path
