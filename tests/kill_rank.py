"""A trainer's command line in which one rank SIGKILLs itself at a chosen point (tests/test_train_lost_rank.py runs
this file under torchrun or as plain processes instead of `-m train.train_dit`):

    KILL_RANK=1 KILL_AT=step:5 KILL_RECORD=/tmp/k.json python tests/kill_rank.py train.train_dit --config ...

KILL_AT=step:N   the rank dies in optimizer step N, after its backward (the others wait in the step's collectives)
KILL_AT=save:N   the rank dies while checkpoint N is written: its DeepSpeed files are in step_N.tmp, its own
                 rank_R.pt is not (the others wait at the checkpoint's barrier)
KILL_AT=oom:N    the rank raises torch.OutOfMemoryError (torch 2.11's CUDA text) in optimizer step N: it ends in its
                 own one-line error (train/errors.py), not by a signal
KILL_AT=data:N   the rank raises a DataError (a user mistake only it sees: its shard of the data) in optimizer step N
Just before it dies the rank writes KILL_RECORD ({"time", "rank", "where"}). The kill is a real SIGKILL of the
real process; only its moment is chosen here, so the test does not race the trainer.
"""
import importlib
import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _die(where: str) -> None:
    Path(os.environ["KILL_RECORD"]).write_text(json.dumps({"time": time.time(), "rank": os.environ["RANK"],
                                                           "where": where}))
    os.kill(os.getpid(), signal.SIGKILL)


def arm(rank: int) -> None:
    from train import base
    kind, step = os.environ["KILL_AT"].split(":")
    step = int(step)
    if kind == "step":
        optimizer_step = base.Trainer.optimizer_step

        def dying_optimizer_step(self, tag):
            if self.step + 1 == step:
                _die(f"optimizer step {step}")
            return optimizer_step(self, tag)

        base.Trainer.optimizer_step = dying_optimizer_step
    elif kind == "save":
        atomic_torch_save = base.atomic_torch_save

        def dying_save(obj, path):
            path = Path(path)
            if path.name == f"rank_{rank:05d}.pt" and path.parent.name == f"step_{step:07d}.tmp":
                _die(f"checkpoint {step}")
            return atomic_torch_save(obj, path)

        base.atomic_torch_save = dying_save
    elif kind in ("oom", "data"):
        optimizer_step = base.Trainer.optimizer_step

        def failing_optimizer_step(self, tag):
            if self.step + 1 == step:
                Path(os.environ["KILL_RECORD"]).write_text(json.dumps({"time": time.time(), "rank": str(rank),
                                                                       "where": f"{kind} {step}"}))
                if kind == "data":
                    from train.data import DataError
                    raise DataError(f"shard_{rank:05d}.safetensors: a corrupt record (rank {rank} only)")
                from oom import cuda_oom
                raise cuda_oom(gpu=1)
            return optimizer_step(self, tag)

        base.Trainer.optimizer_step = failing_optimizer_step
    else:
        raise SystemExit(f"KILL_AT={os.environ['KILL_AT']}: expected step:N, save:N, oom:N or data:N")


def main() -> int:
    module, argv = sys.argv[1], sys.argv[2:]
    rank = int(os.environ.get("RANK", "0"))
    if os.environ.get("KILL_RANK") == str(rank):
        arm(rank)
    return importlib.import_module(module).main(argv)


if __name__ == "__main__":
    sys.exit(main())
