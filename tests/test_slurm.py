"""scripts/slurm/train.sbatch rendered without SLURM: the batch script runs under bash as slurmd would run it
(SLURM_* variables of a 2-node allocation), with fake `scontrol` and `srun` on PATH that record what they are asked
(srun then starts its command once per node with that node's SLURM_NODEID, as srun does), and a fake `python` that
records the command each node would run (and starts a fake worker, as torchrun starts the trainers). Checked: the
exact torchrun line of every node for both trainers (node rank, node count, ranks per node, MASTER_ADDR = first
host of `scontrol show hostnames`, port, shared checkpoint and run folder, timeout, the user's overrides), the srun
options, one-line refusals, and preemption: SIGUSR1 near the time limit reaches every worker (through srun and
scripts/slurm/node.sh, not torchrun), which checkpoint and exit, and then the job is requeued (`scontrol requeue
<id>`), or after PREEMPT_GRACE_S the training is stopped and the job requeued all the same; SIGTERM stops it
without a requeue of its own. The extended test runs the real DiT trainer through the recipe on two fake nodes of
this machine, sends SIGUSR1 mid-run (no periodic checkpoint yet) and starts the requeued job: it resumes from the
checkpoint the signal made and finishes the run. tests/test_train_preempt.py checks the trainers' side in CI."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from multiproc import REPO, env, free_port, metrics_by_step

SBATCH = REPO / "scripts" / "slurm" / "train.sbatch"

# prints one host a line, flushed, with a pause: after `head -n 1` has gone, the next line meets a closed pipe and
# the fake exits 141 as the real scontrol dies of SIGPIPE (which must not fail the job under `set -o pipefail`)
FAKE_SCONTROL = f"""#!{sys.executable}
import json, os, re, sys, time
with open(os.environ["FAKE_SLURM_LOG"], "a") as f:
    f.write(json.dumps({{"cmd": "scontrol", "argv": sys.argv[1:]}}) + "\\n")
def hosts(spec):
    for part in re.findall(r"[^,\\[]+(?:\\[[^\\]]*\\])?", spec):
        m = re.fullmatch(r"(.*)\\[(.*)\\]", part)
        if not m:
            yield part
            continue
        for r in m.group(2).split(","):
            lo, _, hi = r.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                yield f"{{m.group(1)}}{{i:0{{len(lo)}}d}}"
if sys.argv[1:3] == ["show", "hostnames"]:
    try:
        for h in hosts(sys.argv[3]):
            print(h, flush=True)
            time.sleep(0.2)
    except BrokenPipeError:
        os._exit(141)
"""

FAKE_SRUN = f"""#!{sys.executable}
import json, os, signal, subprocess, sys
argv = sys.argv[1:]
with open(os.environ["FAKE_SLURM_LOG"], "a") as f:
    f.write(json.dumps({{"cmd": "srun", "argv": argv}}) + "\\n")
opts = {{}}
while argv and argv[0].startswith("-"):
    k, _, v = argv.pop(0).partition("=")
    opts[k] = v
nodes = int(opts["--nodes"])
procs = [subprocess.Popen(argv, env={{**os.environ, "SLURM_NODEID": str(i), "SLURM_PROCID": str(i),
                                      "SLURM_LOCALID": "0"}}) for i in range(nodes)]
def forward(sig, frame):  # srun forwards the signals it receives to its tasks
    for p in procs:
        p.send_signal(sig)
signal.signal(signal.SIGTERM, forward)
signal.signal(signal.SIGUSR1, forward)
rcs = [p.wait() for p in procs]
sys.exit(next((rc for rc in rcs if rc), 0))
"""

# torchrun and its worker: the launcher records its command line and starts one worker; like torchrun it stops
# its worker on SIGTERM and has no handler for SIGUSR1 (it would die of it). The worker records its start (its
# handlers are in place), SIGUSR1 ("checkpointed", exit 0, unless FAKE_IGNORE_USR1) and SIGTERM ("terminated").
FAKE_PYTHON = f"""#!{sys.executable}
import json, os, signal, subprocess, sys, time
log = os.environ["FAKE_SLURM_LOG"]
node = os.environ.get("SLURM_NODEID")
def note(**kw):
    with open(log, "a") as f:
        f.write(json.dumps(kw) + "\\n")
if sys.argv[1:] == ["--fake-worker"]:
    def usr1(sig, frame):
        note(cmd="worker-checkpointed", node=node)
        sys.exit(0)
    def term(sig, frame):
        note(cmd="python-terminated", node=node)
        sys.exit(143)
    if not os.environ.get("FAKE_IGNORE_USR1"):
        signal.signal(signal.SIGUSR1, usr1)
    else:
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, term)
    note(cmd="worker-start", node=node)
    time.sleep(float(os.environ.get("FAKE_TRAIN_SECONDS", "0")))
    sys.exit(0)
note(cmd="python", argv=sys.argv[1:], node=node, cwd=os.getcwd())
worker = subprocess.Popen([sys.argv[0], "--fake-worker"])
stopped = []
def stop(sig, frame):  # (no wait() in here: the main thread is inside worker.wait(), which holds its lock)
    stopped.append(sig)
    worker.send_signal(signal.SIGTERM)
signal.signal(signal.SIGTERM, stop)
rc = worker.wait()
sys.exit(143 if stopped else rc)
"""


def _fake_slurm(tmp_path, nodelist="gpu[01-02]", nodes=2, job_id=4242, extra=None):
    """(environment, log path) of a job of `nodes` nodes with the fakes first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN), ("fake_python", FAKE_PYTHON)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "slurm.log"
    e = env()
    e.update(PATH=f"{bin_dir}:{e['PATH']}", FAKE_SLURM_LOG=str(log), SLURM_JOB_ID=str(job_id),
             SLURM_JOB_NAME="xl1", SLURM_JOB_NODELIST=nodelist, SLURM_NNODES=str(nodes), SLURM_GPUS_ON_NODE="8",
             SLURM_SUBMIT_DIR=str(REPO), PYTHON=str(bin_dir / "fake_python"), RUN_DIR=str(tmp_path / "run"))
    e.pop("MASTER_PORT", None)
    e.update(extra or {})
    return e, log


def _calls(log, cmd):
    if not log.exists():
        return []
    return [r for r in map(json.loads, log.read_text().splitlines()) if r["cmd"] == cmd]


def test_header_and_syntax():
    text = SBATCH.read_text()
    for line in ("#SBATCH --requeue", "#SBATCH --signal=B:USR1@", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --open-mode=append"):
        assert line in text
    for script in (SBATCH, REPO / "scripts" / "slurm" / "node.sh"):
        assert os.access(script, os.X_OK), script
        subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.parametrize("trainer,module,config,overrides", [
    ("dit", "train.train_dit", "configs/dit_xl1_64ep.yaml", ["data.path=/shared/latents", "train.steps=80000"]),
    ("vae", "train.train_vae", "configs/vavae_f16d32_stage1.yaml", ["data.root=/shared/imagenet scan"]),
])
def test_renders_one_torchrun_per_node(tmp_path, trainer, module, config, overrides):
    e, log = _fake_slurm(tmp_path)
    r = subprocess.run(["bash", str(SBATCH), trainer, config, *overrides], cwd=tmp_path, env=e, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert _calls(log, "scontrol") == [{"cmd": "scontrol", "argv": ["show", "hostnames", "gpu[01-02]"]}]
    srun = _calls(log, "srun")
    assert len(srun) == 1
    assert srun[0]["argv"][:3] == ["--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert srun[0]["argv"][3] == "scripts/slurm/node.sh"
    run = tmp_path / "run"
    runs = sorted(_calls(log, "python"), key=lambda c: c["node"])
    assert [c["node"] for c in runs] == ["0", "1"]
    for node, c in enumerate(runs):
        assert c["cwd"] == str(REPO)  # the submit directory, not SLURM's spool copy of the script
        assert c["argv"] == ["-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
                             "--nproc_per_node", "8", "--master_addr", "gpu01", "--master_port", str(29500 + 242),
                             "-m", module, "--config", config, f"checkpoint.dir={run}/checkpoints",
                             f"logging.dir={run}", "dist.timeout_s=900", *overrides]
    assert f"2 nodes x 8 ranks, master gpu01:29742, run folder {run}, no checkpoint yet" in r.stdout


def test_host_list_forms_and_settings(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "latest.json").write_text('{"step": 3000, "dir": "step_0003000"}')
    e, log = _fake_slurm(tmp_path, nodelist="a7,b[3-4,9]", nodes=4,
                         extra={"GPUS_PER_NODE": "4", "MASTER_PORT": "31000", "DIST_TIMEOUT_S": "120",
                                "SLURM_RESTART_COUNT": "2"})
    r = subprocess.run(["bash", str(SBATCH), "dit", "configs/dit_tiny_cpu.yaml"], cwd=tmp_path, env=e,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    runs = sorted(_calls(log, "python"), key=lambda c: c["node"])
    assert [c["argv"][c["argv"].index("--node_rank") + 1] for c in runs] == ["0", "1", "2", "3"]
    for c in runs:
        cmd = " ".join(c["argv"])
        assert "--nnodes 4 " in cmd and "--nproc_per_node 4 " in cmd and "--master_addr a7 " in cmd
        assert "--master_port 31000 " in cmd and "dist.timeout_s=120" in cmd
    assert 'start 2: 4 nodes x 4 ranks' in r.stdout and 'resuming from {"step": 3000' in r.stdout


@pytest.mark.parametrize("args,message", [
    (["gan", "configs/dit_tiny_cpu.yaml"], "error: trainer must be dit or vae, got 'gan'"),
    (["dit", "configs/nope.yaml"], "error: config configs/nope.yaml not found"),
    (["dit"], "usage: sbatch"),
])
def test_refusals_are_one_line(tmp_path, args, message):
    e, log = _fake_slurm(tmp_path)
    r = subprocess.run(["bash", str(SBATCH), *args], cwd=tmp_path, env=e, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and r.stderr.startswith(message) and len(r.stderr.splitlines()) == 1, r.stderr
    assert not _calls(log, "srun")


def test_outside_slurm_is_refused(tmp_path):
    e, _ = _fake_slurm(tmp_path)
    e.pop("SLURM_JOB_ID")
    r = subprocess.run(["bash", str(SBATCH), "dit", "configs/dit_tiny_cpu.yaml"], cwd=tmp_path, env=e,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "not inside a SLURM job" in r.stderr


def _start(tmp_path, extra=None):
    e, log = _fake_slurm(tmp_path, extra={"FAKE_TRAIN_SECONDS": "120", **(extra or {})})
    p = subprocess.Popen(["bash", str(SBATCH), "dit", "configs/dit_tiny_cpu.yaml"], cwd=tmp_path, env=e,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 60
    while len(_calls(log, "worker-start")) < 2:  # both nodes' workers started, their handlers in place
        assert p.poll() is None and time.time() < deadline, p.communicate()
        time.sleep(0.05)
    return p, log


def _log(log):
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_time_limit_signal_checkpoints_every_node_then_requeues(tmp_path):
    """SIGUSR1 (--signal=B:USR1@600) reaches every worker (srun -> node.sh -> torchrun's children, not torchrun),
    the workers checkpoint and exit 0, and only then the job is requeued (requeueing a running job ends it)."""
    p, log = _start(tmp_path)
    try:
        t0 = time.time()
        p.send_signal(signal.SIGUSR1)
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        assert time.time() - t0 < 30
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    events = [(r["cmd"], r.get("node") or r.get("argv", [""])[0]) for r in _log(log)
              if r["cmd"] in ("worker-checkpointed", "python-terminated", "scontrol")]
    events = [e for e in events if e != ("scontrol", "show")]
    assert sorted(events[:2]) == [("worker-checkpointed", "0"), ("worker-checkpointed", "1")], events
    assert events[2:] == [("scontrol", "requeue")], events  # after both checkpoints, and nothing terminated
    assert [c["argv"] for c in _calls(log, "scontrol") if c["argv"][0] == "requeue"] == [["requeue", "4242"]]
    assert "the trainers checkpoint and stop" in out and "requeueing" in out


def test_time_limit_signal_without_a_checkpoint_stops_after_the_grace(tmp_path):
    """Workers that do not stop within PREEMPT_GRACE_S of SIGUSR1 are stopped (SIGTERM), then the job is
    requeued all the same."""
    p, log = _start(tmp_path, extra={"FAKE_IGNORE_USR1": "1", "PREEMPT_GRACE_S": "2"})
    try:
        p.send_signal(signal.SIGUSR1)
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert sorted(c["node"] for c in _calls(log, "python-terminated")) == ["0", "1"]
    assert not _calls(log, "worker-checkpointed")
    assert [c["argv"] for c in _calls(log, "scontrol") if c["argv"][0] == "requeue"] == [["requeue", "4242"]]
    assert "no checkpoint after 2 s: stopping the training" in out and "requeueing" in out


def test_sigterm_stops_training_without_a_requeue_of_its_own(tmp_path):
    """A preemption or scancel (SIGTERM to the batch shell): the training stops; SLURM's --requeue, not this
    script, puts a preempted job back."""
    p, log = _start(tmp_path)
    try:
        t0 = time.time()
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        assert time.time() - t0 < 30
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert not [c for c in _calls(log, "scontrol") if c["argv"][0] == "requeue"]
    assert sorted(c["node"] for c in _calls(log, "python-terminated")) == ["0", "1"]  # both nodes' training stopped
    assert "requeueing" not in out


@pytest.mark.extended  # CI: the recipe rendered and requeued with fake srun / python (above)
def test_requeued_job_resumes_the_real_trainer(tmp_path):
    """The DiT trainer on two fake nodes (one CPU rank each): SIGUSR1 mid-run makes the ranks save a checkpoint
    (there is no periodic one: checkpoint.every is past the end) and stop, then the job is requeued; the requeued
    start (same command) resumes from that checkpoint and finishes the run."""
    steps, every = 40, 1000
    port = free_port()
    extra = {"PYTHON": sys.executable, "GPUS_PER_NODE": "1", "MASTER_PORT": port, "DIST_TIMEOUT_S": "60"}
    e, log = _fake_slurm(tmp_path, nodelist="localhost,localhost", extra=extra)
    args = ["bash", str(SBATCH), "dit", "configs/dit_tiny_cpu.yaml", f"train.steps={steps}",
            f"checkpoint.every={every}", "checkpoint.stop_check_every=2", "train.global_batch=16",
            "train.batch_per_gpu=8", "logging.every=1", "logging.progress_bar=false", "logging.tensorboard=false"]
    first = subprocess.Popen(args, cwd=tmp_path, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    pointer = tmp_path / "run" / "checkpoints" / "latest.json"
    metrics = tmp_path / "run" / "metrics.jsonl"
    try:
        deadline = time.time() + 300
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert first.poll() is None and time.time() < deadline, first.communicate()[0][-3000:]
            time.sleep(0.05)
        first.send_signal(signal.SIGUSR1)
        out1, _ = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == 0, out1[-3000:]
    assert [c["argv"] for c in _calls(log, "scontrol") if c["argv"][0] == "requeue"] == [["requeue", "4242"]]
    saved = json.loads(pointer.read_text())["step"]
    assert 2 <= saved < steps and saved % 2 == 0, "the first start was not stopped mid-run"
    assert f"SIGUSR1 received: stopped after step {saved} with its checkpoint" in out1

    e["SLURM_RESTART_COUNT"] = "1"  # what SLURM sets on the requeued start
    e["MASTER_PORT"] = free_port()
    second = subprocess.run(args, cwd=tmp_path, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            timeout=600)
    assert second.returncode == 0, second.stdout[-3000:]
    assert 'start 1: 2 nodes x 1 ranks' in second.stdout
    assert f'resuming from {{"step": {saved},' in second.stdout
    assert f"at step {saved}" in second.stdout and "resumed from" in second.stdout  # the trainer's own line
    logged = metrics_by_step(tmp_path / "run", lambda r: r["loss"])
    assert sorted(logged) == list(range(1, steps + 1))
    assert json.loads(pointer.read_text())["step"] == steps
