"""The ops the models call. Each op calls the function that kernels.backend resolves for its input.

Signatures here are the contract: every backend implements the same function.
"""
from . import reference
from .backend import resolve


def rms_norm(x, weight, eps: float = 1e-6):
    return resolve("rms_norm", x)(x, weight, eps)


def layer_norm(x, weight=None, bias=None, eps: float = 1e-6):
    return resolve("layer_norm", x)(x, weight, bias, eps)


def norm_modulate(x, weight, shift, scale, eps: float = 1e-6, kind: str = "rms"):
    return resolve("norm_modulate", x)(x, weight, shift, scale, eps, kind)


def gated_residual(x, gate, y):
    return resolve("gated_residual", x)(x, gate, y)


def gated_residual_norm_modulate(x, gate, y, weight, shift, scale, eps: float = 1e-6, kind: str = "rms"):
    return resolve("gated_residual_norm_modulate", x)(x, gate, y, weight, shift, scale, eps, kind)


def swiglu(x12):
    return resolve("swiglu", x12)(x12)


def rope_qk(q, k, cos, sin):
    return resolve("rope_qk", q)(q, k, cos, sin)


def attention(q, k, v):
    return resolve("attention", q)(q, k, v)


modulate = reference.modulate  # plain broadcast arithmetic; compile fuses it
