#!/usr/bin/env bash
# The GPU suite: `bash bench/gpu_suite.sh [--part A|B|C|all] [--budget S]` from the repo root on one H100/H200
# (torch 2.11, Triton 3.6). Installs carried wheels (.whl/: DeepSpeed and its pure-Python needs, torchao),
# builds the CUDA extension in the background, then bench/gpu_suite.py: GPU tests, fp32 parity on the GPU,
# the XL/1 trainer's throughput through `python -m train.train_dit` and bench.throughput (Trainer.train_step),
# op bandwidths, the other GPU benchmarks. Writes $OUT/gpu_suite.json (OUT defaults to bench/results/tmp)
# and prints a short table last. `--cpu-smoke` runs every section on the CPU with tiny shapes (CI).
set -u
cd "$(dirname "$0")/.."
export SUITE_START="$(date +%s)"  # the suite's clock: the wheels' install and torch's import count against its limit
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"
export OUT="${OUT:-bench/results/tmp}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"  # the interpreter that has torch (CI passes its venv's)
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/vavae_inductor}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-/tmp/vavae_torch_ext}"
# A build killed half-way (a timed-out run) leaves its `lock` file and the next process to load that extension
# (DeepSpeed's CPU shm op, ours) waits on it for ever; a build takes minutes, so a lock older than 15 is stale.
find "$TORCH_EXTENSIONS_DIR" -name lock -mmin +15 -print -delete 2>/dev/null | sed 's/^/[suite] removed stale /'
# the commit results name: .suite_commit (scripts/prepare_gpu_carry.sh writes it here and it is carried: a lent
# machine's copy of .git can be older than the tree that travelled), else evaluation/provenance.py asks git
export SUITE_COMMIT="$(cat .suite_commit 2>/dev/null || echo unknown)"
# wheels carried to the machine (DeepSpeed, torchao); not for the CPU smoke: on a machine where they were prepared
# (for the GPU machine's Python) they would put a second DeepSpeed before the venv's, whose JIT op then rebuilds
if [[ " $* " != *" --cpu-smoke "* ]] && [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install --quiet --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 \
    | grep -v "root user" ; export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
if [[ " $* " != *" --cpu-smoke "* ]] && [[ " $* " != *" --part C "* ]]; then  # parts A, B: tests and cases use it
  rm -f "$OUT/build_ext.done"
  ( start=$(date +%s); MAX_JOBS=${MAX_JOBS:-8} timeout 200 "$PY" kernels/build_ext.py > "$OUT/build_ext.log" 2>&1
    rc=$?; echo "[suite] CUDA extension build rc $rc in $(( $(date +%s) - start )) s" >> "$OUT/build_ext.log"
    echo "$rc" > "$OUT/build_ext.done" ) &
  export SUITE_BUILD_BG=1
fi
limit=450; [[ " $* " == *" --part C "* ]] && limit=590  # part C: two 2,000-step pairs (a call's 10 minutes)
export SUITE_DEADLINE_S="${SUITE_TIMEOUT:-$limit}"  # the suite cuts each section's own timeout to what is left of it
timeout "$SUITE_DEADLINE_S" "$PY" bench/gpu_suite.py --out "$OUT" "$@"
rc=$?
wait
exit $rc
