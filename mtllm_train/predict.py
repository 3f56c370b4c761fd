"""`mtllm predict`'s inputs: texts on the command line, or a JSON-lines file of inputs for the export's task."""

from __future__ import annotations

import json
from pathlib import Path

from mtllm_train.config import ConfigError
from mtllm_train.portable.format import task_shape
from mtllm_train.portable.modeling_mtllm import MTLLMModel


def read_inputs(path: str | None, texts: list[str], model: MTLLMModel) -> list:
    """`mtllm predict`'s inputs: texts from the command line, or one JSON object per line of a file."""
    if bool(path) == bool(texts):
        raise ConfigError("mtllm predict: give texts or --input FILE.jsonl (one of them)")
    if texts:
        # A sequence model reads a text; a token model the text's words (split at white space).
        if model.config.task is not None and task_shape(model.config.task["name"]) not in ("sequence", "token"):
            raise ConfigError(f"mtllm predict: a {model.config.task['name']} model reads several fields per input; "
                              f"give them in --input FILE.jsonl")
        return texts
    if not Path(path).is_file():
        raise ConfigError(f"--input {path}: no such file")
    records = []
    for number, raw in enumerate(Path(path).read_bytes().splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}:{number}: not UTF-8 text (byte {raw[err.start]:#04x})") from None
        if line.strip():
            try:
                record = json.loads(line)
            except ValueError as err:
                raise ConfigError(f"{path}:{number}: not valid JSON ({err})") from None
            if not isinstance(record, dict):
                raise ConfigError(f"{path}:{number}: expected a JSON object (e.g. {{\"text\": ...}}), got "
                                  f"{type(record).__name__}")
            if model.config.task is None and "text" not in record:
                raise ConfigError(f"{path}:{number}: no 'text' field to embed")
            for name, value in record.items():
                texts = value if name in ("answers", "words") and isinstance(value, list) else [value]
                if name != "label" and not all(isinstance(text, str) for text in texts):
                    raise ConfigError(f"{path}:{number}: '{name}' must be text, got {type(value).__name__}")
            records.append(record if model.config.task is not None else record["text"])
    if not records:
        raise ConfigError(f"--input {path}: no inputs (one JSON object per line)")
    return records
