"""The authors' VA-VAE training step, from their code, timed beside ours (bench.vae_step --authors DIR).

    bash scripts/prepare_gpu_carry.sh            # here: .authors/ = hustvl/LightningDiT's vavae/ + taming (PyPI)
    python -m bench.authors_vae --authors .authors --out OUT/authors_vae.json     # on the GPU machine

Their code is never committed here: `scripts/prepare_gpu_carry.sh` copies it into the git-ignored `.authors/`
(`.authors/LightningDiT/vavae/` from github.com/hustvl/LightningDiT, `.authors/taming/` from the
taming-transformers wheel their `ldm` imports), and the run carries it. This process builds their
`ldm.models.autoencoder.AutoencoderKL` from their `vavae/configs/f16d32_vfdinov2.yaml` (f16d32, ch 128, 256 px, VF
loss against DINOv2 ViT-L/14, LPIPS, the patch discriminator) and calls their own `training_step` (manual
optimization: the autoencoder's Adam step, then the discriminator's) in fp32 as shipped (`precision: 32`; torch's
defaults: TF32 cuDNN convolutions, no TF32 matmuls), each step on a fresh batch object as their dataloader gives it
(B, H, W, C). It runs in its own process: the stand-ins below never reach our code, and its peak memory is its own.

What stands in, and why (the GPU machine has no network; the costs are the same):
- pytorch_lightning: their module's base class becomes nn.Module with the four members their training_step calls
  (optimizers, manual_backward, log, log_dict) and a global_step. No Lightning Trainer loop runs (its per-step
  overhead is not counted: this favours them).
- pretrained weights: DINOv2 (timm's hf-hub download), VGG16 and the LPIPS heads (downloads) get random weights of
  the same shapes. Without timm or torchvision installed, the same architectures from here: DINOv2 ViT-L/14 as
  `modeling.foundation`'s random_vitl14, VGG16's convolution stack as torchvision builds it.
- their config's disc_start (5001) is set to 0 so the discriminator trains from the first step, as our bench does.
The JSON says which stand-ins ran.
"""
from __future__ import annotations

import json
import sys
import time
import types
from pathlib import Path
from typing import Any, Optional

CONFIG = "LightningDiT/vavae/configs/f16d32_vfdinov2.yaml"
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class AuthorsCodeMissing(FileNotFoundError):
    pass


def _lightning_stub() -> types.ModuleType:
    import torch

    class LightningModule(torch.nn.Module):
        """What their AutoencoderKL.training_step uses of pl.LightningModule, without a Trainer."""
        global_step = 0

        def optimizers(self):
            return self._bench_optimizers

        def manual_backward(self, loss):
            loss.backward()

        def log(self, *args, **kwargs):
            pass

        def log_dict(self, *args, **kwargs):
            pass

    mod = types.ModuleType("pytorch_lightning")
    mod.LightningModule = LightningModule
    return mod


def _vgg16_features():
    import torch.nn as nn
    layers, c = [], 3
    for v in VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=True)]
            c = v
    return nn.Sequential(*layers)


def install_stand_ins(root: Path) -> dict[str, str]:
    """Put their packages on sys.path with the stand-ins in place; returns what stands in for what."""
    vavae, taming = root / "LightningDiT" / "vavae", root / "taming"
    missing = [str(p) for p in (vavae / "ldm" / "models" / "autoencoder.py", taming / "modules" / "losses" / "lpips.py",
                                root / CONFIG) if not p.is_file()]
    if missing:
        raise AuthorsCodeMissing(f"the authors' code is not in {root}: missing {', '.join(missing)}; prepare it with "
                                 "`bash scripts/prepare_gpu_carry.sh` (hustvl/LightningDiT vavae/ + taming-transformers)")
    sys.path[:0] = [str(vavae), str(root)]
    record = {"pytorch_lightning": "nn.Module base with optimizers/manual_backward/log/log_dict (no Trainer loop)"}
    sys.modules["pytorch_lightning"] = _lightning_stub()
    try:
        import torchvision  # noqa: F401
        record["vgg16"] = "torchvision's vgg16, random weights"
    except Exception as e:  # absent, or a build that does not match this torch
        tv, models = types.ModuleType("torchvision"), types.ModuleType("torchvision.models")
        models.vgg16 = lambda pretrained=False, **kw: types.SimpleNamespace(features=_vgg16_features())
        tv.models = models
        sys.modules["torchvision"], sys.modules["torchvision.models"] = tv, models
        record["vgg16"] = f"VGG16 convolution stack built here, random weights (torchvision: {type(e).__name__})"
    try:
        import timm  # noqa: F401
        record["dinov2"] = "timm vit_large_patch14_dinov2.lvd142m, random weights"
    except Exception as e:
        sys.modules["timm"] = types.ModuleType("timm")
        record["dinov2"] = f"modeling.foundation random_vitl14 (DINOv2 ViT-L/14 shape; timm: {type(e).__name__})"
    return record


def _patch_downloads(record: dict[str, str]) -> None:
    """Their pretrained-weight loaders -> random weights of the same architecture (no network there)."""
    import torch

    import ldm.models.foundation_models as fm
    import taming.modules.losses.lpips as lp
    lp.LPIPS.load_from_pretrained = lambda self, name="vgg_lpips": None
    if record["vgg16"].startswith("torchvision"):
        import torchvision
        lp.models = types.SimpleNamespace(vgg16=lambda pretrained=False, **kw: torchvision.models.vgg16(weights=None))
    if record["dinov2"].startswith("timm"):
        import timm

        def dinov2():
            m = timm.create_model("vit_large_patch14_dinov2.lvd142m", pretrained=False, dynamic_img_size=True)
            return m.requires_grad_(False)
    else:
        from modeling.foundation import build_foundation

        class TimmLike(torch.nn.Module):  # forward_features -> (B, 1 + patches, 1024), as timm's
            def __init__(self):
                super().__init__()
                self.net = build_foundation("random_vitl14", allow_substitute=True).net.float()

            def forward_features(self, x):
                return self.net.forward_features(x)[0]

        def dinov2():
            return TimmLike().requires_grad_(False)
    fm.get_dinov2_encoder = dinov2


def build(root: Path, device: str, overrides: Optional[dict] = None) -> tuple[Any, dict, dict]:
    """Their AutoencoderKL from their config (disc_start 0; `overrides` merged into ddconfig, for tiny CPU runs)
    with its two optimizers from their configure_optimizers; returns (model, config, stand-ins)."""
    import yaml
    record = install_stand_ins(root)
    _patch_downloads(record)
    from ldm.util import instantiate_from_config
    cfg = yaml.safe_load((root / CONFIG).read_text())
    model_cfg = cfg["model"]
    model_cfg["params"]["lossconfig"]["params"]["disc_start"] = 0
    model_cfg["params"]["ddconfig"].update(overrides or {})
    model = instantiate_from_config(model_cfg)
    model.learning_rate = model_cfg["base_learning_rate"]
    optimizers, _ = model.configure_optimizers()
    model._bench_optimizers = tuple(optimizers)
    return model.to(device).train(), model_cfg, record


def time_their_step(model, batch: int, resolution: int, device, warmup: int, steps: int) -> dict:
    """img/s, ms per step and peak memory of their training_step at this batch (OOM -> raises)."""
    import torch
    g = torch.Generator(device).manual_seed(0)
    images = torch.rand((batch, resolution, resolution, 3), generator=g, device=device) * 2 - 1  # (B, H, W, C)
    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        model.training_step({"image": images}, 0)
        model.global_step += 1
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        model.training_step({"image": images}, 0)
        model.global_step += 1
    if cuda:
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    return {"batch": batch, "img_per_s": round(batch * steps / dt, 2), "step_ms": round(1000 * dt / steps, 1),
            "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2) if cuda else None,
            "steps": steps}


def main(argv: Optional[list[str]] = None) -> int:
    from modeling.config import cli_parser
    ap = cli_parser("bench.authors_vae", __doc__)
    ap.add_argument("--authors", default=".authors", help="folder prepared by scripts/prepare_gpu_carry.sh")
    ap.add_argument("--out", default="runs/authors_vae.json", help="JSON result file")
    ap.add_argument("--batch", type=int, default=8, help="their per-GPU batch (f16d32_vfdinov2.yaml)")
    ap.add_argument("--max-batch", type=int, default=256, help="largest batch tried by the doubling search (0: skip)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--budget-s", type=float, default=60.0, help="no larger batch starts after this many seconds")
    ap.add_argument("--device", default=None, help="default: cuda when available")
    ap.add_argument("--ddconfig", default="{}", help="JSON merged into their ddconfig (tiny CPU runs in tests)")
    a = ap.parse_args(argv)
    t_start = time.time()
    import torch
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True  # torch's defaults
    torch.backends.cudnn.benchmark = False  # as their Lightning trainer runs it (vavae/main.py never sets it)
    try:
        model, cfg, record = build(Path(a.authors), device, json.loads(a.ddconfig))
    except AuthorsCodeMissing as e:
        print(f"bench.authors_vae: {e}", file=sys.stderr)
        return 2
    res = cfg["params"]["ddconfig"]["resolution"]
    result = {"what": "the authors' AutoencoderKL.training_step (hustvl/LightningDiT vavae/), fp32 as shipped",
              "config": CONFIG, "stand_ins": record, "resolution": res,
              "tf32": {"matmul": False, "cudnn_conv": True}, "cudnn_benchmark": False, "per_gpu_batch": a.batch}
    first = time_their_step(model, a.batch, res, device, a.warmup, a.steps)
    result[f"batch_{a.batch}"] = best = first
    print(f"authors fp32     batch {a.batch:4d}: {first}", flush=True)
    b = a.batch * 2
    while a.max_batch and b <= a.max_batch:
        predicted = best["step_ms"] / 1000 * b / best["batch"] * (1 + max(2, a.steps // 2))
        if time.time() - t_start + predicted > a.budget_s:
            result["skipped"] = f"batch {b}: would end after the {a.budget_s:.0f}s budget (~{predicted:.0f}s)"
            break
        try:
            r = time_their_step(model, b, res, device, 1, max(2, a.steps // 2))
        except torch.OutOfMemoryError:
            result["oom_at_batch"] = b
            print(f"authors fp32     batch {b:4d}: out of memory", flush=True)
            break
        print(f"authors fp32     batch {b:4d}: {r}", flush=True)
        best, b = r, b * 2
    result["largest"] = best
    from evaluation import provenance
    result["environment"] = provenance.environment(torch.device(device))
    result["wall_s"] = round(time.time() - t_start, 1)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
