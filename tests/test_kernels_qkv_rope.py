"""kernels.ops.qkv_rope: the qkv GEMM's output -> (qk RMSNorm) -> RoPE -> q, k, v in one Triton pass each way.

Forward and backward vs float64 on awkward sizes (batch 2, 17 tokens: not a multiple of the kernel's 16-token
tile, 3 heads, head_dim 72 (masked 128-wide tile) and 64), fp32 and bf16, with and without qk-norm; the token-major
layout of q/k/v and of attention's output; opcheck of both custom ops; a torch.compile(fullgraph=True) trace on the
CPU; the model's Attention on it (the reference backend still runs today's path, bitwise).
"""
import os

import torch

if not torch.cuda.is_available():  # must precede the first import of the Triton kernels
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

import kernels  # noqa: E402
from kernels import ops, qkv_rope, reference  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2}
B, N, H = 2, 17, 3


@pytest.fixture(autouse=True)
def _restore_backend():
    yield
    kernels.set_backend("auto")


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def tables(D, paired=True):
    """(N, D) cos/sin. paired: the model's layout (channels 2i, 2i+1 share an angle); otherwise every channel its
    own values (not even a rotation), which checks the per-channel formula, not just the paired special case."""
    if paired:
        angle = torch.rand(N, D // 2, device=DEV).repeat_interleave(2, dim=-1) * 6.283
        return angle.cos(), angle.sin()
    return torch.randn(N, D, device=DEV), torch.randn(N, D, device=DEV)


def check(D, dtype, norm, paired=True, w_dtype=None, bias=False):
    """ops.qkv_rope under the triton backend vs the reference on float64 copies: forward, d qkv, d weights (and,
    with `bias`, the qkv Linear's fp32 bias handed to the op, as the model does: added where qkv is read, its
    gradient summed by the backward's programs)."""
    torch.manual_seed(D + int(norm))
    cos, sin = tables(D, paired)
    qkv = torch.randn(B, N, 3 * H * D, device=DEV, dtype=dtype, requires_grad=True)
    w_dtype = w_dtype or dtype
    ws = [(1 + 0.3 * torch.randn(D, device=DEV)).to(w_dtype).requires_grad_() for _ in range(2)] if norm else []
    bs = [(0.5 * torch.randn(3 * H * D, device=DEV)).requires_grad_()] if bias else []
    kernels.set_backend("triton")
    args = lambda ws, bs: (*(ws or [None, None]), 1e-6, *(bs or [None]))  # noqa: E731
    out = ops.qkv_rope(qkv, cos, sin, H, *args(ws, bs))
    assert kernels.describe()["ops"]["qkv_rope"] == "triton"
    leaves64 = [t.detach().double().requires_grad_() for t in [qkv, *ws, *bs]]
    ref = reference.qkv_rope(leaves64[0], cos.double(), sin.double(), H,
                             *args(leaves64[1:1 + len(ws)], leaves64[1 + len(ws):]))
    ref_dtypes = [r.dtype for r in reference.qkv_rope(qkv.detach(), cos, sin, H,
                                                      *args([w.detach() for w in ws], [b.detach() for b in bs]))]
    ws = ws + bs
    gouts = [torch.randn_like(r) for r in ref]
    for i, (o, r) in enumerate(zip(out, ref)):
        assert o.shape == (B, H, N, D) and o.dtype == ref_dtypes[i] and torch.isfinite(o).all()
        assert o.transpose(1, 2).is_contiguous(), "q/k/v must be token-major (B, N, H, D) in memory"
        assert rel_err(o, r) < TOL[dtype], f"output {i} rel err {rel_err(o, r):.2e}"
    grads = torch.autograd.grad(sum((o.double() * g).sum() for o, g in zip(out, gouts)), [qkv, *ws])
    ref_grads = torch.autograd.grad(sum((r * g).sum() for r, g in zip(ref, gouts)), leaves64)
    for i, (a, b) in enumerate(zip(grads, ref_grads)):
        assert a.dtype == [qkv, *ws][i].dtype and a.shape == b.shape and torch.isfinite(a).all()
        assert rel_err(a, b) < 2 * TOL[dtype], f"grad {i} rel err {rel_err(a, b):.2e}"


@pytest.mark.parametrize("D", [72, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm", [False, True])
def test_qkv_rope_vs_float64(D, dtype, norm):
    check(D, dtype, norm)


@pytest.mark.parametrize("dtype,norm,rows", [(torch.float32, False, False), (torch.float32, False, True),
                                             (torch.float32, True, False), (torch.bfloat16, False, True),
                                             (torch.bfloat16, True, False)])
def test_qkv_rope_adds_the_linears_bias_and_sums_its_gradient(dtype, norm, rows, monkeypatch):
    """The qkv Linear's bias handed to qkv_rope (modeling.lightningdit.Attention), fp32 as the parameter is under
    autocast: added before the qk-norm and RoPE, and its gradient the sum of the backward's per-program partials,
    in both kernel families (the per-head tiles; the row variant, without qk-norm)."""
    monkeypatch.setattr(qkv_rope, "_INTERPRETER_ROWS", rows)
    check(72, dtype, norm, bias=True)


def test_qkv_rope_general_tables_and_autocast_weights():
    """Tables with unrelated values per channel (the kernel's pairing must match rotate_half, not lean on
    cos[2i] == cos[2i+1]); bf16 qkv with fp32 norm weights, as autocast gives them: q, k come out fp32 and v bf16,
    as the reference's type promotion makes them."""
    check(72, torch.float32, norm=True, paired=False)
    check(72, torch.bfloat16, norm=True, w_dtype=torch.float32)


def test_qkv_rope_matches_the_unfused_path_bitwise_in_fp32_without_norm():
    """No qk-norm, fp32: the same products and sums as the reference's rope, so equal bit for bit (forward)."""
    D = 72
    cos, sin = tables(D)
    qkv = torch.randn(B, N, 3 * H * D, device=DEV)
    fused = qkv_rope.qkv_rope_triton(qkv, cos, sin, H)
    for a, b in zip(fused, reference.qkv_rope(qkv, cos, sin, H)):
        assert torch.equal(a, b)


def test_attention_output_is_token_major_so_the_proj_input_is_a_view():
    """SDPA writes its output in q's layout (the CPU kernel always token-major; on a GPU cuDNN "with matching
    layout", flash and memory-efficient always token-major: tests/test_kernels_gpu.py checks those): with
    qkv_rope's q/k/v the model's transpose(1, 2).reshape(B, N, C) before the proj Linear is a view, no copy."""
    D = 72
    cos, sin = tables(D)
    qkv = torch.randn(B, N, 3 * H * D, device=DEV)
    q, k, v = qkv_rope.qkv_rope_triton(qkv, cos, sin, H)
    out = reference.attention(q, k, v)
    flat = out.transpose(1, 2).reshape(B, N, H * D)
    assert flat.data_ptr() == out.data_ptr() and flat._base is not None  # a view of attention's output


@pytest.mark.parametrize("norm,rows", [(False, False), (False, True), (True, False)])
def test_inference_leaves_v_where_the_qkv_gemm_wrote_it(norm, rows, monkeypatch):
    """Without autograd and without a bias (the sampler: modeling.lightningdit.linear_leaving_bias runs the whole
    Linear there) the kernel writes q and k only, and v is the reference's own view of qkv: q, k bit for bit the
    training path's, v the same values without a copy, attention the same output. With a bias, or recording
    gradients, v is written token-major as before. Both kernel families (the row variant without qk-norm)."""
    monkeypatch.setattr(qkv_rope, "_INTERPRETER_ROWS", rows)
    D = 72
    torch.manual_seed(3)
    cos, sin = tables(D)
    qkv = torch.randn(B, N, 3 * H * D, device=DEV, dtype=torch.bfloat16)
    ws = [(1 + 0.3 * torch.randn(D, device=DEV)).bfloat16() for _ in range(2)] if norm else [None, None]
    kernels.set_backend("triton")
    trained = ops.qkv_rope(qkv, cos, sin, H, *ws)  # recording gradients: q, k, v written
    with torch.no_grad():
        q, k, v = ops.qkv_rope(qkv, cos, sin, H, *ws)
        biased = ops.qkv_rope(qkv, cos, sin, H, *ws, 1e-6, torch.zeros(3 * H * D, device=DEV))
        assert torch.equal(reference.attention(q, k, v), reference.attention(*trained))
    assert kernels.describe()["ops"]["qkv_rope"] == "triton"
    for a, b, c in zip((q, k, v), trained, biased):
        assert torch.equal(a, b) and torch.equal(c, b)
    assert v._base is qkv and v.data_ptr() == qkv.data_ptr() + 2 * H * D * qkv.element_size()
    assert torch.equal(v, reference.qkv_rope(qkv, cos, sin, H)[2])
    for t in (q, k, trained[2], biased[2]):
        assert t.transpose(1, 2).is_contiguous()
    torch.library.opcheck(torch.ops.vavae.qk_rope.default, (qkv, cos, sin, H, *ws, 1e-6))
    with pytest.raises(ValueError, match="q and k alone only without a bias"):
        qkv_rope.qkv_rope_forward(qkv, cos, sin, H, bias=torch.zeros(3 * H * D, device=DEV), with_v=False)


def test_qkv_rope_rejects_bad_shapes_with_one_line():
    cos, sin = tables(72)
    qkv = torch.randn(B, N, 3 * H * 72, device=DEV)
    with pytest.raises(ValueError, match=r"3\*H\*D"):
        qkv_rope.qkv_rope_triton(qkv[..., :-1], cos, sin, H)
    with pytest.raises(ValueError, match=r"cos/sin of shape \(N, D\) = \(17, 72\)"):
        qkv_rope.qkv_rope_triton(qkv, cos[:-1], sin[:-1], H)
    with pytest.raises(ValueError, match="both q_weight and k_weight"):
        qkv_rope.qkv_rope_triton(qkv, cos, sin, H, torch.ones(72, device=DEV))
    with pytest.raises(ValueError, match=r"q_weight must have shape \(head_dim,\) = \(72,\)"):
        qkv_rope.qkv_rope_triton(qkv, cos, sin, H, torch.ones(64, device=DEV), torch.ones(64, device=DEV))


@pytest.mark.parametrize("norm", [False, True])
def test_opcheck(norm):
    D = 8
    cos, sin = tables(D)
    qkv = torch.randn(B, 17, 3 * H * D, device=DEV, requires_grad=True)
    ws = [torch.randn(D, device=DEV, requires_grad=True) for _ in range(2)] if norm else [None, None]
    torch.library.opcheck(torch.ops.vavae.qkv_rope.default, (qkv, cos, sin, H, *ws, 1e-6))
    bias = torch.randn(3 * H * D, device=DEV, requires_grad=True)
    torch.library.opcheck(torch.ops.vavae.qkv_rope.default, (qkv, cos, sin, H, *ws, 1e-6, bias))
    g = [torch.randn(B, H, N, D, device=DEV) for _ in range(3)]
    g[0] = g[0].transpose(1, 2).contiguous().transpose(1, 2)  # one grad token-major, as SDPA's backward gives it
    args = (cos, sin, qkv.detach() if norm else None, *[w.detach() if norm else None for w in ws], 1e-6,
            torch.float32)
    torch.library.opcheck(torch.ops.vavae.qkv_rope_bwd.default, (*g, *args))
    torch.library.opcheck(torch.ops.vavae.qkv_rope_bwd.default, (*g, *args, bias.detach()))
    # a grad whose strides are not multiples of 8 (the kernel's aligned-stride shortcut is off) gives the same
    odd = torch.randn(B, H, N, D + 1, device=DEV)[..., :D]
    assert odd.stride(2) % 8
    for a, b in zip(qkv_rope.qkv_rope_bwd_op(g[0], g[1], odd, *args),
                    qkv_rope.qkv_rope_bwd_op(g[0], g[1], odd.contiguous(), *args)):
        assert torch.equal(a, b)


def test_compiled_fullgraph_on_the_cpu(tmp_path, monkeypatch):
    """The attention input side traced by torch.compile(fullgraph=True) (a graph break raises), forward and
    backward equal to eager: the custom ops trace as single nodes."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    D = 72
    cos, sin = tables(D)
    lin = torch.nn.Linear(H * D, 3 * H * D).to(DEV)
    ws = [torch.randn(D, device=DEV, requires_grad=True) for _ in range(2)]

    def attn_in(x):
        q, k, v = ops.qkv_rope(lin(x), cos, sin, H, *ws)
        return ops.attention(q, k, v).transpose(1, 2).reshape(B, N, H * D)
    x = torch.randn(B, N, H * D, device=DEV, requires_grad=True)
    kernels.set_backend("triton")
    torch._dynamo.reset()
    out = torch.compile(attn_in, fullgraph=True)(x)
    g = torch.randn_like(out)
    params = [x, lin.weight, *ws]
    grads = torch.autograd.grad((out * g).sum(), params)
    assert kernels.describe()["ops"]["qkv_rope"] == "triton"
    kernels.set_backend("reference")
    ref = attn_in(x)
    ref_grads = torch.autograd.grad((ref * g).sum(), params)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # inference (the compiled sampler): q and k from vavae::qk_rope, v a view of the Linear's output, one graph
    kernels.set_backend("triton")
    torch._dynamo.reset()
    with torch.no_grad():
        inferred = torch.compile(attn_in, fullgraph=True)(x)
    torch.testing.assert_close(inferred, ref.detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_model_attention_uses_qkv_rope(qk_norm):
    """modeling.lightningdit.Attention calls ops.rope_attention (RMSNorm qk-norm fused), whose split path (what runs
    unmeasured, as here) is ops.qkv_rope + attention; under the reference backend it computes today's path bit for
    bit (reshape/permute views, ops.rms_norm, ops.rope_qk); the fused path agrees within fp32 rounding, forward and
    backward."""
    from modeling.lightningdit import Attention, VisionRotaryEmbeddingFast
    torch.manual_seed(0)
    attn = Attention(144, 2, qk_norm=qk_norm, use_rmsnorm=True).to(DEV)  # head_dim 72
    if qk_norm:
        with torch.no_grad():
            attn.q_norm.weight.normal_(1, 0.2), attn.k_norm.weight.normal_(1, 0.2)
    rope = VisionRotaryEmbeddingFast(36, 5).to(DEV)
    x = torch.randn(2, 25, 144, device=DEV)

    def today(x):  # the model's path before qkv_rope, through the ops one by one
        q, k, v = attn.qkv(x).reshape(2, 25, 3, 2, 72).permute(2, 0, 3, 1, 4).unbind(0)
        if qk_norm:
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = ops.rope_qk(q, k, rope.freqs_cos, rope.freqs_sin)
        return attn.proj(ops.attention(q, k, v).transpose(1, 2).reshape(2, 25, 144))
    kernels.set_backend("reference")
    seen = []
    orig = kernels.registry.resolve
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels.registry, "resolve", lambda name, t: seen.append(name) or orig(name, t))
        ref = attn(x, rope)
    assert "rope_attention" in seen and "rope_qk" not in seen
    assert torch.equal(ref, today(x))
    params = list(attn.parameters())
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad((ref * g).sum(), params)
    kernels.set_backend("triton")
    out = attn(x, rope)
    assert kernels.describe()["ops"]["qkv_rope"] == "triton"
    assert kernels.describe()["ops"]["rope_attention"].startswith("split")
    grads = torch.autograd.grad((out * g).sum(), params)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_layer_norm_qk_norm_keeps_the_unfused_path():
    """qk-norm with LayerNorm (use_rmsnorm=False: affine, eps 1e-5) is not fused: Attention runs the
    reshape/permute views, ops.layer_norm and ops.rope_qk, as before."""
    from modeling.lightningdit import Attention, VisionRotaryEmbeddingFast
    attn = Attention(144, 2, qk_norm=True, use_rmsnorm=False).to(DEV)
    rope = VisionRotaryEmbeddingFast(36, 5).to(DEV)
    seen = []
    orig = kernels.registry.resolve
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels.registry, "resolve", lambda name, t: seen.append(name) or orig(name, t))
        attn(torch.randn(2, 25, 144, device=DEV), rope)
    assert "qkv_rope" not in seen and {"layer_norm", "rope_qk"} <= set(seen)


def test_no_layout_copies_left_in_the_attention_graphs():
    """The forward and backward graphs AOT autograd traces for the model's Attention: with qkv_rope (the split path
    of ops.rope_attention), between the qkv and proj GEMMs only our two custom ops, attention and views (no
    stack/permute-clone of dq/dk/dv, no RoPE arithmetic, no copy before proj); with the fused path (rope-fused) only
    its two custom ops; the reference path has the stack and the permute+clone the H200 profile showed (11 ms/step
    for the copy, 22 ms for the RoPE backward)."""
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified

    from modeling.lightningdit import Attention, VisionRotaryEmbeddingFast
    graphs = {}

    def capture(gm, inputs):
        def keep(name):
            def compiler(g, _):
                graphs[name] = {str(n.target).split(".")[-2] for n in g.graph.nodes
                                if n.op == "call_function" and str(n.target).count(".") >= 2}
                return make_boxed_func(g.forward)
            return compiler
        return aot_module_simplified(gm, inputs, fw_compiler=keep("fwd"), bw_compiler=keep("bwd"))
    attn = Attention(144, 2).to(DEV)
    rope = VisionRotaryEmbeddingFast(36, 5).to(DEV)
    x = torch.randn(2, 25, 144, device=DEV, requires_grad=True)
    ops_of = {}
    for backend, forced in (("reference", None), ("triton", None), ("triton", "rope-fused")):
        kernels.set_backend(backend)
        kernels.set_attention(forced)
        torch._dynamo.reset()
        try:
            torch.compile(lambda x: attn(x, rope), backend=capture, fullgraph=True)(x).sum().backward()
        finally:
            kernels.set_attention(None)
        ops_of[forced or backend] = graphs["fwd"] | graphs["bwd"]
    views = {"view", "t", "transpose", "detach", "_unsafe_view"}
    gemms = {"addmm", "mm", "sum"}  # sum: the bias gradients
    attention = {o for o in ops_of["triton"] if "scaled_dot_product" in o}
    assert attention and ops_of["triton"] - views - gemms - attention == {"qkv_rope", "qkv_rope_bwd"}
    assert ops_of["rope-fused"] - views - gemms == {"rope_attention", "rope_attention_bwd"}
    assert {"stack", "clone", "permute", "neg"} <= ops_of["reference"]


@pytest.mark.parametrize("D", [72, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_variant_is_the_same_bits(D, dtype, monkeypatch):
    """Without qk-norm the kernels may stream whole token rows in CHUNK-wide tiles (ROWS; the autotuner times both
    families on a GPU): forward and d qkv bit for bit the per-head variant's, with a chunk that does not divide
    H * D (the masked last chunk runs); with head-strided gradients (heads not adjacent) the backward keeps the
    per-head path."""
    torch.manual_seed(D)
    cos, sin = tables(D)
    qkv = torch.randn(B, N, 3 * H * D, device=DEV, dtype=dtype, requires_grad=True)
    kernels.set_backend("triton")
    runs = {}
    for rows in (False, True):
        monkeypatch.setattr(qkv_rope, "_INTERPRETER_ROWS", rows)
        out = qkv_rope.qkv_rope_triton(qkv, cos, sin, H)
        # token-major gradients (SDPA's backward writes them in q's layout): each token's heads adjacent
        g = [torch.randn((B, N, H, D), generator=torch.Generator().manual_seed(i), dtype=o.dtype).to(DEV)
             .transpose(1, 2) for i, o in enumerate(out)]
        assert g[0].stride(1) == D
        runs[rows] = ([o.detach() for o in out], torch.autograd.grad(out, qkv, g)[0])
        # gradients with the head as the outer dimension ((B, H, N, D) contiguous): not adjacent, the per-head path
        strided = [t.contiguous() for t in g]
        assert strided[0].stride(1) != D
        runs[rows, "strided"] = qkv_rope.qkv_rope_bwd_op(*strided, cos, sin, None, None, None, 1e-6, dtype)[0]
    assert (H * D) % qkv_rope._INTERPRETER_CHUNK or D != 72  # head_dim 72: a masked last chunk
    for a, b in zip(runs[False][0], runs[True][0]):
        assert torch.equal(a, b)
    assert torch.equal(runs[False][1], runs[True][1])
    assert torch.equal(runs[False, "strided"], runs[True, "strided"])
    assert torch.equal(runs[False, "strided"], runs[False][1])


def test_an_explicit_config_of_each_family_runs_and_agrees():
    """qkv_rope_forward / qkv_rope_backward with a given autotuner config (what the GPU test runs for every one):
    a per-head and a row config, the same bits; the row variant refuses head-strided gradients."""
    D = 72
    cos, sin = tables(D)
    qkv = torch.randn(B, N, 3 * H * D, device=DEV)
    g = [torch.randn(B, N, H, D, device=DEV).transpose(1, 2) for _ in range(3)]
    head, row = (next(c for c in qkv_rope._configs() if c.kwargs["ROWS"] is r) for r in (False, True))
    outs = [qkv_rope.qkv_rope_forward(qkv, cos, sin, H, config=c) for c in (head, row)]
    assert all(torch.equal(a, b) for a, b in zip(*outs))
    d = [qkv_rope.qkv_rope_backward(*g, cos, sin, None, None, None, 1e-6, torch.float32, config=c)[0]
         for c in (head, row)]
    assert torch.equal(d[0], d[1])
    with pytest.raises(ValueError, match="heads adjacent"):
        qkv_rope.qkv_rope_backward(*[t.contiguous() for t in g], cos, sin, None, None, None, 1e-6, torch.float32,
                                   config=row)


def test_row_variant_configs_are_pruned_where_they_cannot_run():
    configs = qkv_rope._configs()
    rows = [c for c in configs if c.kwargs["ROWS"]]
    assert rows and len(rows) == len(qkv_rope.ROW_TILES)
    assert qkv_rope._prune_rows(configs, {}, HAS_NORM=False) == configs  # forward, no qk-norm: every family
    per_head = [c for c in configs if not c.kwargs["ROWS"]]
    assert qkv_rope._prune_rows(configs, {}, HAS_NORM=True) == per_head
    assert qkv_rope._prune_rows(configs, {}, HAS_NORM=False, HEADS_ADJACENT=False) == per_head
