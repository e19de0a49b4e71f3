"""SwiGLU `silu(a) * b` from the packed w12 output (a = first half, b = second half), fwd and bwd.

Reference: `kernels.reference.swiglu`. Reads the (rows, 2H) packed tensor once, writes (rows, H);
the backward writes the packed gradient (rows, 2H) in one pass, recomputing silu from a.
"""
import torch
from torch import Tensor

from . import _triton, reference
from ._triton import tl, triton
from .registry import BenchCase, BenchShape, Op, register

BLOCK = 1024


@triton.jit
def _fwd_kernel(X12, sx, OUT, H, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < H
    a = tl.load(X12 + row * sx + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(X12 + row * sx + H + cols, mask=mask, other=0.0).to(tl.float32)
    out = a * tl.sigmoid(a) * b
    tl.store(OUT + row * H + cols, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_kernel(DOUT, X12, sx, DX12, H, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < H
    d = tl.load(DOUT + row * H + cols, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(X12 + row * sx + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(X12 + row * sx + H + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(a)
    da = d * b * s * (1.0 + a * (1.0 - s))
    db = d * a * s
    tl.store(DX12 + row * 2 * H + cols, da.to(DX12.dtype.element_ty), mask=mask)
    tl.store(DX12 + row * 2 * H + H + cols, db.to(DX12.dtype.element_ty), mask=mask)


def _grid(rows, H):
    return (rows, triton.cdiv(H, BLOCK))


def _check(x12):
    if x12.shape[-1] % 2:
        raise ValueError(f"swiglu needs an even last dim (packed [a, b]), got {tuple(x12.shape)}")


@torch.library.custom_op("vavae::swiglu", mutates_args=())
def swiglu_op(x12: Tensor) -> Tensor:
    _check(x12)
    H = x12.shape[-1] // 2
    out = torch.empty((*x12.shape[:-1], H), dtype=x12.dtype, device=x12.device)
    if out.numel():
        x2 = _triton.rows_2d(x12)
        _fwd_kernel[_grid(x2.shape[0], H)](x2, x2.stride(0), out, H, BLOCK=BLOCK, num_warps=4)
    return out


@swiglu_op.register_fake
def _(x12):
    _check(x12)
    return x12.new_empty((*x12.shape[:-1], x12.shape[-1] // 2))


@torch.library.custom_op("vavae::swiglu_bwd", mutates_args=())
def swiglu_bwd(dout: Tensor, x12: Tensor) -> Tensor:
    dx12 = torch.empty(x12.shape, dtype=x12.dtype, device=x12.device)
    H = x12.shape[-1] // 2
    if dx12.numel():
        x2, d2 = _triton.rows_2d(x12), _triton.rows_2d(dout).contiguous()
        _bwd_kernel[_grid(x2.shape[0], H)](d2, x2, x2.stride(0), dx12, H, BLOCK=BLOCK, num_warps=4)
    return dx12


@swiglu_bwd.register_fake
def _(dout, x12):
    return x12.new_empty(x12.shape)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward(ctx, dout):
    (x12,) = ctx.saved_tensors
    return swiglu_bwd(dout, x12)


swiglu_op.register_autograd(_backward, setup_context=_setup)


def swiglu_triton(x12: Tensor) -> Tensor:
    return swiglu_op(x12)


def _bench(s: BenchShape, device: str, dtype: torch.dtype) -> BenchCase:
    x12 = torch.randn(s.B, s.N, 2 * s.F, device=device, dtype=dtype, requires_grad=True)
    RF = s.rows * s.F * dtype.itemsize  # bytes of one half
    return BenchCase([x12], lambda f, t: f(t), 3 * RF, 5 * RF, shape={"rows": s.rows, "F": s.F})


# Under torch.compile, `auto` runs what kernels/compiled_choices.json says (measured: bench/compiled_choices.py)
register(Op(name="swiglu", reference=reference.swiglu, impls={"triton": swiglu_triton}, bench=_bench,
            doc="silu(a)*b from the packed w12 output; bwd writes the packed grad"))
