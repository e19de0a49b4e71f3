"""The fused SwiGLU MLP for inference: each `w3(swiglu(w12(x)))` MLP runs its w12 GEMM and the SwiGLU as one
Triton kernel (`kernels.ops.linear_swiglu`), so the (rows, 2H) product is never written.

The module swap lives here (modeling/ owns modules); the kernel and its reference live in
kernels/linear_swiglu.py. The Sampler's `fused_mlp` calls `fuse_swiglu_mlps` on its own copy of the model.
"""
from __future__ import annotations

import torch
from torch import nn

import kernels
from kernels import ops
from kernels.backend import triton_status


class FusedSwiGLUFFN(nn.Module):
    """A SwiGLU MLP (`w3(swiglu(w12(x)))`) whose w12 + SwiGLU run as `kernels.ops.linear_swiglu`. Holds the original
    w12 and w3 Linear modules, so parameter names and values are unchanged (state_dicts load either way)."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.w12, self.w3 = mlp.w12, mlp.w3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(ops.linear_swiglu(x, self.w12.weight, self.w12.bias))


def _is_swiglu_mlp(m: nn.Module) -> bool:
    # LightningDiT's SwiGLUFFN: Linear children w12 (packed [Wa; Wb]) and w3
    return isinstance(getattr(m, "w12", None), nn.Linear) and isinstance(getattr(m, "w3", None), nn.Linear)


def fuse_swiglu_mlps(model: nn.Module, device: torch.device | str) -> int:
    """Replace (in place) every SwiGLU MLP of `model` by a FusedSwiGLUFFN; returns how many were replaced (0 when the
    model has none). Raises kernels.BackendUnavailable, with the reason, when the Triton kernel cannot run on
    `device` (checked first, so a model is never left half-swapped)."""
    swaps = [(name, m) for name, m in model.named_modules() if _is_swiglu_mlp(m)]
    if not swaps:
        return 0
    ok, reason = triton_status(torch.empty(0, device=device))
    if not ok:
        raise kernels.BackendUnavailable(reason)
    for name, m in swaps:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, FusedSwiGLUFFN(m))
    return len(swaps)
