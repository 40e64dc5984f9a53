"""A worker with a bug: rank 1 raises an unexpected exception at once, rank 0 waits to be stopped by torchrun."""
import os
import time


def load_batch(rank: int):
    raise RuntimeError(f"unexpected failure in rank {rank}")


if os.environ["RANK"] == "1":
    load_batch(1)
time.sleep(120)
