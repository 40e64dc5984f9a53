"""python -m ddp_train: the trainer (one process per rank under torchrun)."""
from .errors import exit_now
from .train import main

exit_now(main())
