"""The model format, known here once: what training builds and what an export's loader rebuilds must be the same
model, so both sides take these from this module (it ships inside every export).

- DTYPES: the dtype names configs and exports use;
- four_bit_config: a 4-bit frozen LLM as bitsandbytes loads it;
- encoder_of: the MT encoder of an encoder-decoder model (NLLB / M2M100), or the model itself;
- project_to_llm: the student's input to the LLM (the MT encoder's states through U, in the LLM's input dtype);
- TASK_SHAPES / task_shape: what a task's examples hold (one text, a pair, a question with answers), which fixes
  how they are encoded and which head reads them (task_head);
- the names of the trained parts' files inside an export.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import BitsAndBytesConfig

from .heads import ClassificationHead, MultipleChoiceHead

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "uint8": torch.uint8}

# Inside an export folder.
ADAPTER_DIR = "adapter"  # the LoRA adapter (peft's format)
MERGED_LLM_DIR = "llm"  # --merge: the LLM with the LoRA merged in
FROZEN_DIR = "frozen"  # frozen weights of models built from inline configs
PROJECTION_FILE = "projection.safetensors"  # U
HEAD_FILE = "head.safetensors"  # a task model's head
TEACHER_TOKENIZER_DIR = "tokenizers/llm"  # the teacher's tokenizer (a stack)
# task name -> shape: "sequence" (one text), "pair" (two texts encoded jointly), "choice" (a passage, a question
# and any number of answers, each answer's span scored), "token" (a sentence's words, each word's span labelled).
# The paper's three tasks and the general forms.
TASK_SHAPES = {"sentiment": "sequence", "classification": "sequence", "nli": "pair", "pair_classification": "pair",
               "belebele": "choice", "multiple_choice": "choice", "token_classification": "token"}
SHAPE_FIELDS = {"sequence": ("text",), "pair": ("premise", "hypothesis"), "choice": ("passage", "question", "answers"),
                "token": ("words",)}


def task_shape(task: str) -> str:
    return TASK_SHAPES[task]


def four_bit_config(quant_type: str, double: bool, compute_dtype: str, storage_dtype: str) -> BitsAndBytesConfig:
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double,
                              bnb_4bit_compute_dtype=DTYPES[compute_dtype], bnb_4bit_quant_storage=DTYPES[storage_dtype])


def encoder_of(model: nn.Module) -> nn.Module:
    return model.get_encoder() if getattr(model.config, "is_encoder_decoder", False) else model


def project_to_llm(projection: nn.Linear, mt_states: torch.Tensor, llm_input_dtype: torch.dtype) -> torch.Tensor:
    """U applied in its own dtype (fp32 while training), cast to the dtype of the LLM's input embeddings."""
    return projection(mt_states.to(projection.weight.dtype)).to(llm_input_dtype)


def task_head(task: str, hidden_size: int, num_outputs: int) -> nn.Module:
    """A task's head: one score per answer span for multiple choice, else a linear classifier over the classes
    (of the pooled text, or of each word's span)."""
    return MultipleChoiceHead(hidden_size) if task_shape(task) == "choice" else ClassificationHead(hidden_size,
                                                                                                  num_outputs)
