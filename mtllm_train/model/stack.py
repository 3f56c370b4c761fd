"""The MT-LLM stack: frozen MT encoder E -> trainable projection U -> LLM M with LoRA adapters.

The teacher is M itself with its adapters disabled, reading the English text in M's own tokenization.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from torch import nn

from mtllm_train.config import ModelConfig
from mtllm_train.model.loading import build_llm, build_mt_encoder
from mtllm_train.model.pooling import pool


class MTLLM(nn.Module):
    def __init__(self, mt_encoder: nn.Module, llm: PeftModel, pooling: str):
        super().__init__()
        self.mt_encoder = mt_encoder
        self.llm = llm
        self.projection = nn.Linear(mt_encoder.config.hidden_size, llm.config.hidden_size, bias=True,
                                    dtype=torch.float32)
        self.pooling = pooling
        self.llm_input_dtype = llm.get_input_embeddings().weight.dtype

    def train(self, mode: bool = True) -> MTLLM:
        """Only the trainable parts follow `mode`: E and M's own dropout stay off; LoRA dropout follows."""
        super().train(mode)
        self.mt_encoder.eval()
        lora_train_mode(self.llm, mode)
        return self

    def teacher_pooled(self, llm_input_ids: torch.Tensor, llm_attention_mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self.llm.disable_adapter():
            hidden = self.llm(input_ids=llm_input_ids, attention_mask=llm_attention_mask).last_hidden_state
        return pool(hidden, llm_attention_mask, self.pooling)

    def mt_states(self, mt_input_ids: torch.Tensor, mt_attention_mask: torch.Tensor) -> torch.Tensor:
        """The frozen MT encoder's token states [B, T, d_E]."""
        # no_grad (not inference_mode): the encoder states are ordinary tensors the projection can train on.
        with torch.no_grad():
            return self.mt_encoder(input_ids=mt_input_ids, attention_mask=mt_attention_mask).last_hidden_state

    def llm_on_mt_states(self, mt_states: torch.Tensor, mt_attention_mask: torch.Tensor) -> torch.Tensor:
        """U, then the LLM with adapters: last hidden states [B, T, D]. Split from `mt_states` so that
        evaluation can encode a text set once and reuse the states for every checkpoint (E is frozen)."""
        inputs_embeds = self.projection(mt_states.to(self.projection.weight.dtype)).to(self.llm_input_dtype)
        return self.llm(inputs_embeds=inputs_embeds, attention_mask=mt_attention_mask).last_hidden_state

    def student_hidden(self, mt_input_ids: torch.Tensor, mt_attention_mask: torch.Tensor) -> torch.Tensor:
        """The LLM's last hidden states [B, T, D] over the MT encoder's tokens."""
        return self.llm_on_mt_states(self.mt_states(mt_input_ids, mt_attention_mask), mt_attention_mask)

    def student_pooled(self, mt_input_ids: torch.Tensor, mt_attention_mask: torch.Tensor) -> torch.Tensor:
        return pool(self.student_hidden(mt_input_ids, mt_attention_mask), mt_attention_mask, self.pooling)

    def forward(self, mt_input_ids, mt_attention_mask, llm_input_ids, llm_attention_mask):
        """One call for both views, so DDP / FSDP / DeepSpeed wrappers see a single forward."""
        teacher_pooled = self.teacher_pooled(llm_input_ids, llm_attention_mask)
        student_pooled = self.student_pooled(mt_input_ids, mt_attention_mask)
        return student_pooled, teacher_pooled


def lora_train_mode(model: nn.Module, mode: bool) -> None:
    """A frozen model with adapters: its own dropout stays off, only the LoRA dropout follows `mode`."""
    model.eval()
    for name, module in model.named_modules():
        if ".lora_dropout." in name:
            module.train(mode)


def add_lora(llm: nn.Module, cfg: ModelConfig) -> PeftModel:
    if cfg.quantization != "none":
        llm = prepare_model_for_kbit_training(llm, use_gradient_checkpointing=cfg.activation_checkpointing,
                                              gradient_checkpointing_kwargs={"use_reentrant": False})
    elif cfg.activation_checkpointing:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, bias="none")
    return get_peft_model(llm, lora)


def build_stack(cfg: ModelConfig) -> MTLLM:
    # One seed for every random init (inline models, LoRA A matrices, U): all ranks build the same stack.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.init_seed)
        mt_encoder = build_mt_encoder(cfg)
        llm = add_lora(build_llm(cfg), cfg)
        stack = MTLLM(mt_encoder, llm, cfg.pooling)
    return stack.train()


def trainable_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in module.named_parameters() if p.requires_grad}
