"""The demo's offline metric: a small classifier on the embedded dataset's real crops."""
import numpy as np
import pytest

from evaluation.classifier import load_image_folder, train_classifier
from train.data.embedded import write_embedded


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    root = tmp_path_factory.mktemp("embedded")
    write_embedded(root, size=32, per_class=10, seed=0)
    return load_image_folder(root)


def test_classifier_learns_the_classes_and_scores_samples(embedded):
    images, labels, classes = embedded
    assert images.shape == (140, 32, 32, 3) and len(classes) == 14
    clf, info = train_classifier(images, labels, len(classes), steps=80, progress=False)
    assert info["holdout_images"] == 28
    assert info["holdout_acc"] > 0.5  # chance is 1/14
    ref = clf.reference_stats(images)
    same = clf.evaluate(images, labels, ref)
    assert same["class_acc"] > 0.8 and abs(same["fd"]) < 1e-6
    shuffled = clf.evaluate(images, np.roll(labels, 10), ref)  # right images, wrong labels
    assert shuffled["class_acc"] < 0.3 and abs(shuffled["fd"]) < 1e-6
    rng = np.random.default_rng(0)
    noise = clf.evaluate(rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8), labels[:40], ref)
    assert noise["fd"] > 1.0


def test_image_folder_without_classes_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no class folders"):
        load_image_folder(tmp_path)
