"""A lost rank never hangs a run (issue 20.3). Rank 1 of a 2-rank DiT run (gloo, ZeRO-2) SIGKILLs itself
(tests/kill_rank.py chooses the moment, the kill is real):

- mid-step, the ranks started as plain processes (no launcher to stop the survivor: it must notice by itself);
- mid-checkpoint, under torchrun (which SIGTERMs the survivor 0.1 s after the death).

Either way rank 0 exits within dist.timeout_s plus a margin, with ONE error line tagged with its rank and node
that names the lost rank, its node and host, and the last complete checkpoint; that checkpoint is intact (the
half-written one never became `latest`), and resuming from it works. H8's tests/test_multinode.py does the same
across two simulated nodes."""
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from multiproc import env, free_port, metrics_by_step

REPO = Path(__file__).resolve().parents[1]
KILL = str(REPO / "tests" / "kill_rank.py")
STEPS, EVERY, TIMEOUT_S = 8, 4, 20
MARGIN_S = 15  # start-up of the error path: the heartbeat check (3 s) and the interpreter's exit


def dit_args(run, steps=STEPS):
    return ["--config", "configs/dit_tiny_cpu.yaml", f"train.steps={steps}", "train.global_batch=16",
            "train.batch_per_gpu=8", "train.zero_stage=2", f"checkpoint.every={EVERY}", "checkpoint.keep_last=5",
            f"checkpoint.dir={run}/ckpt", f"logging.dir={run}", "logging.every=1", "logging.progress_bar=false",
            "logging.tensorboard=false", "checkpoint.export_reference=false", f"dist.timeout_s={TIMEOUT_S}"]


def plain_ranks(args, logs, extra_env=None):
    """Both ranks as plain processes (what a launcher would start: RANK, WORLD_SIZE, MASTER_*), stderr per rank."""
    port = free_port()
    procs = []
    for rank in range(2):
        e = {**env(), "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
             "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, **(extra_env or {})}
        procs.append(subprocess.Popen([sys.executable, KILL, "train.train_dit", *args], cwd=REPO, env=e,
                                      stdout=subprocess.DEVNULL, stderr=open(logs / f"rank{rank}.err", "w")))
    return procs


def error_lines(text):
    return [ln for ln in text.splitlines() if re.match(r"\[rank \d+/2 node 0 \S+\] error: ", ln)]


def check_survivor_line(text, host_re=r"\S+"):
    lines = [ln for ln in error_lines(text) if ln.startswith("[rank 0/2 ")]
    assert len(lines) == 1, text[-3000:]  # one line, and no traceback from rank 0
    line = lines[0]
    assert re.search(rf"error: lost rank 1 \(node 0, host {host_re}, pid \d+\)", line), line
    assert f"step_{EVERY:07d} (step {EVERY})" in line and "resume" in line, line
    return line


def latest_step(run):
    return json.loads((run / "ckpt" / "latest.json").read_text())["step"]


@pytest.mark.extended  # CI: a whole node lost mid-run (tests/test_multinode.py, the survivor noticing by itself)
def test_rank_killed_mid_step_ends_the_survivor_in_one_line_and_resumes(tmp_path):
    run, logs = tmp_path / "run", tmp_path
    record = tmp_path / "kill.json"
    procs = plain_ranks(dit_args(run), logs, {"KILL_RANK": "1", "KILL_AT": "step:6", "KILL_RECORD": str(record)})
    try:
        rc1 = procs[1].wait(timeout=600)
        rc0 = procs[0].wait(timeout=TIMEOUT_S + MARGIN_S + 30)
        exited = time.time()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert rc1 == -9 and record.exists(), (rc1, (logs / "rank1.err").read_text()[-2000:])
    killed = json.loads(record.read_text())["time"]
    assert rc0 == 1 and exited - killed < TIMEOUT_S + MARGIN_S, (rc0, exited - killed)
    err0 = (logs / "rank0.err").read_text()
    check_survivor_line(err0)
    assert "Traceback" not in err0
    assert latest_step(run) == EVERY and not (run / "ckpt" / f"step_{2 * EVERY:07d}").exists()

    # the same command again: both ranks resume from step 4 and finish
    procs = plain_ranks(dit_args(run), logs)
    assert [p.wait(timeout=600) for p in procs] == [0, 0], (logs / "rank0.err").read_text()[-3000:]
    err0 = (logs / "rank0.err").read_text()
    assert f"resumed from {run / 'ckpt' / f'step_{EVERY:07d}'} at step {EVERY}" in err0
    assert sorted(metrics_by_step(run, lambda r: r["loss"])) == list(range(1, STEPS + 1))
    assert latest_step(run) == STEPS


@pytest.mark.extended  # CI: a whole node lost mid-run (tests/test_multinode.py)
def test_rank_killed_mid_checkpoint_under_torchrun_keeps_the_last_one(tmp_path):
    run = tmp_path / "run"
    record = tmp_path / "kill.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
           KILL, "train.train_dit", *dit_args(run)]
    e = {**env(), "KILL_RANK": "1", "KILL_AT": f"save:{2 * EVERY}", "KILL_RECORD": str(record)}
    p = subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=600)
    exited = time.time()
    assert p.returncode != 0 and record.exists(), p.stderr[-3000:]
    killed = json.loads(record.read_text())["time"]
    assert exited - killed < TIMEOUT_S + MARGIN_S, exited - killed
    check_survivor_line(p.stderr)
    # checkpoint 8 was being written: never committed, 4 is the latest and complete
    from train.checkpoint import CheckpointManager
    ckpt = CheckpointManager(run / "ckpt")
    assert latest_step(run) == EVERY and ckpt.verify(ckpt.step_dir(EVERY)) is None
    assert not ckpt.step_dir(2 * EVERY).exists() and ckpt.tmp_dir(2 * EVERY).is_dir()

    # resume (here: the one rank left, elastically, in this process) continues from step 4
    from modeling.config import load_config
    from train.dit_config import DiTTrainConfig
    from train.train_dit import DiTTrainer
    args = dit_args(run) + ["checkpoint.reshard=true"]
    trainer = DiTTrainer(load_config(DiTTrainConfig, REPO / args[1], args[2:]))
    assert trainer.step == EVERY
    report = trainer.fit()
    assert report["step"] == STEPS and latest_step(run) == STEPS and not ckpt.tmp_dir(2 * EVERY).exists()
