"""Triton kernels vs float64 references (CPU: TRITON_INTERPRET=1), custom-op checks, backend switch,
torch.compile(fullgraph=True) of a LightningDiT block, and the parity fixture on the fused path.

Shapes are small (the interpreter is slow) but awkward: hidden 1152, head_dim 72, token counts that are
not a multiple of the kernels' blocks (37), batch 1.
"""
import os
import re
from pathlib import Path

import torch

if not torch.cuda.is_available():  # must precede the first import of the Triton kernels
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

import kernels  # noqa: E402
from kernels import BackendUnavailable, ops, reference  # noqa: E402
from kernels import fused_norm, gated_residual, linear_swiglu, rope, swiglu  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def _triton_backend():
    kernels.set_backend("triton")
    yield
    kernels.set_backend("auto")


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def leaves(*shapes_dtypes):
    return [torch.randn(s, device=DEV, dtype=d).requires_grad_() for s, d in shapes_dtypes]


def check(fused_fn, ref_fn, inputs, dtype):
    """Forward outputs and input grads of fused_fn(inputs) vs ref_fn on float64 copies of the inputs."""
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    out, ref = fused_fn(*inputs), ref_fn(*ref_inputs)
    out, ref = (out if isinstance(out, tuple) else (out,)), (ref if isinstance(ref, tuple) else (ref,))
    grads_out = [torch.randn_like(r) for r in ref]
    for o, r in zip(out, ref):
        assert o.shape == r.shape and torch.isfinite(o).all()
        assert rel_err(o, r) < TOL[dtype], f"forward rel err {rel_err(o, r):.2e}"
    g = torch.autograd.grad([(o.double() * go).sum() for o, go in zip(out, grads_out)], inputs)
    gr = torch.autograd.grad([(r * go).sum() for r, go in zip(ref, grads_out)], ref_inputs)
    for i, (a, b) in enumerate(zip(g, gr)):
        assert a.dtype == inputs[i].dtype and torch.isfinite(a).all()
        assert rel_err(a, b) < TOL[dtype] * 2, f"grad {i} rel err {rel_err(a, b):.2e}"


# ----------------------------------------------------------------------------- the norm family

@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("B,N,C", [(2, 37, 1152), (1, 5, 40)])
def test_norm_modulate(kind, B, N, C):
    x, w, mod = leaves(((B, N, C), torch.float32), ((C,), torch.float32), ((B, 6 * C), torch.float32))
    if kind == "layer":  # the model's LayerNorm has no affine
        fn = lambda x, w, m: fused_norm.TRITON.norm_modulate(x, None, m[:, :C], m[:, C:2 * C], 1e-6, kind)  # noqa
        rf = lambda x, w, m: reference.norm_modulate(x, None, m[:, :C], m[:, C:2 * C], 1e-6, kind) + 0 * w.sum()  # noqa
        check(lambda x, m: fn(x, None, m), lambda x, m: rf(x, torch.zeros(1, dtype=x.dtype), m), [x, mod],
              torch.float32)
    else:  # shift/scale are strided chunks of the adaLN output, as in the model
        check(lambda x, w, m: fused_norm.TRITON.norm_modulate(x, w, m[:, :C], m[:, C:2 * C], 1e-6, kind),
              lambda x, w, m: reference.norm_modulate(x, w, m[:, :C], m[:, C:2 * C], 1e-6, kind),
              [x, w, mod], torch.float32)


@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("wo_shift", [False, True])
def test_gated_residual_norm_modulate(kind, wo_shift):
    B, N, C = 2, 37, 1152
    x, y, w, mod = leaves(((B, N, C), torch.float32), ((B, N, C), torch.float32), ((C,), torch.float32),
                          ((B, 6 * C), torch.float32))

    def call(impl, x, y, w, m):
        shift = None if wo_shift else m[:, :C]
        return impl.gated_residual_norm_modulate(x, m[:, 2 * C:3 * C], y, w if kind == "rms" else None, shift,
                                                 m[:, C:2 * C], 1e-6, kind)
    inputs = [x, y, w, mod] if kind == "rms" else [x, y, mod]
    if kind == "rms":
        check(lambda *a: call(fused_norm.TRITON, *a), lambda *a: call(reference, *a), inputs, torch.float32)
    else:
        check(lambda x, y, m: call(fused_norm.TRITON, x, y, None, m), lambda x, y, m: call(reference, x, y, None, m),
              inputs, torch.float32)


def test_norm_family_bf16_and_autocast_dtypes():
    B, N, C = 1, 37, 1152
    x, y, w, mod = leaves(((B, N, C), torch.bfloat16), ((B, N, C), torch.bfloat16), ((C,), torch.bfloat16),
                          ((B, 6 * C), torch.bfloat16))
    call = lambda impl: lambda x, y, w, m: impl.gated_residual_norm_modulate(  # noqa: E731
        x, m[:, 2 * C:3 * C], y, w, m[:, :C], m[:, C:2 * C], 1e-6, "rms")
    check(call(fused_norm.TRITON), call(reference), [x, y, w, mod], torch.bfloat16)
    # autocast's mix: fp32 residual stream and weight, bf16 branch output and adaLN vectors
    x32, w32 = (t.detach().float().requires_grad_() for t in (x, w))
    h, out = fused_norm.TRITON.gated_residual_norm_modulate(x32, mod[:, :C], y, w32, None, mod[:, C:2 * C])
    rh, rout = reference.gated_residual_norm_modulate(x32, mod[:, :C], y, w32, None, mod[:, C:2 * C])
    assert h.dtype == rh.dtype == torch.float32 and out.dtype == rout.dtype
    assert rel_err(out, rout) < 1e-2


def test_norm_out_dtype_is_the_next_linears_input_dtype():
    """out_dtype (what the model asks for under autocast: the next Linear's dtype): the normalised output written in
    bf16 is the fp32 one rounded (bit for bit on a GPU; within the interpreter's truncation here), and its backward,
    fed the bf16 gradient the Linear gives, produces the very gradients the fp32-output path produces from that
    gradient cast up (what autocast's cast did). The reference gives the same dtype and values within bf16."""
    torch.manual_seed(7)
    B, N, C = 2, 19, 1152
    x, w = leaves(((B, N, C), torch.float32), ((C,), torch.float32))
    y, mod = leaves(((B, N, C), torch.bfloat16), ((B, 6 * C), torch.bfloat16))

    def run(to):
        h, out = fused_norm.TRITON.gated_residual_norm_modulate(x, mod[:, 2 * C:3 * C], y, w, mod[:, :C],
                                                                mod[:, C:2 * C], 1e-6, "rms", to)
        out2 = fused_norm.TRITON.norm_modulate(h, w, mod[:, 3 * C:4 * C], mod[:, 4 * C:5 * C], 1e-6, "rms", to)
        return h, out, out2
    low, full = run(torch.bfloat16), run(None)
    assert low[1].dtype == low[2].dtype == torch.bfloat16 and low[0].dtype == torch.float32  # as written
    assert full[1].dtype == full[2].dtype == torch.float32
    full = (full[0], full[1].to(torch.bfloat16), full[2].to(torch.bfloat16))  # the Linear's autocast cast
    for a, b in zip(low, full):
        if DEV == "cuda" or a.dtype == torch.float32:
            assert torch.equal(a, b)
        else:  # the interpreter truncates where the GPU rounds: at most one bf16 ulp apart
            assert ((a.float() - b.float()).abs() <= b.float().abs() * 2 ** -7).all()
    gouts = [torch.randn_like(t) for t in full]
    leaves_ = [x, y, w, mod]
    ga = torch.autograd.grad([(t * g).sum() for t, g in zip(low, gouts)], leaves_)
    gb = torch.autograd.grad([(t * g).sum() for t, g in zip(full, gouts)], leaves_)
    for a, b in zip(ga, gb):
        assert a.dtype == b.dtype and torch.equal(a, b)
    rh, rout = reference.gated_residual_norm_modulate(x, mod[:, 2 * C:3 * C], y, w, mod[:, :C], mod[:, C:2 * C],
                                                      1e-6, "rms", torch.bfloat16)
    assert rout.dtype == torch.bfloat16 and rel_err(low[1], rout) < 1e-2


@pytest.mark.parametrize("attention", ["rope-fused", "split"])
def test_block_under_autocast_has_nothing_between_our_kernels_but_views(attention):
    """A LightningDiT block as the model runs it (the previous block's MLP residual pending, its own handed on)
    traced by AOT autograd under bf16 autocast with our kernels everywhere: every activation-sized node of the
    forward and backward graphs is one of our kernels or a view. No dtype casts around the norms (they write the
    next GEMM's bf16 input and take its bf16 gradient: before out_dtype four casts ran per block, ~16 ms of the XL/1
    step), no gated-residual kernel and no accumulation of the residual's gradient (added inside the norms'
    backward). What else remains converts weights and the (B, C) conditioning."""
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified

    from modeling.lightningdit import LightningDiTBlock, VisionRotaryEmbeddingFast
    graphs = {}

    def capture(gm, inputs):
        def keep(name):
            def compiler(g, _):
                graphs[name] = g
                return make_boxed_func(g.forward)
            return compiler
        return aot_module_simplified(gm, inputs, fw_compiler=keep("fwd"), bw_compiler=keep("bwd"))
    B, N, C = 2, 25, 144
    block, rope = LightningDiTBlock(C, 2).to(DEV), VisionRotaryEmbeddingFast(36, 5).to(DEV)
    x, c = torch.randn(B, N, C, device=DEV, requires_grad=True), torch.randn(B, C, device=DEV)
    gate = torch.randn(B, C, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    y = torch.randn(B, N, C, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    kernels.set_attention("rope-fused" if attention == "rope-fused" else None)  # the CPU's chooser: split
    torch._dynamo.reset()
    try:
        with torch.autocast(DEV, dtype=torch.bfloat16):
            out, (g2, y2) = torch.compile(lambda *a: block(a[0], a[1], rope, a[2:], defer=True), backend=capture,
                                          fullgraph=True)(x, c, gate, y)
        (out.float().sum() + g2.float().sum() + y2.float().sum()).backward()
    finally:
        kernels.set_attention(None)
    ours, other = set(), set()
    for g in graphs.values():
        for n in g.graph.nodes:
            if n.op != "call_function":
                continue
            name = str(n.target)
            if "vavae" in name:
                ours.add(name.split(".")[1])
                continue
            val = n.meta.get("val")
            if isinstance(val, torch.Tensor) and tuple(val.shape[:2]) == (B, N):
                other.add(name)
    attn = {"rope_attention", "rope_attention_bwd"} if attention == "rope-fused" else {"qkv_rope", "qkv_rope_bwd"}
    assert {"norm_fwd_triton", "norm_bwd_triton", "swiglu", "swiglu_bwd"} | attn <= ours, ours
    assert "gated_residual" not in ours
    views = {"aten.view.default", "aten.detach.default", "<built-in function getitem>", "aten._unsafe_view.default",
             "aten.transpose.int"}  # (the split path's attention output to the proj's (B, N, C): a view)
    assert other <= views, other - views
    # w12's and qkv's bias gradients are summed inside the SwiGLU's and the attention block's backward: nothing but
    # the Linear's two GEMMs reads the gradient they write (the Linear's own `sum` read it once more: 5.4 + 2.8 ms a
    # step at XL/1, H200 profile of 2026-12-04)
    for kernel, bias_size in (("swiglu_bwd", 2 * 384), (f"{attention.replace('-fused', '_attention')}_bwd"
                                                        if attention == "rope-fused" else "qkv_rope_bwd", 3 * C)):
        readers, todo = set(), [n for n in graphs["bwd"].graph.nodes if f"vavae.{kernel}" in str(n.target)]
        assert todo, kernel
        while todo:
            node = todo.pop()
            for user in node.users:
                if str(user.target) in views or str(user.target) == "aten.t.default":
                    todo.append(user)
                elif user.op == "output":  # what leaves the graph: only the bias gradient
                    assert node.meta["val"].numel() == bias_size, (kernel, node.meta["val"].shape)
                else:
                    readers.add(str(user.target))
        assert readers == {"aten.mm.default"}, (kernel, readers)


def test_final_layer_writes_no_zero_gradient_for_its_unused_residual():
    """The final layer adds the last block's MLP residual in its norm's pass and uses only the normalised output:
    the residual sum h gets no gradient, and autograd must not write an activation of zeros for it that the
    backward kernel then reads (set_materialize_grads(False): the kernel's no-dh path). Gradients as the reference's
    (float64) on an awkward size."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from modeling.lightningdit import FinalLayer

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.seen.append((str(func), tuple(out.shape) if isinstance(out, torch.Tensor) else None))
            return out

    B, N, C = 2, 37, 1152
    layer = FinalLayer(C, 1, 8).to(DEV)
    x, gate, y = leaves(((B, N, C), torch.float32), ((B, C), torch.float32), ((B, N, C), torch.float32))
    c = torch.randn(B, C, device=DEV)
    out = layer(x, c, (gate, y))
    with Ops() as ops_seen:
        out.square().sum().backward()
    made = [f for f, shape in ops_seen.seen if shape == (B, N, C) and ("zeros" in f or "full" in f or "fill" in f)]
    assert not made, made
    kernels.set_backend("reference")
    ref = [t.detach().double().requires_grad_() for t in (x, gate, y)]
    layer64 = layer.double()
    layer64(ref[0], c.double(), (ref[1], ref[2])).square().sum().backward()
    for got, want in zip((x, gate, y), ref):
        assert rel_err(got.grad, want.grad) < 1e-5


def test_rms_norm_and_qk_layer_norm_on_head_views():
    B, H, N, D = 1, 2, 37, 72
    qkv = torch.randn(B, N, 3, H, D, device=DEV).requires_grad_()
    w, b = leaves(((D,), torch.float32), ((D,), torch.float32))
    q = lambda t: t.permute(2, 0, 3, 1, 4)[0]  # noqa: E731  (B, H, N, D) strided view, as in Attention
    check(lambda t, w: fused_norm.TRITON.rms_norm(q(t), w, 1e-6), lambda t, w: reference.rms_norm(q(t), w, 1e-6),
          [qkv, w], torch.float32)
    check(lambda t, w, b: fused_norm.TRITON.layer_norm(q(t), w, b, 1e-5),
          lambda t, w, b: reference.layer_norm(q(t), w, b, 1e-5), [qkv, w, b], torch.float32)


@pytest.mark.parametrize("C, N", [(1152, 37), (72, 37), (72, 32)])
def test_norm_rows_per_program_ragged_and_bitwise_across_tiles(C, N, monkeypatch):
    """The forward's BLOCK_M-row tiles and the backward's BLOCK_M-row steps on ragged row counts (2 x 37 rows: no
    multiple of 4 or 8; the backward's 32-row chunks end in 5: no multiple of 2): vs float64, and the forward
    bitwise equal for every BLOCK_M (per row the same arithmetic as the one-row kernel, BLOCK_M = 1), dx/dy too;
    the reduced grads within fp32 summation order. 32 tokens a sample: the forward's ONE_SAMPLE tiles (the adaLN
    vectors loaded once per tile), the same bits."""
    B = 2
    x, y, w, mod = leaves(((B, N, C), torch.float32), ((B, N, C), torch.float32), ((C,), torch.float32),
                          ((B, 6 * C), torch.float32))

    def call(impl, x, y, w, m):
        h, out = impl.gated_residual_norm_modulate(x, m[:, 2 * C:3 * C], y, w, m[:, :C], m[:, C:2 * C], 1e-6, "rms")
        return h, out, impl.norm_modulate(h, None, m[:, 3 * C:4 * C], m[:, 4 * C:5 * C], 1e-6, "layer")
    results = {}
    for block_m in (1, 2, 4, 8):
        monkeypatch.setattr(fused_norm, "INTERPRET_BLOCK_M", block_m)
        outs = call(fused_norm.TRITON, x, y, w, mod)
        gouts = [torch.ones_like(o) * 0.5 + torch.arange(o.numel()).reshape(o.shape) % 7 * 0.1 for o in outs]
        results[block_m] = outs, torch.autograd.grad(outs, [x, y, w, mod], gouts)
        if block_m == 4:
            check(lambda *a: call(fused_norm.TRITON, *a), lambda *a: call(reference, *a), [x, y, w, mod],
                  torch.float32)
    (outs1, grads1) = results[1]
    for block_m in (2, 4, 8):
        outs, grads = results[block_m]
        assert all(torch.equal(a, b) for a, b in zip(outs, outs1)), f"forward differs at BLOCK_M={block_m}"
        assert torch.equal(grads[0], grads1[0]) and torch.equal(grads[1], grads1[1])  # dx, dy: row by row
        for a, b in zip(grads[2:], grads1[2:]):  # dweight, dmod: partial sums in another order
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_norm_autotuned_launchers_prune_and_run_the_chosen_tile(monkeypatch):
    """The GPU path of the norm launchers (triton.autotune over BLOCK_M and warps), run under the interpreter with
    the autotuner's timer replaced: the candidates are the pruned tiles for the row width (hidden 1152 as 1024 + 128:
    1-8 rows forward, at most 64 values a thread of the padded 2048, 1 backward; 72 as 64 + 8: 16-32 rows forward,
    16 backward), none whose 128- or 8-wide tile
    leaves threads without an element, the fastest is launched with its grid, and the results match float64
    (forward and backward)."""
    monkeypatch.setattr(fused_norm._triton, "interpreting", lambda: False)  # the launchers take the tuned kernels
    for C, expect in ((1152, {"fwd": {(1, 4), (2, 8), (4, 8), (4, 16), (8, 16), (4, 4), (8, 8)}, "bwd": {(1, 4)}}),
                      (72, {"fwd": {(16, 4), (32, 4), (32, 8)}, "bwd": {(16, 4)}})):
        tried = {"fwd": set(), "bwd": set()}
        best = 8 if C == 1152 else 16  # the fake timer prefers BLOCK_M closest to this, then fewer warps

        def fake_bench(which):
            def bench(*args, config, **meta):
                tried[which].add((config.kwargs["BLOCK_M"], config.num_warps))
                return [abs(config.kwargs["BLOCK_M"] - best) + 0.01 * config.num_warps]
            return bench
        monkeypatch.setattr(fused_norm._norm_fwd_tuned, "_bench", fake_bench("fwd"))
        monkeypatch.setattr(fused_norm._norm_bwd_tuned, "_bench", fake_bench("bwd"))
        monkeypatch.setattr(fused_norm._norm_fwd_tuned, "cache", {})
        monkeypatch.setattr(fused_norm._norm_bwd_tuned, "cache", {})
        B, N = 2, 37
        x, y, w, mod = leaves(((B, N, C), torch.float32), ((B, N, C), torch.float32), ((C,), torch.float32),
                              ((B, 6 * C), torch.float32))
        check(lambda x, y, w, m: fused_norm.TRITON.gated_residual_norm_modulate(
                  x, m[:, 2 * C:3 * C], y, w, m[:, :C], m[:, C:2 * C], 1e-6, "rms"),
              lambda x, y, w, m: reference.gated_residual_norm_modulate(
                  x, m[:, 2 * C:3 * C], y, w, m[:, :C], m[:, C:2 * C], 1e-6, "rms"), [x, y, w, mod], torch.float32)
        # a single candidate is launched without timing by Triton 3.9, timed all the same by 3.6 (the lent machine's)
        for which, tiles in expect.items():
            assert tried[which] == tiles or (len(tiles) == 1 and not tried[which]), (which, tried[which])
        for which, tuned in (("fwd", fused_norm._norm_fwd_tuned), ("bwd", fused_norm._norm_bwd_tuned)):
            chosen = min(expect[which], key=lambda mw: (abs(mw[0] - best), mw[1]))
            assert (tuned.best_config.kwargs["BLOCK_M"], tuned.best_config.num_warps) == chosen


def test_norm_backward_refuses_a_sample_past_32_bit_offsets():
    """The Triton backward's offsets inside a sample are 32-bit: a sample of 2^31 elements or more gets a one-line
    error naming the size and the backends that take it, not wrapped addresses."""
    fused_norm._check_sample_offsets(65536, 1152)
    with pytest.raises(ValueError, match=r"2097152 rows x 1024 channels in one sample.*'reference' or 'cuda'"):
        fused_norm._check_sample_offsets(2 ** 21, 1024)


def test_norm_backward_is_one_pass_and_one_reduction_per_grad(monkeypatch):
    """The Triton backward launches its kernel once (each program one pass over its rows, writing its partial
    sums) and then sums each grad's partials once: one aten.sum per reduced grad, nothing else that reduces."""
    from torch.utils._python_dispatch import TorchDispatchMode
    B, N, C = 2, 37, 1152
    x, y, w, mod = leaves(((B, N, C), torch.float32), ((B, N, C), torch.float32), ((C,), torch.float32),
                          ((B, 6 * C), torch.float32))
    h, out = fused_norm.TRITON.gated_residual_norm_modulate(x, mod[:, 2 * C:3 * C], y, w, mod[:, :C],
                                                            mod[:, C:2 * C], 1e-6, "rms")
    launches = []
    kernel = fused_norm._norm_bwd_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]
    monkeypatch.setattr(fused_norm, "_norm_bwd_kernel", Counting())

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))
    dout = torch.randn_like(out)
    with Ops() as mode:  # the launcher itself (inside the custom op a dispatch mode sees only the op)
        fused_norm._bwd_triton(dout, None, h.detach(), mod[:, 2 * C:3 * C].detach(), y.detach(), w.detach(), None,
                               True, mod[:, C:2 * C].detach(), torch.empty(0), torch.ones(B * N), True)
    assert launches == [(B, 2)]  # 37 rows per sample: chunks of 32 and 5
    reductions = [n for n in mode.names if n in ("sum", "mean", "add", "add_", "cumsum")]
    assert reductions == ["sum"] * 4, mode.names  # dgate, dweight, dshift, dscale


# ----------------------------------------------------------------------------- elementwise ops

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_residual(dtype):
    B, N, C = 2, 37, 1152
    x, y, mod = leaves(((B, N, C), dtype), ((B, N, C), dtype), ((B, 6 * C), dtype))
    check(lambda x, y, m: gated_residual.gated_residual_triton(x, m[:, 5 * C:], y),
          lambda x, y, m: reference.gated_residual(x, m[:, 5 * C:], y), [x, y, mod], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,bias", [((1, 37, 2 * 3072), False), ((1, 37, 2 * 3072), True),
                                        ((2, 37, 2 * 200), True)])
def test_swiglu(shape, bias, dtype):
    """XL/1's width (hidden int(2/3 * 4 * 1152) = 3072), and 200 (not a multiple of the column tile); 74 rows: the
    backward's programs of 16 rows (two iterations of 8) and a ragged last one. The bias (w12's, fp32 as the
    parameter is under autocast) is added in the forward and its gradient summed by the backward's programs."""
    x12, b = leaves((shape, dtype), ((shape[-1],), torch.float32))
    if bias:
        check(swiglu.swiglu_triton, reference.swiglu, [x12, b], dtype)
    else:
        check(swiglu.swiglu_triton, reference.swiglu, [x12], dtype)


def test_swiglu_bias_gradient_is_the_sum_the_linear_would_take():
    """The model's MLP with w12's bias handed to the SwiGLU (SwiGLUFFN: linear_leaving_bias) gives every parameter
    the gradient the plain `w3(swiglu(w12(x)))` gives (float64 reference), and w12's bias gradient comes out of the
    SwiGLU backward's partial sums; an FP8 or other Linear swapped in for w12 keeps its bias (runs whole)."""
    from modeling.lightningdit import SwiGLUFFN, linear_leaving_bias
    torch.manual_seed(3)
    mlp = SwiGLUFFN(144, 200).to(DEV)
    x = torch.randn(2, 37, 144, device=DEV)
    ref = SwiGLUFFN(144, 200).to(DEV).double()
    ref.load_state_dict(mlp.state_dict())
    out = mlp(x)
    expect = ref.w3(reference.swiglu(ref.w12(x.double())))
    assert rel_err(out, expect) < 2e-5
    g = torch.randn_like(expect)
    grads = torch.autograd.grad((out.double() * g).sum(), list(mlp.parameters()))
    ref_grads = torch.autograd.grad((expect * g).sum(), list(ref.parameters()))
    for (name, _), a, b in zip(mlp.named_parameters(), grads, ref_grads):
        assert rel_err(a, b) < 4e-5, name

    class Swapped(torch.nn.Linear):  # stands for FP8TrainingLinear / torchao / Transformer Engine
        pass
    swapped = Swapped(144, 400).to(DEV)
    y, b = linear_leaving_bias(swapped, x)
    assert b is None and torch.equal(y, swapped(x))
    y, b = linear_leaving_bias(mlp.w12, x)
    assert b is mlp.w12.bias and torch.allclose(y + b, mlp.w12(x), atol=1e-6)


@pytest.mark.parametrize("D", [72, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_qk(D, dtype):
    from modeling.lightningdit import VisionRotaryEmbeddingFast
    B, H, side = 1, 2, 6
    N = side * side + 1  # 37 tokens: not a multiple of the kernel's token block
    tables = VisionRotaryEmbeddingFast(D // 2, side + 1)
    cos, sin = tables.freqs_cos[:N].to(DEV), tables.freqs_sin[:N].to(DEV)
    (qkv,) = leaves(((B, N, 3, H, D), dtype))
    split = lambda t: t.permute(2, 0, 3, 1, 4).unbind(0)[:2]  # noqa: E731  strided q, k views
    check(lambda t: rope.rope_qk_triton(*split(t), cos, sin),
          lambda t: reference.rope_qk(*split(t), cos.double(), sin.double()), [qkv], dtype)


# ----------------------------------------------------------------------------- custom-op contract

def _opcheck_cases():
    B, N, C = 1, 3, 16
    r = lambda *s: torch.randn(*s, device=DEV)  # noqa: E731
    mod = r(B, 6 * C)
    x, y, w = r(B, N, C).requires_grad_(), r(B, N, C).requires_grad_(), r(C).requires_grad_()
    g, sh, sc = (mod[:, i * C:(i + 1) * C].clone().requires_grad_() for i in range(3))
    q, k = r(B, 2, 4, 8).requires_grad_(), r(B, 2, 4, 8).requires_grad_()
    return [
        (torch.ops.vavae.norm_fwd_triton.default, (x, g, y, w, None, sh, sc, 1e-6, True, None)),
        (torch.ops.vavae.norm_fwd_triton.default, (x, None, None, None, None, None, sc, 1e-6, False, None)),
        (torch.ops.vavae.norm_fwd_triton.default, (x, g, y, w, None, sh, sc, 1e-6, True, torch.bfloat16)),
        (torch.ops.vavae.gated_residual.default, (x, g, y)),
        (torch.ops.vavae.swiglu.default, (r(B, N, 2 * C).requires_grad_(),)),
        (torch.ops.vavae.swiglu.default, (r(B, N, 2 * C).requires_grad_(), r(2 * C).requires_grad_())),
        (torch.ops.vavae.rope_qk.default, (q, k, r(4, 8), r(4, 8), False)),
        (torch.ops.vavae.linear_swiglu.default, (r(B, N, C).requires_grad_(), r(2 * C, C).requires_grad_(),
                                                 r(2 * C).requires_grad_())),
        # the backward ops, called by the forward ops' autograd (no autograd of their own: plain inputs);
        # the statistics as the forward writes them (rms: no mean, one rstd per row)
        (torch.ops.vavae.norm_bwd_triton.default,
         (r(B, N, C), r(B, N, C), *(t.detach() for t in (x, g, y, w)), None, True, sc.detach(), r(0),
          r(B * N).abs() + 0.5, True)),
        (torch.ops.vavae.norm_bwd_triton.default,
         (r(B, N, C), None, x.detach(), None, None, None, None, False, sc.detach(), r(B * N), r(B * N).abs() + 0.5,
          False)),
        (torch.ops.vavae.gated_residual_bwd.default, (r(B, N, C), g.detach(), y.detach())),
        (torch.ops.vavae.swiglu_bwd.default, (r(B, N, C), r(B, N, 2 * C), None)),
        (torch.ops.vavae.swiglu_bwd.default, (r(B, N, C), r(B, N, 2 * C), r(2 * C))),
    ]


@pytest.mark.parametrize("case", range(len(_opcheck_cases())))  # every case (a fixed count once left one out)
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


# where each custom op's opcheck lives (a GPU-only op: in the GPU tests); a new op must be added here with one
OPCHECKED_IN = {
    "test_kernels.py": ("norm_fwd_triton", "norm_bwd_triton", "gated_residual", "gated_residual_bwd", "swiglu",
                        "swiglu_bwd", "rope_qk", "linear_swiglu"),
    "test_kernels_gpu.py": ("norm_fwd_cuda", "norm_bwd_cuda"),
    "test_kernels_qkv_rope.py": ("qk_rope", "qkv_rope", "qkv_rope_bwd"),
    "test_kernels_rope_attention.py": ("rope_attention", "rope_attention_bwd"),
    "test_kernels_fp8_quant.py": ("quantize_rows_fp8", "swiglu_fp8", "swiglu_fp8_colmax", "quantize_rows_cols_fp8",
                                  "norm_fp8"),
    "test_kernels_group_norm.py": ("group_norm_silu", "group_norm_silu_bwd"),
    "test_kernels_upsample_conv.py": ("phase_interleave", "phase_interleave_bwd"),
}


def test_every_custom_op_is_opchecked():
    """Every op registered under vavae:: has an opcheck (its schema, fake implementation and AOT dispatch against
    what it computes): the table above names the test file, and that file calls opcheck on it."""
    import importlib
    import pkgutil
    for m in pkgutil.iter_modules(kernels.__path__):
        if not m.name.startswith("_") and m.name != "build_ext":  # a build script, not an op module
            importlib.import_module(f"kernels.{m.name}")
    registered = {name for name in dir(torch.ops.vavae) if hasattr(getattr(torch.ops.vavae, name), "default")}
    listed = {op for ops_ in OPCHECKED_IN.values() for op in ops_}
    assert registered == listed, (sorted(registered - listed), sorted(listed - registered))
    here_cases = {op.name().split("::")[1].split(".")[0] for op, _ in _opcheck_cases()}
    assert here_cases == set(OPCHECKED_IN["test_kernels.py"]), here_cases
    for file, ops_ in OPCHECKED_IN.items():
        if file == "test_kernels.py":  # test_opcheck runs every case of _opcheck_cases: checked above
            continue
        # the file's top-level blocks (PEP 8: two blank lines apart; a test with its decorators) that call opcheck
        blocks = [b for b in (Path(__file__).parent / file).read_text().split("\n\n\n") if "library.opcheck(" in b]
        assert blocks, file
        for op in ops_:  # torch.ops.vavae.<op>.default, module.<op>_op, or "<op>" in an opcheck's parametrisation
            assert any(re.search(rf"\b{op}(\.default\b|_op\b|\")", b) for b in blocks), f"{file}: no opcheck of {op}"


# ----------------------------------------------------------------------------- w12 GEMM + SwiGLU (inference)

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,K,H,bias", [(37, 1152, 200, True), (5, 72, 40, False), (1, 1152, 3072, True)])
def test_linear_swiglu(rows, K, H, bias, dtype):
    """silu(x Wa^T + ba) * (x Wb^T + bb) in one kernel vs float64: hidden 1152 (XL), K 72 (not a multiple of the
    K block), H 200 and rows 37 (not multiples of the tiles), one row at XL's full w12; the backward recomputes."""
    torch.manual_seed(0)
    x = torch.randn(rows, K, device=DEV, dtype=dtype, requires_grad=True)
    w = (torch.randn(2 * H, K, device=DEV) / K ** 0.5).to(dtype).requires_grad_()
    b = torch.randn(2 * H, device=DEV, dtype=dtype, requires_grad=True) if bias else None
    inputs = [x, w] + ([b] if bias else [])
    check(lambda *t: linear_swiglu.linear_swiglu_triton(*t), lambda *t: reference.linear_swiglu(*t),
          inputs, dtype)


def test_fused_swiglu_mlp_in_the_sampler():
    """The Sampler's fused_mlp swaps each SwiGLU MLP of its copy for the one-kernel version: same parameter names,
    samples equal to the unfused path's within fp32 summation order; the caller's model is untouched."""
    from modeling import LightningDiT
    from modeling.sampling import Sampler, SamplingConfig
    torch.manual_seed(0)
    m = LightningDiT(input_size=4, patch_size=1, in_channels=4, hidden_size=48, depth=2, num_heads=2,
                     num_classes=3).to(DEV).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    z, y = torch.randn(3, 4, 4, 4, device=DEV), torch.tensor([0, 1, 2], device=DEV)
    kw = dict(steps=5, cfg_scale=2.0, cfg_interval_start=0.2)
    fused = Sampler(m, SamplingConfig(fused_mlp=True, **kw))
    assert type(fused.model.blocks[0].mlp).__name__ == "FusedSwiGLUFFN" and fused.describe()["fused_mlp"]
    assert type(m.blocks[0].mlp).__name__ == "SwiGLUFFN"
    assert list(fused.model.state_dict()) == list(m.state_dict())
    out, ref = fused(z, y), Sampler(m, SamplingConfig(**kw))(z, y)
    assert not torch.equal(out, ref)  # the kernel really ran
    assert kernels.describe()["ops"]["linear_swiglu"] == "triton"
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_fuse_swiglu_mlps_counts_and_reports_why_not(monkeypatch):
    """modeling.fused_mlp.fuse_swiglu_mlps: the number of MLPs swapped, 0 for a model without SwiGLU MLPs, and
    BackendUnavailable with the reason (before anything is swapped) where the Triton kernel cannot run."""
    from modeling import LightningDiT
    from modeling.fused_mlp import fuse_swiglu_mlps
    from modeling.sampling import Sampler, SamplerUnavailable, SamplingConfig
    cfg = dict(input_size=4, patch_size=1, in_channels=4, hidden_size=48, depth=3, num_heads=2, num_classes=3)
    assert fuse_swiglu_mlps(LightningDiT(**cfg, use_swiglu=False), DEV) == 0
    m = LightningDiT(**cfg)
    monkeypatch.setattr("kernels._triton.interpreting", lambda: False)
    if DEV == "cpu":
        with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET"):
            fuse_swiglu_mlps(m, "cpu")
        assert type(m.blocks[0].mlp).__name__ == "SwiGLUFFN"
        with pytest.raises(SamplerUnavailable, match="fused_mlp needs the Triton kernels: .*TRITON_INTERPRET"):
            Sampler(m, SamplingConfig(steps=3, fused_mlp=True))
    monkeypatch.undo()
    assert fuse_swiglu_mlps(m, DEV) == 3 and type(m.blocks[2].mlp).__name__ == "FusedSwiGLUFFN"


# ----------------------------------------------------------------------------- backend switch

def test_backend_resolution_and_errors(monkeypatch):
    x = torch.randn(1, 3, 8)
    kernels.set_backend("auto")
    ops.rms_norm(x, None)
    if not x.is_cuda and DEV == "cpu":
        assert kernels.describe()["ops"]["rms_norm"] == "reference"  # auto never picks the interpreter
    kernels.set_backend("cuda")
    with pytest.raises(BackendUnavailable, match="CUDA"):
        ops.rms_norm(x, None)
    kernels.set_backend("triton")
    monkeypatch.setattr("kernels._triton.interpreting", lambda: False)
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET"):
        ops.swiglu(x)
    with pytest.raises(ValueError, match="unknown kernels backend"):
        kernels.set_backend("fast")


def test_resolve_returns_each_backends_function():
    """resolve hands back the declared function itself (one per backend, none taking a backend name): the
    dispatcher in kernels.ops is the only hop."""
    from kernels import fused_norm, gated_residual, rope, swiglu
    x = torch.randn(1, 3, 8)
    kernels.set_backend("triton")
    assert kernels.resolve("rms_norm", x) == fused_norm.TRITON.rms_norm
    assert kernels.resolve("swiglu", x) is swiglu.swiglu_triton and kernels.resolve("rope_qk", x) is rope.rope_qk_triton
    assert kernels.resolve("gated_residual", x) is gated_residual.gated_residual_triton
    assert kernels.resolve("linear_swiglu", x) is linear_swiglu.linear_swiglu_triton
    kernels.set_backend("reference")
    assert kernels.resolve("norm_modulate", x) is reference.norm_modulate
    assert kernels.resolve("linear_swiglu", x) is reference.linear_swiglu
    # every backend registers its own custom op around its own launcher
    assert hasattr(torch.ops.vavae, "norm_fwd_triton") and hasattr(torch.ops.vavae, "norm_fwd_cuda")
    assert fused_norm.CUDA.rms_norm.__self__._fwd is fused_norm.norm_fwd_cuda


def test_auto_policy_under_compile(monkeypatch):
    """auto on a CUDA tensor: inside a torch.compile trace the reference for the ops kernels/compiled_choices.json
    gives to inductor (reported as such), our kernel otherwise; outside a trace our kernels."""
    from types import SimpleNamespace

    from kernels import backend, rope, swiglu
    cuda_like = SimpleNamespace(is_cuda=True, device="cuda:0")
    kernels.set_backend("auto")
    monkeypatch.setattr(backend, "cuda_status", lambda x=None: (False, "not built"))
    monkeypatch.setattr("kernels._triton.runs_on", lambda x: True)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert kernels.resolve("rope_qk", cuda_like) is reference.rope_qk
    assert kernels.describe()["ops"]["rope_qk"] == "reference (inductor)"
    assert kernels.resolve("norm_modulate", cuda_like) is reference.norm_modulate
    assert kernels.resolve("swiglu", cuda_like) is swiglu.swiglu_triton
    assert kernels.registry.compiled_prefers_reference() == {
        "rms_norm", "layer_norm", "norm_modulate", "gated_residual_norm_modulate", "gated_residual", "rope_qk"}
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    assert kernels.resolve("rope_qk", cuda_like) is rope.rope_qk_triton
    assert kernels.describe()["ops"]["rope_qk"] == "triton"
    assert kernels.resolve("rope_qk", torch.randn(1)) is reference.rope_qk  # CPU
    monkeypatch.setattr(backend, "cuda_status", lambda x=None: (True, ""))
    assert kernels.resolve("rms_norm", cuda_like) == kernels.registry.get("rms_norm").impls["cuda"]
    assert kernels.resolve("swiglu", cuda_like) is swiglu.swiglu_triton  # no CUDA kernel: Triton


def test_auto_under_compile_follows_the_forwards_own_decision_without_gradients(monkeypatch):
    """An entry measured both ways carries its forward's decision (`inference`): a trace that records gradients (the
    trainer) follows the entry's, one that does not (the sampler) the forward's; an entry without one, its own."""
    from types import SimpleNamespace

    from kernels import backend, fused_norm, registry
    cuda_like = SimpleNamespace(is_cuda=True, device="cuda:0")
    table = registry.compiled_choices()
    table["ops"]["norm_modulate"] = {"under_compile": "reference", "timed": "fwd_bwd kernel", "ours": "triton",
                                     "ours_ms": 0.5, "inductor_ms": 0.4, "inference": {
                                         "under_compile": "ours", "timed": "fwd kernel", "ours": "triton",
                                         "ours_ms": 0.1, "inductor_ms": 0.12}}
    monkeypatch.setattr(registry, "_CHOICES", table)
    monkeypatch.setattr(registry, "_PREFER_REFERENCE", {
        mode: frozenset(n for n in table["ops"] if registry.compiled_choice(n, mode) == "reference")
        for mode in (False, True)})
    kernels.set_backend("auto")
    monkeypatch.setattr(backend, "cuda_status", lambda x=None: (False, "not built"))
    monkeypatch.setattr("kernels._triton.runs_on", lambda x: True)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert kernels.resolve("norm_modulate", cuda_like) is reference.norm_modulate
    assert kernels.resolve("gated_residual_norm_modulate", cuda_like) is reference.gated_residual_norm_modulate
    with torch.no_grad():
        assert kernels.resolve("norm_modulate", cuda_like) == fused_norm.TRITON.norm_modulate
        assert kernels.describe()["ops"]["norm_modulate"] == "triton"
        # no forward decision of its own: the entry's
        assert kernels.resolve("gated_residual_norm_modulate", cuda_like) is reference.gated_residual_norm_modulate
    assert "norm_modulate" in registry.compiled_prefers_reference()
    assert "norm_modulate" not in registry.compiled_prefers_reference(inference=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_rope_backward_is_autograds(dtype):
    """The reference RoPE's written-out backward equals autograd of the plain formula: bitwise in fp32 and
    float64 (the same products summed in the same order), with bf16 inputs and fp32 tables too."""
    from modeling.lightningdit import VisionRotaryEmbeddingFast
    t = VisionRotaryEmbeddingFast(36, 5)
    cos, sin = t.freqs_cos.to(dtype), t.freqs_sin.to(dtype)
    for xdtype in (dtype, torch.bfloat16):
        q = torch.randn(2, 3, 25, 72, dtype=xdtype, requires_grad=True)
        k = torch.randn(2, 3, 25, 72, dtype=xdtype, requires_grad=True)
        g = torch.randn(2, 3, 25, 72, dtype=torch.promote_types(xdtype, dtype))
        oq, ok = reference.rope_qk(q, k, cos, sin)
        gq, gk = torch.autograd.grad((oq * g).sum() + (ok * g).sum(), [q, k])
        pq, pk = reference.rope(q, cos, sin), reference.rope(k, cos, sin)
        rq, rk = torch.autograd.grad((pq * g).sum() + (pk * g).sum(), [q, k])
        assert oq.dtype == xdtype and torch.equal(oq, pq.to(xdtype)) and torch.equal(ok, pk.to(xdtype))
        assert gq.dtype == xdtype
        if xdtype == dtype:
            assert torch.equal(gq, rq) and torch.equal(gk, rk)
        else:  # one rounding to bf16 instead of autograd's two: within bf16 resolution
            assert rel_err(gq, rq) < 8e-3 and rel_err(gk, rk) < 8e-3


def test_attention_choice_under_compile_is_not_pinned_by_the_traced_dtype(monkeypatch):
    """Inside a trace q may be fp32 (reference RoPE, fp32 tables) although autocast runs attention in bf16:
    the static choice must not pin the fp32-capable memory-efficient kernel (measured 2.2x slower on an
    H200); it leaves the pick to SDPA, or FlashAttention when installed."""
    from kernels import attention
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    q = torch.randn(2, 4, 16, 72)
    attention._chosen.clear()
    assert attention._choose(q, q, q) == "sdpa"
    monkeypatch.setattr(attention, "installed", lambda: {"fa3": True, "fa2": False})
    assert attention._choose(q.bfloat16(), q, q) == "fa3"
    out = attention._run("sdpa", q, q, q)
    torch.testing.assert_close(out, reference.attention(q, q, q))


def test_attention_choice_per_grad_mode_and_primed_for_compile(monkeypatch):
    """Training keys are timed forward + backward, inference keys (no_grad: sampling) forward only; each keeps its
    own choice, and a trace of a primed shape uses it instead of SDPA's own pick (FlashAttention first)."""
    from kernels import attention
    monkeypatch.setattr(attention, "_candidates", lambda q: ["sdpa-cudnn", "sdpa-flash"])
    fwd = {"sdpa-cudnn": 0.3, "sdpa-flash": 0.4}      # cuDNN faster forward,
    fwd_bwd = {"sdpa-cudnn": 1.2, "sdpa-flash": 1.0}  # flash faster forward + backward (made up)
    monkeypatch.setattr(attention, "_time_fwd_ms", lambda c, q, k, v, reps: fwd[c])
    monkeypatch.setattr(attention, "_time_fwd_bwd_ms", lambda c, q, k, v, reps: fwd_bwd[c])
    attention._chosen.clear()
    attention._measured.clear()
    q = torch.randn(2, 4, 16, 72, dtype=torch.bfloat16)
    assert attention._choose(q, q, q) == "sdpa-flash"
    with torch.no_grad():
        assert attention._choose(q, q, q) == "sdpa-cudnn"
    assert sorted(k[-1] for k in attention._measured) == ["infer", "train"]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with torch.no_grad():
        assert attention._choose(q, q, q) == "sdpa-cudnn"       # primed: the measured choice
    assert attention._choose(q, q, q) == "sdpa-flash"
    assert attention._choose(q[:1], q[:1], q[:1]) == "sdpa"    # an unprimed shape: SDPA picks
    attention._chosen.clear()
    assert attention.prime((2, 4, 16, 72), torch.bfloat16, "cpu", training=False) is None  # nothing to choose
    assert kernels.prime_attention((2, 4, 16, 72), torch.bfloat16, "cpu", training=True) is None


def _attention_float64(q, k, v):
    """softmax(q k^T / sqrt(D)) v written out in float64: the contract every attention kernel is held to."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v
    return out, (q, k, v)


@pytest.mark.parametrize("forced", [None, "sdpa-math"])
def test_attention_forward_and_backward_against_float64(forced):
    """kernels.ops.attention at head_dim 72, 37 tokens, in the model's token-major layout (q/k/v as transposed
    views of (B, N, H, D)), forward and backward against float64 (a review, 2026-12-05: only the fp32 forward was
    compared, and against the fp32 reference). On the CPU: SDPA's own pick, and sdpa-math forced; the GPU test
    does every candidate."""
    from kernels import attention
    torch.manual_seed(0)
    B, N, H, D = 2, 37, 3, 72
    q, k, v = (torch.randn(B, N, H, D).transpose(1, 2).requires_grad_() for _ in range(3))
    grad = torch.randn(B, H, N, D)
    attention.set_attention(forced)
    try:
        out = ops.attention(q, k, v)
    finally:
        attention.set_attention(None)
    ref, leaves = _attention_float64(q, k, v)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, leaves, grad.double())
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-5)


def test_attention_reports_its_choice():
    q, k, v = (torch.randn(1, 2, 37, 72) for _ in range(3))
    out = ops.attention(q, k, v)
    torch.testing.assert_close(out, reference.attention(q, k, v))
    assert kernels.describe()["ops"]["attention"] == "sdpa-cpu"
    from kernels import attention
    attention.set_attention("fa3")
    try:
        with pytest.raises(BackendUnavailable):
            ops.attention(q, k, v)
    finally:
        attention.set_attention(None)


# ----------------------------------------------------------------------------- the model on the fused path

def test_compiled_block_fullgraph_matches_reference(tmp_path, monkeypatch):
    from modeling.lightningdit import LightningDiTBlock, VisionRotaryEmbeddingFast
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    block = LightningDiTBlock(144, 2, use_qknorm=True).to(DEV)  # head_dim 72 as XL
    for p in block.parameters():  # the zero adaLN init would hide the modulate/gate paths
        torch.nn.init.normal_(p, std=0.05)
    tables = VisionRotaryEmbeddingFast(36, 5).to(DEV)
    x, c = torch.randn(2, 25, 144, device=DEV), torch.randn(2, 144, device=DEV)
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)  # fullgraph: any graph break raises
    out = compiled(x, c, tables)
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), list(block.parameters()))
    assert set(kernels.describe()["ops"].values()) >= {"triton"}
    kernels.set_backend("reference")
    ref = block(x, c, tables)
    ref_grads = torch.autograd.grad((ref * g).sum(), list(block.parameters()))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_parity_fixture_on_fused_path(parity_dir, parity_configs):
    from modeling.checkpoint import load_dit_checkpoint
    from modeling.lightningdit import LightningDiT
    cfg = {k: v for k, v in parity_configs["lightningdit_b"].items() if k != "kind"}  # head_dim 72, qk-norm
    model = LightningDiT(**cfg).eval()
    load_dit_checkpoint(str(parity_dir / "lightningdit_b.pt"), model, weights="ema")
    io = torch.load(parity_dir / "lightningdit_b_io.pt", weights_only=False)
    with torch.no_grad():
        out = model(io["x"], io["t"], io["y"])
    assert kernels.describe()["ops"]["gated_residual_norm_modulate"] == "triton"
    torch.testing.assert_close(out, io["out_ema"], rtol=1e-4, atol=1e-5)
