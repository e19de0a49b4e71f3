"""Checkpoints that never lose a run.

Layout under a run's checkpoint root:

    step_0000500/          a complete checkpoint (any number of files, written by every rank)
    step_0001000/
    step_0001500.tmp/      being written (or left by a killed writer; removed by the next save)
    latest.json            {"step": 1000, "dir": "step_0001000"}  -- the pointer, written atomically

A checkpoint directory is filled under its `.tmp` name, every file is fsynced, then rank 0 renames it
(atomic on POSIX) and rewrites `latest.json` by temp file + fsync + rename. A kill -9 at any instant
therefore leaves either the old pointer (old checkpoint intact) or the new one (new checkpoint
complete). "Latest" is the step number in the pointer, never file size or mtime; without a readable
pointer the highest complete `step_*` directory is used. Old checkpoints beyond `keep_last` are
deleted only after the pointer moved on.
"""
import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

POINTER = "latest.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path, write):
    """Call write(file) on a temp file beside `path`, fsync, rename over `path`: a reader (or a crash at
    any instant) sees either the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path, data: bytes):
    _atomic_write(path, lambda f: f.write(data))


def atomic_torch_save(obj, path):
    """torch.save with the same guarantee as atomic_write_bytes (temp file + fsync + rename)."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def rng_state():
    """Every host-side RNG this process uses (python, numpy, torch CPU, all CUDA devices)."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s):
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def fsync_tree(root):
    """fsync every file and directory below `root` (DeepSpeed writes without fsync)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(dirpath)


class CheckpointManager:
    """Directory-per-step checkpoints with an atomic pointer and keep-last-k.

    Multi-rank use: every rank calls `begin(step)` (rank 0 clears a stale temp dir first; the caller
    puts a barrier between begin and the writes), writes into the returned directory, then after a
    barrier rank 0 alone calls `commit(step)`.
    """

    def __init__(self, root, keep_last=3):
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
        self.root = Path(root)
        self.keep_last = keep_last

    def step_dir(self, step):
        return self.root / f"step_{step:07d}"

    def tmp_dir(self, step):
        return self.root / f"step_{step:07d}.tmp"

    def begin(self, step, is_main=True):
        """Return the temp directory to write step `step` into."""
        tmp = self.tmp_dir(step)
        if is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob("step_*.tmp"):  # a writer killed mid-save
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        return tmp

    def commit(self, step):
        """Make the temp directory of `step` the latest checkpoint (rank 0 only, after all writes)."""
        tmp, final = self.tmp_dir(step), self.step_dir(step)
        if not tmp.is_dir():
            raise FileNotFoundError(f"no checkpoint being written for step {step}: {tmp} is missing")
        fsync_tree(tmp)
        if final.exists():  # re-saving a step (e.g. the final save after a periodic one)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        atomic_write_bytes(self.root / POINTER, json.dumps({"step": step, "dir": final.name}).encode())
        self._prune()
        return final

    def steps(self):
        """Steps with a complete checkpoint directory, ascending."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and p.is_dir():
                found.append(int(m.group(1)))
        return sorted(found)

    def latest(self):
        """(step, directory) of the newest complete checkpoint, or None."""
        try:
            ptr = json.loads((self.root / POINTER).read_text())
            path = self.root / ptr["dir"]
            if path.is_dir() and int(ptr["step"]) >= 0:
                return int(ptr["step"]), path
        except (OSError, ValueError, KeyError, TypeError):
            pass
        steps = self.steps()
        return (steps[-1], self.step_dir(steps[-1])) if steps else None

    def _prune(self):
        if self.keep_last is None:
            return
        for step in self.steps()[:-self.keep_last]:
            shutil.rmtree(self.step_dir(step), ignore_errors=True)
