"""Which code produced a result: the commit every benchmark and `generate` record.

commit() -> "<sha>[+dirty]", in this order:
1. $VAVAE_COMMIT or $SUITE_COMMIT (bench/gpu_suite.sh exports the latter; on a lent GPU machine it comes from
   .suite_commit, which scripts/prepare_gpu_carry.sh writes here: the machine's copy of .git can be older than
   the working tree that travelled with it);
2. git rev-parse HEAD, "+dirty" when tracked files differ from it;
3. .suite_commit (a tree copied without .git);
else "unknown".
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def commit() -> str:
    for var in ("VAVAE_COMMIT", "SUITE_COMMIT"):
        if os.environ.get(var, "unknown") not in ("", "unknown"):
            return os.environ[var]
    head = _git("rev-parse", "HEAD")
    if head:
        return head + ("+dirty" if _git("status", "--porcelain", "--untracked-files=no") else "")
    f = REPO / ".suite_commit"
    return f.read_text().strip() if f.is_file() else "unknown"


def versions() -> dict:
    """Installed versions of the packages a result depends on, read without importing them (torchao's import
    logs its optional CUDA libraries; Transformer Engine's fails without a driver)."""
    import platform
    from importlib import metadata

    import torch
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for dist in ("triton", "deepspeed", "torchao", "numpy", "flash-attn", "flash_attn_3", "transformer_engine",
                 "nvidia-dali-cuda130"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def card(device: str | torch.device | None = None) -> str:
    """'cuda: NVIDIA H200' / 'cpu: x86_64 (2 threads)': the machine a number was measured on."""
    import platform

    import torch
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(dev)}"
    return f"cpu: {platform.machine() or 'unknown'} ({torch.get_num_threads()} threads)"


ENVIRONMENT_KEYS = ("card", "versions", "commit", "dirty", "kernels_requested", "kernels_ran", "kernels")


def environment(device: str | torch.device | None = None) -> dict:
    """The one environment block every result carries: the card, the versions, the commit, and what ran
    (kernels.describe(): the kernels backend asked for and the implementation each op and attention used).
    Call it after the measurement, so that `kernels_ran` lists what the measured code really ran (in this
    process: a case run in a child process records its own block).

    Keys: card, versions, commit (the sha, "+dirty" stripped), dirty, kernels_requested, kernels_ran
    ({op: implementation}), kernels (kernels.describe(): also attention's measured choice, the CUDA
    extension's state, Triton's version). ENVIRONMENT_KEYS lists them; tests check every result against it."""
    import kernels
    c = commit()
    described = kernels.describe()
    return {"card": card(device), "versions": versions(), "commit": c.removesuffix("+dirty"),
            "dirty": c.endswith("+dirty"), "kernels_requested": described.get("requested"),
            "kernels_ran": described.get("ops", {}), "kernels": described}
