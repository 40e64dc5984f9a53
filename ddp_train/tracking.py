"""MLflow tracking, on rank 0 only. Every call is guarded: tracking problems are reported, never fatal."""
import logging
import os
import socket
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

from .config import redact


def _reason(e: Exception) -> str:
    """One line for a warning: MLflow's API errors name the whole URL, credentials included, so it is redacted."""
    return f"{type(e).__name__}: {redact(str(e).splitlines()[0])[:200] if str(e) else ''}"


class _Redacted(logging.Filter):
    """MLflow's own log lines name whole URLs (system metrics: "Failed to get mlflow run: API request to <URL>
    failed"): their credentials are hidden as everywhere else."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "://" in text:
            record.msg, record.args = redact(text), None
        return True


def redact_mlflow_logs() -> None:
    """On the handlers MLflow gives its loggers when it is imported (it does not propagate to the root's)."""
    for handler in logging.getLogger("mlflow").handlers:
        if not any(isinstance(f, _Redacted) for f in handler.filters):
            handler.addFilter(_Redacted())


class DeletedExperiment(Exception):
    """The run's experiment exists at the tracking URI but is deleted: MLflow creates no run in it."""


@contextmanager
def _flock(path: Path):
    import fcntl
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def store_lock(uri: str):
    """For a sqlite store: an exclusive lock beside the database while it may be created or migrated — two jobs
    starting at once against a new store otherwise race in MLflow's schema set-up (`_alembic_tmp_… already
    exists`)."""
    if not uri.startswith("sqlite:///"):
        return nullcontext()
    db = Path(uri[len("sqlite:///"):].split("?")[0])
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        return nullcontext()
    return _flock(db.with_name(db.name + ".lock"))


class Tracker:
    """One MLflow run for the job, written through MlflowClient. `enabled=False` (other ranks, --no-mlflow) makes
    every method a no-op.

    Never the reason training stops: every call is guarded. Everything logged is also journaled in memory; when a
    remote tracking server cannot be reached (at start or later), the tracker switches to a local fallback store
    in the run directory, replays the journal into a new run there, names it in the log, and carries on there.
    """

    def __init__(self, enabled: bool, tracking_uri: str, experiment: str, fallback_dir: Path | None = None, log=print):
        self.enabled = enabled
        self.log = log
        self.errors = 0
        self.run_id = None
        self.uri = None
        self.logged_epochs = set()
        self.steps_held = 0             # a continued run: the last optimizer step it holds step metrics for
        self.finished = False
        self.continued = False          # the run was started by an earlier attempt of this job
        self.experiment_id = None
        self.fallback = None            # (reason, uri) once the run has moved to the local fallback store
        self.fallen_from = None         # then: the run it left at the tracking URI (None: none was created there)
        # what a move to the fallback store replays: what this attempt logged, and (a continued run) the epochs
        # and dataset inputs the run held already, which this attempt did not log again
        self.journal = {"name": None, "params": {}, "tags": {}, "metrics": [], "inputs": [], "held": {},
                        "epochs": set()}
        if not enabled:
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import mlflow
        redact_mlflow_logs()
        self.mlflow = mlflow
        # MLflow prints "View run … at: <tracking URI>/#/…" as a run ends: with the credentials a URI may carry.
        # The trainer prints the run's address itself, redacted.
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        self.uri = tracking_uri or mlflow.get_tracking_uri()
        self.remote = self.uri.lower().startswith(("http://", "https://"))  # MLflow reads schemes so too
        if self.remote:  # fail over in seconds, not after MLflow's minutes of retries with back-off
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.experiment = experiment
        self.fallback_dir = Path(fallback_dir) if fallback_dir else Path(".")
        self.unusable = None            # why the tracking URI could not even be opened (a typo, a plain directory)
        try:
            with store_lock(self.uri):
                self.client = mlflow.MlflowClient(self.uri)
        except Exception as e:
            self.client, self.unusable = None, _reason(e)

    def _guard(self, what, fn, journaled=False):
        """Run fn; on failure against a server, fall back and — unless the journal replay already covered it
        (start, metrics) — run fn again in the fallback store."""
        if not self.enabled:
            return None
        try:
            return fn()
        except Exception as e:  # tracking must never stop training
            reason = _reason(e)
            unusable = bool(self.unusable) or isinstance(e, DeletedExperiment)
            if (self.remote or unusable) and self.fallback is None and self._fall_back(reason, unusable):
                if journaled:
                    return None
                try:
                    return fn()
                except Exception as e2:
                    reason = _reason(e2)
            self.errors += 1
            self.log(f"warning: MLflow {what} failed ({reason}); training continues")
            return None

    def _fall_back(self, reason: str, unusable: bool) -> bool:
        """Move the run to sqlite:///<run dir>/mlflow-fallback.db and replay everything logged so far."""
        self.fallback_dir.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{(self.fallback_dir / 'mlflow-fallback.db').resolve()}"
        lost_run = self.run_id
        try:
            self.client = self.mlflow.MlflowClient(uri)
            self.uri, self.remote = uri, False
            self.run_id = None
            self._create_run(self.journal["name"], self.journal["params"],
                             {**self.journal["tags"],
                              "fallback_from": f"{redact(self.journal.get('server'))} run {lost_run}"})
            if self.journal["inputs"]:
                self.client.log_inputs(self.run_id, datasets=self.journal["inputs"])
            for epoch, metrics in sorted(self.journal["held"].items()):
                self._log_batch(metrics, epoch)
            for metrics, step in self.journal["metrics"]:
                self._log_batch(metrics, step)
        except Exception as e:
            self.log(f"warning: MLflow fallback store {uri} failed too ({type(e).__name__}); tracking is off")
            self.enabled = False
            return False
        self.fallback, self.fallen_from = (reason, uri, unusable), lost_run
        # the fallback run is a new run holding what was replayed: an epoch the server's run held but this attempt
        # had not passed on yet (a resume from an older checkpoint re-runs it) is logged there when it comes
        self.continued = False
        self.logged_epochs = set(self.journal["held"]) | self.journal["epochs"]
        what = "tracking URI {} unusable" if unusable else "server {} unreachable"
        self.log(f"warning: MLflow {what.format(redact(self.journal.get('server')))} ({reason}); the run "
                 f"continues in the local store {uri} (run {self.run_id}), with everything logged so far replayed; "
                 f"view it with mlflow ui --backend-store-uri {uri}")
        return True

    def _create_run(self, run_name, params, tags):
        if self.client is None:
            raise RuntimeError(self.unusable)
        with store_lock(self.uri):  # two jobs creating one experiment in a new store at once
            exp = self.client.get_experiment_by_name(self.experiment)
            if exp and exp.lifecycle_stage == "deleted":  # MLflow's own error does not say what to do
                raise DeletedExperiment(f"experiment '{self.experiment}' is deleted there: restore it (mlflow "
                                        f"experiments restore --experiment-id {exp.experiment_id}) or pass another "
                                        "--experiment")
            exp_id = exp.experiment_id if exp else self.client.create_experiment(self.experiment)
        run = self.client.create_run(exp_id, run_name=run_name, tags=tags)
        self.run_id, self.experiment_id = run.info.run_id, exp_id
        from mlflow.entities import Param
        self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in params.items()])

    def _log_batch(self, metrics: dict, step: int, synchronous: bool = True):
        import time

        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()],
                              synchronous=synchronous)

    def start(self, run_name: str, params: dict, tags: dict, resume_run_id: str | None = None) -> None:
        """A new run, or — for a resumed job — the run its checkpoint names, continued (same run id)."""
        if not self.enabled:
            return
        self.journal.update(name=run_name, params={k: str(v) for k, v in params.items()}, tags=dict(tags),
                            server=self.uri)

        def _start():
            if resume_run_id and self.client is not None:
                try:
                    self.client.update_run(resume_run_id, status="RUNNING")
                    self.experiment_id = self.client.get_run(resume_run_id).info.experiment_id
                    for k, v in tags.items():
                        self.client.set_tag(resume_run_id, k, v)
                    self.run_id, self.continued = resume_run_id, True
                    self.logged_epochs = {m.step for m in self.client.get_metric_history(self.run_id, "test_top1")}
                    self.steps_held = max((m.step for m in self.client.get_metric_history(
                        self.run_id, "step_train_loss")), default=0)
                    # a run stays in its experiment: say which, not the one this attempt names
                    held = self.client.get_experiment(self.experiment_id).name
                    if held != self.experiment:
                        self.log(f"note: run {resume_run_id} is in experiment '{held}', not '{self.experiment}' "
                                 "as this attempt asks: a continued run stays in its experiment")
                        self.experiment = held
                    return
                except Exception as e:
                    if self.remote and not isinstance(e, self.mlflow.exceptions.RestException):
                        raise  # the server is unreachable, not the run missing: fall back
                    self.log(f"warning: cannot continue MLflow run {resume_run_id} ({type(e).__name__}); "
                             "starting a new run")
            self._create_run(run_name, params, tags)
        self._guard("start", _start, journaled=True)
        if self.run_id and not self.fallback:
            self.log(f"MLflow: run {self.run_id} in experiment '{self.experiment}' at {redact(self.uri)}"
                     + (" (continued)" if resume_run_id == self.run_id else ""))

    @property
    def home_run_id(self):
        """The job's run at the tracking URI it was given, also after a move to the fallback store: the run its
        checkpoints name, so that a resume continues it there once the server is back (None: none was created)."""
        return self.fallen_from if self.fallback else self.run_id

    def log_inputs(self, make_inputs) -> None:
        """The run's dataset inputs (`make_inputs()` → DatasetInputs), logged once: not again for a continued run."""
        if self.run_id and not self.continued:
            self._guard("log_inputs", lambda: self._log_inputs(make_inputs()), journaled=True)
        elif self.run_id:  # kept for a fallback run only
            try:
                self.journal["inputs"] = make_inputs()
            except Exception as e:
                self.log(f"warning: MLflow dataset inputs could not be built ({_reason(e)}); training continues")

    def _log_inputs(self, inputs):
        self.journal["inputs"] = inputs
        self.client.log_inputs(self.run_id, datasets=inputs)

    def log_epoch(self, metrics: dict, epoch: int) -> None:
        """Per-epoch metrics with step=epoch; an epoch the run already holds (re-run after a resume from an
        older checkpoint) is not logged twice."""
        if self.run_id and epoch in self.logged_epochs and self.continued:
            self.journal["held"].setdefault(epoch, dict(metrics))  # the run has it: a fallback run gets it too
        elif self.run_id and epoch not in self.logged_epochs:
            self.journal["metrics"].append((dict(metrics), epoch))
            self.journal["epochs"].add(epoch)
            self._guard("log_metrics", lambda: self._log_batch(metrics, epoch), journaled=True)
            self.logged_epochs.add(epoch)

    def log_steps(self, metrics: dict, step: int) -> None:
        """Per-step metrics, queued to MLflow's asynchronous logger so the training loop never waits on it. A step
        the run holds already (an attempt that crashed after it resumes from an earlier checkpoint) is skipped."""
        if self.run_id and step > self.steps_held:
            self.journal["metrics"].append((dict(metrics), step))
            self._guard("log_metrics", lambda: self._log_batch(metrics, step, synchronous=False), journaled=True)

    def log_model(self, model, input_example, register_as: str = "") -> None:
        if not self.run_id:
            return

        def _log():
            if self.continued and self._model_logged_before(register_as):
                return
            import mlflow.pytorch
            import torch
            self.mlflow.set_tracking_uri(self.uri)
            with warnings.catch_warnings(), self.mlflow.start_run(run_id=self.run_id):
                warnings.simplefilter("ignore")
                # validate_serving_input would load the exported model back to run the example (0.6 s of a 1.8 s
                # export on the CPU); the tests load it through MLflow and check its accuracy instead
                mlflow.pytorch.log_model(model, name="model", input_example=input_example,
                                         registered_model_name=register_as or None, validate_serving_input=False,
                                         pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
            # leaving start_run's block ended the run FINISHED; the job is not done until finish() says so (a rank 0
            # killed after this point must leave a run that a survivor can mark FAILED)
            self.client.update_run(self.run_id, status="RUNNING")
        self._guard("log_model", _log)

    def _model_logged_before(self, register_as: str) -> bool:
        """A continued run may hold its model already: an earlier attempt failed after uploading it (a rerun exports
        again). Then it is not logged, nor registered, a second time."""
        from mlflow.entities import LoggedModelStatus
        found = self.client.search_logged_models(
            [self.experiment_id], filter_string=f"source_run_id = '{self.run_id}' AND name = 'model'")
        ready = [m for m in found if m.status == LoggedModelStatus.READY]
        if not ready:
            return False
        if register_as and not self.client.search_model_versions(f"name = '{register_as}' AND run_id = "
                                                                 f"'{self.run_id}'"):
            self.mlflow.set_tracking_uri(self.uri)
            self.mlflow.register_model(ready[0].model_uri, register_as)
        self.log(f"MLflow: the run already holds its model {ready[0].model_id} (an earlier attempt uploaded it); "
                 "not logged again")
        return True

    def log_artifact(self, path: Path) -> None:
        if self.run_id:
            self._guard("log_artifact", lambda: self.client.log_artifact(self.run_id, str(path)))

    def log_text(self, text: str, name: str) -> None:
        if self.run_id:
            self._guard("log_text", lambda: self.client.log_text(self.run_id, text, name))

    def log_metrics(self, metrics: dict, step: int = 0) -> None:
        """Run-level metrics (e.g. the time budget, step 0), or metrics of an earlier epoch (step: that epoch)."""
        if self.run_id:
            self.journal["metrics"].append((dict(metrics), step))
            self._guard("log_metrics", lambda: self._log_batch(metrics, step), journaled=True)

    def address(self) -> str:
        """Where a person opens the run: its URL on a server; on a local store, the command that serves it."""
        if not self.run_id:
            return "not tracked (--no-mlflow)" if not self.enabled else "not tracked (see the warnings above)"
        page = f"#/experiments/{self.experiment_id}/runs/{self.run_id}"
        if self.remote:
            return f"{redact(self.uri).rstrip('/')}/{page}"
        uri = redact(self.uri)  # a database store's URI may carry a password
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            uri = f"sqlite:///{Path(uri[len('sqlite:///'):]).absolute()}"
        return f"mlflow ui --backend-store-uri {uri}   then http://127.0.0.1:5000/{page}"

    def finish(self, status: str) -> None:
        """End the run with `status`, once; later calls do nothing."""
        if self.run_id and not self.finished:
            self.finished = True
            self._guard("end_run", lambda: self.client.set_terminated(self.run_id, status))
            if self.fallback:
                reason, uri, unusable = self.fallback
                what = "could not be used" if unusable else "failed during the run"
                self.log(f"MLflow: the tracking URI {redact(self.journal.get('server'))} {what} ({reason}); the "
                         f"complete run is {self.run_id} in {uri}")


def mark_failed(run_id: str, uri: str) -> None:
    """From a surviving rank after rank 0 died (e.g. SIGKILL): end the job's run FAILED if it is still RUNNING.
    Best effort, never raises."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import mlflow
        client = mlflow.MlflowClient(uri)
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, "FAILED")
    except Exception:
        pass


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
            redact_mlflow_logs()
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


class StepLogger:
    """Loss and lr every N optimizer steps without stalling the GPU: the loss is copied to the host
    asynchronously and logged at the next logging step (or `flush`), when that copy has long completed."""

    def __init__(self, tracker: Tracker, every: int):
        self.tracker = tracker
        self.every = every
        self.pending = None

    def step(self, global_step: int, loss, scheduler) -> None:
        if not self.every or global_step % self.every or not self.tracker.run_id:
            return
        lr = scheduler.get_last_lr()[0]  # read here: most steps log nothing
        self.flush()
        event = None
        host = loss.detach().to("cpu", non_blocking=True)
        if loss.is_cuda:
            import torch
            event = torch.cuda.Event()
            event.record()
        self.pending = (global_step, host, lr, event)

    def flush(self) -> None:
        if self.pending is None:
            return
        step, host, lr, event = self.pending
        if event is not None:
            event.synchronize()
        self.tracker.log_steps({"step_train_loss": host.item(), "step_lr": lr}, step=step)
        self.pending = None
