"""train.deepspeed, the extra DeepSpeed keys (train/base.deepspeed_config): merged into the trainer's sections key by
key, refused where the trainer owns the key, parsed as the engines will parse them, misspellings refused."""
import pytest

from modeling.config import ConfigError, load_config
from train.base import deepspeed_config
from train.dit_config import DiTTrainConfig
from train.vae_config import VAVAETrainConfig

pytest.importorskip("deepspeed")

BASE = {DiTTrainConfig: ["data.path=/nowhere", "train.steps=1"],
        VAVAETrainConfig: ["data.root=/nowhere", "train.steps=1"]}


def ds_of(cls, *overrides):
    cfg = load_config(cls, None, BASE[cls] + list(overrides))
    return deepspeed_config(cfg, 1, cfg.train.global_batch if cls is DiTTrainConfig else cfg.train.batch_per_gpu)


@pytest.mark.parametrize("cls", [DiTTrainConfig, VAVAETrainConfig])
def test_a_section_given_in_part_keeps_the_trainers_keys(cls):
    # was dict.update: the offload setting replaced the whole section and DeepSpeed ran ZeRO stage 0 while the
    # trainer (guard, EMA, checkpoints) believed stage 2
    ds = ds_of(cls, "train.zero_stage=2", "train.deepspeed.zero_optimization.offload_optimizer.device=cpu",
               "train.deepspeed.zero_force_ds_cpu_optimizer=false",
               "train.deepspeed.steps_per_print=7", "train.deepspeed.flops_profiler.enabled=true",
               "train.deepspeed.data_types.grad_accum_dtype=fp32")
    assert ds["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu"}}
    assert ds["steps_per_print"] == 7 and "enabled" in ds["torch_autocast"]


@pytest.mark.parametrize("override, named, owner", [
    ("zero_optimization.stage=3", "train.deepspeed.zero_optimization.stage", "train.zero_stage"),
    ("train_batch_size=8", "train.deepspeed.train_batch_size", "train.batch_per_gpu"),
    ("gradient_clipping=1.0", "train.deepspeed.gradient_clipping", "optim.grad_clip"),
    ("bf16.enabled=true", "train.deepspeed.bf16", "train.precision"),
    ("optimizer.type=Adam", "train.deepspeed.optimizer", "optim"),
    ("bfloat16.enabled=true", "train.deepspeed.bfloat16", "train.precision"),  # DeepSpeed's older spelling
    ("torch_autocast.enabled=false", "train.deepspeed.torch_autocast", "train.precision"),
])
def test_keys_the_trainer_sets_are_refused_naming_its_own_key(override, named, owner):
    with pytest.raises(ConfigError) as e:
        ds_of(DiTTrainConfig, "train.deepspeed." + override)
    assert str(e.value).startswith(named + ":") and owner in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("override, says", [
    ("zero_optimisation.stage=2", "train.deepspeed.zero_optimisation: not a key DeepSpeed"),  # ignored silently
    ("zero_optimization.stag=2", "DeepSpeedZeroConfig: stag: Extra inputs are not permitted"),
    ("communication_data_type=fp33", "Got: fp33"),
    ("amp.enabled=true", "Apex AMP integration has been removed"),
    ("zero_optimization=null", "train.deepspeed.zero_optimization: expected a mapping"),
    # deepspeed.initialize refused it after the model was built (ZeRO-Offload with a client optimizer)
    ("zero_optimization.offload_optimizer.device=cpu", "add train.deepspeed.zero_force_ds_cpu_optimizer=false"),
    # inside a section DeepSpeed reads key by key (pydantic refuses them in its own sections, above)
    ("activation_checkpointing.partition_activatons=true",
     "train.deepspeed.activation_checkpointing.partition_activatons: not a key DeepSpeed"),
    ("flops_profiler.enabeld=true", "train.deepspeed.flops_profiler.enabeld: not a key DeepSpeed"),
])
def test_what_deepspeed_would_refuse_or_ignore_is_one_line_before_anything_is_built(override, says):
    with pytest.raises(ConfigError) as e:
        ds_of(VAVAETrainConfig, "train.deepspeed." + override)
    assert says in str(e.value) and "\n" not in str(e.value) and "pydantic.dev" not in str(e.value)
