"""The op registry: every declaration is complete, `kernels.ops` and the ops bench are derived from the
declarations, resolve returns the function that runs, an explicit backend that cannot run raises, and the
worked example of docs/kernels.md (a toy op) registers, runs, is benchmarked and unregisters."""
import importlib.util
import inspect
import os
import re
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():  # must precede the first import of the Triton kernels
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

import kernels  # noqa: E402
from kernels import BackendUnavailable, ops, registry  # noqa: E402
from kernels.registry import TINY, BenchCase, Op  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEV = "cuda" if torch.cuda.is_available() else "cpu"
# every shipped op (exactly: a new op joins the list, and with it every check below; three had been left out)
DECLARED_OPS = {"rms_norm", "layer_norm", "norm_modulate", "gated_residual_norm_modulate", "gated_residual", "swiglu",
                "rope_qk", "qkv_rope", "attention", "linear_swiglu", "quantize_rows_fp8", "swiglu_fp8",
                "swiglu_fp8_colmax", "rope_attention", "group_norm_silu", "quantize_rows_cols_fp8",
                "norm_modulate_fp8", "gated_residual_norm_modulate_fp8", "upsample_conv"}


@pytest.fixture(autouse=True)
def _restore_backend():
    yield
    kernels.set_backend("auto")


def _tensors(out):
    """An op's output as a flat list of tensors (tuples, and NamedTuples such as FP8Rows, unpacked)."""
    if isinstance(out, tuple):
        return [t for o in out for t in _tensors(o)]
    return [out]


def test_the_models_ops_are_registered():
    assert set(registry.registered()) == DECLARED_OPS
    assert set(kernels.describe()["registered"]) == set(registry.registered())


@pytest.mark.parametrize("name", sorted(DECLARED_OPS))
def test_every_declaration_is_complete(name):
    """A reference, at least one backend implementation, a bench case that runs; kernels.ops.<name> has the
    reference's signature; no implementation takes a backend name."""
    op = registry.get(name)
    assert callable(op.reference) and op.doc
    assert op.impls and set(op.impls) <= set(registry.FUSED_BACKENDS)
    ref_params = inspect.signature(op.reference).parameters
    for backend, fn in op.impls.items():
        params = inspect.signature(fn).parameters
        assert "backend" not in params and list(params) == list(ref_params), (backend, list(params))
    assert inspect.signature(getattr(ops, name)) == inspect.signature(op.reference)
    assert name in ops.__all__
    case = op.bench(TINY, "cpu", torch.float32)
    assert isinstance(case, BenchCase) and case.fwd_bytes > 0 and case.inputs
    outs = _tensors(case.call(op.reference, *[t.detach() for t in case.inputs]))
    assert outs and all(isinstance(o, torch.Tensor) and torch.isfinite(o.float()).all() for o in outs)
    assert registry.XL1.rows == 65536 and registry.XL1.C == 1152


@pytest.mark.parametrize("name", sorted(DECLARED_OPS))
def test_resolve_returns_a_plain_function_per_backend(name):
    """Under each backend, resolve hands back the declared function itself (a plain function or a method of the
    backend's op object), never the dispatcher, and records what runs."""
    op = registry.get(name)
    x = op.bench(TINY, DEV, torch.float32).inputs[0]
    kernels.set_backend("reference")
    assert registry.resolve(name, x) is op.reference
    assert kernels.describe()["ops"][name] == "reference"
    kernels.set_backend("triton")
    fn = registry.resolve(name, x)
    assert fn == op.impls["triton"] and (inspect.isfunction(fn) or inspect.ismethod(fn))
    assert fn is not getattr(ops, name)
    if not op.records_itself:
        assert kernels.describe()["ops"][name] == "triton"


@pytest.mark.parametrize("name", sorted(DECLARED_OPS))
def test_an_explicit_backend_that_cannot_run_raises(name, monkeypatch):
    op = registry.get(name)
    x = op.bench(TINY, "cpu", torch.float32).inputs[0]
    kernels.set_backend("cuda")
    with pytest.raises(BackendUnavailable, match="cuda"):
        registry.resolve(name, x)  # a CPU tensor (and no extension built here)
    kernels.set_backend("triton")
    monkeypatch.setattr("kernels._triton.interpreting", lambda: False)
    if DEV == "cpu":
        with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET"):
            getattr(ops, name)(*op.bench(TINY, "cpu", torch.float32).inputs[:1])


def test_declarations_are_checked_and_a_missing_backend_is_named():
    ref = lambda x: x  # noqa: E731
    bench = lambda s, d, t: BenchCase([torch.zeros(1)], lambda f, x: f(x), 1)  # noqa: E731
    with pytest.raises(ValueError, match="identifier"):
        Op(name="not-a-name", reference=ref, impls={"triton": ref}, bench=bench, doc="x")
    with pytest.raises(ValueError, match="impls"):
        Op(name="toy", reference=ref, impls={"cublas": ref}, bench=bench, doc="x")
    with pytest.raises(ValueError, match="impls"):
        Op(name="toy", reference=ref, impls={}, bench=bench, doc="x")
    with pytest.raises(ValueError, match="already registered"):
        registry.register(registry.get("swiglu"))
    with pytest.raises(ValueError, match="shadow"):
        registry.register(Op(name="modulate", reference=ref, impls={"cuda": ref}, bench=bench, doc="x"))
    cuda_only = registry.register(Op(name="toy_cuda_only", reference=ref, impls={"cuda": ref}, bench=bench,
                                     doc="an op with a CUDA kernel only"))
    try:
        kernels.set_backend("triton")
        with pytest.raises(BackendUnavailable, match="toy_cuda_only has no Triton implementation"):
            ops.toy_cuda_only(torch.zeros(1, device=DEV))
        kernels.set_backend("auto")
        assert ops.toy_cuda_only(torch.ones(1)) == 1 and kernels.describe()["ops"]["toy_cuda_only"] == "reference"
    finally:
        registry.unregister(cuda_only.name)
    assert not hasattr(ops, "toy_cuda_only") and "toy_cuda_only" not in kernels.describe()["ops"]


def _load_docs_example():
    """The `kernels/scale_add.py` block of docs/kernels.md, imported as that module (its relative imports
    resolve against the kernels package), which registers it."""
    text = (REPO / "docs" / "kernels.md").read_text()
    m = re.search(r"<!-- example: kernels/scale_add.py -->\n```python\n(.*?)```", text, re.S)
    assert m, "docs/kernels.md lost its worked example"
    return m.group(1)


def test_the_docs_worked_example_adds_an_op(tmp_path):
    from bench import ops_bench
    path = tmp_path / "scale_add.py"
    path.write_text(_load_docs_example())
    assert "scale_add" not in registry.registered()
    spec = importlib.util.spec_from_file_location("kernels.scale_add", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)  # its register(...) line runs
        assert "scale_add" in registry.registered() and "scale_add" in ops.__all__
        x, y = (torch.randn(3, 37, 40, device=DEV, dtype=torch.float32, requires_grad=True) for _ in range(2))
        kernels.set_backend("triton")
        assert kernels.resolve("scale_add", x) is module.scale_add_triton
        out = ops.scale_add(x, y, 0.5)
        assert kernels.describe()["ops"]["scale_add"] == "triton"
        gx, gy = torch.autograd.grad(out.sum(), [x, y])
        torch.testing.assert_close(out, module.scale_add_reference(x, y, 0.5))
        torch.testing.assert_close(gy, torch.full_like(y, 0.5))
        torch.testing.assert_close(gx, torch.ones_like(x))
        torch.library.opcheck(module.scale_add_op, (x, y, 0.5))
        kernels.set_backend("reference")
        assert kernels.resolve("scale_add", x) is module.scale_add_reference
        assert "scale_add" in ops_bench.cases(True, "cpu", torch.float32)
        rows = ops_bench.run(smoke=True, dtype=torch.float32, names=["scale_add"])
        assert set(rows) == {"scale_add"}
        assert set(rows["scale_add"]) == {"reference", "compiled_reference", "triton"}
        assert rows["scale_add"]["triton"]["ran"] == "triton", rows
        assert rows["scale_add"]["triton"]["rel_err_vs_fp32"] < 1e-6 and rows["scale_add"]["triton"]["fwd_bwd_ms"] > 0
        # ours against torch.compile(reference) on the same case: inductor's time / ours, and the printed line
        ours, inductor = rows["scale_add"]["triton"], rows["scale_add"]["compiled_reference"]
        assert ours["fwd_bwd_x_compiled_reference"] == pytest.approx(inductor["fwd_bwd_ms"] / ours["fwd_bwd_ms"])
        assert ours["fwd_x_compiled_reference"] == pytest.approx(inductor["fwd_ms"] / ours["fwd_ms"])
        (line,) = ops_bench.versus_inductor(rows)
        assert line.startswith("scale_add") and f"= {ours['fwd_bwd_x_compiled_reference']:.2f}x" in line
        assert kernels.get_backend() == "reference"  # the bench restores the switch it found,
        assert kernels.describe()["ops"]["scale_add"] == "triton"  # and what its last row ran stays on record
        assert "scale_add" in kernels.describe()["registered"]
    finally:
        if "scale_add" in registry.registered():
            registry.unregister("scale_add")
        sys.modules.pop(spec.name, None)
    assert not hasattr(ops, "scale_add") and "scale_add" not in registry.registered()
    assert "scale_add" not in ops_bench.cases(True, "cpu", torch.float32)
    assert "scale_add" not in kernels.describe()["registered"]


def test_dispatch_through_ops_is_one_hop_under_compile():
    """kernels.ops.<name> traces with fullgraph=True (resolve is plain Python dynamo folds away) and gives the
    reference's values."""
    torch._dynamo.reset()
    x, w = torch.randn(2, 5, 16, device=DEV), torch.randn(16, device=DEV)
    kernels.set_backend("triton")
    out = torch.compile(lambda x, w: ops.rms_norm(x, w, 1e-6), backend="eager", fullgraph=True)(x, w)
    torch.testing.assert_close(out, kernels.reference.rms_norm(x, w, 1e-6), rtol=1e-5, atol=1e-5)
    assert kernels.describe()["ops"]["rms_norm"] == "triton"


def test_a_compiled_graph_is_not_traced_again_when_other_ops_first_run():
    """What ran is recorded from inside compiled graphs (replayed on every call, so describe() stays right after a
    set_backend) without the graph guarding on the record: another op running for the first time after the trace
    (the DiT's final layer after its first block, the VA-VAE's decoder after its encoder body) recompiled it."""
    torch._dynamo.reset()
    kernels.set_backend("reference")
    x, w = torch.randn(2, 5, 16, device=DEV), torch.randn(16, device=DEV)
    f = torch.compile(lambda x, w: ops.rms_norm(x, w, 1e-6) * 2, backend="eager", fullgraph=True)
    f(x, w)
    ops.layer_norm(x, w)  # an op's first record after the trace
    with torch._dynamo.config.patch(error_on_recompile=True):
        f(x, w)
        kernels.set_backend("reference")  # clears what ran; the next call records it again
        f(x, w)
    assert kernels.describe()["ops"] == {"rms_norm": "reference"}


# ------------------------------------------------------------------ what auto runs under torch.compile

def test_every_op_has_a_compiled_choice_backed_by_its_measurement():
    """kernels/compiled_choices.json: every shipped op has an entry; a measured entry's decision is the faster of
    its two recorded times and its result file is in the repository; an unmeasured one says why; `follows` names
    an entry. The registry's view (compiled_prefers_reference) is the table's."""
    table = registry.compiled_choices()
    env = table["measured_on"]["environment"]
    assert (env.get("card") or env.get("device")) and env["commit"] and table["doc"]
    assert kernels.describe()["compiled_choices"]["results"] == table["measured_on"]["results"]
    assert DECLARED_OPS <= set(table["ops"])
    for name, e in table["ops"].items():
        if "follows" in e:
            assert e["follows"] in table["ops"] and e["why"], name
        elif "why" in e:
            assert e["under_compile"] == "ours" and len(e["why"]) > 20, name
        else:
            assert e["under_compile"] == ("ours" if e["ours_ms"] < e["inductor_ms"] else "reference"), name
            # "fwd_bwd kernel" / "fwd kernel": decided on the kernels' device time (bench/compiled_choices.py)
            assert e["ours"] in registry.FUSED_BACKENDS and e["timed"] in ("fwd", "fwd_bwd", "fwd kernel",
                                                                           "fwd_bwd kernel")
            assert e["timed"].endswith("kernel") == ("ours_wall_ms" in e and "inductor_wall_ms" in e), name
            assert (REPO / e["results"]).is_file(), e["results"]
            if "inference" in e:  # the forward's own decision, on kernel time only
                f = e["inference"]
                assert f["timed"] == "fwd kernel" and "ours_wall_ms" in f, name
                assert f["under_compile"] == ("ours" if f["ours_ms"] < f["inductor_ms"] else "reference"), name
    prefer = {n for n in DECLARED_OPS if registry.compiled_choice(n) == "reference"}
    assert registry.compiled_prefers_reference() == prefer
    prefer = {n for n in DECLARED_OPS if registry.compiled_choice(n, inference=True) == "reference"}
    assert registry.compiled_prefers_reference(inference=True) == prefer
    assert registry.compiled_choice("layer_norm") == registry.compiled_choice("rms_norm")
    assert registry.compiled_choice("no_such_op") == "ours"  # a new op runs ours until measured


def test_the_table_is_what_its_measurement_gives():
    """Regenerating the table from the result file it names reproduces it: the decisions are the measurement's."""
    import json

    from bench import compiled_choices
    table = registry.compiled_choices()
    source = table["measured_on"]["results"]
    again = compiled_choices.choices(json.loads((REPO / source).read_text()), source, base=table,
                                     note=table["measured_on"].get("note", ""))
    assert again == table


def test_choices_from_a_new_measurement(tmp_path):
    """A GPU run where our kernel beats inductor flips the op to ours (fwd+bwd when both were timed, forward for
    an inference op, the fastest of our backends); an op the run does not time, or whose row failed, keeps its
    entry; the CLI writes the table and refuses a file without an ops table in one line."""
    import json

    from bench import compiled_choices
    base = registry.compiled_choices()
    result = {"environment": {"card": "NVIDIA H100 80GB HBM3", "commit": "abc"}, "sections": {"ops": {
        "rms_norm": {"compiled_reference": {"fwd_ms": 0.1, "fwd_bwd_ms": 0.4}, "triton": {"fwd_ms": 0.1,
                     "fwd_bwd_ms": 0.35}, "cuda": {"fwd_ms": 0.1, "fwd_bwd_ms": 0.30}},
        "swiglu_fp8": {"compiled_reference": {"fwd_ms": 0.2}, "triton": {"fwd_ms": 0.3}},
        "rope_qk": {"compiled_reference": {"fwd_ms": 0.1, "fwd_bwd_ms": 0.4}, "triton": {"error": "OOM"}},
        "attention": {}}}}
    t = compiled_choices.choices(result, "run.json", base)
    assert t["measured_on"] == {"results": "run.json", "environment": result["environment"]}
    assert t["ops"]["rms_norm"] == {"under_compile": "ours", "timed": "fwd_bwd", "ours": "cuda", "ours_ms": 0.3,
                                    "inductor_ms": 0.4, "results": "run.json"}
    assert t["ops"]["swiglu_fp8"]["under_compile"] == "reference" and t["ops"]["swiglu_fp8"]["timed"] == "fwd"
    assert t["ops"]["rope_qk"] == base["ops"]["rope_qk"] and t["ops"]["attention"] == base["ops"]["attention"]
    src, out = tmp_path / "run.json", tmp_path / "choices.json"
    src.write_text(json.dumps(result))
    out.write_text(json.dumps(base))
    compiled_choices.main([str(src), "--write", str(out)])
    assert json.loads(out.read_text())["ops"]["rms_norm"]["under_compile"] == "ours"
    src.write_text(json.dumps({"sections": {"ceilings": {}}}))
    with pytest.raises(SystemExit, match=r"bench.compiled_choices: .*run.json: no ops table"):
        compiled_choices.main([str(src)])
