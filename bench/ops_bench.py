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

Two timings per row on a GPU. `fwd_ms` / `fwd_bwd_ms` are wall times (triton's do_bench: CUDA events around each
call): they include the host's dispatch before the first kernel whenever it outlasts the GPU work already queued,
which is what an eager caller pays. `fwd_kernel_ms` / `fwd_bwd_kernel_ms` are the device time of the kernels one
call launches (torch.profiler over KERNEL_CALLS calls, bench.kernel_time), with their GB/s and
`*_kernel_x_compiled_reference` ratios: what a call costs inside the compiled training step, where launches overlap
earlier kernels. bench/compiled_choices.py decides on them. On the CPU and with --smoke only the wall times exist.

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
from bench.kernel_time import kernel_times
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


KERNEL_CALLS = 10  # calls per profiler window: a few ms of device time per row at XL/1 shapes

KernelTime = Callable[[Callable[[], object]], float]  # fn -> device ms of the kernels one call of fn launches


def kernel_ms(fn: Callable[[], object], calls: int = KERNEL_CALLS,
              times: Optional[Callable[..., dict]] = None) -> float:
    """Device milliseconds of the kernels one call of fn launches: `times` (default bench.kernel_time.kernel_times,
    CUDA kernel time summed under torch.profiler) over `calls` calls, per call. Launch gaps are not in it."""
    return (times or kernel_times)(fn, calls=calls)["total_kernel_ms_per_call"]


def default_kernel_time(smoke: bool) -> Optional[KernelTime]:
    """kernel_ms on a GPU outside --smoke; None elsewhere (the profiler's CPU time is not kernel time)."""
    return kernel_ms if torch.cuda.is_available() and not smoke else None


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
    """An op's outputs as a flat tuple of tensors (the FP8 norms return (h, FP8Rows(values, scale)))."""
    return tuple(t for o in out for t in _tuple(o)) if isinstance(out, tuple) else (out,)


def _kernel_columns(row: dict, phase: str, fn: Callable[[], object], nbytes: int,
                    kernel_time: Optional[KernelTime]) -> None:
    """row[f"{phase}_kernel_ms"] and its GB/s from kernel_time(fn); a profiler failure (or a window with no kernel
    in it) is recorded under f"{phase}_kernel_error" and leaves the row's wall times standing."""
    if kernel_time is None:
        return
    try:
        ms = kernel_time(fn)
    except Exception as e:  # the wall times above are still good
        row[f"{phase}_kernel_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        return
    if not ms > 0:  # nothing to divide by: a ratio on it would be meaningless
        row[f"{phase}_kernel_error"] = f"the profiler saw no kernel time ({ms})"
        return
    row[f"{phase}_kernel_ms"] = ms
    row[f"{phase}_kernel_GBps"] = nbytes / ms / 1e6


def _row(name: str, case: BenchCase, impl: str, backend: str, ref_out: tuple, smoke: bool,
         copy_gbs: Optional[float], kernel_time: Optional[KernelTime] = None) -> dict:
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
    _kernel_columns(row, "fwd", fwd, case.fwd_bytes, kernel_time)  # after do_bench: warmed up and autotuned
    if case.fwd_flops:
        row["fwd_TFLOPs"] = case.fwd_flops / row["fwd_ms"] / 1e9
    if case.backward:
        grads = [torch.randn_like(o) for o in out]

        def fwd_bwd():
            torch.autograd.backward(_tuple(fn(*case.inputs)), grads)
        row["fwd_bwd_ms"] = bench_ms(fwd_bwd, smoke)
        row["fwd_bwd_GBps"] = (case.fwd_bytes + case.bwd_bytes) / row["fwd_bwd_ms"] / 1e6
        _kernel_columns(row, "fwd_bwd", fwd_bwd, case.fwd_bytes + case.bwd_bytes, kernel_time)
        if case.fwd_flops:
            row["fwd_bwd_TFLOPs"] = (case.fwd_flops + case.bwd_flops) / row["fwd_bwd_ms"] / 1e9
    if copy_gbs:
        row["fwd_pct_copy"] = 100 * row["fwd_GBps"] / copy_gbs
        if "fwd_bwd_GBps" in row:
            row["fwd_bwd_pct_copy"] = 100 * row["fwd_bwd_GBps"] / copy_gbs
    return row


def run(smoke: bool = False, dtype: torch.dtype = torch.bfloat16, copy_gbs: Optional[float] = None,
        names: Optional[list[str]] = None, kernel_time: Optional[KernelTime] = None) -> dict[str, dict[str, dict]]:
    """{op: {implementation: row}} for every registered op (or `names`); a row that fails records its error.
    `kernel_time` (fn -> device ms per call) adds the kernel-time columns; default: default_kernel_time(smoke)."""
    device = "cuda" if torch.cuda.is_available() and not smoke else "cpu"
    kernel_time = kernel_time or default_kernel_time(smoke)
    results = {}
    for name, case in cases(smoke, device, dtype, names).items():
        ref_out = _tuple(case.call(registry.get(name).reference, *[t.detach().float() for t in case.inputs]))
        results[name] = {}
        for impl, backend in _impls(registry.get(name), device, smoke).items():
            try:
                with active(backend):  # the switch is restored after; what ran stays on record
                    # kernel time where a decision reads it (ours, inductor's): each profiler window costs device
                    # time, and the eager reference is only the wall-time baseline
                    results[name][impl] = _row(name, case, impl, backend, ref_out, smoke, copy_gbs,
                                                kernel_time if impl != "reference" else None)
            except Exception as e:  # recorded, never stops the other rows
                results[name][impl] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        _against_inductor(results[name])
    return results


def _against_inductor(rows: dict[str, dict]) -> None:
    """Add to each fused row its speed relative to torch.compile(reference) on the same case (the time inductor's
    fusion takes / ours: > 1 is faster than inductor): forward, and forward + backward where timed, on wall time
    (`{phase}_x_compiled_reference`) and, where both rows have it, on kernel time
    (`{phase}_kernel_x_compiled_reference`)."""
    comp = rows.get("compiled_reference") or {}
    if "error" in comp or "fwd_ms" not in comp:
        return
    for impl in ("triton", "cuda"):
        row = rows.get(impl)
        if not row or "error" in row:
            continue
        for phase in ("fwd", "fwd_bwd"):
            for kind in ("", "_kernel"):
                key = f"{phase}{kind}_ms"
                if key in row and key in comp:
                    row[f"{phase}{kind}_x_compiled_reference"] = comp[key] / row[key]


def versus_inductor(results: dict[str, dict]) -> list[str]:
    """One line per op and fused implementation: its forward+backward GB/s (forward only for an inference op)
    against torch.compile(reference)'s, the ratio, and the share of the copy bandwidth where it was given; then,
    where timed, the same on kernel time (an op whose wall ratio is below its kernel ratio is launch-bound)."""
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
            line = (f"{name:30s} {impl:6s} {key:7s} {row[f'{key}_GBps']:8.0f} GB/s vs inductor "
                    f"{comp[f'{key}_GBps']:8.0f} GB/s = {row[f'{key}_x_compiled_reference']:.2f}x"
                    + (f" ({pct:.0f}% of copy)" if pct is not None else ""))
            kx = row.get(f"{key}_kernel_x_compiled_reference")
            if kx is not None:
                line += (f" | kernels {row[f'{key}_kernel_GBps']:6.0f} vs {comp[f'{key}_kernel_GBps']:6.0f} GB/s "
                         f"= {kx:.2f}x")
            lines.append(line)
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
