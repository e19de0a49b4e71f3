"""bench.shortfall: the accounting it reads a profiled step against (the model's FLOPs and parameters, the glue
floor's bytes) and the arithmetic of its table, on a made-up profile."""
import pytest
import torch

from bench.shortfall import (ADAM_BYTES_PER_PARAM, EMA_BYTES_PER_PARAM, Ceilings, markdown, model_params, shortfall,
                             step_flops, step_shape)
from kernels.glue_floor import XL1_B256, floor_table
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
