"""The issue's done-when chain, on small shapes on the CPU: a released-format fixture checkpoint goes through
modeling.convert, evaluation.generate and evaluation.fid with no glue; the settings travel with the samples."""
import json

import numpy as np
import pytest
import torch

from evaluation import fid as fid_cli
from evaluation import generate as gen_cli
from evaluation.generate import SettingsMismatchError, read_settings
from modeling.convert import main as convert_main


def test_released_checkpoint_to_fid(parity_dir, tmp_path, capsys):
    released = tmp_path / "lightningdit-xl-imagenet256-800ep.pt"  # named as the authors' file: their settings
    released.write_bytes((parity_dir / "lightningdit_a.pt").read_bytes())
    torch.save({"mean": torch.randn(1, 32, 1, 1) * 0.1, "std": torch.rand(1, 32, 1, 1) + 0.5},
               tmp_path / "latents_stats.pt")
    convert_main([str(released), str(tmp_path / "dit"), "--latent-stats", str(tmp_path / "latents_stats.pt")])
    convert_main([str(parity_dir / "vavae_a.pt"), str(tmp_path / "vae")])
    out = tmp_path / "samples.npz"
    args = [str(tmp_path / "dit"), str(tmp_path / "vae"), str(out), "--num-samples", "4", "--batch-size", "4",
            "--steps", "3", "--device", "cpu", "--precision", "fp32"]
    gen_cli.main(args)
    said = capsys.readouterr().out
    assert "cfg_scale=6.7 (stored with the model)" in said and "guidance=reference (stored with the model)" in said
    settings = read_settings(out)
    assert settings["sampler"] == {"method": "euler", "steps": 3, "shift": 0.3, "cfg_scale": 6.7,
                                   "cfg_interval_start": 0.125, "guidance": "reference"}
    assert settings["precision"] == "fp32" and len(settings["dit"]["weights_sha256"]) == 64
    assert settings["time_grid"] == "float32"  # the authors' grid; chunks sampled on the old float64 one are not
    old = {k: v for k, v in settings.items() if k != "time_grid"}  # continued, the refusal names the grid
    (tmp_path / "old_run").mkdir()
    with pytest.raises(SettingsMismatchError, match="time_grid: recorded None, now 'float32'"):
        gen_cli.check_settings(tmp_path / "old_run", old) or gen_cli.check_settings(tmp_path / "old_run", settings)
    assert settings["latent_stats"]["source"].endswith("latents_stats.safetensors")
    with np.load(out) as z:
        assert z["arr_0"].shape == (4, 128, 128, 3) and z["arr_0"].dtype == np.uint8 and len(z["arr_1"]) == 4
        samples = z["arr_0"]
    # resuming the same output with other settings is refused, naming what differs
    with pytest.raises(SystemExit):
        gen_cli.main(args[:-2] + ["--precision", "bf16"])
    assert "precision: recorded 'fp32', now 'bf16'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # FP8 where it cannot run: one line that says what to use instead
        gen_cli.main(args[:-2] + ["--precision", "fp8"])
    err = capsys.readouterr().err
    assert err.startswith("error: precision fp8:") and "--precision bf16-weights" in err and err.count("\n") == 1
    with pytest.raises(SettingsMismatchError, match="cfg_scale"):
        gen_cli.check_settings(out.with_suffix(".chunks"), {**settings, "sampler": {**settings["sampler"],
                                                                                   "cfg_scale": 1.0}})
    # a reference batch in the ADM format, then the evaluator with --json
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=np.random.default_rng(0).integers(0, 256, (5, 128, 128, 3), dtype=np.uint8))
    fid_cli.main([str(ref), str(out), "--device", "cpu", "--batch-size", "5", "--json", str(tmp_path / "fid.json")])
    res = json.loads((tmp_path / "fid.json").read_text())
    assert np.isfinite(res["fid"]) and res["fid"] > 0 and res["num_samples"] == 4
    assert res["compared"]["samples"]["path"] == str(out) and len(res["compared"]["reference"]["sha256"]) == 64
    assert res["compared"]["sample_settings"]["sampler"]["cfg_scale"] == 6.7
    assert 0.0 <= res["precision"] <= 1.0 and samples.std() > 0


def test_generate_out_of_memory_is_one_line_and_a_smaller_batch_starts_afresh(parity_dir, tmp_path, capsys,
                                                                             monkeypatch):
    """A --batch-size too large for the card: one line (exit 2) with torch's figures and the flag to lower; the
    settings file the first try left (no chunk yet) does not refuse the smaller batch; once a chunk exists the
    layout is part of the run again. The CUDA error is raised by hand (the CPU has no CUDA allocator)."""
    from modeling.sampling import Sampler
    from oom import cuda_oom
    convert_main([str(parity_dir / "lightningdit_a.pt"), str(tmp_path / "dit")])
    convert_main([str(parity_dir / "vavae_a.pt"), str(tmp_path / "vae")])
    out = tmp_path / "samples.npz"
    args = [str(tmp_path / "dit"), str(tmp_path / "vae"), str(out), "--num-samples", "4", "--steps", "2",
            "--device", "cpu", "--precision", "fp32"]
    real = Sampler.__call__

    def sample(self, z, *a, **kw):
        if z.shape[0] > 2:
            raise cuda_oom("9.00 GiB", "3.50 GiB")
        return real(self, z, *a, **kw)

    monkeypatch.setattr(Sampler, "__call__", sample)
    monkeypatch.delenv("VAVAE_DEBUG", raising=False)
    with pytest.raises(SystemExit) as info:
        gen_cli.main(args + ["--batch-size", "4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and all(ln.startswith("sampling (rank 0): ") for ln in err[:-1]), err  # progress
    assert err[-1] == ("error: out of GPU memory (Tried to allocate 9.00 GiB; GPU 0 has a total capacity of 79.19 "
                      "GiB of which 3.50 GiB is free): lower --batch-size (now 4) and run the same command again")
    assert gen_cli.main(args + ["--batch-size", "2"]) is None and out.is_file()
    assert read_settings(out)["layout"] == {"world_size": 1, "batch_size": 2}
    # with chunks written, another layout is refused as before
    out.unlink()
    with pytest.raises(SystemExit):
        gen_cli.main(args + ["--batch-size", "1"])
    assert "layout: recorded" in capsys.readouterr().err
    # out of memory once chunks exist (a busier card on a restart): a smaller batch would be refused, and the line
    # no longer advises one (a review, 2026-12-05)
    sorted(out.with_suffix(".chunks").glob("chunk_*.npz"))[-1].unlink()

    def always_oom(self, z, *a, **kw):
        raise cuda_oom("9.00 GiB", "3.50 GiB")

    monkeypatch.setattr(Sampler, "__call__", always_oom)
    with pytest.raises(SystemExit):
        gen_cli.main(args + ["--batch-size", "2"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "free the GPU's memory and run the same command again (--batch-size 2 is fixed once chunks exist" in err
    # ... and when this very run wrote the first chunk before running out (the advice is decided at the error)
    calls = []

    def second_call_oom(self, z, *a, **kw):
        calls.append(1)
        if len(calls) > 1:
            raise cuda_oom("9.00 GiB", "3.50 GiB")
        return real(self, z, *a, **kw)

    monkeypatch.setattr(Sampler, "__call__", second_call_oom)
    fresh = args[:2] + [str(tmp_path / "fresh.npz")] + args[3:]
    with pytest.raises(SystemExit):
        gen_cli.main(fresh + ["--batch-size", "2"])
    assert "--batch-size 2 is fixed once chunks exist" in capsys.readouterr().err.strip().splitlines()[-1]
    with pytest.raises(SystemExit) as info:  # an output path with no name: one line, as before
        gen_cli.main(args[:2] + ["/"] + args[3:])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err


def test_a_tokenizer_of_other_latent_channels_is_refused_before_sampling(parity_dir, tmp_path, capsys):
    """A 4-channel tokenizer (or statistics) for the 32-channel DiT: one line naming the file, before any sample
    and before the chunks folder records settings (the decode failed with a traceback after the first batch, and
    the corrected command was then refused as "other settings": a review, 2026-12-05)."""
    from modeling.sample_images import main as sample_main
    from modeling.vavae import AutoencoderKL
    convert_main([str(parity_dir / "lightningdit_a.pt"), str(tmp_path / "dit")])
    AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), resolution=8, z_channels=4,
                  embed_dim=4).save_pretrained(tmp_path / "vae4")
    out = tmp_path / "s.npz"
    with pytest.raises(SystemExit) as e:
        gen_cli.main([str(tmp_path / "dit"), str(tmp_path / "vae4"), str(out), "--num-samples", "2", "--steps", "2",
                      "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1] == (f"error: {tmp_path / 'vae4'}: a tokenizer of 4 latent channels; "
                                             f"{tmp_path / 'dit'} has 32"), err
    assert not out.with_suffix(".chunks").exists()
    with pytest.raises(SystemExit) as e:
        sample_main(["--dit", str(tmp_path / "dit"), "--vae", str(tmp_path / "vae4"), "--labels", "1", "--steps", "2",
                     "--device", "cpu", "--out", str(tmp_path / "g.png")])
    assert e.value.code == 2 and "a tokenizer of 4 latent channels" in capsys.readouterr().err
