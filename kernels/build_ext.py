"""Build description of the optional CUDA extension (filled in by the kernels work)."""


def cuda_extensions():
    """Return (ext_modules, cmdclass) for setup.py."""
    print("[vavae-lightningdit] CUDA extension: none defined yet")
    return [], {}
