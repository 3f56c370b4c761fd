import math

import pytest
import torch

from mtllm_train.config import ConfigError, OptimConfig, load_config
from mtllm_train.optim import build_optimizer, lr_factor, param_groups


def test_linear_warmup_then_linear_decay_to_min_ratio():
    cfg = OptimConfig(warmup=4, schedule="linear", min_lr_ratio=0.1)
    factors = [lr_factor(step, cfg, 14) for step in range(14)]
    assert factors[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    # After warmup: from 1.0 at step 4 down by 0.9/10 per step, reaching 0.1 at step 14 (one past the last).
    assert factors[4:] == pytest.approx([1.0 - 0.09 * i for i in range(10)])


def test_warmup_fraction_and_cosine():
    cfg = OptimConfig(warmup=0.1, schedule="cosine", min_lr_ratio=0.0)
    assert lr_factor(0, cfg, 100) == pytest.approx(0.1)
    assert lr_factor(9, cfg, 100) == pytest.approx(1.0)
    assert lr_factor(10, cfg, 100) == pytest.approx(1.0)
    assert lr_factor(55, cfg, 100) == pytest.approx(0.5)
    assert lr_factor(99, cfg, 100) == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert lr_factor(50, OptimConfig(warmup=0, schedule="constant"), 100) == 1.0


def test_no_weight_decay_on_biases_and_norms():
    layer, norm = torch.nn.Linear(3, 2), torch.nn.LayerNorm(2)
    named = {"layer.weight": layer.weight, "layer.bias": layer.bias, "norm.weight": norm.weight}
    decay, no_decay = param_groups(named, 0.01)
    assert decay["weight_decay"] == 0.01 and [p.shape for p in decay["params"]] == [layer.weight.shape]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 2


@pytest.mark.parametrize("name", ["adamw", "adamw8bit"])
def test_optimizers_reduce_a_quadratic(name):
    weight = torch.nn.Parameter(torch.full((64, 64), 3.0))
    optimizer = build_optimizer({"w": weight}, OptimConfig(name=name, lr=0.1, weight_decay=0.0))
    for _ in range(50):
        optimizer.zero_grad()
        weight.pow(2).sum().backward()
        optimizer.step()
    assert weight.abs().max() < 1.0
    if name == "adamw8bit":
        assert optimizer.state[weight]["state1"].dtype == torch.uint8


def test_adamw8bit_with_fsdp_is_refused():
    with pytest.raises(ConfigError, match=r"optim.name: adamw8bit cannot step FSDP2's sharded"):
        load_config("configs/tiny.yaml", ["optim.name=adamw8bit", "distributed.backend=fsdp"])


def test_deepspeed_config_takes_batch_geometry_from_ours(tmp_path):
    import json

    from mtllm_train.distributed import deepspeed_config

    cfg = load_config("configs/tiny.yaml", ["distributed.backend=deepspeed", "distributed.zero_stage=3"])
    generated = deepspeed_config(cfg, accumulation=2)
    assert generated["zero_optimization"] == {"stage": 3} and generated["gradient_accumulation_steps"] == 2
    assert generated["train_batch_size"] == 16 and generated["train_micro_batch_size_per_gpu"] == 8
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_comm": True}, "train_batch_size": 999}))
    cfg.distributed.deepspeed_config = str(user)
    merged = deepspeed_config(cfg, accumulation=2)
    assert merged["zero_optimization"] == {"stage": 2, "overlap_comm": True} and merged["train_batch_size"] == 16
    cfg.distributed.deepspeed_config = str(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match=r"distributed.deepspeed_config: '.*missing.json' does not exist"):
        deepspeed_config(cfg, accumulation=2)


def test_a_warmup_longer_than_the_run_is_refused():
    from mtllm_train.optim import build_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ConfigError, match=r"optim.warmup: 50 warmup steps in a run of 10: the lr would never reach"):
        build_scheduler(optimizer, OptimConfig(warmup=50), 10)
    build_scheduler(optimizer, OptimConfig(warmup=10), 10)  # reaches optim.lr at the last step
