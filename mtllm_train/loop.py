"""The step mechanics both training loops use, stage 1 (train.py) and stage 2 (tasks/finetune.py): batch
geometry, backend set-up with optimizer and schedule, autocast, backward, the optimizer step with its non-finite
check, preemption, and the end-of-step block (agree -> checkpoint -> stop). The run folder is run_folder.py's;
each loop's own step stays in its own file."""

from __future__ import annotations

import math
import signal
import sys
from pathlib import Path

import torch
from torch import nn

from mtllm_train.checkpoint import Checkpoints
from mtllm_train.config import Config, DistributedConfig
from mtllm_train.distributed import Dist, all_reduce, deepspeed_engine, wrap_model
from mtllm_train.metrics import MetricsLogger
from mtllm_train.model.stack import trainable_parameters
from mtllm_train.optim import build_optimizer, build_scheduler


class RunStopped(RuntimeError):
    """The run stopped before its end for a reason it names; rerunning the same command resumes it (exit 1)."""


class NonFiniteError(RunStopped):
    """A non-finite loss or gradient norm: the step was not applied and the run stops."""


def autocast(cfg: DistributedConfig, device: torch.device):
    """bf16 autocast on GPU when distributed.mixed_precision is bf16; a no-op context otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and cfg.mixed_precision == "bf16")


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
        model = wrap_model(module, cfg.distributed, dist_info, sharded, replicated)
        optimizer = build_optimizer(trainable_parameters(module), cfg.optim)  # after wrapping: FSDP2 made DTensors
        scheduler = build_scheduler(optimizer, cfg.optim, total_steps)
    return model, optimizer, scheduler, list(trainable_parameters(module).values())


def end_of_step(step: int, save_due: bool, *, preemption: Preemption, checkpoints: Checkpoints,
                logger: MetricsLogger, summary: dict, device: torch.device, keep_last: int,
                keep_steps: set[int] | None = None, reader_state: dict | None = None,
                keep_best: int | None = None) -> bool:
    """After optimizer step `step`: the ranks agree on preemption, save when due or preempted, and on
    preemption clear the STOP file and say so. Returns True when the loop must stop."""
    if logger.write_error is not None:
        preemption.requested = True  # the log cannot be written: every rank saves at this step's end and stops
    preempted = preemption.agreed(device)
    if (save_due or preempted) and not checkpoints.state_is_finite():
        raise NonFiniteError(f"step {step}: trainable weights or optimizer state are not finite (optim.lr too high?); "
                             f"not saved: a rerun resumes from the newest checkpoint")
    if save_due or preempted:
        checkpoints.save(step, meta={"wandb_id": logger.wandb_id}, keep_last=keep_last, keep_steps=keep_steps,
                         reader_state=reader_state, keep_best=keep_best)
    if preempted:
        preemption.served()
        if logger.write_error is not None:
            raise RunStopped(f"step {step}: cannot write {logger.path} ({logger.write_error.strerror}); saved a "
                             f"checkpoint at step {step}: free space, then rerun the same command to resume "
                             f"(metrics.jsonl lacks the steps it could not write)")
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
