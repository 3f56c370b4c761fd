"""The self-distillation objective: MSE between pooled vectors, in fp32, and FVU as a diagnostic."""

import torch


def squared_error(student_pooled: torch.Tensor, teacher_pooled: torch.Tensor) -> torch.Tensor:
    """Per-target MSE over the hidden dimension: [B, D] x [B, D] -> [B] in fp32.

    The trainer sums these and divides by the global number of targets, so every target weighs the same
    whatever the micro-batch, accumulation and rank layout.
    """
    return (student_pooled.float() - teacher_pooled.float()).pow(2).mean(dim=-1)


def fvu_from_sums(error_sum: float, teacher_sum: torch.Tensor, teacher_sq_sum: torch.Tensor, count: int) -> float:
    """Fraction of variance unexplained = MSE / Var(teacher), both averaged over the hidden dimension.

    Built from sums (of per-target MSE, of teacher vectors, of their squares) so it can be all-reduced.
    """
    mean = teacher_sum / count
    variance = (teacher_sq_sum / count - mean.pow(2)).mean()
    return float(error_sum / count / variance.clamp_min(1e-12))
