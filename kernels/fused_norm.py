"""Fused norm family: RMSNorm / LayerNorm, optionally with a gated residual in front and an adaLN
modulate behind, as one row kernel with compile-time flags (Triton) or the CUDA extension.

    h   = x + gate * y                      (gated_residual_norm_modulate only)
    out = (norm(h) * weight + bias) * (1 + scale) + shift

`gate`, `shift`, `scale` are per-sample (B, C) vectors broadcast over the N tokens of x (B, N, C). The
forward saves only h and the per-row statistics (fp32 mean / rstd); the backward recomputes the
normalised row and reduces the per-channel grads (weight, bias) and per-sample grads (shift, scale, gate)
in fp32 partial sums, one row of partials per program, summed by torch afterwards.

References: `kernels.reference.{rms_norm, layer_norm, norm_modulate, gated_residual_norm_modulate}`.
"""
from typing import Optional

import torch
from torch import Tensor

from . import _triton
from ._triton import tl, triton

ROWS_PER_PROGRAM = 32  # backward: rows one program reduces before writing its partial sums


@triton.jit
def _norm_fwd_kernel(X, sx, G, sg, Y, sy, W, BIAS, SHIFT, sshift, SCALE, sscale, H, OUT, MEAN, RSTD,
                     N, C, eps,
                     HAS_RES: tl.constexpr, IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_BIAS: tl.constexpr,
                     HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = row // N
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    x = tl.load(X + row * sx + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        g = tl.load(G + b * sg + cols, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(Y + row * sy + cols, mask=mask, other=0.0).to(tl.float32)
        h = (x + g * y).to(H.dtype.element_ty)
        tl.store(H + row * C + cols, h, mask=mask)
        x = h.to(tl.float32)  # normalise the stored (rounded) h: the backward recomputes from it
    if IS_RMS:
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / C + eps)
        xhat = x * rstd
    else:
        mean = tl.sum(x, axis=0) / C
        xc = tl.where(mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / C + eps)
        xhat = xc * rstd
        tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)
    out = xhat
    if HAS_W:
        out = out * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        out = out + tl.load(BIAS + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        out = out * (1.0 + tl.load(SCALE + b * sscale + cols, mask=mask, other=0.0).to(tl.float32))
    if HAS_SHIFT:
        out = out + tl.load(SHIFT + b * sshift + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + row * C + cols, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd_kernel(DOUT, DH, XIN, G, sg, Y, sy, W, BIAS, SCALE, sscale, MEAN, RSTD,
                     DX, DY, PW, PB, PSHIFT, PSCALE, PG,
                     N, C, R,
                     HAS_RES: tl.constexpr, HAS_DH: tl.constexpr, IS_RMS: tl.constexpr, HAS_W: tl.constexpr,
                     HAS_BIAS: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr,
                     BLOCK_C: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    n_chunks = tl.num_programs(1)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) if HAS_W else 1.0
    bias = tl.load(BIAS + cols, mask=mask, other=0.0).to(tl.float32) if HAS_BIAS else 0.0
    scale1 = 1.0 + tl.load(SCALE + b * sscale + cols, mask=mask, other=0.0).to(tl.float32) if HAS_SCALE else 1.0
    g = tl.load(G + b * sg + cols, mask=mask, other=0.0).to(tl.float32) if HAS_RES else 0.0
    acc_w = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_shift = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_scale = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK_C], dtype=tl.float32)
    start = b * N + chunk * R
    end = tl.minimum(start + R, b * N + N)
    for row in range(start, end):
        dout = tl.load(DOUT + row * C + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(XIN + row * C + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        if IS_RMS:
            xhat = x * rstd
        else:
            xhat = tl.where(mask, (x - tl.load(MEAN + row)) * rstd, 0.0)
        dn = dout
        if HAS_SHIFT:
            acc_shift += dout
        if HAS_SCALE:
            acc_scale += dout * (xhat * w + bias)
            dn = dout * scale1
        if HAS_BIAS:
            acc_b += dn
        if HAS_W:
            acc_w += dn * xhat
        dxhat = dn * w
        if IS_RMS:
            dx = rstd * (dxhat - xhat * (tl.sum(dxhat * xhat, axis=0) / C))
        else:
            dx = rstd * (dxhat - tl.sum(dxhat, axis=0) / C - xhat * (tl.sum(dxhat * xhat, axis=0) / C))
        if HAS_DH:
            dx += tl.load(DH + row * C + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row * C + cols, dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_RES:
            tl.store(DY + row * C + cols, (g * dx).to(DY.dtype.element_ty), mask=mask)
            acc_g += dx * tl.load(Y + row * sy + cols, mask=mask, other=0.0).to(tl.float32)
    p = (b * n_chunks + chunk) * C + cols
    if HAS_W:
        tl.store(PW + p, acc_w, mask=mask)
    if HAS_BIAS:
        tl.store(PB + p, acc_b, mask=mask)
    if HAS_SHIFT:
        tl.store(PSHIFT + p, acc_shift, mask=mask)
    if HAS_SCALE:
        tl.store(PSCALE + p, acc_scale, mask=mask)
    if HAS_RES:
        tl.store(PG + p, acc_g, mask=mask)


# ----------------------------------------------------------------------------- shapes shared by every backend

def _geometry(x, per_sample):
    """(rows, C, N, B): N rows share one per-sample vector; B such groups."""
    C = x.shape[-1]
    rows = x.numel() // C
    if per_sample:
        if x.dim() != 3:
            raise ValueError(f"modulate/gate need x of shape (B, N, C), got {tuple(x.shape)}")
        return rows, C, x.shape[1], x.shape[0]
    return rows, C, rows, 1


def _dtypes(x, gate, y, weight, bias, shift, scale):
    h_dtype = x.dtype
    if gate is not None:
        h_dtype = torch.promote_types(torch.promote_types(h_dtype, gate.dtype), y.dtype)
    out_dtype = h_dtype
    for t in (weight, bias, shift, scale):
        if t is not None:
            out_dtype = torch.promote_types(out_dtype, t.dtype)
    return h_dtype, out_dtype


def _empty(x):
    return x.new_empty(0)


# ----------------------------------------------------------------------------- launches (one per backend)

def _fwd_impl(backend, x, gate, y, weight, bias, shift, scale, eps, rms):
    """Returns (h, out, mean, rstd); h is empty without a residual, mean is empty for RMSNorm."""
    per_sample = gate is not None or shift is not None or scale is not None
    rows, C, N, B = _geometry(x, per_sample)
    h_dtype, out_dtype = _dtypes(x, gate, y, weight, bias, shift, scale)
    has_res = gate is not None
    h = torch.empty(x.shape, dtype=h_dtype, device=x.device) if has_res else _empty(x)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    mean = _empty(x).float() if rms else torch.empty(rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows == 0:
        return h, out, mean, rstd
    x2 = _triton.rows_2d(x)
    y2 = _triton.rows_2d(y) if has_res else None
    vecs = [_triton.vec_rows(t) if t is not None else None for t in (gate, shift, scale)]
    if backend == "cuda":
        from . import cuda_ext
        cuda_ext.norm_fwd(x2, vecs[0], y2, weight, bias, vecs[1], vecs[2], h, out, mean, rstd, N, eps, rms)
        return h, out, mean, rstd
    g, sh, sc = vecs
    BLOCK_C = _triton.block_size(C)
    dummy = x2
    _norm_fwd_kernel[(rows,)](
        x2, x2.stride(0), g if has_res else dummy, g.stride(0) if has_res else 0, y2 if has_res else dummy,
        y2.stride(0) if has_res else 0, weight if weight is not None else dummy,
        bias if bias is not None else dummy, sh if sh is not None else dummy,
        sh.stride(0) if sh is not None else 0, sc if sc is not None else dummy,
        sc.stride(0) if sc is not None else 0, h if has_res else out, out, mean if not rms else rstd, rstd,
        N, C, eps,
        HAS_RES=has_res, IS_RMS=rms, HAS_W=weight is not None, HAS_BIAS=bias is not None,
        HAS_SHIFT=sh is not None, HAS_SCALE=sc is not None, BLOCK_C=BLOCK_C,
        num_warps=_triton.row_warps(BLOCK_C))
    return h, out, mean, rstd


def _fwd_fake(x, gate, y, weight, bias, shift, scale, eps, rms):
    rows = x.numel() // x.shape[-1]
    h_dtype, out_dtype = _dtypes(x, gate, y, weight, bias, shift, scale)
    h = x.new_empty(x.shape, dtype=h_dtype) if gate is not None else x.new_empty(0)
    mean = x.new_empty(0 if rms else rows, dtype=torch.float32)
    return h, x.new_empty(x.shape, dtype=out_dtype), mean, x.new_empty(rows, dtype=torch.float32)


def _bwd_impl(backend, dout, dh, xin, gate, y, weight, bias, has_shift, scale, mean, rstd, rms):
    """Returns (dx, dy, dgate, dweight, dbias, dshift, dscale); grads of absent inputs are empty.
    xin is h (with a residual) or x; dx is the grad of h/x in xin's dtype."""
    per_sample = gate is not None or has_shift or scale is not None
    rows, C, N, B = _geometry(xin, per_sample)
    has_res = gate is not None
    dx = torch.empty(xin.shape, dtype=xin.dtype, device=xin.device)
    dy = torch.empty(y.shape, dtype=y.dtype, device=y.device) if has_res else _empty(xin)
    R = max(1, min(ROWS_PER_PROGRAM, N))
    chunks = triton.cdiv(N, R) if N else 0
    part = lambda on: torch.empty((B, chunks, C) if on else (0,), dtype=torch.float32, device=xin.device)  # noqa
    pw, pb, psh, psc, pg = (part(weight is not None), part(bias is not None), part(has_shift),
                            part(scale is not None), part(has_res))
    if rows:
        dout2 = _triton.rows_2d(dout).contiguous()
        dh2 = _triton.rows_2d(dh).contiguous() if dh is not None else None
        xin2 = _triton.rows_2d(xin).contiguous()
        y2 = _triton.rows_2d(y) if has_res else None
        g = _triton.vec_rows(gate) if has_res else None
        sc = _triton.vec_rows(scale) if scale is not None else None
        if backend == "cuda":
            from . import cuda_ext
            cuda_ext.norm_bwd(dout2, dh2, xin2, g, y2, weight, bias, sc, mean, rstd, dx, dy, pw, pb, psh, psc, pg,
                              N, R, rms, has_shift)
        else:
            BLOCK_C = _triton.block_size(C)
            d = dout2
            _norm_bwd_kernel[(B, chunks)](
                dout2, dh2 if dh2 is not None else d, xin2, g if has_res else d, g.stride(0) if has_res else 0,
                y2 if has_res else d, y2.stride(0) if has_res else 0, weight if weight is not None else d,
                bias if bias is not None else d, sc if sc is not None else d, sc.stride(0) if sc is not None else 0,
                mean if not rms else rstd, rstd, dx, dy if has_res else dx, pw, pb, psh, psc, pg,
                N, C, R,
                HAS_RES=has_res, HAS_DH=dh is not None, IS_RMS=rms, HAS_W=weight is not None,
                HAS_BIAS=bias is not None, HAS_SHIFT=has_shift, HAS_SCALE=scale is not None, BLOCK_C=BLOCK_C,
                num_warps=_triton.row_warps(BLOCK_C))
    def reduce(p, like, dims):  # noqa: E306
        return p.sum(dims).to(like.dtype) if like is not None and p.numel() else (
            torch.zeros_like(like) if like is not None else _empty(xin))
    dgate = reduce(pg, gate, 1)
    dweight = reduce(pw, weight, (0, 1))
    dbias = reduce(pb, bias, (0, 1))
    dshift = psh.sum(1).to(dout.dtype) if has_shift and psh.numel() else (
        xin.new_zeros((B, C), dtype=dout.dtype) if has_shift else _empty(xin))
    dscale = reduce(psc, scale, 1)
    return dx, dy, dgate, dweight, dbias, dshift, dscale


def _bwd_fake(dout, dh, xin, gate, y, weight, bias, has_shift, scale, mean, rstd, rms):
    per_sample = gate is not None or has_shift or scale is not None
    _, C, _, B = _geometry(xin, per_sample)
    e = xin.new_empty(0)
    like = lambda t: t.new_empty(t.shape) if t is not None else e  # noqa: E731  (contiguous, as the kernels write)
    dy = y.new_empty(y.shape) if gate is not None else e
    dshift = xin.new_empty((B, C), dtype=dout.dtype) if has_shift else e
    return (xin.new_empty(xin.shape), dy, like(gate), like(weight), like(bias), dshift, like(scale))


def _setup(ctx, inputs, output):
    x, gate, y, weight, bias, shift, scale, eps, rms = inputs
    h, out, mean, rstd = output
    xin = h if gate is not None else x
    ctx.save_for_backward(xin, gate, y, weight, bias, scale, mean, rstd)
    ctx.rms, ctx.has_shift = rms, shift is not None
    ctx.dtypes = (x.dtype, None if shift is None else shift.dtype)


def _register(backend):
    """The custom ops `vavae::norm_fwd_<backend>` / `vavae::norm_bwd_<backend>` (fake + autograd)."""

    @torch.library.custom_op(f"vavae::norm_fwd_{backend}", mutates_args=())
    def norm_fwd(x: Tensor, gate: Optional[Tensor], y: Optional[Tensor], weight: Optional[Tensor],
                 bias: Optional[Tensor], shift: Optional[Tensor], scale: Optional[Tensor], eps: float,
                 rms: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return _fwd_impl(backend, x, gate, y, weight, bias, shift, scale, eps, rms)

    @torch.library.custom_op(f"vavae::norm_bwd_{backend}", mutates_args=())
    def norm_bwd(dout: Tensor, dh: Optional[Tensor], xin: Tensor, gate: Optional[Tensor], y: Optional[Tensor],
                 weight: Optional[Tensor], bias: Optional[Tensor], has_shift: bool, scale: Optional[Tensor],
                 mean: Tensor, rstd: Tensor, rms: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                                                 Tensor]:
        return _bwd_impl(backend, dout, dh, xin, gate, y, weight, bias, has_shift, scale, mean, rstd, rms)

    norm_fwd.register_fake(_fwd_fake)
    norm_bwd.register_fake(_bwd_fake)

    def backward(ctx, dh, dout, dmean, drstd):
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
                None, None)

    norm_fwd.register_autograd(backward, setup_context=_setup)
    return norm_fwd


norm_fwd_triton = _register("triton")
norm_fwd_cuda = _register("cuda")


# ----------------------------------------------------------------------------- the ops (kernels.ops signatures)

def _kind(kind):
    if kind not in ("rms", "layer"):
        raise ValueError(f"unknown norm kind {kind!r} (expected 'rms' or 'layer')")
    return kind == "rms"


def _ops(norm_fwd):
    """The four kernels.ops entry points on one backend's custom op."""

    def rms_norm(x, weight, eps=1e-6):
        return norm_fwd(x, None, None, weight, None, None, None, eps, True)[1]

    def layer_norm(x, weight=None, bias=None, eps=1e-6):
        return norm_fwd(x, None, None, weight, bias, None, None, eps, False)[1]

    def norm_modulate(x, weight, shift, scale, eps=1e-6, kind="rms"):
        return norm_fwd(x, None, None, weight, None, shift, scale, eps, _kind(kind))[1]

    def gated_residual_norm_modulate(x, gate, y, weight, shift, scale, eps=1e-6, kind="rms"):
        h, out, _, _ = norm_fwd(x, gate, y, weight, None, shift, scale, eps, _kind(kind))
        return h, out

    return {"rms_norm": rms_norm, "layer_norm": layer_norm, "norm_modulate": norm_modulate,
            "gated_residual_norm_modulate": gated_residual_norm_modulate}


IMPLS = {"triton": _ops(norm_fwd_triton), "cuda": _ops(norm_fwd_cuda)}
# The Triton versions under their op names (tests and benchmarks call them directly).
rms_norm, layer_norm, norm_modulate, gated_residual_norm_modulate = (
    IMPLS["triton"][k] for k in ("rms_norm", "layer_norm", "norm_modulate", "gated_residual_norm_modulate"))
