"""Observability: JSON-lines + TensorBoard metrics, a progress bar, NVTX ranges and an nsys capture window.

Only rank 0 writes. `nvtx("forward")` marks a range in Nsight Systems timelines (free when CUDA is absent
or NVTX is switched off). `ProfileWindow` calls cudaProfilerStart/Stop around a step range, for
`nsys profile --capture-range=cudaProfilerApi --capture-range-end=stop`.
"""
import contextlib
import json
import logging
import os
import time
from pathlib import Path

import torch

log = logging.getLogger("train")


def repair_jsonl(path):
    """Drop a torn tail (a last line without its newline, or that does not parse: a run killed mid-write)
    from a JSON-lines file, so appending continues on a clean line. Returns the number of bytes dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    with open(path, "rb+") as f:
        data = f.read()
        keep = len(data)
        while keep:
            start = data.rfind(b"\n", 0, keep - 1) + 1
            line = data[start:keep]
            if line.endswith(b"\n") and line.strip():
                try:
                    json.loads(line)
                    break
                except ValueError:
                    pass
            elif line.endswith(b"\n"):  # an empty line
                break
            keep = start  # torn (no newline) or unparsable: drop it and look at the line before
        if keep < len(data):
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
            log.warning("%s: dropped a torn last record (%d bytes) left by an interrupted run", path, len(data) - keep)
    return len(data) - keep


class MetricsLogger:
    def __init__(self, directory, enabled=True, tensorboard=True, progress_bar=True, total_steps=None,
                 initial_step=0):
        self.enabled = enabled
        self.tb = self.bar = self.jsonl = None
        if not enabled:
            return
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        repair_jsonl(directory / "metrics.jsonl")  # a run killed mid-line: drop the torn tail before appending
        self.jsonl = open(directory / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(directory / "tensorboard"))
        if progress_bar:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True)

    def log(self, step, metrics: dict):
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **metrics}
        self.jsonl.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
        if self.bar is not None and "img_per_s" in metrics:
            self.bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}",
                                 img_s=f"{metrics['img_per_s']:.1f}", refresh=False)

    def advance(self, n=1):
        if self.bar is not None:
            self.bar.update(n)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()


_NVTX = {"on": torch.cuda.is_available()}


def set_nvtx(enabled):
    _NVTX["on"] = enabled and torch.cuda.is_available()


def nvtx(name):
    """An NVTX range around a phase of the step (data, forward, backward, optimizer, ema)."""
    return torch.cuda.nvtx.range(name) if _NVTX["on"] else contextlib.nullcontext()


class ProfileWindow:
    """cudaProfilerStart before step `start`, cudaProfilerStop after `num_steps` steps (CUDA only)."""

    def __init__(self, start=-1, num_steps=10):
        self.start, self.stop = start, start + num_steps
        self.active = False

    def before_step(self, step):
        if step == self.start and torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaProfilerStart()
            self.active = True
            log.info("profiler window opened at step %d", step)

    def after_step(self, step):
        if self.active and step + 1 >= self.stop:
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaProfilerStop()
            self.active = False
            log.info("profiler window closed after step %d", step)


def peak_memory(device):
    """Peak memory of this process so far: the CUDA caching allocator's peaks on a GPU, max RSS on the CPU."""
    if device.type == "cuda":
        return {"peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30,
                "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2 ** 30}
    import resource
    return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}
