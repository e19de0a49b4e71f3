"""Fused norm family: RMSNorm / LayerNorm, optionally with a gated residual in front and an adaLN
modulate behind, as one kernel with compile-time flags (Triton) or the CUDA extension.

    h   = x + gate * y                      (gated_residual_norm_modulate only)
    out = (norm(h) * weight + bias) * (1 + scale) + shift

`gate`, `shift`, `scale` are per-sample (B, C) vectors broadcast over the N tokens of x (B, N, C). The
forward saves only h and the per-row statistics (fp32 mean / rstd); the backward recomputes the
normalised row and reduces the per-channel grads (weight, bias) and per-sample grads (shift, scale, gate)
in fp32 partial sums, one row of partials per program, summed by torch afterwards.

Triton: the forward holds BLOCK_M rows per program, each row as two power-of-two tiles (1152 = 1024 + 128: no
masked lane), the backward walks its R rows BLOCK_M at a time; on a GPU BLOCK_M and the warps are autotuned per op
variant and width (BLOCK_M = 1 among the candidates: the one-row kernels these replaced), under the interpreter a
fixed 16 (INTERPRET_BLOCK_M). Row by row the operations do not depend on BLOCK_M: under the interpreter the forward is bitwise the same
for every BLOCK_M (tests/test_kernels.py checks it); on a GPU the order in which `tl.sum` adds a row follows the
tile's register layout (elements per thread, warps per row), so the mean / rstd of a row can differ in the last
bit between tiles, and the outputs by a rounding step (tests/test_kernels_gpu.py compares at equal tiles, and
across tiles within that).

Each backend has its own launcher pair (`_fwd_triton`/`_bwd_triton`, `_fwd_cuda`/`_bwd_cuda`), registered as its
own custom ops (`vavae::norm_fwd_triton`, `vavae::norm_fwd_cuda`, and their `norm_bwd_*`), so no function here
branches on a backend name. The four ops are declared at the bottom (kernels.registry.Op); their references are
`kernels.reference.{rms_norm, layer_norm, norm_modulate, gated_residual_norm_modulate}`.
"""
from collections.abc import Callable
from typing import Optional

import torch
from torch import Tensor

from . import _triton, cuda_ext, reference
from ._triton import tl, triton
from .registry import BenchCase, BenchFactory, BenchShape, Op, register

ROWS_PER_PROGRAM = 32  # backward: rows one program reduces before writing its partial sums


# A row of C channels is held as two power-of-two tiles (kernels._triton.row_split: 1152 = 1024 + 128, 72 = 64 + 8):
# one next-power-of-two tile (2048, 128) idled 44% of its lanes. Tile A (BLOCK_A <= C) has no masked column; tile B
# masks the columns past C where C - BLOCK_A is not a power of two. With 32-bit offsets inside a program's rows and
# the adaLN vectors loaded once per forward tile (ONE_SAMPLE), sm_90's static SASS per real element of hidden 1152
# went from 49-51 to 31-32 forward (4 rows, 8 warps) and from 42 to 29-30 in the backward's row loop (1 row, 4 warps),
# Triton 3.9 and 3.6 (bench.sm90_check): the forward moves 12 bytes an element, and at ~50 instructions an element
# it spent about half its time issuing at the H200's rate.


@triton.jit
def _per_sample(V, sv, b, cols, cmask, mask, ONE_SAMPLE: tl.constexpr):
    """A per-sample (B, C) vector's columns for a tile of rows, in fp32: where the tile's rows are one sample's
    (ONE_SAMPLE, b its index) one row loaded and broadcast, else a row per tile row (b the rows' samples)."""
    if ONE_SAMPLE:
        v = tl.load(V + b * sv + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    else:
        v = tl.load(V + b[:, None] * sv + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    return v


@triton.jit
def _fwd_tile_in(X, sx, G, sg, Y, sy, H, row, b, cols, cmask, mask, C, HAS_RES: tl.constexpr,
                 ONE_SAMPLE: tl.constexpr):
    """One tile of the rows' input in fp32; with the residual, h = x + gate * y stored (rounded to H's dtype) and
    the stored h returned: the statistics and the backward read the same h."""
    x = tl.load(X + row[:, None] * sx + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        g = _per_sample(G, sg, b, cols, cmask, mask, ONE_SAMPLE)
        y = tl.load(Y + row[:, None] * sy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h = (x + g * y).to(H.dtype.element_ty)
        tl.store(H + row[:, None] * C + cols[None, :], h, mask=mask)
        x = h.to(tl.float32)
    return x


@triton.jit
def _fwd_vectors(W, BIAS, SHIFT, sshift, SCALE, sscale, b, cols, cmask, mask, HAS_W: tl.constexpr,
                 HAS_BIAS: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr,
                 ONE_SAMPLE: tl.constexpr):
    """A tile's weight, bias, 1 + scale and shift in fp32 (the neutral scalar where absent), loaded before the row
    statistics in program order, so their latency can overlap the tile's."""
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)[None, :] if HAS_W else 1.0
    bias = tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32)[None, :] if HAS_BIAS else 0.0
    scale1 = 1.0 + _per_sample(SCALE, sscale, b, cols, cmask, mask, ONE_SAMPLE) if HAS_SCALE else 1.0
    shift = _per_sample(SHIFT, sshift, b, cols, cmask, mask, ONE_SAMPLE) if HAS_SHIFT else 0.0
    return w, bias, scale1, shift


@triton.jit
def _fwd_tile_val(xhat, w, bias, scale1, shift, HAS_W: tl.constexpr, HAS_BIAS: tl.constexpr,
                  HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr):
    """One tile of the normalised rows, affine and modulated, in fp32 (not yet rounded)."""
    out = xhat
    if HAS_W:
        out = out * w
    if HAS_BIAS:
        out = out + bias
    if HAS_SCALE:
        out = out * scale1
    if HAS_SHIFT:
        out = out + shift
    return out


@triton.jit
def _fwd_rows(X, sx, G, sg, Y, sy, W, BIAS, SHIFT, sshift, SCALE, sscale, H, row0, rows, N, C, eps,
              HAS_RES: tl.constexpr, IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_BIAS: tl.constexpr,
              HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr, ONE_SAMPLE: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    """The BLOCK_M rows from row0 up to the modulated output in fp32, not yet rounded (h stored on the way, with
    the residual): (out tile A, out tile B, mean, rstd, row, rmask, ca, cb, ma, mb). Shared by the forward kernel
    and kernels.fp8_quant's, which quantizes the output in the same pass: the same statistics, the same bits."""
    row = tl.arange(0, BLOCK_M)  # rows of the program, from its first
    rmask = row0 + row < rows
    # the per-sample vectors' row: with ONE_SAMPLE (N a multiple of every BLOCK_M) the tile's one sample, else
    # each row's (a tile may straddle samples)
    b = row0 // N if ONE_SAMPLE else (row0 + row) // N
    ca = tl.arange(0, BLOCK_A)
    cb = BLOCK_A + tl.arange(0, BLOCK_B)
    cma = ca < BLOCK_A  # all true (BLOCK_A <= C): tile A's loads are masked by row only
    cmb = cb < C
    ma = rmask[:, None] & cma[None, :]
    mb = rmask[:, None] & cmb[None, :]
    # the program's rows from scalar 64-bit bases; offsets inside them in 32 bits
    X += row0.to(tl.int64) * sx
    Y += row0.to(tl.int64) * sy
    H += row0.to(tl.int64) * C
    xa = _fwd_tile_in(X, sx, G, sg, Y, sy, H, row, b, ca, cma, ma, C, HAS_RES, ONE_SAMPLE)
    xb = _fwd_tile_in(X, sx, G, sg, Y, sy, H, row, b, cb, cmb, mb, C, HAS_RES, ONE_SAMPLE)
    wa, bias_a, scale1_a, shift_a = _fwd_vectors(W, BIAS, SHIFT, sshift, SCALE, sscale, b, ca, cma, ma, HAS_W,
                                                 HAS_BIAS, HAS_SHIFT, HAS_SCALE, ONE_SAMPLE)
    wb, bias_b, scale1_b, shift_b = _fwd_vectors(W, BIAS, SHIFT, sshift, SCALE, sscale, b, cb, cmb, mb, HAS_W,
                                                 HAS_BIAS, HAS_SHIFT, HAS_SCALE, ONE_SAMPLE)
    mean = 0.0
    if not IS_RMS:
        mean = (tl.sum(xa, axis=1) + tl.sum(xb, axis=1)) / C
        xa = xa - mean[:, None]
        xb = tl.where(mb, xb - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt((tl.sum(xa * xa, axis=1) + tl.sum(xb * xb, axis=1)) / C + eps)
    oa = _fwd_tile_val(xa * rstd[:, None], wa, bias_a, scale1_a, shift_a, HAS_W, HAS_BIAS, HAS_SHIFT, HAS_SCALE)
    ob = _fwd_tile_val(xb * rstd[:, None], wb, bias_b, scale1_b, shift_b, HAS_W, HAS_BIAS, HAS_SHIFT, HAS_SCALE)
    return oa, ob, mean, rstd, row, rmask, ca, cb, ma, mb


@triton.jit
def _norm_fwd_kernel(X, sx, G, sg, Y, sy, W, BIAS, SHIFT, sshift, SCALE, sscale, H, OUT, MEAN, RSTD,
                     rows, N, C, eps,
                     HAS_RES: tl.constexpr, IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_BIAS: tl.constexpr,
                     HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr, ONE_SAMPLE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    # BLOCK_M rows per program, each row as tiles A and B: more bytes in flight per program than one row, and the
    # per-channel vectors (weight, bias) loaded once for all of them. Row by row the arithmetic does not depend on
    # BLOCK_M: fp32 sums over the row's C channels (tile A's, then B's added), the same products, one rounding on
    # each store.
    row0 = tl.program_id(0) * BLOCK_M
    oa, ob, mean, rstd, row, rmask, ca, cb, ma, mb = _fwd_rows(
        X, sx, G, sg, Y, sy, W, BIAS, SHIFT, sshift, SCALE, sscale, H, row0, rows, N, C, eps, HAS_RES, IS_RMS, HAS_W,
        HAS_BIAS, HAS_SHIFT, HAS_SCALE, ONE_SAMPLE, BLOCK_M, BLOCK_A, BLOCK_B)
    if not IS_RMS:
        tl.store(MEAN + row0 + row, mean, mask=rmask)
    tl.store(RSTD + row0 + row, rstd, mask=rmask)
    OUT += row0.to(tl.int64) * C
    tl.store(OUT + row[:, None] * C + ca[None, :], oa.to(OUT.dtype.element_ty), mask=ma)
    tl.store(OUT + row[:, None] * C + cb[None, :], ob.to(OUT.dtype.element_ty), mask=mb)


# (rows per program, warps) candidates; _prune_tiles keeps those that fit the row width
_TILES = ((1, 4), (1, 8), (2, 8), (4, 8), (4, 16), (8, 16), (8, 4), (16, 4), (32, 4), (32, 8), (4, 4), (8, 8))


def _tile_configs() -> list:
    return [triton.Config({"BLOCK_M": m}, num_warps=w) for m, w in _TILES]


def _prune_tiles(configs, named_args, max_values: int = 32, **kwargs):
    """Keep tiles of 1K-16K elements at 4-`max_values` values per thread for a row width padded to BLOCK_C (its next
    power of two): 1-8 rows of hidden 1152 (2048), 8-32 rows of head_dim 72 (128); never none."""
    block_c = kwargs["BLOCK_C"]
    keep = [c for c in configs if 1024 <= c.kwargs["BLOCK_M"] * block_c <= 16384
            and 4 <= c.kwargs["BLOCK_M"] * block_c // (32 * c.num_warps) <= max_values]
    return keep or configs[:1]


def _prune_split_tiles(configs, named_args, **kwargs):
    """For rows held as tiles BLOCK_A + BLOCK_B: _prune_tiles at the width's next power of two, up to 64 values a
    thread there (36 real ones at 1152: 4 rows over 4 warps or 8 over 8, whose per-row reductions and layout
    conversions are shared by more elements: the norm forward issues 21.6 SASS instructions an element there against
    32.4 at 4 rows over 8 warps, Triton 3.6), less the tiles whose smaller part leaves threads without an element
    (128 columns of 1152 over 8 warps and 1 row: 57 SASS instructions per element against 21 at 4 rows in the FP8
    row quantization, bench/sm90_check.py)."""
    keep = _prune_tiles(configs, named_args, max_values=64,
                        BLOCK_C=triton.next_power_of_2(kwargs["BLOCK_A"] + kwargs["BLOCK_B"]))
    full = [c for c in keep if c.kwargs["BLOCK_M"] * kwargs["BLOCK_B"] >= 32 * c.num_warps]
    return full or keep


def _prune_split_tiles_bwd(configs, named_args, **kwargs):
    """The forward's tiles at 4 warps and at most 16 values of the row's width per thread: the backward keeps five
    fp32 accumulators per tile beside its tiles (at 16 warps, 128 registers a thread, or more values a thread they
    spill or nearly), and at 8 warps its narrow tile B (128 of 1152) lands in a layout of its own whose conversions
    doubled the row loop: 613 SASS instructions for 2 rows at 8 warps against 268 for 1 row at 4 under Triton 3.6
    (ptxas for sm_90, bench/sm90_check.py). Hidden 1152 keeps 1 row, head_dim 72 16 rows."""
    width = kwargs["BLOCK_A"] + kwargs["BLOCK_B"]
    keep = [c for c in _prune_split_tiles(configs, named_args, **kwargs)
            if c.num_warps <= 4 and c.kwargs["BLOCK_M"] * width // (32 * c.num_warps) <= 16]
    return keep or configs[:1]


_FLAGS = ["C", "HAS_RES", "IS_RMS", "HAS_W", "HAS_BIAS", "HAS_SHIFT", "HAS_SCALE", "BLOCK_A", "BLOCK_B"]
ONE_SAMPLE_ROWS = 32  # every BLOCK_M divides it: N a multiple of it puts each forward tile's rows in one sample
assert all(ONE_SAMPLE_ROWS % m == 0 for m, _ in _TILES)
# On a GPU the rows per program (and warps) are measured per op variant and C on the first call (triton.autotune;
# BLOCK_M = 1 is the one-row kernel this replaced, so the choice is never worse than it); under the interpreter a
# fixed tile (INTERPRET_BLOCK_M, which does not divide the test's row counts: the ragged last tile runs; 16 rows,
# since the interpreter's cost is per program and op, not per element: the two-tile kernels made the tests that run
# the model through them 1.5-3x slower at 4; the ragged-tile test sets 1, 2, 4 and 8 itself).
_norm_fwd_tuned = triton.autotune(configs=_tile_configs(), key=_FLAGS + ["ONE_SAMPLE"],
                                  prune_configs_by={"early_config_prune": _prune_split_tiles})(_norm_fwd_kernel)
INTERPRET_BLOCK_M = 16


@triton.jit
def _bwd_tile_in(DOUT, XIN, offs, mask, mean, rstd, w, bias, scale1, acc_w, acc_b, acc_shift, acc_scale,
                 IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SHIFT: tl.constexpr,
                 HAS_SCALE: tl.constexpr):
    """One tile of the rows: the normalised row recomputed from the stored input, the per-channel and per-sample
    grads added to their accumulators, and the grad of the normalised row. Returns (xhat, dxhat, acc_w, acc_b,
    acc_shift, acc_scale); 0 in masked lanes."""
    dout = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(XIN + offs, mask=mask, other=0.0).to(tl.float32)
    if IS_RMS:
        xhat = x * rstd
    else:
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
    dn = dout
    if HAS_SHIFT:
        acc_shift += tl.sum(dout, axis=0)
    if HAS_SCALE:
        acc_scale += tl.sum(dout * (xhat * w + bias), axis=0)
        dn = dout * scale1
    if HAS_BIAS:
        acc_b += tl.sum(dn, axis=0)
    if HAS_W:
        acc_w += tl.sum(dn * xhat, axis=0)
    return xhat, dn * w, acc_w, acc_b, acc_shift, acc_scale


@triton.jit
def _bwd_tile_out(xhat, dxhat, rstd, c1, c2, DH, DX, DY, Y, sy, g, row, cols, offs, mask, acc_g,
                  IS_RMS: tl.constexpr, HAS_DH: tl.constexpr, HAS_RES: tl.constexpr):
    """One tile's dx (and dy = gate * dx) from the row sums c1 = mean(dxhat), c2 = mean(dxhat * xhat), stored;
    returns the gate's accumulator with this tile's sum(dx * y) added."""
    if IS_RMS:
        dx = rstd * (dxhat - xhat * c2)
    else:
        dx = rstd * (dxhat - c1 - xhat * c2)
    if HAS_DH:
        dx += tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
    if HAS_RES:
        tl.store(DY + offs, (g * dx).to(DY.dtype.element_ty), mask=mask)
        acc_g += tl.sum(dx * tl.load(Y + row[:, None] * sy + cols[None, :], mask=mask, other=0.0).to(tl.float32),
                        axis=0)
    return acc_g


@triton.jit
def _bwd_vectors(W, BIAS, SCALE, sscale, G, sg, b, cols, cmask, HAS_RES: tl.constexpr, HAS_W: tl.constexpr,
                 HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr):
    """A tile's per-channel weight and bias, and its sample's 1 + scale and gate (the neutral scalar if absent)."""
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32) if HAS_W else 1.0
    bias = tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32) if HAS_BIAS else 0.0
    scale1 = 1.0 + tl.load(SCALE + b * sscale + cols, mask=cmask, other=0.0).to(tl.float32) if HAS_SCALE else 1.0
    g = tl.load(G + b * sg + cols, mask=cmask, other=0.0).to(tl.float32) if HAS_RES else 0.0
    return w, bias, scale1, g


@triton.jit
def _store_partials(p, cols, cmask, PW, PB, PSHIFT, PSCALE, PG, acc_w, acc_b, acc_shift, acc_scale, acc_g,
                    HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SHIFT: tl.constexpr,
                    HAS_SCALE: tl.constexpr):
    if HAS_W:
        tl.store(PW + p + cols, acc_w, mask=cmask)
    if HAS_BIAS:
        tl.store(PB + p + cols, acc_b, mask=cmask)
    if HAS_SHIFT:
        tl.store(PSHIFT + p + cols, acc_shift, mask=cmask)
    if HAS_SCALE:
        tl.store(PSCALE + p + cols, acc_scale, mask=cmask)
    if HAS_RES:
        tl.store(PG + p + cols, acc_g, mask=cmask)


@triton.jit
def _norm_bwd_kernel(DOUT, DH, XIN, G, sg, Y, sy, W, BIAS, SCALE, sscale, MEAN, RSTD,
                     DX, DY, PW, PB, PSHIFT, PSCALE, PG,
                     N, C, R,
                     HAS_RES: tl.constexpr, HAS_DH: tl.constexpr, IS_RMS: tl.constexpr, HAS_W: tl.constexpr,
                     HAS_BIAS: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    # One pass per program over its R rows (one sample's), BLOCK_M rows at a time, each row as tiles A and B: dx
    # (and dy) written row by row, the per-channel (weight, bias) and per-sample (shift, scale, gate) grads summed
    # in fp32 registers and written once as this program's row of partial sums; torch then sums those rows (one
    # small reduction per grad).
    b = tl.program_id(0)
    chunk = tl.program_id(1)
    n_chunks = tl.num_programs(1)
    # the program's rows from scalar 64-bit bases; offsets inside them (R rows) in 32 bits
    start = chunk * R
    end = tl.minimum(start + R, N)
    first = (b * N).to(tl.int64)
    DOUT += first * C
    DH += first * C
    XIN += first * C
    DX += first * C
    DY += first * C
    Y += first * sy
    MEAN += first
    RSTD += first
    ca = tl.arange(0, BLOCK_A)
    cb = BLOCK_A + tl.arange(0, BLOCK_B)
    cma = ca < BLOCK_A  # all true (BLOCK_A <= C)
    cmb = cb < C
    w_a, bias_a, scale1_a, g_a = _bwd_vectors(W, BIAS, SCALE, sscale, G, sg, b, ca, cma, HAS_RES, HAS_W, HAS_BIAS,
                                              HAS_SCALE)
    w_b, bias_b, scale1_b, g_b = _bwd_vectors(W, BIAS, SCALE, sscale, G, sg, b, cb, cmb, HAS_RES, HAS_W, HAS_BIAS,
                                              HAS_SCALE)
    acc_wa = tl.zeros([BLOCK_A], dtype=tl.float32)
    acc_ba = tl.zeros([BLOCK_A], dtype=tl.float32)
    acc_sha = tl.zeros([BLOCK_A], dtype=tl.float32)
    acc_sca = tl.zeros([BLOCK_A], dtype=tl.float32)
    acc_ga = tl.zeros([BLOCK_A], dtype=tl.float32)
    acc_wb = tl.zeros([BLOCK_B], dtype=tl.float32)
    acc_bb = tl.zeros([BLOCK_B], dtype=tl.float32)
    acc_shb = tl.zeros([BLOCK_B], dtype=tl.float32)
    acc_scb = tl.zeros([BLOCK_B], dtype=tl.float32)
    acc_gb = tl.zeros([BLOCK_B], dtype=tl.float32)
    for r0 in range(start, end, BLOCK_M):
        row = r0 + tl.arange(0, BLOCK_M)
        rmask = row < end
        ma = rmask[:, None] & cma[None, :]
        mb = rmask[:, None] & cmb[None, :]
        offs_a = row[:, None] * C + ca[None, :]
        offs_b = row[:, None] * C + cb[None, :]
        rstd = tl.load(RSTD + row, mask=rmask, other=0.0)[:, None]
        mean = rstd if IS_RMS else tl.load(MEAN + row, mask=rmask, other=0.0)[:, None]
        xhat_a, dxhat_a, acc_wa, acc_ba, acc_sha, acc_sca = _bwd_tile_in(
            DOUT, XIN, offs_a, ma, mean, rstd, w_a, bias_a, scale1_a, acc_wa, acc_ba, acc_sha, acc_sca,
            IS_RMS, HAS_W, HAS_BIAS, HAS_SHIFT, HAS_SCALE)
        xhat_b, dxhat_b, acc_wb, acc_bb, acc_shb, acc_scb = _bwd_tile_in(
            DOUT, XIN, offs_b, mb, mean, rstd, w_b, bias_b, scale1_b, acc_wb, acc_bb, acc_shb, acc_scb,
            IS_RMS, HAS_W, HAS_BIAS, HAS_SHIFT, HAS_SCALE)
        # dh and y are loaded after the row sums (ptxas schedules them; loaded with dout and x above they took 210
        # registers instead of 142 and 325-328 instructions a row loop instead of 268-274, sm90_check)
        c2 = ((tl.sum(dxhat_a * xhat_a, axis=1) + tl.sum(dxhat_b * xhat_b, axis=1)) / C)[:, None]
        c1 = c2 if IS_RMS else ((tl.sum(dxhat_a, axis=1) + tl.sum(dxhat_b, axis=1)) / C)[:, None]
        acc_ga = _bwd_tile_out(xhat_a, dxhat_a, rstd, c1, c2, DH, DX, DY, Y, sy, g_a, row, ca, offs_a, ma, acc_ga,
                               IS_RMS, HAS_DH, HAS_RES)
        acc_gb = _bwd_tile_out(xhat_b, dxhat_b, rstd, c1, c2, DH, DX, DY, Y, sy, g_b, row, cb, offs_b, mb, acc_gb,
                               IS_RMS, HAS_DH, HAS_RES)
    p = (b * n_chunks + chunk).to(tl.int64) * C
    _store_partials(p, ca, cma, PW, PB, PSHIFT, PSCALE, PG, acc_wa, acc_ba, acc_sha, acc_sca, acc_ga,
                    HAS_RES, HAS_W, HAS_BIAS, HAS_SHIFT, HAS_SCALE)
    _store_partials(p, cb, cmb, PW, PB, PSHIFT, PSCALE, PG, acc_wb, acc_bb, acc_shb, acc_scb, acc_gb,
                    HAS_RES, HAS_W, HAS_BIAS, HAS_SHIFT, HAS_SCALE)


# Every output (dx, dy, each program's partial-sum row) is written whole by each run, so configs can be timed on the
# real buffers. BLOCK_M = 1 is the row-at-a-time loop this replaced.
_norm_bwd_tuned = triton.autotune(configs=_tile_configs(),
                                  key=_FLAGS[:2] + ["HAS_DH"] + _FLAGS[2:],
                                  prune_configs_by={"early_config_prune": _prune_split_tiles_bwd})(_norm_bwd_kernel)


# ----------------------------------------------------------------------------- shapes shared by every backend

def _geometry(x: Tensor, per_sample: bool) -> tuple[int, int, int, int]:
    """(rows, C, N, B): N rows share one per-sample vector; B such groups."""
    C = x.shape[-1]
    rows = x.numel() // C
    if per_sample:
        if x.dim() != 3:
            raise ValueError(f"modulate/gate need x of shape (B, N, C), got {tuple(x.shape)}")
        return rows, C, x.shape[1], x.shape[0]
    return rows, C, rows, 1


def _dtypes(x, gate, y, weight, bias, shift, scale, out_dtype=None) -> tuple[torch.dtype, torch.dtype]:
    # the reference's type promotion: h in x/gate/y's common dtype, out promoted by the affine and adaLN vectors,
    # unless the caller asks for out in the dtype its consumer computes in (out_dtype: the kernels write it directly)
    h_dtype = x.dtype
    if gate is not None:
        h_dtype = torch.promote_types(torch.promote_types(h_dtype, gate.dtype), y.dtype)
    if out_dtype is not None:
        return h_dtype, out_dtype
    out_dtype = h_dtype
    for t in (weight, bias, shift, scale):
        if t is not None:
            out_dtype = torch.promote_types(out_dtype, t.dtype)
    return h_dtype, out_dtype


def _empty(x: Tensor) -> Tensor:
    # absent outputs are 0-element tensors: a custom op's outputs cannot be None
    return x.new_empty(0)


def _fwd_outputs(x, gate, y, weight, bias, shift, scale, rms, out_dtype):
    """The forward's outputs (h, out, mean, rstd), allocated, and (rows, C, N): h is empty without a residual,
    mean is empty for RMSNorm."""
    rows, C, N, _ = _geometry(x, gate is not None or shift is not None or scale is not None)
    h_dtype, out_dtype = _dtypes(x, gate, y, weight, bias, shift, scale, out_dtype)
    h = torch.empty(x.shape, dtype=h_dtype, device=x.device) if gate is not None else _empty(x)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    mean = _empty(x).float() if rms else torch.empty(rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    return (h, out, mean, rstd), (rows, C, N)


def _row_views(x, gate, y, shift, scale):
    """x and y as (rows, C) with unit column stride; the per-sample vectors with unit stride (copies only where
    a strided view cannot be read as rows)."""
    vec = lambda t: _triton.vec_rows(t) if t is not None else None  # noqa: E731
    return _triton.rows_2d(x), vec(gate), _triton.rows_2d(y) if gate is not None else None, vec(shift), vec(scale)


def _bwd_buffers(xin, gate, y, weight, bias, has_shift, scale):
    """dx, dy and the fp32 partial sums (weight, bias, shift, scale, gate), one (B, chunks, C) slab each, plus
    (rows, C, N, B, R, chunks): R rows per program of the backward, `chunks` programs per sample."""
    rows, C, N, B = _geometry(xin, gate is not None or has_shift or scale is not None)
    dx = torch.empty(xin.shape, dtype=xin.dtype, device=xin.device)
    dy = torch.empty(y.shape, dtype=y.dtype, device=y.device) if gate is not None else _empty(xin)
    R = max(1, min(ROWS_PER_PROGRAM, N))
    chunks = triton.cdiv(N, R) if N else 0
    part = lambda on: torch.empty((B, chunks, C) if on else (0,), dtype=torch.float32, device=xin.device)  # noqa
    partials = (part(weight is not None), part(bias is not None), part(has_shift), part(scale is not None),
                part(gate is not None))
    return dx, dy, partials, (rows, C, N, B, R, chunks)


def _bwd_inputs(dout, dh, xin, gate, y, scale):
    """The backward's row views; dout/dh/xin contiguous because the kernels index them as dense rows."""
    return (_triton.rows_2d(dout).contiguous(), _triton.rows_2d(dh).contiguous() if dh is not None else None,
            _triton.rows_2d(xin).contiguous(), _triton.vec_rows(gate) if gate is not None else None,
            _triton.rows_2d(y) if gate is not None else None,
            _triton.vec_rows(scale) if scale is not None else None)


def _bwd_reduce(partials, dout, xin, gate, weight, bias, has_shift, scale, B, C):
    """Sum each program's fp32 partials (in fp32, then one rounding to the parameter's dtype)."""
    pw, pb, psh, psc, pg = partials

    def reduce(p: Tensor, like: Optional[Tensor], dims) -> Tensor:
        return p.sum(dims).to(like.dtype) if like is not None and p.numel() else (
            torch.zeros_like(like) if like is not None else _empty(xin))
    dshift = psh.sum(1).to(dout.dtype) if has_shift and psh.numel() else (
        xin.new_zeros((B, C), dtype=dout.dtype) if has_shift else _empty(xin))
    return reduce(pg, gate, 1), reduce(pw, weight, (0, 1)), reduce(pb, bias, (0, 1)), dshift, reduce(psc, scale, 1)


# ----------------------------------------------------------------------------- launchers (one per backend)

def _fwd_triton(x, gate, y, weight, bias, shift, scale, eps, rms, out_dtype, tile=None):
    """Returns (h, out, mean, rstd). tile: (BLOCK_M, warps) instead of the autotuner's pick (the GPU tests compare
    the FP8 norm with this one at the same tile: on a GPU the row sums' order follows the tile's layout)."""
    (h, out, mean, rstd), (rows, C, N) = _fwd_outputs(x, gate, y, weight, bias, shift, scale, rms, out_dtype)
    if rows == 0:
        return h, out, mean, rstd
    x2, g, y2, sh, sc = _row_views(x, gate, y, shift, scale)
    BLOCK_A, BLOCK_B = _triton.row_split(C)
    dummy = x2  # pointer for an absent input: never read (its HAS_* flag is off)
    args = (
        x2, x2.stride(0), g if g is not None else dummy, g.stride(0) if g is not None else 0,
        y2 if y2 is not None else dummy, y2.stride(0) if y2 is not None else 0,
        weight if weight is not None else dummy, bias if bias is not None else dummy,
        sh if sh is not None else dummy, sh.stride(0) if sh is not None else 0,
        sc if sc is not None else dummy, sc.stride(0) if sc is not None else 0,
        h if g is not None else out, out, mean if not rms else rstd, rstd,
        rows, N, C, eps)
    flags = dict(HAS_RES=g is not None, IS_RMS=rms, HAS_W=weight is not None, HAS_BIAS=bias is not None,
                 HAS_SHIFT=sh is not None, HAS_SCALE=sc is not None, ONE_SAMPLE=N % ONE_SAMPLE_ROWS == 0,
                 BLOCK_A=BLOCK_A, BLOCK_B=BLOCK_B)
    if tile is None and _triton.interpreting():
        tile = (INTERPRET_BLOCK_M, 4)
    if tile is not None:
        _norm_fwd_kernel[(triton.cdiv(rows, tile[0]),)](*args, **flags, BLOCK_M=tile[0], num_warps=tile[1])
    else:
        _norm_fwd_tuned[lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]),)](*args, **flags)
    return h, out, mean, rstd


def _fwd_cuda(x, gate, y, weight, bias, shift, scale, eps, rms, out_dtype):
    """Returns (h, out, mean, rstd), computed by the CUDA extension."""
    (h, out, mean, rstd), (rows, C, N) = _fwd_outputs(x, gate, y, weight, bias, shift, scale, rms, out_dtype)
    if rows:
        x2, g, y2, sh, sc = _row_views(x, gate, y, shift, scale)
        cuda_ext.norm_fwd(x2, g, y2, weight, bias, sh, sc, h, out, mean, rstd, N, eps, rms)
    return h, out, mean, rstd


def _check_sample_offsets(N: int, C: int) -> None:
    """The Triton backward indexes a sample's rows from its first in 32 bits: N * C elements must fit."""
    if N * C >= 2 ** 31:
        raise ValueError(f"norm backward (Triton): {N} rows x {C} channels in one sample is past 32-bit offsets "
                         f"({N * C} elements); use kernels backend 'reference' or 'cuda' for it")


def _bwd_triton(dout, dh, xin, gate, y, weight, bias, has_shift, scale, mean, rstd, rms):
    """Returns (dx, dy, dgate, dweight, dbias, dshift, dscale); grads of absent inputs are empty.
    xin is h (with a residual) or x; dx is the grad of h/x in xin's dtype."""
    dx, dy, partials, (rows, C, N, B, R, chunks) = _bwd_buffers(xin, gate, y, weight, bias, has_shift, scale)
    if rows:
        _check_sample_offsets(N, C)
        dout2, dh2, xin2, g, y2, sc = _bwd_inputs(dout, dh, xin, gate, y, scale)
        pw, pb, psh, psc, pg = partials
        BLOCK_A, BLOCK_B = _triton.row_split(C)
        d = dout2  # pointer for an absent input: never read
        args = (
            dout2, dh2 if dh2 is not None else d, xin2, g if g is not None else d, g.stride(0) if g is not None else 0,
            y2 if y2 is not None else d, y2.stride(0) if y2 is not None else 0, weight if weight is not None else d,
            bias if bias is not None else d, sc if sc is not None else d, sc.stride(0) if sc is not None else 0,
            mean if not rms else rstd, rstd, dx, dy if g is not None else dx, pw, pb, psh, psc, pg,
            N, C, R)
        flags = dict(HAS_RES=g is not None, HAS_DH=dh is not None, IS_RMS=rms, HAS_W=weight is not None,
                     HAS_BIAS=bias is not None, HAS_SHIFT=has_shift, HAS_SCALE=scale is not None, BLOCK_A=BLOCK_A,
                     BLOCK_B=BLOCK_B)
        if _triton.interpreting():
            _norm_bwd_kernel[(B, chunks)](*args, **flags, BLOCK_M=INTERPRET_BLOCK_M, num_warps=4)
        else:
            _norm_bwd_tuned[(B, chunks)](*args, **flags)
    return (dx, dy, *_bwd_reduce(partials, dout, xin, gate, weight, bias, has_shift, scale, B, C))


def _bwd_cuda(dout, dh, xin, gate, y, weight, bias, has_shift, scale, mean, rstd, rms):
    """_bwd_triton's contract, computed by the CUDA extension."""
    dx, dy, partials, (rows, C, N, B, R, _) = _bwd_buffers(xin, gate, y, weight, bias, has_shift, scale)
    if rows:
        dout2, dh2, xin2, g, y2, sc = _bwd_inputs(dout, dh, xin, gate, y, scale)
        cuda_ext.norm_bwd(dout2, dh2, xin2, g, y2, weight, bias, sc, mean, rstd, dx, dy, *partials, N, R, rms,
                          has_shift)
    return (dx, dy, *_bwd_reduce(partials, dout, xin, gate, weight, bias, has_shift, scale, B, C))


# ----------------------------------------------------------------------------- custom ops (fake + autograd)

def _fwd_fake(x, gate, y, weight, bias, shift, scale, eps, rms, out_dtype):
    rows = x.numel() // x.shape[-1]
    h_dtype, out_dtype = _dtypes(x, gate, y, weight, bias, shift, scale, out_dtype)
    h = x.new_empty(x.shape, dtype=h_dtype) if gate is not None else x.new_empty(0)
    mean = x.new_empty(0 if rms else rows, dtype=torch.float32)
    return h, x.new_empty(x.shape, dtype=out_dtype), mean, x.new_empty(rows, dtype=torch.float32)


def _bwd_fake(dout, dh, xin, gate, y, weight, bias, has_shift, scale, mean, rstd, rms):
    per_sample = gate is not None or has_shift or scale is not None
    _, C, _, B = _geometry(xin, per_sample)
    e = lambda: xin.new_empty(0)  # noqa: E731  a fresh one per absent gradient: outputs never alias each other
    like = lambda t: t.new_empty(t.shape) if t is not None else e()  # noqa: E731  (contiguous, as the kernels write)
    dy = y.new_empty(y.shape) if gate is not None else e()
    dshift = xin.new_empty((B, C), dtype=dout.dtype) if has_shift else e()
    return (xin.new_empty(xin.shape), dy, like(gate), like(weight), like(bias), dshift, like(scale))


def _setup(ctx, inputs, output):
    x, gate, y, weight, bias, shift, scale, eps, rms, _ = inputs
    h, out, mean, rstd = output
    xin = h if gate is not None else x  # the backward recomputes the normalised row from the stored h
    ctx.save_for_backward(xin, gate, y, weight, bias, scale, mean, rstd)
    ctx.rms, ctx.has_shift = rms, shift is not None
    ctx.dtypes = (x.dtype, None if shift is None else shift.dtype)
    # an unused h (the final layer's: only `out` feeds its Linear) gets no gradient, not an activation of zeros that
    # autograd would write and the kernel read back; the statistics never get one
    ctx.set_materialize_grads(False)


def _custom_ops(suffix: str, fwd_launcher: Callable, bwd_launcher: Callable):
    """Register `vavae::norm_fwd_<suffix>` / `vavae::norm_bwd_<suffix>` around one backend's two launchers, with
    their fake impls and the autograd formula (the forward op's backward calls this backend's backward op)."""

    @torch.library.custom_op(f"vavae::norm_fwd_{suffix}", mutates_args=())
    def norm_fwd(x: Tensor, gate: Optional[Tensor], y: Optional[Tensor], weight: Optional[Tensor],
                 bias: Optional[Tensor], shift: Optional[Tensor], scale: Optional[Tensor], eps: float,
                 rms: bool, out_dtype: Optional[torch.dtype]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return fwd_launcher(x, gate, y, weight, bias, shift, scale, eps, rms, out_dtype)

    @torch.library.custom_op(f"vavae::norm_bwd_{suffix}", mutates_args=())
    def norm_bwd(dout: Tensor, dh: Optional[Tensor], xin: Tensor, gate: Optional[Tensor], y: Optional[Tensor],
                 weight: Optional[Tensor], bias: Optional[Tensor], has_shift: bool, scale: Optional[Tensor],
                 mean: Tensor, rstd: Tensor, rms: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                                                 Tensor]:
        return bwd_launcher(dout, dh, xin, gate, y, weight, bias, has_shift, scale, mean, rstd, rms)

    norm_fwd.register_fake(_fwd_fake)
    norm_bwd.register_fake(_bwd_fake)

    def backward(ctx, dh: Optional[Tensor], dout: Optional[Tensor], dmean: Optional[Tensor],
                 drstd: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
        xin, gate, y, weight, bias, scale, mean, rstd = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(xin)
        if dh is not None and gate is None:  # h is an empty placeholder without a residual
            dh = None
        dx, dy, dgate, dweight, dbias, dshift, dscale = norm_bwd(
            dout, dh, xin, gate, y, weight, bias, ctx.has_shift, scale, mean, rstd, ctx.rms)
        x_dtype, shift_dtype = ctx.dtypes
        has_res = gate is not None
        return (dx.to(x_dtype), dgate if has_res else None, dy if has_res else None,
                dweight if weight is not None else None, dbias if bias is not None else None,
                dshift.to(shift_dtype) if ctx.has_shift else None, dscale if scale is not None else None,
                None, None, None)

    norm_fwd.register_autograd(backward, setup_context=_setup)
    return norm_fwd


norm_fwd_triton = _custom_ops("triton", _fwd_triton, _bwd_triton)
norm_fwd_cuda = _custom_ops("cuda", _fwd_cuda, _bwd_cuda)


# ----------------------------------------------------------------------------- the ops, one function per backend

def _rms(kind: str) -> bool:
    if kind not in ("rms", "layer"):
        raise ValueError(f"unknown norm kind {kind!r} (expected 'rms' or 'layer')")
    return kind == "rms"


class NormOps:
    """The four ops of this family on one backend's custom op (kernels.reference signatures). One instance per
    backend (written once, so the backends cannot drift apart): `TRITON.rms_norm` is what
    `resolve("rms_norm", x)` returns under the triton backend, `CUDA.rms_norm` under cuda."""

    def __init__(self, backend: str, norm_fwd: Callable) -> None:
        self.backend, self._fwd = backend, norm_fwd

    def __repr__(self) -> str:
        return f"fused_norm.NormOps({self.backend!r})"

    def rms_norm(self, x: Tensor, weight: Optional[Tensor], eps: float = 1e-6) -> Tensor:
        return self._fwd(x, None, None, weight, None, None, None, eps, True, None)[1]

    def layer_norm(self, x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                   eps: float = 1e-6) -> Tensor:
        return self._fwd(x, None, None, weight, bias, None, None, eps, False, None)[1]

    def norm_modulate(self, x: Tensor, weight: Optional[Tensor], shift: Optional[Tensor], scale: Tensor,
                      eps: float = 1e-6, kind: str = "rms", out_dtype: Optional[torch.dtype] = None) -> Tensor:
        return self._fwd(x, None, None, weight, None, shift, scale, eps, _rms(kind), out_dtype)[1]

    def gated_residual_norm_modulate(self, x: Tensor, gate: Tensor, y: Tensor, weight: Optional[Tensor],
                                     shift: Optional[Tensor], scale: Tensor, eps: float = 1e-6,
                                     kind: str = "rms", out_dtype: Optional[torch.dtype] = None
                                     ) -> tuple[Tensor, Tensor]:
        h, out, _, _ = self._fwd(x, gate, y, weight, None, shift, scale, eps, _rms(kind), out_dtype)
        return h, out


TRITON, CUDA = NormOps("triton", norm_fwd_triton), NormOps("cuda", norm_fwd_cuda)


# ----------------------------------------------------------------------------- declarations

def _bench(op: str) -> BenchFactory:
    def case(s: BenchShape, device: str, dtype: torch.dtype) -> BenchCase:
        r = lambda *shape, dt=dtype: torch.randn(*shape, device=device, dtype=dt, requires_grad=True)  # noqa: E731
        el = s.rows * s.C  # elements of one (B, N, C) activation
        size = {"B": s.B, "N": s.N, "C": s.C}
        if op == "rms_norm":  # the qk-norm's, on heads in the activations' dtype
            RC = el * dtype.itemsize
            return BenchCase([r(s.B, s.N, s.C), r(s.C)], lambda f, x, w: f(x, w, 1e-6), 2 * RC, 3 * RC, shape=size)
        if op == "layer_norm":  # the qk-norm's LayerNorm, affine
            RC = el * dtype.itemsize
            return BenchCase([r(s.B, s.N, s.C), r(s.C), r(s.C)], lambda f, x, w, b: f(x, w, b, 1e-6), 2 * RC, 3 * RC,
                             shape=size)
        # The block's norms as a 16-bit training step has them (autocast): the residual stream x and the norm
        # weight fp32, the branch output y and the adaLN vectors in the 16-bit dtype, the normalised output
        # written in it for the next GEMM (out_dtype) and its gradient arriving in it. In fp32: all fp32.
        xt = torch.float32
        lo = dtype
        X, V = el * xt.itemsize, el * lo.itemsize  # one activation in the residual's / the branch's dtype
        x, y, w, mod = r(s.B, s.N, s.C, dt=xt), r(s.B, s.N, s.C), r(s.C, dt=xt), r(s.B, 6 * s.C)
        # shift/scale/gate are strided chunks of the adaLN output, as in the model
        sh, sc, g = (lambda m: m[:, :s.C]), (lambda m: m[:, s.C:2 * s.C]), (lambda m: m[:, 2 * s.C:3 * s.C])
        to = lo if lo != xt else None
        size["dtypes"] = f"x {xt}, y/vectors/out {lo}"
        if op == "norm_modulate":  # fwd: x in, out out; bwd: x and dout in, dx out
            return BenchCase([x, w, mod], lambda f, x, w, m: f(x, w, sh(m), sc(m), 1e-6, "rms", to), X + V,
                             2 * X + V, shape=size)
        # fwd: x, y in; h, out out. bwd: h, dout, dh, y in; dx, dy out
        return BenchCase([x, y, w, mod], lambda f, x, y, w, m: f(x, g(m), y, w, sh(m), sc(m), 1e-6, "rms", to),
                         2 * X + 2 * V, 3 * X + 3 * V, shape=size)
    return case


# Under torch.compile, `auto` runs what kernels/compiled_choices.json says (measured: bench/compiled_choices.py)
for _name, _doc in (
        ("rms_norm", "RMSNorm: fp32 statistics, weight"),
        ("layer_norm", "LayerNorm: fp32 statistics, weight and bias"),
        ("norm_modulate", "norm + x*(1+scale)+shift (per-sample, broadcast over tokens; shift=None: wo_shift); "
                          "bwd reduces dweight/dshift/dscale"),
        ("gated_residual_norm_modulate", "h = x + gate*y; out = modulate(norm(h)), returns (h, out); bwd adds the "
                                         "grad of h, writes dx, dy, reduces dgate")):
    register(Op(name=_name, reference=getattr(reference, _name), doc=_doc, bench=_bench(_name),
                impls={"triton": getattr(TRITON, _name), "cuda": getattr(CUDA, _name)}))
