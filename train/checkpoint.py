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

Hardening against careless or hostile input (issue 12):
- Every file a trainer reads back goes through `safe_torch_load` (weights_only=True): resume state holds
  tensors and plain types only (`rng_state` stores numpy's state as a tensor; old files with a numpy array
  still load, with numpy's array reconstruction allow-listed and nothing else). `deepspeed_safe_load()`
  makes DeepSpeed's own `load_checkpoint` load that way too.
- `RunLock` (`CheckpointManager.acquire()`): one run per checkpoint folder. An advisory `flock` on
  `run.lock`, which records the owner's host, pid and start time; the kernel drops the lock when the owner
  dies, so a crashed run's lock is detected as stale and taken over with a warning.
- `check_writable(dir)` before training starts; a full disk is reported as `DiskFullError` naming the path.
- Each committed step directory carries `COMPLETE.json` (every file and its size). `latest_valid()` skips a
  checkpoint that is truncated or incomplete (with a warning) and returns the newest complete one.
- Pruning renames a directory to `step_N.deleting` (atomic) before deleting it: a kill mid-prune never leaves
  a half-deleted checkpoint that looks complete; leftovers are removed by the next save.
- Written files get the usual permissions (0666 & ~umask), not mkstemp's 0600.

And against a tampered or reused folder (issue 21):
- `latest.json` must name a `step_NNNNNNN` folder of its own step directly inside the checkpoint folder (a
  pointer to `../../other/step_6`, or to a symlink leading out, is refused: another run's checkpoint would be
  resumed under this run's name); step folders that are symlinks are not checkpoints of this folder.
- `checkpoint.resume=never` on a folder that already holds checkpoints is refused, naming the folder and how
  to start fresh (its keep-last pruning would otherwise delete the new run's checkpoints as "older").
- `run.lock` is opened with O_NOFOLLOW: a symlink planted there is refused, its target never truncated.
- A save that fails (a full disk) removes its `.tmp` folder, so no half checkpoint is left behind.
"""
import contextlib
import errno
import json
import logging
import os
import random
import re
import shutil
import socket
import stat
import tempfile
import time
import weakref
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from modeling.safe_load import (CheckpointLoadError, CorruptCheckpointError, UnsafeCheckpointError,  # noqa: F401
                                numpy_array_globals, safe_torch_load, torch_load_guard)

log = logging.getLogger("train")

POINTER = "latest.json"
MANIFEST = "COMPLETE.json"
REPLACED = ".replaced"  # suffix of a re-saved step's old copy while the new one moves in (commit)
LOCK_FILE = "run.lock"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class DiskFullError(OSError):
    """A write failed because the filesystem is full (the message names the path and the free space)."""


class NotWritableError(OSError):
    """A folder a run must write to cannot be written (checked before training starts)."""


class RunLockedError(RuntimeError):
    """Another live run holds the checkpoint folder (the message names its host and pid), or its lock file is
    not a plain file (a symlink planted there)."""


class CheckpointPointerError(CheckpointLoadError):
    """latest.json names something other than a step folder of its own checkpoint folder."""


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _free_bytes(path):
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def _fmt_bytes(n):
    if n is None:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


_WRITE_FAILED = ("unexpected pos", "file write failed", "PytorchStreamWriter failed", "No space left")


def as_disk_full(exc: BaseException, path: Union[str, Path]) -> Optional[DiskFullError]:
    """DiskFullError for `exc` if it is a failed write to a full disk (ENOSPC, or torch's zip writer's
    "unexpected pos" after a short write), else None."""
    if isinstance(exc, DiskFullError):
        return exc
    is_enospc = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if not is_enospc and not (isinstance(exc, (RuntimeError, OSError)) and any(k in str(exc) for k in _WRITE_FAILED)):
        return None
    free = _free_bytes(path)
    what = "disk full" if is_enospc or (free is not None and free < (64 << 20)) else \
        "write failed (disk full or I/O error)"
    err = DiskFullError(errno.ENOSPC, f"{what} while writing {path}: {_fmt_bytes(free)} free on that filesystem; "
                                      "free some space (or point the run at another disk) and resume")
    return err


@contextlib.contextmanager
def disk_full_errors(path: Union[str, Path]) -> Iterator[None]:
    """Re-raise a failed write below `path` (e.g. DeepSpeed's save_checkpoint) as DiskFullError."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 -- translated only when it is a failed write
        full = as_disk_full(e, path)
        if full is None or full is e:
            raise
        raise full from None


def check_writable(path: Union[str, Path], what: str = "folder") -> Path:
    """Create `path` if needed and write, fsync and delete a probe file in it; NotWritableError or
    DiskFullError (one line, naming the folder) otherwise. Call before training starts."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write_probe.")
        try:
            os.write(fd, b"x" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        full = as_disk_full(e, path)
        if full is not None:
            raise full from None
        raise NotWritableError(e.errno, f"{what} {path} is not writable ({e.strerror or e}); fix its permissions "
                                        "or choose another folder") from None
    return path


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
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a checkpoint is as readable as any file
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        full = as_disk_full(e, path) if isinstance(e, Exception) else None
        if full is not None and full is not e:
            raise full from None
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: Union[str, Path], data: bytes) -> None:
    _atomic_write(path, lambda f: f.write(data))


def atomic_torch_save(obj: Any, path: Union[str, Path]) -> None:
    """torch.save with the same guarantee as atomic_write_bytes (temp file + fsync + rename)."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def rng_state() -> dict[str, Any]:
    """Every RNG this process uses (python, numpy, torch CPU, and its CUDA device's: the rank's own, so that a
    resume on another number of GPUs per node restores each rank's stream), as tensors and plain types only, so
    that it loads with torch.load(weights_only=True)."""
    _, key, pos, has_gauss, gauss = np.random.get_state()
    return {"format": 3, "python": random.getstate(),
            "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                      "gauss": float(gauss)},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(s: dict[str, Any]) -> None:
    """Restore `rng_state()`; also the older format (numpy's state tuple with an ndarray)."""
    version, internal, gauss = s["python"]
    random.setstate((version, tuple(internal), gauss))
    n = s["numpy"]
    if isinstance(n, dict):
        key = n["key"].numpy() if isinstance(n["key"], torch.Tensor) else np.asarray(n["key"])
        np.random.set_state(("MT19937", key.astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    else:
        np.random.set_state(n)
    torch.set_rng_state(s["torch"])
    cuda = s.get("cuda")
    if cuda is None or not torch.cuda.is_available():
        return
    if isinstance(cuda, torch.Tensor):  # format 3: this rank's device
        torch.cuda.set_rng_state(cuda)
    else:  # format 2: every device of the saving node, by index; restoring all of them failed (IndexError) on a
        # node with fewer GPUs. The same node layout: this rank's own state. Another layout: the state of the
        # device with this index on the saving node, not this rank's (its CUDA stream then resumes inexactly)
        dev = torch.cuda.current_device()
        if dev < len(cuda):
            torch.cuda.set_rng_state(cuda[dev])


def load_state(path: Union[str, Path], what: str = "resume state") -> Any:
    """A trainer state file (trainer.pt, rank_*.pt, state.pt) loaded with weights_only=True. numpy's array
    reconstruction is allow-listed (and nothing else) so that checkpoints written before the RNG state was
    stored as tensors still resume. One-line CheckpointLoadError / FileNotFoundError naming the file."""
    return safe_torch_load(path, what, allow=numpy_array_globals())


def deepspeed_allowed_globals() -> list[Callable[..., Any]]:
    """The non-tensor types DeepSpeed 0.19 pickles into its checkpoints (loss scaler, ZeRO stage enum,
    fragment addresses), allow-listed by class: none of them runs code when rebuilt."""
    found = []
    for mod, names in (("deepspeed.runtime.fp16.loss_scaler", ("LossScaler", "DynamicLossScaler", "LossScalerBase")),
                       ("deepspeed.runtime.zero.config", ("ZeroStageEnum",)),
                       ("deepspeed.utils.tensor_fragment", ("fragment_address",)),
                       ("deepspeed.runtime.zero.offload_config", ("OffloadDeviceEnum",))):
        try:
            module = __import__(mod, fromlist=list(names))
        except ImportError:
            continue
        found += [getattr(module, n) for n in names if hasattr(module, n)]
    return found + numpy_array_globals()


@contextlib.contextmanager
def deepspeed_safe_load(what: str = "DeepSpeed checkpoint file") -> Iterator[None]:
    """Inside this block every torch.load (DeepSpeed's checkpoint engines call it with weights_only=False)
    loads with weights_only=True and DeepSpeed's own types allow-listed; a file that asks for anything else
    raises UnsafeCheckpointError naming it, a truncated one CorruptCheckpointError. Use around
    `engine.load_checkpoint(...)`; not thread-safe (it swaps torch.load for the duration)."""
    with torch_load_guard(what, deepspeed_allowed_globals()):
        yield


def fsync_tree(root: Union[str, Path]) -> None:
    """fsync every file and directory below `root` (DeepSpeed writes without fsync)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(dirpath)


# ----------------------------------------------------------------------------- one run per folder

def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """Advisory lock on a checkpoint folder: `acquire()` or RunLockedError naming the other run.

    `flock` on ROOT/run.lock (held for the life of the process; the kernel releases it when the process dies,
    however it dies), and the file records {"host", "pid", "started", "argv"} for the error message. Found
    unlocked but naming another owner: that run ended without releasing (a crash, a kill) -- a stale lock,
    taken over with a warning. Where the filesystem has no flock, the record alone decides: same host and a
    dead pid is stale; another host is refused (delete the file once you know that run is gone).
    """

    def __init__(self, root: Union[str, Path]) -> None:
        self.root = Path(root)
        self.path = self.root / LOCK_FILE
        self._fd = None
        self.took_over = None  # the stale owner record, when one was replaced

    @staticmethod
    def _me():
        import sys
        return {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "argv": " ".join(sys.argv)[:300]}

    def _read_owner(self, fd):
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            data = os.read(fd, 1 << 16).decode(errors="replace").strip()
            return json.loads(data) if data else None
        except (OSError, ValueError):
            return None

    @staticmethod
    def describe(owner: Optional[dict[str, Any]]) -> str:
        if not owner:
            return "another run"
        return (f"the run started {owner.get('started', '?')} on host {owner.get('host', '?')} "
                f"(pid {owner.get('pid', '?')}{', ' + owner['argv'] if owner.get('argv') else ''})")

    def acquire(self) -> "RunLock":
        import fcntl
        if self._fd is not None:
            return self
        self.root.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(self.path)
        earlier = _HELD.get(key)
        earlier = earlier() if earlier is not None else None
        if earlier is not None and earlier.held:  # a new trainer in this process (e.g. train, then resume)
            log.warning("checkpoint folder %s: taking the lock over from an earlier trainer in this process",
                        self.root)
            earlier.release()
        try:  # never through a symlink (its target would be truncated below), never blocking on a FIFO
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666 & ~_umask())
        except OSError as e:
            if e.errno == errno.ELOOP or os.path.islink(self.path):
                raise RunLockedError(
                    f"{self.path} is a symbolic link (to {os.readlink(self.path)}), not this folder's lock file; it "
                    "is never followed (taking the lock would empty its target): delete the link") from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise RunLockedError(f"{self.path} is not a plain file (a FIFO, device or socket); delete it")
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                have_flock = True
            except BlockingIOError:
                raise RunLockedError(
                    f"checkpoint folder {self.root} is in use by {self.describe(self._read_owner(fd))}; stop that "
                    f"run first or give this one another checkpoint folder ({self.path})") from None
            except OSError as e:
                if e.errno not in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK):
                    raise
                have_flock = False
            me = self._me()
            owner = self._read_owner(fd)
            if owner and (owner.get("host"), owner.get("pid")) != (me["host"], me["pid"]):
                if not have_flock and (owner.get("host") != me["host"] or _pid_alive(int(owner.get("pid", -1)))):
                    raise RunLockedError(
                        f"checkpoint folder {self.root} is recorded as in use by {self.describe(owner)} and this "
                        f"filesystem cannot tell whether that run is alive; if it is gone, delete {self.path}")
                self.took_over = owner
                log.warning("checkpoint folder %s: taking over the stale lock of %s (that run ended without "
                            "releasing it)", self.root, self.describe(owner))
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, json.dumps(me).encode())
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        _HELD[key] = weakref.ref(self)
        return self

    def release(self) -> None:
        """Clear the record and drop the lock (the file stays: deleting it would race with a new owner)."""
        if self._fd is None:
            return
        import fcntl
        try:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        except OSError:
            pass
        finally:
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass


_HELD = {}  # realpath of a lock file -> weakref to the RunLock this process holds on it


def acquire_run_lock(root: Union[str, Path], is_main: bool = True, writable: Iterable[Union[str, Path]] = (),
                     check: Optional[Callable[[], None]] = None) -> Optional[RunLock]:
    """Before training: rank 0 checks that `root` (and the folders in `writable`, e.g. the logging dir) can be
    written, takes the RunLock of `root` and runs `check()` (e.g. the resume=never check); with torch.distributed
    initialised every rank learns the outcome, so a refused run stops on all ranks with the same one-line error
    (RunLockedError, NotWritableError, DiskFullError or ResumeConfigError). Returns the lock on rank 0 (keep it
    for the life of the run), else None."""
    import torch.distributed as dist
    lock, error = None, None
    if is_main:
        try:
            for folder in (root, *writable):
                check_writable(folder, "checkpoint folder" if folder == root else "folder")
            lock = RunLock(root).acquire()
            if check is not None:
                check()
        except (RunLockedError, OSError, ResumeConfigError) as e:
            error = f"{type(e).__name__}: {e}"
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        if lock is not None:
            lock.release()
        kind, _, msg = error.partition(": ")
        raise {"RunLockedError": RunLockedError, "DiskFullError": DiskFullError,
               "ResumeConfigError": ResumeConfigError}.get(kind, NotWritableError)(msg)
    return lock


# ----------------------------------------------------------------------------- resume checks

def config_changes(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """['section.key: old -> new', ...] between two plain config dicts (e.g. the one a checkpoint embeds and
    this run's `to_dict(cfg)`)."""
    out = []
    for k in sorted(set(saved) | set(current), key=str):
        a, b = saved.get(k, "<absent>"), current.get(k, "<absent>")
        key = f"{prefix}{k}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, key + ".")
        elif a != b:
            out.append(f"{key}: {a!r} -> {b!r}")
    return out


def check_resume_config(saved: dict, current: dict, path: Union[str, Path], refuse: Sequence[str] = (),
                        warn: Sequence[str] = (), ignore: Sequence[str] = (),
                        remedies: Optional[dict[str, str]] = None) -> list[str]:
    """Compare the config stored in checkpoint `path` with this run's. A change under a `refuse` prefix
    raises ResumeConfigError listing every change (and the remedy of each `remedies` prefix a change falls under);
    under a `warn` prefix it is logged as a WARNING (each key: old -> new) and returned. Keys under `ignore` (e.g.
    "checkpoint.", "logging.") are not reported."""
    changes = [c for c in config_changes(saved, current) if not any(c.startswith(p) for p in ignore)]
    hard = [c for c in changes if any(c.startswith(p) for p in refuse)]
    if hard:
        fixes = dict.fromkeys(fix for p, fix in (remedies or {}).items() if any(c.startswith(p) for c in hard))
        raise ResumeConfigError(f"cannot resume from {path}: settings changed since it was written: "
                                + "; ".join(hard) + "".join(f"; {fix}" for fix in fixes))
    soft = [c for c in changes if any(c.startswith(p) for p in warn)]
    for c in soft:
        log.warning("resuming %s with a changed setting: %s (the run continues with the new value; resume is "
                    "no longer exact)", path, c)
    return soft


class ResumeConfigError(ValueError):
    """The checkpoint was written with settings this run cannot continue."""


# ----------------------------------------------------------------------------- the manager

class CheckpointManager:
    """Directory-per-step checkpoints with an atomic pointer and keep-last-k.

    Multi-rank use: every rank calls `begin(step)` (rank 0 clears a stale temp dir first; the caller
    puts a barrier between begin and the writes), writes into the returned directory, then after a
    barrier rank 0 alone calls `commit(step)`.
    """

    def __init__(self, root: Union[str, Path], keep_last: Optional[int] = 3, resume: str = "auto") -> None:
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
        if resume not in ("auto", "never"):
            raise ValueError(f"resume must be 'auto' or 'never', got {resume!r}")
        self.root = Path(root)
        self.keep_last = keep_last
        self.resume = resume  # "never": this folder must hold no checkpoint yet (check_fresh_start)

    def step_dir(self, step: int) -> Path:
        return self.root / f"step_{step:07d}"

    def tmp_dir(self, step: int) -> Path:
        return self.root / f"step_{step:07d}.tmp"

    def acquire(self) -> RunLock:
        """Take the folder's RunLock (see RunLock); keep the returned lock for the life of the run."""
        self.lock = RunLock(self.root).acquire()
        return self.lock

    def prepare(self, is_main: bool = True, writable: Iterable[Union[str, Path]] = ()) -> Optional[RunLock]:
        """What a trainer calls before building anything big: the folder (and `writable`) checked writable, its
        RunLock taken by rank 0 and, with resume="never", the folder checked free of checkpoints; the outcome
        shared with every rank (see acquire_run_lock)."""
        def check() -> None:
            self.recover_replaced()
            if self.resume == "never":
                self.check_fresh_start()
        self.lock = acquire_run_lock(self.root, is_main, writable, check=check)
        return self.lock

    def recover_replaced(self) -> None:
        """A re-saved step's old copy (`step_N.replaced`, see commit) is put back when the run was killed between
        moving it aside and moving the new one in, and deleted when the new one is in place."""
        for old in sorted(self.root.glob("step_*" + REPLACED)):
            final = old.with_name(old.name[:-len(REPLACED)])
            if not _STEP_DIR.match(final.name) or old.is_symlink():
                continue
            if final.exists() or os.path.islink(final):
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(old, final)
                _fsync_dir(self.root)
                log.warning("checkpoint folder %s: %s was being replaced by a new save of its step when the run "
                            "stopped; the old copy is back", self.root, final.name)

    def check_fresh_start(self) -> None:
        """For checkpoint.resume=never: ResumeConfigError naming the folder and how to start fresh when it already
        holds checkpoints (this run's keep-last pruning would delete its own newer checkpoints as the "oldest"
        and leave latest.json pointing at a deleted step)."""
        found = [p.name for p in sorted(self.root.glob("step_*")) if _STEP_DIR.match(p.name)]
        if (self.root / POINTER).exists() or os.path.islink(self.root / POINTER):
            found.append(POINTER)
        if found:
            shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
            raise ResumeConfigError(
                f"checkpoint.resume=never, but checkpoint folder {self.root} already holds checkpoints ({shown}); "
                "to start fresh give the run another checkpoint.dir (or delete those), or set "
                "checkpoint.resume=auto to continue from them")

    def release(self) -> None:
        """Give the folder's lock back (the end of a run)."""
        lock = getattr(self, "lock", None)
        if lock is not None:
            lock.release()

    def begin(self, step: int, is_main: bool = True) -> Path:
        """Return the temp directory to write step `step` into."""
        tmp = self.tmp_dir(step)
        if is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in list(self.root.glob("step_*.tmp")) + list(self.root.glob("step_*.deleting")):
                shutil.rmtree(stale, ignore_errors=True)  # a writer killed mid-save / mid-prune
            with disk_full_errors(tmp):
                tmp.mkdir()
        return tmp

    @contextlib.contextmanager
    def saving(self, step: int, is_main: bool = True) -> Iterator[Path]:
        """Every rank writes checkpoint `step` into the yielded temp folder; when all ranks are done, rank 0
        commits it (fsync, manifest, rename). A full disk while writing is reported as such.

            with ckpt.saving(step, is_main) as tmp:
                engine.save_checkpoint(str(tmp), ...); atomic_torch_save(state, tmp / "rank_00000.pt")
        """
        from .distributed import barrier
        tmp = self.begin(step, is_main)
        barrier()
        try:
            with disk_full_errors(tmp):
                yield tmp
        except BaseException:
            self._discard(tmp, is_main)  # a half-written checkpoint is of no use; leave no .tmp behind
            raise
        barrier()
        if is_main:
            self.commit(step)
            log.info("checkpoint saved: %s", self.step_dir(step))
        barrier()

    def _discard(self, tmp, is_main=True):
        if is_main and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
            log.warning("checkpoint save failed: removed the partial %s", tmp)

    def commit(self, step: int) -> Path:
        """Make the temp directory of `step` the latest checkpoint (rank 0 only, after all writes)."""
        tmp, final = self.tmp_dir(step), self.step_dir(step)
        if not tmp.is_dir():
            raise FileNotFoundError(f"no checkpoint being written for step {step}: {tmp} is missing")
        try:
            with disk_full_errors(tmp):
                fsync_tree(tmp)
                files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
                atomic_write_bytes(tmp / MANIFEST, json.dumps({"step": step, "files": files}, indent=0).encode())
        except BaseException:
            self._discard(tmp)
            raise
        replaced = None
        if final.exists():  # re-saving a step (e.g. the final save after a periodic one): the old copy is moved
            replaced = final.with_name(final.name + REPLACED)  # out of the way, deleted only once the new one is
            if replaced.exists():  # in place (a kill between the two renames: prepare() puts the old one back)
                shutil.rmtree(replaced, ignore_errors=True)
            os.replace(final, replaced)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
        atomic_write_bytes(self.root / POINTER, json.dumps({"step": step, "dir": final.name}).encode())
        self._prune(step)
        return final

    def verify(self, path: Union[str, Path]) -> Optional[str]:
        """None if the checkpoint directory `path` is complete, else the reason (one line). Cheap: sizes from
        COMPLETE.json (older checkpoints have none) and the zip directory at the end of every .pt file, which
        a truncated file lacks; the tensors are not read."""
        path = Path(path)
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except FileNotFoundError:
            manifest = None
        except (OSError, ValueError, RecursionError) as e:
            return f"{path / MANIFEST} is unreadable ({e})"
        if manifest is not None:
            files = manifest.get("files", {}) if isinstance(manifest, dict) else None
            if not isinstance(files, dict) or not all(isinstance(n, str) and type(s) is int for n, s in files.items()):
                return f"{path / MANIFEST} is not the manifest a save writes ({{\"files\": {{name: bytes}}}})"
            for rel, size in files.items():
                f = path / rel
                if not f.is_file():
                    return f"{f} is missing"
                if f.stat().st_size != size:
                    return f"{f} has {f.stat().st_size} bytes, {size} were written"
        for f in sorted(path.rglob("*.pt")):
            try:
                with zipfile.ZipFile(f) as z:
                    z.infolist()
            except (zipfile.BadZipFile, OSError, ValueError) as e:
                return f"{f} is truncated or corrupt ({e})"
        return None

    def pointer(self) -> Optional[tuple[int, Path]]:
        """(step, dir) that latest.json names, or None when there is none, it is unreadable (never torn: it is
        written atomically) or its folder is gone. CheckpointPointerError when it names anything but a
        `step_NNNNNNN` folder of its own step directly inside this folder (`../../other/step_6`, an absolute
        path, a symlink leading out): resuming that would continue another run under this one's name."""
        path = self.root / POINTER
        try:
            ptr = json.loads(path.read_text())
            step, name = ptr["step"], ptr["dir"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        where = f"{path} points at {name!r}" if isinstance(name, str) else f"{path} holds dir={name!r}"
        how = (f"; refusing to resume from it: fix or delete {path} (without it the newest complete step_* "
               "folder there is used)")
        if not isinstance(name, str) or not _STEP_DIR.match(name):
            raise CheckpointPointerError(f"{where}, not a step_NNNNNNN folder inside {self.root}{how}")
        if type(step) is not int or step < 0 or int(_STEP_DIR.match(name).group(1)) != step:
            raise CheckpointPointerError(f"{where} with step {step!r}, which is not that folder's step{how}")
        target = self.root / name
        if os.path.islink(target):
            raise CheckpointPointerError(f"{where}, a symbolic link (to {os.readlink(target)}), not a checkpoint "
                                         f"of this folder{how}")
        return (step, target) if target.is_dir() else None

    def candidates(self) -> list[tuple[int, Path]]:
        """(step, dir) of every complete-looking checkpoint, newest first: the pointer's, then the others."""
        out = []
        found = self.pointer()
        if found is not None:
            out.append(found)
        out += [(s, self.step_dir(s)) for s in reversed(self.steps()) if all(s != o[0] for o in out)]
        return out

    def latest_valid(self) -> Optional[tuple[int, Path]]:
        """(step, dir) of the newest checkpoint that `verify` finds complete, or None when there is no
        checkpoint at all. A newer broken one is skipped with a WARNING naming it and why; if every one is
        broken, CorruptCheckpointError (nothing is started over silently)."""
        found = self.candidates()
        problems = []
        for step, path in found:
            reason = self.verify(path)
            if reason is None:
                if problems:
                    log.warning("resuming from %s (step %d) instead: the newer checkpoint(s) are broken: %s",
                                path, step, "; ".join(problems))
                return step, path
            problems.append(reason)
            log.warning("checkpoint %s is broken (%s); trying the previous one", path, reason)
        if found:
            raise CorruptCheckpointError(f"no complete checkpoint in {self.root}: " + "; ".join(problems))
        return None

    def load_latest(self, load_fn: Callable[[int, Path], Any]) -> Optional[tuple[int, Path, Any]]:
        """Call `load_fn(step, dir)` on the newest complete checkpoint; if it raises CorruptCheckpointError (a
        file that reads back corrupt), warn and go on to the previous one. Returns (step, dir, result) or
        None when the folder has no checkpoint."""
        found = self.candidates()
        problems = []
        for step, path in found:
            reason = self.verify(path)
            if reason is None:
                try:
                    result = load_fn(step, path)
                except CorruptCheckpointError as e:
                    reason = str(e)
                else:
                    if problems:
                        log.warning("resumed from %s (step %d) instead of newer broken checkpoint(s): %s", path,
                                    step, "; ".join(problems))
                    return step, path, result
            problems.append(reason)
            log.warning("checkpoint %s is broken (%s); trying the previous one", path, reason)
        if found:
            raise CorruptCheckpointError(f"no complete checkpoint in {self.root}: " + "; ".join(problems))
        return None

    def steps(self) -> list[int]:
        """Steps with a complete checkpoint directory, ascending."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and p.is_dir():
                if p.is_symlink():  # leads elsewhere (another run's checkpoint): not this folder's
                    log.warning("checkpoint folder %s: %s is a symbolic link (to %s), not a checkpoint of this "
                                "folder; ignored", self.root, p.name, os.readlink(p))
                    continue
                found.append(int(m.group(1)))
        return sorted(found)

    def latest(self) -> Optional[tuple[int, Path]]:
        """(step, directory) of the newest complete checkpoint, or None."""
        found = self.pointer()
        if found is not None:
            return found
        steps = self.steps()
        return (steps[-1], self.step_dir(steps[-1])) if steps else None

    def _delete(self, path):
        """Rename out of the `step_N` namespace first (atomic), then delete: a kill at any instant leaves
        either the whole checkpoint or a `.deleting` leftover that no reader takes for a checkpoint."""
        doomed = path.with_name(path.name + ".deleting")
        if doomed.exists():
            shutil.rmtree(doomed, ignore_errors=True)
        os.replace(path, doomed)
        _fsync_dir(self.root)
        shutil.rmtree(doomed, ignore_errors=True)

    def _prune(self, committed: int) -> None:
        """Keep the `keep_last` newest checkpoints up to the one just committed. Folders of later steps (a run
        resumed from before a broken or unpointed newer checkpoint) are neither counted nor deleted: counted, a
        broken newer folder took the place of the checkpoint just written, and with keep_last 1 every good one
        was deleted. The run replaces each of them when it saves that step again."""
        for leftover in self.root.glob("step_*.deleting"):
            shutil.rmtree(leftover, ignore_errors=True)
        if self.keep_last is None:
            return
        for step in [s for s in self.steps() if s <= committed][:-self.keep_last]:
            self._delete(self.step_dir(step))
