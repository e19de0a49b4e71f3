"""VA-VAE tokenizer: the LDM AutoencoderKL (f16d32 in the released config).

Encoder/decoder layout and names follow the authors' code (taming / LDM), so the released
`{"state_dict": ...}` checkpoints load as they are (see modeling.checkpoint.load_vavae_checkpoint).
"""
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import ops

from .hub import HubMixin, build_config


@dataclass
class VAVAEModelConfig:
    """Every architecture setting of the tokenizer, written once (the constructor, `model.config`, the
    trainer's `model:` section and `config.json` of our format all use this). Defaults: the released f16d32."""
    ch: int = 128                                 # base width (GroupNorm(32): a multiple of 32)
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)    # width multiplier per level; len - 1 downsamplings
    num_res_blocks: int = 2                       # per encoder level (decoder levels have one more)
    attn_resolutions: tuple[int, ...] = (16,)     # feature sides with an attention block after each resblock
    resolution: int = 256                         # training image side (decides where attention goes)
    z_channels: int = 32                          # the encoder's output channels (x2: mean and logvar)
    embed_dim: int = 32                           # latent channels after quant_conv
    in_channels: int = 3                          # image channels in
    out_ch: int = 3                               # image channels out
    dropout: float = 0.0                          # in the resblocks (the reference trains with 0)

    def __post_init__(self):  # lists from YAML / JSON -> tuples (hashable, comparable)
        self.ch_mult, self.attn_resolutions = tuple(self.ch_mult), tuple(self.attn_resolutions)

    def validate(self) -> None:
        """ValueError naming the first bad setting."""
        if self.ch <= 0 or self.ch % 32:
            raise ValueError(f"ch={self.ch} must be a positive multiple of 32 (GroupNorm(32))")
        if not self.ch_mult or any(m <= 0 for m in self.ch_mult):
            raise ValueError(f"ch_mult={self.ch_mult} must be a non-empty list of positive ints")
        if self.resolution <= 0 or self.resolution % 2 ** (len(self.ch_mult) - 1):
            raise ValueError(f"resolution={self.resolution} must divide by the downsampling "
                             f"2^{len(self.ch_mult) - 1}")
        if min(self.num_res_blocks, self.z_channels, self.embed_dim, self.in_channels, self.out_ch) <= 0:
            raise ValueError("num_res_blocks, z_channels, embed_dim, in_channels, out_ch must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


VAVAE_F16D32 = dataclasses.asdict(VAVAEModelConfig())  # the released tokenizer, as keyword arguments


class GroupNorm(nn.GroupNorm):
    """GroupNorm(32 groups, eps 1e-6, affine), with the SiLU that follows it where `silu`, as one op
    (kernels.ops.group_norm_silu). The reference backend (and `auto` on the CPU) computes F.group_norm then F.silu, as
    the authors; the fused kernels keep bf16 activations bf16 and channels_last ones NHWC (under CUDA autocast
    torch's GroupNorm is an fp32 op, returns fp32 for the SiLU and the next conv to cast back, and makes channels_last
    input NCHW). Parameters and state-dict names are nn.GroupNorm's."""

    def __init__(self, channels: int, silu: bool = False) -> None:
        super().__init__(num_groups=32, num_channels=channels, eps=1e-6, affine=True)
        self.silu = silu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.group_norm_silu(x, self.weight, self.bias, self.num_groups, self.eps, self.silu)


def Normalize(channels: int, silu: bool = False) -> GroupNorm:
    return GroupNorm(channels, silu)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = Normalize(in_channels, silu=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = Normalize(out_channels, silu=True)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.norm1(x))  # norm + SiLU
        h = self.conv2(self.dropout(self.norm2(h)))
        return (self.nin_shortcut(x) if self.nin_shortcut is not None else x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1 conv projections."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        B, C, H, W = h.shape
        q, k, v = (m(h).reshape(B, 1, C, H * W).transpose(2, 3) for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # same as softmax(q k^T / sqrt(C)) v
        return x + self.proj_out(out.transpose(2, 3).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad, as the reference


class Upsample(nn.Module):
    """Nearest 2x, then a 3x3 conv (kernels.ops.upsample_conv: the fused backends skip the upsampled tensor)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.upsample_conv(x, self.conv.weight, self.conv.bias)


class _Level(nn.Module):
    """A container with the reference's attribute names (block / attn / downsample, or block_1 / attn_1 / ...)."""


def _res_level(block_in, block_out, n_blocks, with_attn, dropout):
    """n_blocks ResnetBlocks (each followed by an AttnBlock when with_attn), as one encoder/decoder level."""
    level = _Level()
    level.block = nn.ModuleList([ResnetBlock(block_in if i == 0 else block_out, block_out, dropout)
                                 for i in range(n_blocks)])
    level.attn = nn.ModuleList([AttnBlock(block_out) for _ in range(n_blocks)] if with_attn else [])
    return level


def _mid(channels, dropout):
    mid = _Level()
    mid.block_1 = ResnetBlock(channels, channels, dropout)
    mid.attn_1 = AttnBlock(channels)
    mid.block_2 = ResnetBlock(channels, channels, dropout)
    return mid


class Encoder(nn.Module):
    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, attn_resolutions: Sequence[int],
                 resolution: int, in_channels: int, z_channels: int, dropout: float = 0.0,
                 double_z: bool = True) -> None:
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, 3, 1, 1)
        in_ch_mult = (1,) + tuple(ch_mult)
        curr_res = resolution
        self.down = nn.ModuleList()
        for i_level in range(self.num_resolutions):
            block_in, block_out = ch * in_ch_mult[i_level], ch * ch_mult[i_level]
            level = _res_level(block_in, block_out, num_res_blocks, curr_res in attn_resolutions, dropout)
            block_in = block_out
            if i_level != self.num_resolutions - 1:
                level.downsample = Downsample(block_in)
                curr_res //= 2
            self.down.append(level)
        self.mid = _mid(block_in, dropout)
        self.norm_out = Normalize(block_in, silu=True)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.norm_out(self.body(x)))

    def body(self, x: torch.Tensor) -> torch.Tensor:
        """Everything before the output layers (norm_out, conv_out): the part `train.compile=blocks` compiles."""
        h = self.conv_in(x)
        for i_level, level in enumerate(self.down):
            for i_block in range(self.num_res_blocks):
                h = level.block[i_block](h)
                if len(level.attn):
                    h = level.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = level.downsample(h)
        return self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))


class Decoder(nn.Module):
    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, attn_resolutions: Sequence[int],
                 resolution: int, z_channels: int, out_ch: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, 1, 1)
        self.mid = _mid(block_in, dropout)
        self.up = nn.ModuleList()
        for i_level in reversed(range(self.num_resolutions)):
            block_out = ch * ch_mult[i_level]
            level = _res_level(block_in, block_out, num_res_blocks + 1, curr_res in attn_resolutions, dropout)
            block_in = block_out
            if i_level != 0:
                level.upsample = Upsample(block_in)
                curr_res *= 2
            self.up.insert(0, level)
        self.norm_out = Normalize(block_in, silu=True)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.norm_out(self.body(z)))

    def body(self, z: torch.Tensor) -> torch.Tensor:
        """Everything before the output layers (norm_out, conv_out): the part `train.compile=blocks` compiles."""
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i_level in reversed(range(self.num_resolutions)):
            level = self.up[i_level]
            for i_block in range(self.num_res_blocks + 1):
                h = level.block[i_block](h)
                if len(level.attn):
                    h = level.attn[i_block](h)
            if i_level != 0:
                h = level.upsample(h)
        return h


class DiagonalGaussian:
    """Posterior N(mean, exp(logvar)) with logvar clamped to [-30, 20]."""

    def __init__(self, moments: torch.Tensor) -> None:
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL to N(0, I), per sample, summed over C, H, W."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])


def to_uint8_images(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (B, 3, H, W) -> uint8 (B, H, W, 3) with the authors' rounding clamp(127.5 x + 128) (their
    decode and their saved reference images: 0.5 up, then truncation)."""
    return torch.clamp(127.5 * x.float() + 128.0, 0, 255).permute(0, 2, 3, 1).to(torch.uint8)


class AutoencoderKL(nn.Module, HubMixin):
    """`AutoencoderKL(VAVAEModelConfig(...))`. Keyword arguments (`AutoencoderKL(**VAVAE_F16D32)`, the fields of
    VAVAEModelConfig) are accepted as a shorthand for the same dataclass; `model.config` is the dataclass."""

    def __init__(self, config: Optional[VAVAEModelConfig] = None, /, **kwargs: Any) -> None:
        super().__init__()
        self.config = c = build_config(VAVAEModelConfig, config, kwargs)
        self.encoder = Encoder(c.ch, c.ch_mult, c.num_res_blocks, c.attn_resolutions, c.resolution, c.in_channels,
                               c.z_channels, c.dropout)
        self.decoder = Decoder(c.ch, c.ch_mult, c.num_res_blocks, c.attn_resolutions, c.resolution, c.z_channels,
                               c.out_ch, c.dropout)
        self.quant_conv = nn.Conv2d(2 * c.z_channels, 2 * c.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(c.embed_dim, c.z_channels, 1)
        self.embed_dim = c.embed_dim
        self.downsample_factor = 2 ** (len(c.ch_mult) - 1)

    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        """images in [-1, 1], (B, 3, H, W) with H, W multiples of the downsample factor."""
        if images.ndim != 4 or images.shape[1] != self.config.in_channels:
            raise ValueError(f"expected images (B, {self.config.in_channels}, H, W), got {tuple(images.shape)}")
        f = self.downsample_factor
        if images.shape[-1] % f or images.shape[-2] % f:
            raise ValueError(f"image size {tuple(images.shape[-2:])} must be a multiple of {f}")
        return DiagonalGaussian(self.quant_conv(self.encoder(images)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    @torch.no_grad()
    def decode_to_images(self, z: torch.Tensor) -> torch.Tensor:
        """Decoded uint8 images (B, H, W, 3) with the reference rounding clamp(127.5 * x + 128)."""
        return to_uint8_images(self.decode(z))

    def forward(self, images: torch.Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(images)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior
