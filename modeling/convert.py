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
import re
from pathlib import Path

import torch

from .checkpoint import VAVAE_PREFIXES, dit_state_dict, vavae_state_dict


def file_sha256(path, chunk=1 << 24):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


def read_checkpoint(path):
    """A checkpoint file as a dict, read safely (safetensors, or torch.load with weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    from .safe_load import safe_torch_load
    obj = safe_torch_load(path, "checkpoint")  # weights_only=True; one-line errors naming the file
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    return obj


def detect_kind(ckpt):
    """'lightningdit', 'vavae' or 'stats' from a checkpoint dict's keys."""
    if "ema" in ckpt or "model" in ckpt:
        return "lightningdit"
    if "mean" in ckpt and "std" in ckpt:
        return "stats"
    sd = ckpt.get("state_dict", ckpt)
    if isinstance(sd, dict):
        keys = [k.removeprefix("module.") for k in sd]
        if any(k.startswith("x_embedder.") for k in keys):
            return "lightningdit"
        if any(k.startswith(VAVAE_PREFIXES) for k in keys):
            return "vavae"
    raise ValueError(f"cannot tell what this checkpoint holds (top-level keys: {sorted(ckpt)[:12]})")


# ----------------------------------------------------------------------------- architecture from weights

def _block_indices(sd, prefix):
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in sd for m in [pat.match(k)] if m})


def _need(sd, key, what):
    if key not in sd:
        raise ValueError(f"{what}: key {key!r} missing; cannot infer the architecture")
    return sd[key]


def infer_dit_config(sd, num_heads=None):
    """LightningDiT constructor arguments from a state dict (EMA keys, no `module.`)."""
    from .lightningdit import LIGHTNINGDIT_SIZES
    what = "LightningDiT weights"
    w = _need(sd, "x_embedder.proj.weight", what)
    hidden, in_ch, p = w.shape[0], w.shape[1], w.shape[2]
    tokens = _need(sd, "pos_embed", what).shape[1]
    grid = int(round(tokens ** 0.5))
    depth = len(_block_indices(sd, "blocks."))
    rows = _need(sd, "y_embedder.embedding_table.weight", what).shape[0]
    swiglu = "blocks.0.mlp.w12.weight" in sd
    if swiglu:
        h2 = sd["blocks.0.mlp.w12.weight"].shape[0] // 2
        mlp_ratio = next((r for r in (4.0, 2.0, 3.0, 8.0) if int(2 / 3 * int(hidden * r)) == h2), 3 * h2 / (2 * hidden))
    else:
        mlp_ratio = _need(sd, "blocks.0.mlp.fc1.weight", what).shape[0] / hidden
    out = _need(sd, "final_layer.linear.weight", what).shape[0] // (p * p)
    cfg = dict(input_size=grid * p, patch_size=p, in_channels=in_ch, hidden_size=hidden, depth=depth,
               mlp_ratio=float(mlp_ratio), class_dropout_prob=0.1, num_classes=rows - 1, learn_sigma=out == 2 * in_ch,
               use_qknorm="blocks.0.attn.q_norm.weight" in sd, use_swiglu=swiglu,
               use_rope="feat_rope.freqs_cos" in sd, use_rmsnorm="blocks.0.norm1.weight" in sd,
               wo_shift=_need(sd, "blocks.0.adaLN_modulation.1.weight", what).shape[0] == 4 * hidden)
    if num_heads is None and cfg["use_rope"]:
        num_heads = hidden // sd["feat_rope.freqs_cos"].shape[1]  # the tables are (tokens, head_dim)
    if num_heads is None:
        named = [v["num_heads"] for v in LIGHTNINGDIT_SIZES.values()
                 if (v["hidden_size"], v["depth"], v["patch_size"]) == (hidden, depth, p)]
        if not named:
            raise ValueError(f"{what}: no RoPE tables and no standard size with hidden {hidden}, depth {depth}, "
                             f"patch {p}; pass num_heads")
        num_heads = named[0]
    cfg["num_heads"] = int(num_heads)
    return cfg


def dit_size_name(cfg):
    from .lightningdit import LIGHTNINGDIT_SIZES
    for name, v in LIGHTNINGDIT_SIZES.items():
        if all(cfg.get(k) == x for k, x in v.items()):
            return name
    return None


def infer_vavae_config(sd, resolution=256):
    """AutoencoderKL constructor arguments from a tokenizer state dict. `resolution` only names where the
    attention levels are (attn_resolutions is stored relative to it)."""
    what = "VA-VAE weights"
    conv_in = _need(sd, "encoder.conv_in.weight", what)
    ch, in_ch = conv_in.shape[0], conv_in.shape[1]
    levels = _block_indices(sd, "encoder.down.")
    nres = len(_block_indices(sd, "encoder.down.0.block."))
    ch_mult = [sd[f"encoder.down.{i}.block.{nres - 1}.conv2.weight"].shape[0] // ch for i in levels]
    attn = [resolution // 2 ** i for i in levels if f"encoder.down.{i}.attn.0.q.weight" in sd]
    pq = _need(sd, "post_quant_conv.weight", what)
    return dict(ch=ch, ch_mult=ch_mult, num_res_blocks=nres, attn_resolutions=attn, resolution=resolution,
                z_channels=pq.shape[0], embed_dim=pq.shape[1], in_channels=in_ch,
                out_ch=_need(sd, "decoder.conv_out.weight", what).shape[0], dropout=0.0)


# ----------------------------------------------------------------------------- loading released files

def load_released(path, kind=None, weights="ema", **overrides):
    """(model, info) from a released-format file; info = {"kind", "file", "weights", "size", "train_config"}.

    kind: expected 'lightningdit' / 'vavae' (None: whatever the file holds). `overrides` replace inferred
    constructor arguments (e.g. num_heads, or use_checkpoint)."""
    from .checkpoint import load_state_dict_strict
    from .lightningdit import LightningDiT
    from .vavae import AutoencoderKL
    ckpt = read_checkpoint(path)
    found = detect_kind(ckpt)
    if kind is not None and found != kind:
        raise ValueError(f"{path}: holds a {found!r} checkpoint, not a {kind!r} one")
    info = {"kind": found, "file": Path(path).name}
    if found == "lightningdit":
        sd = dit_state_dict(ckpt, weights)
        cfg = {**infer_dit_config(sd, overrides.pop("num_heads", None)), **overrides}
        model = LightningDiT(**cfg)
        load_state_dict_strict(model, sd, f"{path} ({weights})")
        info.update(weights=weights, size=dit_size_name(cfg),
                    train_config=ckpt.get("config") if isinstance(ckpt.get("config"), dict) else None)
    elif found == "vavae":
        sd = vavae_state_dict(ckpt)
        cfg = {**infer_vavae_config(sd, overrides.pop("resolution", 256)), **overrides}
        model = AutoencoderKL(**cfg)
        load_state_dict_strict(model, sd, str(path))
    else:
        raise ValueError(f"{path}: holds latent statistics, not a model (use modeling.hub.load_latent_stats)")
    return model.eval(), info


def load_model(src, kind, weights="ema", device="cpu", **overrides):
    """A model from our folder, a hub id or a released file, for the CLIs (kind: 'lightningdit' / 'vavae')."""
    from .hub import class_for_kind
    return class_for_kind(kind).from_pretrained(src, weights=weights, device=device, **overrides)


# ----------------------------------------------------------------------------- conversion

def convert(src, out, kind=None, weights="ema", latent_stats=None, preset="auto", **overrides):
    """Convert one released file into our format. Returns the output path.

    DiT / tokenizer -> folder `out` (model.safetensors, config.json, README.md); latent statistics ->
    `out` as a .safetensors file (or out/latents_stats.safetensors when `out` is a folder)."""
    from .hub import STATS_NAME, load_latent_stats, save_latent_stats
    from .sampling import SAMPLING_PRESETS, preset_for_name
    src, out = Path(src), Path(out)
    ckpt = read_checkpoint(src)
    found = detect_kind(ckpt)
    del ckpt
    if kind is not None and kind != found:
        raise ValueError(f"{src}: holds a {found!r} checkpoint, not a {kind!r} one")
    source = {"file": src.name, "sha256": file_sha256(src)}
    if found == "stats":
        st = load_latent_stats(src)
        target = out / STATS_NAME if out.is_dir() or out.suffix != ".safetensors" else out
        return save_latent_stats(target, st["mean"], st["std"])
    model, info = load_released(src, kind=found, weights=weights, **overrides)
    sampling, training = None, info.get("train_config")
    if found == "lightningdit":
        source["weights"] = weights
        name = preset_for_name(src.name) if preset == "auto" else (None if preset in (None, "none") else preset)
        if name is not None:
            if name not in SAMPLING_PRESETS:
                raise ValueError(f"unknown preset {name!r}; known: {sorted(SAMPLING_PRESETS)}")
            sampling = {"preset": name, **SAMPLING_PRESETS[name]["settings"]}
            training = training or SAMPLING_PRESETS[name]["training_config"]
        if info.get("size"):
            source["size"] = info["size"]
    training = training or f"not recorded in {src.name} (converted from a released-format checkpoint)"
    model.save_pretrained(out, training_config=training, source=source, sampling=sampling)
    if latent_stats is not None:
        st = load_latent_stats(latent_stats)
        save_latent_stats(out / STATS_NAME, st["mean"], st["std"])
    return out


def main(argv=None):
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
    a = p.parse_args(argv)
    kind = None if a.kind is None else a.kind
    extra = {"num_heads": a.num_heads} if a.num_heads else {}
    try:
        out = convert(a.src, a.out, kind=kind, weights=a.weights, latent_stats=a.latent_stats, preset=a.preset,
                      **extra)
    except (FileNotFoundError, ValueError, RuntimeError) as e:  # RuntimeError: CheckpointMismatchError
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
