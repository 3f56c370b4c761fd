"""Task heads on the task representation of a body (the LLM, the MT encoder, or the stack).

- sequence / pair classification: the pooled vector [B, D] -> Linear(D, C, bias=False) (a pair is encoded jointly)
- multiple choice: each choice's own token span mean-pooled [B, K, D] -> Linear(D, 1) -> logits [B, K];
  cross-entropy over the choices
"""

from __future__ import annotations

import torch
from torch import nn

from .pooling import pool


def choice_pool(hidden: torch.Tensor, choice_masks: torch.Tensor) -> torch.Tensor:
    """hidden [B, T, D]; choice_masks [B, K, T] with 1 on the tokens of choice k -> span means [B, K, D] (fp32)."""
    batch, choices, length = choice_masks.shape
    expanded = hidden.unsqueeze(1).expand(batch, choices, length, hidden.shape[-1])
    spans = pool(expanded.reshape(batch * choices, length, -1), choice_masks.reshape(batch * choices, length), "mean")
    return spans.view(batch, choices, -1)


class ClassificationHead(nn.Module):
    def __init__(self, hidden_size: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, num_classes, bias=False)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        # In the head's own dtype (fp32 in training; an export loaded in bf16 has a bf16 head), logits in fp32.
        return self.linear(pooled.to(self.linear.weight.dtype)).float()


class MultipleChoiceHead(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1, bias=False)

    def forward(self, choice_states: torch.Tensor) -> torch.Tensor:
        return self.linear(choice_states.to(self.linear.weight.dtype)).float().squeeze(-1)
