"""The metrics registry (evaluation.metrics): one interface, used by the trainer's evaluation hook, the
`evaluation.fid` command and the demo's classifier metric; a metric registered from outside is computed by all of
them; shared Inception features are computed once; samples of another size than the reference are refused."""
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluation import fid as fid_cli
from evaluation.metrics import (METRICS, SAMPLE_METRICS, EvalInputs, MetricError, compute_metrics, get_metric,
                                register_metric, score, unregister_metric)

TINY = dict(input_size=4, patch_size=1, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=3)


def docs_worked_example():
    """The MeanBrightness class of docs/evaluation.md's worked example, run from the docs' own text (so the docs
    stay right)."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "evaluation.md").read_text()
    code = text.split("## Adding a metric", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    namespace = {}
    exec(compile(code, "docs/evaluation.md", "exec"), namespace)
    return namespace["MeanBrightness"]


class ClassHistogram:
    """Reads labels and latents: how many samples per class, and the latents' shape as the metric sees it."""
    name = "class_histogram"
    needs = ("labels", "latents")
    outputs = ("num_classes_seen", "latent_channels")

    def compute(self, inputs):
        assert len(inputs.latents) == len(inputs.labels)
        return {"num_classes_seen": float(len(np.unique(inputs.labels))),
                "latent_channels": float(inputs.latents.shape[1])}


@pytest.fixture
def toy_metrics():
    register_metric(docs_worked_example())
    register_metric(ClassHistogram())
    yield
    unregister_metric("mean_brightness")
    unregister_metric("class_histogram")
    assert "mean_brightness" not in METRICS and "class_histogram" not in METRICS


def _pixel_features(calls):
    def features(images):  # a cheap stand-in for Inception: per-channel pixel statistics (+ spatial, logits)
        calls.append(len(images))
        x = torch.as_tensor(np.asarray(images)).double().flatten(1, 2)
        return {"pool": torch.cat([x.mean(1), x.std(1), x.amax(1), x.amin(1)], 1).numpy(),
                "spatial": torch.cat([x.mean(1), x.std(1)], 1).numpy(),
                "logits": torch.cat([x.mean(1), x.std(1), x.amax(1)], 1).numpy() / 50}
    return features


def _tiny_dit():
    from modeling import LightningDiT
    torch.manual_seed(0)
    m = LightningDiT(**TINY)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


def _tiny_vae():
    from modeling import AutoencoderKL
    torch.manual_seed(0)
    return AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), resolution=8, z_channels=4,
                         embed_dim=4).eval()  # 4x4 latents -> 8x8 images


def test_builtin_metrics_and_lookup_errors():
    assert {"fid", "sfid", "inception_score", "precision_recall", "psnr", "ssim", "lpips", "rfid",
            "classifier"} <= set(METRICS)
    assert get_metric("fid").needs == ("features", "reference")
    with pytest.raises(MetricError) as e:
        get_metric("fidd")
    msg = str(e.value)
    assert "'fidd'" in msg and "fid, inception_score" in msg and "\n" not in msg
    with pytest.raises(ValueError, match="already registered"):
        register_metric(get_metric("fid"))
    with pytest.raises(TypeError, match="not a metric"):
        register_metric(object())
    # a metric whose input the caller did not give: one line naming both
    with pytest.raises(MetricError, match="'psnr' needs 'originals'"):
        compute_metrics(["psnr"], EvalInputs(images=np.zeros((2, 8, 8, 3), np.uint8)))


def test_shared_features_computed_once_for_all_metrics():
    """fid, sfid, inception_score and precision_recall read one feature pass; the numbers are the formulas'."""
    from evaluation.adm_metrics import FIDStatistics, inception_score
    from evaluation.metrics import reference_from_arrays
    from evaluation.precision_recall import precision_recall

    rng = np.random.default_rng(0)
    ref_images = rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
    samples = rng.integers(0, 200, (10, 8, 8, 3), dtype=np.uint8)
    calls = []
    features = _pixel_features(calls)
    reference = reference_from_arrays(ref_images, None, features, with_images=True, source="ref")
    assert calls == [12] and reference["image_size"] == (8, 8)
    inputs = EvalInputs(images=samples, reference=reference, feature_fn=features)
    res = compute_metrics(SAMPLE_METRICS, inputs)
    assert calls == [12, 10]  # one pass over the samples for four metrics
    f, r = features(samples), features(ref_images)
    assert res["fid"] == FIDStatistics.from_features(f["pool"]).frechet_distance(reference["pool"])
    assert res["sfid"] == FIDStatistics.from_features(f["spatial"]).frechet_distance(
        FIDStatistics.from_features(r["spatial"]))
    assert res["inception_score"] == inception_score(f["logits"])
    assert (res["precision"], res["recall"]) == precision_recall(r["pool"], f["pool"])
    assert list(res) == ["fid", "sfid", "inception_score", "precision", "recall"] and not inputs.skipped
    # stored statistics only (no reference images): precision/recall is skipped with its reason, not an error
    stats_only = dict(reference, pool_features=None)
    inputs = EvalInputs(images=samples, reference=stats_only, feature_fn=features)
    res2 = compute_metrics(SAMPLE_METRICS, inputs)
    assert "precision" not in res2 and "no images" in inputs.skipped["precision_recall"]
    assert res2["fid"] == res["fid"]


def test_classifier_metric_as_the_demo_uses_it():
    from evaluation.classifier import SmallClassifier
    torch.manual_seed(0)
    clf = SmallClassifier(3).eval()
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2])
    ref = clf.reference_stats(images)
    assert score(["classifier"], images=images, labels=labels, classifier=clf,
                 classifier_reference=ref) == clf.evaluate(images, labels, ref)
    assert set(score(["classifier"], images=images, labels=labels, classifier=clf)) == {"class_acc"}


def test_toy_metric_through_the_trainer_hook(tmp_path, toy_metrics):
    """eval.metrics names a metric registered here: build_eval_fn computes it next to fid, with the labels and
    the sampled latents; the built-in ones keep their numbers."""
    from evaluation.train_eval import EvalSettings, build_eval_fn, reference_from_npz

    calls = []
    features = _pixel_features(calls)
    np.savez(tmp_path / "ref.npz", arr_0=np.random.default_rng(0).integers(0, 256, (12, 8, 8, 3), dtype=np.uint8))
    reference = reference_from_npz(tmp_path / "ref.npz", features)
    common = dict(every=10, num_samples=9, batch_size=4, steps=3, precision="fp32", grid=0,
                  ref_batch=str(tmp_path / "ref.npz"))
    vae, m = _tiny_vae(), _tiny_dit()
    s = EvalSettings(**common, metrics=["fid", "mean_brightness", "class_histogram"])
    calls.clear()
    res = build_eval_fn(s, vae=vae, device="cpu", features=features, reference=reference, log=None)(m, 10)
    assert calls == [4, 4, 1]  # the features of each sample batch, once
    assert list(res)[:4] == ["fid", "mean_brightness", "num_classes_seen", "latent_channels"]
    assert 0 < res["mean_brightness"] < 255 and res["num_classes_seen"] == 3 and res["latent_channels"] == 4
    default = build_eval_fn(EvalSettings(**common), vae=vae, device="cpu", features=features, reference=reference,
                            log=None)(m, 10)
    assert default["fid"] == res["fid"] and "mean_brightness" not in default
    assert {"sfid", "inception_score", "precision", "recall"} <= set(default)
    # no metric that needs Inception features: the hook never computes them
    calls.clear()
    only = build_eval_fn(EvalSettings(**common, metrics=["mean_brightness"]), vae=vae, device="cpu",
                         features=features, reference=reference, log=None)(m, 10)
    assert calls == [] and only["mean_brightness"] == res["mean_brightness"]
    # the demo's classifier metric through the same hook, its classifier handed in as an extra
    from evaluation.classifier import SmallClassifier
    clf = build_eval_fn(EvalSettings(**common, metrics=["classifier"]), vae=vae, device="cpu", features=features,
                        reference=reference, log=None, extras={"classifier": SmallClassifier(3)})(m, 10)
    assert 0.0 <= clf["class_acc"] <= 1.0


def test_trainer_hook_draws_a_stochastic_samplers_noise_the_same_at_every_evaluation(tmp_path, toy_metrics):
    """Euler-Maruyama's noise comes from a generator seeded per batch as evaluation.generate seeds it: the same
    model evaluated twice gives the same numbers (before: the global generator, another FID each time)."""
    from evaluation.train_eval import EvalSettings, build_eval_fn, reference_from_npz
    features = _pixel_features([])
    np.savez(tmp_path / "ref.npz", arr_0=np.random.default_rng(0).integers(0, 256, (12, 8, 8, 3), dtype=np.uint8))
    reference = reference_from_npz(tmp_path / "ref.npz", features)
    s = EvalSettings(every=10, num_samples=6, batch_size=4, steps=6, precision="fp32", grid=0,
                     ref_batch=str(tmp_path / "ref.npz"), metrics=["fid", "mean_brightness"],
                     method="euler_maruyama")  # (6 points: its middle steps draw noise)
    fn = build_eval_fn(s, vae=_tiny_vae(), device="cpu", features=features, reference=reference, log=None)
    m = _tiny_dit()
    first = {k: v for k, v in fn(m, 10).items() if k != "eval_seconds"}
    torch.manual_seed(123)  # whatever the global generator holds
    assert {k: v for k, v in fn(m, 20).items() if k != "eval_seconds"} == first


def test_trainer_hook_refuses_bad_metrics_before_sampling(tmp_path):
    from evaluation.train_eval import EvalSettings, build_eval_fn
    from modeling.config import ConfigError

    features = _pixel_features([])
    np.savez(tmp_path / "ref.npz", arr_0=np.random.default_rng(0).integers(0, 256, (12, 8, 8, 3), dtype=np.uint8))
    common = dict(every=10, num_samples=9, batch_size=4, steps=3, precision="fp32", grid=0,
                  ref_batch=str(tmp_path / "ref.npz"))
    with pytest.raises(ConfigError, match=r"eval.metrics: unknown metric 'fidd'; known: .*precision_recall"):
        build_eval_fn(EvalSettings(**common, metrics=["fid", "fidd"]), vae=_tiny_vae(), device="cpu",
                      features=features, log=None)
    with pytest.raises(ConfigError, match="'psnr' needs 'originals', which the trainer's evaluation does not"):
        build_eval_fn(EvalSettings(**common, metrics=["psnr"]), vae=_tiny_vae(), device="cpu",
                      features=features, log=None)
    with pytest.raises(ConfigError, match="'classifier' needs 'classifier'"):
        build_eval_fn(EvalSettings(**common, metrics=["classifier"]), vae=_tiny_vae(), device="cpu",
                      features=features, log=None)


def test_trainer_hook_refuses_a_reference_of_another_size(tmp_path):
    """8 px samples against a 16 px reference batch: refused, naming both sizes (it used to give a number)."""
    from evaluation.train_eval import EvalSettings, build_eval_fn
    from modeling.config import ConfigError

    ref = tmp_path / "ref16.npz"
    np.savez(ref, arr_0=np.random.default_rng(0).integers(0, 256, (12, 16, 16, 3), dtype=np.uint8))
    fn = build_eval_fn(EvalSettings(every=10, num_samples=9, batch_size=4, steps=3, precision="fp32", grid=0,
                                    ref_batch=str(ref)), vae=_tiny_vae(), device="cpu",
                       features=_pixel_features([]), log=None)
    with pytest.raises(ConfigError, match=r"8x8 px but the reference batch .*ref16.npz is 16x16 px"):
        fn(_tiny_dit(), 10)


def _npz(path, images, **more):
    np.savez(path, arr_0=images, **more)
    return str(path)


def test_toy_metric_through_the_fid_command(tmp_path, capsys, toy_metrics):
    """`--metrics` picks registered metrics; without an Inception-based one no Inception is loaded at all."""
    import json
    rng = np.random.default_rng(0)
    ref = _npz(tmp_path / "ref.npz", rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8))
    images = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    sam = _npz(tmp_path / "sam.npz", images, arr_1=np.array([0, 1, 1, 2]))
    lat_free = tmp_path / "out.json"
    assert fid_cli.main([ref, sam, "--metrics", "mean_brightness", "--device", "cpu", "--json", str(lat_free),
                         "--inception", str(tmp_path / "no-such-inception.pth")]) == 0
    out = capsys.readouterr().out
    assert f"mean_brightness: {float(images.mean())}" in out and "inception_backend: None" in out
    rec = json.loads(lat_free.read_text())
    assert rec["mean_brightness"] == float(images.mean()) and rec["metrics"] == ["mean_brightness"]
    assert "fid" not in rec
    # a sample batch storing statistics (the ADM evaluator would take them): said to be unused
    with_stats = _npz(tmp_path / "sam_stats.npz", images, mu=np.zeros(3), sigma=np.eye(3))
    assert fid_cli.main([ref, with_stats, "--metrics", "mean_brightness", "--device", "cpu"]) == 0
    assert f"sample batch {with_stats} stores mu, sigma: not used" in capsys.readouterr().out
    # class_histogram needs latents, which an npz batch does not carry: one line, exit 2
    with pytest.raises(SystemExit) as e:
        fid_cli.main([ref, sam, "--metrics", "class_histogram", "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "'class_histogram' needs 'latents'" in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as e:
        fid_cli.main([ref, sam, "--metrics", "fid,fidd", "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: --metrics: unknown metric 'fidd'; known: ")
    assert "mean_brightness" in err and err.count("\n") == 1


def test_a_folder_of_sample_images_is_a_sample_batch(tmp_path, capsys, toy_metrics):
    """The authors' inference.py writes 000000.png, ...; their save_npz stacks them in that order: the fid command
    reads such a folder as the same batch (its record: the images' count and a hash of them), and refuses one
    whose images differ in size or are not RGB, naming the file."""
    import json

    from PIL import Image
    rng = np.random.default_rng(0)
    ref = _npz(tmp_path / "ref.npz", rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8))
    images = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    (tmp_path / "samples").mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im).save(tmp_path / "samples" / f"{i:06d}.png")
    as_npz = _npz(tmp_path / "sam.npz", images)
    for sam in (as_npz, str(tmp_path / "samples")):
        assert fid_cli.main([ref, sam, "--metrics", "mean_brightness", "--device", "cpu", "--json",
                             str(tmp_path / "r.json")]) == 0
        assert f"mean_brightness: {float(images.mean())}" in capsys.readouterr().out
    rec = json.loads((tmp_path / "r.json").read_text())["compared"]["samples"]
    assert rec["path"] == str(tmp_path / "samples") and rec["images"] == 4 and len(rec["sha256"]) == 64
    Image.fromarray(images[0][:8]).save(tmp_path / "samples" / "000004.png")
    with pytest.raises(SystemExit) as e:
        fid_cli.main([ref, str(tmp_path / "samples"), "--metrics", "mean_brightness", "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "000004.png is uint8 (8, 16, 3)" in err and err.count("\n") == 1


def test_fid_command_refuses_samples_of_another_size(tmp_path, capsys):
    """Issue 21: FID of 16 px samples against a 32 px reference batch used to print a number. Now: one line
    naming both files and sizes, exit 2, before any network is loaded."""
    rng = np.random.default_rng(0)
    ref = _npz(tmp_path / "ref32.npz", rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8))
    sam = _npz(tmp_path / "sam16.npz", rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8))
    with pytest.raises(SystemExit) as e:
        fid_cli.main([ref, sam, "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"the images of sample batch {sam} are 16x16 px but the reference batch {ref} is 32x32 px" in err


def test_trainer_command_refuses_an_unknown_metric_in_one_line(tmp_path, capsys):
    """`eval.metrics=[fid,fidd]` on the trainer's command line: exit 2 and one line naming it, before any model
    loads or a step runs."""
    from train.train_dit import main
    root = Path(__file__).resolve().parents[1]
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=np.random.default_rng(0).integers(0, 256, (6, 128, 128, 3), dtype=np.uint8))
    rc = main(["--config", str(root / "configs/dit_tiny_cpu.yaml"), f"checkpoint.dir={tmp_path}/ckpt",
               f"logging.dir={tmp_path}/run", "logging.tensorboard=false", "train.steps=2", "eval.every=2",
               f"eval.ref_batch={ref}", f"eval.vae={tmp_path}/no-vae-needed-yet", "eval.metrics=[fid,fidd]"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "eval.metrics: unknown metric 'fidd'; known: " in err
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())


def test_trainer_hook_names_a_malformed_reference_batch(tmp_path):
    from evaluation.batches import BatchFileError
    from evaluation.train_eval import EvalSettings, build_eval_fn

    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=np.random.default_rng(0).random((6, 8, 8, 3)))  # float pixels
    with pytest.raises(BatchFileError, match=f"reference batch {ref}: arr_0 is float64; expected uint8"):
        build_eval_fn(EvalSettings(every=10, num_samples=9, batch_size=4, steps=3, precision="fp32", grid=0,
                                   ref_batch=str(ref)), vae=_tiny_vae(), device="cpu",
                      features=_pixel_features([]), log=None)
