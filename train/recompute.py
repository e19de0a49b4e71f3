"""Selective recomputation (`train.recompute`): keep fewer activations for the backward, recompute them there.

`swiglu`: each block's MLP runs under a selective activation checkpoint (torch.utils.checkpoint with
`create_selective_checkpoint_contexts`) whose policy saves the outputs of its matmuls and recomputes everything
else. In a LightningDiT MLP, `w3(swiglu(w12(x)))`, the matmul outputs are w12's (x12, which the SwiGLU backward
reads anyway) and w3's (which the backward never reads); "everything else" is the SwiGLU (and, under FP8, the
quantization of its output). So the backward recomputes the SwiGLU output h from x12 before w3's weight gradient
instead of keeping it from the forward: 2F bytes per token per block fewer (bf16, F = the SwiGLU hidden size:
LightningDiT-XL/1 at batch 256 keeps 10.5 GiB less, 79.0 -> 68.5 GiB of activations, `python -m
bench.activation_memory`), for one more SwiGLU forward pass per block in the backward.

Under `train.compile: blocks` the checkpoint is traced into the block's graph, where the policy becomes the
partitioner's recompute tags (the recomputed SwiGLU is fused into the backward); without compile it runs as
torch's eager selective checkpoint (which also caches w3's output; the saving is then 2F - 2C bytes). The values
are the same either way: the recomputation runs the same kernel on the same input.

Not with FP8 (train/dit_config.py refuses it): an FP8 w3 keeps its input in e4m3, half the bf16 SwiGLU output,
whether the SwiGLU is recomputed or not, so there is nothing to gain (`bench.activation_memory --fp8 scaled_mm`:
35,463 bytes per token per block without, 37,767 with), and `fp8.quant: ours` (modeling.fp8.FP8TrainingSwiGLUFFN)
recomputes the SwiGLU for w3's weight gradient already.

Compiling a checkpoint needs torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint (set process-wide
by `apply_recompute(..., compiled=True)`, as torchtitan does): the one Python side effect in the MLP's forward is
kernels' note of what ran (`kernels.describe()`), which must happen once, in the forward, not again in the
recomputation.
"""
from __future__ import annotations

import functools
from typing import Literal

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

Recompute = Literal["none", "swiglu"]
MODES = ("none", "swiglu")

aten = torch.ops.aten
# the ops whose outputs a selective checkpoint keeps: the matmuls (bf16 and FP8) ...
SAVED_OPS = frozenset([aten.mm.default, aten.addmm.default, aten.bmm.default, aten._scaled_mm.default])


def _policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    if op in SAVED_OPS:
        return CheckpointPolicy.MUST_SAVE
    # ... and the narrowing casts: autocast's bf16 copy of the MLP's fp32 input (what w12's weight gradient reads)
    # is half the bytes of its source, which nothing else keeps (the norm backward recomputes from the residual)
    if op is aten._to_copy.default and isinstance(args[0], torch.Tensor) and kwargs.get("dtype") is not None \
            and kwargs["dtype"].itemsize < args[0].dtype.itemsize:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _saving_matmuls():
    return create_selective_checkpoint_contexts(_policy)


def _checkpointed(forward):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():  # evaluation / sampling: nothing is saved, nothing to recompute
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, context_fn=_saving_matmuls, **kwargs)
    run.recompute = "swiglu"
    return run


def apply_recompute(model: nn.Module, mode: Recompute, compiled: bool = False) -> int:
    """Apply `mode` to every block of `model` (a LightningDiT: `model.blocks[i].mlp`) in place, before
    torch.compile (`compiled`: the blocks will be compiled); returns how many modules now recompute. Parameter
    names and values do not change (the MLP's forward is wrapped, the module is not replaced), so checkpoints load
    either way."""
    if mode not in MODES:
        raise ValueError(f"unknown recompute mode {mode!r}; choose one of {MODES}")
    if mode == "none":
        return 0
    if compiled:
        flag = "skip_fwd_side_effects_in_bwd_under_checkpoint"
        if not hasattr(torch._dynamo.config, flag):  # a torch without it cannot compile the region (fullgraph)
            raise RuntimeError(f"train.recompute {mode} under train.compile blocks: torch {torch.__version__} has "
                               f"no torch._dynamo.config.{flag}; use train.recompute none or train.compile none")
        setattr(torch._dynamo.config, flag, True)
    count = 0
    for block in model.blocks:
        mlp = block.mlp
        if getattr(mlp.forward, "recompute", None) is None:
            mlp.forward = _checkpointed(mlp.forward)
        count += 1
    return count
