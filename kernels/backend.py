"""Backend selection for kernels.ops.

One switch: `kernels.set_backend(name)` or the environment variable VAVAE_KERNELS, with
name in {"auto", "reference", "triton", "cuda"}. "auto" picks the fastest backend that is
available for the tensor's device; an explicitly requested backend that is unavailable raises.
`kernels.describe()` reports what is actually in use (logged by trainers and benchmarks).
"""
import logging
import os

from . import reference

log = logging.getLogger("kernels")
_BACKENDS = ("auto", "reference", "triton", "cuda")
_state = {"name": os.environ.get("VAVAE_KERNELS", "auto")}
_used = {}  # op name -> backend name actually used last


class BackendUnavailable(RuntimeError):
    pass


def set_backend(name: str):
    if name not in _BACKENDS:
        raise ValueError(f"unknown kernels backend {name!r}; choose one of {_BACKENDS}")
    _state["name"] = name
    _used.clear()


def get_backend() -> str:
    return _state["name"]


def resolve(op: str, x):
    """Return the module implementing `op` for tensor x under the active backend."""
    name = _state["name"]
    if name == "auto":
        name = "reference"
    _used[op] = name
    if name == "reference":
        return reference
    raise BackendUnavailable(f"kernels backend {name!r} is not available in this build")


def describe() -> dict:
    """{'requested': ..., 'ops': {op: backend actually used}}."""
    return {"requested": _state["name"], "ops": dict(_used)}
