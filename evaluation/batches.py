"""Image batches in the ADM evaluator's npz format, read and checked before any network runs.

A batch is an npz whose `arr_0` is uint8 (N, H, W, 3) RGB pixels (N >= 2 for FID statistics); `arr_1`, when
present, the class of each image. A reference batch (e.g. VIRTUAL_imagenet256_labeled.npz) may also store its
Inception statistics: `mu`, `sigma` (pool3) and `mu_s`, `sigma_s` (spatial), which take precedence over its
images. Anything else (a missing or empty file, no arr_0, float or grayscale pixels, a single image, a truncated
archive, object arrays) is a BatchFileError: one line that names the file, exit status 2 from the commands.
Nothing is unpickled: np.load always runs with allow_pickle=False.
"""
from __future__ import annotations

import os
import zipfile
import zlib
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from modeling.config import ConfigError, one_line

PathLike = Union[str, Path]

# What a damaged or foreign npz raises from numpy / zipfile while it is read.
_READ_ERRORS = (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)


class BatchFileError(ConfigError):
    """An image batch or reference batch cannot be used as given; the message names the file."""


def _open(path: PathLike, role: str) -> np.lib.npyio.NpzFile:
    p = Path(path)
    if not p.exists():
        raise BatchFileError(f"{role} {p}: no such file")
    if not p.is_file():  # a folder, a FIFO (np.load would block on it), a device
        raise BatchFileError(f"{role} {p}: not a regular file")
    if p.stat().st_size == 0:
        raise BatchFileError(f"{role} {p}: empty file (expected an npz with arr_0 = uint8 (N, H, W, 3) images)")
    try:
        z = np.load(p, allow_pickle=False)
    except _READ_ERRORS as e:
        if "pickle" in str(e):  # numpy's message suggests loading it unsafely: we never do
            raise BatchFileError(f"{role} {p}: not an npz archive (numpy would read it as a pickle, which is "
                                 "never loaded)") from None
        if isinstance(e, zipfile.BadZipFile) and _starts_like_zip(p):
            raise BatchFileError(f"{role} {p}: truncated (it starts as an npz archive, but its end, the zip "
                                 f"directory, is missing: {one_line(e)}); copy or write it again") from None
        raise BatchFileError(f"{role} {p}: not a readable npz archive ({one_line(e)})") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise BatchFileError(f"{role} {p}: a single .npy array, not an npz archive "
                             "(write one with np.savez(path, arr_0=images))")
    return z


def _starts_like_zip(p: Path) -> bool:
    with open(p, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def stored_statistics(path: PathLike) -> list[str]:
    """The Inception statistics a batch stores (of mu, sigma, mu_s, sigma_s), for saying that a sample batch's
    are not used: its statistics are computed from its images."""
    if Path(path).is_dir():
        return []
    with _open(path, "batch") as z:
        return [k for k in ("mu", "sigma", "mu_s", "sigma_s") if k in z.files]


def _read(z: np.lib.npyio.NpzFile, key: str, where: str) -> np.ndarray:
    try:
        return z[key]
    except _READ_ERRORS as e:  # a truncated member, a CRC error, an object (pickled) array
        if "allow_pickle" in str(e):
            hint = " (images of different sizes, saved as a list? they must share one size)" if key == "arr_0" else ""
            raise BatchFileError(f"{where}: {key} is an object (pickled) array, which is never loaded; expected "
                                 f"numbers{hint}") from None
        raise BatchFileError(f"{where}: {key} unreadable, the file is truncated or corrupt ({one_line(e)})") from None


def check_images(images: np.ndarray, where: str, min_images: int = 2, why: str = "FID statistics") -> np.ndarray:
    """images must be uint8 (N, H, W, 3) with N >= min_images; returns them unchanged."""
    shape = tuple(images.shape)
    if images.ndim == 3 or (images.ndim == 4 and shape[-1] == 1):
        raise BatchFileError(f"{where}: grayscale images {shape}; expected RGB (N, H, W, 3) "
                             "(repeat the channel three times)")
    if images.ndim != 4 or shape[-1] != 3:
        raise BatchFileError(f"{where}: arr_0 has shape {shape}; expected RGB images (N, H, W, 3)")
    if images.dtype != np.uint8:
        raise BatchFileError(f"{where}: arr_0 is {images.dtype}; expected uint8 pixels 0..255")
    if min(shape[1:3]) < 1:
        raise BatchFileError(f"{where}: images of {shape[1]}x{shape[2]} pixels")
    if shape[0] < min_images:
        raise BatchFileError(f"{where}: {shape[0]} image(s); {why} need at least {min_images}")
    return images


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # ImageFolder's


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)  # ImageFolder's test (a file named ".png" is one)


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            if im.mode not in ("RGB", "L"):  # L: the batch check says grayscale; the rest by their PIL mode
                raise BatchFileError(f"image {path}: PIL mode {im.mode}{_MODES.get(im.mode, '')}; sample images "
                                     "are RGB (as the authors' inference.py saves them)")
            return np.asarray(im)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        if isinstance(e, BatchFileError):
            raise
        raise BatchFileError(f"image {path}: unreadable ({one_line(e)})") from None


_MODES = {"P": " (a palette image)", "RGBA": " (RGB with alpha)", "LA": " (grayscale with alpha)", "1": " (1-bit)",
          "CMYK": " (CMYK)", "I;16": " (16-bit grayscale)", "I": " (32-bit integer)", "F": " (32-bit float)"}


def read_image_folder(path: PathLike, role: str = "sample batch", min_images: int = 2,
                      why: str = "FID statistics") -> np.ndarray:
    """A folder of sample images (the authors' inference.py writes 000000.png, 000001.png, ...), in name order, as
    their tools/save_npz.py stacks them: each image's pixels as they are (RGB of one size; anything else is a
    BatchFileError naming the file), read by a few threads into one uint8 (N, H, W, 3) array."""
    from concurrent.futures import ThreadPoolExecutor
    folder, where = Path(path), f"{role} {path}"
    files = sorted(p for p in folder.iterdir() if is_image_name(p.name) and p.is_file())
    if not files:
        raise BatchFileError(f"{where}: a folder without images ({', '.join(IMAGE_EXTENSIONS)})")
    first = _read_image(files[0])
    check_images(first[None], f"{where} ({files[0].name})", 1)
    out = np.empty((len(files), *first.shape), np.uint8)

    def put(i: int) -> None:
        im = _read_image(files[i])
        if im.shape != first.shape or im.dtype != np.uint8:
            raise BatchFileError(f"{where}: {files[i].name} is {im.dtype} {im.shape}, {files[0].name} {first.dtype} "
                                 f"{first.shape}: a batch is RGB images of one size")
        out[i] = im
    with ThreadPoolExecutor(min(8, len(os.sched_getaffinity(0)))) as pool:
        list(pool.map(put, range(len(files))))
    return check_images(out, where, min_images, why)


def read_image_batch(path: PathLike, role: str = "sample batch", min_images: int = 2,
                     why: str = "FID statistics") -> np.ndarray:
    """arr_0 of an npz batch (or a folder of images: read_image_folder), checked: uint8 (N, H, W, 3),
    N >= min_images."""
    where = f"{role} {path}"
    if Path(path).is_dir():
        return read_image_folder(path, role, min_images, why)
    with _open(path, role) as z:
        if "arr_0" not in z.files:
            raise BatchFileError(f"{where}: no arr_0 (has: {', '.join(z.files) or 'nothing'}); expected "
                                 "arr_0 = uint8 (N, H, W, 3) images")
        return check_images(_read(z, "arr_0", where), where, min_images, why)


def read_batch_labels(path: PathLike, num_images: int, role: str = "sample batch") -> Optional[np.ndarray]:
    """arr_1 (the class of each image, as evaluation.generate writes it) or None when the batch has none (a
    folder of images has none)."""
    where = f"{role} {path}"
    if Path(path).is_dir():
        return None
    with _open(path, role) as z:
        if "arr_1" not in z.files:
            return None
        labels = _read(z, "arr_1", where)
    if labels.shape != (num_images,) or not np.issubdtype(labels.dtype, np.integer):
        raise BatchFileError(f"{where}: arr_1 is {labels.dtype} {tuple(labels.shape)}; expected {num_images} "
                             "integer class labels")
    return labels


def _stats(z: np.lib.npyio.NpzFile, mu_key: str, sigma_key: str, where: str) -> Any:
    from .adm_metrics import FIDStatistics

    if mu_key not in z.files and sigma_key not in z.files:
        return None
    if mu_key not in z.files or sigma_key not in z.files:
        raise BatchFileError(f"{where}: has {mu_key if mu_key in z.files else sigma_key} without "
                             f"{sigma_key if mu_key in z.files else mu_key}")
    mu, sigma = _read(z, mu_key, where), _read(z, sigma_key, where)
    d = mu.shape[0] if mu.ndim == 1 else -1
    if (d < 1 or sigma.shape != (d, d) or not np.issubdtype(mu.dtype, np.floating)
            or not np.issubdtype(sigma.dtype, np.floating)):
        raise BatchFileError(f"{where}: {mu_key} {mu.dtype} {tuple(mu.shape)} / {sigma_key} {sigma.dtype} "
                             f"{tuple(sigma.shape)}; expected float (D,) and (D, D) statistics")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise BatchFileError(f"{where}: {mu_key} / {sigma_key} hold NaN or inf")
    return FIDStatistics(mu, sigma)


def read_reference_batch(path: PathLike, role: str = "reference batch"
                         ) -> tuple[Optional[np.ndarray], Optional[tuple[Any, Optional[Any]]]]:
    """(images uint8 (N, H, W, 3) or None, stored statistics or None) of a reference batch.

    Stored statistics are (pool FIDStatistics, spatial FIDStatistics or None). A reference needs images, or
    stored pool statistics, or both (the ADM files have both: the statistics are used for FID / sFID, the
    images for precision / recall)."""
    where = f"{role} {path}"
    with _open(path, role) as z:
        pool = _stats(z, "mu", "sigma", where)
        spatial = _stats(z, "mu_s", "sigma_s", where)
        if "arr_0" not in z.files:
            if pool is None:
                raise BatchFileError(f"{where}: no arr_0 and no stored statistics (mu, sigma); has: "
                                     f"{', '.join(z.files) or 'nothing'}")
            images = None
        else:
            images = check_images(_read(z, "arr_0", where), where)
    return images, ((pool, spatial) if pool is not None else None)
