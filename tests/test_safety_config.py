"""Issue 12, config and CLI errors: a section the YAML omits is validated too, interval fields must be >= 1
(or >= 0 where 0 means never), user mistakes are one line with exit status 2 (a traceback only with --debug),
and metrics.jsonl is repaired (torn tail dropped) before a resumed run appends to it."""
import json
import sys
from dataclasses import dataclass, field

import pytest

from modeling.config import ConfigError, load_config, require
from train.dit_config import DiTTrainConfig
from train.errors import user_errors
from train.logging_utils import MetricsLogger, repair_jsonl


@dataclass
class Inner:
    size: int = 0
    ckpt_every: int = 100
    eval_every: int = 0

    def validate(self):
        require(self.size > 0, "size must be > 0")


@dataclass
class Outer:
    inner: Inner = field(default_factory=lambda: Inner(size=3))
    other: Inner = field(default_factory=Inner)


def test_an_omitted_section_is_validated(tmp_path):
    with pytest.raises(ConfigError, match="other: size must be > 0"):
        load_config(Outer, None, ["inner.size=1"])
    assert load_config(Outer, None, ["other.size=2"]).inner.size == 3  # a valid default section passes
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    # an empty YAML: refused at once, naming the file (it used to build XL/1 for 34 s, then a TypeError; then it
    # read as every default, and the error was data.path's)
    with pytest.raises(ConfigError, match="empty.yaml: the config file is empty"):
        load_config(DiTTrainConfig, empty)
    empty.write_text("# only a comment\n")
    with pytest.raises(ConfigError, match="the config file is empty"):
        load_config(DiTTrainConfig, empty)
    from train.vae_config import VAVAETrainConfig
    with pytest.raises(ConfigError, match="data.backend: dali decodes the files of data.source=folder"):
        load_config(VAVAETrainConfig, None, ["data.source=skimage", "data.backend=dali"])


def test_interval_fields(tmp_path):
    with pytest.raises(ConfigError, match=r"logging\.every: must be >= 1.*got 0"):
        load_config(DiTTrainConfig, None, ["data.source=synthetic", "logging.every=0"])
    assert load_config(DiTTrainConfig, None, ["data.source=synthetic", "eval.every=0"]).eval.every == 0
    with pytest.raises(ConfigError, match=r"eval\.every: must be >= 0"):
        load_config(DiTTrainConfig, None, ["data.source=synthetic", "eval.every=-5"])
    with pytest.raises(ConfigError, match=r"inner\.ckpt_every: must be >= 1"):
        load_config(Outer, None, ["other.size=1", "inner.size=1", "inner.ckpt_every=0"])
    assert load_config(Outer, None, ["other.size=1", "inner.size=1", "inner.eval_every=0"]).inner.eval_every == 0


def test_user_errors_are_one_line_exit_2_unless_debug(capsys):
    def fail():
        raise ConfigError("optim.lr: expected a number, got 'fast'")
    with pytest.raises(SystemExit) as e:
        with user_errors():
            fail()
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: optim.lr: expected a number, got 'fast'\n"
    with pytest.raises(ConfigError):  # --debug: the traceback
        with user_errors(debug=True):
            fail()
    with pytest.raises(ZeroDivisionError):  # a bug is never disguised as a user mistake
        with user_errors():
            1 / 0


def test_out_of_memory_is_a_user_mistake_only_where_the_command_says_what_to_lower(capsys, monkeypatch):
    """The GPU commands (generate, sample_images, fid, tokenizer_metrics, train.data) name the flag to lower; a
    command that does not keeps torch's traceback (it would have nothing to advise)."""
    import torch

    from oom import cuda_oom
    monkeypatch.delenv("VAVAE_DEBUG", raising=False)
    oom = cuda_oom("1.50 GiB", "0.98 GiB")
    with pytest.raises(SystemExit) as e:
        with user_errors(out_of_memory="lower --batch-size (now 64)"):
            raise oom
    assert e.value.code == 2
    assert capsys.readouterr().err == ("error: out of GPU memory (Tried to allocate 1.50 GiB; GPU 0 has a total "
                                       "capacity of 79.19 GiB of which 0.98 GiB is free): lower --batch-size (now 64)\n")
    with pytest.raises(torch.OutOfMemoryError):
        with user_errors():
            raise oom
    with pytest.raises(torch.OutOfMemoryError):
        with user_errors(debug=True, out_of_memory="lower --batch-size"):
            raise oom


def test_metrics_jsonl_torn_tail_moves_aside_before_appending(tmp_path):
    path = tmp_path / "metrics.jsonl"
    good = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3)]
    path.write_text("\n".join(good) + '\n{"step": 4, "lo')  # killed mid-write
    logger = MetricsLogger(tmp_path, tensorboard=False, progress_bar=False)
    logger.log(4, {"loss": 0.25})
    logger.close()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert (tmp_path / "metrics.jsonl.torn").read_text() == '{"step": 4, "lo\n'  # moved, not deleted
    # a whole record that lost only its newline keeps its place; a clean file is untouched
    path.write_text(good[0] + "\n" + good[1])
    assert repair_jsonl(path) == 0 and path.read_text() == good[0] + "\n" + good[1] + "\n"
    assert repair_jsonl(path) == 0 and repair_jsonl(tmp_path / "absent.jsonl") == 0


def test_metrics_jsonl_of_other_lines_loses_none(tmp_path):
    """A file that is not our JSON lines (a user's CSV, a note added by hand) is appended to, never cut down: the
    repair once walked back over every line that did not parse and emptied such a file."""
    path = tmp_path / "metrics.jsonl"
    text = "step,loss\n1,0.5\n2,0.4\n# a note\n"
    path.write_text(text)
    assert repair_jsonl(path) == 0 and path.read_text() == text
    path.write_text(text + "last note")
    assert repair_jsonl(path) == len("last note") and path.read_text() == text
    assert (tmp_path / "metrics.jsonl.torn").read_text() == "last note\n"
    path.write_text(text + "[" * 200_000)  # deep enough for the JSON parser's recursion limit
    assert repair_jsonl(path) == 200_000 and path.read_text() == text


def test_train_data_debug_flag_shows_the_traceback(tmp_path, capsys):
    from train.data.__main__ import main
    with pytest.raises(SystemExit) as e:
        main(["stats", str(tmp_path / "nowhere")])
    assert e.value.code == 2 and "nowhere" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError):
        main(["--debug", "stats", str(tmp_path / "nowhere")])
    assert sys.exc_info() == (None, None, None)


def test_a_duplicate_yaml_key_is_refused_naming_the_file_key_and_lines(tmp_path, capsys):
    """Issue 21: YAML keeps the last of two equal keys silently; a config edited in two places is refused."""
    path = tmp_path / "dup.yaml"
    path.write_text("data:\n  source: synthetic\ntrain:\n  lr: 1.0e-4\n  seed: 3\n  lr: 5.0e-4\n")
    with pytest.raises(ConfigError) as e:
        load_config(DiTTrainConfig, path)
    text = str(e.value)
    assert str(path) in text and "'lr'" in text and "lines 4 and 6" in text and "\n" not in text
    with pytest.raises(ConfigError, match="'a' appears twice"):  # an override's value is YAML too
        load_config(Outer, None, ["other.size={a: 1, a: 2}"])
    # anchors and merge keys still work: an explicit key overrides a merged one, as YAML defines
    merged = tmp_path / "merge.yaml"
    merged.write_text("base: &b {size: 2, ckpt_every: 7}\ninner:\n  <<: *b\n  size: 5\nother:\n  size: 1\n")
    from modeling.config import read_yaml
    assert read_yaml(merged)["inner"] == {"size": 5, "ckpt_every": 7}
    # at the command line: one line, exit 2
    from train.train_dit import main
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "appears twice" in err and err.count("\n") == 1


def test_numbers_that_cannot_train_and_yaml_that_expands_without_end_are_refused(tmp_path, capsys):
    """optim.lr=inf trained five NaN steps and saved NaN weights; a seed of -5 or 2**32 passed validation and failed
    after start-up in numpy; a 315-character override of anchors repeating anchors hung, growing by gigabytes."""
    from train.vae_config import VAVAETrainConfig
    for key in ("optim.lr", "optim.eps", "optim.weight_decay", "data.latent_multiplier"):
        for value in ("inf", "-.inf", ".nan", "1e400", "1" + "0" * 400):
            with pytest.raises(ConfigError, match=f"{key}: expected a finite number"):
                load_config(DiTTrainConfig, None, ["data.source=synthetic", f"{key}={value}"])
    with pytest.raises(ConfigError, match="loss.disc_weight: expected a finite number"):
        load_config(VAVAETrainConfig, None, ["loss.disc_weight=.nan"])
    for seed in (-5, 2 ** 32):
        with pytest.raises(ConfigError, match=rf"seed must be in \[0, 2\*\*31\).*got {seed}"):
            load_config(DiTTrainConfig, None, ["data.source=synthetic", f"train.seed={seed}"])
    with pytest.raises(ConfigError, match=r"eval.seed 4611686018427387904: must be in 0\.\."):  # (failed hours in)
        load_config(DiTTrainConfig, None, ["data.source=synthetic", f"eval.seed={2 ** 62}"])
    assert load_config(DiTTrainConfig, None, ["data.source=synthetic", f"train.seed={2 ** 31 - 1}",
                                              "optim.lr=1e-4"]).train.seed == 2 ** 31 - 1
    laughs = "{a: &a [x,x,x,x,x,x,x,x,x]" + "".join(
        f", {n}: &{n} [{','.join(['*' + p] * 9)}]" for p, n in zip("abcdef", "bcdefg")) + "}"
    with pytest.raises(ConfigError, match="expands to more than 100,000 values"):
        load_config(DiTTrainConfig, None, ["train.deepspeed=" + laughs])
    path = tmp_path / "laughs.yaml"
    path.write_text("x: " + laughs + "\n")
    with pytest.raises(ConfigError, match=f"{path}.*expands to more than 100,000 values"):
        load_config(DiTTrainConfig, path)


def test_explicit_requests_that_cannot_run_here_are_one_line(tmp_path, capsys):
    """Asked for by name, a backend this machine cannot run is one line and exit 2, before anything is written (a
    review, 2026-12-05: nccl without a GPU was torch's AttributeError, train.kernels=cuda in the VA-VAE trainer a
    BackendUnavailable traceback, extract's DALI on a GPU-less machine a traceback after extract.json was written,
    a foundation-model file of the wrong network a ValueError traceback)."""
    from pathlib import Path

    import torch

    from train import train_dit, train_vae
    from train.data.__main__ import main as data_main
    repo = Path(__file__).resolve().parents[1]
    if torch.cuda.is_available():
        pytest.skip("the refusals are of a machine without CUDA")  # CI's machines have none: never skipped there
    base = ["logging.progress_bar=false", f"logging.dir={tmp_path}/run", f"checkpoint.dir={tmp_path}/ckpt"]
    assert train_dit.main(["--config", str(repo / "configs/dit_tiny_cpu.yaml"), "dist.backend=nccl", *base]) == 2
    assert "dist.backend: nccl needs CUDA GPUs" in capsys.readouterr().err
    vae = ["--config", str(repo / "configs/vavae_tiny_cpu.yaml"), *base]
    assert train_vae.main([*vae, "train.kernels=cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cuda" in err[0], err
    torch.save({"blocks.0.weight": torch.zeros(1)}, tmp_path / "not_dino.pt")
    assert train_vae.main([*vae, "foundation.name=dinov2_vitl14", f"foundation.weights={tmp_path}/not_dino.pt",
                           "foundation.allow_substitute=false"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not_dino.pt is not a dinov2_vitl14 state dict" in err[0], err
    from train.data.embedded import write_embedded
    write_embedded(tmp_path / "images", size=32, per_class=1)
    from modeling.vavae import AutoencoderKL
    AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), resolution=32, z_channels=4,
                  embed_dim=4).save_pretrained(tmp_path / "vae")
    with pytest.raises(SystemExit) as e:
        data_main(["extract", str(tmp_path / "images"), str(tmp_path / "lat"), "--vae", str(tmp_path / "vae"),
                   "--image-size", "32", "--backend", "dali", "--dali-device", "gpu", "--workers", "0"])
    assert e.value.code == 2 and "--dali-device gpu" in capsys.readouterr().err
    assert not (tmp_path / "lat" / "extract.json").exists()
