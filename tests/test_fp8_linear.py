"""modeling.fp8.FP8Linear, the sampler's FP8 inference linear (CPU: torch._scaled_mm's emulation).

Forward only (its weights are buffers). Checked against the dequantized product in fp32 (the same quantized
operands: only accumulation order and the bf16 output rounding differ) and against the float64 linear (the
quantization error itself), on the block's real widths and ragged row counts."""
import pytest
import torch
import torch.nn as nn

from kernels.fp8_quant import FP8_E4M3_MAX, quantize_fp8
from modeling.fp8 import FP8Linear, FP8Unavailable, apply_fp8_inference


@pytest.mark.parametrize("rowwise", [True, False], ids=["rowwise", "tensorwise"])
# hidden 1152 on one side of each (the XL width); the other side cut from 3456 / 3072 to 432 / 384: the CPU's FP8
# matmul emulation (per-tensor scales especially) runs at a few MFLOP/s
@pytest.mark.parametrize("k,n,rows,bias", [(1152, 432, 37, True), (384, 1152, 16, True), (96, 512, 5, False)])
def test_fp8_linear_forward(k, n, rows, bias, rowwise):
    torch.manual_seed(k + n + rows)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(torch.linspace(0.2, 5.0, n).unsqueeze(1))  # output channels of different scale
    lin = lin.to(torch.bfloat16).requires_grad_(False)
    x = (torch.randn(2, rows, k) * torch.linspace(0.1, 10.0, rows).view(1, rows, 1)).to(torch.bfloat16)
    f = FP8Linear(lin, rowwise=rowwise)
    y = f(x)
    assert y.shape == (2, rows, n) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), f.dequantized_reference(x), rtol=1e-2, atol=1e-2 * float(y.abs().max()))
    exact = torch.nn.functional.linear(x.double(), lin.weight.double(), None if lin.bias is None else lin.bias.double())
    err = (y.double() - exact).flatten(0, 1).norm(dim=1) / exact.flatten(0, 1).norm(dim=1)
    assert float(err.max()) < (0.06 if rowwise else 0.15), float(err.max())  # e4m3: 3 mantissa bits
    assert float(err.median()) > 1e-3  # it really ran in FP8 (bf16 alone is ~3e-3 per element, less per row)


def test_quantize_fp8_scales_and_zero_rows():
    x = torch.randn(6, 64) * torch.tensor([0.0, 1e-3, 1.0, 10.0, 1e3, 3e4]).unsqueeze(1)
    q, s = quantize_fp8(x, rowwise=True)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (6, 1) and s.dtype == torch.float32
    assert torch.isfinite(q.float()).all() and float(q.float().abs().amax()) == FP8_E4M3_MAX  # the range is used
    assert torch.equal(q[0].float(), torch.zeros(64))  # an all-zero row stays zero, no NaN
    torch.testing.assert_close(q.float() * s, x, rtol=0.07, atol=0.0)  # per element: within half an e4m3 step
    q, s = quantize_fp8(x, rowwise=False)
    assert s.shape == () and float(q.float().abs().amax()) == FP8_E4M3_MAX


def test_apply_fp8_inference_converts_only_the_block_matmuls():
    from modeling.lightningdit import LightningDiT
    m = LightningDiT(input_size=4, patch_size=1, in_channels=4, hidden_size=96, depth=2, num_heads=2,
                     num_classes=3)
    with torch.no_grad():  # off the zero init (adaLN, final layer), so the output depends on every matmul
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    m = m.to(torch.bfloat16).eval()
    x, t, y = torch.randn(2, 4, 4, 4, dtype=torch.bfloat16), torch.rand(2), torch.tensor([0, 2])
    with torch.no_grad():
        ref = m(x, t, y).float()
        apply_fp8_inference(m, "rowwise", allow_cpu=True)
        out = m(x, t, y).float()
    names = sorted(n for n, mod in m.named_modules() if isinstance(mod, FP8Linear))
    assert names == sorted(f"blocks.{i}.{layer}" for i in range(2)
                           for layer in ("attn.qkv", "attn.proj", "mlp.w12", "mlp.w3"))
    assert 0 < float((out - ref).norm() / ref.norm()) < 0.1
    with pytest.raises(FP8Unavailable, match="FP8-capable CUDA GPU"):
        apply_fp8_inference(m, "rowwise")
    with pytest.raises(FP8Unavailable, match="rowwise or tensorwise"):
        apply_fp8_inference(m, "delayed", allow_cpu=True)
