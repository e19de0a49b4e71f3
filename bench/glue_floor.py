"""The floor of the glue: the fewest bytes each memory-bound op of one LightningDiT training step must read and
write, forward and backward, and how long that takes at a copy bandwidth.

Analytic: no GPU, no timing. Every op is a list of `Move`s -- one tensor read or written once, at the size and
dtype the step has it in -- so the table says where each byte comes from. The dtypes are those bf16 autocast
leaves (issue 18): the residual stream in fp32 (the patch embedding and pos_embed are fp32, and x + gate * y
promotes), every GEMM operand and output in bf16, adaLN vectors bf16, norm weights and RoPE tables fp32.

What counts as the floor of an op (and is assumed of a fused kernel):
- each input read once and each output written once, nothing re-read within the op;
- a norm's output that only feeds a GEMM is written in the GEMM's dtype (bf16; the reference computes it in
  fp32 and autocast casts it: a fused kernel writes the bf16 copy directly), and its gradient arrives in bf16
  from the GEMM's dgrad;
- the backward recomputes the normalised rows from the saved input and the per-row statistic (rstd, fp32);
- a residual input's gradient from its other use is added inside the backward kernel (read once), not by a
  separate accumulation pass; a gated residual's identity path moves no bytes (its gradient is the same tensor);
- q/k/v come out of the qkv GEMM's output in one pass and their gradients go back in one (kernels.ops.qkv_rope),
  and attention's output is token-major, so the reshape before the proj Linear moves nothing.
What it leaves out: the GEMMs and attention themselves (compute-bound), the optimizer, the EMA, and the few-MB
ops on (B, C) vectors (the adaLN SiLU, the timestep/label embedders).

`python -m bench.glue_floor [--copy-gbps MEASURED]` prints the table for LightningDiT-XL/1 at batch 256;
docs/kernels.md and bench/results/2026-12-03_glue_floor.md hold it. tests/test_bench_glue_floor.py checks the
arithmetic on a tiny model by recording the real tensors its reference ops read and write under autocast.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

CARD_COPY_GBPS = 4200.0  # the H200's device-to-device copy, read + write (bench/results/2026-11-26_h200_trainer.md)
MEASURED_GLUE_MS = {"inductor fusions (norms, modulate, residuals, loss)": 73.6,
                    "ours (SwiGLU, qkv_rope)": 42.1, "other (copies, eager elementwise, reductions)": 19.7}
# the profile of the 461.5 ms XL/1 batch-256 step, H200, commit 7b1da33 (bench/results/2026-12-04_h200.md): 135.4 ms
# of glue, before the norms' out_dtype and the deferred MLP residual


@dataclasses.dataclass(frozen=True)
class StepShape:
    """One training step's sizes: B samples of N tokens, hidden C, H heads of D, SwiGLU hidden F, `depth` blocks;
    patch_in / patch_out: latent values per token into the patch embedding / out of the final layer."""
    B: int
    N: int
    C: int
    H: int
    D: int
    F: int
    depth: int
    patch_in: int
    patch_out: int
    act_bytes: int = 2   # bf16: GEMM operands and outputs, adaLN vectors, attention's inputs
    res_bytes: int = 4   # fp32: the residual stream

    @property
    def M(self) -> int:  # token rows
        return self.B * self.N

    def linear_params(self) -> int:
        """Weights and biases of the Linear/conv layers autocast casts to bf16 every step."""
        C, F = self.C, self.F
        block = (C * 3 * C + 3 * C) + (C * C + C) + (C * 2 * F + 2 * F) + (F * C + C) + (C * 6 * C + 6 * C)
        embed = (self.patch_in * C + C) + (256 * C + C) + (C * C + C)  # patch conv, timestep MLP
        final = (C * self.patch_out + self.patch_out) + (C * 2 * C + 2 * C)
        return self.depth * block + embed + final


# LightningDiT-XL/1 on 16x16x32 latents (256 px through the f16d32 tokenizer), batch 256
XL1_B256 = StepShape(B=256, N=256, C=1152, H=16, D=72, F=3072, depth=28, patch_in=32, patch_out=32)


@dataclasses.dataclass(frozen=True)
class Move:
    """One tensor read or written once. tensor: its name in the op's reference (an argument or output name;
    "d_<name>" its gradient). rule: "" the tensor as the reference has it; "gemm_dtype" written/read in the GEMM's
    dtype (act) where the reference holds it in fp32; "stat" the fused kernel's saved per-row statistic (no tensor of
    the reference); "accumulate" the gradient of the same input from its other use, added in the kernel."""
    tensor: str
    phase: str     # "fwd" | "bwd"
    write: bool
    elements: int
    itemsize: int
    rule: str = ""

    @property
    def bytes(self) -> int:
        return self.elements * self.itemsize


@dataclasses.dataclass(frozen=True)
class GlueOp:
    """One glue op of the step: `count` calls per step, each moving `moves`. kernels_op: the kernels.ops name whose
    calls it describes ("" for ops outside kernels.ops, whose rows are analytic only)."""
    name: str
    kernels_op: str
    count: int
    moves: tuple[Move, ...]
    note: str = ""

    def bytes(self, phase: Optional[str] = None) -> int:
        """Bytes of one call (fwd, bwd, or both)."""
        return sum(m.bytes for m in self.moves if phase in (None, m.phase))

    def step_bytes(self) -> int:
        return self.count * self.bytes()


def _norm_modulate(s: StepShape, accumulate: bool) -> tuple[Move, ...]:
    M, C, B, a, r = s.M, s.C, s.B, s.act_bytes, s.res_bytes
    fwd = (Move("x", "fwd", False, M * C, r), Move("weight", "fwd", False, C, 4),
           Move("shift", "fwd", False, B * C, a), Move("scale", "fwd", False, B * C, a),
           Move("out", "fwd", True, M * C, a, "gemm_dtype"), Move("rstd", "fwd", True, M, 4, "stat"))
    bwd = (Move("d_out", "bwd", False, M * C, a, "gemm_dtype"), Move("x", "bwd", False, M * C, r),
           Move("rstd", "bwd", False, M, 4, "stat"), Move("weight", "bwd", False, C, 4),
           Move("scale", "bwd", False, B * C, a))
    bwd += (Move("d_x", "bwd", False, M * C, r, "accumulate"),) if accumulate else ()
    bwd += (Move("d_x", "bwd", True, M * C, r), Move("d_weight", "bwd", True, C, 4),
            Move("d_shift", "bwd", True, B * C, a), Move("d_scale", "bwd", True, B * C, a))
    return fwd + bwd


def _gated_residual_norm_modulate(s: StepShape, later_use: bool = True) -> tuple[Move, ...]:
    # later_use: h is read again (the next residual), so its gradient d_h comes back and is added in the kernel;
    # the final layer's h is not (it is written -- the op returns it -- but no gradient comes back)
    M, C, B, a, r = s.M, s.C, s.B, s.act_bytes, s.res_bytes
    vec = lambda name, phase, write=False: Move(name, phase, write, B * C, a)  # noqa: E731
    fwd = (Move("x", "fwd", False, M * C, r), vec("gate", "fwd"), Move("y", "fwd", False, M * C, a),
           Move("weight", "fwd", False, C, 4), vec("shift", "fwd"), vec("scale", "fwd"),
           Move("h", "fwd", True, M * C, r), Move("out", "fwd", True, M * C, a, "gemm_dtype"),
           Move("rstd", "fwd", True, M, 4, "stat"))
    bwd = (Move("d_out", "bwd", False, M * C, a, "gemm_dtype"),)
    bwd += (Move("d_h", "bwd", False, M * C, r),) if later_use else ()
    bwd += (Move("h", "bwd", False, M * C, r), Move("rstd", "bwd", False, M, 4, "stat"),
           Move("weight", "bwd", False, C, 4), vec("scale", "bwd"), vec("gate", "bwd"),
           Move("y", "bwd", False, M * C, a),
           Move("d_x", "bwd", True, M * C, r), Move("d_y", "bwd", True, M * C, a), vec("d_gate", "bwd", True),
           Move("d_weight", "bwd", True, C, 4), vec("d_shift", "bwd", True), vec("d_scale", "bwd", True))
    return fwd + bwd


def _qkv_rope(s: StepShape) -> tuple[Move, ...]:
    M, C, N, D, a = s.M, s.C, s.N, s.D, s.act_bytes
    tables = lambda phase: (Move("cos", phase, False, N * D, 4), Move("sin", phase, False, N * D, 4))  # noqa: E731
    # the qkv Linear's bias (the fp32 parameter) added here and its gradient summed here (as w12's in the SwiGLU)
    bias = lambda phase: (Move("bias", phase, False, 3 * C, 4),)  # noqa: E731
    return ((Move("qkv", "fwd", False, M * 3 * C, a),) + tables("fwd") + bias("fwd")
            + tuple(Move(t, "fwd", True, M * C, a) for t in ("q", "k", "v"))
            + tuple(Move(f"d_{t}", "bwd", False, M * C, a) for t in ("q", "k", "v")) + tables("bwd") + bias("bwd")
            + (Move("d_qkv", "bwd", True, M * 3 * C, a), Move("d_bias", "bwd", True, 3 * C, 4)))


def _swiglu(s: StepShape) -> tuple[Move, ...]:
    M, F, a = s.M, s.F, s.act_bytes
    # w12's bias (the fp32 parameter) is added here and its gradient summed here (kernels/swiglu.py): the Linear's
    # own bias-gradient pass over d_x12 is not a floor
    return (Move("x12", "fwd", False, M * 2 * F, a), Move("bias", "fwd", False, 2 * F, 4),
            Move("out", "fwd", True, M * F, a), Move("d_out", "bwd", False, M * F, a),
            Move("x12", "bwd", False, M * 2 * F, a), Move("bias", "bwd", False, 2 * F, 4),
            Move("d_x12", "bwd", True, M * 2 * F, a), Move("d_bias", "bwd", True, 2 * F, 4))


def glue_ops(s: StepShape = XL1_B256) -> list[GlueOp]:
    """Every glue op of one training step (forward + backward), in the order the step runs them."""
    M, C, N, a, r = s.M, s.C, s.N, s.act_bytes, s.res_bytes
    lat_in, lat_out = M * s.patch_in, M * s.patch_out
    P = s.linear_params()
    d = s.depth
    return [
        GlueOp("patch embed + pos_embed", "", 1, (
            Move("conv_out", "fwd", False, M * C, a), Move("pos_embed", "fwd", False, N * C, 4),
            Move("x", "fwd", True, M * C, r), Move("d_x", "bwd", False, M * C, r),
            Move("d_conv_out", "bwd", True, M * C, a)), "analytic only"),
        GlueOp("norm1 + modulate (first block)", "norm_modulate", 1, _norm_modulate(s, accumulate=True),
               "bwd adds x's gradient from the attention residual"),
        GlueOp("gated residual (previous block's mlp) + norm1 + modulate", "gated_residual_norm_modulate", d - 1,
               _gated_residual_norm_modulate(s), "the mlp's residual added in the next block's first norm"),
        GlueOp("qkv layout + RoPE", "qkv_rope", d, _qkv_rope(s),
               "0 with RoPE inside the attention kernel"),
        GlueOp("attention output -> proj layout", "", d, (), "a view: attention's output is token-major"),
        GlueOp("gated residual (attn) + norm2 + modulate", "gated_residual_norm_modulate", d,
               _gated_residual_norm_modulate(s)),
        GlueOp("SwiGLU", "swiglu", d, _swiglu(s), "half of it inside the GEMMs' epilogues (below)"),
        GlueOp("gated residual (last block's mlp) + final norm + modulate", "gated_residual_norm_modulate", 1,
               _gated_residual_norm_modulate(s, later_use=False)),
        GlueOp("flow path + loss (xt, ut, mse + cosine)", "", 1, (
            Move("x0", "fwd", False, lat_in, 4), Move("x1", "fwd", False, lat_in, 4),
            Move("xt", "fwd", True, lat_in, a, "gemm_dtype"), Move("pred", "fwd", False, lat_out, a),
            Move("x0", "fwd", False, lat_out, 4), Move("x1", "fwd", False, lat_out, 4),
            Move("pred", "bwd", False, lat_out, a), Move("x0", "bwd", False, lat_out, 4),
            Move("x1", "bwd", False, lat_out, 4), Move("d_pred", "bwd", True, lat_out, a)), "analytic only"),
        GlueOp("autocast weight casts (fp32 <-> bf16)", "", 1, (
            Move("weights", "fwd", False, P, 4), Move("weights_bf16", "fwd", True, P, a),
            Move("d_weights_bf16", "bwd", False, P, a), Move("d_weights", "bwd", True, P, 4)),
            "analytic only; 0 with bf16 weights or casts fused into the optimizer"),
    ]


def sampler_glue_ops(s: StepShape, fp8: bool = False, proj_fp8: bool = True) -> list[GlueOp]:
    """The glue of one forward of the sampler's model (s.B sample-forwards): its bf16 copy (bf16-weights and fp8:
    every activation, the residual stream and the adaLN vectors in bf16), no backward, the Linears' biases in their
    GEMMs. fp8: the norms write qkv's and w12's input as e4m3 rows and a scale (kernels.ops.norm_modulate_fp8), the
    SwiGLU writes w3's (swiglu_fp8), and attention's output is quantized for proj (unless proj_fp8 is False: proj in
    bf16). Left out: the GEMMs, attention, the (B, C) adaLN and embedder ops, the final Linear and the ODE update
    (latents: ~1% of a forward's bytes)."""
    s = dataclasses.replace(s, res_bytes=s.act_bytes)  # the bf16 model's residual stream
    M, C, N, B, F, a, d = s.M, s.C, s.N, s.B, s.F, s.act_bytes, s.depth
    vec = lambda name: Move(name, "fwd", False, B * C, a)  # noqa: E731
    gemm_in = lambda name, K: ((Move(name, "fwd", True, M * K, 1), Move(f"{name}_scale", "fwd", True, M, 4))  # noqa
                               if fp8 else (Move(name, "fwd", True, M * K, a),))
    norm = lambda res: ((Move("x", "fwd", False, M * C, a), Move("weight", "fwd", False, C, a), vec("shift"),  # noqa
                         vec("scale")) + ((vec("gate"), Move("y", "fwd", False, M * C, a),
                                           Move("h", "fwd", True, M * C, a)) if res else ()) + gemm_in("out", C))
    ops = [
        GlueOp("patch embed + pos_embed", "", 1, (Move("conv_out", "fwd", False, M * C, a),
                                                   Move("pos_embed", "fwd", False, N * C, a),
                                                   Move("x", "fwd", True, M * C, a)), "analytic only"),
        GlueOp("norm1 + modulate (first block)", "norm_modulate_fp8" if fp8 else "norm_modulate", 1, norm(False)),
        GlueOp("gated residual (previous block's mlp) + norm1 + modulate",
               "gated_residual_norm_modulate_fp8" if fp8 else "gated_residual_norm_modulate", d - 1, norm(True)),
        GlueOp("q/k RoPE (v read where the qkv GEMM wrote it)", "qkv_rope", d, (
            Move("qk", "fwd", False, M * 2 * C, a), Move("cos", "fwd", False, N * s.D, 4),
            Move("sin", "fwd", False, N * s.D, 4), Move("q", "fwd", True, M * C, a), Move("k", "fwd", True, M * C, a)),
            "0 with RoPE inside the attention kernel"),
    ]
    if fp8 and proj_fp8:
        ops.append(GlueOp("attention output -> proj's e4m3 rows", "quantize_rows_fp8", d,
                          (Move("attn_out", "fwd", False, M * C, a),) + gemm_in("proj_in", C)))
    ops += [
        GlueOp("gated residual (attn) + norm2 + modulate",
               "gated_residual_norm_modulate_fp8" if fp8 else "gated_residual_norm_modulate", d, norm(True)),
        GlueOp("SwiGLU", "swiglu_fp8" if fp8 else "swiglu", d,
               (Move("x12", "fwd", False, M * 2 * F, a),) + gemm_in("out", F)),
        GlueOp("gated residual (last block's mlp) + final norm + modulate", "gated_residual_norm_modulate", 1,
               (Move("x", "fwd", False, M * C, a), vec("gate"), Move("y", "fwd", False, M * C, a),
                Move("weight", "fwd", False, C, a), vec("shift"), vec("scale"), Move("out", "fwd", True, M * C, a)),
               "h is not used after it: not a floor"),
    ]
    return ops


def floor_table(s: StepShape = XL1_B256, copy_gbps: float = CARD_COPY_GBPS,
                measured_copy_gbps: Optional[float] = None) -> list[dict]:
    """One row per glue op: bytes of one call (fwd, bwd), calls per step, GB per step, and the ms per step at
    `copy_gbps` (and at `measured_copy_gbps` where given); the last row is the total."""
    rows = []
    for op in glue_ops(s):
        row = {"op": op.name, "kernels_op": op.kernels_op, "calls": op.count, "fwd_MB": op.bytes("fwd") / 1e6,
               "bwd_MB": op.bytes("bwd") / 1e6, "GB_per_step": op.step_bytes() / 1e9,
               "ms_at_copy": op.step_bytes() / copy_gbps / 1e6, "note": op.note}
        if measured_copy_gbps:
            row["ms_at_measured"] = op.step_bytes() / measured_copy_gbps / 1e6
        rows.append(row)
    total = {"op": "total", "kernels_op": "", "calls": sum(r["calls"] for r in rows), "fwd_MB": None,
             "bwd_MB": None, "GB_per_step": sum(r["GB_per_step"] for r in rows),
             "ms_at_copy": sum(r["ms_at_copy"] for r in rows), "note": ""}
    if measured_copy_gbps:
        total["ms_at_measured"] = sum(r["ms_at_measured"] for r in rows)
    return rows + [total]


def savings(s: StepShape = XL1_B256, copy_gbps: float = CARD_COPY_GBPS) -> dict[str, float]:
    """ms per step below the floor that further fusions would remove."""
    M, F, d, a = s.M, s.F, s.depth, s.act_bytes
    one = lambda moves: GlueOp("", "", 1, moves).bytes()  # noqa: E731
    # (the mlp's gated residual with the next block's norm1, -4.0 ms at XL/1, is in the table since the model
    # hands the residual on: LightningDiTBlock's `defer`)
    return {
        "RoPE in the attention kernel (qkv read directly, dq/dk/dv written into d_qkv)":
            d * one(_qkv_rope(s)) / copy_gbps / 1e6,
        # fwd: SiLU*b in the w12 GEMM's epilogue (x12 still written for the backward, not read back);
        # bwd: d_x12 in the w3 dgrad GEMM's epilogue (its d_out neither written nor read back)
        "SwiGLU in the w12 GEMM epilogue (fwd) and the w3 dgrad epilogue (bwd)": d * M * F * 4 * a / copy_gbps / 1e6,
    }


def markdown(s: StepShape = XL1_B256, copy_gbps: float = CARD_COPY_GBPS,
             measured_copy_gbps: Optional[float] = None) -> str:
    """The floor table as Markdown, with the measured glue beside it."""
    rows = floor_table(s, copy_gbps, measured_copy_gbps)
    at = f"ms at {copy_gbps / 1000:.1f} TB/s"
    head = f"| glue op | calls / step | fwd MB / call | bwd MB / call | GB / step | {at} |"
    sep = "| --- | ---: | ---: | ---: | ---: | ---: |"
    if measured_copy_gbps:
        head += f" ms at {measured_copy_gbps:.0f} GB/s |"
        sep += " ---: |"
    head += " note |"
    sep += " --- |"
    lines = [head, sep]
    for row in rows:
        mb = lambda v: "" if v is None else f"{v:,.1f}"  # noqa: E731
        name = f"**{row['op']}**" if row["op"] == "total" else row["op"]
        if row["kernels_op"]:
            name += f" (`{row['kernels_op']}`)"
        line = (f"| {name} | {row['calls']} | {mb(row['fwd_MB'])} | {mb(row['bwd_MB'])} | "
                f"{row['GB_per_step']:.1f} | {row['ms_at_copy']:.1f} |")
        if measured_copy_gbps:
            line += f" {row['ms_at_measured']:.1f} |"
        lines.append(line + f" {row['note']} |")
    total = rows[-1]["ms_at_copy"]
    measured = sum(MEASURED_GLUE_MS.values())
    lines += ["", f"Measured glue in the profiled step (H200, XL/1, batch 256): {measured:.1f} ms "
              f"({', '.join(f'{k} {v}' for k, v in MEASURED_GLUE_MS.items())}) = {measured / total:.1f}x this floor "
              f"({total:.1f} ms at {copy_gbps / 1000:.1f} TB/s).", "", "Below the floor, with more fusion:"]
    lines += [f"- {k}: -{v:.1f} ms" for k, v in savings(s, copy_gbps).items()]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> str:
    from modeling.config import cli_parser
    p = cli_parser("bench.glue_floor", __doc__.split("\n\n")[0])
    p.add_argument("--copy-gbps", type=float, default=None,
                   help="a measured copy bandwidth (GB/s, read + write) for an extra column")
    p.add_argument("--batch", type=int, default=XL1_B256.B, help="samples per step")
    a = p.parse_args(argv)
    if a.batch < 1 or (a.copy_gbps is not None and a.copy_gbps <= 0):
        p.error("--batch and --copy-gbps must be positive")
    text = markdown(dataclasses.replace(XL1_B256, B=a.batch), CARD_COPY_GBPS, a.copy_gbps)
    print(text)
    return text


if __name__ == "__main__":
    main()
