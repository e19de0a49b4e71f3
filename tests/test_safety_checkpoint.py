"""Issue 12, checkpoints: resume state loads with weights_only=True, one run per checkpoint folder (lock with
stale-lock detection), the folder is checked writable up front, a full disk says so, a corrupt latest
checkpoint falls back to the newest complete one, pruning is crash-safe, files are not 0600, and DeepSpeed's
own loader is made safe."""
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from train import checkpoint as ck
from train.checkpoint import (CheckpointManager, CorruptCheckpointError, DiskFullError, NotWritableError,
                              ResumeConfigError, RunLock, RunLockedError, UnsafeCheckpointError, atomic_torch_save,
                              check_resume_config, check_writable, load_state, rng_state, set_rng_state)

REPO = Path(__file__).resolve().parents[1]


def _draws():
    return (random.random(), float(np.random.rand()), float(np.random.randn()), torch.rand(1).item())


def test_rng_state_is_plain_data_and_restores_every_generator(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    atomic_torch_save({"rng": rng_state()}, tmp_path / "rank_00000.pt")
    expected = _draws()
    assert torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "rank_00000.pt") == []
    state = torch.load(tmp_path / "rank_00000.pt", weights_only=True)  # no allow-list needed
    set_rng_state(state["rng"])
    assert _draws() == expected


def test_old_rng_format_still_resumes_but_nothing_else_is_admitted(tmp_path):
    random.seed(5), np.random.seed(6), torch.manual_seed(7)
    old = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(), "cuda": None}
    torch.save({"rng": old}, tmp_path / "old.pt")
    expected = _draws()
    set_rng_state(load_state(tmp_path / "old.pt")["rng"])
    assert _draws() == expected


def test_cuda_rng_is_the_ranks_own_and_an_older_list_restores_on_fewer_gpus(monkeypatch):
    """The CUDA RNG state saved is this rank's device's (format 3), restored on its device: a resume with fewer GPUs
    per node (2 x 8 -> 4 x 4, same world size) restored every saved device's state by index and failed with an
    IndexError (a review, 2026-12-05). An older checkpoint's per-device list restores this device's entry where
    the saving node had it. (No GPU here: torch.cuda's RNG calls are recorded.)"""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": calls.append(int(state[0])))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    state = rng_state()
    assert state["format"] == 3 and torch.equal(state["cuda"], torch.tensor([7], dtype=torch.uint8))
    set_rng_state(state)
    assert calls == [7]
    old = {**state, "format": 2, "cuda": [torch.tensor([i], dtype=torch.uint8) for i in range(8)]}
    set_rng_state(old)  # saved on an 8-GPU node, this rank on device 2
    assert calls == [7, 2]
    set_rng_state({**old, "cuda": old["cuda"][:2]})  # saved on a 2-GPU node: nothing for device 2
    assert calls == [7, 2]


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_load_state_refuses_code_and_names_the_file(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"rng": _Payload(marker)}, tmp_path / "trainer.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"trainer\.pt.*posix\.system|trainer\.pt.*system"):
        load_state(tmp_path / "trainer.pt", "trainer state")
    assert not marker.exists()


# ----------------------------------------------------------------------------- the run lock

_HOLDER = """
import sys, time
sys.path.insert(0, {repo!r})
from train.checkpoint import CheckpointManager
mgr = CheckpointManager({root!r})
mgr.acquire()  # held while mgr lives
print("locked", flush=True)
time.sleep(3600)  # killed by the test
"""


def _hold_lock(root):
    p = subprocess.Popen([sys.executable, "-c", _HOLDER.format(repo=str(REPO), root=str(root))],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_second_run_on_a_folder_is_refused_naming_the_first_then_a_crashed_owner_is_stale(tmp_path):
    root = tmp_path / "ckpt"
    holder = _hold_lock(root)
    try:
        with pytest.raises(RunLockedError) as e:
            CheckpointManager(root).acquire()
        msg = str(e.value)
        assert f"pid {holder.pid}" in msg and socket.gethostname() in msg and str(root) in msg and "\n" not in msg
        # nothing of the live run was touched: its record is intact
        assert json.loads((root / "run.lock").read_text())["pid"] == holder.pid
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = CheckpointManager(root).acquire()  # the kernel dropped the dead run's flock: stale, taken over
    assert lock.took_over["pid"] == holder.pid
    assert json.loads((root / "run.lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert (root / "run.lock").read_text() == ""  # released cleanly: the next run takes it silently
    again = RunLock(root).acquire()
    assert again.took_over is None
    again.release()


def test_lock_without_flock_refuses_a_record_from_another_host(tmp_path, monkeypatch):
    import fcntl
    root = tmp_path / "ckpt"
    root.mkdir()
    (root / "run.lock").write_text(json.dumps({"host": "other-node-17", "pid": 4242, "started": "x"}))

    def no_flock(fd, op):
        raise OSError(38, "Function not implemented")  # ENOSYS, as on a filesystem mounted without flock
    monkeypatch.setattr(fcntl, "flock", no_flock)
    with pytest.raises(RunLockedError, match="other-node-17.*pid 4242.*delete"):
        RunLock(root).acquire()
    (root / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": 2 ** 22 + 17, "started": "x"}))
    lock = RunLock(root).acquire()  # same host, dead pid: stale
    assert lock.took_over["pid"] == 2 ** 22 + 17
    lock.release()


def test_unwritable_checkpoint_folder_is_found_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(NotWritableError, match=r"a_file/ckpt.*not writable") as e:
        check_writable(blocker / "ckpt", "checkpoint folder")
    assert "\n" not in str(e.value)
    assert check_writable(tmp_path / "new" / "ckpt") == tmp_path / "new" / "ckpt"
    assert list((tmp_path / "new" / "ckpt").iterdir()) == []  # the probe is gone


def test_full_disk_is_reported_as_such(tmp_path, monkeypatch):
    real_mkstemp = ck.tempfile.mkstemp

    def on_dev_full(dir=None, prefix=None, suffix=None):  # the temp file's writes hit a really full device
        fd, name = real_mkstemp(dir=dir, prefix=prefix, suffix=suffix)
        os.close(fd)
        return os.open("/dev/full", os.O_WRONLY), name
    monkeypatch.setattr(ck.tempfile, "mkstemp", on_dev_full)
    with pytest.raises(DiskFullError, match=r"(disk full|no space).*trainer\.pt") as e:
        atomic_torch_save({"w": torch.zeros(100_000)}, tmp_path / "trainer.pt")
    assert "unexpected pos" not in str(e.value)
    assert not (tmp_path / "trainer.pt").exists() and not list(tmp_path.glob(".trainer.pt.*"))
    # DeepSpeed's own save writes by path: the same translation around it
    with pytest.raises(DiskFullError, match="full"):
        with ck.disk_full_errors(tmp_path):
            torch.save({"w": torch.zeros(100_000)}, "/dev/full")


def test_checkpoint_files_are_not_private(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_torch_save({"a": 1}, tmp_path / "x.pt")
        ck.atomic_write_bytes(tmp_path / "latest.json", b"{}")
    finally:
        os.umask(old)
    assert (tmp_path / "x.pt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "latest.json").stat().st_mode & 0o777 == 0o644


# ----------------------------------------------------------------------------- recovery

def _save(mgr, step):
    d = mgr.begin(step)
    atomic_torch_save({"step": step, "w": torch.full((1000,), float(step))}, d / "trainer.pt")
    atomic_torch_save({"r": step}, d / "rank_00000.pt")
    return mgr.commit(step)


def test_truncated_latest_checkpoint_falls_back_to_the_previous_complete_one(tmp_path, caplog):
    mgr = CheckpointManager(tmp_path, keep_last=3)
    for s in (10, 20, 30):
        _save(mgr, s)
    f = tmp_path / "step_0000030" / "trainer.pt"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # a torn copy / a bad disk block
    with caplog.at_level("WARNING"):
        step, path = mgr.latest_valid()
    assert (step, path.name) == (20, "step_0000020")
    assert "step_0000030" in caplog.text and "trainer.pt" in caplog.text
    # a missing file is caught too (COMPLETE.json lists every file)
    (tmp_path / "step_0000020" / "rank_00000.pt").unlink()
    assert mgr.latest_valid()[0] == 10
    # a manifest that is not the one a save writes (a list, files as a list): broken, not an AttributeError
    for text in ("[]", '{"files": [1]}', "7"):
        (tmp_path / "step_0000020" / "COMPLETE.json").write_text(text)
        assert mgr.latest_valid()[0] == 10
    # every one broken: refused, not silently restarted
    (tmp_path / "step_0000010" / "trainer.pt").write_bytes(b"\0" * 10)
    with pytest.raises(CorruptCheckpointError, match="no complete checkpoint"):
        mgr.latest_valid()


def test_load_latest_falls_back_when_a_file_reads_back_corrupt(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=3)
    _save(mgr, 1), _save(mgr, 2)

    def load(step, path):
        if step == 2:
            raise CorruptCheckpointError(f"{path}/trainer.pt is corrupt")
        return load_state(path / "trainer.pt")["step"]
    assert mgr.load_latest(load)[::2] == (1, 1)
    assert CheckpointManager(tmp_path / "empty").load_latest(load) is None


def test_a_kill_during_pruning_never_leaves_a_half_checkpoint(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path, keep_last=1)
    _save(mgr, 1)
    real_rmtree = ck.shutil.rmtree

    def killed_midway(path, ignore_errors=False):  # deletes one file, then the process "dies"
        next(p for p in Path(path).rglob("*.pt")).unlink()
        raise KeyboardInterrupt
    monkeypatch.setattr(ck.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        _save(mgr, 2)
    monkeypatch.setattr(ck.shutil, "rmtree", real_rmtree)
    assert mgr.steps() == [2]  # the half-deleted step 1 is not a checkpoint any more
    assert mgr.latest_valid()[0] == 2
    _save(CheckpointManager(tmp_path, keep_last=1), 3)  # the next save clears the leftover
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step_")) == ["step_0000003"]


def test_a_broken_newer_checkpoint_never_costs_the_good_ones(tmp_path):
    """A run resumed from step 2 because step 4 is broken, saving step 3 with keep_last 1: the pruning counted the
    broken step 4 as the newest and deleted steps 2 and 3, leaving latest.json at a folder that was gone."""
    first = CheckpointManager(tmp_path, keep_last=2)
    _save(first, 2), _save(first, 4)
    (tmp_path / "step_0000004" / "trainer.pt").write_bytes(b"\0" * 100)
    resumed = CheckpointManager(tmp_path, keep_last=1)
    assert resumed.latest_valid()[0] == 2
    _save(resumed, 3)
    assert resumed.steps() == [3, 4] and resumed.latest_valid()[0] == 3  # step 4 waits to be saved again
    _save(resumed, 4)
    assert resumed.steps() == [4] and resumed.latest_valid()[0] == 4


def test_a_kill_while_a_step_is_saved_again_keeps_a_copy(tmp_path, monkeypatch):
    """Saving a step that exists (the final save after a periodic one) moves the old copy aside and deletes it after
    the new one is in place; killed between the two renames, the next start puts the old copy back."""
    mgr = CheckpointManager(tmp_path, keep_last=1)
    _save(mgr, 5)
    real_replace = ck.os.replace

    def killed_after_moving_aside(src, dst):
        real_replace(src, dst)
        if str(dst).endswith(ck.REPLACED):
            raise KeyboardInterrupt
    monkeypatch.setattr(ck.os, "replace", killed_after_moving_aside)
    with pytest.raises(KeyboardInterrupt):
        _save(mgr, 5)
    monkeypatch.setattr(ck.os, "replace", real_replace)
    assert mgr.steps() == []  # the window: no step_5 ...
    CheckpointManager(tmp_path, keep_last=1).prepare().release()  # ... until the next start puts it back
    assert mgr.latest_valid()[0] == 5 and not list(tmp_path.glob("*" + ck.REPLACED))
    _save(mgr, 5)  # a normal re-save leaves no copy behind
    assert mgr.latest_valid()[0] == 5 and not list(tmp_path.glob("*" + ck.REPLACED))


def test_resume_config_changes_are_refused_or_warned_by_key(caplog):
    saved = {"model": {"depth": 2}, "train": {"seed": 0, "steps": 10}, "data": {"path": "a"},
             "optim": {"lr": 1e-4}, "logging": {"dir": "x"}}
    now = {"model": {"depth": 2}, "train": {"seed": 1, "steps": 20}, "data": {"path": "b"},
           "optim": {"lr": 2e-4}, "logging": {"dir": "y"}}
    with caplog.at_level("WARNING"):
        changed = check_resume_config(saved, now, "ck/step_1", warn=("train.seed", "data.", "optim."),
                                      ignore=("logging.", "train.steps"))
    assert changed == ["data.path: 'a' -> 'b'", "optim.lr: 0.0001 -> 0.0002", "train.seed: 0 -> 1"]
    assert "train.seed: 0 -> 1" in caplog.text and "logging" not in caplog.text
    with pytest.raises(ResumeConfigError, match=r"train\.seed: 0 -> 1"):
        check_resume_config(saved, now, "ck/step_1", refuse=("model.", "train.seed"))


# ----------------------------------------------------------------------------- DeepSpeed's own loader

@pytest.mark.parametrize("zero_stage", [2, 3])
def test_deepspeed_resume_loads_safely_and_refuses_code(tmp_path, zero_stage):
    from modeling.config import load_config
    from train.dit_config import DiTTrainConfig
    from train.train_dit import Trainer
    cfg = load_config(DiTTrainConfig, REPO / "configs/dit_tiny_cpu.yaml", [
        f"checkpoint.dir={tmp_path}/ckpt", f"logging.dir={tmp_path}", "logging.progress_bar=false",
        "logging.tensorboard=false", "train.steps=1", "checkpoint.every=1", f"train.zero_stage={zero_stage}",
        "checkpoint.export_reference=false", "checkpoint.resume=never"])
    trainer = Trainer(cfg)
    trainer.fit()
    path = tmp_path / "ckpt" / "step_0000001"
    files = sorted((path / "deepspeed").glob("*.pt"))
    assert any("optim_states" in f.name for f in files) and any("model_states" in f.name for f in files)
    with ck.deepspeed_safe_load():  # the genuine checkpoint loads (DeepSpeed's types are allow-listed)
        load_path, _ = trainer.engine.load_checkpoint(str(path), tag="deepspeed", load_optimizer_states=True,
                                                      load_lr_scheduler_states=False)
    assert load_path is not None
    marker = tmp_path / "ran"
    for victim in files:
        good = victim.read_bytes()
        payload = torch.load(victim, weights_only=False)
        payload["evil"] = _Payload(marker)
        torch.save(payload, victim)
        with pytest.raises(UnsafeCheckpointError, match=victim.name):
            with ck.deepspeed_safe_load():
                trainer.engine.load_checkpoint(str(path), tag="deepspeed", load_optimizer_states=True,
                                               load_lr_scheduler_states=False)
        assert not marker.exists()
        victim.write_bytes(good)
    from modeling.safe_load import _torch_load
    assert torch.load is _torch_load  # the guard put the real torch.load back
    # sanity: without the guard the planted file does run its payload (the test above can fail)
    payload = torch.load(files[0], weights_only=False)
    payload["evil"] = _Payload(marker)
    torch.save(payload, files[0])
    torch.load(files[0], weights_only=False)
    assert marker.exists()


def test_a_new_trainer_in_the_same_process_takes_the_lock_over(tmp_path):
    first = CheckpointManager(tmp_path)
    first.prepare()
    second = CheckpointManager(tmp_path)
    second.prepare(writable=[tmp_path / "logs"])  # e.g. train, then resume, in one test process
    assert second.lock.held and not first.lock.held and (tmp_path / "logs").is_dir()
    second.release()
    assert (tmp_path / "run.lock").read_text() == ""


def _rank_prepare(rank, roots, port, results):
    import torch.distributed as dist
    from datetime import timedelta
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=300))
    try:
        for root in roots:
            try:
                CheckpointManager(root).prepare(is_main=rank == 0)
                results.put((rank, root, "acquired"))
            except (RunLockedError, NotWritableError) as e:
                results.put((rank, root, f"{type(e).__name__}: {e}"))
    finally:
        dist.destroy_process_group()


def test_every_rank_stops_with_the_same_error(tmp_path):
    """2 ranks (gloo): rank 0 finds the folder locked by another run / not writable; both ranks raise the
    same one-line error (none is left waiting in a collective)."""
    import torch.multiprocessing as mp
    locked = tmp_path / "ckpt"
    holder = _hold_lock(locked)
    (tmp_path / "file").write_text("")
    unwritable = tmp_path / "file" / "ckpt"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")  # (not fork: this pytest process may hold a process group of its own)
    results = ctx.Queue()
    try:
        procs = [ctx.Process(target=_rank_prepare, args=(r, [str(locked), str(unwritable)], port, results))
                 for r in range(2)]
        for p in procs:
            p.start()
        got = {(r, root): msg for r, root, msg in (results.get(timeout=600) for _ in range(4))}  # (loaded CI)
        for p in procs:
            p.join(120)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    for root, kind in ((locked, "RunLockedError"), (unwritable, "NotWritableError")):
        a, b = got[0, str(root)], got[1, str(root)]
        assert a == b and a.startswith(kind) and str(root) in a, (a, b)


# ----------------------------------------------------------------------------- a tampered or reused folder (issue 21)

def test_a_pointer_outside_the_checkpoint_folder_is_refused(tmp_path, caplog):
    from train.checkpoint import CheckpointLoadError, CheckpointPointerError
    other = CheckpointManager(tmp_path / "other")
    _save(other, 6)  # another run's checkpoint
    mine = CheckpointManager(tmp_path / "mine")
    _save(mine, 1), _save(mine, 2)
    pointer = tmp_path / "mine" / "latest.json"
    for ptr, says in (({"step": 6, "dir": "../other/step_0000006"}, "../other/step_0000006"),
                      ({"step": 6, "dir": str(tmp_path / "other" / "step_0000006")}, "other/step_0000006"),
                      ({"step": 6, "dir": "step_0000002"}, "not that folder's step")):
        pointer.write_text(json.dumps(ptr))
        for ask in (mine.latest_valid, mine.latest, lambda: mine.load_latest(lambda s, p: s)):
            with pytest.raises(CheckpointPointerError) as e:
                ask()
            text = str(e.value)
            assert isinstance(e.value, CheckpointLoadError) and "\n" not in text  # a user error: exit 2
            assert str(pointer) in text and says in text, text
    # a step folder that is a symlink leading out is no checkpoint of this folder either
    os.symlink(tmp_path / "other" / "step_0000006", tmp_path / "mine" / "step_0000009")
    pointer.write_text(json.dumps({"step": 9, "dir": "step_0000009"}))
    with pytest.raises(CheckpointPointerError, match="symbolic link"):
        mine.latest_valid()
    pointer.unlink()
    with caplog.at_level("WARNING"):
        assert mine.latest_valid() == (2, tmp_path / "mine" / "step_0000002")
    assert "step_0000009 is a symbolic link" in caplog.text
    # the pointer we write is accepted as before
    _save(mine, 3)
    assert mine.latest_valid() == (3, tmp_path / "mine" / "step_0000003")


def test_resume_never_on_a_folder_with_checkpoints_is_refused(tmp_path):
    root = tmp_path / "ckpt"
    _save(CheckpointManager(root), 5)
    fresh = CheckpointManager(root, keep_last=2, resume="never")
    with pytest.raises(ResumeConfigError) as e:
        fresh.prepare()
    text = str(e.value)
    assert str(root) in text and "checkpoint.resume=never" in text and "checkpoint.dir" in text and "\n" not in text
    assert (root / "step_0000005").is_dir()  # nothing was touched
    (root / "step_0000005").rename(tmp_path / "moved")
    with pytest.raises(ResumeConfigError, match="latest.json"):  # a pointer alone also means "used"
        CheckpointManager(root, resume="never").prepare()
    (root / "latest.json").unlink()
    CheckpointManager(root, resume="never").prepare().release()  # an empty folder starts fresh
    with pytest.raises(ValueError, match="resume"):
        CheckpointManager(root, resume="sometimes")


def test_resume_never_refused_by_the_trainer_before_building(tmp_path, capsys):
    """The DiT trainer with checkpoint.resume=never on a used folder: one line naming the folder and the flag,
    exit 2 (before: it trained, pruned its own new checkpoints as the "oldest" and left latest.json pointing
    at a deleted step)."""
    from train.train_dit import main
    root = tmp_path / "ckpt"
    _save(CheckpointManager(root), 30)
    code = main(["--config", str(REPO / "configs/dit_tiny_cpu.yaml"), f"checkpoint.dir={root}",
                 "checkpoint.resume=never", f"logging.dir={tmp_path / 'logs'}", "logging.tensorboard=false",
                 "logging.progress_bar=false", "train.steps=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and str(root) in err[0] and "checkpoint.resume" in err[0], err
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step_")) == ["step_0000030"]


def test_the_run_lock_never_follows_a_symlink(tmp_path):
    root = tmp_path / "ckpt"
    root.mkdir()
    victim = tmp_path / "precious.txt"
    victim.write_text("a file the run must not touch")
    os.symlink(victim, root / "run.lock")
    with pytest.raises(RunLockedError) as e:
        CheckpointManager(root).prepare()
    assert "symbolic link" in str(e.value) and str(root / "run.lock") in str(e.value) and "\n" not in str(e.value)
    assert victim.read_text() == "a file the run must not touch"
    (root / "run.lock").unlink()
    os.symlink(tmp_path / "absent", root / "run.lock")  # a dangling one is not created through either
    with pytest.raises(RunLockedError, match="symbolic link"):
        RunLock(root).acquire()
    assert not (tmp_path / "absent").exists()
    (root / "run.lock").unlink()
    os.mkfifo(root / "run.lock")  # nor does a FIFO block the run
    with pytest.raises(RunLockedError, match="not a plain file"):
        RunLock(root).acquire()


def test_a_save_that_fails_on_a_full_disk_leaves_no_tmp_folder(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path, keep_last=3)
    _save(mgr, 1)
    real_mkstemp = ck.tempfile.mkstemp

    def on_dev_full(dir=None, prefix=None, suffix=None):
        fd, name = real_mkstemp(dir=dir, prefix=prefix, suffix=suffix)
        os.close(fd)
        return os.open("/dev/full", os.O_WRONLY), name
    with monkeypatch.context() as m:
        m.setattr(ck.tempfile, "mkstemp", on_dev_full)
        with pytest.raises(DiskFullError):
            with mgr.saving(2) as tmp:
                atomic_torch_save({"w": torch.zeros(100_000)}, tmp / "trainer.pt")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step_")) == ["step_0000001"]
    # the commit's own writes (fsync, COMPLETE.json) failing: the same
    with monkeypatch.context() as m:
        def full(path, data):
            raise OSError(28, "No space left on device")
        m.setattr(ck, "atomic_write_bytes", full)
        with pytest.raises(DiskFullError):
            with mgr.saving(3) as tmp:
                atomic_torch_save({"w": torch.zeros(10)}, tmp / "trainer.pt")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step_")) == ["step_0000001"]
    assert mgr.latest_valid()[0] == 1
    _save(mgr, 4)
    assert mgr.latest_valid()[0] == 4
