"""train.recompute (train/recompute.py): the SwiGLU output recomputed in the backward instead of kept.

What is checked: the gradients are bit for bit the same with and without it (eager fp32, and inductor under bf16
autocast with our Triton ops in the interpreter; with the reference ops within bf16 rounding); what the compiled block keeps for
its backward shrinks by exactly the SwiGLU output (2F bytes per token in bf16) and by nothing else, counted by
bench.activation_memory; the config refuses the settings it cannot apply; the trainer says it on its start-up
line.
"""
import pytest
import torch

import kernels
from bench import activation_memory
from modeling.config import ConfigError, load_config
from modeling.lightningdit import LightningDiT, LightningDiTConfig
from train.dit_config import DiTTrainConfig
from train.recompute import apply_recompute

TINY = dict(hidden_size=64, num_heads=4, depth=2, patch_size=1, input_size=4, in_channels=4, num_classes=10)


def _grads(recompute, compile_backend=None, autocast=False, backend="reference"):
    torch.manual_seed(0)
    model = LightningDiT(LightningDiTConfig(**TINY)).train()
    for p in model.parameters():  # the reference init zeroes adaLN and the output layer: no gradient would flow
        torch.nn.init.normal_(p, std=0.05)
    assert apply_recompute(model, recompute, compiled=bool(compile_backend)) == (2 if recompute == "swiglu" else 0)
    if compile_backend:
        torch._dynamo.reset()  # past dynamo's recompile limit (8 per code object) a block would silently run eager
        for block in model.blocks:
            block.compile(backend=compile_backend, fullgraph=True)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(3, 4, 4, 4, generator=g), torch.rand(3, generator=g)
    y = torch.randint(0, 10, (3,), generator=g)
    with kernels.backend.active(backend), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x, t, y)
        (out.float() ** 2).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(a, b, bitwise=True):
    assert a.keys() == b.keys() and len(a) > 20
    for k in a:
        if bitwise:
            assert torch.equal(a[k], b[k]), k
        else:
            err = ((a[k].double() - b[k].double()).norm() / b[k].double().norm()).item()
            assert err < 1e-2, (k, err)  # bf16's tolerance (tests/test_kernels.py TOL)


def test_recompute_gives_the_same_gradients_eager():
    _assert_same(_grads("none"), _grads("swiglu"))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_recompute_gives_the_same_gradients_compiled(backend):
    """Our kernels: bit for bit. The reference ops: within fp32 rounding, not bit for bit -- w12's bias is added in
    the SwiGLU (`x12 + bias` in bf16, modeling.lightningdit.linear_leaving_bias), and whether inductor keeps that sum
    rounded to bf16 between kernels or recomputes it unrounded inside one depends on what the graph saves, which is
    what recompute changes: elements a bf16 rounding apart (measured up to 2.5e-3 relative, norm-wise, in w12's
    weight gradient; a wrong recomputation is O(1) off)."""
    _assert_same(_grads("none", "inductor", True, backend), _grads("swiglu", "inductor", True, backend),
                 bitwise=backend != "reference")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_compiled_block_keeps_the_swiglu_output_no_more(backend):
    kw = dict(size="B/1", input_size=4, compile_backend="inductor", batch=3, kernels_backend=backend,
              hidden_size=64, num_heads=4)
    none = activation_memory.saved_for_backward(recompute="none", **kw)
    swiglu = activation_memory.saved_for_backward(recompute="swiglu", **kw)
    F = none["swiglu_hidden"]
    assert F == 170 and none["tokens"] == 16 and none["depth"] == 12
    assert none["per_token"] - swiglu["per_token"] == 2 * F  # the bf16 (rows, F) SwiGLU output, nothing else
    # the reference adds w12's bias in bf16: the policy keeps that narrowing cast (2 * 2F bytes per block, not per
    # token); our kernel reads the fp32 parameter
    assert swiglu["fixed"] - none["fixed"] == (2 * 2 * F if backend == "reference" else 0)
    widths = lambda c: sorted(r["per_token"] for r in c["tensors"] if r["per_token"])  # noqa: E731
    kept = widths(none)
    kept.remove(2 * F)
    assert kept == widths(swiglu)
    if backend == "triton":
        assert none["kernels_ran"]["swiglu"] == "triton"
    # the arithmetic of the table: tokens x batch x depth
    assert activation_memory.at_batch(none, 8) == (none["per_token"] * 16 * 8 + none["fixed"]) * 12


def test_markdown_predicts_from_a_measured_peak():
    counts = [{"size": "XL/1", "tokens": 256, "hidden": 1152, "swiglu_hidden": 3072, "compile_backend": "inductor",
               "fp8": "none", "kernels_ran": {}, "depth": 28, "recompute": r, "per_token": p, "fixed": 0}
              for r, p in (("none", 46215.0), ("swiglu", 40071.0))]
    text = activation_memory.markdown(counts, 256, 96.0, "none")
    assert "| none | 46,215 | 78.98 | 0.0 | 96.0 |" in text
    assert "| swiglu | 40,071 | 68.48 | 0.0 | 85.5 |" in text


def test_recompute_config_refusals():
    def load(*overrides):
        return load_config(DiTTrainConfig, None, ["data.source=synthetic", *overrides])
    assert load("train.recompute=swiglu").train.recompute == "swiglu"
    assert load().train.recompute == "none"
    with pytest.raises(ConfigError, match="recompute"):
        load("train.recompute=everything")
    with pytest.raises(ConfigError, match="use_checkpoint"):
        load("train.recompute=swiglu", "model.use_checkpoint=true")
    with pytest.raises(ConfigError, match="use_swiglu"):
        load("train.recompute=swiglu", "model.use_swiglu=false")
    with pytest.raises(ConfigError, match="fp8.backend scaled_mm"):
        load("train.recompute=swiglu", "fp8.backend=scaled_mm")
    with pytest.raises(ValueError, match="unknown recompute"):
        apply_recompute(LightningDiT(LightningDiTConfig(**TINY)), "blocks")


def _train_two_steps(tmp_path, name, *extra):
    from pathlib import Path
    from train.train_dit import Trainer
    cfg = load_config(DiTTrainConfig, Path(__file__).resolve().parents[1] / "configs/dit_tiny_cpu.yaml", [
        f"checkpoint.dir={tmp_path}/{name}", f"logging.dir={tmp_path}/{name}", "logging.progress_bar=false",
        "logging.tensorboard=false", "train.steps=2", *extra])
    trainer = Trainer(cfg)
    trainer.fit()
    return trainer


def test_trainer_recomputes_and_says_so(tmp_path):
    """Through the DiT trainer (compiled blocks, aot_eager: the partitioner's recompute without a C++ build): every
    MLP recomputes, the start-up line says so, and two steps end on the weights of the run without it."""
    compiled = ("train.zero_stage=0", "train.compile=blocks", "train.compile_backend=aot_eager")
    plain = _train_two_steps(tmp_path, "plain", *compiled)
    recomputed = _train_two_steps(tmp_path, "recomputed", *compiled, "train.recompute=swiglu")
    assert "recompute swiglu" in recomputed.describe() and "recompute none" in plain.describe()
    blocks = recomputed.engine.module.blocks
    assert all(b.mlp.forward.recompute == "swiglu" for b in blocks)
    a, b = plain.engine.module.state_dict(), recomputed.engine.module.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_recompute_under_zero3(tmp_path):
    """ZeRO-3 gathers each Linear's partitioned weight in a hook around its forward: the recomputation in the
    backward runs w12 and w3 again, so the hooks must gather again. Two eager steps end on the weights of the run
    without recomputation, bit for bit (gathered from their partitions)."""
    from train.ema import _gathered

    def weights(trainer):
        params = list(trainer.engine.module.named_parameters())
        with _gathered([p for _, p in params]):
            return {n: p.detach().clone() for n, p in params}

    plain = weights(_train_two_steps(tmp_path, "plain", "train.zero_stage=3"))
    recomputed = weights(_train_two_steps(tmp_path, "recomputed", "train.zero_stage=3", "train.recompute=swiglu"))
    start = weights(_train_two_steps(tmp_path, "start", "train.zero_stage=3", "train.steps=1"))
    assert plain.keys() == recomputed.keys() and len(plain) > 20
    for k in plain:
        assert plain[k].numel() > 0 and torch.equal(plain[k], recomputed[k]), k
    assert any(not torch.equal(plain[k], start[k]) for k in plain)  # the second step moved them


def test_gpu_auto_count_runs_what_auto_runs_on_a_gpu():
    """--kernels gpu-auto: under compile our qkv_rope and SwiGLU, the reference norms (kernels/compiled_choices.json).
    qkv_rope writes q, k and v into buffers of their own, so the qkv GEMM's output (its pre-RoPE q and k: 2 x 2C
    bytes per token) is not kept alive by v being a view of it, as it is with the reference ops."""
    kw = dict(size="B/1", input_size=4, compile_backend="inductor", batch=3, hidden_size=64, num_heads=4)
    reference = activation_memory.saved_for_backward(kernels_backend="reference", **kw)
    gpu = activation_memory.saved_for_backward(kernels_backend="gpu-auto", **kw)
    ran = gpu["kernels_ran"]
    assert ran["qkv_rope"] == ran["swiglu"] == "triton" and ran["norm_modulate"] == "reference (inductor)"
    assert reference["per_token"] - gpu["per_token"] == 2 * 2 * 64
    assert kernels.backend.get_backend() == "auto" and not kernels.backend._state["auto_as_on_gpu"]
