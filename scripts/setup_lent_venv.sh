#!/usr/bin/env bash
# Create ./.venv-lent: the CPU environment with the lent GPU machine's torch 2.11 and Triton 3.6 instead of the
# dev machines' torch 2.13 and Triton 3.9 (requirements/lent.txt). No editable install: the CUDA extension would be
# built against the CUDA torch; `make test-lent` puts the repository on PYTHONPATH instead. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv-lent/bin/python ] || python3 -m venv .venv-lent
. .venv-lent/bin/activate
python -m pip install -q --upgrade pip
pip install -q -r requirements/lent.txt
rest=$(mktemp)
grep -v -E '^(torch|triton|numpy)\b' requirements/cpu.txt > "$rest"  # torchao, torchdiffeq stay
pip install -q -r "$rest"
rm -f "$rest"
grep -v '^#' requirements/nodeps.txt | grep -q . && pip install -q --no-deps -r requirements/nodeps.txt
python -c "import torch, triton; print('lent venv ready: torch', torch.__version__, 'triton', triton.__version__)"
