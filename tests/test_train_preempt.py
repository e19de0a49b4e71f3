"""Checkpoint and stop on a signal (train/preempt.py): what SLURM sends before the time limit.

A 2-rank DiT run (gloo, ZeRO-2, the ranks started as plain processes) gets SIGUSR1 on rank 1 only: both ranks stop
after the same step (the first agreement step after the signal), exit 0, and that step's checkpoint is complete
(no periodic one exists: checkpoint.every is past the end); rank 0 says so in one line. The same command then
resumes from it and continues the step count. The recipe's side (the signal reaching every worker, the requeue
after the checkpoint) is tests/test_slurm.py."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from multiproc import env, free_port, metrics_by_step

REPO = Path(__file__).resolve().parents[1]
CHECK_EVERY = 3


def dit_args(run, steps):
    return ["--config", "configs/dit_tiny_cpu.yaml", f"train.steps={steps}", "train.global_batch=16",
            "train.batch_per_gpu=8", "train.zero_stage=2", "checkpoint.every=100000",
            f"checkpoint.stop_check_every={CHECK_EVERY}", f"checkpoint.dir={run}/ckpt", f"logging.dir={run}",
            "logging.every=1", "logging.progress_bar=false", "logging.tensorboard=false",
            "checkpoint.export_reference=false", "dist.timeout_s=60"]


def start_ranks(args, logs):
    port = free_port()
    return [subprocess.Popen([sys.executable, "-m", "train.train_dit", *args], cwd=REPO,
                             env={**env(), "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
                                  "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port},
                             stdout=subprocess.DEVNULL, stderr=open(logs / f"rank{r}.err", "w")) for r in range(2)]


def test_a_signal_on_one_rank_stops_both_after_one_checkpoint_and_resume_continues(tmp_path):
    run = tmp_path / "run"
    procs = start_ranks(dit_args(run, 500), tmp_path)
    metrics = run / "metrics.jsonl"
    try:
        deadline = time.time() + 300
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert all(p.poll() is None for p in procs) and time.time() < deadline, \
                (tmp_path / "rank0.err").read_text()[-3000:]
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGUSR1)  # one rank only: the agreement carries it to the other
        rcs = [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    err0 = (tmp_path / "rank0.err").read_text()
    assert rcs == [0, 0], (rcs, err0[-3000:], (tmp_path / "rank1.err").read_text()[-3000:])
    stopped = json.loads((run / "ckpt" / "latest.json").read_text())["step"]
    assert 2 <= stopped < 500 and stopped % CHECK_EVERY == 0, stopped
    assert sorted(p.name for p in (run / "ckpt").iterdir() if p.name.startswith("step_")) == \
        [f"step_{stopped:07d}"]  # the signal's checkpoint, the only one
    from train.checkpoint import CheckpointManager
    assert CheckpointManager(run / "ckpt").verify(run / "ckpt" / f"step_{stopped:07d}") is None
    lines = [ln for ln in err0.splitlines() if "SIGUSR1 received" in ln]
    assert len(lines) == 1 and f"stopped after step {stopped} with its checkpoint" in lines[0], err0[-2000:]
    assert "done: step" not in err0 and "Traceback" not in err0
    assert sorted(metrics_by_step(run, lambda r: r["loss"])) == list(range(1, stopped + 1))

    # the same command (here with an end in sight) resumes from the signal's checkpoint
    procs = start_ranks(dit_args(run, stopped + 2), tmp_path)
    assert [p.wait(timeout=300) for p in procs] == [0, 0], (tmp_path / "rank0.err").read_text()[-3000:]
    err0 = (tmp_path / "rank0.err").read_text()
    assert f"at step {stopped}" in err0 and "resumed from" in err0
    assert sorted(metrics_by_step(run, lambda r: r["loss"])) == list(range(1, stopped + 3))


@pytest.mark.parametrize("override,message", [
    ("checkpoint.stop_signal=SIGKILL", "checkpoint.stop_signal"),
    ("checkpoint.stop_check_every=0", "checkpoint.stop_check_every: must be >= 1"),
])
def test_bad_stop_settings_are_one_line(override, message):
    res = subprocess.run([sys.executable, "-m", "train.train_dit", "--config", "configs/dit_tiny_cpu.yaml", override],
                         cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_the_default_handler_is_back_after_fit():
    """A trainer's fit installs its handler and puts the previous one back (a notebook or a test process keeps
    its own); a trainer built in another thread installs none."""
    import threading

    import torch

    from train.preempt import StopRequest
    before = signal.getsignal(signal.SIGUSR1)
    stop = StopRequest("SIGUSR1", 1, 1, torch.device("cpu"))
    stop.install()
    assert signal.getsignal(signal.SIGUSR1) == stop._handler
    signal.raise_signal(signal.SIGUSR1)
    assert stop.agreed(1)
    stop.close()
    assert signal.getsignal(signal.SIGUSR1) == before
    other = StopRequest("SIGUSR1", 1, 1, torch.device("cpu"))
    t = threading.Thread(target=other.install)
    t.start()
    t.join()
    assert signal.getsignal(signal.SIGUSR1) == before and not other.agreed(1)
    assert not StopRequest("none", 1, 1, torch.device("cpu")).agreed(1)
