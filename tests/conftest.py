"""Shared fixtures: a synthetic CIFAR-100 prepared once per session through the real CLI, and helpers that run the
project's commands as real processes (python -m …, torchrun) with their own MLflow store."""
import contextlib
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TORCHRUN = str(BIN / "torchrun")
# Small enough to prepare and train in seconds; 1000 test images so that 3 ranks do not divide the test set.
N_TRAIN, N_TEST = 2000, 1000
# The trainer at its cheapest that still learns: a narrow ResNet-18, 20 steps per epoch, data already in memory.
FAST = ["--preset", "cpu-demo", "--width", "8", "--batch-size", "100", "--warmup-epochs", "0.5", "--loader", "resident"]


def run(cmd, cwd=None, env=None, timeout=600, check=False):
    """Run a command, return CompletedProcess with text output; on failure show its output in the assertion."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    p = subprocess.run([str(c) for c in cmd], cwd=cwd, env=full_env, capture_output=True, text=True,
                       timeout=timeout)
    if check:
        assert p.returncode == 0, (f"{cmd} exited {p.returncode}\n--- stdout\n{p.stdout[-4000:]}\n--- stderr\n"
                                   f"{p.stderr[-4000:]}")
    return p


@contextlib.contextmanager
def tmpfs(path, options):
    """A real tmpfs mounted at the new directory `path` (a full or read-only filesystem); needs root."""
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", path], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", path], check=True)


def fill(directory):
    """Write a file until its filesystem has no space left."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        for chunk in (1 << 20, 1 << 12):
            try:
                while True:
                    os.write(fd, b"\0" * chunk)
            except OSError as e:
                assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def error_lines(stderr: str) -> list:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def prep_synthetic(out: Path, n_train=N_TRAIN, n_test=N_TEST, seed=0, extra=()):
    return run([sys.executable, "-m", "data_prep", "--source", "synthetic", "--out", out,
                "--synthetic-train", n_train, "--synthetic-test", n_test, "--synthetic-seed", seed,
                "--synthetic-difficulty", "easy", *extra],
               check=True)


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "synthetic"
    prep_synthetic(out)
    return out


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory) -> Path:
    """An empty MLflow sqlite store with its schema, made once: creating one runs MLflow's migrations (2.2 s here)
    in every test's first run otherwise. test_two_runs_started_at_once_on_a_new_sqlite_store and `make train`'s
    first run still create theirs."""
    from mlflow import MlflowClient
    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def mlflow_env(tmp_path, mlflow_template) -> dict:
    """A sqlite MLflow store of this test's own (a copy of the empty template)."""
    shutil.copy(mlflow_template, tmp_path / "mlflow.db")
    return {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "MLFLOW_EXPERIMENT_NAME": "tests"}


@pytest.fixture
def keep_sigterm():
    """data_prep's main() installs its own SIGTERM handler: give pytest's back."""
    handler = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, handler)
