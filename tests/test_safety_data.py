"""Issue 12, data: extract records its tokenizer and settings and refuses to mix; the latent store refuses latents
that do not fit the model; the scan bounds pixels and aspect ratio, never follows a symlink loop, lists each real
file once and round-trips any legal file name; stats refuse non-finite latents naming shard and index; a shard of
random bytes is a one-line error naming it; the tokenizer producing NaN is refused naming the image.

Issue 21: a FIFO named x.jpg is skipped (never opened), a dangling link is called one, hidden folders and files
are skipped and said, 16-bit PNG / float TIFF are scaled or refused by mode, a foreign shard in a latent folder
is refused by extract.json, bad extract / scan flags (a rank outside the world, sizes below 1) are one line,
the loader names a NaN sample, a full disk leaves no .tmp shard."""
import json
import os
import signal
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from modeling.vavae import AutoencoderKL
from train.data import DataError
from train.data.__main__ import main as data_main
from train.data.extract import extract_latents
from train.data.files import FileList, image_folder, scan
from train.data.images import build_image_loader
from train.data.latents import LatentStore, compute_stats, shard_name

TINY = {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "resolution": 16,
        "z_channels": 4, "embed_dim": 4}


def _images(root, classes=("a", "b"), per_class=2, size=(20, 24)):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(root / c / f"{c}{i}.png")
    return root


def _vae(seed):
    torch.manual_seed(seed)
    return AutoencoderKL(**TINY).eval()


def _extract(vae, files, out, **kw):
    return extract_latents(vae, files, out, **{"image_size": 16, "batch_size": 4, "shard_size": 8,
                                               "num_workers": 0, "progress": False, **kw})


def _cli_error(capsys, argv):
    with pytest.raises(SystemExit) as e:
        data_main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err  # one line, no traceback
    return err[0]


# ----------------------------------------------------------------------------- extract provenance

def test_extract_records_the_tokenizer_and_refuses_to_mix(tmp_path):
    files = image_folder(_images(tmp_path / "img"))
    out = tmp_path / "lat"
    _extract(_vae(0), files, out)
    manifest = json.loads((out / "extract.json").read_text())
    tok = manifest["tokenizer"]
    assert len(tok["sha256"]) == 64 and tok["config"]["embed_dim"] == 4 and tok["params"] > 0
    assert manifest["image_size"] == 16 and manifest["store_dtype"] == "fp32" and "center" in manifest["crop"]
    stats = (out / "latents_stats.pt").read_bytes()
    assert _extract(_vae(0), files, out)["skipped"] == 1  # the same tokenizer (rebuilt): a resumable rerun
    with pytest.raises(DataError, match="tokenizer") as e:  # same architecture, other weights
        _extract(_vae(1), files, out)
    assert str(out) in str(e.value)
    with pytest.raises(DataError, match="image_size 16 vs 32"):
        _extract(_vae(0), files, out, image_size=32)
    with pytest.raises(DataError, match="store_dtype"):
        _extract(_vae(0), files, out, store_dtype="bf16")
    assert (out / "latents_stats.pt").read_bytes() == stats and len(list(out.glob("*.safetensors"))) == 1
    # shards with no manifest (made elsewhere, or extract.json deleted): nothing is added
    (out / "extract.json").unlink()
    with pytest.raises(DataError, match="no extract.json"):
        _extract(_vae(0), files, out)


def test_extract_refuses_non_finite_latents_naming_the_image(tmp_path):
    files = image_folder(_images(tmp_path / "img"))
    vae = _vae(0)
    with torch.no_grad():
        vae.quant_conv.bias[0] = float("nan")
    with pytest.raises(DataError, match=r"non-finite latents for 4 image\(s\): .*a0\.png"):
        _extract(vae, files, tmp_path / "lat")
    assert not list((tmp_path / "lat").glob("*.safetensors"))


# ----------------------------------------------------------------------------- the latent store

def _shard(d, n=4, c=4, h=2, labels=None, fill=0.0, rank=0, shard=0):
    d.mkdir(parents=True, exist_ok=True)
    lat = torch.full((n, c, h, h), fill) + torch.randn(n, c, h, h)
    lab = torch.arange(n, dtype=torch.int64) % 3 if labels is None else torch.as_tensor(labels, dtype=torch.int64)
    save_file({"latents": lat, "latents_flip": lat.flip(3), "labels": lab}, str(d / shard_name(rank, shard)))
    return d / shard_name(rank, shard)


def test_store_refuses_latents_that_do_not_fit_the_model(tmp_path):
    d = tmp_path / "lat"
    _shard(d, labels=[0, 1, 2, 1])
    second = _shard(d, labels=[0, 7, 1, 2], shard=1)
    store = LatentStore.open(d, latent_shape=(4, 2, 2))
    with pytest.raises(DataError, match=r"latents are \(4, 2, 2\).*expects \(32, 16, 16\)"):
        LatentStore.open(d, latent_shape=(32, 16, 16))
    with pytest.raises(DataError, match=rf"{second.name}: label 7 at sample 1 is outside 0\.\.2"):
        LatentStore.open(d, latent_shape=(4, 2, 2), num_classes=3)
    assert store.check(num_classes=8) is store


def test_random_bytes_shard_is_named(tmp_path, capsys):
    d = tmp_path / "lat"
    _shard(d)
    junk = d / shard_name(0, 1)
    junk.write_bytes(b"\xff" * 8 + os.urandom(4000))  # header length 2**64-1: OverflowError before
    with pytest.raises(DataError, match=junk.name):
        LatentStore.open(d)
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"{not json}......")
    with pytest.raises(DataError, match=junk.name):
        LatentStore.open(d)
    assert junk.name in _cli_error(capsys, ["stats", str(d)])


def test_stats_refuse_non_finite_latents_naming_shard_and_index(tmp_path, capsys):
    d = tmp_path / "lat"
    _shard(d)
    path = d / shard_name(0, 1)
    lat = torch.randn(5, 4, 2, 2)
    lat[3, 2, 1, 0] = float("nan")
    save_file({"latents": lat, "latents_flip": lat.clone(), "labels": torch.zeros(5, dtype=torch.int64)}, str(path))
    with pytest.raises(DataError, match=rf"{path.name} index 3"):
        compute_stats(LatentStore.open(d))
    assert f"{path.name} index 3" in _cli_error(capsys, ["stats", str(d)])
    assert not (d / "latents_stats.pt").exists()  # nothing NaN was saved
    with pytest.raises(DataError, match="index 3"):
        LatentStore.open(d).stats


# ----------------------------------------------------------------------------- the scan

def test_scan_bounds_pixels_and_aspect_ratio(tmp_path):
    root = _images(tmp_path / "img")
    Image.new("RGB", (20000, 1), (9, 9, 9)).save(root / "a" / "sliver.png")   # ~100 bytes on disk
    Image.new("RGB", (400, 300)).save(root / "b" / "big.png")
    out = tmp_path / "scan"
    counts = scan(root, out, workers=1, progress=False, max_pixels=100_000)
    bad = dict(line.split("\t") for line in (out / "bad.tsv").read_text().splitlines())
    assert set(bad) == {"a/sliver.png", "b/big.png"} and counts["bad"] == 2
    assert "aspect ratio 20000.0 > max_aspect 10" in bad["a/sliver.png"]
    assert "120000 pixels > max_pixels 100000" in bad["b/big.png"]
    # configurable: raised limits admit the 400 x 300 one; changed limits re-check every file
    counts = scan(root, out, workers=1, progress=False, max_pixels=200_000)
    assert counts["bad"] == 1 and "b/big.png" in FileList.read(out).paths
    # an unscanned listing never resizes the sliver (it would take ~4 GB): a clear error naming it
    loader = build_image_loader(image_folder(root), 16, 8, backend="pil", view="center", num_workers=0,
                                drop_last=False, shuffle=False)
    with pytest.raises(RuntimeError, match=r"sliver\.png.*aspect"):
        list(loader)


def test_scan_cli_limits(tmp_path):
    root = _images(tmp_path / "img")
    Image.new("RGB", (60, 10)).save(root / "b" / "wide.png")
    data_main(["scan", str(root), "--out", str(tmp_path / "s1"), "--workers", "1", "--max-aspect", "5"])
    assert "b/wide.png" in (tmp_path / "s1" / "bad.tsv").read_text()
    data_main(["scan", str(root), "--out", str(tmp_path / "s2"), "--workers", "1", "--max-aspect", "7"])
    assert (tmp_path / "s2" / "bad.tsv").read_text() == ""


def test_symlink_loops_end_and_each_real_file_is_listed_once_under_its_own_class(tmp_path):
    root = _images(tmp_path / "img", classes=("a", "b"), per_class=1)
    os.symlink("..", root / "a" / "up")                       # a loop: a/up/a/up/...
    os.symlink(root / "b", root / "a" / "b_again")              # the other class's folder
    os.symlink(root / "b" / "b0.png", root / "a" / "stolen.png")  # another class's file
    outside = _images(tmp_path / "elsewhere", classes=("c",), per_class=1)
    os.symlink(outside / "c", root / "b" / "linked")            # a folder outside the dataset: followed once
    os.symlink(outside / "c" / "c0.png", root / "b" / "c0_again.png")  # ... and the same file again
    listing = image_folder(root)
    # the outside file once (its first path in ImageFolder order), the others at their own paths and classes
    assert sorted(zip(listing.paths, listing.labels)) == [("a/a0.png", 0), ("b/b0.png", 1), ("b/c0_again.png", 1)]
    counts = scan(root, tmp_path / "scan", workers=1, progress=False)
    assert counts["ok"] == 3 and counts["skipped"] == 4
    skipped = (tmp_path / "scan" / "skipped.tsv").read_text()
    for entry in ("a/up", "a/b_again", "a/stolen.png", "b/linked/c0.png"):
        assert entry in skipped, entry


def test_any_legal_file_name_round_trips(tmp_path):
    root = tmp_path / "img"
    names = ["new\nline.png", "tab\there.png", "100%25.png", "per%cent.png", "sp ace.png", "ünï.png",
             os.fsdecode(b"latin1-\xe9.png"), "back\\slash.png", "cr\r.png"]
    (root / "x").mkdir(parents=True)
    for n in names:
        Image.new("RGB", (16, 16), (3, 4, 5)).save(os.path.join(root, "x", n), format="PNG")
    counts = scan(root, tmp_path / "scan", workers=1, progress=False)
    assert counts["ok"] == len(names) and counts["bad"] == 0
    clean = FileList.read(tmp_path / "scan")
    assert sorted(clean.paths) == sorted(f"x/{n}" for n in names)
    assert all(os.path.isfile(clean.abspath(i)) for i in range(len(clean)))
    assert len((tmp_path / "scan" / "files.tsv").read_text().splitlines()) == len(names)
    assert Path_eq(clean.root, root)


def Path_eq(a, b):
    return os.path.realpath(a) == os.path.realpath(b)


def test_files_tsv_from_an_older_scan_still_reads(tmp_path):
    (tmp_path / "classes.json").write_text('["a"]')
    (tmp_path / "root.txt").write_text("/data/img\n")
    (tmp_path / "files.tsv").write_text("a/100%.png\t0\n")  # v1: raw paths, no format.json
    assert FileList.read(tmp_path).paths == ["a/100%.png"]
    (tmp_path / "files.tsv").write_text("a/x.png\t5\n")
    with pytest.raises(DataError, match=r"files\.tsv line 1"):
        FileList.read(tmp_path)


# ----------------------------------------------------------------------------- issue 21: odd files and flags


@contextmanager
def _no_hang(seconds=60):
    """A FIFO opened for reading blocks forever: fail the test instead of hanging the suite."""
    def fire(*_):
        raise TimeoutError(f"blocked for {seconds}s (a FIFO was opened?)")
    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_a_fifo_named_x_jpg_is_listed_as_skipped_never_opened(tmp_path):
    root = _images(tmp_path / "img")
    os.mkfifo(root / "a" / "x.jpg")
    os.symlink(root / "a" / "deleted.png", root / "b" / "gone.png")  # dangling, pointing inside the dataset
    with _no_hang():
        counts = scan(root, tmp_path / "scan", workers=1, progress=False)
    assert counts["ok"] == 4 and counts["bad"] == 0 and counts["skipped"] == 2
    skipped = dict(line.split("\t") for line in (tmp_path / "scan" / "skipped.tsv").read_text().splitlines())
    assert "FIFO" in skipped["a/x.jpg"]
    assert "dangling symbolic link" in skipped["b/gone.png"] and "inside the dataset" not in skipped["b/gone.png"]
    # a listing made before the FIFO appeared: the loader names it instead of blocking
    files = FileList(root, ["a/a0.png", "a/x.jpg"], [0, 0], ["a", "b"])
    loader = build_image_loader(files, 16, 2, backend="pil", view="center", num_workers=0, drop_last=False,
                                shuffle=False)
    with _no_hang(), pytest.raises(RuntimeError, match=r"x\.jpg.*FIFO"):
        list(loader)


def test_hidden_folders_and_files_are_skipped_and_said(tmp_path, caplog):
    root = _images(tmp_path / "img", classes=("a", "b"), per_class=1)
    _images(root / ".thumbnails", classes=("x",), per_class=1)      # a hidden folder: no class
    (root / "a" / "._a0.png").write_bytes(b"\0\5\26\7 AppleDouble")    # macOS metadata named like an image
    _images(root / "b" / ".cache", classes=("y",), per_class=1)
    with caplog.at_level("WARNING"):
        listing = image_folder(root)
    assert listing.classes == ["a", "b"]  # labels as without the hidden folder
    assert sorted(zip(listing.paths, listing.labels)) == [("a/a0.png", 0), ("b/b0.png", 1)]
    assert "hidden" in caplog.text
    counts = scan(root, tmp_path / "scan", workers=1, progress=False)
    skipped = dict(line.split("\t") for line in (tmp_path / "scan" / "skipped.tsv").read_text().splitlines())
    assert set(skipped) == {".thumbnails", "a/._a0.png", "b/.cache"} and counts["classes"] == 2
    assert all("hidden" in why for why in skipped.values())


def test_16_bit_png_and_float_tiff_are_scaled_or_refused_naming_the_mode(tmp_path):
    from train.data.transforms import ImageRejected, open_rgb
    ramp = np.linspace(0, 1, 32 * 32).reshape(32, 32)
    root = tmp_path / "img"
    (root / "a").mkdir(parents=True)
    Image.fromarray((ramp * 65535).round().astype(np.uint16)).save(root / "a" / "deep.png")  # mode I;16
    Image.fromarray(ramp.astype(np.float32)).save(root / "a" / "float.tif")                 # mode F in [0, 1]
    Image.fromarray((ramp * 1000).astype(np.float32)).save(root / "a" / "hdr.tif")          # mode F, range unknown
    Image.fromarray((ramp * 70000).astype(np.int32)).save(root / "a" / "int32.tif")         # mode I
    want = (ramp * 255).round()
    for name in ("deep.png", "float.tif"):
        got = np.asarray(open_rgb(root / "a" / name)).astype(float)
        assert got.shape == (32, 32, 3) and np.abs(got[..., 0] - want).max() <= 1, name  # not all white / black
    for name, mode in (("hdr.tif", "mode F"), ("int32.tif", "mode I")):
        with pytest.raises(ImageRejected, match=rf"{name}.*{mode}"):
            open_rgb(root / "a" / name)
    scan(root, tmp_path / "scan", workers=1, progress=False)
    bad = dict(line.split("\t") for line in (tmp_path / "scan" / "bad.tsv").read_text().splitlines())
    assert set(bad) == {"a/hdr.tif", "a/int32.tif"} and "mode F" in bad["a/hdr.tif"]
    assert sorted(FileList.read(tmp_path / "scan").paths) == ["a/deep.png", "a/float.tif"]


def test_a_foreign_shard_in_a_latent_folder_is_refused_by_extract_json(tmp_path, capsys):
    files = image_folder(_images(tmp_path / "img", per_class=5))  # 10 images: 2 shards of 8 + 2 on 1 rank
    out = tmp_path / "lat"
    _extract(_vae(0), files, out)
    assert LatentStore.open(out).num_samples == 10
    foreign = out / shard_name(1, 0)
    foreign.write_bytes((out / shard_name(0, 0)).read_bytes())  # another run's rank01 shard dropped in
    with pytest.raises(DataError, match=rf"{foreign.name}: not a shard of this folder's extraction.*1 rank"):
        LatentStore.open(out)
    assert foreign.name in _cli_error(capsys, ["stats", str(out)])
    foreign.unlink()
    (out / shard_name(0, 1)).rename(tmp_path / "elsewhere.safetensors")  # a missing shard
    with pytest.raises(DataError, match=rf"incomplete.*{shard_name(0, 1)}"):
        LatentStore.open(out)
    _shard(out, shard=1, n=5)  # a shard of another size under the right name
    with pytest.raises(DataError, match=rf"{shard_name(0, 1)}: holds 5 samples.*writes 2"):
        LatentStore.open(out)


def test_extract_rank_outside_the_world_and_bad_numbers_are_one_line(tmp_path, capsys, monkeypatch):
    from modeling.config import ConfigError
    root = _images(tmp_path / "img")
    vae_dir = tmp_path / "vae"
    _vae(0).save_pretrained(vae_dir)
    base = ["extract", str(root), str(tmp_path / "lat"), "--vae", str(vae_dir), "--image-size", "16"]
    assert "--rank 3 with --world-size 2" in _cli_error(capsys, [*base, "--rank", "3", "--world-size", "2"])
    with pytest.raises(ConfigError, match="rank 3"):
        _extract(_vae(0), image_folder(root), tmp_path / "lat", rank=3, world_size=2)
    for flags, says in ((["--shard-size", "0"], "--shard-size 0"), (["--workers", "-1"], "--workers -1"),
                        (["--batch-size", "0"], "--batch-size 0"), (["--world-size", "0"], "--world-size 0"),
                        (["--image-size", "7"], "--image-size 7: must be a multiple of the tokenizer's "
                                                 "downsampling factor 2")):
        assert says in _cli_error(capsys, [*base, *flags])
    for flags, says in ((["--max-pixels", "-1"], "--max-pixels -1"), (["--workers", "0"], "--workers 0"),
                        (["--max-aspect", "0"], "--max-aspect 0")):
        assert says in _cli_error(capsys, ["scan", str(root), "--out", str(tmp_path / "s"), *flags])
    monkeypatch.setenv("RANK", "abc")
    assert "$RANK='abc' is not an integer" in _cli_error(capsys, base)
    assert not (tmp_path / "lat").exists() and not (tmp_path / "s").exists()  # refused before writing anything


def test_nan_in_a_shard_is_named_by_the_loader(tmp_path):
    from train.data.latents import LatentLoader
    d = tmp_path / "lat"
    _shard(d, n=4)
    path = d / shard_name(0, 1)
    lat = torch.randn(4, 4, 2, 2)
    flip = lat.clone()
    flip[2, 0, 0, 0] = float("inf")
    save_file({"latents": lat, "latents_flip": flip, "labels": torch.zeros(4, dtype=torch.int64)}, str(path))
    store = LatentStore.open(d)
    loader = LatentLoader(store, batch_size=8, flip_prob=1.0, prefetch=False)
    with pytest.raises(DataError, match=rf"{path.name} index 2 \(latents_flip\)"):
        list(loader)
    assert store.gather(np.array([0, 1]), np.array([True, True]))[0].shape == (2, 4, 2, 2)  # the clean ones


def test_a_full_disk_leaves_no_tmp_file_in_the_latent_folder(tmp_path, monkeypatch):
    import safetensors.torch as st
    files = image_folder(_images(tmp_path / "img"))
    out = tmp_path / "lat"

    def full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)  # a partial write, then the disk is full
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(st, "save_file", full)
    with pytest.raises(OSError, match="No space"):
        _extract(_vae(0), files, out)
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]


def test_extract_out_of_gpu_memory_is_one_line_and_a_smaller_batch_goes_on(tmp_path, capsys, monkeypatch):
    """A --batch-size too large for the card: one line (exit 2) with torch's figures and the flag to lower; the
    batch is not among extract.json's settings, so the same command with a smaller one goes on from the shards
    written. The CUDA error is raised by hand (the CPU has no CUDA allocator)."""
    from oom import cuda_oom
    root = _images(tmp_path / "img", per_class=4)
    vae_dir = tmp_path / "vae"
    _vae(0).save_pretrained(vae_dir)
    out = tmp_path / "lat"
    base = ["extract", str(root), str(out), "--vae", str(vae_dir), "--image-size", "16", "--shard-size", "4",
            "--workers", "0"]
    real = AutoencoderKL.encode
    calls = []

    def encode(self, x, *a, **kw):
        calls.append(x.shape[0])
        if len(calls) == 2 and x.shape[0] > 4:  # the second shard's first batch (the image and its mirror)
            raise cuda_oom("3.00 GiB", "2.10 GiB")
        return real(self, x, *a, **kw)

    monkeypatch.setattr(AutoencoderKL, "encode", encode)
    monkeypatch.delenv("VAVAE_DEBUG", raising=False)
    with pytest.raises(SystemExit) as e:
        data_main([*base, "--batch-size", "4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[:-1] == ["extract: 4/8 img (50%), " + err[0].split(", ", 1)[1]], err
    assert err[0].endswith(" img/s, stopped after 0m00s"), err  # the progress line closed before the error
    line = err[-1]
    assert line == ("error: out of GPU memory (Tried to allocate 3.00 GiB; GPU 0 has a total capacity of 79.19 GiB "
                    "of which 2.10 GiB is free): lower --batch-size (now 4) and run the same command again: the "
                    "finished shards are kept"), line
    assert (out / shard_name(0, 0)).is_file() and not (out / shard_name(0, 1)).exists()
    data_main([*base, "--batch-size", "2"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["skipped"] == 1
    assert LatentStore.open(out).num_samples == 8
