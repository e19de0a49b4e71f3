"""Every Triton kernel also compiles for sm_90 with the lent GPU machine's Triton (requirements/triton_lent.txt,
installed by `make test` into .venv/triton-lent), not only with the venv's: the same checks as
tests/test_kernels_sm90_compile.py. Triton 3.6 there has no `tl.fdiv(approx=...)`, which the GroupNorm kernels
called: every one of them would have failed to compile on the device (found by this check, before any device time).
Fails in CI where that Triton is not installed.

One known difference: Triton 3.6 allocates the fused RoPE attention's head_dim-72 backward (dK and dV accumulators
of 64 x (64 + 16) each, in registers) at 255 registers with 16-32 bytes spilled, where 3.9 fits it in 244-255
without; at most 32 bytes are accepted there, and nowhere else."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_kernels_sm90_compile import REPO, assert_fit_for_sm90, sm90_check

LENT = REPO / ".venv" / "triton-lent"


def _pinned() -> str:
    text = (REPO / "requirements" / "triton_lent.txt").read_text()
    return re.search(r"^triton==(\S+)", text, re.M).group(1)


def test_kernels_compile_for_sm90_with_the_lent_machines_triton():
    if not (LENT / "triton" / "__init__.py").exists():
        msg = f"{LENT} missing: `make test` installs requirements/triton_lent.txt there"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    env = {**os.environ, "PYTHONPATH": str(LENT)}
    version = subprocess.run([sys.executable, "-c", "import triton; print(triton.__version__, triton.__file__)"],
                             cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert version[0] == _pinned() and Path(version[1]).is_relative_to(LENT), version
    assert_fit_for_sm90(sm90_check(str(LENT)), spills=(("rope_attention bwd D=72", 32),))
