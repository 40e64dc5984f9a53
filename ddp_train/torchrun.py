"""torchrun with readable endings: python -m ddp_train.torchrun [torchrun flags] -m ddp_train [trainer flags].

It runs torchrun's own `main` (torch.distributed.run), so every flag and behaviour is torchrun's, except how it
ends. A failed worker no longer ends in torchrun's ChildFailedError traceback and report under the worker's own
error: one line names each failed rank and how it ended. A signal (SIGUSR2/SIGTERM from Slurm or `docker stop`)
no longer ends in a SignalException traceback: one line says which signal, that torchrun passed it to the workers
(the trainer checkpoints and exits 3) and how they ended. Anything else keeps its traceback, and the workers'
own output, tracebacks included, is never touched. torchrun's routine log lines (its OMP_NUM_THREADS banner, the
signals it sends while shutting down, its own per-failure line) are left out: the one line says the same.

Exit status: the first failed worker's status (trainer: 1 failed, 2 bad input, 3 stopped to be resumed), or the
workers' common status after a signal; 1 when a worker was killed, or after a signal when the workers differ.
"""
import logging
import signal
import socket
import sys

from torch.distributed import run as torch_run
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher import api as launcher_api

from .errors import EXIT_FAILED, EXIT_REQUEUE, EXIT_USAGE, exit_now

MEANING = {EXIT_FAILED: "failed", EXIT_USAGE: "bad input", EXIT_REQUEUE: "checkpointed, to be resumed"}
# torchrun's log lines that the summary line replaces, by their format strings (the loggers of the modules below)
ROUTINE = ("Setting OMP_NUM_THREADS", "Sending process %s closing signal %s", "failed (exitcode: %s) local_rank:",
           "Received %s death signal, shutting down workers")
LOGGERS = ("torch.distributed.run", "torch.distributed.elastic.multiprocessing.api",
           "torch.distributed.elastic.agent.server.api")


class Agent(launcher_api.LocalElasticAgent):
    """torchrun's agent, remembered so that its workers' exit statuses can be read after a signal stopped it."""
    current = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        Agent.current = self


def worker_statuses() -> list:
    """This node's workers' exit statuses (negative: killed by that signal); [] if unknown (before they started,
    or a torch whose agent keeps them elsewhere: then the exit status is 1, as torchrun's)."""
    handlers = getattr(getattr(Agent.current, "_pcontext", None), "subprocess_handlers", None) or {}
    codes = [h.proc.returncode for _, h in sorted(handlers.items())]
    return codes if None not in codes else []


def ended(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name if -code in signal.valid_signals() else f'signal {-code}'}"
    return f"exited with status {code}" + (f" ({MEANING[code]})" if code in MEANING else "")


def ranks(numbers, word="rank") -> str:
    """[0, 1, 2, 5] → 'ranks 0-2, 5'."""
    numbers, spans = sorted(numbers), []
    for n in numbers:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    text = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans)
    return f"{word}{'s' if len(numbers) > 1 else ''} {text}"


def outcomes(statuses: dict, word="rank") -> str:
    """{rank: status} in the order they ended → 'rank 1 exited with status 2 (bad input); rank 0 killed by …'."""
    grouped = {}
    for rank, code in statuses.items():
        grouped.setdefault(ended(code), []).append(rank)
    return "; ".join(f"{ranks(rs, word)} {how}" for how, rs in grouped.items())


def failed_line(e: ChildFailedError) -> tuple[str, int]:
    first, _ = e.get_first_failure()
    statuses = {r: e.failures[r].exitcode for r in [first, *sorted(set(e.failures) - {first})]}
    own = [code for code in statuses.values() if code > 0]  # exited by themselves: their errors are above
    return outcomes(statuses) + ("; the workers' errors are above" if own else ""), own[0] if own else EXIT_FAILED


def signal_line(e: SignalException) -> tuple[str, int]:
    line = f"stopped by {signal.Signals(e.sigval).name} and passed it to the workers"
    codes = worker_statuses()
    if not codes:
        return line, EXIT_FAILED
    line += "; " + outcomes(dict(enumerate(codes)), "local rank")
    same = len(set(codes)) == 1 and codes[0] >= 0
    return line, codes[0] if same else EXIT_FAILED


def quiet(record: logging.LogRecord) -> bool:
    return not (isinstance(record.msg, str) and any(r in record.msg for r in ROUTINE))


def main(argv=None) -> int:
    for name in LOGGERS:
        logging.getLogger(name).addFilter(quiet)
    launcher_api.LocalElasticAgent = Agent  # torchrun's launch_agent builds its agent from this module's name
    try:
        torch_run.main(argv)
    except ChildFailedError as e:
        line, code = failed_line(e)
    except SignalException as e:
        line, code = signal_line(e)
    else:
        return 0
    print(f"torchrun on {socket.gethostname()}: {line}; exit {code}", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    exit_now(main())
