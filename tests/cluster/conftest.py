"""A one-node SLURM for the launch tests: Debian's slurmctld, slurmd and munged, installed with apt-get and
started on this host with their config, key, state and spool under a temporary folder. Teardown cancels the
cluster's jobs and stops exactly the daemons started here."""

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def free_ports(count: int) -> list[int]:
    """`count` different ports that nothing listens on (bound at the same time, so they differ)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _checked(command: list[str], **kwargs) -> str:
    done = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}:\n{done.stdout}{done.stderr}")
    return done.stdout


def _install() -> None:
    if all(shutil.which(name) for name in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    try:
        _checked(install, env=env)
    except RuntimeError:  # a fresh machine may have no package lists yet
        _checked(["apt-get", "update", "-q"], env=env)
        _checked(install, env=env)


class Slurm:
    """The running cluster: the environment its clients need (SLURM_CONF) and the calls the tests make."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.env = {**os.environ, "SLURM_CONF": str(folder / "slurm.conf")}

    def run(self, *command: str, **kwargs) -> str:
        return _checked(list(command), env={**self.env, **kwargs.pop("env", {})}, **kwargs)

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as {field: value} (right for the fields without spaces: state, reason, restarts...)."""
        return dict(field.split("=", 1) for field in self.run("scontrol", "-o", "show", "job", job_id).split()
                    if "=" in field)

    def wait(self, job_id: str, done, timeout: float = 300) -> dict:
        """Poll the job until `done(fields)`, a final state or the timeout; return its fields."""
        deadline = time.monotonic() + timeout
        while True:
            fields = self.job(job_id)
            if done(fields) or fields["JobState"] in FINAL_STATES or time.monotonic() > deadline:
                return fields
            time.sleep(0.5)

    def until(self, ready, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what}: not ready after {timeout} s\n{self.logs()}")
            time.sleep(0.2)

    def logs(self) -> str:
        """The ends of the daemons' logs, for failure messages."""
        return "".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in sorted(self.folder.glob("*.log")))

    def node_idle(self) -> bool:
        done = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True)
        return done.stdout.strip() == "idle"  # sinfo fails until slurmctld answers

    def cancel_jobs(self) -> None:
        """Cancel what a failed test left in the queue and wait until it is gone."""
        jobs = self.run("squeue", "-h", "-o", "%i").split()
        if jobs:
            self.run("scancel", *jobs)
            self.until(lambda: not self.run("squeue", "-h", "-o", "%i").split(), "job cancellation")


def _config(folder: Path, munge_socket: Path) -> str:
    # slurmd -C: this host's name, CPUs, sockets, cores and memory, as slurmd will find them.
    node = _checked(["slurmd", "-C"]).splitlines()[0]
    host = node.split()[0].removeprefix("NodeName=")
    controller_port, node_port = free_ports(2)
    return "\n".join([
        "ClusterName=mtllm-test",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={controller_port}",
        f"SlurmdPort={node_port}",
        # SLURM holds a requeued job until the credential of its earlier run has expired: 10 s here, not 120.
        f"AuthInfo=socket={munge_socket},cred_expire=10",
        f"StateSaveLocation={folder / 'state'}",
        f"SlurmdSpoolDir={folder / 'spool'}",
        f"SlurmctldPidFile={folder / 'slurmctld.pid'}",
        f"SlurmdPidFile={folder / 'slurmd.pid'}",
        f"SlurmctldLogFile={folder / 'slurmctld.log'}",
        f"SlurmdLogFile={folder / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc",  # the default, proctrack/cgroup, needs a cgroup set-up
        "TaskPlugin=task/affinity",
        "SelectType=select/cons_tres",  # the one that knows --gpus-per-node
        "JobRequeue=1",
        "KillWait=10",  # what a failed test leaves running is killed 10 s after SIGTERM, not 30
        f"{node} NodeAddr=127.0.0.1 State=UNKNOWN",
        "PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        "",
    ])


@pytest.fixture(scope="module")
def slurm():
    if os.geteuid() != 0:
        reason = "needs root: installs Debian's slurm-wlm and munge with apt-get and runs their daemons"
    elif not shutil.which("apt-get"):
        reason = "needs apt-get to install Debian's slurm-wlm and munge"
    else:
        reason = None
    if reason:
        if os.environ.get("MTLLM_CLUSTER_TESTS_REQUIRED") == "1":  # set by .ci/run: there a skip is a failure
            pytest.fail(f"the SLURM tests cannot run: {reason}")
        pytest.skip(reason)
    _install()

    # munged refuses a socket in a folder that not everyone may enter (mkdtemp makes it 0700).
    folder = Path(tempfile.mkdtemp(prefix="mtllm-slurm-"))
    folder.chmod(0o755)
    for name in ("munge", "state", "spool"):
        (folder / name).mkdir(mode=0o700)
    key, munge_socket = folder / "munge" / "munge.key", folder / "munge.socket"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    (folder / "slurm.conf").write_text(_config(folder, munge_socket))
    cluster = Slurm(folder)
    daemons = []
    try:
        daemons.append(subprocess.Popen(
            ["munged", "--foreground", f"--socket={munge_socket}", f"--key-file={key}",
             f"--pid-file={folder / 'munge' / 'munged.pid'}", f"--seed-file={folder / 'munge' / 'munged.seed'}",
             f"--log-file={folder / 'munged.log'}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        cluster.until(munge_socket.exists, "munged")
        for daemon in ("slurmctld", "slurmd"):
            daemons.append(subprocess.Popen([daemon, "-D"], env=cluster.env, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL))
        cluster.until(cluster.node_idle, "the SLURM node")
        try:
            yield cluster
        finally:
            cluster.cancel_jobs()
    finally:
        for daemon in reversed(daemons):
            daemon.terminate()
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        shutil.rmtree(folder)
