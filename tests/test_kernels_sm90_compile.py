"""The new Triton kernels compile for an H100/H200 (sm_90) with Triton's own toolchain, no GPU needed
(kernels/sm90_check.py, in a subprocess without TRITON_INTERPRET): qkv_rope forward/backward (head_dim 72 and 64,
with and without qk-norm), the fused RoPE attention (its matmuls as wgmma) and the norm family's forward/backward at
every tile its autotuner may pick. ptxas must
report no register spills, and the row loads of hidden 1152 / head_dim 72-64 must be 16-byte vectors (what the
interpreter cannot show). Fails in CI where Triton's NVIDIA backend or its ptxas is missing."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_kernels_compile_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    probe = subprocess.run([sys.executable, "-c", "from triton.backends.nvidia.compiler import get_ptxas; "
                            "print(get_ptxas(90).path)"], cwd=REPO, env=env, capture_output=True, text=True)
    if probe.returncode or not os.path.exists(probe.stdout.strip()):
        msg = f"Triton's NVIDIA backend / ptxas not available: {probe.stderr.strip()[-300:]}"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    res = subprocess.run([sys.executable, "-m", "kernels.sm90_check"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-4000:]
    results = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(results) >= 20 and any(k.startswith("qkv_rope bwd") for k in results)
    for name, r in results.items():
        assert r["registers"] is not None and r["spill_bytes"] == 0, (name, r)
        if name.startswith(("swiglu_fp8", "quantize_rows_fp8")):
            # the hardware e4m3 cast, not the interpreter's written-out rounding, and the row in two exact tiles:
            # the FP8 SwiGLU issued ~73 SASS instructions per element of its 3072 (55 per lane of a 4096-wide tile;
            # issue-bound: 0.52 ms a call on the H200 where the bytes take 0.24), now 33-43
            assert r["e4m3_cvt"], (name, r)
            limit = 64 if "COLMAX=1" in name else 45  # colmax: a loop, its prologue counted in
            assert r["sass_per_element"] is None or r["sass_per_element"] <= limit, (name, r)
        if name.startswith("rope_attention"):  # every matmul on Hopper's wgmma (M >= 64 per warpgroup)
            assert r["wgmma"] > 0 and r["mma_sync"] == 0, (name, r)
        if "qkv_rope" in name or "C=1152" in name:  # rows of 144 B / 4.6 KB: whole-row 16-byte vectors
            assert r["vector_loads"] > 0 and r["vector_stores"] > 0, (name, r)
            assert r["scalar_loads"] <= 4, (name, r)  # per-row statistics / weights only
