"""The authors' LightningDiT sampler, from their code, timed in the same run as ours (the GPU suite's
`authors_sample`, right after `sampling` in part B).

    bash scripts/prepare_gpu_carry.sh            # here: .authors/LightningDiT/{models,transport,configs}
    python -m bench.authors_sample --authors .authors --batch 128 --ours OUT/sample_throughput.json \
        --out OUT/authors_sample.json                                                      # on the GPU machine

The README's sampling speed-ups were read against 1.64 img/s measured in another session (2026-11-26); this runs
their sampler beside ours. It builds their LightningDiT-XL/1 from their 800-epoch reproduction config (the paper's
FID 1.35 settings; their blocks carry their own `@torch.compile`), random weights (their initialisation zeroes the
adaLN and output layers; the values do not change the work), and runs the body of their `inference.py` loop: TF32
matmuls on, no gradients, fp32, `Sampler(create_transport(...)).sample_ode(...)` with their config's method (Euler),
tolerances and timestep shift, the noise and labels doubled with the null class, `model.forward_with_cfg` with their
cfg scale and interval. The decode and the PNG writes are not timed (ours is compared without decode too).

Their sampler evaluates the doubled batch at every step (guidance off below the interval still runs the
unconditional half), so its time is linear in the model calls: `--steps` grid points (steps - 1 Euler calls) are
timed and scaled to their config's `num_sampling_steps` (250: 249 calls), as bench.sample_speed scales ours.
With `--ours` (bench.throughput's sample JSON from the same run), each of our entries' img/s is printed over theirs.
It runs in its own process: the stand-ins (bench.authors_dit) never reach our code.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

from bench.authors_dit import AuthorsCodeMissing, their_compile, their_model

CONFIG = "LightningDiT/configs/reproductions/lightningdit_xl_vavae_f16d32_800ep_cfg.yaml"
NULL_CLASS = 1000  # their inference.py's y_null


def build(root: Path, device: str, steps: int, model_spec: Optional[dict] = None) -> dict[str, Any]:
    """Their model (eval, fp32, on device) and their ODE sampler of `steps` grid points from their config."""
    built = their_model(root, CONFIG, model_spec)
    from transport import Sampler, create_transport
    tr, s = built["config"]["transport"], built["config"]["sample"]
    transport = create_transport(tr["path_type"], tr["prediction"], tr["loss_weight"], tr["train_eps"],
                                 tr["sample_eps"], use_cosine_loss=tr["use_cosine_loss"], use_lognorm=tr["use_lognorm"])
    sample_fn = Sampler(transport).sample_ode(sampling_method=s["sampling_method"], num_steps=steps, atol=s["atol"],
                                              rtol=s["rtol"], reverse=s["reverse"],
                                              timestep_shift=s.get("timestep_shift", 0))
    from bench.sample_speed import randomize_weights
    model = randomize_weights(built["model"]).to(device).eval()
    return {**built, "model": model, "sample_fn": sample_fn, "settings": s}


def time_their_sampler(parts: dict, batch: int, device: str, steps: int, repeats: int, warmup: int) -> dict:
    """Their sampling of `batch` images (the doubled guided batch), timed over `repeats` runs of `steps` grid
    points after `warmup` runs, scaled to their config's num_sampling_steps."""
    import torch
    s = parts["settings"]
    g = torch.Generator(device).manual_seed(0)
    n, c = parts["input_size"], parts["in_channels"]
    z = torch.randn((batch, c, n, n), generator=g, device=device)
    y = torch.randint(0, parts["num_classes"], (batch,), generator=g, device=device)
    z = torch.cat([z, z], 0)
    y = torch.cat([y, torch.full((batch,), NULL_CLASS, device=device)], 0)
    kwargs = dict(y=y, cfg_scale=s["cfg_scale"], cfg_interval=True, cfg_interval_start=s.get("cfg_interval_start", 0))
    cuda = torch.device(device).type == "cuda"
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True  # their inference.py
    try:
        with torch.no_grad():
            def run():
                return parts["sample_fn"](z, parts["model"].forward_with_cfg, **kwargs)[-1].chunk(2, dim=0)[0]
            t0 = time.perf_counter()
            for _ in range(warmup):
                out = run()
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            warmup_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            for _ in range(repeats):
                out = run()
            if cuda:
                torch.cuda.synchronize(device)
            dt = (time.perf_counter() - t0) / repeats
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
    full = int(s["num_sampling_steps"])
    scaled = dt * (full - 1) / (steps - 1)
    return {"batch": batch, "steps_run": steps, "steps_scaled_to": full, "time_s": round(dt, 6),
            "time_scaled_s": round(scaled, 4), "img_per_s": round(batch / scaled, 4), "warmup_s": round(warmup_s, 1),
            "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2) if cuda else None,
            "finite": bool(torch.isfinite(out).all()), "tf32": True, "precision": "fp32 (their inference.py)"}


def versus_ours(ours_json: Path, theirs: dict) -> list[dict]:
    """Each of our entries in bench.throughput's sample JSON (same run) over their img/s."""
    report = json.loads(Path(ours_json).read_text())
    rows = []
    for r in report.get("results", []):
        if r.get("img_per_s"):
            rows.append({"ours": r.get("backend"), "batch": r.get("batch_size"), "img_per_s": round(r["img_per_s"], 3),
                         "x_theirs": round(r["img_per_s"] / theirs["img_per_s"], 2)})
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    from modeling.config import cli_parser
    ap = cli_parser("bench.authors_sample", __doc__)
    ap.add_argument("--authors", default=".authors", help="folder prepared by scripts/prepare_gpu_carry.sh")
    ap.add_argument("--out", default="runs/authors_sample.json", help="JSON result file")
    ap.add_argument("--batch", type=int, default=128, help="images per sampling call (the suite's: ours at 128)")
    ap.add_argument("--steps", type=int, default=25, help="grid points timed (scaled to their 250), as ours")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs (their blocks compile in the first)")
    ap.add_argument("--ours", default=None, help="bench.throughput --mode sample JSON of the same run, to compare")
    ap.add_argument("--device", default=None, help="default: cuda when available")
    ap.add_argument("--model", default=None, help="JSON of LightningDiT keyword arguments replacing their XL/1 "
                                                  "(tiny CPU runs)")
    a = ap.parse_args(argv)
    if a.steps < 2:
        ap.error("--steps must be at least 2 (one Euler call)")
    import torch
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parts = build(Path(a.authors), device, a.steps, json.loads(a.model) if a.model else None)
    except AuthorsCodeMissing as e:
        print(f"bench.authors_sample: {e}", file=sys.stderr)
        return 2
    r = time_their_sampler(parts, a.batch, device, a.steps, a.repeats, a.warmup)
    commit = Path(a.authors) / "LightningDiT" / "COMMIT"
    from evaluation import provenance
    s = parts["settings"]
    result = {"what": "the authors' inference.py sampling loop (hustvl/LightningDiT), fp32 with TF32 matmuls, "
                      "without decode", "model": parts["model_type"], "config": CONFIG,
              "settings": {k: s.get(k) for k in ("sampling_method", "num_sampling_steps", "cfg_scale",
                                                  "cfg_interval_start", "timestep_shift", "atol", "rtol")},
              "authors_commit": commit.read_text().strip() if commit.is_file() else None,
              "stand_ins": parts["stand_ins"], "their_torch_compile": their_compile(), **r,
              "environment": provenance.environment(torch.device(device))}
    print(f"authors' sampler, {parts['model_type']}, batch {a.batch}: {r['img_per_s']} img/s "
          f"({r['steps_run']} points timed, scaled to {r['steps_scaled_to']}), peak {r['peak_mem_gib']} GiB", flush=True)
    if a.ours:
        if Path(a.ours).is_file():
            result["versus_ours"] = versus_ours(Path(a.ours), r)
            for row in result["versus_ours"]:
                print(f"  ours {row['ours']}: {row['img_per_s']} img/s = {row['x_theirs']}x theirs", flush=True)
            best = {kind: max((row["x_theirs"] for row in result["versus_ours"] if row["ours"].startswith(prefix)),
                              default=None) for kind, prefix in (("bf16", "bf16"), ("FP8", "fp8"))}
            print("ours over theirs: " + ", ".join(f"best {k} {v}x" for k, v in best.items()), flush=True)
        else:
            result["versus_ours"] = f"{a.ours} not found (our sampling did not finish)"
            print(f"  {result['versus_ours']}", flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
