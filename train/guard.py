"""The non-finite guard both trainers use: one error type, one way to skip a bad step, one streak counter.

A step whose loss or gradient norm is not finite must not touch the weights, and the decision must be the
same on every rank (a rank that skips a collective the others enter hangs the run). So:

- `poison(loss)` multiplies the loss by 1.0 (bit-exact) or NaN: a non-finite loss poisons every gradient,
  without a host sync, and the all-reduce carries the poison to every rank;
- `engine_step(engine, grad_clip)` applies the update only when the global gradient norm is finite:
  ZeRO 1-3 do that themselves; without ZeRO (stage 0) we compute the all-reduced norm and clip ourselves;
- `NonFiniteGuard` counts skipped steps (in a row and in total), logs each one, and after
  `train.max_bad_steps` in a row calls the trainer's save and raises `NonFiniteError`.
"""
import logging
from typing import Any, Callable, Optional

import torch

log = logging.getLogger("train")


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row; the run was checkpointed before stopping."""


def poison(loss: torch.Tensor) -> torch.Tensor:
    """loss * 1.0 when finite, loss * NaN otherwise (so backward poisons every gradient on every rank)."""
    return loss * torch.where(torch.isfinite(loss.detach()), 1.0, float("nan"))


def engine_step(engine: Any, grad_clip: float = 0.0) -> tuple[bool, torch.Tensor]:
    """DeepSpeed optimizer step that is skipped when the global gradient norm is not finite.

    Returns (applied, grad_norm), grad_norm a 0-dim fp32 tensor on the parameters' device: read it on the
    host only when logging (float() waits for the step to finish). Without ZeRO, DeepSpeed applies any
    gradient: the (already all-reduced) gradients are checked and clipped here (`clip_grad_norm_`
    arithmetic, with foreach kernels); the DeepSpeed config's `gradient_clipping` must then be 0. ZeRO 1-3
    skip the update themselves on a non-finite norm and clip with the config's `gradient_clipping`. The one
    host synchronisation is the finite check (ours without ZeRO, DeepSpeed's with it)."""
    device = next(engine.module.parameters()).device
    if engine.zero_optimization_stage() == 0:
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
        if not grads:
            engine.step()
            return True, torch.zeros((), device=device)
        grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm([g.float() for g in grads])))
        applied = bool(torch.isfinite(grad_norm))
        if not applied:
            for p in engine.module.parameters():
                p.grad = None  # Adam(W) leaves a parameter without a gradient (and its state) untouched
        elif grad_clip > 0:
            torch._foreach_mul_(grads, torch.clamp(grad_clip / (grad_norm + 1e-6), max=1.0))
        engine.step()
        return applied, grad_norm
    engine.step()
    norm = engine.get_global_grad_norm()
    norm = (torch.full((), float("nan"), device=device) if norm is None
            else torch.as_tensor(norm, dtype=torch.float32, device=device).reshape(()))
    return bool(engine.was_step_applied()), norm


class NonFiniteGuard:
    """Counts skipped steps; `max_bad_steps` in a row -> `on_stop()` (save a checkpoint) and NonFiniteError."""

    def __init__(self, max_bad_steps: int) -> None:
        if max_bad_steps < 1:
            raise ValueError(f"max_bad_steps must be >= 1, got {max_bad_steps}")
        self.max_bad_steps = max_bad_steps
        self.skipped_steps, self.bad_streak = 0, 0

    def update(self, applied: bool, step: int, on_stop: Optional[Callable[[], Any]] = None, where: Any = "") -> None:
        """Record the outcome of `step` (1-based, after it ran). Raises NonFiniteError on the K-th bad step
        in a row, after calling on_stop(); `where` names the checkpoint for the message."""
        if applied:
            self.bad_streak = 0
            return
        self.skipped_steps += 1
        self.bad_streak += 1
        log.warning("step %d skipped: non-finite loss or gradient norm (%d in a row, %d in total)",
                    step, self.bad_streak, self.skipped_steps)
        if self.bad_streak >= self.max_bad_steps:
            if on_stop is not None:
                on_stop()
            raise NonFiniteError(
                f"{self.bad_streak} non-finite steps in a row at step {step}; checkpoint saved"
                f"{' in ' + str(where) if where else ''}. Lower optim.lr, check the data, or resume from an "
                f"earlier checkpoint.")

    def state_dict(self) -> dict[str, int]:
        return {"skipped_steps": self.skipped_steps, "bad_streak": self.bad_streak}

    def load_state_dict(self, state: dict) -> None:
        self.skipped_steps, self.bad_streak = int(state["skipped_steps"]), int(state["bad_streak"])
