"""Two "nodes" of two ranks each on the loopback interface, for both trainers and both launchers.

A node is one launcher process and its workers: `torchrun --nnodes 2 --node_rank N --master_addr 127.0.0.1
--master_port P --nproc_per_node 2` (two of them), or DeepSpeed's own launcher, `deepspeed --hostfile H --no_ssh
--node_rank N --master_addr 127.0.0.1 --master_port P` with a hostfile naming two hosts of 2 slots (deepspeed 0.19.8
refuses a hostfile that names the same host twice; with --no_ssh each call starts only its own node's ranks). The
trainers run from their command lines, unchanged; what they do is recorded by a sitecustomize.py this file writes
into a folder on PYTHONPATH (PROBE below). In every worker (RANK set) it records:
- the launcher's environment (RANK, LOCAL_RANK, WORLD_SIZE, the node: GROUP_RANK from torchrun, CROSS_RANK from
  DeepSpeed's launcher);
- every sample a step trains on: the data are made so that a sample carries its index (DiT: a latent store whose
  sample i is the constant i, statistics 0/1, so the normalised latent still reads i; VA-VAE: a folder of uniform
  images whose colour encodes i), read where the step uses them (modeling.flow.flow_loss; AutoencoderKL.encode),
  not where the loader fetches ahead;
- every file written: torch.save to a path (DeepSpeed's shards), os.replace (the trainers' atomic writes and the
  checkpoint commit), and open() for writing under the run folder (metrics, config);
- on request, a fault: SIGKILL of one rank when DeepSpeed starts writing a given checkpoint step.

What is checked: the rank / local rank / node layout of both launchers; each checkpoint file written once, by the
rank that owns it; every sample exactly once per epoch across the four ranks; metrics and run files from rank 0
only; the same losses from both launchers; after one node is SIGKILLed (all its processes: torchrun starts each
worker in a session of its own, so killing torchrun's process group alone leaves the workers running) the other
node exits non-zero within the configured `dist.timeout_s`, the last complete checkpoint is intact, and a relaunch
gives bitwise the losses and weights of the uninterrupted run; the surviving node says in one line which ranks of
which node were lost; a stalled (SIGSTOPped) node ends the run after `dist.timeout_s` (also on the data-parallel
group DeepSpeed creates itself); ranks other than 0 print nothing at INFO.

4 ranks on 2 cores: each launch costs ~30-60 s. CI (`make test`) runs each launcher and each trainer once: the DiT
under torchrun and the VA-VAE under DeepSpeed's launcher (layout, samples, writers, metrics, quiet node 1), and the
DiT node killed mid-run (exit within the timeout, one-line naming, bitwise resume). The rest are `extended`
(`make test-all`): the other two launcher/trainer pairs and the bitwise agreement of the launchers, the VA-VAE node
killed mid-checkpoint, the stalled node.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from multiproc import REPO, env, free_port, metrics_by_step

TIMEOUT_S = 30           # dist.timeout_s of every run here: a lost peer must end a run within this
NODES, PER_NODE = 2, 2
WORLD = NODES * PER_NODE

PROBE = r'''
import os
if os.environ.get("RANK") is not None and os.environ.get("MULTINODE_PROBE"):
    import builtins, json, signal, sys
    _rank = int(os.environ["RANK"])
    _log = open(os.path.join(os.environ["MULTINODE_PROBE"], f"rank{_rank}.{os.getpid()}.jsonl"), "a", buffering=1)
    _run = os.environ.get("MULTINODE_RUN_DIR", "\0")

    def _rec(**kw):
        _log.write(json.dumps({"rank": _rank, "pid": os.getpid(), **kw}) + "\n")

    _rec(ev="start", env={k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "GROUP_RANK",
                                                          "CROSS_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE")})

    import torch
    _save = torch.save

    def _tsave(obj, f, *a, **k):
        if isinstance(f, (str, os.PathLike)):
            _rec(ev="write", path=os.path.abspath(f))
        return _save(obj, f, *a, **k)
    torch.save = _tsave
    _replace = os.replace

    def _oreplace(src, dst, *a, **k):
        _rec(ev="write", path=os.path.abspath(dst))
        return _replace(src, dst, *a, **k)
    os.replace = _oreplace
    import io
    _open = io.open

    def _bopen(file, mode="r", *a, **k):
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax") \
                and os.path.abspath(file).startswith(_run):
            _rec(ev="write", path=os.path.abspath(file))
        return _open(file, mode, *a, **k)
    builtins.open = io.open = _bopen   # pathlib's write_text calls io.open

    import modeling.flow as _flow
    _flow_loss = _flow.flow_loss

    def _counted_flow_loss(model, x, *a, **k):
        _rec(ev="sample", ids=[int(round(v)) for v in x[:, 0, 0, 0].tolist()])
        return _flow_loss(model, x, *a, **k)
    _flow.flow_loss = _counted_flow_loss

    from modeling.vavae import AutoencoderKL as _AE
    _encode = _AE.encode

    def _counted_encode(self, x, *a, **k):
        if self.training and torch.is_grad_enabled():
            v = ((x[:, :2, 0, 0].float() * 0.5 + 0.5) * 255).round().long()
            _rec(ev="sample", ids=(v[:, 0] + 256 * v[:, 1]).tolist())
        return _encode(self, x, *a, **k)
    _AE.encode = _counted_encode

    _kill = os.environ.get("MULTINODE_KILL_AT_SAVE")   # "RANK:STEP": SIGKILL that rank when it starts saving STEP
    if _kill:
        _krank, _kstep = (int(v) for v in _kill.split(":"))
        from deepspeed.runtime.engine import DeepSpeedEngine as _E
        _save_ckpt = _E.save_checkpoint

        def _faulty_save(self, save_dir, *a, **k):
            if _rank == _krank and os.path.basename(str(save_dir)) == f"step_{_kstep:07d}.tmp":
                _rec(ev="fault", step=_kstep)
                _log.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return _save_ckpt(self, save_dir, *a, **k)
        _E.save_checkpoint = _faulty_save
'''


# ----------------------------------------------------------------------------- data that name their samples

DIT_SAMPLES, DIT_BATCH, DIT_STEPS, DIT_EVERY = 64, 4, 12, 4      # 16 per step: 4 steps an epoch, 3 epochs
VAE_SAMPLES, VAE_BATCH, VAE_STEPS, VAE_EVERY = 32, 2, 8, 2       # 8 per step: 4 steps an epoch, 2 epochs


@pytest.fixture(scope="module")
def dit_latents(tmp_path_factory):
    """A latent store whose sample i is the constant i (and its flip too), mean 0 / std 1: the normalised latent
    the step sees still reads i."""
    from safetensors.torch import save_file

    from train.data.latents import shard_name
    d = tmp_path_factory.mktemp("latents")
    for s, lo in enumerate(range(0, DIT_SAMPLES, 32)):
        ids = torch.arange(lo, lo + 32, dtype=torch.float32)
        lat = ids[:, None, None, None].expand(32, 32, 8, 8).contiguous()
        save_file({"latents": lat, "latents_flip": lat.clone(), "labels": (torch.arange(lo, lo + 32) % 10)},
                  str(d / shard_name(0, s)))
    torch.save({"mean": torch.zeros(1, 32, 1, 1), "std": torch.ones(1, 32, 1, 1)}, d / "latents_stats.pt")
    return d


@pytest.fixture(scope="module")
def vae_images(tmp_path_factory):
    """An image folder of uniform images; image i has red i % 256 and green i // 256."""
    from PIL import Image
    d = tmp_path_factory.mktemp("images")
    for i in range(VAE_SAMPLES):
        (d / f"class{i % 2}").mkdir(exist_ok=True)
        Image.new("RGB", (80, 72), (i % 256, i // 256, 40)).save(d / f"class{i % 2}" / f"{i:04d}.png")
    return d


def dit_args(run, latents):
    return ["--config", "configs/dit_tiny_cpu.yaml", "data.source=latents", f"data.path={latents}",
            f"train.steps={DIT_STEPS}", f"train.global_batch={DIT_BATCH * WORLD}", f"train.batch_per_gpu={DIT_BATCH}",
            "train.zero_stage=2", f"checkpoint.every={DIT_EVERY}", "checkpoint.keep_last=5",
            f"checkpoint.dir={run}/ckpt", f"logging.dir={run}", "logging.every=1", "logging.progress_bar=false",
            "logging.tensorboard=false", f"dist.timeout_s={TIMEOUT_S}"]


def vae_args(run, images):
    return ["--config", "configs/vavae_tiny_cpu.yaml", "model.resolution=64", "foundation.name=none",
            "data.source=folder", f"data.root={images}", "data.backend=pil", "data.num_workers=0",
            f"train.batch_per_gpu={VAE_BATCH}", "train.zero_stage=2", f"train.steps={VAE_STEPS}",
            f"checkpoint.every={VAE_EVERY}", "checkpoint.keep_last=5", f"checkpoint.dir={run}/ckpt",
            f"logging.dir={run}", "logging.every=1", "logging.progress_bar=false", "logging.tensorboard=false",
            "logging.reconstructions=false", f"dist.timeout_s={TIMEOUT_S}"]


# ----------------------------------------------------------------------------- launching two nodes

class TwoNodes:
    """Both nodes of one run: their launcher processes, output files and the probe's folder."""

    def __init__(self, launcher, module, args, run, tmp, extra_env=None):
        self.run, self.probe = Path(run), Path(tmp) / "probe"
        self.probe.mkdir(parents=True, exist_ok=True)
        site = Path(tmp) / "site"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(PROBE)
        e = env()
        e.update(PYTHONPATH=f"{site}:{e['PYTHONPATH']}", MULTINODE_PROBE=str(self.probe),
                 MULTINODE_RUN_DIR=str(self.run), **(extra_env or {}))
        port = free_port()
        if launcher == "deepspeed":
            hostfile = Path(tmp) / "hostfile"
            hostfile.write_text("".join(f"node{n} slots={PER_NODE}\n" for n in range(NODES)))
        self.procs, self.outs = [], []
        for n in range(NODES):
            if launcher == "torchrun":
                cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(NODES), "--node_rank", str(n),
                       "--master_addr", "127.0.0.1", "--master_port", port, "--nproc_per_node", str(PER_NODE),
                       "-m", module, *args]
            else:
                cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh",
                       "--node_rank", str(n), "--master_addr", "127.0.0.1", "--master_port", port,
                       "--module", module, *args]
            out = Path(tmp) / f"node{n}.out"
            self.outs.append(out)
            self.procs.append(subprocess.Popen(cmd, cwd=REPO, env=e, stdout=out.open("w"), stderr=subprocess.STDOUT,
                                               start_new_session=True))

    def wait(self, timeout=600):
        deadline = time.time() + timeout
        try:
            return [p.wait(timeout=max(1, deadline - time.time())) for p in self.procs]
        finally:
            self.kill_all()

    def node_processes(self, n):
        """Node n's launcher and every process under it (torchrun's workers sit in sessions of their own)."""
        try:
            agent = psutil.Process(self.procs[n].pid)
            return [agent] + agent.children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def signal_node(self, n, sig):
        for p in self.node_processes(n):
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass

    def kill_all(self):
        for n in range(NODES):
            self.signal_node(n, signal.SIGKILL)
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass

    def output(self, n):
        return self.outs[n].read_text(errors="replace")

    def events(self):
        out = []
        for f in sorted(self.probe.glob("rank*.jsonl")):
            out += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        return out


def run_two_nodes(launcher, module, args, run, tmp, extra_env=None, timeout=600):
    nodes = TwoNodes(launcher, module, args, run, tmp, extra_env)
    rcs = nodes.wait(timeout)
    assert rcs == [0, 0], (rcs, nodes.output(0)[-3000:], nodes.output(1)[-3000:])
    return nodes


# ----------------------------------------------------------------------------- what a run must show

def check_layout(events, node_key):
    """Ranks 0,1 on node 0 and 2,3 on node 1, local ranks 0,1 on each, world 4."""
    starts = {e["rank"]: e["env"] for e in events if e["ev"] == "start"}
    assert sorted(starts) == list(range(WORLD)), sorted(starts)
    for r, v in starts.items():
        assert int(v["WORLD_SIZE"]) == WORLD and int(v["LOCAL_RANK"]) == r % PER_NODE, (r, v)
        assert int(v[node_key]) == r // PER_NODE, (r, node_key, v)


def check_samples(events, samples, per_step, steps):
    """Every sample exactly once per epoch across all ranks (each rank's k-th step is its k-th batch)."""
    by_rank = {}
    for e in events:
        if e["ev"] == "sample":
            by_rank.setdefault(e["rank"], []).append(e["ids"])
    assert sorted(by_rank) == list(range(WORLD)), "the sample probe saw no training step on some rank"
    steps_per_epoch = samples // (per_step * WORLD)
    assert all(len(b) == steps for b in by_rank.values()), {r: len(b) for r, b in by_rank.items()}
    orders = []
    for epoch in range(steps // steps_per_epoch):
        seen = [i for r in range(WORLD) for b in by_rank[r][epoch * steps_per_epoch:(epoch + 1) * steps_per_epoch]
                for i in b]
        assert sorted(seen) == list(range(samples)), f"epoch {epoch}: not every sample exactly once"
        orders.append(seen)
    assert orders[0] != orders[1]  # a new order each epoch


def check_checkpoint_writers(events, ckpt, tags):
    """Every file of every committed step folder written exactly once per save, by the rank that owns it: rank r
    its rank_r state and its ZeRO shard of each engine, rank 0 also the trainer state, the model states, the
    manifest, the commit (rename) and latest.json. DeepSpeed's helper scripts (zero_to_fp32.py, zero_to_torch.py)
    are copied by rank 0 without torch.save."""
    ckpt = Path(ckpt).resolve()
    writers = {}
    for e in events:
        if e["ev"] == "write" and e["path"].startswith(str(ckpt)):
            rel = Path(e["path"]).relative_to(ckpt).as_posix()
            rel = re.sub(r"^(step_\d+)\.tmp", r"\1", rel)
            writers.setdefault(rel, []).append(e["rank"])
    steps = sorted(p.name for p in ckpt.glob("step_*") if p.is_dir())
    assert steps, f"no checkpoint in {ckpt}"
    for step in steps:
        files = sorted(p.relative_to(ckpt).as_posix() for p in (ckpt / step).rglob("*") if p.is_file())
        for f in files:
            name = Path(f).name
            if name in ("zero_to_fp32.py", "zero_to_torch.py"):
                continue
            m = re.match(r"rank_(\d+)\.pt$", name) or re.match(r"zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$",
                                                              name)
            owner = int(m.group(1)) if m else 0
            assert writers.get(f) == [owner], (f, writers.get(f), owner)
        shards = [f for f in files if "zero_pp_rank_" in f]
        assert len(shards) == WORLD * len(tags), shards
        assert sum(1 for f in files if Path(f).name.startswith("rank_")) == WORLD
        assert writers.get(step) == [0]  # the commit: rank 0 renamed the finished folder into place
    assert set(writers.get("latest.json", [])) == {0}


def check_rank0_files(events, run, ckpt):
    """Metrics, config and everything else in the run folder (checkpoints aside) written by rank 0 only."""
    run, ckpt = Path(run).resolve(), Path(ckpt).resolve()
    other = {(e["rank"], e["path"]) for e in events if e["ev"] == "write" and e["path"].startswith(str(run))
             and not e["path"].startswith(str(ckpt)) and e["rank"] != 0}
    assert not other, sorted(other)[:5]
    written = {e["path"] for e in events if e["ev"] == "write"}
    assert {str(run / "metrics.jsonl"), str(run / "config.yaml")} <= written, sorted(written)[:8]


def check_metrics(run, steps):
    lines = (Path(run) / "metrics.jsonl").read_text().splitlines()
    logged = [json.loads(line)["step"] for line in lines if "loss" in json.loads(line)]
    assert logged == list(range(1, steps + 1)), logged  # one line per step: no rank but 0 writes


PER_STEP_LINE = re.compile(r"checkpoint saved|exported|tokenizer ->|\"step\": \d+")


def check_quiet_nodes(nodes):
    """No per-step output (metric lines, checkpoint and export messages) from node 1."""
    text = nodes.output(1)
    assert not PER_STEP_LINE.search(text), PER_STEP_LINE.search(text).group(0)


def losses(run):
    return metrics_by_step(run, lambda r: (r["loss"], r["grad_norm"]))


# ----------------------------------------------------------------------------- uninterrupted runs

@pytest.fixture(scope="module")
def dit_straight(tmp_path_factory, dit_latents):
    tmp = tmp_path_factory.mktemp("dit_straight")
    t0 = time.time()
    nodes = run_two_nodes("torchrun", "train.train_dit", dit_args(tmp / "run", dit_latents), tmp / "run", tmp)
    nodes.seconds = time.time() - t0
    return nodes


@pytest.fixture(scope="module")
def vae_straight(tmp_path_factory, vae_images):
    tmp = tmp_path_factory.mktemp("vae_straight")
    return run_two_nodes("torchrun", "train.train_vae", vae_args(tmp / "run", vae_images), tmp / "run", tmp)


def test_dit_two_torchrun_nodes(dit_straight):
    n, ev = dit_straight, dit_straight.events()
    check_layout(ev, "GROUP_RANK")
    check_samples(ev, DIT_SAMPLES, DIT_BATCH, DIT_STEPS)
    check_checkpoint_writers(ev, n.run / "ckpt", ["deepspeed"])
    check_rank0_files(ev, n.run, n.run / "ckpt")
    check_metrics(n.run, DIT_STEPS)
    check_quiet_nodes(n)
    assert (n.run / "final_reference.pt").is_file()


@pytest.mark.extended
def test_vae_two_torchrun_nodes(vae_straight):
    n, ev = vae_straight, vae_straight.events()
    check_layout(ev, "GROUP_RANK")
    check_samples(ev, VAE_SAMPLES, VAE_BATCH, VAE_STEPS)
    check_checkpoint_writers(ev, n.run / "ckpt", ["autoencoder", "discriminator"])
    check_rank0_files(ev, n.run, n.run / "ckpt")
    check_metrics(n.run, VAE_STEPS)
    check_quiet_nodes(n)
    assert (n.run / "tokenizer.pt").is_file()


@pytest.mark.extended
def test_dit_two_deepspeed_launcher_nodes(tmp_path, dit_latents, dit_straight):
    """DeepSpeed's launcher gives the same ranks, so the same run: bitwise the losses of the torchrun nodes."""
    n = run_two_nodes("deepspeed", "train.train_dit", dit_args(tmp_path / "run", dit_latents), tmp_path / "run",
                      tmp_path)
    ev = n.events()
    check_layout(ev, "CROSS_RANK")
    check_samples(ev, DIT_SAMPLES, DIT_BATCH, DIT_STEPS)
    check_checkpoint_writers(ev, n.run / "ckpt", ["deepspeed"])
    check_rank0_files(ev, n.run, n.run / "ckpt")
    check_metrics(n.run, DIT_STEPS)
    check_quiet_nodes(n)
    assert losses(n.run) == losses(dit_straight.run)


@pytest.fixture(scope="module")
def vae_deepspeed(tmp_path_factory, vae_images):
    tmp = tmp_path_factory.mktemp("vae_deepspeed")
    return run_two_nodes("deepspeed", "train.train_vae", vae_args(tmp / "run", vae_images), tmp / "run", tmp)


def test_vae_two_deepspeed_launcher_nodes(vae_deepspeed):
    n, ev = vae_deepspeed, vae_deepspeed.events()
    check_layout(ev, "CROSS_RANK")
    check_samples(ev, VAE_SAMPLES, VAE_BATCH, VAE_STEPS)
    check_checkpoint_writers(ev, n.run / "ckpt", ["autoencoder", "discriminator"])
    check_rank0_files(ev, n.run, n.run / "ckpt")
    check_metrics(n.run, VAE_STEPS)
    check_quiet_nodes(n)
    assert (n.run / "tokenizer.pt").is_file()


@pytest.mark.extended
def test_vae_launchers_give_the_same_run(vae_deepspeed, vae_straight):
    assert losses(vae_deepspeed.run) == losses(vae_straight.run)


# ----------------------------------------------------------------------------- a lost node

def assert_same_final_weights(a, b, name):
    ra, rb = torch.load(Path(a) / name, weights_only=True), torch.load(Path(b) / name, weights_only=True)
    flat_a = {f"{k}/{j}": v for k, d in ra.items() for j, v in d.items()}
    flat_b = {f"{k}/{j}": v for k, d in rb.items() for j, v in d.items()}
    assert flat_a.keys() == flat_b.keys() and flat_a
    for k in flat_a:
        assert torch.equal(flat_a[k], flat_b[k]), k


@pytest.fixture(scope="module")
def dit_killed(tmp_path_factory, dit_latents):
    """Node 1 SIGKILLed (torchrun and its workers) right after the first checkpoint; node 0 left to notice."""
    tmp = tmp_path_factory.mktemp("dit_killed")
    run = tmp / "run"
    nodes = TwoNodes("torchrun", "train.train_dit", dit_args(run, dit_latents), run, tmp)
    pointer = run / "ckpt" / "latest.json"
    deadline = time.time() + 300
    while time.time() < deadline and not (pointer.exists() and json.loads(pointer.read_text())["step"] >= DIT_EVERY):
        assert all(p.poll() is None for p in nodes.procs), "a node ended before the first checkpoint"
        time.sleep(0.05)
    victims = nodes.node_processes(1)
    assert len(victims) == 1 + PER_NODE, [v.cmdline()[:3] for v in victims]
    nodes.signal_node(1, signal.SIGKILL)
    killed_at = time.time()
    try:
        rc0 = nodes.procs[0].wait(timeout=TIMEOUT_S + 60)
    except subprocess.TimeoutExpired:
        rc0 = None
    nodes.survivor_exit_s = time.time() - killed_at
    nodes.survivor_rc = rc0
    time.sleep(1)
    nodes.left_running = [p.pid for n in range(NODES) for p in nodes.node_processes(n)
                          if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    nodes.kill_all()
    nodes.saved = json.loads(pointer.read_text())["step"]
    return nodes


def test_dit_node_killed_mid_run_exits_and_resumes_bitwise(dit_killed, dit_straight, dit_latents, tmp_path):
    n = dit_killed
    assert n.survivor_rc not in (None, 0), f"node 0 did not exit within {TIMEOUT_S + 60} s of losing node 1"
    assert n.survivor_exit_s < TIMEOUT_S + 15, n.survivor_exit_s
    assert not n.left_running, f"processes left running: {n.left_running}"
    assert DIT_EVERY <= n.saved < DIT_STEPS, "the run was not interrupted mid-way"
    from train.checkpoint import CheckpointManager
    assert CheckpointManager(n.run / "ckpt").verify(n.run / "ckpt" / f"step_{n.saved:07d}") is None
    # the same command again: every rank resumes from the last complete checkpoint
    again = run_two_nodes("torchrun", "train.train_dit", dit_args(n.run, dit_latents), n.run, tmp_path)
    assert "resumed from" in again.output(0)
    assert losses(n.run) == losses(dit_straight.run)
    assert_same_final_weights(n.run, dit_straight.run, "final_reference.pt")


def test_survivor_names_the_lost_node(dit_killed):
    """gloo only says 'Connection reset by peer [127.0.0.1]:PORT' and torchrun names the survivor's own ranks as the
    root cause: the trainer must say, in one line, that ranks 2 and 3 of node 1 were lost."""
    lines = [line for line in dit_killed.output(0).splitlines() if "error" in line.lower()]
    named = [line for line in lines if re.search(r"\brank 2\b", line) and re.search(r"\brank 3\b", line)
             and re.search(r"\bnode 1\b", line)]
    assert named, "\n".join(lines)[-3000:]


@pytest.mark.extended
def test_vae_node_killed_mid_checkpoint_keeps_the_last_one_and_resumes_bitwise(tmp_path, vae_images, vae_straight):
    """Rank 2 (node 1) dies as DeepSpeed starts writing checkpoint 4: node 1's torchrun names it, node 0 exits,
    checkpoint 2 stays the latest and complete, and the relaunch matches the uninterrupted run bit for bit."""
    run = tmp_path / "run"
    fault = 2 * VAE_EVERY
    nodes = TwoNodes("torchrun", "train.train_vae", vae_args(run, vae_images), run, tmp_path / "killed",
                     extra_env={"MULTINODE_KILL_AT_SAVE": f"2:{fault}"})
    t0 = time.time()
    rcs = nodes.wait(timeout=300)
    assert rcs[0] != 0 and rcs[1] != 0, rcs
    assert any(e["ev"] == "fault" for e in nodes.events()), "the fault did not fire"
    assert re.search(r"rank\s*:\s*2 \(local_rank: 0\)[\s\S]*Signal 9", nodes.output(1)), nodes.output(1)[-2000:]
    assert time.time() - t0 < 300
    pointer = json.loads((run / "ckpt" / "latest.json").read_text())
    assert pointer["step"] == fault - VAE_EVERY
    from train.checkpoint import CheckpointManager
    assert CheckpointManager(run / "ckpt").verify(run / "ckpt" / pointer["dir"]) is None
    assert not (run / "ckpt" / f"step_{fault:07d}").exists()
    again = run_two_nodes("torchrun", "train.train_vae", vae_args(run, vae_images), run, tmp_path / "again")
    assert "resumed from" in again.output(0)
    assert losses(run) == losses(vae_straight.run)
    a = torch.load(run / "tokenizer.pt", weights_only=True)["state_dict"]
    b = torch.load(vae_straight.run / "tokenizer.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.extended
def test_stalled_node_ends_the_run_within_the_timeout(tmp_path, dit_latents):
    """Node 1 frozen (SIGSTOP: its sockets stay open, nothing is reset): node 0 must give up after dist.timeout_s.
    ZeRO's gradient all-reduce runs on a group DeepSpeed makes with torch's new_group(ranks) and no timeout, which
    gets torch's default (30 min on gloo) unless the trainer sets the default to dist.timeout_s first."""
    run = tmp_path / "run"
    args = [a if not a.startswith("train.steps=") else "train.steps=100000" for a in dit_args(run, dit_latents)]
    nodes = TwoNodes("torchrun", "train.train_dit", args, run, tmp_path)
    try:
        metrics = run / "metrics.jsonl"
        deadline = time.time() + 300
        while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert all(p.poll() is None for p in nodes.procs), "a node ended before training started"
            time.sleep(0.1)
        nodes.signal_node(1, signal.SIGSTOP)
        stopped_at = time.time()
        try:
            rc0 = nodes.procs[0].wait(timeout=TIMEOUT_S + 30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"node 0 still running {TIMEOUT_S + 30} s after node 1 stalled (dist.timeout_s={TIMEOUT_S})")
        waited = time.time() - stopped_at
        assert rc0 != 0
        assert waited < TIMEOUT_S + 30, f"node 0 took {waited:.0f} s with dist.timeout_s={TIMEOUT_S}"
    finally:
        nodes.signal_node(1, signal.SIGCONT)
        nodes.kill_all()


def test_only_rank0_prints_the_trainer_log(dit_straight, vae_deepspeed):
    """Not even the start-up line ('world 4, ...') or 'done: step N' from the ranks of node 1."""
    for nodes in (dit_straight, vae_deepspeed):
        text = nodes.output(1)
        assert not re.search(r" train(_vae)? INFO ", text), re.search(r".* train(_vae)? INFO .*", text).group(0)
