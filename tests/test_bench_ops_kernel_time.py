"""The ops table's kernel-time columns (bench.ops_bench) and the compiled choice made on them
(bench.compiled_choices). The profiler's kernel time exists only on a GPU: here a fake kernel-time function with
known numbers stands in for it, through the same code path the GPU run takes."""
import os
import re

import torch

if not torch.cuda.is_available():  # must precede the first import of the Triton kernels
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

import kernels  # noqa: E402
from bench import compiled_choices, ops_bench  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_backend():
    yield
    kernels.set_backend("auto")


def test_kernel_ms_is_the_profilers_kernel_time_per_call():
    seen = []

    def times(fn, calls):
        for _ in range(calls):
            fn()
        seen.append(calls)
        return {"total_kernel_ms_per_call": 0.071, "ms_per_call_by_category": {}}

    n = []
    assert ops_bench.kernel_ms(lambda: n.append(1), times=times) == 0.071
    assert seen == [ops_bench.KERNEL_CALLS] and len(n) == ops_bench.KERNEL_CALLS
    assert ops_bench.kernel_ms(lambda: None, calls=3, times=times) == 0.071 and seen[-1] == 3


def test_kernel_time_only_on_a_gpu_outside_smoke(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ops_bench.default_kernel_time(False) is None and ops_bench.default_kernel_time(True) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert ops_bench.default_kernel_time(False) is ops_bench.kernel_ms
    assert ops_bench.default_kernel_time(True) is None  # --smoke times nothing


def test_smoke_rows_have_no_kernel_columns():
    rows = ops_bench.run(smoke=True, dtype=torch.float32, names=["rms_norm"])["rms_norm"]
    for impl, row in rows.items():
        assert "error" not in row, (impl, row)
        assert row["fwd_bwd_ms"] > 0 and not [k for k in row if "kernel" in k], (impl, row)
    (line,) = ops_bench.versus_inductor({"rms_norm": rows})
    assert "kernels" not in line


def test_rows_record_kernel_time_and_its_ratio_to_inductor():
    """run() on the CPU with a kernel-time function giving known ms per (implementation, phase): each row records
    them and GB/s on them, the fused row its kernel-time ratios to torch.compile(reference), and the printed line
    both ratios; the wall-time columns are unchanged."""
    # rows are timed in _impls' order (reference, compiled_reference, triton), each forward then forward+backward;
    # the eager reference gets no kernel time (no decision reads it; each profiler window costs device time)
    known = iter([("compiled_reference", 0.2), ("compiled_reference", 0.8), ("triton", 0.1), ("triton", 0.5)])
    called = []

    def fake(fn):
        fn()  # what the profiler would run
        called.append(next(known))
        return called[-1][1]

    case = ops_bench.cases(True, "cpu", torch.float32, ["rms_norm"])["rms_norm"]
    rows = ops_bench.run(smoke=True, dtype=torch.float32, names=["rms_norm"], kernel_time=fake)["rms_norm"]
    assert [impl for impl, _ in called] == ["compiled_reference"] * 2 + ["triton"] * 2
    assert set(rows) == {"reference", "compiled_reference", "triton"}
    assert "fwd_kernel_ms" not in rows["reference"] and rows["reference"]["fwd_ms"] > 0
    ms = dict(zip(("compiled_reference", "triton"), ((0.2, 0.8), (0.1, 0.5))))
    for impl, (fwd, fwd_bwd) in ms.items():
        row = rows[impl]
        assert "error" not in row and row["fwd_kernel_ms"] == fwd and row["fwd_bwd_kernel_ms"] == fwd_bwd, row
        assert row["fwd_kernel_GBps"] == pytest.approx(case.fwd_bytes / fwd / 1e6)
        assert row["fwd_bwd_kernel_GBps"] == pytest.approx((case.fwd_bytes + case.bwd_bytes) / fwd_bwd / 1e6)
        assert row["fwd_ms"] > 0 and row["fwd_GBps"] == pytest.approx(case.fwd_bytes / row["fwd_ms"] / 1e6)
    ours, comp = rows["triton"], rows["compiled_reference"]
    assert ours["fwd_kernel_x_compiled_reference"] == pytest.approx(2.0)
    assert ours["fwd_bwd_kernel_x_compiled_reference"] == pytest.approx(1.6)
    assert ours["fwd_bwd_x_compiled_reference"] == pytest.approx(comp["fwd_bwd_ms"] / ours["fwd_bwd_ms"])
    assert "fwd_kernel_x_compiled_reference" not in rows["reference"]
    (line,) = ops_bench.versus_inductor({"rms_norm": rows})
    wall, kern = line.split(" | ")
    assert line.startswith("rms_norm") and f"= {ours['fwd_bwd_x_compiled_reference']:.2f}x" in wall
    assert kern.startswith("kernels") and kern.endswith("= 1.60x")
    assert re.fullmatch(rf"kernels +{ours['fwd_bwd_kernel_GBps']:.0f} vs +{comp['fwd_bwd_kernel_GBps']:.0f} GB/s "
                        r"= 1\.60x", kern), kern


def test_a_profiler_failure_keeps_the_wall_times():
    row = {"fwd_ms": 0.2}
    ops_bench._kernel_columns(row, "fwd", lambda: None, 1000, lambda fn: 0.05)
    assert row["fwd_kernel_ms"] == 0.05 and row["fwd_kernel_GBps"] == pytest.approx(1000 / 0.05 / 1e6)

    def broken(fn):
        raise RuntimeError("CUPTI_ERROR_NOT_INITIALIZED")
    ops_bench._kernel_columns(row, "fwd_bwd", lambda: None, 1000, broken)
    assert "CUPTI" in row["fwd_bwd_kernel_error"] and "fwd_bwd_kernel_ms" not in row
    ops_bench._kernel_columns(row, "fwd_bwd", lambda: None, 1000, lambda fn: 0.0)  # no kernel seen: no 0 to divide
    assert "no kernel" in row["fwd_bwd_kernel_error"] and "fwd_bwd_kernel_ms" not in row
    assert row["fwd_ms"] == 0.2 and row["fwd_kernel_ms"] == 0.05


def test_kernel_ratios_only_where_both_sides_have_kernel_time():
    rows = {"compiled_reference": {"fwd_ms": 0.2, "fwd_bwd_ms": 0.6, "fwd_kernel_ms": 0.1, "fwd_bwd_kernel_ms": 0.3},
            "triton": {"fwd_ms": 0.4, "fwd_bwd_ms": 0.8, "fwd_kernel_ms": 0.05, "fwd_bwd_kernel_ms": 0.25},
            "cuda": {"fwd_ms": 0.25, "fwd_bwd_ms": 0.5, "fwd_bwd_kernel_error": "RuntimeError: x"}}
    ops_bench._against_inductor(rows)
    t, c = rows["triton"], rows["cuda"]
    assert t["fwd_x_compiled_reference"] == pytest.approx(0.5)
    assert t["fwd_bwd_x_compiled_reference"] == pytest.approx(0.75)
    assert t["fwd_kernel_x_compiled_reference"] == pytest.approx(2.0)
    assert t["fwd_bwd_kernel_x_compiled_reference"] == pytest.approx(1.2)
    assert c["fwd_bwd_x_compiled_reference"] == pytest.approx(1.2) and not [k for k in c if "kernel_x" in k]


# ------------------------------------------------------------------ the compiled choice on kernel time

def _result(triton: dict, comp: dict, cuda: dict = None) -> dict:
    rows = {"compiled_reference": comp, "triton": triton, **({"cuda": cuda} if cuda else {})}
    return {"environment": {"card": "NVIDIA H200", "commit": "abc"}, "sections": {"ops": {"norm_modulate": rows}}}


def test_the_choice_follows_kernel_time_where_wall_time_disagrees():
    """Ours is slower on the wall (launch-bound) and faster in kernel time: under compile it runs ours, on the
    kernel times, with the wall times kept beside them; the fastest of our backends by kernel time."""
    comp = {"fwd_ms": 0.142, "fwd_bwd_ms": 0.598, "fwd_kernel_ms": 0.09, "fwd_bwd_kernel_ms": 0.41}
    triton = {"fwd_ms": 0.241, "fwd_bwd_ms": 0.70, "fwd_kernel_ms": 0.075, "fwd_bwd_kernel_ms": 0.37}
    cuda = {"fwd_ms": 0.191, "fwd_bwd_ms": 0.6545, "fwd_kernel_ms": 0.08, "fwd_bwd_kernel_ms": 0.39}
    e = compiled_choices.choices(_result(triton, comp, cuda), "run.json")["ops"]["norm_modulate"]
    assert e == {"under_compile": "ours", "timed": "fwd_bwd kernel", "ours": "triton", "ours_ms": 0.37,
                 "inductor_ms": 0.41, "ours_wall_ms": 0.7, "inductor_wall_ms": 0.598,
                 "inference": {"under_compile": "ours", "timed": "fwd kernel", "ours": "triton", "ours_ms": 0.075,
                               "inductor_ms": 0.09, "ours_wall_ms": 0.241, "inductor_wall_ms": 0.142},
                 "results": "run.json"}
    # the other way round: faster on the wall, slower in kernel time -> the reference; the forward alone stays
    # ours: what a trace without gradients (the sampler) runs
    comp2 = {**comp, "fwd_bwd_ms": 0.9, "fwd_bwd_kernel_ms": 0.30}
    e = compiled_choices.choices(_result(triton, comp2, cuda), "run.json")["ops"]["norm_modulate"]
    assert e["under_compile"] == "reference" and e["timed"] == "fwd_bwd kernel" and e["ours_wall_ms"] < 0.9
    assert e["inference"]["under_compile"] == "ours"
    # an inference op: forward kernel time
    fwd = compiled_choices.choices(_result({"fwd_ms": 0.225, "fwd_kernel_ms": 0.06},
                                           {"fwd_ms": 0.186, "fwd_kernel_ms": 0.07}), "run.json")
    e = fwd["ops"]["norm_modulate"]
    assert (e["under_compile"], e["timed"], e["ours_ms"], e["inductor_wall_ms"]) == ("ours", "fwd kernel", 0.06, 0.186)


def test_the_choice_falls_back_to_wall_time_without_kernel_times_on_every_side():
    comp = {"fwd_ms": 0.142, "fwd_bwd_ms": 0.598, "fwd_kernel_ms": 0.09}  # its fwd_bwd kernel time failed
    triton = {"fwd_ms": 0.241, "fwd_bwd_ms": 0.70, "fwd_kernel_ms": 0.075, "fwd_bwd_kernel_ms": 0.37}
    e = compiled_choices.choices(_result(triton, comp), "run.json")["ops"]["norm_modulate"]
    assert e == {"under_compile": "reference", "timed": "fwd_bwd", "ours": "triton", "ours_ms": 0.7,
                 "inductor_ms": 0.598, "inference": {"under_compile": "ours", "timed": "fwd kernel", "ours": "triton",
                                                     "ours_ms": 0.075, "inductor_ms": 0.09, "ours_wall_ms": 0.241,
                                                     "inductor_wall_ms": 0.142}, "results": "run.json"}
    # one of our backends without kernel time: wall times for all (never one's kernel time against another's wall)
    comp = {**comp, "fwd_bwd_kernel_ms": 0.41}
    cuda = {"fwd_ms": 0.191, "fwd_bwd_ms": 0.6545}
    e = compiled_choices.choices(_result(triton, comp, cuda), "run.json")["ops"]["norm_modulate"]
    assert (e["under_compile"], e["timed"], e["ours"], e["ours_ms"]) == ("reference", "fwd_bwd", "cuda", 0.6545)
    # and no forward decision of its own: a forward alone on wall time is the host's dispatch
    assert "ours_wall_ms" not in e and "inference" not in e
