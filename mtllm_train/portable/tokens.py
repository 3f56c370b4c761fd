"""Token-level rules every reader of an MT-LLM needs: padding ids, right padding, NLLB-style language codes."""

from __future__ import annotations

import difflib
import re
from bisect import bisect_left, bisect_right

import numpy as np
import torch

class InputError(ValueError):
    """Something a user gave the model cannot be read (an unknown language code, an input too long, ...)."""


ENGLISH = "eng_Latn"  # the FLORES-200 / NLLB code of English: stage 1's text, stage 2's source language
_LANGUAGE_CODE = re.compile(r"[a-z]{3}_[A-Z][a-z]{3}")


def token_pieces(text: str, offsets, starts: list[int], ends: list[int]) -> list[tuple[int, int]]:
    """Each token's first and last piece of `text`: pieces are sorted, disjoint character ranges (words), given
    by their starts and ends. A token is placed by its character offsets with surrounding whitespace stripped
    (SentencePiece and BPE tokens carry the space before a word); (-1, -1): a token with no text (a special
    token, whitespace). The one rule for which words a token belongs to: stage 1's word spans and stage 2's
    token classification both place tokens here."""
    placed = []
    for start, end in offsets:
        content = text[start:end]
        if not content.strip():
            placed.append((-1, -1))
            continue
        start, end = start + len(content) - len(content.lstrip()), end - len(content) + len(content.rstrip())
        placed.append((bisect_right(ends, start), bisect_left(starts, end) - 1))
    return placed


def pad_id(tokenizer) -> int:
    """Padding is masked out, so any valid id will do when a tokenizer (Llama's) has no pad token."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def is_language_code(code: str) -> bool:
    """Whether `code` has the form of a FLORES-200 / NLLB code (xxx_Xxxx)."""
    return bool(_LANGUAGE_CODE.fullmatch(code))


def language_codes(tokenizer) -> set[str]:
    """The xxx_Xxxx language tokens a (NLLB-style) tokenizer knows."""
    return {token for token in tokenizer.get_vocab() if _LANGUAGE_CODE.fullmatch(token)}


def set_source_language(tokenizer, lang: str | None) -> str | None:
    """Set an NLLB-style tokenizer's source language; tokenizers without language codes ignore it.
    An unknown code raises InputError naming it."""
    if lang is None or not hasattr(tokenizer, "src_lang"):
        return None
    known = language_codes(tokenizer)
    # A language code, not any vocabulary piece: "de" is a token too, and would start every text with it.
    if lang not in known if known else tokenizer.convert_tokens_to_ids(lang) in (None, tokenizer.unk_token_id):
        suggestions = sorted(code for code in known if code.lower().startswith(lang.lower()))[:3] \
            or difflib.get_close_matches(lang, sorted(known), n=3)
        hint = f"did you mean {' or '.join(suggestions)}? " if suggestions else ""
        raise InputError(f"language code {lang!r} is not in the MT tokenizer {tokenizer.name_or_path!r}: {hint}"
                         f"(it knows {len(known)} FLORES-200 codes, e.g. {', '.join(sorted(known)[:4])})")
    tokenizer.src_lang = lang
    return lang


def pad_right(sequences, pad: int, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> right-padded ids and attention mask [B, length] (int64; length: the longest by default)."""
    longest = max(len(sequence) for sequence in sequences)
    longest = longest if length is None else max(length, longest)
    ids = np.full((len(sequences), longest), pad, dtype=np.int64)
    mask = np.zeros((len(sequences), longest), dtype=np.int64)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = sequence
        mask[row, : len(sequence)] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)
