"""Compile Triton kernels for an H100/H200 (sm_90) without a GPU, and read what ptxas says about them.

The interpreter (TRITON_INTERPRET=1) checks what a kernel computes, not whether it compiles for the card, how many
registers it needs, whether it spills, or whether its loads became 16-byte vectors. This module compiles chosen
kernels ahead of time with Triton's own toolchain for `GPUTarget("cuda", 90, 32)`, with the argument
specialisation the JIT applies at XL/1 shapes (pointers and sizes divisible by 16), then runs Triton's ptxas with
-v on the PTX. Run it without TRITON_INTERPRET (the interpreter replaces the JIT functions):

    python -m bench.sm90_check           # one line per kernel variant: registers, spill, shared memory, vector ld/st
    python -m bench.sm90_check --loops --only "norm bwd"   # and each loop body's instructions per element

tests/test_kernels_sm90_compile.py runs it in a subprocess and requires every variant to compile without spills,
with vectorised global loads, within the shared memory a block may have (SM90_SHARED_LIMIT).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import tempfile
from typing import Any, Optional


@dataclasses.dataclass
class Variant:
    """One kernel specialisation: argument types ("*bf16", "i32", "fp32", "constexpr"), the constexpr values, the
    arguments the JIT would see as divisible by 16 at XL/1 shapes, and the launch's warps."""
    name: str
    kernel: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    div16: list[str]
    num_warps: int = 4
    num_stages: int = 3  # Triton's default
    tiles_per_iteration: int = 1  # tiles one pass of the kernel's loop body handles (qkv_rope: q, k and v of a head)
    tile_elements: int = 0  # a tile's elements where its constexprs do not say it the usual way (0: they do)


def _qkv_rope_variants() -> list[Variant]:
    from kernels import qkv_rope
    # with the qkv Linear's bias (fp32), as the model runs it
    fwd_sig = {"QKV": "*bf16", "s_qkv": "i32", "COS": "*fp32", "SIN": "*fp32", "QW": "*fp32", "KW": "*fp32",
               "BIAS": "*fp32", "Q": "*bf16", "K": "*bf16", "V": "*bf16", "rows": "i32", "N": "i32", "H": "i32",
               "eps": "fp32"}
    bwd_sig = {"DQ": "*bf16", "sqb": "i32", "sqh": "i32", "sqn": "i32", "DK": "*bf16", "skb": "i32", "skh": "i32",
               "skn": "i32", "DV": "*bf16", "svb": "i32", "svh": "i32", "svn": "i32", "COS": "*fp32", "SIN": "*fp32",
               "QKV": "*bf16", "s_qkv": "i32", "QW": "*fp32", "KW": "*fp32", "BIAS": "*fp32", "DQKV": "*bf16",
               "PQW": "*fp32", "PKW": "*fp32", "PBIAS": "*fp32", "rows": "i32", "N": "i32", "H": "i32", "eps": "fp32"}
    out = []
    for norm in (False, True):
        for D in (72, 64):
            # every tile the autotuner may pick (the backward with qk-norm runs the fixed BLOCK_R at 4 warps)
            # the per-head tiles, then (without qk-norm) the row variant's
            tiles = [(r, 128, w, False) for r, w in qkv_rope.TILES]
            tiles += [] if norm else [(r, c, w, True) for r, c, w in qkv_rope.ROW_TILES]
            for r, chunk, w, rows in tiles:
                const = {"D": D, "HAS_NORM": norm, "HAS_BIAS": True, "BLOCK_R": r, "BLOCK_D": 128 if D == 72 else 64,
                         "ROWS": rows, "CHUNK": chunk, "WITH_V": True}
                tile = f"BLOCK_R={r} warps={w}" + (f" rows CHUNK={chunk}" if rows else "")
                out.append(Variant(f"qkv_rope fwd D={D} norm={norm} {tile}", qkv_rope._qkv_rope_fwd_kernel,
                                   {**fwd_sig, **{k: "constexpr" for k in const}}, const,
                                   [k for k, t in fwd_sig.items() if t != "fp32"], w, tiles_per_iteration=3))
                if D == 72 and not norm and (r, w) in ((16, 4), (32, 8)):  # inference's q and k only (qk_rope_op)
                    qk = {**const, "HAS_BIAS": False, "WITH_V": False}
                    out.append(Variant(f"qkv_rope fwd qk-only D={D} {tile}", qkv_rope._qkv_rope_fwd_kernel,
                                       {**fwd_sig, **{k: "constexpr" for k in qk}}, qk,
                                       [k for k, t in fwd_sig.items() if t != "fp32" and k not in ("BIAS", "V")],
                                       w, tiles_per_iteration=2))
                if norm and (r, w) != (qkv_rope.BLOCK_R, 4):
                    continue
                # token-major gradients (SDPA's layout): strides (N*H*D, D, H*D) / 8 -- D / 8 = 9 is not a
                # multiple of 16, the others are at XL/1
                bconst = {**{k: v for k, v in const.items() if k != "WITH_V"}, "STRIDE_UNIT": 8, "HEADS_ADJACENT": True}
                out.append(Variant(f"qkv_rope bwd D={D} norm={norm} {tile}", qkv_rope._qkv_rope_bwd_kernel,
                                   {**bwd_sig, **{k: "constexpr" for k in bconst}}, bconst,
                                   [k for k, t in bwd_sig.items() if t != "fp32" and k not in ("sqh", "skh", "svh")],
                                   w, tiles_per_iteration=3))
    return out


def _norm_variants() -> list[Variant]:
    """The model's gated_residual_norm_modulate (the widest variant: every input) at hidden 1152, in the dtypes a
    bf16 training step runs it in (fp32 residual stream and weight, bf16 branch and adaLN vectors, out written in
    bf16 for the next GEMM and its gradient read in bf16: out_dtype), and the qk-norm's layer_norm at 72, for every
    tile the autotuner may pick."""
    from kernels import _triton, fused_norm
    fwd_sig = {"X": "*fp32", "sx": "i32", "G": "*bf16", "sg": "i32", "Y": "*bf16", "sy": "i32", "W": "*fp32",
               "BIAS": "*fp32", "SHIFT": "*bf16", "sshift": "i32", "SCALE": "*bf16", "sscale": "i32", "H": "*fp32",
               "OUT": "*bf16", "MEAN": "*fp32", "RSTD": "*fp32", "rows": "i32", "N": "i32", "C": "i32", "eps": "fp32"}
    bwd_sig = {"DOUT": "*bf16", "DH": "*fp32", "XIN": "*fp32", "G": "*bf16", "sg": "i32", "Y": "*bf16", "sy": "i32",
               "W": "*fp32", "BIAS": "*fp32", "SCALE": "*bf16", "sscale": "i32", "MEAN": "*fp32", "RSTD": "*fp32",
               "DX": "*fp32", "DY": "*bf16", "PW": "*fp32", "PB": "*fp32", "PSHIFT": "*fp32", "PSCALE": "*fp32",
               "PG": "*fp32", "N": "i32", "C": "i32", "R": "i32"}
    cases = {  # name: (C, forward flags, backward flags)
        "grnm": (1152, dict(HAS_RES=True, IS_RMS=True, HAS_W=True, HAS_BIAS=False, HAS_SHIFT=True, HAS_SCALE=True,
                            ONE_SAMPLE=True),  # 256 tokens a sample
                 dict(HAS_RES=True, HAS_DH=True, IS_RMS=True, HAS_W=True, HAS_BIAS=False, HAS_SHIFT=True,
                      HAS_SCALE=True)),
        "qk layer_norm": (72, dict(HAS_RES=False, IS_RMS=False, HAS_W=True, HAS_BIAS=True, HAS_SHIFT=False,
                                   HAS_SCALE=False, ONE_SAMPLE=True),
                          dict(HAS_RES=False, HAS_DH=False, IS_RMS=False, HAS_W=True, HAS_BIAS=True, HAS_SHIFT=False,
                               HAS_SCALE=False)),
    }
    out = []
    for name, (C, fflags, bflags) in cases.items():
        block_a, block_b = _triton.row_split(C)  # the row as two tiles (1024 + 128, 64 + 8)
        for which, kernel, sig, flags, prune in (
                ("fwd", fused_norm._norm_fwd_kernel, fwd_sig, fflags, fused_norm._prune_split_tiles),
                ("bwd", fused_norm._norm_bwd_kernel, bwd_sig, bflags, fused_norm._prune_split_tiles_bwd)):
            for cfg in prune(fused_norm._tile_configs(), {}, BLOCK_A=block_a, BLOCK_B=block_b):
                const = {**flags, "BLOCK_M": cfg.kwargs["BLOCK_M"], "BLOCK_A": block_a, "BLOCK_B": block_b}
                div = [k for k, t in sig.items() if t.startswith("*")] + (
                    [k for k in ("sx", "sy", "sg", "sshift", "sscale", "rows", "N", "C") if k in sig] if C % 16 == 0
                    else [])
                out.append(Variant(f"norm {which} {name} C={C} BLOCK_M={cfg.kwargs['BLOCK_M']} "
                                   f"warps={cfg.num_warps}", kernel, {**sig, **{k: "constexpr" for k in const}},
                                   const, div, cfg.num_warps))
    return out


def _fp8_quant_variants() -> list[Variant]:
    """quantize_rows_fp8 at hidden 1152 (attention's output) and swiglu_fp8 at 3072 (w12's output), bf16 in, for
    every tile the autotuner may pick: the sampler's scales, the FP8 training recipe's powers of two, and (the
    SwiGLU) with the column maxima the training MLP's weight gradient takes."""
    from kernels import fp8_quant, fused_norm
    sig = {"X": "*bf16", "sx": "i32", "Q": "*fp8e4nv", "S": "*fp32", "rows": "i32", "C": "i32"}
    cases = {  # name: (kernel, its autotuner's pruning, width, runtime arguments after C, constexpr flag settings)
        "quantize_rows_fp8": (fp8_quant._quant_rows_kernel, fp8_quant._prune_split_tiles, 1152, {},
                              [{"POW2": False}, {"POW2": True}]),
        "swiglu_fp8": (fp8_quant._swiglu_quant_kernel, fp8_quant._prune_swiglu_tiles, 3072,
                       {"CA": "*i32", "span": "i32"},
                       [{"POW2": False, "COLMAX": False}, {"POW2": True, "COLMAX": False},
                        {"POW2": True, "COLMAX": True}]),
    }
    out = []
    for name, (kernel, prune, C, extra, flag_sets) in cases.items():
        block_a, block_b = fp8_quant.row_split(C)  # the row as two exact tiles (1024 + 128, 2048 + 1024)
        names = dict(zip(sig, kernel.arg_names))  # the kernels' own argument names (X / X12)
        ksig = {**{names[k]: t for k, t in sig.items()}, **extra}
        for flags in flag_sets:
            for cfg in prune(fused_norm._tile_configs(), dict(flags), BLOCK_A=block_a, BLOCK_B=block_b):
                const = {**flags, "BLOCK_M": cfg.kwargs["BLOCK_M"], "BLOCK_A": block_a, "BLOCK_B": block_b}
                label = " ".join(f"{k}={int(v)}" for k, v in flags.items())
                out.append(Variant(f"{name} C={C} {label} BLOCK_M={const['BLOCK_M']} warps={cfg.num_warps}",
                                   kernel, {**ksig, **{k: "constexpr" for k in const}}, const, list(ksig),
                                   cfg.num_warps))
    return out


def _norm_fp8_variants() -> list[Variant]:
    """The FP8 sampler's block norms with their output quantized per row (kernels/fp8_quant.py `_norm_quant_kernel`)
    at hidden 1152, every tensor bf16 as in its bf16 model: the gated one (the residual in front) and the first
    block's, for every tile the autotuner may pick."""
    from kernels import fp8_quant, fused_norm
    sig = {"X": "*bf16", "sx": "i32", "G": "*bf16", "sg": "i32", "Y": "*bf16", "sy": "i32", "W": "*bf16",
           "SHIFT": "*bf16", "sshift": "i32", "SCALE": "*bf16", "sscale": "i32", "H": "*bf16", "Q": "*fp8e4nv",
           "S": "*fp32", "rows": "i32", "N": "i32", "C": "i32", "eps": "fp32"}
    C = 1152
    block_a, block_b = fp8_quant.row_split(C)
    out = []
    for res in (True, False):
        flags = dict(HAS_RES=res, IS_RMS=True, HAS_W=True, HAS_SHIFT=True, HAS_SCALE=True, ONE_SAMPLE=True, ROUND=1)
        for cfg in fp8_quant._prune_norm_fp8_tiles(fused_norm._tile_configs(), {}, BLOCK_A=block_a, BLOCK_B=block_b):
            const = {**flags, "BLOCK_M": cfg.kwargs["BLOCK_M"], "BLOCK_A": block_a, "BLOCK_B": block_b}
            out.append(Variant(f"norm_fp8 {'gated' if res else 'plain'} C={C} BLOCK_M={const['BLOCK_M']} "
                               f"warps={cfg.num_warps}", fp8_quant._norm_quant_kernel,
                               {**sig, **{k: "constexpr" for k in const}}, const,
                               [k for k, t in sig.items() if t != "fp32"], cfg.num_warps))
    return out


def _rows_cols_variants() -> list[Variant]:
    """quantize_rows_cols_fp8's two passes over a bf16 gradient (qkv's, 3456 wide): the amax partials (its one
    tile), and the casts row-major and transposed (every tile its autotuner may pick)."""
    from kernels import fp8_quant
    amax_sig = {"G": "*bf16", "sg": "i32", "RA": "*fp32", "CA": "*fp32", "CS": "*fp32", "M": "i32", "N": "i32",
                "span": "i32"}
    quant_sig = {"G": "*bf16", "sg": "i32", "RINV": "*fp32", "CINV": "*fp32", "Q": "*fp8e4nv", "QT": "*fp8e4nv",
                 "M": "i32", "Mp": "i32", "N": "i32"}
    out = []
    m, n, w = fp8_quant.ROWS_COLS_AMAX_TILE
    const = {"BLOCK_M": m, "BLOCK_N": n}
    out.append(Variant(f"quantize_rows_cols_fp8 amax BLOCK_M={m} BLOCK_N={n} warps={w}",
                       fp8_quant._rows_cols_amax_kernel, {**amax_sig, **{k: "constexpr" for k in const}}, const,
                       list(amax_sig), w, tile_elements=m * n))
    for m, n, w in fp8_quant.ROWS_COLS_QUANT_TILES:
        const = {"BLOCK_M": m, "BLOCK_N": n}
        out.append(Variant(f"quantize_rows_cols_fp8 cast BLOCK_M={m} BLOCK_N={n} warps={w}",
                           fp8_quant._rows_cols_quant_kernel, {**quant_sig, **{k: "constexpr" for k in const}},
                           const, list(quant_sig), w, tile_elements=m * n))
    return out


def _swiglu_variants() -> list[Variant]:
    """The SwiGLU (kernels/swiglu.py) at XL/1's width (3072), bf16, with w12's bias: the forward, and the backward
    in every tile its autotuner may pick (with the bias's partial sums; the one-row tile only without them)."""
    from kernels import swiglu
    H = 3072
    fwd_sig = {"X12": "*bf16", "sx": "i32", "BIAS": "*fp32", "OUT": "*bf16", "H": "i32"}
    bwd_sig = {"DOUT": "*bf16", "X12": "*bf16", "sx": "i32", "BIAS": "*fp32", "DX12": "*bf16", "PART": "*fp32",
               "rows": "i32", "H": "i32"}
    const = {"HAS_BIAS": True, "BLOCK": swiglu.BLOCK}
    out = [Variant(f"swiglu fwd H={H} bias BLOCK={swiglu.BLOCK}", swiglu._fwd_kernel,
                   {**fwd_sig, **{k: "constexpr" for k in const}}, const, list(fwd_sig), 4, tiles_per_iteration=2)]
    for bias, tiles in ((True, swiglu.BWD_TILES), (False, swiglu.BWD_TILES_NO_BIAS)):
        for p, r, c, w in tiles:
            const = {"HAS_BIAS": bias, "ROWS_PER_PROGRAM": p, "BLOCK_R": r, "BLOCK_C": c}
            out.append(Variant(f"swiglu bwd H={H} {'bias' if bias else 'no bias'} rows/program={p} BLOCK_R={r} "
                               f"BLOCK_C={c} warps={w}", swiglu._bwd_kernel,
                               {**bwd_sig, **{k: "constexpr" for k in const}}, const, list(bwd_sig), w,
                               tiles_per_iteration=2))
    return out


def _rope_attention_variants() -> list[Variant]:
    """The fused RoPE attention (kernels/rope_attention.py) at head_dim 72 (64 + 16) and 64, bf16, for every tile
    its autotuners may pick: its matmuls must become Hopper's wgmma, without spills."""
    from kernels import rope_attention as ra
    # with the qkv Linear's bias (fp32), as the model runs it
    fwd_sig = {"QKV": "*bf16", "s_qkv": "i32", "COS": "*fp32", "SIN": "*fp32", "BIAS": "*fp32", "O": "*bf16",
               "s_o": "i32", "LSE": "*fp32", "KROT": "*bf16", "N": "i32", "H": "i32", "BH": "i32", "qk_scale": "fp32"}
    bwd_sig = {"QKV": "*bf16", "s_qkv": "i32", "COS": "*fp32", "SIN": "*fp32", "BIAS": "*fp32", "O": "*bf16",
               "s_o": "i32", "DO": "*bf16", "s_do": "i32", "LSE": "*fp32", "DELTA": "*fp32", "QROT": "*bf16",
               "KROT": "*bf16", "DQACC": "*fp32", "DQKV": "*bf16", "PBIAS": "*fp32", "N": "i32", "H": "i32", "BH": "i32",
               "NBLK": "i32", "qk_scale": "fp32", "sm_scale": "fp32"}
    out = []
    for D in (72, 64):
        split = ra._split(D)
        for which, kernel, sig, configs in (("fwd", ra._rope_attn_fwd_kernel, fwd_sig, ra.FWD_CONFIGS),
                                            ("bwd", ra._rope_attn_bwd_kernel, bwd_sig, ra.BWD_CONFIGS)):
            for cfg in configs:
                # XL/1's 256 tokens: a multiple of every tile (EVEN: no row masks)
                const = {"D": D, **split, "PREC": "tf32", "HAS_BIAS": True, "EVEN": True, **cfg.kwargs}
                tile = " ".join(f"{k}={v}" for k, v in cfg.kwargs.items())
                out.append(Variant(f"rope_attention {which} D={D} {tile} warps={cfg.num_warps} "
                                   f"stages={cfg.num_stages}", kernel, {**sig, **{k: "constexpr" for k in const}},
                                   const, [k for k, t in sig.items() if t != "fp32"], cfg.num_warps,
                                   num_stages=cfg.num_stages))
    return out


def _group_norm_variants() -> list[Variant]:
    """group_norm_silu (kernels/group_norm.py), bf16 activations, NCHW and channels_last, for every tile its
    autotuners may pick at C=128 and C=512 (C is a runtime argument: a tile compiles the same for both, so each
    compiles once), with weight, bias and SiLU; the finalize kernel at 4, 8 and 16 channels per group."""
    from kernels import group_norm as gn
    stats = {"X": "*bf16", "PMEAN": "*fp32", "PM2": "*fp32", "C": "i32", "L": "i32", "CHUNK": "i32"}
    vec = {"W": "*fp32", "B": "*fp32", "MEAN": "*fp32", "RSTD": "*fp32"}
    norm = {"X": "*bf16", **vec, "OUT": "*bf16", "C": "i32", "L": "i32", "CHUNK": "i32", "G": "i32", "Cg": "i32"}
    part = {"DY": "*bf16", "X": "*bf16", **vec, "PDB": "*fp32", "PDW": "*fp32", "C": "i32", "L": "i32",
            "CHUNK": "i32", "G": "i32", "Cg": "i32"}
    dx = {"DY": "*bf16", "X": "*bf16", **vec, "COEF": "*fp32", "DX": "*bf16", "N": "i32", "C": "i32", "L": "i32",
          "CHUNK": "i32", "G": "i32", "Cg": "i32"}
    flags = {"HAS_W": True, "HAS_B": True, "SILU": True}
    div = lambda sig: [k for k, t in sig.items() if t.startswith("*") or k in ("C", "L", "CHUNK", "G")]  # noqa
    out = []
    for cl in (False, True):
        layout = "channels_last" if cl else "NCHW"
        tiles = {}
        for C in (128, 512):
            for cfg in gn._prune(gn._configs(cl), {"C": C}):
                tiles.setdefault((cfg.kwargs["BLOCK_P"], cfg.kwargs["BLOCK_C"], cfg.num_warps), []).append(C)
        for (p, c, w), cs in tiles.items():
            for which, kernel, sig, fl in (("stats", gn._group_norm_stats_fwd_kernel, stats, {}),
                                           ("norm", gn._group_norm_fwd_kernel, norm, flags),
                                           ("bwd partials", gn._group_norm_partials_bwd_kernel, part, flags),
                                           ("bwd dx", gn._group_norm_dx_bwd_kernel, dx, flags)):
                const = {"CL": cl, **fl, "BLOCK_P": p, "BLOCK_C": c}
                out.append(Variant(f"group_norm {which} {layout} C={'/'.join(map(str, cs))} BLOCK_P={p} BLOCK_C={c} "
                                   f"warps={w}", kernel, {**sig, **{k: "constexpr" for k in const}}, const, div(sig),
                                   w))
    fin = {"PMEAN": "*fp32", "PM2": "*fp32", "MEAN": "*fp32", "RSTD": "*fp32", "C": "i32", "L": "i32", "K": "i32",
           "CHUNK": "i32", "G": "i32", "eps": "fp32"}
    for cg in (4, 8, 16):  # C = 128, 256, 512 in 32 groups
        block_k, block_g, block_c = gn._finalize_tile(cg, 256, 32)
        const = {"CG": cg, "BLOCK_K": block_k, "BLOCK_G": block_g, "BLOCK_C": block_c}
        out.append(Variant(f"group_norm finalize CG={cg} BLOCK_K={block_k}", gn._group_norm_finalize_fwd_kernel,
                           {**fin, **{k: "constexpr" for k in const}}, const, div(fin), 4))
    return out


def _upsample_variants() -> list[Variant]:
    """upsample_conv's phase interleave (kernels/upsample_conv.py), bf16, NCHW and channels_last, forward and
    backward, at the decoder's widest level (128 channels, 128 -> 256 px): the unit stride of each tensor is the
    constexpr 1 the JIT specialises it to."""
    from kernels import upsample_conv as uc
    out = []
    for cl in (False, True):
        layout = "channels_last" if cl else "NCHW"
        unit = ("c",) if cl else ("w",)
        for which, kernel, a, b, width in (("fwd", uc._interleave_fwd_kernel, ("Y", "sy"), ("OUT", "so"), 256),
                                           ("bwd", uc._interleave_bwd_kernel, ("DOUT", "so"), ("DY", "sd"), 129)):
            sig = {a[0]: "*bf16", b[0]: "*bf16", "C": "i32", "H": "i32", "W": "i32"}
            if which == "bwd":
                sig["n_cb"] = "i32"
            const = {}
            for prefix in (a[1], b[1]):
                for axis in ("b", "c", "h", "w"):
                    name = f"{prefix}_{axis}"
                    sig[name] = "constexpr" if axis in unit else "i32"
                    if axis in unit:
                        const[name] = 1
            bw, bc = uc._tile(cl, 128, width)
            const.update(CL=cl, BLOCK_W=bw, BLOCK_C=bc)
            sig.update({k: "constexpr" for k in ("CL", "BLOCK_W", "BLOCK_C")})
            # what the JIT marks divisible by 16 there: the pointers, C, H, W, the 2H x 2W tensor's strides; of the
            # (H+1) x (W+1) one's, its batch stride, and in channels_last all (multiples of 4C)
            odd = a[1] if which == "fwd" else b[1]
            div = [k for k, t in sig.items() if t != "constexpr" and (
                t.startswith("*") or k in ("C", "H", "W") or (k[:2] in ("sy", "so", "sd") and (
                    not k.startswith(odd) or cl or k.endswith("_b"))))]
            out.append(Variant(f"upsample_conv interleave {which} {layout} BLOCK_W={bw} BLOCK_C={bc}", kernel, sig,
                               const, div, 4, tile_elements=bw * bc))
    return out


def _ptxas() -> str:
    from triton.backends.nvidia.compiler import get_ptxas
    return get_ptxas(90).path


def _sass_count(cubin: str) -> Optional[int]:
    """Instructions in the cubin's SASS: the size of its .text sections over 16 bytes (every sm_90 instruction is
    128 bits; the count cuobjdump -sass lists, read from the ELF section table instead of a 0.3 s disassembler run
    per variant, which took most of this check's time)."""
    import struct
    with open(cubin, "rb") as f:
        b = f.read()
    if b[:5] != b"\x7fELF\x02":  # a 64-bit ELF, as ptxas writes it
        return None
    shoff, = struct.unpack_from("<Q", b, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", b, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", b, shoff + i * shentsize) for i in range(shnum)]
    names = sections[shstrndx][4]  # sh_offset of the section-name string table

    def name(off: int) -> bytes:
        return b[names + off:b.index(b"\0", names + off)]
    return sum(size for sh_name, _, _, _, _, size in sections if name(sh_name).startswith(b".text")) // 16


def _tile_elements_per_thread(v: Variant) -> float:
    if v.tile_elements:
        return v.tile_elements * v.tiles_per_iteration / (32 * v.num_warps)
    rows = v.constexprs.get("BLOCK_M", v.constexprs.get("BLOCK_R", v.constexprs.get("BLOCK_P",
                            v.constexprs.get("BLOCK_K", 1))))  # BLOCK_P/K: group_norm's
    c = v.constexprs
    cols = c["CHUNK"] if c.get("ROWS") else c.get("BLOCK_C", c.get("BLOCK_D", c.get("BLOCK", c.get("BLOCK_A", 0)
                                                                                + c.get("BLOCK_B", 0) or 1)))
    return rows * cols * v.tiles_per_iteration / (32 * v.num_warps)


def loop_sass(cubin: str) -> list[int]:
    """Instructions in each loop body of the cubin's SASS (from a backward branch's target to the branch), read from
    cuobjdump's listing: for a kernel that walks its rows in a loop, the loop body over the elements a thread handles
    per iteration is what it issues per element (the static count also holds the prologue and epilogue, run once)."""
    cuobjdump = os.path.join(os.path.dirname(_ptxas()), "cuobjdump")
    listing = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True, check=True).stdout
    ins = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", listing)]
    loops = []
    for addr, text in ins:
        target = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < addr:
            start = int(target.group(1), 16)
            loops.append(sum(1 for a, _ in ins if start <= a <= addr))
    return loops


def compile_variant(v: Variant, loops: bool = False) -> dict:
    """{"registers", "spill_bytes", "vector_loads", "scalar_loads", "vector_stores", "sass_per_element"} of v
    compiled for sm_90. sass_per_element: the kernel's SASS instructions (static) over the tile elements each
    thread handles in one pass of its body (masked lanes included): about the instructions issued per element where
    the body dominates (a loop's prologue counts in once). Against the card's issue rate it says whether a kernel
    can be memory-bound at all (the FP8 SwiGLU could not: 55 per element, 0.52 ms a call against 0.24 of bytes)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    attrs = {(v.kernel.arg_names.index(a),): [["tt.divisibility", 16]] for a in v.div16}
    src = ASTSource(fn=v.kernel, signature=v.signature, constexprs=v.constexprs, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": v.num_warps, "num_stages": v.num_stages})
    ptx = k.asm["ptx"]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        log = subprocess.run([_ptxas(), "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a", path, "-o",
                              os.path.join(d, "k.cubin")], capture_output=True, text=True, check=True).stderr
        sass = _sass_count(os.path.join(d, "k.cubin"))
        loop_counts = loop_sass(os.path.join(d, "k.cubin")) if loops else []
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores", log)
    ops = re.findall(r"(ld|st)\.global(\.[a-z0-9.]*)", ptx)
    return {"registers": int(regs.group(1)) if regs else None, "spill_bytes": int(spill.group(1)) if spill else 0,
            "shared_bytes": k.metadata.shared,
            "vector_loads": sum(1 for op, t in ops if op == "ld" and ".v" in t),
            "scalar_loads": sum(1 for op, t in ops if op == "ld" and ".v" not in t),
            "vector_stores": sum(1 for op, t in ops if op == "st" and ".v" in t),
            "sass_per_element": None if sass is None else round(sass / _tile_elements_per_thread(v), 1),
            "e4m3_cvt": "cvt.rn.satfinite.e4m3x2.f32" in ptx, "div_full_f32": ptx.count("div.full.f32"),
            "wgmma": ptx.count("wgmma.mma_async"), "mma_sync": len(re.findall(r"\bmma\.sync", ptx)),
            **({"loop_sass_per_element": [round(n / _tile_elements_per_thread(v), 1) for n in loop_counts]}
               if loops else {})}


# The most shared memory one block may use on sm_90 (227 KiB: CUDA's sharedMemPerBlockOptin on an H100 / H200).
# Triton checks a compiled kernel's `shared` against it at launch and raises OutOfResources there: an explicit
# config over it fails, an autotuner skips it (timed as inf) after compiling it for nothing.
SM90_SHARED_LIMIT = 232448


def variants() -> list[Variant]:
    return (_qkv_rope_variants() + _norm_variants() + _swiglu_variants() + _fp8_quant_variants() + _norm_fp8_variants()
            + _rows_cols_variants() + _rope_attention_variants() + _group_norm_variants() + _upsample_variants())


def main(argv: Optional[list[str]] = None) -> dict:
    from modeling.config import cli_parser
    ap = cli_parser("bench.sm90_check", __doc__.split("\n\n")[0])
    ap.add_argument("--loops", action="store_true",
                    help="also each loop body's SASS per element (a cuobjdump run per variant: slower)")
    ap.add_argument("--only", default="", help="variants whose names start with this")
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("bench.sm90_check: unset TRITON_INTERPRET (the interpreter replaces the JIT kernels)")
    import kernels
    triton_version = kernels.describe()["triton"]  # the Triton imported (PYTHONPATH may put the lent one first)
    results, failed = {}, []
    for v in variants():
        if not v.name.startswith(a.only):
            continue
        try:
            results[v.name] = compile_variant(v, a.loops)
        except Exception as e:  # every variant is tried: one run names all that do not compile with this Triton
            results[v.name] = {"error": f"{type(e).__name__}: {_last_line(e)}"}
            failed.append(v.name)
    for name, r in results.items():
        if "error" in r:
            print(f"{name:55s} DOES NOT COMPILE (Triton {triton_version}): {r['error']}")
            continue
        print(f"{name:55s} regs {r['registers']:>4} spill {r['spill_bytes']:>4} B  shared {r['shared_bytes']:>6} B  "
              f"vector ld/st {r['vector_loads']}/{r['vector_stores']}  scalar ld {r['scalar_loads']}  "
              f"SASS/element {r['sass_per_element']}"
              + (f"  loop SASS/element {r['loop_sass_per_element']}" if r.get("loop_sass_per_element") else ""))
    print(json.dumps(results))
    if failed:
        raise SystemExit(f"bench.sm90_check: {len(failed)} of {len(results)} variants do not compile for sm_90 "
                         f"with Triton {triton_version} (first: {failed[0]})")
    return results


def _last_line(e: Exception) -> str:
    """The innermost message of a Triton compilation error (the chain ends at the call that failed)."""
    while e.__cause__ is not None:
        e = e.__cause__
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return lines[-1][:300] if lines else repr(e)[:300]


if __name__ == "__main__":
    main()
