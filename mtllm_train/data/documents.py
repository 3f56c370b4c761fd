"""Read documents (id, text) from jsonl, parquet (FineWeb's layout) and plain-text files."""

from __future__ import annotations

import gzip
import json
import re
import zlib
from collections.abc import Iterator
from pathlib import Path

from mtllm_train.config import ConfigError

SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet", ".txt")


def _utf8(data: bytes, path: Path, first_line: int) -> str:
    """`data` (text starting at line `first_line` of `path`) decoded; a bad byte is reported with its line."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = first_line + data.count(b"\n", 0, err.start)
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte {data[err.start]:#04x}); convert the file to "
                          f"UTF-8") from None


def _text(value: object, path: Path, lineno: int, text_field: str) -> str:
    """A record's text; null is an empty document (dropped and counted), any other non-string a mistake."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ConfigError(f"{path}:{lineno}: '{text_field}' must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:  # JSON's \ud83d escapes decode to half a surrogate pair, not a character
        raise ConfigError(f"{path}:{lineno}: '{text_field}' holds a lone surrogate ({value[err.start]!r} at "
                          f"character {err.start}), which is not Unicode text; fix or drop that line") from None
    return value


def _lines(path: Path) -> Iterator[bytes]:
    """A file's lines as bytes; a .gz that is not gzip, or is cut short, is one line naming file and line."""
    if not path.name.endswith(".gz"):
        with path.open("rb") as lines:
            yield from lines
        return
    lineno = 0
    try:
        with gzip.open(path, "rb") as lines:
            for lineno, raw in enumerate(lines, 1):
                yield raw
    except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError; a cut-off stream an EOFError
        raise ConfigError(f"{path}:{lineno + 1}: not a whole gzip file ({err}); download or compress it "
                          f"again") from None


def _jsonl(path: Path, text_field: str) -> Iterator[tuple[str, str]]:
    # Binary lines, decoded one by one: a text-mode reader fails on a bad byte without saying on which line.
    for lineno, raw in enumerate(_lines(path), 1):
        line = _utf8(raw, path, lineno)
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict) or text_field not in record:
            raise ConfigError(f"{path}:{lineno}: no '{text_field}' field (set --text-field)")
        yield str(record.get("id", f"{path.name}:{lineno}")), _text(record[text_field], path, lineno, text_field)


def _parquet(path: Path, text_field: str) -> Iterator[tuple[str, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise ConfigError(f"{path}: not a readable parquet file ({str(err).splitlines()[0]})") from None
    names = parquet.schema_arrow.names
    if text_field not in names:
        raise ConfigError(f"{path}: no '{text_field}' column (columns: {', '.join(names)}; set --text-field)")
    column_type = parquet.schema_arrow.field(text_field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)
            or pa.types.is_string_view(column_type)):
        raise ConfigError(f"{path}: column '{text_field}' must hold strings, got {column_type}")
    columns = [text_field] + (["id"] if "id" in names else [])
    row = 0
    for batch in parquet.iter_batches(columns=columns, batch_size=1024):
        data = batch.to_pydict()
        for i, text in enumerate(data[text_field]):
            yield str(data["id"][i]) if "id" in data else f"{path.name}:{row}", text or ""
            row += 1


def _txt(path: Path) -> Iterator[tuple[str, str]]:
    """Documents are separated by blank lines."""
    text = _utf8(path.read_bytes(), path, 1)
    # As text-mode reading did: \r\n and \r are newlines, so Windows files give the same documents.
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    documents = [d.strip() for d in re.split(r"\n\s*\n", text)]
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
