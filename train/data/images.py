"""Image loaders for VA-VAE training and latent extraction: PIL (exact) or DALI (GPU or CPU decoding).

Both backends read the same `FileList` in the same order (`EpochSampler`), with the same flips and crop
positions drawn per sample from (seed, epoch, index), and yield (images float32 (B, 3, S, S) in [-1, 1],
labels int64 (B,)). Views:
- "center": the reference's extraction view. PIL: ADM `center_crop_arr` exactly. DALI: bicubic
  antialiased resize of the short side + center crop, which is close but not bit-equal (docs/data.md).
- "train": the VA-VAE training view, the reference's: short side -> S (OpenCV's bilinear), random S x S crop; a
  horizontal flip only with flip_prob > 0 (the reference has none).
`build_image_loader(..., backend="auto")` picks DALI when installed, else PIL, and logs which ran.
"""
import logging
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from .files import FileList
from .sampler import VIEWS, EpochSampler, ResumableLoader, crop_params  # noqa: F401  (VIEWS, crop_params: re-exported)
from .transforms import center_crop_arr, open_rgb, resize_shorter_random_crop, to_tensor

log = logging.getLogger(__name__)


class ImageDataset(Dataset):
    """PIL decode + view of file i. Key: (index, epoch, flip); the crop position is seeded by the key."""

    def __init__(self, files: FileList, size: int, view: str = "center", seed: int = 0) -> None:
        if view not in VIEWS:
            raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
        self.files, self.size, self.view, self.seed = files, size, view, seed

    def __len__(self):
        return len(self.files)

    def __getitem__(self, key):
        index, epoch, flip = key
        path = self.files.abspath(index)
        try:
            img = open_rgb(path)
        except Exception as e:  # noqa: BLE001 -- name the file; the scan would have caught it
            raise RuntimeError(f"cannot decode {path} ({e}); run `python -m train.data scan ROOT` and read "
                               "the clean list it writes") from e
        if self.view == "center":
            arr = center_crop_arr(img, self.size)
            if flip:
                arr = arr[:, ::-1]
        else:
            arr = resize_shorter_random_crop(img, self.size, *crop_params(self.seed, epoch, index), flip)
        return to_tensor(arr), self.files.labels[index]


class PILImageLoader(ResumableLoader):
    """torch DataLoader workers decode with PIL; batches in `EpochSampler` order, resumable."""

    backend = "pil"

    def __init__(self, files: FileList, size: int, batch_size: int, view: str = "train", seed: int = 0, rank: int = 0,
                 world_size: int = 1, num_workers: int = 4, drop_last: bool = True, shuffle: bool = True,
                 flip_prob: Optional[float] = None) -> None:
        flip_prob = 0.0 if flip_prob is None else flip_prob  # the reference's VA-VAE view has no flip
        super().__init__(EpochSampler(len(files), batch_size, seed, rank, world_size, drop_last, shuffle,
                                      flip_prob))
        self.dataset = ImageDataset(files, size, view, seed)
        self.num_workers = num_workers

    def _batches(self, plan, start):
        keys = []
        for g in range(start, len(self)):
            idx, flip = self.sampler.rank_batch(plan, g)
            keys.append([(int(i), self.epoch, bool(f)) for i, f in zip(idx, flip)])
        yield from DataLoader(self.dataset, batch_sampler=keys, num_workers=self.num_workers,
                              persistent_workers=False, pin_memory=torch.cuda.is_available())


def build_image_loader(files: FileList, size: int, batch_size: int, backend: str = "auto", view: str = "train",
                       dali_device: str = "auto", **kw: Any) -> ResumableLoader:
    """backend: "pil", "dali" or "auto" (DALI if installed). dali_device: "gpu", "cpu" or "auto"."""
    if backend == "auto":
        from .dali import dali_available

        backend = "dali" if dali_available() else "pil"
    if backend == "pil":
        loader = PILImageLoader(files, size, batch_size, view=view, **kw)
        log.info("image loader: PIL decode, %s view, %d workers", view, loader.num_workers)
        return loader
    if backend == "dali":
        from .dali import DALIImageLoader

        kw.pop("num_workers", None)
        return DALIImageLoader(files, size, batch_size, view=view, device=dali_device, **kw)
    raise ValueError(f"backend must be pil, dali or auto, got {backend!r}")
