"""vavae-lightningdit: VA-VAE + LightningDiT, fast on H100, exact to the reference.

`pip install -e .` builds the optional CUDA extension (kernels/csrc) when a CUDA toolchain and a
CUDA-enabled torch are present; otherwise it says so and installs the pure-Python package (the
Triton and PyTorch backends are used).
"""
import os
import sys

from setuptools import find_packages, setup

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _ext_modules_and_cmdclass():
    try:
        from kernels.build_ext import cuda_extensions  # noqa: WPS433
    except ImportError as e:  # torch not importable yet (isolated build): no extension
        print(f"[vavae-lightningdit] CUDA extension skipped: {e}")
        return [], {}
    return cuda_extensions()


ext_modules, cmdclass = _ext_modules_and_cmdclass()

setup(
    name="vavae-lightningdit",
    version="0.1.0",
    description="VA-VAE tokenizer + LightningDiT generator: reference-exact, fast on H100",
    packages=find_packages(include=["kernels*", "modeling*", "evaluation*", "train*", "bench*", "examples*"]),
    package_data={"kernels": ["csrc/*", "compiled_choices.json"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.11",
        "numpy>=1.26",
        "safetensors>=0.4",
        "pyyaml>=6",
        "tqdm>=4.66",
        "scipy>=1.11",
        "torchdiffeq>=0.2.5",
    ],
    extras_require={
        "triton": ["triton>=3.6"],
        "train": ["deepspeed==0.19.8", "tensorboard>=2.15", "matplotlib>=3.8"],
        "fp8": ["torchao==0.18.0"],
        "data": ["nvidia-dali-cuda130==2.4.0", "pillow>=10", "scikit-image>=0.22"],
        "test": ["pytest>=8", "pytest-timeout>=2.3"],
    },
    # each command is `python -m MODULE` with its main's result as the exit status (modeling.config.console_entry)
    entry_points={"console_scripts": [
        "vavae-train-dit = train.train_dit:cli",
        "vavae-train-vae = train.train_vae:cli",
        "vavae-data = train.data.__main__:cli",
        "vavae-sample = modeling.sample_images:cli",
        "vavae-generate = evaluation.generate:cli",
        "vavae-fid = evaluation.fid:cli",
        "vavae-tokenizer-metrics = evaluation.tokenizer_metrics:cli",
        "vavae-parity = bench.parity:cli",
        "vavae-throughput = bench.throughput:cli",
        "vavae-compare = bench.compare:cli",
        "vavae-curves = bench.curves:cli",
        "vavae-ops-bench = bench.ops_bench:cli",
        "vavae-demo = examples.demo:cli",
    ]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
