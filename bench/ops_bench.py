"""Per-op timing of the memory-bound kernels: reference eager, torch.compile(reference), Triton, CUDA ext.

For each op and implementation: forward and forward+backward time (median), GB/s over the fewest bytes
the op must move (each input read once, each output written once), and the forward's relative error vs
the fp32 reference. `python -m bench.ops_bench [--smoke] [--out runs/bench/ops]` prints the results and writes
them as OUT.json with a bar chart of GB/s per op and implementation beside it (OUT.png); bench/gpu_suite.py
calls run().
"""
import json
import time
from pathlib import Path

import torch

import kernels
from kernels import attention, reference
from modeling.config import console_entry


def bench_ms(fn, smoke):
    if smoke or not torch.cuda.is_available():
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton.testing
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def cases(smoke, device, dtype):
    """name -> (fn(impl, *inputs), inputs, fwd bytes, bwd bytes); XL/1 shapes (B x 256 tokens x 1152)."""
    # batch 256: each activation (151 MB in bf16) is several times the 50-60 MB L2, so DRAM is measured
    B, N, C, H, D, F = (2, 9, 40, 2, 8, 48) if smoke else (256, 256, 1152, 16, 72, 3072)
    r = lambda *s: torch.randn(*s, device=device, dtype=dtype, requires_grad=True)  # noqa: E731
    e = torch.finfo(dtype).bits // 8
    RC = B * N * C * e
    x, y, x12, mod, w = r(B, N, C), r(B, N, C), r(B, N, 2 * F), r(B, 6 * C), r(C)
    qkv = r(B, N, 3, H, D)
    from modeling.lightningdit import VisionRotaryEmbeddingFast
    side = int(N ** 0.5) + 1
    tab = VisionRotaryEmbeddingFast(D // 2, side).to(device)
    cos, sin = tab.freqs_cos[:N].to(dtype), tab.freqs_sin[:N].to(dtype)
    QK = 2 * B * H * N * D * e
    sh, sc, g = (lambda m: m[:, :C]), (lambda m: m[:, C:2 * C]), (lambda m: m[:, 2 * C:3 * C])
    return {
        "rms_norm": (lambda m, x, w: m.rms_norm(x, w, 1e-6), [x, w], 2 * RC, 3 * RC),
        "norm_modulate": (lambda m, x, w, md: m.norm_modulate(x, w, sh(md), sc(md), 1e-6, "rms"), [x, w, mod],
                          2 * RC, 3 * RC),
        "gated_residual_norm_modulate": (
            lambda m, x, y, w, md: m.gated_residual_norm_modulate(x, g(md), y, w, sh(md), sc(md), 1e-6, "rms"),
            [x, y, w, mod], 4 * RC, 6 * RC),
        "gated_residual": (lambda m, x, y, md: m.gated_residual(x, g(md), y), [x, y, mod], 3 * RC, 3 * RC),
        "swiglu": (lambda m, t: m.swiglu(t), [x12], 3 * B * N * F * e, 5 * B * N * F * e),
        "rope_qk": (lambda m, t: m.rope_qk(*t.permute(2, 0, 3, 1, 4).unbind(0)[:2], cos, sin), [qkv], 2 * QK, 2 * QK),
    }


def _impls(device, smoke):
    out = {"reference": lambda: kernels.set_backend("reference"),
           "compiled_reference": lambda: kernels.set_backend("reference")}
    if device == "cuda" or smoke:
        out["triton"] = lambda: kernels.set_backend("triton")
    if kernels.backend.cuda_status()[0]:
        out["cuda"] = lambda: kernels.set_backend("cuda")
    return out


def run(smoke=False, dtype=torch.bfloat16, copy_gbs=None):
    device = "cuda" if torch.cuda.is_available() and not smoke else "cpu"
    results = {}
    from kernels import ops
    for name, (fn, inputs, fwd_bytes, bwd_bytes) in cases(smoke, device, dtype).items():
        ref_inputs = [t.detach().float() for t in inputs]
        ref_out = fn(reference, *ref_inputs)
        ref_out = ref_out if isinstance(ref_out, tuple) else (ref_out,)
        results[name] = {}
        for impl, activate in _impls(device, smoke).items():
            if impl == "cuda" and "cuda" not in kernels.backend.implementations()[name]:
                continue
            row = {}
            try:
                activate()
                call = (lambda *a: fn(reference, *a)) if impl.startswith("compiled") else (lambda *a: fn(ops, *a))
                if impl == "compiled_reference":
                    # the lambda's code object is shared by every op: without a reset dynamo's recompile limit
                    # (8) is hit and later ops silently run eager under the "compiled" label
                    torch._dynamo.reset()
                    call = torch.compile(call, backend="eager" if smoke else "inductor", fullgraph=True)
                out = call(*inputs)
                out = out if isinstance(out, tuple) else (out,)
                row["rel_err_vs_fp32"] = max(((o.float() - r).norm() / r.norm()).item() for o, r in zip(out, ref_out))
                row["ran"] = kernels.describe()["ops"].get(name, impl) if impl in ("triton", "cuda") else impl
                grads = [torch.randn_like(o) for o in out]

                def fwd():
                    with torch.no_grad():
                        call(*inputs)

                def fwd_bwd():
                    o = call(*inputs)
                    o = o if isinstance(o, tuple) else (o,)
                    torch.autograd.backward(o, grads)
                row["fwd_ms"] = bench_ms(fwd, smoke)
                row["fwd_bwd_ms"] = bench_ms(fwd_bwd, smoke)
                row["fwd_GBps"] = fwd_bytes / row["fwd_ms"] / 1e6
                row["fwd_bwd_GBps"] = (fwd_bytes + bwd_bytes) / row["fwd_bwd_ms"] / 1e6
                if copy_gbs:
                    row["fwd_pct_copy"] = 100 * row["fwd_GBps"] / copy_gbs
                    row["fwd_bwd_pct_copy"] = 100 * row["fwd_bwd_GBps"] / copy_gbs
            except Exception as e:  # recorded, never stops the other rows
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            results[name][impl] = row
    kernels.set_backend("auto")
    results["attention"] = attention_bench(smoke, device, dtype)
    results["mlp_w12_swiglu"] = w12_swiglu_bench(smoke, device, dtype)
    return results


def w12_swiglu_bench(smoke, device, dtype):
    """The sampler's MLP front half, forward only (inference), at XL/1 rows (a guided step of batch 256):
    cuBLAS w12 GEMM + our SwiGLU kernel, the same under torch.compile (inductor's SwiGLU), and the fused
    kernel (kernels/linear_swiglu.py) that never writes the (rows, 6144) product."""
    import torch.nn.functional as F

    from kernels import linear_swiglu, swiglu
    rows, K, H = (37, 72, 40) if smoke else (256 * 256, 1152, 3072)
    x = torch.randn(rows, K, device=device, dtype=dtype)
    w = (torch.randn(2 * H, K, device=device) / K ** 0.5).to(dtype)
    b = torch.randn(2 * H, device=device, dtype=dtype)
    ref = reference.swiglu(F.linear(x.float(), w.float(), b.float()))
    impls = {"cublas+triton_swiglu": lambda: swiglu.swiglu(F.linear(x, w, b)),
             "compiled (cublas+inductor)": torch.compile(lambda: reference.swiglu(F.linear(x, w, b)),
                                                         backend="eager" if smoke else "inductor"),
             "fused_triton": lambda: linear_swiglu.linear_swiglu(x, w, b)}
    flops = 2 * rows * K * 2 * H
    out = {"shape": {"rows": rows, "K": K, "H": H}}
    for name, fn in impls.items():
        try:
            with torch.no_grad():
                o = fn()
                ms = bench_ms(fn, smoke)
            out[name] = {"fwd_ms": ms, "TFLOPs": flops / ms / 1e9,
                         "rel_err_vs_fp32": ((o.float() - ref).norm() / ref.norm()).item()}
        except Exception as e:  # recorded, never stops the other rows
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    return out


def attention_bench(smoke, device, dtype):
    """Every attention implementation the chooser measures, at XL/1's shape (head_dim 72)."""
    B, H, N, D = (1, 2, 9, 8) if smoke else (32, 16, 256, 72)
    q, k, v = (torch.randn(B, H, N, D, device=device, dtype=dtype) for _ in range(3))
    kernels.set_backend("auto")
    from kernels import ops
    ops.attention(q, k, v)
    flops = 4 * B * H * N * N * D * 3.5  # fwd 2 matmuls, bwd 2.5x
    meas = {k2: ({"fwd_bwd_ms": t, "TFLOPs": flops / t / 1e9} if isinstance(t, float) else t)
            for key, m in attention._measured.items() for k2, t in m.items()}
    return {"chosen": kernels.describe()["ops"].get("attention"), "candidates": meas}


def main(argv=None):
    from bench.plots import plot_ops
    from modeling.config import cli_parser

    p = cli_parser("bench.ops_bench", __doc__)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (checks the plumbing, times nothing)")
    p.add_argument("--out", default="runs/bench/ops", help="output path without suffix: .json and .png are written")
    a = p.parse_args(argv)
    results = run(a.smoke)
    print(json.dumps(results, indent=1))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    plot_ops(results, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return results



cli = console_entry(__name__)  # the `vavae-ops-bench` console script (setup.py)

if __name__ == "__main__":
    main()
