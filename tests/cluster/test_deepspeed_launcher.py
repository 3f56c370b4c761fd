"""launch/deepspeed_launch.sh for real: the DeepSpeed launcher with a hostfile naming localhost (2 slots), ZeRO-3
on CPU."""

import subprocess
import sys
from pathlib import Path

from cluster.conftest import free_ports
from conftest import ROOT, read_metrics, train_overrides, trained_weights
from helpers import subprocess_env

STEPS = 12


def test_deepspeed_launcher_trains_on_the_nodes_of_a_hostfile(tmp_path, train_shards):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    (port,) = free_ports(1)
    # NODE_RANK + MASTER_ADDR: DeepSpeed's launch without ssh (it would ssh even to localhost to check a
    # hostfile); `distributed.deepspeed_config=` drops the script's bf16 json, which is for GPUs.
    env = subprocess_env()
    env.update(PATH=f"{Path(sys.executable).parent}:{env['PATH']}", HOSTFILE=str(hostfile), ZERO="3", NODE_RANK="0",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    overrides = train_overrides(tmp_path, train_shards, **{"run.name": "ds", "train.steps": STEPS,
                                                           "data.num_workers": 1})
    done = subprocess.run(["bash", "launch/deepspeed_launch.sh", "configs/tiny.yaml", *overrides,
                           "distributed.deepspeed_config="],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "dist_world_size=2" in output and f"steps 0 -> {STEPS} of {STEPS} " in output, output[-3000:]
    losses = [m["loss"] for m in read_metrics(tmp_path / "ds")]
    assert len(losses) == STEPS and sum(losses[-3:]) < 0.6 * sum(losses[:3]), losses
    # ZeRO-3 partitions the parameters over the 2 ranks; the checkpoint still holds them whole.
    assert trained_weights(tmp_path / "ds")["projection.weight"].shape == (64, 64)
