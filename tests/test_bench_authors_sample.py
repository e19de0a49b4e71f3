"""bench/authors_sample.py, the harness that times the authors' sampler, on a stand-in of their tree (their code is
carried to the GPU machine, never committed): their layout (models/lightningdit.py with forward_with_cfg, transport/
with create_transport and Sampler.sample_ode, the 800-epoch reproduction config). It checks that the harness runs
THEIR sampler with their config's method, tolerances and shift at the timed number of grid points, THEIR
forward_with_cfg on the doubled batch with the null class and their cfg scale and interval, without gradients, with
TF32 matmuls as their inference.py sets them, that the time is scaled by model calls to their 250 points, that our
entries of the same run are put over theirs, and that a missing tree is one line. (The real tree ran here by hand:
their XL/1 at batch 1 on the CPU, their @torch.compile blocks included.)"""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

FILES = {
    "LightningDiT/configs/reproductions/lightningdit_xl_vavae_f16d32_800ep_cfg.yaml": """
        data: {image_size: 64, num_classes: 7}
        vae: {downsample_ratio: 16}
        model: {model_type: LightningDiT-XL/1, use_qknorm: false, use_swiglu: true, use_rope: true,
                use_rmsnorm: true, wo_shift: false, in_chans: 3}
        transport: {path_type: Linear, prediction: velocity, loss_weight: null, sample_eps: null, train_eps: null,
                    use_cosine_loss: true, use_lognorm: true}
        sample: {mode: ODE, sampling_method: euler, atol: 0.000001, rtol: 0.001, reverse: false,
                 num_sampling_steps: 250, cfg_scale: 6.7, per_proc_batch_size: 4, cfg_interval_start: 0.125,
                 timestep_shift: 0.3}
        """,
    "LightningDiT/models/__init__.py": "",
    "LightningDiT/models/lightningdit.py": """
        import torch
        from timm.models.vision_transformer import PatchEmbed

        class LightningDiT(torch.nn.Module):
            def __init__(self, input_size=32, patch_size=2, in_channels=32, hidden_size=1152, num_classes=1000,
                         **flags):
                super().__init__()
                self.in_channels = in_channels
                self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
                self.out = torch.nn.Linear(hidden_size, in_channels * patch_size ** 2)

            def forward(self, x, t, y):
                o = self.out(self.x_embedder(x))
                B, N, C = o.shape
                s = int(N ** 0.5)
                return o.transpose(1, 2).reshape(B, C, s, s)

            def forward_with_cfg(self, x, t, y, cfg_scale, cfg_interval=None, cfg_interval_start=None):
                print("their forward_with_cfg", tuple(x.shape), y.tolist(), cfg_scale, cfg_interval,
                      cfg_interval_start, torch.is_grad_enabled(), torch.backends.cuda.matmul.allow_tf32)
                return self.forward(x, t, y)

        def LightningDiT_XL_1(**kwargs):
            return LightningDiT(hidden_size=24, patch_size=1, **kwargs)

        LightningDiT_models = {"LightningDiT-XL/1": LightningDiT_XL_1}
        """,
    "LightningDiT/transport/__init__.py": """
        import torch

        def create_transport(*args, **kw):
            print("their transport", args, sorted(kw.items()))
            return "transport"

        class Sampler:
            def __init__(self, transport):
                assert transport == "transport"

            def sample_ode(self, *, sampling_method, num_steps, atol, rtol, reverse, timestep_shift):
                print("their sample_ode", sampling_method, num_steps, atol, rtol, reverse, timestep_shift)
                t = torch.linspace(0, 1, num_steps)

                def sample(x, model, **kw):
                    xs = [x]
                    for i in range(num_steps - 1):  # Euler: one call per interval
                        xs.append(xs[-1] + (t[i + 1] - t[i]) * model(xs[-1], t[i].expand(len(x)), **kw))
                    return torch.stack(xs)
                return sample
        """,
}


def make_tree(root: Path) -> Path:
    for rel, text in FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(textwrap.dedent(text))
    (root / "LightningDiT" / "COMMIT").write_text("0123abcd\n")
    return root


def run(args):
    return subprocess.run([sys.executable, "-m", "bench.authors_sample", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_times_their_sampler_from_their_tree(tmp_path):
    root = make_tree(tmp_path / "authors")
    ours = tmp_path / "sample_throughput.json"
    ours.write_text(json.dumps({"results": [
        {"backend": "bf16-weights+model+graphs@128", "batch_size": 128, "img_per_s": 4.0},
        {"backend": "fp8+model+graphs@128", "batch_size": 128, "img_per_s": 6.0},
        {"backend": "fp8+model+graphs@256", "batch_size": 256, "error": "out of memory"}]}))
    out = tmp_path / "authors_sample.json"
    res = run(["--authors", str(root), "--out", str(out), "--device", "cpu", "--batch", "3", "--steps", "4",
               "--repeats", "2", "--warmup", "1", "--ours", str(ours)])
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["their_torch_compile"] == "on"  # their blocks' own @torch.compile, as they run it
    lines = res.stdout.splitlines()
    # their sampler at the timed grid, with their config's method, tolerances, direction and shift
    assert "their sample_ode euler 4 1e-06 0.001 False 0.3" in lines
    assert any(l.startswith("their transport ('Linear', 'velocity', None, None, None)") for l in lines)
    # their forward_with_cfg: the doubled batch, the null class in the second half, their cfg scale and interval,
    # no gradients, TF32 on; (steps - 1) calls per run, warm-up and timed runs
    calls = [l for l in lines if l.startswith("their forward_with_cfg")]
    assert len(calls) == 3 * (1 + 2)
    assert all(c.startswith("their forward_with_cfg (6, 3, 4, 4) [") and c.endswith(
        "1000, 1000, 1000] 6.7 True 0.125 False True") for c in calls), calls[0]
    # time scaled by model calls: 249 of their 250 points over the 3 timed
    assert r["steps_run"] == 4 and r["steps_scaled_to"] == 250 and r["batch"] == 3 and r["finite"]
    assert r["time_scaled_s"] == pytest.approx(r["time_s"] * 249 / 3, rel=1e-2, abs=2e-3)
    assert r["img_per_s"] == pytest.approx(3 / r["time_scaled_s"], rel=1e-2)
    assert r["settings"]["cfg_scale"] == 6.7 and r["authors_commit"] == "0123abcd" and r["model"] == "LightningDiT-XL/1"
    from evaluation.provenance import ENVIRONMENT_KEYS
    assert tuple(r["environment"]) == ENVIRONMENT_KEYS
    # our entries of the same run over theirs (one that failed is left out), and the summary line
    vs = r["versus_ours"]
    assert [v["ours"] for v in vs] == ["bf16-weights+model+graphs@128", "fp8+model+graphs@128"]
    assert vs[1]["x_theirs"] == pytest.approx(6.0 / r["img_per_s"], rel=1e-2, abs=0.006)  # 2 decimals
    assert lines[-1].startswith("ours over theirs: best bf16 ") and " best FP8 " in lines[-1]


def test_missing_tree_is_one_line(tmp_path):
    res = run(["--authors", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.json"), "--device", "cpu"])
    err = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(err) == 1 and "prepare_gpu_carry.sh" in err[0] and "800ep" in err[0]


def test_gpu_suite_runs_it_after_our_sampling_only_where_their_code_was_carried():
    from bench.gpu_suite import EXTRA_COMMANDS
    names = list(EXTRA_COMMANDS)
    assert names.index("authors_sample") == names.index("sampling") + 1
    cmd, _, smoke = EXTRA_COMMANDS["authors_sample"]
    for c in (cmd, smoke):
        assert c.startswith("if [ -d .authors/LightningDiT/models ]; then ") and "--ours $OUT/sample_throughput.json" in c
    res = subprocess.run(smoke, shell=True, cwd=REPO, capture_output=True, text=True, env={"OUT": "/nonexistent",
                                                                                            "PATH": "/usr/bin:/bin"})
    if not (REPO / ".authors" / "LightningDiT" / "models").is_dir():
        assert res.returncode == 0 and res.stdout.startswith("skipped: their code was not carried")
