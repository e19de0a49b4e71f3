"""The embedded default dataset: a class-conditional ImageFolder of JPEG crops of scikit-image's photographs.

A smoke-scale stand-in for ImageNet (14 classes, one per photograph, a few hundred crops), so the main
job and the tests run the real decode path on real JPEGs without a download. Deterministic for a given
(size, per_class, seed). Not committed: `python -m train.data embedded OUT --size 128` writes it.
"""
import logging
import os
from pathlib import Path

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


def write_embedded(out, size=128, per_class=24, seed=0, quality=92):
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
