"""Sharded, resumable sample generation and the tokenizer metrics on tiny models."""
import json
import numpy as np
import pytest
import torch

from evaluation.generate import generate, sample_labels
from modeling.lightningdit import LightningDiT
from modeling.vavae import AutoencoderKL


def _tiny():
    torch.manual_seed(0)
    dit = LightningDiT(input_size=4, patch_size=1, in_channels=4, hidden_size=32, depth=1, num_heads=2,
                       num_classes=3)
    vae = AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), resolution=8, z_channels=4,
                        embed_dim=4)
    return dit, vae


def test_reconstruction_metrics_draw_the_posterior_as_the_authors(tmp_path, capsys):
    """The authors' evaluate_tokenizer.py reconstructs from `posterior.sample()`; ours took the mean (a review,
    2026-12-05). Now a seeded draw per image (the same for any batch size), or the mean with posterior="mode". The
    CLI refuses images the tokenizer cannot take and a --json it could not write, before any metric."""
    from evaluation.tokenizer_metrics import main, reconstruction_metrics
    _, vae = _tiny()
    with torch.no_grad():  # a posterior wide enough to move the decoded pixels
        vae.quant_conv.bias[4:].fill_(2.0)
    images = torch.randint(0, 256, (5, 16, 16, 3), dtype=torch.uint8).numpy()
    kw = dict(inception=None, progress=False)
    (r3, rec3), (r5, rec5) = (reconstruction_metrics(vae, images, batch_size=b, **kw) for b in (3, 5))
    _, mode = reconstruction_metrics(vae, images, posterior="mode", **kw)
    _, other = reconstruction_metrics(vae, images, seed=1, **kw)
    assert np.array_equal(rec3, rec5) and r3["posterior"] == "sample" and r3["psnr"] == r5["psnr"]
    assert not np.array_equal(rec3, mode) and not np.array_equal(rec3, other)
    np.savez(tmp_path / "odd.npz", torch.randint(0, 256, (2, 9, 9, 3), dtype=torch.uint8).numpy())
    vae.save_pretrained(tmp_path / "vae")
    for argv, says in (([str(tmp_path / "vae"), str(tmp_path / "odd.npz"), "--no-rfid", "--no-lpips"],
                        "multiples of 2"),
                       ([str(tmp_path / "vae"), str(tmp_path / "odd.npz"), "--json", str(tmp_path / "no" / "m.json")],
                        "--json")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and says in err and len(err.splitlines()) == 1, err


def test_a_run_started_with_class_balanced_labels_is_told_the_flag(tmp_path):
    """The labels' default changed (class-balanced -> i.i.d., as the authors): continuing an output started with
    the former default names the flag that continues it."""
    from evaluation.generate import SettingsMismatchError, check_settings
    check_settings(tmp_path, {"num_samples": 8, "class_balanced": True})
    with pytest.raises(SettingsMismatchError, match="class_balanced: recorded True, now False.*add --class-balanced"):
        check_settings(tmp_path, {"num_samples": 8, "class_balanced": False})


def test_labels_iid_as_the_authors_or_class_balanced():
    y = sample_labels(10, 3, seed=1, class_balanced=True)
    assert sorted(np.bincount(y.numpy()).tolist()) == [3, 3, 4]
    assert torch.equal(y, sample_labels(10, 3, seed=1, class_balanced=True))
    iid = sample_labels(3000, 1000, seed=1)  # the default: i.i.d. (the authors' torch.randint), seeded
    assert torch.equal(iid, torch.randint(0, 1000, (3000,), generator=torch.Generator().manual_seed(1)))
    assert np.bincount(iid.numpy(), minlength=1000).max() > 3  # not balanced


def test_generate_sharded_resumable_matches_single_rank(tmp_path):
    dit, vae = _tiny()
    kw = dict(num_samples=7, steps=3, cfg_scale=2.0, seed=3, progress=False)
    single = generate(dit, vae, tmp_path / "one.npz", batch_size=4, **kw)
    # Two ranks, another batch size: rank 0 alone cannot merge, rank 1 completes it.
    assert generate(dit, vae, tmp_path / "two.npz", batch_size=2, rank=0, world_size=2, **kw) is None
    chunks = sorted((tmp_path / "two.chunks").glob("chunk_*.npz"))
    mtimes = {c: c.stat().st_mtime_ns for c in chunks}
    chunks[-1].unlink()  # a chunk lost to a crash is redone; the others are not
    two = generate(dit, vae, tmp_path / "two.npz", batch_size=2, rank=1, world_size=2, **kw)
    assert two is None
    two = generate(dit, vae, tmp_path / "two.npz", batch_size=2, rank=0, world_size=2, **kw)
    assert all(c.stat().st_mtime_ns == t for c, t in mtimes.items() if c.exists() and c != chunks[-1])
    with np.load(single) as a, np.load(two) as b:
        assert a["arr_0"].shape == (7, 8, 8, 3) and a["arr_0"].dtype == np.uint8
        np.testing.assert_array_equal(a["arr_1"], sample_labels(7, 3, seed=3).numpy())
        np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
        np.testing.assert_allclose(a["arr_0"].astype(int), b["arr_0"].astype(int), atol=1)
        assert len({a["arr_0"][i].tobytes() for i in range(7)}) == 7  # distinct noise per sample


def test_broken_run_records_are_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    """A truncated or foreign settings.json, a truncated chunk, a sample batch whose settings record is not JSON (found
    by `fid --json` after every metric was computed: the results were lost), extract.json holding a list: each was a
    traceback (JSONDecodeError, AttributeError, BadZipFile)."""
    from evaluation.batches import BatchFileError
    from evaluation.fid import main as fid_main
    from evaluation.generate import SettingsMismatchError, check_settings, merge_chunks, read_settings
    from train.data import DataError
    from train.data.latents import LatentStore
    work = tmp_path / "out.chunks"
    work.mkdir()
    for text in ('{"seed": 3', "[1]"):
        (work / "settings.json").write_text(text)
        with pytest.raises(SettingsMismatchError, match=r"settings\.json: the settings this output was started with"
                                                        r".*delete the chunks folder") as e:
            check_settings(work, {"seed": 3})
        assert "\n" not in str(e.value)
    np.savez(work / "chunk_00000.npz", indices=np.arange(2), images=np.zeros((2, 4, 4, 3), np.uint8),
             labels=np.zeros(2, np.int64))
    (work / "chunk_00002.npz").write_bytes((work / "chunk_00000.npz").read_bytes()[:100])
    with pytest.raises(SettingsMismatchError, match=r"chunk_00002\.npz is truncated.*delete it and run the same"):
        merge_chunks(tmp_path / "out.npz", 4)
    bad = tmp_path / "samples.npz"
    np.savez(bad, arr_0=np.zeros((2, 4, 4, 3), np.uint8), settings=np.array("{not json"))
    with pytest.raises(BatchFileError, match=r"samples\.npz: its 'settings' record is unreadable"):
        read_settings(bad)
    import evaluation.fid

    def no_metrics_before_the_record_is_read(*a, **k):
        raise AssertionError("the metrics ran before the samples' settings were read")
    monkeypatch.setattr(evaluation.fid, "evaluate_npz", no_metrics_before_the_record_is_read)
    with pytest.raises(SystemExit) as e:
        fid_main([str(bad), str(bad), "--json", str(tmp_path / "r.json")])
    assert e.value.code == 2
    np.save(tmp_path / "single.npy", np.zeros((2, 4, 4, 3), np.uint8))  # the batch checks' own line, not a TypeError
    with pytest.raises(BatchFileError, match=r"single\.npy: a single \.npy array, not an npz archive"):
        read_settings(tmp_path / "single.npy")
    assert "its 'settings' record is unreadable" in capsys.readouterr().err and not (tmp_path / "r.json").exists()
    np.savez(bad, arr_0=np.zeros((2, 4, 4, 3), np.uint8), settings=np.array("[1]"))
    with pytest.raises(BatchFileError, match="not a JSON object"):
        read_settings(bad)
    lat = tmp_path / "latents"
    lat.mkdir()
    from safetensors.numpy import save_file
    save_file({"latents": np.zeros((2, 4, 2, 2), np.float32), "labels": np.zeros(2, np.int64)},
              str(lat / "shard_00000.safetensors"))
    (lat / "extract.json").write_text("[1]")
    with pytest.raises(DataError, match=r"extract\.json: the extraction manifest holds a JSON list"):
        LatentStore.open(lat)


def test_reconstruction_metrics_tiny_vae():
    from evaluation.tokenizer_metrics import reconstruction_metrics

    def features(images):  # a cheap stand-in for Inception: per-channel pixel statistics
        x = images.float().flatten(1, 2)
        return {"pool": torch.cat([x.mean(1), x.std(1), x.amax(1)], 1)}

    _, vae = _tiny()
    images = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8).numpy()
    res, rec = reconstruction_metrics(vae, images, batch_size=3, inception=features, progress=False)
    assert rec.shape == images.shape and rec.dtype == np.uint8
    assert 0 < res["psnr"] < 40 and -1 < res["ssim"] < 1 and np.isfinite(res["rfid"]) and res["num_images"] == 4


def test_tokenizer_metrics_score_as_the_authors_evaluation(tmp_path, capsys):
    """protocol "authors": SSIM (torchmetrics on [-1, 1]) and LPIPS on the decoder's float output against the float
    originals, PSNR and rFID on the rounded images (rFID through pytorch-fid's resize); "uint8": all on the rounded
    images. A folder of images goes through their transform: ImageFolder's order, the short side to the size
    (antialiased bilinear), a center crop; the CLI takes it."""
    from PIL import Image

    from evaluation.inception import InceptionV3
    from evaluation.paired_metrics import psnr, ssim, ssim_torchmetrics
    from evaluation.tokenizer_metrics import FolderImages, authors_transform, main, reconstruction_metrics
    _, vae = _tiny()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        vae.decoder.conv_out.bias[0] += 1.0  # red past 1 in places: clamping would show
        decoded = torch.cat([vae.decode(vae.encode(x[i:i + 2]).mode()).float() for i in (0, 2)])
    assert decoded.amax() > 1
    seen = []

    def lpips(a, b):  # a stand-in that records what it scores
        seen.append((a.clone(), b.clone()))
        return (a - b).abs().flatten(1).mean(1)
    pipelines = []

    class Inception(InceptionV3):  # records the input pipeline it is asked for; features: the pixels
        def forward(self, images, input_pipeline="adm"):
            pipelines.append(input_pipeline)
            return {"pool": images.double().flatten(1)[:, ::97] + (input_pipeline == "adm")}
    inception = Inception()
    kw = dict(batch_size=2, progress=False, posterior="mode", lpips=lpips, inception=inception)
    res, rec = reconstruction_metrics(vae, images, **kw)
    u8 = reconstruction_metrics(vae, images, protocol="uint8", **kw)[0]
    assert res["protocol"] == "authors" and u8["protocol"] == "uint8"
    torch.testing.assert_close(torch.cat([a for a, _ in seen[:2]]), decoded)  # unclamped floats, not the rounded
    torch.testing.assert_close(torch.cat([b for _, b in seen[:2]]), x)
    assert res["ssim"] == pytest.approx(float(ssim_torchmetrics(decoded, x).mean()), rel=1e-12)
    assert u8["ssim"] == pytest.approx(float(ssim(images, rec).mean()), rel=1e-12)
    assert res["ssim"] != pytest.approx(u8["ssim"], rel=1e-3)
    assert res["psnr"] == u8["psnr"] == pytest.approx(float(psnr(images, rec).mean()), rel=1e-12)
    assert pipelines == ["pytorch-fid"] * 4 + ["adm"] * 4  # two batches each of the originals and reconstructions
    assert np.isfinite(res["rfid"]) and np.isfinite(u8["rfid"])
    # a folder: class folders in order, each image as their transform makes it
    for c, (h, w) in (("b", (30, 40)), ("a", (16, 16))):
        (tmp_path / "val" / c).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "val" / c / "0.png")
    Image.new("RGB", (24, 48), (255, 0, 128)).save(tmp_path / "val" / "b" / "1.png")  # portrait, one colour
    folder = FolderImages(tmp_path / "val", size=16)
    assert [f.relative_to(tmp_path / "val").as_posix() for f in folder.files] == ["a/0.png", "b/0.png", "b/1.png"]
    t = authors_transform(folder.files[1], 16)  # 30x40 -> 16x21 (antialiased), crop columns 2..17
    assert t.shape == (3, 16, 16)
    src = torch.as_tensor(np.array(Image.open(folder.files[1]))).permute(2, 0, 1).float() / 255
    ref = torch.nn.functional.interpolate(src[None], size=(16, 21), mode="bilinear", antialias=True)[0]
    torch.testing.assert_close(t, (ref[:, :, 2:18] - 0.5) / 0.5, rtol=0, atol=0)
    torch.testing.assert_close(authors_transform(folder.files[2], 16)[:, 0, 0], torch.tensor([1.0, -1.0, 1 / 255]))
    torch.testing.assert_close(folder.batch(0, 1)[0], torch.as_tensor(np.array(Image.open(folder.files[0]))).permute(
        2, 0, 1).float() / 127.5 - 1)  # already 16x16: untouched
    vae.save_pretrained(tmp_path / "vae")
    assert main([str(tmp_path / "vae"), str(tmp_path / "val"), "--image-size", "16", "--no-rfid", "--no-lpips",
                 "--device", "cpu", "--posterior", "mode"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["num_images"] == 3 and out["protocol"] == "authors" and np.isfinite(out["ssim"])


def test_the_authors_transform_is_torchvisions(tmp_path):
    """authors_transform against torchvision's own ToTensor, Resize, CenterCrop, Normalize (a fixture made by
    torchvision 0.29.1, tests/fixtures/make_torchvision_eval_transform.py: torchvision cannot be installed beside
    this torch): landscape, portrait, odd slacks, already at size."""
    from pathlib import Path

    from PIL import Image

    from evaluation.tokenizer_metrics import authors_transform
    fx = np.load(Path(__file__).parent / "fixtures" / "torchvision_eval_transform.npz")
    size = int(fx["size"])
    for i in range(6):
        Image.fromarray(fx[f"image_{i}"]).save(tmp_path / f"{i}.png")
        got = authors_transform(tmp_path / f"{i}.png", size).numpy()
        np.testing.assert_allclose(got, fx[f"expected_{i}"], rtol=0, atol=1e-6, err_msg=str(fx[f"image_{i}"].shape))


def test_an_image_folder_is_read_as_imagefolder_or_refused(tmp_path):
    """Class folders (ImageFolder's layout, a file named ".png" included as it includes it), or a flat folder; a
    flat folder with a stray subfolder is refused (ImageFolder would score that subfolder's images alone)."""
    from PIL import Image

    from evaluation.tokenizer_metrics import FolderImages
    from modeling.config import ConfigError
    for name in ("b.png", "a.JPG", ".png", "notes.txt"):
        if name.endswith("txt"):
            (tmp_path / name).write_text("x")
        else:
            Image.new("RGB", (8, 8)).save(tmp_path / name, format="PNG")
    assert [f.name for f in FolderImages(tmp_path, 8).files] == [".png", "a.JPG", "b.png"]
    (tmp_path / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / ".ipynb_checkpoints" / "b-checkpoint.png")
    with pytest.raises(ConfigError, match="3 images beside 1 subfolder.*ImageFolder reads only the subfolders"):
        FolderImages(tmp_path, 8)


def test_image_bombs_are_one_line_before_they_are_decoded(tmp_path):
    """A 24 KB PNG of 14000 x 14000 pixels (PIL's DecompressionBombError was a traceback in both commands), and a
    157-byte 1 x 20000 one that the authors' transform would resize to 256 x 5,120,000 (4 GB of floats)."""
    from PIL import Image

    from evaluation.batches import BatchFileError, read_image_folder
    from evaluation.tokenizer_metrics import authors_transform
    from modeling.config import ConfigError
    (tmp_path / "bomb").mkdir()
    for i in range(2):
        Image.new("1", (14000, 14000)).save(tmp_path / "bomb" / f"{i}.png")
    Image.new("RGB", (1, 20000)).save(tmp_path / "thin.png")
    with pytest.raises(BatchFileError, match=r"bomb/0\.png: unreadable.*decompression bomb") as e:
        read_image_folder(tmp_path / "bomb")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"0\.png: unreadable.*decompression bomb"):
        authors_transform(tmp_path / "bomb" / "0.png")
    with pytest.raises(ConfigError, match=r"thin\.png: 1x20000 pixels.*5,120,000 long"):
        authors_transform(tmp_path / "thin.png")
    Image.new("RGB", (64, 1)).save(tmp_path / "wide.png")  # 64 times: still the authors' transform
    assert authors_transform(tmp_path / "wide.png", 4).shape == (3, 4, 4)
    (tmp_path / "palette").mkdir()  # a palette image was called grayscale
    for i in range(2):
        Image.new("P", (8, 8)).save(tmp_path / "palette" / f"{i}.png")
    with pytest.raises(BatchFileError, match=r"0\.png: PIL mode P \(a palette image\); sample images are RGB"):
        read_image_folder(tmp_path / "palette")


def test_an_unlistable_latent_folder_says_so(tmp_path, monkeypatch):
    """The shard glob finds nothing in a folder it may not read: that said "no latent shards" (checked for real
    without the capability to override permissions; the root CI stands in for it here)."""
    import train.data.latents as latents

    def denied(path):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(latents.os, "listdir", denied)
    with pytest.raises(PermissionError, match=r"cannot list the latent folder \(Permission denied\)"):
        latents.LatentStore.open(tmp_path)
    monkeypatch.setattr(latents.os, "listdir", lambda p: [])
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors latent shards"):
        latents.LatentStore.open(tmp_path)


# ----------------------------------------------------------------------------- bad input (issue 21)

def _folders(tmp_path):
    from modeling import save_pretrained
    dit, vae = _tiny()
    save_pretrained(dit, dit.config, tmp_path / "dit")
    save_pretrained(vae, vae.config, tmp_path / "vae")
    return str(tmp_path / "dit"), str(tmp_path / "vae")


def test_cli_refuses_bad_arguments_before_sampling(tmp_path, capsys, monkeypatch):
    """Every argument generate cannot run with: one line naming the flag, the variable or the file, exit 2,
    before anything is sampled or written (before: exit 0 with black images, a traceback, or a failure after
    hours of sampling when the merge could not write the output)."""
    import pytest

    from evaluation.generate import main
    from modeling.sampling import Sampler

    def sampled(*a, **k):
        raise AssertionError("sampled before refusing")
    monkeypatch.setattr(Sampler, "__call__", sampled)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    dit, vae = _folders(tmp_path)
    out = tmp_path / "s.npz"

    def refused(*extra, target=out):
        with pytest.raises(SystemExit) as e:
            main([dit, vae, str(target), "--num-samples", "4", "--batch-size", "2", "--steps", "3",
                  "--device", "cpu", "--precision", "fp32", *extra])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
        return err

    assert "--num-samples must be an integer >= 1, got 0" in refused("--num-samples", "0")
    assert "--num-samples" in refused("--num-samples=-5")
    assert "--batch-size must be an integer >= 1, got 0" in refused("--batch-size", "0")
    assert "--seed" in refused("--seed", str(2 ** 70)) and "64 bits" in refused("--seed", str(2 ** 62))
    assert "--seed" in refused("--seed=-1")
    for value in ("nan", "inf", "-inf"):
        assert "--cfg-scale: cfg_scale must be a finite number" in refused(f"--cfg-scale={value}")
    assert "--steps" in refused("--steps", "1")
    for value in ("0", "-2", "nan", "inf"):
        assert "--latent-multiplier" in refused(f"--latent-multiplier={value}")
    for name, std in (("nan.pt", torch.full((1, 4, 1, 1), float("nan"))), ("zero.pt", torch.zeros(1, 4, 1, 1))):
        torch.save({"mean": torch.zeros(1, 4, 1, 1), "std": std}, tmp_path / name)
        assert name in refused("--latent-stats", str(tmp_path / name))
    (tmp_path / "a_file").write_text("x")
    for target, why in ((tmp_path / "a_file" / "s.npz", "not a folder"), ("/proc/vavae-test.npz", "cannot write"),
                        (tmp_path / ("x" * 250 + ".npz"), "longer than"), (tmp_path, "is a folder"),
                        (tmp_path / "a_file", "not this command's output")):
        assert why in refused(target=target), why
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "--device cuda: CUDA is not available" in refused("--device", "cuda")
    monkeypatch.setenv("RANK", "abc")
    assert "RANK='abc': expected an integer" in refused()
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert "RANK < WORLD_SIZE" in refused()
    assert not out.exists() and not out.with_suffix(".chunks").exists()


def test_library_generate_checks_its_arguments(tmp_path):
    import pytest
    dit, vae = _tiny()
    for kw, match in ((dict(num_samples=0), "num_samples must be an integer >= 1"),
                      (dict(batch_size=0), "batch_size must be"), (dict(seed=2 ** 70), "seed"),
                      (dict(latent_multiplier=0.0), "latent_multiplier"), (dict(cfg_scale=float("nan")), "cfg_scale"),
                      (dict(latent_stats={"mean": torch.zeros(1, 4, 1, 1), "std": torch.zeros(1, 4, 1, 1)}),
                       "std must be > 0")):
        args = {**dict(num_samples=2, batch_size=2, steps=3, progress=False), **kw}
        with pytest.raises(ValueError, match=match):
            generate(dit, vae, tmp_path / "x.npz", **args)
    assert not (tmp_path / "x.chunks").exists()


def test_sampling_runs_with_its_device_current(monkeypatch, tmp_path):
    """Our Triton kernels, the CUDA extension, a CUDA graph's capture stream and the attention timing use the
    current CUDA device, not the tensors': under torchrun every rank of `generate` but rank 0 ran them on cuda:0
    with cuda:N's memory (a review, 2026-12-05). The Sampler's calls and generate's decode now run inside
    on_device(device), and the CLIs make the rank's GPU current (torch.cuda.set_device)."""
    import contextlib

    import torch

    from modeling import sampling
    d = sampling.on_device(torch.device("cuda", 3))
    assert isinstance(d, torch.cuda.device) and d.idx == 3
    assert isinstance(sampling.on_device("cpu"), contextlib.nullcontext)
    entered = []

    @contextlib.contextmanager
    def spy(device):
        entered.append(str(torch.device(device)))
        yield

    monkeypatch.setattr(sampling, "on_device", spy)
    from modeling.lightningdit import LightningDiT, LightningDiTConfig
    dit = LightningDiT(LightningDiTConfig(input_size=4, patch_size=1, in_channels=4, hidden_size=32, depth=1,
                                          num_heads=2, num_classes=3))
    sampler = sampling.Sampler(dit, sampling.SamplingConfig(steps=2, precision="fp32"), device="cpu")
    sampler(torch.randn(2, 4, 4, 4), torch.tensor([0, 1]))
    assert entered == ["cpu"]


@pytest.mark.parametrize("command", ["sample_images", "generate"])
def test_bare_cuda_device_is_the_current_gpu(monkeypatch, tmp_path, capsys, command):
    """`--device cuda` (sample_images' default on a GPU machine, the README's command): torch.cuda.set_device
    refuses a bare "cuda", and both commands stopped there with its ValueError (a review, 2026-12-05). check_device
    now gives the current GPU's index, which is made current; these runs then stop at the missing checkpoint."""

    from modeling.sampling import check_device
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch._C, "_cuda_setDevice", calls.append, raising=False)  # absent from CPU builds
    assert check_device("cuda") == torch.device("cuda", 1)
    missing = tmp_path / "missing.pt"
    if command == "sample_images":
        from modeling.sample_images import main
        argv = ["--dit", str(missing), "--vae", str(missing), "--labels", "1"]  # --device: "cuda" by default here
    else:
        from evaluation.generate import main
        argv = [str(missing), str(missing), str(tmp_path / "out.npz"), "--num-samples", "8", "--device", "cuda"]
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and calls == [1] and "missing.pt" in err and "index" not in err, err


def _merge(args):
    from evaluation.generate import merge_chunks
    return str(merge_chunks(*args))


def test_ranks_finishing_together_each_merge_safely(tmp_path):
    """Every rank that finds the chunks complete merges (a rerun of a finished run: all at once). Each writes a
    temporary file of its own; the shared name made 7 of 8 ranks fail with FileNotFoundError (a review,
    2026-12-05). A merged output of these chunks is returned as it is."""
    import multiprocessing as mp

    import numpy as np

    from evaluation.generate import SETTINGS_FILE, merge_chunks, read_settings
    out = tmp_path / "samples.npz"
    work = out.with_suffix(".chunks")
    work.mkdir()
    (work / SETTINGS_FILE).write_text('{"seed": 0}')
    rng = np.random.default_rng(0)
    for start in range(0, 64, 8):
        idx = np.arange(start, start + 8)
        np.savez(work / f"chunk_{start:08d}.npz", images=rng.integers(0, 255, (8, 16, 16, 3), dtype=np.uint8),
                 labels=idx % 10, indices=idx)
    assert merge_chunks(out, 65) is None  # one index short
    with mp.get_context("fork").Pool(8) as pool:
        assert pool.map(_merge, [(out, 64)] * 8) == [str(out)] * 8
    with np.load(out) as z:
        assert z["arr_0"].shape == (64, 16, 16, 3) and (z["arr_1"] == np.arange(64) % 10).all()
    assert read_settings(out) == {"seed": 0} and sorted(p.name for p in tmp_path.iterdir()) == \
        ["samples.chunks", "samples.npz"]
    before = out.stat().st_mtime_ns
    assert merge_chunks(out, 64) == out and out.stat().st_mtime_ns == before  # merged already: not rewritten


def test_the_exact_fp32_path_turns_tf32_off_on_a_gpu():
    """`--precision fp32` promises the exact fp32 path; torch leaves cuDNN's TF32 on by default (the patch embedding
    and every decoder convolution would round to 10-bit mantissas on a GPU): the commands turn it off for fp32 on a
    GPU, and generate's run record says what was on."""
    import torch

    from modeling.sampling import SamplingConfig, exact_fp32, tf32_flags
    saved = tf32_flags()  # (torch.backends.cuda.matmul's attributes are not monkeypatch's: set and restored here)
    try:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, True
        exact_fp32(SamplingConfig(precision="bf16"), torch.device("cuda"))
        exact_fp32(SamplingConfig(precision="fp32"), torch.device("cpu"))
        assert tf32_flags() == {"cudnn": True, "matmul": True}  # another precision, or no GPU: untouched
        exact_fp32(SamplingConfig(precision="fp32"), torch.device("cuda"))
        assert tf32_flags() == {"cudnn": False, "matmul": False}
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved["cudnn"], saved["matmul"]


def test_a_restarted_run_logs_the_rate_of_what_it_sampled(tmp_path, monkeypatch, capsys):
    """The chunks done before a restart start the log's count: added as updates at its first instant, they made
    the rate and eta of every line as if sampled at once (5,000 done, then 5 img/s, logged 171.7 img/s and an eta
    of seconds for minutes of work: a review, 2026-12-05)."""
    import sys

    from modeling import progress as prog
    dit, vae = _tiny()
    kw = dict(num_samples=8, steps=2, batch_size=2, seed=3)
    generate(dit, vae, tmp_path / "a.npz", progress=False, **kw)
    (tmp_path / "a.npz").unlink()
    sorted((tmp_path / "a.chunks").glob("chunk_*.npz"))[-1].unlink()  # 6 of 8 done, one chunk of 2 to sample
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    clock = iter(range(0, 10_000, 10)).__next__  # every reading 10 s after the previous one
    monkeypatch.setattr(prog.time, "monotonic", clock)
    capsys.readouterr()
    generate(dit, vae, tmp_path / "a.npz", progress=True, **kw)
    end = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sampling (rank 0)")]
    # the clock read at the start, at the one chunk's update and at the end: 2 images in 20 s (before: 8 in 50 s,
    # every skipped chunk an update)
    assert end == ["sampling (rank 0): 8/8 img (100%), 0.1 img/s, done in 0m20s"], end
