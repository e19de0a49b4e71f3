"""Evaluation metrics behind one small interface and one registry.

A metric is any object with

    name: str                       the registry key, e.g. "fid"
    needs: tuple[str, ...]          what it reads from the EvalInputs (the words below)
    outputs: tuple[str, ...]        the keys compute() returns, e.g. ("precision", "recall")
    compute(inputs) -> dict[str, float]
    unavailable(inputs) -> str | None   (optional) why these inputs cannot give it: the metric is skipped,
                                        with that reason, instead of failing (e.g. IS without softmax weights)

What a metric can need (EvalInputs fields, filled by the caller):
    images            the images scored, uint8 (N, H, W, 3): generated samples, or a tokenizer's reconstructions
    labels            the class each image was generated for, int (N,)
    latents           the sampled latents as the VA-VAE decoded them, float32 (N, C, h, w) (the trainer's hook)
    features          Inception features of `images` {"pool", "spatial", "logits"}: computed once per evaluation
                      and shared by every metric that needs them (fid, sfid, inception_score, precision_recall)
    reference         the reference batch (a Reference dict: pool / spatial statistics, pool features, size)
    reference_features  per-image pool features of the reference's images (precision_recall): the callers
                      compute them only when a selected metric needs this; a reference with stored statistics
                      and no images has none (the metric then says it is unavailable)
    originals         the real images that `images` reconstruct, pairwise (psnr, ssim, lpips, rfid)
    original_features Inception features of `originals` (rfid)
    any other word    an entry of EvalInputs.extras that the caller hands in (e.g. "classifier", "lpips")

`compute_metrics(["fid", "precision_recall"], inputs)` runs them (`score(names, images=..., **extras)` builds the
EvalInputs from keywords). The callers: `python -m evaluation.fid
--metrics ...`, the trainer's periodic evaluation (`eval.metrics`, evaluation/train_eval.py), `python -m
evaluation.tokenizer_metrics`, and examples/demo.py (the classifier metric).

Adding a metric: one file with the class (it need not import this module) and one line in BUILTIN below, or
`register_metric(obj)` at run time from your own code. docs/evaluation.md has a worked example.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Protocol, TypedDict, Union, runtime_checkable

import numpy as np

from modeling.config import ConfigError

from .adm_metrics import FID, SFID, FIDStatistics, InceptionScore, compute_activations
from .classifier import ClassifierMetric
from .paired_metrics import PSNR, RFID, SSIM, LPIPSMetric
from .precision_recall import PrecisionRecall

FeatureFn = Callable[[np.ndarray], dict]   # uint8 images (N, H, W, 3) -> {"pool": (N, D) array, ...}


class MetricError(ConfigError):
    """An unknown metric name, or a metric whose inputs the caller cannot provide (one line, exit 2)."""


@runtime_checkable
class Metric(Protocol):
    """The interface (see the module docstring); `unavailable(inputs)` is optional."""
    name: str
    needs: tuple[str, ...]
    outputs: tuple[str, ...]

    def compute(self, inputs: "EvalInputs") -> dict[str, float]: ...


class Reference(TypedDict, total=False):
    """A reference batch as the metrics read it."""
    pool: FIDStatistics                   # pool3 statistics (stored in the npz, else from its images)
    spatial: Optional[FIDStatistics]      # mixed_6/conv statistics (sFID), if known
    pool_features: Optional[np.ndarray]   # per-image pool3 features (precision / recall), if it has images
    source: str                           # where it came from (named in errors)
    num_images: int
    image_size: Optional[tuple[int, int]]  # (H, W) of its images; None for stored statistics only


@dataclass
class EvalInputs:
    """Everything the metrics of one evaluation may read; expensive shared work is done once, on first use."""
    images: Optional[np.ndarray] = None
    labels: Optional[np.ndarray] = None
    latents: Optional[np.ndarray] = None
    reference: Optional[Reference] = None
    originals: Optional[np.ndarray] = None
    feature_fn: Optional[FeatureFn] = None       # computes `features` when a metric asks and none were given
    features: Optional[dict] = None              # Inception features of `images`, when already computed
    extras: dict = field(default_factory=dict)   # caller-provided objects by name ("classifier", "lpips", ...)
    device: Any = "cpu"
    batch_size: int = 64
    progress: bool = False
    images_source: str = "the samples"           # how errors name the images (a file, "the evaluation samples")
    image_size: Optional[tuple[int, int]] = None  # (H, W) of the images when `images` itself is not kept
    skipped: dict = field(default_factory=dict)  # filled by compute_metrics: {metric name: reason}
    _original_features: Optional[dict] = field(default=None, repr=False)

    def provides(self, need: str) -> bool:
        """Whether this evaluation can give `need` (one of the words in the module docstring)."""
        if need == "features":
            return self.features is not None or (self.feature_fn is not None and self.images is not None)
        if need == "original_features":
            return self.feature_fn is not None and self.originals is not None
        if need == "reference_features":  # built with the reference when a selected metric needs them
            return self.reference is not None
        if need in ("images", "labels", "latents", "reference", "originals"):
            return getattr(self, need) is not None
        return need in self.extras

    def sample_features(self) -> dict:
        """Inception features of `images` (computed once, then shared)."""
        if self.features is None:
            self.features = self.feature_fn(self.images)
        return self.features

    def original_features(self) -> dict:
        """Inception features of `originals` (computed once, then shared)."""
        if self._original_features is None:
            self._original_features = self.feature_fn(self.originals)
        return self._original_features

    def size(self) -> Optional[tuple[int, int]]:
        return tuple(self.images.shape[1:3]) if self.images is not None else self.image_size


# ----------------------------------------------------------------------------- the registry

METRICS: dict[str, Metric] = {}


def register_metric(metric: Any) -> Any:
    """Add a metric (an instance, or a class that is instantiated with no arguments) under metric.name; returns
    what it was given, so it also works as a class decorator. A name already taken is an error."""
    obj = metric() if isinstance(metric, type) else metric
    if not isinstance(obj, Metric) or not isinstance(obj.name, str) or not obj.name:
        raise TypeError(f"{metric!r} is not a metric: it needs a name, needs, outputs and compute(inputs)")
    if obj.name in METRICS:
        raise ValueError(f"a metric named {obj.name!r} is already registered ({METRICS[obj.name]!r})")
    METRICS[obj.name] = obj
    return metric


def unregister_metric(name: str) -> None:
    """Remove a metric (tests register toy ones)."""
    METRICS.pop(name, None)


def get_metric(name: str, where: str = "metrics") -> Metric:
    """The registered metric `name`; an unknown name is a MetricError naming the known ones."""
    if name not in METRICS:
        raise MetricError(f"{where}: unknown metric {name!r}; known: {', '.join(sorted(METRICS))}")
    return METRICS[name]


def resolve_metrics(names: Union[str, Iterable[str]], where: str = "metrics") -> list[Metric]:
    """Metrics by name, in order, each once; names may be a comma-separated string ("fid,sfid")."""
    if isinstance(names, str):
        names = names.split(",")
    names = list(dict.fromkeys(n.strip() for n in names if n.strip()))
    if not names:
        raise MetricError(f"{where}: no metric selected; known: {', '.join(sorted(METRICS))}")
    return [get_metric(n, where) for n in names]


def check_needs(metrics: Iterable[Metric], provided: Callable[[str], bool], where: str, how: str) -> None:
    """A MetricError for the first metric that needs something `provided(need)` says is missing."""
    for m in metrics:
        for need in m.needs:
            if not provided(need):
                raise MetricError(f"{where}: metric {m.name!r} needs {need!r}, which {how} does not provide")


def check_sizes(inputs: EvalInputs) -> None:
    """Samples and reference must have the same image size: an FID across sizes measures the resize, not the
    model (16 px samples against a 32 px reference give a large number and no hint why)."""
    ref = inputs.reference
    size, ref_size = inputs.size(), (ref or {}).get("image_size")
    if size is not None and ref_size is not None and tuple(size) != tuple(ref_size):
        raise MetricError(f"{inputs.images_source} are {size[0]}x{size[1]} px but the reference batch "
                          f"{ref.get('source', '')} is {ref_size[0]}x{ref_size[1]} px: compare images of one size "
                          "(generate at the reference's size, or use a reference batch of the samples' size)")


def compute_metrics(metrics: Union[str, Iterable[Union[str, Metric]]], inputs: EvalInputs,
                    where: str = "metrics") -> dict[str, float]:
    """Run the metrics on one EvalInputs; returns their outputs merged in order. A metric whose inputs are missing
    is an error; one that says it is unavailable on these inputs is skipped (inputs.skipped has why)."""
    metrics = (resolve_metrics(metrics, where) if isinstance(metrics, str)
               else [get_metric(m, where) if isinstance(m, str) else m for m in metrics])
    check_needs(metrics, inputs.provides, where, "this evaluation")
    if any("reference" in m.needs for m in metrics):
        check_sizes(inputs)
    out: dict[str, float] = {}
    for m in metrics:
        why = m.unavailable(inputs) if hasattr(m, "unavailable") else None
        if why:
            inputs.skipped[m.name] = why
            continue
        out.update(m.compute(inputs))
    return out


def score(metrics: Union[str, Iterable[Union[str, Metric]]], **inputs: Any) -> dict[str, float]:
    """compute_metrics with the EvalInputs fields as keywords; any other keyword is an extra, e.g.
    score(["classifier"], images=samples, labels=labels, classifier=clf, classifier_reference=ref_stats)."""
    names = {f.name for f in dataclasses.fields(EvalInputs)}
    known = {k: v for k, v in inputs.items() if k in names}
    extras = {**known.pop("extras", {}), **{k: v for k, v in inputs.items() if k not in names}}
    return compute_metrics(metrics, EvalInputs(**known, extras=extras))


# Every built-in metric, one line each: adding a metric is a file with its class plus a line here.
BUILTIN = (
    FID(),              # fid (ADM evaluator) ......................... evaluation/adm_metrics.py
    SFID(),             # sfid
    InceptionScore(),   # inception_score
    PrecisionRecall(),  # precision, recall ........................... evaluation/precision_recall.py
    PSNR(),             # psnr (tokenizer reconstructions) ............. evaluation/paired_metrics.py
    SSIM(),             # ssim
    LPIPSMetric(),      # lpips
    RFID(),             # rfid
    ClassifierMetric(),  # class_acc, fd (the demo's classifier) ....... evaluation/classifier.py
)
for _m in BUILTIN:
    register_metric(_m)

SAMPLE_METRICS = ("fid", "sfid", "inception_score", "precision_recall")   # evaluation.fid and eval.metrics default
TOKENIZER_METRICS = ("psnr", "ssim", "lpips", "rfid")                       # evaluation.tokenizer_metrics


# ----------------------------------------------------------------------------- shared feature extraction

def inception_features(path: Optional[Union[str, Path]] = None, device: Any = "cpu",
                       batch_size: int = 64) -> FeatureFn:
    """features(images uint8 (N, H, W, 3)) -> {"pool", "spatial", ["logits"]} numpy, with the evaluator's
    Inception (loaded once; `.backend` says which weights)."""
    from .inception import load_inception
    model, backend = load_inception(path, device=device)

    def features(images: np.ndarray) -> dict:
        return compute_activations(model, np.asarray(images), batch_size, device)
    features.backend = backend
    return features


def reference_from_arrays(images: Optional[np.ndarray], stats: Optional[tuple], features: Optional[FeatureFn],
                          with_images: bool = True, source: str = "") -> Reference:
    """A Reference from a batch's images and/or stored (pool, spatial) statistics; its images' features are
    computed (with `features`) when statistics are missing or `with_images` (precision / recall needs them)."""
    need = images is not None and len(images) and (stats is None or with_images)
    feats = features(images) if need else None
    if stats is None:
        stats = (FIDStatistics.from_features(feats["pool"]),
                 FIDStatistics.from_features(feats["spatial"]) if "spatial" in feats else None)
    return {"pool": stats[0], "spatial": stats[1], "pool_features": feats["pool"] if feats is not None else None,
            "source": source, "num_images": int(len(images)) if images is not None else 0,
            "image_size": tuple(images.shape[1:3]) if images is not None else None}


def reference_from_npz(npz_path: Union[str, Path], features: Optional[FeatureFn],
                       with_images: bool = True) -> Reference:
    """The Reference of an ADM-format npz (its stored mu/sigma when present, else the statistics of its images;
    a malformed file is a BatchFileError naming it)."""
    from .batches import read_reference_batch
    images, stats = read_reference_batch(npz_path)
    return reference_from_arrays(images, stats, features, with_images, source=str(npz_path))
