"""LightningDiT throughput through the code users run: the trainer's step, and the sampler `generate` uses.

    python -m bench.throughput --config configs/dit_xl1_64ep.yaml --batch-sizes 128,256 \
        --backends auto+compiled,reference+compiled,auto+compiled+fp8
    python -m bench.throughput --mode sample --batch-sizes 64,128 --backends fp32,bf16-weights+model+graphs

Train mode builds `train.train_dit.Trainer` from the config (synthetic latents, `train.batch_per_gpu` = the
batch size, no accumulation) and times its step as fit runs it: the DeepSpeed engine with its bf16 autocast, the
flow loss, backward, the optimizer (ZeRO stage from the config), the non-finite guard, EMA and metrics.
A backend spec is shorthand for trainer config switches, joined with '+' (bench.train_case.SPEC_PARTS):
  eager -> train.compile=none      compiled -> train.compile=blocks
  auto / reference / triton / cuda -> train.kernels   fused -> train.kernels=cuda if built, else triton
  fp8 -> fp8.backend=torchao       zero0 .. zero3 -> train.zero_stage
  fp8mm -> fp8.backend=scaled_mm (with fp8inline / fp8ours -> fp8.quant, gwhp -> fp8.recipe=rowwise_with_gw_hp,
    tensorwise -> fp8.recipe=tensorwise)
  ropefused -> train.attention=rope-fused (our fused RoPE attention kernel instead of auto's measured pick)
  multikernel -> inductor's multi-kernel (train.compile_options)   recompute -> train.recompute=swiglu
  gnfp64 -> train.grad_norm_dtype=fp64 (DeepSpeed's own gradient norm)
Anything else goes through `--set key=value` (e.g. --set train.precision=fp32). Each case runs in a fresh
process (its own CUDA memory, compile state and DeepSpeed engine); a part that cannot run fails the case with
its error, nothing falls back silently. Several GPUs: `torchrun --nproc_per_node N -m bench.throughput
--in-process ...` (every rank runs the cases in its own process; img/s counts all ranks).
Sample mode runs bench.sample_speed: `modeling.sampling.Sampler` + the batched VA-VAE decode, the code
path `evaluation.generate` runs, at the paper's settings by default (XL/1, Euler on the shift-0.3 grid, CFG 6.7
from t >= 0.125, the authors' 3-channel guidance); img/s are scaled from --sample-steps to --scale-to points.
FLOPs come from `model.flops_per_sample()` (XL/1: ~712 GFLOP per image per training step); MFU is TFLOP/s
over the device's dense bf16 peak (H100/H200 SXM: 989). Output: JSON + Markdown + a PNG; the report and every
train row carry the environment block of evaluation.provenance.environment (card, versions, commit, the
kernels that ran; a train row's is its own process's), next to the peak and the peak memory.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from bench import processes
from bench.train_case import (bench_user_errors, build_trainer, parse_spec, peak_memory, saved_for_backward_gib,
                              time_trainer_steps)
from evaluation.provenance import environment
from modeling.config import console_entry, read_yaml
from modeling.lightningdit import LIGHTNINGDIT_SIZES

REPO = Path(__file__).resolve().parents[1]
# Dense bf16 peak TFLOP/s (no sparsity) by device-name substring.
# dense bf16 TFLOP/s from NVIDIA's datasheets, the first key in the device's name wins: the PCIe and NVL H100s are
# slower parts than the SXM one the plain "H100" means (the lent machines' are SXM)
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "A100": 312.0}


def device_peak_tflops(device: torch.device) -> tuple[float | None, str]:
    """(the device's dense bf16 peak TFLOP/s or None, a sentence saying where it came from)."""
    if device.type != "cuda":
        return None, "no peak known for a CPU: MFU not reported"
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16_TFLOPS.items():
        if key in name:
            return peak, f"{key} dense bf16 {peak:g} TFLOP/s"
    return None, f"no peak known for {name}: pass --peak-tflops"


# ----------------------------------------------------------------------------- train mode: the trainer's step

def run_train_case(config: str | Path, spec: str, batch_size: int, extra_overrides: list[str] | tuple = (),
                   warmup: int = 3, iters: int = 10, peak_tflops: float | None = None,
                   profile_steps: int = 0) -> dict:
    """One training case in this process; returns its result row (with a kernel-time profile of
    `profile_steps` further steps when > 0). The row carries its own environment block: a case usually runs
    in a child process, whose kernels are not the parent's."""
    overrides = [*parse_spec(spec), *extra_overrides]
    with tempfile.TemporaryDirectory(prefix="vavae_bench_") as tmp:
        trainer = build_trainer(config, overrides, batch_size, tmp)
        if trainer.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(trainer.device)
        times, losses = time_trainer_steps(trainer, warmup, iters)
        sec = statistics.median(times)
        img_s = batch_size * trainer.info.world_size / sec
        cfg = trainer.cfg
        tflops = img_s * trainer.flops_per_image / trainer.info.world_size / 1e12
        label = cfg.model.size if cfg.model.size != "custom" else "custom"
        # after the timing and the peak: one more step, its saved tensors counted (the peak's activation part)
        saved = {"saved_for_backward_gib": saved_for_backward_gib(trainer)}
        prof = {}
        if profile_steps:
            from bench.kernel_time import profile_trainer
            prof = {"profile": profile_trainer(trainer, profile_steps, warmup=0)}
        return {**prof, "name": f"{label} {spec} bs{batch_size} train", "mode": "train", "model": label, "backend": spec,
                "batch_size": batch_size, "overrides": overrides, "precision": cfg.train.precision,
                "zero_stage": cfg.train.zero_stage, "compile": cfg.train.compile, "world_size": trainer.info.world_size,
                "median_s": sec, "times_s": times, "losses": losses, "img_per_s": img_s,
                "gflop_per_img": trainer.flops_per_image / 1e9, "tflops": tflops,
                "mfu": tflops / peak_tflops if peak_tflops else None, **peak_memory(trainer.device), **saved,
                "kernels_backend": cfg.train.kernels, "attention": cfg.train.attention, "fp8": trainer.fp8_desc,
                "environment": environment(trainer.device)}


def run_train_case_subprocess(config: str | Path, spec: str, batch_size: int,
                              extra_overrides: list[str] | tuple = (), warmup: int = 3, iters: int = 10,
                              peak_tflops: float | None = None, timeout: float | None = None,
                              profile_steps: int = 0) -> dict:
    """run_train_case in a fresh interpreter; an error (e.g. out of memory) becomes the row's 'error'."""
    args = json.dumps(dict(config=str(config), spec=spec, batch_size=batch_size, extra_overrides=list(extra_overrides),
                           warmup=warmup, iters=iters, peak_tflops=peak_tflops, profile_steps=profile_steps))
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        cmd = [sys.executable, "-m", "bench.throughput", "--run-case", args, "--case-out", out.name]
        try:
            # a fresh single process: no rank / rendezvous variables inherited from this one
            env = {k: v for k, v in os.environ.items()
                   if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
            res = processes.run(cmd, timeout=timeout, cwd=REPO, env=env)
        except subprocess.TimeoutExpired:
            return {"name": f"{spec} bs{batch_size} train", "backend": spec, "batch_size": batch_size,
                    "error": f"timed out after {timeout} s"}
        text = Path(out.name).read_text()
    if res.returncode or not text:
        tail = (res.stdout + res.stderr).strip().splitlines()
        err = next((l for l in reversed(tail) if "Error" in l or "error" in l), tail[-1] if tail else "no output")
        return {"name": f"{spec} bs{batch_size} train", "backend": spec, "batch_size": batch_size,
                "error": err[:500], "log_tail": "\n".join(tail[-15:])}
    return json.loads(text)


# ----------------------------------------------------------------------------- sample mode: generate's sampler

def run_sample_mode(a: argparse.Namespace, specs: list[str] | None, batch_sizes: list[int]) -> list[dict]:
    """bench.sample_speed.measure_sampling: modeling.sampling.Sampler + batched decode, the code path
    evaluation.generate runs, at the given settings; returns result rows."""
    from bench.sample_speed import DEFAULT_PLAN, measure_sampling
    if a.plan:
        plan = [s.strip() for s in a.plan.split(",") if s.strip()]
    else:
        plan = [f"{spec}@{bs}" for spec in specs for bs in batch_sizes] if specs else list(DEFAULT_PLAN)
    kw = {}
    if a.model in LIGHTNINGDIT_SIZES:
        size = a.model
    else:  # a JSON dict of LightningDiT kwargs
        size, model_kwargs = "custom", json.loads(a.model)
        kw = {k: model_kwargs.pop(k) for k in ("input_size", "in_channels", "num_classes") if k in model_kwargs}
        kw["model_kwargs"] = model_kwargs
    res = measure_sampling(size=size, plan=plan, steps=a.sample_steps, scale_to=a.scale_to,
                           cfg_scale=6.7 if a.cfg_scale is None else a.cfg_scale,
                           cfg_interval_start=a.cfg_interval_start, guidance=a.guidance, device=a.device,
                           decode=not a.no_decode, budget_s=a.budget_s, log=print, profile=a.profile,
                           partial_json=f"{a.out}.partial.json", **kw)
    Path(f"{a.out}.partial.json").unlink(missing_ok=True)  # complete: the report replaces it
    rows = []
    for r in res["results"]:
        row = {"name": f"{size} {r['spec']} sample", "mode": "sample", "backend": r["spec"], "batch_size": r["batch"],
               "settings": res["settings"]}
        row.update({k: v for k, v in r.items() if k not in ("spec", "batch")})
        rows.append(row)
    return rows


def sampling_shortfall_report(results: list[dict], device: torch.device) -> dict:
    """On a GPU, after profiled sampling entries: the card's ceilings measured here (copy, bf16 and FP8 matmul: ~2 s,
    bench.ceilings) and each profiled entry's calls by category against its floors (bench.shortfall,
    printed): {"ceilings", "shortfall"}; {} elsewhere (no ceilings to read the profile against)."""
    if device.type != "cuda":
        return {}
    from bench.ceilings import ceilings
    from bench.shortfall import Ceilings, markdown, sampling_shortfalls
    ceil = ceilings(False)
    res = sampling_shortfalls(results, Ceilings.from_suite(ceil))
    for name, r in res.items():
        print(f"\n{name}: against the floors at this card's measured ceilings\n{markdown(r)}")
    return {"ceilings": ceil, "shortfall": res}


# ----------------------------------------------------------------------------- reports and CLI

def _ran(r: dict) -> str:
    """The implementations a train row's ops ran, from its own environment block."""
    return ",".join(sorted(set(r["environment"]["kernels_ran"].values()))) or "-"


def markdown(report: dict) -> str:
    """The report as a Markdown page: the environment, then one table row per case."""
    env = report["environment"]
    lines = ["# LightningDiT throughput", "",
             f"- card: {env['card']}; peak: {report['peak']}",
             f"- commit: {env['commit']}{' (dirty)' if env['dirty'] else ''}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()), "",
             "| case | kernels (ran) | fp8 | img/s | ms/iter | GFLOP/img | TFLOP/s | MFU | memory GiB |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        if r.get("mode") == "sample":
            lines += _sample_line(r)
            continue
        if "error" in r:
            lines.append(f"| {r['name']} | - | - | error: {r['error'][:80]} | | | | | |")
            continue
        ran = _ran(r)
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        mem = r.get("peak_memory_gib", r.get("peak_rss_gib"))
        lines.append(f"| {r['name']} | {r['kernels_backend']} ({ran}) | {r['fp8']} | {r['img_per_s']:.2f} | "
                     f"{1e3 * r['median_s']:.1f} | {r['gflop_per_img']:.4g} | {r['tflops']:.3g} | {mfu} | {mem:.2f} |")
    return "\n".join(lines) + "\n"


def _sample_line(r: dict) -> list[str]:
    if "img_per_s" not in r:
        return [f"| {r['name']} | - | - | {r.get('error') or r.get('skipped')} | | | | | |"]
    ran = r["ran"]
    path = f"{ran.get('precision')}, compile {ran.get('compile')}, graphs {ran.get('cudagraphs')}"
    if r.get("kernels_backend", "auto") != "auto":
        path += f", kernels {r['kernels_backend']}"
    dec = r.get("img_per_s_with_decode")
    gflop = (r.get("settings") or {}).get("gflop_per_img")
    tflops = r.get("tflops")
    return [f"| {r['name']} | {path} | {ran.get('fp8') or '-'} | {r['img_per_s']:.2f}"
            + (f" ({dec:.2f} with decode)" if dec else "")
            + f" | {1e3 * r['time_scaled_s'] / r['batch_size']:.1f} per img | {gflop or 0:.4g} | {tflops or 0:.3g} "
            + f"| | {r.get('peak_mem_gib', 0):.2f} |"]


def write_report(report: dict, out: str | Path) -> tuple[Path, ...]:
    """OUT.json, OUT.md and a bar chart of img/s per case, OUT.png (bench.plots)."""
    from bench.plots import plot_throughput
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str))
    out.with_suffix(".md").write_text(markdown(report))
    written = [out.with_suffix(".json"), out.with_suffix(".md")]
    if any("img_per_s" in r for r in report["results"]):
        plot_throughput(report, out.with_suffix(".png"))
        written.append(out.with_suffix(".png"))
    return tuple(written)


def common_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options bench.throughput and bench.compare share."""
    p.add_argument("--mode", choices=["train", "sample"], default="train")
    p.add_argument("--config", default=str(REPO / "configs/dit_xl1_64ep.yaml"),
                   help="train mode: the trainer config the cases start from")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="train mode: extra trainer config override for every case (repeatable)")
    p.add_argument("--model", default=None, help="sample mode: a size (XL/1, B/2, ...) or a JSON dict of kwargs "
                                                 "(default XL/1; train mode takes the model from --config)")
    p.add_argument("--sample-steps", type=int, default=25, help="sample mode: grid points run (then scaled)")
    p.add_argument("--scale-to", type=int, default=250, help="sample mode: img/s reported for this many grid points")
    p.add_argument("--cfg-scale", type=float, default=None, help="sample mode: guidance scale (default 6.7)")
    p.add_argument("--cfg-interval-start", type=float, default=0.125)
    p.add_argument("--guidance", choices=["reference", "all"], default="reference")
    p.add_argument("--no-decode", action="store_true", help="sample mode: skip the VA-VAE decode timing")
    p.add_argument("--budget-s", type=float, default=600.0, help="sample mode: no new entry after this")
    p.add_argument("--profile", action="store_true",
                   help="sample mode: after each entry's timed run, one more under torch.profiler (kernel time by "
                        "category in the JSON; the img/s are from the unprofiled run)")
    p.add_argument("--plan", default=None, help="sample mode: SPEC@BATCH entries, comma-separated, run in this "
                                                "order (instead of --backends x --batch-sizes)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="sample mode")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--peak-tflops", type=float, default=None, help="override the device's dense bf16 peak")
    p.add_argument("--in-process", action="store_true", help="train mode: run the cases in this process")
    p.add_argument("--case-timeout", type=float, default=None, help="train mode: seconds per case")
    p.add_argument("--out", default="runs/bench/throughput", help="output path without suffix (.json/.md)")
    return p


def peak_for(a: argparse.Namespace) -> tuple[float | None, str]:
    """--peak-tflops if given, else the device's known peak."""
    if a.peak_tflops:
        return a.peak_tflops, f"user-given {a.peak_tflops:g} TFLOP/s"
    return device_peak_tflops(torch.device("cuda" if torch.cuda.is_available() else a.device))


def print_row(r: dict) -> None:
    if "error" in r:
        print(f"{r['name']}: ERROR {r['error'][:200]}", flush=True)
        return
    mem = r.get("peak_memory_gib", r.get("peak_rss_gib"))
    print(f"{r['name']}: {r['img_per_s']:.2f} img/s, {r['tflops']:.2f} TFLOP/s"
          + (f", MFU {100 * r['mfu']:.1f}%" if r["mfu"] else "") + f", peak {mem:.1f} GiB"
          + f", kernels {r['kernels_backend']} ({_ran(r)})"
          + (f", fp8 {r['fp8']}" if r["fp8"] != "off" else ""), flush=True)


def main(argv: list[str] | None = None) -> dict:
    from modeling.config import cli_parser
    p = common_args(cli_parser("bench.throughput", __doc__))
    p.add_argument("--backends", default=None,
                   help="comma-separated specs. train: trainer switches, e.g. auto+compiled,reference+compiled,"
                        "auto+compiled+fp8 (default auto+compiled); sample: Sampler paths, e.g. "
                        "fp32,bf16-weights+model+graphs (default: bench.sample_speed's plan)")
    p.add_argument("--batch-sizes", default="32")
    p.add_argument("--run-case", default=None, help=argparse.SUPPRESS)
    p.add_argument("--case-out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.run_case:  # a child process of run_train_case_subprocess
        kw = json.loads(a.run_case)
        row = run_train_case(**kw)
        Path(a.case_out).write_text(json.dumps(row, default=str))
        return row
    if a.mode == "train" and a.model is not None:  # it was ignored: the XL/1 of --config ran whatever it named
        p.error(f"--model {a.model}: train mode benchmarks the trainer's model, from --config (configs/dit_*.yaml; "
                "--set model.size=...)")
    a.model = a.model or "XL/1"
    if a.mode == "sample" and str(a.device).startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {a.device}: no CUDA device here (use --device cpu)")
    peak, peak_desc = peak_for(a)
    results = []
    batch_sizes = [int(b) for b in a.batch_sizes.split(",")]
    if a.mode == "sample":
        specs = a.backends.split(",") if a.backends else None
        results = run_sample_mode(a, specs, batch_sizes)
        for r in results:
            print(f"{r['name']} bs{r['batch_size']}: " + (f"{r['img_per_s']:.2f} img/s (scaled to {a.scale_to} points)"
                                                         if "img_per_s" in r else str(r.get("error") or r.get("skipped"))))
    if a.mode == "train":  # before the first case: a missing config or an unknown spec is one line, exit 2
        with bench_user_errors():
            read_yaml(a.config)
            for spec in (a.backends or "auto+compiled").split(","):
                parse_spec(spec)
    for backend in (a.backends or "auto+compiled").split(",") if a.mode == "train" else ():
        for bs in batch_sizes:
            if a.in_process:
                r = run_train_case(a.config, backend, bs, a.overrides, a.warmup, a.iters, peak)
            else:
                r = run_train_case_subprocess(a.config, backend, bs, a.overrides, a.warmup, a.iters, peak,
                                              a.case_timeout)
            print_row(r)
            results.append(r)
    # after the measurement (sample mode ran in this process: kernels_ran is what its entries ran)
    device = torch.device(a.device if a.mode == "sample" else "cuda" if torch.cuda.is_available() else "cpu")
    report = {"environment": environment(device), "peak": peak_desc, "peak_tflops": peak, "mode": a.mode,
              "config": a.config if a.mode == "train" else None, "results": results}
    if a.mode == "sample" and a.profile:
        report.update(sampling_shortfall_report(results, device))
    if int(os.environ.get("RANK", "0")) == 0:
        for f in write_report(report, a.out):
            print(f"wrote {f}")
    if results and not any("img_per_s" in r for r in results):  # nothing measured: not a success for a script
        print(f"error: none of the {len(results)} cases ran (each row above says why)", file=sys.stderr)
        raise SystemExit(1)
    return report



cli = console_entry(__name__)  # the `vavae-throughput` console script (setup.py)

if __name__ == "__main__":
    main()
