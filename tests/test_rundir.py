"""rundir: whose run a directory holds — names, restarts, reused Slurm job ids, the lock, the finished marker."""
import os
import subprocess
import sys

import pytest

from ddp_train import rundir
from ddp_train.config import Config
from ddp_train.errors import JobError

from conftest import fill, tmpfs

CFG = Config(out_dir="", width=8, batch_size=100)


def ident(job=None, restart=0):
    return {"job": job, "restart": restart, "host": "h", "pid": 1}


def cfg(tmp_path, **over):
    return Config(**{**CFG.to_dict(), "out_dir": str(tmp_path), **over})


def test_default_names_differ_even_within_one_second(tmp_path):
    names = {rundir.choose_name(cfg(tmp_path), 2, ident()) for _ in range(20)}
    assert len(names) == 20 and all(n.startswith("resnet18-w8-b100-lr0.4-ws2-") for n in names)


def test_an_explicit_name_is_kept(tmp_path):
    assert rundir.choose_name(cfg(tmp_path, run_name="mine"), 2, ident("slurm:c:7", 1)) == "mine"


def test_a_restart_finds_the_run_its_job_created_and_a_new_job_never_does(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    c = cfg(tmp_path)
    first = rundir.choose_name(c, 2, ident("slurm:c:42"))
    assert first.endswith("-slurm42")
    rundir.RunDir(tmp_path, first).open(c, "sha", ident("slurm:c:42")).close()
    # the job's requeue (restart 1) continues it
    assert rundir.choose_name(c, 2, ident("slurm:c:42", restart=1)) == first
    # job id 42 again, but a new job (its first attempt; the controller lost its state): a new directory
    notes = []
    other = rundir.choose_name(c, 2, ident("slurm:c:42"), log=notes.append)
    assert other != first and other.startswith(first + "-")
    assert "belongs to slurm:c:42" in notes[0] and "not to a restart of this job" in notes[0]
    rundir.RunDir(tmp_path, other).open(c, "sha", ident("slurm:c:42")).close()
    # that new job's requeue finds the newest directory of job 42, its own
    assert rundir.choose_name(c, 2, ident("slurm:c:42", restart=1)) == other
    # also at another world size (an elastic torchrun --nnodes 1:4 restarts with the nodes it has): it began a new
    # run, the old one's progress left behind
    assert rundir.choose_name(c, 4, ident("slurm:c:42", restart=2)) == other
    # the same id on another cluster sharing the filesystem is not a restart of either
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    assert rundir.choose_name(c, 2, ident("slurm:d:42", restart=1)) not in (first, other)


def test_a_live_run_directory_is_refused_to_a_second_process(tmp_path):
    c = cfg(tmp_path, run_name="r")
    held = rundir.RunDir(tmp_path, "r").open(c, "sha", ident())
    code = ("import sys; from ddp_train import rundir; from ddp_train.config import Config\n"
            f"c = Config(out_dir={str(tmp_path)!r}, run_name='r', width=8, batch_size=100)\n"
            "try:\n    rundir.RunDir(c.out_dir, 'r').open(c, 'sha', rundir.job_identity())\n"
            "except rundir.RunConflict as e:\n    print(e); sys.exit(e.exit_code)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 2 and "is in use by pid 1 on h" in p.stdout, p.stdout + p.stderr
    held.close()
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr  # released with its holder


def test_a_finished_run_is_not_trained_or_exported_again(tmp_path):
    c = cfg(tmp_path, run_name="r")
    run = rundir.RunDir(tmp_path, "r").open(c, "sha", ident())
    run.finished({"test_top1": 61.5}, "abc")
    run.close()
    with pytest.raises(rundir.RunFinished, match=r"already finished \(test top-1 61.50 %\)"):
        rundir.RunDir(tmp_path, "r").open(c, "sha", ident())
    with pytest.raises(rundir.RunConflict,
                       match=r"finished run that differs \(the config differs: seed 0 → 1\); choose a new --run-name"):
        rundir.RunDir(tmp_path, "r").open(cfg(tmp_path, run_name="r", seed=1), "sha", ident())
    with pytest.raises(rundir.RunConflict, match="another dataset"):
        rundir.RunDir(tmp_path, "r").open(c, "other", ident())
    # a field a resume may change (e.g. where the data lives) does not make it another run
    with pytest.raises(rundir.RunFinished):
        rundir.RunDir(tmp_path, "r").open(cfg(tmp_path, run_name="r", data_dir="/elsewhere"), "sha", ident())


def test_a_checkpoint_killed_mid_write_leaves_the_previous_one_in_use(tmp_path):
    """A writer killed mid-write leaves only its temporary file (the final name appears by rename when complete);
    the next holder of the run directory removes it, and loading uses the newest complete checkpoint."""
    import torch

    from ddp_train import checkpoint
    c = cfg(tmp_path, run_name="r")
    ckpts = tmp_path / "r" / "checkpoints"
    state = {"model": {}, "config": c.public_dict(), "manifest_sha256": "sha", "world_size": 1, "step": 0}
    checkpoint.save({**state, "epoch": 1}, checkpoint.path_for(ckpts, 1, 0), keep=3)
    partial = ckpts / ".ckpt_e0002_s000000.pt.tmp4242"
    partial.write_bytes(checkpoint.path_for(ckpts, 1, 0).read_bytes()[:1000])
    rundir.RunDir(tmp_path, "r").open(c, "sha", ident()).close()
    assert not partial.exists()
    path, loaded, _ = checkpoint.load_latest(ckpts, c.public_dict(), "sha", 1)
    assert path == checkpoint.path_for(ckpts, 1, 0) and loaded["epoch"] == 1
    assert isinstance(torch.load(path, weights_only=False), dict)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root (CI runs as root)")
def test_a_full_disk_at_start_fails_in_one_line_and_leaves_no_run_directory(tmp_path):
    with tmpfs(tmp_path / "small", "size=64k") as out:
        fill(out)
        run = rundir.RunDir(str(out), "r")
        try:
            with pytest.raises(JobError) as e:
                run.open(cfg(out), "sha", ident())
        finally:
            run.close()  # as the trainer's exit does: no second error from the lock's unwritten line
        assert str(e.value) == (f"cannot write to the run directory {out / 'r'} (No space left on device); free "
                                "space or choose another --out-dir")
        assert sorted(p.name for p in out.iterdir()) == ["filler"]


def test_a_filesystem_without_locks_is_named_and_leaves_no_run_directory(tmp_path, monkeypatch):
    """flock failing for a reason other than another holder (ENOLCK: NFS without its lock service) was reported as
    "in use by another process"."""
    import errno
    import fcntl

    def no_locks(*_):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(fcntl, "flock", no_locks)
    c = cfg(tmp_path)
    with pytest.raises(JobError) as e:
        rundir.RunDir(tmp_path, "r").open(c, "sha", ident())
    assert str(e.value) == (f"cannot lock {tmp_path}/r/.lock (No locks available): its filesystem does not support "
                            "file locks (flock); choose an --out-dir on one that does")
    assert not (tmp_path / "r").exists()
