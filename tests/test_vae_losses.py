"""LPIPS, PatchGAN, foundation models and the VA-VAE objective (small shapes, real weights where shipped)."""
import pytest
import skimage.data
import torch
import torch.nn.functional as F

from modeling.discriminator import NLayerDiscriminator, adaptive_gan_weight, hinge_d_loss
from modeling.foundation import (FoundationModelUnavailable, VisionTransformer, build_foundation,
                                 load_efficientnet_lite0)
from modeling.lpips import LPIPS
from modeling.vavae import AutoencoderKL
from train.vae_losses import VAVAELoss


@pytest.fixture(scope="module")
def lpips():
    return LPIPS()


def photo(size=64, name="astronaut"):
    img = torch.from_numpy(getattr(skimage.data, name)()).permute(2, 0, 1)[None].float() / 127.5 - 1
    return F.interpolate(img, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def test_lpips_zero_symmetric_ordering_and_grad(lpips):
    x = photo(64)
    y = photo(64, "chelsea")
    assert lpips(x, x).abs().max() < 1e-6
    torch.testing.assert_close(lpips(x, y), lpips(y, x))
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)
    noisy = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    d_blur, d_noise, d_other = lpips(x, blur).item(), lpips(x, noisy).item(), lpips(x, y).item()
    assert 0 < d_blur < d_noise, (d_blur, d_noise)
    assert d_blur < d_other
    r = blur.clone().requires_grad_(True)
    lpips(x, r).sum().backward()
    assert r.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in lpips.parameters())


def test_lpips_keys_follow_taming(lpips):
    keys = set(lpips.state_dict())
    assert {"scaling_layer.shift", "net.slice1.0.weight", "net.slice5.28.bias", "lin4.model.1.weight"} <= keys
    assert lpips.lin0.model[1].weight.shape == (1, 64, 1, 1)


def test_lpips_missing_weights_file():
    with pytest.raises(FileNotFoundError, match="no/such/vgg"):
        LPIPS("/no/such/vgg16.ckpt")


def test_discriminator_layout_and_hinge():
    d = NLayerDiscriminator()
    keys = list(d.state_dict())
    assert keys[0] == "main.0.weight" and "main.11.weight" in keys and "main.3.running_mean" in keys
    assert "main.2.bias" not in keys  # convs before BatchNorm have no bias, as in taming
    assert d(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.75))


def tiny_setup(perceptual_weight=0.0, **kw):
    torch.manual_seed(0)
    vae = AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), resolution=32,
                        z_channels=4, embed_dim=4)
    loss = VAVAELoss(perceptual_weight=perceptual_weight, disc_ndf=8, **kw)
    return vae, loss, photo(32).repeat(2, 1, 1, 1)


def test_generator_loss_matches_ldm_formula():
    vae, loss, x = tiny_setup(disc_start=0, disc_weight=0.5, kl_weight=1e-6)
    with torch.no_grad():
        loss.logvar.fill_(0.3)
    post = vae.encode(x)
    recon = vae.decode(post.mean)
    last = vae.decoder.conv_out.weight
    total, logs = loss.generator_loss(x, recon, post, 10, last)
    nll = ((x - recon).abs() / torch.exp(torch.tensor(0.3)) + 0.3).sum() / 2
    kl = post.kl().sum() / 2
    g = -loss.discriminator(recon).mean()
    gn = torch.autograd.grad(nll, last, retain_graph=True)[0].norm()
    gg = torch.autograd.grad(g, last, retain_graph=True)[0].norm()
    d_w = (gn / (gg + 1e-4)).clamp(0, 1e4) * 0.5
    torch.testing.assert_close(total, nll + 1e-6 * kl + d_w * g, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(logs["d_weight"], d_w.detach())
    assert adaptive_gan_weight(nll, g, last, 0.5).requires_grad is False


def test_disc_start_switches_gan_terms():
    vae, loss, x = tiny_setup(disc_start=5)
    post = vae.encode(x)
    recon = vae.decode(post.sample())
    _, before = loss.generator_loss(x, recon, post, 4, vae.decoder.conv_out.weight)
    _, after = loss.generator_loss(x, recon, post, 5, vae.decoder.conv_out.weight)
    assert "g" not in before and "g" in after
    assert loss.discriminator_loss(x, recon, 4)[0].item() == 0.0
    assert loss.discriminator_loss(x, recon, 5)[0].item() > 0.0


def test_vf_term_adaptive_weight_and_resize():
    vae, loss, x = tiny_setup(disc_start=10**9, vf_weight=0.1, cos_margin=0.0, distmat_margin=0.0)
    post = vae.encode(x)
    z = post.sample()
    proj = torch.nn.Conv2d(4, 16, 1, bias=False)
    aux = torch.randn(2, 16, 4, 4)  # a coarser feature grid than the 16x16 latent: resized
    total, logs = loss.generator_loss(x, vae.decode(z), post, 0, vae.decoder.conv_out.weight, proj(z), aux,
                                      vae.encoder.conv_out.weight)
    assert logs["vf"] > 0 and logs["vf_weight"] > 0
    total.backward()
    assert proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("gan", [True, False])
def test_lpips_and_discriminator_backward_once_a_step(lpips, gan):
    """With the VF and GAN weights both adaptive, d nll / d (encoder's and decoder's last layers) and d nll / d recon
    come from one autograd.grad, d g / d (decoder's last layer, recon) from another, and the step's backward starts
    at recon: LPIPS's and the discriminator's backward run once a step (plain autograd: LPIPS 2-3 times, D twice).
    In float64 the loss and both weights are plain autograd's (each weight's own calls, then total.backward()) bit for
    bit, and every gradient equal to rounding."""
    from modeling.vf_loss import adaptive_vf_weight, vf_loss

    def run(ours):
        vae, loss, x = tiny_setup(perceptual_weight=1.0, disc_start=0 if gan else 10**9, vf_weight=0.1,
                                  cos_margin=0.0, distmat_margin=0.0)
        vae, loss, x = vae.double(), loss.double(), x.double()
        torch.manual_seed(1)
        proj = torch.nn.Conv2d(4, 16, 1, bias=False).double()
        aux = torch.randn(2, 16, 16, 16, dtype=torch.float64)  # the latent grid (no resize)
        post = vae.encode(x)
        z = post.sample(generator=torch.Generator().manual_seed(2))
        recon = vae.decode(z)
        enc, dec = vae.encoder.conv_out.weight, vae.decoder.conv_out.weight
        calls = {"lpips": [], "disc": []}
        hooks = [net.register_full_backward_hook(lambda *a, c=c: c.append(1))  # noqa: B023
                 for net, c in ((loss.perceptual_loss, calls["lpips"]), (loss.discriminator, calls["disc"]))]
        loss.discriminator.requires_grad_(False)  # as the trainer's generator step
        if ours:
            total, logs = loss.generator_loss(x, recon, post, 0, dec, proj(z), aux, enc)
        else:  # plain autograd: each weight's two calls, then the loss's own backward
            rec = (x - recon).abs() + 1.0 * loss.perceptual_loss(x, recon)
            nll = (rec / torch.exp(loss.logvar) + loss.logvar).sum() / 2
            vf = vf_loss(proj(z), aux, 0.0, 0.0, loss.cos_weight, loss.distmat_weight)["loss"]
            w_vf = adaptive_vf_weight(nll, vf, enc, 0.1)
            total = nll + loss.kl_weight * (post.kl().sum() / 2) + w_vf * vf
            logs = {"vf_weight": w_vf}
            if gan:
                g = -loss.discriminator(recon).mean()
                d_w = adaptive_gan_weight(nll, g, dec, loss.disc_weight)
                total, logs["d_weight"] = total + d_w * loss.disc_factor * g, d_w
        inside = {k: len(v) for k, v in calls.items()}
        total.backward()
        for h in hooks:
            h.remove()
        grads = [p.grad.clone() for p in (*vae.parameters(), proj.weight)]
        return total.detach(), logs, grads, inside, {k: len(v) for k, v in calls.items()}

    ours, plain = run(True), run(False)
    assert ours[3] == {"lpips": 1, "disc": int(gan)} and ours[4] == ours[3]  # nothing more in the step's backward
    assert plain[4] == {"lpips": 2 + int(gan), "disc": 2 * int(gan)}
    assert torch.equal(ours[0], plain[0])
    for k in ("vf_weight", "d_weight") if gan else ("vf_weight",):
        assert torch.equal(ours[1][k], plain[1][k].float()), k  # the logs are fp32
    assert len(ours[2]) == len(plain[2])
    for a, b in zip(ours[2], plain[2]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_lpips_term_enters_rec(lpips):
    vae, loss, x = tiny_setup(perceptual_weight=1.0, disc_start=10**9)
    post = vae.encode(x)
    recon = vae.decode(post.mean)
    _, logs = loss.generator_loss(x, recon, post, 0, vae.decoder.conv_out.weight)
    expect = ((x - recon).abs() + lpips(x, recon)).sum() / 2
    torch.testing.assert_close(logs["nll"], expect.detach(), rtol=1e-5, atol=1e-3)


# ----------------------------------------------------------------------------- foundation models

def test_real_foundation_refuses_without_weights(tmp_path):
    missing = str(tmp_path / "dinov2_vitl14.pth")
    with pytest.raises(FoundationModelUnavailable, match="dinov2_vitl14.pth") as e:
        build_foundation("dinov2_vitl14", missing)
    assert "allow_substitute=true" in str(e.value)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "random_tiny"])
def test_substitute_needs_opt_in(name):
    with pytest.raises(FoundationModelUnavailable, match="allow_substitute"):
        build_foundation(name)


def test_efficientnet_lite0_real_weights_see_a_cat():
    net = load_efficientnet_lite0().eval()
    x = photo(224, "chelsea")
    with torch.no_grad():
        assert net.classify(x).argmax().item() in (281, 282, 283, 284, 285)  # ImageNet cat classes
    fm = build_foundation("efficientnet_lite0", allow_substitute=True, input_size=256)
    feats = fm(photo(128, "chelsea"))
    assert feats.shape == (1, 1280, 8, 8) and not feats.requires_grad


def tiny_vit_spec(**kw):
    return dict(patch_size=14, embed_dim=64, depth=2, num_heads=4, pos_grid=37, layer_scale=True) | kw


def test_vit_loads_timm_layout_and_resamples_positions(tmp_path, monkeypatch):
    import modeling.foundation as fnd
    monkeypatch.setitem(fnd.VIT_SPECS, "dinov2_vitl14", tiny_vit_spec())
    src = VisionTransformer(**tiny_vit_spec())
    for p in src.parameters():
        torch.nn.init.normal_(p, std=0.02)
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    sd["mask_token"] = torch.zeros(1, 64)  # official DINOv2 file entry, ignored
    path = tmp_path / "dinov2.pth"
    torch.save(sd, path)
    fm = build_foundation("dinov2_vitl14", str(path))
    assert fm.input_size == 224 and fm.feature_dim == 64  # the reference resize; width from the spec table
    x = photo(256)
    f = fm(x)
    assert f.shape == (1, 64, 16, 16)
    # the same function by hand: resize to 224, timm's antialiased bicubic grid resampling
    x224 = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
    grid = src.pos_embed[:, 1:].reshape(1, 37, 37, 64).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(16, 16), mode="bicubic", antialias=True).flatten(2).transpose(1, 2)
    t = torch.cat([src.cls_token, src.patch_embed.proj(x224).flatten(2).transpose(1, 2)], 1)
    t = t + torch.cat([src.pos_embed[:, :1], grid], 1)
    for blk in src.blocks:
        t = blk(t)
    ref = src.norm(t)[:, 1:].transpose(1, 2).reshape(1, 64, 16, 16)
    torch.testing.assert_close(f, ref.detach(), rtol=1e-4, atol=1e-5)
    sd.pop("blocks.1.ls2.gamma")
    torch.save(sd, path)
    with pytest.raises(ValueError, match="ls2.gamma"):
        build_foundation("dinov2_vitl14", str(path))


def test_random_vitl14_is_a_labelled_dinov2_shaped_substitute():
    """The benchmarks' VF target: DINOv2 ViT-L/14's shape and input handling, random weights; only with
    allow_substitute, and named as what it is (a shadowed variable once named it 'norm.bias')."""
    with pytest.raises(FoundationModelUnavailable, match="allow_substitute"):
        build_foundation("random_vitl14")
    fm = build_foundation("random_vitl14", allow_substitute=True)
    assert (fm.name, fm.feature_dim, fm.input_size) == ("random_vitl14", 1024, 224)
    assert sum(p.numel() for p in fm.parameters()) > 300e6 and not any(p.requires_grad for p in fm.parameters())
    with torch.no_grad():
        feats = fm(torch.rand(1, 3, 256, 256) * 2 - 1)
    assert feats.shape == (1, 1024, 16, 16) and torch.isfinite(feats).all() and feats.std() > 0.1


def test_an_evaluation_under_no_grad_gets_the_value():
    """Without gradients (an evaluation under no_grad; the adaptive weights off, the GAN not started) the loss is the
    value alone, as the plain formula gives it."""
    vae, loss, x = tiny_setup(disc_start=10**9)
    with torch.no_grad():
        post = vae.encode(x)
        recon = vae.decode(post.mean)
        total, logs = loss.generator_loss(x, recon, post, 0, vae.decoder.conv_out.weight)
    expect = ((x - recon).abs() / torch.exp(loss.logvar) + loss.logvar).sum() / 2 + loss.kl_weight * post.kl().sum() / 2
    torch.testing.assert_close(total, expect.detach())
    assert logs["loss"] == total and not total.requires_grad
