"""The VA-VAE benchmarks on tiny shapes (CPU): the bf16-vs-fp32 loss-curve tool and the training-step benchmark
run through the real trainer and write what they promise."""
import json
import os
from pathlib import Path

import pytest

from bench import vae_precision_compare
from evaluation.provenance import ENVIRONMENT_KEYS

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
TINY = ["model.ch=32", "model.ch_mult=[1,2]", "model.resolution=32", "model.z_channels=4", "model.embed_dim=4",
        "foundation.name=random_tiny", "foundation.input_size=null", "loss.disc_start=3", "loss.disc_ndf=8",
        "data.num_samples=16", "train.batch_per_gpu=2"]


def test_precision_compare_runs_both_precisions_through_the_trainer(tmp_path, capsys):
    rc = vae_precision_compare.main(["--steps", "6", "--out", str(tmp_path), *sum([["--set", s] for s in TINY], [])])
    res = json.loads((tmp_path / "precision_compare.json").read_text())
    assert rc == (0 if res["agree"] else 1)
    assert len(res["fp32"]["rec"]) == len(res["bf16"]["rec"]) == 6 and res["rec"]["steps"] == 6
    # the same data and samples, different arithmetic: close, not equal (bf16 really ran)
    assert res["fp32"]["rec"] != res["bf16"]["rec"]
    assert res["rec"]["max_step_rel_diff"] < 0.1 and res["vf"]["max_step_rel_diff"] < 0.2
    assert (tmp_path / "precision_compare.png").stat().st_size > 0
    assert "bf16 vs fp32 (cpu: " in capsys.readouterr().out


def test_step_benchmark_on_tiny_shapes(tmp_path, capsys):
    """The GPU command on tiny shapes: every mode through Trainer.train_step, the doubling batch search, the
    extraction timing, and the JSON it promises."""
    from bench import vae_step
    tiny = ["model.ch=32", "model.ch_mult=[1,2]", "model.resolution=32", "model.z_channels=4", "model.embed_dim=4",
            "model.attn_resolutions=[16]", "foundation.name=random_tiny", "foundation.input_size=null",
            "loss.disc_ndf=8", "loss.perceptual_weight=0.0"]  # LPIPS: see test_train_vae_bf16 (slow in CPU bf16)
    out = tmp_path / "vae_step.json"
    rc = vae_step.main(["--out", str(out), "--modes", "fp32,bf16_cl", "--batch", "2", "--max-batch", "4",
                        "--warmup", "1", "--steps", "1", "--extract-batch", "2", "--budget-s", "1000",
                        *sum([["--set", s] for s in tiny], [])])
    assert rc == 0
    res = json.loads(out.read_text())
    assert tuple(res["environment"]) == ENVIRONMENT_KEYS and res["environment"]["card"].startswith("cpu")
    assert res["lpips_weights"] in ("file", "random")
    assert set(res["modes"]) == {"fp32", "bf16_cl"} and res["fastest"] == "bf16_cl"
    for mode, r in res["modes"].items():
        assert r["batch_2"]["img_per_s"] > 0 and r["batch_2"]["batch"] == 2
    assert res["modes"]["fp32"]["largest"]["batch"] == 4 and res["modes"][res["fastest"]]["largest"]["batch"] == 4
    assert res["speedup_batch_2"] > 0 and res["speedup_largest"] > 0 and res["skipped"] == []
    assert res["extraction"]["fp32"]["img_per_s"] > 0 and res["extraction"]["bf16"]["autocast"] == "bf16"
    assert res["extraction"]["bf16"]["channels_last"] and not res["extraction"]["fp32"]["channels_last"]
    assert res["extraction"]["fp32"]["latent_shape"] == [4, 16, 16]  # f2 at 32 px
    assert res["config"]["model"]["ch"] == 32 and "fastest" in capsys.readouterr().out


def test_step_benchmark_refuses_modes_without_the_fp32_baseline(tmp_path, capsys):
    from bench import vae_step
    assert vae_step.main(["--out", str(tmp_path / "x.json"), "--modes", "bf16"]) == 2
    assert "must include fp32" in capsys.readouterr().err
