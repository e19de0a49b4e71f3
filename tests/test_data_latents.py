"""Latent store + loader: reference shard format, gathers, flips, ranks, exact resume, stats."""
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from train.data.latents import (EpochSampler, LatentLoader, LatentStore, ReferenceLatentReader, compute_stats,
                                shard_name)

C, H, W = 4, 3, 5


def write_reference_shards(directory, sizes, dtype=torch.float32, seed=0):
    """Shards as LightningDiT's extract_features.py writes them; returns the full arrays in sample order."""
    g = torch.Generator().manual_seed(seed)
    all_lat, all_flip, all_lab = [], [], []
    for s, n in enumerate(sizes):
        lat = torch.randn(n, C, H, W, generator=g).to(dtype)
        flip = torch.randn(n, C, H, W, generator=g).to(dtype)
        lab = torch.randint(0, 10, (n,), generator=g)
        save_file({"latents": lat, "latents_flip": flip, "labels": lab}, str(directory / shard_name(0, s)),
                  metadata={"total_size": f"{n}", "dtype": f"{lat.dtype}", "device": "cpu"})
        all_lat.append(lat)
        all_flip.append(flip)
        all_lab.append(lab)
    return torch.cat(all_lat).float(), torch.cat(all_flip).float(), torch.cat(all_lab)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_matches_reference_reader(tmp_path, dtype):
    lat, flip, lab = write_reference_shards(tmp_path, [7, 1, 12], dtype)
    store = LatentStore.open(tmp_path)
    ref = ReferenceLatentReader(tmp_path)
    assert store.num_samples == len(ref) == 20 and store.latent_shape == (C, H, W)
    idx = np.array([19, 0, 7, 3, 8, 3, 12])
    fl = np.array([True, False, True, False, False, True, True])
    out, labels, order = store.gather(idx, fl)
    assert out.dtype == torch.float32 and labels.dtype == torch.int64 and out.is_contiguous()
    assert not fl[order][:3].any() and fl[order][3:].all()  # un-flipped first
    for j, k in enumerate(order):
        f_ref, y_ref = ref.get(int(idx[k]), flip=bool(fl[k]))
        torch.testing.assert_close(out[j], f_ref.float(), rtol=0, atol=0)
        assert labels[j] == y_ref == lab[idx[k]]
        torch.testing.assert_close(out[j], (flip if fl[k] else lat)[idx[k]], rtol=0, atol=0)


def test_stats_as_reference_and_cached(tmp_path):
    lat, _, _ = write_reference_shards(tmp_path, [30, 25])
    store = LatentStore.open(tmp_path)
    mean, std = store.stats
    torch.testing.assert_close(mean, lat.mean(dim=[0, 2, 3], keepdim=True))
    torch.testing.assert_close(std, lat.std(dim=[0, 2, 3], keepdim=True))
    assert (tmp_path / "latents_stats.pt").is_file()
    # a saved file wins (the reference caches latents_stats.pt the same way)
    torch.save({"mean": torch.zeros(1, C, 1, 1), "std": torch.full((1, C, 1, 1), 2.0)},
               tmp_path / "latents_stats.pt")
    assert LatentStore.open(tmp_path).stats[1].eq(2.0).all()
    sub = compute_stats(store, max_samples=10)  # a random subset, seeded
    torch.testing.assert_close(sub["mean"], compute_stats(store, max_samples=10)["mean"])
    assert not torch.allclose(sub["mean"], mean)


def test_loader_epoch_ranks_flips(tmp_path):
    lat, flip, lab = write_reference_shards(tmp_path, [10, 13])
    store = LatentStore.open(tmp_path)
    seen = []
    for rank in range(2):
        loader = LatentLoader(store, batch_size=4, seed=3, rank=rank, world_size=2, flip_prob=0.5)
        assert len(loader) == 2  # 23 // 8 with drop_last
        for x, y in loader:
            assert x.shape == (4, C, H, W) and y.shape == (4,)
            for row, label in zip(x, y):
                hit = [i for i in range(23) if torch.equal(row, lat[i]) or torch.equal(row, flip[i])]
                assert len(hit) == 1 and lab[hit[0]] == label
                seen.append((hit[0], torch.equal(row, flip[hit[0]])))
    ids = [i for i, _ in seen]
    assert len(set(ids)) == 16  # ranks never overlap
    n_flip = sum(f for _, f in seen)
    assert 0 < n_flip < 16
    # next epoch is a different permutation
    loader = LatentLoader(store, batch_size=4, seed=3, world_size=1)
    e0 = torch.cat([y for _, y in loader])
    e1 = torch.cat([y for _, y in loader])
    assert loader.state_dict()["epoch"] == 2 and not torch.equal(e0, e1)


def test_loader_no_drop_last_covers_all(tmp_path):
    write_reference_shards(tmp_path, [11])
    sampler = EpochSampler(11, batch_size=3, world_size=2, drop_last=False)
    plan = sampler.epoch_plan(0)
    got = np.concatenate([sampler.rank_batch(plan, g)[0] for g in range(sampler.batches_per_epoch)])
    assert sampler.batches_per_epoch == 2 and set(got.tolist()) <= set(range(11)) and len(got) == 6
    both = [EpochSampler(11, 3, rank=r, world_size=2, drop_last=False) for r in range(2)]
    all_ids = np.concatenate([s.rank_batch(plan, g)[0] for s in both for g in range(2)])
    assert set(all_ids.tolist()) == set(range(11))


@pytest.mark.parametrize("prefetch", [True, False])
def test_loader_exact_resume(tmp_path, prefetch):
    write_reference_shards(tmp_path, [9, 9])
    store = LatentStore.open(tmp_path)
    full = LatentLoader(store, batch_size=4, seed=7, prefetch=prefetch)
    ref = [b for _ in range(2) for b in full]  # two epochs, 8 batches
    run = LatentLoader(store, batch_size=4, seed=7, prefetch=prefetch)
    it = iter(run)
    first = [next(it) for _ in range(3)]
    state = run.state_dict()
    del it
    resumed = LatentLoader(LatentStore.open(tmp_path), batch_size=4, seed=7, prefetch=prefetch)
    resumed.load_state_dict(state)
    rest = list(resumed) + list(resumed)
    got = first + rest
    assert len(got) == len(ref) == 8
    for (a, ya), (b, yb) in zip(got, ref):
        assert torch.equal(a, b) and torch.equal(ya, yb)
    # resuming on 2 ranks x batch 2 at the same global position gives the same samples
    two = [LatentLoader(store, batch_size=2, seed=7, rank=r, world_size=2) for r in range(2)]
    for t in two:
        t.load_state_dict(state)
    a, b = next(iter(two[0])), next(iter(two[1]))
    assert sorted(torch.cat([a[1], b[1]]).tolist()) == sorted(ref[3][1].tolist())
    with pytest.raises(ValueError, match="seed"):
        LatentLoader(store, batch_size=4, seed=8).load_state_dict(state)


def test_bad_store_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        LatentStore.open(tmp_path)
    save_file({"latents": torch.zeros(2, C, H, W), "labels": torch.zeros(2, dtype=torch.int64)},
              str(tmp_path / shard_name(0, 0)))
    with pytest.raises(ValueError, match="latents_flip"):
        LatentStore.open(tmp_path)
    write_reference_shards(tmp_path, [5])
    path = tmp_path / shard_name(0, 0)
    path.write_bytes(path.read_bytes()[:-40])  # a half-written shard
    with pytest.raises(ValueError, match="truncated"):
        LatentStore.open(tmp_path)
