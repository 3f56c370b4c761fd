"""Train the tiny tokenizers used by the CPU demo and the tests from the English sample the project ships.

- llm: a Llama-style sentencepiece BPE (unk 0, bos 1, eos 2; adds bos), loaded as LlamaTokenizer;
- mt: an NLLB-style sentencepiece BPE with the fairseq id layout (bos 0, pad 1, eos 2, unk 3) and every
  NLLB-200 language code as a user-defined symbol, loaded as NllbTokenizer.
Training uses one thread, so the result is deterministic.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import sentencepiece as spm
from transformers import LlamaTokenizer, NllbTokenizer
from transformers.models.nllb.tokenization_nllb import FAIRSEQ_LANGUAGE_CODES

VOCAB_SIZE = 2000


def _texts(corpus: Path) -> list[str]:
    with corpus.open(encoding="utf-8") as lines:
        return [json.loads(line)["text"] for line in lines if line.strip()]


def build_tiny_tokenizers(corpus: str | Path, out_dir: str | Path) -> tuple[Path, Path]:
    texts = _texts(Path(corpus))
    out_dir = Path(out_dir)
    llm_dir, mt_dir = out_dir / "llm_tokenizer", out_dir / "mt_tokenizer"
    common = dict(vocab_size=VOCAB_SIZE, model_type="bpe", num_threads=1, minloglevel=2, byte_fallback=False)
    with tempfile.TemporaryDirectory() as tmp:
        # transformers reads a raw sentencepiece model only under its conventional file name.
        # Byte fallback as in Llama's own tokenizer: transformers builds the fast tokenizer with it, and without the
        # byte tokens it drops every character outside the vocabulary and shifts every later offset (word spans).
        spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=f"{tmp}/tokenizer",
                                       unk_id=0, bos_id=1, eos_id=2, pad_id=-1, **{**common, "byte_fallback": True})
        LlamaTokenizer.from_pretrained(tmp, add_bos_token=True, add_eos_token=False).save_pretrained(llm_dir)
    with tempfile.TemporaryDirectory() as tmp:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=f"{tmp}/sentencepiece.bpe",
                                       bos_id=0, pad_id=1, eos_id=2, unk_id=3,
                                       user_defined_symbols=[*FAIRSEQ_LANGUAGE_CODES, "<mask>"], **common)
        NllbTokenizer.from_pretrained(tmp).save_pretrained(mt_dir)
    return llm_dir, mt_dir
