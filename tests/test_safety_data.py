"""Issue 12, data: extract records its tokenizer and settings and refuses to mix; the latent store refuses latents
that do not fit the model; the scan bounds pixels and aspect ratio, never follows a symlink loop, lists each real
file once and round-trips any legal file name; stats refuse non-finite latents naming shard and index; a shard of
random bytes is a one-line error naming it; the tokenizer producing NaN is refused naming the image."""
import json
import os

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
