"""Sample generation for FID: sharded across ranks, resumable, written to the npz the evaluator reads.

    python -m evaluation.generate lightningdit-xl-imagenet256-800ep.pt vavae-imagenet256-f16d32-dinov2.pt \
        samples.npz --latent-stats latents_stats.pt --num-samples 50000
    torchrun --nproc_per_node 8 -m evaluation.generate DIT VAE samples.npz ...     # RANK / WORLD_SIZE from env

DIT / VAE: our folders, hub repo ids, or the released .pt files (architecture read from the weights). A
released DiT file named as the authors' (or a folder converted from one) samples with the authors'
settings for it unless a flag says otherwise; --preset names them. On CUDA the default is the fast path
(--precision bf16-weights: a bf16 copy of the model; CUDA graphs where the sampler can use them, --cudagraphs
auto; add --compile blocks for torch.compile); --precision fp32
--cudagraphs off is the exact fp32 path (on a GPU with TF32 off: torch leaves cuDNN's on by default).

Sample i of the run always gets the same label (drawn i.i.d. as the authors' inference.py does, or
--class-balanced) and the same noise (seeded by (seed, i)), whatever
the number of ranks, the batch size, or how often the job was restarted. Each rank takes the
indices i = rank, rank + world, ... and writes finished batches as chunk files (atomic rename), so
a killed job resumes where it stopped. The settings (checkpoints and the SHA-256 of their weights,
latent statistics, sampler, steps, cfg, interval, guidance, seed, precision, layout) are written to
OUT.chunks/settings.json; a restart with different settings is refused. Once every chunk exists the
chunks are merged, in index order, into OUT.npz with `arr_0` = uint8 (N, H, W, 3), `arr_1` = labels
(N,) (the ADM format) and `settings` (that JSON).
"""
import argparse
import hashlib
import json
import os
import time
import zipfile
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from evaluation.provenance import environment
from modeling.config import console_entry
from modeling.sampling import TIME_GRID_DTYPE, SamplingConfig

SETTINGS_FILE = "settings.json"


def sample_labels(num_samples: int, num_classes: int, seed: int = 0, class_balanced: bool = False) -> torch.Tensor:
    """Seeded labels: i.i.d. uniform over the classes (the authors' inference.py draws torch.randint), or
    class-balanced: every class equally often (up to one), in a seeded random order."""
    g = torch.Generator().manual_seed(seed)
    if class_balanced:
        labels = torch.arange(num_samples) % num_classes
        return labels[torch.randperm(num_samples, generator=g)]
    return torch.randint(0, num_classes, (num_samples,), generator=g)


SEED_STRIDE = 1_000_003  # sample i's noise generator is seeded with seed * SEED_STRIDE + i


def batch_generator(seed: int, first_index: int, device: Union[str, torch.device]) -> torch.Generator:
    """The generator of a stochastic sampler's noise for the batch whose first sample is `first_index` (the same
    at every call: the training-time evaluation uses it too)."""
    return torch.Generator(device=device).manual_seed(seed * 7919 + first_index)


def sample_noise(indices: Sequence[int], shape: Sequence[int], seed: int = 0) -> torch.Tensor:
    """Noise for the given global sample indices, independent of batching: one generator per sample."""
    out = torch.empty((len(indices), *shape))
    for j, i in enumerate(indices):
        out[j] = torch.randn(shape, generator=torch.Generator().manual_seed(seed * SEED_STRIDE + int(i)))
    return out


def max_seed(num_samples: int) -> int:
    """The largest --seed whose per-sample generator seeds (seed * SEED_STRIDE + index) fit in 64 bits."""
    return (2 ** 64 - 1 - max(int(num_samples), 0)) // SEED_STRIDE


def check_arguments(num_samples: int, batch_size: int, seed: int, latent_multiplier: float, rank: int = 0,
                    world_size: int = 1, cli: bool = False) -> None:
    """ValueError naming the argument (its flag with cli=True) for a value generate cannot run with, before
    anything is loaded or sampled."""
    from modeling.sample_images import check_latent_multiplier

    def name(param: str) -> str:
        return "--" + param.replace("_", "-") if cli else param

    for param, value in (("num_samples", num_samples), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name(param)} must be an integer >= 1, got {value!r}")
    if not isinstance(seed, int) or not 0 <= seed <= max_seed(num_samples):
        raise ValueError(f"{name('seed')} {seed!r}: must be in 0..{max_seed(num_samples)} (sample i's noise generator "
                         f"is seeded with seed * {SEED_STRIDE} + i, which must fit in 64 bits)")
    check_latent_multiplier(latent_multiplier, name("latent_multiplier"))
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"rank {rank!r} / world size {world_size!r}: need 0 <= RANK < WORLD_SIZE")


def check_output(out_npz: Union[str, os.PathLike], flag: str = "out_npz") -> Path:
    """Refuse, before sampling, an output the merge at the end could not write (modeling.config.check_output_path
    for OUT, OUT.tmp.npz and the OUT.chunks folder), and an existing file that is not an unfinished or finished
    run of this command (no OUT.chunks beside it): it would be overwritten."""
    from modeling.config import ConfigError, check_output_path
    out = Path(out_npz)
    check_output_path(out, flag, written=(out.with_suffix(".tmp.npz").name, out.with_suffix(".chunks").name))
    work = out.with_suffix(".chunks")
    if out.exists() and not work.is_dir():
        raise ConfigError(f"{flag} {out}: the file exists and is not this command's output (no {work.name} folder "
                          "beside it); delete it or choose another path")
    if work.exists() and not work.is_dir():
        raise ConfigError(f"{flag} {out}: {work} exists and is not a folder")
    return out


def state_dict_sha256(model: torch.nn.Module) -> str:
    """SHA-256 of a model's weights (names, dtypes, shapes, bytes in key order): the same for the same weights
    whatever file format they came from."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def tensor_sha256(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _chunk_path(work, start):
    return work / f"chunk_{start:08d}.npz"


class SettingsMismatchError(RuntimeError):
    pass


def _comparable(settings):
    """Settings without the "source" entries: a moved or renamed file with the same weights is the same run."""
    if isinstance(settings, dict):
        return {k: _comparable(v) for k, v in settings.items() if k != "source"}
    return settings


def check_settings(work: Union[str, os.PathLike], settings: dict) -> None:
    """Write settings.json on first use; refuse to continue a run whose recorded settings differ (paths may). The
    layout (ranks, batch) alone may change while no chunk exists yet: a first batch too large for the card's memory
    leaves a settings file and nothing else, and the same command with a smaller --batch-size starts afresh."""
    path = Path(work) / SETTINGS_FILE
    if path.is_file():
        try:
            recorded = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            recorded = f"unreadable ({' '.join(str(e).split())})"
        if not isinstance(recorded, dict):
            raise SettingsMismatchError(f"{path}: the settings this output was started with are "
                                        f"{recorded if isinstance(recorded, str) else 'not a JSON object'}; use "
                                        "another output path, or delete the chunks folder to start it afresh")
        old, new = _comparable(recorded), _comparable(settings)
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if diff == ["layout"] and not any(Path(work).glob("chunk_*.npz")):
            diff = []  # nothing generated under the old layout: record the new one below
        elif not diff:
            return
        if diff:
            lines = "; ".join(f"{k}: recorded {old.get(k)!r}, now {settings.get(k)!r}" for k in diff)
            # the labels' default changed on 2026-12-06 (class-balanced -> i.i.d.): a run started before resumes
            # with the flag
            hint = ("; add --class-balanced to continue it" if diff == ["class_balanced"] and old.get(diff[0])
                    else "")
            raise SettingsMismatchError(f"{path}: this output was started with other settings ({lines}); "
                                        f"use another output path or delete the chunks folder{hint}")
    tmp = path.with_name(f"{SETTINGS_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(settings, indent=2, sort_keys=True))
    os.replace(tmp, path)


@torch.no_grad()
def generate(dit: torch.nn.Module, vae: torch.nn.Module, out_npz: Union[str, os.PathLike], num_samples: int,
             latent_stats: Optional[dict] = None, batch_size: int = 32, config: Optional[SamplingConfig] = None, *,
             class_balanced: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1,
             device: Union[str, torch.device] = "cpu", progress: bool = True, latent_multiplier: float = 1.0,
             sources: Optional[dict] = None, **options) -> Optional[Path]:
    """Generate `num_samples` images into out_npz (merged by the rank that finds every chunk present).

    latent_stats: {"mean", "std"} (1, C, 1, 1) of the DiT's normalised latents, or None; the DiT was
    trained on (z - mean) / std * latent_multiplier, so samples are mapped back by the inverse.
    config: the modeling.sampling.SamplingConfig (default: SamplingConfig()): what is sampled and how (precision,
    compile, CUDA graphs: the Sampler the speed benchmark measures); options: its fields over it (steps=3, ...).
    sources: {"dit": "...", "vae": "...", "latent_stats": "..."} (paths or ids, recorded).
    Returns the path of the merged npz, or None while other ranks still have chunks to write.
    Every argument is checked before the first sample (a bad one: ValueError / ConfigError naming it).
    """
    from modeling.progress import progress as progress_bar
    from modeling.sample_images import check_latent_stats, check_pairing
    from modeling.sampling import Sampler, decode_images, on_device, tf32_flags

    config = (config or SamplingConfig()).replace(**options)
    check_arguments(num_samples, batch_size, seed, latent_multiplier, rank, world_size)
    if latent_stats is not None:
        check_latent_stats(latent_stats["mean"], latent_stats["std"], (sources or {}).get("latent_stats") or "given")
    check_pairing(dit.in_channels, vae, latent_stats, {k: v for k, v in (sources or {}).items() if v})
    out_npz = check_output(out_npz)
    work = out_npz.with_suffix(".chunks")
    work.mkdir(parents=True, exist_ok=True)
    dit, vae = dit.eval().to(device), vae.eval().to(device)
    sampler = Sampler(dit, config, device=device, static_batch=batch_size)
    sources = sources or {}
    settings = {
        "dit": {"source": sources.get("dit"), "weights_sha256": state_dict_sha256(dit)},
        "vae": {"source": sources.get("vae"), "weights_sha256": state_dict_sha256(vae)},
        "latent_stats": None if latent_stats is None else {
            "source": sources.get("latent_stats"),
            "sha256": tensor_sha256(latent_stats["mean"], latent_stats["std"])},
        "latent_multiplier": latent_multiplier, "num_samples": num_samples, "class_balanced": class_balanced,
        "seed": seed, "sampler": config.settings(),
        # (chunks from before 2026-12-05 were sampled on a float64 grid, an ulp apart in t: not resumed into)
        "time_grid": str(TIME_GRID_DTYPE).removeprefix("torch."),
        "precision": config.precision if config.precision != "fp8" else "fp8 ({})".format(", ".join(
            [config.fp8_recipe] + (["torchao"] if config.fp8_impl == "torchao" else []))),
        "layout": {"world_size": world_size, "batch_size": batch_size},
    }
    check_settings(work, settings)
    run = {"rank": rank, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "environment": environment(device),
           "tf32": tf32_flags(),
           "device": str(device), "sampler": sampler.describe()}
    with open(work / f"runs_rank{rank:05d}.jsonl", "a") as f:  # execution path per (re)start: recorded, not compared
        f.write(json.dumps(run) + "\n")
    labels = sample_labels(num_samples, dit.num_classes, seed, class_balanced)
    latent_size = dit.x_embedder.grid_size * dit.x_embedder.patch_size[0]
    shape = (dit.in_channels, latent_size, latent_size)
    # Chunks are batches of consecutive indices of this rank's stride: chunk k of rank r holds
    # indices r + world * (k * batch_size + j).
    mine = list(range(rank, num_samples, world_size))
    starts = list(range(0, len(mine), batch_size))
    done = sum(len(mine[s:s + batch_size]) for s in starts if _chunk_path(work, mine[s]).exists())
    # the chunks done before a restart start the bar (initial): counted as updates, they made the rate and eta of
    # a log line (LogProgress: since the start) as if they had been sampled in the first instant
    bar = progress_bar(len(mine), f"sampling (rank {rank})", "img", enabled=progress, initial=done)
    if progress and rank == 0:
        d = sampler.describe()
        bar.write(f"sampler: {d['method']} {d['steps']} points, {d['precision']}, compile={d['compile']}, "
                  f"CUDA graphs {d['cudagraphs']}, batch {batch_size}, device {d['device']}")
    with on_device(device):  # our kernels and the decode on this rank's GPU, whatever device is current
        try:  # closed on an error too: its line ends before the error's
            for s in starts:
                idx = mine[s:s + batch_size]
                path = _chunk_path(work, idx[0])
                if path.exists():  # done before a restart (counted in the bar's start)
                    continue
                gen = batch_generator(seed, idx[0], device)
                z = sample_noise(idx, shape, seed).to(device)
                y = labels[idx].to(device)
                x = sampler(z, y, generator=gen)
                x = x / latent_multiplier
                if latent_stats is not None:
                    x = x * latent_stats["std"].to(x) + latent_stats["mean"].to(x)
                images = decode_images(vae, x, config.precision).cpu().numpy()
                tmp = path.with_suffix(".tmp.npz")
                np.savez(tmp, images=images, labels=y.cpu().numpy(), indices=np.asarray(idx))
                os.replace(tmp, path)
                bar.update(len(idx))
        finally:
            bar.close()
    return merge_chunks(out_npz, num_samples)


def merge_chunks(out_npz: Union[str, os.PathLike], num_samples: int) -> Optional[Path]:
    """Merge chunk files into out_npz if they cover every index; None otherwise. Every rank that finishes calls it:
    coverage is counted from the chunks' indices alone (each rank read every chunk's images first: ~10 GB at 50k
    samples of 256 px, per rank); an out_npz already merged from these chunks is returned as it is (a rerun of a
    finished run); ranks that find the chunks complete together each write a temporary file of their own, the
    last rename wins (one shared name made all but one of 8 ranks fail with FileNotFoundError)."""
    out_npz = Path(out_npz)
    work = out_npz.with_suffix(".chunks")
    chunks = [c for c in sorted(work.glob("chunk_*.npz")) if not c.name.endswith(".tmp.npz")]
    covered = 0
    for c in chunks:
        covered += len(_read_chunk(c, ("indices",))["indices"])
    if covered < num_samples:
        return None
    settings = (work / SETTINGS_FILE).read_text() if (work / SETTINGS_FILE).is_file() else "{}"
    if out_npz.is_file():
        with np.load(out_npz) as z:
            if "settings" in z.files and str(z["settings"]) == settings and len(z["arr_1"]) == num_samples:
                return out_npz
    images = labels = None
    for c in chunks:
        z = _read_chunk(c, ("indices", "images", "labels"))
        if images is None:
            images = np.empty((num_samples, *z["images"].shape[1:]), dtype=np.uint8)
            labels = np.empty(num_samples, dtype=np.int64)
        images[z["indices"]] = z["images"]
        labels[z["indices"]] = z["labels"]
    tmp = out_npz.with_name(f"{out_npz.stem}.tmp{os.getpid()}.npz")
    try:
        np.savez(tmp, arr_0=images, arr_1=labels, settings=np.array(settings))
        os.replace(tmp, out_npz)
    finally:
        tmp.unlink(missing_ok=True)
    return out_npz


def _read_chunk(path: Path, keys: Sequence[str]) -> dict:
    """A chunk's arrays (numeric only); a chunk that is truncated or lacks one is a one-line error naming it (chunks
    are written whole and renamed: such a file is a disk's or a copy's doing)."""
    from modeling.safe_load import CheckpointLoadError, load_npz
    try:
        return load_npz(path, "generated chunk", keys)
    except CheckpointLoadError as e:
        raise SettingsMismatchError(f"{e}; delete it and run the same command again: its samples are drawn again, "
                                    "the same as before") from None


def read_settings(npz_path: Union[str, os.PathLike]) -> Optional[dict]:
    """The generation settings stored in a merged npz (None for an npz without them); a record that is not the JSON
    object generate writes is a one-line error naming the file."""
    from modeling.safe_load import CheckpointLoadError, load_npz

    from .batches import BatchFileError, _open
    with _open(npz_path, "sample batch") as z:  # a .npy, a FIFO, a truncated file: the batch checks' own lines
        if "settings" not in z.files:
            return None
    try:
        text = str(load_npz(npz_path, "sample batch", ("settings",))["settings"])
        settings = json.loads(text)
    except CheckpointLoadError as e:
        raise BatchFileError(str(e)) from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise BatchFileError(f"sample batch {npz_path}: its 'settings' record is unreadable "
                                    f"({' '.join(str(e).split())[:160]})") from None
    if not isinstance(settings, dict):
        raise BatchFileError(f"sample batch {npz_path}: its 'settings' record is not a JSON object")
    return settings


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, str(default))
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name}={text!r}: expected an integer") from None


def main(argv: Optional[list[str]] = None) -> None:
    from modeling import AutoencoderKL, LightningDiT
    from modeling.checkpoint import CheckpointMismatchError
    from modeling.config import cli_parser, user_errors
    from modeling.hub import load_latent_stats, stored_metadata
    from modeling.sample_images import latent_stats_source
    from modeling.sampling import SamplerUnavailable, add_sampling_args, check_device, config_from_args, exact_fp32

    cuda = torch.cuda.is_available()
    p = cli_parser("evaluation.generate", __doc__)
    p.add_argument("dit", help="LightningDiT: our folder, a hub repo id, or a released .pt")
    p.add_argument("vae", help="VA-VAE: our folder, a hub repo id, or a tokenizer .pt")
    p.add_argument("out_npz")
    p.add_argument("--weights", choices=["ema", "model"], default="ema", help="which weights of a released DiT")
    p.add_argument("--latent-stats", default=None,
                   help="latents_stats .pt / .safetensors (default: the one stored beside a converted DiT)")
    p.add_argument("--latent-multiplier", type=float, default=1.0, help="the trainer's data.latent_multiplier")
    p.add_argument("--num-samples", type=int, default=50000)
    p.add_argument("--batch-size", type=int, default=256 if cuda else 16,
                   help="per rank; the Euler step of 2x this batch (guidance) is one CUDA graph")
    add_sampling_args(p, fast_default=cuda)
    labels = p.add_mutually_exclusive_group()
    labels.add_argument("--class-balanced", action="store_true",
                        help="every class equally often (up to one) instead of the authors' i.i.d. labels")
    labels.add_argument("--random-labels", action="store_true", help=argparse.SUPPRESS)  # the default since 2026-12-06
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK where CUDA exists, else cpu")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    a = p.parse_args(argv)
    # a bad value or file: one line naming it, exit 2 -- the cheap checks first, all before the first sample
    # out of GPU memory: a batch too large for the card (it happens at the first batch, before any chunk exists,
    # and check_settings lets the layout change until one does)
    def oom() -> str:  # decided when the error comes: the layout is fixed once a chunk exists (check_settings)
        try:
            work = Path(a.out_npz).with_suffix(".chunks")
            started = any(work.glob("chunk_*.npz"))
        except (OSError, ValueError):  # a path the argument checks name
            started = False
        if not started:
            return f"lower --batch-size (now {a.batch_size}) and run the same command again"
        return (f"free the GPU's memory and run the same command again (--batch-size {a.batch_size} is fixed once "
                f"chunks exist: a smaller one starts over in another output, or after removing {work})")
    with user_errors(a.debug, extra=(ValueError, CheckpointMismatchError, SamplerUnavailable, SettingsMismatchError),
                     out_of_memory=oom):
        rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
        device = check_device(a.device) if a.device else (
            check_device(f"cuda:{_env_int('LOCAL_RANK', 0)}", "LOCAL_RANK") if cuda else torch.device("cpu"))
        if device.type == "cuda":  # this rank's GPU current for the whole run (model loading, FP8 weights, kernels)
            torch.cuda.set_device(device)
        check_arguments(a.num_samples, a.batch_size, a.seed, a.latent_multiplier, rank, world, cli=True)
        check_output(a.out_npz, "out_npz")
        stored_sampling = stored_metadata(a.dit).get("sampling")
        config, sources = config_from_args(a, stored_sampling, stored_from=a.dit)
        exact_fp32(config, device)  # --precision fp32 on a GPU: no TF32 in its convolutions either
        stats_path = latent_stats_source(a.dit, a.latent_stats, stored_sampling, "--latent-stats")
        stats = load_latent_stats(stats_path) if stats_path else None
        if stats is not None:
            from modeling.sample_images import check_latent_stats
            check_latent_stats(stats["mean"], stats["std"], stats_path)
        dit = LightningDiT.from_pretrained(a.dit, weights=a.weights)
        vae = AutoencoderKL.from_pretrained(a.vae)
        if rank == 0:
            settings = config.settings()
            print("settings: " + ", ".join(f"{k}={settings[k]} ({sources[k]})" for k in settings)
                  + f"; latent stats {stats_path or 'none (unnormalised latents)'}")
        out = generate(dit, vae, a.out_npz, a.num_samples, stats, a.batch_size, config,
                       class_balanced=a.class_balanced, seed=a.seed, rank=rank, world_size=world, device=device,
                       latent_multiplier=a.latent_multiplier,
                       sources={"dit": str(a.dit), "vae": str(a.vae),
                                "latent_stats": str(stats_path) if stats_path else None})
    print(f"wrote {out}" if out else f"rank {rank} done; the last rank to finish writes {a.out_npz}")


cli = console_entry(__name__)  # the `vavae-generate` console script (setup.py)

if __name__ == "__main__":
    main()
