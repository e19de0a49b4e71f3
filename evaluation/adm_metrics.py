"""FID, sFID and Inception Score as the ADM evaluator computes them, with a robust Frechet distance.

FID = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)). The ADM evaluator takes the matrix
square root with scipy.linalg.sqrtm, which on nearly singular covariances can return garbage or
fail (an FID of 20 instead of 2). Here tr((S1 S2)^(1/2)) = tr((A S2 A)^(1/2)) with A = S1^(1/2):
A S2 A is symmetric positive semi-definite, so two float64 `eigh` calls give it exactly, and
tiny negative eigenvalues from rounding are clipped to zero. `method="adm"` runs the
evaluator's scipy path (with its eps-offset retry and its imaginary-component check) for comparison; what sqrtm
returns depends on the scipy version: on rank-deficient covariances (fewer samples than 2048 features) the
scipy of ADM's time (1.11) raised "Imaginary component" where 1.17 returns the eigh value. On full-rank 10k x 2048
covariances the two methods agree within 5e-8 relative (a review, 2026-12-06).

The metrics `fid`, `sfid` and `inception_score` of the registry (evaluation.metrics) are the classes at the
end; `python -m evaluation.fid` is the command.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
from scipy import linalg

from modeling.config import ConfigError


@dataclass
class FIDStatistics:
    """Mean and covariance of a set of features (one side of a Frechet distance)."""
    mu: np.ndarray
    sigma: np.ndarray

    @classmethod
    def from_features(cls, features: Any) -> "FIDStatistics":
        """Mean and unbiased covariance (np.cov, rowvar=False), as the ADM evaluator."""
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or f.shape[0] < 2:
            raise ValueError(f"need (N >= 2, D) features, got shape {f.shape}")
        return cls(f.mean(axis=0), np.cov(f, rowvar=False))

    def frechet_distance(self, other: "FIDStatistics", method: str = "eigh", eps: float = 1e-6) -> float:
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma, method=method, eps=eps)


def _psd_sqrt(s):
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((S1 S2)^(1/2)) for symmetric PSD S1, S2, in float64 via the symmetric form."""
    s1 = np.asarray(sigma1, dtype=np.float64)
    s2 = np.asarray(sigma2, dtype=np.float64)
    a = _psd_sqrt((s1 + s1.T) / 2)
    m = a @ s2 @ a
    w = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(w, 0.0, None)).sum())


def _adm_trace_sqrt(sigma1, sigma2, eps):
    """The ADM evaluator's code path (scipy sqrtm, eps on the diagonal if not finite)."""
    covmean = linalg.sqrtm(sigma1.dot(sigma2))  # ADM's disp=False is deprecated; same result
    if not np.isfinite(covmean).all():
        warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(np.trace(covmean))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     method: str = "eigh", eps: float = 1e-6) -> float:
    """Frechet distance of two Gaussians; method "eigh" (robust, default) or "adm" (scipy sqrtm)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    if method == "eigh":
        tr_covmean = trace_sqrt_product(sigma1, sigma2)
    elif method == "adm":
        tr_covmean = _adm_trace_sqrt(sigma1, sigma2, eps)
    else:
        raise ValueError(f"unknown method {method!r}; use 'eigh' or 'adm'")
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def inception_score(logits: Any, split_size: int = 5000) -> float:
    """ADM / improved-GAN IS: mean over splits of exp(E_x KL(p(y|x) || p(y)))."""
    preds = torch.softmax(torch.as_tensor(logits, dtype=torch.float64), dim=1).numpy()
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i:i + split_size]
        kl = part * (np.log(part) - np.log(np.mean(part, 0, keepdims=True)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def compute_activations(model: Callable[[torch.Tensor], dict], images: Any, batch_size: int = 64,
                        device: Any = "cpu", progress: Any = None) -> dict[str, np.ndarray]:
    """uint8 images (N, H, W, 3) -> float64 numpy pool / spatial / logits, each where the model gives it.

    model: the evaluator's Inception (evaluation.inception) or any callable uint8 (B, H, W, 3) tensor -> dict of
    (B, D) tensors. progress: a tqdm bar to advance, or None."""
    outs: dict[str, list] = {"pool": [], "spatial": [], "logits": []}
    for i in range(0, len(images), batch_size):
        o = model(torch.from_numpy(np.asarray(images[i:i + batch_size])).to(device))
        for k in outs:
            if o.get(k) is not None:
                outs[k].append(o[k].double().cpu().numpy())
        if progress is not None:
            progress.update(min(batch_size, len(images) - i))
    return {k: np.concatenate(v) for k, v in outs.items() if v}


# ----------------------------------------------------------------------------- the registry's metrics
# Each reads an evaluation.metrics.EvalInputs (duck-typed: this module does not import the registry).

def _against_reference(stats: FIDStatistics, ref: FIDStatistics, inputs: Any, what: str) -> float:
    if stats.mu.shape != ref.mu.shape:  # e.g. a reference made with another feature network
        raise ConfigError(f"reference batch {inputs.reference.get('source', '')}: {what} statistics have "
                          f"{ref.mu.shape[0]} dimensions, the samples' features {stats.mu.shape[0]}")
    return stats.frechet_distance(ref)


class FID:
    """FID: Frechet distance of Inception pool3 features, samples vs the reference batch (ADM's number)."""
    name = "fid"
    needs = ("features", "reference")
    outputs = ("fid",)

    def compute(self, inputs: Any) -> dict[str, float]:
        pool = FIDStatistics.from_features(inputs.sample_features()["pool"])
        return {"fid": _against_reference(pool, inputs.reference["pool"], inputs, "pool")}


class SFID:
    """sFID: the same on the first 7 channels of mixed_6/conv (spatial features)."""
    name = "sfid"
    needs = ("features", "reference")
    outputs = ("sfid",)

    def unavailable(self, inputs: Any) -> Optional[str]:
        if inputs.reference.get("spatial") is None:
            return "the reference has no spatial statistics"
        if "spatial" not in inputs.sample_features():
            return "the feature network gives no spatial features"
        return None

    def compute(self, inputs: Any) -> dict[str, float]:
        spatial = FIDStatistics.from_features(inputs.sample_features()["spatial"])
        return {"sfid": _against_reference(spatial, inputs.reference["spatial"], inputs, "spatial")}


class InceptionScore:
    """Inception Score of the samples (needs Inception weights with the softmax layer)."""
    name = "inception_score"
    needs = ("features",)
    outputs = ("inception_score",)

    def unavailable(self, inputs: Any) -> Optional[str]:
        if "logits" not in inputs.sample_features():
            from .inception import PT_INCEPTION_NAME
            return ("these Inception weights have no softmax layer (fid-helper port); "
                    f"use {PT_INCEPTION_NAME} for IS")
        return None

    def compute(self, inputs: Any) -> dict[str, float]:
        return {"inception_score": inception_score(inputs.sample_features()["logits"])}
