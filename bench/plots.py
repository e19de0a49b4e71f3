"""Plots written beside the benchmarks' JSON (matplotlib, Agg, PNG).

    plot_throughput(report, "runs/bench/throughput.png")   # bench.throughput's report dict (or its JSON file)
    plot_ops(results, "runs/bench/ops.png")                 # bench.ops_bench.run()'s dict (or its JSON file)

Each returns the path it wrote. Cases that failed (an "error" entry) are left out of the bars and listed
under the figure, so a missing bar never reads as a slow one.
"""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _load(obj):
    if isinstance(obj, (str, Path)):
        return json.loads(Path(obj).read_text())
    return obj


def _save(fig, path, rect=(0, 0, 1, 1)):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _save_listing(fig, path, heading, errors, line_height):
    """Save `fig`; the entries that produced no bar (at most four, then a count) are listed under the chart."""
    import textwrap
    if not errors:
        return _save(fig, path)
    shown = [textwrap.shorten(e, 110) for e in errors[:4]] + ([f"... and {len(errors) - 4} more"]
                                                              if len(errors) > 4 else [])
    fig.text(0.01, 0.005, f"{heading}:\n" + "\n".join(shown), fontsize=6, va="bottom")
    return _save(fig, path, rect=(0, 0.04 + line_height * len(shown), 1, 1))


def plot_curves(path: str | Path, panels: list[tuple[str, dict[str, list[float]]]], log_y: bool | list[bool] = False,
                title: str | None = None) -> str | Path:
    """Per-step curves on the same seed, one panel per metric: panels = [(ylabel, {label: values}), ...];
    the first series solid, the others dashed (bench.fp8_compare, bench.vae_precision_compare). log_y: for every
    panel, or one flag per panel; title: a line above the panels (small type: a run's description)."""
    logs = log_y if isinstance(log_y, list) else [log_y] * len(panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.5), squeeze=False)
    for ax, (ylabel, series), log in zip(axes[0], panels, logs):
        for i, (label, values) in enumerate(series.items()):
            ax.plot(range(1, len(values) + 1), values, label=label, lw=1.2, ls="-" if i == 0 else "--")
        ax.set(xlabel="step", ylabel=ylabel)
        if log:
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_throughput(report: dict | str | Path, path: str | Path) -> Path:
    """bench.throughput report -> PNG: img/s per case (bars grouped by batch size, one colour per backend),
    with MFU / TFLOP/s written on each bar; the title names the device, the peak and the commit."""
    report = _load(report)
    rows = report.get("results") or []
    if not rows:
        raise ValueError("throughput report has no results to plot")
    # a row without img/s failed ("error") or never started ("skipped": the sampling budget ran out)
    errors = [f"{r.get('name', r.get('backend'))}: {r.get('error') or r.get('skipped')}" for r in rows
              if "img_per_s" not in r]
    # sample-mode rows name their backend "spec@batch": the spec is the series, the batch the group
    results = [dict(r, mode=r.get("mode", report.get("mode", "train")), backend=str(r["backend"]).split("@")[0])
               for r in rows if "img_per_s" in r]
    if not results:
        raise ValueError("throughput report has no successful results to plot: " + "; ".join(errors)[:300])
    env = report.get("environment", {})
    groups = sorted({(r["mode"], r["batch_size"], r.get("cfg_scale")) for r in results},
                    key=lambda g: (g[0], g[1], g[2] or 0))
    backends = list(dict.fromkeys(r["backend"] for r in results))
    width = 0.8 / len(backends)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(groups) * max(1, len(backends)) ** 0.5 + 2), 4.2))
    for j, backend in enumerate(backends):
        xs, ys, notes = [], [], []
        for i, g in enumerate(groups):
            r = next((r for r in results if (r["mode"], r["batch_size"], r.get("cfg_scale")) == g
                      and r["backend"] == backend), None)
            if r is None:
                continue
            xs.append(i + (j - (len(backends) - 1) / 2) * width)
            ys.append(r["img_per_s"])
            notes.append(f"{100 * r['mfu']:.0f}% MFU" if r.get("mfu") else
                         f"{r['tflops']:.2g} TFLOP/s" if r.get("tflops") else f"{r['img_per_s']:.3g}")
        bars = ax.bar(xs, ys, width, label=backend, color=f"C{j}")
        for b, note in zip(bars, notes):
            ax.annotate(note, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom",
                        fontsize=7, xytext=(0, 2), textcoords="offset points")
    labels = [f"{mode} bs {bs}" + (f"\ncfg {cfg:g}" if mode == "sample" and cfg not in (None, 1.0) else "")
              for mode, bs, cfg in groups]
    ax.set_xticks(range(len(groups)), labels, fontsize=8)
    model = ", ".join(sorted({str(r.get("model", r["name"].split(" ")[0])) for r in results}))
    commit = f"{str(env.get('commit', '?'))[:10]}{' (dirty)' if env.get('dirty') else ''}"
    ax.set(ylabel="images / s", title=f"LightningDiT {model} on {env.get('card', env.get('device', '?'))}\n"
                                     f"peak: {report.get('peak', '?')}; commit {commit}")
    ax.title.set_fontsize(9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save_listing(fig, path, "failed or not run", errors, line_height=0.04)


def plot_ops(results: dict | str | Path, path: str | Path, metric: str = "fwd_bwd_GBps") -> Path:
    """bench.ops_bench results -> PNG: GB/s per op (`metric`: fwd_GBps or fwd_bwd_GBps), one bar per
    implementation that ran; an inference op (no backward timed) shows its forward under fwd_bwd_GBps, labelled
    so; errors are listed under the plot."""
    results = _load(results)
    ops = [k for k, v in results.items()  # the environment block and the non-bandwidth tables are not ops
           if k not in ("environment", "attention", "mlp_w12_swiglu") and isinstance(v, dict)]
    fwd_only = {op for op in ops if metric == "fwd_bwd_GBps"
                and not any(metric in row for row in results[op].values() if isinstance(row, dict))}

    def value(op, row):
        return None if row is None or "error" in row else row.get("fwd_GBps" if op in fwd_only else metric)

    errors = [f"{op}/{impl}: {row.get('error', 'no ' + metric)}" for op in ops for impl, row in results[op].items()
              if value(op, row) is None]
    impls = list(dict.fromkeys(impl for op in ops for impl, row in results[op].items()
                               if value(op, row) is not None))
    if not ops or not impls:
        raise ValueError(f"ops benchmark results have no successful {metric} rows to plot")
    width = 0.8 / len(impls)
    fig, ax = plt.subplots(figsize=(max(7.0, 1.3 * len(ops) + 2), 4.6))
    for j, impl in enumerate(impls):
        xs, ys = [], []
        for i, op in enumerate(ops):
            v = value(op, results[op].get(impl))
            if v is not None:
                xs.append(i + (j - (len(impls) - 1) / 2) * width)
                ys.append(v)
        ax.bar(xs, ys, width, label=impl, color=f"C{j}")
    ax.set_xticks(range(len(ops)), [o.replace("_", "\n") + ("\n(fwd only)" if o in fwd_only else "") for o in ops],
                  fontsize=7)
    ax.set(ylabel=metric.replace("_GBps", " GB/s").replace("_", "+"), title=f"memory-bound ops: {metric}")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save_listing(fig, path, "not run", errors, line_height=0.03)
