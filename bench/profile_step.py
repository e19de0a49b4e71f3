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
from collections.abc import Callable
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
        from kernels.fp8_linear import forward_mm
        from kernels.fp8_quant import quantize_fp8
        from modeling.fp8 import FP8Linear
        for rowwise in (True, False):
            tag = "rowwise" if rowwise else "tensorwise"
            aq, sa = quantize_fp8(a, rowwise)
            wq, sw = quantize_fp8(w, rowwise)
            sw = sw.reshape(1, -1) if rowwise else sw
            try:
                ms = _bench(lambda: forward_mm(aq, sa, wq, sw, None), smoke)
                out[f"{name} fp8 {tag} mm"] = {"ms": ms, "TFLOPs": 2 * m * k * n / ms / 1e9}
                lin = torch.nn.Linear(k, n, bias=True, device=dev, dtype=torch.bfloat16).requires_grad_(False)
                f = FP8Linear(lin, rowwise)
                f = f if smoke else torch.compile(f, dynamic=False)
                ms = _bench(lambda: f(a), smoke)
                out[f"{name} fp8 {tag} FP8Linear compiled"] = {"ms": ms, "TFLOPs": 2 * m * k * n / ms / 1e9}
            except Exception as e:  # noqa: BLE001 -- one kernel refusing must not hide the others
                out[f"{name} fp8 {tag}"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return out


# The block's Linears at XL/1: (in, out) features; the step runs each forward, dgrad and wgrad once per block
BLOCK_LINEARS = {"qkv": (1152, 3456), "proj": (1152, 1152), "w12": (1152, 6144), "w3": (3072, 1152)}
SMOKE_LINEARS = {"qkv": (96, 288), "proj": (96, 96)}
XL_DEPTH = 28


def training_gemm_calls(x: torch.Tensor, g: torch.Tensor, w: torch.Tensor,
                        bias: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    """Each GEMM of one block Linear's training step as a call on operands made here, beforehand: x (M, K) and the
    output gradient g (M, N) in bf16, the fp32 master weight w (N, K), a bf16 bias. bf16 as autograd runs them (the
    forward with its bias, dgrad g W, wgrad g^T x); FP8 as FP8TrainingLinear runs them (kernels.fp8_linear's forward_mm,
    rowwise_dgrad, wgrad_mm, tensorwise_dgrad, tensorwise_wgrad -- the last with its two transposing copies -- on
    the trainer's own weight operands and activation quantizers: tests check the results against the trainer's
    outputs and gradients bit for bit); and the row-wise gradient GEMMs with fast accumulation (a what-if: training
    accumulates them in two levels)."""
    from kernels import fp8_linear as fp8
    from kernels.fp8_quant import pad_rows

    (n, k), dev, e4m3, bf16 = w.shape, w.device, torch.float8_e4m3fn, torch.bfloat16
    wb = w.to(bf16)
    # row-wise: power-of-two scales, W per output channel and W^T per input channel
    w_q, w_s = torch.empty(n, k, dtype=e4m3, device=dev), torch.empty(1, n, device=dev)
    wt_q, wt_s = torch.empty(k, n, dtype=e4m3, device=dev), torch.empty(k, 1, device=dev)
    fp8.quantize_weight_rowwise(w, w_q, w_s, wt_q, wt_s)
    x_q = fp8.quantize_along(x, -1, pow2=True)
    g_q = fp8.quantize_along(g, -1, pow2=True)
    gt_q = fp8.quantize_along(pad_rows(g).t().contiguous(), -1, pow2=True)
    xt_q = fp8.quantize_along(pad_rows(x).t().contiguous(), -1, pow2=True)
    # tensorwise: one scale per tensor, e5m2 gradients
    tw_q, tw_s = torch.empty(n, k, dtype=e4m3, device=dev), torch.empty((), device=dev)
    twt_q, twt_s = torch.empty(k, n, dtype=e4m3, device=dev), torch.empty((), device=dev)
    fp8.quantize_weight_tensorwise(w, tw_q, tw_s, twt_q, twt_s)
    tx_q = fp8.quantize_along(x, None)
    tg_q = fp8.quantize_along(g, None, torch.float8_e5m2)
    return {
        "bf16 fwd": lambda: F.linear(x, wb, bias),
        "bf16 dgrad": lambda: g @ wb,
        "bf16 wgrad": lambda: g.t() @ x,
        "rowwise fwd": lambda: fp8.forward_mm(*x_q, w_q, w_s, bias),
        "rowwise dgrad": lambda: fp8.rowwise_dgrad(g, wt_q, wt_s, g_q),
        "rowwise wgrad": lambda: fp8.wgrad_mm(*gt_q, *xt_q),
        "rowwise dgrad fast-accum (what-if)": lambda: fp8.rowwise_dgrad(g, wt_q, wt_s, g_q, fast_accum=True),
        "rowwise wgrad fast-accum (what-if)": lambda: fp8.wgrad_mm(*gt_q, *xt_q, fast_accum=True),
        "tensorwise fwd": lambda: fp8.forward_mm(*tx_q, tw_q, tw_s, bias),
        "tensorwise dgrad": lambda: fp8.tensorwise_dgrad(*tg_q, twt_q, twt_s, bf16),
        "tensorwise wgrad (with its transposes)": lambda: fp8.tensorwise_wgrad(*tg_q, *tx_q),
    }


# each recipe's three GEMMs of a Linear (rowwise_with_gw_hp: row-wise forward and dgrad, the wgrad in bf16)
RECIPE_GEMMS = {"bf16": ("bf16 fwd", "bf16 dgrad", "bf16 wgrad"),
                "rowwise": ("rowwise fwd", "rowwise dgrad", "rowwise wgrad"),
                "rowwise_with_gw_hp": ("rowwise fwd", "rowwise dgrad", "bf16 wgrad"),
                "tensorwise": ("tensorwise fwd", "tensorwise dgrad", "tensorwise wgrad (with its transposes)")}


def training_gemms(batch: int, smoke: bool, depth: int = XL_DEPTH) -> dict:
    """training_gemm_calls timed for each block Linear at M = batch x 256 tokens (ms and TFLOP/s per GEMM), and
    `per_step_ms`: each recipe's GEMMs over `depth` blocks -- GEMM time alone; the quantization passes are the step
    profile's to count. Why: on 2026-12-04 FP8 training ran no faster than bf16 through the trainer (H200, 551.4
    vs 554.7 img/s) without a profile; this says per GEMM whether FP8 is the faster multiply at the trainer's
    shapes (a wgrad's output is as small as the weight while its sums run over all the step's tokens)."""
    dev = "cuda" if torch.cuda.is_available() and not smoke else "cpu"
    M = 64 if smoke else batch * 256
    out: dict = {"tokens": M, "depth": depth}
    totals = dict.fromkeys(RECIPE_GEMMS, 0.0)
    for name, (k, n) in (SMOKE_LINEARS if smoke else BLOCK_LINEARS).items():
        gen = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(M, k, device=dev, dtype=torch.bfloat16, generator=gen)
        g = torch.randn(M, n, device=dev, dtype=torch.bfloat16, generator=gen)
        w = torch.randn(n, k, device=dev, generator=gen) / math.sqrt(k)
        bias = torch.randn(n, device=dev, generator=gen).to(torch.bfloat16)
        rows: dict[str, object] = {}
        for label, fn in training_gemm_calls(x, g, w, bias).items():
            try:
                ms = _bench(fn, smoke)
                rows[label] = {"ms": ms, "TFLOPs": 2 * M * k * n / ms / 1e9}
            except Exception as e:  # noqa: BLE001 -- one GEMM refusing must not hide the others
                rows[label] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        out[name] = rows
        for recipe, labels in RECIPE_GEMMS.items():
            totals[recipe] += depth * sum(rows[lb]["ms"] if isinstance(rows[lb], dict) else float("nan")
                                          for lb in labels)
    out["per_step_ms"] = totals
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
    ap.add_argument("--sections", default="attention,gemm,profile",
                    help="which of attention, gemm, train_gemm (each GEMM of the training step, bf16 and FP8), profile")
    ap.add_argument("--fp8", action="store_true", help="gemm: also the FP8 GEMMs (torch._scaled_mm, FP8Linear)")
    ap.add_argument("--rows", type=int, default=None, help="gemm: token rows (default batch * 256)")
    a = ap.parse_args(argv)
    batch = 2 if a.smoke else a.batch
    device = "cuda" if torch.cuda.is_available() and not a.smoke else "cpu"
    res = {"environment": environment(device)}
    sections = {"attention": lambda: attention_shapes(batch, a.smoke),
                "gemm": lambda: gemm_shapes(batch, a.smoke, a.fp8, a.rows),
                "train_gemm": lambda: training_gemms(batch, a.smoke),
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
    if isinstance(res.get("train_gemm"), dict):
        print(train_gemm_table(res["train_gemm"]))
    return res


def train_gemm_table(t: dict) -> str:
    """training_gemms' result as a short text table: ms per GEMM and linear, then each recipe's GEMMs per step."""
    linears = [k for k, v in t.items() if isinstance(v, dict) and k != "per_step_ms"]
    labels = list(dict.fromkeys(lb for k in linears for lb in t[k]))
    lines = [f"train_gemm at {t['tokens']} tokens (ms; each GEMM alone) " + " ".join(f"{k:>8s}" for k in linears)]
    for lb in labels:
        cells = [t[k].get(lb) for k in linears]
        lines.append(f"  {lb:40s} " + " ".join(f"{c['ms']:8.3f}" if isinstance(c, dict) else f"{'error':>8s}"
                                                 for c in cells))
    lines.append(f"  GEMMs per step ({t['depth']} blocks): " + ", ".join(f"{r} {v:.1f} ms"
                                                                       for r, v in t["per_step_ms"].items()))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
