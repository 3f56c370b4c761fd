import gzip
import json
import os
import shutil
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mtllm_train.config import ConfigError
from mtllm_train.data.documents import read_documents
from mtllm_train.data.inspect_shards import inspect_shards, padding_efficiency
from mtllm_train.data.manifest import check_tokenizers, load_manifest
import mtllm_train.data.reader as reader_module
from mtllm_train.data.reader import BatchReader, collate
from mtllm_train.data.shard_writer import build_shards
from mtllm_train.data.tar_reader import ShardError, iter_samples
from mtllm_train.data.views import ViewTokenizer
from mtllm_train.model.tokenizers import fingerprint, load_tokenizer

LLM_TOK, MT_TOK = "configs/tiny/llm_tokenizer", "configs/tiny/mt_tokenizer"
SAMPLE = "shards/sample/enwiki_sample.jsonl"


def _first_docs(path, n):
    with open(SAMPLE, encoding="utf-8") as lines, open(path, "w", encoding="utf-8") as out:
        for _, line in zip(range(n), lines):
            out.write(line)
    return str(path)


@pytest.fixture(scope="module")
def shards_80(tmp_path_factory):
    """80 documents in 8 shards of 10: 2 ranks x 2 workers each get 20 samples, 5 batches of 4."""
    tmp = tmp_path_factory.mktemp("shards80")
    corpus = _first_docs(tmp / "docs.jsonl", 80)
    build_shards([corpus], str(tmp / "out"), LLM_TOK, MT_TOK, "eng_Latn", 48, 10, 1, progress=False)
    return tmp / "out"


def _read(reader, n):
    iterator = iter(reader)
    batches = [next(iterator) for _ in range(n)]
    reader.close()
    return batches


def _same(batches_a, batches_b):
    keys = ("mt_input_ids", "llm_input_ids", "mt_word_ids", "llm_word_ids")
    return [a["keys"] for a in batches_a] == [b["keys"] for b in batches_b] and all(
        a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in keys if k in a)
        for a, b in zip(batches_a, batches_b))


def test_build_writes_manifest_with_counts_and_fingerprints(shards_80):
    manifest = load_manifest(shards_80)
    assert len(manifest["shards"]) == 8 and manifest["totals"]["samples"] == 80
    assert manifest["max_length"] == 48 and manifest["mt_lang"] == "eng_Latn"
    assert manifest["tokenizers"]["llm"]["fingerprint"] == fingerprint(load_tokenizer(LLM_TOK, "t"))
    assert all(len(s["sha256"]) == 64 and s["samples"] == 10 for s in manifest["shards"])
    samples = list(iter_samples(shards_80 / "shard-000000.tar"))
    assert len(samples) == 10 and samples[0]["llm"].dtype.name == "int32"
    assert sum(len(s["llm"]) for s in samples) == manifest["shards"][0]["llm_tokens"]
    assert max(max(len(s["llm"]), len(s["mt"])) for s in samples) <= 48


def test_truncated_views_cover_the_same_text():
    views = ViewTokenizer(LLM_TOK, MT_TOK, "eng_Latn", 40)
    text = json.loads(open(SAMPLE, encoding="utf-8").readline())["text"]
    llm_ids, mt_ids, _, _, truncated, _ = views.views(text)
    # Cut where the longer view reaches 40 tokens, then back to a word boundary.
    assert truncated and 30 < max(len(llm_ids), len(mt_ids)) <= 40
    llm_text = views.llm.decode(llm_ids, skip_special_tokens=True).strip()
    mt_text = views.mt.decode(mt_ids[1:], skip_special_tokens=True).strip()  # [1:]: the language code
    assert llm_text == mt_text and text.startswith(llm_text) and len(llm_text) < len(text)
    assert views.mt.convert_ids_to_tokens(int(mt_ids[0])) == "eng_Latn"
    assert views.views("   \n ") is None


def test_same_seed_same_batches_other_seed_other_order(shards_80):
    first = _read(BatchReader(str(shards_80), batch_size=4, num_workers=2, seed=3), 12)
    again = _read(BatchReader(str(shards_80), batch_size=4, num_workers=2, seed=3), 12)
    other = _read(BatchReader(str(shards_80), batch_size=4, num_workers=2, seed=4), 12)
    assert _same(first, again)
    assert [b["keys"] for b in first] != [b["keys"] for b in other]


def test_two_ranks_two_workers_read_disjoint_samples_covering_the_epoch(shards_80):
    readers = [BatchReader(str(shards_80), rank=r, world_size=2, batch_size=4, num_workers=2, group_batches=2)
               for r in range(2)]
    assert [r.epoch_batches(0) for r in readers] == [10, 10]
    per_rank = [[k for b in _read(r, 10) for k in b["keys"]] for r in readers]
    assert set(per_rank[0]).isdisjoint(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == [f"{i:010d}" for i in range(80)]
    assert all(len(keys) == len(set(keys)) == 40 for keys in per_rank)


def _batches_per_epoch(reader, epochs):
    """How many batches the reader really yields in each of its first `epochs` epochs."""
    counts = [0] * epochs
    batches = iter(reader)
    while True:
        next(batches)
        if reader.epoch >= epochs:
            break
        counts[reader.epoch] += 1
    reader.close()
    return counts


def test_every_rank_yields_the_same_number_of_batches_with_uneven_shards(tmp_path):
    corpus = _first_docs(tmp_path / "docs.jsonl", 53)
    build_shards([corpus], str(tmp_path / "out"), LLM_TOK, MT_TOK, "eng_Latn", 32, 7, 1, progress=False)
    for workers in (0, 2):
        per_rank = [_batches_per_epoch(BatchReader(str(tmp_path / "out"), rank=r, world_size=3, batch_size=2,
                                                   num_workers=workers), 3) for r in range(3)]
        assert per_rank[0] == per_rank[1] == per_rank[2], per_rank
        assert all(count > 0 for count in per_rank[0])
    with pytest.raises(ConfigError, match=r"8 shards cannot give each of the 32 readers"):
        BatchReader(str(tmp_path / "out"), world_size=16, batch_size=2, num_workers=2)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("consumed", [7, 20, 23])  # 20 batches per epoch: mid-epoch, at and past the boundary
def test_restored_reader_continues_exactly(shards_80, workers, consumed):
    def make():
        return BatchReader(str(shards_80), batch_size=4, num_workers=workers, group_batches=2, seed=1)

    reference = _read(make(), consumed + 9)
    interrupted = make()
    _read(interrupted, consumed)
    state = interrupted.state_dict()
    assert state["epoch"] * 20 + state["batches"] == consumed
    restored = make()
    restored.load_state_dict(state)
    assert _same(_read(restored, 9), reference[consumed:])


def test_loader_workers_live_across_epochs(shards_80, monkeypatch):
    """One DataLoader (one set of worker processes) for the reader's life: restarting the workers at every epoch
    stalled the first step of each epoch on a GPU."""
    made = []

    class CountingLoader(reader_module.DataLoader):
        def __init__(self, *args, **kwargs):
            made.append(kwargs["num_workers"])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(reader_module, "DataLoader", CountingLoader)
    reader = BatchReader(str(shards_80), batch_size=4, num_workers=2, group_batches=2, seed=1)
    batches = _read(reader, 50)  # 20 batches an epoch
    assert (reader.epoch, reader.batches) == (2, 10) and made == [2]
    monkeypatch.undo()
    per_epoch = BatchReader(str(shards_80), batch_size=4, num_workers=2, group_batches=2, seed=1)
    per_epoch.load_state_dict({**per_epoch.state_dict(), "epoch": 2})
    assert _same(batches[40:], _read(per_epoch, 10))  # epoch 2 as a reader started at epoch 2 reads it


def test_restoring_onto_another_layout_is_refused(shards_80):
    state = BatchReader(str(shards_80), world_size=2, batch_size=4).state_dict()
    with pytest.raises(ConfigError, match=r"world_size 2 -> 1"):
        BatchReader(str(shards_80), batch_size=4).load_state_dict(state)


def test_length_grouping_pads_less_than_random_batches(shards_80):
    lengths = [(len(s["llm"]), len(s["mt"])) for shard in sorted(shards_80.glob("*.tar")) for s in iter_samples(shard)]
    lengths += [(n, n + 1) for n in range(3, 40)]
    assert padding_efficiency(lengths, 4, 8) > padding_efficiency(lengths, 4, None)
    batch = collate([{"llm": [5, 6, 7], "mt": [9]}, {"llm": [8], "mt": [3, 4]}], {"llm": 0, "mt": 1})
    assert batch["llm_input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["mt_attention_mask"].tolist() == [[1, 0], [1, 1]]
    assert batch["mt_input_ids"].tolist() == [[9, 1], [3, 4]]


def test_corrupt_shard_names_the_file_and_can_be_skipped(shards_80, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(shards_80, broken)
    shard = broken / "shard-000003.tar"
    shard.write_bytes(shard.read_bytes()[:5000])
    with pytest.raises(ShardError, match=r"shard .*shard-000003\.tar: unreadable at sample '00000000[0-9]{2}'"):
        list(iter_samples(shard))
    bad = []
    kept = list(iter_samples(shard, skip_bad_samples=True, bad=bad))
    assert len(kept) < 10 and len(bad) == 1
    assert inspect_shards(str(broken)) == 1  # the checksum mismatch is reported
    reader = BatchReader(str(broken), batch_size=4, num_workers=0, skip_bad_samples=True)
    batches = _read(reader, reader.epoch_batches(0))
    assert sum(b["bad_samples"] for b in batches) >= 1


def test_sample_missing_a_field_is_named(tmp_path):
    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in (("0000000007.llm.npy", b""), ("0000000007.id.txt", b"doc")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, __import__("io").BytesIO(data))
    with pytest.raises(ShardError, match=r"sample '0000000007' has no mt\.npy"):
        list(iter_samples(shard))
    assert list(iter_samples(shard, skip_bad_samples=True)) == []


def test_tokenizer_fingerprint_mismatch_is_refused(shards_80):
    manifest = load_manifest(shards_80)
    llm, mt = load_tokenizer(LLM_TOK, "t"), load_tokenizer(MT_TOK, "t")
    check_tokenizers(manifest, shards_80, (LLM_TOK, fingerprint(llm)), (MT_TOK, fingerprint(mt)))
    with pytest.raises(ConfigError, match=r"LLM view with 'configs/tiny/llm_tokenizer' \(fingerprint [0-9a-f]+\), "
                                          r"but the run uses 'configs/tiny/mt_tokenizer'"):
        check_tokenizers(manifest, shards_80, (MT_TOK, fingerprint(mt)), (MT_TOK, fingerprint(mt)))


def test_interrupted_build_resumes(tmp_path):
    corpus = _first_docs(tmp_path / "docs.jsonl", 30)
    out = tmp_path / "out"
    args = ([corpus], str(out), LLM_TOK, MT_TOK, "eng_Latn", 32, 10, 1)
    complete = build_shards(*args, progress=False)
    kept_mtime = (out / "shard-000000.tar").stat().st_mtime_ns
    # Simulate a crash while shard 1 was written and before shard 2 started, and before the manifest.
    (out / ".build" / "shard-000001.json").unlink()
    (out / "shard-000001.tar").rename(out / "shard-000001.tar.tmp")
    (out / ".build" / "shard-000002.json").unlink()
    (out / "manifest.json").unlink()
    with pytest.raises(ConfigError, match="the build is unfinished"):
        load_manifest(out)
    resumed = build_shards(*args, progress=False)
    assert (out / "shard-000000.tar").stat().st_mtime_ns == kept_mtime
    assert [(s["name"], s["samples"], s["llm_tokens"]) for s in resumed["shards"]] == \
           [(s["name"], s["samples"], s["llm_tokens"]) for s in complete["shards"]]
    # Rebuilt shards are the same bytes (fixed tar metadata): a run trained on the originals accepts them.
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in complete["shards"]]
    assert [s["key"] for s in iter_samples(out / "shard-000001.tar")] == [f"{i:010d}" for i in range(10, 20)]
    with pytest.raises(ConfigError, match=r"holds a build with other settings \(max_length differ\)"):
        build_shards([corpus], str(out), LLM_TOK, MT_TOK, "eng_Latn", 64, 10, 1, progress=False)
    # An input edited in place to the same size: its shards would be stale, so the build is refused, not resumed.
    text = Path(corpus).read_text(encoding="utf-8")
    Path(corpus).write_text(text.replace("the", "THE", 1), encoding="utf-8")
    os.utime(corpus, ns=(kept_mtime + 10**9, kept_mtime + 10**9))
    with pytest.raises(ConfigError, match=r"holds a build with other settings \(sources differ\)"):
        build_shards(*args, progress=False)


def test_parallel_build_matches_serial(tmp_path):
    corpus = _first_docs(tmp_path / "docs.jsonl", 30)
    serial = build_shards([corpus], str(tmp_path / "a"), LLM_TOK, MT_TOK, "eng_Latn", 32, 10, 1, progress=False)
    parallel = build_shards([corpus], str(tmp_path / "b"), LLM_TOK, MT_TOK, "eng_Latn", 32, 10, 2, progress=False)
    assert [(s["samples"], s["llm_tokens"], s["mt_tokens"]) for s in serial["shards"]] == \
           [(s["samples"], s["llm_tokens"], s["mt_tokens"]) for s in parallel["shards"]]


def test_input_formats_and_empty_documents(tmp_path):
    (tmp_path / "a.txt").write_text("First document.\n\n\n\nSecond document.\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as out:
        out.write(json.dumps({"id": "x1", "text": "Gzipped text."}) + "\n" + json.dumps({"id": "x2", "text": ""}) + "\n")
    pq.write_table(pa.table({"id": ["p1", "p2"], "text": ["Parquet row one.", "Row two."]}), tmp_path / "c.parquet")
    paths = [str(tmp_path / n) for n in ("a.txt", "b.jsonl.gz", "c.parquet")]
    docs = list(read_documents(paths))
    assert [d for d, _ in docs] == ["a.txt:0", "a.txt:1", "x1", "x2", "p1", "p2"]
    assert docs[1][1] == "Second document." and docs[3][1] == ""
    manifest = build_shards(paths, str(tmp_path / "out"), LLM_TOK, MT_TOK, "eng_Latn", 32, 100, 1, progress=False)
    assert manifest["totals"]["samples"] == 5 and manifest["totals"]["empty_dropped"] == 1
    with pytest.raises(ConfigError, match=r"c\.parquet: no 'body' column \(columns: id, text; set --text-field\)"):
        list(read_documents([paths[2]], text_field="body"))
    with pytest.raises(ConfigError, match=r"--input .*nope\.csv: no such file"):
        list(read_documents([str(tmp_path / "nope.csv")]))


def test_reader_refuses_a_shorter_max_length(shards_80):
    with pytest.raises(ConfigError, match=r"data.max_length 32 is below the 48 tokens"):
        BatchReader(str(shards_80), max_length=32)


def test_what_a_step_reads_depends_only_on_the_number_of_readers(shards_80):
    """1 rank x 2 workers (2 micro-batches a step) and 2 ranks x 1 worker read the same global batches."""
    one_rank = _read(BatchReader(str(shards_80), batch_size=4, num_workers=2, seed=5), 10)
    two_ranks = [_read(BatchReader(str(shards_80), rank=r, world_size=2, batch_size=4, num_workers=1, seed=5), 5)
                 for r in range(2)]
    for step in range(5):
        assert one_rank[2 * step]["keys"] == two_ranks[0][step]["keys"]
        assert one_rank[2 * step + 1]["keys"] == two_ranks[1][step]["keys"]


def test_reader_workers_ignore_sigterm(shards_80):
    import os
    import signal

    from helpers import child_pids

    reader = BatchReader(str(shards_80), batch_size=4, num_workers=2, seed=2)
    iterator = iter(reader)
    first = [next(iterator) for _ in range(2)]
    workers = child_pids(os.getpid())
    assert len(workers) >= 2
    for pid in workers:
        os.kill(pid, signal.SIGTERM)
    rest = [next(iterator) for _ in range(10)]  # the workers are still serving
    reader.close()
    reference = _read(BatchReader(str(shards_80), batch_size=4, num_workers=2, seed=2), 12)
    assert _same(first + rest, reference)


def test_a_saved_data_position_is_refused_on_other_shards(tmp_path):
    # The same path, rebuilt with other documents: the saved position would silently skip or repeat samples.
    folder = tmp_path / "shards"
    build_shards([_first_docs(tmp_path / "a.jsonl", 30)], str(folder), LLM_TOK, MT_TOK, "eng_Latn", 32, 10, 1,
                 progress=False)
    reader = BatchReader(str(folder), batch_size=2, num_workers=0)
    position = reader.state_dict()
    BatchReader(str(folder), batch_size=2, num_workers=0).load_state_dict(position)  # the same shards: fine
    shutil.rmtree(folder)
    build_shards([_first_docs(tmp_path / "b.jsonl", 20)], str(folder), LLM_TOK, MT_TOK, "eng_Latn", 32, 10, 1,
                 progress=False)
    with pytest.raises(ConfigError, match=r"data\.shards '.*/shards': these are not the shards the checkpoint's data "
                                          r"position refers to \(they were rebuilt or replaced\)"):
        BatchReader(str(folder), batch_size=2, num_workers=0).load_state_dict(position)
