"""`train.precision: bf16` really computes in bf16 inside the DeepSpeed engine, for every ZeRO stage and with
torchao FP8, and DeepSpeed prints no warning about autocast or precision at start-up.

Why the emulation: DeepSpeed's engine asks `torch.is_autocast_enabled()` (no device argument = CUDA autocast)
whether an autocast is open around its forward, and on a GPU it then switches that autocast OFF inside the
forward unless its own `torch_autocast` section is enabled. On this CPU machine the same call does not see a
CPU autocast, so the outer autocast survives and the bug cannot show. The fixture makes the device-less calls
see the CPU autocast, exactly as they see the CUDA autocast on a GPU, so the branch a GPU takes runs here.
"""
import logging
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from modeling.config import load_config
from train.dit_config import DiTTrainConfig
from train.train_dit import Trainer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def gpu_autocast_semantics(monkeypatch):
    real_enabled, real_get_dtype = torch.is_autocast_enabled, torch.get_autocast_dtype

    def is_autocast_enabled(device_type=None):
        return real_enabled(device_type) if device_type is not None else real_enabled("cpu")

    monkeypatch.setattr(torch, "is_autocast_enabled", is_autocast_enabled)
    # torchao's Float8Linear reads the "GPU" autocast dtype the same device-less way
    monkeypatch.setattr(torch, "get_autocast_gpu_dtype", lambda: real_get_dtype("cpu"))
    # the emulation is in force: DeepSpeed's module sees CPU autocast as a GPU sees CUDA autocast
    import deepspeed.runtime.torch_autocast as ds_autocast
    with torch.autocast("cpu", torch.bfloat16):
        assert ds_autocast.torch.is_autocast_enabled()


@pytest.fixture
def deepspeed_warnings():
    """Every WARNING (or worse) DeepSpeed logs while the test runs."""
    records = []

    class Grab(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Grab(level=logging.WARNING)
    ds_logger = logging.getLogger("DeepSpeed")
    ds_logger.addHandler(handler)
    yield records
    ds_logger.removeHandler(handler)


def tiny_cfg(tmp_path, *overrides):
    return load_config(DiTTrainConfig, REPO / "configs/dit_tiny_cpu.yaml", [
        f"checkpoint.dir={tmp_path}/ckpt", f"logging.dir={tmp_path}", "logging.progress_bar=false",
        "logging.tensorboard=false", "train.steps=1", "model.hidden_size=96", *overrides])


def linear_output_dtypes(trainer):
    """Run one optimizer step and return {module name: output dtype} for every Linear/Conv in the engine."""
    seen, handles = {}, []
    for name, mod in trainer.engine.module.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            handles.append(mod.register_forward_hook(
                lambda m, i, o, name=name: seen.__setitem__(name, o.dtype)))
    try:
        out = trainer.train_step(trainer.next_batch())
    finally:
        for h in handles:
            h.remove()
    assert out["applied"] == 1.0 and all(torch.isfinite(torch.tensor(v)) for v in out.values())
    return seen


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_bf16_inside_engine_every_zero_stage(tmp_path, zero_stage, gpu_autocast_semantics, deepspeed_warnings):
    trainer = Trainer(tiny_cfg(tmp_path, "train.precision=bf16", f"train.zero_stage={zero_stage}"))
    seen = linear_output_dtypes(trainer)
    assert len(seen) >= 4 * trainer.cfg.model.depth  # qkv, proj, w12, w3 per block at least
    fp32 = sorted(n for n, d in seen.items() if d != torch.bfloat16)
    assert not fp32, f"ZeRO-{zero_stage}: these layers computed in fp32 under precision=bf16: {fp32}"
    # fp32 master weights (the EMA is fp32 by construction)
    assert all(p.dtype == torch.float32 for p in trainer.engine.module.parameters())
    bad = [m for m in deepspeed_warnings if "autocast" in m.lower() or "precision" in m.lower()]
    assert not bad, f"DeepSpeed warned at start-up: {bad}"
    # ZeRO-3 leaves torch's own linear in place (its replacement breaks torch.compile for the whole process)
    assert torch.nn.functional.linear is torch._C._nn.linear


def test_bf16_inside_engine_with_torchao_fp8(tmp_path, gpu_autocast_semantics, deepspeed_warnings):
    # 48 wide on 4x4 latents: FP8-divisible, small enough for the CPU's slow FP8 matmul emulation
    trainer = Trainer(tiny_cfg(tmp_path, "train.precision=bf16", "train.zero_stage=2", "fp8.backend=torchao",
                               "fp8.allow_cpu=true", "model.hidden_size=48", "model.input_size=4"))
    from torchao.float8.float8_linear import Float8Linear
    fp8_layers = [n for n, m in trainer.engine.module.named_modules() if isinstance(m, Float8Linear)]
    assert len(fp8_layers) == 4 * trainer.cfg.model.depth
    seen = linear_output_dtypes(trainer)
    fp32 = sorted(n for n, d in seen.items() if d != torch.bfloat16)
    assert not fp32, f"FP8 run: these layers computed in fp32 under precision=bf16: {fp32}"
    assert set(fp8_layers) <= set(seen)
    bad = [m for m in deepspeed_warnings if "autocast" in m.lower() or "precision" in m.lower()]
    assert not bad, f"DeepSpeed warned at start-up: {bad}"


def test_fp32_precision_stays_fp32(tmp_path, gpu_autocast_semantics):
    trainer = Trainer(tiny_cfg(tmp_path, "train.precision=fp32", "train.zero_stage=2"))
    seen = linear_output_dtypes(trainer)
    assert set(seen.values()) == {torch.float32}


def test_engine_without_autocast_is_refused(tmp_path, gpu_autocast_semantics, monkeypatch):
    """Negative control: an engine whose autocast is off trains in fp32; the trainer's own probe stops it at the
    first step instead of training silently in fp32. (A train.deepspeed override that would do it is refused
    before anything is built: tests/test_train_deepspeed_config.py; here the engine's setting is switched off.)"""
    from modeling.config import ConfigError
    with pytest.raises(ConfigError, match="train.deepspeed.torch_autocast: .* set train.precision"):
        Trainer(tiny_cfg(tmp_path / "refused", "train.precision=bf16",
                         'train.deepspeed={"torch_autocast": {"enabled": false}}'))
    trainer = Trainer(tiny_cfg(tmp_path, "train.precision=bf16", "train.zero_stage=2"))
    monkeypatch.setattr(trainer.engine._config, "torch_autocast_enabled", False)
    with pytest.raises(RuntimeError, match="computed in torch.float32 inside the DeepSpeed engine"):
        trainer.train_step(trainer.next_batch())
