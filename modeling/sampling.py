"""Samplers for the rectified flow: integrate dx/dt = v(x, t) from noise (t=0) to data (t=1).

The time grid is the reference's: linspace(0, 1, steps) mapped by the timestep shift
s*t / (1 + (s-1)*t) (s = 0.3 for the paper's FIDs), so `steps` grid points give `steps - 1`
model calls for Euler. Classifier-free guidance follows LightningDiT.forward_with_cfg; where a step
is below `cfg_interval_start` the unconditional half is not computed at all. The grid lives on the
host, so deciding that needs no device synchronisation.
"""
import math

import torch


def timestep_shift(t, s):
    return s * t / (1 + (s - 1) * t)


def time_grid(steps, shift=1.0, device=None, dtype=torch.float32):
    t = torch.linspace(0, 1, steps, dtype=dtype, device=device)
    return timestep_shift(t, shift) if shift != 1.0 else t


class GuidedVelocity:
    """v(x, t) for a batch of conditional samples, with optional guidance."""

    def __init__(self, model, y, cfg_scale=1.0, cfg_interval_start=0.0, guidance="all", null_class=None):
        self.model, self.y = model, y
        self.cfg_scale, self.cfg_interval_start, self.guidance = cfg_scale, cfg_interval_start, guidance
        null = model.num_classes if null_class is None else null_class
        self.y_null = torch.full_like(y, null)
        if guidance not in ("all", "reference"):
            raise ValueError(f"guidance must be 'all' or 'reference', got {guidance!r}")

    def __call__(self, x, t: float):
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)
        if self.cfg_scale == 1.0 or t < self.cfg_interval_start:
            return self.model(x, tt, self.y)
        out = self.model.forward_with_cfg(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([self.y, self.y_null]),
                                          self.cfg_scale, self.cfg_interval_start, self.guidance)
        return out[: x.shape[0]]


@torch.no_grad()
def sample(model, z, y, steps=250, method="euler", shift=0.3, cfg_scale=1.0, cfg_interval_start=0.0,
           guidance="all", return_trajectory=False, generator=None, diffusion_norm=1.0, atol=1e-6, rtol=1e-3):
    """Draw samples from noise z (B, C, H, W) with labels y (B,).

    method: "euler" / "heun" on the shifted grid, "dopri5" (adaptive, torchdiffeq; `steps` only sets the
    output grid), "euler_maruyama" (SDE with the score from the velocity; `diffusion_norm` scales the noise).
    Returns the final latents, or (final, trajectory (steps, B, C, H, W)) with return_trajectory.
    """
    v = GuidedVelocity(model, y, cfg_scale, cfg_interval_start, guidance)
    grid = time_grid(steps, shift, dtype=torch.float64).tolist()
    x = z
    traj = [x] if return_trajectory else None
    if method == "dopri5":
        from torchdiffeq import odeint
        tgrid = torch.tensor(grid, device=z.device, dtype=torch.float32)
        # torchdiffeq evaluates at arbitrary t: guidance on/off is decided per evaluation (host float).
        out = odeint(lambda t, x_: v(x_, float(t)), z, tgrid, method="dopri5", atol=atol, rtol=rtol)
        return (out[-1], out) if return_trajectory else out[-1]
    for i in range(len(grid) - 1):
        t0, t1 = grid[i], grid[i + 1]
        dt = t1 - t0
        if method == "euler":
            x = x + dt * v(x, t0)
        elif method == "heun":
            d0 = v(x, t0)
            x_pred = x + dt * d0
            x = x + dt * 0.5 * (d0 + v(x_pred, t1))
        elif method == "euler_maruyama":
            x = _euler_maruyama_step(v, x, t0, t1, i == len(grid) - 2, generator, diffusion_norm)
        else:
            raise ValueError(f"unknown sampling method {method!r}")
        if return_trajectory:
            traj.append(x)
    return (x, torch.stack(traj)) if return_trajectory else x


def _euler_maruyama_step(v, x, t0, t1, last, generator, diffusion_norm):
    """SDE with the ODE's marginals: dx = [v + 0.5 g^2 score] dt + g dW. For the linear path
    (x = t x1 + (1 - t) x0) the score is (t v - x) / (1 - t); g^2 = 2 * diffusion_norm * t * (1 - t) keeps
    the drift bounded at both ends. The last step is deterministic (lands on the mean, as SiT's "Mean")."""
    dt = t1 - t0
    vel = v(x, t0)
    if last:
        return x + dt * vel
    drift = vel + diffusion_norm * t0 * (t0 * vel - x)  # 0.5 g^2 * score
    g2 = 2 * diffusion_norm * t0 * (1 - t0)
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x + drift * dt + math.sqrt(g2 * dt) * noise
