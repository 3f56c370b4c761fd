"""The frozen LLM's linear layers in FP8 (`model.quantization: fp8`), for GPUs with FP8 matmuls (Hopper, Ada).

A training-time choice, like compile: the trainers convert the built model; a trained model loads (export,
evaluation) with the base in model.dtype anywhere, since its adapters and U are the same weights.

Each base weight W (frozen) is stored twice in float8 (e4m3, by torchao): W for the forward matmul and W^T for
the backward one, which needs only the input's gradient (g @ W). Both matmuls quantize their other operand (the
activation, the incoming gradient) on the fly and run as torchao's float8 matmul (torch._scaled_mm). Scales are
per row (`model.fp8_scaling: rowwise`) or one per tensor (tensorwise). Two fp8 copies take the memory of one bf16 weight; nothing activation-sized is saved for
the backward pass. torchao's own training recipe (Float8Linear) is not used: it always computes the weight's
gradient, a third matmul per layer that a frozen base does not need, and keeps a bf16 master weight.

The LoRA adapters stay as they are (fp32 master weights, autocast dtype); only the base layers change. The
weights are non-persistent buffers: checkpoints hold only the trainable weights, and every backend leaves
buffers whole (FSDP does not shard them; DDP is built without buffer broadcasts).
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from mtllm_train.config import ConfigError

FP8_CAPABILITY = (8, 9)  # float8 tensor cores: Ada (8.9), Hopper (9.0) and later


def check_fp8_support(device: torch.device) -> None:
    """One line naming what is missing when this rank cannot run an FP8 base."""
    if importlib.util.find_spec("torchao") is None:
        raise ConfigError("model.quantization: fp8 needs torchao: pip install -e '.[fp8]' (torchao==0.18.0)")
    if device.type != "cuda":
        raise ConfigError(f"model.quantization: fp8 needs a GPU with FP8 matmuls (compute capability 8.9+: H100, "
                          f"H200, L40S); this rank runs on {device.type}. Use none, nf4 or fp4 here")
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_CAPABILITY:
        raise ConfigError(f"model.quantization: fp8 needs compute capability 8.9+ (H100, H200, L40S); "
                          f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}. "
                          f"Use none (bf16), nf4 or fp4 on this GPU")


def quantized(weight: torch.Tensor, fast_accumulation: bool, scaling: str = "rowwise") -> torch.Tensor:
    """`weight` [out, in] in float8 with one scale per row (or per tensor); F.linear with it quantizes its input
    the same way."""
    from torchao.quantization import Float8MMConfig, Float8Tensor, PerRow, PerTensor
    from torchao.quantization.quantize_.workflows.float8.float8_tensor import (KernelPreference,
                                                                               QuantizeTensorToFloat8Kwargs)

    granularity = {"rowwise": PerRow, "tensorwise": PerTensor}[scaling]()
    # The floor under each row's absolute maximum keeps all-zero rows (padding positions' gradients) at 0, not
    # 0 / 0 = NaN. KernelPreference.TORCH: torch._scaled_mm whatever else is installed, the op selective
    # checkpointing knows to keep.
    input_scaling = QuantizeTensorToFloat8Kwargs(granularity=granularity, hp_value_lb=1e-12,
                                                 kernel_preference=KernelPreference.TORCH)
    return Float8Tensor.from_hp(weight.detach().to(torch.bfloat16).contiguous(), granularity=granularity,
                                mm_config=Float8MMConfig(use_fast_accum=fast_accumulation),
                                kernel_preference=KernelPreference.TORCH, act_quant_kwargs=input_scaling)


class _Float8FrozenMatmul(torch.autograd.Function):
    """x @ W^T in float8, and in the backward pass only the input's gradient, g @ W, in float8."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
        ctx.weight_t, ctx.input_dtype = weight_t, x.dtype
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.to(torch.bfloat16), weight).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        with torch.autocast(grad_output.device.type, enabled=False):
            grad_input = F.linear(grad_output.to(torch.bfloat16), ctx.weight_t).to(ctx.input_dtype)
        return grad_input, None, None


class Float8FrozenLinear(nn.Module):
    """A frozen nn.Linear (or GPT-2's transposed Conv1D) with its weight in float8, both ways round."""

    def __init__(self, layer: nn.Module, scaling: str = "rowwise"):
        super().__init__()
        weight = layer.weight.t() if isinstance(layer, Conv1D) else layer.weight  # [out, in]
        self.out_features, self.in_features = weight.shape
        # Forward: fast accumulation, as in inference; backward: full accumulation for the gradient.
        self.scaling = scaling
        self.register_buffer("weight_fp8", quantized(weight, True, scaling), persistent=False)
        self.register_buffer("weight_t_fp8", quantized(weight.t(), False, scaling), persistent=False)
        bias = None if layer.bias is None else layer.bias.detach().to(torch.bfloat16)
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _Float8FrozenMatmul.apply(x, self.weight_fp8, self.weight_t_fp8)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, float8 e4m3 {self.scaling}"


def fp8_base(model: nn.Module, device: torch.device, scaling: str = "rowwise") -> int:
    """Replace every frozen linear layer of `model` (LoRA's own layers excepted) by its Float8FrozenLinear, in
    place, after checking that `device` can run it; returns how many. torch._scaled_mm needs both sizes to be
    multiples of 16: other layers stay as they are (none in Llama or GPT-2)."""
    check_fp8_support(device)
    frozen = [(parent, name) for parent_name, parent in model.named_modules() if "lora_" not in parent_name
              for name, child in parent.named_children()
              if not name.startswith("lora_") and isinstance(child, (nn.Linear, Conv1D))
              and not child.weight.requires_grad and all(size % 16 == 0 for size in child.weight.shape)]
    for parent, name in frozen:  # one layer at a time: each bf16 weight is freed as its float8 copies are made
        setattr(parent, name, Float8FrozenLinear(getattr(parent, name), scaling))
    return len(frozen)
