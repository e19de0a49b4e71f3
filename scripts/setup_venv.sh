#!/usr/bin/env bash
# Create ./.venv with the CPU environment (dev machines, CI). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
pip install -q -r requirements/cpu.txt
grep -v '^#' requirements/nodeps.txt | grep -q . && pip install -q --no-deps -r requirements/nodeps.txt
pip install -q --no-deps --no-build-isolation -e .
python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__; print('venv ready: torch', torch.__version__)"
