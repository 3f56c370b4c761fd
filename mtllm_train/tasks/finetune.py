"""Stage 2: `mtllm task-train` and `mtllm task-distill`. One loop, readable top to bottom:

set-up (process group, task model, data, backend, optimizer) -> resume -> per step: this rank's share of the
global batch, forward, loss (task-train: cross-entropy of the head; task-distill: MSE between the stack's and
the fine-tuned LLM's task representations), backward, one optimizer step -> every task.validate_every of
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

from mtllm_train.checkpoint import checkpoint_path, save_checkpoint
from mtllm_train.config import Config, ConfigError, dump_config, to_dict
from mtllm_train.data.views import pad_id, set_source_language
from mtllm_train.distributed import all_reduce, barrier, gradient_sync, init_distributed, shutdown
from mtllm_train.engine import (Preemption, accumulation_steps, backward, check_finite_loss, optimizer_step,
                                resume, setup_backend)
from mtllm_train.metrics import MetricsLogger
from mtllm_train.model.loss import squared_error
from mtllm_train.tasks.data import load_split
from mtllm_train.tasks.encode import collate, encode_examples
from mtllm_train.tasks.evaluation import ENGLISH, Evaluator, read_validation, source_best_step, steps_to_keep
from mtllm_train.tasks.models import (TaskModel, build_task_model, load_head, load_stage1, load_teacher,
                                      teacher_config)


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
    if cfg.task.translate_test and kind != "llm":
        raise ConfigError("task.translate_test: only a task-train run of task.model llm is evaluated on translations")
    return kind


def check_run_folder(run_dir: Path, info: dict) -> None:
    """Never write into another kind of run: a stage-1 run, or a stage-2 run of another command or model."""
    if not (run_dir / "config.yaml").is_file():
        return
    if not (run_dir / "task.json").is_file():
        raise ConfigError(f"run folder {run_dir} holds a stage-1 run; give this stage-2 run its own run.name")
    existing = json.loads((run_dir / "task.json").read_text())
    if (existing["command"], existing["kind"]) != (info["command"], info["kind"]):
        raise ConfigError(f"run folder {run_dir} holds a {existing['command']} run of the {existing['kind']}; this is "
                          f"{info['command']} of the {info['kind']}: give it its own run.name")


def validation_steps(total: int, every: float) -> set[int]:
    count = math.ceil(1 / every - 1e-9)
    return {max(1, min(total, round(total * every * k))) for k in range(1, count + 1)} | {total}


def step_examples(step: int, steps_per_epoch: int, global_batch: int, count: int, seed: int) -> list[int]:
    """The example indices of optimizer step `step` (0-based): a fresh permutation per epoch."""
    epoch, position = divmod(step, steps_per_epoch)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return order[position * global_batch:(position + 1) * global_batch].tolist()


def teacher_representations(teacher: TaskModel, items: list[dict], batch_size: int, pad: int,
                            device: torch.device) -> torch.Tensor:
    """The teacher's task representation of every training example, in order (float32, on CPU)."""
    out = []
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            inputs, _ = collate(items[start:start + batch_size], pad)
            out.append(teacher.representation(**{k: v.to(device) for k, v in inputs.items()}).float().cpu())
    return torch.cat(out)


def cached_teacher(cfg: Config, run_dir: Path, is_main: bool, teacher_step: int, train_spec_digest: str,
                   compute) -> torch.Tensor:
    """The teacher's representations from the cache, computed once (by rank 0) when the fingerprint is new.
    The fingerprint covers the training data, the teacher checkpoint and every setting that changes them."""
    teacher_checkpoint = checkpoint_path(Path(cfg.task.teacher), teacher_step)
    key = json.dumps({"data": train_spec_digest, "teacher": str(teacher_checkpoint.resolve()),
                      "saved_at": json.loads((teacher_checkpoint / "meta.json").read_text())["saved_at"],
                      "model": to_dict(cfg.model), "task": cfg.task.name, "max_length": cfg.task.max_length},
                     sort_keys=True)
    fingerprint = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = Path(cfg.task.cache_dir or run_dir / "teacher_cache") / f"{fingerprint}.safetensors"
    if is_main and not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"representations": compute()}, str(path.with_suffix(".partial")))
        path.with_suffix(".partial").replace(path)
    barrier()
    return load_file(str(path))["representations"]


def train_task(cfg: Config, command: str) -> dict:
    kind = check_task_config(cfg, command)
    dist_info = init_distributed(cfg)
    device, world_size, backend = dist_info.device, dist_info.world_size, cfg.distributed.backend
    accumulation = accumulation_steps(cfg, world_size)
    run_dir = Path(cfg.run.dir) / cfg.run.name
    distill = command == "task-distill"

    # The task model: a new LoRA + head on the LLM or the MT encoder, or the stage-1 stack (+ the teacher).
    model_module = build_task_model(cfg, kind)
    info = {"command": command, "kind": kind}
    if kind == "stack":
        info["init_from"] = str(load_stage1(model_module, cfg.task.init_from, cfg.task.init_step))
    if distill:
        info["teacher_step"] = source_best_step(Path(cfg.task.teacher))
        load_head(model_module.head, cfg.task.teacher, info["teacher_step"])  # predictions use the teacher's head
    check_run_folder(run_dir, info)
    if dist_info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / "config.yaml")
        (run_dir / "task.json").write_text(json.dumps(info, indent=1))
    torch.manual_seed(cfg.run.seed * 1000 + dist_info.rank)  # LoRA dropout: restored on resume

    # English training data, tokenized for what reads it (the student's view; the teacher's too in distill).
    evaluator = Evaluator(cfg, run_dir, dist_info, kind)
    tokenizers = evaluator.tokenizers
    set_source_language(tokenizers["mt"], ENGLISH)
    examples = load_split(cfg.task.train, cfg.task.name, evaluator.labels)
    views = [model_module.view] + (["llm"] if distill else [])
    pads = {view: pad_id(tokenizer) for view, tokenizer in tokenizers.items()}
    train_items = {view: encode_examples(examples, cfg.task.name, tokenizers[view], cfg.task.max_length)
                   for view in views}
    steps_per_epoch = len(examples) // cfg.train.global_batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"task.train: {len(examples)} examples is less than one global batch "
                          f"(train.global_batch_size {cfg.train.global_batch_size})")
    total_steps = cfg.task.epochs * steps_per_epoch
    validate_at = validation_steps(total_steps, cfg.task.validate_every)

    cached = None
    if distill:
        teacher = load_teacher(cfg, info["teacher_step"]).to(device)
        if cfg.task.cache_teacher:
            digest = hashlib.sha256(json.dumps(examples, sort_keys=True).encode()).hexdigest()
            cached = cached_teacher(cfg, run_dir, dist_info.is_main, info["teacher_step"], digest, lambda: teacher_representations(
                teacher, train_items["llm"], cfg.task.eval_batch_size, pads["llm"], device))
            del teacher
        else:
            model_module.teacher = teacher

    model_module.to(device)
    sharded, replicated = model_module.backend_parts()
    model, optimizer, scheduler, trainable = setup_backend(model_module, cfg, dist_info, accumulation, total_steps,
                                                           sharded=sharded, replicated=replicated)
    start_step = 0
    resumed = resume(run_dir, model, optimizer, scheduler, backend, dist_info)
    if resumed:
        start_step = resumed[1]["step"]
    validation = {step: dev for step, dev in read_validation(run_dir).items() if step <= start_step}
    logger = MetricsLogger(run_dir, cfg.logging, dist_info.is_main, start_step, total_steps,
                           resumed[1].get("wandb_id") if resumed else None, to_dict(cfg))
    if resumed:
        logger.message(f"resumed from {resumed[0]} at step {start_step}")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                              enabled=device.type == "cuda" and cfg.distributed.mixed_precision == "bf16")
    model.train()
    per_rank = cfg.train.global_batch_size // world_size
    student_view = model_module.view
    summary = {"start_step": start_step, "end_step": start_step, "losses": [], "preempted": False,
               "run_dir": str(run_dir), "is_main": dist_info.is_main, "total_steps": total_steps}

    with Preemption(run_dir / "STOP", dist_info.is_main) as preemption, closing(logger):
        for step in range(start_step, total_steps):
            indices = step_examples(step, steps_per_epoch, cfg.train.global_batch_size, len(examples), cfg.run.seed)
            mine = indices[dist_info.rank * per_rank:(dist_info.rank + 1) * per_rank]
            loss_sum = torch.zeros((), device=device, dtype=torch.float64)
            for index in range(accumulation):
                last = index == accumulation - 1
                micro = mine[index * cfg.data.micro_batch_size:(index + 1) * cfg.data.micro_batch_size]
                batch, labels = collate([train_items[student_view][i] for i in micro], pads[student_view])
                inputs = {name: tensor.to(device) for name, tensor in batch.items()}
                labels = labels.to(device)
                if distill and cached is None:
                    teacher_batch, _ = collate([train_items["llm"][i] for i in micro], pads["llm"])
                    inputs.update({f"teacher_{name}": tensor.to(device) for name, tensor in teacher_batch.items()})
                with gradient_sync(model, backend, last):
                    with autocast:
                        representation, logits, teacher_representation = model(**inputs)
                        if distill:
                            if cached is not None:
                                teacher_representation = cached[micro].to(device)
                            # Every target vector (one per example, or per answer) weighs the same.
                            errors = squared_error(representation, teacher_representation)
                            per_example = errors.numel() // len(micro)
                            loss = errors.sum() * world_size / (cfg.train.global_batch_size * per_example)
                        else:
                            loss = F.cross_entropy(logits.float(), labels, reduction="sum") * world_size / cfg.train.global_batch_size
                    backward(model, loss, backend, last)
                loss_sum += loss.detach().double() / world_size
            loss_value = all_reduce(loss_sum).item()
            check_finite_loss(loss_value, step + 1)
            lr = optimizer.param_groups[0]["lr"]
            grad_norm = optimizer_step(model, optimizer, scheduler, trainable, backend, cfg.train.grad_clip, step + 1)
            record = {"step": step + 1, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                      "epoch": step // steps_per_epoch}
            summary["losses"].append(loss_value)
            summary["end_step"] = step + 1

            preempted = preemption.agreed(device)
            if step + 1 in validate_at:
                validation[step + 1] = evaluator.scores(model, "dev")
                record.update({f"dev/{key}": value for key, value in validation[step + 1].items()})
                if dist_info.is_main:
                    (run_dir / "validation.jsonl").write_text(
                        "".join(json.dumps({"step": s, "dev": validation[s]}) + "\n" for s in sorted(validation)))
            logger.log(record)
            if step + 1 in validate_at or preempted:
                save_checkpoint(run_dir, step + 1, model=model, optimizer=optimizer, scheduler=scheduler,
                                backend=backend, dist_info=dist_info, reader_state={},
                                meta={"wandb_id": logger.wandb_id}, keep_last=cfg.checkpoint.keep_last,
                                keep_steps=steps_to_keep(validation, evaluator.prefixes))
            if preempted:
                preemption.served()
                logger.message(f"preempted: saved step {step + 1}; rerun the same command to resume")
                summary["preempted"] = True
                break
    shutdown()
    return summary
