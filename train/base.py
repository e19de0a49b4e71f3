"""The Trainer both trainers share (DiT: train/train_dit.py, VA-VAE: train/train_vae.py), read top to bottom.

    trainer = DiTTrainer(cfg)                             # build everything, resume if there is a checkpoint
    report = trainer.fit()                                # the loop; returns a dict (see `fit`)
    metrics = trainer.train_step(trainer.next_batch())    # one optimizer step on one batch: {name: float}
    trainer.save(); trainer.resume(); trainer.export(); trainer.close()

`__init__`: process group, CPU threads, the checkpoint folder's lock, the model (`build_model`), per-rank seeds,
the optimizers and DeepSpeed engines (`build_engines`), the data (`build_loader`), the non-finite guard, resume.
`fit` loops `next_batch` -> one optimizer step -> guard -> metrics line -> evaluation -> checkpoint, then
exports; a stop signal (SIGUSR1 from SLURM before the time limit: train/preempt.py) ends it early, after a
checkpoint the same command resumes from. A subclass adds only what is its own:

    build_model()          model(s) and losses, initial weights from train.seed (the same on every rank)
    build_engines()        optimizer(s) and engine(s), each through `add_engine(tag, module, optimizer)`
    build_loader()         this rank's data: an iterable with state_dict() / load_state_dict()
    fetch_batch()          the next step's batch on the device, read from `batch_stream()`
    optimize(batch)        forward, losses, backward and `optimizer_step(tag)` of one step -> StepOutput
    eval_model()           what `eval_fn(model, step)` evaluates every `eval.every` steps (DiT: the EMA)
    final_evaluation()     a last measurement after training (VA-VAE: reconstruction PSNR)
    export()               the reference-format files -> {name: path}
    extra_trainer_state() / extra_rank_state() / load_extra_state()   what its checkpoints carry beyond the
                           shared state (step, images seen, guard, config, RNGs, generator, data position)

Resume is one path: `resume()` -> CheckpointManager.load_latest(`load_checkpoint`) -> `check_resumable` (the
config policy RESUME_REFUSE / RESUME_WARN / RESUME_IGNORE, then `check_same_world`: a checkpoint continues
exactly only on the world size, global batch and ZeRO stage that wrote it) -> engines -> shared state -> the
subclass's. With `checkpoint.reshard: true` another world continues it instead (`load_resharded`, elastic): every
engine's full state consolidated from all the old ranks' files and resharded into this run's engines
(train/reshard.py), the data position moved by images seen, fresh random streams, one line saying what is no
longer bit-exact.
"""
import copy
import dataclasses
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import torch

import kernels

from modeling.config import ConfigError, dump_config, from_dict, one_line, to_dict
from modeling.threads import configure_threads

from .checkpoint import (CheckpointManager, CorruptCheckpointError, ResumeConfigError, atomic_torch_save,
                         check_resume_config, config_changes, deepspeed_safe_load, load_state, rng_state, set_rng_state)
from .config_sections import TrainerConfig
from .distributed import (RUN_STATE, DistInfo, all_reduce_mean, import_deepspeed, init_distributed, set_phase,
                          set_zero_grad_norm_dtype)
from .guard import NonFiniteGuard, engine_step
from .logging_utils import MetricsLogger, ProfileWindow, nvtx, peak_memory, set_nvtx
from .precision import deepspeed_autocast
from .preempt import StopRequest

log = logging.getLogger("train")

Batch = Any  # one step's data on the device: (latents, labels) for the DiT, images for the VA-VAE
EvalFn = Callable[[torch.nn.Module, int], Optional[dict]]  # eval_fn(model, step) -> {metric: value}


# ----------------------------------------------------------------------------- helpers

def forever(loader: Iterable) -> Iterator:
    """Endless batches; the loader moves to its next epoch each time its iterator ends."""
    while True:
        yield from loader


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device` without the host waiting for the GPU. From pageable memory CUDA stages the copy through a
    pinned buffer and may first synchronise with the stream (CUDA runtime API, "API synchronization behavior"):
    the prefetch issued after a step's backward would then wait for that whole backward and leave the GPU idle
    behind it. From page-locked memory the copy is queued like a kernel. A CPU tensor already pinned (the image
    DataLoader's pin_memory) is copied as it is."""
    if device.type == "cuda" and t.device.type == "cpu" and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def seed_rank_rngs(seed: int, rank: int) -> None:
    """Python's, numpy's and torch's global RNGs, different on every rank (checkpointed with each rank)."""
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def zero_on_one_rank(stage: int) -> str:
    """What ZeRO `stage` (1-3) costs a run on a single rank, said at its start (the copies are counted by
    tests/test_train_zero_one_rank.py, their time read off the 2026-12-04 H200 profile:
    bench/results/2026-12-05_zero_one_rank.md)."""
    cost = ("DeepSpeed still copies every fp32 gradient through its buckets and partitions (5 passes a step: "
            "6.4 ms at XL/1 on an H200) and keeps a second fp32 copy of the weights" if stage < 3 else
            "DeepSpeed still gathers and releases every parameter around each module, and the blocks cannot be "
            "compiled")
    return (f"train.zero_stage {stage} on one rank partitions nothing: {cost}; train.zero_stage=0 is the one-GPU "
            f"setting")


def deepspeed_config(cfg: TrainerConfig, world_size: int, global_batch: int) -> dict:
    """The DeepSpeed config of every engine of a trainer; `train.deepspeed` is merged last."""
    t, o = cfg.train, cfg.optim
    per_step = t.batch_per_gpu * world_size
    if global_batch % per_step:
        raise ConfigError(f"train.global_batch {global_batch} is not a multiple of batch_per_gpu x world size "
                          f"= {t.batch_per_gpu} x {world_size}")
    ds = {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": t.batch_per_gpu,
        "gradient_accumulation_steps": global_batch // per_step,
        # Without ZeRO the trainer checks and clips itself (train/guard.engine_step).
        "gradient_clipping": o.grad_clip if t.zero_stage > 0 else 0.0,
        # memory_efficient_linear: ZeRO-3 would replace torch.nn.functional.linear for the whole process with an
        # autograd.Function that torch.compile cannot trace (train.compile=blocks then fails) and that persists
        # after the engine is gone; our Linear layers need no replacement.
        "zero_optimization": {"stage": t.zero_stage,
                              **({"memory_efficient_linear": False} if t.zero_stage == 3 else {})},
        # bf16 autocast inside each engine's forward (an autocast opened around engine(...) is switched OFF there
        # on a GPU); gradients are reduced and kept in fp32 (train/precision.py).
        "torch_autocast": deepspeed_autocast(t.precision),
        "steps_per_print": 10 ** 9,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if t.deepspeed:
        ds = merge_deepspeed_overrides(ds, t.deepspeed)
        check_deepspeed_config(ds, t.deepspeed)
    return ds


# DeepSpeed keys the trainer derives from its own settings: overridden, the trainer would count, clip, schedule or
# cast one way and DeepSpeed another (e.g. zero_optimization.stage against train.zero_stage, which the guard, the
# EMA and the checkpoints follow). -> where to set it instead
TRAINER_OWNED_DEEPSPEED_KEYS = {
    "train_batch_size": "train.batch_per_gpu (and train.global_batch in the DiT trainer)",
    "train_micro_batch_size_per_gpu": "train.batch_per_gpu",
    "gradient_accumulation_steps": "train.global_batch and train.batch_per_gpu (the DiT trainer derives it)",
    "gradient_clipping": "optim.grad_clip",
    "zero_optimization.stage": "train.zero_stage",
    "optimizer": "optim (the trainer builds its own optimizers)",
    "scheduler": "optim.lr and optim.warmup_steps (the trainer sets the learning rate)",
    # bf16 / fp16: DeepSpeed's own mixed precision (bf16 weights and its optimizer wrapper); torch_autocast: the
    # autocast the trainer writes for train.precision, gradients kept in fp32 (train/precision.py; its guard
    # would catch a change only at the first step)
    "fp16": "train.precision", "bf16": "train.precision", "bfloat16": "train.precision",
    "torch_autocast": "train.precision",
}


def merge_deepspeed_overrides(ds: dict, overrides: dict, path: str = "train.deepspeed") -> dict:
    """`ds` with `overrides` merged key by key into its sections (a section given in part keeps the trainer's other
    keys: `zero_optimization: {offload_optimizer: ...}` keeps the stage); a trainer-owned key is a ConfigError."""
    out = dict(ds)
    for key, value in overrides.items():
        dotted = f"{path}.{key}"
        owner = TRAINER_OWNED_DEEPSPEED_KEYS.get(dotted.removeprefix("train.deepspeed."))
        if owner is not None:
            raise ConfigError(f"{dotted}: the trainer decides this DeepSpeed key from its own config; set {owner}")
        if isinstance(out.get(key), dict):  # a section the trainer writes: merged, never replaced
            if not isinstance(value, dict):
                raise ConfigError(f"{dotted}: expected a mapping (merged into the trainer's section), got {value!r}")
            out[key] = merge_deepspeed_overrides(out[key], value, dotted)
        else:
            out[key] = value
    return out


class _ReadKeys(dict):
    """A dict that notes which keys are read (DeepSpeed's config parser reads each key it knows with get/[]; its
    shallow copy shares `read`), its sections wrapped the same way. A section unpacked whole into a pydantic model
    (`**section`: zero_optimization, ...) records no reads: pydantic refuses unknown keys there itself."""

    def __init__(self, data: dict) -> None:
        super().__init__({k: _ReadKeys(v) if isinstance(v, dict) else v for k, v in data.items()})
        self.read: set = set()

    def get(self, key, *default):
        self.read.add(key)
        return super().get(key, *default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def unread(self, keys: dict, path: str) -> list[str]:
        """The dotted paths of `keys` (the user's overrides, nested as this dict) that DeepSpeed did not read."""
        if not self.read:  # a section it never reads key by key (pydantic, or not read at all: see the top level)
            return []
        out = []
        for k, v in keys.items():
            if k not in self.read:
                out.append(f"{path}.{k}")
            elif isinstance(v, dict) and isinstance(dict.get(self, k), _ReadKeys):
                out += dict.get(self, k).unread(v, f"{path}.{k}")
        return out


def check_deepspeed_config(ds: dict, overrides: dict) -> None:
    """Parse `ds` as the engines will (DeepSpeedConfig) before anything is built, so a refused value is one line
    naming train.deepspeed rather than a traceback from deepspeed.initialize, and a key of `overrides` that
    DeepSpeed never reads (a misspelling: DeepSpeed ignores it) is a ConfigError instead of a silent no-op. Keys
    inside the sections DeepSpeed validates with pydantic (zero_optimization, ...) are refused by pydantic."""
    offload = ((ds.get("zero_optimization") or {}).get("offload_optimizer") or {}).get("device", "none")
    if offload not in (None, "none") and ds.get("zero_force_ds_cpu_optimizer", True) is not False:
        # (deepspeed.initialize would raise ZeRORuntimeException after the model is built, on every rank)
        raise ConfigError(f"train.deepspeed.zero_optimization.offload_optimizer.device {offload}: DeepSpeed offloads "
                          "its own CPU Adam only, and the trainer builds torch's AdamW; add "
                          "train.deepspeed.zero_force_ds_cpu_optimizer=false to offload torch's AdamW (its step then "
                          "runs on the CPU)")
    deepspeed = import_deepspeed()
    from deepspeed import comm
    from deepspeed.runtime.config import DeepSpeedConfig
    seen = _ReadKeys(copy.deepcopy(ds))
    # DeepSpeed counts the ranks of its own process group (1 where it has none yet: a caller that set up
    # torch.distributed itself); the batch sizes are the trainer's, checked already: made consistent with that
    world = comm.get_world_size() if comm.is_initialized() else 1
    seen["train_batch_size"] = ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world
    try:
        DeepSpeedConfig(seen)
    except Exception as e:  # pydantic's ValidationError, DeepSpeedConfigError, AssertionError ...
        errors = getattr(e, "errors", None)  # pydantic: the section (its model's title), then each key's problem
        text = (f"{e.title}: " + "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in errors())
                if callable(errors) and hasattr(e, "title") else one_line(e))
        raise ConfigError(f"train.deepspeed: DeepSpeed {deepspeed.__version__} refuses the config with these "
                          f"overrides: {text}") from None
    if "train_batch_size" not in seen.read:  # this DeepSpeed reads its config otherwise: nothing to learn here
        return
    unread = seen.unread(overrides, "train.deepspeed")
    if unread:
        raise ConfigError(f"{unread[0]}: not a key DeepSpeed {deepspeed.__version__} reads (misspelt? it would be "
                          f"ignored); its keys are in its config docs")


@dataclass
class StepOutput:
    """One optimizer step: whether it was applied (False: skipped as non-finite, nothing moved) and its metrics
    as 0-dim tensors on the device (read on the host only when logged)."""
    applied: bool
    metrics: dict[str, torch.Tensor]

    def floats(self) -> dict[str, float]:
        """{"applied": 1.0 | 0.0, metric: value} on the host (one device synchronisation)."""
        names = list(self.metrics)
        device = self.metrics[names[0]].device if names else None
        values = (torch.stack([self.metrics[k].detach().reshape(()).to(device, torch.float32) for k in names])
                  .tolist() if names else [])
        return {"applied": float(self.applied), **dict(zip(names, values))}


class MetricWindow:
    """The applied steps' metrics since the last metrics line, summed on the device (no host synchronisation per
    step). `reduce()` gives each metric's mean over those steps and over the ranks (a collective: every rank
    calls it); `gauges` (e.g. a global gradient norm, the same on every rank) give their last value instead."""

    def __init__(self, device: torch.device, gauges: Iterable[str] = ()) -> None:
        self.device, self.gauges = device, set(gauges)
        self.sums: dict[str, tuple[torch.Tensor, int]] = {}
        self.last: dict[str, torch.Tensor] = {}

    def add(self, out: StepOutput) -> None:
        if not out.applied:  # a skipped step's losses are not finite: they are counted, not averaged
            return
        for k, v in out.metrics.items():
            if k in self.gauges:
                self.last[k] = v
            else:
                s, n = self.sums.get(k, (None, 0))
                v = v.detach().to(self.device, torch.float32)
                self.sums[k] = (v if s is None else s + v, n + 1)

    def reduce(self) -> dict[str, float]:
        keys = sorted(self.sums)
        means = all_reduce_mean(torch.stack([self.sums[k][0] / self.sums[k][1] for k in keys])).tolist() if keys else []
        out = dict(zip(keys, means))
        out.update({k: float(v) for k, v in self.last.items()})
        self.sums, self.last = {}, {}
        return out


# ----------------------------------------------------------------------------- the trainer

class Trainer:
    """The base of DiTTrainer and VAVAETrainer (module docstring: what a subclass adds)."""

    NAME = "trainer"                   # names the trainer's checkpoints in messages
    # Resume policy, by config-key prefix: a change under RESUME_REFUSE makes a checkpoint unusable (one-line
    # error), under RESUME_WARN it is logged (resume is no longer exact); RESUME_IGNORE is not reported.
    RESUME_REFUSE: tuple[str, ...] = ()
    RESUME_WARN: tuple[str, ...] = ()
    RESUME_IGNORE: tuple[str, ...] = ("checkpoint.", "logging.", "dist.", "profile.", "train.steps")
    # keys under RESUME_REFUSE that an elastic resume (checkpoint.reshard) may change: how the batch is split
    RESHARDABLE: tuple[str, ...] = ("train.batch_per_gpu", "train.global_batch", "train.zero_stage")
    GAUGES: tuple[str, ...] = ()       # metrics logged as their last value instead of the window's mean

    def __init__(self, cfg: TrainerConfig, eval_fn: Optional[EvalFn] = None) -> None:
        if eval_fn is not None and not hasattr(cfg, "eval"):
            raise ConfigError(f"the {self.NAME} trainer's config has no eval section: an eval_fn is never called")
        self.cfg, self.eval_fn = cfg, eval_fn
        t = cfg.train
        self.info: DistInfo = init_distributed(cfg.dist.backend, cfg.dist.timeout_s)
        self.device: torch.device = self.info.device
        self.threads = configure_threads()  # (modeling/threads.py: the one place; shared by the ranks on a node)
        # before anything big is built: the folders are writable and no other run uses this checkpoint folder
        # (rank 0's lock, the outcome shared with every rank)
        self.ckpt = CheckpointManager(cfg.checkpoint_dir(), cfg.checkpoint.keep_last, resume=cfg.checkpoint.resume)
        self.ckpt.prepare(self.info.is_main, writable=[cfg.logging.dir])
        RUN_STATE["checkpoint_root"] = str(self.ckpt.root)  # (named by the error line of a lost rank)
        try:  # a start that fails (a bad setting, a missing file, out of memory) gives the folder's lock back: the
            #     next start took it over as a stale lock, with a warning that a run had ended without releasing it
            set_nvtx(cfg.profile.nvtx)

            # the engines' DeepSpeed config, checked before anything big is built
            self.global_batch: int = self.global_batch_of(dataclasses.asdict(t), self.info.world_size)
            self.ds_config = deepspeed_config(cfg, self.info.world_size, self.global_batch)
            self.grad_accum: int = self.ds_config["gradient_accumulation_steps"]
            # this process's kernels.ops backend (train.kernels, both trainers' key), then the initial weights from
            # train.seed: identical on every rank
            kernels.set_backend(t.kernels)
            torch.manual_seed(t.seed)
            self.build_model()
            # Every later random draw differs by rank and comes from state a checkpoint stores per rank: the global
            # RNGs and this generator (noise, time, label dropout, posterior samples), so resume is exact.
            seed_rank_rngs(t.seed, self.info.rank)
            self.generator = torch.Generator(self.device).manual_seed(t.seed * 100_003 + self.info.rank)

            self.engines: dict[str, Any] = {}       # checkpoint tag -> DeepSpeed engine
            self._optimizers: dict[str, torch.optim.Optimizer] = {}
            self.build_engines()

            self.loader = self.build_loader()
            self.batches: Optional[Iterator] = None  # the endless stream over self.loader (made on first use)
            self._prefetched: Optional[tuple[Batch, dict]] = None  # (next step's batch, loader state before it)
            self.total_steps: int = self.planned_steps()
            self.step, self.images_seen = 0, 0
            # seconds of training (evaluation and checkpoints left out) before this process: eval records'
            # wall_clock_s continues across resumes (trainer.pt's "training_s")
            self.training_s = 0.0
            self.guard = NonFiniteGuard(t.max_bad_steps)
            self.eval_every: int = cfg.eval.every if eval_fn is not None else 0
            log.info("%s", self.describe())
            if self.info.world_size == 1 and t.zero_stage > 0 and self.info.is_main:
                log.info(zero_on_one_rank(t.zero_stage))
            if cfg.checkpoint.resume == "auto":
                self.resume()
        except BaseException:
            self.ckpt.release()
            raise

    # ------------------------------------------------------------------ what a subclass builds

    def build_model(self) -> None:
        raise NotImplementedError

    def build_engines(self) -> None:
        raise NotImplementedError

    def build_loader(self) -> Iterable:
        raise NotImplementedError

    def add_engine(self, tag: str, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Any:
        """A DeepSpeed engine of `module` and `optimizer` (self.ds_config); `tag` names it in checkpoints."""
        import deepspeed
        if self.cfg.train.zero_stage > 0:  # ZeRO computes the gradient norm (stage 0: train/guard, in fp32)
            # (said once, in the start-up line: describe)
            self.grad_norm_desc = set_zero_grad_norm_dtype(self.cfg.train.grad_norm_dtype)
        engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=self.ds_config)
        if self.info.world_size == 1 and self.cfg.train.zero_stage == 0:
            # one rank has nothing to all-reduce, and DeepSpeed's stage-0 reduction would still flatten every
            # gradient into a bucket and copy it back: two passes over the fp32 gradients a step (XL/1: 2.7 GB
            # read and written twice, ~2.5 ms at an H200's copy rate); ZeRO 1-3 copy them through their buckets
            # and partitions whatever the flag says
            engine.enable_backward_allreduce = False
        self.engines[tag], self._optimizers[tag] = engine, optimizer
        return engine

    @staticmethod
    def global_batch_of(train: dict, world_size: int) -> int:
        """Images per optimizer step, all ranks together, of the `train` section (a plain dict: also the one a
        checkpoint stores) at `world_size` ranks: batch_per_gpu x world size unless a trainer says otherwise."""
        return int(train["batch_per_gpu"]) * world_size

    def planned_steps(self) -> int:
        return self.cfg.train.steps

    def describe(self) -> str:
        """The start-up line: what was built and how it runs."""
        t = self.cfg.train
        return (f"{self.NAME}: world {self.info.world_size} x batch {t.batch_per_gpu}, grad accumulation "
                f"{self.grad_accum}, ZeRO {t.zero_stage}, precision {t.precision}, compile {t.compile_desc()}, "
                f"{self.total_steps} steps, {self.threads} CPU threads")

    # ------------------------------------------------------------------ one optimizer step

    def train_step(self, batch: Batch) -> dict[str, float]:
        """One optimizer step on `batch` (this rank's data for the step, e.g. from next_batch()): its metrics as
        floats, with "applied" 0.0 when the step was skipped as non-finite (weights, optimizer and EMA as
        they were). Advances `step` and `images_seen`."""
        return self.step_on_device(batch).floats()

    def step_on_device(self, batch: Batch) -> StepOutput:
        """train_step with the metrics left on the device: what fit() runs (the only host synchronisation of a
        step is then the optimizer's finite-norm check)."""
        out = self.optimize(batch)
        self.step += 1
        self.images_seen += self.global_batch
        return out

    def optimize(self, batch: Batch) -> StepOutput:
        """The subclass's step: forward, losses, backward and optimizer_step(tag) of each engine it updates."""
        raise NotImplementedError

    def optimizer_step(self, tag: str) -> tuple[bool, torch.Tensor]:
        """The update of engine `tag` at this step: the scheduled learning rate (optim.lr_at), then DeepSpeed's
        step, skipped when the global gradient norm is not finite (train/guard.engine_step). Returns
        (applied, grad norm as a 0-dim device tensor)."""
        lr = self.cfg.optim.lr_at(self.step)
        for group in self._optimizers[tag].param_groups:
            group["lr"] = lr
        return engine_step(self.engines[tag], self.cfg.optim.grad_clip)

    def current_lr(self) -> float:
        return next(iter(self._optimizers.values())).param_groups[0]["lr"]

    # ------------------------------------------------------------------ data

    def batch_stream(self) -> Iterator:
        """The endless stream of loader items that fetch_batch reads from."""
        if self.batches is None:
            self.batches = forever(self.loader)
        return self.batches

    def next_batch(self) -> Batch:
        """This rank's batch for the next optimizer step, on the device (the prefetched one when there is one)."""
        if self._prefetched is not None:
            batch, self._prefetched = self._prefetched[0], None
            return batch
        with nvtx("data"):
            return self.fetch_batch()

    def fetch_batch(self) -> Batch:
        raise NotImplementedError

    def prefetch(self) -> None:
        """Fetch the next step's batch now: a subclass calls it while its backward runs, so the device does not
        wait for the data after the optimizer's host synchronisation. A checkpoint saves the loader state
        from before it, so a resumed run draws it again. Only while next_batch() feeds the steps."""
        if self.batches is None or self._prefetched is not None:
            return
        state = copy.deepcopy(self.loader.state_dict())
        with nvtx("data"):
            self._prefetched = (self.fetch_batch(), state)

    def loader_state(self) -> dict:
        """The data position a checkpoint stores: before the prefetched batch, which was not trained on yet."""
        return self._prefetched[1] if self._prefetched is not None else self.loader.state_dict()

    def restart_batches(self) -> None:
        """A fresh stream over self.loader (which may have been replaced); a batch prefetched earlier is drawn
        again."""
        if self._prefetched is not None:
            self.loader.load_state_dict(self._prefetched[1])
            self._prefetched = None
        self.batches = forever(self.loader)

    # ------------------------------------------------------------------ the loop

    def fit(self) -> dict:
        """Train to `total_steps` (from where resume left off), checkpointing every `checkpoint.every` steps and
        at the end, then export. Returns the same report for both trainers:

            {"step", "stopped_by": None, or the stop signal's name when it ended the run early (train/preempt.py),
             "total_steps", "images_seen", "skipped_steps",
             "metrics": the last metrics line (window means), "eval": the last evaluation's results and the
             final evaluation's (VA-VAE: psnr), "exports": {name: path}, "checkpoint": the last checkpoint's
             folder, "logging_dir": the run folder}

        Too many non-finite steps in a row raise NonFiniteError after a checkpoint."""
        cfg, info, lg = self.cfg, self.info, self.cfg.logging
        run_dir = Path(lg.dir)
        if info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, run_dir / "config.yaml")
        metrics = profile = None
        stop = StopRequest(cfg.checkpoint.stop_signal, cfg.checkpoint.stop_check_every, info.world_size,
                           self.device)
        try:
            metrics = MetricsLogger(run_dir, info.is_main, lg.tensorboard, lg.progress_bar, self.total_steps,
                                    self.step, wandb=lg.wandb, wandb_project=lg.wandb_project,
                                    wandb_mode=lg.wandb_mode, wandb_config=to_dict(cfg), supersede_after=self.step)
            profile = ProfileWindow(cfg.profile.start_step, cfg.profile.num_steps,
                                    torch_trace=cfg.profile.torch_trace, trace_dir=run_dir / "traces", rank=info.rank)
            self.restart_batches()
            window = MetricWindow(self.device, self.GAUGES)
            last_line, last_eval = {}, {}
            stop.install()
            saved_at, stopped_by = None, None
            start = t0 = time.time()
            paused, paused_t0, window_start = 0.0, 0.0, self.step  # paused: seconds of evaluation and checkpoints
            resumed_s = self.training_s  # the training time of the steps a checkpoint brought
            while self.step < self.total_steps:
                set_phase(f"training step {self.step + 1}")
                profile.before_step(self.step)
                out = self.step_on_device(self.next_batch())
                profile.after_step(self.step - 1)
                self.training_s = resumed_s + time.time() - start - paused
                window.add(out)
                self.guard.update(out.applied, self.step, on_stop=self.save, where=self.ckpt.step_dir(self.step))
                metrics.advance()
                if self.step % lg.every == 0 or self.step == self.total_steps:
                    dt = time.time() - t0 - (paused - paused_t0)  # img/s counts training time only
                    last_line = self.log_metrics(metrics, window, dt, self.step - window_start)
                    t0, paused_t0, window_start = time.time(), paused, self.step
                paused_from = time.time()
                # the checkpoint before the evaluation: an evaluation that fails (out of memory beside the
                # training state) then loses no training
                if self.step % cfg.checkpoint.every == 0 or self.step == self.total_steps:
                    self.save()
                    saved_at = self.step
                if self.eval_every and self.step % self.eval_every == 0:
                    last_eval = self.log_evaluation(metrics, training_s=self.training_s)
                if self.step < self.total_steps and stop.agreed(self.step):  # (train/preempt.py)
                    path = self.ckpt.step_dir(self.step) if saved_at == self.step else self.save()
                    stopped_by = stop.name
                    log.info("%s received: stopped after step %d with its checkpoint %s; the same command "
                             "resumes from it", stopped_by, self.step, path)
                    break
                paused += time.time() - paused_from
            exports, final = {}, {}
            if stopped_by is None:
                set_phase("exporting the weights")
                exports = self.export() if cfg.checkpoint.export_reference else {}
                final = self.final_evaluation()
        finally:
            stop.close()
            if profile is not None:
                profile.close()
            if metrics is not None:
                metrics.close()
            self.close()
        if stopped_by is None:
            log.info("done: step %d, %d non-finite steps skipped", self.step, self.guard.skipped_steps)
        return {"step": self.step, "stopped_by": stopped_by, "total_steps": self.total_steps, "images_seen": self.images_seen,
                "skipped_steps": self.guard.skipped_steps, "metrics": last_line, "eval": {**last_eval, **final},
                "exports": exports, "checkpoint": str(self.ckpt.step_dir(self.step)), "logging_dir": str(run_dir)}

    def log_metrics(self, metrics: MetricsLogger, window: MetricWindow, dt: float, steps: int) -> dict[str, float]:
        """One metrics line for the `steps` steps of the window that took `dt` seconds of training time."""
        img_s = steps * self.global_batch / max(dt, 1e-9)
        line = {**window.reduce(), "lr": self.current_lr(), "img_per_s": img_s, **self.extra_metrics(img_s),
                "skipped_steps": self.guard.skipped_steps, "images_seen": self.images_seen,
                **peak_memory(self.device), "eta_s": (self.total_steps - self.step) * dt / max(1, steps)}
        metrics.log(self.step, line)
        return line

    def extra_metrics(self, img_per_s: float) -> dict[str, float]:
        """What a subclass adds to each metrics line (DiT: TFLOP/s per GPU; VA-VAE: epoch)."""
        return {}

    # ------------------------------------------------------------------ evaluation

    def log_evaluation(self, metrics: MetricsLogger, training_s: float) -> dict:
        """evaluate(), logged as eval/* with the training wall-clock and images seen (what bench.curves plots)."""
        set_phase(f"evaluating at step {self.step}")
        result = self.evaluate()
        metrics.log(self.step, {**{f"eval/{k}": v for k, v in result.items()}, "wall_clock_s": training_s,
                                "images_seen": self.images_seen})
        return result

    def evaluate(self) -> dict:
        """eval_fn(eval_model(), step) on every rank (it may do distributed work)."""
        model = self.eval_model()
        with torch.no_grad():
            return self.eval_fn(model, self.step) or {}

    def eval_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def final_evaluation(self) -> dict:
        """A measurement after the last step, into the report's "eval" (none by default)."""
        return {}

    # ------------------------------------------------------------------ checkpoints

    def save(self) -> Path:
        """Every engine (DeepSpeed, every rank's shard), every rank's RNGs / generator / data position, and rank
        0's trainer state (step, images seen, guard, config, world size, global batch), written under a temp
        name and committed atomically by rank 0 (CheckpointManager.saving). Returns the checkpoint's folder."""
        info = self.info
        set_phase(f"saving the checkpoint of step {self.step}")
        with self.ckpt.saving(self.step, info.is_main) as tmp:
            for tag, engine in self.engines.items():
                engine.save_checkpoint(str(tmp), tag=tag, save_latest=False)
            atomic_torch_save({"rng": rng_state(), "generator": self.generator.get_state(),
                               "loader": self.loader_state(), **self.extra_rank_state()},
                              tmp / f"rank_{info.rank:05d}.pt")
            if info.is_main:
                atomic_torch_save({"trainer": self.NAME, "step": self.step, "images_seen": self.images_seen,
                                   "training_s": self.training_s, "config": to_dict(self.cfg),
                                   "world_size": info.world_size, "global_batch": self.global_batch,
                                   "guard": self.guard.state_dict(), **self.extra_trainer_state()},
                                  tmp / "trainer.pt")
        return self.ckpt.step_dir(self.step)

    def extra_trainer_state(self) -> dict:
        """What rank 0 adds to trainer.pt (tensors and plain types only: it is read back with weights_only)."""
        return {}

    def extra_rank_state(self) -> dict:
        """What every rank adds to its rank_NNNNN.pt."""
        return {}

    def resume(self) -> Optional[int]:
        """Continue from the newest complete checkpoint (an incomplete or corrupt newer one is skipped with a
        warning by CheckpointManager.load_latest); returns its step, or None when there is none."""
        set_phase(f"resuming from {self.ckpt.root}")
        found = self.ckpt.load_latest(self.load_checkpoint)
        return None if found is None else found[0]

    def load_checkpoint(self, step: int, path: Path) -> int:
        """Load checkpoint `path` (of step `step`) into this trainer: the one resume path (exact, or elastic with
        checkpoint.reshard when this run's world differs: load_resharded)."""
        state = self.read_trainer_state(path)
        if self.check_resumable(state, path):
            return self.load_resharded(step, path, state)
        with deepspeed_safe_load():
            for tag, engine in self.engines.items():
                load_path, _ = engine.load_checkpoint(str(path), tag=tag, load_optimizer_states=True,
                                                      load_lr_scheduler_states=False)
                if load_path is None:
                    raise RuntimeError(f"DeepSpeed could not load the {tag} checkpoint in {path}")
        mine = load_state(path / f"rank_{self.info.rank:05d}.pt", f"{self.NAME} rank state")
        set_rng_state(mine["rng"])
        self.generator.set_state(mine["generator"])
        self.loader.load_state_dict(mine["loader"])
        self.batches, self._prefetched = None, None  # the stream restarts at the loaded position
        self.guard.load_state_dict(state.get("guard", state))  # (DiT checkpoints kept the guard's keys at the top)
        self.step = step
        self.images_seen = int(state.get("images_seen", step * self.global_batch))
        self.training_s = float(state.get("training_s", 0.0))
        self.load_extra_state(state, mine)
        log.info("resumed from %s at step %d", path, step)
        return step

    def read_trainer_state(self, path: Path) -> dict:
        if not (path / "trainer.pt").is_file():
            raise ConfigError(f"{path} has no trainer.pt: not a {self.NAME} checkpoint")
        return load_state(path / "trainer.pt", f"{self.NAME} trainer state")

    def check_resumable(self, state: dict, path: Path) -> bool:
        """The checkpoint's config against this run's (RESUME_REFUSE: one-line error, but for RESHARDABLE keys
        under checkpoint.reshard; RESUME_WARN: a warning per changed key), and the world it was written by
        (check_same_world). Returns True when it is to be resumed elastically (load_resharded)."""
        written_by = state.get("trainer")  # (older checkpoints: their engines' folders say whose they are)
        if written_by != self.NAME and (written_by is not None or not all((path / t).is_dir() for t in self.engines)):
            held = sorted(p.name for p in path.iterdir() if p.is_dir())
            who = f"the {written_by}" if written_by else "another"
            raise ResumeConfigError(f"cannot resume from {path}: written by {who} trainer (engines "
                                    f"{', '.join(held) or 'none'}), not the {self.NAME} trainer; give this run its "
                                    "own checkpoint.dir")
        if not isinstance(state.get("config"), dict):  # every trainer.pt records its run's config
            raise CorruptCheckpointError(f"{path / 'trainer.pt'} holds no run config (a trainer.pt of this project "
                                         "records one); not this project's checkpoint, or damaged")
        saved, now = self.saved_config(state["config"]), to_dict(self.cfg)
        reshard = self.cfg.checkpoint.reshard
        refuse = tuple(k for k in self.RESUME_REFUSE if not (reshard and k in self.RESHARDABLE))
        # the remedy of a batch split that changed, where that is all that changed among the refused keys
        refused = [c for c in config_changes(saved, now) if any(c.startswith(k) for k in refuse)
                   and not any(c.startswith(k) for k in self.RESUME_IGNORE)]
        only_split = refused and all(any(c.startswith(k) for k in self.RESHARDABLE) for c in refused)
        remedy = "set checkpoint.reshard=true to continue it with this batch split (elastic resume)"
        check_resume_config(saved, now, path, refuse=refuse, ignore=self.RESUME_IGNORE,
                            remedies=dict.fromkeys(self.RESHARDABLE, remedy) if only_split and not reshard else {})
        elastic = not self.check_same_world(state, saved, path)
        check_resume_config(saved, now, path, warn=self.RESUME_WARN, ignore=self.RESUME_IGNORE)
        return elastic

    def saved_config(self, stored: dict) -> dict:
        """A checkpoint's config as this schema reads it now (older names converted, newer keys at their
        defaults, so they are not reported as changes), or as stored if this schema can no longer read it."""
        try:
            return to_dict(from_dict(type(self.cfg), stored))
        except ConfigError:
            return stored

    def check_same_world(self, state: dict, saved: dict, path: Path) -> bool:
        """True when this run has the world size, global batch and ZeRO stage that wrote the checkpoint: exact
        resume, every rank continues its own RNGs, generator and data position from its own file. Otherwise
        False with checkpoint.reshard (elastic resume), else a one-line ConfigError naming that key."""
        world = int(state["world_size"])
        global_batch = int(state.get("global_batch") or self.global_batch_of(saved["train"], world))
        stage, now_stage = saved["train"].get("zero_stage"), self.cfg.train.zero_stage
        stage = now_stage if stage is None else int(stage)
        if (world, global_batch, stage) == (self.info.world_size, self.global_batch, now_stage):
            return True
        if self.cfg.checkpoint.reshard:
            return False
        zero = (f" under ZeRO {stage}", f" under ZeRO {now_stage}") if stage != now_stage else ("", "")
        raise ConfigError(f"cannot resume {path} exactly: it was written by {world} ranks with global batch "
                          f"{global_batch}{zero[0]}; this run has {self.info.world_size} ranks and global batch "
                          f"{self.global_batch}{zero[1]}; set checkpoint.reshard=true to continue it on this world "
                          f"(elastic resume: not bit-exact, docs/training.md)")

    # ------------------------------------------------------------------ elastic resume

    def load_resharded(self, step: int, path: Path, state: dict) -> int:
        """Elastic resume of checkpoint `path` (another world size, global batch or ZeRO stage wrote it):

        - every engine: the full fp32 weights, Adam moments and step consolidated from all the old ranks' files
          and written into this run's partitions (train/reshard.py), whatever the ZeRO stages;
        - trainer.pt as in an exact resume: step (so the learning-rate schedule continues), images seen, guard,
          the subclass's state (DiT: the EMA; VA-VAE: logvar); a rank's own extras (the discriminator's BatchNorm
          statistics) from old rank `rank % old world`;
        - the data position from rank 0's loader state, moved to this world (reshard_loader_state);
        - fresh random streams (Python, numpy, torch, the generator), seeded from (train.seed, step, rank): an
          elastic resume is itself reproducible, but not the old ranks' streams.
        Rank 0 says in one line what was carried and what is no longer bit-exact."""
        from .reshard import describe_moments, load_full_state, read_full_state
        old_world = int(state["world_size"])
        saved_train = self.saved_config(state["config"]).get("train", {})
        old_batch = int(state.get("global_batch") or self.global_batch_of(saved_train, old_world))
        old_stage = saved_train.get("zero_stage", "?")
        moments = []
        for tag, engine in self.engines.items():  # (read_full_state loads every file with weights_only=True)
            order = [n for n, _ in engine.module.named_parameters()]  # the optimizer's (built from the module)
            full = read_full_state(path / tag, order)
            load_full_state(engine, self._optimizers[tag], full, where=str(path / tag))
            moments.append(f"{tag} {describe_moments(full)}")
            del full
        rank0 = load_state(path / "rank_00000.pt", f"{self.NAME} rank state")
        source = self.info.rank % old_world
        mine = rank0 if source == 0 else load_state(path / f"rank_{source:05d}.pt", f"{self.NAME} rank state")
        seed = int(np.random.SeedSequence([self.cfg.train.seed, step]).generate_state(1)[0]) >> 1  # + rank < 2**32
        seed_rank_rngs(seed, self.info.rank)
        self.generator.manual_seed(seed * 100_003 + self.info.rank)
        self.step = step
        self.images_seen = int(state.get("images_seen", step * old_batch))
        self.training_s = float(state.get("training_s", 0.0))
        loader_state, where = self.reshard_loader_state(rank0["loader"], self.images_seen)
        self.loader.load_state_dict(loader_state)
        self.batches, self._prefetched = None, None
        self.guard.load_state_dict(state.get("guard", state))
        self.load_extra_state(state, mine)
        self.after_reshard()
        if self.info.is_main:
            ranks = lambda n: f"{n} rank{'s' if n != 1 else ''}"  # noqa: E731
            log.warning(
                "elastic resume of %s (checkpoint.reshard): written by %s, global batch %d, ZeRO %s; continued by %s, "
                "global batch %d, ZeRO %d, at step %d of %d with %d images seen; carried: weights, Adam state (%s), "
                "the lr schedule's step, trainer.pt; data: %s; not bit-exact: the random streams (reseeded from "
                "train.seed and the step), the split of each batch over ranks, the reduction order",
                path, ranks(old_world), old_batch, old_stage, ranks(self.info.world_size), self.global_batch,
                self.cfg.train.zero_stage, step, self.total_steps, self.images_seen, "; ".join(moments), where)
        return step

    def reshard_loader_state(self, saved: dict, images_seen: int) -> tuple[dict, str]:
        """This world's data position from rank 0's saved loader state, and a few words on it. A ResumableLoader
        (train/data/sampler.py: epoch e is the same permutation whatever the world) continues that epoch at the
        same image offset, rounded down to a multiple of this world's batch_per_gpu x ranks (the images
        between are read again); a loader that counts its batches (`position`: the DiT's synthetic latents)
        continues at images_seen / (batch_per_gpu x ranks)."""
        per_read = self.cfg.train.batch_per_gpu * self.info.world_size  # images all ranks read per micro-batch
        if "samples_in_epoch" in saved:
            offset = int(saved["samples_in_epoch"])
            again = offset % per_read
            text = f"epoch {saved['epoch']} continues at image {offset - again} of its permutation"
            return {**saved, "samples_in_epoch": offset - again}, text + (f" ({again} images read again)"
                                                                         if again else "")
        if set(saved) == {"position"}:
            return {"position": images_seen // per_read}, f"batch {images_seen // per_read} of every rank's stream"
        raise ConfigError(f"the data position {sorted(saved)} of this loader cannot move to another world size")

    def after_reshard(self) -> None:
        """What a subclass recomputes after an elastic resume (VA-VAE: the steps of train.epochs)."""

    def load_extra_state(self, state: dict, rank_state: dict) -> None:
        """Load what extra_trainer_state / extra_rank_state saved."""

    # ------------------------------------------------------------------ the end

    def export(self) -> dict[str, str]:
        """The trained weights in the reference format (every rank calls it) -> {name: path}."""
        raise NotImplementedError

    def close(self) -> None:
        """Give the checkpoint folder's lock back (fit does at its end); the engines stay usable."""
        self.ckpt.release()
