"""`mtllm shards build`: pre-tokenize documents into aligned webdataset shards, in parallel, resumably.

Each sample of a shard holds both views' token ids and word-span indices and the document id (tar_reader.py's
sample_members).
Shard k holds documents [k * shard_size, (k + 1) * shard_size) of the input order (empty ones dropped and
counted), so a rebuild gives the same shards. A shard is complete once its stats file exists in `.build/`;
an interrupted build rerun with the same arguments keeps complete shards and rebuilds the rest.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections import deque
from itertools import islice
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

from mtllm_train.config import ConfigError
from mtllm_train.data.documents import read_documents
from mtllm_train.data.manifest import FORMAT_VERSION, MANIFEST, write_json_atomic
from mtllm_train.data.tar_reader import sample_members
from mtllm_train.data.views import ViewTokenizer
from mtllm_train.files import atomic_path, sha256_file
from mtllm_train.model.tokenizers import fingerprint
from mtllm_train.portable.tokens import ENGLISH, pad_id

_worker_tokenizer: ViewTokenizer | None = None


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def _init_worker(llm_tokenizer: str, mt_tokenizer: str, mt_lang: str | None, max_length: int) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = ViewTokenizer(llm_tokenizer, mt_tokenizer, mt_lang, max_length)


class _InProcessPool:
    """One worker: tokenize in this process (no start-up cost of a spawned interpreter)."""

    class _Done:
        def __init__(self, value):
            self.value = value

        def get(self):
            return self.value

    def __init__(self, initializer, initargs):
        initializer(*initargs)

    def apply_async(self, func, args):
        return self._Done(func(*args))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def write_shard(out_dir: Path, index: int, first_doc: int, documents: list[tuple[str, str]]) -> dict:
    """Tokenize and write one shard; atomically, so a crash never leaves a half shard under its final name."""
    assert _worker_tokenizer is not None
    path = out_dir / shard_name(index)
    stats = {"name": path.name, "samples": 0, "llm_tokens": 0, "mt_tokens": 0, "empty_dropped": 0,
             "truncated": 0}
    with atomic_path(path) as tmp:
        # mtime 0: a shard rebuilt from the same documents is the same bytes (the checksum the manifest records).
        with wds.TarWriter(str(tmp), mtime=0) as writer:
            for offset, (doc_id, text) in enumerate(documents):
                views = _worker_tokenizer.views(text)
                if views is None:
                    stats["empty_dropped"] += 1
                    continue
                writer.write(sample_members(f"{first_doc + offset:010d}", views, doc_id))
                stats["samples"] += 1
                stats["truncated"] += int(views.truncated)
                stats["llm_tokens"] += len(views.llm_ids)
                stats["mt_tokens"] += len(views.mt_ids)
        stats["sha256"] = sha256_file(tmp)
    write_json_atomic(out_dir / ".build" / f"{path.stem}.json", stats)
    return stats


def _chunks(documents, size: int):
    iterator = iter(documents)
    while chunk := list(islice(iterator, size)):
        yield chunk


def _source_identity(path: str) -> dict:
    """What a rebuild compares to know an input is unchanged: its size and modification time (an edit that
    keeps the size still changes the time)."""
    if not Path(path).is_file():
        return {"path": str(path), "bytes": None}
    stat = Path(path).stat()
    return {"path": str(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def build_shards(inputs: list[str], out: str, llm_tokenizer: str, mt_tokenizer: str, mt_lang: str | None = ENGLISH,
                 max_length: int = 512, shard_size: int = 10_000, workers: int = 1, text_field: str = "text",
                 progress: bool = True) -> dict:
    if max_length < 4 or shard_size < 1 or workers < 1:
        raise ConfigError(f"--max-length must be >= 4, --shard-size and --workers >= 1 "
                          f"(got {max_length}, {shard_size}, {workers})")
    out_dir = Path(out)
    (out_dir / ".build").mkdir(parents=True, exist_ok=True)
    probe = ViewTokenizer(llm_tokenizer, mt_tokenizer, mt_lang, max_length)
    settings = {
        "format_version": FORMAT_VERSION,
        "word_spans": True,
        "tokenizers": {
            "llm": {"name": llm_tokenizer, "fingerprint": fingerprint(probe.llm), "pad_id": pad_id(probe.llm)},
            "mt": {"name": mt_tokenizer, "fingerprint": fingerprint(probe.mt), "pad_id": pad_id(probe.mt)},
        },
        "mt_lang": probe.mt_lang,
        "max_length": max_length,
        "shard_size": shard_size,
        "text_field": text_field,
        "sources": [_source_identity(p) for p in inputs],
    }
    settings_path = out_dir / ".build" / "settings.json"
    if settings_path.is_file():
        previous = json.loads(settings_path.read_text())
        if previous != settings:
            changed = sorted(k for k in settings if previous.get(k) != settings[k])
            raise ConfigError(f"--out {out}: holds a build with other settings ({', '.join(changed)} differ); "
                              f"use a new --out folder or delete this one")
    write_json_atomic(settings_path, settings)
    (out_dir / MANIFEST).unlink(missing_ok=True)

    def done(index: int) -> dict | None:
        stats_path = out_dir / ".build" / f"shard-{index:06d}.json"
        if stats_path.is_file() and (out_dir / shard_name(index)).is_file():
            return json.loads(stats_path.read_text())
        return None

    init_args = (llm_tokenizer, mt_tokenizer, mt_lang, max_length)
    if workers == 1:
        pool_context = _InProcessPool(_init_worker, init_args)
    else:
        pool_context = multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=init_args)
    shard_stats: dict[int, dict] = {}
    reused = 0
    start = time.perf_counter()
    # disable=None: no bar where stderr is no terminal; `with` closes it when reading an input fails, so the
    # error starts on a line of its own.
    with pool_context as pool, tqdm(desc="documents", unit="doc", disable=None if progress else True,
                                    smoothing=0.1) as bar:
        pending: deque = deque()
        for index, chunk in enumerate(_chunks(read_documents(inputs, text_field), shard_size)):
            previous = done(index)
            if previous is not None:
                shard_stats[index] = previous
                reused += 1
                bar.update(len(chunk))
                continue
            # Bounded queue: never hold more than 2 chunks per worker in memory.
            while len(pending) >= 2 * workers:
                i, n, result = pending.popleft()
                shard_stats[i] = result.get()
                bar.update(n)
            pending.append((index, len(chunk), pool.apply_async(write_shard, (out_dir, index, index * shard_size, chunk))))
        for i, n, result in pending:
            shard_stats[i] = result.get()
            bar.update(n)
    elapsed = time.perf_counter() - start
    if not shard_stats:
        raise ConfigError(f"--input {' '.join(inputs)}: no documents found")
    shards = [shard_stats[i] for i in sorted(shard_stats)]
    total = {key: sum(s[key] for s in shards) for key in ("samples", "llm_tokens", "mt_tokens", "empty_dropped",
                                                           "truncated")}
    if total["samples"] == 0:
        raise ConfigError(f"--input {' '.join(inputs)}: every document is empty")
    manifest = {**settings, "totals": total, "shards": shards}
    write_json_atomic(out_dir / MANIFEST, manifest)
    documents = total["samples"] + total["empty_dropped"]
    built = len(shards) - reused
    print(f"{len(shards)} shards ({built} built, {reused} kept) in {out_dir}: {total['samples']} samples, "
          f"{total['empty_dropped']} empty dropped, {total['truncated']} truncated; {documents / elapsed:.0f} docs/s "
          f"with {workers} worker(s)")
    return manifest
