"""The authors' LightningDiT training step, from their code, timed in the same run as ours (the GPU suite's
`authors_dit` section, part A).

    bash scripts/prepare_gpu_carry.sh            # here: .authors/LightningDiT/{models,transport,configs} (+ vavae/)
    python -m bench.authors_dit --authors .authors --batch 256 --out OUT/authors_dit.json     # on the GPU machine

Their code is never committed here: `scripts/prepare_gpu_carry.sh` copies hustvl/LightningDiT's `models/`,
`transport/` and `configs/` into the git-ignored `.authors/LightningDiT/`, and the run carries them. This process
builds their LightningDiT from their 64-epoch reproduction config (XL/1, SwiGLU, RoPE, RMSNorm, 32 latent channels;
their blocks carry their own `@torch.compile`), their `create_transport` (linear path, velocity, logit-normal time,
cosine loss), and runs the body of their `train.py` loop as `run_train.sh` launches it on one GPU (`accelerate
launch --mixed_precision bf16`): the model wrapped in DDP (one rank), its forward under bf16 autocast with the
output cast to fp32 (what accelerate's `prepare` does), `transport.training_losses`, mse + cosine loss, zero_grad,
backward, AdamW (lr 2e-4, betas (0.9, beta2), no weight decay, torch's default implementation), their
`update_ema` (the per-parameter loop, taken from their train.py by its source: the module itself imports diffusers
and accelerate), and `loss.item()` every step. Latents and labels are random tensors on the device (their loader
is not timed: this favours them). It runs in its own process: its stand-ins never reach our code, its peak memory
is its own.

What stands in where a package is absent (the GPU machine has no network): timm's `PatchEmbed` / `Mlp` (their model
imports both, uses PatchEmbed: a strided Conv2d, flatten, transpose -- written here to timm's behaviour) and
fairscale (their rmsnorm.py imports its model-parallel layers and never uses them). The JSON says which ran.
"""
from __future__ import annotations

import ast
import json
import socket
import sys
import time
import types
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:  # (annotations only: torch loads inside the functions)
    import torch

CONFIG = "LightningDiT/configs/reproductions/lightningdit_xl_vavae_f16d32_64ep_cfg.yaml"
NEEDED = ("LightningDiT/models/lightningdit.py", "LightningDiT/transport/__init__.py", "LightningDiT/train.py", CONFIG)


class AuthorsCodeMissing(FileNotFoundError):
    pass


def _timm_stand_in() -> dict[str, types.ModuleType]:
    import torch.nn as nn

    class PatchEmbed(nn.Module):
        """timm's PatchEmbed as their model calls it: Conv2d(kernel = stride = patch), flatten to (B, N, C)."""

        def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, bias=True, **kw):
            super().__init__()
            img = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
            patch = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
            self.img_size, self.patch_size = img, patch
            self.grid_size = (img[0] // patch[0], img[1] // patch[1])
            self.num_patches = self.grid_size[0] * self.grid_size[1]
            self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch, stride=patch, bias=bias)
            self.norm = nn.Identity()

        def forward(self, x):
            return self.norm(self.proj(x).flatten(2).transpose(1, 2))

    class Mlp(nn.Module):
        """timm's Mlp (fc1, act, fc2; no dropout in their use)."""

        def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, drop=0.0, **kw):
            super().__init__()
            self.fc1 = nn.Linear(in_features, hidden_features or in_features)
            self.act = act_layer()
            self.fc2 = nn.Linear(hidden_features or in_features, out_features or in_features)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))

    vit = types.ModuleType("timm.models.vision_transformer")
    vit.PatchEmbed, vit.Mlp = PatchEmbed, Mlp
    timm, models = types.ModuleType("timm"), types.ModuleType("timm.models")
    timm.models, models.vision_transformer = models, vit
    return {"timm": timm, "timm.models": models, "timm.models.vision_transformer": vit}


def _fairscale_stand_in() -> dict[str, types.ModuleType]:
    mods = {name: types.ModuleType(name) for name in ("fairscale", "fairscale.nn", "fairscale.nn.model_parallel",
                                                      "fairscale.nn.model_parallel.initialize",
                                                      "fairscale.nn.model_parallel.layers")}
    for cls in ("ColumnParallelLinear", "ParallelEmbedding", "RowParallelLinear"):
        setattr(mods["fairscale.nn.model_parallel.layers"], cls, type(cls, (), {}))
    mods["fairscale"].nn = mods["fairscale.nn"]
    mods["fairscale.nn"].model_parallel = mods["fairscale.nn.model_parallel"]
    mods["fairscale.nn.model_parallel"].initialize = mods["fairscale.nn.model_parallel.initialize"]
    mods["fairscale.nn.model_parallel"].layers = mods["fairscale.nn.model_parallel.layers"]
    return mods


def install_stand_ins(root: Path, needed: tuple[str, ...] = NEEDED) -> dict[str, str]:
    """Put their tree on sys.path with stand-ins for the absent packages; returns what stands in for what."""
    missing = [p for p in needed if not (root / p).is_file()]
    if missing:
        raise AuthorsCodeMissing(f"the authors' code is not in {root}: missing {', '.join(missing)}; prepare it with "
                                 "`bash scripts/prepare_gpu_carry.sh` (hustvl/LightningDiT models/, transport/, "
                                 "configs/, train.py)")
    sys.path.insert(0, str(root / "LightningDiT"))
    record = {}
    for name, make in (("timm", _timm_stand_in), ("fairscale", _fairscale_stand_in)):
        try:
            __import__(name)
            record[name] = "installed"
        except Exception as e:  # absent, or a build that does not match this torch
            sys.modules.update(make())
            record[name] = f"stand-in ({type(e).__name__}): " + (
                "PatchEmbed and Mlp written to timm's behaviour" if name == "timm" else
                "empty model-parallel modules (imported by their rmsnorm.py, never used)")
    return record


def their_function(train_py: Path, name: str) -> Callable:
    """A top-level function of their train.py, compiled from its own source (the module cannot be imported here: it
    imports diffusers, accelerate and tensorboard at the top)."""
    import torch
    tree = ast.parse(train_py.read_text())
    fn = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name), None)
    if fn is None:
        raise AuthorsCodeMissing(f"{train_py} has no function {name}")
    from collections import OrderedDict
    scope = dict(torch=torch, OrderedDict=OrderedDict)  # what their train.py's imports give the function
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(train_py), "exec"), scope)  # their code, as shipped
    return scope[name]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def their_model(root: Path, config: str = CONFIG, model_spec: Optional[dict] = None,
                also_needed: tuple[str, ...] = ()) -> dict[str, Any]:
    """Their LightningDiT as their config `config` builds it (their code on sys.path, stand-ins installed);
    model_spec: LightningDiT keyword arguments replacing their model type (tiny CPU runs). Returns the model, the
    config, the latent shape and what stood in."""
    import yaml
    record = install_stand_ins(root, NEEDED[:2] + (config,) + also_needed)
    from models.lightningdit import LightningDiT, LightningDiT_models
    cfg = yaml.safe_load((root / config).read_text())
    m = cfg["model"]
    latent = cfg["data"]["image_size"] // cfg["vae"]["downsample_ratio"]
    kwargs = dict(input_size=latent, num_classes=cfg["data"]["num_classes"], use_qknorm=m["use_qknorm"],
                  use_swiglu=m["use_swiglu"], use_rope=m["use_rope"], use_rmsnorm=m["use_rmsnorm"],
                  wo_shift=m["wo_shift"], in_channels=m["in_chans"], use_checkpoint=False)
    model = (LightningDiT(**{**kwargs, **model_spec}) if model_spec
             else LightningDiT_models[m["model_type"]](**kwargs))
    spec = {**kwargs, **(model_spec or {})}
    return {"model": model, "config": cfg, "in_channels": spec["in_channels"], "input_size": spec["input_size"],
            "num_classes": spec["num_classes"], "model_type": "custom" if model_spec else m["model_type"],
            "stand_ins": record}


def build(root: Path, device: str, model_spec: Optional[dict] = None) -> dict[str, Any]:
    """Their model (DDP, one rank), EMA copy, transport and AdamW from their config; model_spec: LightningDiT keyword
    arguments replacing their model type (tiny CPU runs). Returns the parts and what stood in."""
    import copy

    import torch
    import torch.distributed as dist
    built = their_model(root, CONFIG, model_spec, also_needed=NEEDED[2:])
    from transport import create_transport
    model, cfg = built["model"], built["config"]
    tr, opt_cfg = cfg["transport"], cfg["optimizer"]
    ema = copy.deepcopy(model).to(device)
    ema.requires_grad_(False)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    cuda = torch.device(device).type == "cuda"
    ddp = torch.nn.parallel.DistributedDataParallel(model.to(device), device_ids=[0] if cuda else None)
    transport = create_transport(tr["path_type"], tr["prediction"], tr["loss_weight"], tr["train_eps"],
                                 tr["sample_eps"], use_cosine_loss=tr["use_cosine_loss"], use_lognorm=tr["use_lognorm"])
    opt = torch.optim.AdamW(ddp.parameters(), lr=opt_cfg["lr"], weight_decay=0, betas=(0.9, opt_cfg["beta2"]))
    update_ema = their_function(root / "LightningDiT" / "train.py", "update_ema")
    update_ema(ema, ddp.module, decay=0)  # as their train.py: the EMA starts at the weights
    ddp.train()
    ema.eval()
    # accelerate's prepare under --mixed_precision bf16: the forward in bf16 autocast, its outputs cast to fp32
    plain_forward = ddp.forward

    def forward(*args, **kw):
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            out = plain_forward(*args, **kw)
        return out.float()
    ddp.forward = forward
    return {**built, "model": ddp, "ema": ema, "transport": transport, "opt": opt, "update_ema": update_ema}


def their_compile() -> str:
    """Whether their blocks' own `@torch.compile` ran: "on", or "off" where torch.compile is disabled
    (TORCH_COMPILE_DISABLE=1: the GPU suite's CPU smoke, where compiling their blocks cold took ~45 of the section's
    ~50 s and measured nothing)."""
    import torch._dynamo
    return "off (TORCH_COMPILE_DISABLE)" if torch._dynamo.config.disable else "on"


def their_step(parts: dict, x: torch.Tensor, y: torch.Tensor) -> float:
    """The body of their train.py loop (accelerate's backward is loss.backward() at one rank, no gradient scaler
    under bf16; their config has no max_grad_norm, so no clipping)."""
    model, opt = parts["model"], parts["opt"]
    loss_dict = parts["transport"].training_losses(model, x, dict(y=y))
    if "cos_loss" in loss_dict:
        mse_loss = loss_dict["loss"].mean()
        loss = loss_dict["cos_loss"].mean() + mse_loss
    else:
        loss = mse_loss = loss_dict["loss"].mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    parts["update_ema"](parts["ema"], model.module)
    return mse_loss.item()


def time_their_step(parts: dict, batch: int, device: str, warmup: int, steps: int) -> dict:
    """img/s, ms per step and peak memory of their step at this batch (OOM -> raises)."""
    import torch
    g = torch.Generator(device).manual_seed(0)
    s = parts["input_size"]
    x = torch.randn((batch, parts["in_channels"], s, s), generator=g, device=device)
    y = torch.randint(0, parts["num_classes"], (batch,), generator=g, device=device)
    cuda = torch.device(device).type == "cuda"
    losses = [their_step(parts, x, y) for _ in range(warmup)]
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    losses += [their_step(parts, x, y) for _ in range(steps)]
    if cuda:
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    return {"batch": batch, "img_per_s": round(batch * steps / dt, 2), "step_ms": round(1000 * dt / steps, 1),
            "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2) if cuda else None,
            "steps": steps, "warmup": warmup, "losses": [round(v, 5) for v in losses]}


def main(argv: Optional[list[str]] = None) -> int:
    from modeling.config import cli_parser
    ap = cli_parser("bench.authors_dit", __doc__)
    ap.add_argument("--authors", default=".authors", help="folder prepared by scripts/prepare_gpu_carry.sh")
    ap.add_argument("--out", default="runs/authors_dit.json", help="JSON result file")
    ap.add_argument("--batch", type=int, default=256, help="their per-GPU batch (ours: the suite's headline batch)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps (their blocks compile in the first)")
    ap.add_argument("--steps", type=int, default=8, help="timed steps")
    ap.add_argument("--device", default=None, help="default: cuda when available")
    ap.add_argument("--model", default=None, help="JSON of LightningDiT keyword arguments replacing their XL/1 "
                                                  "(tiny CPU runs)")
    a = ap.parse_args(argv)
    import torch
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parts = build(Path(a.authors), device, json.loads(a.model) if a.model else None)
    except AuthorsCodeMissing as e:
        print(f"bench.authors_dit: {e}", file=sys.stderr)
        return 2
    r = time_their_step(parts, a.batch, device, a.warmup, a.steps)
    commit = Path(a.authors) / "LightningDiT" / "COMMIT"
    from evaluation import provenance
    result = {"what": "the authors' train.py step (hustvl/LightningDiT), bf16 autocast as run_train.sh launches it, "
                      "one rank", "model": parts["model_type"], "config": CONFIG,
              "authors_commit": commit.read_text().strip() if commit.is_file() else None,
              "stand_ins": parts["stand_ins"], "their_torch_compile": their_compile(), **r,
              "environment": provenance.environment(torch.device(device))}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"authors' LightningDiT step, {parts['model_type']}, batch {a.batch}: {r['img_per_s']} img/s, "
          f"{r['step_ms']} ms/step, peak {r['peak_mem_gib']} GiB -> {a.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
