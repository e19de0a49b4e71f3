"""Tokenizer (VA-VAE) reconstruction metrics: PSNR, SSIM, LPIPS, rFID.

PSNR and SSIM are per image on uint8 pixels (data range 255), then averaged. SSIM is Wang et al.'s
with an 11x11 Gaussian window (sigma 1.5), K1 0.01, K2 0.03, population covariances, averaged over
the valid (unpadded) region and the channels -- skimage's structural_similarity(gaussian_weights=True,
sigma=1.5, use_sample_covariance=False) and torchmetrics' SSIM. LPIPS is modeling.lpips (VGG v0.1)
on [-1, 1] images. rFID is the Frechet distance between Inception pool3 statistics of the originals
and of their reconstructions.

CLI: python -m evaluation.tokenizer_metrics VAE IMAGES.npz [--limit N] [--no-lpips] [--no-rfid]
(VAE: our folder, a hub repo id, or a tokenizer .pt such as the released vavae-imagenet256-f16d32-dinov2.pt
or a trainer's tokenizer.pt; IMAGES.npz arr_0 = uint8 (N, H, W, 3)).
"""
import json

import numpy as np
import torch
import torch.nn.functional as F
from modeling.config import console_entry


def _as_float_nchw(images):
    x = torch.as_tensor(images)
    if x.dtype == torch.uint8:
        x = x.permute(0, 3, 1, 2)
    return x.double()


def psnr(a, b, data_range=255.0):
    """Per-image PSNR (B,) for uint8 (B, H, W, 3) or float (B, 3, H, W) images."""
    x, y = _as_float_nchw(a), _as_float_nchw(b)
    mse = ((x - y) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(data_range ** 2 / mse)


def _gaussian_window(size=11, sigma=1.5, dtype=torch.float64):
    g = torch.exp(-((torch.arange(size, dtype=dtype) - (size - 1) / 2) ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(a, b, data_range=255.0, win_size=11, sigma=1.5):
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


@torch.no_grad()
def reconstruction_metrics(vae, images, batch_size=16, device="cpu", lpips=None, inception=None, progress=True):
    """Metrics of vae's posterior-mean reconstructions of uint8 images (N, H, W, 3).

    lpips: a modeling.lpips.LPIPS or None (not computed); inception: a evaluation.inception
    model or None (no rFID). Returns a dict of floats (and the reconstructions, uint8).
    """
    from tqdm import tqdm

    from .fid import FIDStatistics

    vae = vae.eval().to(device)
    sums = {"psnr": [], "ssim": [], "lpips": []}
    feats_real, feats_rec, recons = [], [], []
    for i in tqdm(range(0, len(images), batch_size), desc="tokenizer metrics", disable=not progress):
        real = torch.as_tensor(np.asarray(images[i:i + batch_size])).to(device)
        x = real.permute(0, 3, 1, 2).float() / 127.5 - 1.0
        rec = vae.decode_to_images(vae.encode(x).mode())
        sums["psnr"].append(psnr(real.cpu(), rec.cpu()))
        sums["ssim"].append(ssim(real.cpu(), rec.cpu()))
        if lpips is not None:
            xr = rec.permute(0, 3, 1, 2).float() / 127.5 - 1.0
            sums["lpips"].append(lpips(x, xr).flatten().cpu().double())
        if inception is not None:
            feats_real.append(inception(real)["pool"].double().cpu())
            feats_rec.append(inception(rec)["pool"].double().cpu())
        recons.append(rec.cpu())
    out = {k: float(torch.cat(v).mean()) for k, v in sums.items() if v}
    if inception is not None:
        fr, fc = torch.cat(feats_real).numpy(), torch.cat(feats_rec).numpy()
        out["rfid"] = FIDStatistics.from_features(fc).frechet_distance(FIDStatistics.from_features(fr))
    out["num_images"] = int(len(images))
    return out, torch.cat(recons).numpy()


def main(argv=None):
    from modeling import AutoencoderKL

    from modeling.config import cli_parser

    p = cli_parser("evaluation.tokenizer_metrics", __doc__)
    p.add_argument("vae", help="our folder, a hub repo id, or a tokenizer .pt ({'state_dict'})")
    p.add_argument("images_npz")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--inception", default=None)
    p.add_argument("--no-lpips", action="store_true")
    p.add_argument("--no-rfid", action="store_true")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    try:
        vae = AutoencoderKL.from_pretrained(a.vae)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        p.exit(2, f"error: {' '.join(str(e).split())}\n")
    with np.load(a.images_npz) as z:
        images = z["arr_0"][: a.limit]
    lp = None
    if not a.no_lpips:
        from modeling.lpips import LPIPS
        lp = LPIPS().to(a.device)
    inc = None
    if not a.no_rfid:
        from .inception import load_inception
        inc, backend = load_inception(a.inception, device=a.device)
        print(f"inception: {backend}")
    res, _ = reconstruction_metrics(vae, images, a.batch_size, a.device, lp, inc)
    print(json.dumps(res, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)



cli = console_entry(__name__)  # the `vavae-tokenizer-metrics` console script (setup.py)

if __name__ == "__main__":
    main()
