"""PIL image transforms with the reference's exact arithmetic.

- `center_crop_arr`: the ADM center crop LightningDiT's extraction uses (BOX halving while the short side
  is >= 2x the target, BICUBIC to the target short side, center crop with floor offsets).
- `resize_shorter_random_crop`: the VA-VAE training view, as the authors' (albumentations SmallestMaxSize +
  RandomCrop: short side to `size` by OpenCV's bilinear, random `size` crop, no flip unless asked), with the
  randomness passed in so a loader can seed it per sample.
- `to_tensor`: uint8 HWC -> float CHW in [-1, 1] = Normalize(0.5, 0.5) after ToTensor.
"""
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image


# Bounds checked from the header, before any pixel is decoded: a 60 KB file of 1 x 20000 pixels would otherwise
# be resized to 256 x 5,120,000 (3.4 GB) by the center crop. `python -m train.data scan --max-pixels/--max-aspect`.
MAX_PIXELS = 89_478_485   # PIL's own decompression-bomb threshold (Image.MAX_IMAGE_PIXELS)
MAX_ASPECT = 10.0         # long side / short side


class ImageRejected(ValueError):
    """An image outside the size bounds (too many pixels, too elongated); the message names the file."""


def check_size(size: tuple[int, int], max_pixels: int = MAX_PIXELS, max_aspect: float = MAX_ASPECT) -> Optional[str]:
    """None if a (w, h) image is within the bounds, else the reason."""
    w, h = size
    if w < 1 or h < 1:
        return f"empty image ({w} x {h})"
    if max_pixels and w * h > max_pixels:
        return f"{w} x {h} = {w * h} pixels > max_pixels {max_pixels}"
    if max_aspect and max(w, h) > max_aspect * min(w, h):
        return f"{w} x {h}: aspect ratio {max(w, h) / min(w, h):.1f} > max_aspect {max_aspect:g}"
    return None


def require_regular_file(path: Union[str, Path]) -> None:
    """ImageRejected naming `path` unless it is a regular file (or a link to one): a FIFO named x.jpg would
    block the reader forever, a dangling link or a device is no image."""
    from modeling.safe_load import describe_path
    reason = describe_path(path)
    if reason is not None:
        raise ImageRejected(f"{path} {reason}")


def to_rgb(im: Image.Image, path: Union[str, Path] = "") -> Image.Image:
    """A decoded PIL image as 8-bit RGB, with high bit depths scaled rather than clipped: 16-bit grayscale
    ("I;16", a 16-bit PNG or TIFF) maps 0..65535 to 0..255 (PIL's own convert clips it: nearly all white);
    float ("F", a float32 TIFF) in [0, 1] maps to 0..255 (convert would give nearly all black). Modes whose
    range cannot be known (32-bit integers outside a PNG, floats outside [0, 1]) are refused (ImageRejected
    naming the file and the mode). 16-bit RGB(A) PNGs arrive as 8-bit RGB(A) from PIL already."""
    mode = im.mode
    if mode.startswith("I;16") or (mode == "I" and im.format == "PNG"):  # older PIL opens 16-bit PNGs as "I"
        a = np.asarray(im).astype(np.int64)
        if a.min() < 0 or a.max() > 65535:
            raise ImageRejected(f"{path}: mode {mode} values {a.min()}..{a.max()} are not 16-bit")
        return Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        a = np.asarray(im, dtype=np.float32)
        lo, hi = float(np.min(a)), float(np.max(a))
        if not (np.isfinite(a).all() and lo >= 0.0 and hi <= 1.0):
            raise ImageRejected(f"{path}: mode F (32-bit float) values {lo:g}..{hi:g} are not in [0, 1]; "
                                "convert it to an 8-bit image")
        return Image.fromarray(np.round(a * 255.0).astype(np.uint8), "L").convert("RGB")
    if mode in ("I", "I;32", "I;32B", "I;32L") or mode.startswith("F;"):
        raise ImageRejected(f"{path}: mode {mode} ({im.format or 'unknown format'}) has no known value range; "
                            "convert it to an 8-bit image")
    return im.convert("RGB")


def open_rgb(path: Union[str, Path], max_pixels: int = MAX_PIXELS, max_aspect: float = MAX_ASPECT) -> Image.Image:
    """Decode to RGB; ImageRejected (naming the file) before decoding when outside the size bounds, when the
    path is no regular file, or for a mode whose range is unknown (see to_rgb)."""
    require_regular_file(path)
    with Image.open(path) as im:
        reason = check_size(im.size, max_pixels, max_aspect)
        if reason:
            raise ImageRejected(f"{path}: {reason}")
        return to_rgb(im, path)


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM / LightningDiT center crop -> uint8 array (image_size, image_size, 3)."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size]


def resize_bilinear(arr: np.ndarray, width: int, height: int) -> np.ndarray:
    """uint8 (H, W, 3) -> (height, width, 3) as OpenCV's INTER_LINEAR (what albumentations' resize calls): bilinear
    on half-pixel centres, edges clamped, no antialiasing when shrinking; in float32 and rounded half up, where
    OpenCV's fixed point (11-bit weights) can differ by one level."""
    x = torch.from_numpy(np.array(arr)).permute(2, 0, 1)[None].float()  # a copy: PIL's array is read-only
    x = torch.nn.functional.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=False)
    return x[0].permute(1, 2, 0).add_(0.5).floor_().clamp_(0, 255).to(torch.uint8).numpy()


def resize_shorter_random_crop(pil_image: Image.Image, size: int, u_x: float, u_y: float, flip: bool) -> np.ndarray:
    """The reference's VA-VAE training view (taming/data/base.py ImagePaths: SmallestMaxSize, RandomCrop): short
    side -> size (resize_bilinear: their filter; this was an antialiased bicubic until 2026-12-05), crop at
    fractions (u_x, u_y) of the slack, optional mirror (theirs has none)."""
    w, h = pil_image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    arr = resize_bilinear(np.asarray(pil_image), nw, nh)
    x0, y0 = round(u_x * (nw - size)), round(u_y * (nh - size))  # DALI's crop_pos convention
    arr = arr[y0: y0 + size, x0: x0 + size]
    return arr[:, ::-1] if flip else arr


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [-1, 1], exactly (x / 255 - 0.5) / 0.5."""
    x = torch.from_numpy(np.array(arr)).permute(2, 0, 1).float().div_(255.0)
    return x.sub_(0.5).div_(0.5)
