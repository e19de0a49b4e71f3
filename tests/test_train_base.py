"""One Trainer base (train/base.py): both trainers subclass it, share its config sections (one meaning per key),
and give the same return types: train_step(batch) -> {name: float}, fit() -> the same report shape. fit's steps
are train_step's steps, and the one resume path refuses another world size in one line."""
import dataclasses
import json
import typing
from pathlib import Path

import pytest
import torch

from modeling.config import ConfigError, field_comments, from_dict, load_config
from train import base, config_sections
from train.dit_config import DiTTrainConfig
from train.train_dit import DiTTrainer
from train.train_vae import VAVAETrainer
from train.vae_config import VAVAETrainConfig

REPO = Path(__file__).resolve().parents[1]
SHARED = {"data": config_sections.DataSection, "optim": config_sections.OptimSection,
          "train": config_sections.TrainSection, "checkpoint": config_sections.CheckpointSection,
          "logging": config_sections.LoggingSection, "profile": config_sections.ProfileSection,
          "dist": config_sections.DistSection}
REPORT_KEYS = {"step", "stopped_by", "total_steps", "images_seen", "skipped_steps", "metrics", "eval", "exports", "checkpoint",
               "logging_dir"}


def dit_cfg(out, *overrides):
    return load_config(DiTTrainConfig, REPO / "configs/dit_tiny_cpu.yaml", [
        f"logging.dir={out}", "logging.progress_bar=false", "logging.tensorboard=false", "logging.every=1",
        "train.zero_stage=0", "train.steps=2", "checkpoint.every=2", *overrides])


def vae_cfg(out, **train):
    return from_dict(VAVAETrainConfig, {
        "model": {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "resolution": 32,
                  "z_channels": 4, "embed_dim": 4},
        "foundation": {"name": "random_tiny", "allow_substitute": True},
        "loss": {"disc_start": 0, "disc_ndf": 8, "perceptual_weight": 0.0},
        "data": {"source": "skimage", "num_samples": 6, "num_workers": 0},
        "train": {"batch_per_gpu": 2, "steps": 2, **train},
        "checkpoint": {"every": 2},
        "logging": {"dir": str(out), "every": 1, "tensorboard": False, "progress_bar": False}})


def test_both_schemas_extend_the_shared_sections_and_document_every_key():
    for schema in (DiTTrainConfig, VAVAETrainConfig):
        hints = typing.get_type_hints(schema)
        assert issubclass(schema, config_sections.TrainerConfig)
        for name, section in SHARED.items():
            assert issubclass(hints[name], section), (schema.__name__, name)
        for f in dataclasses.fields(schema):  # every key a section in train/ declares (not modeling's, evaluation's)
            sec = hints[f.name]
            declared = {name for k in sec.__mro__ if dataclasses.is_dataclass(k) and k.__module__.startswith("train.")
                        for name in k.__dict__.get("__annotations__", {})}
            docs = field_comments(sec)
            undocumented = sorted(name for name in declared if not docs.get(name))
            assert not undocumented, f"{schema.__name__}.{f.name}: {undocumented} have no comment (--help text)"
    # one vocabulary for train.compile, and the VA-VAE's old word still reads (as its one meaning now)
    compile_choices = {typing.get_args(typing.get_type_hints(s)["train"].__dataclass_fields__["compile"].type)
                       for s in (DiTTrainConfig, VAVAETrainConfig)}
    assert compile_choices == {("none", "blocks")}
    old = from_dict(VAVAETrainConfig, {"data": {"source": "skimage"}, "train": {"steps": 1, "compile": "modules"}})
    assert old.train.compile == "blocks"
    with pytest.raises(ConfigError, match="train.zero_stage: 3 is not supported"):
        from_dict(VAVAETrainConfig, {"data": {"source": "skimage"}, "train": {"steps": 1, "zero_stage": 3}})
    # checkpoint.dir means the same in both: unset -> LOGGING_DIR/checkpoints
    for cfg in (DiTTrainConfig(), from_dict(VAVAETrainConfig, {"data": {"source": "skimage"}, "train": {"steps": 1}})):
        assert cfg.checkpoint.dir is None and cfg.checkpoint_dir() == Path(cfg.logging.dir) / "checkpoints"


def _check_step_floats(out, expected):
    assert isinstance(out, dict) and all(isinstance(k, str) and type(v) is float for k, v in out.items()), out
    assert out["applied"] == 1.0 and expected <= set(out)


def _check_report(report, trainer):
    assert set(report) == REPORT_KEYS
    assert report["step"] == trainer.step == report["total_steps"] == 2 and report["skipped_steps"] == 0
    assert report["stopped_by"] is None
    assert report["images_seen"] == 2 * trainer.global_batch
    assert all(isinstance(v, (int, float)) for v in report["metrics"].values()) and "loss" in report["metrics"]
    assert report["checkpoint"] == str(trainer.ckpt.step_dir(2)) and Path(report["checkpoint"]).is_dir()
    assert all(isinstance(p, str) and Path(p).exists() for p in report["exports"].values()) and report["exports"]


def test_host_to_device_pins_pageable_memory_for_a_gpu(monkeypatch):
    """A CPU tensor bound for a GPU is copied from page-locked memory (non_blocking); for the CPU it is left as it
    is. (Tensor methods stubbed: this machine has no GPU; tests/test_train_gpu.py times the real copy.)"""
    calls = []
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self: False)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: calls.append("pin") or self)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: calls.append(("to", a, k)) or self)
    base.host_to_device(torch.ones(2), torch.device("cuda"))
    assert calls == ["pin", ("to", (torch.device("cuda"),), {"non_blocking": True})]
    calls.clear()
    base.host_to_device(torch.ones(2), torch.device("cpu"))
    assert calls == [("to", (torch.device("cpu"),), {"non_blocking": True})]


def test_both_trainers_subclass_the_base_with_the_same_return_types(tmp_path, monkeypatch):
    copied = []  # both trainers' batches reach the device through base.host_to_device

    def recorded(t, device):
        copied.append(tuple(t.shape))
        return base.host_to_device(t, device)

    monkeypatch.setattr("train.train_dit.host_to_device", recorded)
    monkeypatch.setattr("train.train_vae.host_to_device", recorded)
    dit = DiTTrainer(dit_cfg(tmp_path / "dit"))
    vae = VAVAETrainer(vae_cfg(tmp_path / "vae"))
    for trainer in (dit, vae):
        assert isinstance(trainer, base.Trainer)
        for hook in ("build_model", "build_engines", "build_loader", "fetch_batch", "optimize", "export"):
            assert getattr(type(trainer), hook) is not getattr(base.Trainer, hook), hook
        for shared in ("train_step", "fit", "save", "resume", "load_checkpoint", "next_batch", "close"):
            assert getattr(type(trainer), shared) is getattr(base.Trainer, shared), shared
    _check_step_floats(dit.train_step(dit.next_batch()), {"loss", "mse", "cos", "grad_norm"})
    _check_step_floats(vae.train_step(vae.next_batch()), {"loss", "grad_norm", "d_loss", "d_grad_norm"})
    # a step's DiT latents and labels (two micro-batches of 8), the next step's (prefetched), the VA-VAE's images
    assert copied == [(16, 32, 8, 8), (16,), (16, 32, 8, 8), (16,), (2, 3, 32, 32)]
    assert dit.step == vae.step == 1
    dit_report, vae_report = dit.fit(), vae.fit()  # one more step each, from where train_step left off
    _check_report(dit_report, dit)
    _check_report(vae_report, vae)
    assert set(dit_report["exports"]) == {"reference", "pretrained_ema"} and set(vae_report["exports"]) == {"tokenizer"}
    assert vae_report["eval"]["psnr"] > 0


def test_fit_runs_train_steps_and_resume_refuses_another_world(tmp_path):
    """fit()'s loop (with the next batch prefetched during the backward) trains exactly as train_step on
    next_batch() does: the same losses and the same EMA, bit for bit."""
    import torch
    looped = DiTTrainer(dit_cfg(tmp_path / "fit", "checkpoint.export_reference=false"))
    looped.fit()
    lines = (tmp_path / "fit" / "metrics.jsonl").read_text().splitlines()
    logged = {r["step"]: r["loss"] for r in map(json.loads, lines)}
    stepped = DiTTrainer(dit_cfg(tmp_path / "steps", "checkpoint.resume=never"))
    losses = {s: stepped.train_step(stepped.next_batch())["loss"] for s in (1, 2)}
    assert losses == logged
    a, b = looped.ema.state_dict(), stepped.ema.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the checkpoint of the first run, read back by the one resume path: another world size is refused
    path = looped.ckpt.step_dir(2)
    with pytest.raises(ConfigError, match=r"written by 2 ranks with global batch 16; this run has 1 ranks"):
        stepped.check_same_world({"world_size": 2, "global_batch": 16}, {"train": {}}, path)
    stepped.close()
    again = DiTTrainer(dit_cfg(tmp_path / "fit", "train.steps=3"))
    assert again.step == 2 and again.images_seen == 2 * again.global_batch
    again.close()


def test_a_log_without_a_terminal_gets_one_metrics_line_per_record(tmp_path):
    """A SLURM log (stderr not a terminal) or progress_bar false: one INFO line per metrics record (the bar would
    write carriage returns into the file); an evaluation record shows its eval/* values."""
    import subprocess
    import sys
    run = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "train.train_dit", "--config", "configs/dit_tiny_cpu.yaml",
                          "train.steps=4", "logging.every=2", f"logging.dir={run}", f"checkpoint.dir={run}/ckpt",
                          "train.zero_stage=0", "logging.tensorboard=false", "checkpoint.export_reference=false"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)  # progress_bar: true, no terminal
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [ln.split(" train INFO ", 1)[1] for ln in res.stderr.splitlines() if " train INFO step " in ln]
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == len(records) == 2 and "\r" not in res.stderr, res.stderr[-2000:]
    for ln, rec in zip(lines, records):
        assert ln.startswith(f"step {rec['step']}/4 | loss {rec['loss']:.5g} | grad_norm ") and \
            f"| {rec['img_per_s']:.1f} img/s |" in ln and " | eta " in ln, ln
    from train.logging_utils import metrics_line
    assert metrics_line(500, 80000, {"eval/fid": 12.345678, "wall_clock_s": 9.0, "images_seen": 10}) == \
        "step 500/80000 | eval/fid 12.35"
    assert metrics_line(7, None, {"loss": 0.5, "skipped_steps": 2, "eta_s": 3725.0, "peak_mem_gib": 87.79}) == \
        "step 7 | loss 0.5 | peak 87.8 GiB | 2 non-finite steps skipped | eta 1h02m"
