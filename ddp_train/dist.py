"""Process group from the torchrun environment: NCCL with one GPU per local rank, gloo on CPU — one code path."""
import datetime
import os
import pickle
import re
import socket
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .errors import JobError


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


# Rank 0 alone may spend long on I/O (MLflow start, model export and upload) while the others wait; that wait must
# not trip a --dist-timeout chosen to detect a dead node within seconds. Only the waiting ranks are bound by it: rank 0
# hands its result over without waiting for them (see on_master), so a stopped peer holds it no longer than
# --dist-timeout.
MASTER_IO_TIMEOUT_S = 1800
_io_group = None
_timeout = None
_sends = []  # rank 0's sends on _io_group, each keeping its tensor alive until flush_sends (gloo reports a send
#              complete only once waited for): 2 small tensors per peer and on_master call, a few per epoch


def from_env() -> Dist:
    """Ranks as torchrun (or srun with RANK/WORLD_SIZE exported) sets them; a single process otherwise."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    else:
        device = torch.device("cpu")
    return Dist(rank, local_rank, world_size, device)


class DistError(JobError):
    """The process group cannot be formed: one line naming the problem and the fix."""


def check_rendezvous_address() -> None:
    """MASTER_ADDR must resolve: a typo or a missing /etc/hosts entry must fail at once, not hang or end up on
    loopback by accident."""
    addr = os.environ.get("MASTER_ADDR")
    if not addr:
        return
    try:
        socket.getaddrinfo(addr, None)
    except socket.gaierror as e:
        raise DistError(f"MASTER_ADDR '{addr}' does not resolve on {socket.gethostname()} ({e.strerror}); it must "
                        "name the first node (the Slurm launchers take it from the allocation): fix DNS or "
                        "/etc/hosts on the nodes, or set MASTER_ADDR to that node's address") from None


def restart_store(timeout: datetime.timedelta):
    """torchrun's store with this restart's keys only, or None where init_process_group's own store is safe.

    torchrun's agent keeps one TCPStore for the whole job and hands it to every restarted worker group, so the keys
    where gloo (and NCCL) publish each rank's address still hold the dead workers' addresses: a rank that reads its
    peer's key before the new peer rewrites it connects to a closed port ("Gloo connectFullMesh failed ...
    Connection refused") or waits out the timeout (pytorch/pytorch#135712). TORCHELASTIC_RESTART_COUNT is the same
    on every rank only when one agent starts them all (one node); on several nodes, export
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 to torchrun instead: each restart then gets a new store."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or os.environ.get("GROUP_WORLD_SIZE") != "1":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timeout)
    return dist.PrefixStore(f"ddp_train/restart_{os.environ['TORCHELASTIC_RESTART_COUNT']}", store)


def init(d: Dist, timeout_s: int) -> None:
    if d.distributed:
        check_rendezvous_address()
    if d.device.type == "cuda":
        torch.cuda.set_device(d.device)
    if d.distributed:
        backend = "nccl" if d.device.type == "cuda" else "gloo"
        global _timeout
        timeout = _timeout = datetime.timedelta(seconds=timeout_s)
        store = restart_store(timeout)
        dist.init_process_group(backend, timeout=timeout, device_id=d.device if d.device.type == "cuda" else None,
                                **({"store": store, "rank": d.rank, "world_size": d.world_size} if store else {}))
        global _io_group  # every rank creates it, in the same order: new_group is collective
        _io_group = dist.new_group(backend="gloo",
                                   timeout=datetime.timedelta(seconds=max(timeout_s, MASTER_IO_TIMEOUT_S)))


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place (a no-op for one process). Metrics sum counts, never average averages."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics drift per rank under DDP)."""
    if dist.is_initialized():
        for b in module.buffers():
            dist.broadcast(b, src=0)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def wait_for_master() -> None:
    """The other ranks wait until rank 0 gets here (it may have spent long on I/O); rank 0 does not wait."""
    on_master(lambda: None)


class PeerLost(JobError):
    """A collective failed: another rank died, its node or link went away, or it timed out. Each rank that sees it
    reports it (rank 0 may be the one that died)."""
    every_rank = True


# What gloo and NCCL say when a peer is gone, lower-cased. gloo words it by where it notices: "Timed out waiting
# 15000ms for recv operation" in a collective, "Application timeout caused pair closure" in DDP's buffer broadcast.
COMM_FAILURE_WORDS = ("gloo", "nccl", "connection closed", "connection reset", "timed out", "timeout",
                      "pair closure")


def is_comm_failure(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and
                                             any(w in text for w in COMM_FAILURE_WORDS))


def cause(e: BaseException) -> str:
    """A communication error in a few words: its first line, without gloo's source location ("[…/pair.cc:561] ")
    and the advice that follows the first sentence."""
    first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
    first = re.sub(r"^\s*\[[^\]]*\]\s*", "", first).split(". ")[0]
    return first if len(first) <= 200 else first[:199] + "…"


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


_control_group = None


def control_group():
    """A gloo group for small CPU-side agreements, so they never wait on the GPU stream."""
    global _control_group
    if _control_group is None and dist.is_initialized():
        _control_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    return _control_group


def broadcast_object(obj):
    """Rank 0's value of a picklable object, on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=control_group())
    return box[0]


def gather_objects(obj) -> list:
    """Every rank's value of a picklable object, in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=control_group())
    return out


def on_master(fn):
    """Run `fn` on rank 0 alone while the others wait (MASTER_IO_TIMEOUT_S); every rank then returns its result, or
    raises its JobError — printed by rank 0 only, the others carry it quietly. A bug on rank 0 (any other exception)
    keeps its traceback there and ends the other ranks with one quiet line.

    Rank 0 sends the outcome point-to-point and goes on without waiting for delivery: a collective here would hold
    it for MASTER_IO_TIMEOUT_S if a peer stopped (SIGSTOP, a hung node) — its next collective fails within
    --dist-timeout instead."""
    if not dist.is_initialized():
        return fn()
    if dist.get_rank() == 0:
        result, error, crash = None, None, None
        try:
            result = fn()
        except JobError as e:
            error = e
        except BaseException as e:
            crash = e
        _post((result, error, f"{type(crash).__name__}: {crash}" if crash else None))
        if crash is not None or error is not None:
            flush_sends()  # the others learn why before this process ends
            raise crash or error
        return result
    result, error, crashed = _receive()
    if crashed:
        error = JobError(f"rank 0 failed ({crashed[:200]}); see its traceback")
    if error is not None:
        error.quiet = True
        raise error
    return result


def _post(obj) -> None:
    payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
    size = torch.tensor([payload.numel()], dtype=torch.int64)
    for r in range(1, dist.get_world_size()):
        _sends.extend([dist.isend(size, r, group=_io_group), dist.isend(payload, r, group=_io_group)])


def _receive():
    size = torch.zeros(1, dtype=torch.int64)
    dist.recv(size, 0, group=_io_group)
    payload = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.recv(payload, 0, group=_io_group)
    return pickle.loads(payload.numpy().tobytes())


def flush_sends() -> None:
    """Rank 0: wait, at most --dist-timeout, until the others have what it sent; a peer that is gone is reported by
    whatever collective comes next, or not at all on the way out."""
    global _sends
    sends, _sends = _sends, []
    for w in sends:
        try:
            w.wait(_timeout)
        except Exception:
            return
