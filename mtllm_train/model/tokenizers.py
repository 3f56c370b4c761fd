"""Everything the pipeline knows about tokenizers: which one a view reads, loading it, its fingerprint and
padding id, NLLB-style source-language codes, and right-padding token ids into a batch.

The two views: "llm" (the LLM's own tokenization: the teacher, and the LLM task model) and "mt" (the MT
encoder's: the stack and the MT-encoder task model).
"""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from mtllm_train.config import ConfigError, ModelConfig
from mtllm_train.model.loading import from_pretrained

ENGLISH = "eng_Latn"  # the FLORES-200 / NLLB code of English: stage 1's text, stage 2's source language
_LANGUAGE_CODE = re.compile(r"[a-z]{3}_[A-Z][a-z]{3}")
# (the tokenizer key, the model key it defaults to) of each view
_VIEW_KEYS = {"llm": ("llm_tokenizer", "llm"), "mt": ("mt_tokenizer", "mt_encoder")}


def tokenizer_spec(model_cfg: ModelConfig, view: str) -> str:
    """The folder or id of the tokenizer `view` reads: model.<view>_tokenizer, else the model's own path/id."""
    tokenizer_key, model_key = _VIEW_KEYS[view]
    name = getattr(model_cfg, tokenizer_key)
    model_spec = getattr(model_cfg, model_key)
    if not name and isinstance(model_spec, str):
        name = model_spec
    if not name:
        raise ConfigError(f"model.{tokenizer_key}: required when model.{model_key} is an inline config")
    return name


def load_tokenizer(spec: str, key: str) -> PreTrainedTokenizerBase:
    return from_pretrained(AutoTokenizer, spec, key)


def view_tokenizer(model_cfg: ModelConfig, view: str) -> PreTrainedTokenizerBase:
    """The loaded tokenizer of `view` ("llm" or "mt")."""
    return load_tokenizer(tokenizer_spec(model_cfg, view), f"model.{_VIEW_KEYS[view][0]}")


def fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of the vocabulary (tokens and ids, added tokens included)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """Padding is masked out, so any valid id will do when a tokenizer (Llama's) has no pad token."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def language_codes(tokenizer: PreTrainedTokenizerBase) -> set[str]:
    """The xxx_Xxxx language tokens a (NLLB-style) tokenizer knows."""
    return {token for token in tokenizer.get_vocab() if _LANGUAGE_CODE.fullmatch(token)}


def set_source_language(tokenizer: PreTrainedTokenizerBase, lang: str | None) -> str | None:
    """Set an NLLB-style tokenizer's source language; tokenizers without language codes ignore it."""
    if lang is None or not hasattr(tokenizer, "src_lang"):
        return None
    if tokenizer.convert_tokens_to_ids(lang) in (None, tokenizer.unk_token_id):
        known = language_codes(tokenizer)
        raise ConfigError(f"language code {lang!r} is not in the MT tokenizer {tokenizer.name_or_path!r} "
                          f"(it knows {len(known)} codes, e.g. {', '.join(sorted(known)[:4])})")
    tokenizer.src_lang = lang
    return lang


def pad_right(sequences, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> right-padded ids and attention mask [B, longest] (int64)."""
    longest = max(len(sequence) for sequence in sequences)
    ids = np.full((len(sequences), longest), pad, dtype=np.int64)
    mask = np.zeros((len(sequences), longest), dtype=np.int64)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = sequence
        mask[row, : len(sequence)] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)
