"""How far the approximate paths move the latents: DALI resize vs PIL's exact ADM crop, bf16 vs fp32 storage.

Runs the extraction three times on the same files with the same seed (so the posterior noise is the same
draw): PIL/fp32 (the reference path), DALI/fp32 and PIL/bf16, then compares the per-channel statistics
(latents_stats.pt) and the latents themselves. `python -m train.data compare DATA --vae CKPT`.
"""
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from .extract import extract_latents
from .files import FileList
from .latents import LatentStore


def _summary(ref, other):
    (m0, s0), (m1, s1) = ref.stats, other.stats
    a, _, _ = ref.gather(np.arange(ref.num_samples))
    b, _, _ = other.gather(np.arange(other.num_samples))
    rel = ((a - b).flatten(1).norm(dim=1) / a.flatten(1).norm(dim=1))
    return {"mean_max_abs_diff": (m1 - m0).abs().max().item(),
            "mean_max_diff_in_std_units": ((m1 - m0).abs() / s0).max().item(),
            "std_max_rel_diff": ((s1 - s0).abs() / s0).max().item(),
            "latent_rel_l2_diff_mean": rel.mean().item(), "latent_rel_l2_diff_max": rel.max().item()}


def compare_paths(vae: torch.nn.Module, files: FileList, image_size: int = 256, batch_size: int = 32, seed: int = 0,
                  dali_device: str = "auto", num_workers: int = 2,
                  device: Optional[Union[str, torch.device]] = None) -> dict[str, Any]:
    kw = dict(image_size=image_size, batch_size=batch_size, seed=seed, shard_size=len(files), device=device,
              num_workers=num_workers, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {name: Path(tmp) / name for name in ("pil_fp32", "dali_fp32", "pil_bf16")}
        extract_latents(vae, files, dirs["pil_fp32"], **kw)
        extract_latents(vae, files, dirs["dali_fp32"], backend="dali", dali_device=dali_device, **kw)
        extract_latents(vae, files, dirs["pil_bf16"], store_dtype="bf16", **kw)
        stores = {k: LatentStore.open(d) for k, d in dirs.items()}
        ref = stores["pil_fp32"]
        return {"samples": ref.num_samples, "latent_shape": list(ref.latent_shape), "image_size": image_size,
                "reference_stats": {"mean": ref.stats[0].flatten().tolist(), "std": ref.stats[1].flatten().tolist()},
                "dali_vs_pil": _summary(ref, stores["dali_fp32"]),
                "bf16_vs_fp32": _summary(ref, stores["pil_bf16"]),
                "torch_threads": torch.get_num_threads()}
