"""modeling.progress: a tqdm bar on a terminal; in a log file (a SLURM job) plain lines, at most one per interval
and one at the end that says whether the work finished; nothing where progress is off."""
import io

from modeling import progress as prog


def test_log_lines_at_most_every_interval_and_at_the_end(monkeypatch):
    clock = iter([0.0, 10.0, 31.0, 40.0, 62.0, 62.0]).__next__
    monkeypatch.setattr(prog.time, "monotonic", clock)
    out = io.StringIO()
    p = prog.LogProgress(100, "sampling (rank 0)", "img", every_s=30, stream=out)  # t0 = last = 0
    p.update(10)  # t=10: within the interval, no line
    p.update(20)  # t=31: a line
    p.set_postfix(loss="0.5")
    p.update(30)  # t=40: within the interval since 31
    p.update(40)  # t=62: the total reached: no interval line, the end line says it
    p.close()  # t=62
    p.close()  # once
    assert out.getvalue().splitlines() == [
        "sampling (rank 0): 30/100 img (30%), 1.0 img/s, eta 1m12s",  # 70 left at 30/31 a second
        "sampling (rank 0): 100/100 img (100%), 1.6 img/s, done in 1m02s, loss 0.5"]


def test_a_stopped_run_says_so_and_an_unknown_total_has_no_eta(monkeypatch):
    monkeypatch.setattr(prog.time, "monotonic", lambda: 5.0)
    out = io.StringIO()
    p = prog.LogProgress(8, "extract", "img", stream=out)
    p.update(4)
    p.close()
    q = prog.LogProgress(None, "scan", "img", every_s=0, stream=out)
    q.close()  # nothing counted: no line
    assert out.getvalue().splitlines() == ["extract: 4/8 img (50%), 0.0 img/s, stopped after 0m00s"]
    assert prog.format_duration(3725) == "1h02m" and prog.format_duration(59.6) == "1m00s"


def test_the_kind_follows_the_terminal_and_the_switch(monkeypatch):
    import sys

    from tqdm import tqdm
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert type(prog.progress(3, "x", "img")) is prog.LogProgress
    off = prog.progress(3, "x", "img", enabled=False)
    off.update(3)
    off.close()
    assert type(off) is prog._Off and off.n == 3
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    bar = prog.progress(3, "x", "img", disable=True)
    assert isinstance(bar, tqdm)
    bar.close()


def test_the_sampler_and_the_metrics_bars_are_lines_in_a_log(capsys):
    """sample_images, tokenizer_metrics and the precision/recall of evaluation.fid drew tqdm's carriage-return bars
    into a log file (a review of the documented commands, 2026-12-05); they go through `progress` now."""
    import numpy as np

    from evaluation.precision_recall import precision_recall
    assert list(prog.tracked(range(3), "sampling", "step")) == [0, 1, 2]
    assert list(prog.tracked(range(3), "off", enabled=False)) == [0, 1, 2]
    feats = np.random.default_rng(0).standard_normal((12, 4))
    precision_recall(feats, feats, row_batch=4, col_batch=4, progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err and "sampling: 3/3 step (100%)" in err and "precision/recall: 3/3 block" in err
    assert "off" not in err
