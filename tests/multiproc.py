"""Helpers for the tests that launch the trainers as real multi-process runs (torchrun, gloo on the CPU)."""
import json
import os
import socket
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def torchrun(module, *args, nproc=2):
    """The command line of `torchrun --nproc_per_node N -m module args...` on a free port."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            free_port(), "-m", module, *args]


# What a rank's launcher sets. A test that ran a trainer in-process leaves them in os.environ (the single-process
# defaults of train.distributed.init_distributed); a child must not inherit them: torchrun's own process would
# pass for rank 0 of a world of 1.
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK", "MASTER_ADDR",
                "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT")


def env():
    """The test process's environment for a child run, less any launcher variables: the repo importable, one
    OpenMP thread per rank, the shared cache of DeepSpeed's compiled ops."""
    base = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    return {**base, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # (TORCH_EXTENSIONS_DIR: conftest's)


def metrics_by_step(run_dir, pick):
    """step -> pick(record) for the last metrics.jsonl line written for that step."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out[r["step"]] = pick(r)
    return out
