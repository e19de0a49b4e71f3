"""train.attention: the trainer's choice of attention implementation (auto or one of kernels.attention.CHOICES),
refused where it cannot run (one line naming the key), applied to kernels when the trainer is built, and the
benchmark spec part that forces our fused RoPE attention kernel."""
import typing
from pathlib import Path

import pytest

import kernels
from bench.train_case import parse_spec
from kernels.attention import CHOICES, FUSED_BLOCK
from modeling.config import ConfigError, load_config
from train.dit_config import DiTTrainConfig, DiTTrainSection

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _restore_kernels():
    """A trainer sets the kernels backend and attention for the whole process: put the defaults back."""
    yield
    kernels.set_backend("auto")
    kernels.set_attention(None)


def tiny_cfg(tmp_path, *overrides):
    return load_config(DiTTrainConfig, REPO / "configs/dit_tiny_cpu.yaml", [
        f"checkpoint.dir={tmp_path}/ckpt", f"logging.dir={tmp_path}", "logging.progress_bar=false",
        "logging.tensorboard=false", "train.zero_stage=0", *overrides])


def test_the_literal_lists_auto_and_every_forcible_name():
    assert typing.get_args(typing.get_type_hints(DiTTrainSection)["attention"]) == ("auto", *CHOICES)
    assert DiTTrainSection().attention == "auto" and FUSED_BLOCK in CHOICES


@pytest.mark.parametrize("overrides, words", [
    (["train.attention=flash9"], "train.attention: 'flash9' is not one of"),  # unknown name
    (["train.attention=rope-fused", "model.use_qknorm=true"], "train.attention: rope-fused has no qk-norm"),
    (["train.attention=rope-fused", "model.use_qknorm=true", "model.use_rmsnorm=false"], "model.use_qknorm: true"),
    (["train.attention=rope-fused", "model.use_rope=false"], "train.attention: rope-fused is RoPE fused"),
    (["train.attention=sdpa-cudnn", "train.kernels=reference"], "train: attention: sdpa-cudnn is not run by "
                                                                "kernels: reference"),
])
def test_what_cannot_run_is_refused_in_one_line(tmp_path, overrides, words):
    with pytest.raises(ConfigError) as err:
        tiny_cfg(tmp_path, *overrides)
    assert words in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_what_can_run_is_accepted(tmp_path):
    for name in CHOICES:
        assert tiny_cfg(tmp_path, f"train.attention={name}").train.attention == name
    cfg = tiny_cfg(tmp_path, "model.use_qknorm=true", "train.attention=sdpa-math")  # a q/k/v kernel with qk-norm
    assert cfg.train.attention == "sdpa-math"


def test_spec_part_ropefused():
    assert parse_spec("auto+compiled+ropefused") == ["train.kernels=auto", "train.compile=blocks",
                                                     "train.attention=rope-fused"]
    assert "train.attention=rope-fused" in parse_spec("auto+compiled+fp8mm+ropefused")


def test_the_train_section_sets_the_kernels_and_attention(monkeypatch, tmp_path):
    """train.kernels is applied by the base trainer (both trainers' key), train.attention by the DiT trainer."""
    from train.train_dit import Trainer, set_attention
    calls = []
    monkeypatch.setattr(kernels, "set_attention", lambda name: calls.append(("attention", name)))
    set_attention(DiTTrainSection(attention="rope-fused"))
    set_attention(DiTTrainSection())
    assert calls == [("attention", "rope-fused"), ("attention", None)]
    monkeypatch.setattr(kernels, "set_backend", lambda name: calls.append(("backend", name)))
    Trainer(tiny_cfg(tmp_path, "train.kernels=reference", "train.steps=1", "model.depth=1"))
    assert calls[2:4] == [("backend", "reference"), ("attention", None)]


def test_the_trainer_runs_the_forced_fused_kernel_and_says_so(tmp_path):
    """Built with train.attention=rope-fused (the Triton interpreter on the CPU), the trainer forces it, runs it once
    at start-up, names it in its start-up line, and its step runs it (kernels.describe()["ops"])."""
    from train.train_dit import Trainer
    trainer = Trainer(tiny_cfg(tmp_path, "train.kernels=triton", "train.attention=rope-fused", "train.steps=1",
                               "train.batch_per_gpu=1", "train.global_batch=1", "model.depth=1"))
    assert kernels.attention._state["forced"] == FUSED_BLOCK
    assert "attention rope-fused (forced; ran rope-fused (triton))" in trainer.describe()
    kernels.backend.record("rope_attention", "nothing yet")
    assert trainer.train_step(trainer.next_batch())["applied"] == 1.0
    assert kernels.describe()["ops"]["rope_attention"] == "rope-fused (triton)"
    # auto again: the next trainer built in this process measures (nothing on the CPU) instead of forcing
    auto = Trainer(tiny_cfg(tmp_path / "auto", "train.steps=1"))
    assert kernels.attention._state["forced"] is None and "attention auto (" in auto.describe()


@pytest.mark.parametrize("overrides, words", [
    # auto runs the reference ops on the CPU: a forced name would be ignored there, so it is refused
    (["train.attention=rope-fused"], "train.attention: rope-fused is not run by train.kernels: auto on cpu"),
    (["train.attention=sdpa-math"], "train.attention: sdpa-math is not run by train.kernels: auto on cpu"),
    # a kernel that needs a GPU
    (["train.kernels=triton", "train.attention=sdpa-cudnn"], "train.attention: sdpa-cudnn cannot run here"),
])
def test_a_forced_attention_that_cannot_run_stops_the_build(tmp_path, overrides, words):
    from train.train_dit import Trainer
    with pytest.raises(kernels.BackendUnavailable) as err:
        Trainer(tiny_cfg(tmp_path, "train.steps=1", *overrides))
    assert words in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_the_cli_says_it_in_one_line(tmp_path, capsys):
    from train.train_dit import main
    rc = main(["--config", str(REPO / "configs/dit_tiny_cpu.yaml"), f"logging.dir={tmp_path}",
               f"checkpoint.dir={tmp_path}/ckpt", "train.attention=sdpa-flash", "train.kernels=triton",
               "train.zero_stage=0", "eval.every=0"])
    err = capsys.readouterr().err
    assert rc == 2 and "train.attention: sdpa-flash cannot run here" in err and "Traceback" not in err, err


def test_an_unprimed_choice_traces_inside_a_compiled_block():
    """A key the trainer did not prime (q/k in fp32 after a qk-norm under autocast) reaches attention's chooser
    inside the compiled blocks (fullgraph): its fallback must trace. It looked FlashAttention up with importlib's
    find_spec there, which torch 2.11's dynamo refuses ("Attempted to call function marked as skipped"; the first
    compiled step of such a model failed on the lent GPU's torch); now that is looked up once, at import."""
    import torch

    from kernels import attention
    q = torch.randn(1, 2, 8, 16)

    def pick(q):
        return q * 2 if attention._choose(q, q, q) == "sdpa" else q

    compiled = torch.compile(pick, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(q), q * 2)  # the fallback without FlashAttention: PyTorch's SDPA
    assert attention.installed() == attention._INSTALLED and attention.installed() is not attention._INSTALLED
