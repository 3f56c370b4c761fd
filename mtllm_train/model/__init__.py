"""The stack: loading.py (E, M, tokenizers), stack.py (E -> U -> M + LoRA, teacher), pooling.py, loss.py."""
