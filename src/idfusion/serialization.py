"""Load pickled PyTorch checkpoints without running code from them.

Some official checkpoints (AdaFace's ``.pt`` files) are ``torch.save`` dumps of whole ``nn.Module`` objects, so a
plain ``torch.load(..., weights_only=False)`` imports the authors' classes and can run anything the pickle asks for.
:func:`load_pickled_state` reads such files with an allow-listing unpickler instead:

- Tensors come back as real tensors: the tensor and parameter rebuild functions are replaced by local equivalents
  that only build tensors from the file's storages (no backward hooks, no ``__setstate__`` of arbitrary objects).
- Classes from the *allowed module prefixes* (for example ``adaface.``, ``transformers.``, ``torch.nn.modules.``) are
  never imported: each ``(module, name)`` maps to an inert stub class, created for this load only, that accepts any
  constructor arguments and keeps the pickled state in its ``__dict__``. :func:`module_state_dict` walks a tree of
  such stubs (their ``_parameters`` / ``_buffers`` / ``_modules``) into a flat state dict.
- Single *allowed globals* (for example ``regex._regex.compile``, ``tokenizers.AddedToken``) get the same stubs
  without allowing their whole module. A stub stands in for functions too: where the pickle calls the function, the
  "call" only records its arguments (``_stub_args``); nothing of the original is imported or run.
- A few plain containers and values are allowed: ``collections.OrderedDict``, ``set``/``frozenset``/``slice``/
  ``complex``/``list``/``dict``/``tuple``/``object``, torch dtypes, ``torch.Size``, ``torch.device``, and the
  ``copyreg`` object-reconstruction helpers (restricted to stub classes).
- Every other global (``posix.system``, ``builtins.eval``, ``builtins.getattr``, ...) raises
  :class:`UnsafeCheckpointError` when the unpickler meets it, before anything is called.

Objects that the file could otherwise mutate (pickle's ``BUILD`` sets attributes) are never shared with the rest of
the process: rebuild functions are closures made per load, types such as ``torch.Tensor`` are represented by
private sentinels, and the remaining real types (``OrderedDict``, ``torch.Size``, ...) are immutable builtins.

Both containers ``torch.save`` writes are read: the zip format (torch >= 1.6; read here with :mod:`zipfile`, so
TorchScript archives are refused rather than handed to ``torch.jit.load``) and the legacy format (read by
``torch.load`` with this module's unpickler).
"""

from __future__ import annotations

import collections
import collections.abc
import io
import logging
import os
import pickle
import sys
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from idfusion.errors import IdfusionError

__all__ = [
    "PickledStub",
    "UnsafeCheckpointError",
    "load_pickled_state",
    "module_state_dict",
    "stub_qualified_name",
]

logger = logging.getLogger(__name__)

# Python 2 module names that protocol-2 pickles use (pickle maps them itself only in its own find_class).
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}

# torch.save records a storage's element type as a global ``torch.<Name>Storage``.
_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexDoubleStorage": torch.complex128,
    "ComplexFloatStorage": torch.complex64,
    "UntypedStorage": torch.uint8,
}

_BUILTIN_TYPES: dict[str, type] = {
    t.__name__: t for t in (set, frozenset, slice, complex, list, dict, tuple, object, int, float, bool, str)
}


class UnsafeCheckpointError(IdfusionError, pickle.UnpicklingError):
    """A pickled checkpoint asked for something outside the allow-list; nothing from it was executed.

    Attributes:
        source (`str`): the file.
        refused (`str`): the refused global (``"posix.system"``) or construct.
    """

    def __init__(self, source: str | os.PathLike[str], refused: str, reason: str = ""):
        self.source = str(source)
        self.refused = refused
        detail = reason or "it is not on the allow-list of a safe checkpoint load"
        super().__init__(
            f"{self.source}: refused to load {refused!r} from this pickled checkpoint ({detail}); nothing from the "
            "file was executed. Only load pickled checkpoints from sources you trust, and prefer a converted "
            ".safetensors file."
        )


class PickledStub:
    """Base of the inert stand-ins for pickled classes. Nothing of the original class is imported or run.

    A stub accepts any constructor arguments (kept in ``_stub_args``) and any pickled state: a dict state updates
    the instance ``__dict__``, a ``(dict, slots)`` pair updates it with both, anything else is kept as
    ``_stub_state``. The original class's qualified name is :func:`stub_qualified_name`.
    """

    _stub_module: str = ""
    _stub_name: str = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> PickledStub:
        if cls is PickledStub:
            raise TypeError("PickledStub is abstract; stubs are made by load_pickled_state")
        obj = object.__new__(cls)
        obj.__dict__["_stub_args"] = (args, kwargs)
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and all(s is None or isinstance(s, dict) for s in state):
            for part in state:
                self._update(part or {})
        elif isinstance(state, dict):
            self._update(state)
        else:
            self.__dict__["_stub_state"] = state

    def _update(self, state: dict[Any, Any]) -> None:
        for key, value in state.items():
            # Dunder names are refused: an instance-dict ``__setstate__`` would be called by a later BUILD.
            if not isinstance(key, str) or (key.startswith("__") and key.endswith("__")):
                raise pickle.UnpicklingError(f"pickled state of {stub_qualified_name(self)} has the key {key!r:.60}")
            self.__dict__[key] = value  # the instance dict only: no descriptor or __setattr__ runs

    def __repr__(self) -> str:
        return f"<stub of {stub_qualified_name(self)}>"


def stub_qualified_name(obj: Any) -> str:
    """``"module.QualName"`` of the class a stub (or stub class) stands for; for other objects, of their class."""
    cls = obj if isinstance(obj, type) else type(obj)
    if issubclass(cls, PickledStub):
        return f"{cls._stub_module}.{cls._stub_name}"
    return f"{cls.__module__}.{cls.__qualname__}"


class _Sentinel:
    """Stands for a real type (``torch.Tensor``) that must not be handed to the pickle, which could mutate it."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


class _StorageType:
    """The element type of a stored storage (``torch.FloatStorage`` in the pickle)."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


class _LoadedStorage:
    """A storage read from a zip checkpoint, with the element type the file gave it."""

    __slots__ = ("untyped", "dtype")

    def __init__(self, untyped: torch.UntypedStorage, dtype: torch.dtype):
        self.untyped = untyped
        self.dtype = dtype


def _storage_parts(storage: Any) -> tuple[torch.UntypedStorage | None, torch.dtype | None]:
    if isinstance(storage, _LoadedStorage):
        return storage.untyped, storage.dtype
    if isinstance(storage, torch.storage.TypedStorage):  # from torch.load's legacy-format reader
        # The private attribute avoids TypedStorage's deprecation warning; torch's own rebuild uses it too.
        untyped = getattr(storage, "_untyped_storage", None)
        if untyped is None:
            untyped = storage.untyped()
        return untyped, storage.dtype
    return None, None


_TENSOR = _Sentinel("torch.Tensor")
_PARAMETER = _Sentinel("torch.nn.Parameter")


def _normalized_prefixes(prefixes: Sequence[str]) -> tuple[str, ...]:
    if isinstance(prefixes, str):
        raise TypeError("allowed_module_prefixes must be a sequence of strings, not one string")
    out = tuple(p.rstrip(".") for p in prefixes)
    if any(not p for p in out):
        raise ValueError("an allowed module prefix is empty; that would allow every module")
    return out


def _normalized_globals(names: Sequence[str]) -> frozenset[str]:
    if isinstance(names, str):
        raise TypeError("allowed_globals must be a sequence of strings, not one string")
    bad = [n for n in names if not isinstance(n, str) or "." not in n.strip(".") or n != n.strip()]
    if bad:
        raise ValueError(f"allowed globals must be qualified names such as 'tokenizers.AddedToken'; got {bad}")
    return frozenset(names)


class _RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` returns only allow-listed objects and per-load stubs."""

    # Set on the per-load subclass made by _bind (torch.load instantiates the class itself).
    _source: str = "<checkpoint>"
    _prefixes: tuple[str, ...] = ()
    _globals: frozenset[str] = frozenset()

    def __init__(self, file: Any, **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self._stubs: dict[tuple[str, str], type[PickledStub]] = {}
        self._safe = self._make_safe_globals()

    # ---------------------------------------------------------------------------------------------------------------
    def find_class(self, module: str, name: str) -> Any:
        if not isinstance(module, str) or not isinstance(name, str):
            raise UnsafeCheckpointError(self._source, f"{module!r}.{name!r}", "a global with a non-string name")
        module = _PY2_MODULES.get(module, module)
        qualified = f"{module}.{name}"
        if qualified in self._safe:
            return self._safe[qualified]
        if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch":
            value = vars(torch).get(name)  # vars(): no lazy submodule import through torch.__getattr__
            if isinstance(value, torch.dtype):
                return value
        if module == "builtins" and name in _BUILTIN_TYPES:
            return _BUILTIN_TYPES[name]
        if qualified in self._globals or any(module == p or module.startswith(p + ".") for p in self._prefixes):
            return self._stub(module, name)
        raise UnsafeCheckpointError(self._source, qualified)

    def _stub(self, module: str, name: str) -> type[PickledStub]:
        key = (module, name)
        if key not in self._stubs:
            attrs = {"__module__": module, "__qualname__": name, "_stub_module": module, "_stub_name": name}
            self._stubs[key] = type(name.rpartition(".")[2] or "Stub", (PickledStub,), attrs)
        return self._stubs[key]

    # ---------------------------------------------------------------------------------------------------------------
    def _make_safe_globals(self) -> dict[str, Any]:
        source = self._source

        def refuse(what: str, reason: str) -> UnsafeCheckpointError:
            return UnsafeCheckpointError(source, what, reason)

        def rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> torch.Tensor:
            untyped, dtype = _storage_parts(storage)
            if untyped is None:
                raise refuse("torch._utils._rebuild_tensor", "its storage argument is not a stored tensor storage")
            if not (
                isinstance(storage_offset, int)
                and isinstance(size, (tuple, list, torch.Size))
                and isinstance(stride, (tuple, list))
                and all(isinstance(v, int) for v in (*size, *stride))
            ):
                raise refuse("torch._utils._rebuild_tensor", "malformed offset, size or stride")
            size, stride = tuple(size), tuple(stride)
            if len(size) != len(stride) or storage_offset < 0 or any(v < 0 for v in (*size, *stride)):
                raise refuse("torch._utils._rebuild_tensor", "negative or mismatched offset, size or stride")
            tensor = torch.empty((0,), dtype=dtype, device=untyped.device)
            # set_ would silently grow the storage; a view must lie inside what the file stored.
            if all(size):
                last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
                if (last + 1) * tensor.element_size() > untyped.nbytes():
                    raise refuse("torch._utils._rebuild_tensor", "the tensor view exceeds its stored storage")
            return tensor.set_(untyped, storage_offset, size, stride)

        def rebuild_tensor_v2(
            storage: Any,
            storage_offset: Any,
            size: Any,
            stride: Any,
            requires_grad: Any,
            backward_hooks: Any,
            metadata: Any = None,
        ) -> torch.Tensor:
            # Backward hooks and tensor metadata (conj/neg bits) are dropped: a checkpoint's weights need neither.
            tensor = rebuild_tensor(storage, storage_offset, size, stride)
            tensor.requires_grad = bool(requires_grad)
            return tensor

        def rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any, *state: Any) -> torch.Tensor:
            if not isinstance(data, torch.Tensor):
                raise refuse("torch._utils._rebuild_parameter", "its data is not a tensor")
            return torch.nn.Parameter(data, requires_grad=bool(requires_grad))

        def rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> torch.Tensor:
            if func not in (rebuild_tensor, rebuild_tensor_v2, rebuild_parameter) or new_type not in (
                _TENSOR,
                _PARAMETER,
            ):
                raise refuse("torch._tensor._rebuild_from_type_v2", "only plain tensors and parameters are rebuilt")
            tensor = func(*args)
            if new_type is _PARAMETER and not isinstance(tensor, torch.nn.Parameter):
                tensor = torch.nn.Parameter(tensor, requires_grad=tensor.requires_grad)
            return tensor

        def check_stub_class(cls: Any, what: str) -> type[PickledStub]:
            if not (isinstance(cls, type) and issubclass(cls, PickledStub) and cls is not PickledStub):
                raise refuse(what, f"it may only create stubbed classes, not {cls!r}")
            return cls

        def reconstructor(cls: Any, base: Any, state: Any) -> PickledStub:
            # copyreg._reconstructor, the protocol-0/1 way of recreating an instance of a plain class.
            if base is not object or state is not None:
                raise refuse("copyreg._reconstructor", "only object-based stubbed classes are recreated")
            stub_cls = check_stub_class(cls, "copyreg._reconstructor")
            return stub_cls.__new__(stub_cls)

        def newobj(cls: Any, *args: Any) -> PickledStub:
            stub_cls = check_stub_class(cls, "copyreg.__newobj__")
            return stub_cls.__new__(stub_cls, *args)

        def newobj_ex(cls: Any, args: Any, kwargs: Any) -> PickledStub:
            stub_cls = check_stub_class(cls, "copyreg.__newobj_ex__")
            return stub_cls.__new__(stub_cls, *args, **kwargs)

        def codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
            # How protocol-2 pickles store ``bytes``: _codecs.encode(str, "latin1").
            if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
                raise refuse("_codecs.encode", "only str-to-latin1 byte strings are decoded")
            return text.encode("latin1")

        return {
            "torch._utils._rebuild_tensor": rebuild_tensor,
            "torch._utils._rebuild_tensor_v2": rebuild_tensor_v2,
            "torch._utils._rebuild_parameter": rebuild_parameter,
            "torch._utils._rebuild_parameter_with_state": rebuild_parameter,
            "torch._tensor._rebuild_from_type_v2": rebuild_from_type_v2,
            "torch._tensor.Tensor": _TENSOR,
            "torch.Tensor": _TENSOR,
            "torch.nn.parameter.Parameter": _PARAMETER,
            "torch.Size": torch.Size,
            "torch.device": torch.device,
            "collections.OrderedDict": collections.OrderedDict,
            "copyreg._reconstructor": reconstructor,
            "copyreg.__newobj__": newobj,
            "copyreg.__newobj_ex__": newobj_ex,
            "_codecs.encode": codecs_encode,
        }


def _bind(source: str, prefixes: tuple[str, ...], globals_: frozenset[str]) -> type[_RestrictedUnpickler]:
    # A class, not an instance, because torch.load subclasses and instantiates ``pickle_module.Unpickler`` itself.
    attrs = {"_source": source, "_prefixes": prefixes, "_globals": globals_}
    return type("_BoundRestrictedUnpickler", (_RestrictedUnpickler,), attrs)


class _RestrictedPickleModule:
    """What ``torch.load(pickle_module=...)`` needs: an ``Unpickler`` class and ``load``, both restricted."""

    __name__ = "idfusion.serialization"  # torch checks pickle_module.__name__ (for dill)

    def __init__(self, unpickler: type):
        self.Unpickler = unpickler

    def load(self, file: Any, **kwargs: Any) -> Any:
        return self.Unpickler(file, **kwargs).load()


def _is_torch_zip(path: Path) -> bool:
    return zipfile.is_zipfile(path)


def _load_zip(path: Path, prefixes: tuple[str, ...], globals_: frozenset[str]) -> Any:
    source = str(path)
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise pickle.UnpicklingError(f"{source}: not a torch.save zip archive (found no single */data.pkl)")
        root = pickles[0][: -len("data.pkl")]
        if f"{root}constants.pkl" in names or any(n.startswith(f"{root}code/") for n in names):
            raise UnsafeCheckpointError(source, "TorchScript archive", "it holds TorchScript code")
        byteorder = archive.read(f"{root}byteorder").decode() if f"{root}byteorder" in names else "little"
        if byteorder not in ("little", "big"):
            raise pickle.UnpicklingError(f"{source}: unknown byte order {byteorder!r}")
        storages: dict[str, _LoadedStorage] = {}

        def persistent_load(pid: Any) -> _LoadedStorage:
            if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
                raise UnsafeCheckpointError(source, f"persistent id {pid!r:.80}", "only tensor storages are loaded")
            _, storage_type, key, _location, numel = pid
            if not isinstance(storage_type, _StorageType) or not isinstance(key, str) or not isinstance(numel, int):
                raise UnsafeCheckpointError(source, f"persistent id {pid!r:.80}", "malformed storage reference")
            if key not in storages:
                record = f"{root}data/{key}"
                if record not in names:
                    raise pickle.UnpicklingError(f"{source}: storage record {record} is missing")
                data = archive.read(record)
                nbytes = numel * torch.empty((), dtype=storage_type.dtype).element_size()
                if len(data) != nbytes:
                    raise pickle.UnpicklingError(f"{source}: {record} has {len(data)} bytes, expected {nbytes}")
                untyped = torch.UntypedStorage.from_buffer(data, dtype=torch.uint8) if data else torch.UntypedStorage()
                if byteorder != sys.byteorder:
                    untyped.byteswap(storage_type.dtype)
                storages[key] = _LoadedStorage(untyped, storage_type.dtype)
            storage = storages[key]
            if storage.dtype != storage_type.dtype:
                raise pickle.UnpicklingError(f"{source}: storage {key} is used with two element types")
            return storage

        unpickler = _bind(source, prefixes, globals_)(io.BytesIO(archive.read(pickles[0])), encoding="utf-8")
        unpickler.persistent_load = persistent_load  # the C unpickler's settable hook (no method is defined)
        return unpickler.load()


def load_pickled_state(
    path: str | os.PathLike[str], *, allowed_module_prefixes: Sequence[str], allowed_globals: Sequence[str] = ()
) -> Any:
    """Load a ``torch.save`` file without executing code from it; tensors load on the CPU.

    Args:
        path (`str` or `os.PathLike`): the checkpoint (zip or legacy ``torch.save`` format).
        allowed_module_prefixes (`Sequence[str]`): modules whose classes may appear in the file. They are never
            imported: each class becomes an inert :class:`PickledStub` subclass. ``"adaface"`` (or ``"adaface."``)
            matches ``adaface`` and every ``adaface.*`` module.
        allowed_globals (`Sequence[str]`, *optional*): single qualified names (``"regex._regex.compile"``,
            ``"tokenizers.AddedToken"``) that may appear although their module is not allowed. They become stubs
            as well; a stubbed function that the pickle calls only records its arguments.

    Returns:
        The unpickled object, with real tensors and ``torch.nn.Parameter`` s, and stubs for pickled class instances.

    Raises:
        UnsafeCheckpointError: the file refers to a global outside the allow-list (nothing was executed), or is a
            TorchScript archive.
        FileNotFoundError: no such file.
        pickle.UnpicklingError: a corrupt file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    prefixes = _normalized_prefixes(allowed_module_prefixes)
    globals_ = _normalized_globals(allowed_globals)
    if _is_torch_zip(path):
        return _load_zip(path, prefixes, globals_)
    # Legacy (pre-1.6) format: torch.load reads the container; every pickle in it goes through our unpickler.
    # torch resolves storage-type names itself (to inert dtype holders) and hands every other global to us.
    module = _RestrictedPickleModule(_bind(str(path), prefixes, globals_))
    try:
        return torch.load(path, map_location="cpu", pickle_module=module, weights_only=False, mmap=False)
    except UnsafeCheckpointError:
        raise
    except RuntimeError as error:
        if "pickle_module" in str(error):  # TORCH_FORCE_WEIGHTS_ONLY_LOAD=1 forbids a custom pickle module
            raise RuntimeError(
                f"{path}: legacy-format checkpoints need torch.load with a restricted unpickler, which "
                "TORCH_FORCE_WEIGHTS_ONLY_LOAD forbids; unset it or re-save the file in the zip format"
            ) from error
        raise


def _module_parts(obj: Any) -> tuple[dict[str, Any], dict[str, Any], set[Any], dict[str, Any]]:
    state = vars(obj) if hasattr(obj, "__dict__") else {}
    params, buffers, modules = (state.get(k) or {} for k in ("_parameters", "_buffers", "_modules"))
    non_persistent = state.get("_non_persistent_buffers_set") or set()
    for what, part in (("_parameters", params), ("_buffers", buffers), ("_modules", modules)):
        if not isinstance(part, dict):
            raise ValueError(f"{stub_qualified_name(obj)}.{what} is a {type(part).__name__}, not a dict")
    if not isinstance(non_persistent, (set, frozenset)):
        raise ValueError(f"{stub_qualified_name(obj)}._non_persistent_buffers_set is not a set")
    return params, buffers, non_persistent, modules


def module_state_dict(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Flatten a (stubbed or real) ``nn.Module`` tree into a state dict, as ``nn.Module.state_dict`` would.

    Walks ``_parameters``, ``_buffers`` (skipping ``_non_persistent_buffers_set``) and ``_modules`` recursively with
    dotted prefixes, skipping ``None`` entries. A real ``nn.Module`` uses its own ``state_dict``.

    Args:
        obj: a :class:`PickledStub` of an ``nn.Module`` class, or an ``nn.Module``.
        prefix (`str`, *optional*): prepended to every key (``"encoder."``).

    Returns:
        `dict[str, torch.Tensor]`: detached tensors sharing memory with the loaded ones.

    Raises:
        ValueError: a parameter or buffer is not a tensor, or the tree is malformed (e.g. cyclic).
    """
    if isinstance(obj, torch.nn.Module):
        return {prefix + k: v.detach() for k, v in obj.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    stack: list[tuple[str, Any, tuple[int, ...]]] = [(prefix, obj, ())]
    while stack:
        where, node, ancestors = stack.pop()
        if id(node) in ancestors:
            raise ValueError(f"module tree is cyclic at {where.rstrip('.') or '<root>'}")
        if isinstance(node, torch.nn.Module):
            out.update(module_state_dict(node, where))
            continue
        params, buffers, non_persistent, modules = _module_parts(node)
        for kind, entries in (("parameter", params), ("buffer", buffers)):
            for name, value in entries.items():
                if value is None or (kind == "buffer" and name in non_persistent):
                    continue
                if not isinstance(value, torch.Tensor):
                    raise ValueError(f"{kind} {where}{name} is a {type(value).__name__}, not a tensor")
                out[f"{where}{name}"] = value.detach()
        for name, child in reversed(list(modules.items())):  # reversed: the stack pops in insertion order
            if child is not None:
                stack.append((f"{where}{name}.", child, (*ancestors, id(node))))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Plain tensor checkpoints


def load_tensor_file(
    path: str | os.PathLike[str], *, what: str = "checkpoint", hint: str = ""
) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` dict from a ``.safetensors`` file or a ``torch.save`` file.

    ``torch.save`` files are read with ``weights_only=True`` (memory-mapped when the zip format allows), so nothing
    in them runs. ``what`` names the file in messages; ``hint`` says where to get it again.

    Raises:
        ModelFilesError: the file is missing, unreadable, or not a dict of tensors.
    """
    import torch

    from .errors import ModelFilesError

    path = Path(path)
    suffix = f" {hint}" if hint else ""
    if not path.is_file():
        raise ModelFilesError(f"{path}: {what} not found.{suffix}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelFilesError(f"{path}: cannot be read as a {what} (a dict of tensors): {first}.{suffix}") from error
    if not isinstance(state, collections.abc.Mapping):
        raise ModelFilesError(f"{path}: expected a {what} (a dict of tensors), found {type(state).__name__}")
    bad = next(((k, v) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise ModelFilesError(f"{path}: expected a dict of tensors, but entry {bad[0]!r} is a {type(bad[1]).__name__}")
    return dict(state)


def format_keys(keys, limit: int = 8) -> str:
    """Sorted key names for messages, the first ``limit`` of them."""
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_state_dict(
    expected: collections.abc.Mapping[str, torch.Tensor],
    state: collections.abc.Mapping[str, torch.Tensor],
    what: str,
    optional: frozenset[str] | set[str] = frozenset(),
) -> None:
    """Raise a ``ValueError`` naming every unexpected, missing (not ``optional``) or mis-shaped key of ``state``."""
    unexpected = set(state) - set(expected)
    missing = set(expected) - set(state) - set(optional)
    if unexpected or missing:
        parts = [f"unexpected keys: {format_keys(unexpected)}"] if unexpected else []
        parts += [f"missing keys: {format_keys(missing)}"] if missing else []
        raise ValueError(f"{what}: " + "; ".join(parts))
    wrong = [
        f"{k} {tuple(v.shape)} (model {tuple(expected[k].shape)})"
        for k, v in state.items()
        if v.shape != expected[k].shape
    ]
    if wrong:
        raise ValueError(f"{what}: shape mismatch: {format_keys(wrong)}")


def rebuild_position_ids(module: torch.nn.Module) -> None:
    """Recompute the ``position_ids`` buffers a meta-device build leaves empty (transformers' CLIP embeddings keep
    them non-persistent, so checkpoints do not fill them); any other buffer still on ``meta`` is an error."""
    import torch

    for name, buffer in list(module.named_buffers()):
        if not buffer.is_meta:
            continue
        owner_name, _, attr = name.rpartition(".")
        if attr != "position_ids":
            raise ValueError(f"buffer {name} was not filled by the checkpoint")
        owner = module.get_submodule(owner_name)
        persistent = attr not in owner._non_persistent_buffers_set
        owner.register_buffer(attr, torch.arange(buffer.shape[-1]).expand(buffer.shape), persistent=persistent)


# ---- naming what went wrong when a model folder does not load ----------------------------------------------------

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# Globals torch's weights-only loader accepts (tensor rebuilds and containers); anything else is what it refused.
_TORCH_SAFE_MODULES = ("torch", "collections", "_codecs", "builtins")


def _pickle_globals(data: bytes) -> Iterator[str]:
    """The ``module.name`` globals a pickle refers to, read with :mod:`pickletools` (nothing is executed)."""
    import pickletools

    strings: list[str] = []
    try:
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name == "GLOBAL":
                yield str(arg).replace(" ", ".")
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                yield f"{strings[-2]}.{strings[-1]}"
            elif isinstance(arg, str):
                strings.append(arg)
    except Exception:  # a truncated or corrupt pickle: report what was read so far
        return


def _pickle_payload(path: Path) -> bytes:
    if _is_torch_zip(path):
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            return archive.read(name) if name else b""
    with open(path, "rb") as handle:
        return handle.read(1 << 24)  # the pickle of a legacy file comes first; its globals are near the start


def refused_global(path: str | os.PathLike[str]) -> str | None:
    """The first global of a pickled checkpoint that torch's weights-only loader refuses, or None."""
    try:
        payload = _pickle_payload(Path(path))
    except (OSError, zipfile.BadZipFile, KeyError):
        return None
    return next((g for g in _pickle_globals(payload) if not g.startswith(_TORCH_SAFE_MODULES)), None)


def model_load_error(model: str | os.PathLike[str] | None, error: BaseException) -> Exception | None:
    """A clear, typed error for a model folder that diffusers or transformers failed to load, or None.

    Recognises a truncated or corrupt weights file (named by the library's message) and a pickled file that
    torch's weights-only loader refused (found in ``model`` and named with the refused global), so the user sees
    the file and the reason instead of the library's advice to disable the safety check.
    """
    import re

    from .errors import ModelFilesError

    text = str(error)
    named = re.search(r"checkpoint file for '([^']+)'", text)
    refused = isinstance(error, pickle.UnpicklingError) or "Weights only load failed" in text
    if named and not refused:
        return ModelFilesError(f"{named[1]}: truncated or corrupt weights file; download it again")
    if not refused:
        return None
    candidates = [Path(named[1])] if named else []
    if model is not None and Path(model).is_dir():
        candidates += sorted(p for p in Path(model).rglob("*") if p.suffix in _PICKLE_SUFFIXES and p.is_file())
    for path in candidates:
        name = refused_global(path)
        if name is not None:
            return UnsafeCheckpointError(path, name)
    where = f"{named[1]}: " if named else (f"{model}: " if model else "")
    return ModelFilesError(f"{where}a pickled weights file was refused by the safe loader; nothing was executed")
