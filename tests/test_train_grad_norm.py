"""train.grad_norm_dtype: ZeRO 1-3 gradient norms in fp32 (the gradients' dtype, as torch's clip_grad_norm_ in the
authors' trainer) instead of DeepSpeed's fp64, which casts every gradient partition to double first (6.9 ms a step
at XL/1 on an H200). DeepSpeed's own function comes back with fp64; one ZeRO-2 step computes its norm in the dtype
asked, and the two norms agree to fp32 rounding."""
import os
from pathlib import Path

import torch

import deepspeed.runtime.zero.stage_1_and_2 as zero12
import deepspeed.runtime.zero.utils as zero_utils
from modeling.config import load_config
from train.dit_config import DiTTrainConfig
from train.distributed import set_zero_grad_norm_dtype
from train.train_dit import Trainer

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))


def test_set_and_restore_deepspeeds_norm_dtype():
    set_zero_grad_norm_dtype("fp64")
    own = zero12.get_norm_dtype
    try:
        assert set_zero_grad_norm_dtype("fp32") == "fp32 (utils, stage_1_and_2, stage3)"
        assert zero12.get_norm_dtype() is torch.float32 and zero_utils.get_norm_dtype() is torch.float32
    finally:
        assert set_zero_grad_norm_dtype("fp64") == "fp64 (DeepSpeed's)"
    assert zero12.get_norm_dtype is own and zero12.get_norm_dtype() is torch.float64  # the CPU has fp64


def test_zero2_step_norm_in_the_dtype_asked(tmp_path, monkeypatch):
    norms = {}
    try:
        for dtype in ("fp64", "fp32"):
            cfg = load_config(DiTTrainConfig, REPO / "configs/dit_tiny_cpu.yaml", [
                f"checkpoint.dir={tmp_path}/{dtype}/ckpt", f"logging.dir={tmp_path}/{dtype}",
                "logging.progress_bar=false", "logging.tensorboard=false", "train.steps=1", "train.zero_stage=2",
                f"train.grad_norm_dtype={dtype}"])
            trainer = Trainer(cfg)
            assert f"grad norm {'fp32 (utils' if dtype == 'fp32' else 'fp64'}" in trainer.describe()
            seen = []
            in_force = zero12.get_norm_dtype
            monkeypatch.setattr(zero12, "get_norm_dtype", lambda f=in_force: seen.append(f()) or seen[-1])
            out = trainer.step_on_device(trainer.fetch_batch())
            monkeypatch.undo()
            assert out.applied and seen and set(seen) == {torch.float32 if dtype == "fp32" else torch.float64}
            norms[dtype] = float(out.metrics["grad_norm"])
    finally:
        set_zero_grad_norm_dtype("fp64")
    assert norms["fp64"] > 0 and abs(norms["fp32"] - norms["fp64"]) <= 1e-5 * norms["fp64"], norms
