"""Issue 21: every malformed npz handed to `evaluation.fid` or `evaluation.tokenizer_metrics` is one line that
names the file, exit status 2, before any network loads; nothing in an npz is ever unpickled."""
import re
from pathlib import Path

import numpy as np
import pytest

from evaluation import fid as fid_cli
from evaluation import tokenizer_metrics as tok_cli

MARKER = Path(__file__).with_name("_unpickled_marker")


class Planted:
    """Unpickling this would write MARKER: a pickled npz member must never be loaded."""

    def __reduce__(self):
        return (MARKER.write_text, ("code from an npz ran",))


def _rgb(n, size=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _write_bad(kind, path):
    """Write a malformed batch of the given kind at path (or leave it missing); returns what the error says."""
    if kind == "missing":
        return "no such file"
    if kind == "folder":
        path.mkdir()
        return "not a regular file"
    if kind == "empty file":
        path.write_bytes(b"")
        return "empty file"
    if kind == "no arrays":
        np.savez(path)
        return "no arr_0 (has: nothing)"
    if kind == "no arr_0":
        np.savez(path, images=_rgb(4))
        return "no arr_0 (has: images)"
    if kind == "float":
        np.savez(path, arr_0=_rgb(4).astype(np.float32) / 255)
        return "arr_0 is float32; expected uint8"
    if kind == "grayscale":
        np.savez(path, arr_0=_rgb(4)[..., 0])
        return "grayscale images (4, 16, 16)"
    if kind == "grayscale 1-channel":
        np.savez(path, arr_0=_rgb(4)[..., :1])
        return "grayscale images (4, 16, 16, 1)"
    if kind == "single image":
        np.savez(path, arr_0=_rgb(1))
        return "1 image(s)"
    if kind == "no images":
        np.savez(path, arr_0=_rgb(0))
        return "0 image(s)"
    if kind == "truncated":
        np.savez(path, arr_0=_rgb(8))
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return "truncated (it starts as an npz archive, but its end, the zip directory, is missing"
    if kind == "truncated member":  # the archive's directory intact, the array's bytes cut
        np.savez(path, arr_0=_rgb(8))
        data = bytearray(path.read_bytes())
        i = data.index(b"\x93NUMPY")
        path.write_bytes(bytes(data[: i + 200]) + bytes(data[len(data) - 200:]))
        return "arr_0 unreadable, the file is truncated or corrupt"
    if kind == "object array":
        np.savez(path, arr_0=np.array([Planted(), Planted()], dtype=object))
        return "arr_0 is an object (pickled) array, which is never loaded"
    if kind == "npy":
        with open(path, "wb") as f:
            np.save(f, _rgb(4))
        return "not an npz archive"
    if kind == "text":
        path.write_text("not numpy at all\n")
        return "not an npz archive (numpy would read it as a pickle, which is never loaded)"
    raise AssertionError(kind)


KINDS = ["missing", "folder", "empty file", "no arrays", "no arr_0", "float", "grayscale", "grayscale 1-channel",
         "single image", "no images", "truncated", "truncated member", "object array", "npy", "text"]


def _one_line_exit_2(capsys, run, path, says):
    MARKER.unlink(missing_ok=True)
    with pytest.raises(SystemExit) as e:
        run()
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert str(path) in err and says in err, err
    assert not MARKER.exists(), "an npz member was unpickled"


@pytest.mark.parametrize("kind", KINDS)
def test_fid_sample_batch(kind, tmp_path, capsys):
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=_rgb(5, seed=1))
    bad = tmp_path / "samples.npz"
    says = _write_bad(kind, bad)
    if kind == "folder":  # a folder is a folder of sample images to the fid command (the authors' output)
        says = "a folder without images (.jpg"
    _one_line_exit_2(capsys, lambda: fid_cli.main([str(ref), str(bad), "--device", "cpu"]), bad, says)


@pytest.mark.parametrize("kind", KINDS)
def test_fid_reference_batch(kind, tmp_path, capsys):
    sam = tmp_path / "samples.npz"
    np.savez(sam, arr_0=_rgb(5, seed=1))
    bad = tmp_path / "ref.npz"
    says = _write_bad(kind, bad)
    if kind == "no arr_0":
        says = "no arr_0 and no stored statistics"
    elif kind == "no arrays":
        says = "has: nothing"
    _one_line_exit_2(capsys, lambda: fid_cli.main([str(bad), str(sam), "--device", "cpu"]), bad, says)


def test_fid_reference_statistics_checked(tmp_path, capsys):
    sam = tmp_path / "samples.npz"
    np.savez(sam, arr_0=_rgb(5, seed=1))
    bad = tmp_path / "ref.npz"
    np.savez(bad, arr_0=_rgb(5), mu=np.zeros(8))  # sigma missing
    _one_line_exit_2(capsys, lambda: fid_cli.main([str(bad), str(sam), "--device", "cpu"]), bad,
                     "has mu without sigma")
    np.savez(bad, arr_0=_rgb(5), mu=np.zeros(8), sigma=np.eye(7))
    _one_line_exit_2(capsys, lambda: fid_cli.main([str(bad), str(sam), "--device", "cpu"]), bad,
                     "expected float (D,) and (D, D) statistics")


@pytest.mark.parametrize("kind", KINDS)
def test_tokenizer_metrics_images(kind, tmp_path, capsys):
    bad = tmp_path / "images.npz"
    says = _write_bad(kind, bad)
    if kind == "single image":
        says = "rFID statistics (or pass --no-rfid) need at least 2"
    if kind == "folder":  # a folder is a folder of images to the tokenizer metrics (the authors' input)
        says = "no images (.jpg"
    # the VAE argument is never reached: the npz is checked first
    _one_line_exit_2(capsys, lambda: tok_cli.main([str(tmp_path / "vae-not-read"), str(bad), "--device", "cpu"]),
                     bad, says)


def test_argument_mistakes_are_one_line(tmp_path, capsys):
    ok = tmp_path / "ok.npz"
    np.savez(ok, arr_0=_rgb(4))
    for argv, says in [([str(ok), str(ok), "--batch-size", "0"], "--batch-size 0: must be at least 1"),
                       ([str(ok), str(ok), "--json", str(tmp_path / "no" / "dir" / "x.json")], "does not exist"),
                       ([str(ok), str(ok), "--metrics", ""], "--metrics: no metric selected")]:
        with pytest.raises(SystemExit) as e:
            fid_cli.main(argv + ["--device", "cpu"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and says in err, err
    with pytest.raises(SystemExit) as e:
        tok_cli.main([str(tmp_path / "vae"), str(ok), "--limit", "0", "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--limit 0" in err


def test_no_allow_pickle_in_evaluation():
    """np.load of a user file never unpickles (the object-array cases above show the behaviour; this keeps the
    flag itself out of the package)."""
    root = Path(__file__).resolve().parents[1] / "evaluation"
    hits = [f"{p.name}:{i}" for p in root.rglob("*.py") for i, line in enumerate(p.read_text().splitlines(), 1)
            if re.search(r"allow_pickle\s*=\s*True", line)]
    assert not hits, hits
