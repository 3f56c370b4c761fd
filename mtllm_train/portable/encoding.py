"""Task examples -> token ids of one view -> padded batches, the same at training, evaluation and prediction.

- a pair (nli, pair_classification): premise and hypothesis encoded jointly, with the tokenizer's own pair template;
- a sequence (sentiment, classification): the text;
- a choice (belebele, multiple_choice): passage, question and the answers (any number) joined into one
  sequence; each answer's token span is
  found from the tokenizer's character offsets (a token belongs to the answer its characters overlap), and a
  passage too long for max_length is cut so that question and answers always fit.
Examples that cannot be encoded raise InputError naming why.
"""

from __future__ import annotations

import torch

from .format import task_shape
from .tokens import InputError, pad_right


def _multiple_choice(example: dict, tokenizer, max_length: int) -> dict:
    passage, tail = example["passage"], [example["question"], *example["answers"]]
    while True:
        text = " ".join([passage, *tail])
        encoded = tokenizer(text, return_offsets_mapping=True)
        overflow = len(encoded["input_ids"]) - max_length
        if overflow <= 0:
            break
        passage_tokens = [(start, end) for start, end in encoded["offset_mapping"] if start < end <= len(passage)]
        if len(passage_tokens) <= overflow:
            raise InputError(f"task.max_length {max_length}: the question and answers alone need "
                              f"{len(encoded['input_ids']) - len(passage_tokens)} tokens (raise task.max_length)")
        # Drop the passage's last `overflow` tokens: cut where the first of them starts. Tokens that share its
        # characters (a character split into bytes) go with it, so the passage always gets shorter.
        passage = passage[: passage_tokens[-overflow][0]].rstrip()
    spans, cursor = [], len(passage) + len(example["question"]) + 2
    for answer in example["answers"]:
        start, end = cursor, cursor + len(answer)
        spans.append([k for k, (s, e) in enumerate(encoded["offset_mapping"]) if s < e and max(s, start) < min(e, end)])
        cursor = end + 1
    if any(not span for span in spans):
        raise InputError(f"an answer of {example['question']!r} has no tokens after tokenization")
    return {"ids": encoded["input_ids"], "spans": spans, "label": example["label"]}


def encode_examples(examples: list[dict], task: str, tokenizer, max_length: int) -> list[dict]:
    """Token ids (+ answer spans for multiple choice) and the label of every example, in order."""
    tokenizer.padding_side = "right"
    shape = task_shape(task)
    if shape == "choice":
        return [_multiple_choice(example, tokenizer, max_length) for example in examples]
    if shape == "pair":
        encoded = tokenizer([e["premise"] for e in examples], [e["hypothesis"] for e in examples], truncation=True,
                            max_length=max_length)
    else:
        encoded = tokenizer([e["text"] for e in examples], truncation=True, max_length=max_length)
    return [{"ids": ids, "label": example["label"]} for ids, example in zip(encoded["input_ids"], examples)]


def collate(items: list[dict], pad: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(model inputs: right-padded input_ids and attention_mask [B, T], for multiple choice choice_masks
    [B, K, T]; labels [B])."""
    ids, mask = pad_right([item["ids"] for item in items], pad)
    inputs = {"input_ids": ids, "attention_mask": mask}
    if "spans" in items[0]:
        choices = torch.zeros((len(items), len(items[0]["spans"]), ids.shape[1]), dtype=torch.long)
        for row, item in enumerate(items):
            for k, span in enumerate(item["spans"]):
                choices[row, k, span] = 1
        inputs["choice_masks"] = choices
    return inputs, torch.tensor([item["label"] for item in items])
