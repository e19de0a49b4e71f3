"""bench.throughput / bench.compare on a tiny model: the report says what ran, refusals are clear."""
import json

import pytest

import kernels
from bench.compare import main as compare_main
from bench.throughput import Case, benchmark, main as throughput_main, parse_spec

TINY = json.dumps(dict(input_size=4, patch_size=1, in_channels=4, hidden_size=32, depth=1, num_heads=2,
                       num_classes=3))


@pytest.fixture(autouse=True)
def _restore_backend():
    before = kernels.get_backend()
    yield
    kernels.set_backend(before)


def test_train_and_sample_report(tmp_path):
    report = throughput_main(["--model", TINY, "--batch-sizes", "2,3", "--precision", "fp32", "--warmup", "1",
                              "--iters", "2", "--device", "cpu", "--out", str(tmp_path / "t")])
    saved = json.loads((tmp_path / "t.json").read_text())
    assert saved["results"] == json.loads(json.dumps(report["results"]))
    assert [r["batch_size"] for r in saved["results"]] == [2, 3]
    for r in saved["results"]:
        assert r["kernels_backend"] == "reference" and r["kernels"]["ops"]  # ops that actually ran
        assert set(r["kernels"]["ops"].values()) <= {"reference", "reference-sdpa"}
        assert r["img_per_s"] > 0 and len(r["times_s"]) == 2 and r["mfu"] is None
    assert saved["environment"]["versions"]["torch"] and "commit" in saved["environment"]
    assert "| custom eager bs2 train |" in (tmp_path / "t.md").read_text()

    guided = Case(model=TINY, mode="sample", batch_size=2, sample_steps=4, cfg_scale=3.0, precision="fp32",
                  device="cpu")
    plain = Case(model=TINY, mode="sample", batch_size=2, sample_steps=4, precision="fp32", device="cpu")
    # 3 model calls per image, doubled by guidance
    assert guided.flops_per_image == 2 * plain.flops_per_image == 6 * plain.model.flops_per_sample(train=False)
    assert benchmark(guided, warmup=0, iters=1)["img_per_s"] > 0


def test_fused_on_cpu_refuses_instead_of_falling_back(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # test_kernels sets it for the session on CPU machines
    case = Case(model=TINY, backend="fused", batch_size=2, precision="fp32", device="cpu")
    assert case.kernels_backend in ("triton", "cuda")
    with pytest.raises(kernels.BackendUnavailable):
        benchmark(case, warmup=0, iters=1)
    with pytest.raises(ValueError, match="unknown backend"):
        parse_spec("eager+turbo")


def test_compare_interleaves_and_reports_ratio(tmp_path):
    report = compare_main(["--model", TINY, "--a", "eager", "--b", "eager", "--batch-size", "2", "--precision",
                           "fp32", "--rounds", "2", "--iters", "1", "--warmup", "0", "--device", "cpu",
                           "--out", str(tmp_path / "c")])
    assert report["order"] == ["a", "b", "a", "b"] and len(report["round_ratios"]) == 2
    assert report["ratio_b_over_a"] > 0
    assert len(report["results"]) == 2 and (tmp_path / "c.md").exists()


def test_fp8_case_records_what_ran():
    model = json.dumps(dict(input_size=4, patch_size=1, in_channels=4, hidden_size=48, depth=1, num_heads=2,
                            num_classes=3))
    with pytest.raises(Exception, match="FP8"):
        Case(model=model, backend="fp8", batch_size=2, device="cpu")  # no silent CPU emulation
    r = benchmark(Case(model=model, backend="fp8", batch_size=2, device="cpu", allow_cpu_fp8=True), 0, 1)
    assert "torchao" in r["fp8"] and "CPU emulation" in r["fp8"]
