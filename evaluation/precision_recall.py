"""Improved precision and recall (Kynkaanniemi et al. 2019) as the ADM evaluator's ManifoldEstimator.

Each set's manifold is the union of balls around its points with radius = squared distance to the
k-th nearest neighbour (k = 3; the point itself is neighbour 0). Precision = fraction of samples
inside the reference manifold, recall = fraction of references inside the sample manifold.
Distances are squared Euclidean ||u||^2 - 2 u.v + ||v||^2 clamped at 0, computed in blocks so 50k
x 50k never sits in memory. ADM computes the block in fp16 (fp32 if that overflows); we use fp32.
The registry's `precision_recall` metric (evaluation.metrics) is PrecisionRecall at the end.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch


def _pairwise_sq_dists(u, v):
    nu = (u * u).sum(1, keepdim=True)
    nv = (v * v).sum(1, keepdim=True).t()
    return (nu - 2 * u @ v.t() + nv).clamp_min(0.0)


def _bar(total, desc, progress):
    from modeling.progress import progress as progress_bar  # (a bar on a terminal, lines in a log file)
    return progress_bar(total, desc, "block", enabled=progress, leave=False)


def manifold_radii(features: Any, k: int = 3, row_batch: int = 10000, col_batch: int = 10000, device: Any = "cpu",
                   progress: bool = False) -> torch.Tensor:
    """Squared distance of each point to its k-th nearest neighbour in the same set (the ball radii)."""
    f = torch.as_tensor(np.asarray(features), dtype=torch.float32).to(device)
    radii = torch.empty(len(f), device=device)
    rows_total = range(0, len(f), row_batch)
    bar = _bar(len(rows_total), "precision/recall radii", progress)
    for r in rows_total:
        rows = f[r:r + row_batch]
        d = torch.cat([_pairwise_sq_dists(rows, f[c:c + col_batch]) for c in range(0, len(f), col_batch)], 1)
        radii[r:r + row_batch] = d.kthvalue(k + 1, dim=1).values
        bar.update(1)
    bar.close()
    return radii


def precision_recall(ref_features: Any, sample_features: Any, k: int = 3, row_batch: int = 10000,
                     col_batch: int = 10000, device: Any = "cpu", progress: bool = False) -> tuple[float, float]:
    """(precision, recall) of samples against references, ADM's compute_prec_recall (on `device`; kthvalue
    on CUDA and the CPU give the same radii)."""
    ref = torch.as_tensor(np.asarray(ref_features), dtype=torch.float32).to(device)
    sam = torch.as_tensor(np.asarray(sample_features), dtype=torch.float32).to(device)
    if len(ref) <= k or len(sam) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} points per set")
    r_ref = manifold_radii(ref, k, row_batch, col_batch, device, progress)
    r_sam = manifold_radii(sam, k, row_batch, col_batch, device, progress)
    ref_in = torch.zeros(len(ref), dtype=torch.bool, device=device)  # ref inside the sample manifold -> recall
    sam_in = torch.zeros(len(sam), dtype=torch.bool, device=device)  # sample inside the ref manifold -> precision
    rows = range(0, len(ref), row_batch)
    bar = _bar(len(rows), "precision/recall", progress)
    for i in rows:
        for j in range(0, len(sam), col_batch):
            d = _pairwise_sq_dists(ref[i:i + row_batch], sam[j:j + col_batch])
            ref_in[i:i + row_batch] |= (d <= r_sam[None, j:j + col_batch]).any(1)
            sam_in[j:j + col_batch] |= (d <= r_ref[i:i + row_batch, None]).any(0)
        bar.update(1)
    bar.close()
    return float(sam_in.double().mean()), float(ref_in.double().mean())


class PrecisionRecall:
    """Improved precision / recall of the samples' Inception pool3 features against the reference images'."""
    name = "precision_recall"
    needs = ("features", "reference", "reference_features")
    outputs = ("precision", "recall")

    def unavailable(self, inputs: Any) -> Optional[str]:
        if inputs.reference.get("pool_features") is None:
            return "the reference has no images (stored statistics only)"
        if min(len(inputs.reference["pool_features"]), len(inputs.sample_features()["pool"])) <= 3:
            return "k = 3 nearest neighbours need more than 3 samples and 3 reference images"
        return None

    def compute(self, inputs: Any) -> dict[str, float]:
        p, r = precision_recall(inputs.reference["pool_features"], inputs.sample_features()["pool"],
                                device=inputs.device, progress=inputs.progress)
        return {"precision": p, "recall": r}
