"""Task examples from local jsonl / csv / parquet files, or Hugging Face datasets, normalised per task shape
(portable/format.py's TASK_SHAPES).

- a sequence (sentiment, classification): text (or sentence), label (or category: SIB-200's): an integer
  class, or one of the task's label names
- a pair (nli, pair_classification): premise and hypothesis (or sentence1 and sentence2: PAWS-X's), label (NLI:
  0 entailment, 1 neutral, 2 contradiction; names accepted)
- a choice (belebele, multiple_choice): passage (or premise: XCOPA's; optional for multiple_choice), question,
  task.choices answers
  (a list `answers`, or choice1..K / mc_answer1..K), the correct index (label, 0-based; or correct_answer_num,
  1-based: Belebele's); Belebele's own column names (flores_passage, mc_answer1..4) are accepted as they are
- words (token_classification): tokens (or words) and one label per word in labels (or tags, ner_tags,
  pos_tags: WikiANN's, MasakhaNER's, UDPOS's), each a name of task.labels or its index; a csv cell holds
  them space-separated
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from mtllm_train.config import CHOICES, ConfigError
from mtllm_train.portable.format import task_shape

NLI_LABELS = ("entailment", "neutral", "contradiction")


def label_names(task) -> tuple[str, ...]:
    """A task's class names (what its data's labels and its predictions are called): task.labels, else NLI's three
    for nli; none for multiple choice (an answer is its index). `task`: the config's TaskConfig."""
    if task_shape(task.name) == "choice":
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


def hf_rows(spec: str):
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
    try:
        rows = datasets.load_dataset(path, config, split=split)
    except Exception as err:  # datasets raises many kinds (offline, missing, gated): each is the same failure
        raise hub_failure(spec, err) from None
    yield from enumerate(rows, 1)


def hub_failure(what: str, err: Exception, otherwise: str = "") -> ConfigError:
    """One line for data the Hugging Face hub did not give (offline, missing, gated, ...)."""
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ConfigError(f"{what}: loading its data failed ({first_line}); it is read from the Hugging Face hub: run "
                       f"where the hub is reachable, or where the datasets cache holds it{otherwise}")


def load_split(spec: str, task: str, label_names: tuple[str, ...] = NLI_LABELS, lang: str | None = None,
               choices: int = 4) -> list[dict]:
    """A split given as a file path or hf://org/dataset[/config]:split; `{lang}` in it becomes `lang`."""
    if lang is not None:
        spec = spec.replace("{lang}", lang)
    if spec.startswith("hf://"):
        return _normalise(hf_rows(spec), spec, task, label_names, choices)
    return read_task_file(spec, task, label_names, choices)


def read_task_file(path: str | Path, task: str, label_names: tuple[str, ...] = NLI_LABELS,
                   choices: int = 4) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"task file {str(path)!r} does not exist")
    examples = _normalise(_rows(path), str(path), task, label_names, choices)
    if not examples:
        raise ConfigError(f"task file {str(path)!r} holds no examples")
    return examples


def _answers(row: dict, choices: int, where: str) -> list:
    """A multiple-choice row's answers: a list, or numbered columns (choice1.., mc_answer1..)."""
    answers = row.get("answers")
    if answers is None:
        prefix = next((p for p in ("mc_answer", "choice") if f"{p}1" in row), None)
        if prefix is None:
            raise ConfigError(f"{where}: no answers (a list `answers`, or columns choice1.. / mc_answer1..)")
        answers = [row[f"{prefix}{k}"] for k in range(1, choices + 1) if f"{prefix}{k}" in row]
        if f"{prefix}{choices + 1}" in row:
            answers.append(row[f"{prefix}{choices + 1}"])
    if not isinstance(answers, list) or len(answers) != choices:
        count = len(answers) if isinstance(answers, list) else type(answers).__name__
        raise ConfigError(f"{where}: expected {choices} answers (task.choices), got {count}")
    return answers


def _word_labels(row: dict, names: tuple[str, ...], where: str) -> dict:
    """A token-classification row: its words and one label per word."""
    words, labels = _field(row, ("tokens", "words"), where), _field(row, ("labels", "tags", "ner_tags", "pos_tags"), where)
    words, labels = (value.split() if isinstance(value, str) else value for value in (words, labels))
    if not isinstance(words, list) or not isinstance(labels, list):
        raise ConfigError(f"{where}: expected a list of words and a list of labels, got {type(words).__name__} and "
                          f"{type(labels).__name__}")
    if not words:
        raise ConfigError(f"{where}: no words")
    if len(labels) != len(words):
        raise ConfigError(f"{where}: {len(words)} words but {len(labels)} labels (one label per word)")
    return {"words": [str(word) for word in words], "label": [_label(label, names, where) for label in labels]}


def _normalise(rows, source: str, task: str, label_names: tuple[str, ...], choices: int = 4) -> list[dict]:
    if task not in CHOICES["task.name"]:
        raise ConfigError(f"task {task!r}: expected one of {', '.join(CHOICES['task.name'])}")
    shape, examples = task_shape(task), []
    names = NLI_LABELS if task == "nli" else label_names

    def aliases(name: str, other: str) -> tuple[str, ...]:
        """The general shapes also read the column names of SIB-200 and PAWS-X; the paper's tasks their own."""
        return (name,) if task in ("nli", "sentiment", "belebele") else (name, other)

    for number, row in rows:
        where = f"{source}:{number}"
        if shape == "pair":
            examples.append({"premise": str(_field(row, aliases("premise", "sentence1"), where)),
                             "hypothesis": str(_field(row, aliases("hypothesis", "sentence2"), where)),
                             "label": _label(_field(row, ("label",), where), names, where)})
        elif shape == "token":
            examples.append(_word_labels(row, names, where))
        elif shape == "sequence":
            examples.append({"text": str(_field(row, aliases("text", "sentence"), where)),
                             "label": _label(_field(row, aliases("label", "category"), where), names, where)})
        else:
            indices = tuple(str(k) for k in range(1, choices + 1))
            if "correct_answer_num" in row:
                correct = _label(int(row["correct_answer_num"]) - 1, indices, where)
            else:
                correct = _label(_field(row, ("label",), where), indices, where)
            passage = next((row[k] for k in ("flores_passage", "passage", "premise") if row.get(k) is not None), "") \
                if task == "multiple_choice" else _field(row, ("flores_passage", "passage"), where)
            examples.append({"passage": str(passage or ""), "question": str(_field(row, ("question",), where)),
                             "answers": [str(a) for a in _answers(row, choices, where)], "label": correct})
    return examples

