"""The evaluation commands' device paths on a GPU (run by bench/gpu_suite.sh): `evaluation.fid` and
`evaluation.tokenizer_metrics` default to CUDA where it exists, and precision/recall there once raised on its
first line (np.asarray of a CUDA tensor: found by a review, 2026-12-06, never run on a card before)."""
import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu


def test_precision_recall_on_gpu_equals_the_cpu():
    from evaluation.precision_recall import precision_recall
    rng = np.random.default_rng(0)
    # multiples of 1/8 with small norms: every product and partial sum is exact in fp32 whatever the order, so the
    # two devices' sums are equal and round to fp16 alike
    ref = (rng.integers(0, 16, (300, 64)) / 8).astype(np.float32)
    sam = (rng.integers(0, 16, (200, 64)) / 8).astype(np.float32)
    for distances in ("adm", "fp32"):
        cpu = precision_recall(ref, sam, row_batch=128, col_batch=96, distances=distances)
        gpu = precision_recall(torch.from_numpy(ref).cuda(), torch.from_numpy(sam).cuda(), row_batch=128,
                               col_batch=96, device="cuda", distances=distances)
        assert gpu == cpu and 0 < cpu[0] < 1


def test_tokenizer_metrics_on_gpu():
    from evaluation.tokenizer_metrics import reconstruction_metrics
    from modeling.vavae import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), resolution=8, z_channels=4,
                        embed_dim=4)
    images = torch.randint(0, 256, (5, 16, 16, 3), dtype=torch.uint8).numpy()

    def features(batch):  # a stand-in for Inception: per-channel pixel statistics
        x = batch.float().flatten(1, 2)
        return {"pool": torch.cat([x.mean(1), x.std(1), x.amax(1)], 1)}
    kw = dict(batch_size=2, progress=False, posterior="mode", inception=features,
              lpips=lambda a, b: (a - b).abs().flatten(1).mean(1))
    cpu, rec_cpu = reconstruction_metrics(vae, images, device="cpu", **kw)
    gpu, rec_gpu = reconstruction_metrics(vae, images, device="cuda", **kw)
    assert np.abs(rec_cpu.astype(int) - rec_gpu.astype(int)).max() <= 1  # convolutions: cuDNN against the CPU
    for k in ("psnr", "ssim", "lpips"):
        assert gpu[k] == pytest.approx(cpu[k], rel=1e-2), k


def test_cuda_graph_sampler_is_the_eager_one_in_fp32():
    """The Euler steps captured as CUDA graphs against the same steps run eagerly, in fp32 with guidance over an
    interval: nothing else compares the graphed path with eager at fp32 (a step size off by 1e-4 in the captured
    step passed every bf16/FP8 tolerance). Proposed by a review, 2026-12-06; not yet run on a card."""
    from modeling.lightningdit import LightningDiT
    from modeling.sampling import Sampler, SamplingConfig
    torch.manual_seed(0)
    dit = LightningDiT(input_size=4, patch_size=1, in_channels=4, hidden_size=64, depth=2, num_heads=2,
                       num_classes=5).cuda().eval()
    for p in dit.parameters():  # a non-zero velocity (the output layer starts at zero)
        p.data.add_(0.05 * torch.randn_like(p))
    z, y = torch.randn(6, 4, 4, 4, device="cuda"), torch.tensor([0, 1, 2, 3, 4, 0], device="cuda")
    kw = dict(steps=8, shift=0.3, cfg_scale=3.0, cfg_interval_start=0.11, guidance="reference", precision="fp32")
    graphed = Sampler(dit, SamplingConfig(**kw, cudagraphs="on"))
    assert graphed.describe()["cudagraphs"] == "on"
    torch.testing.assert_close(graphed(z, y), Sampler(dit, SamplingConfig(**kw, cudagraphs="off"))(z, y),
                               rtol=1e-5, atol=1e-6)
