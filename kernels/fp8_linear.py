"""The FP8 GEMMs of the LightningDiT linears (modeling/fp8.py swaps the modules in): the operands' quantization in
plain torch ops (so torch.compile fuses it into the kernel that produced the operand), every GEMM one
torch._scaled_mm, the autograd functions of the training linear and of the FP8 SwiGLU's out-projection, and the
weights' once-per-step quantization. Each GEMM is declared once (forward_mm, rowwise_dgrad, wgrad_mm,
tensorwise_dgrad, tensorwise_wgrad): the autograd functions run them, bench.profile_step times them alone.

Recipes of fp8.backend: scaled_mm (docs/fp8.md has the reasoning). Every GEMM is torch._scaled_mm, every
operand's amax taken across the GEMM's contraction dimension, the only layout _scaled_mm's row-wise mode accepts
(scale_a (M, 1) for a row-major A (M, K), scale_b (1, N) for a column-major B (K, N)): the scales then come out
of each dot product of the GEMM, which a scale that varied along K could not.
  forward  y (M,N)  = x (M,K)    @ W^T (K,N)   x: a scale per token,           W: one per output channel
  dgrad    dx (M,K) = dy (M,N)   @ W (N,K)     dy: a scale per token,          W: one per input channel
  wgrad    dW (N,K) = dy^T (N,M) @ x (M,K)     dy: one per output channel,     x: one per input channel
rowwise: e4m3 for all (per-row scales leave no need for e5m2's range), scales rounded up to powers of two (the
rescale is exact; torchao's rowwise does the same). tensorwise: one scale per tensor, gradients in e5m2 (one
scale must cover every row's range). rowwise_with_gw_hp: rowwise, but the weight gradient in bf16.
"""
from typing import Callable, Optional

import torch

from . import ops, registry
from .fp8_quant import pad_rows, pow2_ceil, scale_inverse

SCALED_MM_RECIPES = ("rowwise", "tensorwise", "rowwise_with_gw_hp")
_FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


def quantize_along(x: torch.Tensor, dim: Optional[int], dtype: torch.dtype = torch.float8_e4m3fn,
                   pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (fp8 values, fp32 scale) with x ~= values * scale; the amax (in fp32) over `dim` (keepdim: one scale
    per slice across it) or over the whole tensor (dim None: a 0-dim scale). pow2: the scale rounded up to a
    power of two. Plain torch ops, so torch.compile fuses them into the kernel that produced x."""
    xf = x.float()
    if dim is None:  # (an empty tensor has no amax: no tokens, any scale will do)
        amax = xf.abs().amax() if xf.numel() else xf.new_zeros(())
    else:
        amax = xf.abs().amax(dim=dim, keepdim=True)
    return quantize_by_amax(xf, amax, dtype, pow2)


def quantize_by_amax(x: torch.Tensor, amax: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn,
                     pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_along with the amax already known (broadcastable to x): x -> (fp8 values, fp32 scale)."""
    scale = scale_of_amax(amax, dtype, pow2)
    return quantize_by_inverse(x, scale_inverse(scale, pow2), dtype), scale  # as kernels.fp8_quant


def scale_of_amax(amax: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn, pow2: bool = False) -> torch.Tensor:
    """The recipe's fp32 scale for an amax: amax (at least 1e-12) times the fp32 reciprocal of the format's max, as
    torch on CUDA computes `/ fmax` (kernels.fp8_quant); pow2: rounded up to a power of two."""
    scale = amax.clamp(min=1e-12) * (1.0 / _FP8_MAX[dtype])
    return pow2_ceil(scale) if pow2 else scale


def quantize_by_inverse(x: torch.Tensor, inverse: torch.Tensor,
                        dtype: torch.dtype = torch.float8_e4m3fn) -> torch.Tensor:
    """x times its scale's inverse (broadcastable), clamped to the format's range and cast (round to nearest even)."""
    fmax = _FP8_MAX[dtype]
    return (x.float() * inverse).clamp(-fmax, fmax).to(dtype)


def _add_bias(mm_dtype: torch.dtype, out_dtype: torch.dtype,
              bias: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], bool]:
    """(the bias _scaled_mm adds in its epilogue, whether it does): fused where the product is 16-bit and is the
    output (the bf16 training step: the bias added to the fp32 accumulator before the one rounding, as cuBLAS's bf16
    addmm does, and no pass of its own over the activation); otherwise (fp32 callers: an fp32 product, or a bf16
    one cast up) added after, in the output's dtype, as before."""
    fuse = bias is not None and mm_dtype == out_dtype and mm_dtype in (torch.bfloat16, torch.float16)
    return (bias.to(mm_dtype) if fuse else None), fuse


def forward_mm(a_q: torch.Tensor, a_scale: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor,
               bias: Optional[torch.Tensor], out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """A forward GEMM of the FP8 linears: a (M, K) e4m3 times W^T (w_fp8 (N, K) row-major, so .t() is the
    column-major B), scales per row / per output channel (one each: tensorwise), fast accumulation, `bias` (or None)
    added in the epilogue. Each GEMM of the FP8 linears is declared once (forward_mm, rowwise_dgrad, wgrad_mm,
    tensorwise_dgrad, tensorwise_wgrad): the autograd functions run them, bench.profile_step times them alone."""
    return torch._scaled_mm(a_q, w_fp8.t(), scale_a=a_scale, scale_b=w_scale, bias=bias, out_dtype=out_dtype,
                            use_fast_accum=True)


def _bias_grad(g: torch.Tensor, bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if bias is None else g.sum(0, dtype=torch.float32).to(bias.dtype)


class FP8LinearFunction(torch.autograd.Function):
    """y = x W^T + b through three torch._scaled_mm (forward, dgrad, wgrad) on pre-quantized weights:
    `w_fp8`/`w_scale` (W scaled per output channel, for the forward) and `wt_fp8`/`wt_scale` (W^T, contiguous, scaled
    per input channel, for dgrad). `weight` is the master weight: not read, it receives the gradient; `bias` (or
    None) is added in the forward GEMM's epilogue (_add_bias). input_kernel: x quantized by our kernels instead of
    plain ops -- with rowwise both ways (`kernels.ops.quantize_rows_cols_fp8`: per row for the forward, per column
    transposed for the wgrad, kept in e4m3 instead of x), with rowwise_with_gw_hp per row (`quantize_rows_fp8`).
    grad_kernel (recipe rowwise): dy quantized for dgrad and wgrad, and summed for the bias, by
    `kernels.ops.quantize_rows_cols_fp8` (two passes over dy)."""

    @staticmethod
    def forward(ctx, x, weight, bias, w_fp8, w_scale, wt_fp8, wt_scale, recipe: str, input_kernel: bool = False,
                grad_kernel: bool = False):
        rowwise = recipe != "tensorwise"
        # The CUTLASS row-wise kernel emits bf16 only; tensorwise can write the caller's dtype directly.
        mm_dtype = torch.bfloat16 if rowwise else x.dtype
        xt = None  # rowwise with input_kernel: x^T in e4m3 per input channel, made now, kept instead of x
        if input_kernel and recipe == "rowwise":  # an input whose producer inductor cannot fuse into: both ways
            x_q, x_scale, xt_q, xt_scale, _ = ops.quantize_rows_cols_fp8(x, pow2=True)  # in two passes
            xt = (xt_q, xt_scale)
        elif input_kernel:  # rowwise_with_gw_hp (the wgrad takes x in bf16): the rows in one pass
            x_q, x_scale = ops.quantize_rows_fp8(x, pow2=True)
        else:
            x_q, x_scale = quantize_along(x, -1 if rowwise else None, pow2=rowwise)
        epilogue, fused = _add_bias(mm_dtype, x.dtype, bias)
        y = forward_mm(x_q, x_scale, w_fp8, w_scale, epilogue, mm_dtype)
        if recipe == "tensorwise":  # the same tensor scale serves the wgrad: keep 1-byte x, not x
            ctx.save_for_backward(x_q, x_scale, wt_fp8, wt_scale, bias)
        elif xt is not None:  # the wgrad's x^T already quantized: 1 byte per element kept instead of x's 2
            # (its K scales cloned: the plain ops' pow2_ceil hands out a view, which torch.compile cannot keep
            # across an autograd.Function)
            ctx.save_for_backward(xt[0], wt_fp8, wt_scale, bias, xt[1].clone())
        else:  # wgrad needs x scaled per column (per input channel), requantized from x in its own dtype
            ctx.save_for_backward(x, wt_fp8, wt_scale, bias)
        ctx.recipe, ctx.x_dtype, ctx.w_dtype, ctx.x_transposed = recipe, x.dtype, weight.dtype, xt is not None
        # chosen (and recorded) here: the backward, traced by torch.compile, may not record anything
        ctx.grad_quant = registry.choice("quantize_rows_cols_fp8", x) if grad_kernel else ""
        y = y.to(x.dtype)
        return y + bias.to(y.dtype) if bias is not None and not fused else y

    @staticmethod
    def backward(ctx, grad_out):
        recipe = ctx.recipe
        g = grad_out.contiguous()
        if recipe == "tensorwise":
            x_q, x_scale, wt_fp8, wt_scale, bias = ctx.saved_tensors
            g_q, g_scale = quantize_along(g, None, torch.float8_e5m2)
            dx = tensorwise_dgrad(g_q, g_scale, wt_fp8, wt_scale, ctx.x_dtype)
            dw = tensorwise_wgrad(g_q, g_scale, x_q, x_scale)
            return dx, dw.to(ctx.w_dtype), _bias_grad(g, bias), None, None, None, None, None, None, None
        x, wt_fp8, wt_scale, bias = ctx.saved_tensors[:4]  # (x: x^T in e4m3 where x_transposed)
        xt = (x, ctx.saved_tensors[4]) if ctx.x_transposed else None
        if ctx.grad_quant:  # dy from an op of ours (opaque): both its quantizations and its sum in two passes
            quantize = registry.implementation("quantize_rows_cols_fp8", ctx.grad_quant)
            g_q, g_scale, gt_q, gt_scale, g_sum = quantize(g, pow2=True)
            dx = rowwise_dgrad(g, wt_fp8, wt_scale, (g_q, g_scale))
            dw = rowwise_wgrad(g, x, recipe, (gt_q, gt_scale), xt)
            db = None if bias is None else g_sum.to(bias.dtype)
        else:
            dx, dw = rowwise_dgrad(g, wt_fp8, wt_scale), rowwise_wgrad(g, x, recipe, x_quantized_t=xt)
            db = _bias_grad(g, bias)
        return dx.to(ctx.x_dtype), dw.to(ctx.w_dtype), db, None, None, None, None, None, None, None


def tensorwise_dgrad(g_q: torch.Tensor, g_scale: torch.Tensor, wt_fp8: torch.Tensor, wt_scale: torch.Tensor,
                     out_dtype: torch.dtype) -> torch.Tensor:
    """dgrad of the tensorwise recipe: dy (M, N) e5m2 @ W (N, K) e4m3 (W^T stored contiguous, so .t() is the
    column-major B), one scale each."""
    return torch._scaled_mm(g_q, wt_fp8.t(), scale_a=g_scale, scale_b=wt_scale, out_dtype=out_dtype)


def tensorwise_wgrad(g_q: torch.Tensor, g_scale: torch.Tensor, x_q: torch.Tensor,
                     x_scale: torch.Tensor) -> torch.Tensor:
    """wgrad of the tensorwise recipe: dy^T (N, M) @ x (M, K) in fp32 from the forward's and dgrad's own e4m3 / e5m2
    operands (one scale per tensor survives the transposes), each transposed by a copy (_scaled_mm takes A
    row-major and B column-major), the tokens padded to a multiple of 16."""
    gt = pad_rows(g_q.view(torch.uint8)).view(torch.float8_e5m2).t().contiguous()
    xt = pad_rows(x_q.view(torch.uint8)).view(torch.float8_e4m3fn).t().contiguous()
    return torch._scaled_mm(gt, xt.t(), scale_a=g_scale, scale_b=x_scale, out_dtype=torch.float32)


def rowwise_dgrad(g: torch.Tensor, wt_fp8: torch.Tensor, wt_scale: torch.Tensor,
                  quantized: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                  fast_accum: bool = False) -> torch.Tensor:
    """dy (M, N) -> dx (M, K) bf16 for the row-wise recipes: dy in e4m3 with one power-of-two scale per token
    (`quantized`: already so), W^T (K, N) stored contiguous with one scale per input channel. The gradient GEMMs
    accumulate in two levels (fast_accum False: the tensor cores' partial sums promoted to fp32 as they go); the
    forward's do not. fast_accum=True is bench.profile_step's what-if, not a training setting."""
    g_q, g_scale = quantized if quantized is not None else quantize_along(g, -1, pow2=True)
    return torch._scaled_mm(g_q, wt_fp8.t(), scale_a=g_scale, scale_b=wt_scale.reshape(1, -1),
                            out_dtype=torch.bfloat16, use_fast_accum=fast_accum)


def rowwise_wgrad(g: torch.Tensor, x: torch.Tensor, recipe: str,
                  quantized_t: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                  x_quantized_t: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """dW (N, K) = dy^T x for the row-wise recipes: in bf16 (rowwise_with_gw_hp), or dy^T (N, M) scaled per output
    channel and x^T (K, M) per input channel, both over the tokens (padded to a multiple of 16) in e4m3
    (`quantized_t` / `x_quantized_t`: dy^T / x^T already so; x is then not read)."""
    if recipe == "rowwise_with_gw_hp":
        return g.to(torch.bfloat16).t() @ x.to(torch.bfloat16)
    gt_q, gt_scale = (quantized_t if quantized_t is not None
                      else quantize_along(pad_rows(g).t().contiguous(), -1, pow2=True))
    xt_q, xt_scale = (x_quantized_t if x_quantized_t is not None
                      else quantize_along(pad_rows(x).t().contiguous(), -1, pow2=True))
    return wgrad_mm(gt_q, gt_scale, xt_q, xt_scale)


def wgrad_mm(gt_q: torch.Tensor, gt_scale: torch.Tensor, xt_q: torch.Tensor, xt_scale: torch.Tensor,
             fast_accum: bool = False) -> torch.Tensor:
    """The row-wise recipe's wgrad GEMM: dy^T (N, Mp) e4m3 per output channel times x^T (K, Mp) e4m3 per input
    channel, both contiguous over the padded tokens (.t() makes x^T the column-major B), bf16 out; its sums run over
    every token of the step (two-level accumulation; fast_accum as rowwise_dgrad's)."""
    return torch._scaled_mm(gt_q, xt_q.t(), scale_a=gt_scale, scale_b=xt_scale.reshape(1, -1),
                            out_dtype=torch.bfloat16, use_fast_accum=fast_accum)


def swiglu_recomputed(x12: torch.Tensor) -> torch.Tensor:
    """silu(a) * b from the packed w12 output in fp32, rounded once to x12's dtype: what our SwiGLU kernels
    (kernels.ops.swiglu, swiglu_fp8) compute. Plain ops, so inductor fuses it into its consumer."""
    a, b = x12.float().chunk(2, dim=-1)
    return (a * torch.sigmoid(a) * b).to(x12.dtype)


def _swiglu_backward(dh: torch.Tensor, x12: torch.Tensor) -> torch.Tensor:
    """d(silu(a) * b) / d(a, b) packed as x12: the arithmetic of our SwiGLU backward kernel, in plain ops."""
    a, b = x12.float().chunk(2, dim=-1)
    d, s = dh.float(), torch.sigmoid(a)
    return torch.cat([d * b * s * (1.0 + a * (1.0 - s)), d * a * s], dim=-1).to(x12.dtype)


class FP8SwiGLUOutFunction(torch.autograd.Function):
    """y = swiglu(x12) W3^T for the row-wise recipes with the SwiGLU's output h never written in bf16: the forward
    takes h in e4m3 straight from `kernels.ops.swiglu_fp8_colmax` (one pass over x12: the activation quantization
    in the producing kernel, and each column's max |h|, the rowwise wgrad's scales for h^T), the backward recomputes
    h from x12 (saved anyway, for the SwiGLU's own backward) in plain ops that inductor fuses with h^T's
    quantization: one pass over x12, its scales known. Saves x12 (and F column maxima): h (2F bytes per token) is
    not kept. Same arguments as FP8LinearFunction, with x12 in place of x."""

    @staticmethod
    def forward(ctx, x12, weight, bias, w_fp8, w_scale, wt_fp8, wt_scale, recipe: str):
        if recipe == "rowwise_with_gw_hp":  # the weight gradient from bf16 h: no column scales
            h_q, h_scale = ops.swiglu_fp8(x12, pow2=True)
            col_amax = x12.new_empty(0, dtype=torch.float32)
        else:
            h_q, h_scale, col_amax = ops.swiglu_fp8_colmax(x12, pow2=True)
        epilogue, fused = _add_bias(torch.bfloat16, x12.dtype, bias)
        y = forward_mm(h_q, h_scale, w_fp8, w_scale, epilogue)
        ctx.save_for_backward(x12, col_amax, wt_fp8, wt_scale, bias)
        ctx.recipe, ctx.w_dtype = recipe, weight.dtype
        y = y.to(x12.dtype)
        return y + bias.to(y.dtype) if bias is not None and not fused else y

    @staticmethod
    def backward(ctx, grad_out):
        x12, col_amax, wt_fp8, wt_scale, bias = ctx.saved_tensors
        g = grad_out.contiguous()
        dh = rowwise_dgrad(g, wt_fp8, wt_scale).to(x12.dtype)
        h = swiglu_recomputed(x12)
        if ctx.recipe == "rowwise_with_gw_hp":
            dw = rowwise_wgrad(g, h, ctx.recipe)
        else:  # as rowwise_wgrad, h^T scaled by the column maxima the forward took
            gt_q, gt_scale = quantize_along(pad_rows(g).t().contiguous(), -1, pow2=True)
            ht_q, ht_scale = quantize_by_amax(pad_rows(h).t(), col_amax.reshape(-1, 1), pow2=True)
            dw = wgrad_mm(gt_q, gt_scale, ht_q.contiguous(), ht_scale)
        return _swiglu_backward(dh, x12), dw.to(ctx.w_dtype), _bias_grad(g, bias), None, None, None, None, None


def quantize_weight_rowwise(w: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor, wt_fp8: torch.Tensor,
                            wt_scale: torch.Tensor) -> None:
    """The row-wise recipes' weight operands of W (N, K), written into the given tensors: W in e4m3 per output
    channel (w_fp8 (N, K), w_scale (1, N): the forward's scale_b) and W^T per input channel (wt_fp8 (K, N) contiguous,
    wt_scale (K, 1): dgrad's), power-of-two scales: quantize_along's."""
    q, s = quantize_along(w, -1, pow2=True)
    qt, st = quantize_along(w.t(), -1, pow2=True)
    w_fp8.copy_(q)
    w_scale.copy_(s.reshape(1, -1))
    wt_fp8.copy_(qt)
    wt_scale.copy_(st)


def quantize_weight_tensorwise(w: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor, wt_fp8: torch.Tensor,
                               wt_scale: torch.Tensor, cast: Optional[Callable[..., None]] = None) -> None:
    """The tensorwise recipe's weight operands of W (N, K), written into the given tensors: W in e4m3 with one scale
    (w_fp8 (N, K), w_scale ()) and the same values transposed (wt_fp8 (K, N) contiguous, wt_scale ()):
    quantize_along(w, None)'s. The scale and its IEEE reciprocal are taken here in plain ops (scalars: not a power
    of two, so inductor's approximate division would not give its bits); `cast` (cast_both_ways, compiled on a GPU)
    makes the two passes over W."""
    scale = scale_of_amax(w.float().abs().amax())
    (cast or cast_both_ways)(w, torch.reciprocal(scale), w_fp8, wt_fp8)
    w_scale.copy_(scale)
    wt_scale.copy_(scale)


def cast_both_ways(w: torch.Tensor, inverse: torch.Tensor, w_fp8: torch.Tensor, wt_fp8: torch.Tensor) -> None:
    """W times `inverse` cast to e4m3 into w_fp8 (N, K) and, transposed, into wt_fp8 (K, N)."""
    q = quantize_by_inverse(w, inverse)
    w_fp8.copy_(q)
    wt_fp8.copy_(q.t())


_COMPILED_WEIGHT_QUANTIZER: list = []


def _compiled(fn: Callable[..., None]) -> Callable[..., None]:
    """fn under torch.compile, built once per process: one graph with dynamic sizes for every weight shape (XL/1
    has four), so a fresh process compiles it once."""
    for f, c in _COMPILED_WEIGHT_QUANTIZER:
        if f is fn:
            return c
    _COMPILED_WEIGHT_QUANTIZER.append((fn, torch.compile(fn, dynamic=True, fullgraph=True)))
    return _COMPILED_WEIGHT_QUANTIZER[-1][1]


def weight_quantizer(recipe: str, device: torch.device) -> Callable[..., None]:
    """The recipe's weight refresh (quantize_weight_rowwise for the row-wise recipes, quantize_weight_tensorwise)
    as it runs on `device`: `fn(w, w_fp8, w_scale, wt_fp8, wt_scale)`. On a GPU its passes over W run compiled;
    elsewhere (the CPU: tests, emulation) eager. See rowwise_weight_quantizer for why."""
    if recipe == "tensorwise":
        if device.type != "cuda":
            return quantize_weight_tensorwise
        cast = _compiled(cast_both_ways)
        return lambda w, *out: quantize_weight_tensorwise(w, *out, cast=cast)
    return rowwise_weight_quantizer(device)


def rowwise_weight_quantizer(device: torch.device) -> Callable[..., None]:
    """quantize_weight_rowwise as it runs on `device`: on a GPU compiled (one graph, sizes dynamic). Eagerly it is ~35
    kernel launches and ~90 bytes read and written per weight element (each plain op a pass over W or W^T; counted
    with a dispatch mode): at XL/1's 112 FP8 linears ~3,900 launches and ~40 GB once a step, at the step's start
    where nothing else is queued. Compiled: a few fused passes. The same bits: the amax, the power-of-two scale,
    its inverse (kernels.fp8_quant.scale_inverse: from the exponent bits) and the product are exact, and the cast
    to e4m3 rounds to nearest even either way.
    Elsewhere eager (the CPU: tests, emulation)."""
    return _compiled(quantize_weight_rowwise) if device.type == "cuda" else quantize_weight_rowwise
