"""FP8 for the LightningDiT blocks, in training (the DiT trainer's `fp8:` section) and in sampling
(`--precision fp8`): our own torch._scaled_mm linears, Transformer Engine or torchao float8 (docs/fp8.md).

Only the blocks' big matmuls run in FP8 (attn.qkv, attn.proj, mlp.w12, mlp.w3); the embedders, adaLN and
the final layer stay in bf16, as they are small and precision sensitive. Parameter names do not change,
so checkpoints keep the reference keys. FP8 state lives in the modules' state dicts (TE's delayed-scaling
amax history is its `_extra_state`; torchao's tensorwise dynamic scaling keeps none), so the DeepSpeed
checkpoint carries it.

    apply_fp8(model, backend="torchao")           # GPU suite / trainer (backend "scaled_mm", "torchao" or "te")
    apply_fp8_training(model, "rowwise")          # fp8.backend: scaled_mm -> FP8TrainingLinear (ours)
    with fp8_context(backend, recipe): loss = ...  # TE needs fp8_autocast around the forward
    apply_fp8_inference(bf16_model, "rowwise")    # modeling.sampling.Sampler(precision="fp8"): FP8Linear
    apply_fp8(bf16_model, "torchao", "rowwise")   # the same through torchao's training modules (fp8_impl)

FP8Linear is the sampler's own inference linear: weights quantized once, activations quantized per call in
plain torch ops (so torch.compile fuses the amax and the cast into the kernel that produces the input),
one torch._scaled_mm per call. torchao's training modules re-quantize the weights on every call and keep
the activation quantization outside the producer's kernel; on an H200 they sampled no faster than bf16.

FP8TrainingLinear is the trainer's own: forward, dgrad and wgrad each one torch._scaled_mm, the weight quantized
once per optimizer step (cached; gradient-accumulation micro-batches reuse it), the activation and gradient
quantization in plain ops inside the autograd.Function (traced by torch.compile, so fused into their producers).

Asked for without the library, or on hardware without FP8 (compute capability < 8.9), this raises
FP8Unavailable with the reason. Ours and torchao also run on the CPU (emulated through torch's CPU _scaled_mm;
useful for tests, not for speed) only when `allow_cpu=True`.
"""
import contextlib
from typing import Any, Callable, Optional, Union

import torch
import torch.nn as nn

from kernels import ops, registry
# the recipe, with its kernels
from kernels.fp8_quant import FP8_E4M3_MAX, FP8Rows, pad_rows, pow2_ceil, quantize_fp8, scale_inverse  # noqa: F401

FP8_LAYERS = ("attn.qkv", "attn.proj", "mlp.w12", "mlp.w3")
RECIPES = {"te": ("delayed", "current", "mxfp8"), "torchao": ("tensorwise", "rowwise", "rowwise_with_gw_hp"),
           "scaled_mm": ("rowwise", "tensorwise", "rowwise_with_gw_hp")}  # scaled_mm: ours, FP8TrainingLinear


class FP8Unavailable(RuntimeError):
    pass


def _is_fp8_layer(name):
    return name.startswith("blocks.") and name.split(".", 2)[-1] in FP8_LAYERS


def default_recipe(backend: str) -> str:
    return RECIPES[backend][0]


TRAINER_REMEDY = "Set fp8.backend: none to train without FP8."


def check_fp8(backend: str, device: Union[str, torch.device], allow_cpu: bool = False, remedy: str = TRAINER_REMEDY,
              recipe: Optional[str] = None) -> str:
    """Raise FP8Unavailable unless `backend` can run FP8 on `device`; return a one-line description (naming
    `recipe` when given). remedy: the sentence that ends each refusal (what the caller's user can set instead)."""
    if backend not in RECIPES:
        raise FP8Unavailable(f"unknown FP8 backend {backend!r}; choose one of {sorted(RECIPES)}")
    named = f", recipe {recipe}" if recipe else ""
    if backend == "scaled_mm":
        return f"scaled_mm (ours: FP8TrainingLinear) via {check_scaled_mm(device, allow_cpu, remedy)}{named}"
    device = torch.device(device)
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if cap < (8, 9):
            raise FP8Unavailable(f"FP8 needs an Ada/Hopper or newer GPU (compute capability >= 8.9); "
                                 f"{torch.cuda.get_device_name(device)} has {cap[0]}.{cap[1]}. {remedy}")
        where = f"{torch.cuda.get_device_name(device)} (sm{cap[0]}{cap[1]})"
    elif backend == "torchao" and allow_cpu:
        where = "CPU emulation (tests only, not fast)"
    else:
        raise FP8Unavailable(f"FP8 ({backend}) needs an FP8-capable CUDA GPU and this process runs on {device}. "
                             f"{remedy}")
    if backend == "te":
        try:
            import transformer_engine.pytorch as te
        except Exception as e:  # ImportError, or TE's own errors when no driver is present
            raise FP8Unavailable(f"FP8 backend te needs Transformer Engine (pip install transformer_engine[pytorch]); "
                                 f"importing it failed: {e}") from None
        return f"transformer_engine {getattr(te, '__version__', '?')} on {where}{named}"
    try:
        import torchao
        from torchao.float8 import convert_to_float8_training  # noqa: F401
    except Exception as e:
        raise FP8Unavailable(f"FP8 backend torchao needs torchao (pip install torchao==0.18.0); "
                             f"importing it failed: {e}") from None
    return f"torchao {torchao.__version__} float8 on {where}{named}"


def apply_fp8(model: nn.Module, backend: str = "torchao", recipe: Optional[str] = None, allow_cpu: bool = False,
              remedy: str = TRAINER_REMEDY, quant: str = "inline") -> nn.Module:
    """Convert the blocks' qkv / proj / w12 / w3 linears of `model` (in place) to FP8; returns model.
    (torchao's training modules: under no_grad they are the inference path too, dynamic scaling per call.)
    quant: where ours (scaled_mm) quantizes w3's and proj's inputs (apply_fp8_training); the others: inline."""
    recipe = recipe or default_recipe(backend)
    device = next(model.parameters()).device
    check_fp8(backend, device, allow_cpu, remedy)
    if recipe not in RECIPES[backend]:
        raise FP8Unavailable(f"recipe {recipe!r} is not a {backend} recipe; choose one of {RECIPES[backend]}")
    if backend == "scaled_mm":
        return apply_fp8_training(model, recipe, allow_cpu, remedy, quant)
    if quant != "inline":
        raise FP8Unavailable(f"FP8 activation quantization {quant!r} is ours (fp8.backend scaled_mm); {backend} "
                             f"quantizes inline")
    for name, m in model.named_modules():
        if _is_fp8_layer(name) and isinstance(m, nn.Linear) and (m.in_features % 16 or m.out_features % 16):
            raise FP8Unavailable(f"{name} is {m.in_features}x{m.out_features}; FP8 matmuls need both "
                                 f"dimensions divisible by 16. {remedy}")
    if backend == "torchao":
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
        return convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(recipe),
                                          module_filter_fn=lambda m, name: _is_fp8_layer(name))
    import transformer_engine.pytorch as te
    for name, m in list(model.named_modules()):
        if not (_is_fp8_layer(name) and isinstance(m, nn.Linear)):
            continue
        new = te.Linear(m.in_features, m.out_features, bias=m.bias is not None,
                        params_dtype=m.weight.dtype, device=m.weight.device)
        with torch.no_grad():
            new.weight.copy_(m.weight)
            if m.bias is not None:
                new.bias.copy_(m.bias)
        parent_name, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent_name), child, new)
    return model


class FP8Linear(nn.Module):
    """Inference-only replacement for a bf16 nn.Linear: y = x W^T + b with W held in e4m3 (quantized once, one
    scale per output channel or per tensor) and x quantized on every call the same way (per row or per
    tensor), multiplied by torch._scaled_mm (fp32 accumulation, bf16 output). Reference: the dequantized
    product (x_q * s_x) (W_q * s_w)^T + b, which `dequantized_reference` computes in fp32.

    input_kernel (rowwise only): x is quantized by `kernels.ops.quantize_rows_fp8` (one pass per row) instead of
    plain torch ops; for an input whose producer inductor cannot fuse the quantization into (attention's output).
    norm_input (rowwise only): the norm that makes x quantizes it in its own pass (the model asks `input_dtype`,
    e4m3, and hands over kernels.fp8_quant.FP8Rows: kernels.ops.norm_modulate_fp8 and its gated variant); a plain
    tensor is still quantized here."""

    def __init__(self, linear: nn.Linear, rowwise: bool = True, input_kernel: bool = False,
                 norm_input: bool = False) -> None:
        super().__init__()
        if (input_kernel or norm_input) and not rowwise:
            raise ValueError("FP8Linear: input_kernel / norm_input quantize per row; they need rowwise=True")
        self.in_features, self.out_features, self.rowwise = linear.in_features, linear.out_features, rowwise
        self.input_kernel = input_kernel
        # the dtype this Linear reads its input in, for the op that makes it (None: whatever it is handed)
        self.input_dtype = torch.float8_e4m3fn if norm_input else None
        with torch.no_grad():
            w_q, w_scale = quantize_fp8(linear.weight.detach(), rowwise)
        self.register_buffer("weight_fp8", w_q)  # (N, K) row-major: its .t() is the column-major B _scaled_mm wants
        self.register_buffer("weight_scale", w_scale.reshape(1, -1) if rowwise else w_scale)  # (1, N) or ()
        bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)
        self.register_buffer("bias", bias)

    def quantize_input(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x2 (rows, K) -> (e4m3 (rows, K), its fp32 scale)."""
        if self.input_kernel:
            return ops.quantize_rows_fp8(x2)
        return quantize_fp8(x2, self.rowwise)

    def matmul(self, x_q: torch.Tensor, x_scale: torch.Tensor) -> torch.Tensor:
        """(rows, K) e4m3 and its scale (as quantize_input returns them) -> (rows, N) bf16."""
        return forward_mm(x_q, x_scale, self.weight_fp8, self.weight_scale, self.bias)

    def forward(self, x: Union[torch.Tensor, FP8Rows]) -> torch.Tensor:
        if isinstance(x, FP8Rows):  # quantized per row by the op that made it
            y = self.matmul(x.values.reshape(-1, self.in_features), x.scale.reshape(-1, 1))
            return y.reshape(*x.values.shape[:-1], self.out_features)
        y = self.matmul(*self.quantize_input(x.reshape(-1, self.in_features)))
        return y.reshape(*x.shape[:-1], self.out_features)

    def dequantized_reference(self, x: torch.Tensor) -> torch.Tensor:
        """What forward computes, in fp32 from the same quantized operands (for tests)."""
        return self.dequantized_matmul(*quantize_fp8(x.reshape(-1, self.in_features), self.rowwise)).reshape(
            *x.shape[:-1], self.out_features)

    def dequantized_matmul(self, x_q: torch.Tensor, x_scale: torch.Tensor) -> torch.Tensor:
        """What matmul computes, in fp32 (for tests)."""
        w = self.weight_fp8.float() * self.weight_scale.reshape(-1, 1)
        y = (x_q.float() * x_scale) @ w.t()
        return y + self.bias.float() if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"scaling={'rowwise' if self.rowwise else 'tensorwise'}, bias={self.bias is not None}"
                + (", input quantized by kernels.ops.quantize_rows_fp8" if self.input_kernel else "")
                + (", input quantized by the norm that makes it" if self.input_dtype is not None else ""))


class FP8SwiGLUFFN(nn.Module):
    """The SwiGLU MLP `w3(swiglu(w12(x)))` in FP8 (rowwise), its w3 input quantized in the SwiGLU's own pass
    (`kernels.ops.swiglu_fp8`): the SwiGLU's bf16 output is never written. w12 and w3 are FP8Linear under their
    original names, so state_dict keys are those of the FP8Linear swap. norm_input: w12's (FP8Linear)."""

    def __init__(self, mlp: nn.Module, norm_input: bool = False) -> None:
        super().__init__()
        self.w12 = FP8Linear(mlp.w12, rowwise=True, norm_input=norm_input)
        self.w3 = FP8Linear(mlp.w3, rowwise=True)
        self.input_dtype = self.w12.input_dtype

    def forward(self, x: Union[torch.Tensor, FP8Rows]) -> torch.Tensor:
        x12 = self.w12(x)
        y = self.w3.matmul(*ops.swiglu_fp8(x12))
        return y.reshape(*x12.shape[:-1], self.w3.out_features)


def check_scaled_mm(device: Union[str, torch.device], allow_cpu: bool = False, remedy: str = TRAINER_REMEDY) -> str:
    """Raise FP8Unavailable unless FP8Linear can run on `device`; return a one-line description."""
    device = torch.device(device)
    if not hasattr(torch, "_scaled_mm") or not hasattr(torch, "float8_e4m3fn"):
        raise FP8Unavailable(f"torch {torch.__version__} has no torch._scaled_mm / float8_e4m3fn. {remedy}")
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if cap < (8, 9):
            raise FP8Unavailable(f"FP8 needs an Ada/Hopper or newer GPU (compute capability >= 8.9); "
                                 f"{torch.cuda.get_device_name(device)} has {cap[0]}.{cap[1]}. {remedy}")
        return f"torch._scaled_mm on {torch.cuda.get_device_name(device)} (sm{cap[0]}{cap[1]})"
    if allow_cpu:
        return "torch._scaled_mm, CPU emulation (tests only, not fast)"
    raise FP8Unavailable(f"FP8 needs an FP8-capable CUDA GPU and this process runs on {device}. {remedy}")


FP8_QUANT = ("inline", "ours")  # where FP8 activations are quantized (SamplingConfig.fp8_quant, fp8.quant)


def training_quant(quant: str, backend: str, recipe: str, device: Union[str, torch.device]) -> str:
    """The trainer's fp8.quant resolved to 'ours' or 'inline'. auto is inline: through the trainer on an H200
    (XL/1, batch 256, bench/results/2026-12-04_h200.md) ours ran 515 img/s against inline's 551, so ours is
    chosen explicitly. 'ours' needs scaled_mm with a row-wise recipe and the Triton kernels (else FP8Unavailable)."""
    if quant in ("inline", "auto"):
        return "inline"
    if backend != "scaled_mm" or recipe == "tensorwise":
        raise FP8Unavailable(f"fp8.quant ours quantizes per row in our kernels: it needs fp8.backend scaled_mm and "
                             f"a row-wise recipe (got {backend}, {recipe})")
    from kernels.backend import triton_status
    ok, reason = triton_status(torch.empty(0, device=device))
    if not ok:
        raise FP8Unavailable(f"fp8.quant ours needs the Triton kernels: {reason}; use fp8.quant inline")
    return "ours"


def apply_fp8_inference(model: nn.Module, recipe: str = "rowwise", allow_cpu: bool = False,
                        remedy: str = TRAINER_REMEDY, quant: str = "inline", skip: tuple[str, ...] = ()) -> nn.Module:
    """Replace the blocks' qkv / proj / w12 / w3 linears of a bf16 `model` (in place) by FP8Linear (recipe
    'rowwise' or 'tensorwise'); returns model. Inference only: the FP8 weights are buffers, not parameters.
    skip: of FP8_LAYERS, those that stay bf16 (e.g. ("attn.proj",)).

    quant 'inline': every activation quantized in plain torch ops (inductor fuses them into their producers).
    'ours' (rowwise): our one-pass kernels quantize -- each SwiGLU MLP becomes an FP8SwiGLUFFN
    (`kernels.ops.swiglu_fp8`), attn.proj's input goes through `kernels.ops.quantize_rows_fp8`, and qkv's and w12's
    inputs are quantized by the block's norms in their own pass (norm_input: `kernels.ops.norm_modulate_fp8` and its
    gated variant, under torch.compile too: inductor's fusion of the norm and the plain quantization took 2.5x its
    bytes' time on the H200, bench/results/2026-12-05_fp8_norm_quant.md)."""
    if recipe not in ("rowwise", "tensorwise"):
        raise FP8Unavailable(f"recipe {recipe!r} is not an FP8 inference recipe; choose rowwise or tensorwise")
    if quant not in FP8_QUANT:
        raise FP8Unavailable(f"FP8 activation quantization {quant!r}: choose one of {FP8_QUANT}")
    if quant == "ours" and recipe != "rowwise":
        raise FP8Unavailable(f"our FP8 quantization kernels quantize per row; recipe {recipe!r} needs quant inline")
    unknown = [s for s in skip if s not in FP8_LAYERS]
    if unknown:
        raise FP8Unavailable(f"cannot keep {unknown} in bf16: the FP8 layers are {FP8_LAYERS}")
    check_scaled_mm(next(model.parameters()).device, allow_cpu, remedy)
    targets = [(n, m) for n, m in model.named_modules() if _is_fp8_layer(n) and isinstance(m, nn.Linear)
               and n.split(".", 2)[-1] not in skip]
    for name, m in targets:
        if m.in_features % 16 or m.out_features % 16:
            raise FP8Unavailable(f"{name} is {m.in_features}x{m.out_features}; FP8 matmuls need both "
                                 f"dimensions divisible by 16. {remedy}")
    ours = quant == "ours"
    mlps = [n.rsplit(".", 1)[0] for n, _ in targets if n.endswith(".mlp.w12")] if ours else []
    names = {n for n, _ in targets}  # an MLP becomes FP8SwiGLUFFN only where its w3 is FP8 too (not skipped)
    mlps = [n for n in mlps if f"{n}.w3" in names and isinstance(model.get_submodule(f"{n}.w3"), nn.Linear)]
    for name, m in targets:
        parent, child = name.rsplit(".", 1)
        if parent not in mlps:
            setattr(model.get_submodule(parent), child,
                    FP8Linear(m, rowwise=recipe == "rowwise", input_kernel=ours and name.endswith("attn.proj"),
                              norm_input=ours and name.endswith((".attn.qkv", ".mlp.w12"))))
    for name in mlps:
        parent, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), child, FP8SwiGLUFFN(model.get_submodule(name), norm_input=True))
    return model


def te_recipe(recipe: str) -> Any:
    from transformer_engine.common import recipe as r
    if recipe == "delayed":
        return r.DelayedScaling(fp8_format=r.Format.HYBRID, amax_history_len=16, amax_compute_algo="max")
    if recipe == "current":
        return r.Float8CurrentScaling()
    return r.MXFP8BlockScaling()


def fp8_context(backend: str, recipe: Optional[str] = None) -> contextlib.AbstractContextManager:
    """The forward-pass context: TE's fp8_autocast for backend 'te', nothing otherwise."""
    if backend != "te":
        return contextlib.nullcontext()
    import transformer_engine.pytorch as te
    return te.fp8_autocast(enabled=True, fp8_recipe=te_recipe(recipe or default_recipe("te")))


# ----------------------------------------------------------------------------- FP8 training: our own linear
#
# Recipes of fp8.backend: scaled_mm (docs/fp8.md has the reasoning). Every GEMM is torch._scaled_mm, every
# operand's amax taken across the GEMM's contraction dimension, the only layout _scaled_mm's row-wise mode accepts
# (scale_a (M, 1) for a row-major A (M, K), scale_b (1, N) for a column-major B (K, N)): the scales then come out
# of each dot product of the GEMM, which a scale that varied along K could not.
#   forward  y (M,N)  = x (M,K)    @ W^T (K,N)   x: a scale per token,           W: one per output channel
#   dgrad    dx (M,K) = dy (M,N)   @ W (N,K)     dy: a scale per token,          W: one per input channel
#   wgrad    dW (N,K) = dy^T (N,M) @ x (M,K)     dy: one per output channel,     x: one per input channel
# rowwise: e4m3 for all (per-row scales leave no need for e5m2's range), scales rounded up to powers of two (the
# rescale is exact; torchao's rowwise does the same). tensorwise: one scale per tensor, gradients in e5m2 (one
# scale must cover every row's range). rowwise_with_gw_hp: rowwise, but the weight gradient in bf16.

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


class _FP8LinearFunction(torch.autograd.Function):
    """y = x W^T + b through three torch._scaled_mm (forward, dgrad, wgrad) on pre-quantized weights:
    `w_fp8`/`w_scale` (W scaled per output channel, for the forward) and `wt_fp8`/`wt_scale` (W^T, contiguous, scaled
    per input channel, for dgrad). `weight` is the master weight: not read, it receives the gradient; `bias` (or
    None) is added in the forward GEMM's epilogue (_add_bias). input_kernel: x quantized by our kernels instead of
    plain ops -- with rowwise both ways (`kernels.ops.quantize_rows_cols_fp8`: per row for the forward, per column
    transposed for the wgrad, kept in e4m3 instead of x), with rowwise_with_gw_hp per row (`quantize_rows_fp8`). grad_kernel (recipe rowwise): dy quantized for dgrad and
    wgrad, and summed for the bias, by `kernels.ops.quantize_rows_cols_fp8` (two passes over dy)."""

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


def tensorwise_wgrad(g_q: torch.Tensor, g_scale: torch.Tensor, x_q: torch.Tensor, x_scale: torch.Tensor) -> torch.Tensor:
    """wgrad of the tensorwise recipe: dy^T (N, M) @ x (M, K) in fp32 from the forward's and dgrad's own e4m3 / e5m2
    operands (one scale per tensor survives the transposes), each transposed by a copy (_scaled_mm takes A
    row-major and B column-major), the tokens padded to a multiple of 16."""
    gt = pad_rows(g_q.view(torch.uint8)).view(torch.float8_e5m2).t().contiguous()
    xt = pad_rows(x_q.view(torch.uint8)).view(torch.float8_e4m3fn).t().contiguous()
    return torch._scaled_mm(gt, xt.t(), scale_a=g_scale, scale_b=x_scale, out_dtype=torch.float32)


def rowwise_dgrad(g: torch.Tensor, wt_fp8: torch.Tensor, wt_scale: torch.Tensor,
                  quantized: Optional[tuple[torch.Tensor, torch.Tensor]] = None, fast_accum: bool = False) -> torch.Tensor:
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


class _FP8SwiGLUOutFunction(torch.autograd.Function):
    """y = swiglu(x12) W3^T for the row-wise recipes with the SwiGLU's output h never written in bf16: the forward
    takes h in e4m3 straight from `kernels.ops.swiglu_fp8_colmax` (one pass over x12: the activation quantization
    in the producing kernel, and each column's max |h|, the rowwise wgrad's scales for h^T), the backward recomputes
    h from x12 (saved anyway, for the SwiGLU's own backward) in plain ops that inductor fuses with h^T's
    quantization: one pass over x12, its scales known. Saves x12 (and F column maxima): h (2F bytes per token) is
    not kept. Same arguments as _FP8LinearFunction, with x12 in place of x."""

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


# Bumped by every optimizer step in the process (a global torch.optim hook): a step may write the weights without
# touching their version counters (DeepSpeed's ZeRO copies updated partitions in through .data; torch's fused
# AdamW does not bump them either), so the cached FP8 weights are keyed on this as well as on the version counter.
_OPTIMIZER_STEPS = [0]
_STEP_HOOK = []


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    _OPTIMIZER_STEPS[0] += 1


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


def _install_step_hook() -> None:
    if not _STEP_HOOK:
        from torch.optim.optimizer import register_optimizer_step_post_hook
        _STEP_HOOK.append(register_optimizer_step_post_hook(_count_optimizer_step))


class FP8TrainingLinear(nn.Linear):
    """Training replacement for an nn.Linear (same `weight` / `bias` parameters, same state-dict keys) whose
    forward, dgrad and wgrad run in FP8 through torch._scaled_mm (_FP8LinearFunction; `recipe` one of
    SCALED_MM_RECIPES). The weight is quantized once per optimizer step, not per call: the FP8 copies (for the
    forward and for dgrad) are rebuilt only when the weight's version counter, storage or the process's optimizer
    step count changed, so gradient-accumulation micro-batches reuse them. `refresh_weight()` runs eagerly (outside
    torch.compile): in this module's forward when it is not compiled, and in a forward pre-hook on the model
    apply_fp8_training converted (the trainer compiles the blocks, not the model). Output: the autocast dtype
    under autocast, else x's dtype. The master weight and its gradient keep the weight's dtype."""

    def __init__(self, linear: nn.Linear, recipe: str = "rowwise", input_kernel: bool = False,
                 grad_kernel: bool = False) -> None:
        if recipe not in SCALED_MM_RECIPES:
            raise FP8Unavailable(f"recipe {recipe!r} is not a scaled_mm recipe; choose one of {SCALED_MM_RECIPES}")
        if input_kernel and recipe == "tensorwise":
            raise FP8Unavailable("input_kernel quantizes per row; recipe tensorwise quantizes x inline")
        if grad_kernel and recipe != "rowwise":
            raise FP8Unavailable(f"grad_kernel quantizes dy per row and per column for an FP8 weight gradient; "
                                 f"recipe {recipe} takes dy inline")
        nn.Module.__init__(self)  # not nn.Linear.__init__: the parameters are the linear's own
        self.in_features, self.out_features, self.recipe = linear.in_features, linear.out_features, recipe
        self.input_kernel, self.grad_kernel = input_kernel, grad_kernel
        self.weight, self.bias = linear.weight, linear.bias
        dev = linear.weight.device
        for name in ("weight_fp8", "weight_scale", "weight_t_fp8", "weight_t_scale"):  # derived: not saved
            self.register_buffer(name, torch.empty(0, device=dev), persistent=False)
        self._cache_key = None
        _install_step_hook()
        self.weight_quantizations = 0  # how many times refresh_weight quantized (tests count it)

    @torch.no_grad()
    def refresh_weight(self) -> bool:
        """Quantize the weight again if it changed since the last time; returns whether it did."""
        w = self.weight
        if hasattr(w, "ds_id"):
            raise FP8Unavailable("fp8.backend scaled_mm cannot read ZeRO-3-partitioned weights; use "
                                 "train.zero_stage 0-2 (or fp8.backend torchao / te)")
        key = (w._version, w.data_ptr(), w.device, w.dtype, _OPTIMIZER_STEPS[0])
        if key == self._cache_key:
            return False
        # W for the forward and W^T (contiguous) for dgrad: one scale each (tensorwise), else per output channel
        # and per input channel (W^T's rows); written in place, the same tensors every step (a compiled graph sees
        # no new inputs); two scale buffers even where they hold one value (dynamo refuses aliased inputs)
        (n, k), e4m3, tensorwise = w.shape, torch.float8_e4m3fn, self.recipe == "tensorwise"
        for name, shape, dtype in (("weight_fp8", (n, k), e4m3), ("weight_scale", () if tensorwise else (1, n),
                                                                  torch.float32),
                                   ("weight_t_fp8", (k, n), e4m3), ("weight_t_scale", () if tensorwise else (k, 1),
                                                                    torch.float32)):
            old = getattr(self, name)
            if old.shape != shape or old.dtype != dtype or old.device != w.device:
                setattr(self, name, torch.empty(shape, dtype=dtype, device=w.device))
        weight_quantizer(self.recipe, w.device)(w, self.weight_fp8, self.weight_scale, self.weight_t_fp8,
                                                self.weight_t_scale)
        self._cache_key = key
        self.weight_quantizations += 1
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            self.refresh_weight()
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(dtype)
        y = _FP8LinearFunction.apply(x2, self.weight, self.bias, self.weight_fp8, self.weight_scale,
                                     self.weight_t_fp8, self.weight_t_scale, self.recipe, self.input_kernel,
                                     self.grad_kernel)
        return y.reshape(*lead, self.out_features)

    def dequantized_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The forward in float64 from the same quantized operands (for tests): (x_q s_x) (W_q s_w)^T + b."""
        self.refresh_weight()
        x2 = x.reshape(-1, self.in_features)
        rowwise = self.recipe != "tensorwise"
        x_q, x_s = quantize_along(x2, -1 if rowwise else None, pow2=rowwise)
        w = self.weight_fp8.double() * self.weight_scale.double().reshape(-1, 1)
        y = (x_q.double() * x_s.double()) @ w.t()
        if self.bias is not None:
            y = y + self.bias.double()
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, recipe={self.recipe}, "
                f"bias={self.bias is not None}"
                + ((", input quantized by kernels.ops." + ("quantize_rows_cols_fp8" if self.recipe == "rowwise"
                                                           else "quantize_rows_fp8")) if self.input_kernel else "")
                + (", output gradient quantized by kernels.ops.quantize_rows_cols_fp8" if self.grad_kernel else ""))


class FP8TrainingSwiGLUFFN(nn.Module):
    """The SwiGLU MLP `w3(swiglu(w12(x)))` for FP8 training with a row-wise recipe, w3's input quantized in the
    SwiGLU's own pass (`kernels.ops.swiglu_fp8`, power-of-two scales as the recipe's) and the SwiGLU recomputed
    from w12's output in the backward (_FP8SwiGLUOutFunction): the bf16 SwiGLU output is neither written, read back
    for its quantization, nor kept. w12 and w3 stay FP8TrainingLinear under their names (same parameters, keys,
    weight cache and refresh)."""

    def __init__(self, mlp: nn.Module, recipe: str = "rowwise") -> None:
        super().__init__()
        if recipe == "tensorwise":
            raise FP8Unavailable("the FP8 SwiGLU quantizes per row; recipe tensorwise needs fp8 quant inline")
        self.w12 = mlp.w12 if isinstance(mlp.w12, FP8TrainingLinear) else FP8TrainingLinear(mlp.w12, recipe)
        self.w3 = mlp.w3 if isinstance(mlp.w3, FP8TrainingLinear) else FP8TrainingLinear(mlp.w3, recipe)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w3 = self.w3
        if not torch.compiler.is_compiling():
            w3.refresh_weight()
        x12 = self.w12(x)  # in the autocast dtype (FP8TrainingLinear's output)
        y = _FP8SwiGLUOutFunction.apply(x12.reshape(-1, x12.shape[-1]), w3.weight, w3.bias, w3.weight_fp8,
                                        w3.weight_scale, w3.weight_t_fp8, w3.weight_t_scale, w3.recipe)
        return y.reshape(*x.shape[:-1], w3.out_features)


def refresh_fp8_weights(model: nn.Module) -> int:
    """Re-quantize the FP8TrainingLinear weights of `model` that changed; returns how many were."""
    return sum(m.refresh_weight() for m in model.modules() if isinstance(m, FP8TrainingLinear))


def _refresh_before_forward(model: nn.Module, args) -> None:
    refresh_fp8_weights(model)


def apply_fp8_training(model: nn.Module, recipe: str = "rowwise", allow_cpu: bool = False,
                       remedy: str = TRAINER_REMEDY, quant: str = "inline") -> nn.Module:
    """Replace the blocks' qkv / proj / w12 / w3 linears of `model` (in place) by FP8TrainingLinear with `recipe`
    (SCALED_MM_RECIPES); returns model. Parameters and state-dict keys are unchanged (the optimizer may be built
    before or after). Refuses (FP8Unavailable) on a device without FP8 unless `allow_cpu` (CPU emulation through
    torch's CPU _scaled_mm: FP8's numerics, not its speed).

    Where an op of ours produces a Linear's FP8 operand (opaque to inductor, which fuses the plain ops' quantization
    into its own producers only), our kernels quantize it (row-wise recipes; under compile, ours until
    kernels/compiled_choices.json measures inductor's fusion of the plain ops faster):
    - attn.proj's input (attention's output) and mlp.w3's (the SwiGLU's; not under 'ours', see below):
      `input_kernel`, both ways in two passes with rowwise (x^T kept in e4m3 instead of x), per row with
      rowwise_with_gw_hp;
    - attn.qkv's and mlp.w12's output gradients (the attention block's and the SwiGLU's backward; rowwise):
      `grad_kernel`, both ways and summed for the bias in two passes, where the plain ops take three or four.
    quant 'inline' is that, with the rest in plain ops. 'ours' (row-wise recipes) also makes each SwiGLU MLP an
    FP8TrainingSwiGLUFFN: w3's input straight from the SwiGLU's own pass (`kernels.ops.swiglu_fp8_colmax`) and the
    SwiGLU recomputed in plain ops for w3's wgrad, so w12's output gradient comes from plain ops there."""
    if recipe not in SCALED_MM_RECIPES:
        raise FP8Unavailable(f"recipe {recipe!r} is not a scaled_mm recipe; choose one of {SCALED_MM_RECIPES}")
    if quant not in FP8_QUANT:
        raise FP8Unavailable(f"FP8 activation quantization {quant!r}: choose one of {FP8_QUANT}")
    if quant == "ours" and recipe == "tensorwise":
        raise FP8Unavailable("our FP8 quantization kernels quantize per row; recipe tensorwise needs quant inline")
    check_scaled_mm(next(model.parameters()).device, allow_cpu, remedy)
    targets = [(n, m) for n, m in model.named_modules() if _is_fp8_layer(n) and type(m) is nn.Linear]
    for name, m in targets:
        if m.in_features % 16 or m.out_features % 16:
            raise FP8Unavailable(f"{name} is {m.in_features}x{m.out_features}; FP8 matmuls need both "
                                 f"dimensions divisible by 16. {remedy}")
    for name, m in targets:
        parent, child = name.rsplit(".", 1)
        # attention's output (cuDNN's, opaque to inductor) quantized by our one-pass row kernel under quant ours
        # the operands an op of ours produces (the docstring); under 'ours' the FP8 SwiGLU MLP takes w12's and w3's
        grad_kernel = recipe == "rowwise" and (name.endswith("attn.qkv") or (name.endswith("mlp.w12")
                                                                           and quant != "ours"))
        input_kernel = recipe != "tensorwise" and (name.endswith("attn.proj") or (name.endswith("mlp.w3")
                                                                                 and quant != "ours"))
        setattr(model.get_submodule(parent), child,
                FP8TrainingLinear(m, recipe, input_kernel=input_kernel, grad_kernel=grad_kernel))
    if quant == "ours":
        for name in [n.rsplit(".", 1)[0] for n, _ in targets if n.endswith(".mlp.w12")]:
            mlp = model.get_submodule(name)
            if isinstance(getattr(mlp, "w3", None), FP8TrainingLinear):
                parent, child = name.rsplit(".", 1)
                setattr(model.get_submodule(parent), child, FP8TrainingSwiGLUFFN(mlp, recipe))
    if targets and not getattr(model, "_fp8_refresh_hook", None):
        # outside any compiled graph; disabled here, not by a decorator, which would import torch._dynamo (2 s)
        # into every process that imports this module
        model._fp8_refresh_hook = model.register_forward_pre_hook(torch.compiler.disable(_refresh_before_forward))
    return model
