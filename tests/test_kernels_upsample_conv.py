"""kernels.ops.upsample_conv: the VA-VAE decoder's nearest 2x + 3x3 conv as one 2x2-kernel conv of the four output
phases and a Triton interleave each way (CPU: the interpreter).

Forward and backward (dx, dweight, dbias) vs the reference (F.interpolate + conv) on float64 copies at awkward sizes:
odd and unequal sides (5 x 7), a one-row image, C_in != C_out, 72 channels, batch 2; NCHW and channels_last (the
output and dx keep the layout); fp32 tight, bf16 within a small multiple of the reference's own bf16 error; no bias.
The FLOPs the claim is about (FlopCounterMode), opcheck of both custom ops, one-line errors, dispatch through
kernels.ops and the model's Upsample.
"""
import os

import torch

if not torch.cuda.is_available():  # must precede the first import of the Triton kernels
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

import kernels  # noqa: E402
from kernels import ops, reference, upsample_conv  # noqa: E402
from test_kernels_group_norm import rel_err  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BF16_FACTOR = 2.0 if DEV == "cuda" else 4.0  # the interpreter truncates fp32 -> bf16 where the GPU rounds


@pytest.fixture(autouse=True)
def _restore_backend():
    yield
    kernels.set_backend("auto")


def make(B, C_in, C_out, H, W, layout, dtype, bias=True, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(B, C_in, H, W, device=DEV).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(C_out, C_in, 3, 3, device=DEV) / (3 * C_in ** 0.5)
    b = 0.3 * torch.randn(C_out, device=DEV) if bias else None
    return x.requires_grad_(), w.to(dtype).requires_grad_(), b.to(dtype).requires_grad_() if bias else None


def run(fn, x, w, b, gout):
    out = fn(x, w, b)
    leaves = [t for t in (x, w, b) if t is not None]
    grads = iter(torch.autograd.grad(out, leaves, gout.to(out.dtype)))
    return out, [next(grads) if t is not None else None for t in (x, w, b)]


def check(B, C_in, C_out, H, W, layout, dtype, bias=True):
    """ours vs the float64 reference; bf16 against the reference run in bf16's own error. On a GPU with cuDNN's
    TF32 off (fp32 means fp32 here; a training run leaves torch's default)."""
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=False, allow_tf32=False):
        _check(B, C_in, C_out, H, W, layout, dtype, bias)


def _check(B, C_in, C_out, H, W, layout, dtype, bias):
    x, w, b = make(B, C_in, C_out, H, W, layout, dtype, bias)
    gout = torch.randn(B, C_out, 2 * H, 2 * W, device=DEV).to(dtype)
    out, grads = run(upsample_conv.upsample_conv_triton, x, w, b, gout)
    d64 = [t.detach().double().requires_grad_() if t is not None else None for t in (x, w, b)]
    ref_out, ref_grads = run(reference.upsample_conv, *d64, gout.double())
    assert out.dtype == dtype and out.shape == (B, C_out, 2 * H, 2 * W)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt) and grads[0].is_contiguous(memory_format=fmt)  # x's layout
    if dtype == torch.float32:
        tol = [1e-5] * 4
    else:  # the reference in bf16: its own rounding, from the same inputs
        r_out, r_grads = run(reference.upsample_conv, x.detach().requires_grad_(), w.detach().requires_grad_(),
                             b.detach().requires_grad_() if b is not None else None, gout)
        tol = [BF16_FACTOR * max(rel_err(r, e), 1e-3)
               for r, e in zip([r_out, *r_grads], [ref_out, *ref_grads]) if r is not None]
    for i, (a, e) in enumerate(zip([out, *grads], [ref_out, *ref_grads])):
        if e is not None:
            assert rel_err(a, e) < tol[i], (i, rel_err(a, e), tol[i])


@pytest.mark.parametrize("layout", ["NCHW", "channels_last"])
@pytest.mark.parametrize("B,C_in,C_out,H,W", [(2, 24, 24, 5, 7), (1, 8, 12, 1, 3), (2, 72, 72, 4, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_forward_and_backward_vs_float64(B, C_in, C_out, H, W, layout, dtype):
    check(B, C_in, C_out, H, W, layout, dtype)


def test_without_bias_and_in_float64_to_rounding():
    x, w, _ = make(2, 16, 16, 3, 5, "NCHW", torch.float64, bias=False)
    g = torch.randn(2, 16, 6, 10, dtype=torch.float64, device=DEV)
    out, grads = run(upsample_conv.upsample_conv_triton, x, w, None, g)
    ref, ref_grads = run(reference.upsample_conv, x, w, None, g)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-13)
    for a, e in zip(grads[:2], ref_grads[:2]):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-13)


def test_phase_weights_are_the_3x3_taps_summed_per_phase():
    """Weff[2a+b] applied at its 2x2 window is the 3x3 kernel applied to the upsampled image, for every phase."""
    torch.manual_seed(1)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    eff, _ = upsample_conv.phase_weights(w, None)
    assert eff.shape == (12, 2, 2, 2)
    rows = {0: [[0], [1, 2]], 1: [[0, 1], [2]]}  # which kernel rows (columns) each 2x2 tap sums, per parity
    for a in (0, 1):
        for b in (0, 1):
            for k in (0, 1):
                for m in (0, 1):
                    expect = sum(w[:, :, r, s] for r in rows[a][k] for s in rows[b][m])
                    torch.testing.assert_close(eff[(2 * a + b) * 3:(2 * a + b + 1) * 3, :, k, m], expect)


def test_fewer_flops_than_the_reference():
    """The claim: 2.25x fewer conv FLOPs (4 taps per output pixel instead of 9; (H+1)(W+1) positions per phase)."""
    from torch.utils.flop_counter import FlopCounterMode
    x, w, b = make(1, 32, 32, 32, 32, "NCHW", torch.float32)
    counts = []
    for fn in (reference.upsample_conv, upsample_conv.upsample_conv_triton):
        with FlopCounterMode(display=False) as c:
            fn(x, w, b).sum().backward()
        counts.append(c.get_total_flops())
    assert counts[1] / counts[0] == pytest.approx(16 * 33 * 33 / (36 * 32 * 32), rel=1e-3)  # 0.473; -> 0.444


def test_opcheck_custom_ops():
    y = torch.randn(2, 4 * 5, 4, 6, device=DEV, requires_grad=True)
    torch.library.opcheck(upsample_conv.phase_interleave_op, (y, 5))
    torch.library.opcheck(upsample_conv.phase_interleave_op,
                          (y.detach().contiguous(memory_format=torch.channels_last).requires_grad_(), 5))
    dout = torch.randn(2, 5, 6, 10, device=DEV)
    for cl in (False, True):
        torch.library.opcheck(upsample_conv.phase_interleave_bwd_op, (dout, cl))


def test_errors_are_one_line():
    x = torch.randn(1, 4, 3, 3, device=DEV)
    with pytest.raises(ValueError, match=r"3x3 weight \(C_out, C_in, 3, 3\); got x \(1, 4, 3, 3\), weight \(4, 5, 3, 3\)"):
        upsample_conv.upsample_conv_triton(x, torch.randn(4, 5, 3, 3, device=DEV), None)
    with pytest.raises(ValueError, match=r"bias \(3,\) is not \(4,\)"):
        upsample_conv.upsample_conv_triton(x, torch.randn(4, 4, 3, 3, device=DEV), torch.randn(3, device=DEV))
    with pytest.raises(ValueError, match="is not"):
        upsample_conv.phase_interleave_op(torch.randn(1, 7, 3, 3, device=DEV), 2)


def test_dispatch_and_the_models_upsample():
    """kernels.ops.upsample_conv runs ours under `triton` and the reference under `reference`; the decoder's
    Upsample calls it with its conv's parameters (their names unchanged: released checkpoints load)."""
    from modeling.vavae import Upsample
    up = Upsample(16).to(DEV)
    assert set(dict(up.named_parameters())) == {"conv.weight", "conv.bias"}
    x = torch.randn(2, 16, 3, 4, device=DEV)
    kernels.set_backend("reference")
    ref = up(x)
    assert kernels.describe()["ops"]["upsample_conv"] == "reference"
    kernels.set_backend("triton")
    out = up(x)
    assert kernels.describe()["ops"]["upsample_conv"] == "triton"
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ops.upsample_conv(x, up.conv.weight, up.conv.bias), out)
