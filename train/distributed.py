"""Process-group setup for 1 CPU process, N CPU processes (gloo), one GPU or many nodes (NCCL), and what makes a
lost rank end the run instead of hanging it.

Launchers (torchrun, the deepspeed launcher, srun) set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT; a
plain `python -m train.train_dit` gets single-process defaults. A lost rank (its process killed, its node gone):
- every process group has a finite timeout, `dist.timeout_s` (the default one and every group made later, e.g.
  DeepSpeed's data-parallel group): a gloo collective or barrier waiting on a rank that stopped answering raises
  after it (one whose peer died raises at once: the connection closes); NCCL aborts the collective after it
  (TORCH_NCCL_ASYNC_ERROR_HANDLING=1 and the same timeout);
- every rank of a multi-rank run beats a heartbeat into the rendezvous store (a daemon thread: one counter per
  rank, +1 every `HEARTBEAT_S` seconds) and records who it is (node, host, local rank, pid). When a rank's run
  fails (a collective's error, its timeout, or the launcher's SIGTERM), `find_lost_ranks` reads the counters
  twice, `LOST_AFTER_S` apart: the ranks whose counter stood still are the lost ones, named with their node and
  host in the one-line error train/errors.py prints;
- torchrun and the deepspeed launcher then stop the remaining workers of their node and exit non-zero.
`rank_tag()` ("[rank 1/4 node 0 host-a]") prefixes every error a rank of a multi-rank run prints.
"""
import atexit
import json
import logging
import os
import socket
import threading
import time
import types
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional, Sequence, TypeVar, Union

import torch
import torch.distributed as dist

from modeling.config import ConfigError

T = TypeVar("T")
log = logging.getLogger("train")

HEARTBEAT_S = 1.0      # seconds between a rank's heartbeats
LOST_AFTER_S = 3.0     # a rank whose heartbeat stands still this long is lost
NODE_ENV = ("GROUP_RANK", "NODE_RANK", "CROSS_RANK", "SLURM_NODEID")  # torchrun, docs/launchers, deepspeed, srun


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


def node_rank() -> Optional[str]:
    """This process's node (machine) index from its launcher's environment, or None."""
    return next((os.environ[k] for k in NODE_ENV if os.environ.get(k, "") != ""), None)


def rank_tag() -> str:
    """"[rank R/W node N host]" for a rank of a multi-rank run (from the launcher's environment, so it is known
    before the process group exists), "" for a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return ""
    node = node_rank()
    return f"[rank {os.environ.get('RANK', '?')}/{world} node {node if node is not None else '?'} " \
           f"{socket.gethostname()}]"


# What this process is doing, for the error line when a rank is lost (train/base.py keeps it up to date).
RUN_STATE: dict = {"phase": "starting", "checkpoint_root": None}


def set_phase(phase: str) -> None:
    RUN_STATE["phase"] = phase


class Heartbeat:
    """This rank's heartbeat in the rendezvous store (see the module docstring). Store keys are scoped to the
    launch (torchrun's run id and restart count), so a restarted worker group starts from fresh counters."""

    def __init__(self, rank: int, world_size: int, timeout_s: float, interval_s: float = HEARTBEAT_S) -> None:
        self.rank, self.world_size, self.interval_s = rank, world_size, interval_s
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        self.where = f"{host}:{port}"
        store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=max(5.0, min(timeout_s, 60))),
                              wait_for_workers=False)
        scope = f"vavae/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
        self.store = dist.PrefixStore(scope, store)
        self.lock = threading.Lock()  # the thread and find_lost_ranks share one connection
        me = {"node": node_rank(), "host": socket.gethostname(), "local_rank": os.environ.get("LOCAL_RANK"),
              "pid": os.getpid()}
        self.store.set(f"who/{rank}", json.dumps(me))
        self.beat()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="vavae-heartbeat", daemon=True)
        self.thread.start()

    def beat(self) -> None:
        with self.lock:
            self.store.add(f"hb/{self.rank}", 1)

    def _run(self) -> None:
        while not self.stopped.wait(self.interval_s):
            try:
                self.beat()
            except Exception:  # noqa: BLE001 -- the store is gone (its host died): nothing left to beat into
                return

    def stop(self) -> None:
        """End the thread and wait for it: a daemon thread still inside the store's C++ client when the
        interpreter finalises would be unwound by pthread_exit through it (std::terminate, SIGABRT)."""
        self.stopped.set()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout=10 * self.interval_s)

    def counters(self) -> list[int]:
        with self.lock:
            return [int(self.store.add(f"hb/{r}", 0)) for r in range(self.world_size)]

    def who(self, rank: int) -> str:
        """"rank R (node N, host H, pid P)" from what that rank recorded at start-up."""
        try:
            with self.lock:
                me = json.loads(self.store.get(f"who/{rank}").decode())
        except Exception:  # noqa: BLE001
            return f"rank {rank}"
        return f"rank {rank} (node {me.get('node') if me.get('node') is not None else '?'}, host {me.get('host')}, " \
               f"pid {me.get('pid')})"

    def find_lost(self, window_s: float = LOST_AFTER_S) -> list[str]:
        """The other ranks whose heartbeat stands still over `window_s` seconds, described; [] when all beat.
        Raises RuntimeError naming the store when the store itself is unreachable."""
        try:
            before = self.counters()
            time.sleep(window_s)
            after = self.counters()
        except Exception as e:  # noqa: BLE001
            raise RuntimeError(f"the rendezvous store at {self.where} is unreachable ({type(e).__name__}): the "
                               f"node hosting it (node 0: its launcher, or rank 0) is lost") from None
        return [self.who(r) for r in range(self.world_size) if r != self.rank and after[r] == before[r]]


_HEARTBEAT: Optional[Heartbeat] = None


def start_heartbeat(timeout_s: float) -> None:
    """Start this rank's heartbeat (multi-rank runs; once per process). A store that cannot be reached is
    logged, not fatal: only the naming of a lost rank depends on it."""
    global _HEARTBEAT
    if _HEARTBEAT is not None or not dist.is_initialized() or dist.get_world_size() <= 1:
        return
    try:
        _HEARTBEAT = Heartbeat(dist.get_rank(), dist.get_world_size(), timeout_s)
    except Exception as e:  # noqa: BLE001
        log.warning("no heartbeat (a lost rank will not be named): %s", e)
        return
    atexit.register(stop_heartbeat)


def stop_heartbeat() -> None:
    """Stop this rank's heartbeat (at exit; trainer_main at the end of a run)."""
    global _HEARTBEAT
    if _HEARTBEAT is not None:
        _HEARTBEAT.stop()
        _HEARTBEAT = None


def find_lost_ranks() -> Optional[list[str]]:
    """The lost ranks described (module docstring), [] when every rank still beats, None without a heartbeat.
    Takes LOST_AFTER_S seconds."""
    if _HEARTBEAT is None:
        return None
    return _HEARTBEAT.find_lost()


class DeepSpeedUnavailable(ConfigError):
    """DeepSpeed is not installed: a setup mistake, one line at the command line (train.errors: a ConfigError),
    not a ModuleNotFoundError traceback."""


def import_deepspeed() -> types.ModuleType:
    """The deepspeed module, or DeepSpeedUnavailable naming what needs it and how to install it. Only DeepSpeed's
    own absence is translated: an ImportError from inside an installed DeepSpeed (a broken dependency) is a
    different problem and keeps its traceback."""
    try:
        import deepspeed
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != "deepspeed":
            raise
        raise DeepSpeedUnavailable("DeepSpeed is not installed, and the trainers (train.train_dit, train.train_vae "
                                   "and the benchmarks that build them) run on its engine: pip install "
                                   "deepspeed==0.19.8 (the pinned version; or pip install -e '.[train]')") from e
    return deepspeed


_ZERO_NORM_MODULES = ("deepspeed.runtime.zero.utils", "deepspeed.runtime.zero.stage_1_and_2",
                     "deepspeed.runtime.zero.stage3")
_deepspeed_norm_dtype = {}  # module name -> DeepSpeed's own get_norm_dtype, kept to restore it


def set_zero_grad_norm_dtype(dtype: str) -> str:
    """How DeepSpeed's ZeRO 1-3 computes gradient norms (clipping, the logged grad_norm): "fp64", its own
    (`deepspeed.runtime.zero.utils.get_norm_dtype`: fp64 where the device has it; each gradient partition is first
    cast to double: 4.0 + 2.8 ms a step at XL/1 on an H200, bench/results/2026-12-04_h200.md), or "fp32", as
    torch.nn.utils.clip_grad_norm_ computes it in the authors' trainer: in the gradients' own dtype, and under ZeRO
    1/2 the per-gradient norms in one multi-tensor kernel (`torch._foreach_norm`, as clip_grad_norm_ does) where
    DeepSpeed launches one norm kernel per gradient from a Python loop (349 at XL/1: host-bound, the GPU waiting
    between kernels of a few microseconds). DeepSpeed imports get_norm_dtype by name into its ZeRO modules: each
    module's name is rebound, and the ZeRO 1/2 optimizer's get_grad_norm_direct (process-wide; "fp64" puts
    DeepSpeed's back). Returns what is in force, for the start-up line."""
    import importlib
    import_deepspeed()
    found = []
    for name in _ZERO_NORM_MODULES:
        mod = importlib.import_module(name)
        own = _deepspeed_norm_dtype.setdefault(name, getattr(mod, "get_norm_dtype", None))
        if own is None:
            continue
        mod.get_norm_dtype = own if dtype == "fp64" else _fp32_norm_dtype
        found.append(name.rsplit(".", 1)[1])
    zero12 = importlib.import_module("deepspeed.runtime.zero.stage_1_and_2")
    optimizer = getattr(zero12, "DeepSpeedZeroOptimizer", None)
    own_direct = _deepspeed_norm_direct.setdefault("zero12", getattr(optimizer, "get_grad_norm_direct", None))
    if own_direct is not None:
        optimizer.get_grad_norm_direct = own_direct if dtype == "fp64" else _foreach_grad_norm_direct
    if dtype == "fp64":
        return "fp64 (DeepSpeed's)"
    if "stage_1_and_2" not in found:  # this DeepSpeed computes its norms some other way: say so, do not guess
        log.warning("train.grad_norm_dtype fp32: this DeepSpeed has no get_norm_dtype in its ZeRO stage 1/2 "
                    "module; its gradient norms keep DeepSpeed's own dtype")
        return "DeepSpeed's own (fp32 not applied: no get_norm_dtype in this DeepSpeed)"
    return f"fp32 ({', '.join(found)}{'; ZeRO 1/2 foreach' if own_direct is not None else ''})"


_deepspeed_norm_direct = {}  # "zero12" -> DeepSpeedZeroOptimizer.get_grad_norm_direct as DeepSpeed defines it


def _foreach_grad_norm_direct(self, gradients, params, norm_type=2):
    """DeepSpeed 0.19's DeepSpeedZeroOptimizer.get_grad_norm_direct (ZeRO 1/2: the 2-norm of this rank's gradient
    partition, all-reduced over the data-parallel and model-parallel groups, non-finite masked to -1), with the
    per-gradient norms taken by torch._foreach_norm in one call. The same selection of gradients (no padding, no
    pipeline-replicated parameter, model-parallel rank 0 or a model-parallel parameter), the same dtype
    (get_norm_dtype), the same sum of squares and collectives. Other norms than 2: DeepSpeed's own."""
    from deepspeed.runtime.zero import stage_1_and_2 as z
    if float(norm_type) != 2.0:
        return _deepspeed_norm_direct["zero12"](self, gradients, params, norm_type)
    dtype = z.get_norm_dtype()
    grads = []
    for g, p in zip((g for g in gradients if not getattr(g, "_zero_padding", False)), params):
        if hasattr(p, z.PIPE_REPLICATED) and p.ds_pipe_replicated:
            continue
        if z.is_model_parallel_parameter(p) or self.model_parallel_rank == 0:
            grads.append(g.data.detach().to(dtype))
    if grads:
        total_norm = torch.stack(torch._foreach_norm(grads, 2.0)).pow(2.0).sum().float()
    else:
        total_norm = torch.tensor(0.0, dtype=torch.float32).to(self.device)
    z.dist.all_reduce(total_norm, op=z.dist.ReduceOp.SUM, group=self.dp_process_group)
    self._model_parallel_all_reduce(tensor=total_norm, op=z.dist.ReduceOp.SUM)
    total_norm = total_norm.pow(0.5)
    z.mask_nan_or_inf_with_val_inplace(total_norm, device=self.device)
    return total_norm


def _fp32_norm_dtype() -> torch.dtype:
    return torch.float32


def init_distributed(backend: str = "auto", timeout_s: int = 600) -> DistInfo:
    """The process group (backend auto: NCCL with a GPU, else gloo) with `timeout_s` on every collective, and this
    rank's heartbeat when there are several ranks."""
    if "RANK" not in os.environ:  # plain `python ...`: one process
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():  # asked for by name (dist.backend): say so, not torch's AttributeError
            from modeling.config import ConfigError
            raise ConfigError("dist.backend: nccl needs CUDA GPUs and none is visible here; use dist.backend: gloo "
                              "(or auto)")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    # Groups made later without a timeout (DeepSpeed's data-parallel group: new_group(ranks)) would get torch's
    # default (30 min for gloo, 10 for NCCL): a rank stalled inside ZeRO's gradient reduction would hold the
    # others that long. Ours is the default for every group this process makes.
    from torch.distributed import distributed_c10d
    distributed_c10d.default_pg_timeout = timedelta(seconds=timeout_s)
    if isinstance(getattr(distributed_c10d, "default_pg_nccl_timeout", None), timedelta):
        distributed_c10d.default_pg_nccl_timeout = timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        if backend == "gloo":  # (DeepSpeed JIT-builds its CPU shared-memory op when the group starts)
            clear_stale_extension_locks()
        deepspeed = import_deepspeed()
        _forget_deepspeed_groups()
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:
            # One process needs no rendezvous: an in-process store, no TCP port (a port picked free can be
            # taken by another process before the store binds it: EADDRINUSE). DeepSpeed adopts the group.
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=timedelta(seconds=timeout_s))
        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s))
    start_heartbeat(timeout_s)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


STALE_LOCK_S = 15 * 60  # a JIT build of DeepSpeed's CPU op takes a minute or two: a lock this old is a dead one's


def clear_stale_extension_locks(max_age_s: float = STALE_LOCK_S) -> list[str]:
    """Remove the build locks of DeepSpeed's CPU shared-memory op (torch's JIT extension folder) older than
    `max_age_s`: a process killed during that build leaves its `lock`, and every later process that starts a
    gloo group waits on it for ever, silently. Returns the removed paths (each logged)."""
    import glob
    import sys
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.expanduser("~/.cache/torch_extensions")
    removed = []
    for lock in glob.glob(os.path.join(root, "*", "deepspeed_shm_comm", "lock")) + \
            glob.glob(os.path.join(root, "deepspeed_shm_comm", "lock")):
        try:
            if time.time() - os.path.getmtime(lock) > max_age_s:
                os.remove(lock)
                removed.append(lock)
                print(f"removed the stale build lock {lock} (left by a process killed while building DeepSpeed's "
                      f"CPU op; it would have blocked this start for ever)", file=sys.stderr)
        except OSError:  # gone meanwhile, or not ours to remove: DeepSpeed's own wait then decides
            pass
    return removed


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
