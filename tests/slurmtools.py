"""Helpers for the tests that drive a real Slurm cluster (tests/cluster/slurm-cluster.sh): start/stop it, submit
slurm/train.sbatch on CPU workers, follow jobs through requeues, read the one MLflow run a job leaves."""
import contextlib
import re
import sys
import time
from pathlib import Path

from conftest import ROOT, run

CLUSTER = ROOT / "tests" / "cluster" / "slurm-cluster.sh"
SBATCH = ROOT / "slurm" / "train.sbatch"
VENV = Path(sys.executable).parent.parent
EPOCH_LINE = re.compile(r"^epoch \d+ \|.*?%\)", re.MULTILINE)  # the metrics of an epoch line, not its timings
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


@contextlib.contextmanager
def slurm_cluster(directory: Path, nodes: int = 1, env=None):
    """The cluster's environment (SLURM_CONF) while it runs; stopped also when starting or a test failed."""
    try:
        run(["bash", CLUSTER, "start", directory, nodes], env=env, check=True, timeout=900)
        yield {"SLURM_CONF": str(directory / "slurm.conf")}
    finally:
        run(["bash", CLUSTER, "stop", directory], timeout=300)


def workdir(tmp_path, synthetic_data):
    (tmp_path / "data").symlink_to(synthetic_data)
    return tmp_path


def job_env(cluster, work):
    return {**cluster, "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db", "MLFLOW_EXPERIMENT_NAME": "slurm"}


def sbatch(cluster, work, *args, nproc=2, cpus=2, exports=""):
    """sbatch on CPU nodes: --gpus-per-node=0 overrides the script's GPU header; NPROC_PER_NODE workers per node."""
    exports = f"ALL,NPROC_PER_NODE={nproc},VENV={VENV}" + (f",{exports}" if exports else "")
    return run(["sbatch", "--parsable", f"--export={exports}", "--gpus-per-node=0", f"--cpus-per-task={cpus}", *args],
               cwd=work, env=job_env(cluster, work))


def state(cluster, job):
    """The job's live state from slurmctld (it follows requeues exactly); sacct once the job has left it. A busy
    slurmctld can fail the query: that is no state (sacct would still show a requeued job's first, failed try)."""
    p = run(["scontrol", "show", "job", job, "-o"], env=cluster)
    live = re.search(r"JobState=(\S+)", p.stdout)
    if live:
        return live.group(1)
    if "Invalid job id" not in p.stderr:
        return "UNKNOWN"
    out = run(["sacct", "-j", job, "-X", "-n", "-P", "-o", "State"], env=cluster).stdout.split()
    return out[-1].split()[0] if out else "UNKNOWN"


def wait_for(cluster, job, states, timeout=300):
    deadline = time.monotonic() + timeout
    while (s := state(cluster, job)) not in states:
        assert time.monotonic() < deadline, f"job {job} still {s} after {timeout}s"
        time.sleep(1)
    return s


_released = set()


def release(cluster, job):
    """End the ~120 s hold (BeginTime) Slurm puts on a requeued job, once per requeue — a few seconds ahead, not
    now: a job started again within the second its previous attempt's credential was revoked is killed ("Job
    credential revoked") and ends FAILED without running."""
    record = run(["scontrol", "show", "job", job, "-o"], env=cluster).stdout
    restarts = re.search(r"Restarts=(\d+)", record)
    if "JobState=PENDING" in record and restarts and (job, restarts.group(1)) not in _released:
        run(["scontrol", "update", f"jobid={job}", "starttime=now+3"], env=cluster, check=True)
        _released.add((job, restarts.group(1)))


def finish_requeued(cluster, job, timeout=300):
    """Follow a requeued job to its end, releasing it whenever it pends."""
    deadline = time.monotonic() + timeout
    while (s := state(cluster, job)) not in DONE:
        assert time.monotonic() < deadline, f"job {job} still {s} after {timeout}s"
        if s == "PENDING":
            release(cluster, job)
        time.sleep(1)
    return s


def wait_for_text(path_glob, work, text, timeout=300):
    deadline = time.monotonic() + timeout
    while True:
        logs = "".join(p.read_text(errors="replace") for p in work.glob(path_glob))
        if text in logs:
            return logs
        assert time.monotonic() < deadline, f"'{text}' not in {path_glob} after {timeout}s:\n{logs[-3000:]}"
        time.sleep(0.5)


def only_run(work):
    """The one MLflow run in the job's store, and the epochs its per-epoch metrics hold."""
    from mlflow import MlflowClient
    c = MlflowClient(tracking_uri=f"sqlite:///{work}/mlflow.db")
    [r] = c.search_runs([c.get_experiment_by_name("slurm").experiment_id])
    steps = {k: sorted(m.step for m in c.get_metric_history(r.info.run_id, k)) for k in ("train_loss", "test_top1")}
    return r, steps
