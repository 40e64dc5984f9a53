"""What a run says about itself in MLflow: tags (MLflow's own system tags, so the UI fills its Source, User and
Description; the project's where MLflow has none), the run's description, and its two dataset inputs built from
the manifest (the UI's Dataset column)."""
import getpass
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
from pathlib import Path

from data_prep.cifar import URL

from .config import redact

ROOT = Path(__file__).resolve().parent.parent


def _git(*args) -> str:
    try:
        p = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=5)
        return p.stdout.strip() if p.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def git_tags() -> dict:
    commit = _git("rev-parse", "HEAD")
    if not commit:
        return {}
    tags = {"mlflow.source.git.commit": commit,
            "git_dirty": str(bool(_git("status", "--porcelain", "--untracked-files=no"))).lower()}
    branch = _git("rev-parse", "--abbrev-ref", "HEAD")
    if branch and branch != "HEAD":
        tags["mlflow.source.git.branch"] = branch
    remote = _git("remote", "get-url", "origin")
    if remote:
        tags["mlflow.source.git.repoURL"] = redact(remote)
    return tags


def command() -> str:
    """The trainer's command line as a person would type it (each rank runs the same one)."""
    args = " ".join(shlex.quote(a) for a in sys.argv[1:])
    return redact(f"python -m ddp_train {args}".strip())


def launcher() -> str:
    env = os.environ
    if env.get("SLURM_JOB_ID"):
        cluster = f" on cluster {env['SLURM_CLUSTER_NAME']}" if env.get("SLURM_CLUSTER_NAME") else ""
        return f"Slurm job {env['SLURM_JOB_ID']}{cluster}"
    return "torchrun" if env.get("TORCHELASTIC_RUN_ID") else "one process"


def user() -> str:
    """Who runs the job: getpass's answer, or the uid where it has none (a container started with --user UID, a
    Kubernetes runAsUser: no passwd entry and no USER)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


def tags(world_size: int, device, manifest_sha: str, manifest: dict, run_dir: Path) -> dict:
    import torch
    t = {"mlflow.source.name": "python -m ddp_train",
         "mlflow.source.type": "JOB" if os.environ.get("SLURM_JOB_ID") else "LOCAL",
         "mlflow.user": user(),
         "mlflow.note.content": note(world_size, run_dir),
         "world_size": str(world_size), "device_type": device.type, "hostname": socket.gethostname(),
         "torch_version": torch.__version__, "python_version": platform.python_version(),
         "dataset_manifest_sha256": manifest_sha, "dataset_source": str(manifest.get("source")),
         "dataset_official": str(manifest.get("official")).lower(), "command": command()[:5000]}
    if device.type == "cuda":
        t["device_name"] = torch.cuda.get_device_name(device)
        t["device_count"] = str(torch.cuda.device_count())
    else:
        t["device_name"] = platform.processor() or platform.machine()
    try:
        from importlib.metadata import version
        t["ffcv_version"] = version("ffcv")
        t["mlflow_version"] = version("mlflow")
    except Exception:
        pass
    t.update(git_tags())
    image = next((os.environ[v] for v in ("CONTAINER_IMAGE", "APPTAINER_CONTAINER", "SINGULARITY_CONTAINER")
                  if os.environ.get(v)), None)
    if image:
        t["container_image"] = image
    for env in ("SLURM_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_NODELIST", "SLURM_RESTART_COUNT"):
        if env in os.environ:
            t[env.lower()] = os.environ[env]
    return t


def note(world_size: int, run_dir: Path) -> str:
    """The run's description (MLflow shows it on the run page): what ran and how to continue it."""
    name = Path(run_dir).name
    return (f"Trained by `{command()}` on {world_size} rank(s) ({launcher()}).\n\n"
            f"Files: `{Path(run_dir).absolute()}` (checkpoints/, model.pt, pictures, time_budget.csv).\n\n"
            f"Resume after a stop or failure: rerun the same command with `--run-name {name}`; a requeued Slurm "
            "job does so by itself.")


def datasets(manifest: dict, manifest_sha: str) -> list:
    """One MLflow dataset per split (context training / testing): name, digest (the manifest's sha256, cut to
    the 16 hex digits MLflow's digest column takes comfortably), where it came from, its schema and profile."""
    import numpy as np
    from mlflow.data.schema import TensorDatasetSchema
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.types import Schema, TensorSpec
    source = manifest.get("source", "")
    if source == "download":
        source_type, where = "http", {"url": URL}
    elif source == "synthetic":
        source_type, where = "code", {"tags": {"generator": "python -m data_prep --source synthetic",
                                               **manifest.get("request", {})}}
    else:
        source_type, where = "local", {"uri": str(source)}
    schema = TensorDatasetSchema(Schema([TensorSpec(np.dtype(np.uint8), (-1, 32, 32, 3), "image")]),
                                 Schema([TensorSpec(np.dtype(np.int64), (-1,), "fine_label"),
                                         TensorSpec(np.dtype(np.int64), (-1,), "coarse_label")])).to_dict()
    kind = "CIFAR-100" if manifest.get("official") else f"{source if source == 'synthetic' else 'custom'} CIFAR-100"
    inputs = []
    for split, context in (("train", "training"), ("test", "testing")):
        entry = manifest["splits"][split]
        profile = {"num_rows": entry["count"], "num_classes": manifest.get("num_classes"),
                   "num_superclasses": manifest.get("num_superclasses"),
                   "classes_present": len(entry["fine_present"]) if "fine_present" in entry else None,
                   "source_checksum": manifest.get("source_checksum"), "beton": entry["file"],
                   "beton_sha256": entry["sha256"]}
        ds = Dataset(name=f"{kind} {split}", digest=manifest_sha[:16], source_type=source_type,
                     source=json.dumps(where), schema=json.dumps(schema),
                     profile=json.dumps(profile))
        inputs.append(DatasetInput(ds, tags=[InputTag("mlflow.data.context", context)]))
    return inputs
