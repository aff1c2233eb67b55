"""Reading a checkpoint file without running anything it contains.

A pickle names the classes and functions it needs (GLOBAL) and may ask for some to be called (REDUCE).
Here every name resolves to one of two things:
- a real object from a fixed list of data constructors: tensors and storages (torch's own `weights_only`
  list), numpy arrays, dtypes and scalars, the built-in containers, `argparse.Namespace`;
- otherwise an inert stand-in (`Foreign`), never an import. A stand-in can be stored as a value (VICReg's
  `exclude_bias_and_norm` function in its optimizer's param groups), used as a dict key (old Lightning
  callback states keyed by class), or rebuilt as a plain object the way pickle rebuilds every ordinary
  instance (a new instance whose attributes are set: OmegaConf's `DictConfig` in Lightning
  `hyper_parameters`, mmengine's `HistoryBuffer` in `message_hub`). It stores what it was given and does
  nothing else.
Calling a stand-in (a REDUCE of a foreign function or class) is what running code means in a pickle, so it
refuses the whole file: nothing the file names has run by then, since nothing it names was ever imported.
A few constructors of plain values are exempt (`functools.partial`, `pathlib` paths, `datetime`): calling
their stand-ins returns another inert stand-in.

Torch files (zip, and the legacy format that mmselfsup's `publish_model.py` writes with
`_use_new_zipfile_serialization=False`) go through `torch.load` with this unpickler; TorchScript archives
are refused (they run code when loaded). Plain pickles (Detectron2's `.pkl`) use the same unpickler, and
their numpy arrays become tensors of the same shape (0-d included). Safetensors hold no pickle at all.

`read_file(path, shapes_only=True)` (what `--inspect` uses) reads the same pickles with the same rules but
never the tensors' data, and without importing torch: each tensor is a `TensorInfo` (shape and dtype).
"""
import _compat_pickle
import argparse
import builtins
import collections
import copyreg
import io
import json
import math
import pickle
import struct
import sys
import types
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from core.cli import UserError

SAFETY = "refused for safety, since checkpoints are untrusted files; nothing in it was run"


class ForeignCall(pickle.UnpicklingError):
    """The file asks for a foreign function or class to be called while it loads."""

    def __init__(self, name):
        super().__init__(f"the pickle calls {name}")
        self.name = name


class _ForeignType(type):
    """The type of stand-ins: calling one refuses the file, unless it stands for a constructor of plain values."""

    def __call__(cls, *args, **kwargs):
        if not cls._inert_call:
            raise ForeignCall(cls._foreign_name)
        obj = cls.__new__(cls, *args, **kwargs)
        obj._foreign["kwargs"] = kwargs
        return obj

    def __repr__(cls):
        return f"<foreign {cls._foreign_name}>"


class Foreign(metaclass=_ForeignType):
    """An inert stand-in for an object of a class this suite does not import: it keeps what pickle gives it
    (constructor arguments, state, items) and has no behaviour."""

    _foreign_name = "?"
    _inert_call = False
    dump_patches = False  # read by torch's legacy loader for pickled modules; never write patch files

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.__dict__["_foreign"] = {"args": args, "state": None, "items": {}, "list": []}
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self._foreign["state"] = state

    def __setitem__(self, key, value):
        self._foreign["items"][key] = value

    def append(self, value):
        self._foreign["list"].append(value)

    def extend(self, values):
        self._foreign["list"].extend(values)

    def __repr__(self):
        return f"<{type(self)._foreign_name} read as a placeholder>"


INERT_CONSTRUCTORS = {"functools.partial", "pathlib.Path", "pathlib.PosixPath", "pathlib.WindowsPath",
                      "pathlib.PurePath", "pathlib.PurePosixPath", "pathlib.PureWindowsPath", "datetime.datetime",
                      "datetime.date", "datetime.time", "datetime.timedelta", "datetime.timezone"}


def foreign_name(obj):
    """'module.qualname' when `obj` is a stand-in (class or instance), else None."""
    if isinstance(obj, _ForeignType):
        return obj._foreign_name
    if isinstance(obj, Foreign):
        return type(obj)._foreign_name
    return None


def _plain_globals() -> dict:
    """'module.name' -> the real object, for the constructors of plain (non-torch) data a checkpoint may call."""
    import numpy as np

    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    allowed = {}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[f"{mod}._reconstruct"] = multiarray._reconstruct
        allowed[f"{mod}.scalar"] = multiarray.scalar
    allowed.update({"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype, "argparse.Namespace": argparse.Namespace,
                    "copyreg._reconstructor": copyreg._reconstructor, "_codecs.encode": __import__("_codecs").encode,
                    "collections.defaultdict": collections.defaultdict, "collections.Counter": collections.Counter,
                    "collections.OrderedDict": collections.OrderedDict})
    for name in ("dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "str", "bytes", "bytearray",
                 "bool", "slice", "range", "object"):
        allowed[f"builtins.{name}"] = getattr(builtins, name)
    return allowed


def _allowed_globals() -> dict:
    """'module.name' -> the real object, for the constructors of plain data and tensors a checkpoint may call."""
    import torch

    try:  # torch's own list for weights_only loading: tensors, storages, dtypes, Size, OrderedDict, ...
        from torch._weights_only_unpickler import _get_allowed_globals

        allowed = dict(_get_allowed_globals())
    except ImportError:  # an older or newer torch without it: the rebuild functions torch.save writes
        allowed = {f"torch._utils.{n}": getattr(torch._utils, n) for n in (
            "_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_parameter_with_state")}
        allowed.update({"torch.Size": torch.Size, "torch._tensor._rebuild_from_type_v2":
                        torch._tensor._rebuild_from_type_v2, "collections.OrderedDict": collections.OrderedDict})
        allowed.update({f"torch.{d}": getattr(torch, d) for d in ("float16", "float32", "float64", "bfloat16",
                                                                  "int8", "int16", "int32", "int64", "uint8", "bool")})
    return {**allowed, **_plain_globals()}


class RestrictedUnpickler(pickle.Unpickler):
    """pickle.Unpickler whose globals are real only for plain-data constructors and inert stand-ins otherwise."""

    _cache = {}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if "with torch" not in self._cache:
            self._cache["with torch"] = _allowed_globals()
        self._allowed = self._cache["with torch"]
        self.foreign = {}  # 'module.qualname' -> stand-in class, for this file

    def _stand_in(self, name):
        if name not in self.foreign:
            self.foreign[name] = _ForeignType(name.rsplit(".", 1)[-1], (Foreign,),
                                              {"_foreign_name": name, "_inert_call": name in INERT_CONSTRUCTORS})
        return self.foreign[name]

    def _getattr(self, obj, name):
        """pickle protocol 2 names a method as getattr(class, name) (mmengine's HistoryBuffer statistics):
        allowed on a stand-in, where it gives another stand-in; never on a real object."""
        if isinstance(obj, _ForeignType) and isinstance(name, str):
            return self._stand_in(f"{obj._foreign_name}.{name}")
        raise ForeignCall("builtins.getattr")

    def find_class(self, module, name):
        if (module, name) in _compat_pickle.NAME_MAPPING:  # Python 2 names in protocol 0-2 pickles
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        full = f"{module}.{name}"
        if full in self._allowed:
            return self._allowed[full]
        if full == "builtins.getattr":
            return self._getattr
        return self._stand_in(full)


def _pickle_module(sink: dict):
    """A module-like object for torch.load(pickle_module=...): its Unpickler is the restricted one, and it
    collects the names of the stand-ins it made into `sink`."""
    class Unpickler(RestrictedUnpickler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.foreign = sink

    def load(file, **kwargs):
        return Unpickler(file, **kwargs).load()

    module = types.ModuleType("restricted_pickle")
    module.Unpickler, module.load = Unpickler, load
    return module


@dataclass
class FileContent:
    obj: object  # what the file holds: dicts, lists, tensors, plain values, stand-ins
    container: str  # 'torch zip', 'torch legacy', 'pickle', 'safetensors'
    foreign: list = field(default_factory=list)  # names read as stand-ins


def _numpy_to_torch(obj):
    """numpy arrays of numbers -> tensors of the same shape (0-d stays 0-d), through dicts and lists."""
    import numpy as np
    import torch

    if isinstance(obj, dict):
        return {k: _numpy_to_torch(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_numpy_to_torch(v) for v in obj]
    if isinstance(obj, np.ndarray) and obj.dtype.kind in "biuf":
        return torch.from_numpy(obj.copy())
    return obj


def _unreadable(path, what="checkpoint"):
    return UserError(f"{what} {path} is not a readable checkpoint (truncated, or not a PyTorch, pickle or "
                     "safetensors file)")


def _read_plain_pickle(path: Path) -> FileContent:
    unpickler = RestrictedUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1")
    obj = unpickler.load()
    return FileContent(_numpy_to_torch(obj), "pickle", sorted(unpickler.foreign))


def _refuse_torchscript(path: Path):
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return  # torch.load will judge it
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        raise UserError(f"checkpoint {path} is a TorchScript archive, which runs code when loaded; {SAFETY} "
                        "(save its state_dict with torch.save instead)")


def _read_torch(path: Path) -> FileContent:
    import torch

    foreign = {}
    is_zip = zipfile.is_zipfile(path)
    if is_zip:
        _refuse_torchscript(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Couldn't retrieve source code for container": judged below
            obj = torch.load(path, map_location="cpu", pickle_module=_pickle_module(foreign), weights_only=False,
                             encoding="latin1")
    except RuntimeError as e:
        if not is_zip and "magic number" in str(e):  # a plain pickle under a .pth name
            return _read_plain_pickle(path)
        raise
    return FileContent(obj, "torch zip" if is_zip else "torch legacy", sorted(foreign))


# ---- shapes only ---------------------------------------------------------------------------------------

class TensorInfo:
    """A tensor's shape and dtype, without its data."""

    __slots__ = ("shape", "dtype")

    def __init__(self, shape, dtype):
        self.shape, self.dtype = tuple(shape), dtype

    @property
    def ndim(self):
        return len(self.shape)

    def numel(self):
        return math.prod(self.shape)

    def __repr__(self):
        return f"TensorInfo({self.shape}, {self.dtype})"


def is_tensor(value) -> bool:
    """A torch tensor, or the TensorInfo that stands for one when only shapes were read."""
    torch = sys.modules.get("torch")
    return isinstance(value, TensorInfo) or (torch is not None and isinstance(value, torch.Tensor))


class _StorageType:
    def __init__(self, name):
        self.dtype = name[:-len("Storage")].lower() if name.endswith("Storage") else name

    def __call__(self, *args, **kwargs):  # never called by a well-formed file: a storage comes by persistent id
        raise ForeignCall(f"torch.{self.dtype}Storage")


def _rebuild_tensor(storage, offset, size, *args, **kwargs):
    return TensorInfo(size, storage.dtype)


def _rebuild_parameter(data, *args, **kwargs):
    return data


def _rebuild_from_type(func, new_type, args, state):
    return func(*args)


_SHAPE_GLOBALS = {"torch._utils._rebuild_tensor": _rebuild_tensor, "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
                  "torch._utils._rebuild_parameter": _rebuild_parameter,
                  "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
                  "torch._tensor._rebuild_from_type_v2": _rebuild_from_type, "torch.Size": tuple}


class _ShapeUnpickler(RestrictedUnpickler):
    """The same rules, with torch's tensor rebuilding replaced by TensorInfo (torch is not imported)."""

    def __init__(self, *args, **kwargs):
        pickle.Unpickler.__init__(self, *args, **kwargs)
        if "plain" not in self._cache:
            self._cache["plain"] = _plain_globals()
        self._allowed = self._cache["plain"]
        self.foreign = {}

    def find_class(self, module, name):
        full = f"{module}.{name}"
        if full in _SHAPE_GLOBALS:
            return _SHAPE_GLOBALS[full]
        if module in ("torch", "torch.storage") and name.endswith("Storage"):
            return _StorageType(name)
        if module == "torch" and name.isidentifier() and name.islower() and not name.startswith("_"):
            return f"torch.{name}"  # dtypes, layouts: named, never called
        return super().find_class(module, name)

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid or pid[0] not in ("storage", b"storage"):
            raise pickle.UnpicklingError("unknown persistent id")
        return pid[1]  # the storage type, whose dtype the tensor takes


def _read_torch_shapes(path: Path) -> FileContent:
    if zipfile.is_zipfile(path):
        _refuse_torchscript(path)
        with zipfile.ZipFile(path) as z:
            name = next(n for n in z.namelist() if n.endswith("data.pkl") and n.count("/") == 1)
            unpickler = _ShapeUnpickler(io.BytesIO(z.read(name)), encoding="latin1")
            obj = unpickler.load()
        return FileContent(obj, "torch zip", sorted(unpickler.foreign))
    with open(path, "rb") as f:  # legacy: magic number, protocol, system info, then the object; storages follow
        head = [_ShapeUnpickler(f, encoding="latin1").load() for _ in range(3)]
        if head[0] != 0x1950A86A20F9469CFC6C:
            raise ValueError("not a torch file")
        unpickler = _ShapeUnpickler(f, encoding="latin1")
        obj = unpickler.load()
    return FileContent(obj, "torch legacy", sorted(unpickler.foreign))


def _safetensors_shapes(path: Path) -> FileContent:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    return FileContent({k: TensorInfo(v["shape"], v["dtype"]) for k, v in header.items() if k != "__metadata__"},
                       "safetensors")


def _arrays_to_info(obj):
    import numpy as np

    if isinstance(obj, dict):
        return {k: _arrays_to_info(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_arrays_to_info(v) for v in obj]
    if isinstance(obj, np.ndarray) and obj.dtype.kind in "biuf":
        return TensorInfo(obj.shape, str(obj.dtype))
    return obj


def _read_shapes(path: Path) -> FileContent:
    """Shapes only, or None when this path cannot tell (the full reader then decides)."""
    try:
        if path.suffix == ".safetensors":
            return _safetensors_shapes(path)
        if path.suffix == ".pkl":
            unpickler = _ShapeUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1")
            return FileContent(_arrays_to_info(unpickler.load()), "pickle", sorted(unpickler.foreign))
        return _read_torch_shapes(path)
    except ForeignCall as e:
        raise UserError(f"checkpoint {path} would call {e.name} while loading; {SAFETY}") from None
    except UserError:
        raise
    except Exception:  # noqa: BLE001 - the full reader gives the verdict on anything unusual
        return None


def read_file(path, shapes_only=False) -> FileContent:
    """Load a checkpoint file without executing anything it contains; a UserError when it cannot be read.
    shapes_only: tensors as TensorInfo, their data unread, torch not imported (when the file allows)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist (give a file, or --ckpt random)")
    if path.stat().st_size == 0:
        raise UserError(f"checkpoint {path} is empty")
    if shapes_only:
        content = _read_shapes(path)
        if content is not None:
            return content
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return FileContent(load_file(str(path)), "safetensors")
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"checkpoint {path} is not a readable safetensors file ({e})")
    try:
        return _read_plain_pickle(path) if path.suffix == ".pkl" else _read_torch(path)
    except ForeignCall as e:
        raise UserError(f"checkpoint {path} would call {e.name} while loading; {SAFETY}") from None
    except UserError:
        raise
    except Exception:  # noqa: BLE001 - an untrusted file can break an unpickler in any way
        raise _unreadable(path) from None


def plain(obj, _memo=None, _depth=0):
    """Metadata as plain Python for reading: stand-ins become the dict of what they hold (OmegaConf nodes their
    value), tuples lists; tensors and arrays are left as they are. Shared and cyclic references are converted
    once (a cycle ends in None), so that a crafted file cannot make this walk explode."""
    memo = {} if _memo is None else _memo
    if id(obj) in memo:
        return memo[id(obj)]
    if _depth > 50:
        return None
    if isinstance(obj, (str, bytes, int, float, bool, type(None))) or is_tensor(obj):
        return obj
    memo[id(obj)] = None  # a reference back to an object being converted
    out = _plain(obj, memo, _depth + 1)
    memo[id(obj)] = out
    return out


def _plain(obj, memo, depth):
    name = foreign_name(obj)
    if name is not None and not isinstance(obj, type):
        held = obj._foreign
        state = held["state"]
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            state = {**(state[0] or {}), **state[1]}  # (dict state, slot state)
        if isinstance(state, dict) and "_content" in state:  # OmegaConf DictConfig / ListConfig
            return plain(state["_content"], memo, depth)
        if isinstance(state, dict) and "_val" in state:  # OmegaConf value node
            return plain(state["_val"], memo, depth)
        if held["items"]:
            return {k: plain(v, memo, depth) for k, v in held["items"].items()}
        if held["list"]:
            return [plain(v, memo, depth) for v in held["list"]]
        if isinstance(state, dict):
            return {k: plain(v, memo, depth) for k, v in state.items()}
        return {"args": plain(list(held["args"]), memo, depth)}
    if isinstance(obj, argparse.Namespace):
        return {k: plain(v, memo, depth) for k, v in vars(obj).items()}
    if isinstance(obj, dict):
        return {k: plain(v, memo, depth) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v, memo, depth) for v in obj]
    return obj
