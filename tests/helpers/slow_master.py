"""ddp_train.dist.on_master under a process-group timeout of 2 s, on every rank:
1. rank 0 works for 6 s (as while it exports the model) while the others wait in wait_for_master: the wait must
   outlast the timeout;
2. a JobError raised on rank 0 reaches the others, quietly;
3. a peer that does not answer for 4 s (stopped, hung) must not hold rank 0 in on_master: it goes on at once, and
   the peer gets the value when it wakes.
Prints one line per phase and rank."""
import time

from ddp_train import dist
from ddp_train.errors import JobError

d = dist.from_env()
dist.init(d, 2)
if d.master:
    time.sleep(6)
dist.wait_for_master()
print(f"rank {d.rank} waited", flush=True)


def fail():
    raise JobError("disk full")


try:
    dist.on_master(fail)
except JobError as e:
    print(f"rank {d.rank} raised '{e}' quiet={getattr(e, 'quiet', False)}", flush=True)

if not d.master:
    time.sleep(4)
t0 = time.monotonic()
value = dist.on_master(lambda: "rank 0's value")
print(f"rank {d.rank} got {value} after {time.monotonic() - t0:.1f} s", flush=True)
dist.on_master(lambda: time.sleep(6))  # the sleeping peer catches up
dist.flush_sends()
dist.cleanup()
