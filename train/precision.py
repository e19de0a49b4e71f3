"""Mixed precision that is real, shared by both trainers.

bf16 autocast is applied by the DeepSpeed engine itself, inside its forward (`deepspeed_autocast`): an autocast
opened *around* `engine(...)` is switched off there on a GPU (DeepSpeed asks `torch.is_autocast_enabled()`,
which sees CUDA autocast, and warns "torch.autocast is enabled outside DeepSpeed but disabled within the
DeepSpeed engine"), and the run silently trains in fp32. `lower_precision_safe_modules: []` gives no parameter a
bf16 communication dtype: gradients are reduced and kept in fp32 next to the fp32 master weights.
`PrecisionProbe` checks the first step: a layer inside the engine must compute in the requested dtype.
"""
import torch
import torch.nn as nn


def deepspeed_autocast(precision: str) -> dict:
    """The `torch_autocast` section of a DeepSpeed config for `train.precision` (bf16 | fp32)."""
    return {"enabled": precision == "bf16", "dtype": "bfloat16", "lower_precision_safe_modules": []}


class PrecisionProbe:
    """Refuses to train when `precision: bf16` but the engine's forward computes in fp32 (or the reverse).
    Watches the output dtype of one layer that runs inside the engine's forward and outside any compiled
    module (a hook there causes no recompilation) for the first step, then removes itself."""

    def __init__(self, layer: nn.Module, precision: str, what: str = "layers") -> None:
        self.expected = torch.bfloat16 if precision == "bf16" else torch.float32
        self.what, self.seen = what, None
        self.handle = layer.register_forward_hook(self._hook)

    def _hook(self, mod, inputs, output):
        self.seen = output.dtype

    def check(self) -> None:
        if self.handle is None:
            return
        self.handle.remove()
        self.handle = None
        if self.seen != self.expected:
            raise RuntimeError(f"train.precision asks for {self.expected} {self.what} but the model computed in "
                               f"{self.seen} inside the DeepSpeed engine; check the torch_autocast section of the "
                               f"DeepSpeed config and any train.deepspeed overrides")
