"""Translate-test: the MT model translates target-language examples into English (greedy decoding); the
fine-tuned LLM then reads the translations. Translations depend on the MT model only, so they are made once
per split and kept in the run folder."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForSeq2SeqLM

from mtllm_train.config import Config
from mtllm_train.files import write_atomic
from mtllm_train.model.loading import load_model
from mtllm_train.model.tokenizers import load_tokenizer, set_source_language
from mtllm_train.portable.tokens import ENGLISH


class Translator:
    def __init__(self, cfg: Config, batch_size: int):
        self.model = load_model(cfg.task.translator, "task.translator", cfg.model, quantize=False,
                                auto_class=AutoModelForSeq2SeqLM).eval()
        self.tokenizer = load_tokenizer(cfg.task.translator_tokenizer or cfg.model.mt_tokenizer or cfg.task.translator,
                                        "task.translator_tokenizer")
        self.max_length, self.max_new_tokens, self.batch_size = cfg.task.max_length, cfg.task.max_new_tokens, batch_size

    @torch.no_grad()
    def translate(self, texts: list[str], source_language: str) -> list[str]:
        set_source_language(self.tokenizer, source_language)
        self.tokenizer.padding_side = "right"
        english = self.tokenizer.convert_tokens_to_ids(ENGLISH)
        translations = []
        for start in range(0, len(texts), self.batch_size):
            inputs = self.tokenizer(texts[start:start + self.batch_size], return_tensors="pt", padding=True,
                                    truncation=True, max_length=self.max_length)
            generated = self.model.generate(**inputs, forced_bos_token_id=english, num_beams=1, do_sample=False,
                                            max_new_tokens=self.max_new_tokens)
            # The forced language token is not a special token in every tokenizer (it is a user-defined one in
            # sentencepiece-trained ones): drop it by id.
            translations += [self.tokenizer.decode([t for t in row if t != english], skip_special_tokens=True)
                             for row in generated.tolist()]
        return translations

    def translate_examples(self, examples: list[dict], source_language: str) -> list[dict]:
        """Every text field of every example translated (labels kept), in one pass over all strings."""
        texts = [text for example in examples for text in _texts(example)]
        translated = iter(self.translate(texts, source_language))
        return [_rebuilt(example, translated) for example in examples]


def _texts(example: dict) -> list[str]:
    return [v for key, value in example.items() if key != "label" for v in (value if isinstance(value, list) else [value])]


def _rebuilt(example: dict, translated) -> dict:
    return {key: value if key == "label" else [next(translated) for _ in value] if isinstance(value, list)
            else next(translated) for key, value in example.items()}


def cached_translations(path: Path, examples: list[dict], source_language: str, translator_fn) -> list[dict]:
    """The translations of `examples` from `path`, made first (by `translator_fn()`'s Translator) if missing."""
    if not path.is_file():
        translated = translator_fn().translate_examples(examples, source_language)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, "".join(json.dumps(example, ensure_ascii=False) + "\n" for example in translated))
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
