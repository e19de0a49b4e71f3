"""The VA-VAE trainer end to end on the CPU (in-process, 1 DeepSpeed process, gloo): a few steps with a
substitute foundation model; resume, non-finite guard, ZeRO stages, configs and checkpoints of the first trainer,
the CLI."""
import json
from pathlib import Path

import pytest
import torch

from modeling.checkpoint import load_vavae_checkpoint
from modeling.foundation import FoundationModelUnavailable
from modeling.vavae import AutoencoderKL, VAVAEModelConfig
from train import train_vae
from modeling.config import ConfigError, from_dict, load_config
from train.guard import NonFiniteError
from train.train_vae import Trainer, main, train
from train.vae_config import VAVAETrainConfig

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "resolution": 32,
              "z_channels": 4, "embed_dim": 4}


def tiny_data(out, **overrides):
    data = {
        "model": dict(TINY_MODEL),
        "foundation": {"name": "random_tiny", "allow_substitute": True},
        "loss": {"disc_start": 3, "disc_ndf": 8, "perceptual_weight": 0.0},
        "data": {"source": "skimage", "num_samples": 6, "num_workers": 0},
        "train": {"batch_per_gpu": 2, "steps": 4},
        "checkpoint": {"every": 2},
        "logging": {"dir": str(out), "every": 1, "tensorboard": False, "progress_bar": False},
    }
    for k, v in overrides.items():
        sec, key = k.split(".")
        data[sec][key] = v
    return data


def tiny_cfg(out, **overrides):
    return from_dict(VAVAETrainConfig, tiny_data(out, **overrides))


def tokenizer(out):
    return torch.load(out / "tokenizer.pt", weights_only=False)["state_dict"]


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_runs_resumes_bit_exact_and_exports(tmp_path):
    full = train(tiny_cfg(tmp_path / "a", **{"loss.perceptual_weight": 1.0}))
    assert full["step"] == 4 and full["skipped_steps"] == 0
    train(tiny_cfg(tmp_path / "b", **{"train.steps": 2, "loss.perceptual_weight": 1.0}))  # "killed" at step 2
    train(tiny_cfg(tmp_path / "b", **{"loss.perceptual_weight": 1.0}))   # resumes from it, crosses an epoch
    a, b = tokenizer(tmp_path / "a"), tokenizer(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert "linear_proj.weight" in a and "loss.logvar" in a and "loss.discriminator.main.0.weight" in a
    assert not any(k.startswith("loss.perceptual_loss.") for k in a)
    load_vavae_checkpoint(str(tmp_path / "a" / "tokenizer.pt"), AutoencoderKL(VAVAEModelConfig(**TINY_MODEL)))
    logs_a, logs_b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    # disc_start 3 in the reference's global_step (two a batch): the discriminator's loss is 0 at batch 0 and
    # trains from batch 1; its term enters the autoencoder's loss from batch 2
    assert [("g" in r, r["d_loss"] > 0) for r in logs_a[:3]] == [(False, False), (False, True), (True, True)]
    assert all(r["vf_weight"] > 0 and r["lpips"] > 0 for r in logs_a)
    keys = [k for k in logs_a[3] if k not in ("time", "img_per_s", "eta_s", "peak_rss_gib")]
    assert [r["loss"] for r in logs_a] == [r["loss"] for r in logs_b]
    assert [[r.get(k) for k in keys] for r in logs_a[2:]] == [[r.get(k) for k in keys] for r in logs_b[2:]]
    assert (tmp_path / "a" / "reconstructions.png").is_file() and full["eval"]["psnr"] > 0


def test_zero_stages_train_the_same(tmp_path):
    """ZeRO 0 (the trainer checks the gradient itself) and ZeRO 2 (DeepSpeed's partitioned optimizer) give the
    same losses and weights: the adaptive weights' autograd.grad inside the forward does not disturb ZeRO's
    gradient hooks."""
    runs = {}
    for stage in (0, 2):
        out = tmp_path / f"z{stage}"
        train(tiny_cfg(out, **{"train.zero_stage": stage, "train.steps": 3}))
        runs[stage] = (metrics(out), tokenizer(out))
    (m0, w0), (m2, w2) = runs[0], runs[2]
    for r0, r2 in zip(m0, m2):
        for k in ("loss", "nll", "vf", "vf_weight"):
            assert r0[k] == pytest.approx(r2[k], rel=1e-5, abs=1e-6), k
    for k in w0:
        torch.testing.assert_close(w0[k], w2[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_nonfinite_step_is_skipped_and_counted_bf16(tmp_path, monkeypatch, zero_stage):
    orig = train_vae.VAVAELoss.generator_loss

    def poisoned(self, inputs, recon, posterior, global_step, *a, **kw):
        loss, logs = orig(self, inputs, recon, posterior, global_step, *a, **kw)
        return (loss * float("nan") if global_step == 2 else loss), logs  # batch 1 (reference_steps)

    monkeypatch.setattr(train_vae.VAVAELoss, "generator_loss", poisoned)
    res = train(tiny_cfg(tmp_path, **{"train.steps": 3, "train.precision": "bf16", "train.zero_stage": zero_stage,
                                      "loss.disc_start": 0}))
    assert res["step"] == 3 and res["skipped_steps"] == 1
    sd = tokenizer(tmp_path)
    assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())
    logs = metrics(tmp_path)
    assert logs[1]["skipped_steps"] == 1 and "loss" not in logs[1]  # the skipped step logs no loss terms


def test_skipped_step_changes_nothing(tmp_path, monkeypatch):
    """A poisoned step leaves both models and both optimizers exactly as they were."""
    orig = train_vae.VAVAELoss.generator_loss
    monkeypatch.setattr(train_vae.VAVAELoss, "generator_loss",
                        lambda self, *a, **kw: (lambda r: (r[0] * float("nan"), r[1]))(orig(self, *a, **kw)))
    trainer = Trainer(tiny_cfg(tmp_path, **{"loss.disc_start": 0}))
    before = {k: v.clone() for k, v in trainer_state(trainer).items()}
    out = trainer.train_step(trainer.next_batch())
    assert out["applied"] == 0.0 and trainer.step == 1 and trainer.guard.skipped_steps == 0  # (fit() counts)
    after = trainer_state(trainer)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not trainer.engine_ae.optimizer.state  # Adam never stepped


def test_discriminator_steps_before_disc_start_as_the_reference(tmp_path):
    """Before disc_start the reference steps the discriminator's Adam on a loss multiplied by 0: the weights stay,
    its step count advances (the bias correction of its first real update: 1.5x a fresh Adam's), which skipping the
    step lost (a review, 2026-12-05). The losses see the reference's global_step: two a batch (Lightning 2.4)."""
    assert [train_vae.reference_steps(b) for b in range(3)] == [(0, 1), (2, 3), (4, 5)]
    trainer = Trainer(tiny_cfg(tmp_path, **{"loss.disc_start": 10**9}))
    before = {k: v.clone() for k, v in trainer_state(trainer).items() if k.startswith("d.")}
    for _ in range(2):
        out = trainer.train_step(trainer.next_batch())
    assert out["applied"] == 1.0 and out["d_loss"] == 0.0
    after = trainer_state(trainer)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {int(s["step"]) for s in trainer.engine_d.optimizer.state.values()} == {2}


def trainer_state(trainer):
    """Every trained parameter (BatchNorm statistics move in any forward, as in the reference)."""
    sd = {f"ae.{k}": v.detach() for k, v in trainer.engine_ae.module.named_parameters()}
    sd.update({f"d.{k}": v.detach() for k, v in trainer.engine_d.module.named_parameters()})
    return sd


def test_repeated_nonfinite_aborts_with_checkpoint_intact(tmp_path, monkeypatch):
    orig = train_vae.VAVAELoss.generator_loss

    def poisoned(self, inputs, recon, posterior, global_step, *a, **kw):
        loss, logs = orig(self, inputs, recon, posterior, global_step, *a, **kw)
        return (loss * float("nan") if global_step >= 4 else loss), logs  # from batch 2 (reference_steps)

    monkeypatch.setattr(train_vae.VAVAELoss, "generator_loss", poisoned)
    with pytest.raises(NonFiniteError, match="in a row"):
        train(tiny_cfg(tmp_path, **{"train.steps": 10, "train.max_bad_steps": 2}))
    assert (tmp_path / "checkpoints" / "step_0000002" / "trainer.pt").is_file()   # periodic
    assert (tmp_path / "checkpoints" / "step_0000004" / "trainer.pt").is_file()   # saved before stopping


def test_refuses_real_model_without_weights(tmp_path):
    cfg = tiny_cfg(tmp_path, **{"foundation.name": "dinov2_vitl14", "foundation.allow_substitute": False})
    with pytest.raises(FoundationModelUnavailable, match="efficientnet_lite0"):
        train(cfg)
    assert not list((tmp_path / "checkpoints").glob("step_*"))


def test_shipped_configs_are_the_paper_recipe():
    stages = [load_config(VAVAETrainConfig, REPO / f"configs/vavae_f16d32_stage{i}.yaml") for i in (1, 2, 3)]
    assert [(s.loss.vf_weight, s.loss.cos_margin, s.loss.distmat_margin, s.train.epochs) for s in stages] == \
        [(0.5, 0.0, 0.0, 100), (0.1, 0.0, 0.0, 15), (0.1, 0.5, 0.25, 15)]
    # their f16d32_vfdinov2_long.yaml: disc_start "5001 -> 1 -> 1"; 8 images per GPU (a review, 2026-12-05: the
    # stages had 5001 throughout and 16 per GPU, which the discriminator's BatchNorm and the adaptive weights see)
    assert [s.loss.disc_start for s in stages] == [5001, 1, 1]
    for s in stages:
        assert (s.optim.lr, s.optim.betas, s.loss.kl_weight) == (1e-4, (0.5, 0.9), 1e-6)
        assert (s.loss.disc_loss, s.loss.perceptual_weight, s.foundation.name) == ("hinge", 1.0, "dinov2_vitl14")
        assert s.model.to_dict() == VAVAEModelConfig().to_dict() and s.train.precision == "fp32"
        assert s.train.batch_per_gpu == 8 and s.data.flip_prob == 0.0
    assert stages[1].train.init_from.endswith("stage1/tokenizer.pt")
    tiny = load_config(VAVAETrainConfig, REPO / "configs/vavae_tiny_cpu.yaml")
    assert tiny.foundation.allow_substitute and tiny.foundation.name == "efficientnet_lite0"


def test_trainer_after_an_in_process_main_ended_the_process_group(tmp_path):
    """A main() run in-process (tests, notebooks) destroys the process group at its end; DeepSpeed's cached
    groups must not make the next engine fail ("Group ... is not registered")."""
    import torch.distributed as dist
    train(tiny_cfg(tmp_path / "a", **{"train.steps": 1, "train.zero_stage": 2}))
    dist.destroy_process_group()
    assert train(tiny_cfg(tmp_path / "b", **{"train.steps": 1, "train.zero_stage": 2}))["step"] == 1


# ----------------------------------------------------------------------------- the first trainer's files

OLD_YAML = """\
model: {ch: 32, ch_mult: [1, 2], num_res_blocks: 1, attn_resolutions: [], resolution: 32}
foundation: {name: random_tiny, allow_substitute: true}
loss: {disc_start: 1000, perceptual_weight: 0.0, disc_ndf: 8}
optim: {lr: 4.0e-4, grad_clip: null}
data: {source: skimage, num_samples: 8, num_workers: 0}
train: {out_dir: OUT, batch_size: 2, max_steps: 3, log_every: 1, ckpt_every: 2, keep_last: 2,
        max_consecutive_nonfinite: 7, device: cpu, precision: fp32}
"""


def test_first_trainer_config_converts_on_read(tmp_path, caplog):
    path = tmp_path / "old.yaml"
    path.write_text(OLD_YAML.replace("OUT", str(tmp_path / "run")))
    cfg = load_config(VAVAETrainConfig, path)
    assert (cfg.logging.dir, cfg.train.batch_per_gpu, cfg.train.steps, cfg.logging.every) == \
        (str(tmp_path / "run"), 2, 3, 1)
    assert (cfg.checkpoint.every, cfg.checkpoint.keep_last, cfg.train.max_bad_steps) == (2, 2, 7)
    assert cfg.dist.backend == "gloo" and cfg.optim.grad_clip == 0.0
    assert cfg.checkpoint_dir() == tmp_path / "run" / "checkpoints"   # where the first trainer put them
    assert "'train.out_dir' is now 'logging.dir'" in caplog.text
    with pytest.raises(ConfigError, match="both 'train.max_steps'"):
        load_config(VAVAETrainConfig, path, ["train.steps=5"])


def old_checkpoint(tmp_path):
    """A run directory as the first VA-VAE trainer left it (step_*/state.pt), with known weights."""
    vae = AutoencoderKL(VAVAEModelConfig(**TINY_MODEL))
    torch.manual_seed(3)
    weights = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in vae.state_dict().items()}
    weights["linear_proj.weight"] = torch.randn(64, 4, 1, 1)
    weights["loss.logvar"] = torch.tensor(0.0)
    d = tmp_path / "old_run" / "checkpoints" / "step_0000002"
    d.mkdir(parents=True)
    torch.save({"weights": weights, "opt_ae": {}, "opt_d": {}, "step": 2, "epoch": 0, "batch_in_epoch": 2,
                "nonfinite_skipped": 0, "rng": None, "config": {}}, d / "state.pt")
    (d.parent / "latest.json").write_text(json.dumps({"step": 2, "dir": d.name}))
    return d, weights


def test_first_trainer_checkpoint_loads_as_init_and_refuses_inexact_resume(tmp_path):
    d, weights = old_checkpoint(tmp_path)
    with pytest.raises(ConfigError, match="train.init_from="):
        train(tiny_cfg(tmp_path / "old_run"))
    trainer = Trainer(tiny_cfg(tmp_path / "new_run", **{"train.init_from": str(d / "state.pt")}))
    assert torch.equal(trainer.vae.encoder.conv_in.weight.detach(), weights["encoder.conv_in.weight"])
    assert torch.equal(trainer.linear_proj.weight.detach(), weights["linear_proj.weight"])


def test_init_from_tokenizer_export(tmp_path):
    train(tiny_cfg(tmp_path / "s1", **{"train.steps": 1}))
    trainer = Trainer(tiny_cfg(tmp_path / "s2", **{"train.init_from": str(tmp_path / "s1" / "tokenizer.pt")}))
    sd = tokenizer(tmp_path / "s1")
    assert torch.equal(trainer.vae.decoder.conv_out.weight.detach(), sd["decoder.conv_out.weight"])
    assert torch.equal(trainer.loss_fn.discriminator.main[0].weight.detach(), sd["loss.discriminator.main.0.weight"])


# ----------------------------------------------------------------------------- the CLI

def test_cli_print_config(capsys):
    assert main(["--config", str(REPO / "configs/vavae_tiny_cpu.yaml"), "--set", "train.steps=7",
                 "--print-config"]) == 0
    assert "steps: 7" in capsys.readouterr().out


@pytest.mark.parametrize("args, needle", [
    (["train.stepz=3"], "'train.stepz'"),
    (["train.zero_stage=3"], "train.zero_stage"),
    (["model.ch=48"], "ch=48"),
])
def test_cli_config_error_is_one_line_exit_2(capsys, args, needle):
    assert main(["--config", str(REPO / "configs/vavae_tiny_cpu.yaml"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err


def test_cli_missing_foundation_weights_is_one_line_exit_2(tmp_path, capsys):
    rc = main(["--config", str(REPO / "configs/vavae_f16d32_stage1.yaml"), f"logging.dir={tmp_path}",
               "foundation.weights=/nonexistent/dinov2.pth", "data.source=skimage", "model.ch=32",
               "logging.tensorboard=false", "logging.progress_bar=false"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "/nonexistent/dinov2.pth" in err


# ----------------------------------------------------------------------------- image folders (PIL, DALI)

def image_folder(root, n=8, size=40):
    """An ImageFolder of small JPEGs (crops of a real photo), two classes."""
    import numpy as np
    import skimage.data
    from PIL import Image
    photo = skimage.data.astronaut()
    for i in range(n):
        d = root / f"class_{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        y, x = 20 * i, 15 * i
        Image.fromarray(np.ascontiguousarray(photo[y:y + size + 8, x:x + size])).save(d / f"img_{i}.jpg", quality=90)
    return root


def folder_cfg(out, root, **overrides):
    return tiny_cfg(out, **{"data.source": "folder", "data.root": str(root), "data.num_workers": 0,
                            "train.steps": 2, "checkpoint.every": 2, **overrides})


def test_folder_auto_decodes_with_pil_on_the_cpu(tmp_path, caplog):
    root = image_folder(tmp_path / "images")
    caplog.set_level("INFO")
    res = train(folder_cfg(tmp_path / "run", root))
    assert res["step"] == 2 and res["eval"]["psnr"] > 0
    assert "data.backend=auto -> PIL (the reference crop): no GPU" in caplog.text


def test_folder_dali_cpu_mode_reads_the_scan(tmp_path):
    from train.data.dali import dali_available
    from train.data.files import scan
    assert dali_available(), "nvidia-dali is part of the CI environment (scripts/setup_venv.sh)"
    root = image_folder(tmp_path / "images")
    with pytest.raises(ConfigError, match="files.tsv"):
        Trainer(folder_cfg(tmp_path / "r0", root, **{"data.backend": "dali", "data.dali_device": "cpu"}))
    scan(root, tmp_path / "scan", workers=1, progress=False)
    trainer = Trainer(folder_cfg(tmp_path / "r1", tmp_path / "scan",
                                 **{"data.backend": "dali", "data.dali_device": "cpu"}))
    assert trainer.loader.backend == "dali"
    assert trainer.fit()["step"] == 2


def test_corrupt_image_is_a_one_line_error(tmp_path, capsys):
    root = image_folder(tmp_path / "images")
    (root / "class_0" / "img_0.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    rc = main(["--config", str(REPO / "configs/vavae_tiny_cpu.yaml"), *[f"{k}={v}" for k, v in {
        "model.ch": 32, "model.ch_mult": "[1,2]", "model.resolution": 32, "foundation.name": "random_tiny",
        "foundation.input_size": "null", "data.source": "folder", "data.root": root, "data.num_workers": 0,
        "train.steps": 8, "train.batch_per_gpu": 8, "logging.dir": tmp_path / "run",
        "logging.progress_bar": "false", "logging.tensorboard": "false"}.items()]])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "img_0.jpg" in err and "scan" in err


def test_group_norm_kernels_from_the_config(tmp_path):
    """train.kernels reaches the VA-VAE's GroupNorm + SiLU (kernels.ops.group_norm_silu) and the start-up line says
    what runs it: triton = our kernels (the Triton interpreter here), reference = torch's. (Their values: the
    parity fixture through the kernels in tests/test_parity.py, forward and backward in
    tests/test_kernels_group_norm.py.)"""
    import kernels
    for backend in ("triton", "reference"):
        trainer = Trainer(tiny_cfg(tmp_path / backend, **{"train.kernels": backend}))
        try:
            assert kernels.get_backend() == backend
            assert f"kernels {backend} (group_norm_silu: {backend})" in trainer.describe()
        finally:
            trainer.ckpt.release()


def test_cudnn_benchmark_from_the_config(tmp_path):
    """train.cudnn_benchmark (default on: a step's convolution shapes repeat) sets cuDNN's per-shape algorithm
    timing for the process, and the start-up line says which is in effect."""
    before = torch.backends.cudnn.benchmark
    try:
        for value, word in ((False, "off"), (True, "on")):
            trainer = Trainer(tiny_cfg(tmp_path / word, **{"train.cudnn_benchmark": value}))
            try:
                assert torch.backends.cudnn.benchmark is value
                said = word if trainer.device.type == "cuda" else "n/a (CPU)"  # (no cuDNN to time on the CPU)
                assert f"cuDNN benchmark {said}" in trainer.describe()
            finally:
                trainer.ckpt.release()
        assert VAVAETrainConfig().train.cudnn_benchmark is True
    finally:
        torch.backends.cudnn.benchmark = before


def test_compiled_blocks_leave_the_adaptive_weights_layers_eager(tmp_path):
    """train.compile=blocks compiles the encoder's and decoder's bodies, not their output layers: a compiled
    backward computes every gradient of its graph, and the adaptive weights' autograd.grad calls differentiate
    conv_out alone. Counted with aot_eager (a compiled graph's aten ops run eagerly, so a FlopCounterMode around the
    calls counts what the compiled backward computes): compiled whole, the calls cost 2.3-2.7x the eager ones; with the
    bodies compiled, only the decoder body's weight gradients are extra. The step's loss and gradients are eager's."""
    from torch.utils.flop_counter import FlopCounterMode

    def run(compile):
        t = Trainer(tiny_cfg(tmp_path / compile, **{"loss.disc_start": 0, "loss.perceptual_weight": 1.0,
                                                    "loss.lpips_weights": "random", "train.compile": compile,
                                                    "train.compile_backend": "aot_eager"}))
        t.step_on_device(t.next_batch().to(t.device))  # compiles (AOT autograd traces with autograd.grad)
        x = t.next_batch().to(t.device)
        flops, grad = [], torch.autograd.grad

        def counted(*a, **k):
            with FlopCounterMode(display=False) as c:
                r = grad(*a, **k)
            flops.append(c.get_total_flops())
            return r
        grads, backward = {}, t.engine_ae.backward

        def kept(loss):  # the autoencoder's gradients, before its optimizer step
            backward(loss)
            grads.update({n: p.grad.clone() for n, p in t.engine_ae.module.named_parameters() if p.grad is not None})
        torch.autograd.grad, t.engine_ae.backward = counted, kept
        try:
            out = t.step_on_device(x)
        finally:
            torch.autograd.grad = grad
        return sum(flops), len(flops), out, grads

    eager, compiled = run("none"), run("blocks")
    assert eager[1] == compiled[1] == 3  # nll (both layers, recon), VF (the encoder's layer), GAN (decoder's, recon)
    assert eager[0] < compiled[0] < 1.4 * eager[0], (eager[0], compiled[0])
    assert compiled[3].keys() == eager[3].keys() and len(eager[3]) > 0
    for n in eager[3]:
        torch.testing.assert_close(compiled[3][n], eager[3][n], rtol=1e-4, atol=1e-6, msg=n)


def _rewrite_trainer_state(path, state):
    """trainer.pt rewritten as an older trainer wrote it, its size in the step's COMPLETE.json updated to match."""
    from train.checkpoint import MANIFEST
    torch.save(state, path)
    manifest = json.loads((path.parent / MANIFEST).read_text())
    manifest["files"]["trainer.pt"] = path.stat().st_size
    (path.parent / MANIFEST).write_text(json.dumps(manifest))


def test_a_checkpoint_from_when_disc_start_counted_batches_says_so(tmp_path, caplog):
    """loss.disc_start counts the reference's global step since 2026-12-05 (two a batch): a run checkpointed before
    resumes on the new schedule, and its log says where the GAN now starts."""
    import logging

    from train.checkpoint import load_state
    train(tiny_cfg(tmp_path, **{"train.steps": 2}))
    path = tmp_path / "checkpoints" / "step_0000002" / "trainer.pt"
    state = load_state(path)
    assert state["disc_start_counts"] == "reference_global_step"
    state.pop("disc_start_counts")  # as written before
    _rewrite_trainer_state(path, state)
    with caplog.at_level(logging.WARNING, logger="train_vae"):
        train(tiny_cfg(tmp_path, **{"train.steps": 3, "loss.disc_start": 5001}))
    assert "the discriminator trains from batch 2500 and its term enters the loss from batch 2501" in caplog.text


def test_a_checkpoint_of_the_former_flipping_view_resumes_with_its_flips(tmp_path, caplog):
    """Until 2026-12-05 the folder loader flipped at p 0.5 and its checkpoints record that in the loader state, but
    their config has no data.flip_prob: resumed under the new default (0.0) they failed with a traceback (the data
    order would not continue). Now the run continues with the flips, says so, and records them."""
    import logging

    from train.checkpoint import load_state
    from train.data.embedded import write_embedded
    write_embedded(tmp_path / "images", size=48, per_class=2)
    folder = {"data.source": "folder", "data.root": str(tmp_path / "images"), "data.backend": "pil",
              "data.num_workers": 0}
    train(tiny_cfg(tmp_path, **folder, **{"data.flip_prob": 0.5, "train.steps": 2}))  # as the former view ran
    path = tmp_path / "checkpoints" / "step_0000002" / "trainer.pt"
    state = load_state(path)
    del state["config"]["data"]["flip_prob"]  # as it was written then
    _rewrite_trainer_state(path, state)
    with caplog.at_level(logging.WARNING, logger="train_vae"):
        res = train(tiny_cfg(tmp_path, **folder, **{"train.steps": 4}))
    assert res["step"] == 4 and "continues its data order with the flips (data.flip_prob 0.5)" in caplog.text
    assert load_state(tmp_path / "checkpoints" / "step_0000004" / "trainer.pt")["config"]["data"]["flip_prob"] == 0.5


def test_a_checkpoint_of_the_other_trainer_or_of_another_batch_split_says_what_to_do(tmp_path):
    """The DiT trainer on a VA-VAE checkpoint folder was a 1 KB line of every model key "-> '<absent>'", never
    naming the trainer; the VA-VAE's refusal of another batch_per_gpu did not name checkpoint.reshard (a review of
    the documented commands, 2026-12-05)."""
    from train.checkpoint import ResumeConfigError
    from train.dit_config import DiTTrainConfig
    from train.train_dit import DiTTrainer
    from train.checkpoint import load_state
    train(tiny_cfg(tmp_path / "v", **{"train.steps": 2}))
    with pytest.raises(ResumeConfigError, match=r"batch_per_gpu: 2 -> 3; set checkpoint.reshard=true"):
        train(tiny_cfg(tmp_path / "v", **{"train.batch_per_gpu": 3}))
    with pytest.raises(ResumeConfigError) as e:  # with a change no elastic resume continues: no such remedy
        train(tiny_cfg(tmp_path / "v", **{"train.batch_per_gpu": 3, "model.z_channels": 8}))
    assert "model.z_channels: 4 -> 8" in str(e.value) and "reshard" not in str(e.value)
    dit = load_config(DiTTrainConfig, REPO / "configs/dit_tiny_cpu.yaml", [
        f"checkpoint.dir={tmp_path / 'v' / 'checkpoints'}", f"logging.dir={tmp_path / 'd'}",
        "logging.progress_bar=false", "logging.tensorboard=false"])
    with pytest.raises(ResumeConfigError) as e:
        DiTTrainer(dit)
    assert "written by the VA-VAE trainer (engines autoencoder, discriminator), not the DiT trainer" in str(e.value)
    # a checkpoint from before trainer.pt named its trainer: told apart by its engines' folders
    state_path = tmp_path / "v" / "checkpoints" / "step_0000002" / "trainer.pt"
    state = load_state(state_path, "trainer state")
    del state["trainer"]
    _rewrite_trainer_state(state_path, state)
    with pytest.raises(ResumeConfigError) as e:
        DiTTrainer(dit)
    assert "written by another trainer (engines autoencoder, discriminator), not the DiT trainer" in str(e.value)
    train(tiny_cfg(tmp_path / "v", **{"train.steps": 3}))  # and its own trainer still resumes it
