import json
import os
from pathlib import Path

# Before torch loads: idle OpenMP threads sleep instead of spinning, so this process and the runs the tests
# start share the cores (modeling/threads.py). The counts are set in pytest_configure.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# One cache of DeepSpeed's JIT-built CPU ops (its shm comm op: ~50 CPU-seconds to build) for every test and every
# run a test starts (they inherit the environment): the GPU suite's smoke would otherwise build its own under the
# suite's default, /tmp/vavae_torch_ext
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    # Before anything imports triton (modeling.threads imports the models, which import kernels): Triton reads
    # TRITON_INTERPRET when it is imported and decorates its own tl functions, and without CUDA the kernel tests
    # can only run its interpreter. (`auto` never picks the interpreter: other tests still run the reference.)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from modeling.threads import available_cores, configure_threads  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
THREADS = pytest.StashKey[int]()


def _find_parity_dir():
    env = os.environ.get("VAVAE_PARITY_DIR")
    candidates = [Path(env)] if env else []
    candidates += [REPO.parent / "shared" / "parity", REPO / "shared" / "parity"]
    for c in candidates:
        if (c / "configs.json").is_file():
            return c
    return None


@pytest.fixture(scope="session")
def parity_dir():
    """The reference fixtures. Missing in CI is a failure, not a skip."""
    d = _find_parity_dir()
    if d is None:
        msg = "parity fixtures not found (../shared/parity or $VAVAE_PARITY_DIR)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return d


@pytest.fixture(scope="session")
def parity_configs(parity_dir):
    return json.loads((parity_dir / "configs.json").read_text())


@pytest.fixture
def record_ops():
    """A context manager recording the name of every op dispatched inside it ("aten.zeros.default",
    "vavae.rope_attention_bwd.default"; a custom op's own internals are not seen): `with record_ops() as ops:`."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class RecordOps(TorchDispatchMode):
        def __enter__(self):
            self.ops = []
            return super().__enter__()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))
    return RecordOps


def pytest_configure(config):
    # the shared thread choice (--threads / $VAVAE_THREADS / $OMP_NUM_THREADS / the cores), as the trainers
    # (under pytest-xdist each worker takes its share of the cores, unless a count was given)
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    given = os.environ.get("VAVAE_THREADS") or os.environ.get("OMP_NUM_THREADS")
    config.stash[THREADS] = configure_threads(None if given or workers == 1 else max(1, available_cores() // workers))
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; run by bench/gpu_suite.sh, not CI")
    config.addinivalue_line("markers", "extended: a further case of a behaviour CI already tests once (other launcher, "
                                       "trainer, ZeRO stage or world size); `make test-all` runs it, `make test` (CI) "
                                       "does not")


# The slowest files first (seconds on a 2-core box from cold compile caches, 2026-12-04, summed over each file's
# tests): with `--dist loadfile --no-loadscope-reorder` (the Makefile) pytest-xdist hands whole files to the workers in
# this order as they free up, so the long ones start early and no worker is left with one at the end (longest first:
# the 2 workers' totals end within a file's length of each other). A file not listed keeps its collected place
# after these; a stale list only costs balance, never a test (test_train_fp8, unlisted at 347 s, ran last and alone
# and took `make test` to 14 minutes: its FP8 models now use CPU-sized shapes).
SLOWEST_FIRST = ("test_kernels_gpu_suite", "test_kernels_sm90_compile", "test_kernels_sm90_lent_triton", "test_train_recompute", "test_multinode",
                 "test_train_dit", "test_kernels", "test_fp8_training", "test_demo_determinism", "test_parity",
                 "test_train_elastic", "test_train_precision", "test_sampling_fast", "test_train_preempt",
                 "test_train_fp8", "test_kernels_fp8_quant", "test_eval_inception", "test_scaling",
                 "test_bench_authors_vae")


def _file_rank(item) -> int:
    stem = Path(str(item.fspath)).stem
    return SLOWEST_FIRST.index(stem) if stem in SLOWEST_FIRST else len(SLOWEST_FIRST)


def pytest_collection_modifyitems(config, items):
    items.sort(key=_file_rank)  # stable: a file's tests, and the unlisted files, keep their order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run bench/gpu_suite.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_threads(request):
    torch.manual_seed(0)
    from multiproc import LAUNCHER_ENV
    launcher_env = {k: os.environ.get(k) for k in LAUNCHER_ENV}
    yield
    # a trainer run in-process sets the single-process launcher variables (train.distributed); the next test's
    # children must not inherit them (they would join this process's store, or pass for rank 0 of world 1)
    for k, v in launcher_env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    # a test that changed the thread count (e.g. to compare counts) does not leave it to the next one
    n = request.config.stash.get(THREADS, None)
    if n is not None and torch.get_num_threads() != n:
        torch.set_num_threads(n)
    # nor the kernels switches: a trainer built in-process sets them (train.kernels, train.attention), and the next
    # test in this worker would run e.g. the VA-VAE's GroupNorm in the Triton interpreter (minutes, 2026-12-04)
    import kernels
    if kernels.get_backend() != os.environ.get("VAVAE_KERNELS", "auto"):
        kernels.set_backend(os.environ.get("VAVAE_KERNELS", "auto"))
    kernels.set_attention(os.environ.get("VAVAE_ATTENTION") or None)


def pytest_report_header(config):
    return (f"threads: {config.stash.get(THREADS, '?')} intra-op, {torch.get_num_interop_threads()} inter-op "
            f"(modeling.threads), OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")

