"""The kernels' edges that the per-op tests did not reach (each case here let a planted bug through before):
- eps where it belongs, at activations whose variance is eps's size (the norms, the qk-norm, the reference);
- widths whose second tile has masked lanes (C = 100), the statistics of the h a fused norm stored;
- the vectors loaded once per tile where N allows it (ONE_SAMPLE), and no write past an output's end (torch.empty
  handing out guarded buffers: the interpreter runs programs in order and hides such writes);
- the GPU's autotuned launch paths on the CPU (the tuner's choice faked, fresh memory reading as NaN): partial
  sums sized for the tile that ran, EVEN and EVEN_K from the tiles the launch may run;
- RoPE backward on tables whose channel pairs differ (the per-channel contract), and the choosers' decisions."""
import math
import os
from types import SimpleNamespace

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

import kernels  # noqa: E402
from kernels import (attention, backend, fused_norm, gated_residual, linear_swiglu, ops, qkv_rope,  # noqa: E402
                     reference, registry, rope, rope_attention, swiglu)

CUDA_LIKE = SimpleNamespace(is_cuda=True, device="cuda:0")


@pytest.fixture(autouse=True)
def _reset():
    yield
    kernels.set_backend("auto")
    kernels.set_attention(None)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def fwd_bwd_vs_float64(fn, ref, inputs, tol=2e-5):
    """fn(*inputs) vs ref on float64 copies: every output and every input's gradient within tol (relative)."""
    ref_in = [t.detach().double().requires_grad_() for t in inputs]
    out, want = fn(*inputs), ref(*ref_in)
    out, want = (out if isinstance(out, tuple) else (out,)), (want if isinstance(want, tuple) else (want,))
    gouts = [torch.randn_like(w) for w in want]
    for o, w in zip(out, want):
        assert torch.isfinite(o).all() and rel_err(o, w) < tol, rel_err(o, w)
    got = torch.autograd.grad([(o.double() * g).sum() for o, g in zip(out, gouts)], inputs)
    exp = torch.autograd.grad([(w * g).sum() for w, g in zip(want, gouts)], ref_in)
    for i, (a, b) in enumerate(zip(got, exp)):
        assert torch.isfinite(a).all() and rel_err(a, b) < 2 * tol, (i, rel_err(a, b))


# ---------------------------------------------------------------- eps placement (activations of RMS ~ sqrt(eps))

@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_norm_eps_where_the_variance_is_of_eps_size(kind):
    """RMS 1e-3: the variance (1e-6) is eps's size, so `1/sqrt(var + eps)` and `1/sqrt(var) + eps` differ by ~30%."""
    torch.manual_seed(0)
    B, N, C = 2, 37, 1152
    x = (1e-3 * torch.randn(B, N, C)).requires_grad_()
    w, mod = torch.randn(C).requires_grad_(), torch.randn(B, 6 * C).requires_grad_()
    call = lambda impl: lambda x, w, m: impl.norm_modulate(  # noqa: E731
        x, w if kind == "rms" else None, m[:, :C], m[:, C:2 * C], 1e-6, kind) + 0 * w.sum()
    fwd_bwd_vs_float64(call(fused_norm.TRITON), call(reference), [x, w, mod])


def test_reference_rms_norm_eps_is_torchs():
    x, w = 1e-3 * torch.randn(3, 72, dtype=torch.float64), torch.randn(72, dtype=torch.float64)
    torch.testing.assert_close(reference.rms_norm(x, w, 1e-6), torch.nn.functional.rms_norm(x, (72,), w, 1e-6))


def test_qkv_rope_qk_norm_eps_where_the_variance_is_of_eps_size():
    torch.manual_seed(1)
    B, N, H, D = 2, 17, 3, 72
    angle = torch.rand(N, D // 2).repeat_interleave(2, -1) * 6.283
    cos, sin = angle.cos(), angle.sin()
    qkv = (1e-3 * torch.randn(B, N, 3 * H * D)).requires_grad_()
    qw, kw = (1 + 0.3 * torch.randn(D)).requires_grad_(), (1 + 0.3 * torch.randn(D)).requires_grad_()
    fwd_bwd_vs_float64(lambda t, a, b: qkv_rope.qkv_rope_triton(t, cos, sin, H, a, b, 1e-6),
                       lambda t, a, b: reference.qkv_rope(t, cos.double(), sin.double(), H, a, b, 1e-6),
                       [qkv, qw, kw])


# ---------------------------------------------------------------- widths that are not 2^a + 2^b: tile B masked

@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_norm_at_a_width_with_masked_lanes(kind):
    """C = 100 = 64 + (36 of a 64-wide tile B): the masked lanes must stay out of the mean and the variance."""
    torch.manual_seed(2)
    B, N, C = 2, 37, 100
    x, y, mod = (torch.randn(B, N, C).requires_grad_(), torch.randn(B, N, C).requires_grad_(),
                 torch.randn(B, 6 * C).requires_grad_())
    call = lambda impl: lambda x, y, m: impl.gated_residual_norm_modulate(  # noqa: E731
        x, m[:, 2 * C:3 * C], y, None, m[:, :C], m[:, C:2 * C], 1e-6, kind)
    fwd_bwd_vs_float64(call(fused_norm.TRITON), call(reference), [x, y, mod])


# ---------------------------------------------------------------- the statistics are the stored h's

def test_norm_statistics_are_those_of_the_stored_h():
    """bf16 residual stream, fp32 weight/vectors: gated_residual_norm_modulate's out is bit for bit norm_modulate of
    the h it stored (the backward recomputes from that h with the forward's rstd)."""
    torch.manual_seed(3)
    B, N, C = 2, 37, 1152
    x, y, g = torch.randn(B, N, C).bfloat16(), torch.randn(B, N, C).bfloat16(), torch.randn(B, C).bfloat16()
    w, sh, sc = torch.randn(C), torch.randn(B, C), torch.randn(B, C)
    h, out = fused_norm.TRITON.gated_residual_norm_modulate(x, g, y, w, sh, sc, 1e-6, "rms")
    assert h.dtype == torch.bfloat16 and out.dtype == torch.float32
    assert torch.equal(out, fused_norm.TRITON.norm_modulate(h, w, sh, sc, 1e-6, "rms"))


def test_norm_forward_loads_the_vectors_once_per_tile_where_n_allows(monkeypatch):
    seen, kernel = [], fused_norm._norm_fwd_kernel

    class Recording:
        def __getitem__(self, grid):
            def launch(*a, **kw):
                seen.append(kw["ONE_SAMPLE"])
                return kernel[grid](*a, **kw)
            return launch
    monkeypatch.setattr(fused_norm, "_norm_fwd_kernel", Recording())
    for N in (32, 37):
        x, m = torch.randn(2, N, 72), torch.randn(2, 72)
        fused_norm.TRITON.norm_modulate(x, None, m, m, 1e-6, "rms")
    assert seen == [True, False]


# ---------------------------------------------------------------- no write past an output

@pytest.fixture
def guarded_empty(monkeypatch):
    """torch.empty hands out views of buffers 64 elements longer, the tail filled with 1024; yields the list of
    (buffer, numel) to check after the call."""
    real, bufs = torch.empty, []

    def empty(*size, dtype=None, device=None, **kw):
        shape = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
        if kw.get("memory_format") not in (None, torch.contiguous_format) or set(kw) - {"memory_format"} or \
                (dtype or torch.get_default_dtype()) not in (torch.float32, torch.bfloat16, torch.float16):
            return real(*size, dtype=dtype, device=device, **kw)
        n = math.prod(shape)
        buf = real(n + 64, dtype=dtype, device=device)
        buf[n:] = 1024.0
        bufs.append((buf, n))
        return buf[:n].view(shape)
    monkeypatch.setattr(torch, "empty", empty)
    yield bufs


@pytest.mark.parametrize("op", ["gated_residual", "swiglu"])
def test_kernels_write_nothing_past_their_outputs(op, guarded_empty):
    torch.manual_seed(4)
    if op == "gated_residual":
        x, y = (torch.randn(2, 37, 1152).requires_grad_() for _ in range(2))
        out = gated_residual.gated_residual_triton(x, torch.randn(2, 1152).requires_grad_(), y)
    else:
        x = torch.randn(2, 37, 400).requires_grad_()  # H = 200: a masked column tile
        out = swiglu.swiglu_triton(x, torch.randn(400).requires_grad_())
    out.backward(torch.ones_like(out))
    assert guarded_empty
    for buf, n in guarded_empty:
        assert (buf[n:] == 1024.0).all(), f"{op}: an output of {n} elements was written past its end"


# ---------------------------------------------------------------- the GPU launch paths (autotuned), on the CPU

def _fake_bench(prefer):
    def bench(*args, config, **meta):
        return [0.0 if prefer(config) else 1.0]
    return bench


@pytest.fixture
def poisoned():
    """Uninitialized memory reads as NaN (torch's deterministic mode fills empty tensors)."""
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


def test_swiglu_bias_gradient_with_the_autotuned_128_row_tile(monkeypatch, poisoned):
    """A tuned tile of 128 rows per program writes fewer partial-sum rows than the buffer (sized for 64) holds: only
    those it wrote are summed."""
    monkeypatch.setattr(swiglu._triton, "interpreting", lambda: False)
    monkeypatch.setattr(swiglu._bwd_tuned, "_bench", _fake_bench(lambda c: c.kwargs["ROWS_PER_PROGRAM"] == 128
                                                                 and c.kwargs["BLOCK_R"] == 2))
    monkeypatch.setattr(swiglu._bwd_tuned, "cache", {})
    torch.manual_seed(5)
    x12, b = torch.randn(130, 400).requires_grad_(), torch.randn(400).requires_grad_()
    fwd_bwd_vs_float64(swiglu.swiglu_triton, reference.swiglu, [x12, b])
    assert swiglu._bwd_tuned.best_config.kwargs["ROWS_PER_PROGRAM"] == 128


def test_qkv_rope_bias_gradient_with_an_autotuned_32_row_tile(monkeypatch, poisoned):
    monkeypatch.setattr(qkv_rope._triton, "interpreting", lambda: False)
    pick = _fake_bench(lambda c: c.kwargs["BLOCK_R"] == 32 and not c.kwargs["ROWS"] and c.num_warps == 4)
    for tuned in (qkv_rope._qkv_rope_fwd_tuned, qkv_rope._qkv_rope_bwd_tuned):
        monkeypatch.setattr(tuned, "_bench", pick)
        monkeypatch.setattr(tuned, "cache", {})
    torch.manual_seed(6)
    B, N, H, D = 2, 17, 3, 72  # 34 rows: 2 programs of 32, where the buffer holds 3 of BLOCK_R = 16
    angle = torch.rand(N, D // 2).repeat_interleave(2, -1) * 6.283
    cos, sin = angle.cos(), angle.sin()
    qkv, bias = torch.randn(B, N, 3 * H * D).requires_grad_(), torch.randn(3 * H * D).requires_grad_()
    fwd_bwd_vs_float64(lambda t, b: qkv_rope.qkv_rope_triton(t, cos, sin, H, None, None, 1e-6, b),
                       lambda t, b: reference.qkv_rope(t, cos.double(), sin.double(), H, None, None, 1e-6, b),
                       [qkv, bias])


def test_rope_attention_even_from_the_tiles_the_gpu_launch_may_run(monkeypatch):
    """On a GPU, EVEN (no row masks) is decided from the autotuners' tiles, not the interpreter's 16-row ones."""
    seen = []
    monkeypatch.setattr(rope_attention._triton, "interpreting", lambda: False)
    monkeypatch.setattr(rope_attention, "TUNED", SimpleNamespace(run=lambda n, grid, a, const: seen.append(
        (n, const["EVEN"]))))
    H, D = 1, 8
    for N in (48, 192, 256):
        cos, sin = torch.ones(N, D), torch.zeros(N, D)
        qkv = torch.randn(1, N, 3 * H * D)
        out, lse = rope_attention.rope_attention_forward(qkv, cos, sin, H)
        rope_attention.rope_attention_backward(torch.randn_like(out), qkv, out, lse, cos, sin, H)
    assert seen == [("fwd", False), ("bwd", False), ("fwd", False), ("bwd", True), ("fwd", True), ("bwd", True)]


def test_linear_swiglu_autotuned_k_block_that_does_not_divide_k(monkeypatch):
    """K = 96 with the tuned BLOCK_K = 64: the second K block is masked (EVEN_K from the tiles the tuner may run)."""
    import triton
    monkeypatch.setattr(linear_swiglu._triton, "interpreting", lambda: False)
    tuned = triton.autotune(configs=linear_swiglu._configs(), key=["M", "H", "K"])(
        linear_swiglu._linear_swiglu_gemm_kernel)
    tuned._bench = _fake_bench(lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"],
                                          c.num_warps) == (64, 128, 64, 4))
    monkeypatch.setattr(linear_swiglu, "_autotuned", tuned)
    torch.manual_seed(7)
    x, w = torch.randn(5, 96).requires_grad_(), (torch.randn(80, 96) / 10).requires_grad_()
    fwd_bwd_vs_float64(linear_swiglu.linear_swiglu_triton, reference.linear_swiglu, [x, w])


# ---------------------------------------------------------------- RoPE with per-channel tables

def test_rope_kernels_backward_on_unpaired_tables():
    """Tables whose channels 2i, 2i+1 differ: the transposed rotation takes sin[2i+1] for channel 2i."""
    torch.manual_seed(8)
    B, N, H, D = 1, 17, 2, 72
    cos, sin = torch.randn(N, D), torch.randn(N, D)
    q, k = torch.randn(B, H, N, D).requires_grad_(), torch.randn(B, H, N, D).requires_grad_()
    fwd_bwd_vs_float64(lambda q, k: rope.rope_qk_triton(q, k, cos, sin),
                       lambda q, k: reference.rope_qk(q, k, cos.double(), sin.double()), [q, k])
    qkv = (0.5 * torch.randn(B, N, 3 * H * D)).requires_grad_()
    fwd_bwd_vs_float64(lambda t: rope_attention.rope_attention_triton(t, cos, sin, H),
                       lambda t: reference.rope_attention(t, cos.double(), sin.double(), H), [qkv], tol=2e-6)


# ---------------------------------------------------------------- the choosers

def test_block_chooser_keeps_the_faster_measured_path(monkeypatch):
    times = {}
    monkeypatch.setattr(attention, "_time_block", lambda fn, qkv, H, reps=5: times[
        "split" if fn is attention._split else attention.FUSED_BLOCK])
    for i, (split, fused, want) in enumerate(((2.0, 1.0, attention.FUSED_BLOCK), (1.0, 2.0, "split"))):
        times.update({"split": split, attention.FUSED_BLOCK: fused})
        qkv = SimpleNamespace(shape=(2 + i, 256, 3 * 16 * 72), device="cuda:0", dtype=torch.bfloat16, is_cuda=True)
        assert attention._choose_block(qkv, 16) == want


def test_forcing_an_sdpa_kernel_keeps_the_split_path_whatever_was_measured(monkeypatch):
    monkeypatch.setattr(attention, "_choose_block", lambda qkv, H: attention.FUSED_BLOCK)
    kernels.set_backend("triton")
    kernels.set_attention("sdpa-math")
    N, H, D = 9, 2, 8
    qkv, cos, sin = torch.randn(1, N, 3 * H * D), torch.ones(N, D), torch.zeros(N, D)
    ops.rope_attention(qkv, cos, sin, H)
    assert kernels.describe()["ops"]["rope_attention"].startswith("split")


def test_explicit_cuda_backend_runs_the_extension_for_the_norms(monkeypatch):
    monkeypatch.setattr(backend, "cuda_status", lambda x=None: (True, ""))
    kernels.set_backend("cuda")
    assert kernels.resolve("rms_norm", CUDA_LIKE) == registry.get("rms_norm").impls["cuda"]
    assert kernels.describe()["ops"]["rms_norm"] == "cuda"
    assert kernels.resolve("swiglu", CUDA_LIKE) is swiglu.swiglu_triton
