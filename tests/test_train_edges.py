"""The trainers where the other tests did not look: the EMA on a skipped step and in evaluation, the normalised
latents a batch holds, the learning-rate schedule, clipping that only shrinks, synthetic batches that differ, the
EMA decay's default, each rank's own noise; the VA-VAE's loss terms with unequal margins, weights and disc_factor,
and its step on a posterior draw."""
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- VA-VAE loss

def _tiny_loss(**kw):
    from modeling.vavae import AutoencoderKL
    from train.vae_losses import VAVAELoss
    import skimage.data
    import torch.nn.functional as F
    torch.manual_seed(0)
    vae = AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), resolution=32, z_channels=4,
                        embed_dim=4)
    loss = VAVAELoss(perceptual_weight=0.0, disc_ndf=8, **kw)
    img = torch.from_numpy(skimage.data.astronaut()).permute(2, 0, 1)[None].float() / 127.5 - 1
    x = F.interpolate(img, size=(32, 32), mode="bilinear", antialias=True, align_corners=False).repeat(2, 1, 1, 1)
    return vae, loss, x


def test_vf_margins_and_weights_reach_their_own_terms():
    """vf_margin_swap / vf_weights_swap: the suite sets both margins (and both weights) equal."""
    from modeling.vf_loss import vf_loss
    vae, loss, x = _tiny_loss(disc_start=10**9, adaptive_vf=False, vf_weight=1.0, cos_margin=0.3,
                              distmat_margin=0.1, cos_weight=2.0, distmat_weight=0.5)
    post = vae.encode(x)
    proj = torch.nn.Conv2d(4, 16, 1, bias=False)
    aux = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    z = post.mean
    _, logs = loss.generator_loss(x, vae.decode(z), post, 0, vae.decoder.conv_out.weight, proj(z), aux,
                                  vae.encoder.conv_out.weight)
    ref = vf_loss(proj(z), aux, m1=0.3, m2=0.1, cos_weight=2.0, distmat_weight=0.5)
    for ours, theirs in (("vf_mcos", "mcos"), ("vf_mdms", "mdms"), ("vf", "loss")):
        torch.testing.assert_close(logs[ours], ref[theirs].detach())


def test_gan_gradient_carries_the_disc_factor():
    """disc_factor_grad: the loss's value had disc_factor, its gradient (the surrogate) did not; the suite's
    gradient test runs at disc_factor 1."""
    from modeling.discriminator import adaptive_gan_weight

    def run(ours):
        vae, loss, x = _tiny_loss(disc_start=0, disc_factor=0.5)
        vae, loss, x = vae.double(), loss.double(), x.double()
        post = vae.encode(x)
        recon = vae.decode(post.mean)
        dec = vae.decoder.conv_out.weight
        loss.discriminator.requires_grad_(False)
        if ours:
            total, _ = loss.generator_loss(x, recon, post, 0, dec)
        else:
            nll = ((x - recon).abs() / torch.exp(loss.logvar) + loss.logvar).sum() / 2
            g = -loss.discriminator(recon).mean()
            total = nll + loss.kl_weight * post.kl().sum() / 2 + adaptive_gan_weight(nll, g, dec, loss.disc_weight) \
                * 0.5 * g
        total.backward()
        return [p.grad.clone() for p in vae.parameters()]

    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_the_autoencoder_step_decodes_a_posterior_draw():
    """vae_mode: the VA-VAE trained on the posterior's mean instead of a draw (the reference samples)."""
    from train.train_vae import AutoencoderStep
    vae, loss, x = _tiny_loss(disc_start=10**9)
    _, _, recon = AutoencoderStep(vae, None, loss)(x, None, 0, torch.Generator().manual_seed(0))
    with torch.no_grad():
        expect = vae.decode(vae.encode(x).sample(torch.Generator().manual_seed(0)))
    torch.testing.assert_close(recon, expect, rtol=0, atol=0)


# ----------------------------------------------------------------------------- training

def _dit_trainer(tmp_path, *overrides):
    from modeling.config import load_config
    from train.dit_config import DiTTrainConfig
    from train.train_dit import Trainer
    return Trainer(load_config(DiTTrainConfig, REPO / "configs/dit_tiny_cpu.yaml", [
        f"checkpoint.dir={tmp_path}/ckpt", f"logging.dir={tmp_path}", "logging.progress_bar=false",
        "logging.tensorboard=false", "train.zero_stage=0", *overrides]))


def test_ema_skips_a_skipped_step_and_is_what_is_evaluated(tmp_path):
    """ema_always: the EMA moved on a skipped step (the suite's skip test has EMA == weights, so lerp is a no-op);
    eval_raw: eval_model() held the raw weights, not the EMA."""
    trainer = _dit_trainer(tmp_path, "train.ema_decay=0.5")
    try:
        for _ in range(2):
            trainer.train_step(trainer.next_batch())
        ema = trainer.ema.state_dict()
        evaluated = trainer.eval_model().state_dict()
        for k, v in ema.items():
            assert torch.equal(evaluated[k], v), k
        assert any(not torch.equal(p.detach(), ema[k]) for k, p in trainer.engine.module.named_parameters())
        lat, y = trainer.next_batch()
        lat = lat.clone()
        lat[0, 0, 0, 0] = float("nan")
        assert trainer.train_step((lat, y))["applied"] == 0.0
        for k, v in trainer.ema.state_dict().items():
            assert torch.equal(v, ema[k]), k
    finally:
        trainer.close()


def test_the_dit_trains_on_normalised_latents(tmp_path):
    """norm_dir: (z - mean) * std instead of (z - mean) / std."""
    trainer = _dit_trainer(tmp_path, "data.latent_multiplier=2.0")
    try:
        state = trainer.loader.state_dict()
        lat, y = trainer.fetch_batch()
        trainer.loader.load_state_dict(state)
        it = iter(trainer.loader)
        raw = [next(it) for _ in range(trainer.grad_accum)]
        z = torch.cat([r[0] for r in raw])
        torch.testing.assert_close(lat, (z - trainer.mean) / trainer.std * 2.0)
        assert torch.equal(y, torch.cat([r[1] for r in raw]))
    finally:
        trainer.close()


def test_lr_schedule():
    """lr_warm: (step + 1) -> step: the first step of every run (warmup 0, the papers') had lr 0."""
    from train.config_sections import OptimSection
    assert OptimSection(lr=1e-3).lr_at(0) == 1e-3
    assert [OptimSection(lr=1.0, warmup_steps=4).lr_at(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_grad_clip_only_shrinks():
    """clip_noclamp: without the clamp at 1, a gradient below grad_clip was scaled up to it."""
    from train.guard import engine_step

    class Engine:
        def __init__(self, g):
            self.module = torch.nn.Linear(2, 1, bias=False)
            self.module.weight.grad = g.clone()

        def zero_optimization_stage(self):
            return 0

        def step(self):
            pass
    for g, clip, expect in (([3.0, 4.0], 10.0, [3.0, 4.0]), ([3.0, 4.0], 1.0, [0.6, 0.8])):
        e = Engine(torch.tensor([g]))
        applied, norm = engine_step(e, clip)
        assert applied and norm.item() == pytest.approx(5.0)
        torch.testing.assert_close(e.module.weight.grad, torch.tensor([expect]), rtol=1e-5, atol=1e-6)


def test_synthetic_latents_differ_between_batches():
    """Found while auditing: `hash(...) & (2 ** 62)` keeps one bit, and torch seeds its CPU generator from the low
    32 bits: every synthetic batch, on every rank and at every position, is the same one. Tests of data order and
    resume on synthetic latents could not fail (resume_loader_state survived)."""
    from train.train_dit import SyntheticLatents
    it = iter(SyntheticLatents(2, 1, 2, 10))
    a, b = next(it)[0], next(it)[0]
    assert not torch.equal(a, b)
    other = next(iter(SyntheticLatents(2, 1, 2, 10, rank=1)))[0]
    assert not torch.equal(a, other)


def test_ema_decay_default_is_the_references():
    """ema_decay_default: a config without train.ema_decay gets the reference's 0.9999."""
    from train.dit_config import DiTTrainSection
    assert DiTTrainSection().ema_decay == 0.9999


def test_each_rank_draws_its_own_noise(tmp_path):
    """rank_gen_seed (multi-rank): every rank's generator (noise, time, label dropout) was seeded alike, so the
    ranks of a data-parallel run drew the same noise and times."""
    import subprocess
    import sys
    sys.path.insert(0, str(REPO / "tests"))
    from multiproc import env, torchrun
    cmd = torchrun("train.train_dit", "--config", "configs/dit_tiny_cpu.yaml", "train.steps=1", "train.global_batch=16",
                   "train.batch_per_gpu=8", "train.zero_stage=0", "checkpoint.every=1",
                   f"checkpoint.dir={tmp_path}/ckpt",
                   f"logging.dir={tmp_path}", "logging.progress_bar=false", "logging.tensorboard=false",
                   "checkpoint.export_reference=false")
    subprocess.run(cmd, cwd=REPO, env=env(), check=True, timeout=300, capture_output=True)
    from train.checkpoint import load_state
    r0, r1 = (load_state(tmp_path / "ckpt" / "step_0000001" / f"rank_0000{r}.pt") for r in (0, 1))
    assert not torch.equal(r0["generator"], r1["generator"])


def test_a_trainer_state_without_its_config_is_a_broken_checkpoint(tmp_path, caplog):
    """A trainer.pt holding no run config (damaged, or another program's) was a KeyError traceback at resume; it is a
    broken checkpoint now, and the previous one is resumed."""
    import json

    from train.checkpoint import MANIFEST, load_state
    from train.train_dit import main
    args = ["--config", str(REPO / "configs/dit_tiny_cpu.yaml"), "train.zero_stage=0", "checkpoint.every=1",
            f"checkpoint.dir={tmp_path}/ckpt", f"logging.dir={tmp_path}", "logging.progress_bar=false",
            "logging.tensorboard=false", "checkpoint.export_reference=false"]
    assert main([*args, "train.steps=2"]) == 0
    path = tmp_path / "ckpt" / "step_0000002" / "trainer.pt"
    state = load_state(path)
    del state["config"]
    torch.save(state, path)
    manifest = json.loads((path.parent / MANIFEST).read_text())
    manifest["files"]["trainer.pt"] = path.stat().st_size
    (path.parent / MANIFEST).write_text(json.dumps(manifest))
    with caplog.at_level("INFO"):
        assert main([*args, "train.steps=3"]) == 0
    assert "holds no run config" in caplog.text and "step_0000001 at step 1" in caplog.text
