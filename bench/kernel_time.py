"""Kernel time by category under torch.profiler, shared by bench.profile_step (the training step),
bench.throughput (a case's profile) and bench.sample_speed (a sampler's profile).

It imports none of those commands, so each of them can use it without an import cycle.
"""
from __future__ import annotations

import contextlib
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import torch

if TYPE_CHECKING:
    from train.train_dit import Trainer

CATEGORIES = (  # first match wins; lower-case substrings of kernel names
    # inductor's pointwise / reduction kernels are named after every op they fuse, their consumers' included
    # ("triton_red_fused__scaled_mm__to_copy_abs_amax..." is a quantization, "..._cudnn_attention_transpose" a copy)
    ("inductor fusions", ("triton_poi", "triton_red", "triton_per")),
    ("attention", ("flash", "fmha", "cudnn", "attn", "sdpa", "mha")),
    ("matmul", ("gemm", "xmma", "cutlass", "nvjet", "matmul", "sm90_", "wgmma", "scaled_mm", "float8", "triton_tem")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("fused glue (ours)", ("_norm_fwd", "_norm_bwd", "_norm_quant", "vavae", "_rope", "_swiglu", "_gated", "_quant_rows",
                           "_rows_cols", "_fwd_kernel", "_bwd_kernel")),
    ("inductor fusions", ("triton_",)),
)
OTHER = "other (eager elementwise, copies, reductions)"
# profiler rows of CPU-side ops that also carry device time: dropped so that only kernels are counted
_NOT_KERNELS = ("aten::", "autograd::", "Optimizer", "ProfilerStep", "cudaLaunch", "Torch-Compiled",
                "CompiledFunction", "## ", "vavae::")


def categorize(name: str, categories: tuple = CATEGORIES) -> str:
    """The `categories` entry (default CATEGORIES) a kernel name falls in (OTHER when none matches)."""
    n = name.lower()
    for cat, keys in categories:
        if any(k in n for k in keys):
            return cat
    return OTHER


PHASE = "## phase/"  # record_function name of a trainer phase (phase_ranges); "## " keeps it out of the kernel rows
GAP_MIN_US = 2.0  # idle stretches shorter than this are the launch pipeline's own spacing, not waiting on the host
TOP_GAPS = 12


@contextlib.contextmanager
def phase_ranges(*modules: ModuleType, prefix: str = PHASE) -> Iterator[None]:
    """Within the block, each module's `nvtx(name)` (train.logging_utils.nvtx, imported by name into the trainer
    modules: data, forward, backward, optimizer, ema, ...) is a torch.profiler record_function `prefix + name`:
    the profile then knows which phase of the step the host was in at any instant. Restored on exit."""
    from torch.profiler import record_function
    saved = [(m, m.nvtx) for m in modules]
    for m in modules:
        m.nvtx = lambda name: record_function(prefix + name)
    try:
        yield
    finally:
        for m, f in saved:
            m.nvtx = f


def idle_gaps(kernels_: Iterable[tuple[float, float, str]], phases: Iterable[tuple[float, float, str]],
              calls: int = 1, min_us: float = GAP_MIN_US, top: int = TOP_GAPS) -> dict:
    """Where the GPU waited on the host. kernels_: (start_us, end_us, name) of every device activity (kernels,
    copies, memsets: one timeline, the streams merged); phases: (start_us, end_us, name) of the host's phase ranges
    on the main thread (nested ones allowed: the innermost wins). An idle stretch (no activity from the end of
    everything before it to the next start, >= min_us) is given to the phase the host was in when it ended: the host
    launched the kernel that ended it a few microseconds before, so that phase is what the GPU waited for ("between
    phases" when none: the step's own bookkeeping). Returns ms per call: the total, by phase, and the `top` longest
    stretches with the kernels either side."""
    acts = sorted(kernels_)
    spans = sorted(phases, key=lambda p: (p[0], -p[1]))
    gaps = []
    busy_until = None
    prev_name = None
    for start, end, name in acts:
        if busy_until is not None and start - busy_until >= min_us:
            gaps.append((start - busy_until, busy_until, start, prev_name, name))
        if busy_until is None or end >= busy_until:
            busy_until, prev_name = end, name
    by_phase: dict[str, float] = {}
    counts: dict[str, int] = {}
    largest = []
    for us, _, t1, before, after in gaps:
        inner = [p for p in spans if p[0] <= t1 <= p[1]]
        phase = min(inner, key=lambda p: p[1] - p[0])[2] if inner else "between phases"
        by_phase[phase] = by_phase.get(phase, 0.0) + us / 1e3 / calls
        counts[phase] = counts.get(phase, 0) + 1
        largest.append({"ms": us / 1e3, "phase": phase, "after": before, "before": after})
    largest.sort(key=lambda g: -g["ms"])
    span_ms = (max(e for _, e, _ in acts) - acts[0][0]) / 1e3 / calls if acts else 0.0
    return {"idle_ms_per_call": sum(by_phase.values()), "gpu_span_ms_per_call": span_ms,
            "idle_ms_per_call_by_phase": dict(sorted(by_phase.items(), key=lambda kv: -kv[1])),
            "idle_stretches_per_call_by_phase": {k: counts[k] / calls for k in by_phase},
            "longest": largest[:top], "min_gap_us": min_us}


def timeline(prof: Any, prefix: str = PHASE) -> tuple[list[tuple[float, float, str]], list[tuple[float, float, str]]]:
    """(device activities, the main thread's phase ranges) of a finished torch.profiler.profile, in microseconds
    on the profiler's one clock (kineto puts CUPTI's device timestamps on the host's)."""
    from torch.autograd import DeviceType
    events = prof.profiler.kineto_results.events()
    device = [(e.start_ns() / 1e3, e.end_ns() / 1e3, e.name()) for e in events
              if e.device_type() != DeviceType.CPU and e.end_ns() > e.start_ns() and _device_work(e)]
    phases = [(e.start_ns() / 1e3, e.end_ns() / 1e3, e.name()[len(prefix):]) for e in events
              if e.device_type() == DeviceType.CPU and e.name().startswith(prefix)]
    return device, phases


DEVICE_WORK = ("kernel", "gpu_memcpy", "gpu_memset")  # kineto activity types that occupy the device


def _device_work(e: Any) -> bool:
    """A device row that is work, not a span drawn over it: kineto also puts each record_function range on the GPU
    timeline ("gpu_user_annotation", from its first kernel to its last), which would cover the idle stretches inside
    the phase ranges this module adds."""
    kind = getattr(e, "activity_type", None)
    if kind is not None:
        return kind() in DEVICE_WORK
    return not e.is_user_annotation() and not e.name().startswith("## ")


def kernel_times(fn: Callable[[], Any], calls: int = 1, cuda: bool = True, categories: tuple = CATEGORIES,
                 gaps: bool = False) -> dict:
    """torch.profiler over `calls` calls of fn -> {"ms_per_call_by_category", "total_kernel_ms_per_call",
    "top_kernels_ms_per_call"}: CUDA kernel time (kernels replayed from CUDA graphs included) grouped by
    `categories` (default CATEGORIES, the DiT's); on the CPU the CPU time of the ops instead. gaps (CUDA only): also
    "gpu_idle", idle_gaps of the profiled calls (phase_ranges around fn names the host's phases)."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=acts) as prof:
        for _ in range(calls):
            fn()
        if cuda:
            torch.cuda.synchronize()
    kernels_ = {}
    for e in prof.key_averages():
        t = (e.device_time_total if cuda else e.self_cpu_time_total) / 1e3 / calls  # ms per call
        if cuda and getattr(e, "device_type", None) is not None and str(e.device_type).endswith("CPU"):
            continue
        if t > 0:
            kernels_[e.key] = kernels_.get(e.key, 0.0) + t
    if cuda:
        kernels_ = {k: v for k, v in kernels_.items() if not k.startswith(_NOT_KERNELS)}
    cats = {}
    for k, v in kernels_.items():
        cats[categorize(k, categories)] = cats.get(categorize(k, categories), 0.0) + v
    out = {"ms_per_call_by_category": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
           "total_kernel_ms_per_call": sum(kernels_.values()),
           "top_kernels_ms_per_call": sorted(kernels_.items(), key=lambda kv: -kv[1])[:30]}
    if gaps and cuda:
        out["gpu_idle"] = idle_gaps(*timeline(prof), calls=calls)
    return out


def profile_trainer(trainer: Trainer, steps: int = 2, warmup: int = 3) -> dict:
    """kernel_times over `steps` optimizer steps of the trainer, as Trainer.fit runs them
    (bench.train_case.trainer_step), with the trainer's phases marked (phase_ranges): on a GPU "gpu_idle_per_step"
    says in which phase, and between which kernels, the GPU waited on the host."""
    import train.base
    import train.train_dit
    from bench.train_case import trainer_step
    for _ in range(warmup):
        trainer_step(trainer)
    with phase_ranges(train.base, train.train_dit):
        k = kernel_times(lambda: trainer_step(trainer), steps, trainer.device.type == "cuda", gaps=True)
    out = {"batch": trainer.cfg.train.batch_per_gpu, "kernels": trainer.cfg.train.kernels,
           "compile": trainer.cfg.train.compile, "fp8": trainer.fp8_desc,
           "ms_per_step_by_category": k["ms_per_call_by_category"],
           "total_kernel_ms_per_step": k["total_kernel_ms_per_call"],
           "top_kernels_ms_per_step": k["top_kernels_ms_per_call"]}
    if "gpu_idle" in k:
        out["gpu_idle_per_step"] = k["gpu_idle"]
    return out
