"""Loaders for the released checkpoint formats, and our own format (safetensors + JSON config).

Released LightningDiT: {"model": {"module.<key>": ...}, "ema": {<key>: ...}} (inference uses "ema").
Released VA-VAE tokenizer: {"state_dict": {...}} with encoder.*, decoder.*, quant_conv.*, post_quant_conv.*
plus training-only entries (linear_proj.*, loss.*, foundation_model.*) that are ignored.
A checkpoint that does not fit the model is refused with every missing, unexpected and mis-shaped key
listed; nothing is loaded in that case.

The class-free pieces (formats, strict loading, architecture from shapes) live in modeling.released, below the
models; this module is above them (it names LightningDiT and AutoencoderKL), so imports run one way:
safe_load -> released -> hub -> lightningdit / vavae -> checkpoint -> convert.
"""
import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .hub import load_folder, read_config, save_folder
from .lightningdit import LightningDiT
from .released import (VAVAE_PREFIXES, CheckpointMismatchError, check_state_dict, dit_state_dict,  # noqa: F401
                       load_state_dict_strict, read_checkpoint, vavae_state_dict)
from .safe_load import (CheckpointLoadError, CorruptCheckpointError, UnsafeCheckpointError,  # noqa: F401
                        load_safetensors, safe_torch_load)
from .vavae import AutoencoderKL, VAVAEModelConfig

MODEL_CLASSES = {"lightningdit": LightningDiT, "vavae": AutoencoderKL}


def class_for_kind(kind: str) -> type[LightningDiT | AutoencoderKL]:
    """The model class of a config.json "kind"."""
    if kind not in MODEL_CLASSES:
        raise CheckpointLoadError(f"config.json: unknown model kind {kind!r} (known: {sorted(MODEL_CLASSES)})")
    return MODEL_CLASSES[kind]


def load_dit_checkpoint(path_or_dict: str | os.PathLike | dict, model: torch.nn.Module,
                        weights: str = "ema") -> torch.nn.Module:
    """Load released LightningDiT weights into `model` ("ema" preferred; "model" strips `module.`)."""
    what = "LightningDiT checkpoint" + ("" if isinstance(path_or_dict, dict) else f" {path_or_dict}")
    sd = dit_state_dict(read_checkpoint(path_or_dict, "LightningDiT checkpoint"), weights, what)
    return load_state_dict_strict(model, sd, f"LightningDiT checkpoint ({weights})")


def load_vavae_checkpoint(path_or_dict: str | os.PathLike | dict, model: torch.nn.Module) -> torch.nn.Module:
    """Load a tokenizer checkpoint ({"state_dict": ...}); non-autoencoder keys are ignored."""
    sd = vavae_state_dict(read_checkpoint(path_or_dict, "VA-VAE checkpoint"))
    return load_state_dict_strict(model, sd, "VA-VAE checkpoint")


def to_reference_dit_format(model_state: Mapping[str, torch.Tensor],
                            ema_state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Our weights -> the released format the authors' scripts load."""
    return {"model": {f"module.{k}": v for k, v in model_state.items()}, "ema": dict(ema_state)}


# ----------------------------------------------------------------------------- our format

def save_pretrained(model: torch.nn.Module, config: Any, directory: str | os.PathLike, extra: Any = None) -> Path:
    """Write the hub layout (modeling.hub: model.safetensors + config.json with the constructor arguments
    `config` at the top level + model card) atomically into `directory`; `extra` is kept under "extra"."""
    if not isinstance(model, (LightningDiT, AutoencoderKL)):
        raise TypeError(f"save_pretrained supports LightningDiT and AutoencoderKL, got {type(model).__name__}")
    return save_folder(model, directory, arch=config, extra={"extra": extra} if extra else None)


def build_model(kind: str, config: dict[str, Any]) -> LightningDiT | AutoencoderKL:
    if kind == "lightningdit":
        return LightningDiT(**config)
    if kind == "vavae":
        return AutoencoderKL(VAVAEModelConfig(**config))
    raise ValueError(f"unknown model kind {kind!r}")


def load_pretrained(directory: str | os.PathLike, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild the model a folder holds (config.json in the hub layout or our previous {"kind", "config"} one)
    and load model.safetensors strictly."""
    meta = read_config(directory)
    return load_folder(class_for_kind(meta.get("kind")), directory, config=meta, device=device)
