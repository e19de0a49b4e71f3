"""bench/authors_vae.py, the harness that times the authors' VA-VAE training step, on a stand-in of their tree (their
code is carried to the GPU machine, never committed): their module layout (vavae/ldm, the taming package), a
LightningModule subclass whose training_step uses optimizers() / manual_backward / log, an LPIPS whose pretrained
loader would download, a config with disc_start 5001. It checks that the harness calls THEIR training_step, with
their optimizers, in a process of its own, that the downloads are replaced and disc_start is 0, that bench.vae_step
merges the result, and that a missing tree is a one-line error. (The real tree ran here by hand: the shipped
f16d32_vfdinov2.yaml, batch 1 on the CPU, 19 s a step.)"""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

FILES = {
    "LightningDiT/vavae/configs/f16d32_vfdinov2.yaml": """
        model:
          base_learning_rate: 1.0e-04
          target: ldm.models.autoencoder.AutoencoderKL
          params:
            embed_dim: 4
            lossconfig:
              target: ldm.modules.losses.LPIPSWithDiscriminator
              params: {disc_start: 5001}
            ddconfig: {resolution: 8, ch: 4}
        """,
    "LightningDiT/vavae/ldm/__init__.py": "",
    "LightningDiT/vavae/ldm/util.py": """
        import importlib
        def instantiate_from_config(config):
            module, cls = config["target"].rsplit(".", 1)
            return getattr(importlib.import_module(module), cls)(**config.get("params", dict()))
        """,
    "LightningDiT/vavae/ldm/models/__init__.py": "",
    "LightningDiT/vavae/ldm/models/foundation_models.py": """
        import timm
        def get_dinov2_encoder():
            return timm.create_model("hf-hub:timm/vit_large_patch14_dinov2.lvd142m", pretrained=True)
        """,
    "LightningDiT/vavae/ldm/models/autoencoder.py": """
        import torch
        import pytorch_lightning as pl
        from ldm.util import instantiate_from_config

        class AutoencoderKL(pl.LightningModule):
            def __init__(self, ddconfig, lossconfig, embed_dim):
                super().__init__()
                self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
                self.loss = instantiate_from_config(lossconfig)
                self.automatic_optimization = False
                print("their disc_start", lossconfig["params"]["disc_start"], "ch", ddconfig["ch"])

            def training_step(self, batch, batch_idx):
                x = batch["image"].permute(0, 3, 1, 2).contiguous()
                ae_opt, disc_opt = self.optimizers()
                aeloss = self.loss(x, self.conv(x), 0, self.global_step)
                ae_opt.zero_grad()
                self.manual_backward(aeloss)
                ae_opt.step()
                self.log("aeloss", aeloss, prog_bar=True)
                discloss = self.loss(x, self.conv(x).detach(), 1, self.global_step)
                disc_opt.zero_grad()
                self.manual_backward(discloss)
                disc_opt.step()
                print("their step", self.global_step, tuple(x.shape))

            def configure_optimizers(self):
                return [torch.optim.Adam(self.conv.parameters(), lr=self.learning_rate),
                        torch.optim.Adam(self.loss.parameters(), lr=self.learning_rate)], []
        """,
    "LightningDiT/vavae/ldm/modules/__init__.py": "",
    "LightningDiT/vavae/ldm/modules/losses.py": """
        import torch
        from taming.modules.losses.lpips import LPIPS

        class LPIPSWithDiscriminator(torch.nn.Module):
            def __init__(self, disc_start):
                super().__init__()
                self.perceptual_loss = LPIPS()
                self.disc = torch.nn.Conv2d(3, 1, 3)

            def forward(self, x, rec, optimizer_idx, global_step):
                if optimizer_idx == 0:
                    return (x - rec).abs().mean() + self.perceptual_loss(x, rec) - self.disc(rec).mean()
                return torch.relu(1 - self.disc(x)).mean() + torch.relu(1 + self.disc(rec)).mean()
        """,
    "taming/__init__.py": "",
    "taming/modules/__init__.py": "",
    "taming/modules/losses/__init__.py": "",
    "taming/modules/losses/lpips.py": """
        import torch
        from torchvision import models

        class LPIPS(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.net = models.vgg16(pretrained=True).features[:4]
                self.load_from_pretrained()

            def load_from_pretrained(self, name="vgg_lpips"):
                raise RuntimeError("would download the LPIPS weights")

            def forward(self, x, y):
                return (self.net(x) - self.net(y)).pow(2).mean()
        """,
}


def _tree(root: Path) -> Path:
    for rel, text in FILES.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text).lstrip())
    return root


def test_their_training_step_runs_with_the_stand_ins(tmp_path):
    authors, out = _tree(tmp_path / "authors"), tmp_path / "authors_vae.json"
    res = subprocess.run([sys.executable, "-m", "bench.authors_vae", "--authors", str(authors), "--out", str(out),
                          "--batch", "2", "--max-batch", "4", "--warmup", "1", "--steps", "2", "--budget-s", "100",
                          "--device", "cpu", "--ddconfig", '{"ch": 8}'], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "their disc_start 0 ch 8" in res.stdout  # the discriminator from step 0; --ddconfig merged
    steps = [l for l in res.stdout.splitlines() if l.startswith("their step")]
    # their own step: batch 2 (1 warm-up + 2 timed), then batch 4 (1 + 2), global_step counting on; (B, H, W, C) in
    assert steps == [f"their step {i} {shape}" for i, shape in
                     enumerate([(2, 3, 8, 8)] * 3 + [(4, 3, 8, 8)] * 3)], steps
    r = json.loads(out.read_text())
    assert r["batch_2"]["img_per_s"] > 0 and r["largest"]["batch"] == 4 and r["resolution"] == 8
    assert set(r["stand_ins"]) == {"pytorch_lightning", "vgg16", "dinov2"} and r["tf32"]["matmul"] is False
    assert r["environment"]["card"].startswith("cpu")


def test_a_missing_tree_is_one_line(tmp_path):
    res = subprocess.run([sys.executable, "-m", "bench.authors_vae", "--authors", str(tmp_path / "nowhere"),
                          "--out", str(tmp_path / "x.json"), "--device", "cpu"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "the authors' code is not in" in lines[0] and "prepare_gpu_carry.sh" in lines[0]


def test_vae_step_times_ours_beside_theirs(tmp_path, capsys):
    """bench.vae_step --authors: their step in its own process first, then ours; the JSON holds theirs and the
    ratio of our fastest mode to it, at the per-GPU batch and at the largest batches."""
    from bench import vae_step
    authors, out = _tree(tmp_path / "authors"), tmp_path / "vae_step.json"
    tiny = ["model.ch=32", "model.ch_mult=[1,2]", "model.resolution=32", "model.z_channels=4", "model.embed_dim=4",
            "model.attn_resolutions=[]", "foundation.name=random_tiny", "foundation.input_size=null",
            "loss.disc_ndf=8", "loss.perceptual_weight=0.0"]
    rc = vae_step.main(["--out", str(out), "--modes", "fp32,bf16", "--batch", "2", "--max-batch", "4", "--warmup", "1",
                        "--steps", "1", "--extract-batch", "0", "--budget-s", "1000", "--authors", str(authors),
                        "--authors-args", "--device cpu", *sum([["--set", s] for s in tiny], [])])
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["authors"]["batch_2"]["img_per_s"] > 0 and r["authors"]["largest"]["batch"] == 4
    ours = r["modes"][r["fastest"]]
    assert r["vs_authors_batch_2"] == round(ours["batch_2"]["img_per_s"] / r["authors"]["batch_2"]["img_per_s"], 2)
    assert r["vs_authors_largest"] > 0
    printed = capsys.readouterr().out
    assert "authors fp32     batch    2:" in printed and "against the authors' step:" in printed
    # their failure is recorded, ours still measured
    rc = vae_step.main(["--out", str(out), "--modes", "fp32", "--batch", "2", "--max-batch", "0", "--warmup", "1",
                        "--steps", "1", "--extract-batch", "0", "--authors", str(tmp_path / "nowhere"),
                        *sum([["--set", s] for s in tiny], [])])
    r = json.loads(out.read_text())
    assert rc == 0 and "rc 2" in r["authors"]["error"] and r["modes"]["fp32"]["batch_2"]["img_per_s"] > 0
