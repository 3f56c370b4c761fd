"""Stage 1: self-distillation of the MT-LLM stack. One loop, readable top to bottom:

set-up (process group, run folder, data, stack, backend wrapper, optimizer) -> resume from the newest complete
checkpoint -> per step: fetch micro-batches, teacher + student forward, loss (model/loss.py: the paper's MSE
between pooled vectors, optionally word-span MSE and in-batch InfoNCE), backward, one optimizer step, the step's
record (with the held-out evaluation and the probe when due), checkpoint, preemption check.
"""

from __future__ import annotations

import math
import time
from contextlib import closing
from pathlib import Path

import torch
from torch.distributed.checkpoint.api import CheckpointException

from mtllm_train.checkpoint import Checkpoints
from mtllm_train.config import Config, ConfigError, accumulation_steps, to_dict
from mtllm_train.data.manifest import check_tokenizers, require_word_spans
from mtllm_train.data.reader import BatchReader
from mtllm_train.distributed import (agree_or_stop, compile_layers, gradient_sync, init_distributed, shutdown,
                                     stop_together)
from mtllm_train.loop import (Preemption, autocast, backward, check_finite_loss, due,
                              end_of_step, new_summary, optimizer_step, resume_line, setup_backend)
from mtllm_train.metrics import (MetricsLogger, MfuMeter, StepStatistics, StepTiming, loss_record, step_record,
                                 wandb_mode)
from mtllm_train.model.fp8 import check_fp8_support, fp8_base
from mtllm_train.model.loss import LossTerms, loss_terms, span_count, squared_error, weighted_loss
from mtllm_train.model.stack import MTLLM, build_stack
from mtllm_train.model.tokenizers import run_tokenizers
from mtllm_train.probe import BitextProbe
from mtllm_train.projection_fit import fit_projection
from mtllm_train.run_folder import RunFolder, open_run_folder

VIEWS = ("mt_input_ids", "mt_attention_mask", "llm_input_ids", "llm_attention_mask")
WORD_IDS = ("mt_word_ids", "llm_word_ids")  # each token's word span (-1: none), in shards built with spans


def step_batches(batches, accumulation: int, device: torch.device, spans: bool) -> tuple[list[dict], dict[str, float]]:
    """This step's micro-batches and the global number of targets of each loss term ("targets": pooled
    sequences, "spans": word spans). The counts' all-reduce also carries whether a rank could not read its data,
    so every rank stops at once instead of waiting on that rank."""
    try:
        micro_batches, data_error = [next(batches) for _ in range(accumulation)], None
    except ConfigError as err:
        micro_batches, data_error = [], err
    targets = sum(b["mt_input_ids"].shape[0] for b in micro_batches)
    span_targets = sum(span_count(b["llm_word_ids"], b["mt_word_ids"]) for b in micro_batches) if spans else 0
    global_targets, global_spans = agree_or_stop([float(targets), float(span_targets)], data_error, device,
                                                 "read their data")
    return micro_batches, {"targets": global_targets, "spans": global_spans}


@torch.no_grad()
def evaluate_held_out(model, reader: BatchReader, batches: int, cfg: Config, device: torch.device) -> dict:
    """MSE and FVU to the teacher on held-out shards: the same batches every time, each rank its share (every rank
    runs the same number of forward passes), summed over ranks."""
    with closing(reader.first_epoch()) as stream:
        micro_batches, counts = step_batches(stream, batches, device, spans=False)
    model.eval()
    stats = StepStatistics(device)
    for batch in micro_batches:
        views = {key: to_device(batch[key], device) for key in VIEWS}
        with autocast(cfg.distributed, device):
            teacher_and_student = model(**views)
        stats.add(LossTerms(squared_error(teacher_and_student.student_pooled, teacher_and_student.teacher_pooled)),
                  teacher_and_student.student_pooled, teacher_and_student.teacher_pooled, views["llm_attention_mask"],
                  views["mt_attention_mask"], batch["bad_samples"])
    model.train()
    totals = stats.all_reduced()
    return {"eval_mse": totals.error_sum / counts["targets"], "eval_fvu": totals.fvu(int(counts["targets"])),
            "eval_cosine": totals.cosine_sum / counts["targets"]}


def evaluate_when_due(step: int, model, cfg: Config, device: torch.device, held_out: tuple | None,
                      probe: BitextProbe | None) -> tuple[dict, bool]:
    """The held-out evaluation and the probe, each when due after `step`: (their record fields, whether the probe
    found a new best step)."""
    fields, probe_best = {}, False
    if held_out and due(cfg.data.eval_every, step, cfg.train.steps):
        fields.update(evaluate_held_out(model, *held_out, cfg, device))
    if probe and due(cfg.probe.every, step, cfg.train.steps):
        fields.update(probe.run(model, device, lambda: autocast(cfg.distributed, device)))
        probe_best = probe.update_best(step, fields)  # saved with this step, and kept through pruning
    return fields, probe_best


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """An asynchronous copy to the GPU: from pageable host memory a non_blocking copy still waits for the work
    queued before it (the previous micro-batch's backward), so the batch goes through pinned memory first."""
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def shard_reader(cfg: Config, shards: str, num_workers: int, dist_info) -> BatchReader:
    """This rank's share of the shards, checked against the run's tokenizers."""
    reader = BatchReader(shards, dist_info.rank, dist_info.world_size, cfg.data.micro_batch_size, num_workers,
                         cfg.run.seed, cfg.data.length_group_batches, cfg.data.skip_bad_samples, cfg.data.max_length,
                         cfg.data.pad_multiple)
    check_tokenizers(reader.manifest, shards, *run_tokenizers(cfg.model))
    return reader


def build_student(model_cfg, device: torch.device) -> MTLLM:
    """The stack on this rank's device; with model.quantization fp8 the frozen base's matmuls in float8 (the GPU
    checked before the minutes of loading)."""
    if model_cfg.quantization == "fp8":
        check_fp8_support(device)
    stack = build_stack(model_cfg, device)
    if model_cfg.quantization == "fp8":
        fp8_base(stack.llm, device, model_cfg.fp8_scaling)
    return stack


def start_from(stack: MTLLM, run_dir: str, step: int) -> Path:
    """train.init_from: the stack starts from another stage-1 run's checkpoint (its LoRA and U); this run's own
    optimizer, schedule and data position start fresh. Returns the checkpoint."""
    source = RunFolder(run_dir)
    if source.identity() is not None:
        raise ConfigError(f"train.init_from: {run_dir} is a stage-2 run; give a stage-1 run folder (mtllm train)")
    checkpoints = Checkpoints(source.path)
    try:
        checkpoints.load_trainable(stack, step or None)
    except (RuntimeError, CheckpointException) as err:  # the same names, other shapes (another LoRA rank, model)
        raise ConfigError(f"train.init_from: {run_dir} trained other shapes than this run's model ("
                          f"{str(err).strip().splitlines()[0][:160]}); start from a run of the same model and LoRA "
                          f"settings") from None
    return checkpoints.path(step or None)


def train(cfg: Config) -> dict:
    started = time.perf_counter()
    dist_info = init_distributed(cfg.distributed)
    backend, device, world_size = cfg.distributed.backend, dist_info.device, dist_info.world_size
    accumulation = accumulation_steps(cfg, world_size)
    run = open_run_folder(cfg, dist_info)
    # W&B decided now (its key and server), not after minutes of loading; only rank 0 logs.
    cfg.logging.wandb, wandb_note = wandb_mode(cfg.logging) if dist_info.is_main else ("disabled", None)

    # Data, and what the held-out evaluation and the probe read.
    reader = shard_reader(cfg, cfg.data.shards, cfg.data.num_workers, dist_info)
    spans = bool(cfg.loss.span_weight)
    for needed, setting in ((spans, "loss.span_weight > 0"),
                            (cfg.model.projection_init == "least_squares", "model.projection_init=least_squares")):
        if needed:
            require_word_spans(reader.manifest, cfg.data.shards, setting)
    held_out = None
    if cfg.data.eval_every:
        eval_reader = shard_reader(cfg, cfg.data.eval_shards, 0, dist_info)
        held_out = (eval_reader, min(cfg.data.eval_batches or 10**9, eval_reader.epoch_batches(0)))
    probe = stop_together(lambda: BitextProbe(cfg, dist_info, run), device, "read the probe sets") \
        if cfg.probe.every else None

    # The stack (U fit first when asked, unless a checkpoint will replace it), its backend wrapper, optimizer and
    # schedule.
    build_start = time.perf_counter()
    stack = build_student(cfg.model, device)
    build_seconds = time.perf_counter() - build_start
    projection_fit = started_from = None
    if cfg.train.init_from and not Checkpoints(run.path).complete():  # a resume reads its own checkpoint instead
        started_from = start_from(stack, cfg.train.init_from, cfg.train.init_step)
    elif cfg.model.projection_init == "least_squares" and not Checkpoints(run.path).complete():
        with closing(shard_reader(cfg, cfg.data.shards, 0, dist_info)) as fit_reader:
            # model.projection_init_samples in all: each rank reads its share
            per_rank = math.ceil(cfg.model.projection_init_samples / world_size)
            projection_fit = fit_projection(stack, iter(fit_reader), per_rank, device)
    mfu = MfuMeter(stack.llm, stack.mt_encoder, device, world_size)  # before the backend shards the weights
    model, optimizer, scheduler, trainable = setup_backend(stack, cfg, dist_info, accumulation, cfg.train.steps,
                                                           sharded=stack.llm, replicated=[stack.mt_encoder])
    if cfg.model.compile:
        compile_layers(stack.llm, dynamic_lengths=cfg.data.pad_multiple < cfg.data.max_length)

    # Resume from the newest complete checkpoint, if any.
    checkpoints = Checkpoints(run.path, model=model, optimizer=optimizer, scheduler=scheduler, backend=backend,
                              dist_info=dist_info, settings=to_dict(cfg))
    resumed = checkpoints.resume()
    start_step = resumed.meta["step"] if resumed else 0
    if resumed:
        reader.load_state_dict(resumed.reader_state)

    logger = MetricsLogger(run, cfg.logging, dist_info.is_main, start_step, cfg.train.steps,
                           resumed.meta.get("wandb_id") if resumed else None, to_dict(cfg), "train")
    if resumed:
        logger.message(resume_line(resumed.path, start_step, cfg.train.steps))
    if wandb_note:
        logger.message(wandb_note)
    if started_from:
        logger.message(f"started from {started_from} (its LoRA and U; a fresh optimizer and schedule)")
    if projection_fit:
        logger.message(f"U fit by least squares on {projection_fit['spans']} word spans: it leaves "
                       f"{projection_fit['fvu']:.1%} of the variance of the LLM's input embeddings unexplained")
    # Time to the first step: what a node's ranks spend building the stack on their GPUs and resuming.
    logger.message(f"set-up took {time.perf_counter() - started:.1f} s (stack built on {device} in {build_seconds:.1f} s)")
    batches = iter(reader)
    model.train()
    summary = new_summary(run.path, dist_info, start_step, cfg.train.steps)

    # closing(): the logger and the reader's worker processes are shut down however the loop ends.
    with Preemption(run.stop_file, dist_info.is_main) as preemption, closing(logger), closing(reader):
        for step in range(start_step + 1, cfg.train.steps + 1):
            step_start = time.perf_counter()
            # Every pooled target weighs the same: normalise by the global count over micro-batches and ranks.
            micro_batches, counts = step_batches(batches, accumulation, device, spans)
            data_wait = time.perf_counter() - step_start

            stats = StepStatistics(device)
            for index, batch in enumerate(micro_batches):
                views = {key: to_device(batch[key], device) for key in VIEWS}
                word_ids = {key: to_device(batch[key], device) for key in WORD_IDS} if spans else {}
                last = index == accumulation - 1
                with gradient_sync(model, backend, last):
                    with autocast(cfg.distributed, device):
                        # One forward of each: the teacher (the LLM, adapters off, reading the English tokens) and
                        # the student (MT encoder -> U -> the LLM with its adapters, reading the MT tokens).
                        teacher_and_student = model(**views)
                        terms = loss_terms(teacher_and_student, word_ids, cfg.loss)
                        # DDP / FSDP / DeepSpeed average gradients over ranks; x world_size turns that into the sum.
                        loss = weighted_loss(terms.sums(), counts, cfg.loss) * world_size
                    backward(model, loss, backend, last)
                stats.add(terms, teacher_and_student.student_pooled, teacher_and_student.teacher_pooled,
                          views["llm_attention_mask"], views["mt_attention_mask"], batch["bad_samples"])
            totals = stats.all_reduced()  # one all-reduce for every statistic of the step
            losses = loss_record(totals, counts, cfg.loss)
            check_finite_loss(losses["loss"], step)

            lr = optimizer.param_groups[0]["lr"]
            grad_norm = optimizer_step(model, optimizer, scheduler, trainable, backend, cfg.train.grad_clip, step)

            timing = StepTiming(time.perf_counter() - step_start, data_wait)
            record = step_record(step, losses, totals, counts, timing, lr=lr, grad_norm=grad_norm, epoch=reader.epoch,
                                 device=device, mfu=mfu(totals, timing.seconds))
            evaluations, probe_best = evaluate_when_due(step, model, cfg, device, held_out, probe)
            logger.log({**record, **evaluations})
            summary.update(end_step=step, passes=step * cfg.train.global_batch_size / reader.manifest["totals"]["samples"])
            summary["losses"].append(losses["loss"])

            stop_early = probe is not None and probe.should_stop() and step < cfg.train.steps
            save_due = due(cfg.checkpoint.every, step, cfg.train.steps) or probe_best or stop_early
            if end_of_step(step, save_due, preemption=preemption, checkpoints=checkpoints, logger=logger,
                           summary=summary, device=device, keep_last=cfg.checkpoint.keep_last,
                           reader_state=reader.state_dict(), keep_best=probe.best_step if probe else None):
                break
            if stop_early:
                logger.message(probe.early_stop_line(step, cfg.train.steps))
                summary["early_stopped"] = step
                break
    if probe is not None and probe.best is not None:
        summary["probe_best"] = probe.best
    shutdown()
    return summary
