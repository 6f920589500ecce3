"""Read a PyTorch zip checkpoint (e.g. a Lightning ``.ckpt``) without running any code it names.

A Lightning checkpoint is a pickle: besides tensors it holds the run's OmegaConf ``DictConfig``, a pickled
``GPT2TokenizerFast`` and optimizer/loop states. ``torch.load(weights_only=True)`` refuses such files and
``torch.load(weights_only=False)`` executes whatever the pickle names. :func:`load_checkpoint` reads the zip itself
and unpickles ``data.pkl`` with :class:`RestrictedUnpickler`:

* **allowed by name** (and replaced by our own code, never the pickled target): tensor and parameter rebuilders
  (``torch._utils._rebuild_tensor_v2`` / ``_rebuild_parameter`` / ``torch._tensor._rebuild_from_type_v2``),
  storage types (``torch.FloatStorage`` ...), ``collections.OrderedDict`` / ``defaultdict`` (a plain dict),
  builtin containers and scalars (``dict``, ``list``, ``tuple``, ``set``, ``frozenset``, ``int``/``long``,
  ``float``, ``bool``, ``str``, ``bytes``, ``bytearray``, ``complex``, ``slice``) and ``_codecs.encode`` restricted
  to latin-1 (protocol-2 bytes);
* **every other global** becomes an inert :class:`Placeholder` subclass carrying the dotted name. Placeholders can be
  *instantiated without a constructor* (pickle's NEWOBJ = ``cls.__new__``) and *given state* (BUILD is stored, not
  applied), which is how an OmegaConf node or a tokenizer object is rebuilt as inert data; **calling one** (pickle's
  REDUCE, i.e. a ``__reduce__`` target such as ``os.system``) raises :class:`UnsafeCheckpointError` before anything
  runs.

Nothing is imported from the module names in the pickle. :func:`to_plain` turns DictConfig/ListConfig/value nodes
into plain dicts/lists/values (interpolations stay strings such as ``"${eval:...}"``).
"""

from __future__ import annotations

import collections
import io
import pickle
import types
import zipfile
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from duo_plugin.errors import UserError

__all__ = ["UnsafeCheckpointError", "Placeholder", "RestrictedUnpickler", "load_checkpoint", "to_plain",
           "placeholder_name", "STORAGE_DTYPES", "LazyTensor", "materialize"]


class UnsafeCheckpointError(UserError):
    """The checkpoint asks to call something that is not on the allow-list (or is malformed)."""


class _PlaceholderMeta(type):
    def __call__(cls, *args, **kwargs):  # pickle REDUCE: calling the global = running code it names
        raise UnsafeCheckpointError(
            f"refusing to call {cls._duo_name} while unpickling: the checkpoint asks to run code that is not on the "
            "allow-list of tensor/container rebuilders (a malicious or unsupported file); nothing was executed")

    def __repr__(cls) -> str:
        return f"<placeholder class {cls._duo_name}>"


class Placeholder(metaclass=_PlaceholderMeta):
    """Inert stand-in for a pickled instance of a class we do not load. ``_duo_name``: the dotted class name,
    ``args``: NEWOBJ arguments, ``state``: the BUILD state (stored, never applied)."""

    _duo_name = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        object.__setattr__(obj, "args", args)
        object.__setattr__(obj, "state", None)
        return obj

    def __setstate__(self, state):
        object.__setattr__(self, "state", state)

    def __setattr__(self, name, value):  # BUILD with a (state, slotstate) pair sets attributes: keep them inert
        d = self.__dict__.setdefault("attrs", {})
        d[name] = value

    def __repr__(self) -> str:
        return f"<placeholder {self._duo_name}>"


def placeholder_name(obj: Any) -> Optional[str]:
    """The dotted class name of a :class:`Placeholder` instance (None for anything else)."""
    return type(obj)._duo_name if isinstance(obj, Placeholder) else None


#: storage class name (``torch.<Name>``) -> dtype of its elements
STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "UntypedStorage": torch.uint8, "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128,
}


class _StorageType:
    def __init__(self, name: str):
        self.name, self.dtype = name, STORAGE_DTYPES[name]


class _Storage:
    """A storage record: read (once) on first use, as a flat tensor of its dtype shared by every view of it."""

    def __init__(self, read, dtype: torch.dtype, nbytes: Optional[int]):
        self._read, self.dtype, self.nbytes = read, dtype, nbytes
        self._flat: Optional[torch.Tensor] = None

    @property
    def flat(self) -> torch.Tensor:
        if self._flat is None:
            raw = self._read(self.nbytes)
            itemsize = torch.empty((), dtype=self.dtype).element_size()
            n = len(raw) // itemsize
            self._flat = (torch.frombuffer(bytearray(raw), dtype=self.dtype, count=n) if n
                          else torch.empty(0, dtype=self.dtype))
            self._read = None
        return self._flat


class LazyTensor:
    """A tensor of the checkpoint whose bytes are read only by :meth:`load` (so a converter reading the weights
    never holds the optimizer moments in memory). ``shape`` / ``dtype`` are known without reading."""

    def __init__(self, storage: _Storage, offset: int, size, stride):
        self._storage, self.offset = storage, int(offset)
        self.shape, self.stride = torch.Size(int(s) for s in size), tuple(int(s) for s in stride)
        self.dtype = storage.dtype

    def load(self) -> torch.Tensor:
        """The tensor (a copy owning its memory, contiguous)."""
        flat = self._storage.flat
        try:
            t = flat.as_strided(tuple(self.shape), self.stride, self.offset).clone()
        except RuntimeError as e:
            raise UnsafeCheckpointError(
                f"malformed checkpoint: tensor view out of its storage's bounds ({e})") from None
        return t

    def __repr__(self) -> str:
        return f"LazyTensor(shape={tuple(self.shape)}, dtype={self.dtype})"


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    if not isinstance(storage, _Storage):
        raise UnsafeCheckpointError("malformed checkpoint: a tensor is rebuilt from something that is not a storage")
    if not all(isinstance(v, int) for v in (storage_offset, *size, *stride)):
        raise UnsafeCheckpointError("malformed checkpoint: non-integer tensor size/stride/offset")
    return LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *rest):
    if not isinstance(data, LazyTensor):
        raise UnsafeCheckpointError("malformed checkpoint: a parameter wraps something that is not a tensor")
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    # func went through find_class: a copy of one of ours, or a placeholder
    if getattr(func, "__code__", None) not in (_rebuild_tensor.__code__, _rebuild_parameter.__code__):
        raise UnsafeCheckpointError(f"refusing to rebuild a tensor subclass with {func!r}: only plain tensors and "
                                    "parameters are read from a checkpoint")
    return func(*args)


def _codecs_encode(text, encoding="utf-8", errors="strict"):
    if not isinstance(text, str) or str(encoding).lower().replace("_", "-") not in ("latin1", "latin-1"):
        raise UnsafeCheckpointError(f"refusing _codecs.encode with encoding {encoding!r} (only latin-1 bytes are "
                                    "read from a checkpoint)")
    return text.encode("latin-1")


def _plain_defaultdict(*args):
    return {}


_SAFE_BUILTINS = {
    "dict": dict, "list": list, "tuple": tuple, "set": set, "frozenset": frozenset, "int": int, "long": int,
    "float": float, "bool": bool, "str": str, "unicode": str, "bytes": bytes, "bytearray": bytearray,
    "complex": complex, "slice": slice, "object": object,
}

_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "defaultdict"): _plain_defaultdict,
    ("_codecs", "encode"): _codecs_encode,
}

# ``object`` is only safe as a value (``object.__new__`` via NEWOBJ is harmless); any builtin listed here is a type
# whose call with pickled arguments cannot run code beyond building the container / scalar.


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` resolving globals through the allow-list above; storages come from ``read_record``."""

    def __init__(self, file, read_record=None):
        super().__init__(file)
        self._read_record = read_record
        self._storages: Dict[str, _Storage] = {}
        self._placeholders: Dict[str, type] = {}

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            f = _ALLOWED[(module, name)]
            if isinstance(f, types.FunctionType):  # a private copy: a pickled BUILD cannot alter our functions
                f = types.FunctionType(f.__code__, f.__globals__, f.__name__, f.__defaults__, f.__closure__)
            return f
        if module in ("builtins", "__builtin__") and name in _SAFE_BUILTINS:
            return _SAFE_BUILTINS[name]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        dotted = f"{module}.{name}"
        cls = self._placeholders.get(dotted)
        if cls is None:
            cls = _PlaceholderMeta(name, (Placeholder,), {"_duo_name": dotted, "__module__": "duo_plugin.placeholder"})
            self._placeholders[dotted] = cls
        return cls

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UnsafeCheckpointError(f"malformed checkpoint: unsupported persistent id {str(pid)[:80]!r}")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, _StorageType) or not isinstance(key, str):
            raise UnsafeCheckpointError("malformed checkpoint: storage record with an unknown storage type")
        if self._read_record is None:
            raise UnsafeCheckpointError("this pickle refers to tensor storages but no archive was given")
        if key not in self._storages:
            itemsize = torch.empty((), dtype=stype.dtype).element_size()
            nbytes = int(numel) * itemsize if stype.name != "UntypedStorage" else None
            read = self._read_record
            self._storages[key] = _Storage(lambda n, _k=key: read(_k, n), stype.dtype, nbytes)
        return self._storages[key]


def load_checkpoint(path) -> Any:
    """Unpickle a zip-format PyTorch checkpoint (``torch.save`` since 1.6; Lightning ``.ckpt``) safely.

    Tensors come back as :class:`LazyTensor` (``.load()`` reads the bytes; :func:`materialize` does it for a whole
    structure); allowed containers as themselves; everything else as inert :class:`Placeholder` objects.
    Raises :class:`UnsafeCheckpointError` (a :class:`UserError`) when the pickle asks
    to call anything not allowed, and :class:`UserError` for a file that is not such a checkpoint.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    if not zipfile.is_zipfile(p):
        raise UserError(f"{p} is not a zip-format PyTorch checkpoint (legacy torch.save files are not supported; "
                        "re-save it with a current torch)")
    with zipfile.ZipFile(p) as zf:
        names = zf.namelist()
        pkls = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise UserError(f"{p}: expected one <prefix>/data.pkl in the archive, found {len(pkls)}")
        prefix = pkls[0][: -len("data.pkl")]
        if f"{prefix}byteorder" in names and zf.read(f"{prefix}byteorder").strip() not in (b"little", b""):
            raise UserError(f"{p}: big-endian checkpoints are not supported")
        data = zf.read(pkls[0])

    def read_record(key: str, expected: Optional[int]) -> bytes:
        name = f"{prefix}data/{key}"
        with zipfile.ZipFile(p) as z:
            try:
                info = z.getinfo(name)
            except KeyError:
                raise UnsafeCheckpointError(f"{p}: storage record {name} is missing (truncated file?)") from None
            if expected is not None and info.file_size != expected:
                raise UnsafeCheckpointError(f"{p}: storage {name} holds {info.file_size} bytes, the pickle says "
                                            f"{expected}")
            return z.read(info)

    try:
        return RestrictedUnpickler(io.BytesIO(data), read_record).load()
    except UserError:
        raise
    except (pickle.UnpicklingError, EOFError, TypeError, AttributeError, IndexError, KeyError, ValueError) as e:
        raise UserError(f"{p}: cannot read the pickled checkpoint ({type(e).__name__}: {e})") from None


def materialize(obj: Any) -> Any:
    """Replace every :class:`LazyTensor` inside dicts / lists / tuples by its tensor (reads the bytes)."""
    if isinstance(obj, LazyTensor):
        return obj.load()
    if isinstance(obj, dict):
        return type(obj)((k, materialize(v)) for k, v in obj.items()) if isinstance(obj, collections.OrderedDict) \
            else {k: materialize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(materialize(v) for v in obj)
    return obj


_VALUE_NODES = ("AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode", "EnumNode", "PathNode",
                "BytesNode", "ValueNode")


def to_plain(obj: Any, _depth: int = 0) -> Any:
    """OmegaConf containers / nodes (as placeholders) -> plain dicts, lists and values, recursively; other
    placeholders -> ``{"__class__": dotted name}``; tensors and plain values unchanged."""
    if _depth > 200:
        raise UserError("checkpoint config nests deeper than 200 levels")
    name = placeholder_name(obj)
    if name is not None:
        state = obj.state if isinstance(obj.state, dict) else {}
        short = name.rsplit(".", 1)[-1]
        if name.startswith("omegaconf.") and short in ("DictConfig", "ListConfig"):
            content = state.get("_content")
            if isinstance(content, (dict, list, tuple)):
                return to_plain(content, _depth + 1)
            return content  # None, "???" or an interpolation string
        if name.startswith("omegaconf.") and short in _VALUE_NODES:
            return to_plain(state.get("_val"), _depth + 1)
        return {"__class__": name}
    if isinstance(obj, dict):
        return {k: to_plain(v, _depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v, _depth + 1) for v in obj]
    return obj
