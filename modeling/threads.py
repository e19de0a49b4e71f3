"""CPU threads, chosen in one place (issue 22: torch's default thread setup oversubscribed 2 shared cores).

The trainers, the demo, the tests and the benchmarks call `configure_threads()` before they do any work:

    configure_threads(n=None) -> int     the intra-op thread count now in force

n: an explicit count (`--threads`), else $VAVAE_THREADS, else $OMP_NUM_THREADS (a user's or a launcher's:
torchrun sets 1 for several ranks), else `default_threads()`: the cores this process may use (affinity and
cgroup quota) divided by the ranks on this node ($LOCAL_WORLD_SIZE), less one core left to the rest of the
machine, at least 1. It sets torch's intra-op threads (OpenMP and MKL: the convolutions and matmuls) to n and
its inter-op pool to 1 thread (these models run one op at a time; a second pool only competes for the cores).

Why one core is left free (measured on the 2-core dev machine, a KVM guest, issue 22; ms per step of the
demo's VA-VAE at batch 16 / its DiT at batch 64, 1 thread vs 2):
- machine idle, sleeping OpenMP threads (PASSIVE):   1 thread 520-590 / 43-55;  2 threads 860-1030 / 117-129
  (each parallel region wakes a halted virtual CPU);
- machine idle, spinning threads (ACTIVE or GOMP_SPINCOUNT): 2 threads 320-380 / 40-44 (the only gain);
- one core busy with another process: 1 thread 430-570 / 45-53; 2 threads PASSIVE 544 / 54, spinning
  980-2580 / 160-340.
One thread is the fastest or as fast in every case but idle-and-spinning, and spinning is up to 5x slower the
moment anything else runs. More threads pay where each op is big (a GPU node's data pipeline, big CPU
matmuls), and there the cores are many.

What torch reads only when it loads (OpenMP's wait policy) cannot be changed afterwards, and importing
anything from `modeling` loads torch (modeling/__init__.py): an entry point sets OMP_WAIT_POLICY=PASSIVE in
os.environ before its first torch / modeling import (examples/demo.py and tests/conftest.py do), and gives a
child process `thread_env(n)`. The counts need no such care: torch.set_num_threads works at any time before
the first parallel op. PASSIVE matters on a shared machine: a spinning OpenMP thread on a core that another
process needs made tiny CPU ops ~20x slower (a DiT step 2.8 s instead of 0.13 s).
"""
import math
import os

_state: dict = {}


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota (containers)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            n = min(n, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    return max(1, n)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"${name}={value!r} is not an integer thread count") from None


def default_threads() -> int:
    """The cores for this process (the node's cores shared by its $LOCAL_WORLD_SIZE ranks) less one, at least 1."""
    ranks = _env_int("LOCAL_WORLD_SIZE") or 1
    return max(1, available_cores() // max(1, ranks) - 1)


def resolve_threads(n: int | None = None) -> int:
    """The thread count configure_threads would use (see the module docstring), without touching torch."""
    if n is None:
        n = _env_int("VAVAE_THREADS")
    if n is None:
        n = _env_int("OMP_NUM_THREADS")
    if n is None:
        n = default_threads()
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    return n


def thread_env(n: int | None = None) -> dict:
    """Environment variables that fix the thread setup of a process started with them (or of this one, if set
    before torch is imported): the counts for OpenMP / MKL / OpenBLAS, and a sleeping OpenMP wait policy
    unless one is already set."""
    n = resolve_threads(n)
    env = {k: str(n) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "VAVAE_THREADS")}
    env["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
    return env


def configure_threads(n: int | None = None) -> int:
    """Set torch's intra-op threads to `resolve_threads(n)` and its inter-op pool to 1 (once, if still
    possible); returns the intra-op count. An explicit n (`--threads`) is also exported as $VAVAE_THREADS, so
    that a later configure_threads() in this process (a trainer the demo runs) and its child processes keep it."""
    import torch

    if n is not None:
        n = resolve_threads(n)
        os.environ["VAVAE_THREADS"] = str(n)
    n = resolve_threads(n)
    torch.set_num_threads(n)
    if "interop" not in _state:
        try:
            torch.set_num_interop_threads(1)  # allowed only before any inter-op parallel work has started
            _state["interop"] = 1
        except RuntimeError:
            _state["interop"] = torch.get_num_interop_threads()
    _state["threads"] = n
    return n


def default_loader_workers(threads: int | None = None) -> int:
    """Data-loader worker processes beside `threads` compute threads: the cores the compute leaves, less the
    one left to the rest of the machine, at most 4; 0 (decode in this process) on a machine of 2 cores, where
    decoding small JPEGs costs less than handing them over from another process."""
    spare = available_cores() - resolve_threads(threads) - 1
    return max(0, min(4, spare))


def describe_threads() -> dict:
    """What is in force now, for a result record (summary.json)."""
    import torch

    return {"intra_op": torch.get_num_threads(), "inter_op": torch.get_num_interop_threads(),
            "cores": available_cores(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
            "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS", "(unset)")}
