"""The run folder RUN = run.dir/run.name: every file in it is named here, and the other modules ask this one.

RUN/
    config.yaml         the resolved settings of the newest launch (for people: the checkpoints' own record decides)
    task.json           a stage-2 run's identity: command, kind of model (and where it started from)
    .lock               one trainer at a time (a POSIX record lock held by rank 0's process; see lock_run_folder)
    STOP                a preemption request (schedulers touch it; the ranks checkpoint at the step's end and exit 0)
    metrics.jsonl       one record per logged step (metrics.MetricsLogger)
    loss_curve.png      the run's plot
    checkpoints/        (checkpoint.Checkpoints)
    probe_best.json     stage 1: the probe's best step (probe.BitextProbe)
    validation.jsonl    stage 2: dev scores per validated step (tasks/selection.py)
    results/            stage 2: test scores of the selected checkpoints, per row (ROW.json, ROW.md)
    stage1_projection.safetensors, translations/, teacher_cache/    stage 2's frozen U, translate-test and teacher caches
    stage1_lora.safetensors  stage 2 with task.stage1_lora merge: the stage-1 LoRA merged into the frozen LLM
    export/             `mtllm export`'s default destination
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

import torch

from mtllm_train.checkpoint import Checkpoints
from mtllm_train.config import Config, ConfigError, dump_config, flat_settings, from_dict, load_config, validate
from mtllm_train.distributed import Dist, agree_or_stop, all_reduce
from mtllm_train.files import pid_alive, write_atomic
from mtllm_train.metrics import read_records

# Settings a resumed run may change: how it logs, checkpoints and waits, and how fast it computes; every other
# setting shapes the trajectory the checkpoints belong to.
MAY_CHANGE_ON_RESUME = ("run.dir", "logging.", "checkpoint.every", "checkpoint.keep_last", "distributed.timeout_minutes",
                        "model.compile", "model.activation_checkpointing", "data.skip_bad_samples", "data.pad_multiple",
                        "data.eval_", "probe.", "task.cache_dir", "task.cache_teacher", "task.eval_batch_size")


class RunFolder:
    """The paths of a run folder's files, and reading the ones other modules need."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.name = self.path.name
        self.config_file = self.path / "config.yaml"
        self.task_file = self.path / "task.json"
        self.lock_file = self.path / ".lock"
        self.stop_file = self.path / "STOP"
        self.metrics_file = self.path / "metrics.jsonl"
        self.plot_file = self.path / "loss_curve.png"
        self.probe_best_file = self.path / "probe_best.json"
        self.validation_file = self.path / "validation.jsonl"
        self.results_dir = self.path / "results"
        self.projection_file = self.path / "stage1_projection.safetensors"
        self.stage1_lora_file = self.path / "stage1_lora.safetensors"
        self.translations_dir = self.path / "translations"
        self.teacher_cache_dir = self.path / "teacher_cache"
        self.export_dir = self.path / "export"

    def __str__(self) -> str:
        return str(self.path)

    def __fspath__(self) -> str:  # Path(run), open(run / ...) and RunFolder(run) take a RunFolder too
        return str(self.path)

    def settings(self, what: str = "--run", hint: str = "") -> Config:
        """The settings the run trained with: the newest complete checkpoint's own record (an edited or deleted
        config.yaml can neither change nor break a run), else config.yaml (a run with no checkpoint yet, or
        checkpoints written before they recorded their settings)."""
        recorded = checkpoint_settings(self.path)
        if recorded is not None:
            return recorded
        if not self.config_file.is_file():
            raise ConfigError(f"{what} {self.path}: not a run folder (no config.yaml){hint}")
        return load_config(self.config_file)

    def identity(self) -> dict | None:
        """The identity a stage-2 run records (None for a stage-1 run or an empty folder)."""
        return json.loads(self.task_file.read_text()) if self.task_file.is_file() else None

    def write_identity(self, identity: dict) -> None:
        write_atomic(self.task_file, json.dumps(identity, indent=1))

    def metrics(self, up_to_step: int | None = None) -> list[dict]:
        """metrics.jsonl's records (none if it does not exist), up to a step when given."""
        records = read_records(self.metrics_file) if self.metrics_file.is_file() else []
        return [r for r in records if up_to_step is None or r["step"] <= up_to_step]

    def results(self) -> dict[str, dict]:
        """Stage 2's results per row (what `mtllm evaluate` wrote)."""
        if not self.results_dir.is_dir():
            return {}
        return {path.stem: json.loads(path.read_text()) for path in sorted(self.results_dir.glob("*.json"))}

    def write_result(self, row: str, result: dict, markdown: str) -> Path:
        self.results_dir.mkdir(exist_ok=True)
        write_atomic(self.results_dir / f"{row}.json", json.dumps(result, indent=1))
        write_atomic(self.results_dir / f"{row}.md", markdown)
        return self.results_dir / f"{row}.md"


def checkpoint_settings(run_dir: Path) -> Config | None:
    """The settings recorded by the newest complete checkpoint (None: no checkpoint, or one from before)."""
    complete = Checkpoints(run_dir).complete()
    if not complete:
        return None
    try:
        recorded = json.loads((complete[-1][1] / "meta.json").read_text()).get("config")
    except (OSError, ValueError):
        return None  # a damaged checkpoint: resume finds a sound one and says so
    return validate(from_dict(Config, recorded)) if isinstance(recorded, dict) else None


def check_resume_settings(cfg: Config, run: RunFolder) -> None:
    """A run folder with checkpoints resumes them: refuse settings that differ from the ones they were trained
    with (their own record; config.yaml for older checkpoints), except MAY_CHANGE_ON_RESUME."""
    if not Checkpoints(run.path).complete():
        return
    recorded = checkpoint_settings(run.path)
    if recorded is None:
        if not run.config_file.is_file():
            return
        recorded = load_config(run.config_file)
    trained, given = flat_settings(recorded), flat_settings(cfg)
    changed = [key for key in given if given[key] != trained.get(key) and not key.startswith(MAY_CHANGE_ON_RESUME)]
    if changed:
        key = changed[0]
        more = f" (and {', '.join(changed[1:])})" if len(changed) > 1 else ""
        raise ConfigError(f"{key}: the checkpoints in {run} were trained with {trained.get(key)!r}, this command "
                          f"gives {given[key]!r}{more}; a resumed run keeps its settings (drop the override, or start a "
                          f"new run.name)")


_held_locks: dict[Path, int] = {}  # run folder -> the open lock file of this process (released when it exits)
_created: set[Path] = set()  # run folders this process created (a run refused before its first step removes them)
NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)  # a file system without record locks


def _holder_note(holder: str) -> str:
    """The lock holder's line, with whether that process still runs when it is on this machine."""
    host, _, rest = holder.partition(", pid ")
    pid = rest.split(",")[0]
    if host.removeprefix("host ") != socket.gethostname() or not pid.isdigit():
        return holder
    if pid_alive(int(pid)):
        return f"{holder}; running"
    return f"{holder}; that process has ended, a process it started holds the lock"


def in_use_line(run: RunFolder, holder: str) -> str:
    return (f"run folder {run} is in use by another trainer ({_holder_note(holder)}); wait for it to end, or give "
            f"this run its own run.name")


def lock_holder(run: RunFolder) -> str | None:
    """Who holds RUN/.lock now, or None: the lock is taken and released at once (for a process that does not
    hold it: closing any descriptor of the file releases this process's record locks)."""
    if not run.lock_file.is_file():
        return None
    fd = os.open(run.lock_file, os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        return None if err.errno in NO_LOCKS else os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
    finally:
        os.close(fd)
    return None


def _take_lock(run: RunFolder) -> str:
    """Rank 0's part: "" when this process holds the lock now, else why not."""
    try:
        if not run.path.exists():
            _created.add(run.path.resolve())
        run.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(run.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:  # a read-only run.dir, a full disk: said on every rank, before anything else
        return f"run folder {run}: cannot create it ({err.strerror}); give run.dir a folder this job can write"
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if err.errno in NO_LOCKS:
            print(f"{run.lock_file}: this file system does not lock files ({os.strerror(err.errno)}); the run goes "
                  f"on unlocked: keep one trainer per run.name", file=sys.stderr, flush=True)
            return ""
        if err.errno not in (errno.EACCES, errno.EAGAIN):
            raise
        return in_use_line(run, holder)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"host {socket.gethostname()}, pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
              .encode(), 0)
    _held_locks[run.path.resolve()] = fd
    return ""


def lock_run_folder(run: RunFolder, dist_info: Dist) -> None:
    """One trainer per run folder: rank 0 holds a POSIX record lock on RUN/.lock until its process ends, also when
    it is killed. A record lock (unlike flock) is not inherited by forked processes, so loader workers outliving a
    killed trainer cannot hold it. Every rank learns whether rank 0 got it. On a file system without locks (Lustre
    mounted without flock) the run says so in one line and goes on unlocked."""
    problem = ""
    if dist_info.is_main and run.path.resolve() not in _held_locks:
        problem = _take_lock(run)
    failed = all_reduce(torch.tensor(float(bool(problem)), device=dist_info.device), torch.distributed.ReduceOp.MAX)
    if failed.item():
        raise ConfigError(problem or f"run folder {run}: rank 0 could not take it (its error says why); stopping")


def discard_if_unused(run_dir: Path) -> None:
    """A run refused before its first step leaves nothing behind: the folder this process created, holding only
    what opening it wrote (the lock, the config, a stage-2 identity), is removed and its lock released."""
    path = run_dir.resolve()
    run = RunFolder(path)
    if path not in _created or not path.is_dir():
        return
    if any(entry.name not in (run.lock_file.name, run.config_file.name, run.task_file.name) for entry in path.iterdir()):
        return  # it trained (metrics, checkpoints) or holds what a user put there
    for name in (run.config_file, run.task_file, run.lock_file):
        name.unlink(missing_ok=True)
    if path in _held_locks:
        os.close(_held_locks.pop(path))
    path.rmdir()
    _created.discard(path)


def open_run_folder(cfg: Config, dist_info: Dist, identity: dict | None = None) -> RunFolder:
    """The run folder, ready for this run: locked for this trainer, refused when it holds another kind of run or
    checkpoints trained with other settings; then the resolved config (and a stage-2 run's `identity`) is
    written, and this rank's dropout stream seeded (restored on resume)."""
    run = RunFolder(Path(cfg.run.dir) / cfg.run.name)
    lock_run_folder(run, dist_info)
    existing = run.identity()
    if identity is None and existing is not None:
        raise ConfigError(f"run folder {run} holds a stage-2 run; give this stage-1 run its own run.name")
    if identity is not None and run.config_file.is_file():
        if existing is None:
            raise ConfigError(f"run folder {run} holds a stage-1 run; give this stage-2 run its own run.name")
        if (existing["command"], existing["kind"]) != (identity["command"], identity["kind"]):
            raise ConfigError(f"run folder {run} holds a {existing['command']} run of the {existing['kind']}; "
                              f"this is {identity['command']} of the {identity['kind']}: give it its own run.name")
    check_resume_settings(cfg, run)
    error = None
    if dist_info.is_main:
        try:
            dump_config(cfg, run.config_file)
            if identity is not None:
                run.write_identity(identity)
        except OSError as err:
            error = ConfigError(f"run folder {run}: cannot write {err.filename or run.config_file} ({err.strerror}); "
                                f"nothing was trained")
    agree_or_stop([], error, dist_info.device, "write the run folder")
    torch.manual_seed(cfg.run.seed * 1000 + dist_info.rank)
    return run
