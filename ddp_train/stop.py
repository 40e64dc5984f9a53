"""When a run stops early: a signal (time limit, preemption) or a non-finite loss, agreed by every rank at the same
step without waiting on the GPU.

Signal handlers only set a flag. Each step the trainer hands its loss to `watch` (an asynchronous device→host copy
of "is it finite?") and calls `poll`, which starts an asynchronous all-reduce of this rank's flags on a CPU gloo
group and reads the one started at the previous step — long complete by then. So no rank waits, and every rank
sees the same verdict after the same step.
"""
import signal

import torch
import torch.distributed as dist

from . import dist as ddp_dist
from .errors import JobError

SIGNALS = (signal.SIGUSR2, signal.SIGTERM)  # Slurm's warning before the time limit; preemption, torchrun's stop


class NonFiniteLoss(JobError):
    """The training loss became NaN or infinite on some rank."""


class StopAgreement:
    """`with StopAgreement(): …` installs the handlers and restores the previous ones (e.g. submitit's) on exit."""

    def __init__(self):
        self.requested = 0            # the signal number, set by the handler
        self.nonfinite_step = None    # this rank's first step whose loss was not finite
        self._pending = []            # (step, host flag, CUDA event or None): finite checks still in flight
        self._buf = torch.zeros(2)    # [stop requested, non-finite seen] of this rank, summed over ranks
        self._work = None
        self._saved = {}

    def __enter__(self):
        self._saved = {sig: signal.getsignal(sig) for sig in SIGNALS}
        for sig in SIGNALS:
            signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        try:
            self.drain()  # no collective may be in flight when the process group is destroyed
        except Exception:
            pass  # the group is already broken: the exception in flight says why
        return False

    def _handler(self, signum, _frame):
        self.requested = self.requested or signum

    def watch(self, step: int, loss: torch.Tensor) -> None:
        """Queue the check of this step's loss; its result is read once the copy has landed, never waited for."""
        bad = ~torch.isfinite(loss.detach())
        if bad.is_cuda:
            host = bad.to("cpu", non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending.append((step, host, event))
        else:
            self._pending.append((step, bad, None))

    def _collect(self, wait: bool) -> None:
        while self._pending:
            step, host, event = self._pending[0]
            if event is not None and not event.query():
                if not wait:
                    return
                event.synchronize()
            self._pending.pop(0)
            if bool(host) and self.nonfinite_step is None:
                self.nonfinite_step = step

    def poll(self) -> tuple:
        """→ (stop, nonfinite): the verdict agreed from every rank's flags of one step earlier."""
        self._collect(wait=False)
        flags = [1.0 if self.requested else 0.0, 1.0 if self.nonfinite_step is not None else 0.0]
        if not dist.is_initialized():
            return bool(flags[0]), bool(flags[1])
        verdict = (False, False)
        if self._work is not None:
            self._work.wait()
            verdict = (self._buf[0].item() > 0, self._buf[1].item() > 0)
        self._buf.copy_(torch.tensor(flags))
        self._work = dist.all_reduce(self._buf, group=ddp_dist.control_group(), async_op=True)
        return verdict

    def settle(self) -> tuple:
        """Wait for every pending check and agree on every rank's flags now → (stop, nonfinite). At the end of an
        epoch (a signal during its last step, or its only one, is not left to a poll that never comes) and before a
        stop's checkpoint (a loss that went non-finite just before the stop is never saved)."""
        self._collect(wait=True)
        self.drain()
        flags = torch.tensor([1.0 if self.requested else 0.0, 1.0 if self.nonfinite_step is not None else 0.0])
        if dist.is_initialized():
            dist.all_reduce(flags, group=ddp_dist.control_group())
        return flags[0].item() > 0, flags[1].item() > 0

    def drain(self) -> None:
        if self._work is not None:
            work, self._work = self._work, None
            work.wait()
