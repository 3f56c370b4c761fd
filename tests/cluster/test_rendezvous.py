"""Two torchrun agents, one process each, joined by a c10d rendezvous on 127.0.0.1 as the SLURM script joins its
nodes: the same losses as one agent with 2 processes; a lost node stops the other within the process-group
timeout, and the pair resumes."""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import torch

from cluster.conftest import free_ports
from conftest import ROOT, read_metrics, train_overrides, trained_weights
from helpers import child_pids, finish, subprocess_env

STEPS = 160
TIMEOUT_MINUTES = 1
SETTINGS = {"distributed.backend": "ddp", "train.steps": STEPS, "checkpoint.every": 20, "data.num_workers": 1,
            "distributed.timeout_minutes": TIMEOUT_MINUTES}


def _agent(port: int, overrides: list[str]) -> subprocess.Popen:
    """One "node": the torchrun command launch/slurm_multinode.sbatch runs on each node, with 1 process."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "pair",
               "-m", "mtllm_train", "train", "--config", "configs/tiny.yaml", *overrides]
    return subprocess.Popen(command, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _pair(overrides: list[str]) -> tuple[subprocess.Popen, subprocess.Popen]:
    """Two agents; the first hosts the rendezvous store (it listens before the second starts), as the first node
    does under SLURM."""
    (port,) = free_ports(1)
    head = _agent(port, overrides)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert head.poll() is None and time.monotonic() < deadline, "the first agent did not open the rendezvous"
            time.sleep(0.1)
    return head, _agent(port, overrides)


def _lose_node(agent: subprocess.Popen) -> None:
    """SIGKILL the agent and everything below it (its worker runs in a session of its own), as when a node dies."""
    pids, index = [agent.pid], 0
    while index < len(pids):
        pids += child_pids(pids[index])
        index += 1
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


def test_two_agents_match_one_agent_survive_a_lost_node_and_resume(tmp_path, train_shards):
    one = subprocess.run(["bash", "launch/torchrun_single_node.sh", "configs/tiny.yaml",
                          *train_overrides(tmp_path, train_shards, **SETTINGS, **{"run.name": "one"})],
                         cwd=ROOT, env={**subprocess_env(), "NPROC": "2", "PYTHON": sys.executable},
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]

    overrides = train_overrides(tmp_path, train_shards, **SETTINGS, **{"run.name": "pair"})
    head, other = _pair(overrides)
    metrics = tmp_path / "pair" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 50):
        assert head.poll() is None and other.poll() is None, finish(head)[1][-3000:] + finish(other)[1][-3000:]
        assert time.monotonic() < deadline, "no 50 steps in 240 s"
        time.sleep(0.02)
    _lose_node(other)
    lost = time.monotonic()
    code, output = finish(head, timeout=TIMEOUT_MINUTES * 60 + 60)
    waited = time.monotonic() - lost
    finish(other)
    # The surviving rank's next collective finds the peer gone (gloo says how); torchrun names the failed worker.
    assert code != 0 and waited < TIMEOUT_MINUTES * 60, (code, waited)
    assert re.search(r"gloo/transport/tcp/pair.cc:\d+\] .*(closed by peer|reset by peer|Broken pipe)", output) and (
        "mtllm_train FAILED" in output), output[-3000:]

    # The same command again: the pair resumes from the newest complete checkpoint.
    head, other = _pair(overrides)
    (code, output), (other_code, other_output) = finish(head), finish(other)
    assert code == other_code == 0, output[-3000:] + other_output[-3000:]
    assert "resumed from" in output + other_output and f" -> {STEPS} of {STEPS} " in output + other_output

    # Every loss and the final weights are those of the one agent with 2 processes, bit for bit.
    assert [m["loss"] for m in read_metrics(tmp_path / "pair")] == [m["loss"] for m in read_metrics(tmp_path / "one")]
    pair, one = trained_weights(tmp_path / "pair"), trained_weights(tmp_path / "one")
    assert pair.keys() == one.keys() and all(torch.equal(pair[name], one[name]) for name in pair)
