"""The parts of a training loop that stage 1 (train.py) and stage 2 (tasks/finetune.py) share: batch geometry,
backend set-up with optimizer and schedule, resume, backward, the optimizer step with its non-finite check,
preemption."""

from __future__ import annotations

import math
import signal
from pathlib import Path

import torch
from torch import nn

from mtllm_train.checkpoint import complete_checkpoints, load_checkpoint
from mtllm_train.config import Config, ConfigError
from mtllm_train.distributed import Dist, all_reduce, deepspeed_engine, wrap_model
from mtllm_train.model.stack import trainable_parameters
from mtllm_train.optim import build_optimizer, build_scheduler


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient norm: the step was not applied and the run stops."""


class Preemption:
    """SIGTERM / SIGUSR1, or a STOP file in the run folder, only set a flag; the ranks act on it together at
    the next step boundary. (The file is for schedulers that cannot signal the trainer processes themselves:
    launch/slurm_multinode.sbatch touches it shortly before the time limit.)"""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

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


def resume(run_dir: Path, model, optimizer, scheduler, backend: str, dist_info: Dist) -> tuple[Path, dict, dict] | None:
    """Restore the newest complete checkpoint: (its path, meta, this rank's reader state), or None."""
    checkpoints = complete_checkpoints(run_dir)
    if not checkpoints:
        return None
    path = checkpoints[-1][1]
    meta, reader_state = load_checkpoint(path, model=model, optimizer=optimizer,
                                         scheduler=None if backend == "deepspeed" else scheduler, backend=backend,
                                         dist_info=dist_info)
    return path, meta, reader_state


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
        raise NonFiniteError(f"step {step}: the gradient norm is {grad_norm}; the step was not applied")
    if backend != "deepspeed":
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return grad_norm


def check_finite_loss(loss_value: float, step: int) -> None:
    if not math.isfinite(loss_value):
        raise NonFiniteError(f"step {step}: the loss is {loss_value}; the step was not applied")
