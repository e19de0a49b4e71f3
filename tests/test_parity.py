"""The authors' code, run on fixed weights and inputs, must be reproduced in fp32 (rtol 1e-4, atol 1e-5), and on
every backend path: the last tests run the DiT fixtures with our fused RoPE attention kernel forced (kernels.ops.
rope_attention's "rope-fused"), through the Triton interpreter on the CPU."""
import io as _io
import json
import os
import shutil

import torch

if not torch.cuda.is_available():  # must precede the first import of the Triton kernels (conftest sets it too)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import kernels  # noqa: E402
from bench import parity  # noqa: E402
from modeling import (AutoencoderKL, LightningDiT, load_dit_checkpoint, load_vavae_checkpoint, sample,  # noqa: E402
                      time_grid, vf_loss)

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


# ----------------------------------------------------------------------------- the fused attention kernel

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU runs the Triton kernels in the interpreter
FUSED = "rope-fused (triton)"  # what describe() says when the fused kernel ran


@pytest.fixture
def fused_attention():
    """The triton backend with the fused attention kernel forced, fp32 arithmetic on a GPU; restored after."""
    ok, why = kernels.backend.triton_status(torch.empty(0, device=DEV))
    assert ok, why  # never a skip: the CPU has the interpreter (conftest turns it on before triton is imported)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    kernels.set_backend("triton")
    kernels.set_attention("rope-fused")
    yield
    kernels.set_backend("auto")
    kernels.set_attention(None)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def test_dit_fused_attention_forward_and_loss(parity_dir, parity_configs, fused_attention):
    """lightningdit_a (RoPE, no qk-norm, head_dim 64) with the fused kernel: the raw weights' forward and the loss
    terms within fp32 parity, and describe() says the fused kernel ran. (The EMA forward runs in the CLI test below;
    the sampler, 14 model calls, takes 25 s in the interpreter and adds no attention shape: not here.)"""
    from modeling import flow_loss
    model, io = _dit(parity_dir, parity_configs, "lightningdit_a", "model")
    model, io = model.to(DEV), {k: v.to(DEV) if torch.is_tensor(v) else v for k, v in io.items()}
    with torch.no_grad():
        out = model(io["x"], io["t"], io["y"])
        assert kernels.describe()["ops"]["rope_attention"] == FUSED
        torch.testing.assert_close(out, io["out_model"], rtol=RTOL, atol=ATOL)
        kernels.backend.forget("rope_attention")
        load_dit_checkpoint(parity_dir / "lightningdit_a.pt", model, "ema")
        r = flow_loss(model, io["loss_x1"], io["loss_y"], t=io["loss_t"], x0=io["loss_x0"])
    assert kernels.describe()["ops"]["rope_attention"] == FUSED
    for term, key in (("mse", "loss_mse"), ("cos", "loss_cos"), ("loss", "loss_total")):
        torch.testing.assert_close(r[term], io[key], rtol=RTOL, atol=ATOL)


def test_dit_fused_attention_refuses_qk_norm(parity_dir, parity_configs, fused_attention):
    """lightningdit_b has qk-norm, which the fused kernel does not do: forcing it there is one clear error."""
    model, io = _dit(parity_dir, parity_configs, "lightningdit_b")
    with torch.no_grad(), pytest.raises(kernels.BackendUnavailable, match="qk-norm"):
        model.to(DEV)(io["x"].to(DEV), io["t"].to(DEV), io["y"].to(DEV))


def _forward_only_fixtures(parity_dir, dest, names=("lightningdit_a", "lightningdit_b")):
    """A fixture folder with the DiT fixtures' EMA forward only (the rest costs minutes in the interpreter)."""
    dest.mkdir()
    configs = json.loads((parity_dir / "configs.json").read_text())
    (dest / "configs.json").write_text(json.dumps({n: configs[n] for n in names}))
    for n in names:
        shutil.copy(parity_dir / f"{n}.pt", dest / f"{n}.pt")
        io = torch.load(parity_dir / f"{n}_io.pt", weights_only=False)
        torch.save({k: io[k] for k in ("x", "t", "y", "out_ema")}, dest / f"{n}_io.pt")
    return dest


def test_parity_cli_with_the_fused_attention(parity_dir, tmp_path, capsys):
    """`bench.parity DIR --backend triton --attention rope-fused` (its main(), in this process: the interpreter on
    the CPU) exits 0, says the fused kernel ran on lightningdit_a, and that it cannot run lightningdit_b (qk-norm),
    which it checks on the chooser's path instead."""
    d = _forward_only_fixtures(parity_dir, tmp_path / "fixtures")
    try:
        with pytest.raises(SystemExit) as e:
            parity.main([str(d), "--backend", "triton", "--attention", "rope-fused", "--device", DEV])
    finally:
        kernels.set_backend("auto")
        kernels.set_attention(None)
    text = capsys.readouterr().out
    assert e.value.code == 0, text
    assert "attention: rope-fused (forced)" in text and "all within" in text and "FAIL" not in text
    assert f"lightningdit_a     attention: {FUSED}" in text
    assert "lightningdit_b     attention: split" in text and "cannot run this model (qk-norm is not fused)" in text


def test_parity_tool_refuses_an_unknown_backend_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        parity.main([str(tmp_path), "--backend", "bogus"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "invalid choice: 'bogus'" in err and "Traceback" not in err


def test_parity_tool_fails_where_the_forced_fused_attention_does_not_run(parity_dir, tmp_path, capsys):
    """Forced rope-fused under the reference backend (which never runs it) is no silent pass: the fixture it could
    run fails, and so does the run where it ran on no fixture; an unknown --attention name is one line, exit 2."""
    d = _forward_only_fixtures(parity_dir, tmp_path / "fixtures")
    kernels.set_backend("reference")
    buf = _io.StringIO()
    try:
        with torch.no_grad():
            assert parity.run(d, out=buf, attention="rope-fused") == 2
    finally:
        kernels.set_backend("auto")
        kernels.set_attention(None)
    text = buf.getvalue()
    assert "lightningdit_a     attention: reference -- FAIL: rope-fused was forced but did not run" in text
    assert "FAIL: rope-fused was forced but ran on no fixture" in text
    with pytest.raises(SystemExit) as e:
        parity.main([str(d), "--attention", "flash"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "unknown --attention 'flash'" in err and err.count("\n") == 1


def test_parity_tool_refuses_a_backend_that_cannot_run_on_the_device(parity_dir, capsys):
    """Was an ERROR row per fixture, summed as "3 outside rtol" as if the numbers had been compared."""
    try:
        with pytest.raises(SystemExit) as e:
            parity.main([str(parity_dir), "--backend", "cuda", "--device", "cpu"])
    finally:
        kernels.set_backend("auto")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: --backend cuda cannot run on cpu") and err.count("\n") == 1


@pytest.mark.parametrize("layout", ["channels_last"])  # NCHW: tests/test_kernels_group_norm.py (the CI's minutes)
def test_vavae_fused_group_norm(parity_dir, parity_configs, layout):
    """The VA-VAE fixture through our fused GroupNorm (+ SiLU) kernels (kernels.ops.group_norm_silu, the triton
    backend in the interpreter), channels_last: encode and decode within fp32 parity, and the kernels ran."""
    c = parity_configs["vavae_a"]
    model = AutoencoderKL(ch=c["ch"], ch_mult=c["ch_mult"], num_res_blocks=c["num_res_blocks"],
                          attn_resolutions=c["attn_resolutions"], resolution=c["resolution"],
                          z_channels=c["z_channels"], embed_dim=c["embed_dim"]).eval()
    load_vavae_checkpoint(parity_dir / "vavae_a.pt", model)
    io = torch.load(parity_dir / "vavae_a_io.pt", weights_only=False)
    images, z = io["images"], io["z"]
    if layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        images, z = (t.contiguous(memory_format=torch.channels_last) for t in (images, z))
    kernels.set_backend("triton")
    try:
        with torch.no_grad():
            post = model.encode(images)
            decoded = model.decode(z)
        assert kernels.describe()["ops"]["group_norm_silu"] == "triton"
    finally:
        kernels.set_backend("auto")
    torch.testing.assert_close(post.mean, io["posterior_mean"], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(post.logvar, io["posterior_logvar"], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(decoded, io["decoded"], rtol=RTOL, atol=ATOL)
