"""Samplers for the rectified flow: integrate dx/dt = v(x, t) from noise (t=0) to data (t=1).

Every sampling option is declared once, in `SamplingConfig` (below); the command-line flags
(`add_sampling_args` / `config_from_args`), the trainer's `eval.*` keys (evaluation.train_eval.EvalSettings),
the presets and config.json's "sampling" are derived from it. The integrators (Euler, Heun, dopri5,
Euler-Maruyama, and any you register) live in modeling/integrators.py; the guidance rule and mix in
modeling/guidance.py.

The time grid is the reference's: linspace(0, 1, steps) mapped by the timestep shift s*t / (1 + (s-1)*t)
(s = 0.3 for the paper's FIDs), so `steps` grid points give `steps - 1` model calls for Euler. Where a step is
below `cfg_interval_start` the unconditional half is not computed at all. The grid lives on the host, so
deciding that needs no device synchronisation.
"""
import argparse
import contextlib
import copy
import dataclasses
import logging
import math
import numbers
import os
import typing
from typing import Any, Literal, Optional, Union

import torch

import kernels
from kernels.backend import triton_status

from .config import ConfigError
from .guidance import Guidance, cfg_velocity, is_guided
from .integrators import INTEGRATORS, integrator_names, make_integrator

log = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16", "bf16-weights", "fp8"]
FP8Recipe = Literal["rowwise", "tensorwise"]
FP8Impl = Literal["scaled_mm", "torchao"]
FP8Quant = Literal["auto", "ours", "inline"]
CompileMode = Literal["none", "blocks", "model"]
CudagraphMode = Literal["off", "on", "auto"]
PRECISIONS: tuple[str, ...] = typing.get_args(Precision)
FP8_RECIPES: tuple[str, ...] = typing.get_args(FP8Recipe)
FP8_IMPLS: tuple[str, ...] = typing.get_args(FP8Impl)
COMPILE_MODES: tuple[str, ...] = typing.get_args(CompileMode)
CUDAGRAPH_MODES: tuple[str, ...] = typing.get_args(CudagraphMode)


def timestep_shift(t: Union[float, torch.Tensor], s: float) -> Union[float, torch.Tensor]:
    """s*t / (1 + (s-1)*t): the reference's timestep shift (s < 1 puts more grid points near the noise)."""
    return s * t / (1 + (s - 1) * t)


def time_grid(steps: int, shift: float = 1.0, device: Union[str, torch.device, None] = None,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`steps` shifted grid times from 0 (noise) to 1 (data)."""
    t = torch.linspace(0, 1, steps, dtype=dtype, device=device)
    return timestep_shift(t, shift) if shift != 1.0 else t


TIME_GRID_DTYPE = torch.float32  # the dtype sampling_grid computes in (generate's settings file records it)


def sampling_grid(steps: int, shift: float = 1.0) -> list[float]:
    """The samplers' grid as host floats: the float32 grid the authors' transport/integrators.py computes (their
    linspace and shift in float32: the fixture `grid250_shift0.3` bit for bit), so the model sees their times and
    the guidance interval switches at their step. A float64 grid differed from theirs by an ulp at 140 of the 250
    paper points, and could move the interval's start by a step (a review, 2026-12-05)."""
    return time_grid(steps, shift, dtype=TIME_GRID_DTYPE).double().tolist()


# ----------------------------------------------------------------------------- the one config

class SamplingConfigError(ConfigError):
    """A sampling option no sampler can run (a ConfigError, so a ValueError); `field` names the option (the CLI
    turns it into its flag, the config system into its dotted key)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclasses.dataclass
class SamplingConfig:
    """Every sampling option, declared once: the CLI flags (add_sampling_args), the trainer's `eval.*` keys, the
    presets, `generate`, the sample-speed specs and config.json's "sampling" are derived from it. The comment
    after a field is its --help text.

    The first six fields (SETTING_KEYS) say WHAT is sampled: they change the samples. The rest say HOW it is
    computed (precision, compilation, CUDA graphs): they change speed and rounding only."""
    # -- what is sampled
    method: str = "euler"               # integrator (modeling/integrators.py): euler, heun, dopri5, euler_maruyama
                                        # or one registered with register_integrator
    steps: int = 250                    # time grid points (steps - 1 Euler model calls)
    shift: float = 0.3                  # timestep shift s*t/(1+(s-1)*t) of the grid (1.0 = uniform)
    cfg_scale: float = 1.0              # classifier-free guidance scale (<= 1: no guidance, as the reference)
    cfg_interval_start: float = 0.0     # guidance only for grid times t >= this (below it: no unconditional pass)
    guidance: Guidance = "all"          # reference: the authors' guidance of latent channels 0..2 only (their cfg
                                        # scales were tuned for it); all: every channel (needs its own cfg scale)
    # -- how it is computed
    precision: Precision = "fp32"       # bf16: autocast on the fp32 weights; bf16-weights: a bf16 copy; fp8: that
                                        # copy with the blocks' matmuls in FP8 (an FP8 GPU; docs/sampling.md has
                                        # its accuracy); the ODE state stays fp32
    fp8_recipe: FP8Recipe = "rowwise"   # precision fp8: dynamic scales per row, or per tensor
    fp8_impl: FP8Impl = "scaled_mm"     # precision fp8: our FP8Linear (weights quantized once, one
                                        # torch._scaled_mm), or torchao's float8 training modules
    fp8_quant: FP8Quant = "auto"        # precision fp8 with FP8Linear, rowwise: ours quantizes the norms',
                                        # SwiGLU's and attention's outputs in our one-pass Triton kernels (a CUDA
                                        # GPU); inline: plain torch ops (inductor fuses what it can); auto: ours
                                        # where it runs
    fp8_proj_bf16: bool = False         # precision fp8: attention's output projection stays bf16 (its input,
                                        # cuDNN's output, needs a quantization pass of its own, and it is the
                                        # smallest GEMM: FP8 saves it least)
    compile: CompileMode = "none"       # torch.compile with static shapes: each block, or the whole forward
    autotune: bool = False              # with compile: inductor's max-autotune (Triton GEMMs with fused epilogues
                                        # where they measure faster; minutes of compilation)
    multi_kernel: bool = False          # with compile: inductor's multi-kernel (each reduction compiled persistent
                                        # and looped, the faster kept by timing; inductor loops over rows > 1024)
    fused_mlp: bool = False             # each MLP's w12 GEMM + SwiGLU as one Triton kernel (bf16-weights or fp32,
                                        # a CUDA GPU)
    cudagraphs: CudagraphMode = "off"   # capture each Euler step as a CUDA graph (auto: on CUDA; on: an error
                                        # where impossible)

    def validate(self) -> "SamplingConfig":
        """Raise SamplingConfigError naming the field for a value no sampler can run (a wrong type or choice,
        NaN / inf, too few grid points, contradictory execution options); returns self. What depends on the
        machine (CUDA, Triton, an FP8 GPU) is checked where the Sampler is built."""
        for f in dataclasses.fields(SamplingConfig):
            value, tp = getattr(self, f.name), _HINTS[f.name]
            if typing.get_origin(tp) is Literal:
                ok, want = value in typing.get_args(tp), f"one of {typing.get_args(tp)}"
            elif tp is bool:
                ok, want = isinstance(value, bool), "true or false"
            elif tp is int:
                ok, want = isinstance(value, numbers.Integral) and not isinstance(value, bool), "an integer"
            elif tp is float:
                ok, want = isinstance(value, numbers.Real) and not isinstance(value, bool), "a number"
            else:
                ok, want = isinstance(value, tp), f"a {tp.__name__}"
            if not ok:
                raise SamplingConfigError(f.name, f"{f.name} must be {want}, got {value!r}")
        if self.method not in INTEGRATORS:
            raise SamplingConfigError("method", f"method must be a registered integrator ({', '.join(INTEGRATORS)}), "
                                                f"got {self.method!r}")
        if self.steps < 2:
            raise SamplingConfigError("steps", f"steps must be at least 2 (grid points; steps - 1 model calls), "
                                               f"got {self.steps}")
        for name in ("shift", "cfg_scale", "cfg_interval_start"):
            if not math.isfinite(getattr(self, name)):
                raise SamplingConfigError(name, f"{name} must be a finite number, got {getattr(self, name)}")
        if self.shift <= 0:
            raise SamplingConfigError("shift", f"shift must be > 0, got {self.shift}")
        for name in ("autotune", "multi_kernel"):
            if getattr(self, name) and self.compile == "none":
                raise SamplingConfigError(name, f"{name} is a torch.compile setting: it needs compile 'blocks' or "
                                                "'model'")
        if self.fp8_proj_bf16 and self.precision != "fp8":
            raise SamplingConfigError("fp8_proj_bf16", f"fp8_proj_bf16 keeps one matmul of precision fp8 in bf16; "
                                                       f"precision is {self.precision!r}")
        if self.fused_mlp and self.precision not in ("bf16-weights", "fp32"):
            raise SamplingConfigError("fused_mlp", f"fused_mlp runs with precision bf16-weights or fp32, not "
                                                   f"{self.precision!r} (the fused kernel reads the weights directly: "
                                                   "no autocast, no FP8)")
        if self.fp8_quant == "ours" and (self.fp8_impl, self.fp8_recipe) != ("scaled_mm", "rowwise"):
            raise SamplingConfigError("fp8_quant", f"fp8_quant 'ours' runs with fp8_impl scaled_mm and fp8_recipe "
                                                   f"rowwise (our kernels quantize per row), not "
                                                   f"{self.fp8_impl} / {self.fp8_recipe}")
        if not INTEGRATORS[self.method].capturable:  # compile's static shapes and the graphs are the Euler step's
            if self.compile != "none":
                raise SamplingConfigError("compile", f"compile={self.compile!r} is implemented for the Euler sampler, "
                                                     f"not method {self.method!r}")
            if self.cudagraphs == "on":
                raise SamplingConfigError("cudagraphs", f"CUDA graphs are implemented for the Euler sampler, not "
                                                        f"method {self.method!r}")
        return self

    def settings(self) -> dict:
        """The SETTING_KEYS part (what is sampled), as config.json's "sampling" stores it."""
        return {k: getattr(self, k) for k in SETTING_KEYS}

    def replace(self, **changes: Any) -> "SamplingConfig":
        """A copy with `changes`, validated."""
        return dataclasses.replace(self, **changes).validate()

    @classmethod
    def of(cls, obj: Any) -> "SamplingConfig":
        """The sampling options of `obj` (a SamplingConfig, a subclass such as the trainer's EvalSettings, or any
        object with these fields) as a plain SamplingConfig, validated."""
        return cls(**{f.name: getattr(obj, f.name) for f in dataclasses.fields(cls)}).validate()


class SamplerUnavailable(RuntimeError):
    """An explicitly requested sampling path cannot run here."""


_HINTS = typing.get_type_hints(SamplingConfig)
SETTING_KEYS: tuple[str, ...] = ("method", "steps", "shift", "cfg_scale", "cfg_interval_start", "guidance")
STORED_KEYS = frozenset(SETTING_KEYS) | {"preset"}  # what config.json's "sampling" may hold (and preset: its name)
DEFAULT_SETTINGS: dict = SamplingConfig().settings()

# ----------------------------------------------------------------------------- presets: partial configs

# The authors' sampling settings for each released checkpoint (configs/reproductions/*.yaml of their code):
# Euler ODE, 250 grid points, timestep shift 0.3, guidance only on latent channels 0..2 ("reference").
# Their cfg scales were tuned for that 3-channel guidance; all-channel guidance ("all") needs its own scale.
_PAPER = SamplingConfig(method="euler", steps=250, shift=0.3, guidance="reference")
SAMPLING_PRESETS: dict[str, dict] = {
    "lightningdit-xl-imagenet256-800ep": {
        "settings": _PAPER.replace(cfg_scale=6.7, cfg_interval_start=0.125).settings(),
        "training_config": "hustvl/LightningDiT configs/reproductions/lightningdit_xl_vavae_f16d32_800ep_cfg.yaml "
                           "(800 epochs; paper FID-50k 1.35 with these settings)"},
    "lightningdit-xl-imagenet256-64ep": {
        "settings": _PAPER.replace(cfg_scale=10.0, cfg_interval_start=0.10).settings(),
        "training_config": "hustvl/LightningDiT configs/reproductions/lightningdit_xl_vavae_f16d32_64ep_cfg.yaml "
                           "(64 epochs; paper FID-50k 2.11 with these settings)"},
    # their run_fast_inference.sh (inference.py --demo): the README's demo grid, with either checkpoint
    "demo": {
        "settings": _PAPER.replace(shift=1.0, cfg_scale=9.0, cfg_interval_start=0.0).settings(),
        "training_config": "hustvl/LightningDiT inference.py --demo (run_fast_inference.sh): cfg 9.0 at every step, "
                           "no timestep shift, their config's Euler 250; labels DEMO_LABELS, one image each"},
}
PRESET_ALIASES: dict[str, str] = {"800ep": "lightningdit-xl-imagenet256-800ep",
                                  "64ep": "lightningdit-xl-imagenet256-64ep"}
DEMO_LABELS: tuple[int, ...] = (975, 3, 207, 387, 388, 88, 979, 279)  # inference.py --demo's, in its 2 x 4 grid


def preset_for_name(name: Union[str, os.PathLike]) -> Optional[str]:
    """The preset whose released file this is (by file or folder name), or None."""
    stem = str(name).replace("\\", "/").rstrip("/").split("/")[-1]
    stem = stem.rsplit(".", 1)[0] if stem.endswith((".pt", ".pth", ".safetensors")) else stem
    return stem if stem in SAMPLING_PRESETS else None


def preset_settings(name: str) -> dict:
    """The sampling settings (the SETTING_KEYS) of a preset, by name or alias."""
    key = PRESET_ALIASES.get(name, name)
    if key not in SAMPLING_PRESETS:
        raise ValueError(f"unknown sampling preset {name!r}; known: "
                         f"{sorted(SAMPLING_PRESETS) + sorted(PRESET_ALIASES)}")
    return dict(SAMPLING_PRESETS[key]["settings"])


def resolve_settings(explicit: Optional[dict] = None, preset: Optional[str] = None,
                     stored: Optional[dict] = None) -> tuple[dict, dict]:
    """Sampling settings and where each came from: explicit values (None = not given) win over the named
    preset, which wins over the settings stored with the model (config.json "sampling" or a released
    file's name), which win over DEFAULT_SETTINGS. Returns (settings, {key: source})."""
    layers = [("default", DEFAULT_SETTINGS), ("stored with the model", stored or {}),
              (f"preset {preset}", preset_settings(preset) if preset else {}),
              ("given", {k: v for k, v in (explicit or {}).items() if v is not None})]
    out, src = {}, {}
    for name, layer in layers:
        for k in SETTING_KEYS:
            if k in layer:
                out[k], src[k] = layer[k], name
    return out, src


# ----------------------------------------------------------------------------- the reference sampler

class GuidedVelocity:
    """v(x, t) for a batch of conditional samples, with optional guidance (through model.forward_with_cfg)."""

    def __init__(self, model: torch.nn.Module, y: torch.Tensor, cfg_scale: float = 1.0,
                 cfg_interval_start: float = 0.0, guidance: str = "all", null_class: Optional[int] = None) -> None:
        self.model, self.y = model, y
        self.cfg_scale, self.cfg_interval_start, self.guidance = cfg_scale, cfg_interval_start, guidance
        null = model.num_classes if null_class is None else null_class
        self.y_null = torch.full_like(y, null)
        if guidance not in typing.get_args(Guidance):
            raise ValueError(f"guidance must be one of {typing.get_args(Guidance)}, got {guidance!r}")

    def __call__(self, x: torch.Tensor, t: float) -> torch.Tensor:
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)
        if not is_guided(t, self.cfg_scale, self.cfg_interval_start):
            return self.model(x, tt, self.y)
        out = self.model.forward_with_cfg(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([self.y, self.y_null]),
                                          self.cfg_scale, self.cfg_interval_start, self.guidance)
        return out[: x.shape[0]]


@torch.no_grad()
def sample(model: torch.nn.Module, z: torch.Tensor, y: torch.Tensor, steps: int = 250, method: str = "euler",
           shift: float = 0.3, cfg_scale: float = 1.0, cfg_interval_start: float = 0.0, guidance: str = "all",
           return_trajectory: bool = False, generator: Optional[torch.Generator] = None, diffusion_norm: float = 1.0,
           atol: float = 1e-6, rtol: float = 1e-3) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Draw samples from noise z (B, C, H, W) with labels y (B,): the reference path (the model as given, in
    its own dtype, through its forward_with_cfg). The Sampler computes exactly this in fp32 + eager.

    method: a registered integrator (modeling/integrators.py): "euler" / "heun" on the shifted grid, "dopri5"
    (adaptive, torchdiffeq; `steps` only sets the output grid; atol / rtol), "euler_maruyama" (SDE with the
    score from the velocity; `diffusion_norm` scales the noise).
    Returns the final latents, or (final, trajectory (steps, B, C, H, W)) with return_trajectory.
    """
    SamplingConfig(method=method, steps=steps, shift=shift, cfg_scale=cfg_scale,
                   cfg_interval_start=cfg_interval_start, guidance=guidance).validate()
    integrator = make_integrator(method, diffusion_norm=diffusion_norm, atol=atol, rtol=rtol)
    v = GuidedVelocity(model, y, cfg_scale, cfg_interval_start, guidance)
    grid = sampling_grid(steps, shift)
    traj = [z] if return_trajectory else None
    x = integrator.integrate(v, z, grid, generator=generator, trajectory=traj)
    return (x, torch.stack(traj)) if return_trajectory else x


# ----------------------------------------------------------------------------- the fast sampling path
#
# `Sampler` is what evaluation.generate, the training-time evaluation and the speed benchmark call: one
# object per (model, SamplingConfig), reused for every batch. fp32 + eager computes exactly `sample` (tested
# bit-for-bit); the execution options change how, not what, is computed:
#   precision  "fp32" | "bf16" (autocast on the fp32 weights, as training) | "bf16-weights" (a bf16 copy)
#              | "fp8" (the bf16 copy with the blocks' qkv / proj / w12 / w3 matmuls in FP8: weights quantized
#              once, activations per call, dynamic scales per row by default, per tensor with
#              fp8_recipe="tensorwise"; fp8_impl "scaled_mm" is our FP8Linear (modeling/fp8.py), "torchao"
#              torchao's float8 training modules; an FP8 GPU, or fp8_emulation=True for accuracy checks on the CPU)
#              -- the ODE state, the time grid, the guidance mix and the integrator's update stay fp32;
#   fused_mlp  each SwiGLU MLP's w12 GEMM and SwiGLU as one Triton kernel (kernels/linear_swiglu.py): the
#              (rows, 2H) product is never written (bf16-weights or fp32; a CUDA device);
#   compile    "none" | "blocks" (torch.compile of each block, static shapes: one graph per batch shape)
#              | "model" (torch.compile of the whole forward, static shapes); autotune=True compiles with
#              mode "max-autotune-no-cudagraphs" (inductor benchmarks Triton GEMM templates with fused
#              epilogues against cuBLAS; minutes of compilation; the CUDA graphs stay ours);
#   cudagraphs "off" | "on" | "auto" (on where the device is CUDA and the integrator is capturable, i.e. Euler):
#              the guided and the unguided Euler step are each captured once per batch size and replayed, so a
#              step costs one launch. An explicit request that cannot run is an error, never a fallback.
# Every integrator of the registry runs here (eagerly, with this precision); compile and CUDA graphs need a
# capturable one (the Euler step).


def _shared_copy(model):
    """A structural copy of `model` whose parameters and buffers are the original tensors (no memory)."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def autocast_context(device: Union[str, torch.device], precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for precision 'bf16' (weight cast cache off: required under CUDA graph capture)."""
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, cache_enabled=False)


def compile_settings(autotune: bool, multi_kernel: bool) -> dict:
    """torch.compile's mode / options for the sampler's autotune and multi_kernel (torch.compile takes a mode or
    options, not both: with multi-kernel, max-autotune's mode is spelled as its options)."""
    if not multi_kernel:
        return {"mode": "max-autotune-no-cudagraphs" if autotune else None}
    import torch._inductor
    options = dict(torch._inductor.list_mode_options("max-autotune-no-cudagraphs")) if autotune else {}
    return {"options": {**options, "triton.multi_kernel": 1}}


class Sampler:
    """A SamplingConfig's integrator on the shifted grid with guidance, in the precision / compile / CUDA graph
    mode it asks for. `sampler(z, y)` -> final latents (fp32, on the sampler's device); `sampler.describe()` says
    what ran.

    device: where it runs (default: the model's); static_batch: the one batch shape of the compiled / graphed
    Euler path (default: the first batch's; smaller batches are padded to it); fp8_emulation: precision fp8 on
    a machine without FP8 (torch._scaled_mm's emulation: accuracy checks only).
    """

    def __init__(self, model: torch.nn.Module, config: SamplingConfig, *, device: Union[str, torch.device, None] = None,
                 static_batch: Optional[int] = None, fp8_emulation: bool = False) -> None:
        if not isinstance(config, SamplingConfig):
            raise TypeError(f"Sampler(model, config): config must be a SamplingConfig, got {type(config).__name__}")
        self.config = config = SamplingConfig.of(config)  # validated once; a subclass (EvalSettings) loses its extras
        # (the names the model preparation below reads)
        precision, compile, fused_mlp = config.precision, config.compile, config.fused_mlp
        fp8_recipe, fp8_impl, autotune = config.fp8_recipe, config.fp8_impl, config.autotune
        self.integrator = make_integrator(config.method)
        self.device = torch.device(device if device is not None else next(model.parameters()).device)
        self.fp8 = None
        if config.cudagraphs == "on" and self.device.type != "cuda":
            raise SamplerUnavailable(f"CUDA graphs were requested but the sampler runs on {self.device}; "
                                     "use cudagraphs='auto' or 'off'")
        self.use_graphs = config.cudagraphs == "on" or (config.cudagraphs == "auto" and self.device.type == "cuda"
                                                        and self.integrator.capturable)
        self.num_classes = model.num_classes
        model = model.eval()
        if precision in ("bf16-weights", "fp8"):
            model = copy.deepcopy(model).to(torch.bfloat16)
        elif compile != "none" or fused_mlp:
            model = _shared_copy(model)  # change a copy: the caller's model object stays as it was
        if fused_mlp:
            from .fused_mlp import fuse_swiglu_mlps
            try:
                swapped = fuse_swiglu_mlps(model, self.device)
            except kernels.BackendUnavailable as e:
                raise SamplerUnavailable(f"fused_mlp needs the Triton kernels: {e}") from None
            if not swapped:
                raise SamplerUnavailable("fused_mlp: this model has no SwiGLU MLP (use_swiglu=False)")
        if precision == "fp8":
            from .fp8 import FP8Unavailable, apply_fp8, apply_fp8_inference, check_fp8, check_scaled_mm
            remedy = "Use --precision bf16-weights instead."
            try:
                model = model.to(self.device)
                if fp8_impl == "scaled_mm":
                    quant = self._fp8_quant(config)
                    proj = "; attn.proj in bf16" if config.fp8_proj_bf16 else ""
                    self.fp8 = (f"{check_scaled_mm(self.device, fp8_emulation, remedy)}, {fp8_recipe} scaling, "
                                + ("norm, SwiGLU and attention outputs quantized by kernels.ops."
                                   "norm_modulate_fp8 / swiglu_fp8 / quantize_rows_fp8" if quant == "ours"
                                   else "activations quantized in torch ops")
                                + proj)
                    apply_fp8_inference(model, fp8_recipe, fp8_emulation, remedy, quant=quant,
                                        skip=("attn.proj",) if config.fp8_proj_bf16 else ())
                else:
                    if config.fp8_proj_bf16:
                        raise FP8Unavailable("fp8_proj_bf16 needs fp8_impl scaled_mm (our FP8Linear)")
                    self.fp8 = f"{check_fp8('torchao', self.device, fp8_emulation, remedy)}, {fp8_recipe} scaling"
                    apply_fp8(model, "torchao", fp8_recipe, fp8_emulation, remedy)
            except FP8Unavailable as e:
                raise SamplerUnavailable(f"precision fp8: {e}") from None
        how = compile_settings(autotune, config.multi_kernel)
        if compile == "blocks":
            for block in model.blocks:
                block.compile(dynamic=False, **how)
            self.forward = model
        elif compile == "model":
            self.forward = torch.compile(model, dynamic=False, **how)
        else:
            self.forward = model
        self.model = model
        grid = sampling_grid(config.steps, config.shift)
        self.grid = grid
        self.guided = [is_guided(t, config.cfg_scale, config.cfg_interval_start) for t in grid[:-1]]
        self._grid_dev = torch.tensor(grid[:-1], dtype=torch.float32, device=self.device)
        self._dt_dev = torch.tensor([b - a for a, b in zip(grid[:-1], grid[1:])], dtype=torch.float32,
                                    device=self.device)
        self.static_batch = static_batch
        self._graphs = {}
        self._primed = set()
        self._logged = False

    def _fp8_quant(self, config: SamplingConfig) -> str:
        """fp8_quant resolved: 'ours' or 'inline' (auto: ours for rowwise where the Triton kernels run here)."""
        if config.fp8_quant == "inline" or config.fp8_recipe != "rowwise":
            return "inline"
        ok, reason = triton_status(torch.empty(0, device=self.device))
        if not ok and config.fp8_quant == "ours":
            raise SamplerUnavailable(f"fp8_quant ours needs the Triton kernels: {reason}; use fp8_quant inline")
        return "ours" if ok else "inline"

    # ------------------------------------------------------------------ what ran
    def describe(self) -> dict:
        c = self.config
        return {"method": c.method, "steps": c.steps, "shift": c.shift, "cfg_scale": c.cfg_scale,
                "cfg_interval_start": c.cfg_interval_start, "guidance": c.guidance,
                "precision": c.precision, "fused_mlp": c.fused_mlp, "compile": c.compile,
                "autotune": c.autotune, "multi_kernel": c.multi_kernel,
                "fp8": self.fp8, "cudagraphs": "on" if self.use_graphs else "off", "device": str(self.device),
                "guided_steps": sum(self.guided), "model_calls": len(self.grid) - 1,
                "static_batch": self.static_batch}

    # ------------------------------------------------------------------ the velocity
    def _model_out(self, x, t, y):
        """The model's velocity in fp32 for fp32 state x, (B,) times t, labels y."""
        if self.config.precision in ("bf16-weights", "fp8"):
            return self.forward(x.to(torch.bfloat16), t, y).float()
        with autocast_context(self.device, self.config.precision):
            out = self.forward(x, t, y)
        return out.float()

    def velocity(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, y_null: torch.Tensor,
                 guided: bool) -> torch.Tensor:
        """v(x, t): conditional where not guided; else the guidance mix (modeling.guidance.cfg_velocity, what
        LightningDiT.forward_with_cfg computes), from an fp32 copy of the model output. t: (B,) on the device."""
        if not guided:
            return self._model_out(x, t, y)
        out = self._model_out(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_null]))
        return cfg_velocity(out, self.config.cfg_scale, self.config.guidance)

    def _velocity_at(self, y):
        """v(x, t) with t a host float, as the integrators call it; guidance decided on the host."""
        y_null = torch.full_like(y, self.num_classes)
        c = self.config

        def v(x: torch.Tensor, t: float) -> torch.Tensor:
            tt = torch.full((len(x),), t, device=x.device, dtype=torch.float32)
            return self.velocity(x, tt, y, y_null, is_guided(t, c.cfg_scale, c.cfg_interval_start))
        return v

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def __call__(self, z: torch.Tensor, y: torch.Tensor, generator: Optional[torch.Generator] = None,
                 progress: bool = False) -> torch.Tensor:
        """Final latents for noise z (B, C, H, W) and labels y (B,); progress: a tqdm bar over the steps;
        generator: for stochastic integrators (Euler-Maruyama). Runs with this sampler's device current."""
        with on_device(self.device):
            return self._sample(z, y, generator, progress)

    def _sample(self, z: torch.Tensor, y: torch.Tensor, generator: Optional[torch.Generator],
                progress: bool) -> torch.Tensor:
        if not self._logged:
            log.info("sampler: %s", self.describe())
            self._logged = True
        z = z.to(self.device, torch.float32)
        y = y.to(self.device)
        n = len(z)
        if self.integrator.capturable:  # the one static batch shape of the compiled / graphed Euler path
            if (self.use_graphs or self.config.compile != "none") and self.static_batch is None:
                self.static_batch = n  # one static shape: smaller batches are padded to it
            if self.static_batch is not None and n < self.static_batch:
                pad = self.static_batch - n
                z = torch.cat([z, z.new_zeros((pad, *z.shape[1:]))])
                y = torch.cat([y, y.new_zeros(pad)])
            elif self.static_batch is not None and n > self.static_batch:
                raise ValueError(f"batch {n} is larger than this sampler's static batch {self.static_batch}")
        self._prime_attention(len(z))
        steps = range(len(self.grid) - 1)
        if progress:  # (a bar on a terminal, a line every 30 s in a log file)
            from .progress import tracked
            steps = tracked(steps, "sampling", "step")
        if self.use_graphs:
            x = self._run_graphed(z, y, steps)
        else:
            x = self.integrator.integrate(self._velocity_at(y), z, self.grid, generator=generator, steps=steps)
        return x[:n]

    def _prime_attention(self, n):
        """Time attention's candidates forward-only at this batch's shapes (n, and 2n for guided steps) before a
        compiled trace needs a choice it cannot time (kernels.prime_attention; a no-op on the CPU)."""
        if n in self._primed or not hasattr(self.model, "attention_shape"):
            return
        dtype = torch.float32 if self.config.precision == "fp32" else torch.bfloat16
        for guided in sorted(set(self.guided)):
            kernels.prime_attention(self.model.attention_shape(2 * n if guided else n), dtype, self.device,
                                    training=False)
        self._primed.add(n)

    # ------------------------------------------------------------------ CUDA graphs (the Euler step)
    def _capture(self, n, shape):
        dev = self.device
        st = {"x": torch.zeros((n, *shape), device=dev), "y": torch.zeros(n, dtype=torch.long, device=dev),
              "y_null": torch.full((n,), self.num_classes, dtype=torch.long, device=dev),
              "t": torch.zeros((), device=dev), "dt": torch.zeros((), device=dev)}

        def step(guided):  # the capturable integrator's update, x + dt * v(x, t0), with t and dt on the device
            v = self.velocity(st["x"], st["t"].expand(n), st["y"], st["y_null"], guided)
            st["x"].copy_(st["x"] + st["dt"] * v)
        kinds = sorted(set(self.guided))
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm-up: compilation, autotuning, attention choice happen here
            for guided in kinds:
                st["t"].fill_(0.5)
                for _ in range(3):
                    step(guided)
        torch.cuda.current_stream(dev).wait_stream(side)
        torch.cuda.synchronize(dev)
        graphs, pool = {}, None
        for guided in kinds:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                step(guided)
            pool = g.pool()
            graphs[guided] = g
        torch.cuda.synchronize(dev)
        return st, graphs

    def _run_graphed(self, z, y, steps):
        n = len(z)
        if n not in self._graphs:
            self._graphs = {n: self._capture(n, tuple(z.shape[1:]))}  # one batch size held at a time
        st, graphs = self._graphs[n]
        st["x"].copy_(z)
        st["y"].copy_(y)
        for i in steps:
            st["t"].copy_(self._grid_dev[i])
            st["dt"].copy_(self._dt_dev[i])
            graphs[self.guided[i]].replay()
        return st["x"].clone()


@torch.no_grad()
def decode_images(vae: torch.nn.Module, latents: torch.Tensor, precision: str = "fp32",
                  batch_size: Optional[int] = None) -> torch.Tensor:
    """uint8 (B, H, W, 3) from latents, batched; precision 'bf16' / 'bf16-weights' / 'fp8' decode under bf16
    autocast (GroupNorm and the final clamp stay fp32)."""
    dev = latents.device
    prec = "bf16" if precision in ("bf16", "bf16-weights", "fp8") else "fp32"
    bs = batch_size or len(latents)
    out = []
    for i in range(0, len(latents), bs):
        with autocast_context(dev, prec):
            out.append(vae.decode_to_images(latents[i:i + bs]))
    return torch.cat(out)


# ----------------------------------------------------------------------------- shared CLI arguments

# The command lines' execution defaults where they differ from SamplingConfig's (the library's exact path):
# a command on a CUDA machine uses CUDA graphs unless told otherwise.
CLI_DEFAULTS: dict = {"cudagraphs": "auto"}


def flag_name(field: str) -> str:
    """The command-line flag of a SamplingConfig field: cfg_scale -> --cfg-scale."""
    return "--" + field.replace("_", "-")


def add_sampling_args(parser: argparse.ArgumentParser, fast_default: bool = False) -> argparse.ArgumentParser:
    """The flags of every SamplingConfig field (type, choices and --help text from the dataclass), plus
    --preset, for modeling.sample_images and evaluation.generate; read them back with config_from_args.

    The settings (what is sampled) default to None = "not given": then --preset, else the settings stored with
    the model (a converted released checkpoint carries the authors'), else SamplingConfig's defaults. The
    execution flags default to SamplingConfig's, with CLI_DEFAULTS over them; fast_default (a CUDA machine):
    precision bf16-weights."""
    from .config import field_comments
    docs = field_comments(SamplingConfig)
    defaults = {f.name: f.default for f in dataclasses.fields(SamplingConfig)}
    defaults.update(CLI_DEFAULTS, **({"precision": "bf16-weights"} if fast_default else {}))
    g = parser.add_argument_group("sampler settings (not given: --preset, else stored with the model, else "
                                  + ", ".join(f"{k}={v}" for k, v in DEFAULT_SETTINGS.items()) + ")")
    g.add_argument("--preset", default=None,
                   help="the authors' settings for a released checkpoint: " + ", ".join(
                       sorted(SAMPLING_PRESETS) + sorted(PRESET_ALIASES)))
    x = parser.add_argument_group("execution (how it is computed: speed and rounding, not what is sampled)")
    for f in dataclasses.fields(SamplingConfig):
        setting = f.name in SETTING_KEYS
        group, tp = (g if setting else x), _HINTS[f.name]
        kw = dict(help=docs.get(f.name) or None, default=None if setting else defaults[f.name])
        if f.name == "method":  # the registry's names at the time the parser is built
            kw["choices"] = integrator_names()
        elif typing.get_origin(tp) is Literal:
            kw["choices"] = typing.get_args(tp)
        elif tp is bool:
            kw["action"] = "store_true" if not kw["default"] else argparse.BooleanOptionalAction
        else:
            kw["type"] = tp
        group.add_argument(flag_name(f.name), dest=f.name, **kw)
    return parser


def config_from_args(args: argparse.Namespace, stored: Optional[dict] = None,
                     stored_from: str = "the model") -> tuple[SamplingConfig, dict]:
    """(SamplingConfig, {setting: source}) from parsed add_sampling_args flags and the model's stored "sampling"
    settings (config.json). Settings resolve per key: given > --preset > stored > defaults (resolve_settings).
    A value no sampler can run raises SamplingConfigError naming its flag, or the preset / the model it came
    from (`stored_from`), before anything is loaded or sampled."""
    if stored is not None and not isinstance(stored, dict):
        raise SamplingConfigError("sampling", f"the sampling settings stored with {stored_from} (config.json "
                                              f"\"sampling\") must be a mapping, got {type(stored).__name__}")
    unknown = sorted(set(stored or {}) - STORED_KEYS, key=str)
    if unknown:  # a misspelt "cfg_sacle" sampled without guidance, silently
        raise SamplingConfigError("sampling", f"the sampling settings stored with {stored_from} (config.json "
                                              f"\"sampling\") have unknown key(s) {unknown}; known: "
                                              f"{sorted(STORED_KEYS)}")
    try:
        settings, sources = resolve_settings({k: getattr(args, k) for k in SETTING_KEYS}, args.preset, stored)
    except ValueError as e:
        raise SamplingConfigError("preset", f"--preset: {e}") from None
    execution = {f.name: getattr(args, f.name) for f in dataclasses.fields(SamplingConfig)
                 if f.name not in SETTING_KEYS}
    try:
        config = SamplingConfig(**settings, **execution).validate()
    except SamplingConfigError as e:
        source = sources.get(e.field, "given")
        where = (flag_name(e.field) if source == "given"
                 else f"the sampling settings stored with {stored_from} (config.json \"sampling\")"
                 if source == "stored with the model" else source)
        raise SamplingConfigError(e.field, f"{where}: {e}") from None
    return config, sources


def exact_fp32(config: "SamplingConfig", device: torch.device) -> None:
    """For the commands' `--precision fp32` on a GPU: TF32 off for cuDNN's convolutions (torch's default leaves it on:
    the patch embedding and every decoder convolution would round their inputs to 10-bit mantissas) and for
    matmuls (off by default), so that fp32 is the exact path the commands promise. Process-wide: a command's."""
    if config.precision == "fp32" and device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


@contextlib.contextmanager
def exact_fp32_within(config: "SamplingConfig", device: torch.device) -> typing.Iterator[None]:
    """exact_fp32 for the block only, the flags restored after: the trainer's evaluation with precision fp32
    samples as `generate --precision fp32` does, and its training keeps its own flags."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    exact_fp32(config, device)
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def tf32_flags() -> dict[str, bool]:
    """What a run record says about TF32 (cuDNN convolutions, CUDA matmuls)."""
    return {"cudnn": bool(torch.backends.cudnn.allow_tf32), "matmul": bool(torch.backends.cuda.matmul.allow_tf32)}


def on_device(device: Union[str, torch.device]) -> typing.ContextManager:
    """`device` made the current CUDA device for the block (a null context for any other device). Triton kernels,
    the CUDA extension, a CUDA graph's capture stream and the attention chooser's timing events all use the current
    device, not the tensors': on cuda:N with cuda:0 current, ours would read cuda:N's memory from cuda:0 and a
    captured graph would record nothing (torchrun's ranks 1-7 of `generate`)."""
    d = torch.device(device)
    return torch.cuda.device(d) if d.type == "cuda" else contextlib.nullcontext()


def check_device(device: Union[str, torch.device], flag: str = "--device") -> torch.device:
    """`device` as a torch.device (a bare "cuda" with the current GPU's index), or a ValueError naming `flag` where
    it cannot run here (not a device name, CUDA or MPS absent, a CUDA index past the last GPU) -- before any model
    is loaded."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{flag} {device!r}: not a device name ({' '.join(str(e).split())})") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{flag} {device}: CUDA is not available here (torch.cuda.is_available() is False); "
                             "use --device cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(f"{flag} {device}: there are {torch.cuda.device_count()} CUDA device(s) "
                             f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
        if d.index is None:  # "cuda": the current GPU, by its index (torch.cuda.set_device refuses a bare "cuda")
            d = torch.device("cuda", torch.cuda.current_device())
    elif d.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"{flag} {device}: MPS is not available here")
    elif d.type != "cpu":
        raise ValueError(f"{flag} {device}: sampling runs on cpu, cuda[:N] or mps, not {d.type!r}")
    return d
