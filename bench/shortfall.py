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
- glue (inductor's fusions, our kernels, other elementwise/copies): one row, their sum against bench.glue_floor's
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

from bench.glue_floor import XL1_B256, StepShape, floor_table, sampler_glue_ops
from modeling.lightningdit import LightningDiTConfig

GLUE = ("inductor fusions", "fused glue (ours)", "other (eager elementwise, copies, reductions)")
ADAM_BYTES_PER_PARAM = 28  # fp32 p, g, m, v read; p, m, v written
EMA_BYTES_PER_PARAM = 12   # fp32 parameter and average read, average written


def step_shape(model: LightningDiTConfig, batch: int) -> StepShape:
    """bench.glue_floor's StepShape of a LightningDiT (SwiGLU, no learned sigma) training at `batch` samples."""
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
         ms(glue_bytes), f"{glue_bytes / 1e9:.1f} GB (bench.glue_floor) at {ceilings.copy_gbps:.0f} GB/s"
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


def sampling_shortfall(entry: dict, ceilings: Ceilings, target_img_s: Optional[float] = None,
                       model: Optional[LightningDiTConfig] = None) -> dict:
    """The same for one profiled sampling entry (bench.sample_speed's result row: `profile.ms_per_call_by_category`
    of one `steps_run`-point call at its batch, `ran`: precision, guided steps, model calls). The call's forwards
    (guided steps run the batch twice) are `s.B` sample-forwards; matmul: their Linear FLOPs (a third of a training
    step's) at the measured matmul rate (FP8's only where measured: else no floor); attention: its FLOPs at the bf16
    rate; glue: bench.glue_floor.sampler_glue_ops's bytes (the bf16 model; FP8's e4m3 rows where it ran FP8);
    host: the timed call minus its kernel time. Returns shortfall's dict with "call_ms" for "step_ms", and with
    target_img_s the call time that rate needs (`target_call_ms`, `needed_ms`)."""
    prof, ran, st = entry["profile"], entry["ran"], entry["settings"]
    model = model or LightningDiTConfig.from_size(st["size"], input_size=st["input_size"], in_channels=st["in_channels"])
    forwards = entry["batch_size"] * (ran["model_calls"] + ran["guided_steps"])  # guided: cond and uncond rows
    s = dataclasses.replace(step_shape(model, forwards), act_bytes=2)
    cats = dict(prof["ms_per_call_by_category"])
    call_ms = 1000 * entry["time_s"]
    fp8 = ran.get("precision") == "fp8"
    flops = {k: v / 3 for k, v in step_flops(s).items()}  # the forward alone
    mm_rate, mm_name = (ceilings.fp8_tflops, "FP8") if fp8 else (ceilings.bf16_tflops, "bf16")
    glue = sampler_glue_ops(s, fp8, proj_fp8="attn.proj in bf16" not in str(ran.get("fp8", "")))
    glue_bytes = sum(op.step_bytes() for op in glue)
    rows = [
        ("matmul", cats.pop("matmul", 0.0), flops["linear"] / mm_rate / 1e9 if mm_rate else None,
         f"{flops['linear'] / 1e12:.0f} TFLOP at the measured {mm_name} matmul {mm_rate:.0f} TFLOP/s" if mm_rate
         else f"{flops['linear'] / 1e12:.0f} TFLOP; no measured {mm_name} matmul rate: no floor"),
        ("attention", cats.pop("attention", 0.0), flops["attention"] / ceilings.bf16_tflops / 1e9,
         f"{flops['attention'] / 1e12:.1f} TFLOP at the bf16 matmul rate (an upper bound of the saving)"),
        ("glue (" + ", ".join(c.split(" (")[0] for c in GLUE) + ")", sum(cats.pop(c, 0.0) for c in GLUE),
         glue_bytes / ceilings.copy_gbps / 1e6,
         f"{glue_bytes / 1e9:.0f} GB (bench.glue_floor.sampler_glue_ops{', FP8' if fp8 else ''}) at "
         f"{ceilings.copy_gbps:.0f} GB/s"),
        ("host (GPU idle)", max(0.0, call_ms - prof["total_kernel_ms_per_call"]), 0.0,
         "the timed call minus its kernel time"),
    ]
    rows += [(c, v, 0.0, "uncategorised") for c, v in cats.items() if v]
    out = [{"category": c, "measured_ms": m, "floor_ms": f, "excess_ms": None if f is None else m - f, "floor": why}
           for c, m, f, why in rows]
    out.sort(key=lambda r: -(r["excess_ms"] if r["excess_ms"] is not None else -1e30))
    res = {"case": entry.get("name", ""), "step_ms": call_ms, "call_ms": call_ms, "rows": out,
           "floor_ms": sum(r["floor_ms"] or 0.0 for r in out), "excess_ms": sum(r["excess_ms"] or 0.0 for r in out),
           "sample_forwards": forwards}
    if target_img_s:
        # img/s scale with the call time (bench.sample_speed scales one call to the full grid by forward cost)
        res["target_call_ms"] = call_ms * entry["img_per_s"] / target_img_s
        res["target_step_ms"] = res["target_call_ms"]
        res["needed_ms"] = call_ms - res["target_call_ms"]
    return res


SAMPLING_TARGETS = {"fp8": 7.0, "bf16": 5.5}  # issue 18's img/s at the paper's settings (FP8; bf16 weights)


def sampling_shortfalls(results: list[dict], ceilings: Ceilings,
                        targets: dict[str, float] = SAMPLING_TARGETS) -> dict[str, dict]:
    """{entry name: sampling_shortfall} for every profiled entry of a sampling run, each against its precision's
    target (FP8's for fp8 entries, bf16's for the others)."""
    return {e["name"]: sampling_shortfall(e, ceilings, targets["fp8" if e["ran"].get("precision") == "fp8" else
                                                                "bf16"])
            for e in results if isinstance(e.get("profile"), dict) and "ms_per_call_by_category" in e["profile"]}


def markdown(res: dict) -> str:
    """The shortfall as a Markdown table with a one-line verdict."""
    lines = [f"| category | measured ms | floor ms | excess ms | floor |", "| --- | ---: | ---: | ---: | --- |"]
    num = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731  (no floor where no ceiling was measured)
    lines += [f"| {r['category']} | {r['measured_ms']:.1f} | {num(r['floor_ms'])} | {num(r['excess_ms'])} | "
              f"{r['floor']} |" for r in res["rows"]]
    total = "call" if "call_ms" in res else "step"
    lines.append(f"| **{total}** | {res['step_ms']:.1f} | {res['floor_ms']:.1f} | {res['excess_ms']:.1f} | |")
    if "needed_ms" in res:
        top = res["rows"][0]
        verdict = ("the target is met" if res["needed_ms"] <= 0 else
                   f"the target ({res['target_step_ms']:.0f} ms) needs -{res['needed_ms']:.0f} ms; the largest "
                   f"excess is {top['category']} ({top['excess_ms']:.0f} ms over its floor)")
        lines += ["", f"{res['case']}: {verdict}."]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> str:
    """python -m bench.shortfall --sampling SAMPLE_JSON --copy-gbps G --bf16-tflops T [--fp8-tflops T]: the table
    for every profiled entry of a bench.throughput --mode sample result (the suite's sample_throughput.json), at the
    ceilings a GPU run measured (the suite's part A `ceilings`: no device needed to read a run afterwards)."""
    import json

    from modeling.config import cli_parser
    p = cli_parser("bench.shortfall", main.__doc__)
    p.add_argument("--sampling", required=True, help="a bench.throughput --mode sample JSON")
    p.add_argument("--copy-gbps", type=float, required=True)
    p.add_argument("--bf16-tflops", type=float, required=True)
    p.add_argument("--fp8-tflops", type=float, default=None)
    p.add_argument("--target-img-s", type=float, default=7.0, help="the FP8 entries' target (issue 18's)")
    p.add_argument("--target-bf16-img-s", type=float, default=5.5, help="the other entries' target (issue 18's)")
    a = p.parse_args(argv)
    try:
        result = json.loads(open(a.sampling).read())
    except (OSError, ValueError) as e:
        raise SystemExit(f"bench.shortfall: {a.sampling}: {e}") from None
    ceilings = Ceilings(a.copy_gbps, a.bf16_tflops, a.fp8_tflops)
    entries = {e.get("name"): e for e in result.get("results", [])}
    res = sampling_shortfalls(result.get("results", []), ceilings, {"fp8": a.target_img_s,
                                                                     "bf16": a.target_bf16_img_s})
    parts = [f"{name}: {entries[name]['img_per_s']:.2f} img/s\n\n{markdown(r)}" for name, r in res.items()]
    if not parts:
        raise SystemExit(f"bench.shortfall: {a.sampling}: no profiled sampling entry (run with --profile)")
    text = "\n\n".join(parts)
    print(text)
    return text


if __name__ == "__main__":
    main()
