"""bench/authors_dit.py, the harness that times the authors' DiT training step, on a stand-in of their tree (their
code is carried to the GPU machine, never committed): their layout (models/lightningdit.py importing timm and, via
rmsnorm, fairscale; transport/; train.py importing packages this machine lacks; the 64-epoch reproduction config).
It checks that the harness runs THEIR model, transport and update_ema (from their train.py's own source) with their
config's settings, under bf16 autocast with fp32 outputs, in a process of its own, that absent packages get the
stand-ins it reports, and that a missing tree is a one-line error. (The real tree ran here by hand: a 1-block
64-wide model, batch 2 on the CPU, their @torch.compile blocks included.)"""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

FILES = {
    "LightningDiT/configs/reproductions/lightningdit_xl_vavae_f16d32_64ep_cfg.yaml": """
        data: {image_size: 64, num_classes: 7}
        vae: {downsample_ratio: 16}
        model: {model_type: LightningDiT-XL/1, use_qknorm: false, use_swiglu: true, use_rope: true,
                use_rmsnorm: true, wo_shift: false, in_chans: 3}
        transport: {path_type: Linear, prediction: velocity, loss_weight: null, sample_eps: null, train_eps: null,
                    use_cosine_loss: true, use_lognorm: true}
        optimizer: {lr: 0.0002, beta2: 0.95}
        """,
    "LightningDiT/models/__init__.py": "",
    "LightningDiT/models/rmsnorm.py": """
        import fairscale.nn.model_parallel.initialize as fs_init
        from fairscale.nn.model_parallel.layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear
        """,
    "LightningDiT/models/lightningdit.py": """
        import torch
        from timm.models.vision_transformer import PatchEmbed, Mlp
        from models.rmsnorm import *

        class LightningDiT(torch.nn.Module):
            def __init__(self, input_size=32, patch_size=2, in_channels=32, hidden_size=1152, depth=28, num_heads=16,
                         num_classes=1000, **flags):
                super().__init__()
                print("their LightningDiT", input_size, patch_size, in_channels, hidden_size, num_classes,
                      sorted(flags.items()))
                self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
                self.y_embedder = torch.nn.Embedding(num_classes, hidden_size)
                self.out = torch.nn.Linear(hidden_size, in_channels * patch_size ** 2)
                self.p = patch_size

            def forward(self, x, t=None, y=None):
                h = self.x_embedder(x) + self.y_embedder(y)[:, None] + t[:, None, None]
                o = self.out(h)
                print("forward dtype", o.dtype)
                B, N, C = o.shape
                s = int(N ** 0.5)
                return o.transpose(1, 2).reshape(B, C, s, s)

        def LightningDiT_XL_1(**kwargs):
            return LightningDiT(depth=28, hidden_size=24, patch_size=1, num_heads=2, **kwargs)

        LightningDiT_models = {"LightningDiT-XL/1": LightningDiT_XL_1}
        """,
    "LightningDiT/transport/__init__.py": """
        import torch

        class Transport:
            def __init__(self, *args, **kw):
                print("their transport", args, sorted(kw.items()))

            def training_losses(self, model, x1, model_kwargs=None):
                t = torch.rand(x1.shape[0], device=x1.device)
                x0 = torch.randn_like(x1)
                xt, ut = t.view(-1, 1, 1, 1) * x1 + (1 - t.view(-1, 1, 1, 1)) * x0, x1 - x0
                out = model(xt, t, **model_kwargs)
                print("model output dtype", out.dtype)
                cos = 1 - torch.nn.functional.cosine_similarity(out, ut, dim=1)
                return {"loss": ((out - ut) ** 2).flatten(1).mean(1), "cos_loss": cos.flatten(1).mean(1)}

        def create_transport(*args, **kw):
            return Transport(*args, **kw)
        """,
    "LightningDiT/train.py": """
        import diffusers  # their train.py imports it at the top: the harness must not import this module
        import torch
        from collections import OrderedDict

        @torch.no_grad()
        def update_ema(ema_model, model, decay=0.9999):
            print("their update_ema", decay)
            ema_params = OrderedDict(ema_model.named_parameters())
            model_params = OrderedDict(model.named_parameters())
            for name, param in model_params.items():
                name = name.replace("module.", "")
                ema_params[name].mul_(decay).add_(param.data, alpha=1 - decay)
        """,
}


def make_tree(root: Path) -> Path:
    for rel, text in FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(textwrap.dedent(text))
    (root / "LightningDiT" / "COMMIT").write_text("0123abcd\n")
    return root


def run(args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "bench.authors_dit", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_times_their_step_from_their_tree(tmp_path):
    root = make_tree(tmp_path / "authors")
    out = tmp_path / "authors_dit.json"
    res = run(["--authors", str(root), "--out", str(out), "--device", "cpu", "--batch", "3", "--warmup", "1",
               "--steps", "2"])
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["batch"] == 3 and r["steps"] == 2 and r["img_per_s"] > 0 and len(r["losses"]) == 3
    assert r["model"] == "LightningDiT-XL/1" and r["authors_commit"] == "0123abcd"
    assert r["their_torch_compile"] == "on"  # their blocks' own @torch.compile, as they run it
    from evaluation.provenance import ENVIRONMENT_KEYS
    assert tuple(r["environment"]) == ENVIRONMENT_KEYS  # the common record: card, versions, our commit
    lines = res.stdout.splitlines()
    # their model from their config: 64 px / 16 = 4 latent tokens a side, 3 channels, 7 classes, their flags
    built = next(l for l in lines if l.startswith("their LightningDiT"))
    assert built.startswith("their LightningDiT 4 1 3 24 7") and "('use_swiglu', True)" in built
    assert "('use_checkpoint', False)" in built
    assert any(l.startswith("their transport ('Linear', 'velocity', None, None, None)") and "'use_lognorm', True" in l
               for l in lines)
    # their update_ema, from train.py's own source (the module imports diffusers): once at decay 0, then every step
    assert [l for l in lines if l.startswith("their update_ema")] == ["their update_ema 0"] + [
        "their update_ema 0.9999"] * 3
    # accelerate's bf16: the forward under autocast, its output handed to the loss in fp32
    assert "forward dtype torch.bfloat16" in lines and "model output dtype torch.float32" in lines
    assert r["stand_ins"]["timm"].startswith(("installed", "stand-in"))
    assert r["stand_ins"]["fairscale"].startswith(("installed", "stand-in"))


def test_missing_tree_is_one_line(tmp_path):
    res = run(["--authors", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.json"), "--device", "cpu"])
    err = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(err) == 1 and "prepare_gpu_carry.sh" in err[0] and "train.py" in err[0]


def test_gpu_suite_section_runs_it_in_its_own_process(tmp_path, monkeypatch):
    """Part A's `authors_dit` section: the harness in a subprocess (smoke: the CPU, a tiny model), its JSON as the
    section's result; without their tree, a skip that says what to carry."""
    from bench import gpu_suite
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    (tmp_path / "out").mkdir()
    r = gpu_suite.authors_dit(True, root=make_tree(tmp_path / "authors"))
    assert r["batch"] == 2 and r["img_per_s"] > 0 and r["model"] == "custom"
    # the CPU smoke times the harness, not their compiled code: their @torch.compile off, and the record says so
    assert r["their_torch_compile"] == "off (TORCH_COMPILE_DISABLE)"
    assert r["environment"]["card"].startswith("cpu")  # the common record (evaluation.provenance)
    assert (tmp_path / "out" / "authors_dit.json").is_file()
    skipped = gpu_suite.authors_dit(True, root=tmp_path / "none")
    assert "prepare_gpu_carry.sh" in skipped["skipped"]
