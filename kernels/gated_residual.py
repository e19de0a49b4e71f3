"""Gated residual `x + gate * y` (gate per sample, broadcast over tokens), forward and backward.

Reference: `kernels.reference.gated_residual`. The backward writes dy = gate * dout and reduces
dgate = sum over tokens of dout * y in fp32 partial sums; dx is dout itself.
"""
import torch
from torch import Tensor

from . import _triton, reference
from ._triton import tl, triton
from .registry import BenchCase, BenchShape, Op, register

ROWS_PER_PROGRAM = 32


@triton.jit
def _fwd_kernel(X, sx, G, sg, Y, sy, OUT, N, C, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    x = tl.load(X + row * sx + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + (row // N) * sg + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + row * sy + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + row * C + cols, (x + g * y).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_kernel(DOUT, G, sg, Y, sy, DY, PG, N, C, R, BLOCK_C: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    g = tl.load(G + b * sg + cols, mask=mask, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    start = b * N + chunk * R
    end = tl.minimum(start + R, b * N + N)
    for row in range(start, end):
        d = tl.load(DOUT + row * C + cols, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(Y + row * sy + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DY + row * C + cols, (g * d).to(DY.dtype.element_ty), mask=mask)
        acc += d * y
    tl.store(PG + (b * tl.num_programs(1) + chunk) * C + cols, acc, mask=mask)


def _check(x, gate, y):
    if x.dim() != 3 or gate.shape != (x.shape[0], x.shape[2]) or y.shape != x.shape:
        raise ValueError(f"gated_residual needs x, y (B, N, C) and gate (B, C); got {tuple(x.shape)}, "
                         f"{tuple(gate.shape)}, {tuple(y.shape)}")


def _out_dtype(x, gate, y):
    return torch.promote_types(torch.promote_types(x.dtype, gate.dtype), y.dtype)


@torch.library.custom_op("vavae::gated_residual", mutates_args=())
def gated_residual_op(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    _check(x, gate, y)
    out = torch.empty(x.shape, dtype=_out_dtype(x, gate, y), device=x.device)
    B, N, C = x.shape
    if out.numel():
        x2, y2, g = _triton.rows_2d(x), _triton.rows_2d(y), _triton.vec_rows(gate)
        BLOCK_C = _triton.block_size(C)
        _fwd_kernel[(B * N,)](x2, x2.stride(0), g, g.stride(0), y2, y2.stride(0), out, N, C, BLOCK_C=BLOCK_C,
                              num_warps=_triton.row_warps(BLOCK_C))
    return out


@gated_residual_op.register_fake
def _(x, gate, y):
    _check(x, gate, y)
    return x.new_empty(x.shape, dtype=_out_dtype(x, gate, y))


@torch.library.custom_op("vavae::gated_residual_bwd", mutates_args=())
def gated_residual_bwd(dout: Tensor, gate: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """(dy, dgate) for dout of shape (B, N, C)."""
    B, N, C = y.shape
    dy = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    if not dy.numel():
        return dy, torch.zeros_like(gate)
    R = max(1, min(ROWS_PER_PROGRAM, N))
    chunks = triton.cdiv(N, R)
    pg = torch.empty((B, chunks, C), dtype=torch.float32, device=y.device)
    d2, y2, g = _triton.rows_2d(dout).contiguous(), _triton.rows_2d(y), _triton.vec_rows(gate)
    BLOCK_C = _triton.block_size(C)
    _bwd_kernel[(B, chunks)](d2, g, g.stride(0), y2, y2.stride(0), dy, pg, N, C, R, BLOCK_C=BLOCK_C,
                             num_warps=_triton.row_warps(BLOCK_C))
    return dy, pg.sum(1).to(gate.dtype)


@gated_residual_bwd.register_fake
def _(dout, gate, y):
    return y.new_empty(y.shape), gate.new_empty(gate.shape)


def _setup(ctx, inputs, output):
    x, gate, y = inputs
    ctx.save_for_backward(gate, y)
    ctx.x_dtype = x.dtype


def _backward(ctx, dout):
    gate, y = ctx.saved_tensors
    dy, dgate = gated_residual_bwd(dout, gate, y)
    return dout.to(ctx.x_dtype), dgate, dy


gated_residual_op.register_autograd(_backward, setup_context=_setup)


def gated_residual_triton(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    return gated_residual_op(x, gate, y)


def _bench(s: BenchShape, device: str, dtype: torch.dtype) -> BenchCase:
    r = lambda *shape: torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)  # noqa: E731
    RC = s.rows * s.C * dtype.itemsize
    # the gate is a strided chunk of the adaLN output, as in the model
    return BenchCase([r(s.B, s.N, s.C), r(s.B, s.N, s.C), r(s.B, 6 * s.C)],
                     lambda f, x, y, m: f(x, m[:, 2 * s.C:3 * s.C], y), 3 * RC, 3 * RC,
                     shape={"B": s.B, "N": s.N, "C": s.C})


# Under torch.compile, `auto` runs what kernels/compiled_choices.json says (measured: bench/compiled_choices.py)
register(Op(name="gated_residual", reference=reference.gated_residual, impls={"triton": gated_residual_triton},
            bench=_bench, doc="x + gate*y (gate per sample); bwd writes dy and reduces dgate"))
