"""MLflow tracking, on rank 0 only. Every call is guarded: tracking problems are reported, never fatal."""
import os
import platform
import socket
import subprocess
import sys
import warnings
from pathlib import Path


def git_state() -> dict:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        if commit.returncode != 0:
            return {}
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5)
        return {"git_commit": commit.stdout.strip(), "git_dirty": str(bool(dirty.stdout.strip())).lower()}
    except (OSError, subprocess.SubprocessError):
        return {}


class Tracker:
    """One MLflow run for the job. `enabled=False` (other ranks, --no-mlflow) makes every method a no-op."""

    def __init__(self, enabled: bool, tracking_uri: str, experiment: str, log=print):
        self.enabled = enabled
        self.log = log
        self.errors = 0
        self.run_id = None
        self.uri = None
        self.logged_epochs = set()
        if not enabled:
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import mlflow
        self.mlflow = mlflow
        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        self.uri = mlflow.get_tracking_uri()
        self.experiment = experiment

    def _guard(self, what, fn, *args, **kwargs):
        if not self.enabled:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # tracking must never stop training
            self.errors += 1
            self.log(f"warning: MLflow {what} failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                     "training continues")
            return None

    def start(self, run_name: str, params: dict, tags: dict, resume_run_id: str = None) -> None:
        """A new run, or — for a resumed job — the run its checkpoint names, continued (same run id)."""
        def _start():
            self.mlflow.set_experiment(self.experiment)
            if resume_run_id:
                try:
                    run = self.mlflow.start_run(run_id=resume_run_id)
                    self.mlflow.set_tags(tags)
                    self.run_id = run.info.run_id
                    history = self.mlflow.MlflowClient().get_metric_history(self.run_id, "test_top1")
                    self.logged_epochs = {m.step for m in history}
                    return
                except Exception as e:
                    self.log(f"warning: cannot continue MLflow run {resume_run_id} ({type(e).__name__}); "
                             "starting a new run")
            run = self.mlflow.start_run(run_name=run_name, tags=tags)
            self.run_id = run.info.run_id
            self.mlflow.log_params({k: str(v) for k, v in params.items()})
        self._guard("start", _start)
        if self.run_id:
            self.log(f"MLflow: run {self.run_id} in experiment '{self.experiment}' at {self.uri}"
                     + (" (continued)" if resume_run_id == self.run_id else ""))

    def log_epoch(self, metrics: dict, epoch: int) -> None:
        """Per-epoch metrics with step=epoch; an epoch the run already holds (re-run after a resume from an
        older checkpoint) is not logged twice."""
        if self.run_id and epoch not in self.logged_epochs:
            self._guard("log_metrics", self.mlflow.log_metrics, metrics, step=epoch)
            self.logged_epochs.add(epoch)

    def set_tags(self, tags: dict) -> None:
        if self.run_id:
            self._guard("set_tags", self.mlflow.set_tags, tags)

    def log_model(self, model, input_example, register_as: str = "") -> None:
        if not self.run_id:
            return

        def _log():
            import mlflow.pytorch
            import torch
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mlflow.pytorch.log_model(model, name="model", input_example=input_example,
                                         registered_model_name=register_as or None,
                                         pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
        self._guard("log_model", _log)

    def log_steps(self, metrics: dict, step: int) -> None:
        """Per-step metrics, queued to MLflow's asynchronous logger so the training loop never waits on it."""
        if self.run_id:
            self._guard("log_metrics", self.mlflow.log_metrics, metrics, step=step, synchronous=False)

    def log_artifact(self, path: Path) -> None:
        if self.run_id:
            self._guard("log_artifact", self.mlflow.log_artifact, str(path))

    def finish(self, status: str) -> None:
        if self.run_id:
            self._guard("end_run", self.mlflow.end_run, status=status)


def environment_tags(world_size: int, device, manifest_checksum: str, manifest: dict) -> dict:
    import torch
    tags = {"world_size": str(world_size), "device_type": device.type, "hostname": socket.gethostname(),
            "torch_version": torch.__version__, "python_version": platform.python_version(),
            "dataset_manifest_sha256": manifest_checksum, "dataset_source": str(manifest.get("source")),
            "dataset_official": str(manifest.get("official")).lower()}
    if device.type == "cuda":
        tags["device_name"] = torch.cuda.get_device_name(device)
        tags["device_count"] = str(torch.cuda.device_count())
    else:
        tags["device_name"] = platform.processor() or platform.machine()
    try:
        from importlib.metadata import version
        tags["ffcv_version"] = version("ffcv")
        tags["mlflow_version"] = version("mlflow")
    except Exception:
        pass
    tags.update(git_state())
    for env in ("SLURM_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_NODELIST", "SLURM_RESTART_COUNT"):
        if env in os.environ:
            tags[env.lower()] = os.environ[env]
    tags["command"] = " ".join(sys.argv)[:500]
    return tags


class SystemMetrics:
    """MLflow's system-metrics sampler (CPU, memory, disk, network; GPU through nvidia-ml-py) for one node,
    writing into the job's run. On a multi-node job each node's first process runs one, labelled by hostname."""

    def __init__(self, run_id, tracking_uri: str, interval: float, label_node: bool, log=print):
        self.monitor = None
        if not run_id:
            return
        try:
            import warnings
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
            self.monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, resume_logging=True,
                                                node_id=socket.gethostname() if label_node else None,
                                                tracking_uri=tracking_uri or None)
            self.monitor.start()
        except Exception as e:
            self.monitor = None
            log(f"warning: MLflow system metrics unavailable ({type(e).__name__}: {str(e)[:200]}); training continues")

    def stop(self) -> None:
        if self.monitor is not None:
            try:
                self.monitor.finish()
            except Exception:
                pass
            self.monitor = None
