"""The SwiGLU MLP's first half in one kernel: `silu(x @ Wa^T + ba) * (x @ Wb^T + bb)`, where W = w12.weight
packs [Wa; Wb] (2H, K) as in the reference's `w12` Linear.

Unfused, the w12 GEMM writes the (rows, 2H) product and the SwiGLU pass reads it back and writes (rows, H):
at XL/1 (K 1152, H 3072) that is 3x the bytes of the result, per block and step. Here each program computes
the matching (BLOCK_M, BLOCK_N) tiles of both halves in two fp32 accumulators and writes only the SwiGLU,
computed in fp32 and rounded once. It is meant for inference (the Sampler's `fused_mlp`, which swaps the model's
MLPs for modeling.fused_mlp.FusedSwiGLUFFN); its backward recomputes the product with cuBLAS, so training gains
nothing from it. Block sizes are autotuned per (rows, H, K) on the GPU. Reference: `kernels.reference.linear_swiglu`
(F.linear then swiglu). Declared at the bottom as the op "linear_swiglu".
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _triton, reference
from ._triton import tl, triton
from .registry import BenchCase, BenchShape, Op, register


@triton.jit
def _linear_swiglu_gemm_kernel(X, W, BIAS, OUT, M, H, K, sxm, swn, som, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
            FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
            GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(H, BLOCK_N)
    # grouped order: GROUP_M row tiles share each column tile of W while it is in L2
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    size_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m, mask_n = offs_m < M, offs_n < H
    x_ptrs = X + offs_m[:, None].to(tl.int64) * sxm + offs_k[None, :]
    wa_ptrs = W + offs_n[None, :].to(tl.int64) * swn + offs_k[:, None]  # (BLOCK_K, BLOCK_N) of Wa^T
    wb_ptrs = wa_ptrs + H * swn                                          # the same columns of Wb^T
    acc_a = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            x = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
            wa = tl.load(wa_ptrs, mask=mask_n[None, :], other=0.0)
            wb = tl.load(wb_ptrs, mask=mask_n[None, :], other=0.0)
        else:
            kk = offs_k < K - k * BLOCK_K
            x = tl.load(x_ptrs, mask=mask_m[:, None] & kk[None, :], other=0.0)
            wa = tl.load(wa_ptrs, mask=kk[:, None] & mask_n[None, :], other=0.0)
            wb = tl.load(wb_ptrs, mask=kk[:, None] & mask_n[None, :], other=0.0)
        if FP32_DOT:  # fp32 inputs (or the CPU interpreter, whose dot cannot take bf16): full-precision products
            x, wa, wb = x.to(tl.float32), wa.to(tl.float32), wb.to(tl.float32)
            acc_a = tl.dot(x, wa, acc_a, input_precision="ieee")
            acc_b = tl.dot(x, wb, acc_b, input_precision="ieee")
        else:
            acc_a = tl.dot(x, wa, acc_a)
            acc_b = tl.dot(x, wb, acc_b)
        x_ptrs += BLOCK_K
        wa_ptrs += BLOCK_K
        wb_ptrs += BLOCK_K
    if HAS_BIAS:
        acc_a += tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        acc_b += tl.load(BIAS + H + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out = acc_a * tl.sigmoid(acc_a) * acc_b
    o_ptrs = OUT + offs_m[:, None].to(tl.int64) * som + offs_n[None, :]
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _configs():
    # Hopper, bf16, two accumulators per program: tiles of 64-128 rows by 64-128 columns of each half
    cfg = [(128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (128, 64, 64, 8, 4), (64, 128, 64, 4, 4),
           (128, 128, 32, 8, 4), (256, 64, 64, 8, 3)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for m, n, k, w, s in cfg]


_autotuned = None
INTERPRETER_BLOCKS = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4)  # CPU tests: small tiles, one config


def _check(x, w12, b12):
    if w12.dim() != 2 or w12.shape[0] % 2 or x.shape[-1] != w12.shape[1]:
        raise ValueError(f"linear_swiglu: x (..., K) and w12 (2H, K) needed, got {tuple(x.shape)} and "
                         f"{tuple(w12.shape)}")
    if b12 is not None and b12.shape != (w12.shape[0],):
        raise ValueError(f"linear_swiglu: bias of shape ({w12.shape[0]},) needed, got {tuple(b12.shape)}")


@torch.library.custom_op("vavae::linear_swiglu", mutates_args=())
def linear_swiglu_op(x: Tensor, w12: Tensor, b12: Optional[Tensor]) -> Tensor:
    global _autotuned
    _check(x, w12, b12)
    H, K = w12.shape[0] // 2, w12.shape[1]
    x2, w = _triton.rows_2d(x), w12.contiguous()
    M = x2.shape[0]
    out = torch.empty((M, H), dtype=x.dtype, device=x.device)
    if out.numel():
        common = dict(HAS_BIAS=b12 is not None, FP32_DOT=x.dtype == torch.float32 or _triton.interpreting())
        bias = b12 if b12 is not None else w  # not read without HAS_BIAS
        args = (x2, w, bias, out, M, H, K, x2.stride(0), w.stride(0), out.stride(0))
        if _triton.interpreting():
            b = INTERPRETER_BLOCKS
            _linear_swiglu_gemm_kernel[(triton.cdiv(M, b["BLOCK_M"]) * triton.cdiv(H, b["BLOCK_N"]),)](
                *args, EVEN_K=K % b["BLOCK_K"] == 0, **common, **b)
        else:
            if _autotuned is None:
                _autotuned = triton.autotune(configs=_configs(), key=["M", "H", "K"])(_linear_swiglu_gemm_kernel)
            grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(H, meta["BLOCK_N"]),)  # noqa: E731
            _autotuned[grid](*args, EVEN_K=K % 64 == 0, **common)
    return out.reshape(*x.shape[:-1], H)


@linear_swiglu_op.register_fake
def _(x, w12, b12):
    _check(x, w12, b12)
    return x.new_empty((*x.shape[:-1], w12.shape[0] // 2))


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dout):
    # recompute the packed product with cuBLAS (an inference op keeps no product for the backward)
    x, w12, b12 = ctx.saved_tensors
    with torch.no_grad():
        x12 = F.linear(x, w12, b12)
    a, b = x12.chunk(2, dim=-1)
    s = torch.sigmoid(a.float())
    d = dout.float()
    da = d * b.float() * s * (1 + a.float() * (1 - s))
    db = d * a.float() * s
    dx12 = torch.cat([da, db], dim=-1).to(x12.dtype)
    dx = dx12 @ w12
    dw = dx12.reshape(-1, dx12.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
    db12 = dx12.reshape(-1, dx12.shape[-1]).sum(0) if b12 is not None else None
    return dx, dw, db12


linear_swiglu_op.register_autograd(_backward, setup_context=_setup)


def linear_swiglu_triton(x: Tensor, w12: Tensor, b12: Optional[Tensor] = None) -> Tensor:
    return linear_swiglu_op(x, w12, b12)


def _bench(s: BenchShape, device: str, dtype: torch.dtype) -> BenchCase:
    # the sampler's MLP front half at XL/1 rows (a guided step of batch 128, or 256 unguided). The backward is
    # timed too: it shows what training would pay (the cuBLAS recompute), not a kernel of ours
    r = lambda *shape: torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)  # noqa: E731
    x, b = r(s.rows, s.C), r(2 * s.F)
    w = (torch.randn(2 * s.F, s.C, device=device) / s.C ** 0.5).to(dtype).requires_grad_()  # products of unit scale
    e = dtype.itemsize
    fwd = (s.rows * s.C + 2 * s.F * s.C + 2 * s.F + s.rows * s.F) * e  # read x, W, b; write the SwiGLU
    bwd = (s.rows * s.F + 2 * s.rows * s.C + 4 * s.F * s.C + 2 * s.F) * e  # read dout, x, W; write dx, dW, db
    flops = 2 * s.rows * s.C * 2 * s.F
    # backward: the recomputed product, then dx and dW
    return BenchCase([x, w, b], lambda f, x, w, b: f(x, w, b), fwd, bwd, fwd_flops=flops, bwd_flops=3 * flops,
                     shape={"rows": s.rows, "K": s.C, "H": s.F})


register(Op(name="linear_swiglu", reference=reference.linear_swiglu, impls={"triton": linear_swiglu_triton},
            bench=_bench, doc="silu(x Wa^T + ba) * (x Wb^T + bb): the w12 GEMM with SwiGLU in its epilogue, "
                              "for inference (bwd recomputes with cuBLAS)"))
