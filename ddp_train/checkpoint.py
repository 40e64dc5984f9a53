"""Checkpoints of a run directory: rank 0 saves atomically (temp file, fsync, rename), the last K are kept, and
loading falls back to the previous valid one when the newest is truncated or belongs to another run."""
import re
from pathlib import Path

import torch

from data_prep.manifest import atomic_file

VERSION = 1
PATTERN = re.compile(r"^ckpt_e(\d{4})_s(\d{6})\.pt$")
# Fields that may change between a run and its resumption; every other field must match.
MUTABLE = {"data_dir", "num_workers", "eval_batch_size", "compile", "progress", "out_dir", "dist_timeout",
           "mlflow", "tracking_uri", "experiment", "ckpt_every", "keep_ckpts", "resume", "tta_thresholds",
           "register_model", "system_metrics", "system_metrics_interval", "log_every_steps"}


def path_for(ckpt_dir: Path, epoch: int, step: int) -> Path:
    """`epoch` is the epoch in progress and `step` the optimizer steps done in it (0: the epoch has not begun)."""
    return Path(ckpt_dir) / f"ckpt_e{epoch:04d}_s{step:06d}.pt"


def list_checkpoints(ckpt_dir: Path) -> list:
    """Newest first, by training progress."""
    if not Path(ckpt_dir).is_dir():
        return []
    found = [p for p in Path(ckpt_dir).iterdir() if PATTERN.match(p.name)]
    return sorted(found, key=lambda p: tuple(map(int, PATTERN.match(p.name).groups())), reverse=True)


def save(state: dict, path: Path, keep: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        torch.save({"version": VERSION, **state}, f)
    for old in list_checkpoints(path.parent)[keep:]:
        old.unlink(missing_ok=True)


def problem_with(state: dict, config: dict, manifest_sha: str, world_size: int) -> str:
    """Why this checkpoint cannot continue this run, or '' when it can."""
    if not isinstance(state, dict) or state.get("version") != VERSION:
        return f"format version {state.get('version') if isinstance(state, dict) else '?'} (expected {VERSION})"
    if state["manifest_sha256"] != manifest_sha:
        return "it was trained on another dataset (manifest sha256 differs)"
    diff = [f"{k} {state['config'].get(k)!r} → {v!r}" for k, v in config.items()
            if k not in MUTABLE and state["config"].get(k) != v]
    if diff:
        return "the config differs: " + ", ".join(diff)
    if state["step"] > 0 and state["world_size"] != world_size:
        return f"it stopped mid-epoch with world size {state['world_size']}, this job has {world_size}"
    return ""


def load_latest(ckpt_dir: Path, config: dict, manifest_sha: str, world_size: int, log=print):
    """(path, state) of the newest checkpoint that can continue this run, or (None, None)."""
    for path in list_checkpoints(ckpt_dir):
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            log(f"warning: checkpoint {path} is unreadable ({type(e).__name__}); trying the previous one")
            continue
        why = problem_with(state, config, manifest_sha, world_size)
        if why:
            log(f"warning: checkpoint {path} cannot resume this run: {why}; trying the previous one")
            continue
        return path, state
    return None, None
