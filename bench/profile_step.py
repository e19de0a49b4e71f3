"""Where does a LightningDiT-XL/1 training step spend its GPU time?

    python -m bench.profile_step --config configs/dit_xl1_64ep.yaml --spec auto+compiled --batch 256 --out DIR

Profiles a few steps of the trainer (train.train_dit.Trainer.train_step, synthetic latents, the config's
settings with bench.throughput's backend spec) with torch.profiler and groups the CUDA kernel time into
matmul / attention / fused-glue / inductor / optimizer / other; also times attention at the real shape
for every SDPA backend (and with head_dim zero-padded, scale kept) and the block's GEMM shapes.
Writes DIR/profile_step.json and prints a short table. `--smoke` runs tiny shapes on the CPU.
"""
import json
import math
import os

import torch
import torch.nn.functional as F

CATEGORIES = (  # first match wins; lower-case substrings of kernel names
    ("attention", ("flash", "fmha", "cudnn", "attn", "sdpa", "mha")),
    ("matmul", ("gemm", "xmma", "cutlass", "nvjet", "matmul", "sm90_", "wgmma", "scaled_mm", "float8")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("fused glue (ours)", ("_norm_fwd", "_norm_bwd", "vavae", "_rope", "_swiglu", "_gated", "_fwd_kernel", "_bwd_kernel")),
    ("inductor fusions", ("triton_",)),
)


def categorize(name):
    n = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in n for k in keys):
            return cat
    return "other (eager elementwise, copies, reductions)"


def kernel_times(fn, calls=1, cuda=True):
    """torch.profiler over `calls` calls of fn -> {"ms_per_call_by_category", "total_kernel_ms_per_call",
    "top_kernels_ms_per_call"}: CUDA kernel time (kernels replayed from CUDA graphs included) grouped by
    CATEGORIES; on the CPU the CPU time of the ops instead."""
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
    if cuda:  # only kernels (device-side events); drop the CPU-op rows that also carry device time
        kernels_ = {k: v for k, v in kernels_.items() if not k.startswith(("aten::", "autograd::", "Optimizer",
                                                                             "ProfilerStep", "cudaLaunch", "Torch-Compiled",
                                                                             "CompiledFunction", "## ", "vavae::"))}
    cats = {}
    for k, v in kernels_.items():
        cats[categorize(k)] = cats.get(categorize(k), 0.0) + v
    return {"ms_per_call_by_category": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
            "total_kernel_ms_per_call": sum(kernels_.values()),
            "top_kernels_ms_per_call": sorted(kernels_.items(), key=lambda kv: -kv[1])[:30]}


def profile_trainer(trainer, steps=2, warmup=3):
    """kernel_times over `steps` calls of the trainer's own step (Trainer.train_step)."""
    for _ in range(warmup):
        trainer.train_step()
    k = kernel_times(trainer.train_step, steps, trainer.device.type == "cuda")
    return {"batch": trainer.cfg.train.batch_per_gpu, "kernels": trainer.cfg.train.kernels,
            "compile": trainer.cfg.train.compile, "fp8": trainer.fp8_desc,
            "ms_per_step_by_category": k["ms_per_call_by_category"],
            "total_kernel_ms_per_step": k["total_kernel_ms_per_call"],
            "top_kernels_ms_per_step": k["top_kernels_ms_per_call"]}


def profile_training(config, spec, batch, steps, overrides=()):
    """Build the trainer for a bench.throughput backend spec and profile its step."""
    import tempfile

    from bench.throughput import build_trainer, parse_spec
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(config, [*parse_spec(spec), *overrides], batch, tmp)
        return {"spec": spec, **profile_trainer(trainer, steps)}


def _bench(fn, smoke):
    if smoke or not torch.cuda.is_available():
        fn()
        return float("nan")
    import triton.testing
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def attention_shapes(batch, smoke):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    dev = "cuda" if torch.cuda.is_available() and not smoke else "cpu"
    B, H, N, D = (2, 2, 16, 72) if smoke else (batch, 16, 256, 72)
    flops = 4 * B * H * N * N * D * 3.5  # forward 4*B*H*N^2*D, backward ~2.5x
    out = {}
    backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}
    for pad in (D, 80, 128):
        q, k, v = (torch.randn(B, H, N, pad, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        g = torch.randn(B, H, N, pad, device=dev, dtype=torch.bfloat16)
        for name, be in backends.items():
            def fb():
                with sdpa_kernel(be):
                    F.scaled_dot_product_attention(q, k, v, scale=1 / math.sqrt(D)).backward(g)
            try:
                ms = _bench(fb, smoke)
                out[f"{name} head_dim {pad}"] = {"fwd_bwd_ms": ms, "TFLOPs_at_72": flops / ms / 1e9}
            except Exception as e:
                out[f"{name} head_dim {pad}"] = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
    return out


def gemm_shapes(batch, smoke, fp8=False, rows=None):
    """The block's GEMMs at `rows` token rows (default batch * 256) in bf16; with fp8 also torch._scaled_mm
    alone (pre-quantized operands, per-row and per-tensor scales, fast accumulation, bf16 out) and the
    sampler's FP8Linear under torch.compile (activation quantization included)."""
    dev = "cuda" if torch.cuda.is_available() and not smoke else "cpu"
    T = 64 if smoke else (rows or batch * 256)
    shapes = {"qkv 1152->3456": (1152, 3456), "proj 1152->1152": (1152, 1152), "w12 1152->6144": (1152, 6144),
              "w3 3072->1152": (3072, 1152), "adaLN 1152->6912 (B rows)": (1152, 6912)}
    if smoke:
        shapes = {"qkv 96->288": (96, 288), "adaLN 96->576 (B rows)": (96, 576)}
    out = {}
    for name, (k, n) in shapes.items():
        m = batch if "adaLN" in name else T
        a = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
        ms = _bench(lambda: F.linear(a, w), smoke)
        out[name] = {"ms": ms, "TFLOPs": 2 * m * k * n / ms / 1e9}
        if not fp8 or "adaLN" in name:
            continue
        from modeling.fp8 import FP8Linear, quantize_fp8
        for rowwise in (True, False):
            tag = "rowwise" if rowwise else "tensorwise"
            aq, sa = quantize_fp8(a, rowwise)
            wq, sw = quantize_fp8(w, rowwise)
            sw = sw.reshape(1, -1) if rowwise else sw
            try:
                ms = _bench(lambda: torch._scaled_mm(aq, wq.t(), scale_a=sa, scale_b=sw, out_dtype=torch.bfloat16,
                                                     use_fast_accum=True), smoke)
                out[f"{name} fp8 {tag} mm"] = {"ms": ms, "TFLOPs": 2 * m * k * n / ms / 1e9}
                lin = torch.nn.Linear(k, n, bias=True, device=dev, dtype=torch.bfloat16).requires_grad_(False)
                f = FP8Linear(lin, rowwise)
                f = f if smoke else torch.compile(f, dynamic=False)
                ms = _bench(lambda: f(a), smoke)
                out[f"{name} fp8 {tag} FP8Linear compiled"] = {"ms": ms, "TFLOPs": 2 * m * k * n / ms / 1e9}
            except Exception as e:  # noqa: BLE001 -- one kernel refusing must not hide the others
                out[f"{name} fp8 {tag}"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return out


def main(argv=None):
    from modeling.config import cli_parser

    ap = cli_parser("bench.profile_step", __doc__)
    ap.add_argument("--config", default="configs/dit_xl1_64ep.yaml")
    ap.add_argument("--spec", default="auto+compiled", help="bench.throughput backend spec")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results/tmp"))
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--sections", default="attention,gemm,profile", help="which of attention, gemm, profile")
    ap.add_argument("--fp8", action="store_true", help="gemm: also the FP8 GEMMs (torch._scaled_mm, FP8Linear)")
    ap.add_argument("--rows", type=int, default=None, help="gemm: token rows (default batch * 256)")
    a = ap.parse_args(argv)
    batch = 2 if a.smoke else a.batch
    res = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    sections = {"attention": lambda: attention_shapes(batch, a.smoke),
                "gemm": lambda: gemm_shapes(batch, a.smoke, a.fp8, a.rows),
                "profile": lambda: profile_training("configs/dit_tiny_cpu.yaml" if a.smoke else a.config, a.spec,
                                                    batch, a.steps)}
    wanted = [x.strip() for x in a.sections.split(",") if x.strip()]
    unknown = sorted(set(wanted) - set(sections))
    if unknown:
        ap.error(f"--sections: unknown {unknown}; choose from {sorted(sections)}")
    for name in wanted:
        fn = sections[name]
        try:
            res[name] = fn()
        except Exception as e:
            res[name] = f"ERROR {type(e).__name__}: {e}"
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "profile_step.json"), "w") as f:
            json.dump(res, f, indent=1, default=str)
    p = res.get("profile")
    if isinstance(p, dict):
        print(f"== {p['spec']} batch {p['batch']}: {p['total_kernel_ms_per_step']:.1f} ms of kernels per step")
        for cat, ms in p["ms_per_step_by_category"].items():
            print(f"  {cat:45s} {ms:8.1f} ms")
        for k, ms in p["top_kernels_ms_per_step"][:15]:
            print(f"  {ms:8.2f} ms  {k[:110]}")
    elif "profile" in res:
        print("profile:", p)
    for sec in ("attention", "gemm"):
        if isinstance(res.get(sec), dict):
            for k, v in res[sec].items():
                print(f"{sec}: {k:32s} {v}")


if __name__ == "__main__":
    main()
