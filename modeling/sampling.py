"""Samplers for the rectified flow: integrate dx/dt = v(x, t) from noise (t=0) to data (t=1).

The time grid is the reference's: linspace(0, 1, steps) mapped by the timestep shift
s*t / (1 + (s-1)*t) (s = 0.3 for the paper's FIDs), so `steps` grid points give `steps - 1`
model calls for Euler. Classifier-free guidance follows LightningDiT.forward_with_cfg; where a step
is below `cfg_interval_start` the unconditional half is not computed at all. The grid lives on the
host, so deciding that needs no device synchronisation.
"""
import contextlib
import copy
import dataclasses
import logging
import math
import typing
from typing import Literal

import torch

import kernels

log = logging.getLogger(__name__)

# The authors' sampling settings for each released checkpoint (configs/reproductions/*.yaml of their code):
# Euler ODE, 250 grid points, timestep shift 0.3, guidance only on latent channels 0..2 ("reference").
# Their cfg scales were tuned for that 3-channel guidance; all-channel guidance ("all") needs its own scale.
_PAPER = dict(method="euler", steps=250, shift=0.3, guidance="reference")
SAMPLING_PRESETS = {
    "lightningdit-xl-imagenet256-800ep": {
        "settings": dict(_PAPER, cfg_scale=6.7, cfg_interval_start=0.125),
        "training_config": "hustvl/LightningDiT configs/reproductions/lightningdit_xl_vavae_f16d32_800ep_cfg.yaml "
                           "(800 epochs; paper FID-50k 1.35 with these settings)"},
    "lightningdit-xl-imagenet256-64ep": {
        "settings": dict(_PAPER, cfg_scale=10.0, cfg_interval_start=0.10),
        "training_config": "hustvl/LightningDiT configs/reproductions/lightningdit_xl_vavae_f16d32_64ep_cfg.yaml "
                           "(64 epochs; paper FID-50k 2.11 with these settings)"},
}
PRESET_ALIASES = {"800ep": "lightningdit-xl-imagenet256-800ep", "64ep": "lightningdit-xl-imagenet256-64ep"}


def preset_for_name(name):
    """The preset whose released file this is (by file or folder name), or None."""
    stem = str(name).replace("\\", "/").rstrip("/").split("/")[-1]
    stem = stem.rsplit(".", 1)[0] if stem.endswith((".pt", ".pth", ".safetensors")) else stem
    return stem if stem in SAMPLING_PRESETS else None


SETTING_KEYS = ("method", "steps", "shift", "cfg_scale", "cfg_interval_start", "guidance")
DEFAULT_SETTINGS = dict(method="euler", steps=250, shift=0.3, cfg_scale=1.0, cfg_interval_start=0.0, guidance="all")


def resolve_settings(explicit=None, preset=None, stored=None):
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


def preset_settings(name):
    """The sampling settings (method, steps, shift, cfg_scale, cfg_interval_start, guidance) of a preset."""
    key = PRESET_ALIASES.get(name, name)
    if key not in SAMPLING_PRESETS:
        raise ValueError(f"unknown sampling preset {name!r}; known: {sorted(SAMPLING_PRESETS) + sorted(PRESET_ALIASES)}")
    return dict(SAMPLING_PRESETS[key]["settings"])


def timestep_shift(t, s):
    return s * t / (1 + (s - 1) * t)


def time_grid(steps, shift=1.0, device=None, dtype=torch.float32):
    t = torch.linspace(0, 1, steps, dtype=dtype, device=device)
    return timestep_shift(t, shift) if shift != 1.0 else t


class GuidedVelocity:
    """v(x, t) for a batch of conditional samples, with optional guidance."""

    def __init__(self, model, y, cfg_scale=1.0, cfg_interval_start=0.0, guidance="all", null_class=None):
        self.model, self.y = model, y
        self.cfg_scale, self.cfg_interval_start, self.guidance = cfg_scale, cfg_interval_start, guidance
        null = model.num_classes if null_class is None else null_class
        self.y_null = torch.full_like(y, null)
        if guidance not in ("all", "reference"):
            raise ValueError(f"guidance must be 'all' or 'reference', got {guidance!r}")

    def __call__(self, x, t: float):
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)
        if self.cfg_scale == 1.0 or t < self.cfg_interval_start:
            return self.model(x, tt, self.y)
        out = self.model.forward_with_cfg(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([self.y, self.y_null]),
                                          self.cfg_scale, self.cfg_interval_start, self.guidance)
        return out[: x.shape[0]]


@torch.no_grad()
def sample(model, z, y, steps=250, method="euler", shift=0.3, cfg_scale=1.0, cfg_interval_start=0.0,
           guidance="all", return_trajectory=False, generator=None, diffusion_norm=1.0, atol=1e-6, rtol=1e-3):
    """Draw samples from noise z (B, C, H, W) with labels y (B,).

    method: "euler" / "heun" on the shifted grid, "dopri5" (adaptive, torchdiffeq; `steps` only sets the
    output grid), "euler_maruyama" (SDE with the score from the velocity; `diffusion_norm` scales the noise).
    Returns the final latents, or (final, trajectory (steps, B, C, H, W)) with return_trajectory.
    """
    v = GuidedVelocity(model, y, cfg_scale, cfg_interval_start, guidance)
    grid = time_grid(steps, shift, dtype=torch.float64).tolist()
    x = z
    traj = [x] if return_trajectory else None
    if method == "dopri5":
        from torchdiffeq import odeint
        tgrid = torch.tensor(grid, device=z.device, dtype=torch.float32)
        # torchdiffeq evaluates at arbitrary t: guidance on/off is decided per evaluation (host float).
        out = odeint(lambda t, x_: v(x_, float(t)), z, tgrid, method="dopri5", atol=atol, rtol=rtol)
        return (out[-1], out) if return_trajectory else out[-1]
    for i in range(len(grid) - 1):
        t0, t1 = grid[i], grid[i + 1]
        dt = t1 - t0
        if method == "euler":
            x = x + dt * v(x, t0)
        elif method == "heun":
            d0 = v(x, t0)
            x_pred = x + dt * d0
            x = x + dt * 0.5 * (d0 + v(x_pred, t1))
        elif method == "euler_maruyama":
            x = _euler_maruyama_step(v, x, t0, t1, i == len(grid) - 2, generator, diffusion_norm)
        else:
            raise ValueError(f"unknown sampling method {method!r}")
        if return_trajectory:
            traj.append(x)
    return (x, torch.stack(traj)) if return_trajectory else x


def _euler_maruyama_step(v, x, t0, t1, last, generator, diffusion_norm):
    """SDE with the ODE's marginals: dx = [v + 0.5 g^2 score] dt + g dW. For the linear path
    (x = t x1 + (1 - t) x0) the score is (t v - x) / (1 - t); g^2 = 2 * diffusion_norm * t * (1 - t) keeps
    the drift bounded at both ends. The last step is deterministic (lands on the mean, as SiT's "Mean")."""
    dt = t1 - t0
    vel = v(x, t0)
    if last:
        return x + dt * vel
    drift = vel + diffusion_norm * t0 * (t0 * vel - x)  # 0.5 g^2 * score
    g2 = 2 * diffusion_norm * t0 * (1 - t0)
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x + drift * dt + math.sqrt(g2 * dt) * noise


# ----------------------------------------------------------------------------- the fast sampling path
#
# `Sampler` is what evaluation.generate, the training-time evaluation and the speed benchmark call: one
# object per (model, settings), reused for every batch. fp32 + eager computes exactly `sample` (tested
# bit-for-bit); the fast options change how, not what, is computed:
#   precision  "fp32" | "bf16" (autocast on the fp32 weights, as training) | "bf16-weights" (a bf16 copy)
#              | "fp8" (the bf16 copy with the blocks' qkv / proj / w12 / w3 matmuls in FP8: weights quantized
#              once, activations per call, dynamic scales per row by default, per tensor with
#              fp8_recipe="tensorwise"; fp8_impl "scaled_mm" is our FP8Linear (modeling/fp8.py), "torchao"
#              torchao's float8 training modules; an FP8 GPU, or fp8_emulation=True for accuracy checks on the CPU)
#              -- the ODE state, the time grid, the guidance mix and the Euler update stay fp32;
#   fused_mlp  each SwiGLU MLP's w12 GEMM and SwiGLU as one Triton kernel (kernels/linear_swiglu.py): the
#              (rows, 2H) product is never written (bf16-weights or fp32; a CUDA device);
#   compile    "none" | "blocks" (torch.compile of each block, static shapes: one graph per batch shape)
#              | "model" (torch.compile of the whole forward, static shapes); autotune=True compiles with
#              mode "max-autotune-no-cudagraphs" (inductor benchmarks Triton GEMM templates with fused
#              epilogues against cuBLAS; minutes of compilation; the CUDA graphs stay ours);
#   cudagraphs "off" | "on" | "auto" (on where the device is CUDA and the method is Euler): the guided and
#              the unguided Euler step are each captured once per batch size and replayed, so a step
#              costs one launch. An explicit request that cannot run is an error, never a fallback.

PRECISIONS = ("fp32", "bf16", "bf16-weights", "fp8")
FP8_RECIPES = ("rowwise", "tensorwise")
FP8_IMPLS = ("scaled_mm", "torchao")
COMPILE_MODES = ("none", "blocks", "model")
CUDAGRAPH_MODES = ("off", "on", "auto")


@dataclasses.dataclass
class SamplingConfig:
    """Every sampling option, declared once: the CLI flags (add_sampling_args), the trainer's `eval.*` keys,
    the presets, `generate`, the sample-speed specs and config.json's "sampling" are derived from it.

    The first six fields say WHAT is sampled (SETTING_KEYS: they change the samples); the rest say HOW it is
    computed (precision, compilation, CUDA graphs: they change speed and rounding only)."""
    # -- what is sampled
    method: Literal["euler", "heun", "dopri5", "euler_maruyama"] = "euler"  # an INTEGRATORS key
    steps: int = 250                    # grid points: steps - 1 Euler model calls
    shift: float = 0.3                  # timestep shift s*t / (1 + (s-1)*t) of the grid (1.0 = uniform)
    cfg_scale: float = 1.0              # classifier-free guidance scale (1.0 = no guidance)
    cfg_interval_start: float = 0.0     # guidance only for grid times t >= this
    guidance: Literal["all", "reference"] = "all"  # reference: the authors' guidance of latent channels 0..2 only
    # -- how it is computed
    precision: Literal["fp32", "bf16", "bf16-weights", "fp8"] = "fp32"  # bf16: autocast; bf16-weights: a bf16 copy
    fp8_recipe: Literal["rowwise", "tensorwise"] = "rowwise"   # precision fp8: dynamic scales per row / tensor
    fp8_impl: Literal["scaled_mm", "torchao"] = "scaled_mm"    # precision fp8: our FP8Linear or torchao's modules
    compile: Literal["none", "blocks", "model"] = "none"       # torch.compile of the sampler's model copy
    autotune: bool = False              # compile with inductor's max-autotune (minutes of compilation)
    fused_mlp: bool = False             # w12 GEMM + SwiGLU as one Triton kernel (bf16-weights or fp32, CUDA)
    cudagraphs: Literal["off", "on", "auto"] = "off"           # each Euler step a CUDA graph (auto: on CUDA)

    def validate(self) -> "SamplingConfig":
        """Raise ValueError naming the field for a value no sampler can run; returns self."""
        for f in dataclasses.fields(self):
            choices = typing.get_args(f.type) if typing.get_origin(f.type) is Literal else None
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"sampling {f.name} must be one of {choices}, got {getattr(self, f.name)!r}")
        if self.steps < 2:
            raise ValueError(f"sampling steps must be >= 2 (grid points; steps - 1 model calls), got {self.steps}")
        for name in ("shift", "cfg_scale", "cfg_interval_start"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"sampling {name} must be a finite number, got {getattr(self, name)}")
        if self.shift <= 0:
            raise ValueError(f"sampling shift must be > 0, got {self.shift}")
        return self

    def settings(self) -> dict:
        """The SETTING_KEYS part (what is sampled), as config.json's "sampling" stores it."""
        return {k: getattr(self, k) for k in SETTING_KEYS}

    def replace(self, **changes) -> "SamplingConfig":
        return dataclasses.replace(self, **changes).validate()


class SamplerUnavailable(RuntimeError):
    """An explicitly requested sampling path cannot run here."""


def _shared_copy(model):
    """A structural copy of `model` whose parameters and buffers are the original tensors (no memory)."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def autocast_context(device, precision):
    """bf16 autocast for precision 'bf16' (weight cast cache off: required under CUDA graph capture)."""
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, cache_enabled=False)


class Sampler:
    """Euler (or another method) on the shifted grid with guidance, in the precision / compile / CUDA graph
    mode asked for. `sampler(z, y)` -> final latents (fp32, on z's device); `sampler.describe()` says what ran.
    """

    def __init__(self, model, steps=250, method="euler", shift=0.3, cfg_scale=1.0, cfg_interval_start=0.0,
                 guidance="all", precision="fp32", compile="none", cudagraphs="off", device=None,
                 static_batch=None, autotune=False, fp8_recipe="rowwise", fp8_emulation=False, fused_mlp=False,
                 fp8_impl="scaled_mm"):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if fp8_recipe not in FP8_RECIPES:
            raise ValueError(f"fp8_recipe must be one of {FP8_RECIPES}, got {fp8_recipe!r}")
        if fp8_impl not in FP8_IMPLS:
            raise ValueError(f"fp8_impl must be one of {FP8_IMPLS}, got {fp8_impl!r}")
        if autotune and compile == "none":
            raise SamplerUnavailable("autotune is a torch.compile mode: it needs compile='blocks' or 'model'")
        if fused_mlp and precision not in ("bf16-weights", "fp32"):
            raise SamplerUnavailable(f"fused_mlp runs with precision bf16-weights or fp32, not {precision!r} (the "
                                     "fused kernel reads the weights directly: no autocast, no FP8)")
        if compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {COMPILE_MODES}, got {compile!r}")
        if cudagraphs not in CUDAGRAPH_MODES:
            raise ValueError(f"cudagraphs must be one of {CUDAGRAPH_MODES}, got {cudagraphs!r}")
        if guidance not in ("all", "reference"):
            raise ValueError(f"guidance must be 'all' or 'reference', got {guidance!r}")
        if steps < 2:
            raise ValueError(f"steps must be >= 2 (grid points; steps - 1 model calls), got {steps}")
        self.device = torch.device(device if device is not None else next(model.parameters()).device)
        self.steps, self.method, self.shift = steps, method, shift
        self.cfg_scale, self.cfg_interval_start, self.guidance = cfg_scale, cfg_interval_start, guidance
        self.precision, self.compile_mode, self.autotune = precision, compile, bool(autotune)
        self.fused_mlp = bool(fused_mlp)
        self.fp8 = None
        if cudagraphs == "on":
            if self.device.type != "cuda":
                raise SamplerUnavailable(f"CUDA graphs were requested but the sampler runs on {self.device}; "
                                         "use cudagraphs='auto' or 'off'")
            if method != "euler":
                raise SamplerUnavailable(f"CUDA graphs are implemented for the Euler sampler, not {method!r}")
        if compile != "none" and method != "euler":
            raise SamplerUnavailable(f"compile={compile!r} is implemented for the Euler sampler, not {method!r}")
        self.use_graphs = cudagraphs == "on" or (cudagraphs == "auto" and self.device.type == "cuda"
                                                 and method == "euler")
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
                    self.fp8 = f"{check_scaled_mm(self.device, fp8_emulation, remedy)}, {fp8_recipe} scaling"
                    apply_fp8_inference(model, fp8_recipe, fp8_emulation, remedy)
                else:
                    self.fp8 = f"{check_fp8('torchao', self.device, fp8_emulation, remedy)}, {fp8_recipe} scaling"
                    apply_fp8(model, "torchao", fp8_recipe, fp8_emulation, remedy)
            except FP8Unavailable as e:
                raise SamplerUnavailable(f"precision fp8: {e}") from None
        mode = "max-autotune-no-cudagraphs" if autotune else None
        if compile == "blocks":
            for block in model.blocks:
                block.compile(dynamic=False, mode=mode)
            self.forward = model
        elif compile == "model":
            self.forward = torch.compile(model, dynamic=False, mode=mode)
        else:
            self.forward = model
        self.model = model
        grid = time_grid(steps, shift, dtype=torch.float64).tolist()
        self.grid = grid
        self.guided = [cfg_scale != 1.0 and t >= cfg_interval_start for t in grid[:-1]]
        self._grid_dev = torch.tensor(grid[:-1], dtype=torch.float32, device=self.device)
        self._dt_dev = torch.tensor([b - a for a, b in zip(grid[:-1], grid[1:])], dtype=torch.float32,
                                    device=self.device)
        self.static_batch = static_batch
        self._graphs = {}
        self._primed = set()
        self._logged = False

    # ------------------------------------------------------------------ what ran
    def describe(self):
        return {"method": self.method, "steps": self.steps, "shift": self.shift, "cfg_scale": self.cfg_scale,
                "cfg_interval_start": self.cfg_interval_start, "guidance": self.guidance,
                "precision": self.precision, "fused_mlp": self.fused_mlp, "compile": self.compile_mode,
                "autotune": self.autotune,
                "fp8": self.fp8, "cudagraphs": "on" if self.use_graphs else "off", "device": str(self.device),
                "guided_steps": sum(self.guided), "model_calls": len(self.grid) - 1,
                "static_batch": self.static_batch}

    # ------------------------------------------------------------------ the velocity
    def _model_out(self, x, t, y):
        """The model's velocity in fp32 for fp32 state x, (B,) times t, labels y."""
        if self.precision in ("bf16-weights", "fp8"):
            return self.forward(x.to(torch.bfloat16), t, y).float()
        with autocast_context(self.device, self.precision):
            out = self.forward(x, t, y)
        return out.float()

    def velocity(self, x, t, y, y_null, guided):
        """v(x, t): conditional where not guided; else LightningDiT.forward_with_cfg's mix (t >= interval
        start), computed from an fp32 copy of the model output. t: (B,) on the device."""
        if not guided:
            return self._model_out(x, t, y)
        out = self._model_out(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_null]))
        if self.guidance == "reference":  # the authors' code guides latent channels 0..2 only
            g, rest = out[:, :3], out[:, 3:]
        else:
            g, rest = out, out[:, :0]
        cond, uncond = g.chunk(2, dim=0)
        mixed = uncond + self.cfg_scale * (cond - uncond)
        return torch.cat([mixed, rest[: len(x)]], dim=1)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def __call__(self, z, y, generator=None, progress=False):
        """Final latents for noise z (B, C, H, W) and labels y (B,); progress: a tqdm bar over the steps."""
        if not self._logged:
            log.info("sampler: %s", self.describe())
            self._logged = True
        z = z.to(self.device, torch.float32)
        y = y.to(self.device)
        n = len(z)
        if self.method != "euler":
            with autocast_context(self.device, self.precision):
                return sample(self.model, z, y, steps=self.steps, method=self.method, shift=self.shift,
                              cfg_scale=self.cfg_scale, cfg_interval_start=self.cfg_interval_start,
                              guidance=self.guidance, generator=generator).float()
        if (self.use_graphs or self.compile_mode != "none") and self.static_batch is None:
            self.static_batch = n  # one static shape: smaller batches are padded to it
        if self.static_batch is not None and n < self.static_batch:
            pad = self.static_batch - n
            z = torch.cat([z, z.new_zeros((pad, *z.shape[1:]))])
            y = torch.cat([y, y.new_zeros(pad)])
        elif self.static_batch is not None and n > self.static_batch:
            raise ValueError(f"batch {n} is larger than this sampler's static batch {self.static_batch}")
        self._prime_attention(len(z))
        steps = range(len(self.grid) - 1)
        if progress:
            from tqdm import tqdm
            steps = tqdm(steps, desc="sampling", unit="step", leave=False)
        x = self._run_graphed(z, y, steps) if self.use_graphs else self._run_eager(z, y, steps)
        return x[:n]

    def _prime_attention(self, n):
        """Time attention's candidates forward-only at this batch's shapes (n, and 2n for guided steps) before a
        compiled trace needs a choice it cannot time (kernels.prime_attention; a no-op on the CPU)."""
        if n in self._primed or not hasattr(self.model, "attention_shape"):
            return
        dtype = torch.float32 if self.precision == "fp32" else torch.bfloat16
        for guided in sorted(set(self.guided)):
            kernels.prime_attention(self.model.attention_shape(2 * n if guided else n), dtype, self.device,
                                    training=False)
        self._primed.add(n)

    def _run_eager(self, z, y, steps):
        y_null = torch.full_like(y, self.num_classes)
        x = z
        for i in steps:
            t0, t1 = self.grid[i], self.grid[i + 1]
            t = torch.full((len(x),), t0, device=x.device, dtype=torch.float32)
            x = x + (t1 - t0) * self.velocity(x, t, y, y_null, self.guided[i])
        return x

    # ------------------------------------------------------------------ CUDA graphs
    def _capture(self, n, shape):
        dev = self.device
        st = {"x": torch.zeros((n, *shape), device=dev), "y": torch.zeros(n, dtype=torch.long, device=dev),
              "y_null": torch.full((n,), self.num_classes, dtype=torch.long, device=dev),
              "t": torch.zeros((), device=dev), "dt": torch.zeros((), device=dev)}

        def step(guided):
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
def decode_images(vae, latents, precision="fp32", batch_size=None):
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

def add_sampling_args(p, fast_default=False):
    """The sampler settings and execution flags of modeling.sample_images and evaluation.generate.

    Sampler settings default to None = "not given": then --preset, else the settings stored with the model
    (a converted released checkpoint carries the authors'), else DEFAULT_SETTINGS."""
    g = p.add_argument_group("sampler settings (not given: --preset, else stored with the model, else "
                             + ", ".join(f"{k}={v}" for k, v in DEFAULT_SETTINGS.items()) + ")")
    g.add_argument("--preset", default=None,
                   help="the authors' settings for a released checkpoint: " + ", ".join(
                       sorted(SAMPLING_PRESETS) + sorted(PRESET_ALIASES)))
    g.add_argument("--method", default=None, choices=["euler", "heun", "dopri5", "euler_maruyama"])
    g.add_argument("--steps", type=int, default=None, help="grid points (steps - 1 Euler model calls)")
    g.add_argument("--shift", type=float, default=None, help="timestep shift s*t/(1+(s-1)*t)")
    g.add_argument("--cfg-scale", type=float, default=None)
    g.add_argument("--cfg-interval-start", type=float, default=None, help="no guidance for t below this")
    g.add_argument("--guidance", choices=["all", "reference"], default=None,
                   help="reference: the authors' guidance of latent channels 0..2 only (their cfg scales were "
                        "tuned for it); all: standard guidance on every channel (needs its own cfg scale)")
    x = p.add_argument_group("execution")
    x.add_argument("--precision", choices=PRECISIONS, default="bf16-weights" if fast_default else "fp32",
                   help="bf16: autocast on the fp32 weights; bf16-weights: a bf16 copy; fp8: that copy with the "
                        "blocks' matmuls in FP8 (an FP8 GPU; see docs/sampling.md for its accuracy); "
                        "the ODE state stays fp32")
    x.add_argument("--fp8-recipe", choices=FP8_RECIPES, default="rowwise",
                   help="--precision fp8: dynamic scales per row, or per tensor")
    x.add_argument("--fp8-impl", choices=FP8_IMPLS, default="scaled_mm",
                   help="--precision fp8: our FP8Linear (weights quantized once, one torch._scaled_mm), or "
                        "torchao's float8 training modules")
    x.add_argument("--fused-mlp", action="store_true",
                   help="each MLP's w12 GEMM + SwiGLU as one Triton kernel (bf16-weights or fp32, a CUDA GPU)")
    x.add_argument("--compile", choices=COMPILE_MODES, default="none",
                   help="torch.compile with static shapes: each block, or the whole forward")
    x.add_argument("--autotune", action="store_true",
                   help="with --compile: inductor's max-autotune (Triton GEMMs with fused epilogues where they "
                        "measure faster; minutes of compilation)")
    x.add_argument("--cudagraphs", choices=CUDAGRAPH_MODES, default="auto",
                   help="capture each Euler step as a CUDA graph (auto: on CUDA; on: error where impossible)")
    return p


def execution_from_args(a):
    """The Sampler's execution options (how, not what, it computes) from parsed add_sampling_args flags."""
    return dict(precision=a.precision, compile=a.compile, cudagraphs=a.cudagraphs, autotune=a.autotune,
                fp8_recipe=a.fp8_recipe, fp8_impl=a.fp8_impl, fused_mlp=a.fused_mlp)


def settings_from_args(a, stored=None):
    """(settings, sources) from parsed add_sampling_args flags and the model's stored "sampling" dict."""
    explicit = {k: getattr(a, k) for k in SETTING_KEYS}
    return resolve_settings(explicit, a.preset, stored)
