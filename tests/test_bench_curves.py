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


def test_bad_runs_and_outputs_are_one_line(tmp_path, capsys):
    """A folder that is not a run, a metrics file with a broken line in the middle or none at all, and an --out in
    a file's place were tracebacks (and an empty metrics file gave an empty report with exit 0): a review,
    2026-12-05."""
    import pytest

    from bench.curves import main
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text('{"step": 1}\n{"ste\n{"step": 3}\n')
    good = tmp_path / "good"
    good.mkdir()
    (good / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5, "img_per_s": 3.0}\n')
    (tmp_path / "file").write_text("x")
    for argv, says in (([str(tmp_path / "nothing")], "is nothing a training run directory"),
                       ([str(run)], "no metrics records"), ([str(bad)], "line 2 is not JSON"),
                       ([str(good), "--out", str(tmp_path / "file" / "r.html")], "is not a folder")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and says.replace(
            "is nothing", f"is {tmp_path / 'nothing'}") in err[0], err


def test_a_metric_no_run_logged_is_refused_naming_the_logged_ones(tmp_path, capsys):
    """--metric eval/fd (the default: the demo's classifier metric) on runs that logged eval/fid drew an empty
    curve and exited 0 (a review of the documented commands, 2026-12-05)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5, "img_per_s": 3.0}\n{"step": 1, "eval/fid": 9.0}\n')
    with pytest.raises(SystemExit) as e:
        main([str(run), "--metric", "eval/fdd", "--out", str(tmp_path / "r.html")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--metric eval/fdd: no run logged it; they logged eval/fid" in err
    main([str(run), "--metric", "eval/fid", "--out", str(tmp_path / "r.html")])
