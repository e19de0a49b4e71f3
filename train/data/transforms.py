"""PIL image transforms with the reference's exact arithmetic.

- `center_crop_arr`: the ADM center crop LightningDiT's extraction uses (BOX halving while the short side
  is >= 2x the target, BICUBIC to the target short side, center crop with floor offsets).
- `resize_shorter_random_crop`: the VA-VAE training view (short side to `size`, random `size` crop,
  random horizontal flip), with the randomness passed in so a loader can seed it per sample.
- `to_tensor`: uint8 HWC -> float CHW in [-1, 1] = Normalize(0.5, 0.5) after ToTensor.
"""
import numpy as np
import torch
from PIL import Image


# Bounds checked from the header, before any pixel is decoded: a 60 KB file of 1 x 20000 pixels would otherwise
# be resized to 256 x 5,120,000 (3.4 GB) by the center crop. `python -m train.data scan --max-pixels/--max-aspect`.
MAX_PIXELS = 89_478_485   # PIL's own decompression-bomb threshold (Image.MAX_IMAGE_PIXELS)
MAX_ASPECT = 10.0         # long side / short side


class ImageRejected(ValueError):
    """An image outside the size bounds (too many pixels, too elongated); the message names the file."""


def check_size(size, max_pixels=MAX_PIXELS, max_aspect=MAX_ASPECT):
    """None if a (w, h) image is within the bounds, else the reason."""
    w, h = size
    if w < 1 or h < 1:
        return f"empty image ({w} x {h})"
    if max_pixels and w * h > max_pixels:
        return f"{w} x {h} = {w * h} pixels > max_pixels {max_pixels}"
    if max_aspect and max(w, h) > max_aspect * min(w, h):
        return f"{w} x {h}: aspect ratio {max(w, h) / min(w, h):.1f} > max_aspect {max_aspect:g}"
    return None


def open_rgb(path, max_pixels=MAX_PIXELS, max_aspect=MAX_ASPECT):
    """Decode to RGB; ImageRejected (naming the file) before decoding when outside the size bounds."""
    with Image.open(path) as im:
        reason = check_size(im.size, max_pixels, max_aspect)
        if reason:
            raise ImageRejected(f"{path}: {reason}")
        return im.convert("RGB")


def center_crop_arr(pil_image, image_size):
    """ADM / LightningDiT center crop -> uint8 array (image_size, image_size, 3)."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size]


def resize_shorter_random_crop(pil_image, size, u_x, u_y, flip):
    """Short side -> size (BICUBIC), crop at fractions (u_x, u_y) of the slack, optional mirror."""
    w, h = pil_image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    arr = np.asarray(pil_image.resize((nw, nh), resample=Image.BICUBIC))
    x0, y0 = round(u_x * (nw - size)), round(u_y * (nh - size))  # DALI's crop_pos convention
    arr = arr[y0: y0 + size, x0: x0 + size]
    return arr[:, ::-1] if flip else arr


def to_tensor(arr):
    """uint8 (H, W, 3) -> float32 (3, H, W) in [-1, 1], exactly (x / 255 - 0.5) / 0.5."""
    x = torch.from_numpy(np.array(arr)).permute(2, 0, 1).float().div_(255.0)
    return x.sub_(0.5).div_(0.5)
