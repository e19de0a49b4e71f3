"""Issue 21, weights a user hands us: nothing unpickles outside modeling/safe_load.py (an AST scan of the
source), weights_only=True holds with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 set, lying safetensors headers, npz
object arrays, config.json files with an extra key, an absurd size or invalid values, and paths that are a
FIFO or a symlink loop are refused in one line naming the file (exit 2 at the command line); the modeling
and train.data import cycles are gone."""
import ast
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from modeling.lightningdit import LightningDiT
from modeling.released import CheckpointMismatchError
from modeling.safe_load import (CheckpointLoadError, CorruptCheckpointError, NotAFileError, UnsafeCheckpointError,
                                load_npz, load_safetensors, safe_torch_load)
from modeling.vavae import AutoencoderKL

REPO = Path(__file__).resolve().parents[1]
DIT = dict(input_size=4, patch_size=1, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=3)
VAE = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), resolution=8, z_channels=4, embed_dim=4)


class Payload:
    """Unpickling this runs `touch MARKER`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _one_line_naming(text, path):
    text = str(text).strip()
    assert "\n" not in text, text
    assert str(path) in text or Path(path).name in text, text
    return text


# ----------------------------------------------------------------------------- no unpickling anywhere else

SCANNED = ("kernels", "modeling", "evaluation", "train", "bench", "examples")
THE_SAFE_LOADER = Path("modeling/safe_load.py")
UNPICKLING_CALLS = {"torch.load", "torch.jit.load", "torch.serialization.load", "torch.package.PackageImporter",
                    "pickle.load", "pickle.loads", "pickle.Unpickler", "pickle._Unpickler", "_pickle.load",
                    "_pickle.loads", "cPickle.load", "cPickle.loads", "dill.load", "dill.loads", "cloudpickle.load",
                    "cloudpickle.loads", "joblib.load", "pandas.read_pickle", "marshal.load", "marshal.loads",
                    "shelve.open", "numpy.lib.format.read_array"}
UNPICKLING_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}


def unpickling_sites(source, filename="<source>"):
    """[(line, what)] for every call that can unpickle (or load code) in `source`: the calls above under any
    import alias, numpy.load with allow_pickle anything but a literal False, and imports of pickle-like modules."""
    tree = ast.parse(source, filename)
    alias = {}  # local name -> dotted name it stands for
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                alias[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
                if a.name.split(".")[0] in UNPICKLING_MODULES:
                    found.append((node.lineno, f"import {a.name}"))
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                alias[a.asname or a.name] = f"{node.module}.{a.name}"
            if node.module.split(".")[0] in UNPICKLING_MODULES:
                found.append((node.lineno, f"from {node.module} import ..."))

    def dotted(fn):
        parts = []
        while isinstance(fn, ast.Attribute):
            parts.append(fn.attr)
            fn = fn.value
        if not isinstance(fn, ast.Name):
            return None
        parts.append(alias.get(fn.id, fn.id))
        return ".".join(reversed(parts))

    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = dotted(node.func)
        if name is None:
            continue
        if name in UNPICKLING_CALLS:
            found.append((node.lineno, name))
        elif name in ("numpy.load", "numpy.lib.npyio.load"):
            flag = next((k.value for k in node.keywords if k.arg == "allow_pickle"), None)
            if flag is not None and not (isinstance(flag, ast.Constant) and flag.value is False):
                found.append((node.lineno, "numpy.load(allow_pickle=...)"))
    return sorted(found)


def test_the_scan_sees_every_form_of_unpickling():
    """The scan below can fail: aliases, from-imports and allow_pickle=True are seen; safe calls are not."""
    planted = (
        "import torch as t\nfrom torch.jit import load as jl\nimport numpy as np\nimport pickle\n"
        "t.load('x')\njl('y')\nnp.load('z', allow_pickle=True)\nnp.load('ok')\nnp.load('ok', allow_pickle=False)\n"
        "pickle.loads(b'')\nfrom torch import load\nload('w')\nimport torch\ntorch.serialization.load('v')\n")
    got = [what for _, what in unpickling_sites(planted)]
    assert got.count("torch.load") == 2 and "torch.jit.load" in got and "import pickle" in got
    assert "numpy.load(allow_pickle=...)" in got and "pickle.loads" in got and "torch.serialization.load" in got
    assert len(got) == 7, got


def test_nothing_unpickles_outside_the_safe_loader():
    bad = []
    for pkg in SCANNED:
        for path in sorted((REPO / pkg).rglob("*.py")):
            rel = path.relative_to(REPO)
            if rel == THE_SAFE_LOADER:
                continue
            bad += [f"{rel}:{line} {what}" for line, what in unpickling_sites(path.read_text(), str(rel))]
    assert not bad, ("unpickling outside modeling/safe_load.py (use safe_torch_load / load_safetensors / load_npz / "
                     "load_torchscript_tensors):\n" + "\n".join(bad))


def test_the_safe_loader_passes_weights_only_true_explicitly():
    """Every torch.load in safe_load.py says weights_only=True itself (an environment variable only changes
    torch's default), and its pickle use is the restricted unpicklers alone."""
    tree = ast.parse((REPO / THE_SAFE_LOADER).read_text())
    loads = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
             and n.func.id == "_torch_load"]
    assert loads, "safe_load.py no longer calls torch.load through _torch_load: update this test"
    for call in loads:
        kw = {k.arg: k.value for k in call.keywords}
        assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, call.lineno
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                isinstance(node.func.value, ast.Name) and node.func.value.id == "pickle":
            assert node.func.attr == "UnpicklingError", f"safe_load.py:{node.lineno} pickle.{node.func.attr}"


# ----------------------------------------------------------------------------- TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD

def test_forcing_weights_only_off_globally_does_not_reach_our_loaders(tmp_path, monkeypatch):
    from modeling.checkpoint import load_dit_checkpoint
    from modeling.hub import load_latent_stats
    marker = tmp_path / "PAYLOAD_RAN"
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # the common global workaround
    evil = tmp_path / "latents_stats.pt"
    torch.save({"mean": Payload(marker), "std": torch.ones(1, 4, 1, 1)}, evil)
    with pytest.warns(UserWarning, match="TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
        torch.load(evil)  # the variable is live: torch's default load now runs the payload
    assert marker.exists()
    marker.unlink()
    for load in (lambda p: safe_torch_load(p, "latent stats"), load_latent_stats,
                 lambda p: load_dit_checkpoint(p, LightningDiT(**DIT)),
                 lambda p: LightningDiT.from_pretrained(p)):
        with pytest.raises(UnsafeCheckpointError) as e:
            load(evil)
        _one_line_naming(e.value, evil)
    assert not marker.exists()


# ----------------------------------------------------------------------------- malformed files

def _safetensors_with_header(path, header, data=b""):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_lying_safetensors_headers_are_refused_before_reading(tmp_path):
    from modeling.hub import load_latent_stats
    cases = {
        "huge.safetensors": {"w": {"dtype": "F32", "shape": [10 ** 12], "data_offsets": [0, 4 * 10 ** 12]}},
        "short.safetensors": {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}},
        "overlap.safetensors": {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
        "dtype.safetensors": {"w": {"dtype": "PY_OBJECT", "shape": [1], "data_offsets": [0, 1]}},
        "negative.safetensors": {"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}},
    }
    for name, header in cases.items():
        path = _safetensors_with_header(tmp_path / name, header, b"\0" * 16)
        with pytest.raises(CorruptCheckpointError) as e:
            load_safetensors(path, "weights")
        _one_line_naming(e.value, path)
    (tmp_path / "length.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(CorruptCheckpointError, match="length.safetensors.*header length"):
        load_safetensors(tmp_path / "length.safetensors")
    # the public readers of safetensors files take the same path
    huge = tmp_path / "huge.safetensors"
    with pytest.raises(CorruptCheckpointError, match="huge.safetensors"):
        load_latent_stats(huge)
    with pytest.raises(CorruptCheckpointError, match="huge.safetensors"):
        LightningDiT.from_pretrained(huge)
    good = tmp_path / "good.safetensors"
    save_file({"mean": torch.zeros(1, 4, 1, 1), "std": torch.ones(1, 4, 1, 1)}, str(good))
    assert load_latent_stats(good)["std"].shape == (1, 4, 1, 1)


def test_npz_object_arrays_are_refused_by_name(tmp_path):
    np.savez(tmp_path / "ok.npz", arr_0=np.zeros((2, 3), np.uint8))
    assert load_npz(tmp_path / "ok.npz")["arr_0"].shape == (2, 3)
    np.savez(tmp_path / "evil.npz", arr_0=np.array([Payload(tmp_path / "ran"), 1], dtype=object))
    with pytest.raises(UnsafeCheckpointError) as e:
        load_npz(tmp_path / "evil.npz")
    assert "arr_0" in _one_line_naming(e.value, tmp_path / "evil.npz") and "object array" in str(e.value)
    (tmp_path / "cut.npz").write_bytes((tmp_path / "ok.npz").read_bytes()[:50])
    with pytest.raises(CorruptCheckpointError, match="cut.npz"):
        load_npz(tmp_path / "cut.npz")
    assert not (tmp_path / "ran").exists()


def _folder(tmp_path, name="dit"):
    torch.manual_seed(0)
    LightningDiT(**DIT).save_pretrained(tmp_path / name)
    return tmp_path / name


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("change, says", [
    (dict(extra_key=1), "extra_key"),
    (dict(num_heads=0), "num_heads"),
    (dict(depth=-1), "depth"),
    (dict(patch_size=0), "patch_size"),
    (dict(hidden_size="wide"), "hidden_size"),
])
def test_invalid_config_json_names_the_file_and_key(tmp_path, change, says):
    folder = _folder(tmp_path)
    _edit_config(folder, **change)
    with pytest.raises(CheckpointLoadError) as e:
        LightningDiT.from_pretrained(folder)
    text = _one_line_naming(e.value, folder / "config.json")
    assert says in text


def test_a_config_asking_for_a_100_tb_model_is_refused_before_allocating(tmp_path):
    """The config is compared with the weights' header on the meta device: the refusal names config.json, the
    size it asks for and the weights file (before, the CPU allocator's own error, or an OOM kill)."""
    folder = _folder(tmp_path)
    weights = folder / "model.safetensors"
    for change, size in ((dict(hidden_size=8 * 10 ** 6), "PB"), (dict(num_classes=10 ** 13), "PB"),
                         (dict(depth=10 ** 6), "depth=1000000")):
        _edit_config(folder, **{**DIT, **change})
        with pytest.raises(CheckpointMismatchError) as e:
            LightningDiT.from_pretrained(folder)
        text = _one_line_naming(e.value, folder / "config.json")
        assert str(weights) in text and size in text, text
    _edit_config(folder, **{**DIT, "depth": 3})  # a near miss still lists the keys
    with pytest.raises(CheckpointMismatchError, match=r"missing key.*blocks\.2"):
        LightningDiT.from_pretrained(folder)
    _edit_config(folder, **DIT)
    assert LightningDiT.from_pretrained(folder).config.depth == 2


def test_a_folder_with_a_bad_config_is_exit_2_at_the_command_line(tmp_path, capsys):
    from train.data.__main__ import main
    vae = tmp_path / "vae"
    AutoencoderKL(**VAE).save_pretrained(vae)
    cfg = json.loads((vae / "config.json").read_text())
    cfg["ch"] = 10 ** 7
    (vae / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "images" / "a").mkdir(parents=True)
    with pytest.raises(SystemExit) as e:
        main(["extract", str(tmp_path / "images"), str(tmp_path / "lat"), "--vae", str(vae)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "Traceback" not in err
    _one_line_naming(err, vae / "config.json")


def test_extract_given_a_dit_folder_as_vae_is_one_line_and_writes_nothing(tmp_path, capsys):
    """Was a traceback (the DiT has no encode) after extract.json recorded the DiT's hash, which then refused the
    corrected command."""
    from train.data.__main__ import main
    LightningDiT(**DIT).save_pretrained(tmp_path / "dit")
    (tmp_path / "images" / "a").mkdir(parents=True)
    with pytest.raises(SystemExit) as e:
        main(["extract", str(tmp_path / "images"), str(tmp_path / "lat"), "--vae", str(tmp_path / "dit")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "holds a 'lightningdit' model, not a 'vavae'" in err and "\n" not in err
    assert not (tmp_path / "lat").exists()


# ----------------------------------------------------------------------------- odd paths

@pytest.fixture
def odd_paths(tmp_path):
    fifo = tmp_path / "dit.pt"
    os.mkfifo(fifo)
    loop = tmp_path / "loop"
    os.symlink(tmp_path / "loop2", loop)
    os.symlink(loop, tmp_path / "loop2")
    dangling = tmp_path / "gone"
    os.symlink(tmp_path / "nowhere" / "model", dangling)
    return {"FIFO": fifo, "symbolic link loop": loop, "dangling symbolic link": dangling}


def test_a_fifo_or_a_link_loop_is_named_as_what_it_is(odd_paths):
    for says, path in odd_paths.items():
        for load in (LightningDiT.from_pretrained, AutoencoderKL.from_pretrained,
                     lambda p: safe_torch_load(p, "checkpoint"), load_safetensors):
            with pytest.raises(NotAFileError) as e:
                load(path)
            text = _one_line_naming(e.value, path)
            assert says in text and "Repo id" not in text, text


def test_sample_images_dit_fifo_is_exit_2(odd_paths, tmp_path, capsys):
    from modeling.sample_images import main
    for says, path in odd_paths.items():
        with pytest.raises(SystemExit) as e:
            main(["--dit", str(path), "--vae", str(tmp_path), "--labels", "0", "--out", str(tmp_path / "s.png"),
                  "--device", "cpu"])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and says in err and "Repo id" not in err, err


# ----------------------------------------------------------------------------- modeling.convert

def test_convert_refusing_a_malicious_file_exits_2(tmp_path, capsys):
    from modeling.convert import main
    marker = tmp_path / "ran"
    evil = tmp_path / "lightningdit-xl.pt"
    torch.save({"ema": {"w": torch.zeros(1)}, "evil": Payload(marker)}, evil)
    with pytest.raises(SystemExit) as e:
        main([str(evil), str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and not marker.exists()
    _one_line_naming(err, evil)
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "absent.pt"), str(tmp_path / "out")])
    assert e.value.code == 2 and "absent.pt" in capsys.readouterr().err


def test_crafted_released_files_are_one_line_and_never_built(tmp_path, monkeypatch):
    """A released-format .pt is read for its architecture: zero-sized dimensions (divided by), a number where a
    tensor belongs, non-string keys, and a small file whose keys describe 300 blocks gave tracebacks, or built the
    model before checking it against the weights; a file of stride-0 or overlapping views with every shape right
    passed that check and was built whole (a 361 KB file, 27 GiB of parameters)."""
    from modeling.released import build_released
    real = LightningDiT(**DIT).state_dict()
    built = []
    init = LightningDiT.__init__

    def init_outside_meta_refused(self, *args, **kwargs):
        if torch.empty(0).device.type != "meta":
            built.append(kwargs.get("depth"))
            assert kwargs.get("depth", 0) < 100, "built before the weights were checked"
        init(self, *args, **kwargs)
    monkeypatch.setattr(LightningDiT, "__init__", init_outside_meta_refused)
    wide = {k: torch.zeros(()).expand(*[1152 if d == 32 else d for d in v.shape]) for k, v in real.items()}
    cases = {"zero": ({"ema": {**real, "x_embedder.proj.weight": torch.zeros(0, 4, 1, 1)}}, "every dimension"),
             "patch0": ({"ema": {**real, "x_embedder.proj.weight": torch.zeros(32, 4, 0, 0)}}, "every dimension"),
             "number": ({"ema": {"x_embedder.proj.weight": 5}}, "not a tensor"),
             "intkey": ({"ema": {1: torch.zeros(1)}}, "parameter names"),
             "mixed": ({"model": {}, 1: 2}, "no 'ema' entry"),
             "deep": ({"ema": {**real, **{f"blocks.{i}.x": torch.zeros(()) for i in range(300)}}}, "missing key"),
             "wide": ({"ema": {**wide, **{f"blocks.{i}.x": torch.zeros(()) for i in range(300)}}}, "not stored"),
             # every shape right, every tensor a stride-0 view: the meta check passes it, the real build would not
             "expanded": ({"ema": {k: torch.zeros(()).expand(v.shape) for k, v in real.items()}}, "not stored"),
             "overlapping": ({"ema": {**real, "pos_embed": torch.zeros(48).as_strided((1, 16, 32), (512, 1, 1))}},
                             "not stored")}
    for name, (content, says) in cases.items():
        path = tmp_path / f"{name}.pt"
        torch.save(content, path)
        with pytest.raises(CheckpointMismatchError, match=says) as e:
            build_released(LightningDiT, "lightningdit", path)
        _one_line_naming(e.value, path)
    assert built == []
    vae = tmp_path / "vae.pt"
    torch.save({"state_dict": {"encoder.conv_in.weight": torch.zeros(0, 3, 3, 3)}}, vae)
    with pytest.raises(CheckpointMismatchError, match="every dimension") as e:
        build_released(AutoencoderKL, "vavae", vae)
    _one_line_naming(e.value, vae)
    torch.save({"ema": real}, tmp_path / "good.pt")  # and a real one still loads
    assert build_released(LightningDiT, "lightningdit", tmp_path / "good.pt")[0].config.depth == 2 and built == [2]


def test_a_mismatch_is_one_line():
    m = LightningDiT(**DIT)
    sd = {k: v for k, v in m.state_dict().items() if not k.startswith("blocks.1.")}
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError) as e:
        from modeling.released import load_state_dict_strict
        load_state_dict_strict(m, sd, "x.pt")
    assert "\n" not in str(e.value) and "missing" in str(e.value) and "unexpected" in str(e.value)


# ----------------------------------------------------------------------------- import cycles

def test_modeling_and_train_data_import_one_way():
    """The cycles of issue 21 (function-local imports count): modeling.checkpoint <-> convert <-> hub <->
    lightningdit <-> vavae, and train.data.dali <-> train.data.images."""
    from tests.test_layers import _graph
    files, edges = _graph()
    graph = {m: {t for _, t, _ in edges.get(m, ()) if t in files and t != m} for m in files}

    def reaches(a, b):
        seen, todo = set(), [a]
        while todo:
            v = todo.pop()
            for w in graph.get(v, ()):
                if w == b:
                    return True
                if w not in seen:
                    seen.add(w)
                    todo.append(w)
        return False
    for a, b in (("modeling.hub", "modeling.lightningdit"), ("modeling.hub", "modeling.vavae"),
                 ("modeling.hub", "modeling.convert"), ("modeling.hub", "modeling.checkpoint"),
                 ("modeling.checkpoint", "modeling.convert"), ("modeling.released", "modeling.hub"),
                 ("train.data.dali", "train.data.images")):
        assert not (reaches(a, b) and reaches(b, a)), f"{a} and {b} import each other"
