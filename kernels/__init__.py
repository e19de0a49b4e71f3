"""Fused ops for the models: `kernels.ops.<name>` for every op declared with `kernels.registry.register(Op(...))`.

Adding an op is one new module (its kernels, custom ops, and one `register(Op(...))`) plus its import line
below; docs/kernels.md has a worked example.
"""
from . import cuda_ext, ops, reference, registry
from .attention import prime_attention, set_attention
from .backend import BackendUnavailable, get_backend, set_backend
from .registry import Op, register, resolve, unregister
from .report import describe

# The op modules: importing one registers its ops (one line per op module).
from . import fused_norm  # noqa: E402,F401  rms_norm, layer_norm, norm_modulate, gated_residual_norm_modulate
from . import gated_residual  # noqa: E402,F401
from . import swiglu  # noqa: E402,F401
from . import rope  # noqa: E402,F401
from . import qkv_rope  # noqa: E402,F401
from . import attention  # noqa: E402,F401
from . import linear_swiglu  # noqa: E402,F401
from . import fp8_quant  # noqa: E402,F401  quantize_rows_fp8, swiglu_fp8
from . import group_norm  # noqa: E402,F401  group_norm_silu (the VA-VAE's GroupNorm + SiLU)
from . import upsample_conv  # noqa: E402,F401  the VA-VAE decoder's nearest 2x + 3x3 conv

# Try the optional extension now, not on the first op call: an import inside a torch.compile trace
# would be a graph break (fullgraph=True fails on it).
cuda_ext._load()

__all__ = ["ops", "reference", "registry", "Op", "register", "unregister", "resolve", "set_backend", "get_backend",
           "describe", "prime_attention", "set_attention", "BackendUnavailable"]
