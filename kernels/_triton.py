"""Shared helpers for the Triton kernels: availability, the interpreter switch, launch sizes."""
import os
from typing import Any, Callable

import torch

# FMA contraction in every Triton kernel (ours and inductor's), as Triton through 3.9 does by default: 3.9 warns
# that 3.10 turns it off by default, which would change our kernels' rounding and instruction counts (every number
# in bench/results was measured with it on). Pinned here unless the user sets it; Triton reads it at compile time.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without Triton: the triton backend reports itself unavailable
    triton = tl = None


def interpreting() -> bool:
    # Triton reads this when it is imported and when it decorates a kernel (its own tl functions included): set
    # TRITON_INTERPRET=1 before anything imports triton (kernels, or the models, which import kernels) on a CPU.
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# The approximate fp32 division (div.approx.f32: a MUFU reciprocal and a multiply, 2 ulp) written as PTX, so every
# Triton emits the same instruction: tl.fdiv(approx=True) is Triton 3.9's spelling, Triton 3.6 (the lent H200's) has
# no such argument and its plain fdiv is div.full.f32 (~8-10 more SASS instructions per element in the GroupNorm
# kernels). bench.sm90_check under both Tritons is what found it. The interpreter runs no PTX: numpy divides.
if tl is not None and interpreting():
    @triton.jit
    def approx_div(x, y):
        return tl.fdiv(x, y)
elif tl is not None:
    @triton.jit
    def approx_div(x, y):
        return tl.inline_asm_elementwise("div.approx.f32 $0, $1, $2;", "=r,r,r", [x, y], dtype=tl.float32,
                                         is_pure=True, pack=1)


def runs_on(x: torch.Tensor) -> bool:
    """Can the Triton kernels run on x's device (a GPU, or the CPU under TRITON_INTERPRET=1)?"""
    return triton is not None and (x.is_cuda or interpreting())


def block_size(n: int) -> int:
    return triton.next_power_of_2(n)


def row_split(C: int) -> tuple[int, int]:
    """(BLOCK_A, BLOCK_B): a row of C held as two power-of-two tiles, BLOCK_A the largest power of two below C (half
    of C where C is one) and BLOCK_B the next power of two at or above the rest: no masked lane for C = 2^a + 2^b
    (1152 = 1024 + 128, 3072 = 2048 + 1024, 72 = 64 + 8), where one next-power-of-two tile idles 44% / 25% / 44% of
    its lanes: row kernels that are short of issue slots (bench.sm90_check counts them) use it."""
    a = triton.next_power_of_2(C)
    a = a // 2 if a > 1 else 1
    return a, triton.next_power_of_2(max(C - a, 1))


def row_warps(block: int) -> int:
    # One program per row of `block` elements: 8 warps keep 16-byte loads per thread at hidden 1152-4096.
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


def rows_2d(t: torch.Tensor) -> torch.Tensor:
    """(..., C) -> (rows, C) with unit column stride, copying only when no such view exists."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def vec_rows(t: torch.Tensor) -> torch.Tensor:
    """A per-sample (B, C) vector (shift/scale/gate, often a strided chunk of the adaLN output)."""
    return t if t.stride(-1) == 1 else t.contiguous()


class TunedKernels:
    """A module's autotuned kernels (name -> triton.autotune object) and what they did in this process, for result
    records: per kernel and key, the config picked, and every candidate's time (ms, median) where this process tuned
    that key (taken from the autotuner when it tunes a new key; a later launch of the key neither re-tunes nor
    overwrites)."""

    def __init__(self, **tuned) -> None:
        self.tuned = tuned
        self.timings: dict[str, dict[str, dict[str, float]]] = {name: {} for name in tuned}

    def run(self, name: str, grid: tuple[int, ...] | Callable[[dict[str, Any]], tuple[int, ...]], args: tuple,
            const: dict) -> "triton.Config | None":
        """Launch `name` (tuning the key first where it is new); returns the config that ran (None where the
        autotuner object keeps no `best_config`)."""
        tuned = self.tuned[name]
        seen = len(tuned.cache)
        tuned[grid](*args, **const)
        if len(tuned.cache) != seen:
            key = next(reversed(tuned.cache))
            self.timings[name][str(key)] = {str(c): round(float(t[0] if isinstance(t, (list, tuple)) else t), 4)
                                            for c, t in (getattr(tuned, "configs_timings", None) or {}).items()}
        return getattr(tuned, "best_config", None)

    def report(self) -> dict[str, dict[str, dict]]:
        return {name: {str(key): {"picked": str(cfg), "ms": self.timings[name].get(str(key), {})}
                       for key, cfg in getattr(tuned, "cache", {}).items()}
                for name, tuned in self.tuned.items()}
