"""bench.shortfall: the accounting it reads a profiled step against (the model's FLOPs and parameters, the glue
floor's bytes) and the arithmetic of its table, on a made-up profile."""
import dataclasses

import pytest
import torch

from bench.shortfall import (ADAM_BYTES_PER_PARAM, EMA_BYTES_PER_PARAM, Ceilings, markdown, model_params, shortfall,
                             step_flops, step_shape)
from bench.glue_floor import XL1_B256, floor_table
from modeling.lightningdit import LightningDiT, LightningDiTConfig


@pytest.mark.parametrize("cfg", [
    LightningDiTConfig(input_size=4, patch_size=1, in_channels=4, hidden_size=48, depth=2, num_heads=2,
                       num_classes=3),
    LightningDiTConfig.from_size("XL/1", input_size=16, in_channels=32, num_classes=1000)])
def test_shape_flops_and_parameters_are_the_models(cfg):
    """step_shape of a LightningDiT config, and the FLOPs and trained parameters counted on it, equal the model's
    own accounting (flops_per_sample: training 3x forward) and its parameters (meta tensors: no memory)."""
    with torch.device("meta"):
        model = LightningDiT(cfg)
    s = step_shape(cfg, batch=3)
    flops = step_flops(s)
    assert flops["linear"] + flops["attention"] == pytest.approx(3 * model.flops_per_sample(train=True), rel=1e-12)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert model_params(s, cfg.num_classes) == trained
    if cfg.hidden_size == 1152:
        assert s == XL1_B256.__class__(**{**XL1_B256.__dict__, "B": 3})
        assert flops["linear"] / 3 == pytest.approx(685e9, rel=0.01)  # 685 GFLOP of Linears per image


def test_rows_are_measured_against_floors_and_sorted_by_excess():
    ceil = Ceilings(copy_gbps=4000.0, bf16_tflops=800.0, fp8_tflops=1300.0)
    prof = {"ms_per_step_by_category": {"matmul": 250.0, "inductor fusions": 70.0, "fused glue (ours)": 40.0,
                                        "other (eager elementwise, copies, reductions)": 20.0, "attention": 47.0,
                                        "optimizer": 9.0},
            "total_kernel_ms_per_step": 436.0}
    row = {"name": "XL/1 auto+compiled bs256 train", "batch_size": 256, "median_s": 0.4515, "fp8": "off",
           "profile": prof}
    res = shortfall(row, ceil, XL1_B256, target_img_s=750.0)
    by = {r["category"].split(" (")[0]: r for r in res["rows"]}
    flops = step_flops(XL1_B256)
    assert by["matmul"]["floor_ms"] == pytest.approx(flops["linear"] / 800e12 * 1e3)
    assert by["attention"]["floor_ms"] == pytest.approx(flops["attention"] / 800e12 * 1e3)
    glue_gb = floor_table(XL1_B256, 4000.0)[-1]["GB_per_step"]
    assert by["glue"]["measured_ms"] == 130.0 and by["glue"]["floor_ms"] == pytest.approx(glue_gb / 4.0)
    assert by["optimizer"]["floor_ms"] == pytest.approx(
        model_params(XL1_B256) * (ADAM_BYTES_PER_PARAM + EMA_BYTES_PER_PARAM) / 4e9)
    assert by["host"]["measured_ms"] == pytest.approx(15.5) and by["host"]["floor_ms"] == 0
    assert [r["excess_ms"] for r in res["rows"]] == sorted((r["excess_ms"] for r in res["rows"]), reverse=True)
    assert res["excess_ms"] == pytest.approx(res["step_ms"] - res["floor_ms"])  # every ms of the step is in a row
    assert res["target_step_ms"] == pytest.approx(1000 * 256 / 750) and res["needed_ms"] == pytest.approx(
        451.5 - 1000 * 256 / 750)
    text = markdown(res)
    assert "| **step** | 451.5 |" in text and "needs -" in text and res["rows"][0]["category"] in text.splitlines()[-1]

    fp8 = shortfall({**row, "fp8": "scaled_mm (ours: FP8TrainingLinear) ..."}, ceil, XL1_B256, 850.0)
    mm = next(r for r in fp8["rows"] if r["category"] == "matmul")
    assert mm["floor_ms"] == pytest.approx(flops["linear"] / 1300e12 * 1e3) and "FP8" in mm["floor"]
    half = shortfall({**row, "batch_size": 128}, ceil, XL1_B256)  # the row's batch sets the shape
    assert next(r for r in half["rows"] if r["category"] == "matmul")["floor_ms"] == pytest.approx(
        by["matmul"]["floor_ms"] / 2, rel=1e-3)
    assert "needed_ms" not in half


# ------------------------------------------------------------------ sampling: a profiled call against its floors

H200_SAMPLING = "bench/results/2026-12-04_h200_7b1da33_sampling.json"  # XL/1, the paper's settings, batch 128


def test_sampler_glue_is_the_forward_in_the_bf16_model():
    """Per token row and block, the sampler's glue floor: two norms (read x and y, write h and the GEMM input), q/k
    RoPE (v stays where the GEMM wrote it), the SwiGLU; in FP8 the GEMM inputs as e4m3 rows and a scale, and
    attention's output quantized for proj unless proj stays bf16. The first block's norm has no residual."""
    from bench.glue_floor import sampler_glue_ops
    s = dataclasses.replace(XL1_B256, B=64)
    C, F, M, N = s.C, s.F, s.M, s.N
    per_row = lambda ops, name: next(o for o in ops if o.name.startswith(name)).bytes() / M  # noqa: E731
    bf16, fp8, fp8_bf16_proj = sampler_glue_ops(s), sampler_glue_ops(s, True), sampler_glue_ops(s, True, False)
    vectors, weight, tables = 2 * C / N, 2 * C / M, 2 * N * s.D * 4 / M  # per row: a (B, C) bf16 vector, ...
    assert per_row(bf16, "gated residual (attn)") == pytest.approx(8 * C + 3 * vectors + weight)
    assert per_row(fp8, "gated residual (attn)") == pytest.approx(7 * C + 4 + 3 * vectors + weight)
    assert per_row(bf16, "norm1 + modulate (first") == pytest.approx(4 * C + 2 * vectors + weight)
    assert per_row(bf16, "q/k RoPE") == pytest.approx(8 * C + tables)
    assert per_row(bf16, "SwiGLU") == 6 * F and per_row(fp8, "SwiGLU") == 5 * F + 4
    assert per_row(fp8, "attention output") == 3 * C + 4
    assert not any(o.name.startswith("attention output") for o in bf16 + fp8_bf16_proj)
    per_block = sum(o.bytes() for o in bf16 if o.count in (s.depth, s.depth - 1)) / M  # a block after the first
    assert per_block == pytest.approx(24 * C + 6 * F, rel=2e-3)  # 46,080 B a token row at XL/1


def test_sampling_shortfall_of_the_h200_run():
    """The 2026-12-04 H200 sampling profile against its floors: 5,120 sample-forwards a 25-point call (16 guided
    steps run the batch twice), the glue floor of the bf16 model, FP8's matmul without a floor where no FP8 rate
    was measured (and with one where it was), the target's call time from the entry's own img/s."""
    import json

    from bench.shortfall import main, sampling_shortfall
    entries = json.loads(open(H200_SAMPLING).read())["results"]
    bf16, fp8 = entries[0], entries[1]
    c = Ceilings(4249.8, 791.2)
    r = sampling_shortfall(bf16, c, 5.5)
    assert r["sample_forwards"] == 5120 and r["call_ms"] == pytest.approx(1000 * bf16["time_s"])
    rows = {x["category"].split(" (")[0]: x for x in r["rows"]}
    assert rows["glue"]["floor_ms"] == pytest.approx(1702e9 / 4249.8e6, rel=2e-3)  # ~400 ms
    assert rows["glue"]["measured_ms"] == pytest.approx(376.5 + 254.0 + 3.5, abs=0.1)
    assert rows["matmul"]["floor_ms"] == pytest.approx(1171e12 / 791.2e12 * 1e3, rel=2e-3)
    assert [x["excess_ms"] for x in r["rows"]] == sorted((x["excess_ms"] for x in r["rows"]), reverse=True)
    assert r["target_call_ms"] == pytest.approx(r["call_ms"] * bf16["img_per_s"] / 5.5)
    f = sampling_shortfall(fp8, c, 7.0)
    rows = {x["category"].split(" (")[0]: x for x in f["rows"]}
    assert rows["matmul"]["floor_ms"] is None and rows["matmul"]["excess_ms"] is None
    assert f["rows"][-1]["category"] == "matmul" and "| matmul | 932.3 | - | - |" in markdown(f)
    assert rows["glue"]["floor_ms"] == pytest.approx(1632e9 / 4249.8e6, rel=2e-3)
    f = sampling_shortfall(fp8, Ceilings(4249.8, 791.2, 1500.0), 7.0)
    assert {x["category"]: x["floor_ms"] for x in f["rows"]}["matmul"] == pytest.approx(1171e12 / 1500e12 * 1e3,
                                                                                       rel=2e-3)
    text = main(["--sampling", H200_SAMPLING, "--copy-gbps", "4249.8", "--bf16-tflops", "791.2"])
    assert text.count("| **call** |") == 2 and "needs -" in text


def test_sampling_shortfall_cli_refuses_a_result_without_profiles(tmp_path):
    from bench.shortfall import main
    bad = tmp_path / "s.json"
    bad.write_text('{"results": [{"name": "x", "skipped": "budget"}]}')
    with pytest.raises(SystemExit, match="no profiled sampling entry"):
        main(["--sampling", str(bad), "--copy-gbps", "4000", "--bf16-tflops", "700"])
    with pytest.raises(SystemExit, match="s2.json"):
        main(["--sampling", str(tmp_path / "s2.json"), "--copy-gbps", "4000", "--bf16-tflops", "700"])


def test_a_profiled_sampling_run_on_a_gpu_reads_itself_against_its_ceilings(monkeypatch, capsys):
    """bench.throughput --mode sample --profile: on a GPU it measures the card's ceilings after its entries and
    tables each profiled entry against them (FP8 against 7 img/s, bf16 against 5.5); elsewhere nothing."""
    import json

    import bench.ceilings
    from bench.throughput import sampling_shortfall_report
    entries = json.loads(open(H200_SAMPLING).read())["results"]
    assert sampling_shortfall_report(entries, torch.device("cpu")) == {}
    ceil = {"copy_GBps": 4249.8, "bf16_matmul_TFLOPs": 791.2, "fp8_matmul_TFLOPs": 1400.0}
    monkeypatch.setattr(bench.ceilings, "ceilings", lambda smoke: ceil)
    rep = sampling_shortfall_report(entries, torch.device("cuda"))
    assert rep["ceilings"] == ceil and len(rep["shortfall"]) == 2  # the third entry was not started
    fp8 = rep["shortfall"]["XL/1 fp8+model+graphs@128 sample"]
    assert fp8["target_call_ms"] == pytest.approx(fp8["call_ms"] * entries[1]["img_per_s"] / 7.0)
    assert {r["category"]: r["floor_ms"] for r in fp8["rows"]}["matmul"] == pytest.approx(1171e12 / 1400e12 * 1e3,
                                                                                         rel=2e-3)
    assert capsys.readouterr().out.count("against the floors at this card's measured ceilings") == 2
