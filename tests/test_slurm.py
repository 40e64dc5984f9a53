"""Slurm for real: a single-node cluster with accounting (tests/cluster/slurm-cluster.sh) runs slurm/train.sbatch
and the submitit launcher on 2 CPU workers; a signalled job checkpoints, requeues, resumes and ends like an
uninterrupted one."""
import os
import re
import sys
import time

import pytest

from conftest import error_lines, run
from slurmtools import (
    DONE,
    EPOCH_LINE,
    SBATCH,
    finish_requeued,
    job_env,
    only_run,
    sbatch,
    slurm_cluster,
    wait_for,
    wait_for_text,
    workdir,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="starting a Slurm cluster needs root (CI runs as root)")

EPOCHS = 4
RECIPE = ["--preset", "cpu-demo", "--width", "8", "--epochs", str(EPOCHS), "--batch-size", "100", "--lr", "0.2",
          "--warmup-epochs", "0.5"]
# The uninterrupted sbatch job reads through FFCV; the others use the resident loader, which serves the same batches
# (tests/test_resident.py) without compiling FFCV's pipelines in every attempt: their equality with it holds across
# loaders too.
RESIDENT = [*RECIPE, "--loader", "resident"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with slurm_cluster(tmp_path_factory.mktemp("slurm")) as env:
        yield env


@pytest.fixture(scope="module")
def sbatch_run(cluster, synthetic_data, tmp_path_factory):
    work = workdir(tmp_path_factory.mktemp("sbatch"), synthetic_data)
    # --ntasks-per-node=2: the allocation's tasks used to start two torchruns on the node (one crashed, the job
    # FAILED and was requeued after training had finished); srun now starts one per node whatever sbatch was given
    p = sbatch(cluster, work, "--ntasks-per-node=2", "--cpus-per-task=1", SBATCH, *RECIPE)
    assert p.returncode == 0, p.stderr
    job = p.stdout.strip()
    final = wait_for(cluster, job, DONE)
    return work, job, final, (work / f"cifar100-ddp-{job}.log").read_text()


def test_sbatch_trains_with_two_workers_and_one_mlflow_run(sbatch_run):
    work, job, final, log = sbatch_run
    assert final == "COMPLETED", log[-3000:]
    assert "1 node(s) × 2 worker(s), rendezvous" in log and "2 × cpu (gloo)" in log
    assert len(EPOCH_LINE.findall(log)) == EPOCHS and "trainer exited 0" in log
    r, steps = only_run(work)
    assert r.info.status == "FINISHED" and r.data.tags["slurm_job_id"] == job
    assert steps == {"train_loss": list(range(EPOCHS)), "test_top1": list(range(EPOCHS))}


def test_sbatch_job_signalled_mid_run_requeues_resumes_and_matches(cluster, sbatch_run, synthetic_data, tmp_path):
    """USR2 to the batch shell (what --signal=B:USR2@180 does before the time limit) must reach the workers
    through srun and torchrun; they checkpoint, the script requeues, and the job resumes in the same run."""
    _, _, _, uninterrupted = sbatch_run
    work = workdir(tmp_path, synthetic_data)
    job = sbatch(cluster, work, SBATCH, *RESIDENT).stdout.strip()
    log_name = f"cifar100-ddp-{job}.log"
    wait_for_text(log_name, work, "\nepoch 1 |")
    time.sleep(1.0)
    run(["scancel", "--signal=USR2", "--batch", job], env=cluster, check=True)
    wait_for_text(log_name, work, "requeueing job")
    final = finish_requeued(cluster, job)
    log = (work / log_name).read_text()
    assert final == "COMPLETED", log[-4000:]
    assert "got SIGUSR2" in log and "stopped by signal 12" in log and "resuming from" in log
    # the log reads as what happened: the workers' status, the script's requeue; no torchrun traceback
    assert ": stopped by SIGUSR2 and passed it to the workers; local ranks 0-1 exited with status 3" in log
    assert "stopped by a signal (trainer exit 3): requeueing job" in log and "Traceback" not in log
    assert "(restart 1)" in log
    assert EPOCH_LINE.findall(log) == EPOCH_LINE.findall(uninterrupted)  # each epoch once, same numbers
    r, steps = only_run(work)
    assert r.info.status == "FINISHED"
    assert steps == {"train_loss": list(range(EPOCHS)), "test_top1": list(range(EPOCHS))}


def submit(cluster, work, *args, wait=True):
    cmd = [sys.executable, "-m", "slurm.submit", "--gpus-per-node", "0", "--tasks-per-node", "2",
           "--cpus-per-task", "1", *(["--wait"] if wait else []), *args]
    return run(cmd, cwd=work, env=job_env(cluster, work), timeout=600)


def test_submitit_launcher_runs_the_same_training(cluster, sbatch_run, synthetic_data, tmp_path):
    _, _, _, sbatch_log = sbatch_run
    work = workdir(tmp_path, synthetic_data)
    p = submit(cluster, work, "--", *RESIDENT)
    assert p.returncode == 0, p.stdout + p.stderr
    job = re.search(r"submitted job (\d+) \(slurm\)", p.stdout).group(1)
    log = (work / "slurm-logs" / job / f"{job}_0_log.out").read_text()
    assert EPOCH_LINE.findall(log) == EPOCH_LINE.findall(sbatch_log)  # same seed, same world size, same run
    r, steps = only_run(work)
    assert r.info.status == "FINISHED" and steps["test_top1"] == list(range(EPOCHS))


def test_submitit_job_preempted_requeues_through_submitit_and_resumes(cluster, sbatch_run, synthetic_data,
                                                                      tmp_path):
    _, _, _, sbatch_log = sbatch_run
    work = workdir(tmp_path, synthetic_data)
    p = submit(cluster, work, "--", *RESIDENT, wait=False)
    job = re.search(r"submitted job (\d+)", p.stdout).group(1)
    wait_for_text(f"slurm-logs/{job}/{job}_0_log.out", work, "\nepoch 1 |")
    time.sleep(1.0)
    run(["scancel", "--signal=USR2", job], env=cluster, check=True)  # every task, as Slurm's --signal does
    assert finish_requeued(cluster, job) == "COMPLETED"
    log = (work / "slurm-logs" / job / f"{job}_0_log.out").read_text()
    assert "stopped by signal 12" in log and "resuming from" in log
    assert EPOCH_LINE.findall(log) == EPOCH_LINE.findall(sbatch_log)
    r, steps = only_run(work)
    assert r.info.status == "FINISHED" and steps["test_top1"] == list(range(EPOCHS))


def test_input_the_trainer_refuses_as_it_starts_is_not_requeued(cluster, synthetic_data, tmp_path):
    """Bad input that --check cannot see (a run directory holding checkpoints, and --resume never) fails with the
    trainer's exit 2: no attempt would fix it, and the script requeued it MAX_FAILURES times."""
    work = workdir(tmp_path, synthetic_data)
    (work / "runs" / "r" / "checkpoints").mkdir(parents=True)
    (work / "runs" / "r" / "checkpoints" / "ckpt_e0001_s000000.pt").write_bytes(b"")
    job = sbatch(cluster, work, SBATCH, *RESIDENT, "--run-name", "r", "--resume", "never").stdout.strip()
    assert wait_for(cluster, job, DONE) == "FAILED"
    log = (work / f"cifar100-ddp-{job}.log").read_text()
    assert "--resume never would overwrite them" in log and "(restart 1)" not in log, log[-3000:]
    assert "trainer refused its input (exit 2, the error line above), not requeueing: fix it and resubmit" in log
    assert not list((work / ".slurm-failures").iterdir())  # not counted as a failure to retry


@pytest.mark.parametrize("case", ["partition", "gpus", "no-data"])
def test_bad_sbatch_submissions_fail_clearly(cluster, tmp_path, case):
    args = {"partition": ["--partition=nope"], "gpus": ["--gpus-per-node=4"], "no-data": []}[case]
    # later flags win: the GPU case overrides CPU_JOB's --gpus-per-node=0
    p = sbatch(cluster, tmp_path, *args, SBATCH, *RECIPE)
    if case != "no-data":
        last = p.stderr.strip().splitlines()[-1]
        assert p.returncode != 0 and last.startswith("sbatch: error:"), p.stderr
        assert {"partition": "Invalid partition", "gpus": "Invalid generic resource"}[case] in p.stderr
        return
    job = p.stdout.strip()
    assert wait_for(cluster, job, DONE) == "FAILED"
    log = (tmp_path / f"cifar100-ddp-{job}.log").read_text()
    assert error_lines(log) == [("error: no prepared data in data/ (no manifest.json); run make prep-data on a "
                                 "node with the data, or point --data-dir or DATA_DIR at it")]


@pytest.mark.parametrize("case", ["partition", "gpus", "no-data"])
def test_bad_submitit_submissions_fail_in_one_line(cluster, synthetic_data, tmp_path, case):
    work = tmp_path if case == "no-data" else workdir(tmp_path, synthetic_data)
    args = {"partition": ["--partition", "nope"], "gpus": ["--gpus-per-node", "4"], "no-data": []}[case]
    p = run([sys.executable, "-m", "slurm.submit", "--tasks-per-node", "2", "--cpus-per-task", "1",
             "--gpus-per-node", "0", *args, "--", *RECIPE], cwd=work, env=job_env(cluster, work))
    assert p.returncode != 0
    assert len(p.stderr.strip().splitlines()) == 1 and error_lines(p.stderr), p.stderr
    expected = {"partition": "Invalid partition", "gpus": "Invalid generic resource",
                "no-data": "no prepared data"}[case]
    assert expected in p.stderr
