"""The import layering, read from the source: examples -> bench -> train -> evaluation -> modeling -> kernels.

A module may import from its own package and from the packages below it, never from one above it, and
no set of modules may import each other in a cycle (function-local imports included: a cycle hidden in a
function is still a cycle). Loading a module by name (importlib.import_module("bench.x"), __import__) is
an import too; the only allowed one is modeling.config.console_entry, which loads the module it is
handed (its caller's own __name__)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("kernels", "modeling", "evaluation", "train", "bench", "examples")  # bottom to top
RANK = {p: i for i, p in enumerate(LAYERS)}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path):
    """(line, imported module name, how) for every import in the file, resolving relative imports."""
    mod = _module_name(path)
    package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name, "import"
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            yield node.lineno, name, "import"
            for a in node.names:  # `from pkg import submodule`
                yield node.lineno, f"{name}.{a.name}", "from-name"
        elif isinstance(node, ast.Call):
            fn = node.func
            called = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
            if called in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
                yield node.lineno, str(node.args[0].value), "by name"


def _graph():
    files = {_module_name(p): p for pkg in LAYERS for p in (ROOT / pkg).rglob("*.py")}
    edges = {}
    for mod, path in files.items():
        for line, name, how in _imports(path):
            target = next((m for m in (name, name.rsplit(".", 1)[0]) if m in files), None)
            if how == "from-name" and name not in files:
                continue
            if name.split(".")[0] in RANK:
                edges.setdefault(mod, []).append((line, target or name, how))
    return files, edges


def test_no_import_climbs_a_layer():
    files, edges = _graph()
    bad = []
    for mod, targets in edges.items():
        for line, target, how in targets:
            if RANK[target.split(".")[0]] > RANK[mod.split(".")[0]]:
                bad.append(f"{files[mod].relative_to(ROOT)}:{line} ({mod}) imports {target} [{how}]")
    assert not bad, "imports that climb a layer (" + " -> ".join(reversed(LAYERS)) + "):\n" + "\n".join(bad)


def test_no_import_cycles():
    files, edges = _graph()
    # a submodule naming its own package (`from . import x` where x is not a module) is Python's normal shape
    graph = {m: sorted({t for _, t, _ in edges.get(m, ()) if t in files and t != m and not m.startswith(t + ".")})
             for m in files}
    # Tarjan's strongly connected components
    index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not sccs, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in sccs)


def test_the_checker_sees_a_climb_and_a_cycle(tmp_path, monkeypatch):
    """The two tests above can fail: a planted back-edge and a planted cycle are reported."""
    for pkg in LAYERS:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "kernels" / "a.py").write_text("from modeling import b\n")
    (tmp_path / "modeling" / "b.py").write_text("import importlib\nimportlib.import_module('kernels.a')\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    files, edges = _graph()
    assert (1, "modeling.b", "from-name") in edges["kernels.a"]
    assert edges["modeling.b"] == [(2, "kernels.a", "by name")]
    try:
        test_no_import_climbs_a_layer()
    except AssertionError as e:
        assert "kernels/a.py:1" in str(e)
    else:
        raise AssertionError("the planted back-edge was not reported")
    try:
        test_no_import_cycles()
    except AssertionError as e:
        assert "kernels.a <-> modeling.b" in str(e)
    else:
        raise AssertionError("the planted cycle was not reported")
