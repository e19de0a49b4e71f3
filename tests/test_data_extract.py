"""Latent extraction: reference semantics, rank sharding, stats, bf16 storage, resume after a kill."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from modeling.vavae import AutoencoderKL
from train.data.embedded import write_embedded
from train.data.extract import extract_latents, shard_seed
from train.data.files import image_folder
from train.data.latents import LatentStore, shard_name
from train.data.transforms import center_crop_arr, open_rgb, to_tensor

REPO = Path(__file__).resolve().parents[1]
TINY = {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "resolution": 32,
        "z_channels": 4, "embed_dim": 4}
SIZE = 32


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("extract")
    write_embedded(base / "images", size=48, per_class=2)
    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY).eval()
    torch.save({"state_dict": vae.state_dict(), "linear_proj.weight": torch.zeros(1)}, base / "vae.pt")
    return base, image_folder(base / "images"), vae


def run(vae, files, out, **kw):
    kw = {"image_size": SIZE, "batch_size": 5, "shard_size": 8, "num_workers": 0, "progress": False} | kw
    return extract_latents(vae, files, out, **kw)


def test_shards_are_reference_semantics(setup, tmp_path):
    _, files, vae = setup
    res = run(vae, files, tmp_path)
    assert res == {"written": 4, "skipped": 0, "stats": True}  # 28 images, 8 per shard
    shard = load_file(str(tmp_path / shard_name(0, 1)))
    idx = shard["indices"].numpy()
    np.testing.assert_array_equal(idx, np.arange(8, 16))
    assert shard["labels"].tolist() == [files.labels[i] for i in idx]
    # recompute: center crop -> [-1, 1] -> encode image and mirror -> posterior.sample(seeded generator)
    x = torch.stack([to_tensor(center_crop_arr(open_rgb(files.abspath(i)), SIZE)) for i in idx])
    gen = torch.Generator().manual_seed(shard_seed(0, 0, 1))
    with torch.no_grad():
        z = torch.cat([vae.encode(torch.cat([x[:5], x[:5].flip(3)])).sample(gen),
                       vae.encode(torch.cat([x[5:], x[5:].flip(3)])).sample(gen)])
    torch.testing.assert_close(shard["latents"], torch.cat([z[:5], z[10:13]]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shard["latents_flip"], torch.cat([z[5:10], z[13:]]), rtol=1e-5, atol=1e-5)
    store = LatentStore.open(tmp_path)
    assert store.num_samples == len(files) and store.latent_shape == (4, SIZE // 2, SIZE // 2)
    lat, _, _ = store.gather(np.arange(len(files)))
    mean, std = store.stats
    torch.testing.assert_close(mean, lat.mean(dim=[0, 2, 3], keepdim=True))
    torch.testing.assert_close(std, lat.std(dim=[0, 2, 3], keepdim=True))
    # rerun: everything skipped; other settings into the same folder are refused
    assert run(vae, files, tmp_path)["skipped"] == 4
    with pytest.raises(ValueError, match="other settings"):
        run(vae, files, tmp_path, seed=1)


def test_rank_sharding_and_bf16(setup, tmp_path):
    _, files, vae = setup
    ref = tmp_path / "ref"
    run(vae, files, ref, shard_size=100)
    two = tmp_path / "two"
    assert run(vae, files, two, shard_size=100, world_size=2, rank=0, seed=0)["stats"] is False  # rank 1 not done
    assert run(vae, files, two, shard_size=100, world_size=2, rank=1, seed=0)["stats"] is True
    idx = [load_file(str(two / shard_name(r, 0)))["indices"] for r in range(2)]
    assert idx[0].tolist() == list(range(0, 28, 2)) and idx[1].tolist() == list(range(1, 28, 2))
    bf = tmp_path / "bf16"
    run(vae, files, bf, shard_size=100, store_dtype="bf16")
    size = {d: os.path.getsize(d / shard_name(0, 0)) for d in (ref, bf)}
    assert size[bf] < 0.6 * size[ref]
    a, b = LatentStore.open(ref), LatentStore.open(bf)
    assert b.stored_dtype == "BF16"
    la, _, _ = a.gather(np.arange(28))
    lb, _, _ = b.gather(np.arange(28))
    torch.testing.assert_close(lb, la.to(torch.bfloat16).float(), rtol=0, atol=0)  # same noise, rounded
    torch.testing.assert_close(b.stats[0], a.stats[0], rtol=0, atol=1e-2)
    torch.testing.assert_close(b.stats[1], a.stats[1], rtol=1e-2, atol=0)


def test_dali_cpu_extraction_runs(setup, tmp_path):
    _, files, vae = setup
    run(vae, files, tmp_path, backend="dali", dali_device="cpu", shard_size=100)
    assert LatentStore.open(tmp_path).num_samples == len(files)


def _cli(base, out, *extra):
    return [sys.executable, "-m", "train.data", "extract", str(base / "images"), str(out), "--vae",
            str(base / "vae.pt"), "--vae-config", json.dumps(TINY), "--image-size", str(SIZE), "--batch-size", "2",
            "--shard-size", "4", "--workers", "0", *extra]


def _one_fake_gpu(monkeypatch) -> list:
    """torch believes one GPU is here, current index 0; the driver's set-device call is recorded instead (torch's
    own argument check runs before it)."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch._C, "_cuda_setDevice", calls.append, raising=False)  # absent from CPU builds
    return calls


def test_extract_device_cuda_makes_the_current_gpu_current(setup, tmp_path, monkeypatch, capsys):
    """`--device cuda` (no index): torch.cuda.set_device refuses a bare "cuda", so the command died with a
    traceback (a review, 2026-12-05). It is the current GPU, by its index, handed to the extraction as cuda:0."""
    import train.data.extract as extract
    from train.data.__main__ import main
    base, _, _ = setup
    calls, seen = _one_fake_gpu(monkeypatch), []
    monkeypatch.setattr(extract, "extract_latents", lambda *a, **kw: seen.append(kw["device"]) or {})
    main(_cli(base, tmp_path / "lat", "--device", "cuda")[3:])
    assert calls == [0] and seen == [torch.device("cuda", 0)]
    with pytest.raises(SystemExit) as e:  # an index past the last GPU: one line naming the flag, exit 2
        main(_cli(base, tmp_path / "lat", "--device", "cuda:3")[3:])
    assert e.value.code == 2 and "--device cuda:3: there are 1 CUDA device(s)" in capsys.readouterr().err


def test_resume_after_kill_is_identical(setup, tmp_path):
    base, files, vae = setup
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli(base, out), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (out / shard_name(0, 1)).exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in out.glob("*.safetensors"))
    assert 2 <= len(done) < 7, done  # killed part-way (7 shards in all)
    # a torn file of an earlier crash at a later shard's name is detected and redone
    (out / shard_name(0, 5)).write_bytes((out / shard_name(0, 0)).read_bytes()[:300])
    r = subprocess.run(_cli(base, out), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["skipped"] >= 2 and result["written"] + result["skipped"] == 7 and result["stats"]
    # the same extraction uninterrupted, in-process with the same thread count: bit-identical shards and stats
    fresh = tmp_path / "fresh"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(vae, files, fresh, batch_size=2, shard_size=4)
    finally:
        torch.set_num_threads(threads)
    for s in range(7):
        a, b = load_file(str(out / shard_name(0, s))), load_file(str(fresh / shard_name(0, s)))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (s, k)
    assert not list(out.glob("*.tmp"))
    sa = torch.load(out / "latents_stats.pt", weights_only=True)
    sb = torch.load(fresh / "latents_stats.pt", weights_only=True)
    assert torch.equal(sa["mean"], sb["mean"]) and torch.equal(sa["std"], sb["std"])


def test_compare_paths_reports_small_moves(setup):
    from train.data.compare import compare_paths

    _, files, vae = setup
    res = compare_paths(vae, files, image_size=SIZE, batch_size=7, dali_device="cpu", num_workers=0)
    d, b = res["dali_vs_pil"], res["bf16_vs_fp32"]
    assert 0 < d["latent_rel_l2_diff_mean"] < 0.2 and d["std_max_rel_diff"] < 0.1  # 48px -> 32px: resized
    assert 0 < b["latent_rel_l2_diff_max"] < 5e-3 and b["mean_max_abs_diff"] < 1e-3


def test_extract_reads_the_tokenizers_architecture_from_its_weights(setup, tmp_path):
    """A tokenizer of another width than the default f16d32 (a trainer's tokenizer.pt from the tiny config) needed
    --vae-config, and without it the error was a 2 KB line naming neither the file nor the flag (a review,
    2026-12-05). The architecture is now read from the weights, as from_pretrained does."""
    from train.data.__main__ import _vae
    base, _, vae = setup
    got = _vae(str(base / "vae.pt"), None)
    assert got.config.ch == TINY["ch"] and tuple(got.config.ch_mult) == tuple(TINY["ch_mult"])
    assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), vae.state_dict().values()))
