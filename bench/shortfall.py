"""What keeps the trainer's step from its target: each profile category's measured ms beside its floor on this card.

Issue 18's "done when" asks for exactly this if the targets are not met: which category keeps the step short and by
how many ms. From one profiled trainer case (bench.throughput's row: `profile.ms_per_step_by_category`, the GPU's idle
time, the step's median) and the card's measured ceilings (the suite's `ceilings`: copy GB/s, bf16 and FP8 matmul
TFLOP/s), each row is a category's kernel ms per step, the least it could take, and the excess:

- matmul: the step's Linear FLOPs (forward, dgrad, wgrad; `step_flops`) at the measured dense matmul rate (FP8's
  where the case trains in FP8 and the ceiling was measured: the cases quantize every block Linear but the first and
  last layers, so this floor is a little low for FP8);
- attention: its FLOPs (the model's own accounting, training = 3x forward) at the same dense bf16 matmul rate: no
  attention kernel gets there (FlashAttention-3 reaches ~75% of it at long sequences), so its excess is an upper bound
  of what a better kernel saves;
- glue (inductor's fusions, our kernels, other elementwise/copies): one row, their sum against kernels.glue_floor's
  bytes at the measured copy bandwidth (the categories split the same ops differently from one backend to the next;
  for FP8 cases the floor is the bf16 step's, so the activation and gradient quantization passes are in the excess);
- optimizer: Adam's fp32 state (read p, g, m, v; write p, m, v: 28 bytes per parameter) and the EMA (read the
  parameter and the average, write the average: 12) at the copy bandwidth;
- host: the step's median minus its kernel time (the GPU idle, waiting on the host; floor 0).

`shortfall(...)["rows"]` is sorted by excess: the top rows are where the ms are. Against a target step time
(`target_img_s`), `needed_ms` is what the step must lose and `excess_ms` what the floors allow.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from kernels.glue_floor import XL1_B256, StepShape, floor_table
from modeling.lightningdit import LightningDiTConfig

GLUE = ("inductor fusions", "fused glue (ours)", "other (eager elementwise, copies, reductions)")
ADAM_BYTES_PER_PARAM = 28  # fp32 p, g, m, v read; p, m, v written
EMA_BYTES_PER_PARAM = 12   # fp32 parameter and average read, average written


def step_shape(model: LightningDiTConfig, batch: int) -> StepShape:
    """kernels.glue_floor's StepShape of a LightningDiT (SwiGLU, no learned sigma) training at `batch` samples."""
    n = (model.input_size // model.patch_size) ** 2
    p2 = model.patch_size ** 2
    return StepShape(B=batch, N=n, C=model.hidden_size, H=model.num_heads, D=model.hidden_size // model.num_heads,
                     F=int(2 / 3 * model.hidden_size * model.mlp_ratio), depth=model.depth,
                     patch_in=p2 * model.in_channels, patch_out=p2 * model.in_channels)


def step_flops(s: StepShape) -> dict[str, float]:
    """Linear and attention FLOPs of one training step (forward + dgrad + wgrad: 3x the forward's; 2 per
    multiply-add), the model's accounting (LightningDiT.flops_per_sample) for the shape's B samples."""
    C, F, N, d = s.C, s.F, s.N, s.depth
    per_token = d * (4 * C * C + 3 * C * F) + C * (s.patch_in + s.patch_out)  # qkv, proj, w12, w3; embed, final
    per_sample = d * 6 * C * C + 2 * C * C + 256 * C + C * C  # adaLN, final adaLN, timestep MLP
    linear = 3 * 2 * s.B * (per_token * N + per_sample)
    attention = 3 * 2 * s.B * d * 2 * N * N * C  # QK^T and AV over all heads
    return {"linear": float(linear), "attention": float(attention)}


def model_params(s: StepShape, num_classes: int = 1000) -> int:
    """LightningDiT's parameters at this shape: the Linear layers (StepShape.linear_params), the label table
    (with its null-class row), the norm weights and the fixed position embedding's absence (a buffer)."""
    norms = s.depth * 2 * s.C + s.C
    return s.linear_params() + (num_classes + 1) * s.C + norms


@dataclasses.dataclass(frozen=True)
class Ceilings:
    """The card's measured ceilings (the GPU suite's `ceilings` section)."""
    copy_gbps: float
    bf16_tflops: float
    fp8_tflops: Optional[float] = None

    @classmethod
    def from_suite(cls, section: dict) -> "Ceilings":
        return cls(section["copy_GBps"], section["bf16_matmul_TFLOPs"], section.get("fp8_matmul_TFLOPs"))


def shortfall(row: dict, ceilings: Ceilings, shape: StepShape = XL1_B256, target_img_s: Optional[float] = None,
              num_classes: int = 1000) -> dict:
    """row: a bench.throughput train row with a profile (its batch sets the shape's B). Returns {"rows": [{category,
    measured_ms, floor_ms, excess_ms, floor}], "step_ms", "floor_ms", "excess_ms", and with target_img_s
    "target_step_ms" / "needed_ms"}; rows sorted by excess, largest first."""
    prof = row["profile"]
    s = dataclasses.replace(shape, B=row["batch_size"])
    cats = dict(prof["ms_per_step_by_category"])
    step_ms = 1000 * row["median_s"]
    fp8 = str(row.get("fp8", "off")) not in ("off", "none", "")
    flops = step_flops(s)
    mm_rate, mm_name = ceilings.bf16_tflops, "bf16"
    if fp8 and ceilings.fp8_tflops:
        mm_rate, mm_name = ceilings.fp8_tflops, "FP8"
    glue_bytes = floor_table(s, ceilings.copy_gbps)[-1]["GB_per_step"] * 1e9
    params = model_params(s, num_classes)
    ms = lambda nbytes: nbytes / ceilings.copy_gbps / 1e6  # noqa: E731  (bytes -> ms at the copy bandwidth)
    rows = [
        ("matmul", cats.pop("matmul", 0.0), flops["linear"] / mm_rate / 1e9,
         f"{flops['linear'] / 1e12:.1f} TFLOP at the measured {mm_name} matmul {mm_rate:.0f} TFLOP/s"),
        ("attention", cats.pop("attention", 0.0), flops["attention"] / ceilings.bf16_tflops / 1e9,
         f"{flops['attention'] / 1e12:.1f} TFLOP at the bf16 matmul rate (an upper bound of the saving)"),
        ("glue (" + ", ".join(c.split(" (")[0] for c in GLUE) + ")", sum(cats.pop(c, 0.0) for c in GLUE),
         ms(glue_bytes), f"{glue_bytes / 1e9:.1f} GB (kernels.glue_floor) at {ceilings.copy_gbps:.0f} GB/s"
         + (" (the bf16 step's glue: FP8's quantization passes count in the excess)" if fp8 else "")),
        ("optimizer", cats.pop("optimizer", 0.0), ms(params * (ADAM_BYTES_PER_PARAM + EMA_BYTES_PER_PARAM)),
         f"{params / 1e6:.0f}M parameters x {ADAM_BYTES_PER_PARAM + EMA_BYTES_PER_PARAM} B (Adam + EMA)"),
        ("host (GPU idle)", max(0.0, step_ms - prof["total_kernel_ms_per_step"]), 0.0,
         "the step's median minus its kernel time"),
    ]
    rows += [(c, v, 0.0, "uncategorised") for c, v in cats.items() if v]
    out = [{"category": c, "measured_ms": m, "floor_ms": f, "excess_ms": m - f, "floor": why} for c, m, f, why in rows]
    out.sort(key=lambda r: -r["excess_ms"])
    res = {"case": row.get("name", ""), "step_ms": step_ms, "rows": out,
           "floor_ms": sum(r["floor_ms"] for r in out), "excess_ms": sum(r["excess_ms"] for r in out)}
    if target_img_s:
        res["target_step_ms"] = 1000 * row["batch_size"] / target_img_s
        res["needed_ms"] = step_ms - res["target_step_ms"]
    return res


def markdown(res: dict) -> str:
    """The shortfall as a Markdown table with a one-line verdict."""
    lines = [f"| category | measured ms | floor ms | excess ms | floor |", "| --- | ---: | ---: | ---: | --- |"]
    lines += [f"| {r['category']} | {r['measured_ms']:.1f} | {r['floor_ms']:.1f} | {r['excess_ms']:.1f} | {r['floor']} |"
              for r in res["rows"]]
    lines.append(f"| **step** | {res['step_ms']:.1f} | {res['floor_ms']:.1f} | {res['excess_ms']:.1f} | |")
    if "needed_ms" in res:
        top = res["rows"][0]
        verdict = ("the target is met" if res["needed_ms"] <= 0 else
                   f"the target ({res['target_step_ms']:.0f} ms) needs -{res['needed_ms']:.0f} ms; the largest "
                   f"excess is {top['category']} ({top['excess_ms']:.0f} ms over its floor)")
        lines += ["", f"{res['case']}: {verdict}."]
    return "\n".join(lines)
