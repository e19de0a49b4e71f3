"""Kernel time by category under torch.profiler, shared by bench.profile_step (the training step),
bench.throughput (a case's profile) and bench.sample_speed (a sampler's profile).

It imports none of those commands, so each of them can use it without an import cycle.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

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
    ("fused glue (ours)", ("_norm_fwd", "_norm_bwd", "vavae", "_rope", "_swiglu", "_gated", "_quant_rows", "_fwd_kernel",
                           "_bwd_kernel")),
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


def kernel_times(fn: Callable[[], Any], calls: int = 1, cuda: bool = True, categories: tuple = CATEGORIES) -> dict:
    """torch.profiler over `calls` calls of fn -> {"ms_per_call_by_category", "total_kernel_ms_per_call",
    "top_kernels_ms_per_call"}: CUDA kernel time (kernels replayed from CUDA graphs included) grouped by
    `categories` (default CATEGORIES, the DiT's); on the CPU the CPU time of the ops instead."""
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
    return {"ms_per_call_by_category": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
            "total_kernel_ms_per_call": sum(kernels_.values()),
            "top_kernels_ms_per_call": sorted(kernels_.items(), key=lambda kv: -kv[1])[:30]}


def profile_trainer(trainer: Trainer, steps: int = 2, warmup: int = 3) -> dict:
    """kernel_times over `steps` optimizer steps of the trainer, as Trainer.fit runs them
    (bench.train_case.trainer_step)."""
    from bench.train_case import trainer_step
    for _ in range(warmup):
        trainer_step(trainer)
    k = kernel_times(lambda: trainer_step(trainer), steps, trainer.device.type == "cuda")
    return {"batch": trainer.cfg.train.batch_per_gpu, "kernels": trainer.cfg.train.kernels,
            "compile": trainer.cfg.train.compile, "fp8": trainer.fp8_desc,
            "ms_per_step_by_category": k["ms_per_call_by_category"],
            "total_kernel_ms_per_step": k["total_kernel_ms_per_call"],
            "top_kernels_ms_per_step": k["top_kernels_ms_per_call"]}
