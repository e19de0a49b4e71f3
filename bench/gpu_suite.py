"""The GPU suite (bench/gpu_suite.sh runs it): environment, ceilings, GPU tests, per-op bandwidth,
LightningDiT-XL/1 training throughput for eager / compiled / fused / fused+compiled (+ FP8), one JSON.

Every section runs under try/except and records its error; a global budget stops starting new sections
after --budget seconds. `--cpu-smoke` runs every section on the CPU with tiny shapes (tests use it).
"""
import argparse
import json
import os
import subprocess
import sys
import time
import traceback

import torch

import kernels

T0 = time.time()


class Suite:
    def __init__(self, out, budget, smoke):
        self.out, self.budget, self.smoke = out, budget, smoke
        self.result = {"smoke": smoke, "sections": {}, "errors": {}, "skipped_for_time": []}

    def section(self, name, fn, *a, **kw):
        if time.time() - T0 > self.budget:
            self.result["skipped_for_time"].append(name)
            print(f"[suite] {name}: skipped (time budget)", flush=True)
            return None
        t = time.time()
        print(f"[suite] {name} ...", flush=True)
        try:
            self.result["sections"][name] = fn(*a, **kw)
        except Exception as e:
            self.result["errors"][name] = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}"
            print(f"[suite] {name}: ERROR {type(e).__name__}: {str(e)[:200]}", flush=True)
        self.result.setdefault("section_seconds", {})[name] = round(time.time() - t, 1)
        self.save()
        return self.result["sections"].get(name)

    def save(self):
        os.makedirs(self.out, exist_ok=True)
        with open(os.path.join(self.out, "gpu_suite.json"), "w") as f:
            json.dump(self.result, f, indent=1, default=str)


# ----------------------------------------------------------------------------- sections

def environment():
    import importlib.util
    from kernels import cuda_ext
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "not installed"
    have = lambda m: "installed" if importlib.util.find_spec(m) else "not installed"  # noqa: E731
    return {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": tv,
            "cuda_ext": cuda_ext.status()[1] or "built",
            "flash_attn (FA2)": have("flash_attn"), "flash_attn_interface (FA3)": have("flash_attn_interface"),
            "transformer_engine": have("transformer_engine"), "torchao": have("torchao")}


def ceilings(smoke):
    dev = "cuda" if torch.cuda.is_available() and not smoke else "cpu"
    from bench.ops_bench import bench_ms
    n = (1 << 20) if smoke else (1 << 30)  # 1 GiB copy: far beyond L2
    a = torch.randn(n // 4, device=dev)
    b = torch.empty_like(a)
    ms = bench_ms(lambda: b.copy_(a), smoke)
    m = 256 if smoke else 8192
    x, y = (torch.randn(m, m, device=dev, dtype=torch.bfloat16) for _ in range(2))
    mm_ms = bench_ms(lambda: x @ y, smoke)
    return {"copy_GBps": 2 * n / ms / 1e6, "bf16_matmul_TFLOPs": 2 * m ** 3 / mm_ms / 1e9}


def gpu_tests(smoke):
    if smoke:  # the CPU cannot run them; prove the collection works
        cmd = [sys.executable, "-m", "pytest", "-q", "--collect-only", "-m", "gpu", "tests/test_kernels_gpu.py"]
    else:
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-m", "gpu", "tests/test_kernels_gpu.py",
               "tests/test_kernels.py", "-p", "no:cacheprovider"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=150)
    return {"returncode": res.returncode, "tail": res.stdout[-1500:] + res.stderr[-500:]}


def parity_on_gpu(smoke):
    """The reference fixtures in fp32 on the GPU, per kernels backend (python -m bench.parity --device cuda)."""
    pdir = os.environ.get("VAVAE_PARITY_DIR") or "../shared/parity"
    if not os.path.isfile(os.path.join(pdir, "configs.json")):
        return {"status": f"not run: no fixtures at {pdir} (set VAVAE_PARITY_DIR)"}
    dev = "cpu" if smoke else "cuda"
    out = {}
    for backend in ("reference", "triton", "cuda") if not smoke else ("reference",):
        res = subprocess.run([sys.executable, "-m", "bench.parity", pdir, "--device", dev, "--backend", backend],
                             capture_output=True, text=True, timeout=120)
        lines = (res.stdout + res.stderr).strip().splitlines()
        out[backend] = {"returncode": res.returncode, "last": lines[-1:] if lines else [],
                        "failures": [l for l in lines if "FAIL" in l or "ERROR" in l][:10]}
    return out


def _compile_blocks(model, smoke):
    """torchtitan-style: compile each block (one shared graph for all identical blocks; fast to build)."""
    for block in model.blocks:
        block.compile(backend="eager" if smoke else "inductor", fullgraph=True)
    return model


def build_train_step(smoke, mode, batch, fp8=False):
    """(step_fn, model, fp8_backend) for one full training step (forward, flow loss, backward, AdamW) in bf16
    autocast; mode in eager / compiled (reference ops) and fused / fused+compiled (kernels' auto backend)."""
    from modeling.flow import flow_loss
    from modeling.lightningdit import LightningDiT, build_lightningdit
    dev = "cuda" if torch.cuda.is_available() and not smoke else "cpu"
    kernels.set_backend("reference" if mode in ("eager", "compiled") else ("triton" if smoke else "auto"))
    torch.manual_seed(0)
    if smoke:
        model = LightningDiT(input_size=4, patch_size=1, in_channels=4, hidden_size=144, depth=1, num_heads=2,
                             num_classes=10).to(dev)
    else:
        model = build_lightningdit("XL/1", input_size=16, in_channels=32, num_classes=1000).to(dev)
    model.train()
    fp8_backend = _apply_fp8(model) if fp8 else None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev == "cuda")
    if "compiled" in mode:
        _compile_blocks(model, smoke)
    C, S = model.in_channels, model.config["input_size"]
    x1 = torch.randn(batch, C, S, S, device=dev)
    y = torch.randint(0, model.num_classes, (batch,), device=dev)

    def step():
        with torch.autocast(dev, dtype=torch.bfloat16):
            loss = flow_loss(model, x1, y)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step, model, fp8_backend


def train_throughput(smoke, mode, batch, fp8=False):
    """img/s of full training steps (forward, flow loss, backward, AdamW) in bf16 autocast."""
    step, model, fp8_backend = build_train_step(smoke, mode, batch, fp8)
    dev = next(model.parameters()).device.type
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    warm, reps = (1, 1) if smoke else (3, 8)
    for _ in range(warm):
        loss = step()
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss.item()}")
    if dev == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        step()
    if dev == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / reps
    flops = model.flops_per_sample(train=True) * batch / dt
    out = {"batch": batch, "img_per_s": batch / dt, "step_ms": dt * 1e3, "TFLOPs": flops / 1e12,
           "kernels": kernels.describe()["ops"], "fp8": fp8_backend,
           "peak_mem_GiB": torch.cuda.max_memory_allocated() / 2 ** 30 if dev == "cuda" else None}
    del model, step
    kernels.set_backend("auto")
    return out


def _apply_fp8(model):
    try:
        from train.fp8 import apply_fp8
    except ImportError:
        apply_fp8 = None
    if apply_fp8 is not None:
        apply_fp8(model, backend="torchao")
        return "train.fp8.apply_fp8(torchao)"
    from torchao.float8 import convert_to_float8_training
    for block in model.blocks:
        convert_to_float8_training(block)
    return "torchao.float8.convert_to_float8_training(blocks)"


def find_batch(suite, smoke, mode):
    """Largest batch of 128/256 whose fused training step fits (fused uses the least memory)."""
    tried = {}
    best = None
    for b in ((2,) if smoke else (128, 256)):
        try:
            tried[b] = train_throughput(smoke, mode, b)
            best = b
        except torch.OutOfMemoryError:
            tried[b] = "out of memory"
            break
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    if best is None:
        raise RuntimeError(f"no batch fits: {tried}")
    return {"batch": best, "tried": tried}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results/tmp"))
    p.add_argument("--budget", type=float, default=390.0, help="seconds after which no new section starts")
    p.add_argument("--cpu-smoke", action="store_true", help="every section, tiny shapes, on the CPU")
    a = p.parse_args()
    s = Suite(a.out, a.budget, a.cpu_smoke)
    s.result["environment"] = s.section("environment", environment)
    ceil = s.section("ceilings", ceilings, a.cpu_smoke) or {}
    s.section("gpu_tests", gpu_tests, a.cpu_smoke)
    s.section("parity_fp32", parity_on_gpu, a.cpu_smoke)
    from bench import ops_bench
    s.section("ops", ops_bench.run, a.cpu_smoke, torch.bfloat16, ceil.get("copy_GBps"))
    search = s.section("batch_search", find_batch, s, a.cpu_smoke, "fused") or {}
    batch = search.get("batch", 2 if a.cpu_smoke else 64)
    peak = ceil.get("bf16_matmul_TFLOPs")
    for mode in ("fused", "fused+compiled", "compiled", "eager"):  # headline comparison first
        r = s.section(f"train_{mode}", _train_fit, a.cpu_smoke, mode, batch)
        if r and peak:
            r["MFU_vs_measured_matmul"] = r["TFLOPs"] / peak
            r["MFU_vs_989_dense_bf16"] = r["TFLOPs"] / 989.0
    try:
        import torchao  # noqa: F401
    except Exception as e:  # ImportError, or a torchao built for another torch
        s.result["sections"]["train_fp8+fused+compiled"] = f"torchao not importable: {type(e).__name__}: {e}"
    else:
        s.section("train_fp8+fused+compiled", _train_fit, a.cpu_smoke, "fused+compiled", batch, True)
    s.section("profile_fused+compiled", _profile, a.cpu_smoke, batch)
    s.save()
    print_table(s.result)


def _profile(smoke, batch):
    from bench.profile_step import attention_shapes, gemm_shapes, profile_training
    return {"profile": profile_training("fused+compiled", batch, 2, smoke),
            "attention_at_batch": attention_shapes(batch, smoke), "gemm_at_batch": gemm_shapes(batch, smoke)}


def _train_fit(smoke, mode, batch, fp8=False):
    """Train at `batch`, halving on out-of-memory (the reference eager path needs more memory)."""
    while True:
        try:
            return train_throughput(smoke, mode, batch, fp8)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            if batch <= 8:
                raise
            batch //= 2


def print_table(r):
    sec = r["sections"]
    env = sec.get("environment") or {}
    print("\n==== GPU suite:", env.get("device"), "torch", env.get("torch"), "triton", env.get("triton"),
          "cuda_ext:", str(env.get("cuda_ext"))[:40])
    c = sec.get("ceilings") or {}
    print(f"copy {c.get('copy_GBps', 0):.0f} GB/s | bf16 matmul {c.get('bf16_matmul_TFLOPs', 0):.0f} TFLOP/s")
    for b, row in (sec.get("parity_fp32") or {}).items():
        if isinstance(row, dict) and "returncode" in row:
            print(f"parity fp32 ({b}): rc {row['returncode']} {row['last']}")
    t = sec.get("gpu_tests") or {}
    print("gpu tests rc:", t.get("returncode"), (t.get("tail") or "").strip().splitlines()[-1:] )
    for op, impls in (sec.get("ops") or {}).items():
        if op == "attention":
            print(f"attention: chose {impls.get('chosen')}")
            continue
        cells = []
        for impl, row in impls.items():
            cells.append(f"{impl} {'ERR' if 'error' in row else '%.0f/%.0f GB/s' % (row['fwd_GBps'], row['fwd_bwd_GBps'])}")
        print(f"{op:30s} " + " | ".join(cells))
    for k, v in sec.items():
        if k.startswith("train_") and isinstance(v, dict):
            print(f"{k:28s} batch {v['batch']:4d}  {v['img_per_s']:8.1f} img/s  {v['TFLOPs']:6.1f} TFLOP/s  "
                  f"peak {v['peak_mem_GiB'] or 0:.1f} GiB")
    prof = (sec.get("profile_fused+compiled") or {}).get("profile") or {}
    for cat, ms in (prof.get("ms_per_step_by_category") or {}).items():
        print(f"profile: {cat:45s} {ms:8.1f} ms/step")
    for k, v in r["errors"].items():
        print(f"ERROR {k}: {v.splitlines()[0][:150]}")
    if r["skipped_for_time"]:
        print("skipped for time:", r["skipped_for_time"])


if __name__ == "__main__":
    main()
