"""The MT-LLM stack: frozen MT encoder E -> trainable projection U -> LLM M with LoRA adapters.

The teacher is M itself with its adapters disabled, reading the English text in M's own tokenization.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.pytorch_utils import Conv1D

from mtllm_train.config import ModelConfig, checkpointing_policy
from mtllm_train.model.loading import build_llm, build_mt_encoder, seeded
from mtllm_train.portable.format import project_to_llm
from mtllm_train.portable.pooling import pool


class StackOutput(NamedTuple):
    """One stage-1 forward: the pooled vectors [B, D] (fp32) and the last hidden states [B, T, D] of both views
    (the student's over the MT tokens, the teacher's over the LLM tokens), for sequence and word-span losses."""

    student_pooled: torch.Tensor
    teacher_pooled: torch.Tensor
    student_hidden: torch.Tensor
    teacher_hidden: torch.Tensor


class MTLLM(nn.Module):
    def __init__(self, mt_encoder: nn.Module, llm: PeftModel, pooling: str):
        super().__init__()
        self.mt_encoder = mt_encoder
        self.llm = llm
        self.projection = nn.Linear(mt_encoder.config.hidden_size, llm.config.hidden_size, bias=True,
                                    dtype=torch.float32)
        self.pooling = pooling
        self.llm_input_dtype = llm.get_input_embeddings().weight.dtype
        # How the LLM's own forward masks attention: causally (a decoder), or both ways (an encoder such as BERT /
        # MiniLM, or a decoder made bidirectional, whose attention modules make_bidirectional cleared).
        self.llm_attends_causally = any(getattr(module, "is_causal", False) is True for module in llm.modules())

    def train(self, mode: bool = True) -> MTLLM:
        """Only the trainable parts follow `mode`: E and M's own dropout stay off; LoRA dropout follows."""
        super().train(mode)
        self.mt_encoder.eval()
        lora_train_mode(self.llm, mode)
        return self

    def llm_hidden(self, inputs_embeds: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """The LLM (adapters as they are set) on input embeddings [B, T, D]: last hidden states [B, T, D].

        The attention mask is built here as the LLM's own forward builds it (causal or both ways), always as a
        tensor: transformers leaves it out (None) for a batch without padding, and a compiled layer then needs a
        second graph, compiled whenever such a batch first comes."""
        if self.llm_attends_causally:
            attention_mask = create_causal_mask(config=self.llm.config, inputs_embeds=inputs_embeds,
                                                attention_mask=padding_mask, past_key_values=None,
                                                allow_is_causal_skip=False)
        else:
            attention_mask = create_bidirectional_mask(config=self.llm.config, inputs_embeds=inputs_embeds,
                                                       attention_mask=padding_mask, allow_is_bidirectional_skip=False)
        return self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state

    def teacher_hidden(self, llm_input_ids: torch.Tensor, llm_attention_mask: torch.Tensor) -> torch.Tensor:
        """The LLM without adapters on its own tokens: last hidden states [B, T, D]."""
        with torch.no_grad(), self.llm.disable_adapter():
            return self.llm_hidden(self.llm.get_input_embeddings()(llm_input_ids), llm_attention_mask)

    def teacher_pooled(self, llm_input_ids: torch.Tensor, llm_attention_mask: torch.Tensor) -> torch.Tensor:
        return pool(self.teacher_hidden(llm_input_ids, llm_attention_mask), llm_attention_mask, self.pooling)

    def mt_states(self, mt_input_ids: torch.Tensor, mt_attention_mask: torch.Tensor) -> torch.Tensor:
        """The frozen MT encoder's token states [B, T, d_E]."""
        # no_grad (not inference_mode): the encoder states are ordinary tensors the projection can train on.
        with torch.no_grad():
            return self.mt_encoder(input_ids=mt_input_ids, attention_mask=mt_attention_mask).last_hidden_state

    def llm_on_mt_states(self, mt_states: torch.Tensor, mt_attention_mask: torch.Tensor) -> torch.Tensor:
        """U, then the LLM with adapters: last hidden states [B, T, D]. Split from `mt_states` so that
        evaluation can encode a text set once and reuse the states for every checkpoint (E is frozen)."""
        return self.llm_hidden(project_to_llm(self.projection, mt_states, self.llm_input_dtype), mt_attention_mask)

    def student_hidden(self, mt_input_ids: torch.Tensor, mt_attention_mask: torch.Tensor) -> torch.Tensor:
        """The LLM's last hidden states [B, T, D] over the MT encoder's tokens."""
        return self.llm_on_mt_states(self.mt_states(mt_input_ids, mt_attention_mask), mt_attention_mask)

    def student_pooled(self, mt_input_ids: torch.Tensor, mt_attention_mask: torch.Tensor) -> torch.Tensor:
        return pool(self.student_hidden(mt_input_ids, mt_attention_mask), mt_attention_mask, self.pooling)

    def forward(self, mt_input_ids=None, mt_attention_mask=None, llm_input_ids=None, llm_attention_mask=None):
        """One call for both views, so DDP / FSDP / DeepSpeed wrappers see a single forward. A view left out is
        not computed (its fields are None): the probe encodes one side at a time."""
        teacher_hidden = None if llm_input_ids is None else self.teacher_hidden(llm_input_ids, llm_attention_mask)
        student_hidden = None if mt_input_ids is None else self.student_hidden(mt_input_ids, mt_attention_mask)
        return StackOutput(None if student_hidden is None else pool(student_hidden, mt_attention_mask, self.pooling),
                           None if teacher_hidden is None else pool(teacher_hidden, llm_attention_mask, self.pooling),
                           student_hidden, teacher_hidden)


def lora_train_mode(model: nn.Module, mode: bool) -> None:
    """A frozen model with adapters: its own dropout stays off, only the LoRA dropout follows `mode`.

    transformers recomputes a checkpointed layer only while that layer's own `training` flag is set, so the
    flag of each checkpointed layer (not of its submodules: attention and MLP dropout stay off) follows `mode`.
    """
    model.eval()
    for name, module in model.named_modules():
        if ".lora_dropout." in name:
            module.train(mode)
        elif isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing:
            module.training = mode


def checkpoint_every(setting: str | bool) -> int:
    """Every how many layers `model.activation_checkpointing` recomputes one: 0 for none, 1 for full and
    selective."""
    policy = checkpointing_policy(setting)
    named = {"none": 0, "full": 1, "selective": 1}
    return named[policy] if policy in named else int(policy.removeprefix("every_"))


ATTENTION_OPS = {getattr(torch.ops.aten, name).default for name in (
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
    if hasattr(torch.ops.aten, name)}
MATMUL_OPS = {torch.ops.aten.mm.default: (0, 1), torch.ops.aten.addmm.default: (1, 2),
              torch.ops.aten._scaled_mm.default: (0, 1)}  # op -> positions of its two matrices


def frozen_base_policy(lora_rank: int):
    """Selective checkpointing for a frozen base with adapters: keep what is costly to recompute (the base
    layers' matmul outputs, attention) and recompute the rest (LoRA's rank-r matmuls, norms, activations,
    dropout masks: cheap). A base matmul is told from a LoRA one by its sizes: LoRA A maps onto r columns, LoRA B
    reads r."""

    def policy(ctx, op, *args, **kwargs):
        if op in ATTENTION_OPS:
            return CheckpointPolicy.MUST_SAVE
        if op in MATMUL_OPS:
            first, second = (args[i] for i in MATMUL_OPS[op])
            if min(first.shape[-1], second.shape[-1]) > lora_rank:
                return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def enable_checkpointing(model: nn.Module, setting: str | bool, lora_rank: int) -> None:
    """Recompute the activations of the layers `model.activation_checkpointing` picks in the backward pass
    (non-reentrant torch.utils.checkpoint through transformers; layers 0, k, 2k, ... for every_<k>; every layer
    for selective, which keeps the outputs `frozen_base_policy` names)."""
    every = checkpoint_every(setting)
    if every:
        kwargs = {"use_reentrant": False}
        if checkpointing_policy(setting) == "selective":
            kwargs["context_fn"] = partial(create_selective_checkpoint_contexts, frozen_base_policy(lora_rank))
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, every_n_layers=every)


AUTOCAST_DEVICES = ("cuda", "cpu")  # the devices the trainers run autocast on


class AutocastLoraLinear(LoraLinear):
    """peft's LoRA linear layer, computed in the autocast dtype under autocast.

    peft casts a layer's input to the dtype of the adapter weights (fp32 master weights) before the LoRA
    matmuls, and autocast casts it back to bf16 for them: two activation-sized copies per layer and pass. Under
    autocast this layer leaves the input as it is, so autocast casts the small adapter weights instead (and
    their gradients back to fp32), as peft's own 4-bit layer does. Outside autocast it casts as peft does.
    """

    def _cast_input_dtype(self, x, dtype: torch.dtype):
        # torch.is_autocast_enabled is constant-folded by dynamo; torch.amp.is_autocast_available is not on torch
        # 2.11 (a graph break that made dynamo skip peft's whole LoRA forward, so every adapter ran eager).
        if x is not None and x.device.type in AUTOCAST_DEVICES and torch.is_autocast_enabled(x.device.type):
            return x
        return super()._cast_input_dtype(x, dtype)


def autocast_lora_layer(target: nn.Module, adapter_name: str, config: LoraConfig, **kwargs) -> nn.Module | None:
    """peft's custom-module hook: AutocastLoraLinear for dense layers; None hands every other layer (4-bit ones
    among them) on to peft's own dispatchers."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if type(base) is nn.Linear:
        return AutocastLoraLinear(target, adapter_name, config=config, **kwargs)
    if isinstance(base, Conv1D):
        config.fan_in_fan_out = True  # GPT-2 stores its weights transposed; peft's own dispatcher does the same
        return AutocastLoraLinear(target, adapter_name, config=config, is_target_conv_1d_layer=True, **kwargs)
    return None


def add_lora(model: nn.Module, cfg: ModelConfig) -> PeftModel:
    """LoRA adapters on a frozen model, with `model.activation_checkpointing` applied.

    peft's prepare_model_for_kbit_training is not used for a 4-bit base: it upcasts every weight that is not
    4-bit (embeddings, norms) to fp32, which makes the residual stream fp32 and adds two activation casts
    around every 4-bit matmul; the base is frozen already and RMSNorm computes in fp32 anyway.
    """
    enable_checkpointing(model, cfg.activation_checkpointing, cfg.lora.r)
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, bias="none")
    lora._register_custom_module({nn.Linear: autocast_lora_layer, Conv1D: autocast_lora_layer})
    adapted = get_peft_model(model, lora)
    # transformers and peft make the input embeddings require grad when checkpointing is on: only reentrant
    # checkpointing needs that, and under no_grad it gives the teacher's first layer an input unlike the other
    # layers' (one more torch.compile graph).
    adapted.get_base_model().disable_input_require_grads()
    return adapted


def build_stack(cfg: ModelConfig, device: torch.device | str = "cpu") -> MTLLM:
    """The stack on `device` (see load_model). One seed for every random init (inline models, LoRA A matrices,
    U): all ranks build the same stack."""
    with seeded(cfg.init_seed, device):
        mt_encoder = build_mt_encoder(cfg, device)
        llm = add_lora(build_llm(cfg, device), cfg)
        with torch.device(device):
            stack = MTLLM(mt_encoder, llm, cfg.pooling)
    return stack.train()


def trainable_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in module.named_parameters() if p.requires_grad}
