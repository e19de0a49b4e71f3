"""Build description of the optional CUDA extension `kernels._vavae_cuda` (sources in kernels/csrc).

setup.py calls `cuda_extensions()`; `python kernels/build_ext.py` builds it in place (same flags).
Without nvcc or a CUDA-enabled torch the extension is skipped with the reason printed, and the
Triton / PyTorch backends are used.
"""
import os
import sys
from pathlib import Path
from typing import Optional

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ["bindings.cpp", "fused_norm.cu"]
NVCC_FLAGS = ["-O3", "--use_fast_math", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a",
              "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "--expt-relaxed-constexpr",
              "-lineinfo"]  # -lineinfo: source lines in Nsight Compute at no speed cost
CXX_FLAGS = ["-O3", "-std=c++17"]


def skip_reason() -> Optional[str]:
    """None if the extension can be built here, else why not."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError as e:
        return f"torch not importable ({e})"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build"
    if CUDA_HOME is None:
        return "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    return None


def cuda_extensions() -> tuple[list, dict]:
    """Return (ext_modules, cmdclass) for setup.py."""
    reason = skip_reason() if not os.environ.get("VAVAE_NO_CUDA_EXT") else "VAVAE_NO_CUDA_EXT is set"
    if reason:
        print(f"[vavae-lightningdit] CUDA extension skipped: {reason}; the Triton/PyTorch backends will be used")
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    ext = CUDAExtension("kernels._vavae_cuda", [str(CSRC / s) for s in SOURCES],
                        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS})
    print("[vavae-lightningdit] building CUDA extension kernels._vavae_cuda for sm_90a")
    return [ext], {"build_ext": BuildExtension}


if __name__ == "__main__":  # in-place build: python kernels/build_ext.py
    from setuptools import setup
    exts, cmds = cuda_extensions()
    if not exts:
        sys.exit(1)
    os.chdir(CSRC.parent.parent)
    setup(name="vavae-cuda-ext", ext_modules=exts, cmdclass=cmds, script_args=["build_ext", "--inplace"])
