"""Checkpoints: only what trains (+ optimizer, scheduler, step, per-rank reader and RNG state), sharded.

runs/NAME/checkpoints/step_00000020/
    state/          torch.distributed.checkpoint: trainable parameters + optimizer (none/ddp/fsdp), or
    deepspeed/      DeepSpeed's own checkpoint with frozen parameters excluded (+ trainable.safetensors)
    rank_<r>.pt     data-reader position and RNG states of rank r (loaded with weights_only=True)
    meta.json       step, world size, backend, scheduler state, W&B run id
    COMPLETE        written last: a folder without it is an interrupted save and is ignored
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from mtllm_train.config import ConfigError
from mtllm_train.distributed import Dist, barrier

COMMIT = "COMPLETE"
DEEPSPEED_TAG = "deepspeed"


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    folder = run_dir / "checkpoints"
    found = [(int(p.name.split("_")[1]), p) for p in folder.glob("step_*") if (p / COMMIT).is_file()] if folder.is_dir() else []
    return sorted(found)


def checkpoint_path(run_dir: Path, step: int | None = None) -> Path:
    """The complete checkpoint of `run_dir` at `step` (None: the newest)."""
    checkpoints = dict(complete_checkpoints(run_dir))
    if not checkpoints:
        raise ConfigError(f"{run_dir}: no complete checkpoint (train first, or check the run folder)")
    if step is None:
        return checkpoints[max(checkpoints)]
    if step not in checkpoints:
        raise ConfigError(f"step {step}: no complete checkpoint at that step in {run_dir} "
                          f"(available: {', '.join(map(str, sorted(checkpoints)))})")
    return checkpoints[step]


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _trainable_state(engine) -> dict[str, torch.Tensor]:
    """Full trainable parameters from a DeepSpeed engine (gathered under ZeRO-3), on CPU."""
    import deepspeed

    params = {name: p for name, p in engine.module.named_parameters() if p.requires_grad}
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
        return {name: p.detach().float().cpu().clone() for name, p in params.items()}


def save_checkpoint(run_dir: Path, step: int, *, model, optimizer, scheduler, backend: str, dist_info: Dist,
                    reader_state: dict, meta: dict, keep_last: int, keep_steps: set[int] | None = None) -> Path:
    """Save, commit, then prune: keep the newest `keep_last` complete checkpoints or, when `keep_steps` is
    given (stage 2 keeps what checkpoint selection needs), those steps and the newest."""
    path = step_dir(run_dir, step)
    if dist_info.is_main and path.exists():
        shutil.rmtree(path)  # an interrupted save of the same step
    barrier()
    path.mkdir(parents=True, exist_ok=True)
    if backend == "deepspeed":
        model.save_checkpoint(str(path / "deepspeed"), tag=DEEPSPEED_TAG, save_latest=False,
                              exclude_frozen_parameters=True)
        trainable = _trainable_state(model)
        if dist_info.is_main:
            from safetensors.torch import save_file

            save_file(trainable, str(path / "trainable.safetensors"))
    else:
        model_state, optim_state = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(path / "state"))
    torch.save({"reader": reader_state, "rng": _rng_state()}, path / f"rank_{dist_info.rank}.pt")
    if dist_info.is_main:
        scheduler_state = scheduler.state_dict() if scheduler is not None else None
        (path / "meta.json").write_text(json.dumps({**meta, "step": step, "world_size": dist_info.world_size,
                                                     "backend": backend, "scheduler": scheduler_state,
                                                     "saved_at": time.time()}, indent=1))
    barrier()
    if dist_info.is_main:
        (path / COMMIT).write_text(str(step))
        complete = complete_checkpoints(run_dir)
        if keep_steps is None:
            pruned = complete[:-keep_last]
        else:
            pruned = [(s, p) for s, p in complete[:-1] if s not in keep_steps]
        for _, old in pruned:
            shutil.rmtree(old, ignore_errors=True)
        for stale in (run_dir / "checkpoints").glob("step_*"):
            if not (stale / COMMIT).is_file() and stale != path:
                shutil.rmtree(stale, ignore_errors=True)
    barrier()
    return path


def read_meta(path: Path) -> dict:
    return json.loads((path / "meta.json").read_text())


def load_checkpoint(path: Path, *, model, optimizer, scheduler, backend: str, dist_info: Dist) -> tuple[dict, dict]:
    """Restore model/optimizer/scheduler/RNG; return (meta, this rank's reader state)."""
    meta = read_meta(path)
    if meta["world_size"] != dist_info.world_size:
        raise ConfigError(f"checkpoint {path} was written by {meta['world_size']} ranks, this run has "
                          f"{dist_info.world_size}: the data position is per rank, so resume with "
                          f"{meta['world_size']} ranks (or start a new run.name)")
    if meta["backend"] != backend:
        raise ConfigError(f"checkpoint {path} was written with distributed.backend {meta['backend']!r}, this run uses "
                          f"{backend!r}; resume with the same backend")
    if backend == "deepspeed":
        model.load_checkpoint(str(path / "deepspeed"), tag=DEEPSPEED_TAG, load_module_strict=False)
    else:
        model_state, optim_state = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=str(path / "state"))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=StateDictOptions(ignore_frozen_params=True, strict=False))
        if scheduler is not None:
            scheduler.load_state_dict(meta["scheduler"])
    rank_state = torch.load(path / f"rank_{dist_info.rank}.pt", weights_only=True)
    _set_rng_state(rank_state["rng"])
    return meta, rank_state["reader"]


def load_trainable(module: nn.Module, path: Path) -> dict:
    """Load a checkpoint's trainable weights into an unwrapped `module` in this process; returns its meta."""
    meta = read_meta(path)
    options = StateDictOptions(ignore_frozen_params=True)
    expected = set(get_model_state_dict(module, options=options))
    if meta["backend"] == "deepspeed":
        from safetensors.torch import load_file

        trained = load_file(str(path / "trainable.safetensors"))
    else:
        trained = get_model_state_dict(module, options=options)
        dcp.load({"model": trained}, checkpoint_id=str(path / "state"))
    if set(trained) != expected:
        raise ConfigError(f"checkpoint {path}: its trainable parameters do not match the model built from the config "
                          f"({len(set(trained) ^ expected)} names differ)")
    set_model_state_dict(module, trained, options=StateDictOptions(ignore_frozen_params=True, strict=False))
    return meta
