"""The GPU suite's first run must not be its first run: run every section on the CPU with tiny shapes."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench import processes
from evaluation.provenance import ENVIRONMENT_KEYS

REPO = Path(__file__).resolve().parents[1]


def test_gpu_suite_cpu_smoke(tmp_path):
    out = tmp_path / "out"  # the inductor cache stays outside $OUT, as on the GPU machine
    env = {**os.environ, "TRITON_INTERPRET": "1", "OUT": str(out), "PYTHONPATH": str(REPO), "PYTHON": sys.executable,
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    res = subprocess.run(["bash", "bench/gpu_suite.sh", "--cpu-smoke", "--budget", "1000"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    r = json.loads((out / "gpu_suite.json").read_text())
    sec = r["sections"]
    assert not r["errors"], r["errors"]
    env = r["environment"]  # the common block (evaluation.provenance.environment), refreshed at the end
    assert tuple(env) == ENVIRONMENT_KEYS and env["card"].startswith("cpu") and env["kernels"]["cuda_ext"] != "built"
    assert re.fullmatch(r"[0-9a-f]{40}", env["commit"]) and sec["ceilings"]["copy_GBps"] > 0
    assert env["kernels_ran"] and "nsys" in r["environment_extra"]  # the ops section ran in the suite's process
    assert sec["gpu_tests"]["returncode"] == 0 and sec["gpu_tests"]["failures"] == []
    assert sec["activation_memory"]["bf16"]["per_token"] > 0  # part A's count of what a compiled block keeps
    assert sec["parity_fp32"]["reference"]["returncode"] == 0
    for op in ("rms_norm", "norm_modulate", "gated_residual_norm_modulate", "gated_residual", "swiglu", "rope_qk"):
        for impl in ("reference", "compiled_reference", "triton"):
            row = sec["ops"][op][impl]
            assert "error" not in row, (op, impl, row)
            assert row["rel_err_vs_fp32"] < 2e-2 and row["fwd_GBps"] > 0
        assert sec["ops"][op]["triton"]["ran"] == "triton"
    mlp = sec["ops"]["linear_swiglu"]  # the fused w12 + SwiGLU kernel against cuBLAS + SwiGLU (eager, compiled)
    for impl in ("reference", "compiled_reference", "triton"):
        assert mlp[impl]["fwd_ms"] > 0 and mlp[impl]["rel_err_vs_fp32"] < 2e-2, (impl, mlp[impl])
    for op in ("quantize_rows_fp8", "swiglu_fp8"):  # the sampler's FP8 activation quantization: forward only
        for impl in ("reference", "compiled_reference", "triton"):
            row = sec["ops"][op][impl]
            # e4m3 keeps 3 mantissa bits: elements differ by a rounding step (<= 6%) where bf16 inputs round apart
            assert "error" not in row and row["fwd_GBps"] > 0 and row["rel_err_vs_fp32"] < 0.1, (op, impl, row)
        assert sec["ops"][op]["triton"]["ran"] == "triton" and "fwd_x_compiled_reference" in sec["ops"][op]["triton"]
    # training numbers come from the trainer: bench.throughput's Trainer.train_step cases and the CLI itself
    head, ref = sec["train auto+compiled bs256"], sec["train reference+compiled bs256"]
    fp8 = sec["train auto+compiled+fp8mm bs256"]  # FP8 training through our FP8TrainingLinear, second in line
    for row in (head, fp8, ref):
        assert row["img_per_s"] > 0 and row["batch_size"] == 2 and row["compile"] == "blocks"
        assert row["precision"] == "bf16" and row["zero_stage"] == 0
    assert "scaled_mm" in fp8["fp8"] and head["fp8"] == "off"
    assert ref["kernels_ran"] and set(ref["kernels_ran"].values()) <= {"reference", "reference-sdpa"}  # (an empty
    # record passed the subset check)
    assert ref["environment"]["kernels_requested"] == "reference"  # each case's row: its own process's block
    assert head["profile"]["ms_per_step_by_category"]  # the headline case carries its profile
    # each profiled case read against the card's ceilings (bench.shortfall): the FP8 case's matmul floor at FP8's
    short = sec["shortfall"]["train auto+compiled bs256"]
    assert short["rows"] and short["needed_ms"] == pytest.approx(short["step_ms"] - 1000 * 2 / 750)
    assert sec["ceilings"]["fp8_matmul_TFLOPs"] > 0
    assert "FP8" in next(r for r in sec["shortfall"]["train auto+compiled+fp8mm bs256"]["rows"]
                         if r["category"] == "matmul")["floor"]
    assert "shortfall train auto+compiled bs256: step" in res.stdout
    cli = sec["trainer_cli_bs256"]
    assert cli["img_per_s_last_window"] > 0 and cli["peak_rss_gib"] if "peak_rss_gib" in cli else True
    assert "train.train_dit" in cli["command"] and not [w for w in cli["warnings"] if "autocast" in w]
    assert "trainer CLI" in res.stdout  # the short table comes last
    assert re.search(r"^rms_norm +triton +fwd_bwd .* vs inductor .*x", res.stdout, re.M), res.stdout[-3000:]
    assert "under torch.compile, this run would change kernels/compiled_choices.json: " in res.stdout
    # what a lent machine returns: at most 8 files; the rest travel in one archive
    files = [f for f in out.rglob("*") if f.is_file()]
    assert len(files) <= 8, files


def test_pack_out_keeps_the_results_and_archives_the_rest(tmp_path):
    import tarfile

    from bench.gpu_suite import PACK_NAME, pack_out
    for name in ("gpu_suite.json", "sample_throughput.json", "a.log", "b.log", "trace/x.json", "trace/y.json"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(name)
    assert pack_out(tmp_path, limit=8) == []  # six files: nothing to do
    packed = pack_out(tmp_path, limit=3)
    assert sorted(packed) == ["a.log", "b.log", "trace/x.json", "trace/y.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([PACK_NAME, "gpu_suite.json", "sample_throughput.json"])
    with tarfile.open(tmp_path / PACK_NAME) as t:
        assert sorted(t.getnames()) == packed and t.extractfile("trace/y.json").read() == b"trace/y.json"


def test_files_too_large_to_come_back_are_set_aside_before_packing(tmp_path):
    """A file over the lent machine's 16 MiB return limit (a checkpoint, a trace) is moved out of $OUT and named,
    not gzipped for minutes into an archive that could not come back either, nor deleted (a run on one's own
    machine keeps it: <out>.large); gpu_suite.json always stays."""
    from bench.gpu_suite import set_aside_large
    out = tmp_path / "out"
    (out / "run" / "ckpt").mkdir(parents=True)
    (out / "run" / "ckpt" / "model.pt").write_bytes(b"\1" * 3000)
    (out / "run" / "metrics.jsonl").write_text("{}")
    (out / "gpu_suite.json").write_bytes(b" " * 3000)
    assert set_aside_large(out, limit=2048) == ["run/ckpt/model.pt (0 MiB)"]
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == \
        ["gpu_suite.json", "run/metrics.jsonl"]
    assert (tmp_path / "out.large" / "run" / "ckpt" / "model.pt").read_bytes() == b"\1" * 3000


def test_a_section_never_outlives_the_shells_limit(monkeypatch, tmp_path):
    """gpu_suite.sh kills the suite at its limit (SUITE_DEADLINE_S): each subprocess's own timeout is cut to what
    is left less the packing margin, and no section starts with less than MIN_SECTION_S left, so the suite still
    writes its JSON, packs and prints (2026-12-05 review: vae_step or sampling could start at ~350 s with a 240-420 s
    timeout under a 450 s limit)."""
    from bench import gpu_suite as gs
    monkeypatch.setattr(gs, "DEADLINE_S", None)
    assert gs.within_deadline(420) == 420 and gs.seconds_left() is None
    monkeypatch.setattr(gs, "DEADLINE_S", 450.0)
    monkeypatch.setattr(gs, "T0", gs.time.time() - 350)  # 350 s into a 450 s call: 70 s left before the margin
    assert 69 <= gs.within_deadline(420) <= 70 and gs.within_deadline(30) == 30
    monkeypatch.setattr(gs, "T0", gs.time.time() - 410)  # 10 s left
    s = gs.Suite(str(tmp_path), budget=1000, smoke=True)
    assert s.section("vae_step", lambda: {"ran": True}) is None and s.result["skipped_for_time"] == ["vae_step"]
    assert s.section("shortfall", lambda: {"rows": []}) == {"rows": []}  # arithmetic: runs regardless


def _running(pid: int) -> bool:
    """Alive after 5 s and not a zombie (a container's init may never reap an orphan). A killed process closes its
    pipes before it turns zombie: it may still read as running for a moment after the caller's wait returned."""
    import time
    for _ in range(50):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in "ZX":
                    return False
        except FileNotFoundError:
            return False
        time.sleep(0.1)
    return True


def test_a_timed_out_section_ends_with_everything_it_started(monkeypatch, tmp_path):
    """A section's timeout ends its whole process tree: subprocess.run's killed only the shell of a `sh -c` command,
    and the benchmark under it went on holding the GPU and writing into $OUT while the suite packed it (a review,
    2026-12-05). What the command printed before comes back with the timeout."""
    from bench import gpu_suite as gs
    monkeypatch.setattr(gs, "DEADLINE_S", None)
    pid = tmp_path / "pid"
    with pytest.raises(subprocess.TimeoutExpired) as e:  # the section's command: a shell and a benchmark under it
        gs.command("probe", f"echo started; sleep 60 & echo $! > {pid}; wait", timeout=2)
    assert pid.exists() and not _running(int(pid.read_text())), "the command's own child outlived its timeout"
    assert "started" in e.value.output
    inner = tmp_path / "inner"  # two levels down (a python benchmark's compile workers, a launcher's ranks)
    with pytest.raises(subprocess.TimeoutExpired):
        processes.run(["bash", "-c", f"bash -c 'sleep 60 & echo $! > {inner}; wait' & wait"], timeout=2)
    assert inner.exists() and not _running(int(inner.read_text()))
    assert processes.run([sys.executable, "-c", "print(6 * 7)"], timeout=60).stdout == "42\n"
    # a process that left the tree (its parent exited: re-parented) and holds the pipes does not hold the caller
    import time
    t = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired) as e:
        processes.run(["sh", "-c", "echo before; (sleep 20 &); sleep 30"], timeout=1)
    assert time.monotonic() - t < 1 + processes.AFTER_KILL_S + 3 and "before" in e.value.output


def test_sampling_plan_parses_and_fp32_comes_first():
    """The suite's sampling entries are only ever parsed on the GPU machine: parse them here. fp32 runs first, so
    every later entry gets its error against fp32 on the same noise."""
    sys.path.insert(0, str(REPO))
    from bench.sample_speed import parse_spec
    from bench.gpu_suite import EXTRA_COMMANDS, SAMPLING_PLAN
    parsed = [parse_spec(s) for s in SAMPLING_PLAN]
    assert parsed[0].sampling == dict(precision="fp32") and parsed[0].batch == 64
    assert {e.sampling["precision"] for e in parsed} == {"fp32", "bf16-weights", "fp8"}
    assert ",".join(SAMPLING_PLAN) in EXTRA_COMMANDS["sampling"][0]
    # the FP8 activation quantization side by side in one run, early in the budget: our kernels, then torch ops
    assert [e.sampling.get("fp8_quant") for e in parsed[2:4]] == [None, "inline"]
    assert {k: v for k, v in parsed[3].sampling.items() if k != "fp8_quant"} == parsed[2].sampling
    assert parsed[2].batch == parsed[3].batch and parsed[2].sampling["precision"] == "fp8"
    # the accuracy guard, then the VA-VAE step (its first profile: issue 18.5), then sampling
    assert list(EXTRA_COMMANDS)[:3] == ["precision_guard", "vae_step", "sampling"]


def test_gpu_suite_part_c_fp8_curve_smoke(tmp_path):
    """Part C (FP8 training's loss curve against bf16, per seed, with the seeds' spread as the tolerance) through
    the same script on the CPU: two tiny seed pairs through bench.fp8_compare (our FP8 linear, emulated), the
    verdict and the table."""
    out = tmp_path / "out"
    env = {**os.environ, "TRITON_INTERPRET": "1", "OUT": str(out), "PYTHONPATH": str(REPO), "PYTHON": sys.executable,
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    res = subprocess.run(["bash", "bench/gpu_suite.sh", "--cpu-smoke", "--part", "C", "--budget", "1000"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    r = json.loads((out / "gpu_suite.json").read_text())
    assert not r["errors"], r["errors"]
    sec = r["sections"]
    for seed in (0, 1):
        run = sec[f"fp8_curve_seed{seed}"]
        assert run["steps"] == 3 and "scaled_mm (ours" in run["fp8"] and run["bf16_tail_mean"] > 0
        assert run["data"] == "digits (16 px, space-to-depth 4)" and "--data digits" in run["command"]
    import tarfile  # the plots travel in the archive (a lent machine returns at most 8 files)
    packed = tarfile.open(out / "more_results.tar.gz").getnames()
    assert {"fp8_compare_seed0/fp8_compare.png", "fp8_compare_seed1/fp8_compare.png"} <= set(packed), packed
    # no run's checkpoint in $OUT (B/1's is 2.5 GB a run on the GPU: packing it took minutes and it could not come
    # back): fp8_compare writes them to a temporary folder
    assert not any("ckpt" in p or p.endswith((".pt", ".safetensors")) for p in packed), packed
    assert r["left_out"] == []
    v = sec["fp8_curve"]
    assert v["seed_spread"] >= 0 and set(v["tail_rel_diff"]) == {"fp8_curve_seed0", "fp8_curve_seed1"}
    assert isinstance(v["within_spread"], bool) and "FP8 vs bf16 against the seed spread" in res.stdout
    assert "ceilings" not in sec and "trainer_cli_bs256" not in sec  # part C alone


def test_suite_only_runs_the_named_sections(tmp_path):
    """--only: a short call runs what it names (a name, or its first words: 'train' is every trainer case) and
    nothing else; the rest is neither run nor counted as skipped for time."""
    from bench.gpu_suite import Suite
    s = Suite(str(tmp_path), budget=1000, smoke=True)
    s.only = ["gpu_tests", "train"]
    ran = []
    for name in ("build_ext", "gpu_tests", "parity_fp32", "train auto+compiled bs256", "trainer_cli_bs256",
                 "vae_step"):
        s.section(name, lambda n=name: ran.append(n) or {"ok": n})
    # the extension's build is always waited for (the tests would race it)
    assert ran == ["build_ext", "gpu_tests", "train auto+compiled bs256"] and s.result["skipped_for_time"] == []
    assert set(s.result["sections"]) == {"build_ext", "gpu_tests", "train auto+compiled bs256"}
    s.only = None
    s.section("vae_step", lambda: ran.append("vae_step"))
    assert ran[-1] == "vae_step"


def test_shortfall_runs_under_any_only_and_after_the_budget(tmp_path):
    """The shortfall table is arithmetic on the cases that ran: a short `--only train` call gets it, and so does a
    part A whose time budget stopped the later cases; a device section after the budget does not start."""
    from bench.gpu_suite import Suite
    s = Suite(str(tmp_path), budget=-1, smoke=True)  # the budget already spent
    s.only = ["train"]
    assert s.section("shortfall", lambda: {"rows": []}) == {"rows": []}
    assert s.section("train auto+compiled bs256", lambda: {"img_per_s": 1.0}) is None
    assert s.result["skipped_for_time"] == ["train auto+compiled bs256"]


def test_gpu_tests_keep_what_ran_when_they_time_out(monkeypatch):
    """The GPU tests' section past its limit still says which tests ran and which failed (their -v lines), instead
    of losing the section to the timeout."""
    from bench import gpu_suite

    def timeout(cmd, timeout, **kw):  # what bench.processes.run raises: the output as text
        assert "-v" in cmd and timeout == 300
        raise subprocess.TimeoutExpired(cmd, 300, output="tests/test_kernels_gpu.py::test_a PASSED\n"
                                                         "FAILED tests/test_kernels_gpu.py::test_b - assert 0\n")
    monkeypatch.setattr(processes, "run", timeout)
    r = gpu_suite.gpu_tests(smoke=False)
    assert r["returncode"] == "timeout after 300 s"
    assert r["failures"] == ["FAILED tests/test_kernels_gpu.py::test_b - assert 0"] and "test_a PASSED" in r["tail"]


def test_headline_batch_fits_the_card():
    """An 80 GB H100 runs the headline cases, the authors' step and the CLI at 128 (at 256 the largest case peaked
    at 96.5 GiB on the H200: every bs256 case would compile and then die out of memory); an H200 keeps 256; a
    requested batch wins; the case list keeps its order with each (spec, batch) once."""
    from bench.gpu_suite import TRAIN_CASES, headline_batch, predicted_peak_gib, train_cases
    assert headline_batch(139.8)[0] == 256  # H200 (environment_extra on 2026-12-04)
    assert headline_batch(79.2)[0] == 128  # H100 80 GB
    assert headline_batch(48.0)[0] == 64 and headline_batch(8.0)[0] == 16
    assert headline_batch(None) == (256, "no CUDA device: issue 18's batch")
    assert headline_batch(79.2, requested=256) == (256, "--headline-batch")
    assert predicted_peak_gib(256) == 96.5 and 50 < predicted_peak_gib(128) < 60  # 2026-11-26: 55.9-56.2 at 128
    assert train_cases(256) == TRAIN_CASES
    h100 = train_cases(128)
    assert h100[:3] == [("auto+compiled", 128), ("auto+compiled+fp8mm", 128), ("auto+compiled+ropefused", 128)]
    assert len(h100) == len(set(h100)) and {b for _, b in h100} == {128}
    assert [s for s, _ in h100] == list(dict.fromkeys(s for s, _ in TRAIN_CASES))  # each spec once, in order


def test_the_suite_runs_every_gpu_test_file():
    """A `gpu`-marked test outside the suite's files runs nowhere (CI skips them): test_tracking.py's did (a
    review, 2026-12-05)."""
    from bench.gpu_suite import GPU_TEST_FILES
    marked = {f"tests/{p.name}" for p in (REPO / "tests").glob("test_*.py")
              if re.search(r"pytest\.mark\.gpu\b", p.read_text())}
    assert marked == set(GPU_TEST_FILES) and all((REPO / f).is_file() for f in GPU_TEST_FILES)


def test_the_compile_section_runs_only_by_name():
    """vae_step_compile (minutes of compiling) ran in a plain `--part B` after fp8_gemm, where the docs say it runs
    by name only (a review, 2026-12-05)."""
    from bench import gpu_suite as gs
    s = gs.Suite(str(REPO / "bench/results/tmp_never_written"), budget=1000, smoke=True)
    assert s.selected("vae_step") and not s.selected("vae_step_compile")
    s.only = ["vae_step_compile"]
    assert s.selected("vae_step_compile") and not s.selected("vae_step") and s.selected("build_ext")
