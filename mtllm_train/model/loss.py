"""The self-distillation objective and its diagnostics, all in fp32.

Each term returns one value per target (sequence or word span) that the trainer sums and divides by the
global number of such targets, so every target weighs the same whatever the micro-batch, accumulation and
rank layout:
- squared_error: the paper's MSE between pooled vectors;
- span_squared_errors: the MSE between mean-pooled word spans of both views' last hidden states;
- contrastive_losses: in-batch InfoNCE, which a student that outputs one vector for every text cannot lower
  (plain MSE can be lowered that way, by matching the teacher's mean while its covariance is still ~0).
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F

from mtllm_train.config import LossConfig

# Each loss term: its weight in LossConfig and the step's count it is averaged over.
TERMS = {"mse": ("sequence_weight", "targets"), "span_mse": ("span_weight", "spans"),
         "contrastive": ("contrastive_weight", "targets")}


class LossTerms(NamedTuple):
    """One micro-batch's per-target values of each term the config enables (None: off)."""

    mse: torch.Tensor  # [B]: pooled vectors
    span_mse: torch.Tensor | None = None  # [N]: word spans both views cover
    contrastive: torch.Tensor | None = None  # [B]
    teacher_spans: torch.Tensor | None = None  # [N, D]: the teacher's span vectors, for the span FVU

    def sums(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name).sum() for name in TERMS if getattr(self, name) is not None}


def loss_terms(pooled_and_hidden, word_ids: dict, loss_cfg: LossConfig) -> LossTerms:
    """The terms of the self-distillation loss for one micro-batch of a stage-1 forward (StackOutput): the paper's
    MSE between pooled vectors; with loss.span_weight the word-span MSE (word ids of both views in `word_ids`);
    with loss.contrastive_weight in-batch InfoNCE."""
    out = pooled_and_hidden
    # The sequence term first: autograd sums the terms' gradients in the order they were built, and this order
    # keeps earlier versions' numbers (a checkpoint of theirs resumes bit-identically).
    errors = squared_error(out.student_pooled, out.teacher_pooled)
    span_errors = teacher_spans = contrastive = None
    if loss_cfg.span_weight:
        span_errors, teacher_spans = span_squared_errors(out.student_hidden, out.teacher_hidden,
                                                         word_ids["mt_word_ids"], word_ids["llm_word_ids"])
    if loss_cfg.contrastive_weight:
        contrastive = contrastive_losses(out.student_pooled, out.teacher_pooled, loss_cfg.contrastive_temperature)
    return LossTerms(errors, span_errors, contrastive, teacher_spans)


def weighted_loss(term_sums: dict, counts: dict[str, float], loss_cfg: LossConfig):
    """The loss: each enabled term summed over its targets, divided by the step's global count of them (so every
    target weighs the same whatever the micro-batch, accumulation and rank layout), weighted. The gradient (a
    micro-batch's tensors) and the log (the step's all-reduced sums) both compute it here."""
    return sum(getattr(loss_cfg, TERMS[name][0]) * total / max(counts[TERMS[name][1]], 1.0)
               for name, total in term_sums.items() if getattr(loss_cfg, TERMS[name][0]))


def squared_error(student_pooled: torch.Tensor, teacher_pooled: torch.Tensor) -> torch.Tensor:
    """Per-target MSE over the hidden dimension: [B, D] x [B, D] -> [B] in fp32."""
    return (student_pooled.float() - teacher_pooled.float()).pow(2).mean(dim=-1)


def span_presence(word_ids: torch.Tensor, spans: int) -> torch.Tensor:
    """[B, L] token -> span index (-1: none) -> [B, L, W] one-hot in fp32 (W = spans)."""
    return (word_ids.unsqueeze(-1) == torch.arange(spans, device=word_ids.device)).float()


def span_means(hidden: torch.Tensor, word_ids: torch.Tensor, spans: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean hidden state of each word span: ([B, W, D] fp32, [B, W] bool: the span has tokens in this view)."""
    one_hot = span_presence(word_ids, spans)
    counts = one_hot.sum(dim=1)
    sums = one_hot.transpose(1, 2) @ hidden.float()
    return sums / counts.clamp_min(1.0).unsqueeze(-1), counts > 0


def span_count(llm_word_ids: torch.Tensor, mt_word_ids: torch.Tensor) -> int:
    """Word spans that both views cover: the targets span_squared_errors returns one error for."""
    spans = int(max(llm_word_ids.max(), mt_word_ids.max())) + 1
    both = (span_presence(llm_word_ids, spans).sum(1) > 0) & (span_presence(mt_word_ids, spans).sum(1) > 0)
    return int(both.sum())


def span_squared_errors(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mt_word_ids: torch.Tensor,
                        llm_word_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-span MSE over the hidden dimension, for the spans both views cover: ([N] errors, [N, D] the teacher's
    span vectors, for the span FVU). The student reads the MT tokens, the teacher the LLM tokens."""
    spans = int(max(llm_word_ids.max(), mt_word_ids.max())) + 1
    student_spans, student_has = span_means(student_hidden, mt_word_ids, spans)
    teacher_spans, teacher_has = span_means(teacher_hidden, llm_word_ids, spans)
    both = student_has & teacher_has
    return squared_error(student_spans[both], teacher_spans[both]), teacher_spans[both]


def contrastive_losses(student_pooled: torch.Tensor, teacher_pooled: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-target InfoNCE [B]: each student vector must pick its own teacher vector among the micro-batch's
    (cosine similarities / temperature)."""
    similarities = F.normalize(student_pooled.float(), dim=-1) @ F.normalize(teacher_pooled.float(), dim=-1).T
    targets = torch.arange(similarities.shape[0], device=similarities.device)
    return F.cross_entropy(similarities / temperature, targets, reduction="none")


def fvu_from_sums(error_sum: float, teacher_sum: torch.Tensor, teacher_sq_sum: torch.Tensor, count: int) -> float:
    """Fraction of variance unexplained = MSE / Var(teacher), both averaged over the hidden dimension.

    Built from sums (of per-target MSE, of teacher vectors, of their squares) so it can be all-reduced.
    """
    return float(error_sum / max(count, 1) / variance_from_sums(teacher_sum, teacher_sq_sum, count).clamp_min(1e-12))


def variance_from_sums(vector_sum: torch.Tensor, sq_sum: torch.Tensor, count: int) -> torch.Tensor:
    """Per-dimension variance across targets, averaged over dimensions, from all-reducible sums."""
    mean = vector_sum / max(count, 1)
    return (sq_sum / max(count, 1) - mean.pow(2)).mean()
