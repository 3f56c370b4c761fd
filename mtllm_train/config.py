"""Typed run configuration: dataclasses, YAML files and `key.sub=value` overrides.

Every user mistake (unknown key, wrong type, bad choice) raises ConfigError with one line that names the
dotted key and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from mtllm_train.files import write_atomic
from mtllm_train.portable.pooling import POOLINGS, WORD_POOLINGS


class ConfigError(ValueError):
    """A configuration value a user supplied is wrong; the message names the key."""


def option(default: Any, help: str) -> Any:
    """A config field with its documentation (the README's configuration reference is generated from it)."""
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        factory = default if callable(default) else (lambda value=default: type(value)(value))
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class RunConfig:
    name: str = option("default", "run name: the run folder is run.dir/run.name")
    dir: str = option("runs", "parent folder of run folders")
    seed: int = option(0, "data order and dropout seed")


@dataclass
class LoraSettings:
    r: int = option(16, "LoRA rank")
    alpha: int = option(32, "LoRA alpha (scale alpha / r)")
    dropout: float = option(0.05, "dropout on the LoRA input")
    target_modules: Union[str, list] = option("all-linear", "peft target modules; all-linear: every linear layer "
                                                            "but the output head")


@dataclass
class ModelConfig:
    mt_encoder: Union[str, dict] = option("", "MT encoder: folder, hub id, or inline HF config with model_type "
                                              "(random init); an encoder-decoder contributes its encoder")
    llm: Union[str, dict] = option("", "LLM: folder, hub id, or inline HF config with model_type (random init)")
    mt_tokenizer: str = option("", "MT tokenizer folder or id; default: model.mt_encoder when that is a path/id")
    llm_tokenizer: str = option("", "LLM tokenizer folder or id; default: model.llm when that is a path/id")
    bidirectional: bool = option(False, "full (non-causal) attention in the LLM, the LLM2Vec setting")
    quantization: str = option("none", "frozen base LLM in 4 bits (nf4, fp4: bitsandbytes) or with float8 matmuls "
                                       "(fp8: torchao; GPUs of compute capability 8.9+, e.g. H100; its float8 "
                                       "weights stay whole on every rank, FSDP / ZeRO-3 do not shard them)")
    fp8_scaling: str = option("rowwise", "fp8: one float8 scale per row of every weight, activation and gradient "
                                         "(rowwise), or one per tensor (tensorwise: cheaper to quantize, coarser)")
    quant_double: bool = option(True, "double quantization of the 4-bit scales")
    quant_compute_dtype: str = option("bfloat16", "compute dtype of the 4-bit layers")
    quant_storage_dtype: str = option("bfloat16", "storage dtype of packed 4-bit weights (bfloat16 lets FSDP "
                                                  "shard them)")
    dtype: str = option("float32", "dtype of the frozen weights (bfloat16 on GPU)")
    lora: LoraSettings = option(LoraSettings, "LoRA adapters on the LLM")
    pooling: str = option("mean", "pooled vector: mean over real tokens, last (eos) or first (bos) real token")
    init_seed: int = option(0, "seed of every random init (inline models, LoRA, projection): same on all ranks")
    activation_checkpointing: Union[str, bool] = option(
        "none", "LLM layers whose activations the backward pass recomputes: none, full (every layer), every_<k> "
                "(every k-th layer: less recompute, more memory) or selective (every layer keeps its frozen "
                "matmuls' and attention's outputs, recomputes LoRA and elementwise ops); true / false mean full / "
                "none")
    compile: bool = option(False, "torch.compile each LLM layer (after the backend wrapped it)")
    projection_init: str = option("random", "start of U: random (the paper), or least_squares: fit U before step 1 "
                                            "from the MT encoder's word states to the LLM's input embeddings of the "
                                            "same words (needs shards with word spans)")
    projection_init_samples: int = option(2048, "least_squares: training sequences the fit reads")


@dataclass
class DataConfig:
    shards: str = option("", "shard folder written by `mtllm shards build`: a local folder, its http(s):// URL, or a "
                             "pipe: command with {} for the file name (e.g. 'pipe:aws s3 cp s3://bucket/shards/{} -')")
    max_length: int = option(512, "tokens per view; must not be below the shards' max length")
    micro_batch_size: int = option(8, "sequences per rank per forward pass")
    num_workers: int = option(1, "DataLoader worker processes per rank (0: read in the training process)")
    skip_bad_samples: bool = option(False, "skip (and count) corrupt samples instead of stopping")
    length_group_batches: int = option(16, "batches per length-sorting buffer (sorted, cut, shuffled)")
    pad_multiple: int = option(1, "pad each view of a batch to a multiple of this many tokens, at most "
                                  "data.max_length (1: to its longest sequence; data.max_length: every batch one "
                                  "shape). With model.compile a few fixed lengths, each aligned for the matmuls")
    eval_shards: str = option("", "held-out shard folder (same tokenizers), evaluated every data.eval_every steps")
    eval_every: int = option(0, "evaluate on data.eval_shards every N steps (and after the last); 0: never")
    eval_batches: int = option(0, "micro-batches per rank and evaluation; 0: one pass over data.eval_shards")


@dataclass
class TrainConfig:
    steps: int = option(1000, "optimizer steps")
    global_batch_size: int = option(256, "sequences per step = micro batch x accumulation x world size")
    grad_clip: float = option(1.0, "max gradient norm; 0 disables clipping")
    init_from: str = option("", "stage 1: another stage-1 run folder whose checkpoint this run starts from (LoRA "
                                "and U; a fresh optimizer and schedule): to train longer")
    init_step: int = option(0, "checkpoint step of train.init_from; 0: its newest")


@dataclass
class LossConfig:
    sequence_weight: float = option(1.0, "weight of the MSE between the student's and the teacher's pooled vectors "
                                          "(the paper's loss)")
    span_weight: float = option(0.0, "weight of the MSE between mean-pooled word spans of both last hidden states "
                                     "(needs shards with word spans; the authors' later work used 2/3 span, 1/3 "
                                     "sequence)")
    contrastive_weight: float = option(0.0, "weight of an in-batch InfoNCE term (student vector -> its teacher "
                                            "vector among the micro-batch's): a collapsed student cannot lower it")
    contrastive_temperature: float = option(0.05, "InfoNCE temperature (on cosine similarities)")


@dataclass
class OptimConfig:
    name: str = option("adamw", "optimizer: torch AdamW or bitsandbytes 8-bit AdamW")
    lr: float = option(2e-4, "peak learning rate")
    weight_decay: float = option(0.01, "AdamW weight decay (not on biases and norms)")
    betas: list = option([0.9, 0.999], "Adam betas")
    warmup: Union[int, float] = option(0.01, "warmup: an int is steps, a float below 1 a fraction of train.steps")
    schedule: str = option("linear", "decay after warmup")
    min_lr_ratio: float = option(0.0, "final lr / peak lr")


@dataclass
class DistributedConfig:
    backend: str = option("none", "none: one process; ddp; fsdp (FSDP2 per LLM layer); deepspeed (ZeRO)")
    mixed_precision: str = option("none", "bf16: FSDP/DeepSpeed param dtype and autocast on GPU")
    fsdp_reduce_dtype: str = option("float32", "FSDP gradient reduction dtype under bf16")
    zero_stage: int = option(2, "DeepSpeed ZeRO stage (0-3) when no deepspeed_config is given")
    deepspeed_config: str = option("", "a DeepSpeed json; batch sizes and clipping still come from this config")
    timeout_minutes: int = option(30, "process-group timeout")


@dataclass
class ProbeConfig:
    sets: list = option([], "bitext files for the multilingual probe (jsonl / tsv / parquet: lang, text, english; "
                            "lang a FLORES-200 code), e.g. shards/sample/bitext_probe.jsonl")
    every: int = option(0, "run the probe every N steps and after the last: X <-> English retrieval R@1 per "
                           "language; 0: never")
    select: str = option("stack", "the mean R@1 that picks the best checkpoint (kept through pruning; mtllm export "
                                  "--best): stack (X and English both read by the stack: the exported embedder) or "
                                  "teacher (English read by the teacher: what stage 1 trains)")
    patience: int = option(0, "stop early when the probe has not improved for this many probes; 0: never")


@dataclass
class CheckpointConfig:
    every: int = option(1000, "checkpoint every N steps (and at the end, and on preemption)")
    keep_last: int = option(2, "complete checkpoints kept (at least 2)")


@dataclass
class LoggingConfig:
    every: int = option(1, "write metrics every N steps")
    wandb: str = option("disabled", "Weights & Biases mode")
    project: str = option("mtllm-train", "W&B project")
    entity: str = option("", "W&B entity (team); empty: your default")
    group: str = option("", "W&B group; empty: the stage-1 run's name (its own in stage 1, task.init_from's in stage 2)")
    progress_bar: bool = option(True, "progress bar with ETA on rank 0")


@dataclass
class EvalSet:
    benchmark: str = option("", "language table of the benchmark (xnli, americas_nli, kardes_nlu, nusax, pawsx, xcopa, "
                                "wikiann, masakhaner, udpos; "
                                "belebele and sib200 use FLORES-200 codes, as does a benchmark of your own)")
    languages: list = option([], "benchmark language codes to validate and test on")
    dev: str = option("", "dev split: a file path with {lang}, or hf://org/dataset[/config]:split with {lang}")
    test: str = option("", "test split, same forms as dev")


@dataclass
class TaskConfig:
    name: str = option("nli", "task: nli (premise + hypothesis jointly), sentiment (one text), belebele "
                              "(passage, question and four answers jointly; multiple choice), or the general forms "
                              "classification (one text), pair_classification (two texts), multiple_choice "
                              "(task.choices answers), token_classification (a label per word: NER, POS)")
    model: str = option("llm", "what task-train fine-tunes: the LLM + a new LoRA, the MT encoder + LoRA, or the "
                               "stage-1 stack (S1+FT); task-distill always trains the stack")
    labels: list = option([], "label names (sentiment, classification, pair_classification; NLI: entailment, "
                              "neutral, contradiction); the data's labels are these names or their indices")
    choices: int = option(4, "answers per example of a multiple-choice task (Belebele 4, XCOPA 2)")
    word_pooling: str = option("first", "token_classification: a word is read from its first token's output, or "
                                        "the mean of its tokens'")
    train: str = option("", "English training split: jsonl / csv / parquet file, or hf://org/dataset[/config]:split")
    source_dev: str = option("", "English dev split, the source of S-DEV selection")
    eval: list = option([], "evaluation sets, each {benchmark, languages, dev, test}")
    language_fallbacks: dict = option({}, "benchmark language -> MT language code, for languages the MT model lacks")
    epochs: int = option(3, "passes over the training split (stage 2 ignores train.steps)")
    validate_every: float = option(0.1, "validate and checkpoint every this fraction of the training steps")
    max_length: int = option(256, "tokens per example and view")
    metric: str = option("accuracy", "reported score (macro_f1: NusaX; entity_f1: seqeval's entity F1 of a "
                                     "token_classification task with BIO labels, e.g. NER)")
    init_from: str = option("", "stage-1 run folder the stack starts from (task.model stack, and task-distill)")
    init_step: int = option(0, "checkpoint step of task.init_from; 0: its newest")
    stage1_lora: str = option("continue", "the stack's stage-1 LoRA in stage 2: continue training it (the paper), or "
                                          "merge it into the frozen LLM and train a fresh task LoRA (the authors' "
                                          "released model)")
    teacher: str = option("", "task-distill: the task-train run (task.model llm) whose S-DEV checkpoint teaches")
    cache_teacher: bool = option(False, "task-distill: compute the teacher's task representations once and cache "
                                        "them (keyed by a fingerprint of data, teacher and settings)")
    cache_dir: str = option("", "teacher cache folder; default RUN/teacher_cache")
    translate_test: bool = option(False, "task.model llm: also validate and test on MT translations into English")
    translator: Union[str, dict] = option("", "translate-test MT model (seq2seq: folder, hub id or inline config)")
    translator_tokenizer: str = option("", "translate-test tokenizer; default model.mt_tokenizer")
    max_new_tokens: int = option(256, "translate-test: most tokens generated per text (greedy)")
    eval_batch_size: int = option(32, "examples per evaluation forward pass")


@dataclass
class Config:
    run: RunConfig = option(RunConfig, "")
    model: ModelConfig = option(ModelConfig, "")
    data: DataConfig = option(DataConfig, "")
    train: TrainConfig = option(TrainConfig, "")
    loss: LossConfig = option(LossConfig, "")
    probe: ProbeConfig = option(ProbeConfig, "")
    optim: OptimConfig = option(OptimConfig, "")
    distributed: DistributedConfig = option(DistributedConfig, "")
    checkpoint: CheckpointConfig = option(CheckpointConfig, "")
    logging: LoggingConfig = option(LoggingConfig, "")
    task: TaskConfig = option(TaskConfig, "")


FOUR_BIT = ("nf4", "fp4")  # model.quantization values that store the base in 4 bits (fp8: how it multiplies)


def stored_quantization(model: ModelConfig) -> str:
    """How the frozen LLM's weights are stored: nf4 / fp4, or none (in model.dtype; fp8 only changes how a
    training run multiplies them, model/fp8.py)."""
    return model.quantization if model.quantization in FOUR_BIT else "none"

CHOICES = {
    "model.quantization": ("none", *FOUR_BIT, "fp8"),
    "model.fp8_scaling": ("rowwise", "tensorwise"),
    "probe.select": ("stack", "teacher"),
    "model.pooling": POOLINGS,
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.quant_compute_dtype": ("float32", "bfloat16", "float16"),
    "model.quant_storage_dtype": ("float32", "bfloat16", "float16", "uint8"),
    "model.projection_init": ("random", "least_squares"),
    "optim.name": ("adamw", "adamw8bit"),
    "optim.schedule": ("linear", "cosine", "constant"),
    "distributed.backend": ("none", "ddp", "fsdp", "deepspeed"),
    "distributed.mixed_precision": ("none", "bf16"),
    "distributed.fsdp_reduce_dtype": ("float32", "bfloat16"),
    "logging.wandb": ("disabled", "offline", "online"),
    "task.name": ("nli", "sentiment", "belebele", "classification", "pair_classification", "multiple_choice",
                  "token_classification"),
    "task.model": ("llm", "mt_encoder", "stack"),
    "task.metric": ("accuracy", "macro_f1", "entity_f1"),
    "task.word_pooling": WORD_POOLINGS,
    "task.stage1_lora": ("continue", "merge"),
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
    if tp is float and isinstance(value, str):
        # PyYAML (YAML 1.1) reads 3e-4 (no dot) as a string; users mean the number.
        try:
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, checking every key and type (prefix names the section)."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if not isinstance(key, str):  # YAML reads `on:` / `1:` as a bool / an int
            where = f"{prefix}.{key!r}" if prefix else repr(key)
            raise ConfigError(f"config key {where}: expected a name (quote it in YAML), got {type(key).__name__}")
        if key not in known:
            where = f"{prefix}.{key}" if prefix else key
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean '{prefix + '.' if prefix else ''}{close[0]}'? " if close else ""
            raise ConfigError(f"unknown config key '{where}'; {hint}expected one of: {', '.join(sorted(known))}")
    values = {}
    for name in known & data.keys():
        where = f"{prefix}.{name}" if prefix else name
        values[name] = _coerce(data[name], hints[name], where)
    return cls(**values)


def flat_settings(config: Any, prefix: str = "") -> dict[str, Any]:
    """{"section.key": value} for every option of a config (nested sections flattened; inline model configs,
    lists and mappings are values)."""
    settings = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            settings.update(flat_settings(value, f"{prefix}{f.name}."))
        else:
            settings[f"{prefix}{f.name}"] = value
    return settings


def checkpointing_policy(value: str | bool) -> str:
    """model.activation_checkpointing as a policy name; true / false (the older form) are full / none."""
    policy = {True: "full", False: "none"}[value] if isinstance(value, bool) else value
    if not re.fullmatch(r"none|full|selective|every_([2-9]|[1-9]\d+)", policy):
        raise ConfigError(f"model.activation_checkpointing: expected none, full, selective or every_<k> (k >= 2), "
                          f"or true / false, got {value!r}")
    return policy


MAX_RUN_NAME = 200


def check_backend(backend: str, world_size: int) -> None:
    if backend == "none" and world_size > 1:
        raise ConfigError(f"distributed.backend: 'none' cannot run on {world_size} processes; use ddp, fsdp or deepspeed")


def accumulation_steps(cfg: Config, world_size: int) -> int:
    """Micro-batches per rank and step: the global batch must split evenly over micro batches and ranks."""
    per_step = cfg.data.micro_batch_size * world_size
    if cfg.train.global_batch_size % per_step:
        raise ConfigError(f"train.global_batch_size {cfg.train.global_batch_size} is not a multiple of "
                          f"data.micro_batch_size {cfg.data.micro_batch_size} x world size {world_size} = {per_step}")
    return cfg.train.global_batch_size // per_step


def validate(cfg: Config) -> Config:
    flat = to_dict(cfg)
    for key, options in CHOICES.items():
        section, name = key.split(".")
        if flat[section][name] not in options:
            raise ConfigError(f"{key}: expected one of {', '.join(options)}, got {flat[section][name]!r}")
    # YAML reads .nan and .inf (a float field also takes 'nan'); the range checks below let NaN through (every
    # comparison with it is false), so refuse non-finite values first.
    for key, value in flat_settings(cfg).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    positive = {"train.steps": cfg.train.steps, "train.global_batch_size": cfg.train.global_batch_size,
                "data.micro_batch_size": cfg.data.micro_batch_size, "data.max_length": cfg.data.max_length,
                "checkpoint.every": cfg.checkpoint.every, "logging.every": cfg.logging.every,
                "model.lora.r": cfg.model.lora.r, "optim.lr": cfg.optim.lr,
                "model.projection_init_samples": cfg.model.projection_init_samples,
                "loss.contrastive_temperature": cfg.loss.contrastive_temperature,
                "data.length_group_batches": cfg.data.length_group_batches, "data.pad_multiple": cfg.data.pad_multiple,
                "task.epochs": cfg.task.epochs,
                "task.max_length": cfg.task.max_length, "task.eval_batch_size": cfg.task.eval_batch_size,
                "task.max_new_tokens": cfg.task.max_new_tokens, "task.choices": cfg.task.choices,
                "distributed.timeout_minutes": cfg.distributed.timeout_minutes}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: expected a positive value, got {value!r}")
    non_negative = {"data.num_workers": cfg.data.num_workers, "optim.weight_decay": cfg.optim.weight_decay,
                    "train.grad_clip": cfg.train.grad_clip, "data.eval_every": cfg.data.eval_every,
                    "data.eval_batches": cfg.data.eval_batches, "loss.sequence_weight": cfg.loss.sequence_weight,
                    "loss.span_weight": cfg.loss.span_weight, "loss.contrastive_weight": cfg.loss.contrastive_weight,
                    "probe.every": cfg.probe.every, "probe.patience": cfg.probe.patience}
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{key}: expected a value >= 0, got {value!r}")
    if cfg.checkpoint.keep_last < 2:
        raise ConfigError(f"checkpoint.keep_last: expected at least 2 (one complete checkpoint must survive a "
                          f"crash during the next save), got {cfg.checkpoint.keep_last}")
    if cfg.loss.sequence_weight + cfg.loss.span_weight + cfg.loss.contrastive_weight == 0:
        raise ConfigError("loss: every weight is 0 (loss.sequence_weight, loss.span_weight, loss.contrastive_weight); "
                          "expected at least one positive weight")
    if cfg.loss.contrastive_weight and cfg.data.micro_batch_size < 2:
        raise ConfigError(f"loss.contrastive_weight: in-batch negatives need data.micro_batch_size >= 2, got "
                          f"{cfg.data.micro_batch_size}")
    if cfg.probe.every and not cfg.probe.sets:
        raise ConfigError(f"probe.every: {cfg.probe.every} but probe.sets is empty; expected bitext files (e.g. "
                          f"shards/sample/bitext_probe.jsonl)")
    if cfg.data.eval_every and not cfg.data.eval_shards:
        raise ConfigError(f"data.eval_every: {cfg.data.eval_every} but data.eval_shards is empty; expected a held-out "
                          f"shard folder")
    cfg.model.activation_checkpointing = checkpointing_policy(cfg.model.activation_checkpointing)
    if not 0 <= cfg.model.lora.dropout < 1:
        raise ConfigError(f"model.lora.dropout: expected a value in [0, 1), got {cfg.model.lora.dropout}")
    if not cfg.run.name or "/" in cfg.run.name or cfg.run.name in (".", ".."):
        raise ConfigError(f"run.name: expected a folder name inside run.dir (no '/'), got {cfg.run.name!r}")
    if len(cfg.run.name.encode()) > MAX_RUN_NAME:  # file systems take 255 bytes; exports add a suffix beside it
        raise ConfigError(f"run.name: {len(cfg.run.name.encode())} bytes; a run name is at most {MAX_RUN_NAME} bytes "
                          f"(a folder name the file system takes, with room for what export puts beside it)")
    if cfg.model.lora.alpha <= 0:
        raise ConfigError(f"model.lora.alpha: expected a positive value (the adapters' scale is alpha / r), got "
                          f"{cfg.model.lora.alpha}")
    warmup = cfg.optim.warmup
    if warmup < 0 or (isinstance(warmup, float) and warmup >= 1):
        raise ConfigError(f"optim.warmup: expected a step count (int >= 0) or a fraction in [0, 1), got {warmup!r}")
    betas = cfg.optim.betas
    # type(), not isinstance(): true/false are ints to isinstance but no beta.
    if len(betas) != 2 or not all(type(b) in (int, float) and 0 <= b < 1 for b in betas):
        raise ConfigError(f"optim.betas: expected two numbers in [0, 1), got {betas!r}")
    if not 0 <= cfg.optim.min_lr_ratio <= 1:
        raise ConfigError(f"optim.min_lr_ratio: expected a value in [0, 1], got {cfg.optim.min_lr_ratio}")
    if cfg.distributed.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"distributed.zero_stage: expected 0, 1, 2 or 3, got {cfg.distributed.zero_stage}")
    if cfg.optim.name == "adamw8bit" and cfg.distributed.backend == "fsdp":
        raise ConfigError("optim.name: adamw8bit cannot step FSDP2's sharded (DTensor) parameters (bitsandbytes has no "
                          "DTensor kernels); use adamw with fsdp (LoRA optimizer state is small), or ddp / deepspeed")
    if not 0 < cfg.task.validate_every <= 1:
        raise ConfigError(f"task.validate_every: expected a fraction in (0, 1], got {cfg.task.validate_every}")
    if cfg.task.metric == "entity_f1":
        if cfg.task.name != "token_classification":
            raise ConfigError(f"task.metric: entity_f1 scores the labelled words of token_classification, not "
                              f"{cfg.task.name}; expected accuracy or macro_f1")
        not_bio = [label for label in cfg.task.labels if label != "O" and not re.fullmatch(r"[BI]-.+", str(label))]
        if not_bio:
            raise ConfigError(f"task.labels: entity_f1 reads BIO tags (O, B-<type>, I-<type>); {not_bio[0]!r} is not "
                              f"one (score POS-like labels with accuracy)")
    for index, entry in enumerate(cfg.task.eval):
        if not isinstance(entry, dict):
            raise ConfigError(f"task.eval[{index}]: expected a mapping with benchmark, languages, dev, test")
        from_dict(EvalSet, entry, f"task.eval[{index}]")
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
    try:
        return key.split("."), yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({_yaml_problem(err)})") from None


def _yaml_problem(err: yaml.YAMLError) -> str:
    """The cause of a YAML error in one line (str(err) adds lines of context, position and a caret)."""
    return getattr(err, "problem", None) or getattr(err, "reason", None) or type(err).__name__


def apply_override(data: dict, path: list[str], value: Any) -> None:
    node = data
    for depth, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(path)}: '{'.'.join(path[:depth + 1])}' is {child!r}, not a mapping")
        node = child
    node[path[-1]] = value


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        both_mappings = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merge(merged[key], value) if both_mappings and key not in INLINE_MODEL_KEYS else value
    return merged


# An inline model config replaces the base's whole: merging two model configs key by key would mix models.
INLINE_MODEL_KEYS = ("mt_encoder", "llm", "translator")


# Inputs a config names (tokenizers, models, shards, data files) travel with it: in a config file they resolve
# against the file's folder, in an override against the current folder. Run folders (run.dir, train.init_from,
# task.init_from, task.teacher, task.cache_dir) are where the user works, so they stay relative to the current folder.
INPUT_PATH_KEYS = ("data.shards", "data.eval_shards", "distributed.deepspeed_config", "task.train", "task.source_dev",
                   "task.eval.dev", "task.eval.test", "probe.sets")
# A model or tokenizer is also a hub id: it is a path when it starts with ./ or ../ or exists there (or, from a
# config file, in the current folder, where the paper configs' `models/...` folders are made).
MODEL_PATH_KEYS = ("model.mt_encoder", "model.llm", "model.mt_tokenizer", "model.llm_tokenizer", "task.translator",
                   "task.translator_tokenizer")


def resolve_input_path(key: str, value: Any, folder: Path) -> Any:
    """`value` of option `key` as an absolute path when it is a relative input path (URLs, pipe: commands, hub
    ids, inline configs and absolute paths are returned as they are); a list of them (probe.sets) item by item."""
    if isinstance(value, list) and key in INPUT_PATH_KEYS:
        return [resolve_input_path(key, item, folder) for item in value]
    if key not in INPUT_PATH_KEYS + MODEL_PATH_KEYS or not isinstance(value, str) or not value:
        return value
    if "://" in value or value.startswith("pipe:") or Path(value).is_absolute():
        return value
    candidate = Path(os.path.abspath(folder / value))
    if key in MODEL_PATH_KEYS and not value.startswith(("./", "../")) and not candidate.exists():
        # What transformers would load from the current folder, made absolute: the run's config.yaml and its
        # export must name the same folder from anywhere.
        return os.path.abspath(value) if Path(value).exists() else value
    return str(candidate)


def _resolve_input_paths(data: dict, folder: Path) -> dict:
    """A config file's mapping with its relative input paths resolved against `folder`."""
    for section, options in data.items():
        if not isinstance(options, dict):
            continue
        for name, value in options.items():
            if section == "task" and name == "eval" and isinstance(value, list):
                for entry in value:
                    if isinstance(entry, dict):
                        entry.update({k: resolve_input_path(f"task.eval.{k}", v, folder) for k, v in entry.items()})
            else:
                options[name] = resolve_input_path(f"{section}.{name}", value, folder)
    return data


# Parsing is bounded: a config file is at most CONFIG_LIMIT bytes and may not use YAML aliases (an alias-bomb expands
# a few hundred bytes into billions of values), base: chains cannot cycle.
CONFIG_LIMIT = 1 << 20


def read_config_file(path: str | Path, seen: tuple = ()) -> dict:
    """A YAML config as a mapping; `base: other.yaml` (relative to this file) is read first and updated. Relative
    input paths are resolved against the folder of the file that names them."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    if path.resolve() in seen:
        raise ConfigError(f"config file {str(path)!r} is its own base (a cycle of base: keys)")
    if path.stat().st_size > CONFIG_LIMIT:
        raise ConfigError(f"config file {str(path)!r} holds {path.stat().st_size} bytes; a config is at most "
                          f"{CONFIG_LIMIT} (is it the right file?)")
    try:
        text = path.read_text(encoding="utf-8")
        if any(isinstance(event, yaml.AliasEvent) for event in yaml.parse(text, Loader=yaml.SafeLoader)):
            raise ConfigError(f"config file {str(path)!r}: YAML aliases (*name) are not read; write the values out "
                              f"(or use base: for a shared part)")
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text (byte {err.start}); is it the right "
                          f"file?") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r}: expected a mapping of sections, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"config file {str(path)!r}: base: expected the path of another config file, got "
                          f"{base!r}")
    _resolve_input_paths(data, path.parent)
    if base is None:
        return data
    return _merge(read_config_file(path.parent / base, seen + (path.resolve(),)), data)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    data = read_config_file(path) if path is not None else {}
    for text in overrides:
        key, value = parse_override(text)
        apply_override(data, key, resolve_input_path(".".join(key), value, Path.cwd()))
    return validate(from_dict(Config, data, ""))


def dump_config(cfg: Config, path: str | Path) -> None:
    """Atomically: on resume the other ranks read the run's config.yaml (check_resume_settings) while rank 0
    rewrites it, and a truncated file would read as an empty config."""
    write_atomic(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))


def config_reference(cls: type = Config, prefix: str = "") -> list[str]:
    """Markdown rows `| key | default | values | meaning |` for every leaf option, from the dataclasses."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(hints[f.name]):
            rows += config_reference(hints[f.name], key)
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        values = ", ".join(CHOICES[key]) if key in CHOICES else _type_name(hints[f.name])
        rows.append(f"| `{key}` | `{json.dumps(default)}` | {values} | {f.metadata['help']} |")
    return rows
