"""One trainer case, shared by bench.throughput, bench.compare and bench.profile_step: a backend spec such as
'auto+compiled+fp8' turned into trainer config overrides, the `train.train_dit.Trainer` built on synthetic
latents from them, and its optimizer step timed as Trainer.fit runs it.

It sits below those three commands (they import it; it imports none of them), so the dependency goes one way.
"""
from __future__ import annotations

import os
import resource
import time
from pathlib import Path
import typing
from typing import TYPE_CHECKING

import torch

import kernels
from modeling.config import ConfigError

if TYPE_CHECKING:  # the trainer is imported only when a case is built (it pulls in DeepSpeed)
    from train.base import StepOutput
    from train.train_dit import Trainer

# A backend spec is shorthand for trainer config switches, joined with '+'.
SPEC_PARTS: dict[str, tuple[str, ...]] = {
    "eager": ("train.compile=none",), "compiled": ("train.compile=blocks",),
    "auto": ("train.kernels=auto",), "reference": ("train.kernels=reference",),
    "triton": ("train.kernels=triton",), "cuda": ("train.kernels=cuda",), "fused": (),  # resolved at run time
    "fp8": ("fp8.backend=torchao",),       # torchao's float8 training modules
    "fp8mm": ("fp8.backend=scaled_mm",),   # our FP8TrainingLinear (modeling/fp8.py): one _scaled_mm per GEMM
    # with fp8mm: the activations quantized in plain ops (fp8.quant inline, what auto resolves to), or in our
    # kernels (ours: w3's input in the SwiGLU's pass, proj's in one pass per row)
    "fp8inline": ("fp8.quant=inline",), "fp8ours": ("fp8.quant=ours",),
    # with fp8mm: the weight gradient in bf16 (recipe rowwise_with_gw_hp: no dy^T / x^T column quantization)
    "gwhp": ("fp8.recipe=rowwise_with_gw_hp",),
    # with fp8mm: one scale per tensor (cuBLASLt's FP8 GEMM; e5m2 gradients, no column quantization for the wgrad)
    "tensorwise": ("fp8.recipe=tensorwise",),
    "zero0": ("train.zero_stage=0",), "zero1": ("train.zero_stage=1",), "zero2": ("train.zero_stage=2",),
    "zero3": ("train.zero_stage=3",),
    # inductor's multi-kernel: each reduction persistent and looped, the faster kept (train.compile_options)
    "multikernel": ('train.compile_options={"triton.multi_kernel": 1}',),
    # the SwiGLU output recomputed in the backward instead of kept (train/recompute.py): less memory, one more pass
    "recompute": ("train.recompute=swiglu",),
    # DeepSpeed's own fp64 gradient norm (train.grad_norm_dtype fp64; the default fp32 skips its cast to double)
    "gnfp64": ("train.grad_norm_dtype=fp64",),
    # attention forced to our fused RoPE attention kernel (kernels/rope_attention.py) instead of auto's measured pick
    "ropefused": ("train.attention=rope-fused",),
}


def bench_user_errors() -> typing.ContextManager[None]:
    """The trainers' user mistakes (train.errors) plus a backend or FP8 that cannot run here: one line, exit 2."""
    from modeling.config import user_errors
    from modeling.fp8 import FP8Unavailable
    from train.errors import user_error_types
    return user_errors(extra=(*user_error_types(), kernels.BackendUnavailable, FP8Unavailable))


def parse_spec(spec: str) -> list[str]:
    """'auto+compiled+fp8' -> trainer config overrides (ConfigError, a ValueError, on an unknown part)."""
    parts = spec.split("+")
    bad = [p for p in parts if p not in SPEC_PARTS]
    if bad:
        raise ConfigError(f"unknown backend part(s) {bad} in {spec!r}; join any of {sorted(SPEC_PARTS)} with '+'")
    overrides = [o for p in parts for o in SPEC_PARTS[p]]
    if "fused" in parts:
        overrides.append("train.kernels=" + ("cuda" if kernels.backend.cuda_status()[0] else "triton"))
    return overrides


def build_trainer(config: str | Path, overrides: list[str], batch_size: int, workdir: str | Path) -> Trainer:
    """A Trainer on synthetic latents at micro-batch `batch_size` (global = batch_size x world, no
    accumulation), writing only under `workdir`."""
    from modeling.config import load_config
    from train.dit_config import DiTTrainConfig
    from train.train_dit import Trainer
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = load_config(DiTTrainConfig, config, [
        "data.source=synthetic", f"train.batch_per_gpu={batch_size}", f"train.global_batch={batch_size * world}",
        "checkpoint.resume=never", f"checkpoint.dir={workdir}/ckpt", f"logging.dir={workdir}",
        "logging.tensorboard=false", "logging.progress_bar=false", *overrides])
    trainer = Trainer(cfg)
    trainer.restart_batches()  # the data stream fit() would start with
    return trainer


def trainer_step(trainer: Trainer) -> StepOutput:
    """One optimizer step as Trainer.fit runs it: the next batch (prefetched during the previous step's backward),
    then step_on_device (metrics left on the device; the only host synchronisation is the finite-norm check)."""
    return trainer.step_on_device(trainer.next_batch())


def saved_for_backward_gib(trainer: Trainer) -> float:
    """GiB of the tensors one more trainer step saves for its backward: each storage once, the engines' parameters
    and buffers excluded (autograd's pack hook sees the compiled blocks' saved tensors too; it causes no
    recompilation). With one micro-batch a step, all of them are alive at the end of the forward: the activation
    part of the case's peak memory, counted through the trainer itself on the device it runs on."""
    mine = set()
    for engine in trainer.engines.values():
        mine |= {t.untyped_storage().data_ptr() for t in (*engine.module.parameters(), *engine.module.buffers())}
    sizes: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in mine:
            sizes.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        trainer_step(trainer)
    return sum(sizes.values()) / 2 ** 30


def time_trainer_steps(trainer: Trainer, warmup: int, iters: int) -> tuple[list[float], list[float]]:
    """(seconds per optimizer step, loss per step) of `iters` steps run back to back as Trainer.fit runs them: no
    synchronisation between them but the trainer's own (the finite-norm check), so that a step's first host work
    overlaps the device's end of the previous one (the optimizer, the EMA), as in fit. On a GPU a step is the
    interval between CUDA events recorded after consecutive steps: the device's timeline, its waits for the host
    included. (Timing each step from the host after a synchronisation, as this did until 2026-12-05, left the GPU
    idle while the host started every step: fit does not.) The losses are read after the last step."""
    cuda = trainer.device.type == "cuda"
    for _ in range(warmup):
        trainer_step(trainer)
    if cuda:
        torch.cuda.synchronize()
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(iters + 1)]
        marks[0].record()
    else:
        marks = [time.perf_counter()]
    outs = []
    for i in range(iters):
        outs.append(trainer_step(trainer))
        if cuda:
            marks[i + 1].record()
        else:
            marks.append(time.perf_counter())
    if cuda:
        torch.cuda.synchronize()
        times = [marks[i].elapsed_time(marks[i + 1]) / 1e3 for i in range(iters)]
    else:
        times = [marks[i + 1] - marks[i] for i in range(iters)]
    losses = [float(out.metrics["loss"]) for out in outs]
    skipped = [i for i, out in enumerate(outs) if not out.applied]
    if skipped:
        raise FloatingPointError(f"timed step {skipped[0]} was skipped (non-finite loss {losses[skipped[0]]})")
    return times, losses


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak allocated / reserved GiB on a GPU; the process's peak resident set on the CPU."""
    if device.type == "cuda":
        return {"peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30,
                "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2 ** 30}
    return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}
