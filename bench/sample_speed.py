"""Sampling speed through the code path evaluation.generate runs (modeling.sampling.Sampler + decode_images).

    python -m bench.sample_speed --json runs/sample_speed.json          # paper settings, XL/1, random weights
    python -m bench.sample_speed --plan fp32@64,bf16-weights+graphs@64,bf16+blocks+graphs@256

The paper's settings: LightningDiT-XL/1 on 16x16x32 latents, Euler on the shift-0.3 grid, CFG 6.7 from
t >= 0.125 with the authors' 3-channel guidance. Each plan entry `SPEC@BATCH` builds a Sampler from a
modeling.sampling.SamplingConfig: SPEC is a precision and '+'-joined parts, each a value of one of
SamplingConfig's how-it-is-computed fields (PLAN_TOKENS, derived from SamplingConfig: fp32 / bf16 (autocast) /
bf16-weights / fp8, blocks / model (torch.compile of each block or of the whole forward), autotune (inductor's
max-autotune), fusedmlp, tensorwise / torchao after fp8, graphs (each Euler step a CUDA graph)), FIELD=VALUE
for any such field, or refops / fusedops (the entry runs with kernels backend reference / triton). It runs once to warm up
(compilation and graph capture, timed separately), then times one `--steps`-point run. Images per second are
scaled to the 250-point grid by forward cost (an unguided step = 1 forward of the batch, a guided one = 2) --
the 25- and 250-point grids guide almost the same fraction of steps (16/24 vs 168/249) -- and reported
with and without the bf16 / fp32 batched VA-VAE decode (f16d32, random weights). Each fast path's
latents are compared with the fp32 path's on the same noise (relative error, per sample). Entries not
started before --budget-s seconds are listed as skipped. Writes JSON: the environment block
(evaluation.provenance.environment: card, versions, commit, the kernels that ran), the settings, and per entry
the path that actually ran, img/s, warm-up seconds and peak memory.

As a library (what bench.throughput --mode sample calls):
    measure_sampling(size="XL/1", plan=DEFAULT_PLAN, steps=25, ...) -> dict
"""
from __future__ import annotations

import dataclasses
import json
import time
import typing
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch

from bench.kernel_time import kernel_times
from evaluation.provenance import environment
from modeling.sampling import SETTING_KEYS, SamplingConfig

AUTHORS_IMG_PER_S = 1.64  # their inference.py on one H200, fp32 (TF32 on), batch 64, 250 steps (ENVIRONMENT.md)
# ~85 s on one H200 from a cold inductor cache (the whole-model compile is ~50 s of it)
DEFAULT_PLAN = ("fp32@64", "bf16@64", "bf16-weights+graphs@64", "bf16-weights+model+graphs@128")
PAPER = dict(cfg_scale=6.7, cfg_interval_start=0.125, guidance="reference", shift=0.3)


# ----------------------------------------------------------------------------- plan entries

# Plan tokens that are not a SamplingConfig value spelled out.
PLAN_ALIASES: dict[str, tuple[str, Any]] = {"graphs": ("cudagraphs", "on")}
# Bench-only tokens: not a sampling option but the kernels backend the entry runs under ('refops': every op
# traced as plain torch ops, what VAVAE_KERNELS=reference does for generate, so inductor can fuse them;
# 'fusedops': our Triton kernel for every op, the block norms too, which `auto` leaves to inductor under compile
# (kernels/compiled_choices.json, measured forward + backward for training): the sampler's end-to-end A/B).
KERNEL_TOKENS: dict[str, str] = {"refops": "reference", "fusedops": "triton"}


def _how_fields() -> dict[str, Any]:
    """SamplingConfig's HOW fields (not SETTING_KEYS: a plan entry changes how a sample is computed, never what
    is sampled; those settings are the run's) -> their types."""
    hints = typing.get_type_hints(SamplingConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(SamplingConfig) if f.name not in SETTING_KEYS}


def _plan_tokens() -> dict[str, tuple[str, Any]]:
    """The one table from plan tokens to SamplingConfig fields, derived from SamplingConfig: each choice of a
    Literal HOW field is a token for it (fp32, bf16-weights, fp8, blocks, model, tensorwise, torchao, ...), each
    bool field is its name without underscores (autotune, fusedmlp), plus PLAN_ALIASES. A choice two fields
    share is left out (spell it FIELD=VALUE)."""
    seen: dict[str, list[tuple[str, Any]]] = {}
    for name, tp in _how_fields().items():
        if typing.get_origin(tp) is typing.Literal:
            for choice in typing.get_args(tp):
                seen.setdefault(str(choice), []).append((name, choice))
        elif tp is bool:
            seen.setdefault(name.replace("_", ""), []).append((name, True))
    table = {tok: uses[0] for tok, uses in seen.items() if len(uses) == 1}
    table.update(PLAN_ALIASES)
    return table


PLAN_TOKENS = _plan_tokens()


class PlanEntry(NamedTuple):
    """One `SPEC@BATCH` of a plan: the SamplingConfig fields it sets, its batch, and the kernels backend it runs
    under (None: the current one)."""
    sampling: dict[str, Any]
    batch: int
    kernels: str | None = None

    def config(self, base: SamplingConfig) -> SamplingConfig:
        """The run's settings (`base`) with this entry's fields."""
        return base.replace(**self.sampling)


def _field_value(name: str, text: str, spec: str) -> Any:
    tp = _how_fields()[name]
    if tp is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"plan entry {spec!r}: {name} takes true or false, got {text!r}")
        return text.lower() in ("true", "1")
    if typing.get_origin(tp) is typing.Literal:
        choices = {str(c): c for c in typing.get_args(tp)}
        if text not in choices:
            raise ValueError(f"plan entry {spec!r}: {name} must be one of {tuple(choices)}, got {text!r}")
        return choices[text]
    try:
        return tp(text)
    except (TypeError, ValueError):
        raise ValueError(f"plan entry {spec!r}: {name}={text!r} is not a {getattr(tp, '__name__', tp)}") from None


def parse_spec(spec: str) -> PlanEntry:
    """'bf16-weights+blocks+graphs@256' -> PlanEntry({precision: bf16-weights, compile: blocks, cudagraphs: on},
    256). SPEC starts with a precision; each further '+' part is a PLAN_TOKENS token, FIELD=VALUE for any HOW
    field of SamplingConfig, or a KERNEL_TOKENS token. A field named after a precision (fp8_recipe, fp8_impl)
    applies to that precision only. ValueError names the entry and the part."""
    body, _, batch = spec.partition("@")
    parts = body.split("+")
    sampling: dict[str, Any] = {}
    backend = None
    for i, part in enumerate(parts):
        if part in KERNEL_TOKENS:
            name, value = "kernels", KERNEL_TOKENS[part]
        elif "=" in part:
            name, _, text = part.partition("=")
            if name not in _how_fields():
                raise ValueError(f"plan entry {spec!r}: {name!r} is not a SamplingConfig field a plan entry sets "
                                 f"({', '.join(_how_fields())})")
            value = _field_value(name, text, spec)
        elif part in PLAN_TOKENS:
            name, value = PLAN_TOKENS[part]
        else:
            raise ValueError(f"plan entry {spec!r}: unknown part {part!r}; parts: {', '.join(PLAN_TOKENS)}, "
                             f"{', '.join(KERNEL_TOKENS)} or FIELD=VALUE")
        if i == 0 and name != "precision":
            raise ValueError(f"plan entry {spec!r}: starts with a precision, one of "
                             f"{[t for t, (f, _) in PLAN_TOKENS.items() if f == 'precision']}")
        if name in sampling or (name == "kernels" and backend):
            raise ValueError(f"plan entry {spec!r}: {part!r} sets {name} a second time")
        if name == "kernels":
            backend = value
        else:
            sampling[name] = value
    for name in sampling:
        owner = next((t for t in PLAN_TOKENS if PLAN_TOKENS[t][0] == "precision" and name.startswith(t + "_")), None)
        if owner and sampling["precision"] != owner:
            raise ValueError(f"plan entry {spec!r}: {name} applies to precision {owner} only")
    if not batch.isdigit() or int(batch) < 1:
        raise ValueError(f"plan entry {spec!r}: needs @BATCH, e.g. {body}@64")
    SamplingConfig().replace(**sampling)  # a value SamplingConfig refuses is refused here, before any run
    return PlanEntry(sampling, int(batch), backend)


def forward_units(guided: list[bool]) -> int:
    """Forward cost of a grid in batch-forwards: 1 per unguided step, 2 per guided step."""
    return sum(2 if g else 1 for g in guided)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def randomize_weights(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (the reference init zeroes adaLN and the output layer): norm weights near 1,
    other vectors and matrices small. Also given to the authors' model by bench.authors_sample."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * r if p.ndim == 1 and "norm" in name else 0.02 * r)
    return model


def measure_sampling(size: str = "XL/1", plan: list[str] | tuple[str, ...] = DEFAULT_PLAN, steps: int = 25,
                     scale_to: int = 250, cfg_scale: float = PAPER["cfg_scale"],
                     cfg_interval_start: float = PAPER["cfg_interval_start"], guidance: str = PAPER["guidance"],
                     shift: float = PAPER["shift"], input_size: int = 16, in_channels: int = 32,
                     num_classes: int = 1000, vae_config: dict | None = None, device: str | None = None,
                     decode: bool = True, tf32: bool = True, seed: int = 0, budget_s: float = 45.0,
                     model_kwargs: dict | None = None, log: Callable[..., None] | None = print,
                     partial_json: str | Path | None = None, profile: bool = False) -> dict:
    """Measure each plan entry; returns {"environment", "settings", "results": [...], "summary"}.

    partial_json: rewritten after every entry with the settings and the results so far (a run killed by a
    timeout keeps what it measured).

    size: a LIGHTNINGDIT_SIZES name, or "custom" with model_kwargs (hidden_size, depth, num_heads, patch_size).
    tf32: TF32 matmuls for the fp32 path (the authors' inference.py turns them on).
    profile: after timing, one more run of each entry's sampler under torch.profiler; its kernel time by
    category (matmul, attention, inductor fusions, ...) and top kernels go in the entry's "profile".
    vae_config: AutoencoderKL kwargs (default: the released f16d32); decode=False skips the decode timing.
    """
    from modeling.lightningdit import LightningDiT, build_lightningdit
    from modeling.guidance import is_guided
    from modeling.sampling import sampling_grid
    from modeling.vavae import VAVAE_F16D32, AutoencoderKL

    log = log or (lambda *_: None)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # the run's settings (what is sampled); each entry adds how it is computed
    base = SamplingConfig(method="euler", steps=steps, shift=shift, cfg_scale=cfg_scale,
                          cfg_interval_start=cfg_interval_start, guidance=guidance).validate()
    entries = [(s, parse_spec(s)) for s in plan]
    torch.manual_seed(seed)
    kw = dict(input_size=input_size, in_channels=in_channels, num_classes=num_classes, **(model_kwargs or {}))
    model = LightningDiT(**kw) if size == "custom" else build_lightningdit(size, **kw)
    model = randomize_weights(model, seed).to(device).eval()
    vae = AutoencoderKL(**(vae_config or VAVAE_F16D32)).to(device).eval() if decode else None
    grid_run = sampling_grid(steps, shift)[:-1]
    grid_full = sampling_grid(scale_to, shift)[:-1]
    guided_run = [is_guided(t, cfg_scale, cfg_interval_start) for t in grid_run]
    guided_full = [is_guided(t, cfg_scale, cfg_interval_start) for t in grid_full]
    scale = forward_units(guided_full) / forward_units(guided_run)
    settings = dict(size=size, input_size=input_size, in_channels=in_channels, num_classes=num_classes,
                    **{k: v for k, v in base.settings().items() if k != "steps"}, steps_run=steps,
                    steps_scaled_to=scale_to, guided_steps_run=f"{sum(guided_run)}/{len(guided_run)}",
                    guided_steps_scaled=f"{sum(guided_full)}/{len(guided_full)}", time_scale=scale,
                    tf32_for_fp32=tf32, weights="random", params=sum(p.numel() for p in model.parameters()),
                    # the model's forward FLOPs x forwards per image on the full grid (a guided step: 2)
                    gflop_per_img=model.flops_per_sample(train=False) * forward_units(guided_full) / 1e9)
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
    g = torch.Generator().manual_seed(seed + 1)  # one noise / label set; every entry uses its first rows
    z_all = torch.randn(max(e.batch for _, e in entries), in_channels, input_size, input_size, generator=g)
    y_all = torch.randint(0, num_classes, (len(z_all),), generator=g)
    results, fp32_out, start = [], {}, time.time()
    try:
        for spec, entry in entries:
            batch, cfg = entry.batch, entry.config(base)
            if time.time() - start > budget_s:
                results.append({"spec": spec, "batch": batch, "skipped": f"not started: {budget_s:.0f} s budget used"})
                log(f"[sample_speed] {spec}: skipped (budget)")
                continue
            z, y = z_all[:batch].to(device), y_all[:batch].to(device)
            res = {"spec": spec, "batch": batch}
            try:
                res.update(_measure_one(model, vae, z, y, cfg, entry.kernels, scale, device, profile))
            except Exception as e:  # noqa: BLE001 -- one path failing (compile, OOM, refusal) must not stop the rest
                res["error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
                log(f"[sample_speed] {spec}: {res['error']}")
                results.append(res)
                _write_partial(partial_json, settings, results)
                continue
            out = res.pop("_out")
            if cfg.precision == "fp32" and cfg.compile == "none":
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
    # after the entries ran: kernels_ran says which implementation each op used (last entry's, per op)
    return {"environment": environment(device), "settings": settings, "results": results, "summary": summary}


def _write_partial(path, settings, results):
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({"partial": True, "settings": settings, "results": results}, indent=1,
                                         default=str))


def _measure_one(model, vae, z, y, cfg, backend, scale, device, profile=False):
    """_measure_with under the entry's kernels backend (restored after); the row records the implementation
    each op ran (set_backend starts that record afresh, so it is read before the restore)."""
    import kernels
    previous = kernels.get_backend()
    if backend:
        kernels.set_backend(backend)
    try:
        res = _measure_with(model, vae, z, y, cfg, scale, device, profile)
        res["kernels_ran"] = dict(kernels.describe().get("ops", {}))
    finally:
        if backend:
            kernels.set_backend(previous)
    res["kernels_backend"] = backend or previous
    return res


def _make_sampler(model, cfg, device):
    from modeling.sampling import Sampler
    return Sampler(model, cfg, device=device)


def _measure_with(model, vae, z, y, cfg, scale, device, profile):
    from modeling.sampling import decode_images
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    sampler = _make_sampler(model, cfg, device)
    t0 = time.time()
    if cfg.compile == "none" and sampler.describe()["cudagraphs"] == "off":
        _make_sampler(model, cfg.replace(steps=3), device)(z, y)  # eager: a short run pays first-call costs
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
        res["profile"] = {"per": f"one {cfg.steps}-point run at batch {n}",
                          **kernel_times(lambda: sampler(z, y), 1, cuda)}
    if vae is not None:
        lat = out[:2]
        decode_images(vae, lat, cfg.precision)  # warm-up
        _sync(device)
        t0 = time.time()
        decode_images(vae, out, cfg.precision)
        _sync(device)
        res["decode_s"] = time.time() - t0
        res["img_per_s_with_decode"] = n / (run_s * scale + res["decode_s"])
    if cuda:
        res["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    del sampler
    res["_out"] = out.float().cpu()
    return res


def main(argv: list[str] | None = None) -> dict:
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
