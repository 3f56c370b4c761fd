"""The pieces both training loops use, stage 1 (train.py) and stage 2 (tasks/finetune.py): the run folder,
batch geometry, backend set-up with optimizer and schedule, autocast, backward, the optimizer step with its
non-finite check, preemption, and the end-of-step block (agree -> checkpoint -> stop). Each loop's own step
stays in its own file."""

from __future__ import annotations

import fcntl
import json
import math
import os
import signal
import socket
import sys
import time
from pathlib import Path

import torch
from torch import nn

from mtllm_train.checkpoint import Checkpoints
from mtllm_train.config import Config, ConfigError, dump_config, flat_settings, load_config
from mtllm_train.distributed import Dist, all_reduce, deepspeed_engine, wrap_model
from mtllm_train.files import write_atomic
from mtllm_train.metrics import MetricsLogger
from mtllm_train.model.stack import trainable_parameters
from mtllm_train.optim import build_optimizer, build_scheduler


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient norm: the step was not applied and the run stops."""


TASK_FILE = "task.json"  # what a stage-2 run is: command, kind of model (and where it started from)


def run_identity(run_dir: Path) -> dict | None:
    """The identity a stage-2 run folder records (None for a stage-1 run or an empty folder)."""
    path = run_dir / TASK_FILE
    return json.loads(path.read_text()) if path.is_file() else None


LOCK_FILE = ".lock"
_held_locks: dict[Path, int] = {}  # run folder -> the open lock file of this process (released when it exits)
# Settings a resumed run may change: how it logs, checkpoints and waits, and how fast it computes; every other
# setting shapes the trajectory the checkpoints belong to.
MAY_CHANGE_ON_RESUME = ("run.dir", "logging.", "checkpoint.every", "checkpoint.keep_last", "distributed.timeout_minutes",
                        "model.compile", "model.activation_checkpointing", "data.skip_bad_samples", "data.pad_multiple", "data.eval_", "probe.", "task.cache_dir",
                        "task.cache_teacher", "task.eval_batch_size")


def check_resume_settings(cfg: Config, run_dir: Path) -> None:
    """A run folder with checkpoints resumes them: refuse settings that differ from the ones they were trained
    with (config.yaml), except MAY_CHANGE_ON_RESUME."""
    if not (run_dir / "config.yaml").is_file() or not Checkpoints(run_dir).complete():
        return
    trained, given = flat_settings(load_config(run_dir / "config.yaml")), flat_settings(cfg)
    changed = [key for key in given if given[key] != trained.get(key) and not key.startswith(MAY_CHANGE_ON_RESUME)]
    if changed:
        key = changed[0]
        more = f" (and {', '.join(changed[1:])})" if len(changed) > 1 else ""
        raise ConfigError(f"{key}: the checkpoints in {run_dir} were trained with {trained.get(key)!r}, this command "
                          f"gives {given[key]!r}{more}; a resumed run keeps its settings (drop the override, or start a "
                          f"new run.name)")


def lock_run_folder(run_dir: Path, dist_info: Dist) -> None:
    """One trainer per run folder: rank 0 holds an exclusive flock on RUN/.lock until its process ends (also
    when it crashes); every rank learns whether it got it."""
    holder = ""
    if dist_info.is_main and run_dir.resolve() not in _held_locks:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
        else:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"host {socket.gethostname()}, pid {os.getpid()}, since "
                          f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
            _held_locks[run_dir.resolve()] = fd
    taken_elsewhere = all_reduce(torch.tensor(float(bool(holder)), device=dist_info.device),
                                 torch.distributed.ReduceOp.MAX)
    if taken_elsewhere.item():
        raise ConfigError(f"run folder {run_dir} is in use by another trainer ({holder or 'see rank 0'}); wait for it "
                          f"to end, or give this run its own run.name")


def open_run_folder(cfg: Config, dist_info: Dist, identity: dict | None = None) -> Path:
    """The run folder, ready for this run: locked for this trainer, refused when it holds another kind of run or
    checkpoints trained with other settings; then the resolved config (and a stage-2 run's `identity`) is
    written, and this rank's dropout stream seeded (restored on resume)."""
    run_dir = Path(cfg.run.dir) / cfg.run.name
    lock_run_folder(run_dir, dist_info)
    existing = run_identity(run_dir)
    if identity is None and existing is not None:
        raise ConfigError(f"run folder {run_dir} holds a stage-2 run; give this stage-1 run its own run.name")
    if identity is not None and (run_dir / "config.yaml").is_file():
        if existing is None:
            raise ConfigError(f"run folder {run_dir} holds a stage-1 run; give this stage-2 run its own run.name")
        if (existing["command"], existing["kind"]) != (identity["command"], identity["kind"]):
            raise ConfigError(f"run folder {run_dir} holds a {existing['command']} run of the {existing['kind']}; "
                              f"this is {identity['command']} of the {identity['kind']}: give it its own run.name")
    check_resume_settings(cfg, run_dir)
    if dist_info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / "config.yaml")
        if identity is not None:
            write_atomic(run_dir / TASK_FILE, json.dumps(identity, indent=1))
    torch.manual_seed(cfg.run.seed * 1000 + dist_info.rank)
    return run_dir


def autocast(cfg: Config, device: torch.device):
    """bf16 autocast on GPU when distributed.mixed_precision is bf16; a no-op context otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16,
                          enabled=device.type == "cuda" and cfg.distributed.mixed_precision == "bf16")


def due(every: int, step: int, total_steps: int) -> bool:
    """Whether something done every `every` steps and after the last (0: never) is due after step `step`."""
    return bool(every) and (step % every == 0 or step == total_steps)


def resume_line(checkpoint: Path, step: int, total_steps: int) -> str:
    """What a resumed run says: where it goes on, or that it had finished (rerunning a finished run trains
    nothing)."""
    if step >= total_steps:
        return f"already finished: the run trained its {total_steps} steps (checkpoint {checkpoint}); nothing to do"
    return f"resumed from {checkpoint} at step {step}"


def new_summary(run_dir: Path, dist_info: Dist, start_step: int, total_steps: int) -> dict:
    """What a loop returns: its steps, losses and whether it was preempted (the CLI prints it)."""
    return {"start_step": start_step, "end_step": start_step, "total_steps": total_steps, "losses": [],
            "preempted": False, "run_dir": str(run_dir), "is_main": dist_info.is_main}


class Preemption:
    """SIGTERM / SIGUSR1, or a STOP file in the run folder, only set a flag; the ranks act on it together at
    the next step boundary. (The file is for schedulers that cannot signal the trainer processes themselves:
    launch/slurm_multinode.sbatch touches it shortly before the time limit.) The first Ctrl-C (SIGINT) is the
    same request, said in one line; a second one stops at once (KeyboardInterrupt: the CLI says so in one line,
    and the newest checkpoint is where a rerun resumes)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self, stop_file: Path, is_main: bool):
        self.stop_file, self.is_main = stop_file, is_main

    def __enter__(self) -> Preemption:
        self.requested = False
        self.previous = {signum: signal.signal(signum, self._request) for signum in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _request(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            if self.requested:
                raise KeyboardInterrupt
            if self.is_main:
                print("Ctrl-C: the run saves a checkpoint at the end of this step and stops (Ctrl-C again: stop now, "
                      "losing the steps since the newest checkpoint)", file=sys.stderr, flush=True)
        self.requested = True

    def agreed(self, device: torch.device) -> bool:
        requested = self.requested or (self.is_main and self.stop_file.exists())
        flag = torch.tensor(float(requested), device=device)
        return bool(all_reduce(flag, torch.distributed.ReduceOp.MAX).item())

    def served(self) -> None:
        """The run saved and stops: a requeued job must run on, so the STOP file goes."""
        if self.is_main:
            self.stop_file.unlink(missing_ok=True)


def accumulation_steps(cfg: Config, world_size: int) -> int:
    per_step = cfg.data.micro_batch_size * world_size
    if cfg.train.global_batch_size % per_step:
        raise ConfigError(f"train.global_batch_size {cfg.train.global_batch_size} is not a multiple of "
                          f"data.micro_batch_size {cfg.data.micro_batch_size} x world size {world_size} = {per_step}")
    return cfg.train.global_batch_size // per_step


def setup_backend(module: nn.Module, cfg: Config, dist_info: Dist, accumulation: int, total_steps: int, *,
                  sharded: nn.Module, replicated: list[nn.Module]):
    """Wrap `module` for the backend and build its optimizer and schedule over the trainable parameters.

    FSDP shards each layer of `sharded`; the `replicated` modules (frozen encoder, teacher) stay whole on every rank.
    Returns (model, optimizer, scheduler, trainable parameters).
    """
    backend = cfg.distributed.backend
    if backend == "deepspeed":
        optimizer = build_optimizer(trainable_parameters(module), cfg.optim)
        model = deepspeed_engine(module, optimizer, lambda opt: build_scheduler(opt, cfg.optim, total_steps), cfg,
                                 accumulation)
        optimizer, scheduler = model.optimizer, model.lr_scheduler
    else:
        model = wrap_model(module, cfg, dist_info, sharded, replicated)
        optimizer = build_optimizer(trainable_parameters(module), cfg.optim)  # after wrapping: FSDP2 made DTensors
        scheduler = build_scheduler(optimizer, cfg.optim, total_steps)
    return model, optimizer, scheduler, list(trainable_parameters(module).values())


def end_of_step(step: int, save_due: bool, *, preemption: Preemption, checkpoints: Checkpoints,
                logger: MetricsLogger, summary: dict, device: torch.device, keep_last: int,
                keep_steps: set[int] | None = None, reader_state: dict | None = None,
                keep_best: int | None = None) -> bool:
    """After optimizer step `step`: the ranks agree on preemption, save when due or preempted, and on
    preemption clear the STOP file and say so. Returns True when the loop must stop."""
    preempted = preemption.agreed(device)
    if (save_due or preempted) and not checkpoints.state_is_finite():
        raise NonFiniteError(f"step {step}: trainable weights or optimizer state are not finite (optim.lr too high?); "
                             f"not saved: a rerun resumes from the newest checkpoint")
    if save_due or preempted:
        checkpoints.save(step, meta={"wandb_id": logger.wandb_id}, keep_last=keep_last, keep_steps=keep_steps,
                         reader_state=reader_state, keep_best=keep_best)
    if preempted:
        preemption.served()
        logger.message(f"preempted: saved step {step}; rerun the same command to resume")
        summary["preempted"] = True
    return preempted


def backward(model, loss: torch.Tensor, backend: str, last: bool) -> None:
    if backend == "deepspeed":
        model.backward(loss, scale_wrt_gas=False)
        if not last:
            model.step()  # DeepSpeed counts micro-steps; it applies the update only at the boundary
    else:
        loss.backward()


def optimizer_step(model, optimizer, scheduler, trainable: list, backend: str, grad_clip: float, step: int) -> float:
    """Clip, check and apply one update; returns the gradient norm. A non-finite norm stops the run unapplied."""
    if backend == "deepspeed":
        model.step()
        grad_norm = float(model.get_global_grad_norm() or 0.0)
    else:
        max_norm = grad_clip if grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    if not math.isfinite(grad_norm):
        # DeepSpeed applies the update before it reports the norm (it skips steps only with fp16 loss scaling);
        # either way nothing from this step is saved.
        applied = "DeepSpeed applied the step; it is not saved" if backend == "deepspeed" else "the step was not applied"
        raise NonFiniteError(f"step {step}: the gradient norm is {grad_norm}; {applied}")
    if backend != "deepspeed":
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return grad_norm


def check_finite_loss(loss_value: float, step: int) -> None:
    if not math.isfinite(loss_value):
        raise NonFiniteError(f"step {step}: the loss is {loss_value}; the step was not applied")
