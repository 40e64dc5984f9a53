"""Checkpoints of a run: when to save, what every rank contributes, atomic writes by rank 0, keep-last-K, and the
choice of the checkpoint a job continues from.

A checkpoint holds the model, optimizer, schedule and grad scaler, the epoch in progress and the optimizer steps
done in it, every rank's RNG and partial-epoch sums, the metrics history, the (redacted) config, the dataset
manifest's sha256 and the MLflow run id. Loading falls back past a truncated checkpoint or one of another config or
dataset to the previous fitting one; when checkpoints exist and none fits, the job stops — it never starts over on
top of another run's files.
"""
import io
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from data_prep.manifest import atomic_file

from . import dist
from .config import Config, resume_difference
from .errors import JobError, remedy
from .rundir import RunConflict

VERSION = 1
PATTERN = re.compile(r"^ckpt_e(\d{4,})_s(\d{6,})\.pt$")  # wider past epoch 9999 or step 999999


class CheckpointError(JobError):
    """A checkpoint could not be written (disk full, permissions)."""


def path_for(ckpt_dir: Path, epoch: int, step: int) -> Path:
    """`epoch` is the epoch in progress and `step` the optimizer steps done in it (0: the epoch has not begun)."""
    return Path(ckpt_dir) / f"ckpt_e{epoch:04d}_s{step:06d}.pt"


def list_checkpoints(ckpt_dir: Path) -> list:
    """Newest first, by training progress."""
    if not Path(ckpt_dir).is_dir():
        return []
    found = [p for p in Path(ckpt_dir).iterdir() if PATTERN.match(p.name)]
    return sorted(found, key=lambda p: tuple(map(int, PATTERN.match(p.name).groups())), reverse=True)


def save_atomic(obj, path: Path) -> None:
    """torch.save through a memory buffer into an atomic file: a full disk then raises OSError(ENOSPC) from the
    write (torch's zip writer straight to the file reports it as a RuntimeError about its position instead)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    with atomic_file(path) as f:
        f.write(buf.getbuffer())


def save(state: dict, path: Path, keep: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_atomic({"version": VERSION, **state}, path)
    # the one just written stays whatever its place: newer ones this run passed over (another world size's
    # mid-epoch stop, an unreadable file) would otherwise push it out at once
    for old in [p for p in list_checkpoints(path.parent) if p != path][keep - 1:]:
        old.unlink(missing_ok=True)


def problem_with(state: dict, config: dict, manifest_sha: str, world_size: int) -> str:
    """Why this checkpoint cannot continue this run, or '' when it can. `config` is the public (redacted) one."""
    if not isinstance(state, dict) or state.get("version") != VERSION:
        return f"format version {state.get('version') if isinstance(state, dict) else '?'} (expected {VERSION})"
    if state["manifest_sha256"] != manifest_sha:
        return "it was trained on another dataset (manifest sha256 differs)"
    why = resume_difference(state["config"], config)
    if why:
        return why
    if state["step"] > 0 and state["world_size"] != world_size:
        return f"it stopped mid-epoch with world size {state['world_size']}, this job has {world_size}"
    return ""


def load_latest(ckpt_dir: Path, config: dict, manifest_sha: str, world_size: int, log=print):
    """(path, state, problems): the newest checkpoint that can continue this run, or (None, None, problems) where
    problems lists why each checkpoint found was passed over."""
    problems = []
    for path in list_checkpoints(ckpt_dir):
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            problems.append(f"{path.name} is unreadable ({type(e).__name__})")
            log(f"warning: checkpoint {path} is unreadable ({type(e).__name__}); trying the previous one")
            continue
        why = problem_with(state, config, manifest_sha, world_size)
        if why:
            problems.append(f"{path.name}: {why}")
            log(f"warning: checkpoint {path} cannot resume this run: {why}; trying the previous one")
            continue
        return path, state, problems
    return None, None, problems


def to_host(obj):
    """A copy of a (nested) state on the CPU, safe from the training steps that follow: every tensor copied."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_host(v) for v in obj)
    return obj


class Checkpointer:
    """The checkpoints of one run directory, for every rank of the job."""

    def __init__(self, run_dir: Path, run_name: str, cfg: Config, manifest_sha: str, d: dist.Dist):
        self.dir = Path(run_dir) / "checkpoints"
        self.run_name = run_name
        self.cfg = cfg
        self.public_config = cfg.public_dict()
        self.manifest_sha = manifest_sha
        self.d = d
        self.last = None  # the newest complete checkpoint: named when something goes wrong
        self._writer = None  # rank 0's background writer, and the write in flight: (path, future)
        self._pending = None

    def find(self, log=print, own_restart: bool = False):
        """Rank 0: (path, state) of the checkpoint to continue from, or (None, None) for a fresh start; RunConflict
        when the directory holds checkpoints this run cannot continue (another config or dataset, or --resume
        never). `own_restart`: this is a restart of the job that created the run (--resume never resumes it)."""
        if not list_checkpoints(self.dir):
            return None, None
        if self.cfg.resume == "never" and not own_restart:
            raise RunConflict(f"{self.dir} already holds checkpoints and --resume never would overwrite them; choose "
                              "a new --run-name, or --resume auto to continue the run")
        passed_over = []  # said only when an older checkpoint is used: when none is, the one error line says why
        path, state, problems = load_latest(self.dir, self.public_config, self.manifest_sha, self.d.world_size,
                                            passed_over.append)
        for line in passed_over if path is not None else ():
            log(line)
        sizes = [re.search(r"stopped mid-epoch with world size (\d+),", p) for p in problems]
        if path is None and all(sizes) and len({m[1] for m in sizes}) == 1:
            size = sizes[0][1]
            raise RunConflict(f"the checkpoints in {self.dir} stopped mid-epoch with world size {size} and this job "
                              f"has {self.d.world_size}; rerun with {size} rank(s) to resume, or choose a new "
                              "--run-name")
        if path is None and all("is unreadable" in p for p in problems):
            raise RunConflict(f"every checkpoint in {self.dir} is unreadable, truncated or corrupt ({problems[0]}); "
                              "move them out of that directory to start this run again, or choose a new --run-name")
        if path is None:
            raise RunConflict(f"no checkpoint in {self.dir} can continue this run ({problems[0]}); rerun with that "
                              f"run's config and data to resume it, or choose a new --run-name")
        self.last = path
        return path, state

    def load(self, path) -> dict:
        """Every rank reads the checkpoint rank 0 chose (the run directory is on a shared filesystem)."""
        self.last = Path(path)
        return torch.load(path, map_location="cpu", weights_only=False)

    def due(self, epochs_done: int) -> bool:
        return epochs_done % self.cfg.ckpt_every == 0 or epochs_done == self.cfg.epochs

    def save(self, epoch: int, step: int, state_fn, rank_state: dict, wait: bool = False) -> Path:
        """Collective: every rank hands in its own state; rank 0 copies `state_fn()` with all of them to host
        memory at once and writes it in the background while training goes on (one write in flight: serialising
        and syncing ~90 MB took 0.24 s per epoch on an H100 host, a tenth of an epoch). A failed write fails every
        rank with the same line at the next save or `wait`; the previous checkpoint stays intact. `wait`: return
        once this one is on disk."""
        ranks = dist.gather_objects(rank_state)
        target = path_for(self.dir, epoch, step)

        def submit():
            self._finish_write()
            state = to_host({**state_fn(), "epoch": epoch, "step": step, "config": self.public_config,
                             "manifest_sha256": self.manifest_sha, "world_size": self.d.world_size, "ranks": ranks})
            if self._writer is None:
                self._writer = ThreadPoolExecutor(1, thread_name_prefix="checkpoint")
            self._pending = (target, self._writer.submit(save, state, target, self.cfg.keep_ckpts))
            if wait:
                self._finish_write()
        dist.on_master(submit)
        return target

    def wait(self) -> None:
        """Collective: the checkpoint being written is on disk (or every rank fails with its error)."""
        dist.on_master(self._finish_write)

    def _finish_write(self) -> None:
        if self._pending is None:
            return
        (target, future), self._pending = self._pending, None
        try:
            future.result()
        except OSError as e:
            previous = f"the previous checkpoint {self.last} is intact; {remedy(e)} and rerun with --run-name " \
                       f"{self.run_name} to resume from it" if self.last else "there is no earlier checkpoint"
            raise CheckpointError(f"cannot write checkpoint {target} ({e.strerror or e}); {previous}") from None
        self.last = target

    def newest(self):
        """The newest complete checkpoint (None: none yet), for a message on the way out. Rank 0 lets the write in
        flight end first; another rank reads the directory, since it learns of rank 0's writes only at the next
        save."""
        if self.d.master:
            self.close()
            return self.last
        found = list_checkpoints(self.dir)
        return found[0] if found else None

    def close(self) -> None:
        """On the way out: let a write in flight finish (its file is complete or absent either way); once complete it
        is the one the error line names."""
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None
        if self._pending is not None:
            (target, future), self._pending = self._pending, None
            if future.exception() is None:
                self.last = target
