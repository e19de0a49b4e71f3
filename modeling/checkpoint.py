"""Loaders for the released checkpoint formats, and our own format (safetensors + JSON config).

Released LightningDiT: {"model": {"module.<key>": ...}, "ema": {<key>: ...}} (inference uses "ema").
Released VA-VAE tokenizer: {"state_dict": {...}} with encoder.*, decoder.*, quant_conv.*, post_quant_conv.*
plus training-only entries (linear_proj.*, loss.*, foundation_model.*) that are ignored.
A checkpoint that does not fit the model is refused with every missing, unexpected and mis-shaped key
listed; nothing is loaded in that case.
"""
import json
import os
from pathlib import Path

import torch

from .safe_load import CheckpointLoadError, CorruptCheckpointError, UnsafeCheckpointError, safe_torch_load  # noqa: F401

VAVAE_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


class CheckpointMismatchError(RuntimeError):
    pass


def _read(path_or_dict, what="checkpoint"):
    """A checkpoint dict from a file: safetensors, or torch.load(weights_only=True) -- never code from the file."""
    if isinstance(path_or_dict, dict):
        return path_or_dict
    path = Path(path_or_dict)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    if path.suffix == ".safetensors":
        return load_safetensors(path, what)
    ckpt = safe_torch_load(path, what)
    if not isinstance(ckpt, dict):
        raise CheckpointMismatchError(f"{what} {path} holds a {type(ckpt).__name__}, not a dict of tensors")
    return ckpt


def load_safetensors(path, what="checkpoint"):
    from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 -- SafetensorError does not name the file
        raise CorruptCheckpointError(f"{what} {path} is not a valid safetensors file "
                                     f"({' '.join(str(e).split())[:160]})") from None


def check_state_dict(model, state_dict, what="checkpoint"):
    """Raise CheckpointMismatchError listing every problem; return None when the keys and shapes fit."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    misshaped = sorted(f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
                       for k in set(expected) & set(state_dict) if state_dict[k].shape != expected[k].shape)
    if missing or unexpected or misshaped:
        lines = [f"{what} does not fit the model configuration; nothing was loaded."]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if items:
                lines.append(f"  {len(items)} {title} key(s): " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
        raise CheckpointMismatchError("\n".join(lines))


def load_state_dict_strict(model, state_dict, what="checkpoint"):
    check_state_dict(model, state_dict, what)
    model.load_state_dict(state_dict, strict=True)
    return model


def dit_state_dict(ckpt, weights="ema"):
    """Extract the DiT weights from a released-format dict ("ema" or "model"), or accept a bare state dict."""
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    if "ema" in ckpt or "model" in ckpt:
        if weights not in ckpt:
            raise CheckpointMismatchError(f"checkpoint has no {weights!r} entry (has: {sorted(ckpt)[:10]})")
        sd = ckpt[weights]
    else:
        sd = ckpt
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_dit_checkpoint(path_or_dict, model, weights="ema"):
    """Load released LightningDiT weights into `model` ("ema" preferred; "model" strips `module.`)."""
    sd = dit_state_dict(_read(path_or_dict, "LightningDiT checkpoint"), weights)
    return load_state_dict_strict(model, sd, f"LightningDiT checkpoint ({weights})")


def vavae_state_dict(ckpt):
    sd = ckpt.get("state_dict", ckpt)
    return {k: v for k, v in sd.items() if k.startswith(VAVAE_PREFIXES)}


def load_vavae_checkpoint(path_or_dict, model):
    """Load a tokenizer checkpoint ({"state_dict": ...}); non-autoencoder keys are ignored."""
    return load_state_dict_strict(model, vavae_state_dict(_read(path_or_dict, "VA-VAE checkpoint")), "VA-VAE checkpoint")


def to_reference_dit_format(model_state, ema_state):
    """Our weights -> the released format the authors' scripts load."""
    return {"model": {f"module.{k}": v for k, v in model_state.items()}, "ema": dict(ema_state)}


# ----------------------------------------------------------------------------- our format

def _kind_of(model):
    from .lightningdit import LightningDiT
    from .vavae import AutoencoderKL
    if isinstance(model, LightningDiT):
        return "lightningdit"
    if isinstance(model, AutoencoderKL):
        return "vavae"
    raise TypeError(f"save_pretrained supports LightningDiT and AutoencoderKL, got {type(model).__name__}")


def save_pretrained(model, config, directory, extra=None):
    """Write the hub layout (modeling.hub: model.safetensors + config.json with the constructor arguments
    `config` at the top level + model card) atomically into `directory`; `extra` is kept under "extra"."""
    from .hub import save_folder
    return save_folder(model, directory, arch=config, extra={"extra": extra} if extra else None)


def build_model(kind, config):
    from .lightningdit import LightningDiT
    from .vavae import AutoencoderKL, VAVAEModelConfig
    if kind == "lightningdit":
        return LightningDiT(**config)
    if kind == "vavae":
        return AutoencoderKL(VAVAEModelConfig(**config))
    raise ValueError(f"unknown model kind {kind!r}")


def load_pretrained(directory, device="cpu"):
    """Rebuild the model a folder holds (config.json in the hub layout or our previous {"kind", "config"} one)
    and load model.safetensors strictly."""
    from .hub import class_for_kind, load_folder, read_config
    meta = read_config(directory)
    return load_folder(class_for_kind(meta.get("kind")), directory, config=meta, device=device)


def _jsonable(cfg):
    import dataclasses
    if dataclasses.is_dataclass(cfg):  # e.g. AutoencoderKL.config (VAVAEModelConfig)
        cfg = dataclasses.asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dict(cfg).items()}
