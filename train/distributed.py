"""Process-group setup for 1 CPU process, N CPU processes (gloo), one GPU or many nodes (NCCL).

Launchers (torchrun, the deepspeed launcher) set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT; a
plain `python -m train.train_dit` gets single-process defaults. A lost rank must end the run instead of
hanging it: the process group gets a finite timeout (collectives raise after it), NCCL aborts on errors
(TORCH_NCCL_ASYNC_ERROR_HANDLING), and both launchers kill the remaining workers and exit non-zero
when one worker dies.
"""
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Sequence, TypeVar, Union

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(backend: str = "auto", timeout_s: int = 600) -> DistInfo:
    if "RANK" not in os.environ:  # plain `python ...`: one process
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        import deepspeed
        _forget_deepspeed_groups()
        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def _forget_deepspeed_groups():
    """DeepSpeed caches the process groups it derives (deepspeed.utils.groups) at module level. After a
    destroy_process_group in this process (a trainer's main() run in-process, e.g. by a test) those would be
    stale ("Group ... is not registered") for the next engine; with no process group they must be empty."""
    from deepspeed.utils import groups
    for name, value in list(vars(groups).items()):
        if name.startswith("_") and name.endswith(("_GROUP", "_GROUP_RANKS")):
            setattr(groups, name, {} if isinstance(value, dict) else None)
    groups.mesh_device = None
    groups.mpu = None


def barrier() -> None:
    if dist.is_initialized():
        if dist.get_backend() == "nccl":
            # name the device: without it torch warns at every barrier that it guesses the current one
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def from_rank0(value: T, options: Sequence[T], device: Union[str, torch.device]) -> T:
    """Rank 0's `value` (one of `options`) on every rank: a choice each rank measured for itself must be the same
    everywhere. One broadcast of its index; `value` itself where there is one rank."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([list(options).index(value)], device=device)
        dist.broadcast(t, src=0)
        return options[int(t.item())]
    return value


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over ranks of a small tensor of metrics (one collective per logging step)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values
