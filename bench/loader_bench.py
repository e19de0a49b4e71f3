"""Latent loader throughput vs the reference's per-sample safetensors reader, measured in the same run.

    python bench/loader_bench.py [--dir DIR] [--num-samples 8192] [--batch-size 256] [--dtype fp32|bf16]

Without --dir it writes synthetic shards in the reference format (32x16x16 latents, as f16d32 at 256px)
into a temporary folder. Both readers run on warm page cache (one untimed pass first). Prints one JSON
line: samples/s of LatentLoader (one process, prefetch thread) and of the reference-style reader, with the
environment block of evaluation.provenance.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from evaluation.provenance import environment
from train.data.latents import LatentLoader, LatentStore, ReferenceLatentReader, shard_name


def write_synthetic(directory: str | Path, num_samples: int, shard_size: int, shape: tuple[int, ...],
                    dtype: torch.dtype) -> None:
    """Shards in the reference's format (latents, latents_flip, labels) with random contents."""
    g = torch.Generator().manual_seed(0)
    for s, lo in enumerate(range(0, num_samples, shard_size)):
        n = min(shard_size, num_samples - lo)
        save_file({"latents": torch.randn((n,) + shape, generator=g).to(dtype),
                   "latents_flip": torch.randn((n,) + shape, generator=g).to(dtype),
                   "labels": torch.randint(0, 1000, (n,), generator=g)}, str(Path(directory) / shard_name(0, s)))


def bench_loader(store: LatentStore, batch_size: int, epochs: int) -> float:
    """Samples per second of LatentLoader over `epochs` epochs, after one untimed epoch (warm page cache)."""
    loader = LatentLoader(store, batch_size=batch_size, seed=0)
    for _ in loader:  # warm-up: page cache
        pass
    n, t0 = 0, time.perf_counter()
    for _ in range(epochs):
        for x, _ in loader:
            n += x.shape[0]
    return n / (time.perf_counter() - t0)


def bench_reference(directory: str | Path, num_reads: int) -> float:
    """Samples per second of the reference-style reader (safe_open per sample) at random indices."""
    reader = ReferenceLatentReader(directory)
    idx = np.random.default_rng(0).permutation(len(reader))[:num_reads]
    for i in idx[: num_reads // 4]:
        reader[int(i)]
    t0 = time.perf_counter()
    for i in idx:
        reader[int(i)]
    return len(idx) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict:
    from modeling.config import cli_parser

    p = cli_parser("bench.loader_bench", __doc__)
    p.add_argument("--dir", help="an existing latent folder (reference shard format)")
    p.add_argument("--num-samples", type=int, default=8192)
    p.add_argument("--shard-size", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--reference-reads", type=int, default=2000)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from train.errors import user_errors
    with user_errors(), tempfile.TemporaryDirectory() as tmp:  # a missing or foreign --dir: one line, exit 2
        directory = args.dir
        if directory is None:
            directory = tmp
            write_synthetic(tmp, args.num_samples, args.shard_size, (32, 16, 16),
                            torch.float32 if args.dtype == "fp32" else torch.bfloat16)
        store = LatentStore.open(directory)
        ours = bench_loader(store, args.batch_size, args.epochs)
        ref = bench_reference(directory, min(args.reference_reads, store.num_samples))
    res = {"bench": "latent_loader", "samples": store.num_samples, "latent_shape": store.latent_shape,
           "stored_dtype": store.stored_dtype, "batch_size": args.batch_size,
           "loader": "LatentLoader(memmap gather, 1 process, prefetch thread)",
           "loader_samples_per_s": round(ours), "reference_reader": "safe_open per sample",
           "reference_samples_per_s": round(ref), "speedup": round(ours / ref, 1),
           "environment": environment("cpu")}  # a CPU benchmark: the card is the CPU
    print(json.dumps(res, default=str))
    return res


if __name__ == "__main__":
    main()
