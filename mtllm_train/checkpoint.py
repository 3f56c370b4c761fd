"""Checkpoints: only what trains (+ optimizer, scheduler, step, per-rank reader and RNG state), sharded.
`Checkpoints` is the one place that knows this layout; every other module asks it.

runs/NAME/checkpoints/step_00000020/
    state/          torch.distributed.checkpoint: trainable parameters + optimizer (none/ddp/fsdp), or
    deepspeed/      DeepSpeed's own checkpoint with frozen parameters excluded (+ trainable.safetensors)
    rank_<r>.pt     RNG states (and the stage-1 data-reader position) of rank r (loaded with weights_only=True)
    meta.json       step, world size, backend, scheduler state, W&B run id, library versions, the run's settings
                    (what a resume compares with, and what export rebuilds from), size and sha256 of every file above
    COMPLETE        written last: a folder without it is an interrupted save and is ignored

Every file is flushed to disk before COMPLETE is written. Loading checks sizes, then checksums (a size that
differs is found without reading the file, so a crafted meta.json cannot make hashing run for ever): a damaged newest
checkpoint is reported and the previous one resumed; export and evaluation refuse a damaged one. Nothing is
unpickled beyond what a checkpoint is made of: the distributed checkpoint's metadata goes through an unpickler
that knows only its own classes, its stored values load with weights_only, rank files with weights_only.
(DeepSpeed's own files are read by DeepSpeed, which unpickles them: load those only from runs you trust.)
Weights or optimizer state that are not finite are never saved.
"""

from __future__ import annotations

import io
import json
import pickle
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import StorageMeta
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from mtllm_train.config import ConfigError
from mtllm_train.distributed import Dist, agree_or_stop, all_reduce, barrier
from mtllm_train.files import fsync_path, sha256_file, write_atomic
from mtllm_train.portable.guard import TRAINING_LIBRARIES, library_versions

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


def trainable_only(model: nn.Module, model_state: dict) -> dict:
    """The trainable parameters of a model state dict. ignore_frozen_params keeps buffers and extra state too,
    which for a 4-bit base is its quantization state (absmax, quant_map, packed quant_state, per layer): frozen,
    not ours to save, and its packed sizes differ between loads, so a checkpoint holding it would not load."""
    module = getattr(model, "module", model)  # DDP's and DeepSpeed's wrappers; FSDP2 keeps the names
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    return {name: tensor for name, tensor in model_state.items() if name in trainable}


def _trainable_state(engine) -> dict[str, torch.Tensor]:
    """Full trainable parameters from a DeepSpeed engine (gathered under ZeRO-3), on CPU."""
    import deepspeed

    params = {name: p for name, p in engine.module.named_parameters() if p.requires_grad}
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
        return {name: p.detach().float().cpu().clone() for name, p in params.items()}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a distributed checkpoint's .metadata from the classes it is made of, nothing else: a crafted
    file cannot name a function to run."""

    ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
               ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}

    def find_class(self, module: str, name: str):
        found = super().find_class(module, name) if module.startswith(("torch", "pathlib")) else None
        if (module, name) in self.ALLOWED or isinstance(found, torch.dtype) or (
                module == "torch.distributed.checkpoint.metadata" and isinstance(found, type)):
            return found
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


class _SafeReader(dcp.FileSystemReader):
    refusal: str | None = None

    def read_metadata(self, *args, **kwargs):
        path = self._get_metadata_path(kwargs.get("rank"))
        try:
            with open(path, "rb") as handle:
                metadata = _MetadataUnpickler(handle).load()
        except pickle.UnpicklingError as err:
            self.refusal = f"{path}: refused ({err}); a checkpoint's metadata holds nothing else"
            raise
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafePlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        torch.load(value, weights_only=True)  # the optimizer's scalars; refuses anything that is not plain data
        value.seek(0)
        super().load_bytes(read_item, value)


def _dcp_load(state: dict, folder: Path) -> None:
    reader = _SafeReader(folder)
    try:
        dcp.load(state, storage_reader=reader, planner=_SafePlanner())
    except CheckpointException:
        if reader.refusal is None:
            raise
        raise ConfigError(reader.refusal) from None  # one line, not the wrapped traceback of every rank


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter: FSDP2's shard, ZeRO-3's partition, or the tensor itself."""
    tensor = getattr(tensor, "ds_tensor", tensor)
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


META_LIMIT = 64 * 2**20  # bytes of a meta.json: checksums of a few thousand files


def checkpoint_bytes_limit(module: nn.Module) -> int:
    """The most bytes a checkpoint of `module`'s trainable weights can hold: fp32 weights with optimizer state and
    DeepSpeed's extra copies stay well under 16 x 4 bytes a weight, plus rank files and metadata."""
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters() if p.requires_grad)
    return 16 * 4 * trainable + META_LIMIT


def all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(_local(t).detach()).all()) for t in tensors if t.is_floating_point())


@dataclass
class Resumed:
    path: Path
    meta: dict
    reader_state: dict | None  # this rank's data-reader position (stage 1); None when the loop saved none


# What a full or failing disk raises while a checkpoint is written: OSError from our own files, RuntimeError from
# torch.save's zip writer, CheckpointException (a BaseException) from torch.distributed.checkpoint.
WRITE_ERRORS = (OSError, RuntimeError, CheckpointException)
STEP_FOLDER = re.compile(r"step_\d{8}")  # what _step_dir names; other step_* folders are not checkpoints


def write_error_reason(failure: BaseException | None) -> str:
    """The reason a checkpoint write failed, in a few words ("No space left on device"), for the one-line error."""
    if failure is None:
        return "another rank failed"
    if isinstance(failure, OSError) and failure.strerror:
        return failure.strerror
    errno_message = re.search(r"\[Errno \d+\] ([^\n:']+)", str(failure))
    if errno_message:
        return errno_message.group(1).strip()
    lines = str(failure).strip().splitlines()
    return lines[0][:200] if lines else type(failure).__name__


class Checkpoints:
    """The checkpoints of one run folder.

    Built with the training state (wrapped model, optimizer, scheduler, backend, this rank) it saves and
    resumes; built with the run folder alone it lists checkpoints, reads their meta and loads trainable weights
    into an unwrapped module in this process (export, evaluation, stage 2 reading stage-1 or teacher runs).
    """

    def __init__(self, run_dir: str | Path, *, model=None, optimizer=None, scheduler=None, backend: str = "none",
                 dist_info: Dist | None = None, settings: dict | None = None):
        self.run_dir, self.folder = Path(run_dir), Path(run_dir) / "checkpoints"
        self.model, self.optimizer, self.scheduler, self.backend = model, optimizer, scheduler, backend
        self.settings = settings  # the run's config (to_dict), recorded in every checkpoint it saves
        self.dist_info = dist_info or Dist(0, 1, 0, torch.device("cpu"))

    def _step_dir(self, step: int) -> Path:
        return self.folder / f"step_{step:08d}"

    def complete(self) -> list[tuple[int, Path]]:
        """(step, folder) of every complete checkpoint, oldest first."""
        found = [(int(p.name.removeprefix("step_")), p) for p in self.folder.glob("step_*")
                 if STEP_FOLDER.fullmatch(p.name) and (p / COMMIT).is_file()] if self.folder.is_dir() else []
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

    @staticmethod
    def damage(path: Path, max_bytes: int | None = None) -> str | None:
        """What is wrong with complete checkpoint `path` (unreadable meta.json, a missing file, a size or checksum
        that does not match), or None. Checkpoints written before checksums were recorded are taken as they are.
        max_bytes (checkpoint_bytes_limit): files that hold more than a checkpoint of the model can are refused
        before any is hashed (a crafted meta.json listing a terabyte sparse file would hash for ever)."""
        try:
            if (path / "meta.json").stat().st_size > META_LIMIT:
                return f"meta.json holds {(path / 'meta.json').stat().st_size} bytes (at most {META_LIMIT})"
            meta = json.loads((path / "meta.json").read_text())
            files, sizes = meta.get("files", {}), meta.get("sizes", {})
            listed = sum((path / name).stat().st_size for name in files if (path / name).is_file())
        except (OSError, ValueError, AttributeError, TypeError) as err:
            return f"meta.json is unreadable ({err})"
        if max_bytes is not None and listed > max_bytes:
            return (f"its files hold {listed} bytes, more than a checkpoint of this model's trainable weights can "
                    f"({max_bytes})")
        for name, digest in files.items():
            file = path / name
            if not file.is_file():
                return f"{name} is missing"
            if name in sizes and file.stat().st_size != sizes[name]:
                return f"{name} has {file.stat().st_size} bytes, meta.json records {sizes[name]}"
            if sha256_file(file) != digest:
                return f"{name} does not match its checksum"
        return None

    def state_is_finite(self) -> bool:
        """Whether every trainable weight and optimizer state tensor is finite, on every rank."""
        tensors = [p for p in self.model.parameters() if p.requires_grad]
        optimizer_state = getattr(self.optimizer, "state", {})  # DeepSpeed's wrappers keep theirs inside
        tensors += [v for state in optimizer_state.values() for v in state.values() if torch.is_tensor(v)]
        flag = torch.tensor(float(not all_finite(tensors)), device=self.dist_info.device)
        return not all_reduce(flag, torch.distributed.ReduceOp.MAX).item()

    def save(self, step: int, *, meta: dict, keep_last: int, keep_steps: set[int] | None = None,
             reader_state: dict | None = None, keep_best: int | None = None) -> Path:
        """Save, commit, then prune: keep the newest `keep_last` complete checkpoints (and step `keep_best`: the
        stage-1 probe's best) or, when `keep_steps` is given (stage 2 keeps what checkpoint selection needs),
        those steps and the newest."""
        dist_info = self.dist_info
        path = self._step_dir(step)
        if dist_info.is_main and path.exists():
            shutil.rmtree(path)  # an interrupted save of the same step
        barrier()
        failure = None
        try:
            self._write_state(path, reader_state)
        except WRITE_ERRORS as err:
            failure = err
        self._agree_on_write(failure, step, path)
        failure = None
        if dist_info.is_main:
            try:
                self._commit(path, step, meta)
            except WRITE_ERRORS as err:
                failure = err
        self._agree_on_write(failure, step, path)  # also the barrier before any rank reads what was saved
        if dist_info.is_main:
            self._prune(step, path, keep_last, keep_steps, keep_best)
        return path

    def _agree_on_write(self, failure: BaseException | None, step: int, path: Path) -> None:
        """Every rank learns whether all could write (a full disk fails one rank, or all); if one could not, the
        half-written checkpoint goes and every rank stops with the same line."""
        if all_reduce(torch.tensor(float(failure is not None), device=self.dist_info.device)).item():
            if self.dist_info.is_main:
                shutil.rmtree(path, ignore_errors=True)
            raise ConfigError(f"checkpoint step {step}: cannot write {path} ({write_error_reason(failure)}); the "
                              f"earlier checkpoints are intact: free space, then rerun the same command to resume")

    def _commit(self, path: Path, step: int, meta: dict) -> None:
        """Rank 0, once every rank wrote its part: checksums into meta.json, then the COMPLETE mark."""
        files = sorted(f for f in path.rglob("*") if f.is_file())
        for file in files:
            fsync_path(file)
        scheduler_state = self.scheduler.state_dict() if self.scheduler is not None else None
        write_atomic(path / "meta.json", json.dumps({
            **meta, "step": step, "world_size": self.dist_info.world_size, "backend": self.backend,
            "scheduler": scheduler_state, "saved_at": time.time(), "versions": library_versions(TRAINING_LIBRARIES),
            **({"config": self.settings} if self.settings is not None else {}),
            "sizes": {str(f.relative_to(path)): f.stat().st_size for f in files},
            "files": {str(f.relative_to(path)): sha256_file(f) for f in files}}, indent=1))
        write_atomic(path / COMMIT, str(step))

    def _prune(self, step: int, path: Path, keep_last: int, keep_steps: set[int] | None,
               keep_best: int | None = None) -> None:
        """Keep the newest `keep_last` complete checkpoints up to `step` (or, with `keep_steps`, those steps and the
        newest). Checkpoints after `step` go first: the run went back past them (they were damaged), so they belong
        to a trajectory it left, and must not take the places of the sound ones."""
        complete = self.complete()
        current = [(s, p) for s, p in complete if s <= step]
        abandoned = [(s, p) for s, p in complete if s > step]
        if keep_steps is None:
            pruned = [(s, p) for s, p in current[:-keep_last] if s != keep_best]
        else:
            pruned = [(s, p) for s, p in current[:-1] if s not in keep_steps]
        for _, old in abandoned + pruned:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.folder.glob("step_*"):  # interrupted saves (a user's own step_* copies are left alone)
            if STEP_FOLDER.fullmatch(stale.name) and not (stale / COMMIT).is_file() and stale != path:
                shutil.rmtree(stale, ignore_errors=True)

    def _write_state(self, path: Path, reader_state: dict | None) -> None:
        """This rank's part of a checkpoint: trainable state (sharded), RNG and reader position."""
        path.mkdir(parents=True, exist_ok=True)
        if self.backend == "deepspeed":
            self.model.save_checkpoint(str(path / "deepspeed"), tag=DEEPSPEED_TAG, save_latest=False,
                                       exclude_frozen_parameters=True)
            trainable = _trainable_state(self.model)
            if self.dist_info.is_main:
                save_file(trainable, str(path / TRAINABLE))
        else:
            model_state, optim_state = get_state_dict(self.model, self.optimizer,
                                                      options=StateDictOptions(ignore_frozen_params=True))
            model_state = trainable_only(self.model, model_state)
            dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(path / "state"))
        rank_state = {"rng": _rng_state()} | ({"reader": reader_state} if reader_state is not None else {})
        rank_file = path / f"rank_{self.dist_info.rank}.pt"
        torch.save(rank_state, rank_file)
        fsync_path(rank_file)

    def _newest_sound(self) -> Path | None:
        """The newest complete checkpoint whose files check out (rank 0 checks; every rank gets its step, or the
        same error when none is sound)."""
        all_damaged, chosen = -1, 0
        if self.dist_info.is_main:
            for step, path in reversed(self.complete()):
                problem = self.damage(path, checkpoint_bytes_limit(self.model))
                if problem is None:
                    chosen = step
                    break
                print(f"mtllm: checkpoint {path} is damaged ({problem}); trying the one before it", file=sys.stderr)
            if self.complete() and not chosen:
                chosen = all_damaged
        # The other ranks add 0: every rank gets rank 0's answer.
        chosen = int(all_reduce(torch.tensor(float(chosen), device=self.dist_info.device)).item())
        if chosen == all_damaged:
            raise ConfigError(f"{self.run_dir}: every complete checkpoint is damaged (see above); start a new "
                              f"run.name")
        return self._step_dir(chosen) if chosen else None

    def resume(self) -> Resumed | None:
        """Restore model, optimizer, scheduler and RNG from the newest sound complete checkpoint, or None."""
        if not self.complete():
            return None
        path, dist_info = self._newest_sound(), self.dist_info
        if path is None:
            return None
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
            state = {"model": trainable_only(self.model, model_state), "optim": optim_state}
            _dcp_load(state, path / "state")
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                           options=StateDictOptions(ignore_frozen_params=True, strict=False))
            self.scheduler.load_state_dict(meta["scheduler"])
        rank_file, error = path / f"rank_{dist_info.rank}.pt", None
        try:
            rank_state = torch.load(rank_file, weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError) as err:  # checksummed, yet not ours
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            error = ConfigError(f"checkpoint {path}: {rank_file.name} holds what a checkpoint does not, refused "
                                f"({first[:200]}); resume from another step (move this one aside) or start a new "
                                f"run.name")
        agree_or_stop([], error, dist_info.device, f"read their part of checkpoint {path}")
        _set_rng_state(rank_state["rng"])
        return Resumed(path, meta, rank_state.get("reader"))

    def load_trainable(self, module: nn.Module, step: int | None = None, prefix: str = "") -> dict:
        """Load a checkpoint's trainable weights into an unwrapped `module` in this process; returns its meta.
        With `prefix` (e.g. "head."), `module` is the submodule of that name and only its weights are read."""
        path = self.path(step)
        problem = self.damage(path, None if prefix else checkpoint_bytes_limit(module))
        if problem is not None:
            raise ConfigError(f"checkpoint {path} is damaged ({problem}); choose another step "
                              f"(complete: {', '.join(map(str, self.steps()))})")
        meta = self.meta(step)
        options = StateDictOptions(ignore_frozen_params=True)
        wanted = {prefix + name: tensor for name, tensor in
                  trainable_only(module, get_model_state_dict(module, options=options)).items()}
        if meta["backend"] == "deepspeed":
            trained = {name: tensor for name, tensor in load_file(str(path / TRAINABLE)).items()
                       if name.startswith(prefix)}
        else:
            trained = wanted
            _dcp_load({"model": trained}, path / "state")
        if set(trained) != set(wanted):
            raise ConfigError(f"checkpoint {path}: its trainable parameters do not match the model built from the "
                              f"config ({len(set(trained) ^ set(wanted))} names differ)")
        if not all_finite(trained.values()):
            raise ConfigError(f"checkpoint {path} holds non-finite weights; choose an earlier step "
                              f"(complete: {', '.join(map(str, self.steps()))})")
        set_model_state_dict(module, {name.removeprefix(prefix): tensor for name, tensor in trained.items()},
                             options=StateDictOptions(ignore_frozen_params=True, strict=False))
        return meta
