"""Two configurations in one process, interleaved (A, B, A, B, ...), and the speed ratio B / A.

    python -m bench.compare --model XL/1 --batch-size 32 --a eager --b fused+compiled --rounds 5

Interleaving puts clock drift, thermal state and neighbours' load on both sides equally; the ratio is
the median of the per-round ratios (img/s of B over img/s of A). Options as bench.throughput.
"""
import argparse
import statistics

import torch

from .throughput import Case, common_args, environment, peak_for, write_report


def compare(case_a, case_b, rounds=5, iters=5, warmup=2, peak_tflops=None):
    case_a.run(warmup)
    case_b.run(warmup)
    times = {"a": [], "b": []}
    ratios, order = [], []
    for _ in range(rounds):
        ta = case_a.run(iters)
        tb = case_b.run(iters)
        order += ["a", "b"]
        times["a"] += ta
        times["b"] += tb
        ratios.append(statistics.median(ta) / statistics.median(tb))
    return {"a": case_a.result(times["a"], peak_tflops), "b": case_b.result(times["b"], peak_tflops),
            "ratio_b_over_a": statistics.median(ratios), "round_ratios": ratios, "order": order}


def main(argv=None):
    p = common_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--a", default="eager", help="backend spec of A")
    p.add_argument("--b", default="fused", help="backend spec of B")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.set_defaults(out="runs/bench/compare", iters=5, warmup=2)
    a = p.parse_args(argv)
    peak, peak_desc = peak_for(a)
    cfg = a.cfg_scale if a.cfg_scale is not None else 1.0
    from .throughput import case_kwargs
    case_a = Case(**case_kwargs(a, a.a, a.batch_size, cfg))
    case_b = Case(**case_kwargs(a, a.b, a.batch_size, cfg))
    res = compare(case_a, case_b, a.rounds, a.iters, a.warmup, peak)
    report = {"environment": environment(torch.device(a.device)), "peak": peak_desc, "peak_tflops": peak,
              "results": [res["a"], res["b"]], "ratio_b_over_a": res["ratio_b_over_a"],
              "round_ratios": res["round_ratios"], "order": res["order"]}
    for f in write_report(report, a.out):
        print(f"wrote {f}")
    print(f"A = {res['a']['name']}: {res['a']['img_per_s']:.2f} img/s; B = {res['b']['name']}: "
          f"{res['b']['img_per_s']:.2f} img/s; B/A = {res['ratio_b_over_a']:.3f}x (median of {a.rounds} rounds)")
    return report


if __name__ == "__main__":
    main()
