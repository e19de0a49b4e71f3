"""Fused norm family: RMSNorm / LayerNorm, optionally with a gated residual in front and an adaLN
modulate behind, as one kernel with compile-time flags (Triton) or the CUDA extension.

    h   = x + gate * y                      (gated_residual_norm_modulate only)
    out = (norm(h) * weight + bias) * (1 + scale) + shift

`gate`, `shift`, `scale` are per-sample (B, C) vectors broadcast over the N tokens of x (B, N, C). The
forward saves only h and the per-row statistics (fp32 mean / rstd); the backward recomputes the
normalised row and reduces the per-channel grads (weight, bias) and per-sample grads (shift, scale, gate)
in fp32 partial sums, one row of partials per program, summed by torch afterwards.

Triton: the forward holds BLOCK_M rows per program (a BLOCK_M x BLOCK_C tile), the backward walks its R rows
BLOCK_M at a time; on a GPU BLOCK_M and the warps are autotuned per op variant and width (BLOCK_M = 1 among the
candidates: the one-row kernels these replaced), under the interpreter a fixed 4. Row by row the arithmetic does
not depend on BLOCK_M (the forward is bitwise the same for every BLOCK_M; tests/test_kernels.py checks it).

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


@triton.jit
def _norm_fwd_kernel(X, sx, G, sg, Y, sy, W, BIAS, SHIFT, sshift, SCALE, sscale, H, OUT, MEAN, RSTD,
                     rows, N, C, eps,
                     HAS_RES: tl.constexpr, IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_BIAS: tl.constexpr,
                     HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_C: tl.constexpr):
    # BLOCK_M rows per program, a (BLOCK_M, BLOCK_C) tile: more bytes in flight per program than one row, and the
    # per-channel vectors (weight, bias) loaded once for all of them. Row by row the arithmetic is the one-row
    # kernel's (BLOCK_M = 1): fp32 sums over the row's C channels, the same products, one rounding on each store.
    row = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = row < rows
    b = row // N  # each row's sample (a tile may straddle two): its gate/shift/scale row
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    mask = rmask[:, None] & cmask[None, :]
    x = tl.load(X + row[:, None] * sx + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        g = tl.load(G + b[:, None] * sg + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        y = tl.load(Y + row[:, None] * sy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h = (x + g * y).to(H.dtype.element_ty)
        tl.store(H + row[:, None] * C + cols[None, :], h, mask=mask)
        x = h.to(tl.float32)  # normalise the stored (rounded) h: the backward recomputes from it
    if IS_RMS:
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / C + eps)
        xhat = x * rstd[:, None]
    else:
        mean = tl.sum(x, axis=1) / C
        xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / C + eps)
        xhat = xc * rstd[:, None]
        tl.store(MEAN + row, mean, mask=rmask)
    tl.store(RSTD + row, rstd, mask=rmask)
    out = xhat
    if HAS_W:
        out = out * tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        out = out + tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_SCALE:
        out = out * (1.0 + tl.load(SCALE + b[:, None] * sscale + cols[None, :], mask=mask, other=0.0).to(tl.float32))
    if HAS_SHIFT:
        out = out + tl.load(SHIFT + b[:, None] * sshift + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + row[:, None] * C + cols[None, :], out.to(OUT.dtype.element_ty), mask=mask)


# (rows per program, warps) candidates; _prune_tiles keeps those that fit the row width
_TILES = ((1, 4), (1, 8), (2, 8), (4, 8), (4, 16), (8, 16), (8, 4), (16, 4), (32, 4), (32, 8))


def _tile_configs() -> list:
    return [triton.Config({"BLOCK_M": m}, num_warps=w) for m, w in _TILES]


def _prune_tiles(configs, named_args, **kwargs):
    """Keep tiles of 1K-16K elements at 4-32 values per thread for this row width: 1-8 rows of hidden 1152 (a
    2048-wide tile, 6 candidates), 8-32 rows of head_dim 72 (128 wide, 4 candidates); never none."""
    block_c = kwargs["BLOCK_C"]
    keep = [c for c in configs if 1024 <= c.kwargs["BLOCK_M"] * block_c <= 16384
            and 4 <= c.kwargs["BLOCK_M"] * block_c // (32 * c.num_warps) <= 32]
    return keep or configs[:1]


def _prune_tiles_bwd(configs, named_args, **kwargs):
    """The forward's tiles at most 8 warps and 16 values per thread: the backward keeps five fp32 accumulators of
    BLOCK_C beside its tile; at 16 warps (128 registers a thread) or 32 values a thread its tiles spill or nearly
    (ptxas for sm_90, kernels/sm90_check.py): hidden 1152 keeps 1-2 rows, head_dim 72 8-32."""
    block_c = kwargs["BLOCK_C"]
    keep = [c for c in _prune_tiles(configs, named_args, **kwargs)
            if c.num_warps <= 8 and c.kwargs["BLOCK_M"] * block_c // (32 * c.num_warps) <= 16]
    return keep or configs[:1]


_FLAGS = ["C", "HAS_RES", "IS_RMS", "HAS_W", "HAS_BIAS", "HAS_SHIFT", "HAS_SCALE", "BLOCK_C"]
# On a GPU the rows per program (and warps) are measured per op variant and C on the first call (triton.autotune;
# BLOCK_M = 1 is the one-row kernel this replaced, so the choice is never worse than it); under the interpreter a
# fixed small tile (INTERPRET_BLOCK_M, which does not divide the test's row counts: the ragged last tile runs).
_norm_fwd_tuned = triton.autotune(configs=_tile_configs(), key=_FLAGS,
                                  prune_configs_by={"early_config_prune": _prune_tiles})(_norm_fwd_kernel)
INTERPRET_BLOCK_M = 4


@triton.jit
def _norm_bwd_kernel(DOUT, DH, XIN, G, sg, Y, sy, W, BIAS, SCALE, sscale, MEAN, RSTD,
                     DX, DY, PW, PB, PSHIFT, PSCALE, PG,
                     N, C, R,
                     HAS_RES: tl.constexpr, HAS_DH: tl.constexpr, IS_RMS: tl.constexpr, HAS_W: tl.constexpr,
                     HAS_BIAS: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    # One pass per program over its R rows (one sample's), BLOCK_M rows at a time: dx (and dy) written row by row,
    # the per-channel (weight, bias) and per-sample (shift, scale, gate) grads summed in fp32 registers and written
    # once as this program's row of partial sums; torch then sums those rows (one small reduction per grad).
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    n_chunks = tl.num_programs(1)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32) if HAS_W else 1.0
    bias = tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32) if HAS_BIAS else 0.0
    scale1 = 1.0 + tl.load(SCALE + b * sscale + cols, mask=cmask, other=0.0).to(tl.float32) if HAS_SCALE else 1.0
    g = tl.load(G + b * sg + cols, mask=cmask, other=0.0).to(tl.float32) if HAS_RES else 0.0
    acc_w = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_shift = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_scale = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK_C], dtype=tl.float32)
    start = b * N + chunk * R
    end = tl.minimum(start + R, b * N + N)
    for r0 in range(start, end, BLOCK_M):
        row = r0 + tl.arange(0, BLOCK_M)
        rmask = row < end
        mask = rmask[:, None] & cmask[None, :]
        offs = row[:, None] * C + cols[None, :]
        dout = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(XIN + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row, mask=rmask, other=0.0)[:, None]
        if IS_RMS:
            xhat = x * rstd
        else:
            xhat = tl.where(mask, (x - tl.load(MEAN + row, mask=rmask, other=0.0)[:, None]) * rstd, 0.0)
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
        dxhat = dn * w
        if IS_RMS:
            dx = rstd * (dxhat - xhat * (tl.sum(dxhat * xhat, axis=1) / C)[:, None])
        else:
            dx = rstd * (dxhat - (tl.sum(dxhat, axis=1) / C)[:, None]
                         - xhat * (tl.sum(dxhat * xhat, axis=1) / C)[:, None])
        if HAS_DH:
            dx += tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_RES:
            tl.store(DY + offs, (g * dx).to(DY.dtype.element_ty), mask=mask)
            acc_g += tl.sum(dx * tl.load(Y + row[:, None] * sy + cols[None, :], mask=mask, other=0.0).to(tl.float32),
                            axis=0)
    p = (b * n_chunks + chunk) * C + cols
    if HAS_W:
        tl.store(PW + p, acc_w, mask=cmask)
    if HAS_BIAS:
        tl.store(PB + p, acc_b, mask=cmask)
    if HAS_SHIFT:
        tl.store(PSHIFT + p, acc_shift, mask=cmask)
    if HAS_SCALE:
        tl.store(PSCALE + p, acc_scale, mask=cmask)
    if HAS_RES:
        tl.store(PG + p, acc_g, mask=cmask)


# Every output (dx, dy, each program's partial-sum row) is written whole by each run, so configs can be timed on the
# real buffers. BLOCK_M = 1 is the row-at-a-time loop this replaced.
_norm_bwd_tuned = triton.autotune(configs=_tile_configs(),
                                  key=_FLAGS[:2] + ["HAS_DH"] + _FLAGS[2:],
                                  prune_configs_by={"early_config_prune": _prune_tiles_bwd})(_norm_bwd_kernel)


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

def _fwd_triton(x, gate, y, weight, bias, shift, scale, eps, rms, out_dtype):
    """Returns (h, out, mean, rstd)."""
    (h, out, mean, rstd), (rows, C, N) = _fwd_outputs(x, gate, y, weight, bias, shift, scale, rms, out_dtype)
    if rows == 0:
        return h, out, mean, rstd
    x2, g, y2, sh, sc = _row_views(x, gate, y, shift, scale)
    BLOCK_C = _triton.block_size(C)
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
                 HAS_SHIFT=sh is not None, HAS_SCALE=sc is not None, BLOCK_C=BLOCK_C)
    if _triton.interpreting():
        _norm_fwd_kernel[(triton.cdiv(rows, INTERPRET_BLOCK_M),)](*args, **flags, BLOCK_M=INTERPRET_BLOCK_M,
                                                                   num_warps=4)
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


def _bwd_triton(dout, dh, xin, gate, y, weight, bias, has_shift, scale, mean, rstd, rms):
    """Returns (dx, dy, dgate, dweight, dbias, dshift, dscale); grads of absent inputs are empty.
    xin is h (with a residual) or x; dx is the grad of h/x in xin's dtype."""
    dx, dy, partials, (rows, C, N, B, R, chunks) = _bwd_buffers(xin, gate, y, weight, bias, has_shift, scale)
    if rows:
        dout2, dh2, xin2, g, y2, sc = _bwd_inputs(dout, dh, xin, gate, y, scale)
        pw, pb, psh, psc, pg = partials
        BLOCK_C = _triton.block_size(C)
        d = dout2  # pointer for an absent input: never read
        args = (
            dout2, dh2 if dh2 is not None else d, xin2, g if g is not None else d, g.stride(0) if g is not None else 0,
            y2 if y2 is not None else d, y2.stride(0) if y2 is not None else 0, weight if weight is not None else d,
            bias if bias is not None else d, sc if sc is not None else d, sc.stride(0) if sc is not None else 0,
            mean if not rms else rstd, rstd, dx, dy if g is not None else dx, pw, pb, psh, psc, pg,
            N, C, R)
        flags = dict(HAS_RES=g is not None, HAS_DH=dh is not None, IS_RMS=rms, HAS_W=weight is not None,
                     HAS_BIAS=bias is not None, HAS_SHIFT=has_shift, HAS_SCALE=scale is not None, BLOCK_C=BLOCK_C)
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
    e = xin.new_empty(0)
    like = lambda t: t.new_empty(t.shape) if t is not None else e  # noqa: E731  (contiguous, as the kernels write)
    dy = y.new_empty(y.shape) if gate is not None else e
    dshift = xin.new_empty((B, C), dtype=dout.dtype) if has_shift else e
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
