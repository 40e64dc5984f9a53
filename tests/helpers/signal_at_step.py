"""The trainer (python -m ddp_train, under torchrun) with faults at chosen training steps of this process, counted
from 1 across epochs: STOP_AT=n sends SIGUSR2 to rank 0 right after its step n (a Slurm time-limit warning),
POISON_AT=n fills a weight with NaN just before step n (a loss that turns non-finite there)."""
import os
import signal
import sys

import torch

from ddp_train import step
from ddp_train.errors import EXIT_REQUEUE, exit_now, signals_while_starting

signals_while_starting()
from ddp_train.train import main  # noqa: E402

STOP_AT, POISON_AT = int(os.environ.get("STOP_AT", 0)), int(os.environ.get("POISON_AT", 0))
steps = 0
train_step = step.train_step


def faulty_step(model, *args, **kwargs):
    global steps
    steps += 1
    if steps == POISON_AT:
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))
    out = train_step(model, *args, **kwargs)
    if steps == STOP_AT and os.environ["RANK"] == "0":
        os.kill(os.getpid(), signal.SIGUSR2)
    return out


step.train_step = faulty_step
code = main()
if code in (0, EXIT_REQUEUE):
    exit_now(code)
sys.exit(code)
