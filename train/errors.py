"""User mistakes vs bugs at the command line: `user_errors()` turns the errors that mean "the input is wrong"
(a config key, a file that is missing / corrupt / unsafe, data that does not fit, a folder in use or not
writable, a full disk, a batch too large for the GPU's memory) into one line on stderr and exit status 2. Anything
else is a bug and keeps its traceback. `--debug` (or VAVAE_DEBUG=1) keeps the traceback for user mistakes too.

In a multi-rank run every line a rank prints about an error starts with its rank tag ("[rank 1/4 node 0 host-a]
error: ..."; a traceback has it on every line), and a run that fails because a rank was lost says so in one line
naming the lost rank(s), their node and host, and the last complete checkpoint (`trainer_main`).

    def main(argv=None):
        args = parser.parse_args(argv)
        with user_errors(args.debug):
            ...
"""
import argparse
import os
import signal
import sys
import traceback
import typing
from typing import Any, Callable, Optional

from modeling import config


def user_error_types() -> tuple[type[BaseException], ...]:
    from modeling.checkpoint import CheckpointMismatchError
    from modeling.safe_load import CheckpointLoadError

    from .checkpoint import DiskFullError, NotWritableError, ResumeConfigError, RunLockedError
    from modeling.config import ConfigError
    from .data import DataError
    return (ConfigError, DataError, CheckpointLoadError, CheckpointMismatchError, ResumeConfigError, RunLockedError,
            NotWritableError, DiskFullError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
            PermissionError)


one_line = config.one_line  # the one message format of every command (modeling.config)


class LauncherStop(BaseException):
    """SIGTERM from the launcher (torchrun / deepspeed stop the other workers when one dies) or the scheduler
    (SLURM before preemption). A BaseException, so that no `except Exception` on the way swallows it."""


def _raise_on_sigterm() -> None:
    """The first SIGTERM raises LauncherStop in the main thread (the run can then name a lost rank before it
    ends: the launchers wait 30 s before SIGKILL); later ones are ignored while that is reported."""
    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise LauncherStop()
    signal.signal(signal.SIGTERM, handler)


def last_checkpoint_text(root: Optional[str]) -> str:
    """"the last complete checkpoint is DIR (step N)" for the error lines of a failed run."""
    if not root:
        return "no checkpoint folder yet"
    from .checkpoint import CheckpointManager
    try:
        found = CheckpointManager(root).latest_valid()
    except Exception as e:  # noqa: BLE001 -- every checkpoint broken: say so
        return f"no complete checkpoint in {root} ({one_line(e)})"
    if found is None:
        return f"no complete checkpoint in {root} yet"
    return f"the last complete checkpoint is {found[1]} (step {found[0]}); run the same command to resume from it"


def rank_failure_line(exc: BaseException) -> Optional[tuple[str, int]]:
    """(one line, exit status) when this rank's run failed because another rank was lost or the launcher stopped
    it, else None (an ordinary error). Takes a few seconds (train.distributed.find_lost_ranks)."""
    from .distributed import RUN_STATE, find_lost_ranks
    phase, ckpt = RUN_STATE["phase"], last_checkpoint_text(RUN_STATE["checkpoint_root"])
    try:
        lost = find_lost_ranks()
    except RuntimeError as e:  # the store is gone with its host
        return f"lost the run's rendezvous: {e}, while this rank was {phase}; {ckpt}", 1
    if lost:
        return (f"lost {', '.join(lost)}: no heartbeat for {_lost_after()} s while this rank was {phase} "
                f"({type(exc).__name__ if not isinstance(exc, LauncherStop) else 'stopped by SIGTERM'}); {ckpt}"), 1
    if isinstance(exc, LauncherStop):
        return f"stopped by SIGTERM (the launcher or the scheduler) while this rank was {phase}; {ckpt}", 128 + 15
    return None


def _lost_after() -> str:
    from .distributed import LOST_AFTER_S
    return f"{LOST_AFTER_S:g}"


def out_of_memory_line(exc: BaseException, cfg: Any, resume_refuse: tuple[str, ...] = ()) -> str:
    """The one line for a CUDA out-of-memory error: what the run was doing, torch's own figures (what it tried to
    allocate, the card's capacity and what was free), the setting that sets the memory in that phase and how to
    lower it, and the last complete checkpoint. `resume_refuse`: the trainer's RESUME_REFUSE; where it holds the
    batch (the VA-VAE's data order depends on it) the advice says that resuming at a lower one needs
    checkpoint.reshard=true. A batch too large for the card is a setting, not a bug: XL/1 at
    batch 256 peaks at ~88 GiB (fits an H200, not an 80 GB H100, where the shipped 128 does)."""
    from .distributed import RUN_STATE
    phase = RUN_STATE["phase"]
    train = getattr(cfg, "train", None)
    if phase.startswith("evaluating") and hasattr(getattr(cfg, "eval", None), "batch_size"):
        advice = f"lower eval.batch_size (now {cfg.eval.batch_size}; the samples drawn stay the same)"
    elif train is not None and hasattr(train, "batch_per_gpu"):
        gb = getattr(train, "global_batch", None)
        advice = (f"lower train.batch_per_gpu (now {train.batch_per_gpu})"
                  + (f"; gradient accumulation keeps train.global_batch={gb}" if gb else ""))
        fp8 = getattr(getattr(cfg, "fp8", None), "backend", "none")
        whole = getattr(getattr(cfg, "model", None), "use_checkpoint", False)
        if getattr(train, "recompute", None) == "none" and fp8 == "none" and not whole:  # what recompute allows
            advice += ", or set train.recompute=swiglu (docs/training.md, Activation memory)"
        if "train.batch_per_gpu" in resume_refuse:
            advice += " with checkpoint.reshard=true (a checkpoint resumes at another batch only resharded)"
    else:
        advice = "lower the batch"
    return (f"out of GPU memory while {phase} ({config.out_of_memory_figures(exc)}): {advice}; "
            f"{last_checkpoint_text(RUN_STATE['checkpoint_root'])}")


def add_debug_arg(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return parser


def user_errors(debug: bool = False, prefix: str = "error",
                out_of_memory: Optional[str] = None) -> typing.ContextManager[None]:
    """Exit 2 with `error: <one line>` on a user mistake (see module docstring): the one error path of every
    command (modeling.config.user_errors, whose `out_of_memory` names what to lower when the GPU's memory runs out),
    with the trainers' own mistakes (data, checkpoints, locks, disks) added."""
    return config.user_errors(debug, prefix, extra=user_error_types(), out_of_memory=out_of_memory)


def trainer_main(module: str, doc: Optional[str], schema: type, run: Callable[[Any], Any],
                 argv: Optional[list[str]] = None, extra_user_errors: tuple[type[BaseException], ...] = (),
                 resume_refuse: tuple[str, ...] = ()) -> int:
    """The command line both trainers share (`python -m train.train_dit` / `train.train_vae`): the config from
    YAML + overrides (a mistake: one line, exit 2), --print-config, --debug, then `run(cfg)`. A user mistake
    while running exits 2 in one line; too many non-finite steps (NonFiniteError) exits 1 after its checkpoint.
    `resume_refuse`: the trainer's RESUME_REFUSE, for the out-of-memory advice (out_of_memory_line)."""
    import logging

    import torch
    import torch.distributed as dist

    from modeling.config import ConfigError, add_config_args, config_from_args, dump_config
    from .guard import NonFiniteError

    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=(doc or "").split("\n")[0])
    add_config_args(parser, schema=schema)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    add_debug_arg(parser)
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(schema, args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    from .distributed import rank_tag
    tag = rank_tag()  # "" for a single process: its errors read as they always did
    prefix = f"{tag} " if tag else ""
    # INFO from rank 0 only (the other ranks would repeat it); warnings and errors from every rank, tagged
    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s {prefix}%(name)s %(levelname)s %(message)s")
    import threading
    previous_sigterm = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is threading.main_thread():  # (signal handlers live in the main thread)
        _raise_on_sigterm()  # one process too: a scheduler's SIGTERM (SLURM, kill) ends in a line saying so
    failed = None
    try:
        run(cfg)
    except (*user_error_types(), *extra_user_errors) as e:  # the input is wrong: one line, exit 2
        if args.debug or os.environ.get("VAVAE_DEBUG") == "1":
            raise
        print(f"{prefix}error: {one_line(e)}", file=sys.stderr)
        if tag:  # one rank's mistake (its data, its disk) while the others may wait in a collective: no teardown
            _exit_now(2)  # of the group (under NCCL its destroy is itself a collective and can block this rank)
        return 2
    except NonFiniteError as e:
        print(f"{prefix}error: {e}", file=sys.stderr)
        return 1
    except torch.OutOfMemoryError as e:  # the batch does not fit the card: a setting, one line, exit 2
        if args.debug or os.environ.get("VAVAE_DEBUG") == "1":
            raise
        print(f"{prefix}error: {out_of_memory_line(e, cfg, resume_refuse)}", file=sys.stderr)
        if tag:  # the other ranks may be blocked in a collective: no teardown of the group (as _rank_failed)
            _exit_now(2)
        return 2
    except LauncherStop as e:
        if tag:  # a rank of a multi-rank run: which rank was lost, if one was (_rank_failed)
            failed = e
        else:
            from .distributed import RUN_STATE
            print(f"error: stopped by SIGTERM while {RUN_STATE['phase']}; "
                  f"{last_checkpoint_text(RUN_STATE['checkpoint_root'])}", file=sys.stderr)
            return 128 + signal.SIGTERM
    except BaseException as e:  # noqa: BLE001 -- a rank of a multi-rank run: a lost peer, or a bug (below)
        if not tag or isinstance(e, (SystemExit, KeyboardInterrupt)):
            raise
        failed = e
    finally:
        if not tag and previous_sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous_sigterm)  # (main() called in-process: the caller's again; None:
            #                                                   a handler set from C, which Python cannot restore)
        if failed is None:
            from .distributed import stop_heartbeat
            stop_heartbeat()
        if dist.is_initialized() and failed is None:
            dist.destroy_process_group()  # (not after a lost rank: tearing down a broken group can block)
    if failed is not None:
        _rank_failed(failed, prefix)
    return 0


def _exit_now(status: int) -> None:
    """End this rank at once, its output flushed: no interpreter clean-up, no process-group teardown (the launcher
    stops the other ranks, which name this one as lost)."""
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(status)


def _rank_failed(exc: BaseException, prefix: str) -> None:
    """A rank of a multi-rank run failed: one line naming the lost rank(s) and the last complete checkpoint, or
    the traceback with the rank tag on every line (a bug). The process then ends at once (os._exit): nothing
    is left to save, and the interpreter's clean-up could block on the broken process group."""
    found = None
    for _ in range(2):  # a SIGTERM arriving while this is found out interrupts it once (the handler is one-shot)
        try:
            found = rank_failure_line(exc)
            break
        except LauncherStop:
            continue
    if found is not None:
        line, status = found
        print(f"{prefix}error: {line}", file=sys.stderr)
    else:
        status = 1
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        print("".join(f"{prefix}{ln}\n" for ln in text.rstrip("\n").split("\n")), end="", file=sys.stderr)
    _exit_now(status)
