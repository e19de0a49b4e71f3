#!/usr/bin/env bash
# One node's part of scripts/slurm/train.sbatch (srun runs it once per node): torchrun with this node's rank.
# Reads MODULE, NNODES, GPUS_PER_NODE, MASTER_ADDR, MASTER_PORT and PYTHON from train.sbatch, SLURM_NODEID from
# srun; the arguments are the trainer's.
# Signals: SIGUSR1 (checkpoint and stop, train/preempt.py) goes to the workers themselves (torchrun's children):
# torchrun has no handler for it and would die of it, leaving them running; SIGTERM goes to torchrun, which stops
# its workers.
set -euo pipefail
: "${SLURM_NODEID:?run by srun inside scripts/slurm/train.sbatch}"
"$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" --node_rank "$SLURM_NODEID" --nproc_per_node "$GPUS_PER_NODE" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    -m "$MODULE" "$@" &
launcher=$!
trap 'pkill -USR1 -P "$launcher" || true' USR1
trap 'kill -TERM "$launcher" 2>/dev/null || true' TERM
while :; do
    rc=0
    wait "$launcher" || rc=$?
    kill -0 "$launcher" 2>/dev/null || break   # still there: `wait` was interrupted by a trap
done
exit "$rc"
