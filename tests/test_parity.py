"""The authors' code, run on fixed weights and inputs, must be reproduced in fp32 (rtol 1e-4, atol 1e-5)."""
import io as _io

import pytest
import torch

from bench import parity
from modeling import (AutoencoderKL, LightningDiT, load_dit_checkpoint, load_vavae_checkpoint, sample, time_grid,
                      vf_loss)

RTOL, ATOL = 1e-4, 1e-5


def _dit(parity_dir, parity_configs, name, weights="ema"):
    cfg = {k: v for k, v in parity_configs[name].items() if k != "kind"}
    model = LightningDiT(**cfg).eval()
    load_dit_checkpoint(parity_dir / f"{name}.pt", model, weights)
    io = torch.load(parity_dir / f"{name}_io.pt", weights_only=False)
    return model, io


@pytest.mark.parametrize("name", ["lightningdit_a", "lightningdit_b"])
@pytest.mark.parametrize("weights", ["ema", "model"])
def test_dit_forward(parity_dir, parity_configs, name, weights):
    model, io = _dit(parity_dir, parity_configs, name, weights)
    with torch.no_grad():
        torch.testing.assert_close(model(io["x"], io["t"], io["y"]), io[f"out_{weights}"], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", ["lightningdit_a", "lightningdit_b"])
def test_dit_guidance_reference_mode(parity_dir, parity_configs, name):
    model, io = _dit(parity_dir, parity_configs, name)
    for tag in ("0.5", "0.05"):  # guidance on / off (below cfg_interval_start)
        p = f"cfg_t{tag}_"
        with torch.no_grad():
            out = model.forward_with_cfg(io[p + "x"], io[p + "t"], io[p + "y"], float(io["cfg_scale"]),
                                         float(io["cfg_interval_start"]), guidance="reference")
        torch.testing.assert_close(out, io[p + "out"], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", ["lightningdit_a", "lightningdit_b"])
def test_dit_loss_terms(parity_dir, parity_configs, name):
    from modeling import flow_loss
    from modeling.flow import path_sample
    model, io = _dit(parity_dir, parity_configs, name)
    xt, ut = path_sample(io["loss_x1"], io["loss_x0"], io["loss_t"])
    torch.testing.assert_close(xt, io["loss_xt"], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(ut, io["loss_ut"], rtol=RTOL, atol=ATOL)
    with torch.no_grad():
        r = flow_loss(model, io["loss_x1"], io["loss_y"], t=io["loss_t"], x0=io["loss_x0"])
    torch.testing.assert_close(r["mse"], io["loss_mse"], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(r["cos"], io["loss_cos"], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(r["loss"], io["loss_total"], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", ["lightningdit_a", "lightningdit_b"])
def test_dit_sampler(parity_dir, parity_configs, name):
    model, io = _dit(parity_dir, parity_configs, name)
    steps = int(io["sample_steps"])
    out, traj = sample(model, io["sample_z"], io["sample_y"], steps=steps, shift=float(io["sample_shift"]),
                       cfg_scale=float(io["sample_cfg_scale"]), cfg_interval_start=float(io["sample_cfg_interval_start"]),
                       guidance="reference", return_trajectory=True)
    torch.testing.assert_close(out, io["sample_out"], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(traj, io["sample_trajectory"], rtol=RTOL, atol=ATOL)
    plain = sample(model, io["sample_z"], io["sample_y"], steps=steps, shift=1.0)
    torch.testing.assert_close(plain, io["sample_nocfg_out"], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(time_grid(250, 0.3), io["grid250_shift0.3"], rtol=RTOL, atol=ATOL)


def test_vavae(parity_dir, parity_configs):
    c = parity_configs["vavae_a"]
    model = AutoencoderKL(ch=c["ch"], ch_mult=c["ch_mult"], num_res_blocks=c["num_res_blocks"],
                          attn_resolutions=c["attn_resolutions"], resolution=c["resolution"],
                          z_channels=c["z_channels"], embed_dim=c["embed_dim"]).eval()
    load_vavae_checkpoint(parity_dir / "vavae_a.pt", model)  # ignores linear_proj / loss / foundation_model
    io = torch.load(parity_dir / "vavae_a_io.pt", weights_only=False)
    with torch.no_grad():
        post = model.encode(io["images"])
        torch.testing.assert_close(post.mean, io["posterior_mean"], rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(post.logvar, io["posterior_logvar"], rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(post.kl(), io["kl"], rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(model.decode(io["z"]), io["decoded"], rtol=RTOL, atol=ATOL)


def test_vf_loss(parity_dir):
    io = torch.load(parity_dir / "vf_a_io.pt", weights_only=False)
    for m1, m2 in ((0.5, 0.25), (0.0, 0.0)):
        r = vf_loss(io["z_proj"], io["aux_feature"], m1=m1, m2=m2)
        torch.testing.assert_close(r["mcos"], io[f"mcos_m{m1}"], rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(r["mdms"], io[f"mdms_m{m2}"], rtol=RTOL, atol=ATOL)


def test_parity_tool_passes_and_catches_a_mismatch(parity_dir, tmp_path):
    buf = _io.StringIO()
    assert parity.run(parity_dir, out=buf) == 0, buf.getvalue()
    text = buf.getvalue()
    assert "all within" in text and "FAIL" not in text
    # A corrupted fixture must make the tool fail.
    import shutil
    for f in parity_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    io = torch.load(tmp_path / "vf_a_io.pt", weights_only=False)
    io["mcos_m0.5"] = io["mcos_m0.5"] + 1e-3
    torch.save(io, tmp_path / "vf_a_io.pt")
    buf = _io.StringIO()
    assert parity.run(tmp_path, out=buf) == 1
    assert "FAIL" in buf.getvalue()
