"""Load the frozen parts of the stack (MT encoder, LLM) from a folder, a hub id or an inline config."""

from __future__ import annotations

import inspect
import tempfile
from contextlib import contextmanager

import torch
from safetensors.torch import save_model
from torch import nn
from transformers import AutoConfig, AutoModel, BitsAndBytesConfig

from mtllm_train.config import ConfigError, ModelConfig, stored_quantization
from mtllm_train.model.hub import from_pretrained
from mtllm_train.portable.format import DTYPES, encoder_of, four_bit_config
from mtllm_train.portable.modeling_mtllm import make_bidirectional
from mtllm_train.portable.tokens import InputError

def quantization_config(cfg: ModelConfig) -> BitsAndBytesConfig | None:
    if stored_quantization(cfg) == "none":
        return None
    return four_bit_config(cfg.quantization, cfg.quant_double, cfg.quant_compute_dtype, cfg.quant_storage_dtype)


@contextmanager
def seeded(seed: int, device: torch.device | str):
    """Random init inside from `seed` (on `device`'s generator too), leaving the global RNG state as it was:
    every rank builds the same weights."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type="cuda"):
        torch.manual_seed(seed)
        yield


def load_model(spec: str | dict, key: str, cfg: ModelConfig, quantize: bool, device: torch.device | str = "cpu",
               auto_class=AutoModel) -> nn.Module:
    """A model from a folder / hub id, read (and quantized) straight into `device`'s memory, so the ranks of a
    node do not each hold a host copy of the LLM before step 1; or built from an inline config with seeded
    random init, then moved to `device`.

    Random frozen weights are not saved with a run: export and stage 2 rebuild them, maybe on another device, so
    they are drawn on the default device, the CPU, whose generator gives the same numbers everywhere. (A
    benchmark of a large random model sets a GPU as the default device, with `with torch.device(...)`, to
    initialise it there.)"""
    dtype, device = DTYPES[cfg.dtype], torch.device(device)
    quant = quantization_config(cfg) if quantize else None
    if isinstance(spec, str):
        return from_pretrained(auto_class, spec, key, dtype=dtype, quantization_config=quant,
                               device_map={"": device})
    spec = dict(spec)
    model_type = spec.pop("model_type", None)
    if model_type is None:
        raise ConfigError(f"{key}: an inline config needs 'model_type' (e.g. llama, gpt2, m2m_100, bert)")
    try:
        hf_config = AutoConfig.for_model(model_type, **spec)
    except ValueError as err:
        raise ConfigError(f"{key}: {err}") from None
    with seeded(cfg.init_seed, torch.get_default_device()):
        model = auto_class.from_config(hf_config, dtype=dtype)
    if quant is None:
        return model.to(device)
    # Quantization happens while loading weights, so go through the same from_pretrained path as a real model.
    # (Written by hand: under a process group, save_pretrained writes on rank 0 only.)
    with tempfile.TemporaryDirectory() as folder:
        model.config.to_json_file(f"{folder}/config.json")
        save_model(model, f"{folder}/model.safetensors")
        return auto_class.from_pretrained(folder, dtype=dtype, quantization_config=quant, device_map={"": device})


def freeze(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    return module.eval()


def build_mt_encoder(cfg: ModelConfig, device: torch.device | str = "cpu") -> nn.Module:
    """The encoder of an encoder-decoder (M2M100/NLLB) or an encoder-only model (BERT/XLM-R), frozen."""
    model = encoder_of(load_model(cfg.mt_encoder, "model.mt_encoder", cfg, quantize=False, device=device))
    model.config.use_cache = False  # as for the LLM below (an encoder caches nothing, but its layers are told to)
    return freeze(model)


def build_llm(cfg: ModelConfig, device: torch.device | str = "cpu") -> nn.Module:
    """The English LLM without its LM head, frozen, optionally 4-bit and bidirectional."""
    model = load_model(cfg.llm, "model.llm", cfg, quantize=True, device=device)
    if "inputs_embeds" not in inspect.signature(model.forward).parameters:
        raise ConfigError(f"model.llm: {type(model).__name__} does not accept inputs_embeds; the stack feeds the "
                          f"projected MT-encoder states to the LLM as inputs_embeds (use e.g. Llama, GPT-2, BERT)")
    if cfg.bidirectional:
        try:
            make_bidirectional(model)
        except InputError as err:
            raise ConfigError(f"model.bidirectional: {err}") from None
    # Every pass reads whole texts once: a KV cache (transformers builds one per forward in eval mode) would only
    # cost memory and time, and makes torch.compile recompile per layer.
    model.config.use_cache = False
    return freeze(model)
