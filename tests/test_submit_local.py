"""slurm.submit --local: the submitit launcher on this machine without Slurm (2 tasks, gloo). Its checks of bad input
are in test_launcher_input.py."""
import re
import sys

from conftest import run

RECIPE = ["--preset", "cpu-demo", "--width", "8", "--epochs", "2", "--batch-size", "100", "--loader", "resident"]


def submit(work, *args, env=None):
    return run([sys.executable, "-m", "slurm.submit", "--local", "--gpus-per-node", "0", "--tasks-per-node", "2",
                *args], cwd=work, env={"MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db", **(env or {})},
               timeout=600)


def test_local_launcher_trains_two_tasks_and_waits(synthetic_data, tmp_path):
    (tmp_path / "data").symlink_to(synthetic_data)
    # submitted from a shell that has a process group's variables (inside a torchrun or another job): every task
    # failed on submitit's refusal to overwrite them; the job's own are set
    shell = {"MASTER_ADDR": "10.9.9.9", "MASTER_PORT": "29500", "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "5",
             "LOCAL_WORLD_SIZE": "8"}
    p = submit(tmp_path, "--wait", "--", *RECIPE, env=shell)
    assert p.returncode == 0, p.stdout + p.stderr
    job = re.search(r"submitted job (\d+) \(local\): 1 node\(s\) × 2 task\(s\); logs (\S+)", p.stdout)
    assert job and "finished" in p.stdout
    log = (tmp_path / "slurm-logs" / job.group(1) / f"{job.group(1)}_0_log.out").read_text()
    assert len(re.findall(r"^epoch \d+ \|", log, re.MULTILINE)) == 2 and "2 × cpu (gloo)" in log



def test_wait_exits_with_the_trainers_status(synthetic_data, tmp_path):
    """A refusal inside the job (exit 2: --resume never over checkpoints) reaches the caller as 2, not as 1."""
    (tmp_path / "data").symlink_to(synthetic_data)
    (tmp_path / "runs" / "r" / "checkpoints").mkdir(parents=True)
    (tmp_path / "runs" / "r" / "checkpoints" / "ckpt_e0001_s000000.pt").write_bytes(b"")
    p = submit(tmp_path, "--wait", "--", *RECIPE, "--run-name", "r", "--resume", "never", "--no-mlflow")
    assert p.returncode == 2, p.stdout + p.stderr
    assert re.fullmatch(r"error: job \d+ failed: runs/r/checkpoints already holds checkpoints and --resume never "
                        r"would overwrite them; .*; logs in \S+", p.stderr.strip()), p.stderr
