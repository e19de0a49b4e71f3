"""LightningDiT trainer on the DeepSpeed engine (rectified flow, logit-normal t, cosine velocity loss).

    python -m train.train_dit --config configs/dit_tiny_cpu.yaml                      # 1 process (CPU or GPU)
    torchrun --nproc_per_node 8 -m train.train_dit --config configs/dit_xl1_64ep.yaml  # one node
    deepspeed --hostfile hosts --num_gpus 8 train/train_dit.py --config configs/dit_xl1_64ep.yaml

As a library: `train(cfg, eval_fn=None)` -> the report of Trainer.fit (train/base.py); `eval_fn(ema_model, step)
-> dict` is called every `eval.every` steps on every rank (it may do distributed work) and its metrics are logged
with the wall-clock time and images seen. One optimizer step = global_batch images = batch_per_gpu x world x
accumulation: `train_step((latents, labels))` takes this rank's share of a step and runs it as `accumulation`
micro-batches. A step whose loss or gradient norm is not finite is skipped (no weight, optimizer or EMA update)
and counted; `train.max_bad_steps` in a row save a checkpoint and stop the run.
"""
import logging
import os
import sys
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch

import kernels
from kernels.attention import CHOICES, FUSED_BLOCK
from modeling import fp8 as fp8_lib
from modeling.checkpoint import save_pretrained, to_reference_dit_format
from modeling.config import ConfigError, console_entry
from modeling.flow import flow_loss
from modeling.hub import STATS_NAME, save_latent_stats
from modeling.lightningdit import LightningDiT

from .base import EvalFn, StepOutput, Trainer as TrainerBase
from .base import host_to_device
from .checkpoint import atomic_torch_save
from .distributed import barrier, from_rank0
from .dit_config import DiTTrainConfig, DiTTrainSection
from .ema import EMA, _gathered
from .errors import trainer_main
from .guard import poison
from .logging_utils import nvtx
from .precision import PrecisionProbe
from .recompute import apply_recompute

log = logging.getLogger("train")


# ----------------------------------------------------------------------------- data

class SyntheticLatents:
    """Deterministic random latents + labels (throughput runs and tests); same interface as LatentLoader."""

    def __init__(self, batch_size: int, channels: int, size: int, num_classes: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        self.shape = (batch_size, channels, size, size)
        self.num_classes, self.seed, self.rank, self.world_size = num_classes, seed, rank, world_size
        self.position = 0  # batches served by this rank
        g = torch.Generator().manual_seed(seed)
        self.stats = (torch.randn(1, channels, 1, 1, generator=g), torch.rand(1, channels, 1, 1, generator=g) + 0.5)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            g = torch.Generator().manual_seed(hash((self.seed, self.rank, self.position)) & (2 ** 62 - 1))  # all 62 bits
            mean, std = self.stats
            lat = torch.randn(self.shape, generator=g) * std + mean
            lab = torch.randint(0, self.num_classes, (self.shape[0],), generator=g)
            self.position += 1
            yield lat, lab

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's full fp32 state dict on the CPU (gathers ZeRO-3 partitions)."""
    params = list(module.parameters())
    with _gathered(params):
        return {k: v.detach().float().cpu().clone() if v.is_floating_point() else v.cpu().clone()
                for k, v in module.state_dict().items()}


# ----------------------------------------------------------------------------- kernels

def set_attention(train: DiTTrainSection) -> None:
    """attention's implementation for this process, from train.attention (auto = timed later by
    kernels.prime_attention, else forced; like train.kernels over VAVAE_KERNELS, which the base trainer applies,
    the config's value wins over VAVAE_ATTENTION)."""
    forced = None if train.attention == "auto" else train.attention
    env = os.environ.get("VAVAE_ATTENTION") or None
    if env is not None and env != forced:
        log.warning("VAVAE_ATTENTION=%s is overridden by train.attention: %s", env, train.attention)
    kernels.set_attention(forced)


def check_forced_attention(model: LightningDiT, name: str, dtype: torch.dtype, device: torch.device) -> str:
    """Run the forced attention implementation `name` once, eagerly (forward, one sample of the model's shape):
    one that cannot run here, or that the kernels backend would not run at all (`auto` runs the reference ops off a
    GPU), raises BackendUnavailable now, in one line, not inside a compiled block's trace (where torch.compile
    reports the exception as its own error). Returns what ran, as kernels.describe()["ops"] records it."""
    B, H, N, D = model.attention_shape(1)
    op = "rope_attention" if name == FUSED_BLOCK else "attention"
    try:
        with torch.no_grad():
            if op == "rope_attention":
                qkv = torch.randn(B, N, 3 * H * D, dtype=dtype, device=device)
                kernels.ops.rope_attention(qkv, model.feat_rope.freqs_cos, model.feat_rope.freqs_sin, H)
            else:
                q, k, v = (torch.randn(B, H, N, D, dtype=dtype, device=device) for _ in range(3))
                kernels.ops.attention(q, k, v)
    except Exception as e:  # a missing package, a kernel that does not take this shape or dtype, no Triton
        why = (str(e).splitlines() or [""])[0][:300]
        raise kernels.BackendUnavailable(f"train.attention: {name} cannot run here ({type(e).__name__}: {why}); "
                                         f"use train.attention: auto") from e
    ran = kernels.describe()["ops"].get(op, "nothing")
    if ran.split(" ")[0] != name:
        raise kernels.BackendUnavailable(
            f"train.attention: {name} is not run by train.kernels: {kernels.get_backend()} on {device.type} (its "
            f"{op} ran {ran}); use train.kernels triton or cuda, or train.attention: auto")
    return ran


# ----------------------------------------------------------------------------- trainer

class DiTTrainer(TrainerBase):
    """LightningDiT + EMA on one DeepSpeed engine (AdamW), trained on latents (train/base.py: the shared part)."""

    NAME = "DiT"
    RESUME_REFUSE = ("model.", "fp8.")
    RESUME_WARN = ("train.", "data.", "optim.")
    GAUGES = ("grad_norm",)  # the global norm of the last applied step, the same on every rank

    def __init__(self, cfg: DiTTrainConfig, eval_fn: Optional[EvalFn] = None) -> None:
        super().__init__(cfg, eval_fn)

    # ------------------------------------------------------------------ model, engine, data

    def build_model(self) -> None:
        cfg = self.cfg
        set_attention(cfg.train)
        model = LightningDiT(cfg.model.architecture()).to(self.device)
        self.fp8_desc = "off"
        if cfg.fp8.backend != "none":
            recipe = cfg.fp8.recipe or fp8_lib.default_recipe(cfg.fp8.backend)
            self.fp8_desc = fp8_lib.check_fp8(cfg.fp8.backend, self.device, cfg.fp8.allow_cpu, recipe=recipe)
            quant = fp8_lib.training_quant(cfg.fp8.quant, cfg.fp8.backend, recipe, self.device)
            fp8_lib.apply_fp8(model, cfg.fp8.backend, cfg.fp8.recipe, cfg.fp8.allow_cpu, quant=quant)
            self.fp8_desc += f", activation quantization {quant}"
        # before compile: the checkpoint is traced into each block
        apply_recompute(model, cfg.train.recompute, compiled=cfg.train.compile == "blocks")
        if cfg.train.compile == "blocks":  # after FP8 conversion, so the compiled graph includes it
            for block in model.blocks:
                block.compile(**cfg.train.compile_kwargs(), fullgraph=True)
        # attention's implementation is timed here, at this run's shape: inside the compiled blocks nothing can be
        # timed, and SDPA's own first choice (FlashAttention) is not the fastest on Hopper. Every rank runs rank 0's.
        # A forced one (train.attention) is run once instead, so that one which cannot run stops the run here.
        dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        if cfg.train.attention != "auto":
            ran = check_forced_attention(model, cfg.train.attention, dtype, self.device)
            self.attention_desc = f"{cfg.train.attention} (forced; ran {ran})"
        chosen = kernels.prime_attention(model.attention_shape(cfg.train.batch_per_gpu), dtype, self.device,
                                         training=True, agree=lambda c: from_rank0(c, CHOICES, self.device))
        if cfg.train.attention == "auto":
            self.attention_desc = (f"auto (q/k/v kernel measured: {chosen})" if chosen else
                                   "auto (nothing to measure on this device and kernels backend)")
        self._first_step_logged = False
        self.flops_per_image = model.flops_per_sample(train=True)
        self.ema = EMA(model, cfg.train.ema_decay)
        self.model = model

    def build_engines(self) -> None:
        o = self.cfg.optim
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps,
                                           weight_decay=o.weight_decay, fused=self.device.type == "cuda")
        self.engine = self.add_engine("deepspeed", self.model, self.optimizer)
        # the time embedder's first Linear: inside the engine's forward, outside the compiled blocks
        self._probe = PrecisionProbe(self.engine.module.t_embedder.mlp[0], self.cfg.train.precision, "matmuls")

    def build_loader(self) -> Iterable:
        d, m, t, info = self.cfg.data, self.cfg.model, self.cfg.train, self.info
        if d.source == "synthetic":
            loader = SyntheticLatents(t.batch_per_gpu, m.in_channels, m.input_size, m.num_classes, t.seed, info.rank,
                                      info.world_size)
            stats = loader.stats
        else:
            from .data.latents import LatentLoader, LatentStore
            store = LatentStore.open(d.path, latent_shape=(m.in_channels, m.input_size, m.input_size),
                                     num_classes=m.num_classes)
            loader = LatentLoader(store, t.batch_per_gpu, seed=t.seed, rank=info.rank, world_size=info.world_size,
                                  flip_prob=d.flip_prob)
            stats = store.stats
        self.mean, self.std = stats[0].to(self.device), stats[1].to(self.device)
        return loader

    @staticmethod
    def global_batch_of(train: dict, world_size: int) -> int:
        return int(train["global_batch"])  # train.global_batch; accumulation makes up for fewer ranks

    def describe(self) -> str:
        cfg = self.cfg
        return (f"world {self.info.world_size}, grad accumulation {self.grad_accum}, ZeRO {cfg.train.zero_stage}, "
                f"precision {cfg.train.precision}, FP8 {self.fp8_desc}, compile {cfg.train.compile_desc()}, recompute "
                f"{cfg.train.recompute}, grad norm {getattr(self, 'grad_norm_desc', 'fp32 (train/guard)')}, attention "
                f"{self.attention_desc}, kernels "
                f"{kernels.describe()}, {self.flops_per_image / 1e9:.2f} GFLOP/img, {self.threads} CPU threads")

    def fetch_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's `accumulation` micro-batches of latents (normalised: (z - mean) / std x multiplier) and
        labels, concatenated, on the device."""
        parts = [next(self.batch_stream()) for _ in range(self.grad_accum)]
        lat = parts[0][0] if len(parts) == 1 else torch.cat([p[0] for p in parts])
        y = parts[0][1] if len(parts) == 1 else torch.cat([p[1] for p in parts])
        lat = (host_to_device(lat, self.device) - self.mean) / self.std * self.cfg.data.latent_multiplier
        return lat, host_to_device(y, self.device)

    # ------------------------------------------------------------------ one optimizer step

    def step_on_device(self, batch: tuple[torch.Tensor, torch.Tensor]) -> StepOutput:
        out = super().step_on_device(batch)
        if not self._first_step_logged:  # what ran is recorded in the first forward (under compile: in its trace)
            self._first_step_logged = True
            ran = kernels.describe()["ops"]
            log.info("kernels in the first step: attention block %s, attention %s; every op: %s",
                     ran.get("rope_attention", "-"), ran.get("attention", "-"), ran)
        return out

    def optimize(self, batch: tuple[torch.Tensor, torch.Tensor]) -> StepOutput:
        """grad_accum micro-batches of `batch`, then the AdamW step and the EMA update. Metrics: loss / mse / cos
        (means over the micro-batches) and the global grad norm. The only host synchronisation is the finite-norm
        check at the optimizer step (DeepSpeed's under ZeRO 1-3, ours without ZeRO); the next step's batch is
        fetched and copied while the first backward runs, so the GPU does not wait for the data after that check."""
        cfg, engine = self.cfg, self.engine
        lat, y = batch
        if lat.shape[0] % self.grad_accum:
            raise ValueError(f"a step's batch of {lat.shape[0]} latents does not split into {self.grad_accum} "
                             f"micro-batches")
        sums = torch.zeros(3, device=self.device)  # loss, mse, cos over the micro-batches
        applied, grad_norm = False, None
        for i, (lat_i, y_i) in enumerate(zip(lat.chunk(self.grad_accum), y.chunk(self.grad_accum))):
            # No autocast here: the engine applies it inside its forward (see base.deepspeed_config).
            with nvtx("forward"), fp8_lib.fp8_context(cfg.fp8.backend, cfg.fp8.recipe):
                out = flow_loss(engine, lat_i, y_i, time_dist=cfg.train.time_dist,
                                use_cosine_loss=cfg.train.use_cosine_loss, generator=self.generator,
                                label_generator=self.generator)
            self._probe.check()  # first micro-step only: the engine's forward really ran in bf16
            # A non-finite loss poisons every gradient, so the step is skipped below without a host sync here.
            loss = poison(out["loss"])
            sums += torch.stack([loss.detach(), out["mse"].detach().mean(), out["cos"].detach().mean()])
            with nvtx("backward"):
                engine.backward(loss)
            if i == 0:
                self.prefetch()
            if engine.is_gradient_accumulation_boundary():
                with nvtx("optimizer"):
                    applied, grad_norm = self.optimizer_step("deepspeed")
            else:
                engine.step()  # DeepSpeed counts micro-steps; no update here
        if applied:
            with nvtx("ema"):
                self.ema.update(engine.module)
        mean = sums / self.grad_accum
        return StepOutput(applied, {"loss": mean[0], "mse": mean[1], "cos": mean[2], "grad_norm": grad_norm})

    def extra_metrics(self, img_per_s: float) -> dict[str, float]:
        return {"tflops_per_gpu": img_per_s * self.flops_per_image / self.info.world_size / 1e12}

    # ------------------------------------------------------------------ evaluation, checkpoints, export

    def eval_model(self) -> LightningDiT:
        """A fresh LightningDiT holding the EMA weights, in eval mode."""
        model = LightningDiT(self.cfg.model.architecture()).to(self.device)
        model.load_state_dict(self.ema.full_state_dict(model), strict=False)
        return model.eval()

    def extra_trainer_state(self) -> dict:
        return {"ema": self.ema.state_dict(), "fp8": self.fp8_desc}

    def load_extra_state(self, state: dict, rank_state: dict) -> None:
        self.ema.load_state_dict(state["ema"])

    def export(self) -> dict[str, str]:
        """Reference format ({"model": module.*, "ema": ...}) and safetensors (EMA weights) in the run dir."""
        out = Path(self.cfg.logging.dir)
        paths = {"reference": str(out / "final_reference.pt"), "pretrained_ema": str(out / "pretrained_ema")}
        model_state = full_state_dict(self.engine.module)  # every rank: gathers ZeRO-3 partitions
        if self.info.is_main:
            ema_state = self.ema.full_state_dict(self.engine.module)
            atomic_torch_save(to_reference_dit_format(model_state, ema_state), out / "final_reference.pt")
            model = LightningDiT(self.cfg.model.architecture())
            model.load_state_dict({k: v for k, v in ema_state.items() if k in model.state_dict()})
            save_pretrained(model, model.config.to_dict(), out / "pretrained_ema")
            if self.cfg.data.source != "synthetic":  # the latents' statistics beside the weights, as convert
                # --latent-stats does: sample_images / generate find them there (without, they sampled with none)
                save_latent_stats(out / "pretrained_ema" / STATS_NAME, self.mean.cpu(), self.std.cpu())
            if self.cfg.data.latent_multiplier != 1.0:
                log.warning("sample %s with --latent-multiplier %g (data.latent_multiplier)", out / "pretrained_ema",
                            self.cfg.data.latent_multiplier)
            log.info("exported %s and %s", out / "final_reference.pt", out / "pretrained_ema")
        barrier()
        return paths


Trainer = DiTTrainer  # the name callers import (train.train_dit.Trainer)


def build_eval(cfg: DiTTrainConfig) -> Optional[EvalFn]:
    """The `eval.*` hook (evaluation/train_eval.py) or None when eval.every is 0. Built before the trainer, on
    this rank's device; the latent statistics default to the latent folder's."""
    if not cfg.eval.every:
        return None
    if cfg.eval.ref_batch is None:
        raise ConfigError("eval.every > 0 needs eval.ref_batch (an ADM-format reference npz), or eval.every=0")
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if cfg.eval.num_samples < world:  # a rank with no sample would gather no features and fail the merge
        raise ConfigError(f"eval.num_samples {cfg.eval.num_samples}: at least one per rank ({world} ranks)")
    from evaluation.train_eval import build_eval_fn
    stats = cfg.eval.latent_stats
    if stats is None and cfg.data.source == "latents":
        stats = str(Path(cfg.data.path) / "latents_stats.pt")
    device = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available()
              else torch.device("cpu"))
    return build_eval_fn(cfg.eval, latent_stats=stats, device=device, latent_multiplier=cfg.data.latent_multiplier,
                         out_dir=cfg.logging.dir, log=log.info, latent_channels=cfg.model.in_channels)


def train(cfg: DiTTrainConfig, eval_fn: Optional[EvalFn] = None) -> dict:
    """Train (or resume) the run described by `cfg`; returns the report of Trainer.fit (train/base.py)."""
    return DiTTrainer(cfg, eval_fn).fit()


def main(argv: Optional[list[str]] = None) -> int:
    return trainer_main("train.train_dit", __doc__, DiTTrainConfig, lambda cfg: train(cfg, eval_fn=build_eval(cfg)),
                        argv, extra_user_errors=(fp8_lib.FP8Unavailable, kernels.BackendUnavailable),
                        resume_refuse=DiTTrainer.RESUME_REFUSE)


cli = console_entry(__name__)  # the `vavae-train-dit` console script (setup.py)

if __name__ == "__main__":
    sys.exit(main())
