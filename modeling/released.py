"""Model weights read without the model classes: the released checkpoint formats, strict loading, and the
architecture read from the weights' shapes.

Released LightningDiT: {"model": {"module.<key>": ...}, "ema": {<key>: ...}} (inference uses "ema").
Released VA-VAE tokenizer: {"state_dict": {...}} with encoder.*, decoder.*, quant_conv.*, post_quant_conv.*
plus training-only entries (linear_proj.*, loss.*, foundation_model.*) that are ignored.
A checkpoint that does not fit the model is refused with every missing, unexpected and mis-shaped key
listed (one line); nothing is loaded in that case.

This module sits below the models in the import order (safe_load -> released -> hub -> lightningdit / vavae
-> checkpoint -> convert): it takes the model class as an argument where it builds one, so the hub mixin
the models inherit can load released files without importing anything above it.
"""
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .safe_load import CheckpointLoadError, load_safetensors, require_file, safe_torch_load

VAVAE_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")

# The LightningDiT sizes (the reference's names without the "LightningDiT-" prefix). Kept here, beside the
# reader that uses them to name a checkpoint's size, and re-exported by modeling.lightningdit.
LIGHTNINGDIT_SIZES = {
    "B/1": dict(depth=12, hidden_size=768, patch_size=1, num_heads=12),
    "B/2": dict(depth=12, hidden_size=768, patch_size=2, num_heads=12),
    "L/2": dict(depth=24, hidden_size=1024, patch_size=2, num_heads=16),
    "XL/1": dict(depth=28, hidden_size=1152, patch_size=1, num_heads=16),
    "XL/2": dict(depth=28, hidden_size=1152, patch_size=2, num_heads=16),
    "1p0B/1": dict(depth=24, hidden_size=1536, patch_size=1, num_heads=24),
    "1p0B/2": dict(depth=24, hidden_size=1536, patch_size=2, num_heads=24),
    "1p6B/1": dict(depth=28, hidden_size=1792, patch_size=1, num_heads=28),
    "1p6B/2": dict(depth=28, hidden_size=1792, patch_size=2, num_heads=28),
}


class CheckpointMismatchError(CheckpointLoadError, RuntimeError):
    """A checkpoint that does not fit the model (keys, shapes, kind); the message is one line. A RuntimeError
    as it always was, and a CheckpointLoadError (ValueError), so every CLI reports it as a bad input file."""


# ----------------------------------------------------------------------------- strict loading

def check_state_dict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor | torch.Size],
                     what: str = "checkpoint") -> None:
    """Raise CheckpointMismatchError (one line) listing every missing, unexpected and mis-shaped key; return
    None when the keys and shapes fit. `state_dict` values may be tensors or bare shapes (torch.Size), and
    `model` may live on the meta device: nothing is read or allocated."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    misshaped = sorted(f"{k}: checkpoint {tuple(_shape(state_dict[k]))} vs model {tuple(expected[k].shape)}"
                       for k in set(expected) & set(state_dict) if tuple(_shape(state_dict[k])) != expected[k].shape)
    if missing or unexpected or misshaped:
        parts = [f"{what} does not fit the model configuration; nothing was loaded:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if items:
                parts.append(f"{len(items)} {title} key(s): " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else "")
                             + ";")
        raise CheckpointMismatchError(" ".join(parts).rstrip(";"))


def load_state_dict_strict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor],
                           what: str = "checkpoint") -> torch.nn.Module:
    check_state_dict(model, state_dict, what)
    model.load_state_dict(state_dict, strict=True)
    return model


def _shape(v):
    return v.shape if hasattr(v, "shape") else v


# ----------------------------------------------------------------------------- the released formats

def read_checkpoint(path_or_dict: str | os.PathLike | dict, what: str = "checkpoint") -> dict:
    """A checkpoint dict from a file -- safetensors (header checked first), or torch.load(weights_only=True):
    never code from the file -- or the dict itself. One-line errors naming the file."""
    if isinstance(path_or_dict, dict):
        return path_or_dict
    path = require_file(path_or_dict, what)
    if path.suffix == ".safetensors":
        return load_safetensors(path, what)
    ckpt = safe_torch_load(path, what)
    if not isinstance(ckpt, dict):
        raise CheckpointMismatchError(f"{what} {path} holds a {type(ckpt).__name__}, not a dict of tensors")
    return ckpt


def dit_state_dict(ckpt: dict, weights: str = "ema", what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Extract the DiT weights from a released-format dict ("ema" or "model"), or accept a bare state dict. `what`
    names the file in errors."""
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    if "ema" in ckpt or "model" in ckpt:
        if weights not in ckpt:
            raise CheckpointMismatchError(f"{what} has no {weights!r} entry (has: {sorted(map(str, ckpt))[:10]})")
        sd = ckpt[weights]
    else:
        sd = ckpt
    if not isinstance(sd, dict):
        raise CheckpointMismatchError(f"{what}: entry {weights!r} is a {type(sd).__name__}, not a state dict")
    bad = next((k for k in sd if not isinstance(k, str)), None)
    if bad is not None:
        raise CheckpointMismatchError(f"{what}: entry {weights!r} has the key {bad!r} ({type(bad).__name__}); "
                                      "a state dict's keys are parameter names")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def vavae_state_dict(ckpt: dict) -> dict[str, torch.Tensor]:
    sd = ckpt.get("state_dict", ckpt)
    if not isinstance(sd, dict):
        raise CheckpointMismatchError(f"checkpoint entry 'state_dict' is a {type(sd).__name__}, not a state dict")
    return {k: v for k, v in sd.items() if isinstance(k, str) and k.startswith(VAVAE_PREFIXES)}


def detect_kind(ckpt: dict, what: str = "checkpoint") -> str:
    """'lightningdit', 'vavae' or 'stats' from a checkpoint dict's keys."""
    if "ema" in ckpt or "model" in ckpt:
        return "lightningdit"
    if "mean" in ckpt and "std" in ckpt:
        return "stats"
    sd = ckpt.get("state_dict", ckpt)
    if isinstance(sd, dict):
        keys = [str(k).removeprefix("module.") for k in sd]
        if any(k.startswith("x_embedder.") for k in keys):
            return "lightningdit"
        if any(k.startswith(VAVAE_PREFIXES) for k in keys):
            return "vavae"
    raise CheckpointMismatchError(f"cannot tell what {what} holds (top-level keys: {sorted(map(str, ckpt))[:12]})")


# ----------------------------------------------------------------------------- architecture from weights

def _block_indices(sd, prefix):
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in sd for m in [pat.match(k)] if m})


def _need(sd, key, what, ndim):
    """The shape of `sd[key]`, which must have `ndim` dimensions, none of them 0 (the sizes are divided by)."""
    if key not in sd:
        raise CheckpointMismatchError(f"{what}: key {key!r} missing; cannot infer the architecture")
    value = sd[key]
    if not isinstance(value, (torch.Tensor, torch.Size, tuple, list)):
        raise CheckpointMismatchError(f"{what}: {key!r} holds a {type(value).__name__}, not a tensor")
    shape = tuple(_shape(value))
    if len(shape) != ndim:
        raise CheckpointMismatchError(f"{what}: {key!r} has shape {shape}, expected {ndim} dimensions")
    if not all(isinstance(d, int) and d > 0 for d in shape):
        raise CheckpointMismatchError(f"{what}: {key!r} has shape {shape}; every dimension must be > 0")
    return shape


def infer_dit_config(sd: Mapping[str, torch.Tensor | torch.Size], num_heads: int | None = None,
                     what: str = "LightningDiT weights") -> dict[str, Any]:
    """LightningDiT constructor arguments from a state dict (EMA keys, no `module.`); values may be tensors
    or bare shapes."""
    hidden, in_ch, p, _ = _need(sd, "x_embedder.proj.weight", what, 4)
    tokens = _need(sd, "pos_embed", what, 3)[1]
    grid = int(round(tokens ** 0.5))
    depth = len(_block_indices(sd, "blocks."))
    rows = _need(sd, "y_embedder.embedding_table.weight", what, 2)[0]
    swiglu = "blocks.0.mlp.w12.weight" in sd
    if swiglu:
        h2 = _need(sd, "blocks.0.mlp.w12.weight", what, 2)[0] // 2
        mlp_ratio = next((r for r in (4.0, 2.0, 3.0, 8.0) if int(2 / 3 * int(hidden * r)) == h2), 3 * h2 / (2 * hidden))
    else:
        mlp_ratio = _need(sd, "blocks.0.mlp.fc1.weight", what, 2)[0] / hidden
    out = _need(sd, "final_layer.linear.weight", what, 2)[0] // (p * p)
    cfg = dict(input_size=grid * p, patch_size=p, in_channels=in_ch, hidden_size=hidden, depth=depth,
               mlp_ratio=float(mlp_ratio), class_dropout_prob=0.1, num_classes=rows - 1, learn_sigma=out == 2 * in_ch,
               use_qknorm="blocks.0.attn.q_norm.weight" in sd, use_swiglu=swiglu,
               use_rope="feat_rope.freqs_cos" in sd, use_rmsnorm="blocks.0.norm1.weight" in sd,
               wo_shift=_need(sd, "blocks.0.adaLN_modulation.1.weight", what, 2)[0] == 4 * hidden)
    if num_heads is None and cfg["use_rope"]:
        head_dim = _need(sd, "feat_rope.freqs_cos", what, 2)[1]  # the tables are (tokens, head_dim)
        if head_dim <= 0 or hidden % head_dim:
            raise CheckpointMismatchError(f"{what}: RoPE tables of head_dim {head_dim} do not divide hidden {hidden}")
        num_heads = hidden // head_dim
    if num_heads is None:
        named = [v["num_heads"] for v in LIGHTNINGDIT_SIZES.values()
                 if (v["hidden_size"], v["depth"], v["patch_size"]) == (hidden, depth, p)]
        if not named:
            raise CheckpointMismatchError(f"{what}: no RoPE tables and no standard size with hidden {hidden}, depth "
                                          f"{depth}, patch {p}; pass num_heads")
        num_heads = named[0]
    cfg["num_heads"] = int(num_heads)
    return cfg


def dit_size_name(cfg: Mapping[str, Any]) -> str | None:
    for name, v in LIGHTNINGDIT_SIZES.items():
        if all(cfg.get(k) == x for k, x in v.items()):
            return name
    return None


def infer_vavae_config(sd: Mapping[str, torch.Tensor | torch.Size], resolution: int = 256,
                       what: str = "VA-VAE weights") -> dict[str, Any]:
    """AutoencoderKL constructor arguments from a tokenizer state dict. `resolution` only names where the
    attention levels are (attn_resolutions is stored relative to it)."""
    ch, in_ch, _, _ = _need(sd, "encoder.conv_in.weight", what, 4)
    levels = _block_indices(sd, "encoder.down.")
    nres = len(_block_indices(sd, "encoder.down.0.block."))
    ch_mult = [_need(sd, f"encoder.down.{i}.block.{nres - 1}.conv2.weight", what, 4)[0] // ch for i in levels]
    attn = [resolution // 2 ** i for i in levels if f"encoder.down.{i}.attn.0.q.weight" in sd]
    z_ch, embed, _, _ = _need(sd, "post_quant_conv.weight", what, 4)
    return dict(ch=ch, ch_mult=ch_mult, num_res_blocks=nres, attn_resolutions=attn, resolution=resolution,
                z_channels=z_ch, embed_dim=embed, in_channels=in_ch,
                out_ch=_need(sd, "decoder.conv_out.weight", what, 4)[0], dropout=0.0)


# ----------------------------------------------------------------------------- building a model

def _nbytes(n):
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def _repeats(kind, arch, shapes):
    """[(setting, value in the config, value in the weights)] for the settings that repeat modules (depth,
    levels, resblocks): checked before even a meta-device model is built, so a config asking for a million
    blocks is refused at once."""
    def count(prefix):
        return len(_block_indices(shapes, prefix))
    if kind == "lightningdit":
        return [("depth", arch.get("depth", 28), count("blocks."))]
    ch_mult = arch.get("ch_mult", (1, 1, 2, 2, 4))
    return [("ch_mult levels", len(ch_mult) if isinstance(ch_mult, (list, tuple)) else ch_mult,
             count("encoder.down.")),
            ("num_res_blocks", arch.get("num_res_blocks", 2), count("encoder.down.0.block."))]


def check_config_fits(cls: type[torch.nn.Module], kind: str, arch: Mapping[str, Any], shapes: Mapping[str, torch.Size],
                      config_path: str | os.PathLike, weights_path: str | os.PathLike) -> torch.nn.Module:
    """Before a model is allocated: the constructor arguments `arch` (read from `config_path`) are valid for
    `cls` and describe exactly the tensors `shapes` ({name: shape}, from `weights_path`'s header). Unknown
    keys, invalid values (num_heads=0, depth=-1, ...), a different size (a 100 TB model for a 1 MB file) are
    refused in one line naming the file and the size; the model is built on the meta device only."""
    import torch
    config_cls = _config_class(cls)
    if config_cls is not None:  # every key known, every value of its type, validate(): ConfigError by key
        from .config import from_dict
        try:
            from_dict(config_cls, dict(arch))
        except (TypeError, ValueError) as e:
            raise CheckpointLoadError(f"{config_path}: {' '.join(str(e).split())}") from None
    for name, want, have in _repeats(kind, arch, shapes):
        if isinstance(want, int) and want > 2 * have + 8:
            raise CheckpointMismatchError(
                f"{config_path} asks for {name}={want}, but {weights_path} holds {have}; refusing to build it")
    try:
        with torch.device("meta"):
            probe = cls(**arch)
    except (TypeError, ValueError, OverflowError, RuntimeError) as e:
        raise CheckpointLoadError(f"{config_path}: invalid model configuration ({' '.join(str(e).split())})") from None
    want = sum(t.numel() for t in probe.state_dict().values())
    have = sum(_numel(s) for s in shapes.values())
    try:
        check_state_dict(probe, shapes, str(weights_path))
    except CheckpointMismatchError as e:
        size = (f"{config_path} describes a model of {want:,} numbers ({_nbytes(4 * want)} in float32), "
                f"{weights_path} holds {have:,} ({_nbytes(4 * have)}); ")
        raise CheckpointMismatchError(size + str(e)) from None
    return probe


def _config_class(cls):
    """The config dataclass a model constructor takes (`__init__(self, config: XConfig = None, /, **kwargs)`)."""
    import dataclasses
    import typing
    try:
        tp = typing.get_type_hints(cls.__init__).get("config")
    except (NameError, TypeError):
        return None
    for t in (tp, *typing.get_args(tp)):  # Optional[XConfig] too
        if dataclasses.is_dataclass(t):
            return t
    return None


def _numel(shape):
    n = 1
    for d in shape:
        n *= int(d)
    return n


def build_released(cls: type[torch.nn.Module], kind: str, path: str | os.PathLike, weights: str = "ema",
                   ckpt: dict | None = None, **overrides: Any) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(model of class `cls`, info) from a released-format file whose contents must be a `kind` checkpoint
    ('lightningdit' or 'vavae'); the architecture is read from the weights' shapes. info = {"kind", "file",
    "weights", "size", "train_config"}. `ckpt`: the file's contents when already read. `overrides` replace
    inferred constructor arguments."""
    ckpt = read_checkpoint(path, "checkpoint") if ckpt is None else ckpt
    found = detect_kind(ckpt, str(path))
    if found != kind:
        raise CheckpointMismatchError(f"{path}: holds a {found!r} checkpoint, not a {kind!r} one")
    info = {"kind": found, "file": Path(path).name}
    if found == "lightningdit":
        sd = dit_state_dict(ckpt, weights, str(path))
        cfg = {**infer_dit_config(sd, overrides.pop("num_heads", None), f"LightningDiT weights {path}"), **overrides}
        info.update(weights=weights, size=dit_size_name(cfg),
                    train_config=ckpt.get("config") if isinstance(ckpt.get("config"), dict) else None)
        what = f"{path} ({weights})"
    else:
        sd = vavae_state_dict(ckpt)
        cfg = {**infer_vavae_config(sd, overrides.pop("resolution", 256), f"VA-VAE weights {path}"), **overrides}
        what = str(path)
    not_tensor = next((k for k, v in sd.items() if not isinstance(v, torch.Tensor)), None)
    if not_tensor is not None:
        raise CheckpointMismatchError(f"{what}: {not_tensor!r} holds a {type(sd[not_tensor]).__name__}, not a tensor")
    for k, v in sd.items():  # stored weights hold their numbers: an expanded or overlapping view of a small storage
        held = v.untyped_storage().nbytes() - v.storage_offset() * v.element_size()  # would build a huge model
        if v.numel() and (held < v.numel() * v.element_size() or any(s == 0 and n > 1 for s, n in
                                                                     zip(v.stride(), v.shape))):
            raise CheckpointMismatchError(f"{what}: {k!r} of shape {tuple(v.shape)} is a view of {max(held, 0):,} "
                                          "bytes (expanded or overlapping), not stored weights")
    # the architecture read from the weights, checked on the meta device against every tensor before anything is
    # allocated: a small file whose keys describe thousands of blocks is refused, not built
    check_config_fits(cls, kind, cfg, {k: v.shape for k, v in sd.items()}, path, what)
    model = cls(**cfg)
    load_state_dict_strict(model, sd, what)
    return model.eval(), info
