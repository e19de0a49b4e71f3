"""The bench harness's arithmetic where the other tests only checked "> 0" or ran one rank: img/s from the median
step and the global batch, TFLOP/s per GPU, the step intervals after warmup, the compare ratio's direction, the FP8
curves' agreement over the tail, kernel time per call, the ops' forward+backward rates, the copy ceiling's bytes,
gradient accumulation in the scaling model, the sampler's scaled img/s and GFLOP, the VA-VAE step's img/s, the
suite's kernels_ran as recorded, and the peak-memory reset before the timed steps (CUDA calls faked). Each case here
let a planted bug through before."""
from types import SimpleNamespace

import pytest
import torch

from bench import ceilings as ceilings_mod, compare as compare_mod, fp8_compare, kernel_time, ops_bench, scaling
from bench import throughput, train_case


def _fake_trainer(world=4, kernels_="reference"):
    cfg = SimpleNamespace(model=SimpleNamespace(size="XL/1"), train=SimpleNamespace(
        precision="bf16", zero_stage=0, compile="none", kernels=kernels_, attention="auto"))
    return SimpleNamespace(device=torch.device("cpu"), info=SimpleNamespace(world_size=world), cfg=cfg,
                           flops_per_image=2e12, fp8_desc="off")


def test_train_row_arithmetic_median_global_batch_and_per_gpu_tflops(monkeypatch):
    """img/s = micro-batch x world / median step; TFLOP/s per GPU; MFU over the given peak."""
    monkeypatch.setattr(throughput, "build_trainer", lambda *a, **k: _fake_trainer(world=4))
    monkeypatch.setattr(throughput, "time_trainer_steps", lambda t, w, n: ([0.1, 0.2, 1.0], [1.0, 1.0, 1.0]))
    monkeypatch.setattr(throughput, "saved_for_backward_gib", lambda t: 0.0)
    monkeypatch.setattr(throughput, "environment", lambda d: {})
    row = throughput.run_train_case("unused.yaml", "eager", 8, warmup=0, iters=3, peak_tflops=100.0)
    assert row["median_s"] == 0.2
    assert row["img_per_s"] == pytest.approx(8 * 4 / 0.2)           # 160 img/s over all ranks
    assert row["tflops"] == pytest.approx(160 * 2e12 / 4 / 1e12)      # 80 TFLOP/s per GPU
    assert row["mfu"] == pytest.approx(0.8)


def test_cpu_step_times_are_consecutive_intervals_after_warmup(monkeypatch):
    """times_s[i] is step i's own interval, not the time since the first mark."""
    clock = iter([0.0, 1.0, 3.0, 6.0])
    calls = []
    monkeypatch.setattr(train_case, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    monkeypatch.setattr(train_case, "trainer_step",
                        lambda t: calls.append(1) or SimpleNamespace(applied=True, metrics={"loss": 0.5}))
    times, losses = train_case.time_trainer_steps(SimpleNamespace(device=torch.device("cpu")), 2, 3)
    assert len(calls) == 5 and times == [1.0, 2.0, 3.0] and losses == [0.5] * 3


def test_compare_ratio_is_b_over_a(monkeypatch):
    """B twice as fast as A: ratio_b_over_a == 2 (an inverted ratio gives 0.5)."""
    built = []

    def build(config, overrides, batch, tmp):
        t = _fake_trainer(world=1)
        t.side = "ab"[len(built)]
        built.append(t)
        return t
    monkeypatch.setattr(compare_mod, "build_trainer", build)
    monkeypatch.setattr(compare_mod, "time_trainer_steps",
                        lambda t, w, n: ([0.2 if t.side == "a" else 0.1] * n, [1.0] * n))
    monkeypatch.setattr(compare_mod, "environment", lambda d: {})
    monkeypatch.setattr(compare_mod.kernels, "set_backend", lambda b: None)
    res = compare_mod.compare("unused.yaml", "eager", "eager", 2, rounds=3, iters=2, warmup=1)
    assert res["ratio_b_over_a"] == pytest.approx(2.0) and res["round_ratios"] == pytest.approx([2.0] * 3)
    assert res["a"]["img_per_s"] == pytest.approx(10.0) and res["b"]["img_per_s"] == pytest.approx(20.0)


def test_fp8_agreement_reads_the_tail_mean_not_the_head_or_a_single_step():
    """Curves that differ early but agree over the last quarter agree (not the head's means, not the largest step's
    difference)."""
    bf16 = [5.0] * 6 + [1.0, 1.0]
    fp8 = [9.0] * 6 + [1.0, 1.0]
    r = fp8_compare.compare(bf16, fp8, rtol=0.01)
    assert r["tail_steps"] == 2 and r["bf16_tail_mean"] == 1.0 and r["tail_rel_diff"] == 0.0
    assert r["agree"] is True and r["max_step_rel_diff"] == pytest.approx(0.8)
    assert fp8_compare.compare(bf16, [1.0] * 6 + [1.2, 1.2], rtol=0.1)["agree"] is False


class _Evt:
    def __init__(self, key, us):
        self.key, self.self_cpu_time_total, self.device_time_total = key, us, us


def test_kernel_times_are_per_call(monkeypatch):
    """The profiler's totals over `calls` calls are divided by calls."""
    import torch.profiler as tp

    class Prof:
        def __init__(self, activities):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def key_averages(self):
            return [_Evt("aten::mm", 4000.0), _Evt("aten::add", 2000.0)]
    monkeypatch.setattr(tp, "profile", Prof)
    out = kernel_time.kernel_times(lambda: None, calls=4, cuda=False)
    assert out["total_kernel_ms_per_call"] == pytest.approx(1.5)


def test_ops_bench_rates_count_forward_and_backward_flops(monkeypatch):
    """fwd_bwd_TFLOPs = (fwd + bwd FLOPs) / fwd_bwd time; fwd_GBps in GB/s."""
    monkeypatch.setattr(ops_bench, "bench_ms", lambda fn, smoke: fn() or 2.0)
    cases = ops_bench.cases(True, "cpu", torch.float32)
    name = next(n for n, c in cases.items() if c.fwd_flops and c.bwd_flops and c.backward)
    res = ops_bench.run(smoke=True, dtype=torch.float32, names=[name], kernel_time=lambda fn: 1.0)
    row = res[name]["reference"]
    case = cases[name]
    assert row["fwd_bwd_TFLOPs"] == pytest.approx((case.fwd_flops + case.bwd_flops) / 2.0 / 1e9)
    assert row["fwd_GBps"] == pytest.approx(case.fwd_bytes / 2.0 / 1e6)


def test_ceilings_copy_counts_read_and_write(monkeypatch):
    """A copy of n bytes moves 2n (read + write)."""
    import bench.ops_bench
    monkeypatch.setattr(bench.ops_bench, "bench_ms", lambda fn, smoke: 1.0)
    out = ceilings_mod.ceilings(True)
    assert out["copy_GBps"] == pytest.approx(2 * (1 << 20) / 1.0 / 1e6)
    assert out["bf16_matmul_TFLOPs"] == pytest.approx(2 * 256 ** 3 / 1.0 / 1e9)


def test_scaling_img_s_counts_accumulated_micro_batches():
    """With gradient accumulation a step processes b x accum images per GPU."""
    params = scaling.param_inventory("XL/1")
    r = scaling.predict(params, 1, 2, scaling.LINKS["nvlink"], scaling.LINKS["ib400"], scaling.GPUS["h100"])
    assert r.grad_accum > 1
    assert r.img_per_s_per_gpu == pytest.approx(r.batch_per_gpu * r.grad_accum / r.step_ms * 1e3)
    assert r.img_per_s_per_gpu == pytest.approx(r.global_batch / r.gpus / r.step_ms * 1e3)


TINY = dict(input_size=4, in_channels=4, num_classes=3, model_kwargs=dict(hidden_size=32, depth=1, num_heads=2,
                                                                          patch_size=1))
VAE = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), resolution=8, z_channels=4, embed_dim=4)


def test_sample_speed_img_s_is_scaled_and_decode_is_added(tmp_path):
    """img/s over the time scaled to scale_to points; with decode the decode time is added."""
    from bench.sample_speed import measure_sampling
    res = measure_sampling("custom", ["fp32@2"], steps=3, scale_to=30, vae_config=VAE, log=None,
                           partial_json=tmp_path / "p.json", **TINY)
    r = res["results"][0]
    assert res["settings"]["time_scale"] > 1
    assert r["time_scaled_s"] == pytest.approx(r["time_s"] * res["settings"]["time_scale"])
    assert r["img_per_s"] == pytest.approx(2 / r["time_scaled_s"])
    assert r["img_per_s_with_decode"] == pytest.approx(2 / (r["time_scaled_s"] + r["decode_s"]))


def test_sample_gflop_per_img_follows_the_scaled_grid(tmp_path):
    """GFLOP/img counts the forwards of the scale_to grid, not the steps run."""
    from bench.sample_speed import measure_sampling

    def units(s):
        g, n = (int(x) for x in s["guided_steps_scaled"].split("/"))
        return n + g
    a = measure_sampling("custom", ["fp32@2"], steps=3, scale_to=20, decode=False, log=None,
                         partial_json=tmp_path / "a.json", **TINY)["settings"]
    b = measure_sampling("custom", ["fp32@2"], steps=3, scale_to=40, decode=False, log=None,
                         partial_json=tmp_path / "b.json", **TINY)["settings"]
    assert units(a) != units(b)
    assert a["gflop_per_img"] / b["gflop_per_img"] == pytest.approx(units(a) / units(b))


def test_vae_step_img_s_counts_every_timed_step(monkeypatch):
    """img/s = batch x steps / elapsed, ms/step = elapsed / steps (not batch / elapsed)."""
    from bench import vae_step
    clock = iter([10.0, 12.0])
    monkeypatch.setattr(vae_step, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    for name in ("use_switches", "sync", "reset_peak"):
        monkeypatch.setattr(vae_step, name, lambda *a: None)
    monkeypatch.setattr(vae_step, "images", lambda t, b: None)
    monkeypatch.setattr(vae_step, "peak_gib", lambda d: None)
    trainer = SimpleNamespace(device=torch.device("cpu"), step_on_device=lambda x: SimpleNamespace(applied=True))
    r = vae_step.time_steps(trainer, 8, 1, 4)
    assert r["img_per_s"] == pytest.approx(16.0) and r["step_ms"] == pytest.approx(500.0)


def test_gpu_suite_train_row_reports_what_its_own_process_ran(monkeypatch):
    """The suite's train row's kernels_ran is the case process's environment block (an empty one passed the suite's
    smoke: `set({}.values()) <= ...` holds)."""
    import bench.throughput
    from bench import gpu_suite
    ran = {"norm_modulate": "triton", "attention": "reference-sdpa"}
    monkeypatch.setattr(bench.throughput, "run_train_case_subprocess",
                        lambda *a, **k: {"img_per_s": 1.0, "times_s": [1.0], "environment": {"kernels_ran": ran}})
    row = gpu_suite.train_case(True, "eager", 2)
    assert row["kernels_ran"] == ran and "times_s" not in row


def test_train_case_resets_the_cuda_peak_before_timing(monkeypatch):
    """GPU path, faked on the CPU: the peak is reset after the trainer is built and before the timed steps, so a
    case's peak is its own steps' (not removed, not after the timing)."""
    events = []
    t = _fake_trainer(world=1)
    t.device = torch.device("cuda", 0)
    monkeypatch.setattr(throughput, "build_trainer", lambda *a, **k: events.append("build") or t)
    monkeypatch.setattr(throughput.torch.cuda, "reset_peak_memory_stats", lambda d: events.append("reset"))
    monkeypatch.setattr(throughput, "time_trainer_steps", lambda *a: events.append("time") or ([0.1], [1.0]))
    monkeypatch.setattr(throughput, "peak_memory", lambda d: events.append("peak") or {"peak_memory_gib": 1.0})
    monkeypatch.setattr(throughput, "saved_for_backward_gib", lambda t: 0.0)
    monkeypatch.setattr(throughput, "environment", lambda d: {})
    throughput.run_train_case("unused.yaml", "eager", 2, warmup=0, iters=1)
    assert events[:3] == ["build", "reset", "time"] and "peak" in events
