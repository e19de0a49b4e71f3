"""bf16 vs fp32 for the VA-VAE: the same run (same seed, images, posterior samples) trained twice through the
real trainer (train.train_vae.Trainer), once in fp32 (the authors' precision) and once with train.precision=bf16,
and the loss curves compared.

    python -m bench.vae_precision_compare --steps 200 --out runs/vae_precision          # tiny CPU config
    python -m bench.vae_precision_compare --config configs/vavae_f16d32_stage1.yaml --steps 2000 \\
        --set data.root=SCAN --set foundation.weights=dinov2_vitl14.pth                  # the paper's model, GPU

Compared: `rec` (per-pixel L1 + LPIPS, the reconstruction objective) and `vf` (the VF loss) per step, and the
mean of each over the last quarter of the steps. Writes OUT/precision_compare.json (with the environment block
of evaluation.provenance) and .png; exits 1 when the tail means differ by more than --rtol (relative).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.plots import plot_curves
from evaluation.provenance import environment

REPO = Path(__file__).resolve().parents[1]
METRICS = ("rec", "vf")


def run_one(config: str | Path, out_dir: str | Path, steps: int, overrides: list[str]) -> dict[str, list[float]]:
    """One VA-VAE trainer run of `steps` steps; returns the per-step curve of each of METRICS and the loss."""
    from modeling.config import load_config
    from train.train_vae import Trainer
    from train.vae_config import VAVAETrainConfig
    cfg = load_config(VAVAETrainConfig, config, [
        f"train.steps={steps}", f"checkpoint.every={steps}", "checkpoint.resume=never",
        "checkpoint.export_reference=false", f"logging.dir={out_dir}", "logging.every=1",
        "logging.progress_bar=false", "logging.tensorboard=false", "logging.reconstructions=false", *overrides])
    Trainer(cfg).fit()
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return {m: [r[m] for r in rows if m in r] for m in METRICS + ("loss",)}


def compare(a: dict[str, list[float]], b: dict[str, list[float]], rtol: float) -> dict:
    """Per metric: the tail means (last quarter of the steps) of the fp32 (`a`) and bf16 (`b`) curves, their
    relative difference, and whether every metric agrees within `rtol`."""
    res = {}
    for m in METRICS:
        x, y = a[m], b[m]
        n = min(len(x), len(y))
        if n == 0:
            continue
        tail = max(1, n // 4)
        ma, mb = sum(x[n - tail:n]) / tail, sum(y[n - tail:n]) / tail
        res[m] = {"steps": n, "tail_steps": tail, "fp32_tail_mean": ma, "bf16_tail_mean": mb,
                  "tail_rel_diff": abs(mb - ma) / max(abs(ma), 1e-12),
                  "max_step_rel_diff": max(abs(q - p) / max(abs(p), 1e-12) for p, q in zip(x[:n], y[:n])),
                  "first": x[0]}
    res["agree"] = bool(res) and all(r["tail_rel_diff"] <= rtol for k, r in res.items() if k in METRICS)
    return res


def main(argv: list[str] | None = None) -> int:
    from modeling.config import cli_parser
    ap = cli_parser("bench.vae_precision_compare", __doc__)
    ap.add_argument("--config", default=str(REPO / "configs/vavae_tiny_cpu.yaml"), help="VA-VAE trainer config")
    ap.add_argument("--steps", type=int, default=200, help="steps of each run")
    ap.add_argument("--rtol", type=float, default=0.05, help="allowed relative difference of the tail means")
    ap.add_argument("--out", default="runs/vae_precision_compare", help="output folder")
    ap.add_argument("--set", action="append", default=[], help="config override for both runs (repeatable)")
    a = ap.parse_args(argv)
    import torch
    out = Path(a.out)
    fp32 = run_one(a.config, out / "fp32", a.steps, ["train.precision=fp32", *a.set])
    bf16 = run_one(a.config, out / "bf16", a.steps, ["train.precision=bf16", *a.set])
    res = {**compare(fp32, bf16, a.rtol), "environment": environment("cuda" if torch.cuda.is_available() else "cpu"),
           "config": a.config, "overrides": a.set, "fp32": fp32, "bf16": bf16}
    out.mkdir(parents=True, exist_ok=True)
    (out / "precision_compare.json").write_text(json.dumps(res, indent=1))
    plot_curves(out / "precision_compare.png", [(m, {"fp32": fp32[m], "bf16 autocast": bf16[m]}) for m in METRICS])
    for m in METRICS:
        if m in res:
            r = res[m]
            print(f"{m}: last-{r['tail_steps']}-step mean fp32 {r['fp32_tail_mean']:.4f} vs bf16 {r['bf16_tail_mean']:.4f} "
                  f"(rel diff {r['tail_rel_diff']:.2%}; largest single-step diff {r['max_step_rel_diff']:.2%})")
    print(f"bf16 vs fp32 ({res['environment']['card']}): {'agree' if res['agree'] else 'DISAGREE'} (rtol {a.rtol}); "
          f"{out}/precision_compare.png")
    return 0 if res["agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
