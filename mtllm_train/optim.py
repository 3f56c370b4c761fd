"""Optimizer (AdamW or bitsandbytes AdamW8bit) over the trainable parameters, and the LR schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from mtllm_train.config import ConfigError, OptimConfig


def param_groups(named_params: dict[str, nn.Parameter], weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: biases and norm weights (1-D) get none."""
    decay = [p for p in named_params.values() if p.ndim >= 2]
    no_decay = [p for p in named_params.values() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(named_params: dict[str, nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(named_params, cfg.weight_decay)
    if cfg.name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    return int(cfg.warmup) if isinstance(cfg.warmup, int) else round(cfg.warmup * total_steps)


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Multiplier of cfg.lr for optimizer step `step` (0-based): linear warmup from 1/warmup, then decay
    (linear or cosine) that would reach min_lr_ratio at step `total_steps`, or constant."""
    warmup = warmup_steps(cfg, total_steps)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "constant":
        return 1.0
    progress = min((step - warmup) / max(1, total_steps - warmup), 1.0)
    if cfg.schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    if warmup_steps(cfg, total_steps) > total_steps:
        raise ConfigError(f"optim.warmup: {warmup_steps(cfg, total_steps)} warmup steps in a run of {total_steps}: "
                          f"the lr would never reach optim.lr; use fewer steps or a fraction")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, total_steps))
