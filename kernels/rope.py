"""2D RoPE on q and k in the reference (EVA) layout, fused into one launch, forward and backward.

q, k: (B, H, N, D), any batch/head/token strides (e.g. the views that `qkv.reshape().permute()` gives),
unit stride over D. cos, sin: (N, D) tables whose channel pairs (2i, 2i+1) rotate together:
    out[2i]   = x[2i] cos[2i]     - x[2i+1] sin[2i]
    out[2i+1] = x[2i+1] cos[2i+1] + x[2i] sin[2i+1]
The backward applies the transposed rotation (TRANSPOSE=True). Outputs are contiguous, in q's dtype
(the value attention consumes; the reference promotes to the tables' dtype and SDPA casts it back).
Reference: `kernels.reference.rope_qk`. head_dim 72 (XL) and 64 both run; D must be even.
"""
import math

import torch
from torch import Tensor

from . import _triton, reference
from ._triton import tl, triton
from .registry import BenchCase, BenchShape, Op, register

BLOCK_N = 32  # tokens per program


@triton.jit
def _rope_kernel(Q, sqb, sqh, sqn, K, skb, skh, skn, COS, SIN, QO, KO, H, N, D: tl.constexpr,
                 TRANSPOSE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # D is a compile-time constant so the compiler can prove 16-byte alignment of rows (72 * 2 B = 144 B)
    # and vectorise the loads and stores.
    # Each token's D channels are contiguous in q/k (and in the tables): load whole rows (coalesced,
    # vectorisable) and fetch each channel's pair partner d^1 from the same cache lines.
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    mask = (n[:, None] < N) & (d[None, :] < D)
    tab = n[:, None] * D + d[None, :]
    c = tl.load(COS + tab, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(SIN + tab, mask=mask, other=0.0).to(tl.float32)
    even = (d % 2) == 0
    # forward: out[d] = x[d] cos[d] + sign[d] x[d^1] sin[d], sign = -1 on even d (rotate_half)
    # transposed (backward): out[d] = x[d] cos[d] - sign[d] x[d^1] sin[d^1]
    if TRANSPOSE:
        s = tl.load(SIN + n[:, None] * D + (d[None, :] ^ 1), mask=mask, other=0.0).to(tl.float32)
        s = tl.where(even[None, :], s, -s)
    else:
        s = tl.where(even[None, :], -s, s)
    out_off = bh * N * D + tab
    for which in tl.static_range(2):
        if which == 0:
            X, sb, sh, sn, O = Q, sqb, sqh, sqn, QO
        else:
            X, sb, sh, sn, O = K, skb, skh, skn, KO
        row = X + b * sb + h * sh + n[:, None] * sn
        x = tl.load(row + d[None, :], mask=mask, other=0.0).to(tl.float32)
        xp = tl.load(row + (d[None, :] ^ 1), mask=mask, other=0.0).to(tl.float32)
        tl.store(O + out_off, (x * c + xp * s).to(O.dtype.element_ty), mask=mask)


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
            H, N, D, TRANSPOSE=transpose, BLOCK_N=BLOCK_N, BLOCK_D=_triton.block_size(D), num_warps=4)
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


def rope_qk_triton(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    return rope_qk_op(q, k, cos, sin, False)


def _bench(s: BenchShape, device: str, dtype: torch.dtype) -> BenchCase:
    # q, k: strided views of one (B, N, 3, H, D) qkv, as the model's Attention makes them
    qkv = torch.randn(s.B, s.N, 3, s.H, s.D, device=device, dtype=dtype, requires_grad=True)
    # tables of the reference's layout (pairs (2i, 2i+1) share an angle); their values do not change the timing
    angle = torch.rand(s.N, s.D // 2, device=device).repeat_interleave(2, dim=-1) * 2 * math.pi
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    QK = 2 * s.B * s.H * s.N * s.D * dtype.itemsize
    return BenchCase([qkv], lambda f, t: f(*t.permute(2, 0, 3, 1, 4).unbind(0)[:2], cos, sin), 2 * QK, 2 * QK,
                     shape={"B": s.B, "H": s.H, "N": s.N, "D": s.D})


# Under torch.compile, `auto` runs what kernels/compiled_choices.json says (measured: bench/compiled_choices.py)
register(Op(name="rope_qk", reference=reference.rope_qk, impls={"triton": rope_qk_triton}, bench=_bench,
            doc="RoPE on q and k in one launch, reading the strided qkv views (reference pair layout)"))
