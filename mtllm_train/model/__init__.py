from mtllm_train.model.loading import build_llm, build_mt_encoder, load_tokenizer
from mtllm_train.model.loss import fvu, mse, squared_error
from mtllm_train.model.pooling import pool
from mtllm_train.model.stack import MTLLM, build_stack, trainable_parameters

__all__ = ["MTLLM", "build_llm", "build_mt_encoder", "build_stack", "fvu", "load_tokenizer", "mse", "pool",
           "squared_error", "trainable_parameters"]
