import itertools

import pytest
import torch

from modeling import (LIGHTNINGDIT_SIZES, AutoencoderKL, CheckpointMismatchError, LightningDiT, build_lightningdit,
                      flow_loss, load_dit_checkpoint, load_pretrained, load_vavae_checkpoint, sample,
                      save_pretrained, vf_loss)
from modeling.checkpoint import to_reference_dit_format
from modeling.vf_loss import adaptive_vf_weight, make_linear_proj

TINY = dict(input_size=8, patch_size=2, in_channels=8, hidden_size=48, depth=2, num_heads=2, num_classes=5)


def _expected_params(depth, hidden_size, patch_size, num_heads, input_size=16, in_channels=32, num_classes=1000,
                     mlp_ratio=4.0):
    """Independent count for the default flags (SwiGLU, RMSNorm, RoPE, no qk-norm, shift on, no sigma)."""
    d, p = hidden_size, patch_size
    tokens = (input_size // p) ** 2
    h = int(2 / 3 * int(d * mlp_ratio))
    block = (3 * d * d + 3 * d) + (d * d + d) + (d * 2 * h + 2 * h) + (h * d + d) + (d * 6 * d + 6 * d) + 2 * d
    embed = (in_channels * p * p * d + d) + (256 * d + d + d * d + d) + (num_classes + 1) * d + tokens * d
    final = d + (d * p * p * in_channels + p * p * in_channels) + (d * 2 * d + 2 * d)
    return embed + depth * block + final


@pytest.mark.parametrize("size", sorted(LIGHTNINGDIT_SIZES))
def test_param_counts_every_size(size):
    with torch.device("meta"):
        model = build_lightningdit(size, input_size=16, in_channels=32, num_classes=1000)
    n = sum(p.numel() for p in model.parameters())
    assert n == _expected_params(**LIGHTNINGDIT_SIZES[size])
    if size == "XL/1":
        assert round(n / 1e6, 2) == 675.26  # the paper's XL/1 count, pos_embed included
        assert abs(model.flops_per_sample(train=True) / 1e9 - 712) < 1.0


def test_residual_stream_is_token_major():
    """Every block Linear sees a contiguous (B, N, C) input: a channel-major residual stream (the conv's
    transposed view) would make each norm reduce over a strided axis and each qkv / w12 GEMM copy its input,
    and compiled blocks keep their input's strides, so it would last through all blocks. (Inference, as
    here: every block Linear runs as a module; recording gradients, qkv and w12 run as F.linear on their weights,
    their biases handed to the next op, and their inputs are the attention's / MLP's.)"""
    torch.manual_seed(0)
    m = LightningDiT(**TINY).eval()
    seen = []
    for name, mod in m.named_modules():
        if (isinstance(mod, torch.nn.Linear) and (name.startswith("blocks.") or name.startswith("final_layer.linear"))
                or type(mod).__name__ in ("SwiGLUFFN", "Attention")):
            mod.register_forward_pre_hook(lambda mod, inp, name=name: seen.append((name, inp[0].is_contiguous())))
    with torch.no_grad():
        m(torch.randn(3, 8, 8, 8), torch.rand(3), torch.tensor([0, 1, 2]))
    assert len(seen) == 2 * 7 + 1 and all(ok for _, ok in seen), [n for n, ok in seen if not ok]


def test_reference_names_accepted_and_unknown_refused():
    with torch.device("meta"):
        assert build_lightningdit("LightningDiT-B/2", input_size=16).config.hidden_size == 768
    with pytest.raises(ValueError, match="unknown LightningDiT size"):
        build_lightningdit("XXL/1")


FLAGS = ["use_qknorm", "use_swiglu", "use_rope", "use_rmsnorm", "wo_shift"]


@pytest.mark.parametrize("flags", list(itertools.product([False, True], repeat=5)))
def test_every_flag_combination_runs_and_names_keys(flags):
    kw = dict(zip(FLAGS, flags))
    model = LightningDiT(**TINY, **kw)
    keys = set(model.state_dict())
    assert ("blocks.0.norm1.weight" in keys) == kw["use_rmsnorm"]
    assert ("final_layer.norm_final.weight" in keys) == kw["use_rmsnorm"]
    assert ("blocks.0.attn.q_norm.weight" in keys) == kw["use_qknorm"]
    assert ("blocks.0.attn.q_norm.bias" in keys) == (kw["use_qknorm"] and not kw["use_rmsnorm"])
    assert ("blocks.0.mlp.w12.weight" in keys) == kw["use_swiglu"]
    assert ("blocks.0.mlp.fc1.weight" in keys) != kw["use_swiglu"]
    assert ("feat_rope.freqs_cos" in keys) == kw["use_rope"]
    assert model.state_dict()["blocks.0.adaLN_modulation.1.weight"].shape[0] == (4 if kw["wo_shift"] else 6) * 48
    # Random (non-zero) weights so every branch matters; forward + backward must be finite.
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(2, 8, 8, 8)
    out = model(x, torch.rand(2), torch.tensor([0, 5]))
    assert out.shape == x.shape
    out.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_head_dim_72_rope_layout():
    model = LightningDiT(input_size=16, patch_size=1, in_channels=4, hidden_size=144, depth=1, num_heads=2)
    cos = model.feat_rope.freqs_cos  # (256 tokens, 72)
    assert cos.shape == (256, 72)
    # First 36 channels follow the row index, last 36 the column; angles repeated in adjacent pairs.
    assert torch.equal(cos[:16, :36], cos[:1, :36].expand(16, 36))  # row 0, every column
    assert torch.equal(cos[::16, 36:], cos[:1, 36:].expand(16, 36))  # column 0, every row
    assert torch.equal(cos[:, 0::2], cos[:, 1::2])


def _randomize(model, std=0.05):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def test_guidance_all_channels_and_interval():
    model = _randomize(LightningDiT(**TINY)).eval()
    x = torch.randn(2, 8, 8, 8)
    y = torch.tensor([1, 5])
    with torch.no_grad():
        for t in (0.05, 0.5):
            tt = torch.full((2,), t)
            out = model.forward_with_cfg(x, tt, y, 4.0, cfg_interval_start=0.11, guidance="all")
            cond = model(x[:1], tt[:1], y[:1])
            uncond = model(x[:1], tt[:1], y[1:])
            want = cond if t < 0.11 else uncond + 4.0 * (cond - uncond)
            torch.testing.assert_close(out[:1], want, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(out[1:], want, rtol=1e-5, atol=1e-6)
        with pytest.raises(ValueError):
            model.forward_with_cfg(x, tt, y, 4.0, guidance="some")


class _CountingModel(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.batches = model, []
        self.num_classes = model.num_classes

    def forward(self, x, t, y):
        self.batches.append(x.shape[0])
        return self.model(x, t, y)

    def forward_with_cfg(self, *a, **k):
        self.batches.append(a[0].shape[0])
        return self.model.forward_with_cfg(*a, **k)


def test_sampler_skips_unconditional_forward_outside_interval():
    model = _CountingModel(_randomize(LightningDiT(**TINY)).eval())
    z, y = torch.randn(3, 8, 8, 8), torch.tensor([0, 1, 2])
    sample(model, z, y, steps=8, shift=0.3, cfg_scale=3.0, cfg_interval_start=0.11)
    # Shifted grid: the first three steps have t < 0.11 -> conditional batch only.
    assert model.batches == [3, 3, 3, 6, 6, 6, 6]


def test_samplers_agree_and_are_reproducible():
    model = _randomize(LightningDiT(**TINY), std=0.02).eval()
    z, y = torch.randn(2, 8, 8, 8), torch.tensor([0, 3])
    fine = sample(model, z, y, steps=200, method="heun", shift=1.0)
    for method, steps, tol in (("euler", 200, 2e-2), ("heun", 20, 2e-3), ("dopri5", 5, 2e-3)):
        out = sample(model, z, y, steps=steps, method=method, shift=1.0)
        rel = (out - fine).norm() / fine.norm()
        assert rel < tol, (method, rel)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = sample(model, z, y, steps=10, method="euler_maruyama", generator=g1)
    b = sample(model, z, y, steps=10, method="euler_maruyama", generator=g2)
    assert torch.equal(a, b) and torch.isfinite(a).all()
    assert not torch.allclose(a, sample(model, z, y, steps=10, method="euler"))
    with pytest.raises(ValueError):
        sample(model, z, y, steps=4, method="rk99")


def test_label_dropout_uses_null_class_in_train_mode_only():
    model = LightningDiT(**TINY, class_dropout_prob=0.5)
    emb = model.y_embedder
    labels = torch.zeros(1000, dtype=torch.long)
    dropped = emb.token_drop(labels, torch.Generator().manual_seed(0))
    assert 400 < (dropped == 5).sum() < 600 and set(dropped.unique().tolist()) == {0, 5}
    model.eval()
    assert torch.equal(emb(labels[:4], train=False), emb.embedding_table.weight[[0, 0, 0, 0]])


def test_deferred_mlp_residual_is_the_plain_block_stack():
    """The model hands each block's MLP residual to the next block's first norm (and the last to the final norm):
    the same function as the plain stack -- each block adding its own residual (block(x, c, rope) alone) and the
    final layer on the result -- forward and gradients, in fp32 within rounding."""
    torch.manual_seed(0)
    m = _randomize(LightningDiT(**TINY, class_dropout_prob=0.0)).eval()
    x, t, y = torch.randn(2, 8, 8, 8), torch.rand(2), torch.tensor([1, 2])

    def plain(m):
        h = m.x_embedder(x) + m.pos_embed
        c = m.t_embedder(t) + m.y_embedder(y, False)
        for block in m.blocks:
            h = block(h, c, m.feat_rope)
        out = m.unpatchify(m.final_layer(h, c))
        return out[:, : m.in_channels] if m.learn_sigma else out
    a, b = m(x, t, y), plain(m)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    named = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    ga = torch.autograd.grad(a.square().sum(), [p for _, p in named], allow_unused=True)
    gb = torch.autograd.grad(plain(m).square().sum(), [p for _, p in named], allow_unused=True)
    for (n, _), u, v in zip(named, ga, gb):
        assert (u is None) == (v is None), n
        if u is not None:
            torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-6, msg=n)


def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(0)
    a = _randomize(LightningDiT(**TINY, class_dropout_prob=0.0))
    b = _randomize(LightningDiT(**TINY, class_dropout_prob=0.0, use_checkpoint=True))
    x, t, y = torch.randn(2, 8, 8, 8), torch.rand(2), torch.tensor([1, 2])
    for m in (a, b):
        m.train()
        m(x, t, y).square().sum().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        if pa.grad is not None:
            torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_flow_loss_gradients_match_float64():
    model = _randomize(LightningDiT(**TINY, class_dropout_prob=0.0)).eval()
    x1, x0, t, y = torch.randn(2, 8, 8, 8), torch.randn(2, 8, 8, 8), torch.rand(2), torch.tensor([0, 4])
    model.zero_grad()
    flow_loss(model, x1, y, t=t, x0=x0)["loss"].backward()
    g32 = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    m64 = model.double()
    m64.zero_grad()
    flow_loss(m64, x1.double(), y, t=t.double(), x0=x0.double())["loss"].backward()
    g64 = [p.grad for p in m64.parameters() if p.requires_grad]
    num = sum((a.double() - b).norm() ** 2 for a, b in zip(g32, g64)) ** 0.5
    den = sum(b.norm() ** 2 for b in g64) ** 0.5
    assert num / den < 1e-4
    # and the float64 analytic gradient w.r.t. the data matches finite differences
    tiny = _randomize(LightningDiT(input_size=4, patch_size=2, in_channels=4, hidden_size=16, depth=1, num_heads=2,
                                   num_classes=3, class_dropout_prob=0.0)).double().eval()
    xx = torch.randn(1, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    noise = torch.randn(1, 4, 4, 4, dtype=torch.float64)
    tt = torch.tensor([0.3], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: flow_loss(tiny, a, torch.tensor([1]), t=tt, x0=noise)["loss"], (xx,))


def test_vf_loss_gradients_and_adaptive_weight():
    z = torch.randn(2, 6, 3, 3, dtype=torch.float64, requires_grad=True)
    f = torch.randn(2, 6, 3, 3, dtype=torch.float64)
    # margins 0: every term is active, so the loss is smooth where gradcheck probes it
    assert torch.autograd.gradcheck(lambda a: vf_loss(a, f, m1=0.0, m2=0.0)["loss"], (z,))
    with pytest.raises(ValueError, match="must match"):
        vf_loss(torch.randn(1, 6, 3, 3), torch.randn(1, 6, 4, 4))
    conv = torch.nn.Conv2d(3, 4, 1)
    proj = make_linear_proj(4, 6)
    x = torch.randn(2, 3, 3, 3)
    z = conv(x)
    nll = z.abs().mean()
    vf = vf_loss(proj(z), f.float())["loss"]
    w = adaptive_vf_weight(nll, vf, conv.weight, vf_weight=0.5)
    gn = torch.autograd.grad(nll, conv.weight, retain_graph=True)[0].norm()
    gv = torch.autograd.grad(vf, conv.weight, retain_graph=True)[0].norm()
    torch.testing.assert_close(w, 0.5 * gn / (gv + 1e-4))
    assert not w.requires_grad and proj.bias is None


def test_our_format_round_trip_exact(tmp_path):
    model = _randomize(LightningDiT(**TINY, use_qknorm=True))
    save_pretrained(model, model.config, tmp_path / "dit")
    loaded = load_pretrained(tmp_path / "dit")
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    vae = AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), z_channels=4, embed_dim=4)
    save_pretrained(vae, vae.config, tmp_path / "vae")
    vae2 = load_pretrained(tmp_path / "vae")
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), vae2.state_dict().values()))


def test_reference_export_loads_back():
    model = _randomize(LightningDiT(**TINY))
    ema = {k: v + 1 for k, v in model.state_dict().items()}
    ckpt = to_reference_dit_format(model.state_dict(), ema)
    assert all(k.startswith("module.") for k in ckpt["model"])
    other = LightningDiT(**TINY)
    load_dit_checkpoint(ckpt, other, "model")
    assert torch.equal(other.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)
    load_dit_checkpoint(ckpt, other, "ema")
    assert torch.equal(other.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight + 1)


def test_mismatched_checkpoint_refused_and_nothing_loaded():
    model = LightningDiT(**TINY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    bad.pop("blocks.1.mlp.w3.weight")
    bad["blocks.0.attn.qkv.weight"] = torch.randn(7, 48)
    bad["something.else"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError) as e:
        load_dit_checkpoint({"ema": bad}, model)
    msg = str(e.value)
    assert "blocks.1.mlp.w3.weight" in msg and "something.else" in msg and "blocks.0.attn.qkv.weight" in msg
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(CheckpointMismatchError, match="no 'model' entry"):
        load_dit_checkpoint({"ema": bad}, model, weights="model")
    with pytest.raises(FileNotFoundError):
        load_dit_checkpoint("/nonexistent/ckpt.pt", model)


def test_vavae_api():
    vae = AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), resolution=32,
                        z_channels=4, embed_dim=4).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    post = vae.encode(x)
    assert post.mean.shape == (2, 4, 16, 16)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert torch.equal(post.sample(g1), post.sample(g2))
    imgs = vae.decode_to_images(post.mode())
    assert imgs.dtype == torch.uint8 and imgs.shape == (2, 32, 32, 3)
    dec = vae.decode(post.mode())
    assert torch.equal(imgs, torch.clamp(127.5 * dec + 128, 0, 255).permute(0, 2, 3, 1).to(torch.uint8))
    with pytest.raises(ValueError, match="multiple of 2"):
        vae.encode(torch.zeros(1, 3, 33, 32))
    with pytest.raises(ValueError, match="expected images"):
        vae.encode(torch.zeros(1, 1, 32, 32))
    with pytest.raises(CheckpointMismatchError):
        load_vavae_checkpoint({"state_dict": {"encoder.conv_in.weight": torch.zeros(1)}}, vae)


def test_logit_normal_time_on_device_and_seeded():
    from modeling.flow import sample_time
    t = sample_time(20000, "cpu", generator=torch.Generator().manual_seed(0))
    assert t.min() > 0 and t.max() < 1 and abs(t.mean().item() - 0.5) < 0.01
    assert abs(torch.logit(t).std().item() - 1.0) < 0.03
    u = sample_time(20000, "cpu", "uniform", generator=torch.Generator().manual_seed(0))
    assert abs(u.std().item() - (1 / 12) ** 0.5) < 0.01
