"""What `auto` runs inside torch.compile, decided from a GPU measurement: writes kernels/compiled_choices.json.

    python -m bench.compiled_choices bench/results/<suite>.json --write kernels/compiled_choices.json

Reads the ops table of a GPU suite result (`sections.ops`) or of `python -m bench.ops_bench` (top level): per op,
the time of our fastest implementation (triton, cuda) and of torch.compile(reference), forward + backward where
both were timed, else forward. An op whose kernel was faster runs ours under compile ("ours"); one where inductor's
fusion was faster traces its reference there ("reference"). An op timed both ways also gets its forward's decision
("inference": the table times the forward under no_grad), which a trace without gradients (the sampler) follows;
from kernel times only (a forward alone is short enough for its wall time to be the host's dispatch).

The time compared is the kernels' device time (`fwd_bwd_kernel_ms`, `fwd_kernel_ms`; "timed": "fwd_bwd kernel")
where both sides have it: inside the compiled training step the GPU is the bottleneck and each launch overlaps
earlier kernels, so the host dispatch the wall time (do_bench) counts for a short op is not paid there; the wall
times stay in the entry (`ours_wall_ms`, `inductor_wall_ms`). The GPU suite's trainer A/B (`fused+compiled` against
`auto+compiled`) checks the choice end to end. A result without kernel times (older runs) is decided on its wall
times ("timed": "fwd_bwd" / "fwd"). Ops the result does not time keep their entry from
the table being replaced (with its own evidence or its reason for having none). The table keeps the result file's
name and its environment block (card, versions, commit); kernels/registry.py reads it, and `kernels.describe()` reports
"reference (inductor)" where it applies. Without --write it prints the table.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
TABLE = REPO / "kernels" / "compiled_choices.json"  # what kernels/registry.py reads
FUSED = ("triton", "cuda")


def _timing(rows: dict, phase: Optional[str] = None) -> Optional[dict]:
    """{"timed", "ours", "ours_ms", "inductor_ms"} from one op's rows (and "ours_wall_ms", "inductor_wall_ms" when
    decided on kernel time), or None when they cannot be compared. phase: "fwd" or "fwd_bwd"; default fwd_bwd where
    every side has it, else fwd."""
    comp = rows.get("compiled_reference") or {}
    ours = {impl: rows[impl] for impl in FUSED if isinstance(rows.get(impl), dict) and "error" not in rows[impl]}
    if "error" in comp or not ours:
        return None
    if phase is None:
        phase = "fwd_bwd" if "fwd_bwd_ms" in comp and all("fwd_bwd_ms" in r for r in ours.values()) else "fwd"
    wall = f"{phase}_ms"
    if wall not in comp or not all(wall in r for r in ours.values()):
        return None
    kern = f"{phase}_kernel_ms"
    # kernel time only when every side has it: one backend's wall time against another's kernel time would
    # compare launch overhead, not kernels
    if kern in comp and all(kern in r for r in ours.values()):
        best = min(ours, key=lambda impl: ours[impl][kern])
        return {"timed": f"{phase} kernel", "ours": best, "ours_ms": round(ours[best][kern], 4),
                "inductor_ms": round(comp[kern], 4), "ours_wall_ms": round(ours[best][wall], 4),
                "inductor_wall_ms": round(comp[wall], 4)}
    best = min(ours, key=lambda impl: ours[impl][wall])
    return {"timed": phase, "ours": best, "ours_ms": round(ours[best][wall], 4), "inductor_ms": round(comp[wall], 4)}


def choices(result: dict, source: str, base: Optional[dict] = None, note: str = "") -> dict:
    """The table from a suite or ops_bench result (`source`: its path, recorded), over `base`'s entries."""
    ops = result["sections"]["ops"] if "sections" in result else result
    env = result.get("environment") or {}
    measured_on = {"results": source, "environment": env}  # the measurement's own environment block, as recorded
    if note:
        measured_on["note"] = note
    table = {"doc": (base or {}).get("doc", ""), "measured_on": measured_on, "ops": dict((base or {}).get("ops", {}))}
    for name, rows in ops.items():
        if name == "environment" or not isinstance(rows, dict):
            continue
        t = _timing(rows)
        if t is None:
            continue
        entry = {"under_compile": "ours" if t["ours_ms"] < t["inductor_ms"] else "reference", **t}
        # a training op's forward alone (timed under no_grad): what a trace without gradients (the sampler) runs.
        # On kernel time only: a forward alone is 0.1-0.3 ms at XL/1, where the wall time counts the host's dispatch
        # (bench/results/2026-12-04_h200.md), which the sampler's CUDA graphs do not pay
        fwd = _timing(rows, "fwd") if t["timed"].startswith("fwd_bwd") else None
        if fwd is not None and fwd["timed"] == "fwd kernel":
            entry["inference"] = {"under_compile": "ours" if fwd["ours_ms"] < fwd["inductor_ms"] else "reference",
                                  **fwd}
        table["ops"][name] = {**entry, "results": source}
    table["ops"] = dict(sorted(table["ops"].items()))
    return table


def main(argv: Optional[list[str]] = None) -> dict:
    from modeling.config import cli_parser
    p = cli_parser("bench.compiled_choices", __doc__)
    p.add_argument("results", help="a GPU suite JSON (bench/results/...) or an ops_bench JSON")
    p.add_argument("--write", default=None, help=f"the table to replace (the one the kernels read: "
                                                 f"{TABLE.relative_to(REPO)})")
    p.add_argument("--note", default="", help="a remark kept with the measurement (e.g. which tree ran)")
    a = p.parse_args(argv)
    path = Path(a.results)
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"bench.compiled_choices: {path}: {e}") from None
    ops = (result.get("sections") or {}).get("ops") if isinstance(result, dict) and "sections" in result else result
    if not isinstance(ops, dict):
        raise SystemExit(f"bench.compiled_choices: {path}: no ops table (sections.ops or ops_bench rows)")
    base = json.loads(Path(a.write).read_text()) if a.write and Path(a.write).is_file() else None
    try:
        source = str(path.resolve().relative_to(REPO))
    except ValueError:
        source = str(path)
    table = choices(result, source, base, a.note)
    text = json.dumps(table, indent=1) + "\n"
    if a.write:
        Path(a.write).write_text(text)
        print(f"wrote {a.write}")
    else:
        print(text, end="")
    return table


if __name__ == "__main__":
    main()
