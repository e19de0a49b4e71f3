"""The DiT trainer in-process (1 CPU process, DeepSpeed + gloo): non-finite steps are skipped without touching
weights, optimizer or EMA under every ZeRO stage, K in a row stop the run with a checkpoint; FP8 (torchao,
CPU emulation) trains; the reference-format export loads with modeling.checkpoint."""
import os
from pathlib import Path

import pytest
import torch

from modeling.checkpoint import load_dit_checkpoint
from modeling.lightningdit import LightningDiT
from train.checkpoint import CheckpointManager
from modeling.config import ConfigError, load_config
from train.dit_config import DiTTrainConfig
from train.guard import NonFiniteError
from train.train_dit import Trainer

REPO = Path(__file__).resolve().parents[1]


def tiny_cfg(tmp_path, *overrides):
    return load_config(DiTTrainConfig, REPO / "configs/dit_tiny_cpu.yaml", [
        f"checkpoint.dir={tmp_path}/ckpt", f"logging.dir={tmp_path}", "logging.progress_bar=false",
        "logging.tensorboard=false", "logging.every=1", *overrides])


class PoisonOddBatches:
    """Wraps a loader: every second micro-batch has a NaN, so every step (2 micro-batches) is bad."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        for i, (lat, lab) in enumerate(self.loader):
            if i % 2:
                lat = lat.clone()
                lat[0, 0, 0, 0] = float("nan")
            yield lat, lab

    def state_dict(self):
        return self.loader.state_dict()


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_non_finite_steps_are_skipped_then_stop_with_checkpoint(tmp_path, zero_stage):
    cfg = tiny_cfg(tmp_path, f"train.zero_stage={zero_stage}", "train.max_bad_steps=3", "train.steps=10")
    trainer = Trainer(cfg)
    params0 = {k: v.clone() for k, v in trainer.ema.full_state_dict(trainer.engine.module).items()}
    trainer.loader = PoisonOddBatches(trainer.loader)
    with pytest.raises(NonFiniteError, match="3 non-finite steps in a row at step 3; checkpoint saved"):
        trainer.fit()
    assert trainer.guard.skipped_steps == 3
    from train.train_dit import full_state_dict
    after = full_state_dict(trainer.engine.module)
    for k, v in params0.items():  # neither the weights nor the EMA moved
        assert torch.equal(after[k], v), k
        assert torch.equal(trainer.ema.full_state_dict(trainer.engine.module)[k], v), k
    assert CheckpointManager(cfg.checkpoint.dir).latest()[0] == 3


def test_fp8_torchao_trains_and_export_loads(tmp_path):
    # 48 wide on 4x4 latents: FP8-divisible Linears at sizes the CPU's slow FP8 matmul emulation runs in seconds
    cfg = tiny_cfg(tmp_path, "model.hidden_size=48", "model.input_size=4", "fp8.backend=torchao",
                   "fp8.allow_cpu=true", "train.steps=3", "train.zero_stage=2")
    trainer = Trainer(cfg)
    report = trainer.fit()
    assert report["step"] == trainer.step == 3 and report["skipped_steps"] == 0 and "torchao" in trainer.fp8_desc
    assert report["exports"]["reference"] == str(tmp_path / "final_reference.pt")
    model = LightningDiT(cfg.model.architecture())
    load_dit_checkpoint(str(tmp_path / "final_reference.pt"), model, weights="ema")
    ema = trainer.ema.state_dict()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ema.items())


def test_fp8_refused_on_cpu_before_training(tmp_path):
    from modeling.fp8 import FP8Unavailable
    with pytest.raises(FP8Unavailable, match="Transformer Engine|FP8-capable CUDA GPU"):
        Trainer(tiny_cfg(tmp_path, "model.hidden_size=96", "fp8.backend=te"))


def test_compiled_blocks_and_kernel_backend_from_config(tmp_path):
    """train.compile=blocks compiles every block (same losses as eager on the CPU reference ops);
    train.kernels picks the backend and an unavailable one is refused before training."""
    import kernels
    eager = Trainer(tiny_cfg(tmp_path / "a", "train.steps=2", "train.zero_stage=0"))
    eager.fit()
    compiled = Trainer(tiny_cfg(tmp_path / "b", "train.steps=2", "train.zero_stage=0", "train.compile=blocks",
                                "train.kernels=reference"))
    assert all(hasattr(b, "_compiled_call_impl") and b._compiled_call_impl is not None
               for b in compiled.engine.module.blocks)
    compiled.fit()
    a = {k: v for k, v in eager.ema.full_state_dict(eager.engine.module).items()}
    b = compiled.ema.full_state_dict(compiled.engine.module)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    assert kernels.get_backend() == "reference"
    kernels.set_backend("auto")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(kernels.BackendUnavailable):
            Trainer(tiny_cfg(tmp_path / "c", "train.steps=1", "train.kernels=triton")).fit()
        kernels.set_backend("auto")


def test_compile_options_reach_torch_compile_and_bad_ones_are_refused(tmp_path, monkeypatch):
    """train.compile_options (inductor's, e.g. multi-kernel) go to every block's torch.compile; options without
    inductor, or a key this torch's inductor does not have, are one-line config errors naming the key."""
    from modeling.config import ConfigError
    seen = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **kw: seen.append(kw))
    opts = 'train.compile_options={"triton.multi_kernel": 1}'
    trainer = Trainer(tiny_cfg(tmp_path / "a", "train.steps=1", "train.zero_stage=0", "train.compile=blocks",
                               "train.compile_backend=inductor", opts))
    assert "compile blocks (inductor, {'triton.multi_kernel': 1})" in trainer.describe()  # the start-up line
    assert seen and all(kw == {"backend": "inductor", "options": {"triton.multi_kernel": 1}, "fullgraph": True}
                        for kw in seen)
    with pytest.raises(ConfigError, match="train: compile_options are inductor options: they need compile: blocks"):
        tiny_cfg(tmp_path / "b", "train.compile=blocks", "train.compile_backend=eager", opts)
    with pytest.raises(ConfigError, match="train.compile_options: 'triton.multi_kernels' is not an inductor option"):
        Trainer(tiny_cfg(tmp_path / "c", "train.zero_stage=0", "train.compile=blocks", "train.compile_backend=inductor",
                         'train.compile_options={"triton.multi_kernels": 1}'))


def test_eval_keys_wired_from_the_cli(tmp_path, parity_dir):
    """`eval.every` from the command line: the trainer's CLI builds the FID hook (evaluation/train_eval.py) from the
    eval.* keys and logs eval/fid with images seen and training wall-clock (what bench.curves plots)."""
    import json

    import numpy as np

    from modeling.convert import main as convert_main
    from train.train_dit import main
    convert_main([str(parity_dir / "vavae_a.pt"), str(tmp_path / "vae")])  # f16d32 layout, 32 latent channels
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=np.random.default_rng(0).integers(0, 256, (6, 128, 128, 3), dtype=np.uint8))
    rc = main(["--config", str(REPO / "configs/dit_tiny_cpu.yaml"), f"checkpoint.dir={tmp_path}/ckpt",
               f"logging.dir={tmp_path}/run", "logging.progress_bar=false", "logging.tensorboard=false",
               "train.steps=2", "train.zero_stage=0", "eval.every=2", "eval.num_samples=4", "eval.batch_size=4",
               "eval.steps=3", "eval.precision=fp32", f"eval.vae={tmp_path}/vae", f"eval.ref_batch={ref}",
               "eval.precision_recall=false", "eval.grid=0", "checkpoint.export_reference=false"])
    assert rc == 0
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ev = [l for l in lines if "eval/fid" in l]
    assert len(ev) == 1 and ev[0]["step"] == 2 and np.isfinite(ev[0]["eval/fid"])
    assert ev[0]["images_seen"] == 2 * 16 and ev[0]["wall_clock_s"] > 0


def test_eval_needs_a_reference_batch(tmp_path, capsys):
    """The built-in FID hook needs eval.ref_batch: the CLI says so in one line (exit 2) before training;
    a library caller's own eval_fn needs none."""
    from train.train_dit import main
    cfg = load_config(DiTTrainConfig, REPO / "configs/dit_tiny_cpu.yaml", ["eval.every=5"])  # valid as such
    assert cfg.eval.ref_batch is None
    rc = main(["--config", str(REPO / "configs/dit_tiny_cpu.yaml"), "eval.every=5", f"logging.dir={tmp_path}",
               f"checkpoint.dir={tmp_path}/ckpt"])
    err = capsys.readouterr().err
    assert rc == 2 and "eval.ref_batch" in err and "Traceback" not in err


def test_eval_needs_a_sample_per_rank(tmp_path, monkeypatch):
    """With fewer evaluation samples than ranks a rank would gather no features and every rank's merge would fail
    at the first evaluation (a review, 2026-12-05): refused when the hook is built, in one line."""
    from train.train_dit import build_eval
    ref = tmp_path / "ref.npz"
    ref.write_bytes(b"")
    cfg = load_config(DiTTrainConfig, REPO / "configs/dit_tiny_cpu.yaml",
                      ["eval.every=5", f"eval.ref_batch={ref}", "eval.num_samples=4"])
    monkeypatch.setenv("WORLD_SIZE", "8")
    with pytest.raises(ConfigError, match="eval.num_samples 4: at least one per rank \\(8 ranks\\)"):
        build_eval(cfg)


def test_torch_trace_and_wandb_from_the_config(tmp_path):
    """profile.torch_trace writes a Chrome trace of the window under logging.dir/traces; logging.wandb (offline)
    holds the run's metrics, or is refused at start when wandb is not installed."""
    import importlib.util
    import json
    cfg = tiny_cfg(tmp_path, "train.steps=3", "train.zero_stage=0", "profile.start_step=1", "profile.num_steps=1",
                   "profile.torch_trace=true")
    Trainer(cfg).fit()
    trace = json.loads((tmp_path / "traces" / "trace_rank0.json").read_text())
    assert trace["traceEvents"]
    wandb_cfg = tiny_cfg(tmp_path / "w", "train.steps=2", "train.zero_stage=0", "logging.wandb=true")
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(Exception, match="wandb"):
            Trainer(wandb_cfg).fit()
    else:
        Trainer(wandb_cfg).fit()
        assert any((tmp_path / "w").rglob("*.wandb"))


def test_zero3_with_compiled_blocks_is_refused_and_zero3_leaves_linear_alone(tmp_path):
    """ZeRO-3 gathers parameters in forward hooks torch.compile cannot trace: compile=blocks with it is a config
    error, not a crash at the first step. A ZeRO-3 run leaves torch's F.linear alone (DeepSpeed's process-wide
    replacement is off), so a model compiled later in the same process still traces."""
    import torch.nn.functional as F
    from modeling.config import ConfigError
    with pytest.raises(ConfigError, match="zero_stage: 3"):
        tiny_cfg(tmp_path, "train.zero_stage=3", "train.compile=blocks")
    Trainer(tiny_cfg(tmp_path, "train.steps=1", "train.zero_stage=3")).fit()
    assert F.linear is torch._C._nn.linear


def test_eval_in_fp8_where_it_cannot_run_is_refused_before_training(tmp_path, capsys):
    """eval.precision=fp8 on a machine without FP8: one line at start-up (exit 2), not an error at the first
    evaluation hours into the run; nothing was trained or written."""
    from train.train_dit import main
    rc = main(["--config", str(REPO / "configs/dit_tiny_cpu.yaml"), "eval.every=5", "eval.precision=fp8",
               f"eval.ref_batch={tmp_path}/never_read.npz", f"logging.dir={tmp_path}/run",
               f"checkpoint.dir={tmp_path}/ckpt"])
    err = capsys.readouterr().err
    assert rc == 2 and "FP8-capable CUDA GPU" in err and "eval.precision: bf16-weights" in err
    assert "Traceback" not in err and not (tmp_path / "ckpt").exists()


def test_trainer_primes_attention_at_its_micro_batch(tmp_path, monkeypatch):
    """The trainer has attention timed (forward + backward) at its micro-batch shape before the compiled blocks
    are traced: inside a trace nothing can be timed."""
    import kernels
    calls = []
    monkeypatch.setattr(kernels, "prime_attention", lambda shape, dtype, device, training, agree: calls.append(
        (shape, dtype, training, agree("sdpa-cudnn"))))
    cfg = tiny_cfg(tmp_path, "train.steps=1", "train.zero_stage=0")
    Trainer(cfg)
    m = cfg.model
    assert calls == [((cfg.train.batch_per_gpu, m.num_heads, (m.input_size // m.patch_size) ** 2,
                       m.hidden_size // m.num_heads), torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32,
                      True, "sdpa-cudnn")]  # one rank: its own choice


def test_a_measured_choice_is_rank0s_on_every_rank(tmp_path):
    """Ranks that time attention for themselves may disagree; from_rank0 gives every rank rank 0's pick."""
    import subprocess
    import sys

    from multiproc import env, free_port
    script = ("import os, torch.distributed as dist\n"
              "from train.distributed import from_rank0\n"
              "dist.init_process_group('gloo')\n"
              "r = dist.get_rank()\n"
              "got = from_rank0(['sdpa-cudnn', 'sdpa-flash'][r], ('fa3', 'sdpa-cudnn', 'sdpa-flash'), 'cpu')\n"
              "open(os.path.join(os.environ['OUT_DIR'], str(r)), 'w').write(got)\n"
              "dist.destroy_process_group()\n")
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", script], cwd=REPO,
                              env={**env(), "RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": port, "OUT_DIR": str(tmp_path)}) for r in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert [(tmp_path / str(r)).read_text() for r in range(2)] == ["sdpa-cudnn", "sdpa-cudnn"]


def test_the_export_carries_the_latent_statistics(tmp_path):
    """pretrained_ema is what users sample: without the latents' statistics beside it, sample_images / generate
    decoded unnormalised latents and said only "latent stats none" (a review, 2026-12-05)."""
    from safetensors.torch import save_file

    from modeling.sample_images import default_stats_path
    from modeling.hub import load_latent_stats
    from train.data.latents import LatentStore, shard_name
    data = tmp_path / "latents"
    data.mkdir()
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(32, 4, 4, 4, generator=g) * 3 + 1
    save_file({"latents": lat, "latents_flip": lat.flip(3), "labels": torch.arange(32) % 10},
              str(data / shard_name(0, 0)))
    cfg = tiny_cfg(tmp_path, "data.source=latents", f"data.path={data}", "model.in_channels=4", "model.input_size=4",
                   "train.steps=1", "train.zero_stage=0", "train.global_batch=16", "train.batch_per_gpu=16")
    report = Trainer(cfg).fit()
    folder = Path(report["exports"]["pretrained_ema"])
    mean, std = LatentStore.open(data).stats
    stored = load_latent_stats(default_stats_path(folder))
    assert torch.equal(stored["mean"], mean.float()) and torch.equal(stored["std"], std.float())


def test_eval_tokenizer_of_other_channels_is_refused_before_training(tmp_path, parity_dir, capsys):
    """eval.vae of 32 latent channels for a 4-channel DiT: one line before training; it crashed at the first
    evaluation, which runs before that step's checkpoint (a review, 2026-12-05)."""
    import numpy as np

    from modeling.convert import main as convert_main
    from train.train_dit import main
    convert_main([str(parity_dir / "vavae_a.pt"), str(tmp_path / "vae")])
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=np.zeros((4, 64, 64, 3), dtype=np.uint8))
    capsys.readouterr()
    rc = main(["--config", str(REPO / "configs/dit_tiny_cpu.yaml"), f"checkpoint.dir={tmp_path}/ckpt",
               f"logging.dir={tmp_path}/run", "logging.progress_bar=false", "model.in_channels=4", "eval.every=2",
               f"eval.vae={tmp_path}/vae", f"eval.ref_batch={ref}", "eval.num_samples=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1] == (f"error: eval.vae {tmp_path}/vae: a tokenizer of 32 latent channels; "
                                   "model.in_channels has 4"), err
    assert not (tmp_path / "ckpt").exists()


def test_a_failed_start_gives_the_lock_back(tmp_path):
    """A start that fails after taking the checkpoint folder's lock (here: a latent folder that is not there, found
    after the model and engines are built) released nothing: the next start took the lock over as stale, warning
    that a run had ended without releasing it (a review, 2026-12-05)."""
    from train.checkpoint import LOCK_FILE
    with pytest.raises(Exception, match="missing_latents"):
        Trainer(tiny_cfg(tmp_path, "data.source=latents", f"data.path={tmp_path}/missing_latents", "train.steps=1"))
    lock = tmp_path / "ckpt" / LOCK_FILE
    assert lock.is_file() and lock.read_text() == "", lock.read_text()  # released: no owner left on record


def test_zero3_resumes_from_its_checkpoint_exactly(tmp_path):
    """A ZeRO-3 run resumed from its own checkpoint failed at its second step with DeepSpeed's "tracing error": the
    EMA's GatheredParameters re-partitioned the persistent parameters after every step, while the resumed process
    had recorded its prefetch trace with them whole (train/ema.py). Now it continues, bit for bit."""
    import json

    def losses(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: (r["loss"], r["grad_norm"]) for r in rows if "loss" in r}

    args = ("train.zero_stage=3", "checkpoint.every=2", "logging.every=1")
    Trainer(tiny_cfg(tmp_path / "a", *args, "train.steps=5")).fit()
    Trainer(tiny_cfg(tmp_path / "b", *args, "train.steps=2")).fit()
    Trainer(tiny_cfg(tmp_path / "b", *args, "train.steps=5")).fit()  # resumes at step 2
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(a) == [1, 2, 3, 4, 5] and all(a[s] == b[s] for s in (3, 4, 5)), (a, b)


def test_eval_records_after_a_resume_from_an_earlier_checkpoint(tmp_path):
    """Resumed from a checkpoint older than the run's last records: those records move to
    metrics.superseded.jsonl (the steps run again write their own, none twice), and the evaluations' training
    clock (wall_clock_s, what bench.curves plots) continues from the checkpoint's instead of restarting at 0.
    The checkpoint of a step is written before its evaluation (an evaluation that fails loses no training)."""
    import json
    import shutil
    cfg = tiny_cfg(tmp_path, "train.steps=6", "checkpoint.every=2", "eval.every=2", "train.zero_stage=0")
    saved_before_eval = []

    def eval_fn(model, step):
        saved_before_eval.append(CheckpointManager(cfg.checkpoint.dir).latest()[0] == step)
        return {"fake_fid": float(step)}
    Trainer(cfg, eval_fn=eval_fn).fit()
    assert saved_before_eval == [True, True, True]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first_clock = {r["step"]: r["wall_clock_s"] for r in records if "eval/fake_fid" in r}
    shutil.rmtree(CheckpointManager(cfg.checkpoint.dir).step_dir(6))
    Trainer(cfg, eval_fn=eval_fn).fit()  # resumes at step 4
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["wall_clock_s"]) for r in records if "eval/fake_fid" in r]
    losses = [r["step"] for r in records if "loss" in r]
    assert [s for s, _ in evals] == [2, 4, 6] and losses == [1, 2, 3, 4, 5, 6]
    assert evals[1][1] == first_clock[4] and evals[2][1] > first_clock[4]  # the clock went on from step 4's
    moved = [json.loads(line)["step"] for line in (tmp_path / "metrics.superseded.jsonl").read_text().splitlines()]
    assert sorted(set(moved)) == [5, 6]
