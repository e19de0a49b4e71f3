"""Config system: YAML + overrides, refusal of bad keys/values before anything starts, shipped configs."""
import subprocess
import sys
from pathlib import Path

import pytest

from modeling.config import ConfigError, dump_config, load_config, read_yaml, to_dict, from_dict
from train.dit_config import DiTTrainConfig

REPO = Path(__file__).resolve().parents[1]
DIT_CONFIGS = sorted((REPO / "configs").glob("dit_*.yaml"))


def test_overrides_and_number_parsing():
    cfg = load_config(DiTTrainConfig, REPO / "configs/dit_tiny_cpu.yaml",
                      ["optim.lr=1e-4", "optim.betas=[0.8, 0.9]", "train.zero_stage=3", "fp8.recipe=null"])
    assert cfg.optim.lr == 1e-4 and cfg.optim.betas == (0.8, 0.9) and cfg.train.zero_stage == 3
    assert cfg.model.hidden_size == 64  # untouched keys come from the file
    # the dump reads back to the same config
    assert from_dict(DiTTrainConfig, __import__("yaml").safe_load(dump_config(cfg))) == cfg


@pytest.mark.parametrize("override, words", [
    ("optim.lrr=1e-4", "optim.lrr"),                       # unknown key, named with its section
    ("nosuchsection.x=1", "nosuchsection"),
    ("optim.lr=fast", "optim.lr"),                          # bad type
    ("optim.lr=-1", "lr must be > 0"),                      # bad value
    ("train.zero_stage=4", "train.zero_stage"),
    ("train.precision=fp16", "train.precision"),
    ("train.global_batch=30", "multiple of batch_per_gpu"),  # cross-field rule
    ("model.size=XXL/1", "unknown"),
    ("fp8.recipe=delayed", "does not fit backend"),        # recipe without / for another backend
    ("optim.betas=[0.9]", "expected 2 items"),
    ("checkpoint.keep_last=0", "keep_last"),
])
def test_bad_config_refused_with_clear_message(override, words):
    with pytest.raises(ConfigError, match=None) as err:
        load_config(DiTTrainConfig, REPO / "configs/dit_tiny_cpu.yaml", [override])
    assert words in str(err.value), str(err.value)


def test_cli_refuses_bad_config_before_start(tmp_path):
    """Exit code 2 and the message, before any process group, model or run directory exists."""
    run_dir = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "train.train_dit", "--config", "configs/dit_tiny_cpu.yaml",
                        f"logging.dir={run_dir}", "--set", "train.ema_decay=1.5"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert "config error" in p.stderr and "ema_decay" in p.stderr
    assert not run_dir.exists()


@pytest.mark.parametrize("path", DIT_CONFIGS, ids=[p.name for p in DIT_CONFIGS])
def test_shipped_dit_configs_validate(path):
    cfg = load_config(DiTTrainConfig, path)
    assert set(read_yaml(path)) <= set(to_dict(cfg))


def test_xl1_config_is_the_paper_recipe():
    cfg = load_config(DiTTrainConfig, REPO / "configs/dit_xl1_64ep.yaml")
    assert cfg.model.size == "XL/1" and cfg.model.input_size == 16 and cfg.model.in_channels == 32
    assert cfg.model.class_dropout_prob == 0.1 and cfg.model.num_classes == 1000
    assert (cfg.train.steps, cfg.train.global_batch) == (80_000, 1024)
    assert 80_000 * 1024 / 1_281_167 == pytest.approx(64, abs=0.1)  # 64 ImageNet epochs
    assert (cfg.optim.lr, cfg.optim.betas, cfg.optim.weight_decay) == (2e-4, (0.9, 0.95), 0.0)
    assert cfg.train.precision == "bf16" and cfg.train.ema_decay == 0.9999
    assert cfg.train.time_dist == "logit_normal" and cfg.train.use_cosine_loss
    # the authors' released configs set no max_grad_norm (no clipping) and run 128 per GPU on 8 GPUs
    assert cfg.optim.grad_clip == 0.0
    assert cfg.train.batch_per_gpu == 128 and cfg.train.global_batch // (8 * cfg.train.batch_per_gpu) == 1


@pytest.mark.parametrize("name", ["dit_xl1_64ep", "dit_b1", "dit_l2"])
def test_recipe_configs_do_not_clip(name):
    assert load_config(DiTTrainConfig, REPO / f"configs/{name}.yaml").optim.grad_clip == 0.0
