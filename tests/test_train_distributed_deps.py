"""Without DeepSpeed installed, a trainer (and bench.vae_step, which builds one) stops in one line that says what
needs it and how to install it, instead of a ModuleNotFoundError traceback."""
import builtins
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist
from torch.distributed import distributed_c10d

from modeling.config import ConfigError
from train import distributed

REPO = Path(__file__).resolve().parents[1]


def test_missing_deepspeed_is_a_one_line_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # `import deepspeed` -> ModuleNotFoundError
    with pytest.raises(distributed.DeepSpeedUnavailable) as info:
        distributed.import_deepspeed()
    assert isinstance(info.value, ConfigError)  # what the CLIs print as `error: <one line>`, exit 2
    msg = str(info.value)
    assert "\n" not in msg and "pip install deepspeed" in msg and "train.train_vae" in msg


def test_a_broken_dependency_inside_deepspeed_keeps_its_traceback(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "deepspeed":  # DeepSpeed is there, one of its own imports is not
            raise ModuleNotFoundError("No module named 'hjson'", name="hjson")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ModuleNotFoundError) as info:
        distributed.import_deepspeed()
    assert not isinstance(info.value, ConfigError) and info.value.name == "hjson"


def test_trainer_cli_without_deepspeed_exits_2_in_one_line(monkeypatch, tmp_path, capsys):
    from train.train_vae import main
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    # init_distributed imports DeepSpeed only when no process group exists yet (another test in this process may
    # have made one); what it sets on the way is restored after the test
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29999",
                     TORCH_NCCL_ASYNC_ERROR_HANDLING="1").items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(distributed_c10d, "default_pg_timeout", distributed_c10d.default_pg_timeout)
    if isinstance(getattr(distributed_c10d, "default_pg_nccl_timeout", None), timedelta):
        monkeypatch.setattr(distributed_c10d, "default_pg_nccl_timeout", distributed_c10d.default_pg_nccl_timeout)
    monkeypatch.delenv("VAVAE_DEBUG", raising=False)
    rc = main(["--config", str(REPO / "configs/vavae_tiny_cpu.yaml"), f"logging.dir={tmp_path}",
               f"checkpoint.dir={tmp_path / 'ckpt'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error: DeepSpeed is not installed") and "pip install" in err[0]
    assert "Traceback" not in "\n".join(err)
