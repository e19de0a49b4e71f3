"""The fused ops bound to one backend name ("triton" or "cuda"); what `backend.resolve` hands to ops.py."""
from . import attention as _attention
from . import fused_norm, gated_residual as _gated_residual, rope, swiglu as _swiglu


class Fused:
    def __init__(self, backend: str):
        self.backend = backend

    def rms_norm(self, x, weight, eps):
        return fused_norm.rms_norm(x, weight, eps, backend=self.backend)

    def layer_norm(self, x, weight, bias, eps):
        return fused_norm.layer_norm(x, weight, bias, eps, backend=self.backend)

    def norm_modulate(self, x, weight, shift, scale, eps, kind):
        return fused_norm.norm_modulate(x, weight, shift, scale, eps, kind, backend=self.backend)

    def gated_residual_norm_modulate(self, x, gate, y, weight, shift, scale, eps, kind):
        return fused_norm.gated_residual_norm_modulate(x, gate, y, weight, shift, scale, eps, kind,
                                                       backend=self.backend)

    def gated_residual(self, x, gate, y):
        return _gated_residual.gated_residual(x, gate, y)

    def swiglu(self, x12):
        return _swiglu.swiglu(x12)

    def rope_qk(self, q, k, cos, sin):
        return rope.rope_qk(q, k, cos, sin)

    def attention(self, q, k, v):
        return _attention.attention(q, k, v)
