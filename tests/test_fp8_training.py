"""modeling.fp8.FP8TrainingLinear, fp8.backend: scaled_mm (CPU: torch._scaled_mm's emulation, so FP8's numerics).

Each GEMM (forward, dgrad, wgrad) is checked against a float64 computation of the same product from operands
quantized by an independent float64 quantizer written here (tight: only the fp32 accumulation and the bf16 output
rounding differ), and against the exact float64 linear (loose: the FP8 quantization error itself, a few %), on
the blocks' real widths with a ragged row count. Then: zero rows, the weight quantized once per optimizer step,
torch.compile (fullgraph) of the forward and backward, the conversion, refusals, and a tiny DiT trained through
the trainer in FP8 against bf16 on the same seed (docs/fp8.md)."""
import json
import math

import pytest
import torch
import torch.nn as nn

from kernels.fp8_linear import SCALED_MM_RECIPES, quantize_along
from modeling.fp8 import (FP8TrainingLinear, FP8TrainingSwiGLUFFN, FP8Unavailable, apply_fp8, apply_fp8_training,
                          check_fp8, refresh_fp8_weights, training_quant)

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
LAYERS = ("attn.qkv", "attn.proj", "mlp.w12", "mlp.w3")


def ref_quant(t, dim, dtype=E4M3, pow2=True):
    """Float64 dequantized t: scale from the amax over `dim` (None: the tensor), rounded up to a power of two
    (the rowwise recipes) or exactly amax / max (tensorwise)."""
    t = t.double()
    fmax = torch.finfo(dtype).max
    amax = t.abs().amax() if dim is None else t.abs().amax(dim=dim, keepdim=True)
    scale = amax.clamp(min=1e-12) / fmax
    if pow2:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    return (t / scale).clamp(-fmax, fmax).to(dtype).double() * scale


def reference(x, w, b, g, recipe):
    """(y, dx, dw) in float64 for the recipe: what the three _scaled_mm compute from their quantized operands."""
    if recipe == "tensorwise":
        xq, wq, gq = ref_quant(x, None, pow2=False), ref_quant(w, None, pow2=False), ref_quant(g, None, E5M2, False)
        y, dx, dw = xq @ wq.t(), gq @ wq, gq.t() @ xq
    else:
        y = ref_quant(x, 1) @ ref_quant(w, 1).t()            # x per token, W per output channel
        dx = ref_quant(g, 1) @ ref_quant(w, 0)               # dy per token, W per input channel
        if recipe == "rowwise":
            dw = ref_quant(g, 0).t() @ ref_quant(x, 0)       # dy per output channel, x per input channel
        else:  # rowwise_with_gw_hp: the weight gradient from bf16 operands
            dw = g.to(torch.bfloat16).double().t() @ x.to(torch.bfloat16).double()
    return (y if b is None else y + b.double()), dx, dw


def rel(a, b):
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


def make_linear(k, n, bias, seed):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(torch.linspace(0.2, 5.0, n).unsqueeze(1))  # output channels of different scale
    return lin


@pytest.mark.parametrize("recipe", SCALED_MM_RECIPES)
# hidden 1152 on one side of each (the XL width), the other cut from 3456 / 3072 to 432 / 384: the CPU's FP8 matmul
# emulation (per-tensor scales especially) runs at a few MFLOP/s
@pytest.mark.parametrize("k,n,bias", [(1152, 432, True), (384, 1152, False)], ids=["w12", "w3-nobias"])
def test_forward_backward_against_float64(k, n, bias, recipe):
    rows = 77  # ragged: not a multiple of 16 (the wgrad pads its contraction over the tokens)
    lin = make_linear(k, n, bias, k + n)
    m = FP8TrainingLinear(lin, recipe)
    assert m.weight is lin.weight and m.bias is lin.bias  # the master parameters themselves
    x = (torch.randn(rows, k) * torch.linspace(0.1, 10.0, rows).unsqueeze(1)).requires_grad_()
    g = torch.randn(rows, n) * torch.linspace(3.0, 0.01, rows).unsqueeze(1)  # rows of very different size
    y = m(x)
    y.backward(g)
    assert y.dtype == x.grad.dtype == m.weight.grad.dtype == torch.float32  # master weight, its grad: fp32
    ry, rdx, rdw = reference(x.detach(), lin.weight.detach(), lin.bias, g, recipe)
    # tight: the same quantized operands; the difference is fp32 accumulation and the bf16 GEMM output (2^-9)
    for got, want in ((y, ry), (x.grad, rdx), (m.weight.grad, rdw)):
        assert rel(got, want) < 4e-3, rel(got, want)
        torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=2e-3 * float(want.abs().max()))
    # loose: against the exact linear, the quantization error (e4m3: 3 mantissa bits; e5m2: 2)
    xd, wd = x.detach().double(), lin.weight.detach().double()
    ey, edx, edw = xd @ wd.t() + (0 if lin.bias is None else lin.bias.double()), g.double() @ wd, g.double().t() @ xd
    loose = {"rowwise": (0.05, 0.05, 0.05), "tensorwise": (0.06, 0.10, 0.10), "rowwise_with_gw_hp": (0.05, 0.05, 0.01)}
    for got, want, tol in zip((y, x.grad, m.weight.grad), (ey, edx, edw), loose[recipe]):
        assert rel(got, want) < tol, (rel(got, want), tol)
    assert rel(y, ey) > 5e-3 and rel(x.grad, edx) > 5e-3  # it really ran in FP8 (bf16 alone: ~2e-3)
    if lin.bias is not None:
        torch.testing.assert_close(m.bias.grad, g.sum(0))  # the bias stays out of FP8


def test_under_bf16_autocast_outputs_bf16_and_fp32_master_grads():
    lin = make_linear(256, 384, True, 1)
    m = FP8TrainingLinear(lin, "rowwise")
    x = torch.randn(2, 40, 256, requires_grad=True)  # fp32 activations (the residual stream), 3-d
    with torch.autocast("cpu", torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 40, 384)
    y.float().square().sum().backward()
    assert x.grad.dtype == torch.float32 and m.weight.grad.dtype == m.bias.grad.dtype == torch.float32
    ry, _, _ = reference(x.detach().reshape(80, 256).to(torch.bfloat16), lin.weight.detach(), lin.bias,
                         torch.zeros(80, 384), "rowwise")
    assert rel(y.float().reshape(80, 384), ry) < 6e-3


def test_bias_is_added_in_the_gemm_epilogue_under_autocast(monkeypatch):
    """In the bf16 step the bias goes into the forward _scaled_mm's epilogue (added to the fp32 accumulator before
    the one rounding, as cuBLAS's bf16 addmm adds it; no pass of its own over the activation): the output is that
    one call on the same quantized operands, bit for bit, and the bias gradient the fp32 sum of the output's
    gradient over the tokens. The FP8 SwiGLU MLP's w3 likewise (its input from the SwiGLU's own quantization)."""
    from kernels import ops
    from modeling.lightningdit import SwiGLUFFN
    torch.manual_seed(3)
    m = FP8TrainingLinear(make_linear(64, 96, True, 2), "rowwise")
    mlp = FP8TrainingSwiGLUFFN(SwiGLUFFN(64, 128), "rowwise")
    x = torch.randn(32, 64, requires_grad=True)
    biases, scaled_mm = [], torch._scaled_mm  # which forward GEMMs got a bias (the CPU's numerics cannot tell)
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: biases.append(k.get("bias")) or scaled_mm(*a, **k))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # (the expected calls in the same context: the CPU's
        y, y3 = m(x), mlp(x)                            # _scaled_mm rounds differently under autocast)
    monkeypatch.setattr(torch, "_scaled_mm", scaled_mm)
    # m, then the MLP's w12 and w3: each one call, its bias (as bf16) in it
    assert [b is not None and torch.equal(b, lin.bias.detach().bfloat16())
            for b, lin in zip(biases, (m, mlp.w12, mlp.w3))] == [True] * 3 and len(biases) == 3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x12 = mlp.w12(x).detach()
        x_q, x_scale = quantize_along(x.detach().to(torch.bfloat16), -1, pow2=True)
        h_q, h_scale, _ = ops.swiglu_fp8_colmax(x12, pow2=True)
        expected = [torch._scaled_mm(a_q, lin.weight_fp8.t(), scale_a=a_scale, scale_b=lin.weight_scale,
                                     bias=lin.bias.detach().to(torch.bfloat16), out_dtype=torch.bfloat16,
                                     use_fast_accum=True)
                    for lin, a_q, a_scale in ((m, x_q, x_scale), (mlp.w3, h_q, h_scale))]
    for out, lin, expect in ((y, m, expected[0]), (y3, mlp.w3, expected[1])):
        assert out.dtype == torch.bfloat16
        assert torch.equal(out, expect)
        g = torch.randn_like(out)
        out.backward(g)
        assert lin.bias.grad.dtype == torch.float32 and torch.equal(lin.bias.grad, g.float().sum(0))


@pytest.mark.parametrize("recipe", SCALED_MM_RECIPES)
def test_zero_rows(recipe):
    """No tokens at all (an empty batch), and all-zero tokens: finite, exact zeros where the input is zero."""
    m = FP8TrainingLinear(make_linear(64, 96, True, 2), recipe)
    x = torch.zeros(0, 64, requires_grad=True)
    y = m(x)
    y.sum().backward()
    assert y.shape == (0, 96) and x.grad.shape == (0, 64)
    assert torch.equal(m.weight.grad, torch.zeros(96, 64)) and torch.equal(m.bias.grad, torch.zeros(96))
    m.zero_grad()
    x = torch.randn(5, 64)
    x[1] = 0
    x.requires_grad_()
    g = torch.randn(5, 96)
    g[3] = 0
    y = m(x)
    y.backward(g)
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all() and torch.isfinite(m.weight.grad).all()
    torch.testing.assert_close(y[1], m.bias.detach())  # a zero token gives the bias alone
    assert torch.equal(x.grad[3], torch.zeros(64))     # a zero gradient row gives a zero input gradient


def test_quantize_along_scales():
    x = torch.randn(6, 64) * torch.tensor([0.0, 1e-3, 1.0, 10.0, 1e3, 3e4]).unsqueeze(1)
    q, s = quantize_along(x, -1, pow2=True)
    assert q.dtype == E4M3 and s.shape == (6, 1) and s.dtype == torch.float32
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)  # powers of two: the rescale is exact
    assert float(q.float().abs().amax()) <= 448 and torch.equal(q[0].float(), torch.zeros(64))
    assert (q[1:].float().abs().amax(dim=1) >= 224).all()  # each row uses the top binade of e4m3
    torch.testing.assert_close(q.float() * s, x, rtol=0.07, atol=0.0)
    q, s = quantize_along(x.t(), 0, E5M2)  # along dim 0: one scale per column
    assert q.dtype == E5M2 and s.shape == (1, 6) and float(q.float().abs().amax()) == 57344


def _accumulate(m, opt, xs):
    for x in xs:  # gradient accumulation: several micro-batches, one optimizer step
        m(x).square().mean().backward()
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("optimizer", ["adamw", "adamw-fused", "adamw-foreach", "sgd"])
def test_weight_quantized_once_per_optimizer_step(optimizer):
    torch.manual_seed(0)
    m = FP8TrainingLinear(make_linear(128, 256, True, 3), "rowwise")
    opt = {"adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, foreach=False),
           "adamw-fused": lambda p: torch.optim.AdamW(p, lr=1e-2, fused=True),
           "adamw-foreach": lambda p: torch.optim.AdamW(p, lr=1e-2, foreach=True),
           "sgd": lambda p: torch.optim.SGD(p, lr=1e-2)}[optimizer](m.parameters())
    xs = [torch.randn(33, 128) for _ in range(4)]
    _accumulate(m, opt, xs)
    assert m.weight_quantizations == 1  # 4 micro-batches, one quantization
    before = m.weight_fp8.clone()
    _accumulate(m, opt, xs)
    assert m.weight_quantizations == 2  # the step changed the weight: quantized again, once
    # (fused AdamW writes the weights without moving their version counters: the optimizer-step count sees it)
    assert not torch.equal(before.float(), m.weight_fp8.float())
    want, _ = quantize_along(m.weight.detach(), -1, pow2=True)  # the cache holds this step's weight...
    assert m.refresh_weight()  # ...(the last step changed it again: the next forward quantizes)
    assert torch.equal(m.weight_fp8.float(), quantize_along(m.weight.detach(), -1, pow2=True)[0].float())
    assert not torch.equal(want.float(), before.float())
    with torch.no_grad():
        m(xs[0])
    assert m.weight_quantizations == 3 and not m.refresh_weight()  # nothing changed since: no quantization
    with torch.no_grad():  # any in-place write (load_state_dict, a manual edit) is seen by the version counter
        m.weight.mul_(2)
    m(xs[0])
    assert m.weight_quantizations == 4
    m.load_state_dict({"weight": torch.ones(256, 128), "bias": torch.zeros(256)})
    m(xs[0])
    assert m.weight_quantizations == 5 and torch.equal(m.weight_fp8.float(), torch.full((256, 128), 256.0))  # 1 / 2^-8


def test_weight_operands_are_written_in_place_by_one_traceable_function(monkeypatch):
    """refresh_weight (row-wise) writes W's and W^T's e4m3 operands into the same buffers every step through
    fp8.rowwise_weight_quantizer (compiled on a GPU, where the plain ops are ~35 launches per weight); the function
    traces as one graph (fullgraph) and gives quantize_along's bits, here through AOT autograd (inductor's on the
    GPU: tests/test_kernels_gpu.py)."""
    from kernels import fp8_linear as fp8
    used = []
    real = fp8.rowwise_weight_quantizer
    monkeypatch.setattr(fp8, "rowwise_weight_quantizer", lambda device: used.append(device.type) or real(device))
    torch.manual_seed(0)
    m = FP8TrainingLinear(make_linear(80, 48, True, 3), "rowwise")  # N 48, K 80: ragged against any tile
    m.refresh_weight()
    bufs = [m.weight_fp8, m.weight_scale, m.weight_t_fp8, m.weight_t_scale]
    assert used == ["cpu"] and [tuple(b.shape) for b in bufs] == [(48, 80), (1, 48), (80, 48), (80, 1)]
    q, sc = quantize_along(m.weight.detach(), -1, pow2=True)
    qt, st = quantize_along(m.weight.detach().t().contiguous(), -1, pow2=True)
    for got, want in zip(bufs, (q, sc.reshape(1, -1), qt, st)):
        assert got.dtype == want.dtype and torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    with torch.no_grad():
        m.weight.mul_(3)
    assert m.refresh_weight() and all(a is b for a, b in zip(bufs, [m.weight_fp8, m.weight_scale, m.weight_t_fp8,
                                                                     m.weight_t_scale]))
    compiled = torch.compile(fp8.quantize_weight_rowwise, backend="aot_eager", fullgraph=True, dynamic=False)
    outs = [torch.empty_like(b) for b in bufs]
    compiled(m.weight.detach(), *outs)
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(outs, bufs))


def test_tensorwise_weight_operands_are_quantize_alongs_and_cast_in_one_traceable_function():
    """tensorwise: one scale (its IEEE reciprocal in plain ops: not a power of two) and the two casts of W by
    fp8.cast_both_ways (compiled on a GPU); quantize_along(w, None)'s bits, W^T the same bytes transposed."""
    from kernels import fp8_linear as fp8
    torch.manual_seed(0)
    m = FP8TrainingLinear(make_linear(80, 48, True, 3), "tensorwise")
    m.refresh_weight()
    q, sc = quantize_along(m.weight.detach(), None)
    assert m.weight_scale.shape == m.weight_t_scale.shape == () and m.weight_scale.item() == sc.item()
    assert m.weight_t_scale.item() == sc.item() and m.weight_scale is not m.weight_t_scale
    assert torch.equal(m.weight_fp8.view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(m.weight_t_fp8.view(torch.uint8), q.t().contiguous().view(torch.uint8))
    compiled = torch.compile(fp8.cast_both_ways, backend="aot_eager", fullgraph=True, dynamic=True)
    out = [torch.empty_like(m.weight_fp8), torch.empty_like(m.weight_t_fp8)]
    compiled(m.weight.detach(), torch.reciprocal(sc), *out)
    assert torch.equal(out[0].view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(out[1].view(torch.uint8), m.weight_t_fp8.view(torch.uint8))


def _eager_and_compiled(eager, comp, x, g):
    """One bf16-autocast forward + backward of `eager` and of `comp` under torch.compile(fullgraph=True):
    ((y, x) eager, (y, x) compiled, the compiled code of the forward and the backward); x carry the gradients."""
    from torch._inductor.utils import run_and_get_code
    torch._dynamo.reset()
    refresh_fp8_weights(comp)  # compiled code does not refresh (docs/fp8.md): the caller's eager hook does

    def step(mod, inp):
        with torch.autocast("cpu", torch.bfloat16):
            y = mod(inp)
        y.backward(g)
        return y

    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    ye = step(eager, xe)
    yc, codes = run_and_get_code(step, torch.compile(comp, fullgraph=True), xc)
    return (ye, xe), (yc, xc), codes


def test_compile_fullgraph_forward_and_backward(tmp_path, monkeypatch):
    """torch.compile(fullgraph=True) traces the autograd.Function: one graph, no break, the forward's compiled
    code with one _scaled_mm and the backward's with two (dgrad, wgrad); results as eager's up to inductor fusing
    the bias add (one bf16 rounding fewer), and as close to the float64 reference as eager's."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    lin = make_linear(128, 192, True, 4)
    eager, comp = FP8TrainingLinear(lin, "rowwise"), FP8TrainingLinear(make_linear(128, 192, True, 4), "rowwise")
    # bf16 activations, as autocast hands them on (an fp32 input's cast to bf16 would be elided by inductor)
    x = (torch.randn(2, 37, 128) * torch.linspace(0.1, 4, 37).view(1, 37, 1)).to(torch.bfloat16)
    g = torch.randn(2, 37, 192).to(torch.bfloat16)
    (ye, xe), (yc, xc), codes = _eager_and_compiled(eager, comp, x, g)
    assert [c.count("_scaled_mm(") for c in codes] == [1, 2]
    ry, rdx, rdw = reference(x.reshape(74, 128), lin.weight.detach(), lin.bias, g.reshape(74, 192), "rowwise")
    for got, want, ref in ((yc, ye, ry), (xc.grad, xe.grad, rdx), (comp.weight.grad, eager.weight.grad, rdw)):
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=4e-3 * float(want.abs().max()))
        assert rel(got.reshape(ref.shape), ref) < 6e-3 and rel(want.reshape(ref.shape), ref) < 6e-3
    torch.testing.assert_close(comp.bias.grad, eager.bias.grad)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_compile_fullgraph_with_the_gradient_kernel(tmp_path, monkeypatch, backend):
    """input_kernel and grad_kernel under torch.compile(fullgraph=True): the forward's and the backward's compiled
    code call our quantize_rows_cols_fp8 (opaque: inductor does not trace into it), with one and two _scaled_mm;
    with the reference (what auto runs on the CPU, or where compiled_choices prefers inductor) its plain ops are
    traced; results as eager's, as in the test above."""
    import kernels
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    lin = make_linear(128, 192, True, 5)
    eager = FP8TrainingLinear(lin, "rowwise", input_kernel=True, grad_kernel=True)
    comp = FP8TrainingLinear(make_linear(128, 192, True, 5), "rowwise", input_kernel=True, grad_kernel=True)
    x = (torch.randn(2, 37, 128) * torch.linspace(0.1, 4, 37).view(1, 37, 1)).to(torch.bfloat16)
    g = torch.randn(2, 37, 192).to(torch.bfloat16)
    with kernels.backend.active(backend):
        (ye, xe), (yc, xc), codes = _eager_and_compiled(eager, comp, x, g)
    assert [c.count("_scaled_mm(") for c in codes] == [1, 2]
    # ours: x both ways in the forward, dy in the backward; the reference: plain ops, fused by inductor
    assert all(("quantize_rows_cols_fp8" in c) == (backend == "triton") for c in codes)
    assert kernels.describe()["ops"]["quantize_rows_cols_fp8"] == backend
    for got, want in ((yc, ye), (xc.grad, xe.grad), (comp.weight.grad, eager.weight.grad)):
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=4e-3 * float(want.abs().max()))
    torch.testing.assert_close(comp.bias.grad, eager.bias.grad)


def tiny(hidden=96, depth=2):
    from modeling.lightningdit import LightningDiT
    model = LightningDiT(input_size=8, patch_size=1, in_channels=32, hidden_size=hidden, depth=depth, num_heads=2,
                         num_classes=10)
    with torch.no_grad():  # off the zero init (adaLN, final layer), so every matmul carries signal
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def test_conversion_converts_exactly_the_block_matmuls_and_trains():
    torch.manual_seed(0)
    model = tiny()
    keys, params = set(model.state_dict()), dict(model.named_parameters())
    plain = tiny()
    plain.load_state_dict(model.state_dict())
    assert apply_fp8(model, "scaled_mm", allow_cpu=True) is model  # the trainer's entry point
    converted = sorted(n for n, m in model.named_modules() if isinstance(m, FP8TrainingLinear))
    assert converted == sorted(f"blocks.{i}.{layer}" for i in range(2) for layer in LAYERS)
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if isinstance(m, nn.Linear)
               and n not in converted)  # embedders, adaLN, final layer untouched
    assert set(model.state_dict()) == keys and dict(model.named_parameters()) == params  # same keys, same tensors
    assert [m.recipe for m in model.modules() if isinstance(m, FP8TrainingLinear)] == ["rowwise"] * 8
    apply_fp8_training(model, "rowwise", allow_cpu=True)  # again: nothing left to convert, no second hook
    assert len(model._forward_pre_hooks) == 1

    x, t, y = torch.randn(3, 32, 8, 8), torch.rand(3), torch.tensor([1, 2, 10])
    gen = torch.Generator().manual_seed(1)
    out = model(x, t, y, generator=gen)
    ref = plain(x, t, y, generator=torch.Generator().manual_seed(1))
    assert 1e-3 < rel(out.detach(), ref.detach()) < 0.1
    out.square().mean().backward()
    ref.square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        if not p.requires_grad:  # the fixed positional embedding
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all()
        if p.grad.abs().sum() > 0:
            assert rel(p.grad, q.grad) < 0.15, (name, rel(p.grad, q.grad))


def test_refusals():
    with pytest.raises(FP8Unavailable, match="FP8-capable CUDA GPU.*fp8.backend: none"):
        apply_fp8_training(tiny(), "rowwise")  # a CPU and no emulation flag
    with pytest.raises(FP8Unavailable, match="FP8-capable CUDA GPU"):
        apply_fp8(tiny(), "scaled_mm")
    with pytest.raises(FP8Unavailable, match="not a scaled_mm recipe.*rowwise"):
        apply_fp8_training(tiny(), "delayed", allow_cpu=True)
    with pytest.raises(FP8Unavailable, match="not a scaled_mm recipe"):
        apply_fp8(tiny(), "scaled_mm", "mxfp8", allow_cpu=True)
    with pytest.raises(FP8Unavailable, match=r"blocks.0.mlp.w12 is 64x340.*divisible by 16"):
        apply_fp8_training(tiny(hidden=64), allow_cpu=True)
    model = tiny()
    assert not any(isinstance(m, FP8TrainingLinear) for m in model.modules())  # a refusal converts nothing
    assert "scaled_mm (ours" in check_fp8("scaled_mm", "cpu", allow_cpu=True, recipe="tensorwise")
    assert check_fp8("scaled_mm", "cpu", allow_cpu=True, recipe="tensorwise").endswith("recipe tensorwise")


def _trainer(tmp_path, *overrides):
    from modeling.config import load_config
    from train.dit_config import DiTTrainConfig
    from train.train_dit import Trainer
    cfg = load_config(DiTTrainConfig, "configs/dit_tiny_cpu.yaml", [
        f"checkpoint.dir={tmp_path}/ckpt", "checkpoint.resume=never", "checkpoint.export_reference=false",
        f"logging.dir={tmp_path}", "logging.progress_bar=false", "logging.tensorboard=false", "model.hidden_size=96",
        "train.precision=bf16", *overrides])
    return Trainer(cfg)


def test_trainer_refuses_clearly(tmp_path):
    from modeling.config import ConfigError
    with pytest.raises(FP8Unavailable, match="FP8-capable CUDA GPU.*fp8.backend: none"):
        _trainer(tmp_path / "a", "fp8.backend=scaled_mm")
    with pytest.raises(ConfigError, match="recipe 'delayed' does not fit backend 'scaled_mm'"):
        _trainer(tmp_path / "b", "fp8.backend=scaled_mm", "fp8.recipe=delayed", "fp8.allow_cpu=true")
    with pytest.raises(ConfigError, match="fp8.backend"):
        _trainer(tmp_path / "c", "fp8.backend=scaled-mm")


def test_trainer_zero3_refused(tmp_path):
    """ZeRO-3 partitions the weights between forwards: there is no whole weight to quantize once per step."""
    trainer = _trainer(tmp_path, "fp8.backend=scaled_mm", "fp8.allow_cpu=true", "train.zero_stage=3")
    with pytest.raises(FP8Unavailable, match="ZeRO-3.*zero_stage 0-2"):
        trainer.train_step(trainer.next_batch())


def test_fp8_training_exports_the_models_keys_only(tmp_path):
    """The exported reference checkpoint of an FP8 run: its "ema" has the model's keys, as "model" does, not the FP8
    linears' per-step weight operands (non-persistent buffers: 32 float8 / scale keys reached it before)."""
    trainer = _trainer(tmp_path, "fp8.backend=scaled_mm", "fp8.allow_cpu=true", "train.zero_stage=0")
    trainer.train_step(trainer.next_batch())
    ref = torch.load(trainer.export()["reference"], weights_only=True)
    model_keys = {k[len("module."):] for k in ref["model"]}
    assert set(ref["ema"]) == model_keys and not any("fp8" in k for k in model_keys)
    assert all(v.dtype == torch.float32 for v in ref["ema"].values())


@pytest.mark.parametrize("zero", [0, 2])
def test_trainer_quantizes_once_per_step_with_accumulation(tmp_path, zero):
    """Through the trainer: 4 micro-batches per step, the weights quantized once per step and the cache always
    this step's weights. ZeRO 2 copies updated weights in through .data (their version counters do not move:
    checked here), so the cache is keyed on the optimizer step count as well."""
    trainer = _trainer(tmp_path, "fp8.backend=scaled_mm", "fp8.allow_cpu=true", "train.global_batch=32",
                       "train.batch_per_gpu=8", f"train.zero_stage={zero}", "train.steps=4")
    assert trainer.grad_accum == 4 and "FP8 scaled_mm (ours: FP8TrainingLinear)" in trainer.describe()
    layers = [m for m in trainer.model.modules() if isinstance(m, FP8TrainingLinear)]
    assert len(layers) == 8
    qkv = trainer.model.blocks[1].attn.qkv
    for step in range(1, 5):
        version, before = qkv.weight._version, qkv.weight.detach().clone()
        assert trainer.train_step(trainer.next_batch())["applied"] == 1.0
        assert [m.weight_quantizations for m in layers] == [step] * 8
        # the weights the step just used were that step's weights (quantized from `before`)
        assert torch.equal(qkv.weight_fp8.float(), quantize_along(before, -1, pow2=True)[0].float())
    assert not torch.equal(before, qkv.weight.detach())
    if zero == 2:
        assert qkv.weight._version == version  # the case the optimizer-step key is there for
    assert refresh_fp8_weights(trainer.model) == 8
    assert torch.equal(qkv.weight_fp8.float(), quantize_along(qkv.weight.detach(), -1, pow2=True)[0].float())


def test_fp8_vs_bf16_loss_curves_through_the_trainer(tmp_path):
    """A tiny DiT, 30 steps on the CPU on the digits (lr 1e-3, so the loss moves; the synthetic latents have nothing
    to learn past their moments: their loss fell only while every synthetic batch was the same one), the same seed,
    data, noise and time draws:
    bf16 autocast vs bf16 + FP8 (ours, emulated), through bench.fp8_compare and the real trainer. A smoke, not the
    GPU's 2,000-step curve: every step's loss within 1% of bf16's (about the step-to-step noise of this curve),
    the last-quarter means within 0.5%, the curves not identical (FP8 really ran), the loss falling in both."""
    from bench.fp8_compare import main
    assert main(["--steps", "30", "--fp8-backend", "scaled_mm", "--fp8-recipe", "rowwise", "--fp8-quant", "ours",
                 "--out", str(tmp_path),
                 "--rtol", "0.005", "--data", "digits", "--set", "optim.lr=1e-3"]) == 0
    r = json.loads((tmp_path / "fp8_compare.json").read_text())
    assert r["steps"] == 30 and r["fp8"].startswith("scaled_mm (ours: FP8TrainingLinear)")
    assert "recipe rowwise" in r["fp8"] and r["fp8"].endswith("activation quantization ours")
    assert r["agree"] and r["tail_rel_diff"] < 0.005 and r["max_step_rel_diff"] < 0.01, r
    assert r["bf16_losses"] != r["fp8_losses"]
    for losses in (r["bf16_losses"], r["fp8_losses"]):
        assert all(math.isfinite(v) for v in losses) and sum(losses[-5:]) / 5 < 0.97 * losses[0], losses


# ------------------------------------------------------------------ fp8.quant ours: FP8TrainingSwiGLUFFN

def _mlp_pair(recipe, hidden=64, mlp_hidden=176, seed=0):
    """The same SwiGLU MLP converted with quant inline (FP8TrainingLinear w12 and w3 around the SwiGLU) and ours."""
    import copy
    from modeling.lightningdit import SwiGLUFFN

    class Holder(nn.Module):  # apply_fp8_training finds MLPs by their names: blocks.<i>.mlp
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Module()])
            self.blocks[0].mlp = SwiGLUFFN(hidden, mlp_hidden)

    torch.manual_seed(seed)
    base = Holder()
    with torch.no_grad():
        base.blocks[0].mlp.w3.weight.mul_(torch.linspace(0.2, 5.0, hidden).unsqueeze(1))
    inline, ours = copy.deepcopy(base), copy.deepcopy(base)
    apply_fp8_training(inline, recipe, allow_cpu=True, quant="inline")
    apply_fp8_training(ours, recipe, allow_cpu=True, quant="ours")
    return base.blocks[0].mlp, inline.blocks[0].mlp, ours.blocks[0].mlp


@pytest.mark.parametrize("recipe", ["rowwise", "rowwise_with_gw_hp"])
def test_fp8_swiglu_mlp_is_the_inline_mlp_in_fp32(recipe):
    """Our Triton kernels (interpreter) in fp32, ragged rows (69): the SwiGLU quantized in its own pass and
    recomputed for w3's weight gradient gives the inline path's output, input gradient and weight gradients bit for
    bit (w12's bias gradient up to fp32 summation order); parameters and keys are the MLP's own."""
    import kernels
    plain, inline, ours = _mlp_pair(recipe)
    assert type(ours) is FP8TrainingSwiGLUFFN and type(inline) is not FP8TrainingSwiGLUFFN
    assert ours.w12.weight is not plain.w12.weight and dict(ours.named_parameters()).keys() == \
        dict(plain.named_parameters()).keys()
    x = torch.randn(3, 23, 64) * torch.linspace(0.1, 4, 23).view(1, 23, 1)
    g = torch.randn(3, 23, 64)
    with kernels.backend.active("triton"):
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = inline(xa), ours(xb)
        ya.backward(g)
        yb.backward(g)
        op = "swiglu_fp8" if recipe == "rowwise_with_gw_hp" else "swiglu_fp8_colmax"  # (gw_hp: no h^T scales)
        assert kernels.describe()["ops"][op] == "triton"
    assert torch.equal(ya, yb) and torch.equal(xa.grad, xb.grad)
    for name in ("w12.weight", "w3.weight", "w3.bias"):
        assert torch.equal(inline.get_parameter(name).grad, ours.get_parameter(name).grad), name
    # (inline: w12's bias gradient summed by quantize_rows_cols_fp8's tiles, grad_kernel; ours: by torch)
    torch.testing.assert_close(ours.w12.bias.grad, inline.w12.bias.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("recipe", ["rowwise", "rowwise_with_gw_hp"])
def test_proj_input_through_the_row_kernel_is_the_same_linear(recipe):
    """input_kernel (attn.proj's input, attention's output; mlp.w3's, the SwiGLU's): with rowwise quantized both ways
    by kernels.ops.quantize_rows_cols_fp8 in the forward (x^T kept in e4m3 for the wgrad, not x in bf16), with
    rowwise_with_gw_hp per row by quantize_rows_fp8 (pow2): output and every gradient bit for bit the plain-ops
    quantization's, bf16 autocast, ragged rows."""
    import kernels
    lin = make_linear(1152, 1152, True, 7)
    plain, kern = FP8TrainingLinear(lin, recipe), FP8TrainingLinear(lin, recipe, input_kernel=True)
    # 34 rows: as ragged as 82 against the interpreter's 4-row tiles and the 16-row padding (2 left over in both,
    # two and a half 16-row blocks); the interpreter's cost is its programs, so rows x columns (82 rows: 23 s)
    x = (torch.randn(2, 17, 1152) * torch.linspace(0.1, 8, 17).view(1, 17, 1)).to(torch.bfloat16)
    g = torch.randn(2, 17, 1152)
    got = []
    for m in (plain, kern):
        m.weight.grad = m.bias.grad = None
        xi = x.clone().requires_grad_()
        with kernels.backend.active("triton"), torch.autocast("cpu", torch.bfloat16):
            y = m(xi)
        node = y.grad_fn  # (a reshape of) the FP8 linear's autograd node
        while "FP8LinearFunction" not in type(node).__name__:
            node = node.next_functions[0][0]
        kept = node.saved_tensors[0]  # what the backward keeps of x
        y.float().backward(g)
        got.append((y, xi.grad, m.weight.grad.clone(), m.bias.grad.clone()))
    op = "quantize_rows_cols_fp8" if recipe == "rowwise" else "quantize_rows_fp8"
    assert kernels.describe()["ops"][op] == "triton" and op in repr(kern)
    # rowwise: x^T in e4m3 (1152, 34 rows padded to 48); gw_hp: x in bf16 for its bf16 wgrad
    assert (kept.dtype, tuple(kept.shape)) == ((E4M3, (1152, 48)) if recipe == "rowwise"
                                               else (torch.bfloat16, (34, 1152)))
    for a, b in zip(*got):
        assert torch.equal(a, b)
    with pytest.raises(FP8Unavailable, match="tensorwise"):
        FP8TrainingLinear(lin, "tensorwise", input_kernel=True)


def test_output_gradient_through_the_rows_cols_kernel_is_the_same_linear():
    """grad_kernel (rowwise): the output gradient (attn.qkv's: our attention block's, opaque to inductor) quantized
    for dgrad and wgrad and summed for the bias by kernels.ops.quantize_rows_cols_fp8 in two passes: output, input
    and weight gradients bit for bit the plain ops' quantization; the bias gradient within fp32 rounding (the
    kernel sums in another order); bf16 autocast, ragged rows (34, padded to 48 for the wgrad). The conversion sets
    it on attn.qkv, and on mlp.w12 where our SwiGLU's backward writes its gradient (not under quant ours, whose FP8
    MLP writes it in plain ops); only for rowwise."""
    import kernels
    from modeling.lightningdit import LightningDiT
    lin = make_linear(1152, 432, True, 8)
    plain, kern = FP8TrainingLinear(lin, "rowwise"), FP8TrainingLinear(lin, "rowwise", grad_kernel=True)
    x = (torch.randn(2, 17, 1152) * torch.linspace(0.1, 8, 17).view(1, 17, 1)).to(torch.bfloat16)  # as above
    g = torch.randn(2, 17, 432) * torch.linspace(0.01, 20, 432)
    got = []
    for m in (plain, kern):
        m.weight.grad = m.bias.grad = None
        xi = x.clone().requires_grad_()
        with kernels.backend.active("triton"):  # (the backward too: the kernel runs there)
            with torch.autocast("cpu", torch.bfloat16):
                y = m(xi)
            y.float().backward(g)
        got.append((y, xi.grad, m.weight.grad.clone(), m.bias.grad.clone()))
    assert kernels.describe()["ops"]["quantize_rows_cols_fp8"] == "triton" and "quantize_rows_cols" in repr(kern)
    for a, b in zip(got[0][:3], got[1][:3]):
        assert torch.equal(a, b)
    torch.testing.assert_close(got[1][3], got[0][3], rtol=1e-6, atol=1e-6 * float(g.abs().sum((0, 1)).max()))
    for recipe in ("tensorwise", "rowwise_with_gw_hp"):
        with pytest.raises(FP8Unavailable, match="grad_kernel"):
            FP8TrainingLinear(lin, recipe, grad_kernel=True)
    for recipe, quant in (("rowwise", "ours"), ("rowwise", "inline"), ("rowwise_with_gw_hp", "ours"),
                          ("tensorwise", "inline")):
        model = LightningDiT(input_size=4, patch_size=1, in_channels=4, hidden_size=64, depth=2, num_heads=2,
                             num_classes=3, mlp_ratio=3.0)
        apply_fp8_training(model, recipe, allow_cpu=True, quant=quant)
        for flag, layers in (("grad_kernel", {("rowwise", "ours"): ("attn.qkv",),
                                              ("rowwise", "inline"): ("attn.qkv", "mlp.w12")}),
                             ("input_kernel", {("rowwise", "ours"): ("attn.proj",),
                                               ("rowwise", "inline"): ("attn.proj", "mlp.w3"),
                                               ("rowwise_with_gw_hp", "ours"): ("attn.proj",)})):
            flagged = {n for n, m in model.named_modules() if getattr(m, flag, False)}
            want = {f"blocks.{i}.{layer}" for i in (0, 1) for layer in layers.get((recipe, quant), ())}
            assert flagged == want, (flag, recipe, quant, flagged)


def test_fp8_swiglu_mlp_under_autocast_against_float64():
    """bf16 autocast as the trainer runs it: bf16 output, fp32 master gradients, within FP8's error of the exact
    float64 MLP and within a bf16 rounding of the inline path (the interpreter casts fp32 to bf16 by truncation in
    the inline path's Triton SwiGLU; the recomputation rounds to nearest)."""
    plain, inline, ours = _mlp_pair("rowwise", seed=3)
    x = torch.randn(2, 37, 64)
    g = torch.randn(2, 37, 64)
    outs = {}
    for name, m in (("inline", inline), ("ours", ours)):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", torch.bfloat16):
            y = m(xi)
        assert y.dtype == torch.bfloat16
        y.float().backward(g)
        assert m.w3.weight.grad.dtype == m.w12.weight.grad.dtype == torch.float32
        outs[name] = (y, xi.grad, m.w12.weight.grad, m.w3.weight.grad)
    xd = x.double().requires_grad_()
    w12, w3 = plain.w12.double(), plain.w3.double()
    a, b = w12(xd).chunk(2, dim=-1)
    yd = w3(torch.nn.functional.silu(a) * b)
    yd.backward(g.double())
    exact = (yd, xd.grad, w12.weight.grad, w3.weight.grad)
    for got_o, got_i, want in zip(outs["ours"], outs["inline"], exact):
        assert rel(got_o, want) < 0.08, rel(got_o, want)
        assert rel(got_o, got_i) < 0.03, rel(got_o, got_i)
    assert rel(outs["ours"][0], exact[0]) > 5e-3  # it ran in FP8


def test_fp8_swiglu_mlp_compiles_fullgraph(tmp_path, monkeypatch):
    """torch.compile(fullgraph=True) traces the MLP with the custom SwiGLU-FP8 op inside the autograd.Function:
    two _scaled_mm in the forward's code (w12, w3), four in the backward's; results as eager's."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    _, _, eager = _mlp_pair("rowwise", seed=4)
    _, _, comp = _mlp_pair("rowwise", seed=4)
    x = torch.randn(2, 37, 64).to(torch.bfloat16)
    g = torch.randn(2, 37, 64).to(torch.bfloat16)
    (ye, xe), (yc, xc), codes = _eager_and_compiled(eager, comp, x, g)
    assert [c.count("_scaled_mm(") for c in codes] == [2, 4]
    # inductor rounds the SwiGLU to bf16 once where eager torch rounds twice: some e4m3 values flip, ~2% apart
    for got, want in ((yc, ye), (xc.grad, xe.grad), (comp.w12.weight.grad, eager.w12.weight.grad),
                      (comp.w3.weight.grad, eager.w3.weight.grad)):
        assert rel(got, want) < 0.04, rel(got, want)
    plain = _mlp_pair("rowwise", seed=4)[0].double()
    assert rel(yc, plain(x.double())) < 0.1 and rel(ye, plain(x.double())) < 0.1  # two chained FP8 GEMMs


def test_fp8_quant_resolution_and_refusals():
    model = tiny()
    with pytest.raises(FP8Unavailable, match="tensorwise needs quant inline"):
        apply_fp8_training(model, "tensorwise", allow_cpu=True, quant="ours")
    with pytest.raises(FP8Unavailable, match="choose one of"):
        apply_fp8_training(model, "rowwise", allow_cpu=True, quant="fused")
    with pytest.raises(FP8Unavailable, match="torchao quantizes inline"):
        apply_fp8(model, "torchao", "rowwise", allow_cpu=True, quant="ours")
    assert not any(isinstance(m, FP8TrainingLinear) for m in model.modules())
    apply_fp8(model, "scaled_mm", "rowwise", allow_cpu=True, quant="ours")
    assert sum(isinstance(m, FP8TrainingSwiGLUFFN) for m in model.modules()) == 2
    assert sum(isinstance(m, FP8TrainingLinear) for m in model.modules()) == 8
    assert sorted(n for n, m in model.named_modules() if getattr(m, "input_kernel", False)) == \
        ["blocks.0.attn.proj", "blocks.1.attn.proj"]
    # auto: inline (measured faster through the trainer on an H200); ours where asked and the Triton kernels run
    assert training_quant("auto", "scaled_mm", "rowwise", "cpu") == "inline"
    assert training_quant("ours", "scaled_mm", "rowwise", "cpu") == "ours"
    assert training_quant("auto", "scaled_mm", "tensorwise", "cpu") == "inline"
    assert training_quant("auto", "torchao", "rowwise", "cpu") == "inline"
    assert training_quant("inline", "scaled_mm", "rowwise", "cpu") == "inline"
    with pytest.raises(FP8Unavailable, match="scaled_mm and a row-wise recipe"):
        training_quant("ours", "te", "delayed", "cpu")


def test_trainer_fp8_quant_from_config(tmp_path):
    from modeling.config import ConfigError
    trainer = _trainer(tmp_path / "a", "fp8.backend=scaled_mm", "fp8.allow_cpu=true", "fp8.quant=inline")
    assert "activation quantization inline" in trainer.describe()
    assert not any(isinstance(m, FP8TrainingSwiGLUFFN) for m in trainer.model.modules())
    trainer = _trainer(tmp_path / "b", "fp8.backend=scaled_mm", "fp8.allow_cpu=true")
    assert "activation quantization inline" in trainer.describe()  # auto
    trainer = _trainer(tmp_path / "b2", "fp8.backend=scaled_mm", "fp8.allow_cpu=true", "fp8.quant=ours")
    assert "activation quantization ours" in trainer.describe()
    assert sum(isinstance(m, FP8TrainingSwiGLUFFN) for m in trainer.model.modules()) == 2
    with pytest.raises(ConfigError, match="quant ours.*row-wise recipe"):
        _trainer(tmp_path / "c", "fp8.backend=scaled_mm", "fp8.recipe=tensorwise", "fp8.quant=ours")


@pytest.mark.parametrize("recipe", SCALED_MM_RECIPES)
def test_the_gemm_table_times_the_trainers_own_gemms(recipe):
    """bench.profile_step's train_gemm section times each GEMM of the step alone, on operands it makes beforehand: its
    forward, dgrad and wgrad give FP8TrainingLinear's output and gradients bit for bit (ragged tokens: the wgrad's
    padding), and its bf16 rows autograd's of the bf16 Linear -- the table times the trainer's multiplies, not
    stand-ins."""
    from bench.profile_step import RECIPE_GEMMS, training_gemm_calls
    torch.manual_seed(0)
    M, K, N = 37, 48, 80
    lin = nn.Linear(K, N)  # the fp32 master weight
    x = (2 * torch.randn(M, K)).to(torch.bfloat16).requires_grad_()
    g = torch.randn(M, N).to(torch.bfloat16)
    y = FP8TrainingLinear(lin, recipe)(x)
    y.backward(g)
    calls = training_gemm_calls(x.detach(), g, lin.weight.detach(), lin.bias.detach().to(torch.bfloat16))
    fwd, dgrad, wgrad = (calls[label]() for label in RECIPE_GEMMS[recipe])
    assert torch.equal(fwd, y) and torch.equal(dgrad, x.grad) and torch.equal(wgrad.float(), lin.weight.grad)
    assert y.abs().max() > 0 and x.grad.abs().max() > 0 and lin.weight.grad.abs().max() > 0
    xb, wb = x.detach().requires_grad_(), lin.weight.detach().to(torch.bfloat16).requires_grad_()
    yb = nn.functional.linear(xb, wb, lin.bias.detach().to(torch.bfloat16))
    yb.backward(g)
    fwd, dgrad, wgrad = (calls[label]() for label in RECIPE_GEMMS["bf16"])
    assert torch.equal(fwd, yb) and torch.equal(dgrad, xb.grad) and torch.equal(wgrad, wb.grad)
    assert all(callable(c) for c in calls.values()) and len(calls) == 11  # with the fast-accumulation what-ifs
