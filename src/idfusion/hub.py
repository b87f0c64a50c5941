"""Finding model files: a local folder, the Hugging Face cache, or (when online) a Hub download.

Everything works offline with local folders and the Hugging Face cache. Whatever goes wrong (no network, repo
missing or gated, files missing), the caller gets a :class:`~idfusion.errors.ModelFilesError` whose message lists
the files needed and where to put them; the hub's own exception is chained for ``--debug``.

Where each method's official files come from is data: the :class:`DownloadSource` entries of its
:class:`~idfusion.registry.MethodSpec` (``downloads``). ``idfusion download`` fetches them (:func:`plan_downloads`,
:func:`fetch`) to where the pipelines look, and the "not available" messages here name that command.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .errors import IdfusionError, ModelFilesError

__all__ = [
    "is_offline",
    "hf_cache_dir",
    "resolve_model_folder",
    "HF_CACHE",
    "FACE_MODELS",
    "DownloadSource",
    "DownloadError",
    "PlannedDownload",
    "plan_downloads",
    "is_present",
    "check_download_clients",
    "fetch",
]

logger = logging.getLogger(__name__)

#: The SD1.5 base every SD1.5-family method defaults to, and the files a whole diffusers SD1.5 folder must have
#: (AdaFace, FACT and FeedFace-SD1.5 load it as a ``StableDiffusionPipeline``).
SD15_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SD15_PIPELINE_FILES = (
    "model_index.json",
    "unet/config.json",
    "text_encoder/config.json",
    "tokenizer/vocab.json",
    "vae/config.json",
    "scheduler/scheduler_config.json",
)

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


_CONNECTION_ERRORS = {
    "OfflineModeIsEnabled",
    "LocalEntryNotFoundError",
    "ConnectError",
    "ConnectionError",
    "TimeoutError",
    "TimeoutException",
}


def _failure_kind(error: BaseException) -> str:
    """``"gated"``, ``"revision"``, ``"repository"``, ``"connection"``, ``"http"`` or ``"other"``, by class name (the
    classes moved between huggingface_hub releases, and httpx/requests name theirs alike)."""
    names = {cls.__name__ for cls in type(error).__mro__}
    for kind, classes in (
        ("gated", {"GatedRepoError"}),
        ("revision", {"RevisionNotFoundError"}),
        ("repository", {"RepositoryNotFoundError"}),
        ("connection", _CONNECTION_ERRORS),
        ("http", {"HfHubHTTPError"}),
    ):
        if names & classes:
            return kind
    return "other"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _hub_failure(error: BaseException) -> str:
    """A one-line reason for a hub exception."""
    kind = _failure_kind(error)
    if kind == "gated":
        return "the repository is gated: accept its terms on the model page and log in with `hf auth login`"
    if kind == "revision":
        return "that revision does not exist in the repository"
    if kind == "repository":
        return "the repository was not found on the Hub (or it is private and no valid token was given)"
    if kind == "connection":
        return "the Hugging Face Hub could not be reached and the files are not in the Hugging Face cache"
    if kind == "http":
        return f"the Hub answered with an error ({_first_line(error)})"
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
        hint = _download_hint(repo_id, revision, required, "modelscope")
        return ModelFilesError(
            f"{what} model files for {repo_id!r} are not available: {reason}.\n"
            f"Files needed (relative to the model folder):\n{files}\n"
            f"They are published {source}: download them into a folder, keeping these relative paths, and pass "
            "the folder with --model DIR (model=DIR in Python)."
            + (
                f"\nOr run {hint}, which puts them in a folder for --model (it needs `pip install modelscope`)."
                if hint
                else ""
            )
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
    hint = _download_hint(repo_id, revision, required, "huggingface")
    return ModelFilesError(
        f"{what} model files for {repo_id!r} are not available: {reason}.\n"
        f"Files needed (relative to the model folder):\n{files}\n"
        f"To fix, either:\n"
        f"  - download them from {url} into a folder, keeping these relative paths, and pass the folder with "
        "--model DIR (model=DIR in Python), or\n"
        f"  - put them in the Hugging Face cache ({cache}), e.g. with `{download}` {where}"
        + (
            f", or\n  - fetch every file the method needs with {hint}{' once online' if offline else ''}.\n"
            if hint
            else ".\n"
        )
        + f"(No local folder {repo_id!r} exists either; start a relative folder path with ./ to make that explicit.)"
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


# ---- each method's official files: `idfusion download` -------------------------------------------------------------

#: :attr:`DownloadSource.default`: the Hugging Face cache, where the pipelines look for a Hub id.
HF_CACHE = "<hf-cache>"
#: :attr:`DownloadSource.default`: the first folder the ONNX face backend searches (``$IDFUSION_FACE_MODELS``, else
#: ``~/.cache/idfusion/models/antelopev2``).
FACE_MODELS = "<face-models>"
_HUB_NAMES = {"huggingface": "Hugging Face", "modelscope": "ModelScope"}


class DownloadError(IdfusionError):
    """A download that cannot start or did not complete; the one-line message names the repo and what to do."""


@dataclass(frozen=True)
class DownloadSource:
    """One part of a method's official files: where it is published and where idfusion looks for it.

    Attributes:
        repo_id: ``owner/name`` on ``hub``.
        what: the part's name in messages, e.g. ``"Arc2Face"`` or ``"SD1.5 base (VAE, tokenizer, scheduler)"``.
        allow_patterns: glob patterns of the files to fetch, as the pipeline's own resolution asks for them;
            empty: exactly the ``required`` files (as :func:`resolve_model_folder` does).
        required: files that must be there afterwards, relative to the destination; ``"a|b"`` means either.
        revision: branch, tag or commit (``None``: the repo's default branch).
        hub: ``"huggingface"`` or ``"modelscope"``.
        folder: the part's place inside a model folder (``--out DIR``, later ``--model DIR``), where the pipeline
            looks for it there; ``""``: the folder itself.
        default: where it goes without ``--out``: :data:`HF_CACHE`, :data:`FACE_MODELS`, or a folder relative to
            the current one (the folder convention the README documents for that method).
        flatten: a folder of the repo whose files land directly in the destination (``""``: the repo's top level),
            fetched through the Hugging Face cache and hard-linked (or copied) there; ``None``: the repo's layout.
    """

    repo_id: str
    what: str
    allow_patterns: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    revision: str | None = None
    hub: Literal["huggingface", "modelscope"] = "huggingface"
    folder: str = ""
    default: str = HF_CACHE
    flatten: str | None = None

    def __post_init__(self) -> None:
        if self.hub not in _HUB_NAMES:
            raise ValueError(f"{self.repo_id}: hub must be one of {', '.join(_HUB_NAMES)}, not {self.hub!r}")
        if not self.allow_patterns and not self.required:
            raise ValueError(f"{self.repo_id}: give allow_patterns or required files")
        _parse_required(self.required)  # relative paths only
        into_folder = self.default not in (HF_CACHE, FACE_MODELS)
        if self.hub == "modelscope" and (not into_folder or self.flatten is not None):
            raise ValueError(f"{self.repo_id}: ModelScope files go into a folder (default), unflattened")
        if self.flatten is not None and self.default == HF_CACHE:
            raise ValueError(f"{self.repo_id}: flattened files need a folder, not the Hugging Face cache")

    @property
    def patterns(self) -> tuple[str, ...]:
        """The patterns fetched: ``allow_patterns``, else every alternative of ``required``."""
        return self.allow_patterns or tuple(alt for alts in _parse_required(self.required) for alt in alts)

    @property
    def url(self) -> str:
        if self.hub == "modelscope":
            return f"https://modelscope.cn/models/{self.repo_id}"
        return f"https://huggingface.co/{self.repo_id}" + (f"/tree/{self.revision}" if self.revision else "")

    @property
    def published(self) -> str:
        """Where the files are published, as the ``source`` text of :func:`resolve_model_folder` messages."""
        if self.hub == "huggingface":
            return f"on the Hugging Face Hub ({self.url})"
        revision = f", revision {self.revision}" if self.revision else ""
        option = f" --revision {self.revision}" if self.revision else ""
        command = f"modelscope download --model {self.repo_id}{option} --local_dir DIR"
        return f"on ModelScope ({self.repo_id}{revision}; e.g. `{command}`)"

    def label(self) -> str:
        """``owner/name``, its hub and revision: ``yucheng1996/FaceChain-FACT (ModelScope, revision v1.0.0)``."""
        return f"{self.repo_id} ({_HUB_NAMES[self.hub]}" + (f", revision {self.revision})" if self.revision else ")")


@dataclass(frozen=True)
class PlannedDownload:
    """A :class:`DownloadSource` with its destination: the Hugging Face cache (``cached``) or a folder."""

    source: DownloadSource
    destination: Path
    cached: bool

    @property
    def key(self) -> tuple:
        """Equal for plans that fetch the same files to the same place."""
        source = self.source
        return (source.hub, source.repo_id, source.revision, source.patterns, source.flatten, self.destination)

    def describe(self) -> str:
        """One line: what, from where, which files, to where."""
        where = f"the Hugging Face cache {self.destination}" if self.cached else str(self.destination)
        return f"{self.source.what}: {self.source.label()} [{', '.join(self.source.patterns)}] -> {where}"


def plan_downloads(sources: Sequence[DownloadSource], out: str | os.PathLike | None = None) -> list[PlannedDownload]:
    """Where each source goes: into ``out`` (at its :attr:`~DownloadSource.folder`) when given, else its default.

    Sources that would fetch the same files to the same place are planned once. Touches neither disk nor network.
    """
    planned: dict[tuple, PlannedDownload] = {}
    for source in sources:
        cached = out is None and source.default == HF_CACHE
        if out is not None:
            destination = Path(out).expanduser() / source.folder
        elif cached:
            destination = hf_cache_dir()
        elif source.default == FACE_MODELS:
            from .faces.onnx_backend import default_onnx_model_dirs

            destination = default_onnx_model_dirs()[0]
        else:
            destination = Path(source.default).expanduser()
        plan = PlannedDownload(source, destination.absolute(), cached)
        planned.setdefault(plan.key, plan)
    return list(planned.values())


def is_present(planned: PlannedDownload) -> bool:
    """Whether every required file of ``planned`` is on this machine, in the Hugging Face cache or its folder;
    False when the source names no required files (nothing to check it against). Never touches the network."""
    required = _parse_required(planned.source.required) if planned.source.required else []
    if not required:
        return False
    if planned.cached:
        return _from_cache(planned.source.repo_id, required, planned.source.revision, hf_cache_dir()) is not None
    return planned.destination.is_dir() and not _missing(planned.destination, required)


def _modelscope_missing(plan: PlannedDownload) -> DownloadError:
    source = plan.source
    return DownloadError(
        f"{source.what}: {source.label()} needs the modelscope client, which is not installed: run "
        f"`pip install modelscope` and try again, or download {', '.join(source.patterns)} from {source.url} "
        f"into {plan.destination}"
    )


def check_download_clients(plans: Sequence[PlannedDownload]) -> None:
    """Raise :class:`DownloadError` before anything is fetched when a plan needs a client that is not installed."""
    import importlib.util

    for plan in plans:
        if plan.source.hub != "modelscope":
            continue
        try:
            found = importlib.util.find_spec("modelscope") is not None
        except ValueError:  # a module object without a spec is in sys.modules: it imports
            found = True
        if not found:
            raise _modelscope_missing(plan)


def fetch(plan: PlannedDownload) -> Path:
    """Download one planned source (huggingface_hub's or modelscope's own progress bars show) and return the folder
    that holds its files: the snapshot folder for the Hugging Face cache, else the destination.

    Raises:
        DownloadError: the hub could not be reached, the repo or revision does not exist or is gated, the disk
            refused the files, or the download lacks a required file. One line; the original error is chained.
    """
    source = plan.source
    try:
        folder = _fetch_modelscope(plan) if source.hub == "modelscope" else _fetch_huggingface(plan)
    except DownloadError:
        raise
    except ImportError as error:
        if source.hub == "modelscope":
            raise _modelscope_missing(plan) from error
        raise
    except Exception as error:  # every hub, network and disk failure becomes one line; the original is chained
        raise DownloadError(_download_failure(plan, error)) from error
    missing = _missing(folder, _parse_required(source.required))
    if missing:
        raise DownloadError(
            f"{source.what}: the download of {source.label()} into {folder} lacks "
            f"{', '.join(_describe(alts) for alts in missing)}; the release may have changed its layout, see "
            f"{source.url}"
        )
    return folder


def _fetch_huggingface(plan: PlannedDownload) -> Path:
    from huggingface_hub import snapshot_download

    source = plan.source
    options = {"revision": source.revision, "allow_patterns": list(source.patterns)}
    if plan.cached or source.flatten is not None:
        snapshot = Path(snapshot_download(source.repo_id, cache_dir=str(hf_cache_dir()), **options))
        if source.flatten is None:
            return snapshot
        return _place_flat(snapshot, source, plan.destination)
    plan.destination.mkdir(parents=True, exist_ok=True)
    return Path(snapshot_download(source.repo_id, local_dir=str(plan.destination), **options))


def _place_flat(snapshot: Path, source: DownloadSource, destination: Path) -> Path:
    """Link (or copy) the snapshot's files under ``source.flatten`` that match its patterns into ``destination``."""
    from huggingface_hub.utils import filter_repo_objects

    prefix = f"{source.flatten}/" if source.flatten else ""
    names = sorted(path.relative_to(snapshot).as_posix() for path in snapshot.rglob("*") if path.is_file())
    chosen = [
        name for name in filter_repo_objects(names, allow_patterns=list(source.patterns)) if name.startswith(prefix)
    ]
    for name in chosen:
        _link_or_copy((snapshot / name).resolve(), destination / name[len(prefix) :])
    return destination


def _link_or_copy(file: Path, target: Path) -> None:
    if target.is_file() and (os.path.samefile(file, target) or target.stat().st_size == file.stat().st_size):
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(handle)
    temporary = Path(name)
    try:
        temporary.unlink()
        try:
            os.link(file, temporary)  # a hard link to the cached blob: the bytes are stored once
        except OSError:  # another filesystem, or no hard links there
            shutil.copyfile(file, temporary)
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def _fetch_modelscope(plan: PlannedDownload) -> Path:
    import inspect

    from modelscope import snapshot_download

    parameters = inspect.signature(snapshot_download).parameters
    if "local_dir" not in parameters:
        raise DownloadError(
            f"{plan.source.what}: the installed modelscope client cannot download into a folder (no local_dir); "
            "run `pip install -U modelscope` and try again"
        )
    # allow_patterns since modelscope 1.19 or so; allow_file_pattern before (still accepted)
    key = "allow_patterns" if "allow_patterns" in parameters else "allow_file_pattern"
    plan.destination.mkdir(parents=True, exist_ok=True)
    options = {"revision": plan.source.revision, "local_dir": str(plan.destination), key: list(plan.source.patterns)}
    snapshot_download(plan.source.repo_id, **options)
    return plan.destination


def _download_failure(plan: PlannedDownload, error: BaseException) -> str:
    """One line: which repo could not be downloaded, why, and what to do."""
    source = plan.source
    head = f"could not download {source.what} from {source.label()}"
    kind = _failure_kind(error)
    if kind == "connection":
        settings = "HF_ENDPOINT or proxy settings" if source.hub == "huggingface" else "proxy settings"
        return (
            f"{head}: {_HUB_NAMES[source.hub]} could not be reached: check the network connection (and {settings}), "
            "then run it again; files already downloaded are kept"
        )
    if kind == "gated":
        return f"{head}: the repository is gated: accept its terms on {source.url} and log in with `hf auth login`"
    if kind == "repository":
        return (
            f"{head}: the repository was not found (or it is private and no valid token was given): check "
            f"{source.url}, and log in with `hf auth login` if you have access"
        )
    if kind == "revision":
        return f"{head}: revision {source.revision!r} does not exist in the repository; see {source.url}"
    if kind == "http":
        return f"{head}: the Hub answered with an error ({_first_line(error)}); try again later"
    if isinstance(error, OSError) and error.errno is not None:  # the disk, not the hub
        return f"{head}: cannot write {error.filename or plan.destination}: {error.strerror or _first_line(error)}"
    if source.hub == "modelscope":  # its client raises its own classes (and plain ones) for everything else
        return (
            f"{head}: {type(error).__name__}: {_first_line(error)}; check the network connection and {source.url}, "
            f"or download the files by hand into {plan.destination}"
        )
    return f"{head}: {type(error).__name__}: {_first_line(error)}"


def _download_hint(repo_id: str, revision: str | None, required: list[list[str]], hub: str) -> str | None:
    """```idfusion download --method M``` when registered methods' downloads fetch these files, else ``None``."""
    from fnmatch import fnmatch

    from .registry import methods

    names = []
    for spec in methods():
        for source in spec.downloads:
            fetched = all(any(fnmatch(alt, p) for alt in alts for p in source.patterns) for alts in required)
            if source.hub == hub and source.repo_id == repo_id and revision in (None, source.revision) and fetched:
                names.append(spec.name)
                break
    if not names:
        return None
    return f"`idfusion download --method {names[0]}`" + (f" (or {', '.join(names[1:])})" if names[1:] else "")
