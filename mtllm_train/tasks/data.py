"""Task examples from local jsonl / csv / parquet files, or Hugging Face datasets, normalised per task.

- nli:       premise, hypothesis, label (0 entailment, 1 neutral, 2 contradiction; names accepted)
- sentiment: text, label (an integer class, or a name listed in the task's label names)
- belebele:  passage, question, four answers, the correct index (0-based); Belebele's own column names
             (flores_passage, mc_answer1..4, correct_answer_num 1-based) are accepted as they are
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from mtllm_train.config import CHOICES, ConfigError

NLI_LABELS = ("entailment", "neutral", "contradiction")


def label_names(task) -> tuple[str, ...]:
    """A task's class names (what its data's labels and its predictions are called): task.labels, else NLI's three
    for nli; none for multiple choice (an answer is its index). `task`: the config's TaskConfig."""
    if task.name == "belebele":
        return ()
    return tuple(task.labels) or (NLI_LABELS if task.name == "nli" else ())


def _jsonl_rows(path: Path):
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, 1):
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                row = json.loads(line)
            except UnicodeDecodeError as err:
                raise ConfigError(f"{path}:{number}: not UTF-8 text (byte {raw[err.start]:#04x})") from None
            except json.JSONDecodeError as err:
                raise ConfigError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise ConfigError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            yield number, row


def _rows(path: Path):
    if path.suffix == ".jsonl":
        yield from _jsonl_rows(path)
    elif path.suffix == ".csv":
        try:
            # utf-8-sig: a spreadsheet's byte-order mark is not part of the first column's name
            with path.open(encoding="utf-8-sig", newline="") as handle:
                yield from enumerate(csv.DictReader(handle), 2)
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not UTF-8 text (byte {err.start} of the file)") from None
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as err:
            raise ConfigError(f"{path}: not a readable parquet file ({str(err).splitlines()[0]})") from None
        yield from enumerate(table.to_pylist(), 1)
    else:
        raise ConfigError(f"{path}: unsupported task file; expected .jsonl, .csv or .parquet")


def _label(value, names: tuple[str, ...], where: str) -> int:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, str):
        folded = [name.casefold() for name in names]  # "Positive" is the label positive, whichever side capitalises
        if value.strip().casefold() not in folded:
            raise ConfigError(f"{where}: label {value!r} is not one of {', '.join(names)}")
        return folded.index(value.strip().casefold())
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(names):
        raise ConfigError(f"{where}: label {value!r} is outside 0..{len(names) - 1}")
    return value


def _field(row: dict, names: tuple[str, ...], where: str):
    for name in names:
        if name in row and row[name] is not None:
            return row[name]
    raise ConfigError(f"{where}: no {' / '.join(names)} field")


def _hf_rows(spec: str):
    """hf://org/dataset[/config]:split -> numbered rows (needs the optional `datasets` package and the hub)."""
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"{spec}: reading Hugging Face datasets needs the `datasets` package (pip install "
                          f"datasets), or download the split to a local jsonl / csv / parquet file") from None
    name, _, split = spec.removeprefix("hf://").partition(":")
    if not name or not split:
        raise ConfigError(f"{spec}: expected hf://org/dataset[/config]:split, e.g. hf://facebook/xnli/de:validation")
    parts = name.split("/")
    path, config = ("/".join(parts[:2]), "/".join(parts[2:]) or None) if len(parts) > 2 else (name, None)
    yield from enumerate(datasets.load_dataset(path, config, split=split), 1)


def load_split(spec: str, task: str, label_names: tuple[str, ...] = NLI_LABELS, lang: str | None = None) -> list[dict]:
    """A split given as a file path or hf://org/dataset[/config]:split; `{lang}` in it becomes `lang`."""
    if lang is not None:
        spec = spec.replace("{lang}", lang)
    if spec.startswith("hf://"):
        return _normalise(_hf_rows(spec), spec, task, label_names)
    return read_task_file(spec, task, label_names)


def read_task_file(path: str | Path, task: str, label_names: tuple[str, ...] = NLI_LABELS) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"task file {str(path)!r} does not exist")
    examples = _normalise(_rows(path), str(path), task, label_names)
    if not examples:
        raise ConfigError(f"task file {str(path)!r} holds no examples")
    return examples


def _normalise(rows, source: str, task: str, label_names: tuple[str, ...]) -> list[dict]:
    if task not in CHOICES["task.name"]:
        raise ConfigError(f"task {task!r}: expected one of {', '.join(CHOICES['task.name'])}")
    examples = []
    for number, row in rows:
        where = f"{source}:{number}"
        if task == "nli":
            examples.append({"premise": str(_field(row, ("premise",), where)),
                             "hypothesis": str(_field(row, ("hypothesis",), where)),
                             "label": _label(_field(row, ("label",), where), NLI_LABELS, where)})
        elif task == "sentiment":
            examples.append({"text": str(_field(row, ("text",), where)),
                             "label": _label(_field(row, ("label",), where), label_names, where)})
        else:
            answers = row.get("answers") or [_field(row, (f"mc_answer{k}",), where) for k in range(1, 5)]
            if "correct_answer_num" in row:
                correct = _label(int(row["correct_answer_num"]) - 1, ("1", "2", "3", "4"), where)
            else:
                correct = _label(_field(row, ("label",), where), ("1", "2", "3", "4"), where)
            if len(answers) != 4:
                raise ConfigError(f"{where}: expected 4 answers, got {len(answers)}")
            examples.append({"passage": str(_field(row, ("flores_passage", "passage"), where)),
                             "question": str(_field(row, ("question",), where)),
                             "answers": [str(a) for a in answers], "label": correct})
    return examples
