"""The fault catalogue: each fault injected into real processes (torchrun, gloo, FFCV, MLflow), each ending with a
clear status, one line, and nothing lost. README's fault table points here."""
import os
import re
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
import torch

from conftest import FAST, N_TRAIN, ROOT, TORCHRUN, error_lines, prep_synthetic, run, tmpfs


def single(data_dir, *extra, cwd, env=None, **kw):
    return run([sys.executable, "-m", "ddp_train", "--data-dir", data_dir, *FAST, *extra], cwd=cwd, env=env, **kw)


def ddp(nproc, data_dir, *extra):
    return [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", "-m", "ddp_train", "--data-dir", data_dir, *FAST,
            *extra]


def mlflow_runs(env, experiment="tests"):
    from mlflow import MlflowClient
    c = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    exp = c.get_experiment_by_name(experiment)
    return c, (c.search_runs([exp.experiment_id]) if exp else [])


STARTED = []


@pytest.fixture(autouse=True)
def no_strays():
    """A test that fails while its job runs must not leave the job behind (torchrun's workers have sessions of
    their own, and a hung group waits for its timeout)."""
    yield
    while STARTED:
        try:
            root = psutil.Process(STARTED.pop().pid)
            for p in [*root.children(recursive=True), root]:
                p.kill()
        except psutil.NoSuchProcess:
            pass


def popen(cmd, cwd, env, **kw):
    proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **env}, **kw)
    STARTED.append(proc)
    return proc


def read_until(proc, prefix, out):
    for line in proc.stdout:
        out.append(line)
        if line.startswith(prefix):
            return line
    raise AssertionError(f"no line starting {prefix!r}:\n" + "".join(out)[-3000:])


def worker(proc, rank: int) -> psutil.Process:
    [w] = [w for w in psutil.Process(proc.pid).children() if w.environ().get("RANK") == str(rank)]
    return w


def files(path):
    return {p: p.stat().st_mtime_ns for p in sorted(path.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def other_data(tmp_path_factory):
    """The synthetic set prepared again with other content (another seed), as a re-prepared data directory holds."""
    out = tmp_path_factory.mktemp("other") / "data"
    prep_synthetic(out, seed=1)
    return out


def test_non_finite_loss_stops_every_rank_with_one_line_and_saves_nothing(synthetic_data, tmp_path, mlflow_env):
    p = run(ddp(2, synthetic_data, "--lr", "1e6", "--epochs", "2", "--run-name", "nan"), cwd=tmp_path,
            env=mlflow_env)
    assert p.returncode == 1
    [line] = [x for x in p.stdout.splitlines() + p.stderr.splitlines() if x.startswith("error:")]
    assert "training loss is not finite (at epoch 0, step" in line and "no checkpoint was saved yet" in line
    assert "--lr (1e+06)" in line
    assert not (tmp_path / "runs" / "nan" / "model.pt").exists()
    assert not (tmp_path / "runs" / "nan" / "checkpoints").exists()
    c, [r] = mlflow_runs(mlflow_env)
    assert r.info.status == "FAILED" and not c.search_logged_models([r.info.experiment_id])


def faulty(data_dir, *extra):
    """2 ranks of the trainer with tests/helpers/signal_at_step.py's faults (set STOP_AT / POISON_AT), under the
    torchrun that exits with the trainer's status."""
    return [sys.executable, "-m", "ddp_train.torchrun", "--standalone", "--nproc_per_node=2",
            ROOT / "tests/helpers/signal_at_step.py", "--data-dir", data_dir, *FAST, "--no-mlflow", *extra]


def test_a_stop_just_before_the_loss_turns_nan_saves_nothing_of_it(synthetic_data, tmp_path):
    """Ranks agree on a stop one step late (the flags of step n are read at step n+1): the time-limit signal after
    step 2, the loss non-finite at step 3, and the stop checkpointed step 3's NaN weights — the newest checkpoint,
    from which every resume failed at once."""
    p = run(faulty(synthetic_data, "--epochs", "2", "--run-name", "n"), cwd=tmp_path,
            env={"STOP_AT": "2", "POISON_AT": "3"})
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    [line] = [x for x in p.stdout.splitlines() + p.stderr.splitlines() if x.startswith("error:")]
    assert "the training loss is not finite (at epoch 0, step 3 on rank" in line and "no checkpoint was saved" in line
    assert "stopped by signal" not in p.stdout and not (tmp_path / "runs" / "n" / "checkpoints").exists()


def test_a_signal_in_an_epoch_of_one_step_stops_the_run_there(synthetic_data, tmp_path):
    """With one step per epoch (the whole set in one batch) and 2 ranks, the stop flags were read only by a poll
    in the next step of the same epoch, which never came: SIGUSR2/SIGTERM went unheeded until the job was killed.
    Now the epoch's end agrees on them: checkpoint at the step, exit 3, and the rerun resumes from it."""
    args = ["--epochs", "2", "--batch-size", str(N_TRAIN), "--run-name", "one"]
    p = run(faulty(synthetic_data, *args), cwd=tmp_path, env={"STOP_AT": "2"})  # epoch 1's only step
    ckpt = tmp_path / "runs" / "one" / "checkpoints" / "ckpt_e0001_s000001.pt"
    assert p.returncode == 3 and ckpt.is_file(), p.stdout[-2000:] + p.stderr[-2000:]
    assert f"stopped by signal 12 at epoch 1, step 1; checkpoint {ckpt.relative_to(tmp_path)}" in p.stdout
    again = run(ddp(2, synthetic_data, "--no-mlflow", *args), cwd=tmp_path, check=True)
    assert f"resuming from {ckpt.relative_to(tmp_path)}: epoch 1, step 1 of 1" in again.stdout
    assert [x[:7] for x in again.stdout.splitlines() if x.startswith("epoch ")] == ["epoch 1"]


def test_a_loss_that_diverges_after_a_checkpoint_names_it_though_it_was_written_in_the_background(synthetic_data,
                                                                                                  tmp_path):
    p = single(synthetic_data, "--norm", "gn", "--lr", "60", "--warmup-epochs", "2.95", "--epochs", "3", "--no-mlflow",
               "--run-name", "d", cwd=tmp_path)  # finite through epoch 0, not in epoch 1 (CPU runs repeat exactly;
    # a warm-up of 59 of the 60 steps: the schedule this test was calibrated on, before warm-ups as long as the run
    # were refused)
    ckpt = tmp_path / "runs" / "d" / "checkpoints" / "ckpt_e0001_s000000.pt"
    assert p.returncode == 1 and ckpt.is_file()
    [line] = error_lines(p.stderr)
    assert "not finite (at epoch 1," in line and f"the last good checkpoint is {ckpt.relative_to(tmp_path)}" in line


def test_a_failure_after_the_last_epoch_fails_the_run_and_a_rerun_exports(synthetic_data, tmp_path, mlflow_env):
    """The final model cannot be written (its path is taken by a directory): one line, exit 1, MLflow run FAILED,
    the final checkpoint intact. Fixed and rerun, the job continues from that checkpoint into the same MLflow run
    and exports; a third run finds it finished and does nothing."""
    blocker = tmp_path / "runs" / "e" / "model.pt"
    blocker.mkdir(parents=True)
    cmd = ddp(2, synthetic_data, "--epochs", "2", "--run-name", "e")
    p = run(cmd, cwd=tmp_path, env=mlflow_env)
    assert p.returncode == 1
    [line] = error_lines(p.stderr)
    assert "cannot write the final model runs/e/model.pt" in line and "ckpt_e0002_s000000.pt is intact" in line
    c, [r] = mlflow_runs(mlflow_env)
    assert r.info.status == "FAILED"
    blocker.rmdir()
    p = run(cmd, cwd=tmp_path, env=mlflow_env, check=True)
    assert "resuming from runs/e/checkpoints/ckpt_e0002_s000000.pt: epoch 2" in p.stdout
    assert "(continued)" in p.stdout and not p.stdout.count("epoch 1 |")
    c, [again] = mlflow_runs(mlflow_env)
    assert again.info.run_id == r.info.run_id and again.info.status == "FINISHED"
    assert sorted(m.step for m in c.get_metric_history(r.info.run_id, "test_top1")) == [0, 1]
    assert len(c.search_logged_models([r.info.experiment_id])) == 1
    before = files(tmp_path / "runs" / "e")
    p = run(cmd, cwd=tmp_path, env=mlflow_env, check=True)
    assert "run e already finished (test top-1" in p.stdout and "choose a new --run-name" in p.stdout
    assert files(tmp_path / "runs" / "e") == before
    assert len(c.search_logged_models([r.info.experiment_id])) == 1  # not exported twice


def test_another_config_or_dataset_never_takes_over_a_run(synthetic_data, other_data, tmp_path, mlflow_env):
    """Same --run-name, one field changed, or the data re-prepared: refused in one line, the finished run untouched
    (a stopped run and re-prepared data: test_ctrl_c_ends_the_run_killed_in_one_line)."""
    run(ddp(1, synthetic_data, "--epochs", "1", "--run-name", "r"), cwd=tmp_path, env=mlflow_env, check=True)
    before = files(tmp_path / "runs" / "r")
    for extra, why in [(["--epochs", "2"], "epochs 1 → 2"), (["--epochs", "1", "--seed", "1"], "seed 0 → 1")]:
        p = single(synthetic_data, "--run-name", "r", *extra, cwd=tmp_path, env=mlflow_env)
        assert (p.returncode == 2 and error_lines(p.stderr) == [
            f"error: {tmp_path / 'runs' / 'r'} holds a finished run that differs (the config differs: {why}); "
            "choose a new --run-name"]) or "runs/r holds" in p.stderr, p.stderr
        assert why in p.stderr
    p = single(other_data, "--epochs", "1", "--run-name", "r", cwd=tmp_path, env=mlflow_env)
    assert p.returncode == 2 and "another dataset" in error_lines(p.stderr)[0]
    assert files(tmp_path / "runs" / "r") == before
    assert len(mlflow_runs(mlflow_env)[1]) == 1


def test_a_second_live_process_on_a_run_directory_is_refused(synthetic_data, tmp_path):
    first = popen([sys.executable, "-m", "ddp_train", "--data-dir", synthetic_data, *FAST, "--epochs", "3",
                   "--run-name", "x", "--no-mlflow"], tmp_path, {})
    out = []
    read_until(first, "run x:", out)
    p = single(synthetic_data, "--epochs", "3", "--run-name", "x", "--no-mlflow", cwd=tmp_path)
    assert p.returncode == 2
    [line] = error_lines(p.stderr)
    assert f"run directory runs/x is in use by pid {first.pid} on" in line and "another --run-name" in line
    rest, _ = first.communicate(timeout=300)
    assert first.returncode == 0 and "epoch 2 |" in rest  # the live run was not disturbed


@pytest.mark.parametrize("nproc", [2, 3], ids=["rank-0-killed", "ranks-0-and-1-killed-together"])
def test_a_killed_rank_0_leaves_its_run_failed_not_running(synthetic_data, tmp_path, mlflow_env, nproc):
    """Rank 0 killed (with rank 1 too, as when their node is lost): the last rank, the only one left, names the
    checkpoint rank 0 completed and marks the run FAILED, which only rank 1 used to do."""
    proc = popen(ddp(nproc, synthetic_data, "--epochs", "20", "--run-name", "k", "--batch-size", str(33 * nproc)),
                 tmp_path, mlflow_env)
    out = []
    read_until(proc, "epoch 1 |", out)
    first = tmp_path / "runs" / "k" / "checkpoints" / "ckpt_e0001_s000000.pt"
    deadline = time.monotonic() + 120
    while not first.exists():  # rank 0 writes it in the background
        assert time.monotonic() < deadline, "epoch 0's checkpoint never appeared"
        time.sleep(0.05)
    for w in [worker(proc, rank) for rank in range(nproc - 1)]:
        w.send_signal(signal.SIGKILL)
    rest, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    [line] = [line for line in error_lines(rest) if f"rank {nproc - 1} lost its peers in epoch" in line]
    # it names the newest checkpoint rank 0 completed before it died (epoch 1's may have been written too)
    done = sorted(first.parent.glob("ckpt_*.pt"))
    assert line.endswith(f"to resume from {done[-1].relative_to(tmp_path)}"), (done, line)
    _, [r] = mlflow_runs(mlflow_env)
    assert r.info.status == "FAILED"  # set by the survivor: rank 0 could not


def test_a_stopped_rank_fails_the_others_within_the_dist_timeout(synthetic_data, tmp_path):
    proc = popen(ddp(2, synthetic_data, "--epochs", "20", "--no-mlflow", "--dist-timeout", "15"), tmp_path, {})
    out = []
    read_until(proc, "epoch 0 |", out)
    stopped = worker(proc, 1)
    stopped.send_signal(signal.SIGSTOP)
    t0 = time.monotonic()
    unstick = threading.Timer(240, stopped.kill)  # a rank 0 that hangs instead sees its peer die at 240 s
    unstick.start()
    try:
        line = read_until(proc, "error: rank 0 lost its peers in epoch", out)
        took = time.monotonic() - t0
    finally:  # torchrun would give the stopped worker 30 s to take its SIGTERM before killing it
        unstick.cancel()
        stopped.send_signal(signal.SIGKILL)
    proc.communicate(timeout=120)
    assert "--dist-timeout 15 s" in line and 15 <= took < 120, (took, line)
    assert proc.returncode != 0


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root (CI runs as root)")
def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(synthetic_data, tmp_path, mlflow_env):
    probe = tmp_path / "probe"
    run(ddp(1, synthetic_data, "--epochs", "1", "--no-mlflow", "--out-dir", probe, "--run-name", "p"),
        cwd=tmp_path, check=True)
    size = next((probe / "p" / "checkpoints").iterdir()).stat().st_size
    with tmpfs(tmp_path / "small", f"size={int(size * 1.6)}") as out:
        p = run(ddp(2, synthetic_data, "--epochs", "3", "--out-dir", out, "--run-name", "f"), cwd=tmp_path,
                env=mlflow_env)
        assert p.returncode == 1
        [line] = error_lines(p.stderr)
        assert "cannot write checkpoint" in line and "No space left on device" in line, p.stderr
        assert f"the previous checkpoint {out}/f/checkpoints/ckpt_e0001_s000000.pt is intact" in line
        ckpts = sorted(p.name for p in (out / "f" / "checkpoints").iterdir())
        assert ckpts == ["ckpt_e0001_s000000.pt"]  # no partial file left, the intact one kept
        assert torch.load(out / "f" / "checkpoints" / ckpts[0], weights_only=False)["epoch"] == 1
        assert mlflow_runs(mlflow_env)[1][0].info.status == "FAILED"


def test_an_unusable_tracking_uri_never_stops_training(synthetic_data, tmp_path):
    """A scheme MLflow has no store for (it may be a plugin's: not refused before the start) is named unusable, at
    the start and at the end, not "unreachable" or "the server failed" as it was."""
    p = single(synthetic_data, "--epochs", "1", "--run-name", "u", "--tracking-uri", "foo://bar", cwd=tmp_path,
               check=True)
    fallback = tmp_path / "runs" / "u" / "mlflow-fallback.db"
    assert "warning: MLflow tracking URI foo://bar unusable (RuntimeError: UnsupportedModelRegistryStoreURIException" \
        in p.stdout and str(fallback) in p.stdout
    assert re.search(r"^MLflow: the tracking URI foo://bar could not be used \(.*\); the complete run is \w+ in "
                     rf"sqlite:///{re.escape(str(fallback))}$", p.stdout, re.M), p.stdout
    _, [r] = mlflow_runs({"MLFLOW_TRACKING_URI": f"sqlite:///{fallback}"}, "cifar100-ddp")
    assert r.info.status == "FINISHED"


def test_two_runs_started_at_once_on_a_new_sqlite_store(synthetic_data, tmp_path):
    mlflow_env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/new.db", "MLFLOW_EXPERIMENT_NAME": "tests"}
    assert not (tmp_path / "new.db").exists()
    procs = [popen([sys.executable, "-m", "ddp_train", "--data-dir", synthetic_data, *FAST, "--epochs", "1",
                    "--no-system-metrics"], tmp_path, mlflow_env) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    _, runs = mlflow_runs(mlflow_env)
    assert len(runs) == 2 and len({r.info.run_name for r in runs}) == 2
    assert {r.info.status for r in runs} == {"FINISHED"}


def test_an_unwritable_out_dir_is_found_before_anything_starts(synthetic_data, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for cmd in (["--check"], []):
        p = single(synthetic_data, *cmd, "--out-dir", blocker / "runs", cwd=tmp_path)
        assert p.returncode == 2 and error_lines(p.stderr) == [
            f"error: --out-dir {blocker / 'runs'} is not a writable directory; choose one this job can write"]
    assert not (tmp_path / "mlflow.db").exists()


def subset_archive(path, keep_fine: int, fine_names, coarse_names, coarse_of):
    """The synthetic set cut to fine labels < keep_fine, written in the official format with the given names and
    fine → coarse map (a custom dataset, as a user brings one)."""
    import numpy as np

    from data_prep import cifar
    src = cifar.read_archive(cifar.synthetic_archive(path.with_suffix(".src.tar.gz"), 3000, 1000), allow_custom=True)
    members = {}
    for name, split in (("train", src.train), ("test", src.test)):
        keep = split.fine < keep_fine
        members[name] = {b"data": split.images[keep].transpose(0, 3, 1, 2).reshape(-1, 3072),
                         b"fine_labels": split.fine[keep].tolist(),
                         b"coarse_labels": [coarse_of[f] for f in split.fine[keep].tolist()]}
    members["meta"] = {b"fine_label_names": [n.encode() for n in fine_names],
                       b"coarse_label_names": [n.encode() for n in coarse_names]}
    assert np.all(np.isin(members["test"][b"fine_labels"], range(keep_fine)))
    return cifar.write_archive(path, members)


def test_a_custom_dataset_with_fewer_classes_trains_end_to_end(tmp_path, mlflow_env):
    """The official names, but only fine classes 0–9 (so 9 of the 20 superclasses): it crashed in the per-superclass
    report after training, with the MLflow run left FINISHED. Metrics, tables and pictures cover what is there."""
    from data_prep import cifar
    archive = subset_archive(tmp_path / "sub.tar.gz", 10, cifar.FINE_NAMES, cifar.COARSE_NAMES,
                             {f: cifar.FINE_TO_COARSE[f] for f in range(10)})
    run([sys.executable, "-m", "data_prep", "--source", archive, "--allow-custom", "--out", tmp_path / "data"],
        check=True)
    p = run(ddp(2, tmp_path / "data", "--epochs", "2", "--batch-size", "50", "--run-name", "sub"), cwd=tmp_path,
            env=mlflow_env, check=True)
    assert "epoch 1 |" in p.stdout
    present = sorted({cifar.COARSE_NAMES[cifar.FINE_TO_COARSE[f]] for f in range(10)})
    import csv
    rows = list(csv.DictReader((tmp_path / "runs" / "sub" / "per_superclass.csv").read_text().splitlines()))
    assert sorted(r["superclass"] for r in rows) == present and len(present) == 9
    c, [r] = mlflow_runs(mlflow_env)
    assert r.info.status == "FINISHED"
    assert {"learning_curves.png", "per_superclass.png", "per_superclass.csv"} <= {
        a.path for a in c.list_artifacts(r.info.run_id)}


def test_the_models_head_is_sized_from_the_manifest(tmp_path):
    """A set with its own 6 fine classes in 2 superclasses: a 6-way model (top-5 of 6 is still a metric)."""
    archive = subset_archive(tmp_path / "six.tar.gz", 6, [f"class{i}" for i in range(6)], ["even", "odd"],
                             {f: f % 2 for f in range(6)})
    run([sys.executable, "-m", "data_prep", "--source", archive, "--allow-custom", "--out", tmp_path / "data"],
        check=True)
    single(tmp_path / "data", "--epochs", "1", "--batch-size", "50", "--run-name", "six", "--no-mlflow",
           cwd=tmp_path, check=True)
    saved = torch.load(tmp_path / "runs" / "six" / "model.pt", weights_only=False)
    assert saved["model"]["fc.weight"].shape[0] == 6 and saved["fine_label_names"][5] == "class5"
    assert 0 <= saved["metrics"]["test_top5"] <= 100


def test_torchrun_restarts_a_killed_worker_and_the_run_ends_as_if_uninterrupted(synthetic_data, tmp_path,
                                                                                mlflow_env):
    """torchrun --max-restarts=3, no Slurm, default run name: a worker SIGKILLed at three points — mid-epoch 1, right
    after epoch 1's line (while its checkpoint is written), and as the restarted group resumes (before its first
    step); each time the group restarts, finds its own run (TORCHELASTIC_RUN_ID), resumes from the last checkpoint
    into the same MLflow run, logs each epoch once and ends with the uninterrupted run's metrics. Under --resume
    never too: it refused the job's own restarts (their run directory held checkpoints), spending every restart."""
    epochs = ["--epochs", "3", "--no-system-metrics"]
    plain = run(ddp(2, synthetic_data, *epochs, "--no-mlflow", "--out-dir", tmp_path / "plain"), cwd=tmp_path,
                check=True)
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node=2", "--max-restarts=3", "-m", "ddp_train", "--data-dir",
           synthetic_data, *FAST, *epochs, "--resume", "never", "--log-every-steps", "5"]  # never: no other run's
    # checkpoints, but its own restarts
    proc = popen(cmd, tmp_path, mlflow_env)
    out = []
    read_until(proc, "epoch 0 |", out)
    time.sleep(1.0)  # into epoch 1
    worker(proc, 1).send_signal(signal.SIGKILL)
    read_until(proc, "resuming from", out)
    read_until(proc, "epoch 1 |", out)
    worker(proc, 0).send_signal(signal.SIGKILL)  # right after epoch 1's line: while its checkpoint is written
    read_until(proc, "resuming from", out)
    worker(proc, 1).send_signal(signal.SIGKILL)  # as the restarted group resumes, before its first step
    rest, _ = proc.communicate(timeout=600)
    text = "".join(out) + rest
    assert proc.returncode == 0, text[-4000:]
    assert text.count("resuming from") == 3
    lines = [line for line in text.splitlines() if line.startswith("epoch ")]
    final = [line for line in lines if line.startswith("epoch 2 |")][-1]
    expected = next(line for line in plain.stdout.splitlines() if line.startswith("epoch 2 |"))
    assert final.split(" | ")[:4] == expected.split(" | ")[:4]  # loss, train and test accuracy: identical
    c, [r] = mlflow_runs(mlflow_env, "tests")
    assert r.info.status == "FINISHED"
    assert sorted(m.step for m in c.get_metric_history(r.info.run_id, "test_top1")) == [0, 1, 2]
    # each step metric once: a restart from an epoch's start used to log that epoch's steps again
    assert sorted(m.step for m in c.get_metric_history(r.info.run_id, "step_train_loss")) == list(range(5, 61, 5))


def test_a_second_signal_soon_after_the_stop_still_ends_with_status_3(synthetic_data, tmp_path):
    """Slurm, a person or torchrun may repeat SIGTERM: once the ranks have checkpointed, the stop is the answer to
    both (it once arrived during Python's 2-s teardown and turned the 3 into a kill)."""
    proc = popen([sys.executable, "-m", "ddp_train", "--data-dir", synthetic_data, *FAST, "--epochs", "20",
                  "--no-mlflow", "--run-name", "s"], tmp_path, {})
    out = []
    read_until(proc, "epoch 0 |", out)
    proc.send_signal(signal.SIGTERM)
    read_until(proc, "stopped by signal 15 at epoch 1", out)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 3, "".join(out) + rest


def as_in_a_terminal():
    """SIGINT as a terminal's foreground job has it. A shell's background job (`cmd &`, as a CI script may start
    the suite) inherits SIGINT ignored, and Python then leaves it ignored: Ctrl-C could not reach the trainer."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_ends_the_run_killed_in_one_line(synthetic_data, other_data, tmp_path, mlflow_env):
    """Then the data is re-prepared with other content before the resume: refused in one line, the run untouched."""
    proc = popen([sys.executable, "-m", "ddp_train", "--data-dir", synthetic_data, *FAST, "--epochs", "20",
                  "--run-name", "c"], tmp_path, mlflow_env, preexec_fn=as_in_a_terminal)
    out = []
    read_until(proc, "epoch 1 |", out)  # epoch 0's checkpoint is written
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in rest, rest[-3000:]
    assert error_lines(rest) == ["error: interrupted (Ctrl-C); the MLflow run ends KILLED and the checkpoints "
                                 "stay: rerun with the run's --run-name to resume"]
    assert mlflow_runs(mlflow_env)[1][0].info.status == "KILLED"
    assert (tmp_path / "runs" / "c" / "checkpoints" / "ckpt_e0001_s000000.pt").exists()
    before = files(tmp_path / "runs" / "c")
    p = single(other_data, "--epochs", "20", "--run-name", "c", cwd=tmp_path, env=mlflow_env)
    assert p.returncode == 2 and error_lines(p.stderr) == [
        "error: no checkpoint in runs/c/checkpoints can continue this run (ckpt_e0001_s000000.pt: it was trained on "
        "another dataset (manifest sha256 differs)); rerun with that run's config and data to resume it, or choose "
        "a new --run-name"], p.stderr
    assert files(tmp_path / "runs" / "c") == before
    assert [r.info.status for r in mlflow_runs(mlflow_env)[1]] == ["KILLED"]
