"""The DiT trainer's config schema (configs/dit_*.yaml). Every key is documented here; see modeling/config.py
for how files and `--set section.key=value` overrides are read and validated."""
import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional

from evaluation.train_eval import EvalSettings
from modeling.lightningdit import LIGHTNINGDIT_SIZES, LightningDiTConfig

from modeling.config import ConfigError, require


@dataclass
class ModelConfig(LightningDiTConfig):
    """The `model:` section: LightningDiTConfig (modeling/lightningdit.py documents every field) with a size
    preset and the trainer's defaults (XL/1 on 16x16 latents). With a size, hidden_size/depth/num_heads/
    patch_size come from LIGHTNINGDIT_SIZES (set them only with size: custom)."""
    size: str = "XL/1"                  # a LIGHTNINGDIT_SIZES key, or "custom" (then hidden_size/depth/...)
    input_size: int = 16                # latent side (256 px / f16)
    hidden_size: Optional[int] = None   # only with size: custom
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    patch_size: Optional[int] = None

    def validate(self):
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

    def architecture(self):
        """The plain LightningDiTConfig this section describes (what the model and its saved config hold)."""
        self.validate()
        return LightningDiTConfig(**self.to_dict())


@dataclass
class DataConfig:
    source: Literal["latents", "synthetic"] = "latents"
    path: Optional[str] = None          # latent folder written by the extraction tool (source: latents)
    flip_prob: float = 0.5              # horizontal flip of latents (the reference stores both)
    latent_multiplier: float = 1.0      # (z - mean) / std * latent_multiplier
    synthetic_size: int = 4096          # samples per "epoch" of the synthetic source

    def validate(self):
        require(self.source != "latents" or self.path, "source: latents needs data.path")
        require(0.0 <= self.flip_prob <= 1.0, "flip_prob must be in [0, 1]")
        require(self.latent_multiplier > 0, "latent_multiplier must be > 0")


@dataclass
class OptimConfig:
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 0               # linear warmup; the paper uses a constant lr
    grad_clip: float = 0.0              # max global grad norm; 0 = off (the reference does not clip)

    def validate(self):
        require(self.lr > 0, f"lr must be > 0, got {self.lr}")
        require(all(0.0 <= b < 1.0 for b in self.betas), f"betas must be in [0, 1), got {self.betas}")
        require(self.weight_decay >= 0 and self.eps > 0 and self.warmup_steps >= 0 and self.grad_clip >= 0,
                "weight_decay, warmup_steps, grad_clip must be >= 0 and eps > 0")


@dataclass
class TrainConfig:
    steps: int = 80_000                 # optimizer steps
    global_batch: int = 1024            # images per optimizer step, all ranks together
    batch_per_gpu: int = 32             # micro-batch per rank; accumulation makes up the difference
    precision: Literal["bf16", "fp32"] = "bf16"   # bf16 = autocast on fp32 weights (as the reference)
    zero_stage: Literal[0, 1, 2, 3] = 2
    ema_decay: float = 0.9999
    time_dist: Literal["logit_normal", "uniform"] = "logit_normal"
    use_cosine_loss: bool = True
    seed: int = 0
    max_bad_steps: int = 5              # non-finite loss/grad-norm steps in a row before stopping
    kernels: Literal["auto", "reference", "triton", "cuda"] = "auto"  # kernels.ops backend (see docs/kernels.md)
    compile: Literal["none", "blocks"] = "none"   # blocks: torch.compile each block (one shared graph)
    compile_backend: Literal["inductor", "aot_eager", "eager"] = "inductor"  # torch.compile backend (eager: debug/CI)
    deepspeed: dict = field(default_factory=dict)  # extra DeepSpeed config merged last (expert use)

    def validate(self):
        require(self.steps > 0, "steps must be > 0")
        require(self.global_batch > 0 and self.batch_per_gpu > 0, "batch sizes must be > 0")
        require(self.global_batch % self.batch_per_gpu == 0,
                f"global_batch {self.global_batch} must be a multiple of batch_per_gpu {self.batch_per_gpu}")
        require(0.0 <= self.ema_decay < 1.0, "ema_decay must be in [0, 1)")
        require(self.max_bad_steps >= 1, "max_bad_steps must be >= 1")
        require(not (self.zero_stage == 3 and self.compile == "blocks"),
                "compile: blocks does not work with zero_stage: 3 (ZeRO-3 gathers each module's parameters in "
                "forward hooks that torch.compile cannot trace); use zero_stage 0-2 (XL/1's fp32 weights, "
                "gradients and Adam state fit one GPU) or compile: none")


@dataclass
class FP8Config:
    backend: Literal["none", "te", "torchao"] = "none"
    recipe: Optional[str] = None        # te: delayed|current|mxfp8; torchao: tensorwise|rowwise|rowwise_with_gw_hp
    allow_cpu: bool = False             # torchao only: emulate FP8 on the CPU (tests; never fast)

    def validate(self):
        from modeling.fp8 import RECIPES
        require(self.recipe is None or (self.backend != "none" and self.recipe in RECIPES[self.backend]),
                f"recipe {self.recipe!r} does not fit backend {self.backend!r} (recipes: {RECIPES})")


@dataclass
class CheckpointConfig:
    dir: str = "runs/dit/checkpoints"
    every: int = 5000                   # steps between checkpoints (the last step is always saved)
    keep_last: int = 3
    resume: Literal["auto", "never"] = "auto"   # auto: continue from latest.json if there is one
    export_reference: bool = True       # also write {"model": module.*, "ema": ...} at the end

    def validate(self):
        require(self.every > 0 and self.keep_last >= 1, "every and keep_last must be >= 1")


@dataclass
class LoggingConfig:
    dir: str = "runs/dit"               # metrics.jsonl, tensorboard/, config.yaml
    every: int = 50                     # steps between metric lines
    tensorboard: bool = True
    progress_bar: bool = True
    wandb: bool = False                 # also log to Weights & Biases (needs the wandb package)
    wandb_project: str = "vavae-lightningdit"
    wandb_mode: Literal["offline", "online"] = "offline"   # offline: written under logging.dir, sync later


@dataclass
class EvalConfig(EvalSettings):
    """The `eval:` section: FID (and precision/recall) of fixed-seed, class-balanced EMA samples every
    `eval.every` steps, against an ADM reference batch; evaluation/train_eval.py documents every field."""

    def validate(self):
        # The ranges; eval.ref_batch is required where the built-in FID hook is built (train_dit.build_eval):
        # a library caller's own eval_fn needs none.
        try:
            EvalSettings.validate(dataclasses.replace(self, every=0))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        require(self.every >= 0, "eval.every must be >= 0")


@dataclass
class ProfileConfig:
    start_step: int = -1                # cudaProfilerStart before this step (-1 = no window)
    num_steps: int = 10                 # ... and cudaProfilerStop after this many steps
    nvtx: bool = True                   # NVTX ranges around data/forward/backward/optimizer/ema
    torch_trace: bool = False           # torch.profiler over the window: Chrome trace + op table per rank, and a
                                        # CUDA memory snapshot on a GPU, under logging.dir/traces


@dataclass
class DistConfig:
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    timeout_s: int = 600                # a collective waiting longer than this ends the run (lost rank)


@dataclass
class DiTTrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fp8: FP8Config = field(default_factory=FP8Config)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    dist: DistConfig = field(default_factory=DistConfig)
