"""Accuracy guard for the fast sampling paths: bf16 and FP8 against fp32, on the parity fixtures and a small
trained model.

    python -m bench.precision_guard ../shared/parity --json runs/precision_guard.json [--device cuda]

1. Fixtures (the authors' weights format, random weights): each fixture's guided sample (its own noise,
   labels, grid, cfg, interval; reference guidance) through modeling.sampling.Sampler. fp32 must reproduce
   the fixture's `sample_out` (rtol 1e-4, atol 1e-5); each fast path gives a per-sample relative error
   ||x_fast - x_fp32|| / ||x_fp32||. FP8 needs matmul sizes divisible by 16: a fixture without them says so.
2. A small LightningDiT trained here for a few hundred steps on a class-conditional Gaussian mixture in a
   4x4x4 latent space (deterministic, CPU seconds): N samples with seed A in fp32, seed A in bf16 and seed B
   in fp32. Reported: the per-sample relative error of bf16 vs fp32 (seed A), and the Frechet distance
   (robust float64, evaluation.fid) between the bf16 and fp32 sets next to the distance between the two
   fp32 sets with different seeds -- the noise floor any FID comparison already lives with.
The guard holds when the fast-vs-fp32 distance is a small fraction of the seed-to-seed distance.
On the CPU, FP8 is torch._scaled_mm's emulation (the same FP8 roundings; accumulation order and the GPU's fast
accumulation differ).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from evaluation.provenance import environment

FAST_PRECISIONS = ("bf16", "bf16-weights", "fp8")


def _fp8_kw(precision, device):
    """FP8 runs on an FP8 GPU, and emulated on the CPU (accuracy only)."""
    return {"fp8_emulation": torch.device(device).type == "cpu"} if precision == "fp8" else {}


def _rel(a, b):
    return ((a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)).double()


def fixture_rows(parity_dir: str | Path, precisions: tuple[str, ...] = FAST_PRECISIONS, device: str = "cpu",
                 compile: str = "none", cudagraphs: str = "off") -> list[dict]:
    """Per fixture: fp32 max abs error vs the fixture's sample_out, and each precision's per-sample rel. error."""
    from modeling import LightningDiT
    from modeling.safe_load import safe_torch_load
    from modeling.sampling import Sampler, SamplerUnavailable, SamplingConfig
    parity_dir = Path(parity_dir)
    configs = json.loads((parity_dir / "configs.json").read_text())
    rows = []
    for name, cfg in sorted(configs.items()):
        if cfg.get("kind") != "lightningdit":
            continue
        model = LightningDiT.from_pretrained(parity_dir / f"{name}.pt").to(device)
        io = safe_torch_load(parity_dir / f"{name}_io.pt", "parity fixture")  # weights_only=True (see its README)
        kw = dict(steps=int(io["sample_steps"]), shift=float(io["sample_shift"]),
                  cfg_scale=float(io["sample_cfg_scale"]), cfg_interval_start=float(io["sample_cfg_interval_start"]),
                  guidance="reference")
        z, y = io["sample_z"].to(device), io["sample_y"].to(device)
        ref = Sampler(model, SamplingConfig(precision="fp32", **kw), device=device)(z, y).cpu()
        row = {"fixture": name, "fp32_max_abs_err_vs_reference": float((ref - io["sample_out"]).abs().max()),
               "fp32_matches_reference": bool(torch.allclose(ref, io["sample_out"], rtol=1e-4, atol=1e-5))}
        for p in precisions:
            try:
                sampler = Sampler(model, SamplingConfig(precision=p, compile=compile, cudagraphs=cudagraphs, **kw),
                                  device=device, **_fp8_kw(p, device))
            except SamplerUnavailable as e:  # FP8 on a fixture whose matmul sizes are not multiples of 16
                row[f"{p}_rel_err"] = {"not_applicable": str(e)}
                continue
            try:
                r = _rel(sampler(z, y).cpu(), ref)
            except Exception as e:  # noqa: BLE001 -- recorded (and the CLI exits 1); the other paths still run
                row[f"{p}_rel_err"] = {"error": f"{type(e).__name__}: {e}"[:500]}
                continue
            row[f"{p}_rel_err"] = {"median": float(r.median()), "max": float(r.max())}
        rows.append(row)
    return rows


def train_small_model(steps: int = 300, seed: int = 0, num_classes: int = 4, device: str = "cpu",
                      batch: int = 128) -> tuple[torch.nn.Module, Callable[[int, torch.Generator], tuple]]:
    """A tiny LightningDiT fitted to a class-conditional Gaussian mixture on 4x4x4 latents. Returns (model, data
    sampler). Deterministic for a given seed on a given device. Hidden 96: every block matmul is a multiple of
    16 (FP8)."""
    from modeling import LightningDiT, flow_loss
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(num_classes, 4, 4, 4, generator=g)

    def data(n, gen):
        y = torch.randint(0, num_classes, (n,), generator=gen)
        return means[y] + 0.3 * torch.randn(n, 4, 4, 4, generator=gen), y

    torch.manual_seed(seed)
    model = LightningDiT(input_size=4, patch_size=1, in_channels=4, hidden_size=96, depth=2, num_heads=2,
                         num_classes=num_classes).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    gd = torch.Generator().manual_seed(seed + 1)
    gl = torch.Generator(device=device).manual_seed(seed + 2)
    model.train()
    for _ in range(steps):
        x1, y = data(batch, gd)
        loss = flow_loss(model, x1.to(device), y.to(device), generator=gl, label_generator=gl)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval(), data


def trained_model_rows(num_samples: int = 512, steps: int = 16, cfg_scale: float = 2.0,
                       cfg_interval_start: float = 0.1, train_steps: int = 300,
                       precisions: tuple[str, ...] = FAST_PRECISIONS, device: str = "cpu", compile: str = "none",
                       cudagraphs: str = "off", seed: int = 0, train_batch: int = 128) -> dict:
    """The small trained model sampled in fp32 (two seeds) and in each fast precision: per-sample relative
    errors and Frechet distances against the fp32 seed-to-seed floor."""
    from modeling.sampling import Sampler, SamplingConfig

    from evaluation.fid import FIDStatistics
    model, _ = train_small_model(train_steps, seed, device=device, batch=train_batch)
    kw = dict(steps=steps, shift=0.3, cfg_scale=cfg_scale, cfg_interval_start=cfg_interval_start,
              guidance="all")

    def draw(s):
        g = torch.Generator().manual_seed(s)
        return (torch.randn(num_samples, 4, 4, 4, generator=g).to(device),
                torch.randint(0, model.num_classes, (num_samples,), generator=g).to(device))

    za, ya = draw(seed + 10)
    zb, yb = draw(seed + 11)
    fp32 = Sampler(model, SamplingConfig(precision="fp32", **kw), device=device)
    a32, b32 = fp32(za, ya).cpu(), fp32(zb, yb).cpu()

    def fd(u, v):
        return FIDStatistics.from_features(u.flatten(1).double().numpy()).frechet_distance(
            FIDStatistics.from_features(v.flatten(1).double().numpy()))

    floor = fd(a32, b32)
    out = {"num_samples": num_samples, "steps": steps, "cfg_scale": cfg_scale, "train_steps": train_steps,
           "fd_fp32_seedA_vs_fp32_seedB": floor}
    for p in precisions:
        try:
            a = Sampler(model, SamplingConfig(precision=p, compile=compile, cudagraphs=cudagraphs, **kw), device=device,
                        **_fp8_kw(p, device))
            a = a(za, ya).cpu()
        except Exception as e:  # noqa: BLE001 -- recorded (and the CLI exits 1); the other paths still run
            out[p] = {"error": f"{type(e).__name__}: {e}"[:500]}
            continue
        r = _rel(a, a32)
        out[p] = {"rel_err_median": float(r.median()), "rel_err_max": float(r.max()),
                  "fd_vs_fp32_same_seed": fd(a, a32), "fd_ratio_to_seed_floor": fd(a, a32) / floor}
    return out


def run_guard(parity_dir: str | Path, device: str = "cpu", compile: str = "none", cudagraphs: str = "off",
              num_samples: int = 512, train_steps: int = 300) -> dict:
    """Both checks (fixture_rows, trained_model_rows) in true fp32 arithmetic, with the environment block."""
    # true fp32 on the GPU too: cuDNN convolutions (the patch embedding) default to TF32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    t = time.time()
    res = {"device": str(device), "compile": compile, "cudagraphs": cudagraphs,
           "fixtures": fixture_rows(parity_dir, device=device, compile=compile, cudagraphs=cudagraphs),
           "trained_model": trained_model_rows(num_samples=num_samples, train_steps=train_steps, device=device,
                                               compile=compile, cudagraphs=cudagraphs)}
    res["seconds"] = time.time() - t
    res["environment"] = environment(device)  # after the runs: the kernels they used
    return res


def main(argv: list[str] | None = None) -> dict:
    from modeling.config import cli_parser
    p = cli_parser("bench.precision_guard", __doc__)
    p.add_argument("parity_dir", nargs="?", default="../shared/parity")
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", default="none", choices=["none", "blocks", "model"])
    p.add_argument("--cudagraphs", default="off", choices=["off", "on", "auto"])
    p.add_argument("--num-samples", type=int, default=512)
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    res = run_guard(a.parity_dir, a.device, a.compile, a.cudagraphs, a.num_samples, a.train_steps)
    print(json.dumps(res, indent=2))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=2))
    failed = [f"{r['fixture']} {k}" for r in res["fixtures"] for k, v in r.items()
              if isinstance(v, dict) and "error" in v]
    failed += [f"trained model {k}" for k, v in res["trained_model"].items() if isinstance(v, dict) and "error" in v]
    if failed:
        raise SystemExit(f"precision_guard: these paths failed to run: {', '.join(failed)}")
    return res


if __name__ == "__main__":
    main()
