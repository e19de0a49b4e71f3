"""Hub-style weights (huggingface_hub's model mixin), offline; released files and previous folders still load."""
import json
import socket

import pytest
import torch

from modeling import AutoencoderKL, LightningDiT, load_dit_checkpoint, load_vavae_checkpoint
from modeling.checkpoint import CheckpointMismatchError
from modeling.convert import convert, infer_dit_config, infer_vavae_config
from modeling.convert import main as convert_main
from modeling.hub import load_latent_stats, save_latent_stats

TINY = dict(input_size=4, patch_size=1, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=3)
TINY_VAE = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), resolution=8, z_channels=4, embed_dim=4)


def _rand(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""
    def refuse(*a, **k):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_save_and_load_both_models_through_the_mixin(tmp_path, no_network):
    from huggingface_hub import ModelHubMixin
    dit, vae = _rand(LightningDiT(**TINY, use_qknorm=True)), _rand(AutoencoderKL(**TINY_VAE))
    assert isinstance(dit, ModelHubMixin) and isinstance(vae, ModelHubMixin)
    dit.save_pretrained(tmp_path / "dit", training_config={"optim": {"lr": 2e-4}})
    vae.save_pretrained(tmp_path / "vae", training_config="configs/vavae_tiny_cpu.yaml")
    for name in ("dit", "vae"):
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == ["README.md", "config.json", "model.safetensors"]
    cfg = json.loads((tmp_path / "dit" / "config.json").read_text())
    assert cfg["kind"] == "lightningdit" and cfg["hidden_size"] == 32 and cfg["use_qknorm"] is True
    card = (tmp_path / "vae" / "README.md").read_text()
    assert "configs/vavae_tiny_cpu.yaml" in card and "Parity status" in card and "bench.parity" in card
    assert '"lr": 0.0002' in (tmp_path / "dit" / "README.md").read_text()
    dit2 = LightningDiT.from_pretrained(tmp_path / "dit")
    vae2 = AutoencoderKL.from_pretrained(str(tmp_path / "vae"))
    assert _same(dit, dit2) and _same(vae, vae2) and not dit2.training
    assert dit2.config == dit.config
    with pytest.raises(ValueError, match="holds a 'vavae' model"):
        LightningDiT.from_pretrained(tmp_path / "vae")


def test_hub_id_from_the_local_cache_offline(tmp_path, monkeypatch, no_network):
    """A hub repo id resolves from a populated cache with local_files_only (what HF_HUB_OFFLINE=1 gives)."""
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    dit = _rand(LightningDiT(**TINY))
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--someone--tiny-dit"
    dit.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    loaded = LightningDiT.from_pretrained("someone/tiny-dit", cache_dir=tmp_path / "cache", local_files_only=True)
    assert _same(dit, loaded)
    with pytest.raises(Exception, match="(?i)offline|local|cannot find|not found"):
        LightningDiT.from_pretrained("someone/absent", cache_dir=tmp_path / "cache", local_files_only=True)


def test_push_to_hub_uploads_the_saved_folder(tmp_path, monkeypatch):
    from huggingface_hub import HfApi
    seen = {}

    class Repo:
        repo_id = "me/tiny"

    def upload_folder(self, repo_id, folder_path, **kw):
        seen["files"] = sorted(p.name for p in __import__("pathlib").Path(folder_path).iterdir())
        seen["config"] = json.loads((__import__("pathlib").Path(folder_path) / "config.json").read_text())
        return "commit-url"

    monkeypatch.setattr(HfApi, "create_repo", lambda self, **kw: Repo())
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    assert _rand(LightningDiT(**TINY)).push_to_hub("me/tiny", training_config="x.yaml") == "commit-url"
    assert seen["files"] == ["README.md", "config.json", "model.safetensors"]
    assert seen["config"]["training_config"] == "x.yaml"


def test_previous_folder_layout_still_loads(tmp_path):
    """Folders written before the hub format ({"kind", "config": {...}} config.json) load unchanged."""
    from safetensors.torch import save_file

    from modeling import load_pretrained
    dit = _rand(LightningDiT(**TINY))
    (tmp_path / "old").mkdir()
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, str(tmp_path / "old" / "model.safetensors"))
    (tmp_path / "old" / "config.json").write_text(json.dumps({"kind": "lightningdit", "config": {
        k: v for k, v in dit.config.to_dict().items() if k != "use_checkpoint"}}))
    assert _same(dit, LightningDiT.from_pretrained(tmp_path / "old"))
    assert _same(dit, load_pretrained(tmp_path / "old"))


def _cached_repo(cache, repo_id, files):
    """A Hub repo in huggingface_hub's cache layout (one snapshot, refs/main)."""
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, data in files.items():
        (snap / name).write_bytes(data)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_the_authors_hub_repos_load_by_id(parity_dir, tmp_path, monkeypatch, no_network):
    """hustvl/<name> holds <name>.pt (and the tokenizer's repo latents_stats.pt): a hub id of that layout loads
    as the released file, with its sampling preset; the latent statistics by repo id; neither layout: one line
    naming both files."""
    import huggingface_hub.constants as hc

    from modeling.hub import stored_metadata
    from modeling.sample_images import latent_stats_source
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "cache"))
    dit_id, vae_id = "hustvl/lightningdit-xl-imagenet256-800ep", "hustvl/vavae-imagenet256-f16d32-dinov2"
    _cached_repo(tmp_path / "cache", dit_id,
                 {"lightningdit-xl-imagenet256-800ep.pt": (parity_dir / "lightningdit_a.pt").read_bytes()})
    stats = {"mean": torch.randn(1, 32, 1, 1), "std": torch.rand(1, 32, 1, 1) + 0.5}
    torch.save(stats, tmp_path / "s.pt")
    _cached_repo(tmp_path / "cache", vae_id, {"vavae-imagenet256-f16d32-dinov2.pt":
                                              (parity_dir / "vavae_a.pt").read_bytes(),
                                              "latents_stats.pt": (tmp_path / "s.pt").read_bytes()})
    assert _same(LightningDiT.from_pretrained(dit_id), LightningDiT.from_pretrained(parity_dir / "lightningdit_a.pt"))
    assert _same(AutoencoderKL.from_pretrained(vae_id), AutoencoderKL.from_pretrained(parity_dir / "vavae_a.pt"))
    assert stored_metadata(dit_id)["sampling"]["preset"] == "lightningdit-xl-imagenet256-800ep"
    torch.testing.assert_close(load_latent_stats(vae_id)["std"], stats["std"])
    with pytest.raises(ValueError, match="pass --latent-stats latents_stats.pt"):
        latent_stats_source(dit_id, None, stored_metadata(dit_id)["sampling"], "--latent-stats")
    assert latent_stats_source(dit_id, vae_id, stored_metadata(dit_id)["sampling"], "--latent-stats") == vae_id
    with pytest.raises(FileNotFoundError, match=r"gave no config\.json.*nor absent\.pt \(the authors' release"):
        LightningDiT.from_pretrained("hustvl/absent")
    with pytest.raises(FileNotFoundError, match=r"latents_stats\.safetensors.*nor latents_stats\.pt"):
        load_latent_stats(dit_id)
    # a local copy of their repos (a clone, `hf download --local-dir`): the same
    local = tmp_path / "hustvl" / "lightningdit-xl-imagenet256-800ep"
    local.mkdir(parents=True)
    (local / "lightningdit-xl-imagenet256-800ep.pt").write_bytes((parity_dir / "lightningdit_a.pt").read_bytes())
    assert _same(LightningDiT.from_pretrained(local), LightningDiT.from_pretrained(dit_id))
    assert stored_metadata(local)["sampling"]["preset"] == "lightningdit-xl-imagenet256-800ep"
    (tmp_path / "vav").mkdir()
    (tmp_path / "vav" / "latents_stats.pt").write_bytes((tmp_path / "s.pt").read_bytes())
    torch.testing.assert_close(load_latent_stats(tmp_path / "vav")["mean"], stats["mean"])


def test_a_dit_saved_with_its_statistics_samples_with_them_from_the_hub(tmp_path, monkeypatch, no_network):
    """save_pretrained / push_to_hub(latent_stats=...) store them beside the weights; sampling by the repo's id
    fetches them (before: only config.json and the weights were fetched, and the statistics were not used)."""
    import huggingface_hub.constants as hc

    from modeling.sample_images import default_stats_path
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "cache"))
    dit = _rand(LightningDiT(**TINY))
    save_latent_stats(tmp_path / "s.safetensors", torch.zeros(4), torch.full((4,), 2.0))
    dit.save_pretrained(tmp_path / "saved", latent_stats=tmp_path / "s.safetensors")
    assert default_stats_path(tmp_path / "saved") == tmp_path / "saved" / "latents_stats.safetensors"
    _cached_repo(tmp_path / "cache", "someone/dit", {p.name: p.read_bytes() for p in (tmp_path / "saved").iterdir()})
    found = default_stats_path("someone/dit")
    assert found is not None and load_latent_stats(found)["std"].flatten().tolist() == [2.0] * 4


def test_released_files_load_without_a_size(parity_dir, parity_configs):
    for name in ("lightningdit_a", "lightningdit_b"):
        c = {k: v for k, v in parity_configs[name].items() if k != "kind"}
        ref = load_dit_checkpoint(parity_dir / f"{name}.pt", LightningDiT(**c))
        got = LightningDiT.from_pretrained(parity_dir / f"{name}.pt")
        assert _same(ref, got) and {k: getattr(got.config, k) for k in c} == c
        raw = LightningDiT.from_pretrained(parity_dir / f"{name}.pt", weights="model")
        assert not _same(ref, raw)  # the raw weights differ from the EMA on purpose
    vae = AutoencoderKL.from_pretrained(parity_dir / "vavae_a.pt")
    v = parity_configs["vavae_a"]
    ref = load_vavae_checkpoint(parity_dir / "vavae_a.pt", AutoencoderKL(
        ch=v["ch"], ch_mult=v["ch_mult"], num_res_blocks=v["num_res_blocks"], attn_resolutions=v["attn_resolutions"],
        resolution=v["resolution"], z_channels=v["z_channels"], embed_dim=v["embed_dim"]))
    assert _same(ref, vae)


def test_inferred_architectures_cover_the_flags():
    for flags in (dict(use_qknorm=True), dict(use_swiglu=False, use_rmsnorm=False), dict(wo_shift=True),
                  dict(learn_sigma=True, patch_size=2, input_size=8)):
        m = LightningDiT(**{**TINY, **flags})
        got = infer_dit_config(m.state_dict())
        want = {k: v for k, v in m.config.to_dict().items() if k != "use_checkpoint"}  # not in the weights
        assert {k: got[k] for k in want} == want, flags
    m = LightningDiT(**TINY, use_rope=False)
    with pytest.raises(ValueError, match="num_heads"):
        infer_dit_config(m.state_dict())
    assert infer_dit_config(m.state_dict(), num_heads=2)["num_heads"] == 2
    vae = AutoencoderKL(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(16,), resolution=64,
                        z_channels=4, embed_dim=4)
    got = infer_vavae_config(vae.state_dict(), resolution=64)
    assert got["ch_mult"] == [1, 2, 2] and got["attn_resolutions"] == [16] and got["num_res_blocks"] == 2


def test_convert_cli_and_latent_stats(tmp_path, parity_dir, capsys):
    stats = {"mean": torch.randn(1, 32, 1, 1), "std": torch.rand(1, 32, 1, 1) + 0.5}
    torch.save(stats, tmp_path / "latents_stats.pt")
    # a released file name gets the authors' sampling preset and training config
    released = tmp_path / "lightningdit-xl-imagenet256-64ep.pt"
    released.write_bytes((parity_dir / "lightningdit_a.pt").read_bytes())
    convert_main([str(released), str(tmp_path / "dit"), "--latent-stats", str(tmp_path / "latents_stats.pt")])
    cfg = json.loads((tmp_path / "dit" / "config.json").read_text())
    assert cfg["sampling"] == {"preset": "lightningdit-xl-imagenet256-64ep", "method": "euler", "steps": 250,
                               "shift": 0.3, "cfg_scale": 10.0, "cfg_interval_start": 0.10, "guidance": "reference"}
    assert "64ep_cfg.yaml" in cfg["training_config"] and len(cfg["source"]["sha256"]) == 64
    st = load_latent_stats(tmp_path / "dit")  # latents_stats.safetensors beside the weights
    assert torch.equal(st["mean"], stats["mean"]) and torch.equal(st["std"], stats["std"])
    convert(tmp_path / "latents_stats.pt", tmp_path / "s.safetensors")
    assert torch.equal(load_latent_stats(tmp_path / "s.safetensors")["std"], stats["std"])
    save_latent_stats(tmp_path / "t.safetensors", stats["mean"].flatten(), stats["std"].flatten())
    assert load_latent_stats(tmp_path / "t.safetensors")["mean"].shape == (1, 32, 1, 1)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # the user's file is not what they asked for: one line, exit 2
        convert_main([str(released), str(tmp_path / "x"), "--kind", "vavae"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "not a 'vavae'" in err and err.count("\n") == 1
    torch.save({"mean": torch.zeros(3)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="bad.pt.*'mean' and 'std'"):
        load_latent_stats(tmp_path / "bad.pt")


def test_folder_that_does_not_fit_is_refused_with_the_keys(tmp_path):
    dit = _rand(LightningDiT(**TINY))
    dit.save_pretrained(tmp_path / "d")
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    cfg["depth"] = 3
    (tmp_path / "d" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointMismatchError, match="missing key.*blocks.2"):
        LightningDiT.from_pretrained(tmp_path / "d")


def test_weights_and_config_of_different_saves_are_refused(tmp_path):
    """Each file of a save is replaced atomically, the pair is not: a re-save cut between them left new weights
    beside the former config, which loaded as if they belonged together. Both now carry one save's id."""
    from modeling.safe_load import CheckpointLoadError
    dit = _rand(LightningDiT(**TINY))
    dit.save_pretrained(tmp_path / "d")
    before = (tmp_path / "d" / "config.json").read_text()
    dit.save_pretrained(tmp_path / "d")  # saved again; then the former config put back, as a cut save leaves it
    (tmp_path / "d" / "config.json").write_text(before)
    with pytest.raises(CheckpointLoadError, match="written by different saves.*save the model again") as e:
        LightningDiT.from_pretrained(tmp_path / "d")
    assert "\n" not in str(e.value)
    cfg = json.loads(before)
    del cfg["save_id"]  # a folder saved before the ids: loads as it did
    (tmp_path / "d" / "config.json").write_text(json.dumps(cfg))
    assert LightningDiT.from_pretrained(tmp_path / "d").config.depth == TINY["depth"]


def test_a_missing_path_is_named_and_never_looked_up(monkeypatch, tmp_path, capsys):
    """A mistyped path (missing.pt, runs/x/pretrained_ema) went to the Hub as a repo id: 26 s of retries and an
    error that never named it (a review, 2026-12-05). Now one line naming it, without a lookup; a repo id the Hub
    does not give is one line naming it too."""
    from modeling import hub
    from modeling.sample_images import main

    def no_lookup(**kw):
        raise AssertionError(f"looked up {kw['repo_id']} on the Hub")

    monkeypatch.setattr(hub, "_hf_hub_download", no_lookup)
    for src in ("missing.pt", "runs/x/pretrained_ema", "./dit", str(tmp_path / "gone")):
        with pytest.raises(SystemExit) as e:
            main(["--dit", src, "--vae", src, "--labels", "1", "--device", "cpu"])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err == f"error: {src}: no such folder or file", err

    def not_there(**kw):
        raise OSError("404 Client Error.\nRepository Not Found for url: https://huggingface.co/api/models/...")

    monkeypatch.setattr(hub, "_hf_hub_download", not_there)
    with pytest.raises(FileNotFoundError, match=r"^owner/model: no such local folder or file, and the Hugging Face "
                                                r"Hub gave no config.json for it \(OSError: 404 Client Error"):
        hub.stored_metadata("owner/model")


def test_written_files_have_the_usual_permissions(tmp_path):
    """safetensors' save_file makes its file 0600: a converted model, its statistics and the latent shards were
    unreadable to a teammate (a review, 2026-12-05). They get 0666 & ~umask, as the checkpoints."""
    import os

    from modeling.hub import save_latent_stats
    from modeling.lightningdit import LightningDiT
    old = os.umask(0o022)
    try:
        LightningDiT(input_size=4, patch_size=1, in_channels=4, hidden_size=32, depth=1, num_heads=2,
                     num_classes=3).save_pretrained(tmp_path / "dit")
        save_latent_stats(tmp_path / "dit" / "latents_stats.safetensors", torch.zeros(4), torch.ones(4))
    finally:
        os.umask(old)
    for name in ("model.safetensors", "latents_stats.safetensors", "config.json"):
        assert (tmp_path / "dit" / name).stat().st_mode & 0o777 == 0o644, name


def test_convert_checks_before_it_writes_and_keeps_other_models(parity_dir, tmp_path, capsys):
    """convert wrote the model before reading --latent-stats (a missing file left a complete-looking model without
    them), replaced another model's weights in an existing folder (its statistics stayed), and a file in the
    output's way was a traceback (a review, 2026-12-05). The same conversion again is fine."""
    from modeling.convert import main as convert_main

    def refused(*argv):
        with pytest.raises(SystemExit) as e:
            convert_main([str(a) for a in argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
        return err[0]

    dit, vae = parity_dir / "lightningdit_a.pt", parity_dir / "vavae_a.pt"
    assert "missing.pt" in refused(dit, tmp_path / "c1", "--latent-stats", tmp_path / "missing.pt")
    assert not (tmp_path / "c1").exists()
    convert_main([str(vae), str(tmp_path / "vae")])
    before = (tmp_path / "vae" / "model.safetensors").read_bytes()
    assert "holds a model converted from vavae_a.pt" in refused(dit, tmp_path / "vae")
    assert (tmp_path / "vae" / "model.safetensors").read_bytes() == before
    convert_main([str(vae), str(tmp_path / "vae")])  # the same conversion again
    (tmp_path / "ok.png").write_bytes(b"x")
    assert "ok.png" in refused(dit, tmp_path / "ok.png" / "c4")
    assert "ok.png" in refused(dit, tmp_path / "ok.png")
    # a folder of other things (a training run's), statistics already there: one line, nothing written (a review of
    # the documented commands, 2026-12-05: both were written into, the second a raw "[Errno 17]")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    assert "holds other files (metrics.jsonl" in refused(dit, tmp_path / "run")
    assert sorted(q.name for q in (tmp_path / "run").iterdir()) == ["metrics.jsonl"]
    torch.save({"mean": torch.zeros(1, 4, 1, 1), "std": torch.ones(1, 4, 1, 1)}, tmp_path / "latents_stats.pt")
    convert_main([str(tmp_path / "latents_stats.pt"), str(tmp_path / "s.safetensors")])
    assert "already there" in refused(tmp_path / "latents_stats.pt", tmp_path / "s.safetensors")
    convert_main([str(tmp_path / "latents_stats.pt"), str(tmp_path / "m")])  # statistics first, then their DiT
    convert_main([str(dit), str(tmp_path / "m")])
    assert "--latent-stats to replace them" in refused(tmp_path / "latents_stats.pt", tmp_path / "m")
    # the short preset names sample_images and generate take; re-converting without --latent-stats says it kept them
    capsys.readouterr()
    stats = str(tmp_path / "latents_stats.pt")
    convert_main([str(dit), str(tmp_path / "d"), "--preset", "800ep", "--latent-stats", stats])
    assert json.loads((tmp_path / "d" / "config.json").read_text())["sampling"]["cfg_scale"] == 6.7
    convert_main([str(dit), str(tmp_path / "d"), "--preset", "800ep"])
    assert "kept " + str(tmp_path / "d" / "latents_stats.safetensors") in capsys.readouterr().out
