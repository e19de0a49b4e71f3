"""What the reference does where the other tests did not look: label dropout at the paper's p 0.1, the zero
init of adaLN and the output layer, Heun and Euler-Maruyama against exact solutions, the adaptive weights' clamps, the
posterior's draw and its logvar clamp, LPIPS against taming's."""
import math
from pathlib import Path

import torch

from modeling.lightningdit import LightningDiT

REPO = Path(__file__).resolve().parents[1]
TINY = dict(input_size=8, patch_size=2, in_channels=8, hidden_size=48, depth=2, num_heads=2, num_classes=5)


# ----------------------------------------------------------------------------- modeling

def test_label_dropout_rate_is_the_configured_probability():
    """drop_gt: `rand < p` -> `rand > p` (drops 90% at p 0.1); the suite's test uses p = 0.5, symmetric."""
    emb = LightningDiT(**TINY, class_dropout_prob=0.1).y_embedder
    dropped = emb.token_drop(torch.zeros(20000, dtype=torch.long), torch.Generator().manual_seed(0))
    assert abs((dropped == 5).double().mean().item() - 0.1) < 0.01


def test_fresh_model_has_the_references_zero_init():
    """init_final_zero: adaLN and the output layer start at zero (the reference's init): the velocity is 0."""
    m = LightningDiT(**TINY)
    zeros = [m.final_layer.linear.weight, m.final_layer.linear.bias, m.final_layer.adaLN_modulation[-1].weight,
             m.final_layer.adaLN_modulation[-1].bias]
    zeros += [p for b in m.blocks for p in b.adaLN_modulation[-1].parameters()]
    assert all(torch.count_nonzero(p) == 0 for p in zeros)
    out = m(torch.randn(2, 8, 8, 8), torch.rand(2), torch.tensor([0, 1]))
    assert torch.count_nonzero(out) == 0


def test_heun_is_exact_for_a_velocity_linear_in_t():
    """heun_t0: the corrector evaluated at t0 instead of t1 (Heun becomes Euler; both agree with themselves)."""
    from modeling.integrators import make_integrator
    grid = [i / 10 for i in range(11)]
    x = make_integrator("heun").integrate(lambda x, t: torch.full_like(x, t), torch.zeros(3, dtype=torch.float64),
                                          grid)
    torch.testing.assert_close(x, torch.full((3,), 0.5, dtype=torch.float64), rtol=0, atol=1e-12)


def test_euler_maruyama_keeps_the_marginals_of_gaussian_data():
    """em_drift: the 0.5 g^2 score term without its factor t. With data N(0, s^2) the exact velocity is
    x (t s^2 - (1 - t)) / (t^2 s^2 + (1 - t)^2); the SDE must end with std s (the ODE's marginal)."""
    from modeling.integrators import make_integrator
    s = 2.0

    def v(x, t):
        return x * (t * s * s - (1 - t)) / (t * t * s * s + (1 - t) ** 2)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(40000, generator=g, dtype=torch.float64)
    grid = [i / 200 for i in range(201)]
    x1 = make_integrator("euler_maruyama").integrate(v, x0, grid, generator=g)
    assert abs(x1.std().item() - s) < 0.05 and abs(x1.mean().item()) < 0.05


def test_adaptive_weights_clamp_where_the_references_do():
    """vf_maxw / gan_clamp: the VF weight is clamped at 1e8 (contperceptual.calculate_adaptive_weight_vf), the GAN
    weight at 1e4 (calculate_adaptive_weight)."""
    from modeling.discriminator import adaptive_gan_weight
    from modeling.vf_loss import adaptive_vf_weight
    w = torch.ones(4, requires_grad=True)
    small = 1e-2 * w.sum()
    for scale, expect in ((1e5, 2e5 / (2e-2 + 1e-4)), (1e7, 1e8)):  # below / above the VF clamp
        torch.testing.assert_close(adaptive_vf_weight(scale * w.sum(), small, w, 1.0).double(),
                                   torch.tensor(expect, dtype=torch.float64), rtol=1e-5, atol=0)
    torch.testing.assert_close(adaptive_gan_weight(1e5 * w.sum(), small, w, 0.5), torch.tensor(0.5e4))


def test_posterior_sample_and_logvar_clamp():
    """post_var: mean + var * noise; logvar_clamp: [-30, 20] (the reference's DiagonalGaussianDistribution)."""
    from modeling.vavae import DiagonalGaussian
    zeros = torch.zeros(1, 4, 64, 64)
    d = DiagonalGaussian(torch.cat([zeros, torch.full_like(zeros, 2 * math.log(3.0))], 1))
    assert abs(d.sample(torch.Generator().manual_seed(0)).std().item() - 3.0) < 0.05
    for lv, expect in ((15.0, 15.0), (25.0, 20.0), (-35.0, -30.0)):
        assert DiagonalGaussian(torch.cat([zeros, torch.full_like(zeros, lv)], 1)).logvar.max().item() == expect


def test_lpips_is_tamings():
    """LPIPS against the authors' taming LPIPS on seeded pairs (tests/fixtures/make_taming_lpips.py): the
    ScalingLayer's constants, the normalisation, the lin layers, the means; with the shift constants permuted the
    training and evaluation tests still passed."""
    import numpy as np

    from modeling.lpips import LPIPS
    fx = np.load(Path(__file__).parent / "fixtures" / "taming_lpips.npz")
    with torch.no_grad():
        got = LPIPS().eval()(torch.from_numpy(fx["a"]), torch.from_numpy(fx["b"])).flatten()
    torch.testing.assert_close(got, torch.from_numpy(fx["expected"]), rtol=1e-4, atol=1e-6)
