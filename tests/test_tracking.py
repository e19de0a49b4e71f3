"""Tracking and traces: the optional W&B logger (offline, for real, and its calls through a stand-in module),
its refusal when wandb is missing, the torch.profiler window, and the benchmark plots."""
import importlib.util
import json
import struct
import sys
import time
import types

import numpy as np
import pytest
import torch
from PIL import Image

from train import logging_utils
from train.logging_utils import LoggerUnavailable, MetricsLogger, ProfileWindow


def _wandb_records(path):
    """The records of an offline W&B run file (LevelDB-log framing: 7-byte header, 32 KiB blocks, records
    of crc32 / length / type FULL=1 FIRST=2 MIDDLE=3 LAST=4, each a wandb_internal_pb2.Record)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    if len(data) <= 7:
        return []
    assert data[:4] == b":W&B"
    pos, block, chunks, buf = 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += block - pos % block
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            chunks.append(chunk)
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind == 4:
            chunks.append(buf + chunk)
    records = []
    for c in chunks:
        r = wandb_internal_pb2.Record()
        r.ParseFromString(c)
        records.append(r)
    return records


def test_wandb_offline_run_holds_the_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    m = MetricsLogger(run_dir, tensorboard=False, progress_bar=False, wandb=True, wandb_config={"optim": {"lr": 3e-4}})
    for step in range(3):
        m.log(step, {"loss": 1.0 / (step + 1), "img_per_s": 10.0 * step, "kernels": "reference"})
    m.log(2, {"eval/class_acc": 0.5})
    m.close()
    run_id = (run_dir / "wandb_run_id").read_text()
    files = list((run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 1
    records, waited = _wandb_records(files[0]), 0.0
    while not any(r.WhichOneof("record_type") == "exit" for r in records) and waited < 60:
        time.sleep(0.25)  # wandb-core writes the offline file asynchronously; finish() returns before the flush
        waited += 0.25
        records = _wandb_records(files[0])
    key = lambda item: item.key or "/".join(item.nested_key)  # noqa: E731
    history = [{key(i): json.loads(i.value_json) for i in r.history.item} for r in records
               if r.WhichOneof("record_type") == "history"]
    got = [(h["_step"], h.get("loss"), h.get("eval/class_acc")) for h in history]
    assert got == [(0, 1.0, None), (1, 0.5, None), (2, 1 / 3, 0.5)]
    assert all("kernels" not in h for h in history)  # strings stay in metrics.jsonl
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.run_id == run_id and {key(i): json.loads(i.value_json) for i in run.config.update}["optim"] == {
        "lr": 3e-4}
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 1, 2, 2]


class _FakeRun:
    def __init__(self, calls):
        self.calls = calls

    def log(self, data, step=None):
        self.calls.append(("log", dict(data), step))

    def finish(self):
        self.calls.append(("finish",))


def _fake_wandb(calls):
    mod = types.ModuleType("wandb")
    mod.__spec__ = importlib.machinery.ModuleSpec("wandb", None)

    def init(**kw):
        calls.append(("init", kw))
        return _FakeRun(calls)
    mod.init = init
    mod.Settings = lambda **kw: ("Settings", kw)
    return mod


def test_wandb_calls_and_resume_keep_the_run_id(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(calls))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "wandb" else real(name, *a))
    for attempt in range(2):  # a resumed run (same directory) continues the same W&B run
        m = MetricsLogger(tmp_path / "run", tensorboard=False, progress_bar=False, wandb=True,
                          wandb_project="p", wandb_mode="online", wandb_config={"a": 1})
        m.log(7 + attempt, {"loss": 0.25, "skipped": True, "note": "x", "n": 3})
        m.close()
    inits = [c[1] for c in calls if c[0] == "init"]
    assert len(inits) == 2 and inits[0]["id"] == inits[1]["id"] == (tmp_path / "run" / "wandb_run_id").read_text()
    assert inits[0] | {"id": None} == {"project": "p", "name": "run", "id": None, "resume": "allow",
                                       "dir": str(tmp_path / "run"), "mode": "online", "config": {"a": 1},
                                       "settings": ("Settings", {"console": "off"})}
    assert [c for c in calls if c[0] != "init"] == [("log", {"loss": 0.25, "n": 3}, 7), ("finish",),
                                                    ("log", {"loss": 0.25, "n": 3}, 8), ("finish",)]


def test_wandb_requested_but_missing_is_refused_on_every_rank(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    for enabled in (True, False):
        with pytest.raises(LoggerUnavailable, match=r"logging\.wandb=true needs the wandb package.*pip install wandb"):
            MetricsLogger(tmp_path / f"r{enabled}", enabled=enabled, tensorboard=False, progress_bar=False, wandb=True)
        assert not (tmp_path / f"r{enabled}").exists()  # refused before anything was written
    MetricsLogger(tmp_path / "plain", tensorboard=False, progress_bar=False).close()  # off: no wandb needed


def _steps(window, n, model, opt):
    x = torch.randn(8, 16)
    for step in range(n):
        window.before_step(step)
        with torch.profiler.record_function(f"demo_step_{step}"):
            loss = model(x).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
        window.after_step(step)


def test_profile_window_writes_a_chrome_trace_of_the_window_only(tmp_path):
    model = torch.nn.Linear(16, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = ProfileWindow(start=2, num_steps=2, torch_trace=True, trace_dir=tmp_path / "traces", rank=3)
    _steps(w, 6, model, opt)
    trace = json.loads((tmp_path / "traces" / "trace_rank3.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"demo_step_2", "demo_step_3"} <= names and not names & {"demo_step_1", "demo_step_4"}
    assert any(n and n.startswith("aten::") for n in names)
    table = (tmp_path / "traces" / "ops_rank3.txt").read_text()
    assert "aten::" in table and "Self CPU" in table
    assert w.written == [tmp_path / "traces" / "trace_rank3.json", tmp_path / "traces" / "ops_rank3.txt"]


def test_profile_window_closed_early_and_off_by_default(tmp_path):
    model = torch.nn.Linear(16, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = ProfileWindow(start=1, num_steps=10, torch_trace=True, trace_dir=tmp_path / "a")
    _steps(w, 3, model, opt)  # the run ends inside the window
    assert not (tmp_path / "a").exists()
    w.close()
    names = {e.get("name") for e in json.loads((tmp_path / "a" / "trace_rank0.json").read_text())["traceEvents"]}
    assert {"demo_step_1", "demo_step_2"} <= names
    plain = ProfileWindow(start=0, num_steps=2, trace_dir=tmp_path / "b")  # torch_trace off: nothing written
    _steps(plain, 3, model, opt)
    plain.close()
    assert not (tmp_path / "b").exists()


@pytest.mark.gpu
def test_profile_window_cuda_memory_snapshot(tmp_path):
    import pickle

    model = torch.nn.Linear(64, 64).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = ProfileWindow(start=1, num_steps=2, torch_trace=True, trace_dir=tmp_path)
    x = torch.randn(32, 64, device="cuda")
    for step in range(4):
        w.before_step(step)
        model(x).square().mean().backward()
        opt.step()
        w.after_step(step)
    snap = pickle.loads((tmp_path / "memory_snapshot_rank0.pickle").read_bytes())
    assert snap["segments"] and any(t for t in snap["device_traces"])
    trace = json.loads((tmp_path / "trace_rank0.json").read_text())
    assert any(e.get("cat") == "kernel" for e in trace["traceEvents"])


def _png(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        arr = np.asarray(im.convert("L"))
    assert arr.shape[0] > 200 and arr.shape[1] > 300 and arr.std() > 5  # a drawn figure, not a blank canvas
    return arr


def test_throughput_plot_beside_its_json(tmp_path):
    from bench.plots import plot_throughput
    from bench.throughput import main as throughput_main

    tiny = json.dumps(dict(input_size=4, patch_size=1, in_channels=4, hidden_size=32, depth=1, num_heads=2,
                           num_classes=3))
    report = throughput_main(["--mode", "sample", "--model", tiny, "--batch-sizes", "2,3", "--backends", "fp32,bf16",
                              "--sample-steps", "3", "--scale-to", "6", "--no-decode", "--device", "cpu",
                              "--out", str(tmp_path / "t")])
    assert len(report["results"]) == 4 and not any("error" in r for r in report["results"])  # 2 backends x 2 sizes
    a = _png(plot_throughput(report, tmp_path / "from_dict.png"))
    b = _png(plot_throughput(tmp_path / "t.json", tmp_path / "from_file.png"))
    assert a.shape == b.shape
    failed = dict(report, results=report["results"] + [{"name": "x bs4 train", "backend": "x", "batch_size": 4,
                                                        "error": "CUDA out of memory"}])
    c = _png(plot_throughput(failed, tmp_path / "with_error.png"))
    assert c.shape == a.shape and not np.array_equal(a, c)  # the failure is written under the bars
    # a sampling entry the time budget never started has neither img/s nor an error (it crashed the plot on the H200)
    unstarted = dict(report, results=report["results"] + [{"name": "x fp8@128 sample", "mode": "sample",
                                                           "backend": "fp8@128", "batch_size": 128,
                                                           "skipped": "not started: 240 s budget used"}])
    _png(plot_throughput(unstarted, tmp_path / "with_unstarted.png"))
    with pytest.raises(ValueError, match="no results"):
        plot_throughput({"results": []}, tmp_path / "empty.png")
    with pytest.raises(ValueError, match="no successful results.*out of memory"):
        plot_throughput({"results": failed["results"][-1:]}, tmp_path / "only_error.png")


def test_ops_bench_writes_json_and_plot(tmp_path):
    from bench.ops_bench import main as ops_main
    from bench.plots import plot_ops

    results = ops_main(["--smoke", "--out", str(tmp_path / "ops")])
    assert json.loads((tmp_path / "ops.json").read_text()).keys() == results.keys()
    _png(tmp_path / "ops.png")
    broken = {"rms_norm": {"reference": {"error": "RuntimeError: x"}}}
    with pytest.raises(ValueError, match="no successful"):
        plot_ops(broken, tmp_path / "none.png")
    mixed = {**broken, "swiglu": {"reference": {"fwd_bwd_GBps": 1.0}, "triton": {"error": "BackendUnavailable"}}}
    _png(plot_ops(mixed, tmp_path / "mixed.png"))
    # an inference op times its forward only: plotted (labelled fwd only), not listed as missing
    inference = {"swiglu_fp8": {"reference": {"fwd_GBps": 1.0}, "triton": {"fwd_GBps": 2.0}}}
    _png(plot_ops(inference, tmp_path / "inference.png"))
    with pytest.raises(ValueError, match="no successful fwd_GBps"):
        plot_ops({"swiglu": {"reference": {"fwd_bwd_GBps": 1.0}}}, tmp_path / "x.png", metric="fwd_GBps")


def test_provenance_commit_prefers_the_suite_record(monkeypatch):
    """Results name the commit that ran: $SUITE_COMMIT (a lent machine's .git can be older than its tree), else
    git HEAD with +dirty when tracked files differ."""
    import subprocess

    from evaluation import provenance
    monkeypatch.delenv("VAVAE_COMMIT", raising=False)
    monkeypatch.setenv("SUITE_COMMIT", "abc123+dirty")
    assert provenance.commit() == "abc123+dirty"
    monkeypatch.setenv("SUITE_COMMIT", "unknown")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=provenance.REPO, capture_output=True,
                          text=True).stdout.strip()
    assert provenance.commit().removesuffix("+dirty") == head
