"""python -m ddp_train: the trainer (one process per rank under torchrun)."""
import sys

from .errors import EXIT_REQUEUE, exit_now, signals_while_starting

signals_while_starting()  # before the imports (seconds of torch, numpy, yaml): train.main ends this
from .train import main  # noqa: E402

code = main()
if code in (0, EXIT_REQUEUE):  # every rank has passed the run's last barrier (or the stop's checkpoint) and rank 0
    exit_now(code)             # has printed: nothing is left to wait for, and a second SIGTERM cannot land in teardown
# Any other ending keeps Python's slower exit. Under torchrun the first rank to exit non-zero gets the others
# SIGTERMed, so a rank that leaves the error line or the MLflow status to rank 0 must not leave much sooner than it:
# with exit_now here a bad --batch-size once ended with no error line (rank 0 killed before it printed).
sys.exit(code)
