"""SwiGLU `silu(a) * b` from the packed w12 output (a = first half, b = second half), plus w12's bias, fwd and bwd.

Reference: `kernels.reference.swiglu`. Reads the (rows, 2H) packed tensor once, writes (rows, H); the backward writes
the packed gradient (rows, 2H) in one pass, recomputing silu from a.

The bias: the model runs the w12 Linear without its bias and hands it here (modeling.lightningdit.SwiGLUFFN), so
that the bias gradient -- the sum over rows of the packed gradient -- is taken in the backward's own pass (each
program's partial sums over its rows, then one small reduction by torch) instead of the Linear's backward reading the
(rows, 2H) gradient again: 805 MB a block at LightningDiT-XL/1 batch 256, the profile's `triton_red_fused_sum_view`
(5.4 ms a step on the H200, 2026-12-04). The forward adds the bias in registers (in fp32, before the activation: the
reference's `swiglu(x12 + bias)`).
"""
from typing import Optional

import torch
from torch import Tensor

from . import _triton, reference
from ._triton import tl, triton
from .registry import BenchCase, BenchShape, Op, register

BLOCK = 1024  # the forward's columns per program (one row per program)
# The backward's tiles, timed by the autotuner on the first call per width on a GPU: (rows per program, rows per
# iteration, columns, warps). With the bias each program sums its rows' gradients into one fp32 row of partials, so a
# program owns many rows (at 64 the partials add 1/32 of the gradient's bytes, written and read once); compiled for
# sm_90 (bench.sm90_check) these hold 16 elements a thread per tensor in ~96-130 registers, no spills, ~21-23 SASS
# instructions per element (4-8 rows x 1024 at 4 warps took 230: two programs an SM). Without the bias the one-row
# tile (the only one before the bias moved here: the copy bandwidth on the H200, 2026-12-04) is timed too.
BWD_TILES = ((64, 2, 1024, 4), (128, 2, 1024, 4), (128, 4, 1024, 8), (64, 1, 2048, 8))
BWD_TILES_NO_BIAS = ((1, 1, 1024, 4),)
INTERPRETER_TILE = (16, 8, 256, 4)  # two iterations a program, a masked last column tile at the tests' widths
MIN_ROWS_PER_PROGRAM = min(t[0] for t in BWD_TILES)  # sizes the partial sums for any tile the tuner may run


@triton.jit
def _fwd_kernel(X12, sx, BIAS, OUT, H, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < H
    a = tl.load(X12 + row * sx + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(X12 + row * sx + H + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        a += tl.load(BIAS + cols, mask=mask, other=0.0).to(tl.float32)
        b += tl.load(BIAS + H + cols, mask=mask, other=0.0).to(tl.float32)
    out = a * tl.sigmoid(a) * b
    tl.store(OUT + row * H + cols, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_kernel(DOUT, X12, sx, BIAS, DX12, PART, rows, H, HAS_BIAS: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_r = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < H
    if HAS_BIAS:
        ba = tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32)
        bb = tl.load(BIAS + H + cols, mask=cmask, other=0.0).to(tl.float32)
        acc_a = tl.zeros([BLOCK_C], dtype=tl.float32)
        acc_b = tl.zeros([BLOCK_C], dtype=tl.float32)
    first = pid_r.to(tl.int64) * ROWS_PER_PROGRAM
    for i in range(0, ROWS_PER_PROGRAM, BLOCK_R):
        r = first + i + tl.arange(0, BLOCK_R)
        mask = (r < rows)[:, None] & cmask[None, :]
        d = tl.load(DOUT + r[:, None] * H + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        a = tl.load(X12 + r[:, None] * sx + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        b = tl.load(X12 + r[:, None] * sx + H + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            a += ba[None, :]
            b += bb[None, :]
        s = tl.sigmoid(a)
        da = d * b * s * (1.0 + a * (1.0 - s))
        db = d * a * s
        dst = DX12 + r[:, None] * 2 * H + cols[None, :]
        tl.store(dst, da.to(DX12.dtype.element_ty), mask=mask)
        tl.store(dst + H, db.to(DX12.dtype.element_ty), mask=mask)
        if HAS_BIAS:  # masked rows contribute 0 (d is 0 there)
            acc_a += tl.sum(da, axis=0)
            acc_b += tl.sum(db, axis=0)
    if HAS_BIAS:  # this program's partial sums of the bias gradient (one row; torch sums the rows)
        tl.store(PART + pid_r.to(tl.int64) * 2 * H + cols, acc_a, mask=cmask)
        tl.store(PART + pid_r.to(tl.int64) * 2 * H + H + cols, acc_b, mask=cmask)


def _bwd_configs() -> list:
    return [triton.Config({"ROWS_PER_PROGRAM": p, "BLOCK_R": r, "BLOCK_C": c}, num_warps=w)
            for p, r, c, w in BWD_TILES + BWD_TILES_NO_BIAS]


def _prune_bwd(configs, named_args, **kwargs):
    """With the bias only the many-rows tiles (their partial sums are sized for MIN_ROWS_PER_PROGRAM)."""
    return [c for c in configs if not kwargs["HAS_BIAS"] or c.kwargs["ROWS_PER_PROGRAM"] >= MIN_ROWS_PER_PROGRAM]


# every launch writes each element of d x12 and each partial-sum row its grid has: timed on the real buffers
_bwd_tuned = triton.autotune(configs=_bwd_configs(), key=["H", "HAS_BIAS"],
                             prune_configs_by={"early_config_prune": _prune_bwd})(_bwd_kernel)
TUNED = _triton.TunedKernels(bwd=_bwd_tuned)


def autotuned() -> dict[str, dict[str, dict]]:
    """What the backward's autotuner did in this process (per key: the tile picked, every candidate's ms)."""
    return TUNED.report()


def _check(x12: Tensor, bias: Optional[Tensor]) -> None:
    if x12.shape[-1] % 2:
        raise ValueError(f"swiglu needs an even last dim (packed [a, b]), got {tuple(x12.shape)}")
    if bias is not None and tuple(bias.shape) != (x12.shape[-1],):
        raise ValueError(f"swiglu: bias must have shape ({x12.shape[-1]},) (w12's), got {tuple(bias.shape)}")


@torch.library.custom_op("vavae::swiglu", mutates_args=())
def swiglu_op(x12: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    _check(x12, bias)
    H = x12.shape[-1] // 2
    out = torch.empty((*x12.shape[:-1], H), dtype=x12.dtype, device=x12.device)
    if out.numel():
        x2 = _triton.rows_2d(x12)
        _fwd_kernel[(x2.shape[0], triton.cdiv(H, BLOCK))](x2, x2.stride(0), bias if bias is not None else x2, out, H,
                                                          HAS_BIAS=bias is not None, BLOCK=BLOCK, num_warps=4)
    return out


@swiglu_op.register_fake
def _(x12, bias=None):
    _check(x12, bias)
    return x12.new_empty((*x12.shape[:-1], x12.shape[-1] // 2))


def swiglu_backward(dout: Tensor, x12: Tensor, bias: Optional[Tensor],
                    tile: Optional[tuple[int, int, int, int]] = None) -> tuple[Tensor, Tensor]:
    """(d x12, d bias) -- d bias empty without a bias. Autotuned on a GPU, INTERPRETER_TILE under the interpreter, or
    `tile` (one of BWD_TILES: GPU tests compare them all)."""
    dx12 = torch.empty(x12.shape, dtype=x12.dtype, device=x12.device)
    H = x12.shape[-1] // 2
    rows = dx12.numel() // max(2 * H, 1)
    has_bias = bias is not None
    part = dx12.new_empty((triton.cdiv(rows, MIN_ROWS_PER_PROGRAM) if has_bias else 0, 2 * H), dtype=torch.float32)
    used = 0
    if dx12.numel():
        x2, d2 = _triton.rows_2d(x12), _triton.rows_2d(dout).contiguous()
        args = (d2, x2, x2.stride(0), bias if has_bias else x2, dx12, part if has_bias else x2, rows, H)
        if tile is None and _triton.interpreting():
            tile = INTERPRETER_TILE
        if tile is not None:
            p, r, c, w = tile
            if has_bias and triton.cdiv(rows, p) > part.shape[0]:
                part = dx12.new_empty((triton.cdiv(rows, p), 2 * H), dtype=torch.float32)
                args = (*args[:5], part, rows, H)
            _bwd_kernel[(triton.cdiv(rows, p), triton.cdiv(H, c))](*args, HAS_BIAS=has_bias, ROWS_PER_PROGRAM=p,
                                                                   BLOCK_R=r, BLOCK_C=c, num_warps=w)
        else:
            tile = TUNED.run("bwd", lambda meta: (triton.cdiv(rows, meta["ROWS_PER_PROGRAM"]),
                                                 triton.cdiv(H, meta["BLOCK_C"])), args, dict(HAS_BIAS=has_bias))
            p = tile.kwargs["ROWS_PER_PROGRAM"]
        used = triton.cdiv(rows, p)
    if not has_bias:
        return dx12, dx12.new_empty(0)
    # the one small reduction of the per-program partial sums, in fp32, then the bias's dtype
    dbias = part[:used].sum(0) if used else part.new_zeros(2 * H)
    return dx12, dbias.to(bias.dtype)


@torch.library.custom_op("vavae::swiglu_bwd", mutates_args=())
def swiglu_bwd(dout: Tensor, x12: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    return swiglu_backward(dout, x12, bias)


@swiglu_bwd.register_fake
def _(dout, x12, bias):
    return x12.new_empty(x12.shape), (bias.new_empty(bias.shape) if bias is not None else x12.new_empty(0))


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dout):
    x12, bias = ctx.saved_tensors
    dx12, dbias = swiglu_bwd(dout, x12, bias)
    return dx12, dbias if bias is not None else None


swiglu_op.register_autograd(_backward, setup_context=_setup)


def swiglu_triton(x12: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    return swiglu_op(x12, bias)


def _bench(s: BenchShape, device: str, dtype: torch.dtype) -> BenchCase:
    # as the model runs it: w12's bias added here and its gradient summed here (fp32, as the parameter)
    x12 = torch.randn(s.B, s.N, 2 * s.F, device=device, dtype=dtype, requires_grad=True)
    bias = torch.randn(2 * s.F, device=device, dtype=torch.float32, requires_grad=True)
    RF = s.rows * s.F * dtype.itemsize  # bytes of one half
    BIAS = 2 * s.F * 4  # read each way, its gradient written once
    return BenchCase([x12, bias], lambda f, t, b: f(t, b), 3 * RF + BIAS, 5 * RF + 2 * BIAS,
                     shape={"rows": s.rows, "F": s.F})


# Under torch.compile, `auto` runs what kernels/compiled_choices.json says (measured: bench/compiled_choices.py)
register(Op(name="swiglu", reference=reference.swiglu, impls={"triton": swiglu_triton}, bench=_bench,
            doc="silu(a)*b from the packed w12 output (+ w12's bias); bwd writes the packed grad and sums the "
                "bias grad in the same pass"))
