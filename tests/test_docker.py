"""docker/: the Dockerfile is lint-clean under hadolint, the build context leaves data and runs out, and the
entrypoint runs the trainer."""
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run

HADOLINT = Path(sys.executable).parent / "hadolint"


def test_dockerfile_is_hadolint_clean():
    p = run([HADOLINT, ROOT / "docker" / "Dockerfile"])
    assert p.returncode == 0, p.stdout + p.stderr


def test_hadolint_does_catch_problems(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get install curl\n")
    assert run([HADOLINT, bad]).returncode != 0  # the lint above is not vacuous


def test_build_context_excludes_data_runs_and_venvs():
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "data", "runs", "mlruns", "mlflow.db"} <= ignored


def test_entrypoint_runs_the_trainer_under_torchrun_or_a_given_command():
    entry = ROOT / "docker" / "entrypoint.sh"
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "NPROC_PER_NODE": "1"}
    p = subprocess.run(["sh", entry, "--help"], check=False, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "usage: python -m ddp_train" in p.stdout, p.stderr
    p = subprocess.run(["sh", entry, "python", "-c", "import ffcv, ddp_train; print('ok')"], env=env, check=False,
                       capture_output=True, text=True, timeout=300)
    assert p.stdout.strip() == "ok", p.stderr


@pytest.mark.skipif(any(Path("/dev").glob("nvidia[0-9]*")), reason="this machine has a GPU device node")
def test_entrypoint_without_a_gpu_or_nproc_per_node_fails_in_one_line():
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    p = subprocess.run(["sh", ROOT / "docker" / "entrypoint.sh", "--epochs", "1"], check=False, env=env,
                       capture_output=True, text=True, timeout=60)
    assert (p.returncode, p.stdout, p.stderr.splitlines()) == (2, "", [
        "error: no GPU in this container: run it with --gpus all (NVIDIA container runtime), or set NPROC_PER_NODE=N "
        "(-e NPROC_PER_NODE=2) to train with N processes on the CPU"])
