"""A batch too large for the card (XL/1 at 256 on an 80 GB H100) is a setting, not a bug: the trainer stops in one
line (exit 2) that says what it was doing, torch's figures, which key to lower, and the last complete checkpoint,
which the same command resumes from. The CUDA error is raised by hand here (the CPU has no CUDA allocator); its
text is torch 2.11's."""
import json
from pathlib import Path

import pytest
import torch

from oom import cuda_oom
from train import errors
from train.distributed import RUN_STATE

REPO = Path(__file__).resolve().parents[1]



def args(run: Path, *extra: str) -> list[str]:
    return ["--config", str(REPO / "configs/dit_tiny_cpu.yaml"), "train.steps=6", "train.global_batch=16",
            "train.batch_per_gpu=8", "train.zero_stage=0", "checkpoint.every=2", f"checkpoint.dir={run}/ckpt",
            f"logging.dir={run}", "logging.every=1", "logging.progress_bar=false", "logging.tensorboard=false",
            "checkpoint.export_reference=false", *extra]


def test_out_of_memory_mid_run_is_one_line_exit_2_and_the_run_resumes(tmp_path, monkeypatch, capsys):
    from train import train_dit
    monkeypatch.delenv("VAVAE_DEBUG", raising=False)
    monkeypatch.setitem(RUN_STATE, "phase", "starting")
    monkeypatch.setitem(RUN_STATE, "checkpoint_root", None)
    real = train_dit.DiTTrainer.step_on_device

    def step_then_oom(self, batch):
        if self.step == 3:
            raise cuda_oom()
        return real(self, batch)

    monkeypatch.setattr(train_dit.DiTTrainer, "step_on_device", step_then_oom)
    run = tmp_path / "run"
    assert train_dit.main(args(run)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    line = err[0]
    assert line.startswith("error: out of GPU memory while training step 4 (Tried to allocate 2.25 GiB; GPU 0 has "
                           "a total capacity of 79.19 GiB of which 1.06 GiB is free): lower train.batch_per_gpu "
                           "(now 8); gradient accumulation keeps train.global_batch=16, or set "
                           "train.recompute=swiglu"), line
    assert f"the last complete checkpoint is {run / 'ckpt' / 'step_0000002'} (step 2)" in line, line
    # nothing lost: the same command resumes at step 2 and finishes
    monkeypatch.setattr(train_dit.DiTTrainer, "step_on_device", real)
    assert train_dit.main(args(run)) == 0
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
    assert steps[-1] == 6 and json.loads((run / "ckpt" / "latest.json").read_text())["step"] == 6


def test_vae_out_of_memory_advice_is_a_command_that_resumes(tmp_path, monkeypatch, capsys):
    """The VA-VAE trainer refuses another batch on resume unless resharded (its data order depends on it): the
    advice said "lower train.batch_per_gpu ... run the same command to resume", which then failed (a review,
    2026-12-05). It now says checkpoint.reshard=true, and that command resumes."""
    from train import train_vae
    monkeypatch.delenv("VAVAE_DEBUG", raising=False)
    monkeypatch.setitem(RUN_STATE, "phase", "starting")
    monkeypatch.setitem(RUN_STATE, "checkpoint_root", None)
    run = tmp_path / "run"

    def vae_args(batch: int, *extra: str) -> list[str]:
        return ["--config", str(REPO / "configs/vavae_tiny_cpu.yaml"), "model.ch=32", "model.ch_mult=[1,2]",
                "model.resolution=32", "model.z_channels=4", "model.embed_dim=4", "foundation.name=random_tiny",
                "foundation.input_size=null", "loss.disc_ndf=8", "data.num_samples=8", f"train.batch_per_gpu={batch}",
                "train.steps=4", "train.zero_stage=0", "checkpoint.every=2", f"checkpoint.dir={run}/ckpt",
                f"logging.dir={run}", "logging.every=1", "logging.progress_bar=false", "logging.tensorboard=false",
                "logging.reconstructions=false", "checkpoint.export_reference=false", *extra]

    real = train_vae.VAVAETrainer.step_on_device

    def step_then_oom(self, batch):
        if self.step == 3:
            raise cuda_oom()
        return real(self, batch)

    monkeypatch.setattr(train_vae.VAVAETrainer, "step_on_device", step_then_oom)
    assert train_vae.main(vae_args(4)) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "lower train.batch_per_gpu (now 4) with checkpoint.reshard=true" in line, line
    monkeypatch.setattr(train_vae.VAVAETrainer, "step_on_device", real)
    monkeypatch.setitem(RUN_STATE, "phase", "starting")
    assert train_vae.main(vae_args(2, "checkpoint.reshard=true")) == 0
    assert json.loads((run / "ckpt" / "latest.json").read_text())["step"] == 4


def test_out_of_memory_line_names_the_key_of_its_phase(monkeypatch):
    """Evaluating: the eval batch; a VA-VAE run (no train.recompute): the batch alone; --debug keeps the traceback."""
    from modeling.config import load_config
    from train.dit_config import DiTTrainConfig
    from train.vae_config import VAVAETrainConfig
    monkeypatch.setitem(RUN_STATE, "checkpoint_root", None)
    dit = load_config(DiTTrainConfig, REPO / "configs/dit_tiny_cpu.yaml", ["eval.batch_size=32"])
    oom = cuda_oom()
    monkeypatch.setitem(RUN_STATE, "phase", "evaluating at step 500")
    line = errors.out_of_memory_line(oom, dit)
    assert line.startswith("out of GPU memory while evaluating at step 500 (Tried to allocate 2.25 GiB; ") and \
        "lower eval.batch_size (now 32" in line and "no checkpoint folder yet" in line
    monkeypatch.setitem(RUN_STATE, "phase", "training step 1")
    vae = load_config(VAVAETrainConfig, REPO / "configs/vavae_tiny_cpu.yaml", [])
    line = errors.out_of_memory_line(oom, vae)
    assert f"lower train.batch_per_gpu (now {vae.train.batch_per_gpu})" in line and "recompute" not in line
    assert "\n" not in line
    # a message without torch's figures (another allocator's wording) keeps its own first line
    line = errors.out_of_memory_line(torch.OutOfMemoryError("out of memory\nmore"), vae)
    assert "(out of memory" in line and "\n" not in line


def test_debug_keeps_the_out_of_memory_traceback(monkeypatch):
    from train.dit_config import DiTTrainConfig

    def run(cfg):
        raise cuda_oom()

    monkeypatch.delenv("VAVAE_DEBUG", raising=False)
    with pytest.raises(torch.OutOfMemoryError):
        errors.trainer_main("train.train_dit", None, DiTTrainConfig, run,
                            ["--config", str(REPO / "configs/dit_tiny_cpu.yaml"), "--debug"])


@pytest.mark.extended  # CI: the one-rank path above; this is the same line from rank 1 of 2 under torchrun
def test_out_of_memory_on_one_rank_of_two_is_its_one_line_and_ends_the_run(tmp_path):
    """Rank 1 of a 2-rank run (gloo, ZeRO-2, torchrun) runs out of memory in step 3: it prints its tagged line and
    exits 2 at once (the other rank waits in a collective: no teardown of the group), torchrun stops rank 0, and
    the checkpoint of step 2 is the one the line names."""
    import subprocess
    import sys

    from multiproc import env, free_port
    run, record = tmp_path / "run", tmp_path / "oom.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
           str(REPO / "tests" / "kill_rank.py"), "train.train_dit",
           *[a.replace("train.zero_stage=0", "train.zero_stage=2") for a in args(run, "dist.timeout_s=20")]]
    p = subprocess.run(cmd, cwd=REPO, env={**env(), "KILL_RANK": "1", "KILL_AT": "oom:3", "KILL_RECORD": str(record)},
                       capture_output=True, text=True, timeout=600)
    assert p.returncode != 0 and record.exists(), p.stderr[-3000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("[rank 1/2 ") and " error: " in ln]
    assert len(lines) == 1, p.stderr[-3000:]
    assert "error: out of GPU memory while training step 3 (Tried to allocate 2.25 GiB; GPU 1 has a total " \
           "capacity of 79.19 GiB of which 1.06 GiB is free): lower train.batch_per_gpu (now 8)" in lines[0]
    assert f"{run / 'ckpt' / 'step_0000002'} (step 2)" in lines[0], lines[0]
    assert "Traceback" not in "\n".join(ln for ln in p.stderr.splitlines() if ln.startswith("[rank 1/2 "))


def test_recompute_is_advised_only_where_the_config_allows_it(monkeypatch):
    """train.recompute=swiglu is refused with FP8 and with model.use_checkpoint (dit_config): not advised there."""
    from modeling.config import load_config
    from train.dit_config import DiTTrainConfig
    monkeypatch.setitem(RUN_STATE, "checkpoint_root", None)
    monkeypatch.setitem(RUN_STATE, "phase", "training step 1")
    oom = cuda_oom()
    for extra, advised in (([], True), (["fp8.backend=scaled_mm"], False), (["model.use_checkpoint=true"], False),
                           (["train.recompute=swiglu"], False)):
        cfg = load_config(DiTTrainConfig, REPO / "configs/dit_tiny_cpu.yaml", extra)
        assert ("train.recompute=swiglu" in errors.out_of_memory_line(oom, cfg)) == advised, extra


@pytest.mark.extended  # CI: the one-rank paths; this is rank 1 of 2 under torchrun
def test_a_user_error_on_one_rank_ends_that_rank_at_once(tmp_path):
    """A mistake only one rank sees (its data) while the other waits in a collective: that rank prints its line
    and exits 2 at once, without tearing the process group down (under NCCL the destroy is itself a collective and
    can block the failing rank); torchrun then stops the other."""
    import json
    import subprocess
    import sys
    import time

    from multiproc import env, free_port
    run, record = tmp_path / "run", tmp_path / "err.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
           str(REPO / "tests" / "kill_rank.py"), "train.train_dit",
           *[a.replace("train.zero_stage=0", "train.zero_stage=2") for a in args(run, "dist.timeout_s=60")]]
    p = subprocess.run(cmd, cwd=REPO, env={**env(), "KILL_RANK": "1", "KILL_AT": "data:3", "KILL_RECORD": str(record)},
                       capture_output=True, text=True, timeout=600)
    ended = time.time()
    assert p.returncode != 0 and record.exists(), p.stderr[-3000:]
    assert ended - json.loads(record.read_text())["time"] < 45, p.stderr[-3000:]  # well inside dist.timeout_s
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("[rank 1/2 ") and " error: " in ln]
    assert len(lines) == 1 and "shard_00001.safetensors: a corrupt record" in lines[0], p.stderr[-3000:]
    assert "Traceback" not in "\n".join(ln for ln in p.stderr.splitlines() if ln.startswith("[rank 1/2 "))


def test_sigterm_to_one_process_is_a_line_naming_where_it_stopped(monkeypatch, capsys):
    """A single-process run (a one-GPU SLURM job's SIGTERM, `kill`) ended with status 143 and printed nothing; under
    torchrun every rank says where it stopped. Now the one process does too, and gives the caller's handler back."""
    import os
    import signal
    import time

    from train.dit_config import DiTTrainConfig
    monkeypatch.setitem(RUN_STATE, "checkpoint_root", None)

    def run(cfg):
        monkeypatch.setitem(RUN_STATE, "phase", "training step 7")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises here
        raise AssertionError("SIGTERM did not stop the run")

    before = signal.getsignal(signal.SIGTERM)
    status = errors.trainer_main("train.train_dit", None, DiTTrainConfig, run,
                                 ["--config", str(REPO / "configs/dit_tiny_cpu.yaml")])
    err = capsys.readouterr().err
    assert status == 143 and err == "error: stopped by SIGTERM while training step 7; no checkpoint folder yet\n"
    assert signal.getsignal(signal.SIGTERM) is before
