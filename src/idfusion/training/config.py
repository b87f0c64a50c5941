"""Training-run configs: typed dataclasses, filled from a YAML file and ``--set`` overrides, validated up front.

A run config has one section per concern (``data``, ``train``, ``checkpoint``, ``log``) plus a ``recipe`` section
whose dataclass the recipe supplies (its ``config_class``). Loading checks everything before any model is built:
unknown keys, wrong types, missing files and out-of-range values raise :class:`ConfigError` naming the field, e.g.
``train.learning_rate: expected a positive number, got -1``.

Paths written in the YAML file are relative to the file's folder; paths given on the command line (``--output``,
``--set``) are relative to the current directory.

Why not pydantic: it only arrives here with the optional ``ui`` extra (through gradio), and the converter below
(plain dataclasses + type hints + per-field checks) is small and gives messages in the project's style.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..errors import IdfusionError

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "ConfigFieldError",
    "DataConfig",
    "LogConfig",
    "RunConfig",
    "TrainConfig",
    "between",
    "existing_file",
    "existing_folder",
    "config_to_dict",
    "default_document",
    "dump_config",
    "load_config",
    "multiple_of",
    "non_negative",
    "parse_overrides",
    "positive",
    "setting",
]


class ConfigError(IdfusionError, ValueError):
    """A training config is unusable; the message names the file or the field."""


class ConfigFieldError(ValueError):
    """Raised by a section's ``__post_init__`` for one of its fields; the loader prefixes the section's path."""

    def __init__(self, field_name: str, message: str):
        self.field_name = field_name
        super().__init__(message)


# --------------------------------------------------------------------------------------------------------------------
# Per-field checks: put one in ``field(metadata={"check": ...})``; each returns an error message or None.
# --------------------------------------------------------------------------------------------------------------------

Check = Callable[[Any], "str | None"]


def positive(value: Any) -> str | None:
    return None if value is None or value > 0 else f"expected a positive number, got {value!r}"


def non_negative(value: Any) -> str | None:
    return None if value is None or value >= 0 else f"expected a number >= 0, got {value!r}"


def between(low: float, high: float, *, high_open: bool = False) -> Check:
    def check(value: Any) -> str | None:
        inside = value is None or (low <= value < high if high_open else low <= value <= high)
        return None if inside else f"expected a number in [{low}, {high}{')' if high_open else ']'}, got {value!r}"

    return check


def multiple_of(step: int) -> Check:
    def check(value: Any) -> str | None:
        if value is None or (value > 0 and value % step == 0):
            return None
        return f"expected a positive multiple of {step}, got {value!r}"

    return check


def _exists(kind: str) -> Check:
    def check(value: Any) -> str | None:
        paths = value if isinstance(value, list) else [value]
        for path in paths:
            if path is None:
                continue
            if not path.exists():
                return f"{kind} not found: {path}"
            if kind == "file" and not path.is_file():
                return f"expected a file, got a folder: {path}"
            if kind == "folder" and not path.is_dir():
                return f"expected a folder, got a file: {path}"
        return None

    return check


existing_file = _exists("file")
existing_folder = _exists("folder")


def setting(default: Any = dataclasses.MISSING, *, check: Check | None = None, factory: Any = None) -> Any:
    """A dataclass field with a value check run at load time (``check`` returns an error message or None)."""
    metadata = {"check": check} if check else {}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


# --------------------------------------------------------------------------------------------------------------------
# The shared sections
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Where the training images come from and how they are prepared."""

    train: list[Path] = setting(factory=list, check=existing_file)  # JSON-lines files (one str is one file)
    resolution: int = setting(512, check=multiple_of(8))  # square training size in pixels
    center_crop: bool = True  # False: a random crop, seeded per sample
    random_flip: bool = False  # horizontal flip with p=0.5, seeded per sample
    shuffle: bool = True  # a new seeded permutation each epoch
    num_workers: int = setting(0, check=non_negative)  # DataLoader worker processes
    check_files: bool = True  # check that every image/reference/mask file exists while reading the jsonl


@dataclass
class TrainConfig:
    """The optimisation: steps, batch, optimiser, precision."""

    max_steps: int = setting(1000, check=positive)  # optimiser steps
    batch_size: int = setting(1, check=positive)  # per process and per micro-step
    gradient_accumulation_steps: int = setting(1, check=positive)
    learning_rate: float = setting(1e-4, check=positive)
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = "constant"  # diffusers.optimization.get_scheduler names
    lr_warmup_steps: int = setting(0, check=non_negative)
    adam_beta1: float = setting(0.9, check=between(0, 1, high_open=True))
    adam_beta2: float = setting(0.999, check=between(0, 1, high_open=True))
    adam_weight_decay: float = setting(1e-2, check=non_negative)
    adam_epsilon: float = setting(1e-8, check=positive)
    max_grad_norm: float | None = setting(1.0, check=positive)  # null: no clipping
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None  # null: accelerate's launch setting ("no" alone)
    gradient_checkpointing: bool = False  # on every trainable model that supports it
    use_ema: bool = False  # keep an EMA of the trainable weights (diffusers' EMAModel); saved and validated with it
    ema_decay: float = setting(0.9999, check=between(0, 1))
    find_unused_parameters: bool = False  # DDP: needed when some trainable weights get no gradient in a step


@dataclass
class CheckpointConfig:
    """Resumable training state (accelerate's ``save_state`` plus the data position), written atomically."""

    every_steps: int = setting(500, check=positive)  # also written at the last step
    keep_last: int = setting(3, check=positive)


@dataclass
class LogConfig:
    """What is recorded besides the CSV of losses (always written)."""

    tensorboard: bool = True  # event files under <output>/logs/tensorboard
    plot: bool = True  # <output>/logs/loss.png at each checkpoint and at the end
    validate_every_steps: int = setting(0, check=non_negative)  # 0: validate only at the end
    validate_at_end: bool = True


@dataclass
class RunConfig:
    """One training run. ``recipe`` holds the recipe's own section (an instance of its ``config_class``)."""

    output_dir: Path
    recipe: Any
    data: DataConfig
    seed: int = setting(0, check=non_negative)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def recipe_name(self) -> str:
        return self.recipe.name


# --------------------------------------------------------------------------------------------------------------------
# Conversion: plain data (from YAML) -> dataclasses, with messages that name the field
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class _Context:
    base_dir: Path  # relative paths from the YAML file resolve here
    cli_keys: frozenset[str] = frozenset()  # dotted keys set on the command line: their paths resolve against CWD


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _fail(path: str, message: str) -> ConfigError:
    return ConfigError(f"{path}: {message}" if path else message)


def _is_dataclass_type(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def _convert(value: Any, hint: Any, path: str, context: _Context) -> Any:
    """Check ``value`` against the type ``hint`` and convert it (mappings into dataclasses, strings into Paths)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None:
            if type(None) in options:
                return None
            raise _fail(path, f"expected {_type_name(hint)}, got null")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, path, context)
            except ConfigError as error:
                errors.append(error)
        if len(errors) == 1:
            raise errors[0]
        raise _fail(path, f"expected {_type_name(hint)}, got {_describe(value)}")
    if origin is Literal:
        choices = typing.get_args(hint)
        if value is False and "no" in choices:
            return "no"  # YAML 1.1 reads a bare `no` as false (mixed_precision: no)
        if value not in choices:
            raise _fail(path, f"expected one of {', '.join(map(repr, choices))}, got {_describe(value)}")
        return value
    if _is_dataclass_type(hint):
        return _convert_dataclass(value, hint, path, context)
    if origin is list:
        (item_hint,) = typing.get_args(hint) or (Any,)
        if isinstance(value, (str, Path)) and item_hint is Path:
            value = [value]  # one file is a list of one
        if not isinstance(value, list):
            raise _fail(path, f"expected a list, got {_describe(value)}")
        return [_convert(item, item_hint, f"{path}[{i}]", context) for i, item in enumerate(value)]
    if origin is dict:
        key_hint, item_hint = typing.get_args(hint) or (str, Any)
        if not isinstance(value, Mapping):
            raise _fail(path, f"expected a mapping, got {_describe(value)}")
        return {
            _convert(k, key_hint, path, context): _convert(v, item_hint, f"{path}.{k}", context)
            for k, v in value.items()
        }
    if hint is bool:
        if not isinstance(value, bool):
            raise _fail(path, f"expected true or false, got {_describe(value)}")
        return value
    if hint is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(path, f"expected a whole number, got {_describe(value)}")
        return value
    if hint is float:
        if isinstance(value, str):
            try:  # YAML 1.1 reads 1e-4 (no dot) as a string
                value = float(value)
            except ValueError:
                raise _fail(path, f"expected a number, got {_describe(value)}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(path, f"expected a number, got {_describe(value)}")
        if not math.isfinite(value):
            raise _fail(path, f"expected a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise _fail(path, f"expected a string, got {_describe(value)}")
        return value
    if hint is Path:
        if not isinstance(value, (str, Path)) or not str(value):
            raise _fail(path, f"expected a path, got {_describe(value)}")
        resolved = Path(value).expanduser()
        if not resolved.is_absolute():
            from_cli = any(
                path == key or path.startswith(f"{key}.") or path.startswith(f"{key}[") for key in context.cli_keys
            )
            resolved = (Path.cwd() if from_cli else context.base_dir) / resolved
        return Path(os.path.abspath(resolved))  # normalise "..", keep symlinks
    raise TypeError(f"{path}: unsupported type hint {hint!r} in a config dataclass")  # a bug in the dataclass


def _type_name(hint: Any) -> str:
    names = {bool: "true or false", int: "a whole number", float: "a number", str: "a string", Path: "a path"}
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        parts = [_type_name(a) for a in typing.get_args(hint) if a is not type(None)]
        if type(None) in typing.get_args(hint):
            parts.append("null")
        return " or ".join(parts)
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(hint)))
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _convert_dataclass(value: Any, cls: type, path: str, context: _Context) -> Any:
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise _fail(path, f"expected a mapping of {cls.__name__} fields, got {_describe(value)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    prefix = f"{path}." if path else ""
    for key in value:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(fields)}"
            raise _fail(f"{prefix}{key}", f"unknown field{hint}")
    kwargs = {}
    for name, spec in fields.items():
        if name not in value:
            if spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
                raise _fail(f"{prefix}{name}", "missing (required)")
            continue
        converted = _convert(value[name], hints[name], f"{prefix}{name}", context)
        check = spec.metadata.get("check")
        message = check(converted) if check else None
        if message:
            raise _fail(f"{prefix}{name}", message)
        kwargs[name] = converted
    try:
        return cls(**kwargs)
    except ConfigFieldError as error:
        raise _fail(f"{prefix}{error.field_name}", str(error)) from None


# --------------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------------


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["train.max_steps=10", ...]`` -> ``{"train.max_steps": 10}``; values are read as YAML scalars/flow lists."""
    import yaml

    overrides = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.max_steps=10")
        try:
            overrides[key] = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as error:
            raise ConfigError(f"--set {key}: cannot read value {text!r} ({error})") from None
    return overrides


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def _deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; errors name the file (and line, for syntax errors)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(error, 'problem', None) or error})") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read ({error})") from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (data, train, ...), got {type(document).__name__}")
    return document


def load_config(
    path: str | Path | None = None,
    *,
    recipe: str | None = None,
    overrides: Mapping[str, Any] | Iterable[str] = (),
    output_dir: str | Path | None = None,
    document: Mapping[str, Any] | None = None,
) -> RunConfig:
    """Read, merge and validate a run config; nothing heavy is imported or built.

    Precedence, lowest first: the recipe's ``default_config()``, the YAML file (or ``document``), ``overrides``,
    ``output_dir``.

    Args:
        path (`str` or `Path`, *optional*): the YAML file. Relative paths inside it resolve against its folder.
        recipe (`str`, *optional*): recipe name (or ``"module:Class"``); must agree with ``recipe.name`` in the file.
        overrides (mapping or iterable of ``"key=value"`` strings, *optional*): dotted keys, e.g. ``train.max_steps``.
        output_dir (`str` or `Path`, *optional*): replaces ``output_dir``; relative to the current directory.
        document (mapping, *optional*): the config as a dict instead of a file (paths relative to the current
            directory).

    Returns:
        `RunConfig`: with ``recipe`` an instance of the recipe's ``config_class``.

    Raises:
        ConfigError: naming the file or the field.
    """
    from .recipe import load_recipe

    if (path is None) == (document is None):
        raise ConfigError("give a config file or a config mapping (not both)")
    raw = read_yaml(path) if path is not None else dict(document or {})
    base_dir = Path(path).resolve().parent if path is not None else Path.cwd()
    if not isinstance(overrides, Mapping):
        overrides = parse_overrides(overrides)

    section = raw.get("recipe")
    if section is not None and not isinstance(section, Mapping):
        raise ConfigError(
            f"recipe: expected a mapping with a 'name' (e.g. name: text-to-image), got {_describe(section)}"
        )
    named = (section or {}).get("name")
    if "recipe.name" in overrides:
        named = overrides["recipe.name"]
    if recipe is not None and named is not None and named != recipe:
        raise ConfigError(f"recipe.name: the config says {named!r} but {recipe!r} was asked for")
    name = recipe or named
    if not name:
        raise ConfigError("recipe.name: missing; set it in the config or pass --recipe")
    if not isinstance(name, str):
        raise ConfigError(f"recipe.name: expected a string, got {_describe(name)}")
    recipe_cls = load_recipe(name)

    merged = _deep_merge(recipe_cls.default_config(), raw)
    for key, value in overrides.items():
        _set_dotted(merged, key, value)
    merged.setdefault("recipe", {})
    # a registered name is normalised to the recipe's own; a "module:Class" string is kept, since it is what loads it
    merged["recipe"] = {**merged["recipe"], "name": name if ":" in name else recipe_cls.name}
    cli_keys = set(overrides)
    if output_dir is not None:
        merged["output_dir"] = str(output_dir)
        cli_keys.add("output_dir")
    if "output_dir" not in merged:
        raise ConfigError("output_dir: missing; set it in the config or pass --output")

    context = _Context(base_dir=base_dir, cli_keys=frozenset(cli_keys))
    recipe_section = _convert(merged.pop("recipe"), recipe_cls.config_class, "recipe", context)
    merged["recipe"] = {}  # placeholder for the generic pass; the typed section replaces it
    config = _convert(merged, RunConfig, "", context)
    if not config.data.train and recipe_cls.needs_data_train(recipe_section):
        raise ConfigError("data.train: missing: give at least one JSON-lines file")
    return dataclasses.replace(config, recipe=recipe_section)


def config_to_dict(config: Any) -> Any:
    """A dataclass config as plain YAML-able data (Paths become strings)."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: config_to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, Mapping):
        return {str(k): config_to_dict(v) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [config_to_dict(v) for v in config]
    if isinstance(config, Path):
        return str(config)
    return config


def dump_config(config: Any) -> str:
    """The config as YAML text (sections in declaration order)."""
    import yaml

    return yaml.safe_dump(config_to_dict(config), sort_keys=False, allow_unicode=True)


def _defaults(cls: type) -> dict[str, Any]:
    values: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for spec in dataclasses.fields(cls):
        if _is_dataclass_type(hints[spec.name]):
            values[spec.name] = _defaults(hints[spec.name])
        elif spec.default is not dataclasses.MISSING:
            values[spec.name] = spec.default
        elif spec.default_factory is not dataclasses.MISSING:
            values[spec.name] = spec.default_factory()
        else:
            values[spec.name] = None  # required: no default to show
    return values


def default_document(recipe: str) -> dict[str, Any]:
    """Every field of a run config for ``recipe`` with its default (None where a value is required): a template."""
    from .recipe import load_recipe

    recipe_cls = load_recipe(recipe)
    document = _defaults(RunConfig)
    document["recipe"] = {**_defaults(recipe_cls.config_class), "name": recipe_cls.name}
    return config_to_dict(_deep_merge(document, recipe_cls.default_config()))
