"""Scan: bad files are listed and left out, odd-but-decodable ones noted, the class mapping never moves;
the pipelines then read the clean list without crashing (DALI CPU mode and PIL)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from train.data.embedded import PHOTOS, write_embedded
from train.data.files import FileList, image_folder, scan
from train.data.images import build_image_loader

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dirty(tmp_path_factory):
    root = tmp_path_factory.mktemp("dirty") / "images"
    write_embedded(root, size=64, per_class=2)
    good = root / "astronaut" / "astronaut_0000.jpg"
    data = good.read_bytes()
    rgb = Image.open(good).convert("RGB")
    (root / "brick" / "corrupt.jpg").write_bytes(os.urandom(2000))
    (root / "camera" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "chelsea" / "empty.JPEG").write_bytes(b"")
    rgb.convert("CMYK").save(root / "coffee" / "cmyk.jpg")
    rgb.convert("L").save(root / "coins" / "gray.jpg")
    rgb.save(root / "grass" / "png_inside.jpg", format="PNG")
    (root / "aaa_all_bad").mkdir()  # sorts first: dropping it must not shift the other labels
    (root / "aaa_all_bad" / "x.jpg").write_bytes(data[:100])
    (root / "gravel" / "notes.txt").write_text("not an image, not listed")
    return root


def test_scan_reports_and_skips(dirty, tmp_path):
    out = tmp_path / "scan"
    counts = scan(dirty, out, workers=2, progress=False)
    listing = image_folder(dirty)
    assert counts["files"] == len(listing) == 2 * len(PHOTOS) + 7
    assert counts["bad"] == 4 and counts["ok"] == len(listing) - 4
    bad = dict(line.split("\t") for line in (out / "bad.tsv").read_text().splitlines())
    assert set(bad) == {"brick/corrupt.jpg", "camera/truncated.jpg", "chelsea/empty.JPEG", "aaa_all_bad/x.jpg"}
    assert "truncated" in bad["camera/truncated.jpg"]
    notes = dict(line.split("\t") for line in (out / "notes.tsv").read_text().splitlines())
    assert notes == {"coffee/cmyk.jpg": "CMYK", "coins/gray.jpg": "grayscale", "grass/png_inside.jpg": "PNG-in-jpg"}
    assert counts["note:CMYK"] == 1 and counts["empty_classes"] == ["aaa_all_bad"]
    clean = FileList.read(out)
    assert clean.classes == listing.classes and clean.classes[0] == "aaa_all_bad"
    full = dict(zip(listing.paths, listing.labels))
    assert all(full[p] == y for p, y in zip(clean.paths, clean.labels)) and not set(bad) & set(clean.paths)
    assert Path(clean.root) == dirty.resolve()


def test_scan_resumes_from_partial(dirty, tmp_path):
    out = tmp_path / "scan"
    out.mkdir()
    # a previous (killed) run: one result recorded (deliberately "ok" for a corrupt file, so a re-check would
    # show), then a torn line
    (out / "scan.partial.jsonl").write_text(
        json.dumps({"path": "brick/corrupt.jpg", "status": "ok", "note": ""}) + '\n{"path": "camera/tr')
    counts = scan(dirty, out, workers=1, progress=False)
    assert "brick/corrupt.jpg" in FileList.read(out).paths  # trusted, not re-checked
    assert counts["bad"] == 3
    lines = (out / "scan.partial.jsonl").read_text().splitlines()
    assert len([ln for ln in lines if ln.startswith("{") and ln.endswith("}")]) == counts["files"]


def test_a_file_changed_since_its_verdict_is_checked_again(tmp_path):
    """The partial results were keyed on the path alone: a file truncated after its scan stayed 'ok' on every rerun,
    and extract then failed on it while advising the scan that had just passed it."""
    root = tmp_path / "images"
    write_embedded(root, size=32, per_class=1)
    assert scan(root, tmp_path / "scan", workers=1, progress=False)["bad"] == 0
    victim = root / "brick" / "brick_0000.jpg"
    victim.write_bytes(victim.read_bytes()[:200])
    counts = scan(root, tmp_path / "scan", workers=1, progress=False)
    assert counts["bad"] == 1 and "brick/brick_0000.jpg" not in FileList.read(tmp_path / "scan").paths


def test_clean_list_feeds_dali_and_pil(dirty, tmp_path):
    scan(dirty, tmp_path / "scan", workers=2, progress=False)
    clean = FileList.read(tmp_path / "scan")
    batches = {}
    for backend in ("pil", "dali"):
        kw = {"num_workers": 0} if backend == "pil" else {"dali_device": "cpu"}
        loader = build_image_loader(clean, 32, 8, backend=backend, view="train", seed=0, drop_last=False, **kw)
        batches[backend] = list(loader)
    for (xp, yp), (xd, yd) in zip(batches["pil"], batches["dali"]):
        assert torch.equal(yp, yd) and xp.shape == xd.shape == (8, 3, 32, 32)
        assert (xp - xd).abs().mean() < 0.05  # same crops and flips; the resize rounds differently
    # the unscanned listing makes DALI stop with a message that points at the scan
    raw = image_folder(dirty)
    with pytest.raises(RuntimeError, match="scan"):
        list(build_image_loader(raw, 32, 8, backend="dali", view="center", dali_device="cpu", drop_last=False))


def test_scan_cli(dirty, tmp_path):
    out = tmp_path / "cli_scan"
    r = subprocess.run([sys.executable, "-m", "train.data", "scan", str(dirty), "--out", str(out), "--workers", "2"],
                       cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    counts = json.loads(r.stdout.strip().splitlines()[-1])
    assert counts["bad"] == 4 and (out / "files.tsv").is_file()
    assert np.all(np.diff([int(line.split("\t")[1]) for line in (out / "files.tsv").read_text().splitlines()]) >= 0)


def test_debug_is_taken_after_the_subcommand_too(tmp_path, capsys):
    """`python -m train.data scan X --debug` was "unrecognized arguments"; before the subcommand it worked."""
    from train.data.__main__ import main
    for argv in (["--debug", "scan", str(tmp_path / "none")], ["scan", str(tmp_path / "none"), "--debug"]):
        with pytest.raises(FileNotFoundError, match="image folder not found"):
            main(argv)
    with pytest.raises(SystemExit) as e:
        main(["scan", str(tmp_path / "none")])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: image folder not found")
