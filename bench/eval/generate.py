"""Sample generation for FID: sharded across ranks, resumable, written to the npz the evaluator reads.

Sample i of the run always gets the same label and the same noise (seeded by (seed, i)), whatever
the number of ranks, the batch size, or how often the job was restarted. Each rank takes the
indices i = rank, rank + world, ... and writes finished batches as chunk files (atomic rename), so
a killed job resumes where it stopped. Once every chunk exists the chunks are merged, in index
order, into OUT.npz with `arr_0` = uint8 (N, H, W, 3) and `arr_1` = labels (N,): the ADM format.

CLI: python -m bench.eval.generate DIT_DIR VAE_DIR OUT.npz --num-samples 50000 [--cfg-scale ..]
     (torchrun for several ranks; RANK / WORLD_SIZE from the environment).
"""
import argparse
import os
from pathlib import Path

import numpy as np
import torch


def sample_labels(num_samples, num_classes, seed=0, class_balanced=True):
    """Class-balanced: every class equally often (up to one), in a seeded random order."""
    g = torch.Generator().manual_seed(seed)
    if class_balanced:
        labels = torch.arange(num_samples) % num_classes
        return labels[torch.randperm(num_samples, generator=g)]
    return torch.randint(0, num_classes, (num_samples,), generator=g)


def sample_noise(indices, shape, seed=0):
    """Noise for the given global sample indices, independent of batching: one generator per sample."""
    out = torch.empty((len(indices), *shape))
    for j, i in enumerate(indices):
        out[j] = torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + int(i)))
    return out


def _chunk_path(work, start):
    return work / f"chunk_{start:08d}.npz"


@torch.no_grad()
def generate(dit, vae, out_npz, num_samples, latent_stats=None, batch_size=32, steps=250, method="euler",
             shift=0.3, cfg_scale=1.0, cfg_interval_start=0.0, guidance="all", class_balanced=True, seed=0,
             rank=0, world_size=1, device="cpu", progress=True, latent_multiplier=1.0):
    """Generate `num_samples` images into out_npz (merged by the rank that finds every chunk present).

    latent_stats: {"mean", "std"} (1, C, 1, 1) of the DiT's normalised latents, or None; the DiT was
    trained on (z - mean) / std * latent_multiplier, so samples are mapped back by the inverse.
    Returns the path of the merged npz, or None while other ranks still have chunks to write.
    """
    from tqdm import tqdm

    from modeling.sampling import sample

    out_npz = Path(out_npz)
    work = out_npz.with_suffix(".chunks")
    work.mkdir(parents=True, exist_ok=True)
    dit, vae = dit.eval().to(device), vae.eval().to(device)
    labels = sample_labels(num_samples, dit.num_classes, seed, class_balanced)
    latent_size = dit.x_embedder.grid_size * dit.x_embedder.patch_size[0]
    shape = (dit.in_channels, latent_size, latent_size)
    # Chunks are batches of consecutive indices of this rank's stride: chunk k of rank r holds
    # indices r + world * (k * batch_size + j).
    mine = list(range(rank, num_samples, world_size))
    starts = list(range(0, len(mine), batch_size))
    bar = tqdm(total=len(mine), desc=f"sampling (rank {rank})", unit="img", disable=not progress)
    for s in starts:
        idx = mine[s:s + batch_size]
        path = _chunk_path(work, idx[0])
        if path.exists():  # done before a restart
            bar.update(len(idx))
            continue
        gen = torch.Generator(device=device).manual_seed(seed * 7919 + idx[0])  # for stochastic samplers
        z = sample_noise(idx, shape, seed).to(device)
        y = labels[idx].to(device)
        x = sample(dit, z, y, steps=steps, method=method, shift=shift, cfg_scale=cfg_scale,
                   cfg_interval_start=cfg_interval_start, guidance=guidance, generator=gen)
        x = x / latent_multiplier
        if latent_stats is not None:
            x = x * latent_stats["std"].to(x) + latent_stats["mean"].to(x)
        images = vae.decode_to_images(x).cpu().numpy()
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, images=images, labels=y.cpu().numpy(), indices=np.asarray(idx))
        os.replace(tmp, path)
        bar.update(len(idx))
    bar.close()
    return merge_chunks(out_npz, num_samples)


def merge_chunks(out_npz, num_samples):
    """Merge chunk files into out_npz if they cover every index; None otherwise."""
    out_npz = Path(out_npz)
    work = out_npz.with_suffix(".chunks")
    loaded = []
    for c in sorted(work.glob("chunk_*.npz")):
        if not c.name.endswith(".tmp.npz"):
            with np.load(c) as z:
                loaded.append({k: z[k] for k in z.files})
    covered = sum(len(c["indices"]) for c in loaded)
    if covered < num_samples:
        return None
    first = loaded[0]["images"]
    images = np.empty((num_samples, *first.shape[1:]), dtype=np.uint8)
    labels = np.empty(num_samples, dtype=np.int64)
    for c in loaded:
        images[c["indices"]] = c["images"]
        labels[c["indices"]] = c["labels"]
    tmp = out_npz.with_suffix(".tmp.npz")
    np.savez(tmp, arr_0=images, arr_1=labels)
    os.replace(tmp, out_npz)
    return out_npz


def main(argv=None):
    from modeling.checkpoint import load_pretrained

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dit_dir")
    p.add_argument("vae_dir")
    p.add_argument("out_npz")
    p.add_argument("--latent-stats", default=None, help="latents_stats.pt of the extraction")
    p.add_argument("--latent-multiplier", type=float, default=1.0, help="the trainer's data.latent_multiplier")
    p.add_argument("--num-samples", type=int, default=50000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--method", default="euler")
    p.add_argument("--shift", type=float, default=0.3)
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--cfg-interval-start", type=float, default=0.0)
    p.add_argument("--guidance", default="all", choices=["all", "reference"])
    p.add_argument("--random-labels", action="store_true", help="i.i.d. labels instead of class-balanced")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    stats = torch.load(a.latent_stats, map_location="cpu") if a.latent_stats else None
    out = generate(load_pretrained(a.dit_dir), load_pretrained(a.vae_dir), a.out_npz, a.num_samples, stats,
                   a.batch_size, a.steps, a.method, a.shift, a.cfg_scale, a.cfg_interval_start, a.guidance,
                   not a.random_labels, a.seed, rank, world, device, latent_multiplier=a.latent_multiplier)
    print(f"wrote {out}" if out else f"rank {rank} done; the last rank to finish writes {a.out_npz}")


if __name__ == "__main__":
    main()
