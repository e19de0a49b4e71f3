"""The GPU suite's first run must not be its first run: run every section on the CPU with tiny shapes."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_suite_cpu_smoke(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "OUT": str(tmp_path), "PYTHONPATH": str(REPO), "PYTHON": sys.executable,
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    res = subprocess.run(["bash", "bench/gpu_suite.sh", "--cpu-smoke"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    r = json.loads((tmp_path / "gpu_suite.json").read_text())
    sec = r["sections"]
    assert sec["environment"]["cuda_ext"] != "built" and sec["ceilings"]["copy_GBps"] > 0
    assert sec["gpu_tests"]["returncode"] == 0
    for op in ("rms_norm", "norm_modulate", "gated_residual_norm_modulate", "gated_residual", "swiglu", "rope_qk"):
        for impl in ("reference", "compiled_reference", "triton"):
            row = sec["ops"][op][impl]
            assert "error" not in row, (op, impl, row)
            assert row["rel_err_vs_fp32"] < 2e-2 and row["fwd_GBps"] > 0
        assert sec["ops"][op]["triton"]["ran"] == "triton"
    for mode in ("eager", "compiled", "fused", "fused+compiled"):
        t = sec[f"train_{mode}"]
        assert t["img_per_s"] > 0 and t["batch"] == 2
    assert sec["train_fused"]["kernels"]["norm_modulate"] == "triton"
    assert sec["train_eager"]["kernels"]["norm_modulate"] == "reference"
    # only the FP8 row may fail on a CPU (it needs an FP8 GPU), and it must say why
    assert set(r["errors"]) <= {"train_fp8+fused+compiled"}
    assert "train_fused+compiled" in res.stdout  # the short table comes last
