"""The run directory: its name, who may write it, and whether this job may continue what it holds.

    <out_dir>/<run name>/
      run.json       who created the run (job identity, config, dataset) and, once finished, its final metrics
      .lock          held by rank 0 of the live job (flock): a second live process on the directory is refused
      checkpoints/   see checkpoint.py
      model.pt, learning_curves.png, per_superclass.{csv,png}, time_budget.csv

A default name is new for every job. A job's own restart — a Slurm requeue (SLURM_RESTART_COUNT > 0) or a torchrun
elastic restart (TORCHELASTIC_RESTART_COUNT > 0) — finds the directory its job created and continues it. An
explicit --run-name is a request to continue that run: it is granted only when its checkpoints fit the config
and the data; otherwise the job stops with one line and nothing of the old run is touched.
"""
import datetime
import json
import os
import secrets
import shutil
import socket
from pathlib import Path

from data_prep.files import try_lock
from data_prep.manifest import atomic_write_bytes

from .config import Config, resume_difference
from .errors import EXIT_USAGE, JobError

INFO = "run.json"


class RunConflict(JobError):
    """The run directory belongs to another run, or to a live process."""
    exit_code = EXIT_USAGE


class RunFinished(JobError):
    """The run this job would continue has already finished: nothing to do."""
    exit_code = 0


def job_identity() -> dict:
    """The job this process belongs to (the Slurm job, or the torchrun invocation) and whether it is a restart."""
    env = os.environ
    if env.get("SLURM_JOB_ID"):
        job = f"slurm:{env.get('SLURM_CLUSTER_NAME', '')}:{env['SLURM_JOB_ID']}"
    elif env.get("TORCHELASTIC_RUN_ID"):
        job = f"torchrun:{env['TORCHELASTIC_RUN_ID']}"
    else:
        job = None
    restart = int(env.get("SLURM_RESTART_COUNT") or 0) + int(env.get("TORCHELASTIC_RESTART_COUNT") or 0)
    return {"job": job, "restart": restart, "host": socket.gethostname(), "pid": os.getpid()}


def default_base(cfg: Config, world_size: int | str) -> str:
    width = f"-w{cfg.width}" if cfg.model == "resnet18" else ""
    return f"{cfg.model}{width}-b{cfg.batch_size}-lr{cfg.lr:g}-ws{world_size}"


def _now(fmt="%Y%m%d-%H%M%S") -> str:
    return datetime.datetime.now().strftime(fmt)


def read_info(run_dir: Path) -> dict:
    try:
        return json.loads((Path(run_dir) / INFO).read_text())
    except (OSError, ValueError):
        return {}


def choose_name(cfg: Config, world_size: int, ident: dict, log=print) -> str:
    """The run's name: --run-name, the run a restarted job created, or a new default name."""
    if cfg.run_name:
        return cfg.run_name
    out, base = Path(cfg.out_dir), default_base(cfg, world_size)
    if ident["job"] and ident["restart"]:  # at any world size: an elastic restart (--nnodes 1:4) may have another
        mine = [p for p in out.glob(default_base(cfg, "*")) if read_info(p).get("job") == ident["job"]]
        if mine:
            return max(mine, key=lambda p: read_info(p).get("created", "")).name
    slurm_id = os.environ.get("SLURM_JOB_ID")
    name = f"{base}-slurm{slurm_id}" if slurm_id else f"{base}-{_now()}-{secrets.token_hex(2)}"
    if (out / name).exists():  # a Slurm job id seen before: ids restart (lost controller state, another cluster)
        other = read_info(out / name)
        new = f"{name}-{_now()}-{secrets.token_hex(2)}"
        log(f"note: {out / name} belongs to {other.get('job') or 'another job'} (created {other.get('created', '?')})"
            f", not to a restart of this job; this job's run is {new}")
        name = new
    return name


class RunDir:
    """Rank 0's hold on the run directory: created, locked, described by run.json."""

    def __init__(self, out_dir: str, name: str):
        self.name = name
        self.path = Path(out_dir) / name
        self.info = {}
        self._lock = None

    def open(self, cfg: Config, manifest_sha: str, ident: dict) -> "RunDir":
        created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock = open(self.path / ".lock", "a+")  # noqa: SIM115  (held open: the flock lives with it)
        except OSError as e:
            raise JobError(f"cannot create the run directory {self.path} ({e.strerror}); choose a writable "
                           "--out-dir") from None
        try:
            locked = try_lock(self._lock, self.path / ".lock")
        except OSError as e:
            self.close()
            if created:
                shutil.rmtree(self.path, ignore_errors=True)
            raise JobError(f"{e.strerror}; choose an --out-dir on one that does") from None
        if not locked:
            self._lock.seek(0)
            holder = self._lock.read().strip() or "another process"
            self.close()
            raise RunConflict(f"run directory {self.path} is in use by {holder}; wait for it to end or choose "
                              "another --run-name") from None
        try:
            self._lock.seek(0)
            self._lock.truncate()
            self._lock.write(f"pid {ident['pid']} on {ident['host']} since {_now('%Y-%m-%d %H:%M:%S')}\n")
            self._lock.flush()
            return self._take(cfg, manifest_sha, ident)
        except OSError as e:  # a full or read-only disk: one line, and no directory of ours left behind
            self.close()
            if created:
                shutil.rmtree(self.path, ignore_errors=True)
            raise JobError(f"cannot write to the run directory {self.path} ({e.strerror or e}); free space or "
                           "choose another --out-dir") from None

    def _take(self, cfg: Config, manifest_sha: str, ident: dict) -> "RunDir":
        # temporary files of a writer that was killed mid-write (atomic writes never leave a partial final name)
        for stale in [*self.path.glob(".*.tmp*"), *self.path.glob("checkpoints/.*.tmp*")]:
            stale.unlink(missing_ok=True)
        self.info = read_info(self.path)
        if self.info.get("status") == "finished":
            why = resume_difference(self.info.get("config", {}), cfg.public_dict())
            if self.info.get("manifest_sha256") != manifest_sha:
                why = why or "it was trained on another dataset (manifest sha256 differs)"
            if why:
                raise RunConflict(f"{self.path} holds a finished run that differs ({why}); choose a new --run-name")
            top1 = self.info.get("metrics", {}).get("test_top1")
            raise RunFinished(f"run {self.name} already finished" + (f" (test top-1 {top1:.2f} %)" if top1 else "")
                              + f"; its model is {self.path / 'model.pt'}; choose a new --run-name to train again")
        if not self.info or not any((self.path / "checkpoints").glob("ckpt_e*_s*.pt")):  # nothing to continue
            self.info = {"name": self.name, "created": _now("%Y-%m-%dT%H:%M:%S.%f"), "job": ident["job"],
                         "config": cfg.public_dict(), "manifest_sha256": manifest_sha, "status": "running"}
            self.write()
        return self

    def write(self) -> None:
        atomic_write_bytes(self.path / INFO, (json.dumps(self.info, indent=1) + "\n").encode())

    def finished(self, metrics: dict, mlflow_run_id) -> None:
        self.info.update(status="finished", finished=_now("%Y-%m-%dT%H:%M:%S"), mlflow_run_id=mlflow_run_id,
                         metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        self.write()

    def close(self) -> None:
        if self._lock is not None:
            lock, self._lock = self._lock, None
            try:
                lock.close()  # releases the flock
            except OSError:  # its buffered line could not land (disk full): the flock is released all the same
                pass

