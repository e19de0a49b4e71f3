"""bench.curves: reads trainer metrics.jsonl, draws PNGs, writes a self-contained HTML report."""
import base64
import json
import re

import pytest

from bench.curves import load_run, main, series


def _write_run(d, speed, cut_last_line=False):
    d.mkdir(parents=True)
    lines = []
    for step in range(1, 7):
        lines.append({"step": step, "loss": 1.0 / step, "img_per_s": speed, "images_seen": 16 * step})
        if step % 2 == 0:
            lines.append({"step": step, "eval/fd": 10.0 / step, "wall_clock_s": step * 16 / speed,
                          "images_seen": 16 * step})
    text = "\n".join(json.dumps(r) for r in lines) + "\n"
    if cut_last_line:
        text += '{"step": 7, "lo'
    (d / "metrics.jsonl").write_text(text)


def test_curves_report_is_self_contained(tmp_path):
    _write_run(tmp_path / "eager", 100.0)
    _write_run(tmp_path / "fused", 150.0, cut_last_line=True)  # a killed run's torn last line is tolerated
    rec = load_run(tmp_path / "fused")
    assert series(rec, "eval/fd", "wall_clock_s")[0] == [2 * 16 / 150, 4 * 16 / 150, 6 * 16 / 150]
    out = tmp_path / "r" / "report.html"
    main([str(tmp_path / "eager"), str(tmp_path / "fused"), "--metric", "eval/fd", "--out", str(out)])
    page = out.read_text()
    imgs = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(imgs) == 2 and all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in imgs)
    assert "http" not in page and "<td>fused</td>" in page
    assert (tmp_path / "r" / "report.png").stat().st_size > 1000


def test_missing_run_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        load_run(tmp_path)
