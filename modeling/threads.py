"""CPU threads, chosen in one place: the trainers, the demo, the tests and the benchmarks call
`configure_threads()` before they do any work (issue 22: the default thread setup oversubscribed 2 cores).

configure_threads(n=None) -> the thread count used. n: an explicit count (`--threads`), else
$VAVAE_THREADS, else the cores this process may run on (os.sched_getaffinity). Sets torch's intra-op
threads and (once, before any parallel work) its inter-op threads.
"""
import os

_state: dict = {}


def available_cores() -> int:
    """The cores this process may run on (affinity-aware; cgroup-limited containers report theirs)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def configure_threads(n: "int | None" = None) -> int:
    import torch
    if n is None:
        env = os.environ.get("VAVAE_THREADS")
        n = int(env) if env else available_cores()
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    torch.set_num_threads(n)
    if "interop" not in _state:
        try:
            torch.set_num_interop_threads(1)  # only allowed before any inter-op parallel work has started
            _state["interop"] = 1
        except RuntimeError:
            _state["interop"] = torch.get_num_interop_threads()
    _state["threads"] = n
    return n
