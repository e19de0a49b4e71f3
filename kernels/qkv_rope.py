"""The attention block's input side in one pass each way: qkv GEMM output -> (qk-norm) -> RoPE -> q, k, v.

Forward, one kernel: reads the qkv Linear's output (B, N, 3*H*D) -- per token the q, k, v blocks of H heads of D
channels, exactly what `nn.Linear(C, 3C)` writes -- and writes q and k rotated, and v, each of shape (B, H, N, D)
in token-major memory ((B, N, H, D) contiguous, returned as its transpose(1, 2) view). Optionally first the
qk-norm: RMSNorm over each head's D channels with the weights q_weight / k_weight (the model's `use_qknorm` with
RMSNorm; its LayerNorm variant keeps the unfused path, see docs/kernels.md).
Backward, one kernel: reads dq, dk, dv (any batch/head/token strides, unit channel stride), applies the transposed
rotation to dq and dk (and the RMSNorm backward, recomputing the statistics from the saved qkv), copies dv, and
writes the gradient of the qkv output (B, N, 3*H*D) directly; with qk-norm the weight gradients are per-program
fp32 partial sums reduced once by torch.

Why token-major q/k/v: every SDPA kernel that runs on a GPU writes its output in q's layout (cuDNN allocates it
"with matching layout", flash and memory-efficient always write (B, N, H, D)), so attention's output is then
(B, N, H, D) in memory and the model's `out.transpose(1, 2).reshape(B, N, C)` for the proj Linear is a view, not a
copy; and cuDNN's backward gets a grad of the output in the output's own layout (no re-layout copy).

RoPE pairs channels (2i, 2i+1) (the reference (EVA) layout, `kernels.reference.rotate_half`):
    out[2i] = x[2i] cos[2i] - x[2i+1] sin[2i];  out[2i+1] = x[2i+1] cos[2i+1] + x[2i] sin[2i+1]
Each program holds BLOCK_R tokens x BLOCK_D channels of one head (BLOCK_D = next power of two of D, masked: head_dim
72 runs in a 128-wide tile, 64 in a 64-wide one), splits the tile into its even and odd channels in registers
(tl.reshape + tl.split, joined back before the store: whole-row vector loads and stores), and loops over the heads
with the tables' tile loaded once; without qk-norm the autotuner also times a row variant (ROWS: each token's q, k,
v as whole contiguous rows of H*D channels in CHUNK-wide tiles, the same bits). Reference:
`kernels.reference.qkv_rope` (reshape/permute views, rms_norm, rope_qk). Output dtypes follow the reference: v in
qkv's dtype; q, k in qkv's dtype promoted with the norm weight's.
"""
from typing import Optional

import torch
from torch import Tensor

from . import _triton, reference
from ._triton import tl, triton
from .registry import BenchCase, BenchShape, Op, register

BLOCK_R = 16  # tokens per program: 16 x 128 (head_dim 72, masked) per tile, 16 values per thread at 4 warps
# On a GPU the tokens per program and warps are measured on the first call per (D, qk-norm, heads) among these
# (BLOCK_R = 16 at 4 warps, the fixed tile before, among them: the choice is never slower than it). The 2026-12-04
# H200 profile had the forward at 2.5 TB/s (59% of copy) with ~9 instructions per element (not issue-bound): more
# tokens per program put more bytes in flight per head iteration. The backward with qk-norm keeps BLOCK_R (its
# partial sums are sized by the program count); interpreter: BLOCK_R.
TILES = ((16, 4), (32, 4), (32, 8), (64, 8), (8, 2))
# The row variant (ROWS; no qk-norm, whose statistics are per head): without the norm nothing is per head, and q, k,
# v are token-major, so a token's q (k, v) is one contiguous row of H*D channels in the qkv output and in q (k, v):
# each program streams BLOCK_R whole rows in CHUNK-wide tiles (the table column is the channel mod D; RoPE pairs
# never straddle a chunk: D and CHUNK are even) instead of H head tiles of next_pow2(D) lanes (head_dim 72: 56 of
# 128 lanes masked, 144-byte pieces of rows). The same arithmetic per element: the same bits. The autotuner times
# both families. (BLOCK_R, CHUNK, warps); the backward also needs the gradients' heads adjacent (head stride D).
ROW_TILES = ((8, 256, 4), (16, 128, 4), (16, 256, 8))
_INTERPRETER_ROWS = False  # the variant the interpreter runs (a test runs the other)
_INTERPRETER_CHUNK = 64     # does not divide the tests' H*D: the masked last chunk runs


def _configs() -> list:
    return ([triton.Config({"BLOCK_R": r, "ROWS": False, "CHUNK": 128}, num_warps=w) for r, w in TILES]
            + [triton.Config({"BLOCK_R": r, "ROWS": True, "CHUNK": c}, num_warps=w) for r, c, w in ROW_TILES])


def _prune_rows(configs, named_args, **kwargs):
    """The row variant only without qk-norm and (backward) with the gradients' heads adjacent."""
    rows_ok = not kwargs["HAS_NORM"] and kwargs.get("HEADS_ADJACENT", True)
    return [c for c in configs if rows_ok or not c.kwargs["ROWS"]]


@triton.jit
def _split_pairs(x, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # (R, BLOCK_D) -> its even and odd channels, (R, BLOCK_D // 2) each (register shuffles, no memory)
    return tl.split(tl.reshape(x, (BLOCK_R, BLOCK_D // 2, 2)))


@triton.jit
def _join_pairs(even, odd, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    return tl.reshape(tl.join(even, odd), (BLOCK_R, BLOCK_D))


@triton.jit
def _rows_tables(n, rok, c, HD, COS, SIN, D: tl.constexpr, BLOCK_R: tl.constexpr, CHUNK: tl.constexpr):
    # the row variant's tile of the tables: channel c of a row is channel c mod D of its head
    mask = rok[:, None] & (c[None, :] < HD)
    tab = n[:, None] * D + (c % D)[None, :]
    ce, co = _split_pairs(tl.load(COS + tab, mask=mask, other=0.0).to(tl.float32), BLOCK_R, CHUNK)
    se, so = _split_pairs(tl.load(SIN + tab, mask=mask, other=0.0).to(tl.float32), BLOCK_R, CHUNK)
    return mask, ce, co, se, so


@triton.jit
def _qkv_rope_fwd_kernel(QKV, s_qkv, COS, SIN, QW, KW, BIAS, Q, K, V, rows, N, H, eps,
                D: tl.constexpr, HAS_NORM: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr,
                BLOCK_D: tl.constexpr, ROWS: tl.constexpr, CHUNK: tl.constexpr, WITH_V: tl.constexpr = True):
    # D is a compile-time constant: the compiler then proves 16-byte alignment of each head's row (72 * 2 B = 144 B)
    # and vectorises the loads and stores. WITH_V=False (inference without a bias, `qk_rope_op`): q and k only,
    # v stays where the qkv GEMM wrote it (a third fewer bytes).
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    if ROWS:  # whole token rows, CHUNK channels at a time (no qk-norm)
        HD = H * D
        n, rok = r % N, r < rows
        for c0 in range(0, HD, CHUNK):
            c = c0 + tl.arange(0, CHUNK)
            mask, ce, co, se, so = _rows_tables(n, rok, c, HD, COS, SIN, D, BLOCK_R, CHUNK)
            src = QKV + r[:, None] * s_qkv + c[None, :]
            dst = r[:, None] * HD + c[None, :]
            if WITH_V:
                v = tl.load(src + 2 * HD, mask=mask, other=0.0)
                if HAS_BIAS:
                    v = v.to(tl.float32) + tl.load(BIAS + 2 * HD + c, mask=c < HD, other=0.0)[None, :]
                tl.store(V + dst, v.to(V.dtype.element_ty), mask=mask)
            for part in tl.static_range(2):  # q, then k
                x = tl.load(src + part * HD, mask=mask, other=0.0).to(tl.float32)
                if HAS_BIAS:
                    x += tl.load(BIAS + part * HD + c, mask=c < HD, other=0.0)[None, :]
                xe, xo = _split_pairs(x, BLOCK_R, CHUNK)
                out = _join_pairs(xe * ce - xo * se, xo * co + xe * so, BLOCK_R, CHUNK)
                if part == 0:
                    tl.store(Q + dst, out.to(Q.dtype.element_ty), mask=mask)
                else:
                    tl.store(K + dst, out.to(K.dtype.element_ty), mask=mask)
    else:  # per-head tiles (qk-norm needs them)
        d = tl.arange(0, BLOCK_D)
        mask = (r[:, None] < rows) & (d[None, :] < D)
        tab = (r % N)[:, None] * D + d[None, :]
        ce, co = _split_pairs(tl.load(COS + tab, mask=mask, other=0.0).to(tl.float32), BLOCK_R, BLOCK_D)
        se, so = _split_pairs(tl.load(SIN + tab, mask=mask, other=0.0).to(tl.float32), BLOCK_R, BLOCK_D)
        if HAS_NORM:
            wq = tl.load(QW + d, mask=d < D, other=0.0).to(tl.float32)
            wk = tl.load(KW + d, mask=d < D, other=0.0).to(tl.float32)
        HD = H * D
        for h in range(H):
            src = QKV + r[:, None] * s_qkv + h * D + d[None, :]
            dst = r[:, None] * HD + h * D + d[None, :]
            if WITH_V:
                v = tl.load(src + 2 * HD, mask=mask, other=0.0)  # v: a copy into the layout (+ its bias)
                if HAS_BIAS:
                    v = v.to(tl.float32) + tl.load(BIAS + 2 * HD + h * D + d, mask=d < D, other=0.0)[None, :]
                tl.store(V + dst, v.to(V.dtype.element_ty), mask=mask)
            for part in tl.static_range(2):  # q, then k
                x = tl.load(src + part * HD, mask=mask, other=0.0).to(tl.float32)
                if HAS_BIAS:
                    x += tl.load(BIAS + part * HD + h * D + d, mask=d < D, other=0.0)[None, :]
                if HAS_NORM:  # RMSNorm over the head's D channels (masked lanes are 0), then the weight
                    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
                    if part == 0:
                        x = x * rstd[:, None] * wq[None, :]
                    else:
                        x = x * rstd[:, None] * wk[None, :]
                xe, xo = _split_pairs(x, BLOCK_R, BLOCK_D)
                out = _join_pairs(xe * ce - xo * se, xo * co + xe * so, BLOCK_R, BLOCK_D)
                if part == 0:
                    tl.store(Q + dst, out.to(Q.dtype.element_ty), mask=mask)
                else:
                    tl.store(K + dst, out.to(K.dtype.element_ty), mask=mask)


@triton.jit
def _qkv_rope_bwd_kernel(DQ, sqb, sqh, sqn, DK, skb, skh, skn, DV, svb, svh, svn, COS, SIN, QKV, s_qkv, QW, KW,
                BIAS, DQKV, PQW, PKW, PBIAS, rows, N, H, eps,
                D: tl.constexpr, HAS_NORM: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr,
                BLOCK_D: tl.constexpr, STRIDE_UNIT: tl.constexpr, HEADS_ADJACENT: tl.constexpr, ROWS: tl.constexpr,
                CHUNK: tl.constexpr):
    # HAS_BIAS: the qkv Linear's bias (added in the forward) gets this program's partial sums of d qkv over its rows,
    # one fp32 row of 3*H*D in PBIAS (torch sums the rows); with qk-norm the statistics are recomputed with it.
    # The gradients' strides arrive divided by STRIDE_UNIT (8 when every stride is a multiple of 8, as for any
    # layout of head_dim 72 or 64): multiplying by the constant again lets the compiler prove 16-byte aligned rows
    # and vectorise the loads, which a runtime stride such as 72 would hide.
    sqb, sqh, sqn = sqb * STRIDE_UNIT, sqh * STRIDE_UNIT, sqn * STRIDE_UNIT
    skb, skh, skn = skb * STRIDE_UNIT, skh * STRIDE_UNIT, skn * STRIDE_UNIT
    svb, svh, svn = svb * STRIDE_UNIT, svh * STRIDE_UNIT, svn * STRIDE_UNIT
    pid = tl.program_id(0)
    r = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    b = r // N
    n = r % N
    if ROWS:  # whole token rows (no qk-norm; every gradient's heads adjacent: head h of a token at h * D)
        HD = H * D
        rok = r < rows
        for c0 in range(0, HD, CHUNK):
            c = c0 + tl.arange(0, CHUNK)
            mask, ce, co, se, so = _rows_tables(n, rok, c, HD, COS, SIN, D, BLOCK_R, CHUNK)
            dst = DQKV + r[:, None] * (3 * HD) + c[None, :]
            dv = tl.load(DV + b[:, None] * svb + n[:, None] * svn + c[None, :], mask=mask, other=0.0)
            tl.store(dst + 2 * HD, dv.to(DQKV.dtype.element_ty), mask=mask)
            if HAS_BIAS:
                tl.store(PBIAS + pid.to(tl.int64) * 3 * HD + 2 * HD + c, tl.sum(dv.to(tl.float32), axis=0), mask=c < HD)
            for part in tl.static_range(2):
                if part == 0:
                    g = tl.load(DQ + b[:, None] * sqb + n[:, None] * sqn + c[None, :], mask=mask, other=0.0)
                else:
                    g = tl.load(DK + b[:, None] * skb + n[:, None] * skn + c[None, :], mask=mask, other=0.0)
                ge, go = _split_pairs(g.to(tl.float32), BLOCK_R, CHUNK)
                g = _join_pairs(ge * ce + go * so, go * co - ge * se, BLOCK_R, CHUNK)
                tl.store(dst + part * HD, g.to(DQKV.dtype.element_ty), mask=mask)
                if HAS_BIAS:
                    tl.store(PBIAS + pid.to(tl.int64) * 3 * HD + part * HD + c, tl.sum(g, axis=0), mask=c < HD)
    else:  # per-head tiles (qk-norm needs them)
        d = tl.arange(0, BLOCK_D)
        mask = (r[:, None] < rows) & (d[None, :] < D)
        tab = n[:, None] * D + d[None, :]
        ce, co = _split_pairs(tl.load(COS + tab, mask=mask, other=0.0).to(tl.float32), BLOCK_R, BLOCK_D)
        se, so = _split_pairs(tl.load(SIN + tab, mask=mask, other=0.0).to(tl.float32), BLOCK_R, BLOCK_D)
        if HAS_NORM:
            wq = tl.load(QW + d, mask=d < D, other=0.0).to(tl.float32)
            wk = tl.load(KW + d, mask=d < D, other=0.0).to(tl.float32)
            acc_q = tl.zeros([BLOCK_D], dtype=tl.float32)
            acc_k = tl.zeros([BLOCK_D], dtype=tl.float32)
        HD = H * D
        for h in range(H):
            dst = DQKV + r[:, None] * (3 * HD) + h * D + d[None, :]
            dv = tl.load(DV + b[:, None] * svb + h * svh + n[:, None] * svn + d[None, :], mask=mask, other=0.0)
            tl.store(dst + 2 * HD, dv.to(DQKV.dtype.element_ty), mask=mask)
            if HAS_BIAS:
                tl.store(PBIAS + pid.to(tl.int64) * 3 * HD + 2 * HD + h * D + d, tl.sum(dv.to(tl.float32), axis=0),
                         mask=d < D)
            for part in tl.static_range(2):
                if part == 0:
                    g = tl.load(DQ + b[:, None] * sqb + h * sqh + n[:, None] * sqn + d[None, :], mask=mask, other=0.0)
                else:
                    g = tl.load(DK + b[:, None] * skb + h * skh + n[:, None] * skn + d[None, :], mask=mask, other=0.0)
                ge, go = _split_pairs(g.to(tl.float32), BLOCK_R, BLOCK_D)
                # the transposed rotation: dx[2i] = g[2i] cos[2i] + g[2i+1] sin[2i+1], dx[2i+1] = g[2i+1] cos[2i+1]
                # - g[2i] sin[2i]
                g = _join_pairs(ge * ce + go * so, go * co - ge * se, BLOCK_R, BLOCK_D)
                if HAS_NORM:  # y = xhat * w, xhat = x * rstd: recompute rstd from the saved qkv
                    x = tl.load(QKV + r[:, None] * s_qkv + part * HD + h * D + d[None, :], mask=mask,
                                other=0.0).to(tl.float32)
                    if HAS_BIAS:  # masked rows stay 0 (their gradient is 0): the statistics of the rows kept
                        x = tl.where(mask, x + tl.load(BIAS + part * HD + h * D + d, mask=d < D,
                                                       other=0.0)[None, :], 0.0)
                    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
                    xhat = x * rstd[:, None]
                    if part == 0:
                        acc_q += tl.sum(g * xhat, axis=0)
                        dxhat = g * wq[None, :]
                    else:
                        acc_k += tl.sum(g * xhat, axis=0)
                        dxhat = g * wk[None, :]
                    g = rstd[:, None] * (dxhat - xhat * (tl.sum(dxhat * xhat, axis=1) / D)[:, None])
                tl.store(dst + part * HD, g.to(DQKV.dtype.element_ty), mask=mask)
                if HAS_BIAS:
                    tl.store(PBIAS + pid.to(tl.int64) * 3 * HD + part * HD + h * D + d, tl.sum(g, axis=0),
                             mask=d < D)
        if HAS_NORM:  # this program's partial sums of the weight grads (one row each; torch sums the rows)
            tl.store(PQW + pid * BLOCK_D + d, acc_q)
            tl.store(PKW + pid * BLOCK_D + d, acc_k)


# Both kernels write every output element of each run (q, k, v; d qkv), so configs are timed on the real buffers.
_qkv_rope_fwd_tuned = triton.autotune(configs=_configs(), key=["D", "HAS_NORM", "H", "WITH_V"],
                                      prune_configs_by={"early_config_prune": _prune_rows})(_qkv_rope_fwd_kernel)
_qkv_rope_bwd_tuned = triton.autotune(configs=_configs(),
                                      key=["D", "HAS_NORM", "H", "STRIDE_UNIT", "HEADS_ADJACENT"],
                                      prune_configs_by={"early_config_prune": _prune_rows})(_qkv_rope_bwd_kernel)
TUNED = _triton.TunedKernels(fwd=_qkv_rope_fwd_tuned, bwd=_qkv_rope_bwd_tuned)


def autotuned() -> dict[str, dict[str, dict]]:
    """What the autotuners did in this process, per kernel ("fwd", "bwd") and key: the config picked (per-head tile
    or the row variant) and every candidate's time in ms, for result records."""
    return TUNED.report()


# ----------------------------------------------------------------------------- checks, shapes, launchers

def _check(qkv: Tensor, cos: Tensor, sin: Tensor, num_heads: int, q_weight: Optional[Tensor],
           k_weight: Optional[Tensor], bias: Optional[Tensor] = None) -> tuple[int, int, int, int]:
    """(B, N, H, D), or ValueError naming what does not fit."""
    if qkv.dim() != 3 or num_heads < 1 or qkv.shape[-1] % (3 * num_heads):
        raise ValueError(f"qkv_rope needs qkv of shape (B, N, 3*H*D) with H = num_heads = {num_heads}; "
                         f"got {tuple(qkv.shape)}")
    B, N, C3 = qkv.shape
    D = C3 // (3 * num_heads)
    if D % 2 or tuple(cos.shape) != (N, D) or tuple(sin.shape) != (N, D):
        raise ValueError(f"qkv_rope needs an even head_dim and cos/sin of shape (N, D) = {(N, D)}; got head_dim {D}, "
                         f"cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    if (q_weight is None) != (k_weight is None):
        raise ValueError("qkv_rope: qk-norm needs both q_weight and k_weight (or neither)")
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        if w is not None and tuple(w.shape) != (D,):
            raise ValueError(f"qkv_rope: {name} must have shape (head_dim,) = ({D},); got {tuple(w.shape)}")
    if bias is not None and tuple(bias.shape) != (C3,):
        raise ValueError(f"qkv_rope: bias must have shape ({C3},) (the qkv Linear's); got {tuple(bias.shape)}")
    return B, N, num_heads, D


def _out_dtypes(qkv: Tensor, q_weight: Optional[Tensor], k_weight: Optional[Tensor]) -> tuple[torch.dtype, ...]:
    # the reference's promotion: rms_norm(x, w) is x's dtype times w's; rope_qk keeps its input's dtype
    if q_weight is None:
        return qkv.dtype, qkv.dtype
    return torch.promote_types(qkv.dtype, q_weight.dtype), torch.promote_types(qkv.dtype, k_weight.dtype)


def _token_major(B: int, N: int, H: int, D: int, dtype: torch.dtype, like: Tensor) -> Tensor:
    """A (B, H, N, D) tensor whose memory is (B, N, H, D) contiguous: the layout attention's output follows."""
    return torch.empty((B, N, H, D), dtype=dtype, device=like.device).transpose(1, 2)


def _rows(qkv: Tensor) -> Tensor:
    """qkv as (rows, 3*H*D) with unit channel stride (a view for the Linear's output)."""
    return _triton.rows_2d(qkv)


def _unit_d(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op("vavae::qkv_rope", mutates_args=())
def qkv_rope_op(qkv: Tensor, cos: Tensor, sin: Tensor, num_heads: int, q_weight: Optional[Tensor],
                k_weight: Optional[Tensor], eps: float, bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    return qkv_rope_forward(qkv, cos, sin, num_heads, q_weight, k_weight, eps, bias)


def _config_kwargs(config: "triton.Config") -> dict:
    return {**config.kwargs, "num_warps": config.num_warps}


def qkv_rope_forward(qkv: Tensor, cos: Tensor, sin: Tensor, num_heads: int, q_weight: Optional[Tensor] = None,
                     k_weight: Optional[Tensor] = None, eps: float = 1e-6, bias: Optional[Tensor] = None,
                     config: Optional["triton.Config"] = None,
                     with_v: bool = True) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """The forward op's launch: autotuned (the interpreter's fixed tile there), or one of `_configs()` (GPU tests
    compare every config). bias: the qkv Linear's (3*H*D,), added before the qk-norm and RoPE. with_v=False: q and
    k only (v is None; without a bias: v's would be left out)."""
    B, N, H, D = _check(qkv, cos, sin, num_heads, q_weight, k_weight, bias)
    if not with_v and bias is not None:
        raise ValueError("qkv_rope: q and k alone only without a bias (v's would be left out)")
    q_dtype, k_dtype = _out_dtypes(qkv, q_weight, k_weight)
    q, k = (_token_major(B, N, H, D, dt, qkv) for dt in (q_dtype, k_dtype))
    v = _token_major(B, N, H, D, qkv.dtype, qkv) if with_v else None
    rows = B * N
    if rows and D:
        x = _rows(qkv)
        norm = q_weight is not None
        has_bias = bias is not None
        args = (x, x.stride(0), cos.contiguous(), sin.contiguous(), q_weight if norm else x,
                k_weight if norm else x, bias if has_bias else x, q, k, v if with_v else q, rows, N, H, eps)
        const = dict(D=D, HAS_NORM=norm, HAS_BIAS=has_bias, BLOCK_D=_triton.block_size(D), WITH_V=with_v)
        if config is not None:
            _qkv_rope_fwd_kernel[(triton.cdiv(rows, config.kwargs["BLOCK_R"]),)](
                *args, **const, **_config_kwargs(config))
        elif _triton.interpreting():
            _qkv_rope_fwd_kernel[(triton.cdiv(rows, BLOCK_R),)](
                *args, **const, BLOCK_R=BLOCK_R, ROWS=_INTERPRETER_ROWS and not norm, CHUNK=_INTERPRETER_CHUNK,
                num_warps=4)
        else:
            TUNED.run("fwd", lambda meta: (triton.cdiv(rows, meta["BLOCK_R"]),), args, const)
    return q, k, v


@qkv_rope_op.register_fake
def _(qkv, cos, sin, num_heads, q_weight, k_weight, eps, bias=None):
    B, N, H, D = _check(qkv, cos, sin, num_heads, q_weight, k_weight, bias)
    q_dtype, k_dtype = _out_dtypes(qkv, q_weight, k_weight)
    return tuple(_token_major(B, N, H, D, dt, qkv) for dt in (q_dtype, k_dtype, qkv.dtype))


@torch.library.custom_op("vavae::qkv_rope_bwd", mutates_args=())
def qkv_rope_bwd_op(dq: Tensor, dk: Tensor, dv: Tensor, cos: Tensor, sin: Tensor, qkv: Optional[Tensor],
                    q_weight: Optional[Tensor], k_weight: Optional[Tensor], eps: float, dtype: torch.dtype,
                    bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(d qkv (B, N, 3*H*D) in `dtype`, d q_weight, d k_weight, d bias); the weight grads are empty without qk-norm,
    where qkv (needed only to recompute the norm's statistics) may be None; d bias is empty without a bias."""
    return qkv_rope_backward(dq, dk, dv, cos, sin, qkv, q_weight, k_weight, eps, dtype, bias)


def qkv_rope_backward(dq: Tensor, dk: Tensor, dv: Tensor, cos: Tensor, sin: Tensor, qkv: Optional[Tensor],
                      q_weight: Optional[Tensor], k_weight: Optional[Tensor], eps: float, dtype: torch.dtype,
                      bias: Optional[Tensor] = None,
                      config: Optional["triton.Config"] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The backward op's launch: autotuned, the fixed tile (qk-norm, the interpreter), or one of `_configs()`
    without qk-norm (GPU tests compare every config). With the bias each program writes its partial sums of d qkv
    over its rows (one fp32 row of 3*H*D, sized for the smallest tile's program count) and torch sums the rows the
    launch wrote."""
    B, H, N, D = dq.shape
    dqkv = dq.new_empty((B, N, 3 * H * D), dtype=dtype)
    norm = q_weight is not None
    has_bias = bias is not None
    rows = B * N
    programs = triton.cdiv(rows, BLOCK_R)
    BLOCK_D = _triton.block_size(D) if D else 1
    partial = lambda: dq.new_empty((programs, BLOCK_D) if norm else (0,), dtype=torch.float32)  # noqa: E731
    pq, pk = partial(), partial()
    fewest_rows = min([BLOCK_R] + [c.kwargs["BLOCK_R"] for c in _configs()])
    pb = dq.new_empty((triton.cdiv(rows, fewest_rows) if has_bias else 0, 3 * H * D), dtype=torch.float32)
    used = programs
    if rows and D:
        dq, dk, dv = _unit_d(dq), _unit_d(dk), _unit_d(dv)
        x = _rows(qkv) if norm else dqkv  # pointer only: never read without qk-norm
        strides = [st for g in (dq, dk, dv) for st in g.stride()[:3]]
        unit = 8 if all(st % 8 == 0 for st in strides) else 1
        sq, sk, sv = ([st // unit for st in g.stride()[:3]] for g in (dq, dk, dv))
        args = (dq, *sq, dk, *sk, dv, *sv, cos.contiguous(), sin.contiguous(), x, x.stride(0),
                q_weight if norm else x, k_weight if norm else x, bias if has_bias else x, dqkv, pq, pk,
                pb if has_bias else x, rows, N, H, eps)
        adjacent = all(g.stride(1) == D for g in (dq, dk, dv))  # each token's heads one row (the row variant)
        const = dict(D=D, HAS_NORM=norm, HAS_BIAS=has_bias, BLOCK_D=BLOCK_D, STRIDE_UNIT=unit,
                     HEADS_ADJACENT=adjacent)
        if config is not None and not norm:
            if config.kwargs["ROWS"] and not adjacent:
                raise ValueError("qkv_rope's row variant needs each token's heads adjacent in dq, dk, dv")
            used = triton.cdiv(rows, config.kwargs["BLOCK_R"])
            _qkv_rope_bwd_kernel[(used,)](*args, **const, **_config_kwargs(config))
        elif norm or _triton.interpreting():  # qk-norm: the partial sums are sized for BLOCK_R's program count
            _qkv_rope_bwd_kernel[(programs,)](*args, **const, BLOCK_R=BLOCK_R,
                                              ROWS=_INTERPRETER_ROWS and adjacent and not norm,
                                              CHUNK=_INTERPRETER_CHUNK, num_warps=4)
        else:
            picked = TUNED.run("bwd", lambda meta: (triton.cdiv(rows, meta["BLOCK_R"]),), args, const)
            used = triton.cdiv(rows, picked.kwargs["BLOCK_R"])
    # the small reductions of the per-program partial sums, in fp32, then the parameters' dtypes
    db = pb[:used].sum(0).to(bias.dtype) if has_bias else dq.new_empty(0)
    if not norm:
        return dqkv, dq.new_empty(0), dq.new_empty(0), db
    return dqkv, pq.sum(0)[:D].to(q_weight.dtype), pk.sum(0)[:D].to(k_weight.dtype), db


@qkv_rope_bwd_op.register_fake
def _(dq, dk, dv, cos, sin, qkv, q_weight, k_weight, eps, dtype, bias=None):
    B, H, N, D = dq.shape
    dqkv = dq.new_empty((B, N, 3 * H * D), dtype=dtype)
    db = bias.new_empty(bias.shape) if bias is not None else dq.new_empty(0)
    if q_weight is None:
        return dqkv, dq.new_empty(0), dq.new_empty(0), db
    return dqkv, q_weight.new_empty(q_weight.shape), k_weight.new_empty(k_weight.shape), db


def _setup(ctx, inputs, output):
    qkv, cos, sin, num_heads, q_weight, k_weight, eps, bias = inputs
    norm = q_weight is not None
    # without qk-norm the backward needs only the tables (and the bias): qkv is not kept alive for it
    ctx.save_for_backward(cos, sin, qkv if norm else None, q_weight, k_weight, bias)
    ctx.eps, ctx.dtype, ctx.shape = eps, qkv.dtype, output[0].shape


def _backward(ctx, dq, dk, dv):
    cos, sin, qkv, q_weight, k_weight, bias = ctx.saved_tensors
    zeros = lambda: torch.zeros(ctx.shape, dtype=torch.float32, device=cos.device)  # noqa: E731  (an unused output)
    dq, dk, dv = (g if g is not None else zeros() for g in (dq, dk, dv))
    dqkv, dqw, dkw, db = qkv_rope_bwd_op(dq, dk, dv, cos, sin, qkv, q_weight, k_weight, ctx.eps, ctx.dtype, bias)
    norm = q_weight is not None
    return (dqkv, None, None, None, dqw if norm else None, dkw if norm else None, None,
            db if bias is not None else None)


qkv_rope_op.register_autograd(_backward, setup_context=_setup)


@torch.library.custom_op("vavae::qk_rope", mutates_args=())
def qk_rope_op(qkv: Tensor, cos: Tensor, sin: Tensor, num_heads: int, q_weight: Optional[Tensor],
               k_weight: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor]:
    """Inference (no autograd): q and k of `qkv_rope_op`, without a bias; v is left in the qkv output."""
    q, k, _ = qkv_rope_forward(qkv, cos, sin, num_heads, q_weight, k_weight, eps, with_v=False)
    return q, k


@qk_rope_op.register_fake
def _(qkv, cos, sin, num_heads, q_weight, k_weight, eps):
    B, N, H, D = _check(qkv, cos, sin, num_heads, q_weight, k_weight)
    return tuple(_token_major(B, N, H, D, dt, qkv) for dt in _out_dtypes(qkv, q_weight, k_weight))


def v_of(qkv: Tensor, num_heads: int) -> Tensor:
    """v (B, H, N, D) as a view of the qkv output (B, N, 3*H*D): unit channel stride, which every SDPA kernel takes
    (their q, k, v strides are separate arguments)."""
    B, N, C3 = qkv.shape
    return qkv.unflatten(-1, (3, num_heads, C3 // (3 * num_heads)))[:, :, 2].transpose(1, 2)


def qkv_rope_triton(qkv: Tensor, cos: Tensor, sin: Tensor, num_heads: int, q_weight: Optional[Tensor] = None,
                    k_weight: Optional[Tensor] = None, eps: float = 1e-6,
                    bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    if bias is None and not torch.is_grad_enabled():
        # inference (the sampler; no bias: linear_leaving_bias runs the whole Linear there): v is read by
        # attention where the GEMM wrote it, as the reference's view -- the kernel reads and writes q and k only,
        # 2/3 of the bytes. Training keeps v's copy: SDPA saves q, k, v for its backward, and a view of v
        # would keep the whole qkv output alive beside q and k (5/3 of its bytes a block where 3/3 are kept now)
        q, k = qk_rope_op(qkv, cos, sin, num_heads, q_weight, k_weight, eps)
        return q, k, v_of(qkv, num_heads)
    return qkv_rope_op(qkv, cos, sin, num_heads, q_weight, k_weight, eps, bias)


def bench_tables(N: int, D: int, device: str) -> tuple[Tensor, Tensor]:
    """fp32 (N, D) tables of the reference's pair layout (the model's buffers stay fp32 under autocast); their
    values do not change the timing."""
    angle = torch.rand(N, D // 2, device=device).repeat_interleave(2, dim=-1) * 6.283185307179586
    return angle.cos(), angle.sin()


def _bench(s: BenchShape, device: str, dtype: torch.dtype) -> BenchCase:
    # as the model runs it: the qkv Linear's fp32 bias added here and its gradient summed here
    qkv = torch.randn(s.B, s.N, 3 * s.H * s.D, device=device, dtype=dtype, requires_grad=True)
    bias = torch.randn(3 * s.H * s.D, device=device, dtype=torch.float32, requires_grad=True)
    cos, sin = bench_tables(s.N, s.D, device)
    QKV = s.rows * 3 * s.H * s.D * dtype.itemsize  # bytes of the qkv output (= of q, k, v together)
    TAB = 2 * s.N * s.D * 4
    BIAS = 3 * s.H * s.D * 4
    return BenchCase([qkv, bias], lambda f, t, b: f(t, cos, sin, s.H, None, None, 1e-6, b), 2 * QKV + TAB + BIAS,
                     2 * QKV + TAB + 2 * BIAS, shape={"B": s.B, "N": s.N, "H": s.H, "D": s.D})


# Under torch.compile, `auto` runs what kernels/compiled_choices.json says: ours until a GPU run's ops table (its
# row against torch.compile(reference)) decides otherwise (bench/compiled_choices.py)
register(Op(name="qkv_rope", reference=reference.qkv_rope, impls={"triton": qkv_rope_triton}, bench=_bench,
            doc="qkv GEMM output (B, N, 3HD) -> (qk RMSNorm) -> RoPE -> q, k, v (B, H, N, D; token-major memory), "
                "one pass; bwd writes d qkv in one pass"))
