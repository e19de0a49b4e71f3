"""Issue 12 through the DiT trainer: a second run on the same checkpoint folder is refused naming the first, an
unwritable logging folder is refused before the model is built, a truncated newest trainer.pt falls back to
the previous complete checkpoint, and resume loads only through the safe loaders."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from train.checkpoint import NotWritableError, RunLockedError, UnsafeCheckpointError
from modeling.config import load_config
from train.dit_config import DiTTrainConfig
from train.train_dit import Trainer

REPO = Path(__file__).resolve().parents[1]


def cfg(tmp_path, *extra):
    return load_config(DiTTrainConfig, REPO / "configs/dit_tiny_cpu.yaml", [
        f"checkpoint.dir={tmp_path}/ckpt", f"logging.dir={tmp_path}", "logging.progress_bar=false",
        "logging.tensorboard=false", "checkpoint.export_reference=false", "train.zero_stage=0", *extra])


def test_second_run_refused_and_unwritable_folder_found_first(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, %r)\n"
        "from train.checkpoint import CheckpointManager\n"
        "m = CheckpointManager(%r); m.acquire(); print('locked', flush=True); time.sleep(3600)")
        % (str(REPO), str(tmp_path / "ckpt"))], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=f"pid {holder.pid}"):
            Trainer(cfg(tmp_path))
    finally:
        holder.kill()
        holder.wait()
    (tmp_path / "blocker").write_text("")
    with pytest.raises(NotWritableError, match="blocker"):
        Trainer(cfg(tmp_path / "x", f"logging.dir={tmp_path}/blocker/logs"))


def test_truncated_newest_checkpoint_falls_back_and_planted_code_is_refused(tmp_path, caplog):
    Trainer(cfg(tmp_path, "train.steps=4", "checkpoint.every=2", "checkpoint.keep_last=3")).fit()
    newest = tmp_path / "ckpt" / "step_0000004" / "trainer.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    with caplog.at_level("WARNING"):
        t = Trainer(cfg(tmp_path, "train.steps=4", "checkpoint.every=2", "train.seed=1"))
    assert t.step == 2 and "step_0000004" in caplog.text and "train.seed: 0 -> 1" in caplog.text
    rank = tmp_path / "ckpt" / "step_0000002" / "rank_00000.pt"
    import torch

    class P:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path}/ran",))
    torch.save({"rng": P()}, rank)
    manifest = rank.parent / "COMPLETE.json"  # (a planted file with a matching manifest, not a torn one)
    m = json.loads(manifest.read_text())
    m["files"]["rank_00000.pt"] = rank.stat().st_size
    manifest.write_text(json.dumps(m))
    with pytest.raises(UnsafeCheckpointError, match="rank_00000.pt"):
        Trainer(cfg(tmp_path, "train.steps=4", "checkpoint.every=2"))
    assert not (tmp_path / "ran").exists()
