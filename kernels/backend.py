"""Backend selection for kernels.ops.

One switch: `kernels.set_backend(name)` or the environment variable VAVAE_KERNELS, with
name in {"auto", "reference", "triton", "cuda"}:
- "reference": the plain PyTorch ops of kernels/reference.py everywhere.
- "triton": the Triton kernels (kernels/*.py); needs a CUDA tensor, or TRITON_INTERPRET=1 on the CPU.
- "cuda": the CUDA extension (kernels/csrc) for the ops it has (the norm family), Triton for the rest.
- "auto": "cuda" where the extension is built and the tensor is on CUDA, else "triton" for CUDA tensors,
  else "reference".
An explicitly requested backend that cannot run raises BackendUnavailable (never a silent fallback).
`kernels.describe()` reports what actually ran per op (and which attention implementation).
"""
import logging
import os

from . import reference

log = logging.getLogger("kernels")
_BACKENDS = ("auto", "reference", "triton", "cuda")
CUDA_OPS = ("rms_norm", "layer_norm", "norm_modulate", "gated_residual_norm_modulate")
_state = {"name": os.environ.get("VAVAE_KERNELS", "auto")}
_used = {}  # op name -> backend name actually used last
_impls = {}


class BackendUnavailable(RuntimeError):
    pass


def set_backend(name: str):
    if name not in _BACKENDS:
        raise ValueError(f"unknown kernels backend {name!r}; choose one of {_BACKENDS}")
    _state["name"] = name
    _used.clear()


def get_backend() -> str:
    return _state["name"]


def record(op: str, what: str):
    _used[op] = what


def triton_status(x=None):
    """(ok, reason) for running the Triton kernels on tensor x."""
    from . import _triton
    if _triton.triton is None:
        return False, "triton is not installed"
    if x is not None and not _triton.runs_on(x):
        return False, f"Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1 on the CPU); got {x.device}"
    return True, ""


def cuda_status(x=None):
    from . import cuda_ext
    ok, reason = cuda_ext.status()
    if ok and x is not None and not x.is_cuda:
        return False, f"the CUDA extension needs a CUDA tensor; got {x.device}"
    return ok, reason


def _impl(name):
    if name not in _impls:
        from .fused import Fused
        _impls[name] = Fused(name)
    return _impls[name]


def resolve(op: str, x):
    """Return the object implementing `op` for tensor x under the active backend."""
    name = _state["name"]
    if name == "auto":
        if x.is_cuda and op in CUDA_OPS and cuda_status(x)[0]:
            name = "cuda"
        elif x.is_cuda and triton_status(x)[0]:
            name = "triton"
        else:
            name = "reference"
    elif name == "triton":
        ok, reason = triton_status(x)
        if not ok:
            raise BackendUnavailable(f"kernels backend 'triton' requested for {op}: {reason}")
    elif name == "cuda":
        ok, reason = cuda_status(x)
        if not ok:
            raise BackendUnavailable(f"kernels backend 'cuda' requested for {op}: {reason}")
        if op not in CUDA_OPS:  # ops without a CUDA kernel run their Triton kernel (reported as such)
            ok, reason = triton_status(x)
            if not ok:
                raise BackendUnavailable(f"kernels backend 'cuda' runs {op} with Triton: {reason}")
            name = "triton"
    if op != "attention":  # attention records the implementation it picks itself
        _used[op] = name
    if name == "reference":
        if op == "attention":
            _used[op] = "reference-sdpa"
        return reference
    return _impl(name)


def describe() -> dict:
    """{'requested': ..., 'ops': {op: backend actually used}, 'cuda_ext': ..., 'triton': ...}."""
    from . import attention, cuda_ext
    from ._triton import triton
    return {"requested": _state["name"], "ops": dict(_used),
            "cuda_ext": cuda_ext.status()[1] or "built",
            "triton": triton.__version__ if triton is not None else "not installed",
            "attention_installed": {k: ("installed" if v else "not installed")
                                    for k, v in attention.installed().items()},
            "attention_measured": attention.measurements()}
