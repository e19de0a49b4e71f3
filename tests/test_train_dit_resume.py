"""The done-criterion: a tiny DiT trains with 2 DeepSpeed processes (ZeRO-2, gloo, gradient accumulation 2)
and, killed with SIGKILL after its mid-run checkpoint and restarted, gives bitwise the same losses and
final weights (model and EMA) as the uninterrupted run."""
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from multiproc import env, metrics_by_step, torchrun

REPO = Path(__file__).resolve().parents[1]
STEPS, EVERY = 12, 4


def _cmd(run_dir):
    return torchrun("train.train_dit", "--config", "configs/dit_tiny_cpu.yaml",
                    f"train.steps={STEPS}", "train.global_batch=32", "train.batch_per_gpu=8", "train.zero_stage=2",
                    f"checkpoint.every={EVERY}", "checkpoint.keep_last=5", f"checkpoint.dir={run_dir}/ckpt",
                    f"logging.dir={run_dir}", "logging.every=1", "logging.progress_bar=false",
                    "logging.tensorboard=false")


def _losses(run_dir):
    """step -> (loss, mse, cos, grad_norm) from the last line written for that step."""
    return metrics_by_step(run_dir, lambda r: (r["loss"], r["mse"], r["cos"], r["grad_norm"]))


@pytest.mark.extended  # CI: test_multinode's killed node resumes bitwise
def test_two_process_zero2_kill_and_resume_is_bitwise(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_cmd(straight), cwd=REPO, env=env(), check=True, timeout=300, capture_output=True)

    p = subprocess.Popen(_cmd(killed), cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    pointer = killed / "ckpt" / "latest.json"
    deadline = time.time() + 240
    while time.time() < deadline and not (pointer.exists() and json.loads(pointer.read_text())["step"] >= EVERY):
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)  # torchrun and both workers, right after the first checkpoint
    p.wait(timeout=30)
    saved = json.loads(pointer.read_text())["step"]
    assert EVERY <= saved < STEPS, "the run was not interrupted mid-way"

    subprocess.run(_cmd(killed), cwd=REPO, env=env(), check=True, timeout=300, capture_output=True)

    a, b = _losses(straight), _losses(killed)
    assert sorted(a) == list(range(1, STEPS + 1)) and sorted(b) == sorted(a)
    assert a == b  # float equality of every logged loss term and grad norm, including the steps after resume
    ref_a = torch.load(straight / "final_reference.pt")
    ref_b = torch.load(killed / "final_reference.pt")
    for part in ("model", "ema"):
        assert ref_a[part].keys() == ref_b[part].keys()
        for k in ref_a[part]:
            assert torch.equal(ref_a[part][k], ref_b[part][k]), (part, k)
    # the EMA moved away from the raw weights (it is updated, and differently from the model)
    k = "blocks.0.attn.qkv.weight"
    assert not torch.equal(ref_a["ema"][k], ref_a["model"]["module." + k])


@pytest.mark.extended  # CI: test_train_lost_rank
def test_lost_rank_exits_non_zero_promptly(tmp_path):
    """One worker of a 2-process run dies (SIGKILL): the run must end with a non-zero exit, not hang."""
    import psutil
    run_dir = tmp_path / "lost"
    cmd = _cmd(run_dir)
    cmd = [c for c in cmd if not c.startswith("train.steps=")] + ["train.steps=100000", "dist.timeout_s=30"]
    p = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    try:
        metrics = run_dir / "metrics.jsonl"
        deadline = time.time() + 240
        while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert p.poll() is None, "the run ended before training started"
            time.sleep(0.1)
        assert metrics.exists(), "training did not start"
        workers = [c for c in psutil.Process(p.pid).children(recursive=True) if "train.train_dit" in " ".join(c.cmdline())]
        assert len(workers) == 2, [c.cmdline() for c in workers]
        killed_at = time.time()
        workers[1].send_signal(signal.SIGKILL)
        rc = p.wait(timeout=120)
        assert rc != 0
        assert time.time() - killed_at < 90, "the surviving rank took too long to stop"
        time.sleep(1)
        assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers), "a worker was left running"
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
