"""Backend selection for kernels.ops.

One switch: `kernels.set_backend(name)` or the environment variable VAVAE_KERNELS, with
name in {"auto", "reference", "triton", "cuda"}:
- "reference": the plain PyTorch ops of kernels/reference.py everywhere.
- "triton": the Triton kernels (kernels/*.py); needs a CUDA tensor, or TRITON_INTERPRET=1 on the CPU.
- "cuda": the CUDA extension (kernels/csrc) for the ops it has (the norm family), Triton for the rest.
- "auto": on a CUDA tensor, the fastest measured choice per op: inside a torch.compile trace the reference
  op for the ops in COMPILED_PREFERS_REFERENCE (inductor fuses it with its neighbours, and measured faster
  than our kernel at LightningDiT-XL shapes), else the CUDA extension where built, else Triton;
  on the CPU, the reference.
An explicitly requested backend that cannot run raises BackendUnavailable (never a silent fallback).
`resolve(op, x)` returns the function that implements `op` for x; `kernels.describe()` reports what ran.
Each op module exports its implementations as `IMPLS = {backend: {op: function}}`.
"""
import logging
import os

import torch

from . import reference

log = logging.getLogger("kernels")
_BACKENDS = ("auto", "reference", "triton", "cuda")
OPS = ("rms_norm", "layer_norm", "norm_modulate", "gated_residual_norm_modulate", "gated_residual", "swiglu",
       "rope_qk", "attention")
# Under torch.compile on a GPU, `auto` traces the reference for these ops: inductor's fusion of the reference
# was faster than our kernels fwd+bwd at XL/1 batch-256 shapes on an H200 (bench/results/2026-11-26_h200.md:
# rms_norm 1192 vs 766 GB/s, norm_modulate 621 vs 569, gated_residual_norm_modulate 1675 vs 1221,
# gated_residual 1888 vs 991, rope_qk 551 vs 358); swiglu stays on Triton (2435 vs 2019).
COMPILED_PREFERS_REFERENCE = frozenset({"rms_norm", "layer_norm", "norm_modulate", "gated_residual_norm_modulate",
                                        "gated_residual", "rope_qk"})
_state = {"name": os.environ.get("VAVAE_KERNELS", "auto")}
_used = {}  # op name -> what actually ran last
_table = {}


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


def implementations():
    """{op: {backend: function}} gathered from the op modules' IMPLS (attention: its own chooser)."""
    if not _table:
        from . import attention, fused_norm, gated_residual, rope, swiglu
        table = {op: {"reference": getattr(reference, op)} for op in OPS}
        for module in (fused_norm, gated_residual, rope, swiglu):
            for backend, fns in module.IMPLS.items():
                for op, fn in fns.items():
                    table[op][backend] = fn
        table["attention"]["triton"] = table["attention"]["cuda"] = attention.attention
        _table.update(table)
    return _table


def _auto(op, x):
    if not x.is_cuda:
        return "reference", "reference"
    if op in COMPILED_PREFERS_REFERENCE and torch.compiler.is_compiling():
        return "reference", "reference (inductor)"
    if "cuda" in implementations()[op] and op != "attention" and cuda_status(x)[0]:
        return "cuda", "cuda"
    if triton_status(x)[0]:
        return "triton", "triton"
    return "reference", "reference"


def resolve(op: str, x):
    """The function implementing `op` for tensor x under the active backend."""
    name = label = _state["name"]
    impls = implementations()[op]
    if name == "auto":
        name, label = _auto(op, x)
    elif name == "triton":
        ok, reason = triton_status(x)
        if not ok:
            raise BackendUnavailable(f"kernels backend 'triton' requested for {op}: {reason}")
    elif name == "cuda":
        ok, reason = cuda_status(x)
        if not ok:
            raise BackendUnavailable(f"kernels backend 'cuda' requested for {op}: {reason}")
        if "cuda" not in impls:  # ops without a CUDA kernel run their Triton kernel (reported as such)
            ok, reason = triton_status(x)
            if not ok:
                raise BackendUnavailable(f"kernels backend 'cuda' runs {op} with Triton: {reason}")
            name = label = "triton"
    if op == "attention":  # the fused attention records the implementation it picks itself
        if name == "reference":
            _used[op] = "reference-sdpa"
    else:
        _used[op] = label
    return impls[name]


def prime_attention(shape, dtype, device, training, agree=None):
    """Time the attention candidates for q/k/v of `shape` (B, H, N, D) and `dtype` now, outside any trace, so that
    torch.compile'd callers use the measured choice (kernels/attention.py; agree: see attention.prime). Returns
    the choice, or None where the active backend has none to make (the reference is plain SDPA; the CPU has one
    kernel)."""
    from . import attention
    name = _state["name"]
    if torch.device(device).type != "cuda" or name == "reference" or (name == "auto" and not triton_status()[0]):
        return None
    choice = attention.prime(shape, dtype, device, training, agree)
    if choice is not None:
        log.info("attention for %s %s (%s): %s; timed %s", tuple(shape), str(dtype).replace("torch.", ""),
                 "training" if training else "inference", choice, attention.measurements())
    return choice


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
