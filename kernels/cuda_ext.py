"""Loader of the optional CUDA extension `kernels._vavae_cuda` (sources in kernels/csrc, built by
setup.py or CMakeLists.txt). `status()` says whether it is usable and, if not, why."""
import importlib
from types import ModuleType
from typing import Optional

import torch
from torch import Tensor

_state = {}


def _load() -> Optional[ModuleType]:
    if "mod" not in _state:
        try:
            _state["mod"] = importlib.import_module("kernels._vavae_cuda")
            _state["why"] = ""
        except ImportError as e:
            _state["mod"] = None
            _state["why"] = (f"CUDA extension not built ({e}); build it with `pip install -e .` on a machine "
                             f"with nvcc and a CUDA torch, or `python kernels/build_ext.py`")
    return _state["mod"]


def status() -> tuple[bool, str]:
    """(usable, reason-if-not)."""
    if _load() is None:
        return False, _state["why"]
    if not torch.cuda.is_available():
        return False, "CUDA extension built but no CUDA device is available"
    return True, ""


def _check_layout(*tensors):
    for t in tensors:
        if t is not None and (t.data_ptr() % 16 or (t.dim() == 2 and t.stride(0) % (16 // t.element_size()))):
            raise ValueError("CUDA fused_norm needs 16-byte aligned rows; use the triton backend for this input")


def _stream():
    return torch.cuda.current_stream().cuda_stream


def norm_fwd(x: Tensor, gate: Optional[Tensor], y: Optional[Tensor], weight: Optional[Tensor],
             bias: Optional[Tensor], shift: Optional[Tensor], scale: Optional[Tensor], h: Tensor, out: Tensor,
             mean: Tensor, rstd: Tensor, N: int, eps: float, rms: bool) -> None:
    """The fused norm forward of kernels/csrc/fused_norm.cu into the preallocated h, out, mean, rstd (the contract
    of fused_norm._fwd_triton; rows of x and y are (rows, C) views)."""
    if gate is None and shift is None and scale is None and out.dtype == torch.float32 and x.dtype != out.dtype:
        # a plain norm of 16-bit x with fp32 weight / bias (the qk-norm under autocast) writes fp32: read x as fp32
        # (exact), as the reference's upcast does; the kernel has no 16-bit-in, fp32-out variant
        x = x.float()
    # Weight/bias are per-channel vectors: cast them to x's dtype (tiny) so one kernel covers autocast.
    weight = weight.to(x.dtype) if weight is not None else None
    bias = bias.to(x.dtype) if bias is not None else None
    tv = gate.dtype if gate is not None else scale.dtype if scale is not None else x.dtype
    shift = shift.to(tv) if shift is not None else None
    scale = scale.to(tv) if scale is not None else None
    # out in x's dtype, or in the vectors' (autocast: fp32 x, bf16 shift/scale, out for the next bf16 GEMM)
    if out.dtype not in (x.dtype, tv) or (gate is not None and (h.dtype != x.dtype or y.dtype != tv)):
        raise ValueError(f"CUDA fused_norm: unsupported dtype mix (x {x.dtype}, vectors {tv}, out {out.dtype}); "
                         f"use triton")
    _check_layout(x, gate, y, weight, bias, shift, scale)
    _load().norm_fwd(x, gate, y, weight, bias, shift, scale, h, out, mean, rstd, N, eps, rms, _stream())


def norm_bwd(dout: Tensor, dh: Optional[Tensor], xin: Tensor, gate: Optional[Tensor], y: Optional[Tensor],
             weight: Optional[Tensor], bias: Optional[Tensor], scale: Optional[Tensor], mean: Tensor, rstd: Tensor,
             dx: Tensor, dy: Tensor, pw: Tensor, pb: Tensor, psh: Tensor, psc: Tensor, pg: Tensor, N: int, R: int,
             rms: bool, has_shift: bool) -> None:
    """The fused norm backward into dx, dy and the fp32 partial sums (the contract of fused_norm._bwd_triton)."""
    weight = weight.to(xin.dtype) if weight is not None else None
    bias = bias.to(xin.dtype) if bias is not None else None
    tv = gate.dtype if gate is not None else scale.dtype if scale is not None else xin.dtype
    scale = scale.to(tv) if scale is not None else None
    # dout is read in xin's dtype or in the vectors' (the gradient of an out written in it); dh in xin's
    # (16-byte rows: in the vectors' dtype only where a row is a multiple of 8 elements)
    keep = dout.dtype == xin.dtype or (dout.dtype == tv and xin.shape[-1] % (16 // dout.element_size()) == 0)
    dout = dout if keep else dout.to(xin.dtype)
    dh = dh.to(xin.dtype) if dh is not None else None
    _check_layout(dout, dh, xin, gate, y, weight, bias, scale)
    _load().norm_bwd(dout, dh, xin, gate, y, weight, bias, scale, mean, rstd, dx, dy,
                     pw, pb, psh, psc, pg, N, R, rms, has_shift, _stream())
