"""python -m ddp_train.torchrun: torchrun whose endings read as one line. Real torchrun processes: a bad flag
shows the trainer's error and one summary line with the trainer's status; a worker's crash keeps its traceback; a
SIGUSR2 ends in one line and the trainer's requeue status, with no SignalException traceback."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

HELPERS = Path(__file__).parent / "helpers"
TRAIN = ["--preset", "cpu-demo", "--width", "8", "--batch-size", "100", "--no-mlflow"]


def env():
    """As sbatch and make train run it: OMP_NUM_THREADS unset, so torchrun would print its banner."""
    return {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | {"PYTHONUNBUFFERED": "1"}


def wrapper(*args, cwd, timeout=300):
    cmd = [sys.executable, "-m", "ddp_train.torchrun", "--standalone", "--nproc_per_node=2", *map(str, args)]
    return subprocess.run(cmd, check=False, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)


def lines(text: str) -> list:
    return [line for line in text.splitlines() if line.strip()]


def test_bad_flag_prints_the_trainers_error_and_one_summary_line(synthetic_data, tmp_path):
    p = wrapper("-m", "ddp_train", "--data-dir", synthetic_data, *TRAIN, "--batch-size", "101", cwd=tmp_path)
    out = lines(p.stdout) + lines(p.stderr)
    assert p.returncode == 2, p.stdout + p.stderr  # the trainer's status for bad input, not torchrun's 1
    assert len(out) == 2, p.stdout + p.stderr
    assert out[0] == "error: --batch-size 101 is not divisible by the world size 2; use a multiple of 2"
    # either rank may be seen first; the other exits 2 as well or is stopped by torchrun
    assert re.fullmatch(r"torchrun on \S+: ranks? [01](-1)? exited with status 2 \(bad input\)"
                        r"(; rank [01] killed by SIGTERM)?; the workers' errors are above; exit 2", out[1]), out[1]


def test_a_crashing_worker_keeps_its_traceback(tmp_path):
    p = wrapper(HELPERS / "crash.py", cwd=tmp_path)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "Traceback (most recent call last)" in p.stderr and "in load_batch" in p.stderr
    assert "RuntimeError: unexpected failure in rank 1" in p.stderr
    assert "ChildFailedError" not in p.stderr and "Setting OMP_NUM_THREADS" not in p.stderr
    assert lines(p.stderr)[-1].endswith(": rank 1 exited with status 1 (failed); rank 0 killed by SIGTERM; "
                                        "the workers' errors are above; exit 1"), p.stderr


def test_sigusr2_ends_in_one_line_with_the_trainers_requeue_status(synthetic_data, tmp_path):
    """What Slurm's --signal=B:USR2 does through train.sbatch: the ranks checkpoint and exit 3; so does torchrun."""
    log = tmp_path / "log"
    cmd = [sys.executable, "-m", "ddp_train.torchrun", "--standalone", "--nproc_per_node=2",
           "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR2", "-m", "ddp_train", "--data-dir",
           str(synthetic_data), *TRAIN, "--epochs", "20"]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env(), stdout=f, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 240
            while "\nepoch 0 |" not in log.read_text():
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.5)
            proc.send_signal(signal.SIGUSR2)
            code = proc.wait(timeout=120)
        finally:
            proc.kill()
    text = log.read_text()
    assert code == 3, text
    assert "stopped by signal 12" in text and "Traceback" not in text and "SignalException" not in text
    assert lines(text)[-1].endswith(": stopped by SIGUSR2 and passed it to the workers; local ranks 0-1 exited "
                                    "with status 3 (checkpointed, to be resumed); exit 3"), text


def test_make_train_launcher_runs_the_wrapper(synthetic_data, tmp_path):
    p = subprocess.run([sys.executable, "-m", "ddp_train.launch", "--data-dir", str(synthetic_data), "--nproc", "2",
                        "--", "--batch-size", "101", "--no-mlflow"], cwd=tmp_path, env=env(), capture_output=True,
                       text=True, timeout=300, check=False)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "-m ddp_train.torchrun --standalone --nproc_per_node=2" in p.stdout
    out = lines(p.stderr)
    assert out[0] == "error: --batch-size 101 is not divisible by the world size 2; use a multiple of 2"
    assert len(out) == 2 and out[1].startswith("torchrun on "), p.stderr


def test_one_process_needs_no_torchrun(synthetic_data, tmp_path):
    """One GPU (or --nproc 1): the trainer is the process itself, without torchrun's start-up."""
    p = subprocess.run([sys.executable, "-m", "ddp_train.launch", "--data-dir", str(synthetic_data), "--nproc", "1",
                        "--", "--batch-size", "4000", "--no-mlflow"], cwd=tmp_path, env=env(), capture_output=True,
                       text=True, timeout=300, check=False)
    assert p.returncode == 2, p.stdout + p.stderr
    assert f"launch: {sys.executable} -m ddp_train --data-dir" in p.stdout and "torchrun" not in p.stdout
    assert f"launch: data in {synthetic_data}/: 2,000 train / 1,000 test images (synthetic, difficulty 0)\n" \
        in p.stdout  # what trains is said, not only where it lies
    assert lines(p.stderr) == ["error: --batch-size 4000 exceeds the training set (2000 images over 1 rank(s)); "
                               "use a batch of at most 2000"]


def test_the_launchers_bad_input_is_one_line_and_a_trainer_data_dir_is_where_it_prepares(tmp_path):
    """`make train NPROC=two` was a ValueError traceback; `make train ARGS='--data-dir X'` prepared data/ for a
    trainer that read X."""
    def launch(*args):
        return subprocess.run([sys.executable, "-m", "ddp_train.launch", *args], cwd=tmp_path, env=env(),
                              capture_output=True, text=True, timeout=60, check=False)
    for nproc in ("two", "0"):
        p = launch("--nproc", nproc)
        assert p.returncode == 2 and lines(p.stderr) == [
            f"error: argument --nproc: must be a number of processes, 1 or more, got '{nproc}'; see python -m "
            "ddp_train.launch --help"], p.stderr
    p = launch("--data-dir", "a", "--", "--data-dir", "b")
    assert p.returncode == 2 and lines(p.stderr) == [
        "error: the data directory is given twice (a and the trainer's --data-dir b); give it once; see python -m "
        "ddp_train.launch --help"], p.stderr
    p = launch("--", "--data-dir")  # it would have prepared the data into the working directory
    assert p.returncode == 2 and lines(p.stderr) == [
        "error: the trainer's --data-dir needs a directory; see python -m ddp_train.launch --help"], p.stderr
    # a source that cannot be read ends the preparation early; it was to go where the trainer reads
    p = launch("--source", str(tmp_path / "missing.tar.gz"), "--nproc", "1", "--", "--data-dir=mine")
    assert p.returncode != 0 and "launch: no prepared data in mine/: preparing it" in p.stdout, p.stdout + p.stderr
    assert not (tmp_path / "data").exists() and not any(tmp_path.iterdir())
