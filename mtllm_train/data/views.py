"""Tokenize one English document into the two aligned views of stage 1.

The teacher reads the LLM's tokenization, the student the MT encoder's. Both views cover the same prefix of
the document: when either view would exceed `max_length`, the text is cut (at a word boundary) where the
longer view reaches it, and both views are tokenized from that prefix. (The authors' code cut each view at
its own 512th token, so teacher and student pooled over different text.)
"""

from __future__ import annotations

import re

import numpy as np
from transformers import PreTrainedTokenizerBase

from mtllm_train.config import ConfigError
from mtllm_train.model.tokenizers import load_tokenizer, set_source_language

# No token spans more than this many characters: documents are pre-cut here before tokenizing.
MAX_CHARS_PER_TOKEN = 32
_LAST_SPACE = re.compile(r"\s(?=\S*$)")


class ViewTokenizer:
    def __init__(self, llm_tokenizer: str, mt_tokenizer: str, mt_lang: str | None, max_length: int):
        self.llm = load_tokenizer(llm_tokenizer, "--llm-tokenizer")
        self.mt = load_tokenizer(mt_tokenizer, "--mt-tokenizer")
        for name, tok in (("--llm-tokenizer", self.llm), ("--mt-tokenizer", self.mt)):
            if not tok.is_fast:
                raise ConfigError(f"{name} {tok.name_or_path!r}: a fast tokenizer (tokenizer.json) is needed "
                                  f"for character offsets")
        self.mt_lang = set_source_language(self.mt, mt_lang)
        self.max_length = max_length

    def _encode(self, tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        encoding = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
        return encoding["input_ids"], encoding["offset_mapping"]

    def _cut(self, ids: list[int], offsets: list[tuple[int, int]]) -> int:
        """Character offset where this view reaches max_length (special tokens carry empty offsets)."""
        content_ends = [end for start, end in offsets if end > start]
        keep = self.max_length - (len(ids) - len(content_ends))
        return content_ends[keep - 1] if keep > 0 else 0

    def views(self, text: str) -> tuple[np.ndarray, np.ndarray, bool] | None:
        """(llm_ids, mt_ids, truncated) as int32 arrays, or None for an empty document."""
        text = text.strip()[: self.max_length * MAX_CHARS_PER_TOKEN]
        if not text:
            return None
        truncated = False
        while True:
            encoded = [self._encode(self.llm, text), self._encode(self.mt, text)]
            too_long = [self._cut(ids, offsets) for ids, offsets in encoded if len(ids) > self.max_length]
            if not too_long:
                break
            cut = min(min(too_long), len(text) - 1)
            # Back off to a word boundary so both views see whole words.
            space = _LAST_SPACE.search(text, 0, cut + 1)
            text = text[: space.start() if space and space.start() > 0 else cut].rstrip()
            truncated = True
            if not text:
                return None
        (llm_ids, _), (mt_ids, _) = encoded
        return np.asarray(llm_ids, dtype=np.int32), np.asarray(mt_ids, dtype=np.int32), truncated
