"""The card's measured ceilings: copy bandwidth, bf16 and FP8 matmul rates, and how long a batch's host-to-device copy
holds the host. The GPU suite's part A (`ceilings` section) and a profiled sampling run (bench.throughput --mode
sample --profile) measure them, and bench.shortfall reads each profile against them."""
from __future__ import annotations

import time

import torch


def ceilings(smoke: bool) -> dict:
    """The card's measured copy bandwidth (GB/s), bf16 matmul TFLOP/s and FP8 matmul TFLOP/s (torch._scaled_mm, e4m3
    with one scale per row and column, bf16 out: our FP8 training's GEMM; where the device has FP8): the ceilings the
    ops and bench.shortfall read the step against."""
    dev = "cuda" if torch.cuda.is_available() and not smoke else "cpu"
    from bench.ops_bench import bench_ms
    n = (1 << 20) if smoke else (1 << 30)  # 1 GiB copy: far beyond L2
    a = torch.randn(n // 4, device=dev)
    b = torch.empty_like(a)
    ms = bench_ms(lambda: b.copy_(a), smoke)
    m = 256 if smoke else 8192
    x, y = (torch.randn(m, m, device=dev, dtype=torch.bfloat16) for _ in range(2))
    mm_ms = bench_ms(lambda: x @ y, smoke)
    out = {"copy_GBps": 2 * n / ms / 1e6, "bf16_matmul_TFLOPs": 2 * m ** 3 / mm_ms / 1e9}
    if dev == "cpu" or torch.cuda.get_device_capability() >= (8, 9):
        xq, yq = x.to(torch.float8_e4m3fn), y.to(torch.float8_e4m3fn)
        sa, sb = torch.ones(m, 1, device=dev), torch.ones(1, m, device=dev)
        fp8_ms = bench_ms(lambda: torch._scaled_mm(xq, yq.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16,
                                                   use_fast_accum=True), smoke)
        out["fp8_matmul_TFLOPs"] = 2 * m ** 3 / fp8_ms / 1e9
    del a, b, x, y
    if dev == "cuda":
        out["batch_copy_host_ms"] = batch_copy_host_ms()
    return out


def batch_copy_host_ms(queued_cycles: int = int(4e8)) -> dict:
    """How long the host is held by an XL/1 batch's copy to the GPU (256 x 32 x 16 x 16 fp32, 8 MB, non_blocking)
    issued behind ~0.2 s of queued GPU work, from pageable and from page-locked memory: whether this CUDA makes a
    pageable copy wait for the stream (the trainers copy from page-locked memory: train.base.host_to_device)."""
    lat = torch.randn(256, 32, 16, 16)
    out = {}
    for name, src in (("pageable", lat), ("pinned", lat.pin_memory())):
        src.to("cuda", non_blocking=True)
        torch.cuda.synchronize()
        torch.cuda._sleep(queued_cycles)
        t = time.perf_counter()
        src.to("cuda", non_blocking=True)
        out[name] = round((time.perf_counter() - t) * 1e3, 3)
        torch.cuda.synchronize()
    return out
