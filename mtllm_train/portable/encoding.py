"""Task examples -> token ids of one view -> padded batches, the same at training, evaluation and prediction.

- a pair (nli, pair_classification): premise and hypothesis encoded jointly, with the tokenizer's own pair template;
- a sequence (sentiment, classification): the text;
- a choice (belebele, multiple_choice): passage, question and the answers (any number) joined into one
  sequence; each answer's token span is
  found from the tokenizer's character offsets (a token belongs to the answer its characters overlap), and a
  passage too long for max_length is cut so that question and answers always fit;
- words (token_classification): the words joined by single spaces; each word's span is the tokens
  tokens.token_pieces places in it (all of them, or the first: `word_pooling`). A word with no token (cut by
  max_length, or characters the tokenizer drops) has an empty span: it is not trained on and is predicted as
  the first label.
Examples that cannot be encoded raise InputError naming why.
"""

from __future__ import annotations

import torch

from .format import task_shape
from .tokens import InputError, pad_right, token_pieces

IGNORED = -100  # the label of a padding word (cross-entropy's ignore_index)


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


def word_token_spans(words: list[str], text: str, offsets) -> list[list[int]]:
    """Each word's tokens, `text` being the words joined by single spaces and `offsets` its tokens' characters."""
    starts, ends, cursor = [], [], 0
    for word in words:
        starts.append(cursor)
        ends.append(cursor + len(word))
        cursor += len(word) + 1
    spans = [[] for _ in words]
    for token, (first, last) in enumerate(token_pieces(text, offsets, starts, ends)):
        for word in range(max(first, 0), last + 1):  # a token straddling words (rare) belongs to each
            spans[word].append(token)
    return spans


def _words(example: dict, tokenizer, max_length: int, word_pooling: str) -> dict:
    text = " ".join(example["words"])
    encoded = tokenizer(text, return_offsets_mapping=True, truncation=True, max_length=max_length)
    spans = word_token_spans(example["words"], text, encoded["offset_mapping"])
    return {"ids": encoded["input_ids"], "spans": [span[:1] if word_pooling == "first" else span for span in spans],
            "label": example["label"]}


def encode_examples(examples: list[dict], task: str, tokenizer, max_length: int,
                    word_pooling: str = "first") -> list[dict]:
    """Token ids (+ answer or word spans for multiple choice and token classification) and the label(s) of every
    example, in order."""
    tokenizer.padding_side = "right"
    shape = task_shape(task)
    if shape == "choice":
        return [_multiple_choice(example, tokenizer, max_length) for example in examples]
    if shape == "token":
        return [_words(example, tokenizer, max_length, word_pooling) for example in examples]
    if shape == "pair":
        encoded = tokenizer([e["premise"] for e in examples], [e["hypothesis"] for e in examples], truncation=True,
                            max_length=max_length)
    else:
        encoded = tokenizer([e["text"] for e in examples], truncation=True, max_length=max_length)
    return [{"ids": ids, "label": example["label"]} for ids, example in zip(encoded["input_ids"], examples)]


def collate(items: list[dict], pad: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(model inputs: right-padded input_ids and attention_mask [B, T], for multiple choice and token
    classification span_masks [B, K, T] (K: the most answers or words in the batch); labels [B], or [B, K] for
    token classification with IGNORED on padding words)."""
    ids, mask = pad_right([item["ids"] for item in items], pad)
    inputs = {"input_ids": ids, "attention_mask": mask}
    if "spans" in items[0]:
        spans = torch.zeros((len(items), max(len(item["spans"]) for item in items), ids.shape[1]), dtype=torch.long)
        for row, item in enumerate(items):
            for k, span in enumerate(item["spans"]):
                spans[row, k, span] = 1
        inputs["span_masks"] = spans
    if isinstance(items[0]["label"], list):
        labels = torch.full(inputs["span_masks"].shape[:2], IGNORED)
        for row, item in enumerate(items):
            labels[row, :len(item["label"])] = torch.tensor(item["label"], dtype=torch.long)
        return inputs, labels
    return inputs, torch.tensor([item["label"] for item in items])
