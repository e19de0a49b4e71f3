"""DALI image pipeline: JPEG decode on the GPU ("mixed") or, without a GPU, DALI's CPU mode.

The sample order, flips and crop positions come from Python (`EpochSampler`, `crop_params`) through an
external source, so a DALI run reads exactly what the PIL loader reads and resumes the same way. Decoding
(EXIF orientation ignored, libjpeg's chroma upsampling), the resized size and the crop offset are the PIL path's;
what differs is the reference's BOX pre-pass for images at least twice the size, which DALI has no filter for
(see docs/data.md). A GIF (DALI has no decoder for it) is handed over as a PNG of its first frame. One
undecodable file stops a DALI pipeline: feed it the clean list written by `python -m train.data scan`.
"""
import logging
import os
from typing import TYPE_CHECKING, Iterable, Optional

import numpy as np
import torch

from .files import FileList
from .sampler import VIEWS, EpochSampler, ResumableLoader, crop_params
from .transforms import require_regular_file

if TYPE_CHECKING:
    from nvidia.dali.pipeline import Pipeline

log = logging.getLogger(__name__)
INSTALL_HINT = "pip install nvidia-dali-cuda130==2.4.0"


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_device(device: str = "auto") -> str:
    """'gpu' or 'cpu' for a request of 'gpu', 'cpu' or 'auto'; a request that cannot run raises."""
    if device not in ("auto", "gpu", "cpu"):
        raise ValueError(f"DALI device must be auto, gpu or cpu, got {device!r}")
    if not dali_available():
        raise RuntimeError(f"the DALI image pipeline was requested but nvidia-dali is not installed ({INSTALL_HINT})"
                           "; use backend='pil' for the PIL path")
    has_gpu = torch.cuda.is_available()
    if device == "gpu" and not has_gpu:
        raise RuntimeError("GPU DALI decoding was requested but no CUDA GPU is visible; use dali_device='cpu' "
                           "(DALI CPU mode) or backend='pil'")
    return "gpu" if device == "gpu" or (device == "auto" and has_gpu) else "cpu"


# DALI's wording for an allocation it could not make (its CUDA allocators: "CUDA allocation failed"; the host's
# std::bad_alloc): raised as torch's out-of-memory error, whose one line names the batch to lower, not the images
OUT_OF_MEMORY_WORDS = ("allocation failed", "out of memory", "bad_alloc")


def build_pipeline(source: Iterable[tuple], size: int, view: str, device: str, batch_size: int, num_threads: int,
                   seed: int) -> "Pipeline":
    """source yields (encoded bytes, labels, crop_pos_x, crop_pos_y, mirror) lists, one batch at a time."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, seed=seed,
                  device_id=torch.cuda.current_device() if device == "gpu" else None)
    def pipe():
        jpegs, labels, pos_x, pos_y, mirror = fn.external_source(
            source=source, num_outputs=5, batch=True,
            dtype=[types.UINT8, types.INT64, types.FLOAT, types.FLOAT, types.INT32])
        # As PIL decodes: EXIF orientation ignored (PIL's Image.open, as the reference, does not apply it; DALI's
        # default rotates tagged images), and the GPU decoder's chroma upsampling the CPU's (libjpeg's "fancy" one)
        images = fn.decoders.image(jpegs, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB,
                                   adjust_orientation=False, jpeg_fancy_upsampling=True)
        # Short side -> size, the other side to its rounded size at that size's own scale, as PIL resizes (DALI's
        # default keeps the exact fractional scale and shifts its sampling grid by up to a quarter of a pixel). The
        # center view (ADM's): an antialiased bicubic, as PIL's BICUBIC; the VA-VAE training view: the reference's
        # OpenCV bilinear, not antialiased (transforms.resize_bilinear)
        train = view == "train"
        interp = types.INTERP_LINEAR if train else types.INTERP_CUBIC
        images = fn.resize(images, resize_shorter=size, interp_type=interp, antialias=not train, subpixel_scale=False)
        # the crop's pixel offset: the reference's (W - S) // 2 for the center view, round(u * (W - S)) for training
        images = fn.crop_mirror_normalize(
            images, crop=(size, size), crop_pos_x=pos_x, crop_pos_y=pos_y, mirror=mirror,
            rounding="truncate" if view == "center" else "round",
            mean=[127.5] * 3, std=[127.5] * 3, dtype=types.FLOAT, output_layout="CHW")
        return images, labels

    return pipe()


def _decodable(data: bytes) -> bytes:
    """The file's bytes, or for a GIF (which the scan keeps: PIL reads it, "GIF-in-jpg" in its notes) its first frame
    as a PNG: DALI has no GIF decoder and one such file stopped the pipeline. PNG keeps the palette and its
    transparency, so DALI's RGB is PIL's."""
    if not data.startswith((b"GIF87a", b"GIF89a")):
        return data
    import io

    from PIL import Image
    out = io.BytesIO()
    with Image.open(io.BytesIO(data)) as im:
        im.save(out, format="PNG")
    return out.getvalue()


class DALIImageLoader(ResumableLoader):
    """Same interface and sample plan as PILImageLoader; decodes with DALI."""

    backend = "dali"

    def __init__(self, files: FileList, size: int, batch_size: int, view: str = "train", seed: int = 0, rank: int = 0,
                 world_size: int = 1, device: str = "auto", num_threads: Optional[int] = None, drop_last: bool = True,
                 shuffle: bool = True, flip_prob: Optional[float] = None) -> None:
        if view not in VIEWS:
            raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
        self.device = resolve_device(device)
        flip_prob = 0.0 if flip_prob is None else flip_prob  # the reference's VA-VAE view has no flip
        super().__init__(EpochSampler(len(files), batch_size, seed, rank, world_size, drop_last, shuffle,
                                      flip_prob))
        self.files, self.size, self.view, self.seed = files, size, view, seed
        self.num_threads = num_threads or min(8, os.cpu_count() or 1)
        log.info("image loader: DALI %s decode (%s), %s view, %d threads", self.device,
                 "decoders.image device=mixed" if self.device == "gpu" else "CPU mode, device_id=None", view,
                 self.num_threads)

    def _source(self, plan, start):
        for g in range(start, len(self)):
            idx, flip = self.sampler.rank_batch(plan, g)
            enc, pos_x, pos_y = [], [], []
            for i in idx:
                require_regular_file(self.files.abspath(i))  # a FIFO would block the pipeline forever
                with open(self.files.abspath(i), "rb") as f:
                    enc.append(np.frombuffer(_decodable(f.read()), dtype=np.uint8))
                u = crop_params(self.seed, self.epoch, i) if self.view == "train" else (0.5, 0.5)
                pos_x.append(np.float32(u[0]))
                pos_y.append(np.float32(u[1]))
            yield (enc, [np.array(self.files.labels[i], np.int64) for i in idx], pos_x, pos_y,
                   [np.int32(f) for f in flip])

    def _batches(self, plan, start):
        from nvidia.dali.plugin.pytorch import feed_ndarray

        pipe = build_pipeline(self._source(plan, start), self.size, self.view, self.device,
                              self.sampler.batch_size, self.num_threads, self.seed + self.epoch)
        pipe.build()
        for _ in range(start, len(self)):
            try:
                images, labels = pipe.run()
            except RuntimeError as e:
                if any(k in str(e).lower() for k in OUT_OF_MEMORY_WORDS):  # the card, not the data: a setting
                    raise torch.OutOfMemoryError(f"DALI's pipeline: {' '.join(str(e).split())[:300]}") from e
                raise RuntimeError(f"DALI failed to decode a batch ({e}); feed the clean list of "
                                   "`python -m train.data scan ROOT`") from e
            images = images.as_tensor()
            if self.device == "gpu":
                x = torch.empty(images.shape(), dtype=torch.float32, device=torch.cuda.current_device())
                feed_ndarray(images, x, cuda_stream=torch.cuda.current_stream())
            else:
                x = torch.from_numpy(np.array(images))
            yield x, torch.from_numpy(np.array(labels.as_tensor())).reshape(-1)
