"""LightningDiT trainer on the DeepSpeed engine (rectified flow, logit-normal t, cosine velocity loss).

    python -m train.train_dit --config configs/dit_tiny_cpu.yaml                      # 1 process (CPU or GPU)
    torchrun --nproc_per_node 8 -m train.train_dit --config configs/dit_xl1_64ep.yaml  # one node
    deepspeed --hostfile hosts --num_gpus 8 train/train_dit.py --config configs/dit_xl1_64ep.yaml

As a library: `train(cfg, eval_fn=None)`; `eval_fn(ema_model, step) -> dict` is called every
`eval.every` steps on every rank (it may do distributed work) and its metrics are logged with the
wall-clock time and images seen. One optimizer step = global_batch images = batch_per_gpu x world x
accumulation. A step whose loss or gradient norm is not finite is skipped (no weight, optimizer or EMA
update) and counted; `train.max_bad_steps` in a row save a checkpoint and stop the run.
"""
import copy
import logging
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

import kernels
from kernels.attention import CHOICES
from modeling import fp8 as fp8_lib
from modeling.checkpoint import save_pretrained, to_reference_dit_format
from modeling.flow import flow_loss
from modeling.lightningdit import LightningDiT

from .checkpoint import (CheckpointManager, atomic_torch_save, check_resume_config, deepspeed_safe_load,
                         load_state, rng_state, set_rng_state)
from modeling.config import ConfigError, dump_config, from_dict, to_dict
from .distributed import all_reduce_mean, from_rank0, init_distributed
from .dit_config import DiTTrainConfig
from .ema import EMA, _gathered
from .errors import trainer_main
from .guard import NonFiniteError, NonFiniteGuard, engine_step, poison  # noqa: F401 (NonFiniteError: re-exported)
from .precision import PrecisionProbe, deepspeed_autocast
from .logging_utils import MetricsLogger, ProfileWindow, nvtx, peak_memory, set_nvtx
from modeling.config import console_entry

log = logging.getLogger("train")


# ----------------------------------------------------------------------------- data

class SyntheticLatents:
    """Deterministic random latents + labels (throughput runs and tests); same interface as LatentLoader."""

    def __init__(self, batch_size, channels, size, num_classes, seed=0, rank=0, world_size=1):
        self.shape = (batch_size, channels, size, size)
        self.num_classes, self.seed, self.rank, self.world_size = num_classes, seed, rank, world_size
        self.position = 0  # batches served by this rank
        g = torch.Generator().manual_seed(seed)
        self.stats = (torch.randn(1, channels, 1, 1, generator=g), torch.rand(1, channels, 1, 1, generator=g) + 0.5)

    def __iter__(self):
        while True:
            g = torch.Generator().manual_seed(hash((self.seed, self.rank, self.position)) & (2 ** 62))
            mean, std = self.stats
            lat = torch.randn(self.shape, generator=g) * std + mean
            lab = torch.randint(0, self.num_classes, (self.shape[0],), generator=g)
            self.position += 1
            yield lat, lab

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def build_loader(cfg, rank, world_size):
    d, m = cfg.data, cfg.model
    if d.source == "synthetic":
        loader = SyntheticLatents(cfg.train.batch_per_gpu, m.in_channels, m.input_size, m.num_classes,
                                  cfg.train.seed, rank, world_size)
        return loader, loader.stats
    from .data.latents import LatentLoader, LatentStore
    store = LatentStore.open(d.path, latent_shape=(m.in_channels, m.input_size, m.input_size),
                             num_classes=m.num_classes)
    loader = LatentLoader(store, cfg.train.batch_per_gpu, seed=cfg.train.seed, rank=rank, world_size=world_size,
                          flip_prob=d.flip_prob)
    return loader, store.stats


def forever(loader):
    """Endless batches; a LatentLoader moves to its next epoch each time its iterator ends."""
    while True:
        yield from loader


# ----------------------------------------------------------------------------- engine

def deepspeed_config(cfg, world_size):
    t, o = cfg.train, cfg.optim
    per_step = t.batch_per_gpu * world_size
    if t.global_batch % per_step:
        raise ConfigError(f"train.global_batch {t.global_batch} is not a multiple of batch_per_gpu x world size "
                          f"= {t.batch_per_gpu} x {world_size}")
    ds = {
        "train_batch_size": t.global_batch,
        "train_micro_batch_size_per_gpu": t.batch_per_gpu,
        "gradient_accumulation_steps": t.global_batch // per_step,
        # Without ZeRO the trainer clips itself (it checks the norm first, see optimizer_step).
        "gradient_clipping": o.grad_clip if t.zero_stage > 0 else 0.0,
        # memory_efficient_linear: ZeRO-3 would replace torch.nn.functional.linear for the whole process with an
        # autograd.Function that torch.compile cannot trace (train.compile=blocks then fails) and that persists
        # after the engine is gone; our Linear layers need no replacement.
        "zero_optimization": {"stage": t.zero_stage,
                              **({"memory_efficient_linear": False} if t.zero_stage == 3 else {})},
        "torch_autocast": deepspeed_autocast(t.precision),  # bf16 inside the engine's forward (train/precision.py)
        "steps_per_print": 10 ** 9,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    ds.update(t.deepspeed)
    return ds


def build_model(cfg, device):
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    return LightningDiT(cfg.model.architecture()).to(device)


def full_state_dict(module):
    """The module's full fp32 state dict on the CPU (gathers ZeRO-3 partitions)."""
    params = list(module.parameters())
    with _gathered(params):
        return {k: v.detach().float().cpu().clone() if v.is_floating_point() else v.cpu().clone()
                for k, v in module.state_dict().items()}


# ----------------------------------------------------------------------------- trainer

class Trainer:
    def __init__(self, cfg: DiTTrainConfig, eval_fn=None):
        import deepspeed

        self.cfg, self.eval_fn = cfg, eval_fn
        self.info = init_distributed(cfg.dist.backend, cfg.dist.timeout_s)
        self.device = self.info.device
        # before anything big is built: the folders are writable and no other run uses this checkpoint folder
        self.ckpt = CheckpointManager(cfg.checkpoint.dir, cfg.checkpoint.keep_last)
        self.ckpt.prepare(self.info.is_main, writable=[cfg.logging.dir])
        set_nvtx(cfg.profile.nvtx)
        random.seed(cfg.train.seed + self.info.rank)
        np.random.seed(cfg.train.seed + self.info.rank)
        torch.manual_seed(cfg.train.seed + self.info.rank)

        kernels.set_backend(cfg.train.kernels)
        model = build_model(cfg, self.device)
        self.fp8_desc = "off"
        if cfg.fp8.backend != "none":
            self.fp8_desc = fp8_lib.check_fp8(cfg.fp8.backend, self.device, cfg.fp8.allow_cpu)
            fp8_lib.apply_fp8(model, cfg.fp8.backend, cfg.fp8.recipe, cfg.fp8.allow_cpu)
        if cfg.train.compile == "blocks":  # after FP8 conversion, so the compiled graph includes it
            for block in model.blocks:
                block.compile(backend=cfg.train.compile_backend, fullgraph=True)
        # attention's implementation is timed here, at this run's shape: inside the compiled blocks nothing can be
        # timed, and SDPA's own first choice (FlashAttention) is not the fastest on Hopper. Every rank runs rank 0's.
        kernels.prime_attention(model.attention_shape(cfg.train.batch_per_gpu),
                                torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32, self.device,
                                training=True, agree=lambda c: from_rank0(c, CHOICES, self.device))
        self.flops_per_image = model.flops_per_sample(train=True)
        self.ema = EMA(model, cfg.train.ema_decay)

        o = cfg.optim
        optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps,
                                      weight_decay=o.weight_decay, fused=self.device.type == "cuda")
        self.ds_config = deepspeed_config(cfg, self.info.world_size)
        self.grad_accum = self.ds_config["gradient_accumulation_steps"]
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds_config)
        self.optimizer = optimizer

        self.loader, (mean, std) = build_loader(cfg, self.info.rank, self.info.world_size)
        self.mean, self.std = mean.to(self.device), std.to(self.device)
        # All noise, time and label-dropout draws come from this generator: checkpointed, so resume is exact.
        self.generator = torch.Generator(self.device).manual_seed(cfg.train.seed * 100_003 + self.info.rank)

        # the time embedder's first Linear: inside the engine's forward, outside the compiled blocks
        self._probe = PrecisionProbe(self.engine.module.t_embedder.mlp[0], cfg.train.precision, "matmuls")

        self.step, self._window_start = 0, 0
        self.guard = NonFiniteGuard(cfg.train.max_bad_steps)
        self._prefetched = None  # (next micro-batch on the device, loader state before it)
        if cfg.checkpoint.resume == "auto":
            self.resume()

    # ------------------------------------------------------------------ one optimizer step

    def train_step(self):
        """One optimizer step (grad_accum micro-batches): returns (loss/mse/cos sums on the device, applied,
        grad norm as a device tensor). The only host synchronisation is the finite-norm check at the optimizer
        step (DeepSpeed's under ZeRO 1-3, ours without ZeRO); the next micro-batch is fetched and copied while
        the backward runs, so the GPU does not wait for the data after that check."""
        cfg, engine = self.cfg, self.engine
        sums = torch.zeros(3, device=self.device)  # loss, mse, cos over the micro-batches
        applied, grad_norm = False, None
        for _ in range(self.grad_accum):
            lat, y = self._next_batch()
            # No autocast here: the engine applies it inside its forward (see deepspeed_config).
            with nvtx("forward"), fp8_lib.fp8_context(cfg.fp8.backend, cfg.fp8.recipe):
                out = flow_loss(engine, lat, y, time_dist=cfg.train.time_dist,
                                use_cosine_loss=cfg.train.use_cosine_loss, generator=self.generator,
                                label_generator=self.generator)
            self._probe.check()  # first micro-step only: the engine's forward really ran in bf16
            loss = out["loss"]
            # A non-finite loss poisons every gradient, so the step is skipped below without a host sync here.
            loss = poison(loss)
            sums += torch.stack([loss.detach(), out["mse"].detach().mean(), out["cos"].detach().mean()])
            with nvtx("backward"):
                engine.backward(loss)
            self._prefetch()
            if engine.is_gradient_accumulation_boundary():
                with nvtx("optimizer"):
                    applied, grad_norm = self.optimizer_step()
            else:
                engine.step()  # DeepSpeed counts micro-steps; no update here
        if applied:
            with nvtx("ema"):
                self.ema.update(engine.module)
        return sums / self.grad_accum, applied, grad_norm

    # ------------------------------------------------------------------ data

    def _fetch(self):
        with nvtx("data"):
            lat, y = next(self.batches)
            lat = (lat.to(self.device, non_blocking=True) - self.mean) / self.std * self.cfg.data.latent_multiplier
            return lat, y.to(self.device, non_blocking=True)

    def _prefetch(self):
        """Fetch the next micro-batch now; remember the loader state before it, which is what a checkpoint
        saves (the batch is not consumed yet, so a resumed run draws it again)."""
        state = copy.deepcopy(self.loader.state_dict())
        self._prefetched = (self._fetch(), state)

    def _next_batch(self):
        if self._prefetched is None:
            return self._fetch()
        batch, self._prefetched = self._prefetched[0], None
        return batch

    def _loader_state(self):
        return self._prefetched[1] if self._prefetched is not None else self.loader.state_dict()

    # ------------------------------------------------------------------ optimizer

    def optimizer_step(self):
        lr = self.cfg.optim.lr * min(1.0, (self.step + 1) / max(1, self.cfg.optim.warmup_steps))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return engine_step(self.engine, self.cfg.optim.grad_clip)

    # ------------------------------------------------------------------ loop

    def fit(self):
        cfg, info = self.cfg, self.info
        if info.is_main:
            Path(cfg.logging.dir).mkdir(parents=True, exist_ok=True)
            dump_config(cfg, Path(cfg.logging.dir) / "config.yaml")
        lg = cfg.logging
        metrics = MetricsLogger(lg.dir, info.is_main, lg.tensorboard, lg.progress_bar, cfg.train.steps, self.step,
                                wandb=lg.wandb, wandb_project=lg.wandb_project, wandb_mode=lg.wandb_mode,
                                wandb_config=to_dict(cfg))
        if self._prefetched is not None:  # a batch fetched by an earlier train_step: draw it again
            self.loader.load_state_dict(self._prefetched[1])
            self._prefetched = None
        self.batches = forever(self.loader)
        profile = ProfileWindow(cfg.profile.start_step, cfg.profile.num_steps, torch_trace=cfg.profile.torch_trace,
                                trace_dir=Path(cfg.logging.dir) / "traces", rank=info.rank)
        log.info("world %d, grad accumulation %d, ZeRO %d, precision %s, FP8 %s, compile %s, kernels %s, "
                 "%.2f GFLOP/img",
                 info.world_size, self.grad_accum, cfg.train.zero_stage, cfg.train.precision, self.fp8_desc,
                 cfg.train.compile,
                 kernels.describe(), self.flops_per_image / 1e9)
        window_sums, window_steps, t0, start_time = torch.zeros(3, device=self.device), 0, time.time(), time.time()
        self._paused = 0.0  # seconds spent in evaluation and checkpointing: not training time
        last_norm = None  # a device tensor, read on the host only when logged
        try:
            while self.step < cfg.train.steps:
                profile.before_step(self.step)
                sums, applied, grad_norm = self.train_step()
                profile.after_step(self.step)
                self.step += 1
                if applied:
                    window_sums += sums
                    window_steps += 1
                    last_norm = grad_norm
                self.guard.update(applied, self.step, on_stop=self.save, where=self.ckpt.step_dir(self.step))
                metrics.advance()
                if self.step % cfg.logging.every == 0 or self.step == cfg.train.steps:
                    dt = time.time() - t0 - self._window_paused()
                    mean = all_reduce_mean(window_sums / max(1, window_steps)).tolist()
                    img_s = (self.step - self._window_start) * cfg.train.global_batch / max(dt, 1e-9)
                    metrics.log(self.step, {
                        "loss": mean[0], "mse": mean[1], "cos": mean[2],
                        "grad_norm": float("nan") if last_norm is None else float(last_norm),
                        "lr": self.optimizer.param_groups[0]["lr"], "img_per_s": img_s,
                        "tflops_per_gpu": img_s * self.flops_per_image / info.world_size / 1e12,
                        "skipped_steps": self.guard.skipped_steps, "images_seen": self.step * cfg.train.global_batch,
                        **peak_memory(self.device),
                        "eta_s": (cfg.train.steps - self.step) * dt / max(1, self.step - self._window_start)})
                    window_sums.zero_()
                    window_steps, t0, self._window_start = 0, time.time(), self.step
                paused_from = time.time()
                if self.eval_fn is not None and cfg.eval.every and self.step % cfg.eval.every == 0:
                    self.evaluate(metrics, start_time)
                if self.step % cfg.checkpoint.every == 0 or self.step == cfg.train.steps:
                    self.save()
                self._paused += time.time() - paused_from
            if cfg.checkpoint.export_reference:
                self.export()
        finally:
            profile.close()
            metrics.close()
            self.ckpt.release()
        return self

    def _window_paused(self):
        """Paused seconds since the last metrics line (then reset): img/s counts training time only."""
        paused = self._paused - getattr(self, "_paused_logged", 0.0)
        self._paused_logged = self._paused
        return paused

    def evaluate(self, metrics, start_time):
        model = LightningDiT(self.cfg.model.architecture()).to(self.device)
        model.load_state_dict(self.ema.full_state_dict(model), strict=False)
        model.eval()
        with torch.no_grad():
            result = self.eval_fn(model, self.step) or {}
        metrics.log(self.step, {**{f"eval/{k}": v for k, v in result.items()},
                                "wall_clock_s": time.time() - start_time - self._paused,  # training time
                                "images_seen": self.step * self.cfg.train.global_batch})

    # ------------------------------------------------------------------ checkpoints

    def save(self):
        """Model + optimizer (DeepSpeed, every rank's shard), EMA, every rank's RNG/generator/data position,
        step and config, written under a temp name and committed atomically by rank 0."""
        info = self.info
        with self.ckpt.saving(self.step, info.is_main) as tmp:
            self.engine.save_checkpoint(str(tmp), tag="deepspeed", save_latest=False)
            atomic_torch_save({"rng": rng_state(), "generator": self.generator.get_state(),
                               "loader": self._loader_state()}, tmp / f"rank_{info.rank:05d}.pt")
            if info.is_main:
                atomic_torch_save({"step": self.step, "ema": self.ema.state_dict(), "config": to_dict(self.cfg),
                                   "world_size": info.world_size, **self.guard.state_dict(), "fp8": self.fp8_desc},
                                  tmp / "trainer.pt")

    def resume(self):
        latest = self.ckpt.latest_valid()  # a truncated / incomplete newest checkpoint: the previous one
        if latest is None:
            return
        step, path = latest
        state = load_state(path / "trainer.pt", "trainer state")
        saved = from_dict(DiTTrainConfig, state["config"])
        for section in ("model", "fp8"):
            if getattr(saved, section) != getattr(self.cfg, section):
                raise ConfigError(f"cannot resume from {path}: its {section} config differs from this run's "
                                  f"({to_dict(getattr(saved, section))} vs {to_dict(getattr(self.cfg, section))})")
        if state["world_size"] != self.info.world_size or saved.train.global_batch != self.cfg.train.global_batch:
            raise ConfigError(f"cannot resume {path} exactly: it was written by {state['world_size']} ranks with "
                              f"global batch {saved.train.global_batch}; this run has {self.info.world_size} ranks "
                              f"and global batch {self.cfg.train.global_batch}")
        check_resume_config(state["config"], to_dict(self.cfg), path, warn=("train.", "data.", "optim."),
                            ignore=("train.steps",))
        with deepspeed_safe_load():
            load_path, _ = self.engine.load_checkpoint(str(path), tag="deepspeed", load_optimizer_states=True,
                                                       load_lr_scheduler_states=False)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path}")
        self.ema.load_state_dict(state["ema"])
        mine = load_state(path / f"rank_{self.info.rank:05d}.pt", "rank state")
        set_rng_state(mine["rng"])
        self.generator.set_state(mine["generator"])
        self.loader.load_state_dict(mine["loader"])
        self.step = step
        self.guard.load_state_dict(state)
        self._window_start = step
        log.info("resumed from %s at step %d", path, step)

    def export(self):
        """Reference format ({"model": module.*, "ema": ...}) and safetensors (EMA weights) in the run dir."""
        model_state = full_state_dict(self.engine.module)
        if not self.info.is_main:
            return
        out = Path(self.cfg.logging.dir)
        ema_state = self.ema.full_state_dict(self.engine.module)
        atomic_torch_save(to_reference_dit_format(model_state, ema_state), out / "final_reference.pt")
        model = LightningDiT(self.cfg.model.architecture())
        model.load_state_dict({k: v for k, v in ema_state.items() if k in model.state_dict()})
        save_pretrained(model, model.config.to_dict(), out / "pretrained_ema")
        log.info("exported %s and %s", out / "final_reference.pt", out / "pretrained_ema")


def build_eval(cfg):
    """The `eval.*` hook (evaluation/train_eval.py) or None when eval.every is 0. Built before the trainer, on
    this rank's device; the latent statistics default to the latent folder's."""
    if not cfg.eval.every:
        return None
    if cfg.eval.ref_batch is None:
        raise ConfigError("eval.every > 0 needs eval.ref_batch (an ADM-format reference npz), or eval.every=0")
    from evaluation.train_eval import build_eval_fn
    stats = cfg.eval.latent_stats
    if stats is None and cfg.data.source == "latents":
        stats = str(Path(cfg.data.path) / "latents_stats.pt")
    device = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available()
              else torch.device("cpu"))
    return build_eval_fn(cfg.eval, latent_stats=stats, device=device, latent_multiplier=cfg.data.latent_multiplier,
                         out_dir=cfg.logging.dir, log=log.info)


def train(cfg: DiTTrainConfig, eval_fn=None):
    """Train (or resume) the run described by `cfg`; returns the Trainer (step, ema, engine)."""
    trainer = Trainer(cfg, eval_fn)
    return trainer.fit()


def main(argv=None):
    return trainer_main("train.train_dit", __doc__, DiTTrainConfig, lambda cfg: train(cfg, eval_fn=build_eval(cfg)),
                        argv, extra_user_errors=(fp8_lib.FP8Unavailable,))



cli = console_entry(__name__)  # the `vavae-train-dit` console script (setup.py)

if __name__ == "__main__":
    sys.exit(main())
