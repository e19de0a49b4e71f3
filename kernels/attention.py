"""Attention entry point: one call, the fastest available implementation for the device and head_dim.

Candidates on CUDA: FlashAttention-3 (`flash_attn_interface`, Hopper), FlashAttention-2 (`flash_attn`),
and torch SDPA with the cuDNN, flash or memory-efficient kernel; on the CPU, torch SDPA (its own CPU
flash or math kernel). The first eager call for a (device, head_dim, dtype, shape, grad mode) times every
candidate that runs (forward + backward with grad enabled, forward only under no_grad: sampling; CUDA events,
median of a few) and keeps the fastest; head_dim 72 is padded internally by some of them, which is why this
is measured rather than assumed. Nothing can be timed inside a torch.compile trace, so the trainer and the
sampler call `prime(shape, ...)` before their first compiled call; an unmeasured shape under compile gets
FlashAttention if installed and q is 16-bit, else plain SDPA ("sdpa": PyTorch picks its kernel per call, after
autocast's cast, FlashAttention first -- on an H200 at XL/1 shapes cuDNN was 20% faster, fwd+bwd). Force one with
VAVAE_ATTENTION=<name> or `set_attention(name)`; a forced choice that cannot run raises BackendUnavailable.
`kernels.describe()["ops"]["attention"]` says which one ran, `measurements()` what was timed.

The attention block's core, `rope_attention` (the qkv GEMM's output -> (qk-norm) -> RoPE -> attention -> the proj
Linear's input (B, N, H*D)), is chosen the same way between two paths: "split" (kernels.ops.qkv_rope, then the
attention chosen above: the path measured on 2026-12-04) and "rope-fused" (kernels/rope_attention.py: our Triton
FlashAttention with RoPE where q and k are loaded and the gradient written straight into d qkv; no qk-norm). `prime`
times both, forward + backward, at the run's shape after fixing the attention kernel; unmeasured (the CPU, a trace
nobody primed) it is "split". VAVAE_ATTENTION=rope-fused (or the trainer's `train.attention: rope-fused`) forces the
fused kernel; `describe()["ops"]["rope_attention"]` says which path ran.

Reference: `kernels.reference.attention` (SDPA, (B, H, N, D), no mask, scale 1/sqrt(D)) and
`kernels.reference.rope_attention`. Declared at the bottom as the ops "attention" and "rope_attention", whose fused
implementations (under the triton and cuda backends, as under auto on a GPU) are these choosers.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import backend, ops, reference
from .backend import BackendUnavailable, record
from .qkv_rope import v_of
from .rope_attention import rope_attention_triton
from .registry import BenchCase, BenchShape, Op, register

log = logging.getLogger("kernels")

_SDPA = {"sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-flash": SDPBackend.FLASH_ATTENTION,
         "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa-math": SDPBackend.MATH}
FUSED_BLOCK = "rope-fused"  # the attention block's core as one kernel each way (kernels/rope_attention.py)
CHOICES = ("fa3", "fa2", "sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "sdpa-math", "sdpa", FUSED_BLOCK)
_state = {"forced": os.environ.get("VAVAE_ATTENTION") or None}
_chosen = {}        # key -> choice
_block_chosen = {}  # key -> FUSED_BLOCK or "split"
_measured = {}      # key (the block's: ("rope_attention", *key)) -> {choice: ms or error string}


def set_attention(name: Optional[str]) -> None:
    """Force one implementation (a name from CHOICES), or None to measure and pick."""
    if name is not None and name not in CHOICES:
        raise ValueError(f"unknown attention implementation {name!r}; choose from {CHOICES}")
    _state["forced"] = name
    _chosen.clear()
    _block_chosen.clear()


def _forced_kernel() -> Optional[str]:
    """The forced attention kernel for q/k/v (FUSED_BLOCK forces the block's path, not a kernel: None)."""
    forced = _state["forced"]
    return None if forced == FUSED_BLOCK else forced


# Looked up once, at import: _candidates runs inside compiled blocks (an unprimed key: q/k in fp32 after a qk-norm
# under autocast), and torch 2.11's dynamo refuses to trace importlib's find_spec (fullgraph: the step fails).
_INSTALLED = {"fa3": importlib.util.find_spec("flash_attn_interface") is not None,
              "fa2": importlib.util.find_spec("flash_attn") is not None}


def installed() -> dict[str, bool]:
    return dict(_INSTALLED)


def measurements() -> dict[str, dict]:
    return {str(k): v for k, v in _measured.items()}


def _autocast_dtype(q):
    return torch.get_autocast_dtype(q.device.type) if torch.is_autocast_enabled(q.device.type) else None


def _run(choice, q, k, v):
    if choice == "sdpa":  # PyTorch's own choice among its fused kernels, per call
        return F.scaled_dot_product_attention(q, k, v)
    if choice in _SDPA:
        with sdpa_kernel(_SDPA[choice]):
            return F.scaled_dot_product_attention(q, k, v)
    if choice == "fa3":
        from flash_attn_interface import flash_attn_func
    else:
        from flash_attn import flash_attn_func
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, N, H, D) layout
    out = out[0] if isinstance(out, tuple) else out
    return out.transpose(1, 2)


def _candidates(q):
    have = installed()
    flash_dtypes = (torch.float16, torch.bfloat16)
    out = [c for c in ("fa3", "fa2") if have[c] and q.dtype in flash_dtypes]
    return out + ["sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "sdpa-math"]


def _time_ms(choice, q, k, v, training, reps=5):
    if not training:
        with torch.no_grad():
            return _time_fwd_ms(choice, q, k, v, reps)
    with torch.enable_grad():
        return _time_fwd_bwd_ms(choice, q, k, v, reps)


def _time_fwd_ms(choice, q, k, v, reps):
    return _median_ms(lambda: _run(choice, q, k, v), reps)


def _time_fwd_bwd_ms(choice, q, k, v, reps):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    grad = torch.randn_like(q)
    return _median_ms(lambda: _run(choice, q, k, v).backward(grad), reps)


def _median_ms(fn, reps):
    times = []
    for i in range(reps + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        if i >= 2:  # the first runs pay for kernel selection and workspace allocation
            times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _key(q):
    return (str(q.device), q.shape[-1], q.dtype, tuple(q.shape), "train" if torch.is_grad_enabled() else "infer")


def _choose(q, k, v):
    key = _key(q)
    if key in _chosen:
        return _chosen[key]
    if torch.compiler.is_compiling():
        # Not primed, and no timing inside a trace. The dtype seen here may not be the one attention runs in
        # (fp32 q/k from a caller's own RoPE under autocast, which SDPA casts to bf16 itself); a static choice
        # made from it once pinned the slow memory-efficient kernel (H200, XL/1 batch 256: attention 104 ms/step
        # against 47). So: FlashAttention when installed and q is already 16-bit, else SDPA with PyTorch's own
        # per-call kernel selection, which sees the cast inputs.
        have = _candidates(q)
        return have[0] if have[0] in ("fa3", "fa2") else "sdpa"
    results = {}
    for c in _candidates(q):
        try:
            results[c] = _time_ms(c, q, k, v, training=key[-1] == "train")
        except Exception as e:  # a candidate that cannot run this shape/dtype (e.g. head_dim unsupported)
            results[c] = f"unavailable: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    timed = {c: t for c, t in results.items() if isinstance(t, float)}
    _measured[key] = results
    if not timed:
        raise BackendUnavailable(f"no attention implementation runs for {key}: {results}")
    _chosen[key] = min(timed, key=timed.get)
    return _chosen[key]


def prime(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str, training: bool,
          agree: Optional[Callable[[str], str]] = None) -> Optional[str]:
    """Measure and fix the choice for q/k/v of `shape` (B, H, N, D) and `dtype` in the given grad mode, outside
    any trace, so that a torch.compile trace of the same call uses it. agree: choice -> the choice to keep (e.g.
    rank 0's, so that every rank of a data-parallel run runs the same kernel). Returns the choice, or None where
    there is nothing to choose (CPU, or a forced implementation)."""
    if torch.device(device).type != "cuda":
        return None
    B, H, N, D = shape
    choice = _forced_kernel()
    if choice is None:
        # token-major memory ((B, N, H, D) contiguous), as kernels.ops.qkv_rope gives q/k (and v in training; in
        # inference v is a view of the qkv output): the layout the model's attention really runs on is the one timed
        q, k, v = (torch.randn((B, N, H, D), dtype=dtype, device=device).transpose(1, 2) for _ in range(3))
        if not training:
            v = v_of(torch.randn((B, N, 3 * H * D), dtype=dtype, device=device), H)
        with torch.set_grad_enabled(training):
            choice = _choose(q, k, v)
            if agree is not None:
                choice = _chosen[_key(q)] = agree(choice)
    if _state["forced"] is None and D % 2 == 0:  # then the block's path, with that kernel in its split side
        qkv = torch.randn((B, N, 3 * H * D), dtype=dtype, device=device)
        with torch.set_grad_enabled(training):
            block = _choose_block(qkv, H)
            if agree is not None:  # agree speaks CHOICES: "split" travels as the kernel its split side runs
                block = agree(FUSED_BLOCK if block == FUSED_BLOCK else choice)
                _block_chosen[_block_key(qkv, H)] = FUSED_BLOCK if block == FUSED_BLOCK else "split"
    return choice


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Attention by the measured (or forced) implementation; records which one ran."""
    forced = _forced_kernel()
    if not q.is_cuda:
        if forced not in (None, "sdpa-math"):
            raise BackendUnavailable(f"attention {forced!r} needs a CUDA tensor; on the CPU only sdpa-math runs")
        choice = forced or "sdpa-cpu"
        record("attention", choice)
        return F.scaled_dot_product_attention(q, k, v) if choice == "sdpa-cpu" else _run(choice, q, k, v)
    if forced in ("fa3", "fa2") and not installed()[forced]:
        raise BackendUnavailable(f"attention {forced!r} requested but its package is not installed "
                                 f"({'flash_attn_interface' if forced == 'fa3' else 'flash_attn'})")
    if not torch.compiler.is_compiling():  # (a trace cannot query autocast; SDPA casts there itself)
        dtype = _autocast_dtype(q)
        if dtype is not None and q.dtype != dtype:
            # what SDPA's autocast would do, done first: the choice is timed and made on the 16-bit inputs
            # attention really runs on
            q, k, v = (t.to(dtype) for t in (q, k, v))
    choice = forced or _choose(q, k, v)
    record("attention", choice)
    return _run(choice, q, k, v)


def _block_key(qkv: Tensor, num_heads: int) -> tuple:
    B, N, C3 = qkv.shape
    return ("rope_attention", str(qkv.device), qkv.dtype, (B, num_heads, N, C3 // (3 * num_heads)),
            "train" if torch.is_grad_enabled() else "infer")


def _split(qkv: Tensor, cos: Tensor, sin: Tensor, num_heads: int, q_weight: Optional[Tensor] = None,
           k_weight: Optional[Tensor] = None, eps: float = 1e-6, bias: Optional[Tensor] = None) -> Tensor:
    q, k, v = ops.qkv_rope(qkv, cos, sin, num_heads, q_weight, k_weight, eps, bias)
    B, N, _ = qkv.shape
    return attention(q, k, v).transpose(1, 2).reshape(B, N, -1)  # a view: attention's output is token-major


def _time_block(fn: Callable[..., Tensor], qkv: Tensor, num_heads: int, reps: int = 5) -> float:
    N, D = qkv.shape[1], qkv.shape[2] // (3 * num_heads)
    angle = torch.rand(N, D // 2, device=qkv.device).repeat_interleave(2, dim=-1)
    cos, sin = angle.cos(), angle.sin()
    if not torch.is_grad_enabled():  # inference: the model's qkv Linear adds its own bias (linear_leaving_bias)
        return _median_ms(lambda: fn(qkv, cos, sin, num_heads), reps)
    bias = torch.zeros(qkv.shape[2], device=qkv.device)  # the qkv Linear's (fp32), handed on as the model does
    qkv, bias = qkv.detach().requires_grad_(), bias.requires_grad_()
    grad = torch.randn(qkv.shape[0], N, qkv.shape[2] // 3, dtype=qkv.dtype, device=qkv.device)
    return _median_ms(lambda: fn(qkv, cos, sin, num_heads, bias=bias).backward(grad), reps)


def _choose_block(qkv: Tensor, num_heads: int) -> str:
    """FUSED_BLOCK or "split" for the attention block at qkv's shape: measured once per key on a GPU, outside a
    trace (the split side runs the attention kernel chosen for its q/k/v); "split" where nothing was measured."""
    key = _block_key(qkv, num_heads)
    if key in _block_chosen:
        return _block_chosen[key]
    if torch.compiler.is_compiling() or not qkv.is_cuda:
        return "split"
    results = {}
    for name, fn in (("split", _split), (FUSED_BLOCK, rope_attention_triton)):
        try:
            results[name] = _time_block(fn, qkv, num_heads)
        except Exception as e:  # e.g. Triton cannot compile the fused kernel here
            results[name] = f"unavailable: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    _measured[key] = results
    timed = {c: t for c, t in results.items() if isinstance(t, float)}
    _block_chosen[key] = min(timed, key=timed.get) if timed else "split"
    return _block_chosen[key]


def rope_attention(qkv: Tensor, cos: Tensor, sin: Tensor, num_heads: int, q_weight: Optional[Tensor] = None,
                   k_weight: Optional[Tensor] = None, eps: float = 1e-6, bias: Optional[Tensor] = None) -> Tensor:
    """The attention block's core by the measured (or forced) path; records which one ran. bias: the qkv Linear's,
    where the model ran it without (both paths add it where they read qkv and sum its gradient in their backward)."""
    fusable = q_weight is None and backend.triton_status(qkv)[0]
    if _state["forced"] == FUSED_BLOCK:
        if not fusable:
            why = ("qk-norm is not fused (use the split path)" if q_weight is not None
                   else backend.triton_status(qkv)[1])
            raise BackendUnavailable(f"attention {FUSED_BLOCK!r} requested: {why}")
        path = FUSED_BLOCK
    elif _state["forced"] is not None or not fusable:
        path = "split"
    else:
        if not torch.compiler.is_compiling():
            dtype = _autocast_dtype(qkv)
            if dtype is not None and qkv.dtype != dtype:
                qkv = qkv.to(dtype)  # what the qkv Linear gives under autocast: the key the trainer primed
        path = _choose_block(qkv, num_heads)
    if path == FUSED_BLOCK:
        record("rope_attention", f"{FUSED_BLOCK} (triton)")
        return rope_attention_triton(qkv, cos, sin, num_heads, bias)
    record("rope_attention", "split: qkv_rope + attention")
    return _split(qkv, cos, sin, num_heads, q_weight, k_weight, eps, bias)


def prime_attention(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str, training: bool,
                    agree: Optional[Callable[[str], str]] = None) -> Optional[str]:
    """Time the attention candidates for q/k/v of `shape` (B, H, N, D) and `dtype` now, outside any trace, so that
    torch.compile'd callers use the measured choice (agree: see `prime`). Returns the choice, or None where the
    active kernels backend has none to make (the reference is plain SDPA; the CPU has one kernel)."""
    name = backend.get_backend()
    if torch.device(device).type != "cuda" or name == "reference" or (
            name == "auto" and not backend.triton_status()[0]):
        return None
    choice = prime(shape, dtype, device, training, agree)
    if choice is not None:
        where = str(torch.empty(0, device=device).device)  # "cuda:0" where the caller said "cuda": the tensors' key
        block = FUSED_BLOCK + " (forced)" if _state["forced"] == FUSED_BLOCK else _block_chosen.get(
            ("rope_attention", where, dtype, tuple(shape), "train" if training else "infer"), "split")
        log.info("attention for %s %s (%s): %s, block %s; timed %s", tuple(shape), str(dtype).replace("torch.", ""),
                 "training" if training else "inference", choice, block, measurements())
    return choice


def _bench(s: BenchShape, device: str, dtype: torch.dtype) -> BenchCase:
    # XL/1's attention: 16 heads of 72 over 256 tokens, at batch 32 (a data-parallel rank's share of 256)
    B = 32 if not s.smoke else s.B
    q, k, v = (torch.randn(B, s.H, s.N, s.D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    flops = 4 * B * s.H * s.N * s.N * s.D  # forward: two matmuls; the backward is 2.5x
    return BenchCase([q, k, v], lambda f, q, k, v: f(q, k, v), 4 * q.numel() * dtype.itemsize,
                     7 * q.numel() * dtype.itemsize, fwd_flops=flops, bwd_flops=int(2.5 * flops),
                     shape={"B": B, "H": s.H, "N": s.N, "D": s.D})


def _bench_block(s: BenchShape, device: str, dtype: torch.dtype) -> BenchCase:
    # XL/1's attention block core at batch 32 (as "attention"): qkv in, (B, N, H*D) out; the fewest bytes are qkv
    # and the output (forward), and dout, qkv, out, d qkv (backward)
    B = 32 if not s.smoke else s.B
    qkv = torch.randn(B, s.N, 3 * s.H * s.D, device=device, dtype=dtype, requires_grad=True)
    bias = torch.randn(3 * s.H * s.D, device=device, requires_grad=True)  # the qkv Linear's, as the model hands it
    angle = torch.rand(s.N, s.D // 2, device=device).repeat_interleave(2, dim=-1)
    cos, sin = angle.cos(), angle.sin()
    one = B * s.N * s.H * s.D * dtype.itemsize
    flops = 4 * B * s.H * s.N * s.N * s.D
    return BenchCase([qkv, bias], lambda f, t, b: f(t, cos, sin, s.H, None, None, 1e-6, b), 4 * one, 8 * one,
                     fwd_flops=flops, bwd_flops=int(2.5 * flops), shape={"B": B, "H": s.H, "N": s.N, "D": s.D})


# The chooser is the fused implementation under every fused backend (it picks among FA3/FA2/SDPA kernels itself and
# records that choice, hence records_itself); the reference is plain SDPA.
register(Op(name="attention", reference=reference.attention, impls={"triton": attention, "cuda": attention},
            bench=_bench, records_itself=True,
            doc="attention (B, H, N, D), no mask: FA3 / FA2 / SDPA cuDNN, flash, efficient, math, measured per "
                "(device, head_dim, dtype, shape, training or inference)"))
register(Op(name="rope_attention", reference=reference.rope_attention, impls={"triton": rope_attention,
                                                                              "cuda": rope_attention},
            bench=_bench_block, records_itself=True,
            doc="qkv GEMM output (B, N, 3HD) -> (qk RMSNorm) -> RoPE -> attention -> (B, N, HD): the split path "
                "(qkv_rope + attention) or one Triton kernel each way (rope-fused), measured per shape"))
