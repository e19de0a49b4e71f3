"""The VA-VAE trainer end to end on the CPU: a few steps with a substitute foundation model."""
import json

import pytest
import torch

from modeling.checkpoint import load_vavae_checkpoint
from modeling.foundation import FoundationModelUnavailable
from modeling.vavae import AutoencoderKL
from train import train_vae
from train.config import load_config
from train.train_vae import VAVAEConfig, main, train


def tiny_cfg(out, **overrides):
    data = {
        "model": {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "resolution": 32,
                  "z_channels": 4, "embed_dim": 4},
        "foundation": {"name": "random_tiny", "allow_substitute": True},
        "loss": {"disc_start": 2, "disc_ndf": 8, "perceptual_weight": 1.0},
        "data": {"source": "skimage", "num_samples": 6, "num_workers": 0},
        "train": {"out_dir": str(out), "batch_size": 2, "max_steps": 4, "ckpt_every": 2, "log_every": 1},
    }
    for k, v in overrides.items():
        sec, key = k.split(".")
        data[sec][key] = v
    from train.config import from_dict
    return from_dict(VAVAEConfig, data)


def tokenizer(out):
    return torch.load(out / "tokenizer.pt", weights_only=False)["state_dict"]


def test_runs_resumes_bit_exact_and_exports(tmp_path):
    full = train(tiny_cfg(tmp_path / "a"))
    assert full["step"] == 4 and full["nonfinite_skipped"] == 0
    train(tiny_cfg(tmp_path / "b", **{"train.max_steps": 2}))   # "killed" after the step-2 checkpoint
    train(tiny_cfg(tmp_path / "b"))                              # resumes from it, crosses an epoch
    a, b = tokenizer(tmp_path / "a"), tokenizer(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert "linear_proj.weight" in a and "loss.logvar" in a and "loss.discriminator.main.0.weight" in a
    vae = AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), resolution=32,
                        z_channels=4, embed_dim=4)
    load_vavae_checkpoint(str(tmp_path / "a" / "tokenizer.pt"), vae)
    logs = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert "g" not in logs[1] and "g" in logs[2] and "d_loss" in logs[2]   # GAN from disc_start = 2
    assert all(r["vf_weight"] > 0 for r in logs)


def test_nonfinite_step_is_skipped_and_counted_bf16(tmp_path, monkeypatch):
    orig = train_vae.VAVAELoss.generator_loss

    def poisoned(self, inputs, recon, posterior, global_step, *a, **kw):
        loss, logs = orig(self, inputs, recon, posterior, global_step, *a, **kw)
        return (loss * float("nan") if global_step == 1 else loss), logs

    monkeypatch.setattr(train_vae.VAVAELoss, "generator_loss", poisoned)
    res = train(tiny_cfg(tmp_path, **{"train.max_steps": 3, "train.precision": "bf16"}))
    assert res["step"] == 3 and res["nonfinite_skipped"] == 1
    sd = tokenizer(tmp_path)
    assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())


def test_repeated_nonfinite_aborts_with_checkpoint_intact(tmp_path, monkeypatch):
    orig = train_vae.VAVAELoss.generator_loss

    def poisoned(self, inputs, recon, posterior, global_step, *a, **kw):
        loss, logs = orig(self, inputs, recon, posterior, global_step, *a, **kw)
        return (loss * float("nan") if global_step >= 2 else loss), logs

    monkeypatch.setattr(train_vae.VAVAELoss, "generator_loss", poisoned)
    with pytest.raises(train_vae.NonFiniteLossError, match="consecutive"):
        train(tiny_cfg(tmp_path, **{"train.max_steps": 10, "train.max_consecutive_nonfinite": 2}))
    assert (tmp_path / "checkpoints" / "step_0000002" / "state.pt").is_file()


def test_refuses_real_model_without_weights(tmp_path):
    cfg = tiny_cfg(tmp_path, **{"foundation.name": "dinov2_vitl14", "foundation.allow_substitute": False})
    with pytest.raises(FoundationModelUnavailable, match="efficientnet_lite0"):
        train(cfg)
    assert not (tmp_path / "checkpoints").exists()


def test_shipped_configs_are_the_paper_recipe():
    stages = [load_config(VAVAEConfig, f"configs/vavae_f16d32_stage{i}.yaml") for i in (1, 2, 3)]
    assert [(s.loss.vf_weight, s.loss.cos_margin, s.loss.distmat_margin, s.train.epochs) for s in stages] == \
        [(0.5, 0.0, 0.0, 100), (0.1, 0.0, 0.0, 15), (0.1, 0.5, 0.25, 15)]
    for s in stages:
        assert (s.optim.lr, s.optim.betas, s.loss.kl_weight, s.loss.disc_start) == (1e-4, (0.5, 0.9), 1e-6, 5001)
        assert (s.loss.disc_loss, s.loss.perceptual_weight, s.foundation.name) == ("hinge", 1.0, "dinov2_vitl14")
        assert s.model.ch_mult == (1, 1, 2, 2, 4) and s.model.z_channels == 32
    assert stages[1].train.init_from.endswith("stage1/tokenizer.pt")
    tiny = load_config(VAVAEConfig, "configs/vavae_tiny_cpu.yaml")
    assert tiny.foundation.allow_substitute and tiny.foundation.name == "efficientnet_lite0"


def test_cli_print_config(capsys):
    main(["--config", "configs/vavae_tiny_cpu.yaml", "--set", "train.max_steps=7", "--print-config"])
    assert "max_steps: 7" in capsys.readouterr().out
