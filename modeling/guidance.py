"""Classifier-free guidance, written once: which steps are guided, and how the two halves are mixed.

Every sampler (`sampling.sample`, `sampling.Sampler`, `LightningDiT.forward_with_cfg`) and the speed benchmark's
cost model call these two functions, so the rule and the mix cannot drift apart.

- `is_guided(t, cfg_scale, cfg_interval_start)`: guidance runs where the scale is above 1 and t >= the interval
  start, both as the authors' code decides: `cfg_scale > 1` (inference.py: a scale <= 1 samples conditionally)
  and the comparison in float32 (their times are float32 tensors). Elsewhere the unconditional half is not
  computed at all.
- `cfg_velocity(out, cfg_scale, guidance)`: from the model outputs of a [conditional; unconditional] batch,
  the guided velocity of the conditional half. guidance="all" mixes every channel (standard CFG);
  "reference" mixes latent channels 0..2 only, as the authors' forward_with_cfg does (a leftover of
  pixel-space DiT; their cfg scales were tuned for it), the other channels keep the conditional output.
"""
from typing import Literal, Optional, Union

import numpy as np
import torch

Guidance = Literal["all", "reference"]
GUIDANCE_MODES: tuple[str, ...] = ("all", "reference")
REFERENCE_CHANNELS = 3  # the authors' code guides latent channels 0..2 only


def is_guided(t: Union[float, torch.Tensor], cfg_scale: float, cfg_interval_start: float) -> Union[bool, torch.Tensor]:
    """Whether guidance applies at time t: cfg_scale > 1 and t >= cfg_interval_start in float32 (the reference's
    rule, module docstring; a scale below 1 mixed the halves until a review, 2026-12-05).

    t: a host float (a grid time: no device synchronisation) -> bool; or a tensor of per-sample times ->
    a bool tensor of the same shape."""
    if isinstance(t, torch.Tensor):
        return (t.float() >= float(np.float32(cfg_interval_start))) & (cfg_scale > 1.0)
    return cfg_scale > 1.0 and bool(np.float32(t) >= np.float32(cfg_interval_start))


def guided_channels(guidance: str, channels: int) -> int:
    """How many leading latent channels the guidance mixes (the rest keep the conditional output)."""
    if guidance == "reference":
        return min(REFERENCE_CHANNELS, channels)
    if guidance == "all":
        return channels
    raise ValueError(f"guidance must be one of {GUIDANCE_MODES}, got {guidance!r}")


def cfg_velocity(out: torch.Tensor, cfg_scale: float, guidance: str = "all",
                 on: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The guided velocity (B, C, H, W) of the conditional half of `out` (2B, C, H, W) = model outputs of
    [conditional; unconditional]: uncond + cfg_scale * (cond - uncond) on the guided channels, the conditional
    output on the others. `on` (B,) bool: per-sample switch, the conditional output where False."""
    k = guided_channels(guidance, out.shape[1])
    cond, uncond = out[:, :k].chunk(2, dim=0)
    mixed = uncond + cfg_scale * (cond - uncond)
    if on is not None:
        mixed = torch.where(on.view(-1, *([1] * (mixed.ndim - 1))), mixed, cond)
    return torch.cat([mixed, out[: len(cond), k:]], dim=1)
