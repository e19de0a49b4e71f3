"""GroupNorm (+ SiLU) over (N, C, H, W) or (N, C, L) activations in either memory layout, forward and backward: the
VA-VAE's norm (every conv's input is `silu(GroupNorm(32, eps 1e-6, affine)(h))`; AttnBlock's norm has no SiLU).

    out = silu((x - mean_g) * rstd_g * weight_c + bias_c)      mean_g, rstd_g: fp32, over each group's C/G x H*W

Why: under CUDA bf16 autocast group_norm is an fp32 op (bf16 in, fp32 out, SiLU in fp32, the next conv casts back)
and CUDA's GroupNorm copies channels_last input to NCHW. This op reads x in its dtype and layout (NCHW-contiguous
or channels_last; anything else is made contiguous first) and writes out in x's dtype and memory format.

Each sample's H*W positions are split into chunks of CHUNK (a multiple of every tile's BLOCK_P, chosen on the host
so that there are ~2048 programs); a program owns one (chunk, sample, block of BLOCK_C channels) and walks its chunk
one (BLOCK_P, BLOCK_C) tile at a time. Which axis of the tile has unit stride (channels for channels_last,
positions for NCHW) is a compile-time flag, so the loads are coalesced 16-byte vectors in both layouts.
Forward, three launches:
  1. statistics: per-lane Welford accumulators in registers (each tile lane sees one channel at one position
     offset), merged over the tile's positions with Chan's parallel formula at the end: one (mean, M2) per channel
     and chunk, fp32. (A plain sum / sum of squares cancels when |mean| >> std.)
  2. finalize, one program per (sample, group) on a GPU: Chan's formula over the group's chunk x channel
     partials (two-pass: mean first, then M2 around it) -> mean, rstd per (sample, group), saved for the backward.
  3. normalize: (x - mean) * rstd * weight + bias, SiLU, stored in x's dtype and layout.
Backward (saves x, weight, bias, mean, rstd; recomputes xhat and the SiLU derivative from x):
  1. per (chunk, sample, channel block): fp32 partial sums per channel of dz and dz * xhat (dz: the grad before
     SiLU); torch sums them in fp32 into dbias, dweight, and the per-group terms mean(g), mean(g * xhat) with
     g = dz * weight (sum over the group's channels of weight_c times the channel sums);
  2. dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), stored in x's dtype and layout.
On a GPU the tiles and warps are autotuned per layout and size (every kernel writes all its outputs on each run, so
configs are timed on the real buffers); under the interpreter small fixed tiles, with ragged chunks and channel
blocks at the tests' sizes. Reference: `kernels.reference.group_norm_silu`.
"""
import math
from typing import Optional

import torch
from torch import Tensor

from . import _triton, reference
from ._triton import approx_div, tl, triton
from .registry import BenchCase, BenchShape, Op, register

# (BLOCK_P positions, BLOCK_C channels, warps): 2K-4K elements per tile, 16-32 per thread, the unit-stride axis long
TILES_CL = ((32, 128, 4), (16, 128, 4), (32, 128, 8), (64, 64, 4), (16, 256, 8))  # channels_last: C contiguous
TILES_NCHW = ((256, 16, 4), (128, 16, 4), (256, 16, 8), (128, 32, 8), (64, 64, 4))  # NCHW: positions contiguous
TARGET_PROGRAMS = 2048  # ~15 per SM of an H100/H200; the partials stay < 2% of the activation's bytes
NOMINAL_BLOCK_C = {True: 128, False: 16}  # the channel blocks CHUNK is sized for (any tile's are correct)
INTERPRET_TILE = (16, 64)  # (BLOCK_P, BLOCK_C) under the interpreter: C=96 runs a masked channel block
INTERPRET_CHUNK = 32  # two tiles: at H*W = 63 a whole chunk, then a tile and a ragged tail; at 35 a tail alone
# Larger images under the interpreter (the parity fixture's 64 x 64): its cost is per tile, so 256-position tiles and
# one chunk per sample (a minute less per encode + decode of the fixture; the small sizes above test the raggedness)
INTERPRET_LARGE_L, INTERPRET_LARGE_P = 1024, 256


def _interpret_p(L: int) -> int:
    return INTERPRET_LARGE_P if L >= INTERPRET_LARGE_L else INTERPRET_TILE[0]


def _align(cl: bool) -> int:
    # CHUNK is a multiple of every BLOCK_P the autotuner may pick: only a sample's last chunk is ragged
    return max(t[0] for t in (TILES_CL if cl else TILES_NCHW))


def _configs(cl: bool) -> list:
    return [triton.Config({"BLOCK_P": p, "BLOCK_C": c}, num_warps=w) for p, c, w in (TILES_CL if cl else TILES_NCHW)]


def _prune(configs, named_args, **kwargs):
    """No channel block wider than C needs (C=128 keeps its four 128/64-wide tiles); never none."""
    width = max(64, triton.next_power_of_2(named_args["C"]))
    keep = [c for c in configs if c.kwargs["BLOCK_C"] <= width]
    return keep or configs[:1]


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _offsets(p, c, C, L, CL: tl.constexpr):
    # (BLOCK_P, BLOCK_C) offsets inside one sample; the unit-stride axis is known at compile time (coalescing)
    if CL:
        return p[:, None] * C + c[None, :]
    else:
        return c[None, :] * L + p[:, None]


@triton.jit
def _sigmoid_den(z):
    return 1.0 + tl.exp(-z)


@triton.jit
def _silu(z):
    # z / (1 + e^-z) with the approximate division (_triton.approx_div, 2 ulp; tl.sigmoid's division is several
    # instructions more per element: the norm kernel's issue budget at full bandwidth is ~25). An infinite
    # denominator (z < -88) gives -0, the true value rounded.
    return approx_div(z, _sigmoid_den(z))


@triton.jit
def _silu_grad(dy, z):
    # d silu(z) / dz = s * (1 + z * (1 - s)), s = sigmoid(z)
    s = approx_div(1.0, _sigmoid_den(z))
    return dy * s * (1.0 + z * (1.0 - s))


@triton.jit
def _group_norm_stats_fwd_kernel(X, PMEAN, PM2, C, L, CHUNK,
                  CL: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    k, n = tl.program_id(0), tl.program_id(1)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    rows = tl.arange(0, BLOCK_P)
    X += n.to(tl.int64) * C * L
    start = k * CHUNK
    end = tl.minimum(start + CHUNK, L)
    full_end = start + (end - start) // BLOCK_P * BLOCK_P
    # Welford per lane: every lane sees one channel at positions p0 + row; all lanes are valid in the full tiles,
    # so each tile's update weight 1/t is one scalar (t: tiles seen so far)
    m = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    t = 0.0
    for p0 in range(start, full_end, BLOCK_P):
        x = tl.load(X + _offsets(p0 + rows, c, C, L, CL), mask=cmask[None, :], other=0.0).to(tl.float32)
        t += 1.0
        delta = x - m
        m += delta * (1.0 / t)
        m2 += delta * (x - m)
    valid = (full_end + rows) < end  # the ragged last tile's rows (none when the chunk is whole tiles)
    if full_end < end:
        x = tl.load(X + _offsets(full_end + rows, c, C, L, CL), mask=valid[:, None] & cmask[None, :],
                    other=0.0).to(tl.float32)
        delta = x - m
        m_new = m + delta * (1.0 / (t + 1.0))
        m2 = tl.where(valid[:, None], m2 + delta * (x - m_new), m2)
        m = tl.where(valid[:, None], m_new, m)
    # the lanes of each channel -> one (mean, M2): Chan's formula with each lane's count (0 for lanes never valid)
    cnt = t + valid.to(tl.float32)
    mean = tl.sum(cnt[:, None] * m, axis=0) / (end - start).to(tl.float32)
    d = m - mean[None, :]
    M2 = tl.sum(m2 + cnt[:, None] * d * d, axis=0)
    out = (n * tl.num_programs(0) + k).to(tl.int64) * C + c
    tl.store(PMEAN + out, mean, mask=cmask)
    tl.store(PM2 + out, M2, mask=cmask)


@triton.jit
def _group_norm_finalize_fwd_kernel(PMEAN, PM2, MEAN, RSTD, C, L, K, CHUNK, G, eps,
                     CG: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr):
    # BLOCK_G groups of one sample: each one's K chunks x CG channels of (mean, M2) partials -> mean, rstd, in two
    # passes (the mean, then the sum of M2 + count * (partial mean - mean)^2 around it). CG (channels per group) is
    # a compile-time constant: a group's partials are then aligned vectors
    n = tl.program_id(0)
    g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    j = tl.arange(0, BLOCK_C)
    base = n.to(tl.int64) * K * C + g[None, :, None] * CG + j[None, None, :]
    gj = (g[None, :, None] < G) & (j[None, None, :] < CG)
    total = (CG * L).to(tl.float32)
    acc = tl.zeros([BLOCK_K, BLOCK_G, BLOCK_C], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = (k0 + tl.arange(0, BLOCK_K))[:, None, None]
        mask = (kk < K) & gj
        pm = tl.load(PMEAN + base + kk * C, mask=mask, other=0.0)
        acc += tl.where(mask, tl.minimum(CHUNK, L - kk * CHUNK).to(tl.float32) * pm, 0.0)
    mean = tl.sum(tl.sum(acc, axis=2), axis=0) / total
    acc = tl.zeros([BLOCK_K, BLOCK_G, BLOCK_C], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = (k0 + tl.arange(0, BLOCK_K))[:, None, None]
        mask = (kk < K) & gj
        pm = tl.load(PMEAN + base + kk * C, mask=mask, other=0.0)
        p2 = tl.load(PM2 + base + kk * C, mask=mask, other=0.0)
        d = pm - mean[None, :, None]
        acc += tl.where(mask, p2 + tl.minimum(CHUNK, L - kk * CHUNK).to(tl.float32) * d * d, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(acc, axis=2), axis=0) / total + eps)
    tl.store(MEAN + n * G + g, mean, mask=g < G)
    tl.store(RSTD + n * G + g, rstd, mask=g < G)


@triton.jit
def _norm_tile(X, OUT, offs, mask, mean, scale, shift, SILU: tl.constexpr):
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    z = (x - mean[None, :]) * scale[None, :] + shift[None, :]  # x - mean first: no cancellation at large |mean|
    if SILU:
        z = _silu(z)
    tl.store(OUT + offs, z.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _channel_vectors(W, B, MEAN, RSTD, n, c, cmask, G, Cg, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """Per channel of the block: the group's mean and rstd, weight (1 without), bias (0 without)."""
    grp = n * G + c // Cg
    mean = tl.load(MEAN + grp, mask=cmask, other=0.0)
    rstd = tl.load(RSTD + grp, mask=cmask, other=0.0)
    if HAS_W:
        w = tl.load(W + c, mask=cmask, other=0.0).to(tl.float32)
    else:
        w = tl.where(cmask, 1.0, 0.0)
    if HAS_B:
        b = tl.load(B + c, mask=cmask, other=0.0).to(tl.float32)
    else:
        b = tl.zeros_like(mean)
    return mean, rstd, w, b


@triton.jit
def _group_norm_fwd_kernel(X, W, B, MEAN, RSTD, OUT, C, L, CHUNK, G, Cg,
                 CL: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
                 BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    k, n = tl.program_id(0), tl.program_id(1)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    rows = tl.arange(0, BLOCK_P)
    mean, rstd, w, b = _channel_vectors(W, B, MEAN, RSTD, n, c, cmask, G, Cg, HAS_W, HAS_B)
    scale = rstd * w
    sample = n.to(tl.int64) * C * L
    X += sample
    OUT += sample
    start = k * CHUNK
    end = tl.minimum(start + CHUNK, L)
    full_end = start + (end - start) // BLOCK_P * BLOCK_P
    for p0 in range(start, full_end, BLOCK_P):  # whole tiles: only the channel mask (constant along vectors)
        _norm_tile(X, OUT, _offsets(p0 + rows, c, C, L, CL), cmask[None, :], mean, scale, b, SILU)
    if full_end < end:
        p = full_end + rows
        _norm_tile(X, OUT, _offsets(p, c, C, L, CL), (p < end)[:, None] & cmask[None, :], mean, scale, b, SILU)


@triton.jit
def _bwd_dz(DY, X, offs, mask, mean, rstd, w, b, SILU: tl.constexpr):
    """(dz, xhat) of one tile: dz the grad of the affine output (before SiLU); masked lanes give dz = 0."""
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    xhat = (x - mean[None, :]) * rstd[None, :]
    if SILU:
        dz = _silu_grad(dy, xhat * w[None, :] + b[None, :])
    else:
        dz = dy
    return dz, xhat


@triton.jit
def _group_norm_partials_bwd_kernel(DY, X, W, B, MEAN, RSTD, PDB, PDW, C, L, CHUNK, G, Cg,
                         CL: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
                         BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    k, n = tl.program_id(0), tl.program_id(1)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    rows = tl.arange(0, BLOCK_P)
    mean, rstd, w, b = _channel_vectors(W, B, MEAN, RSTD, n, c, cmask, G, Cg, HAS_W, HAS_B)
    sample = n.to(tl.int64) * C * L
    DY += sample
    X += sample
    start = k * CHUNK
    end = tl.minimum(start + CHUNK, L)
    full_end = start + (end - start) // BLOCK_P * BLOCK_P
    # per-lane fp32 accumulators, reduced over the tile's positions once at the end
    acc_db = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    acc_dw = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for p0 in range(start, full_end, BLOCK_P):
        dz, xhat = _bwd_dz(DY, X, _offsets(p0 + rows, c, C, L, CL), cmask[None, :], mean, rstd, w, b, SILU)
        acc_db += dz
        acc_dw += dz * xhat
    if full_end < end:
        p = full_end + rows
        dz, xhat = _bwd_dz(DY, X, _offsets(p, c, C, L, CL), (p < end)[:, None] & cmask[None, :], mean, rstd, w, b,
                           SILU)
        acc_db += dz
        acc_dw += dz * xhat
    out = (n * tl.num_programs(0) + k).to(tl.int64) * C + c
    tl.store(PDB + out, tl.sum(acc_db, axis=0), mask=cmask)
    tl.store(PDW + out, tl.sum(acc_dw, axis=0), mask=cmask)


@triton.jit
def _dx_tile(DY, X, DX, offs, mask, mean, rstd, w, b, rw, c1, c2, SILU: tl.constexpr):
    dz, xhat = _bwd_dz(DY, X, offs, mask, mean, rstd, w, b, SILU)
    dx = dz * rw[None, :] - c1[None, :] - xhat * c2[None, :]
    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _group_norm_dx_bwd_kernel(DY, X, W, B, MEAN, RSTD, COEF, DX, N, C, L, CHUNK, G, Cg,
                   CL: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
                   BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    k, n = tl.program_id(0), tl.program_id(1)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    rows = tl.arange(0, BLOCK_P)
    mean, rstd, w, b = _channel_vectors(W, B, MEAN, RSTD, n, c, cmask, G, Cg, HAS_W, HAS_B)
    # dx = rstd * (dz * w - mean(g) - xhat * mean(g * xhat)): COEF[0] / COEF[1] hold the two group means
    grp = n * G + c // Cg
    c1 = rstd * tl.load(COEF + grp, mask=cmask, other=0.0)
    c2 = rstd * tl.load(COEF + N * G + grp, mask=cmask, other=0.0)
    rw = rstd * w
    sample = n.to(tl.int64) * C * L
    DY += sample
    X += sample
    DX += sample
    start = k * CHUNK
    end = tl.minimum(start + CHUNK, L)
    full_end = start + (end - start) // BLOCK_P * BLOCK_P
    for p0 in range(start, full_end, BLOCK_P):
        _dx_tile(DY, X, DX, _offsets(p0 + rows, c, C, L, CL), cmask[None, :], mean, rstd, w, b, rw, c1, c2, SILU)
    if full_end < end:
        p = full_end + rows
        _dx_tile(DY, X, DX, _offsets(p, c, C, L, CL), (p < end)[:, None] & cmask[None, :], mean, rstd, w, b, rw, c1,
                 c2, SILU)


_KEY = ["C", "L", "CL", "HAS_W", "HAS_B", "SILU"]
_tuned = {}  # (kernel name, channels_last) -> the autotuned kernel (each layout has its own tile candidates)


def _launch(kernel, name: str, cl: bool, K: int, N: int, C: int, L: int, args: tuple, flags: dict) -> None:
    if _triton.interpreting():
        p, c = _interpret_p(L), INTERPRET_TILE[1]
        kernel[(K, N, triton.cdiv(C, c))](*args, CL=cl, **flags, BLOCK_P=p, BLOCK_C=c, num_warps=4)
        return
    if (name, cl) not in _tuned:
        key = [k for k in _KEY if k in kernel.arg_names]
        _tuned[name, cl] = triton.autotune(configs=_configs(cl), key=key,
                                           prune_configs_by={"early_config_prune": _prune})(kernel)
    _tuned[name, cl][lambda meta: (K, N, triton.cdiv(C, meta["BLOCK_C"]))](*args, CL=cl, **flags)


# ----------------------------------------------------------------------------- checks, layouts, launchers

def _check(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], num_groups: int) -> tuple[int, int, int, int]:
    """(N, C, L, G), or a one-line ValueError naming what does not fit."""
    if x.dim() not in (3, 4):
        raise ValueError(f"group_norm_silu needs x of shape (N, C, H, W) or (N, C, L); got {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"group_norm_silu: x must be float32, bfloat16 or float16; got {x.dtype}")
    N, C = x.shape[:2]
    if num_groups < 1 or C % num_groups:
        raise ValueError(f"group_norm_silu: C={C} channels do not divide into num_groups={num_groups}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (C,):
            raise ValueError(f"group_norm_silu: {name} must have shape (C,) = ({C},); got {tuple(t.shape)}")
    return N, C, math.prod(x.shape[2:]), num_groups


def _channels_last(x: Tensor) -> bool:
    """Is x (N, C, *spatial) stored position-major with unit channel stride (and not plain contiguous)?"""
    if x.is_contiguous():
        return False
    if x.dim() == 4:
        return x.is_contiguous(memory_format=torch.channels_last)
    return x.transpose(1, 2).is_contiguous()


def _in_layout(t: Tensor, cl: bool) -> Tensor:
    """t (x, or a gradient of x's shape) in the layout the kernels index: channels_last or NCHW-contiguous."""
    if not cl:
        return t.contiguous()
    if t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def _empty(x: Tensor, cl: bool) -> Tensor:
    """An output of x's shape and dtype in layout cl (x's own memory format where the kernels can read x as is)."""
    if not cl:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.dim() == 4:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    return torch.empty((x.shape[0], x.shape[2], x.shape[1]), dtype=x.dtype, device=x.device).transpose(1, 2)


def _chunking(N: int, C: int, L: int, cl: bool) -> tuple[int, int]:
    """(CHUNK positions per program, K chunks per sample): ~TARGET_PROGRAMS programs for the nominal channel
    blocks, CHUNK a multiple of every tile's BLOCK_P."""
    if _triton.interpreting():
        p = _interpret_p(L)
        chunk = INTERPRET_CHUNK if p == INTERPRET_TILE[0] else triton.cdiv(L, p) * p
    else:
        align = _align(cl)
        blocks = triton.cdiv(C, NOMINAL_BLOCK_C[cl])
        chunk = triton.cdiv(triton.cdiv(N * L * blocks, TARGET_PROGRAMS), align) * align
    return chunk, triton.cdiv(L, chunk)


def _finalize_tile(Cg: int, K: int, G: int) -> tuple[int, int, int]:
    """(BLOCK_K, BLOCK_G, BLOCK_C) of the finalize kernel: on a GPU one group per program, up to 1024 partials at a
    time; under the interpreter every group and chunk of a sample at once (its cost is per program and op)."""
    block_c = _triton.block_size(Cg)
    if _triton.interpreting():
        return _triton.block_size(K), _triton.block_size(G), block_c
    return max(1, min(_triton.block_size(K), 1024 // block_c)), 1, block_c


def _vectors(weight: Optional[Tensor], bias: Optional[Tensor], dummy: Tensor) -> tuple[Tensor, Tensor]:
    """weight and bias as the kernels index them (unit stride); an absent one: any pointer, never read."""
    return tuple(t.contiguous() if t is not None else dummy for t in (weight, bias))


def _forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], num_groups: int, eps: float,
             silu: bool) -> tuple[Tensor, Tensor, Tensor]:
    N, C, L, G = _check(x, weight, bias, num_groups)
    cl = _channels_last(x)
    x = _in_layout(x, cl)
    out = _empty(x, cl)
    mean = torch.empty((N, G), dtype=torch.float32, device=x.device)
    rstd = torch.empty((N, G), dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return out, mean.fill_(0.0), rstd.fill_(0.0)
    chunk, K = _chunking(N, C, L, cl)
    pmean = torch.empty((N, K, C), dtype=torch.float32, device=x.device)
    pm2 = torch.empty_like(pmean)
    _launch(_group_norm_stats_fwd_kernel, "stats", cl, K, N, C, L, (x, pmean, pm2, C, L, chunk), {})
    Cg = C // G
    block_k, block_g, block_c = _finalize_tile(Cg, K, G)
    _group_norm_finalize_fwd_kernel[(N, triton.cdiv(G, block_g))](pmean, pm2, mean, rstd, C, L, K, chunk, G, eps, CG=Cg,
                                                   BLOCK_K=block_k, BLOCK_G=block_g, BLOCK_C=block_c, num_warps=4)
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, SILU=silu)
    args = (x, *_vectors(weight, bias, mean), mean, rstd, out, C, L, chunk, G, Cg)
    _launch(_group_norm_fwd_kernel, "norm", cl, K, N, C, L, args, flags)
    return out, mean, rstd


def _backward(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, rstd: Tensor,
              num_groups: int, silu: bool) -> tuple[Tensor, Tensor, Tensor]:
    N, C, L, G = _check(x, weight, bias, num_groups)
    cl = _channels_last(x)
    x, dy = _in_layout(x, cl), _in_layout(dy, cl)
    mean, rstd = mean.contiguous(), rstd.contiguous()
    dx = _empty(x, cl)
    Cg = C // G
    chunk, K = _chunking(N, C, L, cl)
    partials = torch.empty((2, N, K, C), dtype=torch.float32, device=x.device)  # sum dz, sum dz * xhat
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, SILU=silu)
    wb = _vectors(weight, bias, mean)
    if x.numel():
        _launch(_group_norm_partials_bwd_kernel, "bwd_partials", cl, K, N, C, L,
                (dy, x, *wb, mean, rstd, partials[0], partials[1], C, L, chunk, G, Cg), flags)
    sums = partials.sum(2)  # (2, N, C): per sample and channel, fp32
    g = sums * weight.float() if weight is not None else sums  # the sums of g = dz * w and of g * xhat
    coef = (g.view(2, N, G, Cg).sum(-1) / max(Cg * L, 1)).contiguous()  # (2, N, G): mean(g), mean(g * xhat)
    if x.numel():
        _launch(_group_norm_dx_bwd_kernel, "bwd_dx", cl, K, N, C, L,
                (dy, x, *wb, mean, rstd, coef, dx, N, C, L, chunk, G, Cg), flags)
    dweight = sums[1].sum(0).to(weight.dtype) if weight is not None else x.new_empty(0)
    dbias = sums[0].sum(0).to(bias.dtype) if bias is not None else x.new_empty(0)
    return dx, dweight, dbias


# ----------------------------------------------------------------------------- custom ops (fake + autograd)

@torch.library.custom_op("vavae::group_norm_silu", mutates_args=())
def group_norm_silu_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], num_groups: int, eps: float,
                       silu: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(out in x's dtype and memory format, mean (N, G) fp32, rstd (N, G) fp32)."""
    return _forward(x, weight, bias, num_groups, eps, silu)


@group_norm_silu_op.register_fake
def _(x, weight, bias, num_groups, eps, silu):
    N, _, _, G = _check(x, weight, bias, num_groups)
    stats = lambda: x.new_empty((N, G), dtype=torch.float32)  # noqa: E731
    return _empty(x, _channels_last(x)), stats(), stats()


@torch.library.custom_op("vavae::group_norm_silu_bwd", mutates_args=())
def group_norm_silu_bwd_op(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor,
                           rstd: Tensor, num_groups: int, silu: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx in x's dtype and layout, dweight, dbias); the grad of an absent weight/bias is empty."""
    return _backward(dy, x, weight, bias, mean, rstd, num_groups, silu)


@group_norm_silu_bwd_op.register_fake
def _(dy, x, weight, bias, mean, rstd, num_groups, silu):
    _check(x, weight, bias, num_groups)
    like = lambda t: t.new_empty(t.shape) if t is not None else x.new_empty(0)  # noqa: E731
    return _empty(x, _channels_last(x)), like(weight), like(bias)


def _setup(ctx, inputs, output):
    x, weight, bias, num_groups, eps, silu = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)  # not the output: the backward recomputes it from x
    ctx.num_groups, ctx.silu = num_groups, silu
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # no zeros tensors filled for the statistics' (absent) gradients


def _backward_formula(ctx, dout, dmean, drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    if dout is None:  # the output unused
        return None, None, None, None, None, None
    dx, dweight, dbias = group_norm_silu_bwd_op(dout, x, weight, bias, mean, rstd, ctx.num_groups, ctx.silu)
    return dx, dweight if weight is not None else None, dbias if bias is not None else None, None, None, None


group_norm_silu_op.register_autograd(_backward_formula, setup_context=_setup)


def group_norm_silu_triton(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], num_groups: int, eps: float,
                           silu: bool = True) -> Tensor:
    return group_norm_silu_op(x, weight, bias, num_groups, eps, silu)[0]


def _bench(s: BenchShape, device: str, dtype: torch.dtype) -> BenchCase:
    # Not DiT-shaped: the VA-VAE decoder's largest GroupNorm (128 channels at 256x256), batch 8, channels_last (the
    # layout the convs keep once GroupNorm stops copying to NCHW); tiny and ragged for smoke
    N, C, H, W = (2, 64, 5, 7) if s.smoke else (8, 128, 256, 256)
    x = torch.randn(N, C, H, W, device=device, dtype=dtype).to(memory_format=torch.channels_last).requires_grad_()
    w = (1 + 0.1 * torch.randn(C, device=device, dtype=dtype)).requires_grad_()
    b = (0.1 * torch.randn(C, device=device, dtype=dtype)).requires_grad_()
    X = x.numel() * dtype.itemsize
    return BenchCase([x, w, b], lambda f, x, w, b: f(x, w, b, 32, 1e-6), 2 * X, 3 * X,
                     shape={"N": N, "C": C, "H": H, "W": W, "groups": 32, "layout": "channels_last"})


# Under torch.compile, `auto` runs ours until a GPU run's ops table decides otherwise (no compiled_choices entry)
register(Op(name="group_norm_silu", reference=reference.group_norm_silu, impls={"triton": group_norm_silu_triton},
            bench=_bench, doc="GroupNorm (fp32 statistics, affine) + optional SiLU on NCHW or channels_last input, "
                              "output in x's dtype and layout; bwd recomputes from x"))
