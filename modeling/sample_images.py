"""Sample images from a LightningDiT checkpoint (released format or ours) and a VA-VAE tokenizer.

    python -m modeling.sample_images --dit lightningdit-xl-imagenet256-800ep.pt --size XL/1 \
        --vae vavae-imagenet256-f16d32-dinov2.pt --stats latents_stats.pt --labels 207 360 387 974 \
        --steps 250 --shift 0.3 --cfg-scale 6.7 --cfg-interval-start 0.125 --out samples.png

The DiT produces normalised latents; they are mapped back with the stored per-channel statistics
(z = x * std / multiplier + mean) before decoding, as the reference does.
"""
import argparse
import math
from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_dit_checkpoint, load_pretrained, load_vavae_checkpoint
from .lightningdit import build_lightningdit
from .sampling import sample
from .vavae import VAVAE_F16D32, AutoencoderKL


def load_dit(path, size=None, input_size=16, in_channels=32, num_classes=1000, weights="ema", **flags):
    """Our format (a directory) or a released checkpoint file (then `size` names the architecture)."""
    path = Path(path)
    if path.is_dir():
        return load_pretrained(path)
    if size is None:
        raise ValueError("a released checkpoint file needs --size (e.g. XL/1) to build the model")
    model = build_lightningdit(size, input_size=input_size, in_channels=in_channels, num_classes=num_classes, **flags)
    return load_dit_checkpoint(path, model, weights)


def load_vae(path, **config):
    path = Path(path)
    if path.is_dir():
        return load_pretrained(path)
    return load_vavae_checkpoint(path, AutoencoderKL(**{**VAVAE_F16D32, **config}))


def load_latent_stats(path, channels):
    if path is None:
        return torch.zeros(1, channels, 1, 1), torch.ones(1, channels, 1, 1)
    stats = torch.load(path, map_location="cpu", weights_only=False)
    return stats["mean"].reshape(1, -1, 1, 1), stats["std"].reshape(1, -1, 1, 1)


@torch.no_grad()
def generate(dit, vae, labels, mean, std, steps=250, shift=0.3, cfg_scale=1.0, cfg_interval_start=0.0,
             guidance="all", method="euler", seed=0, latent_multiplier=1.0, device="cpu"):
    """uint8 images (B, H, W, 3) for class `labels`."""
    dit, vae = dit.to(device).eval(), vae.to(device).eval()
    y = torch.as_tensor(labels, dtype=torch.long, device=device)
    c, s = dit.in_channels, dit.config["input_size"]
    g = torch.Generator(device=device).manual_seed(seed)
    z = torch.randn(len(y), c, s, s, generator=g, device=device)
    x = sample(dit, z, y, steps=steps, method=method, shift=shift, cfg_scale=cfg_scale,
               cfg_interval_start=cfg_interval_start, guidance=guidance, generator=g)
    latents = x * std.to(device) / latent_multiplier + mean.to(device)
    return vae.decode_to_images(latents)


def save_grid(images, path, ncol=None):
    from PIL import Image
    imgs = images.cpu().numpy()
    n, h, w, _ = imgs.shape
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    grid = np.zeros((nrow * h, ncol * w, 3), dtype=np.uint8)
    for i, im in enumerate(imgs):
        r, c = divmod(i, ncol)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = im
    Image.fromarray(grid).save(path)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dit", required=True, help="released .pt or our pretrained directory")
    ap.add_argument("--size", default=None, help="architecture for a released file, e.g. XL/1")
    ap.add_argument("--input-size", type=int, default=16)
    ap.add_argument("--in-channels", type=int, default=32)
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--weights", choices=["ema", "model"], default="ema")
    ap.add_argument("--vae", required=True, help="tokenizer .pt ({'state_dict'}) or our pretrained directory")
    ap.add_argument("--stats", default=None, help="latents_stats.pt (mean/std); omit for unnormalised latents")
    ap.add_argument("--labels", type=int, nargs="+", required=True)
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--method", default="euler", choices=["euler", "heun", "dopri5", "euler_maruyama"])
    ap.add_argument("--shift", type=float, default=0.3)
    ap.add_argument("--cfg-scale", type=float, default=1.0)
    ap.add_argument("--cfg-interval-start", type=float, default=0.0)
    ap.add_argument("--guidance", choices=["all", "reference"], default="all",
                    help="all: standard guidance on every latent channel; reference: the authors' channels 0..2 only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="samples.png")
    a = ap.parse_args(argv)
    dit = load_dit(a.dit, a.size, a.input_size, a.in_channels, a.num_classes, a.weights)
    vae = load_vae(a.vae)
    mean, std = load_latent_stats(a.stats, dit.in_channels)
    images = generate(dit, vae, a.labels, mean, std, a.steps, a.shift, a.cfg_scale, a.cfg_interval_start,
                      a.guidance, a.method, a.seed, device=a.device)
    print(f"wrote {save_grid(images, a.out)} ({len(a.labels)} images, {a.steps}-point {a.method} grid, "
          f"shift {a.shift}, cfg {a.cfg_scale} from t>={a.cfg_interval_start}, guidance={a.guidance})")


if __name__ == "__main__":
    main()
