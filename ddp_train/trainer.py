"""The Trainer: builds every part of a run from the config, runs the epochs, and ends the run through one exit.

    with Trainer(cfg, d, manifest, budget) as trainer:
        status = trainer.train()

Each part owns its state: the run directory (rundir: name, lock, whose run it is), the checkpoints (checkpoint:
when to save, what every rank contributes, which one to continue from), MLflow (tracking.Tracker: a no-op on other
ranks and with --no-mlflow), system metrics, the stop agreement (stop: signals and non-finite losses), the time
budget. Every way out — success, failure, a stop for requeue, a lost peer, a failure while building — passes
through __exit__, which ends system metrics and the MLflow run with the right status once and releases the run
directory.
"""
import contextlib
import copy
import math
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.nn.utils import get_total_norm

from data_prep import manifest as manifest_lib
from data_prep.manifest import atomic_write_bytes

from . import data, dist, report, run_info, rundir, step, tracking
from .budget import Budget
from .checkpoint import Checkpointer, save_atomic
from .config import Config
from .errors import EXIT_REQUEUE, JobError, remedy
from .models import build_model
from .stop import NonFiniteLoss, StopAgreement


def _quiet(*_, **__):
    pass


class OutOfMemory(JobError):
    """A GPU's (or the CPU's) allocator refused memory on this rank."""
    every_rank = True


def out_of_memory(e: BaseException) -> str:
    """'' unless `e` is an allocator refusing memory (CUDA's OutOfMemoryError and out-of-memory errors, cuBLAS's or
    cuDNN's ALLOC_FAILED, the CPU allocator's RuntimeError, MemoryError); then how much it tried to allocate."""
    if not (isinstance(e, (torch.OutOfMemoryError, MemoryError)) or (isinstance(e, RuntimeError) and any(
            w in str(e) for w in ("can't allocate memory", "CUDA error: out of memory", "ALLOC_FAILED")))):
        return ""
    m = re.search(r"(?:ried|nable) to allocate ([\d.]+) (\w+)", str(e))  # CUDA's, numpy's and the CPU's wording
    size = "an unknown size" if not m else f"{float(m[1]) / 2 ** 20:.1f} MiB" if m[2] == "bytes" else f"{m[1]} {m[2]}"
    return f"tried to allocate {size}"


def format_epoch(epoch: int, m: dict) -> str:
    return (f"epoch {epoch} | loss {m['train_loss']:.3f} | train {m['train_top1']:.2f} % | "
            f"test {m['test_top1']:.2f} % (top-5 {m['test_top5']:.2f} %, superclass {m['test_super_top1']:.2f} %) | "
            f"lr {m['lr']:.4g} | {m['images_per_s']:.0f} img/s | {m['epoch_seconds']:.1f} s")


class Trainer:
    def __init__(self, cfg: Config, d: dist.Dist, manifest: dict, budget: Budget = None):
        self.cfg, self.d, self.manifest = cfg, d, manifest
        self.budget = budget or Budget()
        self.device = d.device
        self.log = print if d.master else _quiet
        self.status = "FAILED"          # how the MLflow run ends unless train() gets further
        self.epoch = 0
        self.history, self.per_superclass = [], None
        self.start_epoch, self.start_step, self.rank_state, self.resume_run_id = 0, 0, None, None
        self.doing = "building"  # what this rank does (training, evaluating, checkpointing, exporting): for error lines
        self._exit = contextlib.ExitStack()

    # -- building ---------------------------------------------------------------------------------------------

    def __enter__(self):
        try:
            self._build()
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def _build(self):
        cfg, d, budget = self.cfg, self.d, self.budget
        # First in, so last out: a signal while the run is closed (torchrun SIGTERMs the survivors as soon as a rank
        # dies) is only noted, and cannot cut short the MLflow status or the checkpoint being written.
        self.stopper = self._exit.enter_context(StopAgreement())
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = not cfg.deterministic
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)
        self.amp_dtype, use_scaler = step.resolve_amp(cfg.amp, self.device)
        self.mem = torch.channels_last if cfg.channels_last else torch.contiguous_format
        manifest_sha = manifest_lib.manifest_checksum(cfg.data_dir)

        with budget.phase("run_dir"):  # rank 0 names, locks and checks the directory; every rank learns the result
            self.run_name, resume_path = dist.on_master(lambda: self._claim(manifest_sha))
            self.run_dir = Path(cfg.out_dir) / self.run_name
            self.ckpt = Checkpointer(self.run_dir, self.run_name, cfg, manifest_sha, d)
            self._exit.callback(self.ckpt.close)

        with budget.phase("model"):
            num_classes = len(self.manifest["fine_label_names"])
            self.model = build_model(cfg.model, num_classes, cfg.width, cfg.norm).to(self.device,
                                                                                     memory_format=self.mem)
            if cfg.sync_bn:
                self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            self.optimizer = step.make_optimizer(cfg, self.model)
            self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)
            self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        with budget.phase("loaders"):
            self.train_loader, self.test_loader, self.loader_kind = data.loaders(cfg, d)
        self.steps = len(self.train_loader)
        self.lr_at = step.lr_lambda(cfg, self.steps)  # × --lr: the rate of optimizer step t (from 0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_at)
        self.fine_to_coarse = torch.tensor(self.manifest["fine_to_coarse"], device=self.device)
        self.num_superclasses = len(self.manifest["coarse_label_names"])
        if resume_path:
            with budget.phase("run_dir"):
                self._restore(resume_path)
        self.net = step.wrap_model(self.model, cfg, self.device, d.distributed)

        with budget.phase("tracking_start"):
            self.tracker = tracking.Tracker(d.master and cfg.mlflow, cfg.tracking_uri, cfg.experiment,
                                            fallback_dir=self.run_dir, log=self.log)
            self._exit.callback(lambda: self.tracker.finish(self.status))
            counts = {f"{s}_images": self.manifest["splits"][s]["count"] for s in ("train", "test")}
            self.tracker.start(self.run_name, {**cfg.public_dict(), **counts}, self._tags(manifest_sha),
                               resume_run_id=self.resume_run_id)
            self.tracker.log_inputs(lambda: run_info.datasets(self.manifest, manifest_sha))
            for epoch, metrics in enumerate(self.history):  # epochs of attempts that were not tracked (--no-mlflow)
                self.tracker.log_epoch(metrics, epoch)     # (a continued run skips those it holds)
            dist.wait_for_master()
        self.run_id, self.tracking_uri = dist.broadcast_object((self.tracker.run_id, self.tracker.uri))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", d.world_size))
        self.sysmetrics = tracking.SystemMetrics(
            self.run_id if cfg.mlflow and cfg.system_metrics and d.local_rank == 0 else None, self.tracking_uri,
            cfg.system_metrics_interval, label_node=local_world < d.world_size, log=print)
        self._exit.callback(self.sysmetrics.stop)
        self.step_logger = tracking.StepLogger(self.tracker, cfg.log_every_steps)
        self.log(f"run {self.run_name}: {d.world_size} × {self.device.type} "
                 f"({'nccl' if self.device.type == 'cuda' else 'gloo'}), {cfg.batch_size // d.world_size} images per "
                 f"rank per step, {self.steps} steps per epoch, amp {self._amp_name()}, {self.loader_kind} loader, "
                 f"data {self.manifest['source']}")

    def _claim(self, manifest_sha: str):
        """Rank 0: the run's name and the checkpoint to continue from (None: a fresh start)."""
        ident = rundir.job_identity()
        name = rundir.choose_name(self.cfg, self.d.world_size, ident, self.log)
        run = rundir.RunDir(self.cfg.out_dir, name)
        self._exit.callback(run.close)
        self.run = run.open(self.cfg, manifest_sha, ident)
        # a torchrun restart or Slurm requeue of the job that created the run continues it, also under --resume never
        own = bool(ident["job"]) and ident["restart"] > 0 and self.run.info.get("job") == ident["job"]
        path, self._found = Checkpointer(run.path, name, self.cfg, manifest_sha, self.d).find(self.log, own)
        return name, path

    def _restore(self, path):
        state = getattr(self, "_found", None) or self.ckpt.load(path)  # rank 0 read it already
        self.ckpt.last, self._found = Path(path), None
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # --amp auto picks by GPU: a job requeued onto another GPU generation may continue in the other precision
        # (bf16 needs no grad scaler, fp16 does). The scaler's state carries over only between two fp16 attempts.
        amp, saved = self._amp_name(), state.get("amp", self._amp_name())
        if amp != saved:
            self.log(f"note: the checkpoint trained with autocast {saved}; this device runs {amp} (--amp "
                     f"{self.cfg.amp}): continuing in {amp}{' with a new grad scaler' * self.scaler.is_enabled()}")
        if state["scaler"] and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.start_epoch, self.start_step, self.history = state["epoch"], state["step"], state["history"]
        self.per_superclass, self.resume_run_id = state.get("per_superclass"), state.get("mlflow_run_id")
        if state["world_size"] == self.d.world_size:  # this rank's RNG and partial-epoch state
            self.rank_state = state["ranks"][self.d.rank]
            torch.set_rng_state(self.rank_state["torch_rng"])
            if self.device.type == "cuda" and self.rank_state["cuda_rng"] is not None:
                torch.cuda.set_rng_state(self.rank_state["cuda_rng"], self.device)
        self.log(f"resuming from {path}: epoch {self.start_epoch}, step {self.start_step} of {self.steps}")

    def _amp_name(self) -> str:
        return str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "off"

    def _tags(self, manifest_sha: str) -> dict:
        return {**run_info.tags(self.d.world_size, self.device, manifest_sha, self.manifest, self.run_dir),
                "amp": self._amp_name(), "loader": self.loader_kind}

    # -- the loop ---------------------------------------------------------------------------------------------

    def train(self) -> int:
        """All remaining epochs, then the final model. → 0, or EXIT_REQUEUE when a signal stopped the run."""
        for epoch in range(self.start_epoch, self.cfg.epochs):
            self.epoch = epoch
            train = self.train_epoch(epoch)
            if train is None:
                self.status = "KILLED"
                return EXIT_REQUEUE
            self.end_epoch(epoch, train, self.evaluate())
        self.finish()
        self.status = "FINISHED"
        return 0

    def train_epoch(self, epoch: int):
        """One epoch (or the rest of an interrupted one) → its training metrics; None when a signal stopped it
        (after a checkpoint at the step where every rank stopped)."""
        cfg, device = self.cfg, self.device
        skip = self.start_step if epoch == self.start_epoch else 0
        self.net.train()
        self.doing = "training"
        gen = data.epoch_generator(cfg.seed, epoch, self.d.rank, device)
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss·n, correct, n
        elapsed = 0.0
        if skip:  # continue the interrupted epoch exactly where it stopped
            gen.set_state(self.rank_state["gen"])
            sums = self.rank_state["sums"].to(device)
            elapsed = self.rank_state["seconds"]
        t0 = time.perf_counter()
        done = skip  # steps of this epoch trained
        self.train_loader.next_epoch = epoch  # the data order is a function of (seed, epoch)
        for i, (images, labels) in enumerate(self._progress(epoch, skip)):
            if i < skip:
                continue
            x = step.prepare_batch(images, cfg, gen, self.mem)
            loss, logits = step.train_step(self.net, x, labels, self.optimizer, self.scaler, self.criterion,
                                           self.amp_dtype, device)
            self.step_logger.step(epoch * self.steps + i + 1, loss, self.scheduler)  # with the lr this step used
            self.scheduler.step()
            n = labels.shape[0]
            # no host→device tensor per step (it would wait for the GPU): n is added as a scalar argument
            sums[:2] += torch.stack([loss.double() * n, (logits.argmax(1) == labels).sum().double()])
            sums[2] += n
            self.stopper.watch(i + 1, loss)
            done = i + 1
            stop, diverged = self.stopper.poll()
            if diverged:
                self._diverged(epoch)
            if stop:
                break
        # Every check still in flight, agreed: a loss that went non-finite in the steps before an agreed stop is
        # never checkpointed, and a stop asked for in the epoch's last step (or its only one) is not left to a poll
        # that never comes.
        stop, diverged = self.stopper.settle()
        if diverged:
            self._diverged(epoch)
        if stop:
            return self._stop(epoch, done, gen, sums, elapsed + time.perf_counter() - t0)
        self.step_logger.flush()
        loss_sum, correct, seen = dist.all_reduce_sum(sums).tolist()
        seconds = elapsed + time.perf_counter() - t0
        return {"train_loss": loss_sum / seen, "train_top1": 100 * correct / seen, "images_per_s": seen / seconds,
                "train_seconds": seconds, "attempt_seconds": time.perf_counter() - t0}

    def _stop(self, epoch: int, step: int, gen, sums, seconds: float) -> None:
        """Every rank agreed to stop after `step`, and that no loss went non-finite: checkpoint there, say so."""
        self.step_logger.flush()  # the last step metric logged before the stop, not lost with it
        with self.budget.phase("checkpoints"):
            target = self.ckpt.save(epoch, step, self.state_dict, self._rank_state(gen, sums, seconds), wait=True)
        self.log(f"stopped by signal {self.stopper.requested or 'on another rank'} at epoch {epoch}, step {step}; "
                 f"checkpoint {target}; rerun with --run-name {self.run_name} (a requeued job does) to resume",
                 flush=True)

    def _progress(self, epoch: int, skip: int):
        bar = self.cfg.progress == "bar" or (self.cfg.progress == "auto" and sys.stderr.isatty())
        if not (bar and self.d.master):
            return self.train_loader
        from tqdm import tqdm
        return tqdm(self.train_loader, total=self.steps, initial=skip, desc=f"epoch {epoch}", leave=False,
                    dynamic_ncols=True)

    def _diverged(self, epoch: int, what: str = ""):
        seen = self.stopper.nonfinite_step
        where = f"at epoch {epoch}, step {seen} on rank {self.d.rank}" if seen else f"in epoch {epoch} on another rank"
        newest = self.ckpt.newest()
        last = f"the last good checkpoint is {newest}" if newest else "no checkpoint was saved yet"
        raise NonFiniteLoss(f"{what or f'the training loss is not finite ({where})'}; nothing of it was saved and "
                            f"{last}; lower --lr ({self.cfg.lr:g}) or check the data")

    def evaluate(self) -> dict:
        """Exact test metrics of rank 0's model (every rank evaluates its share of the test set)."""
        t = time.perf_counter()
        self.doing = "evaluating"
        dist.broadcast_buffers(self.model)  # BatchNorm statistics drift per rank: evaluate the model that is saved
        metrics = step.evaluate(self.net, self.test_loader, self.device, self.amp_dtype, self.fine_to_coarse,
                                self.num_superclasses, self.cfg.channels_last)
        metrics["eval_seconds"] = time.perf_counter() - t
        # A finite training loss can hide overflowed BatchNorm statistics (training normalises with each batch's own),
        # and an infinite running_var even gives a finite test loss: the model that would be saved is checked whole.
        # Once per epoch, after the evaluation's own wait for the GPU: the max-norm of every float tensor, foreach.
        largest = get_total_norm([t for t in self.model.state_dict().values() if t.is_floating_point()], math.inf)
        if not (math.isfinite(largest) and math.isfinite(metrics["test_loss"])):
            self._diverged(self.epoch, f"the model is not finite after epoch {self.epoch} (its weights, BatchNorm "
                                       "statistics or test loss overflowed, though the training loss was finite)")
        return metrics

    def end_epoch(self, epoch: int, train: dict, test: dict) -> None:
        """Record, log and print the epoch; checkpoint when due."""
        train_s, eval_s = train.pop("train_seconds"), test.pop("eval_seconds")
        attempt_s = train.pop("attempt_seconds")  # an epoch resumed mid-way began in an earlier process
        self.per_superclass = test.pop("per_superclass")
        test.pop("test_count")  # the same every epoch: logged once, as the param test_images
        metrics = {"train_loss": train["train_loss"], "train_top1": train["train_top1"], **test,
                   # the rate of the epoch's last step (the optimizer's is the next epoch's first)
                   "lr": self.cfg.lr * self.lr_at((epoch + 1) * self.steps - 1), "images_per_s": train["images_per_s"],
                   "epoch_seconds": train_s + eval_s}
        self.history.append(metrics)
        earlier = self._time_to_accuracy()
        self.doing = "checkpointing"
        self.budget.epoch(attempt_s, eval_s)  # this process's wall-clock: not the earlier attempt's seconds
        self.tracker.log_epoch(metrics, epoch)  # before the line, so a printed epoch is already tracked
        for reached, stamps in earlier.items():
            self.tracker.log_metrics(stamps, step=reached)
        self.log(format_epoch(epoch, metrics), flush=True)
        if self.ckpt.due(epoch + 1):
            with self.budget.phase("checkpoints"):
                self.ckpt.save(epoch + 1, 0, self.state_dict, self._rank_state())

    def _time_to_accuracy(self) -> dict:
        """Stamp each --tta-thresholds value not stamped yet on the first epoch that reached it: seconds of training
        and evaluation until then. → {epoch: stamps} of the epochs before this one (a threshold a resume added,
        reached before it), which the tracker logs at their step."""
        earlier = {}
        for t in self.cfg.thresholds():
            key, spent = f"time_to_top1_{t:g}", 0.0
            if any(key in h for h in self.history):
                continue
            for epoch, h in enumerate(self.history):
                spent += h["epoch_seconds"]
                if h["test_top1"] >= t:
                    h[key] = spent
                    if epoch < len(self.history) - 1:
                        earlier.setdefault(epoch, {})[key] = spent
                    break
        return earlier

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "amp": self._amp_name(),
                "history": self.history, "per_superclass": self.per_superclass,
                # the run at the job's tracking URI (not a fallback store's); an attempt with --no-mlflow passes on the
                # run it resumed: the next tracked attempt continues it, and logs the epochs it lacks
                "mlflow_run_id": self.tracker.home_run_id or self.resume_run_id}

    def _rank_state(self, gen=None, sums=None, seconds=0.0) -> dict:
        return {"torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
                "gen": gen.get_state() if gen is not None else None,
                "sums": sums.cpu() if sums is not None else None, "seconds": seconds}

    # -- the end ----------------------------------------------------------------------------------------------

    def finish(self) -> None:
        """Rank 0 saves the final model, pictures and tables and uploads them, the model last; the others wait."""
        self.sysmetrics.stop()
        self.doing = "exporting"
        with self.budget.phase("checkpoints"):
            self.ckpt.wait()  # the final checkpoint is on disk before the run is declared done
        with self.budget.phase("export"):
            dist.on_master(self._export)
        if self.d.master:
            budget = self.budget.summary()
            with self._writing(f"the time budget {self.run_dir / 'time_budget.csv'}"):
                atomic_write_bytes(self.run_dir / "time_budget.csv", self.budget.csv(budget).encode())
            self.tracker.log_metrics(self.budget.metrics(budget))
            self.tracker.log_artifact(self.run_dir / "time_budget.csv")
            self.log(self.budget.table(budget))
            with self._writing(f"the run's record {self.run_dir / 'run.json'}"):
                self.run.finished(self.history[-1] if self.history else {}, self.tracker.run_id)
            if self.tracker.errors:
                self.log(f"warning: {self.tracker.errors} MLflow call(s) failed; see the warnings above")
            self.log(self.summary(), flush=True)
        dist.wait_for_master()

    @contextlib.contextmanager
    def _writing(self, what: str):
        """A file of the export that cannot be written (disk full, read-only) fails the run in one line; the writes
        are atomic, so nothing half-written stays, and a rerun exports again from the final checkpoint."""
        try:
            yield
        except OSError as e:
            raise JobError(f"cannot write {what} ({e.strerror or e}); the final checkpoint {self.ckpt.last} is "
                           f"intact: {remedy(e)} and rerun with --run-name {self.run_name} to export again") from None

    def summary(self) -> str:
        """The last lines of a run: the result, and where everything is, to copy from."""
        m = self.history[-1] if self.history else {}
        d = self.run_dir
        result = (f"test top-1 {m['test_top1']:.2f} % (top-5 {m['test_top5']:.2f} %) after {len(self.history)} "
                  "epochs" if m else "no epochs")
        pictures = [p for p in ("learning_curves.png", "per_superclass.png", "per_superclass.csv") if (d / p).exists()]
        return "\n".join([f"run {self.run_name} finished: {result}",
                          f"  MLflow       {self.tracker.address()}",
                          f"  model        {d / 'model.pt'}",
                          f"  checkpoints  {self.ckpt.dir}/",
                          f"  pictures     {d}/ {', '.join(pictures)}",
                          f"  time budget  {d / 'time_budget.csv'}"])

    def _export(self) -> None:
        final = copy.deepcopy(self.model).cpu().float().to(memory_format=torch.contiguous_format).eval()
        path = self.run_dir / "model.pt"
        metrics = self.history[-1] if self.history else {}
        with self._writing(f"the final model {path}"):
            save_atomic({"model": final.state_dict(), "config": self.cfg.public_dict(), "metrics": metrics,
                         "fine_label_names": self.manifest["fine_label_names"]}, path)
        self.log(f"saved {path}")
        with self._writing(f"the run's pictures and tables in {self.run_dir}"):
            pictures = [report.learning_curves(self.history, self.run_dir / "learning_curves.png")] \
                if self.history else []
            if self.per_superclass:
                table, chart = self.run_dir / "per_superclass.csv", self.run_dir / "per_superclass.png"
                report.per_superclass(self.per_superclass, self.manifest["coarse_label_names"], table, chart)
                pictures += [table, chart]
        for picture in pictures:
            self.tracker.log_artifact(picture)
        reached = {k: v for h in self.history for k, v in h.items() if k.startswith("time_to_top1_")}
        self.log("time to accuracy: " + (", ".join(f"{k[13:]} % in {v:.1f} s" for k, v in reached.items())
                                          or "no threshold reached"))
        example = data.normalize(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).numpy()
        self.tracker.log_model(final, example, register_as=self.cfg.register_model)  # last: it ends the run

    def _newest(self):
        """The newest complete checkpoint, for a line on the way out (None: none, or the run never got that far)."""
        return self.ckpt.newest() if hasattr(self, "ckpt") else None

    def _out_of_memory(self, allocation: str) -> str:
        cfg, name = self.cfg, getattr(self, "run_name", "")
        newest = self._newest()
        resume = f"rerun with --run-name {name} to resume from {newest}" if newest else "rerun"
        epoch = f" in epoch {self.epoch}" if self.doing in ("training", "evaluating") else ""
        where = f"out of memory on rank {self.d.rank} ({self.device}) while {self.doing}{epoch} ({allocation})"
        if self.doing == "evaluating":  # the evaluation batch is not part of the recipe: the run goes on
            return f"{where}; lower --eval-batch-size ({cfg.eval_batch_size}) and {resume}"
        if self.doing == "training":
            return (f"{where}: {cfg.batch_size // self.d.world_size} images per rank per step of --width {cfg.width} "
                    "do not fit; start a new run with a smaller --batch-size or --width (both are part of the "
                    f"recipe), or free what else holds that memory and {resume}")
        return f"{where}; free what else holds that memory and {resume}"  # building, checkpointing, exporting

    def __exit__(self, exc_type, exc, tb):
        lost = exc is not None and dist.is_comm_failure(exc)
        if exc is not None:
            self.status = "KILLED" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "FAILED"
        if lost and not self.d.master and getattr(self, "run_id", None):
            # rank 0 may be the one that died (SIGKILL, OOM, its node lost with others): then only a survivor can
            # end its MLflow run, and any may be the one left. Done while our handlers still hold SIGTERM, which
            # torchrun sends the survivors at once.
            tracking.mark_failed(self.run_id, self.tracking_uri)
        self._exit.close()
        if not lost and (allocation := out_of_memory(exc)):
            raise OutOfMemory(self._out_of_memory(allocation)) from exc
        if lost:
            newest = self._newest()
            rerun = f"rerun with --run-name {getattr(self, 'run_name', '')} (a requeued job does)"
            if newest:
                then = f"{rerun} to resume from {newest}"
            elif self.d.master or not hasattr(self, "ckpt"):
                then = "no checkpoint was saved yet: rerun to start again"
            else:  # rank 0 may still complete the one it was writing
                then = f"no checkpoint was complete when this rank looked; {rerun} resumes from one if rank 0 " \
                       "completed it, else starts again"
            raise dist.PeerLost(f"rank {self.d.rank} lost its peers in epoch {self.epoch} ({dist.cause(exc)}); a node, "
                                f"its link or another rank failed (--dist-timeout {self.cfg.dist_timeout} s); "
                                f"{then}") from exc
        return False
