"""Stage 1: self-distillation of the MT-LLM stack. One loop, readable top to bottom:

set-up (process group, data, stack, backend wrapper, optimizer) -> resume from the newest complete
checkpoint -> per step: fetch micro-batches, teacher + student forward, MSE, backward, one optimizer step,
metrics, checkpoint, preemption check.
"""

from __future__ import annotations

import time
from contextlib import closing
from pathlib import Path

import torch

from mtllm_train.checkpoint import save_checkpoint
from mtllm_train.config import Config, ConfigError, dump_config, to_dict
from mtllm_train.data.manifest import check_tokenizers
from mtllm_train.data.reader import BatchReader
from mtllm_train.data.views import fingerprint
from mtllm_train.distributed import all_reduce, gradient_sync, init_distributed, repeated_layers, shutdown
from mtllm_train.engine import (Preemption, accumulation_steps, backward, check_finite_loss, optimizer_step,
                                resume, setup_backend)
from mtllm_train.metrics import (MetricsLogger, parameter_count, peak_flops, peak_memory_gb, plot_loss_curve,
                                 step_flops)
from mtllm_train.model.loading import load_tokenizer
from mtllm_train.model.loss import fvu_from_sums, squared_error
from mtllm_train.model.stack import build_stack

VIEWS = ("mt_input_ids", "mt_attention_mask", "llm_input_ids", "llm_attention_mask")


def run_tokenizers(cfg: Config) -> tuple[tuple[str, str], tuple[str, str]]:
    """(name, fingerprint) of the run's LLM and MT tokenizers, to check against the shards."""
    names = []
    for key in ("llm", "mt"):
        model_spec = cfg.model.llm if key == "llm" else cfg.model.mt_encoder
        name = getattr(cfg.model, f"{key}_tokenizer") or (model_spec if isinstance(model_spec, str) else "")
        if not name:
            raise ConfigError(f"model.{key}_tokenizer: required when model.{'llm' if key == 'llm' else 'mt_encoder'} "
                              f"is an inline config")
        names.append((name, fingerprint(load_tokenizer(name, f"model.{key}_tokenizer"))))
    return names[0], names[1]


def train(cfg: Config) -> dict:
    dist_info = init_distributed(cfg)
    backend, device, world_size = cfg.distributed.backend, dist_info.device, dist_info.world_size
    accumulation = accumulation_steps(cfg, world_size)
    run_dir = Path(cfg.run.dir) / cfg.run.name
    if (run_dir / "task.json").is_file():
        raise ConfigError(f"run folder {run_dir} holds a stage-2 run; give this stage-1 run its own run.name")
    if dist_info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / "config.yaml")
    # Each rank its own dropout stream; restored from the checkpoint on resume.
    torch.manual_seed(cfg.run.seed * 1000 + dist_info.rank)

    # Data: this rank's share of the shards, checked against the run's tokenizers.
    reader = BatchReader(cfg.data.shards, dist_info.rank, world_size, cfg.data.micro_batch_size, cfg.data.num_workers,
                         cfg.run.seed, cfg.data.length_group_batches, cfg.data.skip_bad_samples, cfg.data.max_length)
    check_tokenizers(reader.manifest, cfg.data.shards, *run_tokenizers(cfg))

    # The stack, its backend wrapper, optimizer and schedule.
    stack = build_stack(cfg.model).to(device)
    if cfg.model.compile:
        for layer in repeated_layers(stack.llm):
            layer.compile()
    llm_params, encoder_params = parameter_count(stack.llm), parameter_count(stack.mt_encoder)
    model, optimizer, scheduler, trainable = setup_backend(stack, cfg, dist_info, accumulation, cfg.train.steps,
                                                           sharded=stack.llm, replicated=[stack.mt_encoder])

    # Resume from the newest complete checkpoint, if any.
    start_step, wandb_id = 0, None
    resumed = resume(run_dir, model, optimizer, scheduler, backend, dist_info)
    if resumed:
        checkpoint_path, meta, reader_state = resumed
        reader.load_state_dict(reader_state)
        start_step, wandb_id = meta["step"], meta.get("wandb_id")

    logger = MetricsLogger(run_dir, cfg.logging, dist_info.is_main, start_step, cfg.train.steps, wandb_id, to_dict(cfg))
    if resumed:
        logger.message(f"resumed from {checkpoint_path} at step {start_step}")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                              enabled=device.type == "cuda" and cfg.distributed.mixed_precision == "bf16")
    flops_peak = peak_flops(device)
    batches = iter(reader)
    model.train()
    summary = {"start_step": start_step, "end_step": start_step, "losses": [], "preempted": False,
               "run_dir": str(run_dir), "is_main": dist_info.is_main}

    # closing(): the logger and the reader's worker processes are shut down however the loop ends.
    with Preemption(run_dir / "STOP", dist_info.is_main) as preemption, closing(logger), closing(reader):
        for step in range(start_step, cfg.train.steps):
            step_start = time.perf_counter()
            micro_batches = [next(batches) for _ in range(accumulation)]
            data_wait = time.perf_counter() - step_start
            # Every pooled target weighs the same: normalise by the global count over micro-batches and ranks.
            counts = torch.tensor([float(sum(b["mt_input_ids"].shape[0] for b in micro_batches))], device=device)
            global_targets = all_reduce(counts).item()

            # Device-side sums (no sync per micro-batch): squared error, real LLM / MT tokens; teacher sums for FVU.
            sums = torch.zeros(3, device=device, dtype=torch.float64)
            teacher_sum = teacher_sq_sum = 0.0
            computed_llm = computed_mt = bad = 0
            for index, batch in enumerate(micro_batches):
                last = index == accumulation - 1
                views = {key: batch[key].to(device, non_blocking=True) for key in VIEWS}
                with gradient_sync(model, backend, last):
                    with autocast:
                        student_pooled, teacher_pooled = model(**views)
                        errors = squared_error(student_pooled, teacher_pooled)
                        # DDP / FSDP / DeepSpeed average gradients over ranks; x world_size turns that into the sum.
                        loss = errors.sum() * world_size / global_targets
                    backward(model, loss, backend, last)
                teacher = teacher_pooled.float()
                teacher_sum = teacher_sum + teacher.sum(0)
                teacher_sq_sum = teacher_sq_sum + teacher.pow(2).sum(0)
                sums += torch.stack([errors.detach().sum(), views["llm_attention_mask"].sum(),
                                     views["mt_attention_mask"].sum()]).double()
                computed_llm += views["llm_attention_mask"].numel()
                computed_mt += views["mt_attention_mask"].numel()
                bad += batch["bad_samples"]
            # One all-reduce for every statistic of the step.
            counters = torch.tensor([computed_llm, computed_mt, bad], device=device, dtype=torch.float64)
            totals = all_reduce(torch.cat([sums, counters, teacher_sum.double(), teacher_sq_sum.double()]))
            error_sum, llm_real, mt_real, llm_computed, mt_computed, bad_samples = totals[:6].tolist()
            teacher_sum, teacher_sq_sum = totals[6:].chunk(2)
            loss_value = error_sum / global_targets
            check_finite_loss(loss_value, step + 1)

            # One optimizer step.
            lr = optimizer.param_groups[0]["lr"]
            grad_norm = optimizer_step(model, optimizer, scheduler, trainable, backend, cfg.train.grad_clip, step + 1)

            # Metrics.
            step_time = time.perf_counter() - step_start
            record = {
                "step": step + 1,
                "loss": loss_value,
                "fvu": fvu_from_sums(error_sum, teacher_sum, teacher_sq_sum, int(global_targets)),
                "lr": lr,
                "grad_norm": grad_norm,
                "seqs_per_s": global_targets / step_time,
                "llm_tokens_per_s": llm_real / step_time,
                "mt_tokens_per_s": mt_real / step_time,
                "padding_efficiency": (llm_real + mt_real) / (llm_computed + mt_computed),
                "data_wait_frac": data_wait / step_time,
                "peak_mem_gb": peak_memory_gb(device),
                "bad_samples": int(bad_samples),
                "epoch": reader.epoch,
            }
            if flops_peak:
                flops = step_flops(llm_params, encoder_params, int(llm_computed), int(mt_computed))
                record["mfu"] = flops / step_time / (flops_peak * world_size)
            logger.log(record)
            summary["losses"].append(loss_value)
            summary["end_step"] = step + 1

            preempted = preemption.agreed(device)
            if (step + 1) % cfg.checkpoint.every == 0 or step + 1 == cfg.train.steps or preempted:
                save_checkpoint(run_dir, step + 1, model=model, optimizer=optimizer, scheduler=scheduler,
                                backend=backend, dist_info=dist_info, reader_state=reader.state_dict(),
                                meta={"wandb_id": logger.wandb_id}, keep_last=cfg.checkpoint.keep_last)
            if preempted:
                preemption.served()
                logger.message(f"preempted: saved step {step + 1}; rerun the same command to resume")
                summary["preempted"] = True
                break
    if dist_info.is_main and summary["losses"]:
        plot_loss_curve(run_dir)
    shutdown()
    return summary
