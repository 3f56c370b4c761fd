"""Measures of the mini reproduction: X -> English retrieval R@1 and zero-shot sentiment transfer."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def recall_at_1(queries: torch.Tensor, candidates: torch.Tensor) -> float:
    """Row i of `queries` should find row i of `candidates` (cosine similarity)."""
    similarity = F.normalize(queries.float(), dim=-1) @ F.normalize(candidates.float(), dim=-1).T
    return (similarity.argmax(1) == torch.arange(len(queries))).float().mean().item()


def fit_logistic_regression(features: torch.Tensor, labels: torch.Tensor, epochs: int = 300,
                            weight_decay: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor, torch.nn.Linear]:
    """A binary logistic-regression head on standardised features (full-batch L-BFGS); returns
    (mean, std, head) to apply to other features with `predict`."""
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    inputs = (features - mean) / std
    head = torch.nn.Linear(features.shape[1], 1)
    optimizer = torch.optim.LBFGS(head.parameters(), max_iter=epochs, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(head(inputs).squeeze(-1), labels.float())
        loss = loss + weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return mean, std, head


def accuracy(classifier, features: torch.Tensor, labels: torch.Tensor) -> float:
    mean, std, head = classifier
    with torch.no_grad():
        predictions = head((features - mean) / std).squeeze(-1) > 0
    return (predictions == labels.bool()).float().mean().item()
