"""Which tokenizer a view reads, loading it and its fingerprint. (The token-level rules an exported model needs
too, padding and language codes, live in portable/tokens.py, which ships inside every export.)

The two views: "llm" (the LLM's own tokenization: the teacher, and the LLM task model) and "mt" (the MT
encoder's: the stack and the MT-encoder task model).
"""

from __future__ import annotations

import hashlib
import json

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from mtllm_train.config import ConfigError, ModelConfig
from mtllm_train.model.hub import from_pretrained
from mtllm_train.portable import tokens
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


def set_source_language(tokenizer: PreTrainedTokenizerBase, lang: str | None) -> str | None:
    """portable.tokens.set_source_language, with an unknown code as the one-line ConfigError of a user mistake."""
    try:
        return tokens.set_source_language(tokenizer, lang)
    except tokens.InputError as err:
        raise ConfigError(str(err)) from None


def run_tokenizers(model_cfg: ModelConfig) -> tuple[tuple[str, str], tuple[str, str]]:
    """(name, fingerprint) of the run's LLM and MT tokenizers, to check against the shards."""
    llm, mt = ((tokenizer_spec(model_cfg, view), fingerprint(view_tokenizer(model_cfg, view))) for view in ("llm", "mt"))
    return llm, mt
