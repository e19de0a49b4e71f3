"""`make demo` is deterministic: two runs from scratch at the same thread count write the same summary.json
numbers (issue 22), at a reduced size; a finished stage's unreadable file is one line, not a traceback."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# every stage, small: 200 digits, 8 VA-VAE steps (its stage's setup is ~5 s of the ~7), 10 DiT steps with two
# evaluations; one thread, the demo's default on the 2-core machine (modeling/threads.py)
SMALL = ["--per-class", "20", "--vae-steps", "8", "--dit-steps", "10", "--eval-every", "5", "--eval-per-class", "2",
         "--sample-steps", "5", "--classifier-steps", "30", "--grid-per-class", "2", "--threads", "1"]
REPRODUCIBLE = ("headline", "per_class_sample_accuracy", "reconstruction")


def demo(out, *extra, timeout=900):
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # (TORCH_EXTENSIONS_DIR: conftest's)
    env.pop("VAVAE_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "examples.demo", "--out", str(out), *SMALL, *extra], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)


def losses(run_dir):
    """Every logged loss value of a trainer's metrics.jsonl, by step."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], {k: v for k, v in r.items() if k in ("loss", "rec", "kl", "vf", "nll", "mse", "cos")})
            for r in rows if "loss" in r or "rec" in r]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    runs = []
    for name in ("a", "b"):
        res = demo(root / name, "--fresh")
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        runs.append((root / name, res.stdout))
    return runs


def test_two_runs_from_scratch_write_the_same_numbers(two_runs):
    (a, _), (b, _) = two_runs
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    for key in REPRODUCIBLE:
        assert sa[key] == sb[key], key
    # the numbers are real ones: accuracies in [0, 1], a PSNR, every class
    acc = [v for k, v in sa["headline"].items() if k.startswith("classifier accuracy")]
    assert len(acc) == 3 and all(0.0 <= v <= 1.0 for v in acc)
    assert len(sa["per_class_sample_accuracy"]) == 10 and sa["reconstruction"]["psnr"] > 5
    # the whole training, not only its end: every logged loss of both trainers
    for stage in ("vae", "dit"):
        la, lb = losses(a / stage), losses(b / stage)
        assert la and la == lb, stage
    # what the comparison is conditional on is recorded
    assert sa["threads"]["intra_op"] == sb["threads"]["intra_op"] == 1 and sa["threads"]["inter_op"] == 1


def test_stage_times_are_printed_and_recorded(two_runs):
    run, stdout = two_runs[0]
    summary = json.loads((run / "summary.json").read_text())
    stages = ["data", "vae", "latents", "classifier", "dit", "report"]
    assert list(summary["stage_seconds"]) == stages and list(summary["stage_cpu_seconds"]) == stages
    assert all(v >= 0 for v in summary["stage_seconds"].values())
    assert summary["total_seconds"] >= sum(summary["stage_seconds"].values()) - 1
    assert summary["machine"]["cores"] >= 1 and len(summary["load_average"]["start"]) == 3
    assert "stage seconds: {'data': " in stdout and "1 threads" in stdout
    for name in stages:
        assert f"({name}: " in stdout


def test_an_unreadable_stage_file_is_one_line(two_runs):
    run = two_runs[1][0]
    stats = run / "latents" / "latents_stats.pt"
    good = stats.read_bytes()
    try:
        stats.write_bytes(b"not a checkpoint")
        res = demo(run)
        assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
        errors = [line for line in res.stderr.splitlines() if line.startswith("examples.demo: error:")]
        assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
        assert str(stats) in errors[0] and "--fresh" in errors[0]
        # a file that would unpickle a class (code could run) is refused the same way
        torch.save({"mean": Path("x")}, stats)
        res = demo(run)
        assert res.returncode == 2 and "Traceback" not in res.stderr and str(stats) in res.stderr
    finally:
        stats.write_bytes(good)


def test_other_settings_in_the_same_folder_are_refused_in_one_line(two_runs):
    run = two_runs[1][0]
    res = demo(run, "--seed", "1")
    assert res.returncode == 2 and "other settings" in res.stderr and "Traceback" not in res.stderr
    assert "seed: recorded 0, now 1" in res.stderr  # each difference named, as generate and extract name them
