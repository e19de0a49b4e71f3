"""Checkpoint manager: atomic commit under SIGKILL, latest by step number, keep-last-k."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from train.checkpoint import POINTER, CheckpointManager, atomic_torch_save

REPO = Path(__file__).resolve().parents[1]

WRITER = r"""
import sys, torch
from train.checkpoint import CheckpointManager, atomic_torch_save
root = sys.argv[1]
m = CheckpointManager(root, keep_last=3)
tmp = m.begin(1)
atomic_torch_save({"step": 1, "w": torch.full((1000,), 1.0)}, tmp / "state.pt")
m.commit(1)
tmp = m.begin(2)
print("saving", flush=True)
for i in range(1000):  # a large checkpoint written piece by piece; killed somewhere in here
    atomic_torch_save({"step": 2, "w": torch.full((1_000_000,), 2.0)}, tmp / f"part{i % 8}.pt")
m.commit(2)
print("committed", flush=True)
"""


def test_sigkill_mid_save_keeps_previous_checkpoint(tmp_path):
    root = tmp_path / "ckpt"
    p = subprocess.Popen([sys.executable, "-c", WRITER, str(root)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.stdout.readline().strip() == "saving"
    time.sleep(0.5)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    assert p.returncode == -signal.SIGKILL
    m = CheckpointManager(root, keep_last=3)
    assert json.loads((root / POINTER).read_text())["step"] == 1
    step, path = m.latest()
    assert step == 1 and torch.load(path / "state.pt")["w"].eq(1.0).all()
    assert (root / "step_0000002.tmp").is_dir() and m.steps() == [1]  # the half-written one is not a checkpoint
    m.begin(3)  # the next save clears the leftover
    assert not (root / "step_0000002.tmp").exists()


def test_latest_is_the_pointer_step_not_size_or_mtime(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=None)
    for step, size in [(10, 100_000), (20, 10), (5, 10)]:  # the latest is the smallest, step 5 written last
        tmp = m.begin(step)
        atomic_torch_save(torch.zeros(size), tmp / "x.pt")
        if step != 5:
            m.commit(step)
    assert m.latest()[0] == 20
    (tmp_path / POINTER).write_text("{not json")  # unreadable pointer: highest complete step directory
    assert m.latest()[0] == 20
    (tmp_path / POINTER).unlink()
    assert m.latest()[0] == 20


def test_keep_last_k(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2, 3, 4):
        tmp = m.begin(step)
        atomic_torch_save({"step": step}, tmp / "s.pt")
        m.commit(step)
    assert m.steps() == [3, 4] and m.latest()[0] == 4
    with pytest.raises(ValueError):
        CheckpointManager(tmp_path, keep_last=0)


def test_atomic_torch_save_failure_leaves_old_file(tmp_path):
    path = tmp_path / "a.pt"
    atomic_torch_save({"v": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError):
        atomic_torch_save({"v": Unpicklable()}, path)
    assert torch.load(path)["v"] == 1 and [p.name for p in tmp_path.iterdir()] == ["a.pt"]
