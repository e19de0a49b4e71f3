"""The op registry: one `Op` declaration per op, and `resolve`, which returns the function that runs.

An op module declares each of its ops once, next to its kernels and their custom-op registration:

    register(Op(name="swiglu", reference=reference.swiglu, impls={"triton": swiglu_triton},
                bench=_bench_case, doc="silu(a) * b from the packed w12 output"))

From the declarations:
- `kernels.ops.<name>` is the op's dispatcher: `resolve(name, first argument)(*args)`;
- `resolve(name, x)` returns the reference or one backend's function for x under the active backend
  (kernels.backend.choose); that function takes the op's arguments only, never a backend name;
- bench/ops_bench.py times every registered op on the case its `bench` factory builds;
- tests/test_kernels_registry.py checks every declaration (a reference, an implementation, a bench case).
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Optional

import torch

from . import backend, ops

FUSED_BACKENDS = ("triton", "cuda")  # the backends an op may implement besides its reference


@dataclasses.dataclass(frozen=True)
class BenchShape:
    """The sizes a benchmark case is built from: LightningDiT-XL/1 at batch 256 (256 tokens, hidden 1152, 16 heads
    of 72, SwiGLU hidden 3072: 65,536 rows of 1152), or tiny ones that run on the CPU in a second (`smoke`)."""
    B: int    # batch
    N: int    # tokens per sample
    C: int    # hidden size
    H: int    # attention heads
    D: int    # head_dim
    F: int    # SwiGLU hidden size (w12 has 2F outputs)
    smoke: bool

    @property
    def rows(self) -> int:
        return self.B * self.N


# batch 256: each (B, N, C) bf16 activation (151 MB) is several times the 50-60 MB L2, so DRAM is measured
XL1 = BenchShape(B=256, N=256, C=1152, H=16, D=72, F=3072, smoke=False)
TINY = BenchShape(B=2, N=9, C=40, H=2, D=8, F=48, smoke=True)


@dataclasses.dataclass
class BenchCase:
    """One op's benchmark: `call(fn, *inputs)` runs fn (the op's reference or a backend's function, or
    `kernels.ops.<name>`) on `inputs`. Bytes are the fewest the op must move (each input read once, each output
    written once): GB/s is reported against them; flops, where given, give TFLOP/s (compute-bound ops)."""
    inputs: list[torch.Tensor]     # leaves; requires_grad where the backward is timed
    call: Callable[..., Any]
    fwd_bytes: int
    bwd_bytes: int = 0             # 0: forward only (an inference op: its backward is not a kernel of ours)
    fwd_flops: int = 0
    bwd_flops: int = 0
    shape: dict = dataclasses.field(default_factory=dict)  # the sizes, as recorded in the result

    @property
    def backward(self) -> bool:
        return self.bwd_bytes > 0


BenchFactory = Callable[[BenchShape, str, torch.dtype], BenchCase]  # (shape, device, dtype) -> case


@dataclasses.dataclass(frozen=True)
class Op:
    """The declaration of one op.

    name: the `kernels.ops` attribute. reference: the plain PyTorch semantics (the contract: every
    implementation has its signature and matches it). impls: {"triton": fn, "cuda": fn}, each a launcher for
    one backend. bench: builds the op's benchmark case. doc: one line, what is fused.
    records_itself: the implementation reports what ran (attention: its measured choice) instead of the backend
    name. What `auto` runs inside a torch.compile trace is not declared here: it is measured, and
    kernels/compiled_choices.json holds the decision with its evidence (see `compiled_choice`)."""
    name: str
    reference: Callable[..., Any]
    impls: Mapping[str, Callable[..., Any]]
    bench: BenchFactory
    doc: str
    records_itself: bool = False

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"op name {self.name!r} is not a Python identifier (it becomes kernels.ops.{self.name})")
        unknown = set(self.impls) - set(FUSED_BACKENDS)
        if unknown or not self.impls:
            raise ValueError(f"op {self.name}: impls must map some of {FUSED_BACKENDS} to functions, got "
                             f"{sorted(self.impls)}")


_OPS: dict[str, Op] = {}
CHOICES_FILE = Path(__file__).with_name("compiled_choices.json")


def _load_choices(path: Path = CHOICES_FILE) -> dict:
    """The committed table (bench/compiled_choices.py writes it from a GPU run's ops table)."""
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RuntimeError(f"kernels: cannot read {path}: {e}") from None
    return table


_CHOICES = _load_choices()


def compiled_choice(name: str, inference: bool = False) -> str:
    """'ours' or 'reference': what `auto` runs for op `name` inside a torch.compile trace, from
    kernels/compiled_choices.json (an entry may follow another op's measurement); an op without an entry (a new
    op, a test's toy op) runs ours. inference: for a trace that records no gradients (the sampler): the entry's
    forward-only decision where its measurement has one (`inference`: the ops table times the forward under
    no_grad), else the entry's own."""
    entry, seen = _CHOICES["ops"].get(name, {}), {name}
    while "follows" in entry and entry["follows"] not in seen:
        seen.add(entry["follows"])
        entry = _CHOICES["ops"].get(entry["follows"], {})
    if inference and "inference" in entry:
        return entry["inference"]["under_compile"]
    return entry.get("under_compile", "ours")


def register(op: Op) -> Op:
    """Add `op` to the registry and install its dispatcher as `kernels.ops.<name>`. Returns op."""
    if op.name in _OPS:
        raise ValueError(f"op {op.name!r} is already registered (by {_OPS[op.name].reference.__module__})")
    if hasattr(ops, op.name):
        raise ValueError(f"op {op.name!r} would shadow kernels.ops.{op.name}")
    _OPS[op.name] = op
    backend.declare(op.name)
    setattr(ops, op.name, _dispatcher(op))
    ops.__all__.append(op.name)
    return op


def unregister(name: str) -> None:
    """Remove a registered op (tests register toy ops and take them away again)."""
    del _OPS[name]
    delattr(ops, name)
    ops.__all__.remove(name)
    backend.forget(name)


def get(name: str) -> Op:
    try:
        return _OPS[name]
    except KeyError:
        raise KeyError(f"no kernels op {name!r}; registered: {sorted(_OPS)}") from None


def registered() -> dict[str, Op]:
    """{name: Op} in registration order."""
    return dict(_OPS)


def resolve(name: str, x: torch.Tensor) -> Callable[..., Any]:
    """The function that runs op `name` for tensor x under the active backend (records what runs, for
    kernels.describe()). Raises BackendUnavailable where an explicitly requested backend cannot run it."""
    return implementation(name, choice(name, x))


def choice(name: str, x: torch.Tensor) -> str:
    """What `resolve` runs op `name` with for tensor x: "reference" or one of its implementations' backends,
    recorded for kernels.describe(). For a caller that runs the op later, where nothing may be recorded: an
    autograd.Function's backward traced by torch.compile refuses side effects, so its forward chooses and the
    backward calls `implementation(name, chosen)`."""
    op = _OPS[name]
    prefer_reference = name in _PREFER_REFERENCE[not torch.is_grad_enabled()]  # training's choice, or inference's
    chosen, label = backend.choose(name, op.impls.keys(), prefer_reference, x)
    if chosen == "reference" or not op.records_itself:
        backend.record(name, label)
    return chosen


def implementation(name: str, chosen: str) -> Callable[..., Any]:
    """Op `name`'s function for a backend `choice` returned (no side effect)."""
    op = _OPS[name]
    return op.reference if chosen == "reference" else op.impls[chosen]


def _dispatcher(op: Op) -> Callable[..., Any]:
    """kernels.ops.<name>: resolve on the first tensor argument, then call. It carries the reference's signature
    (inspect.signature follows __wrapped__) and the op's doc."""
    name = op.name
    first = next(iter(inspect.signature(op.reference).parameters))

    def dispatch(*args: Any, **kwargs: Any) -> Any:
        x = args[0] if args else kwargs[first]
        return resolve(name, x)(*args, **kwargs)

    functools.update_wrapper(dispatch, op.reference)
    dispatch.__doc__ = f"{op.doc}\n\nDispatches to kernels.registry.resolve({name!r}, {first}); reference: " \
                       f"{op.reference.__module__}.{op.reference.__qualname__}."
    dispatch.__module__ = ops.__name__
    return dispatch


def compiled_prefers_reference(inference: bool = False) -> frozenset[str]:
    """The registered ops `auto` traces as their reference inside torch.compile (compiled_choices.json), in a
    trace that records gradients or (inference) in one that does not."""
    return frozenset(n for n in _OPS if n in _PREFER_REFERENCE[inference])


def compiled_choices() -> dict:
    """The committed table, as read (the measurement it came from, and each op's entry)."""
    return json.loads(json.dumps(_CHOICES))


_PREFER_REFERENCE = {inference: frozenset(n for n in _CHOICES["ops"] if compiled_choice(n, inference) == "reference")
                     for inference in (False, True)}


def bench_cases(shape: BenchShape, device: str, dtype: torch.dtype,
                names: Optional[list[str]] = None) -> dict[str, BenchCase]:
    """{op name: its benchmark case} for every registered op (or those in `names`)."""
    chosen = list(_OPS) if names is None else names
    return {n: get(n).bench(shape, device, dtype) for n in chosen}
