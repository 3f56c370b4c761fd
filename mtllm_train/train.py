"""Stage 1: self-distillation of the MT-LLM stack. One loop, readable top to bottom:

set-up (process group, data, stack, backend wrapper, optimizer) -> resume from the newest complete
checkpoint -> per step: fetch micro-batches, teacher + student forward, loss (the paper's MSE between pooled
vectors, optionally word-span MSE and in-batch InfoNCE), backward, one optimizer step, held-out evaluation when
due, metrics, checkpoint, preemption check.
"""

from __future__ import annotations

import math
import time
from contextlib import closing

import torch

from mtllm_train.checkpoint import Checkpoints
from mtllm_train.config import Config, ConfigError, LossConfig, to_dict
from mtllm_train.data.manifest import check_tokenizers, require_word_spans
from mtllm_train.data.reader import BatchReader
from mtllm_train.data.tar_reader import ShardError
from mtllm_train.distributed import (all_reduce, compile_layers, gradient_sync, init_distributed, shutdown,
                                     stop_together)
from mtllm_train.loop import (Preemption, accumulation_steps, autocast, backward, check_finite_loss, due,
                              end_of_step, new_summary, open_run_folder, optimizer_step, resume_line, setup_backend)
from mtllm_train.metrics import (MetricsLogger, StepStatistics, flop_shape, peak_flops, peak_memory_gb, plot_loss_curve,
                                 step_flops, wandb_mode)
from mtllm_train.model.fp8 import check_fp8_support, fp8_base
from mtllm_train.model.loss import contrastive_losses, span_count, span_squared_errors, squared_error
from mtllm_train.model.projection_init import fit_projection
from mtllm_train.model.stack import StackOutput, build_stack
from mtllm_train.model.tokenizers import fingerprint, tokenizer_spec, view_tokenizer
from mtllm_train.probe import BitextProbe

VIEWS = ("mt_input_ids", "mt_attention_mask", "llm_input_ids", "llm_attention_mask")
WORD_IDS = ("mt_word_ids", "llm_word_ids")  # each token's word span (-1: none), in shards built with spans


def run_tokenizers(cfg: Config) -> tuple[tuple[str, str], tuple[str, str]]:
    """(name, fingerprint) of the run's LLM and MT tokenizers, to check against the shards."""
    llm, mt = ((tokenizer_spec(cfg.model, view), fingerprint(view_tokenizer(cfg.model, view))) for view in ("llm", "mt"))
    return llm, mt


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
    local = torch.tensor([float(targets), float(span_targets), float(data_error is not None)], device=device)
    global_targets, global_spans, failed_ranks = all_reduce(local).tolist()
    if data_error is not None:
        raise data_error
    if failed_ranks:
        raise ShardError(f"{int(failed_ranks)} other rank(s) could not read their data (their error names the shard); "
                         f"stopping")
    return micro_batches, {"targets": global_targets, "spans": global_spans}


def distillation_loss(out: StackOutput, batch: dict, loss_cfg: LossConfig, counts: dict[str, float],
                      stats: StepStatistics) -> torch.Tensor:
    """This micro-batch's share of the step's loss, and its statistics. Each term is summed over its targets and
    divided by the step's global count of them, so every target weighs the same whatever the layout."""
    errors = squared_error(out.student_pooled, out.teacher_pooled)
    stats.add(errors, out.student_pooled, out.teacher_pooled, batch["llm_attention_mask"], batch["mt_attention_mask"],
              batch["bad_samples"])
    loss = loss_cfg.sequence_weight * errors.sum() / counts["targets"]
    if loss_cfg.span_weight:
        span_errors, teacher_spans = span_squared_errors(out.student_hidden, out.teacher_hidden, batch["mt_word_ids"],
                                                         batch["llm_word_ids"])
        stats.add_spans(span_errors, teacher_spans)
        loss = loss + loss_cfg.span_weight * span_errors.sum() / max(counts["spans"], 1.0)
    if loss_cfg.contrastive_weight:
        contrastive = contrastive_losses(out.student_pooled, out.teacher_pooled, loss_cfg.contrastive_temperature)
        stats.add_contrastive(contrastive)
        loss = loss + loss_cfg.contrastive_weight * contrastive.sum() / counts["targets"]
    return loss


def loss_record(totals, counts: dict[str, float], loss_cfg: LossConfig) -> dict:
    """The step's loss and each of its terms, with the diagnostics of a collapse: the student's variance across
    texts against the teacher's, cosine and norm ratio of student and teacher vectors."""
    targets = counts["targets"]
    record = {"mse": totals.error_sum / targets, "fvu": totals.fvu(int(targets))}
    loss = loss_cfg.sequence_weight * record["mse"]
    if loss_cfg.span_weight:
        record.update(span_mse=totals.span_error_sum / max(totals.spans, 1.0), span_fvu=totals.span_fvu())
        loss += loss_cfg.span_weight * record["span_mse"]
    if loss_cfg.contrastive_weight:
        record["contrastive"] = totals.contrastive_sum / targets
        loss += loss_cfg.contrastive_weight * record["contrastive"]
    record.update(student_var=totals.variance("student", int(targets)), teacher_var=totals.variance("teacher", int(targets)),
                  cosine=totals.cosine_sum / targets, norm_ratio=totals.norm_ratio_sum / targets)
    return {"loss": loss, **record}


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
        with autocast(cfg, device):
            out = model(**views)
        stats.add(squared_error(out.student_pooled, out.teacher_pooled), out.student_pooled, out.teacher_pooled,
                  views["llm_attention_mask"], views["mt_attention_mask"], batch["bad_samples"])
    model.train()
    totals = stats.all_reduced()
    return {"eval_mse": totals.error_sum / counts["targets"], "eval_fvu": totals.fvu(int(counts["targets"])),
            "eval_cosine": totals.cosine_sum / counts["targets"]}


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """An asynchronous copy to the GPU: from pageable host memory a non_blocking copy still waits for the work
    queued before it (the previous micro-batch's backward), so the batch goes through pinned memory first."""
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def train(cfg: Config) -> dict:
    started = time.perf_counter()
    dist_info = init_distributed(cfg)
    backend, device, world_size = cfg.distributed.backend, dist_info.device, dist_info.world_size
    accumulation = accumulation_steps(cfg, world_size)
    if cfg.model.quantization == "fp8":
        check_fp8_support(device)  # before minutes of loading
    run_dir = open_run_folder(cfg, dist_info)
    # W&B decided now (its key and server), not after minutes of loading; only rank 0 logs.
    cfg.logging.wandb, wandb_note = wandb_mode(cfg.logging) if dist_info.is_main else ("disabled", None)

    # Data: this rank's share of the shards, checked against the run's tokenizers.
    def shard_reader(shards: str, num_workers: int) -> BatchReader:
        reader = BatchReader(shards, dist_info.rank, world_size, cfg.data.micro_batch_size, num_workers, cfg.run.seed,
                             cfg.data.length_group_batches, cfg.data.skip_bad_samples, cfg.data.max_length,
                             cfg.data.pad_multiple)
        check_tokenizers(reader.manifest, shards, *run_tokenizers(cfg))
        return reader

    reader = shard_reader(cfg.data.shards, cfg.data.num_workers)
    spans = bool(cfg.loss.span_weight)
    if spans:
        require_word_spans(reader.manifest, cfg.data.shards, "loss.span_weight > 0")
    if cfg.model.projection_init == "least_squares":
        require_word_spans(reader.manifest, cfg.data.shards, "model.projection_init=least_squares")
    eval_reader = shard_reader(cfg.data.eval_shards, 0) if cfg.data.eval_every else None
    eval_batches = min(cfg.data.eval_batches or 10**9, eval_reader.epoch_batches(0)) if eval_reader else 0
    probe = stop_together(lambda: BitextProbe(cfg, dist_info, run_dir), device, "read the probe sets") \
        if cfg.probe.every else None

    # The stack (U fit first when asked, unless a checkpoint will replace it), its backend wrapper, optimizer and
    # schedule.
    build_start = time.perf_counter()
    stack = build_stack(cfg.model, device)
    if cfg.model.quantization == "fp8":
        fp8_base(stack.llm, device, cfg.model.fp8_scaling)  # the frozen base's matmuls in float8 (refused where the GPU cannot)
    build_seconds = time.perf_counter() - build_start
    projection_fit = None
    if cfg.model.projection_init == "least_squares" and not Checkpoints(run_dir).complete():
        with closing(shard_reader(cfg.data.shards, 0)) as fit_reader:
            # model.projection_init_samples in all: each rank reads its share
            per_rank = math.ceil(cfg.model.projection_init_samples / world_size)
            projection_fit = fit_projection(stack, iter(fit_reader), per_rank, device)
    llm_flops, encoder_flops = flop_shape(stack.llm), flop_shape(stack.mt_encoder)
    model, optimizer, scheduler, trainable = setup_backend(stack, cfg, dist_info, accumulation, cfg.train.steps,
                                                           sharded=stack.llm, replicated=[stack.mt_encoder])
    if cfg.model.compile:
        compile_layers(stack.llm, dynamic_lengths=cfg.data.pad_multiple < cfg.data.max_length)

    # Resume from the newest complete checkpoint, if any.
    checkpoints = Checkpoints(run_dir, model=model, optimizer=optimizer, scheduler=scheduler, backend=backend,
                              dist_info=dist_info)
    resumed = checkpoints.resume()
    start_step = resumed.meta["step"] if resumed else 0
    if resumed:
        reader.load_state_dict(resumed.reader_state)

    logger = MetricsLogger(run_dir, cfg.logging, dist_info.is_main, start_step, cfg.train.steps,
                           resumed.meta.get("wandb_id") if resumed else None, to_dict(cfg))
    if resumed:
        logger.message(resume_line(resumed.path, start_step, cfg.train.steps))
    if wandb_note:
        logger.message(wandb_note)
    if projection_fit:
        logger.message(f"U fit by least squares on {projection_fit['spans']} word spans: it leaves "
                       f"{projection_fit['fvu']:.1%} of the variance of the LLM's input embeddings unexplained")
    # Time to the first step: what a node's ranks spend building the stack on their GPUs and resuming.
    logger.message(f"set-up took {time.perf_counter() - started:.1f} s (stack built on {device} in {build_seconds:.1f} s)")
    flops_peak = peak_flops(device)
    batches = iter(reader)
    model.train()
    summary = new_summary(run_dir, dist_info, start_step, cfg.train.steps)

    # closing(): the logger and the reader's worker processes are shut down however the loop ends.
    with Preemption(run_dir / "STOP", dist_info.is_main) as preemption, closing(logger), closing(reader):
        for step in range(start_step, cfg.train.steps):
            step_start = time.perf_counter()
            # Every pooled target weighs the same: normalise by the global count over micro-batches and ranks.
            micro_batches, counts = step_batches(batches, accumulation, device, spans)
            data_wait = time.perf_counter() - step_start

            stats = StepStatistics(device)
            for index, batch in enumerate(micro_batches):
                last = index == accumulation - 1
                keys = VIEWS + (WORD_IDS if spans else ())
                on_device = {key: to_device(batch[key], device) for key in keys}
                with gradient_sync(model, backend, last):
                    with autocast(cfg, device):
                        out = model(**{key: on_device[key] for key in VIEWS})
                        loss = distillation_loss(out, {**on_device, "bad_samples": batch["bad_samples"]}, cfg.loss,
                                                 counts, stats)
                        # DDP / FSDP / DeepSpeed average gradients over ranks; x world_size turns that into the sum.
                        loss = loss * world_size
                    backward(model, loss, backend, last)
            totals = stats.all_reduced()  # one all-reduce for every statistic of the step
            losses = loss_record(totals, counts, cfg.loss)
            check_finite_loss(losses["loss"], step + 1)

            # One optimizer step.
            lr = optimizer.param_groups[0]["lr"]
            grad_norm = optimizer_step(model, optimizer, scheduler, trainable, backend, cfg.train.grad_clip, step + 1)

            # Metrics.
            step_time = time.perf_counter() - step_start
            global_targets = counts["targets"]
            record = {
                "step": step + 1,
                **losses,
                "lr": lr,
                "grad_norm": grad_norm,
                "seqs_per_s": global_targets / step_time,
                "llm_tokens_per_s": totals.llm_real / step_time,
                "mt_tokens_per_s": totals.mt_real / step_time,
                "padding_efficiency": (totals.llm_real + totals.mt_real) / (totals.llm_computed + totals.mt_computed),
                "data_wait_frac": data_wait / step_time,
                "peak_mem_gb": peak_memory_gb(device),
                "bad_samples": int(totals.bad_samples),
                "epoch": reader.epoch,
            }
            if eval_reader and due(cfg.data.eval_every, step + 1, cfg.train.steps):
                record.update(evaluate_held_out(model, eval_reader, eval_batches, cfg, device))
            probe_best = False
            if probe and due(cfg.probe.every, step + 1, cfg.train.steps):
                record.update(probe.run(model, device, lambda: autocast(cfg, device)))
                probe_best = probe.update_best(step + 1, record)  # saved below, and kept through pruning
            if flops_peak:
                flops = step_flops(llm_flops, encoder_flops, totals.llm_computed, totals.llm_pairs, totals.mt_computed,
                                   totals.mt_pairs)
                record["mfu"] = flops / step_time / (flops_peak * world_size)
            logger.log(record)
            summary["losses"].append(losses["loss"])
            summary["end_step"] = step + 1
            summary["passes"] = (step + 1) * cfg.train.global_batch_size / reader.manifest["totals"]["samples"]

            stop_early = probe is not None and probe.should_stop() and step + 1 < cfg.train.steps
            save_due = due(cfg.checkpoint.every, step + 1, cfg.train.steps) or probe_best or stop_early
            if end_of_step(step + 1, save_due, preemption=preemption, checkpoints=checkpoints, logger=logger,
                           summary=summary, device=device, keep_last=cfg.checkpoint.keep_last,
                           reader_state=reader.state_dict(), keep_best=probe.best_step if probe else None):
                break
            if stop_early:
                best = probe.best
                logger.message(f"early stop at step {step + 1}: the probe's mean R@1 ({best['space']}) has not "
                               f"improved on step {best['step']}'s {best['value']:.3f} for {best['probes_since']} "
                               f"probes; {cfg.train.steps - step - 1} steps not run")
                summary["early_stopped"] = step + 1
                break
    if probe is not None and probe.best is not None:
        summary["probe_best"] = probe.best
    if dist_info.is_main and summary["losses"]:
        plot_loss_curve(run_dir)
    shutdown()
    return summary
