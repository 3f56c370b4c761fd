"""Typed run configuration: dataclasses, YAML files and `key.sub=value` overrides.

Every user mistake (unknown key, wrong type, bad choice) raises ConfigError with one line that names the
dotted key and what was expected.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml


class ConfigError(ValueError):
    """A configuration value a user supplied is wrong; the message names the key."""


@dataclass
class RunConfig:
    name: str = "default"
    dir: str = "runs"
    seed: int = 0


@dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # peft's "all-linear" targets every linear layer except the output head.
    target_modules: Union[str, list] = "all-linear"


@dataclass
class ModelConfig:
    # A local folder / hub id, or an inline HF config dict (with `model_type`) built with random init.
    mt_encoder: Union[str, dict] = ""
    llm: Union[str, dict] = ""
    # Tokenizer folders; default to the model path when the model is given by path.
    mt_tokenizer: str = ""
    llm_tokenizer: str = ""
    bidirectional: bool = False
    quantization: str = "none"  # none | nf4 | fp4
    quant_double: bool = True
    quant_compute_dtype: str = "bfloat16"
    quant_storage_dtype: str = "bfloat16"
    dtype: str = "float32"  # dtype of the frozen weights (bfloat16 on GPU)
    lora: LoraSettings = field(default_factory=LoraSettings)
    pooling: str = "mean"  # mean | eos | bos
    init_seed: int = 0  # random init of inline-config models, identical on every rank
    activation_checkpointing: bool = False
    compile: bool = False


@dataclass
class DataConfig:
    shards: str = ""
    max_length: int = 512
    micro_batch_size: int = 8
    num_workers: int = 1
    skip_bad_samples: bool = False
    # Batches sorted by length within a buffer of this many batches, then shuffled.
    length_group_batches: int = 16


@dataclass
class TrainConfig:
    steps: int = 1000
    global_batch_size: int = 256
    grad_clip: float = 1.0


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | adamw8bit
    lr: float = 2e-4
    weight_decay: float = 0.01
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    # An int is a number of steps, a float below 1 a fraction of train.steps.
    warmup: Union[int, float] = 0.01
    schedule: str = "linear"  # linear | cosine | constant
    min_lr_ratio: float = 0.0


@dataclass
class DistributedConfig:
    backend: str = "none"  # none | ddp | fsdp | deepspeed
    mixed_precision: str = "none"  # none | bf16 (param dtype of FSDP / DeepSpeed / autocast)
    fsdp_reduce_dtype: str = "float32"
    zero_stage: int = 2
    deepspeed_config: str = ""  # a user's DeepSpeed json; overrides the generated one
    timeout_minutes: int = 30


@dataclass
class CheckpointConfig:
    every: int = 1000
    keep_last: int = 2


@dataclass
class LoggingConfig:
    every: int = 1
    wandb: str = "disabled"  # disabled | offline | online
    project: str = "mtllm-train"
    entity: str = ""
    progress_bar: bool = True


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


CHOICES = {
    "model.quantization": ("none", "nf4", "fp4"),
    "model.pooling": ("mean", "eos", "bos"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.quant_compute_dtype": ("float32", "bfloat16", "float16"),
    "model.quant_storage_dtype": ("float32", "bfloat16", "float16", "uint8"),
    "optim.name": ("adamw", "adamw8bit"),
    "optim.schedule": ("linear", "cosine", "constant"),
    "distributed.backend": ("none", "ddp", "fsdp", "deepspeed"),
    "distributed.mixed_precision": ("none", "bf16"),
    "distributed.fsdp_reduce_dtype": ("float32", "bfloat16"),
    "logging.wandb": ("disabled", "offline", "online"),
}


def _type_name(tp: Any) -> str:
    args = typing.get_args(tp)
    if args:
        return " or ".join(_type_name(a) for a in args)
    return {str: "a string", int: "an integer", float: "a number", bool: "true/false", list: "a list",
            dict: "a mapping"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotated type `tp`; ints are accepted where floats are expected."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} keys, got {value!r}")
        return from_dict(tp, value, key)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, checking every key and type (prefix names the section)."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            where = f"{prefix}.{key}" if prefix else key
            raise ConfigError(f"unknown config key '{where}'; expected one of: {', '.join(sorted(known))}")
    values = {}
    for name in known & data.keys():
        where = f"{prefix}.{name}" if prefix else name
        values[name] = _coerce(data[name], hints[name], where)
    return cls(**values)


def validate(cfg: Config) -> Config:
    flat = to_dict(cfg)
    for key, options in CHOICES.items():
        section, name = key.split(".")
        if flat[section][name] not in options:
            raise ConfigError(f"{key}: expected one of {', '.join(options)}, got {flat[section][name]!r}")
    positive = {"train.steps": cfg.train.steps, "train.global_batch_size": cfg.train.global_batch_size,
                "data.micro_batch_size": cfg.data.micro_batch_size, "data.max_length": cfg.data.max_length,
                "checkpoint.every": cfg.checkpoint.every, "logging.every": cfg.logging.every,
                "model.lora.r": cfg.model.lora.r, "optim.lr": cfg.optim.lr,
                "data.length_group_batches": cfg.data.length_group_batches}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: expected a positive value, got {value!r}")
    if cfg.checkpoint.keep_last < 2:
        raise ConfigError(f"checkpoint.keep_last: expected at least 2 (one complete checkpoint must survive a "
                          f"crash during the next save), got {cfg.checkpoint.keep_last}")
    if not 0 <= cfg.model.lora.dropout < 1:
        raise ConfigError(f"model.lora.dropout: expected a value in [0, 1), got {cfg.model.lora.dropout}")
    warmup = cfg.optim.warmup
    if warmup < 0 or (isinstance(warmup, float) and warmup >= 1):
        raise ConfigError(f"optim.warmup: expected a step count (int >= 0) or a fraction in [0, 1), got {warmup!r}")
    if not 0 <= cfg.optim.min_lr_ratio <= 1:
        raise ConfigError(f"optim.min_lr_ratio: expected a value in [0, 1], got {cfg.optim.min_lr_ratio}")
    if cfg.distributed.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"distributed.zero_stage: expected 0, 1, 2 or 3, got {cfg.distributed.zero_stage}")
    if cfg.data.num_workers < 0:
        raise ConfigError(f"data.num_workers: expected an integer >= 0, got {cfg.data.num_workers}")
    if cfg.optim.name == "adamw8bit" and cfg.distributed.backend == "fsdp":
        raise ConfigError("optim.name: adamw8bit cannot step FSDP2's sharded (DTensor) parameters (bitsandbytes has no "
                          "DTensor kernels); use adamw with fsdp (LoRA optimizer state is small), or ddp / deepspeed")
    for key in ("mt_encoder", "llm"):
        if getattr(cfg.model, key) in ("", {}):
            raise ConfigError(f"model.{key}: required (a model folder / hub id, or an inline config with model_type)")
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.sub=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: expected key.sub=value")
    # YAML parsing gives 200 -> int, true -> bool, [a, b] -> list, fsdp -> str.
    return key.split("."), yaml.safe_load(raw) if raw != "" else ""


def apply_override(data: dict, path: list[str], value: Any) -> None:
    node = data
    for depth, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(path)}: '{'.'.join(path[:depth + 1])}' is {child!r}, not a mapping")
        node = child
    node[path[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r}: expected a mapping of sections, got {type(data).__name__}")
    for text in overrides:
        apply_override(data, *parse_override(text))
    return validate(from_dict(Config, data, ""))


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
