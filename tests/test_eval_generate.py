"""Sharded, resumable sample generation and the tokenizer metrics on tiny models."""
import numpy as np
import torch

from evaluation.generate import generate, sample_labels
from modeling.lightningdit import LightningDiT
from modeling.vavae import AutoencoderKL


def _tiny():
    torch.manual_seed(0)
    dit = LightningDiT(input_size=4, patch_size=1, in_channels=4, hidden_size=32, depth=1, num_heads=2,
                       num_classes=3)
    vae = AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), resolution=8, z_channels=4,
                        embed_dim=4)
    return dit, vae


def test_labels_class_balanced():
    y = sample_labels(10, 3, seed=1)
    assert sorted(np.bincount(y.numpy()).tolist()) == [3, 3, 4]
    assert torch.equal(y, sample_labels(10, 3, seed=1))


def test_generate_sharded_resumable_matches_single_rank(tmp_path):
    dit, vae = _tiny()
    kw = dict(num_samples=7, steps=3, cfg_scale=2.0, seed=3, progress=False)
    single = generate(dit, vae, tmp_path / "one.npz", batch_size=4, **kw)
    # Two ranks, another batch size: rank 0 alone cannot merge, rank 1 completes it.
    assert generate(dit, vae, tmp_path / "two.npz", batch_size=2, rank=0, world_size=2, **kw) is None
    chunks = sorted((tmp_path / "two.chunks").glob("chunk_*.npz"))
    mtimes = {c: c.stat().st_mtime_ns for c in chunks}
    chunks[-1].unlink()  # a chunk lost to a crash is redone; the others are not
    two = generate(dit, vae, tmp_path / "two.npz", batch_size=2, rank=1, world_size=2, **kw)
    assert two is None
    two = generate(dit, vae, tmp_path / "two.npz", batch_size=2, rank=0, world_size=2, **kw)
    assert all(c.stat().st_mtime_ns == t for c, t in mtimes.items() if c.exists() and c != chunks[-1])
    with np.load(single) as a, np.load(two) as b:
        assert a["arr_0"].shape == (7, 8, 8, 3) and a["arr_0"].dtype == np.uint8
        np.testing.assert_array_equal(a["arr_1"], sample_labels(7, 3, seed=3).numpy())
        np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
        np.testing.assert_allclose(a["arr_0"].astype(int), b["arr_0"].astype(int), atol=1)
        assert len({a["arr_0"][i].tobytes() for i in range(7)}) == 7  # distinct noise per sample


def test_reconstruction_metrics_tiny_vae():
    from evaluation.tokenizer_metrics import reconstruction_metrics

    def features(images):  # a cheap stand-in for Inception: per-channel pixel statistics
        x = images.float().flatten(1, 2)
        return {"pool": torch.cat([x.mean(1), x.std(1), x.amax(1)], 1)}

    _, vae = _tiny()
    images = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8).numpy()
    res, rec = reconstruction_metrics(vae, images, batch_size=3, inception=features, progress=False)
    assert rec.shape == images.shape and rec.dtype == np.uint8
    assert 0 < res["psnr"] < 40 and -1 < res["ssim"] < 1 and np.isfinite(res["rfid"]) and res["num_images"] == 4
