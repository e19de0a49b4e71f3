"""Activation memory of a LightningDiT training step: the bytes each block keeps for its backward, per token.

Counted, not estimated: one LightningDiT block of the size asked for is built and compiled as the DiT trainer
compiles it (`train.recompute` applied, then `block.compile(backend, fullgraph=True)`), run forward once under
bf16 autocast on a small batch, and every tensor the forward saves for the backward (autograd's pack hook sees
each one, compiled graphs included) is recorded once per storage. Those whose leading dimension is the batch (or
batch x tokens) scale with the batch: their bytes / (batch x tokens) is the block's activation memory per token.
Saved weight casts and RoPE tables are the same at any batch and are listed apart. Kept for the backward means
alive at the end of the forward, so per token x tokens per step x depth is the activation part of the peak.

The choice of partition (what inductor saves and what it recomputes) is the same on the CPU as on a GPU for the
same graph; the graph differs only by the kernels backend: the CPU runs the reference ops, or ours with
`--kernels triton`, or what the GPU's `auto` runs under compile with `--kernels gpu-auto` (our SwiGLU and qkv_rope,
the reference norms: kernels/compiled_choices.json), both under TRITON_INTERPRET=1. At XL/1 without recomputation:
46,215 bytes per token per block with the reference ops or all of ours, 41,607 with gpu-auto
(bench/results/2026-12-04_activation_memory.md).

    python -m bench.activation_memory                         # XL/1, batch 256: none vs swiglu
    python -m bench.activation_memory --measured-peak-gib 96.0 --measured-as none   # + the peak each would have

With a measured peak (torch.cuda.max_memory_allocated of a trainer run with `--measured-as` recomputation and the
kernels counted), each setting's predicted peak is that peak less the measured setting's activations plus its
own: the rest (weights, gradients, Adam state, EMA, workspace) does not depend on what the blocks keep.
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Optional

import torch

GiB = 2 ** 30


def _storage(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


@contextlib.contextmanager
def _kernels(name: str) -> Iterator[None]:
    """A kernels backend, or "gpu-auto": what `auto` runs on a GPU (ours through the Triton interpreter where
    kernels/compiled_choices.json keeps ours under compile, the reference elsewhere)."""
    from kernels import backend
    with backend.active("auto" if name == "gpu-auto" else name), \
            (backend.auto_as_on_gpu() if name == "gpu-auto" else contextlib.nullcontext()):
        yield


def saved_for_backward(size: str = "XL/1", input_size: int = 16, recompute: str = "none",
                       compile_backend: Optional[str] = "inductor", batch: Optional[int] = None,
                       kernels_backend: str = "auto",
                       fp8: str = "none", fp8_quant: str = "inline", device: str = "cpu",
                       **model_overrides) -> dict:
    """Run one block of a LightningDiT `size` forward (bf16 autocast, `batch` samples, the kernels backend
    `kernels_backend` (or "gpu-auto"), the trainer's `fp8.backend` scaled_mm (with `fp8.quant` fp8_quant) or
    torchao emulated on the CPU, or none) and record what it saves for the backward. Returns {"per_token": bytes
    per token, "fixed": bytes independent of the batch, "tensors": [{dtype, shape, bytes, per_token}], "tokens":
    tokens per sample, "depth": the size's depth, ...}."""
    import kernels
    from modeling.lightningdit import LightningDiT, LightningDiTConfig
    from train.recompute import apply_recompute

    cfg = LightningDiTConfig.from_size(size, input_size=input_size, **model_overrides)
    depth = cfg.depth
    torch.manual_seed(0)
    model = LightningDiT(LightningDiTConfig(**{**cfg.to_dict(), "depth": 1})).to(device)
    if fp8 != "none":  # as the trainer: FP8 modules first, then the recomputation, then compile
        from modeling import fp8 as fp8_lib
        fp8_lib.apply_fp8(model, fp8, None, allow_cpu=device == "cpu", quant=fp8_quant)
        fp8_lib.refresh_fp8_weights(model)  # the model's own forward does it; here the block is called alone
    apply_recompute(model, recompute, compiled=compile_backend is not None)
    block = model.blocks[0]
    if compile_backend:
        torch._dynamo.reset()  # a fresh compile per count: past dynamo's recompile limit a block would run eager
        block.compile(backend=compile_backend, fullgraph=True)
    n_tok = model.x_embedder.num_patches
    dims = {d for p in model.parameters() for d in p.shape}
    from kernels.fp8_quant import padded_rows
    if batch is None:  # the bytes per token do not depend on it: the smallest batch whose sizes no weight has
        batch = next(b for b in range(2, 1 << 20) if b not in dims and not {b * n_tok, padded_rows(b * n_tok)} & dims)
    token_dims = {batch * n_tok, padded_rows(batch * n_tok)}  # padded: FP8's x^T (K, tokens padded to 16)
    if batch < 2 or batch in dims or token_dims & dims:  # a weight's saved cast must not pass as an activation
        raise ValueError(f"batch {batch}: pick one >= 2 that is no parameter dimension ({sorted(dims)})")
    x = torch.randn(batch, n_tok, cfg.hidden_size, device=device, requires_grad=True)
    c = torch.randn(batch, cfg.hidden_size, device=device)
    saved: dict[tuple[int, int], torch.Tensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.setdefault(_storage(t), t)
        return t

    with _kernels(kernels_backend):  # one backend block for forward and backward: what ran stays on record
        # attention's kernel timed at this shape, as the trainer primes it before its compiled blocks run (unprimed,
        # the trace falls back to the split path where the trainer may run the fused one; a no-op on the CPU)
        kernels.prime_attention(model.attention_shape(batch), torch.bfloat16, device, training=True)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = block(x, c, model.feat_rope)
            ran = kernels.describe()["ops"]
        out.float().sum().backward()  # the backward runs (a partition that cannot is an error here, not later)
    params = {_storage(p)[0] for p in model.parameters()} | {_storage(b)[0] for b in model.buffers()}
    rows, tensors, per_token, fixed = batch * n_tok, [], 0, 0
    for key, t in saved.items():
        if key[0] in params:  # a parameter itself: no activation memory
            continue
        # batch-leading, token-leading, or (FP8's transposed operands, x^T kept for the wgrad) token-trailing
        scales = t.dim() > 0 and (t.shape[0] in (batch, rows) or t.shape[-1] in token_dims)
        tensors.append({"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "bytes": key[1],
                        "per_token": key[1] / rows if scales else None})
        if scales:
            per_token += key[1]
        else:
            fixed += key[1]
    tensors.sort(key=lambda r: -r["bytes"])
    return {"size": size, "input_size": input_size, "recompute": recompute, "compile_backend": compile_backend,
            "device": str(device),
            "fp8": fp8 if fp8 == "none" else f"{fp8} (quant {fp8_quant})",
            "tokens": n_tok, "depth": depth, "swiglu_hidden": model.blocks[0].mlp.w3.in_features,
            "hidden": cfg.hidden_size, "kernels_ran": ran, "per_token": per_token / rows, "fixed": fixed,
            "tensors": tensors}


def at_batch(count: dict, batch: int) -> float:
    """Bytes all blocks keep at `batch` samples: per token x tokens x batch x depth, plus the fixed part per block."""
    return (count["per_token"] * count["tokens"] * batch + count["fixed"]) * count["depth"]


def markdown(counts: list[dict], batch: int, measured_peak_gib: Optional[float] = None,
             measured_as: Optional[str] = None) -> str:
    first = counts[0]
    base = next((c for c in counts if c["recompute"] == measured_as), None) if measured_peak_gib else None
    head = ["train.recompute", "bytes / token / block", f"GiB at batch {batch} (x {first['depth']} blocks)",
            "fixed MiB (weight casts, tables)"]
    if base:
        head.append(f"predicted peak GiB (measured {measured_peak_gib:.1f} with {measured_as})")
    lines = [f"LightningDiT-{first['size']}, {first['tokens']} tokens, hidden {first['hidden']}, SwiGLU hidden "
             f"{first['swiglu_hidden']}; compile backend {first['compile_backend']}; bf16 autocast; "
             f"FP8 {first['fp8']}; kernels ran: {first['kernels_ran']}", "",
             "| " + " | ".join(head) + " |", "|" + " ---: |" * len(head)]
    for c in counts:
        row = [c["recompute"], f"{c['per_token']:,.0f}", f"{at_batch(c, batch) / GiB:.2f}",
               f"{c['fixed'] * c['depth'] / 2 ** 20:.1f}"]
        if base:
            row.append(f"{measured_peak_gib + (at_batch(c, batch) - at_batch(base, batch)) / GiB:.1f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict:
    from modeling.config import cli_parser
    p = cli_parser("bench.activation_memory", __doc__.split("\n\n")[0])
    p.add_argument("--size", default="XL/1", help="a LightningDiT size")
    p.add_argument("--input-size", type=int, default=16, help="latent side (16: 256 px through f16)")
    p.add_argument("--batch", type=int, default=256, help="samples per GPU step the GiB column is for")
    p.add_argument("--recompute", default="none,swiglu", help="comma-separated train.recompute settings")
    p.add_argument("--compile-backend", default="inductor", help="inductor (as the trainer), or none: eager")
    p.add_argument("--kernels", default="auto", choices=("auto", "reference", "triton", "cuda", "gpu-auto"),
                   help="kernels backend, or gpu-auto: auto's choices on a GPU (triton and gpu-auto need "
                        "TRITON_INTERPRET=1 on the CPU)")
    p.add_argument("--fp8", default="none", choices=("none", "scaled_mm", "torchao"), help="the trainer's fp8.backend")
    p.add_argument("--fp8-quant", default="inline", choices=("inline", "ours"),
                   help="the trainer's fp8.quant with --fp8 scaled_mm (ours: w3's input from our SwiGLU kernel)")
    p.add_argument("--measured-peak-gib", type=float, default=None, help="a trainer run's max_memory_allocated")
    p.add_argument("--measured-as", default="none", help="the train.recompute of that run")
    p.add_argument("--device", default="cpu", help="where the block runs: cpu, or cuda (the GPU's own kernels and "
                                                     "_scaled_mm: the FP8 count is only calibrated there)")
    p.add_argument("--json", default=None, help="also write the counts here")
    a = p.parse_args(argv)
    from train.recompute import MODES
    settings = a.recompute.split(",")
    bad = [s for s in settings if s not in MODES]
    if bad or a.batch < 1:
        p.error(f"--recompute takes {MODES} (got {bad}); --batch must be >= 1")
    if a.kernels in ("triton", "gpu-auto"):  # checked here: inside a compiled trace the refusal would be wrapped
        from kernels.backend import triton_status
        ok, reason = triton_status(torch.empty(0))
        if not ok:
            p.error(f"--kernels {a.kernels}: {reason}")
    backend = None if a.compile_backend == "none" else a.compile_backend
    counts = [saved_for_backward(a.size, a.input_size, s, backend, kernels_backend=a.kernels, fp8=a.fp8,
                                 fp8_quant=a.fp8_quant, device=a.device)
              for s in settings]
    print(markdown(counts, a.batch, a.measured_peak_gib, a.measured_as))
    result = {"batch": a.batch, "counts": counts, "measured_peak_gib": a.measured_peak_gib,
              "measured_as": a.measured_as}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    from modeling.config import user_errors
    with user_errors(extra=(ValueError,)):  # an unknown size or a backend that cannot run: one line, exit 2
        main()
