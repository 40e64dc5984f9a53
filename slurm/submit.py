"""Submit the trainer to Slurm with submitit: python -m slurm.submit [options] -- [trainer flags]

Model: one Slurm task per GPU (per worker on CPU nodes), each running the trainer in-process with RANK,
WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT exported from submitit's view of the allocation. No torchrun inside:
submitit then owns the processes, so its signal handling and requeue reach every worker directly (mixing
submitit and torchrun in one job is what submitit's maintainers advise against).

Time limit or preemption: Slurm sends USR2 (submitit's default) to every task; the trainer's handler sets a flag,
the ranks agree at the next step, rank 0 checkpoints, the trainer returns, and the task hands the signal back to
submitit, which requeues the job (global rank 0 only). The requeued job keeps its id, so the trainer resumes from
the checkpoint into the same MLflow run.
"""
import argparse
import contextlib
import os
import re
import signal
import sys
import tempfile
from pathlib import Path

from ddp_train.errors import ConfigError, JobError, report


@contextlib.contextmanager
def _stderr_to_devnull():
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class TrainJob:
    """The submitted callable (submitit's Checkpointable protocol: `checkpoint` resubmits the same job)."""

    def __init__(self, trainer_args: list):
        self.trainer_args = list(trainer_args)

    def __call__(self) -> int:
        import submitit
        # overwrite: the submitting shell's MASTER_PORT, RANK, … (sbatch exports them) are not this job's; it sets
        # LOCAL_WORLD_SIZE too
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        from ddp_train.train import EXIT_REQUEUE, main
        code = main(self.trainer_args)
        if code == EXIT_REQUEUE:
            # The trainer checkpointed on USR2/TERM and restored submitit's handler: let submitit requeue.
            signal.raise_signal(signal.SIGUSR2)
            return code  # ranks other than 0 get here; rank 0's requeue ends the job
        if code != 0:
            raise RuntimeError(f"trainer exited with status {code}; see the log")
        return code

    def checkpoint(self):
        import submitit
        return submitit.helpers.DelayedSubmission(TrainJob(self.trainer_args))


def parse_args(argv=None):
    from ddp_train.config import DefaultsHelp, OneLineParser
    p = OneLineParser(prog="python -m slurm.submit", description=__doc__, formatter_class=DefaultsHelp)
    p.add_argument("--partition", default=None, help="Slurm partition (default: the cluster's default)")
    p.add_argument("--nodes", type=int, default=1, help="nodes")
    p.add_argument("--gpus-per-node", type=int, default=None,
                   help="GPUs per node; 0 for CPU nodes (gloo) (default: 8; with --local, this machine's GPUs)")
    p.add_argument("--tasks-per-node", type=int, default=None,
                   help="workers per node (default: one per GPU; required with --gpus-per-node 0)")
    p.add_argument("--cpus-per-task", type=int, default=8, help="CPU cores per task (FFCV's loader threads use them)")
    p.add_argument("--mem", default=None, help="memory per node, e.g. 64G (default: the partition's)")
    p.add_argument("--time", type=int, default=240, help="time limit in minutes")
    p.add_argument("--account", default=None, help="Slurm account (default: yours)")
    p.add_argument("--qos", default=None, help="Slurm QOS (default: the account's)")
    p.add_argument("--job-name", default="cifar100-ddp", help="Slurm job name")
    p.add_argument("--log-dir", type=Path, default=Path("slurm-logs"),
                   help="submitit's folder: logs (%%j_%%t_log.out/err) and job pickles")
    p.add_argument("--signal-delay", type=int, default=180, help="seconds before the time limit that USR2 comes")
    p.add_argument("--local", action="store_true", help="run here without Slurm (submitit's local executor)")
    p.add_argument("--wait", action="store_true", help="follow the job to its end and exit with the trainer's "
                                                        "status (1 when a task died without one)")
    p.add_argument("trainer_args", nargs=argparse.REMAINDER, help="after --: flags for python -m ddp_train")
    args, unknown = p.parse_known_args(argv)
    if unknown:  # argparse would say "unrecognized arguments"; the usual cause is a missing --
        p.error(f"unknown launcher flag{'s' if len(unknown) > 1 else ''} {' '.join(unknown)}; trainer flags go "
                f"after --, e.g. python -m slurm.submit --nodes 2 -- --epochs 60")
    args.trainer_args = [a for a in args.trainer_args if a != "--"] if args.trainer_args[:1] == ["--"] \
        else args.trainer_args
    # Each bad value is one line before anything is written or submitted (never a traceback from the queue).
    def need(ok, message):
        if not ok:
            p.error(message)
    need(args.nodes >= 1, f"--nodes must be at least 1, got {args.nodes}")
    need(not args.local or args.nodes == 1, "--local runs on one node; drop --nodes")
    guessed = args.gpus_per_node is None and args.local  # --local without a GPU must not start 8 CPU workers
    if args.gpus_per_node is None:
        from ddp_train.launch import gpus
        args.gpus_per_node = len(gpus()) if args.local else 8
    need(args.gpus_per_node >= 0, f"--gpus-per-node must be 0 (CPU nodes) or more, got {args.gpus_per_node}")
    if args.tasks_per_node is None:
        need(args.gpus_per_node >= 1, "--local found no GPU here: pass --tasks-per-node (CPU workers)" if guessed
             else "--gpus-per-node 0 needs --tasks-per-node (CPU workers per node)")
        args.tasks_per_node = args.gpus_per_node
    need(args.tasks_per_node >= 1, f"--tasks-per-node must be at least 1, got {args.tasks_per_node}")
    need(args.cpus_per_task >= 1, f"--cpus-per-task must be at least 1, got {args.cpus_per_task}")
    need(args.time >= 1, f"--time must be at least 1 minute, got {args.time}")
    need(0 <= args.signal_delay < args.time * 60, f"--signal-delay must be at least 0 and less than --time "
         f"({args.time * 60} s), got {args.signal_delay}")
    need(args.mem is None or re.fullmatch(r"\d+[KMGT]?", args.mem, re.IGNORECASE),
         f"--mem must be a size such as 64G or 64000 (megabytes), got '{args.mem}'")
    return args


def make_log_dir(path: Path) -> None:
    """Create submitit's folder now, so that one that cannot be written fails here in one line."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ConfigError(f"--log-dir {path} cannot be written ({e.strerror}); choose another directory") from None


def main(argv=None) -> int:
    args = parse_args(argv)
    # Bad trainer flags, data and output directory fail here with the trainer's own checks, not in the queue.
    from ddp_train.config import parse, preflight
    cores = None if args.local else args.cpus_per_task  # a Slurm task may use its --cpus-per-task
    cfg = parse(args.trainer_args, cores)
    try:  # the quick data check, size and mtime (the trainer checks again at start)
        preflight(cfg, args.nodes * args.tasks_per_node, gpus=args.gpus_per_node > 0, full=False, cores=cores)
        make_log_dir(args.log_dir)
    except JobError as e:
        return report(e)

    import submitit
    executor = submitit.AutoExecutor(folder=args.log_dir / "%j", cluster="local" if args.local else None)
    params = {"name": args.job_name, "nodes": args.nodes, "tasks_per_node": args.tasks_per_node,
              "cpus_per_task": args.cpus_per_task, "timeout_min": args.time}
    if executor.cluster == "slurm":
        params["slurm_signal_delay_s"] = args.signal_delay
        if args.gpus_per_node:
            params["gpus_per_node"] = args.gpus_per_node
        for key in ("partition", "account", "qos", "mem"):
            if getattr(args, key):
                params[f"slurm_{key}"] = getattr(args, key)
    executor.update_parameters(**params)
    try:
        from slurm.submit import TrainJob as Job  # pickled by reference, not as __main__.TrainJob
        with _stderr_to_devnull():  # sbatch's own complaint is repeated in our one line below
            job = executor.submit(Job(args.trainer_args))
    except Exception as e:  # sbatch's refusal (unknown partition, too many GPUs…) in one line
        reason = " ".join(str(e).split())
        print(f"error: the job was not submitted: {reason[-400:]}", file=sys.stderr)
        return 1
    print(f"submitted job {job.job_id} ({executor.cluster}): {args.nodes} node(s) × {args.tasks_per_node} "
          f"task(s); logs {job.paths.stdout} and {job.paths.stderr}", flush=True)
    if not args.wait:
        return 0
    try:
        job.results()
    except Exception as e:
        # The trainer's own one-line reason, from any task's log; submitit's exception ends in a traceback.
        logs = sorted(job.paths.folder.glob(f"{job.job_id}_*_log.*"))
        reasons = [line[7:] for log in logs for line in log.read_text(errors="replace").splitlines()
                   if line.startswith("error: ")]
        reason = reasons[0] if reasons else " ".join(str(e).split())[-400:]
        print(f"error: job {job.job_id} failed: {reason}; logs in {job.paths.folder}", file=sys.stderr)
        status = re.search(r"trainer exited with status (\d+)", str(e))  # TrainJob's, carried by submitit
        return int(status[1]) if status else 1
    print(f"job {job.job_id} finished")
    return 0


if __name__ == "__main__":
    sys.exit(main())
