"""An offline metric for the embedded default: a small CNN classifier trained on the dataset's real crops.

The embedded dataset has no Inception-scale reference, so the demo's convergence curve uses this
classifier instead: `class_acc` = fraction of generated samples classified as the label they were
generated for (chance = 1 / num_classes), and `fd` = Frechet distance between the classifier's
penultimate-layer features (128-d) of the samples and of the real images (robust float64 form of
evaluation.fid). It measures "does a sample look like its class", not ImageNet FID.

    clf, info = train_classifier(images, labels, num_classes)    # uint8 (N, H, W, 3), a few seconds
    ref = clf.reference_stats(images)
    clf.evaluate(samples, sample_labels, ref) -> {"class_acc": ..., "fd": ...}

The registry's `classifier` metric (evaluation.metrics) is ClassifierMetric at the end: it reads the classifier
from inputs.extras["classifier"] and the real images' statistics from inputs.extras["classifier_reference"].
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .adm_metrics import FIDStatistics

INPUT = 32


def _to_input(images: Any) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, 32, 32) in [-1, 1] (area resize: no aliasing)."""
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x if x.shape[-1] == INPUT else F.interpolate(x, size=(INPUT, INPUT), mode="area")


class SmallClassifier(nn.Module):
    """Four stride-2 conv + BN + ReLU layers, global average pool (the 128-d features), a linear head."""

    def __init__(self, num_classes: int, width: int = 32, feat_dim: int = 128) -> None:
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, feat_dim]
        layers = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(feat_dim, num_classes)
        self.num_classes = num_classes

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @torch.no_grad()
    def predict(self, images: Any, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images -> (logits, features) as float64 numpy arrays."""
        self.eval()
        logits, feats = [], []
        for i in range(0, len(images), batch_size):
            f = self.features(_to_input(images[i:i + batch_size]))
            feats.append(f.double())
            logits.append(self.head(f).double())
        return torch.cat(logits).numpy(), torch.cat(feats).numpy()

    def reference_stats(self, images: Any) -> FIDStatistics:
        return FIDStatistics.from_features(self.predict(images)[1])

    def evaluate(self, images: Any, labels: Any, ref_stats: Optional[FIDStatistics]) -> dict[str, float]:
        """{"class_acc": fraction classified as their label, "fd": feature Frechet distance to ref_stats (when
        given)}."""
        logits, feats = self.predict(images)
        acc = float((logits.argmax(1) == np.asarray(labels)).mean())
        if ref_stats is None:
            return {"class_acc": acc}
        return {"class_acc": acc, "fd": FIDStatistics.from_features(feats).frechet_distance(ref_stats)}


def _augment(x, g, flip=True):
    """Random resized crop (scale 0.5-1, via an affine grid), mirror (unless flip=False: digits), brightness/
    contrast and blur: the classifier should judge content, not the exact crop or the decoder's softness."""
    b = x.shape[0]
    scale = torch.empty(b).uniform_(0.7, 1.0, generator=g)
    tx = (torch.rand(b, generator=g) * 2 - 1) * (1 - scale)
    ty = (torch.rand(b, generator=g) * 2 - 1) * (1 - scale)
    mirror = torch.where(torch.rand(b, generator=g) < 0.5, -1.0, 1.0) if flip else torch.ones(b)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, 0, 2], theta[:, 1, 2] = scale * mirror, scale, tx, ty
    x = F.grid_sample(x, F.affine_grid(theta, x.shape, align_corners=False), align_corners=False)
    x = x * torch.empty(b, 1, 1, 1).uniform_(0.8, 1.2, generator=g) + torch.empty(b, 1, 1, 1).uniform_(
        -0.15, 0.15, generator=g)
    blur = torch.rand(b, generator=g) < 0.5
    if blur.any():
        k = torch.tensor([1.0, 2.0, 1.0])
        k = (k[:, None] * k[None]) / 16
        x[blur] = F.conv2d(F.pad(x[blur], (1, 1, 1, 1), mode="replicate"), k.expand(3, 1, 3, 3), groups=3)
    return x.clamp(-1, 1)


def train_classifier(images: Any, labels: Any, num_classes: int, steps: int = 200, batch_size: int = 32,
                     lr: float = 2e-3, holdout: float = 0.2, seed: int = 0, progress: bool = True,
                     flip: bool = True) -> tuple[SmallClassifier, dict]:
    """Train on (1 - holdout) of the real images; report accuracy on the held-out rest. flip=False: no mirror
    augmentation (classes that a mirror changes, e.g. digits).

    Returns (classifier, {"holdout_acc", "train_images", "holdout_images", "holdout_indices"}).
    """
    from modeling.progress import tracked

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    perm = torch.randperm(len(labels), generator=g)
    n_hold = int(math.floor(holdout * len(labels)))
    hold, train = perm[:n_hold], perm[n_hold:]
    x_all = _to_input(images)
    clf = SmallClassifier(num_classes)
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    clf.train()
    for _ in tracked(range(steps), "classifier", "step", enabled=progress):
        idx = train[torch.randint(len(train), (batch_size,), generator=g)]
        loss = F.cross_entropy(clf(_augment(x_all[idx], g, flip)), labels[idx], label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    clf.eval()
    info = {"train_images": int(len(train)), "holdout_images": int(n_hold), "holdout_indices": hold.tolist()}
    if n_hold:
        logits, _ = clf.predict(np.asarray(images)[hold.numpy()])
        info["holdout_acc"] = float((logits.argmax(1) == labels[hold].numpy()).mean())
    return clf, info


def load_image_folder(root: Union[str, Path], size: Optional[int] = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """An ImageFolder (root/<class>/*.jpg) -> (uint8 (N, H, W, 3), labels (N,), class names)."""
    from PIL import Image

    root = Path(root)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise FileNotFoundError(f"{root} has no class folders")
    images, labels = [], []
    for c, name in enumerate(classes):
        for f in sorted((root / name).iterdir()):
            if f.suffix.lower() not in (".jpg", ".jpeg", ".png"):
                continue
            with Image.open(f) as im:
                im = im.convert("RGB")
                if size is not None and im.size != (size, size):
                    im = im.resize((size, size), Image.BICUBIC)
                images.append(np.asarray(im))
            labels.append(c)
    return np.stack(images), np.asarray(labels), classes


class ClassifierMetric:
    """class_acc (and fd, when inputs.extras has "classifier_reference") of the samples under the demo's
    classifier (inputs.extras["classifier"], a SmallClassifier): does a sample look like its class?"""
    name = "classifier"
    needs = ("images", "labels", "classifier")
    outputs = ("class_acc", "fd")

    def compute(self, inputs: Any) -> dict[str, float]:
        return inputs.extras["classifier"].evaluate(inputs.images, inputs.labels,
                                                    inputs.extras.get("classifier_reference"))
