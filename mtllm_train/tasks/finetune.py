"""Stage 2: `mtllm task-train` and `mtllm task-distill`. One loop, readable top to bottom:

set-up (process group, task model, data, backend, optimizer) -> resume -> per step: this rank's share of the
global batch, forward, loss (task-train: cross-entropy of the head; task-distill: MSE between the stack's and
the fine-tuned LLM's task representations; each averaged over the global batch's targets: examples, or the
words of a token task), backward, one optimizer step -> every task.validate_every of
training: dev scores for every language, a checkpoint, and pruning to the checkpoints S-DEV / T-DEV select.

The batch order is a function of (seed, epoch), and a global batch is cut into the same examples whatever the
world size, so the position to resume from is the step alone.
"""

from __future__ import annotations

import hashlib
import json
import math
from contextlib import closing
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from mtllm_train.checkpoint import Checkpoints
from mtllm_train.config import Config, ConfigError, accumulation_steps, stored_quantization, to_dict
from mtllm_train.distributed import all_reduce, barrier, gradient_sync, init_distributed, shutdown
from mtllm_train.files import atomic_path
from mtllm_train.loop import (Preemption, autocast, backward, check_finite_loss, end_of_step,
                              new_summary, optimizer_step, resume_line, setup_backend)
from mtllm_train.metrics import MetricsLogger, wandb_mode
from mtllm_train.model.fp8 import check_fp8_support, fp8_base
from mtllm_train.model.loss import squared_error
from mtllm_train.portable.encoding import IGNORED
from mtllm_train.portable.format import task_shape
from mtllm_train.portable.heads import word_presence
from mtllm_train.run_folder import RunFolder, open_run_folder
from mtllm_train.tasks.encode import TaskData
from mtllm_train.tasks.evaluation import Evaluator, steps_to_keep
from mtllm_train.tasks.models import (TaskModel, build_task_model, keep_stage1, load_head, load_stage1,
                                      load_teacher, merge_stage1_lora, teacher_config)
from mtllm_train.tasks.selection import read_validation, source_best_step, validation_line, write_validation


def check_task_config(cfg: Config, command: str) -> str:
    """The kind of model the command trains; required keys present."""
    kind = "stack" if command == "task-distill" else cfg.task.model
    if not cfg.task.train:
        raise ConfigError("task.train: required (the English training split)")
    if kind == "stack" and not cfg.task.init_from:
        raise ConfigError(f"task.init_from: required by {command} with the stack (the stage-1 run folder)")
    if command == "task-distill":
        if not cfg.task.teacher:
            raise ConfigError("task.teacher: required by task-distill (the task-train run of the LLM)")
        teacher_config(cfg)  # before anything is written
    if cfg.task.stage1_lora == "merge":
        if kind != "stack":
            raise ConfigError(f"task.stage1_lora: merge merges the stage-1 stack's LoRA; {command} of task.model "
                              f"{kind} has none (use continue)")
        if stored_quantization(cfg.model) != "none":
            raise ConfigError(f"task.stage1_lora: merge cannot add the stage-1 LoRA to a {cfg.model.quantization} "
                              f"base exactly (4-bit weights); use model.quantization none, or continue")
    if cfg.task.translate_test and task_shape(cfg.task.name) == "token":
        raise ConfigError("task.translate_test: token_classification labels the words of the original text, and a "
                          "translation keeps neither its words nor their order; token tasks are evaluated zero-shot")
    if cfg.task.translate_test and kind != "llm":
        raise ConfigError("task.translate_test: only a task-train run of task.model llm is evaluated on translations")
    return kind


def validation_steps(total: int, every: float) -> set[int]:
    count = math.ceil(1 / every - 1e-9)
    return {max(1, min(total, round(total * every * k))) for k in range(1, count + 1)} | {total}


def step_examples(step: int, steps_per_epoch: int, global_batch: int, count: int, seed: int) -> list[int]:
    """The example indices of optimizer step `step` (counted from 1): a fresh permutation per epoch."""
    epoch, position = divmod(step - 1, steps_per_epoch)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return order[position * global_batch:(position + 1) * global_batch].tolist()


def loss_targets(items: dict[str, list[dict]], views: list[str], token_task: bool) -> list[int]:
    """Per training example, how many targets its loss sums: one, or for token classification its words with
    tokens in every view the loss reads (a step's loss is divided by its global count, whatever the ranks)."""
    if not token_task:
        return [1] * len(items[views[0]])
    targets = []
    for index in range(len(items[views[0]])):
        spans = [items[view][index]["spans"] for view in views]  # each view's word spans of this example
        targets.append(sum(all(view_spans[word] for view_spans in spans) for word in range(len(spans[0]))))
    return targets


def teacher_representations(teacher: TaskModel, items: list[dict], batch_size: int, data: TaskData,
                            device: torch.device) -> dict[str, torch.Tensor]:
    """The teacher's task representation of every training example, in order (float32, on CPU): "representations"
    [N, ...]; for token classification one row per word of every example ([words, D]) and "present" [words]
    (the word has tokens in the teacher's view)."""
    rows, present = [], []
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            inputs, _ = data.batch(chunk, "llm")
            representation = teacher.representation(**{k: v.to(device) for k, v in inputs.items()}).float().cpu()
            if not isinstance(chunk[0]["label"], list):
                rows.append(representation)
                continue
            for row, item in enumerate(chunk):
                rows.append(representation[row, :len(item["label"])])
                present.append(word_presence(inputs["span_masks"][row, :len(item["label"])]))
    return {"representations": torch.cat(rows)} | ({"present": torch.cat(present)} if present else {})


def cache_per_example(cached: dict[str, torch.Tensor], items: list[dict]) -> dict:
    """The cache of a token task (one row per word) cut into one tensor per example; others as they are."""
    if "present" not in cached:
        return cached
    words = [len(item["label"]) for item in items]
    return {name: tensor.split(words) for name, tensor in cached.items()}


def cached_targets(cached: dict, micro: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A micro-batch's cached teacher representations (and, for token classification, their words' presence,
    padded to the batch's most words as the student's batch is)."""
    if "present" not in cached:
        return cached["representations"][micro].to(device), None
    pad = torch.nn.utils.rnn.pad_sequence
    return (pad([cached["representations"][index] for index in micro], batch_first=True).to(device),
            pad([cached["present"][index] for index in micro], batch_first=True).to(device))


def cached_teacher(cfg: Config, run: RunFolder, is_main: bool, teacher_step: int, train_spec_digest: str,
                   compute) -> dict[str, torch.Tensor]:
    """The teacher's representations from the cache, computed once (by rank 0) when the fingerprint is new.
    The fingerprint covers the training data, the teacher checkpoint and every setting that changes them."""
    teacher_checkpoints = Checkpoints(cfg.task.teacher)
    key = json.dumps({"data": train_spec_digest, "teacher": str(teacher_checkpoints.path(teacher_step).resolve()),
                      "saved_at": teacher_checkpoints.meta(teacher_step)["saved_at"],
                      "model": to_dict(cfg.model), "task": cfg.task.name, "max_length": cfg.task.max_length,
                      **({"word_pooling": cfg.task.word_pooling} if task_shape(cfg.task.name) == "token" else {})},
                     sort_keys=True)
    fingerprint = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = Path(cfg.task.cache_dir or run.teacher_cache_dir) / f"{fingerprint}.safetensors"
    if is_main and not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as partial:
            save_file(compute(), str(partial))
    barrier()
    return load_file(str(path))


def train_task(cfg: Config, command: str) -> dict:
    kind = check_task_config(cfg, command)
    dist_info = init_distributed(cfg.distributed)
    device, world_size, backend = dist_info.device, dist_info.world_size, cfg.distributed.backend
    accumulation = accumulation_steps(cfg, world_size)
    distill = command == "task-distill"

    # The task model: a new LoRA + head on the LLM or the MT encoder, or the stage-1 stack (+ the teacher).
    fp8 = cfg.model.quantization == "fp8" and kind != "mt_encoder"  # the LLM's base layers multiply in float8
    if fp8:
        check_fp8_support(device)  # before minutes of loading
    model_module = build_task_model(cfg, kind, device)
    info, merged_lora = {"command": command, "kind": kind}, None
    if kind == "stack":
        info["init_from"] = str(load_stage1(model_module, cfg.task.init_from, cfg.task.init_step))
        if cfg.task.stage1_lora == "merge":
            merged_lora = merge_stage1_lora(model_module, cfg, device)
    if fp8:  # after the merge: the stage-1 LoRA goes into the base weights, not into float8 layers
        fp8_base(model_module.backend_parts()[0], device, cfg.model.fp8_scaling)
    if distill:
        info["teacher_step"] = source_best_step(RunFolder(cfg.task.teacher))
        load_head(model_module.head, cfg.task.teacher, info["teacher_step"])  # predictions use the teacher's head
    run = open_run_folder(cfg, dist_info, info)
    # W&B decided now (its key and server), not after minutes of loading; only rank 0 logs.
    cfg.logging.wandb, wandb_note = wandb_mode(cfg.logging) if dist_info.is_main else ("disabled", None)
    if kind == "stack" and dist_info.is_main:
        keep_stage1(model_module, run, merged_lora)

    # English training data, tokenized for what reads it (the student's view; the teacher's too in distill).
    data = TaskData(cfg)
    evaluator = Evaluator(cfg, run, dist_info, kind, data)
    examples = data.split(cfg.task.train)
    evaluator.check_files()
    views = [model_module.view] + (["llm"] if distill else [])
    train_items = {view: data.encode(examples, view) for view in views}
    token_task = task_shape(cfg.task.name) == "token"
    targets = loss_targets(train_items, views, token_task)
    steps_per_epoch = len(examples) // cfg.train.global_batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"task.train: {len(examples)} examples is less than one global batch "
                          f"(train.global_batch_size {cfg.train.global_batch_size})")
    total_steps = cfg.task.epochs * steps_per_epoch
    validate_at = validation_steps(total_steps, cfg.task.validate_every)

    cached = None
    if distill:
        teacher = load_teacher(cfg, info["teacher_step"], device)
        if fp8:
            fp8_base(teacher.body, device, cfg.model.fp8_scaling)
        if cfg.task.cache_teacher:
            digest = hashlib.sha256(json.dumps(examples, sort_keys=True).encode()).hexdigest()
            computed = cached_teacher(cfg, run, dist_info.is_main, info["teacher_step"], digest, lambda: (
                teacher_representations(teacher, train_items["llm"], cfg.task.eval_batch_size, data, device)))
            cached = cache_per_example(computed, train_items["llm"])
            del teacher
        else:
            model_module.teacher = teacher

    sharded, replicated = model_module.backend_parts()
    model, optimizer, scheduler, trainable = setup_backend(model_module, cfg, dist_info, accumulation, total_steps,
                                                           sharded=sharded, replicated=replicated)
    checkpoints = Checkpoints(run.path, model=model, optimizer=optimizer, scheduler=scheduler, backend=backend,
                              dist_info=dist_info, settings=to_dict(cfg))
    resumed = checkpoints.resume()
    start_step = resumed.meta["step"] if resumed else 0
    validation = {step: dev for step, dev in read_validation(run).items() if step <= start_step}
    logger = MetricsLogger(run, cfg.logging, dist_info.is_main, start_step, total_steps,
                           resumed.meta.get("wandb_id") if resumed else None, to_dict(cfg), command)
    if resumed:
        logger.message(resume_line(resumed.path, start_step, total_steps))
    if wandb_note:
        logger.message(wandb_note)
    model.train()
    per_rank = cfg.train.global_batch_size // world_size
    student_view = model_module.view
    summary = new_summary(run.path, dist_info, start_step, total_steps)

    with Preemption(run.stop_file, dist_info.is_main) as preemption, closing(logger):
        for step in range(start_step + 1, total_steps + 1):
            indices = step_examples(step, steps_per_epoch, cfg.train.global_batch_size, len(examples), cfg.run.seed)
            mine = indices[dist_info.rank * per_rank:(dist_info.rank + 1) * per_rank]
            step_targets = max(1, sum(targets[i] for i in indices))  # every rank counts the whole global batch
            loss_sum = torch.zeros((), device=device, dtype=torch.float64)
            for index in range(accumulation):
                last = index == accumulation - 1
                micro = mine[index * cfg.data.micro_batch_size:(index + 1) * cfg.data.micro_batch_size]
                batch, labels = data.batch([train_items[student_view][i] for i in micro], student_view)
                inputs = {name: tensor.to(device) for name, tensor in batch.items()}
                labels = labels.to(device)
                if distill and cached is None:
                    teacher_batch, _ = data.batch([train_items["llm"][i] for i in micro], "llm")
                    inputs.update({f"teacher_{name}": tensor.to(device) for name, tensor in teacher_batch.items()})
                with gradient_sync(model, backend, last):
                    with autocast(cfg.distributed, device):
                        representation, logits, teacher_representation = model(**inputs)
                        if distill:
                            teacher_present = None
                            if cached is not None:
                                teacher_representation, teacher_present = cached_targets(cached, micro, device)
                            # Every target vector (one per example, per answer or per word) weighs the same.
                            errors = squared_error(representation, teacher_representation)
                            if token_task:  # the words both views have tokens for
                                if teacher_present is None:
                                    teacher_present = word_presence(inputs["teacher_span_masks"])
                                both = word_presence(inputs["span_masks"]) & teacher_present
                                loss = errors[both].sum() * world_size / step_targets
                            else:
                                per_example = errors.numel() // len(micro)
                                loss = errors.sum() * world_size / (cfg.train.global_batch_size * per_example)
                        else:
                            if token_task:  # a word without tokens in this view is not trained on
                                labels = labels.masked_fill(~word_presence(inputs["span_masks"]), IGNORED)
                            loss = F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), reduction="sum",
                                                   ignore_index=IGNORED) * world_size / step_targets
                    backward(model, loss, backend, last)
                loss_sum += loss.detach().double() / world_size
            loss_value = all_reduce(loss_sum).item()
            check_finite_loss(loss_value, step)
            lr = optimizer.param_groups[0]["lr"]
            grad_norm = optimizer_step(model, optimizer, scheduler, trainable, backend, cfg.train.grad_clip, step)
            record = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                      "epoch": (step - 1) // steps_per_epoch}
            summary["losses"].append(loss_value)
            summary["end_step"] = step

            if step in validate_at:
                validation[step] = evaluator.scores(model, "dev")
                record.update({f"dev/{key}": value for key, value in validation[step].items()})
                if dist_info.is_main:
                    write_validation(run, validation)
                logger.message(validation_line(step, validation))
            logger.log(record)
            if end_of_step(step, step in validate_at, preemption=preemption, checkpoints=checkpoints,
                           logger=logger, summary=summary, device=device, keep_last=cfg.checkpoint.keep_last,
                           keep_steps=steps_to_keep(validation, evaluator.prefixes)):
                break
    shutdown()
    return summary
