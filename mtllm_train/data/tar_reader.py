"""Read samples from one shard; every error names the shard and the sample."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from mtllm_train.config import ConfigError

FIELDS = ("llm.npy", "mt.npy", "id.txt")


class ShardError(ConfigError):
    """A shard or a sample in it is unreadable."""


def _decode(shard: Path, key: str, files: dict[str, bytes]) -> dict:
    missing = [f for f in FIELDS if f not in files]
    if missing:
        raise ShardError(f"shard {shard}: sample {key!r} has no {', '.join(missing)}")
    try:
        views = {name: np.load(io.BytesIO(files[f"{name}.npy"]), allow_pickle=False) for name in ("llm", "mt")}
    except ValueError as err:
        raise ShardError(f"shard {shard}: sample {key!r} has a corrupt array ({err})") from None
    for name, ids in views.items():
        if ids.ndim != 1 or ids.dtype.kind not in "iu" or len(ids) == 0:
            raise ShardError(f"shard {shard}: sample {key!r}: {name}.npy must be a non-empty 1-D integer array, "
                             f"got shape {ids.shape} dtype {ids.dtype}")
    return {"key": key, "llm": views["llm"], "mt": views["mt"], "id": files["id.txt"].decode("utf-8")}


def _grouped_members(shard: Path, position: dict) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {field: bytes}) per sample; position["key"] names the sample being read, for error messages."""
    key, files = None, {}
    with tarfile.open(shard, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            member_key, _, field = member.name.partition(".")
            position["key"] = member_key
            if member_key != key and key is not None:
                yield key, files
                files = {}
            key = member_key
            files[field] = tar.extractfile(member).read()
    if key is not None:
        yield key, files


def iter_samples(shard: str | Path, skip_bad_samples: bool = False, bad: list | None = None) -> Iterator[dict]:
    """Yield decoded samples. With skip_bad_samples, bad ones are skipped and their messages added to `bad`."""
    shard = Path(shard)
    position = {"key": None}
    try:
        for key, files in _grouped_members(shard, position):
            try:
                yield _decode(shard, key, files)
            except ShardError as err:
                if not skip_bad_samples:
                    raise
                if bad is not None:
                    bad.append(str(err))
    except (tarfile.TarError, EOFError, OSError) as err:
        where = f"at sample {position['key']!r}" if position["key"] else "at its start"
        message = f"shard {shard}: unreadable {where} (truncated or corrupt tar: {err})"
        if not skip_bad_samples:
            raise ShardError(message) from None
        if bad is not None:
            bad.append(message)
