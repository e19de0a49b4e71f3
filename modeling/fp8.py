"""FP8 for the LightningDiT blocks, in training (the DiT trainer's `fp8:` section) and in sampling
(`--precision fp8`): Transformer Engine or torchao float8.

Only the blocks' big matmuls run in FP8 (attn.qkv, attn.proj, mlp.w12, mlp.w3); the embedders, adaLN and
the final layer stay in bf16, as they are small and precision sensitive. Parameter names do not change,
so checkpoints keep the reference keys. FP8 state lives in the modules' state dicts (TE's delayed-scaling
amax history is its `_extra_state`; torchao's tensorwise dynamic scaling keeps none), so the DeepSpeed
checkpoint carries it.

    apply_fp8(model, backend="torchao")           # GPU suite / trainer
    with fp8_context(backend, recipe): loss = ...  # TE needs fp8_autocast around the forward
    apply_fp8_inference(bf16_model, "rowwise")    # modeling.sampling.Sampler(precision="fp8"): FP8Linear
    apply_fp8(bf16_model, "torchao", "rowwise")   # the same through torchao's training modules (fp8_impl)

FP8Linear is the sampler's own inference linear: weights quantized once, activations quantized per call in
plain torch ops (so torch.compile fuses the amax and the cast into the kernel that produces the input),
one torch._scaled_mm per call. torchao's training modules re-quantize the weights on every call and keep
the activation quantization outside the producer's kernel; on an H200 they sampled no faster than bf16.

Asked for without the library, or on hardware without FP8 (compute capability < 8.9), this raises
FP8Unavailable with the reason. torchao also runs on the CPU (emulated through torch's CPU _scaled_mm;
useful for tests, not for speed) only when `allow_cpu=True`.
"""
import contextlib

import torch
import torch.nn as nn

FP8_LAYERS = ("attn.qkv", "attn.proj", "mlp.w12", "mlp.w3")
RECIPES = {"te": ("delayed", "current", "mxfp8"), "torchao": ("tensorwise", "rowwise", "rowwise_with_gw_hp")}


class FP8Unavailable(RuntimeError):
    pass


def _is_fp8_layer(name):
    return name.startswith("blocks.") and name.split(".", 2)[-1] in FP8_LAYERS


def default_recipe(backend):
    return RECIPES[backend][0]


TRAINER_REMEDY = "Set fp8.backend: none to train without FP8."


def check_fp8(backend, device, allow_cpu=False, remedy=TRAINER_REMEDY):
    """Raise FP8Unavailable unless `backend` can run FP8 on `device`; return a one-line description.
    remedy: the sentence that ends each refusal (what the caller's user can set instead)."""
    if backend not in RECIPES:
        raise FP8Unavailable(f"unknown FP8 backend {backend!r}; choose one of {sorted(RECIPES)}")
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
        return f"transformer_engine {getattr(te, '__version__', '?')} on {where}"
    try:
        import torchao
        from torchao.float8 import convert_to_float8_training  # noqa: F401
    except Exception as e:
        raise FP8Unavailable(f"FP8 backend torchao needs torchao (pip install torchao==0.18.0); "
                             f"importing it failed: {e}") from None
    return f"torchao {torchao.__version__} float8 on {where}"


def apply_fp8(model, backend="torchao", recipe=None, allow_cpu=False, remedy=TRAINER_REMEDY):
    """Convert the blocks' qkv / proj / w12 / w3 linears of `model` (in place) to FP8; returns model.
    (torchao's training modules: under no_grad they are the inference path too, dynamic scaling per call.)"""
    recipe = recipe or default_recipe(backend)
    device = next(model.parameters()).device
    check_fp8(backend, device, allow_cpu, remedy)
    if recipe not in RECIPES[backend]:
        raise FP8Unavailable(f"recipe {recipe!r} is not a {backend} recipe; choose one of {RECIPES[backend]}")
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


FP8_E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max


def quantize_fp8(x, rowwise):
    """x (rows, K) -> (e4m3 values, fp32 scale) with x ~= values * scale: one scale per row (shape (rows, 1)) or
    one for the tensor (shape ()). Plain torch ops: under torch.compile the amax, the division and the cast
    fuse into one kernel, and into the op that produced x."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True) if rowwise else xf.abs().amax()
    scale = amax.clamp(min=1e-12) / FP8_E4M3_MAX
    return (xf / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn), scale


class FP8Linear(nn.Module):
    """Inference-only replacement for a bf16 nn.Linear: y = x W^T + b with W held in e4m3 (quantized once, one
    scale per output channel or per tensor) and x quantized on every call the same way (per row or per
    tensor), multiplied by torch._scaled_mm (fp32 accumulation, bf16 output). Reference: the dequantized
    product (x_q * s_x) (W_q * s_w)^T + b, which `dequantized_reference` computes in fp32."""

    def __init__(self, linear, rowwise=True):
        super().__init__()
        self.in_features, self.out_features, self.rowwise = linear.in_features, linear.out_features, rowwise
        with torch.no_grad():
            w_q, w_scale = quantize_fp8(linear.weight.detach(), rowwise)
        self.register_buffer("weight_fp8", w_q)  # (N, K) row-major: its .t() is the column-major B _scaled_mm wants
        self.register_buffer("weight_scale", w_scale.reshape(1, -1) if rowwise else w_scale)  # (1, N) or ()
        bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)
        self.register_buffer("bias", bias)

    def forward(self, x):
        lead = x.shape[:-1]
        x_q, x_scale = quantize_fp8(x.reshape(-1, self.in_features), self.rowwise)
        y = torch._scaled_mm(x_q, self.weight_fp8.t(), scale_a=x_scale, scale_b=self.weight_scale, bias=self.bias,
                             out_dtype=torch.bfloat16, use_fast_accum=True)
        return y.reshape(*lead, self.out_features)

    def dequantized_reference(self, x):
        """What forward computes, in fp32 from the same quantized operands (for tests)."""
        x_q, x_scale = quantize_fp8(x.reshape(-1, self.in_features), self.rowwise)
        w = self.weight_fp8.float() * self.weight_scale.reshape(-1, 1)
        y = (x_q.float() * x_scale) @ w.t()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"scaling={'rowwise' if self.rowwise else 'tensorwise'}, bias={self.bias is not None}")


def check_scaled_mm(device, allow_cpu=False, remedy=TRAINER_REMEDY):
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


def apply_fp8_inference(model, recipe="rowwise", allow_cpu=False, remedy=TRAINER_REMEDY):
    """Replace the blocks' qkv / proj / w12 / w3 linears of a bf16 `model` (in place) by FP8Linear (recipe
    'rowwise' or 'tensorwise'); returns model. Inference only: the FP8 weights are buffers, not parameters."""
    if recipe not in ("rowwise", "tensorwise"):
        raise FP8Unavailable(f"recipe {recipe!r} is not an FP8 inference recipe; choose rowwise or tensorwise")
    check_scaled_mm(next(model.parameters()).device, allow_cpu, remedy)
    targets = [(n, m) for n, m in model.named_modules() if _is_fp8_layer(n) and isinstance(m, nn.Linear)]
    for name, m in targets:
        if m.in_features % 16 or m.out_features % 16:
            raise FP8Unavailable(f"{name} is {m.in_features}x{m.out_features}; FP8 matmuls need both "
                                 f"dimensions divisible by 16. {remedy}")
    for name, m in targets:
        parent, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), child, FP8Linear(m, rowwise=recipe == "rowwise"))
    return model


def te_recipe(recipe):
    from transformer_engine.common import recipe as r
    if recipe == "delayed":
        return r.DelayedScaling(fp8_format=r.Format.HYBRID, amax_history_len=16, amax_compute_algo="max")
    if recipe == "current":
        return r.Float8CurrentScaling()
    return r.MXFP8BlockScaling()


def fp8_context(backend, recipe=None):
    """The forward-pass context: TE's fp8_autocast for backend 'te', nothing otherwise."""
    if backend != "te":
        return contextlib.nullcontext()
    import transformer_engine.pytorch as te
    return te.fp8_autocast(enabled=True, fp8_recipe=te_recipe(recipe or default_recipe("te")))
