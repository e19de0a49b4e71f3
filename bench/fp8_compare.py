"""FP8 vs bf16: the same DiT run (same seed, data, noise and time draws) trained twice through the real
trainer, once in bf16 autocast and once with FP8 linears on top, and the two loss curves compared.

    python -m bench.fp8_compare --steps 200 --out runs/fp8_compare                 # tiny model, CPU or GPU
    python -m bench.fp8_compare --config configs/dit_b1.yaml --steps 2000 --fp8-backend te --set data.path=LAT
    python -m bench.fp8_compare --data digits --steps 2000 --fp8-backend scaled_mm   # real digits, no tokenizer

On the CPU, torchao's FP8 is emulated (`fp8.allow_cpu`): the numerics are FP8's, the speed is not.
Writes OUT/fp8_compare.json (with the environment block of evaluation.provenance) and OUT/fp8_compare.png;
exits 1 when the curves disagree: the mean loss over the last quarter of the steps differs by more than --rtol
(relative).
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from bench.plots import plot_curves
from evaluation.provenance import environment

REPO = Path(__file__).resolve().parents[1]


def run_one(config: str | Path, out_dir: str | Path, steps: int, overrides: list[str]) -> tuple[list[float], str]:
    """One trainer run of `steps` steps; returns its loss per step and the trainer's FP8 description. The run's
    last checkpoint (the trainer always saves one) goes to a temporary folder, removed after: B/1's is 2.5 GB, which
    in out_dir would be packed with the results (and cannot come back from a lent machine)."""
    from modeling.config import load_config
    from train.dit_config import DiTTrainConfig
    from train.train_dit import Trainer
    with tempfile.TemporaryDirectory(prefix="fp8_compare_ckpt_") as ckpt:
        cfg = load_config(DiTTrainConfig, config, [
            f"train.steps={steps}", f"checkpoint.dir={ckpt}", f"checkpoint.every={steps}",
            "checkpoint.resume=never", "checkpoint.export_reference=false", f"logging.dir={out_dir}",
            "logging.every=1", "logging.progress_bar=false", "logging.tensorboard=false", *overrides])
        trainer = Trainer(cfg)
        trainer.fit()
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in rows if "loss" in r}
    return [losses[s] for s in sorted(losses)], trainer.fp8_desc


WINDOW = 100  # steps per mean in the plot's ratio panel (one step's loss varies with its random time draws)


def window_ratio(bf16: list[float], fp8: list[float], window: int = WINDOW) -> list[float]:
    """Per step from `window` on: FP8's mean loss over the last `window` steps over bf16's, minus 1 (a drift shows
    as a trend away from 0; the first window - 1 steps are NaN, not plotted)."""
    n = min(len(bf16), len(fp8))
    out = [float("nan")] * min(n, window - 1)
    for i in range(window, n + 1):
        out.append(sum(fp8[i - window:i]) / sum(bf16[i - window:i]) - 1)
    return out


def compare(bf16: list[float], fp8: list[float], rtol: float) -> dict:
    """The two curves' tail means (last quarter of the steps), whether they agree within `rtol`, and the drift
    panel's range and last value (FP8's WINDOW-step mean over bf16's, minus 1; None for shorter runs)."""
    n = min(len(bf16), len(fp8))
    tail = max(1, n // 4)
    mean_a, mean_b = sum(bf16[n - tail:n]) / tail, sum(fp8[n - tail:n]) / tail
    rel = abs(mean_b - mean_a) / abs(mean_a)
    step_rel = [abs(b - a) / abs(a) for a, b in zip(bf16[:n], fp8[:n])]
    drift = [v for v in window_ratio(bf16[:n], fp8[:n]) if v == v]  # the plot's drift panel, NaNs left out
    return {"steps": n, "tail_steps": tail, "bf16_tail_mean": mean_a, "fp8_tail_mean": mean_b,
            "tail_rel_diff": rel, "max_step_rel_diff": max(step_rel), "first_loss": bf16[0],
            "drift_window": WINDOW, "drift_min": min(drift, default=None), "drift_max": max(drift, default=None),
            "drift_last": drift[-1] if drift else None, "agree": rel <= rtol}


def main(argv: list[str] | None = None) -> int:
    from modeling.config import cli_parser

    ap = cli_parser("bench.fp8_compare", __doc__)
    ap.add_argument("--config", default=str(REPO / "configs/dit_tiny_cpu.yaml"))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--fp8-backend", choices=["scaled_mm", "torchao", "te"], default="torchao")  # scaled_mm: ours
    ap.add_argument("--fp8-recipe", default=None, help="fp8.recipe of the FP8 run (default: the backend's first)")
    ap.add_argument("--fp8-quant", choices=["auto", "ours", "inline"], default="auto",
                    help="fp8.quant of the FP8 run (scaled_mm: activation quantization in our kernels or inline)")
    ap.add_argument("--data", choices=["config", "digits"], default="config",
                    help="config: the config's data (synthetic Gaussian latents in the tiny and B/1 configs: nothing "
                         "to learn past their per-channel moments); digits: the 5,000 MNIST digits as latents "
                         "(train.data.embedded.write_digit_latents, into a temporary folder), 10 classes")
    ap.add_argument("--digits-side", type=int, choices=[16, 32], default=16, help="the digits' side in pixels")
    ap.add_argument("--digits-factor", type=int, default=4,
                    help="space-to-depth: side 16, factor 4 -> 16 channels on 4 x 4 tokens (CPU-sized); side 32, "
                         "factor 2 -> 4 channels on 16 x 16 (256 tokens, as XL/1)")
    ap.add_argument("--rtol", type=float, default=0.05)
    ap.add_argument("--out", default="runs/fp8_compare")
    ap.add_argument("--set", action="append", default=[], help="extra config overrides for both runs")
    a = ap.parse_args(argv)
    import torch
    out = Path(a.out)
    # FP8 needs linear sizes divisible by 16: the tiny config's 64-wide model becomes 48 wide (SwiGLU 128) on 4x4
    # latents: the CPU's FP8 matmul (an earlier torch's _scaled_mm CPU emulation, ~30 MFLOP/s) took 20 s a step at
    # 96 wide on 8x8 latents, under 1 s here. torch 2.13's runs at 60-76 GFLOP/s on one thread (1024 x 144 x 432,
    # per-tensor / row-wise scales): 2,000 steps of a 144-wide, 4-block model on the digits in ~12 minutes
    tiny = ["model.hidden_size=48", "model.input_size=4"] if a.config.endswith("dit_tiny_cpu.yaml") else []
    fp8_extra = [f"fp8.backend={a.fp8_backend}", *([f"fp8.recipe={a.fp8_recipe}"] if a.fp8_recipe else []),
                 f"fp8.quant={a.fp8_quant}"]
    if not torch.cuda.is_available():
        fp8_extra.append("fp8.allow_cpu=true")
    # the digit latents in a temporary folder, removed after both runs (20 MB at 32 px: not results, and in OUT they
    # would be packed into the archive a lent machine returns, whose limit is 16 MiB)
    with tempfile.TemporaryDirectory(prefix="fp8_compare_data_") as tmp:
        data = []
        if a.data == "digits":
            from train.data.embedded import write_digit_latents
            channels, side = write_digit_latents(Path(tmp) / "digits", a.digits_side, a.digits_factor)
            data = ["data.source=latents", f"data.path={Path(tmp) / 'digits'}", f"model.in_channels={channels}",
                    f"model.input_size={side}", "model.num_classes=10"]
        common = ["train.precision=bf16", *tiny, *data, *a.set]
        bf16, _ = run_one(a.config, out / "bf16", a.steps, common)
        fp8, desc = run_one(a.config, out / "fp8", a.steps, common + fp8_extra)
    res = {**compare(bf16, fp8, a.rtol), "fp8": desc,
           "environment": environment("cuda" if torch.cuda.is_available() else "cpu"), "config": a.config,
           "data": a.data if a.data == "config" else f"digits ({a.digits_side} px, space-to-depth {a.digits_factor})",
           "overrides": common, "bf16_losses": bf16, "fp8_losses": fp8}
    (out / "fp8_compare.json").write_text(json.dumps(res, indent=1))
    label = f"bf16 + FP8 ({a.fp8_backend}, {a.fp8_recipe or 'default recipe'})"
    plot_curves(out / "fp8_compare.png", [
        ("loss (mse + cos)", {"bf16 autocast": bf16, label: fp8}),
        (f"FP8 / bf16 - 1, {WINDOW}-step means", {label: window_ratio(bf16, fp8)})],
        log_y=[True, False], title=f"{desc}; {res['data']}")
    print(f"bf16 vs FP8 ({desc}, {res['environment']['card']}): last-{res['tail_steps']}-step mean loss "
          f"{res['bf16_tail_mean']:.4f} vs {res['fp8_tail_mean']:.4f} (rel diff {res['tail_rel_diff']:.2%}; "
          f"first loss {res['first_loss']:.3f}) -> {'agree' if res['agree'] else 'DISAGREE'}; {out}/fp8_compare.png")
    return 0 if res["agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
