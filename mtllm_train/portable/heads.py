"""Task heads on the task representation of a body (the LLM, the MT encoder, or the stack).

- sequence / pair classification: the pooled vector [B, D] -> Linear(D, C, bias=False) (a pair is encoded jointly)
- multiple choice: each choice's own token span mean-pooled [B, K, D] -> Linear(D, 1) -> logits [B, K];
  cross-entropy over the choices
- token classification: each word's token span pooled [B, W, D] -> Linear(D, C, bias=False) -> logits [B, W, C]
"""

from __future__ import annotations

import torch
from torch import nn



def span_pool(hidden: torch.Tensor, span_masks: torch.Tensor) -> torch.Tensor:
    """hidden [B, T, D]; span_masks [B, K, T] with 1 on the tokens of span k (an answer, a word) -> span means
    [B, K, D] (fp32; a span without tokens: zeros)."""
    # One batched product, not the [B, K, T, D] copy per span that a sentence of many words would need; in fp32
    # whatever autocast says.
    with torch.autocast(hidden.device.type, enabled=False):
        weights = span_masks.to(device=hidden.device, dtype=torch.float32)
        sums = torch.bmm(weights, hidden.float())
    return sums / weights.sum(-1, keepdim=True).clamp_min(1.0)


def word_presence(span_masks: torch.Tensor) -> torch.Tensor:
    """[B, W, T] word spans -> [B, W]: which words have tokens (a word cut by max_length has none)."""
    return span_masks.sum(-1) > 0


def word_predictions(logits: torch.Tensor, span_masks: torch.Tensor) -> torch.Tensor:
    """Token classification's label per word [B, W]: the best class, and the first label for a word without
    tokens (there is nothing to read it from)."""
    return logits.argmax(-1).masked_fill(~word_presence(span_masks), 0)


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
