"""Evaluation where the other tests did not look: the latents `generate` and the trainer's evaluation decode
(denormalised: sample / multiplier * std + mean), and the Inception score's splits of 5000 as ADM's."""
import numpy as np
import pytest
import torch

from modeling.lightningdit import LightningDiT


# ----------------------------------------------------------------------------- evaluation

def _sampled(dit, n, seed, cfg, class_balanced):
    from evaluation.generate import sample_labels, sample_noise
    from modeling.sampling import Sampler
    size = dit.x_embedder.grid_size * dit.x_embedder.patch_size[0]
    z = sample_noise(range(n), (dit.in_channels, size, size), seed)
    return Sampler(dit, cfg)(z, sample_labels(n, dit.num_classes, seed, class_balanced))


def _tiny_models():
    from modeling.vavae import AutoencoderKL
    torch.manual_seed(0)
    dit = LightningDiT(input_size=4, patch_size=1, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=3)
    for p in dit.parameters():  # a non-zero velocity
        p.data.add_(0.05 * torch.randn_like(p))
    vae = AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), resolution=8, z_channels=4,
                        embed_dim=4)
    return dit.eval(), vae.eval()


@pytest.fixture
def decoded(monkeypatch):
    import modeling.sampling
    seen = []

    def fake(vae, latents, precision="fp32", batch_size=None):
        seen.append(latents.clone())
        return torch.zeros(len(latents), 8, 8, 3, dtype=torch.uint8)
    monkeypatch.setattr(modeling.sampling, "decode_images", fake)
    return seen


def test_generate_decodes_the_denormalised_latents(tmp_path, decoded):
    """gen_mult / gen_stats_inv: the latents decoded are sample / multiplier * std + mean."""
    from evaluation.generate import generate
    from modeling.sampling import SamplingConfig
    dit, vae = _tiny_models()
    stats = {"mean": torch.randn(1, 4, 1, 1), "std": torch.rand(1, 4, 1, 1) + 0.5}
    cfg = SamplingConfig(steps=3, cfg_scale=2.0)
    generate(dit, vae, tmp_path / "s.npz", 4, latent_stats=stats, batch_size=4, config=cfg, seed=1, progress=False,
             latent_multiplier=2.0)
    expect = _sampled(dit, 4, 1, cfg, False) / 2.0 * stats["std"] + stats["mean"]
    torch.testing.assert_close(torch.cat(decoded), expect, rtol=1e-5, atol=1e-6)


def test_training_evaluation_decodes_the_denormalised_latents(decoded):
    """traineval_mult: the trainer's evaluation multiplied by the multiplier instead of dividing."""
    from evaluation.train_eval import EvalSettings, build_eval_fn
    from modeling.sampling import SamplingConfig
    dit, vae = _tiny_models()
    stats = {"mean": torch.randn(1, 4, 1, 1), "std": torch.rand(1, 4, 1, 1) + 0.5}
    s = EvalSettings(every=1, num_samples=4, batch_size=4, steps=3, cfg_scale=2.0, precision="fp32", grid=0,
                     metrics=[])
    fn = build_eval_fn(s, vae=vae, latent_stats=stats, device="cpu", latent_multiplier=2.0, log=None)
    fn(dit, 1)
    expect = _sampled(dit, 4, s.seed, SamplingConfig.of(s), True) / 2.0 * stats["std"] + stats["mean"]
    torch.testing.assert_close(torch.cat(decoded), expect, rtol=1e-5, atol=1e-6)


def test_inception_score_splits_of_5000_as_adm():
    """is_split: the split size (ADM's evaluator: 5000) never mattered in the suite (fewer logits)."""
    from evaluation.adm_metrics import inception_score
    g = np.random.default_rng(0)
    logits = np.concatenate([g.normal(size=(5000, 10)) * 3, g.normal(size=(5000, 10)) * 3 + np.arange(10)])

    def one(part):
        p = torch.softmax(torch.as_tensor(part, dtype=torch.float64), 1).numpy()
        return np.exp(np.mean(np.sum(p * (np.log(p) - np.log(p.mean(0, keepdims=True))), 1)))
    assert inception_score(logits) == pytest.approx((one(logits[:5000]) + one(logits[5000:])) / 2, rel=1e-12)
