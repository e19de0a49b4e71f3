"""Tokenizer (VA-VAE) reconstruction metrics: PSNR, SSIM, LPIPS, rFID.

The VA-VAE reconstructs each image from a draw of its posterior (seeded), as the authors' evaluate_tokenizer.py
(`posterior.sample()`), or from its mean (`--posterior mode`: deterministic); the registry's paired metrics
(evaluation.metrics, defined in evaluation.paired_metrics: psnr, ssim, lpips, rfid) then score the reconstructions
against the originals, with one Inception pass per set shared by rFID. PSNR and SSIM are per image on uint8 pixels,
then averaged; LPIPS is modeling.lpips (VGG v0.1) on [-1, 1] images; rFID is the Frechet distance between Inception
pool3 statistics of the originals and of their reconstructions.

CLI: python -m evaluation.tokenizer_metrics VAE IMAGES.npz [--limit N] [--no-lpips] [--no-rfid] [--posterior mode]
(VAE: our folder, a hub repo id, or a tokenizer .pt such as the released vavae-imagenet256-f16d32-dinov2.pt
or a trainer's tokenizer.pt; IMAGES.npz arr_0 = uint8 (N, H, W, 3)). A malformed npz is one line naming it,
exit status 2.
"""
from __future__ import annotations

import json
from typing import Any, Callable, Optional

import numpy as np
import torch

from modeling.config import ConfigError, console_entry

from .metrics import TOKENIZER_METRICS, EvalInputs, compute_metrics
from .paired_metrics import psnr, ssim  # noqa: F401  (their home is paired_metrics; importable from here too)


@torch.no_grad()
def reconstruction_metrics(vae: Any, images: Any, batch_size: int = 16, device: Any = "cpu",
                           lpips: Optional[Callable] = None, inception: Optional[Callable] = None,
                           progress: bool = True, posterior: str = "sample",
                           seed: int = 0) -> tuple[dict[str, Any], np.ndarray]:
    """Metrics of vae's reconstructions of uint8 images (N, H, W, 3): from a posterior draw (`posterior="sample"`,
    the authors' evaluation; noise from `seed`, the same for any batch size) or its mean ("mode").

    lpips: a modeling.lpips.LPIPS or None (not computed); inception: an evaluation.inception model (or any
    callable uint8 (B, H, W, 3) tensor -> {"pool": (B, D)}) or None (no rFID). Returns a dict of floats (and
    the number of images) and the reconstructions, uint8.
    """
    from modeling.progress import tracked

    from .adm_metrics import compute_activations

    if posterior not in ("sample", "mode"):
        raise ConfigError(f"posterior must be 'sample' or 'mode', got {posterior!r}")
    vae = vae.eval().to(device)
    images = np.asarray(images)
    recons = []
    for i in tracked(range(0, len(images), batch_size), "tokenizer metrics", "batch", enabled=progress):
        real = torch.as_tensor(images[i:i + batch_size]).to(device)
        x = real.permute(0, 3, 1, 2).float() / 127.5 - 1.0
        dist = vae.encode(x)
        if posterior == "mode":
            z = dist.mode()
        else:  # one generator per image: its draw does not depend on the batch it falls in, and (seed, image)
            #    pairs are mixed (seed + index would make seed 1 the seed-0 draws shifted by one image)
            noise = torch.stack([torch.randn(dist.mean.shape[1:], generator=torch.Generator().manual_seed(
                int(np.random.SeedSequence([seed, i + j]).generate_state(1)[0]))) for j in range(len(x))])
            z = dist.mean + dist.std * noise.to(dist.mean)
        recons.append(vae.decode_to_images(z).cpu())
    recons = torch.cat(recons).numpy()
    names = [n for n in TOKENIZER_METRICS
             if (n != "lpips" or lpips is not None) and (n != "rfid" or inception is not None)]
    feature_fn = None
    if inception is not None:
        def feature_fn(batch: np.ndarray) -> dict:  # the same batches as the reconstruction loop
            return compute_activations(inception, batch, batch_size, device)
    inputs = EvalInputs(images=recons, originals=images, feature_fn=feature_fn, device=device, batch_size=batch_size,
                        extras={"lpips": lpips} if lpips is not None else {}, images_source="the reconstructions")
    out: dict[str, Any] = compute_metrics(names, inputs, "tokenizer metrics")
    out["num_images"], out["posterior"] = int(len(images)), posterior
    if inputs.skipped:  # e.g. SSIM on images smaller than its 11x11 window
        out["skipped"] = dict(inputs.skipped)
    return out, recons


def main(argv: Optional[list[str]] = None) -> int:
    from modeling import AutoencoderKL
    from modeling.config import cli_parser, user_errors

    from .batches import read_image_batch

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
    p.add_argument("--posterior", choices=("sample", "mode"), default="sample",
                   help="reconstruct from a posterior draw (the authors' evaluation) or from its mean")
    p.add_argument("--seed", type=int, default=0, help="the posterior draws' seed")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    a = p.parse_args(argv)
    with user_errors(a.debug, out_of_memory=f"lower --batch-size (now {a.batch_size})"):
        if a.batch_size < 1 or (a.limit is not None and a.limit < 1):
            raise ConfigError(f"--batch-size {a.batch_size} / --limit {a.limit}: each must be at least 1")
        if str(a.device).startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"--device {a.device}: no CUDA device here (use --device cpu)")
        # the images first: a malformed npz is refused before the VAE and the networks load
        need = 1 if a.no_rfid else 2
        images = read_image_batch(a.images_npz, "images", min_images=need,
                                  why="rFID statistics (or pass --no-rfid)" if need == 2 else "the metrics")
        if a.limit is not None and a.limit < need:
            raise ConfigError(f"--limit {a.limit}: rFID statistics need at least 2 images (or pass --no-rfid)")
        images = images[: a.limit]
        if a.json:  # before minutes of metrics, as fid's
            from pathlib import Path
            if Path(a.json).is_dir() or not Path(a.json).resolve().parent.is_dir():
                raise ConfigError(f"--json {a.json}: a folder, or in a folder that does not exist")
        try:
            vae = AutoencoderKL.from_pretrained(a.vae)
        except (ValueError, RuntimeError) as e:
            raise ConfigError(f"{a.vae}: {' '.join(str(e).split())}") from None
        f = vae.downsample_factor
        if images.shape[1] % f or images.shape[2] % f:
            raise ConfigError(f"{a.images_npz}: images of {images.shape[1]}x{images.shape[2]} px; this tokenizer "
                              f"needs sides that are multiples of {f}")
        lp = None
        if not a.no_lpips:
            from modeling.lpips import LPIPS
            lp = LPIPS().to(a.device)
        inc = None
        if not a.no_rfid:
            from .inception import load_inception
            inc, backend = load_inception(a.inception, device=a.device)
            print(f"inception: {backend}")
        res, _ = reconstruction_metrics(vae, images, a.batch_size, a.device, lp, inc, posterior=a.posterior,
                                        seed=a.seed)
        print(json.dumps(res, indent=2))
        if a.json:
            with open(a.json, "w") as f:
                json.dump(res, f, indent=2)
    return 0


cli = console_entry(__name__)  # the `vavae-tokenizer-metrics` console script (setup.py)

if __name__ == "__main__":
    raise SystemExit(main())
