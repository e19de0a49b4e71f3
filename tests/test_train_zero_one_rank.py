"""DeepSpeed on a single rank: what its gradient plumbing copies, and what the trainer switches off.

Without ZeRO the engine all-reduces the gradients after the backward: on one rank that is a flatten into a bucket, an
all-reduce over nobody and a copy back, two passes over the fp32 gradients a step for nothing; the trainer turns it
off there (train/base.Trainer.add_engine), and the weights come out bit for bit the same. ZeRO 1/2 on one rank copy
every gradient five times a step (bucket, reduce copy-back, partition buffer, the step's flatten, the updated
weights back into the parameters): counted here, and what the start-up line says (train/base.zero_on_one_rank).
The copies are counted as the tensors DeepSpeed's own code writes (copy_/cat/clone/stack/_to_copy whose nearest
caller outside torch is in deepspeed/), not the model's ops that run under the engine's forward and backward."""
import logging
import os
import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from modeling.config import load_config
from train.base import zero_on_one_rank
from train.dit_config import DiTTrainConfig
from train.train_dit import Trainer

REPO = Path(__file__).resolve().parents[1]
COPIES = {"copy_", "cat", "clone", "stack", "_to_copy"}
ENGINE_WRAPPERS = {"forward", "backward"}  # DeepSpeed's engine calling the model: the model's own ops


class DeepSpeedCopies(TorchDispatchMode):
    """Bytes written by copy-like ops that DeepSpeed's own code calls, by (op, file:function)."""

    def __init__(self):
        super().__init__()
        self.bytes: dict[tuple[str, str], int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in COPIES and isinstance(out, torch.Tensor):
            outside = [f for f in traceback.extract_stack()[:-1]
                       if f"{os.sep}torch{os.sep}" not in f.filename and f.filename != __file__]
            caller = outside[-1] if outside else None
            if caller and "deepspeed" in caller.filename and caller.name not in ENGINE_WRAPPERS:
                key = (name, f"{Path(caller.filename).name}:{caller.name}")
                self.bytes[key] = self.bytes.get(key, 0) + out.numel() * out.element_size()
        return out


def trainer(tmp_path: Path, zero: int, run: str) -> Trainer:
    cfg = load_config(DiTTrainConfig, REPO / "configs/dit_tiny_cpu.yaml", [
        f"checkpoint.dir={tmp_path}/{run}/ckpt", f"logging.dir={tmp_path}/{run}", "logging.progress_bar=false",
        "logging.tensorboard=false", "train.steps=2", f"train.zero_stage={zero}", "checkpoint.resume=never",
        "train.global_batch=8"])  # one micro-batch a step, as the benchmarks run (ZeRO-2 copies per micro-batch)
    return Trainer(cfg)


def steps(t: Trainer, n: int = 2) -> DeepSpeedCopies:
    """n optimizer steps as fit runs them; the copies of the last one."""
    for _ in range(n - 1):
        assert t.step_on_device(t.fetch_batch()).applied
    batch = t.fetch_batch()
    with DeepSpeedCopies() as counted:
        assert t.step_on_device(batch).applied
    return counted


def test_no_allreduce_on_one_rank_without_zero_and_the_same_weights(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="train"):
        ours = trainer(tmp_path, 0, "ours")
    assert ours.info.world_size == 1 and "on one rank partitions nothing" not in caplog.text  # (ZeRO's line)
    assert ours.engine.enable_backward_allreduce is False
    counted = steps(ours)
    assert counted.bytes == {}, counted.bytes  # DeepSpeed writes nothing of its own in the step
    theirs = trainer(tmp_path, 0, "deepspeed")
    theirs.engine.enable_backward_allreduce = True  # DeepSpeed's default: reduce over the one rank
    grads = 4 * sum(p.numel() for p in theirs.engine.module.parameters() if p.requires_grad)
    counted = steps(theirs)
    # the reduction's flatten and copy back: the fp32 gradients written twice (the check fails if that changes)
    assert sum(counted.bytes.values()) == 2 * grads, (counted.bytes, grads)
    for (name, a), b in zip(ours.engine.module.named_parameters(), theirs.engine.module.parameters()):
        assert torch.equal(a, b), name


def test_zero2_on_one_rank_copies_every_gradient_five_times_and_says_so(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="train"):
        t = trainer(tmp_path, 2, "zero2")
    assert zero_on_one_rank(2) in caplog.text
    grads = 4 * sum(p.numel() for p in t.engine.module.parameters() if p.requires_grad)
    counted = steps(t)
    # bucket, the reduction's copy back, the partition buffer, the step's flatten, the weights back: 5 passes
    total = sum(counted.bytes.values())
    assert 5 * grads <= total < 5.1 * grads, (counted.bytes, grads)  # (+ the flatten's alignment padding)
    assert "5 passes a step" in zero_on_one_rank(2) and "5 passes" not in zero_on_one_rank(3)



def test_a_stale_build_lock_of_deepspeeds_cpu_op_is_removed(tmp_path, monkeypatch, capsys):
    """A process killed while DeepSpeed JIT-built its CPU shared-memory op left the build's `lock`, and every later
    gloo start waited on it for ever, printing nothing (a review of the launch paths, 2026-12-05)."""
    import os
    import time

    from train.distributed import clear_stale_extension_locks
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    old, fresh = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock", tmp_path / "deepspeed_shm_comm" / "lock"
    for lock in (old, fresh):
        lock.parent.mkdir(parents=True)
        lock.write_text("")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    assert clear_stale_extension_locks() == [str(old)]  # a build under way (a fresh lock) is left alone
    assert not old.exists() and fresh.exists() and "removed the stale build lock" in capsys.readouterr().err
