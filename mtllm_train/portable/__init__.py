"""The code that ships inside every export (copied there verbatim) and that the training side imports too, so
there is one home for it: pooling, task heads, task encoding, token rules, and the MT-LLM model class that
`transformers.AutoModel.from_pretrained(export, trust_remote_code=True)` and sentence-transformers load.

Rule: these modules import torch, numpy, transformers and peft only, and each other by relative import; never
mtllm_train, which a user of an exported model does not have.
"""
