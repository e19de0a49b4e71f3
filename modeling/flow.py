"""Rectified-flow training loss (the reference's transport with a linear path and velocity target).

Path: x_t = t * x1 + (1 - t) * x0, t = 0 is noise, t = 1 is data; target u_t = x1 - x0.
Loss terms per sample: mse = mean((v - u)^2) and cos = mean over positions of (1 - cos(v, u)) with the
cosine over channels; total = mean(mse) + mean(cos). Time is logit-normal (the reference draws it with
scipy on the host each step; here it is drawn on the model's device from a torch generator).
"""
import torch
import torch.nn.functional as F


def sample_time(n: int, device: str | torch.device, dist: str = "logit_normal",
                generator: torch.Generator | None = None, mean: float = 0.0, std: float = 1.0,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if dist == "logit_normal":
        return torch.sigmoid(torch.randn(n, device=device, generator=generator, dtype=dtype) * std + mean)
    if dist == "uniform":
        return torch.rand(n, device=device, generator=generator, dtype=dtype)
    raise ValueError(f"time distribution must be 'logit_normal' or 'uniform', got {dist!r}")


def path_sample(x1: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    t_ = t.view(-1, *([1] * (x1.ndim - 1))).to(x1.dtype)
    return t_ * x1 + (1 - t_) * x0, x1 - x0


def flow_loss_terms(v: torch.Tensor, ut: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (mse, cos) between predicted velocity v and target ut, both (B, C, ...)."""
    dtype = torch.promote_types(v.dtype, torch.float32)  # low precision is upcast; float64 stays float64
    v, ut = v.to(dtype), ut.to(dtype)
    mse = (v - ut).pow(2).mean(dim=tuple(range(1, v.ndim)))
    cos = (1 - F.cosine_similarity(v, ut, dim=1)).mean(dim=tuple(range(1, v.ndim - 1)))
    return mse, cos


def flow_loss(model: torch.nn.Module, x1: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None = None,
              x0: torch.Tensor | None = None, time_dist: str = "logit_normal", use_cosine_loss: bool = True,
              generator: torch.Generator | None = None,
              label_generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Returns dict(loss=scalar, mse=(B,), cos=(B,), t=(B,)). Pass t / x0 to fix the draws."""
    if t is None:
        t = sample_time(x1.shape[0], x1.device, time_dist, generator)
    if x0 is None:
        x0 = torch.randn(x1.shape, device=x1.device, dtype=x1.dtype, generator=generator)
    xt, ut = path_sample(x1, x0, t)
    if label_generator is not None:
        v = model(xt, t, y, generator=label_generator)
    else:
        v = model(xt, t, y)
    mse, cos = flow_loss_terms(v, ut)
    loss = mse.mean() + cos.mean() if use_cosine_loss else mse.mean()
    return {"loss": loss, "mse": mse, "cos": cos, "t": t}
