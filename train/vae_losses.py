"""The VA-VAE training objective: LDM's LPIPSWithDiscriminator plus the VF loss, same functions.

Generator (autoencoder) step, per batch of B images x and reconstructions x':
    rec   = |x - x'| + perceptual_weight * LPIPS(x, x')          (per pixel; LPIPS broadcast)
    nll   = sum(rec / exp(logvar) + logvar) / B                   (logvar: a scalar, init 0)
    kl    = sum(KL(q(z|x) || N(0, I))) / B
    loss  = nll + kl_weight * kl
          + w_vf * vf(z', f)                                      (w_vf adaptive on encoder.conv_out.weight)
          + w_d * disc_factor * (-mean D(x'))                     (w_d adaptive on decoder.conv_out.weight;
                                                                   disc_factor = 0 before disc_start)
Discriminator step: disc_factor * hinge(D(x), D(x')) on detached images.

The adaptive weights' gradient calls also keep d nll / d x' and d g / d x'; the loss returned has the loss's value
and a backward that starts at x' with their weighted sum, so LPIPS's and D's backward run once a step (plain autograd
runs LPIPS's two or three times, D's twice): the same gradients, to rounding (tests/test_vae_losses.py, float64).

Module names match the reference (`loss.logvar`, `loss.discriminator.main.*`,
`loss.perceptual_loss.*`) so its checkpoints' `loss.*` entries load here.
Like the reference optimizer, `logvar` is a parameter that the trainer does not optimise.
"""
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from modeling.discriminator import NLayerDiscriminator, adaptive_gan_weight, adopt_weight, hinge_d_loss, vanilla_d_loss
from modeling.lpips import LPIPS
from modeling.vf_loss import adaptive_vf_weight, vf_loss

from .vae_config import VAVAELossSection


def fp32_up(t: torch.Tensor) -> torch.Tensor:
    """bf16 / fp16 (autocast's outputs) to fp32 for the loss's sums; fp32 and float64 as they are."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


class _ValueWithGradientOf(torch.autograd.Function):
    """`value` (detached) forward; backward, the incoming gradient handed to `surrogate` (a scalar whose gradient
    is the value's): the generator loss's value with a cheaper graph behind it."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
        return value.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, torch.Tensor]:
        return None, grad


class VAVAELoss(nn.Module):
    """`VAVAELoss(cfg.loss)`: built from the `loss:` config section (train/vae_config.VAVAELossSection), whose fields
    are also accepted as keyword arguments (`VAVAELoss(disc_start=0, perceptual_weight=0.0)`)."""

    def __init__(self, config: Optional[VAVAELossSection] = None, /, **kwargs: Any) -> None:
        super().__init__()
        if config is None:
            config = VAVAELossSection(**kwargs)
        elif kwargs:
            raise TypeError("pass either a VAVAELossSection or keyword arguments, not both")
        if config.disc_loss not in ("hinge", "vanilla"):
            raise ValueError(f"disc_loss must be 'hinge' or 'vanilla', got {config.disc_loss!r}")
        self.config = c = config
        self.disc_start, self.kl_weight, self.disc_weight = c.disc_start, c.kl_weight, c.disc_weight
        self.disc_factor, self.perceptual_weight = c.disc_factor, c.perceptual_weight
        self.vf_weight, self.adaptive_vf = c.vf_weight, c.adaptive_vf
        self.cos_margin, self.distmat_margin = c.cos_margin, c.distmat_margin
        self.cos_weight, self.distmat_weight = c.cos_weight, c.distmat_weight
        self.logvar = nn.Parameter(torch.full((), float(c.logvar_init)))
        self.perceptual_loss = LPIPS(c.lpips_weights) if c.perceptual_weight > 0 else None
        self.discriminator = NLayerDiscriminator(3, c.disc_ndf, c.disc_layers)
        self.d_loss = hinge_d_loss if c.disc_loss == "hinge" else vanilla_d_loss

    def gan_active(self, global_step: int) -> bool:
        return adopt_weight(self.disc_factor, global_step, threshold=self.disc_start) > 0

    def generator_loss(self, inputs: torch.Tensor, recon: torch.Tensor, posterior: Any, global_step: int,
                       dec_last_layer: torch.Tensor, z_proj: Optional[torch.Tensor] = None,
                       aux_feature: Optional[torch.Tensor] = None, enc_last_layer: Optional[torch.Tensor] = None,
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, logs) for the autoencoder step; logs hold detached scalars."""
        B = inputs.shape[0]
        rec = (fp32_up(inputs) - fp32_up(recon)).abs()
        if self.perceptual_loss is not None:
            p_loss = fp32_up(self.perceptual_loss(inputs.contiguous(), recon.contiguous()))
            rec = rec + self.perceptual_weight * p_loss
        nll = rec / torch.exp(self.logvar) + self.logvar
        nll_loss = nll.sum() / B
        kl_loss = fp32_up(posterior.kl()).sum() / B
        loss = nll_loss + self.kl_weight * kl_loss
        logs = {"nll": nll_loss, "rec": rec.mean(), "kl": kl_loss, "logvar": self.logvar}
        if self.perceptual_loss is not None:
            logs["lpips"] = p_loss.mean()

        # Both adaptive weights need d nll / d (a last layer): the encoder's last conv (VF) and the decoder's (GAN).
        # One autograd.grad for both: the encoder's path runs through the decoder's last layer, so one backward
        # through LPIPS and the decoder gives both, where two calls ran LPIPS's backward twice. Same gradients.
        # The same call keeps d nll / d recon, and the GAN weight's call d g / d recon: the step's backward starts
        # at recon with their weighted sum (below), so LPIPS's and the discriminator's backward run once a step.
        layers = [w for w, on in ((enc_last_layer, z_proj is not None and self.adaptive_vf),
                                  (dec_last_layer, self.gan_active(global_step))) if on]
        tracked = recon.requires_grad and torch.is_grad_enabled()  # else (an evaluation under no_grad) the value only
        grads = torch.autograd.grad(nll_loss, [*layers, recon] if tracked else layers, retain_graph=True) \
            if tracked or layers else ()
        nll_grads = dict(zip(map(id, layers), grads))
        grad_recon = grads[-1] if tracked else None
        encoder_terms = self.kl_weight * kl_loss  # the loss's terms that do not pass through recon
        if z_proj is not None:
            if aux_feature.shape[-2:] != z_proj.shape[-2:]:  # e.g. a substitute with another stride
                aux_feature = F.interpolate(aux_feature.float(), size=z_proj.shape[-2:], mode="bilinear",
                                            align_corners=False)
            vf = vf_loss(z_proj, aux_feature, self.cos_margin, self.distmat_margin, self.cos_weight,
                         self.distmat_weight)
            w_vf = (adaptive_vf_weight(nll_loss, vf["loss"], enc_last_layer, self.vf_weight,
                                       nll_grads=nll_grads[id(enc_last_layer)]) if self.adaptive_vf
                    else torch.tensor(self.vf_weight))
            loss = loss + w_vf * vf["loss"]
            encoder_terms = encoder_terms + w_vf * vf["loss"]
            logs.update(vf=vf["loss"], vf_mcos=vf["mcos"], vf_mdms=vf["mdms"], vf_weight=w_vf)

        if self.gan_active(global_step):
            g_loss = -fp32_up(self.discriminator(recon.contiguous())).mean()
            g_dec, *g_recon = torch.autograd.grad(g_loss, [dec_last_layer, recon] if tracked else [dec_last_layer],
                                                  retain_graph=True)
            d_weight = adaptive_gan_weight(nll_loss, g_loss, dec_last_layer, self.disc_weight,
                                           nll_grads=nll_grads[id(dec_last_layer)], g_grads=g_dec)
            loss = loss + d_weight * self.disc_factor * g_loss
            if tracked:
                grad_recon = grad_recon + (d_weight * self.disc_factor) * g_recon[0]
            logs.update(g=g_loss, d_weight=d_weight)
        logs["loss"] = loss
        # The loss's value, with the gradient of a function that has the loss's gradient: recon's part as the
        # gradient just taken (linear: sum(recon * grad_recon)), the encoder's terms as they are. The backward skips
        # LPIPS and the discriminator, whose activations are freed on return.
        logs = {k: v.detach().float() for k, v in logs.items()}
        if not tracked:
            return loss, logs
        surrogate = (recon * grad_recon.detach()).sum() + encoder_terms
        return _ValueWithGradientOf.apply(loss.detach(), surrogate), logs

    def discriminator_loss(self, inputs: torch.Tensor, recon: torch.Tensor,
                           global_step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits_real = fp32_up(self.discriminator(inputs.contiguous().detach()))
        logits_fake = fp32_up(self.discriminator(recon.contiguous().detach()))
        factor = adopt_weight(self.disc_factor, global_step, threshold=self.disc_start)
        d_loss = factor * self.d_loss(logits_real, logits_fake)
        return d_loss, {"d_loss": d_loss.detach(), "logits_real": logits_real.detach().mean(),
                        "logits_fake": logits_fake.detach().mean()}
