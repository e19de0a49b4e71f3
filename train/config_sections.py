"""The config sections both trainers share, declared once (train/base.py reads them).

    data        where the batches come from (each trainer narrows `source` and adds its own keys)
    optim       Adam(W): lr, betas, eps, warmup, gradient clipping
    train       steps, per-rank batch, precision, ZeRO stage, seed, non-finite guard, compile, DeepSpeed extras
    checkpoint  folder, interval, keep-last, resume, export at the end
    logging     folder, interval, TensorBoard, progress bar, Weights & Biases
    profile     NVTX ranges and an nsys / torch.profiler window
    dist        process-group backend and timeout

A trainer's schema (train/dit_config.py, train/vae_config.py) subclasses a section where it needs more keys
or another default: a redeclared field keeps its place and must repeat its comment (the comment after a field
is its --help text, read by modeling.config.field_comments). One meaning per key: `train.compile: blocks`
compiles the model's building blocks in both trainers (DiT: each transformer block; VA-VAE: encoder, decoder,
discriminator and LPIPS, what the VA-VAE trainer called `modules`, still read and converted).
"""
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from modeling.config import require

log = logging.getLogger("train")


@dataclass
class DataSection:
    """The `data:` section: each trainer narrows `source` to its sources and adds their keys."""
    source: str = "synthetic"           # where the batches come from (each trainer lists its sources)


@dataclass
class OptimSection:
    """The `optim:` section: Adam(W) on fp32 master weights, one optimizer per DeepSpeed engine."""
    lr: float = 1e-4                    # peak learning rate (every optimizer of the trainer)
    betas: tuple[float, float] = (0.5, 0.9)   # Adam betas
    eps: float = 1e-8                   # Adam epsilon
    warmup_steps: int = 0               # linear warmup from lr / warmup_steps to lr; 0 = constant lr (the papers')
    grad_clip: float = 0.0              # max global grad norm per optimizer; 0 = off (the references do not clip)

    def validate(self) -> None:
        require(self.lr > 0, f"lr must be > 0, got {self.lr}")
        require(all(0.0 <= b < 1.0 for b in self.betas), f"betas must be in [0, 1), got {self.betas}")
        require(self.eps > 0 and self.warmup_steps >= 0 and self.grad_clip >= 0,
                "eps must be > 0, warmup_steps and grad_clip >= 0")

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step `step` (0-based): linear warmup, then constant."""
        return self.lr * min(1.0, (step + 1) / max(1, self.warmup_steps))


@dataclass
class TrainSection:
    """The `train:` section both trainers share."""
    steps: Optional[int] = None         # optimizer steps
    batch_per_gpu: int = 16             # images per rank per micro-step
    precision: Literal["fp32", "bf16"] = "fp32"   # bf16 = autocast inside the DeepSpeed engines, fp32 weights
    zero_stage: Literal[0, 1, 2, 3] = 0   # DeepSpeed ZeRO stage of every optimizer
    seed: int = 0                       # initial weights (same on every rank), data order and every random draw
    max_bad_steps: int = 5              # non-finite loss/grad-norm steps in a row before stopping (with a checkpoint)
    compile: Literal["none", "blocks"] = "none"   # blocks: torch.compile the model's building blocks
    # kernels.ops backend (docs/kernels.md): auto = ours on a GPU (per op under compile: kernels/compiled_choices.json),
    # the PyTorch reference on the CPU; reference, triton or cuda forced (one that cannot run is a one-line error)
    kernels: Literal["auto", "reference", "triton", "cuda"] = "auto"
    # how ZeRO 1-3 computes gradient norms (clipping, the logged grad_norm): fp32 = as torch's clip_grad_norm_ in the
    # authors' trainer (the gradients' own dtype; ZeRO 1/2: the per-gradient norms in one torch._foreach_norm);
    # fp64 = DeepSpeed's default (every gradient partition cast to double first: 6.9 ms a step at XL/1 on an H200;
    # one norm kernel per gradient from a Python loop). train/distributed.set_zero_grad_norm_dtype
    grad_norm_dtype: Literal["fp32", "fp64"] = "fp32"
    compile_backend: Literal["inductor", "aot_eager", "eager"] = "inductor"  # torch.compile backend (eager: debug/CI)
    # inductor options for compile: blocks (torch.compile(options=...)), e.g. {"triton.multi_kernel": 1}: each
    # reduction compiled both persistent (the row in registers, read once) and looped, the faster kept by timing
    # it on its first call (inductor's own default loops over rows wider than 1024, such as hidden 1152)
    compile_options: dict = field(default_factory=dict)
    # extra DeepSpeed config (expert use), merged into the trainer's own sections key by key and parsed by DeepSpeed
    # at start-up: a key DeepSpeed does not read, or one the trainer sets (batch sizes, zero_optimization.stage,
    # gradient_clipping, optimizer, scheduler, fp16/bf16, torch_autocast) is refused naming the key to set
    # (train/base.py); keys inside the sections DeepSpeed validates itself (zero_optimization, ...) it refuses
    deepspeed: dict = field(default_factory=dict)

    def compile_desc(self) -> str:
        """For the start-up line: none, or blocks (backend[, the inductor options])."""
        if self.compile == "none":
            return "none"
        return f"{self.compile} ({self.compile_backend}" + (f", {self.compile_options})" if self.compile_options
                                                          else ")")

    def compile_kwargs(self) -> dict:
        """torch.compile's keyword arguments for the blocks; the inductor options checked against this torch."""
        if not self.compile_options:
            return {"backend": self.compile_backend}
        import torch._inductor.config as inductor_config  # here, not at validation: 1 s of import
        known = inductor_config.get_config_copy()
        for key in self.compile_options:
            require(key in known, f"train.compile_options: {key!r} is not an inductor option of torch "
                                  f"(see torch._inductor.config; e.g. triton.multi_kernel)")
        return {"backend": self.compile_backend, "options": dict(self.compile_options)}

    def validate(self) -> None:
        require(not self.compile_options or (self.compile == "blocks" and self.compile_backend == "inductor"),
                "compile_options are inductor options: they need compile: blocks and compile_backend: inductor")
        require(self.steps is None or self.steps > 0, "steps must be > 0")
        require(self.batch_per_gpu >= 1, "batch_per_gpu must be >= 1")
        require(self.max_bad_steps >= 1, "max_bad_steps must be >= 1")
        require(0 <= self.seed < 2 ** 31, f"seed must be in [0, 2**31) (numpy seeds each rank with seed + rank "
                                          f"< 2**32), got {self.seed}")


@dataclass
class CheckpointSection:
    """The `checkpoint:` section (train/checkpoint.py writes and reads the folders)."""
    dir: Optional[str] = None           # None: LOGGING_DIR/checkpoints
    every: int = 1000                   # steps between checkpoints (the last step is always saved)
    keep_last: int = 3                  # complete checkpoints kept (older ones deleted after a newer one is committed)
    resume: Literal["auto", "never"] = "auto"   # auto: continue from latest.json if there is one
    reshard: bool = False               # resume a checkpoint written by another world size, global batch or ZeRO
                                        # stage (elastic; continues the step, images seen, lr schedule, weights,
                                        # EMA and Adam moments, not bit-exact: docs/training.md "Elastic resume")
    export_reference: bool = True       # write the trained weights in the reference format at the end
    # on this signal every rank saves a checkpoint after the same step and stops (exit 0; the same command
    # resumes): SLURM's warning before the time limit (scripts/slurm/train.sbatch); none: the signal's default
    stop_signal: Literal["SIGUSR1", "SIGUSR2", "none"] = "SIGUSR1"
    stop_check_every: int = 10          # steps between the ranks' agreement on a stop signal (a 4-byte
                                        # all-reduce each time; one process checks after every step)

    def validate(self) -> None:
        require(self.every > 0 and self.keep_last >= 1, "every and keep_last must be >= 1")


@dataclass
class LoggingSection:
    """The `logging:` section: rank 0 writes metrics.jsonl (always), TensorBoard, W&B and a progress bar."""
    dir: str = "runs/train"             # metrics.jsonl, tensorboard/, config.yaml, exports
    every: int = 10                     # steps between metric lines
    tensorboard: bool = True            # also write TensorBoard events under LOGGING_DIR/tensorboard
    progress_bar: bool = True           # a tqdm bar on rank 0 where stderr is a terminal; else (a SLURM log, or
                                        # false) one log line per metrics record: step, loss, img/s, TFLOP/s, eta
    wandb: bool = False                 # also log to Weights & Biases (needs the wandb package)
    wandb_project: str = "vavae-lightningdit"   # the W&B project
    wandb_mode: Literal["offline", "online"] = "offline"   # offline: written under logging.dir, sync later


@dataclass
class ProfileSection:
    """The `profile:` section: NVTX ranges and a profiling window (train/logging_utils.py)."""
    start_step: int = -1                # cudaProfilerStart before this step (-1 = no window)
    num_steps: int = 10                 # ... and cudaProfilerStop after this many steps
    nvtx: bool = True                   # NVTX ranges around data/forward/backward/optimizer (CUDA only)
    torch_trace: bool = False           # torch.profiler over the window: Chrome trace + op table per rank, and a
                                        # CUDA memory snapshot on a GPU, under logging.dir/traces


@dataclass
class DistSection:
    """The `dist:` section: the process group (train/distributed.py)."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"   # auto: nccl with a GPU, gloo on the CPU
    timeout_s: int = 600                # a collective waiting longer than this ends the run (lost rank)


# values a trainer's config once used for a key -> the one meaning they have now
LEGACY_VALUES = {("train", "compile"): {"modules": "blocks"}}


class TrainerConfig:
    """What both top-level schemas share beyond their sections (a mixin, not a section itself): the sections
    train/base.py reads (each schema declares them as fields, with its own subclasses) and the conversion of
    older configs on read."""
    data: DataSection
    optim: OptimSection
    train: TrainSection
    checkpoint: CheckpointSection
    logging: LoggingSection
    profile: ProfileSection
    dist: DistSection

    def checkpoint_dir(self) -> Path:
        """checkpoint.dir, or LOGGING_DIR/checkpoints when it is not set."""
        return Path(self.checkpoint.dir) if self.checkpoint.dir else Path(self.logging.dir) / "checkpoints"

    @staticmethod
    def upgrade(data: Optional[dict]) -> dict:
        """Convert on read (modeling.config.from_dict calls it): values of older configs and of the configs
        older checkpoints embed, renamed to their one meaning now (LEGACY_VALUES), each logged."""
        data = {k: dict(v) if isinstance(v, dict) else v for k, v in (data or {}).items()}
        for (sec, key), renames in LEGACY_VALUES.items():
            section = data.get(sec)
            if isinstance(section, dict) and isinstance(section.get(key), str) and section[key] in renames:
                old, section[key] = section[key], renames[section[key]]
                log.warning("config: '%s.%s: %s' is now '%s.%s: %s' (converted)", sec, key, old, sec, key,
                            section[key])
        return data
