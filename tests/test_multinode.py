"""Multi-node for real: a two-node Slurm cluster on this machine (each slurmd in its own network, UTS and mount
namespace on a bridge: tests/cluster/slurm-cluster.sh start DIR 2) runs the project's launchers across both nodes.
Two nodes × 1 worker train exactly like one node × 2 workers; the rendezvous address comes from the allocation and
a bad one fails at once; a node that loses its link or its worker fails the job within --dist-timeout, and the
requeued job resumes from its checkpoint and finishes, each epoch logged once."""
import os
import re
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import error_lines, run
from slurmtools import (
    CLUSTER,
    DONE,
    EPOCH_LINE,
    SBATCH,
    finish_requeued,
    job_env,
    only_run,
    release,
    sbatch,
    slurm_cluster,
    state,
    wait_for,
    wait_for_text,
    workdir,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and Slurm need root (CI runs as root)")

EPOCHS = 3
RECIPE = ["--preset", "cpu-demo", "--width", "8", "--epochs", str(EPOCHS), "--batch-size", "100", "--lr", "0.2",
          "--warmup-epochs", "0.5", "--system-metrics-interval", "1"]
# The two-node sbatch job reads through FFCV; the other jobs use the resident loader (the same batches, see
# tests/test_resident.py, without FFCV's pipeline compilation in every attempt), so comparing them with it also
# compares the loaders.
RESIDENT = [*RECIPE, "--loader", "resident"]
DIST_TIMEOUT = 15
NODE_ADDR = {"node1": "10.123.0.11", "node2": "10.123.0.12"}


def leftovers() -> list:
    """What a stopped two-node cluster must not leave behind."""
    found = [ns.split()[0] for ns in run(["ip", "netns", "list"]).stdout.splitlines() if ns.startswith("slurmtest-")]
    found += re.findall(r"(?:slurmtest0|vt-node\d+)", run(["ip", "-o", "link", "show"]).stdout)
    return found + [p.name() for p in psutil.process_iter() if p.name() in ("slurmd", "slurmctld", "slurmdbd")]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # SlurmdTimeout 20 s: a silent node is declared DOWN in about half a minute (Slurm's default is 300 s)
    with slurm_cluster(tmp_path_factory.mktemp("slurm2"), nodes=2, env={"SLURM_TEST_SLURMD_TIMEOUT": "20"}) as env:
        yield env
    assert not leftovers(), f"stopping the cluster left {leftovers()}"


def two_nodes(cluster, work, *args, exports=""):
    return sbatch(cluster, work, "--nodes=2", SBATCH, *RESIDENT, *args, nproc=1, cpus=1, exports=exports)


def metric_values(work) -> dict:
    """Every per-epoch metric of the job's one run, as exact floats by epoch."""
    from mlflow import MlflowClient
    r, _ = only_run(work)
    c = MlflowClient(tracking_uri=f"sqlite:///{work}/mlflow.db")
    return {k: [m.value for m in sorted(c.get_metric_history(r.info.run_id, k), key=lambda m: m.step)]
            for k in ("train_loss", "train_top1", "test_loss", "test_top1", "test_top5", "test_super_top1")}


@pytest.fixture(scope="module")
def jobs(cluster, synthetic_data, tmp_path_factory):
    """The same recipe on one node × 2 workers and on two nodes × 1 worker (same world size, global batch, seed),
    submitted together; each job's work directory, final state and log."""
    out = {}
    for name, nodes, nproc, recipe in (("one_node", 1, 2, RESIDENT), ("two_nodes", 2, 1, RECIPE)):
        work = workdir(tmp_path_factory.mktemp(name), synthetic_data)
        p = sbatch(cluster, work, f"--nodes={nodes}", SBATCH, *recipe, nproc=nproc, cpus=1)
        assert p.returncode == 0, p.stderr
        out[name] = [work, p.stdout.strip()]
    for name, (work, job) in out.items():
        final = wait_for(cluster, job, DONE)
        out[name] += [final, (work / f"cifar100-ddp-{job}.log").read_text()]
    return out


def test_nodes_have_their_own_addresses_and_hostnames_and_no_route_out(cluster):
    p = run(["srun", "--nodes=2", "--ntasks-per-node=1", "sh", "-c",
             'echo "$(hostname) $(getent ahostsv4 "$(hostname)" | head -1 | cut -d" " -f1)'
             ' $(ip route | grep -c ^default)"'],
            env=cluster, check=True, timeout=60)
    assert sorted(p.stdout.split("\n")[:2]) == ["node1 10.123.0.11 0", "node2 10.123.0.12 0"]


def test_sbatch_on_two_nodes_trains_exactly_like_one_node(jobs):
    (one, _, one_state, one_log), (two, job, two_state, two_log) = jobs["one_node"], jobs["two_nodes"]
    assert one_state == two_state == "COMPLETED", two_log[-3000:]
    assert f"job {job} (restart 0) on node[1-2]: 2 node(s) × 1 worker(s), rendezvous {NODE_ADDR['node1']}:" in two_log
    assert "2 × cpu (gloo)" in two_log and "trainer exited 0" in two_log
    assert len(EPOCH_LINE.findall(two_log)) == EPOCHS
    assert EPOCH_LINE.findall(two_log) == EPOCH_LINE.findall(one_log)
    assert metric_values(two) == metric_values(one)  # bit for bit: same ranks, same data, same reductions
    r, steps = only_run(two)
    assert r.info.status == "FINISHED" and r.data.tags["slurm_job_nodelist"] == "node[1-2]"
    assert steps == {"train_loss": list(range(EPOCHS)), "test_top1": list(range(EPOCHS))}
    # each node's first process sampled its own node, labelled with its hostname
    assert {"system/node1/cpu_utilization_percentage", "system/node2/cpu_utilization_percentage"} <= set(r.data.metrics)


def submit(cluster, work, *args):
    cmd = [sys.executable, "-m", "slurm.submit", "--nodes", "2", "--gpus-per-node", "0", "--tasks-per-node", "1",
           "--cpus-per-task", "1", "--wait", *args]
    return run(cmd, cwd=work, env=job_env(cluster, work), timeout=600)


def test_submitit_on_two_nodes_trains_exactly_like_one_node(cluster, jobs, synthetic_data, tmp_path):
    one, *_ = jobs["one_node"]
    work = workdir(tmp_path, synthetic_data)
    p = submit(cluster, work, "--", *RESIDENT)
    assert p.returncode == 0, p.stdout + p.stderr
    job = re.search(r"submitted job (\d+) \(slurm\): 2 node\(s\) × 1 task\(s\)", p.stdout).group(1)
    assert metric_values(work) == metric_values(one)
    r, _ = only_run(work)
    assert r.info.status == "FINISHED" and r.data.tags["slurm_job_id"] == job
    assert r.data.tags["slurm_job_nodelist"] == "node[1-2]" and r.data.tags["hostname"] == "node1"
    assert {"system/node1/cpu_utilization_percentage", "system/node2/cpu_utilization_percentage"} <= set(r.data.metrics)


class HostsEdited:
    """Rewrite the nodes' /etc/hosts (the cluster's hosts file, bind-mounted into each node: edited in place, as
    the mounts follow the inode) and restore it afterwards."""

    def __init__(self, cluster, old, new):
        self.path = Path(cluster["SLURM_CONF"]).parent / "hosts"
        self.old, self.new = old, new

    def __enter__(self):
        self.saved = self.path.read_text()
        assert self.old in self.saved
        with open(self.path, "r+") as f:
            f.write(self.saved.replace(self.old, self.new))
            f.truncate()

    def __exit__(self, *exc):
        with open(self.path, "r+") as f:
            f.write(self.saved)
            f.truncate()


@pytest.mark.parametrize("case", ["unresolvable", "loopback"])
def test_sbatch_refuses_a_first_node_that_others_cannot_reach(cluster, synthetic_data, tmp_path, case):
    work = workdir(tmp_path, synthetic_data)
    new = {"unresolvable": "", "loopback": "127.0.1.1 node1\n"}[case]
    with HostsEdited(cluster, "10.123.0.11 node1\n", new):
        job = two_nodes(cluster, work).stdout.strip()
        assert wait_for(cluster, job, DONE, timeout=60) == "FAILED"
    log = (work / f"cifar100-ddp-{job}.log").read_text()
    assert error_lines(log) == [{
        "unresolvable": "error: first node 'node1' of the allocation does not resolve; fix DNS or /etc/hosts on the "
                        "nodes",
        "loopback": "error: first node 'node1' resolves to loopback 127.0.1.1; other nodes could not reach it — fix "
                    "/etc/hosts"}[case]]
    assert "config:" not in log  # no worker started


def test_submitit_refuses_an_unresolvable_first_node_in_one_line(cluster, synthetic_data, tmp_path):
    work = workdir(tmp_path, synthetic_data)
    with HostsEdited(cluster, "10.123.0.11 node1\n", ""):
        p = submit(cluster, work, "--", *RECIPE)
    assert p.returncode == 1
    [line] = p.stderr.strip().splitlines()
    assert re.fullmatch(r"error: job \d+ failed: MASTER_ADDR 'node1' does not resolve on node\d \(.*\); it must name "
                        r"the first node .*; logs in \S+", line), line


def worker_on(node: str):
    """The training process (not torchrun, not the launcher) running in a node's network namespace."""
    pids = run(["ip", "netns", "pids", f"slurmtest-{node}"], check=True).stdout.split()
    for pid in map(int, pids):
        try:
            cmd = " ".join(psutil.Process(pid).cmdline())
        except psutil.NoSuchProcess:
            continue
        if "-m ddp_train" in cmd and "torchrun" not in cmd and "--check" not in cmd:
            return psutil.Process(pid)
    raise AssertionError(f"no ddp_train worker in {node}'s namespace")


def node_state(cluster, node):
    return run(["sinfo", "-h", "-N", "-n", node, "-o", "%t"], env=cluster, check=True).stdout.strip()


def cluster_cmd(cluster, *args):
    return run(["bash", CLUSTER, *args[:1], Path(cluster["SLURM_CONF"]).parent, *args[1:]], env=cluster, check=True)


def test_node_gone_fails_within_dist_timeout_and_the_job_resumes_when_it_is_back(cluster, jobs, synthetic_data,
                                                                                tmp_path):
    """node2 dies mid-epoch (link down, every process on it killed): rank 0 fails at its collective timeout (not
    the 10-minute default); Slurm declares node2 DOWN (SlurmdTimeout), ends the attempt as NODE_FAIL and requeues
    the job, which waits for node2; node2 boots again, and the job resumes from the last checkpoint and ends
    exactly like an uninterrupted run."""
    *_, reference = jobs["two_nodes"]
    work = workdir(tmp_path, synthetic_data)
    job = two_nodes(cluster, work, "--dist-timeout", str(DIST_TIMEOUT)).stdout.strip()
    log_name = f"cifar100-ddp-{job}.log"
    wait_for_text(log_name, work, "\nepoch 1 |")
    time.sleep(0.5)
    cluster_cmd(cluster, "crash", 2)
    try:
        wait_for_text(log_name, work, "lost its peers", timeout=120)
        deadline = time.monotonic() + 180
        while not (node_state(cluster, "node2").startswith("down") and state(cluster, job) == "PENDING"):
            assert time.monotonic() < deadline, f"node2 {node_state(cluster, 'node2')}, job {state(cluster, job)}"
            time.sleep(1)
        # lift the hold at once (it cannot start in the second of its credential's revocation: node2 is down)
        run(["scontrol", "update", f"jobid={job}", "starttime=now"], env=cluster, check=True)
        for _ in range(30):  # released, it still waits for its node
            reason = run(["squeue", "-h", "-j", job, "-o", "%T %r"], env=cluster, check=True).stdout.replace("_", " ")
            assert reason.startswith("PENDING"), reason
            if "Nodes required for job are DOWN" in reason:
                break
            time.sleep(1)
        else:
            raise AssertionError(f"job {job}: {reason}")
    finally:
        cluster_cmd(cluster, "boot", 2)  # the node is back
    # the resumed attempt took 1.5 min alone, and over 5 min while other suites loaded the 2 cores
    assert finish_requeued(cluster, job, timeout=600) == "COMPLETED"
    deadline = time.monotonic() + 60  # slurmdbd records the end a moment after slurmctld reports it
    while (acct := run(["sacct", "-j", job, "-X", "-n", "-P", "--duplicates", "-o", "State"],
                       env=cluster).stdout.split())[-1:] == ["RUNNING"] and time.monotonic() < deadline:
        time.sleep(1)
    assert acct == ["NODE_FAIL", "COMPLETED"]
    log = (work / log_name).read_text()
    first, second = log.split(f"job {job} (restart 1)")
    assert "not requeueing: Slurm is already ending this attempt" in first and "warning" not in first
    assert re.search(r"trainer exited [1-9]", first), first[-3000:]  # the failed attempt's status, not 0
    lost = [line for line in error_lines(first) if "lost its peers" in line]
    # gloo's timeout, in the words of where it struck: a collective, or DDP's buffer broadcast in the forward pass
    assert lost and re.search(rf"Timed out waiting {DIST_TIMEOUT * 1000}ms|Application timeout caused pair closure",
                              lost[0]) and f"--dist-timeout {DIST_TIMEOUT} s" in lost[0], first[-3000:]
    assert "resuming from" in second and "trainer exited 0" in second
    assert EPOCH_LINE.findall(log) == EPOCH_LINE.findall(reference)  # each epoch once, same numbers
    r, steps = only_run(work)
    assert r.info.status == "FINISHED"
    assert steps == {"train_loss": list(range(EPOCHS)), "test_top1": list(range(EPOCHS))}


def test_killed_worker_requeues_until_max_failures_then_the_job_fails_with_its_status(cluster, synthetic_data,
                                                                                      tmp_path):
    """A worker dies (Slurm sees nothing wrong): the batch script requeues the job itself, MAX_FAILURES times;
    the next failure ends the job FAILED with the trainer's exit status."""
    work = workdir(tmp_path, synthetic_data)
    job = two_nodes(cluster, work, exports="MAX_FAILURES=1").stdout.strip()
    log_name = f"cifar100-ddp-{job}.log"
    wait_for_text(log_name, work, "\nepoch 0 |")
    worker_on("node2").kill()
    wait_for_text(log_name, work, "failure 1 of at most 1: requeueing job")
    deadline = time.monotonic() + 180
    while (work / log_name).read_text().count("2 × cpu (gloo)") < 2:  # the second attempt is training
        assert time.monotonic() < deadline, f"job {job} is {state(cluster, job)}"
        if state(cluster, job) == "PENDING":
            release(cluster, job)
        time.sleep(1)
    worker_on("node2").kill()
    assert wait_for(cluster, job, DONE, timeout=120) == "FAILED"
    log = (work / log_name).read_text()
    exited = re.findall(r"trainer exited (\d+)", log)
    assert len(exited) == 2 and "0" not in exited, log[-3000:]
    given_up = re.search(r"trainer failed 2 time\(s\) \(MAX_FAILURES=1\), not requeueing; see (\S+)", log)
    assert given_up, log[-3000:]
    acct = run(["sacct", "-j", job, "-X", "-n", "-P", "--duplicates", "-o", "State,ExitCode"], env=cluster).stdout
    assert acct.split() == ["REQUEUED|0:0", f"FAILED|{exited[1]}:0"]
    # the history is kept under a dated name; a later job reusing this id would count from zero
    assert not (work / ".slurm-failures" / job).exists()
    history = work / given_up.group(1)
    assert history.parent == work / ".slurm-failures" and history.name.startswith(f"{job}.")
    assert len(history.read_text().splitlines()) == 2
