#!/usr/bin/env bash
# Nsight check on the GPU machine, < 4 min: `OUT=DIR bash bench/nsys_check.sh` from the repo root.
#
# 1. Finds nsys (PATH, Nsight Systems installs, the copy inside Nsight Compute) and checks that it can write a
#    report at all (a one-kernel probe).
# 2. If it can: the README's recipe on the DiT trainer as written (tiny config on CUDA: triton kernels, bf16,
#    profile window steps 5-7) --
#       nsys profile -t cuda,nvtx --capture-range=cudaProfilerApi --capture-range-end=stop python -m train.train_dit ...
#    and its `nsys stats` summary (NVTX ranges + GPU kernels) -> $OUT/nsight_summary.txt.
# 3. If not (the lent H200 has ncu only): ncu captures EVERY kernel of ONE compiled training step -- the shipped
#    XL/1 config (bf16, train.compile=blocks, ZeRO-2, kernels auto) cut to 2 blocks at batch 256, so each glue
#    kernel runs at the real 65,536 x 1152 rows; the trainer's profile window is that one step
#    (--profile-from-start off = its cudaProfilerStart/Stop), clocks left alone (--clock-control none) -- with
#    time, DRAM bytes and the tensor-core op counters the card has. bench.ncu_table turns the report into a table:
#    each kernel named, its launches, ms, achieved GB/s and TFLOP/s, its profile category
#    -> $OUT/ncu_step.md, $OUT/ncu_step.json, the report $OUT/ncu_step.ncu-rep.
#    On a machine with nsys, the same step: nsys profile -t cuda,nvtx --capture-range=cudaProfilerApi
#    --capture-range-end=stop python -m train.train_dit --config configs/dit_xl1_64ep.yaml data.source=synthetic
#    profile.start_step=50 profile.num_steps=1 (docs/kernels.md "Profiling").
# The summary's first line says which tool ran and why; the trainer's output is in $OUT/nsight_run.log.
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"
OUT="${OUT:-bench/results/tmp}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
SUMMARY="$OUT/nsight_summary.txt"
RUN="$(mktemp -d /tmp/nsight_check.XXXXXX)"
TRAIN=("$PY" -m train.train_dit --config configs/dit_tiny_cpu.yaml data.source=synthetic train.steps=10
       train.precision=bf16 train.kernels=triton train.zero_stage=0 profile.start_step=5 profile.num_steps=3
       "logging.dir=$RUN/run" logging.tensorboard=false logging.progress_bar=false logging.every=5
       "checkpoint.dir=$RUN/run/checkpoints" checkpoint.every=1000 checkpoint.export_reference=false)
# one compiled step at the real glue shapes: XL/1's widths (1152, 16 heads of 72, SwiGLU 3072), 2 blocks, batch 256
STEP=("$PY" -m train.train_dit --config configs/dit_xl1_64ep.yaml data.source=synthetic model.size=custom
      model.hidden_size=1152 model.depth=2 model.num_heads=16 model.patch_size=1 train.global_batch=256
      train.batch_per_gpu=256 train.steps=4 profile.start_step=3 profile.num_steps=1 eval.every=0
      "logging.dir=$RUN/step" logging.tensorboard=false logging.progress_bar=false logging.every=2
      "checkpoint.dir=$RUN/step/checkpoints" checkpoint.every=1000 checkpoint.export_reference=false)
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
  say "nsys unusable ($why); ncu: every kernel of one compiled training step"
  # the tensor-core op counters this card has (sm__ops_path_tensor_src_<type>_dst_<type>; none: time and bytes only)
  TENSOR_METRICS="$("$NCU" --query-metrics 2>/dev/null | awk '{print $1}' \
                    | grep -E '^sm__ops_path_tensor_src_[a-z0-9]+_dst_[a-z0-9]+$' | sed 's/$/.sum/' | paste -sd, -)"
  METRICS="gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum${TENSOR_METRICS:+,$TENSOR_METRICS}"
  NCU_ARGS=(--clock-control none --profile-from-start off --metrics "$METRICS" -o "$OUT/ncu_step" -f)
  timeout 180 "$NCU" "${NCU_ARGS[@]}" "${STEP[@]}" > "$OUT/nsight_run.log" 2>&1
  rc=$?
  {
    echo "tool: ncu ($NCU, $("$NCU" --version 2>&1 | tail -n 1)); trainer rc $rc"
    echo "why not nsys: $why"
    echo "captured: every kernel of training step 3 (the trainer's profile window), --clock-control none"
    echo "command: ncu ${NCU_ARGS[*]} ${STEP[*]}"
    if ls "$OUT"/ncu_step.ncu-rep >/dev/null 2>&1; then
      "$NCU" --import "$OUT"/ncu_step.ncu-rep --csv --page raw --print-units base > "$RUN/ncu_step.csv" 2>&1
      "$PY" -m bench.ncu_table "$RUN/ncu_step.csv" --out "$OUT" 2>&1 | head -n 70
      [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
    else
      echo "no report written: $(tail -n 5 "$OUT/nsight_run.log" | tr '\n' ' ')"
      rc=1
    fi
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
