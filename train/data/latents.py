"""Latent store and loader for DiT training.

Storage is the reference's shard format (LightningDiT extract_features.py), so either side can read the
other's files: DIR/latents_rank{r:02d}_shard{s:03d}.safetensors with `latents`, `latents_flip` (the
encoding of the mirrored image), `labels`, plus DIR/latents_stats.pt {"mean", "std"} of shape (1,C,1,1).
Samples are numbered in sorted file-name order, as the reference's ImgLatentDataset does.

The reference opens a safetensors file per sample. Here every shard is memory-mapped once (a safetensors
file is a JSON header followed by the raw C-contiguous arrays) and a batch is a few `np.take` gathers
straight into the output buffer: un-flipped samples first, flipped ones after, grouped by shard.

A folder our extractor wrote has extract.json: its shards are checked against it when the store opens (a
foreign `latents_rank01_*` dropped in, a missing shard, a shard of another size are refused, naming the
file). Every gathered batch is checked finite; a NaN / inf names its shard and sample index.
"""
import json
import logging
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from modeling.safe_load import CheckpointLoadError, read_safetensors_header, safe_torch_load

from . import DataError
from .sampler import EpochSampler, ResumableLoader

log = logging.getLogger(__name__)

SHARD_GLOB = "*.safetensors"
SHARD_RE = re.compile(r"latents_rank(\d+)_shard(\d+)\.safetensors$")
STATS_FILE = "latents_stats.pt"
_NP_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64, "I32": np.int32}


def shard_name(rank: int, shard: int) -> str:
    return f"latents_rank{rank:02d}_shard{shard:03d}.safetensors"


def safetensors_header(path: Union[str, Path]) -> tuple[dict[str, Any], dict[str, str], int]:
    """(tensors: {name: {dtype, shape, data_offsets}}, metadata dict, byte offset of the data), every entry
    checked against the file (modeling.safe_load.read_safetensors_header). A file that is not a safetensors
    file -- or a FIFO, a truncated file, a header that lies -- raises DataError naming it."""
    try:
        return read_safetensors_header(path, "latent shard")
    except (CheckpointLoadError, FileNotFoundError) as e:
        raise DataError(" ".join(str(e).split())) from None


def rank_indices(num_files: int, rank: int, world_size: int) -> np.ndarray:
    """The file-list positions rank `rank` of `world_size` extracts (r, r+W, r+2W, ...), as the reference."""
    return np.arange(rank, num_files, world_size)


def num_shards(num_files: int, rank: int, world_size: int, shard_size: int) -> int:
    return math.ceil(len(rank_indices(num_files, rank, world_size)) / shard_size)


def expected_shards(manifest: dict[str, Any]) -> Optional[dict[str, int]]:
    """{shard file name: sample count} of every shard the extraction recorded in `manifest` (extract.json)
    writes, over all its ranks; None when the manifest lacks the settings (made by an older version)."""
    try:
        n, ws, ss = (manifest[k] for k in ("num_files", "world_size", "shard_size"))
    except (KeyError, TypeError):
        return None
    if not all(type(v) is int for v in (n, ws, ss)) or n < 0 or ws < 1 or ss < 1:
        return None
    out = {}
    for r in range(ws):
        mine = len(rank_indices(n, r, ws))
        for s in range(num_shards(n, r, ws, ss)):
            out[shard_name(r, s)] = min(ss, mine - s * ss)
    return out


def _memmap(path, info, data_start, key):
    if info.get("dtype") not in _NP_DTYPES:
        raise DataError(f"{path}: {key} has unsupported dtype {info.get('dtype')}")
    begin, end = info["data_offsets"]
    shape = tuple(info["shape"])
    dtype = np.dtype(_NP_DTYPES[info["dtype"]])
    if end - begin != int(np.prod(shape, dtype=object)) * dtype.itemsize:
        raise DataError(f"{path}: {key} size does not match its shape {shape}")
    if os.path.getsize(path) < data_start + end:
        raise DataError(f"{path}: file is truncated ({key} ends past the end of the file)")
    return np.memmap(path, dtype=dtype, mode="r", offset=data_start + begin, shape=shape)


class LatentStore:
    """All shards of a latent directory, memory-mapped. `gather` reads a batch."""

    def __init__(self, directory: Union[str, Path], files: list[Path], latents: list[np.ndarray],
                 latents_flip: list[np.ndarray], labels: list[np.ndarray], stored_dtype: str) -> None:
        self.directory = Path(directory)
        self.files = files
        self._latents = latents            # per-shard memmaps
        self._latents_flip = latents_flip
        self.labels = np.concatenate([np.asarray(lab, dtype=np.int64) for lab in labels])
        self.stored_dtype = stored_dtype   # "F32" or "BF16" (raw uint16 on disk)
        sizes = [len(lab) for lab in labels]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.latent_shape = tuple(latents[0].shape[1:])
        self._stats = None
        self.manifest = None  # extract.json of the folder (None for shards made elsewhere)

    @classmethod
    def open(cls, directory: Union[str, Path], latent_shape: Optional[Sequence[int]] = None,
             num_classes: Optional[int] = None) -> "LatentStore":
        """Memory-map every shard of `directory`. With `latent_shape` (C, H, W) and/or `num_classes`, also
        `check` that the latents fit the model (DataError otherwise)."""
        directory = Path(directory)
        files = sorted(directory.glob(SHARD_GLOB))
        if not files:
            try:
                os.listdir(directory)  # the glob finds nothing in a folder it may not read: say which it is
            except PermissionError as e:
                raise PermissionError(f"{directory}: cannot list the latent folder ({e.strerror})") from None
            except OSError:
                pass
            raise FileNotFoundError(f"no *.safetensors latent shards in {directory}")
        manifest_path = directory / "extract.json"
        try:
            manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
        except (OSError, ValueError) as e:
            raise DataError(f"{manifest_path}: unreadable extraction manifest ({e})") from None
        if manifest is not None and not isinstance(manifest, dict):
            raise DataError(f"{manifest_path}: the extraction manifest holds a JSON {type(manifest).__name__}, not "
                            "the object `python -m train.data extract` writes")
        expected = expected_shards(manifest) if manifest is not None else None
        if expected is not None:
            _check_shard_names(directory, files, expected, manifest)
        latents, flips, labels, dtypes = [], [], [], set()
        for path in files:
            header, _, start = safetensors_header(path)
            missing = {"latents", "latents_flip", "labels"} - set(header)
            if missing:
                raise DataError(f"{path}: missing {sorted(missing)} (reference shard format needs "
                                "latents, latents_flip, labels)")
            lat = _memmap(path, header["latents"], start, "latents")
            flip = _memmap(path, header["latents_flip"], start, "latents_flip")
            lab = _memmap(path, header["labels"], start, "labels")
            if flip.shape != lat.shape or lab.shape != lat.shape[:1] or lat.ndim != 4:
                raise DataError(f"{path}: latents {lat.shape}, latents_flip {flip.shape}, labels {lab.shape} (expected "
                                "(N, C, H, W) twice and (N,))")
            if header["labels"]["dtype"] not in ("I64", "I32"):
                raise DataError(f"{path}: labels must be integers, found {header['labels']['dtype']}")
            if expected is not None and len(lab) != expected[path.name]:
                raise DataError(f"{path}: holds {len(lab)} samples, but the extraction in extract.json writes "
                                f"{expected[path.name]} into it (a shard from elsewhere?); re-extract it")
            if latents and lat.shape[1:] != latents[0].shape[1:]:
                raise DataError(f"{path}: latent shape {lat.shape[1:]} differs from {latents[0].shape[1:]} in "
                                f"{files[0]}")
            dtypes.add(header["latents"]["dtype"])
            dtypes.add(header["latents_flip"]["dtype"])
            latents.append(lat)
            flips.append(flip)
            labels.append(lab)
        if len(dtypes) != 1 or next(iter(dtypes)) not in ("F32", "BF16"):
            raise DataError(f"{directory}: latents must all be F32 or all BF16, found {sorted(dtypes)}")
        store = cls(directory, files, latents, flips, labels, dtypes.pop())
        store.manifest = manifest
        log.info("latent store %s: %d samples %s (%s) in %d shards", directory, store.num_samples,
                 store.latent_shape, store.stored_dtype, len(files))
        if latent_shape is not None or num_classes is not None:
            store.check(latent_shape, num_classes)
        return store

    def check(self, latent_shape: Optional[Sequence[int]] = None, num_classes: Optional[int] = None) -> "LatentStore":
        """Refuse (DataError naming the folder / shard) latents that do not fit the model: shape (C, H, W)
        other than `latent_shape`, labels outside 0..num_classes-1, or a manifest that disagrees with the
        shards. Cheap (labels only); the DiT trainer calls it before training starts."""
        where = self.directory
        if self.manifest and self.manifest.get("latent_shape") and \
                tuple(self.manifest["latent_shape"]) != self.latent_shape:
            raise DataError(f"{where}: shards hold {self.latent_shape} latents but extract.json records "
                            f"{tuple(self.manifest['latent_shape'])}")
        if latent_shape is not None and tuple(latent_shape) != self.latent_shape:
            made = ""
            if self.manifest and self.manifest.get("tokenizer"):
                made = (f" (extracted at {self.manifest.get('image_size')} px with tokenizer "
                        f"{str(self.manifest['tokenizer'].get('sha256', '?'))[:12]})")
            raise DataError(f"{where}: latents are {self.latent_shape} (channels, height, width){made}; the model "
                            f"expects {tuple(latent_shape)} (model.in_channels, model.input_size)")
        if num_classes is not None and self.num_samples:
            lo, hi = int(self.labels.min()), int(self.labels.max())
            if lo < 0 or hi >= num_classes:
                bad = int(np.flatnonzero((self.labels < 0) | (self.labels >= num_classes))[0])
                shard = int(np.searchsorted(self.offsets, bad, side="right") - 1)
                raise DataError(f"{self.files[shard]}: label {int(self.labels[bad])} at sample "
                                f"{bad - int(self.offsets[shard])} is outside 0..{num_classes - 1} "
                                f"(model.num_classes={num_classes}; labels range {lo}..{hi})")
        return self

    @property
    def num_samples(self) -> int:
        return int(self.offsets[-1])

    @property
    def stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std), each float32 (1, C, 1, 1): latents_stats.pt, computed and saved if missing."""
        if self._stats is None:
            path = self.directory / STATS_FILE
            if path.is_file():
                s = safe_torch_load(path, "latent stats")
                if not isinstance(s, dict) or not all(isinstance(s.get(k), torch.Tensor) for k in ("mean", "std")):
                    raise DataError(f"{path}: expected tensors 'mean' and 'std'")
                if s["mean"].numel() != self.latent_shape[0] or s["std"].numel() != self.latent_shape[0]:
                    raise DataError(f"{path}: stats for {s['mean'].numel()} channels, the latents have "
                                    f"{self.latent_shape[0]}")
                if not (torch.isfinite(s["mean"]).all() and torch.isfinite(s["std"]).all() and (s["std"] > 0).all()):
                    raise DataError(f"{path}: mean / std are not finite (or std <= 0); delete it and run "
                                    f"`python -m train.data stats {self.directory}`")
            else:
                s = compute_stats(self)
                save_stats(s, path)
                log.info("latent stats computed and saved to %s", path)
            self._stats = (s["mean"].float(), s["std"].float())
        return self._stats

    def gather(self, indices: np.ndarray, flip: Optional[np.ndarray] = None,
               check_finite: bool = True) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """Samples `indices` (int array), from latents_flip where `flip` is True.

        Returns (latents float32 (B, C, H, W), labels int64 (B,), order) where the batch is laid out
        un-flipped first, then flipped, each grouped by shard: row j holds sample indices[order[j]].
        A sample with a NaN / inf raises DataError naming its shard and index (check_finite=False: returned).
        """
        indices = np.asarray(indices, dtype=np.int64)
        flip = np.zeros(len(indices), bool) if flip is None else np.asarray(flip, bool)
        shard = np.searchsorted(self.offsets, indices, side="right") - 1
        order = np.lexsort((indices, shard, flip))  # sorted by (flip, shard, index): contiguous runs
        idx, sh, fl = indices[order], shard[order], flip[order]
        local = idx - self.offsets[sh]
        raw_dtype = np.uint16 if self.stored_dtype == "BF16" else np.float32
        out = np.empty((len(idx),) + self.latent_shape, dtype=raw_dtype)
        bounds = np.flatnonzero(np.diff(sh) | np.diff(fl.astype(np.int64))) + 1
        starts, ends = np.concatenate([[0], bounds]), np.concatenate([bounds, [len(idx)]])
        for a, b in zip(starts, ends) if len(idx) else ():
            src = (self._latents_flip if fl[a] else self._latents)[sh[a]]
            np.take(src, local[a:b], axis=0, out=out[a:b], mode="clip")
        lat = torch.from_numpy(out)
        if self.stored_dtype == "BF16":
            lat = lat.view(torch.bfloat16).float()
        if check_finite and len(idx):
            finite = torch.isfinite(lat.flatten(1)).all(dim=1)
            if not finite.all():
                bad = torch.nonzero(~finite).flatten().tolist()
                where = [f"{self.files[sh[j]].name} index {int(local[j])}{' (latents_flip)' if fl[j] else ''}"
                         for j in bad[:3]]
                raise DataError(f"{self.directory}: non-finite (NaN/inf) latents at {', '.join(where)}"
                                f"{' ...' if len(bad) > 3 else ''}; re-extract those shards")
        return lat, torch.from_numpy(self.labels[idx]), order


def compute_stats(store: LatentStore, max_samples: int = 10000, seed: int = 0) -> dict[str, torch.Tensor]:
    """The reference's compute_latent_stats: up to 10000 random samples of `latents` (not the flips),
    mean and (unbiased) std over batch, height and width, keepdim -> (1, C, 1, 1). Seeded here."""
    n = min(max_samples, store.num_samples)
    idx = np.random.default_rng(seed).choice(store.num_samples, n, replace=False)
    lat, _, order = store.gather(idx, check_finite=False)  # (checked below, listing every bad one)
    finite = torch.isfinite(lat.flatten(1)).all(dim=1)
    if not finite.all():
        bad = sorted(int(idx[order[j]]) for j in torch.nonzero(~finite).flatten().tolist())
        where = []
        for i in bad[:5]:
            shard = int(np.searchsorted(store.offsets, i, side="right") - 1)
            where.append(f"{store.files[shard].name} index {i - int(store.offsets[shard])}")
        raise DataError(f"{store.directory}: {len(bad)} of the {n} latents sampled for the stats are not finite "
                        f"(NaN/inf): {', '.join(where)}{' ...' if len(bad) > 5 else ''}; re-extract those shards")
    return {"mean": lat.mean(dim=[0, 2, 3], keepdim=True), "std": lat.std(dim=[0, 2, 3], keepdim=True)}


def save_stats(stats: dict[str, torch.Tensor], path: Union[str, Path]) -> None:
    tmp = str(path) + ".tmp"
    try:
        torch.save({"mean": stats["mean"], "std": stats["std"]}, tmp)
        os.replace(tmp, path)
    except BaseException:  # a full disk: no .tmp left behind
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _check_shard_names(directory, files, expected, manifest):
    """DataError naming the first shard file the extraction in extract.json did not write, or the first one it
    wrote that is missing."""
    present = {p.name for p in files}
    what = (f"extract.json records {manifest['world_size']} rank(s), {manifest['num_files']} files, shard size "
            f"{manifest['shard_size']}: {len(expected)} shards")
    foreign = sorted(present - set(expected))
    if foreign:
        raise DataError(f"{directory / foreign[0]}: not a shard of this folder's extraction ({what}; "
                        f"{len(foreign)} file(s) from elsewhere); move it out, or extract into a new folder")
    missing = sorted(set(expected) - present)
    if missing:
        raise DataError(f"{directory}: the extraction is incomplete, {missing[0]} is missing"
                        f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''} ({what}); run the same "
                        "`python -m train.data extract` again to finish it")


class LatentLoader(ResumableLoader):
    """Batches (latents float32 (B,C,H,W) un-normalised, labels int64 (B,)) for one rank.

    Each `for batch in loader` runs the rest of the current epoch, then moves to the next epoch;
    `state_dict()` / `load_state_dict()` resume exactly with the next batch. The next batch is gathered
    in a background thread while the current one is used (numpy copies release the GIL).
    """

    def __init__(self, store: LatentStore, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 flip_prob: float = 0.5, drop_last: bool = True, shuffle: bool = True, prefetch: bool = True) -> None:
        super().__init__(EpochSampler(store.num_samples, batch_size, seed, rank, world_size, drop_last, shuffle,
                                      flip_prob))
        self.store = store
        self.prefetch = prefetch

    def _batches(self, plan, start):
        def load(g):
            idx, flip = self.sampler.rank_batch(plan, g)
            lat, lab, _ = self.store.gather(idx, flip)
            return lat, lab

        n = len(self)
        if not self.prefetch:
            yield from (load(g) for g in range(start, n))
            return
        with ThreadPoolExecutor(1) as pool:
            nxt = pool.submit(load, start) if start < n else None
            for g in range(start, n):
                batch = nxt.result()
                nxt = pool.submit(load, g + 1) if g + 1 < n else None
                yield batch


class ReferenceLatentReader:
    """The reference ImgLatentDataset's access pattern (one safe_open per sample, flip with p=0.5, no
    normalisation here): the baseline the loader benchmark and tests compare against."""

    def __init__(self, directory: Union[str, Path], seed: int = 0) -> None:
        from safetensors import safe_open

        self._safe_open = safe_open
        self.index = []
        for path in sorted(Path(directory).glob(SHARD_GLOB)):
            with safe_open(str(path), framework="pt", device="cpu") as f:
                n = f.get_slice("labels").get_shape()[0]
            self.index += [(str(path), i) for i in range(n)]
        self.rng = np.random.default_rng(seed)

    def __len__(self):
        return len(self.index)

    def __getitem__(self, idx):
        return self.get(idx)

    def get(self, idx: int, flip: Optional[bool] = None) -> tuple[torch.Tensor, torch.Tensor]:
        path, i = self.index[idx]
        if flip is None:
            flip = self.rng.uniform(0, 1) > 0.5
        with self._safe_open(path, framework="pt", device="cpu") as f:
            feature = f.get_slice("latents_flip" if flip else "latents")[i: i + 1]
            label = f.get_slice("labels")[i: i + 1]
        return feature.squeeze(0), label.squeeze(0)
