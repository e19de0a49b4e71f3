"""GPU checks of the trainers' host side (run by bench/gpu_suite.sh with the kernel GPU tests): a batch's copy to
the GPU is queued behind the work already there instead of waiting for it; the trainer benchmark times steps run
back to back, as fit runs them."""
import sys
import time

import pytest
import torch

from train.base import host_to_device

pytestmark = pytest.mark.gpu


def test_a_batch_copy_does_not_wait_for_the_queued_gpu_work():
    """The DiT trainer prefetches the next batch right after queuing a step's backward (~0.3 s of GPU work at
    XL/1): the copy of an XL/1 batch of latents (256 x 32 x 16 x 16 fp32, 8 MB, pageable as the loaders make it)
    must return to the host before that work is done, and arrive intact."""
    dev = torch.device("cuda")
    lat = torch.randn(256, 32, 16, 16)
    assert not lat.is_pinned()
    host_to_device(lat, dev)
    torch.cuda.synchronize()  # the first pinned block allocated (cudaHostAlloc) outside the timing
    torch.cuda._sleep(int(2e9))  # ~1 s of queued GPU work (clock cycles)
    t = time.perf_counter()
    out = host_to_device(lat, dev)
    host_s = time.perf_counter() - t
    busy = not torch.cuda.current_stream().query()  # the queued work is still running: the copy did not wait for it
    torch.cuda.synchronize()
    assert busy and host_s < 0.2, f"the copy held the host {host_s:.3f} s behind the queued GPU work"
    assert torch.equal(out.cpu(), lat)


def test_the_benchmark_times_steps_back_to_back_on_the_device_timeline(tmp_path, monkeypatch):
    """bench.train_case.time_trainer_steps: two synchronisations in all (after the warm-up, after the last step),
    none of the benchmark's between steps; the steps' event intervals add up to the timed stretch."""
    from pathlib import Path

    from bench.train_case import build_trainer, time_trainer_steps
    config = Path(__file__).resolve().parents[1] / "configs/dit_tiny_cpu.yaml"
    trainer = build_trainer(config, ["train.zero_stage=0", "data.source=synthetic"], 8, tmp_path)
    syncs = []  # the benchmark's own (the trainer's and DeepSpeed's are theirs)
    real = torch.cuda.synchronize

    def counted(*a):
        if sys._getframe(1).f_code.co_filename.endswith("train_case.py"):
            syncs.append(1)
        return real(*a)

    monkeypatch.setattr(torch.cuda, "synchronize", counted)
    t = time.perf_counter()
    times, losses = time_trainer_steps(trainer, 1, 4)
    wall = time.perf_counter() - t
    assert len(syncs) == 2 and len(times) == len(losses) == 4
    assert all(x > 0 for x in times) and sum(times) <= wall and all(l == l for l in losses)
