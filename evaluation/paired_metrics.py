"""Metrics of images against their paired originals (a tokenizer's reconstructions): PSNR, SSIM, LPIPS, rFID.

PSNR and SSIM are per image on uint8 pixels (data range 255), then averaged. SSIM is Wang et al.'s
with an 11x11 Gaussian window (sigma 1.5), K1 0.01, K2 0.03, population covariances, averaged over
the valid (unpadded) region and the channels -- skimage's structural_similarity(gaussian_weights=True,
sigma=1.5, use_sample_covariance=False) and torchmetrics' SSIM. LPIPS is modeling.lpips (VGG v0.1)
on [-1, 1] images. rFID is the Frechet distance between Inception pool3 statistics of the originals
and of their reconstructions.

The registry's metrics `psnr`, `ssim`, `lpips` and `rfid` (evaluation.metrics) are the classes at the end; they
read `images` (the reconstructions) and `originals` (image i reconstructs original i).
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .adm_metrics import FIDStatistics


def _as_float_nchw(images):
    x = torch.as_tensor(images)
    if x.dtype == torch.uint8:
        x = x.permute(0, 3, 1, 2)
    return x.double()


def psnr(a: Any, b: Any, data_range: float = 255.0) -> torch.Tensor:
    """Per-image PSNR (B,) for uint8 (B, H, W, 3) or float (B, 3, H, W) images."""
    x, y = _as_float_nchw(a), _as_float_nchw(b)
    mse = ((x - y) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(data_range ** 2 / mse)


def _gaussian_window(size=11, sigma=1.5, dtype=torch.float64):
    g = torch.exp(-((torch.arange(size, dtype=dtype) - (size - 1) / 2) ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(a: Any, b: Any, data_range: float = 255.0, win_size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (B,), Gaussian window, valid region only."""
    x, y = _as_float_nchw(a), _as_float_nchw(b)
    c = x.shape[1]
    if min(x.shape[-2:]) < win_size:
        raise ValueError(f"SSIM needs images of at least {win_size}x{win_size}, got {tuple(x.shape[-2:])}")
    w = _gaussian_window(win_size, sigma).to(x)[None, None].repeat(c, 1, 1, 1)

    def filt(t):
        return F.conv2d(t, w, groups=c)

    mx, my = filt(x), filt(y)
    vx, vy, cxy = filt(x * x) - mx ** 2, filt(y * y) - my ** 2, filt(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.flatten(2).mean(2).mean(1)


def ssim_torchmetrics(preds: torch.Tensor, target: torch.Tensor, data_range: tuple[float, float] = (-1.0, 1.0)
                      ) -> torch.Tensor:
    """Per-image SSIM (B,) of float (B, C, H, W) images as torchmetrics' StructuralSimilarityIndexMeasure(
    data_range=(lo, hi)) computes it (versions 1.4.2 and later; the authors' evaluate_tokenizer.py, unpinned, ran one
    of them in 2025): both images clamped to the range, NOT shifted to it (on [-1, 1] the luminance term is taken
    around 0, not mid-grey), C1 = (0.01 (hi - lo))^2, C2 = (0.03 (hi - lo))^2, the 11x11 Gaussian (sigma 1.5) over
    the images reflect-padded by 5, variances clamped at 0, and the mean over every pixel of the full image (the
    padded border included) and the channels. In float64 (theirs ran float32: ~1e-7 apart)."""
    lo, hi = data_range
    x = preds.double().clamp(lo, hi)
    y = target.double().clamp(lo, hi)
    c = x.shape[1]
    pad = 5
    if min(x.shape[-2:]) <= pad:  # reflect padding needs more pixels than the pad
        raise ValueError(f"SSIM (torchmetrics) needs images larger than {pad}x{pad}, got {tuple(x.shape[-2:])}")
    x, y = (F.pad(t, (pad, pad, pad, pad), mode="reflect") for t in (x, y))
    w = _gaussian_window(2 * pad + 1, 1.5).to(x)[None, None].repeat(c, 1, 1, 1)

    def filt(t):
        return F.conv2d(t, w, groups=c)

    mx, my = filt(x), filt(y)
    vx, vy = (filt(x * x) - mx ** 2).clamp_min(0.0), (filt(y * y) - my ** 2).clamp_min(0.0)
    cxy = filt(x * y) - mx * my
    c1, c2 = (0.01 * (hi - lo)) ** 2, (0.03 * (hi - lo)) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


# ----------------------------------------------------------------------------- the registry's metrics

def _per_image_mean(fn, inputs: Any) -> float:
    """Mean over all images of a per-image score, in chunks of inputs.batch_size (a 50k set never sits in memory
    as float64 at once)."""
    b, parts = inputs.batch_size, []
    for i in range(0, len(inputs.images), b):
        parts.append(fn(torch.as_tensor(inputs.originals[i:i + b]), torch.as_tensor(inputs.images[i:i + b])))
    return float(torch.cat(parts).mean())


class PSNR:
    """Peak signal-to-noise ratio (dB) of each image against its original, averaged."""
    name = "psnr"
    needs = ("images", "originals")
    outputs = ("psnr",)

    def compute(self, inputs: Any) -> dict[str, float]:
        return {"psnr": _per_image_mean(psnr, inputs)}


class SSIM:
    """Structural similarity (Gaussian window 11, sigma 1.5) of each image against its original, averaged."""
    name = "ssim"
    needs = ("images", "originals")
    outputs = ("ssim",)

    def unavailable(self, inputs: Any) -> Optional[str]:
        h, w = inputs.images.shape[1:3]
        return f"SSIM's 11x11 window needs images of at least 11x11, these are {h}x{w}" if min(h, w) < 11 else None

    def compute(self, inputs: Any) -> dict[str, float]:
        return {"ssim": _per_image_mean(ssim, inputs)}


class LPIPSMetric:
    """LPIPS (VGG) distance of each image to its original, averaged; the network is inputs.extras["lpips"]."""
    name = "lpips"
    needs = ("images", "originals", "lpips")
    outputs = ("lpips",)

    @torch.no_grad()
    def compute(self, inputs: Any) -> dict[str, float]:
        net, b, parts = inputs.extras["lpips"], inputs.batch_size, []
        for i in range(0, len(inputs.images), b):
            x = torch.as_tensor(inputs.originals[i:i + b]).to(inputs.device).permute(0, 3, 1, 2).float() / 127.5 - 1
            y = torch.as_tensor(inputs.images[i:i + b]).to(inputs.device).permute(0, 3, 1, 2).float() / 127.5 - 1
            parts.append(net(x, y).flatten().cpu().double())
        return {"lpips": float(torch.cat(parts).mean())}


class RFID:
    """rFID: Frechet distance of Inception pool3 features, reconstructions vs their originals."""
    name = "rfid"
    needs = ("features", "original_features")
    outputs = ("rfid",)

    def compute(self, inputs: Any) -> dict[str, float]:
        rec = FIDStatistics.from_features(inputs.sample_features()["pool"])
        return {"rfid": rec.frechet_distance(FIDStatistics.from_features(inputs.original_features()["pool"]))}
