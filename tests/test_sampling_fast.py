"""The fast sampling path (modeling.sampling.Sampler) that generate, the training-time eval and the speed
benchmark share: exact in fp32, close in bf16 (the accuracy guard), compile on the CPU, honest refusals."""
import json

import numpy as np
import pytest
import torch

from modeling import LightningDiT, sample
from modeling.sampling import Sampler, SamplerUnavailable, SamplingConfig, SamplingConfigError

TINY = dict(input_size=4, patch_size=1, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=3)


def _tiny(seed=0):
    torch.manual_seed(seed)
    m = LightningDiT(**TINY)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


def _fp8_tiny(seed=0):
    """Every block matmul a multiple of 16 (hidden 96: qkv 288, w12 512, w3 256 -> 96)."""
    torch.manual_seed(seed)
    m = LightningDiT(**dict(TINY, hidden_size=96))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


def test_fp32_eager_is_sample_bit_for_bit(parity_dir):
    dit = LightningDiT.from_pretrained(parity_dir / "lightningdit_a.pt")
    io = torch.load(parity_dir / "lightningdit_a_io.pt", weights_only=True)
    z, y = io["sample_z"], io["sample_y"]
    for guidance in ("reference", "all"):
        kw = dict(steps=8, shift=0.3, cfg_scale=3.0, cfg_interval_start=0.11, guidance=guidance)
        assert torch.equal(Sampler(dit, SamplingConfig(**kw))(z, y), sample(dit, z, y, **kw))
    ref = SamplingConfig(steps=8, shift=0.3, cfg_scale=3.0, cfg_interval_start=0.11, guidance="reference")
    torch.testing.assert_close(Sampler(dit, ref)(z, y), io["sample_out"], rtol=1e-4, atol=1e-5)
    for method in ("heun", "dopri5"):  # every integrator runs through the same Sampler (the registry)
        kw = dict(steps=5, method=method, cfg_scale=2.0, cfg_interval_start=0.2)
        assert torch.equal(Sampler(dit, SamplingConfig(**kw))(z, y), sample(dit, z, y, **kw))
    em = dict(steps=5, method="euler_maruyama", cfg_scale=2.0)
    a = Sampler(dit, SamplingConfig(**em))(z, y, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, sample(dit, z, y, generator=torch.Generator().manual_seed(1), **em))


def test_precision_guard_on_the_fixtures(parity_dir):
    """The guard's first half: fp32 reproduces the reference samples; bf16 stays within 1% per sample."""
    from bench.precision_guard import fixture_rows
    rows = fixture_rows(parity_dir)
    assert [r["fixture"] for r in rows] == ["lightningdit_a", "lightningdit_b"]
    for r in rows:
        assert r["fp32_matches_reference"], r
        for p in ("bf16", "bf16-weights"):
            assert 1e-5 < r[f"{p}_rel_err"]["max"] < 1e-2, (p, r)  # really ran in bf16, and stayed close


def test_precision_guard_on_a_trained_model():
    """The guard's second half, small: a model trained here; the Frechet distance between bf16 and fp32 samples
    (same noise) is a small fraction of the distance between two fp32 sample sets with different seeds."""
    from bench.precision_guard import trained_model_rows
    res = trained_model_rows(num_samples=128, steps=8, train_steps=80, train_batch=64, precisions=("bf16",))
    floor, b = res["fd_fp32_seedA_vs_fp32_seedB"], res["bf16"]
    assert floor > 0 and b["fd_vs_fp32_same_seed"] > 0
    assert b["fd_ratio_to_seed_floor"] < 0.1, res
    assert b["rel_err_median"] < 0.03, res


def test_precision_guard_fp8():
    """FP8 (torchao's emulation on the CPU): further from fp32 than bf16 (it really ran in FP8), still well inside
    the seed-to-seed distance; a fixture whose matmuls FP8 cannot take says so instead of a number."""
    from bench.precision_guard import fixture_rows, trained_model_rows
    res = trained_model_rows(num_samples=128, steps=8, train_steps=80, train_batch=64,
                             precisions=("bf16-weights", "fp8"))
    b, f = res["bf16-weights"], res["fp8"]
    assert b["rel_err_median"] < f["rel_err_median"] < 0.1, res
    assert f["fd_ratio_to_seed_floor"] < 0.5, res


def test_fp8_with_the_attention_projection_in_bf16():
    """fp8_proj_bf16: every block's attn.proj stays the bf16 Linear, the other three matmuls FP8; the samples lie
    between bf16-weights' and full FP8's distance from fp32 (CPU emulation); only under precision fp8 with our
    FP8Linear; the plan token the GPU suite's entry uses."""
    from bench.sample_speed import PLAN_TOKENS
    from modeling.fp8 import FP8Linear
    m = _fp8_tiny()
    z, y = torch.randn(3, 4, 4, 4), torch.tensor([0, 1, 2])
    c = SamplingConfig(steps=5, cfg_scale=2.0, cfg_interval_start=0.2)
    s = Sampler(m, c.replace(precision="fp8", fp8_proj_bf16=True), fp8_emulation=True)
    for block in s.model.blocks:
        assert type(block.attn.proj) is torch.nn.Linear and block.attn.proj.weight.dtype == torch.bfloat16
        assert all(isinstance(lin, FP8Linear) for lin in (block.attn.qkv, block.mlp.w12, block.mlp.w3))
    assert s.describe()["fp8"].endswith("attn.proj in bf16")
    fp32, fp8 = Sampler(m, c)(z, y), Sampler(m, c.replace(precision="fp8"), fp8_emulation=True)(z, y)
    bf16w = Sampler(m, c.replace(precision="bf16-weights"))(z, y)
    rel = lambda a: float((a - fp32).norm() / fp32.norm())  # noqa: E731
    mixed = s(z, y)
    assert rel(bf16w) < rel(mixed) < 0.1 and not torch.equal(mixed, fp8)
    with pytest.raises(SamplingConfigError, match="fp8_proj_bf16"):
        c.replace(precision="bf16-weights", fp8_proj_bf16=True)
    with pytest.raises(SamplerUnavailable, match="fp8_proj_bf16 needs fp8_impl scaled_mm"):
        Sampler(m, c.replace(precision="fp8", fp8_impl="torchao", fp8_proj_bf16=True), fp8_emulation=True)
    assert PLAN_TOKENS["fp8projbf16"] == ("fp8_proj_bf16", True)


def test_fp8_sampler_cpu_emulation_and_refusals():
    from torchao.float8.float8_linear import Float8Linear

    from modeling.fp8 import FP8Linear
    m = _fp8_tiny()
    z, y = torch.randn(3, 4, 4, 4), torch.tensor([0, 1, 2])
    c = SamplingConfig(steps=5, cfg_scale=2.0, cfg_interval_start=0.2)
    for impl in ("scaled_mm", "torchao"):
        with pytest.raises(SamplerUnavailable, match="FP8-capable CUDA GPU.*--precision bf16-weights"):
            Sampler(m, c.replace(precision="fp8", fp8_impl=impl))
    s = Sampler(m, c.replace(precision="fp8"), fp8_emulation=True)
    assert s.describe()["precision"] == "fp8" and "rowwise" in s.describe()["fp8"]
    assert "_scaled_mm" in s.describe()["fp8"]
    assert isinstance(s.model.blocks[0].mlp.w12, FP8Linear) and isinstance(s.model.blocks[-1].attn.qkv, FP8Linear)
    assert not isinstance(s.model.blocks[0].adaLN_modulation[-1], FP8Linear)  # adaLN stays bf16
    assert not any(isinstance(mod, FP8Linear) for mod in m.modules())  # the caller's model is untouched
    fp32, bf16w, fp8 = Sampler(m, c)(z, y), Sampler(m, c.replace(precision="bf16-weights"))(z, y), s(z, y)
    rel = lambda a: float((a - fp32).norm() / fp32.norm())  # noqa: E731
    assert 0 < rel(bf16w) < rel(fp8) < 0.1  # FP8 really ran, and stayed close
    tw = Sampler(m, c.replace(precision="fp8", fp8_recipe="tensorwise"), fp8_emulation=True)
    assert "tensorwise" in tw.describe()["fp8"] and not torch.equal(tw(z, y), fp8)
    ao = Sampler(m, c.replace(precision="fp8", fp8_impl="torchao"), fp8_emulation=True)
    assert isinstance(ao.model.blocks[0].mlp.w12, Float8Linear) and "torchao" in ao.describe()["fp8"]
    assert 0 < rel(ao(z, y)) < 0.1
    with pytest.raises(SamplingConfigError, match="fp8_impl"):
        Sampler(m, SamplingConfig(precision="fp8", fp8_impl="te", steps=5), fp8_emulation=True)
    with pytest.raises(SamplerUnavailable, match="divisible by 16"):
        Sampler(_tiny(), c.replace(precision="fp8"), fp8_emulation=True)
    # contradictory options are config mistakes, refused when the config is validated (naming the field)
    for name in ("autotune", "multi_kernel"):
        with pytest.raises(SamplingConfigError, match=f"{name} is a torch.compile setting") as e:
            c.replace(**{name: True})
        assert e.value.field == name
    for precision in ("bf16", "fp8"):  # the fused kernel reads the weights: no autocast, no FP8
        with pytest.raises(SamplingConfigError, match="fused_mlp runs with precision bf16-weights or fp32"):
            Sampler(m, SamplingConfig(precision=precision, fused_mlp=True), fp8_emulation=True)
    with pytest.raises(SamplingConfigError, match="fp8_recipe"):
        Sampler(m, SamplingConfig(precision="fp8", fp8_recipe="delayed"), fp8_emulation=True)


def test_compiled_blocks_static_batch_and_padding(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    m = _tiny()
    z, y = torch.randn(4, 4, 4, 4), torch.tensor([0, 1, 2, 0])
    c = SamplingConfig(steps=4, cfg_scale=2.5, cfg_interval_start=0.0)  # every step guided: one shape to compile
    eager = Sampler(m, c)(z, y)
    s = Sampler(m, c.replace(compile="blocks"))
    torch.testing.assert_close(s(z, y), eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s(z[:3], y[:3]), eager[:3], rtol=1e-5, atol=1e-6)  # padded to the static batch
    d = s.describe()
    assert d["compile"] == "blocks" and d["static_batch"] == 4 and d["cudagraphs"] == "off"
    assert not hasattr(m.blocks[0], "_compiled_call_impl") or m.blocks[0]._compiled_call_impl is None
    with pytest.raises(ValueError, match="larger than this sampler's static batch"):
        s(torch.randn(5, 4, 4, 4), torch.zeros(5, dtype=torch.long))


def test_requests_that_cannot_run_are_errors():
    m = _tiny()
    with pytest.raises(SamplerUnavailable, match="CUDA graphs were requested but the sampler runs on cpu"):
        Sampler(m, SamplingConfig(cudagraphs="on"))
    assert Sampler(m, SamplingConfig(cudagraphs="auto")).describe()["cudagraphs"] == "off"
    with pytest.raises(SamplingConfigError, match="implemented for the Euler sampler, not method 'heun'"):
        Sampler(m, SamplingConfig(method="heun", compile="blocks"))
    with pytest.raises(SamplingConfigError, match="CUDA graphs are implemented for the Euler sampler"):
        SamplingConfig(method="dopri5", cudagraphs="on").validate()
    with pytest.raises(SamplingConfigError, match="precision"):
        Sampler(m, SamplingConfig(precision="fp16"))
    with pytest.raises(SamplingConfigError, match="steps must be at least 2"):
        Sampler(m, SamplingConfig(steps=1))
    with pytest.raises(TypeError, match="SamplingConfig"):  # the old keyword form is gone, not silently half-read
        Sampler(m, dict(steps=4))


def test_speed_benchmark_runs_the_same_path_and_writes_json(tmp_path):
    from bench.sample_speed import PlanEntry, forward_units, measure_sampling, parse_spec
    # a plan entry is SamplingConfig fields (how a sample is computed), its batch, and the kernels backend
    assert parse_spec("bf16-weights+blocks+graphs@256") == PlanEntry(
        dict(precision="bf16-weights", compile="blocks", cudagraphs="on"), 256)
    assert parse_spec("fp8+tensorwise+model+autotune+graphs@128") == PlanEntry(
        dict(precision="fp8", compile="model", cudagraphs="on", autotune=True, fp8_recipe="tensorwise"), 128)
    assert parse_spec("fp8+torchao+model+graphs@128") == PlanEntry(
        dict(precision="fp8", compile="model", cudagraphs="on", fp8_impl="torchao"), 128)
    assert parse_spec("fp8+refops+model+graphs@128") == PlanEntry(
        dict(precision="fp8", compile="model", cudagraphs="on"), 128, "reference")
    with pytest.raises(ValueError, match="@BATCH"):
        parse_spec("bf16")
    with pytest.raises(ValueError, match="fp8_recipe applies to precision fp8 only"):
        parse_spec("bf16+tensorwise@4")
    assert forward_units([False, True, True]) == 5
    res = measure_sampling("custom", ["fp32@4", "bf16+refops@6", "bf16+graphs@4", "fp8@4"], steps=5, input_size=4,
                           in_channels=4, num_classes=3,
                           model_kwargs=dict(hidden_size=32, depth=1, num_heads=2, patch_size=1),
                           vae_config=dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                                           resolution=8, z_channels=4, embed_dim=4), log=None,
                           partial_json=tmp_path / "partial.json", profile=True)
    fp32, bf16, graphs, fp8 = res["results"]
    assert fp32["profile"]["total_kernel_ms_per_call"] > 0 and fp32["profile"]["ms_per_call_by_category"]
    assert res["settings"]["gflop_per_img"] > 0 and fp32["tflops"] == pytest.approx(
        fp32["img_per_s"] * res["settings"]["gflop_per_img"] / 1e3)
    partial = json.loads((tmp_path / "partial.json").read_text())  # rewritten after each entry
    assert partial["partial"]
    assert [r["spec"] for r in partial["results"]] == ["fp32@4", "bf16+refops@6", "bf16+graphs@4", "fp8@4"]
    assert bf16["kernels_backend"] == "reference" and fp32["kernels_backend"] == "auto"
    import kernels
    assert kernels.get_backend() == "auto"  # the entry's backend was restored
    assert fp32["ran"]["precision"] == "fp32" and fp32["rel_err_vs_fp32"]["max"] == 0.0 and fp32["img_per_s"] > 0
    assert bf16["ran"]["precision"] == "bf16" and 0 < bf16["rel_err_vs_fp32"]["max"] < 0.05 and bf16["finite"]
    assert "img_per_s_with_decode" in bf16 and bf16["batch"] == 6
    assert "CUDA graphs were requested" in graphs["error"]  # no speed for a path that did not run
    assert "FP8-capable CUDA GPU" in fp8["error"] and "img_per_s" not in fp8
    assert res["settings"]["guided_steps_scaled"] == "168/249" and res["environment"]["card"].startswith("cpu")
    json.dumps(res)  # JSON-clean
    skipped = measure_sampling("custom", ["fp32@2"], steps=3, input_size=4, in_channels=4, num_classes=3,
                               model_kwargs=dict(hidden_size=32, depth=1, num_heads=2, patch_size=1), decode=False,
                               budget_s=-1, log=None)
    assert "budget" in skipped["results"][0]["skipped"]


def test_training_eval_fn_fixed_samples_and_scorers(tmp_path):
    """build_eval_fn: the same class-balanced samples at every call, FID against a reference, extra scorers,
    a grid; an ADM-format npz reference works too."""
    from evaluation.fid import FIDStatistics
    from evaluation.train_eval import EvalSettings, build_eval_fn, reference_from_npz
    from modeling import AutoencoderKL
    vae = AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), resolution=8, z_channels=4,
                        embed_dim=4).eval()

    def features(images):  # a cheap stand-in for Inception: per-channel pixel statistics
        x = torch.as_tensor(np.asarray(images)).float().flatten(1, 2)
        return {"pool": torch.cat([x.mean(1), x.std(1), x.amax(1), x.amin(1)], 1).double().numpy()}

    ref_images = np.random.default_rng(0).integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "ref.npz", arr_0=ref_images)
    reference = reference_from_npz(tmp_path / "ref.npz", features)
    assert reference["num_images"] == 12 and reference["pool_features"].shape == (12, 12)
    seen = []

    def scorer(images, labels):
        seen.append(labels.copy())
        return {"mean_pixel": float(images.mean())}

    s = EvalSettings(every=10, num_samples=9, batch_size=4, steps=3, cfg_scale=2.0, precision="fp32", grid=4,
                     ref_batch=str(tmp_path / "ref.npz"))
    s.validate()
    fn = build_eval_fn(s, vae=vae, device="cpu", features=features, reference=reference, scorers=[scorer],
                       out_dir=tmp_path / "eval", log=None)
    m = _tiny()
    a, b = fn(m, 10), fn(m, 20)
    assert np.isfinite(a["fid"]) and a["fid"] == b["fid"] and a["mean_pixel"] == b["mean_pixel"]
    assert 0 <= a["precision"] <= 1 and a["eval_samples"] == 9
    assert sorted(np.bincount(seen[0], minlength=3).tolist()) == [3, 3, 3]  # class-balanced
    assert (tmp_path / "eval" / "eval_step0000020.png").is_file()
    other = _tiny(seed=1)
    assert fn(other, 30)["fid"] != a["fid"]
    stats_only = build_eval_fn(s, vae=vae, device="cpu", features=features,
                               reference=FIDStatistics.from_features(reference["pool_features"]), log=None)
    assert stats_only(m, 10)["fid"] == pytest.approx(a["fid"]) and "precision" not in stats_only(m, 10)
    with pytest.raises(ValueError, match="ref_batch"):
        EvalSettings(every=5).validate()


def test_precision_guard_records_a_path_that_fails_and_exits_nonzero(parity_dir, tmp_path, monkeypatch):
    """A fast path that breaks at run time (e.g. a CUDA graph capture) is recorded with its error while the
    others still run, and the command exits non-zero: no guard 'passes' with a path missing."""
    from bench import precision_guard
    real = Sampler.__call__

    def fp8_breaks(self, z, y, *a, **k):
        if self.config.precision == "fp8":
            raise RuntimeError("capture failed")
        return real(self, z, y, *a, **k)

    monkeypatch.setattr(Sampler, "__call__", fp8_breaks)
    out = tmp_path / "guard.json"
    with pytest.raises(SystemExit, match="lightningdit_b fp8_rel_err, trained model fp8"):
        precision_guard.main([str(parity_dir), "--num-samples", "16", "--train-steps", "3", "--json", str(out)])
    res = json.loads(out.read_text())
    assert "capture failed" in res["trained_model"]["fp8"]["error"]
    assert res["trained_model"]["bf16"]["rel_err_median"] > 0 and res["fixtures"][1]["bf16_rel_err"]["max"] > 0


def test_sampler_primes_attention_at_its_shapes(monkeypatch):
    """Before the first (compiled / graphed) run of a batch size, the Sampler has attention timed forward-only at
    the shapes its steps use: 2n for guided steps, n for unguided ones; once per batch size."""
    import kernels
    calls = []
    monkeypatch.setattr(kernels, "prime_attention", lambda shape, dtype, device, training: calls.append(
        (shape, dtype, training)))
    m = _tiny()
    s = Sampler(m, SamplingConfig(steps=6, cfg_scale=2.0, cfg_interval_start=0.5, precision="bf16-weights"))
    z, y = torch.randn(3, 4, 4, 4), torch.tensor([0, 1, 2])
    s(z, y)
    s(z, y)
    assert calls == [((3, 2, 16, 16), torch.bfloat16, False), ((6, 2, 16, 16), torch.bfloat16, False)]


# ----------------------------------------------------------------------------- one SamplingConfig, one registry

def test_sampling_options_are_declared_once():
    """SamplingConfig is the one declaration: the trainer's eval.* keys inherit it (same types, the trainer's own
    defaults), the CLI has one flag per field with the field's comment as help, presets and config.json's
    "sampling" are its settings() (validated), and a bad value is refused naming the field."""
    import argparse
    import dataclasses
    import typing

    from evaluation.train_eval import EvalSettings
    from modeling.config import field_comments, from_dict
    from modeling.sampling import SAMPLING_PRESETS, SETTING_KEYS, add_sampling_args, config_from_args

    fields = {f.name: f for f in dataclasses.fields(SamplingConfig)}
    hints, eval_hints = typing.get_type_hints(SamplingConfig), typing.get_type_hints(EvalSettings)
    assert issubclass(EvalSettings, SamplingConfig)
    assert all(eval_hints[k] == hints[k] for k in fields)
    assert EvalSettings().precision == "bf16" and EvalSettings().cudagraphs == "auto"  # the trainer's defaults
    assert SETTING_KEYS == tuple(fields)[:6]
    # eval.* keys stay flat and are checked by SamplingConfig.validate (through the config system)
    assert from_dict(EvalSettings, {"method": "heun", "steps": 5}).method == "heun"
    with pytest.raises(ValueError, match="cfg_scale: expected a finite number, got nan"):
        from_dict(EvalSettings, {"cfg_scale": float("nan")})
    with pytest.raises(ValueError, match="method must be a registered integrator"):
        from_dict(EvalSettings, {"method": "rk99"})
    p = add_sampling_args(argparse.ArgumentParser())
    flags = {a.dest: a for a in p._actions if a.option_strings}
    docs = field_comments(SamplingConfig)
    for name, f in fields.items():
        a = flags[name]
        assert a.option_strings == ["--" + name.replace("_", "-")] and a.help == docs[name] and docs[name]
        assert a.default is None if name in SETTING_KEYS else a.default == f.default or name == "cudagraphs"
        if typing.get_origin(hints[name]) is typing.Literal:
            assert tuple(a.choices) == typing.get_args(hints[name])
    cfg, sources = config_from_args(p.parse_args(["--preset", "800ep", "--steps", "7", "--compile", "blocks"]))
    assert cfg == SamplingConfig(method="euler", steps=7, shift=0.3, cfg_scale=6.7, cfg_interval_start=0.125,
                                 guidance="reference", compile="blocks", cudagraphs="auto")
    assert sources["steps"] == "given" and sources["cfg_scale"] == "preset 800ep"
    for preset in SAMPLING_PRESETS.values():
        assert SamplingConfig(**preset["settings"]).validate().settings() == preset["settings"]
    stored = {"preset": "x", **SamplingConfig(cfg_scale=4.0).settings()}  # what config.json "sampling" holds
    assert config_from_args(p.parse_args([]), stored)[0].cfg_scale == 4.0
    with pytest.raises(SamplingConfigError, match=r'^the sampling settings stored with m\.pt .*cfg_scale must be'):
        config_from_args(p.parse_args([]), {"cfg_scale": float("inf")}, stored_from="m.pt")
    with pytest.raises(SamplingConfigError, match="^--cfg-scale: cfg_scale must be a finite number, got nan"):
        config_from_args(p.parse_args(["--cfg-scale", "nan"]))
    with pytest.raises(SamplingConfigError, match="stored with the model .*steps must be an integer, got 'many'"):
        config_from_args(p.parse_args([]), {"steps": "many"})
    with pytest.raises(SamplingConfigError, match="^--preset: unknown sampling preset 'x'"):
        config_from_args(p.parse_args(["--preset", "x"]))
    # a misspelt stored key sampled without guidance, silently
    with pytest.raises(SamplingConfigError, match=r"stored with m\.pt .*unknown key\(s\) \['cfg_sacle'\]"):
        config_from_args(p.parse_args([]), {"cfg_sacle": 4.0, "steps": 3}, stored_from="m.pt")


def test_save_pretrained_refuses_sampling_keys_no_command_reads(tmp_path):
    from modeling.lightningdit import LightningDiT
    m = LightningDiT(input_size=4, patch_size=1, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=3)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['cfg_sacle'\]"):
        m.save_pretrained(tmp_path / "m", sampling={"cfg_sacle": 4.0})
    assert not (tmp_path / "m").exists()
    m.save_pretrained(tmp_path / "m", sampling={"cfg_scale": 4.0, "steps": 3})


@pytest.fixture
def midpoint():
    """A toy integrator registered for one test (and removed after): explicit midpoint, two calls per step."""
    from modeling.integrators import INTEGRATORS, Integrator, register_integrator

    @register_integrator("midpoint")
    class Midpoint(Integrator):
        def step(self, v, x, t0, t1, last=False, generator=None):
            h = t1 - t0
            return x + h * v(x + 0.5 * h * v(x, t0), t0 + 0.5 * h)

    yield Midpoint
    del INTEGRATORS["midpoint"]


def test_a_registered_integrator_runs_everywhere(midpoint):
    """Adding an integrator is one class + one registration: sample(), the Sampler (any precision) and the CLI
    flag choices pick it up, and it computes what its step says (checked against a hand-written loop)."""
    import argparse

    from modeling.guidance import is_guided
    from modeling.sampling import GuidedVelocity, add_sampling_args, config_from_args, sampling_grid
    m = _tiny()
    z, y = torch.randn(3, 4, 4, 4), torch.tensor([0, 1, 2])
    kw = dict(steps=4, cfg_scale=2.0, cfg_interval_start=0.3)
    v = GuidedVelocity(m, y, 2.0, 0.3)
    x, grid = z, sampling_grid(4, 0.3)
    with torch.no_grad():
        for t0, t1 in zip(grid[:-1], grid[1:]):
            h = t1 - t0
            x = x + h * v(x + 0.5 * h * v(x, t0), t0 + 0.5 * h)
    assert any(is_guided(t, 2.0, 0.3) for t in grid) and not all(is_guided(t, 2.0, 0.3) for t in grid)
    ref = sample(m, z, y, method="midpoint", **kw)
    assert torch.equal(ref, x) and not torch.equal(ref, sample(m, z, y, **kw))
    p = add_sampling_args(argparse.ArgumentParser(exit_on_error=False))
    assert "midpoint" in next(a for a in p._actions if a.dest == "method").choices
    cfg, _ = config_from_args(p.parse_args(["--method", "midpoint", "--steps", "4", "--cfg-scale", "2",
                                            "--cfg-interval-start", "0.3", "--cudagraphs", "off"]))
    s = Sampler(m, cfg)
    assert s.describe()["method"] == "midpoint" and torch.equal(s(z, y), ref)
    bf16 = Sampler(m, cfg.replace(precision="bf16-weights"))(z, y)
    assert 0 < float((bf16 - ref).norm() / ref.norm()) < 0.05
    with pytest.raises(SamplingConfigError, match="Euler sampler, not method 'midpoint'"):
        cfg.replace(compile="blocks")


def test_unregistered_method_and_bad_registrations():
    from modeling.integrators import Integrator, make_integrator, register_integrator
    with pytest.raises(SamplingConfigError, match="registered integrator .*euler, heun, dopri5, euler_maruyama"):
        SamplingConfig(method="midpoint").validate()
    with pytest.raises(ValueError, match="method must be a registered integrator .* got 'rk99'"):
        sample(_tiny(), torch.randn(1, 4, 4, 4), torch.tensor([0]), steps=3, method="rk99")
    with pytest.raises(ValueError, match="unknown sampling method 'rk99'; registered: euler, heun"):
        make_integrator("rk99")
    with pytest.raises(ValueError, match="identifier"):
        register_integrator("mid point")
    with pytest.raises(TypeError, match="Integrator subclass"):
        register_integrator("fn")(lambda v, x: x)
    with pytest.raises(NotImplementedError, match="implements neither step nor integrate"):
        Integrator().integrate(lambda x, t: x, torch.zeros(1), [0.0, 1.0])
    # options go to the integrators that declare them
    assert make_integrator("dopri5", atol=1e-3, diffusion_norm=2.0).atol == 1e-3
    assert make_integrator("euler_maruyama", atol=1e-3, diffusion_norm=2.0).diffusion_norm == 2.0


def test_guidance_rule_and_mix_written_once():
    """modeling.guidance: the rule (scale != 1 and t >= start; floats and per-sample tensors alike) and the mix
    (all channels / the authors' channels 0..2) that forward_with_cfg and the Sampler share."""
    from modeling.guidance import cfg_velocity, is_guided
    assert is_guided(0.5, 2.0, 0.5) and not is_guided(0.49, 2.0, 0.5) and not is_guided(0.9, 1.0, 0.0)
    assert is_guided(torch.tensor([0.4, 0.6]), 2.0, 0.5).tolist() == [False, True]
    assert is_guided(torch.tensor([0.4, 0.6]), 1.0, 0.0).tolist() == [False, False]
    cond, uncond = torch.randn(2, 5, 2, 2), torch.randn(2, 5, 2, 2)
    out = torch.cat([cond, uncond])
    torch.testing.assert_close(cfg_velocity(out, 3.0, "all"), uncond + 3.0 * (cond - uncond))
    ref = cfg_velocity(out, 3.0, "reference")
    torch.testing.assert_close(ref[:, :3], uncond[:, :3] + 3.0 * (cond[:, :3] - uncond[:, :3]))
    assert torch.equal(ref[:, 3:], cond[:, 3:])
    on = cfg_velocity(out, 3.0, "all", on=torch.tensor([True, False]))
    assert torch.equal(on[1], cond[1]) and torch.equal(on[0], cfg_velocity(out, 3.0, "all")[0])
    m = _tiny()
    x, t, y = torch.randn(2, 4, 4, 4), torch.tensor([0.7, 0.7]), torch.tensor([1, 3])
    with torch.no_grad():  # cfg_scale 1 is unguided: the conditional output, exactly
        assert torch.equal(m.forward_with_cfg(x, t, y, 1.0)[:1], m(torch.cat([x[:1], x[:1]]), t, y)[:1])


def test_compile_settings_for_autotune_and_multi_kernel():
    """torch.compile takes a mode or options: max-autotune alone is its mode; with multi-kernel both are options
    (max-autotune's spelled out, so neither is lost)."""
    import torch._inductor

    from modeling.sampling import compile_settings
    assert compile_settings(False, False) == {"mode": None}
    assert compile_settings(True, False) == {"mode": "max-autotune-no-cudagraphs"}
    assert compile_settings(False, True) == {"options": {"triton.multi_kernel": 1}}
    both = compile_settings(True, True)["options"]
    assert both == {**torch._inductor.list_mode_options("max-autotune-no-cudagraphs"), "triton.multi_kernel": 1}
    assert both["max_autotune"] is True


def test_the_grid_and_the_guidance_switch_are_the_references(parity_dir):
    """The grid is the authors' float32 one (the fixture bit for bit; the float64 grid differed by an ulp at 140 of
    250 points) and guidance switches where theirs does: their `t < cfg_interval_start` on float32 times, and no
    guidance at a scale <= 1 (inference.py: `using_cfg = cfg_scale > 1.0`). A review, 2026-12-05: at 7 points,
    shift 1, start float32(1/6) the float64 grid guided one step less; a scale of 0.5 mixed the halves."""
    from modeling.sampling import sampling_grid, time_grid
    io = torch.load(parity_dir / "lightningdit_a_io.pt", weights_only=True)
    assert torch.equal(torch.tensor(sampling_grid(250, 0.3), dtype=torch.float32), io["grid250_shift0.3"])
    start = float(np.float32(1 / 6))
    theirs = [not bool(t < start) for t in time_grid(7, 1.0)[:-1]]  # their forward_with_cfg, t a float32 tensor
    m = _tiny()
    ours = Sampler(m, SamplingConfig(steps=7, shift=1.0, cfg_scale=4.0, cfg_interval_start=start)).guided
    assert ours == theirs == [False, True, True, True, True, True]
    z, y = torch.randn(2, 4, 4, 4), torch.tensor([0, 2])
    for scale in (0.5, 0.0):  # conditional, as with no guidance
        assert not any(Sampler(m, SamplingConfig(steps=4, cfg_scale=scale)).guided)
        assert torch.equal(sample(m, z, y, steps=4, cfg_scale=scale), sample(m, z, y, steps=4))
