"""Observability: JSON-lines + TensorBoard (+ optional Weights & Biases) metrics, a progress bar, NVTX ranges,
an nsys capture window and torch.profiler traces.

Only rank 0 writes metrics. `nvtx("forward")` marks a range in Nsight Systems timelines (free when CUDA is
absent or NVTX is switched off). `ProfileWindow` calls cudaProfilerStart/Stop around a step range, for
`nsys profile --capture-range=cudaProfilerApi --capture-range-end=stop`, and with `torch_trace=True` also
records that window with torch.profiler: a Chrome / Perfetto trace per rank (open in chrome://tracing or
ui.perfetto.dev), its op table, and on a GPU a CUDA memory snapshot (drag into pytorch.org/memory_viz).

W&B (`wandb=True`) needs `pip install wandb` and no account in offline mode (the default): the run is written
under DIR/wandb and can be uploaded later with `wandb sync DIR/wandb/offline-run-*`. Asked for but not
installed: `LoggerUnavailable`, on every rank, before anything is written.
"""
import contextlib
import json
import logging
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any, ContextManager, Optional, Union

import torch

from modeling.config import ConfigError
from modeling.progress import format_duration

log = logging.getLogger("train")


def repair_jsonl(path: Union[str, Path]) -> int:
    """Make a JSON-lines file end on a whole line before appending. A last line without its newline is what a run
    killed mid-write leaves: a whole record gets its newline; anything else is moved (appended) to <name>.torn
    and cut off. Every other line stays as it is, ours or not (nothing is deleted). Returns the bytes cut off."""
    path = Path(path)
    if not path.is_file():
        return 0
    with open(path, "rb+") as f:
        data = f.read()
        start = data.rfind(b"\n") + 1
        tail = data[start:]
        if not tail:
            return 0
        try:
            whole = isinstance(json.loads(tail), dict)
        except (ValueError, RecursionError):  # (200,000 "[": the parser's recursion)
            whole = False
        if whole:
            f.write(b"\n")
        else:
            side = path.with_name(path.name + ".torn")
            with open(side, "ab") as s:
                s.write(tail + b"\n")
                s.flush()
                os.fsync(s.fileno())
            f.truncate(start)
        f.flush()
        os.fsync(f.fileno())
    if whole:
        log.warning("%s: its last record had no newline (an interrupted run); added one", path)
        return 0
    log.warning("%s: moved a torn last line (%d bytes, an interrupted run) to %s", path, len(tail), side)
    return len(tail)


class LoggerUnavailable(ConfigError):
    """A logger was requested (e.g. logging.wandb=true) whose package is not installed."""


def _require_wandb():
    import importlib.util

    try:
        found = importlib.util.find_spec("wandb") is not None
    except ValueError:  # a module object without a spec (e.g. a stub) counts as installed
        found = True
    if not found:
        raise LoggerUnavailable("logging.wandb=true needs the wandb package, which is not installed "
                                "(pip install wandb; offline mode needs no account)")
    import wandb

    return wandb


class WandbLogger:
    """One W&B run per training run directory: its id is kept in DIR/wandb_run_id so a resumed run continues
    the same W&B run. Only numbers are logged (as TensorBoard); `step` is the optimizer step."""

    def __init__(self, directory: Union[str, Path], project: str = "vavae-lightningdit", mode: str = "offline",
                 name: Optional[str] = None, config: Optional[dict] = None) -> None:
        wandb = _require_wandb()
        directory = Path(directory)
        id_file = directory / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)  # [a-z0-9], as W&B's
        # console="off": W&B would otherwise wrap sys.stdout / sys.stderr (the progress bar, the caller's own
        # output capture); the trainer's log lines are in its own files
        self.run = wandb.init(project=project, name=name or directory.name, id=run_id, resume="allow",
                              dir=str(directory), mode=mode, config=config or {},
                              settings=wandb.Settings(console="off"))
        id_file.write_text(run_id)
        log.info("W&B run %s (%s mode) in %s", run_id, mode, directory / "wandb")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if numbers:
            self.run.log(numbers, step=step)

    def close(self) -> None:
        self.run.finish()


# What the console line of a metrics record shows, in this order (every value is in metrics.jsonl)
_LINE_FIELDS = (("loss", "loss {:.5g}"), ("grad_norm", "grad_norm {:.3g}"), ("lr", "lr {:.2e}"),
                ("img_per_s", "{:.1f} img/s"), ("tflops_per_gpu", "{:.4g} TFLOP/s/GPU"),
                ("peak_mem_gib", "peak {:.1f} GiB"), ("peak_rss_gib", "RSS {:.1f} GiB"))


def metrics_line(step: int, total_steps: Optional[int], metrics: dict) -> str:
    """One line of a metrics record for a log: "step 100/80000 | loss 0.5123 | ... | eta 11h02m"; an evaluation
    record shows its eval/* values instead."""
    parts = [f"step {step}" + (f"/{total_steps}" if total_steps else "")]
    evals = {k: v for k, v in metrics.items() if k.startswith("eval/") and isinstance(v, (int, float))}
    if evals:
        parts += [f"{k} {v:.4g}" for k, v in evals.items()]
    else:
        parts += [fmt.format(metrics[k]) for k, fmt in _LINE_FIELDS if isinstance(metrics.get(k), (int, float))]
        if metrics.get("skipped_steps"):
            parts.append(f"{metrics['skipped_steps']} non-finite steps skipped")
        if isinstance(metrics.get("eta_s"), (int, float)):
            parts.append(f"eta {format_duration(metrics['eta_s'])}")
    return " | ".join(parts)


def supersede_records(path: Union[str, Path], step: int) -> int:
    """Records of steps after `step` (a run resumed from an earlier checkpoint than its last records: they would
    appear twice, and curves would double back) moved from `path` to <name>.superseded.jsonl, nothing dropped.
    Returns how many moved."""
    path = Path(path)
    if not path.is_file():
        return 0
    keep, moved = [], []
    for line in path.read_bytes().splitlines(keepends=True):  # bytes: a line that is not UTF-8 is kept as it is
        try:
            later = int(json.loads(line).get("step", -1)) > step
        except (ValueError, AttributeError, TypeError, RecursionError):
            later = False  # not a record of ours: kept where it is
        (moved if later else keep).append(line)
    if moved:
        with open(path.with_suffix(".superseded.jsonl"), "ab") as f:
            f.writelines(moved)
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_bytes(b"".join(keep))
        os.replace(tmp, path)
        log.warning("%s: %d records of steps after %d (the step this run resumed from) moved to %s: the steps "
                    "run again write their own", path, len(moved), step, path.with_suffix(".superseded.jsonl").name)
    return len(moved)


class MetricsLogger:
    """metrics.jsonl (always), TensorBoard, W&B and, on the console, a progress bar (`progress_bar` and a
    terminal) or else one log line per record (a SLURM log, `progress_bar: false`), written by rank 0 (`enabled`).

    wandb: False (off) or True; wandb_project / wandb_mode ("offline" | "online") / wandb_config (the
    resolved config as a dict, stored with the run) go to `WandbLogger`. supersede_after: the step a trainer
    starts from; records of later steps (a resume from an earlier checkpoint) move aside (supersede_records)."""

    def __init__(self, directory: Union[str, Path], enabled: bool = True, tensorboard: bool = True,
                 progress_bar: bool = True, total_steps: Optional[int] = None, initial_step: int = 0,
                 wandb: bool = False, wandb_project: str = "vavae-lightningdit", wandb_mode: str = "offline",
                 wandb_config: Optional[dict] = None, supersede_after: Optional[int] = None) -> None:
        self.enabled, self.total_steps = enabled, total_steps
        self.tb = self.bar = self.jsonl = self.wandb = None
        if wandb:
            _require_wandb()  # every rank refuses, not only the one that writes
        if not enabled:
            return
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        repair_jsonl(directory / "metrics.jsonl")  # a run killed mid-line: its torn tail moves aside
        if supersede_after is not None:  # a trainer at this step: later records are of steps it runs again
            supersede_records(directory / "metrics.jsonl", supersede_after)
        self.jsonl = open(directory / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(directory / "tensorboard"))
        if wandb:
            self.wandb = WandbLogger(directory, wandb_project, wandb_mode, config=wandb_config)
        if progress_bar and sys.stderr.isatty():  # a bar in a log file is one line of carriage returns
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **metrics}
        self.jsonl.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(step, metrics)
        if self.bar is not None and "img_per_s" in metrics:
            self.bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}",
                                 img_s=f"{metrics['img_per_s']:.1f}", refresh=False)
        elif self.bar is None:
            log.info("%s", metrics_line(step, self.total_steps, metrics))

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.close()
            self.wandb = None
        if self.jsonl is not None:
            self.jsonl.close()


_NVTX = {"on": torch.cuda.is_available()}


def set_nvtx(enabled: bool) -> None:
    _NVTX["on"] = enabled and torch.cuda.is_available()


def nvtx(name: str) -> ContextManager:
    """An NVTX range around a phase of the step (data, forward, backward, optimizer, ema)."""
    return torch.cuda.nvtx.range(name) if _NVTX["on"] else contextlib.nullcontext()


class ProfileWindow:
    """cudaProfilerStart before step `start`, cudaProfilerStop after `num_steps` steps (CUDA only), for nsys.

    torch_trace=True also records the window with torch.profiler (CPU ops, and CUDA kernels on a GPU) and
    writes, per rank, TRACE_DIR/trace_rank{R}.json (Chrome / Perfetto trace), TRACE_DIR/ops_rank{R}.txt
    (op table by total time) and on a GPU TRACE_DIR/memory_snapshot_rank{R}.pickle (allocator history of
    the window: pytorch.org/memory_viz). `close()` finishes a window that the run ended inside."""

    def __init__(self, start: int = -1, num_steps: int = 10, torch_trace: bool = False,
                 trace_dir: Union[str, Path] = "traces", rank: Optional[int] = None) -> None:
        self.start, self.stop = start, start + num_steps
        self.active = False
        self.torch_trace, self.trace_dir = torch_trace, Path(trace_dir)
        self.rank = rank
        self._prof = None
        self._memory = False
        self.written = []

    def _rank(self):
        if self.rank is not None:
            return self.rank
        import torch.distributed as dist
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    def before_step(self, step: int) -> None:
        if step != self.start:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaProfilerStart()
            self.active = True
            log.info("profiler window opened at step %d", step)
        if self.torch_trace:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            if torch.cuda.is_available():
                torch.cuda.memory._record_memory_history(max_entries=200_000)
                self._memory = True
            self._prof = profile(activities=activities, record_shapes=True, profile_memory=True)
            self._prof.__enter__()
            log.info("torch.profiler trace opened at step %d (%s)", step, ", ".join(a.name for a in activities))

    def after_step(self, step: int) -> None:
        if step + 1 < self.stop:
            return
        if self.active:
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaProfilerStop()
            self.active = False
            log.info("profiler window closed after step %d", step)
        self._finish_trace(step)

    def close(self) -> None:
        """End a window the run did not reach the end of (its traces are still written)."""
        if self.active:
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaProfilerStop()
            self.active = False
        self._finish_trace(None)

    def _finish_trace(self, step):
        if self._prof is None:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        rank = self._rank()
        self.trace_dir.mkdir(parents=True, exist_ok=True)
        trace = self.trace_dir / f"trace_rank{rank}.json"
        prof.export_chrome_trace(str(trace))
        table = self.trace_dir / f"ops_rank{rank}.txt"
        sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        table.write_text(prof.key_averages().table(sort_by=sort, row_limit=60) + "\n")
        self.written = [trace, table]
        if self._memory:
            snap = self.trace_dir / f"memory_snapshot_rank{rank}.pickle"
            torch.cuda.memory._dump_snapshot(str(snap))
            torch.cuda.memory._record_memory_history(enabled=None)
            self._memory = False
            self.written.append(snap)
        log.info("torch.profiler window %s: wrote %s", f"ended after step {step}" if step is not None else "closed",
                 ", ".join(str(p) for p in self.written))


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak memory of this process so far: the CUDA caching allocator's peaks on a GPU, max RSS on the CPU."""
    if device.type == "cuda":
        return {"peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30,
                "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2 ** 30}
    import resource
    return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}
