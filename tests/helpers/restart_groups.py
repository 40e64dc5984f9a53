"""Under torchrun --max-restarts=N: form the trainer's process groups (ddp_train.dist.init) and use both; then rank 1
dies (SIGKILL) in every attempt but the last, so torchrun restarts the worker group on its store N times.
Each rank marks each attempt whose groups it formed with a file in the directory given."""
import os
import signal
import sys
from pathlib import Path

import torch

from ddp_train import dist

d = dist.from_env()
dist.init(d, timeout_s=30)
assert dist.all_reduce_sum(torch.ones(1)).item() == d.world_size
dist.wait_for_master()  # the second gloo group, _io_group
restart, last = int(os.environ["TORCHELASTIC_RESTART_COUNT"]), int(os.environ["TORCHELASTIC_MAX_RESTARTS"])
(Path(sys.argv[1]) / f"attempt{restart}-rank{d.rank}").touch()
if restart < last and d.rank == 1:
    os.kill(os.getpid(), signal.SIGKILL)
dist.barrier()  # rank 0 is in a collective when its peer dies, as in training
dist.cleanup()
