"""Rank 0 works for 6 s (as while it exports the model) while the others wait in ddp_train.dist.wait_for_master,
under a process-group timeout of 2 s: the wait must outlast it. Prints "waited" on every rank."""
import time

from ddp_train import dist

d = dist.from_env()
dist.init(d, 2)
if d.master:
    time.sleep(6)
dist.wait_for_master()
print(f"rank {d.rank} waited", flush=True)
dist.cleanup()
