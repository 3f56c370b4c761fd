"""Pool token states into one vector per sequence; correct for left and right padding."""

import torch

POOLINGS = ("mean", "eos", "bos")
WORD_POOLINGS = ("first", "mean")  # token classification: a word is its first token's output, or its tokens' mean


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, strategy: str) -> torch.Tensor:
    """hidden [B, T, D], attention_mask [B, T] (1 = real token) -> [B, D] in fp32.

    mean: average over real tokens; eos: the last real token; bos: the first real token.
    """
    hidden = hidden.float()
    mask = attention_mask.to(hidden.device)
    if strategy == "mean":
        weights = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    if strategy == "eos":
        # Largest position holding a real token (right padding: length - 1; left padding: T - 1).
        index = torch.where(mask.bool(), positions, -1).amax(dim=1)
    elif strategy == "bos":
        # Smallest position holding a real token (right padding: 0; left padding: number of pads).
        index = torch.where(mask.bool(), positions, mask.shape[1]).amin(dim=1)
    else:
        raise ValueError(f"pooling {strategy!r}: expected one of {', '.join(POOLINGS)}")
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]
