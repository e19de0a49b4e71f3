"""Which code produced a result: the commit every benchmark and `generate` record.

commit() -> "<sha>[+dirty]", in this order:
1. $VAVAE_COMMIT or $SUITE_COMMIT (bench/gpu_suite.sh exports the latter; on a lent GPU machine it comes from
   .suite_commit, which scripts/prepare_gpu_carry.sh writes here: the machine's copy of .git can be older than
   the working tree that travelled with it);
2. git rev-parse HEAD, "+dirty" when tracked files differ from it;
3. .suite_commit (a tree copied without .git);
else "unknown".
"""
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _git(*args):
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def commit():
    for var in ("VAVAE_COMMIT", "SUITE_COMMIT"):
        if os.environ.get(var, "unknown") not in ("", "unknown"):
            return os.environ[var]
    head = _git("rev-parse", "HEAD")
    if head:
        return head + ("+dirty" if _git("status", "--porcelain", "--untracked-files=no") else "")
    f = REPO / ".suite_commit"
    return f.read_text().strip() if f.is_file() else "unknown"
