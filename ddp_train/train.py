"""Train on CIFAR-100: DDP over FFCV betons, AMP, channels_last, exact global metrics, MLflow on rank 0.

    torchrun --standalone --nproc_per_node=N -m ddp_train [flags]     (or python -m ddp_train for one process)

On one NVIDIA H100 the default recipe (ResNet-18, bf16, channels_last, batch 512, 40 epochs) took 71 s from
`make train` to exit, 45 s of it steady training at ~47,000 images/s, with MLflow on (docs/performance.md,
measured 2026-11-26 on a full-size synthetic set); its accuracy on CIFAR-100 is not measured yet. On 2 CPU cores,
`make train`'s demo spends 43 s in the trainer for 4 epochs, MLflow included (measured from a fresh clone).

This file is the entry point: the checks that run before anything starts (also `--check`), the process group,
and one Trainer (trainer.py) whose exit ends the run with the right status.
"""
import os
import signal
import sys

import yaml

from . import config as config_lib
from . import dist
from .budget import Budget
from .errors import EXIT_REQUEUE, JobError, report, started  # noqa: F401  (EXIT_REQUEUE: slurm/submit.py reads it here)
from .rundir import RunFinished
from .stop import StopAgreement
from .trainer import Trainer


def main(argv=None) -> int:
    budget = Budget()
    d = dist.from_env()
    try:
        cfg, check = config_lib.parse_args(argv)
        # Every rank fails a bad config or data set alike and local rank 0 says why; the others exit at once, and
        # torchrun SIGTERMs the rest as soon as one exits: until the checks have passed or been reported, SIGTERM
        # is only noted, then acted on.
        with StopAgreement() as early:
            try:
                with budget.phase("checks"):
                    manifest = config_lib.preflight(cfg, d.world_size, d.device.type == "cuda")
            except JobError as e:
                return ending(e, d)
        if early.requested:
            signal.raise_signal(early.requested)
        if check:
            print(f"config and data ok for world size {d.world_size} ({cfg.data_dir}: {manifest['source']})")
            return 0
        if d.master:
            print("config:\n  " + yaml.safe_dump(cfg.public_dict(), sort_keys=False).strip().replace("\n", "\n  "),
                  flush=True)  # before a wait for the peers that may be long
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # Until here a signal ended the process with one line (python -m ddp_train). The wait for the peers is in C++
        # and runs no Python handler until it returns: SIGTERM and Ctrl-C must end it at once, as the OS does.
        started()
        interrupt = signal.getsignal(signal.SIGINT)
        if interrupt is not signal.SIG_IGN:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
        try:
            with budget.phase("process_group"):
                dist.init(d, cfg.dist_timeout)
        finally:
            signal.signal(signal.SIGINT, interrupt)
        # From the Trainer's start until this rank has said how it ended, SIGTERM is only noted (the Trainer's own
        # handlers act on it while it trains): torchrun sends it to the survivors as soon as one rank dies or
        # leaves, and it must not cut short the line that says why, or turn a checkpointed stop's 3 into a kill.
        with StopAgreement():
            try:
                with Trainer(cfg, d, manifest, budget) as trainer:
                    code = trainer.train()
                dist.flush_sends()  # the others have rank 0's last word before its process group goes
                return code
            except JobError as e:
                return ending(e, d)
            finally:
                dist.cleanup()
    except KeyboardInterrupt:  # Ctrl-C: the MLflow run ended KILLED on the way out; the checkpoints stay
        if d.local_rank == 0:
            print("error: interrupted (Ctrl-C); the MLflow run ends KILLED and the checkpoints stay: rerun with the "
                  "run's --run-name to resume", file=sys.stderr, flush=True)
        return 130
    except JobError as e:
        return ending(e, d)
    finally:
        started()  # an ending already said (a usage error, a failed check) is not followed by a start-up line


def ending(e: JobError, d: dist.Dist) -> int:
    """Say once, on the rank that should, how a JobError ended the job → the exit status."""
    if isinstance(e, RunFinished):
        if d.master:
            print(e, flush=True)
    elif not e.quiet and (e.every_rank or d.local_rank == 0):
        return report(e)
    return e.exit_code
