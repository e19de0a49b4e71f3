"""The backend switch: which implementation of an op runs, and what ran.

One switch: `kernels.set_backend(name)` or the environment variable VAVAE_KERNELS, with
name in {"auto", "reference", "triton", "cuda"}:
- "reference": the plain PyTorch ops of kernels/reference.py everywhere.
- "triton": the Triton kernels; needs a CUDA tensor, or TRITON_INTERPRET=1 on the CPU.
- "cuda": the CUDA extension (kernels/csrc) for the ops it has (the norm family), Triton for the rest.
- "auto": on a CUDA tensor, per op: inside a torch.compile trace the reference for the ops where inductor's
  fusion measured faster than our kernel at LightningDiT-XL shapes (kernels/compiled_choices.json, written from a
  GPU run by bench/compiled_choices.py), else the CUDA extension where built, else Triton; on the CPU, the
  reference.
An explicitly requested backend that cannot run raises BackendUnavailable (never a silent fallback).

This module knows backends, not ops: `choose` takes an op's name and the backends it implements and returns
the backend to run; kernels.registry.resolve turns that into the op's function. It imports nothing of the op
modules, so every op module (attention included) can import it without a cycle.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Collection, Iterator
from typing import Optional

import torch

from . import _triton, cuda_ext

BACKENDS = ("auto", "reference", "triton", "cuda")
_state = {"name": os.environ.get("VAVAE_KERNELS", "auto"), "auto_as_on_gpu": False}
class _Ran:
    """What ran last for one op (`what`: a backend name, attention's own choice, or None until it runs)."""
    __slots__ = ("what",)

    def __init__(self) -> None:
        self.what: Optional[str] = None


# op name -> _Ran (kernels.describe()["ops"]). Every registered op has its slot from registration on (`declare`) and
# `record` sets an attribute of it: a compiled graph that records what ran (the side effect is replayed on each call)
# then guards on no value and no length of this dict. A plain {op: what} dict made dynamo guard on its length and its
# values, so the first graph traced (the DiT's first block, the VA-VAE's encoder body) was traced again on the next
# step, once the other ops had run.
_ran: dict[str, _Ran] = {}


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend (or attention implementation, or fused module) cannot run here; the
    message says why."""


def set_backend(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"unknown kernels backend {name!r}; choose one of {BACKENDS}")
    _state["name"] = name
    for slot in _ran.values():  # the slots stay (see _ran)
        slot.what = None


def get_backend() -> str:
    return _state["name"]


@contextlib.contextmanager
def active(name: str) -> Iterator[None]:
    """Run a block under backend `name`, then switch back to the backend before it. Unlike set_backend on the way
    out, what ran inside stays on record: a benchmark's environment block then says what it measured."""
    before = _state["name"]
    set_backend(name)
    try:
        yield
    finally:
        _state["name"] = before


@contextlib.contextmanager
def auto_as_on_gpu() -> Iterator[None]:
    """Inside: `auto` chooses for CPU tensors as it would for CUDA ones (ours through the Triton interpreter, which
    must be on, and the reference where compiled_choices.json prefers inductor under compile). For counting tools
    (bench.activation_memory): what a compiled block saves depends on which ops run, not on the device."""
    ok, reason = triton_status(torch.empty(0))
    if not ok:
        raise BackendUnavailable(f"auto as on a GPU needs the Triton kernels on the CPU: {reason}")
    before = _state["auto_as_on_gpu"]
    _state["auto_as_on_gpu"] = True
    try:
        yield
    finally:
        _state["auto_as_on_gpu"] = before


def record(op: str, what: str) -> None:
    """Note what ran for `op` (a backend name, or attention's own choice)."""
    if op not in _ran:  # not registered (declare gives registered ops their slot)
        _ran[op] = _Ran()
    _ran[op].what = what


def declare(op: str) -> None:
    """Give a registered op its slot (kernels.registry.register)."""
    if op not in _ran:
        _ran[op] = _Ran()


def ran() -> dict[str, str]:
    """{op: what ran last} since the last set_backend."""
    return {op: slot.what for op, slot in _ran.items() if slot.what is not None}


def forget(op: str) -> None:
    _ran.pop(op, None)


def triton_status(x: Optional[torch.Tensor] = None) -> tuple[bool, str]:
    """(ok, reason) for running the Triton kernels on tensor x (on any tensor when x is None)."""
    if _triton.triton is None:
        return False, "triton is not installed"
    if x is not None and not _triton.runs_on(x):
        return False, f"Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1 on the CPU); got {x.device}"
    return True, ""


def cuda_status(x: Optional[torch.Tensor] = None) -> tuple[bool, str]:
    """(ok, reason) for running the CUDA extension on tensor x."""
    ok, reason = cuda_ext.status()
    if ok and x is not None and not x.is_cuda:
        return False, f"the CUDA extension needs a CUDA tensor; got {x.device}"
    return ok, reason


def _auto(op: str, backends: Collection[str], compiled_prefers_reference: bool, x: torch.Tensor) -> tuple[str, str]:
    if not x.is_cuda and not _state["auto_as_on_gpu"]:  # never the Triton interpreter: it is a test tool
        return "reference", "reference"
    if compiled_prefers_reference and torch.compiler.is_compiling():
        return "reference", "reference (inductor)"
    if "cuda" in backends and cuda_status(x)[0]:
        return "cuda", "cuda"
    if "triton" in backends and triton_status(x)[0]:
        return "triton", "triton"
    return "reference", "reference"


def choose(op: str, backends: Collection[str], compiled_prefers_reference: bool,
           x: torch.Tensor) -> tuple[str, str]:
    """(backend to run, label for describe()) for `op`, implemented by `backends` besides its reference, on
    tensor x under the active backend. Raises BackendUnavailable for an explicit backend that cannot run it."""
    name = _state["name"]
    if name == "auto":
        return _auto(op, backends, compiled_prefers_reference, x)
    if name == "reference":
        return "reference", "reference"
    if name == "cuda":
        ok, reason = cuda_status(x)
        if not ok:
            raise BackendUnavailable(f"kernels backend 'cuda' requested for {op}: {reason}")
        if "cuda" in backends:
            return "cuda", "cuda"
        name = "triton"  # ops without a CUDA kernel run their Triton kernel (reported as such)
        where = f"kernels backend 'cuda' runs {op} with Triton"
    else:
        where = f"kernels backend 'triton' requested for {op}"
    if "triton" not in backends:
        raise BackendUnavailable(f"{where}: {op} has no Triton implementation")
    ok, reason = triton_status(x)
    if not ok:
        raise BackendUnavailable(f"{where}: {reason}")
    return "triton", "triton"
