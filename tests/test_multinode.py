"""Multi-node, simulated on one machine: two torchrun agents (--nnodes 2, one process each, c10d rendezvous on
localhost, gloo) must give exactly what one node with two processes gives, also after one node is killed and both
agents are started again with --resume auto.

    pytest -q -m slow tests/test_multinode.py

What a real cluster adds and this cannot show: a network between the nodes, a shared filesystem for out/ (here
both nodes write one local folder) and GPUs (nccl). run/*.sbatch starts the same torchrun command on each node.
"""

import json
import os
import random
import resource
import signal
import socket
import subprocess
import time
from typing import NoReturn

import pytest

from conftest import PY, ROOT, torchrun
from test_grpo import TOY, toy_images  # noqa: F401  (toy_images is a fixture: the 2-rank GRPO test's data)
from test_sft import _args as sft_args

pytestmark = pytest.mark.slow

# torchrun sets OMP_NUM_THREADS=1 only when it starts several processes per node, so one process per node would run
# with both cores: another thread count may round CPU matmuls differently (it changed SmolLM2's samples in
# test_grpo.py; these tiny runs measured equal either way). Same threads, same numbers; also kinder to 2 shared cores.
# LOGLEVEL=INFO: the agents log rendezvous, worker states and the exit barrier, so a failed trial's logs say why;
# PYTHONFAULTHANDLER: a crash, or the SIGABRT fail_with_stacks sends, prints the Python stacks of every thread.
ENV = {**os.environ, "PYTHONPATH": ROOT, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "LOGLEVEL": "INFO",
       "PYTHONFAULTHANDLER": "1"}
KEYS = {"sft": ["loss", "grad_norm", "lr", "loss_tokens"], "grpo": ["reward", "pg_loss", "kl", "grad_norm", "len_mean"]}
# a checkpoint after every step, so one exists to resume from; a short collective timeout, so a lost node ends the job
COMMON = ["--max_steps", "2", "--save_every", "1", "--timeout_s", "60"]


def _rendezvous_port() -> int:
    """A free port outside the kernel's ephemeral range (below it, under 30000, or above it), for node 0's c10d store.

    Node 0 binds it seconds after this check, while node 1 may already be trying to connect to it (its client retries
    for 60 s). A port from the ephemeral range (what bind(("", 0)) returns) can meanwhile be handed out as the source
    port of some connection, node 1's own attempt included (a TCP self-connect, after which node 1 talks to itself);
    no outgoing connection gets a port outside the range. Under 30000: Kubernetes' NodePorts (30000-32767) may be
    redirected on a node's loopback. A range that leaves no room falls back to bind(0)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split()[:2])
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    ports = [*range(max(1024, low - 8000), min(low, 30000)), *range(high + 1, 65536)]
    for port in random.Random().sample(ports, min(200, len(ports))) + [0]:
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free port for the rendezvous")


def start_nodes(argv: list, logs, tag: str) -> list:
    """Start one torchrun agent per simulated node, each in its own session (so a node can be killed as a whole).
    Node 0 hosts the c10d store, as the first node of a SLURM job does (its hostname is the endpoint's). The nodes
    write no core files (fail_with_stacks aborts them; cwd is the checkout)."""
    port, procs = _rendezvous_port(), []
    core = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (0, core[1]))  # inherited at fork; ours restored below
    try:
        for node in (0, 1):
            cmd = [PY, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node",
                   "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_conf",
                   f"is_host={int(node == 0)}", *argv]
            with open(logs / f"{tag}-node{node}.log", "w") as log:
                procs.append(subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True))
    except BaseException:  # node 1 did not start: stop node 0, which no caller would hold
        for p in procs:
            kill_node(p)
        raise
    finally:
        resource.setrlimit(resource.RLIMIT_CORE, core)
    return procs


def _tree(pid: int) -> list:
    """pid and all its descendants (torchrun starts its workers in sessions of their own)."""
    children = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _groups(proc) -> set:
    """The process groups of `proc` and every process below it (empty once it ended and was reaped: its pid may
    belong to someone else by now)."""
    if proc.poll() is not None:
        return set()
    groups = set()
    for pid in _tree(proc.pid):
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            pass
    return groups


def _signal(groups, sig) -> None:
    for g in groups:
        try:
            os.killpg(g, sig)
        except (ProcessLookupError, PermissionError):  # gone, or its id reused by someone else's process
            pass


def kill_node(proc) -> None:
    """SIGKILL a node: the agent's process group and the group of every process below it, all at once."""
    _signal(_groups(proc), signal.SIGKILL)
    proc.wait()


def _log(logs, tag, node) -> str:
    path = logs / f"{tag}-node{node}.log"
    return f"({path}, its last 20000 characters)\n" + path.read_text(errors="replace")[-20000:]


def fail_with_stacks(procs, logs, tag, why, seen=None) -> NoReturn:
    """Raise AssertionError with `why`, each node's state and its log's tail, after SIGABRT made every process of a
    still running node print its Python threads' stacks there (PYTHONFAULTHANDLER, set in ENV): where it hung.
    `seen`: {node: process groups} snapshots taken while waiting, so workers whose agent already ended are reached."""
    state = ", ".join(f"node {n} " + ("running" if p.poll() is None else f"exited {p.returncode}")
                      for n, p in enumerate(procs))
    # not a reaped agent's own group id (free for reuse); its workers' were seen running at most a second ago
    groups = {n: _groups(p) | ((seen or {}).get(n, set()) - {p.pid}) for n, p in enumerate(procs)}
    for agents in (False, True):  # workers first, agents after: one process at a time writes into a node's log
        for n, p in enumerate(procs):
            _signal({g for g in groups[n] if (g == p.pid) == agents}, signal.SIGABRT)
        time.sleep(2)  # the dumps reach the logs (an agent may instead report its aborted worker, and exit)
    for n, p in enumerate(procs):
        _signal(groups[n], signal.SIGKILL)
        p.wait()
    raise AssertionError(f"{tag}: {why} ({state}):\n" + "\n".join(
        f"--- node {n} ---\n{_log(logs, tag, n)}" for n in range(len(procs))))


def wait_nodes(procs, logs, tag, timeout=300) -> None:
    """Wait for both nodes to exit 0. A node that exits non-zero fails the test at once, and so does a timeout, with
    both nodes' logs (and the stacks of what still ran): an agent whose workers finished waits up to 300 s in
    torchrun's exit barrier for the other agents, so a failure on one node can look like a hang on the other."""
    deadline, seen, looked = time.time() + timeout, {n: set() for n in range(len(procs))}, 0.0
    while True:
        running = any(p.poll() is None for p in procs)
        if running and time.time() - looked > 1:  # the processes below each agent, while it still runs to be asked
            looked = time.time()
            for n, p in enumerate(procs):
                seen[n] |= _groups(p)
        failed = [n for n, p in enumerate(procs) if p.poll() not in (None, 0)]
        if failed or (running and time.time() > deadline):
            fail_with_stacks(procs, logs, tag, f"node {failed[0]} failed" if failed else f"not done after {timeout} s",
                             seen)
        if not running:
            return
        time.sleep(0.1)


def result(stage: str, out) -> tuple:
    """(the per-step metrics that must match exactly, the final export's bytes); a resumed step's last line wins."""
    rows = {}
    for line in open(os.path.join(out, "metrics.jsonl")):
        r = json.loads(line)
        rows.setdefault(r["step"], {}).update(r)
    metrics = [[rows[s][k] for k in KEYS[stage]] for s in sorted(rows)]
    return metrics, (out / "final" / "model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_vl, sample_data, toy_images):  # noqa: F811
    """get(stage) -> (argv builder, the single-node 2-rank result, a work folder); each reference run happens once.
    The flags are those of the 2-rank tests in test_sft.py and test_grpo.py, plus COMMON."""
    work = tmp_path_factory.mktemp("multinode")
    argv = {
        "sft": lambda out: [*sft_args(tiny_vl, os.path.join(sample_data, "image"), out), "--micro_batch", "1", *COMMON],
        "grpo": lambda out: ["grpo.py", "--model", tiny_vl, "--data", toy_images, *TOY, "--mini_batch", "8",
                             "--kl_coef", "0.01", "--out", str(out), *COMMON],
    }
    refs = {}

    def get(stage):
        if stage not in refs:
            out = work / f"{stage}-one-node"
            torchrun(*argv[stage](out), timeout=300)
            refs[stage] = result(stage, out)
            assert len(refs[stage][0]) == 2
        return argv[stage], refs[stage], work

    return get


@pytest.mark.parametrize("stage", ["sft", "grpo"])
def test_two_nodes_equal_one_node(runs, stage):
    argv, ref, work = runs(stage)
    out, tag = work / f"{stage}-two-nodes", f"{stage}-two-nodes"
    procs = start_nodes(argv(out), work, tag)
    try:
        wait_nodes(procs, work, tag)
    finally:
        for p in procs:
            kill_node(p)
    got = result(stage, out)
    assert got[0] == ref[0]
    assert got[1] == ref[1], "final weights differ"


@pytest.mark.parametrize("stage", ["sft", "grpo"])
def test_killed_node_fails_the_job_and_resume_auto_equals_one_node(runs, stage):
    argv, ref, work = runs(stage)
    out, tag = work / f"{stage}-killed", f"{stage}-killed"
    procs = start_nodes(argv(out), work, tag)
    started = list(procs)
    try:
        # wait until the step-1 checkpoint is complete (renamed with its COMPLETE marker), then kill node 1 at once
        marker = out / "ckpt" / "step_000001" / "COMPLETE"
        deadline = time.time() + 300
        while not marker.exists():
            assert all(p.poll() is None for p in procs), f"a node ended before the first checkpoint:\n" \
                f"{_log(work, tag, 0)}\n{_log(work, tag, 1)}"
            assert time.time() < deadline, "no checkpoint after 300 s"
            time.sleep(0.02)
        kill_node(procs[1])
        t = time.time()
        # the survivor must fail, not hang: gloo sees the closed connection, --timeout_s 60 bounds the rest
        try:
            rc = procs[0].wait(timeout=180)
        except subprocess.TimeoutExpired:
            fail_with_stacks(procs, work, tag, "node 0 still runs 180 s after node 1 was killed")
        seconds = time.time() - t
        assert rc != 0, f"node 0 finished the run before node 1 was killed:\n{_log(work, tag, 0)}"
        print(f"{stage}: node 0 failed {seconds:.1f} s after node 1 was killed (exit {rc})")
        assert seconds < 120, seconds
        procs = start_nodes([*argv(out), "--resume", "auto"], work, tag + "-resumed")
        started += procs
        wait_nodes(procs, work, tag + "-resumed")
    finally:
        for p in started:
            kill_node(p)
    assert any("resumed from" in (work / f"{tag}-resumed-node{n}.log").read_text() for n in (0, 1))  # rank 0 says so
    got = result(stage, out)
    assert got[0] == ref[0]
    assert got[1] == ref[1], "final weights differ"
