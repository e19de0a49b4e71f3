"""Sample a labelled grid from a LightningDiT (our folder, a hub id, or a released .pt) and a VA-VAE tokenizer.

    python -m modeling.sample_images --dit lightningdit-xl-imagenet256-800ep.pt \
        --vae vavae-imagenet256-f16d32-dinov2.pt --stats latents_stats.pt --labels 207 360 387 974 --out samples.png

A released file named as the authors' (or a folder converted from one by modeling.convert) samples with
the authors' settings for it (Euler, 250 points, shift 0.3, their cfg scale and interval, guidance on
latent channels 0..2); --preset names them explicitly, and any flag given overrides them. The DiT
produces normalised latents; they are mapped back with the per-channel statistics
(z = x * std / multiplier + mean) before decoding, as the reference does.
"""
import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from .checkpoint import CheckpointMismatchError
from .hub import STATS_NAME, hub_download, local_kind, model_folder, stored_metadata
from .hub import load_latent_stats as _read_stats
from .lightningdit import LightningDiT, LightningDiTConfig
from .sampling import DEMO_LABELS, Sampler, SamplerUnavailable, SamplingConfig, decode_images, on_device
from .vavae import AutoencoderKL
from .config import console_entry

PathOrId = Union[str, os.PathLike]  # a file, a folder, or a hub repo id


def load_dit(path: PathOrId, size: Optional[str] = None, input_size: int = 16, in_channels: int = 32,
             num_classes: int = 1000, weights: str = "ema", **flags: Any) -> LightningDiT:
    """Our folder, a hub id, or a released checkpoint file (its architecture is read from the weights; a
    given `size` is checked against them)."""
    model = LightningDiT.from_pretrained(path, weights=weights, **flags)
    if size is not None and Path(str(path)).is_file():
        want = LightningDiTConfig.from_size(size, input_size=input_size, in_channels=in_channels,
                                            num_classes=num_classes, **flags).to_dict()
        got = model.config.to_dict()
        diff = {k: (want[k], got[k]) for k in want if want[k] != got[k] and k != "use_checkpoint"}
        if diff:
            raise CheckpointMismatchError(f"{path} is not a {size} model with input_size {input_size}, "
                                          f"{in_channels} channels, {num_classes} classes: (asked, file) {diff}")
    return model


def load_vae(path: PathOrId, **config: Any) -> AutoencoderKL:
    """Our folder, a hub id, or a tokenizer checkpoint ({"state_dict"}; architecture read from the weights)."""
    return AutoencoderKL.from_pretrained(path, **config)


def load_latent_stats(path: Optional[PathOrId], channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std), each (1, C, 1, 1): latents_stats.safetensors / .pt, or a folder holding the former;
    None gives unnormalised latents (zeros / ones). Statistics no sample can be mapped back with (NaN / inf,
    std <= 0) are refused, naming the file."""
    if path is None:
        return torch.zeros(1, channels, 1, 1), torch.ones(1, channels, 1, 1)
    st = _read_stats(path)
    mean, std = st["mean"], st["std"]
    if mean.shape[1] != channels:
        raise ValueError(f"latent stats {path} have {mean.shape[1]} channels, the DiT has {channels}")
    check_latent_stats(mean, std, path)
    return mean, std


def check_latent_stats(mean: torch.Tensor, std: torch.Tensor, source: Union[str, os.PathLike]) -> None:
    """ValueError naming `source` (a file) for statistics that would turn every sample into NaN or one flat
    image: a non-finite mean or std, or a std that is not > 0 (latents = x * std / multiplier + mean)."""
    for name, t in (("mean", mean), ("std", std)):
        bad = (~torch.isfinite(t.float())).flatten().nonzero().flatten()
        if len(bad):
            raise ValueError(f"latent stats {source}: {name} has {len(bad)} non-finite value(s) (channel(s) "
                             f"{bad[:8].tolist()}{' ...' if len(bad) > 8 else ''})")
    bad = (std.float() <= 0).flatten().nonzero().flatten()
    if len(bad):
        raise ValueError(f"latent stats {source}: std must be > 0 in every channel; channel(s) {bad[:8].tolist()} "
                         f"have {std.flatten()[bad[:8]].tolist()}")


def check_pairing(channels: int, vae: AutoencoderKL, stats: Optional[dict] = None,
                  sources: Optional[dict] = None) -> None:
    """ValueError naming the files where the DiT's latent `channels` are not the tokenizer's or the statistics'
    (a 16-channel tokenizer for a 32-channel DiT): checked before sampling, where the decode failed with a
    traceback after the first batch (a review, 2026-12-05). `sources`: {"dit", "vae", "latent_stats"}: how the
    message names each (files for the commands, config keys for the trainer)."""
    src = {"dit": "the DiT", "vae": "the VA-VAE", "latent_stats": "the latent statistics", **(sources or {})}
    if vae.config.embed_dim != channels:
        raise ValueError(f"{src['vae']}: a tokenizer of {vae.config.embed_dim} latent channels; {src['dit']} has "
                         f"{channels}")
    if stats is not None and stats["mean"].numel() != channels:
        raise ValueError(f"{src['latent_stats']}: statistics of {stats['mean'].numel()} channels; {src['dit']} "
                         f"has {channels}")


def check_latent_multiplier(value: float, name: str = "latent_multiplier") -> float:
    """The trainer's data.latent_multiplier must be a finite number > 0 (samples are divided by it)."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0 (the trainer's data.latent_multiplier), got {value}")
    return float(value)


def default_stats_path(dit_src: PathOrId) -> Optional[Path]:
    """latents_stats.safetensors stored beside a converted DiT (modeling.convert --latent-stats), in its folder
    or its Hub repo (fetched into the cache then), or None."""
    folder = model_folder(dit_src)
    if folder is None:
        return None
    if not (folder / STATS_NAME).is_file() and local_kind(str(dit_src)) is None:  # a Hub repo: only what was fetched
        try:
            return Path(hub_download(str(dit_src), STATS_NAME))
        except FileNotFoundError:
            return None
    return folder / STATS_NAME if (folder / STATS_NAME).is_file() else None


def latent_stats_source(dit_src: PathOrId, given: Optional[PathOrId], stored_sampling: Optional[dict],
                        flag: str) -> Optional[PathOrId]:
    """The latent statistics to sample with: `given` (the command's flag), else those stored beside a converted
    DiT, else None (unnormalised latents). The authors' DiT (its sampling preset known: a released file, its Hub
    repo or a folder converted from it) samples normalised latents: without statistics it would draw 50k wrong
    images for hours, so that is refused, naming the flag and their file."""
    stats = given if given is not None else default_stats_path(dit_src)
    if stats is None and (stored_sampling or {}).get("preset"):
        raise ValueError(f"{dit_src}: the authors' DiT ({stored_sampling['preset']}) samples latents normalised by "
                         f"their statistics; pass {flag} latents_stats.pt (in hustvl/vavae-imagenet256-f16d32-dinov2: "
                         f"{flag} hustvl/vavae-imagenet256-f16d32-dinov2 takes it from the Hub)")
    return stats


@torch.no_grad()
def generate(dit: LightningDiT, vae: AutoencoderKL, labels: Sequence[int], mean: torch.Tensor, std: torch.Tensor,
             config: Optional[SamplingConfig] = None, *, seed: int = 0, latent_multiplier: float = 1.0,
             device: Union[str, torch.device] = "cpu", progress: bool = False, return_sampler: bool = False,
             sources: Optional[dict] = None, **options: Any) -> Union[torch.Tensor, tuple[torch.Tensor, Sampler]]:
    """uint8 images (B, H, W, 3) for class `labels`, through the Sampler that evaluation.generate uses.

    config: the SamplingConfig (default: SamplingConfig()); options: SamplingConfig fields over it, e.g.
    generate(dit, vae, [1, 2], mean, std, steps=4, cfg_scale=2.0). sources: {"dit", "vae", "latent_stats"}: the
    names a mismatch of latent channels gives (check_pairing)."""
    config = (config or SamplingConfig()).replace(**options)
    bad = [int(v) for v in labels if not 0 <= int(v) < dit.num_classes]
    if bad:
        raise ValueError(f"labels {bad} are outside 0..{dit.num_classes - 1} (index {dit.num_classes} is the "
                         "null class used by guidance, not a class)")
    check_latent_multiplier(latent_multiplier)
    check_latent_stats(mean, std, "given")
    check_pairing(dit.in_channels, vae, {"mean": mean, "std": std}, sources)
    dit, vae = dit.to(device).eval(), vae.to(device).eval()
    y = torch.as_tensor(labels, dtype=torch.long, device=device)
    c, s = dit.in_channels, dit.config.input_size
    g = torch.Generator(device=device).manual_seed(seed)
    z = torch.randn(len(y), c, s, s, generator=g, device=device)
    sampler = Sampler(dit, config, device=device)
    x = sampler(z, y, generator=g, progress=progress)
    latents = x * std.to(device) / latent_multiplier + mean.to(device)
    with on_device(device):  # our kernels on `device`, whatever device is current
        images = decode_images(vae, latents, config.precision)
    return (images, sampler) if return_sampler else images


def save_grid(images: torch.Tensor, path: Union[str, os.PathLike],
              ncol: Optional[int] = None) -> Union[str, os.PathLike]:
    """Write uint8 images (N, H, W, 3) as one grid image (ncol columns; default about square); returns path."""
    from PIL import Image
    imgs = images.cpu().numpy()
    n, h, w, _ = imgs.shape
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    grid = np.zeros((nrow * h, ncol * w, 3), dtype=np.uint8)
    for i, im in enumerate(imgs):
        r, c = divmod(i, ncol)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = im
    Path(path).parent.mkdir(parents=True, exist_ok=True)  # (checked writable before sampling: check_output_path)
    Image.fromarray(grid).save(path)
    return path


MAX_SEED = 2 ** 64 - 1  # torch.Generator.manual_seed's range


def main(argv: Optional[list[str]] = None) -> None:
    from .config import check_output_path, cli_parser, user_errors
    from .sampling import add_sampling_args, check_device, config_from_args, exact_fp32

    ap = cli_parser("modeling.sample_images", __doc__)
    ap.add_argument("--dit", required=True, help="our folder, a hub repo id, or a released .pt")
    ap.add_argument("--size", default=None, help="optional check for a released file, e.g. XL/1 (the architecture "
                                                 "is read from the weights)")
    ap.add_argument("--input-size", type=int, default=16, help="with --size: the expected latent side")
    ap.add_argument("--in-channels", type=int, default=32, help="with --size: the expected latent channels")
    ap.add_argument("--num-classes", type=int, default=1000, help="with --size: the expected class count")
    ap.add_argument("--weights", choices=["ema", "model"], default="ema", help="which weights of a released DiT")
    ap.add_argument("--vae", required=True, help="our folder, a hub repo id, or a tokenizer .pt ({'state_dict'})")
    ap.add_argument("--stats", default=None, help="latents_stats .pt / .safetensors (default: the one stored beside "
                                                  "a converted DiT or an exported pretrained_ema, else none: "
                                                  "unnormalised latents)")
    ap.add_argument("--latent-multiplier", type=float, default=1.0, help="the trainer's data.latent_multiplier")
    ap.add_argument("--labels", type=int, nargs="+", default=None,
                    help="the classes to sample, one image each (with --preset demo: default the authors' demo "
                         f"labels {' '.join(map(str, DEMO_LABELS))}, in their 2 x 4 grid)")
    add_sampling_args(ap)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--out", default="samples.png", help="the grid image (its extension names the format)")
    ap.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    a = ap.parse_args(argv)
    ncol = None
    if a.labels is None and a.preset == "demo":
        a.labels, ncol = list(DEMO_LABELS), 4  # inference.py --demo: 2 x 4
    # a bad file or value: one line naming it, exit 2 -- the cheap checks first, all before sampling
    with user_errors(a.debug, extra=(ValueError, CheckpointMismatchError, SamplerUnavailable),
                     out_of_memory=f"fewer --labels at once (now {len(a.labels or [])}: one batch)"):
        if a.labels is None:
            raise ValueError("--labels: give the classes to sample (or --preset demo for the authors' demo labels)")
        device = check_device(a.device)
        if device.type == "cuda":  # the GPU asked for current for the whole run (our kernels use the current one)
            torch.cuda.set_device(device)
        if not 0 <= a.seed <= MAX_SEED:
            raise ValueError(f"--seed {a.seed}: must be in 0..{MAX_SEED} (torch.Generator's range)")
        check_latent_multiplier(a.latent_multiplier, "--latent-multiplier")
        _check_image_path(a.out, check_output_path)
        stored_sampling = stored_metadata(a.dit).get("sampling")
        config, sources = config_from_args(a, stored_sampling, stored_from=a.dit)
        exact_fp32(config, device)  # --precision fp32 on a GPU: no TF32 in its convolutions either
        dit = load_dit(a.dit, a.size, a.input_size, a.in_channels, a.num_classes, a.weights)
        vae = load_vae(a.vae)
        stats = latent_stats_source(a.dit, a.stats, stored_sampling, "--stats")
        mean, std = load_latent_stats(stats, dit.in_channels)
        images, sampler = generate(dit, vae, a.labels, mean, std, config, seed=a.seed,
                                   latent_multiplier=a.latent_multiplier, device=device,
                                   progress=not a.no_progress, return_sampler=True,
                                   sources={"dit": a.dit, "vae": a.vae, "latent_stats": str(stats)})
        save_grid(images, a.out, ncol)
    d, settings = sampler.describe(), config.settings()
    print(f"wrote {a.out} ({len(a.labels)} images; " + ", ".join(
        f"{k}={settings[k]} ({sources[k]})" for k in settings) + f"; {d['precision']}, compile={d['compile']}, "
        f"CUDA graphs {d['cudagraphs']}, latent stats {stats or 'none'})")


def _check_image_path(path, check_output_path) -> None:
    """--out: a writable place and an image format PIL knows (else the grid would fail after sampling)."""
    from PIL import Image
    check_output_path(path, "--out")
    ext = Path(path).suffix.lower()
    if ext not in Image.registered_extensions():
        raise ValueError(f"--out {path}: {ext or 'no extension'} is not an image format PIL writes (e.g. .png, .jpg)")


cli = console_entry(__name__)  # the `vavae-sample` console script (setup.py)

if __name__ == "__main__":
    main()
