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

FP8TrainingLinear is the trainer's own: forward, dgrad and wgrad each one torch._scaled_mm (the GEMMs and their
autograd functions: kernels/fp8_linear.py), the weight quantized
once per optimizer step (cached; gradient-accumulation micro-batches reuse it), the activation and gradient
quantization in plain ops inside the autograd.Function (traced by torch.compile, so fused into their producers).

Asked for without the library, or on hardware without FP8 (compute capability < 8.9), this raises
FP8Unavailable with the reason. Ours and torchao also run on the CPU (emulated through torch's CPU _scaled_mm;
useful for tests, not for speed) only when `allow_cpu=True`.
"""
import contextlib
from typing import Any, Optional, Union

import torch
import torch.nn as nn

from kernels import ops
from kernels.fp8_linear import (SCALED_MM_RECIPES, FP8LinearFunction, FP8SwiGLUOutFunction, forward_mm, quantize_along,
                                weight_quantizer)
from kernels.fp8_quant import FP8Rows, quantize_fp8

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
# The GEMMs, their operands' quantization and the autograd functions are kernels/fp8_linear.py's.

# Bumped by every optimizer step in the process (a global torch.optim hook): a step may write the weights without
# touching their version counters (DeepSpeed's ZeRO copies updated partitions in through .data; torch's fused
# AdamW does not bump them either), so the cached FP8 weights are keyed on this as well as on the version counter.
_OPTIMIZER_STEPS = [0]
_STEP_HOOK = []


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    _OPTIMIZER_STEPS[0] += 1


def _install_step_hook() -> None:
    if not _STEP_HOOK:
        from torch.optim.optimizer import register_optimizer_step_post_hook
        _STEP_HOOK.append(register_optimizer_step_post_hook(_count_optimizer_step))


class FP8TrainingLinear(nn.Linear):
    """Training replacement for an nn.Linear (same `weight` / `bias` parameters, same state-dict keys) whose
    forward, dgrad and wgrad run in FP8 through torch._scaled_mm (FP8LinearFunction; `recipe` one of
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
        y = FP8LinearFunction.apply(x2, self.weight, self.bias, self.weight_fp8, self.weight_scale,
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
    from w12's output in the backward (FP8SwiGLUOutFunction): the bf16 SwiGLU output is neither written, read back
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
        y = FP8SwiGLUOutFunction.apply(x12.reshape(-1, x12.shape[-1]), w3.weight, w3.bias, w3.weight_fp8,
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
