"""`mtllm shards inspect DIR`: counts, length histograms, expected padding efficiency, word spans, checksum
verification."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from mtllm_train.data import locations
from mtllm_train.data.manifest import has_word_spans, load_manifest
from mtllm_train.data.tar_reader import iter_samples
from mtllm_train.data.reader import checksum_problem, shard_problem


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


def _measure(sample: dict, lengths: dict[str, list]) -> None:
    """Add a sample's view lengths to `lengths`; from shards with word spans also its span count and, per view,
    its tokens in a span."""
    lengths["llm"].append(len(sample["llm"]))
    lengths["mt"].append(len(sample["mt"]))
    if "llm_words" in sample:
        lengths["spans"].append(int(sample["llm_words"].max()) + 1)
        for view in ("llm", "mt"):
            lengths[f"{view}_spanned"].append(int((sample[f"{view}_words"] >= 0).sum()))


def _span_report(manifest: dict, lengths: dict[str, list], example: dict | None) -> list[str]:
    """Spans per sample, tokens in a span, and the first spans of one sample as both views' tokenizers decode
    them (when the tokenizers are local folders)."""
    if not has_word_spans(manifest):
        return [f"word spans: none (format version {manifest['format_version']}); rebuild with this version for "
                f"word-span distillation"]
    spans = sum(lengths["spans"])
    lines = [f"word spans: {spans / max(len(lengths['spans']), 1):.1f} per sample; tokens in a span: " + ", ".join(
        f"{view} {sum(lengths[f'{view}_spanned']) / max(sum(lengths[view]), 1):.1%} "
        f"({sum(lengths[f'{view}_spanned']) / max(spans, 1):.2f} per span)" for view in ("llm", "mt"))]
    names = [manifest["tokenizers"][view]["name"] for view in ("llm", "mt")]
    if example is not None and all(Path(name).is_dir() for name in names):
        from mtllm_train.model.tokenizers import load_tokenizer

        lines.append(f"first word spans of sample {example['key']}:")
        for view, name in zip(("llm", "mt"), names):
            tokenizer, words = load_tokenizer(name, view), example[f"{view}_words"]
            shown = [tokenizer.decode(example[view][words == span]).strip() for span in range(min(words.max() + 1, 12))]
            lines.append(f"  {view}: {' | '.join(shown)}")
    return lines


def _streamed_lengths(location: str, shard: dict, lengths: dict[str, list], word_spans: bool,
                      max_length: int) -> str | None:
    """Add a remote shard's sample lengths to `lengths` if its bytes match the manifest; else say why not."""
    measured = {key: [] for key in lengths}
    try:
        with locations.open_stream(location, shard["name"]) as stream:
            for sample in iter_samples(locations.describe(location, shard["name"]), skip_bad_samples=True,
                                       stream=stream, word_spans=word_spans, max_length=max_length):
                _measure(sample, measured)
            problem = checksum_problem(shard["name"], shard, stream.finish())
    except locations.LocationError as err:
        return f"UNREADABLE {shard['name']}: {err.cause}"
    if problem is not None:
        return f"CHECKSUM MISMATCH {problem}"
    for key, values in measured.items():
        lengths[key].extend(values)
    return None


def inspect_shards(shards_dir: str, batch_size: int = 8, group_batches: int = 16) -> int:
    """Print the report; return the number of problems found (checksum mismatches, missing shards)."""
    manifest = load_manifest(shards_dir)
    problems = 0
    lengths = {key: [] for key in ("llm", "mt", "spans", "llm_spanned", "mt_spanned")}
    word_spans, example = has_word_spans(manifest), None
    for shard in manifest["shards"]:
        if locations.is_remote(shards_dir):  # a URL or pipe: location: streamed, hashed as it streams
            problem = _streamed_lengths(shards_dir, shard, lengths, word_spans, manifest["max_length"])
            if problem is not None:
                print(problem)
                problems += 1
            continue
        path = Path(shards_dir) / shard["name"]
        problem = shard_problem(path, shard)  # the reader's own check: what train would refuse
        if problem is not None:
            print(f"{'MISSING' if not path.is_file() else 'CHECKSUM MISMATCH'} {shard['name']}: {problem}")
            problems += 1
            continue
        for sample in iter_samples(path, skip_bad_samples=True, word_spans=word_spans, max_length=manifest["max_length"]):
            _measure(sample, lengths)
            example = example or (sample if word_spans else None)
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
    print("\n".join(_span_report(manifest, lengths, example)))
    print(f"checksums: {'all match' if not problems else f'{problems} problem(s)'}")
    return problems
