#!/usr/bin/env bash
# Prepare what the GPU machine needs beside the working tree (it has torch 2.11 + Triton 3.6, no internet):
#   .whl/     torchao (FP8 row of the suite) for Python 3.12 / manylinux x86-64
#   .parity/  a copy of ../shared/parity (the fp32 GPU parity section reads $VAVAE_PARITY_DIR)
# Both are git-ignored; carry them with the run. Then, on the machine:
#   VAVAE_PARITY_DIR=$PWD/.parity OUT=$OUT bash bench/gpu_suite.sh --budget 300
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
grep -qx '/.parity/' .git/info/exclude 2>/dev/null || echo '/.parity/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  -d .whl torchao==0.18.0
rm -rf .parity && cp -r ../shared/parity .parity && chmod -R u+w .parity
du -sh .whl .parity
