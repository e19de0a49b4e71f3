"""FID / sFID / IS / precision-recall against the ADM evaluator's formulas and exact answers."""
import warnings

import numpy as np
import pytest
import torch
from scipy import linalg

from evaluation.fid import FIDStatistics, frechet_distance, inception_score, trace_sqrt_product
from evaluation.precision_recall import precision_recall


def adm_frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """Verbatim from guided-diffusion/evaluations/evaluator.py (FIDStatistics.frechet_distance)."""
    mu1 = np.atleast_1d(mu1)
    mu2 = np.atleast_1d(mu2)
    sigma1 = np.atleast_2d(sigma1)
    sigma2 = np.atleast_2d(sigma2)
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))  # (ADM passes disp=False, deprecated in scipy)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    tr_covmean = np.trace(covmean)
    return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean


def _features(n, d, seed, shift=0.0):
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((d, d)) / np.sqrt(d)
    return rng.standard_normal((n, d)) @ mix + shift


def test_fid_reproduces_adm_formula_on_features():
    a, b = _features(600, 64, 0), _features(500, 64, 1, shift=0.3)
    s1, s2 = FIDStatistics.from_features(a), FIDStatistics.from_features(b)
    ref = adm_frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert s1.frechet_distance(s2) == pytest.approx(ref, rel=1e-9)
    assert s1.frechet_distance(s2, method="adm") == pytest.approx(ref, rel=1e-12)
    assert s2.frechet_distance(s1) == pytest.approx(ref, rel=1e-9)
    assert abs(s1.frechet_distance(s1)) < 1e-9


def test_trace_sqrt_exact_on_ill_conditioned_commuting_covariances():
    # Same eigenbasis => tr((S1 S2)^1/2) = sum sqrt(a_i b_i) exactly; eigenvalues span 16 decades
    # and a third of them are exactly zero (rank deficient).
    rng = np.random.default_rng(0)
    d = 96
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    a = 10.0 ** rng.uniform(-14, 2, d)
    b = 10.0 ** rng.uniform(-14, 2, d)
    a[::3] = 0.0
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    exact = np.sqrt(a * b).sum()
    # Forming S1, S2 in float64 already perturbs the tiny eigenvalues (~1e-14 * 100): rel 1e-6.
    assert trace_sqrt_product(s1, s2) == pytest.approx(exact, rel=1e-6)
    mu = rng.standard_normal(d)
    fd_exact = mu @ mu + a.sum() + b.sum() - 2 * exact
    assert frechet_distance(mu, s1, np.zeros(d), s2) == pytest.approx(fd_exact, rel=1e-7)


def test_trace_sqrt_rank_deficient_matches_float64_eigendecomposition():
    # Fewer samples than dimensions, as with small eval sets: both covariances are singular.
    f1, f2 = _features(40, 128, 2), _features(50, 128, 3, shift=0.1)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    ev = np.linalg.eigvals(s1 @ s2)
    ref = np.sqrt(np.clip(ev.real, 0, None)).sum()
    assert trace_sqrt_product(s1, s2) == pytest.approx(ref, rel=1e-6)
    fd = frechet_distance(f1.mean(0), s1, f2.mean(0), s2)
    assert np.isfinite(fd) and fd > 0


def test_well_conditioned_agrees_with_scipy_sqrtm():
    s1 = np.cov(_features(400, 32, 4), rowvar=False)
    s2 = np.cov(_features(400, 32, 5), rowvar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = np.trace(linalg.sqrtm(s1 @ s2).real)
    assert trace_sqrt_product(s1, s2) == pytest.approx(ref, rel=1e-10)


def test_frechet_rejects_mismatched_stats():
    with pytest.raises(ValueError, match="mismatched"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_inception_score_extremes_and_adm_formula():
    n_cls = 10
    confident = torch.full((100, n_cls), -50.0)
    confident[torch.arange(100), torch.arange(100) % n_cls] = 50.0
    assert inception_score(confident) == pytest.approx(n_cls, rel=1e-6)
    assert inception_score(torch.zeros(64, n_cls)) == pytest.approx(1.0)
    logits = torch.randn(300, 50, dtype=torch.float64) * 3
    preds = torch.softmax(logits, 1).numpy()
    scores = []
    for i in range(0, 300, 100):  # ADM's loop, split_size = 100
        part = preds[i:i + 100]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    assert inception_score(logits, split_size=100) == pytest.approx(np.mean(scores), rel=1e-12)


def _brute_pr(ref, sam, k=3):
    def radii(f):
        d = ((f[:, None] - f[None]) ** 2).sum(-1)
        return np.sort(d, 1)[:, k]

    d = ((ref[:, None] - sam[None]) ** 2).sum(-1)
    precision = (d <= radii(ref)[:, None]).any(0).mean()
    recall = (d <= radii(sam)[None]).any(1).mean()
    return precision, recall


def test_precision_recall_matches_brute_force_with_blocking():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((53, 8)).astype(np.float32)
    sam = (rng.standard_normal((41, 8)) * 0.7 + 0.8).astype(np.float32)
    p, r = precision_recall(ref, sam, row_batch=7, col_batch=11, distances="fp32")
    bp, br = _brute_pr(ref.astype(np.float64), sam.astype(np.float64))
    assert (p, r) == pytest.approx((bp, br), abs=1e-12)
    assert 0 < p < 1 and 0 < r < 1
    for distances in ("adm", "fp32"):
        assert precision_recall(ref, ref, distances=distances) == (1.0, 1.0)
        assert precision_recall(ref, sam + 100.0, distances=distances) == (0.0, 0.0)
    with pytest.raises(ValueError, match="distances must be 'adm' or 'fp32'"):
        precision_recall(ref, sam, distances="fp16")


def _adm_fp16_pr(ref, sam, k=3):
    """The ADM evaluator's TF graph in numpy float16 (each op rounds to fp16; its GPU sums and matmul accumulate
    in fp32, here in float64: the same after the fp16 rounding at these sizes)."""
    h = np.float16

    def dists(u, v):
        u, v = u.astype(h), v.astype(h)
        nu = np.square(u).astype(np.float64).sum(1).astype(h)[:, None]
        nv = np.square(v).astype(np.float64).sum(1).astype(h)[None]
        mm = (u.astype(np.float64) @ v.astype(np.float64).T).astype(h)
        return np.maximum((nu - h(2) * mm) + nv, h(0)).astype(np.float64)

    def radii(f):
        return np.sort(dists(f, f), 1)[:, k]
    d = dists(ref, sam)
    return (d <= radii(ref)[:, None]).any(0).mean(), (d <= radii(sam)[None]).any(1).mean()


def test_precision_recall_counts_ties_as_the_adm_evaluators_fp16_distances_make_them():
    """distances="adm" (the default) rounds as ADM's fp16 distance block: equal to the graph written in numpy
    float16 on 2048-d features with Inception-like norms, with blocking; a point 0.0001 outside a ball's edge in
    fp32 is on it in fp16, and `<=` counts it; a block whose fp16 values overflow is computed in fp32."""
    rng = np.random.default_rng(1)
    ref = (rng.gamma(0.6, 0.5, (37, 2048))).astype(np.float32)  # non-negative, ||x||^2 ~ 1,000 like pool3's
    sam = (ref[rng.integers(0, 37, 29)] * rng.uniform(0.8, 1.2, (29, 2048))).astype(np.float32)
    assert precision_recall(ref, sam, row_batch=8, col_batch=10) == pytest.approx(_adm_fp16_pr(ref, sam), abs=1e-12)
    line_ref = np.arange(6, dtype=np.float32)[:, None]  # point 0's ball: its 3rd neighbour at squared distance 9
    line_sam = np.array([[-3.0001], [100], [101], [102]], np.float32)  # -3.0001 is -3 in fp16
    assert precision_recall(line_ref, line_sam, distances="fp32")[0] == 0.0
    assert precision_recall(line_ref, line_sam)[0] == 0.25
    big = line_ref * 300  # squares past fp16's 65,504: the fp32 block, as ADM's tf.cond
    assert precision_recall(big, line_sam * 300) == precision_recall(big, line_sam * 300, distances="fp32")
    from evaluation.precision_recall import _pairwise_sq_dists  # 2 u.v past 65,504 but the squares not: TF's
    u, v = torch.tensor([[244.9]]), torch.tensor([[141.4]])     # distance is -inf, clamped to 0, and kept
    assert _pairwise_sq_dists(u, v).item() == 0.0 and _pairwise_sq_dists(u, v, "fp32").item() > 10000
    h = np.float16  # the numpy graph agrees
    with np.errstate(over="ignore"):
        assert np.maximum(h(244.9) ** 2 - h(2) * (h(244.9) * h(141.4)) + h(141.4) ** 2, h(0)) == 0


def test_precision_recall_takes_tensors_on_any_device():
    """The registry hands features as tensors; on a GPU they live there (np.asarray of one failed: a review,
    2026-12-06). A tensor that numpy cannot take (requires grad) stands in for a CUDA one here."""
    rng = np.random.default_rng(2)
    ref, sam = rng.standard_normal((30, 8)).astype(np.float32), rng.standard_normal((20, 8)).astype(np.float32)
    want = precision_recall(ref, sam)
    got = precision_recall(torch.from_numpy(ref).requires_grad_(), torch.from_numpy(sam).requires_grad_())
    assert got == want


def _photo_pair():
    import skimage.data

    img = skimage.data.astronaut()[100:164, 150:230].copy()  # 64 x 80, not square on purpose
    rng = np.random.default_rng(0)
    noisy = np.clip(img.astype(np.float64) + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
    return img, noisy


@pytest.mark.parametrize("shape", [(2, 3, 40, 37), (1, 1, 11, 6)])
def test_ssim_torchmetrics_is_torchmetrics(shape):
    """The authors' SSIM: torchmetrics' (the version installed here) with data_range=(-1, 1) on float images, out
    of range values included (clamped there), per image; ragged sides, one channel, the smallest reflect pad."""
    from torchmetrics.functional.image import structural_similarity_index_measure as tm_ssim

    from evaluation.paired_metrics import ssim_torchmetrics
    torch.manual_seed(0)
    x = torch.rand(shape, dtype=torch.float64) * 2 - 1
    for y in (x + 0.1 * torch.randn_like(x), 1.3 * x + 0.2, x.flip(-1)):
        theirs = tm_ssim(y, x, data_range=(-1.0, 1.0), reduction="none")
        torch.testing.assert_close(ssim_torchmetrics(y, x), theirs, rtol=0, atol=1e-12)


def test_psnr_ssim_match_skimage_on_a_real_photo():
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    from evaluation.tokenizer_metrics import psnr, ssim

    img, noisy = _photo_pair()
    a, b = torch.from_numpy(img[None]), torch.from_numpy(noisy[None])
    assert float(psnr(a, b)) == pytest.approx(peak_signal_noise_ratio(img, noisy, data_range=255), rel=1e-10)
    ref = structural_similarity(img, noisy, data_range=255, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                use_sample_covariance=False)
    assert float(ssim(a, b)) == pytest.approx(ref, rel=1e-7)
    assert float(ssim(a, a)) == pytest.approx(1.0)
    assert 0.2 < ref < 0.95
