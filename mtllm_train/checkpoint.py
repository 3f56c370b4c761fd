"""Checkpoints: only what trains (+ optimizer, scheduler, step, per-rank reader and RNG state), sharded.
`Checkpoints` is the one place that knows this layout; every other module asks it.

runs/NAME/checkpoints/step_00000020/
    state/          torch.distributed.checkpoint: trainable parameters + optimizer (none/ddp/fsdp), or
    deepspeed/      DeepSpeed's own checkpoint with frozen parameters excluded (+ trainable.safetensors)
    rank_<r>.pt     RNG states (and the stage-1 data-reader position) of rank r (loaded with weights_only=True)
    meta.json       step, world size, backend, scheduler state, W&B run id
    COMPLETE        written last: a folder without it is an interrupted save and is ignored
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from mtllm_train.config import ConfigError
from mtllm_train.distributed import Dist, barrier
from mtllm_train.files import write_atomic

COMMIT = "COMPLETE"
DEEPSPEED_TAG = "deepspeed"
TRAINABLE = "trainable.safetensors"  # DeepSpeed checkpoints: the full trainable weights, for loading without DeepSpeed


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


@dataclass
class Resumed:
    path: Path
    meta: dict
    reader_state: dict | None  # this rank's data-reader position (stage 1); None when the loop saved none


class Checkpoints:
    """The checkpoints of one run folder.

    Built with the training state (wrapped model, optimizer, scheduler, backend, this rank) it saves and
    resumes; built with the run folder alone it lists checkpoints, reads their meta and loads trainable weights
    into an unwrapped module in this process (export, evaluation, stage 2 reading stage-1 or teacher runs).
    """

    def __init__(self, run_dir: str | Path, *, model=None, optimizer=None, scheduler=None, backend: str = "none",
                 dist_info: Dist | None = None):
        self.run_dir, self.folder = Path(run_dir), Path(run_dir) / "checkpoints"
        self.model, self.optimizer, self.scheduler, self.backend = model, optimizer, scheduler, backend
        self.dist_info = dist_info or Dist(0, 1, 0, torch.device("cpu"))

    def _step_dir(self, step: int) -> Path:
        return self.folder / f"step_{step:08d}"

    def complete(self) -> list[tuple[int, Path]]:
        """(step, folder) of every complete checkpoint, oldest first."""
        found = [(int(p.name.split("_")[1]), p) for p in self.folder.glob("step_*") if (p / COMMIT).is_file()] \
            if self.folder.is_dir() else []
        return sorted(found)

    def steps(self) -> list[int]:
        return [step for step, _ in self.complete()]

    def path(self, step: int | None = None) -> Path:
        """The complete checkpoint at `step` (None: the newest)."""
        checkpoints = dict(self.complete())
        if not checkpoints:
            raise ConfigError(f"{self.run_dir}: no complete checkpoint (train first, or check the run folder)")
        if step is None:
            return checkpoints[max(checkpoints)]
        if step not in checkpoints:
            raise ConfigError(f"step {step}: no complete checkpoint at that step in {self.run_dir} "
                              f"(available: {', '.join(map(str, sorted(checkpoints)))})")
        return checkpoints[step]

    def meta(self, step: int | None = None) -> dict:
        return json.loads((self.path(step) / "meta.json").read_text())

    def save(self, step: int, *, meta: dict, keep_last: int, keep_steps: set[int] | None = None,
             reader_state: dict | None = None) -> Path:
        """Save, commit, then prune: keep the newest `keep_last` complete checkpoints or, when `keep_steps` is
        given (stage 2 keeps what checkpoint selection needs), those steps and the newest."""
        dist_info, model = self.dist_info, self.model
        path = self._step_dir(step)
        if dist_info.is_main and path.exists():
            shutil.rmtree(path)  # an interrupted save of the same step
        barrier()
        path.mkdir(parents=True, exist_ok=True)
        if self.backend == "deepspeed":
            model.save_checkpoint(str(path / "deepspeed"), tag=DEEPSPEED_TAG, save_latest=False,
                                  exclude_frozen_parameters=True)
            trainable = _trainable_state(model)
            if dist_info.is_main:
                save_file(trainable, str(path / TRAINABLE))
        else:
            model_state, optim_state = get_state_dict(model, self.optimizer,
                                                      options=StateDictOptions(ignore_frozen_params=True))
            dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(path / "state"))
        rank_state = {"rng": _rng_state()} | ({"reader": reader_state} if reader_state is not None else {})
        torch.save(rank_state, path / f"rank_{dist_info.rank}.pt")
        if dist_info.is_main:
            scheduler_state = self.scheduler.state_dict() if self.scheduler is not None else None
            write_atomic(path / "meta.json", json.dumps({**meta, "step": step, "world_size": dist_info.world_size,
                                                         "backend": self.backend, "scheduler": scheduler_state,
                                                         "saved_at": time.time()}, indent=1))
        barrier()
        if dist_info.is_main:
            write_atomic(path / COMMIT, str(step))
            complete = self.complete()
            if keep_steps is None:
                pruned = complete[:-keep_last]
            else:
                pruned = [(s, p) for s, p in complete[:-1] if s not in keep_steps]
            for _, old in pruned:
                shutil.rmtree(old, ignore_errors=True)
            for stale in self.folder.glob("step_*"):
                if not (stale / COMMIT).is_file() and stale != path:
                    shutil.rmtree(stale, ignore_errors=True)
        barrier()
        return path

    def resume(self) -> Resumed | None:
        """Restore model, optimizer, scheduler and RNG from the newest complete checkpoint, or None."""
        if not self.complete():
            return None
        path, dist_info = self.path(), self.dist_info
        meta = json.loads((path / "meta.json").read_text())
        if meta["world_size"] != dist_info.world_size:
            raise ConfigError(f"checkpoint {path} was written by {meta['world_size']} ranks, this run has "
                              f"{dist_info.world_size}: the data position is per rank, so resume with "
                              f"{meta['world_size']} ranks (or start a new run.name)")
        if meta["backend"] != self.backend:
            raise ConfigError(f"checkpoint {path} was written with distributed.backend {meta['backend']!r}, this run "
                              f"uses {self.backend!r}; resume with the same backend")
        if self.backend == "deepspeed":  # the engine restores its own scheduler
            self.model.load_checkpoint(str(path / "deepspeed"), tag=DEEPSPEED_TAG, load_module_strict=False)
        else:
            options = StateDictOptions(ignore_frozen_params=True)
            model_state, optim_state = get_state_dict(self.model, self.optimizer, options=options)
            state = {"model": model_state, "optim": optim_state}
            dcp.load(state, checkpoint_id=str(path / "state"))
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                           options=StateDictOptions(ignore_frozen_params=True, strict=False))
            self.scheduler.load_state_dict(meta["scheduler"])
        rank_state = torch.load(path / f"rank_{dist_info.rank}.pt", weights_only=True)
        _set_rng_state(rank_state["rng"])
        return Resumed(path, meta, rank_state.get("reader"))

    def load_trainable(self, module: nn.Module, step: int | None = None, prefix: str = "") -> dict:
        """Load a checkpoint's trainable weights into an unwrapped `module` in this process; returns its meta.
        With `prefix` (e.g. "head."), `module` is the submodule of that name and only its weights are read."""
        path = self.path(step)
        meta = self.meta(step)
        options = StateDictOptions(ignore_frozen_params=True)
        wanted = {prefix + name: tensor for name, tensor in get_model_state_dict(module, options=options).items()}
        if meta["backend"] == "deepspeed":
            trained = {name: tensor for name, tensor in load_file(str(path / TRAINABLE)).items()
                       if name.startswith(prefix)}
        else:
            trained = wanted
            dcp.load({"model": trained}, checkpoint_id=str(path / "state"))
        if set(trained) != set(wanted):
            raise ConfigError(f"checkpoint {path}: its trainable parameters do not match the model built from the "
                              f"config ({len(set(trained) ^ set(wanted))} names differ)")
        set_model_state_dict(module, {name.removeprefix(prefix): tensor for name, tensor in trained.items()},
                             options=StateDictOptions(ignore_frozen_params=True, strict=False))
        return meta
