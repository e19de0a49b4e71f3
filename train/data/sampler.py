"""Seeded, rank-aware, resumable sample order shared by the latent and image loaders (and the per-sample crop
positions both image backends draw, so the PIL and DALI loaders read the same views)."""
from typing import Any

import numpy as np

VIEWS = ("center", "train")


def crop_params(seed: int, epoch: int, index: int) -> tuple[float, float]:
    """Crop position fractions (u_x, u_y) in [0, 1) for one sample of one epoch (both backends)."""
    u = np.random.Generator(np.random.PCG64([seed, epoch, int(index), 1])).random(2)
    return float(u[0]), float(u[1])


class EpochSampler:
    """Which samples each rank reads, batch by batch, deterministically from (seed, epoch).

    Epoch e is a permutation of all samples (numpy PCG64 seeded with (seed, e)); global batch g is the
    slice [g*B*W, (g+1)*B*W) and rank r takes its B-sized part, so ranks never overlap and a run can
    resume on a different world size at a global-batch boundary. The flip choice of a sample depends
    on its position in the epoch's permutation only. drop_last=False wraps around to fill the last
    global batch (as DistributedSampler pads).
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 drop_last: bool = True, shuffle: bool = True, flip_prob: float = 0.0) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        self.num_samples, self.batch_size = num_samples, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.drop_last, self.shuffle, self.flip_prob = drop_last, shuffle, flip_prob
        self.global_batch = batch_size * world_size
        full, rest = divmod(num_samples, self.global_batch)
        self.batches_per_epoch = full + (0 if drop_last or rest == 0 else 1)
        if self.batches_per_epoch == 0:
            raise ValueError(f"{num_samples} samples < one global batch ({batch_size} x {world_size} ranks)"
                             " with drop_last")

    def epoch_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(indices, flips) of the whole epoch in global order, length batches_per_epoch * B * W."""
        rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
        perm = rng.permutation(self.num_samples) if self.shuffle else np.arange(self.num_samples)
        flips = rng.random(self.num_samples) < self.flip_prob
        need = self.batches_per_epoch * self.global_batch
        if need > self.num_samples:
            perm, flips = np.resize(perm, need), np.resize(flips, need)
        return perm[:need], flips[:need]

    def rank_batch(self, plan: tuple[np.ndarray, np.ndarray], g: int) -> tuple[np.ndarray, np.ndarray]:
        lo = g * self.global_batch + self.rank * self.batch_size
        return plan[0][lo: lo + self.batch_size], plan[1][lo: lo + self.batch_size]


class ResumableLoader:
    """Epoch/position bookkeeping shared by the loaders: each `for batch in loader` runs the rest of the
    current epoch; the position counts batches handed out, so `state_dict()` taken after any batch and
    `load_state_dict()` in a new process continue with exactly the next batch."""

    def __init__(self, sampler: EpochSampler) -> None:
        self.sampler = sampler
        self.epoch, self.batch_in_epoch = 0, 0

    def __len__(self):
        return self.sampler.batches_per_epoch

    def _batches(self, plan, start):
        """Yield this rank's batches start, start+1, ... of the epoch whose plan is given."""
        raise NotImplementedError

    def __iter__(self):
        plan = self.sampler.epoch_plan(self.epoch)
        for g, batch in enumerate(self._batches(plan, self.batch_in_epoch), start=self.batch_in_epoch):
            self.batch_in_epoch = g + 1
            yield batch
        self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        s = self.sampler
        return {"epoch": self.epoch, "samples_in_epoch": self.batch_in_epoch * s.global_batch, "seed": s.seed,
                "num_samples": s.num_samples, "flip_prob": s.flip_prob, "shuffle": s.shuffle,
                "drop_last": s.drop_last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from modeling.config import ConfigError  # a setting changed since the checkpoint: one line (a ValueError)
        s = self.sampler
        for key in ("seed", "num_samples", "flip_prob", "shuffle", "drop_last"):
            if state[key] != getattr(s, key):
                raise ConfigError(f"loader state has {key}={state[key]!r}, this loader {getattr(s, key)!r}: "
                                  "the data order would not continue")
        g, rest = divmod(state["samples_in_epoch"], s.global_batch)
        if rest:
            raise ConfigError(f"saved position {state['samples_in_epoch']} is not a multiple of the global "
                             f"batch {s.global_batch} (batch size x world size changed)")
        self.epoch, self.batch_in_epoch = state["epoch"], g
