#!/usr/bin/env bash
# Nsight check on the GPU machine, < 60 s: `OUT=DIR bash bench/nsys_check.sh` from the repo root.
#
# 1. Finds nsys (PATH, Nsight Systems installs, the copy inside Nsight Compute) and checks that it can write a
#    report at all (a one-kernel probe).
# 2. If it can: the README's recipe on the DiT trainer as written (tiny config on CUDA: triton kernels, bf16,
#    profile window steps 5-7) --
#       nsys profile -t cuda,nvtx --capture-range=cudaProfilerApi --capture-range-end=stop python -m train.train_dit ...
#    and its `nsys stats` summary (NVTX ranges + GPU kernels) -> $OUT/nsight_summary.txt.
# 3. If not: ncu captures ONE fused Triton kernel (_norm_fwd_kernel: RMSNorm + adaLN modulate) inside the
#    same profile window (--profile-from-start off = the trainer's cudaProfilerStart/Stop) and inside the
#    trainer's NVTX "forward" range, clocks left alone (--clock-control none) -> its details page.
# The summary's first line says which tool ran and why; the trainer's output is in $OUT/nsight_run.log.
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"
OUT="${OUT:-bench/results/tmp}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
SUMMARY="$OUT/nsight_summary.txt"
RUN="$(mktemp -d /tmp/nsight_check.XXXXXX)"
KERNEL="${NSIGHT_KERNEL:-_norm_fwd_kernel}"
TRAIN=("$PY" -m train.train_dit --config configs/dit_tiny_cpu.yaml data.source=synthetic train.steps=10
       train.precision=bf16 train.kernels=triton train.zero_stage=0 profile.start_step=5 profile.num_steps=3
       "logging.dir=$RUN/run" logging.tensorboard=false logging.progress_bar=false logging.every=5
       "checkpoint.dir=$RUN/run/checkpoints" checkpoint.every=1000 checkpoint.export_reference=false)
export RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT="${MASTER_PORT:-29517}"

say() { echo "[nsight] $*"; }

find_nsys() {
  local c
  if command -v nsys >/dev/null 2>&1; then command -v nsys; return 0; fi
  for c in /opt/nvidia/nsight-systems/*/bin/nsys /opt/nvidia/nsight-systems*/bin/nsys /usr/local/cuda*/bin/nsys \
           /opt/nvidia/nsight-compute/*/host/target-linux-x64/nsys; do
    if [ -x "$c" ]; then echo "$c"; return 0; fi
  done
  return 1
}

find_ncu() {
  local c
  if command -v ncu >/dev/null 2>&1; then command -v ncu; return 0; fi
  for c in /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda*/bin/ncu; do
    if [ -x "$c" ]; then echo "$c"; return 0; fi
  done
  return 1
}

NSYS="$(find_nsys || true)"
why="no nsys found (PATH, /opt/nvidia/nsight-systems, /usr/local/cuda*/bin, nsight-compute's host copy)"
if [ -n "$NSYS" ]; then
  say "nsys candidate: $NSYS ($("$NSYS" --version 2>&1 | head -n 1))"
  timeout 25 "$NSYS" profile -t cuda -o "$RUN/probe" --force-overwrite true \
      "$PY" -c "import torch; torch.ones(8, device='cuda').sum().item()" > "$RUN/probe.log" 2>&1
  if ls "$RUN"/probe.nsys-rep >/dev/null 2>&1 || ls "$RUN"/probe.qdrep >/dev/null 2>&1; then
    why=""
  else
    why="$NSYS could not write a report: $(grep -v '^\s*$' "$RUN/probe.log" | tail -n 2 | tr '\n' ' ')"
  fi
fi

if [ -z "$why" ]; then
  say "nsys works: the README recipe on the trainer"
  timeout 45 "$NSYS" profile -t cuda,nvtx --capture-range=cudaProfilerApi --capture-range-end=stop \
      -o "$OUT/nsys_dit_tiny" --force-overwrite true "${TRAIN[@]}" > "$OUT/nsight_run.log" 2>&1
  rc=$?
  {
    echo "tool: nsys ($NSYS, $("$NSYS" --version 2>&1 | head -n 1)); trainer rc $rc"
    echo "command: nsys profile -t cuda,nvtx --capture-range=cudaProfilerApi --capture-range-end=stop ${TRAIN[*]}"
    "$NSYS" stats --report nvtx_sum,cuda_gpu_kern_sum --format column "$OUT"/nsys_dit_tiny.nsys-rep 2>&1 \
        | head -n 80
  } > "$SUMMARY"
else
  NCU="$(find_ncu || true)"
  if [ -z "$NCU" ]; then
    printf 'tool: none\nnsys: %s\nncu: not found\n' "$why" > "$SUMMARY"
    cat "$SUMMARY"; exit 1
  fi
  say "nsys unusable ($why); ncu: one $KERNEL launch inside the profile window"
  NCU_ARGS=(--clock-control none --profile-from-start off --kernel-name "regex:$KERNEL" --launch-count 1
            --section SpeedOfLight --section MemoryWorkloadAnalysis -o "$OUT/ncu_dit_tiny" -f)
  timeout 45 "$NCU" "${NCU_ARGS[@]}" --nvtx --nvtx-include "forward/" "${TRAIN[@]}" > "$OUT/nsight_run.log" 2>&1
  rc=$?
  nvtx="inside NVTX range 'forward'"
  if ! ls "$OUT"/ncu_dit_tiny.ncu-rep >/dev/null 2>&1; then  # NVTX filter matched nothing: the window alone
    timeout 45 "$NCU" "${NCU_ARGS[@]}" "${TRAIN[@]}" >> "$OUT/nsight_run.log" 2>&1
    rc=$?
    nvtx="(NVTX filter matched no launch; window only)"
  fi
  {
    echo "tool: ncu ($NCU, $("$NCU" --version 2>&1 | tail -n 1)); trainer rc $rc"
    echo "why not nsys: $why"
    echo "captured: first launch of regex:$KERNEL in the profile window (steps 5-7) $nvtx, --clock-control none"
    echo "command: ncu ${NCU_ARGS[*]} --nvtx --nvtx-include forward/ ${TRAIN[*]}"
    "$NCU" --import "$OUT"/ncu_dit_tiny.ncu-rep --page details 2>&1 | head -n 80
  } > "$SUMMARY"
fi
# 4. torch.profiler window (profile.torch_trace=true, once the DiT config has the key): Chrome trace + CUDA memory
#    snapshot of the same window, written by train.logging_utils.ProfileWindow to LOGGING_DIR/traces.
if "$PY" -m train.train_dit --help 2>/dev/null | grep -q "profile.torch_trace"; then
  TRACE=("${TRAIN[@]}" "logging.dir=$RUN/trace" "checkpoint.dir=$RUN/trace/checkpoints" profile.torch_trace=true)
  timeout 40 "${TRACE[@]}" > "$OUT/torch_trace_run.log" 2>&1
  trc=$?
  {
    echo ""
    echo "torch.profiler window (profile.torch_trace=true): trainer rc $trc"
    for f in "$RUN"/trace/traces/*; do [ -f "$f" ] && echo "  $(basename "$f"): $(du -h "$f" | cut -f1)"; done
    "$PY" - "$RUN/trace/traces" <<'PYEOF'
import json, pickle, sys
from pathlib import Path
d = Path(sys.argv[1])
try:
    ev = json.loads((d / "trace_rank0.json").read_text())["traceEvents"]
    kern = [e for e in ev if e.get("cat") == "kernel"]
    print(f"  trace: {len(ev)} events, {len(kern)} GPU kernels, e.g. {sorted({e['name'][:40] for e in kern})[:4]}")
    snap = pickle.loads((d / "memory_snapshot_rank0.pickle").read_bytes())
    print(f"  memory snapshot: {len(snap['segments'])} segments, {sum(len(t) for t in snap['device_traces'])} events")
except Exception as e:  # reported, not fatal: the Nsight part above is what this script is for
    print(f"  trace check failed: {type(e).__name__}: {e}")
PYEOF
  } >> "$SUMMARY"
  cp "$RUN"/trace/traces/ops_rank0.txt "$OUT/torch_trace_ops_rank0.txt" 2>/dev/null
else
  echo "(profile.torch_trace is not a DiT config key yet: torch.profiler window not run)" >> "$SUMMARY"
fi
cat "$SUMMARY"
grep -q "^tool: n" "$SUMMARY" && [ "$rc" -eq 0 ]
