"""LightningDiT: DiT with SwiGLU, RMSNorm, 2D RoPE and optional qk-norm.

Module and parameter names follow the authors' code, so released checkpoints load as they are.
Every memory-bound op goes through `kernels.ops`; which backend runs (reference PyTorch, Triton,
CUDA extension) is chosen there, not here.
"""
import dataclasses
import math
from collections.abc import Callable
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from kernels import ops

from .guidance import cfg_velocity, guided_channels, is_guided
from .hub import HubMixin, build_config
from .released import LIGHTNINGDIT_SIZES


# ----------------------------------------------------------------------------- embedders

class PatchEmbed(nn.Module):
    """Conv with kernel = stride = patch, then flatten to tokens (timm's PatchEmbed)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = (patch_size, patch_size)
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # token-major memory: a transposed view here keeps the whole residual stream channel-major (compiled
        # blocks keep their input's strides), so every norm reduces over a strided axis and every qkv / w12
        # GEMM first copies its input
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of t in [0, 1] (unscaled), layout [cos, sin], then an MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class embedding with one extra row (index num_classes) for the null class used by guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float) -> None:
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        drop = torch.rand(labels.shape[0], device=labels.device, generator=generator) < self.dropout_prob
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, train: bool, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if train and self.dropout_prob > 0:
            labels = self.token_drop(labels, generator)
        return self.embedding_table(labels)


# ----------------------------------------------------------------------------- positional encodings

def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """MAE/DiT fixed 2D sin-cos table, (grid_size**2, embed_dim); first half encodes rows' w-coordinate grid."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid_size, grid_size)
    emb_h = _1d_sincos(embed_dim // 2, grid[0])
    emb_w = _1d_sincos(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def _1d_sincos(embed_dim, pos):
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


class VisionRotaryEmbeddingFast(nn.Module):
    """2D RoPE tables as the reference (EVA) builds them: per axis `dim` channels, angles repeated twice
    (interleaved pairs); the first `dim` channels of a head follow the row index, the last `dim` the column.
    The tables are persistent buffers (`feat_rope.freqs_cos/sin`), as in released checkpoints."""

    def __init__(self, dim: int, seq_len: int, theta: float = 10000) -> None:
        super().__init__()
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
        t = torch.arange(seq_len).float()
        freqs = torch.einsum("i,f->if", t, freqs).repeat_interleave(2, dim=-1)  # (S, dim)
        rows = freqs[:, None, :].expand(seq_len, seq_len, dim)
        cols = freqs[None, :, :].expand(seq_len, seq_len, dim)
        freqs = torch.cat([rows, cols], dim=-1).reshape(seq_len * seq_len, 2 * dim)
        self.register_buffer("freqs_cos", freqs.cos())
        self.register_buffer("freqs_sin", freqs.sin())


# ----------------------------------------------------------------------------- norms

class RMSNorm(nn.Module):
    """RMSNorm(eps 1e-6, learnable weight), statistics in fp32, cast back (the reference's)."""

    kind = "rms"

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class LayerNormNoAffine(nn.Module):
    """LayerNorm(eps 1e-6) without affine parameters: no state-dict keys."""

    kind = "layer"
    weight = None

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.layer_norm(x, None, None, self.eps)


class QKLayerNorm(nn.LayerNorm):
    """qk-norm without RMSNorm: LayerNorm(head_dim) with affine and the default eps 1e-5."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.layer_norm(x, self.weight, self.bias, self.eps)


def block_norm(dim: int, use_rmsnorm: bool) -> Union[RMSNorm, LayerNormNoAffine]:
    return RMSNorm(dim) if use_rmsnorm else LayerNormNoAffine(dim)


# ----------------------------------------------------------------------------- block parts

def linear_leaving_bias(linear: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(the Linear's product without its bias, the bias) for the next op to add in its own pass, whose backward then
    sums the bias gradient while it writes the product's gradient (the Linear's backward would read that gradient
    once more for it). Only a plain nn.Linear is taken apart: any other module in its place (an FP8 or Transformer
    Engine Linear swapped in) runs whole and leaves no bias; so does any Linear where no gradient is recorded
    (inference: nothing to sum, and the GEMM's epilogue adds the bias for free)."""
    if type(linear) is nn.Linear and torch.is_grad_enabled():
        return F.linear(x, linear.weight), linear.bias
    return linear(x), None


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, use_rmsnorm: bool = False) -> None:
        super().__init__()
        assert dim % num_heads == 0, "hidden_size must be divisible by num_heads"
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim) if use_rmsnorm else QKLayerNorm(self.head_dim)
            self.k_norm = RMSNorm(self.head_dim) if use_rmsnorm else QKLayerNorm(self.head_dim)
        else:
            self.q_norm = self.k_norm = None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: Optional[VisionRotaryEmbeddingFast] = None) -> torch.Tensor:
        # x: (B, N, C), or its rows in e4m3 with their scales (kernels.fp8_quant.FP8Rows) for an FP8 qkv Linear
        if rope is not None and (self.q_norm is None or isinstance(self.q_norm, RMSNorm)):
            # split into heads, RMSNorm qk-norm, RoPE, attention, heads merged: one op (on the fused backends
            # qkv_rope + attention, or one kernel each way from qkv to the proj's input, whichever measured faster),
            # which also adds the qkv Linear's bias and sums its gradient
            qkv, bias = linear_leaving_bias(self.qkv, x)
            qw, kw = (self.q_norm.weight, self.k_norm.weight) if self.q_norm is not None else (None, None)
            eps = self.q_norm.eps if self.q_norm is not None else 1e-6
            return self.proj(ops.rope_attention(qkv, rope.freqs_cos, rope.freqs_sin, self.num_heads, qw, kw, eps,
                                                bias))
        # no RoPE, or the LayerNorm qk-norm: the unfused path
        qkv = self.qkv(x)
        B, N, C = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = ops.rope_qk(q, k, rope.freqs_cos, rope.freqs_sin)
        x = ops.attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class SwiGLUFFN(nn.Module):
    def __init__(self, in_features: int, hidden_features: int) -> None:
        super().__init__()
        self.w12 = nn.Linear(in_features, 2 * hidden_features)
        self.w3 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # w12's bias is added in the SwiGLU's pass, which also sums its gradient (kernels/swiglu.py)
        return self.w3(ops.swiglu(*linear_leaving_bias(self.w12, x)))


class Mlp(nn.Module):
    """fc1 -> GELU(tanh) -> fc2, the non-SwiGLU MLP."""

    def __init__(self, in_features: int, hidden_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def linear_input_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype a Linear reading a tensor derived from x computes in: autocast's where it is on, else None (no
    cast). The norms ask for their output in it: what the Linear's autocast would cast it to, written so directly
    (and its gradient arrives so) instead of an fp32 output and a cast pass each way."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None


def norm_output_dtype(consumer: nn.Module, gemm: Optional[torch.dtype]) -> Optional[torch.dtype]:
    """The dtype a norm writes its output in for the module that reads it: the module's own `input_dtype` where it
    declares one (e4m3: an FP8 Linear whose input rows the norm quantizes in its pass, modeling.fp8), else `gemm`
    (linear_input_dtype's)."""
    return getattr(consumer, "input_dtype", None) or gemm


def norm_ops(out_dtype: Optional[torch.dtype]) -> tuple[Callable, Callable]:
    """(norm_modulate, gated_residual_norm_modulate) writing out_dtype: for e4m3 the ops that quantize the rows in
    the same pass and return them with their scales (kernels.fp8_quant.FP8Rows); the call is the same."""
    if out_dtype == torch.float8_e4m3fn:
        return ops.norm_modulate_fp8, ops.gated_residual_norm_modulate_fp8
    return ops.norm_modulate, ops.gated_residual_norm_modulate


class LightningDiTBlock(nn.Module):
    """x += gate_msa * attn(modulate(norm1(x))); x += gate_mlp * mlp(modulate(norm2(x))).

    In the model the MLP's residual is handed on (`defer`): the block returns (x, (gate_mlp, mlp_out)) and the next
    block (`pending`) or the final layer adds it in the pass of its first norm (ops.gated_residual_norm_modulate),
    whose backward then also takes the residual's gradient: no separate residual kernel and no gradient
    accumulation pass between blocks. The same math; block(x, c, rope) alone returns x with everything added."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, use_qknorm: bool = False,
                 use_swiglu: bool = True, use_rmsnorm: bool = True, wo_shift: bool = False) -> None:
        super().__init__()
        self.norm1 = block_norm(hidden_size, use_rmsnorm)
        self.attn = Attention(hidden_size, num_heads, qk_norm=use_qknorm, use_rmsnorm=use_rmsnorm)
        self.norm2 = block_norm(hidden_size, use_rmsnorm)
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.mlp = SwiGLUFFN(hidden_size, int(2 / 3 * mlp_hidden)) if use_swiglu else Mlp(hidden_size, mlp_hidden)
        self.wo_shift = wo_shift
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, (4 if wo_shift else 6) * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: Optional[VisionRotaryEmbeddingFast] = None,
                pending: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                defer: bool = False) -> Union[torch.Tensor, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]]:
        mod = self.adaLN_modulation(c)
        if self.wo_shift:
            scale_msa, gate_msa, scale_mlp, gate_mlp = mod.chunk(4, dim=1)
            shift_msa = shift_mlp = None
        else:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
        n1, n2, gemm = self.norm1, self.norm2, linear_input_dtype(x)
        to_attn, to_mlp = norm_output_dtype(self.attn.qkv, gemm), norm_output_dtype(self.mlp, gemm)
        norm_modulate, gated_residual_norm_modulate = norm_ops(to_attn)
        if pending is None:
            h = norm_modulate(x, n1.weight, shift_msa, scale_msa, n1.eps, n1.kind, to_attn)
        else:  # the previous block's MLP residual (gate, y), added here
            x, h = gated_residual_norm_modulate(x, *pending, n1.weight, shift_msa, scale_msa, n1.eps, n1.kind, to_attn)
        x, h = norm_ops(to_mlp)[1](x, gate_msa, self.attn(h, rope), n2.weight, shift_mlp, scale_mlp, n2.eps, n2.kind,
                                   to_mlp)
        y = self.mlp(h)
        return (x, (gate_mlp, y)) if defer else ops.gated_residual(x, gate_mlp, y)


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, use_rmsnorm: bool = True) -> None:
        super().__init__()
        self.norm_final = block_norm(hidden_size, use_rmsnorm)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor,
                pending: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """pending: the last block's MLP residual (gate, y), added in the final norm's pass."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        n, gemm = self.norm_final, linear_input_dtype(x)
        if pending is None:
            return self.linear(ops.norm_modulate(x, n.weight, shift, scale, n.eps, n.kind, gemm))
        return self.linear(ops.gated_residual_norm_modulate(x, *pending, n.weight, shift, scale, n.eps, n.kind,
                                                            gemm)[1])


# ----------------------------------------------------------------------------- the model

@dataclasses.dataclass
class LightningDiTConfig:
    """Every architecture setting of LightningDiT, written once: the constructor, `model.config`, the DiT
    trainer's `model:` section (train/dit_config.py extends it with a size preset) and config.json of our saved
    folders all use this. Defaults are the paper's LightningDiT (SwiGLU, RoPE, RMSNorm on, as every config of the
    authors sets them); the authors' constructor defaults those three to False (a plain DiT), so a model section
    of theirs that leaves them out means False. `from_size("XL/1", ...)` applies a preset."""
    input_size: int = 32                # latent side in tokens x patch (256 px through an f16 tokenizer: 16)
    patch_size: int = 2                 # latent tokens of patch_size x patch_size (XL/1: 1, 256 tokens at 16x16)
    in_channels: int = 32               # latent channels
    hidden_size: int = 1152             # the width of every block (XL: 1152)
    depth: int = 28                     # blocks
    num_heads: int = 16                 # attention heads (head_dim = hidden_size / num_heads: XL's 72)
    mlp_ratio: float = 4.0              # MLP width / hidden (SwiGLU uses 2/3 of it, as the reference)
    class_dropout_prob: float = 0.1     # label dropout in training; > 0 adds the null-class embedding row
    num_classes: int = 1000             # class labels; index num_classes is the null class of guidance
    learn_sigma: bool = False           # doubles the output channels (only the first half is returned)
    use_qknorm: bool = False            # normalise q and k per head before RoPE (RMSNorm, or LayerNorm without RMSNorm)
    use_swiglu: bool = True             # SwiGLU MLP (hidden 2/3 of mlp_ratio x width); false: GELU(tanh) MLP
    use_rope: bool = True               # 2D rotary position embedding on q and k (the sin-cos pos_embed stays)
    use_rmsnorm: bool = True            # RMSNorm with a weight; false: LayerNorm without affine parameters
    wo_shift: bool = False              # adaLN without shift (4 instead of 6 modulation vectors)
    use_checkpoint: bool = False        # activation checkpointing per block in training (memory, not architecture)

    @classmethod
    def from_size(cls, size: str, **overrides: Any) -> "LightningDiTConfig":
        """`from_size("XL/1", input_size=16)`; also accepts the reference's names ("LightningDiT-XL/1")."""
        key = size.removeprefix("LightningDiT-")
        if key not in LIGHTNINGDIT_SIZES:
            raise ValueError(f"unknown LightningDiT size {size!r}; known: {sorted(LIGHTNINGDIT_SIZES)}")
        return cls(**{**LIGHTNINGDIT_SIZES[key], **overrides})

    def validate(self) -> None:
        """ValueError naming the first bad setting."""
        if min(self.input_size, self.patch_size, self.in_channels, self.hidden_size, self.depth, self.num_heads,
               self.num_classes) <= 0:
            raise ValueError("input_size, patch_size, in_channels, hidden_size, depth, num_heads and num_classes "
                             "must be > 0")
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size {self.input_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if self.use_rope and (self.hidden_size // self.num_heads) % 4:
            raise ValueError(f"2D RoPE needs a head_dim divisible by 4 (two axes of channel pairs); "
                             f"hidden_size / num_heads = {self.hidden_size // self.num_heads}")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ValueError(f"class_dropout_prob {self.class_dropout_prob} must be in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        """The constructor arguments (what config.json stores)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(LightningDiTConfig)}


class LightningDiT(nn.Module, HubMixin):
    """`LightningDiT(LightningDiTConfig(...))`; keyword arguments (the config's fields, e.g.
    `LightningDiT(**LIGHTNINGDIT_SIZES["XL/1"], input_size=16)`) are a shorthand for the same dataclass.
    `model.config` is the dataclass."""

    def __init__(self, config: Optional[LightningDiTConfig] = None, /, **kwargs: Any) -> None:
        super().__init__()
        self.config = c = build_config(LightningDiTConfig, config, kwargs)
        input_size, patch_size, in_channels, hidden_size = c.input_size, c.patch_size, c.in_channels, c.hidden_size
        num_heads, num_classes, mlp_ratio = c.num_heads, c.num_classes, c.mlp_ratio
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if c.learn_sigma else in_channels
        self.learn_sigma = c.learn_sigma
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.use_checkpoint = c.use_checkpoint

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, c.class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.feat_rope = (VisionRotaryEmbeddingFast(hidden_size // num_heads // 2, input_size // patch_size)
                          if c.use_rope else None)
        self.blocks = nn.ModuleList([
            LightningDiTBlock(hidden_size, num_heads, mlp_ratio, c.use_qknorm, c.use_swiglu, c.use_rmsnorm, c.wo_shift)
            for _ in range(c.depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, c.use_rmsnorm)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # The reference's init: xavier linears, zero adaLN and output layer, fixed sin-cos pos_embed.
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)
        if self.pos_embed.device.type != "meta":
            pe = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.x_embedder.grid_size)
            self.pos_embed.data.copy_(torch.from_numpy(pe).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """x: (B, C, H, W) latents; t: (B,) in [0, 1], 0 = noise, 1 = data; y: (B,) labels (num_classes = null).
        `generator` drives label dropout in train mode (so a trainer can make it reproducible)."""
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training, generator)
        pending = None  # each block's MLP residual, added by the next block's first norm (LightningDiTBlock)
        for block in self.blocks:
            if self.use_checkpoint and self.training:
                x, pending = checkpoint(block, x, c, self.feat_rope, pending, True, use_reentrant=False)
            else:
                x, pending = block(x, c, self.feat_rope, pending, defer=True)
        x = self.unpatchify(self.final_layer(x, c, pending))
        if self.learn_sigma:
            x = x[:, : self.in_channels]
        return x

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                         cfg_interval_start: float = 0.0, guidance: str = "all") -> torch.Tensor:
        """Classifier-free guidance on a batch [cond half; null half] sharing the first half's latents.

        guidance="reference": the authors' behaviour, guiding latent channels 0..2 only (channels 3.. keep
        the plain conditional / unconditional outputs). guidance="all": standard guidance on every channel.
        Guidance is off (the conditional output is returned for both halves' guided channels) where
        modeling.guidance.is_guided says so (cfg_scale <= 1, or t < cfg_interval_start); t is taken per sample, so
        no host synchronisation happens here. The mix is modeling.guidance.cfg_velocity, as in the Sampler.
        """
        k = guided_channels(guidance, self.in_channels)  # (an unknown guidance is refused before the forward)
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, y)
        v = cfg_velocity(out, cfg_scale, guidance, on=is_guided(t[: len(half)], cfg_scale, cfg_interval_start))
        # the authors' layout: both halves carry the mix on the guided channels, each keeps its own output on the rest
        return torch.cat([torch.cat([v[:, :k], v[:, :k]], dim=0), out[:, k:]], dim=1)

    def attention_shape(self, batch: int) -> tuple[int, int, int, int]:
        """(B, H, N, D) of every block's q, k and v for a batch of `batch` samples."""
        cfg = self.config
        return batch, cfg.num_heads, self.x_embedder.num_patches, cfg.hidden_size // cfg.num_heads

    def flops_per_sample(self, train: bool = True) -> int:
        """Matmul + attention FLOPs for one sample (2 per multiply-add); training = 3x forward."""
        cfg = self.config
        d, L = cfg.hidden_size, cfg.depth
        n = self.x_embedder.num_patches
        mlp_hidden = int(d * cfg.mlp_ratio)
        mlp = 3 * d * int(2 / 3 * mlp_hidden) if cfg.use_swiglu else 2 * d * mlp_hidden
        per_token = L * (4 * d * d + mlp)  # qkv + proj + MLP
        per_token += self.patch_size ** 2 * (self.in_channels + self.out_channels) * d  # patch embed + final linear
        attn = L * 2 * n * n * d  # QK^T and AV
        cond = L * d * d * (4 if cfg.wo_shift else 6) + 2 * d * d + 256 * d + d * d  # adaLN + embedders
        fwd = 2 * (per_token * n + attn + cond)
        return 3 * fwd if train else fwd


# ----------------------------------------------------------------------------- sizes

# LIGHTNINGDIT_SIZES (imported above) lives in modeling.released, beside the weight reader that names sizes


def build_lightningdit(size: str, **kwargs: Any) -> LightningDiT:
    """`build_lightningdit("XL/1", input_size=16, in_channels=32, num_classes=1000)`; also accepts
    the reference's names ("LightningDiT-XL/1")."""
    return LightningDiT(LightningDiTConfig.from_size(size, **kwargs))
