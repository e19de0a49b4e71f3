"""modeling.threads: the one place the CPU thread count is chosen (trainers, demo, tests)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modeling import threads

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def clean_env(monkeypatch):
    for var in ("VAVAE_THREADS", "OMP_NUM_THREADS", "LOCAL_WORLD_SIZE"):
        monkeypatch.setenv(var, "")  # empty = unset; setenv (unlike a no-op delenv) restores what was there
    monkeypatch.setattr(threads, "available_cores", lambda: 8)
    return monkeypatch


def test_precedence_explicit_then_env_then_cores(clean_env):
    assert threads.resolve_threads() == 7                      # the cores less one
    clean_env.setenv("LOCAL_WORLD_SIZE", "2")
    assert threads.resolve_threads() == 3                      # shared by the ranks on this node
    clean_env.setenv("LOCAL_WORLD_SIZE", "16")
    assert threads.resolve_threads() == 1                      # at least one
    clean_env.setenv("LOCAL_WORLD_SIZE", "")
    clean_env.setattr(threads, "available_cores", lambda: 2)
    assert threads.resolve_threads() == 1                      # the 2-core machine: one
    clean_env.setattr(threads, "available_cores", lambda: 8)
    clean_env.setenv("OMP_NUM_THREADS", "3")
    assert threads.resolve_threads() == 3                      # a user's / launcher's OpenMP setting
    clean_env.setenv("VAVAE_THREADS", "5")
    assert threads.resolve_threads() == 5                      # ours wins over OpenMP's
    assert threads.resolve_threads(6) == 6                     # --threads wins over everything


@pytest.mark.parametrize("value, match", [("two", r"\$VAVAE_THREADS='two' is not an integer"),
                                          ("0", "threads must be >= 1, got 0")])
def test_bad_values_are_one_line_errors(clean_env, value, match):
    clean_env.setenv("VAVAE_THREADS", value)
    with pytest.raises(ValueError, match=match):
        threads.resolve_threads()


def test_configure_threads_sets_torch_and_one_interop_thread(clean_env):
    before = torch.get_num_threads()
    try:
        assert threads.configure_threads(1) == 1 and torch.get_num_threads() == 1
        # conftest configured this process before any torch work: one inter-op thread
        assert torch.get_num_interop_threads() == 1
        assert threads.describe_threads()["intra_op"] == 1
    finally:
        torch.set_num_threads(before)


def test_an_explicit_count_holds_for_later_calls_and_children(clean_env):
    """The demo's --threads 2 must survive the trainer's own configure_threads() (and $OMP_NUM_THREADS=1)."""
    before = torch.get_num_threads()
    clean_env.setenv("OMP_NUM_THREADS", "1")
    try:
        assert threads.configure_threads(2) == 2
        assert os.environ["VAVAE_THREADS"] == "2"
        assert threads.configure_threads() == 2 and torch.get_num_threads() == 2
    finally:  # (clean_env restores $VAVAE_THREADS)
        torch.set_num_threads(before)


def test_loader_workers_leave_the_compute_its_cores(clean_env):
    assert threads.default_loader_workers(7) == 0              # compute on the cores left: decode in-process
    assert threads.default_loader_workers(5) == 2
    assert threads.default_loader_workers(1) == 4              # at most 4
    clean_env.setattr(threads, "available_cores", lambda: 2)
    assert threads.default_loader_workers() == 0               # the 2-core machine: none


def test_a_child_started_with_thread_env_uses_it():
    """What a process gets from thread_env before torch loads: the count and the sleeping wait policy."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_WAIT_POLICY": "PASSIVE"}
    env.update(threads.thread_env(1))
    code = ("import json, os, torch; from modeling.threads import configure_threads; n = configure_threads(); "
            "print(json.dumps([n, torch.get_num_threads(), torch.get_num_interop_threads(), "
            "os.environ['OMP_WAIT_POLICY']]))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [1, 1, 1, "PASSIVE"]


def test_thread_env_keeps_a_wait_policy_already_chosen(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    env = threads.thread_env(3)
    assert env["OMP_WAIT_POLICY"] == "ACTIVE"
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == env["VAVAE_THREADS"] == "3"


def test_demo_takes_threads():
    from examples.demo import parse_args

    assert parse_args(["--threads", "1"]).threads == 1 and parse_args([]).threads is None
