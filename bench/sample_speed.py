"""Sampling speed through the code path evaluation.generate runs (modeling.sampling.Sampler + decode_images).

    python -m bench.sample_speed --json runs/sample_speed.json          # paper settings, XL/1, random weights
    python -m bench.sample_speed --plan fp32@64,bf16-weights+graphs@64,bf16+blocks+graphs@256

The paper's settings: LightningDiT-XL/1 on 16x16x32 latents, Euler on the shift-0.3 grid, CFG 6.7 from
t >= 0.125 with the authors' 3-channel guidance. Each plan entry `SPEC@BATCH` builds a Sampler
(SPEC = precision [+ blocks | + model [+ autotune]] [+ graphs]: fp32 / bf16 (autocast) / bf16-weights / fp8
[+ tensorwise], torch.compile of each block or of the whole forward (inductor's max-autotune), each Euler
step a CUDA graph), runs it once to warm up (compilation
and graph capture, timed separately), then times one `--steps`-point run. Images per second are scaled
to the 250-point grid by forward cost (an unguided step = 1 forward of the batch, a guided one = 2) --
the 25- and 250-point grids guide almost the same fraction of steps (16/24 vs 168/249) -- and reported
with and without the bf16 / fp32 batched VA-VAE decode (f16d32, random weights). Each fast path's
latents are compared with the fp32 path's on the same noise (relative error, per sample). Entries not
started before --budget-s seconds are listed as skipped. Writes JSON: device, commit, torch / Triton,
kernel backends, and per entry the path that actually ran, img/s, warm-up seconds and peak memory.

As a library (what bench.throughput --mode sample calls):
    measure_sampling(size="XL/1", plan=DEFAULT_PLAN, steps=25, ...) -> dict
"""
import json
import math
import time
from pathlib import Path

import torch

AUTHORS_IMG_PER_S = 1.64  # their inference.py on one H200, fp32 (TF32 on), batch 64, 250 steps (ENVIRONMENT.md)
# ~85 s on one H200 from a cold inductor cache (the whole-model compile is ~50 s of it)
DEFAULT_PLAN = ("fp32@64", "bf16@64", "bf16-weights+graphs@64", "bf16-weights+model+graphs@128")
PAPER = dict(cfg_scale=6.7, cfg_interval_start=0.125, guidance="reference", shift=0.3)


def parse_spec(spec):
    """'bf16-weights+blocks+graphs@256' -> (dict(precision, compile, cudagraphs), 256); optional parts
    'autotune' (max-autotune compile), 'fusedmlp' (w12 + SwiGLU in one kernel) and, after fp8, 'tensorwise'
    (per-tensor scales instead of per-row) and 'torchao' (torchao's float8 modules instead of FP8Linear);
    'refops' runs the entry with kernels.set_backend("reference") (what VAVAE_KERNELS=reference does for
    generate): every op traced as plain torch ops, so inductor can fuse the SwiGLU with its neighbours."""
    from modeling.sampling import PRECISIONS
    body, _, batch = spec.partition("@")
    parts = body.split("+")
    if parts[0] not in PRECISIONS:
        raise ValueError(f"plan entry {spec!r}: starts with a precision {PRECISIONS}")
    opts = dict(precision=parts[0], compile="none", cudagraphs="off")
    for p in parts[1:]:
        if p in ("blocks", "model"):
            opts["compile"] = p
        elif p == "graphs":
            opts["cudagraphs"] = "on"
        elif p == "autotune":
            opts["autotune"] = True
        elif p == "fusedmlp":
            opts["fused_mlp"] = True
        elif p == "refops":
            opts["kernels"] = "reference"
        elif p == "tensorwise" and parts[0] == "fp8":
            opts["fp8_recipe"] = "tensorwise"
        elif p == "torchao" and parts[0] == "fp8":
            opts["fp8_impl"] = "torchao"
        else:
            raise ValueError(f"plan entry {spec!r}: unknown part {p!r} (blocks, model, graphs, autotune, "
                             "fusedmlp, refops; tensorwise, torchao after fp8)")
    if not batch.isdigit() or int(batch) < 1:
        raise ValueError(f"plan entry {spec!r}: needs @BATCH, e.g. {body}@64")
    return opts, int(batch)


def forward_units(guided):
    """Forward cost of a grid in batch-forwards: 1 per unguided step, 2 per guided step."""
    return sum(2 if g else 1 for g in guided)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _randomize(model, seed):
    """Random weights everywhere (the reference init zeroes adaLN and the output layer): norm weights near 1,
    other vectors and matrices small."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * r if p.ndim == 1 and "norm" in name else 0.02 * r)
    return model


def _env(device):
    import kernels
    from evaluation.provenance import commit
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "triton": triton_version, "commit": commit(),
           "kernels_requested": kernels.get_backend()}
    return env


def measure_sampling(size="XL/1", plan=DEFAULT_PLAN, steps=25, scale_to=250, cfg_scale=PAPER["cfg_scale"],
                     cfg_interval_start=PAPER["cfg_interval_start"], guidance=PAPER["guidance"], shift=PAPER["shift"],
                     input_size=16, in_channels=32, num_classes=1000, vae_config=None, device=None, decode=True,
                     tf32=True, seed=0, budget_s=45.0, model_kwargs=None, log=print, partial_json=None, profile=False):
    """Measure each plan entry; returns {"env", "settings", "results": [...], "summary"}.

    partial_json: rewritten after every entry with the settings and the results so far (a run killed by a
    timeout keeps what it measured).

    size: a LIGHTNINGDIT_SIZES name, or "custom" with model_kwargs (hidden_size, depth, num_heads, patch_size).
    tf32: TF32 matmuls for the fp32 path (the authors' inference.py turns them on).
    profile: after timing, one more run of each entry's sampler under torch.profiler; its kernel time by
    category (matmul, attention, inductor fusions, ...) and top kernels go in the entry's "profile".
    vae_config: AutoencoderKL kwargs (default: the released f16d32); decode=False skips the decode timing.
    """
    import kernels
    from modeling.lightningdit import LightningDiT, build_lightningdit
    from modeling.sampling import Sampler, SamplerUnavailable, decode_images, time_grid
    from modeling.vavae import VAVAE_F16D32, AutoencoderKL

    log = log or (lambda *_: None)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    entries = [(s, *parse_spec(s)) for s in plan]
    torch.manual_seed(seed)
    kw = dict(input_size=input_size, in_channels=in_channels, num_classes=num_classes, **(model_kwargs or {}))
    model = LightningDiT(**kw) if size == "custom" else build_lightningdit(size, **kw)
    model = _randomize(model, seed).to(device).eval()
    vae = AutoencoderKL(**(vae_config or VAVAE_F16D32)).to(device).eval() if decode else None
    grid_run = time_grid(steps, shift, dtype=torch.float64).tolist()[:-1]
    grid_full = time_grid(scale_to, shift, dtype=torch.float64).tolist()[:-1]
    guided_run = [cfg_scale != 1.0 and t >= cfg_interval_start for t in grid_run]
    guided_full = [cfg_scale != 1.0 and t >= cfg_interval_start for t in grid_full]
    scale = forward_units(guided_full) / forward_units(guided_run)
    settings = dict(size=size, input_size=input_size, in_channels=in_channels, num_classes=num_classes,
                    method="euler", steps_run=steps, steps_scaled_to=scale_to, shift=shift, cfg_scale=cfg_scale,
                    cfg_interval_start=cfg_interval_start, guidance=guidance,
                    guided_steps_run=f"{sum(guided_run)}/{len(guided_run)}",
                    guided_steps_scaled=f"{sum(guided_full)}/{len(guided_full)}", time_scale=scale,
                    tf32_for_fp32=tf32, weights="random", params=sum(p.numel() for p in model.parameters()),
                    # the model's forward FLOPs x forwards per image on the full grid (a guided step: 2)
                    gflop_per_img=model.flops_per_sample(train=False) * forward_units(guided_full) / 1e9)
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
    g = torch.Generator().manual_seed(seed + 1)  # one noise / label set; every entry uses its first rows
    z_all = torch.randn(max(b for *_, b in entries), in_channels, input_size, input_size, generator=g)
    y_all = torch.randint(0, num_classes, (len(z_all),), generator=g)
    results, fp32_out, start = [], {}, time.time()
    try:
        for spec, opts, batch in entries:
            if time.time() - start > budget_s:
                results.append({"spec": spec, "batch": batch, "skipped": f"not started: {budget_s:.0f} s budget used"})
                log(f"[sample_speed] {spec}: skipped (budget)")
                continue
            z, y = z_all[:batch].to(device), y_all[:batch].to(device)
            res = {"spec": spec, "batch": batch}
            try:
                res.update(_measure_one(model, vae, z, y, opts, steps, cfg_scale, cfg_interval_start, guidance,
                                        shift, scale, device, Sampler, decode_images, profile))
            except Exception as e:  # noqa: BLE001 -- one path failing (compile, OOM, refusal) must not stop the rest
                res["error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
                log(f"[sample_speed] {spec}: {res['error']}")
                results.append(res)
                _write_partial(partial_json, settings, results)
                continue
            out = res.pop("_out")
            if opts["precision"] == "fp32" and opts["compile"] == "none":
                fp32_out[batch] = out
            ref = fp32_out.get(batch)
            if ref is None and fp32_out:  # the first rows of the fp32 run of another batch size: same noise
                b0, r0 = next(iter(fp32_out.items()))
                k = min(b0, batch)
                ref, out = r0[:k], out[:k]
            if ref is not None:
                rel = (out - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)
                res["rel_err_vs_fp32"] = {"median": float(rel.median()), "max": float(rel.max())}
            res["finite"] = bool(torch.isfinite(out).all())
            res["tflops"] = res["img_per_s"] * settings["gflop_per_img"] / 1e3  # sampling alone, no decode
            results.append(res)
            _write_partial(partial_json, settings, results)
            log(f"[sample_speed] {spec}: {res['img_per_s']:.2f} img/s sampling, "
                f"{res.get('img_per_s_with_decode', float('nan')):.2f} with decode (scaled to {scale_to} points), "
                f"warm-up {res['warmup_s']:.1f} s, ran {res['ran']}")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
    env = _env(device)
    desc = kernels.describe()
    env["kernels"] = desc.get("ops")  # the backend each op used last
    env["attention_measured"] = desc.get("attention_measured")
    done = [r for r in results if "img_per_s" in r]
    best = max(done, key=lambda r: r["img_per_s_with_decode"] if "img_per_s_with_decode" in r else r["img_per_s"],
               default=None)
    fp32 = next((r for r in done if r["ran"]["precision"] == "fp32"), None)
    summary = {"total_s": time.time() - start}
    if best is not None:
        key = "img_per_s_with_decode" if "img_per_s_with_decode" in best else "img_per_s"
        summary.update(best=best["spec"], best_img_per_s=best[key],
                       vs_authors_1_64=best[key] / AUTHORS_IMG_PER_S,
                       vs_our_fp32=(best[key] / fp32[key]) if fp32 and key in fp32 else None,
                       fid50k_hours_one_gpu=50000 / best[key] / 3600)
    return {"env": env, "settings": settings, "results": results, "summary": summary}


def _write_partial(path, settings, results):
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({"partial": True, "settings": settings, "results": results}, indent=1,
                                         default=str))


def _measure_one(model, vae, z, y, opts, steps, cfg_scale, cfg_interval_start, guidance, shift, scale, device,
                 Sampler, decode_images, profile=False):
    import kernels
    opts = dict(opts)
    backend, previous = opts.pop("kernels", None), kernels.get_backend()
    if backend:
        kernels.set_backend(backend)
    try:
        res = _measure_with(model, vae, z, y, opts, steps, cfg_scale, cfg_interval_start, guidance, shift, scale,
                            device, Sampler, decode_images, profile)
    finally:
        kernels.set_backend(previous)
    res["kernels_backend"] = backend or previous
    return res


def _measure_with(model, vae, z, y, opts, steps, cfg_scale, cfg_interval_start, guidance, shift, scale, device,
                  Sampler, decode_images, profile):
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    make = lambda n: Sampler(model, steps=n, shift=shift, cfg_scale=cfg_scale,  # noqa: E731
                             cfg_interval_start=cfg_interval_start, guidance=guidance, device=device, **opts)
    sampler = make(steps)
    t0 = time.time()
    if opts["compile"] == "none" and sampler.describe()["cudagraphs"] == "off":
        make(3)(z, y)  # eager: a short run pays for first-call costs (cuBLAS, attention choice)
    else:
        sampler(z, y)  # compilation and graph capture happen on this sampler's first call
    _sync(device)
    warmup = time.time() - t0
    t0 = time.time()
    out = sampler(z, y)
    _sync(device)
    run_s = time.time() - t0
    n = len(z)
    res = {"ran": sampler.describe(), "warmup_s": warmup, "time_s": run_s, "time_scaled_s": run_s * scale,
           "img_per_s": n / (run_s * scale)}
    if profile:  # after the timed run, so the profiler never touches the number
        from bench.profile_step import kernel_times
        res["profile"] = {"per": f"one {steps}-point run at batch {n}",
                          **kernel_times(lambda: sampler(z, y), 1, cuda)}
    if vae is not None:
        lat = out[:2]
        decode_images(vae, lat, opts["precision"])  # warm-up
        _sync(device)
        t0 = time.time()
        decode_images(vae, out, opts["precision"])
        _sync(device)
        res["decode_s"] = time.time() - t0
        res["img_per_s_with_decode"] = n / (run_s * scale + res["decode_s"])
    if cuda:
        res["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    del sampler
    res["_out"] = out.float().cpu()
    return res


def main(argv=None):
    from modeling.config import cli_parser
    p = cli_parser("bench.sample_speed", __doc__)
    p.add_argument("--size", default="XL/1")
    p.add_argument("--plan", default=",".join(DEFAULT_PLAN), help="comma-separated SPEC@BATCH entries")
    p.add_argument("--steps", type=int, default=25, help="grid points actually run")
    p.add_argument("--scale-to", type=int, default=250, help="grid points the img/s are scaled to")
    p.add_argument("--cfg-scale", type=float, default=PAPER["cfg_scale"])
    p.add_argument("--cfg-interval-start", type=float, default=PAPER["cfg_interval_start"])
    p.add_argument("--guidance", choices=["all", "reference"], default=PAPER["guidance"])
    p.add_argument("--shift", type=float, default=PAPER["shift"])
    p.add_argument("--no-decode", action="store_true", help="do not time the VA-VAE decode")
    p.add_argument("--no-tf32", action="store_true", help="plain fp32 matmuls on the fp32 path")
    p.add_argument("--budget-s", type=float, default=45.0, help="no new plan entry starts after this many seconds")
    p.add_argument("--device", default=None)
    p.add_argument("--profile", action="store_true", help="kernel time by category of one more run per entry")
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args(argv)
    try:
        plan = [s.strip() for s in a.plan.split(",") if s.strip()]
        for s in plan:
            parse_spec(s)
    except ValueError as e:
        p.exit(2, f"error: {e}\n")
    res = measure_sampling(a.size, plan, a.steps, a.scale_to, a.cfg_scale, a.cfg_interval_start, a.guidance,
                           a.shift, device=a.device, decode=not a.no_decode, tf32=not a.no_tf32, budget_s=a.budget_s,
                           profile=a.profile)
    print(json.dumps(res["summary"], indent=2))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=2, default=str))
        print(f"wrote {a.json}")
    return res


if __name__ == "__main__":
    main()
