"""`kernels.describe()`: what the kernels did in this process, for result records and logs."""
from __future__ import annotations

from . import attention, backend, cuda_ext, qkv_rope, registry, rope_attention, swiglu
from ._triton import triton


def describe() -> dict:
    """{'requested': the backend asked for, 'ops': {op: what actually ran last}, 'registered': the declared ops,
    'cuda_ext': 'built' or why not, 'triton': its version, 'attention_installed', 'attention_measured': the
    timings behind attention's choice, 'rope_attention_autotuned': the fused RoPE attention's configs the
    autotuners picked (its variants), 'qkv_rope_autotuned': the same for qkv_rope (per-head tiles or the row
    variant), 'swiglu_autotuned': the SwiGLU backward's tile (rows per program), 'compiled_choices': the measurement kernels/compiled_choices.json came from
    (what `auto` runs under torch.compile)}."""
    return {"requested": backend.get_backend(), "ops": backend.ran(),
            "registered": sorted(registry.registered()),
            "cuda_ext": cuda_ext.status()[1] or "built",
            "triton": triton.__version__ if triton is not None else "not installed",
            "attention_installed": {k: ("installed" if v else "not installed")
                                    for k, v in attention.installed().items()},
            "attention_measured": attention.measurements(),
            "rope_attention_autotuned": rope_attention.autotuned(),
            "qkv_rope_autotuned": qkv_rope.autotuned(),
            "swiglu_autotuned": swiglu.autotuned(),
            "compiled_choices": _measured_on()}


def _measured_on() -> dict:
    """Where kernels/compiled_choices.json's measurements come from: the result file, its card and commit."""
    m = registry.compiled_choices()["measured_on"]
    env = m.get("environment") or {}
    return {"results": m.get("results"), "card": env.get("card") or env.get("device"), "commit": env.get("commit")}
