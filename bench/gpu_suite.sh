#!/usr/bin/env bash
# The GPU suite: `bash bench/gpu_suite.sh` from the repo root on one H100/H200 (torch 2.11, Triton 3.6).
# Builds the CUDA extension, runs the GPU tests, times every op and XL/1 training, writes
# $OUT/gpu_suite.json (OUT defaults to bench/results/tmp) and prints a short table last.
# Extra arguments go to bench/gpu_suite.py (e.g. --cpu-smoke, --budget 300).
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"
export OUT="${OUT:-bench/results/tmp}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"  # the interpreter that has torch (CI passes its venv's)
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/vavae_inductor}"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then  # wheels carried to the machine (e.g. torchao)
  "$PY" -m pip install --quiet --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
if [[ " $* " != *" --cpu-smoke "* ]]; then
  start=$(date +%s)
  MAX_JOBS=${MAX_JOBS:-16} timeout 150 "$PY" kernels/build_ext.py > "$OUT/build_ext.log" 2>&1 \
    && echo "[suite] CUDA extension built in $(( $(date +%s) - start )) s" \
    || echo "[suite] CUDA extension build failed or skipped (see $OUT/build_ext.log): $(tail -n 3 "$OUT/build_ext.log")"
fi
timeout 430 "$PY" bench/gpu_suite.py --out "$OUT" "$@"
