"""Checkpoint and stop on a signal: the warning a scheduler sends before the time limit or a preemption.

SLURM's `--signal=USR1@600` (scripts/slurm/train.sbatch forwards it to every rank) or a user's `kill -USR1`
asks a run to save where it is and stop, so that the requeued job loses no steps. The signal handler only sets
a flag; the ranks agree on the step to stop at, because a checkpoint is a collective and the signal does not
reach every rank at the same moment: every `checkpoint.stop_check_every` steps they all-reduce the flag (MAX),
so a signal that reached any one rank stops all of them after the same step. A single process looks at its flag
after every step (no collective). The trainer then saves that step's checkpoint (unless it was just written),
skips the export and the final evaluation, and returns; the command exits 0 and the same command resumes.
"""
import logging
import signal
import threading
from types import FrameType
from typing import Optional

import torch
import torch.distributed as dist

log = logging.getLogger("train")

STOP_SIGNALS = ("SIGUSR1", "SIGUSR2", "none")


class StopRequest:
    """The flag a stop signal sets, and the ranks' agreement on it. Install with `install()` in the main thread
    (fit does), restore the previous handler with `close()`."""

    def __init__(self, signal_name: str, check_every: int, world_size: int, device: torch.device) -> None:
        if signal_name not in STOP_SIGNALS:
            raise ValueError(f"stop signal must be one of {', '.join(STOP_SIGNALS)}, got {signal_name!r}")
        self.signum: Optional[signal.Signals] = None if signal_name == "none" else signal.Signals[signal_name]
        self.check_every, self.world_size, self.device = check_every, world_size, device
        self.received = False
        self._previous = None

    @property
    def name(self) -> str:
        return self.signum.name if self.signum is not None else "none"

    def install(self) -> None:
        if self.signum is None or threading.current_thread() is not threading.main_thread():
            return  # (signal handlers can only be set from the main thread: a trainer run in a thread has none)
        self._previous = signal.signal(self.signum, self._handler)
        # restart interrupted system calls: without this a signal arriving inside a collective would fail
        # gloo's / NCCL's socket reads with EINTR instead of only setting the flag
        signal.siginterrupt(self.signum, False)

    def _handler(self, signum: int, frame: Optional[FrameType]) -> None:
        self.received = True

    def agreed(self, step: int) -> bool:
        """Whether every rank stops after `step` (1-based, just finished). The same answer on every rank: the
        all-reduce happens at the same steps everywhere."""
        if self.signum is None:
            return False
        if self.world_size == 1:
            return self.received
        if step % self.check_every:
            return False
        flag = torch.tensor([int(self.received)], dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None
