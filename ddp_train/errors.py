"""The one error type of the project: a fault a person can act on, with its exit status.

Every CLI (data prep, trainer, launchers) catches `JobError`, prints `error: <message>` as one line on stderr and
exits with `exit_code`. The message names the problem and the fix; anything else is a bug and keeps its traceback.
"""
import os
import signal
import sys

EXIT_FAILED = 1   # a fault during the run (data, peers, disk, non-finite loss)
EXIT_USAGE = 2    # bad input caught before anything ran (flags, config file, run directory conflicts)
EXIT_REQUEUE = 3  # stopped on SIGUSR2/SIGTERM after checkpointing: not done, resume it


class JobError(Exception):
    """A fault with a one-line message that names the problem and the fix. `quiet`: another rank prints it;
    `every_rank`: each rank that meets it prints it (a fault of its own, not one every rank meets alike and local
    rank 0 reports)."""
    exit_code = EXIT_FAILED
    quiet = False
    every_rank = False


class ConfigError(JobError):
    """A bad configuration value or combination."""
    exit_code = EXIT_USAGE


def remedy(e: OSError) -> str:
    """What a person does about a write that failed with `e`."""
    import errno
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free space"
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return "make it writable"
    return "fix that"


def report(e: JobError, file=None) -> int:
    """Print the error as one line and return its exit status."""
    print(f"error: {' '.join(str(e).split())}", file=file or sys.stderr, flush=True)
    return e.exit_code


def exit_now(code: int):
    """End the process as Python would — other threads joined, atexit handlers run (MLflow's flushes among them),
    output flushed — without the interpreter's teardown of every imported module, which does nothing a finished
    command needs: after torch, MLflow and matplotlib it took 2.2–2.4 s per trainer process on the CPU (0.1 s
    this way), after data prep's FFCV and numba 1.1–1.5 s. For a command's normal end only; a crash keeps
    Python's own exit and its traceback."""
    import atexit
    import os
    import threading
    threading._shutdown()  # the interpreter's own first step: wakes idle pool workers, joins non-daemon threads
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can be said
            pass
    os._exit(code)


START_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)


def _stopped_while_starting(signum, _frame):
    if os.environ.get("LOCAL_RANK", "0") == "0":  # one line per node: torchrun stops every worker alike
        why = "interrupted (Ctrl-C)" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        # torchrun also stops every worker when one of them fails (its error may be on another rank's line)
        then = "torchrun stops every rank when one fails or it is stopped itself: the other lines say which" \
            if "TORCHELASTIC_RUN_ID" in os.environ else "rerun the same command"
        print(f"error: {why} while starting, before training began; no run was started: {then}", file=sys.stderr,
              flush=True)
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)  # end as that signal would have: torchrun and the shell see the same status


_before_start = {}  # the handlers signals_while_starting replaced


def signals_while_starting() -> None:
    """From the first import until `started()`: Ctrl-C, a preemption's SIGTERM or Slurm's SIGUSR2 ends the process
    with one line and that signal's status, instead of a traceback from inside an import or no word at all."""
    for sig in START_SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:  # a signal the caller ignores (nohup, `&`) stays ignored
            _before_start[sig] = signal.signal(sig, _stopped_while_starting)


def started() -> None:
    """The Trainer (or an ending already said) takes over: the handlers from before `signals_while_starting`
    again (Python's defaults). Does nothing where it was not called (the trainer run in-process by submitit, whose
    own handlers stay)."""
    while _before_start:
        sig, handler = _before_start.popitem()
        signal.signal(sig, handler)
