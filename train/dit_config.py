"""The DiT trainer's config schema (configs/dit_*.yaml). Every key is documented here or, for the sections both
trainers share, in train/config_sections.py; see modeling/config.py for how files and `--set section.key=value`
overrides are read and validated."""
import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional

from evaluation.train_eval import EvalSettings
from modeling.config import ConfigError, require
from modeling.lightningdit import LIGHTNINGDIT_SIZES, LightningDiTConfig

from .config_sections import (CheckpointSection, DataSection, DistSection, LoggingSection, OptimSection,
                              ProfileSection, TrainerConfig, TrainSection)


@dataclass
class DiTModelSection(LightningDiTConfig):
    """The `model:` section: LightningDiTConfig (modeling/lightningdit.py documents every field) with a size
    preset and the trainer's defaults (XL/1 on 16x16 latents). With a size, hidden_size/depth/num_heads/
    patch_size come from LIGHTNINGDIT_SIZES (set them only with size: custom)."""
    size: str = "XL/1"                  # a LIGHTNINGDIT_SIZES key, or "custom" (then hidden_size/depth/...)
    input_size: int = 16                # latent side (256 px / f16)
    hidden_size: Optional[int] = None   # only with size: custom
    depth: Optional[int] = None         # only with size: custom
    num_heads: Optional[int] = None     # only with size: custom
    patch_size: Optional[int] = None    # only with size: custom

    def validate(self) -> None:
        shape = ("hidden_size", "depth", "num_heads", "patch_size")
        if self.size == "custom":
            require(all(getattr(self, k) is not None for k in shape),
                    "size: custom needs hidden_size, depth, num_heads and patch_size")
        else:
            require(self.size in LIGHTNINGDIT_SIZES,
                    f"size {self.size!r} is unknown; choose one of {sorted(LIGHTNINGDIT_SIZES)} or 'custom'")
            preset = LIGHTNINGDIT_SIZES[self.size]
            given = {k: getattr(self, k) for k in shape if getattr(self, k) is not None}
            require(all(v == preset[k] for k, v in given.items()),
                    f"{sorted(given)} need size: custom (size {self.size} sets {preset})")
            for k in shape:  # resolve the preset: the section is then a complete LightningDiTConfig
                setattr(self, k, preset[k])
        try:
            LightningDiTConfig.validate(self)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def architecture(self) -> LightningDiTConfig:
        """The plain LightningDiTConfig this section describes (what the model and its saved config hold)."""
        self.validate()
        return LightningDiTConfig(**self.to_dict())


@dataclass
class DiTDataSection(DataSection):
    source: Literal["latents", "synthetic"] = "latents"   # latents: a folder of extracted latents; synthetic: random
    path: Optional[str] = None          # latent folder written by the extraction tool (source: latents)
    flip_prob: float = 0.5              # horizontal flip of latents (the reference stores both)
    latent_multiplier: float = 1.0      # (z - mean) / std * latent_multiplier
    synthetic_size: int = 4096          # samples per "epoch" of the synthetic source

    def validate(self) -> None:
        require(self.source != "latents" or self.path, "source: latents needs data.path")
        require(0.0 <= self.flip_prob <= 1.0, "flip_prob must be in [0, 1]")
        require(self.latent_multiplier > 0, "latent_multiplier must be > 0")


@dataclass
class DiTOptimSection(OptimSection):
    """AdamW (the shared Adam keys, the paper's defaults) with weight decay."""
    lr: float = 2e-4                    # peak learning rate (the paper's, constant)
    betas: tuple[float, float] = (0.9, 0.95)   # AdamW betas (the paper's)
    weight_decay: float = 0.0           # AdamW weight decay (the paper's: none)

    def validate(self) -> None:
        super().validate()
        require(self.weight_decay >= 0, "weight_decay must be >= 0")


@dataclass
class DiTTrainSection(TrainSection):
    steps: int = 80_000                 # optimizer steps
    global_batch: int = 1024            # images per optimizer step, all ranks together
    batch_per_gpu: int = 32             # micro-batch per rank; accumulation makes up the difference
    precision: Literal["bf16", "fp32"] = "bf16"   # bf16 = autocast on fp32 weights (as the reference)
    zero_stage: Literal[0, 1, 2, 3] = 2   # DeepSpeed ZeRO stage (3 shards the weights too; not with compile: blocks)
    ema_decay: float = 0.9999           # EMA of the weights (fp32, every rank; evaluated and exported)
    time_dist: Literal["logit_normal", "uniform"] = "logit_normal"   # distribution of the flow time t
    use_cosine_loss: bool = True        # add the cosine loss of the velocity (the paper's)
    # attention's implementation (kernels/attention.py; the names of kernels.attention.CHOICES): auto = measured at
    # start-up at this run's shape, rank 0's choice on every rank; else forced: fa3, fa2, one SDPA kernel (sdpa-*),
    # sdpa (PyTorch's per-call pick), rope-fused (our fused RoPE attention kernel, kernels/rope_attention.py; no
    # qk-norm). A forced kernel that cannot run is a one-line error.
    attention: Literal["auto", "fa3", "fa2", "sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "sdpa-math", "sdpa",
                       "rope-fused"] = "auto"
    # activations recomputed in the backward instead of kept (train/recompute.py): swiglu = each block's SwiGLU
    # output, from w12's output (XL/1 batch 256: 10.5 GiB less, for one more SwiGLU pass per block in the backward)
    recompute: Literal["none", "swiglu"] = "none"

    def validate(self) -> None:
        super().validate()
        require(self.global_batch > 0, "batch sizes must be > 0")
        require(self.global_batch % self.batch_per_gpu == 0,
                f"global_batch {self.global_batch} must be a multiple of batch_per_gpu {self.batch_per_gpu}")
        require(0.0 <= self.ema_decay < 1.0, "ema_decay must be in [0, 1)")
        require(not (self.zero_stage == 3 and self.compile == "blocks"),
                "compile: blocks does not work with zero_stage: 3 (ZeRO-3 gathers each module's parameters in "
                "forward hooks that torch.compile cannot trace); use zero_stage 0-2 (XL/1's fp32 weights, "
                "gradients and Adam state fit one GPU) or compile: none")
        require(self.attention == "auto" or self.kernels != "reference",
                f"attention: {self.attention} is not run by kernels: reference (its attention is plain SDPA); use "
                f"kernels auto, triton or cuda, or attention: auto")


@dataclass
class FP8Section:
    # FP8 training of the block linears: scaled_mm (ours, modeling.fp8.FP8TrainingLinear; docs/fp8.md), torchao,
    # te (Transformer Engine)
    backend: Literal["none", "scaled_mm", "te", "torchao"] = "none"
    recipe: Optional[str] = None        # scaled_mm, torchao: rowwise|tensorwise|rowwise_with_gw_hp (None: the
                                        # first); te: delayed|current|mxfp8
    allow_cpu: bool = False             # scaled_mm, torchao: emulate FP8 on the CPU (tests; never fast)
    # scaled_mm, row-wise recipes: ours quantizes w3's input in our SwiGLU kernel and recomputes the SwiGLU for
    # w3's weight gradient (modeling.fp8.FP8TrainingSwiGLUFFN: its bf16 output neither written nor kept), and
    # proj's input in one pass per row; inline: plain torch ops (inductor fuses what it can); auto: inline (it
    # measured faster through the trainer: 551 vs 515 img/s, XL/1 bs256, H200, bench/results/2026-12-04_h200.md).
    # Either way (row-wise recipes) the operands our ops produce -- qkv's and w12's output gradients, proj's and
    # w3's inputs -- are quantized by kernels.ops.quantize_rows_cols_fp8 (modeling.fp8.apply_fp8_training)
    quant: Literal["auto", "ours", "inline"] = "auto"

    def validate(self) -> None:
        from modeling.fp8 import RECIPES
        require(self.recipe is None or (self.backend != "none" and self.recipe in RECIPES[self.backend]),
                f"recipe {self.recipe!r} does not fit backend {self.backend!r} (recipes: {RECIPES})")
        require(self.quant != "ours" or (self.backend == "scaled_mm" and self.recipe != "tensorwise"),
                f"quant ours quantizes per row in our kernels: it needs backend scaled_mm and a row-wise recipe "
                f"(got {self.backend}, {self.recipe})")


@dataclass
class DiTCheckpointSection(CheckpointSection):
    every: int = 5000                   # steps between checkpoints (the last step is always saved)


@dataclass
class DiTLoggingSection(LoggingSection):
    dir: str = "runs/dit"               # metrics.jsonl, tensorboard/, config.yaml, final_reference.pt, pretrained_ema/
    every: int = 50                     # steps between metric lines


@dataclass
class DiTEvalSection(EvalSettings):
    """The `eval:` section: FID (and precision/recall) of fixed-seed, class-balanced EMA samples every
    `eval.every` steps, against an ADM reference batch; evaluation/train_eval.py documents every field."""

    def validate(self) -> None:
        # The ranges; eval.ref_batch is required where the built-in FID hook is built (train_dit.build_eval):
        # a library caller's own eval_fn needs none.
        try:
            EvalSettings.validate(dataclasses.replace(self, every=0))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        require(self.every >= 0, "eval.every must be >= 0")




@dataclass
class DiTTrainConfig(TrainerConfig):
    model: DiTModelSection = field(default_factory=DiTModelSection)
    data: DiTDataSection = field(default_factory=DiTDataSection)
    optim: DiTOptimSection = field(default_factory=DiTOptimSection)
    train: DiTTrainSection = field(default_factory=DiTTrainSection)
    fp8: FP8Section = field(default_factory=FP8Section)
    checkpoint: DiTCheckpointSection = field(default_factory=DiTCheckpointSection)
    logging: DiTLoggingSection = field(default_factory=DiTLoggingSection)
    eval: DiTEvalSection = field(default_factory=DiTEvalSection)
    profile: ProfileSection = field(default_factory=ProfileSection)
    dist: DistSection = field(default_factory=DistSection)

    def validate(self) -> None:
        if self.train.attention == "rope-fused":  # the fused kernel has RoPE and no qk-norm: it would never run
            require(not self.model.use_qknorm, "train.attention: rope-fused has no qk-norm (model.use_qknorm: true); "
                                               "use train.attention: auto or a q/k/v kernel (fa3, sdpa-cudnn, ...)")
            require(self.model.use_rope, "train.attention: rope-fused is RoPE fused into attention and "
                                         "model.use_rope is false; use train.attention: auto or a q/k/v kernel")
        if self.train.recompute == "swiglu":
            require(self.model.use_swiglu, "train.recompute: swiglu needs model.use_swiglu: true (this MLP is GELU)")
            require(not self.model.use_checkpoint, "train.recompute: swiglu with model.use_checkpoint: true: the whole "
                                                   "block is recomputed already; set one of them")
            # counted (bench.activation_memory --fp8 ...): an FP8 w3 keeps its input in e4m3 (half the bf16 SwiGLU
            # output) whether or not the SwiGLU is recomputed, and fp8.quant ours recomputes it already
            require(self.fp8.backend == "none", f"train.recompute: swiglu saves nothing under fp8.backend "
                                                f"{self.fp8.backend} (its w3 keeps the SwiGLU output in e4m3 or "
                                                f"recomputes it: python -m bench.activation_memory --fp8 ...); use "
                                                f"one of them")
