"""model.projection_init = least_squares: start U where it already carries signal the teacher can read.

With a random U the LLM first reads noise whose variation across texts is unrelated to the teacher's; plain MSE
is then lowered fastest by matching the teacher's mean and shrinking the student's variation, and stage 1
spends its first hundreds of steps on a plateau (bench/mini_repro/RESULTS.md). Here U is instead fit, before
step 1, by ridge regression from the MT encoder's states of each word span to the LLM's own input embeddings
of the same word span (the spans the shards store), so that at step 0 the LLM already reads something close
to the words it would read in English.
"""

from __future__ import annotations

from typing import Iterable

import torch

from mtllm_train.config import ConfigError
from mtllm_train.distributed import agree_or_stop, all_reduce
from mtllm_train.model.loss import span_means

RIDGE = 1e-3  # relative to the mean eigenvalue of the centred Gram matrix: keeps rare directions from exploding


@torch.no_grad()
def fit_projection(stack, batches: Iterable[dict], samples: int, device: torch.device) -> dict:
    """Fit stack.projection (weight and bias) on up to `samples` sequences of this rank's `batches`; the normal
    equations are summed over ranks, so every rank sets the same U. Returns {"spans", "fvu"}: the word spans
    fit and the fraction of the embeddings' variance U leaves unexplained."""
    embeddings = stack.llm.get_input_embeddings()
    width_in, width_out = stack.projection.in_features, stack.projection.out_features
    gram = torch.zeros(width_in, width_in, dtype=torch.float64, device=device)
    cross = torch.zeros(width_in, width_out, dtype=torch.float64, device=device)
    sums = torch.zeros(width_in + 2 * width_out + 1, dtype=torch.float64, device=device)  # x, y, y^2, count
    seen, data_error = 0, None
    batches = iter(batches)
    while seen < samples:
        try:
            batch = next(batches)
        except ConfigError as err:  # this rank's data failed: the others learn it from the all-reduce, not a hang
            data_error = err
            break
        seen += batch["mt_input_ids"].shape[0]
        mt_word_ids, llm_word_ids = batch["mt_word_ids"].to(device), batch["llm_word_ids"].to(device)
        spans = int(max(mt_word_ids.max(), llm_word_ids.max())) + 1
        mt_states = stack.mt_states(batch["mt_input_ids"].to(device), batch["mt_attention_mask"].to(device))
        word_states, has_state = span_means(mt_states, mt_word_ids, spans)
        word_embeddings, has_embedding = span_means(embeddings(batch["llm_input_ids"].to(device)), llm_word_ids, spans)
        both = has_state & has_embedding
        x, y = word_states[both].double(), word_embeddings[both].double()
        gram += x.T @ x
        cross += x.T @ y
        sums += torch.cat([x.sum(0), y.sum(0), y.pow(2).sum(0), torch.tensor([float(x.shape[0])], device=device)])
    agree_or_stop([], data_error, device, "read their data for model.projection_init")
    all_reduce(gram), all_reduce(cross), all_reduce(sums)
    count = sums[-1].clamp_min(1.0)
    x_mean, y_mean = sums[:width_in] / count, sums[width_in:width_in + width_out] / count
    # Centred normal equations: the bias is the intercept and is not shrunk.
    centred_gram = gram - count * torch.outer(x_mean, x_mean)
    centred_cross = cross - count * torch.outer(x_mean, y_mean)
    ridge = RIDGE * centred_gram.diagonal().mean().clamp_min(1e-12)
    weight = torch.linalg.solve(centred_gram + ridge * torch.eye(width_in, dtype=torch.float64, device=device),
                                centred_cross)
    bias = y_mean - x_mean @ weight
    stack.projection.weight.copy_(weight.T.to(stack.projection.weight.dtype))
    stack.projection.bias.copy_(bias.to(stack.projection.bias.dtype))
    # Residual sum of squares of the centred fit, from the same sums: tr(Syy) - 2 tr(W'Sxy) + tr(W'Sxx W).
    total = (sums[width_in + width_out:-1] - count * y_mean.pow(2)).sum()
    residual = total - 2 * (weight * centred_cross).sum() + (weight * (centred_gram @ weight)).sum()
    return {"spans": int(count), "fvu": float(residual / total.clamp_min(1e-12))}
