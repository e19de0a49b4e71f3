"""kernels.ops.group_norm_silu: the VA-VAE's GroupNorm(32) + SiLU as Triton kernels (CPU: the interpreter).

Forward and backward (dx, dweight, dbias) vs the reference on float64 copies at awkward sizes: 2 and 3 channels per
group (C=64 / 96 in 32 groups; 96 also leaves the interpreter's 64-wide channel block half masked), H*W = 35 and
63 (not multiples of the interpreter's 16-position tile or 32-position chunk: a last chunk that is a ragged tail
alone, and one with a whole tile before its tail), batch 2, NCHW and channels_last (the output and dx keep the
layout), SiLU on and off, weight/bias None; fp32 tight, bf16 within a small multiple of the reference's own bf16
error. A mean-shifted input (50 + randn) whose statistics a sum/sum-of-squares would cancel; (N, C, L) and
non-dense inputs; opcheck of both custom ops; one-line errors; dispatch through kernels.ops.
"""
import os

import torch

if not torch.cuda.is_available():  # must precede the first import of the Triton kernels
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

import kernels  # noqa: E402
from kernels import group_norm, ops, reference, registry  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
G, EPS = 32, 1e-6
# the interpreter truncates fp32 -> bf16 where the GPU rounds: up to twice the reference's rounding error there
BF16_FACTOR = 1.5 if DEV == "cuda" else 3.0


@pytest.fixture(autouse=True)
def _restore_backend():
    yield
    kernels.set_backend("auto")


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make(C, hw, layout, dtype, affine="both", shift=0.0, seed=0):
    """x (2, C, *hw) in `layout` and dtype, weight/bias fp32 (as autocast leaves the parameters) or None."""
    torch.manual_seed(seed)
    x = (shift + torch.randn(2, C, *hw, device=DEV)).to(dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last) if x.dim() == 4 else x.transpose(1, 2).contiguous().transpose(1, 2)
    w = (1 + 0.3 * torch.randn(C, device=DEV)) if affine in ("both", "weight") else None
    b = 0.3 * torch.randn(C, device=DEV) if affine == "both" else None
    return x.requires_grad_(), *(t.requires_grad_() if t is not None else None for t in (w, b))


def run(fn, x, w, b, silu, gout):
    """fn's output and the grads of (x, w, b) (None where absent) for the upstream grad gout."""
    out = fn(x, w, b, G, EPS, silu)
    leaves = [t for t in (x, w, b) if t is not None]
    grads = iter(torch.autograd.grad(out, leaves, gout.to(out.dtype)))
    return out, [next(grads) if t is not None else None for t in (x, w, b)]


def check(C, hw, layout, dtype, silu, affine="both", shift=0.0):
    x, w, b = make(C, hw, layout, dtype, affine, shift)
    gout = torch.randn(x.shape, device=DEV).to(dtype)
    kernels.set_backend("triton")
    out, grads = run(ops.group_norm_silu, x, w, b, silu, gout)
    assert kernels.describe()["ops"]["group_norm_silu"] == "triton"
    leaves64 = [t.detach().double().requires_grad_() if t is not None else None for t in (x, w, b)]
    ref, ref_grads = run(reference.group_norm_silu, *leaves64, silu, gout.double())
    cl = layout == "channels_last"
    assert out.dtype == dtype and out.shape == x.shape and torch.isfinite(out).all()
    if out.dim() == 4:
        assert out.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
        assert out.is_contiguous() != cl
    else:
        assert (out.transpose(1, 2) if cl else out).is_contiguous()
    assert grads[0].dtype == dtype and grads[0].stride() == out.stride()  # dx in x's layout
    for t, gr in zip((w, b), grads[1:]):
        assert (gr is None) == (t is None) and (t is None or gr.dtype == t.dtype and gr.shape == t.shape)
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
        for a, r in zip(grads, ref_grads):
            if a is not None:
                torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-4 * r.abs().max().item())
        return
    # bf16: the reference run in bf16 sets the scale of the rounding error; its parameters in bf16 too (CUDA's
    # GroupNorm refuses bf16 input with fp32 parameters, "expected scalar type BFloat16 but found Float"; the CPU's
    # takes them)
    leaves16 = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in (x, w, b)]
    ref16, ref16_grads = run(reference.group_norm_silu, *leaves16, silu, gout)
    pairs = [("out", out, ref16, ref)] + [(f"grad {i}", a, a16, r) for i, (a, a16, r)
                                          in enumerate(zip(grads, ref16_grads, ref_grads)) if a is not None]
    for name, a, a16, r in pairs:
        allowed = BF16_FACTOR * rel_err(a16, r) + 1e-6
        assert rel_err(a, r) <= allowed, f"{name}: rel err {rel_err(a, r):.2e} > {allowed:.2e}"


F32, BF16 = torch.float32, torch.bfloat16


@pytest.mark.parametrize("C,hw,layout,dtype,silu,affine", [
    (64, (5, 7), "NCHW", F32, True, "both"),
    (96, (7, 9), "channels_last", F32, True, "both"),
    (96, (5, 7), "NCHW", F32, False, "none"),
    (64, (7, 9), "channels_last", F32, False, "weight"),
    (96, (5, 7), "channels_last", F32, True, "none"),
    (96, (5, 7), "channels_last", BF16, True, "both"),
    (64, (7, 9), "NCHW", BF16, True, "both"),
    (96, (7, 9), "NCHW", BF16, False, "none"),
], ids=lambda v: str(v).replace("torch.", "").replace(" ", ""))
def test_group_norm_silu_vs_float64(C, hw, layout, dtype, silu, affine):
    check(C, hw, layout, dtype, silu, affine)


# masked lanes read x = 0, 50 standard deviations below the mean: e^-z overflows to inf there (numpy warns), and
# silu / its derivative give -0, as the GPU's approximate division does
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("layout", ["NCHW", "channels_last"])
def test_mean_shifted_input_keeps_its_statistics(layout):
    """x = 50 + randn: in fp32 a sum / sum of squares would lose the variance (E[x^2] - E[x]^2 cancels 2500 - 1 to
    ~1e-4 relative, ~3e-3 of the variance, ~1e-3 of the output); the Welford / Chan merges keep mean and rstd to
    fp32 rounding, and the output to the tight tolerance."""
    check(64, (7, 9), layout, F32, True, shift=50.0)
    x, w, b = make(64, (7, 9), layout, F32, shift=50.0)
    _, mean, rstd = group_norm.group_norm_silu_op(x.detach(), w.detach(), b.detach(), G, EPS, True)
    groups = x.detach().double().reshape(2, G, -1)
    torch.testing.assert_close(mean.double(), groups.mean(-1), rtol=1e-6, atol=0)
    torch.testing.assert_close(rstd.double(), (groups.var(-1, unbiased=False) + EPS).rsqrt(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("layout", ["NCHW", "channels_last"])
def test_three_dim_input(layout):
    """(N, C, L): channels_last meaning (N, L, C) memory, returned as its transpose, as x was."""
    check(64, (35,), layout, F32, True)


def test_non_dense_input_is_made_contiguous():
    x, w, b = make(64, (5, 14), "NCHW", F32)
    xs = x.detach()[..., ::2]  # (2, 64, 5, 7), neither layout
    out = group_norm.group_norm_silu_triton(xs, w.detach(), b.detach(), G, EPS)
    assert out.is_contiguous()
    torch.testing.assert_close(out, reference.group_norm_silu(xs, w.detach(), b.detach(), G, EPS), rtol=1e-4,
                               atol=1e-5)


@pytest.mark.parametrize("layout", ["NCHW", "channels_last"])
def test_opcheck(layout):
    x, w, b = make(64, (3, 5), layout, F32)
    torch.library.opcheck(torch.ops.vavae.group_norm_silu.default, (x, w, b, G, EPS, True))
    torch.library.opcheck(torch.ops.vavae.group_norm_silu.default, (x, None, None, G, EPS, False))
    _, mean, rstd = group_norm.group_norm_silu_op(x.detach(), w.detach(), b.detach(), G, EPS, True)
    dy = torch.randn(x.shape, device=DEV)  # NCHW whatever x's layout: the backward re-lays it out
    torch.library.opcheck(torch.ops.vavae.group_norm_silu_bwd.default,
                          (dy, x.detach(), w.detach(), b.detach(), mean, rstd, G, True))


def test_backward_is_one_op_with_no_zeros_for_the_statistics(record_ops):
    """mean and rstd are outputs without gradients: the backward is the one custom op, no zeros filled for them."""
    x = torch.randn(1, 64, 3, 3, device=DEV, requires_grad=True)
    w, b = (torch.randn(64, device=DEV, requires_grad=True) for _ in range(2))
    out = group_norm.group_norm_silu_triton(x, w, b, G, EPS, True)
    with record_ops() as rec:
        out.backward(torch.randn_like(out))
    assert [op for op in rec.ops if op.startswith("vavae.")] == ["vavae.group_norm_silu_bwd.default"], rec.ops
    assert not [op for op in rec.ops if "zeros" in op or "fill" in op], rec.ops


def test_bad_shapes_raise_one_line():
    x = torch.randn(2, 96, 5, 7, device=DEV)
    w = torch.ones(96, device=DEV)
    for args, match in (((x, w, w, 64), r"C=96 channels do not divide into num_groups=64"),
                        ((x, w[:-1], w, 32), r"weight must have shape \(C,\) = \(96,\); got \(95,\)"),
                        ((x, w, w[:-1], 32), r"bias must have shape \(C,\) = \(96,\)"),
                        ((x[0, 0], w, w, 32), r"needs x of shape \(N, C, H, W\) or \(N, C, L\); got \(5, 7\)"),
                        ((x.long(), w, w, 32), r"float32, bfloat16 or float16")):
        with pytest.raises(ValueError, match=match) as e:
            group_norm.group_norm_silu_triton(*args, EPS)
        assert "\n" not in str(e.value)


def test_declaration_and_bench_case():
    """The op is declared (reference signature, a triton implementation), resolves per backend, and its smoke
    bench case (channels_last, ragged 5x7) runs both ways to the same values."""
    import inspect
    op = registry.get("group_norm_silu")
    assert list(inspect.signature(op.impls["triton"]).parameters) == list(inspect.signature(op.reference).parameters)
    case = op.bench(registry.TINY, DEV, torch.float32)
    assert case.fwd_bytes == 2 * case.inputs[0].numel() * 4 and case.bwd_bytes == 3 * case.inputs[0].numel() * 4
    kernels.set_backend("reference")
    ref = case.call(ops.group_norm_silu, *[t.detach() for t in case.inputs])
    assert kernels.describe()["ops"]["group_norm_silu"] == "reference"
    kernels.set_backend("triton")
    assert registry.resolve("group_norm_silu", case.inputs[0]) is op.impls["triton"]
    out = case.call(ops.group_norm_silu, *[t.detach() for t in case.inputs])
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
