"""launch/slurm_multinode.sbatch under a real SLURM (the `slurm` fixture), on the tiny config on CPU: SLURM's USR1
before the time limit -> STOP -> every rank checkpoints and exits 0 -> the job requeues itself -> the requeued
job resumes -> the result is bit-identical to an uninterrupted run."""

import re
import subprocess
import sys
import time
from datetime import datetime

import torch

from cluster.conftest import free_ports
from conftest import ROOT, read_metrics, train_overrides, trained_weights
from helpers import finish, subprocess_env

# Enough steps that the trainers are still at work when USR1 comes: SLURM checks time limits every 30 s and
# signals at the first check less than 85 + 30 s before the 2-minute limit, 5 to 35 s after the job starts.
STEPS = 1200
SIGNAL = ["--time", "2", "--signal", "B:USR1@85"]
# Only the preemption's checkpoint and the last one, so both stay (checkpoint.keep_last is 2).
SETTINGS = {"distributed.backend": "ddp", "train.steps": STEPS, "checkpoint.every": STEPS, "data.num_workers": 1}


def test_preempted_job_requeues_itself_resumes_and_matches_an_uninterrupted_run(slurm, tmp_path, train_shards):
    env = {**subprocess_env(), "PYTHON": sys.executable}
    # The uninterrupted run, through the single-node launcher, meanwhile: sharing the 2 cores slows the job's
    # trainers too, which keeps them at work until the signal comes.
    straight = subprocess.Popen(
        ["bash", "launch/torchrun_single_node.sh", "configs/tiny.yaml",
         *train_overrides(tmp_path, train_shards, **SETTINGS, **{"run.name": "straight"})],
        cwd=ROOT, env={**env, "NPROC": "2"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    # What a CPU node needs comes from sbatch options and the environment; the script is the shipped one.
    log = tmp_path / "job.out"
    (rdzv_port,) = free_ports(1)
    job = slurm.run(
        "sbatch", "--parsable", "--nodes", "1", "--gpus-per-node", "0", "--cpus-per-task", "2", *SIGNAL,
        "--output", str(log), "launch/slurm_multinode.sbatch", "configs/tiny.yaml",
        *train_overrides(tmp_path, train_shards, **SETTINGS, **{"run.name": "slurm"}),
        cwd=ROOT, env={**env, "GPUS_PER_NODE": "2", "RDZV_PORT": str(rdzv_port)}).strip()

    # Requeued, the job is held until the credential of its first run has expired (cred_expire, 10 s here; a start
    # before that can fail to launch), then until the scheduler's next periodic pass. Start it right after the
    # hold, with a longer limit so that the resumed trainers finish before another USR1 (on a real cluster the
    # job requeues as often as it must).
    fields = slurm.wait(job, lambda fields: fields["Restarts"] == "1" and fields["JobState"] == "PENDING")
    assert fields["JobState"] == "PENDING", f"not requeued: {fields['JobState']}\n{log.read_text()}"
    eligible = datetime.fromisoformat(fields["EligibleTime"])
    time.sleep(max(0.0, (eligible - datetime.now()).total_seconds()) + 1)
    slurm.run("scontrol", "update", f"jobid={job}", "StartTime=now", "TimeLimit=10")
    fields = slurm.wait(job, lambda fields: False)
    text = log.read_text()
    assert (fields["JobState"], fields["ExitCode"], fields["Restarts"]) == ("COMPLETED", "0:0", "1"), (
        text + slurm.logs())

    # The job log tells each step, in order.
    preempted = re.search(r"preempted: saved step (\d+)", text)
    assert preempted, text
    stopped = int(preempted[1])
    steps = [f"[slurm] job {job} (start 1): 1 node(s) x 2 processes, train configs/tiny.yaml",
             "[slurm] USR1: the time limit is near; asking the trainers to checkpoint",
             f"preempted: saved step {stopped}; rerun the same command to resume",
             f"[slurm] the trainers checkpointed and exited 0; requeueing job {job}",
             f"[slurm] job {job} (start 2)",
             f"resumed from {tmp_path}/slurm/checkpoints/step_{stopped:08d} at step {stopped}",
             f"steps {stopped} -> {STEPS} of {STEPS} ",
             f"[slurm] job {job}: the trainers exited with status 0"]
    positions = [text.find(step) for step in steps]
    assert -1 not in positions and positions == sorted(positions), text
    assert text.count("preempted:") == 1 and 1 <= stopped < STEPS, text
    # Every rank saved its part of the preemption's checkpoint; the STOP file is gone.
    saved = tmp_path / "slurm" / "checkpoints" / f"step_{stopped:08d}"
    assert all((saved / name).is_file() for name in ("COMPLETE", "rank_0.pt", "rank_1.pt"))
    assert not (tmp_path / "slurm" / "STOP").exists()

    code, output = finish(straight)
    assert code == 0, output[-3000:]
    losses = {name: [m["loss"] for m in read_metrics(tmp_path / name)] for name in ("slurm", "straight")}
    assert len(losses["slurm"]) == STEPS and losses["slurm"] == losses["straight"]
    resumed, uninterrupted = trained_weights(tmp_path / "slurm"), trained_weights(tmp_path / "straight")
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[name], uninterrupted[name]) for name in resumed), "resume must be bit-identical"
