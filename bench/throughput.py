"""Training-step and sampling throughput of LightningDiT across backends and batch sizes.

    python -m bench.throughput --model XL/1 --batch-sizes 16,32 --backends eager,compiled,fused,fused+fp8
    python -m bench.throughput --mode sample --model XL/1 --batch-sizes 64 --sample-steps 250 --cfg-scale 4

A backend spec joins any of: `eager` (nothing), `compiled` (torch.compile), `fused` (kernels backend
"cuda" if the extension is built, else "triton"; override with --kernels), `fp8` (torchao float8 on
the blocks' linears). A part that cannot run raises; nothing falls back silently. Train mode times
one optimizer step (flow loss forward + backward + AdamW) on random latents, no data loading and no
DeepSpeed; sample mode times `modeling.sampling.sample` for N grid points, with and without guidance.
FLOPs come from `model.flops_per_sample()` (XL/1: ~712 GFLOP per image per training step); MFU is
TFLOP/s over the device's dense bf16 peak (H100/H200 SXM: 989). Output: JSON + Markdown with the
device, library versions, commit, and `kernels.describe()` -- the backend that actually ran.
Per-op kernel timings: bench/ops_bench.py.
"""
import argparse
import json
import platform
import resource
import statistics
import subprocess
import time
from pathlib import Path

import torch

import kernels
from modeling.flow import flow_loss
from modeling.lightningdit import LIGHTNINGDIT_SIZES, LightningDiT, build_lightningdit
from modeling.sampling import sample

# Dense bf16 peak TFLOP/s (no sparsity) by device-name substring.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}
SPEC_PARTS = ("eager", "compiled", "fused", "fp8")


def device_peak_tflops(device):
    if device.type != "cuda":
        return None, "no peak known for a CPU: MFU not reported"
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16_TFLOPS.items():
        if key in name:
            return peak, f"{key} dense bf16 {peak:g} TFLOP/s"
    return None, f"no peak known for {name}: pass --peak-tflops"


def environment(device):
    def git(*args):
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                                  cwd=Path(__file__).resolve().parents[1]).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("triton", "deepspeed", "torchao", "numpy"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            versions[mod] = "not installed"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"device": f"{device.type}: {name}", "cpu_threads": torch.get_num_threads(), "versions": versions,
            "commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def parse_spec(spec):
    parts = spec.split("+")
    bad = [p for p in parts if p not in SPEC_PARTS]
    if bad:
        raise ValueError(f"unknown backend part(s) {bad} in {spec!r}; join any of {SPEC_PARTS} with '+'")
    return set(parts)


def build_model(model, device, **overrides):
    if model in LIGHTNINGDIT_SIZES:
        return build_lightningdit(model, **overrides).to(device)
    return LightningDiT(**json.loads(model), **overrides).to(device)  # a JSON dict of constructor kwargs


class Case:
    """One benchmark configuration: a model, a backend spec, a batch size, a mode. `run(n)` -> seconds."""

    def __init__(self, model="XL/1", backend="eager", batch_size=32, mode="train", precision="bf16",
                 sample_steps=250, cfg_scale=1.0, cfg_interval_start=0.0, kernels_backend=None,
                 device="cuda", allow_cpu_fp8=False, seed=0):
        label = model if model in LIGHTNINGDIT_SIZES else "custom"
        self.name = f"{label} {backend} bs{batch_size} {mode}" + (f" cfg{cfg_scale:g}" if mode == "sample" else "")
        self.model_spec, self.mode, self.batch_size, self.precision = model, mode, batch_size, precision
        self.sample_steps, self.cfg_scale, self.cfg_interval_start = sample_steps, cfg_scale, cfg_interval_start
        self.device = torch.device(device)
        self.spec = backend
        parts = parse_spec(backend)
        fused_default = "cuda" if kernels.backend.cuda_status()[0] else "triton"
        self.kernels_backend = kernels_backend or (fused_default if "fused" in parts else "reference")
        kernels.set_backend(self.kernels_backend)
        torch.manual_seed(seed)
        self.model = build_model(model, self.device)
        self.fp8 = "off"
        if "fp8" in parts:
            from train import fp8
            self.fp8 = fp8.check_fp8("torchao", self.device, allow_cpu_fp8)
            fp8.apply_fp8(self.model, "torchao", allow_cpu=allow_cpu_fp8)
        self.flops_per_image = self.model.flops_per_sample(train=mode == "train")
        self.fn = torch.compile(self.model) if "compiled" in parts else self.model
        g = torch.Generator(self.device).manual_seed(seed)
        m = self.model
        size = m.x_embedder.grid_size * m.x_embedder.patch_size[0]
        self.x = torch.randn(batch_size, m.in_channels, size, size, device=self.device, generator=g)
        self.y = torch.randint(0, m.num_classes, (batch_size,), device=self.device, generator=g)
        if mode == "train":
            self.model.train()
            self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=self.device.type == "cuda")
        elif mode == "sample":
            self.model.eval()
            calls = (sample_steps - 1) * (2 if cfg_scale != 1.0 else 1)
            self.flops_per_image *= calls
        else:
            raise ValueError(f"mode must be 'train' or 'sample', got {mode!r}")
        self.kernels_used = {}

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def _once(self):
        if self.mode == "train":
            with self._autocast():
                loss = flow_loss(self.fn, self.x, self.y)["loss"]
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        else:
            with self._autocast():
                sample(self.fn, self.x, self.y, steps=self.sample_steps, cfg_scale=self.cfg_scale,
                       cfg_interval_start=self.cfg_interval_start)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self, iters):
        """Time `iters` iterations (each synchronised); returns per-iteration seconds."""
        kernels.set_backend(self.kernels_backend)  # the switch is global: compare mode alternates cases
        times = []
        for _ in range(iters):
            self._sync()
            t = time.perf_counter()
            self._once()
            self._sync()
            times.append(time.perf_counter() - t)
        self.kernels_used = kernels.describe()
        return times

    def result(self, times, peak_tflops):
        sec = statistics.median(times)
        img_s = self.batch_size / sec
        tflops = img_s * self.flops_per_image / 1e12
        if self.device.type == "cuda":
            mem = {"peak_memory_gib": torch.cuda.max_memory_allocated(self.device) / 2 ** 30}
        else:
            mem = {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}
        return {"name": self.name, "model": self.model_spec, "mode": self.mode, "backend": self.spec, "batch_size": self.batch_size,
                "precision": self.precision, "sample_steps": self.sample_steps if self.mode == "sample" else None,
                "cfg_scale": self.cfg_scale if self.mode == "sample" else None,
                "median_s": sec, "times_s": times, "img_per_s": img_s,
                "gflop_per_img": self.flops_per_image / 1e9, "tflops": tflops,
                "mfu": tflops / peak_tflops if peak_tflops else None, **mem,
                "kernels_backend": self.kernels_backend, "kernels": self.kernels_used, "fp8": self.fp8}


def benchmark(case, warmup=3, iters=10, peak_tflops=None):
    case.run(warmup)
    if case.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(case.device)
    return case.result(case.run(iters), peak_tflops)


def markdown(report):
    env = report["environment"]
    lines = ["# LightningDiT throughput", "",
             f"- device: {env['device']}; peak: {report['peak']}",
             f"- commit: {env['commit']}{' (dirty)' if env['dirty'] else ''}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()), "",
             "| case | kernels (ran) | fp8 | img/s | ms/iter | GFLOP/img | TFLOP/s | MFU | memory GiB |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        ran = ",".join(sorted(set(r["kernels"].get("ops", {}).values()))) or "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        mem = r.get("peak_memory_gib", r.get("peak_rss_gib"))
        lines.append(f"| {r['name']} | {r['kernels_backend']} ({ran}) | {r['fp8']} | {r['img_per_s']:.2f} | "
                     f"{1e3 * r['median_s']:.1f} | {r['gflop_per_img']:.4g} | {r['tflops']:.3g} | {mfu} | {mem:.2f} |")
    return "\n".join(lines) + "\n"


def write_report(report, out):
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(markdown(report))
    return out.with_suffix(".json"), out.with_suffix(".md")


def common_args(p):
    p.add_argument("--model", default="XL/1", help="a size (XL/1, B/2, ...) or a JSON dict of LightningDiT kwargs")
    p.add_argument("--mode", choices=["train", "sample"], default="train")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--sample-steps", type=int, default=250)
    p.add_argument("--cfg-scale", type=float, default=None,
                   help="sample mode: guidance scale of the guided run (an unguided run is always added)")
    p.add_argument("--cfg-interval-start", type=float, default=0.0)
    p.add_argument("--kernels", default=None, help="kernels backend for 'fused' (default: cuda if built, else triton)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--allow-cpu-fp8", action="store_true", help="run torchao FP8 emulated on the CPU (tests)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--peak-tflops", type=float, default=None, help="override the device's dense bf16 peak")
    p.add_argument("--out", default="runs/bench/throughput", help="output path without suffix (.json/.md)")
    return p


def case_kwargs(a, backend, batch_size, cfg_scale=1.0):
    return dict(model=a.model, backend=backend, batch_size=batch_size, mode=a.mode, precision=a.precision,
                sample_steps=a.sample_steps, cfg_scale=cfg_scale, cfg_interval_start=a.cfg_interval_start,
                kernels_backend=a.kernels, device=a.device, allow_cpu_fp8=a.allow_cpu_fp8)


def peak_for(a):
    if a.peak_tflops:
        return a.peak_tflops, f"user-given {a.peak_tflops:g} TFLOP/s"
    return device_peak_tflops(torch.device(a.device))


def main(argv=None):
    p = common_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--backends", default="eager", help="comma-separated backend specs, e.g. eager,compiled,fused+fp8")
    p.add_argument("--batch-sizes", default="32")
    a = p.parse_args(argv)
    peak, peak_desc = peak_for(a)
    cfgs = [1.0] + ([a.cfg_scale] if a.mode == "sample" and a.cfg_scale not in (None, 1.0) else [])
    results = []
    for backend in a.backends.split(","):
        for bs in [int(b) for b in a.batch_sizes.split(",")]:
            for cfg in cfgs:
                case = Case(**case_kwargs(a, backend, bs, cfg))
                r = benchmark(case, a.warmup, a.iters, peak)
                print(f"{r['name']}: {r['img_per_s']:.2f} img/s, {r['tflops']:.2f} TFLOP/s"
                      + (f", MFU {100 * r['mfu']:.1f}%" if r["mfu"] else "") + f", kernels {r['kernels_backend']}")
                results.append(r)
                del case
    report = {"environment": environment(torch.device(a.device)), "peak": peak_desc, "peak_tflops": peak,
              "results": results}
    for f in write_report(report, a.out):
        print(f"wrote {f}")
    return report


if __name__ == "__main__":
    main()
