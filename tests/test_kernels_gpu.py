"""GPU checks of the fused paths at training shapes (run by bench/gpu_suite.sh): every backend that is
available on the machine vs a float64 reference, forward and backward, bf16 and fp32, and one XL block
training step fused vs reference (also with the fused RoPE attention kernel forced); the attention block's chooser
timing both of its paths at XL's head shape."""
import pytest
import torch

import kernels
from kernels import ops, reference

pytestmark = pytest.mark.gpu

BACKENDS = ["triton", "cuda"]


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _need(backend):
    kernels.set_backend(backend)
    if backend == "cuda":  # the suite builds the extension first; a missing build is a failure here
        ok, why = kernels.backend.cuda_status(torch.empty(1, device="cuda"))
        assert ok, why


@pytest.fixture(autouse=True)
def _reset():
    yield
    kernels.set_backend("auto")
    kernels.set_attention(None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtypes", [("bf16", "bf16", None), ("fp32", "bf16", None), ("fp32", "bf16", "bf16"),
                                    ("fp32", "fp32", None)])
@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("B, N", [(4, 257), (3, 256)])
def test_norm_family_on_gpu(backend, dtypes, kind, B, N):
    """x, y/vectors and (third) the out_dtype asked for: ("fp32", "bf16", "bf16") is the model under autocast (fp32
    residual stream, bf16 branch and adaLN vectors, the normalised output written in bf16 for the next GEMM and its
    gradient arriving in bf16: the CUDA extension's out_tv / dout_tv). 257 tokens: tiles straddle samples; 256
    (XL/1's): each Triton forward tile's rows are one sample's (ONE_SAMPLE: the adaLN vectors loaded once a tile)."""
    _need(backend)
    dt = {"bf16": torch.bfloat16, "fp32": torch.float32, None: None}
    tx, tv, to = dt[dtypes[0]], dt[dtypes[1]], dt[dtypes[2]]
    C = 1152
    x = torch.randn(B, N, C, device="cuda", dtype=tx, requires_grad=True)
    y = torch.randn(B, N, C, device="cuda", dtype=tv, requires_grad=True)
    w = (torch.rand(C, device="cuda", dtype=tx) + 0.5).requires_grad_() if kind == "rms" else None
    mod = torch.randn(B, 6 * C, device="cuda", dtype=tv, requires_grad=True)
    leaves = [t for t in (x, y, w, mod) if t is not None]

    def run(impl, x, y, w, m, to):
        h, out = impl.gated_residual_norm_modulate(x, m[:, 2 * C:3 * C], y, w, m[:, :C], m[:, C:2 * C], 1e-6, kind,
                                                   to)
        out2 = impl.norm_modulate(h, w, m[:, 3 * C:4 * C], m[:, 4 * C:5 * C], 1e-6, kind, to)
        return h, out, out2
    outs = run(ops, x, y, w, mod, to)
    assert kernels.describe()["ops"]["norm_modulate"] == backend
    assert to is None or outs[1].dtype == outs[2].dtype == to
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    rx, ry, *rest = ref_leaves
    rw, rm = (rest if kind == "rms" else (None, rest[0]))
    refs = run(reference, rx, ry, rw, rm, None)
    gouts = [torch.randn_like(r) for r in refs]
    tol = 2e-2 if torch.bfloat16 in (tx, tv) else 1e-4
    for o, r in zip(outs, refs):
        assert rel_err(o, r) < tol
    g = torch.autograd.grad(sum((o.double() * go).sum() for o, go in zip(outs, gouts)), leaves)
    gr = torch.autograd.grad(sum((r * go).sum() for r, go in zip(refs, gouts)), ref_leaves)
    for a, b in zip(g, gr):
        assert torch.isfinite(a).all() and rel_err(a, b) < 2 * tol


def test_cuda_norm_ops_opcheck():
    """The CUDA extension's norm ops (their schema, fake implementation and AOT dispatch against what they compute),
    as tests/test_kernels.py checks the Triton ones on the CPU: with the residual and both vectors, and plain."""
    _need("cuda")
    B, N, C = 2, 5, 1152
    r = lambda *s: torch.randn(*s, device="cuda")  # noqa: E731
    x, y, w, g, sh, sc = r(B, N, C), r(B, N, C), r(C), r(B, C), r(B, C), r(B, C)
    fwd, bwd = torch.ops.vavae.norm_fwd_cuda.default, torch.ops.vavae.norm_bwd_cuda.default
    grad = lambda *ts: [t.clone().requires_grad_() for t in ts]  # noqa: E731
    torch.library.opcheck(fwd, (*grad(x, g, y, w), None, *grad(sh, sc), 1e-6, True, None))
    torch.library.opcheck(fwd, (*grad(x), None, None, None, None, None, *grad(sc), 1e-6, False, torch.bfloat16))
    _, _, mean, rstd = fwd(x, g, y, w, None, sh, sc, 1e-6, True, None)
    torch.library.opcheck(bwd, (r(B, N, C), r(B, N, C), x, g, y, w, None, True, sc, mean, rstd, True))
    _, _, mean, rstd = fwd(x, None, None, None, None, None, sc, 1e-6, False, None)
    torch.library.opcheck(bwd, (r(B, N, C), None, x, None, None, None, None, False, sc, mean, rstd, False))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_elementwise_ops_on_gpu(dtype):
    _need("triton")
    B, H, N, D, C = 4, 16, 256, 72, 1152
    from modeling.lightningdit import VisionRotaryEmbeddingFast
    tables = VisionRotaryEmbeddingFast(D // 2, 16).cuda()
    qkv = torch.randn(B, N, 3, H, D, device="cuda", dtype=dtype, requires_grad=True)
    x12 = torch.randn(B, N, 6144, device="cuda", dtype=dtype, requires_grad=True)
    b12 = torch.randn(6144, device="cuda", requires_grad=True)
    x = torch.randn(B, N, C, device="cuda", dtype=dtype, requires_grad=True)
    gate = torch.randn(B, C, device="cuda", dtype=dtype, requires_grad=True)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    cases = [
        (lambda m, t: m.rope_qk(*t.permute(2, 0, 3, 1, 4).unbind(0)[:2], tables.freqs_cos, tables.freqs_sin), [qkv]),
        (lambda m, t: m.swiglu(t), [x12]),
        (lambda m, t, b: m.swiglu(t, b), [x12, b12]),  # w12's bias as the model hands it (fp32, the parameter's)
        (lambda m, a, g: m.gated_residual(a, g, a * 0.5), [x, gate]),
    ]
    for fn, leaves in cases:
        out = fn(ops, *leaves)
        ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
        ref = fn(reference, *ref_leaves)
        out, ref = (out if isinstance(out, tuple) else (out,)), (ref if isinstance(ref, tuple) else (ref,))
        gouts = [torch.randn_like(r) for r in ref]
        for o, r in zip(out, ref):
            assert rel_err(o, r) < tol
        g = torch.autograd.grad(sum((o.double() * go).sum() for o, go in zip(out, gouts)), leaves)
        gr = torch.autograd.grad(sum((r * go).sum() for r, go in zip(ref, gouts)), ref_leaves)
        for a, b in zip(g, gr):
            assert rel_err(a, b) < 2 * tol


@pytest.mark.parametrize("backend", BACKENDS)
def test_xl_block_train_step_fused_matches_reference(backend):
    from modeling.lightningdit import LightningDiTBlock, VisionRotaryEmbeddingFast
    torch.manual_seed(0)
    block = LightningDiTBlock(1152, 16).cuda()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.02)
    tables = VisionRotaryEmbeddingFast(36, 16).cuda()
    x, c = torch.randn(4, 256, 1152, device="cuda"), torch.randn(4, 1152, device="cuda")
    results = {}
    for name in ("reference", backend):
        _need(name) if name != "reference" else kernels.set_backend("reference")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = block(x, c, tables)
        grads = torch.autograd.grad(out.float().square().mean(), list(block.parameters()))
        results[name] = (out.float(), grads)
    (o1, g1), (o2, g2) = results["reference"], results[backend]
    assert rel_err(o2, o1) < 2e-2
    for a, b in zip(g2, g1):
        assert rel_err(a, b) < 5e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_xl_block_train_step_rope_fused_matches_reference(backend):
    """The same XL block step with the attention block forced to our fused RoPE attention kernel (the model's
    Attention -> ops.rope_attention -> kernels/rope_attention.py, forward and backward): as close to the reference
    backend as the other fused paths, and describe() says the fused kernel ran."""
    from modeling.lightningdit import LightningDiTBlock, VisionRotaryEmbeddingFast
    torch.manual_seed(0)
    block = LightningDiTBlock(1152, 16).cuda()  # no qk-norm: the fused kernel's case
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.02)
    tables = VisionRotaryEmbeddingFast(36, 16).cuda()
    x, c = torch.randn(4, 256, 1152, device="cuda"), torch.randn(4, 1152, device="cuda")
    results = {}
    for name in ("reference", backend):
        _need(name) if name != "reference" else kernels.set_backend("reference")
        kernels.set_attention("rope-fused" if name != "reference" else None)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = block(x, c, tables)
        grads = torch.autograd.grad(out.float().square().mean(), list(block.parameters()))
        results[name] = (out.float(), grads)
        if name != "reference":
            assert kernels.describe()["ops"]["rope_attention"] == "rope-fused (triton)"
    (o1, g1), (o2, g2) = results["reference"], results[backend]
    assert rel_err(o2, o1) < 2e-2
    for a, b in zip(g2, g1):
        assert rel_err(a, b) < 5e-2


def _rope_attention_reference(qkv, cos, sin, H, g, dtype):
    """(out, d qkv) of kernels.reference.rope_attention on a `dtype` copy of qkv (the tables stay fp32 unless the
    copy is float64: the model's bf16 path rotates in fp32 and rounds, as the fused kernel does)."""
    x = qkv.detach().to(dtype).requires_grad_()
    tabs = (cos.double(), sin.double()) if dtype == torch.float64 else (cos, sin)
    out = reference.rope_attention(x, *tabs, H)
    out.backward(g.to(dtype))
    return out.detach(), x.grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rope_attention_kernel_at_xl_shape(dtype):
    """The fused RoPE attention kernel (kernels/rope_attention.py, the autotuned sm_90 configurations) at
    LightningDiT-XL's head shape (16 heads of 72 over 256 tokens, batch 4), forward and d qkv against the reference
    in float64: fp32 (IEEE products) within rtol 1e-4 / atol 1e-5 of the max; bf16 no further from float64 than
    1.5x the reference's own error run in bf16 (SDPA on the same rounded q/k/v)."""
    from kernels.rope_attention import rope_attention_triton
    from modeling.lightningdit import VisionRotaryEmbeddingFast
    torch.manual_seed(0)
    B, N, H, D = 4, 256, 16, 72
    tables = VisionRotaryEmbeddingFast(D // 2, 16).cuda()
    cos, sin = tables.freqs_cos, tables.freqs_sin
    qkv = torch.randn(B, N, 3 * H * D, device="cuda").to(dtype).requires_grad_()
    g = torch.randn(B, N, H * D, device="cuda").to(dtype)
    out = rope_attention_triton(qkv, cos, sin, H)
    out.backward(g)
    dqkv = qkv.grad
    assert out.dtype == dqkv.dtype == dtype and out.shape == (B, N, H * D) and dqkv.shape == qkv.shape
    ref, dref = _rope_attention_reference(qkv, cos, sin, H, g, torch.float64)
    if dtype == torch.float32:
        for o, r in ((out, ref), (dqkv, dref)):
            torch.testing.assert_close(o, r.float(), rtol=1e-4, atol=1e-5 * max(1.0, r.abs().max().item()))
            assert rel_err(o, r) < 1e-5
    else:
        ref16, dref16 = _rope_attention_reference(qkv, cos, sin, H, g, torch.bfloat16)
        assert rel_err(out, ref) < 1.5 * rel_err(ref16, ref), (rel_err(out, ref), rel_err(ref16, ref))
        assert rel_err(dqkv, dref) < 1.5 * rel_err(dref16, dref), (rel_err(dqkv, dref), rel_err(dref16, dref))


def test_rope_attention_variants_agree_bit_for_bit():
    """The autotuners' variants of the fused RoPE attention at XL's head shape in bf16: the forward with k rotated
    per query block or once per head (K_ONCE) computes the same bits at the same tile; every backward config (dQ
    summed by a scratch's read-modify-write or by atomics in L2, at each stage count) the same bits when run twice
    (the atomics' order is the program's own: deterministic), and the variants the same dQ to rounding (on the GPU
    Triton folds the read-modify-write's add into the MMA's accumulator: another rounding order than the atomics')."""
    from kernels import rope_attention as ra
    from modeling.lightningdit import VisionRotaryEmbeddingFast
    torch.manual_seed(1)
    B, N, H, D = 4, 256, 16, 72
    tables = VisionRotaryEmbeddingFast(D // 2, 16).cuda()
    cos, sin = tables.freqs_cos, tables.freqs_sin
    qkv = torch.randn(B, N, 3 * H * D, device="cuda").bfloat16()
    tiles = {}
    for cfg in ra.FWD_CONFIGS:
        tile = (cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps)
        tiles.setdefault(tile, {})[cfg.kwargs["K_ONCE"]] = ra.rope_attention_forward(qkv, cos, sin, H, cfg)
    pairs = [v for v in tiles.values() if len(v) == 2]
    assert pairs, "no tile with both K_ONCE variants"
    for v in pairs:
        for a, b in zip(v[False], v[True]):
            assert torch.equal(a, b), (a.float() - b.float()).abs().max()
    out, lse = pairs[0][True]
    dout = torch.randn_like(out)
    grads = [ra.rope_attention_backward(dout, qkv, out, lse, cos, sin, H, cfg)[0]
             for cfg in ra.BWD_CONFIGS + ra.BWD_CONFIGS]
    n = len(ra.BWD_CONFIGS)
    assert n > 1 and any(c.kwargs["DQ_ATOMIC"] for c in ra.BWD_CONFIGS)
    for i, cfg in enumerate(ra.BWD_CONFIGS):
        assert torch.equal(grads[i], grads[n + i]), (cfg, "not deterministic")
        if i:  # another variant: dQ within a few bf16 roundings, dK and dV the same sums in the same order
            torch.testing.assert_close(grads[i].float(), grads[0].float(), rtol=2 ** -6,
                                       atol=2 ** -6 * float(grads[0].float().abs().max()), msg=str(cfg))


def test_rope_attention_chooser_times_both_paths_on_gpu():
    """prime_attention at XL's head shape (bf16, training) times the attention block's two paths, split (qkv_rope +
    the chosen attention kernel) and rope-fused (ours), forward + backward; ops.rope_attention under autocast then
    runs the faster one (describe() says which) and agrees with the reference backend within bf16 rounding."""
    from kernels import attention
    from modeling.lightningdit import VisionRotaryEmbeddingFast
    _need("triton")
    kernels.set_attention(None)  # (the suite may run with VAVAE_ATTENTION set: the chooser is under test)
    B, H, N, D = 4, 16, 256, 72
    kernels.prime_attention((B, H, N, D), torch.bfloat16, "cuda", training=True)
    # the block's key in measurements(), as kernels.attention._block_key makes it
    key = str(("rope_attention", f"cuda:{torch.cuda.current_device()}", torch.bfloat16, (B, H, N, D), "train"))
    timed = [v for k, v in attention.measurements().items() if k == key]
    assert len(timed) == 1, attention.measurements()
    times = timed[0]
    assert isinstance(times.get("split"), float) and isinstance(times.get("rope-fused"), float), times
    expect = "rope-fused (triton)" if times["rope-fused"] < times["split"] else "split: qkv_rope + attention"
    torch.manual_seed(0)
    tables = VisionRotaryEmbeddingFast(D // 2, 16).cuda()
    lin = torch.nn.Linear(H * D, 3 * H * D).cuda()
    x = torch.randn(B, N, H * D, device="cuda", requires_grad=True)
    results = {}
    for backend in ("triton", "reference"):
        kernels.set_backend(backend)
        with torch.autocast("cuda", dtype=torch.bfloat16):  # the qkv Linear's output is bf16: the primed key
            out = ops.rope_attention(lin(x), tables.freqs_cos, tables.freqs_sin, H)
        if backend == "triton":
            assert out.dtype == torch.bfloat16 and kernels.describe()["ops"]["rope_attention"] == expect, times
        results[backend] = out.float(), torch.autograd.grad(out.float().square().mean(), x)[0]
    (o1, g1), (o2, g2) = results["triton"], results["reference"]
    assert rel_err(o1, o2) < 2e-2 and rel_err(g1, g2) < 5e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_linear_swiglu_on_gpu(dtype):
    """The fused w12 GEMM + SwiGLU at XL/1's sizes (K 1152, H 3072; rows not a multiple of any tile) against
    float64, with the autotuned configurations the GPU picks."""
    from kernels.linear_swiglu import linear_swiglu_triton as linear_swiglu
    from kernels.reference import linear_swiglu as linear_swiglu_reference
    torch.manual_seed(0)
    x = torch.randn(2 * 256 + 7, 1152, device="cuda", dtype=dtype)
    w = (torch.randn(6144, 1152, device="cuda") / 1152 ** 0.5).to(dtype)
    b = torch.randn(6144, device="cuda", dtype=dtype)
    out = linear_swiglu(x, w, b)
    ref = linear_swiglu_reference(x.double(), w.double(), b.double())
    assert out.dtype == dtype and rel_err(out, ref) < (1e-2 if dtype == torch.bfloat16 else 1e-5)


def _flat(out):
    """An op's outputs as a flat tuple of tensors (the FP8 norms return (h, FP8Rows(values, scale)))."""
    return tuple(t for o in out for t in _flat(o)) if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("name", sorted(kernels.registry.registered()))
def test_every_registered_op_on_gpu_through_kernels_ops(name):
    """Each declared op's own bench case (tiny shapes, fp32) through kernels.ops under every fused backend it
    declares, against its reference in float64, forward and (where the op has one) backward: what resolve hands the
    models on a GPU (a review, 2026-12-05: the backward was not run here)."""
    op = kernels.registry.get(name)
    case = op.bench(kernels.registry.TINY, "cuda", torch.float32)
    d_inputs = [t.detach().double().requires_grad_(t.requires_grad) for t in case.inputs]
    ref = case.call(op.reference, *d_inputs)
    ref_outs = [o for o in _flat(ref) if o.requires_grad]
    gen = torch.Generator(device="cuda").manual_seed(0)
    gouts = [torch.randn(o.shape, generator=gen, device="cuda") for o in ref_outs]
    want = torch.autograd.grad(ref_outs, [t for t in d_inputs if t.requires_grad], [g.double() for g in gouts],
                               allow_unused=True) if case.backward else ()
    for backend in op.impls:
        _need(backend)
        out = case.call(getattr(ops, name), *case.inputs)
        for o, r in zip(_flat(out), _flat(ref)):
            assert rel_err(o, r) < 1e-4, (name, backend)
        if not op.records_itself:
            assert kernels.describe()["ops"][name] == backend
        if case.backward:
            outs = [o for o in _flat(out) if o.requires_grad]
            got = torch.autograd.grad(outs, [t for t in case.inputs if t.requires_grad], gouts, allow_unused=True)
            for i, (g, w) in enumerate(zip(got, want)):
                assert (g is None) == (w is None) and (w is None or rel_err(g, w) < 1e-4), (name, backend, i)


@pytest.mark.parametrize("rowwise", [True, False], ids=["rowwise", "tensorwise"])
def test_fp8_linear_on_gpu(rowwise):
    """The sampler's FP8Linear on an FP8 GPU, eager and compiled (the path generate runs): the same product as
    its fp32 dequantized reference, within the bf16 output's rounding; the quantization error against float64."""
    from modeling.fp8 import FP8Linear
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.fail("the GPU suite runs on an FP8 GPU (H100/H200)")
    torch.manual_seed(0)
    lin = torch.nn.Linear(1152, 3456, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    x = torch.randn(3, 257, 1152, device="cuda", dtype=torch.bfloat16)
    f = FP8Linear(lin, rowwise)
    ref = f.dequantized_reference(x)
    for fn in (f, torch.compile(f, dynamic=False)):
        y = fn(x)
        assert y.dtype == torch.bfloat16 and y.shape == (3, 257, 3456)
        torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()))
        exact = torch.nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double())
        assert float((y.double() - exact).norm() / exact.norm()) < 0.06


def test_fp8_quant_kernels_on_gpu():
    """quantize_rows_fp8 / swiglu_fp8 at the sampler's widths (attention output 1152, w12 output 2 x 3072), bf16:
    the same bytes and scales as the eager torch quantization (of our SwiGLU's output); FP8SwiGLUFFN eager and
    compiled (inductor around the custom ops, as the compiled sampler runs it) agree."""
    from kernels import fp8_quant
    from kernels.swiglu import swiglu_triton
    from modeling.fp8 import FP8SwiGLUFFN
    from modeling.lightningdit import SwiGLUFFN
    _need("triton")
    torch.manual_seed(0)
    x = torch.randn(4, 257, 1152, device="cuda", dtype=torch.bfloat16) * 3
    q, s = ops.quantize_rows_fp8(x)
    qr, sr = fp8_quant.quantize_rows_fp8_reference(x)
    assert torch.equal(q.view(torch.uint8), qr.view(torch.uint8)) and torch.equal(s, sr)
    x12 = torch.randn(4, 257, 6144, device="cuda", dtype=torch.bfloat16) * 3
    q, s = ops.swiglu_fp8(x12)
    qr, sr = fp8_quant.quantize_rows_fp8_reference(swiglu_triton(x12))
    assert torch.equal(q.view(torch.uint8), qr.view(torch.uint8)) and torch.equal(s, sr)
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.fail("the GPU suite runs on an FP8 GPU (H100/H200)")
    mlp = FP8SwiGLUFFN(SwiGLUFFN(1152, 3072).to("cuda", torch.bfloat16))
    h = torch.randn(4, 257, 1152, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        eager, compiled = mlp(h), torch.compile(mlp, dynamic=False, fullgraph=True)(h)
    torch.testing.assert_close(compiled.float(), eager.float(), rtol=1e-2, atol=1e-2 * float(eager.abs().max()))


def test_fp8_kernels_keep_nan_and_inf_on_gpu():
    """On the GPU the hardware's max.f32 takes the non-NaN operand: every FP8 kernel's amax and clamp must propagate
    NaN (max.NaN.f32) and the cast keep it (cvt.rn.satfinite: NaN stays NaN, +-inf becomes +-448). A NaN or inf in a
    row at the trainer's and sampler's widths comes out as torch's quantizer gives it on this device: NaN scale and
    values, inf scale; the other rows bit for bit (the FP8 norm against the norm kernel at the same tile)."""
    from kernels import fp8_quant, fused_norm
    from kernels.swiglu import swiglu_triton
    _need("triton")
    torch.manual_seed(0)

    def spoil(t):
        t = t.clone()
        flat = t.view(-1, t.shape[-1])
        flat[1, 5], flat[2, 7], flat[3, 9] = float("nan"), float("inf"), float("-inf")
        return t

    def same(q, s, qr, sr):
        nan = qr.float().isnan()
        return (torch.equal(q.float().isnan(), nan) and torch.equal(q.view(torch.uint8)[~nan], qr.view(torch.uint8)[~nan])
                and torch.equal(s.isnan(), sr.isnan()) and torch.equal(s[~s.isnan()], sr[~sr.isnan()]))

    x = spoil(torch.randn(4, 257, 1152, device="cuda", dtype=torch.bfloat16))
    for pow2 in (False, True):
        q, s = ops.quantize_rows_fp8(x, pow2=pow2)
        assert same(q, s, *fp8_quant.quantize_rows_fp8_reference(x, pow2=pow2)) and s[1].isnan() and s[2].isinf()
        x12 = spoil(torch.randn(4, 257, 6144, device="cuda", dtype=torch.float32))
        q, s = ops.swiglu_fp8(x12, pow2=pow2)  # against the unfused path: our SwiGLU's output, then quantize_fp8
        assert same(q, s, *fp8_quant.quantize_rows_fp8_reference(swiglu_triton(x12), pow2=pow2)) and s[1].isnan()
    q, s, colmax = ops.swiglu_fp8_colmax(x12, pow2=True)
    assert colmax[5].isnan() and colmax[7].isinf() and int(colmax.isfinite().sum()) == 3072 - 3
    g = spoil(torch.randn(4 * 257, 3456, device="cuda", dtype=torch.bfloat16))
    out, ref = ops.quantize_rows_cols_fp8(g, pow2=True), fp8_quant.quantize_rows_cols_fp8_reference(g, pow2=True)
    assert same(out[0], out[1], ref[0], ref[1]) and same(out[2], out[3], ref[2], ref[3]) and out[3][5].isnan()
    w, mod = torch.randn(1152, device="cuda", dtype=torch.bfloat16), torch.randn(4, 6 * 1152, device="cuda",
                                                                                 dtype=torch.bfloat16)
    rows = ops.norm_modulate_fp8(x, w, mod[:, :1152], mod[:, 1152:2304], 1e-6, "rms")
    assert int(rows.scale.isfinite().sum()) == 4 * 257 - 3
    # bit for bit against the norm kernel at the same tile (across tiles a row's sums are added in another order)
    tile = (8, 8)
    _, q, s = fp8_quant.norm_fp8(x, None, None, w, mod[:, :1152], mod[:, 1152:2304], 1e-6, True, tile)
    out = fused_norm._fwd_triton(x, None, None, w, None, mod[:, :1152], mod[:, 1152:2304], 1e-6, True, None, tile)[1]
    assert same(q.reshape(-1, 1152), s.reshape(-1, 1), *fp8_quant.quantize_fp8(out.reshape(-1, 1152), rowwise=True))


def test_norm_fp8_every_tile_on_gpu():
    """The FP8 sampler's block norms with the e4m3 rows, at XL/1's hidden 1152 in its bf16 model, 257 tokens (tiles
    straddle samples) and 256 (ONE_SAMPLE), with and without the gated residual: with every candidate tile the same h
    as the norm kernel's and the bytes and scales of quantize_fp8 on its bf16 output at the same tile (what the
    unfused path hands its FP8 Linear), bit for bit. Across tiles `tl.sum` adds a row in another order (the tile's
    register layout), so there the values agree to a rounding step of e4m3 and a rare byte differs."""
    from kernels import fp8_quant, fused_norm
    _need("triton")
    torch.manual_seed(0)
    C = 1152
    tiles = [(c.kwargs["BLOCK_M"], c.num_warps) for c in fp8_quant._prune_norm_fp8_tiles(
        fused_norm._tile_configs(), {}, BLOCK_A=1024, BLOCK_B=128)]
    assert len(tiles) >= 2
    for N in (257, 256):
        x, y = (torch.randn(2, N, C, device="cuda", dtype=torch.bfloat16) * 3 for _ in range(2))
        w, mod = torch.randn(C, device="cuda", dtype=torch.bfloat16), torch.randn(2, 6 * C, device="cuda",
                                                                                   dtype=torch.bfloat16)
        shift, scale, gate = mod[:, :C], mod[:, C:2 * C], mod[:, 2 * C:3 * C]
        for res in (True, False):
            g, yy = (gate, y) if res else (None, None)
            first = None
            for tile in tiles:
                h, out = fused_norm._fwd_triton(x, g, yy, w, None, shift, scale, 1e-6, True, None, tile)[:2]
                qr, sr = fp8_quant.quantize_fp8(out.reshape(-1, C), rowwise=True)
                hq, q, s = fp8_quant.norm_fp8(x, g, yy, w, shift, scale, 1e-6, True, tile)
                assert torch.equal(q.view(torch.uint8).reshape(-1, C), qr.view(torch.uint8)), (N, res, tile)
                assert torch.equal(s.reshape(-1, 1), sr) and (not res or torch.equal(hq, h)), (N, res, tile)
                deq = q.float().reshape(-1, C) * s.reshape(-1, 1)
                if first is None:
                    first = deq
                    continue
                # another tile: the same values to e4m3's step (2^-3 relative, 2^-9 of the row's scale near zero)
                bound = first.abs() / 8 + s.reshape(-1, 1) * 2.0 ** -9
                assert ((deq - first).abs() <= bound).all(), (N, res, tile)
                assert (deq != first).float().mean() < 1e-3, (N, res, tile)


def test_quantize_rows_cols_every_tile_on_gpu():
    """quantize_rows_cols_fp8 at the widths of qkv's and w12's output gradients (3456, 6144), bf16, 1027 rows (no
    tile's multiple; padded to 1040): with every candidate tile of the cast pass, the bytes and scales of the
    trainer's quantizer row-major and transposed (the padding zero), the column sums within fp32 rounding of
    float64's and the same bits whatever the cast's tile; attn.qkv with grad_kernel is the plain FP8 linear bit for
    bit but for its bias gradient (that sum's order)."""
    from kernels import fp8_quant
    from kernels.fp8_linear import quantize_along
    from modeling.fp8 import FP8TrainingLinear
    _need("triton")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.fail("the GPU suite runs on an FP8 GPU (H100/H200)")
    torch.manual_seed(0)
    for N in (3456, 6144):
        g = (torch.randn(1027, N, device="cuda") * torch.exp(2 * torch.randn(1027, 1, device="cuda"))
             * torch.exp(torch.randn(N, device="cuda"))).to(torch.bfloat16)
        qr, sr = quantize_along(g, -1, pow2=True)
        qtr, str_ = quantize_along(fp8_quant.pad_rows(g).t().contiguous(), -1, pow2=True)
        exact = g.double().sum(dim=0)
        sums = []
        for cast_tile in fp8_quant.ROWS_COLS_QUANT_TILES:
            q, s, qt, st, cs = fp8_quant.rows_cols_fp8(g, True, cast_tile)
            assert torch.equal(q.view(torch.uint8), qr.view(torch.uint8)) and torch.equal(s, sr), (N, cast_tile)
            assert torch.equal(qt.view(torch.uint8), qtr.view(torch.uint8)) and torch.equal(st, str_), \
                (N, cast_tile)
            assert qt.shape == (N, 1040) and (qt[:, 1027:].float() == 0).all()
            assert ((cs.double() - exact).abs() <= 1e-6 * g.double().abs().sum(dim=0) + 1e-30).all()
            sums.append(cs)
        assert all(torch.equal(c, sums[0]) for c in sums)  # the first pass's fixed tile: the same sums
        q, s, qt, st, cs = ops.quantize_rows_cols_fp8(g, pow2=True)  # the autotuned op
        assert torch.equal(qt.view(torch.uint8), qtr.view(torch.uint8)) and torch.equal(s, sr)
    lin = torch.nn.Linear(1152, 3456).cuda()
    x = torch.randn(4, 257, 1152, device="cuda", dtype=torch.bfloat16)
    outs = []
    for kern in (False, True):
        lin.weight.grad = lin.bias.grad = None
        xi = x.clone().requires_grad_()
        y = FP8TrainingLinear(lin, "rowwise", grad_kernel=kern)(xi)
        y.float().square().sum().backward()
        outs.append((y, xi.grad, lin.weight.grad.clone(), lin.bias.grad.clone()))
    assert all(torch.equal(u, v) for u, v in zip(outs[0][:3], outs[1][:3]))
    torch.testing.assert_close(outs[1][3], outs[0][3], rtol=1e-5, atol=1e-3)


def test_fp8_weight_operands_compiled_on_gpu_are_the_eager_bits():
    """FP8TrainingLinear's per-step weight quantization runs compiled on a GPU (fp8.weight_quantizer): at XL/1's four
    weight shapes the e4m3 operands and scales are the eager ops' bytes and quantize_along's, row-wise and
    tensorwise."""
    from kernels import fp8_linear as fp8
    quantize = fp8.rowwise_weight_quantizer(torch.device("cuda"))
    assert quantize is not fp8.quantize_weight_rowwise
    torch.manual_seed(0)
    for n, k in ((3456, 1152), (1152, 1152), (6144, 1152), (1152, 3072)):
        w = torch.randn(n, k, device="cuda") * 0.02
        w[0, 0] = 0.5  # one row and one column with a larger amax
        shapes = (((n, k), torch.float8_e4m3fn), ((1, n), torch.float32), ((k, n), torch.float8_e4m3fn),
                  ((k, 1), torch.float32))
        eager = [torch.empty(sh, dtype=dt, device="cuda") for sh, dt in shapes]
        compiled = [torch.empty(sh, dtype=dt, device="cuda") for sh, dt in shapes]
        fp8.quantize_weight_rowwise(w, *eager)
        quantize(w, *compiled)
        q, s = fp8.quantize_along(w, -1, pow2=True)  # the recipe's quantizer (the activations' too)
        qt, st = fp8.quantize_along(w.t().contiguous(), -1, pow2=True)
        for a, b, c in zip(compiled, eager, (q, s.reshape(1, -1), qt, st)):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), (n, k)
            assert torch.equal(b.view(torch.uint8), c.view(torch.uint8)), (n, k)
        # tensorwise: the scale in plain ops, the two casts compiled (fp8.cast_both_ways)
        tw = [torch.empty(sh, dtype=dt, device="cuda") for sh, dt in (((n, k), torch.float8_e4m3fn), ((), torch.float32),
                                                                      ((k, n), torch.float8_e4m3fn), ((), torch.float32))]
        fp8.weight_quantizer("tensorwise", torch.device("cuda"))(w, *tw)
        q, s = fp8.quantize_along(w, None)
        assert torch.equal(tw[0].view(torch.uint8), q.view(torch.uint8)) and torch.equal(tw[1], s), (n, k)
        assert torch.equal(tw[2].view(torch.uint8), q.t().contiguous().view(torch.uint8)) and torch.equal(tw[3], s)


def test_fp8_training_swiglu_mlp_on_gpu():
    """fp8.quant ours at XL/1's widths (1152 -> 2 x 3072 -> 1152), bf16 autocast, rows not a multiple of the tile:
    the power-of-two kernels give the trainer's quantizer's bytes; FP8TrainingSwiGLUFFN eager and compiled
    (fullgraph, as the trainer's blocks) agree with each other and with the inline path within FP8's rounding."""
    import copy
    from kernels.swiglu import swiglu_triton
    from kernels.fp8_linear import quantize_along
    from modeling.fp8 import FP8TrainingSwiGLUFFN, apply_fp8_training, refresh_fp8_weights
    from modeling.lightningdit import SwiGLUFFN
    _need("triton")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.fail("the GPU suite runs on an FP8 GPU (H100/H200)")
    torch.manual_seed(0)
    x12 = torch.randn(4, 257, 6144, device="cuda", dtype=torch.bfloat16) * 3
    q, s = ops.swiglu_fp8(x12, pow2=True)
    qt, st = quantize_along(swiglu_triton(x12).reshape(-1, 3072), -1, pow2=True)
    assert torch.equal(q.view(torch.uint8), qt.view(torch.uint8)) and torch.equal(s, st)
    q, s, col = ops.swiglu_fp8_colmax(x12, pow2=True)  # + each column's max |h|: atomics over 1,028 rows
    assert torch.equal(q.view(torch.uint8), qt.view(torch.uint8)) and torch.equal(s, st)
    assert torch.equal(col, swiglu_triton(x12).reshape(-1, 3072).float().abs().amax(dim=0))
    # attn.proj's input through our kernel (rowwise: both ways, x^T kept in e4m3): the same linear, bit for bit
    from modeling.fp8 import FP8TrainingLinear
    lin = torch.nn.Linear(1152, 1152).cuda()
    a = torch.randn(4, 257, 1152, device="cuda", dtype=torch.bfloat16)
    outs = []
    for kern in (False, True):
        lin.weight.grad = None
        ai = a.clone().requires_grad_()
        y = FP8TrainingLinear(lin, "rowwise", input_kernel=kern)(ai)
        y.float().square().sum().backward()
        outs.append((y, ai.grad, lin.weight.grad.clone()))
    assert all(torch.equal(u, v) for u, v in zip(*outs))

    holder = torch.nn.Module()
    holder.blocks = torch.nn.ModuleList([torch.nn.Module()])
    holder.blocks[0].mlp = SwiGLUFFN(1152, 3072).cuda()
    inline, ours = copy.deepcopy(holder), copy.deepcopy(holder)
    apply_fp8_training(inline, "rowwise", quant="inline")
    apply_fp8_training(ours, "rowwise", quant="ours")
    assert isinstance(ours.blocks[0].mlp, FP8TrainingSwiGLUFFN)
    compiled = copy.deepcopy(ours)
    refresh_fp8_weights(compiled)  # compiled code does not refresh: the trainer's eager pre-hook does
    run_compiled = torch.compile(compiled.blocks[0].mlp, fullgraph=True)
    h = torch.randn(4, 257, 1152, device="cuda")
    g = torch.randn(4, 257, 1152, device="cuda")
    grads = {}
    for name, fn, mod in (("inline", inline.blocks[0].mlp, inline), ("ours", ours.blocks[0].mlp, ours),
                          ("compiled", run_compiled, compiled)):
        hi = h.clone().requires_grad_()
        with torch.autocast("cuda", torch.bfloat16):
            y = fn(hi)
        y.float().backward(g)
        m = mod.blocks[0].mlp
        grads[name] = (y.float(), hi.grad, m.w12.weight.grad, m.w3.weight.grad)
    # compiled: inductor adds w12's bias in fp32 (one bf16 rounding fewer), and a bf16 ulp of w3's input moves its
    # e4m3 value by a whole e4m3 step where it sits near a rounding boundary: ~4% apart on the CPU's interpreter
    for a, b, c in zip(grads["ours"], grads["compiled"], grads["inline"]):
        assert rel_err(b, a) < 0.08 and rel_err(a, c) < 0.03, (rel_err(b, a), rel_err(a, c))


def test_swiglu_backward_tiles_agree_and_sum_the_bias_gradient():
    """Every backward tile the SwiGLU's autotuner may pick writes the same d x12 bits at XL/1's width in bf16 (rows
    not a multiple of any tile's), and the bias gradient from its per-program partial sums is the float64 sum of the
    gradient within fp32 summation error; without the bias the one-row tile and the others agree bit for bit."""
    from kernels import swiglu as sw
    torch.manual_seed(4)
    rows = 3 * 257
    x12 = torch.randn(rows, 6144, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(6144, device="cuda")
    dout = torch.randn(rows, 3072, device="cuda", dtype=torch.bfloat16)
    a, b = (x12.double() + bias.double()).chunk(2, -1)
    s, d = torch.sigmoid(a), dout.double()
    ref = torch.cat([d * b * s * (1 + a * (1 - s)), d * a * s], -1)
    got = [sw.swiglu_backward(dout, x12, bias, tile=t) for t in sw.BWD_TILES]
    assert rel_err(got[0][0], ref) < 1e-2
    for t, (dx, dbias) in zip(sw.BWD_TILES, got):
        assert torch.equal(dx, got[0][0]), t
        assert dbias.dtype == torch.float32 and rel_err(dbias, ref.sum(0)) < 1e-5, t
    plain = [sw.swiglu_backward(dout, x12, None, tile=t)[0] for t in sw.BWD_TILES_NO_BIAS + sw.BWD_TILES]
    assert all(torch.equal(p, plain[0]) for p in plain[1:])
    auto = sw.swiglu_backward(dout, x12, bias)  # the autotuned launch: one of the tiles, its partial rows summed
    assert torch.equal(auto[0], got[0][0]) and rel_err(auto[1], ref.sum(0)) < 1e-5


def test_qkv_rope_configs_agree_bit_for_bit():
    """Every config the qkv_rope autotuners may pick without qk-norm (per-head tiles and the row variant's) computes
    the same bits at XL/1's head shape in bf16 (rows not a multiple of any tile): the forward, and the backward from
    token-major gradients (SDPA's layout, every token's heads adjacent)."""
    from kernels import qkv_rope as qr
    torch.manual_seed(2)
    B, N, H, D = 3, 257, 16, 72
    angle = torch.rand(N, D // 2, device="cuda").repeat_interleave(2, dim=-1) * 6.283
    cos, sin = angle.cos(), angle.sin()
    qkv = torch.randn(B, N, 3 * H * D, device="cuda", dtype=torch.bfloat16)
    grads = [torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(3)]
    configs = qr._configs()
    assert any(c.kwargs["ROWS"] for c in configs) and any(not c.kwargs["ROWS"] for c in configs)
    outs = [qr.qkv_rope_forward(qkv, cos, sin, H, config=c) for c in configs]
    dqkv = [qr.qkv_rope_backward(*grads, cos, sin, None, None, None, 1e-6, torch.bfloat16, config=c)[0]
            for c in configs]
    for c, o, d in zip(configs[1:], outs[1:], dqkv[1:]):
        assert all(torch.equal(a, b) for a, b in zip(o, outs[0])), c
        assert torch.equal(d, dqkv[0]), c
    for c in configs:  # inference's q and k only (WITH_V=False): the same q and k
        q, k, v = qr.qkv_rope_forward(qkv, cos, sin, H, config=c, with_v=False)
        assert v is None and torch.equal(q, outs[0][0]) and torch.equal(k, outs[0][1]), c


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [72, 1152])
def test_plain_norms_on_head_views_against_float64(backend, dtype, D):
    """rms_norm and layer_norm (with its bias) through kernels.ops on each fused backend, on the strided head view
    the model's qk-norm reads (head_dim 72) and on rows of 1152, 37 tokens, forward and backward against float64:
    the CUDA extension's plain norms and its bias path were held to nothing but a tiny forward (a review,
    2026-12-05)."""
    _need(backend)
    torch.manual_seed(0)
    B, H, N = 2, 3, 37
    qkv = torch.randn(B, N, 3, H, D, device="cuda", dtype=dtype, requires_grad=True)
    w = (1 + 0.2 * torch.randn(D, device="cuda", dtype=dtype)).requires_grad_()
    b = (0.1 * torch.randn(D, device="cuda", dtype=dtype)).requires_grad_()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for kind in ("rms", "layer"):
        leaves = (qkv, w) if kind == "rms" else (qkv, w, b)

        def run(impl, qkv, w, b=None):
            x = qkv.permute(2, 0, 3, 1, 4)[0]  # (B, H, N, D), strided, as in Attention
            return impl.rms_norm(x, w, 1e-6) if kind == "rms" else impl.layer_norm(x, w, b, 1e-5)
        out = run(ops, *leaves)
        assert kernels.describe()["ops"][f"{kind}_norm"] == backend
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, leaves, grad)
        leaves64 = [t.detach().double().requires_grad_() for t in leaves]
        ref = run(reference, *leaves64)
        want = torch.autograd.grad(ref, leaves64, grad.double())
        assert out.dtype == dtype and rel_err(out, ref) < tol, (kind, rel_err(out, ref))
        for g, r in zip(got, want):
            assert rel_err(g, r) < 10 * tol, kind


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_every_attention_candidate_against_float64(dtype):
    """Each attention implementation the chooser can pick (FA3 / FA2 where installed, SDPA's cuDNN, flash,
    efficient, math), forced in turn, forward and backward at head_dim 72 and 257 tokens in the model's token-major
    layout, against float64 (a review, 2026-12-05: nothing held fa2/fa3 or the chooser's picks to float64). A
    kernel that does not take this dtype or head_dim is named, and at least math and one fused kernel must run."""
    from kernels import attention
    torch.manual_seed(0)
    B, N, H, D = 2, 257, 4, 72
    q, k, v = (torch.randn(B, N, H, D, device="cuda").transpose(1, 2).to(dtype).requires_grad_() for _ in range(3))
    grad = torch.randn(B, H, N, D, device="cuda", dtype=dtype)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = torch.softmax(q64 @ k64.transpose(-1, -2) / D ** 0.5, dim=-1) @ v64
    want = torch.autograd.grad(ref, (q64, k64, v64), grad.double())
    tol = (2e-2, 4e-2) if dtype == torch.bfloat16 else (1e-3, 2e-3)  # (forward, backward) relative errors
    ran, refused = [], {}
    for choice in attention._candidates(q):
        attention.set_attention(choice)
        try:
            out = ops.attention(q, k, v)
            got = torch.autograd.grad(out, (q, k, v), grad)
        except RuntimeError as e:  # e.g. flash with fp32, or a head_dim a kernel does not take
            refused[choice] = str(e).splitlines()[0][:120]
            continue
        finally:
            attention.set_attention(None)
        assert rel_err(out, ref) < tol[0], choice
        for g, w in zip(got, want):
            assert rel_err(g, w) < tol[1], choice
        ran.append(choice)
    assert "sdpa-math" in ran and len(ran) >= 2, (ran, refused)


@pytest.mark.parametrize("sdpa", ["sdpa-cudnn", "sdpa-flash", "sdpa-efficient"])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_qkv_rope_layout_through_each_sdpa_kernel(sdpa, qk_norm):
    """kernels.ops.qkv_rope at XL/1's head shape (16 x 72, bf16, rows not a multiple of its 16-token tile) into each
    SDPA kernel: every one accepts the token-major q/k/v and writes a token-major output (so the model's
    transpose(1, 2).reshape before the proj Linear is a view), forward and backward vs the reference path."""
    from kernels import attention
    B, N, H, D = 3, 257, 16, 72
    torch.manual_seed(0)
    qkv = torch.randn(B, N, 3 * H * D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    angle = torch.rand(N, D // 2, device="cuda").repeat_interleave(2, dim=-1) * 6.283
    cos, sin = angle.cos(), angle.sin()
    ws = [(1 + 0.2 * torch.randn(D, device="cuda")).requires_grad_() for _ in range(2)] if qk_norm else []
    attention.set_attention(sdpa)
    try:
        results = {}
        for backend in ("reference", "triton"):
            kernels.set_backend(backend)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                q, k, v = ops.qkv_rope(qkv, cos, sin, H, *ws)
                out = ops.attention(q, k, v)
            flat = out.transpose(1, 2).reshape(B, N, H * D)
            if backend == "triton":
                assert q.transpose(1, 2).is_contiguous() and out.transpose(1, 2).is_contiguous(), out.stride()
                assert flat.data_ptr() == out.data_ptr()
            grads = torch.autograd.grad(flat.float().square().mean(), [qkv, *ws])
            results[backend] = flat.float(), grads
        # inference (the sampler, no bias): v read where the qkv GEMM wrote it, a strided view; the output is
        # still token-major and the same as with v copied
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            q, k, v = ops.qkv_rope(qkv, cos, sin, H, *ws)
            assert v._base is not None and v.stride(2) == 3 * H * D
            out = ops.attention(q, k, v)
            copied = ops.attention(q, k, v.transpose(1, 2).contiguous().transpose(1, 2))
        assert out.transpose(1, 2).is_contiguous() and rel_err(out, copied) < 1e-3
    finally:
        attention.set_attention(None)
    (o1, g1), (o2, g2) = results["reference"], results["triton"]
    assert rel_err(o2, o1) < 2e-2
    for a, b in zip(g2, g1):
        assert rel_err(a, b) < 5e-2


def test_priming_times_v_in_the_layout_each_grad_mode_runs(monkeypatch):
    """kernels.prime_attention times the SDPA candidates on v as the model hands it: token-major like q and k in
    training, a strided view of the qkv output in inference (kernels.qkv_rope.v_of)."""
    from kernels import attention
    for name in ("_chosen", "_block_chosen", "_measured"):
        monkeypatch.setattr(attention, name, {})
    seen = {}
    real = attention._choose

    def spy(q, k, v):
        seen.setdefault(torch.is_grad_enabled(), v.stride())
        return real(q, k, v)
    monkeypatch.setattr(attention, "_choose", spy)
    H, D = 16, 72
    for training in (False, True):
        assert attention.prime((2, H, 256, D), torch.bfloat16, "cuda", training=training) is not None
    assert seen[False][2] == 3 * H * D and seen[True][2] == H * D, seen


@pytest.mark.parametrize("layout", ["NCHW", "channels_last"])
@pytest.mark.parametrize("C,hw", [(128, 128), (256, 64), (512, 16)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_upsample_conv_at_vae_shapes(C, hw, layout, dtype):
    """The decoder's Upsample as the 2x2 phase conv (cuDNN) + the Triton interleave compiled for the GPU, at the
    f16d32 decoder's Upsample inputs (128 ch at 128 px -> 256, 256 at 64, 512 at 16), batch 2, both layouts: forward
    and backward against float64 (fp32 tight with TF32 off; bf16 within 2x the reference's own bf16 error), output
    and dx in x's layout (test_kernels_upsample_conv.check)."""
    from test_kernels_upsample_conv import check
    check(2, C, C, hw, hw, layout, dtype)


@pytest.mark.parametrize("layout", ["NCHW", "channels_last"])
@pytest.mark.parametrize("C,hw", [(128, (256, 256)), (256, (64, 64)), (512, (16, 16))])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_group_norm_silu_at_vae_shapes(C, hw, layout, dtype):
    """The VA-VAE's GroupNorm + SiLU kernels as the GPU compiles and autotunes them (the SiLU's div.approx.f32 as
    PTX, kernels._triton.approx_div; tiles and chunks sized for ~2048 programs), at the f16d32 encoder/decoder's
    widest, middle and narrowest levels, batch 2, both layouts: forward and backward against float64 (fp32 tight;
    bf16 within 1.5x the reference's own bf16 error), outputs and dx in x's layout (test_kernels_group_norm.check)."""
    from test_kernels_group_norm import check
    check(C, hw, layout, dtype, silu=True)
