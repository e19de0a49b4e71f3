"""bench.glue_floor: the floor's arithmetic checked against the real tensors of a tiny LightningDiT's training
step. The model runs forward + backward under bf16 autocast on the reference ops; every kernels.ops call of a glue
op is recorded (its inputs, outputs, and through hooks the gradients of both), and each of the floor's moves must
name a tensor of that call with the floor's element count and element size (the fp32 residual stream, bf16 branch
outputs and adaLN vectors, fp32 norm weights and tables): so the table's bytes are those tensors' bytes. Every
tensor an op reads or writes must appear in the floor (nothing forgotten), and the per-step total is the sum."""
import inspect
import math

import pytest
import torch

import kernels
from kernels import attention as attention_mod
from bench import glue_floor
from kernels import ops, registry
from bench.glue_floor import StepShape

OUTPUTS = {"norm_modulate": ("out",), "gated_residual_norm_modulate": ("h", "out"), "gated_residual": ("out",),
           "qkv_rope": ("q", "k", "v"), "swiglu": ("out",)}
# gradients the floor does not move: the gated residual's d_x is d_out itself (the identity path); the final layer's
# h (the last block's MLP residual added, used by nothing but the final norm) gets a gradient in the reference only
# as its norm backward's intermediate, which the fused kernel never writes or reads
NO_BYTES = {("gated_residual", "d_x"), ("gated_residual_norm_modulate", "d_h")}


class Recorder:
    """Wraps kernels.ops.<name> for the glue ops: per call {tensor name: tensor}, gradients added by hooks."""

    def __init__(self, monkeypatch):
        self.calls = []
        for name in OUTPUTS:
            monkeypatch.setattr(ops, name, self._wrap(name, getattr(ops, name)))

    def _wrap(self, name, fn):
        sig = inspect.signature(registry.get(name).reference)

        def record(*args, **kwargs):
            bound = sig.bind(*args, **kwargs)
            out = fn(*args, **kwargs)
            outs = out if isinstance(out, tuple) else (out,)
            seen = {k: v for k, v in bound.arguments.items() if isinstance(v, torch.Tensor)}
            seen.update(zip(OUTPUTS[name], outs))
            call = (name, seen)
            for k, t in list(seen.items()):
                if t.requires_grad:
                    t.register_hook(lambda g, k=k, seen=seen: seen.__setitem__(f"d_{k}", g))
            self.calls.append(call)
            return out
        return record


def _step(monkeypatch, B=2):
    from modeling.lightningdit import LightningDiT
    torch.manual_seed(0)
    model = LightningDiT(input_size=4, patch_size=1, in_channels=4, hidden_size=48, depth=2, num_heads=2,
                         num_classes=3)
    with torch.no_grad():
        for p in model.parameters():  # the zero adaLN / output init would zero gradients we want to see
            p.add_(0.02 * torch.randn_like(p))
    shape = StepShape(B=B, N=16, C=48, H=2, D=24, F=128, depth=2, patch_in=4, patch_out=4)
    rec = Recorder(monkeypatch)
    # the floor's attention rows are the split path of ops.rope_attention (qkv_rope, then attention: what the step
    # ran on 2026-12-04); its reference inlines qkv_rope's, so run the split path through the recorded ops
    monkeypatch.setattr(ops, "rope_attention", attention_mod._split)
    kernels.set_backend("reference")
    x = torch.randn(B, 4, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, torch.rand(B), torch.tensor([0, 2][:B]))
    out.float().square().mean().backward()
    kernels.set_backend("auto")
    assert model.blocks[0].mlp.w12.weight.grad is not None
    return shape, rec.calls, model


def test_every_move_is_a_real_tensor_of_that_size_and_dtype(monkeypatch):
    shape, calls, model = _step(monkeypatch)
    assert shape.linear_params() == sum(  # the autocast casts' row: every Linear/conv weight and bias
        p.numel() for n, p in model.named_parameters()
        if n.endswith(("weight", "bias")) and not n.endswith(("norm1.weight", "norm2.weight", "norm_final.weight"))
        and "embedding_table" not in n)
    by_op = {}
    for name, seen in calls:
        by_op.setdefault(name, []).append(seen)
    floor_ops = [op for op in glue_floor.glue_ops(shape) if op.kernels_op]
    used = {name: 0 for name in by_op}
    for op in floor_ops:
        # the step's calls of this op, in order (norm_modulate: the blocks' norm1 first, the final layer's last)
        mine = by_op[op.kernels_op][used[op.kernels_op]:used[op.kernels_op] + op.count]
        used[op.kernels_op] += op.count
        assert len(mine) == op.count, op.name
        for seen in mine:
            x_rows = next(iter(seen.values())).shape[:-1].numel()
            counted = 0
            for m in op.moves:
                if m.rule == "stat":  # the fused kernels' per-row rstd: one fp32 per row of the op's input
                    assert (m.elements, m.itemsize) == (x_rows, 4), (op.name, m)
                else:
                    t = seen[m.tensor]
                    assert t.numel() == m.elements, (op.name, m, tuple(t.shape))
                    if m.rule == "gemm_dtype":  # a GEMM operand or its dgrad: autocast's bf16
                        assert m.itemsize == torch.bfloat16.itemsize and t.dtype in (torch.bfloat16, torch.float32)
                    else:
                        assert t.element_size() == m.itemsize, (op.name, m, t.dtype)
                counted += m.elements * m.itemsize
            assert counted == op.bytes()
            # nothing forgotten: every tensor the call read or wrote (and every gradient) is one of the moves
            moved = {m.tensor for m in op.moves}
            missing = {k for k in seen if k not in moved and (op.kernels_op, k) not in NO_BYTES}
            assert not missing, (op.name, missing)
    assert used == {name: len(c) for name, c in by_op.items()}  # every recorded call belongs to a floor row


def test_dtypes_are_the_ones_autocast_leaves(monkeypatch):
    """The assumptions of the table, on the real step: fp32 residual stream, bf16 branch outputs and adaLN
    vectors, bf16 q/k/v, fp32 norm weights."""
    _, calls, _ = _step(monkeypatch)
    grnm = next(seen for name, seen in calls if name == "gated_residual_norm_modulate")
    assert grnm["x"].dtype == grnm["h"].dtype == torch.float32
    assert grnm["y"].dtype == grnm["gate"].dtype == grnm["scale"].dtype == torch.bfloat16
    assert grnm["weight"].dtype == torch.float32
    q = next(seen for name, seen in calls if name == "qkv_rope")
    assert q["qkv"].dtype == q["q"].dtype == q["v"].dtype == q["d_q"].dtype == torch.bfloat16


def test_xl_table_totals_and_registered_bench_bytes():
    """The XL/1 table: rows sum to the total, ms = bytes / bandwidth, and the ops whose registered bench case
    moves the same tensors (all-bf16 qkv_rope and SwiGLU) declare the same bytes as the floor."""
    rows = glue_floor.floor_table(measured_copy_gbps=3000.0)
    total = rows[-1]
    assert math.isclose(total["GB_per_step"], sum(r["GB_per_step"] for r in rows[:-1]))
    assert math.isclose(total["ms_at_copy"], total["GB_per_step"] * 1e9 / 4200e9 * 1e3)
    assert math.isclose(total["ms_at_measured"], total["GB_per_step"] * 1e9 / 3000e9 * 1e3)
    assert 60 < total["ms_at_copy"] < 80  # 295 GB at 4.2 TB/s: the number in docs/kernels.md
    floor = {op.kernels_op: op for op in glue_floor.glue_ops() if op.kernels_op in ("qkv_rope", "swiglu")}
    for name, op in floor.items():
        case = registry.get(name).bench(registry.XL1, "meta", torch.bfloat16)
        assert (case.fwd_bytes, case.bwd_bytes) == (op.bytes("fwd"), op.bytes("bwd")), name
    text = glue_floor.main(["--copy-gbps", "3000"])
    assert "| **total** |" in text and "ms at 3000 GB/s" in text


def test_cli_rejects_bad_numbers():
    with pytest.raises(SystemExit) as e:
        glue_floor.main(["--copy-gbps", "-1"])
    assert e.value.code == 2
