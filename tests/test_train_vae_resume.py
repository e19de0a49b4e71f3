"""The VA-VAE trainer with 2 DeepSpeed processes (torchrun, gloo, ZeRO-2, both engines, GAN active): killed with
SIGKILL after a mid-run checkpoint and restarted, it logs bitwise the same losses and ends with bitwise the same
weights as the uninterrupted run. And the documented per-rank data order."""
import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from multiproc import env, metrics_by_step, torchrun

REPO = Path(__file__).resolve().parents[1]
STEPS, EVERY = 16, 4
NOT_COMPARED = ("time", "img_per_s", "eta_s", "peak_rss_gib", "peak_mem_gib", "peak_reserved_gib")


def _cmd(run_dir):
    return torchrun("train.train_vae", "--config", "configs/vavae_tiny_cpu.yaml",
                    "model.ch=32", "model.ch_mult=[1,2]", "model.resolution=32", "model.z_channels=4", "model.embed_dim=4",
                    "foundation.name=random_tiny", "foundation.input_size=null", "loss.disc_start=3", "loss.disc_ndf=8",
                    "data.num_samples=24", f"train.steps={STEPS}", "train.batch_per_gpu=2", "train.zero_stage=2",
                    f"checkpoint.every={EVERY}", "checkpoint.keep_last=5", f"logging.dir={run_dir}", "logging.every=1",
                    "logging.progress_bar=false", "logging.tensorboard=false", "logging.reconstructions=false")


def _metrics(run_dir):
    """step -> every logged value but the timings, from the last line written for that step."""
    return metrics_by_step(run_dir, lambda r: {k: v for k, v in r.items() if k not in NOT_COMPARED})


@pytest.mark.extended  # CI: the DiT's, test_multinode
def test_two_process_zero2_kill_and_resume_is_bitwise(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    r = subprocess.run(_cmd(straight), cwd=REPO, env=env(), timeout=300, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]

    log = open(tmp_path / "killed.log", "w")
    p = subprocess.Popen(_cmd(killed), cwd=REPO, env=env(), stdout=log, stderr=subprocess.STDOUT,
                         start_new_session=True)
    pointer = killed / "checkpoints" / "latest.json"
    deadline = time.time() + 420  # a loaded 2-core machine starts 2 DeepSpeed ranks slowly
    while time.time() < deadline and p.poll() is None and not (
            pointer.exists() and json.loads(pointer.read_text())["step"] >= EVERY):
        time.sleep(0.02)
    # SIGKILL torchrun and both workers (each worker has its own process group) right after the checkpoint
    workers = psutil.Process(p.pid).children(recursive=True)
    os.killpg(p.pid, signal.SIGKILL)
    for w in workers:
        with contextlib.suppress(psutil.NoSuchProcess):
            w.kill()
    p.wait(timeout=30)
    psutil.wait_procs(workers, timeout=30)
    log.close()
    assert pointer.exists(), "no checkpoint before the kill:\n" + (tmp_path / "killed.log").read_text()[-3000:]
    saved = json.loads(pointer.read_text())["step"]
    assert EVERY <= saved < STEPS, "the run was not interrupted mid-way"
    assert not (killed / "tokenizer.pt").exists()

    r = subprocess.run(_cmd(killed), cwd=REPO, env=env(), timeout=300, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {killed / 'checkpoints'}" in r.stdout + r.stderr

    a, b = _metrics(straight), _metrics(killed)
    assert sorted(a) == list(range(1, STEPS + 1)) and sorted(b) == sorted(a)
    assert "d_loss" in a[STEPS] and "vf_weight" in a[STEPS] and a[STEPS]["skipped_steps"] == 0
    assert a == b  # float equality of every logged loss term, adaptive weight and gradient norm
    ta = torch.load(straight / "tokenizer.pt", weights_only=False)["state_dict"]
    tb = torch.load(killed / "tokenizer.pt", weights_only=False)["state_dict"]
    assert ta.keys() == tb.keys() and "loss.discriminator.main.0.weight" in ta and "linear_proj.weight" in ta
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def test_documented_per_rank_data_order():
    """docs/vavae_training.md: epoch e is numpy PCG64([seed, e]).permutation(N); global batch g is
    perm[g*B*W : (g+1)*B*W] and rank r reads its B-sized slice r. Ranks never overlap."""
    from train.train_vae import SkimageCrops
    seed, n, b, w = 3, 20, 2, 2
    loaders = [SkimageCrops(32, n, b, seed, rank, w) for rank in range(w)]
    perm = np.random.Generator(np.random.PCG64([seed, 1])).permutation(n)
    for loader in loaders:
        loader.epoch = 1
    batches = [list(loader) for loader in loaders]
    assert [len(x) for x in batches] == [n // (b * w)] * w
    for g in range(n // (b * w)):
        for rank in range(w):
            idx = perm[g * b * w + rank * b: g * b * w + (rank + 1) * b]
            expected = torch.stack([loaders[rank].image(int(i), 1) for i in idx])
            assert torch.equal(batches[rank][g][0], expected)
    assert loaders[0].epoch == 2  # the iterator moved the loader to its next epoch
