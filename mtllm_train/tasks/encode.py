"""`TaskData`: a stage-2 run's task data (the two views' tokenizers, their padding ids, the label names), encoded
and batched by portable/encoding.py, the code an exported task model predicts with too."""

from __future__ import annotations

import torch

from mtllm_train.config import Config, ConfigError
from mtllm_train.model.tokenizers import set_source_language, view_tokenizer
from mtllm_train.portable.encoding import collate, encode_examples
from mtllm_train.portable.tokens import ENGLISH, InputError, pad_id
from mtllm_train.tasks.data import label_names, load_split


class TaskData:
    """A stage-2 run's task data: splits read with its label names, encoded for either view, batched.

    Encoding sets the MT tokenizer's source language for the examples at hand, every time, so no caller
    depends on the language another caller left behind.
    """

    def __init__(self, cfg: Config):
        self.task, self.max_length, self.choices = cfg.task.name, cfg.task.max_length, cfg.task.choices
        self.word_pooling = cfg.task.word_pooling
        self.labels = label_names(cfg.task)
        self.tokenizers = {view: view_tokenizer(cfg.model, view) for view in ("llm", "mt")}
        self.pads = {view: pad_id(tokenizer) for view, tokenizer in self.tokenizers.items()}
        self._splits: dict[tuple[str, str | None], list[dict]] = {}

    def split(self, spec: str, lang: str | None = None) -> list[dict]:
        """A split's examples, read once (a run checks every split before its first step, then validates)."""
        if (spec, lang) not in self._splits:
            self._splits[(spec, lang)] = load_split(spec, self.task, self.labels, lang, self.choices)
        return self._splits[(spec, lang)]

    def encode(self, examples: list[dict], view: str, lang: str = ENGLISH) -> list[dict]:
        """Token ids of `examples` (written in `lang`, an MT language code) for `view`."""
        tokenizer = self.tokenizers[view]
        set_source_language(tokenizer, lang)
        try:
            return encode_examples(examples, self.task, tokenizer, self.max_length, self.word_pooling)
        except InputError as err:
            raise ConfigError(str(err)) from None

    def batch(self, items: list[dict], view: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return collate(items, self.pads[view])
