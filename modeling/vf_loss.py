"""VF loss: align the tokenizer's latent with a frozen vision foundation model (VA-VAE, Sec. 3).

    mcos = mean_{b,h,w} relu(1 - m1 - cos(z'_{hw}, f_{hw}))              (cosine over channels)
    mdms = mean_{b,i,j} relu(|Zn^T Zn - Fn^T Fn|_{ij} - m2)              (Gram of channel-normalised tokens)

z' is the latent after the 1x1 projection `linear_proj` to the foundation model's width.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def make_linear_proj(z_channels: int, feat_dim: int) -> nn.Conv2d:
    """The reference's `linear_proj`: a bias-free 1x1 conv from the latent to the feature width."""
    return nn.Conv2d(z_channels, feat_dim, kernel_size=1, bias=False)


def vf_loss(z_proj: torch.Tensor, aux_feature: torch.Tensor, m1: float = 0.5, m2: float = 0.25,
            cos_weight: float = 1.0, distmat_weight: float = 1.0) -> dict[str, torch.Tensor]:
    if z_proj.shape != aux_feature.shape:
        raise ValueError(f"z_proj {tuple(z_proj.shape)} and aux_feature {tuple(aux_feature.shape)} must match "
                         "(resize the features to the latent grid first)")
    dtype = torch.promote_types(z_proj.dtype, torch.float32)  # upcast bf16/fp16, keep float64
    with torch.autocast(z_proj.device.type, enabled=False):  # fp32 Gram matrices also under a bf16 autocast
        zf, ff = z_proj.to(dtype), aux_feature.to(dtype)
        z_n = F.normalize(zf.flatten(2), dim=1)
        f_n = F.normalize(ff.flatten(2), dim=1)
        z_gram = torch.einsum("bci,bcj->bij", z_n, z_n)
        f_gram = torch.einsum("bci,bcj->bij", f_n, f_n)
        mdms = F.relu((z_gram - f_gram).abs() - m2).mean()
        mcos = F.relu(1 - m1 - F.cosine_similarity(ff, zf, dim=1)).mean()
    return {"mcos": mcos, "mdms": mdms, "loss": cos_weight * mcos + distmat_weight * mdms}


def adaptive_vf_weight(nll_loss: torch.Tensor, vf_loss_value: torch.Tensor, last_layer_weight: torch.Tensor,
                       vf_weight: float, max_weight: float = 1e8,
                       nll_grads: torch.Tensor | None = None) -> torch.Tensor:
    """||grad nll|| / (||grad vf|| + 1e-4) on the encoder's last conv, clamped to [0, max], times vf_weight.
    Detached: the weight scales the VF gradient, it is not trained. nll_grads: d nll / d last_layer_weight when the
    caller took it already (with the GAN weight's in one backward pass: train/vae_losses.py)."""
    if nll_grads is None:
        nll_grads = torch.autograd.grad(nll_loss, last_layer_weight, retain_graph=True)[0]
    vf_grads = torch.autograd.grad(vf_loss_value, last_layer_weight, retain_graph=True)[0]
    w = torch.norm(nll_grads) / (torch.norm(vf_grads) + 1e-4)
    return torch.clamp(w, 0.0, max_weight).detach() * vf_weight
