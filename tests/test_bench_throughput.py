"""bench.throughput / bench.compare time the trainer's own step (as Trainer.fit runs it) on the tiny config; the
report says what ran, backend specs map to trainer config switches, refusals are clear."""
import json
from pathlib import Path

import pytest
import torch

import kernels
from bench import throughput
from bench.compare import main as compare_main
from bench.throughput import main as throughput_main
from bench.train_case import parse_spec
from evaluation.provenance import ENVIRONMENT_KEYS
from train import base
from train.train_dit import Trainer

REPO = Path(__file__).resolve().parents[1]
TINY_CFG = str(REPO / "configs/dit_tiny_cpu.yaml")
TINY = json.dumps(dict(input_size=4, patch_size=1, in_channels=4, hidden_size=32, depth=1, num_heads=2,
                       num_classes=3))


@pytest.fixture(autouse=True)
def _restore_backend():
    before = kernels.get_backend()
    yield
    kernels.set_backend(before)


@pytest.fixture
def count_train_steps(monkeypatch):
    """The batch size of every optimizer step the trainer ran (step_on_device: the step Trainer.fit runs)."""
    calls = []
    real = Trainer.step_on_device

    def counted(self, batch):
        calls.append(len(batch[0]))
        return real(self, batch)

    monkeypatch.setattr(Trainer, "step_on_device", counted)
    return calls


def test_spec_maps_to_trainer_switches():
    assert parse_spec("reference+compiled+zero0") == ["train.kernels=reference", "train.compile=blocks",
                                                      "train.zero_stage=0"]
    assert parse_spec("auto+compiled+fp8") == ["train.kernels=auto", "train.compile=blocks", "fp8.backend=torchao"]
    assert parse_spec("fused")[0] in ("train.kernels=triton", "train.kernels=cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        parse_spec("eager+turbo")


@pytest.mark.extended  # CI: test_kernels_gpu_suite's train cases
def test_train_mode_times_the_trainers_step(tmp_path, count_train_steps):
    report = throughput_main(["--config", TINY_CFG, "--batch-sizes", "2,3", "--backends", "eager+zero0",
                              "--warmup", "1", "--iters", "2", "--in-process", "--out", str(tmp_path / "t")])
    # warmup + iters + one step whose saved tensors are counted, through the trainer's own step
    assert count_train_steps == [2, 2, 2, 2, 3, 3, 3, 3]
    saved = json.loads((tmp_path / "t.json").read_text())
    assert saved["results"] == json.loads(json.dumps(report["results"], default=str))
    assert [r["batch_size"] for r in saved["results"]] == [2, 3]
    for r in saved["results"]:
        assert r["zero_stage"] == 0 and r["compile"] == "none" and r["precision"] == "fp32"  # tiny config's
        assert tuple(r["environment"]) == ENVIRONMENT_KEYS  # each case's own block (its own process)
        assert set(r["environment"]["kernels_ran"].values()) <= {"reference", "reference-sdpa"}  # what ran
        assert r["img_per_s"] > 0 and len(r["times_s"]) == 2 and r["mfu"] is None
        assert len(r["losses"]) == 2 and all(l == l for l in r["losses"])
        assert r["peak_rss_gib"] > 0 and 0 < r["saved_for_backward_gib"] < r["peak_rss_gib"]
    assert tuple(saved["environment"]) == ENVIRONMENT_KEYS and saved["environment"]["card"].startswith("cpu")
    assert saved["environment"]["versions"]["deepspeed"]
    assert "| custom eager+zero0 bs2 train |" in (tmp_path / "t.md").read_text()
    assert (tmp_path / "t.png").stat().st_size > 0  # the plot beside the JSON


def test_steps_are_timed_back_to_back_and_their_losses_read_after_the_last(monkeypatch):
    """bench.train_case.time_trainer_steps reads nothing from a step before the next has started (fit does not: a
    read of a device tensor is a host synchronisation), and refuses a timed step that was skipped."""
    from bench import train_case
    events = []

    class Loss:
        def __init__(self, i):
            self.i = i

        def __float__(self):
            events.append(("read", self.i))
            return 1.0

    def step(trainer):
        events.append(("step", len([e for e in events if e[0] == "step"])))
        i = events[-1][1]
        return base.StepOutput(i != 99, {"loss": Loss(i)})

    monkeypatch.setattr(train_case, "trainer_step", step)
    trainer = type("T", (), {"device": torch.device("cpu")})()
    times, losses = train_case.time_trainer_steps(trainer, 2, 3)
    assert events == [("step", 0), ("step", 1), ("step", 2), ("step", 3), ("step", 4),
                      ("read", 2), ("read", 3), ("read", 4)]
    assert len(times) == 3 and losses == [1.0, 1.0, 1.0]
    monkeypatch.setattr(train_case, "trainer_step", lambda trainer: base.StepOutput(False, {"loss": Loss(0)}))
    with pytest.raises(FloatingPointError, match="timed step 0 was skipped"):
        train_case.time_trainer_steps(trainer, 0, 1)


def test_subprocess_case_and_its_errors(tmp_path, monkeypatch):
    """The default: each case in a fresh process; a case that cannot run is an error row, not a number."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    report = throughput_main(["--config", TINY_CFG, "--batch-sizes", "2", "--backends", "eager,triton",
                              "--set", "train.zero_stage=0", "--warmup", "0", "--iters", "1",
                              "--out", str(tmp_path / "s")])
    ok, refused = report["results"]
    assert ok["img_per_s"] > 0 and ok["overrides"][-1] == "train.zero_stage=0"
    assert "error" in refused and "triton" in refused["error"].lower() and "img_per_s" not in refused
    assert "error:" in (tmp_path / "s.md").read_text()


def test_fp8_case_records_what_ran(tmp_path):
    row = throughput.run_train_case(TINY_CFG, "eager+fp8", 2, ["model.hidden_size=48", "train.zero_stage=0",
                                                             "train.precision=bf16", "fp8.allow_cpu=true"],
                                    warmup=0, iters=1)
    assert "torchao" in row["fp8"] and "CPU emulation" in row["fp8"] and row["precision"] == "bf16"
    with pytest.raises(Exception, match="FP8"):  # no silent CPU emulation
        throughput.run_train_case(TINY_CFG, "eager+fp8", 2, ["model.hidden_size=48"], warmup=0, iters=1)


def test_each_train_case_counts_what_its_step_saves_for_the_backward():
    """The trainer cases record the GiB one step saves for its backward (bench.train_case.saved_for_backward_gib):
    the activation part of their peak, through the trainer. FP8 (our scaled_mm linears, emulated here) keeps e4m3
    operands where bf16 keeps bf16 activations: less, and more than nothing."""
    sizes = ["model.hidden_size=96", "model.num_heads=2", "train.zero_stage=0", "train.precision=bf16"]  # 96: w12 512
    bf16 = throughput.run_train_case(TINY_CFG, "eager", 4, sizes, warmup=0, iters=1)
    # tensorwise: the CPU _scaled_mm of torch 2.11 (the lent machine's, `make test-lent`) takes per-tensor scales only
    fp8 = throughput.run_train_case(TINY_CFG, "eager+fp8mm+tensorwise", 4, [*sizes, "fp8.allow_cpu=true"], warmup=0,
                                    iters=1)
    assert "scaled_mm" in fp8["fp8"] and bf16["fp8"] == "off"
    assert 0 < fp8["saved_for_backward_gib"] < bf16["saved_for_backward_gib"] < bf16["peak_rss_gib"]


def test_sample_mode_runs_generates_sampler(tmp_path, monkeypatch):
    """Sample mode goes through bench.sample_speed, i.e. modeling.sampling.Sampler (what generate runs)."""
    import modeling.sampling as sampling
    calls = []
    real = sampling.Sampler.__call__

    def counted(self, z, y, *a, **k):
        calls.append(len(z))
        return real(self, z, y, *a, **k)

    monkeypatch.setattr(sampling.Sampler, "__call__", counted)
    report = throughput_main(["--mode", "sample", "--model", TINY, "--batch-sizes", "2", "--backends",
                              "fp32,bf16", "--sample-steps", "3", "--scale-to", "6", "--no-decode", "--device", "cpu",
                              "--out", str(tmp_path / "s")])
    fp32, bf16 = report["results"]
    assert fp32["img_per_s"] > 0 and fp32["ran"]["precision"] == "fp32" and bf16["ran"]["precision"] == "bf16"
    assert fp32["settings"]["cfg_scale"] == 6.7 and fp32["settings"]["guidance"] == "reference"
    assert calls and set(calls) == {2}
    assert "| custom fp32@2 sample |" in (tmp_path / "s.md").read_text()
    # --plan: the suite's mixed entries, in order; the per-entry partial file is gone once the report is written
    report = throughput_main(["--mode", "sample", "--model", TINY, "--plan", "bf16-weights@3,fp32@2", "--sample-steps",
                              "3", "--no-decode", "--device", "cpu", "--out", str(tmp_path / "p")])
    assert [(r["backend"], r["batch_size"]) for r in report["results"]] == [("bf16-weights@3", 3), ("fp32@2", 2)]
    assert (tmp_path / "p.json").exists() and not (tmp_path / "p.partial.json").exists()


def test_compare_interleaves_trainers_and_reports_ratio(tmp_path, count_train_steps):
    report = compare_main(["--config", TINY_CFG, "--a", "eager+zero0", "--b", "reference+zero0", "--batch-size", "2",
                           "--rounds", "2", "--iters", "1", "--warmup", "0", "--out", str(tmp_path / "c")])
    assert report["order"] == ["a", "b", "a", "b"] and len(report["round_ratios"]) == 2
    assert len(count_train_steps) == 4 and report["ratio_b_over_a"] > 0
    assert len(report["results"]) == 2 and (tmp_path / "c.md").exists()
    assert tuple(report["environment"]) == ENVIRONMENT_KEYS
    assert all(tuple(r["environment"]) == ENVIRONMENT_KEYS for r in report["results"])


def test_sample_plan_tokens_come_from_sampling_config(monkeypatch):
    """Plan tokens map to SamplingConfig fields through one table derived from SamplingConfig: every token sets a
    value SamplingConfig accepts, a field added to SamplingConfig is a token with no edit in bench/, and an entry
    SamplingConfig would refuse is refused while parsing, naming the entry and the part."""
    import dataclasses
    import typing
    from typing import Literal

    from bench import sample_speed
    from bench.sample_speed import PLAN_TOKENS, PlanEntry, parse_spec
    from modeling.sampling import SETTING_KEYS, SamplingConfig
    how = [f.name for f in dataclasses.fields(SamplingConfig) if f.name not in SETTING_KEYS]
    hints = typing.get_type_hints(SamplingConfig)
    for token, (field, value) in PLAN_TOKENS.items():  # a value of the field's declared type
        assert field in how, token
        assert value in typing.get_args(hints[field]) if hints[field] is not bool else value is True, token
    assert {f for f, _ in PLAN_TOKENS.values()} == set(how)  # every how-field is reachable by a token
    assert parse_spec("bf16-weights+model+graphs@128") == PlanEntry(
        dict(precision="bf16-weights", compile="model", cudagraphs="on"), 128, None)
    assert parse_spec("fp8+refops+fp8_recipe=tensorwise+torchao@4") == (
        dict(precision="fp8", fp8_recipe="tensorwise", fp8_impl="torchao"), 4, "reference")
    assert parse_spec("bf16-weights+fusedops+model@8") == (dict(precision="bf16-weights", compile="model"), 8, "triton")
    assert parse_spec("bf16-weights+fusedmlp+compile=blocks@4").sampling == dict(
        precision="bf16-weights", fused_mlp=True, compile="blocks")
    cfg = parse_spec("bf16+blocks@2").config(SamplingConfig(steps=7, cfg_scale=2.0))
    assert (cfg.steps, cfg.cfg_scale, cfg.precision, cfg.compile) == (7, 2.0, "bf16", "blocks")
    for bad, message in (("blocks@2", "starts with a precision"), ("fp32+warp@2", "unknown part 'warp'"),
                         ("bf16+tensorwise@2", "fp8_recipe applies to precision fp8 only"),
                         ("fp32+blocks+model@2", "'model' sets compile a second time"),
                         ("fp32+steps=9@2", "'steps' is not a SamplingConfig field"),
                         ("fp32+compile=all@2", "compile must be one of"), ("fp32+graphs", "needs @BATCH"),
                         ("fp8+fusedmlp@2", "fused_mlp runs with precision")):  # SamplingConfig's own rule
        with pytest.raises(ValueError, match=message):
            parse_spec(bad)

    @dataclasses.dataclass
    class Extended(SamplingConfig):  # a field added to SamplingConfig later
        attention: Literal["sdpa", "flash"] = "sdpa"
        tiled_decode: bool = False

    monkeypatch.setattr(sample_speed, "SamplingConfig", Extended)
    tokens = sample_speed._plan_tokens()
    assert tokens["flash"] == ("attention", "flash") and tokens["tileddecode"] == ("tiled_decode", True)


def test_profile_categories_name_our_kernels():
    """Every Triton kernel of ours lands in the profile's "fused glue (ours)" row by its own name (a renamed kernel
    would otherwise be counted as inductor's or as other), inductor's in theirs, FP8 GEMMs under matmul."""
    import inspect

    import triton

    import kernels
    from bench.kernel_time import categorize
    ours = [obj.fn.__name__ for mod in (kernels.fused_norm, kernels.gated_residual, kernels.swiglu, kernels.rope,
                                        kernels.qkv_rope, kernels.fp8_quant, kernels.linear_swiglu,
                                        kernels.rope_attention, kernels.group_norm)
            for obj in vars(mod).values()  # jitted or interpreted kernels (their autotuners wrap the same ones)
            if isinstance(obj, triton.runtime.jit.KernelInterface) and inspect.isfunction(getattr(obj, "fn", None))
            and obj.fn.__name__.endswith("_kernel")]  # not the @triton.jit helpers they call
    assert {"_quant_rows_kernel", "_swiglu_quant_kernel", "_qkv_rope_fwd_kernel", "_norm_bwd_kernel"} <= set(ours)
    gemm = "_linear_swiglu_gemm_kernel"  # the w12 GEMM with SwiGLU in its epilogue: GEMM time
    attn = {"_rope_attn_fwd_kernel", "_rope_attn_bwd_kernel"}  # the fused RoPE attention: attention time
    assert attn <= set(ours)
    assert {n: categorize(n) for n in ours} == {
        n: "matmul" if n == gemm else "attention" if n in attn else "fused glue (ours)" for n in ours}
    assert categorize("triton_red_fused__scaled_mm__to_copy_abs_amax_clamp_div_0") == "inductor fusions"
    assert categorize("triton_poi_fused__scaled_dot_product_cudnn_attention_transpose_1") == "inductor fusions"
    assert categorize("triton_tem_fused_mm_0") == "matmul"  # max-autotune's GEMM templates
    assert categorize("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopB_NNT") == "matmul"


def test_idle_gaps_give_each_wait_to_the_phase_the_host_was_in():
    """idle_gaps on a made-up timeline: a stretch with no device activity (copies and kernels of two streams
    merged; overlapping activity is no gap) goes to the innermost host phase holding its end (the launch that ended
    it), per call; stretches under min_us are the launch pipeline's spacing and are not counted."""
    from bench.kernel_time import idle_gaps
    acts = [(0, 100, "gemm"), (50, 180, "copy"),  # overlapping: busy until 180
            (181, 200, "norm"),                   # 1 us after: under min_us, not a gap
            (300, 400, "gemm2"),                  # 100 us idle, ended in "forward"
            (1400, 1500, "adam"),                 # 1000 us idle, ended in "optimizer" inside "step"
            (1520, 1530, "ema")]                  # 20 us idle, ended between phases
    phases = [(0, 1000, "forward"), (1000, 1510, "step"), (1200, 1450, "optimizer")]
    out = idle_gaps(acts, phases, calls=2, min_us=2.0, top=2)
    assert out["idle_ms_per_call_by_phase"] == pytest.approx({"optimizer": 0.5, "forward": 0.05,
                                                              "between phases": 0.01})
    assert out["idle_ms_per_call"] == pytest.approx(0.56)
    assert out["idle_stretches_per_call_by_phase"] == {"optimizer": 0.5, "forward": 0.5, "between phases": 0.5}
    assert out["gpu_span_ms_per_call"] == pytest.approx(0.765)
    assert [(g["ms"], g["phase"], g["after"], g["before"]) for g in out["longest"]] == [
        (pytest.approx(1.0), "optimizer", "gemm2", "adam"), (pytest.approx(0.1), "forward", "norm", "gemm2")]
    assert idle_gaps([], phases)["idle_ms_per_call"] == 0


def test_timeline_keeps_device_work_not_the_annotation_spans_over_it():
    """On a GPU kineto draws each record_function range on the device timeline too (gpu_user_annotation, first kernel
    to last): the phase ranges' spans must not count as device work, or they would cover the idle stretches."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from bench.kernel_time import PHASE, idle_gaps, timeline

    def ev(name, start, end, device, kind):
        return SimpleNamespace(name=lambda: name, start_ns=lambda: start * 1000, end_ns=lambda: end * 1000,
                               device_type=lambda: device, activity_type=lambda: kind,
                               is_user_annotation=lambda: kind.endswith("user_annotation"))
    cuda, cpu = DeviceType.CUDA, DeviceType.CPU
    events = [ev(PHASE + "optimizer", 0, 500, cpu, "user_annotation"),
              ev(PHASE + "optimizer", 10, 490, cuda, "gpu_user_annotation"),
              ev("multi_tensor_apply_kernel", 10, 100, cuda, "kernel"), ev("Memcpy DtoD", 300, 490, cuda, "gpu_memcpy"),
              ev("cudaLaunchKernel", 5, 8, cpu, "cuda_runtime")]
    prof = SimpleNamespace(profiler=SimpleNamespace(kineto_results=SimpleNamespace(events=lambda: events)))
    device, phases = timeline(prof)
    assert [d[2] for d in device] == ["multi_tensor_apply_kernel", "Memcpy DtoD"]
    assert phases == [(0, 500, "optimizer")]
    assert idle_gaps(device, phases)["idle_ms_per_call_by_phase"] == {"optimizer": pytest.approx(0.2)}


def test_profile_marks_the_trainers_phases(tmp_path):
    """profile_trainer's phase_ranges: inside it the trainer's nvtx ranges are profiler ranges (data, forward,
    backward, optimizer; the profile's timeline reads them, the CPU has no device rows), restored after."""
    from torch.profiler import ProfilerActivity, profile

    import train.base
    import train.train_dit
    from bench.kernel_time import phase_ranges, timeline
    from bench.train_case import build_trainer, trainer_step
    from train.logging_utils import nvtx
    trainer = build_trainer(TINY_CFG, ["train.zero_stage=0"], 2, tmp_path)
    with phase_ranges(train.base, train.train_dit):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            trainer_step(trainer)
            trainer_step(trainer)
    device, phases = timeline(prof)
    assert device == []
    assert {"forward", "backward", "optimizer", "data"} <= {name for _, _, name in phases}
    assert all(b >= a for a, b, _ in phases)
    assert train.train_dit.nvtx is nvtx and train.base.nvtx is nvtx


def test_device_peak_names_the_h100_part(monkeypatch):
    """MFU's denominator: an SXM H100 or H200 is 989 dense bf16 TFLOP/s, a PCIe H100 756, an NVL 835; an unknown
    card gets no peak and says so."""
    import torch
    from bench.throughput import device_peak_tflops
    for name, peak in (("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H200", 989.0), ("NVIDIA H100 PCIe", 756.0),
                       ("NVIDIA H100 NVL", 835.0), ("NVIDIA L4", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None, n=name: n)
        got, why = device_peak_tflops(torch.device("cuda"))
        assert got == peak, (name, why)
        assert (why.startswith("no peak known for NVIDIA L4") if peak is None else f"{peak:g} TFLOP/s" in why)


def test_train_mode_refuses_model_and_sample_mode_a_missing_gpu(capsys):
    """`--model XL/9` in train mode was ignored and the config's XL/1 benchmarked (the README's command said
    --model); --device cuda without CUDA was torch's AssertionError (a review, 2026-12-05)."""
    import torch

    from bench.throughput import main
    with pytest.raises(SystemExit) as e:
        main(["--model", "XL/9", "--out", "/nonexistent/x"])
    assert e.value.code == 2 and "train mode benchmarks the trainer's model, from --config" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as e:
            main(["--mode", "sample", "--device", "cuda", "--out", "/nonexistent/x"])
        assert e.value.code == 2 and "--device cuda: no CUDA device here" in capsys.readouterr().err


def test_bench_commands_refuse_bad_specs_and_configs_up_front_and_fail_when_nothing_ran(tmp_path, capsys,
                                                                                        monkeypatch):
    """bench.compare printed tracebacks for a misspelt spec or a missing config; bench.throughput exited 0 when
    every case failed (a review of the documented commands, 2026-12-05)."""
    from bench.compare import main as compare_main
    for main in (compare_main, throughput_main):
        for args, says in ((["--b" if main is compare_main else "--backends", "eagre"], "unknown backend part"),
                           (["--config", str(tmp_path / "nothere.yaml")], "config file not found")):
            with pytest.raises(SystemExit) as e:
                main([*args, "--out", str(tmp_path / "x")])
            err = capsys.readouterr().err
            assert e.value.code == 2 and says in err and err.count("\n") == 1, err
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # triton cannot run on the CPU: the only case fails
    with pytest.raises(SystemExit) as e:
        throughput_main(["--config", TINY_CFG, "--batch-sizes", "2", "--backends", "triton", "--warmup", "0",
                         "--iters", "1", "--out", str(tmp_path / "s")])
    assert e.value.code == 1 and "none of the 1 cases ran" in capsys.readouterr().err
    assert "error:" in (tmp_path / "s.md").read_text()  # the report is still written
