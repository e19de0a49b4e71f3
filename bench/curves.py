"""Throughput vs convergence: curves for one or more training runs, as PNG and a self-contained HTML report.

    python -m bench.curves runs/dit_eager runs/dit_fused --metric eval/fd --out runs/curves/report.html

Reads each run's `metrics.jsonl` (train.logging_utils.MetricsLogger): training lines carry `img_per_s`,
`loss`, `images_seen`; eval lines (the trainer's eval hook every K steps) carry `eval/<metric>`,
`wall_clock_s` and `images_seen`. One figure shows images per second, the metric against wall-clock and
the metric against images seen, so "as good per image and faster per second" reads at a glance.
"""
from __future__ import annotations

import base64
import html
import io
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from modeling.config import console_entry


def load_run(run_dir: str | Path) -> list[dict]:
    """The lines of a run's metrics.jsonl (a torn last line, from a killed run, is left out)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a training run directory (logging.dir)?")
    records = []
    lines = path.read_text().splitlines()
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:  # only the last line may be torn (a killed run): keep the rest
                if n != len(lines):
                    raise ValueError(f"{path}: line {n} is not JSON ({e.msg}); only a torn last line is skipped") \
                        from None
    if not records:
        raise ValueError(f"{path}: no metrics records (an empty or torn file)")
    return records


def series(records: list[dict], key: str, x: str = "step") -> tuple[list, list]:
    """(xs, ys) of the records that carry both `x` and a non-null `key`."""
    pts = [(r[x], r[key]) for r in records if key in r and x in r and r[key] is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _label(run_dir):
    return Path(run_dir).name


def throughput_vs_convergence(runs: dict[str, list[dict]], metric: str, out_png: str | Path | None = None,
                              higher_is_better: bool | None = None) -> bytes:
    """runs: {label: records}. Returns the PNG bytes (and writes out_png if given)."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for label, rec in runs.items():
        xs, ys = series(rec, "img_per_s", "images_seen")
        axes[0].plot(xs, ys, marker=".", label=label)
        xs, ys = series(rec, metric, "wall_clock_s")
        axes[1].plot(xs, ys, marker="o", label=label)
        xs, ys = series(rec, metric, "images_seen")
        axes[2].plot(xs, ys, marker="o", label=label)
    note = "" if higher_is_better is None else (" (higher is better)" if higher_is_better else " (lower is better)")
    axes[0].set(title="training throughput", xlabel="images seen", ylabel="images / s")
    axes[1].set(title=f"{metric} vs wall-clock{note}", xlabel="wall-clock (s)", ylabel=metric)
    axes[2].set(title=f"{metric} vs images seen{note}", xlabel="images seen", ylabel=metric)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, out_png)


def loss_curves(runs: dict[str, list[dict]], keys: tuple[str, ...] = ("loss",), out_png: str | Path | None = None,
                title: str = "training loss") -> bytes:
    """runs: {label: records}; one panel per key, x = step."""
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for label, rec in runs.items():
            xs, ys = series(rec, key)
            if xs:
                ax.plot(xs, ys, label=label)
        ax.set(title=f"{title}: {key}", xlabel="step", ylabel=key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, out_png)


def _save(fig, out_png):
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    data = buf.getvalue()
    if out_png:
        Path(out_png).parent.mkdir(parents=True, exist_ok=True)
        Path(out_png).write_bytes(data)
    return data


def img_tag(png_bytes: bytes, alt: str = "") -> str:
    """An <img> with the PNG inline (base64): the page needs no other file."""
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png_bytes).decode()}">'


def html_report(title: str, sections: list[tuple[str, str]], out_html: str | Path) -> Path:
    """sections: list of (heading, body html). Images must be inline (img_tag): the file stands alone."""
    body = "\n".join(f"<h2>{html.escape(h)}</h2>\n{b}" for h, b in sections)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;max-width:1500px;margin:2em auto;padding:0 1em}"
            "img{max-width:100%}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;"
            "text-align:right}pre{background:#f6f6f6;padding:.5em}</style></head>"
            f"<body><h1>{html.escape(title)}</h1>\n{body}\n</body></html>")
    Path(out_html).parent.mkdir(parents=True, exist_ok=True)
    Path(out_html).write_text(page)
    return Path(out_html)


def table_html(rows: list[list], header: list[str]) -> str:
    """An HTML table (floats to 4 significant digits), every cell escaped."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def main(argv: list[str] | None = None) -> Path:
    from modeling.config import cli_parser

    p = cli_parser("bench.curves", __doc__)
    p.add_argument("runs", nargs="+", help="training run directories (with metrics.jsonl)")
    p.add_argument("--metric", default="eval/fd",
                   help="the eval metric to plot, as logged: eval/<name> (the demo's classifier: eval/fd; eval.metrics "
                        "fid: eval/fid)")
    p.add_argument("--out", default="runs/curves/report.html")
    a = p.parse_args(argv)
    from modeling.config import check_output_path, user_errors
    with user_errors(extra=(ValueError,)):  # a run folder, a metrics file or an output that will not do: one line
        runs = {_label(r): load_run(r) for r in a.runs}
        out = Path(a.out)
        check_output_path(out, "--out")
        if not any(series(rec, a.metric)[1] for rec in runs.values()):  # a misspelt or the wrong run kind's metric
            logged = sorted({k for rec in runs.values() for r in rec for k in r if k.startswith("eval/")})
            if logged:
                raise ValueError(f"--metric {a.metric}: no run logged it; they logged {', '.join(logged)}")
            print(f"note: no run logged an eval metric ({a.metric}): the report has throughput and loss only",
                  file=sys.stderr)
        tvc = throughput_vs_convergence(runs, a.metric, out.with_suffix(".png"))
        loss = loss_curves(runs, ("loss",), out.with_name(out.stem + "_loss.png"))
        rows = []
        for label, rec in runs.items():
            _, ips = series(rec, "img_per_s")
            _, met = series(rec, a.metric)
            rows.append([label, max(ips) if ips else "-", met[-1] if met else "-", len(met)])
        html_report("Throughput vs convergence", [
            ("Summary", table_html(rows, ["run", "best img/s", f"last {a.metric}", "evals"])),
            ("Throughput and convergence", img_tag(tvc, "throughput vs convergence")),
            ("Training loss", img_tag(loss, "loss")),
        ], out)
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return out



cli = console_entry(__name__)  # the `vavae-curves` console script (setup.py)

if __name__ == "__main__":
    main()
