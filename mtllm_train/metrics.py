"""Per-step metrics: metrics.jsonl, W&B and a progress bar, all on rank 0; FLOP count for MFU."""

from __future__ import annotations

import json
import netrc
import os
import resource
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from tqdm import tqdm

from mtllm_train.config import CHOICES, ConfigError, LoggingConfig, LossConfig
from mtllm_train.distributed import all_reduce
from mtllm_train.files import write_atomic
from mtllm_train.model.fp8 import Float8FrozenLinear
from mtllm_train.model.loss import LossTerms, fvu_from_sums, variance_from_sums, weighted_loss

# Dense bf16 peak FLOP/s per GPU, by the name torch reports.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def parameter_count(module: torch.nn.Module) -> int:
    """Parameters of a (possibly 4-bit, FP8 or sharded) module, counting logical weights, not stored bytes."""
    total = 0
    for p in module.parameters():
        shape = getattr(p, "quant_state", None)
        total += shape.shape.numel() if shape is not None else p.numel()
    for layer in module.modules():  # FP8 layers hold their weights as buffers
        if isinstance(layer, Float8FrozenLinear):
            total += layer.in_features * layer.out_features + (0 if layer.bias is None else layer.out_features)
    return total


@dataclass(frozen=True)
class FlopShape:
    """What a model's forward pass multiplies: its frozen matmul weights (the embedding tables are lookups, not
    matmuls), its trainable ones (LoRA adapters, off in the teacher's pass), and its attention width summed over
    layers (heads x head size x layers)."""

    frozen_params: int
    adapter_params: int
    attention_width: int


def flop_shape(model: torch.nn.Module) -> FlopShape:
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    embeddings = sum(parameter_count(m) for m in model.modules() if isinstance(m, torch.nn.Embedding))
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return FlopShape(parameter_count(model) - embeddings - adapters, adapters,
                     config.num_hidden_layers * heads * head_dim)


def forward_flops(shape: FlopShape, tokens: float, attention_pairs: float, adapters: bool = True) -> float:
    """2 FLOPs per matmul weight and token, and 4 per attention width and query-key pair (scores, then the
    weighted sum); tokens and pairs as computed (padded): a [B, T] batch is B*T tokens and B*T*T pairs."""
    weights = shape.frozen_params + (shape.adapter_params if adapters else 0)
    return 2 * weights * tokens + 4 * shape.attention_width * attention_pairs


def step_flops(llm: FlopShape, encoder: FlopShape, llm_tokens: float, llm_pairs: float, mt_tokens: float,
               mt_pairs: float) -> float:
    """FLOPs of one stage-1 step, the one formula behind the logged MFU, the GPU benchmark and the cost model:

        teacher forward (the LLM, adapters off)          forward(llm without adapters, llm tokens)
        encoder forward (frozen, no backward)            forward(encoder, mt tokens)
        student forward (the LLM with adapters on U's    forward(llm, mt tokens)
        output)
        student backward: input gradients through the    2 N_llm T_mt + 8 A_llm pairs_mt (the four attention
        LLM, weight gradients of its adapters            matmuls of the backward pass: twice the forward's)
                                                         + 2 N_adapters T_mt

    Not counted: U (a 1024 x 4096 matmul, 0.05% at the paper's shapes) and recomputation by activation
    checkpointing (hardware FLOPs, not model FLOPs)."""
    return forward_flops(llm, llm_tokens, llm_pairs, adapters=False) + forward_flops(encoder, mt_tokens, mt_pairs) \
        + forward_flops(llm, mt_tokens, mt_pairs) + forward_flops(llm, mt_tokens, 2 * mt_pairs) \
        + 2 * llm.adapter_params * mt_tokens


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


class MfuMeter:
    """Model FLOPs utilisation of a step from its counted tokens and attention pairs (None off the GPUs with a
    known peak)."""

    def __init__(self, llm: torch.nn.Module, mt_encoder: torch.nn.Module, device: torch.device, world_size: int):
        self.llm, self.encoder = flop_shape(llm), flop_shape(mt_encoder)
        peak = peak_flops(device)
        self.peak = peak * world_size if peak else None

    def __call__(self, totals: StepTotals, seconds: float) -> float | None:
        if self.peak is None:
            return None
        flops = step_flops(self.llm, self.encoder, totals.llm_computed, totals.llm_pairs, totals.mt_computed,
                           totals.mt_pairs)
        return flops / seconds / self.peak


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


@dataclass(frozen=True)
class StepTotals:
    """One stage-1 step's statistics summed over micro-batches and ranks (see StepStatistics)."""

    error_sum: float  # per-target MSE of the pooled vectors
    llm_real: float  # tokens that are not padding, per view
    mt_real: float
    span_error_sum: float
    spans: float
    contrastive_sum: float
    cosine_sum: float
    norm_ratio_sum: float
    llm_computed: float  # tokens computed, padding included
    mt_computed: float
    llm_pairs: float  # query-key pairs attention computed, padding included
    mt_pairs: float
    bad_samples: float
    vectors: dict[str, torch.Tensor]  # per-dimension sums (and sums of squares) of pooled and span vectors

    def term_sums(self) -> dict[str, float]:
        """Each loss term summed over the step's targets (what model.loss.weighted_loss weighs)."""
        return {"mse": self.error_sum, "span_mse": self.span_error_sum, "contrastive": self.contrastive_sum}

    def fvu(self, targets: int) -> float:
        return fvu_from_sums(self.error_sum, self.vectors["teacher"], self.vectors["teacher_sq"], targets)

    def span_fvu(self) -> float:
        return fvu_from_sums(self.span_error_sum, self.vectors["span_teacher"], self.vectors["span_teacher_sq"],
                             int(self.spans))

    def variance(self, side: str, targets: int) -> float:
        """Per-dimension variance of the student's or the teacher's pooled vectors across the step's texts: a
        student that outputs one vector for every text has ~0 here."""
        return float(variance_from_sums(self.vectors[side], self.vectors[f"{side}_sq"], targets))


class StepStatistics:
    """Accumulates a stage-1 step's (or an evaluation's) statistics without a host sync per micro-batch (device
    sums; host counts) and all-reduces them once, in float64."""

    DEVICE_SUMS = ("error_sum", "llm_real", "mt_real", "span_error_sum", "spans", "contrastive_sum", "cosine_sum",
                   "norm_ratio_sum")
    HOST_COUNTS = ("llm_computed", "mt_computed", "llm_pairs", "mt_pairs", "bad_samples")
    VECTORS = ("teacher", "teacher_sq", "student", "student_sq", "span_teacher", "span_teacher_sq")

    def __init__(self, device: torch.device):
        self.device = device
        self.device_sums = dict.fromkeys(self.DEVICE_SUMS, torch.zeros((), device=device, dtype=torch.float64))
        self.host_counts = dict.fromkeys(self.HOST_COUNTS, 0)
        self.vectors: dict[str, torch.Tensor | float] = dict.fromkeys(self.VECTORS, 0.0)

    def _sum(self, name: str, value: torch.Tensor) -> None:
        self.device_sums[name] = self.device_sums[name] + value.detach().double()

    def _vectors(self, name: str, rows: torch.Tensor) -> None:
        rows = rows.detach().double()
        self.vectors[name] = self.vectors[name] + rows.sum(0)
        self.vectors[f"{name}_sq"] = self.vectors[f"{name}_sq"] + rows.pow(2).sum(0)

    def add(self, terms: LossTerms, student_pooled: torch.Tensor, teacher_pooled: torch.Tensor,
            llm_mask: torch.Tensor, mt_mask: torch.Tensor, bad_samples: int) -> None:
        """A micro-batch: its loss terms, both pooled vectors [B, D] and both views' padding masks."""
        self._vectors("teacher", teacher_pooled.float())
        self._vectors("student", student_pooled.float())
        self._sum("error_sum", terms.mse.sum())
        self._sum("llm_real", llm_mask.sum())
        self._sum("mt_real", mt_mask.sum())
        student, teacher = student_pooled.detach().float(), teacher_pooled.detach().float()
        self._sum("cosine_sum", torch.nn.functional.cosine_similarity(student, teacher, dim=-1).sum())
        self._sum("norm_ratio_sum", (student.norm(dim=-1) / teacher.norm(dim=-1).clamp_min(1e-12)).sum())
        self.host_counts["llm_computed"] += llm_mask.numel()
        self.host_counts["mt_computed"] += mt_mask.numel()
        self.host_counts["llm_pairs"] += llm_mask.numel() * llm_mask.shape[-1]  # query-key pairs attention computes
        self.host_counts["mt_pairs"] += mt_mask.numel() * mt_mask.shape[-1]
        self.host_counts["bad_samples"] += bad_samples
        if terms.span_mse is not None:
            self._sum("span_error_sum", terms.span_mse.sum())
            self._sum("spans", torch.tensor(float(terms.span_mse.numel()), device=self.device))
            self._vectors("span_teacher", terms.teacher_spans.float())
        if terms.contrastive is not None:
            self._sum("contrastive_sum", terms.contrastive.sum())

    def all_reduced(self) -> StepTotals:
        """Every statistic of the step summed over ranks, with one all-reduce."""
        width = next((v.numel() for v in self.vectors.values() if torch.is_tensor(v)), 0)
        vectors = [v if torch.is_tensor(v) else torch.zeros(width, device=self.device, dtype=torch.float64)
                   for v in self.vectors.values()]
        counts = torch.tensor([float(self.host_counts[k]) for k in self.HOST_COUNTS], device=self.device,
                              dtype=torch.float64)
        totals = all_reduce(torch.cat([torch.stack(list(self.device_sums.values())), counts, *vectors]))
        scalars = len(self.DEVICE_SUMS) + len(self.HOST_COUNTS)
        sums = dict(zip(self.DEVICE_SUMS + self.HOST_COUNTS, totals[:scalars].tolist()))
        return StepTotals(**sums, vectors=dict(zip(self.VECTORS, totals[scalars:].chunk(len(self.VECTORS)))))


def loss_record(totals: StepTotals, counts: dict[str, float], loss_cfg: LossConfig) -> dict:
    """The step's loss (weighted by the formula the gradient used) and each of its terms, with the diagnostics of
    a collapse: the student's variance across texts against the teacher's, cosine and norm ratio of student and
    teacher vectors."""
    targets = counts["targets"]
    record = {"loss": weighted_loss(totals.term_sums(), counts, loss_cfg), "mse": totals.error_sum / targets,
              "fvu": totals.fvu(int(targets))}
    if loss_cfg.span_weight:
        record.update(span_mse=totals.span_error_sum / max(counts["spans"], 1.0), span_fvu=totals.span_fvu())
    if loss_cfg.contrastive_weight:
        record["contrastive"] = totals.contrastive_sum / targets
    record.update(student_var=totals.variance("student", int(targets)), teacher_var=totals.variance("teacher", int(targets)),
                  cosine=totals.cosine_sum / targets, norm_ratio=totals.norm_ratio_sum / targets)
    return record


@dataclass(frozen=True)
class StepTiming:
    seconds: float  # the whole step
    data_wait: float  # of which waiting for batches


def step_record(step: int, losses: dict, totals: StepTotals, counts: dict[str, float], timing: StepTiming, *,
                lr: float, grad_norm: float, epoch: int, device: torch.device, mfu: float | None) -> dict:
    """One stage-1 step's line of metrics.jsonl (and W&B): losses, optimizer, throughput, padding, memory."""
    record = {"step": step, **losses, "lr": lr, "grad_norm": grad_norm,
              "seqs_per_s": counts["targets"] / timing.seconds,
              "llm_tokens_per_s": totals.llm_real / timing.seconds, "mt_tokens_per_s": totals.mt_real / timing.seconds,
              "padding_efficiency": (totals.llm_real + totals.mt_real) / (totals.llm_computed + totals.mt_computed),
              "data_wait_frac": timing.data_wait / timing.seconds, "peak_mem_gb": peak_memory_gb(device),
              "bad_samples": int(totals.bad_samples), "epoch": epoch}
    if mfu is not None:
        record["mfu"] = mfu
    return record


def _wandb_api_key(host: str) -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode(cfg: LoggingConfig) -> tuple[str, str | None]:
    """The W&B mode a run logs in, decided before anything loads, and a line when it is not logging.wandb:
    WANDB_MODE in the environment wins (the usual practice on cluster nodes without internet); online needs an
    API key and a server that answers within 5 seconds, else the run logs offline into RUN/wandb (`wandb sync`
    uploads it later) rather than failing after the set-up or waiting two minutes for a timeout."""
    environment = os.environ.get("WANDB_MODE")
    if environment:
        if environment not in CHOICES["logging.wandb"]:  # the modes logging.wandb takes
            raise ConfigError(f"WANDB_MODE={environment!r} in the environment: expected one of "
                              f"{', '.join(CHOICES['logging.wandb'])}")
        note = None if environment == cfg.wandb else f"W&B: WANDB_MODE={environment} from the environment " \
                                                       f"(logging.wandb: {cfg.wandb})"
        return environment, note
    if cfg.wandb != "online":
        return cfg.wandb, None
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    offline = "logging offline into the run folder's wandb/ (`wandb sync` uploads it later)"
    if not _wandb_api_key(host):
        return "offline", f"W&B: logging.wandb is online but there is no API key (WANDB_API_KEY or `wandb login`); {offline}"
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as err:
        return "offline", f"W&B: {host} does not answer ({err}); {offline}"
    return "online", None


def wandb_group(cfg: LoggingConfig, config: dict) -> str:
    """logging.group, else the stage-1 run a run belongs to: a stage-1 run and the stage-2 runs started from it
    share a group."""
    init_from = config.get("task", {}).get("init_from")
    return cfg.group or (Path(init_from).name if init_from else config["run"]["name"])


def wandb_key(key: str) -> str:
    """A record's field as W&B shows it, by section: train/loss, eval/mse, probe/stack_mean, dev/... ."""
    for prefix in ("eval_", "probe_"):
        if key.startswith(prefix):
            return f"{prefix[:-1]}/{key.removeprefix(prefix)}"
    return key if "/" in key else f"train/{key}"


def read_records(path: Path) -> list[dict]:
    """The records of a metrics.jsonl (a line cut short by a crash is skipped)."""
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class MetricsLogger:
    """Writes one JSON object per optimizer step; only the main rank writes anything. A resumed run first drops
    the records of steps after its checkpoint (a crash's lost steps), so every step appears once, and marks its
    first record `"resumed": true`. Progress: a bar on a terminal; in a log file, one plain line every 5% of the
    run (a bar's carriage-return frames would make one unreadable line there)."""

    def __init__(self, run, cfg: LoggingConfig, enabled: bool, start_step: int, total_steps: int,
                 wandb_id: str | None, config: dict, command: str = "train"):
        """run: the RunFolder (run_folder.py) it writes metrics.jsonl into; command: train, task-train or
        task-distill (W&B's job type and tags)."""
        self.enabled, self.cfg, self.run = enabled, cfg, run
        path = run.metrics_file
        if enabled and path.is_file():
            kept = [record for record in read_records(path) if record["step"] <= start_step]
            write_atomic(path, "".join(json.dumps(record) + "\n" for record in kept))
        self.path, self.write_error = path, None  # write_error: an OSError appending a record (a full disk)
        self.file = path.open("a") if enabled else None
        self.wandb_run = None
        self.wandb_id = wandb_id
        if enabled and cfg.wandb != "disabled":
            import wandb

            self.wandb_id = wandb_id or uuid.uuid4().hex[:12]
            self.wandb_run = wandb.init(project=cfg.project, entity=cfg.entity or None, name=run.name,
                                        id=self.wandb_id, resume="allow", mode=cfg.wandb, dir=str(run.path),
                                        config=config, job_type=command, group=wandb_group(cfg, config),
                                        tags=["stage1" if command == "train" else "stage2", command])
        progress = enabled and cfg.progress_bar
        self.plain_every = max(1, total_steps // 20) if progress and not sys.stderr.isatty() else 0
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                        disable=not progress or bool(self.plain_every), file=sys.stderr)
        self.start_step, self.total_steps, self.started = start_step, total_steps, time.perf_counter()

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        if record["step"] == self.start_step + 1 and self.start_step:
            record = {**record, "resumed": True}
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{record['loss']:.4g}", lr=f"{record['lr']:.2e}")
        if (self.plain_every and (record["step"] % self.plain_every == 0 or record["step"] == self.total_steps)) \
                or "probe_stack_mean" in record or "eval_fvu" in record:  # evaluations are always shown
            self.bar.write(self._progress_line(record), file=sys.stderr)
        # Evaluations, the last step and a resume's first step (the plot marks it) are written whatever the grid.
        if record["step"] % self.cfg.every and "eval_fvu" not in record and "probe_stack_mean" not in record \
                and "resumed" not in record and record["step"] != self.total_steps:
            return
        if self.write_error is None:
            try:
                self.file.write(json.dumps(record) + "\n")
                self.file.flush()
            except OSError as err:  # end_of_step has every rank save and stop
                self.write_error = err
        if self.wandb_run is not None:
            self.wandb_run.log({wandb_key(key): value for key, value in record.items() if key != "step"},
                               step=record["step"])

    def _progress_line(self, record: dict) -> str:
        done = record["step"] - self.start_step
        eta = (time.perf_counter() - self.started) / done * (self.total_steps - record["step"])
        parts = [f"step {record['step']}/{self.total_steps}", f"loss {record['loss']:.4g}"]
        parts += [f"fvu {record['fvu']:.3f}"] if "fvu" in record else []
        parts += [f"lr {record['lr']:.2e}"]
        parts += [f"held-out mse {record['eval_mse']:.4g} fvu {record['eval_fvu']:.3f}"] if "eval_fvu" in record else []
        parts += [f"probe R@1 {record['probe_stack_mean']:.3f} (teacher {record['probe_teacher_mean']:.3f})"] \
            if "probe_stack_mean" in record else []
        if "llm_tokens_per_s" in record:
            parts += [f"tokens/s {record['llm_tokens_per_s'] + record['mt_tokens_per_s']:.0f}"]
        return "  ".join(parts + [f"eta {time.strftime('%H:%M:%S', time.gmtime(eta))}"])

    def message(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text)

    def close(self) -> None:
        """Flush, draw the run's plot (and log it to W&B as an artifact), finish W&B."""
        if not self.enabled:
            return
        self.bar.close()
        try:
            self.file.close()
        except OSError:  # what could not be flushed was reported when the write failed
            pass
        plot = plot_loss_curve(self.run)
        if self.wandb_run is not None:
            if plot is not None:
                import wandb

                artifact = wandb.Artifact(f"{self.run.name}-loss-curve", type="plot")
                artifact.add_file(str(plot))
                self.wandb_run.log_artifact(artifact)
            self.wandb_run.finish()


def smoothed(values: list[float], window: int) -> list[float]:
    """The trailing mean of the last `window` values at each point (NaN-free input)."""
    sums, out = [0.0], []
    for index, value in enumerate(values):
        sums.append(sums[-1] + value)
        start = max(0, index + 1 - window)
        out.append((sums[index + 1] - sums[start]) / (index + 1 - start))
    return out


def loss_figure(records: list[dict], title: str):
    """Loss and gradient norm (each step faint, a moving average over 5% of the run bold), FVU (with FVU = 1,
    the level of predicting only the teacher's mean; the span FVU and the held-out FVU when the run has them) or,
    for a stage-2 run, the dev score per language, and the learning rate, against step; dotted lines where the
    run resumed from a checkpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    resumed_at = [r["step"] - 1 for r in records if r.get("resumed")]
    validated = [r for r in records if any(key.startswith("dev/") for key in r)]
    panels = [("loss", "loss", "log"), ("fvu", "FVU", "linear"), ("lr", "learning rate", "linear"),
              ("grad_norm", "gradient norm", "log")]
    probed = [r for r in records if "probe_stack_mean" in r]
    window = max(1, len(records) // 20)
    figure, axes = plt.subplots(1, 5 if probed else 4, figsize=(20 if probed else 16, 3.6))
    for axis, (key, label, scale) in zip(axes, panels):
        if key == "fvu" and validated:
            dev_panel(axis, validated)
            continue
        values = [r.get(key, float("nan")) for r in records]
        noisy = key in ("loss", "grad_norm") and window > 1
        axis.plot(steps, values, color="tab:blue", alpha=0.3 if noisy else 1.0,
                  label="training (sequence)" if key == "fvu" else "each step" if noisy else None)
        if noisy:
            axis.plot(steps, smoothed(values, window), color="tab:blue", label=f"mean of {window} steps")
            axis.legend(fontsize=8)
        axis.set(xlabel="step", ylabel=label, yscale=scale, title=label)
        axis.grid(alpha=0.3)
        for index, step in enumerate(resumed_at):
            axis.axvline(step, color="tab:gray", linestyle=":", label=None if index else "resumed from a checkpoint")
    if not validated:
        fvu_lines(axes[1], records)
    if probed:
        probe_panel(axes[4], probed)
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def fvu_lines(axis, records: list[dict]) -> None:
    """Stage 1's FVU panel beside the sequence FVU: the span FVU, the held-out FVU, and the level FVU = 1."""
    steps = [r["step"] for r in records]
    if any("span_fvu" in r for r in records):
        axis.plot(steps, [r.get("span_fvu", float("nan")) for r in records], color="tab:green",
                  label="training (word spans)")
    evaluated = [r for r in records if "eval_fvu" in r]
    if evaluated:
        axis.plot([r["step"] for r in evaluated], [r["eval_fvu"] for r in evaluated], color="tab:orange",
                  marker="o", label="held-out")
    axis.axhline(1.0, color="tab:red", linestyle="--", label="FVU = 1 (the teacher's mean)")
    axis.legend(fontsize=8)


def dev_panel(axis, records: list[dict]) -> None:
    """Stage 2: the dev score per language at each validation, English (the source, S-DEV's) bold."""
    steps = [r["step"] for r in records]
    for key in sorted({key for r in records for key in r if key.startswith("dev/")}):
        name = key.removeprefix("dev/")
        source = name == "source"
        axis.plot(steps, [r.get(key, float("nan")) for r in records], marker="o", linewidth=2.5 if source else 1,
                  color="black" if source else None, label="English (S-DEV)" if source else name)
    axis.set(xlabel="step", ylabel="dev score", title="dev score per language")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, ncol=2)


def probe_panel(axis, records: list[dict]) -> None:
    """The multilingual probe: R@1 per language in the stack space (both directions' mean), and the means."""
    steps = [r["step"] for r in records]
    languages = sorted({key.removeprefix("probe_stack_x2en_") for key in records[-1] if key.startswith("probe_stack_x2en_")})
    for language in languages:
        axis.plot(steps, [(r[f"probe_stack_x2en_{language}"] + r[f"probe_stack_en2x_{language}"]) / 2 for r in records],
                  linewidth=1, alpha=0.7, label=language)
    axis.plot(steps, [r["probe_stack_mean"] for r in records], color="black", linewidth=2.5, marker="o", label="mean")
    axis.plot(steps, [r["probe_teacher_mean"] for r in records], color="black", linestyle="--", linewidth=1.5,
              label="mean, English by the teacher")
    axis.set(xlabel="step", ylabel="R@1", ylim=(0, 1.02), title="probe: X <-> English retrieval")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, ncol=2)


def plot_loss_curve(run) -> Path | None:
    """The RunFolder's loss_curve.png from its metrics.jsonl (None when it holds no step, or, said in one line,
    when the file cannot be written: the run itself is saved)."""
    import matplotlib.pyplot as plt

    records = read_records(run.metrics_file) if run.metrics_file.is_file() else []
    if not records:
        return None
    figure = loss_figure(records, run.name)
    try:
        figure.savefig(run.plot_file, dpi=110)
    except OSError as err:
        print(f"mtllm: warning: cannot write {run.plot_file} ({err.strerror}); the run is saved", file=sys.stderr)
        return None
    finally:
        plt.close(figure)
    return run.plot_file
