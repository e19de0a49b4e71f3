"""The new Triton kernels compile for an H100/H200 (sm_90) with Triton's own toolchain, no GPU needed
(bench/sm90_check.py, in a subprocess without TRITON_INTERPRET): qkv_rope forward/backward (head_dim 72 and 64,
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


def sm90_check(pythonpath: str = "", args: tuple[str, ...] = ()) -> dict:
    """bench.sm90_check's JSON, run in a subprocess without TRITON_INTERPRET (with `pythonpath` first on the path:
    another Triton). Fails in CI, skips elsewhere, where that Triton's NVIDIA backend or its ptxas is missing."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([pythonpath, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    probe = subprocess.run([sys.executable, "-c", "from triton.backends.nvidia.compiler import get_ptxas; "
                            "print(get_ptxas(90).path)"], cwd=REPO, env=env, capture_output=True, text=True)
    if probe.returncode or not os.path.exists(probe.stdout.strip()):
        msg = f"Triton's NVIDIA backend / ptxas not available: {probe.stderr.strip()[-300:]}"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    res = subprocess.run([sys.executable, "-m", "bench.sm90_check", *args], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=1200)
    failed = [ln for ln in res.stdout.splitlines() if "DOES NOT COMPILE" in ln]
    assert res.returncode == 0, "\n".join(failed[:10]) + "\n" + res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def assert_fit_for_sm90(results: dict, spills: tuple[tuple[str, int], ...] = ()) -> None:
    """Every variant compiled without spills (but those whose names start with a prefix of `spills`, up to its
    bytes) and within the shared memory a block may have on sm_90 (over it the launch raises OutOfResources: the
    fused attention's 128-key tiles at 3 stages needed 293-303 KB); the FP8 kernels use the hardware cast within
    their instruction budget, the attention's matmuls wgmma, the row kernels 16-byte vectors."""
    from bench.sm90_check import SM90_SHARED_LIMIT
    assert len(results) >= 20 and any(k.startswith("qkv_rope bwd") for k in results)
    for name, r in results.items():
        allowed = max([b for prefix, b in spills if name.startswith(prefix)], default=0)
        assert r["registers"] is not None and r["spill_bytes"] <= allowed, (name, r)
        assert 0 <= r["shared_bytes"] <= SM90_SHARED_LIMIT, (name, r)
        if name.startswith(("swiglu_fp8", "quantize_rows_fp8")):
            # the hardware e4m3 cast, not the interpreter's written-out rounding, and the row in two exact tiles:
            # the FP8 SwiGLU issued ~73 SASS instructions per element of its 3072 (55 per lane of a 4096-wide tile;
            # issue-bound: 0.52 ms a call on the H200 where the bytes take 0.24), now 33-43
            assert r["e4m3_cvt"], (name, r)
            limit = 64 if "COLMAX=1" in name else 45  # colmax: a loop, its prologue counted in
            assert r["sass_per_element"] is None or r["sass_per_element"] <= limit, (name, r)
        if name.startswith(("group_norm norm", "group_norm bwd")):  # with the SiLU: its division div.approx.f32
            assert r["div_full_f32"] == 0, (name, r)                  # on any Triton (kernels._triton.approx_div)
        if name.startswith("rope_attention"):  # every matmul on Hopper's wgmma (M >= 64 per warpgroup)
            assert r["wgmma"] > 0 and r["mma_sync"] == 0, (name, r)
        if "qkv_rope" in name or "C=1152" in name:  # rows of 144 B / 4.6 KB: whole-row 16-byte vectors
            assert r["vector_loads"] > 0 and r["vector_stores"] > 0, (name, r)
            # per-row statistics / per-column weights only: 1 fp32 a thread (qk-norm's two weights, qkv_rope's bias:
            # one load per q, k, v part); the norms' 128-wide second tile of 1152 (1024 + 128) holds one element a
            # thread at 1 row over 4 warps or 2 over 8: one load per tensor it reads (6 forward, 8 backward)
            norm_tile_b = 8 if name.startswith(("norm ", "norm_fp8 ")) else 0
            assert r["scalar_loads"] <= 4 + 3 * ("qkv_rope" in name) + norm_tile_b, (name, r)
        if name.startswith("norm_fp8 "):
            # the FP8 sampler's norms with the e4m3 rows: the hardware cast; 35-39 SASS instructions an element at 4
            # rows over 4 warps or 8 over 8 (7 bytes an element: under the bytes' time at the H200's issue rate), ~55
            # at 4 rows over 8 warps, 62-83 at 1-2 rows
            limit = 42 if ("BLOCK_M=4 warps=4" in name or "BLOCK_M=8 warps=8" in name) else 85
            assert r["e4m3_cvt"] and r["sass_per_element"] <= limit, (name, r)
        if name.startswith("upsample_conv interleave"):
            # a copy is memory-bound only while it issues few instructions an element (no division by a runtime
            # size per element): 7-10 SASS an element in channels_last with 16-byte vectors both ways, 9-27 in NCHW
            # (its loads are strided pairs), Triton 3.9 and 3.6
            if "channels_last" in name:
                assert r["vector_loads"] > 0 and r["vector_stores"] > 0 and r["sass_per_element"] <= 12, (name, r)
            else:
                assert r["sass_per_element"] <= 30, (name, r)
        if name.startswith("norm ") and "C=1152" in name:
            # the row as two exact tiles, 32-bit offsets inside a program's rows, the adaLN vectors once a tile:
            # the one 2048-wide tile issued 49-70 SASS instructions per real element forward, 83-87 backward (static
            # counts, Triton 3.9 and 3.6); now 31-46 and 61-62, and 20-22 forward at 4 rows over 4 warps / 8 over 8
            assert r["sass_per_element"] <= (48 if " fwd " in name else 70), (name, r)


def test_kernels_compile_for_sm90_without_spills():
    assert_fit_for_sm90(sm90_check())


def test_norm_backward_row_loop_instruction_budget():
    """The norm backward's row loop (what it issues per element: the static count also holds the prologue and the
    partial sums' epilogue, run once per 32 rows): at most 32 SASS instructions per element of hidden 1152 (29.8-30.4
    under Triton 3.6 / 3.9; the one masked 2048-wide tile's loop issued ~42)."""
    results = sm90_check(args=("--loops", "--only", "norm bwd grnm"))
    assert results, "no norm backward variant compiled"
    for name, r in results.items():
        assert len(r["loop_sass_per_element"]) == 1 and r["loop_sass_per_element"][0] <= 32, (name, r)
