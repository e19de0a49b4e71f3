"""PatchGAN discriminator (taming's NLayerDiscriminator) and the GAN loss helpers of the reference.

Parameters live under `main.*` as in taming, so a reference `loss.discriminator.*` loads as is.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class NLayerDiscriminator(nn.Module):
    """pix2pix PatchGAN: 4x4 convs, BatchNorm, LeakyReLU(0.2); one logit per overlapping patch."""

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        seq = [nn.Conv2d(input_nc, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            seq += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False),  # no bias before BatchNorm
                    nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
        seq.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*seq)
        self.apply(weights_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def weights_init(m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def adopt_weight(weight: float, global_step: int, threshold: int = 0, value: float = 0.0) -> float:
    """The reference's warm-up switch: `value` before step `threshold`, `weight` from then on."""
    return value if global_step < threshold else weight


def adaptive_gan_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer_weight: torch.Tensor,
                        disc_weight: float, nll_grads: torch.Tensor | None = None,
                        g_grads: torch.Tensor | None = None) -> torch.Tensor:
    """taming: ||d nll / d W|| / (||d g / d W|| + 1e-4), clamped to [0, 1e4], times disc_weight. nll_grads, g_grads:
    d nll / d W and d g / d W when the caller took them already."""
    if nll_grads is None:
        nll_grads = torch.autograd.grad(nll_loss, last_layer_weight, retain_graph=True)[0]
    if g_grads is None:
        g_grads = torch.autograd.grad(g_loss, last_layer_weight, retain_graph=True)[0]
    w = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
    return torch.clamp(w, 0.0, 1e4).detach() * disc_weight
