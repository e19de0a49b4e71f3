"""Per-op timing of every registered kernels op: reference eager, torch.compile(reference), and each fused backend
the op declares (triton, cuda) where it can run.

The ops and their inputs come from the declarations (kernels.registry: each op's `bench` case, at
LightningDiT-XL/1 shapes, 65,536 rows of 1152, or tiny CPU shapes with --smoke); nothing here lists ops. For each
op and implementation: forward and forward+backward time (median), GB/s over the fewest bytes the op must move
(each input read once, each output written once), TFLOP/s where the op declares its FLOPs (attention, the fused
w12 GEMM), the forward's relative error vs the fp32 reference, and for each fused row its speed against
torch.compile(reference) on the same case (`fwd_x_compiled_reference`, `fwd_bwd_x_compiled_reference`: inductor's
time / ours, > 1 when ours is faster; `versus_inductor` prints them, with the share of the copy bandwidth). What
each fused row really ran is in its "ran" (kernels.describe()); attention's candidate timings are in the environment
block's kernels.attention_measured.

`python -m bench.ops_bench [--smoke] [--ops a,b] [--out runs/bench/ops]` prints the results and writes them, with
the environment block (evaluation.provenance.environment: card, versions, commit, kernels that ran), as OUT.json
and a bar chart of GB/s per op and implementation beside it (OUT.png); bench/gpu_suite.py calls run().
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import torch

import kernels
from kernels import ops, registry
from kernels.backend import active, cuda_status
from kernels.registry import BenchCase
from modeling.config import console_entry


def bench_ms(fn: Callable[[], object], smoke: bool) -> float:
    """Median milliseconds of fn() (CUDA: triton's do_bench); with smoke or on the CPU, one timed call."""
    if smoke or not torch.cuda.is_available():
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton.testing
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def cases(smoke: bool, device: str, dtype: torch.dtype, names: Optional[list[str]] = None) -> dict[str, BenchCase]:
    """{op: its declared benchmark case}, for every registered op (or `names`)."""
    return registry.bench_cases(registry.TINY if smoke else registry.XL1, device, dtype, names)


def _impls(op: registry.Op, device: str, smoke: bool) -> dict[str, str]:
    """{row label: kernels backend to set} for the implementations worth timing here."""
    out = {"reference": "reference", "compiled_reference": "reference"}
    if "triton" in op.impls and (device == "cuda" or smoke):  # smoke on the CPU: under TRITON_INTERPRET=1
        out["triton"] = "triton"
    if "cuda" in op.impls and cuda_status()[0]:
        out["cuda"] = "cuda"
    return out


def _tuple(out: object) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def _row(name: str, case: BenchCase, impl: str, backend: str, ref_out: tuple, smoke: bool,
         copy_gbs: Optional[float]) -> dict:
    op = registry.get(name)
    if impl == "compiled_reference":
        # each op's lambda shares one code object: without a reset dynamo's recompile limit (8) is hit and later
        # ops silently run eager under the "compiled" label
        torch._dynamo.reset()
        fn = torch.compile(lambda *a: case.call(op.reference, *a), backend="eager" if smoke else "inductor",
                           fullgraph=True)
    else:
        dispatch = getattr(ops, name)  # what the models call
        fn = lambda *a: case.call(dispatch, *a)  # noqa: E731
    row = {}
    out = _tuple(fn(*case.inputs))
    # per output tensor, in fp32 (an fp8 output and its scale too: their error against the fp32 input's)
    row["rel_err_vs_fp32"] = max(((o.float() - r.float()).norm() / r.float().norm()).item()
                                 for o, r in zip(out, ref_out))
    row["ran"] = kernels.describe()["ops"].get(name, impl) if impl in ("triton", "cuda") else impl

    def fwd():
        with torch.no_grad():
            fn(*case.inputs)
    row["fwd_ms"] = bench_ms(fwd, smoke)
    row["fwd_GBps"] = case.fwd_bytes / row["fwd_ms"] / 1e6
    if case.fwd_flops:
        row["fwd_TFLOPs"] = case.fwd_flops / row["fwd_ms"] / 1e9
    if case.backward:
        grads = [torch.randn_like(o) for o in out]

        def fwd_bwd():
            torch.autograd.backward(_tuple(fn(*case.inputs)), grads)
        row["fwd_bwd_ms"] = bench_ms(fwd_bwd, smoke)
        row["fwd_bwd_GBps"] = (case.fwd_bytes + case.bwd_bytes) / row["fwd_bwd_ms"] / 1e6
        if case.fwd_flops:
            row["fwd_bwd_TFLOPs"] = (case.fwd_flops + case.bwd_flops) / row["fwd_bwd_ms"] / 1e9
    if copy_gbs:
        row["fwd_pct_copy"] = 100 * row["fwd_GBps"] / copy_gbs
        if "fwd_bwd_GBps" in row:
            row["fwd_bwd_pct_copy"] = 100 * row["fwd_bwd_GBps"] / copy_gbs
    return row


def run(smoke: bool = False, dtype: torch.dtype = torch.bfloat16, copy_gbs: Optional[float] = None,
        names: Optional[list[str]] = None) -> dict[str, dict[str, dict]]:
    """{op: {implementation: row}} for every registered op (or `names`); a row that fails records its error."""
    device = "cuda" if torch.cuda.is_available() and not smoke else "cpu"
    results = {}
    for name, case in cases(smoke, device, dtype, names).items():
        ref_out = _tuple(case.call(registry.get(name).reference, *[t.detach().float() for t in case.inputs]))
        results[name] = {}
        for impl, backend in _impls(registry.get(name), device, smoke).items():
            try:
                with active(backend):  # the switch is restored after; what ran stays on record
                    results[name][impl] = _row(name, case, impl, backend, ref_out, smoke, copy_gbs)
            except Exception as e:  # recorded, never stops the other rows
                results[name][impl] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        _against_inductor(results[name])
    return results


def _against_inductor(rows: dict[str, dict]) -> None:
    """Add to each fused row its speed relative to torch.compile(reference) on the same case (the time inductor's
    fusion takes / ours: > 1 is faster than inductor): forward, and forward + backward where timed."""
    comp = rows.get("compiled_reference") or {}
    if "error" in comp or "fwd_ms" not in comp:
        return
    for impl in ("triton", "cuda"):
        row = rows.get(impl)
        if not row or "error" in row:
            continue
        row["fwd_x_compiled_reference"] = comp["fwd_ms"] / row["fwd_ms"]
        if "fwd_bwd_ms" in row and "fwd_bwd_ms" in comp:
            row["fwd_bwd_x_compiled_reference"] = comp["fwd_bwd_ms"] / row["fwd_bwd_ms"]


def versus_inductor(results: dict[str, dict]) -> list[str]:
    """One line per op and fused implementation: its forward+backward GB/s (forward only for an inference op)
    against torch.compile(reference)'s, the ratio, and the share of the copy bandwidth where it was given."""
    lines = []
    for name, rows in results.items():
        if not isinstance(rows, dict):
            continue
        comp = rows.get("compiled_reference") or {}
        for impl in ("triton", "cuda"):
            row = rows.get(impl)
            if not row or "error" in row or "fwd_x_compiled_reference" not in row:
                continue
            both = "fwd_bwd_x_compiled_reference" in row
            key = "fwd_bwd" if both else "fwd"
            pct = row.get(f"{key}_pct_copy")
            lines.append(f"{name:30s} {impl:6s} {key:7s} {row[f'{key}_GBps']:8.0f} GB/s vs inductor "
                         f"{comp[f'{key}_GBps']:8.0f} GB/s = {row[f'{key}_x_compiled_reference']:.2f}x"
                         + (f" ({pct:.0f}% of copy)" if pct is not None else ""))
    return lines


def main(argv: Optional[list[str]] = None) -> dict:
    from bench.plots import plot_ops
    from evaluation.provenance import environment
    from modeling.config import cli_parser

    p = cli_parser("bench.ops_bench", __doc__)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (checks the plumbing, times nothing)")
    p.add_argument("--ops", default=None, help="comma-separated op names (default: every registered op)")
    p.add_argument("--out", default="runs/bench/ops", help="output path without suffix: .json and .png are written")
    a = p.parse_args(argv)
    names = a.ops.split(",") if a.ops else None
    if names:
        unknown = sorted(set(names) - set(registry.registered()))
        if unknown:
            p.error(f"--ops: no kernels op {', '.join(unknown)}; registered: {', '.join(registry.registered())}")
    rows = run(a.smoke, names=names)
    # after the measurement: kernels_ran is what each op's last row ran (each row's "ran" says what that row ran),
    # and the kernels block holds attention's timed candidates
    device = "cuda" if torch.cuda.is_available() and not a.smoke else "cpu"
    results = {**rows, "environment": environment(device)}
    print(json.dumps(results, indent=1))
    print("\n".join(["ours vs torch.compile(reference) (ratio > 1: ours faster):"] + versus_inductor(rows)))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    plot_ops(rows, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return results


cli = console_entry(__name__)  # the `vavae-ops-bench` console script (setup.py)

if __name__ == "__main__":
    main()
