"""mtllm-train: self-distillation training of MT-encoder + LLM stacks (MT-LLMs)."""

import logging
import warnings

# bitsandbytes tries to fetch an optional CPU kernel from a model hub and falls back to its own; the
# warning it logs about that is noise on machines without hub access.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# transformers imports torchao whenever it is installed (the optional FP8 base): torchao 0.18 logs that its
# CUDA-only kernels do not load, and torch 2.13 that its enum registrations are deprecated; both harmless.
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").addFilter(
    lambda record: "is an Enum subclass and is now natively supported" not in record.getMessage())
# peft calls a transformers property deprecated in transformers 5; harmless until transformers 6.
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
# A 1-process run saves torch.distributed checkpoints without a process group, which is what we want.
warnings.filterwarnings("ignore", message=r"torch.distributed is disabled, unavailable or uninitialized")
