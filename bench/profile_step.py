"""Where does a LightningDiT-XL/1 training step spend its GPU time?

    python -m bench.profile_step --config configs/dit_xl1_64ep.yaml --spec auto+compiled --batch 256 --out DIR

Profiles a few steps of the trainer (train.train_dit.Trainer's step as fit runs it, synthetic latents, the
settings with bench.throughput's backend spec) with torch.profiler and groups the CUDA kernel time into
matmul / attention / fused-glue / inductor / optimizer / other; also times attention at the real shape
for every SDPA backend (and with head_dim zero-padded, scale kept) and the block's GEMM shapes.
Writes DIR/profile_step.json and prints a short table. `--smoke` runs tiny shapes on the CPU.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.kernel_time import profile_trainer
from bench.train_case import build_trainer, parse_spec
from evaluation.provenance import environment


def profile_training(config: str | Path, spec: str, batch: int, steps: int,
                     overrides: list[str] | tuple = ()) -> dict:
    """Build the trainer for a bench.throughput backend spec and profile its step."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(config, [*parse_spec(spec), *overrides], batch, tmp)
        return {"spec": spec, **profile_trainer(trainer, steps)}


def _bench(fn, smoke):
    if smoke or not torch.cuda.is_available():
        fn()
        return float("nan")
    import triton.testing
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def attention_shapes(batch: int, smoke: bool) -> dict:
    """Forward+backward ms and TFLOP/s of SDPA at the block's attention shape for every SDPA backend, at head_dim
    72 and zero-padded to 80 and 128 (scale kept)."""
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


def gemm_shapes(batch: int, smoke: bool, fp8: bool = False, rows: int | None = None) -> dict:
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


def main(argv: list[str] | None = None) -> dict:
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
    device = "cuda" if torch.cuda.is_available() and not a.smoke else "cpu"
    res = {"environment": environment(device)}
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
        res["environment"] = environment(device)  # after each section: the kernels it ran
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
    return res


if __name__ == "__main__":
    main()
