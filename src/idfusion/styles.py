"""Portrait styles: a prompt template with a slot for the subject, and optionally a style LoRA with its weight.

FaceChain-FACT's "infinite style" portraits (spec ``facechain-fact.md`` §2.6, §5.1, §6) pair a prompt with an
off-the-shelf SD1.5 style LoRA in the kohya format. idfusion keeps styles in TOML files of its own format::

    [[style]]
    name = "winter-coat"                 # required; lower-case slug used on the command line
    title = "Winter coat"                # optional label
    prompt = "{subject}, wearing a long wool coat, ..."   # required; {subject} exactly once, no other braces
    negative_prompt = "lowres, ..."      # optional
    lora = "loras/coat.safetensors"      # optional: a local file or folder (relative to this TOML file), or a
                                         # repo id owner/name (Hugging Face, or ModelScope with lora_hub)
    lora_file = "coat.safetensors"       # file inside the repo or folder (default pytorch_lora_weights.safetensors)
    lora_hub = "huggingface"             # "huggingface" (default) or "modelscope" (looked up in its cache only)
    lora_revision = "v1.0.0"             # optional repo revision
    weight = 0.45                        # LoRA weight in [0, 2]; defaults to 1.0 when lora is given
    base_model = "majicmix"              # optional hint: the base model the style was made for
    description = "..."                  # optional

The catalogue (:func:`style_catalogue`) is the built-in examples (``idfusion/data/styles.toml``), then every
``*.toml`` named by ``$IDFUSION_STYLES`` (``os.pathsep``-separated files or folders), then files passed in code;
a later definition of a name replaces an earlier one. :func:`load_style_lora` puts a style's LoRA into a diffusers
pipeline through diffusers/peft; ``pipe.unload_lora_weights()`` (or :func:`unload_style_lora`) restores the base
weights bit for bit.

FaceChain's own style files (``styles/<base model>/<Style>.json`` in the official repository) load as they are
(:func:`load_facechain_style`, or a ``.json`` path wherever a style is named), with the release's rules: the prompt
is ``pos_prompt_with_style`` around the style text for a style with a LoRA and ``pos_prompt_with_cloth`` for one
without (:func:`facechain_prompt`), a style without a LoRA brings the release's default style LoRA
(:data:`FACECHAIN_DEFAULT_LORA`) at its ``multiplier_style``, and the folder names the base model.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import IdfusionError, ModelFilesError

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

__all__ = [
    "DEFAULT_LORA_FILE",
    "FACECHAIN_BASE_MODELS",
    "FACECHAIN_DEFAULT_LORA",
    "FACECHAIN_PROMPT_WITH_CLOTH",
    "FACECHAIN_PROMPT_WITH_STYLE",
    "facechain_default_lora_path",
    "facechain_prompt",
    "load_facechain_style",
    "load_facechain_styles",
    "DEFAULT_SUBJECT",
    "STYLES_ENV",
    "Style",
    "StyleError",
    "builtin_styles",
    "builtin_styles_file",
    "load_style_file",
    "apply_style",
    "StyledPrompt",
    "load_style_lora",
    "resolve_style",
    "style_catalogue",
    "style_search_paths",
    "unload_style_lora",
]

logger = logging.getLogger(__name__)

#: Environment variable naming extra style files or folders, separated by ``os.pathsep``.
STYLES_ENV = "IDFUSION_STYLES"
#: What ``{subject}`` becomes when no subject is given.
DEFAULT_SUBJECT = "a person"
#: The LoRA file looked for in a repo or folder when ``lora_file`` is not given (diffusers' default name).
DEFAULT_LORA_FILE = "pytorch_lora_weights.safetensors"
MAX_WEIGHT = 2.0
SUBJECT_SLOT = "{subject}"
LORA_HUBS = ("huggingface", "modelscope")

#: FaceChain's prompt templates (``facechain/constants.py``), ``{}`` being the style text: for a style with its own
#: LoRA, and for a style without one ("cloth" styles). The release prefixes its subject ("a handsome man, ").
FACECHAIN_PROMPT_WITH_STYLE = (
    "{}, upper_body, raw photo, masterpiece, solo, medium shot, high detail face, photorealistic, best quality"
)
FACECHAIN_PROMPT_WITH_CLOTH = (
    "raw photo, masterpiece, chinese, {}, solo, medium shot, high detail face, looking straight into the camera "
    "with shoulders parallel to the frame, photorealistic, best quality"
)
#: FaceChain's style folders and the base model (FACT adapter name) each stands for (``app.py`` styles loader).
FACECHAIN_BASE_MODELS = {"leosamsMoonfilm_filmGrain20": "film", "MajicmixRealistic_v6": "majicmix"}
#: The style LoRA FaceChain-FACT merges when a style has none (``inference_fact.py`` L456-460), on ModelScope:
#: ``(repo, revision, file)``.
FACECHAIN_DEFAULT_LORA = (
    "Cherrytest/zjz_mj_jiyi_small_addtxt_fromleo",
    "v1.0.0",
    "zjz_mj_jiyi_small_addtxt_fromleo.safetensors",
)

_NAME = re.compile(r"[a-z0-9]+(?:[-_][a-z0-9]+)*")
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_STRING_KEYS = (
    "name",
    "title",
    "prompt",
    "negative_prompt",
    "lora",
    "lora_file",
    "lora_hub",
    "lora_revision",
    "base_model",
    "description",
)
_KEYS = frozenset(_STRING_KEYS) | {"weight"}


class StyleError(IdfusionError, ValueError):
    """A style file or style name could not be used; the message names the file, the style and the key."""


def _where(source: Path | None, name: str | None) -> str:
    parts = [str(source)] if source is not None else []
    if name:
        parts.append(f"style {name!r}")
    return ": ".join(parts) if parts else "style"


def _is_local(lora: str, base: Path | None) -> bool:
    """Whether ``lora`` names a local file/folder rather than a repo id ``owner/name``."""
    if lora.endswith(".safetensors") or lora.startswith((".", "/", "~", "\\")) or "\\" in lora:
        return True
    if re.match(r"[A-Za-z]:[\\/]", lora) or not _REPO_ID.fullmatch(lora) or "--" in lora or ".." in lora:
        return True
    return ((base or Path.cwd()) / lora).exists()


@dataclass(frozen=True)
class Style:
    """One portrait style. Values are checked on construction (:class:`StyleError` naming the style and key).

    Attributes:
        name: slug used on the command line (lower-case letters, digits, ``-`` and ``_``).
        prompt: the positive prompt; contains ``{subject}`` exactly once and no other braces.
        title: a human-readable label (defaults to :attr:`name` in :attr:`label`).
        negative_prompt: the negative prompt, used as written.
        lora: a local ``.safetensors`` file or folder, or a repo id ``owner/name``; ``None`` for a prompt-only style.
        lora_file: the file inside a repo or folder.
        lora_hub: where a repo id lives: ``"huggingface"`` (cache or download) or ``"modelscope"`` (its cache only).
        lora_revision: the repo revision (branch, tag or commit).
        weight: the LoRA weight in [0, 2]; ``None`` without a LoRA, 1.0 by default with one.
        base_model: a hint naming the base model the style was made for (e.g. ``"majicmix"``).
        description: free text.
        source: the TOML file the style came from (relative LoRA paths resolve against its folder).
        builtin: whether it is one of idfusion's built-in examples.
    """

    name: str
    prompt: str
    title: str | None = None
    negative_prompt: str | None = None
    lora: str | None = None
    lora_file: str | None = None
    lora_hub: str = "huggingface"
    lora_revision: str | None = None
    weight: float | None = None
    base_model: str | None = None
    description: str | None = None
    source: Path | None = dataclasses.field(default=None, compare=False)
    builtin: bool = dataclasses.field(default=False, compare=False)

    def __post_init__(self) -> None:
        where = _where(self.source, self.name if isinstance(self.name, str) else None)
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise StyleError(
                f"{where}: key 'name' must be a lower-case slug of letters, digits, '-' and '_' "
                f"(e.g. 'winter-coat'), got {self.name!r}"
            )
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise StyleError(f"{where}: key 'prompt' must be a non-empty string")
        count = self.prompt.count(SUBJECT_SLOT)
        if count != 1:
            raise StyleError(
                f"{where}: key 'prompt' must contain the subject slot {SUBJECT_SLOT} exactly once, found it {count} "
                f"times in {self.prompt!r}"
            )
        rest = self.prompt.replace(SUBJECT_SLOT, "")
        if "{" in rest or "}" in rest:
            raise StyleError(
                f"{where}: key 'prompt' may contain no braces other than the subject slot {SUBJECT_SLOT}: "
                f"{self.prompt!r}"
            )
        if self.lora_hub not in LORA_HUBS:
            raise StyleError(f"{where}: key 'lora_hub' must be one of {', '.join(LORA_HUBS)}, got {self.lora_hub!r}")
        if self.lora is None:
            for key in ("lora_file", "lora_revision", "weight"):
                if getattr(self, key) is not None:
                    raise StyleError(f"{where}: key {key!r} needs a 'lora' to apply to")
            return
        if not isinstance(self.lora, str) or not self.lora.strip():
            raise StyleError(f"{where}: key 'lora' must be a non-empty string, got {self.lora!r}")
        if self.lora_file is not None:
            if not isinstance(self.lora_file, str):
                raise StyleError(f"{where}: key 'lora_file' must be a string, got {self.lora_file!r}")
            parts = self.lora_file.replace("\\", "/").split("/")
            if not self.lora_file or self.lora_file.startswith("/") or ".." in parts or "" in parts:
                raise StyleError(
                    f"{where}: key 'lora_file' must be a relative path inside the repo or folder, "
                    f"got {self.lora_file!r}"
                )
        weight = 1.0 if self.weight is None else self.weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise StyleError(f"{where}: key 'weight' must be a number, got {weight!r}")
        if not math.isfinite(weight) or not 0.0 <= weight <= MAX_WEIGHT:
            raise StyleError(f"{where}: key 'weight' must be a finite number in [0, {MAX_WEIGHT:g}], got {weight!r}")
        object.__setattr__(self, "weight", float(weight))

    @property
    def label(self) -> str:
        """:attr:`title`, or :attr:`name` when the style has no title."""
        return self.title or self.name

    @property
    def lora_kind(self) -> str | None:
        """``"local"``, ``"huggingface"``, ``"modelscope"``, or ``None`` for a prompt-only style."""
        if self.lora is None:
            return None
        base = self.source.parent if self.source is not None else None
        return "local" if _is_local(self.lora, base) else self.lora_hub

    def describe_lora(self) -> str:
        """A one-line description of the LoRA source (``"-"`` for none), e.g. ``modelscope:owner/name/file``."""
        kind = self.lora_kind
        if kind is None:
            return "-"
        if kind == "local":
            return str(self._local_lora_path()) + (f" ({self.lora_file})" if self.lora_file else "")
        revision = f"@{self.lora_revision}" if self.lora_revision else ""
        return f"{kind}:{self.lora}{revision}/{self.lora_file or DEFAULT_LORA_FILE}"

    def format_prompt(self, subject: str | None = None) -> str:
        """The prompt with ``{subject}`` filled in.

        Args:
            subject: who is portrayed, e.g. ``"a mature man, 35-year-old"``. Surrounding spaces and trailing commas
                are dropped (FACT's attribute prefixes end in ``", "``); ``None`` or blank gives
                :data:`DEFAULT_SUBJECT`. Braces in the subject are kept as written.

        Returns:
            `str`: the positive prompt.
        """
        text = (subject or "").strip().rstrip(",").strip()
        return self.prompt.replace(SUBJECT_SLOT, text or DEFAULT_SUBJECT)

    def _local_lora_path(self) -> Path:
        path = Path(os.path.expandvars(self.lora)).expanduser()
        if not path.is_absolute() and self.source is not None:
            path = self.source.parent / path
        return path

    def lora_path(self, local_files_only: bool | None = None) -> Path | None:
        """The style's LoRA ``.safetensors`` file, found locally, in a hub cache or (Hugging Face, online) downloaded.

        Args:
            local_files_only: ``True`` never downloads; ``None``/``False`` download from the Hugging Face Hub
                unless ``HF_HUB_OFFLINE`` is set. ModelScope repos are only looked up in the ModelScope cache.

        Returns:
            `Path | None`: the file, or ``None`` for a prompt-only style.

        Raises:
            ModelFilesError: the file is missing; the message names the file and where to get it.
        """
        kind = self.lora_kind
        where = _where(self.source, self.name)
        if kind is None:
            return None
        if kind == "local":
            path = self._local_lora_path()
            if path.is_dir():
                return self._file_in_folder(path, where)
            if not path.is_file():
                raise ModelFilesError(f"{where}: LoRA file not found: {path}")
            if self.lora_file is not None:
                logger.debug("%s: lora_file %r ignored, lora names a file", where, self.lora_file)
            return path
        filename = self.lora_file or DEFAULT_LORA_FILE
        if kind == "modelscope":
            return _modelscope_file(self.lora, filename, self.lora_revision, where)
        from .hub import resolve_model_folder

        folder = resolve_model_folder(
            self.lora,
            required=[filename],
            what=f"{where} LoRA",
            local_files_only=local_files_only,
            revision=self.lora_revision,
        )
        return folder / filename

    def _file_in_folder(self, folder: Path, where: str) -> Path:
        if self.lora_file is not None:
            path = folder / self.lora_file
            if not path.is_file():
                raise ModelFilesError(f"{where}: LoRA file {self.lora_file!r} not found in {folder}")
            return path
        candidates = sorted(folder.glob("*.safetensors"))
        if (folder / DEFAULT_LORA_FILE).is_file():
            return folder / DEFAULT_LORA_FILE
        if len(candidates) == 1:
            return candidates[0]
        found = ", ".join(p.name for p in candidates) or "none"
        raise ModelFilesError(
            f"{where}: cannot tell which LoRA file in {folder} to use (found: {found}); set 'lora_file'"
        )

    def to_dict(self) -> dict[str, Any]:
        """The style as plain JSON-ready values (``source`` as a string, plus ``lora_kind``)."""
        data = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        data["source"] = str(self.source) if self.source is not None else None
        data["lora_kind"] = self.lora_kind
        return data


def _modelscope_roots() -> list[Path]:
    root = os.environ.get("MODELSCOPE_CACHE")
    return [Path(root).expanduser()] if root else [Path.home() / ".cache" / "modelscope" / "hub"]


def _modelscope_file(repo_id: str, filename: str, revision: str | None, where: str) -> Path:
    """A file of a ModelScope repo from the local ModelScope cache (never downloaded: no ModelScope dependency)."""
    owner, name = repo_id.split("/")
    checked = []
    for root in _modelscope_roots():
        # modelscope >= 1.20 caches under models/<owner>/<name with "." as "___">; older versions under <owner>/<name>
        for folder in dict.fromkeys(
            (
                root / "models" / owner / name.replace(".", "___"),
                root / owner / name.replace(".", "___"),
                root / owner / name,
            )
        ):
            checked.append(folder)
            if (folder / filename).is_file():
                return folder / filename
    revision_arg = f" --revision {revision}" if revision else ""
    url = f"https://modelscope.cn/models/{repo_id}"
    raise ModelFilesError(
        f"{where}: LoRA file {filename!r} of ModelScope repo {repo_id!r} is not in the ModelScope cache "
        f"(looked in {', '.join(str(c) for c in checked)}). idfusion does not download from ModelScope. To fix, "
        f"either download it from {url} (e.g. `modelscope download --model {repo_id} {filename}{revision_arg}`), "
        f"or copy the style into a file of your own (see ${STYLES_ENV}) with 'lora' set to the local "
        ".safetensors file."
    )


# --------------------------------------------------------------------------------------------------------------------
# Files and the catalogue


def _parse_toml(text: str, path: Path) -> dict[str, Any]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise StyleError(f"{path}: reading style files needs Python 3.11+ or the 'tomli' package") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise StyleError(f"{path}: not a valid TOML file: {error}") from None


def _style_from_table(table: Any, index: int, path: Path, builtin: bool) -> Style:
    if not isinstance(table, Mapping):
        raise StyleError(f"{path}: [[style]] entry {index + 1} must be a table")
    name = table.get("name")
    where = _where(path, name if isinstance(name, str) else None) + ("" if name else f" (entry {index + 1})")
    unknown = sorted(set(table) - _KEYS)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(_KEYS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise StyleError(
            f"{where}: unknown key {unknown[0]!r}{hint}; known keys: {', '.join(sorted(_KEYS))}"
            + (f" (also unknown: {', '.join(map(repr, unknown[1:]))})" if len(unknown) > 1 else "")
        )
    for key in ("name", "prompt"):
        if key not in table:
            raise StyleError(f"{where}: missing required key {key!r}")
    for key in _STRING_KEYS:
        if key in table and not isinstance(table[key], str):
            raise StyleError(f"{where}: key {key!r} must be a string, got {type(table[key]).__name__}")
    fields = dict(table)
    return Style(**fields, source=path, builtin=builtin)


def load_style_file(path: str | os.PathLike[str], *, builtin: bool = False) -> list[Style]:
    """Read the ``[[style]]`` tables of one TOML file.

    Args:
        path: the ``.toml`` file.
        builtin: mark the styles as built-in (for the package's own file).

    Returns:
        `list[Style]`: the styles, in file order.

    Raises:
        StyleError: the file is missing or not TOML, has keys other than ``style``, holds no styles, repeats a
            name, or a style is invalid (the message names the file, the style and the key).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StyleError(f"{path}: style file not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise StyleError(f"{path}: cannot read style file: {error}") from None
    return _styles_from_text(text, path, builtin)


def _styles_from_text(text: str, path: Path, builtin: bool) -> list[Style]:
    document = _parse_toml(text, path)
    extra = sorted(set(document) - {"style"})
    if extra:
        raise StyleError(
            f"{path}: unknown top-level key {extra[0]!r}; a style file holds only [[style]] tables"
            + (" (write [[style]], not [[styles]])" if extra[0] == "styles" else "")
        )
    tables = document.get("style")
    if not isinstance(tables, list) or not tables:
        raise StyleError(f"{path}: no styles; add one or more [[style]] tables")
    styles: list[Style] = []
    seen: set[str] = set()
    for index, table in enumerate(tables):
        style = _style_from_table(table, index, path, builtin)
        if style.name in seen:
            raise StyleError(f"{path}: style {style.name!r} is defined twice in this file")
        seen.add(style.name)
        styles.append(style)
    return styles


def builtin_styles_file() -> Path:
    """The package's ``data/styles.toml`` (the built-in example styles)."""
    from importlib.resources import files

    return Path(str(files("idfusion") / "data" / "styles.toml"))


def builtin_styles() -> list[Style]:
    """idfusion's built-in example styles (``idfusion/data/styles.toml``)."""
    from importlib.resources import files

    resource = files("idfusion") / "data" / "styles.toml"
    return _styles_from_text(resource.read_text(encoding="utf-8"), Path(str(resource)), builtin=True)


def _toml_files(entry: Path, origin: str) -> list[Path]:
    if entry.is_dir():
        return sorted(p for p in entry.glob("*.toml") if p.is_file())
    if entry.is_file():
        if entry.suffix.lower() != ".toml":
            raise StyleError(f"{entry} ({origin}): a style file must end in .toml")
        return [entry]
    raise StyleError(f"{entry} ({origin}): no such style file or folder")


def style_search_paths(extra_paths: Iterable[str | os.PathLike[str]] = ()) -> list[Path]:
    """The user style files, in catalogue order: ``$IDFUSION_STYLES`` entries, then ``extra_paths``.

    Each entry is a ``.toml`` file or a folder (its ``*.toml`` files, sorted by name, not recursive).

    Raises:
        StyleError: an entry does not exist, or is a file not ending in ``.toml``.
    """
    files: list[Path] = []
    for part in os.environ.get(STYLES_ENV, "").split(os.pathsep):
        if part.strip():
            files += _toml_files(Path(part.strip()).expanduser(), f"from ${STYLES_ENV}")
    for entry in extra_paths:
        files += _toml_files(Path(entry).expanduser(), "extra style path")
    return files


def style_catalogue(extra_paths: Iterable[str | os.PathLike[str]] = ()) -> dict[str, Style]:
    """Every known style by name: built-ins, then ``$IDFUSION_STYLES`` files, then ``extra_paths``.

    A name defined again later replaces the earlier style (logged at INFO); within one file names must be unique.

    Args:
        extra_paths: more ``.toml`` files or folders of them.

    Returns:
        `dict[str, Style]`: styles by name, built-ins first, in definition order.

    Raises:
        StyleError: a file or folder is missing or a file is invalid.
    """
    catalogue = {style.name: style for style in builtin_styles()}
    for path in style_search_paths(extra_paths):
        for style in load_style_file(path):
            previous = catalogue.get(style.name)
            if previous is not None:
                origin = "the built-in one" if previous.builtin else f"the one from {previous.source}"
                logger.info("style %r from %s replaces %s", style.name, path, origin)
            catalogue[style.name] = style
    return catalogue


def _split_file_name(text: str) -> tuple[str, str | None] | None:
    """``"x.toml"`` -> ("x.toml", None); ``"x.toml:name"`` -> ("x.toml", "name"); otherwise None."""
    if text.lower().endswith(".toml"):
        return text, None
    head, sep, tail = text.rpartition(":")
    if sep and head.lower().endswith(".toml") and tail:
        return head, tail
    return None


def _unknown(name: str, names: Iterable[str], where: str) -> StyleError:
    names = sorted(names)
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    return StyleError(f"unknown style {name!r} {where}.{hint} Available: {', '.join(names) or 'none'}")


def resolve_style(
    name_or_file: str | os.PathLike[str], *, extra_paths: Iterable[str | os.PathLike[str]] = ()
) -> Style:
    """A style by catalogue name, or from a style file.

    Args:
        name_or_file: a catalogue name (``"cheongsam"``), a ``.toml`` file holding exactly one style,
            ``FILE.toml:NAME`` to pick one style of a file, or a FaceChain style ``.json`` file
            (:func:`load_facechain_style`).
        extra_paths: more style files or folders for the catalogue (see :func:`style_catalogue`).

    Returns:
        `Style`: the style.

    Raises:
        StyleError: an unknown name (the message lists close matches and the available names), a missing or
            invalid file, or a file with several styles and no ``:NAME``.
    """
    text = os.fspath(name_or_file)
    if isinstance(text, str) and text.lower().endswith(".json"):
        return load_facechain_style(Path(text).expanduser())
    split = _split_file_name(text) if isinstance(text, str) else None
    if split is None and isinstance(name_or_file, os.PathLike):
        split = (text, None)
    if split is not None:
        file, name = split
        styles = load_style_file(Path(file).expanduser())
        if name is None:
            if len(styles) == 1:
                return styles[0]
            names = ", ".join(s.name for s in styles)
            raise StyleError(f"{file}: holds {len(styles)} styles ({names}); pick one with {file}:NAME")
        for style in styles:
            if style.name == name:
                return style
        raise _unknown(name, (s.name for s in styles), f"in {file}")
    catalogue = style_catalogue(extra_paths)
    if text in catalogue:
        return catalogue[text]
    raise _unknown(text, catalogue, f"(not a built-in style, nor in ${STYLES_ENV} or the extra style paths)")


# --------------------------------------------------------------------------------------------------------------------
# FaceChain's own style files


def facechain_prompt(style_text: str, has_lora: bool) -> str:
    """The prompt FaceChain makes of a style (``app.py`` / ``run_inference.py`` ``generate_pos_prompt``), with the
    subject slot where the release puts its subject prefix: ``"{subject}, "`` + :data:`FACECHAIN_PROMPT_WITH_STYLE`
    (a style with its own LoRA) or :data:`FACECHAIN_PROMPT_WITH_CLOTH` (one without), filled with ``style_text``.

    ``Style.format_prompt("a handsome man, 25-year-old, ")`` of it is the release's text exactly.
    """
    template = FACECHAIN_PROMPT_WITH_STYLE if has_lora else FACECHAIN_PROMPT_WITH_CLOTH
    return SUBJECT_SLOT + ", " + template.format(style_text)


def _slug(text: str) -> str:
    return "-".join(re.findall(r"[a-z0-9]+", text.lower()))


def load_facechain_style(path: str | os.PathLike[str]) -> Style:
    """A FaceChain style file (``styles/<base model folder>/<Style>.json`` of the official repository) as a
    :class:`Style`, by the release's rules.

    * name: the file name as a slug (``Cheongsam.json`` -> ``"cheongsam"``); title: the file's ``name``;
    * prompt: :func:`facechain_prompt` of ``add_prompt_style`` (the style template with a LoRA, the cloth template
      without);
    * LoRA: ``model_id`` / ``bin_file`` / ``revision`` on ModelScope at ``multiplier_style``; a style without one
      gets :data:`FACECHAIN_DEFAULT_LORA` at ``multiplier_style``, which the release merges for it;
    * base model: the folder (:data:`FACECHAIN_BASE_MODELS`); the release runs every style without a LoRA on the
      film base (``app.py`` ``launch_pipeline``);
    * no negative prompt: the release's is the method's default.

    Raises:
        StyleError: the file is missing, not JSON, or lacks a key.
    """
    import json

    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StyleError(f"{path}: style file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise StyleError(f"{path}: not a FaceChain style file (JSON): {error}") from None
    if not isinstance(data, Mapping):
        raise StyleError(f"{path}: not a FaceChain style file: expected a JSON object")
    for key in ("add_prompt_style", "multiplier_style"):
        if key not in data:
            raise StyleError(f"{path}: FaceChain style file without {key!r}")
    has_lora = data.get("model_id") is not None
    if has_lora:
        lora, revision, lora_file = data["model_id"], data.get("revision"), data.get("bin_file")
        base_model = FACECHAIN_BASE_MODELS.get(path.parent.name)
    else:
        lora, revision, lora_file = FACECHAIN_DEFAULT_LORA
        base_model = "film"
    title = data.get("name")
    return Style(
        name=_slug(path.stem) or "facechain-style",
        prompt=facechain_prompt(str(data["add_prompt_style"]), has_lora),
        title=str(title) if title is not None else None,
        lora=lora,
        lora_file=lora_file,
        lora_hub="modelscope",
        lora_revision=revision,
        weight=data["multiplier_style"],
        base_model=base_model,
        description="FaceChain style file",
        source=path,
    )


def load_facechain_styles(folder: str | os.PathLike[str]) -> list[Style]:
    """Every FaceChain style file (``*.json``) of a folder, sorted by file name, as the release lists them."""
    return [load_facechain_style(p) for p in sorted(Path(folder).glob("*.json")) if p.is_file()]


def facechain_default_lora_path(*folders: str | os.PathLike[str] | None) -> Path | None:
    """The release's default style LoRA file (:data:`FACECHAIN_DEFAULT_LORA`), if it is here: in one of ``folders``
    (as ``<file>`` or ``<repo name>/<file>``), else in the ModelScope cache; ``None`` when absent (idfusion never
    downloads from ModelScope)."""
    repo, revision, filename = FACECHAIN_DEFAULT_LORA
    for folder in folders:
        if folder is None:
            continue
        for candidate in (Path(folder) / filename, Path(folder) / repo.split("/")[1] / filename):
            if candidate.is_file():
                return candidate
    try:
        return _modelscope_file(repo, filename, revision, "FaceChain default style LoRA")
    except ModelFilesError:
        return None


# --------------------------------------------------------------------------------------------------------------------
# A style as a pre-step of any SD1.5-family call: the prompt it makes, and the LoRA it brings


@dataclass(frozen=True)
class StyledPrompt:
    """What a style makes of a request: the full prompt and negative prompt, its LoRA (``(file, weight)`` or
    ``None``) to activate with the call's other LoRAs, and what to record so ``--from`` applies it again."""

    prompt: str
    negative_prompt: str | None
    lora: tuple[str, float] | None
    metadata: dict[str, Any]
    style: Style | None = None


def apply_style(
    style: Style | str | os.PathLike[str],
    prompt: str | None,
    negative_prompt: str | None = None,
    *,
    style_weight: float | None = None,
    subject: str = DEFAULT_SUBJECT,
    local_files_only: bool | None = None,
) -> StyledPrompt:
    """Apply ``style`` (a :class:`Style`, a catalogue name or ``FILE.toml[:NAME]``) to a request.

    Args:
        style: the style.
        prompt: fills the style's ``{subject}`` slot (``None``: ``subject``).
        negative_prompt: kept when given, else the style's.
        style_weight: the LoRA weight, default the style's own, in [0, 2].
        subject: the default subject (AdaFace's is ``"z"``, its subject placeholder).
        local_files_only: see :meth:`Style.lora_path`.

    Raises:
        StyleError: an unknown style or a weight out of range. ModelFilesError: the LoRA file is missing.
    """
    style = style if isinstance(style, Style) else resolve_style(style)
    path = style.lora_path(local_files_only=local_files_only)
    weight = style.weight if style_weight is None else style_weight
    if path is not None:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise StyleError(
                f"{_where(style.source, style.name)}: LoRA weight must be a finite number, got {weight!r}"
            )
        if not 0.0 <= weight <= MAX_WEIGHT:
            raise StyleError(
                f"{_where(style.source, style.name)}: LoRA weight must be in [0, {MAX_WEIGHT:g}], got {weight}"
            )
    text = style.format_prompt(prompt if prompt is not None else subject)
    negative = negative_prompt if negative_prompt is not None else style.negative_prompt
    lora = (str(path), float(weight)) if path is not None else None
    metadata = {"style": style.name, "style_weight": float(weight) if lora else None}
    return StyledPrompt(text, negative, lora, metadata, style)


def load_style_lora(
    pipe: DiffusionPipeline,
    style: Style,
    *,
    adapter_name: str = "style",
    weight: float | None = None,
    local_files_only: bool | None = None,
) -> str | None:
    """Load ``style``'s LoRA into ``pipe`` (UNet and text encoder) and make it the only active one.

    Loads through :mod:`idfusion.loras` (diffusers/peft, unfused; kohya files with LDM block names are mapped), so
    ``pipe.unload_lora_weights()`` restores the base weights exactly.

    Returns:
        `str | None`: ``adapter_name``, or ``None`` for a prompt-only style.
    """
    from .loras import load_lora

    styled = apply_style(style, None, style_weight=weight, local_files_only=local_files_only)
    if styled.lora is None:
        return None
    path, weight = styled.lora
    load_lora(pipe, path, name=adapter_name, what="style LoRA")
    pipe.set_adapters([adapter_name], adapter_weights=[weight])
    logger.info("style %r: loaded LoRA %s at weight %g", style.name, path, weight)
    return adapter_name


def unload_style_lora(pipe: DiffusionPipeline) -> None:
    """Remove every LoRA from ``pipe``; the UNet and text encoder get their base weights back, bit for bit."""
    pipe.unload_lora_weights()
