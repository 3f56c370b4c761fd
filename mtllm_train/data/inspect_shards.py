"""`mtllm shards inspect DIR`: counts, length histograms, expected padding efficiency, checksum verification."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from mtllm_train.data.manifest import load_manifest
from mtllm_train.data.tar_reader import iter_samples
from mtllm_train.files import sha256_file


def padding_efficiency(lengths: list[tuple[int, ...]], batch_size: int, group_batches: int | None,
                       seed: int = 0) -> float:
    """Real tokens / computed tokens when each view of a batch is padded to its longest sequence.

    `lengths` holds one tuple of view lengths per sample. group_batches=None: random batches; otherwise
    buffers of `group_batches` batches are sorted by the longest view first (what the reader does).
    """
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    if group_batches:
        buffer = batch_size * group_batches
        order = [i for start in range(0, len(order), buffer)
                 for i in sorted(order[start:start + buffer], key=lambda i: max(lengths[i]))]
    real = computed = 0
    for start in range(0, len(order) - batch_size + 1, batch_size):
        batch = [lengths[i] for i in order[start:start + batch_size]]
        for view in zip(*batch):
            real += sum(view)
            computed += max(view) * len(view)
    return real / computed if computed else 1.0


def _histogram(lengths: list[int], max_length: int, bins: int = 8) -> list[str]:
    counts, edges = np.histogram(lengths, bins=bins, range=(0, max_length))
    widest = max(counts.max(), 1)
    return [f"  {int(lo):5d}-{int(hi):5d} {count:8d} {'#' * int(40 * count / widest)}"
            for lo, hi, count in zip(edges[:-1], edges[1:], counts)]


def inspect_shards(shards_dir: str, batch_size: int = 8, group_batches: int = 16) -> int:
    """Print the report; return the number of problems found (checksum mismatches, missing shards)."""
    manifest = load_manifest(shards_dir)
    problems = 0
    lengths = {"llm": [], "mt": []}
    for shard in manifest["shards"]:
        path = Path(shards_dir) / shard["name"]
        if not path.is_file():
            print(f"MISSING {shard['name']}")
            problems += 1
            continue
        if sha256_file(path) != shard["sha256"]:
            print(f"CHECKSUM MISMATCH {shard['name']}: the file changed since it was built")
            problems += 1
            continue
        for sample in iter_samples(path, skip_bad_samples=True):
            lengths["llm"].append(len(sample["llm"]))
            lengths["mt"].append(len(sample["mt"]))
    totals, tokenizers = manifest["totals"], manifest["tokenizers"]
    print(f"{shards_dir}: {len(manifest['shards'])} shards, {totals['samples']} samples, "
          f"{totals['empty_dropped']} empty documents dropped, {totals['truncated']} truncated at "
          f"{manifest['max_length']} tokens; MT language {manifest['mt_lang']}")
    for view in ("llm", "mt"):
        tok = tokenizers[view]
        print(f"{view} view: {totals[f'{view}_tokens']} tokens, tokenizer {tok['name']} ({tok['fingerprint']})")
        print("\n".join(_histogram(lengths[view], manifest["max_length"])))
    pairs = list(zip(lengths["llm"], lengths["mt"]))
    print(f"padding efficiency at micro batch {batch_size}: random batches "
          f"{padding_efficiency(pairs, batch_size, None):.3f}, length-grouped ({group_batches} batches) "
          f"{padding_efficiency(pairs, batch_size, group_batches):.3f}")
    print(f"checksums: {'all match' if not problems else f'{problems} problem(s)'}")
    return problems
