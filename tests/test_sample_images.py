"""Sampling from released-format checkpoints through the public API and the CLI."""
import pytest
import torch

from modeling import (AutoencoderKL, CheckpointMismatchError, LightningDiT, load_dit_checkpoint, load_vavae_checkpoint,
                      save_pretrained)
from modeling.sample_images import generate, load_dit, main


def _fixture_models(parity_dir, parity_configs):
    c = {k: v for k, v in parity_configs["lightningdit_a"].items() if k != "kind"}
    dit = load_dit_checkpoint(parity_dir / "lightningdit_a.pt", LightningDiT(**c))
    v = parity_configs["vavae_a"]
    vae = load_vavae_checkpoint(parity_dir / "vavae_a.pt", AutoencoderKL(
        ch=v["ch"], ch_mult=v["ch_mult"], num_res_blocks=v["num_res_blocks"], attn_resolutions=v["attn_resolutions"],
        resolution=v["resolution"], z_channels=v["z_channels"], embed_dim=v["embed_dim"]))
    return dit, vae


def test_fixture_checkpoint_samples_reference_output(parity_dir, parity_configs):
    """The issue's done-when: a fixture checkpoint loaded through the public API samples `sample_out`
    with the 8-point shifted Euler grid and (reference-mode) guidance, then decodes to images."""
    from modeling import sample
    dit, vae = _fixture_models(parity_dir, parity_configs)
    io = torch.load(parity_dir / "lightningdit_a_io.pt", weights_only=False)
    out = sample(dit.eval(), io["sample_z"], io["sample_y"], steps=8, shift=0.3, cfg_scale=3.0,
                 cfg_interval_start=0.11, guidance="reference")
    torch.testing.assert_close(out, io["sample_out"], rtol=1e-4, atol=1e-5)
    images = vae.eval().decode_to_images(out)
    assert images.shape == (2, 128, 128, 3) and images.dtype == torch.uint8


def test_generate_and_cli(parity_dir, parity_configs, tmp_path):
    dit, vae = _fixture_models(parity_dir, parity_configs)
    mean, std = torch.randn(1, 32, 1, 1), torch.rand(1, 32, 1, 1) + 0.5
    a = generate(dit, vae, [1, 2], mean, std, steps=4, cfg_scale=2.0, seed=5)
    b = generate(dit, vae, [1, 2], mean, std, steps=4, cfg_scale=2.0, seed=5)
    assert torch.equal(a, b) and a.shape == (2, 128, 128, 3)
    save_pretrained(dit, dit.config, tmp_path / "dit")
    save_pretrained(vae, vae.config, tmp_path / "vae")
    torch.save({"mean": mean, "std": std}, tmp_path / "stats.pt")
    out = tmp_path / "grid.png"
    main(["--dit", str(tmp_path / "dit"), "--vae", str(tmp_path / "vae"), "--stats", str(tmp_path / "stats.pt"),
          "--labels", "1", "2", "--steps", "4", "--cfg-scale", "2.0", "--seed", "5", "--out", str(out)])
    from PIL import Image
    grid = torch.from_numpy(__import__("numpy").array(Image.open(out)))
    assert grid.shape == (128, 256, 3)
    assert torch.equal(grid[:, :128], a[0]) and torch.equal(grid[:, 128:], a[1])
    # a released file needs no size (read from the weights); a given size is checked against them
    assert torch.equal(load_dit(parity_dir / "lightningdit_a.pt").pos_embed, dit.pos_embed)
    with pytest.raises(CheckpointMismatchError, match="not a XL/1 model"):
        load_dit(parity_dir / "lightningdit_a.pt", size="XL/1", input_size=8, num_classes=10)


def test_released_file_samples_with_the_authors_settings(parity_dir, parity_configs, tmp_path, capsys):
    """A file named as a released checkpoint samples with its preset (reference guidance, cfg 6.7 from 0.125);
    a flag given on the command line overrides one setting; the grid equals the API with those settings."""
    import numpy as np
    from PIL import Image
    dit, vae = _fixture_models(parity_dir, parity_configs)
    released = tmp_path / "lightningdit-xl-imagenet256-800ep.pt"
    released.write_bytes((parity_dir / "lightningdit_a.pt").read_bytes())
    with pytest.raises(SystemExit):  # the authors' DiT without latent statistics: refused before sampling
        main(["--dit", str(released), "--vae", str(parity_dir / "vavae_a.pt"), "--labels", "3", "--out",
              str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert "samples latents normalised by their statistics; pass --stats latents_stats.pt" in err, err
    assert err.count("\n") == 1 and not (tmp_path / "x.png").exists()
    torch.save({"mean": torch.zeros(1, 32, 1, 1), "std": torch.ones(1, 32, 1, 1)}, tmp_path / "latents_stats.pt")
    main(["--dit", str(released), "--vae", str(parity_dir / "vavae_a.pt"), "--labels", "3", "--steps", "4",
          "--seed", "2", "--no-progress", "--out", str(tmp_path / "new" / "g.png"),  # (its folder made, as
          "--stats", str(tmp_path / "latents_stats.pt")])                          # generate does)
    said = capsys.readouterr().out
    assert "cfg_scale=6.7 (stored with the model)" in said and "guidance=reference (stored with the model)" in said
    assert "steps=4 (given)" in said and "cfg_interval_start=0.125" in said
    mean, std = torch.zeros(1, 32, 1, 1), torch.ones(1, 32, 1, 1)
    want = generate(dit, vae, [3], mean, std, steps=4, shift=0.3, cfg_scale=6.7, cfg_interval_start=0.125,
                    guidance="reference", seed=2)
    assert torch.equal(torch.from_numpy(np.array(Image.open(tmp_path / "new" / "g.png"))), want[0])
    with pytest.raises(SystemExit):
        main(["--dit", str(released), "--vae", str(parity_dir / "vavae_a.pt"), "--labels", "10",
              "--out", str(tmp_path / "x.png"), "--stats", str(tmp_path / "latents_stats.pt")])
    assert "labels [10] are outside 0..9" in capsys.readouterr().err


# ----------------------------------------------------------------------------- bad input (issue 21)

def _tiny_folders(tmp_path):
    from modeling import save_pretrained
    torch.manual_seed(0)
    dit = LightningDiT(input_size=4, patch_size=1, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=3)
    vae = AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), resolution=8, z_channels=4,
                        embed_dim=4)
    save_pretrained(dit, dit.config, tmp_path / "dit")
    save_pretrained(vae, vae.config, tmp_path / "vae")
    return tmp_path / "dit", tmp_path / "vae"


def test_the_authors_demo_preset(tmp_path, capsys):
    """--preset demo: inference.py --demo's settings (cfg 9.0 at every step, no timestep shift, Euler, guidance on
    channels 0..2) and, without --labels, its eight labels in a 2 x 4 grid; without either, one line."""
    import numpy as np
    from PIL import Image

    from modeling import save_pretrained
    from modeling.sampling import DEMO_LABELS, preset_settings
    assert preset_settings("demo") == {"method": "euler", "steps": 250, "shift": 1.0, "cfg_scale": 9.0,
                                       "cfg_interval_start": 0.0, "guidance": "reference"}
    torch.manual_seed(0)
    dit = LightningDiT(input_size=2, patch_size=1, in_channels=4, hidden_size=32, depth=1, num_heads=2,
                       num_classes=1000)
    save_pretrained(dit, dit.config, tmp_path / "dit")
    _, vae = _tiny_folders(tmp_path / "t")
    main(["--dit", str(tmp_path / "dit"), "--vae", str(vae), "--preset", "demo", "--steps", "2", "--no-progress",
          "--out", str(tmp_path / "demo.png")])
    said = capsys.readouterr().out
    assert "(8 images;" in said and "cfg_scale=9.0 (preset demo)" in said and "shift=1.0 (preset demo)" in said
    assert np.array(Image.open(tmp_path / "demo.png")).shape == (2 * 4, 4 * 4, 3)  # 2 x 4 images of 4 px
    assert len(DEMO_LABELS) == 8
    err = _refused(capsys, main, ["--dit", str(tmp_path / "dit"), "--vae", str(vae), "--out", str(tmp_path / "x.png")])
    assert "--labels: give the classes to sample (or --preset demo" in err


def _refused(capsys, main, argv):
    """The command exits 2 with one line on stderr (no traceback); returns it."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


@pytest.fixture
def no_sampling(monkeypatch):
    """Fail the test if anything is sampled: every refusal below must come before the first model call."""
    from modeling.sampling import Sampler

    def called(*a, **k):
        raise AssertionError("sampled before refusing")
    monkeypatch.setattr(Sampler, "__call__", called)


def test_bad_values_are_refused_before_sampling(tmp_path, capsys, no_sampling, monkeypatch):
    """NaN / inf guidance, NaN or zero-std latent statistics, a zero latent multiplier, a seed past 64 bits, an
    output that cannot be written and a device that is not here: one line naming the flag or the file, exit 2,
    nothing sampled or written (before: exit 0 with black images, or a traceback after sampling)."""
    dit, vae = _tiny_folders(tmp_path)
    out = tmp_path / "g.png"
    base = ["--dit", str(dit), "--vae", str(vae), "--labels", "0", "1", "--steps", "3", "--no-progress",
            "--device", "cpu"]
    for flag, value in (("--cfg-scale", "nan"), ("--cfg-scale", "inf"), ("--shift", "-inf"),
                        ("--cfg-interval-start", "nan")):
        err = _refused(capsys, main, [*base, f"{flag}={value}", "--out", str(out)])
        assert flag in err and "finite" in err
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        assert "--latent-multiplier" in _refused(capsys, main, [*base, f"--latent-multiplier={bad}",
                                                                "--out", str(out)])
    for name, mean, std in (("nan_mean.pt", torch.full((1, 4, 1, 1), float("nan")), torch.ones(1, 4, 1, 1)),
                            ("inf_std.pt", torch.zeros(1, 4, 1, 1), torch.tensor([1.0, float("inf"), 1, 1])),
                            ("zero_std.pt", torch.zeros(1, 4, 1, 1), torch.tensor([1.0, 0.0, 1.0, 1.0]))):
        torch.save({"mean": mean, "std": std.reshape(1, 4, 1, 1)}, tmp_path / name)
        err = _refused(capsys, main, [*base, "--stats", str(tmp_path / name), "--out", str(out)])
        assert name in err and ("finite" in err or "std" in err), err
    assert "--seed" in _refused(capsys, main, [*base, "--seed", str(2 ** 70), "--out", str(out)])
    assert "--seed" in _refused(capsys, main, [*base, "--seed=-1", "--out", str(out)])
    (tmp_path / "a_file").write_text("x")
    for bad_out, why in ((tmp_path / "a_file" / "g.png", "not a folder"), ("/proc/vavae-test-grid.png", "cannot write"),
                         (tmp_path / ("x" * 300 + ".png"), "longer than"), (tmp_path, "is a folder"),
                         (tmp_path / "g.unknownext", "not an image format")):
        err = _refused(capsys, main, [*base, "--out", str(bad_out)])
        assert "--out" in err and why in err, err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = _refused(capsys, main, [*base, "--device", "cuda", "--out", str(out)])
    assert "--device cuda: CUDA is not available" in err
    assert "--device" in _refused(capsys, main, [*base, "--device", "gpu0", "--out", str(out)])
    assert not out.exists()


def test_library_generate_refuses_unusable_statistics_and_multiplier(parity_dir, parity_configs):
    dit, vae = _fixture_models(parity_dir, parity_configs)
    mean, std = torch.zeros(1, 32, 1, 1), torch.ones(1, 32, 1, 1)
    with pytest.raises(ValueError, match="latent_multiplier must be a finite number > 0"):
        generate(dit, vae, [1], mean, std, steps=3, latent_multiplier=0.0)
    with pytest.raises(ValueError, match="std must be > 0"):
        generate(dit, vae, [1], mean, std * 0, steps=3)
    with pytest.raises(ValueError, match="cfg_scale must be a finite number"):
        generate(dit, vae, [1], mean, std, steps=3, cfg_scale=float("nan"))
