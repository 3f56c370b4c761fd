"""Tokenize one English document into the two aligned views of stage 1.

The teacher reads the LLM's tokenization, the student the MT encoder's. Both views cover the same prefix of
the document: when either view would exceed `max_length`, the text is cut (at a word boundary) where the
longer view reaches it, and both views are tokenized from that prefix. (The authors' code cut each view at
its own 512th token, so teacher and student pooled over different text.) Each view also gets its tokens' word-span
indices (`word_spans`), which word-span distillation pools over.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np
from transformers import PreTrainedTokenizerBase

from mtllm_train.config import ConfigError
from mtllm_train.model.tokenizers import load_tokenizer, set_source_language
from mtllm_train.portable.tokens import token_pieces

# No token spans more than this many characters: documents are pre-cut here before tokenizing.
MAX_CHARS_PER_TOKEN = 32
_LAST_SPACE = re.compile(r"\s(?=\S*$)")
_WORD_PIECES = re.compile(r"\w+|[^\w\s]")


class Views(NamedTuple):
    """One document's two views: token ids and word-span indices (int32, as long as the ids), the text both
    views cover, and whether it was cut at max_length."""
    llm_ids: np.ndarray
    mt_ids: np.ndarray
    llm_words: np.ndarray
    mt_words: np.ndarray
    truncated: bool
    text: str


def word_spans(text: str, offsets: list[list[tuple[int, int]]]) -> list[np.ndarray]:
    r"""Each view's token -> word-span index (0, 1, ... in text order; -1: no span), from its character offsets.

    Word-span distillation mean-pools each span in the teacher's (LLM tokens) and the student's (MT tokens) last
    hidden states and compares them, so a span must be a whole run of tokens in every view and the same text in
    all of them. Spans start as the text's words and single punctuation marks (`\w+|[^\w\s]`); wherever a token
    of any view straddles the boundary of two neighbouring pieces ("n't", "e.g", "stop."), they are merged, so
    every span boundary is a token boundary in every view (tokens are placed by portable/tokens.token_pieces).
    -1 marks special tokens (empty offsets), whitespace-only tokens, and the tokens of a span that some view has
    no token for (characters its normaliser drops), so every view holds the same spans.
    """
    pieces = [match.span() for match in _WORD_PIECES.finditer(text)]
    starts, ends = [start for start, _ in pieces], [end for _, end in pieces]
    joined = np.zeros(len(pieces), dtype=bool)  # joined[i]: some token runs from piece i into piece i + 1
    first_piece = []  # per view and token: the first piece its stripped text touches; -1: none
    for view in offsets:
        first_piece.append(np.full(len(view), -1))
        for token, (first, last) in enumerate(token_pieces(text, view, starts, ends)):
            if first >= 0:
                joined[first:last] = True
                first_piece[-1][token] = first
    # Each piece's span: a new one starts at every piece no token joins to the one before. The appended -1 is
    # what first_piece -1 (a token in no span) looks up.
    piece_span = np.append(np.cumsum(np.concatenate([[False], ~joined[:-1]])), -1)
    token_span = [piece_span[first] for first in first_piece]
    spans = int(piece_span.max()) + 1
    covered = np.ones(spans, dtype=bool)  # the spans every view has a token in; the others are dropped
    for view in token_span:
        covered &= np.bincount(view[view >= 0], minlength=spans) > 0
    number = np.append(np.where(covered, np.cumsum(covered) - 1, -1), -1)  # covered spans renumbered; -1 stays
    return [number[view].astype(np.int32) for view in token_span]


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

    def views(self, text: str) -> Views | None:
        """Both views of `text` (int32 ids and word spans), or None for an empty document."""
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
        (llm_ids, llm_offsets), (mt_ids, mt_offsets) = encoded
        llm_words, mt_words = word_spans(text, [llm_offsets, mt_offsets])
        return Views(np.asarray(llm_ids, dtype=np.int32), np.asarray(mt_ids, dtype=np.int32), llm_words, mt_words,
                     truncated, text)
