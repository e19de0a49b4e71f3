"""Released checkpoints -> our hub format (model.safetensors + config.json + model card), and back-compat readers.

    python -m modeling.convert lightningdit-xl-imagenet256-800ep.pt out/dit-800ep --latent-stats latents_stats.pt
    python -m modeling.convert vavae-imagenet256-f16d32-dinov2.pt out/vavae
    python -m modeling.convert latents_stats.pt out/latents_stats.safetensors

What a file holds is read from its contents (a DiT {"ema", "model"}, a tokenizer {"state_dict"}, latent
statistics {"mean", "std"}, or a bare state dict); the architecture is read from the weights' shapes
(RoPE tables give the head count), so no size has to be named. Files are read with
torch.load(weights_only=True): nothing but tensors and plain containers is unpickled.

A DiT whose file name is a released checkpoint's (see modeling.sampling.SAMPLING_PRESETS) gets the
authors' sampling settings for it in config.json ("sampling"), which sample_images and evaluation.generate
use unless told otherwise; --preset names one explicitly, --preset none stores none.
"""
import argparse
import hashlib
import os
import sys
from pathlib import Path
from typing import Any

import torch

from .checkpoint import class_for_kind
from .hub import CONFIG_NAME, STATS_NAME, load_latent_stats, read_config, save_latent_stats
from .released import (CheckpointMismatchError, build_released, detect_kind, dit_size_name,  # noqa: F401
                       infer_dit_config, infer_vavae_config, read_checkpoint)  # (re-exported: public helpers)
from .safe_load import CheckpointLoadError, require_file
from .sampling import PRESET_ALIASES, SAMPLING_PRESETS, preset_for_name


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(require_file(path), "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


# ----------------------------------------------------------------------------- loading released files

def load_released(path: str | os.PathLike, kind: str | None = None, weights: str = "ema",
                  **overrides: Any) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(model, info) from a released-format file; info = {"kind", "file", "weights", "size", "train_config"}.

    kind: expected 'lightningdit' / 'vavae' (None: whatever the file holds). `overrides` replace inferred
    constructor arguments (e.g. num_heads, or use_checkpoint)."""
    ckpt = read_checkpoint(path)
    found = detect_kind(ckpt, str(path))
    if kind is not None and found != kind:
        raise CheckpointMismatchError(f"{path}: holds a {found!r} checkpoint, not a {kind!r} one")
    if found == "stats":
        raise CheckpointMismatchError(f"{path}: holds latent statistics, not a model (use "
                                      "modeling.hub.load_latent_stats)")
    return build_released(class_for_kind(found), found, path, weights, ckpt=ckpt, **overrides)


def load_model(src: str | os.PathLike, kind: str, weights: str = "ema", device: str | torch.device = "cpu",
               **overrides: Any) -> torch.nn.Module:
    """A model from our folder, a hub id or a released file, for the CLIs (kind: 'lightningdit' / 'vavae')."""
    return class_for_kind(kind).from_pretrained(src, weights=weights, device=device, **overrides)


# ----------------------------------------------------------------------------- conversion

def convert(src: str | os.PathLike, out: str | os.PathLike, kind: str | None = None, weights: str = "ema",
            latent_stats: str | os.PathLike | None = None, preset: str | None = "auto", **overrides: Any) -> Path:
    """Convert one released file into our format. Returns the output path.

    DiT / tokenizer -> folder `out` (model.safetensors, config.json, README.md); latent statistics ->
    `out` as a .safetensors file (or out/latents_stats.safetensors when `out` is a folder)."""
    src, out = Path(src), Path(out)
    if out.exists() and not out.is_dir() and out.suffix != ".safetensors":
        raise FileExistsError(f"{out}: a file is there (a model is written as a folder)")
    ckpt = read_checkpoint(src)
    found = detect_kind(ckpt, str(src))
    del ckpt
    if kind is not None and kind != found:
        raise CheckpointMismatchError(f"{src}: holds a {found!r} checkpoint, not a {kind!r} one")
    source = {"file": src.name, "sha256": file_sha256(src)}
    if found == "stats":
        st = load_latent_stats(src)
        target = out / STATS_NAME if out.is_dir() or out.suffix != ".safetensors" else out
        if target.exists():
            beside = " (a model's: convert its DiT again with --latent-stats to replace them)" if out.is_dir() else ""
            raise FileExistsError(f"{target}: latent statistics are already there{beside}; write into a new file "
                                  "(or delete that one first)")
        return save_latent_stats(target, st["mean"], st["std"])
    others = sorted(p.name for p in out.iterdir() if p.name != STATS_NAME) if out.is_dir() else []
    if others and not (out / CONFIG_NAME).is_file():  # (statistics converted into it first are its own)
        first = others[0]
        raise FileExistsError(f"{out}: holds other files ({first}, ...), not a converted model; convert into a new "
                              "or empty folder")
    if (out / CONFIG_NAME).is_file():  # another model there: replaced, its statistics would stay beside this one
        there = read_config(out).get("source") or {}
        if there.get("sha256") != source["sha256"]:
            raise FileExistsError(f"{out}: holds a model converted from {there.get('file', 'another file')}; "
                                  "convert into a new folder")
    # the statistics read before anything is written: a missing file left a complete-looking model without them
    stats = load_latent_stats(latent_stats) if latent_stats is not None else None
    model, info = load_released(src, kind=found, weights=weights, **overrides)
    sampling, training = None, info.get("train_config")
    if found == "lightningdit":
        source["weights"] = weights
        name = preset_for_name(src.name) if preset == "auto" else (None if preset in (None, "none") else preset)
        name = PRESET_ALIASES.get(name, name)  # 800ep / 64ep, as sample_images and generate take them
        if name is not None:
            if name not in SAMPLING_PRESETS:
                raise ValueError(f"unknown preset {name!r}; known: {sorted(SAMPLING_PRESETS) + sorted(PRESET_ALIASES)}")
            sampling = {"preset": name, **SAMPLING_PRESETS[name]["settings"]}
            training = training or SAMPLING_PRESETS[name]["training_config"]
        if info.get("size"):
            source["size"] = info["size"]
    training = training or f"not recorded in {src.name} (converted from a released-format checkpoint)"
    model.save_pretrained(out, training_config=training, source=source, sampling=sampling)
    if stats is not None:
        save_latent_stats(out / STATS_NAME, stats["mean"], stats["std"])
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m modeling.convert", description=__doc__,
                                formatter_class=type("F", (argparse.RawDescriptionHelpFormatter,
                                                           argparse.ArgumentDefaultsHelpFormatter), {}))
    p.add_argument("src", help="released .pt (DiT, tokenizer or latents_stats.pt) or a state-dict .safetensors")
    p.add_argument("out", help="output folder (models) or .safetensors file (latent statistics)")
    p.add_argument("--kind", choices=["lightningdit", "vavae", "stats"], default=None,
                   help="refuse anything else (default: read from the file)")
    p.add_argument("--weights", choices=["ema", "model"], default="ema", help="which weights of a DiT checkpoint")
    p.add_argument("--latent-stats", default=None,
                   help="latents_stats.pt to store beside a DiT as latents_stats.safetensors")
    p.add_argument("--preset", default="auto",
                   help="sampling preset stored with a DiT: auto (by file name), none, or a preset name")
    p.add_argument("--num-heads", type=int, default=None, help="only for DiT weights without RoPE tables")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    a = p.parse_args(argv)
    if a.num_heads is not None and a.num_heads <= 0:
        p.error(f"--num-heads must be > 0, got {a.num_heads}")
    extra = {"num_heads": a.num_heads} if a.num_heads else {}
    try:
        out = convert(a.src, a.out, kind=a.kind, weights=a.weights, latent_stats=a.latent_stats, preset=a.preset,
                      **extra)
    except (OSError, CheckpointLoadError, CheckpointMismatchError, ValueError) as e:
        # a file that is missing, unsafe, corrupt or not what was asked for, an output that cannot be written
        # (a read-only or missing folder, a file in the way): the user's input, exit 2
        if a.debug or os.environ.get("VAVAE_DEBUG") == "1":
            raise
        from .config import one_line
        print(f"error: {one_line(e)}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {out}")
    kept = Path(out) / STATS_NAME
    if a.latent_stats is None and Path(out).is_dir() and kept.is_file():  # (re-converted into its own folder)
        print(f"kept {kept} from the earlier conversion (--latent-stats replaces it)")


if __name__ == "__main__":
    main()
