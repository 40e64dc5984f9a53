"""Bad input to either launcher is one `error:` line, a non-zero exit status, and nothing written or submitted.
slurm.submit runs with --local (submitit's local executor: a case that got through would start a job here);
slurm/train.sbatch runs under bash with the variables sbatch would set, so its checks need no Slurm cluster (a case
that got through would reach scontrol/srun). The cluster's own refusals are in test_slurm.py."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, error_lines

VENV = Path(sys.executable).parent.parent
RECIPE = ["--preset", "cpu-demo", "--width", "8", "--epochs", "2", "--batch-size", "100"]
HELP = "; see python -m slurm.submit --help"

CPU = ["--gpus-per-node", "0", "--tasks-per-node", "2"]
SUBMIT = {  # case: (launcher flags, trainer flags, exit status, the one line)
    "nodes 0": ([*CPU, "--nodes", "0"], RECIPE, 2, "error: --nodes must be at least 1, got 0" + HELP),
    "local on 2 nodes": ([*CPU, "--nodes", "2"], RECIPE, 2, "error: --local runs on one node; drop --nodes" + HELP),
    "gpus negative": (["--gpus-per-node", "-1", "--tasks-per-node", "2"], RECIPE, 2,
                      "error: --gpus-per-node must be 0 (CPU nodes) or more, got -1" + HELP),
    "cpu nodes without tasks": (["--gpus-per-node", "0"], RECIPE, 2,
                                "error: --gpus-per-node 0 needs --tasks-per-node (CPU workers per node)" + HELP),
    "tasks negative": ([*CPU, "--tasks-per-node", "-2"], RECIPE, 2,
                       "error: --tasks-per-node must be at least 1, got -2" + HELP),
    "cpus 0": ([*CPU, "--cpus-per-task", "0"], RECIPE, 2, "error: --cpus-per-task must be at least 1, got 0" + HELP),
    "time 0": ([*CPU, "--time", "0"], RECIPE, 2, "error: --time must be at least 1 minute, got 0" + HELP),
    "signal after the limit": ([*CPU, "--time", "10", "--signal-delay", "600"], RECIPE, 2,
                               "error: --signal-delay must be at least 0 and less than --time (600 s), got 600" + HELP),
    "mem unit": ([*CPU, "--mem", "64X"], RECIPE, 2,
                 "error: --mem must be a size such as 64G or 64000 (megabytes), got '64X'" + HELP),
    "trainer flag before --": ([*CPU, "--epochs", "3"], RECIPE, 2, "error: unknown launcher flag --epochs; trainer "
                               "flags go after --, e.g. python -m slurm.submit --nodes 2 -- --epochs 60" + HELP),
    "bad trainer value": (CPU, [*RECIPE, "--lr", "-1"], 2, "error: --lr must be positive, got -1.0"),
    "batch vs world size": (CPU, [*RECIPE, "--batch-size", "101"], 2,
                            "error: --batch-size 101 is not divisible by the world size 2; use a multiple of 2"),
    "local without a GPU or tasks": ([], RECIPE, 2,  # it used to start 8 CPU workers (--gpus-per-node's default)
                                     "error: --local found no GPU here: pass --tasks-per-node (CPU workers)" + HELP),
    # the trainer's own checks, for the job's world size, before anything is submitted
    "unwritable out dir": (CPU, [*RECIPE, "--out-dir", "a-file/runs"], 2,
                           "error: --out-dir a-file/runs is not a writable directory; choose one this job can write"),
    "batch over the set": (CPU, [*RECIPE, "--batch-size", "4000"], 2, "error: --batch-size 4000 exceeds the training "
                           "set (2000 images over 2 rank(s)); use a batch of at most 2000"),
    "sync-bn on CPU nodes": (CPU, [*RECIPE, "--sync-bn"], 2, "error: --sync-bn needs GPUs (gloo has no SyncBatchNorm); "
                             "on CPU use --norm gn or drop it"),
    "unwritable log dir": ([*CPU, "--log-dir", "a-file/logs"], RECIPE, 2, "error: --log-dir a-file/logs cannot be "
                           "written (Not a directory); choose another directory"),
    "no data": (CPU, [*RECIPE, "--data-dir", "missing"], 1, ("error: no prepared data in missing/ (no manifest.json); "
                "run `make prep-data` or `python -m data_prep --out missing --source …`")),
}


@pytest.mark.parametrize("case", SUBMIT)
def test_submit_rejects_bad_input_in_one_line_and_submits_nothing(synthetic_data, tmp_path, case):
    flags, trainer, code, line = SUBMIT[case]
    (tmp_path / "data").symlink_to(synthetic_data)
    (tmp_path / "a-file").write_text("")
    before = sorted(os.listdir(tmp_path))
    p = subprocess.run([sys.executable, "-m", "slurm.submit", "--local", *flags, "--", *trainer], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120, check=False)
    assert (p.returncode, p.stderr.splitlines()) == (code, [line]), p.stderr
    assert "submitted" not in p.stdout and sorted(os.listdir(tmp_path)) == before  # no slurm-logs/, no runs/


def test_submit_refuses_more_loader_threads_than_a_slurm_task_has_cores(synthetic_data, tmp_path):
    """Each task gets --cpus-per-task cores on its node, not the login node's: checked before sbatch is reached."""
    p = subprocess.run([sys.executable, "-m", "slurm.submit", *CPU, "--cpus-per-task", "2", "--", *RECIPE,
                        "--data-dir", str(synthetic_data), "--num-workers", "4"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120, check=False)
    assert (p.returncode, p.stderr.splitlines()) == (2, [
        "error: --num-workers 4 exceeds the 2 CPU core(s) each training process may use (--cpus-per-task; FFCV runs "
        "at most one loader thread per core): pass --num-workers 2 or fewer, or give each process more cores"])
    assert os.listdir(tmp_path) == []


def sbatch_env(**changes) -> dict:
    """The variables sbatch gives the batch script (one node, CPU workers), without the caller's SLURM_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "NPROC_PER_NODE"}
    env |= {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "localhost",
            "NPROC_PER_NODE": "2", "VENV": str(VENV)}
    env |= changes
    return {k: v for k, v in env.items() if v is not None}


SBATCH = {  # case: (variables changed, trainer flags, exit status, the one line)
    "not under sbatch": ({"SLURM_JOB_ID": None}, RECIPE, 2, "error: run this with sbatch (no SLURM_JOB_ID)"),
    "max failures": ({"MAX_FAILURES": "two"}, RECIPE, 2,
                     "error: MAX_FAILURES must be a number of requeues after failures (0: none), got 'two'"),
    "no gpus, no nproc": ({"NPROC_PER_NODE": None}, RECIPE, 2, ("error: no GPUs allocated and NPROC_PER_NODE unset; "
                          "pass --gpus-per-node=N or export NPROC_PER_NODE")),
    "nproc 0": ({"NPROC_PER_NODE": "0"}, RECIPE, 2,
                "error: NPROC_PER_NODE must be a number of workers per node (1 or more), got '0'"),
    "no torchrun": ({"VENV": "/nonexistent", "PATH": "/usr/bin:/bin"}, RECIPE, 1,
                    "error: torchrun not found: run make setup, set VENV=…, or use the container image"),
    "no data": ({"DATA_DIR": "missing"}, RECIPE, 1, ("error: no prepared data in missing/ (no manifest.json); run make "
                "prep-data on a node with the data, or point --data-dir or DATA_DIR at it")),
    "no data at --data-dir": ({}, [*RECIPE, "--data-dir", "elsewhere"], 1, (  # the flag wins over DATA_DIR (data/)
        "error: no prepared data in elsewhere/ (no manifest.json); run make prep-data on a node with the data, or "
        "point --data-dir or DATA_DIR at it")),
    "no data at the config's data_dir": ({}, [*RECIPE, "--config", "run.yaml"], 1, (  # it checked and trained data/
        "error: no prepared data in elsewhere/ (no manifest.json); run `make prep-data` or `python -m data_prep --out "
        "elsewhere --source …`")),
    "bad trainer value": ({}, [*RECIPE, "--lr", "-1"], 2, "error: --lr must be positive, got -1.0"),
    "batch vs world size": ({"NPROC_PER_NODE": "3"}, RECIPE, 2,
                            "error: --batch-size 100 is not divisible by the world size 3; use a multiple of 3"),
}


@pytest.mark.parametrize("case", SBATCH)
def test_sbatch_script_rejects_bad_input_in_one_line_before_any_worker(synthetic_data, tmp_path, case):
    changes, trainer, code, line = SBATCH[case]
    (tmp_path / "data").symlink_to(synthetic_data)
    (tmp_path / "run.yaml").write_text("data_dir: elsewhere\n")
    p = subprocess.run(["bash", ROOT / "slurm" / "train.sbatch", *trainer], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120, check=False, env=sbatch_env(SLURM_SUBMIT_DIR=str(tmp_path), **changes))
    assert (p.returncode, error_lines(p.stderr)) == (code, [line]), p.stderr
    assert p.stdout == "" and sorted(os.listdir(tmp_path)) == ["data", "run.yaml"]  # no job line, failures, runs/
