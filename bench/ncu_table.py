"""The kernels of one profiled training step from an Nsight Compute report: name, launches, time, achieved DRAM
bandwidth and tensor-core TFLOP/s, and the profile category (bench.kernel_time) of each.

bench/nsys_check.sh captures one compiled LightningDiT training step with ncu (every kernel in the trainer's
profile window) and exports its raw page as CSV, base units:

    ncu --import step.ncu-rep --csv --page raw --print-units base > step.csv
    python -m bench.ncu_table step.csv --out DIR        # DIR/ncu_step.json and DIR/ncu_step.md

The metrics read (whichever the report holds): gpu__time_duration.sum (ns), dram__bytes_read.sum and
dram__bytes_write.sum (bytes), and every sm__ops_path_tensor_src_*_dst_* counter without a sparsity suffix (tensor
math ops; Nsight Compute counts a multiply-add as two). Kernel time under ncu is each kernel alone, serialized,
with its caches flushed between passes: the sum is not the step's wall time (bench.profile_step measures that), but
each kernel's GB/s and TFLOP/s are what it achieves on its own.
"""
from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Optional

from bench.kernel_time import categorize

TIME = "gpu__time_duration.sum"
READ, WRITE = "dram__bytes_read.sum", "dram__bytes_write.sum"
TENSOR = re.compile(r"^sm__ops_path_tensor_src_\w+_dst_\w+?\.sum$")
KERNEL_COLUMNS = ("Kernel Name", "Function Name", "Name")


class NcuTableError(ValueError):
    """The CSV is not an ncu raw page this module can read (one line, naming what is missing)."""


def _number(text: str) -> Optional[float]:
    t = text.strip().replace(",", "")
    if not t or t in ("n/a", "N/A", "nan"):
        return None
    try:
        return float(t)
    except ValueError:
        return None


def short_name(name: str) -> str:
    """A kernel's function name without return type, namespaces, template arguments and parameters."""
    depth, out = 0, []
    for ch in name:  # drop everything inside <...> and (...)
        if ch in "<(":
            depth += 1
        elif ch in ">)":
            depth = max(depth - 1, 0)
        elif depth == 0:
            out.append(ch)
    base = "".join(out).strip().split(" ")[-1].split("::")[-1]
    return base or name.strip()


def read_rows(text: str) -> list[dict]:
    """The ncu raw-page CSV (`--csv --page raw --print-units base`) -> one dict per kernel launch: name, time_ns,
    dram bytes (None where absent), tensor ops (None where no tensor counter was collected)."""
    lines = [l for l in text.splitlines() if l.startswith('"')]  # ncu prints its own ==PROF== lines around the CSV
    if not lines:
        raise NcuTableError("no CSV rows: expected `ncu --import REPORT --csv --page raw --print-units base` output")
    table = list(csv.reader(io.StringIO("\n".join(lines))))
    header = table[0]
    name_col = next((c for c in KERNEL_COLUMNS if c in header), None)
    if name_col is None or TIME not in header:
        raise NcuTableError(f"the CSV has no {' / '.join(KERNEL_COLUMNS)} or {TIME} column (columns: "
                            f"{', '.join(header[:12])}...)")
    idx = {c: i for i, c in enumerate(header)}
    tensor_cols = [c for c in header if TENSOR.match(c) and "sparsity" not in c]
    rows = []
    for values in table[1:]:
        if len(values) != len(header) or _number(values[idx[TIME]]) is None:
            continue  # the units row ("nsecond", "byte", ...) and anything malformed
        get = lambda c: _number(values[idx[c]]) if c in idx else None  # noqa: E731
        read, write = get(READ), get(WRITE)
        tensor = [get(c) for c in tensor_cols]
        rows.append({"name": values[idx[name_col]], "time_ns": get(TIME),
                     "dram_bytes": None if read is None and write is None else (read or 0.0) + (write or 0.0),
                     "tensor_ops": sum(t for t in tensor if t is not None) if tensor_cols else None})
    if not rows:
        raise NcuTableError("the CSV has a header but no kernel rows")
    return rows


def summarize(rows: list[dict]) -> dict:
    """Per kernel (by short name): launches, total and mean time, GB/s, TFLOP/s, category; per category totals."""
    kernels: dict[str, dict] = {}
    for r in rows:
        k = kernels.setdefault(short_name(r["name"]), {"launches": 0, "time_ns": 0.0, "dram_bytes": None,
                                                       "tensor_ops": None, "category": categorize(r["name"])})
        k["launches"] += 1
        k["time_ns"] += r["time_ns"]
        for key in ("dram_bytes", "tensor_ops"):
            if r[key] is not None:
                k[key] = (k[key] or 0.0) + r[key]
    for k in kernels.values():
        sec = k["time_ns"] * 1e-9
        k["time_ms"] = k["time_ns"] * 1e-6
        k["dram_GBps"] = k["dram_bytes"] / sec / 1e9 if k["dram_bytes"] is not None and sec else None
        k["tensor_TFLOPs"] = k["tensor_ops"] / sec / 1e12 if k["tensor_ops"] and sec else None
    ordered = dict(sorted(kernels.items(), key=lambda kv: -kv[1]["time_ns"]))
    cats: dict[str, dict] = {}
    for k in ordered.values():
        c = cats.setdefault(k["category"], {"time_ms": 0.0, "launches": 0, "dram_GB": 0.0})
        c["time_ms"] += k["time_ms"]
        c["launches"] += k["launches"]
        c["dram_GB"] += (k["dram_bytes"] or 0.0) / 1e9
    for c in cats.values():
        c["dram_GBps"] = c["dram_GB"] / (c["time_ms"] * 1e-3) if c["time_ms"] else None
    return {"kernels": ordered, "categories": dict(sorted(cats.items(), key=lambda kv: -kv[1]["time_ms"])),
            "launches": len(rows), "kernel_time_ms": sum(k["time_ms"] for k in ordered.values())}


def markdown(summary: dict, top: int = 40) -> str:
    def f(v, fmt):
        return "" if v is None else format(v, fmt)
    out = [f"{summary['launches']} launches, {summary['kernel_time_ms']:.2f} ms of kernel time (each kernel alone, "
           "serialized under ncu)", "", "| category | ms | launches | DRAM GB/s |", "| --- | ---: | ---: | ---: |"]
    out += [f"| {c} | {v['time_ms']:.2f} | {v['launches']} | {f(v['dram_GBps'], '.0f')} |"
            for c, v in summary["categories"].items()]
    out += ["", "| kernel | category | launches | ms | DRAM GB/s | tensor TFLOP/s |",
            "| --- | --- | ---: | ---: | ---: | ---: |"]
    out += [f"| `{n[:60]}` | {k['category']} | {k['launches']} | {k['time_ms']:.3f} | {f(k['dram_GBps'], '.0f')} | "
            f"{f(k['tensor_TFLOPs'], '.0f')} |" for n, k in list(summary["kernels"].items())[:top]]
    return "\n".join(out) + "\n"


def main(argv: Optional[list[str]] = None) -> dict:
    from modeling.config import cli_parser
    p = cli_parser("bench.ncu_table", __doc__)
    p.add_argument("csv", help="ncu --import REPORT --csv --page raw --print-units base output")
    p.add_argument("--out", default=None, help="folder for ncu_step.json and ncu_step.md (default: print only)")
    a = p.parse_args(argv)
    path = Path(a.csv)
    try:
        summary = summarize(read_rows(path.read_text(errors="replace")))
    except (OSError, NcuTableError) as e:
        raise SystemExit(f"bench.ncu_table: {path}: {e}") from None
    text = markdown(summary)
    print(text, end="")
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "ncu_step.json").write_text(json.dumps(summary, indent=1))
        (out / "ncu_step.md").write_text(text)
    return summary


if __name__ == "__main__":
    main()
