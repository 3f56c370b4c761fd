"""The configuration of an exported MT-LLM: how to rebuild its frozen parts and what sits on top of them."""

from __future__ import annotations

from transformers import PretrainedConfig


# The export format this code writes and reads: 3 added the load check (portable/guard.py: guard.safetensors, the
# config's probe_record and versions); 2 and 1 load without it.
FORMAT_VERSION = 3


class MTLLMConfig(PretrainedConfig):
    """body: "stack" (MT encoder -> projection -> LLM + LoRA: the MT-LLM), "llm" (the LLM + LoRA on its own
    tokens) or "mt_encoder" (the MT encoder + LoRA).

    mt_encoder / llm: where the frozen weights come from: a hub id or absolute path, or a folder inside the
    export (relative path). merged: the LoRA is merged into the saved LLM (no adapter/ folder).
    task: None for an embedder; else {"name": a task of format.TASK_SHAPES, "labels": [...], "metric": ...,
    and for token classification "word_pooling"} and a head.
    view_max_length: tokens per view ({"mt": n, "llm": n}) the model was trained with.
    quantization (none, nf4, fp4) and quant_double / quant_compute_dtype / quant_storage_dtype: the 4-bit LLM as
    the run loaded it (the defaults are what exports made before they were recorded).
    """

    model_type = "mtllm"

    def __init__(self, body: str = "stack", mt_encoder: str = "", llm: str = "", bidirectional: bool = False,
                 pooling: str = "mean", frozen_dtype: str = "float32", quantization: str = "none",
                 merged: bool = False, task: dict | None = None, view_max_length: dict | None = None,
                 source_language: str = "eng_Latn", quant_double: bool = True, quant_compute_dtype: str = "bfloat16",
                 quant_storage_dtype: str = "uint8", **kwargs):
        self.body, self.mt_encoder, self.llm = body, mt_encoder, llm
        self.bidirectional, self.pooling, self.frozen_dtype = bidirectional, pooling, frozen_dtype
        self.quantization, self.merged, self.task = quantization, merged, task
        self.quant_double, self.quant_compute_dtype = quant_double, quant_compute_dtype
        self.quant_storage_dtype = quant_storage_dtype
        self.view_max_length = view_max_length or {"mt": 512, "llm": 512}
        self.source_language = source_language
        super().__init__(**kwargs)
