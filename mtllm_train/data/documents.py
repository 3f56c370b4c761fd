"""Read documents (id, text) from jsonl, parquet (FineWeb's layout) and plain-text files."""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterator
from pathlib import Path

from mtllm_train.config import ConfigError

SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet", ".txt")


def _jsonl(path: Path, text_field: str) -> Iterator[tuple[str, str]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as lines:
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or text_field not in record:
                raise ConfigError(f"{path}:{lineno}: no '{text_field}' field (set --text-field)")
            yield str(record.get("id", f"{path.name}:{lineno}")), record[text_field] or ""


def _parquet(path: Path, text_field: str) -> Iterator[tuple[str, str]]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    names = parquet.schema_arrow.names
    if text_field not in names:
        raise ConfigError(f"{path}: no '{text_field}' column (columns: {', '.join(names)}; set --text-field)")
    columns = [text_field] + (["id"] if "id" in names else [])
    row = 0
    for batch in parquet.iter_batches(columns=columns, batch_size=1024):
        data = batch.to_pydict()
        for i, text in enumerate(data[text_field]):
            yield str(data["id"][i]) if "id" in data else f"{path.name}:{row}", text or ""
            row += 1


def _txt(path: Path) -> Iterator[tuple[str, str]]:
    """Documents are separated by blank lines."""
    documents = [d.strip() for d in re.split(r"\n\s*\n", path.read_text(encoding="utf-8"))]
    for number, document in enumerate(d for d in documents if d):
        yield f"{path.name}:{number}", document


def read_documents(paths: list[str], text_field: str = "text") -> Iterator[tuple[str, str]]:
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"--input {name}: no such file")
        if path.name.endswith((".jsonl", ".jsonl.gz", ".json")):
            yield from _jsonl(path, text_field)
        elif path.suffix == ".parquet":
            yield from _parquet(path, text_field)
        elif path.suffix == ".txt":
            yield from _txt(path)
        else:
            raise ConfigError(f"--input {name}: unsupported file type; expected one of {', '.join(SUFFIXES)}")
