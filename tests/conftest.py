import json
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


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


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; run by bench/gpu_suite.sh, not CI")
    config.addinivalue_line("markers", "slow: multi-process or long; still part of CI")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run bench/gpu_suite.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
