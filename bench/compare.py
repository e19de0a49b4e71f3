"""Two trainer configurations in one process, interleaved (A, B, A, B, ...), and the speed ratio B / A.

    python -m bench.compare --config configs/dit_xl1_64ep.yaml --batch-size 64 --a reference+compiled \
        --b auto+compiled --rounds 5

Both sides are `train.train_dit.Trainer`s built from the same config (synthetic latents) with the backend
specs of bench.throughput; each round times `iters` steps of A, then of B. Interleaving puts clock drift,
thermal state and neighbours' load on both sides equally; the ratio is the median of the per-round ratios
(img/s of B over img/s of A). Both trainers live in this process at once: pick a batch size at which two fit.
"""
from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import torch

import kernels
from bench.throughput import REPO, peak_for, write_report
from bench.train_case import bench_user_errors, build_trainer, parse_spec, time_trainer_steps
from evaluation.provenance import environment
from modeling.config import console_entry, read_yaml


def _row(name, spec, trainer, batch, times, peak, env):
    sec = statistics.median(times)
    img_s = batch * trainer.info.world_size / sec
    tflops = img_s * trainer.flops_per_image / trainer.info.world_size / 1e12
    return {"name": name, "mode": "train", "backend": spec, "batch_size": batch, "median_s": sec, "times_s": times,
            "img_per_s": img_s, "gflop_per_img": trainer.flops_per_image / 1e9, "tflops": tflops,
            "mfu": tflops / peak if peak else None, "kernels_backend": trainer.cfg.train.kernels,
            "fp8": trainer.fp8_desc, "peak_rss_gib": float("nan"), "environment": env}


def compare(config: str | Path, spec_a: str, spec_b: str, batch: int, rounds: int = 5, iters: int = 5,
            warmup: int = 2, overrides: list[str] | tuple = (), peak: float | None = None) -> dict:
    """Both trainers built, then `rounds` rounds of `iters` timed steps of A then of B; returns the two result
    rows, the median of the per-round speed ratios B / A, the ratios and the order the sides ran in."""
    with tempfile.TemporaryDirectory() as tmp_a, tempfile.TemporaryDirectory() as tmp_b:
        trainers = {"a": build_trainer(config, [*parse_spec(spec_a), *overrides], batch, tmp_a),
                    "b": build_trainer(config, [*parse_spec(spec_b), *overrides], batch, tmp_b)}
        times, ratios, order = {"a": [], "b": []}, [], []

        envs = {}

        def run(side, n):
            trainer = trainers[side]
            kernels.set_backend(trainer.cfg.train.kernels)  # the switch is global; each side sets its own
            times = time_trainer_steps(trainer, 0, n)[0]
            envs[side] = environment(trainer.device)  # what this side's steps just ran
            return times

        run("a", warmup)
        run("b", warmup)
        for _ in range(rounds):
            ta, tb = run("a", iters), run("b", iters)
            order += ["a", "b"]
            times["a"] += ta
            times["b"] += tb
            ratios.append(statistics.median(ta) / statistics.median(tb))
        rows = {s: _row(f"{spec} bs{batch} train", spec, trainers[s], batch, times[s], peak, envs[s])
                for s, spec in (("a", spec_a), ("b", spec_b))}
    return {"a": rows["a"], "b": rows["b"], "ratio_b_over_a": statistics.median(ratios), "round_ratios": ratios,
            "order": order}


def main(argv: list[str] | None = None) -> dict:
    from modeling.config import cli_parser

    p = cli_parser("bench.compare", __doc__)
    p.add_argument("--config", default=str(REPO / "configs/dit_xl1_64ep.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="trainer config override for both sides (repeatable)")
    p.add_argument("--a", default="reference+compiled", help="backend spec of A")
    p.add_argument("--b", default="auto+compiled", help="backend spec of B")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--device", default=None, help=None)
    p.add_argument("--out", default="runs/bench/compare")
    a = p.parse_args(argv)
    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    peak, peak_desc = peak_for(a)
    with bench_user_errors():  # a spec, a config or a backend that cannot run here: one line, exit 2
        read_yaml(a.config)
        parse_spec(a.a), parse_spec(a.b)
        res = compare(a.config, a.a, a.b, a.batch_size, a.rounds, a.iters, a.warmup, a.overrides, peak)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = {"environment": environment(device), "peak": peak_desc, "peak_tflops": peak,
              "results": [res["a"], res["b"]], "ratio_b_over_a": res["ratio_b_over_a"],
              "round_ratios": res["round_ratios"], "order": res["order"]}
    for f in write_report(report, a.out):
        print(f"wrote {f}")
    print(f"A = {res['a']['name']}: {res['a']['img_per_s']:.2f} img/s; B = {res['b']['name']}: "
          f"{res['b']['img_per_s']:.2f} img/s; B/A = {res['ratio_b_over_a']:.3f}x (median of {a.rounds} rounds)")
    return report



cli = console_entry(__name__)  # the `vavae-compare` console script (setup.py)

if __name__ == "__main__":
    main()
