"""train.precision=bf16 really computes in bf16 inside the DeepSpeed engines, on the GPU's code path.

DeepSpeed's engine.forward switches an autocast opened OUTSIDE it off when its own `torch_autocast` section is
disabled (deepspeed/runtime/torch_autocast.py, `autocast_if_enabled`), but it asks `torch.is_autocast_enabled()`,
which only sees CUDA autocast: on the CPU the bug never shows. These tests make that check see the CPU autocast
too (`gpu_autocast_branch`), hook every Linear / Conv the step runs (both engines, LPIPS, the foundation model)
and fail if one computes in fp32 -- except the layers the adaptive weights differentiate, which must be fp32 --
or if DeepSpeed logs anything about autocast / precision. A negative control shows the probe catches the bug.
"""
import logging
import re
from functools import partial

import pytest
import torch
import torch.nn as nn

from modeling.config import from_dict
from modeling.vavae import Upsample
from train.train_vae import FP32_LAYERS, Trainer
from train.vae_config import VAVAETrainConfig

MATMUL_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class _TorchSeeingCpuAutocast:
    """`torch` as deepspeed.runtime.torch_autocast sees it, except that is_autocast_enabled() also reports a CPU
    autocast (on a GPU it reports the CUDA one): the engine then takes the branch it takes on a GPU."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def is_autocast_enabled(*args):
        return torch.is_autocast_enabled(*args) if args else (torch.is_autocast_enabled("cpu")
                                                              or torch.is_autocast_enabled("cuda"))


@pytest.fixture
def gpu_autocast_branch(monkeypatch):
    import deepspeed.runtime.torch_autocast as ds_autocast
    monkeypatch.setattr(ds_autocast, "torch", _TorchSeeingCpuAutocast())
    monkeypatch.setattr(ds_autocast, "_WARNED_NESTED_AUTOCAST", False)  # warn again in this test
    return ds_autocast


@pytest.fixture
def deepspeed_records():
    """Every record DeepSpeed's logger emits during the test."""
    from deepspeed.utils import logger as ds_logger
    records = []
    handler = logging.Handler(level=logging.DEBUG)
    handler.emit = records.append
    ds_logger.addHandler(handler)
    yield records
    ds_logger.removeHandler(handler)


def precision_complaints(records):
    pattern = re.compile(r"autocast|precision|bf16|bfloat16|fp16|dtype", re.I)
    return [r.getMessage() for r in records
            if pattern.search(r.getMessage()) and (r.levelno >= logging.WARNING or "outside DeepSpeed" in r.getMessage())]


class DtypeProbe:
    """Forward hooks on every Linear / Conv of the given module trees: name -> set of output dtypes. The decoder's
    Upsample computes its conv from the conv's parameters (kernels.ops.upsample_conv): it is probed at its own
    output, under its conv's name."""

    def __init__(self, roots):
        self.seen, self.names, self.handles = {}, [], []
        for prefix, root in roots.items():
            upsamples = {name for name, m in root.named_modules() if isinstance(m, Upsample)}
            for name, m in root.named_modules():
                if name in upsamples:
                    probed, full = m, f"{prefix}.{name}.conv"
                elif isinstance(m, MATMUL_MODULES) and name.rpartition(".")[0] not in upsamples:
                    probed, full = m, f"{prefix}.{name}"
                else:
                    continue
                self.names.append(full)
                self.handles.append(probed.register_forward_hook(partial(self._hook, full)))

    def _hook(self, name, module, inputs, output):
        self.seen.setdefault(name, set()).add(output.dtype)

    def remove(self):
        for h in self.handles:
            h.remove()


def probe_for(trainer):
    roots = {"ae": trainer.engine_ae.module, "disc": trainer.engine_d.module,
             "foundation": trainer.foundation.net}
    if trainer.loss_fn.perceptual_loss is not None:
        roots["lpips"] = trainer.loss_fn.perceptual_loss
    return DtypeProbe(roots)


def bf16_cfg(tmp_path, **train):
    return from_dict(VAVAETrainConfig, {
        "model": {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [16], "resolution": 32,
                  "z_channels": 4, "embed_dim": 4},
        "foundation": {"name": "random_tiny", "allow_substitute": True},
        "loss": {"disc_start": 0, "disc_ndf": 8, "perceptual_weight": 1.0},
        "data": {"source": "synthetic", "num_samples": 8},
        "train": {"batch_per_gpu": 2, "steps": 2, "precision": "bf16", **train},
        "logging": {"dir": str(tmp_path), "tensorboard": False, "progress_bar": False}})


def one_step(trainer):
    """One step with its metrics left on the device (their dtype is checked)."""
    out = trainer.step_on_device(trainer.next_batch())
    return out.applied, out.metrics


@pytest.mark.parametrize("zero_stage", [0, 1, 2])
def test_bf16_step_computes_in_bf16_on_the_gpu_branch(tmp_path, gpu_autocast_branch, deepspeed_records, zero_stage):
    trainer = Trainer(bf16_cfg(tmp_path, zero_stage=zero_stage))
    probe = probe_for(trainer)
    applied, logs = one_step(trainer)
    probe.remove()
    vae = trainer.engine_ae.module.vae
    for part in (vae.encoder, vae.decoder):  # the conv_outs' input: fp32 from their GroupNorm + SiLU (FP32_LAYERS)
        h = torch.randn(1, part.norm_out.num_channels, 4, 4, dtype=torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert part.norm_out(h).dtype == torch.float32
    assert applied and "d_loss" in logs and "lpips" in logs and "vf" in logs  # every part of the step ran

    fp32_layers = {f"ae.vae.{n}" for n in FP32_LAYERS}
    assert set(probe.seen) == set(probe.names), f"never called: {sorted(set(probe.names) - set(probe.seen))}"
    wrong = {n: d for n, d in probe.seen.items() if d != ({torch.float32} if n in fp32_layers else {torch.bfloat16})}
    assert not wrong, f"layers computing in the wrong dtype: {wrong}"
    assert any("attn" in n for n in probe.names)  # the attention's projections are covered too

    # fp32 master weights and fp32 gradients, no bf16 communication dtype, fp32 objective
    for engine in (trainer.engine_ae, trainer.engine_d):
        for p in engine.module.parameters():
            assert p.dtype == torch.float32 and not hasattr(p, "comm_dtype")
    assert all(v.dtype == torch.float32 for v in logs.values())
    assert trainer.foundation.dtype == torch.bfloat16
    assert not precision_complaints(deepspeed_records), precision_complaints(deepspeed_records)


def test_fp32_run_computes_in_fp32(tmp_path, gpu_autocast_branch, deepspeed_records):
    trainer = Trainer(bf16_cfg(tmp_path, precision="fp32"))
    probe = probe_for(trainer)
    assert one_step(trainer)[0]
    probe.remove()
    assert set(probe.seen) == set(probe.names)
    assert all(d == {torch.float32} for d in probe.seen.values())
    assert not precision_complaints(deepspeed_records)


def test_probe_catches_an_outer_autocast_that_deepspeed_switches_off(tmp_path, gpu_autocast_branch,
                                                                    deepspeed_records, monkeypatch):
    """Negative control: the old way (an autocast opened around engine(...), no torch_autocast section) trains
    in fp32 on a GPU. With the GPU branch emulated, the probe, the trainer's own PrecisionProbe and the
    DeepSpeed-warning check all see it. (The engines' autocast switched off on the built trainer: a train.deepspeed
    override of torch_autocast is refused before anything is built.)"""
    trainer = Trainer(bf16_cfg(tmp_path))
    for engine in trainer.engines.values():
        monkeypatch.setattr(engine._config, "torch_autocast_enabled", False)
    probe = probe_for(trainer)
    step = trainer.optimize

    def outer_autocast_step(x):
        with torch.autocast("cpu", torch.bfloat16):
            return step(x)

    monkeypatch.setattr(trainer, "optimize", outer_autocast_step)
    with pytest.raises(RuntimeError, match="computed in torch.float32"):
        one_step(trainer)
    probe.remove()
    assert probe.seen["ae.vae.decoder.conv_in"] == {torch.float32}
    assert any("disabled within the DeepSpeed engine" in m for m in precision_complaints(deepspeed_records))
