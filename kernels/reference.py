"""Plain PyTorch references for the model's ops in `kernels.ops`.

These are the semantics of the authors' code, written the way the authors wrote them, so that the
fp32 parity fixtures reproduce bit-for-bit-close. Fused backends are tested against these (and
against float64 versions of these) in tests/. Each op module's declaration (kernels.registry.Op) points
at its reference here: one file that reads as the model's math, top to bottom, and is what the
`reference` backend runs and inductor compiles.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def rms_norm(x: Tensor, weight: Optional[Tensor], eps: float = 1e-6) -> Tensor:
    # Reference RMSNorm: statistics in (at least) fp32, cast back, then the learnable weight.
    xf = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32 stats; float64 stays float64
    out = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)
    return out * weight if weight is not None else out


def layer_norm(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-6) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def norm(x: Tensor, weight: Optional[Tensor], eps: float, kind: str) -> Tensor:
    if kind == "rms":
        return rms_norm(x, weight, eps)
    if kind == "layer":
        return layer_norm(x, weight, None, eps)
    raise ValueError(f"unknown norm kind {kind!r} (expected 'rms' or 'layer')")


def modulate(x: Tensor, shift: Optional[Tensor], scale: Tensor) -> Tensor:
    # x: (B, N, C); shift/scale: (B, C) broadcast over tokens; shift may be None (wo_shift).
    out = x * (1 + scale.unsqueeze(1))
    return out + shift.unsqueeze(1) if shift is not None else out


def norm_modulate(x: Tensor, weight: Optional[Tensor], shift: Optional[Tensor], scale: Tensor, eps: float = 1e-6,
                  kind: str = "rms", out_dtype: Optional[torch.dtype] = None) -> Tensor:
    # out_dtype: the dtype the output's consumer computes in (the next Linear's under autocast: the cast its
    # autocast would make, made here, where a fused kernel writes that dtype directly); None: type promotion's
    out = modulate(norm(x, weight, eps, kind), shift, scale)
    return out.to(out_dtype) if out_dtype is not None else out


def gated_residual(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    return x + gate.unsqueeze(1) * y


def gated_residual_norm_modulate(x: Tensor, gate: Tensor, y: Tensor, weight: Optional[Tensor],
                                 shift: Optional[Tensor], scale: Tensor, eps: float = 1e-6,
                                 kind: str = "rms", out_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
    """h = x + gate*y; out = modulate(norm(h)) (in out_dtype if given). Returns (h, out): the op that joins two
    block halves."""
    h = gated_residual(x, gate, y)
    return h, norm_modulate(h, weight, shift, scale, eps, kind, out_dtype)


def swiglu(x12: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    # Packed w12 output: first half is the gate input (silu), second half the value. bias: w12's, when the model ran
    # the Linear without it (SwiGLUFFN), added in x12's dtype as autocast's addmm adds its bf16 copy (the kernel adds
    # it in fp32: within the dtype's rounding). Not an fp32 sum cast down: train.recompute's policy keeps the outputs
    # of narrowing casts, which would keep the SwiGLU output it is there to recompute.
    if bias is not None:
        x12 = x12 + bias.to(x12.dtype)
    a, b = x12.chunk(2, dim=-1)
    return F.silu(a) * b


def linear_swiglu(x: Tensor, w12: Tensor, b12: Optional[Tensor] = None) -> Tensor:
    # The SwiGLU MLP's first half as the model runs it unfused: the w12 Linear, then swiglu.
    return swiglu(F.linear(x, w12, b12))


def rotate_half(x: Tensor) -> Tensor:
    # Adjacent pairs (2i, 2i+1) -> (-x[2i+1], x[2i]) as in the reference (EVA) RoPE.
    x = x.unflatten(-1, (-1, 2))
    x1, x2 = x.unbind(-1)
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x: (B, H, N, D); cos/sin: (N, D).
    return x * cos + rotate_half(x) * sin


class _RoPE(torch.autograd.Function):
    """`rope` with its backward written out: rotate_half is antisymmetric (R^T = -R), so
    dx = g*cos - rotate_half(g*sin), the same products and sum autograd forms (bitwise equal in fp32), as one
    pointwise expression. Autograd's own backward of unflatten/unbind/stack is several strided passes that
    inductor fused poorly (RoPE fwd+bwd 551 GB/s compiled on an H200, against 3766 forward only)."""

    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        ctx.save_for_backward(cos, sin)
        ctx.x_dtype = x.dtype
        return rope(x, cos, sin).to(x.dtype)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        return (g * cos - rotate_half(g * sin)).to(ctx.x_dtype), None, None


def rope_qk(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    # Results in q's dtype, as the fused kernels give them. The authors' formula promotes bf16 q/k (under autocast)
    # to the fp32 tables' dtype and SDPA's autocast then rounds them to bf16: the same values reach attention
    # either way, but fp32 q/k are twice the bytes, and inside a torch.compile trace they hide the dtype attention
    # runs in (its measured choice is keyed by it).
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad) and not (cos.requires_grad or sin.requires_grad):
        return _RoPE.apply(q, cos, sin), _RoPE.apply(k, cos, sin)
    return rope(q, cos, sin).to(q.dtype), rope(k, cos, sin).to(k.dtype)


def qkv_rope(qkv: Tensor, cos: Tensor, sin: Tensor, num_heads: int, q_weight: Optional[Tensor] = None,
             k_weight: Optional[Tensor] = None, eps: float = 1e-6,
             bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    # The attention's input side as the authors write it: the qkv Linear's output (B, N, 3*H*D) split into heads by
    # reshape/permute (strided views), the optional qk-norm (RMSNorm over each head's D channels), RoPE on q and k.
    # Returns q, k, v of shape (B, H, N, D). bias: the qkv Linear's, when the model ran it without (Attention), added
    # in qkv's dtype as autocast's addmm adds its bf16 copy (the kernels add it in fp32: within the rounding).
    if bias is not None:
        qkv = qkv + bias.to(qkv.dtype)
    B, N, C3 = qkv.shape
    q, k, v = qkv.reshape(B, N, 3, num_heads, C3 // (3 * num_heads)).permute(2, 0, 3, 1, 4).unbind(0)
    if q_weight is not None:
        q, k = rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps)
    q, k = rope_qk(q, k, cos, sin)
    return q, k, v


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    # (B, H, N, D) layout, no mask, default scale 1/sqrt(D).
    return F.scaled_dot_product_attention(q, k, v)


def rope_attention(qkv: Tensor, cos: Tensor, sin: Tensor, num_heads: int, q_weight: Optional[Tensor] = None,
                   k_weight: Optional[Tensor] = None, eps: float = 1e-6, bias: Optional[Tensor] = None) -> Tensor:
    # The attention block's core as the authors write it: qkv_rope, SDPA, heads merged back for the proj Linear:
    # (B, N, 3*H*D) -> (B, N, H*D). bias: the qkv Linear's (see qkv_rope).
    B, N, _ = qkv.shape
    q, k, v = qkv_rope(qkv, cos, sin, num_heads, q_weight, k_weight, eps, bias)
    return attention(q, k, v).transpose(1, 2).reshape(B, N, -1)


def group_norm_silu(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], num_groups: int, eps: float,
                    silu: bool = True) -> Tensor:
    # The VA-VAE's `F.silu(norm(h))` (norm: GroupNorm(32, eps 1e-6, affine)); silu=False: AttnBlock's bare norm.
    # Under CUDA bf16 autocast group_norm runs in fp32 and this returns fp32, as the authors' model does; the fused
    # kernels return x's dtype: the next conv rounds its input to bf16 either way, so the same values reach it.
    out = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(out) if silu else out


def upsample_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    # The VA-VAE decoder's Upsample: nearest 2x, then its 3x3 conv (padding 1).
    return F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, padding=1)
