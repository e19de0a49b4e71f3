#!/usr/bin/env bash
# One node's part of scripts/slurm/train.sbatch (srun runs it once per node): torchrun with this node's rank.
# Reads MODULE, NNODES, GPUS_PER_NODE, MASTER_ADDR, MASTER_PORT and PYTHON from train.sbatch, SLURM_NODEID from
# srun; the arguments are the trainer's.
set -euo pipefail
: "${SLURM_NODEID:?run by srun inside scripts/slurm/train.sbatch}"
exec "$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" --node_rank "$SLURM_NODEID" --nproc_per_node "$GPUS_PER_NODE" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    -m "$MODULE" "$@"
