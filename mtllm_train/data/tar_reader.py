"""The members of a shard's samples, known here once: `sample_members` gives what the writer stores, `iter_samples`
reads them back (every error names the shard and the sample). A member whose header declares more bytes than a
sample member can hold is refused before it is read (a crafted header cannot make a reader allocate gigabytes)."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from mtllm_train.config import ConfigError
from mtllm_train.data.locations import LocationError

FIELDS = ("llm.npy", "mt.npy", "id.txt")
WORD_FIELDS = ("llm_words.npy", "mt_words.npy")  # format version 2: each token's word-span index (-1: none)
DEFAULT_MAX_LENGTH = 65536  # tokens per view assumed where the manifest's max_length is not at hand


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def sample_members(key: str, views, doc_id: str) -> dict:
    """One sample as the writer stores it: token ids and word-span indices of both views (data/views.py's
    AlignedViews) and the document id."""
    return {"__key__": key, "llm.npy": _npy_bytes(views.llm_ids), "mt.npy": _npy_bytes(views.mt_ids),
            "llm_words.npy": _npy_bytes(views.llm_words), "mt_words.npy": _npy_bytes(views.mt_words), "id.txt": doc_id}


def member_limit(max_length: int | None) -> int:
    """The most bytes one member may declare: a .npy of max_length 8-byte tokens with its header, or an id."""
    return 4096 + 8 * (max_length or DEFAULT_MAX_LENGTH)


class ShardError(ConfigError):
    """A shard or a sample in it is unreadable."""


def _decode(shard: Path, key: str, files: dict[str, bytes], word_spans: bool = False) -> dict:
    """{"key", "llm", "mt", "id"}; with word_spans also "llm_words" and "mt_words" (one span index per token)."""
    missing = [f for f in FIELDS + (WORD_FIELDS if word_spans else ()) if f not in files]
    if missing:
        raise ShardError(f"shard {shard}: sample {key!r} has no {', '.join(missing)}")
    names = ("llm", "mt", "llm_words", "mt_words") if word_spans else ("llm", "mt")
    try:
        arrays = {name: np.load(io.BytesIO(files[f"{name}.npy"]), allow_pickle=False) for name in names}
    except ValueError as err:
        raise ShardError(f"shard {shard}: sample {key!r} has a corrupt array ({err})") from None
    for name, ids in arrays.items():
        if ids.ndim != 1 or ids.dtype.kind not in "iu" or len(ids) == 0:
            raise ShardError(f"shard {shard}: sample {key!r}: {name}.npy must be a non-empty 1-D integer array, "
                             f"got shape {ids.shape} dtype {ids.dtype}")
    for view in ("llm", "mt") if word_spans else ():
        words, tokens = arrays[f"{view}_words"], len(arrays[view])
        if len(words) != tokens or words.min() < -1:
            raise ShardError(f"shard {shard}: sample {key!r}: {view}_words.npy must hold a span index (>= -1) for each "
                             f"of the {tokens} tokens of {view}.npy, got {len(words)} values from {words.min()} up")
    if word_spans and arrays["llm_words"].max() != arrays["mt_words"].max():
        raise ShardError(f"shard {shard}: sample {key!r}: llm_words.npy and mt_words.npy hold different numbers of "
                         f"word spans ({arrays['llm_words'].max() + 1} and {arrays['mt_words'].max() + 1})")
    return {"key": key, **arrays, "id": files["id.txt"].decode("utf-8")}


def _grouped_members(shard: Path, position: dict, stream=None,
                     limit: int = member_limit(None)) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {field: bytes}) per sample; position["key"] names the sample being read, for error messages.
    Read from `stream` (a non-seekable byte stream: see data/locations.py) when given, else from file `shard`."""
    key, files = None, {}
    with (tarfile.open(shard, mode="r|") if stream is None else tarfile.open(fileobj=stream, mode="r|")) as tar:
        for member in tar:
            if not member.isfile():
                continue
            member_key, _, field = member.name.partition(".")
            position["key"] = member_key
            if member_key != key and key is not None:
                yield key, files
                files = {}
            key = member_key
            if member.size > limit:
                raise tarfile.ReadError(f"member {member.name} declares {member.size} bytes, more than a sample "
                                        f"member holds ({limit})")
            files[field] = tar.extractfile(member).read()
    if key is not None:
        yield key, files


def iter_samples(shard: str | Path, skip_bad_samples: bool = False, bad: list | None = None,
                 stream=None, word_spans: bool = False, max_length: int | None = None) -> Iterator[dict]:
    """Yield decoded samples. With skip_bad_samples, bad ones are skipped and their messages added to `bad`.
    With word_spans (manifest.has_word_spans), each sample must hold and yields its word-span indices too.
    With `stream` (locations.open_stream), the shard is read from it and `shard` only names it in messages.
    max_length: the manifest's, which bounds the bytes a member may declare."""
    shard = Path(shard) if stream is None else shard
    position = {"key": None}
    try:
        for key, files in _grouped_members(shard, position, stream, member_limit(max_length)):
            try:
                yield _decode(shard, key, files, word_spans)
            except ShardError as err:
                if not skip_bad_samples:
                    raise
                if bad is not None:
                    bad.append(str(err))
    except (tarfile.TarError, EOFError, OSError, LocationError) as err:
        where = f"at sample {position['key']!r}" if position["key"] else "at its start"
        if isinstance(err, LocationError):  # a remote stream failed: its own cause, not the tar's
            message = f"shard {shard}: unreadable {where}: {err.cause}"
        else:
            message = f"shard {shard}: unreadable {where} (truncated or corrupt tar: {err})"
        if not skip_bad_samples:
            raise ShardError(message) from None
        if bad is not None:
            bad.append(message)
