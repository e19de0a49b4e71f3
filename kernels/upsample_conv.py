"""upsample_conv: the VA-VAE decoder's Upsample (nearest 2x, then a 3x3 conv with padding 1) as one cuDNN conv with
2x2 kernels on the input and one pass that interleaves its four output phases, forward and backward.

Why: after a nearest 2x upsampling, the 3x3 window of an output pixel reads only 2x2 distinct input pixels. Its taps
therefore collapse, per output phase (a, b) = (row, column) parity, into a 2x2 kernel:

    out[2i+a, 2j+b] = bias + sum_{k, l in {0, 1}} Weff[a, b][k, l] . x[i+a-1+k, j+b-1+l]
    rows of Weff[a]:  a = 0: (W_0, W_1 + W_2)      a = 1: (W_0 + W_1, W_2)      (columns the same with b)

The reference computes 9 taps at each of the 4 output pixels of an input pixel (36 C_in x C_out products); this
computes 16, 2.25x fewer FLOPs in the forward, the input gradient and the weight gradient. It also never writes the
4x upsampled input, nor keeps it for the backward.

One conv computes all four phases. Weff is stacked as (4 C_out, C_in, 2, 2), phase-major, and with padding 1 the conv
gives y (B, 4 C_out, H+1, W+1): phase (a, b)'s pixel (i, j) is its channel block at position (i+a, j+b). The
interleave kernel gathers y into (B, C_out, 2H, 2W) in x's memory format (NCHW or channels_last). A program owns one
output row's (positions x channels) tile, long along the unit-stride axis: coalesced stores, and indexing by adds and
parity bits (no division by a runtime size per element). Its backward is the reverse gather: it writes every element
of dy once, zero where no output pixel reads it, so no separate zero fill.

The same function up to rounding: Weff adds one to four fp32 weights before the products, and the conv's algorithm
sums in its own order, as any conv does. Reference: `kernels.reference.upsample_conv` (the authors'
`F.interpolate` + conv).
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import reference
from ._triton import tl, triton
from .registry import BenchCase, BenchShape, Op, register

TILE = 2048  # elements per program (16 per thread at 4 warps); a pure copy, so no autotuning


def _channels_last(t: Tensor) -> bool:
    return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _format(cl: bool) -> torch.memory_format:
    return torch.channels_last if cl else torch.contiguous_format


def _tile(cl: bool, C: int, width: int) -> tuple[int, int]:
    """(BLOCK_W, BLOCK_C) of a program's (row segment x channel block) tile: long along the unit-stride axis of the
    tensor it writes (channels in channels_last, the row in NCHW)."""
    if cl:
        bc = min(triton.next_power_of_2(C), 128)
        return max(1, min(TILE // bc, triton.next_power_of_2(width))), bc
    bw = min(triton.next_power_of_2(width), 512)
    return bw, max(1, min(TILE // bw, triton.next_power_of_2(C)))


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _orient(w, c, CL: tl.constexpr):
    # a tile (w, c) with the unit-stride axis last: channels in channels_last, the row position in NCHW
    if CL:
        return w[:, None], c[None, :]
    else:
        return w[None, :], c[:, None]


@triton.jit
def _interleave_fwd_kernel(Y, OUT, C, H, W, sy_b, sy_c, sy_h, sy_w, so_b, so_c, so_h, so_w, CL: tl.constexpr,
                           BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    # out[b, c, 2i+a, 2j+e] = y[b, (2a+e) C + c, i+a, j+e]. A program: one output row p = 2i+a of sample b (the
    # row's parity a and its y row are per program), BLOCK_W positions q = 2j+e x BLOCK_C channels: per element
    # only adds, multiplies and the parity bit (no division by a runtime size)
    row = tl.program_id(0)
    b = (row // (2 * H)).to(tl.int64)  # the batch term alone needs 64 bits (a sample's offsets fit in 32)
    p = row % (2 * H)
    a = p % 2
    q, c = _orient(tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W),
                   tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C), CL)
    e = q % 2
    mask = (q < 2 * W) & (c < C)
    src = b * sy_b + (p // 2 + a) * sy_h + (q // 2 + e) * sy_w + ((2 * a + e) * C + c) * sy_c
    tl.store(OUT + b * so_b + p * so_h + q * so_w + c * so_c, tl.load(Y + src, mask=mask), mask=mask)


@triton.jit
def _interleave_bwd_kernel(DOUT, DY, C, H, W, n_cb, so_b, so_c, so_h, so_w, sd_b, sd_c, sd_h, sd_w,
                           CL: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    # dy[b, (2a+e) C + c, m, r] = dout[b, c, 2(m-a)+a, 2(r-e)+e] where 0 <= m-a < H and 0 <= r-e < W, else 0. A
    # program: one row m of sample b in one phase's block of BLOCK_C channels, BLOCK_W positions r: every element of
    # dy is written once, zeros included
    row = tl.program_id(0)
    b = (row // (H + 1)).to(tl.int64)
    m = row % (H + 1)
    ph = tl.program_id(2) // n_cb
    a = ph // 2
    e = ph % 2
    i = m - a
    r, c = _orient(tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W),
                   (tl.program_id(2) % n_cb) * BLOCK_C + tl.arange(0, BLOCK_C), CL)
    j = r - e
    inside = (r < W + 1) & (c < C)
    # the row test broadcast per element (i + 0 * j): the interpreter refuses a scalar mask operand; folded on a GPU
    read = inside & (j >= 0) & (j < W) & ((i + 0 * j) >= 0) & ((i + 0 * j) < H)
    src = b * so_b + c * so_c + (2 * i + a) * so_h + (2 * j + e) * so_w
    dst = b * sd_b + (ph * C + c) * sd_c + m * sd_h + r * sd_w
    tl.store(DY + dst, tl.load(DOUT + src, mask=read, other=0.0), mask=inside)


# ----------------------------------------------------------------------------- custom ops (fake + autograd)

def _interleaved_shape(y: Tensor, channels: int) -> tuple[int, int, int, int]:
    B, C4, H1, W1 = y.shape
    if C4 != 4 * channels or H1 < 1 or W1 < 1:
        raise ValueError(f"phase_interleave: y {tuple(y.shape)} is not (B, 4 x {channels}, H+1, W+1)")
    return B, channels, H1 - 1, W1 - 1


@torch.library.custom_op("vavae::phase_interleave", mutates_args=())
def phase_interleave_op(y: Tensor, channels: int) -> Tensor:
    """y (B, 4C, H+1, W+1), the phase conv's output -> (B, C, 2H, 2W) in y's memory format."""
    B, C, H, W = _interleaved_shape(y, channels)
    cl = _channels_last(y)
    out = torch.empty((B, C, 2 * H, 2 * W), dtype=y.dtype, device=y.device, memory_format=_format(cl))
    if out.numel():
        bw, bc = _tile(cl, C, 2 * W)
        grid = (B * 2 * H, triton.cdiv(2 * W, bw), triton.cdiv(C, bc))
        _interleave_fwd_kernel[grid](y, out, C, H, W, *y.stride(), *out.stride(), CL=cl, BLOCK_W=bw, BLOCK_C=bc,
                                     num_warps=4)
    return out


@phase_interleave_op.register_fake
def _(y, channels):
    B, C, H, W = _interleaved_shape(y, channels)
    return y.new_empty((B, C, 2 * H, 2 * W)).contiguous(memory_format=_format(_channels_last(y)))


@torch.library.custom_op("vavae::phase_interleave_bwd", mutates_args=())
def phase_interleave_bwd_op(dout: Tensor, channels_last: bool) -> Tensor:
    """dout (B, C, 2H, 2W) -> dy (B, 4C, H+1, W+1), channels_last or NCHW as the forward's y was."""
    B, C, H2, W2 = dout.shape
    H, W = H2 // 2, W2 // 2
    dy = torch.empty((B, 4 * C, H + 1, W + 1), dtype=dout.dtype, device=dout.device,
                     memory_format=_format(channels_last))
    if dy.numel():
        bw, bc = _tile(channels_last, C, W + 1)
        n_cb = triton.cdiv(C, bc)
        grid = (B * (H + 1), triton.cdiv(W + 1, bw), 4 * n_cb)
        _interleave_bwd_kernel[grid](dout, dy, C, H, W, n_cb, *dout.stride(), *dy.stride(), CL=channels_last,
                                     BLOCK_W=bw, BLOCK_C=bc, num_warps=4)
    return dy


@phase_interleave_bwd_op.register_fake
def _(dout, channels_last):
    B, C, H2, W2 = dout.shape
    return dout.new_empty((B, 4 * C, H2 // 2 + 1, W2 // 2 + 1)).contiguous(memory_format=_format(channels_last))


def _setup(ctx, inputs, output):
    ctx.channels_last = _channels_last(inputs[0])


def _backward(ctx, dout):
    return phase_interleave_bwd_op(dout, ctx.channels_last), None


phase_interleave_op.register_autograd(_backward, setup_context=_setup)


# ----------------------------------------------------------------------------- the op

def _check(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    if x.ndim != 4 or weight.ndim != 4 or tuple(weight.shape[1:]) != (x.shape[1], 3, 3):
        raise ValueError(f"upsample_conv needs x (B, C_in, H, W) and a 3x3 weight (C_out, C_in, 3, 3); got x "
                         f"{tuple(x.shape)}, weight {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"upsample_conv: bias {tuple(bias.shape)} is not ({weight.shape[0]},)")


def phase_weights(weight: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    """(4 C_out, C_in, 2, 2) and (4 C_out,): the 3x3 taps summed per output phase, phase (a, b) = block 2a + b."""
    C_out, C_in = weight.shape[:2]
    w0, w1, w2 = weight.to(torch.promote_types(weight.dtype, torch.float32)).unbind(2)  # rows; the sums in fp32+
    rows = torch.stack([torch.stack([w0, w1 + w2], 2), torch.stack([w0 + w1, w2], 2)])  # (a, C_out, C_in, k, 3)
    c0, c1, c2 = rows.unbind(-1)
    taps = torch.stack([torch.stack([c0, c1 + c2], -1), torch.stack([c0 + c1, c2], -1)], 1)  # (a, b, ..., k, l)
    return taps.reshape(4 * C_out, C_in, 2, 2).to(weight.dtype), None if bias is None else bias.repeat(4)


def upsample_conv_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    _check(x, weight, bias)
    w, b = phase_weights(weight, bias)
    if _channels_last(x):
        w = w.contiguous(memory_format=torch.channels_last)  # cuDNN's NHWC filter beside NHWC activations
    return phase_interleave_op(F.conv2d(x, w, b, padding=1), weight.shape[0])


def _bench(s: BenchShape, device: str, dtype: torch.dtype) -> BenchCase:
    # Not DiT-shaped: the VA-VAE decoder's largest Upsample (128 channels, 128x128 -> 256x256), batch 8,
    # channels_last; tiny and ragged for smoke
    N, C, H, W = (2, 24, 5, 7) if s.smoke else (8, 128, 128, 128)
    x = torch.randn(N, C, H, W, device=device, dtype=dtype).to(memory_format=torch.channels_last).requires_grad_()
    w = (torch.randn(C, C, 3, 3, device=device, dtype=dtype) / (3 * C ** 0.5)).requires_grad_()
    b = (0.1 * torch.randn(C, device=device, dtype=dtype)).requires_grad_()
    X = x.numel() * dtype.itemsize
    flops = 2 * N * C * C * 4 * H * W * 4  # 4 taps per output pixel (the reference: 9)
    return BenchCase([x, w, b], lambda f, x, w, b: f(x, w, b), fwd_bytes=5 * X, bwd_bytes=6 * X, fwd_flops=flops,
                     bwd_flops=2 * flops, shape={"N": N, "C": C, "H": H, "W": W, "layout": "channels_last"})


# Under torch.compile, `auto` runs ours until a GPU run's ops table decides otherwise (compiled_choices entry)
register(Op(name="upsample_conv", reference=reference.upsample_conv, impls={"triton": upsample_conv_triton},
            bench=_bench, doc="nearest 2x + 3x3 conv as one 2x2-kernel conv of the four output phases (2.25x fewer "
                              "FLOPs, no upsampled tensor) and one interleave pass each way, NCHW or channels_last"))
