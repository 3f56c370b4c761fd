"""A cost model of the stage-1 step that runs anywhere: one training step (teacher, encoder, student forward and
backward, under bf16 autocast) at the paper's shapes without memory or a GPU, in seconds on CPU.

The stack is built on the meta device and its weights become FakeTensors on the cpu device: meta storage (no
memory, no compute), but a cpu device, so that CPU bf16 autocast casts as CUDA autocast does on the GPU
(autocast acts per device and does nothing to plain meta tensors). For each variant it reports

- TFLOP of the step (torch.utils.flop_counter.FlopCounterMode: matmuls and attention, recompute included), beside
  the formula behind the logged MFU and the GPU benchmark (mtllm_train.metrics.step_flops);
- aten ops dispatched, forward and backward (views and reshapes excluded): about the kernels an eager GPU step
  launches;
- saved activation bytes per student token: what autograd keeps for the backward pass, tensors shaped like
  activations only (not weights or their casts), each storage once; a checkpointed layer keeps its input;
- activation-sized copies: aten `_to_copy` / `copy_` whose result is shaped like an activation, and their bytes.

Dropout is dispatched as on CUDA (one fused kernel, a bool mask). Not modelled: kernel fusion by torch.compile,
4-bit or FP8 bases, time. Masks are built as for a padded batch (transformers does not read fake tensors'
values to skip them).

    python bench/step_profile.py                          # the paper's shapes, every variant: a markdown table
    python bench/step_profile.py --tiny --out prof.json   # tiny shapes (the test)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils.checkpoint import CheckpointPolicy  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from gpu_throughput import LLAMA3_8B, NLLB_600M, TINY_ENCODER, TINY_LLM  # noqa: E402
from mtllm_train.config import ModelConfig, from_dict  # noqa: E402
from mtllm_train.metrics import flop_shape, step_flops  # noqa: E402
from mtllm_train.model.loss import squared_error  # noqa: E402
from mtllm_train.distributed import repeated_layers  # noqa: E402
from mtllm_train.model.stack import build_stack, frozen_base_policy  # noqa: E402

# name -> ModelConfig settings on top of the paper's (bf16 base, LoRA r16 / alpha 32 / dropout 0.05 on all linears).
VARIANTS = {
    "none": {},
    "full": {"activation_checkpointing": "full"},
    "every_2": {"activation_checkpointing": "every_2"},
    "selective": {"activation_checkpointing": "selective"},
    "none_dropout0": {"lora": {"dropout": 0.0}},
}
LABELS = {"none": "checkpointing none", "full": "checkpointing full", "every_2": "checkpointing every_2",
          "selective": "checkpointing selective",
          "none_dropout0": "checkpointing none, LoRA dropout 0"}
COPY_OPS = (torch.ops.aten._to_copy, torch.ops.aten.copy_)


def launches_kernel(func) -> bool:
    """An aten op that computes: not a view, not `_unsafe_view` (a reshape), not a `prim` query such as the
    device lookups that fake tensors dispatch and real ones do not."""
    return func.namespace == "aten" and not func.is_view and func.overloadpacket is not torch.ops.aten._unsafe_view


def model_config(tiny: bool, settings: dict) -> ModelConfig:
    return from_dict(ModelConfig, {
        "mt_encoder": TINY_ENCODER if tiny else NLLB_600M, "llm": TINY_LLM if tiny else LLAMA3_8B,
        "bidirectional": True, "dtype": "bfloat16", "pooling": "mean", **settings}, "model")


def fake_stack(cfg: ModelConfig, fake_mode: FakeTensorMode) -> torch.nn.Module:
    """The stack built on the meta device, each parameter and buffer then a FakeTensor on the cpu device."""
    stack = build_stack(cfg, "meta")
    for module in stack.modules():
        for name, param in module._parameters.items():
            if param is not None:
                module._parameters[name] = torch.nn.Parameter(FakeTensor(fake_mode, param.data, torch.device("cpu")),
                                                              requires_grad=param.requires_grad)
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = FakeTensor(fake_mode, buffer, torch.device("cpu"))
    return stack


class StepCounter(TorchDispatchMode):
    """Counts the aten ops that reach dispatch (those that compute) and the activation-sized copies among them, per
    phase; its `pack` (a saved_tensors_hooks pack hook) adds up the storages autograd keeps that are not
    weights, each once.

    Weights are the parameters' storages and the casts of them (autocast's bf16 copies of fp32 LoRA weights):
    what is saved beside them is per-token data. A copy is activation-sized when it holds at least one vector
    of `width` elements per token.

    Selective checkpointing keeps the outputs its policy names in a cache that saved_tensors_hooks does not see:
    with `selective` (the policy, for grad-mode forwards inside an LLM layer), those outputs are added here.
    """

    def __init__(self, module: torch.nn.Module, tokens: int, width: int, selective=None):
        super().__init__()
        self.selective, self.in_layer = selective, False
        self.weights = {p.untyped_storage()._cdata for p in module.parameters()}
        self.weight_casts: list[torch.Tensor] = []  # held, so that no activation reuses their storage's address
        self.activation_numel = tokens * width
        self.phase = "forward"
        self.ops = {"forward": 0, "backward": 0}
        self.copies = self.copy_bytes = 0
        self.saved: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if launches_kernel(func):
            self.ops[self.phase] += 1
        if self.selective and self.in_layer and self.phase == "forward" and torch.is_grad_enabled() and \
                self.selective(None, func, *args) == CheckpointPolicy.MUST_SAVE:
            for tensor in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(tensor, torch.Tensor):
                    self.saved[tensor.untyped_storage()._cdata] = tensor.untyped_storage().nbytes()
        if func.overloadpacket in COPY_OPS:
            source = args[0] if func.overloadpacket is torch.ops.aten._to_copy else args[1]
            if source.untyped_storage()._cdata in self.weights:
                self.weights.add(out.untyped_storage()._cdata)
                self.weight_casts.append(out)
            elif out.numel() >= self.activation_numel:
                self.copies += 1
                self.copy_bytes += out.numel() * out.element_size()
        return out

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in self.weights:
            self.saved[storage._cdata] = storage.nbytes()
        return tensor


def cuda_dropout(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
    """F.dropout as CUDA dispatches it: one native_dropout kernel that keeps a bool mask, where the CPU runs
    bernoulli, div and mul and keeps a mask in the input's dtype."""
    return torch.native_dropout(input, p, training)[0] if training and p > 0 else input


def profile(cfg: ModelConfig, batch: int, seq: int) -> dict:
    fake_mode = FakeTensorMode()
    stack = fake_stack(cfg, fake_mode).train()
    tokens = batch * seq
    with fake_mode:
        vocab_mt, vocab_llm = stack.mt_encoder.config.vocab_size, stack.llm.config.vocab_size
        views = {"mt_input_ids": torch.randint(4, vocab_mt, (batch, seq)),
                 "llm_input_ids": torch.randint(4, vocab_llm, (batch, seq)),
                 "mt_attention_mask": torch.ones(batch, seq, dtype=torch.long),
                 "llm_attention_mask": torch.ones(batch, seq, dtype=torch.long)}
        width = min(stack.mt_encoder.config.hidden_size, stack.llm.config.hidden_size)
        selective = frozen_base_policy(cfg.lora.r) if cfg.activation_checkpointing == "selective" else None
        flops, counter = FlopCounterMode(display=False), StepCounter(stack, tokens, width, selective)
        for layer in repeated_layers(stack.llm):
            layer.register_forward_pre_hook(lambda *_: setattr(counter, "in_layer", True))
            layer.register_forward_hook(lambda *_: setattr(counter, "in_layer", False))
        with flops, counter, mock.patch.object(torch.nn.functional, "dropout", cuda_dropout):
            with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda tensor: tensor), \
                    torch.autocast("cpu", dtype=torch.bfloat16):
                out = stack(**views)
                student, teacher = out.student_pooled, out.teacher_pooled
                loss = squared_error(student, teacher).sum()
            counter.phase = "backward"
            loss.backward()
    return {
        "tflop": flops.get_total_flops() / 1e12,
        "tflop_formula": step_flops(flop_shape(stack.llm), flop_shape(stack.mt_encoder), tokens, tokens * seq, tokens,
                                    tokens * seq) / 1e12,
        "ops_forward": counter.ops["forward"], "ops_backward": counter.ops["backward"],
        "ops": sum(counter.ops.values()),
        "saved_bytes_per_token": sum(counter.saved.values()) / tokens,
        "activation_copies": counter.copies, "activation_copy_mb": counter.copy_bytes / 2**20,
    }


def markdown(results: dict, batch: int, seq: int) -> str:
    lines = [f"| variant (micro batch {batch} x {seq} tokens per view) | TFLOP (formula) | aten ops fwd + bwd "
             f"| saved activation KiB / token | activation-sized copies (MiB) |", "|---|---|---|---|---|"]
    for name, row in results.items():
        lines.append(f"| {LABELS[name]} | {row['tflop']:.3g} ({row['tflop_formula']:.3g}) | {row['ops_forward']} + "
                     f"{row['ops_backward']} = {row['ops']} | {row['saved_bytes_per_token'] / 1024:.1f} | "
                     f"{row['activation_copies']} ({row['activation_copy_mb']:.0f}) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="micro batch (sequences per view)")
    parser.add_argument("--seq", type=int, default=512, help="tokens per view")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU check of the script)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    names = args.variants.split(",")
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    results = {}
    for name in names:
        start = time.perf_counter()
        results[name] = profile(model_config(args.tiny, VARIANTS[name]), args.batch, args.seq)
        print(f"{name}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    print(markdown(results, args.batch, args.seq))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
