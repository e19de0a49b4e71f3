"""One result record: every bench command that writes a result writes evaluation.provenance.environment()'s block
under "environment" (the card, the versions, the commit as a real sha, what the kernels ran), and nothing else in
bench/ or evaluation/ builds its own commit / versions record.

Each command runs at a tiny CPU size; where its measurement is a whole trainer run (fp8_compare,
vae_precision_compare, precision_guard) the measuring function is replaced by canned curves, so what is tested is
the record the command writes. The trainer-timing commands (throughput, compare, vae_step, the GPU suite) are
checked in their own test files with ENVIRONMENT_KEYS."""
import ast
import json
import re
import subprocess
from pathlib import Path

import pytest
import torch

from evaluation import provenance
from evaluation.provenance import ENVIRONMENT_KEYS

REPO = Path(__file__).resolve().parents[1]
TINY_DIT = dict(input_size=4, patch_size=1, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=3)


@pytest.fixture(autouse=True)
def _commit_from_git(monkeypatch):
    """The commit comes from git here (the suite's variables would override it)."""
    monkeypatch.delenv("VAVAE_COMMIT", raising=False)
    monkeypatch.delenv("SUITE_COMMIT", raising=False)


def _head():
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip()


def check_environment(block):
    """The common block, complete, naming this checkout's commit and a CPU card."""
    assert isinstance(block, dict) and tuple(block) == ENVIRONMENT_KEYS, block
    assert re.fullmatch(r"[0-9a-f]{40}", block["commit"]) and block["commit"] == _head(), block["commit"]
    assert isinstance(block["dirty"], bool)
    assert block["card"].startswith("cpu: ")
    assert block["versions"]["torch"] == torch.__version__ and block["versions"]["python"]
    assert block["kernels_requested"] and isinstance(block["kernels_ran"], dict)
    assert block["kernels_ran"] == block["kernels"]["ops"]


def test_environment_block_itself():
    check_environment(provenance.environment("cpu"))


def test_sample_speed_record():
    from bench.sample_speed import measure_sampling
    res = measure_sampling("custom", ["fp32@2"], steps=3, scale_to=6, decode=False, log=None,
                           input_size=4, in_channels=4, num_classes=3,
                           model_kwargs=dict(hidden_size=32, depth=1, num_heads=2, patch_size=1))
    check_environment(res["environment"])
    assert res["environment"]["kernels_ran"]  # recorded after the entry ran: the ops it used
    assert "env" not in res


def test_throughput_sample_mode_record(tmp_path):
    from bench.throughput import main
    main(["--mode", "sample", "--model", json.dumps(TINY_DIT), "--plan", "fp32@2", "--sample-steps", "3",
          "--no-decode", "--device", "cpu", "--out", str(tmp_path / "t")])
    saved = json.loads((tmp_path / "t.json").read_text())
    check_environment(saved["environment"])
    assert "sample_environment" not in saved  # one block, not two
    assert saved["environment"]["card"] in (tmp_path / "t.md").read_text()


def test_profile_step_record(tmp_path):
    from bench.profile_step import main
    main(["--smoke", "--sections", "attention,gemm", "--out", str(tmp_path)])
    check_environment(json.loads((tmp_path / "profile_step.json").read_text())["environment"])


def test_loader_bench_record(capsys):
    from bench.loader_bench import main
    res = main(["--num-samples", "64", "--shard-size", "32", "--batch-size", "16", "--epochs", "1",
                "--reference-reads", "16"])
    check_environment(res["environment"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["environment"]["commit"] == _head()
    with pytest.raises(SystemExit) as e:  # a folder without shards was a traceback
        main(["--dir", "/nonexistent/latents"])
    assert e.value.code == 2 and "no *.safetensors latent shards in /nonexistent/latents" in capsys.readouterr().err


def test_ops_bench_record(tmp_path):
    from bench.ops_bench import main
    main(["--smoke", "--ops", "rms_norm", "--out", str(tmp_path / "ops")])
    check_environment(json.loads((tmp_path / "ops.json").read_text())["environment"])


def test_fp8_compare_record(tmp_path, monkeypatch):
    from bench import fp8_compare
    monkeypatch.setattr(fp8_compare, "run_one", lambda config, out, steps, over: (
        [1.0 / (s + 1) for s in range(steps)], "torchao (canned)"))
    assert fp8_compare.main(["--steps", "8", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "fp8_compare.json").read_text())
    check_environment(r["environment"])
    assert r["drift_window"] == 100 and r["drift_last"] is None  # 8 steps: no window yet


def test_fp8_compare_drift_fields():
    from bench.fp8_compare import compare
    bf16 = [2.0 - s / 1000 for s in range(300)]
    r = compare(bf16, [v * (1 + s / 30000) for s, v in enumerate(bf16)], rtol=0.05)  # FP8 drifting up
    assert 0 < r["drift_min"] < r["drift_last"] == r["drift_max"] < 0.01


def test_fp8_compare_window_ratio():
    """The plot's drift panel: FP8's mean over the last `window` steps over bf16's, minus 1; NaN before a window."""
    import math

    from bench.fp8_compare import window_ratio
    bf16 = [1.0 + (s % 3) for s in range(10)]
    r = window_ratio(bf16, [1.1 * v for v in bf16], window=4)
    assert len(r) == 10 and all(math.isnan(v) for v in r[:3]) and all(abs(v - 0.1) < 1e-12 for v in r[3:])
    r = window_ratio(bf16, bf16[:5] + [v + 1 for v in bf16[5:]], window=4)  # a step up at step 6
    assert r[3] == r[4] == 0 and r[5] > 0 and r[8] > r[5]
    short = window_ratio(bf16[:2], bf16[:2], window=4)  # fewer steps than a window: nothing to plot
    assert len(short) == 2 and all(math.isnan(v) for v in short)


def test_vae_precision_compare_record(tmp_path, monkeypatch):
    from bench import vae_precision_compare
    curves = {m: [1.0 / (s + 1) for s in range(6)] for m in ("rec", "vf", "loss")}
    monkeypatch.setattr(vae_precision_compare, "run_one", lambda config, out, steps, over: curves)
    assert vae_precision_compare.main(["--steps", "6", "--out", str(tmp_path)]) == 0
    check_environment(json.loads((tmp_path / "precision_compare.json").read_text())["environment"])


def test_precision_guard_record(tmp_path, monkeypatch):
    from bench import precision_guard
    monkeypatch.setattr(precision_guard, "fixture_rows", lambda *a, **k: [])
    monkeypatch.setattr(precision_guard, "trained_model_rows", lambda *a, **k: {})
    precision_guard.main([str(tmp_path), "--json", str(tmp_path / "guard.json")])
    check_environment(json.loads((tmp_path / "guard.json").read_text())["environment"])


def test_generate_run_record(tmp_path):
    """evaluation.generate records the block once per (re)start, beside the settings it compares."""
    from evaluation.generate import generate
    from modeling.lightningdit import LightningDiT
    from modeling.vavae import AutoencoderKL
    torch.manual_seed(0)
    dit = LightningDiT(**TINY_DIT)
    vae = AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), resolution=8, z_channels=4,
                        embed_dim=4)
    generate(dit, vae, tmp_path / "g.npz", num_samples=2, batch_size=2, progress=False)
    runs = [json.loads(l) for l in (tmp_path / "g.chunks" / "runs_rank00000.jsonl").read_text().splitlines()]
    assert len(runs) == 1
    check_environment(runs[0]["environment"])


# ----------------------------------------------------------------------------- nobody builds their own

SCANNED = ("bench", "evaluation")
PROVENANCE = REPO / "evaluation" / "provenance.py"
RECORD_KEYS = {"commit", "torch", "versions", "card"}  # keys of the common block a private record would repeat
# get_device_name outside provenance only to look a card's peak TFLOP/s up, never to record it
DEVICE_NAME_ALLOWED = {("bench/throughput.py", "device_peak_tflops")}


def own_records(root=REPO):
    """Every place under SCANNED (provenance.py aside) that builds an environment record of its own: a dict
    literal with a commit / torch / versions / card key, torch.__version__ (or any __version__), a call of
    provenance.commit / versions / card, or get_device_name outside DEVICE_NAME_ALLOWED."""
    found = []
    for pkg in SCANNED:
        for path in sorted((root / pkg).rglob("*.py")):
            if path.resolve() == (root / PROVENANCE.relative_to(REPO)).resolve():
                continue
            rel = path.relative_to(root).as_posix()
            tree = ast.parse(path.read_text(), rel)
            func_of = {}
            for fn in ast.walk(tree):
                if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    for node in ast.walk(fn):
                        func_of.setdefault(id(node), fn.name)  # the outermost function holding the node
            for node in ast.walk(tree):
                where = f"{rel}:{getattr(node, 'lineno', '?')}"
                if isinstance(node, ast.Dict):
                    keys = {k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}
                    if keys & RECORD_KEYS:
                        found.append(f"{where} dict with {sorted(keys & RECORD_KEYS)}")
                elif isinstance(node, ast.Call):
                    name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                    if name in ("commit", "versions", "card"):
                        found.append(f"{where} calls {name}()")
                    if name == "get_device_name" and (rel, func_of.get(id(node))) not in DEVICE_NAME_ALLOWED:
                        found.append(f"{where} calls get_device_name() in {func_of.get(id(node))}")
                elif isinstance(node, ast.Attribute) and node.attr == "__version__":
                    found.append(f"{where} reads {ast.unparse(node)}")
                elif isinstance(node, ast.ImportFrom) and node.module == "evaluation.provenance":
                    names = {a.name for a in node.names} - {"environment", "ENVIRONMENT_KEYS"}
                    if names:
                        found.append(f"{where} imports {sorted(names)} from evaluation.provenance")
    return found


def test_no_other_environment_builder():
    assert own_records() == [], "build the record with evaluation.provenance.environment():\n" + "\n".join(
        own_records())


def test_the_scan_finds_a_private_record(tmp_path):
    """The scan above can fail: a planted builder is reported, each way it can be written."""
    for pkg in SCANNED:
        (tmp_path / pkg).mkdir()
    (tmp_path / "bench" / "x.py").write_text(
        "import torch\nfrom evaluation.provenance import commit\n"
        "def env():\n    return {'commit': commit(), 'torch': torch.__version__,\n"
        "            'device': torch.cuda.get_device_name()}\n")
    found = own_records(tmp_path)
    assert any("bench/x.py:2 imports ['commit']" in f for f in found), found
    assert any("dict with ['commit', 'torch']" in f for f in found)
    assert any("calls commit()" in f for f in found) and any("torch.__version__" in f for f in found)
    assert any("get_device_name() in env" in f for f in found)
