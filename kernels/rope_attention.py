"""The attention block's core in one Triton kernel each way: qkv GEMM output -> RoPE -> attention -> (B, N, H*D).

Forward (FlashAttention-2 style, one program per (query block, batch x head)): reads q and k straight from the qkv
Linear's output (B, N, 3*H*D) -- per token the q, k, v blocks of H heads of D channels, what `nn.Linear(C, 3C)`
writes -- rotates them (RoPE, fp32) and rounds them to the input dtype where they are loaded, runs the online
softmax over key blocks, and writes the output straight into (B, N, H*D), the proj Linear's input; it keeps the
log-sum-exp per query row for the backward. No q/k/v tensors, no layout copies, no RoPE pass: the bytes moved are
qkv once (plus L2 re-reads of k/v) and the output once. Each program rotates its head's whole k (N / BLOCK_M times
per head: 2-4 at N = 256), reading the fp32 tables from L1/L2: the GPU profile says whether that costs.

Backward, one program per (batch x head): the rows' dO.O sums and q rotated once first (q into a scratch that stays
in L2), then for each key block the dK/dV accumulators in registers over every query block (recomputing P from the
saved log-sum-exp), the dQ contributions summed in an fp32 scratch, also L2-resident, that only this program
touches: either read back and rewritten per key block, or added by atomics performed in L2 (in key-block order by
the one thread that holds each element: deterministic; the same sums, bit for bit under the interpreter, to rounding
on a GPU, where the read-modify-write's add is folded into the MMA's accumulator; the autotuner times both);
dq, dk (with the transposed rotation) and dv are written straight into the gradient of the qkv output: the qkv
GEMM's backward reads it as is.

head_dim 72 (LightningDiT-XL) is not a power of two and tl.dot needs power-of-two tiles of at least 16: each head
is held as two tiles, 64 + 16 (the last 8 lanes masked; `head_split`), so every matmul runs at 80/72 of the work
instead of the 128/72 one padded tile costs. RoPE pairs (2i, 2i+1) never straddle the two tiles (the first is even).

The math is SDPA's (scale 1/sqrt(D), no mask) on the reference's rounded q/k: the rotation in fp32, q and k rounded
to the input dtype (as `kernels.qkv_rope` stores them), fp32 accumulation, P rounded to the input dtype for the PV
and dS products as FlashAttention does; in fp32 every product is IEEE fp32 (no TF32). Reference:
`kernels.reference.rope_attention`. qk-norm is not fused here: the chooser (kernels/attention.py) runs the split
path (qkv_rope + attention) for it.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import _triton
from ._triton import tl, triton

# (BLOCK_M queries, BLOCK_N keys, warps, software-pipelining stages): the autotuners' candidates on a GPU, each
# compiled for sm_90 with its matmuls as wgmma and without spills (bench.sm90_check, Triton 3.9's ptxas). The
# backward holds dK and dV of its key block (fp32) and the key block itself across the query loop: of the tiles
# tried only 64 x 64 at 8 warps does not spill (244-255 registers; the pipeliner stages the query-side loads in
# shared memory): at 4 warps 80-292 bytes, 128 x 64 32-128, 64 x 128 450+. Its last field, DQ_ATOMIC, is how dQ is
# summed over key blocks: read-modify-write of an fp32 scratch with a barrier per key block, or fire-and-forget
# atomics performed in L2 (half the bytes through the SM, no barrier). The same sums, but not the same rounding on a
# GPU: there Triton folds the read-modify-write's add into the matmul (the running dQ becomes the MMA's
# accumulator, `tt.dot(ds, k, dq)`), where the atomics add each block's product to it; under the interpreter they
# agree bit for bit. Each is deterministic (one program owns a head's dQ rows). Which is faster
# depends on the card's L2, so the autotuner times both. Stages: the read-modify-write spills 8-12 bytes at 1-2,
# the atomics 20 at 3, and (since the qkv Linear's bias and its gradient's sums moved into these kernels, k rotated
# once into an L2 scratch like q) 20-28 at 4; 8 bytes remain under Triton 3.6 at head_dim 72. The forward's last field, K_ONCE: each program rotates k where it loads it (once per query
# block), or one program per head rotates k once into an L2 scratch and runs all its query blocks (fewer programs,
# no rotation in the softmax loop, which without it compiles to 12% (128 x 64) to 19% (64 x 64) fewer SASS
# instructions). The autotuner times both.
FWD_TILES = ((64, 64, 4, 3, False), (128, 64, 8, 3, False), (64, 128, 4, 2, False), (128, 128, 8, 2, False),
             (64, 64, 4, 3, True), (128, 64, 8, 3, True))
BWD_TILES = ((64, 64, 8, 3, False), (64, 64, 8, 2, True))
_INTERPRETER_TILE = (16, 16)  # the interpreter: small tiles, several blocks in the tests' ragged sizes
_INTERPRETER_K_ONCE = False  # the forward's variant the interpreter runs (a test runs the other)
_INTERPRETER_DQ_ATOMIC = False  # the backward's variant the interpreter runs (a test runs the other)


def head_split(D: int) -> tuple[int, int]:
    """(DA, DB): head_dim D as a power-of-two tile of DA channels and a second of DB (0: none), each at least 16
    wide (tl.dot's minimum): 72 -> (64, 16), 64 -> (64, 0), 40 -> (32, 16), 8 -> (16, 0). The kernels get
    DB = 16 with HAS_B False where there is none (an unused tile's shape)."""
    if D >= 16 and D & (D - 1) == 0:
        return D, 0
    a = 1 << (D.bit_length() - 1)
    if a < 16:
        return max(16, triton.next_power_of_2(D)), 0
    return a, max(16, triton.next_power_of_2(D - a))


@triton.jit
def _dot(a, b, PREC: tl.constexpr):
    # PREC "upcast": the Triton interpreter multiplies bf16 tiles wrongly (Triton 3.9 on the CPU), so there the
    # (already rounded) 16-bit operands go in as fp32: exact products, fp32 sums, as the tensor cores do
    if PREC == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _in_range(i, N, EVEN: tl.constexpr):
    # i < N; where N is a multiple of every block the launch uses (EVEN), all true as a constant: the loads lose
    # their row masks and the selects on padded rows fold away (XL/1: N = 256)
    if EVEN:
        return tl.full(i.shape, 1, tl.int1)
    else:
        return i < N


@triton.jit
def _rotate(x, c, s, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, TRANSPOSE: tl.constexpr):
    # RoPE on pairs (2i, 2i+1), fp32 tiles: out[2i] = x[2i] c[2i] - x[2i+1] s[2i], out[2i+1] = x[2i+1] c[2i+1]
    # + x[2i] s[2i+1]; TRANSPOSE: the backward's transposed rotation
    xe, xo = tl.split(tl.reshape(x, (BLOCK_R, BLOCK_D // 2, 2)))
    ce, co = tl.split(tl.reshape(c, (BLOCK_R, BLOCK_D // 2, 2)))
    se, so = tl.split(tl.reshape(s, (BLOCK_R, BLOCK_D // 2, 2)))
    if TRANSPOSE:
        out = tl.join(xe * ce + xo * so, xo * co - xe * se)
    else:
        out = tl.join(xe * ce - xo * se, xo * co + xe * so)
    return tl.reshape(out, (BLOCK_R, BLOCK_D))


@triton.jit
def _load_tile(rows, ok, d0, D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # rows: (BLOCK_R,) pointers to each row's channel 0 of the head; channels d0 .. d0 + BLOCK_D, masked to D
    d = d0 + tl.arange(0, BLOCK_D)
    return tl.load(rows[:, None] + d[None, :], mask=ok[:, None] & (d[None, :] < D), other=0.0)


@triton.jit
def _load_biased(rows, ok, d0, BROW, D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                 HAS_BIAS: tl.constexpr, SIGN: tl.constexpr):
    # a tile (fp32) plus SIGN times its channels' bias (BROW: the head's D biases of that part): q or k with theirs
    # (SIGN 1), or the output less v's (SIGN -1: P V, what the backward's dp is taken against)
    x = _load_tile(rows, ok, d0, D, BLOCK_R, BLOCK_D).to(tl.float32)
    if HAS_BIAS:
        d = d0 + tl.arange(0, BLOCK_D)
        x += SIGN * tl.load(BROW + d, mask=d < D, other=0.0)[None, :]
    return x


@triton.jit
def _load_rotated(rows, ok, n, d0, COS, SIN, BROW, D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                  HAS_BIAS: tl.constexpr):
    # q or k of BLOCK_R tokens (positions n), channels d0.., (+ bias,) rotated in fp32 and rounded to the input dtype
    x = _load_biased(rows, ok, d0, BROW, D, BLOCK_R, BLOCK_D, HAS_BIAS, 1.0)
    d = d0 + tl.arange(0, BLOCK_D)
    mask = ok[:, None] & (d[None, :] < D)
    tab = n[:, None] * D + d[None, :]
    c = tl.load(COS + tab, mask=mask, other=0.0)
    s = tl.load(SIN + tab, mask=mask, other=0.0)
    return _rotate(x, c, s, BLOCK_R, BLOCK_D, False).to(rows.dtype.element_ty)


@triton.jit
def _store_unrotated(rows, ok, n, d0, g, COS, SIN, D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # the gradient of a rotated tile (fp32) -> the gradient of the unrotated one, stored in the rows' dtype; returns
    # it (fp32: the bias's partial sums)
    d = d0 + tl.arange(0, BLOCK_D)
    mask = ok[:, None] & (d[None, :] < D)
    tab = n[:, None] * D + d[None, :]
    c = tl.load(COS + tab, mask=mask, other=0.0)
    s = tl.load(SIN + tab, mask=mask, other=0.0)
    g = _rotate(g, c, s, BLOCK_R, BLOCK_D, True)
    tl.store(rows[:, None] + d[None, :], g.to(rows.dtype.element_ty), mask=mask)
    return g


@triton.jit
def _store_bias_sums(prow, d0, g, D: tl.constexpr, BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr):
    # a tile's column sums (fp32; its masked rows are 0) into its block's row of the bias's partial sums
    if HAS_BIAS:
        d = d0 + tl.arange(0, BLOCK_D)
        tl.store(prow + d, tl.sum(g, axis=0), mask=d < D)


@triton.jit
def _store_tile(rows, ok, d0, x, D: tl.constexpr, BLOCK_D: tl.constexpr):
    d = d0 + tl.arange(0, BLOCK_D)
    tl.store(rows[:, None] + d[None, :], x.to(rows.dtype.element_ty), mask=ok[:, None] & (d[None, :] < D))


@triton.jit
def _add_tile(rows, ok, d0, x, D: tl.constexpr, BLOCK_D: tl.constexpr):
    # x added to an fp32 scratch tile in L2 (relaxed: no fences; the result is not read back)
    d = d0 + tl.arange(0, BLOCK_D)
    tl.atomic_add(rows[:, None] + d[None, :], x, mask=ok[:, None] & (d[None, :] < D), sem="relaxed")


@triton.jit
def _load_sums(rows, ok, d0, D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # the scratch's sums, read from L2 (".cg": past this SM's L1, which the atomics performed in L2 do not update)
    d = d0 + tl.arange(0, BLOCK_D)
    return tl.load(rows[:, None] + d[None, :], mask=ok[:, None] & (d[None, :] < D), other=0.0, cache_modifier=".cg")


@triton.jit
def _fwd_query_block(QKV, s_qkv, COS, SIN, BIAS, O, s_o, LSE, KROT, b, h, bh, start_m, N, H, qk_scale,
                     D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, HAS_B: tl.constexpr, PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, K_ONCE: tl.constexpr, HAS_BIAS: tl.constexpr,
                     EVEN: tl.constexpr):
    # one block of BLOCK_M queries of head h: q rotated where loaded, the online softmax over every key block (k
    # rotated where loaded, or read rotated from the head's scratch KROT: K_ONCE), out and log2-sum-exp2 stored.
    # HAS_BIAS: the qkv Linear's bias added to q and k where loaded; v's is added to the output (each softmax row
    # sums to 1: P (V + 1 b^T) = P V + 1 b^T), out of the key loop
    HD = H * D
    DP: tl.constexpr = DA + DB
    m = start_m + tl.arange(0, BLOCK_M)
    m_ok = _in_range(m, N, EVEN)
    q_rows = QKV + (b * N + m).to(tl.int64) * s_qkv + h * D
    qa = _load_rotated(q_rows, m_ok, m, 0, COS, SIN, BIAS + h * D, D, BLOCK_M, DA, HAS_BIAS)
    if HAS_B:
        qb = _load_rotated(q_rows, m_ok, m, DA, COS, SIN, BIAS + h * D, D, BLOCK_M, DB, HAS_BIAS)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc_a = tl.zeros([BLOCK_M, DA], tl.float32)
    acc_b = tl.zeros([BLOCK_M, DB], tl.float32)
    kr_rows = KROT + bh.to(tl.int64) * N * DP
    for start in range(0, N, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = _in_range(n, N, EVEN)
        k_rows = QKV + (b * N + n).to(tl.int64) * s_qkv + HD + h * D
        v_rows = k_rows + HD
        if K_ONCE:
            ka = _load_tile(kr_rows + n * DP, n_ok, 0, DP, BLOCK_N, DA)
        else:
            ka = _load_rotated(k_rows, n_ok, n, 0, COS, SIN, BIAS + HD + h * D, D, BLOCK_N, DA, HAS_BIAS)
        s = _dot(qa, tl.trans(ka), PREC)
        if HAS_B:
            if K_ONCE:
                kb = _load_tile(kr_rows + n * DP, n_ok, DA, DP, BLOCK_N, DB)
            else:
                kb = _load_rotated(k_rows, n_ok, n, DA, COS, SIN, BIAS + HD + h * D, D, BLOCK_N, DB, HAS_BIAS)
            s += _dot(qb, tl.trans(kb), PREC)
        s = tl.where(n_ok[None, :], s * qk_scale, float("-inf"))  # log2 units
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        p = p.to(qa.dtype)
        acc_a = acc_a * alpha[:, None] + _dot(p, _load_tile(v_rows, n_ok, 0, D, BLOCK_N, DA), PREC)
        if HAS_B:
            acc_b = acc_b * alpha[:, None] + _dot(p, _load_tile(v_rows, n_ok, DA, D, BLOCK_N, DB), PREC)
        m_i = m_new
    o_rows = O + (b * N + m).to(tl.int64) * s_o + h * D
    out_a = acc_a / l_i[:, None]
    if HAS_BIAS:
        da = tl.arange(0, DA)
        out_a += tl.load(BIAS + 2 * HD + h * D + da, mask=da < D, other=0.0)[None, :]
    _store_tile(o_rows, m_ok, 0, out_a, D, DA)
    if HAS_B:
        out_b = acc_b / l_i[:, None]
        if HAS_BIAS:
            db = DA + tl.arange(0, DB)
            out_b += tl.load(BIAS + 2 * HD + h * D + db, mask=db < D, other=0.0)[None, :]
        _store_tile(o_rows, m_ok, DA, out_b, D, DB)
    tl.store(LSE + bh * N + m, m_i + tl.math.log2(l_i), mask=m_ok)


@triton.jit
def _rope_attn_fwd_kernel(QKV, s_qkv, COS, SIN, BIAS, O, s_o, LSE, KROT, N, H, BH, qk_scale,
                          D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, HAS_B: tl.constexpr,
                          PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, K_ONCE: tl.constexpr,
                          HAS_BIAS: tl.constexpr, EVEN: tl.constexpr):
    # D channels per head as tiles of DA and (HAS_B) DB channels (head_split); BH (batch x heads) only keys the
    # autotuner. Grid (query blocks, batch x heads): each program rotates its head's k where it loads it, once per
    # query block. K_ONCE, grid (1, batch x heads): the program rotates its head's k once into the scratch KROT
    # (L2-resident while it runs), then runs every query block reading k from there: the rotation's loads and
    # arithmetic leave the softmax loop, in N / BLOCK_M times fewer programs (4096 at XL/1's batch 256: enough)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    if K_ONCE:
        DP: tl.constexpr = DA + DB
        kr_rows = KROT + bh.to(tl.int64) * N * DP
        for start in range(0, N, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            n_ok = _in_range(n, N, EVEN)
            k_rows = QKV + (b * N + n).to(tl.int64) * s_qkv + H * D + h * D
            kbias = BIAS + H * D + h * D
            _store_tile(kr_rows + n * DP, n_ok, 0,
                        _load_rotated(k_rows, n_ok, n, 0, COS, SIN, kbias, D, BLOCK_N, DA, HAS_BIAS), DP, DA)
            if HAS_B:
                _store_tile(kr_rows + n * DP, n_ok, DA,
                            _load_rotated(k_rows, n_ok, n, DA, COS, SIN, kbias, D, BLOCK_N, DB, HAS_BIAS), DP, DB)
        tl.debug_barrier()  # the loads below may run on other threads than these stores
        for start_m in range(0, N, BLOCK_M):
            _fwd_query_block(QKV, s_qkv, COS, SIN, BIAS, O, s_o, LSE, KROT, b, h, bh, start_m, N, H, qk_scale,
                             D, DA, DB, HAS_B, PREC, BLOCK_M, BLOCK_N, K_ONCE, HAS_BIAS, EVEN)
    else:
        _fwd_query_block(QKV, s_qkv, COS, SIN, BIAS, O, s_o, LSE, KROT, b, h, bh, tl.program_id(0) * BLOCK_M, N, H,
                         qk_scale, D, DA, DB, HAS_B, PREC, BLOCK_M, BLOCK_N, K_ONCE, HAS_BIAS, EVEN)


@triton.jit
def _rope_attn_bwd_kernel(QKV, s_qkv, COS, SIN, BIAS, O, s_o, DO, s_do, LSE, DELTA, QROT, KROT, DQACC, DQKV, PBIAS,
                          N, H, BH, NBLK, qk_scale, sm_scale,
                          D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, HAS_B: tl.constexpr,
                          PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          DQ_ATOMIC: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN: tl.constexpr):
    # DQ_ATOMIC: each key block's dQ contributions are added to the scratch by fire-and-forget fp32 atomics
    # (performed in L2: the SM sends 4 bytes an element instead of reading 4 and writing 4, and the warps do not
    # wait for the read or meet at a barrier per key block); the scratch is zeroed first. Bit for bit the other
    # variant's sums: an element's additions come from the one thread that holds it in every key block (the same
    # code, the same layout), in key-block order, and same-address operations of one thread keep program order.
    # HAS_BIAS: q, k, v recomputed with the qkv Linear's bias, and each block's column sums of d q, d k, d v (fp32)
    # written to its row of PBIAS ((batch x head) x NBLK blocks x 3 x D; torch sums them into the bias's gradient).
    # EVEN drops the row masks under DQ_ATOMIC only: the read-modify-write variant without them spilled 68 bytes
    # under Triton 3.6 at head_dim 72 (8 with them), where the atomics' row loop lost 13% of its instructions
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    HD = H * D
    DP: tl.constexpr = DA + DB  # a scratch row: both tiles
    ROWS_FULL: tl.constexpr = EVEN and DQ_ATOMIC
    base = (b * N).to(tl.int64)
    acc_rows = DQACC + bh.to(tl.int64) * N * DP
    qr_rows = QROT + bh.to(tl.int64) * N * DP
    kr_rows = KROT + bh.to(tl.int64) * N * DP
    p_rows = PBIAS + bh.to(tl.int64) * NBLK * 3 * D
    # 1. each query row's delta = rowsum(dO * O) (the softmax backward's correction), and q and k rotated once (into
    # scratches that stay in L2): the loops below read them for every key block; the key loop then holds no tables
    # and no bias (registers: at 255 with 8 warps, the rotation's temporaries there made ptxas spill)
    for start_m in range(0, N, BLOCK_M):
        m = start_m + tl.arange(0, BLOCK_M)
        m_ok = _in_range(m, N, ROWS_FULL)
        q_rows = QKV + (base + m) * s_qkv + h * D
        _store_tile(qr_rows + m * DP, m_ok, 0,
                    _load_rotated(q_rows, m_ok, m, 0, COS, SIN, BIAS + h * D, D, BLOCK_M, DA, HAS_BIAS), DP, DA)
        if HAS_B:
            _store_tile(qr_rows + m * DP, m_ok, DA,
                        _load_rotated(q_rows, m_ok, m, DA, COS, SIN, BIAS + h * D, D, BLOCK_M, DB, HAS_BIAS), DP, DB)
        _store_tile(kr_rows + m * DP, m_ok, 0,
                    _load_rotated(q_rows + HD, m_ok, m, 0, COS, SIN, BIAS + HD + h * D, D, BLOCK_M, DA, HAS_BIAS), DP,
                    DA)
        if HAS_B:
            _store_tile(kr_rows + m * DP, m_ok, DA,
                        _load_rotated(q_rows + HD, m_ok, m, DA, COS, SIN, BIAS + HD + h * D, D, BLOCK_M, DB,
                                      HAS_BIAS), DP, DB)
        o_rows = O + (base + m) * s_o + h * D
        do_rows = DO + (base + m) * s_do + h * D
        # with v's bias: O = P V + b_v, and dp below is taken against V without it, so delta against O - b_v
        # (the same dp - delta as with V + b_v in dp: the bias's term cancels)
        delta = tl.sum(_load_tile(do_rows, m_ok, 0, D, BLOCK_M, DA).to(tl.float32)
                       * _load_biased(o_rows, m_ok, 0, BIAS + 2 * HD + h * D, D, BLOCK_M, DA, HAS_BIAS, -1.0), 1)
        if HAS_B:
            delta += tl.sum(_load_tile(do_rows, m_ok, DA, D, BLOCK_M, DB).to(tl.float32)
                            * _load_biased(o_rows, m_ok, DA, BIAS + 2 * HD + h * D, D, BLOCK_M, DB, HAS_BIAS, -1.0), 1)
        tl.store(DELTA + bh * N + m, delta, mask=m_ok)
        if DQ_ATOMIC:
            _store_tile(acc_rows + m * DP, m_ok, 0, tl.zeros([BLOCK_M, DA], tl.float32), DP, DA)
            if HAS_B:
                _store_tile(acc_rows + m * DP, m_ok, DA, tl.zeros([BLOCK_M, DB], tl.float32), DP, DB)
    tl.debug_barrier()
    # 2. per key block: dK, dV over every query block; dQ's contributions summed in the scratch
    for start_n in range(0, N, BLOCK_N):
        n = start_n + tl.arange(0, BLOCK_N)
        n_ok = _in_range(n, N, ROWS_FULL)
        k_rows = QKV + (base + n) * s_qkv + HD + h * D
        v_rows = k_rows + HD
        ka = _load_tile(kr_rows + n * DP, n_ok, 0, DP, BLOCK_N, DA)
        va = _load_tile(v_rows, n_ok, 0, D, BLOCK_N, DA)
        dka = tl.zeros([BLOCK_N, DA], tl.float32)
        dva = tl.zeros([BLOCK_N, DA], tl.float32)
        if HAS_B:
            kb = _load_tile(kr_rows + n * DP, n_ok, DA, DP, BLOCK_N, DB)
            vb = _load_tile(v_rows, n_ok, DA, D, BLOCK_N, DB)
            dkb = tl.zeros([BLOCK_N, DB], tl.float32)
            dvb = tl.zeros([BLOCK_N, DB], tl.float32)
        for start_m in range(0, N, BLOCK_M):
            m = start_m + tl.arange(0, BLOCK_M)
            m_ok = _in_range(m, N, ROWS_FULL)
            do_rows = DO + (base + m) * s_do + h * D
            qa = _load_tile(qr_rows + m * DP, m_ok, 0, DP, BLOCK_M, DA)
            doa = _load_tile(do_rows, m_ok, 0, D, BLOCK_M, DA).to(qa.dtype)
            lse = tl.load(LSE + bh * N + m, mask=m_ok, other=float("inf"))  # padded rows: P = 0
            delta = tl.load(DELTA + bh * N + m, mask=m_ok, other=0.0)
            s = _dot(qa, tl.trans(ka), PREC)
            dp = _dot(doa, tl.trans(va), PREC)
            if HAS_B:
                qb = _load_tile(qr_rows + m * DP, m_ok, DA, DP, BLOCK_M, DB)
                dob = _load_tile(do_rows, m_ok, DA, D, BLOCK_M, DB).to(qa.dtype)
                s += _dot(qb, tl.trans(kb), PREC)
                dp += _dot(dob, tl.trans(vb), PREC)
            p = tl.where(n_ok[None, :], tl.math.exp2(s * qk_scale - lse[:, None]), 0.0)
            ds = (p * (dp - delta[:, None])).to(qa.dtype)  # d(score), before the 1/sqrt(D) scale
            p = p.to(qa.dtype)
            dva += _dot(tl.trans(p), doa, PREC)
            dka += _dot(tl.trans(ds), qa, PREC)
            dqa = _dot(ds, ka, PREC)
            a_rows = acc_rows + m * DP
            if DQ_ATOMIC:
                _add_tile(a_rows, m_ok, 0, dqa, DP, DA)
            else:
                a_ok = m_ok & (start_n > 0)  # the first key block writes the scratch, the others add to it
                dqa += _load_tile(a_rows, a_ok, 0, DP, BLOCK_M, DA)
                _store_tile(a_rows, m_ok, 0, dqa, DP, DA)
            if HAS_B:
                dvb += _dot(tl.trans(p), dob, PREC)
                dkb += _dot(tl.trans(ds), qb, PREC)
                dqb = _dot(ds, kb, PREC)
                if DQ_ATOMIC:
                    _add_tile(a_rows, m_ok, DA, dqb, DP, DB)
                else:
                    dqb += _load_tile(a_rows, a_ok, DA, DP, BLOCK_M, DB)
                    _store_tile(a_rows, m_ok, DA, dqb, DP, DB)
        dk_rows = DQKV + (base + n) * (3 * HD) + HD + h * D
        p_row = p_rows + (start_n // BLOCK_N) * 3 * D
        _store_bias_sums(p_row + D, 0, _store_unrotated(dk_rows, n_ok, n, 0, dka * sm_scale, COS, SIN, D, BLOCK_N,
                                                        DA), D, DA, HAS_BIAS)
        _store_tile(dk_rows + HD, n_ok, 0, dva, D, DA)
        _store_bias_sums(p_row + 2 * D, 0, dva, D, DA, HAS_BIAS)
        if HAS_B:
            _store_bias_sums(p_row + D, DA, _store_unrotated(dk_rows, n_ok, n, DA, dkb * sm_scale, COS, SIN, D,
                                                             BLOCK_N, DB), D, DB, HAS_BIAS)
            _store_tile(dk_rows + HD, n_ok, DA, dvb, D, DB)
            _store_bias_sums(p_row + 2 * D, DA, dvb, D, DB, HAS_BIAS)
        if not DQ_ATOMIC:
            tl.debug_barrier()  # the scratch: the next key block's loads may run on other threads than these stores
    if DQ_ATOMIC:
        tl.debug_barrier()  # every thread's additions performed before any thread reads the sums
    # 3. dq: the summed scratch, scaled, rotated back, into the gradient's q part
    for start_m in range(0, N, BLOCK_M):
        m = start_m + tl.arange(0, BLOCK_M)
        m_ok = _in_range(m, N, ROWS_FULL)
        a_rows = acc_rows + m * DP
        dq_rows = DQKV + (base + m) * (3 * HD) + h * D
        p_row = p_rows + (start_m // BLOCK_M) * 3 * D
        _store_bias_sums(p_row, 0, _store_unrotated(dq_rows, m_ok, m, 0, _load_sums(a_rows, m_ok, 0, DP, BLOCK_M, DA)
                                                    * sm_scale, COS, SIN, D, BLOCK_M, DA), D, DA, HAS_BIAS)
        if HAS_B:
            _store_bias_sums(p_row, DA, _store_unrotated(dq_rows, m_ok, m, DA, _load_sums(a_rows, m_ok, DA, DP,
                                                                                          BLOCK_M, DB) * sm_scale,
                                                         COS, SIN, D, BLOCK_M, DB), D, DB, HAS_BIAS)


FWD_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "K_ONCE": k}, num_warps=w, num_stages=st)
               for m, n, w, st, k in FWD_TILES]
BWD_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "DQ_ATOMIC": a}, num_warps=w, num_stages=st)
               for m, n, w, st, a in BWD_TILES]


# Both kernels write every output element on each run (the backward's scratch is written before it is read), so
# the autotuner times its configs on the real buffers.
# Keyed by the program count too (BH = batch x heads): a choice made at one sample (a start-up check) is not
# reused at the training batch.
_fwd_tuned = triton.autotune(configs=FWD_CONFIGS, key=["D", "PREC", "N", "BH"])(_rope_attn_fwd_kernel)
_bwd_tuned = triton.autotune(configs=BWD_CONFIGS, key=["D", "PREC", "N", "BH"])(_rope_attn_bwd_kernel)


TUNED = _triton.TunedKernels(fwd=_fwd_tuned, bwd=_bwd_tuned)


def autotuned() -> dict[str, dict[str, dict]]:
    """What the autotuners did in this process, per kernel ("fwd", "bwd") and key (D, PREC, N, BH): the config
    picked (which variant ran -- K_ONCE, DQ_ATOMIC -- at which tile) and every candidate's time in ms, for result
    records."""
    return TUNED.report()


# ----------------------------------------------------------------------------- checks, launchers, autograd

def _check(qkv: Tensor, cos: Tensor, sin: Tensor, num_heads: int,
           bias: Optional[Tensor] = None) -> tuple[int, int, int, int]:
    """(B, N, H, D), or ValueError naming what does not fit."""
    if qkv.dim() != 3 or num_heads < 1 or qkv.shape[-1] % (3 * num_heads):
        raise ValueError(f"rope_attention needs qkv of shape (B, N, 3*H*D) with H = num_heads = {num_heads}; "
                         f"got {tuple(qkv.shape)}")
    B, N, C3 = qkv.shape
    D = C3 // (3 * num_heads)
    if D % 2 or tuple(cos.shape) != (N, D) or tuple(sin.shape) != (N, D):
        raise ValueError(f"rope_attention needs an even head_dim and cos/sin of shape (N, D) = {(N, D)}; got "
                         f"head_dim {D}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    if qkv.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"rope_attention runs fp32, bf16 or fp16 qkv; got {qkv.dtype}")
    if bias is not None and tuple(bias.shape) != (C3,):
        raise ValueError(f"rope_attention: bias must have shape ({C3},) (the qkv Linear's); got {tuple(bias.shape)}")
    return B, N, num_heads, D


def _split(D: int) -> dict:
    DA, DB = head_split(D)
    return {"DA": DA, "DB": max(DB, 16), "HAS_B": DB > 0}


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs: IEEE products (Triton's default for fp32 dots on a GPU is TF32, 10 mantissa bits: parity would
    # fail); 16-bit inputs have one precision, except in the interpreter (see _dot)
    if dtype == torch.float32:
        return "ieee"
    return "upcast" if _triton.interpreting() else "tf32"


def _tables(cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    return cos.float().contiguous(), sin.float().contiguous()


@torch.library.custom_op("vavae::rope_attention", mutates_args=())
def rope_attention_op(qkv: Tensor, cos: Tensor, sin: Tensor, num_heads: int,
                      bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(out (B, N, H*D) in qkv's dtype, log2-sum-exp2 per (batch x head, query) in fp32); bias: the qkv Linear's."""
    return rope_attention_forward(qkv, cos, sin, num_heads, bias=bias)


def _even(N: int, tiles) -> bool:
    """Is N a multiple of every (BLOCK_M, BLOCK_N, ...) block in `tiles` (those the launch may run)?"""
    return all(N % t[0] == 0 and N % t[1] == 0 for t in tiles)


def _fwd_grid(N: int, BH: int, meta: dict) -> tuple[int, int]:
    return (1 if meta["K_ONCE"] else triton.cdiv(N, meta["BLOCK_M"]), BH)


def rope_attention_forward(qkv: Tensor, cos: Tensor, sin: Tensor, num_heads: int,
                           config: Optional[triton.Config] = None,
                           bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """The forward's launch: the autotuned one (config None; the interpreter: its small tiles and
    `_INTERPRETER_K_ONCE`), or the one config given (the tests compare the variants)."""
    B, N, H, D = _check(qkv, cos, sin, num_heads, bias)
    out = qkv.new_empty((B, N, H * D))
    lse = qkv.new_empty((B * H, N), dtype=torch.float32)
    if B * N * H * D:
        x = _triton.rows_2d(qkv)
        cos, sin = _tables(cos, sin)
        split = _split(D)
        krot = x.new_empty((B * H, N, split["DA"] + split["DB"]))  # K_ONCE's rotated k, per (batch x head)
        args = (x, x.stride(0), cos, sin, bias if bias is not None else cos, out, H * D, lse, krot, N, H, B * H,
                math.log2(math.e) / math.sqrt(D))
        tiles = [(config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"])] if config is not None else (
            [_INTERPRETER_TILE] if _triton.interpreting() else FWD_TILES)
        const = dict(D=D, **split, PREC=_precision(qkv.dtype), HAS_BIAS=bias is not None, EVEN=_even(N, tiles))
        if config is not None:
            _rope_attn_fwd_kernel[_fwd_grid(N, B * H, config.kwargs)](
                *args, **const, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
        elif _triton.interpreting():
            bm, bn = _INTERPRETER_TILE
            meta = dict(BLOCK_M=bm, BLOCK_N=bn, K_ONCE=_INTERPRETER_K_ONCE)
            _rope_attn_fwd_kernel[_fwd_grid(N, B * H, meta)](*args, **const, **meta)
        else:
            TUNED.run("fwd", lambda meta: _fwd_grid(N, B * H, meta), args, const)
    return out, lse


@rope_attention_op.register_fake
def _(qkv, cos, sin, num_heads, bias=None):
    B, N, H, D = _check(qkv, cos, sin, num_heads, bias)
    return qkv.new_empty((B, N, H * D)), qkv.new_empty((B * H, N), dtype=torch.float32)


@torch.library.custom_op("vavae::rope_attention_bwd", mutates_args=())
def rope_attention_bwd_op(dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, cos: Tensor, sin: Tensor,
                          num_heads: int, bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(d qkv (B, N, 3*H*D) in qkv's dtype, d bias: empty without a bias)."""
    return rope_attention_backward(dout, qkv, out, lse, cos, sin, num_heads, bias=bias)


def _bias_blocks(N: int, config: Optional[triton.Config]) -> int:
    """Rows of per-block bias sums a (batch x head) gets: enough for the smallest query or key block any launch may
    use (the interpreter's, a given config's, or any autotuner candidate's)."""
    if config is not None:
        sizes = [config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]]
    elif _triton.interpreting():
        sizes = list(_INTERPRETER_TILE)
    else:
        sizes = [t for m, n, *_ in BWD_TILES for t in (m, n)]
    return triton.cdiv(N, min(sizes))


def rope_attention_backward(dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, cos: Tensor, sin: Tensor,
                            num_heads: int, config: Optional[triton.Config] = None,
                            bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """The backward's launch: the autotuned one (config None; the interpreter: its small tiles and
    `_INTERPRETER_DQ_ATOMIC`), or the one config given (the tests compare the variants). With the bias, each query
    and key block's column sums of d q, d k, d v land in a zeroed scratch ((batch x head) x blocks x 3 x D) that
    torch sums into the bias's gradient."""
    B, N, H, D = _check(qkv, cos, sin, num_heads, bias)
    dqkv = qkv.new_empty(qkv.shape)
    has_bias = bias is not None
    nblk = _bias_blocks(N, config) if has_bias else 0
    pbias = torch.zeros((B, H, nblk, 3, D) if has_bias else (0,), dtype=torch.float32, device=qkv.device)
    if B * N * H * D:
        x, o, do = _triton.rows_2d(qkv), _triton.rows_2d(out), _triton.rows_2d(dout.to(qkv.dtype))
        cos, sin = _tables(cos, sin)
        split = _split(D)
        delta = lse.new_empty((B * H, N))
        # per (batch x head), L2-resident while its program runs: q and k rotated, and dQ's fp32 sums
        qrot, krot = (x.new_empty((B * H, N, split["DA"] + split["DB"])) for _ in range(2))
        scratch = lse.new_empty((B * H, N, split["DA"] + split["DB"]))
        args = (x, x.stride(0), cos, sin, bias if has_bias else cos, o, o.stride(0), do, do.stride(0), lse, delta,
                qrot, krot, scratch, dqkv, pbias if has_bias else cos, N, H, B * H, nblk, math.log2(math.e) / math.sqrt(D),
                1.0 / math.sqrt(D))
        tiles = [(config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"])] if config is not None else (
            [_INTERPRETER_TILE] if _triton.interpreting() else BWD_TILES)
        const = dict(D=D, **split, PREC=_precision(qkv.dtype), HAS_BIAS=has_bias, EVEN=_even(N, tiles))
        if config is not None:
            _rope_attn_bwd_kernel[(B * H,)](*args, **const, **config.kwargs, num_warps=config.num_warps,
                                            num_stages=config.num_stages)
        elif _triton.interpreting():
            bm, bn = _INTERPRETER_TILE
            _rope_attn_bwd_kernel[(B * H,)](*args, **const, BLOCK_M=bm, BLOCK_N=bn, DQ_ATOMIC=_INTERPRETER_DQ_ATOMIC)
        else:
            TUNED.run("bwd", (B * H,), args, const)
    if not has_bias:
        return dqkv, dqkv.new_empty(0)
    # (B, H, blocks, 3, D) -> (3, H, D): the qkv Linear's output order (q, k, v blocks of H heads of D channels)
    return dqkv, pbias.sum(dim=(0, 2)).transpose(0, 1).reshape(-1).to(bias.dtype)


@rope_attention_bwd_op.register_fake
def _(dout, qkv, out, lse, cos, sin, num_heads, bias=None):
    return qkv.new_empty(qkv.shape), (bias.new_empty(bias.shape) if bias is not None else qkv.new_empty(0))


def _setup(ctx, inputs, output):
    qkv, cos, sin, num_heads, bias = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse, cos, sin, bias)
    ctx.num_heads = num_heads
    ctx.set_materialize_grads(False)  # lse never gets a gradient: no zeros tensor filled for it each backward


def _backward(ctx, dout, _dlse):
    qkv, out, lse, cos, sin, bias = ctx.saved_tensors
    if dout is None:
        return None, None, None, None, None
    dqkv, dbias = rope_attention_bwd_op(dout, qkv, out, lse, cos, sin, ctx.num_heads, bias)
    return dqkv, None, None, None, dbias if bias is not None else None


rope_attention_op.register_autograd(_backward, setup_context=_setup)


def rope_attention_triton(qkv: Tensor, cos: Tensor, sin: Tensor, num_heads: int,
                          bias: Optional[Tensor] = None) -> Tensor:
    """softmax(rope(q) rope(k)^T / sqrt(D)) v per head, from the qkv Linear's output (B, N, 3*H*D) (plus its bias,
    where the model ran the Linear without it), as (B, N, H*D): the proj Linear's input. cos/sin: (N, D) RoPE tables
    of the pair layout."""
    return rope_attention_op(qkv, cos, sin, num_heads, bias)[0]
