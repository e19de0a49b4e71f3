"""The VA-VAE benchmarks on tiny shapes (CPU): the bf16-vs-fp32 loss-curve tool and the training-step benchmark
run through the real trainer and write what they promise."""
import json
from pathlib import Path

import pytest

from bench import vae_precision_compare
from evaluation.provenance import ENVIRONMENT_KEYS

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.ch=32", "model.ch_mult=[1,2]", "model.resolution=32", "model.z_channels=4", "model.embed_dim=4",
        "foundation.name=random_tiny", "foundation.input_size=null", "loss.disc_start=3", "loss.disc_ndf=8",
        "data.num_samples=16", "train.batch_per_gpu=2"]


def test_precision_compare_runs_both_precisions_through_the_trainer(tmp_path, capsys):
    rc = vae_precision_compare.main(["--steps", "6", "--out", str(tmp_path), *sum([["--set", s] for s in TINY], [])])
    res = json.loads((tmp_path / "precision_compare.json").read_text())
    assert rc == (0 if res["agree"] else 1)
    assert len(res["fp32"]["rec"]) == len(res["bf16"]["rec"]) == 6 and res["rec"]["steps"] == 6
    # the same data and samples, different arithmetic: close, not equal (bf16 really ran)
    assert res["fp32"]["rec"] != res["bf16"]["rec"]
    assert res["rec"]["max_step_rel_diff"] < 0.1 and res["vf"]["max_step_rel_diff"] < 0.2
    assert (tmp_path / "precision_compare.png").stat().st_size > 0
    assert "bf16 vs fp32 (cpu: " in capsys.readouterr().out


def _autoencoder_conv_flops(overrides: list[str]) -> float:
    """2 x multiply-adds of every Conv2d of the VA-VAE's encoder and decoder for one image, from each conv's output
    shape in a forward pass (k_h k_w C_in/groups C_out H_out W_out)."""
    import torch

    from modeling.config import load_config
    from modeling.vavae import AutoencoderKL
    from train.vae_config import VAVAETrainConfig
    cfg = load_config(VAVAETrainConfig, None, overrides)
    vae, total = AutoencoderKL(cfg.model), [0.0]

    def count(m, inputs, out):
        total[0] += 2 * m.kernel_size[0] * m.kernel_size[1] * m.in_channels // m.groups * out[0].numel()

    for m in vae.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(count)
    with torch.no_grad():
        vae(torch.zeros(1, 3, cfg.model.resolution, cfg.model.resolution))
    return total[0]


def test_step_benchmark_on_tiny_shapes(tmp_path, capsys):
    """The GPU command on tiny shapes: every mode through Trainer.train_step, the doubling batch search, the
    extraction variants, the profiles (on the CPU only when asked) and the JSON it promises."""
    from bench import vae_step
    tiny = ["model.ch=32", "model.ch_mult=[1,2]", "model.resolution=32", "model.z_channels=4", "model.embed_dim=4",
            "model.attn_resolutions=[16]", "foundation.name=random_tiny", "foundation.input_size=null",
            "loss.disc_ndf=8", "loss.perceptual_weight=0.0"]  # LPIPS: see test_train_vae_bf16 (slow in CPU bf16)
    out = tmp_path / "vae_step.json"
    partial = []  # what a timeout would have left: the JSON after every measurement
    real_save = vae_step.Path.write_text

    def spy(self, text, *args, **kw):
        if self in (out, out.with_name(out.name + ".tmp")):  # the partial JSON is written beside it, then renamed
            partial.append(json.loads(text))
        return real_save(self, text, *args, **kw)

    from unittest import mock
    with mock.patch.object(vae_step.Path, "write_text", spy):
        rc = vae_step.main(["--out", str(out), "--modes", "fp32,bf16_cl", "--batch", "2", "--max-batch", "4",
                            "--warmup", "1", "--steps", "1", "--extract-batch", "2", "--budget-s", "1000",
                            "--profile", "on", "--profile-calls", "1", *sum([["--set", s] for s in tiny], [])])
    assert rc == 0
    assert len(partial) >= 6 and all(p["partial"] for p in partial[:-1]) and "partial" not in partial[-1]
    assert list(partial[0]["modes"]) == ["fp32"] and partial[0]["modes"]["fp32"]["batch_2"]["img_per_s"] > 0
    res = json.loads(out.read_text())
    assert tuple(res["environment"]) == ENVIRONMENT_KEYS and res["environment"]["card"].startswith("cpu")
    assert res["lpips_weights"] in ("file", "random") and set(res["cudnn"]) >= {"benchmark", "allow_tf32"}
    probe = res["groupnorm_probe"]  # measured on this device (the CPU's autocast keeps GroupNorm in bf16, CUDA's not)
    assert probe["device"] == "cpu" and probe["conv_dtype_under_bf16_autocast"] == "bfloat16"
    assert probe["group_norm_dtype_under_bf16_autocast"] in ("bfloat16", "float32")
    assert isinstance(probe["group_norm_keeps_channels_last"], bool)
    assert set(res["modes"]) == {"fp32", "bf16_cl"} and res["fastest"] == "bf16_cl"
    for mode, r in res["modes"].items():
        assert r["batch_2"]["img_per_s"] > 0 and r["batch_2"]["batch"] == 2
    assert res["modes"]["fp32"]["largest"]["batch"] == 4 and res["modes"][res["fastest"]]["largest"]["batch"] == 4
    assert res["speedup_batch_2"] > 0 and res["speedup_largest"] > 0 and res["skipped"] == []
    # the step's FLOPs (FlopCounterMode over the step): at least the autoencoder's convolutions forward and twice
    # that backward (weights and inputs), counted here independently from each Conv2d's output shape; each timed
    # row's TFLOP/s is its img/s times them
    flops = res["tflop_per_image"] * 1e12
    assert flops >= 3 * _autoencoder_conv_flops(vae_step.base_overrides(2, tmp_path / "count", "random") + tiny)
    # per phase of the step: the autoencoder's forward (with the adaptive weights' gradient passes) and backward,
    # the foundation model, the discriminator's; they add up to the step; the profile gets TFLOP/s per phase
    by_phase = res["tflop_per_image_by_phase"]
    assert {"foundation", "forward", "backward", "disc_forward", "disc_backward"} <= set(by_phase)
    assert sum(by_phase.values()) == pytest.approx(res["tflop_per_image"], rel=1e-3)
    assert by_phase["backward"] > by_phase["disc_backward"] > 0
    assert set(res["modes"]["bf16_cl"]["profile"]["tflops_by_phase"]) <= set(by_phase)
    assert res["modes"]["bf16_cl"]["profile"]["tflops_by_phase"]["backward"] > 0
    for r in res["modes"].values():
        for row in (r["batch_2"], r["largest"]):
            assert row["tflops"] == pytest.approx(row["img_per_s"] * flops / 1e12, abs=0.051)

    ext = res["extraction"]
    assert list(ext) == ["fp32", "bf16", "bf16_cl", "bf16_cl_refops"]
    assert [(e["autocast"], e["channels_last"]) for e in ext.values()] == [("none", False), ("bf16", False),
                                                                           ("bf16", True), ("bf16", True)]
    # which GroupNorm ran (the CPU's auto is the reference; refops forces it); the modes say theirs too
    assert ext["bf16_cl_refops"]["group_norm_silu"] == "reference"
    assert all(r["group_norm_silu"] == "reference" for r in res["modes"].values())
    assert all(r["cudnn_benchmark"] is True for r in res["modes"].values())  # train.cudnn_benchmark's default
    assert all(e["img_per_s"] > 0 and e["warmup"] >= 2 and e["latent_shape"] == [4, 16, 16] for e in ext.values())
    assert ext["fp32"]["latent_dtype"] == "float32" and ext["bf16"]["latent_dtype"] == "bfloat16"  # autocast ran
    for e in ext.values():  # the encoder alone: convolutions and GroupNorm, by kernel_times' categories
        cats = e["profile"]["ms_per_call_by_category"]
        assert cats["convolution"] > 0 and cats["normalization (group / batch / layer norm)"] > 0
        assert e["profile"]["wall_ms_per_call"] > 0 and e["profile"]["calls"] == 1
    assert ext["bf16"]["profile"]["ms_per_call_by_category"]["casts / copies"] > 0  # autocast's casts

    # our step's profile: categories, then every kernel given to a phase and a component
    prof = res["modes"]["bf16_cl"]["profile"]
    assert "profile" not in res["modes"]["fp32"] and prof["batch"] == 2 and prof["total_kernel_ms_per_call"] > 0
    assert {"convolution", "normalization (group / batch / layer norm)", "optimizer"} <= set(
        prof["ms_per_call_by_category"])
    comp = prof["components"]
    assert comp["networks_not_scoped"] == [] and comp["kernels_per_call"] > 0
    assert set(comp["ms_per_call_by_phase"]) == {"foundation", "forward", "backward", "optimizer", "disc_forward",
                                                 "disc_backward", "disc_optimizer"}
    assert {"encoder fwd", "encoder bwd", "decoder fwd", "decoder bwd", "discriminator fwd", "discriminator bwd",
            "foundation model (VF features)", "optimizer (both engines)"} <= set(comp["ms_per_call_by_component"])
    assert not any(k.startswith("lpips") for k in comp["ms_per_call_by_component"])  # perceptual_weight=0: no LPIPS
    phases = comp["by_phase_and_component"]
    # the autoencoder's backward never reaches the discriminator's weights' optimizer, and the adaptive weights'
    # autograd.grad (d nll / d encoder.conv_out.weight) runs back through the decoder inside the forward phase
    assert set(phases["disc_forward"]) <= {"discriminator fwd", "other (losses, sampling, DeepSpeed glue)"}
    assert phases["forward"]["decoder bwd"] > 0 and phases["backward"]["decoder bwd"] > 0
    assert abs(sum(comp["ms_per_call_by_component"].values()) - comp["attributed_ms_per_call"]) < 0.05
    assert sum(comp["by_component_and_category"]["encoder fwd"].values()) == pytest.approx(
        comp["ms_per_call_by_component"]["encoder fwd"], abs=0.01)
    printed = capsys.readouterr().out
    assert res["config"]["model"]["ch"] == 32 and "fastest" in printed and "profile bf16_cl batch 2: wall" in printed


def test_each_measurement_runs_under_its_own_trainers_switches():
    """The modes' trainers are built one after another and measured again later (batch search, profile): before
    each measurement the process-wide switches are set back to that trainer's (its kernels backend, its cuDNN
    algorithm timing), so bf16_nobench's trainer, built last, does not turn cuDNN's timing off for the others."""
    from types import SimpleNamespace

    import torch

    import kernels
    from bench.vae_step import MODES, use_switches
    assert "train.cudnn_benchmark=false" in MODES["bf16_nobench"]
    before = (kernels.get_backend(), torch.backends.cudnn.benchmark)
    try:
        for backend, bench in (("reference", False), ("auto", True), ("reference", True)):
            use_switches(SimpleNamespace(cfg=SimpleNamespace(train=SimpleNamespace(kernels=backend,
                                                                                   cudnn_benchmark=bench))))
            assert (kernels.get_backend(), torch.backends.cudnn.benchmark) == (backend, bench)
    finally:
        kernels.set_backend(before[0])
        torch.backends.cudnn.benchmark = before[1]


def test_vae_categories_on_real_kernel_names():
    """Kernel names as an H200 profile shows them (cuDNN, cuBLAS, ATen) fall where VAE_CATEGORIES means them to:
    cuDNN's convs are no "attention" or "matmul", a cast no "elementwise", GroupNorm's apply step no copy."""
    from bench.kernel_time import OTHER, categorize
    from bench.vae_step import VAE_CATEGORIES
    names = {
        "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64_warpgroupsize1x1x1_"
        "execute_segment_k_off_kernel__5x_cudnn": "convolution",
        "sm90_xmma_wgrad_implicit_gemm_indexed_wo_smem_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64":
            "convolution",
        "void cudnn::cnn::wgrad2d_grad_engine<float, 128, 6, 7, 3, 3, 5, false>(int, int, int, float const*, ...)":
            "convolution",
        "void implicit_convolve_sgemm<float, float, 128, 5, 5, 3, 3, 3, 1, false, false, true>(int, int, ...)":
            "convolution",
        "void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16, __nv_bfloat16, float, false, true, "
        "(cudnnKernelDataType_t)0>(cudnn::engines_precompiled::nchw2nhwc_params_t<float>, ...)":
            "layout transforms (cuDNN nchw<->nhwc)",
        "void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<float>(long, float, float const*, float*, "
        "float*)": "normalization (group / batch / layer norm)",
        "void at::native::elementwise_kernel<128, 2, at::native::gpu_kernel_impl_nocast<at::native::(anonymous "
        "namespace)::GroupNormKernelImplInternal<float, float>(at::Tensor const&, ...)::{lambda(float, float, "
        "float)#1}>(at::TensorIteratorBase&, ...)::{lambda(int)#1}>(int, ...)":
            "normalization (group / batch / layer norm)",
        "void cudnn::bn_fw_tr_1C11_kernel_NCHW<float, float, int, 512, true, 1>(cudnnTensorStruct, ...)":
            "normalization (group / batch / layer norm)",
        "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float>(int, float, "
        "c10::BFloat16 const*, ...)": "normalization (group / batch / layer norm)",
        "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 64, 4, false, false, "
        "cutlass::bfloat16_t, Flash_kernel_traits<...>>, false, false, false, false, true, true, false, false>"
        "(pytorch_flash::Flash_fwd_params)": "attention",
        "fmha_cutlassF_bf16_aligned_64x128_rf_sm80(PyTorchMemEffAttention::AttentionKernel<...>::Params)": "attention",
        "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTT": "matmul",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1_execute_segment_k_off_"
        "kernel__5x_cublas": "matmul",
        "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)"
        "::{lambda()#3}::operator()() const::{lambda()#7}::operator()() const::{lambda(float)#1}, ...>(int, ...)":
            "casts / copies",
        "void at::native::(anonymous namespace)::CatArrayBatchedCopy<at::native::(anonymous namespace)::OpaqueType<4>"
        ", unsigned int, 4, 64, 64>(...)": "casts / copies",
        "void at::native::vectorized_elementwise_kernel<4, at::native::(anonymous namespace)::silu_kernel("
        "at::TensorIteratorBase&)::{lambda()#1}::operator()() const::{lambda()#2}::operator()() const::"
        "{lambda(float)#1}, std::array<char*, 2ul> >(int, ...)": "elementwise / reductions / pooling",
        "void at::native::unrolled_elementwise_kernel<at::native::CUDAFunctor_add<float>, std::array<char*, 3ul>, 4, "
        "TrivialOffsetCalculator<2, unsigned int>, TrivialOffsetCalculator<1, unsigned int>, "
        "at::native::memory::LoadWithCast<2>, at::native::memory::StoreWithCast<1> >(int, ...)":
            "elementwise / reductions / pooling",
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
        "TensorListMetadata<4>, at::native::(anonymous namespace)::FusedAdamMathFunctor<float, 4, "
        "(at::native::ADAM_MODE)0, false>, ...>(...)": "optimizer",
        "Memset (Device)": OTHER,
    }
    assert {n: categorize(n, VAE_CATEGORIES) for n in names} == names
    # the DiT's default tuple is unchanged where no categories are passed (cuDNN's convs read as "attention" there)
    assert categorize(next(iter(names))) != "convolution"


def test_component_split_of_a_gpu_profile():
    """split_events on events shaped as a CUDA profile gives them (kernels attached to the CPU op that launched
    them; the backward on the autograd engine's own thread, outside the main thread's phase scope): a backward
    kernel goes to the network whose forward op made its autograd node, and to the phase the main thread was in."""
    from collections import namedtuple
    from types import SimpleNamespace

    from bench.vae_step import MODULE, PHASE, split_events
    K = namedtuple("Kernel", ["name", "device", "duration"])  # torch's Kernel: duration in us
    events = []

    def ev(name, thread, start, end, parent=None, seq=-1, scope=0, kernels=(), device="DeviceType.CPU"):
        e = SimpleNamespace(name=name, thread=thread, time_range=SimpleNamespace(start=start, end=end),
                            cpu_parent=parent, sequence_nr=seq, scope=scope, device_type=device,
                            kernels=[K(n, 0, us) for n, us in kernels], self_cpu_time_total=end - start)
        events.append(e)
        return e

    main, autograd = 1, 2
    fwd = ev(PHASE + "forward", main, 0, 100)
    enc = ev(MODULE + "encoder", main, 10, 40, fwd)
    conv = ev("aten::conv2d", main, 12, 30, enc, seq=5)
    ev("aten::cudnn_convolution", main, 13, 29, conv, kernels=[("sm90_xmma_fprop_implicit_gemm_bf16", 2000)])
    ev("aten::add", main, 50, 55, fwd, seq=6, kernels=[("vectorized_elementwise_kernel<CUDAFunctor_add>", 1000)])
    ev(PHASE + "backward", main, 100, 200)
    ev_add = ev("autograd::engine::evaluate_function: AddBackward0", autograd, 110, 115, seq=6)
    ev("AddBackward0", autograd, 111, 114, ev_add, seq=6, scope=1)
    ev_conv = ev("autograd::engine::evaluate_function: ConvolutionBackward0", autograd, 120, 150, seq=5)
    node = ev("ConvolutionBackward0", autograd, 121, 149, ev_conv, seq=5, scope=1)
    ev("aten::convolution_backward", autograd, 122, 148, node,
       kernels=[("sm90_xmma_wgrad_implicit_gemm", 3000), ("sm90_xmma_dgrad_implicit_gemm", 2000)])
    acc = ev("autograd::engine::evaluate_function: torch::autograd::AccumulateGrad", autograd, 160, 170)
    ev("aten::copy_", autograd, 161, 169, acc, kernels=[("direct_copy_kernel_cuda", 500)])
    opt = ev(PHASE + "optimizer", main, 200, 250)
    ev("aten::_fused_adam_", main, 201, 249, opt, kernels=[("multi_tensor_apply_kernel<FusedAdamMathFunctor>", 1000)])
    ev("sm90_xmma_fprop_implicit_gemm_bf16", 0, 13, 15, device="DeviceType.CUDA")  # the kernel's own row: skipped
    out = split_events(list(reversed(events)), cuda=True)
    assert out["ms_per_call_by_component"] == {"encoder bwd": 5.0, "encoder fwd": 2.0, "optimizer (both engines)": 1.0,
                                               "other (losses, sampling, DeepSpeed glue)": 1.0,
                                               "other bwd (autograd)": 0.5}
    assert out["ms_per_call_by_phase"] == {"backward": 5.5, "forward": 3.0, "optimizer": 1.0}
    assert out["by_component_and_category"]["encoder bwd"] == {"convolution": 5.0}
    assert out["ms_per_call_by_category"]["casts / copies"] == 0.5 and out["kernels_per_call"] == 6
    assert out["attributed_ms_per_call"] == 9.5


def test_step_benchmark_without_deepspeed_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    """No DeepSpeed: one line and exit 2 before anything is measured (the authors' run included)."""
    import sys

    from bench import vae_step
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    monkeypatch.delenv("VAVAE_DEBUG", raising=False)
    with pytest.raises(SystemExit) as info:
        vae_step.main(["--out", str(tmp_path / "x.json"), "--authors", str(tmp_path / "never_run")])
    assert info.value.code == 2 and not (tmp_path / "x.json").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: DeepSpeed is not installed") and "pip install" in err[0]


def test_step_benchmark_refuses_modes_without_the_fp32_baseline(tmp_path, capsys):
    from bench import vae_step
    assert vae_step.main(["--out", str(tmp_path / "x.json"), "--modes", "bf16"]) == 2
    assert "must include fp32" in capsys.readouterr().err
