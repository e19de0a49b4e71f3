"""VA-VAE trainer on DeepSpeed: the autoencoder and the PatchGAN discriminator, one engine and one Adam each.

    python -m train.train_vae --config configs/vavae_tiny_cpu.yaml                                # 1 process
    torchrun --nproc_per_node 8 -m train.train_vae --config configs/vavae_f16d32_stage1.yaml data.root=SCAN
    deepspeed --hostfile hosts --num_gpus 8 --module train.train_vae --config configs/vavae_f16d32_stage1.yaml

The shared part (build, loop, checkpoints, resume) is train/base.py's Trainer; this file adds the models, the
losses, the data, the final reconstruction report and the tokenizer export. `train_step(images)` is one step on
this rank's `batch_per_gpu` images (global batch = batch_per_gpu x world size):
1. the frozen foundation model's features of the images (no grad; bf16 weights under precision=bf16);
2. the autoencoder engine's forward: encode, sample z, decode, the generator objective of VAVAELoss with the
   adaptive VF and GAN weights (gradient norms on this rank's batch, taken by torch.autograd.grad inside the
   forward, as the reference under data-parallel DDP); backward, all-reduce, Adam step;
3. the discriminator engine's forward on the images and the detached reconstructions, backward, Adam step; its
   loss is multiplied by 0 before `loss.disc_start`, as the reference's (counted in the reference's global_step,
   two a batch: reference_steps).
A step whose loss or gradient norm is not finite on any rank is skipped by every rank (train/guard.py).
Mixed precision (`train.precision=bf16`) is DeepSpeed's `torch_autocast` inside each engine's forward;
the layers the adaptive weights differentiate (encoder.conv_out, quant_conv, decoder.conv_out) and the GroupNorm +
SiLU before each conv_out run in fp32.
"""
import logging
import math
import sys
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.nn as nn

import kernels

from modeling.checkpoint import load_vavae_checkpoint
from modeling.config import ConfigError, console_entry
from modeling.foundation import FoundationModelUnavailable, build_foundation
from modeling.vavae import AutoencoderKL
from modeling.vf_loss import make_linear_proj

from .base import EvalFn, StepOutput, Trainer as TrainerBase
from .base import host_to_device
from .checkpoint import atomic_torch_save, load_state
from .data import DataError
from .data.sampler import EpochSampler, ResumableLoader
from .distributed import barrier
from .errors import one_line, trainer_main
from .guard import poison
from .logging_utils import nvtx
from .precision import PrecisionProbe
from .vae_config import VAVAETrainConfig
from .vae_losses import VAVAELoss

log = logging.getLogger("train_vae")

# Layers whose weight gradients the adaptive VF / GAN weights take norms of (and the posterior between them):
# under bf16 autocast they compute in fp32, so those norms and the KL see fp32 arithmetic. With them the GroupNorm
# + SiLU before each conv_out, whose output is their input: fp32, as torch's GroupNorm under autocast gives it
# (our kernels, kernels.ops.group_norm_silu, would otherwise hand it over rounded to bf16).
FP32_LAYERS = ("encoder.norm_out", "encoder.conv_out", "quant_conv", "decoder.norm_out", "decoder.conv_out")


# ----------------------------------------------------------------------------- data

class SkimageCrops(ResumableLoader):
    """Random square crops (>= 50% of the short side) of scikit-image's real photographs, in memory (demo and
    tests). Sample i of epoch e is cropped and flipped from numpy's default_rng((seed, e, i))."""

    backend = "skimage"

    def __init__(self, resolution: int, num_samples: int, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        from PIL import Image

        from .data.embedded import PHOTOS, _skimage_data_dir
        super().__init__(EpochSampler(num_samples, batch_size, seed, rank, world_size))
        self.photos = []
        for fname in sorted(PHOTOS):
            with Image.open(_skimage_data_dir() / fname) as im:
                self.photos.append(im.convert("RGB"))
        self.resolution, self.seed = resolution, seed

    def image(self, i: int, epoch: int) -> torch.Tensor:
        from PIL import Image

        from .data.transforms import to_tensor
        rng = np.random.default_rng((self.seed, epoch, i))
        photo = self.photos[i % len(self.photos)]
        w, h = photo.size
        s = int(min(w, h) * rng.uniform(0.5, 1.0))
        x0, y0 = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
        crop = photo.crop((x0, y0, x0 + s, y0 + s)).resize((self.resolution,) * 2, Image.BICUBIC)
        arr = np.asarray(crop)
        return to_tensor(arr[:, ::-1] if rng.random() < 0.5 else arr)

    def _batches(self, plan, start):
        for g in range(start, len(self)):
            idx, _ = self.sampler.rank_batch(plan, g)
            yield torch.stack([self.image(int(i), self.epoch) for i in idx]), torch.zeros(len(idx), dtype=torch.long)


class SyntheticImages(ResumableLoader):
    """Seeded uniform-noise images in [-1, 1] made on the device (benchmarks: no decode cost)."""

    backend = "synthetic"

    def __init__(self, resolution: int, num_samples: int, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, device: Union[str, torch.device] = "cpu") -> None:
        super().__init__(EpochSampler(num_samples, batch_size, seed, rank, world_size))
        self.shape, self.seed, self.rank, self.device = (batch_size, 3, resolution, resolution), seed, rank, device

    def _batches(self, plan, start):
        for g in range(start, len(self)):
            s = int(np.random.SeedSequence([self.seed, self.epoch, g, self.rank]).generate_state(1)[0])
            gen = torch.Generator(self.device).manual_seed(s)
            x = torch.rand(self.shape, generator=gen, device=self.device) * 2 - 1
            yield x, torch.zeros(self.shape[0], dtype=torch.long)


def build_loader(cfg: VAVAETrainConfig, rank: int, world_size: int, device: torch.device) -> ResumableLoader:
    """Every rank's batches (see docs/vavae_training.md "Data order"): train.data's EpochSampler order."""
    d, t, res = cfg.data, cfg.train, cfg.model.resolution
    if d.source == "skimage":
        return SkimageCrops(res, d.num_samples, t.batch_per_gpu, t.seed, rank, world_size)
    if d.source == "synthetic":
        return SyntheticImages(res, d.num_samples, t.batch_per_gpu, t.seed, rank, world_size, device)
    from .data.dali import dali_available
    from .data.files import load_file_list
    from .data.images import build_image_loader
    if not Path(d.root).exists():
        raise ConfigError(f"data.root: {d.root} does not exist")
    scanned = (Path(d.root) / "files.tsv").is_file()
    backend, dali_device = d.backend, d.dali_device
    if backend == "auto":
        if dali_available() and device.type == "cuda" and scanned:
            backend, dali_device = "dali", "gpu"
        else:
            backend = "pil"
            log.info("data.backend=auto -> PIL (the reference crop): %s",
                     "no GPU" if device.type != "cuda" else "DALI not installed" if not dali_available()
                     else f"{d.root} is not a scan folder (DALI needs the clean list: python -m train.data scan)")
    elif backend == "dali" and not scanned:
        raise ConfigError(f"data.backend=dali reads the clean list of a scan; {d.root} has no files.tsv "
                          f"(run `python -m train.data scan {d.root}` and set data.root to its output)")
    files = load_file_list(d.root)
    if len(files) < t.batch_per_gpu * world_size:
        raise ConfigError(f"data.root has {len(files)} images, fewer than one global batch "
                          f"({t.batch_per_gpu} x {world_size} ranks)")
    try:
        return build_image_loader(files, res, t.batch_per_gpu, backend=backend, view="train",
                                  dali_device=dali_device, seed=t.seed, rank=rank, world_size=world_size,
                                  num_workers=d.num_workers, flip_prob=d.flip_prob)
    except RuntimeError as e:  # DALI asked for but unusable
        raise ConfigError(str(e)) from None


def preview_images(cfg: VAVAETrainConfig, loader: ResumableLoader, n: int = 8) -> Optional[torch.Tensor]:
    """The first n images of epoch 0 for the reconstruction report (center view for folders)."""
    if isinstance(loader, SkimageCrops):
        return torch.stack([loader.image(i, 0) for i in range(min(n, loader.sampler.num_samples))])
    if isinstance(loader, SyntheticImages):
        return None
    from .data.images import ImageDataset
    files = loader.files if hasattr(loader, "files") else loader.dataset.files  # DALI / PIL loader
    ds = ImageDataset(files, cfg.model.resolution, view="center", seed=cfg.train.seed)
    return torch.stack([ds[(i, 0, False)][0] for i in range(min(n, len(ds)))])


# ----------------------------------------------------------------------------- models

class AutoencoderStep(nn.Module):
    """What the autoencoder engine wraps. Its parameters are exactly the autoencoder optimizer's (`vae.*`,
    `linear_proj.weight`); the loss (frozen LPIPS, the fixed logvar) and the discriminator (the other engine's)
    are used by the forward, not owned. forward -> (generator loss, detached logs, detached reconstruction)."""

    def __init__(self, vae: AutoencoderKL, linear_proj: Optional[nn.Module], loss_fn: VAVAELoss) -> None:
        super().__init__()
        self.vae, self.linear_proj = vae, linear_proj
        self._loss = [loss_fn]  # a list: not a submodule

    def forward(self, x: torch.Tensor, aux_feature: Optional[torch.Tensor], step: int,
                generator: torch.Generator) -> tuple[torch.Tensor, dict, torch.Tensor]:
        loss_fn, vae = self._loss[0], self.vae
        posterior = vae.encode(x)
        z = posterior.sample(generator)
        recon = vae.decode(z)
        z_proj = self.linear_proj(z) if self.linear_proj is not None else None
        loss_fn.discriminator.requires_grad_(False)  # the generator step does not train D
        try:
            loss, logs = loss_fn.generator_loss(x, recon, posterior, step, vae.decoder.conv_out.weight, z_proj,
                                                aux_feature, vae.encoder.conv_out.weight)
        finally:
            loss_fn.discriminator.requires_grad_(True)
        return loss, logs, recon.detach()


def reference_steps(batch: int) -> tuple[int, int]:
    """The `global_step` the reference's losses see at batch `batch` (0 = the first): (autoencoder's,
    discriminator's). Their pytorch-lightning 2.4 (vavae_requirements.txt) counts every optimizer step under manual
    optimization, so global_step advances by two a batch, between the two losses. With disc_start 5001 their
    discriminator trains from batch 2500 and its term enters the autoencoder's loss from batch 2501 (checked with
    Lightning 2.4.0 running their training_step's calls; a review, 2026-12-05: both ran from batch 5001 here)."""
    return 2 * batch, 2 * batch + 1


class DiscriminatorStep(nn.Module):
    """What the discriminator engine wraps: the PatchGAN (`discriminator.*`); forward -> (d_loss, logs)."""

    def __init__(self, loss_fn: VAVAELoss) -> None:
        super().__init__()
        self.discriminator = loss_fn.discriminator
        self._loss = [loss_fn]

    def forward(self, x: torch.Tensor, recon: torch.Tensor, step: int) -> tuple[torch.Tensor, dict]:
        return self._loss[0].discriminator_loss(x, recon, step)


def keep_fp32(module: nn.Module) -> nn.Module:
    """Make `module` compute in fp32 under an autocast (inputs upcast); its state dict is unchanged."""
    forward = module.forward

    def fp32_forward(x):
        with torch.autocast(x.device.type, enabled=False):
            return forward(x.float())

    module.forward = fp32_forward
    module._keeps_fp32 = True
    return module


def build_models(cfg: VAVAETrainConfig) -> tuple[AutoencoderKL, Optional[nn.Module], Optional[nn.Module], VAVAELoss]:
    """(vae, foundation or None, linear_proj or None, loss), their initial weights drawn from the global RNG (the
    trainer seeds it with train.seed first: identical on every rank)."""
    vae = AutoencoderKL(cfg.model)
    f = cfg.foundation
    foundation = linear_proj = None
    if f.name != "none":
        foundation = build_foundation(f.name, f.weights, f.allow_substitute,
                                      "default" if f.input_size is None else f.input_size, f.normalize)
        linear_proj = make_linear_proj(cfg.model.embed_dim, foundation.feature_dim)
    loss = VAVAELoss(cfg.loss)
    return vae, foundation, linear_proj, loss


def trainable_state(vae: AutoencoderKL, linear_proj: Optional[nn.Module], loss: VAVAELoss) -> dict[str, torch.Tensor]:
    """What a tokenizer export carries (the frozen LPIPS and foundation model are reloaded from files)."""
    sd = dict(vae.state_dict())
    if linear_proj is not None:
        sd.update({f"linear_proj.{k}": v for k, v in linear_proj.state_dict().items()})
    sd.update({f"loss.{k}": v for k, v in loss.state_dict().items() if not k.startswith("perceptual_loss.")})
    return {k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}


def load_trainable_state(sd: dict[str, torch.Tensor], vae: AutoencoderKL, linear_proj: Optional[nn.Module],
                         loss: VAVAELoss, strict_extras: bool = True) -> None:
    load_vavae_checkpoint({"state_dict": sd}, vae)
    if linear_proj is not None and "linear_proj.weight" in sd:
        linear_proj.load_state_dict({"weight": sd["linear_proj.weight"]})
    elif linear_proj is not None and strict_extras:
        raise KeyError("checkpoint has no linear_proj.weight")
    loss_sd = {k[5:]: v for k, v in sd.items() if k.startswith("loss.") and not k.startswith("loss.perceptual_loss.")}
    if loss_sd or strict_extras:
        loss.load_state_dict(loss_sd, strict=False)
        missing = [k for k in loss.state_dict() if not k.startswith("perceptual_loss.") and k not in loss_sd]
        if strict_extras and missing:
            raise KeyError(f"checkpoint lacks loss entries {missing[:4]}")


def read_init_weights(path: Union[str, Path]) -> dict[str, torch.Tensor]:
    """The weights of a tokenizer export ({"state_dict"}, reference format) or of a checkpoint of the first
    VA-VAE trainer (step_*/state.pt: {"weights", "opt_ae", ...}), as one reference-format state dict."""
    if not Path(path).is_file():
        raise ConfigError(f"train.init_from: {path} is not a file")
    sd = load_state(path, "train.init_from checkpoint")
    if isinstance(sd, dict) and "weights" in sd and "opt_ae" in sd:  # first trainer's run checkpoint
        return sd["weights"]
    return sd.get("state_dict", sd)


# ----------------------------------------------------------------------------- trainer

class VAVAETrainer(TrainerBase):
    """VA-VAE (autoencoder + linear_proj, PatchGAN) on two DeepSpeed engines (train/base.py: the shared part)."""

    NAME = "VA-VAE"
    RESUME_REFUSE = ("model.", "foundation.name", "foundation.input_size", "foundation.normalize",
                     "train.batch_per_gpu", "train.seed", "data.source", "data.num_samples")
    RESUME_WARN = ("loss.", "optim.", "train.precision", "train.zero_stage", "foundation.dtype", "data.backend",
                   "data.root")
    RESUME_IGNORE = TrainerBase.RESUME_IGNORE + ("train.epochs",)

    def __init__(self, cfg: VAVAETrainConfig, eval_fn: Optional[EvalFn] = None) -> None:
        super().__init__(cfg, eval_fn)

    # ------------------------------------------------------------------ models, engines, data

    def build_model(self) -> None:
        cfg, t, device = self.cfg, self.cfg.train, self.device
        with torch.device(device):  # built where they run (a ViT-L initialises far faster on a GPU than on a CPU)
            vae, foundation, linear_proj, loss_fn = build_models(cfg)
        if t.init_from:
            load_trainable_state(read_init_weights(t.init_from), vae, linear_proj, loss_fn, strict_extras=False)
            log.info("initialised from %s", t.init_from)
        loss_fn.logvar.requires_grad_(False)  # as the reference: a parameter no optimizer updates
        self.foundation_dtype = {"auto": torch.bfloat16 if t.precision == "bf16" else torch.float32,
                                 "bf16": torch.bfloat16, "fp32": torch.float32}[cfg.foundation.dtype]
        # train.channels_last: the images enter NHWC and cuDNN keeps the activations NHWC through every conv;
        # the weights stay contiguous (DeepSpeed broadcasts and ZeRO flattens them as plain tensors).
        vae.to(device)
        loss_fn.to(device)
        if linear_proj is not None:
            linear_proj.to(device)
        if foundation is not None:
            foundation.to(device=device, dtype=self.foundation_dtype)
        if t.precision == "bf16":
            for name in FP32_LAYERS:
                keep_fp32(vae.get_submodule(name))
        if t.compile == "blocks":  # the building blocks: the engine's autograd.grad glue stays eager
            # The encoder's and decoder's bodies, not their output layers (norm_out, conv_out): a compiled backward
            # computes every gradient of its graph, and the adaptive weights differentiate those layers alone
            # (compiled whole, their autograd.grad calls cost 2.3-2.7x: tests/test_train_vae.py).
            for net in (vae.encoder, vae.decoder):
                net.body = torch.compile(net.body, **t.compile_kwargs())
            for m in (loss_fn.discriminator, loss_fn.perceptual_loss):  # frozen in the generator step: input grads
                if m is not None:
                    m.compile(**t.compile_kwargs())
        self.vae, self.foundation, self.linear_proj, self.loss_fn = vae, foundation, linear_proj, loss_fn
        self.channels_last = t.channels_last
        torch.backends.cudnn.benchmark = t.cudnn_benchmark  # process-wide: this process trains one tokenizer

    def build_engines(self) -> None:
        o, fused = self.cfg.optim, self.device.type == "cuda"
        self.ae_module = AutoencoderStep(self.vae, self.linear_proj, self.loss_fn)
        opt_ae = torch.optim.Adam(self.ae_module.parameters(), lr=o.lr, betas=o.betas, eps=o.eps, fused=fused)
        opt_d = torch.optim.Adam(self.loss_fn.discriminator.parameters(), lr=o.lr, betas=o.betas, eps=o.eps,
                                 fused=fused)
        self.engine_ae = self.add_engine("autoencoder", self.ae_module, opt_ae)
        self.engine_d = self.add_engine("discriminator", DiscriminatorStep(self.loss_fn), opt_d)
        # post_quant_conv: inside the autoencoder engine's forward, outside any compiled module
        self._probe = PrecisionProbe(self.vae.post_quant_conv, self.cfg.train.precision, "convolutions")

    def build_loader(self) -> ResumableLoader:
        return build_loader(self.cfg, self.info.rank, self.info.world_size, self.device)

    def planned_steps(self) -> int:
        t = self.cfg.train
        self.steps_per_epoch = len(self.loader)
        return t.steps if t.steps is not None else math.ceil(t.epochs * self.steps_per_epoch)

    def _group_norm_ran(self) -> str:
        """What runs the VA-VAE's GroupNorm + SiLU here: the implementation resolved for a small tensor on this device
        (under compile, kernels/compiled_choices.json decides inside the trace)."""
        from kernels import registry
        try:
            registry.resolve("group_norm_silu", torch.empty(1, device=self.device))
        except kernels.BackendUnavailable as e:
            return f"unavailable: {e}"
        return kernels.describe()["ops"].get("group_norm_silu", "?")

    def describe(self) -> str:
        t, vae = self.cfg.train, self.vae
        cudnn_benchmark = (("on" if torch.backends.cudnn.benchmark else "off") if self.device.type == "cuda"
                           else "n/a (CPU)")
        return (f"VA-VAE {sum(p.numel() for p in vae.parameters()) / 1e6:.1f}M params, discriminator "
                f"{sum(p.numel() for p in self.loss_fn.discriminator.parameters()) / 1e6:.1f}M, foundation "
                f"{self.foundation.name if self.foundation is not None else 'none (no VF loss)'} "
                f"({self.foundation_dtype}), world {self.info.world_size} x batch {t.batch_per_gpu}, ZeRO "
                f"{t.zero_stage}, grad norm {getattr(self, 'grad_norm_desc', 'fp32 (train/guard)')}, precision "
                f"{t.precision}, channels_last {t.channels_last}, cuDNN benchmark "
                f"{cudnn_benchmark}, "
                f"compile {t.compile_desc()}, "
                f"kernels {t.kernels} (group_norm_silu: {self._group_norm_ran()}), data {self.loader.backend}, {self.total_steps} steps ({self.steps_per_epoch} per epoch), "
                f"{self.threads} CPU threads")

    def fetch_batch(self) -> torch.Tensor:
        """This rank's images for the next step, on the device (NHWC with train.channels_last)."""
        try:
            x, _ = next(self.batch_stream())
        except RuntimeError as e:  # an undecodable file (train.data names it): the input is wrong, not the code
            if "decode" not in str(e):
                raise
            raise DataError(f"{one_line(e)} (the last checkpoint in {self.ckpt.root} is intact)") from None
        x = host_to_device(x, self.device)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    # ------------------------------------------------------------------ one step

    def features(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The frozen foundation model's patch features (no grad; its own dtype), or None without VF loss."""
        if self.foundation is None:
            return None
        return self.foundation(x)

    def optimize(self, x: torch.Tensor) -> StepOutput:
        """The autoencoder update, then the discriminator update, on this rank's images x, each loss at its
        reference step (reference_steps). Metrics: the loss terms, adaptive weights and gradient norms (detached
        0-dim tensors on the device)."""
        ae_step, d_step = reference_steps(self.step)
        with nvtx("foundation"):
            aux = self.features(x)
        with nvtx("forward"):
            g_loss, logs, recon = self.engine_ae(x, aux, ae_step, self.generator)
        self._probe.check()
        with nvtx("backward"):
            self.engine_ae.backward(poison(g_loss))
        with nvtx("optimizer"):
            applied, grad_norm = self.optimizer_step("autoencoder")
        logs["grad_norm"] = grad_norm
        # The same decision on every rank: `applied` comes from the all-reduced gradients. Before disc_start the
        # step runs as the reference's does, its loss multiplied by 0: Adam's update is then exactly 0, but its step
        # count advances, which sets the bias correction of the first real update (1.5x larger than a fresh Adam's)
        if applied:
            with nvtx("disc_forward"):
                d_loss, d_logs = self.engine_d(x, recon, d_step)
            with nvtx("disc_backward"):
                self.engine_d.backward(poison(d_loss))
            with nvtx("disc_optimizer"):
                applied, d_norm = self.optimizer_step("discriminator")
            logs.update(d_logs)
            logs["d_grad_norm"] = d_norm
        return StepOutput(applied, logs)

    def extra_metrics(self, img_per_s: float) -> dict[str, float]:
        # in images, so that it stays right after an elastic resume changed the global batch (the same number
        # as step / steps_per_epoch otherwise)
        return {"epoch": self.images_seen / (self.steps_per_epoch * self.global_batch)}

    def after_reshard(self) -> None:
        """train.epochs counts epochs of data: the steps left are this world's batches left, from the moved
        data position (a run of train.steps keeps its step count)."""
        t = self.cfg.train
        if t.epochs is not None:
            done = self.loader.epoch * self.steps_per_epoch + self.loader.batch_in_epoch
            self.total_steps = self.step + max(0, math.ceil(t.epochs * self.steps_per_epoch) - done)

    # ------------------------------------------------------------------ checkpoints, evaluation, export

    def extra_rank_state(self) -> dict:
        # the discriminator's BatchNorm statistics move in every forward, on every rank
        return {"disc_buffers": {k: v.detach().cpu().clone() for k, v in self.loss_fn.discriminator.named_buffers()}}

    def extra_trainer_state(self) -> dict:
        # disc_start_counts: what loss.disc_start counted when this was written (reference_steps; before 2026-12-05
        # it counted batches, and a checkpoint without the key is told so on resume)
        return {"logvar": self.loss_fn.logvar.detach().cpu(), "disc_start_counts": "reference_global_step"}

    def check_resumable(self, state: dict, path: Path) -> bool:
        """The base's checks, after adopting the old training view's flips for a checkpoint written before
        data.flip_prob existed: its folder loader flipped at p 0.5 (and resized bicubic), and its recorded data
        order continues only with them (a review, 2026-12-05: such a run could not be resumed)."""
        data = state["config"].get("data", {})
        if data.get("source", "folder") == "folder" and "flip_prob" not in data and self.cfg.data.flip_prob == 0.0:
            self.cfg.data.flip_prob = self.loader.sampler.flip_prob = 0.5  # recorded again by the next checkpoint
            log.warning("%s was written with the former training view (horizontal flips at p 0.5, a bicubic "
                        "resize): the run continues its data order with the flips (data.flip_prob 0.5); the resize "
                        "is now the reference's bilinear. A new run trains on the reference's view (no flips)", path)
        return super().check_resumable(state, path)

    def read_trainer_state(self, path: Path) -> dict:
        if not (path / "trainer.pt").is_file() and (path / "state.pt").is_file():
            raise ConfigError(f"{path} was written by the first (single-process) VA-VAE trainer and cannot be "
                              f"resumed exactly by this one; continue from its weights with "
                              f"train.init_from={path / 'state.pt'} and another logging.dir")
        return super().read_trainer_state(path)

    def load_extra_state(self, state: dict, rank_state: dict) -> None:
        with torch.no_grad():
            for k, v in self.loss_fn.discriminator.named_buffers():
                v.copy_(rank_state["disc_buffers"][k])
            self.loss_fn.logvar.copy_(state["logvar"])
        if state.get("disc_start_counts") != "reference_global_step":
            start = self.cfg.loss.disc_start
            log.warning("this checkpoint was written when loss.disc_start counted batches (GAN from batch %d); it "
                        "now counts the reference's global step, two a batch, as the authors' Lightning 2.4 does: "
                        "the discriminator trains from batch %d and its term enters the loss from batch %d",
                        start, max(0, math.ceil((start - 1) / 2)), max(0, math.ceil(start / 2)))

    def final_evaluation(self) -> dict:
        """PSNR of the reconstructions of 8 training images, and LOGGING_DIR/reconstructions.png (rank 0)."""
        if not (self.cfg.logging.reconstructions and self.info.is_main):
            return {}
        img = preview_images(self.cfg, self.loader)
        if img is None:
            return {}
        png = Path(self.cfg.logging.dir) / "reconstructions.png"
        psnr = reconstruction_report(self.vae, img.to(self.device), png)
        log.info("reconstruction PSNR %.2f dB of %d training images -> %s", psnr, img.shape[0], png)
        return {"psnr": psnr}

    def export(self) -> dict[str, str]:
        """LOGGING_DIR/tokenizer.pt in the reference format (written by rank 0)."""
        path = Path(self.cfg.logging.dir) / "tokenizer.pt"
        if self.info.is_main:
            atomic_torch_save({"state_dict": trainable_state(self.vae, self.linear_proj, self.loss_fn)}, path)
            log.info("tokenizer -> %s", path)
        barrier()
        return {"tokenizer": str(path)}


Trainer = VAVAETrainer  # the name callers import (train.train_vae.Trainer)


@torch.no_grad()
def reconstruction_report(vae: AutoencoderKL, x: torch.Tensor, png_path: Union[str, Path]) -> float:
    """PSNR of posterior-mean reconstructions of images x, and a grid (top: input, bottom: output)."""
    from PIL import Image
    was_training = vae.training
    vae.eval()
    recon = vae.decode(vae.encode(x).mode())
    vae.train(was_training)
    to_u8 = lambda t: torch.clamp(127.5 * t.float() + 128.0, 0, 255).to(torch.uint8)  # noqa: E731 (reference rounding)
    a, b = to_u8(x), to_u8(recon)
    mse = ((a.float() - b.float()) ** 2).mean(dim=(1, 2, 3))
    psnr = (10 * torch.log10(255.0 ** 2 / mse.clamp_min(1e-10))).mean().item()
    grid = torch.cat([torch.cat(list(a), dim=2), torch.cat(list(b), dim=2)], dim=1)  # (3, 2H, nW)
    Image.fromarray(grid.permute(1, 2, 0).cpu().numpy()).save(png_path)
    return psnr


def train(cfg: VAVAETrainConfig) -> dict:
    """Train (or resume) the run described by cfg; returns the report of Trainer.fit (train/base.py)."""
    return VAVAETrainer(cfg).fit()


def main(argv: Optional[list[str]] = None) -> int:
    return trainer_main("train.train_vae", __doc__, VAVAETrainConfig, train, argv,
                        extra_user_errors=(FoundationModelUnavailable, kernels.BackendUnavailable),
                        resume_refuse=VAVAETrainer.RESUME_REFUSE)


cli = console_entry(__name__)  # the `vavae-train-vae` console script (setup.py)

if __name__ == "__main__":
    sys.exit(main())
