"""Latent extraction: every image and its mirror image through the VA-VAE encoder, `posterior.sample()`.

As LightningDiT's extract_features.py: rank r takes samples r, r+W, r+2W, ... of the file list (no
padding, so nothing is duplicated), writes shards DIR/latents_rank{r:02d}_shard{s:03d}.safetensors with
`latents`, `latents_flip`, `labels` (+ `indices`, the file-list positions), and the per-channel stats
latents_stats.pt when the last shard of all ranks is in place. Resumable: a complete shard is skipped;
a shard is written to a .tmp file and renamed, so a killed run leaves no half shard, only a .tmp that the
rerun overwrites. The posterior noise of shard s of rank r comes from a generator seeded with
(seed, rank, s), so a rerun reproduces every shard bit for bit on the same machine and settings.
"""
import json
import logging
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from modeling.safe_load import safe_torch_load, save_safetensors

from . import DataError
from .files import FileList
from .latents import (STATS_FILE, LatentStore, compute_stats, num_shards, rank_indices,  # noqa: F401
                      safetensors_header, save_stats, shard_name)

log = logging.getLogger(__name__)
STORE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _file_list_digest(files):
    """sha256 of the (path, label) list: a changed scan (files added, dropped, relabelled) is another dataset."""
    import hashlib
    h = hashlib.sha256()
    for p, y in zip(files.paths, files.labels):
        h.update(os.fsencode(p) + b"\0" + str(int(y)).encode() + b"\n")
    return h.hexdigest()


def shard_seed(seed: int, rank: int, shard: int) -> int:
    return int(np.random.SeedSequence([seed, rank, shard]).generate_state(1, np.uint64)[0] >> 1)


def shard_complete(path: Union[str, Path], n: int) -> bool:
    """True if `path` is a whole shard of n samples (a torn or foreign file is redone)."""
    try:
        header, _, start = safetensors_header(path)
        end = max(info["data_offsets"][1] for info in header.values())
        return header["labels"]["shape"] == [n] and os.path.getsize(path) >= start + end
    except (OSError, ValueError, KeyError):
        return False


def tokenizer_fingerprint(vae: torch.nn.Module) -> dict[str, Any]:
    """{"sha256": hash of every weight (name, dtype, shape, bytes) and the config, "config": ..., "params"}:
    the provenance extract.json records, so latents from two tokenizers are never mixed."""
    import dataclasses
    import hashlib
    cfg = getattr(vae, "config", None)
    if dataclasses.is_dataclass(cfg):
        cfg = dataclasses.asdict(cfg)
    cfg = json.loads(json.dumps(cfg, default=str)) if cfg is not None else None
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode())
    n = 0
    for name, t in sorted(vae.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        n += t.numel()
    return {"sha256": h.hexdigest(), "config": cfg, "params": n}


def _describe_diff(key, old, new):
    if key == "tokenizer" and isinstance(old, dict) and isinstance(new, dict):
        return f"tokenizer {str(old.get('sha256'))[:12]}... vs {str(new.get('sha256'))[:12]}..."
    if key == "tokenizer" and old is None:
        return "tokenizer not recorded (made before provenance was kept, or elsewhere)"
    return f"{key} {old!r} vs {new!r}"


def _check_run_config(out_dir, config):
    """Refuse to mix shards written with other settings (tokenizer, image size, dtype, crop, ...) into one
    folder; the first run records them in extract.json."""
    path = out_dir / "extract.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError as e:
            raise DataError(f"{path}: unreadable extraction manifest ({e}); use a new output folder") from None
        if not isinstance(old, dict):
            raise DataError(f"{path}: the extraction manifest holds a JSON {type(old).__name__}, not the object "
                            "extract writes; use a new output folder")
        diff = [_describe_diff(k, old.get(k), v) for k, v in config.items() if old.get(k) != v]
        if diff:
            raise DataError(f"{out_dir} holds an extraction with other settings (recorded vs now: "
                            f"{'; '.join(diff)}); use a new output folder")
    elif any(out_dir.glob("*.safetensors")) or (out_dir / STATS_FILE).exists():
        raise DataError(f"{out_dir} already holds latents with no extract.json (made elsewhere, or the manifest was "
                        "deleted): their tokenizer and settings are unknown, so nothing is added; use a new output "
                        "folder")
    else:
        tmp = Path(str(path) + f".tmp{os.getpid()}")
        try:
            tmp.write_text(json.dumps(config, indent=1))
            os.replace(tmp, path)
        except BaseException:  # a full disk: no .tmp left behind
            tmp.unlink(missing_ok=True)
            raise


def _image_loader(files, image_size, batch_size, backend, dali_device, num_workers):
    """The center view, in file-list order, no shuffling; the last batch wraps (trimmed by the caller)."""
    from .images import build_image_loader

    kw = dict(shuffle=False, drop_last=False, flip_prob=0.0, view="center")
    if backend == "dali":
        return build_image_loader(files, image_size, batch_size, backend="dali", dali_device=dali_device, **kw)
    return build_image_loader(files, image_size, batch_size, backend=backend, num_workers=num_workers, **kw)


def check_extract_settings(vae: Optional[torch.nn.Module], image_size: int, batch_size: int, rank: int, world_size: int,
                           shard_size: int, num_workers: int, flags: Optional[dict[str, str]] = None) -> None:
    """ConfigError naming the first setting that cannot work. `flags`: {setting: its command-line name}."""
    from modeling.config import ConfigError

    def name(key):
        return (flags or {}).get(key, key)
    for key, value, low in (("image_size", image_size, 1), ("batch_size", batch_size, 1),
                            ("world_size", world_size, 1), ("shard_size", shard_size, 1),
                            ("num_workers", num_workers, 0), ("rank", rank, 0)):
        if type(value) is not int or value < low:
            raise ConfigError(f"{name(key)} {value}: must be an integer of at least {low}")
    if rank >= world_size:
        raise ConfigError(f"{name('rank')} {rank} with {name('world_size')} {world_size}: the ranks are "
                          f"0..{world_size - 1} (rank {rank} would extract rank {rank % world_size}'s images again)")
    factor = getattr(vae, "downsample_factor", 1) if vae is not None else 1
    if image_size % factor:
        raise ConfigError(f"{name('image_size')} {image_size}: must be a multiple of the tokenizer's downsampling "
                          f"factor {factor} (e.g. {max(factor, image_size // factor * factor)})")


@torch.no_grad()
def extract_latents(vae: torch.nn.Module, files: FileList, out_dir: Union[str, Path], image_size: int = 256,
                    batch_size: int = 64, rank: int = 0, world_size: int = 1, seed: int = 0, shard_size: int = 10000,
                    store_dtype: str = "fp32", backend: str = "pil", dali_device: str = "auto", num_workers: int = 4,
                    device: Optional[Union[str, torch.device]] = None, amp: Optional[str] = None,
                    progress: bool = True) -> dict[str, int]:
    """Encode this rank's part of `files` into out_dir. Returns {"written", "skipped", "stats"}.
    Settings that cannot work (a rank outside 0..world_size-1, which would duplicate another rank's images; an
    image size the tokenizer cannot encode; sizes below 1) raise ConfigError naming the setting."""
    check_extract_settings(vae, image_size, batch_size, rank, world_size, shard_size, num_workers)
    if store_dtype not in STORE_DTYPES:
        raise ValueError(f"store_dtype must be one of {sorted(STORE_DTYPES)}, got {store_dtype!r}")
    if backend == "dali":  # a DALI that cannot run here (not installed, no GPU for "gpu"): before any file is written
        from modeling.config import ConfigError

        from .dali import resolve_device
        try:
            resolve_device(dali_device)
        except (RuntimeError, ValueError) as e:
            raise ConfigError(f"--backend dali --dali-device {dali_device}: {e}") from None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    _check_run_config(out_dir, {"num_files": len(files), "classes": files.classes, "image_size": image_size,
                                "world_size": world_size, "shard_size": shard_size, "seed": seed,
                                "store_dtype": store_dtype, "backend": backend, "amp": amp,
                                "crop": "center, ADM center_crop_arr" if backend == "pil" else
                                "center, DALI bicubic resize + center crop", "mirror": True,
                                "files": _file_list_digest(files), "tokenizer": tokenizer_fingerprint(vae)})
    vae = vae.to(device).eval()
    mine = rank_indices(len(files), rank, world_size)
    shards = [mine[i: i + shard_size] for i in range(0, len(mine), shard_size)]
    todo = [s for s, idx in enumerate(shards) if not shard_complete(out_dir / shard_name(rank, s), len(idx))]
    log.info("extract rank %d/%d: %d images in %d shards (%d done), %s decode, view=center %dpx, store %s, "
             "device %s%s", rank, world_size, len(mine), len(shards), len(shards) - len(todo), backend,
             image_size, store_dtype, device, f", autocast {amp}" if amp else "")
    bar = None
    if progress and rank == 0:
        from modeling.progress import progress as progress_bar

        bar = progress_bar(sum(len(shards[s]) for s in todo), "extract", "img", dynamic_ncols=True)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if amp == "bf16" else nullcontext())
    try:  # the bar closed on an error too: its line ends before the error's
        for s in todo:
            idx = shards[s]
            sub = FileList(files.root, [files.paths[i] for i in idx], [files.labels[i] for i in idx], files.classes)
            gen = torch.Generator(device).manual_seed(shard_seed(seed, rank, s))
            lat, lat_flip, labels = [], [], []
            t0, n = time.perf_counter(), 0
            for x, y in _image_loader(sub, image_size, batch_size, backend, dali_device, num_workers):
                x, y = x[: len(idx) - n], y[: len(idx) - n]  # the wrapped tail of the last batch
                x = x.to(device, non_blocking=True)
                with autocast:
                    z = vae.encode(torch.cat([x, torch.flip(x, dims=[3])])).sample(generator=gen)
                finite = torch.isfinite(z.float().flatten(1)).all(dim=1)
                if not finite.all():
                    bad = sorted({int(j) % len(x) for j in torch.nonzero(~finite).flatten().tolist()})
                    names = [sub.abspath(n + j) for j in bad[:3]]
                    raise DataError(f"the tokenizer gave non-finite latents for {len(bad)} image(s): {', '.join(names)}"
                                    f"{' ...' if len(bad) > 3 else ''}; nothing was written for shard {s}")
                z = z.float().to(STORE_DTYPES[store_dtype]).cpu()
                lat.append(z[: len(x)])
                lat_flip.append(z[len(x):])
                labels.append(y.long().cpu())
                n += len(x)
                if bar is not None:
                    bar.update(len(x))
                if n >= len(idx):
                    break
            lat = torch.cat(lat)
            _write_shard(out_dir / shard_name(rank, s), lat, torch.cat(lat_flip), torch.cat(labels),
                         torch.from_numpy(idx.astype(np.int64)), seed)
            dt = time.perf_counter() - t0
            log.info("extract rank %d shard %d: %d images (x2 with the mirror) in %.1fs, %.1f img/s", rank, s, n, dt,
                     n / dt)
    finally:
        if bar is not None:
            bar.close()
    stats = finalize_stats(out_dir, len(files), world_size, shard_size, recompute=bool(todo))
    return {"written": len(todo), "skipped": len(shards) - len(todo), "stats": stats is not None}


def _write_shard(path, latents, latents_flip, labels, indices, seed):
    tmp = str(path) + ".tmp"
    try:
        save_safetensors({"latents": latents.contiguous(), "latents_flip": latents_flip.contiguous(), "labels": labels,
                   "indices": indices}, tmp,
                  metadata={"total_size": f"{latents.shape[0]}", "dtype": f"{latents.dtype}", "device": "cpu",
                            "seed": f"{seed}"})
        os.replace(tmp, path)
    except BaseException:  # a full disk: no half shard (.tmp) left behind
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def finalize_stats(out_dir: Union[str, Path], num_files: int, world_size: int, shard_size: int,
                   recompute: bool = True) -> Optional[dict[str, torch.Tensor]]:
    """When every rank's shards are in place, compute latents_stats.pt as the reference does."""
    out_dir = Path(out_dir)
    for r in range(world_size):
        n = len(rank_indices(num_files, r, world_size))
        for s in range(num_shards(num_files, r, world_size, shard_size)):
            if not shard_complete(out_dir / shard_name(r, s), min(shard_size, n - s * shard_size)):
                log.info("stats wait for rank %d shard %d; the last rank to finish writes %s", r, s, STATS_FILE)
                return None
    path = out_dir / STATS_FILE
    if recompute or not path.is_file():
        stats = compute_stats(LatentStore.open(out_dir))
        save_stats(stats, path)
        log.info("latent stats (%s): mean %s, std %s", path, _fmt(stats["mean"]), _fmt(stats["std"]))
    return safe_torch_load(path, "latent stats")


def _fmt(t):
    v = t.flatten().tolist()
    return "[" + ", ".join(f"{x:.3f}" for x in v[:4]) + (", ...]" if len(v) > 4 else "]")
