"""kernels.rope_attention: the qkv GEMM's output -> RoPE -> attention -> (B, N, H*D) in one Triton kernel each way,
and the chooser around it (kernels.ops.rope_attention: the split path or the fused one).

Forward and backward (d qkv) vs the reference on float64 copies at awkward sizes: head_dim 72 (two tiles, 64 + 16
with 8 lanes masked), 64 (one), 40 (32 + 16), 8 (one masked 16-wide tile); token counts that are not a multiple of the
interpreter's 16-token tiles (17, 33: several query and key blocks, the last ragged, so the backward's dQ scratch is
summed over key blocks); fp32 (IEEE products) and bf16 (within the error of the reference run in bf16 itself);
large logits (the online softmax's running maximum); a strided qkv. Then opcheck of both custom ops, the model's
Attention with the fused path forced, and the chooser's refusals.
"""
import os

import torch

if not torch.cuda.is_available():  # must precede the first import of the Triton kernels
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

import kernels  # noqa: E402
from kernels import attention as attention_mod  # noqa: E402
from kernels import ops, reference, rope_attention  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _restore():
    yield
    kernels.set_backend("auto")
    kernels.set_attention(None)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def tables(N, D):
    angle = torch.rand(N, D // 2, device=DEV).repeat_interleave(2, dim=-1) * 6.283
    return angle.cos(), angle.sin()


def run(qkv, cos, sin, H, g):
    """(out, d qkv) of the fused kernel."""
    qkv = qkv.detach().requires_grad_()
    out = rope_attention.rope_attention_triton(qkv, cos, sin, H)
    out.backward(g)
    return out.detach(), qkv.grad


def run_reference(qkv, cos, sin, H, g, dtype=torch.float64):
    x = qkv.detach().to(dtype).requires_grad_()
    out = reference.rope_attention(x, cos.to(dtype), sin.to(dtype), H)
    out.backward(g.to(dtype))
    return out.detach(), x.grad


def test_even_only_where_every_block_of_the_launch_divides_n():
    """EVEN (no row masks) only where N is a multiple of every block a launch may run: XL/1's 256 tokens under the
    autotuners (64- and 128-row tiles), not 192 (a 128-row tile would overrun), not 257."""
    assert rope_attention._even(256, rope_attention.FWD_TILES) and rope_attention._even(256, rope_attention.BWD_TILES)
    assert not rope_attention._even(192, rope_attention.FWD_TILES) and rope_attention._even(192, [(64, 64)])
    assert not rope_attention._even(257, rope_attention.BWD_TILES)


def test_head_split():
    assert [rope_attention.head_split(d) for d in (72, 64, 40, 8, 128, 96, 12)] == [
        (64, 16), (64, 0), (32, 16), (16, 0), (128, 0), (64, 32), (16, 0)]


@pytest.mark.parametrize("B,N,H,D", [(2, 17, 3, 72), (1, 33, 2, 64), (1, 20, 2, 40), (2, 9, 2, 8)])
def test_fp32_forward_backward_vs_float64(B, N, H, D):
    torch.manual_seed(N + D)
    cos, sin = tables(N, D)
    qkv = torch.randn(B, N, 3 * H * D, device=DEV)
    g = torch.randn(B, N, H * D, device=DEV)
    out, dqkv = run(qkv, cos, sin, H, g)
    ref, dref = run_reference(qkv, cos, sin, H, g)
    assert out.shape == (B, N, H * D) and out.dtype == torch.float32 and out.is_contiguous()
    assert dqkv.shape == qkv.shape and dqkv.dtype == torch.float32
    assert rel_err(out, ref) < 2e-6 and rel_err(dqkv, dref) < 2e-6
    torch.testing.assert_close(out, ref.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dqkv, dref.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("k_once,dq_atomic", [(False, False), (True, True)])
@pytest.mark.parametrize("B,N,H,D", [(2, 17, 3, 72), (1, 33, 2, 64), (1, 32, 2, 72)])
def test_the_linears_bias_added_and_its_gradient_summed(B, N, H, D, k_once, dq_atomic, monkeypatch):
    """The qkv Linear's bias handed to the fused kernel (the model runs the Linear without it): q's and k's added
    where they are loaded (k's once into the rotated scratch under K_ONCE), v's to the output (each softmax row sums
    to 1); the backward recomputes q, k, v with it and writes each query and key block's column sums of d q, d k, d v
    for torch to add up. fp32 vs float64, both variants of each kernel, several ragged blocks; and 32 tokens, a
    multiple of the interpreter's 16-row blocks (EVEN: the forward and the atomics' backward without row masks, as
    at XL/1's 256 tokens on a GPU)."""
    monkeypatch.setattr(rope_attention, "_INTERPRETER_K_ONCE", k_once)
    monkeypatch.setattr(rope_attention, "_INTERPRETER_DQ_ATOMIC", dq_atomic)
    torch.manual_seed(N + D)
    cos, sin = tables(N, D)
    qkv = torch.randn(B, N, 3 * H * D, device=DEV, requires_grad=True)
    bias = torch.randn(3 * H * D, device=DEV, requires_grad=True)
    g = torch.randn(B, N, H * D, device=DEV)
    out = rope_attention.rope_attention_triton(qkv, cos, sin, H, bias)
    dqkv, dbias = torch.autograd.grad(out, [qkv, bias], g)
    x, b = (t.detach().double().requires_grad_() for t in (qkv, bias))
    ref = reference.rope_attention(x, cos.double(), sin.double(), H, bias=b)
    dref, dbref = torch.autograd.grad(ref, [x, b], g.double())
    for got, want in ((out, ref), (dqkv, dref), (dbias, dbref)):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.detach(), want.float(), rtol=1e-4, atol=1e-5)


def test_bf16_within_the_references_own_bf16_error():
    """bf16 q/k/v, P rounded to bf16 for its products (as FlashAttention): no further from the float64 truth than
    the reference computed in bf16 (SDPA on bf16 q/k/v rotated in fp32 and rounded), with a margin: 1.5x on a GPU,
    3x in the Triton interpreter, whose fp32 -> bf16 casts truncate instead of rounding (measured: 2.0x forward)."""
    torch.manual_seed(1)
    B, N, H, D = 2, 17, 3, 72
    cos, sin = tables(N, D)
    qkv = torch.randn(B, N, 3 * H * D, device=DEV).bfloat16()
    g = torch.randn(B, N, H * D, device=DEV).bfloat16()
    out, dqkv = run(qkv, cos, sin, H, g)
    assert out.dtype == dqkv.dtype == torch.bfloat16
    ref, dref = run_reference(qkv, cos, sin, H, g)
    ref16, dref16 = run_reference(qkv, cos, sin, H, g, dtype=torch.bfloat16)
    margin = 1.5 if DEV == "cuda" else 3.0
    assert rel_err(out, ref) < margin * rel_err(ref16, ref)
    assert rel_err(dqkv, dref) < margin * rel_err(dref16, dref)


def test_the_autotuners_variants_compute_the_same_bits(monkeypatch):
    """The forward's two ways of rotating k (where each query block's program loads it, or once per head into a
    scratch: K_ONCE) and the backward's two ways of summing dQ over key blocks (a scratch read and rewritten per
    key block, or atomics into it: DQ_ATOMIC) -- all among the autotuners' configs -- give the same out, lse and
    d qkv bit for bit, over several query and key blocks (33 tokens: three 16-token blocks, the last ragged) and
    both head tiles."""
    torch.manual_seed(5)
    B, N, H, D = 1, 33, 2, 72
    cos, sin = tables(N, D)
    qkv = torch.randn(B, N, 3 * H * D, device=DEV)
    dout = torch.randn(B, N, H * D, device=DEV)

    def config(configs, name, value):
        if DEV == "cuda":
            return next(c for c in configs if c.kwargs[name] == value and c.kwargs["BLOCK_M"] == 64)
        monkeypatch.setattr(rope_attention, f"_INTERPRETER_{name}", value)
        return None

    fwd = {k: rope_attention.rope_attention_forward(qkv, cos, sin, H, config(rope_attention.FWD_CONFIGS,
                                                                             "K_ONCE", k)) for k in (False, True)}
    assert all(torch.equal(a, b) for a, b in zip(fwd[False], fwd[True]))
    out, lse = fwd[True]
    bwd = {a: rope_attention.rope_attention_backward(dout, qkv, out, lse, cos, sin, H,
                                                     config(rope_attention.BWD_CONFIGS, "DQ_ATOMIC", a))[0]
           for a in (False, True)}
    assert torch.equal(bwd[False], bwd[True])
    ref, dref = run_reference(qkv, cos, sin, H, dout)
    torch.testing.assert_close(out, ref.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bwd[True], dref.float(), rtol=1e-4, atol=1e-5)


def test_autotuned_records_the_pick_and_every_candidates_time(monkeypatch):
    """autotuned() (in describe() and the GPU suite's records) holds, per kernel and key, the config the autotuner
    picked and the time of every candidate it timed for that key -- taken from the autotuner when it tunes a new key,
    not overwritten by later calls of a key already tuned."""
    class FakeTuner:  # triton.autotune's surface used here: cache, configs_timings, tuned[grid](...)
        def __init__(self):
            self.cache, self.configs_timings = {}, {}

        def __getitem__(self, grid):
            def launch(*args, **const):
                key = (const["D"], args[0])
                if key not in self.cache:
                    a, b = rope_attention.BWD_CONFIGS[:2]
                    self.configs_timings = {a: [2.0, 1.9, 2.1], b: [1.5, 1.4, 1.6]}
                    self.cache[key] = b
            return launch

    fake = FakeTuner()
    from kernels._triton import TunedKernels
    monkeypatch.setattr(rope_attention, "TUNED", TunedKernels(fwd=FakeTuner(), bwd=fake))
    rope_attention.TUNED.run("bwd", (1,), (256,), {"D": 72})
    fake.configs_timings = {}  # a later launch of the same key neither re-tunes nor overwrites
    rope_attention.TUNED.run("bwd", (1,), (256,), {"D": 72})
    got = rope_attention.autotuned()["bwd"][str((72, 256))]
    a, b = rope_attention.BWD_CONFIGS[:2]
    assert got == {"picked": str(b), "ms": {str(a): 2.0, str(b): 1.5}}
    assert "DQ_ATOMIC: True" in got["picked"]


def test_large_logits_and_a_strided_qkv():
    """Scores up to ~1e3 (the running maximum must rescale the sums) and qkv a column slice of a wider tensor
    (row stride > 3*H*D): fp32 within 1e-4 of float64."""
    torch.manual_seed(2)
    B, N, H, D = 1, 33, 2, 72
    cos, sin = tables(N, D)
    wide = torch.randn(B, N, 3 * H * D + 24, device=DEV) * 6
    qkv = wide[..., 8:8 + 3 * H * D]
    assert not qkv.is_contiguous()
    g = torch.randn(B, N, H * D, device=DEV)
    out, dqkv = run(qkv, cos, sin, H, g)
    ref, dref = run_reference(qkv, cos, sin, H, g)
    torch.testing.assert_close(out, ref.float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dqkv, dref.float(), rtol=1e-4, atol=1e-3 * dref.abs().max().item())


def test_opcheck_custom_ops():
    torch.manual_seed(3)
    B, N, H, D = 1, 17, 2, 72
    cos, sin = tables(N, D)
    qkv = torch.randn(B, N, 3 * H * D, device=DEV, requires_grad=True)
    torch.library.opcheck(rope_attention.rope_attention_op, (qkv, cos, sin, H))
    out, lse = rope_attention.rope_attention_op(qkv.detach(), cos, sin, H)
    dout = torch.randn_like(out)
    torch.library.opcheck(rope_attention.rope_attention_bwd_op, (dout, qkv.detach(), out, lse, cos, sin, H))
    bias = torch.randn(qkv.shape[-1], device=DEV, requires_grad=True)
    torch.library.opcheck(rope_attention.rope_attention_op, (qkv, cos, sin, H, bias))
    out, lse = rope_attention.rope_attention_op(qkv.detach(), cos, sin, H, bias.detach())
    torch.library.opcheck(rope_attention.rope_attention_bwd_op,
                          (dout, qkv.detach(), out, lse, cos, sin, H, bias.detach()))


def test_backward_is_one_op_with_no_zeros_for_the_unused_lse_gradient(record_ops):
    """The autograd formula asks for no materialized gradient of lse (which nothing uses): the backward is the one
    custom op, without a zeros tensor filled for lse every step."""
    B, N, H, D = 1, 9, 1, 72
    cos, sin = tables(N, D)
    qkv = torch.randn(B, N, 3 * H * D, device=DEV, requires_grad=True)
    out = rope_attention.rope_attention_op(qkv, cos, sin, H)[0]
    with record_ops() as rec:
        out.backward(torch.randn_like(out))
    assert [op for op in rec.ops if op.startswith("vavae.")] == ["vavae.rope_attention_bwd.default"], rec.ops
    assert not [op for op in rec.ops if "zeros" in op or "fill" in op], rec.ops


def test_bad_shapes_name_what_does_not_fit():
    cos, sin = tables(5, 8)
    with pytest.raises(ValueError, match="3\\*H\\*D"):
        rope_attention.rope_attention_triton(torch.randn(1, 5, 40, device=DEV), cos, sin, 3)
    with pytest.raises(ValueError, match="cos/sin"):
        rope_attention.rope_attention_triton(torch.randn(1, 5, 48, device=DEV), cos[:4], sin[:4], 2)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_model_attention_with_the_fused_path(qk_norm):
    """modeling.lightningdit.Attention through ops.rope_attention: forced rope-fused (no qk-norm) agrees with the
    reference backend's path within fp32 rounding, forward and parameter gradients, and says so in describe();
    with the RMSNorm qk-norm the fused path refuses in one line (it does not fuse the norm) and the chooser's
    default runs the split path."""
    from modeling.lightningdit import Attention, VisionRotaryEmbeddingFast
    torch.manual_seed(0)
    attn = Attention(144, 2, qk_norm=qk_norm, use_rmsnorm=True).to(DEV)  # head_dim 72
    rope = VisionRotaryEmbeddingFast(36, 5).to(DEV)
    x = torch.randn(2, 25, 144, device=DEV)
    kernels.set_backend("reference")
    ref = attn(x, rope)
    g = torch.randn_like(ref)
    params = list(attn.parameters())
    ref_grads = torch.autograd.grad((ref * g).sum(), params)
    kernels.set_backend("triton")
    kernels.set_attention("rope-fused")
    if qk_norm:
        with pytest.raises(kernels.BackendUnavailable, match="qk-norm"):
            attn(x, rope)
        kernels.set_attention(None)
    out = attn(x, rope)
    ran = kernels.describe()["ops"]["rope_attention"]
    assert ran.startswith("split") if qk_norm else ran == "rope-fused (triton)"
    grads = torch.autograd.grad((out * g).sum(), params)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_forcing_a_kernel_keeps_the_split_path_and_the_name_is_a_choice():
    """Forcing an SDPA kernel (VAVAE_ATTENTION / set_attention) keeps the block on the split path with that kernel;
    rope-fused is one of the names the trainer's `train.attention` accepts, and prime on the CPU chooses nothing."""
    assert attention_mod.FUSED_BLOCK in attention_mod.CHOICES
    torch.manual_seed(4)
    N, H, D = 9, 2, 8
    cos, sin = tables(N, D)
    qkv = torch.randn(1, N, 3 * H * D, device=DEV)
    kernels.set_backend("triton")
    kernels.set_attention("sdpa-math")
    out = ops.rope_attention(qkv, cos, sin, H)
    assert kernels.describe()["ops"]["rope_attention"].startswith("split")
    assert kernels.describe()["ops"]["attention"] == "sdpa-math"
    torch.testing.assert_close(out, reference.rope_attention(qkv, cos, sin, H), rtol=1e-4, atol=1e-5)
    if DEV == "cpu":
        assert kernels.prime_attention((1, H, N, D), torch.float32, "cpu", training=True) is None
