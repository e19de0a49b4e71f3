"""2D RoPE on q and k in the reference (EVA) layout, fused into one launch, forward and backward.

q, k: (B, H, N, D), any batch/head/token strides (e.g. the views that `qkv.reshape().permute()` gives),
unit stride over D. cos, sin: (N, D) tables whose channel pairs (2i, 2i+1) rotate together:
    out[2i]   = x[2i] cos[2i]     - x[2i+1] sin[2i]
    out[2i+1] = x[2i+1] cos[2i+1] + x[2i] sin[2i+1]
The backward applies the transposed rotation (TRANSPOSE=True). Outputs are contiguous, in q's dtype
(the value attention consumes; the reference promotes to the tables' dtype and SDPA casts it back).
Reference: `kernels.reference.rope_qk`. head_dim 72 (XL) and 64 both run; D must be even.
"""
import torch
from torch import Tensor

from . import _triton
from ._triton import tl, triton

BLOCK_N = 16


@triton.jit
def _rope_kernel(Q, sqb, sqh, sqn, K, skb, skh, skn, COS, SIN, QO, KO, H, N, D,
                 TRANSPOSE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    p = tl.arange(0, BLOCK_P)
    mask = (n[:, None] < N) & (p[None, :] < D // 2)
    ev = n[:, None] * D + 2 * p[None, :]  # even channel of each pair in the (N, D) tables / outputs
    ce = tl.load(COS + ev, mask=mask, other=0.0).to(tl.float32)
    co = tl.load(COS + ev + 1, mask=mask, other=0.0).to(tl.float32)
    se = tl.load(SIN + ev, mask=mask, other=0.0).to(tl.float32)
    so = tl.load(SIN + ev + 1, mask=mask, other=0.0).to(tl.float32)
    if TRANSPOSE:  # [[ce, -se], [so, co]]^T = [[ce, so], [-se, co]]
        se, so = -so, -se
    out_base = bh * N * D
    for which in tl.static_range(2):
        if which == 0:
            X, sb, sh, sn, O = Q, sqb, sqh, sqn, QO
        else:
            X, sb, sh, sn, O = K, skb, skh, skn, KO
        src = b * sb + h * sh + n[:, None] * sn + 2 * p[None, :]
        xe = tl.load(X + src, mask=mask, other=0.0).to(tl.float32)
        xo = tl.load(X + src + 1, mask=mask, other=0.0).to(tl.float32)
        tl.store(O + out_base + ev, (xe * ce - xo * se).to(O.dtype.element_ty), mask=mask)
        tl.store(O + out_base + ev + 1, (xo * co + xe * so).to(O.dtype.element_ty), mask=mask)


def _check(q, k, cos, sin):
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"rope_qk needs q, k of one shape (B, H, N, D); got {tuple(q.shape)}, {tuple(k.shape)}")
    N, D = q.shape[-2:]
    if D % 2 or cos.shape != (N, D) or sin.shape != (N, D):
        raise ValueError(f"rope_qk needs even head_dim and cos/sin of shape (N, D) = {(N, D)}; "
                         f"got {tuple(cos.shape)}, {tuple(sin.shape)}")


def _unit_d(t):
    return t if t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op("vavae::rope_qk", mutates_args=())
def rope_qk_op(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, transpose: bool) -> tuple[Tensor, Tensor]:
    _check(q, k, cos, sin)
    qo = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    ko = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    B, H, N, D = q.shape
    if qo.numel():
        q, k, cos, sin = _unit_d(q), _unit_d(k), cos.contiguous(), sin.contiguous()
        _rope_kernel[(B * H, triton.cdiv(N, BLOCK_N))](
            q, q.stride(0), q.stride(1), q.stride(2), k, k.stride(0), k.stride(1), k.stride(2), cos, sin, qo, ko,
            H, N, D, TRANSPOSE=transpose, BLOCK_N=BLOCK_N, BLOCK_P=_triton.block_size(D // 2), num_warps=4)
    return qo, ko


@rope_qk_op.register_fake
def _(q, k, cos, sin, transpose):
    _check(q, k, cos, sin)
    return torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(
        k, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    q, k, cos, sin, transpose = inputs
    ctx.save_for_backward(cos, sin)
    ctx.transpose = transpose


def _backward(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    dq = dq if dq is not None else torch.zeros_like(dk)
    dk = dk if dk is not None else torch.zeros_like(dq)
    gq, gk = rope_qk_op(dq, dk, cos, sin, not ctx.transpose)
    return gq, gk, None, None, None


rope_qk_op.register_autograd(_backward, setup_context=_setup)


def rope_qk(q, k, cos, sin):
    return rope_qk_op(q, k, cos, sin, False)
