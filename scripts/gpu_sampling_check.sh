#!/usr/bin/env bash
# Sampling speed + bf16 accuracy guard on the GPU machine (~2 min on one H200 from a cold inductor cache):
#   bash scripts/gpu_sampling_check.sh          (carry .parity: scripts/prepare_gpu_carry.sh makes it)
# Writes $OUT/sample_speed.json (bench.eval.sample_speed at the paper settings) and $OUT/bf16_guard.json.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu_sampling}"; mkdir -p "$OUT"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
time python -m bench.eval.sample_speed --json "$OUT/sample_speed.json" 2>&1 | grep -v UserWarning | grep -v "return F.scaled"
time python -m bench.eval.bf16_guard "${VAVAE_PARITY_DIR:-.parity}" --device cuda --cudagraphs on \
    --json "$OUT/bf16_guard.json" > "$OUT/bf16_guard.log" 2>&1 && tail -4 "$OUT/bf16_guard.log"
