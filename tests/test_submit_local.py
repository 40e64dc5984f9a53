"""slurm.submit --local: the submitit launcher on this machine without Slurm (2 tasks, gloo), and its checks."""
import re
import sys

from conftest import error_lines, run

RECIPE = ["--preset", "cpu-demo", "--width", "8", "--epochs", "2", "--batch-size", "100"]


def submit(work, *args):
    return run([sys.executable, "-m", "slurm.submit", "--local", "--gpus-per-node", "0", "--tasks-per-node", "2",
                *args], cwd=work, env={"MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db"}, timeout=600)


def test_local_launcher_trains_two_tasks_and_waits(synthetic_data, tmp_path):
    (tmp_path / "data").symlink_to(synthetic_data)
    p = submit(tmp_path, "--wait", "--", *RECIPE)
    assert p.returncode == 0, p.stdout + p.stderr
    job = re.search(r"submitted job (\d+) \(local\): 1 node\(s\) × 2 task\(s\); logs (\S+)", p.stdout)
    assert job and "finished" in p.stdout
    log = (tmp_path / "slurm-logs" / job.group(1) / f"{job.group(1)}_0_log.out").read_text()
    assert len(re.findall(r"^epoch \d+ \|", log, re.M)) == 2 and "2 × cpu (gloo)" in log


def test_launcher_rejects_bad_trainer_flags_and_missing_data_before_submitting(tmp_path):
    p = submit(tmp_path, "--", "--lr", "-1")
    assert p.returncode == 2 and error_lines(p.stderr) == ["error: --lr must be positive, got -1.0"]
    p = submit(tmp_path, "--", *RECIPE)
    assert p.returncode == 1 and "no prepared data" in p.stderr and not (tmp_path / "slurm-logs").exists()
    p = run([sys.executable, "-m", "slurm.submit", "--local", "--gpus-per-node", "0", "--", *RECIPE], cwd=tmp_path)
    assert p.returncode == 2 and len(error_lines(p.stderr)) == 1 and "needs --tasks-per-node" in p.stderr
