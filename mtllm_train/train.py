"""Stage 1: self-distillation of the MT-LLM stack. One loop, readable top to bottom:

set-up (process group, data, stack, backend wrapper, optimizer) -> resume from the newest complete
checkpoint -> per step: fetch micro-batches, teacher + student forward, MSE, backward, one optimizer step,
metrics, checkpoint, preemption check.
"""

from __future__ import annotations

import time
from contextlib import closing

import torch

from mtllm_train.checkpoint import Checkpoints
from mtllm_train.config import Config, ConfigError, to_dict
from mtllm_train.data.manifest import check_tokenizers
from mtllm_train.data.reader import BatchReader
from mtllm_train.data.tar_reader import ShardError
from mtllm_train.distributed import all_reduce, compile_layers, gradient_sync, init_distributed, shutdown
from mtllm_train.loop import (Preemption, accumulation_steps, autocast, backward, check_finite_loss, end_of_step,
                              new_summary, open_run_folder, optimizer_step, setup_backend)
from mtllm_train.metrics import (MetricsLogger, StepStatistics, parameter_count, peak_flops, peak_memory_gb,
                                 plot_loss_curve, step_flops)
from mtllm_train.model.loss import squared_error
from mtllm_train.model.stack import build_stack
from mtllm_train.model.tokenizers import fingerprint, tokenizer_spec, view_tokenizer

VIEWS = ("mt_input_ids", "mt_attention_mask", "llm_input_ids", "llm_attention_mask")


def run_tokenizers(cfg: Config) -> tuple[tuple[str, str], tuple[str, str]]:
    """(name, fingerprint) of the run's LLM and MT tokenizers, to check against the shards."""
    llm, mt = ((tokenizer_spec(cfg.model, view), fingerprint(view_tokenizer(cfg.model, view))) for view in ("llm", "mt"))
    return llm, mt


def step_batches(batches, accumulation: int, device: torch.device) -> tuple[list[dict], float]:
    """This step's micro-batches and the global number of pooled targets. The count's all-reduce also carries
    whether a rank could not read its data, so every rank stops at once instead of waiting on that rank."""
    try:
        micro_batches, data_error = [next(batches) for _ in range(accumulation)], None
    except ConfigError as err:
        micro_batches, data_error = [], err
    local = torch.tensor([float(sum(b["mt_input_ids"].shape[0] for b in micro_batches)), float(data_error is not None)],
                         device=device)
    global_targets, failed_ranks = all_reduce(local).tolist()
    if data_error is not None:
        raise data_error
    if failed_ranks:
        raise ShardError(f"{int(failed_ranks)} other rank(s) could not read their data (their error names the shard); "
                         f"stopping")
    return micro_batches, global_targets


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """An asynchronous copy to the GPU: from pageable host memory a non_blocking copy still waits for the work
    queued before it (the previous micro-batch's backward), so the batch goes through pinned memory first."""
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def train(cfg: Config) -> dict:
    dist_info = init_distributed(cfg)
    backend, device, world_size = cfg.distributed.backend, dist_info.device, dist_info.world_size
    accumulation = accumulation_steps(cfg, world_size)
    run_dir = open_run_folder(cfg, dist_info)

    # Data: this rank's share of the shards, checked against the run's tokenizers.
    reader = BatchReader(cfg.data.shards, dist_info.rank, world_size, cfg.data.micro_batch_size, cfg.data.num_workers,
                         cfg.run.seed, cfg.data.length_group_batches, cfg.data.skip_bad_samples, cfg.data.max_length)
    check_tokenizers(reader.manifest, cfg.data.shards, *run_tokenizers(cfg))

    # The stack, its backend wrapper, optimizer and schedule.
    stack = build_stack(cfg.model).to(device)
    llm_params, encoder_params = parameter_count(stack.llm), parameter_count(stack.mt_encoder)
    model, optimizer, scheduler, trainable = setup_backend(stack, cfg, dist_info, accumulation, cfg.train.steps,
                                                           sharded=stack.llm, replicated=[stack.mt_encoder])
    if cfg.model.compile:
        compile_layers(stack.llm)

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
        logger.message(f"resumed from {resumed.path} at step {start_step}")
    flops_peak = peak_flops(device)
    batches = iter(reader)
    model.train()
    summary = new_summary(run_dir, dist_info, start_step, cfg.train.steps)

    # closing(): the logger and the reader's worker processes are shut down however the loop ends.
    with Preemption(run_dir / "STOP", dist_info.is_main) as preemption, closing(logger), closing(reader):
        for step in range(start_step, cfg.train.steps):
            step_start = time.perf_counter()
            # Every pooled target weighs the same: normalise by the global count over micro-batches and ranks.
            micro_batches, global_targets = step_batches(batches, accumulation, device)
            data_wait = time.perf_counter() - step_start

            stats = StepStatistics(device)
            for index, batch in enumerate(micro_batches):
                last = index == accumulation - 1
                views = {key: to_device(batch[key], device) for key in VIEWS}
                with gradient_sync(model, backend, last):
                    with autocast(cfg, device):
                        student_pooled, teacher_pooled = model(**views)
                        errors = squared_error(student_pooled, teacher_pooled)
                        # DDP / FSDP / DeepSpeed average gradients over ranks; x world_size turns that into the sum.
                        loss = errors.sum() * world_size / global_targets
                    backward(model, loss, backend, last)
                stats.add(errors, teacher_pooled, views["llm_attention_mask"], views["mt_attention_mask"],
                          batch["bad_samples"])
            totals = stats.all_reduced()  # one all-reduce for every statistic of the step
            loss_value = totals.error_sum / global_targets
            check_finite_loss(loss_value, step + 1)

            # One optimizer step.
            lr = optimizer.param_groups[0]["lr"]
            grad_norm = optimizer_step(model, optimizer, scheduler, trainable, backend, cfg.train.grad_clip, step + 1)

            # Metrics.
            step_time = time.perf_counter() - step_start
            record = {
                "step": step + 1,
                "loss": loss_value,
                "fvu": totals.fvu(int(global_targets)),
                "lr": lr,
                "grad_norm": grad_norm,
                "seqs_per_s": global_targets / step_time,
                "llm_tokens_per_s": totals.llm_real / step_time,
                "mt_tokens_per_s": totals.mt_real / step_time,
                "padding_efficiency": (totals.llm_real + totals.mt_real) / (totals.llm_computed + totals.mt_computed),
                "data_wait_frac": data_wait / step_time,
                "peak_mem_gb": peak_memory_gb(device),
                "bad_samples": totals.bad_samples,
                "epoch": reader.epoch,
            }
            if flops_peak:
                flops = step_flops(llm_params, encoder_params, totals.llm_computed, totals.mt_computed)
                record["mfu"] = flops / step_time / (flops_peak * world_size)
            logger.log(record)
            summary["losses"].append(loss_value)
            summary["end_step"] = step + 1

            save_due = (step + 1) % cfg.checkpoint.every == 0 or step + 1 == cfg.train.steps
            if end_of_step(step + 1, save_due, preemption=preemption, checkpoints=checkpoints, logger=logger,
                           summary=summary, device=device, keep_last=cfg.checkpoint.keep_last,
                           reader_state=reader.state_dict()):
                break
    if dist_info.is_main and summary["losses"]:
        plot_loss_curve(run_dir)
    shutdown()
    return summary
