"""Hub-style weights: `from_pretrained(folder | hub id | released .pt)`, `save_pretrained`, `push_to_hub`.

LightningDiT and AutoencoderKL inherit `HubMixin`, which is huggingface_hub's `PyTorchModelHubMixin`
with our own file handling:

- a folder holds `model.safetensors`, `config.json` (the constructor arguments at the top level, as
  the hub mixin writes them, plus `"kind"`, the training config and the parity status) and a model
  card `README.md` that names both;
- `from_pretrained` reads such a folder, a hub repo id (`local_files_only=True` / HF_HUB_OFFLINE=1
  use the local cache only), our previous folders (`{"kind", "config": {...}}` config.json), and the
  authors' released checkpoint files (`.pt` with "ema"/"model" or "state_dict"; the architecture is
  read from the weights' shapes, so no size has to be given);
- weights are loaded strictly: a missing, unexpected or mis-shaped key is an error that lists them.

Without huggingface_hub installed (e.g. a bare GPU machine) the same methods work for local folders
and released files; `push_to_hub` and hub ids then say that huggingface_hub is needed.

Bad input is refused in one line naming the file: a path that is a FIFO, socket, symlink loop or dangling
link says what it is (it is never taken for a hub id); config.json is checked against the weights' header
(unknown keys, invalid values, a model larger than the file) on the meta device before anything is
allocated; a safetensors header that lies about its tensors is refused before it is read.

This module knows the models only by name (it is below them in the import order: the models inherit
HubMixin); modeling.checkpoint.class_for_kind maps a kind to its class.
"""
import json
import os
import secrets
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import torch

from .released import build_released, check_config_fits, load_state_dict_strict
from .safe_load import (CheckpointLoadError, NotAFileError, describe_path, load_safetensors, read_safetensors_header,
                        safetensors_shapes, save_safetensors)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
LIBRARY = "vavae-lightningdit"
PAPER_URL = "https://arxiv.org/abs/2501.01423"
REFERENCE_URL = "https://github.com/hustvl/LightningDiT"
DEFAULT_PARITY = ("architecture and every loader are checked against fixtures made by running the authors' "
                  "code (python -m bench.parity ../shared/parity: fp32, rtol 1e-4, atol 1e-5); the weights "
                  "themselves were not re-evaluated by this export")
# keys of config.json that are not constructor arguments
META_KEYS = ("kind", "training_config", "parity", "source", "sampling", "format", "extra", "save_id")

try:  # optional at import time: the GPU machines run without it
    from huggingface_hub import PyTorchModelHubMixin as _HFBase
    from huggingface_hub import hf_hub_download as _hf_hub_download
    HAVE_HF = True
except ImportError:  # pragma: no cover - exercised only where huggingface_hub is absent
    _HFBase, _hf_hub_download, HAVE_HF = object, None, False

if TYPE_CHECKING:
    from huggingface_hub import ModelCard


def _jsonable(value):
    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def build_config(config_cls: type, config: Any = None, kwargs: dict[str, Any] | None = None) -> Any:
    """A model constructor's one config dataclass: `config` itself, or `config_cls(**kwargs)` (keyword arguments
    are a shorthand for the same dataclass); validated. TypeError for both at once or a config of another type."""
    if config is None:
        config = config_cls(**(kwargs or {}))
    elif kwargs:
        raise TypeError(f"pass either a {config_cls.__name__} or keyword arguments, not both")
    elif not isinstance(config, config_cls):
        raise TypeError(f"config must be a {config_cls.__name__}, got {type(config).__name__}")
    config.validate()
    return config


# the hub classes of modeling.lightningdit / modeling.vavae, by class name (a subclass has its base's kind)
KIND_OF_CLASS = {"LightningDiT": "lightningdit", "AutoencoderKL": "vavae"}


def model_kind(model_or_cls: torch.nn.Module | type[torch.nn.Module]) -> str:
    cls = model_or_cls if isinstance(model_or_cls, type) else type(model_or_cls)
    for base in cls.__mro__:
        if base.__name__ in KIND_OF_CLASS and issubclass(base, HubMixin):
            return KIND_OF_CLASS[base.__name__]
    raise TypeError(f"hub format supports LightningDiT and AutoencoderKL, got {cls.__name__}")


def local_kind(src: str | os.PathLike) -> str | None:
    """'folder' or 'file' for a local path, None for what can only be a hub repo id; NotAFileError naming a path
    that exists as something else (a FIFO, socket, device, symlink loop or dangling link): it is never taken
    for a repo id, and never opened (a FIFO would block)."""
    src = os.fspath(src)
    if os.path.isdir(src):
        return "folder"
    reason = describe_path(src)
    if reason is None:
        return "file"
    if reason != "does not exist":
        raise NotAFileError(f"{src} {reason}: expected a saved model folder, a weights file or a hub repo id")
    return None


def architecture_of(config: dict[str, Any]) -> dict[str, Any]:
    """Constructor arguments from a config.json dict, in either our current or our previous layout."""
    if "config" in config and isinstance(config["config"], dict) and "kind" in config:  # previous layout
        return dict(config["config"])
    return {k: v for k, v in config.items() if k not in META_KEYS}


def model_card(kind: str, arch: dict[str, Any], training_config: Any = None, parity: str | None = None,
               source: dict[str, Any] | None = None, sampling: dict[str, Any] | None = None) -> "ModelCard":
    """The README.md of a saved model: what it is, how it was trained, and its parity status."""
    from huggingface_hub import ModelCard, ModelCardData  # only called where huggingface_hub exists
    what = {"lightningdit": "LightningDiT (class-conditional latent diffusion transformer, rectified flow)",
            "vavae": "VA-VAE tokenizer (AutoencoderKL, latent space aligned with a vision foundation model)"}[kind]
    data = ModelCardData(library_name=LIBRARY, license="mit", tags=[LIBRARY, kind, "pytorch_model_hub_mixin"])
    lines = [f"# {what}", "",
             f"Saved by [{LIBRARY}]; architecture as the authors' code ({REFERENCE_URL}), paper: {PAPER_URL}.", "",
             "## Load", "", "```python",
             f"from modeling import {'LightningDiT' if kind == 'lightningdit' else 'AutoencoderKL'}",
             f"model = {'LightningDiT' if kind == 'lightningdit' else 'AutoencoderKL'}.from_pretrained(\"PATH_OR_REPO_ID\")",
             "```", "", "## Architecture", "", "```json", json.dumps(_jsonable(arch), indent=2, sort_keys=True), "```",
             "", "## Training config", ""]
    if training_config is None:
        lines.append("not recorded")
    elif isinstance(training_config, str):
        lines.append(training_config)
    else:
        lines += ["```json", json.dumps(_jsonable(training_config), indent=2, sort_keys=True), "```"]
    if source:
        lines += ["", "## Source", "", "```json", json.dumps(_jsonable(source), indent=2, sort_keys=True), "```"]
    if sampling:
        lines += ["", "## Sampling settings (the authors' for this checkpoint)", "", "```json",
                  json.dumps(_jsonable(sampling), indent=2, sort_keys=True), "```"]
    lines += ["", "## Parity status", "", parity or DEFAULT_PARITY, ""]
    return ModelCard("---\n" + data.to_yaml() + "\n---\n\n" + "\n".join(lines))


def _write_atomic(path, write):
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_folder(model: torch.nn.Module, directory: str | os.PathLike, arch: Any = None, training_config: Any = None,
                parity: str | None = None, source: dict[str, Any] | None = None, sampling: dict[str, Any] | None = None,
                extra: dict[str, Any] | None = None) -> Path:
    """Write model.safetensors + config.json (+ README.md where huggingface_hub is installed) atomically."""
    if sampling is not None:
        from .sampling import STORED_KEYS
        unknown = sorted(set(sampling) - STORED_KEYS, key=str)
        if unknown:  # refused before writing, not by every command that reads the folder later
            raise ValueError(f"sampling: unknown key(s) {unknown}; the stored settings are {sorted(STORED_KEYS)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    kind = model_kind(model)
    arch = _jsonable(arch if arch is not None else model.config)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    # one id in both files: each is replaced atomically, but not the pair; a save into an existing folder cut
    # between the two leaves new weights beside the former config, which load_folder then refuses
    save_id = secrets.token_hex(8)
    _write_atomic(directory / WEIGHTS_NAME,
                  lambda p: save_safetensors(state, p, metadata={"format": "pt", "save_id": save_id}))
    meta = {"kind": kind, **arch, "training_config": _jsonable(training_config),
            "parity": parity or DEFAULT_PARITY, "save_id": save_id}
    if source is not None:
        meta["source"] = _jsonable(source)
    if sampling is not None:
        meta["sampling"] = _jsonable(sampling)
    meta.update(_jsonable(extra or {}))
    _write_atomic(directory / CONFIG_NAME, lambda p: p.write_text(json.dumps(meta, indent=2, sort_keys=True)))
    if HAVE_HF:
        card = model_card(kind, arch, training_config, meta["parity"], source, sampling)
        _write_atomic(directory / CARD_NAME, lambda p: p.write_text(str(card)))
    return directory


CONFIG_LIMIT = 16 << 20  # a config.json is a few KB; a larger one is not ours


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """config.json of a saved model folder as a dict; one-line errors naming the file."""
    path = Path(directory) / CONFIG_NAME
    reason = describe_path(path)
    if reason == "does not exist":
        raise FileNotFoundError(f"{path} not found: not a saved model folder (expected {CONFIG_NAME} + {WEIGHTS_NAME})")
    if reason is not None:
        raise NotAFileError(f"{path} {reason}")
    if path.stat().st_size > CONFIG_LIMIT:
        raise CheckpointLoadError(f"{path}: {path.stat().st_size} bytes, not a model config (at most {CONFIG_LIMIT})")
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointLoadError(f"{path}: not valid JSON ({' '.join(str(e).split())})") from None
    if not isinstance(config, dict):
        raise CheckpointLoadError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def load_folder(cls: type[torch.nn.Module], directory: str | os.PathLike, config: dict[str, Any] | None = None,
                device: str | torch.device = "cpu", **overrides: Any) -> torch.nn.Module:
    """Build `cls` from a folder's config.json and load model.safetensors strictly. Before anything is
    allocated, the config is checked against the weights' header (modeling.released.check_config_fits)."""
    directory = Path(directory)
    config_path, weights = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    config = read_config(directory) if config is None else config
    kind = config.get("kind")
    if kind is not None and kind != model_kind(cls):
        raise CheckpointLoadError(f"{config_path}: holds a {kind!r} model, not a {model_kind(cls)!r}")
    arch = {**architecture_of(config), **overrides}
    shapes = safetensors_shapes(weights, "model weights")  # FileNotFoundError / a lying header, by name
    saved_with = read_safetensors_header(weights, "model weights")[1].get("save_id")
    if config.get("save_id") is not None and saved_with != config["save_id"]:  # (folders saved before: no id)
        raise CheckpointLoadError(f"{config_path} and {weights} were written by different saves (save_id "
                                  f"{config['save_id']} vs {saved_with}): a save into this folder was cut between "
                                  "its two files; save the model again")
    check_config_fits(cls, model_kind(cls), arch, shapes, config_path, weights)
    model = cls(**arch)
    load_state_dict_strict(model, load_safetensors(weights, "model weights"), str(weights))
    return model.to(device).eval()


class HubMixin(_HFBase):
    """from_pretrained / save_pretrained / push_to_hub for our models (see the module docstring)."""

    if HAVE_HF:
        def __init_subclass__(cls, **kwargs):
            kwargs.setdefault("library_name", LIBRARY)
            kwargs.setdefault("repo_url", REFERENCE_URL)
            kwargs.setdefault("paper_url", PAPER_URL)
            kwargs.setdefault("license", "mit")
            super().__init_subclass__(**kwargs)

    # ------------------------------------------------------------------ save
    def save_pretrained(self, save_directory: str | os.PathLike, *, training_config: Any = None,
                        parity: str | None = None, source: dict[str, Any] | None = None,
                        sampling: dict[str, Any] | None = None, config: Any = None,
                        latent_stats: str | os.PathLike | None = None, push_to_hub: bool = False,
                        repo_id: str | None = None, **push_kwargs: Any) -> str | None:
        """model.safetensors + config.json + README.md (model card) in `save_directory`; `config` overrides
        the constructor arguments recorded (default: the model's own); `latent_stats` (a DiT's: a file, a folder
        or a repo id) stored beside as latents_stats.safetensors, where sample_images and generate find them."""
        save_folder(self, save_directory, arch=config, training_config=training_config, parity=parity,
                    source=source, sampling=sampling)
        if latent_stats is not None:
            st = load_latent_stats(latent_stats)
            save_latent_stats(Path(save_directory) / STATS_NAME, st["mean"], st["std"])
        if push_to_hub:
            return self.push_to_hub(repo_id or Path(save_directory).name, **push_kwargs)
        return None

    def push_to_hub(self, repo_id: str, *, training_config: Any = None, parity: str | None = None,
                    source: dict[str, Any] | None = None, sampling: dict[str, Any] | None = None,
                    latent_stats: str | os.PathLike | None = None,
                    commit_message: str = "Upload with vavae-lightningdit", private: bool | None = None,
                    token: str | None = None, branch: str | None = None, create_pr: bool | None = None,
                    **_: Any) -> str:
        """Save into a temporary folder (save_pretrained's arguments) and upload it as one commit (huggingface_hub's
        HfApi). A converted folder already holds all of it: `HfApi().upload_folder` uploads it as it is."""
        if not HAVE_HF:
            raise RuntimeError("push_to_hub needs huggingface_hub (pip install huggingface_hub)")
        import tempfile

        from huggingface_hub import HfApi
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id=repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, training_config=training_config, parity=parity, source=source,
                                 sampling=sampling, latent_stats=latent_stats)
            return api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=tmp,
                                     commit_message=commit_message, revision=branch, create_pr=create_pr)

    # ------------------------------------------------------------------ load
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *, device: str | torch.device = "cpu",
                        weights: str = "ema", revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                        force_download: bool = False, local_files_only: bool = False, token: str | bool | None = None,
                        **overrides: Any) -> Self:
        """A saved folder, a hub repo id, or a released checkpoint file (.pt / .pth / .safetensors state dict).

        weights: "ema" (default) or "model" for released LightningDiT files. `overrides` replace
        constructor arguments (e.g. use_checkpoint=True)."""
        src = str(pretrained_model_name_or_path)
        local = local_kind(src)  # a FIFO / symlink loop / dangling link: refused here, naming what it is
        if local == "folder" and released_in_folder(src) is None:
            return load_folder(cls, src, device=device, **overrides)
        if local is not None:  # a released file, or a folder holding one as the authors' repos do
            model, _ = build_released(cls, model_kind(cls), released_in_folder(src) or src, weights=weights,
                                      **overrides)
            return model.to(device).eval()
        dl = dict(revision=revision, cache_dir=cache_dir, force_download=force_download,
                  local_files_only=local_files_only, token=token)
        config_file, released = hub_config_or_released(src, **dl)
        if released is not None:  # the authors' layout: hustvl/<name> holds <name>.pt
            model, _ = build_released(cls, model_kind(cls), released, weights=weights, **overrides)
            return model.to(device).eval()
        hub_download(src, WEIGHTS_NAME, **dl)
        return load_folder(cls, Path(config_file).parent, device=device, **overrides)

    # the hub mixin calls these from its own helpers; keep them consistent with the methods above
    def _save_pretrained(self, save_directory):
        save_folder(self, save_directory)

    @classmethod
    def _from_pretrained(cls, *, model_id, revision=None, cache_dir=None, force_download=False, local_files_only=False,
                         token=None, map_location="cpu", **overrides):
        overrides.pop("config", None)
        return cls.from_pretrained(model_id, device=map_location, revision=revision, cache_dir=cache_dir,
                                   force_download=force_download, local_files_only=local_files_only, token=token,
                                   **overrides)


def looks_local(src: str) -> bool:
    """A path rather than a hub repo id ("owner/name"): it starts with . / ~, has a file suffix or more than one
    slash. Such a source that does not exist is not looked up on the Hub."""
    return src.startswith((".", "/", "~")) or src.endswith((".pt", ".pth", ".safetensors", ".ckpt", ".bin")) \
        or src.count("/") > 1 or os.sep != "/" and os.sep in src


def hub_download(src: str, filename: str, **hub_kwargs: Any) -> str:
    """hf_hub_download(repo_id=src, filename) for a source that is neither a local folder nor a file. A missing
    local path, or a repo the Hub does not give (not there, offline, not a valid id), is one FileNotFoundError
    naming `src`: a mistyped path printed 13 lines of the Hub's retries and an error that never named it (a
    review, 2026-12-05)."""
    if not HAVE_HF:
        raise FileNotFoundError(f"{src}: no such folder or file (hub ids need huggingface_hub)")
    if looks_local(src):
        raise FileNotFoundError(f"{src}: no such folder or file")
    try:
        return _hf_hub_download(repo_id=src, filename=filename, **hub_kwargs)
    except Exception as e:  # noqa: BLE001 -- the Hub's errors (not found, offline, invalid id, network): name src
        reason = " ".join(str(e).split())[:200]
        raise FileNotFoundError(f"{src}: no such local folder or file, and the Hugging Face Hub gave no {filename} "
                                f"for it ({type(e).__name__}: {reason})") from None


def released_in_folder(folder: str | os.PathLike) -> Path | None:
    """A local copy of one of the authors' Hub repos (a clone, `hf download --local-dir`): a folder without our
    config.json holding <folder name>.pt, that file; else None (our folder)."""
    folder = Path(folder)
    candidate = folder / (folder.resolve().name + ".pt")
    return candidate if not (folder / CONFIG_NAME).exists() and candidate.is_file() else None


def released_hub_name(src: str) -> str:
    """The file the authors' Hub repos hold their weights in: hustvl/<name> -> <name>.pt
    (hustvl/lightningdit-xl-imagenet256-800ep, hustvl/vavae-imagenet256-f16d32-dinov2)."""
    return src.rstrip("/").rsplit("/", 1)[-1] + ".pt"


def hub_config_or_released(src: str, **hub_kwargs: Any) -> tuple[str | None, str | None]:
    """(config.json, None) of a Hub repo in our layout, or (None, <name>.pt) of one in the authors' release
    layout, as local paths (cache or download); neither: one FileNotFoundError naming src and both files."""
    try:
        return hub_download(src, CONFIG_NAME, **hub_kwargs), None
    except FileNotFoundError as ours:
        if looks_local(src) or not HAVE_HF:
            raise
        try:
            return None, hub_download(src, released_hub_name(src), **hub_kwargs)
        except FileNotFoundError:
            raise FileNotFoundError(f"{ours}; nor {released_hub_name(src)} (the authors' release layout)") from None


def stored_metadata(src: str | os.PathLike, **hub_kwargs: Any) -> dict[str, Any]:
    """config.json of a saved folder or hub repo (cache / download), or {} for a released file, whose
    sampling settings are then those of the preset named like the file (if any)."""
    from .sampling import SAMPLING_PRESETS, preset_for_name
    src = str(src)
    local = local_kind(src)
    if local == "folder" and released_in_folder(src) is not None:
        return stored_metadata(released_in_folder(src))
    if local == "folder":
        return read_config(src)
    if local == "file":
        name = preset_for_name(src)
        return {"sampling": {"preset": name, **SAMPLING_PRESETS[name]["settings"]}} if name else {}
    if not HAVE_HF and not looks_local(src):
        return {}
    config_file, released = hub_config_or_released(src, **hub_kwargs)
    if released is not None:
        return stored_metadata(released)
    return read_config(Path(config_file).parent)


def model_folder(src: str | os.PathLike, **hub_kwargs: Any) -> Path | None:
    """The local folder of a saved model (a folder, or a hub repo's cached snapshot), or None for a file."""
    src = str(src)
    local = local_kind(src)
    if local == "folder":
        return Path(src)
    if local == "file" or not HAVE_HF and not looks_local(src):
        return None
    config_file, _ = hub_config_or_released(src, **hub_kwargs)
    return Path(config_file).parent if config_file is not None else None  # a released file has no folder


# ----------------------------------------------------------------------------- latent statistics

STATS_NAME = "latents_stats.safetensors"
RELEASED_STATS_NAME = "latents_stats.pt"  # beside the authors' tokenizer: hustvl/vavae-imagenet256-f16d32-dinov2


def save_latent_stats(path: str | os.PathLike, mean: torch.Tensor, std: torch.Tensor) -> Path:
    """{"mean", "std"} float32 (1, C, 1, 1) as safetensors."""
    import torch
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    st = {"mean": torch.as_tensor(mean).float().reshape(1, -1, 1, 1).contiguous(),
          "std": torch.as_tensor(std).float().reshape(1, -1, 1, 1).contiguous()}
    if st["mean"].shape != st["std"].shape:
        raise ValueError(f"latent stats: mean {tuple(st['mean'].shape)} and std {tuple(st['std'].shape)} differ")
    _write_atomic(path, lambda p: save_safetensors(st, p))
    return path


def load_latent_stats(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """{"mean", "std"} (1, C, 1, 1) float32 from latents_stats.safetensors, the released latents_stats.pt
    (read with weights_only=True), or a model folder holding latents_stats.safetensors."""
    import torch

    from .safe_load import safe_torch_load
    src = str(path)
    path = Path(path)
    if local_kind(src) is None and HAVE_HF and not looks_local(src):  # a Hub repo: ours, or the authors' .pt
        try:
            path = Path(hub_download(src, STATS_NAME))
        except FileNotFoundError as ours:
            try:
                path = Path(hub_download(src, RELEASED_STATS_NAME))
            except FileNotFoundError:
                raise FileNotFoundError(f"{ours}; nor {RELEASED_STATS_NAME}") from None
    if path.is_dir():  # ours, else the authors' (a local copy of their tokenizer's repo)
        path = path / (RELEASED_STATS_NAME if not (path / STATS_NAME).exists() and (path / RELEASED_STATS_NAME)
                       .is_file() else STATS_NAME)
    if path.suffix == ".safetensors":
        st = load_safetensors(path, "latent statistics")  # header checked first; FileNotFoundError by name
    else:
        st = safe_torch_load(path, "latent statistics")  # weights_only=True
    if not isinstance(st, dict) or "mean" not in st or "std" not in st:
        raise CheckpointLoadError(f"{path}: expected keys 'mean' and 'std', got "
                                  f"{sorted(map(str, st)) if isinstance(st, dict) else type(st).__name__}")
    if not all(isinstance(st[k], torch.Tensor) and st[k].is_floating_point() for k in ("mean", "std")):
        raise CheckpointLoadError(f"{path}: 'mean' and 'std' must be floating-point tensors")
    mean, std = (st[k].float() for k in ("mean", "std"))
    if mean.numel() != std.numel() or mean.numel() == 0:
        raise CheckpointLoadError(f"{path}: 'mean' has {mean.numel()} values, 'std' {std.numel()}")
    # latents are normalised as (z - mean) / std and sampled back as x * std + mean: a NaN, inf or zero std
    # gives NaN or all-constant images, so it is refused here, naming the file
    bad = [f"{k}[{i}]={v:g}" for k, t in (("mean", mean), ("std", std))
           for i, v in enumerate(t.flatten().tolist()) if v != v or abs(v) == float("inf")]
    bad += [f"std[{i}]={v:g}" for i, v in enumerate(std.flatten().tolist()) if v == v and v <= 0]
    if bad:
        raise CheckpointLoadError(f"{path}: latent statistics must be finite with std > 0, found {', '.join(bad[:4])}"
                                  f"{' ...' if len(bad) > 4 else ''}")
    return {"mean": mean.reshape(1, -1, 1, 1), "std": std.reshape(1, -1, 1, 1)}
