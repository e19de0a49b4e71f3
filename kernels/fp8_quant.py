"""FP8 (e4m3) quantization in the kernel that makes the rows (the sampler's FP8Linear, the FP8 training MLP), and of
a gradient both ways in two passes (the FP8 training linear's backward).

    quantize_rows_fp8(x, pow2=False)  x (..., C) -> (q e4m3 (rows, C), scale fp32 (rows, 1)) with x ~= q * scale
    swiglu_fp8(x12, pow2=False)       silu(a) * b from the packed w12 output (rounded to x12's dtype, as the
                                      unfused SwiGLU stores it), quantized the same way: w3's FP8 input straight
                                      from w12's output; the SwiGLU's bf16 output is never written or read back
    swiglu_fp8_colmax(x12, pow2=False)  the same, and each column's max |h| over the rows (in registers over a
                                      span of rows, then an atomic max per program): w3's weight-gradient scales,
                                      known before the backward

    quantize_rows_cols_fp8(g, pow2=True)  a gradient g (..., N) as both operands of its Linear's backward: e4m3 per
                                      row (dgrad's dy) and per column, transposed and padded to 16 rows (wgrad's
                                      dy^T), and its column sums in fp32 (the bias gradient): two passes over g, where
                                      inductor's plain ops take three or four (the row amax looping twice over rows
                                      wider than 1024, the column amax, the transposed cast); for gradients that come
                                      out of an opaque kernel (ours), into which inductor cannot fuse

pow2: each scale rounded up to a power of two (`pow2_ceil`), the FP8 training recipe's (kernels/fp8_linear.py).

The recipe is `quantize_fp8` below: one scale per row, its amax times the fp32 reciprocal of 448 (a power of two
above it with pow2), and the row times the scale's reciprocal (exactly the division for a power-of-two scale; in
plain ops `scale_inverse` takes a power of two's from its exponent bits, exact under inductor too),
which FP8Linear also applies in plain torch ops where inductor can fuse it into the producer. These kernels are
for the producers it cannot fuse into: our Triton SwiGLU, and attention's output (cuDNN's). Each program holds
BLOCK_M whole rows in registers, so the amax and the cast read each row once; inductor loops over rows wider than
1024 and reads them twice (its kernels for these two took 239 + 129 ms of a 2167 ms sampling run on an H200:
bench/results/2026-11-26_h200_sampling.md).

The kernels take each row's reciprocal with IEEE rounding (`div_rn`: Triton's `/` is the approximate
div.full.f32), multiply, and cast with the GPU's cvt.rn.satfinite (round to nearest even, as torch's
`.to(float8_e4m3fn)`); under Triton's interpreter, which rounds some values into the wrong binade (-126.7 -> -64),
the rounding is written out in the fp32 bits (`_e4m3_rne`), so the interpreter, the GPU and torch agree bit for bit
(tests/test_kernels_fp8_quant.py). The row ops are forward ops: the sampler's FP8 modules call them, and the FP8
training MLP (modeling.fp8.FP8TrainingSwiGLUFFN) calls swiglu_fp8 in its forward and recomputes the SwiGLU for its
backward. quantize_rows_cols_fp8 is a backward's: the FP8 training linear's, for the gradients our kernels write
(attn.qkv's, mlp.w12's).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import _triton, reference
from ._triton import tl, triton
from .fused_norm import (INTERPRET_BLOCK_M as NORM_INTERPRET_BLOCK_M, ONE_SAMPLE_ROWS, _TILES, _dtypes, _empty,
                         _fwd_rows, _geometry, _prune_split_tiles, _rms, _row_views, _tile_configs)
from .registry import BenchCase, BenchShape, Op, register

FP8_E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
# The scale is amax * (1 / 448), the product, not the quotient: torch on CUDA divides a tensor by a Python number
# as a * (1 / b) (BinaryDivTrueKernel.cu), on the CPU it divides, and the two differ by an ulp in some rows (the
# H200 suite of 2026-12-04 caught it); written as the product, the CPU, the GPU, inductor and our kernels agree.
FP8_E4M3_INV = 1.0 / FP8_E4M3_MAX  # rounds to the fp32 1.0f / 448.0f wherever it meets an fp32 tensor
INTERPRET_BLOCK_M = 4  # does not divide the tests' row counts: the ragged last tile runs


def pow2_ceil(scale: Tensor) -> Tensor:
    """The smallest power of two >= each (positive, normal) fp32 scale, from its bits: the scale itself when its
    mantissa is zero, else the next exponent up. Exact, unlike exp2(ceil(log2(s))), whose log2 rounds to an integer
    for s within an ulp or two above a power of two; the Triton kernels do the same bit operation. A NaN scale (from
    a NaN amax) stays NaN: the next exponent up of its bits is the sign bit, -0.0, a finite scale that would let
    the NaN row quantize to finite values."""
    bits = scale.view(torch.int32)
    up = ((bits >> 23) + 1) << 23
    return torch.where(((bits & 0x7FFFFF) == 0) | torch.isnan(scale), bits, up).view(torch.float32)


def scale_inverse(scale: Tensor, pow2: bool) -> Tensor:
    """1 / scale as the recipe multiplies by it: IEEE's reciprocal, or for power-of-two scales (pow2) 2^-e from the
    exponent bits of 2^e, the same value exactly (a non-finite scale, from a non-finite amax, keeps the reciprocal).
    Inside torch.compile the bits matter: inductor lowers torch.reciprocal to Triton's approximate division
    (div.full.f32), which no document promises exact even for a power of two; integer ops are exact everywhere."""
    if pow2:
        inverse = ((254 << 23) - scale.view(torch.int32)).view(torch.float32)
        return torch.where(torch.isfinite(scale), inverse, torch.reciprocal(scale))
    return torch.reciprocal(scale)


def quantize_fp8(x: Tensor, rowwise: bool, pow2: bool = False) -> tuple[Tensor, Tensor]:
    """x (rows, K) -> (e4m3 values, fp32 scale) with x ~= values * scale: one scale per row (shape (rows, 1)) or
    one for the tensor (shape ()); pow2: scales rounded up to powers of two. Plain torch ops: under torch.compile
    the amax, the division and the cast fuse into one kernel, and into the op that produced x."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True) if rowwise else xf.abs().amax()
    scale = amax.clamp(min=1e-12) * FP8_E4M3_INV
    if pow2:
        scale = pow2_ceil(scale)
    return (xf * scale_inverse(scale, pow2)).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn), scale


def quantize_rows_fp8_reference(x: Tensor, pow2: bool = False) -> tuple[Tensor, Tensor]:
    """x (..., C) -> (e4m3 (rows, C), fp32 scale (rows, 1)): `quantize_fp8` per row of x viewed as (rows, C)."""
    return quantize_fp8(x.reshape(-1, x.shape[-1]), rowwise=True, pow2=pow2)


def swiglu_fp8_reference(x12: Tensor, pow2: bool = False) -> tuple[Tensor, Tensor]:
    """The unfused path: the SwiGLU in x12's dtype, then its rows quantized."""
    return quantize_rows_fp8_reference(reference.swiglu(x12), pow2)


def swiglu_fp8_colmax_reference(x12: Tensor, pow2: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """swiglu_fp8_reference, and each column's max |h| over the rows (fp32, (F,)): what the FP8 training MLP's
    weight gradient scales h^T by (modeling.fp8.FP8TrainingSwiGLUFFN), known in the forward."""
    h = reference.swiglu(x12)
    q, scale = quantize_rows_fp8_reference(h, pow2)
    return q, scale, h.reshape(-1, h.shape[-1]).float().abs().amax(dim=0)


class FP8Rows(NamedTuple):
    """Rows in e4m3 with one fp32 scale each (x ~= values * scale), as a norm hands them to the FP8 Linear that
    reads them (modeling.fp8.FP8Linear with `input_dtype` e4m3): values (..., C), scale (..., 1)."""
    values: Tensor
    scale: Tensor


def _check_e4m3(out_dtype: torch.dtype) -> None:
    if out_dtype != torch.float8_e4m3fn:
        raise ValueError(f"the FP8 norm ops write float8_e4m3fn rows; got out_dtype {out_dtype}")


def _fp8_rows(out: Tensor) -> FP8Rows:
    q, scale = quantize_fp8(out.reshape(-1, out.shape[-1]), rowwise=True)
    return FP8Rows(q.reshape(out.shape), scale.reshape(*out.shape[:-1], 1))


def norm_modulate_fp8_reference(x: Tensor, weight: Optional[Tensor], shift: Optional[Tensor], scale: Tensor,
                                eps: float = 1e-6, kind: str = "rms",
                                out_dtype: torch.dtype = torch.float8_e4m3fn) -> FP8Rows:
    """`reference.norm_modulate` in its own dtype (type promotion's: bf16 in the FP8 sampler's bf16 model), then
    quantized per row (quantize_fp8): what the unfused path writes and its FP8 Linear quantizes."""
    _check_e4m3(out_dtype)
    return _fp8_rows(reference.norm_modulate(x, weight, shift, scale, eps, kind))


def gated_residual_norm_modulate_fp8_reference(x: Tensor, gate: Tensor, y: Tensor, weight: Optional[Tensor],
                                               shift: Optional[Tensor], scale: Tensor, eps: float = 1e-6,
                                               kind: str = "rms", out_dtype: torch.dtype = torch.float8_e4m3fn
                                               ) -> tuple[Tensor, FP8Rows]:
    """(h, out quantized per row): `reference.gated_residual_norm_modulate`, its out as norm_modulate_fp8's."""
    _check_e4m3(out_dtype)
    h, out = reference.gated_residual_norm_modulate(x, gate, y, weight, shift, scale, eps, kind)
    return h, _fp8_rows(out)


def padded_rows(rows: int, multiple: int = 16) -> int:
    """rows rounded up to a multiple of `multiple`, at least one multiple: _scaled_mm on the GPU wants every
    contraction length divisible by 16, and the weight gradient contracts over the tokens."""
    return max(multiple, -(-rows // multiple) * multiple)


def pad_rows(t: Tensor, multiple: int = 16) -> Tensor:
    """t (M, C) with zero rows appended up to padded_rows(M): zero rows change neither a sum nor an amax."""
    pad = padded_rows(t.shape[0], multiple) - t.shape[0]
    return torch.nn.functional.pad(t, (0, 0, 0, pad)) if pad else t


def quantize_rows_cols_fp8_reference(g: Tensor, pow2: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """g (..., N) as (M, N) -> (q e4m3 (M, N), scale fp32 (M, 1)) per row, (qt e4m3 (N, Mp), scale fp32 (N, 1)) per
    column of g padded with zero rows to Mp = padded_rows(M) and transposed, and each column's sum in fp32 (N,):
    `quantize_fp8` both ways, as the FP8 training linear's backward takes its gradient (kernels/fp8_linear.py)."""
    g2 = g.reshape(-1, g.shape[-1])
    q, scale = quantize_fp8(g2, rowwise=True, pow2=pow2)
    qt, scale_t = quantize_fp8(pad_rows(g2).t().contiguous(), rowwise=True, pow2=pow2)
    return q, scale, qt, scale_t, g2.sum(dim=0, dtype=torch.float32)  # (as the FP8 linear sums its bias gradient)


@triton.jit
def _e4m3_rne(v):
    """v (fp32, |v| <= 448) rounded to the nearest e4m3 value, ties to even, as an fp32 that e4m3 holds exactly."""
    bits = v.to(tl.int32, bitcast=True)
    sign = bits & -2147483648
    mag = bits & 0x7FFFFFFF
    # normal range (>= 2^-6): keep 3 mantissa bits, rounding on the dropped 20 (a carry moves up the exponent)
    normal = ((mag + 0x7FFFF + ((mag >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
    a = mag.to(tl.float32, bitcast=True)
    sub = (a + 16384.0) - 16384.0  # subnormals: multiples of 2^-9, the fp32 ulp at 2^14 (rounds to even)
    r = tl.where(a < 0.015625, sub, normal)
    return (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


# Triton's interpreter casts fp32 -> e4m3 wrongly near binade edges, so under it the rounding is written out
# (_e4m3_rne); compiled for the GPU the cast is one cvt.rn.satfinite.e4m3x2.f32 (round to nearest even, as torch),
# and the written-out rounding's dozen integer ops per element are left out: the SwiGLU kernel is issue-bound
# (~55 SASS instructions per element for sm_90 with them; tests/test_kernels_fp8_quant.py, GPU: test_kernels_gpu.py).
_INTERPRETED = tl.constexpr(_triton.interpreting())
_EMULATE_E4M3 = _INTERPRETED


# NaN in, NaN out, as torch: tl.maximum / tl.minimum and tl.max take the other operand of a NaN by default (the
# hardware's max.f32), so a row's amax skipped its NaN and the clamp turned the NaN into -448: a NaN activation or
# gradient came out finite (-448 x the row's scale) and the step's non-finite guard could not see it. Every max and
# clamp of these kernels propagates NaN (max.NaN.f32: the same one instruction on sm_80+).
@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _amax(x, axis: tl.constexpr):
    """max |x| along `axis`, NaN where any element is NaN (torch's amax)."""
    a = tl.abs(x)
    if _INTERPRETED:  # the interpreter runs a reduction's own combine function in Python, pair by pair (~10x the
        # CPU tests' time): numpy's max there, and the sum, NaN wherever a NaN is, where the row or column has one
        return tl.where(tl.max((a != a).to(tl.int32), axis) > 0, tl.sum(a, axis), tl.max(a, axis))
    else:
        return tl.reduce(a, axis, _max_nan)


@triton.jit
def _row_scale(amax, POW2: tl.constexpr):
    """Each row's scale from its amax (the recipe's product; pow2: rounded up to a power of two, from the bits as
    pow2_ceil, NaN kept) and its reciprocal (one IEEE division per row)."""
    scale = _max_nan(amax, 1e-12) * (1.0 / 448.0)  # FP8_E4M3_INV: the recipe's product, as torch's
    if POW2:  # pow2_ceil: the scale, or the next power of two up when its mantissa is not zero
        bits = scale.to(tl.int32, bitcast=True)
        scale = tl.where(((bits & 0x7FFFFF) == 0) | (scale != scale), bits,
                         ((bits >> 23) + 1) << 23).to(tl.float32, bitcast=True)
    return scale, tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)


@triton.jit
def _to_e4m3(v):
    """v (fp32, already times its scale's reciprocal) clamped to e4m3's range (NaN kept) and cast, as quantize_fp8."""
    v = tl.minimum(_max_nan(v, -448.0), 448.0, propagate_nan=tl.PropagateNan.ALL)
    if _EMULATE_E4M3:  # (and the interpreter casts NaN to 384, 0x7C: e4m3's NaN is 0x7F, as cvt and torch write it)
        nan = tl.full(v.shape, 0x7F, tl.uint8).to(tl.float8e4nv, bitcast=True)
        return tl.where(v != v, nan, _e4m3_rne(v).to(tl.float8e4nv))
    return v.to(tl.float8e4nv)


@triton.jit
def _store_e4m3(x, inv, ptrs, mask):
    """x times its row's reciprocal (as quantize_fp8), clamped to e4m3's range, cast and stored."""
    tl.store(ptrs, _to_e4m3(x * inv[:, None]), mask=mask)


# A row of C channels is held as two tiles with no masked lanes where C is a sum of two powers of two: BLOCK_A, the
# largest power of two below C, and the rest in BLOCK_B (1152 = 1024 + 128, 3072 = 2048 + 1024, 2048 = 1024 + 1024),
# where one next-power-of-two tile would idle 44% / 25% of its lanes (this code is issue-bound: lanes cost
# instructions). Other widths mask the rest of BLOCK_B only.
@triton.jit
def _quant_rows_kernel(X, sx, Q, S, rows, C, POW2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_A: tl.constexpr,
                       BLOCK_B: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = row[:, None] < rows
    ca = tl.arange(0, BLOCK_A)[None, :]
    cb = BLOCK_A + tl.arange(0, BLOCK_B)[None, :]
    ma = rmask & (ca < C)
    mb = rmask & (cb < C)
    xa = tl.load(X + row[:, None] * sx + ca, mask=ma, other=0.0).to(tl.float32)
    xb = tl.load(X + row[:, None] * sx + cb, mask=mb, other=0.0).to(tl.float32)
    scale, inv = _row_scale(_max_nan(_amax(xa, 1), _amax(xb, 1)), POW2)
    _store_e4m3(xa, inv, Q + row[:, None] * C + ca, ma)
    _store_e4m3(xb, inv, Q + row[:, None] * C + cb, mb)
    tl.store(S + row, scale, mask=row < rows)


# The block's norms in the FP8 sampler: h = x + gate * y stored, then RMSNorm / LayerNorm, weight, modulate
# (kernels/fused_norm.py's `_fwd_rows`: the same statistics and products as the norm's own kernel), the output
# rounded to the dtype the unfused norm writes (ROUND: 0 fp32, 1 bf16, 2 fp16), and quantized per row: its e4m3 and
# one scale per row are written, the 16-bit output never is. Inductor's fusion of the plain ops is a looped reduction
# over rows of 1152 (its persistent reductions stop at 1024) with the amax a second reduction after the statistics;
# this holds BLOCK_M whole rows in registers.
@triton.jit
def _norm_quant_kernel(X, sx, G, sg, Y, sy, W, SHIFT, sshift, SCALE, sscale, H, Q, S, rows, N, C, eps,
                       HAS_RES: tl.constexpr, IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_SHIFT: tl.constexpr,
                       HAS_SCALE: tl.constexpr, ONE_SAMPLE: tl.constexpr, ROUND: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    row0 = tl.program_id(0) * BLOCK_M
    oa, ob, _, _, row, rmask, ca, cb, ma, mb = _fwd_rows(
        X, sx, G, sg, Y, sy, W, W, SHIFT, sshift, SCALE, sscale, H, row0, rows, N, C, eps, HAS_RES, IS_RMS, HAS_W,
        False, HAS_SHIFT, HAS_SCALE, ONE_SAMPLE, BLOCK_M, BLOCK_A, BLOCK_B)
    if ROUND == 1:
        oa, ob = oa.to(tl.bfloat16).to(tl.float32), ob.to(tl.bfloat16).to(tl.float32)
    elif ROUND == 2:
        oa, ob = oa.to(tl.float16).to(tl.float32), ob.to(tl.float16).to(tl.float32)
    ob = tl.where(mb, ob, 0.0)  # tile B's lanes past C hold no channel
    scale, inv = _row_scale(_max_nan(_amax(oa, 1), _amax(ob, 1)), False)
    Q += row0.to(tl.int64) * C
    _store_e4m3(oa, inv, Q + row[:, None] * C + ca[None, :], ma)
    _store_e4m3(ob, inv, Q + row[:, None] * C + cb[None, :], mb)
    tl.store(S + row0 + row, scale, mask=rmask)


@triton.jit
def _swiglu_part(X12, sx, row, cols, mask, C):
    """The SwiGLU of one part of the rows: the Triton SwiGLU's arithmetic, rounded to x12's dtype as its stored
    output is, in fp32 (0 where masked)."""
    ptr = X12 + row[:, None] * sx + cols
    a = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(ptr + C, mask=mask, other=0.0).to(tl.float32)
    return (a * tl.sigmoid(a) * b).to(X12.dtype.element_ty).to(tl.float32)


@triton.jit
def _swiglu_tile(X12, sx, Q, S, rows, C, start, POW2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_A: tl.constexpr,
                 BLOCK_B: tl.constexpr):
    """The SwiGLU of rows start .. start + BLOCK_M, quantized and stored; returns its two fp32 parts (0 past
    `rows` and past C)."""
    row = start + tl.arange(0, BLOCK_M)
    rmask = row[:, None] < rows
    ca = tl.arange(0, BLOCK_A)[None, :]
    cb = BLOCK_A + tl.arange(0, BLOCK_B)[None, :]
    ma = rmask & (ca < C)
    mb = rmask & (cb < C)
    ha = _swiglu_part(X12, sx, row, ca, ma, C)
    hb = _swiglu_part(X12, sx, row, cb, mb, C)
    scale, inv = _row_scale(_max_nan(_amax(ha, 1), _amax(hb, 1)), POW2)
    _store_e4m3(ha, inv, Q + row[:, None] * C + ca, ma)
    _store_e4m3(hb, inv, Q + row[:, None] * C + cb, mb)
    tl.store(S + row, scale, mask=row < rows)
    return ha, hb


@triton.jit
def _swiglu_quant_kernel(X12, sx, Q, S, rows, C, CA, span, POW2: tl.constexpr, COLMAX: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    if COLMAX:
        # `span` rows per program (a multiple of BLOCK_M) a tile at a time, each column's max |h| kept in registers,
        # then one atomic max per column into CA (as int32 bits: |h| >= 0 orders as its bits). Few programs, so
        # few atomics: ~1024 per column, not one per tile.
        start = tl.program_id(0).to(tl.int64) * span
        ca = tl.arange(0, BLOCK_A)
        cb = BLOCK_A + tl.arange(0, BLOCK_B)
        max_a = tl.zeros([BLOCK_A], dtype=tl.float32)
        max_b = tl.zeros([BLOCK_B], dtype=tl.float32)
        for r in range(0, span, BLOCK_M):
            ha, hb = _swiglu_tile(X12, sx, Q, S, rows, C, start + r, POW2, BLOCK_M, BLOCK_A, BLOCK_B)
            max_a = _max_nan(max_a, _amax(ha, 0))
            max_b = _max_nan(max_b, _amax(hb, 0))
        tl.atomic_max(CA + ca, max_a.to(tl.int32, bitcast=True), mask=ca < C)
        tl.atomic_max(CA + cb, max_b.to(tl.int32, bitcast=True), mask=cb < C)
    else:
        _swiglu_tile(X12, sx, Q, S, rows, C, tl.program_id(0).to(tl.int64) * BLOCK_M, POW2, BLOCK_M, BLOCK_A,
                     BLOCK_B)


# quantize_rows_cols_fp8: both of g's scales need amaxes over whole rows and whole columns before anything is cast,
# so two passes. The first reads (BLOCK_M x BLOCK_N) tiles down a span of rows: each tile's row maxima go out as
# partials (one per row per column tile), its column maxima and sums stay in registers over the span (one partial
# per span per column); torch reduces the partials (a few MB against the gradient's hundreds) and turns the amaxes
# into scales with quantize_fp8's own ops (the same bits). The second reads each tile once more and writes it twice:
# row-major times the row reciprocals, and transposed times the column reciprocals (the zero rows of the padding
# included). Sums: tile order, then the spans in order; the first pass's tile is fixed, not autotuned, so the bias
# gradient's bits do not depend on what a process's timing picked (a resumed run sums as the one it continues).
@triton.jit
def _rows_cols_amax_kernel(G, sg, RA, CA, CS, M, N, span, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    col_max = tl.zeros([BLOCK_N], dtype=tl.float32)
    col_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    start = tl.program_id(0).to(tl.int64) * span
    for r in range(0, span, BLOCK_M):
        rows = start + r + tl.arange(0, BLOCK_M)
        rmask = rows < M
        g = tl.load(G + rows[:, None] * sg + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                    other=0.0).to(tl.float32)
        tl.store(RA + pid_n * M + rows, _amax(g, 1), mask=rmask)
        col_max = _max_nan(col_max, _amax(g, 0))
        col_sum += tl.sum(g, axis=0)
    tl.store(CA + tl.program_id(0) * N + cols, col_max, mask=cmask)
    tl.store(CS + tl.program_id(0) * N + cols, col_sum, mask=cmask)


@triton.jit
def _rows_cols_quant_kernel(G, sg, RINV, CINV, Q, QT, M, Mp, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < N
    mask = rmask[:, None] & cmask[None, :]
    g = tl.load(G + rows[:, None] * sg + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rinv = tl.load(RINV + rows, mask=rmask, other=0.0)
    cinv = tl.load(CINV + cols, mask=cmask, other=0.0)
    tl.store(Q + rows[:, None] * N + cols[None, :], _to_e4m3(g * rinv[:, None]), mask=mask)
    # rows M .. Mp - 1 are the zero padding: g is 0 there (masked load), so they are written as zeros
    tl.store(QT + cols[:, None].to(tl.int64) * Mp + rows[None, :], _to_e4m3(tl.trans(g * cinv[None, :])),
             mask=cmask[:, None] & (rows[None, :] < Mp))


ROWS_COLS_AMAX_TILE = (32, 256, 4)  # the first pass's (BLOCK_M, BLOCK_N, warps): fixed (the sums' order, above)
ROWS_COLS_QUANT_TILES = ((64, 64, 4), (64, 128, 4), (128, 64, 4), (128, 128, 8))  # (BLOCK_M, BLOCK_N, warps)
ROWS_COLS_PROGRAMS = 1024  # the first pass's programs at least (span x column tiles), where there are rows enough
INTERPRET_ROWS_COLS = (4, 16)  # (BLOCK_M, BLOCK_N) under the interpreter: ragged in the tests' sizes


def _rows_cols_span(M: int, col_tiles: int, step: int) -> int:
    """Rows per program of the first pass: a multiple of `step` (its BLOCK_M), few enough programs for small partial
    buffers, enough (ROWS_COLS_PROGRAMS over the column tiles) to fill the card."""
    row_programs = max(1, triton.cdiv(ROWS_COLS_PROGRAMS, col_tiles))
    return step * max(1, triton.cdiv(M, step * row_programs))


_rows_cols_quant_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w) for m, n, w in ROWS_COLS_QUANT_TILES],
    key=["N"])(_rows_cols_quant_kernel)


def _scales(amax: Tensor, pow2: bool) -> tuple[Tensor, Tensor]:
    """(scale, its reciprocal) from amaxes: quantize_fp8's ops, so its bits."""
    scale = amax.clamp(min=1e-12) * FP8_E4M3_INV
    if pow2:
        scale = pow2_ceil(scale)
    return scale, scale_inverse(scale, pow2)


def rows_cols_fp8(g2: Tensor, pow2: bool,
                  cast_tile: Optional[tuple[int, int, int]] = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """quantize_rows_cols_fp8's two passes on g2 (M, N), unit column stride, M and N > 0. cast_tile (BLOCK_M,
    BLOCK_N, warps): the second pass's tile instead of the autotuner's pick (the GPU tests run every candidate);
    under the interpreter, small tiles (INTERPRET_ROWS_COLS) in both passes."""
    M, N = g2.shape
    Mp, dev = padded_rows(M), g2.device
    interp = _triton.interpreting()
    bm1, bn1, warps1 = (*INTERPRET_ROWS_COLS, 4) if interp else ROWS_COLS_AMAX_TILE
    col_tiles = triton.cdiv(N, bn1)
    span = _rows_cols_span(M, col_tiles, bm1)
    row_progs = triton.cdiv(M, span)
    row_part = torch.empty((col_tiles, M), dtype=torch.float32, device=dev)
    col_part = torch.empty((2, row_progs, N), dtype=torch.float32, device=dev)  # maxima, sums
    _rows_cols_amax_kernel[(row_progs, col_tiles)](g2, g2.stride(0), row_part, col_part[0], col_part[1], M, N, span,
                                                   BLOCK_M=bm1, BLOCK_N=bn1, num_warps=warps1)
    scale, inv = _scales(row_part.amax(dim=0), pow2)
    scale_t, inv_t = _scales(col_part[0].amax(dim=0), pow2)
    q = torch.empty((M, N), dtype=torch.float8_e4m3fn, device=dev)
    qt = torch.empty((N, Mp), dtype=torch.float8_e4m3fn, device=dev)
    args = (g2, g2.stride(0), inv, inv_t, q, qt, M, Mp, N)
    if interp or cast_tile:
        bm, bn, warps = cast_tile or (*INTERPRET_ROWS_COLS, 4)
        _rows_cols_quant_kernel[(triton.cdiv(Mp, bm), triton.cdiv(N, bn))](*args, BLOCK_M=bm, BLOCK_N=bn,
                                                                            num_warps=warps)
    else:
        _rows_cols_quant_tuned[lambda meta: (triton.cdiv(Mp, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))](
            *args)
    return q, scale.reshape(M, 1), qt, scale_t.reshape(N, 1), col_part[1].sum(dim=0)


@torch.library.custom_op("vavae::quantize_rows_cols_fp8", mutates_args=())
def quantize_rows_cols_fp8_op(g: Tensor, pow2: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    g2 = _triton.rows_2d(g)
    if g2.shape[0] == 0 or g2.shape[1] == 0:  # nothing to launch: the reference's empties (and its zero padding)
        return tuple(t.contiguous() for t in quantize_rows_cols_fp8_reference(g2, pow2))
    return rows_cols_fp8(g2, pow2)


@quantize_rows_cols_fp8_op.register_fake
def _(g, pow2=True):
    N = g.shape[-1]
    M = g.numel() // N if N else 0
    f32 = torch.float32
    return (g.new_empty((M, N), dtype=torch.float8_e4m3fn), g.new_empty((M, 1), dtype=f32),
            g.new_empty((N, padded_rows(M)), dtype=torch.float8_e4m3fn), g.new_empty((N, 1), dtype=f32),
            g.new_empty((N,), dtype=f32))


def quantize_rows_cols_fp8_triton(g: Tensor, pow2: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return quantize_rows_cols_fp8_op(g, pow2)


row_split = _triton.row_split  # (BLOCK_A, BLOCK_B) of a row of C: kernels._triton.row_split


COLMAX_PROGRAMS = 1024  # programs of swiglu_fp8_colmax at most: each takes a span of rows


def _colmax_span(rows: int) -> int:
    """Rows per program of swiglu_fp8_colmax: a multiple of 32, so of every BLOCK_M the autotuner may pick (1-32):
    the programs' tiles never overlap."""
    step = max(m for m, _ in _TILES)
    return step * triton.cdiv(rows, step * COLMAX_PROGRAMS)


# On a GPU the rows per program and warps are measured on the first call per width (the norm family's candidates,
# pruned the same way: 1-8 rows of 1152 in a 2048-wide tile, 1-4 rows of 3072 in 4096); the interpreter a fixed 4.
_quant_rows_tuned = triton.autotune(configs=_tile_configs(), key=["C", "BLOCK_A", "BLOCK_B", "POW2"],
                                    prune_configs_by={"early_config_prune": _prune_split_tiles})(_quant_rows_kernel)
def _prune_swiglu_tiles(configs, named_args, **kwargs):
    """The norm family's tiles; with COLMAX at most 8 warps: the column max's fp32 vector sits beside the tile, and
    at 16 warps (128 registers a thread) 4 rows of 3072 spill (bench/sm90_check.py)."""
    keep = _prune_split_tiles(configs, named_args, **kwargs)
    if named_args.get("COLMAX", kwargs.get("COLMAX")):
        keep = [c for c in keep if c.num_warps <= 8] or keep[:1]
    return keep


# (the autotuner's timing runs repeat the column max into the same buffer: a max, so the result is the same)
_swiglu_quant_tuned = triton.autotune(configs=_tile_configs(), key=["C", "BLOCK_A", "BLOCK_B", "POW2", "COLMAX"],
                                      prune_configs_by={"early_config_prune": _prune_swiglu_tiles})(
                                          _swiglu_quant_kernel)


def _launch(kernel, tuned, src: Tensor, rows: int, C: int, *rest, span: int = 0) -> tuple[Tensor, Tensor]:
    """Run a row-quantization kernel on `src` (rows, C) [packed: C is the output width]; `rest`: the kernel's
    arguments after C; span: rows per program (0: one tile of BLOCK_M). Returns (q e4m3 (rows, C), scale fp32
    (rows, 1))."""
    q = torch.empty((rows, C), dtype=torch.float8_e4m3fn, device=src.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=src.device)
    if q.numel():
        args = (src, src.stride(0), q, scale, rows, C, *rest)
        block_a, block_b = row_split(C)
        if _triton.interpreting():
            kernel[(triton.cdiv(rows, span or INTERPRET_BLOCK_M),)](*args, BLOCK_M=INTERPRET_BLOCK_M,
                                                                   BLOCK_A=block_a, BLOCK_B=block_b, num_warps=4)
        else:
            tuned[lambda meta: (triton.cdiv(rows, span or meta["BLOCK_M"]),)](*args, BLOCK_A=block_a,
                                                                              BLOCK_B=block_b)
    return q, scale


@torch.library.custom_op("vavae::quantize_rows_fp8", mutates_args=())
def quantize_rows_fp8_op(x: Tensor, pow2: bool = False) -> tuple[Tensor, Tensor]:
    x2 = _triton.rows_2d(x)
    return _launch(_quant_rows_kernel, _quant_rows_tuned, x2, x2.shape[0], x2.shape[1], pow2)


@quantize_rows_fp8_op.register_fake
def _(x, pow2=False):
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (x.new_empty((rows, x.shape[-1]), dtype=torch.float8_e4m3fn),
            x.new_empty((rows, 1), dtype=torch.float32))


def _check_packed(x12: Tensor) -> None:
    if x12.shape[-1] % 2:
        raise ValueError(f"swiglu_fp8 needs an even last dim (packed [a, b]), got {tuple(x12.shape)}")


@torch.library.custom_op("vavae::swiglu_fp8", mutates_args=())
def swiglu_fp8_op(x12: Tensor, pow2: bool = False) -> tuple[Tensor, Tensor]:
    _check_packed(x12)
    x2 = _triton.rows_2d(x12)
    unused = torch.empty(1, dtype=torch.int32, device=x12.device)  # COLMAX off: the column max is not written
    return _launch(_swiglu_quant_kernel, _swiglu_quant_tuned, x2, x2.shape[0], x2.shape[1] // 2, unused, 0, pow2,
                   False)


@torch.library.custom_op("vavae::swiglu_fp8_colmax", mutates_args=())
def swiglu_fp8_colmax_op(x12: Tensor, pow2: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    _check_packed(x12)
    x2 = _triton.rows_2d(x12)
    H = x2.shape[1] // 2
    col = torch.zeros(H, dtype=torch.int32, device=x12.device)
    span = _colmax_span(x2.shape[0])
    q, scale = _launch(_swiglu_quant_kernel, _swiglu_quant_tuned, x2, x2.shape[0], H, col, span, pow2, True,
                       span=span)
    return q, scale, col.view(torch.float32)


@swiglu_fp8_colmax_op.register_fake
def _(x12, pow2=False):
    _check_packed(x12)
    H = x12.shape[-1] // 2
    rows = x12.numel() // x12.shape[-1] if x12.shape[-1] else 0
    return (x12.new_empty((rows, H), dtype=torch.float8_e4m3fn), x12.new_empty((rows, 1), dtype=torch.float32),
            x12.new_empty((H,), dtype=torch.float32))


@swiglu_fp8_op.register_fake
def _(x12, pow2=False):
    _check_packed(x12)
    H = x12.shape[-1] // 2
    rows = x12.numel() // x12.shape[-1] if x12.shape[-1] else 0
    return x12.new_empty((rows, H), dtype=torch.float8_e4m3fn), x12.new_empty((rows, 1), dtype=torch.float32)


def _prune_norm_fp8_tiles(configs, named_args, **kwargs):
    """The norms' row tiles (_prune_split_tiles) at most 8 warps: compiled for sm_90 at hidden 1152, the 16-warp
    tiles spill (Triton 3.9: 64-72 bytes at 8 rows; 3.6: 8 bytes at 4) or issue ~80 SASS instructions an element
    against 35-39 at 4 rows over 4 warps or 8 over 8 (bench.sm90_check)."""
    keep = [c for c in _prune_split_tiles(configs, named_args, **kwargs) if c.num_warps <= 8]
    return keep or configs[:1]


_norm_quant_tuned = triton.autotune(
    configs=_tile_configs(), key=["C", "HAS_RES", "IS_RMS", "HAS_W", "HAS_SHIFT", "HAS_SCALE", "ONE_SAMPLE", "ROUND",
                                  "BLOCK_A", "BLOCK_B"],
    prune_configs_by={"early_config_prune": _prune_norm_fp8_tiles})(_norm_quant_kernel)
_ROUND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def norm_fp8(x: Tensor, gate: Optional[Tensor], y: Optional[Tensor], weight: Optional[Tensor],
             shift: Optional[Tensor], scale: Optional[Tensor], eps: float, rms: bool,
             tile: Optional[tuple[int, int]] = None) -> tuple[Tensor, Tensor, Tensor]:
    """(h (empty without the residual), e4m3 rows of x's shape, fp32 scales (..., 1)); tile: (BLOCK_M, warps)
    instead of the autotuner's pick (the GPU tests run every candidate: the bits are the norm kernel's at the same
    tile; across tiles the row sums' order, hence a last bit of the statistics, follows the tile's layout)."""
    rows, C, N, _ = _geometry(x, gate is not None or shift is not None or scale is not None)
    h_dtype, out_dtype = _dtypes(x, gate, y, weight, None, shift, scale)
    if out_dtype not in _ROUND:
        raise ValueError(f"the FP8 norm ops take fp32, bf16 or fp16 inputs; the norm's output would be {out_dtype}")
    h = torch.empty(x.shape, dtype=h_dtype, device=x.device) if gate is not None else _empty(x)
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)
    if rows == 0:
        return h, q, s
    x2, g, y2, sh, sc = _row_views(x, gate, y, shift, scale)
    block_a, block_b = row_split(C)
    dummy = x2  # pointer for an absent input: never read (its HAS_* flag is off)
    args = (x2, x2.stride(0), g if g is not None else dummy, g.stride(0) if g is not None else 0,
            y2 if y2 is not None else dummy, y2.stride(0) if y2 is not None else 0,
            weight if weight is not None else dummy, sh if sh is not None else dummy, sh.stride(0) if sh is not None else 0,
            sc if sc is not None else dummy, sc.stride(0) if sc is not None else 0, h if g is not None else q, q, s,
            rows, N, C, eps)
    flags = dict(HAS_RES=g is not None, IS_RMS=rms, HAS_W=weight is not None, HAS_SHIFT=sh is not None,
                 HAS_SCALE=sc is not None, ONE_SAMPLE=N % ONE_SAMPLE_ROWS == 0, ROUND=_ROUND[out_dtype],
                 BLOCK_A=block_a, BLOCK_B=block_b)
    if tile is None and _triton.interpreting():
        tile = (NORM_INTERPRET_BLOCK_M, 4)
    if tile is not None:
        _norm_quant_kernel[(triton.cdiv(rows, tile[0]),)](*args, **flags, BLOCK_M=tile[0], num_warps=tile[1])
    else:
        _norm_quant_tuned[lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]),)](*args, **flags)
    return h, q, s


@torch.library.custom_op("vavae::norm_fp8", mutates_args=())
def norm_fp8_op(x: Tensor, gate: Optional[Tensor], y: Optional[Tensor], weight: Optional[Tensor],
                shift: Optional[Tensor], scale: Optional[Tensor], eps: float, rms: bool
                ) -> tuple[Tensor, Tensor, Tensor]:
    """norm_fp8 as one opaque node for torch.compile. Inference: no autograd."""
    return norm_fp8(x, gate, y, weight, shift, scale, eps, rms)


@norm_fp8_op.register_fake
def _(x, gate, y, weight, shift, scale, eps, rms):
    h_dtype, _ = _dtypes(x, gate, y, weight, None, shift, scale)
    h = x.new_empty(x.shape, dtype=h_dtype) if gate is not None else x.new_empty(0)
    return h, x.new_empty(x.shape, dtype=torch.float8_e4m3fn), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


def norm_modulate_fp8_triton(x: Tensor, weight: Optional[Tensor], shift: Optional[Tensor], scale: Tensor,
                             eps: float = 1e-6, kind: str = "rms",
                             out_dtype: torch.dtype = torch.float8_e4m3fn) -> FP8Rows:
    _check_e4m3(out_dtype)
    _, q, s = norm_fp8_op(x, None, None, weight, shift, scale, eps, _rms(kind))
    return FP8Rows(q, s)


def gated_residual_norm_modulate_fp8_triton(x: Tensor, gate: Tensor, y: Tensor, weight: Optional[Tensor],
                                            shift: Optional[Tensor], scale: Tensor, eps: float = 1e-6,
                                            kind: str = "rms", out_dtype: torch.dtype = torch.float8_e4m3fn
                                            ) -> tuple[Tensor, FP8Rows]:
    _check_e4m3(out_dtype)
    h, q, s = norm_fp8_op(x, gate, y, weight, shift, scale, eps, _rms(kind))
    return h, FP8Rows(q, s)


def quantize_rows_fp8_triton(x: Tensor, pow2: bool = False) -> tuple[Tensor, Tensor]:
    return quantize_rows_fp8_op(x, pow2)


def swiglu_fp8_triton(x12: Tensor, pow2: bool = False) -> tuple[Tensor, Tensor]:
    return swiglu_fp8_op(x12, pow2)


def swiglu_fp8_colmax_triton(x12: Tensor, pow2: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    return swiglu_fp8_colmax_op(x12, pow2)


def _bench_quant(s: BenchShape, device: str, dtype: torch.dtype) -> BenchCase:
    # the attention output ahead of the proj GEMM, at XL/1 rows: read (rows, C), write e4m3 + one scale per row
    x = torch.randn(s.B, s.N, s.C, device=device, dtype=dtype)
    return BenchCase([x], lambda f, t: f(t), s.rows * s.C * (dtype.itemsize + 1) + 4 * s.rows,
                     shape={"rows": s.rows, "C": s.C})


def _bench_swiglu(s: BenchShape, device: str, dtype: torch.dtype) -> BenchCase:
    # w12's output ahead of the w3 GEMM: read (rows, 2F), write (rows, F) e4m3 + one scale per row
    x12 = torch.randn(s.B, s.N, 2 * s.F, device=device, dtype=dtype)
    return BenchCase([x12], lambda f, t: f(t), s.rows * s.F * (2 * dtype.itemsize + 1) + 4 * s.rows,
                     shape={"rows": s.rows, "F": s.F})


def _bench_rows_cols(s: BenchShape, device: str, dtype: torch.dtype) -> BenchCase:
    # the gradient of the qkv GEMM's output (written by our attention block's backward) ahead of its FP8 dgrad and
    # wgrad: read (rows, 3C), write it twice in e4m3 (row-major and transposed) + the scales and column sums
    g = torch.randn(s.B, s.N, 3 * s.C, device=device, dtype=dtype)
    return BenchCase([g], lambda f, t: f(t), s.rows * 3 * s.C * (dtype.itemsize + 2) + 4 * s.rows + 12 * 3 * s.C,
                     shape={"rows": s.rows, "N": 3 * s.C})


def _bench_norm_fp8(residual: bool):
    def case(s: BenchShape, device: str, dtype: torch.dtype) -> BenchCase:
        # the block's norms in the FP8 sampler's model (every tensor in its dtype: a bf16 copy), ahead of the qkv and
        # w12 GEMMs: read x (and y), write (h and) e4m3 + one scale per row
        el, E = s.rows * s.C, dtype.itemsize
        x, y, w, mod = (torch.randn(s.B, s.N, s.C, device=device, dtype=dtype),
                        torch.randn(s.B, s.N, s.C, device=device, dtype=dtype),
                        torch.randn(s.C, device=device, dtype=dtype), torch.randn(s.B, 6 * s.C, device=device, dtype=dtype))
        sh, sc, g = (lambda m: m[:, :s.C]), (lambda m: m[:, s.C:2 * s.C]), (lambda m: m[:, 2 * s.C:3 * s.C])
        size = {"B": s.B, "N": s.N, "C": s.C}
        if residual:
            return BenchCase([x, y, w, mod], lambda f, x, y, w, m: f(x, g(m), y, w, sh(m), sc(m), 1e-6, "rms"),
                             el * (3 * E + 1) + 4 * s.rows, shape=size)
        return BenchCase([x, w, mod], lambda f, x, w, m: f(x, w, sh(m), sc(m), 1e-6, "rms"), el * (E + 1) + 4 * s.rows,
                         shape=size)
    return case


# Under torch.compile, `auto` runs what kernels/compiled_choices.json says: ours (their producers, cuDNN attention
# and our SwiGLU, are opaque to inductor, whose version is a separate looped pass) until a GPU run's ops table
# decides (bench/compiled_choices.py); the sampling plan's fp8 entries with fp8_quant ours / inline time the whole.
register(Op(name="quantize_rows_fp8", reference=quantize_rows_fp8_reference, impls={"triton": quantize_rows_fp8_triton},
            bench=_bench_quant, doc="e4m3 per row (scale = row amax x fp32(1/448), pow2: rounded up to a power of two) in "
                                  "one pass over each row"))
register(Op(name="swiglu_fp8", reference=swiglu_fp8_reference, impls={"triton": swiglu_fp8_triton},
            bench=_bench_swiglu, doc="silu(a)*b from the packed w12 output, quantized per row to e4m3 in the same "
                                     "pass (pow2 as quantize_rows_fp8)"))
register(Op(name="swiglu_fp8_colmax", reference=swiglu_fp8_colmax_reference,
            impls={"triton": swiglu_fp8_colmax_triton}, bench=_bench_swiglu,
            doc="swiglu_fp8 and each column's max |silu(a)*b| over the rows (the FP8 training MLP's wgrad scales)"))
register(Op(name="quantize_rows_cols_fp8", reference=quantize_rows_cols_fp8_reference,
            impls={"triton": quantize_rows_cols_fp8_triton}, bench=_bench_rows_cols,
            doc="a gradient as both e4m3 operands of its Linear's backward (per row; per column, transposed, padded "
                "to 16 rows) and its column sums, in two passes"))
register(Op(name="norm_modulate_fp8", reference=norm_modulate_fp8_reference, impls={"triton": norm_modulate_fp8_triton},
            bench=_bench_norm_fp8(False), doc="norm_modulate with its output quantized per row to e4m3 in the same pass "
                                              "(FP8Rows: the FP8 sampler's qkv / w12 input)"))
register(Op(name="gated_residual_norm_modulate_fp8", reference=gated_residual_norm_modulate_fp8_reference,
            impls={"triton": gated_residual_norm_modulate_fp8_triton}, bench=_bench_norm_fp8(True),
            doc="gated_residual_norm_modulate with out quantized per row to e4m3 in the same pass: (h, FP8Rows)"))
