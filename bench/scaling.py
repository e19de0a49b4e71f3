"""How LightningDiT training scales over GPUs with DeepSpeed ZeRO: a model you can check, and the counter that checks it.

    python -m bench.scaling --model XL/1 --gpus 8,64,256,1024 --link nvlink,ib400
    python -m bench.scaling --model XL/1 --gpus 8,64 --link nvlink,ib200 --zero 1,2,3 --global-batch weak
    python -m bench.scaling --config configs/dit_xl1_64ep.yaml --gpus 8,64    # model, stage, batch, buckets
    python -m bench.scaling ... --json runs/bench/scaling.json

Per GPU count N (G GPUs per node, M = N/G nodes) it prints the micro-batch and accumulation that make the global
batch, the compute time of one optimizer step, the bytes each ZeRO stage moves per step and GPU (all-reduce /
reduce-scatter / all-gather, with DeepSpeed's bucket sizes), how much of that hides behind the backward, the step
time, img/s per GPU, the efficiency against one GPU and the GPU-hours of the paper's 64- and 800-epoch runs.

Where each number comes from (docs/scaling.md has the derivations and the table):
- compute: the measured single-GPU step of the trainer (bench/results/2026-11-26_h200_trainer.md: XL/1, batch
  256, 519.2 img/s on one H200), linear in the micro-batch with the slope of that file's 128/256 pair; on an
  H100 the memory-bound share of the profiled step (39%) runs at 3.35/4.8 of the H200's HBM bandwidth.
- bytes: the parameter inventory of modeling.lightningdit (XL/1: 675,256,736 parameters, 675.0M trainable) and
  what DeepSpeed 0.19.8 does with it at each stage (`zero_traffic`); checked against the bytes the trainer really
  sends on the CPU by tests/test_scaling.py (install_comm_counter below).
- time of a collective: hierarchical ring, max(intra-node part over the intra link, inter-node part over the G
  NICs of a node), at `--efficiency` of the links' datasheet bandwidth, plus `--latency-us` per call.

The counter: `install_comm_counter(prefix)` wraps every torch.distributed collective and DeepSpeed's engine
forward/backward/step; each rank writes PREFIX.rank<R>.json at exit. Turned on with PYTHONPATH holding a
sitecustomize.py that calls it (tests/test_scaling.py writes one), so the trainers run unchanged.
"""
from __future__ import annotations

import atexit
import dataclasses
import functools
import json
import math
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from modeling.config import cli_parser, console_entry

IMAGENET_TRAIN_IMAGES = 1_281_167   # ILSVRC-2012 train split
PAPER_EPOCHS = (64, 800)            # LightningDiT-XL/1's two reported runs (VA-VAE paper, Table 2 / Table 4)


# ----------------------------------------------------------------------------- what is assumed, with sources

@dataclass(frozen=True)
class Link:
    name: str
    gbytes_per_s: float      # datasheet bandwidth per GPU, one direction
    source: str


LINKS = {
    # NVLink 4: 18 links x 50 GB/s = 900 GB/s total per H100/H200 SXM, i.e. 450 GB/s each way (NVIDIA H100 Tensor
    # Core GPU datasheet; H200 datasheet), all-to-all through NVSwitch inside an HGX/DGX node of 8.
    "nvlink": Link("nvlink", 450.0, "NVIDIA H100/H200 SXM datasheets: NVLink 900 GB/s bidirectional"),
    # InfiniBand NDR 400 Gb/s = 50 GB/s each way per port; DGX H100 has 8 single-port ConnectX-7 for the compute
    # fabric, one per GPU ("rail-optimised"; NVIDIA DGX H100 user guide / ConnectX-7 datasheet).
    "ib400": Link("ib400", 50.0, "ConnectX-7 NDR 400 Gb/s per GPU (DGX H100: 8 per node)"),
    "ib200": Link("ib200", 25.0, "ConnectX-6/7 HDR/NDR200 200 Gb/s per GPU"),
    "eth100": Link("eth100", 12.5, "100 GbE RoCE, one NIC per GPU"),
}


@dataclass(frozen=True)
class GPU:
    name: str
    hbm_tbytes_per_s: float
    max_batch_per_gpu: int   # largest XL/1 micro-batch that fits (measured on the H200: 56 GiB at 128, 96 at 256)
    source: str


GPUS = {
    "h200": GPU("h200", 4.8, 256, "NVIDIA H200 datasheet: 4.8 TB/s HBM3e, 141 GB"),
    # Same GH100 compute (989 dense bf16 TFLOP/s SXM) as the H200; 80 GB fits batch 128 (56 GiB measured), not 256.
    "h100": GPU("h100", 3.35, 128, "NVIDIA H100 SXM datasheet: 3.35 TB/s HBM3, 80 GB"),
}

# The measured anchor: bench/results/2026-11-26_h200_trainer.md (the trainer's own step, ZeRO-2 on one GPU, so
# no communication in it).
MEASURED = {
    "file": "bench/results/2026-11-26_h200_trainer.md",
    "model": "XL/1", "gpu": "h200", "batch": 256, "img_per_s": 519.2,
    # same code path (auto + compiled, attention pinned) at two batch sizes: the shape of t(batch)
    "pair": ((128, 450.7), (256, 472.7)),
    # the profiled step (485 ms of kernels): memory-bound = inductor fusions + Triton + other + optimizer
    "kernel_ms": 485.0, "memory_bound_ms": 140.6 + 21.9 + 19.1 + 9.1, "optimizer_ms": 9.1,
}

# DeepSpeed 0.19.8's defaults (deepspeed/runtime/zero/config.py); the trainer's config sets none of them.
DS_DEFAULTS = {
    "reduce_bucket_size": 500_000_000,           # elements per gradient bucket (stages 1-3)
    "allgather_bucket_size": 500_000_000,        # elements per parameter all-gather after the step (stages 1-2)
    "stage3_prefetch_bucket_size": 50_000_000,   # elements fetched ahead in the forward (stage 3)
    "stage3_param_persistence_threshold": 100_000,  # parameters this small are kept whole on every rank (stage 3)
    "overlap_comm": None,                        # None: True for stage 3 only
}


# ----------------------------------------------------------------------------- the parameters

@dataclass(frozen=True)
class Param:
    name: str
    numel: int
    trainable: bool


def param_inventory(model: str = "XL/1", **overrides) -> list[Param]:
    """Every parameter of the trainer's LightningDiT `model` (a LIGHTNINGDIT_SIZES key, or "custom" with
    hidden_size/depth/num_heads/patch_size in `overrides`), built on the meta device (no memory)."""
    import torch

    from modeling.lightningdit import LightningDiT
    from train.dit_config import DiTModelSection

    cfg = DiTModelSection(size=model, **overrides)
    cfg.validate()
    with torch.device("meta"):
        net = LightningDiT(cfg.architecture())
    return [Param(n, p.numel(), p.requires_grad) for n, p in net.named_parameters()]


def flops_per_image(model: str = "XL/1", **overrides) -> float:
    import torch

    from modeling.lightningdit import LightningDiT
    from train.dit_config import DiTModelSection

    cfg = DiTModelSection(size=model, **overrides)
    cfg.validate()
    with torch.device("meta"):
        return LightningDiT(cfg.architecture()).flops_per_sample(train=True)


# ----------------------------------------------------------------------------- bytes per step

@dataclass
class Collective:
    kind: str        # all_reduce | reduce_scatter | all_gather
    what: str        # gradients | parameters | ...
    phase: str       # backward | boundary | forward | after_step | ema
    nbytes: int      # payload per rank per optimizer step: the whole buffer (all-reduce), the full input
    #                  (reduce-scatter) or the full output (all-gather), as torch.distributed sees it
    calls: int       # collective calls per optimizer step
    bucket_elems: int  # elements per call (the overlap granularity)


def _align(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def zero_traffic(params: list[Param], stage: int, world: int, grad_accum: int = 1, grad_bytes: int = 4,
                 param_bytes: int = 4, ds: dict | None = None, ema: bool = True) -> list[Collective]:
    """The collectives one optimizer step of the DiT trainer issues per rank under DeepSpeed ZeRO `stage`
    (fp32 weights and gradients, bf16 only inside autocast: 4 bytes each). What DeepSpeed 0.19.8 does:

    - stage 0: the engine all-reduces the gradients at the accumulation boundary (buckets of reduce_bucket_size).
    - stage 1: the same all-reduce at the boundary (its `reduce_scatter` path all-reduces buckets too:
      use_multi_rank_bucket_allreduce defaults to true), then each rank updates its 1/N of the flat fp32
      parameters and all-gathers them (allgather_bucket_size). The flat buffer is padded to a multiple of
      2 x world (stage_1_and_2.py's alignment).
    - stage 2: as stage 1, but the gradients are reduced in the backward hooks of EVERY micro-step.
    - stage 3: per micro-step the forward all-gathers the partitioned parameters (numel > persistence
      threshold; at XL/1's 675M < max_live_parameters 1e9 they stay gathered through the backward), the backward
      reduce-scatters every gradient; after the step the persistent (small) parameters are all-gathered again.
      The trainer's EMA (train/ema.py) gathers every partitioned parameter once per step (the persistent ones,
      already whole, it reads as they are: they stay whole, and every forward gathers the partitioned ones only).
    Small scalars (the gradient norm: 4 or 8 bytes) are left out; tests/test_scaling.py accounts for them.
    """
    ds = {**DS_DEFAULTS, **(ds or {})}
    trainable = sum(p.numel for p in params if p.trainable)
    out: list[Collective] = []
    if world <= 1:
        return out
    rb, ab = int(ds["reduce_bucket_size"]), int(ds["allgather_bucket_size"])
    if stage in (0, 1, 2):
        flat = trainable if stage == 0 else _align(trainable, 2 * world)
        reduces = grad_accum if stage == 2 else 1
        out.append(Collective("all_reduce", "gradients", "backward" if stage == 2 else "boundary",
                              flat * grad_bytes * reduces, math.ceil(flat / rb) * reduces, min(flat, rb)))
        if stage > 0:
            out.append(Collective("all_gather", "parameters", "after_step", flat * param_bytes,
                                  math.ceil(flat / ab), min(flat, ab)))
        return out
    if stage != 3:
        raise ValueError(f"ZeRO stage must be 0-3, got {stage}")
    threshold = int(ds["stage3_param_persistence_threshold"])
    partitioned = [p for p in params if p.numel > threshold]
    persistent = [p for p in params if p.numel <= threshold]
    part_elems = sum(p.numel for p in partitioned)
    pers_elems = sum(p.numel for p in persistent)
    fwd_elems = part_elems * grad_accum  # (the persistent ones stay whole: DeepSpeed's and the EMA's gathers)
    pb = int(ds["stage3_prefetch_bucket_size"])
    out.append(Collective("all_gather", "parameters (forward)", "forward", fwd_elems * param_bytes,
                          max(1, math.ceil(part_elems / pb)) * grad_accum, min(part_elems, pb)))
    out.append(Collective("reduce_scatter", "gradients", "backward", trainable * grad_bytes * grad_accum,
                          math.ceil(trainable / rb) * grad_accum, min(trainable, rb)))
    out.append(Collective("all_gather", "persistent parameters", "after_step", pers_elems * param_bytes,
                          len(persistent), max([p.numel for p in persistent], default=0)))
    if ema:
        out.append(Collective("all_gather", "EMA gather (trainer)", "ema", part_elems * param_bytes,
                              len(partitioned), max([p.numel for p in partitioned], default=0)))
    return out


def wire_factor(kind: str, n: int) -> float:
    """Bytes each rank sends per payload byte in a ring (nccl-tests' bus-bandwidth factors)."""
    if n <= 1:
        return 0.0
    return {"all_reduce": 2 * (n - 1) / n, "reduce_scatter": (n - 1) / n, "all_gather": (n - 1) / n,
            "broadcast": 1.0}[kind]


def collective_seconds(kind: str, nbytes: float, gpus: int, gpus_per_node: int, intra: Link, inter: Link,
                       efficiency: float) -> float:
    """Bandwidth time of one collective over `gpus` GPUs: hierarchical, the intra-node part over the intra link
    and the inter-node part over the node's G NICs (one per GPU) run pipelined, so the slower one counts."""
    if gpus <= 1 or nbytes <= 0:
        return 0.0
    g = min(gpus, gpus_per_node)
    m = math.ceil(gpus / gpus_per_node)
    t_intra = wire_factor(kind, g) * nbytes / (intra.gbytes_per_s * 1e9 * efficiency)
    t_inter = wire_factor(kind, m) * nbytes / (g * inter.gbytes_per_s * 1e9 * efficiency) if m > 1 else 0.0
    return max(t_intra, t_inter)


def exposed_after(compute_s: float, comm_s: float, total_elems: int, bucket_elems: int) -> float:
    """Communication left after `compute_s` when buckets become ready uniformly during it (gradients in the
    backward) and are sent one after another as each fills: the last bucket can never hide."""
    if comm_s <= 0:
        return 0.0
    k = max(1, math.ceil(total_elems / max(1, bucket_elems)))
    done = 0.0
    for i in range(1, k + 1):
        ready = compute_s * min(1.0, i * bucket_elems / total_elems)
        done = max(done, ready) + comm_s / k
    return max(0.0, done - compute_s)


def exposed_before(compute_s: float, comm_s: float, total_elems: int, bucket_elems: int) -> float:
    """Stall of a forward whose buckets must arrive before they are used, fetched back to back from the start
    (ZeRO-3 prefetch): the first bucket always waits."""
    if comm_s <= 0:
        return 0.0
    k = max(1, math.ceil(total_elems / max(1, bucket_elems)))
    fetched = computed = 0.0
    for _ in range(k):
        fetched += comm_s / k
        computed = max(computed, fetched) + compute_s / k
    return max(0.0, computed - compute_s)


# ----------------------------------------------------------------------------- the prediction

@dataclass
class Row:
    gpus: int
    nodes: int
    zero: int
    link: str
    batch_per_gpu: int
    grad_accum: int
    global_batch: int
    compute_ms: float
    comm: dict            # kind -> payload bytes per GPU per step
    wire_bytes: float     # bytes each GPU sends per step
    comm_ms: float        # all collectives back to back
    exposed_ms: float     # what the step waits for
    step_ms: float
    img_per_s_per_gpu: float
    efficiency: float     # img/s per GPU over one GPU's at its largest micro-batch
    gpu_hours: dict       # epochs -> GPU-hours for ImageNet
    days: dict            # epochs -> wall-clock days on `gpus` GPUs
    note: str = ""


def step_compute_ms(gpu: GPU, flops_scale: float = 1.0, param_scale: float = 1.0) -> tuple[float, float, float]:
    """(ms per image, fixed ms per step, of which the optimizer) of one GPU's step, from the measured anchor: the
    H200 pair's shape t(b) = fixed + b x per_image, rescaled to pass through the headline; on a GPU with less
    HBM bandwidth the memory-bound share of the profiled step (and the whole optimizer) runs slower by the ratio."""
    (b1, r1), (b2, r2) = MEASURED["pair"]
    t1, t2 = b1 / r1 * 1e3, b2 / r2 * 1e3
    per_image = (t2 - t1) / (b2 - b1)
    fixed = t2 - per_image * b2
    scale = MEASURED["batch"] / MEASURED["img_per_s"] * 1e3 / (fixed + per_image * MEASURED["batch"])
    mem_share = MEASURED["memory_bound_ms"] / MEASURED["kernel_ms"]
    bw_ratio = GPUS[MEASURED["gpu"]].hbm_tbytes_per_s / gpu.hbm_tbytes_per_s
    slow = (1 - mem_share) + mem_share * bw_ratio
    optimizer = MEASURED["optimizer_ms"] * bw_ratio * param_scale
    fixed_total = fixed * scale * slow * flops_scale - MEASURED["optimizer_ms"] * slow * flops_scale + optimizer
    return per_image * scale * slow * flops_scale, fixed_total, optimizer


def predict(params: list[Param], gpus: int, zero: int, intra: Link, inter: Link, gpu: GPU,
            global_batch: int | None = 1024, gpus_per_node: int = 8, efficiency: float = 0.8,
            latency_us: float = 20.0, overlap_comm: bool | None = None, flops_scale: float = 1.0,
            param_scale: float = 1.0, ds: dict | None = None) -> Row:
    """One row of the table: `global_batch` None = weak scaling (the largest micro-batch on every GPU)."""
    max_b = gpu.max_batch_per_gpu
    note = ""
    if global_batch is None:
        b, accum = max_b, 1
    else:
        if global_batch % gpus:
            raise ValueError(f"global batch {global_batch} is not a multiple of {gpus} GPUs")
        per_gpu = global_batch // gpus
        accum = math.ceil(per_gpu / max_b)
        while per_gpu % accum:
            accum += 1
        b = per_gpu // accum
        if b < MEASURED["pair"][0][0]:
            note = (f"micro-batch {b}: below the measured 128-256, the linear compute model extrapolates "
                    f"(optimistic: a GPU at a small batch runs below the measured rate)")
    per_image, fixed, opt_ms = step_compute_ms(gpu, flops_scale, param_scale)
    # ZeRO 1-3 update 1/N of the parameters on each GPU
    fixed_n = fixed - (opt_ms * (1 - 1 / gpus) if zero > 0 else 0.0)
    micro_ms = b * per_image
    compute_ms = accum * micro_ms + fixed_n
    colls = zero_traffic(params, zero, gpus, accum, ds=ds)
    overlap = (zero == 3) if overlap_comm is None else overlap_comm
    comm, wire, comm_s, exposed_s = {}, 0.0, 0.0, 0.0
    bwd_s, fwd_s = micro_ms * 2 / 3 / 1e3, micro_ms / 3 / 1e3
    for c in colls:
        comm[c.kind] = comm.get(c.kind, 0) + c.nbytes
        n = gpus
        wire += c.nbytes * wire_factor(c.kind, n)
        t = collective_seconds(c.kind, c.nbytes, n, gpus_per_node, intra, inter, efficiency) \
            + c.calls * latency_us * 1e-6
        comm_s += t
        per_micro = c.phase in ("backward", "forward")
        reps = accum if per_micro else 1
        elems = max(1, c.nbytes // 4 // reps)
        if c.phase == "backward" and overlap:
            exposed_s += reps * exposed_after(bwd_s, t / reps, elems, c.bucket_elems)
        elif c.phase == "forward" and overlap:
            exposed_s += reps * exposed_before(fwd_s, t / reps, elems, c.bucket_elems)
        else:
            exposed_s += t
    step_ms = compute_ms + exposed_s * 1e3
    img_s = b * accum / step_ms * 1e3
    single = single_gpu_row(gpu, flops_scale, param_scale).img_per_s_per_gpu
    hours = {e: e * IMAGENET_TRAIN_IMAGES / img_s / 3600 for e in PAPER_EPOCHS}
    return Row(gpus, math.ceil(gpus / gpus_per_node), zero, f"{intra.name},{inter.name}", b, accum,
               b * accum * gpus, compute_ms, comm, wire, comm_s * 1e3, exposed_s * 1e3, step_ms, img_s,
               img_s / single, hours, {e: h / gpus / 24 for e, h in hours.items()}, note)


def single_gpu_row(gpu: GPU, flops_scale: float = 1.0, param_scale: float = 1.0) -> Row:
    """One GPU at its largest micro-batch: no communication (the measured configuration)."""
    b = gpu.max_batch_per_gpu
    per_image, fixed, _ = step_compute_ms(gpu, flops_scale, param_scale)
    step = b * per_image + fixed
    img_s = b / step * 1e3
    hours = {e: e * IMAGENET_TRAIN_IMAGES / img_s / 3600 for e in PAPER_EPOCHS}
    return Row(1, 1, 0, "-", b, 1, b, step, {}, 0.0, 0.0, 0.0, step, img_s, 1.0, hours,
               {e: h / 24 for e, h in hours.items()})


def markdown(rows: list[Row]) -> str:
    head = ("| GPUs | nodes | ZeRO | micro x accum (global) | compute ms | comm GB/GPU/step (AR / RS / AG) | "
            "comm ms | exposed ms | step ms | img/s/GPU | eff. | GPU-h 64 ep | GPU-h 800 ep | days 800 ep |")
    lines = [head, "|" + " --- |" * 14]
    for r in rows:
        gb = " / ".join(f"{r.comm.get(k, 0) / 1e9:.2f}" for k in ("all_reduce", "reduce_scatter", "all_gather"))
        lines.append(f"| {r.gpus} | {r.nodes} | {r.zero if r.gpus > 1 else '-'} | {r.batch_per_gpu} x {r.grad_accum}"
                     f" ({r.global_batch}) | {r.compute_ms:.1f} | {gb} | {r.comm_ms:.1f} | {r.exposed_ms:.1f} | "
                     f"{r.step_ms:.1f} | {r.img_per_s_per_gpu:.0f} | {r.efficiency:.0%} | {r.gpu_hours[64]:,.0f} | "
                     f"{r.gpu_hours[800]:,.0f} | {r.days[800]:.2f} |")
    notes = sorted({r.note for r in rows if r.note})
    return "\n".join(lines + [f"- {n}" for n in notes]) + "\n"


# ----------------------------------------------------------------------------- the counter

_KINDS = ("all_reduce", "reduce", "broadcast", "all_gather", "all_gather_into_tensor", "_all_gather_base",
          "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base", "all_reduce_coalesced",
          "all_to_all_single", "all_to_all", "send", "recv", "isend", "irecv", "barrier", "all_gather_object",
          "broadcast_object_list", "gather", "scatter", "monitored_barrier")
# the kinds of the model (a tensor and an "into tensor" variant count as the same collective)
CANONICAL = {"all_gather_into_tensor": "all_gather", "_all_gather_base": "all_gather",
             "reduce_scatter_tensor": "reduce_scatter", "_reduce_scatter_base": "reduce_scatter",
             "all_reduce_coalesced": "all_reduce"}


def _payload(kind: str, args: tuple, kwargs: dict) -> tuple[int, str]:
    """(bytes, dtype) of a collective's payload, by the convention of `Collective.nbytes`."""
    def arg(i, *names):
        for n in names:
            if n in kwargs:
                return kwargs[n]
        return args[i] if i < len(args) else None

    def size(t):
        return t.numel() * t.element_size(), str(t.dtype).removeprefix("torch.")

    if kind in ("all_reduce", "reduce", "broadcast", "send", "recv", "isend", "irecv"):
        return size(arg(0, "tensor"))
    if kind in ("all_gather_into_tensor", "_all_gather_base"):
        return size(arg(0, "output_tensor"))
    if kind in ("reduce_scatter_tensor", "_reduce_scatter_base"):
        return size(arg(1, "input", "input_tensor"))
    lists = {"all_gather": (0, "tensor_list"), "reduce_scatter": (1, "input_list"),
             "all_reduce_coalesced": (0, "tensors")}
    if kind in lists:
        ts = arg(*lists[kind])
        return sum(size(t)[0] for t in ts), size(ts[0])[1] if ts else ""
    return 0, ""   # barriers and pickled objects: no tensor payload


def install_comm_counter(prefix: str) -> list:
    """Count every torch.distributed collective this process issues (outermost calls only: a collective that
    calls another counts once) and mark DeepSpeed engine forward / backward / step; PREFIX.rank<RANK>.json is
    written at exit: {"rank", "world", "events": [["c", kind, bytes, dtype, group size] | [marker, ...]]}.
    Install before deepspeed is imported (DeepSpeed keeps references to some functions)."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    events: list = []
    local = threading.local()

    def wrap(kind, fn):
        @functools.wraps(fn)
        def counted(*args, **kwargs):
            depth = getattr(local, "depth", 0)
            if depth == 0:
                nbytes, dtype = _payload(kind, args, kwargs)
                group = kwargs.get("group")
                size = dist.get_world_size(group) if dist.is_initialized() else 1
                events.append(["c", kind, nbytes, dtype, size])
            local.depth = depth + 1
            try:
                return fn(*args, **kwargs)
            finally:
                local.depth = depth
        counted.__wrapped_collective__ = True
        return counted

    for kind in _KINDS:
        fn = getattr(c10d, kind, None) or getattr(dist, kind, None)
        if fn is None or getattr(fn, "__wrapped_collective__", False):
            continue
        w = wrap(kind, fn)
        for mod in (c10d, dist):
            if hasattr(mod, kind):
                setattr(mod, kind, w)

    def mark_engine():
        from deepspeed.runtime.engine import DeepSpeedEngine
        for name in ("forward", "backward", "step"):
            orig = getattr(DeepSpeedEngine, name)

            def marked(self, *a, _orig=orig, _name=name, **k):
                events.append(["begin", _name])
                out = _orig(self, *a, **k)
                events.append(["end", _name, int(self.global_steps)])
                return out
            setattr(DeepSpeedEngine, name, marked)

    mark_engine()

    def dump():
        rank = os.environ.get("RANK", "0")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        Path(f"{prefix}.rank{rank}.json").write_text(json.dumps({"rank": int(rank), "world": world,
                                                                   "events": events}))
    atexit.register(dump)
    return events


def steps_of(events: list) -> list[list]:
    """The events of each optimizer step: from the end of the previous optimizer step (engine.step that moved
    global_steps) to the end of this one. Step 1 (it also holds the set-up) and anything after the last step
    (final logging, checkpoint, export) are left out."""
    bounds, last = [], 0
    for i, e in enumerate(events):
        if e[0] == "end" and e[1] == "step" and e[2] > last:
            bounds.append(i)
            last = e[2]
    return [events[a + 1:b + 1] for a, b in zip(bounds, bounds[1:])]


# where each phase of `zero_traffic` runs, as the counter sees it: inside which DeepSpeed engine call
PHASE_CONTEXT = {"backward": "backward", "boundary": "backward", "forward": "forward", "after_step": "step",
                 "ema": "trainer"}


def step_bytes(step_events: list, by_context: bool = False) -> dict:
    """kind (canonical) -> payload bytes of one step's collectives; with by_context, (kind, context) where
    context is the DeepSpeed engine call it ran inside (forward / backward / step) or "trainer" (outside all)."""
    out: dict = {}
    stack: list = []
    for e in step_events:
        if e[0] == "begin":
            stack.append(e[1])
        elif e[0] == "end" and stack:
            stack.pop()
        elif e[0] == "c" and e[2]:
            k = CANONICAL.get(e[1], e[1])
            key = (k, stack[-1] if stack else "trainer") if by_context else k
            out[key] = out.get(key, 0) + e[2]
    return out


def predicted_bytes(collectives: list[Collective], by_context: bool = False) -> dict:
    """The same summary of `zero_traffic`'s prediction."""
    out: dict = {}
    for c in collectives:
        key = (c.kind, PHASE_CONTEXT[c.phase]) if by_context else c.kind
        out[key] = out.get(key, 0) + c.nbytes
    return out


def read_counts(prefix: str) -> dict:
    """rank -> the counter's record, for every PREFIX.rank<R>.json."""
    out = {}
    for f in sorted(Path(prefix).parent.glob(Path(prefix).name + ".rank*.json")):
        rec = json.loads(f.read_text())
        out[rec["rank"]] = rec
    return out


# ----------------------------------------------------------------------------- command line

def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> dict:
    p = cli_parser("bench.scaling", __doc__.split("\n")[0])
    p.add_argument("--config", default=None,
                   help="a DiT trainer config: its model, ZeRO stage, global batch and train.deepspeed "
                        "zero_optimization settings are used unless given here")
    p.add_argument("--model", default=None, help="LightningDiT size (modeling.lightningdit.LIGHTNINGDIT_SIZES); "
                   "default: the config's, else XL/1")
    p.add_argument("--gpus", default="8,64,256,1024", help="GPU counts, comma-separated")
    p.add_argument("--link", default="nvlink,ib400",
                   help=f"INTRA,INTER node links (of {sorted(LINKS)}); one name: the same inside and between nodes")
    p.add_argument("--gpu", default="h100", choices=sorted(GPUS), help="the GPU the table is for")
    p.add_argument("--zero", default=None, help="ZeRO stages, comma-separated; default: the config's, else 2")
    p.add_argument("--global-batch", default=None,
                   help="images per optimizer step, or 'weak': the largest micro-batch per GPU; default: the "
                        "config's, else the paper's 1024")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--efficiency", type=float, default=0.8,
                   help="achieved fraction of the datasheet link bandwidth (docs/scaling.md)")
    p.add_argument("--latency-us", type=float, default=20.0, help="fixed cost per collective call")
    p.add_argument("--overlap-comm", choices=("default", "true", "false"), default="default",
                   help="DeepSpeed zero_optimization.overlap_comm (default: true for stage 3 only)")
    p.add_argument("--json", default=None, help="also write the rows here")
    a = p.parse_args(argv)
    model_kw, ds, stage_default, batch_default = {}, {}, "2", "1024"
    if a.config:
        from modeling.config import ConfigError, load_config
        from train.dit_config import DiTTrainConfig
        try:
            cfg = load_config(DiTTrainConfig, a.config)
        except (ConfigError, OSError) as e:
            p.error(f"--config {a.config}: {' '.join(str(e).split())}")
        m = cfg.model
        model_kw = {k: getattr(m, k) for k in ("input_size", "in_channels", "num_classes")}
        if m.size == "custom":
            model_kw.update({k: getattr(m, k) for k in ("hidden_size", "depth", "num_heads", "patch_size")})
        a.model = a.model or m.size
        stage_default, batch_default = str(cfg.train.zero_stage), str(cfg.train.global_batch)
        ds = {k: v for k, v in dict(cfg.train.deepspeed.get("zero_optimization", {})).items() if k in DS_DEFAULTS}
    a.model = a.model or "XL/1"
    a.zero = a.zero or stage_default
    a.global_batch = a.global_batch or batch_default
    links = a.link.split(",")
    for name in links:
        if name not in LINKS:
            p.error(f"--link: unknown link {name!r}; known: {', '.join(sorted(LINKS))}")
    if len(links) not in (1, 2):
        p.error("--link takes INTRA,INTER or one name")
    intra, inter = LINKS[links[0]], LINKS[links[-1]]
    gpu = GPUS[a.gpu]
    try:
        gpus, stages = _ints(a.gpus), _ints(a.zero)
    except ValueError:
        p.error("--gpus and --zero take comma-separated integers")
    if not gpus or min(gpus) < 1 or any(s not in (0, 1, 2, 3) for s in stages):
        p.error("--gpus must be >= 1 and --zero in 0-3")
    global_batch = None if a.global_batch == "weak" else int(a.global_batch)
    try:
        params = param_inventory(a.model, **model_kw)
        flops_scale = flops_per_image(a.model, **model_kw) / flops_per_image(MEASURED["model"])
        param_scale = sum(x.numel for x in params) / sum(x.numel for x in param_inventory(MEASURED["model"]))
    except Exception as e:  # noqa: BLE001 (a bad --model: one line)
        p.error(f"--model {a.model}: {e}")
    overlap = None if a.overlap_comm == "default" else a.overlap_comm == "true"
    if overlap is None and ds.get("overlap_comm") is not None:
        overlap = bool(ds["overlap_comm"])
    rows = [single_gpu_row(gpu, flops_scale, param_scale)]
    for z in stages:
        for n in gpus:
            try:
                rows.append(predict(params, n, z, intra, inter, gpu, global_batch, a.gpus_per_node, a.efficiency,
                                    a.latency_us, overlap, flops_scale, param_scale, ds))
            except ValueError as e:
                p.error(str(e))
    trainable = sum(x.numel for x in params if x.trainable)
    print(f"{a.model}: {sum(x.numel for x in params):,} parameters ({trainable:,} trainable), "
          f"{a.gpu.upper()}, links {intra.name} {intra.gbytes_per_s:g} GB/s inside a node, {inter.name} "
          f"{inter.gbytes_per_s:g} GB/s per GPU between nodes, at {a.efficiency:.0%}; "
          f"anchor {MEASURED['img_per_s']} img/s at batch {MEASURED['batch']} on one H200 ({MEASURED['file']})")
    if a.model != MEASURED["model"] or model_kw.get("input_size", 16) != 16:
        print(f"note: compute scaled by FLOPs per image from the {MEASURED['model']} anchor (x{flops_scale:.3g}); "
              "no measurement of this model")
    print(markdown(rows), end="")
    report = {"model": a.model, "gpu": a.gpu, "links": [dataclasses.asdict(intra), dataclasses.asdict(inter)],
              "efficiency": a.efficiency, "latency_us": a.latency_us, "parameters": sum(x.numel for x in params),
              "trainable": trainable, "measured": MEASURED, "rows": [dataclasses.asdict(r) for r in rows]}
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(report, indent=1))
    return report


cli = console_entry(__name__)  # a `vavae-scaling` console script, if setup.py lists one

if __name__ == "__main__":
    sys.exit(0 if main() else 1)
