"""train.grad_norm_dtype: ZeRO 1-3 gradient norms as torch's clip_grad_norm_ computes them in the authors' trainer
(fp32: the gradients' dtype, and under ZeRO 1/2 the per-gradient norms in one torch._foreach_norm) instead of
DeepSpeed's fp64, which casts every gradient partition to double first (6.9 ms a step at XL/1 on an H200) and
launches one norm kernel per gradient from a Python loop. DeepSpeed's own functions come back with fp64; one ZeRO-2
step computes its norm in the dtype asked; fp32 foreach is bit for bit fp32 through DeepSpeed's loop on the CPU
(where _foreach_norm takes the per-tensor path), with one norm call instead of one per gradient, and fp64 agrees to
fp32 rounding."""
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import deepspeed.runtime.zero.stage_1_and_2 as zero12
import deepspeed.runtime.zero.utils as zero_utils
from modeling.config import load_config
from train.dit_config import DiTTrainConfig
from train.distributed import _deepspeed_norm_direct, _foreach_grad_norm_direct, set_zero_grad_norm_dtype
from train.train_dit import Trainer

REPO = Path(__file__).resolve().parents[1]


def test_set_and_restore_deepspeeds_norm_dtype_and_loop():
    set_zero_grad_norm_dtype("fp64")
    own, own_direct = zero12.get_norm_dtype, zero12.DeepSpeedZeroOptimizer.get_grad_norm_direct
    try:
        assert set_zero_grad_norm_dtype("fp32") == "fp32 (utils, stage_1_and_2, stage3; ZeRO 1/2 foreach)"
        assert zero12.get_norm_dtype() is torch.float32 and zero_utils.get_norm_dtype() is torch.float32
        assert zero12.DeepSpeedZeroOptimizer.get_grad_norm_direct is _foreach_grad_norm_direct
    finally:
        assert set_zero_grad_norm_dtype("fp64") == "fp64 (DeepSpeed's)"
    assert zero12.get_norm_dtype is own and zero12.get_norm_dtype() is torch.float64  # the CPU has fp64
    assert zero12.DeepSpeedZeroOptimizer.get_grad_norm_direct is own_direct


class NormCalls(TorchDispatchMode):
    """Counts the norm ops dispatched (a per-gradient loop: one linalg_vector_norm each; foreach: one call)."""

    def __init__(self):
        super().__init__()
        self.calls = {"linalg_vector_norm": 0, "_foreach_norm": 0}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.calls:
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))


def test_zero2_step_norm_in_the_dtype_asked(tmp_path, monkeypatch):
    norms, weights, calls = {}, {}, {}
    try:
        for run in ("fp64", "fp32 loop", "fp32"):
            dtype = run.split()[0]
            cfg = load_config(DiTTrainConfig, REPO / "configs/dit_tiny_cpu.yaml", [
                f"checkpoint.dir={tmp_path}/{run}/ckpt", f"logging.dir={tmp_path}/{run}",
                "logging.progress_bar=false", "logging.tensorboard=false", "train.steps=1", "train.zero_stage=2",
                f"train.grad_norm_dtype={dtype}"])
            trainer = Trainer(cfg)
            assert f"grad norm {'fp32 (utils' if dtype == 'fp32' else 'fp64'}" in trainer.describe()
            if run == "fp32 loop":  # DeepSpeed's per-gradient loop, in fp32
                monkeypatch.setattr(zero12.DeepSpeedZeroOptimizer, "get_grad_norm_direct",
                                    _deepspeed_norm_direct["zero12"])
            seen = []
            in_force = zero12.get_norm_dtype
            monkeypatch.setattr(zero12, "get_norm_dtype", lambda f=in_force: seen.append(f()) or seen[-1])
            batch = trainer.fetch_batch()
            with NormCalls() as counted:
                out = trainer.step_on_device(batch)
            monkeypatch.undo()
            assert out.applied and seen and set(seen) == {torch.float32 if dtype == "fp32" else torch.float64}
            norms[run], calls[run] = float(out.metrics["grad_norm"]), counted.calls
            weights[run] = [p.detach().clone() for p in trainer.engine.module.parameters()]
    finally:
        set_zero_grad_norm_dtype("fp64")
    n_grads = sum(1 for p in trainer.engine.module.parameters() if p.requires_grad)
    # DeepSpeed's loop: one norm per gradient; ours: one _foreach_norm (the step's other norms: the cosine loss)
    loop, ours = calls["fp32 loop"], calls["fp32"]
    assert loop["_foreach_norm"] == 0 and ours["_foreach_norm"] == 1, calls
    assert loop["linalg_vector_norm"] - ours["linalg_vector_norm"] == n_grads, (calls, n_grads)
    assert norms["fp32"] == norms["fp32 loop"]  # the same numbers on the CPU, one call instead of n_grads
    assert all(torch.equal(a, b) for a, b in zip(weights["fp32"], weights["fp32 loop"]))
    assert norms["fp64"] > 0 and abs(norms["fp32"] - norms["fp64"]) <= 1e-5 * norms["fp64"], norms
