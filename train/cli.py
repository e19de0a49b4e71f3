"""Console entry points (setup.py `console_scripts`): `vavae-<command>` runs `python -m <module>`.

    vavae-train-dit --config configs/dit_tiny_cpu.yaml      ==  python -m train.train_dit --config ...

Each runs the module's `main(argv)` and turns what it returns into an exit status (a report dict or None
is success; an int is the status).
"""
import importlib
import sys

COMMANDS = {
    "vavae-train-dit": "train.train_dit",
    "vavae-train-vae": "train.train_vae",
    "vavae-data": "train.data.__main__",
    "vavae-sample": "modeling.sample_images",
    "vavae-generate": "bench.eval.generate",
    "vavae-fid": "bench.eval.fid",
    "vavae-tokenizer-metrics": "bench.eval.tokenizer_metrics",
    "vavae-parity": "bench.parity",
    "vavae-throughput": "bench.throughput",
    "vavae-compare": "bench.compare",
    "vavae-curves": "bench.curves",
    "vavae-ops-bench": "bench.ops_bench",
    "vavae-demo": "bench.demo",
}


def run(module, argv=None):
    rc = importlib.import_module(module).main(sys.argv[1:] if argv is None else argv)
    return rc if isinstance(rc, int) else 0


def _entry(name):
    def entry():
        return run(COMMANDS[name])
    entry.__name__ = name.removeprefix("vavae-").replace("-", "_")
    entry.__doc__ = f"{name}: python -m {COMMANDS[name].removesuffix('.__main__')}"
    return entry


for _name in COMMANDS:
    globals()[_name.removeprefix("vavae-").replace("-", "_")] = _entry(_name)


def console_scripts():
    """The setup.py list: 'vavae-train-dit = train.cli:train_dit', ..."""
    return [f"{n} = train.cli:{n.removeprefix('vavae-').replace('-', '_')}" for n in COMMANDS]
