"""The training loop: DDP over FFCV loaders, AMP, channels_last, exact global metrics, MLflow on rank 0.

    torchrun --standalone --nproc_per_node=N -m ddp_train [flags]     (or python -m ddp_train for one process)

On one NVIDIA H200 the default recipe (ResNet-18, bf16, channels_last, batch 512) trains at ~57,000 images/s, an
epoch of 50,000 images with its evaluation in ~0.9 s: 40 epochs in ~40 s, estimated from those epoch times
(docs/performance.md); its accuracy on CIFAR-100 is not measured yet. On 2 CPU cores, `make train`'s demo takes
~30 s for 4 epochs.
"""
import contextlib
import copy
import datetime
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from torch.nn.parallel import DistributedDataParallel as DDP

from data_prep import manifest as manifest_lib
from data_prep.cifar import DataError

from . import checkpoint
from . import config as config_lib
from . import data, dist, report, tracking
from .config import Config, ConfigError
from .models import build_model
from .tracking import Tracker, environment_tags

# Exit status of a job that stopped on SIGUSR2/SIGTERM after checkpointing: not done, resume it.
EXIT_REQUEUE = 3


def auto_amp(capability: tuple) -> str:
    """bf16 where the GPU computes it natively (compute capability 8.0, Ampere, and newer), else fp16.
    (torch.cuda.is_bf16_supported() also says yes where bf16 is only emulated, and slow: V100, T4.)"""
    return "bf16" if tuple(capability) >= (8, 0) else "fp16"


def resolve_amp(amp: str, device: torch.device):
    """→ (autocast dtype or None, whether fp16 needs a GradScaler)."""
    if amp == "auto":
        if device.type != "cuda":
            return None, False
        amp = auto_amp(torch.cuda.get_device_capability(device))
    if amp == "off":
        return None, False
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return dtype, dtype == torch.float16


def autocast(device: torch.device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def lr_lambda(cfg: Config, steps_per_epoch: int):
    """Multiplier of the peak lr at optimizer step t: linear warm-up, then linear decay to 0 (or constant)."""
    total = cfg.epochs * steps_per_epoch
    warm = min(int(cfg.warmup_epochs * steps_per_epoch), total - 1)
    if cfg.schedule == "constant":
        return lambda t: 1.0
    return lambda t: (t + 1) / (warm + 1) if t < warm else max(0.0, (total - t) / (total - warm))


def make_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay)


def wrap_model(model: nn.Module, cfg: Config, device: torch.device, distributed: bool) -> nn.Module:
    """DDP across the ranks (when there are several), then torch.compile if asked."""
    net = DDP(model, device_ids=[device] if device.type == "cuda" else None) if distributed else model
    return torch.compile(net) if cfg.compile else net


def prepare_batch(images: torch.Tensor, cfg: Config, gen: torch.Generator, mem) -> torch.Tensor:
    """A uint8 training batch → the model's input: normalised, augmented (if on), in memory format `mem`."""
    x = data.normalize(images)
    if cfg.augment:
        x = data.augment(x, gen, cfg.translate, cfg.cutout)
    return x.contiguous(memory_format=mem)


def train_step(model, images, labels, optimizer, scaler, criterion, amp_dtype, device):
    """One optimizer step on this rank's batch (DDP averages the gradients). Returns (loss, logits) detached."""
    with autocast(device, amp_dtype):
        logits = model(images)
        loss = criterion(logits.float(), labels)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach(), logits.detach()


@torch.no_grad()
def evaluate(model, loader, device, amp_dtype, fine_to_coarse: torch.Tensor, channels_last: bool) -> dict:
    """Test metrics over the whole test set: each rank sums over its disjoint share, then the sums are
    all-reduced, so any world size counts every image exactly once. Also returns, under "per_superclass", the
    image count and the fine and superclass top-1 hits for each true superclass."""
    model.eval()
    n_super = int(fine_to_coarse.max()) + 1
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss, top-5 hits
    by_super = torch.zeros(3, n_super, dtype=torch.float64, device=device)  # images, top-1 hits, superclass hits
    for images, fine, coarse in loader:
        x = data.normalize(images)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp_dtype):
            logits = model(x)
        logits = logits.float()
        top5 = logits.topk(5, dim=1).indices
        onehot = F.one_hot(coarse, n_super).double()  # a matmul, not bincount: deterministic on GPUs too
        by_super += torch.stack([onehot.sum(0), (top5[:, 0] == fine).double() @ onehot,
                                 (fine_to_coarse[top5[:, 0]] == coarse).double() @ onehot])
        sums += torch.stack([F.cross_entropy(logits, fine, reduction="sum").double(),
                             (top5 == fine[:, None]).any(dim=1).sum().double()])
    reduced = dist.all_reduce_sum(torch.cat([sums, by_super.flatten()]))
    (loss, top5), by_super = reduced[:2].tolist(), reduced[2:].view(3, n_super)
    images, top1, sup = by_super.sum(1).tolist()
    return {"test_loss": loss / images, "test_top1": 100 * top1 / images, "test_top5": 100 * top5 / images,
            "test_super_top1": 100 * sup / images, "test_count": int(images),
            "per_superclass": {k: [int(v) for v in row] for k, row in
                               zip(("images", "top1_hits", "super_top1_hits"), by_super.tolist())}}


def default_run_name(cfg: Config, world_size: int) -> str:
    """Scannable in a list; under Slurm it ends in the job id, which a requeued job keeps, so it resumes."""
    width = f"-w{cfg.width}" if cfg.model == "resnet18" else ""
    job = os.environ.get("SLURM_JOB_ID")
    stamp = f"slurm{job}" if job else datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{cfg.model}{width}-b{cfg.batch_size}-lr{cfg.lr:g}-ws{world_size}-{stamp}"


def format_epoch(epoch: int, m: dict) -> str:
    return (f"epoch {epoch} | loss {m['train_loss']:.3f} | train {m['train_top1']:.2f} % | "
            f"test {m['test_top1']:.2f} % (top-5 {m['test_top5']:.2f} %, superclass {m['test_super_top1']:.2f} %) | "
            f"lr {m['lr']:.4g} | {m['images_per_s']:.0f} img/s | {m['epoch_seconds']:.1f} s")


def run(cfg: Config, d: dist.Dist, manifest: dict) -> dict:
    log = print if d.master else (lambda *a, **k: None)
    device = d.device
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not cfg.deterministic
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    amp_dtype, use_scaler = resolve_amp(cfg.amp, device)
    mem = torch.channels_last if cfg.channels_last else torch.contiguous_format

    model = build_model(cfg.model, len(manifest["fine_label_names"]), cfg.width, cfg.norm).to(device, memory_format=mem)
    if cfg.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = make_optimizer(cfg, model)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    per_rank_batch = cfg.batch_size // d.world_size
    train_loader = data.train_loader(cfg.data_dir, per_rank_batch, cfg.num_workers, cfg.seed, device, d.distributed)
    test_loader = data.test_loader(cfg.data_dir, cfg.eval_batch_size, cfg.num_workers, d.rank, d.world_size, device)
    steps = len(train_loader)
    if steps == 0:
        raise ConfigError(f"--batch-size {cfg.batch_size} exceeds the training set "
                          f"({manifest['splits']['train']['count']} images); use a smaller batch")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, steps))
    fine_to_coarse = torch.tensor(manifest["fine_to_coarse"], device=device)

    # The run: one name on every rank; the same name (e.g. the Slurm job id after a requeue) continues it.
    run_name = dist.broadcast_object(cfg.run_name or default_run_name(cfg, d.world_size))
    run_dir = Path(cfg.out_dir) / run_name
    ckpt_dir = run_dir / "checkpoints"
    manifest_sha = manifest_lib.manifest_checksum(cfg.data_dir)
    path, state = None, None
    if cfg.resume == "auto" and d.master:
        path, state = checkpoint.load_latest(ckpt_dir, cfg.to_dict(), manifest_sha, d.world_size, log)
    path = dist.broadcast_object(str(path) if path else None)
    if path and not d.master:
        state = torch.load(path, map_location="cpu", weights_only=False)
    start_epoch, start_step, history, mine = 0, 0, [], None
    if state:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, start_step, history = state["epoch"], state["step"], state["history"]
        if state["world_size"] == d.world_size:  # this rank's RNG and partial-epoch state
            mine = state["ranks"][d.rank]
            torch.set_rng_state(mine["torch_rng"])
            if device.type == "cuda" and mine["cuda_rng"] is not None:
                torch.cuda.set_rng_state(mine["cuda_rng"], device)
        log(f"resuming from {path}: epoch {start_epoch}, step {start_step} of {steps}")

    net = wrap_model(model, cfg, device, d.distributed)

    tracker = Tracker(d.master and cfg.mlflow, cfg.tracking_uri, cfg.experiment, fallback_dir=run_dir, log=log)
    tracker.start(run_name, cfg.to_dict(), {**environment_tags(d.world_size, device, manifest_sha, manifest),
                                            "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "off"},
                  resume_run_id=state.get("mlflow_run_id") if state else None)
    dist.wait_for_master()
    run_id, uri = dist.broadcast_object((tracker.run_id, tracker.uri))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", d.world_size))
    sysmetrics = tracking.SystemMetrics(run_id if cfg.mlflow and cfg.system_metrics and d.local_rank == 0 else None,
                                        uri, cfg.system_metrics_interval,
                                        label_node=local_world < d.world_size, log=print)
    log(f"run {run_name}: {d.world_size} × {device.type} ({'nccl' if device.type == 'cuda' else 'gloo'}), "
        f"{per_rank_batch} images per rank per step, {steps} steps per epoch, amp "
        f"{str(amp_dtype).replace('torch.', '') if amp_dtype else 'off'}, data {manifest['source']}")
    step_logger = tracking.StepLogger(tracker, cfg.log_every_steps)
    bar = cfg.progress == "bar" or (cfg.progress == "auto" and sys.stderr.isatty())

    def save_checkpoint(epoch, step, gen=None, sums=None, seconds=0.0):
        ranks = dist.gather_objects({
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "gen": gen.get_state() if gen is not None else None,
            "sums": sums.cpu() if sums is not None else None, "seconds": seconds})
        if d.master:
            target = checkpoint.path_for(ckpt_dir, epoch, step)
            checkpoint.save({"epoch": epoch, "step": step, "model": model.state_dict(),
                             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                             "scaler": scaler.state_dict(), "config": cfg.to_dict(), "manifest_sha256": manifest_sha,
                             "mlflow_run_id": tracker.run_id, "world_size": d.world_size, "ranks": ranks,
                             "history": history, "per_superclass": per_superclass}, target, cfg.keep_ckpts)
            return target
        return None

    # SIGUSR2 (Slurm's warning before the time limit) and SIGTERM (preemption; torchrun passing on a stop) only
    # set a flag; the ranks agree at a step boundary, checkpoint and exit with EXIT_REQUEUE.
    stopper = dist.StopAgreement()
    for sig in (signal.SIGUSR2, signal.SIGTERM):
        signal.signal(sig, stopper.handler)

    metrics = history[-1] if history else {}
    per_superclass = state.get("per_superclass") if state else None
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, cfg.epochs):
            skip = start_step if epoch == start_epoch else 0
            net.train()
            gen = data.epoch_generator(cfg.seed, epoch, d.rank, device)
            sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss·n, correct, n
            elapsed = 0.0
            if skip:  # continue the interrupted epoch exactly where it stopped
                gen.set_state(mine["gen"])
                sums = mine["sums"].to(device)
                elapsed = mine["seconds"]
            t0 = time.perf_counter()
            train_loader.next_epoch = epoch  # the data order is a function of (seed, epoch)
            batches = train_loader
            if bar and d.master:
                from tqdm import tqdm
                batches = tqdm(train_loader, total=steps, initial=skip, desc=f"epoch {epoch}", leave=False,
                               dynamic_ncols=True)
            stopped_at = None
            for i, (images, labels) in enumerate(batches):
                if i < skip:
                    continue
                x = prepare_batch(images, cfg, gen, mem)
                loss, logits = train_step(net, x, labels, optimizer, scaler, criterion, amp_dtype, device)
                scheduler.step()
                n = labels.shape[0]
                # no host→device tensor per step (it would wait for the GPU): n is added as a scalar argument
                sums[:2] += torch.stack([loss.double() * n, (logits.argmax(1) == labels).sum().double()])
                sums[2] += n
                step_logger.step(epoch * steps + i + 1, loss, scheduler)
                if stopper.poll():
                    stopped_at = i + 1
                    break
            if stopped_at is not None:
                stopper.drain()
                target = save_checkpoint(epoch, stopped_at, gen, sums, elapsed + time.perf_counter() - t0)
                log(f"stopped by signal {stopper.requested or 'on another rank'} at epoch {epoch}, step {stopped_at}"
                    f"; checkpoint {target}; rerun with --run-name {run_name} (a requeued job does) to resume",
                    flush=True)
                sysmetrics.stop()
                tracker.finish("KILLED")
                return {"preempted": True}
            step_logger.flush()
            loss_sum, correct, seen = dist.all_reduce_sum(sums).tolist()
            train_seconds = elapsed + time.perf_counter() - t0
            dist.broadcast_buffers(model)  # every rank evaluates rank 0's model: the one that is saved
            test = evaluate(net, test_loader, device, amp_dtype, fine_to_coarse, cfg.channels_last)
            per_superclass = test.pop("per_superclass")
            metrics = {"train_loss": loss_sum / seen, "train_top1": 100 * correct / seen, **test,
                       "lr": optimizer.param_groups[0]["lr"], "images_per_s": seen / train_seconds,
                       "epoch_seconds": elapsed + time.perf_counter() - t0}
            trained_seconds = sum(h["epoch_seconds"] for h in history) + metrics["epoch_seconds"]
            for t in cfg.thresholds():  # time to accuracy, logged once, at the epoch that first reaches it
                key = f"time_to_top1_{t:g}"
                if metrics["test_top1"] >= t and not any(key in h for h in history):
                    metrics[key] = trained_seconds
            history.append(metrics)
            tracker.log_epoch(metrics, epoch)  # before the line, so a printed epoch is already tracked
            log(format_epoch(epoch, metrics), flush=True)
            if (epoch + 1) % cfg.ckpt_every == 0 or epoch + 1 == cfg.epochs:
                save_checkpoint(epoch + 1, 0)
        stopper.drain()  # no collective may be in flight when the process group is destroyed
    except BaseException as e:  # the run must not stay RUNNING in MLflow
        sysmetrics.stop()
        tracker.finish("KILLED" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "FAILED")
        if dist.is_comm_failure(e):
            first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
            raise dist.PeerLost(
                f"rank {d.rank} lost its peers in epoch {epoch} ({first[-200:]}); a node, its link or another rank "
                f"failed (--dist-timeout {cfg.dist_timeout} s); rerun with --run-name {run_name} (a requeued job "
                "does) to resume from the last checkpoint") from e
        raise

    sysmetrics.stop()
    if d.master:
        run_dir.mkdir(parents=True, exist_ok=True)
        final = copy.deepcopy(model).cpu().float().to(memory_format=torch.contiguous_format).eval()
        with manifest_lib.atomic_file(run_dir / "model.pt") as f:
            torch.save({"model": final.state_dict(), "config": cfg.to_dict(), "metrics": metrics,
                        "fine_label_names": manifest["fine_label_names"]}, f)
        log(f"saved {run_dir / 'model.pt'}")
        example = data.normalize(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).numpy()
        tracker.log_model(final, example, register_as=cfg.register_model)
        pictures = [report.learning_curves(history, run_dir / "learning_curves.png")]
        if per_superclass:
            report.per_superclass(per_superclass, manifest["coarse_label_names"], run_dir / "per_superclass.csv",
                                  run_dir / "per_superclass.png")
            pictures += [run_dir / "per_superclass.csv", run_dir / "per_superclass.png"]
        for path in pictures:
            tracker.log_artifact(path)
        reached = {k: v for h in history for k, v in h.items() if k.startswith("time_to_top1_")}
        log("time to accuracy: " + (", ".join(f"{k[13:]} % in {v:.1f} s" for k, v in reached.items())
                                     or "no threshold reached"))
        tracker.finish("FINISHED")
        if tracker.errors:
            log(f"warning: {tracker.errors} MLflow call(s) failed; see the warnings above")
    dist.wait_for_master()
    return metrics


def main(argv=None) -> int:
    cfg, check = config_lib.parse_args(argv)
    d = dist.from_env()
    try:
        cfg.validate(d.world_size)
        if cfg.sync_bn and d.device.type != "cuda":
            raise ConfigError("--sync-bn needs GPUs (gloo has no SyncBatchNorm); on CPU use --norm gn or drop it")
        manifest = manifest_lib.verify(cfg.data_dir)
    except (ConfigError, DataError) as e:
        if d.local_rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    if check:
        print(f"config and data ok for world size {d.world_size} ({cfg.data_dir}: {manifest['source']})")
        return 0
    if d.master:
        print("config:\n  " + yaml.safe_dump(cfg.to_dict(), sort_keys=False).strip().replace("\n", "\n  "))
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    try:
        dist.init(d, cfg.dist_timeout)
    except dist.DistError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR2, signal.SIGTERM)}  # e.g. submitit's
    try:
        if run(cfg, d, manifest).get("preempted"):
            return EXIT_REQUEUE
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except dist.PeerLost as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        dist.cleanup()
    return 0
