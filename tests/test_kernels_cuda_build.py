"""The CUDA extension's sources compile for sm_90a with nvcc against torch's headers (object files only:
no GPU or CUDA torch needed). Fails in CI when nvcc is missing."""
import os
import shutil
import subprocess

import pytest
import torch.utils.cpp_extension as cpp

from kernels.build_ext import CSRC, NVCC_FLAGS


def test_cuda_sources_compile_for_sm90a(tmp_path):
    nvcc = shutil.which("nvcc") or "/usr/local/bin/nvcc"
    if not os.path.exists(nvcc):
        if os.environ.get("CI"):
            pytest.fail("nvcc not found: the CUDA sources must compile in CI")
        pytest.skip("nvcc not found")
    includes = [f"-I{p}" for p in cpp.include_paths()]
    for src in sorted(CSRC.glob("*.cu")):
        cmd = [nvcc, "-c", str(src), "-o", str(tmp_path / (src.stem + ".o")), *NVCC_FLAGS, *includes,
               "-Xptxas", "-warn-spills", "-diag-suppress", "3306"]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
        assert res.returncode == 0, res.stderr[-4000:]
        assert "spill" not in res.stderr, res.stderr[-2000:]  # register spills would cost bandwidth
        assert (tmp_path / (src.stem + ".o")).stat().st_size > 0


def test_the_launcher_hands_the_extension_a_dtype_mix_it_has(monkeypatch):
    """The qk-norm under bf16 autocast: 16-bit q with fp32 weight / bias makes the norm's output fp32, a mix the
    extension's kernels do not have (x, vectors and out of one dtype, or out in the vectors'): the launcher reads x
    as fp32 (exact) and the fp32 kernel runs, where it raised "unsupported dtype mix ... use triton" under `auto`
    (which picks the extension whenever it is built). A gated or modulated norm keeps its own dtypes. The extension
    is faked (no GPU here): what reaches it is checked."""
    import torch

    from kernels import cuda_ext
    seen = {}

    class Fake:
        def norm_fwd(self, x, gate, y, weight, bias, shift, scale, h, out, mean, rstd, N, eps, rms, stream):
            seen.update(x=x.dtype, weight=weight.dtype, bias=bias.dtype, out=out.dtype)

    monkeypatch.setattr(cuda_ext, "_load", lambda: Fake())
    monkeypatch.setattr(cuda_ext, "_stream", lambda: 0)
    x = torch.randn(8, 72, dtype=torch.bfloat16)
    w, b = torch.ones(72), torch.zeros(72)
    out, mean, rstd = torch.empty(8, 72), torch.empty(8), torch.empty(8)
    cuda_ext.norm_fwd(x, None, None, w, b, None, None, out, out, mean, rstd, 8, 1e-6, False)
    assert seen == {"x": torch.float32, "weight": torch.float32, "bias": torch.float32, "out": torch.float32}
    out16 = torch.empty(8, 72, dtype=torch.bfloat16)  # the same norm written in x's dtype: no upcast
    cuda_ext.norm_fwd(x, None, None, w, b, None, None, out16, out16, mean, rstd, 8, 1e-6, False)
    assert seen["x"] == torch.bfloat16 and seen["weight"] == torch.bfloat16
