"""Stream pre-tokenized shards into padded micro-batches: deterministic, sharded once, resumable.

There are R = world_size x num_workers readers; reader g = rank * num_workers + worker. Per epoch the shard
list is permuted by (seed, epoch) and shard i goes to reader i % R, so each shard is read by exactly one
(rank, worker), and what reader g reads depends only on R, not on how R splits into ranks and workers.
Every reader yields the same number of batches E per epoch (the smallest any reader can fill, computed
from the manifest), so every rank yields the same number of batches and the DataLoader's round-robin
order is fixed: batch k of a rank's epoch is batch k // W of its worker k % W. The state of a rank is
(epoch, batches consumed); restoring it rotates the workers and skips what was consumed, so the restored
reader yields exactly the batch an uninterrupted one would have.

Batches are length-grouped: a buffer of `group_batches` batches is sorted by length, cut into full batches
(the buffer's remainder is dropped, so every batch has batch_size rows), and the batches are shuffled; each view
is right-padded to its own longest sequence rounded up to a multiple of `pad_multiple` (capped at max_length), so
that a compiled model meets a few fixed lengths, not one per batch.

The DataLoader's workers live as long as the reader: each walks its logical reader's batches epoch after epoch
(every logical reader yields E batches per epoch, so the round-robin order carries over the epoch boundary
unchanged), instead of being restarted, and waited for, at every epoch.

Every shard is checked against the manifest's sha256 when a reader opens it (a few ms per shard, from the page
cache the read itself then uses), so a changed or damaged shard never trains silently. With skip_bad_samples a
damaged shard is skipped whole and every sample the manifest lists for it is counted as dropped. A shard streamed
from a URL or a `pipe:` command (data/locations.py) is hashed as it streams and checked before its last sample is
yielded (streamed_samples: its earlier samples may already be in batches); a restored reader streams its shards
from the start and skips what was consumed, as it does locally. A reader error
in a DataLoader worker travels to the training process as a message (one line, naming shard and sample), and
the workers, which ignore SIGTERM for preemption's sake, are stopped whatever happens: shut down, then killed.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import weakref
from collections.abc import Iterator
from functools import partial
from itertools import islice
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mtllm_train.config import ConfigError
from mtllm_train.data import locations
from mtllm_train.data.manifest import has_word_spans, load_manifest
from mtllm_train.data.tar_reader import ShardError, iter_samples
from mtllm_train.distributed import die_with_parent
from mtllm_train.files import sha256_file
from mtllm_train.portable.tokens import pad_right


def padded_length(longest: int, pad_multiple: int, max_length: int | None) -> int:
    """The length a view whose longest sequence has `longest` tokens is padded to: the next multiple of
    pad_multiple, capped at max_length (pad_multiple 1: the longest itself; >= max_length: always max_length)."""
    rounded = -(-longest // pad_multiple) * pad_multiple
    return rounded if max_length is None else max(longest, min(rounded, max_length))


def collate(samples: list[dict], pad_ids: dict[str, int], pad_multiple: int = 1,
            max_length: int | None = None) -> dict[str, torch.Tensor]:
    """{view}_input_ids and {view}_attention_mask [B, L_view] (int64, right padding to padded_length); from shards
    with word spans also {view}_word_ids [B, L_view] (int64: each token's word-span index, -1 for none and for
    padding)."""
    batch = {}
    for view in ("mt", "llm"):
        sequences = [s[view] for s in samples]
        length = padded_length(max(len(ids) for ids in sequences), pad_multiple, max_length)
        batch[f"{view}_input_ids"], batch[f"{view}_attention_mask"] = pad_right(sequences, pad_ids[view], length)
        if f"{view}_words" in samples[0]:
            batch[f"{view}_word_ids"], _ = pad_right([s[f"{view}_words"] for s in samples], -1, length)
    return batch


def epoch_assignment(shards: list[dict], seed: int, epoch: int, readers: int) -> list[list[dict]]:
    """assignment[g] = the shards reader g reads this epoch, in order."""
    order = sorted(shards, key=lambda s: s["name"])
    random.Random(f"shards:{seed}:{epoch}").shuffle(order)
    return [order[g::readers] for g in range(readers)]


def batches_per_reader(assignment: list[list[dict]], batch_size: int) -> int:
    return min(sum(s["samples"] for s in shards) // batch_size for shards in assignment)


def _worker_init(trainer_pid: int, _worker_id: int) -> None:
    # Preemption (SIGTERM, or Ctrl-C's SIGINT to the terminal's whole process group) is handled by the training
    # processes at a step boundary; workers must not die first. A trainer killed outright (kill -9, the OOM killer)
    # takes its workers with it, also one streaming a long remote shard.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(signal.SIGKILL, trainer_pid)


class _RankStream(IterableDataset):
    """The batches of one rank from (epoch, start_batch) on, endless; runs inside each DataLoader worker.

    Worker i serves logical reader (i + start_batch) % W in every epoch: the batches before start_batch are a
    whole number of rounds for it in the first epoch, and every epoch is E = per_reader x W batches, so the
    DataLoader's round robin hands out batch k of an epoch from logical reader k % W in every epoch."""

    def __init__(self, reader: BatchReader, epoch: int, start_batch: int):
        self.reader, self.epoch, self.start_batch = reader, epoch, start_batch

    def __iter__(self) -> Iterator[dict]:
        reader = self.reader
        info = get_worker_info()
        workers = reader.logical_workers
        logical = ((info.id if info else 0) + self.start_batch) % workers
        already = max(0, (self.start_batch - logical + workers - 1) // workers)
        g = reader.rank * workers + logical
        try:
            for epoch in range(self.epoch, 10**9):
                assignment = epoch_assignment(reader.shards, reader.seed, epoch, reader.readers)
                per_reader = batches_per_reader(assignment, reader.batch_size)
                yield from islice(reader.reader_batches(assignment[g], epoch, g), already, per_reader)
                already = 0
        except ConfigError as err:
            # Raised in a worker, the DataLoader would re-raise it wrapped in the worker's traceback text.
            yield {"error": str(err)}


def _stop_workers(loader_iterator) -> None:
    """Shut a DataLoader's workers down; kill any that survive (they ignore SIGTERM, so terminate() is not enough
    and a survivor would hang interpreter exit)."""
    shutdown = getattr(loader_iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    for worker in getattr(loader_iterator, "_workers", []):
        if worker.is_alive():
            worker.kill()
            worker.join()


def shard_problem(path: Path, shard: dict) -> str | None:
    """Why shard `path` cannot be trusted (missing, or not the bytes the manifest lists), or None."""
    if not path.is_file():
        return f"shard {path}: missing (listed in the manifest)"
    return checksum_problem(path, shard, sha256_file(path))


def checksum_problem(where: str | Path, shard: dict, actual: str, streamed: str = "") -> str | None:
    if actual == shard["sha256"]:
        return None
    return (f"shard {where}: checksum mismatch (sha256 {actual[:12]}...{streamed}, the manifest says "
            f"{shard['sha256'][:12]}...): it changed after `mtllm shards build`; rebuild the shards, or set "
            f"data.skip_bad_samples=true to skip it")


def streamed_samples(where: str, shard: dict, stream: locations.HashingStream, skip_bad_samples: bool,
                     word_spans: bool = False, max_length: int | None = None) -> Iterator[dict]:
    """The samples of a shard streamed from a URL or a pipe: location, whose sha256 can only be known at the end
    of the stream. One sample is held back: the stream is read to its end and checked before the shard's last
    sample is yielded, so a mismatch raises the same error as the local check (or, with skip_bad_samples, drops
    that last sample) -- but the samples before it may already be in batches. The stream is closed (a command
    killed) whenever the reader stops."""
    try:
        held = None
        for sample in iter_samples(where, skip_bad_samples, stream=stream, word_spans=word_spans, max_length=max_length):
            if held is not None:
                yield held
            held = sample
        try:
            problem = checksum_problem(where, shard, stream.finish(), f" of the {stream.size} bytes streamed")
        except locations.LocationError as err:
            problem = f"shard {where}: unreadable at its end: {err.cause}"
        if problem is not None and not skip_bad_samples:
            raise ShardError(problem)
        if problem is None and held is not None:
            yield held
    finally:
        stream.close()


class BatchReader:
    def __init__(self, shards_dir: str, rank: int = 0, world_size: int = 1, batch_size: int = 8, num_workers: int = 1,
                 seed: int = 0, group_batches: int = 16, skip_bad_samples: bool = False, max_length: int | None = None,
                 pad_multiple: int = 1):
        # A local folder, or a URL / pipe: location (a string: see data/locations.py).
        self.shards_dir = shards_dir if locations.is_remote(shards_dir) else Path(shards_dir)
        self.manifest = load_manifest(shards_dir)
        if max_length is not None and max_length < self.manifest["max_length"]:
            raise ConfigError(f"data.max_length {max_length} is below the {self.manifest['max_length']} tokens the "
                              f"shards in {str(shards_dir)!r} were aligned at; rebuild them with --max-length {max_length}")
        self.shards = self.manifest["shards"]
        self.max_length, self.pad_multiple = max_length or self.manifest["max_length"], pad_multiple
        # The shard set a saved position refers to (the sha256 of every shard, in order), for load_state_dict.
        self.shards_identity = hashlib.sha256("".join(shard["sha256"] for shard in self.shards).encode()).hexdigest()
        self.pad_ids = {view: self.manifest["tokenizers"][view]["pad_id"] for view in ("llm", "mt")}
        self.word_spans = has_word_spans(self.manifest)  # batches carry llm_word_ids and mt_word_ids
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.num_workers, self.logical_workers = num_workers, max(num_workers, 1)
        self.readers = world_size * self.logical_workers
        self.seed, self.group_batches, self.skip_bad_samples = seed, group_batches, skip_bad_samples
        self.epoch, self.batches, self.dropped = 0, 0, 0
        self.epoch_batches(0)  # fail now, not in the first step, if the data cannot feed every reader
        if not locations.is_remote(shards_dir) and not skip_bad_samples:  # a missing shard: now, not mid-epoch
            for shard in self.shards:
                if not (self.shards_dir / shard["name"]).is_file():
                    raise ShardError(shard_problem(self.shards_dir / shard["name"], shard))

    def epoch_batches(self, epoch: int) -> int:
        """Batches every rank yields in `epoch` (the same on all ranks)."""
        per_reader = batches_per_reader(epoch_assignment(self.shards, self.seed, epoch, self.readers), self.batch_size)
        if per_reader == 0:
            raise ConfigError(f"shards {str(self.shards_dir)!r}: {len(self.shards)} shards cannot give each of the "
                              f"{self.readers} readers (world size x data.num_workers) a batch of {self.batch_size}; "
                              f"rebuild with a smaller --shard-size or use fewer workers")
        return per_reader * self.logical_workers

    def shard_samples(self, shard: dict) -> Iterator[dict]:
        """The samples of one manifest entry, verified; with skip_bad_samples, what is dropped is counted in
        self.dropped (everything the manifest lists that was not yielded)."""
        path, stream = locations.join(self.shards_dir, shard["name"]), None
        if locations.is_remote(self.shards_dir):  # checked as it streams (streamed_samples)
            try:
                stream, problem = locations.open_stream(self.shards_dir, shard["name"]), None
            except locations.LocationError as err:  # HTTP 404, connection refused, ...
                problem = f"shard {path}: cannot be opened ({err.cause})"
        else:
            problem = shard_problem(path, shard)
        if problem is not None and not self.skip_bad_samples:
            raise ShardError(problem)
        kept = 0
        if problem is None:
            built_at = self.manifest["max_length"]
            samples = (iter_samples(path, self.skip_bad_samples, word_spans=self.word_spans, max_length=built_at)
                       if stream is None else
                       streamed_samples(path, shard, stream, self.skip_bad_samples, self.word_spans, built_at))
            for sample in samples:
                kept += 1
                yield sample
        if kept > shard["samples"] or (kept < shard["samples"] and not self.skip_bad_samples):
            raise ShardError(f"shard {path}: holds {kept} samples, the manifest says {shard['samples']}; rebuild the "
                             f"shards")
        self.dropped += shard["samples"] - kept

    def reader_batches(self, shards: list[dict], epoch: int, reader: int) -> Iterator[dict]:
        """Endless length-grouped batches of reader g. A pass over its shards ends in a partial buffer; a
        second pass only happens when skipped bad samples left the reader short of its E batches."""
        buffer_size = self.batch_size * self.group_batches
        self.dropped = 0
        for repeat in range(1_000_000):
            rng = random.Random(f"batches:{self.seed}:{epoch}:{reader}:{repeat}")
            buffer, read = [], 0
            for shard in shards:
                for sample in self.shard_samples(shard):
                    read += 1
                    buffer.append(sample)
                    if len(buffer) == buffer_size:
                        yield from self._grouped(buffer, rng)
                        buffer = []
            if read == 0:
                raise ShardError(f"shards {str(self.shards_dir)!r}: none of the {len(shards)} shards of reader {reader} "
                                 f"could be read ({self.dropped} samples dropped)")
            yield from self._grouped(buffer, rng)
        raise RuntimeError("unreachable: a reader looped over its shards a million times")

    def _grouped(self, buffer: list[dict], rng: random.Random) -> Iterator[dict]:
        buffer.sort(key=lambda s: max(len(s["llm"]), len(s["mt"])))
        groups = [buffer[i:i + self.batch_size] for i in range(0, len(buffer) - self.batch_size + 1, self.batch_size)]
        rng.shuffle(groups)
        for samples in groups:
            batch = collate(samples, self.pad_ids, self.pad_multiple, self.max_length)
            batch["keys"] = [s["key"] for s in samples]
            batch["bad_samples"], self.dropped = self.dropped, 0
            yield batch

    def __iter__(self) -> Iterator[dict]:
        """Endless: epoch after epoch. The state counts a batch as consumed once it is handed out."""
        batches = self._batches()
        # Workers ignore SIGTERM, so interpreter exit cannot kill them: close the loader (which stops them
        # cleanly) before multiprocessing joins its children, also when the caller forgets to.
        self._finalizer = weakref.finalize(self, batches.close)
        return batches

    def close(self) -> None:
        """Stop the reader's worker processes."""
        if getattr(self, "_finalizer", None) is not None:
            self._finalizer()

    def _batches(self) -> Iterator[dict]:
        epoch_size = self.epoch_batches(self.epoch)
        # Its own generator: a DataLoader otherwise draws a seed from the global RNG, which would shift the
        # training's dropout stream depending on when the loader was created.
        loader = DataLoader(_RankStream(self, self.epoch, self.batches), batch_size=None,
                            num_workers=self.num_workers, generator=torch.Generator().manual_seed(self.seed),
                            worker_init_fn=partial(_worker_init, os.getpid()) if self.num_workers else None,
                            prefetch_factor=4 if self.num_workers else None)
        batches = iter(loader)
        try:
            for batch in batches:
                if "error" in batch:
                    raise ShardError(batch["error"])
                if self.batches == epoch_size:  # this batch opens the next epoch
                    self.epoch, self.batches = self.epoch + 1, 0
                    epoch_size = self.epoch_batches(self.epoch)
                self.batches += 1
                yield batch
        finally:
            _stop_workers(batches)

    def first_epoch(self) -> Iterator[dict]:
        """Epoch 0's batches from its start, whatever this reader's position: a held-out evaluation reads the same
        batches every time."""
        self.epoch, self.batches = 0, 0
        return iter(self)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches": self.batches, "world_size": self.world_size,
                "num_workers": self.logical_workers, "seed": self.seed, "batch_size": self.batch_size,
                "shards": self.shards_identity}

    def load_state_dict(self, state: dict) -> None:
        if state.get("shards", self.shards_identity) != self.shards_identity:  # older checkpoints lack it
            raise ConfigError(f"data.shards {str(self.shards_dir)!r}: these are not the shards the checkpoint's data "
                              f"position refers to (they were rebuilt or replaced); resume with the original shards, "
                              f"or start a new run.name")
        layout = {k: state[k] for k in ("world_size", "num_workers", "seed", "batch_size")}
        ours = {"world_size": self.world_size, "num_workers": self.logical_workers, "seed": self.seed,
                "batch_size": self.batch_size}
        if layout != ours:
            changed = ", ".join(f"{k} {layout[k]} -> {ours[k]}" for k in ours if layout[k] != ours[k])
            raise ConfigError(f"the data reader's saved position cannot be mapped onto a different layout ({changed}); "
                              f"resume with the original world size, data.num_workers, run.seed and micro batch size")
        self.epoch, self.batches = state["epoch"], state["batches"]
