"""`mtllm prepare-llm2vec`: merge the LLM2Vec adapters into their base once, so training loads one model.

LLM2Vec-Meta-Llama-3-8B-Instruct = Llama-3-8B-Instruct + an MNTP LoRA adapter (bidirectional masked next-token
prediction) + an unsupervised SimCSE LoRA adapter trained on top of the merged MNTP model. The adapters are
merged in that order; bidirectional attention is a config switch of ours (model.bidirectional: true), so the
saved model is a plain Llama checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

from mtllm_train.config import ConfigError

BASE = "McGill-NLP/LLM2Vec-Meta-Llama-3-8B-Instruct-mntp"
ADAPTERS = ["McGill-NLP/LLM2Vec-Meta-Llama-3-8B-Instruct-mntp",
            "McGill-NLP/LLM2Vec-Meta-Llama-3-8B-Instruct-mntp-unsup-simcse"]


def prepare_llm2vec(out: str, base: str = BASE, adapters: list[str] | None = None, dtype: str = "bfloat16") -> Path:
    # Imported here so that `mtllm --help` does not pay for peft and transformers.
    from peft import PeftModel
    from transformers import AutoModel

    from mtllm_train.model.hub import from_pretrained
    from mtllm_train.portable.format import DTYPES
    from mtllm_train.model.tokenizers import load_tokenizer

    adapters = ADAPTERS if adapters is None else adapters
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    model = from_pretrained(AutoModel, base, "--base", dtype=DTYPES[dtype])
    for adapter in adapters:
        try:
            model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        except (OSError, ValueError) as err:
            raise ConfigError(f"--adapter {adapter!r}: cannot load it as a peft adapter of {base!r} ({err})") from None
    out_dir = Path(out)
    model.save_pretrained(str(out_dir))
    load_tokenizer(base, "--base").save_pretrained(str(out_dir))
    (out_dir / "mtllm_prepare.json").write_text(json.dumps({"base": base, "merged_adapters": adapters,
                                                            "dtype": dtype}, indent=1))
    return out_dir
