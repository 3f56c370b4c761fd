"""Process group set-up and the one small interface over the backends: none, ddp, fsdp (FSDP2), deepspeed.

Every rank builds the same stack (same files, same init seed), so nothing is broadcast at wrap time.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from transformers.utils import logging as transformers_logging

from mtllm_train.config import Config, ConfigError, DistributedConfig, check_backend
from mtllm_train.portable.format import DTYPES


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def die_with_parent(signum: int, parent: int | None = None) -> None:
    """Have Linux send `signum` to this process when its parent ends (prctl PR_SET_PDEATHSIG): a trainer whose
    launcher was killed, or a loader worker whose trainer was, does not run on unattended. `parent`: the pid the
    parent must have, for a parent that may have ended before this call (then `signum` is raised at once)."""
    if sys.platform != "linux":
        return
    ctypes.CDLL(None, use_errno=True).prctl(1, signum, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    if parent is not None and os.getppid() != parent:
        signal.raise_signal(signum)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(cfg: DistributedConfig) -> Dist:
    """Read torchrun / deepspeed-launcher variables; a lone process gets a 1-rank group when a backend needs one."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    backend = cfg.backend
    check_backend(backend, world_size)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if "LOCAL_RANK" in os.environ:  # started by a launcher (torchrun, deepspeed): when it is gone, preempt and stop
        die_with_parent(signal.SIGTERM)
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if device.type == "cpu" and backend == "deepspeed" and cfg.mixed_precision == "bf16":
        # DeepSpeed casts every parameter, the frozen ones too, to bf16; on CPU (no autocast) they then meet fp32
        # activations and the first layer norm stops with a raw error.
        raise ConfigError("distributed.mixed_precision: bf16 with DeepSpeed needs GPUs (this process runs on cpu); "
                          "use none")
    if backend != "none" and not dist.is_initialized():
        if "RANK" not in os.environ:  # a lone process (a MASTER_ADDR exported for other jobs does not make a launch)
            for name, value in (("MASTER_ADDR", "127.0.0.1"), ("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
                os.environ.setdefault(name, value)
            if "MASTER_PORT" not in os.environ:
                os.environ["MASTER_PORT"] = str(_free_port())
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(minutes=cfg.timeout_minutes))
    rank = dist.get_rank() if dist.is_initialized() else 0
    quiet_other_ranks(rank)
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def quiet_other_ranks(rank: int) -> None:
    """Only rank 0 shows transformers' weight-loading progress bars and load reports: every rank loads the same
    files, so a node's 8 ranks would print each 8 times. Errors still raise on every rank."""
    if rank > 0:
        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()


def all_reduce(tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=op)
    return tensor


def agree_or_stop(values: list[float], error: ConfigError | None, device: torch.device, what: str) -> list[float]:
    """`values` summed over ranks, with whether a rank failed (`error`) in the same all-reduce: when one did, every
    rank stops (the failing one with its error, the others with one line), so none waits in a later collective
    for a rank that is gone."""
    *totals, failed = all_reduce(torch.tensor([*values, float(error is not None)], device=device,
                                              dtype=torch.float64)).tolist()
    if error is not None:
        raise error
    if failed:
        raise ConfigError(f"{int(failed)} other rank(s) could not {what} (their error names the cause); stopping")
    return totals


def stop_together(work, device: torch.device, what: str):
    """work()'s result; when it fails with a ConfigError on any rank, every rank stops (see agree_or_stop)."""
    try:
        result, error = work(), None
    except ConfigError as err:
        result, error = None, err
    agree_or_stop([], error, device, what)
    return result


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def repeated_layers(module: nn.Module) -> nn.ModuleList:
    """The transformer blocks of an LLM: the ModuleList holding the most parameters."""
    lists = [m for m in module.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ConfigError(f"{type(module).__name__}: no list of transformer layers found to shard")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


COMPILE_BACKEND = "inductor"  # torch.compile's default; tests set dynamo's "eager" or "aot_eager" (no C++ compiler)


def compile_layers(module: nn.Module, dynamic_lengths: bool) -> None:
    """torch.compile the forward of each transformer layer of `module`, after the backend wrapped it.

    Compiling `forward` (not the module call) keeps the wrappers' hooks (FSDP2's all-gathers, DeepSpeed's)
    outside the graphs and the parameter names unchanged. After wrapping, because FSDP2 gives each layer a
    subclass, and transformers' activation checkpointing acts only in the outermost class's `forward`.

    dynamic_lengths: batches come in more than one padded length (data.pad_multiple below data.max_length), so
    the graphs are compiled for symbolic sizes from the first step; otherwise dynamo would compile a static graph
    for the first length, a second one for the next, and only then turn the length dynamic (seconds each).
    """
    # The layers share one code object, hence one cache of graphs: teacher and student (grad mode), checkpointed
    # layer or not (every_<k>), static or dynamic. Past torch's default limit (8) the rest would run uncompiled.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 16)
    for layer in repeated_layers(module):
        layer.forward = torch.compile(layer.forward, backend=COMPILE_BACKEND, dynamic=True if dynamic_lengths else None)


def wrap_model(module: nn.Module, cfg: DistributedConfig, dist_info: Dist, sharded: nn.Module,
               replicated: list[nn.Module]) -> nn.Module:
    """DDP or FSDP2 around `module` (DeepSpeed wraps in deepspeed_engine). FSDP shards every layer of `sharded`;
    the parameters of the `replicated` modules (frozen encoder, frozen teacher) stay whole on every rank."""
    backend = cfg.backend
    if backend == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        device_ids = [dist_info.local_rank] if dist_info.device.type == "cuda" else None
        return DDP(module, device_ids=device_ids, init_sync=False, forward_sync_buffers=False)
    if backend == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        bf16 = cfg.mixed_precision == "bf16"
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                                      reduce_dtype=DTYPES[cfg.fsdp_reduce_dtype] if bf16 else None)
        for layer in repeated_layers(sharded):
            fully_shard(layer, mp_policy=policy)
        ignored = {p for frozen in replicated for p in frozen.parameters()}
        fully_shard(module, mp_policy=policy, ignored_params=ignored or None)
    return module


def deepspeed_config(cfg: Config, accumulation: int) -> dict:
    if cfg.distributed.deepspeed_config:
        path = Path(cfg.distributed.deepspeed_config)
        if not path.is_file():
            raise ConfigError(f"distributed.deepspeed_config: {str(path)!r} does not exist")
        try:
            ds_config = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"distributed.deepspeed_config: {str(path)!r} is not valid JSON ({err})") from None
    else:
        ds_config = {"zero_optimization": {"stage": cfg.distributed.zero_stage},
                     "bf16": {"enabled": cfg.distributed.mixed_precision == "bf16"}}
    # Batch geometry, clipping and logging always come from our config, so they cannot disagree.
    ds_config.update(train_micro_batch_size_per_gpu=cfg.data.micro_batch_size,
                     gradient_accumulation_steps=accumulation, train_batch_size=cfg.train.global_batch_size,
                     gradient_clipping=cfg.train.grad_clip, steps_per_print=10**9, zero_allow_untested_optimizer=True)
    return ds_config


def deepspeed_engine(stack: nn.Module, optimizer, scheduler_fn, cfg: Config, accumulation: int):
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=stack, optimizer=optimizer, lr_scheduler=scheduler_fn,
                                           config=deepspeed_config(cfg, accumulation), dist_init_required=False)
    return engine


def gradient_sync(model: nn.Module, backend: str, sync: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    if backend == "ddp" and not sync:
        return model.no_sync()
    if backend == "fsdp":
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def prebuild_deepspeed_ops() -> None:
    """Compile DeepSpeed's CPU shared-memory all-reduce once (into TORCH_EXTENSIONS_DIR), at install time.

    DeepSpeed builds it on the first deepspeed.initialize of every new environment (about 40 s on 2 cores);
    doing it in `make install` keeps that out of the first training run and the test suite. Nothing to do
    on GPU machines, which use NCCL.
    """
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if builder is not None:
            builder.load(verbose=False)
